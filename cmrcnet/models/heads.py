"""Projection head shared by the contrastive models."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """BLEEP's head: linear projection, then a GELU + linear + dropout refinement added back residually,
    then LayerNorm. The residual keeps the linear map learnable from the start; the LayerNorm puts image
    and expression embeddings on the same scale before their dot products are compared."""

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.dropout(self.fc(self.act(projected))))
