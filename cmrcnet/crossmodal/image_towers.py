"""Image towers: ImageNet-normalised patches (B, 3, S, S) -> one vector per patch (B, out_dim), the image side of
the `crossmodal` model, in four training modes:

    frozen       a registered pathology encoder, nothing trains (run without gradients, always in eval mode)
    last-blocks  the same, with its last `unfreeze_blocks` transformer blocks and everything after them trained
    lora         the same, frozen, with low-rank adapters on every attention's qkv and proj layers (only they train)
    scratch      a timm architecture by name, randomly initialised, fully trained

Registered encoders expect their own RGB normalisation; the project's loader normalises with ImageNet's, so the
tower converts before the encoder runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmrcnet.encoders.frozen import load_encoder
from cmrcnet.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, is_encoder
from cmrcnet.errors import input_error
from cmrcnet.models.encoders import check_input_size, create_encoder, encode

IMAGE_MODES = ("frozen", "last-blocks", "lora", "scratch")


class LoRALinear(nn.Module):
    """W x + (alpha / r) B(A x) (Hu et al. 2021) around a frozen nn.Linear. A starts Kaiming-uniform and B at
    zero, so the wrapped layer computes exactly the original one until B learns."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.lora_a.to(base.weight)
        self.lora_b.to(base.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(x))


def add_lora(module: nn.Module, rank: int, alpha: float) -> int:
    """Wrap the `qkv` and `proj` nn.Linear of every attention layer of `module` (timm ViT / Swin attention) in
    LoRALinear; returns how many layers were wrapped."""
    wrapped = 0
    for parent in list(module.modules()):
        if isinstance(getattr(parent, "qkv", None), nn.Linear) and isinstance(getattr(parent, "proj", None), nn.Linear):
            parent.qkv = LoRALinear(parent.qkv, rank, alpha)
            parent.proj = LoRALinear(parent.proj, rank, alpha)
            wrapped += 2
    return wrapped


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `module` in forward order: every `blocks` container (a ViT's `blocks`, CONCH's
    `trunk.blocks`, each Swin stage's `blocks`), outermost ones only, concatenated."""
    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        is_container = name.split(".")[-1] == "blocks" and isinstance(child, (nn.Sequential, nn.ModuleList))
        if is_container and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, child))
    return [block for _, container in found for block in container]


class PretrainedImageTower(nn.Module):
    """A registered encoder in mode frozen / last-blocks / lora. The encoder lives in a FrozenEncoder (eval mode
    whatever `.train()` says, no gradients) and only the chosen parts are switched back: in last-blocks the
    trained blocks follow `.train()`, the frozen rest stays in eval (these ViTs have no dropout, and a frozen
    batch-norm stem keeps its statistics); LoRA adapters have no mode-dependent layers."""

    def __init__(self, image: str, mode: str, *, weights_path=None, unfreeze_blocks: int = 2, lora_rank: int = 8,
                 lora_alpha: float = 16):
        super().__init__()
        self.mode = mode
        self.encoder = load_encoder(image, weights_path)
        spec = self.encoder.spec
        self.out_dim = spec.embed_dim
        self.input_size = spec.input_size
        self.renormalise = (spec.mean, spec.std) != (IMAGENET_MEAN, IMAGENET_STD)
        imnet_mean, imnet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        own_mean, own_std = torch.tensor(spec.mean), torch.tensor(spec.std)
        # x_own = (x * imnet_std + imnet_mean - own_mean) / own_std = x * gain + shift
        self.register_buffer("gain", (imnet_std / own_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((imnet_mean - own_mean) / own_std).view(1, 3, 1, 1), persistent=False)
        self.trained_parts: list[nn.Module] = []
        if mode == "last-blocks":
            self._unfreeze_last_blocks(image, unfreeze_blocks)
        elif mode == "lora":
            if lora_rank < 1:
                raise input_error("lora_rank", f"must be >= 1, got {lora_rank}")
            if add_lora(self.encoder.model, lora_rank, lora_alpha) == 0:
                raise input_error(f"encoder {image!r}", "has no attention layers with qkv/proj linears for LoRA; "
                                  "use image_mode frozen or last-blocks")
            for name, param in self.encoder.named_parameters():
                param.requires_grad_(".lora_" in name)

    def _unfreeze_last_blocks(self, image: str, n: int) -> None:
        """Train the parameters from the first of the last `n` blocks onwards, in registration order (which follows
        the forward order in these encoders): the blocks, then the final norm and any pooling head after them."""
        blocks = transformer_blocks(self.encoder.model)
        if not blocks:
            raise input_error(f"encoder {image!r}", "has no transformer blocks to unfreeze; use image_mode frozen "
                              "(or lora for attention models)")
        if not 1 <= n <= len(blocks):
            raise input_error("unfreeze_blocks", f"must be in 1..{len(blocks)} for encoder {image!r}, got {n}")
        first = {id(p) for p in blocks[-n].parameters()}
        started = False
        for module in self.encoder.model.modules():  # the modules whose own parameters are trained follow .train()
            own = list(module.parameters(recurse=False))
            started = started or any(id(p) in first for p in own)
            if started:
                for param in own:
                    param.requires_grad_(True)
                if own:
                    self.trained_parts.append(module)
        self.trained_parts += list(blocks[-n:])

    def train(self, mode: bool = True) -> PretrainedImageTower:
        super().train(mode)  # the FrozenEncoder turns itself and everything in it to eval
        for part in self.trained_parts:
            part.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = images * self.gain + self.shift
        if self.mode == "frozen":
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)


class ScratchImageTower(nn.Module):
    """A timm architecture, randomly initialised and fully trained, pooled with its own head (CLS token for ViTs,
    global average for CNNs)."""

    def __init__(self, image: str, encoder_kwargs: dict | None = None, input_size: int | None = None):
        super().__init__()
        self.encoder = create_encoder(image, **(encoder_kwargs or {}))
        self.input_size = check_input_size(self.encoder, image, input_size)
        self.out_dim = self.encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, images, "native")[0]


def make_image_tower(image: str, mode: str, *, weights_path=None, unfreeze_blocks: int = 2, lora_rank: int = 8,
                     lora_alpha: float = 16, encoder_kwargs: dict | None = None, input_size: int | None = None
                     ) -> nn.Module:
    """Image tower: `image` is a registered encoder name (cmrcnet.encoders) for modes frozen / last-blocks / lora,
    a timm architecture for mode scratch. `weights_path` None loads a registered encoder with random weights (a
    warning; for tests and demos). `input_size` (optional) is checked: a registered encoder takes its own size
    only, a scratch encoder any size it can (check_input_size)."""
    if mode not in IMAGE_MODES:
        raise input_error("image_mode", f"unknown {mode!r}; use one of {', '.join(IMAGE_MODES)}")
    if mode == "scratch":
        if is_encoder(image):
            raise input_error("image_mode", f"'scratch' takes a timm architecture, but {image!r} is a registered "
                              "encoder; use image_mode frozen, last-blocks or lora for it")
        if weights_path is not None:
            raise input_error("weights_path", "image_mode 'scratch' trains from random weights; weights_path is for "
                              "registered encoders (frozen, last-blocks, lora)")
        return ScratchImageTower(image, encoder_kwargs, input_size)
    if not is_encoder(image):
        raise input_error("image", f"{image!r} is not a registered encoder (see cmrcnet.encoders.list_encoders()); "
                          f"image_mode {mode!r} needs one, a timm architecture needs image_mode 'scratch'")
    if encoder_kwargs:
        raise input_error("encoder_kwargs", f"only for image_mode 'scratch'; registered encoder {image!r} is built "
                          "as its spec says")
    tower = PretrainedImageTower(image, mode, weights_path=weights_path, unfreeze_blocks=unfreeze_blocks,
                                 lora_rank=lora_rank, lora_alpha=lora_alpha)
    if input_size is not None and int(input_size) != tower.input_size:
        raise input_error("input_size", f"{input_size} px does not fit encoder {image!r}, which takes "
                          f"{tower.input_size} px; leave input_size out")
    return tower
