"""The per-slide tile store: one zarr v3 group, layout in ``docs/contracts.md``.

Only accepted (foreground) tiles are stored, in shards of ``tiles_per_shard`` tiles. Each shard
is written whole by one writer, its file's CRC32C and size recorded in ``shard_digest``, then
flagged in ``shard_done``; a killed run resumes from the shards not yet flagged. Every read of a
shard checks that its file exists and matches its digest, so a missing, damaged or replaced
shard is an error naming it, never fill-value tiles. Importing this module registers the JPEG
tile codec that stores written with ``codec="jpeg"`` need.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from . import __version__
from .codecs import JpegTileCodec
from .errors import ShardError, StoreError

__all__ = ['STORE_FORMAT', 'STORE_FORMAT_VERSION', 'META_KEY', 'CODECS', 'DIGEST_ALGORITHM', 'REQUIRED_NODES', 'THUMBNAIL_CHUNK', 'SlideMpp', 'GridMeta', 'StoreMeta', 'store_path', 'shard_slice', 'n_shards_for', 'checked_codecs', 'create_store', 'open_store', 'read_meta', 'read_store_meta', 'update_meta', 'pending_shards', 'write_shard', 'record_shard_digest', 'shard_file', 'read_shard', 'read_tiles', 'shard_problem', 'damaged_shards', 'check_layout', 'damaged_chunks', 'unflag_damaged_shards', 'is_complete', 'require_complete', 'PRECISIONS', 'ScoreMeta', 'scores_key', 'score_keys', 'read_score_meta', 'list_scores', 'create_scores', 'write_scores', 'complete_scores', 'unflag_damaged_scores', 'read_scores', 'read_ood']

STORE_FORMAT = "wsi-triage-tilestore"
STORE_FORMAT_VERSION = 1
META_KEY = "wsi_triage"
CODECS = ("jpeg", "lossless")
#: per-shard digest of the shard file recorded at write time (meta ``shard_digest``)
DIGEST_ALGORITHM = "crc32c"
#: nodes every tile store has; a store lacking one is damaged
REQUIRED_NODES = ("tiles", "coords", "grid", "qc/foreground", "qc/blur", "shard_done", "thumbnail", "mask")
#: side of the thumbnail's (JPEG) and the mask's chunks
THUMBNAIL_CHUNK = 1024


def store_path(out_dir: str | Path, slide_path: str | Path) -> Path:
    """``<out>/<slide-stem>.zarr``."""
    return Path(out_dir) / f"{Path(slide_path).stem}.zarr"


def shard_slice(index: int, n_tiles: int, tiles_per_shard: int) -> slice:
    """Tile indices covered by shard ``index``."""
    start = index * tiles_per_shard
    return slice(start, min(start + tiles_per_shard, n_tiles))


def n_shards_for(n_tiles: int, tiles_per_shard: int) -> int:
    return math.ceil(n_tiles / tiles_per_shard) if n_tiles else 0


# --------------------------------------------------------------------------------------------
# Typed metadata: the group attribute ``wsi_triage`` read once, checked, into frozen objects.


@dataclass(frozen=True)
class SlideMpp:
    """The slide's level-0 pixel size (um/px) and where it came from (``user``, a file tag, ...)."""

    x: float
    y: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GridMeta:
    """The tile grid in level-0 px: first cell's corner, step between cells, (rows, cols), tile extent."""

    origin: tuple[float, float]
    stride: tuple[float, float]
    shape: tuple[int, int]
    tile_level0: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class StoreMeta:
    """A tile store's attributes (docs/contracts.md section 1). ``tiler_config`` and ``foreground``
    are the tiler's own records (fresh copies, JSON values)."""

    format_version: int
    n_tiles: int
    n_shards: int
    tiles_per_shard: int
    tile_size: int
    codec: str
    complete: bool
    empty_reason: str | None
    shard_digest: str | None  # digest algorithm of the shard files; None in stores written before digests
    slide_path: str | None
    slide_fingerprint: str | None
    slide_mpp: SlideMpp | None
    slide_dimensions: tuple[int, int] | None
    tiler_config: dict[str, Any]
    tiler_config_hash: str | None
    grid: GridMeta | None
    n_grid: int
    foreground: dict[str, Any] | None
    package_version: str | None
    created: str | None

    @property
    def target_mpp(self) -> float | None:
        """um/px of the stored tiles (the tiler's ``target_mpp``), None when not recorded."""
        value = self.tiler_config.get("target_mpp")
        return float(value) if _is_number(value) else None

    @property
    def placement(self) -> str:
        """``grid`` or ``cells`` (the tiler's ``tiling``)."""
        return str(self.tiler_config.get("tiling") or "grid")


_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Fields:
    """Typed look-ups in one attribute dict; every failure is one StoreError line naming the attribute."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root, self.meta = root, meta

    def bad(self, key: str, problem: str) -> StoreError:
        return StoreError(f"{self.root}: tile store attribute '{META_KEY}.{key}' {problem} (damaged store); "
                          "delete it and rerun `wsi-triage run` (or `wsi-triage tile`) on the slide")

    def get(self, key: str, default: Any) -> Any:
        value = self.meta.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.bad(key, "is missing")
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 0) -> int:
        value = self.get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(key, f"is {value!r}, not an integer")
        if value < minimum:
            raise self.bad(key, f"is {value}, below {minimum}")
        return value

    def text(self, key: str, default: Any = _MISSING) -> str | None:
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.bad(key, f"is {value!r}, not a string")
        return value

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, f"is {value!r}, not true or false")
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any] | None:
        value = self.get(key, default)
        if value is not None and not isinstance(value, dict):
            raise self.bad(key, f"is {value!r}, not an object")
        return None if value is None else dict(value)

    def pair(self, key: str, value: Any, kind: type) -> tuple:
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
        if not ok or (kind is int and not all(float(v).is_integer() for v in value)):
            raise self.bad(key, f"is {value!r}, not a pair of {'integers' if kind is int else 'numbers'}")
        return tuple(kind(v) for v in value)


def _store_meta(root: Path, meta: dict[str, Any]) -> StoreMeta:
    f = _Fields(root, meta)
    tiler_config = f.mapping("tiler_config", {}) or {}
    n_tiles = f.integer("n_tiles")
    per_shard = f.integer("tiles_per_shard", minimum=1)
    n_shards = f.integer("n_shards")
    if n_shards != n_shards_for(n_tiles, per_shard):
        raise f.bad("n_shards", f"is {n_shards} but {n_tiles} tiles in shards of {per_shard} make "
                                f"{n_shards_for(n_tiles, per_shard)}")
    mpp = f.mapping("slide_mpp", None)
    if mpp is not None:
        x, y = f.pair("slide_mpp", [mpp.get("x"), mpp.get("y")], float)
        mpp = SlideMpp(x, y, str(mpp.get("source") or "unknown"))
    grid = f.mapping("grid", None)
    if grid is not None:
        if not {"stride", "shape"} <= set(grid):
            raise f.bad("grid", "lacks its stride or shape")
        grid = GridMeta(origin=f.pair("grid.origin", grid.get("origin", [0, 0]), float),
                        stride=f.pair("grid.stride", grid["stride"], float),
                        shape=f.pair("grid.shape", grid["shape"], int),
                        tile_level0=f.pair("grid.tile_level0", grid.get("tile_level0", grid["stride"]), float))
    dims = f.get("slide_dimensions", None)
    return StoreMeta(
        format_version=f.integer("format_version", 0),
        n_tiles=n_tiles,
        n_shards=n_shards,
        tiles_per_shard=per_shard,
        # stores written before ``tile_size`` was recorded carry it in the tiler configuration only
        tile_size=f.integer("tile_size", tiler_config.get("tile_size", _MISSING), minimum=1),
        codec=f.text("codec"),
        complete=f.flag("complete"),
        empty_reason=f.text("empty_reason", None),
        shard_digest=f.text("shard_digest", None),
        slide_path=f.text("slide_path", None),
        slide_fingerprint=f.text("slide_fingerprint", None),
        slide_mpp=mpp,
        slide_dimensions=None if dims is None else f.pair("slide_dimensions", dims, int),
        tiler_config=tiler_config,
        tiler_config_hash=f.text("tiler_config_hash", None),
        grid=grid,
        n_grid=f.integer("n_grid", 0),
        foreground=f.mapping("foreground", None),
        package_version=f.text("package_version", None),
        created=f.text("created", None),
    )


def _tile_serializer(codec: str, quality: int):
    if codec == "jpeg":
        return {"serializer": JpegTileCodec(level=quality), "compressors": None}
    if codec == "lossless":
        return {"compressors": BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")}
    raise StoreError(f"unknown tile codec {codec!r}; choose one of {', '.join(CODECS)}")


def checked_codecs() -> dict[str, Any]:
    """zarr ``compressors`` for a small array: zstd, then a CRC32C that every read of a chunk checks."""
    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}


def create_store(
    path: str | Path,
    *,
    coords: np.ndarray,
    grid: np.ndarray,
    foreground: np.ndarray,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    thumbnail_downsample: float,
    thumbnail_mpp: float,
    tile_size: int,
    tiles_per_shard: int,
    codec: str,
    jpeg_quality: int,
    meta: dict[str, Any],
    nuclei: np.ndarray | None = None,
) -> zarr.Group:
    """Create (overwriting) a store with its plan written and every tile shard still pending."""
    n = int(len(coords))
    s = max(1, min(tiles_per_shard, n)) if n else 1
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunk_n = max(n, 1)
    group.create_array(
        "tiles",
        shape=(n, tile_size, tile_size, 3),
        chunks=(1, tile_size, tile_size, 3),
        shards=(s, tile_size, tile_size, 3),
        dtype="uint8",
        fill_value=255,
        dimension_names=("tile", "y", "x", "c"),
        **_tile_serializer(codec, jpeg_quality),
    )
    crc = checked_codecs()  # small arrays: a flipped byte is a checksum error, never a wrong coordinate
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 4), chunks=(min(s, chunk_n), 4),
                       **crc)
    group.create_array("grid", data=np.asarray(grid, dtype=np.int32).reshape(n, 2), chunks=(min(s, chunk_n), 2),
                       **crc)
    qc = group.create_group("qc")
    qc.create_array("foreground", data=np.asarray(foreground, dtype=np.float32).reshape(n), chunks=(min(s, chunk_n),),
                    **crc)
    qc.create_array("blur", shape=(n,), chunks=(min(s, chunk_n),), dtype="float32", fill_value=np.nan, **crc)
    if nuclei is not None:  # nuclei found in each tile on the overview (foreground stage)
        qc.create_array("nuclei", data=np.asarray(nuclei, dtype=np.int32).reshape(n), chunks=(min(s, chunk_n),),
                        **checked_codecs())
    n_shards = n_shards_for(n, s)
    group.create_array("shard_done", shape=(max(n_shards, 1),), chunks=(1,), dtype="bool", fill_value=False, **crc)
    # (crc32c, size) of each shard file, -1 until written; beside shard_done, one chunk per shard
    group.create_array("shard_digest", shape=(max(n_shards, 1), 2), chunks=(1, 2), dtype="int64", fill_value=-1,
                       **crc)
    image_attrs = {"mpp": float(thumbnail_mpp), "downsample": float(thumbnail_downsample)}
    thumbnail = np.ascontiguousarray(thumbnail, dtype=np.uint8)
    side = int(min(THUMBNAIL_CHUNK, max(thumbnail.shape[:2])))
    with zarr.config.set({"array.write_empty_chunks": True}):
        # an overview, so JPEG q90 (5x smaller and 5x faster to write than the default zstd)
        group.create_array("thumbnail", data=thumbnail, chunks=(side, side, 3), serializer=JpegTileCodec(level=90),
                           compressors=[Crc32cCodec()]).attrs.update(image_attrs)
        group.create_array("mask", data=np.ascontiguousarray(mask, dtype=bool),
                           chunks=(side, side), **crc).attrs.update(image_attrs)
    full_meta = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "n_tiles": n,
        "n_shards": n_shards,
        "tiles_per_shard": s,
        "tile_size": int(tile_size),
        "codec": codec if codec == "lossless" else f"jpeg-q{jpeg_quality}-444",
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "empty_reason": None,
        "shard_digest": DIGEST_ALGORITHM,
        **meta,
    }
    group.attrs[META_KEY] = full_meta
    return group


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing tile store, or raise a one-line :class:`StoreError`."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such tile store")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several types for a non-store directory
        raise StoreError(f"{path}: not a zarr v3 tile store ({type(exc).__name__})") from None
    meta = group.attrs.get(META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a wsi-triage tile store (missing '{META_KEY}' attributes)")
    version = meta.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > STORE_FORMAT_VERSION:
        raise StoreError(f"{path}: tile store format {version} is newer than this wsi-triage")
    _store_meta(path, meta)  # a missing or ill-typed attribute is a one-line StoreError here, never a KeyError later
    return group


def read_meta(group: zarr.Group) -> dict[str, Any]:
    """The raw ``wsi_triage`` attribute dict (for :func:`update_meta`); readers use :func:`read_store_meta`."""
    return dict(group.attrs[META_KEY])


def read_store_meta(group: zarr.Group) -> StoreMeta:
    """The store's attributes as a checked :class:`StoreMeta`; a missing or ill-typed one is a :class:`StoreError`."""
    meta = group.attrs.get(META_KEY)
    if not isinstance(meta, dict):
        raise StoreError(f"{_store_root(group)}: not a wsi-triage tile store (missing '{META_KEY}' attributes)")
    return _store_meta(_store_root(group), meta)


def update_meta(group: zarr.Group, **fields: Any) -> None:
    meta = read_meta(group)
    meta.update(fields)
    group.attrs[META_KEY] = meta


def pending_shards(group: zarr.Group) -> list[int]:
    n_shards = read_store_meta(group).n_shards
    if n_shards == 0:
        return []
    done = np.asarray(group["shard_done"][:n_shards])
    return [int(i) for i in np.flatnonzero(~done)]


def write_shard(group: zarr.Group, index: int, tiles: np.ndarray, blur: np.ndarray) -> None:
    """Write one whole shard of tiles and its QC, record the shard file's digest, then flag it done (last).

    The tiles go through zarr's own codec pipeline (sharding codec, JPEG or blosc inside); zarr's
    local store writes the shard file in one atomic rename. benchmarks/bench_store_io.py measured a
    hand-written shard writer against it and found it not clearly faster, so there is none.
    """
    meta = read_store_meta(group)
    sl = shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    if tiles.shape[0] != sl.stop - sl.start:
        raise ValueError(f"shard {index} needs {sl.stop - sl.start} tiles, got {tiles.shape[0]}")
    array = group["tiles"]
    if isinstance(array.store, LocalStore):
        # zarr merges a write into the shard file already there, reading it first: a damaged one
        # (the reason it is rewritten) would fail its index checksum. The shard is written whole.
        shard_file(group, index).unlink(missing_ok=True)
    # Every stored tile is real data: skipping zarr's per-chunk "equals the fill value?" test
    # (on by default, and not persisted with the array) makes a shard write several times cheaper.
    with zarr.config.set({"array.write_empty_chunks": True}):
        array[sl] = tiles
    group["qc/blur"][sl] = np.asarray(blur, dtype=np.float32)
    record_shard_digest(group, index)
    group["shard_done"][index] = True
    if isinstance(array.store, LocalStore):  # a killed writer's temporary (zarr writes <key>.<uuid>.partial)
        path = shard_file(group, index)
        for stale in path.parent.glob(f"{path.name}.*.partial"):
            stale.unlink(missing_ok=True)


def record_shard_digest(group: zarr.Group, index: int) -> None:
    """Record the (crc32c, size) of shard ``index``'s file, read back from disk as written."""
    array = group["tiles"]
    if not _records_digests(group) or not isinstance(array.store, LocalStore):
        return
    data = shard_file(group, index).read_bytes()
    group["shard_digest"][index] = np.asarray((google_crc32c.value(data), len(data)), dtype=np.int64)


def read_shard(group: zarr.Group, index: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Tiles of shard ``index`` as (n, H, W, 3) uint8: all of them, or only ``rows`` (shard-relative).

    The shard file is checked first (present, digest, index CRC, every tile present), so a
    missing or damaged shard raises :class:`ShardError` instead of returning fill values; zarr's
    own pipeline then decodes the tiles asked for.
    """
    meta = read_store_meta(group)
    sl = shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    n = sl.stop - sl.start
    array = group["tiles"]
    if isinstance(array.store, LocalStore):  # no files to check otherwise: zarr's own read
        _checked_shard(group, index, n)
    try:
        if rows is None:
            return np.asarray(array[sl])
        return np.asarray(array.get_orthogonal_selection((sl.start + np.asarray(rows, dtype=np.int64),)))
    except ShardError:
        raise
    except Exception as exc:  # imagecodecs raises its own Jpeg8Error for a damaged tile (pre-digest stores)
        raise ShardError(f"{_store_root(group)}: a tile of shard {index} cannot be decoded "
                         f"({type(exc).__name__}); {_fix_hint(group)}") from None


def read_tiles(group: zarr.Group, indices) -> np.ndarray:
    """Tiles at store ``indices`` (any order), each shard checked as in :func:`read_shard`."""
    per_shard = read_store_meta(group).tiles_per_shard
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    size = int(group["tiles"].shape[1])
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for shard in np.unique(indices // per_shard) if len(indices) else []:
        where = np.flatnonzero(indices // per_shard == shard)
        out[where] = read_shard(group, int(shard), indices[where] - int(shard) * per_shard)
    return out


# --------------------------------------------------------------------------------------------
# Integrity: each shard file's (crc32c, size) is recorded in ``shard_digest`` when it is written
# and compared on every read; CRC32C runs at several GB/s, far below the JPEG decode cost.


def _records_digests(group: zarr.Group) -> bool:
    return read_store_meta(group).shard_digest == DIGEST_ALGORITHM


def _store_root(group: zarr.Group) -> Path:
    return Path(group.store.root) / group.path if isinstance(group.store, LocalStore) else Path(str(group.store))


def _fix_hint(group: zarr.Group) -> str:
    root = _store_root(group)
    slide = read_store_meta(group).slide_path or "SLIDE"
    return f"rerun `wsi-triage run {slide}` or `wsi-triage verify --repair {root}` to re-tile it from the slide"


def _checked_shard(group: zarr.Group, index: int, n: int) -> tuple[bytes, np.ndarray]:
    """The shard file's bytes and its (offset, nbytes) table, or :class:`ShardError`."""
    root = _store_root(group)
    path = shard_file(group, index)
    where = f"{root}: tile shard {index} ({path.relative_to(root)})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"{where} is missing; {_fix_hint(group)}") from None
    except OSError as exc:
        raise ShardError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if _records_digests(group):
        recorded = np.asarray(group["shard_digest"][index])
        if int(recorded[0]) < 0:
            raise ShardError(f"{where} has no recorded digest (store damaged); {_fix_hint(group)}")
        if int(recorded[1]) != len(data) or int(recorded[0]) != google_crc32c.value(data):
            raise ShardError(f"{where} does not match its recorded digest (damaged or replaced); {_fix_hint(group)}")
    per_shard = int(group["tiles"].shards[0])
    size = per_shard * 16
    if len(data) < size + 4:
        raise ShardError(f"{where} is truncated; {_fix_hint(group)}")
    index_bytes = data[len(data) - size - 4: len(data) - 4]
    if google_crc32c.value(index_bytes) != int(np.frombuffer(data[-4:], dtype="<u4")[0]):
        raise ShardError(f"{where}: shard index checksum does not match (damaged file); {_fix_hint(group)}")
    table = np.frombuffer(index_bytes, dtype="<u8").reshape(per_shard, 2)
    body = len(data) - size - 4
    for j in range(n):
        offset, nbytes = table[j]
        if offset == _EMPTY or int(offset) + int(nbytes) > body:
            raise ShardError(f"{where} lacks tile {j} (absent chunk, never scored as blank); {_fix_hint(group)}")
    return data, table


def shard_problem(group: zarr.Group, index: int) -> str | None:
    """Why shard ``index`` cannot be trusted (missing, digest mismatch, ...), or None when it checks out."""
    meta = read_store_meta(group)
    sl = shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    array = group["tiles"]
    if not isinstance(array.store, LocalStore):
        return None
    try:
        _checked_shard(group, index, sl.stop - sl.start)
    except ShardError as exc:
        return str(exc)
    return None


def damaged_shards(group: zarr.Group) -> dict[int, str]:
    """``{index: problem}`` for every shard flagged done whose file fails its checks (no decoding)."""
    n_shards = read_store_meta(group).n_shards
    if n_shards == 0:
        return {}
    done = np.asarray(group["shard_done"][:n_shards])
    out = {}
    for i in np.flatnonzero(done):
        problem = shard_problem(group, int(i))
        if problem:
            out[int(i)] = problem
    return out


def check_layout(group: zarr.Group) -> None:
    """Every node a tile store needs exists and its small arrays have all their chunks; else StoreError."""
    root = _store_root(group)
    nodes = REQUIRED_NODES + (("shard_digest",) if _records_digests(group) else ())
    n = read_store_meta(group).n_tiles
    for name in nodes:
        try:
            node = group[name]
        except (KeyError, FileNotFoundError, ValueError, TypeError):
            node = None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{root}: tile store lacks '{name}' (damaged); delete it and rerun "
                             "`wsi-triage run` (or `wsi-triage tile`) on the slide")
        if name in ("tiles", "qc/blur", "shard_done", "shard_digest") or (n == 0 and name in ("coords", "grid", "qc/foreground")):
            continue  # written shard by shard (checked per shard), or empty
        if isinstance(group.store, LocalStore) and node.nchunks_initialized != node.nchunks:
            raise StoreError(f"{root}: tile store array '{name}' lacks {node.nchunks - node.nchunks_initialized} "
                             "of its chunks (damaged); delete it and rerun `wsi-triage run` on the slide")
    for name in nodes:
        if name != "tiles" and damaged_chunks(group[name]):
            raise StoreError(f"{root}: tile store array '{name}' has a chunk that fails its checksum (damaged); "
                             "delete the store and rerun `wsi-triage run` on the slide")


def damaged_chunks(array: zarr.Array) -> list[str]:
    """Chunk files of ``array`` whose trailing CRC32C (arrays written with :func:`checked_codecs`) does not
    match; checked on the raw bytes, without decoding. Empty for arrays without a CRC codec."""
    if not isinstance(array.store, LocalStore) or not isinstance(array.metadata.codecs[-1], Crc32cCodec):
        return []
    folder = Path(array.store.root) / array.path
    bad = []
    for path in folder.rglob("*"):
        if path.name == "zarr.json" or not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
            bad.append(str(path.relative_to(folder)))
    return bad


def unflag_damaged_shards(path: str | Path) -> list[int]:
    """Mark every damaged done shard as pending again (and the store incomplete) so tiling rewrites it."""
    group = open_store(path)
    damaged = damaged_shards(group)
    if damaged:
        group = open_store(path, mode="r+")
        for i in damaged:
            group["shard_done"][i] = False
        update_meta(group, complete=False)
    return sorted(damaged)


# --------------------------------------------------------------------------------------------
# Shard files. ``tiles`` shards are standard zarr v3 sharding-codec shards (chunk bytes, then an
# index of (offset, nbytes) uint64 pairs in C order, 2^64-1 for an absent chunk, then the index's
# CRC32C); the integrity checks read that index on the raw bytes, without decoding.

_EMPTY = np.uint64(2**64 - 1)


def shard_file(group: zarr.Group, index: int) -> Path:
    """The file of tile shard ``index`` in a store on a local directory."""
    array = group["tiles"]
    key = array.metadata.encode_chunk_key((index, 0, 0, 0))
    return Path(array.store.root) / array.path / key


def is_complete(group: zarr.Group) -> bool:
    return read_store_meta(group).complete


def require_complete(path: str | Path) -> zarr.Group:
    """Open a store for reading and insist that tiling finished and that no node is missing."""
    group = open_store(path)
    if not is_complete(group):
        raise StoreError(f"{path}: tile store is incomplete (tiling was interrupted); rerun `wsi-triage tile` to resume")
    check_layout(group)
    return group


# --------------------------------------------------------------------------------------------
# Score arrays: ``scores/<sha12>/{probs, ood, shard_done}``, one group per checkpoint, chunked
# like the tile shards so each scoring task writes its own chunks, then flags its shard.

#: the precisions a score group records (``ScoreMeta.precision``)
PRECISIONS = ("fp32", "bf16")


def scores_key(sha256: str) -> str:
    """``scores/<sha12>``: the group holding one checkpoint's scores."""
    return f"scores/{sha256[:12]}"


@dataclass(frozen=True)
class ScoreMeta:
    """A score group's attributes (docs/contracts.md section 1): which checkpoint scored the tiles, how, and
    whether every shard is done. ``checkpoint_metadata`` and ``ood`` are the checkpoint's own records (fresh
    copies, JSON values). Stores written by earlier versions may lack the fields that have a default."""

    checkpoint_sha256: str
    class_names: tuple[str, ...]  # order of the ``probs`` columns
    suspicious_classes: tuple[str, ...]  # summed into a tile's suspicion
    complete: bool = False  # every shard scored; readers use only complete scores
    checkpoint_path: str | None = None
    checkpoint_metadata: dict[str, Any] | None = None
    precision: str | None = None  # fp32 | bf16; None: not recorded
    bf16_max_abs_diff: float | None = None  # largest bf16 vs fp32 probability difference measured, or None
    ood: dict[str, Any] | None = None  # the checkpoint's ``ood`` entry; None: no ``ood`` array
    device: str | None = None
    scored: str | None = None  # ISO time the scores were completed

    @property
    def key(self) -> str:
        """``scores/<sha12>``: the group these attributes belong to."""
        return scores_key(self.checkpoint_sha256)

    @property
    def ood_threshold(self) -> float | None:
        """The checkpoint's out-of-domain distance threshold; None without OOD statistics."""
        return float(self.ood["threshold"]) if self.ood else None

    def as_attrs(self) -> dict[str, Any]:
        """The group attributes as stored: the names and JSON types of docs/contracts.md."""
        return {
            "class_names": list(self.class_names),
            "suspicious_classes": list(self.suspicious_classes),
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_metadata": self.checkpoint_metadata,
            "precision": self.precision,
            "bf16_max_abs_diff": self.bf16_max_abs_diff,
            "ood": self.ood,
            "device": self.device,
            "complete": self.complete,
            "scored": self.scored,
        }


class _ScoreFields(_Fields):
    """Typed look-ups in one score group's attributes; every failure is one StoreError line naming it."""

    def __init__(self, root: Path, key: str, attrs: dict[str, Any]):
        super().__init__(root, attrs)
        self.key = key

    def bad(self, key: str, problem: str) -> StoreError:
        return StoreError(f"{self.root}: score attribute '{self.key}.{key}' {problem} (damaged scores); rerun "
                          "`wsi-triage score` (or `run`) with that checkpoint to score the tiles again")

    def names(self, key: str) -> tuple[str, ...]:
        value = self.get(key, _MISSING)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.bad(key, f"is {value!r}, not a list of class names")
        return tuple(value)

    def number(self, key: str) -> float | None:
        value = self.get(key, None)
        if value is not None and not _is_number(value):
            raise self.bad(key, f"is {value!r}, not a number")
        return None if value is None else float(value)


def _score_meta(root: Path, key: str, attrs: dict[str, Any]) -> ScoreMeta:
    f = _ScoreFields(root, key, attrs)
    sha = f.get("checkpoint_sha256", _MISSING)
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise f.bad("checkpoint_sha256", f"is {sha!r}, not a sha256 (64 lowercase hex digits)")
    if scores_key(sha) != key:
        raise f.bad("checkpoint_sha256", f"is {sha[:12]}..., not the checkpoint of {key}")
    classes = f.names("class_names")
    if not classes:
        raise f.bad("class_names", "is empty")
    suspicious = f.names("suspicious_classes")
    unknown = [c for c in suspicious if c not in classes]
    if unknown:
        raise f.bad("suspicious_classes", f"names {', '.join(map(repr, unknown))}, not in class_names")
    precision = f.text("precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise f.bad("precision", f"is {precision!r}, not {' or '.join(PRECISIONS)}")
    ood = f.mapping("ood", None)
    if ood and not _is_number(ood.get("threshold")):
        raise f.bad("ood.threshold", f"is {ood.get('threshold')!r}, not a number")
    return ScoreMeta(
        checkpoint_sha256=sha,
        class_names=classes,
        suspicious_classes=suspicious,
        complete=f.flag("complete"),
        checkpoint_path=f.text("checkpoint_path", None),
        checkpoint_metadata=f.mapping("checkpoint_metadata", None),
        precision=precision,
        bf16_max_abs_diff=f.number("bf16_max_abs_diff"),
        ood=ood,
        device=f.text("device", None),
        scored=f.text("scored", None),
    )


def score_keys(group: zarr.Group) -> list[str]:
    """``scores/<sha12>`` of every score group in the store (attributes unread)."""
    if "scores" not in group:
        return []
    return sorted(f"scores/{name}" for name, _ in group["scores"].groups())


def read_score_meta(group: zarr.Group, key: str) -> ScoreMeta:
    """The attributes of score group ``key`` as a checked :class:`ScoreMeta`; a missing group, or a missing or
    ill-typed attribute, is a one-line :class:`StoreError`."""
    name = key.split("/", 1)[-1]
    if "scores" not in group or name not in group["scores"]:
        raise StoreError(f"{_store_root(group)}: no scores {key}; run `wsi-triage score`")
    return _score_meta(_store_root(group), key, dict(group["scores"][name].attrs))


def list_scores(group: zarr.Group) -> dict[str, ScoreMeta]:
    """``{"scores/<sha12>": ScoreMeta}`` for every score group in the store (each checked)."""
    return {key: read_score_meta(group, key) for key in score_keys(group)}


def create_scores(group: zarr.Group, meta: ScoreMeta) -> zarr.Group:
    """(Re)create the score group ``meta.key`` with every shard pending: ``probs`` (N, K), ``shard_done``, and
    ``ood`` (N,) when the checkpoint has OOD statistics; its attributes are ``meta`` with ``complete = False``,
    checked as :func:`read_score_meta` checks them (no writer records scores its readers refuse)."""
    store = read_store_meta(group)
    root, key = _store_root(group), meta.key
    attrs = replace(meta, complete=False).as_attrs()
    _score_meta(root, key, attrs)
    sub = group.require_group("scores")
    name = key.split("/", 1)[1]
    if name in sub:
        del sub[name]
    sg = sub.create_group(name, attributes=attrs)  # written with the group: never a group without them
    per_shard = max(1, store.tiles_per_shard)
    n_classes = len(meta.class_names)
    crc = checked_codecs()  # a flipped byte in a score is a checksum error, never a changed score
    sg.create_array("probs", shape=(store.n_tiles, n_classes), chunks=(per_shard, n_classes),
                    dtype="float32", fill_value=np.nan, dimension_names=("tile", "class"), **crc)
    sg.create_array("shard_done", shape=(max(store.n_shards, 1),), chunks=(1,), dtype="bool", fill_value=False,
                    **crc)
    if meta.ood is not None:  # out-of-domain distance per tile, same shards and markers
        sg.create_array("ood", shape=(store.n_tiles,), chunks=(per_shard,), dtype="float32", fill_value=np.nan,
                        dimension_names=("tile",), **crc)
    return sg


def complete_scores(group: zarr.Group, key: str) -> ScoreMeta:
    """Every shard of ``key`` is scored: mark its scores complete, with the time (readers use only complete
    scores). ``group`` is opened for writing."""
    read_score_meta(group, key)  # a damaged group is not marked complete
    group[key].attrs.update({"complete": True,
                             "scored": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return read_score_meta(group, key)


def write_scores(group: zarr.Group, key: str, index: int, probs: np.ndarray, ood: np.ndarray | None = None) -> None:
    """Write shard ``index``'s rows of ``probs`` (and ``ood`` when the group has it), then flag the shard done."""
    meta = read_store_meta(group)
    sl = shard_slice(index, meta.n_tiles, meta.tiles_per_shard)
    scores = group[key]
    scores["probs"][sl] = probs
    if ood is not None and "ood" in scores:
        scores["ood"][sl] = ood
    scores["shard_done"][index] = True


def unflag_damaged_scores(path: str | Path, key: str) -> list[int]:
    """Shards whose ``probs``/``ood``/``shard_done`` chunk fails its checksum: marked pending again (and the
    scores incomplete) so that scoring redoes exactly those."""
    group = open_store(path)
    sg = group[key]
    bad = set()
    for name in ("probs", "shard_done", *(("ood",) if "ood" in sg else ())):
        try:
            array = sg[name]
        except KeyError:
            return []
        for chunk in damaged_chunks(array):
            bad.add(int(Path(chunk).parts[1]))  # chunk key c/<shard>[/0]
    if not bad:
        return []
    sg = open_store(path, mode="r+")[key]
    n_shards = read_store_meta(group).n_shards
    for i in sorted(bad):
        if i < max(n_shards, 1):
            sg["shard_done"][i] = False
    sg.attrs["complete"] = False
    return sorted(bad)


def read_scores(group: zarr.Group, sha256: str | None = None) -> tuple[np.ndarray, ScoreMeta]:
    """Complete probabilities (N, K) and their attributes; ``sha256=None`` picks the only (or latest) one."""
    if sha256 is not None:
        key = scores_key(sha256)
        meta = read_score_meta(group, key) if key in score_keys(group) else None
        if meta is None or not meta.complete or meta.checkpoint_sha256 != sha256:
            raise StoreError(f"{group.store}: no complete scores for checkpoint {sha256[:12]}; run `wsi-triage score`")
    else:
        available = [m for m in list_scores(group).values() if m.complete]
        if not available:
            raise StoreError(f"{group.store}: store has no complete scores; run `wsi-triage score` first")
        meta = max(available, key=lambda m: m.scored or "")
    key = meta.key
    if damaged_chunks(group[key]["probs"]):
        raise StoreError(f"{_store_root(group)}: {key}/probs has a chunk that fails its checksum "
                         "(damaged); rerun `wsi-triage score` (or `run`) to rescore the damaged shards")
    return np.asarray(group[key]["probs"][:]), meta


def read_ood(group: zarr.Group, meta: ScoreMeta) -> tuple[np.ndarray, float] | None:
    """The per-tile OOD distances of complete scores and their threshold; None when the checkpoint had no
    OOD statistics (or the scores predate them)."""
    key = meta.key
    if not meta.ood or "ood" not in group[key]:
        return None
    if damaged_chunks(group[key]["ood"]):
        raise StoreError(f"{_store_root(group)}: {key}/ood has a chunk that fails its checksum "
                         "(damaged); rerun `wsi-triage score` (or `run`) to rescore the damaged shards")
    return np.asarray(group[key]["ood"][:]), meta.ood_threshold
