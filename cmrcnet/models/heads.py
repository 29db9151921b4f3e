"""Heads shared by the models: the contrastive projection head, and the mean-expression start of regression outputs."""

from __future__ import annotations

import torch
from torch import nn

from cmrcnet.errors import input_error


@torch.no_grad()
def start_at_mean(layer: nn.Linear, mean_expression) -> None:
    """Zero the output layer's weights and set its bias to the mean training expression (as ST-Net does):
    the first prediction is the best constant, so early steps fit deviations from the mean instead of
    spending many steps learning each gene's offset."""
    mean_expression = torch.as_tensor(mean_expression).flatten()
    if mean_expression.numel() != layer.out_features:
        raise input_error("mean_expression", f"{mean_expression.numel()} values for {layer.out_features} genes")
    layer.weight.zero_()
    layer.bias.copy_(mean_expression.to(layer.bias))


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
