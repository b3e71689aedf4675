"""Predictions and accuracy, computed one way for training, fine-tuning and evaluation."""

from __future__ import annotations

from typing import Any

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, to_input

__all__ = ["accuracy", "confusion", "predict", "top1"]


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, bf16: bool,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, batch: int = 256) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 images (N, S, S, 3)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = to_input(images[i:i + batch], mean, std).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def confusion(pred: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts, rows = true class, columns = predicted class."""
    cm = torch.zeros(k, k, dtype=torch.int64)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return cm


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest logit is the label (0.0 for no rows), rounded to 5 digits."""
    return round(float((logits.argmax(-1) == labels).float().mean()), 5) if len(labels) else 0.0


def accuracy(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1, balanced accuracy (mean recall over the classes present in ``labels``), and per
    class precision / recall / support. ``labels`` and ``logits`` columns index ``class_names``."""
    k = len(class_names)
    pred = logits.argmax(-1)
    cm = confusion(pred, labels, k)
    per, recalls = {}, []
    for c, name in enumerate(class_names):
        tp, support, predicted = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        rec = tp / support if support else 0.0
        if support:
            recalls.append(rec)
        per[name] = {"precision": round(tp / predicted, 5) if predicted else 0.0, "recall": round(rec, 5),
                     "support": support}
    return {
        "top1": top1(logits, labels),
        "balanced_accuracy": round(sum(recalls) / max(1, len(recalls)), 5),
        "per_class": per,
        "confusion_matrix": {"rows_true_cols_pred": cm.tolist(), "class_names": list(class_names)},
    }
