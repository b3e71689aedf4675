import math

import pytest
import torch

from distill.losses import (
    MDKDConfig,
    MDKDLoss,
    channel_loss,
    cls_token_loss,
    kd_kl,
    normalize_tokens,
    response_loss,
    spatial_loss,
)
from distill.models import architecture, build_vit, block_features, init_student_from_teacher

# KL([0.75, 0.25] || [0.5, 0.5]) by hand
KL_34 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def test_identical_features_give_zero_loss():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7)
    assert channel_loss(x, x.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert spatial_loss(x, x.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cls_token_loss(x[:, 0], x[:, 0].clone(), "mse").item() == pytest.approx(0.0, abs=1e-7)
    assert cls_token_loss(x[:, 0], x[:, 0].clone(), "cosine").item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(3, 4)
    assert kd_kl(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_channel_loss_hand_value():
    # one sample, 2 patch tokens, 1 channel: softmax over tokens
    t = torch.tensor([[[math.log(3.0)], [0.0]]])  # -> p_t = [0.75, 0.25]
    s = torch.zeros(1, 2, 1)  # -> p_s = [0.5, 0.5]
    assert channel_loss(s, t, 1.0).item() == pytest.approx(KL_34, rel=1e-5)
    # tau = 2: logits doubled give the same distributions, loss scaled by tau^2
    assert channel_loss(s, 2 * t, 2.0).item() == pytest.approx(4 * KL_34, rel=1e-5)


def test_spatial_loss_hand_value_is_softmax_over_channels():
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # one token, 2 channels
    s = torch.zeros(1, 1, 2)
    assert spatial_loss(s, t, 1.0).item() == pytest.approx(KL_34, rel=1e-5)
    # the same tensor seen by the channel loss has one token per channel: softmax of one value
    assert channel_loss(s, t, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_cls_and_response_hand_values():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    assert cls_token_loss(s, t, "mse").item() == pytest.approx(1.0)
    assert cls_token_loss(s, t, "cosine").item() == pytest.approx(1.0)
    logits = torch.zeros(1, 2)
    y = torch.tensor([0])
    # alpha 0: plain CE = ln 2
    assert response_loss(logits, logits, y, alpha=0.0).item() == pytest.approx(math.log(2), rel=1e-6)
    # alpha 1, tau 1: KL([0.75, 0.25] || [0.5, 0.5])
    tl = torch.tensor([[math.log(3.0), 0.0]])
    assert response_loss(logits, tl, y, alpha=1.0, tau=1.0).item() == pytest.approx(KL_34, rel=1e-5)
    # hard variant: CE against the teacher's argmax (class 0) = ln 2
    assert response_loss(logits, tl, y, alpha=1.0, hard=True).item() == pytest.approx(math.log(2), rel=1e-6)


def test_normalize_tokens_is_non_affine_layernorm():
    x = torch.randn(2, 3, 16) * 5 + 3
    n = normalize_tokens(x)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(n.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3)


def _feats(b, n, c, depth, requires_grad):
    return [torch.randn(b, 1 + n, c, requires_grad=requires_grad) for _ in range(depth)]


def test_gradients_reach_student_only_and_width_mismatch_uses_projector():
    torch.manual_seed(0)
    cfg = MDKDConfig(block_map=[(1, 2), (2, 4)])
    loss_mod = MDKDLoss(cfg, student_dim=8, teacher_dim=16)
    s_feats = _feats(2, 4, 8, 2, True)
    t_feats = _feats(2, 4, 16, 4, True)
    s_logits = torch.randn(2, 3, requires_grad=True)
    t_logits = torch.randn(2, 3, requires_grad=True)
    total, terms = loss_mod(s_feats, t_feats, s_logits, t_logits, torch.tensor([0, 2]))
    assert set(terms) == {"spatial", "channel", "cls", "response"}
    total.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_feats)
    assert s_logits.grad is not None
    assert all(f.grad is None for f in t_feats) and t_logits.grad is None
    assert all(p.weight.grad is not None for p in loss_mod.projectors)
    assert tuple(loss_mod.projectors[0].weight.shape) == (16, 8)


def test_terms_are_switchable_and_weighted():
    torch.manual_seed(1)
    s_feats, t_feats = _feats(2, 4, 8, 3, False), _feats(2, 4, 8, 12, False)
    sl, tl, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 0])
    full = MDKDLoss(MDKDConfig(), 8, 8)
    assert all(isinstance(p, torch.nn.Identity) for p in full.projectors)  # same width: no projector
    _, t_full = full(s_feats, t_feats, sl, tl, y)
    _, t_abl = MDKDLoss(MDKDConfig(use_channel=False), 8, 8)(s_feats, t_feats, sl, tl, y)
    assert "channel" not in t_abl and t_abl["spatial"] == pytest.approx(t_full["spatial"])
    _, t_w = MDKDLoss(MDKDConfig(w_cls=3.0), 8, 8)(s_feats, t_feats, sl, tl, y)
    assert t_w["cls"] == pytest.approx(3 * t_full["cls"], rel=1e-5)


def test_feature_tap_matches_forward_and_student_init_copies_blocks():
    torch.manual_seed(0)
    teacher = build_vit(architecture("tiny", "teacher", 4, img_size=32, patch_size=16, depth=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = block_features(teacher, x)
    assert len(feats) == 4 and feats[0].shape == (2, 1 + 4, 192)
    assert torch.allclose(logits, teacher(x), atol=1e-5)
    student = build_vit(architecture("tiny", "student", 4, img_size=32, patch_size=16)).eval()
    init_student_from_teacher(student, teacher, [2, 3, 4])
    assert torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    assert torch.equal(student.blocks[2].mlp.fc2.weight, teacher.blocks[3].mlp.fc2.weight)
