"""Fine-tune a student checkpoint on more data, optionally adding classes (e.g. ``background``).

Why: a student trained on single-cell images (one centred cell each) meets, on a slide grid,
tiles it never saw (red cells only, cut-off cells, blur, debris) and gives them confident
answers. Fine-tuning on a mix of the original images and labelled grid tiles with an extra
``background`` class teaches it to say "nothing here".

    python -m distill.finetune --init CKPT --data ROOT [--data ROOT2] --exclude configs/pbc_heldout.txt \\
        --add-class background --epochs N --out DIR [--eval-data ROOT3] [--export-fp16 FILE]

Every ``--data`` root (ImageFolder) is split into train / validation with distill's stratified
split (``split_seed``, ``val_frac``), so for the student's own training set the validation images
are exactly those it was validated on. ``--eval-data`` roots are scored whole (never trained on).
The new head rows are initialised to zero weight and a bias below every old class, so at step 0
the old classes keep their logits and the argmax is unchanged. Writes ``DIR/model.safetensors``
(contract checkpoint; extra metadata keys of the init checkpoint such as ``stain`` are kept),
``DIR/metrics.json`` and ``DIR/log.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import AugConfig, augment, load_imagefolder, read_exclude, stratified_split
from .errors import DistillError
from .export import REQUIRED, build_metadata, load_model_file, sha256_file, write_checkpoint
from .train import lr_at, predict

SUSPICION_THRESHOLD = 0.5


@dataclass
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
    seed: int = 0
    bf16: bool = True
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


def _load_root(root: str, size: int, exclude: str | None, cache_dir: str | None, class_names: list[str]):
    ps = load_imagefolder(root, size, exclude, cache_dir)
    unknown = [c for c in ps.class_names if c not in class_names]
    if unknown:
        raise DistillError(f"{root}: classes {unknown} are not in the model's classes {class_names}; "
                           f"add them with --add-class")
    remap = torch.tensor([class_names.index(c) for c in ps.class_names])
    return ps, remap[ps.labels]


def scores(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], suspicious: list[str],
           model_classes: list[str] | None = None) -> dict[str, Any]:
    """Top-1, balanced accuracy, per-class recall and suspicion hit / false-alarm rates.

    ``labels`` index ``class_names``; ``logits`` columns are ``model_classes`` (default the same).
    Images of a class the model does not have count as wrong in ``top1`` and are left out of
    ``top1_known``."""
    model_classes = model_classes or class_names
    prob = logits.softmax(-1)
    pred_names = [model_classes[i] for i in prob.argmax(-1).tolist()]
    true_names = [class_names[i] for i in labels.tolist()]
    sus_idx = [model_classes.index(c) for c in suspicious if c in model_classes]
    sus = prob[:, sus_idx].sum(-1) if sus_idx else torch.zeros(len(prob))
    ok = torch.tensor([p == t for p, t in zip(pred_names, true_names)], dtype=torch.bool)
    known = torch.tensor([t in model_classes for t in true_names], dtype=torch.bool)
    is_sus = torch.tensor([t in suspicious for t in true_names], dtype=torch.bool)
    recall = {}
    for c in class_names:
        m = torch.tensor([t == c for t in true_names], dtype=torch.bool)
        if m.any():
            recall[c] = round(ok[m].float().mean().item(), 4)
    out = {
        "n": len(labels),
        "top1": round(ok.float().mean().item(), 5),
        "top1_known": round(ok[known].float().mean().item(), 5) if known.any() else None,
        "balanced_acc": round(sum(recall.values()) / max(len(recall), 1), 5),
        "recall": recall,
    }
    if is_sus.any():
        out["suspicious_hit_rate"] = round((sus[is_sus] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
    if (~is_sus).any():
        out["false_suspicious_rate"] = round((sus[~is_sus] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
    if "background" in true_names:
        bg = torch.tensor([t == "background" for t in true_names], dtype=torch.bool)
        out["background_false_suspicious_rate"] = round((sus[bg] >= SUSPICION_THRESHOLD).float().mean().item(), 4)
        out["background_mean_suspicion"] = round(sus[bg].mean().item(), 4)
    return out


def _param_groups(model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith("head.")
        decay = p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name
        groups.setdefault((head, decay), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr_mult": cfg.head_lr_mult if head else 1.0} for (head, decay), ps in groups.items()]


def run_finetune(cfg: FinetuneConfig, log=print) -> dict[str, Any]:
    """Fine-tune ``cfg.init`` on ``cfg.data``; returns the metrics (also in ``DIR/metrics.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data:
        raise DistillError("no training data: give at least one --data ImageFolder root")
    if cfg.mix is not None and len(cfg.mix) != len(cfg.data):
        raise DistillError(f"--mix has {len(cfg.mix)} shares for {len(cfg.data)} --data roots")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    read_exclude(cfg.exclude)  # fail early on a missing list

    init_model, meta = load_model_file(cfg.init)
    init_sha = sha256_file(cfg.init)
    old_classes = list(meta["class_names"])
    dup = [c for c in cfg.add_class if c in old_classes]
    if dup:
        raise DistillError(f"--add-class {dup}: already among the checkpoint's classes")
    class_names = old_classes + list(cfg.add_class)
    suspicious = list(meta["suspicious_classes"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    size = meta["input_size"]

    # Data: every root split like distill (same split for the student's own training set).
    train_x, train_y, train_src, val_sets, data_prov = [], [], [], [], []
    for si, root in enumerate(cfg.data):
        ps, labels = _load_root(root, size, cfg.exclude, cfg.cache_dir, class_names)
        tr, va = stratified_split(ps.labels, cfg.val_frac, cfg.split_seed)
        train_x.append(ps.images[tr])
        train_y.append(labels[tr])
        train_src.append(torch.full((len(tr),), si))
        val_sets.append((root, ps.images[va], labels[va]))
        data_prov.append({"root": root, "fingerprint": ps.fingerprint, "n": len(labels), "n_train": len(tr),
                          "n_val": len(va), "classes": ps.class_names})
        log(f"data {root}: {len(tr)} train / {len(va)} val, classes {ps.class_names}")
    eval_sets = []
    for root in cfg.eval_data:
        ps, labels = _load_root(root, size, None, None, class_names)
        eval_sets.append((root, ps.images, labels))
        data_prov.append({"root": root, "fingerprint": ps.fingerprint, "n": len(labels), "role": "eval"})
    X = torch.cat(train_x)
    Y = torch.cat(train_y)
    S = torch.cat(train_src)
    del train_x, train_y

    def evaluate(model, cls) -> dict[str, Any]:
        res = {}
        for tag, sets in (("val", val_sets), ("eval", eval_sets)):
            for root, imgs, labels in sets:
                logits = predict(model, imgs, torch.device("cpu"), cfg.bf16, mean, std, batch=128)
                res[f"{tag}:{root}"] = scores(logits, labels, class_names, suspicious, cls)
        return res

    log("scoring the init checkpoint ...")
    before = evaluate(init_model, old_classes)
    for k, v in before.items():
        log(f"  init {k}: top1 {v['top1']} (known classes {v['top1_known']}), "
            f"false suspicious {v.get('false_suspicious_rate')}")

    model = extend_head(init_model, len(cfg.add_class))
    freeze(model, cfg.freeze_blocks)
    model.train()
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, cfg.samples_per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    shares = torch.tensor(cfg.mix if cfg.mix is not None else [1.0] * len(cfg.data), dtype=torch.float64)
    shares = shares / shares.sum()
    step = 0
    history = []
    (out / "log.jsonl").write_text("")
    for epoch in range(cfg.epochs):
        idx = []
        for si in range(len(cfg.data)):
            pool = torch.nonzero(S == si).flatten()
            n = int(round(shares[si].item() * steps_per_epoch * cfg.batch_size))
            reps = -(-n // len(pool))
            perm = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:n]
            idx.append(perm)
        idx = torch.cat(idx)
        idx = idx[torch.randperm(len(idx), generator=g)]
        te, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for b in range(steps_per_epoch):
            bi = idx[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if not len(bi):
                break
            lr = lr_at(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            for gr in opt.param_groups:
                gr["lr"] = lr * gr["lr_mult"]
            x = augment(X[bi], cfg.aug, g, mean, std)
            y = Y[bi]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(bi)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(bi)
        rec = {"epoch": epoch + 1, "lr": round(lr, 8), "train_loss": round(loss_sum / max(seen, 1), 4),
               "train_acc": round(correct / max(seen, 1), 4), "seconds": round(time.perf_counter() - te, 1),
               "img_per_s": round(seen / max(time.perf_counter() - te, 1e-9), 1)}
        history.append(rec)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))
        model.train()

    after = evaluate(model, class_names)
    for k, v in after.items():
        log(f"  tuned {k}: top1 {v['top1']}, balanced {v['balanced_acc']}, "
            f"false suspicious {v.get('false_suspicious_rate')}, hit {v.get('suspicious_hit_rate')}")
    metrics = {"before": before, "after": after, "history": history, "steps": step,
               "train_seconds": round(sum(h["seconds"] for h in history), 1),
               "seconds": round(time.perf_counter() - t0, 1),
               "params": sum(p.numel() for p in model.parameters()),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    first_val = after.get(f"val:{cfg.data[0]}")
    if first_val:
        metrics["val_top1"] = first_val["top1"]
        metrics["val_balanced_acc"] = first_val["balanced_acc"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    arch = dict(meta["architecture"], num_classes=len(class_names))
    cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    prov = {"role": "finetune", "init_sha256": init_sha, "init_provenance": {
        k: meta["provenance"].get(k) for k in ("mode", "data_fingerprint", "teacher_sha256", "split", "metrics")},
        "data": data_prov, "data_fingerprint": data_prov[0]["fingerprint"],
        "split": {"seed": cfg.split_seed, "val_frac": cfg.val_frac}, "config": cfg_json,
        "metrics": {k: metrics[k] for k in ("val_top1", "val_balanced_acc", "steps", "train_seconds") if k in metrics}
        | {"eval": {k: {m: v.get(m) for m in ("top1", "balanced_acc", "false_suspicious_rate",
                                               "suspicious_hit_rate")} for k, v in after.items()}}}
    md = build_metadata(arch, class_names, suspicious, mean, std, size, meta["tile_size"], meta["tile_mpp"], prov)
    md.update(extra_metadata(cfg.init))
    sha = write_checkpoint(out / "model.safetensors", model.state_dict(), md)
    metrics["sha256"] = sha
    log(f"wrote {out / 'model.safetensors'} sha256 {sha[:12]}")
    return metrics


def extra_metadata(path: str | Path) -> dict[str, str]:
    """Metadata keys beyond the contract's required ones (e.g. ``stain``), as stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: v for k, v in raw.items() if k not in REQUIRED}


def export_fp16(src: str | Path, out: str | Path) -> str:
    """Re-write ``src`` with fp16 weights, keeping every metadata key (``distill.export.export``
    rebuilds the metadata from the contract fields only). Returns the new file's sha256."""
    from safetensors import safe_open

    model, meta = load_model_file(src)
    with safe_open(str(src), framework="pt") as f:
        raw = dict(f.metadata() or {})
    prov = dict(meta["provenance"], exported_from_sha256=sha256_file(src), weights_dtype="float16",
                export_tool="distill.finetune.export_fp16")
    raw["provenance"] = json.dumps(prov)
    return write_checkpoint(out, model.state_dict(), raw, fp16=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="contract checkpoint to start from")
    p.add_argument("--data", action="append", required=True, help="ImageFolder root (repeatable)")
    p.add_argument("--exclude", help="file of class/file relpaths never to train on")
    p.add_argument("--add-class", action="append", default=[], help="new class name (repeatable)")
    p.add_argument("--eval-data", action="append", default=[], help="ImageFolder scored whole, never trained on")
    p.add_argument("--mix", type=float, nargs="+", help="share of each --data root per epoch")
    p.add_argument("--out", required=True)
    p.add_argument("--export-fp16", help="also write an fp16 copy of the result here")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("init", "data", "out", "exclude", "add_class", "eval_data", "mix", "aug"):
            continue
        typ = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split("|")[0].strip()]
        if typ is bool:
            p.add_argument("--" + f.name.replace("_", "-"), type=lambda s: s.lower() in ("1", "true", "yes"),
                           default=f.default)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default)
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(FinetuneConfig) if f.name != "aug"}
    cfg = FinetuneConfig(**kw)
    try:
        metrics = run_finetune(cfg)
        if a.export_fp16:
            sha = export_fp16(Path(cfg.out) / "model.safetensors", a.export_fp16)
            print(f"exported {a.export_fp16} (fp16) sha256 {sha[:12]}")
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("val_top1", "val_balanced_acc", "train_seconds") if k in metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
