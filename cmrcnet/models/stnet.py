"""ST-Net (He et al. 2020): DenseNet-121 regressing log expression of the spot under each patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.models.encoders import check_input_size, create_encoder
from cmrcnet.models.heads import start_at_mean
from cmrcnet.models.registry import register_model


@register_model("stnet")
class STNet(nn.Module):
    """Encoder + one linear layer, MSE on log-normalised expression.

    The output layer starts with zero weights and the mean training expression as bias, as in ST-Net:
    the first prediction is the best constant, so early gradients fit deviations from the mean instead
    of spending epochs learning each gene's offset."""

    kind = "regression"
    slide_level = False

    def __init__(self, n_genes: int, *, encoder: str = "densenet121", encoder_kwargs: dict | None = None,
                 pretrained_path: str | None = None, input_size: int | None = None):
        super().__init__()
        self.image_encoder = create_encoder(encoder, pretrained_path, **(encoder_kwargs or {}))
        self.input_size = check_input_size(self.image_encoder, encoder, input_size)
        self.head = nn.Linear(self.image_encoder.num_features, n_genes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_output_bias(self, mean_expression: torch.Tensor) -> None:
        """Start predictions at the mean training expression (the training loop calls this first)."""
        start_at_mean(self.head, mean_expression)

    def predict(self, batch: dict) -> torch.Tensor:
        return self.head(self.image_encoder(batch["image"]))

    def forward(self, batch: dict) -> dict:
        pred = self.predict(batch)
        return {"loss": F.mse_loss(pred.float(), batch["expr"].float())}
