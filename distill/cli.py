"""``wsi-distill``: train-teacher, distill, evaluate, export.

Configs are YAML files of :class:`distill.train.TrainConfig` fields; command-line options
override them, and ``--set key=value`` (dotted for nested, e.g. ``mdkd.w_cls=2``) overrides
anything. User errors print one line and exit non-zero.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from .errors import DistillError


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DistillError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted (the run resumes from its last epoch when started again)", err=True)
            sys.exit(130)

    return wrapper


def _load_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise DistillError(f"{p}: config must be a mapping of fields")
    return d


def _apply_sets(d: dict[str, Any], sets: tuple[str, ...]) -> None:
    import yaml

    for s in sets:
        if "=" not in s:
            raise DistillError(f"--set {s!r}: expected key=value")
        key, val = s.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DistillError(f"--set {s!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(val)


def _build_cfg(config, sets, **opts):
    from .train import config_from_dict

    d = _load_yaml(config)
    for k, v in opts.items():
        if v is not None:
            d[k] = v
    _apply_sets(d, sets)
    return config_from_dict(d)


_common = [
    click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config (TrainConfig fields)."),
    click.option("--data", help="ImageFolder root (root/<class>/*.png|jpg|tif)."),
    click.option("--exclude", help="File of class/file relpaths never to use (e.g. configs/pbc_heldout.txt)."),
    click.option("--tile-store", "tile_store", help="wsi_pipeline tile store (.zarr) instead of --data."),
    click.option("--labels-csv", "labels_csv", help="CSV tile_index,label for --tile-store."),
    click.option("--out", help="Run folder."),
    click.option("--epochs", type=int),
    click.option("--seed", type=int),
    click.option("--preset", type=click.Choice(["paper", "small", "tiny"])),
    click.option("--device", help="auto, cpu, cuda, cuda:1 ..."),
    click.option("--set", "sets", multiple=True, help="Override any field: key=value (dotted for nested)."),
    click.option("--no-resume", is_flag=True, help="Start over even if the run folder holds a state."),
]


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group()
def main() -> None:
    """Train a ViT teacher and distil it into a small student (MDKD)."""


@main.command("train-teacher")
@common
@click.option("--teacher-init", "teacher_init", help="Local timm ViT weights (.safetensors/.pth) to start from.")
@_user_errors
def train_teacher(config, sets, no_resume, **opts):
    """Train the 12-block teacher."""
    from .train import run_training

    cfg = _build_cfg(config, sets, **opts)
    res = run_training(cfg, "teacher", resume=not no_resume)
    click.echo(json.dumps({"final": res}))


@main.command("distill")
@common
@click.option("--mode", type=click.Choice(["none", "kd", "mdkd"]))
@click.option("--teacher", help="Teacher model.safetensors (from train-teacher).")
@click.option("--no-spatial", is_flag=True, help="MDKD without the spatial term.")
@click.option("--no-channel", is_flag=True, help="MDKD without the channel term.")
@click.option("--no-cls", is_flag=True, help="MDKD without the class-token term.")
@click.option("--hard-labels", is_flag=True, help="Response term uses CE with the teacher's argmax.")
@_user_errors
def distill_cmd(config, sets, no_resume, no_spatial, no_channel, no_cls, hard_labels, **opts):
    """Train the 3-block student (mode none | kd | mdkd)."""
    from .train import run_training

    extra = list(sets)
    if no_spatial:
        extra.append("mdkd.use_spatial=false")
    if no_channel:
        extra.append("mdkd.use_channel=false")
    if no_cls:
        extra.append("mdkd.use_cls=false")
    if hard_labels:
        extra.append("mdkd.hard_labels=true")
    cfg = _build_cfg(config, tuple(extra), **opts)
    res = run_training(cfg, "student", resume=not no_resume)
    click.echo(json.dumps({"final": res}))


@main.command("evaluate")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config naming the data and split.")
@click.option("--data", help="ImageFolder root.")
@click.option("--exclude", help="Exclude list file.")
@click.option("--tile-store", "tile_store")
@click.option("--labels-csv", "labels_csv")
@click.option("--split", type=click.Choice(["val", "all"]), default="val", show_default=True,
              help="Score the validation split (split_seed/val_frac of the config) or every image.")
@click.option("--out", "out_dir", required=True, help="Folder for one report per model.")
@click.option("--set", "sets", multiple=True)
@click.option("--bench-batches", type=int, default=10, show_default=True, help="Batches timed for throughput.")
@_user_errors
def evaluate_cmd(checkpoints, config, sets, split, out_dir, bench_batches, **opts):
    """Score checkpoints on the same data and time them on this machine in one run."""
    from .evaluate import evaluate_models

    cfg = _build_cfg(config, sets, **opts)
    reports = evaluate_models(list(checkpoints), cfg, out_dir, split=split, bench_batches=bench_batches)
    for r in reports:
        click.echo(json.dumps({k: r[k] for k in ("checkpoint", "top1", "balanced_accuracy", "params", "gflops",
                                                 "throughput")}))


@main.command("export")
@click.argument("source")
@click.option("--out", required=True, help="Output .safetensors file.")
@click.option("--fp16/--fp32", default=True, show_default=True, help="Weight precision.")
@click.option("--suspicious", help="Comma-separated suspicious classes (default: keep the run's).")
@click.option("--metrics", "metrics_json", type=click.Path(dir_okay=False), help="JSON file of metrics to record.")
@click.option("--stain", type=click.Choice(["pap", "romanowsky", "he"]),
              help="Stain preset `wsi-triage run` tiles with (default: keep the source's, else pap).")
@_user_errors
def export_cmd(source, out, fp16, suspicious, metrics_json, stain):
    """Write a deployable student checkpoint from a run folder or model file."""
    from .export import export

    metrics = None
    if metrics_json:
        try:
            metrics = json.loads(Path(metrics_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DistillError(f"{metrics_json}: cannot read metrics JSON ({e})") from None
    sus = [s.strip() for s in suspicious.split(",") if s.strip()] if suspicious is not None else None
    sha = export(source, out, fp16=fp16, suspicious=sus, metrics=metrics, stain=stain)
    size = Path(out).stat().st_size
    click.echo(json.dumps({"out": out, "sha256": sha, "bytes": size}))


if __name__ == "__main__":
    main()
