"""Every method named in the shipped configs builds with the model code (typos fail here, not on a GPU node)."""

from __future__ import annotations

import pytest
import torch

from cmrcnet.config import REPO_ROOT, load_config
from cmrcnet.errors import CMRCNetError
from cmrcnet.models import create_model
from cmrcnet.train import resolve_train_cfg

CONFIGS = ["config/config.yaml", "config/paper.yaml", "config/demo_crossmodal.yaml"]


def methods(path):
    config = load_config(REPO_ROOT / path)
    return [(path, name, method, config["train"]) for name, method in config["methods"].items()]


@pytest.mark.parametrize("path, name, method, train", [m for p in CONFIGS for m in methods(p)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_configured_method_builds(path, name, method, train):
    if method["model"] == "probe":  # a probe on cached embeddings: its encoder and probe build instead
        from cmrcnet.encoders import get_encoder
        from cmrcnet.probes import make_probe

        with torch.device("meta"):
            encoder = get_encoder(method["params"]["encoder"]).build()
        assert sum(p.numel() for p in encoder.parameters()) > 0
        make_probe(method["params"]["probe"], **method["params"].get("probe_params", {}))
        return
    resolve_train_cfg(train, method, name)
    if method["model"] == "crossmodal":  # the demo grid's tiny towers, built for real (its encoder's weights are
        # fetched by the pipeline: random ones here)
        model = create_model("crossmodal", n_genes=300, **{**method["params"], "weights_path": None})
        assert model.trainable_summary()["trainable"] > 0
        return
    with torch.device("meta"):  # shapes and settings only: no memory for the paper-size weights
        model = create_model(method["model"], n_genes=300, **method["params"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_paper_methods_are_the_papers_sizes_and_ablation_grid():
    config = load_config(REPO_ROOT / "config/paper.yaml")
    with torch.device("meta"):
        vit = create_model("cmrcnet", n_genes=300, **config["methods"]["cmrcnet"]["params"])
    assert vit.image_encoder.num_features == 768 and vit.image_encoder.patch_embed.num_patches == 49  # + CLS = 50
    grid = {(m["params"].get("recon_loss", "mse"), m["params"].get("mask_rate", 0.5),
             m["params"].get("recon_target", "image")) for m in config["methods"].values() if m["model"] == "cmrcnet"}
    assert len(grid) == 9 and ("none", 0.5, "image") in grid and ("cosine", 0.5, "expression") in grid


def test_unknown_encoder_lists_where_to_look():
    with pytest.raises(CMRCNetError, match="no_such_net"):
        create_model("stnet", n_genes=10, encoder="no_such_net")
