"""CMRCNet and its baselines behind one small registry, in the style of `timm.create_model`.

    model = create_model("cmrcnet", n_genes=300, mask_rate=0.5)
    out = model({"image": images, "expr": expression})   # {"loss": ..., "loss_con": ..., "loss_rec": ...}

Every model has `kind` ("retrieval" | "regression"), `slide_level`, `input_size` and `forward(batch) -> dict`.
Retrieval models add `embed_image` / `embed_expression`; regression models add `predict`.
"""

from cmrcnet.models.bleep import BLEEP
from cmrcnet.models.cmrcnet import CMRCNet
from cmrcnet.models.crossmodal import CrossModal
from cmrcnet.models.encoders import create_encoder
from cmrcnet.models.foundation import FrozenEncoderRegression
from cmrcnet.models.heads import ProjectionHead
from cmrcnet.models.histogene import HisToGene
from cmrcnet.models.losses import ReconstructionLoss, SoftContrastiveLoss
from cmrcnet.models.registry import create_model, list_models, model_settings, register_model
from cmrcnet.models.stnet import STNet

__all__ = [
    "BLEEP",
    "CMRCNet",
    "CrossModal",
    "FrozenEncoderRegression",
    "HisToGene",
    "ProjectionHead",
    "ReconstructionLoss",
    "STNet",
    "SoftContrastiveLoss",
    "create_encoder",
    "create_model",
    "list_models",
    "model_settings",
    "register_model",
]
