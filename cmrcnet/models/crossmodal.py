"""The HESCAPE-style cross-modal model: one image tower x one gene tower x one contrastive loss, each chosen by a
setting, so a grid of combinations trains and predicts (by retrieval) exactly like BLEEP."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import input_error
from cmrcnet.models.heads import ProjectionHead
from cmrcnet.models.registry import register_model


@register_model("crossmodal")
class CrossModal(nn.Module):
    """Image tower + projection head and gene tower + projection head into one `embed_dim` space, trained with
    `loss` ("bleep" | "clip" | "siglip"). At inference a test patch takes the mean expression of its nearest
    training spots (cosine similarity of `embed_image` against `embed_expression`), as BLEEP.

    image / image_mode: a registered pathology encoder with "frozen" | "last-blocks" | "lora", or a timm
    architecture with "scratch" (see cmrcnet.crossmodal.image_towers). gene: "mlp" | "snn" | "transformer" |
    "scvi", sized by gene_kwargs (see cmrcnet.crossmodal.gene_towers); "scvi" is pretrained by `prepare` on the
    fold's training spots. tau is BLEEP's temperature (loss "bleep" only); CLIP and SigLIP learn theirs."""

    kind = "retrieval"
    slide_level = False

    def __init__(self, n_genes: int, *, image: str = "tiny-test", image_mode: str = "frozen",
                 weights_path: str | None = None, unfreeze_blocks: int = 2, lora_rank: int = 8,
                 encoder_kwargs: dict | None = None, input_size: int | None = None, gene: str = "mlp",
                 gene_kwargs: dict | None = None, loss: str = "clip", embed_dim: int = 256, dropout: float = 0.1,
                 tau: float = 1.0, scvi_epochs: int = 100):
        # imported here: the towers build on cmrcnet.models' parts, and cmrcnet.models imports this module
        from cmrcnet.crossmodal.gene_towers import make_gene_tower
        from cmrcnet.crossmodal.image_towers import make_image_tower
        from cmrcnet.crossmodal.losses import make_contrastive_loss

        super().__init__()
        if loss != "bleep" and tau != 1.0:
            raise input_error("tau", f"applies only to loss 'bleep'; loss {loss!r} learns its temperature")
        if scvi_epochs < 1:
            raise input_error("scvi_epochs", f"must be >= 1, got {scvi_epochs}")
        self.image_tower = make_image_tower(image, image_mode, weights_path=weights_path,
                                            unfreeze_blocks=unfreeze_blocks, lora_rank=lora_rank,
                                            encoder_kwargs=encoder_kwargs, input_size=input_size)
        self.input_size = self.image_tower.input_size
        self.gene_tower = make_gene_tower(gene, n_genes, **(gene_kwargs or {}))
        self.image_head = ProjectionHead(self.image_tower.out_dim, embed_dim, dropout)
        self.expression_head = ProjectionHead(self.gene_tower.out_dim, embed_dim, dropout)
        self.contrastive = make_contrastive_loss(loss, **({"tau": tau} if loss == "bleep" else {}))
        self.scvi_epochs = scvi_epochs

    def prepare(self, train_expression: np.ndarray, *, seed: int, device) -> None:
        """Called by the trainer once before training with the fold's training-spot expression: fits the scVI gene
        tower on it (on `device`'s accelerator); nothing to do for the other towers."""
        fit = getattr(self.gene_tower, "fit", None)
        if fit is None:
            return
        accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
        fit(np.asarray(train_expression), max_epochs=self.scvi_epochs, seed=seed, accelerator=accelerator)

    def image_projection(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower(image))

    def expression_projection(self, expr: torch.Tensor) -> torch.Tensor:
        return self.expression_head(self.gene_tower(expr))

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, for cosine-similarity retrieval."""
        return F.normalize(self.image_projection(image), dim=-1)

    def embed_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """L2-normalised expression embeddings, for cosine-similarity retrieval."""
        return F.normalize(self.expression_projection(expr), dim=-1)

    def forward(self, batch: dict) -> dict:
        loss = self.contrastive(self.image_projection(batch["image"]), self.expression_projection(batch["expr"]))
        out = {"loss": loss}
        if hasattr(self.contrastive, "scale"):  # the learned temperature, logged next to the loss
            out["logit_scale"] = self.contrastive.scale().detach()
        return out

    def no_weight_decay(self) -> set[str]:
        """The loss's learned temperature and bias: kept out of weight decay, as CLIP and SigLIP do."""
        return {f"contrastive.{n}" for n, _ in self.contrastive.named_parameters()}

    def trainable_summary(self) -> dict[str, int]:
        """Parameter counts: trainable and frozen in total and per part (image_tower, image_head, gene_tower,
        expression_head, contrastive), for the training log."""
        summary = {"trainable": 0, "frozen": 0}
        for part, module in self.named_children():
            for param in module.parameters():
                state = "trainable" if param.requires_grad else "frozen"
                summary[state] += param.numel()
                summary[f"{part}_{state}"] = summary.get(f"{part}_{state}", 0) + param.numel()
        return summary
