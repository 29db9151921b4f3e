"""CMRCNet as the paper describes it (docs/fidelity.md lists the statements): the fusion modules' residual
cross-attention reads the gene tokens, the target is not detached, the image embedding is the token mean, the
expression-target variant is a real reconstruction task, and the learning rate follows the authors' cosine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmrcnet.errors import CMRCNetError
from cmrcnet.models import create_model
from cmrcnet.models.cmrcnet import FusionBlock, ResidualCrossAttention, SNNEncoder, random_feature_mask
from cmrcnet.train import DEFAULT_TRAIN, SCHEDULES, fingerprint, lr_factor

G = 12
TINY = {"encoder_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "embed_dim": 16, "snn_hidden": 32, "n_gene_tokens": 4, "cross_heads": 2, "fusion_heads": 2}


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model("cmrcnet", G, **{**TINY, **overrides})


def batch(b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 3, 32, 32, generator=gen), "expr": torch.rand(b, G, generator=gen) * 3}


# --- 1. the fusion modules fuse with the gene tokens --------------------------------------------------

def test_residual_cross_attention_is_the_papers_formula():
    """x W_V' + softmax(x W_Q (G W_K)^T / sqrt(d)) G W_V, one head, by hand."""
    torch.manual_seed(0)
    d = 8
    layer = ResidualCrossAttention(d, heads=1, dropout=0.0).eval()
    x, genes = torch.randn(2, 5, d), torch.randn(2, 3, d)
    w_q, w_k, w_v = layer.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.attn.in_proj_bias.chunk(3)
    q, k, v = x @ w_q.T + b_q, genes @ w_k.T + b_k, genes @ w_v.T + b_v
    attended = F.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
    attended = attended @ layer.attn.out_proj.weight.T + layer.attn.out_proj.bias
    expected = x @ layer.value.weight.T + layer.value.bias + attended
    torch.testing.assert_close(layer(x, genes), expected)


def _cross_inputs(model, data):
    """(query, key, value) seen by each fusion block's closing cross-attention, in eval mode (no mask/dropout)."""
    seen = []
    hooks = [block.cross.attn.register_forward_hook(lambda m, args, out: seen.append(args[:3]))
             for block in model.fusion]
    with torch.no_grad():
        _, tokens = model.image_features(data["image"])
        model.reconstruct(tokens, data["expr"])
    for h in hooks:
        h.remove()
    return seen


def test_fusion_blocks_attend_to_gene_tokens_not_image_tokens():
    model = tiny().eval()
    data = batch()
    seen = _cross_inputs(model, data)
    assert len(seen) == 2  # two fusion modules
    with torch.no_grad():
        genes = model.gene_tokens(data["expr"])
    for _query, key, value in seen:
        torch.testing.assert_close(key, genes)
        torch.testing.assert_close(value, genes)
    other_image = {**data, "image": batch(seed=5)["image"]}
    for (_, key_a, value_a), (_, key_b, value_b) in zip(seen, _cross_inputs(model, other_image), strict=True):
        torch.testing.assert_close(key_a, key_b)  # keys/values do not depend on the image side
        torch.testing.assert_close(value_a, value_b)


def test_each_fusion_block_output_depends_on_the_gene_tokens():
    model = tiny().eval()
    x = torch.randn(2, 5, 16)
    genes_a, genes_b = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        for block in model.fusion:
            assert not torch.allclose(block(x, genes_a), block(x, genes_b))
            torch.testing.assert_close(block(x, genes_a), block(x, genes_a))


# --- 2. the reconstruction target is not detached by default ---------------------------------------------

def _image_head_grad_from_reconstruction(model):
    model.train()
    torch.manual_seed(1)
    out = model(batch())
    model.zero_grad()
    out["loss_rec"].backward()
    grad = model.image_head.projection.weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())


def test_reconstruction_gradient_reaches_the_target_by_default():
    assert _image_head_grad_from_reconstruction(tiny()) > 0  # F'_img gets gradients from L_rec, as the paper
    assert _image_head_grad_from_reconstruction(tiny(detach_target=True)) == 0  # the option stops them


# --- 3. the image embedding is the mean over the ViT's tokens ---------------------------------------------

def test_image_embedding_is_the_token_mean():
    model = tiny().eval()
    images = batch()["image"]
    with torch.no_grad():
        emb, tokens = model.image_features(images)
        assert tokens.shape[1] == 5  # CLS + 2 x 2 patches
        torch.testing.assert_close(emb, model.image_head(tokens.mean(dim=1)))
        cls = tiny(pool="cls").eval()
        emb_cls, tokens_cls = cls.image_features(images)
        torch.testing.assert_close(emb_cls, cls.image_head(tokens_cls[:, 0]))


def test_bleep_keeps_the_architectures_pooling_and_cls_needs_a_class_token():
    torch.manual_seed(0)
    bleep = create_model("bleep", G, encoder="resnet10t", embed_dim=16, input_size=32)
    assert bleep.pool == "native"
    with pytest.raises(CMRCNetError, match="pool"):
        create_model("bleep", G, encoder="resnet10t", embed_dim=16, input_size=32, pool="cls")(batch())
    with pytest.raises(CMRCNetError, match="pool"):
        tiny(pool="max")


def test_paper_size_cmrcnet_pools_50_tokens():
    model = create_model("cmrcnet", G).eval()
    assert model.pool == "mean"
    with torch.no_grad():
        emb, tokens = model.image_features(torch.randn(1, 3, 224, 224))
        torch.testing.assert_close(emb, model.image_head(tokens.mean(dim=1)))
    assert tokens.shape == (1, 50, 768)


# --- 5. the expression target masks the transcriptomic side ----------------------------------------------

def test_expression_target_masks_the_expression_and_attends_to_image_tokens():
    model = tiny(recon_target="expression", mask_rate=0.5)
    seen = {}
    model.gene_encoder.register_forward_hook(lambda m, args, out: seen.update(snn_in=args[0]))
    model.fusion[0].cross.attn.register_forward_hook(lambda m, args, out: seen.update(kv=args[1]))
    data = batch()
    model.train()
    model(data)
    zeros = (seen["snn_in"] == 0).sum(dim=1)
    assert zeros.tolist() == [round(0.5 * G)] * 4  # half of each spot's expression values hidden
    with torch.no_grad():
        model.eval()
        _, tokens = model.image_features(data["image"])
        image_tokens = model.image_tokens(tokens)
    torch.testing.assert_close(seen["kv"], image_tokens)  # image tokens guide, unmasked


def test_expression_reconstruction_is_not_trivial():
    """The reconstruction must not be computable from its own input: with the same mask, changing only the
    expression values that were masked changes the target (the expression embedding) but not the branch's
    output. (Before, the gene tokens saw the whole expression, so the branch could copy its target.)"""
    model = tiny(recon_target="expression", mask_rate=0.5).train()
    data = batch()
    seen = {}
    model.gene_encoder.register_forward_hook(lambda m, args, out: seen.update(snn_in=args[0]))
    _, tokens = model.image_features(data["image"])
    torch.manual_seed(3)
    rebuilt = model.reconstruct(tokens, data["expr"])
    hidden = seen["snn_in"] == 0
    changed = torch.where(hidden, data["expr"] + 5.0, data["expr"])
    torch.manual_seed(3)
    torch.testing.assert_close(model.reconstruct(tokens, changed), rebuilt)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.expression_head(changed), model.expression_head(data["expr"]))


# --- 6. learning-rate schedule -------------------------------------------------------------------------------

def _cfg(**kw):
    return {**DEFAULT_TRAIN, "lr": 1e-4, "epochs": 10, **kw}


def test_cosine_schedule_matches_torch_cosine_annealing():
    cfg = _cfg(schedule="cosine", min_lr=1e-5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5)
    for epoch in range(10):
        assert lr_factor(epoch, cfg) * 1e-4 == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        reference.step()
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(10, cfg) * 1e-4 == pytest.approx(1e-5)


def test_warmup_then_cosine_and_constant():
    cfg = _cfg(schedule="cosine", warmup_epochs=2)
    assert [lr_factor(e, cfg) for e in (0, 1)] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert lr_factor(2, cfg) == 1.0 and lr_factor(9, cfg) < 1.0
    assert {lr_factor(e, _cfg(schedule="constant")) for e in range(10)} == {1.0}
    assert lr_factor(5, _cfg(schedule="cosine", lr=1e-6, min_lr=1e-5)) == 1.0  # never raised above the base


def test_after_the_warm_up_the_cosine_runs_over_the_remaining_epochs():
    """Warm-up 2 of 10 epochs: epochs 2..9 follow CosineAnnealingLR(T_max=8), as the authors' code steps it."""
    cfg = _cfg(schedule="cosine", warmup_epochs=2, min_lr=1e-5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-5)
    for epoch in range(2, 10):
        assert lr_factor(epoch, cfg) * 1e-4 == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        reference.step()
    assert lr_factor(6, cfg) == pytest.approx((1e-5 + 9e-5 * 0.5) / 1e-4)  # halfway: t = (6 - 2) / 8


def test_a_zero_learning_rate_stays_zero_without_dividing_by_it():
    for schedule in SCHEDULES:
        assert {lr_factor(e, _cfg(schedule=schedule, lr=0, min_lr=0)) for e in range(10)} == {1.0}
        assert lr_factor(3, _cfg(schedule=schedule, lr=0.0)) == 1.0


def test_epochs_are_fingerprinted_when_they_shape_the_schedule():
    fp = lambda cfg: fingerprint("cmrcnet", {}, cfg, ["A"], 0, 0)  # noqa: E731
    assert fp(_cfg(schedule="cosine", epochs=10)) != fp(_cfg(schedule="cosine", epochs=20))
    assert fp(_cfg(schedule="constant", epochs=10)) == fp(_cfg(schedule="constant", epochs=20))


# --- 7. the branch's layers are the paper's (and the choices recorded in docs/fidelity.md) -------------------

def test_paper_defaults_build_the_papers_branch():
    """The defaults are the paper's numbers: tau 1; SNN FC + SELU + AlphaDropout(0.25) to 8 x 256 gene tokens (the
    hidden width 1024 is our choice); a 4-head cross-attention; two 8-head fusion modules (MLP ratio 4 and dropout
    0.1 are our choices, ViT's defaults); dropout 0.1 in the projection heads and attention layers."""
    model = create_model("cmrcnet", G)
    assert model.contrastive.tau == 1.0 and model.mask_rate == 0.5 and model.recon_target == "image"
    assert model.detach_target is False and model.recon_criterion is not None
    snn = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None), getattr(m, "p", None))
           for m in model.gene_encoder]
    assert snn == [("Linear", G, 1024, None), ("SELU", None, None, None), ("AlphaDropout", None, None, 0.25),
                   ("Linear", 1024, 2048, None), ("SELU", None, None, None), ("AlphaDropout", None, None, 0.25)]
    assert model.gene_tokens(torch.rand(2, G)).shape == (2, 8, 256)
    assert (model.token_proj.in_features, model.token_proj.out_features) == (768, 256)
    assert (model.gene_cross.num_heads, model.gene_cross.dropout, model.gene_cross.batch_first) == (4, 0.1, True)
    assert len(model.fusion) == 2
    for block in model.fusion:
        layer = block.block
        assert (layer.self_attn.num_heads, layer.linear1.out_features, layer.dropout.p) == (8, 1024, 0.1)
        assert (block.cross.attn.num_heads, block.cross.attn.dropout) == (8, 0.1)
    assert model.image_head.dropout.p == 0.1 and model.expression_head.dropout.p == 0.1


def test_given_settings_reach_every_layer():
    model = tiny(dropout=0.3, snn_dropout=0.4, tau=0.5, fusion_mlp_ratio=2.0, n_gene_tokens=2, snn_hidden=24)
    assert model.contrastive.tau == 0.5
    assert [m.p for m in model.gene_encoder if isinstance(m, torch.nn.AlphaDropout)] == [0.4, 0.4]
    assert [m.out_features for m in model.gene_encoder if isinstance(m, torch.nn.Linear)] == [24, 2 * 16]
    assert model.gene_cross.dropout == 0.3 and model.image_head.dropout.p == 0.3
    for block in model.fusion:
        assert (block.block.linear1.out_features, block.block.dropout.p, block.cross.attn.dropout) == (32, 0.3, 0.3)


def test_pretrained_weights_reach_the_image_encoder(tmp_path):
    source = tiny(seed=7)
    path = tmp_path / "vit.pt"
    torch.save(source.image_encoder.state_dict(), path)
    loaded = tiny(seed=0, pretrained_path=str(path))
    for name, value in source.image_encoder.state_dict().items():
        torch.testing.assert_close(loaded.image_encoder.state_dict()[name], value)
    assert not torch.equal(tiny(seed=0).image_encoder.patch_embed.proj.weight, source.image_encoder.patch_embed.proj.weight)


@pytest.mark.parametrize("setting, message", [
    ({"recon_loss": "l1"}, "recon_loss: unknown 'l1'; use one of mse, cosine, none"),
    ({"recon_target": "both"}, "recon_target: unknown 'both'; use one of image, expression"),
    ({"mask_rate": 1.0}, "mask_rate: must be in [0, 1), got 1.0"),
    ({"mask_rate": -0.1}, "mask_rate: must be in [0, 1), got -0.1"),
    ({"cross_heads": 3}, "cross_heads: 3 heads do not divide embed_dim 16"),
    ({"fusion_heads": 5}, "fusion_heads: 5 heads do not divide embed_dim 16"),
])
def test_bad_settings_give_one_exact_line(setting, message):
    with pytest.raises(CMRCNetError) as err:
        tiny(**setting)
    assert str(err.value) == message


def test_mask_rate_zero_is_allowed_and_masks_nothing():
    model = tiny(mask_rate=0.0).train()
    tokens = torch.randn(2, 5, 16)
    torch.testing.assert_close(model._mask(tokens), tokens)


def test_fusion_block_is_a_pre_ln_gelu_transformer_block_then_the_residual_cross_attention():
    """By hand, one sample at a time (so the batch axis is the batch): h = x + SA(LN1(x)); y = h + W2 GELU(W1 LN2(h));
    out = cross(y, genes). The defaults: MLP ratio 4, dropout 0.1."""
    torch.manual_seed(0)
    block = FusionBlock(8, heads=2)
    layer = block.block
    assert (layer.linear1.out_features, layer.dropout.p, block.cross.attn.dropout) == (32, 0.1, 0.1)
    block.eval()
    x, genes = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    with torch.no_grad():
        rows = []
        for i in range(3):
            xi = x[i:i + 1]
            normed = layer.norm1(xi)
            h = xi + layer.self_attn(normed, normed, normed, need_weights=False)[0]
            y = h + layer.linear2(F.gelu(layer.linear1(layer.norm2(h))))
            rows.append(block.cross(y, genes[i:i + 1]))
        torch.testing.assert_close(block(x, genes), torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_residual_cross_attention_dropout():
    assert ResidualCrossAttention(8, 2).attn.dropout == 0.1
    assert ResidualCrossAttention(8, 2, dropout=0.2).attn.dropout == 0.2


def test_reconstruction_is_the_token_mean_of_the_last_fusion_module():
    model = tiny().eval()
    seen = {}
    model.fusion[-1].register_forward_hook(lambda m, args, out: seen.update(out=out))
    data = batch()
    with torch.no_grad():
        _, tokens = model.image_features(data["image"])
        rebuilt = model.reconstruct(tokens, data["expr"])
    assert rebuilt.shape == (4, 16)
    torch.testing.assert_close(rebuilt, seen["out"].mean(dim=1))


def test_snn_init_is_lecun_normal_and_its_dropout_defaults_to_a_quarter():
    torch.manual_seed(0)
    snn = SNNEncoder(400, [2000])
    weight = snn[0].weight.detach()
    assert float(weight.std()) == pytest.approx(1 / math.sqrt(400), rel=0.01)
    assert abs(float(weight.mean())) < 1e-3 and torch.count_nonzero(snn[0].bias) == 0
    assert snn[2].p == 0.25


# --- 8. random feature masking -------------------------------------------------------------------------------

def test_feature_mask_counts_per_sample_even_for_one_sample_and_one_entry():
    one = random_feature_mask(torch.ones(1, 4, 5), 0.5)  # a batch of one sample
    assert int((one == 0).sum()) == 10
    single = random_feature_mask(torch.ones(3, 2, 5), 0.1)  # round(0.1 * 10) = 1 entry per sample
    assert ((single == 0).flatten(1).sum(dim=1)).tolist() == [1, 1, 1]
    assert torch.equal(random_feature_mask(torch.ones(3, 2, 5), 0.04), torch.ones(3, 2, 5))  # round(0.4) = 0


def test_feature_mask_follows_its_generator_and_keeps_the_dtype():
    x = torch.rand(4, 3, 6) + 1
    torch.manual_seed(1)
    a = random_feature_mask(x, 0.5, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = random_feature_mask(x, 0.5, torch.Generator().manual_seed(5))
    c = random_feature_mask(x, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = random_feature_mask(x.to(torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16 and int((half == 0).sum()) == 4 * 9
