import json
import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_counts_adata

from cmrcnet.data.genes import is_control_probe, normalise_sample, read_gene_table, sample_hvgs, select_genes
from cmrcnet.errors import CMRCNetError

CONTROLS = ["^BLANK", "^NegControl", "^Unassigned"]


def hvg_sample(seed, variable, n_genes=300, n_spots=300):
    """Poisson counts over a realistic spread of gene means; the genes in `variable` are bimodal (0 or 2x mean)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    means = np.exp(np.random.default_rng(99).normal(2, 1, n_genes))
    X = rng.poisson(means, size=(n_spots, n_genes))
    for g in variable:
        j = genes.index(g)
        X[:, j] = np.where(rng.random(n_spots) < 0.5, 0, rng.poisson(2 * means[j], n_spots))
    adata = make_counts_adata(n_spots, genes, seed)
    adata.X = sp.csr_matrix(X.astype(np.int32))
    return adata


def write(tmp_path, name, adata):
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


def test_hvg_union_takes_each_samples_variable_genes(tmp_path):
    s1 = write(tmp_path, "S1", hvg_sample(1, ["G010", "G020", "G030"]))
    s2 = write(tmp_path, "S2", hvg_sample(2, ["G030", "G040", "G050"]))
    table = select_genes({"S1": s1, "S2": s2}, tmp_path / "genes.tsv", method="hvg_union", dataset="d", n_top_hvg=3)
    assert list(table["gene"]) == ["G010", "G020", "G030", "G040", "G050"]
    assert dict(zip(table.gene, table.n_samples_hvg))["G030"] == 2
    assert list(read_gene_table(tmp_path / "genes.tsv")["gene"]) == list(table["gene"])


def test_hvg_uses_in_tissue_spots_only(tmp_path):
    adata = hvg_sample(1, ["G010"])
    on = np.r_[np.ones(150, int), np.zeros(150, int)]
    adata.obs["in_tissue"] = on
    X = adata.X.toarray()
    X[150:, 70] = np.tile([0, 500], 75)  # G070 varies wildly, but only off tissue
    adata.X = sp.csr_matrix(X)
    s1 = write(tmp_path, "S1", adata)
    s2 = write(tmp_path, "S2", hvg_sample(2, ["G010"]))
    table = select_genes({"S1": s1, "S2": s2}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=1)
    assert list(table.gene) == ["G010"]


def test_panel_drops_control_probes_and_warns_on_missing_markers(tmp_path, caplog):
    genes = ["EPCAM", "CD24", "BLANK_0001", "NegControlProbe_00002", "UnassignedCodeword_0003", "GATA3"]
    s1 = write(tmp_path, "S1", make_counts_adata(genes=genes, seed=1))
    s2 = write(tmp_path, "S2", make_counts_adata(genes=genes, seed=2))
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        table = select_genes({"S1": s1, "S2": s2}, tmp_path / "g.tsv", method="panel", dataset="d",
                             control_probe_patterns=CONTROLS, marker_genes=["GATA3", "RND"])
    assert list(table.gene) == ["CD24", "EPCAM", "GATA3"]
    assert list(table.is_marker) == [False, False, True]
    assert "marker gene RND" in caplog.text


def test_control_probe_patterns():
    assert is_control_probe("BLANK_0012", CONTROLS) and is_control_probe("NegControlProbe_1", CONTROLS)
    assert not is_control_probe("BLANKET1", ["^BLANK_"]) and not is_control_probe("EPCAM", CONTROLS)


def test_panel_keeps_genes_shared_by_every_sample(tmp_path):
    s1 = write(tmp_path, "S1", make_counts_adata(genes=("A", "B", "C")))
    s2 = write(tmp_path, "S2", make_counts_adata(genes=("B", "C", "D")))
    table = select_genes({"S1": s1, "S2": s2}, tmp_path / "g.tsv", method="panel", dataset="d")
    assert list(table.gene) == ["B", "C"]


def test_normalise_keeps_gene_order_counts_and_in_tissue(tmp_path):
    adata = make_counts_adata(n_spots=40, genes=("A", "B", "C", "D"), in_tissue=np.r_[np.ones(30), np.zeros(10)])
    st = write(tmp_path, "S1", adata)
    pd.DataFrame({"gene": ["D", "B"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "out" / "S1.h5ad", sample="S1", dataset="d",
                           target_sum=1e4)
    back = ad.read_h5ad(tmp_path / "out" / "S1.h5ad")
    assert list(back.var_names) == ["D", "B"] and back.n_obs == 30
    raw = adata[:30, ["D", "B"]].X.toarray()
    np.testing.assert_array_equal(back.layers["counts"].toarray(), raw)
    totals = adata[:30].X.toarray().sum(1, keepdims=True)  # size factors over all measured genes
    np.testing.assert_allclose(back.X.toarray(), np.log1p(raw / np.maximum(totals, 1) * 1e4), rtol=1e-5)
    assert out.obs["sample"].eq("S1").all() and "cmrcnet" in back.uns


def test_normalise_errors_name_the_file(tmp_path):
    st = write(tmp_path, "S1", make_counts_adata(genes=("A", "B")))
    pd.DataFrame({"gene": ["A", "ZZZ"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = tmp_path / "o.h5ad"
    with pytest.raises(CMRCNetError, match=r"S1.h5ad: 1 genes .* not measured here: ZZZ"):
        normalise_sample(st, tmp_path / "genes.tsv", out, sample="S1", dataset="d")
    assert not out.exists() and not list(tmp_path.glob(".o.h5ad*"))


def test_normalised_input_is_refused(tmp_path):
    adata = make_counts_adata(genes=("A", "B"))
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray().astype(float)) + 0.1)
    st = write(tmp_path, "S1", adata)
    with pytest.raises(CMRCNetError, match="raw integer counts"):
        select_genes({"S1": st, "S2": st}, tmp_path / "g.tsv", method="panel", dataset="d")


def test_missing_and_corrupt_h5ad(tmp_path):
    bad = tmp_path / "S1.h5ad"
    bad.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(CMRCNetError, match="S1.h5ad: cannot read as AnnData"):
        select_genes({"S1": bad}, tmp_path / "g.tsv", method="panel", dataset="d")
    with pytest.raises(CMRCNetError, match="S9.h5ad: expression file .* not found"):
        select_genes({"S9": tmp_path / "S9.h5ad"}, tmp_path / "g.tsv", method="panel", dataset="d")
    nospatial = write(tmp_path, "S2", make_counts_adata(with_spatial=False))
    with pytest.raises(CMRCNetError, match=r"S2.h5ad: no spatial coordinates"):
        select_genes({"S2": nospatial}, tmp_path / "g.tsv", method="panel", dataset="d")
    assert not (tmp_path / "g.tsv").exists()


def _two_orders_adata():
    """3 spots x 3 genes, only A selected: the spots' totals over A differ from their totals over A, B, C."""
    X = np.array([[1, 9, 0], [1, 1, 0], [2, 0, 2]], dtype=np.int32)  # totals: all genes 10, 2, 4; A alone 1, 1, 2
    obs = pd.DataFrame({"in_tissue": 1, "array_row": [0, 0, 1], "array_col": [0, 1, 0]}, index=["s0", "s1", "s2"])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=["A", "B", "C"]))
    adata.obsm["spatial"] = np.array([[50.0, 50.0], [150.0, 50.0], [50.0, 150.0]])
    return adata


@pytest.mark.parametrize("target_sum, expected", [
    (10.0, [1 / 10 * 10, 1 / 2 * 10, 2 / 4 * 10]),  # subsetting first would give 10, 10, 10
    (None, [1 / 10 * 4, 1 / 2 * 4, 2 / 4 * 4]),     # median total over all genes = 4 (over A alone: 1)
])
def test_normalise_over_all_measured_genes_then_subset(tmp_path, target_sum, expected):
    """The authors' order: normalize_total + log1p over every measured gene, then keep the selected genes."""
    st = write(tmp_path, "S1", _two_orders_adata())
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "S1n.h5ad", sample="S1", dataset="d",
                           target_sum=target_sum)
    assert list(out.var_names) == ["A"]
    np.testing.assert_allclose(out.X.toarray().ravel(), np.log1p(expected), rtol=1e-6)
    np.testing.assert_array_equal(out.layers["counts"].toarray().ravel(), [1, 1, 2])  # raw counts of A only
    assert json.loads(ad.read_h5ad(tmp_path / "S1n.h5ad").uns["cmrcnet"])["normalised_over"] == "all measured genes"


def test_normalise_all_spots_keeps_every_spot_in_the_st_files_order(tmp_path):
    in_tissue = np.tile([1, 0], 20)
    adata = make_counts_adata(n_spots=40, genes=("A", "B", "C", "D"), in_tissue=in_tissue)
    st = write(tmp_path, "S1", adata)
    pd.DataFrame({"gene": ["B", "A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    every = normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "all.h5ad", sample="S1", dataset="d",
                             target_sum=1e4, spots="all")
    assert list(every.obs_names) == list(adata.obs_names)
    assert json.loads(every.uns["cmrcnet"])["spots"] == "all"
    on = normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "on.h5ad", sample="S1", dataset="d", target_sum=1e4)
    assert list(on.obs_names) == list(adata.obs_names[in_tissue == 1])
    # a spot's normalised values do not depend on which other spots are kept when target_sum is fixed
    np.testing.assert_allclose(every[on.obs_names].X.toarray(), on.X.toarray())
    with pytest.raises(ValueError, match="spots must be one of"):
        normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "x.h5ad", sample="S1", dataset="d", spots="some")


PANEL = ["EPCAM", "CD24", "GATA3", "BLANK_0001", "NegControlProbe_00002", "UnassignedCodeword_0003"]


def test_panel_controls_keep_uses_every_feature_measured_in_all_samples(tmp_path, caplog):
    """SKCM in the paper: 541 features measured, 541 used ("All of these genes are included")."""
    s1 = write(tmp_path, "S1", make_counts_adata(genes=PANEL + ["ONLY_S1"], seed=1))
    s2 = write(tmp_path, "S2", make_counts_adata(genes=PANEL, seed=2))
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        table = select_genes({"S1": s1, "S2": s2}, tmp_path / "g.tsv", method="panel", dataset="SKCM",
                             control_probe_patterns=CONTROLS, panel_controls="keep", paper_n_genes=6)
    assert list(table.gene) == sorted(PANEL)  # controls kept, the gene missing from S2 left out
    assert "control probes kept" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # 6 selected = the paper's 6
    dropped = select_genes({"S1": s1, "S2": s2}, tmp_path / "d.tsv", method="panel", dataset="COAD",
                           control_probe_patterns=CONTROLS)
    assert list(dropped.gene) == ["CD24", "EPCAM", "GATA3"]  # the default: drop
    with pytest.raises(CMRCNetError, match="panel_controls"):
        select_genes({"S1": s1}, tmp_path / "x.tsv", method="panel", dataset="d", panel_controls="some")


def test_gene_count_other_than_the_papers_warns(tmp_path, caplog):
    s1 = write(tmp_path, "S1", make_counts_adata(genes=PANEL, seed=1))
    s2 = write(tmp_path, "S2", make_counts_adata(genes=PANEL, seed=2))
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        select_genes({"S1": s1, "S2": s2}, tmp_path / "g.tsv", method="panel", dataset="IDC",
                     control_probe_patterns=CONTROLS, paper_n_genes=500)
    assert "dataset IDC: 3 genes selected, the paper used 500 (-497)" in caplog.text


def test_hvg_union_leaves_out_a_variable_gene_another_sample_does_not_measure(tmp_path, caplog):
    """G010 is S1's one highly variable gene, but S2 lacks it: only S2's G040 is measured by both."""
    s1 = hvg_sample(1, ["G010"])
    s2 = hvg_sample(2, ["G040"])
    s2 = s2[:, [g for g in s2.var_names if g != "G010"]].copy()
    p1, p2 = write(tmp_path, "S1", s1), write(tmp_path, "S2", s2)
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        table = select_genes({"S1": p1, "S2": p2}, tmp_path / "g.tsv", method="hvg_union", dataset="d",
                             n_top_hvg=1)
    assert list(table.gene) == ["G040"]
    assert list(read_gene_table(tmp_path / "g.tsv").gene) == ["G040"]
    assert "dataset d: 1 highly variable genes are not measured in every sample" in caplog.text
    # the order of the samples does not matter
    table = select_genes({"S2": p2, "S1": p1}, tmp_path / "g2.tsv", method="hvg_union", dataset="d", n_top_hvg=1)
    assert list(table.gene) == ["G040"]


def test_gene_table_source_says_where_each_gene_came_from(tmp_path):
    """hvg_union: an HVG is 'hvg_union' (a marker too when it is one), a marker that no sample found variable
    is 'marker'; panel: every gene is 'panel'. Worked by hand, gene by gene."""
    p1 = write(tmp_path, "S1", hvg_sample(1, ["G010"]))
    p2 = write(tmp_path, "S2", hvg_sample(2, ["G020"]))
    table = select_genes({"S1": p1, "S2": p2}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=1,
                         marker_genes=["G020", "G100", "NOT_MEASURED"])
    expected = pd.DataFrame({"gene": ["G010", "G020", "G100"],
                             "source": ["hvg_union", "hvg_union", "marker"],
                             "n_samples_hvg": [1, 1, 0],
                             "is_marker": [False, True, True]})
    pd.testing.assert_frame_equal(table.reset_index(drop=True), expected)
    written = read_gene_table(tmp_path / "g.tsv")
    pd.testing.assert_frame_equal(written, expected)  # the file says the same

    q1 = write(tmp_path, "P1", make_counts_adata(genes=("A", "B", "BLANK_1", "C"), seed=1))
    q2 = write(tmp_path, "P2", make_counts_adata(genes=("A", "B", "BLANK_1", "C"), seed=2))
    panel = select_genes({"P1": q1, "P2": q2}, tmp_path / "p.tsv", method="panel", dataset="d",
                         control_probe_patterns=CONTROLS, marker_genes=["B"])
    expected = pd.DataFrame({"gene": ["A", "B", "C"], "source": ["panel", "panel", "panel"],
                             "n_samples_hvg": [0, 0, 0], "is_marker": [False, True, False]})
    pd.testing.assert_frame_equal(panel.reset_index(drop=True), expected)
    pd.testing.assert_frame_equal(read_gene_table(tmp_path / "p.tsv"), expected)


def _rare_genes_sample():
    """60 in-tissue + 10 off-tissue spots; A-D expressed nearly everywhere, R4 in exactly 4 in-tissue spots (and
    3 off tissue), R5 in exactly 5 in-tissue spots, R6 in exactly 6."""
    in_tissue = np.r_[np.ones(60, int), np.zeros(10, int)]
    adata = make_counts_adata(n_spots=70, genes=("A", "B", "C", "D", "R4", "R5", "R6"), seed=5,
                              in_tissue=in_tissue)
    X = adata.X.toarray()
    X[:, :4] += 1  # A-D in every spot
    X[:, 4:] = 0
    X[[3, 17, 29, 41], 4] = 7
    X[[61, 63, 65], 4] = 7  # off tissue: does not count
    X[[2, 11, 23, 37, 50], 5] = 6
    X[[5, 8, 19, 33, 47, 58], 6] = 5
    adata.X = sp.csr_matrix(X)
    return adata


@pytest.mark.parametrize("min_spots, expected", [
    (1, ["A", "B", "C", "D", "R4", "R5", "R6"]),
    (4, ["A", "B", "C", "D", "R4", "R5", "R6"]),  # R4's 4 in-tissue spots reach the threshold
    (5, ["A", "B", "C", "D", "R5", "R6"]),        # R4 (4 < 5) dropped, R5 at exactly 5 kept
    (6, ["A", "B", "C", "D", "R6"]),
    (7, ["A", "B", "C", "D"]),                    # R4's 3 off-tissue spots never count: 4 in tissue, not 7
])
def test_min_spots_drops_genes_seen_in_fewer_in_tissue_spots(tmp_path, min_spots, expected):
    """A gene must be detected in at least `min_spots` in-tissue spots of a sample to be a candidate HVG; with
    n_top_hvg above the gene count every candidate is chosen, so the table is exactly the genes that pass."""
    p1 = write(tmp_path, "S1", _rare_genes_sample())
    table = select_genes({"S1": p1}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=100,
                         min_spots=min_spots)
    assert list(table.gene) == expected


# ---- each test below was added to kill a surviving mutant (docs/testing.md, "Mutation testing") ----

def test_normalise_a_sample_without_in_tissue_spots_names_the_file(tmp_path):
    st = write(tmp_path, "S7", make_counts_adata(n_spots=10, genes=("A", "B"), in_tissue=np.zeros(10, int)))
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = tmp_path / "S7n.h5ad"
    with pytest.raises(CMRCNetError, match=r"^\S*S7\.h5ad: no in-tissue spots \(obs\['in_tissue'\] is 0 everywhere\)$"):
        normalise_sample(st, tmp_path / "genes.tsv", out, sample="S7", dataset="d")
    assert not out.exists()


@pytest.mark.parametrize("target_sum", [0, 0.0, -5.0, float("nan"), float("inf"), True])
def test_normalise_refuses_a_target_sum_that_is_not_a_positive_number(tmp_path, target_sum):
    st = write(tmp_path, "S1", make_counts_adata(genes=("A", "B")))
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = tmp_path / "S1n.h5ad"
    message = (f"normalise.target_sum: must be a positive number (or null for the median library size), "
               f"got {target_sum!r}")
    with pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$"):
        normalise_sample(st, tmp_path / "genes.tsv", out, sample="S1", dataset="d", target_sum=target_sum)
    assert not out.exists()


def test_normalise_to_a_target_sum_of_one(tmp_path):
    """target_sum = 1 is a positive number like any other: each spot's counts divided by its total, then log1p."""
    st = write(tmp_path, "S1", _two_orders_adata())
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "S1n.h5ad", sample="S1", dataset="d", target_sum=1)
    np.testing.assert_allclose(out.X.toarray().ravel(), np.log1p([1 / 10, 1 / 2, 2 / 4]), rtol=1e-6)


@pytest.mark.parametrize(("spots", "what"), [("in_tissue", "8 in-tissue spots"), ("all", "10 spots")])
def test_normalise_refuses_a_sample_without_counts_naming_the_file_and_spots(tmp_path, spots, what):
    adata = make_counts_adata(n_spots=10, genes=("A", "B"), in_tissue=np.r_[np.ones(8, int), np.zeros(2, int)])
    adata.X = sp.csr_matrix(np.zeros((10, 2), dtype=np.int32))
    st = write(tmp_path, "S3", adata)
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    out = tmp_path / "S3n.h5ad"
    message = (f"S3.h5ad: no counts: the {what} x 2 genes are all zero (an empty or failed sample?); remove it from "
               "the dataset's samples")
    with pytest.raises(CMRCNetError, match=rf"^\S*{re.escape(message)}$"):
        normalise_sample(st, tmp_path / "genes.tsv", out, sample="S3", dataset="d", spots=spots)
    assert not out.exists()


def test_normalise_refuses_normalised_input_naming_the_file(tmp_path):
    adata = make_counts_adata(genes=("A", "B"))
    adata.X = sp.csr_matrix(adata.X.toarray() + 0.5)
    st = write(tmp_path, "S4", adata)
    pd.DataFrame({"gene": ["A"]}).to_csv(tmp_path / "genes.tsv", sep="\t", index=False)
    message = "S4.h5ad: X does not hold raw integer counts (negative or fractional values found)"
    with pytest.raises(CMRCNetError, match=rf"^\S*{re.escape(message)}$"):
        normalise_sample(st, tmp_path / "genes.tsv", tmp_path / "o.h5ad", sample="S4", dataset="d")


@pytest.mark.parametrize("n_missing", [5, 6])
def test_normalise_names_at_most_five_missing_genes(tmp_path, n_missing):
    st = write(tmp_path, "S1", make_counts_adata(genes=("A", "B")))
    tsv = tmp_path / "genes.tsv"
    pd.DataFrame({"gene": ["A", *(f"Z{i}" for i in range(1, n_missing + 1)), "B"]}).to_csv(tsv, sep="\t", index=False)
    shown = "Z1, Z2, Z3, Z4, Z5" + (" ..." if n_missing > 5 else "")
    message = f"{st}: {n_missing} genes of {tsv} are not measured here: {shown}"
    with pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$"):
        normalise_sample(st, tsv, tmp_path / "o.h5ad", sample="S1", dataset="d")


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
@pytest.mark.parametrize(("spots", "dense"), [("in_tissue", False), ("all", True)])
def test_normalise_writes_and_logs_what_it_did(tmp_path, caplog, spots, dense):
    """Sparse or dense X; the spots with no counts are counted (a warning on in-tissue spots, for information on all
    spots); the output's values, dtypes, obs columns and provenance are checked against a hand computation."""
    in_tissue = np.r_[np.ones(6, int), np.zeros(2, int)]
    adata = make_counts_adata(n_spots=8, genes=("A", "B", "C"), seed=3, in_tissue=in_tissue)
    X = adata.X.toarray() + 1
    X[1] = 0  # an in-tissue spot without counts
    X[7] = 0  # an off-tissue one
    X[2] = [1, 0, 0]  # a total of 1 is not empty
    adata.X = X if dense else sp.csr_matrix(X)
    st = write(tmp_path, "S5", adata)
    tsv = tmp_path / "genes.tsv"
    pd.DataFrame({"gene": ["C", "A"]}).to_csv(tsv, sep="\t", index=False)
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        out = normalise_sample(st, tsv, tmp_path / "n.h5ad", sample="S5", dataset="D", target_sum=100.0, spots=spots,
                               provenance_info={"st_file": st})
    keep = in_tissue == 1 if spots == "in_tissue" else np.ones(8, bool)
    empty = (logging.WARNING, "S5: 1 in-tissue spots have no counts") if spots == "in_tissue" else \
        (logging.INFO, "S5: 2 of all spots have no counts")
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "cmrcnet"] == [
        empty, (logging.INFO, f"S5: {keep.sum()} spots ({spots}) x 2 genes normalised")]
    back = ad.read_h5ad(tmp_path / "n.h5ad")
    for got in (out, back):
        assert list(got.var_names) == ["C", "A"] and list(got.obs_names) == list(adata.obs_names[keep])
        assert got.X.dtype == np.float32 and got.layers["counts"].dtype == np.int32
        np.testing.assert_array_equal(_dense(got.layers["counts"]), X[keep][:, [2, 0]])
        totals = X[keep].sum(axis=1, keepdims=True)
        np.testing.assert_allclose(_dense(got.X), np.log1p(X[keep][:, [2, 0]] / np.maximum(totals, 1) * 100), rtol=1e-6)
        assert got.obs["sample"].eq("S5").all() and got.obs["dataset"].eq("D").all()
        assert "log1p" not in got.uns
        assert json.loads(got.uns["cmrcnet"]) == {"sample": "S5", "dataset": "D", "target_sum": 100.0, "spots": spots,
                                                  "normalised_over": "all measured genes",
                                                  "provenance": {"st_file": str(st)}}


# ---- genes.py mutation survivors (2026-12-01): exact messages, defaults, the flavour, what is logged ----

HINT = "a tab-separated text file with a 'gene' column, as `cmrcnet select-genes` writes (genes.tsv)"


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("absent.tsv", None, "gene table not found"),
    ("S1.h5ad", "h5ad", f"not a gene table (this is an .h5ad, not a gene table): expected {HINT} (UnicodeDecodeError)"),
    ("genes.bin", b"\xff\xfe\x00\x81gene\n", f"not a gene table: expected {HINT} (UnicodeDecodeError)"),
    ("empty.tsv", b"", f"not a gene table: expected {HINT} (EmptyDataError)"),
    ("nogene.tsv", b"name\nA\nB\n", "gene table needs a 'gene' column of unique names"),
    ("missing.tsv", b"gene\tx\nA\t1\n\t2\n", "gene table needs a 'gene' column of unique names"),
    ("twice.tsv", b"gene\nA\nB\nA\n", "gene table needs a 'gene' column of unique names"),
])
def test_read_gene_table_names_the_file_and_the_problem(tmp_path, name, content, problem):
    path = tmp_path / name
    if content == "h5ad":
        make_counts_adata().write_h5ad(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CMRCNetError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        read_gene_table(path)


def _with_one_spot_gene():
    """The rare-genes sample plus R1, detected in exactly one in-tissue spot."""
    adata = _rare_genes_sample()
    X = np.c_[adata.X.toarray(), np.zeros(adata.n_obs, np.int32)]
    X[9, -1] = 4
    out = ad.AnnData(X=sp.csr_matrix(X), obs=adata.obs, var=pd.DataFrame(index=[*adata.var_names, "R1"]))
    out.obsm["spatial"] = adata.obsm["spatial"]
    return out


@pytest.mark.parametrize(("kwargs", "has_r1"), [({}, True), ({"min_spots": 0}, True), ({"min_spots": 1}, True),
                                                ({"min_spots": 2}, False)])
def test_a_gene_seen_in_one_spot_is_a_candidate_by_default(tmp_path, kwargs, has_r1):
    """The default min_spots is 1: one in-tissue spot suffices (0 means the same)."""
    p1 = write(tmp_path, "S1", _with_one_spot_gene())
    table = select_genes({"S1": p1}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=100, **kwargs)
    assert ("R1" in set(table.gene)) is has_r1
    assert len(table) == 7 + has_r1


def test_default_n_top_hvg_is_1000_per_sample(tmp_path):
    p1 = write(tmp_path, "S1", hvg_sample(3, ["G010"], n_genes=1001, n_spots=80))
    table = select_genes({"S1": p1}, tmp_path / "g.tsv", method="hvg_union", dataset="d")
    assert len(table) == 1000


@pytest.mark.parametrize("min_spots", [0, 1])
def test_sample_hvgs_with_no_detected_gene_says_so(min_spots):
    adata = make_counts_adata(n_spots=40, genes=("A", "B"))
    adata.X = sp.csr_matrix((40, 2), dtype=np.int32)
    message = ("sample: no gene is detected in at least 1 in-tissue spots (genes.min_spots) of its 40; highly "
               "variable genes cannot be chosen")
    with pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$"):
        sample_hvgs(adata, 10, "seurat", min_spots)


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_sample_hvgs_uses_the_configured_flavour(flavor):
    """On this sample the two flavours choose different top-5 genes; each must be scanpy's own choice for it, on
    the filtered, normalised and log1p-transformed copy."""
    import scanpy as sc

    adata = hvg_sample(1, ["G010", "G020"])
    ref = adata.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    expected = {f: sorted(sc.pp.highly_variable_genes(ref, n_top_genes=5, flavor=f, inplace=False)
                          .set_index(ref.var_names).query("highly_variable").index) for f in ("seurat", "cell_ranger")}
    assert expected["seurat"] != expected["cell_ranger"]
    assert sorted(sample_hvgs(adata, 5, flavor, 1)) == expected[flavor]
    np.testing.assert_array_equal(adata.X.toarray(), hvg_sample(1, ["G010", "G020"]).X.toarray())  # input unchanged


def _sample_error(tmp_path, name, adata, **kwargs):
    path = write(tmp_path, name, adata)
    with pytest.raises(CMRCNetError) as info:
        select_genes({name: path}, tmp_path / "g.tsv", **{"method": "hvg_union", "dataset": "d", **kwargs})
    assert not (tmp_path / "g.tsv").exists()
    return path, str(info.value)


def test_select_genes_errors_on_a_sample_name_its_file(tmp_path):
    off = make_counts_adata(n_spots=10, genes=("A", "B"), in_tissue=np.zeros(10, int))
    path, message = _sample_error(tmp_path, "S1", off)
    assert message == f"{path}: no in-tissue spots (obs['in_tissue'] is 0 everywhere)"

    for name, values in [("S2", lambda X: X + 0.5), ("S3", lambda X: -X)]:  # fractional, or negative whole numbers
        bad = make_counts_adata(genes=("A", "B"))
        bad.X = sp.csr_matrix(values(bad.X.toarray() + 1))
        path, message = _sample_error(tmp_path, name, bad, method="panel")
        assert message == f"{path}: X does not hold raw integer counts (negative or fractional values found)"

    empty = make_counts_adata(n_spots=10, genes=("A", "B"), in_tissue=np.r_[np.ones(7, int), np.zeros(3, int)])
    empty.X = sp.csr_matrix((10, 2), dtype=np.int32)
    path, message = _sample_error(tmp_path, "S4", empty)
    assert message == (f"{path}: no counts: the 7 in-tissue spots x 2 genes are all zero (an empty or failed "
                       "sample?); remove it from the dataset's samples")

    path, message = _sample_error(tmp_path, "S5", make_counts_adata(n_spots=40), n_top_hvg=2, min_spots=50)
    assert message == (f"{path}: no gene is detected in at least 50 in-tissue spots (genes.min_spots) of its 40; "
                       "highly variable genes cannot be chosen")


@pytest.mark.parametrize("n_top_hvg", [0, -3, True, 2.5, "3", None])
def test_select_genes_refuses_a_bad_n_top_hvg_for_hvg_union_only(tmp_path, n_top_hvg):
    p1 = write(tmp_path, "S1", make_counts_adata(genes=("A", "B")))
    message = f"n_top_hvg: must be a whole number of genes of at least 1, got {n_top_hvg!r}"
    with pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$"):
        select_genes({"S1": p1}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=n_top_hvg)
    panel = select_genes({"S1": p1}, tmp_path / "p.tsv", method="panel", dataset="d", n_top_hvg=n_top_hvg)
    assert list(panel.gene) == ["A", "B"]  # a panel has no use for it


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"st_files": {}}, "dataset d: no samples to select genes from"),
    ({"panel_controls": "some"}, "panel_controls: unknown value 'some'; use drop or keep"),
    ({"method": "hvg"}, "gene_selection: unknown method 'hvg'; use hvg_union or panel"),
    ({"control_probe_patterns": ["^BLANK", "^Neg"]}, "dataset d: gene selection left no genes"),
])
def test_select_genes_refuses_bad_settings_with_one_line(tmp_path, kwargs, message):
    p1 = write(tmp_path, "S1", make_counts_adata(genes=("BLANK_1", "NegControl_2")))
    args = {"st_files": {"S1": p1}, "out_tsv": tmp_path / "g.tsv", "method": "panel", "dataset": "d", **kwargs}
    with pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$"):
        select_genes(**args)
    assert not (tmp_path / "g.tsv").exists()


def _cmrcnet_log(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "cmrcnet"]


def test_select_genes_logs_each_step_hvg_union(tmp_path, caplog):
    """Each sample's HVG count, the HVGs and markers left out, the total, and the difference from the paper."""
    s2 = hvg_sample(2, ["G040"])
    p1 = write(tmp_path, "S1", hvg_sample(1, ["G010"]))
    p2 = write(tmp_path, "S2", s2[:, [g for g in s2.var_names if g != "G010"]].copy())
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        select_genes({"S1": p1, "S2": p2}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=1,
                     marker_genes=["G020", "NOPE"], paper_n_genes=5)
    assert _cmrcnet_log(caplog) == [
        ("INFO", "S1: 1 highly variable genes"),
        ("INFO", "S2: 1 highly variable genes"),
        ("WARNING", "dataset d: 1 highly variable genes are not measured in every sample; left out"),
        ("WARNING", "dataset d: marker gene NOPE is not measured in every sample; left out"),
        ("INFO", "dataset d: 2 genes selected (hvg_union), 1 marker genes"),
        ("WARNING", "dataset d: 2 genes selected, the paper used 5 (-3)"),
    ]


def test_select_genes_logs_the_hvg_count_it_found(tmp_path, caplog):
    """n_top_hvg above a sample's gene count: the log says how many were chosen, not how many were asked for."""
    p1 = write(tmp_path, "S1", _rare_genes_sample())
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        select_genes({"S1": p1}, tmp_path / "g.tsv", method="hvg_union", dataset="d", n_top_hvg=100, min_spots=5)
    assert _cmrcnet_log(caplog)[0] == ("INFO", "S1: 6 highly variable genes")


@pytest.mark.parametrize(("controls", "patterns", "summary"), [
    ("drop", CONTROLS, "4 control probes removed (^BLANK: 2, ^NegControl: 1, ^Unassigned: 1)"),
    ("keep", CONTROLS, "4 control probes kept (^BLANK: 2, ^NegControl: 1, ^Unassigned: 1)"),
    ("drop", [], "0 control probes removed (none)"),
])
def test_select_genes_logs_the_panel_and_its_control_probes(tmp_path, caplog, controls, patterns, summary):
    genes = PANEL + ["BLANK_0002"]
    p1 = write(tmp_path, "S1", make_counts_adata(genes=genes, seed=1))
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        table = select_genes({"S1": p1}, tmp_path / "g.tsv", method="panel", dataset="X", panel_controls=controls,
                             control_probe_patterns=patterns, marker_genes=["GATA3"])
    assert _cmrcnet_log(caplog) == [
        ("INFO", f"dataset X: panel of 7 features measured in every sample, {summary}"),
        ("INFO", f"dataset X: {len(table)} genes selected (panel), 1 marker genes"),
    ]
    assert len(table) == (3 if controls == "drop" and patterns else 7)
