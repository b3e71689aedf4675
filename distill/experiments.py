"""The results grid of docs/results.md: students of every mode and ablation x seeds against one
teacher, then a markdown table (mean and std over seeds).

    python -m distill.experiments grid --config configs/distill_pbc_student.yaml --runs runs/pbc --seeds 0,1,2
    python -m distill.experiments table --runs runs/pbc

Each run resumes (or is skipped when finished), so the grid can be killed and restarted, and
several workers (e.g. one per core) can share one runs folder: each run is claimed by one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import click

from .errors import DistillError

__all__ = ["cli", "collect", "grid", "table"]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "none": ("none", []),
    "kd": ("kd", []),
    "mdkd": ("mdkd", []),
    "mdkd-no-spatial": ("mdkd", ["mdkd.use_spatial=false"]),
    "mdkd-no-channel": ("mdkd", ["mdkd.use_channel=false"]),
    "mdkd-no-cls": ("mdkd", ["mdkd.use_cls=false"]),
}


@click.group()
def cli() -> None:
    """Results grid for docs/results.md."""


@cli.command()
@click.option("--config", required=True, help="Student YAML config (names the teacher).")
@click.option("--runs", "runs_dir", required=True, help="Folder for runs/<variant>-s<seed>.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--set", "sets", multiple=True, help="Extra overrides for every run.")
def grid(config, runs_dir, seeds, variants, sets):
    """Train every variant for every seed (seed-major order, so partial grids cover all variants)."""
    from .cli import _build_cfg, _setup_logging
    from .train import run_training

    _setup_logging(quiet=False)
    try:
        for seed in [int(s) for s in seeds.split(",")]:
            for v in variants.split(","):
                if v not in VARIANTS:
                    raise DistillError(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
                mode, extra = VARIANTS[v]
                out = Path(runs_dir) / f"{v}-s{seed}"
                if (out / "result.json").exists() or not _claim(out):
                    continue
                cfg = _build_cfg(config, tuple(sets) + tuple(extra), mode=mode, seed=seed, out=str(out))
                res = run_training(cfg, "student")
                click.echo(json.dumps({"variant": v, "seed": seed, **res}))
    except DistillError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _claim(out: Path) -> bool:
    """Claim a run for this process (several grid workers may share one runs folder).
    A claim by a process that no longer exists is taken over (the run then resumes)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "worker.pid"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            lock.write_text(str(os.getpid()))
            return True
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def collect(runs_dir: str | Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in sorted(Path(runs_dir).glob("*/result.json")):
        name = p.parent.name
        variant = name.rsplit("-s", 1)[0] if "-s" in name else name
        r = json.loads(p.read_text())
        r["run"] = name
        out.setdefault(variant, []).append(r)
    return out


def _ms(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"


def table(runs_dir: str | Path, reports_dir: str | Path | None = None) -> str:
    """Markdown table: top-1 and balanced accuracy (mean ± sample std over seeds, %), n seeds,
    parameters, and GFLOPs / throughput from evaluate reports when given."""
    groups = collect(runs_dir)
    reps = {}
    if reports_dir and Path(reports_dir).is_dir():
        for p in Path(reports_dir).glob("*.json"):
            r = json.loads(p.read_text())
            reps[p.stem] = r
    order = ["teacher", *VARIANTS]
    lines = ["| model | top-1 % | balanced acc % | seeds | params (M) | GFLOPs | img/s fp32 | img/s bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for v in order + sorted(set(groups) - set(order)):
        if v not in groups:
            continue
        rs = groups[v]
        rep = reps.get(v) or reps.get(f"{v}-s0") or next((reps[k] for k in reps if k.startswith(v + "-s")), None)
        gf = f"{rep['gflops']:.3f}" if rep else "-"
        t32 = f"{rep['throughput']['fp32']:.0f}" if rep else "-"
        tbf = f"{rep['throughput']['bf16']:.0f}" if rep else "-"
        lines.append(f"| {v} | {_ms([r['val_top1'] for r in rs])} | {_ms([r['val_balanced_acc'] for r in rs])} | "
                     f"{len(rs)} | {rs[0]['params'] / 1e6:.2f} | {gf} | {t32} | {tbf} |")
    return "\n".join(lines)


@cli.command("table")
@click.option("--runs", "runs_dir", required=True)
@click.option("--reports", "reports_dir", default=None, help="Folder of evaluate reports (FLOPs, throughput).")
def table_cmd(runs_dir, reports_dir):
    """Print the results table."""
    click.echo(table(runs_dir, reports_dir))


if __name__ == "__main__":
    cli()
