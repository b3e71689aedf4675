"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """../shared/data next to the project, or $WSI_TRIAGE_SHARED_DATA when set."""
    env = os.environ.get("WSI_TRIAGE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"../shared/data not present: {path} (set WSI_TRIAGE_SHARED_DATA to its location)")
    return path
