"""Per-gene Pearson r against scipy, NaN handling, HEG/HVG and HEST-bench gene choice, both scoring protocols."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats as sps

from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.metrics import (
    GENE_SET_COLUMNS,
    SCORE_COLUMNS,
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
