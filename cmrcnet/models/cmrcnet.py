"""CMRCNet (Liu et al.): BLEEP's contrastive model with a ViT-B/32 trained from scratch plus a cross-modal
mask-reconstruction branch that rebuilds the image embedding from masked image tokens and gene tokens.

Why the branch helps (the paper's argument): to fill in masked image features the tokens must carry information
that the gene tokens can complete, which ties local image features to expression beyond the pooled embedding.
Every statement of the paper this module follows is listed, with its test, in docs/fidelity.md.
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


class ResidualCrossAttention(nn.Module):
    """The paper's Fig. 8: x W_V' + softmax(x W_Q (G W_K)^T / sqrt(d)) G W_V.

    Queries come from the fused (query-side) features x, keys and values from the other modality's tokens G,
    and a value projection of x itself is added back (not the identity), so the output is never made of the
    other modality alone: "it prevents the information from overly favoring" one modality."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.value = nn.Linear(dim, dim)  # W_V'

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.value(x) + self.attn(x, context, context, need_weights=False)[0]


class FusionBlock(nn.Module):
    """The paper's cross-modal fusion module: a pre-LN Transformer block (LayerNorm, multi-head self-attention,
    MLP) on the query-side tokens, ending in a residual cross-attention whose keys and values are the
    other modality's tokens (the gene tokens F_gene when the image embedding is rebuilt)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.cross = ResidualCrossAttention(dim, heads, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.cross(self.block(x), context)


@register_model("cmrcnet")
class CMRCNet(BLEEP):
    """Loss = log(1 + L_con) + log(1 + L_rec); with recon_loss="none" only log(1 + L_con) (Table 5's `none`).

    recon_target="image" (the paper's method): the image tokens are projected to `embed_dim`, `mask_rate` of
    their features are zeroed, a cross-attention (Q: masked image tokens, K/V: gene tokens from the SNN) and
    `n_fusion_blocks` fusion modules (whose cross-attention reads the gene tokens) rebuild them, and the token
    mean F_r is compared with the image embedding F'_img of the contrastive branch.
    recon_target="expression" (Table 5's "spatial transcription" rows, our reading of the paper): the roles
    swap. `mask_rate` of the expression values are zeroed before the SNN, the masked gene tokens are the
    queries, the (unmasked) image tokens the keys/values, and the token mean is compared with the expression
    embedding F'_gene. Masking the input, not the SNN's output, keeps the task from being solvable by an SNN
    that learns to store everything twice.

    `detach_target` (default False, as the paper and the authors' code: gradients reach both sides) stops the
    reconstruction gradient at the target embedding, so only the branch and the encoder's tokens learn from it.
    `pool` = "mean" (the paper: F_img averaged over its 50 tokens) | "cls" | "native".
    """

    def __init__(self, n_genes: int, *, encoder: str = "vit_base_patch32_224", encoder_kwargs: dict | None = None,
                 pretrained_path: str | None = None, embed_dim: int = 256, dropout: float = 0.1,
                 tau: float = 1.0, input_size: int | None = None, pool: str = "mean", mask_rate: float = 0.5,
                 recon_loss: str = "mse", recon_target: str = "image", detach_target: bool = False,
                 n_gene_tokens: int = 8, snn_hidden: int = 1024, snn_dropout: float = 0.25,
                 cross_heads: int = 4, fusion_heads: int = 8, n_fusion_blocks: int = 2,
                 fusion_mlp_ratio: float = 4.0):
        super().__init__(n_genes, encoder=encoder, encoder_kwargs=encoder_kwargs, pretrained_path=pretrained_path,
                         embed_dim=embed_dim, dropout=dropout, tau=tau, input_size=input_size, pool=pool)
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

    def image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens (B, T, C) projected to the branch width (B, T, D): Linear 768 -> 256."""
        return self.token_proj(tokens)

    def gene_tokens(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression (B, G) -> SNN -> (B, n_gene_tokens, D): 2048 = 8 x 256 in the paper."""
        return self.gene_encoder(expr).view(expr.shape[0], self.n_gene_tokens, -1)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return random_feature_mask(x, self.mask_rate) if self.training and self.mask_rate > 0 else x

    def fuse(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """First cross-attention (Q: queries, K/V: context), then the fusion modules, each ending in a residual
        cross-attention on the same context; the token mean is the reconstruction F_r (B, D)."""
        x = self.gene_cross(queries, context, context, need_weights=False)[0]
        for block in self.fusion:
            x = block(x, context)
        return x.mean(dim=1)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """F_r (B, D): the image embedding rebuilt from masked image tokens under the gene tokens' guidance, or
        (recon_target="expression") the expression embedding rebuilt from masked expression under the image's."""
        if self.recon_target == "image":
            return self.fuse(self._mask(self.image_tokens(tokens)), self.gene_tokens(expr))
        return self.fuse(self.gene_tokens(self._mask(expr)), self.image_tokens(tokens))

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
