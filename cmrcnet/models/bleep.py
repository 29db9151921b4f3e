"""BLEEP (Xie et al. 2023): CLIP-style image/expression embeddings, expression predicted by retrieval."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.encoders import POOLS, check_input_size, create_encoder, encode
from cmrcnet.models.heads import ProjectionHead
from cmrcnet.models.losses import SoftContrastiveLoss
from cmrcnet.models.registry import register_model


@register_model("bleep")
class BLEEP(nn.Module):
    """Image encoder + projection head and expression projection head into one 256-d space, trained with the
    soft contrastive loss. At inference a test patch takes the mean expression of its nearest training spots
    (cosine similarity of `embed_image` against `embed_expression`).

    `pool` ("native" | "mean" | "cls", see `encoders.encode`) makes one embedding of the encoder's tokens; BLEEP
    uses the architecture's own pooling (ResNet-50: global average)."""

    kind = "retrieval"
    slide_level = False

    def __init__(self, n_genes: int, *, encoder: str = "resnet50", encoder_kwargs: dict | None = None,
                 pretrained_path: str | None = None, embed_dim: int = 256, dropout: float = 0.1,
                 tau: float = 1.0, input_size: int | None = None, pool: str = "native"):
        super().__init__()
        if pool not in POOLS:
            raise input_error("pool", f"unknown {pool!r}; use one of {', '.join(POOLS)}")
        self.pool = pool
        self.image_encoder = create_encoder(encoder, pretrained_path, **(encoder_kwargs or {}))
        self.input_size = check_input_size(self.image_encoder, encoder, input_size)
        self.image_head = ProjectionHead(self.image_encoder.num_features, embed_dim, dropout)
        self.expression_head = ProjectionHead(n_genes, embed_dim, dropout)
        self.contrastive = SoftContrastiveLoss(tau)

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected image embedding (B, D), encoder tokens (B, T, C)); the loss uses the unnormalised one."""
        pooled, tokens = encode(self.image_encoder, image, self.pool)
        return self.image_head(pooled), tokens

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, for cosine-similarity retrieval."""
        return F.normalize(self.image_features(image)[0], dim=-1)

    def embed_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """L2-normalised expression embeddings, for cosine-similarity retrieval."""
        return F.normalize(self.expression_head(expr), dim=-1)

    def forward(self, batch: dict) -> dict:
        img_emb, _ = self.image_features(batch["image"])
        loss = self.contrastive(img_emb, self.expression_head(batch["expr"]))
        return {"loss": loss}

