"""Check tile stores against their recorded digests, and repair them from the slide.

A store is sound when every node exists, every small array has all its chunks, every shard
flagged done matches the digest recorded when it was written, and every complete score group
has finite probabilities for every tile. Repair re-tiles only the damaged shards (the whole
store when a node is missing) from the slide named in the store, provided the slide's
fingerprint still matches; scores of undamaged stores are kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_contracts import tilestore as tile_store
from .errors import SlideError, StoreError, UserError
from .lock import store_lock

__all__ = ["VerifyReport", "verify_store"]


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of checking (and perhaps repairing) one store."""

    store: Path
    problems: tuple[str, ...]  # what is still wrong (empty: the store is sound)
    repaired: tuple[int, ...] = ()  # shards re-tiled from the slide
    retiled: bool = False  # the whole store was re-tiled (a node was missing)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"store": str(self.store), "ok": self.ok, "problems": list(self.problems),
                "repaired": list(self.repaired), "retiled": self.retiled, "notes": list(self.notes)}


def _score_problems(group, store: Path) -> list[str]:
    meta = tile_store.read_store_meta(group)
    n, n_shards = meta.n_tiles, meta.n_shards
    problems = []
    for key in tile_store.score_keys(group):
        try:
            scores = tile_store.read_score_meta(group, key)
        except StoreError as exc:  # damaged attributes: a finding (rescoring rewrites them), not a crash
            problems.append(str(exc))
            continue
        if not scores.complete:
            continue
        try:
            probs = np.asarray(group[key]["probs"][:])
            done = np.asarray(group[key]["shard_done"][:n_shards]) if n_shards else np.ones(0, bool)
        except Exception as exc:  # noqa: BLE001 - any unreadable score array is a finding, not a crash
            problems.append(f"{store}: {key} cannot be read ({type(exc).__name__}); rerun `wsi-triage score`")
            continue
        if probs.shape[0] != n or not done.all() or (n and not np.isfinite(probs).all()):
            problems.append(f"{store}: {key} is marked complete but lacks finite scores for some tiles; "
                            "rerun `wsi-triage score`")
    return problems


def _check(store: Path) -> tuple[list[str], dict[int, str], bool]:
    """(problems, damaged shards, whether a node is missing)."""
    try:
        group = tile_store.open_store(store)
    except StoreError as exc:
        return [str(exc)], {}, True
    problems: list[str] = []
    if not tile_store.is_complete(group):
        problems.append(f"{store}: tile store is incomplete (tiling was interrupted)")
    try:
        tile_store.check_layout(group)
    except StoreError as exc:
        return problems + [str(exc)], {}, True
    damaged = tile_store.damaged_shards(group)
    problems += [damaged[i] for i in sorted(damaged)]
    problems += _score_problems(group, store)
    return problems, damaged, False


def _repair(store: Path) -> tuple[list[int], bool, list[str]]:
    """Re-tile what is damaged from the store's slide; returns (shards, whole store?, notes)."""
    from .slides import fingerprint
    from .tiling import TilerConfig, tile_slide

    group = tile_store.open_store(store)
    meta = tile_store.read_store_meta(group)
    slide = Path(meta.slide_path or "")
    if not meta.slide_path or not slide.is_file():
        raise SlideError(f"{store}: cannot repair: its slide {slide} is not there; re-tile with `wsi-triage run SLIDE`")
    if fingerprint(slide) != meta.slide_fingerprint:
        raise SlideError(f"{store}: cannot repair: {slide} changed since the store was tiled (fingerprint "
                         "differs); re-tile with `wsi-triage run SLIDE`")
    if tile_store.store_path(store.parent, slide) != store:
        raise StoreError(f"{store}: cannot repair: the store was renamed (its slide is {slide.name})")
    fields = {f.name for f in dataclasses.fields(TilerConfig)}
    config = TilerConfig(**{k: v for k, v in meta.tiler_config.items() if k in fields})
    mpp = meta.slide_mpp.x if meta.slide_mpp and meta.slide_mpp.source == "user" else None
    before = tile_store.damaged_shards(group) if _layout_ok(group) else None
    tile_slide(slide, store.parent, config, mpp=mpp)  # re-tiles only what tiling finds damaged or missing
    if before is None:
        return [], True, ["a node was missing: the whole store was re-tiled (its scores must be recomputed)"]
    return sorted(before), False, []


def _layout_ok(group) -> bool:
    try:
        tile_store.check_layout(group)
        return True
    except StoreError:
        return False


def verify_store(store: str | Path, *, repair: bool = False) -> VerifyReport:
    """Check one store; with ``repair``, re-tile its damaged parts from the slide and check again."""
    store = Path(store)
    if not store.exists():
        raise StoreError(f"{store}: no such tile store")
    problems, damaged, missing_node = _check(store)
    if not repair or not problems:
        return VerifyReport(store, tuple(problems))
    only_scores = not damaged and not missing_node and all("wsi-triage score" in p for p in problems)
    if only_scores:
        return VerifyReport(store, tuple(problems), notes=("scores are repaired by rerunning `wsi-triage score`",))
    with store_lock(store):
        try:
            shards, whole, notes = _repair(store)
        except UserError as exc:
            return VerifyReport(store, tuple(problems) + (str(exc),))
        problems, _, _ = _check(store)
    return VerifyReport(store, tuple(problems), tuple(shards), whole, tuple(notes))
