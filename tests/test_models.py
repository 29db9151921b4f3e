"""Models: tiny configurations on CPU, hand-checked losses, the config switches, and the error messages."""

from __future__ import annotations

import math

import pytest
import torch

from cmrcnet.errors import CMRCNetError
from cmrcnet.models import (
    ReconstructionLoss,
    SoftContrastiveLoss,
    create_encoder,
    create_model,
    list_models,
)
from cmrcnet.models import cmrcnet as cmrcnet_module
from cmrcnet.models.cmrcnet import random_feature_mask

G = 12
TINY_VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY = {
    "cmrcnet": {"encoder_kwargs": TINY_VIT, "embed_dim": 16, "snn_hidden": 32, "n_gene_tokens": 4,
                "cross_heads": 2, "fusion_heads": 2},
    "bleep": {"encoder": "resnet10t", "embed_dim": 16, "input_size": 32},
    "stnet": {"encoder": "resnet10t", "input_size": 32},
    "histogene": {"n_pos": 10, "patch_px": 8, "dim": 16, "depth": 1, "heads": 2},
}


def spot_batch(b=4, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 3, size, size, generator=gen), "expr": torch.rand(b, G, generator=gen) * 3}


def slide_batch(n=6, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.arange(n) // 3, torch.arange(n) % 3], dim=1)[None]
    return {"image": torch.randn(1, n, 3, size, size, generator=gen), "pos": pos,
            "expr": torch.rand(1, n, G, generator=gen)}


def tiny(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model(name, G, **{**TINY[name], **overrides})


# --- every model: forward, backward, shapes -------------------------------------------------------------

@pytest.mark.parametrize("name", ["cmrcnet", "bleep", "stnet", "histogene"])
def test_forward_backward_tiny(name):
    model = tiny(name)
    assert model.slide_level == (name == "histogene")
    batch = slide_batch() if model.slide_level else spot_batch(size=model.input_size)
    model.train()
    out = model(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    encoder = model.patch_embed if name == "histogene" else model.image_encoder
    if name == "stnet":  # zero output weights pass no gradient to the encoder until the first step
        assert model.head.weight.grad.abs().sum() > 0
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
        model(batch)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())

    model.eval()
    with torch.no_grad():
        if model.kind == "retrieval":
            img, expr = model.embed_image(batch["image"]), model.embed_expression(batch["expr"])
            assert img.shape == expr.shape == (4, TINY[name]["embed_dim"])
            torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
            torch.testing.assert_close(expr.norm(dim=-1), torch.ones(4))
        else:
            expected = (1, 6, G) if model.slide_level else (4, G)
            assert model.predict(batch).shape == expected


def test_list_models():
    assert list_models() == ["bleep", "cmrcnet", "crossmodal", "foundation", "histogene", "stnet"]


def test_cmrcnet_paper_size_token_shape():
    model = create_model("cmrcnet", G)
    assert model.input_size == 224
    model.eval()
    with torch.no_grad():
        emb, tokens = model.image_features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 50, 768)
    assert emb.shape == (1, 256)


def test_determinism_same_seed_same_init_and_loss():
    a, b = tiny("cmrcnet", seed=3), tiny("cmrcnet", seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    losses = []
    for model in (a, b):
        model.train()
        torch.manual_seed(7)
        losses.append(model(spot_batch())["loss"])
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(tiny("cmrcnet", seed=4).state_dict()["token_proj.weight"], a.token_proj.weight)


# --- losses --------------------------------------------------------------------------------------------

def _soft_ce(logits, targets):
    """Plain-math soft cross-entropy, mean over rows."""
    total = 0.0
    for row, t in zip(logits, targets, strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        total -= sum(tj * (v - log_z) for tj, v in zip(t, row, strict=True))
    return total / len(logits)


def _softmax_rows(m):
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in m]


def _t(m):
    return [list(r) for r in zip(*m, strict=True)]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_contrastive_loss_by_hand(tau):
    img = [[1.0, 0.0], [0.0, 1.0]]
    expr = [[1.0, 0.0], [1.0, 1.0]]
    # expr @ img.T = [[1, 0], [1, 1]]; img @ img.T = I; expr @ expr.T = [[1, 1], [1, 2]]
    logits = [[1 / tau, 0.0], [1 / tau, 1 / tau]]
    targets = _softmax_rows([[1.0 * tau, 0.5 * tau], [0.5 * tau, 1.5 * tau]])
    expected = (_soft_ce(logits, targets) + _soft_ce(_t(logits), _t(targets))) / 2
    got = SoftContrastiveLoss(tau)(torch.tensor(img), torch.tensor(expr))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    if tau == 1.0:  # the same number, worked out once on paper
        assert got.item() == pytest.approx(0.681661, abs=1e-6)


def test_reconstruction_loss_values():
    pred, target = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert ReconstructionLoss("mse")(pred, target).item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert ReconstructionLoss("cosine")(pred, target).item() == pytest.approx((1 + 0) / 2)
    with pytest.raises(CMRCNetError, match="recon_loss"):
        ReconstructionLoss("l1")


# --- CMRCNet masking and reconstruction switches -------------------------------------------------------

@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_mask_rate_exact_per_sample(rate):
    x = torch.rand(5, 7, 9) + 1  # no zeros before masking
    masked = random_feature_mask(x, rate, generator=torch.Generator().manual_seed(0))
    zeros = (masked == 0).flatten(1).sum(dim=1)
    assert zeros.tolist() == [round(rate * 63)] * 5
    kept = masked != 0
    assert torch.equal(masked[kept], x[kept])
    assert not torch.equal(zeros, torch.zeros(5)) and not torch.equal(kept[0], kept[1])  # random, per sample


def test_masking_only_in_training(monkeypatch):
    rates = []

    def spy(x, rate, generator=None):
        rates.append(rate)
        return random_feature_mask(x, rate, generator)

    monkeypatch.setattr(cmrcnet_module, "random_feature_mask", spy)
    model = tiny("cmrcnet", mask_rate=0.7)
    model.train()
    model(spot_batch())
    assert rates == [0.7]
    model.eval()
    with torch.no_grad():
        first, second = model(spot_batch()), model(spot_batch())
    assert rates == [0.7]
    assert torch.equal(first["loss"], second["loss"])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_recon_loss_parts(kind):
    model = tiny("cmrcnet", recon_loss=kind).eval()
    with torch.no_grad():
        out = model(spot_batch())
    assert set(out) == {"loss", "loss_con", "loss_rec"}
    expected = torch.log1p(out["loss_con"]) + torch.log1p(out["loss_rec"])
    torch.testing.assert_close(out["loss"], expected)


def test_recon_loss_none_is_contrastive_only():
    model = tiny("cmrcnet", recon_loss="none")
    assert not hasattr(model, "token_proj") and model.recon_criterion is None
    out = model(spot_batch())
    assert set(out) == {"loss", "loss_con"}
    torch.testing.assert_close(out["loss"], torch.log1p(out["loss_con"]))
    full = tiny("cmrcnet")
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("target", ["image", "expression"])
@pytest.mark.parametrize("detach", [True, False])
def test_recon_target_and_detach(target, detach, monkeypatch):
    model = tiny("cmrcnet", recon_target=target, detach_target=detach).eval()  # eval: no dropout, same heads
    seen = {}
    forward = model.recon_criterion.forward

    def spy(pred, tgt):
        seen["target"] = tgt
        return forward(pred, tgt)

    monkeypatch.setattr(model.recon_criterion, "forward", spy)
    batch = spot_batch()
    model(batch)
    with torch.no_grad():
        wanted = (model.image_features(batch["image"])[0] if target == "image"
                  else model.expression_head(batch["expr"]))
    torch.testing.assert_close(seen["target"], wanted)
    assert seen["target"].requires_grad is not detach


@pytest.mark.parametrize("key, value", [("recon_loss", "l1"), ("recon_target", "genes"), ("mask_rate", 1.0),
                                        ("cross_heads", 3)])
def test_cmrcnet_bad_settings(key, value):
    with pytest.raises(CMRCNetError, match=key):
        tiny("cmrcnet", **{key: value})


def test_vit_input_size_must_match():
    with pytest.raises(CMRCNetError, match="input_size"):
        tiny("cmrcnet", input_size=64)
    assert tiny("cmrcnet").input_size == 32


# --- STNet, HisToGene ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stnet", "histogene"])
def test_regression_models_start_at_mean_expression(name):
    model = tiny(name).eval()
    mean = torch.linspace(0.5, 2.0, G)
    model.set_output_bias(mean)
    batch = slide_batch() if model.slide_level else spot_batch()
    with torch.no_grad():
        pred = model.predict(batch)
    assert torch.equal(pred, mean.expand(*pred.shape))
    with pytest.raises(CMRCNetError, match="genes"):
        model.set_output_bias(torch.zeros(G + 1))


def test_histogene_position_out_of_range():
    model = tiny("histogene").eval()
    batch = slide_batch()
    batch["pos"][0, 2, 1] = 10  # n_pos = 10
    with pytest.raises(CMRCNetError, match="n_pos >= 11"):
        model(batch)
    batch["pos"][0, 2, 1] = -1
    with pytest.raises(CMRCNetError, match="pos"):
        model(batch)


def test_histogene_positions_matter():
    model = tiny("histogene").eval()
    batch = slide_batch()
    moved = {**batch, "pos": batch["pos"] + 1}
    swapped = {**batch, "pos": batch["pos"].flip(-1)}  # rows and columns have their own embeddings
    with torch.no_grad():
        base = model.predict(batch)
        assert not torch.allclose(base, model.predict(moved))
        assert not torch.allclose(base, model.predict(swapped))
        resized = {**batch, "image": torch.nn.functional.interpolate(batch["image"][0], size=16)[None]}
        assert model.predict(resized).shape == base.shape  # other patch sizes are resized to patch_px


# --- registry and encoders -----------------------------------------------------------------------------

def test_unknown_model_lists_valid_names():
    with pytest.raises(CMRCNetError, match="bleep, cmrcnet, crossmodal, foundation, histogene, stnet"):
        create_model("cmrcnett", G)


def test_unknown_setting_lists_known():
    with pytest.raises(CMRCNetError, match="unknown setting 'mask_ratio'.*mask_rate"):
        create_model("cmrcnet", G, mask_ratio=0.5)
    with pytest.raises(CMRCNetError, match="n_genes"):
        create_model("stnet", 0)


def test_unknown_timm_encoder_suggests():
    with pytest.raises(CMRCNetError, match="did you mean.*vit_base_patch32_224"):
        create_encoder("vit_base_patch32_22")
    with pytest.raises(CMRCNetError, match="resnet50"):
        create_model("bleep", G, encoder="resnet_50")


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(CMRCNetError, match="not found"):
        create_encoder("resnet10t", pretrained_path=tmp_path / "nope.pth")
    with pytest.raises(CMRCNetError, match="not found"):
        create_model("stnet", G, encoder="resnet10t", pretrained_path=str(tmp_path / "nope.pth"))


def _assert_same_weights(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_pretrained_state_dict_loads_back(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_encoder("resnet10t", num_classes=5)  # with a classifier, which the loader drops
    state = source.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.manual_seed(2)
    reference = create_encoder("resnet10t")
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    for name in ("plain.pth", "ckpt.pth", "w.safetensors"):
        torch.manual_seed(2)
        loaded = create_encoder("resnet10t", pretrained_path=tmp_path / name)
        _assert_same_weights(loaded, reference)
    torch.manual_seed(2)
    model = create_model("bleep", G, encoder="resnet10t", pretrained_path=str(tmp_path / "plain.pth"))
    _assert_same_weights(model.image_encoder, reference)


def test_pretrained_mismatch_is_reported(tmp_path):
    state = create_encoder("resnet10t").state_dict()
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CMRCNetError, match=r"missing keys: 1 \(conv1.0.weight\).*unexpected keys: 1"):
        create_encoder("resnet10t", pretrained_path=tmp_path / "w.pth")
    loaded = create_encoder("resnet10t", pretrained_path=tmp_path / "w.pth", strict=False)
    assert torch.equal(loaded.state_dict()["conv1.1.weight"], state["conv1.1.weight"])
    torch.save(create_encoder("resnet18").state_dict(), tmp_path / "other.pth")
    with pytest.raises(CMRCNetError, match="shape mismatches"):
        create_encoder("resnet10t", pretrained_path=tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("not weights")
    with pytest.raises(CMRCNetError, match="cannot read weights"):
        create_encoder("resnet10t", pretrained_path=tmp_path / "junk.pth")


def test_foundation_encoder_stays_frozen_while_the_read_out_learns(tmp_path):
    torch.manual_seed(1)
    torch.save(create_encoder("resnet10t").state_dict(), tmp_path / "fm.pth")
    model = create_model("foundation", G, encoder="resnet10t", input_size=32, pretrained_path=str(tmp_path / "fm.pth"))
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    model.train()
    assert model.training and not model.image_encoder.training  # BatchNorm statistics stay fixed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for seed in range(3):
        optimizer.zero_grad()
        model(spot_batch(seed=seed))["loss"].backward()
        optimizer.step()
    after = model.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running stats unchanged
    assert model.head.weight.abs().sum() > 0  # the read-out moved from its zero start
    loaded = torch.load(tmp_path / "fm.pth")
    assert all(torch.equal(loaded[k], after[k]) for k in loaded)
