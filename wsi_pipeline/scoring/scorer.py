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
import dataclasses
import functools
import datetime as _dt
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wsi_contracts import tilestore as tile_store
from wsi_contracts.tilestore import StoreMeta, list_scores, read_ood, read_scores, scores_key
from wsi_contracts.checkpoint import CheckpointInfo
from .model import LoadedCheckpoint, load_checkpoint, read_checkpoint_info
from ..errors import CheckpointError, OptionError, StoreError
from .ood import OodStats, features_and_logits, ood_distance

__all__ = ['MPP_TOLERANCE', 'LOCAL_SCHEDULERS', 'ScoreConfig', 'ScoreResult', 'scores_key', 'check_device', 'resolve_device', 'ScoringModel', 'scoring_model', 'cached_model', 'clear_model_cache', 'fold_normalization', 'predict_probs', 'predict_probs_ood', 'cpu_has_native_bf16', 'choose_precision', 'score_shard', 'check_store_matches', 'list_scores', 'read_scores', 'read_ood', 'score_store', 'score_config_dict']

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
            raise StoreError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        if self.precision_check_tiles < 1:
            raise StoreError(f"precision check needs at least one tile, got {self.precision_check_tiles}")
        if self.batch_size < 1:
            raise StoreError(f"batch size must be positive, got {self.batch_size}")
        if self.scheduler not in LOCAL_SCHEDULERS and "://" not in self.scheduler and ":" not in self.scheduler:
            raise StoreError(f"unknown scheduler {self.scheduler!r}; use threads, processes or a "
                             "dask.distributed address such as tcp://host:8786")
        if self.workers is not None and self.workers < 1:
            raise OptionError(f"--score-workers must be at least 1, got {self.workers}")
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
        raise OptionError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda or mps")


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- model cache (per worker)

_MODELS: dict[tuple[str, str], LoadedCheckpoint] = {}
_MODELS_LOCK = threading.Lock()


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


_SCORING: dict[tuple[str, str], ScoringModel] = {}


def scoring_model(checkpoint_path: str | Path, sha256: str, device: str) -> ScoringModel:
    """:func:`cached_model` plus its folded copy, built once per process."""
    key = (sha256, device)
    with _MODELS_LOCK:
        found = _SCORING.get(key)
    if found is None:
        loaded = cached_model(checkpoint_path, sha256, device)
        found = ScoringModel(loaded, fold_normalization(loaded.model, loaded.info))
        with _MODELS_LOCK:
            found = _SCORING.setdefault(key, found)
    return found


def cached_model(checkpoint_path: str | Path, sha256: str, device: str) -> LoadedCheckpoint:
    """The checkpoint's model on ``device``, loaded once per process and reused by every task."""
    key = (sha256, device)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_checkpoint(checkpoint_path)
            if loaded.info.sha256 != sha256:
                raise CheckpointError(f"{checkpoint_path}: checkpoint changed while scoring (sha256 differs)")
            loaded.model.to(device)
            _MODELS[key] = loaded
    return loaded


def clear_model_cache() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()
        _SCORING.clear()


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
                  precision: str = "fp32", batch_size: int = 64, pixel_input: bool = False) -> np.ndarray:
    """Class probabilities (n, K) float32 for uint8 RGB tiles (n, T, T, 3).

    ``pixel_input``: ``model`` came from :func:`fold_normalization` and takes 0..255 values."""
    return predict_probs_ood(model, info, tiles, device=device, precision=precision, batch_size=batch_size,
                             pixel_input=pixel_input)[0]


def predict_probs_ood(model, info: CheckpointInfo, tiles: np.ndarray, *, device: str = "cpu",
                      precision: str = "fp32", batch_size: int = 64, pixel_input: bool = False,
                      ood: OodStats | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`predict_probs`, plus the OOD distance (n,) float32 of each tile when ``ood`` is given."""
    import torch
    import torch.nn.functional as F

    n = int(tiles.shape[0])
    if n == 0:
        return np.zeros((0, info.num_classes), dtype=np.float32), (None if ood is None else np.zeros(0, np.float32))
    dev = torch.device(device)
    mean = torch.tensor(info.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
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
            bf16 = precision == "bf16"
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                if ood is None:
                    logits = model(x)
                else:
                    feats, logits = features_and_logits(model, x)
                    dist.append(ood_distance(feats.float().cpu().numpy(), ood))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    probs = np.concatenate(out).astype(np.float32, copy=False)
    return probs, (np.concatenate(dist) if ood is not None else None)


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


def _prepare_group(group, key: str, info: CheckpointInfo, device: str, precision: str, diff: float | None):
    # with OOD statistics an ``ood`` array of out-of-domain distances (wsi_pipeline.scoring.ood) beside ``probs``
    return tile_store.create_scores(group, key, info.num_classes, info.ood is not None, {
        "class_names": list(info.class_names),
        "suspicious_classes": list(info.suspicious_classes),
        "checkpoint_sha256": info.sha256,
        "checkpoint_path": str(Path(info.path).resolve()),
        "checkpoint_metadata": info.metadata,
        "precision": precision,
        "bf16_max_abs_diff": diff,
        "ood": info.ood,
        "device": device,
        "complete": False,
        "scored": None,
    })


def _local_workers(config: ScoreConfig, n_tasks: int) -> int:
    return max(1, min(config.workers or os.cpu_count() or 1, n_tasks))


def _run_tasks(tasks: list, config: ScoreConfig, n_workers: int, progress: Callable[[int], None] | None) -> None:
    import dask

    if not tasks:
        return
    if config.scheduler in LOCAL_SCHEDULERS:
        from dask.callbacks import Callback

        def posttask(key, result, dsk, state, worker_id):
            if progress and isinstance(result, tuple) and len(result) == 2:
                progress(int(result[1]))

        # the scheduler's own function, not its name: a name makes dask import distributed to
        # look for a client (0.3 s per process)
        import dask.local
        import dask.multiprocessing
        import dask.threaded

        get = {"threads": dask.threaded.get, "processes": dask.multiprocessing.get,
               "sync": dask.local.get_sync}[config.scheduler]
        with Callback(posttask=posttask):
            dask.compute(*tasks, scheduler=get, num_workers=n_workers)
        return
    from distributed import Client, as_completed

    try:
        client = Client(config.scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise StoreError(f"cannot reach dask scheduler {config.scheduler}: {exc}") from None
    try:
        futures = client.compute(tasks)
        with client.as_current():  # as_completed finds its event loop through the current client
            finished = as_completed(futures)
        for fut in finished:
            _, n = fut.result()
            if progress:
                progress(int(n))
    finally:
        client.close()


def score_store(store_path: str | Path, checkpoint: str | Path | None = None, config: ScoreConfig = ScoreConfig(),
                *, progress: Callable[[int], None] | None = None,
                on_plan: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Write ``scores/<sha12>/probs`` for every tile of a complete store; reuse or resume existing scores.

    ``checkpoint=None`` uses the bundled demo student. Reads only the store, never the slide.
    Holds the store's writer lock (:mod:`wsi_pipeline.lock`) while it works.
    """
    from ..lock import store_lock

    config = config.validated()
    with store_lock(store_path):
        return _score_store(store_path, checkpoint, config, progress=progress, on_plan=on_plan)


def _score_store(
    store_path: str | Path,
    checkpoint: str | Path | None = None,
    config: ScoreConfig = ScoreConfig(),
    *,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Write ``scores/<sha12>/probs`` for every tile of a complete store; reuse or resume existing scores.

    ``checkpoint=None`` uses the bundled demo student. Reads only the store, never the slide.
    """
    import dask

    start = time.perf_counter()
    config = config.validated()
    store_path = Path(store_path)
    info = read_checkpoint_info(checkpoint)
    group = tile_store.require_complete(store_path)
    meta = tile_store.read_store_meta(group)
    check_store_matches(store_path, meta, info)
    key = scores_key(info.sha256)
    n_tiles, per_shard, n_shards = meta.n_tiles, meta.tiles_per_shard, meta.n_shards
    existing = list_scores(group).get(key)
    if existing and existing.get("checkpoint_sha256") == info.sha256 and tile_store.unflag_damaged_scores(store_path, key):
        existing = list_scores(tile_store.open_store(store_path)).get(key)  # rescore only the damaged shards

    if existing and existing.get("checkpoint_sha256") == info.sha256 and existing.get("complete"):
        if on_plan:
            on_plan(n_tiles, n_tiles)
        return ScoreResult(store_path, key, info.sha256, n_tiles, True, 0, time.perf_counter() - start,
                           existing.get("precision", "fp32"), existing.get("device", "cpu"),
                           existing.get("bf16_max_abs_diff"))
    device = resolve_device(config.device)  # imports torch: only when there is work

    group = tile_store.open_store(store_path, mode="r+")
    if existing and existing.get("checkpoint_sha256") == info.sha256:
        sg = group[key]  # resume an interrupted scoring with the precision it started with
        precision, diff = existing.get("precision", "fp32"), existing.get("bf16_max_abs_diff")
    else:
        precision, diff, first_probs = "fp32", None, None
        if n_tiles and config.precision != "fp32":
            scoring = scoring_model(info.path, info.sha256, device)
            first = tile_store.shard_slice(0, n_tiles, per_shard)
            # a sample of the first shard is scored both ways; the whole shard only when it is small
            sample = tile_store.read_shard(group, 0)[:config.precision_check_tiles]
            precision, diff, first_probs = choose_precision(scoring, sample, config, device)
            if first_probs is not None and (len(first_probs) != first.stop - first.start or info.ood is not None):
                first_probs = None  # (with OOD statistics shard 0 is scored again, for its distances)
        sg = _prepare_group(group, key, info, device, precision, diff)
        if first_probs is not None and not np.isfinite(first_probs).all():
            raise CheckpointError(f"{info.path}: the model produced NaN or infinite probabilities on {store_path}; "
                                  "the checkpoint is unusable (export it again)")
        if first_probs is not None:
            # the precision check already scored all of shard 0 at the chosen precision: keep it
            sg["probs"][first] = first_probs
            sg["shard_done"][0] = True

    done = np.asarray(sg["shard_done"][:n_shards]) if n_shards else np.zeros(0, bool)
    pending = [int(i) for i in np.flatnonzero(~done)]
    slices = [tile_store.shard_slice(i, n_tiles, per_shard) for i in pending]
    done_tiles = n_tiles - sum(sl.stop - sl.start for sl in slices)
    if on_plan:
        on_plan(n_tiles, done_tiles)

    n_workers = _local_workers(config, len(pending))
    torch_threads = None
    if config.scheduler == "processes":
        torch_threads = max(1, (os.cpu_count() or 1) // n_workers)
    tasks = [
        dask.delayed(score_shard, pure=False)(str(store_path), key, i, str(info.path), info.sha256, device,
                                              precision, config.batch_size, torch_threads,
                                              dask_key_name=f"score-shard-{info.sha12}-{i}")
        for i in pending
    ]
    restore = None
    if config.scheduler == "threads" and n_workers > 1 and device == "cpu":
        # tasks already run in parallel: one intra-op thread each avoids oversubscribing the cores
        import torch

        restore = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    try:
        _run_tasks(tasks, config, n_workers, progress)
    finally:
        if restore is not None:
            import torch

            torch.set_num_threads(restore)

    sg.attrs.update({"complete": True,
                     "scored": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return ScoreResult(store_path, key, info.sha256, n_tiles, False, len(pending), time.perf_counter() - start,
                       precision, device, diff)


def score_config_dict(config: ScoreConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
