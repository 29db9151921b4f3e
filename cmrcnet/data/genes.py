"""Gene selection per dataset and normalisation per sample, as in the paper.

Visium: union of each sample's top highly variable genes (scanpy), chosen on in-tissue spots only; Xenium: the
panel, control probes dropped or kept (`panel_controls`). Normalisation uses the configured spot set (`spots`:
in-tissue or all) and, as the authors' preprocessing, normalises over all measured genes before keeping the
selected ones. Every processed sample carries the same genes in the same order.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.data.layout import in_tissue_mask, read_st, spot_mask
from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, write_table

log = logging.getLogger("cmrcnet")


def is_control_probe(gene: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, gene) for p in patterns)


def _in_tissue(adata, path):
    mask = in_tissue_mask(adata)
    if not mask.any():
        raise input_error(path, "no in-tissue spots (obs['in_tissue'] is 0 everywhere)")
    return adata[mask].copy()


def _spots(adata, path, spots: str):
    """The spot set a sample is normalised on: in-tissue spots, or every spot of the st file."""
    if spots == "in_tissue":
        return _in_tissue(adata, path)
    spot_mask(adata, spots)  # checks the name
    return adata


def _counts_are_raw(adata, path) -> None:
    """Normalising twice silently ruins every downstream number, so refuse non-count input."""
    X = adata.X
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = values[: 100_000]
    if sample.size and (np.any(sample < 0) or not np.allclose(sample, np.round(sample))):
        raise input_error(path, "X does not hold raw integer counts (negative or fractional values found)")


def _total_counts(adata) -> float:
    X = adata.X
    return float(X.sum()) if sp.issparse(X) else float(np.asarray(X).sum())


def _has_counts(adata, path, what: str) -> None:
    """A sample whose counts are all zero has no expression to select genes by or learn from: stop at once,
    naming the file, rather than train on it and fail when scoring."""
    if _total_counts(adata) == 0:
        raise input_error(path, f"no counts: the {adata.n_obs} {what} x {adata.n_vars} genes are all zero "
                                "(an empty or failed sample?); remove it from the dataset's samples")


def sample_hvgs(adata, n_top: int, flavor: str, min_spots: int, where: str | Path = "sample") -> list[str]:
    """Top highly variable genes of one sample's in-tissue spots (log-normalised copy)."""
    import scanpy as sc

    ad = adata.copy()
    sc.pp.filter_genes(ad, min_cells=max(min_spots, 1))
    if ad.n_vars == 0:
        raise input_error(where, f"no gene is detected in at least {max(min_spots, 1)} in-tissue spots "
                                 f"(genes.min_spots) of its {adata.n_obs}; highly variable genes cannot be chosen")
    sc.pp.normalize_total(ad)
    sc.pp.log1p(ad)
    n_top = min(n_top, ad.n_vars)
    sc.pp.highly_variable_genes(ad, n_top_genes=n_top, flavor=flavor)
    hv = ad.var[ad.var["highly_variable"]]
    return list(hv.index)


def select_genes(
    st_files: Mapping[str, str | Path],
    out_tsv: str | Path,
    *,
    method: str,
    dataset: str,
    n_top_hvg: int = 1000,
    hvg_flavor: str = "seurat",
    min_spots: int = 1,
    control_probe_patterns: Iterable[str] = (),
    marker_genes: Iterable[str] = (),
    panel_controls: str = "drop",
    paper_n_genes: int | None = None,
) -> pd.DataFrame:
    """Choose the dataset's gene set and write it as a table (gene, source, n_samples_hvg, is_marker).

    Only genes measured in every sample count. HVGs are chosen on in-tissue spots whatever the `spots` setting
    (the paper's PSC note). `panel_controls`: drop the panel's probes matching `control_probe_patterns` or keep
    them (the paper keeps all 541 SKCM features). A count other than `paper_n_genes` is logged as a warning.
    """
    if panel_controls not in ("drop", "keep"):
        raise input_error("panel_controls", f"unknown value {panel_controls!r}; use drop or keep")
    if len(st_files) == 0:
        raise input_error(f"dataset {dataset}", "no samples to select genes from")
    if method == "hvg_union" and (isinstance(n_top_hvg, bool) or not isinstance(n_top_hvg, (int, np.integer))
                                  or n_top_hvg < 1):
        raise input_error("n_top_hvg", f"must be a whole number of genes of at least 1, got {n_top_hvg!r}")
    patterns = list(control_probe_patterns)
    shared: set[str] | None = None
    hvg_counts: dict[str, int] = {}
    for sample, path in st_files.items():
        adata = _in_tissue(read_st(path), path)
        _counts_are_raw(adata, path)
        _has_counts(adata, path, "in-tissue spots")
        genes = set(adata.var_names)
        shared = genes if shared is None else shared & genes
        if method == "hvg_union":
            hvgs = sample_hvgs(adata, n_top_hvg, hvg_flavor, min_spots, where=path)
            for gene in hvgs:
                hvg_counts[gene] = hvg_counts.get(gene, 0) + 1
            log.info("%s: %d highly variable genes", sample, len(hvgs))
    assert shared is not None
    if method == "hvg_union":
        chosen = {g for g in hvg_counts if g in shared}
        lost = len(hvg_counts) - len(chosen)
        if lost:
            log.warning("dataset %s: %d highly variable genes are not measured in every sample; left out", dataset, lost)
    elif method == "panel":
        controls = {g for g in shared if is_control_probe(g, patterns)}
        chosen = shared - controls if panel_controls == "drop" else set(shared)
        by_pattern = ", ".join(f"{p}: {sum(bool(re.search(p, g)) for g in controls)}" for p in patterns)
        log.info("dataset %s: panel of %d features measured in every sample, %d control probes %s (%s)", dataset,
                 len(shared), len(controls), "removed" if panel_controls == "drop" else "kept", by_pattern or "none")
    else:
        raise input_error("gene_selection", f"unknown method {method!r}; use hvg_union or panel")

    markers = []
    for gene in marker_genes:
        if gene in shared:
            markers.append(gene)
        else:
            log.warning("dataset %s: marker gene %s is not measured in every sample; left out", dataset, gene)
    chosen |= set(markers)
    if not chosen:
        raise input_error(f"dataset {dataset}", "gene selection left no genes")
    genes = sorted(chosen)
    table = pd.DataFrame(
        {
            "gene": genes,
            "source": ["marker" if g in markers and g not in hvg_counts and method == "hvg_union" else method
                       for g in genes],
            "n_samples_hvg": [hvg_counts.get(g, 0) for g in genes],
            "is_marker": [g in markers for g in genes],
        }
    )
    write_table(out_tsv, table)
    log.info("dataset %s: %d genes selected (%s), %d marker genes", dataset, len(genes), method, len(markers))
    if paper_n_genes is not None and len(genes) != paper_n_genes:
        log.warning("dataset %s: %d genes selected, the paper used %d (%+d)", dataset, len(genes), paper_n_genes,
                    len(genes) - paper_n_genes)
    return table


def read_gene_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "gene table not found")
    hint = "a tab-separated text file with a 'gene' column, as `cmrcnet select-genes` writes (genes.tsv)"
    try:
        table = pd.read_csv(path, sep="\t")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        kind = " (this is an .h5ad, not a gene table)" if path.suffix == ".h5ad" else ""
        raise input_error(path, f"not a gene table{kind}: expected {hint} ({type(exc).__name__})") from None
    if "gene" not in table.columns or table["gene"].isna().any() or not table["gene"].is_unique:
        raise input_error(path, "gene table needs a 'gene' column of unique names")
    return table


def normalise_sample(
    st_file: str | Path,
    genes_tsv: str | Path,
    out_h5ad: str | Path,
    *,
    sample: str,
    dataset: str,
    target_sum: float | None = None,
    spots: str = "in_tissue",
    provenance_info: dict | None = None,
):
    """The configured spots (`in_tissue` or `all`, in the st file's order), normalize_total + log1p over all
    measured genes, then the dataset's genes in its order; their raw counts in layers['counts'].

    Normalising before subsetting is the authors' preprocessing: each spot's size factor is its total over every
    measured gene, and `target_sum=None` is the median of those totals (over spots with any counts).
    """
    import scanpy as sc

    if target_sum is not None and (isinstance(target_sum, bool) or not np.isfinite(target_sum) or target_sum <= 0):
        raise input_error("normalise.target_sum", f"must be a positive number (or null for the median library "
                                                  f"size), got {target_sum!r}")
    genes = list(read_gene_table(genes_tsv)["gene"])
    adata = _spots(read_st(st_file), st_file, spots)
    _counts_are_raw(adata, st_file)
    _has_counts(adata, st_file, "in-tissue spots" if spots == "in_tissue" else "spots")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise input_error(st_file, f"{len(missing)} genes of {genes_tsv} are not measured here: {shown}")
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    counts = X[:, adata.var_names.get_indexer(genes)].astype(np.int32)
    adata.X = X.astype(np.float32)
    empty = int((np.asarray(X.sum(axis=1)).ravel() == 0).sum())
    if empty:
        (log.info if spots == "all" else log.warning)("%s: %d %s spots have no counts", sample, empty,
                                                       "of all" if spots == "all" else "in-tissue")
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata = adata[:, genes].copy()
    adata.layers["counts"] = counts
    adata.obs["sample"] = sample
    adata.obs["dataset"] = dataset
    adata.uns["cmrcnet"] = json.dumps(
        {"sample": sample, "dataset": dataset, "target_sum": target_sum, "spots": spots,
         "normalised_over": "all measured genes", "provenance": provenance_info}, default=str
    )
    adata.uns.pop("log1p", None)
    with atomic_path(out_h5ad) as tmp:
        adata.write_h5ad(tmp)
    log.info("%s: %d spots (%s) x %d genes normalised", sample, adata.n_obs, spots, adata.n_vars)
    return adata
