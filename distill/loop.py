"""The one training loop of distill: teacher, student (none | kd | mdkd) and fine-tune all run
through :func:`fit`; they differ only in the model, the loss of one batch, the epoch's sample
order and what is scored after each epoch.

A run folder gets ``state.pt`` (tensor-only: re-read with ``torch.load(weights_only=True)``;
written atomically after every epoch, so a killed run resumes) and ``metrics.jsonl`` (one JSON
line per epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, AugConfig, augment
from .errors import DistillError
from .runtime import Runtime

__all__ = ["LoopSettings", "Progress", "claim_run_folder", "fit", "lr_at", "param_groups"]

log = logging.getLogger("distill")



class Progress(Protocol):
    """``progress(stage, done, total)``, the progress protocol of ``wsi_pipeline.progress`` (which distill may
    not import): stage ``"epoch 3/10"``, optimiser steps done in that epoch out of ``total``; called
    with 0 when the epoch starts and after each step."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...


BatchLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float], torch.Tensor]]
"""``loss(x, y) -> (loss, {term: value}, logits)`` for one augmented batch on the device."""


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    grad_clip: float
    seed: int
    aug: AugConfig
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine to ``floor``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, p)))


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 head_lr_mult: float = 1.0, decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-d tensors (nor on the position embedding and class token
    unless ``decay_embeddings``); the head's learning rate scaled by ``head_lr_mult``. Frozen
    parameters are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        head = name.startswith("head.") and head_lr_mult != 1.0
        decay = p.ndim >= 2 and (decay_embeddings or ("pos_embed" not in name and "cls_token" not in name))
        groups.setdefault((head, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": head_lr_mult if head else 1.0}
            for (head, decay), ps in groups.items()]


def claim_run_folder(out: Path, cfg_json: dict[str, Any], resume: bool,
                     identity: Callable[[dict[str, Any]], dict[str, Any]], defaults: dict[str, Any] | None = None,
                     export_fields: tuple[str, ...] = ()) -> None:
    """Write ``out/config.json``, refusing to continue a run whose ``identity`` (the settings
    that define the trained weights) differs; other changes (export settings, device, threads)
    are allowed, export ones logged. ``defaults`` fill fields an older run did not record."""
    cfg_path, state_path = out / "config.json", out / "state.pt"
    if state_path.exists() and resume:
        old = (defaults or {}) | (json.loads(cfg_path.read_text()) if cfg_path.exists() else {})
        new_id, old_id = identity(cfg_json), identity(old)
        if new_id != old_id:
            diff = sorted(k for k in set(new_id) | set(old_id) if new_id.get(k) != old_id.get(k))
            raise DistillError(f"{out}: holds a run with a different config ({', '.join(diff)} differ); "
                               f"use a new out folder or start over (no resume)")
        changed = [k for k in export_fields if old.get(k) != cfg_json.get(k)]
        if changed:
            log.info("export settings changed since the run started (%s): resuming with the new ones",
                     ", ".join(changed))
    out.mkdir(parents=True, exist_ok=True)
    if not (state_path.exists() and resume):
        (out / "result.json").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg_json, indent=1))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(
    model: torch.nn.Module,
    batch_loss: BatchLoss,
    images: torch.Tensor,
    labels: torch.Tensor,
    epoch_order: Callable[[int, torch.Generator], torch.Tensor],
    settings: LoopSettings,
    runtime: Runtime,
    run_dir: Path,
    score: Callable[[torch.nn.Module], dict[str, Any]],
    extra_modules: dict[str, torch.nn.Module] | None = None,
    weight_decay: float = 0.05,
    head_lr_mult: float = 1.0,
    decay_embeddings: bool = True,
    resume: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on uint8 ``images`` (N, S, S, 3) / ``labels`` and return every epoch's
    metrics (those of epochs run before a resume included, read back from ``metrics.jsonl``).

    Each epoch: ``epoch_order(epoch, g)`` gives the sample indices, batches are augmented on the
    CPU with the same seeded generator ``g`` and moved to the device, AdamW steps with warmup +
    cosine learning rate, then ``score(model)`` adds the validation figures. ``extra_modules``
    (e.g. MDKD projectors) are trained and saved alongside the model.
    """
    extra_modules = extra_modules or {}
    named = list(model.named_parameters()) + [(f"{k}.{n}", p) for k, m in extra_modules.items()
                                              for n, p in m.named_parameters()]
    opt = torch.optim.AdamW(param_groups(named, weight_decay, head_lr_mult, decay_embeddings), lr=settings.lr)
    trainable = [p for _, p in named if p.requires_grad]
    s = settings
    total = s.steps_per_epoch * s.epochs
    state_path, metrics_path = run_dir / "state.pt", run_dir / "metrics.jsonl"
    start = 0
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        for k, m in extra_modules.items():
            if k in st:
                m.load_state_dict(st[k])
        start = int(st["epoch"]) + 1
        log.info("resumed from epoch %d", start)
    else:
        state_path.unlink(missing_ok=True)
        metrics_path.unlink(missing_ok=True)
    dev, bf16 = runtime.device, runtime.bf16
    lr = s.lr
    for epoch in range(start, s.epochs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(s.seed * 100003 + epoch)
        order = epoch_order(epoch, g)
        model.train()
        sums: dict[str, float] = {}
        correct = seen = 0
        stage = f"epoch {epoch + 1}/{s.epochs}"
        if progress is not None:
            progress(stage, 0, s.steps_per_epoch)
        for i in range(s.steps_per_epoch):
            idx = order[i * s.batch_size:(i + 1) * s.batch_size]
            if not len(idx):
                break
            lr = lr_at(epoch * s.steps_per_epoch + i, total, s.warmup_steps, s.lr, s.min_lr)
            for gr in opt.param_groups:
                gr["lr"] = lr * gr.get("lr_mult", 1.0)
            x = augment(images[idx], s.aug, g, s.mean, s.std).to(dev, non_blocking=True)
            y = labels[idx].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss, terms, logits = batch_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            correct += int((logits.detach().argmax(-1) == y).sum())
            seen += len(idx)
            if progress is not None:
                progress(stage, i + 1, s.steps_per_epoch)
        steps = max(1, -(-seen // s.batch_size))
        rec: dict[str, Any] = {"epoch": epoch + 1, "steps": steps, "lr": round(lr, 8),
                               **{f"train_{k}": round(v / steps, 5) for k, v in sums.items()}}
        rec["train_acc"] = round(correct / max(seen, 1), 5)
        train_s = time.perf_counter() - t0
        rec.update(score(model))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["img_per_s"] = round(seen / max(train_s, 1e-9), 1)
        line = json.dumps(rec)
        log.debug("%s", line)
        with open(metrics_path, "a") as f:
            f.write(line + "\n")
        st = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}
        st.update({k: m.state_dict() for k, m in extra_modules.items()})
        _save_state(state_path, st)
        if on_epoch is not None:
            on_epoch(rec)
    if not metrics_path.exists():
        return []
    return [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]

