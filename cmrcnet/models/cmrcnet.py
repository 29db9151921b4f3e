"""CMRCNet (Liu et al.): BLEEP's contrastive model with a ViT-B/32 trained from scratch plus a cross-modal
mask-reconstruction branch that rebuilds the image embedding from masked image tokens and gene tokens.

Why the branch helps: to fill in masked image features the tokens must carry information that the gene
tokens can complete, which ties local image features to expression beyond the single pooled CLS vector.
The branch is used only in training; retrieval uses `embed_image` / `embed_expression` as in BLEEP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.bleep import BLEEP
from cmrcnet.models.losses import ReconstructionLoss
from cmrcnet.models.registry import register_model

RECON_LOSSES = ("mse", "cosine", "none")
RECON_TARGETS = ("image", "expression")


def random_feature_mask(x: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero exactly round(rate * T * D) entries of each sample's (T, D) features, chosen uniformly at random.

    Masking single features rather than whole tokens follows the paper ("random feature masking"); an
    exact count per sample makes the rate a property of every sample, not only of the average."""
    n = x[0].numel()
    k = round(rate * n)
    if k == 0:
        return x
    scores = torch.rand(x.shape[0], n, device=x.device, generator=generator)
    drop = scores.topk(k, dim=1).indices
    keep = torch.ones(x.shape[0], n, device=x.device, dtype=x.dtype).scatter_(1, drop, 0)
    return x * keep.view_as(x)


class SNNEncoder(nn.Sequential):
    """Self-normalising network (Klambauer et al.): Linear + SELU + AlphaDropout blocks. SELU keeps
    activations near zero mean / unit variance through depth on wide tabular input such as expression,
    given LeCun-normal weights; AlphaDropout drops without breaking that normalisation."""

    def __init__(self, in_dim: int, dims: list[int], dropout: float = 0.25):
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.Linear(in_dim, dim), nn.SELU(), nn.AlphaDropout(dropout)]
            in_dim = dim
        super().__init__(*layers)
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)


class FusionBlock(nn.Module):
    """Pre-LN Transformer block (self-attention + MLP) ending in a residual cross-attention back to the
    (masked) image features, so every block re-reads the image side while fusing in gene information."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + self.cross(self.norm(x), image, image, need_weights=False)[0]


@register_model("cmrcnet")
class CMRCNet(BLEEP):
    """Loss = log(1 + L_con) + log(1 + L_rec); with recon_loss="none" only log(1 + L_con) (Table 5's `none`).

    The reconstruction target is detached by default (`detach_target`): the stop-gradient keeps the branch
    from pulling the contrastive embedding toward whatever is easiest to reconstruct (in the limit a
    constant, i.e. collapse), so the embedding is shaped by the contrastive loss and the encoder tokens by
    the reconstruction.
    """

    def __init__(self, n_genes: int, *, encoder: str = "vit_base_patch32_224", encoder_kwargs: dict | None = None,
                 pretrained_path: str | None = None, embed_dim: int = 256, dropout: float = 0.1,
                 tau: float = 1.0, input_size: int | None = None, mask_rate: float = 0.5,
                 recon_loss: str = "mse", recon_target: str = "image", detach_target: bool = True,
                 n_gene_tokens: int = 8, snn_hidden: int = 1024, snn_dropout: float = 0.25,
                 cross_heads: int = 4, fusion_heads: int = 8, n_fusion_blocks: int = 2,
                 fusion_mlp_ratio: float = 4.0):
        super().__init__(n_genes, encoder=encoder, encoder_kwargs=encoder_kwargs, pretrained_path=pretrained_path,
                         embed_dim=embed_dim, dropout=dropout, tau=tau, input_size=input_size)
        if recon_loss not in RECON_LOSSES:
            raise input_error("recon_loss", f"unknown {recon_loss!r}; use one of {', '.join(RECON_LOSSES)}")
        if recon_target not in RECON_TARGETS:
            raise input_error("recon_target", f"unknown {recon_target!r}; use one of {', '.join(RECON_TARGETS)}")
        if not 0 <= mask_rate < 1:
            raise input_error("mask_rate", f"must be in [0, 1), got {mask_rate!r}")
        for key, heads in (("cross_heads", cross_heads), ("fusion_heads", fusion_heads)):
            if embed_dim % heads:
                raise input_error(key, f"{heads} heads do not divide embed_dim {embed_dim}")
        self.mask_rate = mask_rate
        self.recon_target = recon_target
        self.detach_target = detach_target
        self.n_gene_tokens = n_gene_tokens
        self.recon_criterion = None
        if recon_loss == "none":  # no branch at all: no unused parameters, the `none` ablation exactly
            return
        self.recon_criterion = ReconstructionLoss(recon_loss)
        self.token_proj = nn.Linear(self.image_encoder.num_features, embed_dim)
        self.gene_encoder = SNNEncoder(n_genes, [snn_hidden, n_gene_tokens * embed_dim], snn_dropout)
        self.gene_cross = nn.MultiheadAttention(embed_dim, cross_heads, dropout=dropout, batch_first=True)
        self.fusion = nn.ModuleList(FusionBlock(embed_dim, fusion_heads, fusion_mlp_ratio, dropout)
                                    for _ in range(n_fusion_blocks))
        self.recon_norm = nn.LayerNorm(embed_dim)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """Embedding (B, D) rebuilt from the image tokens (masked in training) and the gene tokens."""
        image = self.token_proj(tokens)
        if self.training and self.mask_rate > 0:
            image = random_feature_mask(image, self.mask_rate)
        genes = self.gene_encoder(expr).view(expr.shape[0], self.n_gene_tokens, -1)
        x = self.gene_cross(image, genes, genes, need_weights=False)[0]
        for block in self.fusion:
            x = block(x, image)
        return self.recon_norm(x).mean(dim=1)

    def forward(self, batch: dict) -> dict:
        img_emb, tokens = self.image_features(batch["image"])
        expr_emb = self.expression_head(batch["expr"])
        loss_con = self.contrastive(img_emb, expr_emb)
        if self.recon_criterion is None:
            return {"loss": torch.log1p(loss_con), "loss_con": loss_con}
        target = img_emb if self.recon_target == "image" else expr_emb
        if self.detach_target:
            target = target.detach()
        loss_rec = self.recon_criterion(self.reconstruct(tokens, batch["expr"]), target)
        return {"loss": torch.log1p(loss_con) + torch.log1p(loss_rec), "loss_con": loss_con, "loss_rec": loss_rec}
