"""Training recipes of the baselines: `paper` (this project's shared settings) or `original` (their authors' own).

The CMRCNet paper states how it trained its own model (AdamW, lr 1e-4, 60 epochs, batch 64) but not how it
trained STNet, HisToGene and BLEEP. A method's `recipe:` picks one of two readings:

* `paper`: every method under the shared `train` settings, encoders from scratch (what this project did first).
* `original`: the settings the baseline's authors' code uses where it differs in weights, test-time averaging
  or optimiser; everything else (epochs, batch size, augmentation, early stopping) stays shared:

  - BLEEP: ImageNet-pretrained ResNet-50 (`timm.create_model("resnet50", pretrained=True)` in its code; timm's
    default ResNet-50 weights are `resnet50.a1_in1k`).
  - STNet: ImageNet-pretrained DenseNet-121 (torchvision's weights: `densenet121.tv_in1k`) and the mean over the
    8 flips/rotations of each test patch (`--pretrain --average` in ST-Net's README): the `stnet-tta` label.
  - HisToGene: Adam, lr 1e-5, no weight decay, a constant rate (its README and tutorial).

A recipe only fills settings the method does not set itself: `params` and `train` written under the method win.
Weights come from rule `fetch_weights` (`cmrcnet.weights`) into `{weights.dir}/{name}/model.safetensors`, which
becomes the model's `pretrained_path` unless the method names one itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cmrcnet.errors import CMRCNetError, input_error

RECIPES = ("paper", "original")


@dataclass(frozen=True)
class Recipe:
    params: dict = field(default_factory=dict)  # model settings
    train: dict = field(default_factory=dict)  # training settings, over the shared `train`
    weights: str | None = None  # timm weights (architecture.tag) for params.encoder
    tta: bool = False  # test-time averaging over the 8 flips/rotations (spot-level regression models)
    source: str = ""  # where the facts come from


ORIGINAL = {
    "bleep": Recipe(
        params={"encoder": "resnet50"}, weights="resnet50.a1_in1k",
        source="bowang-lab/BLEEP modules.py: timm.create_model('resnet50', pretrained=True, num_classes=0, "
               "global_pool='avg'), config.py: pretrained = True, trainable = True",
    ),
    "stnet": Recipe(
        params={"encoder": "densenet121"}, weights="densenet121.tv_in1k", tta=True,
        source="bryanhe/ST-Net README: --model densenet121 --pretrain --average (torchvision ImageNet weights; "
               "predictions averaged over the 8 rotations/reflections)",
    ),
    "histogene": Recipe(
        train={"optimizer": "Adam", "lr": 1.0e-5, "weight_decay": 0.0, "schedule": "constant"},
        source="maxpmx/HisToGene README and tutorial: learning_rate=1e-5, torch.optim.Adam (no weight decay, no "
               "scheduler), batch of one slide",
    ),
}


def effective_method(config: dict, method: str, where: str = "config") -> dict:
    """The settings method `method` really runs with, its recipe applied:
    {"model", "recipe", "params", "train", "tta", "weights"}; `weights` is the weight name (timm weights, or a
    registered encoder of the cross-modal grid) that rule fetch_weights must fetch first (None when none), `tta`
    whether predictions add the 8-fold average."""
    m = config["methods"][method]
    model, recipe = m["model"], m.get("recipe") or "paper"
    params, train = dict(m.get("params") or {}), dict(m.get("train") or {})
    tta, weights = bool((config.get("evaluation") or {}).get("tta", False)), None
    if recipe not in RECIPES:
        raise input_error(where, f"methods.{method}.recipe: unknown {recipe!r}; use one of {', '.join(RECIPES)}")
    if recipe == "original":
        if model not in ORIGINAL:
            raise input_error(where, f"methods.{method}.recipe: model {model} has no separate original recipe "
                                     f"(original applies to {', '.join(ORIGINAL)}); use recipe: paper")
        r = ORIGINAL[model]
        params, train = {**r.params, **params}, {**r.train, **train}
        tta = tta or r.tta
        if r.weights and params.get("pretrained_path") is None:
            from cmrcnet.weights import pretrained_name, weights_file

            try:
                weights = pretrained_name(params["encoder"], preferred=r.weights)
            except CMRCNetError as err:  # it names the encoder: add the method's key
                raise input_error(where, f"methods.{method}.params.encoder (recipe original): {err}") from None
            params["pretrained_path"] = weights_file((config.get("weights") or {}).get("dir", "weights"), weights)
    if model == "crossmodal" and params.get("weights_path"):
        weights = params["image"]  # a registered encoder's weights, fetched by rule fetch_weights like a probe's
    return {"model": model, "recipe": recipe, "params": params, "train": train, "tta": tta, "weights": weights}


def training_method_cfg(config: dict, method: str) -> dict:
    """The method's config entry with its recipe applied, as `cmrcnet.train.train_fold` takes it."""
    eff = effective_method(config, method)
    return {**config["methods"][method], "params": eff["params"], "train": eff["train"]}
