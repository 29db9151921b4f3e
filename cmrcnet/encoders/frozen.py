"""A registered encoder with its weights, frozen, ready to embed uint8 patches.

`load_encoder(name, weights_path)` loads our fetched form (`weights/{name}/model.safetensors`, already in build()'s
key layout) strictly: any missing, unexpected or wrongly shaped tensor is a one-line error naming the file, since a
silently partial load is a wrong experiment. Another checkpoint format (a hub `.bin`/`.pth`) is read too and
converted with the spec's `convert` first; `cmrcnet.weights.import_local_weights` turns it into our form once.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.encoders.registry import EncoderSpec, StateDict, get_encoder
from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")


def read_checkpoint(path: str | Path) -> object:
    """A weight file's content: safetensors by its suffix, else torch.load with weights_only (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's input problem
        raise input_error(path, f"cannot read weights ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def state_dict_problems(state: StateDict, expected: StateDict) -> list[str]:
    """What differs between a state dict and the module's (keys and shapes), as short phrases; [] when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    return [f"{what}: {_listing(keys)}" for what, keys in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]


def meta_state_dict(spec: EncoderSpec) -> StateDict:
    """build()'s state dict on the meta device: names and shapes without memory or weights."""
    return dict(_meta_state_dict(spec))


@functools.lru_cache(maxsize=32)
def _meta_state_dict(spec: EncoderSpec) -> StateDict:
    with torch.device("meta"):
        return spec.build().state_dict()


def check_state_dict(spec: EncoderSpec, state: StateDict, where: str | Path) -> None:
    """One-line error naming `where` unless `state` has exactly build()'s keys and shapes."""
    problems = state_dict_problems(state, meta_state_dict(spec))
    if problems:
        raise input_error(where, f"does not fit encoder {spec.name!r}: {'; '.join(problems)}")


def _build_loaded(spec: EncoderSpec, state: StateDict, where: Path) -> nn.Module:
    """build() with `state` loaded. Built on the meta device and filled by assignment (a 1B-parameter ViT costs
    no random init); a module with non-persistent buffers (not in the file) is built for real instead."""
    with torch.device("meta"):
        model = spec.build()
    own = model.state_dict()
    problems = state_dict_problems(state, own)
    if problems:
        raise input_error(where, f"does not fit encoder {spec.name!r}: {'; '.join(problems)}")
    # the module's dtypes (float32), as load_state_dict's copy would give: a half-precision file loads as float32
    state = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    if not any(b.is_meta for name, b in model.named_buffers() if name not in state):
        model.load_state_dict(state, strict=True, assign=True)
        return model
    model = spec.build()
    model.load_state_dict(state, strict=True)
    return model


class FrozenEncoder(nn.Module):
    """An encoder in eval mode without gradients; `forward(images)` takes normalised (B, 3, S, S) float images,
    `embed_uint8(patches)` takes raw uint8 patches (N, H, W, 3)."""

    def __init__(self, spec: EncoderSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> FrozenEncoder:  # frozen: always eval (dropout, batch-norm statistics)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.spec.embed(self.model, images)

    def preprocess(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, S, S) on the encoder's device: resized (antialiased) to
        spec.resize_to then centre-cropped, or straight to spec.input_size, when the size differs."""
        x = torch.as_tensor(np.asarray(patches)) if not torch.is_tensor(patches) else patches
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise input_error("patches", f"expected uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.spec.input_size
        resize = self.spec.resize_to or size
        if tuple(x.shape[-2:]) != (resize, resize):
            x = F.interpolate(x, size=(resize, resize), mode=self.spec.interpolation, align_corners=False,
                              antialias=True)
        if resize != size:
            top = (resize - size) // 2
            x = x[:, :, top:top + size, top:top + size]
        x = x.clamp_(0.0, 1.0) if self.spec.interpolation == "bicubic" else x
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def embed_uint8(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings (N, embed_dim) float32 of uint8 patches (N, H, W, 3); runs under any autocast the caller set."""
        return self.forward(self.preprocess(patches)).float()


def load_encoder(name: str | EncoderSpec, weights_path: str | Path | None, device: str | torch.device = "cpu"
                 ) -> FrozenEncoder:
    """Registered encoder `name` with the weights of `weights_path` (our safetensors form: strict, no conversion;
    another file: the spec's conversion first), frozen on `device`. None: random weights, with a warning."""
    spec = name if isinstance(name, EncoderSpec) else get_encoder(name)
    if weights_path is None:
        log.warning("encoder %s: no weights file given, using RANDOM weights", spec.name)
        model = spec.build()
    else:
        path = Path(weights_path)
        raw = read_checkpoint(path)
        if path.suffix == ".safetensors":
            state = dict(raw)
        else:
            try:
                state = spec.prepare_state_dict(raw, str(path))
            except (KeyError, ValueError, RuntimeError) as err:
                raise input_error(path, f"cannot convert for encoder {spec.name!r}: {err}") from None
        model = _build_loaded(spec, state, path)
        log.info("encoder %s: loaded %d tensors from %s", spec.name, len(state), path)
    return FrozenEncoder(spec, model).to(device)
