import pytest
import torch
from safetensors.torch import save_file

from distill.errors import DistillError
from distill.models import architecture, build_vit, init_from_timm_weights


class NotTensors:
    """An arbitrary object: a weights-only load must refuse it instead of unpickling it."""


def test_teacher_init_from_local_timm_weights_resamples_and_skips_head(tmp_path):
    torch.manual_seed(0)
    src = build_vit(architecture("tiny", "teacher", 1000, img_size=32, patch_size=16, depth=2))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_vit(architecture("tiny", "teacher", 8, img_size=64, patch_size=16, depth=2))
    info = init_from_timm_weights(dst, path)
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert dst.pos_embed.shape == (1, 1 + 16, 192)  # resampled from a 2x2 to a 4x4 grid
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # class-token position kept
    assert set(info["missing"]) == {"head.weight", "head.bias"}  # 1000 -> 8 classes: head not loaded
    assert dst(torch.zeros(1, 3, 64, 64)).shape == (1, 8)


def test_teacher_init_refuses_pickled_objects_and_other_widths(tmp_path):
    pk = tmp_path / "w.pth"
    torch.save({"obj": NotTensors()}, pk)
    dst = build_vit(architecture("tiny", "teacher", 8, img_size=32, patch_size=16, depth=2))
    with pytest.raises(DistillError, match="weights_only=True"):
        init_from_timm_weights(dst, pk)
    wide = build_vit(architecture("small", "teacher", 8, img_size=32, patch_size=16, depth=2))
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(DistillError, match="has shape"):
        init_from_timm_weights(dst, path)



def test_block_features_chain_through_the_blocks_and_give_the_logits():
    """Each tap is the next block applied to the previous tap, and the head on the normed last
    tap is ``model(x)`` (bit-equal to the hand-written tap it replaced: commit a43ea4e)."""
    import torch
    from distill.models import block_features

    torch.manual_seed(0)
    model = build_vit(architecture("tiny", "teacher", 5, img_size=48, patch_size=16, depth=4)).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        logits, feats = block_features(model, x)
        assert len(feats) == 4 and feats[0].shape == (3, 1 + 9, 192)
        for i in range(1, 4):
            assert torch.equal(model.blocks[i](feats[i - 1]), feats[i])
        assert torch.equal(model.forward_head(model.norm(feats[-1])), logits)
        assert torch.allclose(logits, model(x), atol=1e-6)
