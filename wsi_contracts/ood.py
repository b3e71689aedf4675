"""The out-of-domain entry of a checkpoint (docs/contracts.md section 2): its metadata and tensors.

A checkpoint may carry the class means and the inverse of the shared (tied) covariance of its
penultimate features on its training data, and a distance threshold. ``distill`` writes them;
``wsi_pipeline.scoring`` reads them to score how far a tile lies from what the model knows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OOD_KEY", "OOD_PREFIX", "TENSORS", "METHOD", "LAYER", "OodStats", "parse_ood_metadata"]

#: metadata key holding the method, threshold and feature layer (JSON)
OOD_KEY = "ood"
#: prefix of the extra tensors in the safetensors file; the model never sees them
OOD_PREFIX = "ood."
TENSORS = ("ood.class_means", "ood.precision")
METHOD = "mahalanobis_tied"
LAYER = "pre_logits"  # timm forward_head(..., pre_logits=True): the normalised class token


@dataclass(frozen=True)
class OodStats:
    """What a checkpoint says about its training features (see the module docstring)."""

    class_means: np.ndarray  # (C, D) float32
    precision: np.ndarray  # (D, D) float32, inverse of the tied covariance
    threshold: float  # a distance above this is out of domain
    method: str = METHOD
    layer: str = LAYER
    info: dict[str, Any] | None = None  # the full metadata entry (how the threshold was chosen, ...)

    @property
    def dim(self) -> int:
        return int(self.precision.shape[0])


def parse_ood_metadata(value: Any) -> dict[str, Any]:
    """The checked ``ood`` metadata entry; raises ValueError with the reason."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    if value.get("method") != METHOD:
        raise ValueError(f"method must be {METHOD!r}, got {value.get('method')!r}")
    if value.get("layer", LAYER) != LAYER:
        raise ValueError(f"layer must be {LAYER!r}, got {value.get('layer')!r}")
    t = value.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"threshold must be a positive finite number, got {t!r}")
    return value
