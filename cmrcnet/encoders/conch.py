"""CONCH's image tower (Lu et al., Nature Medicine 2024) without CONCH's own package or open_clip.

Facts (mahmoodlab/CONCH@141cc09: conch/open_clip_custom/model_configs/conch_ViT-B-16.json, coca_model.py,
vision_tower.py, transformer.py): the trunk is a timm VisionTransformer (width 768, depth 12, 12 heads, MLP ratio
4, 448 px, patch 16, no classifier) whose `forward_features` tokens (final norm applied) feed an attentional
pooler for the contrastive embedding: one learned query (512) attends over the LayerNorm'd tokens through
`nn.MultiheadAttention(512, 8 heads, kdim=vdim=768)` after a LayerNorm of the query; the pooled query then goes
through a LayerNorm (`ln_contrast`). HEST-Benchmark embeds with `encode_image(x, proj_contrast=False,
normalize=False)`, which is exactly that: no `proj_contrast` projection and no L2 normalisation, 512 values.

Checkpoint keys -> ours: `visual.trunk.*`, `visual.attn_pool_contrast.*` and `visual.ln_contrast.*` lose the
`visual.` prefix; the text tower, the captioning pooler, the projection and the logit scale are left out.
"""

from __future__ import annotations

import torch
from torch import nn

from cmrcnet.encoders.registry import StateDict

KEEP = ("trunk.", "attn_pool_contrast.", "ln_contrast.")


class AttentionPool(nn.Module):
    """`n_queries` learned queries attending over a token sequence (keys/values of another width)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.ln_k(tokens).transpose(0, 1)  # (L, B, C): sequence first, as the checkpoint's module was
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out = self.attn(query, context, context, need_weights=False)[0]
        return out.transpose(0, 1)  # (B, n_queries, dim)


class ConchVisual(nn.Module):
    """CONCH v1 image tower up to the contrastive embedding before projection: (B, 3, 448, 448) -> (B, 512)."""

    def __init__(self, img_size: int = 448, embed_dim: int = 512, width: int = 768, depth: int = 12,
                 heads: int = 12, patch_size: int = 16, pool_heads: int = 8):
        super().__init__()
        import timm

        self.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                                       patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
                                       mlp_ratio=4.0, dynamic_img_size=True)
        self.attn_pool_contrast = AttentionPool(embed_dim, width, pool_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(images)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def build_conch() -> nn.Module:
    return ConchVisual()


def convert_conch(state: StateDict) -> StateDict:
    """CONCH's full CoCa checkpoint (or its `visual.` part) -> ConchVisual's keys."""
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if k.startswith(KEEP)}
