"""Named frozen pathology encoders: what each one is, in one `EncoderSpec`.

A spec says how the architecture is built (random init, never a download), the patch size and RGB
normalisation it expects, how one embedding is pooled from its output, where its weights live on the Hugging
Face hub and how the hub checkpoint's keys map onto the built module's. Adding an encoder is one
`register_encoder(EncoderSpec(...))` call (see `cmrcnet.encoders.zoo`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cmrcnet.errors import input_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HubFile:
    """One weight file on the Hugging Face hub."""

    repo_id: str
    filename: str
    repo_type: Literal["model", "dataset"] = "model"
    gated: bool = False
    revision: str | None = None  # None: the repo's main branch at fetch time (SOURCE.json records the commit)

    @property
    def url(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}"


# ---- pooling rules: (module, images normalised (B, 3, S, S)) -> (B, D) ----------------------------------------------

def pool_native(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The module's own pooled output: timm models built with num_classes=0 return pre-logits features (a ViT's
    CLS token with global_pool="token", a CNN's global average)."""
    return module(images)


def pool_cls_and_patch_mean(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS token concatenated with the mean of the patch tokens, prefix tokens (CLS and registers) left out of the
    mean (Virchow / Virchow2: out[:, 0] ++ out[:, 1 + n_registers:].mean(1))."""
    tokens = module.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, module.num_prefix_tokens:].mean(dim=1)], dim=-1)


def pool_last_feature_map_mean(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Global average of the last map of a timm `features_only` network (HEST's truncated ResNet-50)."""
    return module(images)[-1].mean(dim=(2, 3))


# ---- checkpoint keys -------------------------------------------------------------------------------------------------

def unwrap_state_dict(obj: object, where: str = "checkpoint") -> StateDict:
    """The tensors-by-name of a checkpoint: a training checkpoint's 'model' / 'state_dict' entry when present,
    the DataParallel/DDP 'module.' prefix stripped; anything that is not a state dict is a one-line error."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise input_error(where, "not a state dict (expected tensors by name, or a 'model'/'state_dict' entry)")
    if all(str(k).startswith("module.") for k in obj):
        return {str(k).removeprefix("module."): v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def identity_convert(state: StateDict) -> StateDict:
    return dict(state)


def drop_keys(*prefixes: str, contains: tuple[str, ...] = ()) -> Callable[[StateDict], StateDict]:
    """A convert that leaves out keys starting with any of `prefixes` or containing any of `contains`."""

    def convert(state: StateDict) -> StateDict:
        return {k: v for k, v in state.items()
                if not k.startswith(prefixes) and not any(part in k for part in contains)}

    return convert


# ---- the spec and the registry ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderSpec:
    """A frozen patch encoder.

    build: the architecture, randomly initialised (no download); run under `torch.device("meta")` it costs nothing.
    embed_dim: the size of one embedding as `embed` returns it.
    input_size: the patch side in px the encoder is fed; `resize_to` (optional) is the size patches are resized to
        first, then centre-cropped to input_size (as the model card / HEST transform does, e.g. 256 -> 224).
    mean, std: RGB normalisation on the 0-1 scale.
    embed: (module, normalised images (B, 3, S, S)) -> (B, embed_dim).
    hub: the weight file on the Hugging Face hub (None: weights only from a local file).
    convert: the checkpoint's state dict (after `unwrap_state_dict`) -> build()'s keys; default identity.
    source: the model card / HEST file the facts come from; notes: what was not verifiable, caveats.
    precision: what HEST-Benchmark / TRIDENT run it in ("fp32", "fp16", "bf16"), informative.
    """

    name: str
    build: Callable[[], nn.Module]
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] = pool_native
    hub: HubFile | None = None
    convert: Callable[[StateDict], StateDict] = identity_convert
    source: str = ""
    notes: str = ""
    resize_to: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    precision: str = "fp32"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))  # hashable, whatever was given
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"encoder {self.name}: mean and std need 3 values (RGB)")
        if self.resize_to is not None and self.resize_to < self.input_size:
            raise ValueError(f"encoder {self.name}: resize_to {self.resize_to} < input_size {self.input_size}")

    def prepare_state_dict(self, checkpoint: object, where: str = "checkpoint") -> StateDict:
        """A loaded checkpoint (as torch.load / safetensors give it) in build()'s key layout."""
        return self.convert(unwrap_state_dict(checkpoint, where))


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add `spec` under `spec.name`; a name already taken is an error unless `replace`."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_encoder(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def is_encoder(name: str) -> bool:
    return str(name) in _REGISTRY


def get_encoder(name: str) -> EncoderSpec:
    """The registered spec `name`; an unknown name is a one-line error listing close (else all) names."""
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(list_encoders())}"
        raise input_error(f"encoder {name!r}", f"not a registered encoder; {hint}") from None
