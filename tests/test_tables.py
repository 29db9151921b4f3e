"""The paper tables (cmrcnet/evaluation/tables.py) on small hand-built summaries: which of our rows each table keeps,
which paper row each is set beside, and the Markdown's "(paper x, +-diff)" text. Expected values are worked by hand
or read straight from the paper CSVs, never from the code under test."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

import cmrcnet
from cmrcnet.evaluation.tables import label_info, table1, table2, table5, to_markdown

PAPER_DATA = Path(cmrcnet.__file__).parent / "paper_data"
NAN = math.nan

CONFIG = {"methods": {
    "stnet": {"model": "stnet", "paper_name": "STNet", "params": {}},
    "bleep": {"model": "bleep", "paper_name": "BLEEP", "params": {}},
    "cmrcnet": {"model": "cmrcnet", "paper_name": "CMRCNet", "params": {"mask_rate": 0.5}},
    "cmrcnet-none": {"model": "cmrcnet", "ablation": True, "params": {"recon_loss": "none"}},
    "cmrcnet-mask03": {"model": "cmrcnet", "ablation": True, "params": {"mask_rate": 0.3}},
    "cmrcnet-mask07": {"model": "cmrcnet", "ablation": True, "params": {"mask_rate": 0.7}},
}}


# the HEST-bench table says its gene list is derived from the dataset, not the benchmark's published one
HEST_GENES_NOTE = ("Pearson r over each fold's whole test split; gene list derived from each dataset (the "
                   "highest-variance genes every sample expresses, evaluation.hest_bench_genes), not the benchmark's "
                   "published lists, which config/hestbench.yaml uses on the benchmark's own tasks")

def labels_for(*labels: str):
    """label_info for labels written as the predictions name them: `stnet`, `stnet-tta`, `bleep-k50`."""
    rows = []
    for label in labels:
        method, _, layer = label.rpartition("-")
        if method in CONFIG["methods"] and (layer == "tta" or layer.startswith("k")):
            rows.append({"label": label, "method": method, "layer": layer})
        else:
            rows.append({"label": label, "method": label, "layer": "pred"})
    return label_info(CONFIG, rows)


def summary_of(rows: list[tuple[str, str, dict[str, float]]], protocol: str = "paper") -> pd.DataFrame:
    """One summary row per (dataset, label, gene set: mean r); sd 0.01, CI mean +- 0.02, 3 folds, no NaN."""
    out = []
    for dataset, label, means in rows:
        for gene_set, mean in means.items():
            out.append({"protocol": protocol, "dataset": dataset, "method": label, "gene_set": gene_set,
                        "mean_r": mean, "sd_r": 0.01, "ci_low": mean - 0.02, "ci_high": mean + 0.02,
                        "n_folds": 3, "n_nan": 0})
    return pd.DataFrame(out)


def paper_csv(name: str, dataset: str, model: str) -> pd.Series:
    """The paper's row, read with pandas straight from the shipped CSV."""
    table = pd.read_csv(PAPER_DATA / f"{name}.csv")
    hit = table[(table["dataset"] == dataset) & (table["model"] == model)]
    assert len(hit) == 1, (name, dataset, model)
    return hit.iloc[0]


# ---------------------------------------------------------------------------------------------------- Table 2

EXTENDED = ["HEG150", "HVG150", "HEG250", "HVG250"]


def test_table2_pairs_top150_with_k250_and_top250_with_k500():
    """Kills: swapping Table 2's pairing (top-150 <-> k = 500, top-250 <-> k = 250). The whole table is checked
    against values worked by hand from the paper's Table 2 (SKCM: STNet 0.1160 0.0971 0.0815 0.0852, CMRCNet
    0.2642 0.2174 0.2086 0.2054; COAD CMRCNet top-250 0.3476 0.3494)."""
    means = {"stnet": [0.10, 0.09, 0.08, 0.07], "cmrcnet-k50": [0.26, 0.18, 0.17, 0.16],
             "cmrcnet-k250": [0.30, 0.20, 0.25, 0.15], "cmrcnet-k500": [0.28, 0.22, 0.21, 0.19],
             "cmrcnet-none-k250": [0.5, 0.5, 0.5, 0.5]}
    rows = [("SKCM", label, dict(zip(EXTENDED, m))) for label, m in means.items()]
    rows.append(("COAD", "cmrcnet-k500", dict(zip(EXTENDED, [0.40, 0.41, 0.35, 0.33]))))
    rows.append(("SKCM", "stnet", {"HEG50": 0.9}))  # other gene sets stay out
    summary = summary_of(rows)
    summary = pd.concat([summary, summary_of([("SKCM", "stnet", {"HEG150": 0.9})], protocol="hest-bench")])
    labels = labels_for("stnet", "cmrcnet-k50", "cmrcnet-k250", "cmrcnet-k500", "cmrcnet-none-k250")

    got = table2(summary, labels)

    # (dataset, label, k, means, paper values, our mean minus the paper's)
    expected_rows = [
        ("SKCM", "stnet", NAN, [0.10, 0.09, 0.08, 0.07], [0.1160, 0.0971, 0.0815, 0.0852],
         [-0.0160, -0.0071, -0.0015, -0.0152]),
        ("SKCM", "cmrcnet-k50", 50.0, [0.26, 0.18, 0.17, 0.16], [NAN] * 4, [NAN] * 4),
        ("SKCM", "cmrcnet-k250", 250.0, [0.30, 0.20, 0.25, 0.15], [0.2642, 0.2174, NAN, NAN],
         [0.0358, -0.0174, NAN, NAN]),
        ("SKCM", "cmrcnet-k500", 500.0, [0.28, 0.22, 0.21, 0.19], [NAN, NAN, 0.2086, 0.2054],
         [NAN, NAN, 0.0014, -0.0154]),
        ("COAD", "cmrcnet-k500", 500.0, [0.40, 0.41, 0.35, 0.33], [NAN, NAN, 0.3476, 0.3494],
         [NAN, NAN, 0.0024, -0.0194]),
    ]
    records = []
    for dataset, label, k, m, paper, diff in expected_rows:
        record = {"dataset": dataset, "method": label, "k": k}
        for gs, mean, p, d in zip(EXTENDED, m, paper, diff):
            record.update({f"{gs}_mean": mean, f"{gs}_sd": 0.01, f"{gs}_ci_low": mean - 0.02,
                           f"{gs}_ci_high": mean + 0.02, f"{gs}_n_nan": 0, f"{gs}_paper": p, f"{gs}_diff": d})
        records.append(record)
    expected = pd.DataFrame(records)

    pd.testing.assert_frame_equal(got, expected, check_dtype=False, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- Table 1

MAIN = ["HEG50", "HVG50", "marker"]
TABLE1_LABELS = ["stnet", "stnet-tta", "bleep-k50", "bleep-k100", "bleep-k500", "cmrcnet-k50", "cmrcnet-k100",
                 "cmrcnet-k500", "cmrcnet-none-k50"]


@pytest.fixture
def t1() -> pd.DataFrame:
    """Table 1 of SKCM (whose HEG / HVG / marker values differ in every paper row) at k = 50, 100, 500."""
    rows = [("SKCM", label, dict(zip(MAIN, [0.40, 0.30, 0.20]))) for label in TABLE1_LABELS]
    return table1(summary_of(rows), labels_for(*TABLE1_LABELS), ks=[100, 500, 50]).set_index("method")


def test_table1_keeps_retrieval_methods_at_the_smallest_and_largest_k_only(t1):
    """Kills: Table 1 keeping every k (here k = 100 too). Regression methods (no k) stay, ablations go."""
    assert list(t1.index) == ["stnet", "stnet-tta", "bleep-k50", "bleep-k500", "cmrcnet-k50", "cmrcnet-k500"]


def test_table1_sets_bleep_at_k50_beside_the_papers_bleep_row(t1):
    """Kills: removing the BLEEP k = 50 fallback in `_paper_names` (the paper's BLEEP row, unsuffixed, is BLEEP's
    default k = 50). No paper row exists for BLEEP at k = 500."""
    bleep = paper_csv("table1_top50", "SKCM", "BLEEP")  # 0.3048, 0.1809, 0.1921
    for gs, column in zip(MAIN, ["HEG", "HVG", "marker"]):
        assert t1.loc["bleep-k50", f"{gs}_paper"] == pytest.approx(bleep[column])
        assert math.isnan(t1.loc["bleep-k500", f"{gs}_paper"])
    assert t1.loc["bleep-k50", "HEG50_diff"] == pytest.approx(0.40 - 0.3048)
    assert t1.loc["bleep-k50", "marker_diff"] == pytest.approx(0.20 - 0.1921)


def test_table1_reads_each_gene_sets_own_paper_column(t1):
    """Kills: Table 1's HVG or marker paper column reading the paper's HEG value. Every row the paper has is
    checked column by column against the CSV; SKCM CMRCNet-500 is 0.3646 / 0.2268 / 0.2419 by hand."""
    names = {"stnet": "STNet", "stnet-tta": "STNet", "cmrcnet-k50": "CMRCNet-50", "cmrcnet-k500": "CMRCNet-500"}
    for label, model in names.items():
        paper = paper_csv("table1_top50", "SKCM", model)
        assert len({paper["HEG"], paper["HVG"], paper["marker"]}) == 3  # else the test could not tell them apart
        for gs, column in zip(MAIN, ["HEG", "HVG", "marker"]):
            assert t1.loc[label, f"{gs}_paper"] == pytest.approx(paper[column]), (label, gs)
    assert (t1.loc["cmrcnet-k500", ["HEG50_paper", "HVG50_paper", "marker_paper"]].tolist()
            == pytest.approx([0.3646, 0.2268, 0.2419]))
    assert (t1.loc["cmrcnet-k500", ["HEG50_diff", "HVG50_diff", "marker_diff"]].tolist()
            == pytest.approx([0.40 - 0.3646, 0.30 - 0.2268, 0.20 - 0.2419]))


# ------------------------------------------------------------------------------------------------- Markdown

def test_markdown_difference_is_ours_minus_the_papers():
    """Kills: flipping the sign of the "(paper x, +-diff)" text. Ours above the paper reads +, below reads -."""
    table = pd.DataFrame([
        {"dataset": "SKCM", "method": "above", "HEG50_mean": 0.5, "HEG50_sd": 0.125, "HEG50_paper": 0.25,
         "HVG50_mean": 0.2, "HVG50_sd": NAN, "HVG50_paper": NAN},
        {"dataset": "SKCM", "method": "below", "HEG50_mean": 0.125, "HEG50_sd": 0.05, "HEG50_paper": 0.375,
         "HVG50_mean": NAN, "HVG50_sd": NAN, "HVG50_paper": 0.3},
    ])
    text = to_markdown(table, ["HEG50", "HVG50"], "T", "a note")
    assert text.splitlines() == [
        "# T", "", "a note", "",
        "| dataset | method | HEG50 | HVG50 |",
        "|---|---|---|---|",
        "| SKCM | above | 0.500 ± 0.125 (paper 0.250, +0.250) | 0.200 |",
        "| SKCM | below | 0.125 ± 0.050 (paper 0.375, -0.250) | - |",
    ]


# ---------------------------------------------------------------------------------------------------- Table 5

def test_table5_puts_each_mask_rate_beside_its_own_paper_row():
    """Kills: Table 5 ignoring the mask rate. Two ablations differing only in mask_rate (MSE, image target) land
    on the paper's mse/0.3 row (0.3020 0.2921 0.2221) and mse/0.7 row (0.3006 0.2924 0.2272); means are over
    datasets; the k = 500 layer stays out."""
    rows = []
    for label, first, second in (("cmrcnet-mask07-k50", 0.30, 0.50), ("cmrcnet-mask03-k50", 0.20, 0.30),
                                 ("cmrcnet-mask03-k500", 0.9, 0.9), ("cmrcnet-k50", 0.35, 0.25)):
        rows.append(("SKCM", label, dict(zip(MAIN, [first, first, first]))))
        rows.append(("COAD", label, dict(zip(MAIN, [second, second, second]))))
    labels = labels_for("cmrcnet-mask07-k50", "cmrcnet-mask03-k50", "cmrcnet-mask03-k500", "cmrcnet-k50")

    t5 = table5(summary_of(rows), labels, k=50).set_index("method")

    assert list(t5.index) == ["cmrcnet-mask07-k50", "cmrcnet-mask03-k50", "cmrcnet-k50"]
    assert t5["mask_rate"].tolist() == [0.7, 0.3, 0.5]
    assert t5["n_datasets"].tolist() == [2, 2, 2]
    expected = {  # label: (mean over SKCM and COAD, paper HEG / HVG / marker)
        "cmrcnet-mask07-k50": (0.40, [0.3006, 0.2924, 0.2272]),
        "cmrcnet-mask03-k50": (0.25, [0.3020, 0.2921, 0.2221]),
        "cmrcnet-k50": (0.30, [0.3117, 0.3020, 0.2372]),
    }
    for label, (mean, paper) in expected.items():
        for gs, p in zip(MAIN, paper):
            assert t5.loc[label, f"{gs}_mean"] == pytest.approx(mean), (label, gs)
            assert t5.loc[label, f"{gs}_paper"] == pytest.approx(p), (label, gs)
            assert t5.loc[label, f"{gs}_diff"] == pytest.approx(mean - p), (label, gs)


def test_write_tables_writes_each_tables_csv_and_its_titled_markdown(tmp_path):
    from cmrcnet.evaluation.tables import write_tables

    table = pd.DataFrame({"dataset": ["SKCM"], "method": ["stnet"], "HEG50_mean": [0.5], "HEG50_sd": [0.125]})
    written = write_tables(tmp_path, {"t1": (table, ["HEG50"], "Table X: a title", "a note"),
                                      "t2": (table.iloc[:0], ["HEG50"], "Empty", "")})
    assert written == [tmp_path / "t1.csv", tmp_path / "t1.md", tmp_path / "t2.csv", tmp_path / "t2.md"]
    assert (tmp_path / "t1.md").read_text() == ("# Table X: a title\n\na note\n\n| dataset | method | HEG50 |\n"
                                                "|---|---|---|\n| SKCM | stnet | 0.500 ± 0.125 |\n")
    assert (tmp_path / "t2.md").read_text() == "# Empty\n\n(no results)\n"
    assert pd.read_csv(tmp_path / "t1.csv")["HEG50_mean"].tolist() == [0.5]


def test_best_genes_markdown_lists_each_methods_genes_with_their_r():
    from cmrcnet.evaluation.tables import best_genes_markdown

    best = pd.DataFrame({"dataset": ["SKCM", "SKCM", "SKCM"], "method": ["stnet", "stnet", "cmrcnet-k50"],
                         "gene": ["PMEL", "MLANA", "TYR"], "mean_r": [0.61234, 0.5, -0.0004]})
    title = "# Table 3: best-predicted genes (paper protocol, mean r over folds)\n\n"
    assert best_genes_markdown(best) == (title + "| dataset | method | genes |\n|---|---|---|\n"
                                         "| SKCM | stnet | PMEL (0.612), MLANA (0.500) |\n"
                                         "| SKCM | cmrcnet-k50 | TYR (-0.000) |\n")
    assert best_genes_markdown(best.iloc[:0]) == title + "(no results)\n"


def test_table4_sets_the_foundation_model_beside_cmrcnet_at_the_largest_k_only():
    from cmrcnet.evaluation.tables import table4

    config = {"methods": {**CONFIG["methods"], "ctp": {"model": "foundation", "paper_name": "cTransPath"}}}
    rows = [{"label": lab, "method": m, "layer": layer} for lab, m, layer in [
        ("ctp", "ctp", "pred"), ("ctp-tta", "ctp", "tta"), ("cmrcnet-k50", "cmrcnet", "k50"),
        ("cmrcnet-k500", "cmrcnet", "k500"), ("cmrcnet-mask03-k500", "cmrcnet-mask03", "k500"),
        ("stnet", "stnet", "pred")]]
    labels = label_info(config, rows)
    summary = summary_of([("SKCM", lab, {"HEG50": 0.4, "HVG50": 0.2}) for lab in labels["label"]])
    out = table4(summary, labels, 500)
    assert out["method"].tolist() == ["ctp", "cmrcnet-k500"]
    for label, model in [("ctp", "cTransPath"), ("cmrcnet-k500", "CMRCNet-500")]:
        row, paper = out[out["method"] == label].iloc[0], paper_csv("table4_foundation", "SKCM", model)
        assert (row["HEG50_paper"], row["HVG50_paper"]) == (paper["HEG"], paper["HVG"])
        assert row["HEG50_diff"] == pytest.approx(0.4 - paper["HEG"])
    assert table4(summary[~summary["method"].str.startswith("ctp")], labels, 500).empty  # no foundation: empty


def test_hest_bench_table_keeps_only_its_protocol_with_a_column_per_gene_set():
    from cmrcnet.evaluation.tables import hest_bench_table

    labels = labels_for("stnet", "bleep-k50")
    summary = pd.concat([summary_of([("SKCM", "stnet", {"hest50": 0.3}), ("COAD", "bleep-k50", {"hest42": 0.1})],
                                    protocol="hest-bench"),
                         summary_of([("SKCM", "stnet", {"HEG50": 0.9})])])
    out = hest_bench_table(summary, labels)
    assert out["method"].tolist() == ["stnet", "bleep-k50"] and out["dataset"].tolist() == ["SKCM", "COAD"]
    assert out["hest50_mean"].tolist()[0] == 0.3 and math.isnan(out["hest50_mean"].tolist()[1])
    assert out["hest42_mean"].tolist()[1] == 0.1 and not any(c.startswith("HEG") for c in out.columns)
    assert hest_bench_table(summary_of([("SKCM", "stnet", {"HEG50": 0.9})]), labels).empty


def test_main_labels_are_the_non_ablation_methods():
    from cmrcnet.evaluation.tables import main_labels

    assert main_labels(labels_for("stnet", "cmrcnet-k50", "cmrcnet-none-k50", "cmrcnet-mask03-k50")) == [
        "stnet", "cmrcnet-k50"]


@pytest.mark.parametrize("rows, config, expected", [
    ([("SKCM", "HEG50"), ("SKCM", "HVG50"), ("SKCM", "marker")], {}, ""),
    ([("SKCM", "HEG50"), ("SKCM", "HVG50"), ("COAD", "HEG50"), ("COAD", "HVG50")],
     {"datasets": {"SKCM": {"marker_genes": []}, "COAD": {"marker_genes": ["CDX2", "LGR5"]}}},
     "marker not computed: SKCM lists no marker_genes; none of COAD's marker genes (CDX2, LGR5) is measured"),
    ([("SKCM", "marker")], {"evaluation": {"top_genes": [20, 100]}},
     "HEG50 not computed: evaluation.top_genes has no 50; HVG50 not computed: evaluation.top_genes has no 50"),
    ([("SKCM", "marker"), ("COAD", "HEG50"), ("COAD", "HVG50"), ("COAD", "marker")],
     {"evaluation": {"top_genes": [50]}}, "HEG50 not computed for SKCM; HVG50 not computed for SKCM"),
])
def test_missing_sets_note_gives_one_reason_per_missing_column(rows, config, expected):
    from cmrcnet.evaluation.tables import _with_reasons, missing_sets_note

    summary = pd.DataFrame([{"protocol": "paper", "dataset": d, "gene_set": g} for d, g in rows])
    note = missing_sets_note(summary, ["HEG50", "HVG50", "marker"], config)
    assert note == expected
    assert _with_reasons("mean ± sd.", note) == (f'mean ± sd. "-": {expected}.' if expected else "mean ± sd.")


def test_missing_sets_note_without_the_paper_protocol():
    from cmrcnet.evaluation.tables import missing_sets_note

    summary = pd.DataFrame([{"protocol": "hest-bench", "dataset": "SKCM", "gene_set": "hest50"}])
    assert missing_sets_note(summary, ["HEG50"], {"evaluation": {"protocols": ["hest-bench"]}}) == \
        "the paper protocol is not in evaluation.protocols"
    assert missing_sets_note(summary.iloc[:0], ["HEG50"], {}) == ""


def test_gene_counts_put_our_count_beside_the_papers(tmp_path):
    from cmrcnet.evaluation.tables import gene_counts

    for name, genes in [("a", ["G1", "G2", "G3"]), ("b", ["G1"])]:
        (tmp_path / f"{name}.tsv").write_text("gene\tsource\tn_samples_hvg\tis_marker\n" + "".join(
            f"{g}\thvg_union\t1\tFalse\n" for g in genes))
    config = {"datasets": {"A": {"paper_n_genes": 5, "gene_selection": "hvg_union", "panel_controls": "drop",
                                 "spots": "all"}, "B": {"gene_selection": "panel"}}}
    assert gene_counts({"A": tmp_path / "a.tsv", "B": tmp_path / "b.tsv"}, config) == [
        {"dataset": "A", "n_genes": 3, "paper_n_genes": 5, "difference": -2, "gene_selection": "hvg_union",
         "panel_controls": "drop", "spots": "all"},
        {"dataset": "B", "n_genes": 1, "paper_n_genes": None, "difference": None, "gene_selection": "panel",
         "panel_controls": None, "spots": None}]


@pytest.mark.parametrize("args, expected", [
    ((0.5,), "0.500"), ((0.5, NAN), "0.500"), ((0.5, 0.1, NAN), "0.500 ± 0.100"), ((0.5, None, None), "0.500"),
    ((0.5, None, 0.25), "0.500 (paper 0.250, +0.250)"), ((NAN, 0.1, 0.2), "-"), ((None,), "-"),
])
def test_cell_shows_what_is_known(args, expected):
    from cmrcnet.evaluation.tables import _cell

    assert _cell(*args) == expected


def test_ablation_markdown_names_each_rows_switches_and_dashes_the_unknown():
    table = pd.DataFrame({"method": ["cmrcnet-none", "cmrcnet-mask03"], "recon_loss": ["none", "mse"],
                          "mask_rate": [NAN, 0.3], "recon_target": [None, "image"], "HEG50_mean": [0.3, 0.31],
                          "HEG50_sd": [NAN, NAN], "HEG50_paper": [NAN, 0.302]})
    assert to_markdown(table, ["HEG50"], "T5") == (
        "# T5\n\n| method | recon_loss | mask_rate | recon_target | HEG50 |\n|---|---|---|---|---|\n"
        "| cmrcnet-none | none | - | - | 0.300 |\n| cmrcnet-mask03 | mse | 0.3 | image | 0.310 (paper 0.302, +0.008) |\n")


def test_label_info_columns_for_each_kind_of_label():
    labels = label_info(CONFIG, [{"label": "stnet-tta", "method": "stnet", "layer": "tta"},
                                 {"label": "cmrcnet-none-k50", "method": "cmrcnet-none", "layer": "k50"},
                                 {"label": "stnet-tta", "method": "stnet", "layer": "tta"}])
    assert list(labels.columns) == ["label", "method", "model", "layer", "k", "tta", "paper_name", "ablation",
                                    "recon_loss", "mask_rate", "recon_target"]
    assert labels.index.tolist() == [0, 1]
    stnet, none = labels.iloc[0].to_dict(), labels.iloc[1].to_dict()
    assert (stnet["method"], stnet["layer"], stnet["tta"], stnet["paper_name"], stnet["recon_loss"]) == (
        "stnet", "tta", True, "STNet", None) and pd.isna(stnet["k"])
    assert (none["method"], none["layer"], none["k"], none["ablation"], none["recon_loss"], none["mask_rate"],
            none["recon_target"]) == ("cmrcnet-none", "k50", 50, True, "none", 0.5, "image")


def test_table5_without_reconstruction_and_a_variant_the_paper_did_not_run():
    config = {"methods": {**CONFIG["methods"],
                          "cmrcnet-mask06": {"model": "cmrcnet", "ablation": True, "params": {"mask_rate": 0.6}}}}
    labels = label_info(config, [{"label": f"{m}-k50", "method": m, "layer": "k50"}
                                 for m in ("cmrcnet-none", "cmrcnet-mask06")])
    summary = summary_of([("SKCM", "cmrcnet-none-k50", {"HEG50": 0.3, "HVG50": 0.2, "marker": 0.1}),
                          ("SKCM", "cmrcnet-mask06-k50", {"HEG50": 0.4, "HVG50": 0.2, "marker": 0.1})])
    out = table5(summary, labels, 50).set_index("method")
    none, paper = out.loc["cmrcnet-none-k50"], pd.read_csv(PAPER_DATA / "table5_ablation.csv").iloc[0]
    assert paper["recon_loss"] == "none"
    assert pd.isna(none["mask_rate"]) and pd.isna(none["recon_target"])  # no mask without reconstruction
    assert (none["HEG50_paper"], none["HVG50_paper"], none["marker_paper"]) == (paper["HEG"], paper["HVG"],
                                                                                paper["marker"])
    assert out.loc["cmrcnet-mask06-k50", "mask_rate"] == 0.6 and math.isnan(out.loc["cmrcnet-mask06-k50", "HEG50_paper"])


def test_a_gene_set_no_dataset_has_is_a_column_of_nan():
    labels = labels_for("stnet")
    out = table2(summary_of([("SKCM", "stnet", {"HEG150": 0.3})]), labels)
    assert math.isnan(out.loc[0, "HVG250_mean"]) and math.isnan(out.loc[0, "HVG250_diff"])
    assert out.loc[0, "HEG150_mean"] == 0.3


def test_hest_bench_table_columns():
    from cmrcnet.evaluation.tables import hest_bench_table

    out = hest_bench_table(summary_of([("SKCM", "stnet", {"hest50": 0.3})], protocol="hest-bench"),
                           labels_for("stnet"))
    assert list(out.columns) == ["dataset", "method", "k", "hest50_mean", "hest50_sd", "hest50_ci_low",
                                 "hest50_ci_high", "hest50_n_nan"]


@pytest.mark.parametrize("rows, sets, config, expected", [
    ([], ["HEG50"], {}, ""),  # nothing scored: no frame columns at all
    ([("paper", "SKCM", "HEG50"), ("hest-bench", "COAD", "HEG50"), ("paper", "COAD", "HVG50")], ["HEG50"],
     {"evaluation": {"top_genes": [50]}}, "HEG50 not computed for COAD"),  # another protocol's set does not count
    ([("paper", "SKCM", "HVG50"), ("paper", "COAD", "HVG50")], ["HEG50", "marker"],
     {"evaluation": {"top_genes": [50]}},
     "HEG50 not computed for SKCM, COAD; marker not computed: SKCM lists no marker_genes; COAD lists no marker_genes"),
    ([("paper", "SKCM", "HVG50")], ["HEG5"], {"evaluation": {"top_genes": [50]}},
     "HEG5 not computed: evaluation.top_genes has no 5"),
])
def test_missing_sets_note_edge_cases(rows, sets, config, expected):
    from cmrcnet.evaluation.tables import missing_sets_note

    summary = pd.DataFrame([{"protocol": p, "dataset": d, "gene_set": g} for p, d, g in rows])
    assert missing_sets_note(summary, sets, config) == expected


def test_with_reasons_drops_only_the_notes_final_full_stop():
    from cmrcnet.evaluation.tables import _with_reasons

    assert _with_reasons("see Table X.", "why") == 'see Table X. "-": why.'
    assert _with_reasons("see Table X", "") == "see Table X"


def test_figure_labels_one_per_main_method_at_the_smallest_k_in_config_order():
    from cmrcnet.evaluation.tables import figure_labels

    rows = pd.DataFrame([{"label": lab, "method": m, "layer": layer} for lab, m, layer in [
        ("cmrcnet-k250", "cmrcnet", "k250"), ("cmrcnet-k50", "cmrcnet", "k50"), ("stnet-tta", "stnet", "tta"),
        ("cmrcnet-none-k50", "cmrcnet-none", "k50"), ("bleep-k50", "bleep", "k50"), ("stnet", "stnet", "pred"),
        ("cmrcnet-k50", "cmrcnet", "k50")]])
    config = {**CONFIG, "evaluation": {"k": [250, 50]}}
    assert figure_labels(rows, config) == ["stnet", "bleep-k50", "cmrcnet-k50"]


# ------------------------------------------------------------------------------------------------ build_tables

BT_GENES = [f"G{i}" for i in range(12)]
BT_SETS = {  # (protocol, dataset): {gene set: genes}, the same on every fold
    ("paper", "SKCM"): {"HEG50": BT_GENES[:5], "HVG50": BT_GENES[3:9], "marker": ["G1"], "HEG150": BT_GENES[:10],
                        "HVG150": BT_GENES[2:]},
    ("paper", "COAD"): {"HEG50": BT_GENES[:5], "HVG50": BT_GENES[3:9], "HEG150": BT_GENES[:10],
                        "HVG150": BT_GENES[2:]},
    ("hest-bench", "SKCM"): {"hest12": BT_GENES},
    ("hest-bench", "COAD"): {"hest6": BT_GENES[:6]},
}
# label: (method, layer, base r); the rows come in no particular order, as the predictions list them
BT_LABELS = {
    "cmrcnet-mask03-k50": ("cmrcnet-mask03", "k50", 0.31), "stnet-tta": ("stnet", "tta", 0.12),
    "cmrcnet-k500": ("cmrcnet", "k500", 0.36), "ctp": ("ctp", "pred", 0.40), "bleep-k500": ("bleep", "k500", 0.24),
    "cmrcnet-none-k500": ("cmrcnet-none", "k500", 0.27), "stnet": ("stnet", "pred", 0.10),
    "cmrcnet-k50": ("cmrcnet", "k50", 0.33), "bleep-k50": ("bleep", "k50", 0.21),
    "cmrcnet-none-k50": ("cmrcnet-none", "k50", 0.29), "cmrcnet-k250": ("cmrcnet", "k250", 0.35),
}
BT_HEST = ["stnet", "bleep-k50", "cmrcnet-k500", "cmrcnet-none-k50", "extra"]  # "extra": scored, no label row
BT_CONFIG = {
    "evaluation": {"k": [500, 50, 250], "undefined_r": "omit", "hest_bench_genes": 12, "top_genes": [50, 150]},
    "datasets": {"SKCM": {"marker_genes": ["G1"]}, "COAD": {"marker_genes": []}},  # config order: SKCM first
    "methods": {**CONFIG["methods"], "ctp": {"model": "foundation", "paper_name": "cTransPath", "params": {}}},
}
NOTE_OMIT = ("mean ± sd over folds; in brackets the paper's value and our difference; an undefined r (constant truth "
             "or prediction) is left out of the means (`undefined_r: omit`)")
NOTE_ZERO = ("mean ± sd over folds; in brackets the paper's value and our difference; an undefined r (constant truth "
             "or prediction) counts as 0, as in the authors' evaluation")


def bt_r(gene, fold, dataset, base, i):
    """A label's r: its base, +0.02 per gene index, -0.01 in fold 1, +0.005 on COAD, and a small term that differs
    by label (its position i), gene and fold, so that no two paired differences tie (scipy's Wilcoxon is slow on
    ties)."""
    g = int(gene[1:])
    return base + 0.02 * g - 0.01 * fold + (0.005 if dataset == "COAD" else 0.0) + i * (1e-4 * (g + 1) + 3e-5 * fold)


def bt_inputs(labels=BT_LABELS, hest=BT_HEST, datasets=("COAD", "SKCM")):
    """(scores, gene_sets, label_rows) as evaluate_dataset returns them: two folds (one test sample each) per
    dataset; in fold 0 of SKCM, stnet has an undefined r for G3 and bleep-k50 for G11 (its best gene when left out,
    not when counted as 0)."""
    scores, sets = [], []
    for (protocol, dataset), gene_sets in BT_SETS.items():
        if dataset not in datasets:
            continue
        for fold, sample in enumerate((f"{dataset}-a", f"{dataset}-b")):
            for gs, genes in gene_sets.items():
                sets += [{"protocol": protocol, "dataset": dataset, "fold": fold, "sample": sample, "gene_set": gs,
                          "gene": g} for g in genes]
            scored = labels if protocol == "paper" else hest
            for label in scored:
                for g in BT_GENES:
                    undefined = (dataset, label, fold, g) in (("SKCM", "stnet", 0, "G3"), ("SKCM", "bleep-k50", 0, "G11"))
                    base, i = (labels[label][2], list(labels).index(label)) if label in labels else (0.05, 20)
                    r = math.nan if undefined else bt_r(g, fold, dataset, base, i)
                    scores.append({"protocol": protocol, "dataset": dataset, "method": label, "fold": fold,
                                   "sample": sample, "gene": g, "r": r,
                                   "nan_reason": "constant prediction" if undefined else "", "mean_expr": 1.0,
                                   "var_expr": 1.0})
    label_rows = pd.DataFrame([{"label": lab, "method": m, "layer": layer, "fold": f}
                               for f in (0, 1) for lab, (m, layer, _) in labels.items()])
    return pd.DataFrame(scores), pd.DataFrame(sets), label_rows


def hand_mean(label, genes, fold, dataset, labels=BT_LABELS):
    """The mean r over `genes` of one label in one fold (one test sample per fold), from bt_r directly."""
    base, i = labels[label][2], list(labels).index(label)
    return sum(bt_r(g, fold, dataset, base, i) for g in genes) / len(genes)


def in_hand_order(table, order, undefined_r):
    """`table` with its rows in the given (dataset, method) order, and the rule column build_tables adds."""
    keys = ["dataset", "method"] if "dataset" in table.columns else ["method"]
    lookup = {tuple(row): i for i, row in enumerate(table[keys].itertuples(index=False))}
    assert len(order) == len(lookup) and set(order) == set(lookup)
    return table.iloc[[lookup[key] for key in order]].reset_index(drop=True).assign(undefined_r=undefined_r)


def test_build_tables_puts_each_table_in_config_order_with_its_title_note_and_rule(caplog):
    """build_tables on hand-made scores: the summary it builds on (hand-checked means, its bootstrap seed and
    size), which labels enter the Wilcoxon tests and Table 3 (the paper's comparison, no ablation), the k each
    table is built at, the rows in config order (datasets, then methods, then k, then TTA), every title and note,
    and the undefined-r rule everywhere."""
    from cmrcnet.evaluation.stats import best_genes, count_nan, summarise, wilcoxon_between_methods
    from cmrcnet.evaluation.tables import build_tables, hest_bench_table, table4

    scores, sets, label_rows = bt_inputs()
    with caplog.at_level("WARNING", logger="cmrcnet"):
        paper_tables, plain = build_tables(scores, sets, label_rows, BT_CONFIG, n_boot=30, seed=7)

    summary = summarise(scores, sets, n_boot=30, seed=7, undefined_r="omit")
    pd.testing.assert_frame_equal(plain["summary"], summary)
    # by hand: SKCM stnet HEG50 (G0..G4), G3 left out of fold 0 (omit)
    row = plain["summary"].set_index(["protocol", "dataset", "method", "gene_set"]).loc[
        ("paper", "SKCM", "stnet", "HEG50")]
    folds = [hand_mean("stnet", ["G0", "G1", "G2", "G4"], 0, "SKCM"), hand_mean("stnet", BT_GENES[:5], 1, "SKCM")]
    assert row["mean_r"] == pytest.approx(sum(folds) / 2)
    assert row["sd_r"] == pytest.approx(abs(folds[0] - folds[1]) / math.sqrt(2))
    assert row["n_nan"] == 1

    labels = label_info(BT_CONFIG, label_rows.to_dict("records"))
    pd.testing.assert_frame_equal(plain["labels"], labels)
    main = ["stnet-tta", "cmrcnet-k500", "ctp", "bleep-k500", "stnet", "cmrcnet-k50", "bleep-k50", "cmrcnet-k250"]
    main_scores = scores[scores["method"].isin(main)]
    wilcoxon = wilcoxon_between_methods(main_scores, sets, gene_set=["HEG50", "HVG50", "marker", "hest6", "hest12"],
                                        undefined_r="omit").assign(undefined_r="omit")
    assert {"paper", "hest-bench"} == set(wilcoxon["protocol"])
    pd.testing.assert_frame_equal(plain["wilcoxon"], wilcoxon)
    best = best_genes(main_scores[main_scores["protocol"] == "paper"], n=5, undefined_r="omit").assign(undefined_r="omit")
    assert best.groupby(["dataset", "method"]).size().eq(5).all() and len(best) == 2 * len(main) * 5
    assert best.set_index(["dataset", "method", "rank"]).loc[("SKCM", "bleep-k50", 1), "gene"] == "G11"
    pd.testing.assert_frame_equal(plain["table3_best_genes"], best)
    pd.testing.assert_frame_equal(plain["nan_counts"], count_nan(scores))
    assert list(plain) == ["summary", "wilcoxon", "table3_best_genes", "nan_counts", "labels"]

    by_config = ["stnet", "stnet-tta", "bleep-k50", "bleep-k500", "cmrcnet-k50", "cmrcnet-k250", "cmrcnet-k500", "ctp"]
    t1_rows = [(d, m) for d in ("SKCM", "COAD") for m in by_config if m != "cmrcnet-k250"]
    t2_rows = [(d, m) for d in ("SKCM", "COAD") for m in by_config]
    t4_rows = [(d, m) for d in ("SKCM", "COAD") for m in ("cmrcnet-k500", "ctp")]
    t5_rows = [("cmrcnet-k50",), ("cmrcnet-none-k50",), ("cmrcnet-mask03-k50",)]
    hest_rows = [(d, m) for d in ("SKCM", "COAD") for m in BT_HEST]
    expected = {
        "table1_top50": (in_hand_order(table1(summary, labels, [50, 250, 500]), t1_rows, "omit"), MAIN,
                         "Table 1: top-50 HEG, HVG and marker genes",
                         f'{NOTE_OMIT}. Retrieval methods at k = 50 and 500. "-": marker not computed: COAD lists no '
                         'marker_genes.'),
        "table2_extended": (in_hand_order(table2(summary, labels), t2_rows, "omit"), EXTENDED,
                            "Table 2: top-150 and top-250 HEG and HVG",
                            f'{NOTE_OMIT}. The paper pairs top-150 with k = 250 and top-250 with k = 500. "-": HEG250 '
                            'not computed: evaluation.top_genes has no 250; HVG250 not computed: evaluation.top_genes '
                            'has no 250.'),
        "table4_foundation": (in_hand_order(table4(summary, labels, 500), t4_rows, "omit"), ["HEG50", "HVG50"],
                              "Table 4: frozen foundation model vs CMRCNet (k = 500)",
                              f"{NOTE_OMIT}. Empty until the config has a method with `model: foundation` or "
                              "`model: probe`."),
        "table5_ablation": (in_hand_order(table5(summary, labels, 50), t5_rows, "omit"), MAIN,
                            "Table 5: CMRCNet ablation (k = 50, mean over datasets)",
                            f'{NOTE_OMIT}. "-": marker not computed: COAD lists no marker_genes.'),
        "hest_bench": (in_hand_order(hest_bench_table(summary, labels), hest_rows, "omit"), ["hest6", "hest12"],
                       "HEST-bench: 6 / 12 fixed genes",
                       f"{HEST_GENES_NOTE}; no paper values exist for this protocol; an "
                       "undefined r (constant truth or prediction) is left out of the means (`undefined_r: omit`). "
                       "Fewer genes than evaluation.hest_bench_genes (12) qualify in some datasets; each set is named "
                       "by its real count (hest6)."),
    }
    assert list(paper_tables) == list(expected)
    for name, (table, gene_sets, title, note) in expected.items():
        got = paper_tables[name]
        assert (got[1], got[2], got[3]) == (gene_sets, title, note), name
        pd.testing.assert_frame_equal(got[0], table, obj=name)
    # Table 1 by hand: CMRCNet-500 and the foundation model on SKCM, HEG50 = G0..G4
    t1 = paper_tables["table1_top50"][0].set_index(["dataset", "method"])
    for label in ("cmrcnet-k500", "ctp"):
        want = (hand_mean(label, BT_GENES[:5], 0, "SKCM") + hand_mean(label, BT_GENES[:5], 1, "SKCM")) / 2
        assert t1.loc[("SKCM", label), "HEG50_mean"] == pytest.approx(want)
    assert t1.loc[("SKCM", "cmrcnet-k500"), "HEG50_paper"] == pytest.approx(0.3646)
    assert [r.getMessage() for r in caplog.records if r.name == "cmrcnet"] == [
        'tables: marker not computed: COAD lists no marker_genes; those columns show "-"',
        'tables: HEG250 not computed: evaluation.top_genes has no 250; HVG250 not computed: evaluation.top_genes has '
        'no 250; those columns show "-"']


def test_build_tables_defaults_ablation_k_without_50_and_no_hest_bench():
    """Without k = 50 the ablation table is at the smallest k; without evaluation.undefined_r the rule is `zero`
    (and the summary's bootstrap 1000 draws, seed 0); without HEST-bench scores its table is empty and named after
    evaluation.hest_bench_genes (default 50); without a foundation method Table 4 is empty."""
    from cmrcnet.evaluation.stats import summarise
    from cmrcnet.evaluation.tables import build_tables

    labels = {"cmrcnet-none-k100": ("cmrcnet-none", "k100", 0.2), "cmrcnet-k20": ("cmrcnet", "k20", 0.3),
              "cmrcnet-k100": ("cmrcnet", "k100", 0.25), "cmrcnet-none-k20": ("cmrcnet-none", "k20", 0.1),
              "stnet": ("stnet", "pred", 0.15)}
    scores, sets, label_rows = bt_inputs(labels, hest=[], datasets=("SKCM",))
    scores = scores[scores["protocol"] == "paper"]
    sets = sets[sets["protocol"] == "paper"]
    config = {"evaluation": {"k": [100, 20], "top_genes": [50, 150, 250]}, "methods": CONFIG["methods"]}

    paper_tables, plain = build_tables(scores, sets, label_rows, config)

    pd.testing.assert_frame_equal(plain["summary"], summarise(scores, sets, n_boot=1000, seed=0, undefined_r="zero"))
    t5, gene_sets, title, note = paper_tables["table5_ablation"]
    assert title == "Table 5: CMRCNet ablation (k = 20, mean over datasets)" and note == NOTE_ZERO
    assert t5["method"].tolist() == ["cmrcnet-k20", "cmrcnet-none-k20"]
    assert t5["undefined_r"].tolist() == ["zero", "zero"]
    # zero: stnet's undefined G3 counts as 0 in fold 0 of HEG50 (G0..G4)
    t1, _, _, note1 = paper_tables["table1_top50"]
    assert t1["method"].tolist() == ["stnet", "cmrcnet-k20", "cmrcnet-k100"]
    stnet = t1.set_index("method").loc["stnet"]
    four = hand_mean("stnet", ["G0", "G1", "G2", "G4"], 0, "SKCM", labels) * 4
    assert stnet["HEG50_mean"] == pytest.approx((four / 5 + hand_mean("stnet", BT_GENES[:5], 1, "SKCM", labels)) / 2)
    assert note1 == f"{NOTE_ZERO}. Retrieval methods at k = 20 and 100."
    assert paper_tables["table2_extended"][3] == (
        f'{NOTE_ZERO}. The paper pairs top-150 with k = 250 and top-250 with k = 500. "-": HEG250 not computed for '
        'SKCM; HVG250 not computed for SKCM.')
    assert paper_tables["table4_foundation"][0].empty
    assert paper_tables["table4_foundation"][2] == "Table 4: frozen foundation model vs CMRCNet (k = 100)"
    hest, hest_sets, hest_title, hest_note = paper_tables["hest_bench"]
    assert hest.empty and hest_sets == ["hest50"] and hest_title == "HEST-bench: 50 fixed genes"
    assert hest_note == (f"{HEST_GENES_NOTE}; no paper values exist for this protocol; an "
                         "undefined r (constant truth or prediction) counts as 0, as in the authors' evaluation.")
    assert set(plain["wilcoxon"]["method_a"]) | set(plain["wilcoxon"]["method_b"]) == {"stnet", "cmrcnet-k20",
                                                                                        "cmrcnet-k100"}
    assert set(plain["table3_best_genes"]["undefined_r"]) == {"zero"}


def test_build_tables_puts_the_ablation_at_k50_even_when_a_smaller_k_is_evaluated():
    """The ablation (Table 5) is at k = 50 whenever 50 is evaluated, not at the smallest k (20 here)."""
    from cmrcnet.evaluation.tables import build_tables

    labels = {"cmrcnet-k20": ("cmrcnet", "k20", 0.3), "cmrcnet-k50": ("cmrcnet", "k50", 0.32),
              "cmrcnet-none-k20": ("cmrcnet-none", "k20", 0.1), "cmrcnet-none-k50": ("cmrcnet-none", "k50", 0.2)}
    scores, sets, label_rows = bt_inputs(labels, hest=[], datasets=("SKCM",))
    config = {"evaluation": {"k": [20, 50], "top_genes": [50, 150]}, "methods": CONFIG["methods"]}

    paper_tables, _ = build_tables(scores[scores["protocol"] == "paper"], sets[sets["protocol"] == "paper"],
                                   label_rows, config, n_boot=10)

    t5, _, title, _ = paper_tables["table5_ablation"]
    assert title == "Table 5: CMRCNet ablation (k = 50, mean over datasets)"
    assert t5["method"].tolist() == ["cmrcnet-k50", "cmrcnet-none-k50"]


def test_build_tables_notes_name_every_short_hest_set_and_table4_says_why_a_column_is_missing():
    """Two HEST-bench sets short of evaluation.hest_bench_genes are both named, comma-separated; a top-50 set a
    dataset lacks is explained in Table 4's note too, not only in Table 1's."""
    from cmrcnet.evaluation.tables import build_tables

    scores, sets, label_rows = bt_inputs()
    sets = sets[~((sets["dataset"] == "COAD") & (sets["gene_set"] == "HVG50"))]
    config = {**BT_CONFIG, "evaluation": {**BT_CONFIG["evaluation"], "hest_bench_genes": 20}}

    paper_tables, _ = build_tables(scores, sets, label_rows, config, n_boot=10)

    assert paper_tables["hest_bench"][3].endswith(
        "Fewer genes than evaluation.hest_bench_genes (20) qualify in some datasets; each set is named by its real "
        "count (hest6, hest12).")
    assert paper_tables["table4_foundation"][3] == (
        f'{NOTE_OMIT}. Empty until the config has a method with `model: foundation` or `model: probe`. "-": HVG50 '
        'not computed for COAD.')


def test_build_tables_with_only_ablations_scored_gives_an_empty_table3_with_its_columns():
    """No non-ablation method scored: Table 3 (and so its CSV) is empty but keeps its header."""
    from cmrcnet.evaluation.stats import BEST_COLUMNS
    from cmrcnet.evaluation.tables import build_tables

    labels = {"cmrcnet-none-k50": ("cmrcnet-none", "k50", 0.2), "cmrcnet-mask03-k50": ("cmrcnet-mask03", "k50", 0.3)}
    scores, sets, label_rows = bt_inputs(labels, hest=[], datasets=("SKCM",))
    config = {"evaluation": {"k": [50], "top_genes": [50, 150]}, "methods": CONFIG["methods"]}

    paper_tables, plain = build_tables(scores[scores["protocol"] == "paper"], sets[sets["protocol"] == "paper"],
                                       label_rows, config, n_boot=10)

    best = plain["table3_best_genes"]
    assert best.empty and best.columns.tolist() == BEST_COLUMNS + ["undefined_r"]
    assert paper_tables["table5_ablation"][0]["method"].tolist() == ["cmrcnet-none-k50", "cmrcnet-mask03-k50"]
