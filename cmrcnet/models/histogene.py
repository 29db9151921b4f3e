"""HisToGene (Pang et al. 2021): a ViT whose tokens are the spots of one slide, so each prediction can
use the whole tissue context; spot positions enter as learned row and column embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.heads import start_at_mean
from cmrcnet.models.registry import register_model


@register_model("histogene")
class HisToGene(nn.Module):
    """Patches (resized to `patch_px`) are flattened and linearly embedded, then
    x_embed[array_col] + y_embed[array_row] are added, a transformer encoder mixes all spots of the slide,
    and LayerNorm + Linear gives the expression of every spot. MSE on log-normalised expression.

    `n_pos` is the grid size (largest array index + 1, for rows and columns alike); the training loop sets it
    from the dataset so every fold embeds every position."""

    kind = "regression"
    slide_level = True

    def __init__(self, n_genes: int, *, n_pos: int = 128, patch_px: int = 112, dim: int = 1024, depth: int = 8,
                 heads: int = 16, mlp_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise input_error("heads", f"{heads} heads do not divide dim {dim}")
        if n_pos < 1:
            raise input_error("n_pos", f"must be positive, got {n_pos!r}")
        self.n_pos = int(n_pos)
        self.input_size = self.patch_px = int(patch_px)
        self.patch_embed = nn.Linear(3 * patch_px * patch_px, dim)
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim or 2 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def set_output_bias(self, mean_expression: torch.Tensor) -> None:
        """Start predictions at the mean training expression (the training loop calls this first). Not in the
        original HisToGene: with one optimiser step per slide there are few steps, and without this start the
        demo's HisToGene predicted little beyond the mean (docs/benchmarks.md, "Demo results")."""
        start_at_mean(self.head[-1], mean_expression)

    def _check_pos(self, pos: torch.Tensor, n_spots: int) -> None:
        if pos.ndim != 3 or pos.shape[1] != n_spots or pos.shape[2] != 2:
            raise input_error("pos", f"expected shape (B, {n_spots}, 2) of (array_row, array_col), "
                              f"got {tuple(pos.shape)}")
        low, high = int(pos.min()), int(pos.max())
        if low < 0 or high >= self.n_pos:
            raise input_error("pos", f"grid index {low if low < 0 else high} outside [0, {self.n_pos}); "
                              f"build the model with n_pos >= {high + 1}")

    def predict(self, batch: dict) -> torch.Tensor:
        image, pos = batch["image"], batch["pos"]
        b, n = image.shape[:2]
        self._check_pos(pos, n)
        patches = image.flatten(0, 1)
        if patches.shape[-2:] != (self.patch_px, self.patch_px):
            patches = F.interpolate(patches, size=(self.patch_px, self.patch_px), mode="bilinear",
                                    antialias=True, align_corners=False)
        x = self.patch_embed(patches.reshape(b, n, -1))
        x = x + self.y_embed(pos[..., 0]) + self.x_embed(pos[..., 1])
        return self.head(self.transformer(self.dropout(x)))

    def forward(self, batch: dict) -> dict:
        pred = self.predict(batch)
        return {"loss": F.mse_loss(pred.float(), batch["expr"].float())}
