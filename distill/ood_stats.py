"""Out-of-domain statistics of a checkpoint's training features, added to its safetensors file.

Tied-covariance Mahalanobis (Lee et al. 2018) on the penultimate features (the normalised class
token the head reads): class means and one shared covariance from the TRAINING split, the
threshold the ``quantile`` (default 90 %) of the smallest class distance on the held-in
VALIDATION split (same split as training: stratified, ``val_frac`` 0.15, seed 0), so about 10 % of
in-domain tiles are flagged by design. 90 % and not 95 or 99 %: a slide is flagged only when more
than half of its tiles are, so a 10-20 % tile false-flag rate costs no slide, while higher
thresholds let Pap-stained cervical fields through the blood-cell demo student (measured, tiles of
held-out blood smears / Pap fields flagged: 99 % -> 4 % / 13 of 80 fields; 95 % -> 10 % / 45 of 80;
90 % -> 18 % / 71 of 80; benchmarks/eval_ood.py). Written as tensors ``ood.class_means`` (C, D) and
``ood.precision`` (D, D) (fp32) and metadata ``ood`` (JSON); the model's own tensors are copied
bit for bit, so its probabilities do not change. The contract is ``docs/contracts.md`` §2
(:mod:`wsi_contracts.checkpoint`, :mod:`wsi_contracts.ood`); the pipeline's scorer is
``wsi_pipeline.scoring.ood``.

    wsi-distill ood-stats CHECKPOINT --data ../shared/data/pbc --exclude configs/pbc_heldout.txt \
        [--data runs/tiles/train] [--out OUT]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wsi_contracts import checkpoint as contract
from wsi_contracts.ood import LAYER, METHOD, OOD_KEY

from .data import load_imagefolder, stratified_split
from .errors import DistillError
from .export import contract_errors, load_model

__all__ = ["add_ood_stats", "fit_ood", "model_features", "ood_distances"]

#: ridge added to the covariance's diagonal, relative to its mean variance (keeps it invertible)
SHRINK = 1e-3


@torch.inference_mode()
def model_features(model: torch.nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256) -> np.ndarray:
    """Pre-logit features (N, D) float64 of uint8 images (N, S, S, 3) already at the model's input size."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = (images[i:i + batch_size].permute(0, 3, 1, 2).float() / 255.0 - m) / s
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit_ood(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means (C, D), precision (D, D)) of the tied-covariance Gaussian; classes absent from
    ``labels`` are left out of the means."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    means = np.stack([f[labels == c].mean(axis=0) for c in present])
    centred = f - means[np.searchsorted(present, labels)]
    cov = centred.T @ centred / max(len(f) - len(present), 1)
    cov += SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov))
    return means, np.linalg.inv(cov)


def ood_distances(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance to a class mean (the same formula as ``wsi_pipeline.scoring.ood``)."""
    f = np.asarray(features, dtype=np.float64)
    fp = f @ precision
    d2 = np.einsum("nd,nd->n", fp, f)[:, None] - 2 * fp @ means.T + np.einsum("cd,cd->c", means @ precision, means)
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def add_ood_stats(checkpoint: str | Path, data: list[str | Path], out: str | Path | None = None, *,
                  exclude: str | Path | None = None, val_frac: float = 0.15, split_seed: int = 0,
                  quantile: float = 0.9, max_train_per_source: int | None = None,
                  cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit the statistics on ``data`` (ImageFolders with a subset of the checkpoint's classes) and
    write ``out`` (default: the checkpoint itself, replaced atomically). Returns the ``ood`` entry."""
    log = log or logging.getLogger(__name__).info
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint
    model, info, _ = load_model(checkpoint)
    meta = info.metadata
    classes = list(meta["class_names"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    train_f, train_y, val_f, sources = [], [], [], []
    for i, root in enumerate(data):
        ps = load_imagefolder(root, int(meta["input_size"]), exclude=exclude if i == 0 else None,
                              class_names=classes, cache_dir=cache_dir)
        tr, va = stratified_split(ps.labels, val_frac, split_seed)
        if max_train_per_source is not None and len(tr) > max_train_per_source:
            g = torch.Generator().manual_seed(split_seed)
            tr = tr[torch.randperm(len(tr), generator=g)[:max_train_per_source]]
        log(f"{root}: {len(tr)} train / {len(va)} validation images")
        train_f.append(model_features(model, ps.images[tr], mean, std))
        train_y.append(ps.labels[tr].numpy())
        val_f.append(model_features(model, ps.images[va], mean, std))
        sources.append({"data": Path(root).name, "fingerprint": ps.fingerprint, "train": len(tr), "validation": len(va)})
    feats, labels = np.concatenate(train_f), np.concatenate(train_y)
    means, precision = fit_ood(feats, labels, len(classes))
    val_d = ood_distances(np.concatenate(val_f), means, precision)
    train_d = ood_distances(feats, means, precision)
    threshold = float(np.quantile(val_d, quantile))
    entry = {
        "method": METHOD, "layer": LAYER, "threshold": round(threshold, 4),
        "threshold_rule": f"{quantile:g} quantile of the held-in validation distances",
        "distance": "smallest Mahalanobis distance (not squared) to a class mean, tied covariance",
        "classes": [classes[c] for c in sorted(set(labels.tolist()))],
        "n_train": int(len(feats)), "n_validation": int(len(val_d)),
        "validation_flagged": round(float(np.mean(val_d > threshold)), 4),
        "train_flagged": round(float(np.mean(train_d > threshold)), 4),
        "validation_quantiles": {str(q): round(float(np.quantile(val_d, q)), 4) for q in (0.5, 0.9, 0.95, 0.99)},
        "sources": sources, "split": {"val_frac": val_frac, "seed": split_seed}, "shrinkage": SHRINK,
    }
    with contract_errors():  # the model's tensors as stored, bit for bit, with the new statistics
        contract.copy_with_metadata(info, out, {OOD_KEY: entry}, {
            "ood.class_means": torch.from_numpy(means.astype(np.float32)),
            "ood.precision": torch.from_numpy(precision.astype(np.float32))})
    return entry


if __name__ == "__main__":  # python -m distill.ood_stats: the same as `wsi-distill ood-stats`
    from .cli import ood_stats_cmd

    ood_stats_cmd(prog_name="python -m distill.ood_stats")
