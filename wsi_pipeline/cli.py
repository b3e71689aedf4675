"""The ``wsi-triage`` command line: thin click commands over library functions.

Every command turns a :class:`~wsi_pipeline.errors.WsiTriageError` into one line on stderr and
a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import WsiTriageError


def user_errors(func):
    """Turn user-caused errors into ``error: ...`` and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except WsiTriageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
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
    from .slide import open_slide, slide_info

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
        click.option("--stain", type=click.Choice(["pap", "romanowsky", "he"]), default="pap", show_default=True, help="Stain preset for foreground detection."),
        click.option("--codec", type=click.Choice(["jpeg", "lossless"]), default="jpeg", show_default=True, help="Tile codec in the store."),
        click.option("--mpp", type=float, default=None, help="Slide pixel size (um/px) when the file lacks it."),
        click.option("--workers", type=int, default=None, help="Reader threads [default: CPU count]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_progress(total_desc: str, quiet: bool, unit: str = "tile"):
    """A tqdm bar (rate and ETA) whose total is set once known; silent with --quiet."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=total_desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False)

    def on_plan(total: int, done: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, on_plan


@main.command("tile")
@click.argument("slide", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), required=True, help="Output directory for <slide-stem>.zarr.")
@tiler_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@user_errors
def tile_command(slide, out_dir, target_mpp, tile_size, overlap, min_foreground, stain, codec, mpp, workers, quiet, as_json):
    """Tile SLIDE into a zarr v3 tile store (foreground tiles only; resumable)."""
    from .tiler import TilerConfig, tile_slide

    config = TilerConfig(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap,
                         min_foreground=min_foreground, stain=stain, codec=codec)
    bar, on_plan = make_progress("tiling", quiet or as_json)
    with bar:
        result = tile_slide(slide, out_dir, config, mpp=mpp, workers=workers, progress=bar.update, on_plan=on_plan)
    summary = {
        "store": str(result.path), "tiles": result.n_tiles, "grid_tiles": result.n_grid,
        "reused": result.reused, "shards_written": result.shards_written,
        "seconds": round(result.seconds, 3), "tiles_per_second": round(result.tiles_per_second, 1),
        "empty_reason": result.empty_reason,
    }
    if result.empty_reason:
        click.echo(f"warning: {slide}: {result.empty_reason}; wrote an empty store", err=True)
    if as_json:
        echo_json(summary)
    elif not quiet:
        state = "reused existing store" if result.reused else f"{result.tiles_per_second:.0f} tiles/s"
        click.echo(f"{result.path}: {result.n_tiles} of {result.n_grid} grid tiles kept ({state})")
