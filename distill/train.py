"""Training loops: teacher (plain supervised) and student (``none`` | ``kd`` | ``mdkd``).

A run folder holds ``config.json``, ``state.pt`` (tensor-only training state, re-read with
``torch.load(weights_only=True)``; written atomically after every epoch so a killed run
resumes), ``metrics.jsonl`` (one JSON line per epoch, also printed) and, at the end,
``model.safetensors`` in the checkpoint format of docs/contracts.md section 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, AugConfig, PatchSet, augment, balanced_epoch_indices, \
    load_imagefolder, load_tilestore, stratified_split, to_input
from .errors import DistillError
from .export import build_metadata, load_model_file, sha256_file, write_checkpoint
from .losses import MDKDConfig, MDKDLoss, response_loss
from .models import architecture, count_params, forward_features_all, init_from_timm_weights, \
    init_student_from_teacher

MODES = ("none", "kd", "mdkd")


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # ImageFolder root
    exclude: str | None = None  # file of relpaths never to use (e.g. configs/pbc_heldout.txt)
    tile_store: str | None = None  # or a wsi_pipeline tile store ...
    labels_csv: str | None = None  # ... with a tile_index,label table
    cache_dir: str | None = "runs/cache"
    val_frac: float = 0.15
    split_seed: int = 0  # fixed across runs so every model is scored on the same split
    samples_per_epoch: int | None = None  # class-balanced subset per epoch; None = all
    aug: AugConfig = field(default_factory=AugConfig)
    # model
    preset: str = "tiny"
    img_size: int = 128
    patch_size: int = 16
    teacher_depth: int | None = None
    student_depth: int | None = None
    drop_path: float = 0.1
    teacher_init: str | None = None  # local timm ViT weights for the teacher
    student_init_blocks: list[int] | None = None  # e.g. [4, 8, 12]: copy teacher blocks
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True
    device: str = "auto"
    threads: int | None = None
    # distillation
    mode: str = "none"
    teacher: str | None = None  # teacher model.safetensors
    kd_alpha: float = 0.5
    kd_tau: float = 4.0
    mdkd: MDKDConfig = field(default_factory=MDKDConfig)
    # checkpoint metadata
    suspicious_classes: list[str] = field(default_factory=list)
    tile_size: int = 128
    tile_mpp: float = 0.27
    out: str = "runs/run"


def _check_keys(d: dict[str, Any], cls: type, what: str) -> dict[str, Any]:
    """A copy of ``d`` after checking its keys are fields of dataclass ``cls``."""
    bad = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        raise DistillError(f"unknown {what} keys {bad}")
    return dict(d)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a (YAML) dict; unknown keys are user errors."""
    d = _check_keys(d, TrainConfig, "config")
    if isinstance(d.get("aug"), dict):
        a = _check_keys(d["aug"], AugConfig, "aug")
        if a.get("scale") is not None:
            a["scale"] = tuple(a["scale"])
        d["aug"] = AugConfig(**a)
    if isinstance(d.get("mdkd"), dict):
        m = _check_keys(d["mdkd"], MDKDConfig, "mdkd")
        if "block_map" in m:
            m["block_map"] = [tuple(int(v) for v in p) for p in m["block_map"]]
        d["mdkd"] = MDKDConfig(**m)
    return TrainConfig(**d)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_patches(cfg: TrainConfig, size: int, class_names: list[str] | None = None) -> PatchSet:
    if cfg.tile_store:
        if not cfg.labels_csv:
            raise DistillError("a tile_store needs labels_csv (CSV of tile_index,label)")
        return load_tilestore(cfg.tile_store, cfg.labels_csv, size, class_names)
    if not cfg.data:
        raise DistillError("no training data: set data (ImageFolder root) or tile_store + labels_csv")
    return load_imagefolder(cfg.data, size, cfg.exclude, cfg.cache_dir)


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine to ``floor``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, p)))


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, bf16: bool,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, batch: int = 256) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 images (N, S, S, 3)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = to_input(images[i:i + batch], mean, std).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def top1_and_balanced(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    pred = logits.argmax(-1)
    top1 = (pred == labels).float().mean().item()
    recalls = [(pred[labels == c] == c).float().mean().item() for c in range(k) if (labels == c).any()]
    return top1, sum(recalls) / len(recalls)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _cfg_json(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_training(cfg: TrainConfig, role: str, resume: bool = True, log=None) -> dict[str, Any]:
    """Train a teacher (``role="teacher"``) or a student (``role="student"``, ``cfg.mode``).

    Returns the final metrics. Writes the run folder ``cfg.out``.
    """
    if log is None:
        def log(line: str) -> None:
            print(line, flush=True)
    if role == "student" and cfg.mode not in MODES:
        raise DistillError(f"unknown distillation mode {cfg.mode!r}; choose one of {MODES}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = _cfg_json(cfg) | {"role": role}
    cfg_path = out / "config.json"
    state_path = out / "state.pt"
    if state_path.exists() and resume:
        old = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
        if old != cfg_json:
            raise DistillError(f"{out}: holds a run with a different config; use a new --out or --no-resume")
    if not (state_path.exists() and resume):  # a fresh start: forget any earlier run's history
        for stale in (state_path, out / "metrics.jsonl", out / "result.json"):
            stale.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg_json, indent=1))

    teacher = None
    teacher_meta = None
    teacher_sha = None
    if role == "student" and (cfg.mode != "none" or cfg.student_init_blocks):
        if not cfg.teacher:
            raise DistillError(f"mode {cfg.mode!r} needs a teacher checkpoint (--teacher)")
        teacher, teacher_meta = load_model_file(cfg.teacher)
        teacher_sha = sha256_file(cfg.teacher)
        teacher.to(device).eval().requires_grad_(False)

    size = cfg.img_size
    patches = load_patches(cfg, size, teacher_meta["class_names"] if teacher_meta else None)
    k = len(patches.class_names)
    if teacher_meta is not None:
        if teacher_meta["class_names"] != patches.class_names:
            raise DistillError(f"teacher classes {teacher_meta['class_names']} != data classes {patches.class_names}")
        if teacher_meta["input_size"] != size:
            raise DistillError(f"teacher input_size {teacher_meta['input_size']} != img_size {size}")
        tprov = teacher_meta["provenance"]
        if tprov.get("data_fingerprint") not in (None, patches.fingerprint) or \
                tprov.get("split") not in (None, {"seed": cfg.split_seed, "val_frac": cfg.val_frac}):
            raise DistillError("the teacher was trained on other data or another train/val split "
                               "(data_fingerprint / split differ); its validation images could leak")
    tr_idx, va_idx = stratified_split(patches.labels, cfg.val_frac, cfg.split_seed)

    arch = architecture(cfg.preset, role, k, size, cfg.patch_size,
                        cfg.teacher_depth if role == "teacher" else cfg.student_depth)
    torch.manual_seed(cfg.seed)
    model = build_vit_with_drop_path(arch, cfg.drop_path)
    if role == "teacher" and cfg.teacher_init:
        info = init_from_timm_weights(model, cfg.teacher_init)
        log(json.dumps({"teacher_init": cfg.teacher_init, "missing": info["missing"][:8]}))
    if role == "student" and cfg.student_init_blocks:
        init_student_from_teacher(model, teacher, list(cfg.student_init_blocks))
    model.to(device)

    loss_mod = None
    if role == "student" and cfg.mode == "mdkd":
        loss_mod = MDKDLoss(cfg.mdkd, model.embed_dim, teacher.embed_dim, cfg.label_smoothing).to(device)
    params = [p for p in model.parameters()] + (list(loss_mod.parameters()) if loss_mod else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    n_train = cfg.samples_per_epoch or len(tr_idx)
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    start_epoch = 0
    if state_path.exists() and resume:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if loss_mod is not None and "loss_mod" in st:
            loss_mod.load_state_dict(st["loss_mod"])
        start_epoch = int(st["epoch"]) + 1
        log(json.dumps({"resumed_from_epoch": start_epoch - 1}))

    train_imgs, train_labels = patches.images[tr_idx], patches.labels[tr_idx]
    val_imgs, val_labels = patches.images[va_idx], patches.labels[va_idx]
    metrics: dict[str, Any] = {}
    use_bf16 = cfg.bf16
    from tqdm import tqdm

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = balanced_epoch_indices(train_labels, cfg.samples_per_epoch, g)
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{role} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   file=sys.stderr, disable=None)
        for i in bar:
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for gr in opt.param_groups:
                gr["lr"] = lr
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = augment(train_imgs[idx], cfg.aug, g).to(device)
            y = train_labels[idx].to(device)
            terms: dict[str, float]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if role == "teacher" or cfg.mode == "none":
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    terms = {"ce": float(loss.detach())}
                elif cfg.mode == "kd":
                    with torch.no_grad():
                        t_logits = teacher(x)
                    logits = model(x)
                    loss = response_loss(logits, t_logits, y, cfg.kd_alpha, cfg.kd_tau,
                                         label_smoothing=cfg.label_smoothing)
                    terms = {"kd": float(loss.detach())}
                else:
                    with torch.no_grad():
                        t_logits, t_feats = forward_features_all(teacher, x)
                    logits, s_feats = forward_features_all(model, x)
                    loss, terms = loss_mod(s_feats, t_feats, logits, t_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for kname, v in terms.items():
                sums[kname] = sums.get(kname, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        logits = predict(model, val_imgs, device, use_bf16)
        top1, bal = top1_and_balanced(logits, val_labels, k)
        metrics = {"epoch": epoch + 1, "lr": round(lr, 8),
                   **{f"train_{a}": round(b / steps_per_epoch, 5) for a, b in sums.items()},
                   "val_top1": round(top1, 5), "val_balanced_acc": round(bal, 5),
                   "seconds": round(time.time() - t0, 1)}
        line = json.dumps(metrics)
        log(line)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        st = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}
        if loss_mod is not None:
            st["loss_mod"] = loss_mod.state_dict()
        _save_state(state_path, st)

    if not metrics and (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().strip().splitlines()
        metrics = json.loads(lines[-1]) if lines else {}
    if not metrics:  # resumed a finished run without metrics: score it now
        logits = predict(model, val_imgs, device, use_bf16)
        top1, bal = top1_and_balanced(logits, val_labels, k)
        metrics = {"val_top1": round(top1, 5), "val_balanced_acc": round(bal, 5)}
    final = {"val_top1": metrics["val_top1"], "val_balanced_acc": metrics["val_balanced_acc"],
             "n_train": len(tr_idx), "n_val": len(va_idx), "params": count_params(model), "epochs": cfg.epochs}
    prov = {
        "role": role,
        "mode": cfg.mode if role == "student" else None,
        "data_source": patches.source,
        "data_fingerprint": patches.fingerprint,
        "split": {"seed": cfg.split_seed, "val_frac": cfg.val_frac},
        "config": cfg_json,
        "teacher_sha256": teacher_sha,
        "metrics": final,
    }
    md = build_metadata(arch, patches.class_names, cfg.suspicious_classes, IMAGENET_MEAN, IMAGENET_STD,
                        size, cfg.tile_size, cfg.tile_mpp, prov)
    sha = write_checkpoint(out / "model.safetensors", model.state_dict(), md)
    final["sha256"] = sha
    (out / "result.json").write_text(json.dumps(final, indent=1))
    return final


def build_vit_with_drop_path(arch: dict[str, Any], drop_path: float):
    """Same as ``build_vit`` with stochastic depth (training only: not part of the recorded
    architecture since it does not change the weights' layout or inference)."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in arch.items() if k != "family"}
    return VisionTransformer(**kwargs, drop_path_rate=drop_path)
