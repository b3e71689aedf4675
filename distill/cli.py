"""``wsi-distill``: init, train-teacher, distill, finetune, evaluate, export.

Configs are YAML files of :class:`distill.config.TrainConfig` fields (relative paths resolved
against the config file); command-line options override them, and ``--set key=value`` (dotted
for nested, e.g. ``mdkd.w_cls=2``) overrides anything. Every config problem is found before
training starts. User errors print one line ``error: <file>: <problem>`` and exit 2. Each
command is a thin layer over a library function.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import typing
from pathlib import Path

import click

from wsi_contracts.checkpoint import TTA_VIEWS
from wsi_contracts.errors import UserError

from .errors import DistillError

__all__ = ["main"]

log = logging.getLogger("distill")


class _EchoHandler(logging.Handler):
    """Log records to the current stderr (through click, so test runners capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _setup_logging(quiet: bool) -> None:
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        h = _EchoHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:  # DistillError, and the contract errors of wsi_contracts
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted (the run resumes from its last epoch when started again)", err=True)
            sys.exit(130)

    return wrapper


class _StageBar:
    """The progress protocol (``bar(stage, done, total)``, see ``distill.loop.Progress``) drawn as one tqdm
    bar per stage (per epoch); a bar closes when its stage is done or the next one starts. Nothing
    is drawn when stderr is not a terminal."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step", leave=False, file=sys.stderr, disable=None)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def _progress(quiet: bool) -> _StageBar | None:
    return None if quiet else _StageBar()


def _epoch_printer(quiet: bool):
    return None if quiet else (lambda rec: click.echo(json.dumps(rec)))


def _build_cfg(config, sets, **opts):
    from .config import load_config

    return load_config(config, opts, sets)


def _in_config(config: str | None, fn, *a, **kw):
    """Run ``fn``; a user error gets the config file's name in front when it lacks one."""
    try:
        return fn(*a, **kw)
    except DistillError as e:
        if config and not str(e).startswith(str(config)):
            raise DistillError(f"{config}: {e}") from None
        raise


_common = [
    click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config (TrainConfig fields)."),
    click.option("--data", help="ImageFolder root (root/<class>/*.png|jpg|tif)."),
    click.option("--exclude", help="File of class/file relpaths never to use (e.g. configs/pbc_heldout.txt)."),
    click.option("--tile-store", "tile_store", help="wsi_pipeline tile store (.zarr) instead of --data."),
    click.option("--labels-csv", "labels_csv", help="CSV tile_index,label for --tile-store."),
    click.option("--out", help="Run folder ('{role}' becomes teacher or student)."),
    click.option("--epochs", type=int),
    click.option("--seed", type=int),
    click.option("--preset", type=click.Choice(["paper", "small", "tiny"])),
    click.option("--device", help="auto, cpu, cuda, cuda:1 ..."),
    click.option("--set", "sets", multiple=True, help="Override any field: key=value (dotted for nested)."),
    click.option("--no-resume", is_flag=True, help="Start over even if the run folder holds a state."),
    click.option("--quiet", "-q", is_flag=True, help="Only errors and the final result."),
]


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group()
def main() -> None:
    """Train a ViT teacher and distil it into a small student (MDKD)."""


@main.command("init")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--suspicious", multiple=True, required=True,
              help="A suspicious class (a folder name); repeat or comma-separate for several.")
@click.option("--out", default="config.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Config file to write.")
@click.option("--mpp", type=float, help="Pixel size of the images in um/px (else left for you to fill in).")
@click.option("--stain", type=click.Choice(["pap", "romanowsky", "he"]), help="Stain preset for wsi-triage tiling.")
@click.option("--force", is_flag=True, help="Replace an existing config file.")
@_user_errors
def init_cmd(data_dir, suspicious, out, mpp, stain, force):
    """Write a starter config for DATA_DIR (one subfolder of images per class)."""
    from .starter import write_starter_config

    sus = [s.strip() for item in suspicious for s in item.split(",") if s.strip()]
    path = write_starter_config(data_dir, sus, out, mpp=mpp, stain=stain, overwrite=force)
    click.echo(json.dumps({"config": str(path)}))
    if mpp is None:
        click.echo(f"note: set tile_mpp in {path} (the pixel size of your images) before training", err=True)


def _train(role: str, config, sets, no_resume, quiet, opts) -> None:
    from .train import run_training

    _setup_logging(quiet)
    cfg = _build_cfg(config, sets, **opts)
    bar = _progress(quiet)
    try:
        res = _in_config(config, run_training, cfg, role, resume=not no_resume, on_epoch=_epoch_printer(quiet),
                         progress=bar)
    finally:
        if bar is not None:
            bar.close()
    click.echo(json.dumps({"final": res}))


@main.command("train-teacher")
@common
@click.option("--teacher-init", "teacher_init", help="Local timm ViT weights (.safetensors/.pth) to start from.")
@_user_errors
def train_teacher(config, sets, no_resume, quiet, **opts):
    """Train the 12-block teacher."""
    _train("teacher", config, sets, no_resume, quiet, opts)


@main.command("distill")
@common
@click.option("--mode", type=click.Choice(["none", "kd", "mdkd"]))
@click.option("--teacher", help="Teacher model.safetensors (from train-teacher).")
@click.option("--no-spatial", is_flag=True, help="MDKD without the spatial term.")
@click.option("--no-channel", is_flag=True, help="MDKD without the channel term.")
@click.option("--no-cls", is_flag=True, help="MDKD without the class-token term.")
@click.option("--hard-labels", is_flag=True, help="Response term uses CE with the teacher's argmax.")
@_user_errors
def distill_cmd(config, sets, no_resume, quiet, no_spatial, no_channel, no_cls, hard_labels, **opts):
    """Train the 3-block student (mode none | kd | mdkd)."""
    extra = list(sets)
    for flag, key in ((no_spatial, "use_spatial"), (no_channel, "use_channel"), (no_cls, "use_cls")):
        if flag:
            extra.append(f"mdkd.{key}=false")
    if hard_labels:
        extra.append("mdkd.hard_labels=true")
    _train("student", config, tuple(extra), no_resume, quiet, opts)


def _finetune_options(fn):
    """One option per FinetuneConfig field (lists repeat the option; ``mix`` is comma-separated)."""
    from .finetune import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    simple = {int: int, float: float, str: str}
    for f in reversed(dataclasses.fields(FinetuneConfig)):
        if f.name in ("aug",):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if f.name in ("data", "add_class", "eval_data"):
            help_ = {"data": "ImageFolder root to train on (repeat).", "add_class": "New class name (repeat).",
                     "eval_data": "ImageFolder scored whole, never trained on (repeat)."}[f.name]
            fn = click.option(flag, f.name, multiple=True, required=f.name == "data", help=help_)(fn)
        elif f.name == "mix":
            fn = click.option(flag, f.name, help="Share of each --data root per epoch, comma-separated.")(fn)
        elif f.name == "bf16":
            fn = click.option(flag, f.name, type=click.Choice(["auto", "true", "false"]), default="auto",
                              show_default=True, help="bf16 autocast (auto: only where native).")(fn)
        elif f.name in ("init", "out"):
            fn = click.option(flag, f.name, required=True,
                              help="Checkpoint to start from." if f.name == "init" else "Run folder.")(fn)
        else:
            typ = simple.get(args[0], str)
            default = f.default if f.default is not dataclasses.MISSING else None
            fn = click.option(flag, f.name, type=typ, default=default, show_default=True)(fn)
    return fn


@main.command("finetune")
@_finetune_options
@click.option("--export-fp16", help="Also write an fp16 copy of the result here.")
@click.option("--no-resume", is_flag=True, help="Start over even if the run folder holds a state.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the final result.")
@_user_errors
def finetune_cmd(export_fp16, no_resume, quiet, **kw):
    """Fine-tune a checkpoint on more data, optionally adding classes (e.g. background)."""
    from .config import dataclass_from_dict
    from .export import export
    from .finetune import FinetuneConfig, run_finetune

    _setup_logging(quiet)
    kw["data"], kw["add_class"], kw["eval_data"] = list(kw["data"]), list(kw["add_class"]), list(kw["eval_data"])
    if kw["mix"] is not None:
        try:
            kw["mix"] = [float(v) for v in kw["mix"].split(",")]
        except ValueError:
            raise DistillError(f"--mix {kw['mix']!r}: expected comma-separated numbers") from None
    kw["bf16"] = {"auto": "auto", "true": True, "false": False}[kw["bf16"]]
    cfg = dataclass_from_dict(FinetuneConfig, kw, "finetune option")
    bar = _progress(quiet)
    try:
        metrics = run_finetune(cfg, resume=not no_resume, on_epoch=_epoch_printer(quiet), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if export_fp16:
        sha = export(Path(cfg.out) / "model.safetensors", export_fp16, fp16=True)
        log.info("exported %s (fp16) sha256 %s", export_fp16, sha[:12])
    click.echo(json.dumps({k: metrics[k] for k in ("val_top1", "val_balanced_acc", "train_seconds") if k in metrics}))


@main.command("evaluate")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML config naming the data and split.")
@click.option("--data", help="ImageFolder root (any subset of the checkpoints' classes).")
@click.option("--exclude", help="Exclude list file.")
@click.option("--tile-store", "tile_store")
@click.option("--labels-csv", "labels_csv")
@click.option("--split", type=click.Choice(["val", "all"]), default="val", show_default=True,
              help="Score the validation split (split_seed/val_frac of the config) or every image.")
@click.option("--out", "out_dir", required=True, help="Folder for one report per model.")
@click.option("--set", "sets", multiple=True)
@click.option("--bench-batches", type=int, default=10, show_default=True, help="Batches timed for throughput.")
@click.option("--quiet", "-q", is_flag=True)
@_user_errors
def evaluate_cmd(checkpoints, config, sets, split, out_dir, bench_batches, quiet, **opts):
    """Score checkpoints on the same data (fp32 and bf16) and time them on this machine in one run."""
    from .evaluate import evaluate_models

    _setup_logging(quiet)
    cfg = _build_cfg(config, sets, **opts)
    reports = _in_config(config, evaluate_models, list(checkpoints), cfg, out_dir, split=split,
                         bench_batches=bench_batches)
    for r in reports:
        click.echo(json.dumps({k: r[k] for k in ("checkpoint", "n_images", "top1", "balanced_accuracy",
                                                 "precision_check", "params", "gflops", "throughput")}))


@main.command("export")
@click.argument("source")
@click.option("--out", required=True, help="Output .safetensors file.")
@click.option("--fp16/--fp32", default=True, show_default=True, help="Weight precision.")
@click.option("--suspicious", help="Comma-separated suspicious classes (default: keep the run's).")
@click.option("--tile-mpp", "tile_mpp", type=float, help="Pixel size (um/px) slides are tiled at (default: keep).")
@click.option("--tile-size", "tile_size", type=int, help="Tile side in px at --tile-mpp (default: keep).")
@click.option("--metrics", "metrics_json", type=click.Path(dir_okay=False), help="JSON file of metrics to record.")
@click.option("--stain", type=click.Choice(["pap", "romanowsky", "he"]),
              help="Stain preset `wsi-triage run` tiles with (default: keep the source's, else pap).")
@click.option("--placement", type=click.Choice(["grid", "cells"]),
              help="Tile placement `wsi-triage run` uses (default: keep the source's, else grid).")
@click.option("--tta", type=click.Choice(list(TTA_VIEWS)),
              help="Test-time augmentation: score each tile as the mean over these views (default: keep the source's, "
                   "else none).")
@click.option("--tta-floor", "tta_floor", type=click.FloatRange(0, 1),
              help="With --tta: tiles whose own view's suspicion is below this keep that view's scores [default: 0].")
@_user_errors
def export_cmd(source, out, fp16, suspicious, tile_mpp, tile_size, metrics_json, stain, placement, tta, tta_floor):
    """Write a deployable checkpoint from a run folder or model file; export settings can be
    corrected here without retraining."""
    from .export import export

    metrics = None
    if metrics_json:
        try:
            metrics = json.loads(Path(metrics_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DistillError(f"{metrics_json}: cannot read metrics JSON ({e})") from None
    sus = [s.strip() for s in suspicious.split(",") if s.strip()] if suspicious is not None else None
    if tta_floor is not None and tta is None:  # a floor alone would be silently ignored
        raise DistillError("--tta-floor needs --tta (the views the floor applies to)")
    try:
        sha = export(source, out, fp16=fp16, suspicious=sus, metrics=metrics, stain=stain, tile_size=tile_size,
                     tile_mpp=tile_mpp, placement=placement,
                     tta=None if tta is None else {"views": tta, "floor": tta_floor or 0.0})
    except DistillError as e:
        raise DistillError(f"{source}: {e}" if not str(e).startswith(str(source)) else str(e)) from None
    click.echo(json.dumps({"out": out, "sha256": sha, "bytes": Path(out).stat().st_size}))


@main.command("ood-stats")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(),
              help="ImageFolder of training data (repeatable); --exclude applies to the first.")
@click.option("--exclude", type=click.Path(dir_okay=False), help="List of images never to use (held-out set).")
@click.option("--out", type=click.Path(dir_okay=False), help="Output file (default: replace the checkpoint).")
@click.option("--quantile", type=click.FloatRange(0.5, 1, max_open=True), default=0.9, show_default=True,
              help="Validation-distance quantile taken as the out-of-domain threshold.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache decoded images here (.npy).")
@click.option("--max-train", type=click.IntRange(min=1), help="Training images used per data folder (random).")
@click.option("--quiet", "-q", is_flag=True)
@_user_errors
def ood_stats_cmd(checkpoint, data, exclude, out, quantile, cache_dir, max_train, quiet):
    """Add out-of-domain statistics (class means and tied covariance of the training features, and a
    threshold) to a checkpoint; the model's own tensors are copied bit for bit."""
    from .ood_stats import add_ood_stats

    _setup_logging(quiet)
    entry = add_ood_stats(Path(checkpoint), [Path(d) for d in data], Path(out) if out else None,
                          exclude=Path(exclude) if exclude else None, quantile=quantile,
                          max_train_per_source=max_train, cache_dir=Path(cache_dir) if cache_dir else None,
                          log=log.info)
    click.echo(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
