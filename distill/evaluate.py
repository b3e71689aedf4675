"""Model reports: accuracy, balanced accuracy, per-class precision/recall, confusion matrix
(JSON + PNG), parameters, FLOPs and throughput. All models of one call are scored on the same
images and timed on the same machine, one after the other, so their speeds compare."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


from .errors import DistillError
from .export import load_model_file, sha256_file
from .models import count_params
from .train import TrainConfig, load_patches, predict, stratified_split


def flops_per_image(model: torch.nn.Module, img_size: int) -> int:
    """FLOPs of one forward pass at batch 1 (``torch.utils.flop_counter``; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


@torch.no_grad()
def interleaved_throughput(models: dict[str, torch.nn.Module], img_size: int, device: torch.device, bf16: bool,
                           batch: int = 64, batches: int = 10, warmup: int = 2) -> dict[str, float]:
    """Images/s of each model's forward pass, timing one batch of every model in turn so that
    a change of machine load (shared CPUs) hits all of them alike; median over ``batches``."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + batches):
        for k, m in models.items():
            m.eval().to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                m(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: batch / sorted(v)[len(v) // 2] for k, v in times.items()}


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    k = len(class_names)
    pred = logits.argmax(-1)
    cm = torch.zeros(k, k, dtype=torch.int64)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per = {}
    recalls = []
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        support = int(cm[c].sum())
        predicted = int(cm[:, c].sum())
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        if support:
            recalls.append(rec)
        per[name] = {"precision": round(prec, 5), "recall": round(rec, 5), "support": support}
    return {
        "top1": round(float((pred == labels).float().mean()), 5),
        "balanced_accuracy": round(sum(recalls) / max(1, len(recalls)), 5),
        "per_class": per,
        "confusion_matrix": {"rows_true_cols_pred": cm.tolist(), "class_names": class_names},
    }


def save_confusion_png(cm: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 1.0 + 0.55 * k), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    vmax = max(max(r) for r in cm) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i][j] > vmax / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_models(checkpoints: list[str], cfg: TrainConfig, out_dir: str | Path, split: str = "val",
                    bench_batches: int = 10) -> list[dict[str, Any]]:
    """One report per checkpoint (``<out>/<name>.json`` + ``<name>_confusion.png``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = [(c, *load_model_file(c)) for c in checkpoints]
    sizes = {m["input_size"] for _, _, m in loaded}
    names = {json.dumps(m["class_names"]) for _, _, m in loaded}
    if len(names) != 1:
        raise DistillError("the checkpoints have different class names; evaluate them separately")
    class_names = loaded[0][2]["class_names"]
    data_cache: dict[int, Any] = {}
    reports = []
    for path, model, meta in loaded:
        size = meta["input_size"]
        if size not in data_cache:
            ps = load_patches(cfg, size, class_names)
            if ps.class_names != class_names:
                raise DistillError(f"data classes {ps.class_names} != checkpoint classes {class_names}")
            if split == "val":
                _, idx = stratified_split(ps.labels, cfg.val_frac, cfg.split_seed)
            else:
                idx = torch.arange(len(ps.labels))
            data_cache[size] = (ps, idx)
        ps, idx = data_cache[size]
        prov = meta["provenance"]
        if split == "val" and prov.get("data_fingerprint") not in (None, ps.fingerprint):
            raise DistillError(f"{path}: trained on other data (fingerprint differs); its 'val' split is not defined here")
        norm = meta["normalization"]
        model.to(device)
        logits = predict(model, ps.images[idx], device, cfg.bf16, norm["mean"], norm["std"])
        rep = classification_report(logits, ps.labels[idx], class_names)
        name = Path(path).parent.name if Path(path).name == "model.safetensors" else Path(path).stem
        report = {
            "checkpoint": str(path),
            "sha256": sha256_file(path),
            "role": prov.get("role"),
            "mode": prov.get("mode"),
            "split": split,
            "n_images": int(len(idx)),
            **rep,
            "params": count_params(model),
            "gflops": round(flops_per_image(model.float().cpu(), size) / 1e9, 4),
            "throughput": {"unit": "images/s", "batch": 64, "device": str(device), "interleaved_with": len(loaded),
                           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
            "architecture": meta["architecture"],
        }
        report["_name"] = name
        save_confusion_png(rep["confusion_matrix"]["rows_true_cols_pred"], class_names,
                           out_dir / f"{name}_confusion.png", f"{name}: top-1 {rep['top1']:.4f}")
        reports.append(report)
    for size in sizes:  # all models of one input size are timed together, interleaved
        group = {r["checkpoint"]: m for (c, m, meta), r in zip(loaded, reports) if meta["input_size"] == size}
        for prec in ("fp32", "bf16"):
            tp = interleaved_throughput(group, size, device, prec == "bf16", batches=bench_batches)
            for r in reports:
                if r["checkpoint"] in tp:
                    r["throughput"][prec] = round(tp[r["checkpoint"]], 1)
    for r in reports:
        name = r.pop("_name")
        (out_dir / f"{name}.json").write_text(json.dumps(r, indent=1))
    return reports
