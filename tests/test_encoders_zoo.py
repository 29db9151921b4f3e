"""The encoder registry: every entry builds (on the meta device: no memory, no init time) and embeds to its
declared size; facts typed in from the models' cards / HEST; strict loading; uint8 embedding; checkpoint
conversions (transformers ViT -> timm, CTransPath's authors' layout, CONCH's CoCa checkpoint)."""

from __future__ import annotations

import math
import re
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from cmrcnet.encoders import (
    EncoderSpec,
    FrozenEncoder,
    get_encoder,
    list_encoders,
    load_encoder,
    meta_state_dict,
    register_encoder,
    state_dict_problems,
    unregister_encoder,
    unwrap_state_dict,
)
from cmrcnet.encoders.hf_vit import hf_vit_to_timm
from cmrcnet.errors import CMRCNetError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

# name: (embed_dim, input_size, (mean, std)) as /tmp/facts/hest_facts.md §3 (HEST zoo, TRIDENT, model cards) give them
FACTS = {
    "resnet50-imagenet": (1024, 224, IMAGENET),
    "ctranspath": (768, 224, IMAGENET),
    "uni": (1024, 224, IMAGENET),
    "uni2-h": (1536, 224, IMAGENET),
    "conch": (512, 448, CLIP),
    "phikon": (768, 224, IMAGENET),
    "phikon-v2": (1024, 224, IMAGENET),
    "virchow2": (2560, 224, IMAGENET),
    "h-optimus-0": (1536, 224, HOPTIMUS),
    "h-optimus-1": (1536, 224, HOPTIMUS),
    "gigapath": (1536, 224, IMAGENET),
    "h0-mini": (768, 224, HOPTIMUS),
}
# parameter counts (millions) the cards / papers state, to 2 significant digits
PARAMS_M = {"uni": 300, "uni2-h": 680, "virchow2": 630, "h-optimus-0": 1100, "gigapath": 1100, "phikon": 86,
            "ctranspath": 28}


@pytest.mark.parametrize("name", list_encoders())
def test_every_entry_builds_on_meta_and_embeds_to_its_dim(name):
    spec = get_encoder(name)
    with torch.device("meta"):
        module = spec.build()
        out = spec.embed(module, torch.empty(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, spec.embed_dim)
    assert spec.source and len(spec.mean) == len(spec.std) == 3
    assert spec.hub is not None and spec.hub.filename


def test_the_registry_holds_the_issues_encoders():
    assert set(FACTS) | {"tiny-test"} <= set(list_encoders())


@pytest.mark.parametrize("name", sorted(FACTS))
def test_facts_from_the_cards(name):
    dim, size, (mean, std) = FACTS[name]
    spec = get_encoder(name)
    assert (spec.embed_dim, spec.input_size) == (dim, size)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_parameter_counts_match_the_cards(name):
    n = sum(t.numel() for t in meta_state_dict(get_encoder(name)).values() if t.is_floating_point()) / 1e6
    assert n == pytest.approx(PARAMS_M[name], rel=0.06)


def test_hub_files_and_pooling_rules():
    assert get_encoder("ctranspath").hub.repo_type == "dataset"
    assert get_encoder("ctranspath").hub.filename == "fm_v1/ctranspath/ctranspath.pth"
    assert get_encoder("ctranspath").hub.repo_id == "MahmoodLab/hest-bench"
    tiny = get_encoder("tiny-test").hub
    assert (tiny.repo_id, tiny.filename, tiny.repo_type, tiny.gated) == (
        "cmrcnet/tiny-test-encoder", "pytorch_model.bin", "model", True)
    assert get_encoder("gigapath").resize_to == 256  # HEST: Resize(256) + CenterCrop(224)


def test_virchow2_is_cls_and_the_mean_of_patch_tokens_without_registers():
    spec = get_encoder("virchow2")
    with torch.device("meta"):
        module = spec.build()
    assert module.num_prefix_tokens == 5  # CLS + 4 registers: patch tokens start at 5, as HEST's out[:, 5:]
    tokens = torch.randn(2, 5 + 4, 3)

    class Fake(nn.Module):
        num_prefix_tokens = 5

        def forward_features(self, x):
            return tokens

    out = spec.embed(Fake(), None)
    assert torch.equal(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))


def test_unknown_names_are_one_line_with_close_names():
    with pytest.raises(CMRCNetError, match=r"did you mean .*h-optimus-0") as err:
        get_encoder("h-optimus0")
    assert "\n" not in str(err.value)
    with pytest.raises(CMRCNetError, match="registered: .*tiny-test"):
        get_encoder("xyzzy")


def test_adding_an_encoder_is_one_entry():
    spec = EncoderSpec(name="my-vit", build=lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0,
                                                                      img_size=32, patch_size=16, depth=1),
                       embed_dim=192, input_size=32, source="test")
    register_encoder(spec)
    try:
        assert get_encoder("my-vit") is spec and "my-vit" in list_encoders()
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(spec)
        assert load_encoder("my-vit", None).embed_uint8(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 192)
    finally:
        unregister_encoder("my-vit")


# ---- loading and embedding -------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in get_encoder("tiny-test").build().state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path, state


def test_load_encoder_is_frozen_and_loads_every_tensor(tiny_weights):
    path, state = tiny_weights
    enc = load_encoder("tiny-test", path)
    assert isinstance(enc, FrozenEncoder) and enc.spec.name == "tiny-test" and enc.embed_dim == 16
    own = enc.model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training


def test_random_weights_are_announced(caplog):
    with caplog.at_level("WARNING", logger="cmrcnet"):
        load_encoder("tiny-test", None)
    assert "RANDOM weights" in caplog.text


@pytest.mark.parametrize("change, expected", [
    ("missing", r"missing keys: 1 \(norm\.bias\)"),
    ("unexpected", r"unexpected keys: 1 \(extra\.weight\)"),
    ("shape", r"shape mismatches: 1 \(cls_token \(1, 1, 8\) vs \(1, 1, 16\)\)"),
])
def test_strict_loading_names_the_file_on_one_line(tiny_weights, tmp_path, change, expected):
    _, state = tiny_weights
    state = dict(state)
    if change == "missing":
        del state["norm.bias"]
    elif change == "unexpected":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["cls_token"] = torch.zeros(1, 1, 8)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CMRCNetError, match=expected) as err:
        load_encoder("tiny-test", bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: does not fit encoder 'tiny-test'") and "\n" not in msg


def test_unreadable_and_absent_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a weight file")
    with pytest.raises(CMRCNetError, match=f"^{re.escape(str(junk))}: cannot read weights") as err:
        load_encoder("tiny-test", junk)
    assert "\n" not in str(err.value)
    with pytest.raises(CMRCNetError, match="weights file not found"):
        load_encoder("tiny-test", tmp_path / "absent.safetensors")


def test_a_hub_checkpoint_is_converted_when_loaded_directly(tiny_weights, tmp_path):
    _, state = tiny_weights
    pth = tmp_path / "pytorch_model.bin"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, pth)
    enc = load_encoder("tiny-test", pth)
    assert torch.equal(enc.model.cls_token, state["cls_token"])


def hand_embedding(model: nn.Module, patches: np.ndarray, size: int, mean, std) -> torch.Tensor:
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features(x)[:, 0]  # tokens after the final norm; CLS first


@pytest.mark.parametrize("side", [32, 48, 20])
def test_embed_uint8_is_resize_normalise_forward_cls(tiny_weights, side):
    path, _ = tiny_weights
    enc = load_encoder("tiny-test", path)
    patches = np.random.default_rng(side).integers(0, 256, size=(5, side, side, 3), dtype=np.uint8)
    expected = hand_embedding(enc.model, patches, 32, enc.spec.mean, enc.spec.std)
    got = enc.embed_uint8(patches)
    assert got.dtype == torch.float32 and got.shape == (5, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.embed_uint8(torch.from_numpy(patches)), expected, rtol=1e-5, atol=1e-6)


def test_resize_then_centre_crop_when_the_card_says_so(tiny_weights):
    path, _ = tiny_weights
    base = get_encoder("tiny-test")
    spec = EncoderSpec(name="tiny-crop", build=base.build, embed_dim=16, input_size=32, resize_to=40, source="test")
    enc = load_encoder(spec, path)
    patches = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    x = F.interpolate(torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255, size=(40, 40), mode="bilinear",
                      align_corners=False, antialias=True)[:, :, 4:36, 4:36]
    torch.testing.assert_close(enc.preprocess(patches), (x - enc.mean) / enc.std)


def test_bad_patch_arrays_are_one_line(tiny_weights):
    enc = load_encoder("tiny-test", tiny_weights[0])
    with pytest.raises(CMRCNetError, match=r"expected uint8 \(N, H, W, 3\)"):
        enc.embed_uint8(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(CMRCNetError, match=r"expected uint8 \(N, H, W, 3\), got torch.float32"):
        enc.embed_uint8(np.zeros((2, 32, 32, 3), np.float32))


def test_a_module_with_unsaved_buffers_is_built_for_real(tmp_path):
    """Swin's relative-position indices are not in its state dict: the meta-device fast path must not leave them."""

    def build():
        return timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=32, window_size=4,
                                 embed_dim=16, depths=(1, 1), num_heads=(1, 2))

    spec = EncoderSpec(name="tiny-swin", build=build, embed_dim=32, input_size=32, source="test")
    torch.manual_seed(0)
    ref = build().eval()
    save_file({k: v.clone() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    enc = load_encoder(spec, tmp_path / "w.safetensors")
    assert not any(b.is_meta for b in enc.buffers())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), ref(x))


# ---- conversions -----------------------------------------------------------------------------------------------------

def test_unwrap_state_dict():
    t = torch.zeros(1)
    assert unwrap_state_dict({"state_dict": {"module.a": t}}) == {"a": t}
    assert unwrap_state_dict({"model": {"a": t}}) == {"a": t}
    with pytest.raises(CMRCNetError, match="not a state dict"):
        unwrap_state_dict({"model": 3}, "f.pth")


def timm_to_hf(state: dict[str, torch.Tensor], depth: int, dinov2: bool) -> dict[str, torch.Tensor]:
    """The inverse of the conversion, written independently: timm ViT tensors in transformers' layout."""
    hf = {"vit.embeddings.cls_token": state["cls_token"], "vit.embeddings.position_embeddings": state["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
          "vit.embeddings.mask_token": torch.zeros_like(state["cls_token"]),
          "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"],
          "vit.pooler.dense.weight": torch.zeros(4, 4), "vit.pooler.dense.bias": torch.zeros(4)}
    for i in range(depth):
        b, layer = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if dinov2 else
                 {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                  "mlp.fc2": "output.dense"})
        for ours, theirs in {**names, "attn.proj": "attention.output.dense"}.items():
            for p in ("weight", "bias"):
                hf[f"{layer}{theirs}.{p}"] = state[f"{b}{ours}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = state[f"{b}attn.qkv.{p}"].chunk(3, dim=0)
            hf.update({f"{layer}attention.attention.query.{p}": q, f"{layer}attention.attention.key.{p}": k,
                       f"{layer}attention.attention.value.{p}": v})
        if dinov2:
            hf[f"{layer}layer_scale1.lambda1"] = state[f"{b}ls1.gamma"]
            hf[f"{layer}layer_scale2.lambda1"] = state[f"{b}ls2.gamma"]
    return hf


def reference_hf_vit(hf: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int, eps: float,
                     dinov2: bool) -> torch.Tensor:
    """transformers' ViT / DINOv2 forward written from its tensors' names: CLS of last_hidden_state."""
    g = lambda name: hf["vit." + name]  # noqa: E731
    p = g("embeddings.patch_embeddings.projection.weight")
    h = F.conv2d(x, p, g("embeddings.patch_embeddings.projection.bias"), stride=p.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([g("embeddings.cls_token").expand(len(x), -1, -1), h], 1) + g("embeddings.position_embeddings")
    n1, n2, f1, f2 = (("norm1", "norm2", "mlp.fc1", "mlp.fc2") if dinov2 else
                      ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"))
    for i in range(depth):
        L = lambda name, i=i: (g(f"encoder.layer.{i}.{name}.weight"), g(f"encoder.layer.{i}.{name}.bias"))  # noqa: E731
        B, T, C = h.shape
        y = F.layer_norm(h, (C,), *L(n1), eps=eps)
        q, k, v = (F.linear(y, *L(f"attention.attention.{n}")).view(B, T, heads, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        y = F.linear(att.transpose(1, 2).reshape(B, T, C), *L("attention.output.dense"))
        h = h + (y * g(f"encoder.layer.{i}.layer_scale1.lambda1") if dinov2 else y)
        y = F.linear(F.gelu(F.linear(F.layer_norm(h, (C,), *L(n2), eps=eps), *L(f1))), *L(f2))
        h = h + (y * g(f"encoder.layer.{i}.layer_scale2.lambda1") if dinov2 else y)
    return F.layer_norm(h, (h.shape[-1],), g("layernorm.weight"), g("layernorm.bias"), eps=eps)[:, 0]


@pytest.mark.parametrize("dinov2", [False, True], ids=["phikon-ViTModel", "phikon-v2-Dinov2Model"])
def test_transformers_vit_checkpoints_convert_to_timm(dinov2, tmp_path):
    eps = 1e-6 if dinov2 else 1e-12
    kwargs = dict(num_classes=0, img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                  norm_layer=partial(nn.LayerNorm, eps=eps), init_values=0.5 if dinov2 else None)

    def build():
        return timm.create_model("vit_tiny_patch16_224", **kwargs)

    torch.manual_seed(3)
    donor = build()
    with torch.no_grad():
        for p in donor.parameters():  # non-trivial norms and layer scales too
            p.add_(0.1 * torch.randn_like(p))
    hf = timm_to_hf(donor.state_dict(), 2, dinov2)
    spec = EncoderSpec(name="tiny-hf", build=build, embed_dim=16, input_size=32, source="test",
                       convert=lambda s: hf_vit_to_timm(s, grid=4))
    torch.save(hf, tmp_path / "pytorch_model.bin")
    enc = load_encoder(spec, tmp_path / "pytorch_model.bin")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference_hf_vit(hf, x, depth=2, heads=2, eps=eps, dinov2=dinov2)
    torch.testing.assert_close(enc(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_phikon_hub_layouts_map_onto_the_registered_architecture(name):
    spec = get_encoder(name)
    own = meta_state_dict(spec)
    depth = 1 + max(int(k.split(".")[1]) for k in own if k.startswith("blocks."))
    hf = timm_to_hf(own, depth, dinov2=name == "phikon-v2")
    assert state_dict_problems(spec.prepare_state_dict(hf), own) == []


def test_phikon_v2_position_grid_is_resampled():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    hf = {"embeddings.patch_embeddings.projection.weight": torch.zeros(1), "embeddings.position_embeddings": pos}
    out = hf_vit_to_timm(hf, grid=14)["pos_embed"]
    assert out.shape == (1, 1 + 14 * 14, 8) and torch.equal(out[:, 0], pos[:, 0])


def test_ctranspath_authors_checkpoint_layout_converts():
    """The authors' file: weights under 'model', timm-0.5 Swin layout (downsample at a stage's end), attention masks
    and relative-position indices saved, a classifier head; built on meta, no memory."""
    spec = get_encoder("ctranspath")
    own = meta_state_dict(spec)
    assert "patch_embed.proj.0.weight" in own and "patch_embed.proj.6.bias" in own
    authors = {}
    for key, value in own.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        authors[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key] = value
    for layer, block in [(0, 1), (1, 1), (2, 1), (2, 3), (2, 5)]:
        authors[f"layers.{layer}.blocks.{block}.attn_mask"] = torch.empty(1, device="meta")
    authors["layers.0.blocks.0.attn.relative_position_index"] = torch.empty(49, 49, device="meta")
    authors["head.weight"] = torch.empty(1000, 768, device="meta")
    authors["head.bias"] = torch.empty(1000, device="meta")
    assert "layers.0.downsample.reduction.weight" in authors and "layers.3.downsample.norm.weight" not in authors
    assert state_dict_problems(spec.prepare_state_dict({"model": authors}), own) == []


def test_ctranspath_stem_is_the_papers():
    from cmrcnet.encoders.ctranspath import ConvStem

    stem = ConvStem(img_size=32, embed_dim=96, norm_layer=nn.LayerNorm)
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.bias is not None) for c in convs] == [
        (3, 12, 3, 2, False), (12, 24, 3, 2, False), (24, 96, 1, 1, True)]
    assert stem(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8, 96)  # NHWC at stride 4, as timm's Swin wants


def test_conch_coca_checkpoint_keeps_the_image_tower_only():
    spec = get_encoder("conch")
    own = meta_state_dict(spec)
    full = {f"visual.{k}": v for k, v in own.items()}
    full.update({"visual.proj_contrast": torch.empty(512, 512, device="meta"),
                 "visual.attn_pool_caption.query": torch.empty(256, 768, device="meta"),
                 "visual.ln_caption.weight": torch.empty(768, device="meta"),
                 "text.token_embedding.weight": torch.empty(32007, 768, device="meta"),
                 "logit_scale": torch.empty((), device="meta")})
    assert state_dict_problems(spec.prepare_state_dict({"state_dict": full}), own) == []
    assert own["attn_pool_contrast.attn.k_proj_weight"].shape == (512, 768)  # kdim 768 -> separate projections


def test_resnet50_is_truncated_after_layer3():
    spec = get_encoder("resnet50-imagenet")
    own = meta_state_dict(spec)
    assert not any(k.startswith(("layer4.", "fc.")) for k in own)
    with torch.device("meta"):
        full = timm.create_model("resnet50", num_classes=1000).state_dict()
    assert state_dict_problems(spec.prepare_state_dict(full), own) == []
