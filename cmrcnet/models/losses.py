"""Losses as small modules (as in open_clip), computed in float32 even under autocast: with tau = 1 the
logits are raw dot products of 256-d LayerNorm outputs (magnitude ~256), where bfloat16 rounding alone
would move them by about one unit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import input_error


class SoftContrastiveLoss(nn.Module):
    """BLEEP/CMRCNet contrastive loss with soft targets.

    logits = expr @ img.T / tau; targets = softmax((img @ img.T + expr @ expr.T) / 2 * tau) row-wise;
    loss = mean of the soft cross-entropy over rows (expression -> image) and over columns (image -> expression).
    Why soft targets: neighbouring spots often look and express alike, so a one-hot target would punish
    matching a near-duplicate; the targets give such pairs credit in proportion to their similarity.
    The paper writes `* tau` in the targets (BLEEP's code divides); with the paper's tau = 1 both agree.
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        if not tau > 0:
            raise input_error("tau", f"must be positive, got {tau!r}")
        self.tau = tau

    def forward(self, img_emb: torch.Tensor, expr_emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(img_emb.device.type, enabled=False):
            img, expr = img_emb.float(), expr_emb.float()
            logits = expr @ img.T / self.tau
            targets = F.softmax((img @ img.T + expr @ expr.T) / 2 * self.tau, dim=-1)
            expr_to_img = F.cross_entropy(logits, targets)
            img_to_expr = F.cross_entropy(logits.T, targets.T)
            return (expr_to_img + img_to_expr) / 2


class ReconstructionLoss(nn.Module):
    """Distance between reconstructed and target embeddings: "mse" (mean squared error over all entries)
    or "cosine" (1 - cosine similarity, averaged over the batch; ignores scale)."""

    KINDS = ("mse", "cosine")

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in self.KINDS:
            raise input_error("recon_loss", f"unknown kind {kind!r}; use one of {', '.join(self.KINDS)}")
        self.kind = kind

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            if self.kind == "mse":
                return F.mse_loss(pred, target)
            return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
