"""The ``wsi-triage`` command line: thin click commands over library functions.

Every command turns a :class:`~wsi_contracts.errors.UserError` into one line on stderr and
a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import OptionError, UserError, environment_error
from .names import printable

__all__ = ["main", "user_errors", "error_line", "option_flag", "PARAM_OPTIONS", "Bars", "echo_json"]

#: library parameters whose command-line option has another name (``OptionError.param`` -> click's name)
PARAM_OPTIONS = {"workers": "score_workers", "geojson_gzip": "gzip_geojson", "width": "size", "height": "size"}


def option_flag(param: str) -> str | None:
    """The current command's flag (``--top-k``) for a library parameter (``top_k``), or None."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    option = options.get(param) or options.get(PARAM_OPTIONS.get(param, ""))
    if option is None:
        return None
    return max(option.opts, key=len)  # the long form


def error_line(exc: UserError) -> str:
    """The one ``error:`` line for a user error; a parameter is named by the flag that set it."""
    flag = option_flag(exc.param) if isinstance(exc, OptionError) and exc.param else None
    text = exc.flag_message(flag) if flag else str(exc)
    return f"error: {printable(text)}"  # one line, whatever a file name holds


def user_errors(func):
    """Turn user-caused errors into ``error: ...`` and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(error_line(exc), err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # a full disk or read-only device is the environment, not a bug
            error = environment_error(exc)
            if error is None:
                raise
            click.echo(f"error: {printable(str(error))}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _say(message: str) -> None:
    """A note on stderr (e.g. waiting for another writer's lock)."""
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-triage")
def main() -> None:
    """Triage cytology whole-slide images: tile, score, rank, and export for QuPath."""


# Commands are defined below, one block per command, each calling a library function.


@main.command("info")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--mpp", type=float, default=None, help="Override the slide's pixel size (um/px).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def info_command(slide: str, mpp: float | None, as_json: bool) -> None:
    """Describe SLIDE: format, backend, vendor, levels, dimensions, pixel size and its source."""
    from .slides import open_slide, slide_info

    with open_slide(slide, mpp=mpp) as s:
        info = slide_info(s)
    if as_json:
        echo_json(info)
        return
    mpp_info = info["mpp"]
    mpp_text = "unknown (pass --mpp)" if mpp_info["x"] is None else (
        f"{mpp_info['x']:.4f} x {mpp_info['y']:.4f} um/px (source: {mpp_info['source']}"
        + (", estimated" if mpp_info.get("estimated") else "") + ")")
    click.echo(f"{info['path']}")
    click.echo(f"  format      {info['format']} (backend {info['backend']}, vendor {info['vendor'] or '-'})")
    click.echo(f"  dimensions  {info['dimensions'][0]} x {info['dimensions'][1]} px")
    click.echo(f"  pixel size  {mpp_text}")
    for level in info["levels"]:
        lmpp = f"{level['mpp']:.4f} um/px" if level.get("mpp") else "-"
        click.echo(f"  level {level['level']}     {level['dimensions'][0]} x {level['dimensions'][1]}"
                   f"  downsample {level['downsample']:.3f}  {lmpp}")
    if info.get("associated_images"):
        click.echo(f"  associated  {', '.join(info['associated_images'])}")


def tiler_options(func):
    """Options shared by every command that tiles a slide."""
    options = [
        click.option("--target-mpp", type=float, default=0.5, show_default=True, help="Tile pixel size (um/px)."),
        click.option("--tile-size", type=int, default=224, show_default=True, help="Tile side in px at the target mpp."),
        click.option("--overlap", type=int, default=0, show_default=True, help="Overlap between tiles in px."),
        click.option("--min-foreground", type=float, default=None, help="Minimum foreground fraction to keep a tile [default: stain preset]."),
        click.option("--stain", type=click.Choice(["auto", "pap", "romanowsky", "he"]), default="auto", show_default=True, help="Stain preset for foreground detection (auto: decided from the slide's overview)."),
        click.option("--no-pen-filter", "pen_filter", is_flag=True, flag_value=False, default=True, help="Keep regions the marker-ink rule would remove."),
        click.option("--codec", type=click.Choice(["jpeg", "lossless"]), default="jpeg", show_default=True, help="Tile codec in the store."),
        click.option("--tiling", type=click.Choice(["grid", "cells"]), default="grid", show_default=True, help="Tile placement: a grid over the foreground, or one tile centred on each nucleated object."),
        click.option("--mpp", type=float, default=None, help="Slide pixel size (um/px) when the file lacks it."),
        click.option("--workers", type=int, default=None, help="Reader threads [default: CPU count]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class Bars:
    """The progress protocol (:mod:`wsi_pipeline.progress`) drawn as tqdm bars with rate and ETA: one bar
    per stage, replaced when the stage changes or starts over (the next slide of a batch).

    A bar appears only with the first report, so that an input error found before any work prints
    its one line alone; ``quiet`` draws nothing. ``desc`` replaces the stage's name in the bar.
    """

    UNITS = {"synth": "row", "aggregating": "file"}

    def __init__(self, quiet: bool, desc: str | None = None) -> None:
        self.quiet, self.desc = quiet, desc
        self._bar = None
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        bar = self._bar
        if bar is None or stage != self._stage or done < bar.n or total != bar.total:
            self.close()
            from tqdm import tqdm

            self._stage = stage
            bar = self._bar = tqdm(total=total, desc=self.desc or stage, unit=self.UNITS.get(stage, "tile"),
                                   dynamic_ncols=True, leave=False)
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._stage = None

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@main.command("tile")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), required=True, help="Output directory for <slide-stem>.zarr.")
@tiler_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def tile_command(slide, out_dir, target_mpp, tile_size, overlap, min_foreground, stain, pen_filter, codec, tiling, mpp,
                 workers, quiet, as_json):
    """Tile SLIDE into a zarr v3 tile store (foreground tiles only; resumable)."""
    from .tiling import TilerConfig, tile_slide

    config = TilerConfig(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap,
                         min_foreground=min_foreground, stain=stain, codec=codec, tiling=tiling, pen_filter=pen_filter)
    from .lock import store_lock
    from wsi_contracts.tilestore import store_path

    with Bars(quiet or as_json) as bars, store_lock(store_path(out_dir, slide), on_wait=_say):
        result = tile_slide(slide, out_dir, config, mpp=mpp, workers=workers, progress=bars)
    summary = {
        "store": str(result.path), "tiles": result.n_tiles, "grid_tiles": result.n_grid,
        "reused": result.reused, "shards_written": result.shards_written,
        "seconds": round(result.seconds, 3), "tiles_per_second": round(result.tiles_per_second, 1),
        "empty_reason": result.empty_reason,
        "foreground": result.meta.foreground,
    }
    for line in (result.meta.foreground or {}).get("warnings", []):
        click.echo(f"warning: {printable(str(slide))}: {line}", err=True)
    if result.empty_reason:
        click.echo(f"warning: {slide}: {result.empty_reason}; wrote an empty store", err=True)
    if as_json:
        echo_json(summary)
    elif not quiet:
        state = "reused existing store" if result.reused else f"{result.tiles_per_second:.0f} tiles/s"
        click.echo(f"{result.path}: {result.n_tiles} of {result.n_grid} grid tiles kept ({state})")


# --- run / batch / score / aggregate -------------------------------------------------------


def score_options(func):
    """Options of every command that scores tiles."""
    options = [
        click.option("--checkpoint", type=click.Path(path_type=str), default=None, help="Student checkpoint (.safetensors) [default: bundled demo student]."),
        click.option("--scheduler", default="threads", show_default=True, help="threads, processes, or a dask.distributed scheduler address (tcp://host:8786)."),
        click.option("--score-workers", type=int, default=None, help="Local scoring workers [default: CPU count]."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Tiles per inference batch."),
        click.option("--device", default=None, help="torch device [default: cuda when available, else cpu]."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True, help="bf16 autocast is kept only when its probabilities match fp32."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def aggregate_options(func):
    """Options of every command that turns scores into a slide score and pictures."""
    options = [
        click.option("--method", type=click.Choice(["topk_mean", "quantile", "fraction_above"]), default="topk_mean", show_default=True, help="Slide score from tile suspicions."),
        click.option("--top-k", type=int, default=3, show_default=True, help="Tiles averaged by topk_mean."),
        click.option("--quantile", type=float, default=0.95, show_default=True, help="Quantile for method=quantile."),
        click.option("--threshold", type=float, default=0.5, show_default=True, help="Suspicion threshold for method=fraction_above (and the reported count)."),
        click.option("--gallery", "gallery_k", type=int, default=16, show_default=True, help="Top tiles in gallery.png."),
        click.option("--gzip-geojson", is_flag=True, help="Write <stem>.geojson.gz instead of .geojson."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _score_config(scheduler, score_workers, batch_size, device, precision):
    from .scoring import ScoreConfig

    return ScoreConfig(scheduler=scheduler, workers=score_workers, batch_size=batch_size, device=device,
                       precision=precision)


def _aggregate_config(method, top_k, quantile, threshold, gallery_k, gzip_geojson):
    from .aggregation import AggregateConfig

    return AggregateConfig(method=method, top_k=top_k, quantile=quantile, threshold=threshold,
                           gallery_k=gallery_k, geojson_gzip=gzip_geojson).validated()  # before any store is locked


def _run_line(run) -> str:
    return printable(_run_text(run))


def _run_text(run) -> str:
    steps = run.steps
    done = [name for name in ("tile", "score", "aggregate") if steps.get(name, {}).get("reused")]
    reuse = f"; reused {', '.join(done)}" if done else ""
    if run.status in ("error", "skipped"):
        return f"{run.stem}: {run.status}: {run.error}"
    if run.status == "empty":
        return f"{run.stem}: no tissue tile (score n/a){reuse}"
    method = (run.summary or {}).get("score", {}).get("method", "")
    if run.status == "out_of_domain":
        fraction = ((run.summary or {}).get("ood") or {}).get("fraction")
        share = f"{100 * fraction:.0f} % of" if isinstance(fraction, (int, float)) else "most"
        return (f"{run.stem}: out of domain ({share} tiles unlike the model's training data; its score "
                f"{run.score:.3f} is no suspicion) over {run.n_tiles} tiles in {run.seconds:.1f} s{reuse}")
    meaning = ("calibrated: >= 0.5 suspicious, review first" if run.calibrated
               else "raw: ranks slides, no decision point")
    return (f"{run.stem}: suspicion {run.score:.3f} ({method}; {meaning}) over {run.n_tiles} tiles "
            f"in {run.seconds:.1f} s{reuse}")


def _run_options(checkpoint, scheduler, score_workers, batch_size, device, precision, method, top_k, quantile,
                 threshold, gallery_k, gzip_geojson, **tiling):
    from .pipeline import RunOptions

    return RunOptions(checkpoint=checkpoint,
                      score=_score_config(scheduler, score_workers, batch_size, device, precision),
                      aggregate=_aggregate_config(method, top_k, quantile, threshold, gallery_k, gzip_geojson),
                      **tiling)


def run_tiling_options(func):
    """Tiling options of run/batch; tile size and mpp come from the checkpoint."""
    options = [
        click.option("--stain", type=click.Choice(["auto", "pap", "romanowsky", "he"]), default=None, help="Stain preset for foreground detection [default: auto, decided from the slide's overview; a mismatch with the checkpoint's stain is warned]."),
        click.option("--no-pen-filter", "pen_filter", is_flag=True, flag_value=False, default=True, help="Keep regions the marker-ink rule would remove."),
        click.option("--min-foreground", type=float, default=None, help="Minimum foreground fraction to keep a tile [default: stain preset]."),
        click.option("--overlap", type=int, default=0, show_default=True, help="Overlap between tiles in px."),
        click.option("--codec", type=click.Choice(["jpeg", "lossless"]), default="jpeg", show_default=True, help="Tile codec in the store."),
        click.option("--tiling", type=click.Choice(["grid", "cells"]), default=None, help="Tile placement: grid, or one tile centred on each nucleated object [default: the checkpoint's placement, else grid]."),
        click.option("--mpp", type=float, default=None, help="Slide pixel size (um/px) when the file lacks it."),
        click.option("--workers", "tile_workers", type=int, default=None, help="Reader threads for tiling [default: CPU count]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command("run")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), default="wsi-triage-out", show_default=True, help="Output directory: <stem>.zarr and <stem>/.")
@score_options
@run_tiling_options
@aggregate_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def run_command(slide, out_dir, quiet, as_json, **kwargs):
    """Tile, score and aggregate SLIDE, reusing whatever is already done.

    Tiles at the checkpoint's pixel size and tile size; writes OUT/<stem>.zarr and OUT/<stem>/
    (summary.json, overlay.png, heatmap.png/.npy, gallery.png, <stem>.geojson).
    """
    from .pipeline import run_slide

    with Bars(quiet or as_json) as bars:
        run = run_slide(slide, out_dir, _run_options(**kwargs), progress=bars)
    for line in run.warnings:
        click.echo(f"warning: {printable(run.stem)}: {line}", err=True)
    if as_json:
        echo_json({**run.as_dict(), "summary": run.summary})
    elif not quiet:
        click.echo(_run_line(run))
        click.echo(f"  outputs in {run.out_dir}")


@main.command("batch")
@click.argument("slides", metavar="DIR_OR_GLOB")
@click.option("--out", "out_dir", type=click.Path(path_type=str), default="wsi-triage-out", show_default=True, help="Output directory: stores, per-slide outputs, triage.csv, report.html.")
@click.option("--only-failed", is_flag=True, help="Rerun only slides that failed (or are new) since the last batch with this checkpoint.")
@click.option("--slide-timeout", type=float, default=None, help="Seconds of slide reading allowed per slide; a slide over it is recorded as failed [default: 900].")
@click.option("--slide-memory", default=None, help="Memory each slide's reading may use (e.g. 8G, 512M; 0: no limit, read in the batch's own process); a slide over it is recorded as failed [default: 8G or half the machine's memory, whichever is less].")
@click.option("--skip-unreadable", is_flag=True, help="A file that cannot be opened as a slide is a row with status 'skipped' and the reason, not a failure.")
@score_options
@run_tiling_options
@aggregate_options
@click.option("--quiet", is_flag=True, help="No progress bars or per-slide lines.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def batch_command(slides, out_dir, only_failed, skip_unreadable, quiet, as_json, **kwargs):
    """Run every slide of a directory or glob; write triage.csv and report.html ranked by suspicion.

    A slide that fails is recorded with its error and never stops the batch; the exit code is 1
    when any slide failed (a skipped unreadable file is no failure), 0 otherwise.
    """
    from .pipeline import run_batch

    bars = Bars(quiet or as_json)

    def on_slide(i, n, run):
        bars.close()  # the slide's line replaces its bars
        if not (quiet or as_json):
            click.echo(f"[{i}/{n}] {_run_line(run)}", err=run.status == "error")

    with bars:
        result = run_batch(slides, out_dir, _run_options(**kwargs), only_failed=only_failed,
                           skip_unreadable=skip_unreadable, progress=bars,
                           on_slide=on_slide)
    if as_json:
        echo_json({"out": str(result.out), "checkpoint_sha256": result.checkpoint_sha256,
                   "previous_checkpoint_sha256": result.previous_checkpoint_sha256,
                   "triage_csv": str(result.triage_csv), "report_html": str(result.report_html),
                   "seconds": round(result.seconds, 3), "failed": result.n_failed, "slides": result.rows})
    elif not quiet:
        click.echo(f"{len(result.rows)} slides ({result.n_failed} failed) in {result.seconds:.1f} s; "
                   f"{result.triage_csv}, {result.report_html}")
    if result.n_failed:
        sys.exit(1)


@main.command("score")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=str))
@score_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def score_command(stores, checkpoint, scheduler, score_workers, batch_size, device, precision, quiet, as_json):
    """Score every tile of existing tile STORES (<stem>.zarr) with a checkpoint; never reads the slide."""
    from .scoring import score_store

    config = _score_config(scheduler, score_workers, batch_size, device, precision)
    results = []
    for store in stores:
        with Bars(quiet or as_json, desc=f"scoring {store}") as bars:
            r = score_store(store, checkpoint, config, progress=bars)
        results.append({"store": str(r.store), "scores": r.key, "checkpoint_sha256": r.checkpoint_sha256,
                        "tiles": r.n_tiles, "reused": r.reused, "shards_scored": r.shards_scored,
                        "seconds": round(r.seconds, 3), "precision": r.precision, "device": r.device,
                        "bf16_max_abs_diff": r.bf16_max_abs_diff})
        if not (quiet or as_json):
            state = "already scored" if r.reused else f"{r.tiles_per_second:.0f} tiles/s, {r.precision} on {r.device}"
            click.echo(f"{r.store}/{r.key}: {r.n_tiles} tiles ({state})")
    if as_json:
        echo_json(results if len(results) > 1 else results[0])


@main.command("aggregate")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--checkpoint", type=click.Path(path_type=str), default=None, help="Use this checkpoint's scores [default: the store's latest scores].")
@click.option("--out", "out_dir", type=click.Path(path_type=str), default=None, help="Output directory [default: next to each store, <stem>/]; with several stores, <out>/<stem>/.")
@aggregate_options
@click.option("--force", is_flag=True, help="Rewrite outputs even when up to date.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def aggregate_command(stores, checkpoint, out_dir, method, top_k, quantile, threshold, gallery_k, gzip_geojson, force, as_json):
    """Slide score, heatmap, overlay, gallery, GeoJSON and summary.json from scored STORES."""
    from pathlib import Path

    from .aggregation import aggregate_store
    from .scoring import read_checkpoint_info
    from .lock import store_lock

    config = _aggregate_config(method, top_k, quantile, threshold, gallery_k, gzip_geojson)
    sha = read_checkpoint_info(checkpoint).sha256 if checkpoint else None
    results = []
    for store in stores:
        path = Path(store)
        stem = path.name[:-5] if path.name.endswith(".zarr") else path.name
        target = path.with_name(stem) if out_dir is None else (Path(out_dir) / stem if len(stores) > 1 else Path(out_dir))
        with store_lock(path, on_wait=_say):
            r = aggregate_store(path, target, config, checkpoint_sha256=sha, force=force)
        results.append({"store": str(path), "out_dir": str(r.out_dir), "reused": r.reused, "score": r.score,
                        "method": config.method, "settings": config.score_settings(),
                        "n_tiles": r.summary["tiles"]["n_tiles"],
                        "checkpoint_sha256": r.summary["provenance"]["checkpoint_sha256"]})
        if not as_json:
            value = "n/a (no tiles)" if r.score is None else f"{r.score:.3f}"
            click.echo(f"{stem}: {config.method} = {value}; outputs in {r.out_dir}" + (" (up to date)" if r.reused else ""))
    if as_json:
        echo_json(results if len(results) > 1 else results[0])


@main.command("verify")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--repair", is_flag=True, help="Re-tile damaged shards (or the whole store) from the slide, when its fingerprint still matches.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def verify_command(stores, repair, as_json):
    """Check tile STORES: every node present, every shard matching its recorded digest, scores finite.

    Exit code 0 when every store is sound (after repair, with --repair), 1 otherwise.
    """
    from .verify import verify_store

    reports = [verify_store(store, repair=repair) for store in stores]
    if as_json:
        echo_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            fixed = " (whole store re-tiled)" if r.retiled else (
                f" (re-tiled shard{'s' if len(r.repaired) > 1 else ''} {', '.join(map(str, r.repaired))})"
                if r.repaired else "")
            click.echo(f"{r.store}: {'ok' if r.ok else f'{len(r.problems)} problem(s)'}{fixed}")
            for problem in r.problems:
                click.echo(f"  {problem}")
            for note in r.notes:
                click.echo(f"  note: {note}")
    if not all(r.ok for r in reports):
        sys.exit(1)


@main.command("synth")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--size", default="8192x8192", show_default=True, help="Level-0 size WIDTHxHEIGHT in px.")
@click.option("--mpp", type=float, default=0.25, show_default=True, help="Pixel size of the slide (um/px).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same slide (byte for byte).")
@click.option("--cells", type=click.Path(file_okay=False, path_type=str), default=None,
              help="ImageFolder of cell images <dir>/<class>/*.jpg [default: the shipped held-out cells].")
@click.option("--cell-list", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Use only these images (relpaths under --cells, one a line), e.g. configs/pbc_heldout.txt.")
@click.option("--cells-mpp", type=float, default=0.27, show_default=True, help="Pixel size of the cell images (um/px).")
@click.option("--suspicious", multiple=True, help="Class to plant (repeatable) [default: erythroblast, ig].")
@click.option("--fraction", type=float, default=0.25, show_default=True,
              help="Share of the cells in each planted region that are suspicious; 0 = negative slide.")
@click.option("--regions", type=int, default=None, help="Planted regions [default: one per 2 mm^2, 1..24].")
@click.option("--quality", type=int, default=85, show_default=True, help="JPEG quality of the tiles.")
@click.option("--ome", is_flag=True, help="Write OME-TIFF (sub-resolutions as SubIFDs) instead of generic TIFF.")
@click.option("--stain", type=click.Choice(["romanowsky", "pap"]), default="romanowsky", show_default=True,
              help="romanowsky: the cells as imaged (MGG); pap: recoloured with the Pap dyes (hematoxylin, "
                   "Light Green SF, Orange G, eosin Y), in cohesive groups.")
@click.option("--pen-ink", type=click.Choice(["random", "blue", "green", "black", "red"]), default="random",
              show_default=True, help="Colour of the pen mark; random draws blue, green or black from the seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def synth_command(out, size, mpp, seed, cells, cell_list, cells_mpp, suspicious, fraction, regions, quality, ome,
                  stain, pen_ink, quiet):
    """Write a synthetic smear OUT (.tiff) from real cell images, with its ground truth beside it.

    Ground truth: <stem>.truth.json (label, planted regions, every cell's class and box) and
    <stem>.truth.geojson (QuPath). Prints a JSON summary with the generation speed.
    """
    from pathlib import Path

    from .synth import DEFAULT_SUSPICIOUS, SynthConfig, parse_size, read_cell_list, synthesize

    width, height = parse_size(size)
    config = SynthConfig(
        width=width, height=height, mpp=mpp, seed=seed, cells=Path(cells) if cells else None,
        cell_list=read_cell_list(cell_list) if cell_list else None, cell_list_name=cell_list,
        cells_mpp=cells_mpp, suspicious=tuple(suspicious) or DEFAULT_SUSPICIOUS, fraction=fraction,
        regions=regions, quality=quality, ome=ome, stain=stain, pen_ink=pen_ink)
    with Bars(quiet) as bars:
        result = synthesize(out, config, progress=bars)
    echo_json(result.as_dict())


@main.command("view")
@click.argument("target", metavar="OUT_DIR_OR_SLIDE", type=click.Path(path_type=str))
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--quiet", is_flag=True, help="Do not log requests.")
@user_errors
def view_command(target, port, host, quiet):
    """Open a zoomable viewer of a run/batch output folder or a slide in the browser (local web server).

    Shows the slide with the suspicion overlay, tile outlines and the most suspicious places; for a
    batch, the ranked slide list. Stop with Ctrl-C.
    """
    from .review import serve

    def ready(url: str) -> None:
        click.echo(f"wsi-triage viewer: open {url} in a browser (Ctrl-C stops)")

    def log(line: str) -> None:
        click.echo(line, err=True)

    try:
        serve(target, host=host, port=port, on_ready=ready, log=None if quiet else log)
    except KeyboardInterrupt:
        click.echo("viewer stopped", err=True)
