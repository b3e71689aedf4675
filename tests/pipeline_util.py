"""Small slides and stores for the scorer/aggregate/run/batch tests (made on the fly, no fixtures on disk)."""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.synth import SHIPPED_CELLS, SynthConfig, blob_field, synthesize  # noqa: F401 (blob_field: for the tests)
from wsi_pipeline.tiling import TilerConfig, tile_slide


def tiled_store(slide: Path, out: Path, tile_size: int = 32, mpp: float = 0.5, stain: str = "pap") -> Path:
    """Tile ``slide`` (a blob field, mpp given) the way ``run`` would for a checkpoint of that geometry."""
    result = tile_slide(slide, out, TilerConfig(target_mpp=mpp, tile_size=tile_size, stain=stain), mpp=mpp)
    assert result.n_tiles > 0
    return result.path


def cells_dir(shared: Path | None) -> Path | None:
    """Cell images for synthetic smears: the shipped held-out cells, else the shared PBC set."""
    if SHIPPED_CELLS.is_dir() and any(SHIPPED_CELLS.iterdir()):
        return None  # synth's default
    if shared is not None and (shared / "pbc").is_dir():
        return shared / "pbc"
    return Path("__missing__")


def smear(path: Path, cells: Path | None, *, fraction: float, seed: int = 1, size: int = 1536,
          mpp: float = 0.25, regions: int | None = None):
    return synthesize(path, SynthConfig(width=size, height=size, mpp=mpp, seed=seed, cells=cells,
                                        fraction=fraction, regions=regions))
