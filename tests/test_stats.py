"""Summaries over folds, bootstrap CIs, paired Wilcoxon tests with Holm adjustment, and Table 3's best genes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.metrics import score_paper_protocol
from cmrcnet.evaluation.stats import (
    BEST_COLUMNS,
    NAN_COLUMNS,
    SUMMARY_COLUMNS,
    WILCOXON_COLUMNS,
    best_genes,
    bootstrap_ci,
    count_nan,
    holm_adjust,
    summarise,
    wilcoxon_between_methods,
)


def _scores(rows, method="M", protocol="paper", dataset="D"):
    """rows: (fold, sample, gene, r)."""
    return pd.DataFrame([{
        "protocol": protocol, "dataset": dataset, "method": method, "fold": f, "sample": s, "gene": g, "r": r,
        "nan_reason": "constant truth" if r is None or (isinstance(r, float) and math.isnan(r)) else "",
        "mean_expr": 1.0, "var_expr": 1.0,
    } for f, s, g, r in rows]).astype({"r": float})


def _sets(rows, protocol="paper", dataset="D"):
    """rows: (fold, sample, gene_set, gene)."""
    return pd.DataFrame([{"protocol": protocol, "dataset": dataset, "fold": f, "sample": s, "gene_set": gs, "gene": g}
                         for f, s, gs, g in rows])


# fold 0 holds test samples a and b, fold 1 holds c; g3 is scored but in no set.
HAND_SCORES = _scores([
    (0, "a", "g1", 0.2), (0, "a", "g2", 0.4), (0, "a", "g3", 0.9),
    (0, "b", "g1", 0.6), (0, "b", "g2", 0.8), (0, "b", "g3", 0.9),
    (1, "c", "g1", 0.1), (1, "c", "g2", np.nan), (1, "c", "g3", 0.9),
])
HAND_SETS = _sets([(f, s, "S", g) for f, s in ((0, "a"), (0, "b"), (1, "c")) for g in ("g1", "g2")])


def test_summarise_by_hand_omitting_undefined_r():
    sets = pd.concat([HAND_SETS, HAND_SETS])  # one copy per method, as the pipeline writes them
    out = summarise(HAND_SCORES, sets, n_boot=200, undefined_r="omit")
    assert list(out.columns) == SUMMARY_COLUMNS and len(out) == 1
    row = out.iloc[0]
    # per sample: a 0.3, b 0.7, c 0.1 (NaN left out); per fold: 0.5, 0.1; over folds: 0.3 +- sd([0.5, 0.1])
    assert row["mean_r"] == pytest.approx(0.3)
    assert row["sd_r"] == pytest.approx(np.std([0.5, 0.1], ddof=1))
    assert (row["n_folds"], row["n_samples"], row["n_genes"], row["n_nan"]) == (2, 3, 2, 1)
    assert row["ci_low"] <= row["mean_r"] <= row["ci_high"]
    assert (row["protocol"], row["dataset"], row["method"], row["gene_set"]) == ("paper", "D", "M", "S")
    assert row["undefined_r"] == "omit"


def test_summarise_by_hand_undefined_r_counts_as_zero():
    """The authors' rule (the default): sample c's undefined g2 enters its mean as 0."""
    row = summarise(HAND_SCORES, HAND_SETS, n_boot=200).iloc[0]
    # per sample: a 0.3, b 0.7, c (0.1 + 0) / 2 = 0.05; per fold: 0.5, 0.05; over folds: 0.275
    assert row["mean_r"] == pytest.approx(0.275)
    assert row["sd_r"] == pytest.approx(np.std([0.5, 0.05], ddof=1))
    assert (row["n_folds"], row["n_samples"], row["n_genes"], row["n_nan"]) == (2, 3, 2, 1)
    assert row["undefined_r"] == "zero" and row["ci_low"] <= row["mean_r"] <= row["ci_high"]


def test_three_genes_one_constant_mean_is_r1_r2_and_zero():
    """Hand-worked: 3 genes, the third has a constant prediction -> mean of (r1, r2, 0), not of (r1, r2)."""
    truth = np.array([[1.0, 2.0, 1.0], [2.0, 1.0, 2.0], [3.0, 4.0, 3.0], [4.0, 3.0, 4.0]])
    pred = np.array([[1.0, 1.0, 5.0], [2.0, 2.0, 5.0], [3.0, 3.0, 5.0], [4.0, 4.0, 5.0]])
    r1 = 1.0  # perfect
    r2 = float(np.corrcoef(truth[:, 1], pred[:, 1])[0, 1])  # 0.6
    assert r2 == pytest.approx(0.6)
    scores, sets = score_paper_protocol(truth, pred, ["g1", "g2", "g3"], ["s"] * 4, dataset="D", method="M",
                                        fold=0, marker_genes=["g1", "g2", "g3"], heg_hvg_sizes=(3,))
    assert np.isnan(scores.set_index("gene").loc["g3", "r"])  # r stays NaN in the per-gene scores
    assert scores.set_index("gene").loc["g3", "nan_reason"] == "constant prediction"
    zero = summarise(scores, sets, n_boot=50).set_index("gene_set").loc["marker"]
    assert zero["mean_r"] == pytest.approx((r1 + r2 + 0.0) / 3)  # 0.5333
    assert zero["n_nan"] == 1 and zero["n_genes"] == 3 and zero["undefined_r"] == "zero"
    omit = summarise(scores, sets, n_boot=50, undefined_r="omit").set_index("gene_set").loc["marker"]
    assert omit["mean_r"] == pytest.approx((r1 + r2) / 2)  # 0.8
    assert omit["n_nan"] == 1 and omit["undefined_r"] == "omit"
    best = best_genes(scores, n=3)
    assert best.set_index("gene").loc["g3", "mean_r"] == 0.0
    assert "g3" not in set(best_genes(scores, n=3, undefined_r="omit")["gene"])
    with pytest.raises(CMRCNetError, match="undefined_r"):
        summarise(scores, sets, undefined_r="skip")


def test_summarise_one_fold_has_no_sd_and_all_nan_sample_is_skipped():
    scores = _scores([(0, "a", "g1", 0.5), (0, "a", "g2", 0.3), (0, "b", "g1", np.nan), (0, "b", "g2", np.nan)])
    sets = _sets([(0, s, "S", g) for s in ("a", "b") for g in ("g1", "g2")])
    row = summarise(scores, sets, n_boot=100, undefined_r="omit").iloc[0]
    assert row["mean_r"] == pytest.approx(0.4) and math.isnan(row["sd_r"])
    assert (row["n_folds"], row["n_samples"], row["n_nan"]) == (1, 2, 2)
    # counted as 0 instead, the all-undefined sample b means 0: (0.4 + 0) / 2 over the fold's samples
    row = summarise(scores, sets, n_boot=100).iloc[0]
    assert row["mean_r"] == pytest.approx(0.2) and (row["n_folds"], row["n_nan"]) == (1, 2)


def test_constant_columns_counted_in_summary():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, size=(20, 4))
    pred = truth + rng.normal(0, 1, size=truth.shape)
    truth[:, 1] = 0.0
    pred[:, 2] = 1.0
    scores, sets = score_paper_protocol(truth, pred, list("abcd"), ["s"] * 20, dataset="D", method="M", fold=0,
                                        marker_genes=list("abcd"), heg_hvg_sizes=(4,))
    out = summarise(scores, sets, n_boot=100, undefined_r="omit").set_index("gene_set")
    assert out.loc["marker", "n_nan"] == 2 and out.loc["marker", "n_genes"] == 4
    assert out.loc["marker", "mean_r"] == pytest.approx(scores["r"].mean())
    zero = summarise(scores, sets, n_boot=100).set_index("gene_set")
    assert zero.loc["marker", "mean_r"] == pytest.approx(scores["r"].fillna(0).mean())
    nan = count_nan(scores)
    assert list(nan.columns) == NAN_COLUMNS
    assert dict(zip(nan["nan_reason"], nan["n_genes"])) == {"constant truth": 1, "constant prediction": 1}


def test_summarise_rejects_duplicate_scores():
    with pytest.raises(CMRCNetError, match="scores: 1 duplicate rows"):
        summarise(pd.concat([HAND_SCORES, HAND_SCORES.iloc[:1]]), HAND_SETS)


def test_bootstrap_ci_contains_mean_reproducible_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.3, 0.1, 20), rng.normal(0.3, 0.1, 2000)
    low, high = bootstrap_ci(small, n_boot=500, seed=7)
    assert low < small.mean() < high
    assert bootstrap_ci(small, n_boot=500, seed=7) == (low, high)
    assert bootstrap_ci(small, n_boot=500, seed=8) != (low, high)
    low_l, high_l = bootstrap_ci(large, n_boot=500, seed=7)
    assert high_l - low_l < (high - low) / 3
    assert all(math.isnan(x) for x in bootstrap_ci([np.nan, np.nan]))


def test_bootstrap_ci_stratified_weights():
    values = np.r_[np.full(5, 1.0), np.full(3, 0.0), [np.nan]]
    groups = ["x"] * 5 + ["y"] * 4
    # constant within groups: every resample gives 0.25 * 1 + 0.75 * 0
    assert bootstrap_ci(values, n_boot=50, groups=groups, weights={"x": 1, "y": 3}) == pytest.approx((0.25, 0.25))


def test_holm_on_known_p_values():
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(2)
    keys = [(f, s, f"g{i}") for f, s in ((0, "a"), (1, "b")) for i in range(15)]
    base = rng.uniform(-0.2, 0.6, len(keys))
    r = {"A": base + rng.normal(0.05, 0.05, len(keys)), "B": base, "C": base + rng.normal(0, 0.05, len(keys))}
    r["B"][3] = np.nan  # with undefined_r omit, this pair is dropped from every test with B
    scores = pd.concat([_scores([(f, s, g, v) for (f, s, g), v in zip(keys, r[m])], method=m) for m in r])
    sets = _sets([(f, s, "S", g) for f, s, g in keys])
    zero = wilcoxon_between_methods(scores, sets, gene_set="S")
    assert zero.iloc[0]["n_pairs"] == 30
    assert zero.iloc[0]["statistic"] == pytest.approx(sps.wilcoxon(r["A"], np.nan_to_num(r["B"])).statistic)
    out = wilcoxon_between_methods(scores, sets, gene_set="S", undefined_r="omit")
    assert list(out.columns) == WILCOXON_COLUMNS
    assert list(zip(out["method_a"], out["method_b"])) == [("A", "B"), ("A", "C"), ("B", "C")]
    ab = out.iloc[0]
    ok = np.isfinite(r["B"])
    ref = sps.wilcoxon(r["A"][ok], r["B"][ok])
    assert ab["n_pairs"] == 29 and out.iloc[1]["n_pairs"] == 30
    assert ab["statistic"] == pytest.approx(ref.statistic) and ab["p_value"] == pytest.approx(ref.pvalue)
    assert ab["median_diff"] == pytest.approx(np.median(r["A"][ok] - r["B"][ok]))
    np.testing.assert_allclose(out["p_holm"], holm_adjust(out["p_value"]))
    assert wilcoxon_between_methods(scores, sets, gene_set="other", undefined_r="omit").empty


def test_wilcoxon_identical_methods_give_nan():
    rows = [(0, "a", f"g{i}", 0.1 * i) for i in range(5)]
    scores = pd.concat([_scores(rows, method="A"), _scores(rows, method="B")])
    out = wilcoxon_between_methods(scores, _sets([(0, "a", "S", f"g{i}") for i in range(5)]))
    assert out.iloc[0]["n_pairs"] == 5 and math.isnan(out.iloc[0]["p_value"]) and math.isnan(out.iloc[0]["p_holm"])


def test_best_genes_table3():
    scores = pd.concat([
        _scores([(0, "a", "x", 0.9), (0, "b", "x", 0.1), (1, "c", "x", 0.5),    # fold means 0.5, 0.5 -> 0.5
                 (0, "a", "y", 0.6), (0, "b", "y", 0.6), (1, "c", "y", np.nan),  # 0.6 (one fold)
                 (0, "a", "z", 0.5), (0, "b", "z", 0.5), (1, "c", "z", 0.5),     # 0.5, ties x; x first by name
                 (0, "a", "w", 0.0), (0, "b", "w", 0.0), (1, "c", "w", 0.0)]),
        _scores([(0, "a", "x", 0.2), (0, "a", "y", 0.3)], method="N"),
    ])
    out = best_genes(scores, n=3, undefined_r="omit")
    assert list(out.columns) == BEST_COLUMNS
    m = out[out["method"] == "M"]
    assert list(m["gene"]) == ["y", "x", "z"] and list(m["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(m["mean_r"], [0.6, 0.5, 0.5])
    assert list(m["n_folds"]) == [1, 2, 2] and math.isnan(m.iloc[0]["sd_r"]) and m.iloc[1]["sd_r"] == 0.0
    assert list(out[out["method"] == "N"]["gene"]) == ["y", "x"]
