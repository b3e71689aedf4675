"""ViT teacher and student models (timm ``VisionTransformer``, never ``pretrained=True``).

Presets fix the width (and heads); depth is 12 for the teacher and 3 for the student as in
the paper. Image and patch size are free. ``block_features`` is the feature tap (timm's
``forward_intermediates``): it returns the logits and every block's tokens (class token first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from .errors import DistillError

__all__ = ["architecture", "build_vit", "block_features", "count_params", "init_from_timm_weights", "init_student_from_teacher", "DEFAULT_IMG"]

# width, heads, teacher depth, student depth
PRESETS: dict[str, dict[str, int]] = {
    "paper": {"embed_dim": 768, "num_heads": 12, "teacher_depth": 12, "student_depth": 3},
    "small": {"embed_dim": 384, "num_heads": 6, "teacher_depth": 12, "student_depth": 3},
    "tiny": {"embed_dim": 192, "num_heads": 3, "teacher_depth": 12, "student_depth": 3},
}
DEFAULT_IMG = {"paper": 224, "small": 224, "tiny": 128}


def architecture(
    preset: str,
    role: str,
    num_classes: int,
    img_size: int | None = None,
    patch_size: int = 16,
    depth: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``VisionTransformer`` (plus ``family``) for a preset and role.

    ``role`` is ``"teacher"`` or ``"student"``; ``depth`` overrides the preset's depth.
    """
    if preset not in PRESETS:
        raise DistillError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if role not in ("teacher", "student"):
        raise DistillError(f"unknown model role {role!r}; choose teacher or student")
    p = PRESETS[preset]
    img = int(img_size or DEFAULT_IMG[preset])
    if img % patch_size:
        raise DistillError(f"img_size {img} is not a multiple of patch_size {patch_size}")
    return {
        "family": "timm-vit",
        "img_size": img,
        "patch_size": int(patch_size),
        "embed_dim": p["embed_dim"],
        "depth": int(depth or p[f"{role}_depth"]),
        "num_heads": p["num_heads"],
        "mlp_ratio": 4.0,
        "num_classes": int(num_classes),
        "class_token": True,
        "global_pool": "token",
    }


def build_vit(arch: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised timm ViT from an ``architecture`` dict."""
    kwargs = {k: v for k, v in arch.items() if k != "family"}
    if arch.get("family", "timm-vit") != "timm-vit":
        raise DistillError(f"unsupported architecture family {arch.get('family')!r}")
    try:
        return VisionTransformer(**kwargs)
    except TypeError as e:
        raise DistillError(f"bad architecture fields: {e}") from None


def block_features(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the output tokens of every block, (B, 1 + N, C) each, before the final norm,
    through timm's public ``forward_intermediates`` (the logits equal ``model(x)``)."""
    final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    feats = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
    return model.forward_head(final), feats


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DistillError(f"{path}: weight file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise DistillError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DistillError(f"{path}: cannot read weights safely (weights_only=True): {str(e).splitlines()[0]}") from None
    del head
    for key in ("model", "state_dict", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def init_from_timm_weights(model: VisionTransformer, path: str | Path) -> dict[str, list[str]]:
    """Load a local timm-compatible ViT weight file (``.safetensors`` or a tensor-only ``.pth``).

    Position embeddings and patch-embedding kernels are resampled to this model's grid and
    patch size; the head is skipped when the class count differs. Returns the missing and
    unexpected keys. Widths must match.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    path = Path(path)
    sd = _read_state_dict(path)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            continue
        tgt = own[k]
        if k == "pos_embed" and v.shape != tgt.shape:
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens)
        elif k == "patch_embed.proj.weight" and v.shape != tgt.shape:
            v = resample_patch_embed(v, list(tgt.shape[-2:]))
        if v.shape != tgt.shape:
            if k.startswith("head."):
                continue
            raise DistillError(f"{path}: tensor {k} has shape {tuple(v.shape)}, model needs {tuple(tgt.shape)}")
        out[k] = v
    if not out:
        raise DistillError(f"{path}: no tensor matches a timm VisionTransformer of this width")
    res = model.load_state_dict(out, strict=False)
    return {"missing": list(res.missing_keys), "unexpected": [k for k in sd if k not in own]}


def init_student_from_teacher(student: VisionTransformer, teacher: VisionTransformer, blocks: list[int]) -> None:
    """Copy the teacher's embeddings, final norm and head, and teacher blocks ``blocks``
    (1-based, one per student block) into the student. Widths must match."""
    if student.embed_dim != teacher.embed_dim:
        raise DistillError(
            f"student width {student.embed_dim} != teacher width {teacher.embed_dim}: cannot copy teacher blocks"
        )
    if len(blocks) != len(student.blocks):
        raise DistillError(f"init blocks {blocks} must name one teacher block per student block ({len(student.blocks)})")
    for b in blocks:
        if not 1 <= b <= len(teacher.blocks):
            raise DistillError(f"teacher block {b} out of range 1..{len(teacher.blocks)}")
    with torch.no_grad():
        for name in ("cls_token", "pos_embed"):
            getattr(student, name).copy_(getattr(teacher, name))
        student.patch_embed.load_state_dict(teacher.patch_embed.state_dict())
        student.norm.load_state_dict(teacher.norm.state_dict())
        if student.head.weight.shape == teacher.head.weight.shape:
            student.head.load_state_dict(teacher.head.state_dict())
        for i, b in enumerate(blocks):
            student.blocks[i].load_state_dict(teacher.blocks[b - 1].state_dict())
