"""The image tower of a trained retrieval model (CMRCNet, BLEEP) as a frozen encoder, so that its embeddings go
through the same cache, probes and HEST-Benchmark leaderboard as the foundation encoders.

The embedding is the one its retrieval compares (`model.embed_image`: the projected, L2-normalised image
embedding), on patches resized to the model's input size and ImageNet-normalised, exactly as in training and
prediction (`cmrcnet.data.datasets.to_model_images` / `normalise`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cmrcnet.encoders.frozen import FrozenEncoder
from cmrcnet.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from cmrcnet.errors import input_error


def _embed_image(module, images: torch.Tensor) -> torch.Tensor:
    return module.embed_image(images)


def trained_encoder(name: str, model_path: str | Path, device: str | torch.device = "cpu") -> FrozenEncoder:
    """The image tower of the retrieval model in `model_path` (a `best.pt`), frozen on `device`, named `name`
    (the name its embedding cache files record)."""
    from cmrcnet.inference.predict import load_trained_model

    model, ckpt = load_trained_model(model_path, torch.device(device))
    if model.kind != "retrieval":
        raise input_error(model_path, f"a {ckpt['model_name']} model has no image embedding to compare; use a "
                                      "retrieval model (cmrcnet, bleep)")
    size = int(model.input_size)
    with torch.no_grad():
        dim = int(model.embed_image(torch.zeros(1, 3, size, size, device=model_device(model))).shape[1])
    spec = EncoderSpec(
        name=name, build=lambda: model, embed_dim=dim, input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embed=_embed_image, source=str(model_path),
        notes=f"image tower of a trained {ckpt['model_name']} (method {ckpt.get('method', '?')}, fold "
              f"{ckpt.get('fold', '?')}): its projected, L2-normalised image embedding",
    )
    return FrozenEncoder(spec, model).to(model_device(model))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
