"""Baseline recipes (`recipe: paper | original`): what each resolves to, and that training and prediction get it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from cmrcnet import workflow
from cmrcnet.config import REPO_ROOT, check_config, load_config, validate_schema
from cmrcnet.errors import CMRCNetError
from cmrcnet.recipes import ORIGINAL, effective_method, training_method_cfg
from cmrcnet.train import resolve_train_cfg

PAPER = REPO_ROOT / "config" / "paper.yaml"


def config_with(**methods) -> dict:
    config = {"datasets": {"d": {"source": "synthetic", "technology": "visium", "samples": ["S1", "S2"]}},
              "train": {"lr": 1.0e-4, "optimizer": "AdamW"}, "evaluation": {"k": [5]}, "methods": methods}
    validate_schema(config)
    return check_config(config)


def test_paper_recipe_is_the_shared_settings_from_scratch():
    config = config_with(bleep={"model": "bleep", "params": {"encoder": "resnet50"}},
                         stnet={"model": "stnet", "params": {"encoder": "densenet121"}},
                         histogene={"model": "histogene", "train": {"batch_size": 1}})
    for name in ("bleep", "stnet", "histogene"):
        eff = effective_method(config, name)
        assert eff["recipe"] == "paper" and eff["weights"] is None and eff["tta"] is False
        assert eff["params"] == config["methods"][name]["params"] and eff["train"] == config["methods"][name]["train"]
    cfg = resolve_train_cfg(config["train"], training_method_cfg(config, "histogene"), "histogene")
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("AdamW", 1.0e-4, 1.0e-3)


def test_bleep_original_is_imagenet_resnet50_from_the_weights_folder():
    config = config_with(bleep={"model": "bleep", "recipe": "original"})
    eff = effective_method(config, "bleep")
    assert eff["weights"] == "resnet50.a1_in1k"  # timm's resnet50 weights, what BLEEP's pretrained=True loads
    assert eff["params"] == {"encoder": "resnet50", "pretrained_path": "weights/resnet50.a1_in1k/model.safetensors"}
    assert eff["train"] == {} and eff["tta"] is False
    config["weights"]["dir"] = "/shared/w"
    assert effective_method(config, "bleep")["params"]["pretrained_path"] == "/shared/w/resnet50.a1_in1k/model.safetensors"


def test_stnet_original_is_torchvision_densenet121_with_8_fold_averaging():
    config = config_with(stnet={"model": "stnet", "recipe": "original", "params": {"encoder": "densenet121"}})
    assert config["evaluation"]["tta"] is False
    eff = effective_method(config, "stnet")
    assert eff["weights"] == "densenet121.tv_in1k"  # torchvision's, as ST-Net; not timm's default ra_in1k
    assert eff["params"]["pretrained_path"] == "weights/densenet121.tv_in1k/model.safetensors"
    assert eff["tta"] is True


def test_histogene_original_takes_its_authors_optimiser():
    config = config_with(histogene={"model": "histogene", "recipe": "original", "train": {"batch_size": 1}})
    eff = effective_method(config, "histogene")
    assert eff["weights"] is None and "pretrained_path" not in eff["params"] and eff["tta"] is False
    cfg = resolve_train_cfg(config["train"], training_method_cfg(config, "histogene"), "histogene")
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["batch_size"]) == ("Adam", 1.0e-5, 0.0, 1)
    assert cfg["schedule"] == "constant"


def test_the_methods_own_settings_win_over_the_recipe():
    config = config_with(
        h={"model": "histogene", "recipe": "original", "train": {"lr": 3.0e-5}},
        b={"model": "bleep", "recipe": "original", "params": {"pretrained_path": "my/own.pth"}},
        b18={"model": "bleep", "recipe": "original", "params": {"encoder": "resnet18"}},
        s={"model": "stnet", "recipe": "original", "params": {"encoder": "densenet121.ra_in1k"}},
    )
    assert training_method_cfg(config, "h")["train"] == {"optimizer": "Adam", "lr": 3.0e-5, "weight_decay": 0.0,
                                                         "schedule": "constant"}
    own = effective_method(config, "b")
    assert own["weights"] is None and own["params"]["pretrained_path"] == "my/own.pth"  # nothing to fetch
    assert effective_method(config, "b18")["weights"] == "resnet18.a1_in1k"  # another encoder: its default weights
    assert effective_method(config, "s")["weights"] == "densenet121.ra_in1k"  # a tagged encoder names its weights


@pytest.mark.parametrize("method, expected", [
    ({"model": "cmrcnet", "recipe": "original"}, "methods.m.recipe: model cmrcnet has no separate original recipe"),
    ({"model": "bleep", "recipe": "original", "params": {"encoder": "densenet264d"}},
     "methods.m.params.encoder (recipe original)"),
])
def test_original_recipe_that_cannot_apply_is_one_line_naming_the_key(tmp_path, method, expected):
    config = {"datasets": {"d": {"source": "synthetic", "technology": "visium", "samples": ["S1", "S2"]}},
              "methods": {"m": method}}
    validate_schema(config)
    with pytest.raises(CMRCNetError) as err:
        check_config(config, where="my.yaml")
    assert str(err.value).startswith(f"my.yaml: {expected}") and "\n" not in str(err.value)


def test_schema_refuses_an_unknown_recipe():
    config = {"datasets": {"d": {"source": "synthetic", "technology": "visium", "samples": ["S1", "S2"]}},
              "methods": {"bleep": {"model": "bleep", "recipe": "authors"}}}
    with pytest.raises(CMRCNetError, match="methods.bleep.recipe"):
        validate_schema(config)


def test_paper_config_trains_the_baselines_as_their_authors_did():
    config = load_config(PAPER)
    recipes = {name: m["recipe"] for name, m in config["methods"].items()}
    assert recipes["bleep"] == recipes["stnet"] == recipes["histogene"] == "original"
    assert {recipes[name] for name in recipes if config["methods"][name]["model"] == "cmrcnet"} == {"paper"}
    assert {effective_method(config, m)["weights"] for m in config["methods"]} == {
        None, "resnet50.a1_in1k", "densenet121.tv_in1k"}
    assert set(ORIGINAL) == {"bleep", "stnet", "histogene"}


class Files(list):
    """A Snakemake-style file list: by position and by name."""

    def __init__(self, **named):
        super().__init__(named.values())
        self.__dict__.update(named)


def smk(config: dict, method: str, **extra) -> SimpleNamespace:
    return SimpleNamespace(
        config=config, threads=1, rule="test", wildcards=SimpleNamespace(dataset="READ", method=method, fold="0"),
        input=Files(genes="processed/READ/genes.tsv", model=f"models/READ/{method}/fold0/best.pt"),
        output=Files(model=f"models/READ/{method}/fold0/best.pt", predictions="p.h5ad"),
        params=SimpleNamespace(fingerprint="fp"), **extra,
    )


def test_the_rules_train_and_predict_with_the_recipe_applied(monkeypatch):
    import cmrcnet.inference.predict
    import cmrcnet.train

    calls = []
    monkeypatch.setattr(cmrcnet.train, "train_fold", lambda **kw: calls.append(("train", kw)))
    monkeypatch.setattr(cmrcnet.inference.predict, "predict_fold", lambda **kw: calls.append(("predict", kw)))
    monkeypatch.setattr(cmrcnet.inference.predict, "check_k_fits", lambda *a, **kw: None)  # needs the fold's data
    config = load_config(PAPER)
    for method in ("bleep", "stnet", "histogene", "cmrcnet"):
        workflow.train(smk(config, method))
        workflow.predict(smk(config, method))
    got = {(kind, kw["method"]): kw for kind, kw in calls}
    assert got["train", "bleep"]["method_cfg"]["params"]["pretrained_path"] == "weights/resnet50.a1_in1k/model.safetensors"
    assert got["train", "stnet"]["method_cfg"]["params"]["pretrained_path"] == \
        "weights/densenet121.tv_in1k/model.safetensors"
    assert "pretrained_path" not in got["train", "cmrcnet"]["method_cfg"]["params"]
    assert got["train", "histogene"]["method_cfg"]["train"]["lr"] == 1.0e-5
    assert {m: got["predict", m]["tta"] for m in ("bleep", "stnet", "histogene", "cmrcnet")} == {
        "bleep": False, "stnet": True, "histogene": False, "cmrcnet": False}

    paper = copy.deepcopy(config)  # the same methods under recipe paper: today's settings
    for m in ("bleep", "stnet", "histogene"):
        paper["methods"][m]["recipe"] = "paper"
    calls.clear()
    workflow.train(smk(paper, "stnet"))
    workflow.predict(smk(paper, "stnet"))
    assert "pretrained_path" not in calls[0][1]["method_cfg"]["params"] and calls[1][1]["tta"] is False
