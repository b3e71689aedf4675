"""Write small random-weight checkpoints in the student contract format (plumbing tests only)."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from wsi_contracts.checkpoint import write_checkpoint

PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def architecture(img_size: int = 32, depth: int = 1, embed_dim: int = 48, num_heads: int = 3,
                 num_classes: int = len(PBC_CLASSES), patch_size: int = 16) -> dict:
    return {"family": "timm-vit", "img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0, "num_classes": num_classes,
            "class_token": True, "global_pool": "token"}


def metadata(arch: dict, classes=PBC_CLASSES, suspicious=("erythroblast", "ig"), tile_size: int = 32,
             tile_mpp: float = 0.5, **extra) -> dict:
    meta = {"format": "wsi-triage-student", "format_version": "1", "architecture": arch,
            "class_names": list(classes), "suspicious_classes": list(suspicious),
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "input_size": arch["img_size"], "tile_size": tile_size, "tile_mpp": tile_mpp,
            "provenance": {"note": "random weights for tests"}}
    meta.update(extra)
    return meta


def random_checkpoint(path: Path, seed: int = 0, *, tile_size: int = 32, tile_mpp: float = 0.5,
                      img_size: int | None = None, depth: int = 1, embed_dim: int = 48, **meta_overrides) -> Path:
    """A random ViT saved as a student checkpoint; different seeds give different sha256s."""
    arch = architecture(img_size=img_size or tile_size, depth=depth, embed_dim=embed_dim)
    torch.manual_seed(seed)
    model = VisionTransformer(**{k: v for k, v in arch.items() if k != "family"})
    # a random ViT head is near-uniform; widen the logits so the class probabilities differ per tile
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    write_checkpoint(path, model.state_dict(), metadata(arch, tile_size=tile_size, tile_mpp=tile_mpp, **meta_overrides))
    return path
