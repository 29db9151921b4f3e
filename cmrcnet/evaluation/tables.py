"""The paper's tables from our summaries, with the paper's number and the difference beside ours.

Inputs are two frames: `summary` (one row per protocol x dataset x method label x gene set: mean_r, sd_r,
ci_low, ci_high, n_folds, n_nan, ...) and `labels` (one row per method label: method, model, k, paper_name,
ablation and the CMRCNet switches). Each table is written as CSV (numbers) and Markdown (mean +- sd), and says how
an undefined r entered its means (column `undefined_r`, and the Markdown note).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import pandas as pd

from cmrcnet.io import atomic_path, write_table

log = logging.getLogger("cmrcnet")

CMRCNET_DEFAULTS = {"recon_loss": "mse", "mask_rate": 0.5, "recon_target": "image"}


def paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables, shipped with the package (cmrcnet/paper_data)."""
    with resources.files("cmrcnet").joinpath("paper_data", f"{name}.csv").open() as f:
        return pd.read_csv(f)


def label_info(config: dict, label_rows: list[dict]) -> pd.DataFrame:
    """Method labels (`cmrcnet-k50`, `stnet-tta`) joined to their config entry: model, paper name, ablation
    switches. `label_rows` hold label, method, layer (k50 / pred / tta) as the predictions record them."""
    rows = []
    for row in label_rows:
        method = config["methods"][row["method"]]
        layer = row["layer"]
        params = {**CMRCNET_DEFAULTS, **method["params"]} if method["model"] == "cmrcnet" else {}
        rows.append({
            "label": row["label"], "method": row["method"], "model": method["model"], "layer": layer,
            "k": int(layer[1:]) if layer.startswith("k") else None, "tta": layer == "tta",
            "paper_name": method.get("paper_name"), "ablation": bool(method.get("ablation")),
            "recon_loss": params.get("recon_loss"), "mask_rate": params.get("mask_rate"),
            "recon_target": params.get("recon_target"),
        })
    return pd.DataFrame(rows).drop_duplicates("label").reset_index(drop=True)


def _paper_lookup(paper: pd.DataFrame, dataset: str, names: list[str], column: str) -> float:
    for name in names:
        hit = paper[(paper["dataset"] == dataset) & (paper["model"] == name)]
        if len(hit):
            return float(hit.iloc[0][column])
    return math.nan


def _wide(summary: pd.DataFrame, labels: pd.DataFrame, gene_sets: list[str]) -> pd.DataFrame:
    """One row per dataset x label, mean/sd/ci columns per gene set."""
    part = summary[summary["gene_set"].isin(gene_sets)]
    rows = []
    for (dataset, label), grp in part.groupby(["dataset", "method"], sort=False):
        row = {"dataset": dataset, "method": label}
        for _, r in grp.iterrows():
            gs = r["gene_set"]
            row.update({f"{gs}_mean": r["mean_r"], f"{gs}_sd": r["sd_r"], f"{gs}_ci_low": r["ci_low"],
                        f"{gs}_ci_high": r["ci_high"], f"{gs}_n_nan": r["n_nan"]})
        rows.append(row)
    wide = pd.DataFrame(rows)
    if wide.empty:
        return wide
    for gs in gene_sets:  # a set no dataset has (e.g. no marker genes anywhere) is a column of NaN
        for part in ("mean", "sd", "ci_low", "ci_high", "n_nan"):
            if f"{gs}_{part}" not in wide.columns:
                wide[f"{gs}_{part}"] = math.nan
    return wide.merge(labels.rename(columns={"label": "method", "method": "config_method"}), on="method", how="left")


def table1(summary: pd.DataFrame, labels: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Top-50 HEG / HVG / marker genes, paper protocol; retrieval methods at the smallest and largest k."""
    sets = ["HEG50", "HVG50", "marker"]
    wide = _wide(summary[summary["protocol"] == "paper"], labels, sets)
    if wide.empty:
        return wide
    keep = wide["k"].isna() | wide["k"].isin([min(ks), max(ks)])
    wide = wide[keep & ~wide["ablation"].astype(bool)].copy()
    paper = paper_table("table1_top50")
    for gs, column in zip(sets, ["HEG", "HVG", "marker"]):
        wide[f"{gs}_paper"] = [
            _paper_lookup(paper, r.dataset, _paper_names(r), column) for r in wide.itertuples()]
        wide[f"{gs}_diff"] = wide[f"{gs}_mean"] - wide[f"{gs}_paper"]
    return _order(wide, sets)


def table2(summary: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Top-150 and top-250 HEG / HVG; the paper pairs top-150 with k = 250 and top-250 with k = 500."""
    sets = ["HEG150", "HVG150", "HEG250", "HVG250"]
    wide = _wide(summary[summary["protocol"] == "paper"], labels, sets)
    if wide.empty:
        return wide
    wide = wide[~wide["ablation"].astype(bool)].copy()
    paper = paper_table("table2_extended")
    paper_k = {"HEG150": 250, "HVG150": 250, "HEG250": 500, "HVG250": 500}
    for gs in sets:
        column = f"{gs[:3]}_top{gs[3:]}"
        values = []
        for r in wide.itertuples():
            same_k = pd.isna(r.k) or int(r.k) == paper_k[gs]
            names = [r.paper_name] if r.paper_name and same_k else []
            values.append(_paper_lookup(paper, r.dataset, names, column))
        wide[f"{gs}_paper"] = values
        wide[f"{gs}_diff"] = wide[f"{gs}_mean"] - wide[f"{gs}_paper"]
    return _order(wide, sets)


def table4(summary: pd.DataFrame, labels: pd.DataFrame, k: int) -> pd.DataFrame:
    """Frozen foundation models (model `foundation`, or a `probe` on an encoder's cached embeddings; a retrieval
    probe at k neighbours) vs CMRCNet at k neighbours (the paper: cTransPath vs CMRCNet-500), top-50 HEG and HVG.
    Empty when the config has no such method."""
    sets = ["HEG50", "HVG50"]
    wide = _wide(summary[summary["protocol"] == "paper"], labels, sets)
    frozen_models = ["foundation", "probe"]
    if wide.empty or not wide["model"].isin(frozen_models).any():
        return pd.DataFrame()
    foundation = wide["model"].isin(frozen_models) & ~wide["tta"].astype(bool) & (wide["k"].isna() | (wide["k"] == k))
    cmrcnet = (wide["model"] == "cmrcnet") & (wide["k"] == k) & ~wide["ablation"].astype(bool)
    wide = wide[foundation | cmrcnet].copy()
    paper = paper_table("table4_foundation")
    for gs, column in zip(sets, ["HEG", "HVG"]):
        wide[f"{gs}_paper"] = [
            _paper_lookup(paper, r.dataset, _paper_names(r), column) for r in wide.itertuples()]
        wide[f"{gs}_diff"] = wide[f"{gs}_mean"] - wide[f"{gs}_paper"]
    return _order(wide, sets)


def table5(summary: pd.DataFrame, labels: pd.DataFrame, k: int) -> pd.DataFrame:
    """CMRCNet's ablation grid at k neighbours, averaged over datasets (as the paper's Table 5)."""
    sets = ["HEG50", "HVG50", "marker"]
    wide = _wide(summary[summary["protocol"] == "paper"], labels, sets)
    if wide.empty:
        return wide
    wide = wide[(wide["model"] == "cmrcnet") & (wide["k"] == k)]
    rows = []
    for label, grp in wide.groupby("method", sort=False):
        first = grp.iloc[0]
        row = {"method": label, "recon_loss": first["recon_loss"],
               "mask_rate": None if first["recon_loss"] == "none" else first["mask_rate"],
               "recon_target": None if first["recon_loss"] == "none" else first["recon_target"],
               "n_datasets": grp["dataset"].nunique()}
        for gs in sets:
            row[f"{gs}_mean"] = grp[f"{gs}_mean"].mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    paper = paper_table("table5_ablation")
    for gs, column in zip(sets, ["HEG", "HVG", "marker"]):
        values = []
        for r in out.itertuples():
            if r.recon_loss == "none":
                hit = paper[paper["recon_loss"] == "none"]
            else:
                hit = paper[(paper["recon_loss"] == r.recon_loss) & (paper["mask_rate"].astype(float) == float(r.mask_rate))
                            & (paper["recon_target"] == r.recon_target)]
            values.append(float(hit.iloc[0][column]) if len(hit) else math.nan)
        out[f"{gs}_paper"] = values
        out[f"{gs}_diff"] = out[f"{gs}_mean"] - out[f"{gs}_paper"]
    return out


def hest_bench_table(summary: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """HEST-bench protocol: Pearson r on each fold's concatenated test split, 50 fixed genes."""
    part = summary[summary["protocol"] == "hest-bench"]
    gene_sets = sorted(part["gene_set"].unique())
    wide = _wide(part, labels, gene_sets)
    return wide if wide.empty else _order(wide, gene_sets)


def _paper_names(row) -> list[str]:
    if not row.paper_name:
        return []
    if pd.isna(row.k):
        return [row.paper_name]
    names = [f"{row.paper_name}-{int(row.k)}"]
    if int(row.k) == 50:  # the paper's BLEEP row uses BLEEP's default k = 50
        names.append(row.paper_name)
    return names


def _order(wide: pd.DataFrame, sets: list[str]) -> pd.DataFrame:
    lead = ["dataset", "method", "k"]
    numbers = [c for gs in sets for c in wide.columns if c.startswith(f"{gs}_")]
    return wide[lead + numbers].reset_index(drop=True)


def _cell(mean, sd=None, paper=None) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None and not pd.isna(sd) else "")
    if paper is not None and not pd.isna(paper):
        text += f" (paper {paper:.3f}, {mean - paper:+.3f})"
    return text


def to_markdown(table: pd.DataFrame, sets: list[str], title: str, note: str = "") -> str:
    """mean ± sd over folds (paper value, difference) per gene set; one row per dataset x method."""
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    if table.empty:
        return "\n".join(lines + ["(no results)", ""])
    keys = [c for c in ("dataset", "method", "recon_loss", "mask_rate", "recon_target") if c in table.columns]
    lines.append("| " + " | ".join(keys + sets) + " |")
    lines.append("|" + "---|" * (len(keys) + len(sets)))
    for _, row in table.iterrows():
        cells = ["-" if pd.isna(row[k]) else str(row[k]) for k in keys]
        cells += [_cell(row.get(f"{gs}_mean"), row.get(f"{gs}_sd"), row.get(f"{gs}_paper")) for gs in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out_dir: str | Path, tables: dict[str, tuple[pd.DataFrame, list[str], str, str]]) -> list[Path]:
    """Write each table as `{name}.csv` and `{name}.md` (atomically)."""
    out_dir = Path(out_dir)
    written = []
    for name, (table, sets, title, note) in tables.items():
        write_table(out_dir / f"{name}.csv", table)
        with atomic_path(out_dir / f"{name}.md") as tmp:
            tmp.write_text(to_markdown(table, sets, title, note))
        written += [out_dir / f"{name}.csv", out_dir / f"{name}.md"]
    return written


# Every table written as CSV + Markdown (the tables rule lists these as outputs)
MARKDOWN_TABLES = ("table1_top50", "table2_extended", "table3_best_genes", "table4_foundation", "table5_ablation",
                   "hest_bench")
MAIN_SETS = ["HEG50", "HVG50", "marker"]
EXTENDED_SETS = ["HEG150", "HVG150", "HEG250", "HVG250"]


def main_labels(labels: pd.DataFrame) -> list[str]:
    """Labels of the paper's comparison (Tables 1-3, Wilcoxon tests): every non-ablation method."""
    return labels.loc[~labels["ablation"].astype(bool), "label"].tolist()


def best_genes_markdown(best: pd.DataFrame) -> str:
    """Table 3 as Markdown: per dataset and method, its best genes with their mean r."""
    lines = ["# Table 3: best-predicted genes (paper protocol, mean r over folds)", ""]
    if best.empty:
        return "\n".join(lines + ["(no results)", ""])
    lines += ["| dataset | method | genes |", "|---|---|---|"]
    for (dataset, method), grp in best.groupby(["dataset", "method"], sort=False):
        genes = ", ".join(f"{g} ({r:.3f})" for g, r in zip(grp["gene"], grp["mean_r"]))
        lines.append(f"| {dataset} | {method} | {genes} |")
    return "\n".join(lines) + "\n"


UNDEFINED_R_NOTES = {
    "zero": "an undefined r (constant truth or prediction) counts as 0, as in the authors' evaluation",
    "omit": "an undefined r (constant truth or prediction) is left out of the means (`undefined_r: omit`)",
}


def gene_counts(genes_tsvs: Mapping[str, str | Path], config: dict) -> list[dict]:
    """Per dataset: the number of genes selected (its genes.tsv) beside the paper's count (`paper_n_genes`),
    with the settings that decide it; for the tables' provenance.json."""
    from cmrcnet.data.genes import read_gene_table

    rows = []
    for dataset, path in genes_tsvs.items():
        ds = config["datasets"][dataset]
        n, paper = len(read_gene_table(path)), ds.get("paper_n_genes")
        rows.append({"dataset": dataset, "n_genes": n, "paper_n_genes": paper,
                     "difference": None if paper is None else n - paper, "gene_selection": ds.get("gene_selection"),
                     "panel_controls": ds.get("panel_controls"), "spots": ds.get("spots")})
    return rows


def missing_sets_note(summary: pd.DataFrame, sets: list[str], config: dict) -> str:
    """Why a table's gene-set column shows "-": one clause per paper-protocol set a scored dataset lacks, e.g.
    "HEG50 not computed: evaluation.top_genes has no 50". Empty when every set was computed."""
    datasets = list(dict.fromkeys(summary["dataset"].astype(str))) if not summary.empty else []
    paper = summary[summary["protocol"] == "paper"] if not summary.empty else summary
    have = {(str(d), str(g)) for d, g in zip(paper.get("dataset", []), paper.get("gene_set", []))}
    sizes = {int(n) for n in config.get("evaluation", {}).get("top_genes", [])}
    if datasets and "paper" not in config.get("evaluation", {}).get("protocols", ["paper"]):
        return "the paper protocol is not in evaluation.protocols"
    clauses = []
    for gs in sets:
        lacking = [d for d in datasets if (d, gs) not in have]
        if not lacking:
            continue
        if gs == "marker":
            reasons = []
            for d in lacking:
                markers = (config.get("datasets", {}).get(d) or {}).get("marker_genes") or []
                reasons.append(f"{d} lists no marker_genes" if not markers else
                               f"none of {d}'s marker genes ({', '.join(markers)}) is measured")
            clauses.append(f"marker not computed: {'; '.join(reasons)}")
        elif gs[:3] in ("HEG", "HVG") and gs[3:].isdigit() and int(gs[3:]) not in sizes:
            clauses.append(f"{gs} not computed: evaluation.top_genes has no {gs[3:]}")
        else:
            clauses.append(f"{gs} not computed for {', '.join(lacking)}")
    return "; ".join(clauses)


def _with_reasons(note: str, why: str) -> str:
    """A table note followed by the reasons for its "-" columns, if any."""
    if not why:
        return note
    return f"{note.rstrip('.')}. \"-\": {why}."


def build_tables(scores: pd.DataFrame, gene_sets: pd.DataFrame, label_rows: pd.DataFrame, config: dict, *,
                 n_boot: int = 1000, seed: int = 0) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Every results table from the concatenated scores of all datasets.

    Returns (paper_tables, plain): paper_tables maps a name to (table, gene sets, title, note) for
    `write_tables`; plain maps a name to a frame written as CSV only (summary, Wilcoxon tests, NaN counts).
    An undefined r enters every mean as `evaluation.undefined_r` says (default `zero`, the authors' rule);
    each table carries that rule in a column `undefined_r` and in its note.
    """
    from cmrcnet.evaluation.stats import best_genes, count_nan, summarise, wilcoxon_between_methods

    ks = sorted(int(k) for k in config["evaluation"]["k"])
    undefined_r = config["evaluation"].get("undefined_r", "zero")
    labels = label_info(config, label_rows.to_dict("records"))
    summary = summarise(scores, gene_sets, n_boot=n_boot, seed=seed, undefined_r=undefined_r)
    main = main_labels(labels)
    main_scores = scores[scores["method"].isin(main)]
    hest_sets = sorted(set(summary.loc[summary["protocol"] == "hest-bench", "gene_set"].astype(str)),
                       key=lambda g: (len(g), g))  # hest{n}: n = the genes that qualified, per dataset
    wilcoxon = wilcoxon_between_methods(main_scores, gene_sets, gene_set=MAIN_SETS + hest_sets,
                                        undefined_r=undefined_r).assign(undefined_r=undefined_r)
    # with no non-ablation method scored, Table 3 is empty but keeps its columns (a CSV with its header)
    best = best_genes(main_scores[main_scores["protocol"] == "paper"], n=5,
                      undefined_r=undefined_r).assign(undefined_r=undefined_r)
    ablation_k = 50 if 50 in ks else ks[0]
    note = f"mean ± sd over folds; in brackets the paper's value and our difference; {UNDEFINED_R_NOTES[undefined_r]}"
    dataset_rank = {d: i for i, d in enumerate(config.get("datasets", {}))}
    method_rank = {m: i for i, m in enumerate(config["methods"])}
    ordered = labels.assign(_m=labels["method"].map(method_rank), _k=pd.to_numeric(labels["k"]).fillna(-1),
                            _t=labels["tta"].astype(int)).sort_values(["_m", "_k", "_t"], kind="stable")
    label_rank = {label: i for i, label in enumerate(ordered["label"])}  # config order of methods, then k

    def in_order(table: pd.DataFrame) -> pd.DataFrame:
        if table.empty:
            return table
        key = table["method"].map(label_rank).fillna(len(label_rank))
        if "dataset" in table.columns:
            key = table["dataset"].map(dataset_rank).fillna(len(dataset_rank)) * (len(label_rank) + 1) + key
        return table.iloc[key.argsort(kind="stable")].reset_index(drop=True).assign(undefined_r=undefined_r)

    why = {name: missing_sets_note(summary, sets, config) for name, sets in
           (("main", MAIN_SETS), ("extended", EXTENDED_SETS), ("top50", ["HEG50", "HVG50"]))}
    for text in dict.fromkeys(v for v in why.values() if v):
        log.warning("tables: %s; those columns show \"-\"", text)
    n_bench = config["evaluation"].get("hest_bench_genes", 50)
    hest_columns = hest_sets or [f"hest{n_bench}"]
    fewer = [g for g in hest_sets if g[4:].isdigit() and int(g[4:]) < n_bench]
    hest_note = (f" Fewer genes than evaluation.hest_bench_genes ({n_bench}) qualify in some datasets; each set is "
                 f"named by its real count ({', '.join(fewer)})." if fewer else "")
    paper_tables = {
        "table1_top50": (in_order(table1(summary, labels, ks)), MAIN_SETS, "Table 1: top-50 HEG, HVG and marker genes",
                         _with_reasons(f"{note}. Retrieval methods at k = {min(ks)} and {max(ks)}.", why["main"])),
        "table2_extended": (in_order(table2(summary, labels)), EXTENDED_SETS, "Table 2: top-150 and top-250 HEG and HVG",
                            _with_reasons(f"{note}. The paper pairs top-150 with k = 250 and top-250 with k = 500.",
                                          why["extended"])),
        "table4_foundation": (in_order(table4(summary, labels, max(ks))), ["HEG50", "HVG50"],
                              f"Table 4: frozen foundation model vs CMRCNet (k = {max(ks)})",
                              _with_reasons(f"{note}. Empty until the config has a method with `model: foundation` "
                                            "or `model: probe`.", why["top50"])),
        "table5_ablation": (in_order(table5(summary, labels, ablation_k)), MAIN_SETS,
                            f"Table 5: CMRCNet ablation (k = {ablation_k}, mean over datasets)",
                            _with_reasons(note, why["main"])),
        "hest_bench": (in_order(hest_bench_table(summary, labels)), hest_columns,
                       f"HEST-bench: {' / '.join(g[4:] for g in hest_columns)} fixed genes",
                       "Pearson r over each fold's whole test split; gene list derived from each dataset (the "
                       "highest-variance genes every sample expresses, evaluation.hest_bench_genes), not the "
                       "benchmark's published lists, which config/hestbench.yaml uses on the benchmark's own tasks; "
                       f"no paper values exist for this protocol; {UNDEFINED_R_NOTES[undefined_r]}.{hest_note}"),
    }
    plain = {"summary": summary, "wilcoxon": wilcoxon, "table3_best_genes": best, "nan_counts": count_nan(scores),
             "labels": labels}
    return paper_tables, plain


def figure_labels(label_rows: pd.DataFrame, config: dict) -> list[str]:
    """The labels a dataset's figures show: each non-ablation method once, retrieval at the smallest k and
    regression without test-time augmentation, in config order."""
    k = min(int(x) for x in config["evaluation"]["k"])
    rows = label_rows.drop_duplicates("label")
    keep = rows["layer"].isin(["pred", f"k{k}"]) & rows["method"].map(
        lambda m: not config["methods"][m].get("ablation", False))
    order = {m: i for i, m in enumerate(config["methods"])}
    chosen = rows[keep].sort_values("method", key=lambda s: s.map(order))
    return chosen["label"].tolist()
