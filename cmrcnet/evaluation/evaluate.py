"""Score one dataset's predictions: read every (method, fold) prediction file, apply the paper's protocol and
HEST-bench, and write the long tables that the summary tables and figures are made from.

Each prediction file holds the truth (X) and one layer per variant (`k50`, `pred`, `tta`); its `uns['labels']`
names the method label of each layer. The label is what the tables call a method (`cmrcnet-k50`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.errors import input_error
from cmrcnet.evaluation.metrics import hest_bench_genes, score_hest_bench, score_paper_protocol
from cmrcnet.io import write_table

log = logging.getLogger("cmrcnet")

LABEL_COLUMNS = ["label", "method", "layer", "fold"]


def read_predictions(path: str | Path):
    """A prediction file as AnnData, with its info (method, fold, labels) checked; one-line errors otherwise."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "prediction file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a truncated or foreign file
        raise input_error(path, f"not a readable prediction file ({type(err).__name__}: {err})") from None
    if "cmrcnet" not in adata.uns or "labels" not in adata.uns:
        raise input_error(path, "not written by `cmrcnet predict` (no uns['cmrcnet'] / uns['labels'])")
    info = json.loads(adata.uns["cmrcnet"])
    labels = dict(adata.uns["labels"])
    missing = [layer for layer in labels if layer not in adata.layers]
    if missing:
        raise input_error(path, f"labels name layers that are not there: {', '.join(missing)}")
    if not {"sample", "barcode"} <= set(adata.obs.columns):
        raise input_error(path, "obs lacks the sample / barcode columns")
    return adata, info, labels


def bench_genes_of(normalised: Mapping[str, str | Path], n: int, min_fraction: float, dataset: str) -> list[str]:
    """HEST-bench's fixed genes for a dataset, chosen on all of its normalised samples (not on one fold)."""
    import anndata as ad

    samples = {}
    for sample, path in normalised.items():
        adata = ad.read_h5ad(path)
        samples[sample] = (adata.X, list(adata.var_names))
    return hest_bench_genes(samples, n=n, min_fraction=min_fraction,
                            where=f"{dataset}: HEST-bench genes (evaluation.hest_bench_genes = {n})")


def evaluate_dataset(prediction_paths: Sequence[str | Path], normalised: Mapping[str, str | Path], *, dataset: str,
                     marker_genes: Sequence[str] = (), top_genes: Sequence[int] = (50, 150, 250),
                     protocols: Sequence[str] = ("paper", "hest-bench"), hest_bench_n: int = 50,
                     hest_bench_min_fraction: float = 0.1, fingerprints: Mapping[str, str] | None = None,
                     upstream: Mapping[str, str | Path] | None = None,
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(scores, gene_sets, labels) of every prediction of one dataset, in the formats of `metrics`.

    All files must predict the same genes, and no label may score the same fold twice: mixing predictions
    from two gene selections or two configs would average incomparable numbers. With `fingerprints`
    ({method: cmrcnet.config.run_fingerprint}), a file made under another config is refused; with `upstream`
    ({"genes.tsv": path, "folds.tsv": path}), a file made from other gene or fold tables than these is refused
    (each prediction records the identity of the tables it was made from), so no stale file is scored.
    """
    from cmrcnet.train import file_identity

    current = {name: file_identity(p) for name, p in (upstream or {}).items()}
    if not prediction_paths:
        raise input_error(dataset, "no prediction files to evaluate")
    bench, bench_set = None, None
    if "hest-bench" in protocols:
        bench = bench_genes_of(normalised, hest_bench_n, hest_bench_min_fraction, dataset)
        bench_set = f"hest{len(bench)}"  # the real count: fewer genes may qualify than evaluation.hest_bench_genes
        log.info("%s: HEST-bench on %d fixed genes (gene set %s), derived from this dataset (not a published list)",
                 dataset, len(bench), bench_set)
    scores, sets, label_rows = [], [], []
    genes_ref, seen = None, set()
    for path in prediction_paths:
        adata, info, labels = read_predictions(path)
        genes = [str(g) for g in adata.var_names]
        if genes_ref is None:
            genes_ref, ref_path = genes, path
        elif genes != genes_ref:
            raise input_error(path, f"predicts other genes than {ref_path}; rerun the pipeline so that all "
                                    "models share one gene selection")
        fold, method = int(info["fold"]), str(info["method"])
        if fingerprints is not None and info.get("fingerprint") != fingerprints.get(method):
            raise input_error(path, f"made under another config (fingerprint {info.get('fingerprint')}, this config "
                                    f"{fingerprints.get(method)}); delete it or rerun with `--forcerun predict`")
        made_from = info.get("inputs") or {}
        for name, identity in current.items():
            if made_from.get(name) != identity:
                raise input_error(path, f"predicted from another {name} than {upstream[name]} (the tables changed "
                                        "since); rerun the pipeline, or `--forcerun predict`")
        truth = np.asarray(adata.X, dtype=np.float64)
        spot_samples = adata.obs["sample"].astype(str).to_numpy()
        for layer, label in labels.items():
            if (label, fold) in seen:
                raise input_error(path, f"{label} fold {fold} is predicted by more than one file")
            seen.add((label, fold))
            pred = np.asarray(adata.layers[layer], dtype=np.float64)
            where = f"{path} [{layer}]"
            if "paper" in protocols:
                s, g = score_paper_protocol(truth, pred, genes, spot_samples, dataset=dataset, method=label,
                                            fold=fold, marker_genes=marker_genes, heg_hvg_sizes=top_genes, where=where)
                scores.append(s)
                sets.append(g)
            if bench is not None:
                s, g = score_hest_bench(truth, pred, genes, dataset=dataset, method=label, fold=fold,
                                        bench_genes=bench, gene_set=bench_set, where=where)
                scores.append(s)
                sets.append(g)
            label_rows.append({"label": label, "method": method, "layer": layer, "fold": fold})
    scores = pd.concat(scores, ignore_index=True)
    gene_sets = pd.concat(sets, ignore_index=True).drop_duplicates(ignore_index=True)
    return scores, gene_sets, pd.DataFrame(label_rows, columns=LABEL_COLUMNS)


def write_evaluation(out: Mapping[str, str | Path], scores: pd.DataFrame, gene_sets: pd.DataFrame,
                     labels: pd.DataFrame, provenance_info: dict | None = None) -> None:
    """scores / gene_sets as Parquet (provenance in the metadata), labels as TSV; each file atomically."""
    write_table(out["scores"], scores, provenance_info)
    write_table(out["gene_sets"], gene_sets, provenance_info)
    write_table(out["labels"], labels)
