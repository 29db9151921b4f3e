"""Contrastive losses for the cross-modal grid, as modules owning their learnable temperature (and bias).

    loss = make_contrastive_loss("clip")
    value = loss(img_emb, expr_emb)          # (B, D), (B, D) -> scalar

"bleep" is BLEEP's soft-target loss on unnormalised projections; "clip" and "siglip" compare L2-normalised
embeddings with open_clip's loss classes. All run in float32 with autocast off: the logits are scaled by up to
100 (CLIP) or are raw 256-d dot products (BLEEP), where half-precision rounding alone moves them by whole units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.losses import SoftContrastiveLoss

LOSSES = ("bleep", "clip", "siglip")
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps its learned temperature so logits never exceed 100 x cosine


class BleepLoss(nn.Module):
    """SoftContrastiveLoss on the projections as they come (BLEEP does not normalise them before the loss)."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.soft = SoftContrastiveLoss(tau)

    def forward(self, img_emb: torch.Tensor, expr_emb: torch.Tensor) -> torch.Tensor:
        return self.soft(img_emb, expr_emb)


class _ScaledLoss(nn.Module):
    """Shared part of CLIP and SigLIP: a learnable log-temperature, clamped to [0, log 100] when used (CLIP
    clamps the parameter after each step; clamping in forward keeps the rule inside the module)."""

    def __init__(self, init_scale: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def scale(self) -> torch.Tensor:
        """exp of the clamped log-scale: open_clip's losses multiply the cosine logits by this value."""
        return self.logit_scale.float().clamp(0, MAX_LOGIT_SCALE).exp()


class ClipContrastiveLoss(_ScaledLoss):
    """CLIP (Radford et al. 2021): symmetric cross-entropy with one-hot targets over the batch's cosine
    similarities times a learned scale, initialised at 1 / 0.07."""

    def __init__(self):
        super().__init__(1 / 0.07)
        self.clip = ClipLoss()

    def forward(self, img_emb: torch.Tensor, expr_emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(img_emb.device.type, enabled=False):
            img = F.normalize(img_emb.float(), dim=-1)
            expr = F.normalize(expr_emb.float(), dim=-1)
            return self.clip(img, expr, self.scale())


class SigLipContrastiveLoss(_ScaledLoss):
    """SigLIP (Zhai et al. 2023): every image/expression pair is an independent binary match / no-match,
    sigmoid(scale * cosine + bias); scale starts at 10 and bias at -10, so the many negatives start near
    probability 0 instead of dominating the first steps."""

    def __init__(self):
        super().__init__(10.0)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.siglip = SigLipLoss()

    def forward(self, img_emb: torch.Tensor, expr_emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(img_emb.device.type, enabled=False):
            img = F.normalize(img_emb.float(), dim=-1)
            expr = F.normalize(expr_emb.float(), dim=-1)
            return self.siglip(img, expr, self.scale(), self.logit_bias.float())


def make_contrastive_loss(kind: str, **kw) -> nn.Module:
    """Loss module `kind` (one of LOSSES); forward(img_emb (B, D), expr_emb (B, D)) -> scalar float32 loss.
    Settings: "bleep" takes `tau`; "clip" and "siglip" take none (their temperature is learned)."""
    if kind not in LOSSES:
        raise input_error("loss", f"unknown {kind!r}; use one of {', '.join(LOSSES)}")
    allowed = {"bleep": ("tau",)}.get(kind, ())
    extra = [key for key in kw if key not in allowed]
    if extra:
        known = ", ".join(allowed) or "none"
        raise input_error("loss", f"{kind!r} takes no setting {', '.join(map(repr, extra))}; its settings: {known}")
    if kind == "bleep":
        return BleepLoss(**kw)
    if kind == "clip":
        return ClipContrastiveLoss()
    return SigLipContrastiveLoss()
