"""Out-of-domain score of a tile: how far its features lie from what the checkpoint was trained on.

The checkpoint may carry (``docs/contracts.md`` §2) the class means and the shared (tied)
covariance's inverse of its penultimate features (the normalised class token that the head reads)
on its training data, and a threshold. A tile's score is the smallest Mahalanobis distance
(not squared) to a class mean; a tile above the threshold is out of domain, and a slide whose
share of such tiles exceeds ``SLIDE_FRACTION`` is reported as ``out_of_domain``.

Mahalanobis on the features and not the softmax (max-probability or energy) because the failure
it is meant to catch is a confident answer: on H&E stroma the blood-cell demo model says
"erythroblast" at p ~ 0.9, which no logit statistic distinguishes from a real erythroblast,
while its features lie far from every class mean (measured: ``benchmarks/eval_ood.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_contracts.ood import METHOD, OOD_KEY, OOD_PREFIX, TENSORS, OodStats, parse_ood_metadata

__all__ = ["OOD_KEY", "OOD_PREFIX", "SLIDE_FRACTION", "TENSORS", "OodStats", "features_and_logits", "ood_distance",
           "ood_summary", "parse_ood_metadata"]
#: a slide with more than this share of out-of-domain tiles is reported as out_of_domain
SLIDE_FRACTION = 0.5


def ood_distance(features: np.ndarray, stats: OodStats) -> np.ndarray:
    """Smallest Mahalanobis distance of each feature row (n, D) to a class mean, (n,) float32.

    Computed with torch in float64, not numpy: numpy's OpenBLAS runs the (n, D) x (D, D) product
    on threads of its own beside the scoring threads, which spin after each call; on 2 cores that
    cost ~10 % of the whole scoring (``benchmarks/bench_speed.py``, stage ``score``). torch's BLAS
    runs on the calling worker's threads. Same formula; the same float32 distances on real tiles."""
    import torch

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != stats.dim:
        raise ValueError(f"features of shape {f.shape} for OOD statistics of dimension {stats.dim}")
    if len(f) == 0:
        return np.zeros(0, dtype=np.float32)
    ft = torch.from_numpy(f)
    p = torch.from_numpy(stats.precision.astype(np.float64))
    mu = torch.from_numpy(stats.class_means.astype(np.float64))
    # (f - mu)^T P (f - mu) = f P f - 2 f P mu + mu P mu, for every class at once
    fp = ft @ p
    d2 = (torch.einsum("nd,nd->n", fp, ft)[:, None] - 2.0 * fp @ mu.T
          + torch.einsum("cd,cd->c", mu @ p, mu)[None, :])
    return torch.sqrt(torch.clamp(d2.min(dim=1).values, min=0.0)).numpy().astype(np.float32)


def features_and_logits(model, x):
    """(pre-logit features, logits) of a timm VisionTransformer for a normalised batch ``x``."""
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, model.head(feats)


def ood_summary(distance: np.ndarray | None, threshold: float | None) -> dict[str, Any] | None:
    """The summary.json ``ood`` entry for a slide's tile distances (None: no OOD statistics)."""
    if distance is None or threshold is None:
        return None
    d = np.asarray(distance, dtype=np.float64)
    n = int(d.size)
    flagged = int(np.sum(d > threshold))
    fraction = flagged / n if n else 0.0
    return {
        "method": METHOD, "threshold": round(float(threshold), 6), "n_flagged": flagged,
        "fraction": round(fraction, 6), "median_distance": round(float(np.median(d)), 6) if n else None,
        "slide_rule": f"out_of_domain when more than {SLIDE_FRACTION:.0%} of tiles are above the threshold",
        "slide_fraction": SLIDE_FRACTION, "out_of_domain": bool(n and fraction > SLIDE_FRACTION),
    }
