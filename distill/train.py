"""Teacher and student training (``none`` | ``kd`` | ``mdkd``) on the one loop of
:mod:`distill.loop`.

A run folder holds ``config.json``, ``state.pt`` and ``metrics.jsonl`` (see the loop) and, at the
end, ``model.safetensors`` (docs/contracts.md section 2) and ``result.json``. A stopped run
resumes when started again with the same training settings; export settings (suspicious
classes, tile size / mpp, stain) and runtime settings (device, threads, bf16, cache) may change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .config import EXPORT_FIELDS, MODES, TrainConfig, config_from_dict, run_folder, training_identity
from .data import IMAGENET_MEAN, IMAGENET_STD, PatchSet, balanced_epoch_indices, group_keys, load_imagefolder, \
    load_tilestore, stratified_split
from .errors import DistillError
from wsi_contracts.checkpoint import file_sha256 as sha256_file
from .export import build_metadata, load_model_file, write_checkpoint
from .loop import LoopSettings, Progress, claim_run_folder, fit, lr_at
from .losses import MDKDLoss, response_loss
from .metrics import accuracy, predict
from .models import architecture, block_features, count_params, init_from_timm_weights, init_student_from_teacher
from .preflight import check_training, split_record
from .runtime import resolve_runtime, torch_threads

__all__ = ["MODES", "TrainConfig", "config_from_dict", "load_patches", "lr_at", "predict", "run_training",
           "split_of"]

log = logging.getLogger("distill")


def load_patches(cfg: TrainConfig, size: int, class_names: list[str] | None = None) -> PatchSet:
    """Decode the data ``cfg`` names at ``size`` px (``class_names``: see ``load_imagefolder``)."""
    if cfg.tile_store:
        if not cfg.labels_csv:
            raise DistillError("a tile_store needs labels_csv (CSV of tile_index,label)")
        return load_tilestore(cfg.tile_store, cfg.labels_csv, size, class_names)
    if not cfg.data:
        raise DistillError("no training data: set data (ImageFolder root) or tile_store + labels_csv")
    return load_imagefolder(cfg.data, size, cfg.exclude, cfg.cache_dir, class_names)


def split_of(patches: PatchSet, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices of ``patches`` under the config's split (seed, fraction, groups)."""
    groups = group_keys(patches.paths, cfg.group_pattern) if patches.paths and cfg.group_pattern else None
    return stratified_split(patches.labels, cfg.val_frac, cfg.split_seed, groups)


def _cfg_json(cfg: TrainConfig, role: str) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg))) | {"role": role}


def run_training(cfg: TrainConfig, role: str, resume: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Train a teacher (``role="teacher"``) or a student (``role="student"``, ``cfg.mode``).

    Every check that needs no decoded image runs first. Returns the final metrics; writes the
    run folder (``cfg.out`` with ``{role}`` replaced).
    """
    if role not in ("teacher", "student"):
        raise DistillError(f"unknown role {role!r}; choose teacher or student")
    teacher = teacher_meta = None
    needs_teacher = role == "student" and (cfg.mode != "none" or cfg.student_init_blocks)
    if needs_teacher:
        if not cfg.teacher:
            raise DistillError(f"mode {cfg.mode!r} needs a teacher checkpoint (teacher)")
        if not Path(cfg.teacher).is_file():
            raise DistillError(f"{cfg.teacher}: teacher checkpoint not found (train the teacher first)")
        teacher, teacher_meta = load_model_file(cfg.teacher)
    plan = check_training(cfg, role, teacher_meta)
    rt = resolve_runtime(cfg.device, cfg.bf16)
    with torch_threads(cfg.threads):
        return _train(cfg, role, resume, on_epoch, progress, teacher, teacher_meta, plan, rt)


def _train(cfg: TrainConfig, role: str, resume: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
           progress: Progress | None, teacher, teacher_meta, plan, rt) -> dict[str, Any]:
    """:func:`run_training` once its checks have passed: decode, train, export."""
    teacher_sha = None
    out = run_folder(cfg, role)
    cfg_json = _cfg_json(cfg, role)
    claim_run_folder(out, cfg_json, resume, training_identity, _cfg_json(TrainConfig(), role), EXPORT_FIELDS)
    log.info("%s: %d classes %s", out, len(plan.class_names), plan.counts)

    if teacher is not None:
        teacher_sha = sha256_file(cfg.teacher)
        teacher.to(rt.device).eval().requires_grad_(False)
    size = cfg.img_size
    patches = load_patches(cfg, size, teacher_meta["class_names"] if teacher_meta else None)
    k = len(patches.class_names)
    if teacher_meta is not None and teacher_meta["provenance"].get("data_fingerprint") not in (None, patches.fingerprint):
        raise DistillError("the teacher was trained on other data (data_fingerprint differs); "
                           "its validation images could leak")
    tr_idx, va_idx = split_of(patches, cfg)

    arch = architecture(cfg.preset, role, k, size, cfg.patch_size,
                        cfg.teacher_depth if role == "teacher" else cfg.student_depth)
    torch.manual_seed(cfg.seed)
    model = build_vit_with_drop_path(arch, cfg.drop_path)
    if role == "teacher" and cfg.teacher_init:
        info = init_from_timm_weights(model, cfg.teacher_init)
        log.info("teacher_init %s: missing %s", cfg.teacher_init, info["missing"][:8])
    if role == "student" and cfg.student_init_blocks:
        init_student_from_teacher(model, teacher, list(cfg.student_init_blocks))
    model.to(rt.device)

    loss_mod = None
    if role == "student" and cfg.mode == "mdkd":
        loss_mod = MDKDLoss(cfg.mdkd, model.embed_dim, teacher.embed_dim, cfg.label_smoothing).to(rt.device)
    batch_loss = _batch_loss(cfg, role, model, teacher, loss_mod)

    train_imgs, train_labels = patches.images[tr_idx], patches.labels[tr_idx]
    val_imgs, val_labels = patches.images[va_idx], patches.labels[va_idx]
    n_train = cfg.samples_per_epoch or len(tr_idx)
    steps = max(1, n_train // cfg.batch_size)
    settings = LoopSettings(cfg.epochs, steps, cfg.batch_size, cfg.lr, cfg.min_lr, int(cfg.warmup_epochs * steps),
                            cfg.grad_clip, cfg.seed, cfg.aug)

    def score(m: torch.nn.Module) -> dict[str, Any]:
        acc = accuracy(predict(m, val_imgs, rt.device, rt.bf16), val_labels, patches.class_names)
        return {"val_top1": acc["top1"], "val_balanced_acc": acc["balanced_accuracy"]}

    history = fit(model, batch_loss, train_imgs, train_labels,
                  lambda epoch, g: balanced_epoch_indices(train_labels, cfg.samples_per_epoch, g),
                  settings, rt, out, score, {"loss_mod": loss_mod} if loss_mod is not None else None,
                  weight_decay=cfg.weight_decay, resume=resume, on_epoch=on_epoch, progress=progress)
    last = history[-1] if history else score(model)
    final = {"val_top1": last["val_top1"], "val_balanced_acc": last["val_balanced_acc"],
             "n_train": len(tr_idx), "n_val": len(va_idx), "params": count_params(model), "epochs": cfg.epochs}
    prov = {
        "role": role,
        "mode": cfg.mode if role == "student" else None,
        "data_source": patches.source,
        "data_fingerprint": patches.fingerprint,
        "split": split_record(cfg),
        "config": cfg_json,
        "teacher_sha256": teacher_sha,
        "metrics": final,
        "precision": rt.reason,
    }
    md = build_metadata(arch, patches.class_names, cfg.suspicious_classes, IMAGENET_MEAN, IMAGENET_STD,
                        size, cfg.tile_size, cfg.tile_mpp, prov)
    for key in ("stain", "placement"):
        if getattr(cfg, key):
            md[key] = getattr(cfg, key)
    final["sha256"] = write_checkpoint(out / "model.safetensors", model.state_dict(), md)
    (out / "result.json").write_text(json.dumps(final, indent=1))
    return final


def _batch_loss(cfg: TrainConfig, role: str, model, teacher, loss_mod):
    """The loss of one batch for the role and mode: CE, Hinton KD or MDKD."""
    if role == "teacher" or cfg.mode == "none":
        def ce(x, y):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            return loss, {"ce": float(loss.detach())}, logits
        return ce
    if cfg.mode == "kd":
        def kd(x, y):
            with torch.no_grad():
                t_logits = teacher(x)
            logits = model(x)
            loss = response_loss(logits, t_logits, y, cfg.kd_alpha, cfg.kd_tau, label_smoothing=cfg.label_smoothing)
            return loss, {"kd": float(loss.detach())}, logits
        return kd

    def mdkd(x, y):
        with torch.no_grad():
            t_logits, t_feats = block_features(teacher, x)
        logits, s_feats = block_features(model, x)
        loss, terms = loss_mod(s_feats, t_feats, logits, t_logits, y)
        return loss, terms, logits
    return mdkd


def build_vit_with_drop_path(arch: dict[str, Any], drop_path: float):
    """Same as ``build_vit`` with stochastic depth (training only: not part of the recorded
    architecture since it does not change the weights' layout or inference)."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in arch.items() if k != "family"}
    return VisionTransformer(**kwargs, drop_path_rate=drop_path)
