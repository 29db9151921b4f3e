"""Hugging Face `transformers` ViT / DINOv2 checkpoints (Phikon, Phikon-v2) as timm VisionTransformer weights,
so these encoders need neither `transformers` nor remote code.

Key mapping (`vit.` / `dinov2.` model prefixes stripped first; layer i):

    embeddings.cls_token                                  -> cls_token
    embeddings.position_embeddings                        -> pos_embed (resampled to the target grid if it differs)
    embeddings.patch_embeddings.projection.{weight,bias}  -> patch_embed.proj.{weight,bias}
    encoder.layer.i.layernorm_before | norm1              -> blocks.i.norm1
    encoder.layer.i.attention.attention.{query,key,value} -> blocks.i.attn.qkv   (concatenated q, k, v on dim 0)
    encoder.layer.i.attention.output.dense                -> blocks.i.attn.proj
    encoder.layer.i.layer_scale1.lambda1                  -> blocks.i.ls1.gamma  (DINOv2)
    encoder.layer.i.layernorm_after | norm2               -> blocks.i.norm2
    encoder.layer.i.intermediate.dense | mlp.fc1          -> blocks.i.mlp.fc1
    encoder.layer.i.output.dense | mlp.fc2                -> blocks.i.mlp.fc2
    encoder.layer.i.layer_scale2.lambda1                  -> blocks.i.ls2.gamma  (DINOv2)
    layernorm                                             -> norm
    embeddings.mask_token, pooler.*                       -> dropped (masked-image training, unused pooler)

Both layouts compute the same function: pre-norm blocks, exact GELU, CLS token first, final LayerNorm; the
embedding is the final norm's CLS token (`last_hidden_state[:, 0]`), which is timm's `global_pool="token"`.
"""

from __future__ import annotations

import math
import re

import torch

from cmrcnet.encoders.registry import StateDict

_PREFIXES = ("vit.", "dinov2.", "model.")
_DROP = ("embeddings.mask_token", "pooler.")
_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def is_hf_vit(state: StateDict) -> bool:
    return any("embeddings.patch_embeddings.projection" in k for k in state)


def resample_pos_embed(pos: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """Position embeddings (1, prefix + g*g, C) resampled (bicubic) to (1, prefix + grid*grid, C); the prefix
    (CLS) position kept. Unchanged when the grid already fits."""
    n = pos.shape[1] - prefix
    old = math.isqrt(n)
    if old == grid or old * old != n:
        return pos
    patches = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([pos[:, :prefix], patches], dim=1)


def hf_vit_to_timm(state: StateDict, grid: int | None = None) -> StateDict:
    """A transformers ViTModel / Dinov2Model state dict -> timm VisionTransformer keys (see the module docstring);
    `grid`: the target patch grid side, to resample the position embeddings to. A state dict not in the
    transformers layout is returned unchanged (already timm's)."""
    if not is_hf_vit(state):
        return dict(state)
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_DROP):
            continue
        if m := _QKV.match(key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        new = key
        for pattern, repl in _RENAMES:
            new, hits = re.subn(pattern, repl, new)
            if hits:
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a transformers ViT checkpoint")
        out[new] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"layer {layer}: attention {kind} lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if grid is not None and "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], grid)
    return out
