"""Distillation losses: MDKD (spatial + channel + class-token feature terms, response term)
and Hinton KD.

Token tensors are (B, 1 + N, C): class token first, then N patch tokens. Teacher inputs are
always detached, so gradients reach the student (and its projectors) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MDKDConfig", "MDKDLoss", "channel_loss", "cls_token_loss", "kd_kl", "normalize_tokens", "response_loss",
           "spatial_loss"]


def normalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm over channels: ``(x - mean_c) / sqrt(var_c + 1e-5)``.

    Puts teacher and student tokens on the same scale before the feature losses.
    """
    return F.layer_norm(x, x.shape[-1:])


def channel_loss(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al. 2021, CWD) on patch tokens (B, N, C).

    For each sample b and channel c: ``p_t = softmax_n(t[b, :, c] / tau)``,
    ``p_s = softmax_n(s[b, :, c] / tau)``;
    ``loss = tau^2 * mean_{b,c} sum_n p_t[n] * (log p_t[n] - log p_s[n])``
    i.e. KL(teacher || student) of each channel's distribution over patch positions.
    """
    t = t.detach().float()
    s = s.float()
    log_pt = F.log_softmax(t / tau, dim=1)
    log_ps = F.log_softmax(s / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # (B, C)
    return kl.mean() * tau**2


def spatial_loss(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Spatial (token-wise) distillation on patch tokens (B, N, C).

    For each sample b and patch token n: ``p_t = softmax_c(t[b, n, :] / tau)``, same for s;
    ``loss = tau^2 * mean_{b,n} sum_c p_t[c] * (log p_t[c] - log p_s[c])``.
    """
    t = t.detach().float()
    s = s.float()
    log_pt = F.log_softmax(t / tau, dim=-1)
    log_ps = F.log_softmax(s / tau, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # (B, N)
    return kl.mean() * tau**2


def cls_token_loss(s: torch.Tensor, t: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Class-token distance between (projected) student and teacher class tokens (B, C).

    ``mse``: ``mean_{b,c} (s - t)^2``; ``cosine``: ``mean_b (1 - cos(s_b, t_b))``.
    """
    t = t.detach().float()
    s = s.float()
    if distance == "mse":
        return F.mse_loss(s, t)
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"unknown class-token distance {distance!r} (mse or cosine)")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD term: ``tau^2 * mean_b KL(softmax(t / tau) || softmax(s / tau))``."""
    log_pt = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * tau**2


def response_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    tau: float = 4.0,
    hard: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Response distillation aligned with the targets.

    Soft (default): ``(1 - alpha) * CE(s, y) + alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau))``.
    Hard (``hard=True``): ``(1 - alpha) * CE(s, y) + alpha * CE(s, argmax t)``.
    """
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if hard:
        distill = F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(-1))
    else:
        distill = kd_kl(student_logits, teacher_logits, tau)
    return (1.0 - alpha) * ce + alpha * distill


@dataclass
class MDKDConfig:
    """All MDKD choices; the defaults are the documented ones (docs/results.md)."""

    # (student block, teacher block), 1-based
    block_map: list[tuple[int, int]] = field(default_factory=lambda: [(1, 4), (2, 8), (3, 12)])
    use_spatial: bool = True
    use_channel: bool = True
    use_cls: bool = True
    use_response: bool = True
    w_spatial: float = 1.0
    w_channel: float = 1.0
    w_cls: float = 1.0
    tau_spatial: float = 1.0
    tau_channel: float = 4.0
    cls_distance: str = "mse"
    normalize: bool = True
    alpha: float = 0.5
    tau: float = 4.0
    hard_labels: bool = False


class MDKDLoss(nn.Module):
    """Multi-dimensional KD. Holds one linear projector (student width -> teacher width) per
    mapped layer when the widths differ (training only; never exported)."""

    def __init__(self, cfg: MDKDConfig, student_dim: int, teacher_dim: int, label_smoothing: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.label_smoothing = label_smoothing
        make = (lambda: nn.Linear(student_dim, teacher_dim)) if student_dim != teacher_dim else nn.Identity
        self.projectors = nn.ModuleList([make() for _ in cfg.block_map])

    def forward(
        self,
        s_feats: list[torch.Tensor],
        t_feats: list[torch.Tensor],
        s_logits: torch.Tensor,
        t_logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        feat_terms = cfg.use_spatial or cfg.use_channel or cfg.use_cls
        if feat_terms:
            sp = ch = cl = 0.0
            for proj, (si, ti) in zip(self.projectors, cfg.block_map):
                if not (1 <= si <= len(s_feats) and 1 <= ti <= len(t_feats)):
                    raise ValueError(f"block map ({si}, {ti}) outside student 1..{len(s_feats)} / teacher 1..{len(t_feats)}")
                s = proj(s_feats[si - 1].float())
                t = t_feats[ti - 1].detach().float()
                if cfg.normalize:
                    s, t = normalize_tokens(s), normalize_tokens(t)
                if cfg.use_spatial:
                    sp = sp + spatial_loss(s[:, 1:], t[:, 1:], cfg.tau_spatial)
                if cfg.use_channel:
                    ch = ch + channel_loss(s[:, 1:], t[:, 1:], cfg.tau_channel)
                if cfg.use_cls:
                    cl = cl + cls_token_loss(s[:, 0], t[:, 0], cfg.cls_distance)
            n = len(cfg.block_map)
            if cfg.use_spatial:
                terms["spatial"] = cfg.w_spatial * sp / n
            if cfg.use_channel:
                terms["channel"] = cfg.w_channel * ch / n
            if cfg.use_cls:
                terms["cls"] = cfg.w_cls * cl / n
        if cfg.use_response:
            terms["response"] = response_loss(
                s_logits, t_logits, labels, cfg.alpha, cfg.tau, cfg.hard_labels, self.label_smoothing
            )
        else:
            terms["ce"] = F.cross_entropy(s_logits.float(), labels, label_smoothing=self.label_smoothing)
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}
