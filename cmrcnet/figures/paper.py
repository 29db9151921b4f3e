"""The paper's figures for one dataset, from its prediction files, scores and training histories.

Fig 2 box plots of per-gene r, Fig 3 mean/variance, Fig 4 correlation heatmaps (top-50 HEG and HVG of all
test spots), Figs 5-7 one gene's spatial map on one test slide, and the training curves. Every fold's test
spots are pooled (each sample is a test sample exactly once), so one figure covers the whole dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

FIGURES = ("fig2_boxplots", "fig3_mean_variance", "fig4_heatmaps_heg", "fig4_heatmaps_hvg", "fig5_spatial",
           "training_curves")


def pooled_predictions(paths: Sequence[str | Path], labels: Sequence[str]):
    """(truth, {label: prediction}, obs, genes) over every test spot of every fold, rows aligned by spot."""
    from cmrcnet.evaluation.evaluate import read_predictions

    truth_parts, obs_parts, pred_parts, genes = [], [], {label: [] for label in labels}, None
    seen_spots = set()
    for path in paths:
        adata, _, layer_labels = read_predictions(path)
        genes = genes or [str(g) for g in adata.var_names]
        frame = adata.obs
        new = ~frame.index.isin(list(seen_spots))
        if new.any():  # the first file testing these spots gives the truth
            truth_parts.append(pd.DataFrame(np.asarray(adata.X)[new], index=frame.index[new], columns=genes))
            obs_parts.append(frame[new])
            seen_spots.update(frame.index[new])
        for layer, label in layer_labels.items():
            if label in pred_parts:
                pred_parts[label].append(pd.DataFrame(np.asarray(adata.layers[layer]), index=frame.index))
    if not truth_parts:
        raise input_error("figures", "no prediction files given")
    truth = pd.concat(truth_parts)
    obs = pd.concat(obs_parts)
    preds = {}
    for label, parts in pred_parts.items():
        if not parts:
            raise input_error("figures", f"no prediction of {label} among the given files")
        pred = pd.concat(parts).reindex(truth.index)
        if pred.isna().any().any():
            raise input_error("figures", f"{label} does not predict every test spot of the other methods")
        preds[label] = pred.to_numpy(np.float64)
    return truth.to_numpy(np.float64), preds, obs, genes


def per_gene_r(scores: pd.DataFrame, gene_sets: pd.DataFrame, labels: Sequence[str],
               sets: Sequence[str]) -> pd.DataFrame:
    """method, gene_set, gene, r: each gene's r averaged over the (fold, sample) whose set it belongs to."""
    from cmrcnet.evaluation.stats import scores_in_sets

    long = scores_in_sets(scores[(scores["protocol"] == "paper") & scores["method"].isin(labels)], gene_sets)
    long = long[long["gene_set"].isin(sets)]
    return long.groupby(["method", "gene_set", "gene"], sort=False)["r"].mean().reset_index()


def figure_gene(config_gene: str | None, markers: Sequence[str], truth: np.ndarray, genes: Sequence[str],
                where: str) -> str:
    """The configured gene (which must exist), else the first marker predicted, else the highest-mean gene."""
    from cmrcnet.figures.common import check_gene

    if config_gene:
        return check_gene(config_gene, genes, where)
    present = [g for g in markers if g in set(genes)]
    if present:
        return present[0]
    return str(genes[int(np.argmax(truth.mean(axis=0)))])


FIG2_SETS = ("HEG50", "HVG50", "marker")


def missing_set_reason(gene_set: str, gene_sets: pd.DataFrame, markers: Sequence[str]) -> str:
    """Why a paper-protocol gene set was not computed for a dataset, from what was computed and its markers."""
    computed = set(gene_sets.loc[gene_sets["protocol"] == "paper", "gene_set"].astype(str))
    if not computed and not gene_sets.empty:
        return f"{gene_set} not computed: the paper protocol is not in evaluation.protocols"
    if gene_set == "marker":
        if not markers:
            return "marker not computed: the dataset lists no marker_genes"
        return f"marker not computed: none of its marker genes ({', '.join(markers)}) is measured"
    return f"{gene_set} not computed: evaluation.top_genes has no {gene_set[3:]}"


def dataset_figures(*, dataset: str, prediction_paths: Sequence[str | Path], scores: pd.DataFrame,
                    gene_sets: pd.DataFrame, labels: Sequence[str], histories: Mapping[str, str | Path],
                    wsis: Mapping[str, str | Path], samples: Sequence[str], out_dir: str | Path,
                    gene: str | None = None, markers: Sequence[str] = (), thumbnail_px: int = 1024) -> list[Path]:
    """Write every figure in FIGURES (PNG + PDF) to `out_dir` for `labels` (the methods to show)."""
    from cmrcnet.evaluation.metrics import top_genes
    from cmrcnet.figures import boxplots, correlation_heatmaps, mean_variance, read_thumbnail, spatial_maps, training_curves
    from cmrcnet.figures.common import note_figure

    if not labels:
        raise input_error(dataset, "no method to draw: the figures show non-ablation methods only")
    out = Path(out_dir)
    truth, preds, obs, genes = pooled_predictions(prediction_paths, labels)
    written = []
    table = per_gene_r(scores, gene_sets, labels, list(FIG2_SETS))
    drawn = [s for s in FIG2_SETS if s in set(table["gene_set"])]
    skipped = [missing_set_reason(s, gene_sets, markers) for s in FIG2_SETS if s not in drawn]
    for reason in skipped:  # draw what can be drawn; say what could not
        log.warning("%s: fig2_boxplots: panel skipped, %s", dataset, reason)
    title = f"{dataset}: per-gene Pearson r (paper protocol)"
    if drawn:
        written += boxplots(table, out / "fig2_boxplots", title=title, methods=list(labels), gene_sets=drawn)
    else:
        written += note_figure(out / "fig2_boxplots", title, ["No panel to draw:", *skipped])
    written += mean_variance(truth, preds, genes, out / "fig3_mean_variance", title=f"{dataset}: gene mean and variance")
    for by, name in (("mean", "heg"), ("var", "hvg")):
        if len(genes) < 2:
            reason = f"a gene-gene correlation needs 2 or more genes; the dataset has {len(genes)}"
            log.warning("%s: fig4_heatmaps_%s: not drawn, %s", dataset, name, reason)
            written += note_figure(out / f"fig4_heatmaps_{name}", f"{dataset}: gene-gene correlation", [reason])
            continue
        chosen = top_genes(truth, genes, min(50, len(genes)), by=by, where=f"{dataset} figures")
        correlation_heatmaps(truth, preds, genes, chosen, out / f"fig4_heatmaps_{name}",
                             title=f"{dataset}: gene-gene correlation, top-50 {name.upper()}")
        written += [out / f"fig4_heatmaps_{name}.png", out / f"fig4_heatmaps_{name}.pdf"]

    gene = figure_gene(gene, markers, truth, genes, where=f"{dataset}: figure_gene")
    tested = set(obs["sample"].astype(str))
    sample = next(s for s in samples if s in tested)
    rows = (obs["sample"].astype(str) == sample).to_numpy()
    col = genes.index(gene)
    thumb, scale = read_thumbnail(wsis[sample], max_px=thumbnail_px)
    written += spatial_maps(gene, truth[rows, col], {label: p[rows, col] for label, p in preds.items()},
                            obs.loc[rows, "x"].to_numpy(float), obs.loc[rows, "y"].to_numpy(float), thumb, scale,
                            out / "fig5_spatial", title=f"{dataset}: {gene} on {sample}")

    curves = {name: pd.read_csv(path) for name, path in histories.items()}
    written += training_curves(curves, out / "training_curves", title=f"{dataset}: training and validation loss")
    log.info("%s: %d figure files in %s (spatial gene %s on %s)", dataset, len(written), out, gene, sample)
    return written
