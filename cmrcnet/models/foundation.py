"""A frozen pathology foundation model with a trained linear read-out (the paper's Table 4 baseline).

The encoder (any timm architecture; weights from a local file such as UNI's or a cTransPath export) is never
updated: its parameters are frozen and it stays in eval mode, so BatchNorm statistics and dropout do not
change either. Only the linear layer from its embedding to the genes is trained, with MSE, which is how
foundation models are usually probed for expression (HEST-bench fits a linear model on frozen embeddings too).
"""

from __future__ import annotations

import logging

from cmrcnet.models.registry import register_model
from cmrcnet.models.stnet import STNet

log = logging.getLogger("cmrcnet")


@register_model("foundation")
class FrozenEncoderRegression(STNet):
    """STNet's read-out (zero-initialised linear layer, mean expression as bias) on a frozen encoder."""

    def __init__(self, n_genes: int, *, encoder: str = "vit_large_patch16_224", encoder_kwargs: dict | None = None,
                 pretrained_path: str | None = None, input_size: int | None = None):
        super().__init__(n_genes, encoder=encoder, encoder_kwargs=encoder_kwargs, pretrained_path=pretrained_path,
                         input_size=input_size)
        if pretrained_path is None:
            log.warning("foundation model %s has no pretrained_path: its frozen weights are random, so this is a "
                        "random-feature baseline, not a foundation model", encoder)
        self.image_encoder.requires_grad_(False)
        self.image_encoder.eval()

    def train(self, mode: bool = True) -> FrozenEncoderRegression:
        """Train the read-out only; the encoder stays in eval mode (fixed BatchNorm statistics, no dropout)."""
        super().train(mode)
        self.image_encoder.eval()
        return self
