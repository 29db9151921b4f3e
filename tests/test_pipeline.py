"""The Snakemake pipeline end to end on a tiny synthetic config, plus planning and lint checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from cmrcnet.config import REPO_ROOT

pytestmark = pytest.mark.slow  # the Snakemake pipeline or real training: minutes on 2 cores

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile")]

TINY = {
    "seed": 0,
    "genes": {"n_top_hvg": 100},
    "datasets": {
        "tiny-visium": {
            "source": "synthetic", "technology": "visium", "samples": ["V1", "V2", "V3"],
            "marker_genes": ["EPCAM", "RND"], "figure_gene": "EPCAM",
            "synthetic": {"seed": 5, "width_um": 700, "height_um": 700, "n_genes": 300},
        },
        "tiny-xenium": {
            "source": "synthetic", "technology": "xenium", "samples": ["X1", "X2", "X3"],
            "folds_scheme": "leave_one_patient_out",
            "synthetic": {"seed": 6, "width_um": 600, "height_um": 600, "n_panel_genes": 120},
            "patients": {"X1": "PA", "X2": "PA", "X3": "PB"},
        },
    },
    "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 2, "num_workers": 0, "amp": False},
    "resources": {"train": {"gpus": 0, "cpus": 1, "mem_mb": 1000, "runtime": 10}},
    "evaluation": {"k": [5, 10], "tta": True, "top_genes": [20, 50], "bootstrap": 100},
    "methods": {
        "stnet": {"model": "stnet", "paper_name": "STNet", "params": {"encoder": "test_resnet", "input_size": 32}},
        "bleep": {"model": "bleep", "params": {"encoder": "test_resnet", "input_size": 32, "embed_dim": 16},
                  "datasets": ["tiny-visium"]},
        "histogene": {"model": "histogene", "params": {"patch_px": 16, "dim": 16, "depth": 1, "heads": 2},
                      "datasets": ["tiny-xenium"], "train": {"batch_size": 1}},
        # a probe on cached frozen embeddings (rules tiny_test_weights, fetch_weights, embed, probe): no training
        "tiny-ridge": {"model": "probe", "params": {"encoder": "tiny-test", "probe": "ridge-hestbench"},
                       "datasets": ["tiny-xenium"]},
    },
    "weights": {"local": {"tiny-test": "data/encoders/tiny-test-seed0.pt"}},
    # a one-cell cross-modal grid (rules crossmodal_eval, crossmodal_table, crossmodal_figures): the frozen tiny-test
    # encoder with a trained projection, an MLP gene tower, SigLIP; per-sample labels from the config
    "crossmodal": {"image": ["tiny-test"], "gene": ["mlp"], "loss": ["siglip"], "params": {"embed_dim": 8},
                   "datasets": ["tiny-visium"], "inbatch_batch_size": 8, "bootstrap": 50,
                   "labels": {"sample": {"V1": "a", "V2": "b", "V3": "a"}}},
    # the deployable BLEEP (trained on V1-V3) maps one slide: rules train_deployable and predict_slide
    "predict_slides": {"v3-map": {"slide": "data/tiny-visium/wsis/V3.tif", "dataset": "tiny-visium",
                                  "method": "bleep", "genes": ["EPCAM"]}},
}


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [*SNAKEMAKE, "-d", str(workdir), "--configfile", str(path), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    result = snakemake(workdir, TINY, "all")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_every_output_and_log_exists_and_nothing_half_written(run):
    for ds, samples in [("tiny-visium", ["V1", "V2", "V3"]), ("tiny-xenium", ["X1", "X2", "X3"])]:
        assert (run / "processed" / ds / "genes.tsv").is_file()
        assert (run / "processed" / ds / "folds.tsv").is_file()
        for s in samples:
            for rel in [f"data/{ds}/st/{s}.h5ad", f"data/{ds}/wsis/{s}.tif", f"data/{ds}/metadata/{s}.json",
                        f"processed/{ds}/st/{s}.h5ad", f"processed/{ds}/patches/{s}.h5",
                        f"processed/{ds}/spots/{s}.parquet", f"logs/extract_patches/{ds}/{s}.log",
                        f"logs/normalise/{ds}/{s}.log", f"logs/synthesize/{ds}/{s}.log"]:
                assert (run / rel).is_file(), rel
    assert not [p for p in run.rglob(".*.tmp*")]


def test_gene_sets_are_shared_in_order_and_controls_are_gone(run):
    for ds, samples in [("tiny-visium", ["V1", "V2", "V3"]), ("tiny-xenium", ["X1", "X2", "X3"])]:
        genes = list(pd.read_csv(run / "processed" / ds / "genes.tsv", sep="\t")["gene"])
        for s in samples:
            adata = ad.read_h5ad(run / "processed" / ds / "st" / f"{s}.h5ad")
            assert list(adata.var_names) == genes
            assert np.issubdtype(adata.layers["counts"].dtype, np.integer)
            assert json.loads(adata.uns["cmrcnet"])["provenance"]["versions"]["cmrcnet"]
    xenium = pd.read_csv(run / "processed/tiny-xenium/genes.tsv", sep="\t")["gene"]
    assert not xenium.str.match("BLANK|NegControl|Unassigned").any()
    raw = ad.read_h5ad(run / "data/tiny-xenium/st/X1.h5ad")
    assert raw.var_names.str.startswith("BLANK").any()  # the filter had something to remove
    visium = pd.read_csv(run / "processed/tiny-visium/genes.tsv", sep="\t")
    assert "EPCAM" in set(visium.gene[visium.is_marker]) and "RND" not in set(visium.gene)
    assert "marker gene RND" in (run / "logs/select_genes/tiny-visium.log").read_text()


def test_folds_follow_each_datasets_scheme(run):
    visium = pd.read_csv(run / "processed/tiny-visium/folds.tsv", sep="\t")
    assert visium["fold"].nunique() == 3 and (visium.role == "test").sum() == 3
    xenium = pd.read_csv(run / "processed/tiny-xenium/folds.tsv", sep="\t")
    assert xenium["fold"].nunique() == 2
    test_sets = xenium[xenium.role == "test"].groupby("fold")["sample"].apply(set).tolist()
    assert {"X1", "X2"} in test_sets and {"X3"} in test_sets


def test_patches_cover_the_normalised_spots(run):
    for ds, s in [("tiny-visium", "V2"), ("tiny-xenium", "X1")]:
        adata = ad.read_h5ad(run / "processed" / ds / "st" / f"{s}.h5ad")
        spots = pd.read_parquet(run / "processed" / ds / "spots" / f"{s}.parquet")
        with h5py.File(run / "processed" / ds / "patches" / f"{s}.h5") as f:
            assert f["img"].shape == (adata.n_obs, 224, 224, 3) and f["img"].dtype == np.uint8
            barcodes = [b[0].decode() for b in f["barcode"][:]]
            assert f["coords"].shape == (adata.n_obs, 2)
            assert f["img"][0].std() > 0  # real image content, not an empty fill
        assert set(barcodes) == set(adata.obs_names) == set(spots["barcode"])


def test_one_training_job_per_method_and_fold(run):
    runs = sorted(p.parent.relative_to(run / "models").as_posix() for p in (run / "models").glob("*/*/fold*/best.pt"))
    assert runs == ["tiny-visium/bleep/fold0", "tiny-visium/bleep/fold1", "tiny-visium/bleep/fold2",
                    "tiny-visium/stnet/fold0", "tiny-visium/stnet/fold1", "tiny-visium/stnet/fold2",
                    "tiny-visium/xm-tiny-test-mlp-siglip/fold0", "tiny-visium/xm-tiny-test-mlp-siglip/fold1",
                    "tiny-visium/xm-tiny-test-mlp-siglip/fold2",
                    "tiny-xenium/histogene/fold0", "tiny-xenium/histogene/fold1",
                    "tiny-xenium/stnet/fold0", "tiny-xenium/stnet/fold1"]
    info = json.loads((run / "models/tiny-xenium/stnet/fold1/train.json").read_text())
    assert info["test_samples"] == ["X3"] and info["train_samples"] == ["X1", "X2"]
    assert info["summary"]["complete"] and info["config"]["train_cfg"]["epochs"] == 2
    history = pd.read_csv(run / "models/tiny-visium/stnet/fold0/history.csv")
    assert list(history["epoch"]) == [1, 2] and history["val_loss"].notna().all()
    assert "done, best epoch" in (run / "logs/train/tiny-visium/stnet/fold0.log").read_text()
    assert (run / "models/tiny-visium/stnet/fold0/checkpoints/last.pt").is_file()


def test_slide_prediction_uses_the_deployable_model_of_every_sample(run):
    info = json.loads((run / "models/tiny-visium/bleep/all/train.json").read_text())
    assert info["train_samples"] == ["V1", "V2", "V3"] and info["test_samples"] == []
    adata = ad.read_h5ad(run / "results/slides/v3-map.h5ad")
    genes = pd.read_csv(run / "processed/tiny-visium/genes.tsv", sep="\t")["gene"].tolist()
    assert list(adata.var_names) == genes and adata.n_obs > 0 and np.isfinite(adata.X).all()
    meta = json.loads(adata.uns["cmrcnet"])
    assert meta["model_path"].endswith("models/tiny-visium/bleep/all/best.pt") and meta["k"] == 5
    assert (run / "results/slides/v3-map_maps.png").is_file() and (run / "results/slides/v3-map_maps.pdf").is_file()


def test_changed_method_settings_retrain_only_that_method(run):
    changed = json.loads(json.dumps(TINY))
    changed["methods"]["histogene"]["params"]["dim"] = 8
    plan = snakemake(run, changed, "all", "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = {line.split()[0]: line.split()[1] for line in plan.stdout.splitlines() if len(line.split()) == 2}
    assert counts.get("train") == "2" and "normalise" not in counts
    # and re-predicts, re-scores and redraws only what depends on it
    assert counts.get("predict") == "2" and counts.get("evaluate") == "1" and counts.get("figures") == "1"


def test_predictions_keep_truth_and_one_layer_per_variant(run):
    pred = ad.read_h5ad(run / "results/tiny-visium/predictions/bleep/fold1.h5ad")
    truth = ad.read_h5ad(run / "processed/tiny-visium/st/V2.h5ad")
    assert set(pred.layers) == {"k5", "k10"} and dict(pred.uns["labels"]) == {"k5": "bleep-k5", "k10": "bleep-k10"}
    assert list(pred.var_names) == list(truth.var_names) and set(pred.obs["sample"]) == {"V2"}
    order = [truth.obs_names.get_loc(b) for b in pred.obs["barcode"]]
    assert np.allclose(pred.X, np.asarray(truth.X[order].todense() if hasattr(truth.X, "todense") else truth.X[order]))
    stnet = ad.read_h5ad(run / "results/tiny-xenium/predictions/stnet/fold0.h5ad")
    assert set(stnet.layers) == {"pred", "tta"} and not np.allclose(stnet.layers["pred"], stnet.layers["tta"])
    assert json.loads(stnet.uns["cmrcnet"])["fingerprint"]


def test_tables_and_figures_cover_every_method_and_dataset(run):
    tables = run / "results/tables"
    summary = pd.read_csv(tables / "summary.csv")
    assert set(summary["protocol"]) == {"paper", "hest-bench"}
    assert set(summary["method"]) == {"stnet", "stnet-tta", "bleep-k5", "bleep-k10", "histogene", "tiny-ridge",
                                      "xm-tiny-test-mlp-siglip-k5", "xm-tiny-test-mlp-siglip-k10"}
    assert {"HEG20", "HVG50", "marker", "hest50"} <= set(summary["gene_set"])
    t1 = pd.read_csv(tables / "table1_top50.csv")
    assert set(t1["dataset"]) == {"tiny-visium", "tiny-xenium"} and "HEG50_paper" in t1.columns
    assert "| tiny-visium | bleep-k5 |" in (tables / "table1_top50.md").read_text()
    wilcoxon = pd.read_csv(tables / "wilcoxon.csv")
    assert len(wilcoxon[(wilcoxon.dataset == "tiny-visium") & (wilcoxon.gene_set == "HEG50")]) == 15  # 6 labels
    best = pd.read_csv(tables / "table3_best_genes.csv")
    assert best.groupby(["dataset", "method"]).size().eq(5).all()
    # the frozen-encoder probe is Table 4's row (no CMRCNet in this config to put beside it)
    t4 = pd.read_csv(tables / "table4_foundation.csv")
    assert list(zip(t4["dataset"], t4["method"])) == [("tiny-xenium", "tiny-ridge")]
    assert json.loads((tables / "provenance.json").read_text())["versions"]["torch"]
    for ds in ("tiny-visium", "tiny-xenium"):
        for name in ("fig2_boxplots", "fig3_mean_variance", "fig4_heatmaps_heg", "fig4_heatmaps_hvg",
                     "fig5_spatial", "training_curves"):
            for ext in ("png", "pdf"):
                assert (run / f"results/{ds}/figures/{name}.{ext}").stat().st_size > 1000, (ds, name, ext)
    assert "spatial gene EPCAM on V1" in (run / "logs/figures/tiny-visium.log").read_text()


def test_crossmodal_grid_is_trained_per_fold_and_judged_over_whole_test_splits(run):
    results = [json.loads((run / f"results/tiny-visium/crossmodal/xm-tiny-test-mlp-siglip/fold{f}.json").read_text())
               for f in range(3)]
    for fold, result in enumerate(results):
        test = ad.read_h5ad(run / f"processed/tiny-visium/st/{result['test_samples'][0]}.h5ad")
        assert result["fold"] == fold and result["n_test"] == len(result["ranks"]["img2gene"])
        ranks = np.array(result["ranks"]["img2gene"])
        assert result["n_test"] <= test.n_obs and ranks.min() >= 1 and ranks.max() <= result["n_test"]
        assert result["retrieval"]["img2gene_recall@10"] == pytest.approx(np.mean(ranks <= 10))
        assert set(result["expression"]) == {"retrieval_k5", "ridge-hestbench"}
        assert set(result["labels"]["spot"]) == {"image", "expression"}  # synthetic tissue types
        assert "sample" in result["labels"] and "ilisi" in result["batch"]["image"]
    table = pd.read_csv(run / "results/tables/crossmodal.csv")
    assert list(table["method"]) == ["xm-tiny-test-mlp-siglip"] and table["folds"].tolist() == [3]
    pooled = np.concatenate([r["ranks"]["gene2img"] for r in results])
    assert table["gene2img_R@5"].iloc[0] == pytest.approx(np.mean(pooled <= 5))
    assert "in-batch8" in (run / "results/tables/crossmodal.md").read_text()
    for name in ("crossmodal_grid", "crossmodal_umap"):
        for ext in ("png", "pdf"):
            assert (run / f"results/tiny-visium/figures/{name}.{ext}").stat().st_size > 1000
    assert not (run / "results/tiny-xenium/crossmodal").exists()  # the grid runs on its datasets only


def test_report_holds_every_table_and_figure(run):
    result = snakemake(run, TINY, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (run / "report.html").read_text()
    for text in ("Table 1 of the paper", "table5_ablation.csv", "fig5_spatial.png", "training_curves.png",
                 "crossmodal.csv", "crossmodal_grid.png", "crossmodal_umap.png"):
        assert text in html, text


def test_unknown_figure_gene_names_close_genes(run):
    changed = json.loads(json.dumps(TINY))
    changed["datasets"]["tiny-visium"]["figure_gene"] = "EPCM"
    result = snakemake(run, changed, "all")
    assert result.returncode != 0
    assert re.findall(r"^(?:local)?rule (\w+):$", result.stdout + result.stderr, re.M) == ["figures"]  # nothing else
    log = (run / "logs/figures/tiny-visium.log").read_text()
    assert "tiny-visium: figure_gene: gene EPCM is not in the data; close names: EPCAM" in log
    assert not (run / "results/tiny-visium/figures/fig5_spatial.png").exists()  # no stale figure left
    restored = snakemake(run, TINY, "all")
    assert restored.returncode == 0, restored.stderr[-3000:]


def test_rerun_has_nothing_to_do(run):
    result = snakemake(run, TINY, "all", "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_local_source_links_and_unknown_sample_fails_cleanly(run, tmp_path):
    local = {
        "datasets": {"loc": {"source": "local", "technology": "visium", "samples": ["V1", "V2"],
                             "local_dir": str(run / "data" / "tiny-visium")}},
    }
    result = snakemake(tmp_path, local, "processed/loc/genes.tsv")
    assert result.returncode == 0, result.stderr[-3000:]
    link = tmp_path / "data/loc/st/V1.h5ad"
    assert link.is_symlink() and link.resolve() == (run / "data/tiny-visium/st/V1.h5ad").resolve()

    local["datasets"]["loc"]["samples"] = ["V1", "NOPE"]
    result = snakemake(tmp_path, local, "processed/loc/genes.tsv")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "NOPE" in errors[0]
    assert not (tmp_path / "data/loc/st/NOPE.h5ad").exists()


def test_invalid_config_stops_before_planning(tmp_path):
    bad = {"datasets": {"d": {"source": "synthetic", "technology": "visium", "samples": ["S1"]}}}
    result = snakemake(tmp_path, bad, "-n")
    assert result.returncode != 0
    assert "datasets.d.samples: only 1 sample (S1); cross-validation needs at least 2" in result.stderr


def test_deploy_plans_one_model_per_dataset_and_method_trained_on_every_sample(tmp_path):
    result = snakemake(tmp_path, TINY, "-n", "deploy")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    # (stnet, bleep, the grid's cell) x visium, (stnet, histogene) x xenium
    assert counts["train_deployable"] == "5" and "train" not in counts
    assert "predict_slide" not in counts and "predict" not in counts


def test_paper_config_plans_six_datasets_offline_and_lint_is_clean():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    plan = subprocess.run([*SNAKEMAKE, "-d", str(REPO_ROOT), "-n", "all", "--configfile", "config/paper.yaml"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert plan.returncode == 0, plan.stderr[-3000:]
    out = plan.stdout + plan.stderr
    for rule, count in [("fetch_hest", 22), ("select_genes", 6), ("normalise", 22), ("folds", 6),
                        ("extract_patches", 22), ("train", 264), ("predict", 264), ("evaluate", 6),
                        ("figures", 6), ("tables", 1), ("embed", 22), ("probe", 44)]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), rule
    # 12 trained methods (4 models + 8 ablations) x 22 folds, each training and prediction job asking for one GPU,
    # and one cTransPath embedding job per sample (Table 4's two probes read the cache, on the CPU)
    gpu_jobs = [line for line in out.splitlines() if line.strip().startswith("resources:") and "gpu=" in line]
    assert len(gpu_jobs) == 2 * 264 + 22 and all("gpu=1," in line for line in gpu_jobs)
    lint = subprocess.run([*SNAKEMAKE, "-d", str(REPO_ROOT), "--lint"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr


def test_cli_predict_matches_the_rule(run, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "bleep-fold1.h5ad"
    result = subprocess.run([sys.executable, "-m", "cmrcnet", "predict", str(config), "tiny-visium", "bleep", "1",
                             "--out", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=run)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = ad.read_h5ad(out)
    rule = ad.read_h5ad(run / "results/tiny-visium/predictions/bleep/fold1.h5ad")
    assert np.array_equal(ours.layers["k10"], rule.layers["k10"])  # deterministic on the CPU
    assert json.loads(ours.uns["cmrcnet"])["fingerprint"] == json.loads(rule.uns["cmrcnet"])["fingerprint"]
