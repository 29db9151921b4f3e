"""CTransPath: a Swin-T whose patch embedding is a small convolutional stem (Wang et al., Medical Image Analysis
2022), built on timm's Swin Transformer, loading the authors' checkpoint without their timm fork (`timm_ctp`).

Facts (HEST@afd42c3 src/hest/bench/cpath_model_zoo/ctranspath/ctran.py and inference_models.py; the same stem in
TRIDENT's model zoo): `swin_tiny_patch4_window7_224` (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7) at
224 px with the stem Conv3x3/2 (3 -> E/8, no bias) BN ReLU, Conv3x3/2 (E/8 -> E/4, no bias) BN ReLU, Conv1x1
(E/4 -> E, bias), i.e. total stride 4, then the patch norm (LayerNorm); classifier removed, so the embedding is
the final norm's tokens averaged (768). The checkpoint is a dict with its weights under 'model'.

Checkpoint keys -> ours: the stem keeps `patch_embed.proj.{0,1,3,4,6}` (a Sequential, as in the original);
the attention masks and relative-position indices (buffers recomputed here) are dropped, as is any `head.*`;
the original's stage-end PatchMerging (`layers.i.downsample`) is timm's stage-start one (`layers.{i+1}.downsample`)
with the same 2x2 concatenation order.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from cmrcnet.encoders.registry import StateDict


class ConvStem(nn.Module):
    """The convolutional patch embedding of CTransPath, with the calling convention of timm's Swin patch_embed
    (NHWC output, `grid_size`)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Callable[..., nn.Module] | None = None, strict_img_size: bool = True,
                 output_fmt: str = "NHWC", device=None, dtype=None, **_ignored):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        if output_fmt != "NHWC":
            raise ValueError("ConvStem gives NHWC tokens only")
        kw = {"device": device, "dtype": dtype}
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        e8, e4 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, e8, kernel_size=3, stride=2, padding=1, bias=False, **kw),
            nn.BatchNorm2d(e8, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(e8, e4, kernel_size=3, stride=2, padding=1, bias=False, **kw),
            nn.BatchNorm2d(e4, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(e4, embed_dim, kernel_size=1, **kw),
        )
        self.norm = norm_layer(embed_dim, **kw) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"CTransPath expects {self.img_size} px input, got {tuple(x.shape[-2:])}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath() -> nn.Module:
    """Swin-T (timm) with the convolutional stem, no classifier: (B, 3, 224, 224) -> (B, 768)."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=224,
                             embed_layer=ConvStem)


_STAGE_END_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def convert_ctranspath(state: StateDict) -> StateDict:
    """The authors' checkpoint (old timm Swin layout, already unwrapped from 'model') -> build_ctranspath()'s keys."""
    old_layout = "layers.0.downsample.reduction.weight" in state
    out = {}
    for key, value in state.items():
        if key.startswith("head.") or key.endswith(("attn_mask", "relative_position_index")):
            continue
        if old_layout:
            key = _STAGE_END_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out
