"""Fine-tune a student checkpoint on more data, optionally adding classes (e.g. ``background``).

Why: a student trained on single-cell images (one centred cell each) meets, on a slide grid,
tiles it never saw (red cells only, cut-off cells, blur, debris) and gives them confident
answers. Fine-tuning on a mix of the original images and labelled grid tiles with an extra
``background`` class teaches it to say "nothing here".

    wsi-distill finetune --init CKPT --data ROOT [--data ROOT2] --exclude configs/pbc_heldout.txt \\
        --add-class background --epochs N --out DIR [--eval-data ROOT3] [--export-fp16 FILE]

(``python -m distill.finetune`` takes the same options.) Every ``--data`` root (ImageFolder) is
split into train / validation with distill's split (``split_seed``, ``val_frac``,
``group_pattern``), so for the student's own training set the validation images are exactly
those it was validated on. ``--eval-data`` roots are scored whole (never trained on). The new
head rows start at zero weight and a bias below every old class, so at step 0 the old classes
keep their logits and the argmax is unchanged. Training runs on distill's one loop
(:func:`distill.loop.fit`: resumable, ``DIR/metrics.jsonl``). Writes ``DIR/model.safetensors``
(contract checkpoint; extra metadata keys of the init checkpoint such as ``stain`` are kept, its
``ood`` statistics and ``calibration``, fitted on the init model's outputs, are not) and
``DIR/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from wsi_contracts.checkpoint import file_sha256

from .data import AugConfig, load_imagefolder, read_exclude, scan_imagefolder
from .errors import DistillError
from .export import build_metadata, load_model_file, write_checkpoint
from .loop import LoopSettings, Progress, claim_run_folder, fit
from .metrics import accuracy, predict
from .preflight import split_record
from .runtime import resolve_runtime, torch_threads
from .train import split_of

__all__ = ["FinetuneConfig", "extend_head", "freeze", "run_finetune", "scores"]

log = logging.getLogger("distill")

SUSPICION_THRESHOLD = 0.5
RUNTIME = ("device", "threads", "bf16", "cache_dir")  # may change when a fine-tune resumes
#: metadata of the init checkpoint that describes its outputs (OOD statistics, score calibration):
#: stale once the weights change, so never carried over to the fine-tuned checkpoint
OUTPUT_FITS = ("ood", "calibration")


@dataclass(frozen=True)
class FinetuneConfig:
    init: str
    data: list[str]
    out: str
    exclude: str | None = None
    add_class: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    mix: list[float] | None = None  # share of each --data root per epoch; None = equal
    epochs: int = 4
    samples_per_epoch: int = 6000
    batch_size: int = 64
    lr: float = 2e-4
    head_lr_mult: float = 5.0
    min_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    freeze_blocks: int = 1  # -1: train all; 0: freeze patch embedding; n: also the first n blocks
    val_frac: float = 0.15
    split_seed: int = 0
    group_pattern: str | None = None
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"
    device: str = "auto"
    threads: int | None = 2
    cache_dir: str | None = "runs/cache"
    aug: AugConfig = field(default_factory=AugConfig)


def extend_head(model: torch.nn.Module, n_new: int) -> torch.nn.Module:
    """Append ``n_new`` output rows to ``model.head``: old rows copied, new rows zero weight and
    a bias 4 below the smallest old bias (old logits unchanged, new classes start unlikely)."""
    if n_new <= 0:
        return model
    old = model.head
    new = torch.nn.Linear(old.in_features, old.out_features + n_new)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        new.bias[old.out_features:] = old.bias.min() - 4.0
    model.head = new
    model.num_classes = new.out_features
    return model


def freeze(model: torch.nn.Module, n_blocks: int) -> None:
    if n_blocks < 0:
        return
    for mod in (model.patch_embed, *list(model.blocks)[:n_blocks]):
        mod.requires_grad_(False)
    for name in ("cls_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad_(False)


def scores(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], suspicious: list[str],
           model_classes: list[str] | None = None) -> dict[str, Any]:
    """Top-1, balanced accuracy, per-class recall and suspicion hit / false-alarm rates.

    ``labels`` index ``class_names``; ``logits`` columns are ``model_classes`` (default the same,
    a subset of ``class_names``). Images of a class the model does not have count as wrong in
    ``top1`` and are left out of ``top1_known``."""
    model_classes = model_classes or class_names
    full = torch.full((len(logits), len(class_names)), float("-inf"))
    full[:, [class_names.index(c) for c in model_classes]] = logits.float()
    acc = accuracy(full, labels, class_names)
    ok = full.argmax(-1) == labels
    known = torch.tensor([class_names[i] in model_classes for i in labels.tolist()], dtype=torch.bool)
    prob = logits.softmax(-1)
    sus_idx = [model_classes.index(c) for c in suspicious if c in model_classes]
    sus = prob[:, sus_idx].sum(-1) if sus_idx else torch.zeros(len(prob))
    is_sus = torch.tensor([class_names[i] in suspicious for i in labels.tolist()], dtype=torch.bool)
    out = {
        "n": len(labels),
        "top1": acc["top1"],
        "top1_known": round(ok[known].float().mean().item(), 5) if known.any() else None,
        "balanced_acc": acc["balanced_accuracy"],
        "recall": {c: round(v["recall"], 4) for c, v in acc["per_class"].items() if v["support"]},
    }
    if is_sus.any():
        out["suspicious_hit_rate"] = round((sus[is_sus] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
    if (~is_sus).any():
        out["false_suspicious_rate"] = round((sus[~is_sus] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
    if "background" in class_names:
        bg = labels == class_names.index("background")
        if bg.any():
            out["background_false_suspicious_rate"] = round((sus[bg] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
            out["background_mean_suspicion"] = round(sus[bg].mean().item(), 4)
    return out


def _check(cfg: FinetuneConfig, class_names: list[str]) -> None:
    """Every check that needs no decoded image: roots exist, their classes are known, mix fits."""
    if not cfg.data:
        raise DistillError("data names no ImageFolder root: give at least one")
    if cfg.mix is not None and len(cfg.mix) != len(cfg.data):
        raise DistillError(f"mix has {len(cfg.mix)} shares for {len(cfg.data)} data roots")
    excl = read_exclude(cfg.exclude)
    for root in list(cfg.data) + list(cfg.eval_data):
        _, _, classes = scan_imagefolder(root, excl if root in cfg.data else None)
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DistillError(f"{root}: classes {unknown} are not in the model's classes {class_names}; "
                               f"add them with --add-class")


def run_finetune(cfg: FinetuneConfig, resume: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.init`` on ``cfg.data``; returns the metrics (also in ``DIR/metrics.json``)."""
    with torch_threads(cfg.threads):
        return _finetune(cfg, resume, on_epoch, progress)


def _finetune(cfg: FinetuneConfig, resume: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
              progress: Progress | None) -> dict[str, Any]:
    init_model, meta = load_model_file(cfg.init)
    old_classes = list(meta["class_names"])
    dup = [c for c in cfg.add_class if c in old_classes]
    if dup:
        raise DistillError(f"add_class {dup}: already among the checkpoint's classes")
    class_names = old_classes + list(cfg.add_class)
    _check(cfg, class_names)
    rt = resolve_runtime(cfg.device, cfg.bf16)
    out = Path(cfg.out)
    cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    claim_run_folder(out, cfg_json, resume, lambda d: {k: v for k, v in d.items() if k not in RUNTIME})
    init_sha = file_sha256(cfg.init)
    suspicious = list(meta["suspicious_classes"])
    mean, std = tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"])
    size = meta["input_size"]

    # Data: every root split like distill (same split for the student's own training set).
    train_x, train_y, train_src, val_sets, data_prov = [], [], [], [], []
    for si, root in enumerate(cfg.data):
        ps = load_imagefolder(root, size, cfg.exclude, cfg.cache_dir, class_names)
        tr, va = split_of(ps, cfg)
        train_x.append(ps.images[tr])
        train_y.append(ps.labels[tr])
        train_src.append(torch.full((len(tr),), si))
        val_sets.append((root, ps.images[va], ps.labels[va]))
        present = sorted({class_names[i] for i in ps.labels.tolist()}, key=class_names.index)
        data_prov.append({"root": root, "fingerprint": ps.fingerprint, "n": len(ps.labels), "n_train": len(tr),
                          "n_val": len(va), "classes": present})
        log.info("data %s: %d train / %d val, classes %s", root, len(tr), len(va), present)
    eval_sets = []
    for root in cfg.eval_data:
        ps = load_imagefolder(root, size, None, None, class_names)
        eval_sets.append((root, ps.images, ps.labels))
        data_prov.append({"root": root, "fingerprint": ps.fingerprint, "n": len(ps.labels), "role": "eval"})
    X, Y, S = torch.cat(train_x), torch.cat(train_y), torch.cat(train_src)
    del train_x, train_y

    def evaluate(model, cls) -> dict[str, Any]:
        res = {}
        for tag, sets in (("val", val_sets), ("eval", eval_sets)):
            for root, imgs, labels in sets:
                logits = predict(model, imgs, rt.device, rt.bf16, mean, std, batch=128)
                res[f"{tag}:{root}"] = scores(logits, labels, class_names, suspicious, cls)
        return res

    log.info("scoring the init checkpoint ...")
    init_model.to(rt.device)
    before = evaluate(init_model, old_classes)
    for k, v in before.items():
        log.info("  init %s: top1 %s (known classes %s), false suspicious %s", k, v["top1"], v["top1_known"],
                 v.get("false_suspicious_rate"))

    model = extend_head(init_model, len(cfg.add_class)).to(rt.device)
    freeze(model, cfg.freeze_blocks)
    steps_per_epoch = max(1, cfg.samples_per_epoch // cfg.batch_size)
    shares = torch.tensor(cfg.mix if cfg.mix is not None else [1.0] * len(cfg.data), dtype=torch.float64)
    shares = shares / shares.sum()

    def epoch_order(epoch: int, g: torch.Generator) -> torch.Tensor:
        idx = []
        for si in range(len(cfg.data)):
            pool = torch.nonzero(S == si).flatten()
            n = int(round(shares[si].item() * steps_per_epoch * cfg.batch_size))
            reps = -(-n // len(pool))
            idx.append(torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:n])
        idx = torch.cat(idx)
        return idx[torch.randperm(len(idx), generator=g)]

    def batch_loss(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        return loss, {}, logits

    first_root, first_val = cfg.data[0], val_sets[0]

    def score(m) -> dict[str, Any]:
        if not len(first_val[2]):
            return {}
        acc = accuracy(predict(m, first_val[1], rt.device, rt.bf16, mean, std, batch=128), first_val[2], class_names)
        return {"val_top1": acc["top1"], "val_balanced_acc": acc["balanced_accuracy"]}

    settings = LoopSettings(cfg.epochs, steps_per_epoch, cfg.batch_size, cfg.lr, cfg.min_lr, cfg.warmup_steps,
                            cfg.grad_clip, cfg.seed, cfg.aug, mean, std)
    history = fit(model, batch_loss, X, Y, epoch_order, settings, rt, out, score, weight_decay=cfg.weight_decay,
                  head_lr_mult=cfg.head_lr_mult, decay_embeddings=False, resume=resume, on_epoch=on_epoch, progress=progress)

    after = evaluate(model, class_names)
    for k, v in after.items():
        log.info("  tuned %s: top1 %s, balanced %s, false suspicious %s, hit %s", k, v["top1"], v["balanced_acc"],
                 v.get("false_suspicious_rate"), v.get("suspicious_hit_rate"))
    metrics = {"before": before, "after": after, "history": history,
               "steps": sum(h["steps"] for h in history),
               "train_seconds": round(sum(h["seconds"] for h in history), 1),
               "params": sum(p.numel() for p in model.parameters()),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "precision": rt.reason}
    fv = after.get(f"val:{first_root}")
    if fv:
        metrics["val_top1"] = fv["top1"]
        metrics["val_balanced_acc"] = fv["balanced_acc"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    arch = dict(meta["architecture"], num_classes=len(class_names))
    prov = {"role": "finetune", "init_sha256": init_sha, "init_provenance": {
        k: meta["provenance"].get(k) for k in ("mode", "data_fingerprint", "teacher_sha256", "split", "metrics")},
        "data": data_prov, "data_fingerprint": data_prov[0]["fingerprint"],
        "split": split_record(cfg), "config": cfg_json,
        "metrics": {k: metrics[k] for k in ("val_top1", "val_balanced_acc", "steps", "train_seconds") if k in metrics}
        | {"eval": {k: {m: v.get(m) for m in ("top1", "balanced_acc", "false_suspicious_rate",
                                               "suspicious_hit_rate")} for k, v in after.items()}}}
    md = {k: v for k, v in meta.items() if k not in OUTPUT_FITS}  # extra fields such as stain are kept
    md.update(build_metadata(arch, class_names, suspicious, mean, std, size, meta["tile_size"], meta["tile_mpp"], prov))
    sha = write_checkpoint(out / "model.safetensors", model.state_dict(), md)
    metrics["sha256"] = sha
    log.info("wrote %s sha256 %s", out / "model.safetensors", sha[:12])
    return metrics


if __name__ == "__main__":
    from .cli import finetune_cmd

    finetune_cmd(prog_name="python -m distill.finetune")
