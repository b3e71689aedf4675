"""Teacher vs student inference throughput (tiles/s) on this machine, measured in one run.

For each preset (default: ``paper`` = ViT-B/16 at 224 px, 12 vs 3 blocks, and ``tiny`` at the
CPU-demo size) the teacher and student are timed batch by batch in turn (interleaved) in fp32 and bf16 autocast on the
CPU, and on CUDA when present. Weights are random: speed does not depend on them.

    python benchmarks/bench_models.py                      # paper + tiny, CPU (+ GPU)
    python benchmarks/bench_models.py --presets paper --batch 32 --batches 5
    python benchmarks/bench_models.py --json out.json      # or --json - : the results alone on stdout

Prints one JSON line per measurement and a summary table with the student/teacher ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from wsi_pipeline.errors import OptionError
from wsi_pipeline.script import at_least, run_script

SIZES = {"paper": (224, 16), "small": (224, 16), "tiny": (64, 16)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="paper,tiny", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=9, help="timed batches (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write all results to this file ('-' = stdout)")
    args = ap.parse_args(argv)
    return run_script(lambda: measure(args), args.json)


def measure(args: argparse.Namespace) -> dict:
    """Every preset x device x precision, teacher and student interleaved; printed as it goes."""
    unknown = [p for p in args.presets.split(",") if p not in SIZES]
    if unknown:
        raise OptionError("--presets", f"has unknown {', '.join(map(repr, unknown))}; use {', '.join(SIZES)}")
    for flag in ("batch", "batches", "threads"):
        at_least(f"--{flag}", getattr(args, flag))
    import torch  # here, not at the top: --help and a bad option answer without loading torch

    from distill.evaluate import flops_per_image, interleaved_throughput
    from distill.models import architecture, build_vit, count_params

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append(torch.device("cuda"))
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if len(devices) > 1 else None}
    print(json.dumps({"env": env}), flush=True)
    rows = []
    for preset in args.presets.split(","):
        img, patch = SIZES[preset]
        models = {}
        for role in ("teacher", "student"):
            arch = architecture(preset, role, 8, img, patch)
            m = build_vit(arch).eval()
            models[role] = (m, count_params(m), flops_per_image(m, img))
        for dev in devices:
            for prec in ("fp32", "bf16"):
                for m, _, _ in models.values():
                    m.to(dev)
                res = interleaved_throughput({r: v[0] for r, v in models.items()}, img, dev, prec == "bf16",
                                              args.batch, args.batches)
                for role, (m, n_params, flops) in models.items():
                    row = {"preset": preset, "img": img, "role": role, "device": dev.type, "precision": prec,
                           "params_M": round(n_params / 1e6, 2), "gflops": round(flops / 1e9, 3),
                           "tiles_per_s": round(res[role], 1), "batch": args.batch}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                ratio = res["student"] / res["teacher"]
                rows.append({"preset": preset, "device": dev.type, "precision": prec, "ratio": round(ratio, 2)})
                print(json.dumps(rows[-1]), flush=True)
            for m, _, _ in models.values():
                m.to("cpu")
    print(f"\n{'preset':7} {'dev':5} {'prec':5} {'teacher t/s':>12} {'student t/s':>12} {'ratio':>6}")
    for r in rows:
        if "ratio" in r:
            t = next(x for x in rows if x.get("role") == "teacher" and x["preset"] == r["preset"]
                     and x["device"] == r["device"] and x["precision"] == r["precision"])
            s = next(x for x in rows if x.get("role") == "student" and x["preset"] == r["preset"]
                     and x["device"] == r["device"] and x["precision"] == r["precision"])
            print(f"{r['preset']:7} {r['device']:5} {r['precision']:5} {t['tiles_per_s']:12.1f} "
                  f"{s['tiles_per_s']:12.1f} {r['ratio']:6.2f}")
    return {"env": env, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
