"""The `crossmodal` model and its parts: contrastive losses against hand-written formulas, gene towers (scVI
pretraining included), image towers in each training mode, and the model's contract as the trainer uses it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cmrcnet.crossmodal.gene_towers import GENE_TOWERS, make_gene_tower
from cmrcnet.crossmodal.image_towers import IMAGE_MODES, LoRALinear, make_image_tower
from cmrcnet.crossmodal.losses import LOSSES, make_contrastive_loss
from cmrcnet.encoders import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    get_encoder,
    register_encoder,
    unregister_encoder,
    write_tiny_test_weights,
)
from cmrcnet.encoders.registry import IMAGENET_MEAN, IMAGENET_STD
from cmrcnet.encoders.zoo import timm_builder
from cmrcnet.errors import CMRCNetError
from cmrcnet.models import create_model, model_settings

N_GENES = 30


# ---- losses -------------------------------------------------------------------------------------------------------

def _pair(seed: int = 0, n: int = 6, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _clip_reference(img: np.ndarray, expr: np.ndarray, scale: float) -> float:
    logits = scale * _unit(img) @ _unit(expr).T
    rows = -np.diag(_log_softmax(logits)).mean()
    cols = -np.diag(_log_softmax(logits.T)).mean()
    return (rows + cols) / 2


def _siglip_reference(img: np.ndarray, expr: np.ndarray, scale: float, bias: float) -> float:
    logits = scale * _unit(img) @ _unit(expr).T + bias
    z = 2 * np.eye(len(img)) - 1
    return np.log1p(np.exp(-z * logits)).sum() / len(img)


def _bleep_reference(img: np.ndarray, expr: np.ndarray, tau: float) -> float:
    logits = expr @ img.T / tau
    sim = (img @ img.T + expr @ expr.T) / 2 * tau
    targets = np.exp(_log_softmax(sim))
    expr_to_img = -(targets * _log_softmax(logits)).sum(axis=1).mean()
    img_to_expr = -(targets.T * _log_softmax(logits.T)).sum(axis=1).mean()
    return (expr_to_img + img_to_expr) / 2


@pytest.mark.parametrize("log_scale", [math.log(20.0), math.log(1000.0)])
def test_clip_loss_matches_formula_and_clamps_scale_at_100(log_scale):
    img, expr = _pair()
    loss = make_contrastive_loss("clip")
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        loss.logit_scale.fill_(log_scale)
    expected = _clip_reference(img.double().numpy(), expr.double().numpy(), min(math.exp(log_scale), 100.0))
    assert loss(img, expr).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_loss_matches_formula():
    img, expr = _pair(1)
    loss = make_contrastive_loss("siglip")
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss.logit_bias.item() == -10.0
    expected = _siglip_reference(img.double().numpy(), expr.double().numpy(), 10.0, -10.0)
    assert loss(img, expr).item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(3.0))
        loss.logit_bias.fill_(0.5)
    expected = _siglip_reference(img.double().numpy(), expr.double().numpy(), 3.0, 0.5)
    assert loss(img, expr).item() == pytest.approx(expected, rel=1e-5)


def test_bleep_loss_matches_formula_on_unnormalised_projections():
    img, expr = _pair(2)
    loss = make_contrastive_loss("bleep", tau=2.0)
    expected = _bleep_reference(img.double().numpy(), expr.double().numpy(), 2.0)
    assert loss(img, expr).item() == pytest.approx(expected, rel=1e-5)
    assert list(loss.parameters()) == []


@pytest.mark.parametrize("kind,names", [("clip", {"logit_scale"}), ("siglip", {"logit_scale", "logit_bias"})])
def test_learned_temperature_and_bias_receive_gradients(kind, names):
    loss = make_contrastive_loss(kind)
    assert {n for n, p in loss.named_parameters() if p.requires_grad} == names
    img, expr = _pair(3)
    loss(img.requires_grad_(), expr).backward()
    for name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().item() > 0, name
    assert img.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", LOSSES)
def test_losses_run_in_float32_under_autocast(kind):
    img, expr = _pair(4)
    loss = make_contrastive_loss(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(img.bfloat16(), expr.bfloat16())
    assert value.dtype == torch.float32 and value.ndim == 0


def test_loss_rejects_unknown_kind_and_settings():
    with pytest.raises(CMRCNetError, match="use one of bleep, clip, siglip"):
        make_contrastive_loss("infonce")
    with pytest.raises(CMRCNetError, match="'tau'"):
        make_contrastive_loss("clip", tau=0.5)


# ---- gene towers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw,out_dim", [("mlp", {"hidden": 24, "depth": 3}, 24),
                                             ("snn", {"hidden": 20}, 20),
                                             ("transformer", {"dim": 16, "heads": 2, "hidden": 32}, 16)])
def test_trainable_gene_towers_map_expression_to_out_dim(kind, kw, out_dim):
    torch.manual_seed(0)
    tower = make_gene_tower(kind, N_GENES, **kw).eval()
    expr = torch.rand(5, N_GENES)
    out = tower(expr)
    assert tower.out_dim == out_dim and out.shape == (5, out_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in tower.parameters())
    # the tower reads which gene carries which value: swapping two genes' values changes the embedding
    swapped = expr.clone()
    swapped[:, [0, 1]] = expr[:, [1, 0]]
    assert not torch.allclose(tower(swapped), out)


def test_mlp_and_transformer_structure():
    mlp = make_gene_tower("mlp", N_GENES, hidden=8, depth=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    transformer = make_gene_tower("transformer", N_GENES)
    assert transformer.out_dim == 64 and len(transformer.encoder.layers) == 2
    assert transformer.encoder.layers[0].self_attn.num_heads == 4
    assert transformer.gene_embedding.shape == (N_GENES, 64)


def test_gene_tower_rejects_bad_settings():
    with pytest.raises(CMRCNetError, match="use one of mlp, snn, transformer, scvi"):
        make_gene_tower("gnn", N_GENES)
    with pytest.raises(CMRCNetError, match="'n_latent'"):
        make_gene_tower("mlp", N_GENES, n_latent=4)
    assert set(GENE_TOWERS) == {"mlp", "snn", "transformer", "scvi"}


def _two_clusters(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised-like expression of two spot types that swap which half of the genes is high."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    high, low = np.full(N_GENES // 2, 2.0), np.full(N_GENES - N_GENES // 2, 0.3)
    mean = np.where(labels[:, None] == 0, np.r_[high, low], np.r_[low, high])
    counts = rng.poisson(np.expm1(mean) * 3)
    return np.log1p(counts / 3).astype(np.float32), labels


SCVI_KW = {"hidden": 32, "depth": 1, "n_latent": 8}


@pytest.fixture(scope="module")
def scvi_fit():
    """One scVI tower fitted on synthetic data, with the scvi model it came from and its initial weights."""
    x, labels = _two_clusters()
    torch.manual_seed(0)
    tower = make_gene_tower("scvi", N_GENES, **SCVI_KW)
    init = {k: v.clone() for k, v in tower.state_dict().items()}
    model = tower.fit(x, max_epochs=20, seed=0)
    return tower, model, init, x, labels


def test_scvi_tower_copies_the_trained_encoder_and_freezes_it(scvi_fit):
    tower, model, init, _, _ = scvi_fit
    assert model.module.gene_likelihood == "normal" and model.module.log_variational is False
    trained = model.module.z_encoder.state_dict()
    own = tower.z_encoder.state_dict()
    assert set(own) == set(trained)
    for key, value in own.items():
        assert torch.equal(value, trained[key].to(value.device)), key
    assert not torch.equal(own["mean_encoder.weight"], init["z_encoder.mean_encoder.weight"])
    assert bool(tower.fitted) and not bool(init["fitted"])
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert tower.training and not tower.z_encoder.training
    assert not any(m.training for m in tower.z_encoder.modules())
    tower.eval()


def test_scvi_embeddings_separate_the_clusters(scvi_fit):
    tower, _, _, x, labels = scvi_fit
    z = tower.eval()(torch.from_numpy(x)).numpy()
    assert z.shape == (len(x), 8)
    centroids = np.stack([z[labels == k].mean(axis=0) for k in (0, 1)])
    nearest = ((z[:, None] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (nearest == labels).mean() > 0.9


def test_scvi_tower_reloads_from_its_state_dict(scvi_fit):
    tower, _, _, x, _ = scvi_fit
    fresh = make_gene_tower("scvi", N_GENES, **SCVI_KW)
    assert not bool(fresh.fitted)
    fresh.load_state_dict(tower.state_dict())
    assert bool(fresh.fitted)
    batch = torch.from_numpy(x[:16])
    assert torch.equal(fresh.eval()(batch), tower.eval()(batch))
    fresh.train()
    assert torch.equal(fresh(batch), tower(batch))  # train mode: still the frozen encoder's posterior mean


def test_scvi_fit_is_deterministic_for_a_seed_on_cpu(scvi_fit):
    tower, _, _, x, _ = scvi_fit
    again = make_gene_tower("scvi", N_GENES, **SCVI_KW)
    again.fit(x, max_epochs=20, seed=0)
    for key, value in tower.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_scvi_tower_refuses_use_before_fit_and_bad_expression():
    tower = make_gene_tower("scvi", N_GENES, **SCVI_KW)
    with pytest.raises(RuntimeError, match="before fit"):
        tower.train()(torch.rand(4, N_GENES))
    with pytest.raises(CMRCNetError, match=f"expected expression \\(spots, {N_GENES}\\)"):
        tower.fit(np.zeros((10, N_GENES + 1), np.float32), max_epochs=1)
    with pytest.raises(CMRCNetError, match="non-negative"):
        tower.fit(-np.ones((10, N_GENES), np.float32), max_epochs=1)


# ---- image towers ---------------------------------------------------------------------------------------------------

def _images(size: int = 32, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_weights(tmp_path):
    return write_tiny_test_weights(tmp_path / "tiny" / "pytorch_model.bin")


@pytest.fixture
def extra_encoders():
    """Temporary registered encoders: tiny-test with CLIP normalisation, a 3-block tiny ViT, a tiny CNN."""
    tiny = get_encoder("tiny-test")
    specs = [dataclasses.replace(tiny, name="tiny-test-clipnorm", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
             dataclasses.replace(tiny, name="tiny-test-deep",
                                 build=timm_builder("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16,
                                                    depth=3, num_heads=2)),
             dataclasses.replace(tiny, name="tiny-test-cnn", build=timm_builder("test_resnet"), embed_dim=96)]
    for spec in specs:
        register_encoder(spec)
    yield
    for spec in specs:
        unregister_encoder(spec.name)


def test_frozen_tower_trains_nothing_and_matches_the_encoder(tiny_weights):
    tower = make_image_tower("tiny-test", "frozen", weights_path=tiny_weights)
    assert tower.out_dim == 16 and tower.input_size == 32
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not any(m.training for m in tower.encoder.modules())
    x = _images().requires_grad_()
    out = tower(x)
    assert out.shape == (3, 16) and out.grad_fn is None  # run without a graph, even for an input that has one
    assert torch.equal(out, tower.encoder.spec.embed(tower.encoder.model, x))  # ImageNet stats: no conversion


def test_tower_converts_imagenet_normalisation_to_the_encoders(extra_encoders):
    tower = make_image_tower("tiny-test-clipnorm", "frozen")
    x = _images()
    raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    own = (raw - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    expected = tower.encoder.model(own)
    assert torch.allclose(tower(x), expected, atol=1e-5)
    assert not torch.allclose(tower.encoder.model(x), expected, atol=1e-3)


def test_last_blocks_trains_only_the_last_blocks_and_final_norm(extra_encoders):
    tower = make_image_tower("tiny-test-deep", "last-blocks", unfreeze_blocks=2)
    trainable = {n.removeprefix("encoder.model.") for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "blocks.2.", "norm.")) for n in trainable)
    assert any(n.startswith("blocks.1.") for n in trainable) and "norm.weight" in trainable
    model = tower.encoder.model
    for frozen in (model.blocks[0], model.patch_embed):
        assert all(not p.requires_grad for p in frozen.parameters())
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    tower.train()
    assert model.blocks[2].training and model.blocks[1].training and not model.blocks[0].training
    out = tower(_images())
    out.sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is None
    tower.eval()
    assert not model.blocks[2].training


def test_last_blocks_needs_blocks(extra_encoders):
    with pytest.raises(CMRCNetError, match="tiny-test-cnn.*no transformer blocks"):
        make_image_tower("tiny-test-cnn", "last-blocks")
    with pytest.raises(CMRCNetError, match="unfreeze_blocks: must be in 1..3"):
        make_image_tower("tiny-test-deep", "last-blocks", unfreeze_blocks=4)


def test_lora_starts_as_the_frozen_encoder_and_trains_only_adapters(tiny_weights):
    frozen = make_image_tower("tiny-test", "frozen", weights_path=tiny_weights)
    lora = make_image_tower("tiny-test", "lora", weights_path=tiny_weights, lora_rank=4, lora_alpha=8)
    x = _images()
    assert torch.allclose(lora(x), frozen(x), atol=1e-6)
    wrapped = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 and all(w.scaling == 2.0 and w.lora_a.out_features == 4 for w in wrapped)
    attn = lora.encoder.model.blocks[0].attn
    assert isinstance(attn.qkv, LoRALinear) and isinstance(attn.proj, LoRALinear)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert len(trainable) == 4
    lora.train()
    # a weighted sum: the tower ends in a LayerNorm (weight 1, bias 0 at init), whose plain sum over features is 0
    # for every input, so a plain .sum() would give every parameter a zero gradient
    weights = torch.randn(lora.out_dim, generator=torch.Generator().manual_seed(1))
    (lora(x) * weights).sum().backward()
    assert attn.qkv.lora_b.weight.grad.abs().sum() > 0 and attn.qkv.base.weight.grad is None
    with torch.no_grad():
        attn.proj.lora_b.weight.normal_()
    assert not torch.allclose(lora(x), frozen(x), atol=1e-4)  # the adapters are in the forward path


def test_scratch_tower_trains_everything():
    tower = make_image_tower("test_resnet", "scratch", input_size=64)
    assert tower.input_size == 64 and tower.out_dim == tower.encoder.num_features
    assert all(p.requires_grad for p in tower.parameters())
    out = tower(_images(64))
    assert out.shape == (3, tower.out_dim)
    vit = make_image_tower("test_vit", "scratch", encoder_kwargs={"img_size": 64})
    assert vit.input_size == 64 and vit(_images(64)).shape == (3, vit.out_dim)


def test_image_tower_rejects_bad_combinations():
    assert set(IMAGE_MODES) == {"frozen", "last-blocks", "lora", "scratch"}
    with pytest.raises(CMRCNetError, match="not a registered encoder.*'scratch'"):
        make_image_tower("test_resnet", "frozen")
    with pytest.raises(CMRCNetError, match="registered encoder; use image_mode frozen, last-blocks or lora"):
        make_image_tower("tiny-test", "scratch")
    with pytest.raises(CMRCNetError, match="use one of frozen, last-blocks, lora, scratch"):
        make_image_tower("tiny-test", "finetune")
    with pytest.raises(CMRCNetError, match="only for image_mode 'scratch'"):
        make_image_tower("tiny-test", "frozen", encoder_kwargs={"depth": 2})
    with pytest.raises(CMRCNetError, match="input_size: 64 px does not fit encoder 'tiny-test'"):
        make_image_tower("tiny-test", "frozen", input_size=64)
    fixed_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    with pytest.raises(CMRCNetError, match="input_size: 64 px does not fit encoder 'vit_tiny_patch16_224'"):
        make_image_tower("vit_tiny_patch16_224", "scratch", encoder_kwargs=fixed_vit, input_size=64)
    with pytest.raises(CMRCNetError, match="weights_path is for registered encoders"):
        make_image_tower("test_resnet", "scratch", weights_path="w.safetensors")


# ---- the model ------------------------------------------------------------------------------------------------------

GENE_KW = {"mlp": {"hidden": 16}, "snn": {"hidden": 16}, "transformer": {"dim": 8, "heads": 2, "hidden": 16},
           "scvi": {"hidden": 16, "depth": 1, "n_latent": 4}}


def _batch(n: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "expr": torch.rand(n, N_GENES, generator=gen) * 2}


def _model(gene: str = "mlp", loss: str = "clip", **cfg):
    model = create_model("crossmodal", N_GENES, gene=gene, gene_kwargs=GENE_KW[gene], loss=loss, embed_dim=16,
                         scvi_epochs=2, **cfg)
    model.prepare(np.random.default_rng(0).random((40, N_GENES), dtype=np.float32), seed=0, device="cpu")
    return model


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("gene", GENE_TOWERS)
def test_each_tower_and_loss_takes_an_optimizer_step(gene, loss):
    torch.manual_seed(0)
    model = _model(gene, loss)
    assert model.kind == "retrieval" and model.slide_level is False and model.input_size == 32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(_batch())
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert ("logit_scale" in out) == (loss != "bleep")
    optimizer.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    for part in (model.image_head, model.expression_head, model.contrastive):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
    if gene == "scvi":
        assert all(p.grad is None for p in model.gene_tower.parameters())
    else:
        assert all(p.grad is not None for p in model.gene_tower.parameters())
    before = model.expression_head.projection.weight.detach().clone()
    frozen_before = model.image_tower.encoder.model.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.expression_head.projection.weight, before)
    assert torch.equal(model.image_tower.encoder.model.blocks[0].attn.qkv.weight, frozen_before)


def test_create_model_checks_settings():
    settings = model_settings("crossmodal")
    assert settings["image"] == "tiny-test" and settings["image_mode"] == "frozen" and settings["loss"] == "clip"
    assert settings["gene"] == "mlp" and settings["embed_dim"] == 256 and settings["scvi_epochs"] == 100
    with pytest.raises(CMRCNetError, match="unknown setting 'encoder'"):
        create_model("crossmodal", N_GENES, encoder="resnet50")
    with pytest.raises(CMRCNetError, match="tau: applies only to loss 'bleep'"):
        create_model("crossmodal", N_GENES, loss="clip", tau=0.5)
    with pytest.raises(CMRCNetError, match="gene tower 'mlp' has no setting 'dim'"):
        create_model("crossmodal", N_GENES, gene_kwargs={"dim": 8})
    with pytest.raises(CMRCNetError, match="use one of bleep, clip, siglip"):
        create_model("crossmodal", N_GENES, loss="triplet")


@pytest.mark.parametrize("cfg", [{"gene": "scvi", "loss": "siglip"},
                                 {"gene": "transformer", "image_mode": "lora", "lora_rank": 2},
                                 {"gene": "snn", "image_mode": "last-blocks", "unfreeze_blocks": 1, "loss": "bleep"},
                                 {"gene": "mlp", "image": "test_resnet", "image_mode": "scratch", "input_size": 32}])
def test_checkpoint_round_trip_and_unit_embeddings(cfg):
    torch.manual_seed(0)
    model = _model(**cfg)
    model.train()  # one step, so the saved weights differ from any fresh initialisation
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_batch())["loss"].backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    gene_kwargs = GENE_KW[cfg.get("gene", "mlp")]
    fresh = create_model("crossmodal", N_GENES, gene_kwargs=gene_kwargs, embed_dim=16, scvi_epochs=2, **cfg)
    fresh.load_state_dict(state)
    batch = _batch(seed=1)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        img, expr = model.embed_image(batch["image"]), model.embed_expression(batch["expr"])
        assert torch.equal(fresh.embed_image(batch["image"]), img)
        assert torch.equal(fresh.embed_expression(batch["expr"]), expr)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
    assert torch.allclose(expr.norm(dim=-1), torch.ones(len(expr)), atol=1e-5)
    if cfg["gene"] == "scvi":
        assert bool(fresh.gene_tower.fitted)
        fresh.train()
        fresh(batch)  # a reloaded scvi tower is usable for training without prepare()


def test_trainable_summary_counts_frozen_and_trained_parameters():
    model = _model("mlp", "siglip")
    summary = model.trainable_summary()
    n_encoder = sum(p.numel() for p in model.image_tower.parameters())
    assert summary["image_tower_frozen"] == n_encoder and "image_tower_trainable" not in summary
    assert summary["contrastive_trainable"] == 2
    assert summary["trainable"] + summary["frozen"] == sum(p.numel() for p in model.parameters())
    assert summary["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_prepare_fits_only_the_scvi_tower():
    model = create_model("crossmodal", N_GENES, gene="scvi", gene_kwargs=GENE_KW["scvi"], embed_dim=16, scvi_epochs=1)
    with pytest.raises(RuntimeError, match="before fit"):
        model.train()(_batch())
    torch.manual_seed(7)
    rng_before, benchmark_before = torch.random.get_rng_state(), torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        model.prepare(_two_clusters(60)[0], seed=0, device=torch.device("cpu"))
        # scVI's seeding is undone: the run's random stream and cuDNN settings are as before
        assert torch.equal(torch.random.get_rng_state(), rng_before) and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    assert bool(model.gene_tower.fitted)
    assert torch.isfinite(model(_batch())["loss"])


def test_the_losses_temperature_and_bias_are_kept_out_of_weight_decay():
    from cmrcnet.train import _parameter_groups

    model = create_model("crossmodal", 12, image="test_resnet", image_mode="scratch", input_size=32, gene="mlp",
                         loss="siglip", embed_dim=8)
    groups = _parameter_groups(model)
    exempt = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert exempt == {id(model.contrastive.logit_scale), id(model.contrastive.logit_bias)}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
