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

from wsi_contracts.checkpoint import file_sha256

from .config import TrainConfig
from .errors import DistillError
from .export import load_model_file, read_metadata
from .metrics import accuracy, predict, top1
from .models import count_params
from .preflight import check_data
from .runtime import resolve_runtime, torch_threads
from .train import load_patches, split_of

__all__ = ["classification_report", "evaluate_models", "flops_per_image", "interleaved_throughput",
           "precision_agreement"]


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
    """Top-1, balanced accuracy, per-class precision / recall and the confusion matrix
    (:func:`distill.metrics.accuracy`)."""
    return accuracy(logits, labels, class_names)


def precision_agreement(fp32: torch.Tensor, bf16: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """How far bf16 inference is from fp32 on the same images: top-1 of each, the share of
    equal predictions and the largest softmax difference."""
    p32, p16 = fp32.softmax(-1), bf16.softmax(-1)
    return {
        "top1_fp32": top1(fp32, labels),
        "top1_bf16": top1(bf16, labels),
        "same_prediction": top1(bf16, fp32.argmax(-1)),
        "max_prob_diff": round(float((p32 - p16).abs().max()), 5) if len(labels) else 0.0,
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
    """One report per checkpoint (``<out>/<name>.json`` + ``<name>_confusion.png``).

    The data may hold any subset of a checkpoint's classes (matched by folder name, e.g. a model
    with an extra ``background`` class scored on cell folders only); class names are checked
    before any image is decoded. Each model is scored in fp32 and bf16 (``precision_check``);
    ``top1`` is that of the precision ``cfg.bf16`` resolves to on this machine.
    """
    with torch_threads(cfg.threads):
        return _evaluate_models(checkpoints, cfg, out_dir, split, bench_batches)


def _evaluate_models(checkpoints: list[str], cfg: TrainConfig, out_dir: str | Path, split: str,
                     bench_batches: int) -> list[dict[str, Any]]:
    rt = resolve_runtime(cfg.device, cfg.bf16)
    out_dir = Path(out_dir)
    metas = [(c, read_metadata(c)) for c in checkpoints]
    plan = check_data(cfg)
    for c, m in metas:
        unknown = [n for n in plan.class_names if n not in m["class_names"]]
        if unknown:
            raise DistillError(f"{c}: the data's classes {unknown} are not among the checkpoint's classes "
                               f"{m['class_names']}")
        fp = m["provenance"].get("data_fingerprint")
        if split == "val" and plan.fingerprint is not None and fp not in (None, plan.fingerprint):
            raise DistillError(f"{c}: trained on other data (fingerprint differs), so its validation split is not "
                               f"defined here; score every image with --split all")
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = [(c, load_model_file(c)[0], m) for c, m in metas]
    data_cache: dict[tuple, Any] = {}
    reports = []
    for path, model, meta in loaded:
        size, class_names = meta["input_size"], list(meta["class_names"])
        key = (size, tuple(class_names))
        if key not in data_cache:
            ps = load_patches(cfg, size, class_names)
            idx = split_of(ps, cfg)[1] if split == "val" else torch.arange(len(ps.labels))
            data_cache[key] = (ps, idx)
        ps, idx = data_cache[key]
        norm = meta["normalization"]
        model.to(rt.device)
        images, labels = ps.images[idx], ps.labels[idx]
        l32 = predict(model, images, rt.device, False, norm["mean"], norm["std"])
        l16 = predict(model, images, rt.device, True, norm["mean"], norm["std"])
        rep = classification_report(l16 if rt.bf16 else l32, labels, class_names)
        prov = meta["provenance"]
        name = Path(path).parent.name if Path(path).name == "model.safetensors" else Path(path).stem
        report = {
            "checkpoint": str(path),
            "sha256": file_sha256(path),
            "role": prov.get("role"),
            "mode": prov.get("mode"),
            "split": split,
            "n_images": int(len(idx)),
            "data_classes": plan.class_names,
            **rep,
            "precision": rt.reason,
            "precision_check": precision_agreement(l32, l16, labels),
            "params": count_params(model),
            "gflops": round(flops_per_image(model.float().cpu(), size) / 1e9, 4),
            "throughput": {"unit": "images/s", "batch": 64, "device": str(rt.device), "interleaved_with": len(loaded),
                           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
            "architecture": meta["architecture"],
        }
        report["_name"] = name
        save_confusion_png(rep["confusion_matrix"]["rows_true_cols_pred"], class_names,
                           out_dir / f"{name}_confusion.png", f"{name}: top-1 {rep['top1']:.4f}")
        reports.append(report)
    for size in {m["input_size"] for _, _, m in loaded}:  # models of one input size are timed together
        group = {r["checkpoint"]: m.to(rt.device) for (c, m, meta), r in zip(loaded, reports)
                 if meta["input_size"] == size}
        for prec in ("fp32", "bf16"):
            tp = interleaved_throughput(group, size, rt.device, prec == "bf16", batches=bench_batches)
            for r in reports:
                if r["checkpoint"] in tp:
                    r["throughput"][prec] = round(tp[r["checkpoint"]], 1)
    for r in reports:
        name = r.pop("_name")
        (out_dir / f"{name}.json").write_text(json.dumps(r, indent=1))
    return reports
