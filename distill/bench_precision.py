"""Training speed in fp32 and in bf16 autocast on this machine, timed alternately (one step of
each in turn, so a change of load hits both alike), with what ``bf16: auto`` would choose.

    python -m distill.bench_precision [--preset tiny] [--img-size 64] [--depth 12] [--batch 32]
        [--steps 6] [--device auto]

Prints one JSON line: median seconds per step of each, the bf16 / fp32 speed ratio, the loss of
the same first batch in each precision, and the ``auto`` decision with its reason. Why: bf16 is
a win only with native support (a GPU, AVX512-BF16, AMX); on an AVX2-only CPU an epoch was 11x
slower, so the default decides at run time and this prints the evidence.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import click
import torch
import torch.nn.functional as F

from .models import architecture, build_vit
from .runtime import resolve_runtime

__all__ = ["time_precisions"]


def time_precisions(preset: str = "tiny", img_size: int = 64, depth: int = 12, batch: int = 32, steps: int = 6,
                    device: str = "auto", warmup: int = 2, seed: int = 0) -> dict:
    """Alternate fp32 and bf16 training steps (forward, backward, AdamW) of two copies of one
    randomly initialised ViT on one random batch; median step time of each."""
    rt = resolve_runtime(device, "auto")
    dev = rt.device
    torch.manual_seed(seed)
    base = build_vit(architecture(preset, "teacher", 8, img_size, 16, depth)).to(dev)
    models = {"fp32": base, "bf16": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    y = torch.randint(0, 8, (batch,), device=dev)
    times: dict[str, list[float]] = {k: [] for k in models}
    first_loss: dict[str, float] = {}
    for i in range(warmup + steps):
        for k, m in models.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=k == "bf16"):
                loss = F.cross_entropy(m(x).float(), y)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first_loss.setdefault(k, float(loss.detach()))
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"device": str(dev), "threads": torch.get_num_threads(), "model": f"{preset} depth {depth} {img_size} px",
            "batch": batch, "steps": steps, "fp32_s_per_step": round(med["fp32"], 4),
            "bf16_s_per_step": round(med["bf16"], 4), "bf16_speedup": round(med["fp32"] / med["bf16"], 2),
            "first_loss_fp32": round(first_loss["fp32"], 5), "first_loss_bf16": round(first_loss["bf16"], 5),
            "auto_uses_bf16": rt.bf16, "auto_reason": rt.reason}


@click.command()
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "paper"]))
@click.option("--img-size", default=64, show_default=True)
@click.option("--depth", default=12, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--steps", default=6, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: PyTorch's).")
def main(preset, img_size, depth, batch, steps, device, threads):
    """Time fp32 and bf16 training steps alternately and print the ratio."""
    if threads:
        torch.set_num_threads(threads)
    click.echo(json.dumps(time_precisions(preset, img_size, depth, batch, steps, device)))


if __name__ == "__main__":
    main()
