"""The registered encoders. Facts (architecture, input size, normalisation, pooling, hub file) come from each
model's card and from HEST-Benchmark's model zoo (mahmoodlab/HEST@afd42c3,
src/hest/bench/cpath_model_zoo/inference_models.py) and TRIDENT (mahmoodlab/TRIDENT@a91fa84,
trident/patch_encoder_models/load.py); each entry's `source` says where, and `notes` what could not be verified.

Adding an encoder is one `register_encoder(EncoderSpec(...))` call here (or in the user's own code before use).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from timm.layers import SwiGLUPacked
from torch import nn

from cmrcnet.encoders.conch import build_conch, convert_conch
from cmrcnet.encoders.ctranspath import build_ctranspath, convert_ctranspath
from cmrcnet.encoders.hf_vit import hf_vit_to_timm
from cmrcnet.encoders.registry import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
    HubFile,
    pool_cls_and_patch_mean,
    pool_last_feature_map_mean,
    register_encoder,
)


def timm_builder(arch: str, **kwargs) -> partial:
    """A build() that makes timm architecture `arch` with `kwargs` (num_classes=0 unless set), random weights."""
    return partial(_timm_create, arch, kwargs)


def _timm_create(arch: str, kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs})


# ---- tiny-test: a tiny random ViT for the tests and the demo ----------------------------------------------------------
TINY_TEST = register_encoder(EncoderSpec(
    name="tiny-test",
    build=timm_builder("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
    embed_dim=16,
    input_size=32,
    hub=HubFile("cmrcnet/tiny-test-encoder", "pytorch_model.bin", repo_type="model", gated=True),
    source="cmrcnet (tests and demo): a timm ViT, img_size 32, patch 8, width 16, depth 1, 2 heads, CLS token",
    notes="random weights, no scientific value; its hub repo exists only on the tests' fake hub",
))


def write_tiny_test_weights(path: str | Path, seed: int = 0) -> Path:
    """A seeded random tiny-test checkpoint as its (fake) hub repo serves it: a plain state dict, torch.save'd to
    `path` (e.g. `<repo>/pytorch_model.bin`), for the tests and the demo's fake hub."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = {k: v.clone() for k, v in TINY_TEST.build().state_dict().items()}
    torch.save(state, path)
    return path


# ---- ResNet-50 (ImageNet), truncated after layer3 as in HEST-Benchmark ------------------------------------------------
def _drop_resnet_tail(state):
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


register_encoder(EncoderSpec(
    name="resnet50-imagenet",
    build=timm_builder("resnet50", features_only=True, out_indices=(3,)),
    embed_dim=1024,
    input_size=224,
    embed=pool_last_feature_map_mean,
    hub=HubFile("timm/resnet50.tv_in1k", "model.safetensors", repo_type="model", gated=False),
    convert=_drop_resnet_tail,
    source="HEST@afd42c3 src/hest/bench/cpath_model_zoo/inference_models.py (resnet50: timm resnet50.tv_in1k, "
           "features_only, out_indices [3], AdaptiveAvgPool2d(1), ImageNet normalisation); weights "
           "https://huggingface.co/timm/resnet50.tv_in1k",
    notes="truncated after layer3 (conv1..layer3, 1024 channels at stride 16), global average; layer4 and fc of "
          "the checkpoint are dropped",
))


# ---- UNI, UNI2-h (Mahmood lab) ----------------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="uni",
    build=timm_builder("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                       dynamic_img_size=True),
    embed_dim=1024,
    input_size=224,
    hub=HubFile("MahmoodLab/UNI", "pytorch_model.bin", gated=True),
    precision="fp16",
    source="https://huggingface.co/MahmoodLab/UNI ; HEST@afd42c3 inference_models.py (uni_v1: timm CLS token); "
           "TRIDENT@a91fa84 trident/patch_encoder_models/load.py (uni_v1 kwargs, Resize 224 + ImageNet norm)",
    notes="ViT-L/16 with layer scale, CLS token. HEST builds it from the hub's pretrained_cfg (not re-read here); "
          "normalisation is ImageNet per TRIDENT",
))

register_encoder(EncoderSpec(
    name="uni2-h",
    build=timm_builder("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                       init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
                       mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True),
    embed_dim=1536,
    input_size=224,
    hub=HubFile("MahmoodLab/UNI2-h", "pytorch_model.bin", gated=True),
    precision="bf16",
    source="https://huggingface.co/MahmoodLab/UNI2-h ; UNI@42715ef README / uni/get_encoder; TRIDENT@a91fa84 "
           "load.py (uni_v2 kwargs)",
    notes="ViT-H/14-like (1536 wide, 24 blocks, SwiGLU, 8 register tokens), CLS token, ImageNet normalisation. "
          "Not in HEST's own zoo (facts from TRIDENT/UNI)",
))


# ---- CONCH (image tower) ----------------------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="conch",
    build=build_conch,
    embed_dim=512,
    input_size=448,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    interpolation="bicubic",
    hub=HubFile("MahmoodLab/CONCH", "pytorch_model.bin", gated=True),
    convert=convert_conch,
    source="https://huggingface.co/MahmoodLab/CONCH ; mahmoodlab/CONCH@141cc09 open_clip_custom "
           "(conch_ViT-B-16.json, coca_model.py, vision_tower.py, transform.py); HEST@afd42c3 inference_models.py "
           "(encode_image(proj_contrast=False, normalize=False))",
    notes="built without CONCH's package: timm ViT-B/16 trunk at 448 px + attentional pooler (1 query, 8 heads) + "
          "LayerNorm, 512 values before the contrastive projection. Patches are resized to 448 (bicubic, "
          "antialiased torch resize; CONCH uses PIL). Not checked against CONCH's package output (needs the gated "
          "weights): the trunk keys assume CONCH's checkpoint uses timm's ViT names, which a fetch verifies",
))


# ---- CTransPath -------------------------------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="ctranspath",
    build=build_ctranspath,
    embed_dim=768,
    input_size=224,
    hub=HubFile("MahmoodLab/hest-bench", "fm_v1/ctranspath/ctranspath.pth", repo_type="dataset", gated=True),
    convert=convert_ctranspath,
    source="https://github.com/Xiyue-Wang/TransPath ; HEST@afd42c3 src/hest/bench/cpath_model_zoo/ctranspath/"
           "ctran.py and local_ckpts.json (fm_v1/ctranspath/ctranspath.pth in MahmoodLab/hest-bench)",
    notes="Swin-T + convolutional stem on timm's Swin (no timm_ctp); head removed; attention masks recomputed. "
          "Gating of MahmoodLab/hest-bench not determined (treated as gated). TRIDENT uses another file, "
          "fm_v1/ctranspath/CHIEF_CTransPath.pth (CHIEF's CTransPath), not this one",
))


# ---- Phikon, Phikon-v2 (Owkin; transformers checkpoints converted to timm) -------------------------------------------
def _hf_vit_convert(grid: int):
    return partial(hf_vit_to_timm, grid=grid)


register_encoder(EncoderSpec(
    name="phikon",
    build=timm_builder("vit_base_patch16_224", img_size=224, norm_layer=partial(nn.LayerNorm, eps=1e-12)),
    embed_dim=768,
    input_size=224,
    hub=HubFile("owkin/phikon", "pytorch_model.bin", gated=False),
    convert=_hf_vit_convert(14),
    source="https://huggingface.co/owkin/phikon (config.json @e9ad8d1: ViTModel, 768 wide, 12 layers, 12 heads, "
           "patch 16, 224 px, layer_norm_eps 1e-12, qkv_bias); HEST@afd42c3 inference_models.py (phikon: "
           "ViTModel add_pooling_layer=False, last_hidden_state[:, 0], ImageNet normalisation)",
    notes="transformers ViT weights mapped onto timm (cmrcnet.encoders.hf_vit). Weight file name from TRIDENT's "
          "message (pytorch_model.bin); not checked against transformers' output (not installed)",
))

register_encoder(EncoderSpec(
    name="phikon-v2",
    build=timm_builder("vit_large_patch16_224", img_size=224, init_values=1e-5),
    embed_dim=1024,
    input_size=224,
    hub=HubFile("owkin/phikon-v2", "model.safetensors", gated=False),
    convert=_hf_vit_convert(14),
    source="https://huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, model.safetensors 1.21 GB, "
           "arXiv 2409.09173); HEST@afd42c3 inference_models.py (phikon_v2: AutoModel, CLS of last_hidden_state, "
           "ImageNet normalisation)",
    notes="ViT-L/16 with layer scale, no register tokens, 224 px assumed: its config.json (image_size, "
          "layer_norm_eps, registers) was not retrievable; a different position grid is resampled (bicubic) at "
          "conversion, any other difference is a shape error at fetch. Not checked against transformers' output",
))


# ---- Virchow2 (Paige) -------------------------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="virchow2",
    build=timm_builder("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4,
                       global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
    embed_dim=2560,
    input_size=224,
    embed=pool_cls_and_patch_mean,
    interpolation="bicubic",
    hub=HubFile("paige-ai/Virchow2", "pytorch_model.bin", gated=True),
    precision="fp16",
    source="https://huggingface.co/paige-ai/Virchow2 ; HEST@afd42c3 inference_models.py (virchow2: concat(CLS, "
           "mean(out[:, 5:])), register tokens 1-4 skipped); TRIDENT@a91fa84 load.py (kwargs, Resize 224 bicubic, "
           "ImageNet normalisation)",
    notes="ViT-H/14 with SwiGLU and 4 registers; embedding = CLS ++ mean of the 256 patch tokens (2560)",
))


# ---- H-optimus-0, H-optimus-1, H0-mini (Bioptimus) --------------------------------------------------------------------
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

register_encoder(EncoderSpec(
    name="h-optimus-0",
    build=timm_builder("vit_giant_patch14_reg4_dinov2", img_size=224, global_pool="token", init_values=1e-5,
                       dynamic_img_size=False),
    embed_dim=1536,
    input_size=224,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    hub=HubFile("bioptimus/H-optimus-0", "pytorch_model.bin", gated=False),
    precision="fp16",
    source="https://huggingface.co/bioptimus/H-optimus-0 (config.json: vit_giant_patch14_reg4_dinov2, 1536, "
           "global_pool token, 224 px fixed); HEST@afd42c3 inference_models.py (hoptimus0 kwargs and normalisation)",
    notes="ViT-g/14 with SwiGLU and 4 registers, CLS token. No gating seen (treated as public)",
))

register_encoder(EncoderSpec(
    name="h-optimus-1",
    build=timm_builder("vit_giant_patch14_reg4_dinov2", img_size=224, global_pool="token", init_values=1e-5,
                       dynamic_img_size=True),
    embed_dim=1536,
    input_size=224,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    hub=HubFile("bioptimus/H-optimus-1", "pytorch_model.bin", gated=True),
    precision="fp16",
    source="https://huggingface.co/bioptimus/H-optimus-1 ; TRIDENT@a91fa84 load.py (hoptimus1 kwargs, same "
           "normalisation as H-optimus-0)",
    notes="same architecture as H-optimus-0; not in HEST's own zoo (facts from TRIDENT)",
))

register_encoder(EncoderSpec(
    name="h0-mini",
    build=timm_builder("vit_base_patch14_reg4_dinov2", img_size=224, init_values=1e-5, mlp_layer=SwiGLUPacked,
                       act_layer=nn.SiLU),
    embed_dim=768,
    input_size=224,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    hub=HubFile("bioptimus/H0-mini", "pytorch_model.bin", gated=True),
    precision="fp16",
    source="https://huggingface.co/bioptimus/H0-mini ; HEST@afd42c3 inference_models.py (h0_mini: hf-hub with "
           "SwiGLUPacked/SiLU, default CLS token, 768)",
    notes="ViT-B/14 with 4 registers and SwiGLU (1 + 4 + 256 tokens at 224 px), CLS token as HEST's default. "
          "UNVERIFIED: the hub config.json was not retrieved, so the timm base architecture, the MLP ratio "
          "(timm's default 4 assumed) and the weight file name are assumptions (a mismatch is a shape error at "
          "fetch); the normalisation is H-optimus-0's, as third-party usage code states",
))


# ---- Prov-GigaPath (tile encoder) -------------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="gigapath",
    build=timm_builder("vit_giant_patch14_dinov2", img_size=224, patch_size=16, embed_dim=1536, depth=40,
                       num_heads=24, mlp_ratio=5.33334, init_values=1e-5),
    embed_dim=1536,
    input_size=224,
    resize_to=256,
    interpolation="bicubic",
    hub=HubFile("prov-gigapath/prov-gigapath", "pytorch_model.bin", gated=True),
    source="https://huggingface.co/prov-gigapath/prov-gigapath ; HEST@afd42c3 inference_models.py (gigapath: "
           "timm pooled CLS, Resize 256 bicubic + CenterCrop 224 + ImageNet normalisation); TRIDENT@a91fa84 load.py "
           "(vit_giant_patch14_dinov2 kwargs)",
    notes="ViT-g/16 (DINOv2 giant with patch 16, SwiGLU from timm's dinov2 defaults), CLS token; patches resized to "
          "256 then centre-cropped to 224 as in HEST. init_values from timm's default for the architecture",
))
