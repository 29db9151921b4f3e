"""Image encoders: any timm architecture by name, randomly initialised or loaded from a local weight file.

Why never a hub download: cluster nodes often have no internet, and results must not depend on which
weights a hub served that day. The paper trains its ViT-B/32 from scratch anyway.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")


def create_encoder(name: str, pretrained_path: str | Path | None = None, strict: bool = True,
                   **timm_kwargs) -> nn.Module:
    """timm model `name` without classifier (`num_classes=0`); `timm_kwargs` override its architecture
    (e.g. img_size, patch_size, embed_dim, depth, num_heads for ViTs). Weights only from `pretrained_path`."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise input_error(f"encoder {name!r}", f"not a timm model{hint}")
    try:
        model = timm.create_model(name, pretrained=False, **{"num_classes": 0, **timm_kwargs})
    except (TypeError, ValueError, AssertionError) as err:
        raise input_error(f"encoder {name!r}", f"cannot build with {timm_kwargs}: {err}") from err
    if pretrained_path is not None:
        load_weights(model, pretrained_path, strict=strict)
    return model


POOLS = ("native", "mean", "cls")


def encode(encoder: nn.Module, image: torch.Tensor, pool: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding (B, C), tokens (B, T, C)) from one forward pass.

    ViTs give all their output tokens (CLS first: 50 for a ViT-B/32 at 224 px); CNNs give their last feature
    map, whose positions become the tokens. `pool` says how one embedding is made of them:
    "native" as the architecture pools (timm's head: CLS token for ViTs, global average for ResNet/DenseNet),
    "mean" the average over all output tokens (CMRCNet: "the average value of F_img is computed along the token
    dimension"), "cls" the first token (ViTs with a class token only)."""
    feats = encoder.forward_features(image)
    tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
    if pool == "native":
        pooled = encoder.forward_head(feats, pre_logits=True)
    elif pool == "mean":
        pooled = tokens.mean(dim=1)
    elif pool == "cls":
        if getattr(encoder, "cls_token", None) is None:
            raise input_error("pool", f"'cls' needs an encoder with a class token; {type(encoder).__name__} has none")
        pooled = tokens[:, 0]
    else:
        raise input_error("pool", f"unknown {pool!r}; use one of {', '.join(POOLS)}")
    return pooled, tokens


def native_input_size(encoder: nn.Module) -> int:
    """The patch size in px the encoder is built for: a ViT's fixed img_size, else timm's default input size."""
    patch_embed = getattr(encoder, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def fixed_input_size(encoder: nn.Module) -> bool:
    """True when the encoder accepts only its native size (a ViT with a fixed position-embedding grid)."""
    patch_embed = getattr(encoder, "patch_embed", None)
    return patch_embed is not None and bool(getattr(patch_embed, "strict_img_size", False))


def check_input_size(encoder: nn.Module, name: str, input_size: int | None) -> int:
    """The patch size the data loader must deliver: the encoder's own unless set; a fixed-size ViT
    cannot take another (its position embeddings are laid out for one grid)."""
    native = native_input_size(encoder)
    if input_size is None:
        return native
    if fixed_input_size(encoder) and int(input_size) != native:
        raise input_error("input_size", f"{input_size} px does not fit encoder {name!r} built for {native} px; "
                          f"set encoder_kwargs.img_size to {input_size} or leave input_size out")
    return int(input_size)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's input problem
        raise input_error(path, f"cannot read weights ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise input_error(path, "not a state dict (expected tensors by name, or a 'state_dict'/'model' entry)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel/DDP prefix


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a local weight file into `model`. Classifier weights in the file are dropped (we use
    num_classes=0); any other missing, unexpected or wrongly shaped key is an error, or with
    strict=False a warning, since a silently partial load is a wrong experiment."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "pretrained weights file not found")
    state = _read_state_dict(path)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = classifier if isinstance(classifier, (tuple, list)) else [classifier] if classifier else []
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and v.shape != own[k].shape]
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                if keys]
    if len(missing) == len(own):
        raise input_error(path, f"no weight matches the model; {'; '.join(problems)}")
    if problems and strict:
        raise input_error(path, "; ".join(problems))
    if problems:
        log.warning("%s: loading the matching weights only; %s", path, "; ".join(problems))
    good = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(good, strict=False)
    log.info("%s: loaded %d of %d weight tensors", path, len(good), len(own))
