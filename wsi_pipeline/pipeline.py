"""Orchestration: one slide (tile -> score -> aggregate) and a batch of slides with a ranked report.

Output layout under ``out``: ``<stem>.zarr`` (the tile store, which also holds every
checkpoint's scores) and ``<stem>/`` (summary.json, overlay.png, heatmap.png/.npy, gallery.png,
``<stem>.geojson[.gz]``). Every step reuses what is already done, so rerunning is a no-op and a
new checkpoint with the same tile geometry re-scores the stored tiles without re-tiling.
A batch keeps its state in ``batch.json`` and writes ``triage.csv`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import datetime as _dt
import gc
import glob
import io
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from wsi_contracts import tilestore as tile_store
from .aggregation import AggregateConfig, AggregateResult, aggregate_store, read_summary, write_atomic
from wsi_contracts.checkpoint import CheckpointInfo
from .scoring import check_weights, read_checkpoint_info
from .errors import OptionError, OutputError, SlideError, UserError, environment_error
from .budget import (ChildCrash, SlideBudget, UnreadableSlideError, default_memory, parse_memory,
                     tile_checked, tile_within_budget)
from .lock import store_lock
from .progress import Progress
from .names import csv_cell, printable
from .scoring import ScoreConfig, ScoreResult, score_store
from .tiling import TileResult, TilerConfig

__all__ = ['BATCH_STATE', 'TRIAGE_CSV', 'REPORT_HTML', 'BATCH_SLIDE_TIMEOUT', 'STATUS_ORDER', 'SLIDE_SUFFIXES', 'DEFAULT_STAIN', 'RunOptions', 'SlideRun', 'tiler_config_for', 'foreground_warnings', 'slide_status', 'score_and_aggregate', 'validate_options', 'run_slide', 'map_large_allocations', 'MMAP_THRESHOLD', 'release_memory', 'find_slides', 'BatchResult', 'load_batch_state', 'rank_rows', 'CSV_FIELDS', 'triage_csv_bytes', 'run_batch']

BATCH_STATE = "batch.json"
TRIAGE_CSV = "triage.csv"
REPORT_HTML = "report.html"
#: a batch gives each slide this long to be read (a hostile header must not hang the whole batch)
BATCH_SLIDE_TIMEOUT = 900.0
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                  ".dcm", ".ome.tif", ".ome.tiff", ".jpg", ".jpeg", ".png")
DEFAULT_STAIN = "auto"  # decided per slide from its overview (wsi_pipeline.foreground.stain)



@dataclass(frozen=True)
class RunOptions:
    """Everything ``run`` needs besides the slide; the tile geometry comes from the checkpoint."""

    checkpoint: str | Path | None = None  # None: the bundled demo student
    stain: str | None = None  # None: DEFAULT_STAIN (auto); a mismatch with the checkpoint's ``stain`` is warned
    pen_filter: bool = True
    min_foreground: float | None = None
    overlap: int = 0
    codec: str = "jpeg"
    mpp: float | None = None  # slide pixel size override
    tile_workers: int | None = None
    score: ScoreConfig = field(default_factory=ScoreConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    lock_wait: float | None = None  # seconds to wait for another writer of the same slide (None: no limit)
    slide_timeout: float | None = None  # seconds of slide reading allowed per slide (batch default: BATCH_SLIDE_TIMEOUT)
    tiling: str | None = None  # grid | cells; None: the checkpoint's ``placement`` metadata, else grid
    #: bytes (or "8G", "512M") of private memory the slide's tiling may use, in a child process
    #: (wsi_pipeline.budget); None: in this process without a limit (batch default: budget.default_memory());
    #: 0 or "off": in this process, also in a batch
    slide_memory: int | str | None = None


@dataclass
class SlideRun:
    """The outcome of one slide; ``status`` is ok, out_of_domain (most tiles unlike the checkpoint's training
    data, see wsi_pipeline.scoring.ood), empty (no tissue tile), error, or skipped (a batch asked to skip
    files that cannot be opened as slides)."""

    slide: Path
    stem: str
    status: str
    store: Path | None = None
    out_dir: Path | None = None
    score: float | None = None
    n_tiles: int | None = None
    seconds: float = 0.0
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> bool | None:
        """Whether the score is the checkpoint's calibration of the raw statistic (0.5 = the decision
        point) or the raw statistic; None without a score section (a failed or skipped slide)."""
        score = (self.summary or {}).get("score")
        return bool(score.get("calibration")) if score else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "slide": str(self.slide), "stem": self.stem, "status": self.status,
            "store": str(self.store) if self.store else None, "out_dir": str(self.out_dir) if self.out_dir else None,
            "score": self.score, "n_tiles": self.n_tiles, "seconds": round(self.seconds, 3), "steps": self.steps,
            "error": self.error, "error_type": self.error_type, "warnings": list(self.warnings),
        }


def tiler_config_for(info: CheckpointInfo, options: RunOptions) -> TilerConfig:
    """Tiles at the checkpoint's mpp and size; stain and placement from the options, the checkpoint, or the default."""
    stain = options.stain or DEFAULT_STAIN
    tiling = options.tiling or info.metadata.get("placement") or "grid"
    return TilerConfig(target_mpp=info.tile_mpp, tile_size=info.tile_size, overlap=options.overlap,
                       min_foreground=options.min_foreground, stain=str(stain), codec=options.codec,
                       tiling=str(tiling), pen_filter=options.pen_filter)


def foreground_warnings(meta: tile_store.StoreMeta, info: CheckpointInfo) -> list[str]:
    """The tiler's foreground warnings, plus one when the slide's stain is not the checkpoint's."""
    fg = meta.foreground or {}
    warnings = list(fg.get("warnings") or [])
    slide_stain = (fg.get("stain") or {}).get("stain")
    model_stain = info.metadata.get("stain")
    if slide_stain and model_stain and str(model_stain) != slide_stain:
        warnings.append(f"the slide looks {slide_stain}-stained but the checkpoint was trained on {model_stain}; "
                        "its scores may not mean what they do on its own stain")
    return warnings


def slide_status(summary: dict[str, Any] | None, n_tiles: int) -> str:
    """ok, empty or out_of_domain, as the aggregator decided it (summary.json ``status``)."""
    if not n_tiles:
        return "empty"
    return "out_of_domain" if ((summary or {}).get("ood") or {}).get("out_of_domain") else "ok"


def _tile_step(r: TileResult, peak: int | None) -> dict[str, Any]:
    step = {"reused": r.reused, "tiles": r.n_tiles, "grid_tiles": r.n_grid, "shards_written": r.shards_written,
            "seconds": round(r.seconds, 3), "empty_reason": r.empty_reason}
    if peak is not None:  # tiled in a child process under the memory budget
        step["peak_rss_mb"] = round(peak / 2**20, 1)
    return step


def _score_step(r: ScoreResult) -> dict[str, Any]:
    return {"reused": r.reused, "key": r.key, "shards_scored": r.shards_scored, "seconds": round(r.seconds, 3),
            "precision": r.precision, "device": r.device, "bf16_max_abs_diff": r.bf16_max_abs_diff}


def _aggregate_step(r: AggregateResult, seconds: float) -> dict[str, Any]:
    return {"reused": r.reused, "seconds": round(seconds, 3), "outputs": {k: str(v) for k, v in r.paths.items()}}


#: glibc mallopt parameter number of M_MMAP_THRESHOLD, and the threshold run_slide sets
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 2**20


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map (and unmap at free) every allocation of ``threshold`` bytes or more; False where
    there is no glibc ``mallopt``.

    By default glibc raises its mapping threshold up to 32 MB as such blocks are freed, after which
    the blocks (torch's activations, numpy planes) come from per-thread arenas that keep them after
    use; scoring's two worker threads plus zarr's decoder threads then each hold their own high-water
    mark. Measured on the scoring of an 8k-px smear: -90 MB peak RSS at the same speed."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_memory() -> None:
    """Give the heap a finished stage freed back to the system before the next stage starts.

    glibc keeps freed memory in its arenas (one per thread that allocated) for reuse by the same
    thread; the next stage's threads cannot use it, so each stage's leftovers added up under the
    next one's peak (a 60k-px smear: ~0.4 GB after tiling under scoring). ``malloc_trim`` returns
    it; elsewhere (macOS, musl) this only collects garbage."""
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _libc_function(name: str):
    """The process's C library function ``name``, or None where it has none (macOS, musl: no
    ``malloc_trim``; Windows: ctypes refuses ``CDLL(None)``)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


def score_and_aggregate(store: Path, out_dir: Path, options: RunOptions, info: CheckpointInfo,
                        progress: Progress | None = None) -> tuple[ScoreResult, AggregateResult, float]:
    """Score a complete store with the checkpoint and aggregate those scores (both reused when done)."""
    scored = score_store(store, info.path, options.score, progress=progress)
    release_memory()
    t0 = time.perf_counter()
    aggregated = aggregate_store(store, out_dir, options.aggregate, checkpoint_sha256=info.sha256, progress=progress)
    return scored, aggregated, time.perf_counter() - t0


def validate_options(options: RunOptions, info: CheckpointInfo) -> TilerConfig:
    """Every option checked before any work starts (a bad --top-k must not cost a tiling); the tiler config."""
    options.score.validated()
    options.aggregate.validated()
    check_weights(info)
    if options.lock_wait is not None and not options.lock_wait >= 0:
        raise OptionError("lock_wait", f"must be >= 0 seconds, got {options.lock_wait}")
    if options.slide_timeout is not None and not options.slide_timeout > 0:
        raise OptionError("slide_timeout", f"must be a positive number of seconds, got {options.slide_timeout}")
    if options.tile_workers is not None and options.tile_workers < 1:
        raise OptionError("tile_workers", f"must be at least 1, got {options.tile_workers}")
    parse_memory(options.slide_memory)
    return tiler_config_for(info, options).resolved()


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{out}: exists and is not a directory; choose another output folder") from None
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output directory ({exc.strerror or exc})") from None


def _remove_temporaries(out_dir: Path) -> None:
    """Drop half-written ``.<name>.tmp<pid>`` files a killed run left in a slide's output folder.

    Called with the slide's lock held, so no live writer owns any of them."""
    if out_dir.is_dir():
        for tmp in out_dir.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _tile(slide: Path, out: Path, config: TilerConfig, options: RunOptions,
          progress: Progress | None) -> tuple[TileResult, int | None]:
    """The tiling step: in a child process under ``slide_memory`` (and ``slide_timeout``), else in this
    process within ``slide_timeout``; (the result, the child's peak RSS or None)."""
    memory = parse_memory(options.slide_memory)
    if memory is None:
        return tile_checked(slide, out, config, mpp=options.mpp, workers=options.tile_workers,
                            seconds=options.slide_timeout, progress=progress), None
    return tile_within_budget(slide, out, config, SlideBudget(memory, options.slide_timeout), mpp=options.mpp,
                              workers=options.tile_workers, progress=progress)


def run_slide(slide: str | Path, out: str | Path, options: RunOptions = RunOptions(), *,
              progress: Progress | None = None, info: CheckpointInfo | None = None,
              on_wait: Callable[[str], None] | None = None) -> SlideRun:
    """Tile (or reuse the store), score with the checkpoint (or reuse), aggregate (or reuse).

    Holds the slide's store lock throughout (:mod:`wsi_pipeline.lock`): a second writer of the
    same output waits (``on_wait`` tells why), then reuses what the first one finished. With
    ``options.slide_memory`` the tiling runs in a child process under that memory budget
    (:mod:`wsi_pipeline.budget`); scoring and aggregation always run here.
    Raises one-line :class:`WsiTriageError` subclasses; ``run_batch`` records them per slide.
    """
    start = time.perf_counter()
    map_large_allocations()
    slide = Path(slide)
    out = Path(out)
    info = info or read_checkpoint_info(options.checkpoint)
    config = validate_options(options, info)
    _make_out_dir(out)
    with store_lock(tile_store.store_path(out, slide), wait=options.lock_wait, on_wait=on_wait):
        _remove_temporaries(out / slide.stem)
        tiled, peak = _tile(slide, out, config, options, progress)
        release_memory()
        out_dir = out / slide.stem
        scored, aggregated, agg_seconds = score_and_aggregate(tiled.path, out_dir, options, info, progress)
    summary = aggregated.summary
    score = summary["score"]["value"]
    return SlideRun(
        slide=slide, stem=slide.stem, status=slide_status(summary, tiled.n_tiles), store=tiled.path, out_dir=out_dir,
        score=score, n_tiles=tiled.n_tiles, seconds=time.perf_counter() - start,
        steps={"tile": _tile_step(tiled, peak), "score": _score_step(scored), "aggregate": _aggregate_step(aggregated, agg_seconds)},
        summary=summary, warnings=foreground_warnings(tiled.meta, info),
    )


# --------------------------------------------------------------------------- batch


def find_slides(spec: str | Path) -> list[Path]:
    """A directory's slide files (not recursive), a glob pattern's matches, or one file.

    Every entry whose name looks like a slide is returned, also a broken link, a link loop or a
    directory named like a slide: each gets a row (an error) instead of vanishing from the batch."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.name.lower().endswith(SLIDE_SUFFIXES)]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(spec), recursive=True)
                 if Path(p).is_file() or Path(p).name.lower().endswith(SLIDE_SUFFIXES)]
    files = sorted(files, key=lambda p: str(p))
    if not files:
        raise SlideError(f"{spec}: no slide files found (directory, glob pattern or file expected)")
    return files


@dataclass
class BatchResult:
    out: Path
    runs: list[SlideRun]
    rows: list[dict[str, Any]]  # ranked, as in triage.csv
    checkpoint_sha256: str
    previous_checkpoint_sha256: str | None
    triage_csv: Path
    report_html: Path
    seconds: float

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "error")


def load_batch_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((out / BATCH_STATE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _row(run: SlideRun, sha256: str) -> dict[str, Any]:
    summary = run.summary or {}
    top = (summary.get("top_tiles") or [None])[0]
    tiles = summary.get("tiles") or {}
    # names shown in the CSV, the report and --json: one printable line whatever the file name holds
    return {
        "slide": printable(run.stem), "status": run.status, "score": run.score,
        "method": (summary.get("score") or {}).get("method"),
        "calibrated": run.calibrated,
        "n_tiles": run.n_tiles, "above_threshold": tiles.get("above_threshold"),
        "ood_fraction": (summary.get("ood") or {}).get("fraction"),
        "top_suspicion": top["suspicion"] if top else None, "top_x": top["x"] if top else None,
        "top_y": top["y"] if top else None, "checkpoint_sha12": sha256[:12],
        "seconds": round(run.seconds, 3), "error": printable(run.error) if run.error else None,
        "slide_path": printable(str(run.slide)), "out_dir": printable(str(run.out_dir)) if run.out_dir else None,
        "store": printable(str(run.store)) if run.store else None,
    }


#: the order of statuses in the ranking (then descending score within one status)
STATUS_ORDER = {"ok": 0, "out_of_domain": 1, "empty": 2, "error": 3, "skipped": 4}


def rank_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored slides by descending suspicion, then out-of-domain slides (their score is no suspicion), then
    slides without tissue, then failures, then skipped files; rank numbers set."""
    ranked = sorted(rows, key=lambda r: (STATUS_ORDER.get(r["status"], len(STATUS_ORDER)),
                                         -(r["score"] if r["score"] is not None else -1), r["slide"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


CSV_FIELDS = ["rank", "slide", "status", "score", "method", "previous_score", "score_change", "n_tiles",
              "above_threshold", "top_suspicion", "top_x", "top_y", "checkpoint_sha12", "seconds", "error",
              "slide_path", "out_dir", "ood_fraction", "calibrated"]


def triage_csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else csv_cell(r.get(k))) for k in CSV_FIELDS})
    return buf.getvalue().encode()


def _carried_over(stem: str, record: dict[str, Any], out: Path) -> SlideRun:
    out_dir = out / stem
    return SlideRun(slide=Path(record.get("slide_path") or stem), stem=stem, status=record["status"],
                    store=out / f"{stem}.zarr", out_dir=out_dir, score=record.get("score"),
                    n_tiles=record.get("n_tiles"), seconds=float(record.get("seconds") or 0.0),
                    steps={"skipped": {"reason": "--only-failed"}}, summary=read_summary(out_dir))


def _batch_options(options: RunOptions) -> RunOptions:
    """A batch's defaults: each slide under a time budget and, in a child process, a memory budget."""
    if options.slide_timeout is None:
        options = dataclasses.replace(options, slide_timeout=BATCH_SLIDE_TIMEOUT)
    if options.slide_memory is None:
        options = dataclasses.replace(options, slide_memory=default_memory())
    return options


def _batch_state(out: Path, info: CheckpointInfo, options: RunOptions) -> tuple[dict[str, Any], bool]:
    """The new ``batch.json`` content: the last batch's records when it used the same checkpoint, else
    none (its scores become ``previous``, to report each slide's change); and whether it did."""
    state = load_batch_state(out)
    records: dict[str, Any] = dict(state.get("slides") or {})
    same_checkpoint = state.get("checkpoint_sha256") == info.sha256
    if state.get("checkpoint_sha256") and not same_checkpoint:
        previous = {"checkpoint_sha256": state["checkpoint_sha256"],
                    "scores": {k: v.get("score") for k, v in records.items()}}
        records = {}
    else:
        previous = state.get("previous")
    return {"checkpoint_sha256": info.sha256, "checkpoint_path": str(info.path), "previous": previous,
            "slides": records, "aggregate_config": dataclasses.asdict(options.aggregate),
            "updated": None}, same_checkpoint


def _failed_run(slide: Path, exc: Exception, seconds: float, skip_unreadable: bool) -> SlideRun:
    """The row of a slide whose run raised: a user or environment error as its one line, a bug with its
    type and place; a file that cannot be opened as a slide is ``skipped`` when the batch was asked to."""
    if isinstance(exc, ChildCrash):
        error, error_type = str(exc), exc.type_name
    else:
        known = exc if isinstance(exc, UserError) else (
            environment_error(exc) if isinstance(exc, OSError) else None)  # a full disk is no bug
        if known is not None:
            error, error_type = str(known), type(known).__name__
        else:
            last = traceback.extract_tb(exc.__traceback__)[-1]
            error_type = type(exc).__name__
            error = f"{slide}: unexpected {error_type}: {exc} (at {Path(last.filename).name}:{last.lineno})"
    status = "skipped" if skip_unreadable and isinstance(exc, UnreadableSlideError) else "error"
    return SlideRun(slide=slide, stem=slide.stem, status=status, error=error, error_type=error_type, seconds=seconds)


def _all_reused(run: SlideRun) -> bool:
    return all(run.steps.get(s, {}).get("reused") for s in ("tile", "score", "aggregate"))


def _batch_slide(slide: Path, out: Path, options: RunOptions, info: CheckpointInfo, record: dict[str, Any] | None,
                 progress: Progress | None, skip_unreadable: bool) -> SlideRun:
    """One slide of a batch; whatever it raises becomes its row, never the batch's end."""
    t0 = time.perf_counter()
    try:
        run = run_slide(slide, out, options, progress=progress, info=info)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        return _failed_run(slide, exc, time.perf_counter() - t0, skip_unreadable)
    if record and record.get("seconds") is not None and _all_reused(run):
        run.seconds = float(record["seconds"])  # nothing redone: keep the time the work took
    return run


def _record(state: dict[str, Any], run: SlideRun, out: Path) -> None:
    """The slide's outcome into ``batch.json``, written at once (a killed batch keeps what it finished)."""
    state["slides"][run.stem] = {"status": run.status, "score": run.score, "n_tiles": run.n_tiles,
                                 "error": run.error, "slide_path": str(run.slide), "seconds": round(run.seconds, 3)}
    state["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_atomic(out / BATCH_STATE, json.dumps(state, indent=2, default=str).encode())


def _ranked_rows(runs: list[SlideRun], sha256: str, previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The triage rows, each with its score under the previous checkpoint and the change, ranked."""
    rows = [_row(r, sha256) for r in runs]
    prev_scores = (previous or {}).get("scores") or {}
    for run, r in zip(runs, rows):
        before = prev_scores.get(run.stem)
        r["previous_score"] = before
        r["score_change"] = (round(r["score"] - before, 6)
                             if r["score"] is not None and before is not None else None)
    return rank_rows(rows)


def run_batch(
    spec: str | Path,
    out: str | Path,
    options: RunOptions = RunOptions(),
    *,
    only_failed: bool = False,
    skip_unreadable: bool = False,
    progress: Progress | None = None,
    on_slide: Callable[[int, int, SlideRun], None] | None = None,
) -> BatchResult:
    """Run every slide of ``spec``; a failing slide is recorded (status, error) and never stops the batch.

    Each slide is tiled in a child process under a memory budget (``options.slide_memory``, default
    :func:`wsi_pipeline.budget.default_memory`) and a time budget (``slide_timeout``, default
    :data:`BATCH_SLIDE_TIMEOUT`). With ``only_failed``, slides that succeeded with the same checkpoint
    last time are carried over. With ``skip_unreadable``, a file that cannot be opened as a slide is a
    ``skipped`` row, not a failure. When the checkpoint differs from the previous batch's, each row
    gets the previous score and the change.
    """
    from .review import write_report

    start = time.perf_counter()
    out = Path(out)
    slides = find_slides(spec)
    info = read_checkpoint_info(options.checkpoint)  # a bad checkpoint stops the batch before any slide
    validate_options(options, info)  # so do bad options
    options = _batch_options(options)
    _make_out_dir(out)
    state, same_checkpoint = _batch_state(out, info, options)
    carry_over = only_failed and same_checkpoint
    runs: list[SlideRun] = []
    seen: dict[str, Path] = {}
    for i, slide in enumerate(slides):
        stem = slide.stem
        record = state["slides"].get(stem)
        if stem in seen:
            run = SlideRun(slide=slide, stem=stem, status="error", error_type="SlideError",
                           error=f"{slide}: another slide ({seen[stem]}) has the same name; outputs would collide")
        elif carry_over and record and record.get("status") in ("ok", "out_of_domain", "empty"):
            run = _carried_over(stem, record, out)
        else:
            run = _batch_slide(slide, out, options, info, record, progress, skip_unreadable)
        if stem not in seen:
            seen[stem] = slide
            _record(state, run, out)
        runs.append(run)
        if on_slide:
            on_slide(i + 1, len(slides), run)

    previous = state["previous"]
    rows = _ranked_rows(runs, info.sha256, previous)
    csv_path = write_atomic(out / TRIAGE_CSV, triage_csv_bytes(rows))
    html_path = write_report(out / REPORT_HTML, rows, info=info, previous=previous, aggregate=options.aggregate)
    return BatchResult(out, runs, rows, info.sha256, (previous or {}).get("checkpoint_sha256"), csv_path, html_path,
                       time.perf_counter() - start)
