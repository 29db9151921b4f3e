"""Scoring prediction files (both protocols), refusing mixed inputs, and the results tables built from them."""

from __future__ import annotations

import copy
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cmrcnet.config import run_fingerprint
from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.evaluate import evaluate_dataset, read_predictions
from cmrcnet.evaluation.tables import build_tables, figure_labels

GENES = [f"G{i}" for i in range(12)]
SAMPLES = ["S1", "S2", "S3"]


def _truth(sample_index: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(sample_index)
    scale = np.linspace(0.5, 3.0, len(GENES))
    return rng.gamma(2.0, scale, size=(n, len(GENES))).astype(np.float32)


def write_normalised(tmp_path) -> dict:
    paths = {}
    for i, s in enumerate(SAMPLES):
        p = tmp_path / "st" / f"{s}.h5ad"
        p.parent.mkdir(exist_ok=True)
        ad.AnnData(X=_truth(i), var=pd.DataFrame(index=GENES)).write_h5ad(p)
        paths[s] = p
    return paths


def write_prediction(path, *, method, fold, layers, fingerprint="fp", genes=GENES, truth=None):
    """A file in the format `cmrcnet predict` writes: X = truth, one layer per label."""
    sample = SAMPLES[fold]
    truth = _truth(fold) if truth is None else truth
    obs = pd.DataFrame({"sample": sample, "barcode": [f"b{i}" for i in range(len(truth))],
                        "x": np.arange(len(truth)) * 10.0, "y": 5.0})
    obs.index = (sample + ":" + obs["barcode"]).to_numpy()
    values = {name: fn(truth) for name, fn in layers.items()}
    adata = ad.AnnData(X=truth, obs=obs, var=pd.DataFrame(index=genes), layers=values)
    labels = {name: (method if name == "pred" else f"{method}-{name}") for name in layers}
    adata.uns["labels"] = labels
    adata.uns["cmrcnet"] = json.dumps({"method": method, "fold": fold, "labels": labels, "fingerprint": fingerprint})
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def perfect(t):
    return t.copy()


def noisy(t):
    return t + np.random.default_rng(1).normal(0, 2.0, t.shape).astype(np.float32)


@pytest.fixture
def predictions(tmp_path):
    paths = []
    for fold in range(3):
        paths.append(write_prediction(tmp_path / f"stnet/fold{fold}.h5ad", method="stnet", fold=fold,
                                      layers={"pred": perfect, "tta": noisy}))
        paths.append(write_prediction(tmp_path / f"bleep/fold{fold}.h5ad", method="bleep", fold=fold,
                                      layers={"k5": noisy, "k10": perfect}))
    return paths, write_normalised(tmp_path)


def test_scores_both_protocols_with_one_label_per_layer(predictions):
    paths, normalised = predictions
    scores, sets, labels = evaluate_dataset(paths, normalised, dataset="d", marker_genes=["G3", "NOPE"],
                                            top_genes=[5], hest_bench_n=4, hest_bench_min_fraction=0.1)
    assert set(scores["protocol"]) == {"paper", "hest-bench"}
    assert sorted(set(scores["method"])) == ["bleep-k10", "bleep-k5", "stnet", "stnet-tta"]
    # a perfect prediction has r = 1 for every gene, on both protocols; a noisy one less
    assert np.allclose(scores.loc[scores["method"] == "stnet", "r"], 1.0)
    assert scores.loc[scores["method"] == "stnet-tta", "r"].mean() < 0.9
    paper = scores[(scores["protocol"] == "paper") & (scores["method"] == "bleep-k10")]
    assert sorted(paper["sample"].unique()) == SAMPLES and len(paper) == 3 * len(GENES)
    # HEG5 of each test sample is chosen on that sample's truth; the unknown marker is dropped
    heg = sets[(sets["gene_set"] == "HEG5") & (sets["sample"] == "S2")]["gene"].tolist()
    mean = _truth(1).mean(axis=0)
    assert set(heg) == {GENES[i] for i in np.argsort(-mean)[:5]}
    assert sets.loc[sets["gene_set"] == "marker", "gene"].unique().tolist() == ["G3"]
    bench = sets[sets["protocol"] == "hest-bench"]
    assert bench["gene_set"].unique().tolist() == ["hest4"] and bench.groupby("fold")["gene"].count().eq(4).all()
    assert set(labels.columns) >= {"label", "method", "layer", "fold"} and len(labels) == 12


def test_refuses_predictions_from_another_config(predictions):
    paths, normalised = predictions
    with pytest.raises(CMRCNetError, match=r"fold0\.h5ad: made under another config \(fingerprint fp"):
        evaluate_dataset(paths, normalised, dataset="d", fingerprints={"stnet": "other", "bleep": "fp"})
    evaluate_dataset(paths, normalised, dataset="d", fingerprints={"stnet": "fp", "bleep": "fp"})


def test_refuses_other_genes_and_a_fold_predicted_twice(predictions, tmp_path):
    paths, normalised = predictions
    renamed = write_prediction(tmp_path / "x/fold1.h5ad", method="x", fold=1, layers={"pred": perfect},
                               genes=[g.lower() for g in GENES])
    with pytest.raises(CMRCNetError, match="predicts other genes than"):
        evaluate_dataset([*paths, renamed], normalised, dataset="d")
    twice = write_prediction(tmp_path / "again/fold1.h5ad", method="stnet", fold=1, layers={"pred": perfect})
    with pytest.raises(CMRCNetError, match="stnet fold 1 is predicted by more than one file"):
        evaluate_dataset([*paths, twice], normalised, dataset="d")


def test_nan_prediction_names_the_file_and_layer(predictions, tmp_path):
    paths, normalised = predictions

    def with_nan(t):
        out = t.copy()
        out[3, 2] = np.nan
        return out

    bad = write_prediction(tmp_path / "bad/fold2.h5ad", method="bad", fold=2, layers={"pred": with_nan})
    with pytest.raises(CMRCNetError, match=r"bad/fold2\.h5ad \[pred\].*NaN/inf"):
        evaluate_dataset([bad], normalised, dataset="d")


def test_missing_or_corrupt_prediction_file(tmp_path):
    with pytest.raises(CMRCNetError, match="nope.h5ad: prediction file not found"):
        read_predictions(tmp_path / "nope.h5ad")
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CMRCNetError, match="junk.h5ad: not a readable prediction file"):
        read_predictions(junk)
    plain = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.ones((2, 2), np.float32)).write_h5ad(plain)
    with pytest.raises(CMRCNetError, match="plain.h5ad: not written by `cmrcnet predict`"):
        read_predictions(plain)


CONFIG = {
    "seed": 0,
    "evaluation": {"k": [5, 10]},
    "methods": {
        "stnet": {"model": "stnet", "paper_name": "STNet", "params": {}},
        "bleep": {"model": "bleep", "paper_name": "BLEEP", "params": {}},
        "cmrcnet-none": {"model": "cmrcnet", "ablation": True, "params": {"recon_loss": "none"}},
    },
}


def test_tables_put_the_papers_value_and_difference_beside_ours(predictions, tmp_path):
    paths, normalised = predictions
    ablation = [write_prediction(tmp_path / f"abl/fold{f}.h5ad", method="cmrcnet-none", fold=f,
                                 layers={"k5": noisy, "k10": noisy}) for f in range(3)]
    scores, sets, labels = evaluate_dataset([*paths, *ablation], normalised, dataset="IDC-LymphNode",
                                            marker_genes=["G3", "G7"], top_genes=[50, 150, 250])
    paper_tables, plain = build_tables(scores, sets, labels, CONFIG, n_boot=100, seed=0)
    t1 = paper_tables["table1_top50"][0].set_index("method")
    assert list(t1.index) == ["stnet", "stnet-tta", "bleep-k5", "bleep-k10"]  # config order, then k
    # the paper's IDC-LymphNode STNet row: HEG 0.2067; ours is a perfect prediction (r = 1)
    assert t1.loc["stnet", "HEG50_paper"] == pytest.approx(0.2067)
    assert t1.loc["stnet", "HEG50_diff"] == pytest.approx(1.0 - 0.2067)
    # BLEEP at k = 5 has no paper row (the paper's BLEEP is k = 50); ablation variants stay out of Table 1
    assert np.isnan(t1.loc["bleep-k5", "HEG50_paper"]) and "cmrcnet-none-k5" not in t1.index
    t5 = paper_tables["table5_ablation"][0]
    assert t5["method"].tolist() == ["cmrcnet-none-k5"] and t5.loc[0, "HEG50_paper"] == pytest.approx(0.2933)
    summary = plain["summary"]
    row = summary[(summary["method"] == "stnet-tta") & (summary["gene_set"] == "HEG50")].iloc[0]
    assert row["n_folds"] == 3 and row["ci_low"] <= row["mean_r"] <= row["ci_high"]
    wil = plain["wilcoxon"]
    assert not wil["method_a"].str.startswith("cmrcnet-none").any()  # only the paper's comparison
    best = plain["table3_best_genes"]
    assert best.groupby("method").size().eq(5).all()


def test_figure_labels_one_per_main_method_at_the_smallest_k():
    labels = pd.DataFrame({"label": ["bleep-k10", "bleep-k5", "stnet", "stnet-tta", "cmrcnet-none-k5"],
                           "method": ["bleep", "bleep", "stnet", "stnet", "cmrcnet-none"],
                           "layer": ["k10", "k5", "pred", "tta", "k5"]})
    assert figure_labels(labels, CONFIG) == ["stnet", "bleep-k5"]


def test_fingerprint_follows_what_shapes_predictions_only():
    config = {"seed": 0, "genes": {}, "normalise": {}, "patches": {"size_px": 224}, "train": {"lr": 1e-3},
              "evaluation": {"k": [50], "weighted": False, "tta": False, "bootstrap": 1000},
              "datasets": {"d": {"samples": ["A", "B"]}}, "methods": copy.deepcopy(CONFIG["methods"])}
    base = run_fingerprint(config, "d", "stnet")
    renamed = copy.deepcopy(config)
    renamed["methods"]["stnet"]["paper_name"] = "Other"
    renamed["evaluation"]["bootstrap"] = 5000
    assert run_fingerprint(renamed, "d", "stnet") == base
    for change in (("patches", "size_px", 112), ("train", "lr", 1e-4), ("evaluation", "k", [5])):
        other = copy.deepcopy(config)
        other[change[0]][change[1]] = change[2]
        assert run_fingerprint(other, "d", "stnet") != base, change


def test_fingerprint_ignores_the_figure_gene():
    config = {"evaluation": {"k": [5]}, "datasets": {"d": {"samples": ["A", "B"], "figure_gene": "EPCAM"}},
              "methods": copy.deepcopy(CONFIG["methods"])}
    other = copy.deepcopy(config)
    other["datasets"]["d"]["figure_gene"] = "CD24"
    assert run_fingerprint(config, "d", "stnet") == run_fingerprint(other, "d", "stnet")


def test_table4_puts_a_foundation_model_beside_cmrcnet_at_the_largest_k(tmp_path):
    normalised = write_normalised(tmp_path)
    paths = []
    for fold in range(3):
        paths.append(write_prediction(tmp_path / f"fm/fold{fold}.h5ad", method="fm", fold=fold,
                                      layers={"pred": perfect, "tta": noisy}))
        paths.append(write_prediction(tmp_path / f"cm/fold{fold}.h5ad", method="cmrcnet", fold=fold,
                                      layers={"k50": noisy, "k500": perfect}))
    config = {"evaluation": {"k": [50, 500]}, "datasets": {"IDC-LymphNode": {}}, "methods": {
        "fm": {"model": "foundation", "paper_name": "cTransPath", "params": {}},
        "cmrcnet": {"model": "cmrcnet", "paper_name": "CMRCNet", "params": {}}}}
    scores, sets, labels = evaluate_dataset(paths, normalised, dataset="IDC-LymphNode", protocols=["paper"])
    paper_tables, _ = build_tables(scores, sets, labels, config, n_boot=100)
    t4 = paper_tables["table4_foundation"][0].set_index("method")
    assert list(t4.index) == ["fm", "cmrcnet-k500"]
    assert t4.loc["fm", "HEG50_paper"] == pytest.approx(0.4326)  # the paper's cTransPath on IDC-LymphNode
    assert t4.loc["cmrcnet-k500", "HVG50_paper"] == pytest.approx(0.2479)
    assert t4.loc["fm", "HEG50_diff"] == pytest.approx(1.0 - 0.4326)
    without = build_tables(scores[scores["method"] != "fm"], sets, labels[labels["method"] != "fm"],
                           {**config, "methods": {"cmrcnet": config["methods"]["cmrcnet"]}}, n_boot=100)[0]
    assert without["table4_foundation"][0].empty


def constant_g0(t):
    out = t.copy()
    out[:, 0] = 1.0  # G0 predicted as one value everywhere: its r is undefined
    return out


@pytest.mark.parametrize("rule, expected", [("zero", 11 / 12), ("omit", 1.0)])
def test_tables_count_an_undefined_r_as_the_config_says_and_name_the_rule(tmp_path, rule, expected):
    normalised = write_normalised(tmp_path)
    paths = [write_prediction(tmp_path / f"stnet/fold{f}.h5ad", method="stnet", fold=f, layers={"pred": constant_g0})
             for f in range(3)]
    scores, sets, labels = evaluate_dataset(paths, normalised, dataset="IDC-LymphNode", protocols=["paper"])
    assert scores.loc[scores["gene"] == "G0", "r"].isna().all()  # NaN in the per-gene scores either way
    config = {"evaluation": {"k": [5], "undefined_r": rule}, "datasets": {"IDC-LymphNode": {}},
              "methods": {"stnet": {"model": "stnet", "paper_name": "STNet", "params": {}}}}
    paper_tables, plain = build_tables(scores, sets, labels, config, n_boot=50)
    t1, _, _, note = paper_tables["table1_top50"]
    row = t1.set_index("method").loc["stnet"]
    # 12 genes, so HEG50 holds all of them: 11 perfect genes and G0 as 0 (zero) or left out (omit)
    assert row["HEG50_mean"] == pytest.approx(expected) and row["HEG50_n_nan"] == 3
    assert row["undefined_r"] == rule and ("counts as 0" if rule == "zero" else "left out") in note
    assert set(plain["summary"]["undefined_r"]) == {rule}
    assert set(plain["table3_best_genes"]["undefined_r"]) == {rule}
    assert plain["nan_counts"]["n_genes"].sum() == 3


def test_tables_provenance_prints_genes_selected_beside_the_papers_count(predictions, tmp_path):
    from types import SimpleNamespace

    from cmrcnet import workflow

    paths, normalised = predictions
    scores, sets, labels = evaluate_dataset(paths, normalised, dataset="SKCM", protocols=["paper"])
    inputs = {"scores": tmp_path / "scores.parquet", "gene_sets": tmp_path / "sets.parquet",
              "labels": tmp_path / "labels.tsv", "genes": tmp_path / "genes.tsv"}
    scores.to_parquet(inputs["scores"])
    sets.to_parquet(inputs["gene_sets"])
    labels.to_csv(inputs["labels"], sep="\t", index=False)
    pd.DataFrame({"gene": GENES}).to_csv(inputs["genes"], sep="\t", index=False)
    config = {"seed": 0, "evaluation": {"k": [5, 10], "bootstrap": 100, "undefined_r": "zero"},
              "datasets": {"SKCM": {"gene_selection": "panel", "panel_controls": "keep", "spots": "all",
                                    "paper_n_genes": 541}},
              "methods": copy.deepcopy(CONFIG["methods"])}
    smk = SimpleNamespace(input=SimpleNamespace(**{k: [str(v)] for k, v in inputs.items()}), config=config,
                          output=SimpleNamespace(summary=str(tmp_path / "tables" / "summary.csv")), rule="tables")
    workflow.tables(smk)
    info = json.loads((tmp_path / "tables" / "provenance.json").read_text())
    assert info["gene_counts"] == [{"dataset": "SKCM", "n_genes": 12, "paper_n_genes": 541, "difference": -529,
                                    "gene_selection": "panel", "panel_controls": "keep", "spots": "all"}]
    assert info["undefined_r"] == "zero"


def test_fingerprint_follows_the_spot_set_and_panel_controls_not_the_papers_count():
    config = {"evaluation": {"k": [5]}, "methods": copy.deepcopy(CONFIG["methods"]),
              "datasets": {"d": {"samples": ["A", "B"], "spots": "in_tissue", "panel_controls": "drop",
                                 "paper_n_genes": None}}}
    base = run_fingerprint(config, "d", "stnet")
    for key, value, changes in (("spots", "all", True), ("panel_controls", "keep", True), ("paper_n_genes", 541, False)):
        other = copy.deepcopy(config)
        other["datasets"]["d"][key] = value
        assert (run_fingerprint(other, "d", "stnet") != base) == changes, key
