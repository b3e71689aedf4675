"""The files that cross stages, one implementation each.

- :mod:`wsi_contracts.tilestore`: the per-slide tile store (zarr v3, sharded JPEG tiles, masks,
  score arrays), with its JPEG tile codec :mod:`wsi_contracts.codecs`;
- the model checkpoint (safetensors with its metadata).

Depends on neither ``wsi_pipeline`` nor ``distill``; both import it (docs/contracts.md).
"""

__version__ = "0.1.0"
