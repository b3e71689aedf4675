"""Score every stored tile with a student checkpoint, one dask task per store shard.

Each task reads its shard of tiles from the store (never the slide), runs the model in
batches and writes its own rows of ``scores/<sha12>/probs`` (zarr chunks = shards, so tasks
never share a chunk), then flags the shard in ``scores/<sha12>/shard_done``. An interrupted
scoring resumes from the unflagged shards; a finished one (``complete``) is reused.

The model is loaded at most once per worker process: a module-level cache keyed on the
checkpoint's sha256 (and device), filled inside the task from the checkpoint path, which works
the same for local threads, local processes and dask.distributed workers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from wsi_contracts import tilestore as tile_store
from wsi_contracts.tilestore import ScoreMeta, StoreMeta, list_scores, read_ood, read_scores, scores_key
from wsi_contracts.checkpoint import TTA_VIEWS, CheckpointInfo, TestTimeAugmentation
from .model import LoadedCheckpoint, cached_model, read_checkpoint_info
from ..errors import CheckpointError, OptionError, StoreError
from ..progress import Counter, Progress
from .ood import OodStats, features_and_logits, ood_distance

__all__ = ['MPP_TOLERANCE', 'LOCAL_SCHEDULERS', 'ScoreConfig', 'ScoreResult', 'scores_key', 'check_device', 'resolve_device', 'ScoringModel', 'scoring_model', 'fold_normalization', 'predict_probs', 'predict_probs_ood', 'cpu_has_native_bf16', 'choose_precision', 'score_shard', 'process_pool', 'check_store_matches', 'ScoreMeta', 'list_scores', 'read_scores', 'read_ood', 'score_store']

#: relative difference between the store's tile mpp and the checkpoint's that is still accepted
MPP_TOLERANCE = 0.02
LOCAL_SCHEDULERS = ("threads", "processes", "sync")


@dataclass(frozen=True)
class ScoreConfig:
    """How scoring runs. None of this changes the stored probabilities beyond bf16 rounding."""

    scheduler: str = "threads"  # threads | processes | sync | a dask.distributed scheduler address
    workers: int | None = None  # local workers [default: CPU count]
    batch_size: int = 64
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = "auto"  # auto (bf16 on CUDA or a native-bf16 CPU, if it matches fp32) | fp32 | bf16 (if it matches fp32)
    bf16_tolerance: float = 0.02  # max |p_bf16 - p_fp32| on the check sample to accept bf16
    precision_check_tiles: int = 32  # tiles of the first shard scored both ways for that check

    def validated(self) -> "ScoreConfig":
        if self.precision not in ("auto", "fp32", "bf16"):
            raise OptionError("precision", f"must be auto, fp32 or bf16, got {self.precision!r}")
        if self.precision_check_tiles < 1:
            raise OptionError("precision_check_tiles", f"must be at least 1, got {self.precision_check_tiles}")
        if self.batch_size < 1:
            raise OptionError("batch_size", f"must be positive, got {self.batch_size}")
        if self.scheduler not in LOCAL_SCHEDULERS and "://" not in self.scheduler and ":" not in self.scheduler:
            raise OptionError("scheduler", f"must be threads, processes, sync or a dask.distributed address such as "
                                           f"tcp://host:8786, got {self.scheduler!r}")
        if self.workers is not None and self.workers < 1:
            raise OptionError("workers", f"must be at least 1, got {self.workers}")
        if self.device:
            check_device(self.device)
        return self


@dataclass
class ScoreResult:
    store: Path
    key: str  # scores/<sha12>
    checkpoint_sha256: str
    n_tiles: int
    reused: bool
    shards_scored: int
    seconds: float
    precision: str
    device: str
    bf16_max_abs_diff: float | None = None

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 and not self.reused else float("nan")


def check_device(device: str) -> None:
    """Refuse a torch device that does not parse or is not on this machine (before any work)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise OptionError("device", f"{device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError("device", f"{device!r}: no CUDA GPU is available on this machine; use cpu")
        if dev.index is not None and dev.index >= count:
            raise OptionError("device", f"{device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("device", f"{device!r}: Apple MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError("device", f"{device!r}: unsupported device type {dev.type!r}; use cpu, cuda or mps")


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- scoring model (per worker)


@dataclass
class ScoringModel:
    """What a worker scores with: the checkpoint, and its model with the normalisation folded in."""

    loaded: LoadedCheckpoint
    pixel_model: Any | None  # fold_normalization(loaded.model), or None

    def predict(self, tiles: np.ndarray, *, device: str, precision: str, batch_size: int) -> np.ndarray:
        folded = self.pixel_model is not None
        return predict_probs(self.pixel_model if folded else self.loaded.model, self.loaded.info, tiles,
                             device=device, precision=precision, batch_size=batch_size, pixel_input=folded)

    def predict_with_ood(self, tiles: np.ndarray, *, device: str, precision: str,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, when the checkpoint carries OOD statistics, each tile's OOD distance."""
        folded = self.pixel_model is not None
        return predict_probs_ood(self.pixel_model if folded else self.loaded.model, self.loaded.info, tiles,
                                 device=device, precision=precision, batch_size=batch_size, pixel_input=folded,
                                 ood=self.loaded.ood)


@functools.lru_cache(maxsize=None)
def scoring_model(checkpoint_path: str | Path, sha256: str, device: str) -> ScoringModel:
    """:func:`cached_model` plus its folded copy, built once per process."""
    loaded = cached_model(checkpoint_path, sha256, device)
    return ScoringModel(loaded, fold_normalization(loaded.model, loaded.info))


# --------------------------------------------------------------------------- inference


def fold_normalization(model, info: CheckpointInfo):
    """A copy of ``model`` that takes RGB in 0..255 directly, or None where it cannot.

    The checkpoint's normalisation ((x / 255 - mean) / std per channel) is folded into the
    patch embedding's weights and bias. Exact: the embedding is a linear, unpadded convolution,
    and resizing (bilinear, weights summing to one) commutes with a per-channel affine map. It
    saves three passes over every input batch (~4 % of the student's CPU time).
    """
    import copy

    import torch

    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, torch.nn.Conv2d) or proj.in_channels != 3 or any(proj.padding) or proj.bias is None:
        return None
    folded = copy.deepcopy(model)
    p = folded.patch_embed.proj
    mean = torch.tensor(info.mean, dtype=p.weight.dtype, device=p.weight.device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=p.weight.dtype, device=p.weight.device).view(1, 3, 1, 1)
    with torch.no_grad():
        p.bias -= (p.weight * (mean / std)).sum(dim=(1, 2, 3))
        p.weight /= 255.0 * std
    return folded


def predict_probs(model, info: CheckpointInfo, tiles: np.ndarray, *, device: str = "cpu",
                  precision: str = "fp32", batch_size: int = 64, pixel_input: bool = False,
                  tta: TestTimeAugmentation | None = None) -> np.ndarray:
    """Class probabilities (n, K) float32 for uint8 RGB tiles (n, T, T, 3).

    ``pixel_input``: ``model`` came from :func:`fold_normalization` and takes 0..255 values;
    ``tta``: the test-time augmentation (default: the checkpoint's, see :func:`predict_probs_ood`)."""
    return predict_probs_ood(model, info, tiles, device=device, precision=precision, batch_size=batch_size,
                             pixel_input=pixel_input, tta=tta)[0]


def predict_probs_ood(model, info: CheckpointInfo, tiles: np.ndarray, *, device: str = "cpu",
                      precision: str = "fp32", batch_size: int = 64, pixel_input: bool = False,
                      ood: OodStats | None = None,
                      tta: TestTimeAugmentation | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`predict_probs`, plus the OOD distance (n,) float32 of each tile when ``ood`` is given.

    ``tta``: the test-time augmentation (default: the checkpoint's ``info.tta``): a tile whose
    suspicion in its own view reaches ``tta.floor`` gets the mean probabilities over the views;
    the OOD distance is always the tile's own view (the statistics were fitted on such)."""
    import torch
    import torch.nn.functional as F

    tta = info.tta if tta is None else tta
    n = int(tiles.shape[0])
    if n == 0:
        return np.zeros((0, info.num_classes), dtype=np.float32), (None if ood is None else np.zeros(0, np.float32))
    dev = torch.device(device)
    mean = torch.tensor(info.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    suspicious = [info.class_names.index(c) for c in info.suspicious_classes]
    bf16 = precision == "bf16"
    out, dist = [], []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tiles[start:start + batch_size])).to(dev)
            x = x.permute(0, 3, 1, 2).float()
            if x.shape[-1] != info.input_size or x.shape[-2] != info.input_size:
                x = F.interpolate(x, size=(info.input_size, info.input_size), mode="bilinear",
                                  antialias=True, align_corners=False)
            if not pixel_input:
                x = (x / 255.0 - mean) / std
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                if ood is None:
                    logits = model(x)
                else:
                    feats, logits = features_and_logits(model, x)
                    dist.append(ood_distance(feats.float().cpu().numpy(), ood))
                probs = torch.softmax(logits.float(), dim=1)
                if tta.n_views > 1:
                    need = probs[:, suspicious].sum(dim=1) >= tta.floor
                    if bool(need.any()):  # one view at a time: a batch's activations, not n_views' worth
                        total = probs[need]
                        for view in _other_views(x[need], tta.views):
                            total += torch.softmax(model(view).float(), dim=1)
                        probs[need] = total / tta.n_views
            out.append(probs.cpu().numpy())
    probs = np.concatenate(out).astype(np.float32, copy=False)
    return probs, (np.concatenate(dist) if ood is not None else None)


def _other_views(x, views: str) -> Iterator:
    """The views of a batch (B, C, H, W) beside itself, one at a time, for
    :data:`~wsi_contracts.checkpoint.TTA_VIEWS`."""
    import torch

    if views not in TTA_VIEWS or TTA_VIEWS[views] == 1:
        raise ValueError(f"unknown test-time augmentation views {views!r}")
    if views == "flips":
        yield from (x.flip(3), x.flip(2), x.flip((2, 3)))
        return
    yield from (torch.rot90(x, k, dims=(2, 3)) for k in (1, 2, 3))
    if views == "d8":
        mirrored = x.transpose(2, 3)
        yield mirrored
        yield from (torch.rot90(mirrored, k, dims=(2, 3)) for k in (1, 2, 3))


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): there bf16 autocast
    runs ViT inference 2-3x faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(scoring: ScoringModel, tiles: np.ndarray, config: ScoreConfig,
                     device: str) -> tuple[str, float | None, np.ndarray | None]:
    """fp32, or bf16 when asked for (or auto on a bf16-capable device) and its probabilities stay
    within tolerance. Returns (precision, measured difference, the probabilities of ``tiles`` at
    the chosen precision when they were computed for the check, else None)."""
    if config.precision == "fp32" or len(tiles) == 0:
        return "fp32", None, None
    if config.precision == "auto" and not device.startswith("cuda") and not cpu_has_native_bf16():
        return "fp32", None, None  # without AVX512-BF16/AMX, bf16 autocast is emulated (slower)
    p32 = scoring.predict(tiles, device=device, precision="fp32", batch_size=config.batch_size)
    p16 = scoring.predict(tiles, device=device, precision="bf16", batch_size=config.batch_size)
    diff = float(np.max(np.abs(p32 - p16)))
    return ("bf16", diff, p16) if diff <= config.bf16_tolerance else ("fp32", diff, p32)


def score_shard(store_path: str, key: str, index: int, checkpoint_path: str, sha256: str, device: str,
                precision: str, batch_size: int, torch_threads: int | None) -> tuple[int, int]:
    """One dask task: read shard ``index`` of tiles, write its probabilities, flag it done."""
    if torch_threads:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    scoring = scoring_model(checkpoint_path, sha256, device)
    group = tile_store.open_store(store_path, mode="r+")
    tiles = tile_store.read_shard(group, index)
    probs, ood = scoring.predict_with_ood(tiles, device=device, precision=precision, batch_size=batch_size)
    if not np.isfinite(probs).all() or (ood is not None and not np.isfinite(ood).all()):  # never flag a shard done with NaN scores ("run score again" would not help)
        raise CheckpointError(f"{checkpoint_path}: the model produced NaN or infinite probabilities for tiles of "
                              f"shard {index} of {store_path}; the checkpoint is unusable (export it again)")
    tile_store.write_scores(group, key, index, probs, ood)
    return index, len(probs)


# --------------------------------------------------------------------------- store checks and reads


def check_store_matches(store_path: Path, meta: StoreMeta, info: CheckpointInfo) -> None:
    """Refuse a store whose tiles are not the size and pixel size the checkpoint was trained on."""
    size = meta.tile_size
    mpp = float("nan") if meta.target_mpp is None else meta.target_mpp
    if size != info.tile_size or not abs(mpp - info.tile_mpp) <= MPP_TOLERANCE * info.tile_mpp:
        raise CheckpointError(
            f"{info.path}: checkpoint expects {info.tile_size} px tiles at {info.tile_mpp:g} um/px but "
            f"{store_path} holds {size} px tiles at {mpp:g} um/px; re-tile with `wsi-triage run SLIDE "
            f"--checkpoint {info.path}`")


# --------------------------------------------------------------------------- driver


def _prepare_group(group, info: CheckpointInfo, device: str, precision: str, diff: float | None):
    # with OOD statistics an ``ood`` array of out-of-domain distances (wsi_pipeline.scoring.ood) beside ``probs``
    meta = ScoreMeta(
        checkpoint_sha256=info.sha256,
        class_names=tuple(info.class_names),
        suspicious_classes=tuple(info.suspicious_classes),
        checkpoint_path=str(Path(info.path).resolve()),
        checkpoint_metadata=info.metadata,
        precision=precision,
        bf16_max_abs_diff=diff,
        ood=info.ood,
        device=device,
    )
    return tile_store.create_scores(group, meta)


def _local_workers(config: ScoreConfig, n_tasks: int) -> int:
    return max(1, min(config.workers or os.cpu_count() or 1, n_tasks))


_POOL: tuple[int, ProcessPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def process_pool(n_workers: int) -> ProcessPoolExecutor:
    """The worker processes of ``scheduler="processes"``, kept for the life of this process.

    dask's own pool is made and shut down per call, so a batch started new processes for every
    slide and each imported torch and loaded the model again (~16 s a slide on 2 cores); this one
    is reused, and its workers keep the model loaded (cached by the checkpoint's sha256). One pool
    at a time: asking for another size shuts the previous one down. Spawned, not forked: a forked
    torch process can deadlock on the parent's thread pools."""
    global _POOL
    import multiprocessing

    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != n_workers:
            _drop_pool_locked()
            _POOL = (n_workers, ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")))
        return _POOL[1]


def _drop_pool_locked() -> None:
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
        _POOL = None


def _run_tasks(tasks: list, config: ScoreConfig, n_workers: int, counter: Counter) -> None:
    import dask

    if not tasks:
        return
    if config.scheduler in LOCAL_SCHEDULERS:
        from dask.callbacks import Callback

        def posttask(key, result, dsk, state, worker_id):
            if isinstance(result, tuple) and len(result) == 2:
                counter.add(int(result[1]))

        # the scheduler's own function, not its name: a name makes dask import distributed to
        # look for a client (0.3 s per process)
        import dask.local
        import dask.multiprocessing
        import dask.threaded

        get = {"threads": dask.threaded.get, "processes": dask.multiprocessing.get,
               "sync": dask.local.get_sync}[config.scheduler]
        extra = {"pool": process_pool(n_workers)} if config.scheduler == "processes" else {}
        try:
            with Callback(posttask=posttask):
                dask.compute(*tasks, scheduler=get, num_workers=n_workers, **extra)
        except BrokenProcessPool:
            with _POOL_LOCK:  # a worker died (killed, out of memory): the next call starts anew
                _drop_pool_locked()
            raise
        return
    from distributed import Client, as_completed

    try:
        client = Client(config.scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise OptionError("scheduler", f"{config.scheduler!r}: cannot reach the dask scheduler ({exc})") from None
    try:
        futures = client.compute(tasks)
        with client.as_current():  # as_completed finds its event loop through the current client
            finished = as_completed(futures)
        for fut in finished:
            _, n = fut.result()
            counter.add(int(n))
    finally:
        client.close()


def score_store(store_path: str | Path, checkpoint: str | Path | None = None, config: ScoreConfig = ScoreConfig(),
                *, progress: Progress | None = None) -> ScoreResult:
    """Write ``scores/<sha12>/probs`` for every tile of a complete store; reuse or resume existing scores.

    ``checkpoint=None`` uses the bundled demo student. Reads only the store, never the slide.
    Holds the store's writer lock (:mod:`wsi_pipeline.lock`) while it works. ``progress("scoring",
    tiles_done, n_tiles)`` (:mod:`wsi_pipeline.progress`) reports the plan, then each scored shard.
    torch's process-wide thread count is the same after the call as before it.
    """
    from ..lock import store_lock

    config = config.validated()
    counter = Counter(progress, "scoring")
    with store_lock(store_path):
        start = time.perf_counter()
        plan = _plan_scoring(Path(store_path), checkpoint)
        if plan.complete:
            counter.plan(plan.meta.n_tiles, plan.meta.n_tiles)
            return _reused_result(plan, time.perf_counter() - start)
        device = resolve_device(config.device)  # imports torch: only when there is work
        precision, diff = _open_scores(plan, config, device)
        pending = _pending_shards(plan)
        counter.plan(plan.meta.n_tiles, plan.meta.n_tiles - sum(_shard_len(plan.meta, i) for i in pending))
        _score_shards(plan, pending, config, device, precision, counter)
        _mark_complete(plan)
    return ScoreResult(plan.store, plan.key, plan.info.sha256, plan.meta.n_tiles, False, len(pending),
                       time.perf_counter() - start, precision, device, diff)


@dataclass(frozen=True)
class _ScorePlan:
    """What a scoring starts from: the store, the checkpoint, and this checkpoint's scores if any."""

    store: Path
    info: CheckpointInfo
    meta: StoreMeta
    key: str  # scores/<sha12>
    existing: ScoreMeta | None  # attributes of this checkpoint's score group, when it exists

    @property
    def complete(self) -> bool:
        return bool(self.existing and self.existing.complete)


def _plan_scoring(store_path: Path, checkpoint: str | Path | None) -> _ScorePlan:
    """Check the store (complete, tiles the checkpoint's size and pixel size) and find its scores; score
    chunks that fail their checksum are marked pending again, so only those are redone."""
    info = read_checkpoint_info(checkpoint)
    group = tile_store.require_complete(store_path)
    meta = tile_store.read_store_meta(group)
    check_store_matches(store_path, meta, info)
    key = scores_key(info.sha256)
    existing = _own_scores(group, key, info)
    if existing and tile_store.unflag_damaged_scores(store_path, key):
        existing = _own_scores(tile_store.open_store(store_path), key, info)
    return _ScorePlan(store_path, info, meta, key, existing)


def _own_scores(group, key: str, info: CheckpointInfo) -> ScoreMeta | None:
    """This checkpoint's score group; None when there is none, or when its attributes are damaged or another
    checkpoint's (same sha12): that group is then scored again from scratch."""
    if key not in tile_store.score_keys(group):
        return None
    try:
        meta = tile_store.read_score_meta(group, key)
    except StoreError:
        return None
    return meta if meta.checkpoint_sha256 == info.sha256 else None


def _reused_result(plan: _ScorePlan, seconds: float) -> ScoreResult:
    e = plan.existing
    return ScoreResult(plan.store, plan.key, plan.info.sha256, plan.meta.n_tiles, True, 0, seconds,
                       (e and e.precision) or "fp32", (e and e.device) or "cpu", e.bf16_max_abs_diff if e else None)


def _shard_len(meta: StoreMeta, index: int) -> int:
    sl = tile_store.shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    return sl.stop - sl.start


def _open_scores(plan: _ScorePlan, config: ScoreConfig, device: str) -> tuple[str, float | None]:
    """The precision to score at and its measured bf16 difference: those an interrupted scoring started
    with, or new ones, recorded in a new score group (with shard 0 kept when the check scored it all)."""
    if plan.existing:
        return plan.existing.precision or "fp32", plan.existing.bf16_max_abs_diff
    group = tile_store.open_store(plan.store, mode="r+")
    info, n_tiles = plan.info, plan.meta.n_tiles
    precision, diff, first_probs = "fp32", None, None
    if n_tiles and config.precision != "fp32":
        # a sample of the first shard is scored both ways; the whole shard only when it is small
        sample = tile_store.read_shard(group, 0)[:config.precision_check_tiles]
        precision, diff, first_probs = choose_precision(scoring_model(info.path, info.sha256, device), sample,
                                                        config, device)
        if first_probs is not None and (len(first_probs) != _shard_len(plan.meta, 0) or info.ood is not None):
            first_probs = None  # (with OOD statistics shard 0 is scored again, for its distances)
    sg = _prepare_group(group, info, device, precision, diff)
    if first_probs is not None and not np.isfinite(first_probs).all():
        raise CheckpointError(f"{info.path}: the model produced NaN or infinite probabilities on {plan.store}; "
                              "the checkpoint is unusable (export it again)")
    if first_probs is not None:
        # the precision check already scored all of shard 0 at the chosen precision: keep it
        sg["probs"][tile_store.shard_slice(0, n_tiles, plan.meta.tiles_per_shard)] = first_probs
        sg["shard_done"][0] = True
    return precision, diff


def _pending_shards(plan: _ScorePlan) -> list[int]:
    n_shards = plan.meta.n_shards
    if not n_shards:
        return []
    done = np.asarray(tile_store.open_store(plan.store)[plan.key]["shard_done"][:n_shards])
    return [int(i) for i in np.flatnonzero(~done)]


def _score_shards(plan: _ScorePlan, pending: list[int], config: ScoreConfig, device: str, precision: str,
                  counter: Counter) -> None:
    """One dask task per pending shard, on the configured scheduler."""
    import dask

    n_workers = _local_workers(config, len(pending))
    # worker processes split the cores between them; so do worker threads on the CPU (one intra-op
    # thread each avoids oversubscribing the cores), for the duration of the call only
    share = max(1, (os.cpu_count() or 1) // n_workers)
    task_threads = share if config.scheduler == "processes" else None
    local_threads = share if config.scheduler == "threads" and n_workers > 1 and device == "cpu" else None
    info = plan.info
    tasks = [
        dask.delayed(score_shard, pure=False)(str(plan.store), plan.key, i, str(info.path), info.sha256, device,
                                              precision, config.batch_size, task_threads,
                                              dask_key_name=f"score-shard-{info.sha12}-{i}")
        for i in pending
    ]
    with _torch_threads(local_threads):
        _run_tasks(tasks, config, n_workers, counter)


def _mark_complete(plan: _ScorePlan) -> None:
    """Every shard is scored: the scores are complete (readers use only complete scores)."""
    tile_store.complete_scores(tile_store.open_store(plan.store, mode="r+"), plan.key)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (when given), then restored."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
