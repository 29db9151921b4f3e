"""The cross-modal grid's config expansion and its table/figures, on hand-made fold results."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from cmrcnet.config import check_config, load_config
from cmrcnet.crossmodal.grid import expand_grid, grid_cells, grid_encoders, grid_methods
from cmrcnet.crossmodal.table import cell_row, crossmodal_table, grid_heatmaps, read_fold_results, to_markdown
from cmrcnet.errors import CMRCNetError
from cmrcnet.recipes import effective_method

BLOCK = {"image": ["tiny-test", "test_resnet", "tiny-test@lora"], "gene": ["mlp", "scvi"], "loss": ["clip"],
         "params": {"embed_dim": 32}, "image_params": {"test_resnet": {"input_size": 64}}, "train": {"epochs": 2},
         "datasets": None}


def test_grid_expands_into_one_method_per_cell_in_config_order():
    config = {"methods": {"bleep": {"model": "bleep"}}, "crossmodal": copy.deepcopy(BLOCK),
              "weights": {"dir": "w"}}
    names = expand_grid(config)
    assert names == ["xm-tiny-test-mlp-clip", "xm-tiny-test-scvi-clip", "xm-test_resnet-mlp-clip",
                     "xm-test_resnet-scvi-clip", "xm-tiny-test-lora-mlp-clip", "xm-tiny-test-lora-scvi-clip"]
    assert names == grid_methods(config)
    frozen = config["methods"]["xm-tiny-test-scvi-clip"]
    assert frozen["model"] == "crossmodal" and frozen["train"] == {"epochs": 2}
    assert frozen["params"] == {"embed_dim": 32, "image": "tiny-test", "image_mode": "frozen", "gene": "scvi",
                                "loss": "clip", "weights_path": "w/tiny-test/model.safetensors"}
    scratch = config["methods"]["xm-test_resnet-mlp-clip"]["params"]
    assert scratch["image_mode"] == "scratch" and scratch["input_size"] == 64 and "weights_path" not in scratch
    assert config["methods"]["xm-tiny-test-lora-mlp-clip"]["params"]["image_mode"] == "lora"
    assert "input_size" not in config["methods"]["xm-tiny-test-lora-mlp-clip"]["params"]
    assert grid_encoders(config) == ["tiny-test"]
    assert expand_grid(config) == names  # idempotent: a second pass (Snakemake re-reads) changes nothing
    assert list(config["methods"])[0] == "bleep"


def test_a_cell_named_like_a_hand_written_method_is_refused():
    config = {"methods": {"xm-tiny-test-mlp-clip": {"model": "bleep"}}, "crossmodal": copy.deepcopy(BLOCK)}
    with pytest.raises(CMRCNetError, match="xm-tiny-test-mlp-clip has the name of a method"):
        expand_grid(config)


def test_a_grid_without_one_axis_is_refused():
    config = {"methods": {}, "crossmodal": {"image": ["tiny-test"], "gene": ["mlp"], "loss": []}}
    with pytest.raises(CMRCNetError, match="crossmodal.loss: empty"):
        expand_grid(config)
    assert expand_grid({"methods": {}, "crossmodal": {}}) == []


def test_unknown_mode_is_refused():
    with pytest.raises(CMRCNetError, match="unknown mode 'tuned'"):
        grid_cells({"image": ["tiny-test@tuned"], "gene": ["mlp"], "loss": ["clip"]})


def test_demo_grid_config_plans_the_grid_with_the_encoder_weights_as_a_training_input():
    config = load_config("config/demo_crossmodal.yaml")
    cells = [m for m in config["methods"] if config["methods"][m]["model"] == "crossmodal"]
    assert len(cells) == 8
    eff = effective_method(config, "xm-tiny-test-mlp-clip")
    assert eff["weights"] == "tiny-test" and eff["params"]["weights_path"].endswith("tiny-test/model.safetensors")
    assert effective_method(config, "xm-test_resnet-mlp-clip")["weights"] is None
    check_config(config)  # a second check of the expanded config passes
    assert not [m for m in load_config("config/config.yaml")["methods"] if m.startswith("xm-")]  # make demo: none


def _fold(method, fold, ranks_i2g, ranks_g2i, inbatch, r_by_sample, ba, batch=None, n_inbatch=None):
    n = len(ranks_i2g)
    return {"method": method, "dataset": "d", "fold": fold, "n_test": n,
            "cell": {"image": "tiny-test", "image_mode": "frozen", "gene": method.split("-")[-2], "loss": "clip"},
            "ranks": {"img2gene": ranks_i2g, "gene2img": ranks_g2i},
            "retrieval": {}, "inbatch": {"inbatch8_img2gene_recall@2": inbatch, "inbatch8_gene2img_recall@2": inbatch,
                                         "inbatch8_n": n if n_inbatch is None else n_inbatch},
            "expression": {"retrieval_k5": {"paper_heg50_r_by_sample": r_by_sample, "hest_bench_r": 0.1 * fold},
                           "ridge-hestbench": {"paper_heg50_r_by_sample": r_by_sample, "hest_bench_r": 0.2}},
            "labels": {"spot": {"image": {"balanced_accuracy": ba, "macro_f1": ba / 2}}},
            "batch": batch or {}}


def test_cell_row_pools_ranks_over_folds_and_weights_in_batch_recall_by_spots():
    folds = [_fold("xm-a-mlp-clip", 0, [1, 3, 2], [1, 1, 5], 0.5, {"S1": 0.2}, 0.6,
                   batch={"image": {"ilisi": 0.4}}),
             _fold("xm-a-mlp-clip", 1, [2, 2, 9, 1, 4], [6, 1, 1, 1, 1], 0.9, {"S2": 0.4}, 0.8,
                   batch={"image": {"ilisi": 0.6}})]
    row = cell_row(folds, ks=[1, 2], n_boot=200, seed=0)
    ranks = np.array([1, 3, 2, 2, 2, 9, 1, 4])
    assert row["img2gene_R@1"] == pytest.approx(np.mean(ranks <= 1))  # 2 of 8
    assert row["img2gene_R@2"] == pytest.approx(np.mean(ranks <= 2))  # 5 of 8
    assert row["gene2img_R@2"] == pytest.approx(6 / 8)
    assert row["img2gene_median_rank"] == 2 and row["img2gene_mean_rank"] == pytest.approx(ranks.mean())
    assert row["img2gene_R@2_ci_low"] <= row["img2gene_R@2"] <= row["img2gene_R@2_ci_high"]
    assert row["inbatch8_img2gene_recall@2"] == pytest.approx((0.5 * 3 + 0.9 * 5) / 8)
    assert row["retrieval_k5_paper_heg50_r"] == pytest.approx(0.3)  # mean over the two test samples
    assert row["retrieval_k5_hest_bench_r"] == pytest.approx(0.05)  # mean over folds
    assert row["spot_label_image_balanced_accuracy"] == pytest.approx(0.7)
    assert row["spot_label_image_macro_f1"] == pytest.approx(0.35)
    assert np.isnan(row["sample_label_image_balanced_accuracy"])  # no fold had sample labels
    assert row["batch_image_ilisi"] == pytest.approx(0.5)
    assert row["folds"] == 2 and row["test_spots"] == 8
    assert row["img2gene_chance_R@2"] == pytest.approx((2 / 3 + 2 / 5) / 2)


def test_table_orders_cells_as_the_config_and_markdown_labels_whole_split_and_in_batch(tmp_path):
    results = [_fold("xm-b-scvi-clip", 0, [1, 2], [1, 2], 0.5, {"S1": 0.1}, 0.5),
               _fold("xm-a-mlp-clip", 0, [2, 2], [2, 2], 0.5, {"S1": 0.2}, 0.5)]
    paths = []
    for i, r in enumerate(results):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    table = crossmodal_table(read_fold_results(paths), ks=[1, 2], n_boot=0, order=["xm-a-mlp-clip", "xm-b-scvi-clip"])
    assert list(table["method"]) == ["xm-a-mlp-clip", "xm-b-scvi-clip"]
    assert table["img2gene_R@1"].tolist() == [0.0, 0.5]
    text = to_markdown(table, [1, 2], 8, "ridge-hestbench", 5)
    assert "**whole test split**" in text and "in-batch8 img2gene R@2" in text
    assert "| d | xm-a-mlp-clip | 1 | 0.000 |" in text


def test_fold_result_without_ranks_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"method": "x"}))
    with pytest.raises(CMRCNetError, match="not a cross-modal fold result"):
        read_fold_results([path])


def test_grid_heatmaps_show_each_cell_at_its_image_row_and_gene_loss_column(tmp_path, monkeypatch):
    import cmrcnet.figures.common as common

    shown = {}

    def capture(fig, out_base):
        shown["arrays"] = [ax.images[0].get_array().filled(np.nan) for ax in fig.axes if ax.images]
        shown["rows"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        shown["cols"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return []

    monkeypatch.setattr(common, "save_figure", capture)
    import pandas as pd

    table = pd.DataFrame([
        {"dataset": "d", "image": "uni", "image_mode": "frozen", "gene": "mlp", "loss": "clip",
         "img2gene_R@10": 0.1, "gene2img_R@10": 0.2, "ridge-hestbench_paper_heg50_r": 0.3},
        {"dataset": "d", "image": "uni", "image_mode": "lora", "gene": "mlp", "loss": "clip",
         "img2gene_R@10": 0.4, "gene2img_R@10": 0.5, "ridge-hestbench_paper_heg50_r": 0.6},
        {"dataset": "d", "image": "uni", "image_mode": "frozen", "gene": "scvi", "loss": "siglip",
         "img2gene_R@10": 0.7, "gene2img_R@10": 0.8, "ridge-hestbench_paper_heg50_r": 0.9},
    ])
    grid_heatmaps(table, "d", tmp_path / "grid", 10, "ridge-hestbench", 5)
    assert shown["rows"] == ["uni", "uni (lora)"]
    assert shown["cols"] == ["mlp / clip", "scvi / siglip"]
    np.testing.assert_allclose(shown["arrays"][0], [[0.1, 0.7], [0.4, np.nan]])
    np.testing.assert_allclose(shown["arrays"][2], [[0.3, 0.9], [0.6, np.nan]])
    with pytest.raises(CMRCNetError, match="no grid cell"):
        grid_heatmaps(table, "other", tmp_path / "x", 10, "ridge-hestbench", 5)
