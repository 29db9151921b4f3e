"""Per-gene Pearson r against scipy, NaN handling, HEG/HVG and HEST-bench gene choice, both scoring protocols."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats as sps

from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.metrics import (
    GENE_SET_COLUMNS,
    SCORE_COLUMNS,
    column_stats,
    hest_bench_genes,
    pearson_per_gene,
    score_hest_bench,
    score_paper_protocol,
    top_genes,
)


def _pair(n_spots=40, n_genes=12, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=(n_spots, n_genes))
    pred = 0.5 * truth + rng.normal(0, 1.0, size=truth.shape) + 3.0
    return truth, pred


def test_pearson_matches_scipy():
    truth, pred = _pair()
    r, reason = pearson_per_gene(truth, pred)
    expected = [sps.pearsonr(truth[:, j], pred[:, j]).statistic for j in range(truth.shape[1])]
    np.testing.assert_allclose(r, expected, rtol=0, atol=1e-12)
    assert list(reason) == [""] * truth.shape[1]


def test_pearson_float32_inputs_use_float64_math():
    truth, pred = _pair(seed=1)
    t32, p32 = truth.astype(np.float32), pred.astype(np.float32)
    r, _ = pearson_per_gene(t32, p32)
    expected = [sps.pearsonr(t32[:, j].astype(np.float64), p32[:, j].astype(np.float64)).statistic for j in range(12)]
    np.testing.assert_allclose(r, expected, rtol=0, atol=1e-12)


def test_constant_columns_give_nan_with_reason():
    truth, pred = _pair(n_genes=6, seed=2)
    truth[:, 0] = 1.5                      # constant truth
    pred[:, 1] = 2.0                       # constant prediction
    truth[:, 2] = 0.0                      # both constant
    pred[:, 2] = 0.7
    noise = np.float32(2.3) + np.float32(1e-7) * np.tile([1, -1], 20)
    pred[:, 3] = noise.astype(np.float32)  # one value up to float32 rounding: still constant
    truth[:, 4] = 0.0
    truth[7, 4] = 0.01                     # a single expressing spot is real variation
    r, reason = pearson_per_gene(truth, pred)
    assert np.isnan(r[:4]).all() and np.isfinite(r[4:]).all()
    assert list(reason) == ["constant truth", "constant prediction", "constant truth and prediction",
                            "constant prediction", "", ""]


@pytest.mark.parametrize("which", ["truth", "predictions"])
def test_nan_or_inf_input_is_an_error_naming_where(which):
    truth, pred = _pair(n_genes=3)
    (truth if which == "truth" else pred)[5, 1] = np.nan if which == "predictions" else np.inf
    with pytest.raises(CMRCNetError, match=rf"IDC/stnet fold 2: {which} hold 1 NaN/inf values .*gene 'B'"):
        pearson_per_gene(truth, pred, where="IDC/stnet fold 2", genes=["A", "B", "C"])


def test_shape_and_spot_count_errors():
    truth, pred = _pair(n_genes=3)
    with pytest.raises(CMRCNetError, match="shape"):
        pearson_per_gene(truth, pred[:, :2], where="w")
    with pytest.raises(CMRCNetError, match="at least 2 spots"):
        pearson_per_gene(truth[:1], pred[:1], where="w")
    with pytest.raises(CMRCNetError, match="spots x genes"):
        pearson_per_gene(truth[:, 0], pred[:, 0], where="w")


def test_top_genes_heg_hvg_with_name_tie_break(caplog):
    # columns:          mean  var(ddof=1)
    #   d: 5,5,5,5      5     0
    #   a: 0,2,0,2      1     4/3
    #   c: 0,4,0,4      2     16/3
    #   b: 0,4,0,4      2     16/3   (ties c; "b" sorts first)
    #   e: 1,1,3,3      2     4/3
    truth = np.array([[5, 0, 0, 0, 1], [5, 2, 4, 4, 1], [5, 0, 0, 0, 3], [5, 2, 4, 4, 3]], dtype=float)
    genes = ["d", "a", "c", "b", "e"]
    assert top_genes(truth, genes, 1, by="mean") == ["d"]
    assert top_genes(truth, genes, 4, by="mean") == ["d", "b", "c", "e"]
    assert top_genes(truth, genes, 3, by="var") == ["b", "c", "a"]
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        assert top_genes(truth, genes, 9, by="var") == ["b", "c", "a", "e", "d"]
    assert "only 5 genes" in caplog.text
    with pytest.raises(CMRCNetError, match="by must be"):
        top_genes(truth, genes, 2, by="median")


def _bench_samples():
    # s1: A B C D E ; s2: E D C B F  (A, F not shared). 10 spots each.
    s1 = np.zeros((10, 5))
    s1[:, 1] = np.arange(10)           # B: expressed in 9/10
    s1[:, 2] = [0] * 9 + [1]           # C: 1/10 in s1 (exactly 10%: kept)
    s1[:, 3] = np.arange(10) % 2 * 6   # D: 5/10 in s1, but never in s2
    s1[:, 4] = [2] * 10                # E: always expressed
    s1[:, 0] = np.arange(10) * 5       # A: large variance but not in s2
    s2 = np.zeros((10, 5))
    s2[:, 0] = [1, 3] * 5              # E
    s2[:, 2] = [0, 0, 0, 0, 0, 0, 0, 0, 2, 2]  # C: 2/10
    s2[:, 3] = np.arange(10) * 0.5     # B: 9/10
    s2[:, 4] = np.arange(10) * 9       # F: large variance, not in s1
    return {"s1": (s1, ["A", "B", "C", "D", "E"]), "s2": (s2, ["E", "D", "C", "B", "F"])}


def test_hest_bench_genes_shared_10pct_and_variance_order(caplog):
    samples = _bench_samples()
    s1, s2 = samples["s1"][0], samples["s2"][0]
    pooled = {"B": np.r_[s1[:, 1], s2[:, 3]], "C": np.r_[s1[:, 2], s2[:, 2]], "E": np.r_[s1[:, 4], s2[:, 0]]}
    by_var = sorted(pooled, key=lambda g: -pooled[g].var())
    assert hest_bench_genes(samples, n=2) == by_var[:2]
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        assert hest_bench_genes(samples, n=50) == by_var
    assert "only 3 genes" in caplog.text
    # per-sample rule: at 20% C (1/10 in s1) drops out, and D never qualifies although 5/20 spots pooled express it
    assert set(hest_bench_genes(samples, n=50, min_fraction=0.2)) == {"B", "E"}


def test_hest_bench_genes_sparse_and_none_qualify():
    samples = {k: (sp.csr_matrix(m), g) for k, (m, g) in _bench_samples().items()}
    assert hest_bench_genes(samples, n=3) == hest_bench_genes(_bench_samples(), n=3)
    with pytest.raises(CMRCNetError, match="no gene is shared"):
        hest_bench_genes({"x": (np.ones((4, 1)), ["A"]), "y": (np.ones((4, 1)), ["B"])}, n=3)


def test_score_paper_protocol_per_sample(caplog):
    truth, pred = _pair(n_spots=30, n_genes=8, seed=3)
    genes = [f"g{i}" for i in range(8)]
    spot_samples = ["S2"] * 12 + ["S1"] * 18
    truth[:12, 5] = 0.0  # constant truth on S2 only
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        scores, sets = score_paper_protocol(truth, pred, genes, spot_samples, dataset="D", method="m", fold=3,
                                            marker_genes=["g7", "NOPE", "g1"], heg_hvg_sizes=(2, 4))
    assert "NOPE" in caplog.text
    assert list(scores.columns) == SCORE_COLUMNS and list(sets.columns) == GENE_SET_COLUMNS
    assert len(scores) == 16 and set(scores["protocol"]) == {"paper"} and set(scores["fold"]) == {3}
    for name, rows in (("S2", slice(0, 12)), ("S1", slice(12, 30))):
        part = scores[scores["sample"] == name]
        r, reason = pearson_per_gene(truth[rows], pred[rows])
        np.testing.assert_allclose(part["r"].to_numpy(), r, equal_nan=True)
        assert list(part["nan_reason"]) == list(reason)
        np.testing.assert_allclose(part["mean_expr"], truth[rows].mean(0))
        np.testing.assert_allclose(part["var_expr"], truth[rows].var(0, ddof=1))
        chosen = sets[sets["sample"] == name].groupby("gene_set")["gene"].apply(list).to_dict()
        assert chosen["HEG4"] == top_genes(truth[rows], genes, 4, by="mean")
        assert chosen["HVG2"] == top_genes(truth[rows], genes, 2, by="var")
        assert chosen["marker"] == ["g7", "g1"]
        # the sets can be re-derived from the scores table
        assert chosen["HEG4"] == part.sort_values(["mean_expr", "gene"], ascending=[False, True])["gene"].head(4).tolist()
    assert scores.loc[(scores["sample"] == "S2") & (scores["gene"] == "g5"), "nan_reason"].item() == "constant truth"


def test_score_paper_protocol_nan_prediction_names_fold_and_method():
    truth, pred = _pair(n_genes=3)
    pred[0, 0] = np.nan
    with pytest.raises(CMRCNetError, match=r"READ/bleep-k50/fold 1: predictions hold 1 NaN"):
        score_paper_protocol(truth, pred, ["a", "b", "c"], ["s"] * len(truth), dataset="READ", method="bleep-k50",
                             fold=1, marker_genes=[])


def test_score_hest_bench_concatenated_split():
    truth, pred = _pair(n_spots=30, n_genes=6, seed=4)
    genes = ["a", "b", "c", "d", "e", "f"]
    scores, sets = score_hest_bench(truth, pred, genes, dataset="D", method="m", fold=0, bench_genes=["e", "b"])
    assert list(scores["gene"]) == ["e", "b"] and set(scores["sample"]) == {"all"}
    assert set(scores["protocol"]) == {"hest-bench"}
    np.testing.assert_allclose(scores["r"], [sps.pearsonr(truth[:, j], pred[:, j]).statistic for j in (4, 1)])
    assert sets[["gene_set", "sample", "gene"]].values.tolist() == [["hest50", "all", "e"], ["hest50", "all", "b"]]
    with pytest.raises(CMRCNetError, match="HEST-bench genes were not predicted: zz"):
        score_hest_bench(truth, pred, genes, dataset="D", method="m", fold=0, bench_genes=["a", "zz"])


# ---- exact behaviour at the edges (each check below was added to kill a surviving mutant; docs/testing.md) ----

def _raises(message):
    """The whole error message, so that a changed `where`, name or number in it fails the test."""
    return pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$")


def test_column_stats_ddof_and_float64():
    # one spot: variance 0 (not NaN from ddof=1); two spots / one gene: ddof=1, by hand
    mean, var = column_stats(np.array([[1.0, 2.0]]))
    assert mean.tolist() == [1.0, 2.0] and var.tolist() == [0.0, 0.0]
    mean, var = column_stats(np.array([[1.0], [4.0]]))
    assert mean.tolist() == [2.5] and var.tolist() == [4.5]
    x32 = np.array([[0.1, 3.3], [0.2, 1.7], [0.7, 2.9]], dtype=np.float32)
    mean, var = column_stats(x32)
    x64 = x32.astype(np.float64)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-15)
    np.testing.assert_allclose(var, x64.var(0, ddof=1), rtol=1e-14)


def test_pearson_sparse_inputs_and_two_spots():
    truth, pred = _pair(n_genes=5, seed=6)
    r, _ = pearson_per_gene(sp.csr_matrix(truth), sp.csc_matrix(pred))
    np.testing.assert_allclose(r, pearson_per_gene(truth, pred)[0], rtol=0, atol=1e-15)
    # two spots is the minimum: r is +-1 (or NaN for a constant column)
    r, reason = pearson_per_gene([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]], [[3.0, 3.0, 1.0], [5.0, 5.0, 2.0]])
    assert r[:2].tolist() == [1.0, -1.0] and np.isnan(r[2]) and reason[2] == "constant truth"


def test_pearson_of_exact_affine_prediction_is_clipped_to_one():
    # pred = +-3 truth + 1: |r| is 1 by definition; in floating point cov / sqrt(ss_t ss_p) exceeds 1 by an ulp on
    # some of these two- and three-spot columns, and r must still lie in [-1, 1]
    rng = np.random.default_rng(0)
    for n in (2, 3):
        truth = rng.integers(0, 20, size=(n, 400)) * 0.1
        truth = truth[:, truth.std(axis=0) > 0]
        for slope in (3.0, -3.0):
            r, _ = pearson_per_gene(truth, slope * truth + 1.0)
            assert np.all(np.abs(r) <= 1.0)
            np.testing.assert_allclose(r, np.sign(slope), rtol=0, atol=1e-12)


def test_constant_threshold_is_population_std_against_each_columns_max():
    # A column is constant when std (ddof=0) <= CONSTANT_RTOL * max|x| of *that* column: 4 spots, 9 genes, on two
    # scales, at 0.5x and 1.2x the threshold; an all-zero prediction is constant (0 <= 0).
    n = 4
    wobble = np.array([1.0, -1.0, 1.0, -1.0])  # population std 1 exactly
    rng = np.random.default_rng(7)
    truth = rng.normal(5.0, 1.0, size=(n, 9))
    pred = rng.normal(5.0, 1.0, size=(n, 9))
    cols = [(scale, f) for scale in (1.0, 1000.0) for f in (0.5, 1.2)]
    for j, (scale, f) in enumerate(cols):
        truth[:, j] = scale + f * 1e-6 * scale * wobble
        pred[:, 4 + j] = scale + f * 1e-6 * scale * wobble
    pred[:, 8] = 0.0
    r, reason = pearson_per_gene(truth, pred)
    assert list(reason) == ["constant truth", "", "constant truth", "",
                            "constant prediction", "", "constant prediction", "", "constant prediction"]
    assert np.isnan(r[[0, 2, 4, 6, 8]]).all() and np.isfinite(r[[1, 3, 5, 7]]).all()
    for j in (1, 3, 5, 7):
        np.testing.assert_allclose(r[j], sps.pearsonr(truth[:, j], pred[:, j]).statistic, rtol=1e-6)


_TRUTH, _PRED = _pair(n_spots=40, n_genes=3)
_STR = np.array([["a", "b"], ["c", "d"]])
_NAN_PRED = _PRED.copy()
_NAN_PRED[[1, 4], 2] = np.nan


@pytest.mark.parametrize("call, message", [
    (lambda: pearson_per_gene(_TRUTH[:, 0], _PRED, where="w"), "w: truth must be a spots x genes matrix, got shape (40,)"),
    (lambda: pearson_per_gene(_TRUTH, _PRED[:, 0], where="w"),
     "w: predictions must be a spots x genes matrix, got shape (40,)"),
    (lambda: pearson_per_gene(_STR, np.ones((2, 2)), where="w"), "w: truth must be numeric, got dtype <U1"),
    (lambda: pearson_per_gene(np.ones((2, 2)), _STR, where="w"), "w: predictions must be numeric, got dtype <U1"),
    (lambda: pearson_per_gene(_TRUTH, _PRED[:, :2], where="w"),
     "w: truth has shape (40, 3) but predictions have shape (40, 2)"),
    (lambda: pearson_per_gene(_TRUTH, _PRED, where="w", genes=["A", "B"]), "w: 2 gene names for 3 columns"),
    (lambda: pearson_per_gene(_TRUTH[:1], _PRED[:1]), "scores: Pearson r needs at least 2 spots, got 1"),
    (lambda: pearson_per_gene(_TRUTH, _NAN_PRED, where="w"),
     "w: predictions hold 2 NaN/inf values (first at spot 1, gene column 2)"),
    (lambda: pearson_per_gene(_NAN_PRED, _TRUTH, where="w", genes=["A", "B", "C"]),
     "w: truth hold 2 NaN/inf values (first at spot 1, gene 'C')"),
])
def test_pearson_error_messages(call, message):
    with _raises(message):
        call()


_TOP = np.array([[5, 0, 0, 0, 1], [5, 2, 4, 4, 1], [5, 0, 0, 0, 3], [5, 2, 4, 4, 3]], dtype=float)


@pytest.mark.parametrize("call, message", [
    (lambda: top_genes(_TOP, list("dacbe"), 2, by="median"), "top_genes: by must be 'mean' or 'var', got 'median'"),
    (lambda: top_genes(_TOP, list("dacbe"), 0), "top_genes: number of top genes must be at least 1, got 0"),
    (lambda: top_genes(_TOP[:, 0], list("d"), 1), "top_genes: truth must be a spots x genes matrix, got shape (4,)"),
    (lambda: top_genes(_TOP, list("dacb"), 2), "top_genes: 4 gene names for 5 columns"),
])
def test_top_genes_error_messages(call, message):
    with _raises(message):
        call()


@pytest.mark.parametrize("by, label", [("mean", "HEG"), ("var", "HVG")])
def test_top_genes_warns_only_when_asking_for_more_than_all(caplog, by, label):
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        assert len(top_genes(_TOP, list("dacbe"), 5, by=by)) == 5
        assert caplog.messages == []
        assert len(top_genes(_TOP, list("dacbe"), 6, by=by, where="S")) == 5
    assert caplog.messages == [f"S: top 6 {label} asked for but only 5 genes; using all of them"]


def test_top_genes_ties_compare_names_as_text():
    # non-string names are ranked as their text: "10" sorts before "9"
    assert top_genes(np.ones((3, 2)), [9, 10], 2) == ["10", "9"]
    assert top_genes(np.ones((3, 2)), [9, 10], 1, by="var") == ["10"]


def _samples_with(name, matrix, genes):
    samples = _bench_samples()
    samples[name] = (matrix, genes)
    return samples


_S2_NAN = _bench_samples()["s2"][0].copy()
_S2_NAN[3, 2] = np.nan  # gene C of s2


@pytest.mark.parametrize("call, message", [
    (lambda: hest_bench_genes({}), "hest-bench genes: no samples given"),
    (lambda: hest_bench_genes(_bench_samples(), n=0), "hest-bench genes: number of genes must be at least 1, got 0"),
    (lambda: hest_bench_genes(_bench_samples(), min_fraction=-0.1),
     "hest-bench genes: min_fraction must lie in [0, 1], got -0.1"),
    (lambda: hest_bench_genes(_bench_samples(), min_fraction=1.5),
     "hest-bench genes: min_fraction must lie in [0, 1], got 1.5"),
    (lambda: hest_bench_genes(_samples_with("s1", np.ones((3, 2)), ["A", "A"])),
     "hest-bench genes: sample s1: duplicate gene names"),
    (lambda: hest_bench_genes(_samples_with("s1", np.ones((3, 2)), ["A"])),
     "hest-bench genes: sample s1: 1 gene names for 2 columns"),
    (lambda: hest_bench_genes(_samples_with("s3", np.ones((0, 2)), ["B", "E"])), "hest-bench genes: sample s3: no spots"),
    (lambda: hest_bench_genes({"x": (np.ones((4, 1)), ["A"]), "y": (np.ones((4, 1)), ["B"])}),
     "hest-bench genes: no gene is shared by all 2 samples and expressed in at least 10% of the spots of each"),
    (lambda: hest_bench_genes(_samples_with("s2", _S2_NAN, _bench_samples()["s2"][1])),
     "hest-bench genes: sample s2: expression hold 1 NaN/inf values (first at spot 3, gene 'C')"),
])
def test_hest_bench_genes_error_messages(call, message):
    with _raises(message):
        call()


def test_hest_bench_genes_edges(caplog):
    samples = _bench_samples()
    full = hest_bench_genes(samples, n=3)
    assert hest_bench_genes(samples, n=1) == full[:1]
    # both ends of [0, 1] are allowed: at 0 every shared gene qualifies, at 1 only those expressed in every spot
    assert set(hest_bench_genes(samples, min_fraction=0.0)) == {"B", "C", "D", "E"}
    assert hest_bench_genes(samples, min_fraction=1.0) == ["E"]
    # a one-spot sample is allowed: B and E are expressed in it, C is not
    assert set(hest_bench_genes(_samples_with("s3", np.array([[1.0, 0.0, 2.0]]), ["B", "C", "E"]))) == {"B", "E"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        assert len(hest_bench_genes(samples, n=3)) == 3          # exactly as many as qualify: no warning
        assert caplog.messages == []
        assert set(hest_bench_genes(samples, min_fraction=0.6)) == {"B", "E"}  # default n = 50
    assert caplog.messages == ["hest-bench genes: only 2 genes are shared by all samples and expressed in >= 60% of "
                               "spots of each; using all of them instead of 50"]


def test_hest_bench_genes_pooled_variance_not_mean():
    # H: high mean, small variance; V: low mean, large variance. Pooled (ddof=1) over both samples' 20 spots:
    # var(V) = 25 * 20/19 > var(H) = 0.25 * 20/19, so V ranks first whatever the means.
    h = np.tile([100.0, 101.0], 5)
    v = np.tile([0.0, 10.0], 5)
    samples = {"a": (np.c_[h, v], ["H", "V"]), "b": (np.c_[v, h], ["V", "H"])}
    assert hest_bench_genes(samples, n=2, min_fraction=0.5) == ["V", "H"]


def test_hest_bench_genes_variance_in_float64_for_float32_input():
    # A = x and B = x + 3e5 have the same variance (exact in float32 and float64), so the tie goes to "A";
    # summed in float32, B's mean rounds and its variance comes out larger.
    x = np.array([4, 5, 7, 8, 1, 2, 7], dtype=np.float32)
    m = np.c_[x, x + np.float32(3e5)].astype(np.float32)
    samples = {"s1": (m[:4], ["A", "B"]), "s2": (sp.csr_matrix(m[4:]), ["A", "B"])}
    assert hest_bench_genes(samples, n=2) == ["A", "B"]


_G8 = [f"g{i}" for i in range(8)]
_T30, _P30 = _pair(n_spots=30, n_genes=8, seed=3)
_T30_NAN = _T30.copy()
_T30_NAN[0, 1] = np.inf


def _paper(truth=_T30, pred=_P30, genes=_G8, labels=("S",) * 30, **kw):
    return score_paper_protocol(truth, pred, genes, list(labels), dataset="D", method="m", fold=3, **kw)


def _hest(truth=_T30, pred=_P30, genes=_G8, bench=("g1", "g2")):
    return score_hest_bench(truth, pred, genes, dataset="D", method="m", fold=0, bench_genes=list(bench))


@pytest.mark.parametrize("call, message", [
    (lambda: _paper(genes=_G8[:7]), "D/m/fold 3: 7 gene names for 8 columns"),
    (lambda: _paper(genes=_G8[:7] + ["g0"]), "D/m/fold 3: duplicate gene names"),
    (lambda: _paper(truth=_T30[:, 0]), "D/m/fold 3: truth must be a spots x genes matrix, got shape (30,)"),
    (lambda: _paper(pred=_P30[:, 0]), "D/m/fold 3: predictions must be a spots x genes matrix, got shape (30,)"),
    (lambda: _paper(pred=_P30[:, :7]), "D/m/fold 3: truth has shape (30, 8) but predictions have shape (30, 7)"),
    (lambda: _paper(truth=_T30_NAN), "D/m/fold 3: truth hold 1 NaN/inf values (first at spot 0, gene 'g1')"),
    (lambda: _paper(pred=_T30_NAN), "D/m/fold 3: predictions hold 1 NaN/inf values (first at spot 0, gene 'g1')"),
    (lambda: _paper(labels=("S",) * 29), "D/m/fold 3: 29 sample labels for 30 spots"),
    (lambda: _paper(labels=("S",) * 29 + ("T",)), "D/m/fold 3 sample T: Pearson r needs at least 2 spots, got 1"),
    (lambda: _hest(genes=_G8[:7] + ["g0"]), "D/m/fold 0: duplicate gene names"),
    (lambda: _hest(pred=_T30_NAN), "D/m/fold 0: predictions hold 1 NaN/inf values (first at spot 0, gene 'g1')"),
    (lambda: _hest(bench=()), "D/m/fold 0: no HEST-bench genes given"),
    (lambda: _hest(bench=[f"z{i}" for i in range(12)] + ["g1"]),
     "D/m/fold 0: 12 HEST-bench genes were not predicted: z0 z1 z2 z3 z4 z5 z6 z7 z8 z9"),
    (lambda: _hest(truth=_T30[:1], pred=_P30[:1]), "D/m/fold 0: Pearson r needs at least 2 spots, got 1"),
])
def test_scoring_error_messages_name_dataset_method_fold(call, message):
    with _raises(message):
        call()


def test_score_paper_protocol_warnings_and_frames(caplog):
    labels = ["S1"] * 10 + ["S2"] * 9 + ["S1"] * 11
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        scores, sets = _paper(labels=labels, marker_genes=["NOPE", "g1", "ALSO"], heg_hvg_sizes=(9,))
    assert caplog.messages == [
        "D/m/fold 3: 2 of 3 marker genes were not predicted and are left out: NOPE ALSO",
        "D/m/fold 3 sample S1: top 9 HEG asked for but only 8 genes; using all of them",
        "D/m/fold 3 sample S1: top 9 HVG asked for but only 8 genes; using all of them",
        "D/m/fold 3 sample S2: only 9 spots (fewer than 10); its r per gene is noisy but enters the fold's mean with "
        "the same weight as every other test sample",
        "D/m/fold 3 sample S2: top 9 HEG asked for but only 8 genes; using all of them",
        "D/m/fold 3 sample S2: top 9 HVG asked for but only 8 genes; using all of them",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        _paper(labels=["S1"] * 20 + ["S2"] * 10, heg_hvg_sizes=(8,))  # 10 spots is enough, 8 of 8 genes is all
    assert caplog.messages == []
    assert scores.index.equals(pd.RangeIndex(16)) and sets.index.equals(pd.RangeIndex(len(sets)))
    assert set(scores["dataset"]) == {"D"} and set(scores["method"]) == {"m"}
    assert scores["sample"].tolist() == ["S1"] * 8 + ["S2"] * 8
    assert set(sets["protocol"]) == {"paper"} and set(sets["dataset"]) == {"D"} and set(sets["fold"]) == {3}
    assert sets.groupby("sample").size().to_dict() == {"S1": 17, "S2": 17}  # HEG9, HVG9 (8 genes each), marker


def test_score_hest_bench_frames():
    truth, pred = _T30.copy(), _P30
    truth[:, 2] = 1.0
    scores, sets = _hest(truth=truth, bench=("g2", "g1", "g2"))
    assert scores["gene"].tolist() == ["g2", "g1"]
    assert set(scores["dataset"]) == {"D"} and set(scores["method"]) == {"m"} and set(scores["fold"]) == {0}
    assert scores["nan_reason"].tolist() == ["constant truth", ""]
    assert np.isnan(scores["r"][0]) and scores["r"][1] == pytest.approx(sps.pearsonr(truth[:, 1], pred[:, 1]).statistic)
    np.testing.assert_allclose(scores["mean_expr"], truth[:, [2, 1]].mean(0))
    np.testing.assert_allclose(scores["var_expr"], truth[:, [2, 1]].var(0, ddof=1))
    assert set(sets["protocol"]) == {"hest-bench"} and set(sets["dataset"]) == {"D"} and set(sets["fold"]) == {0}
    assert sets["gene"].tolist() == ["g2", "g1"] and set(sets["gene_set"]) == {"hest50"}
