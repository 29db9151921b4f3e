"""Fig 4: gene-gene correlation over spots for selected genes, truth and each method in the truth's clustered order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from cmrcnet.figures.common import (
    TRUTH_LABEL,
    check_gene,
    check_matrix,
    format_r,
    grid_shape,
    new_figure,
    pearson,
    save_figure,
)

MAX_PANELS_ACROSS = 3
MAX_LABELLED_GENES = 80


def correlation_matrix(values) -> np.ndarray:
    """Pearson correlation between the columns (genes) of spots x genes; NaN rows/columns for constant genes."""
    x = np.asarray(values, dtype=float)
    x = x - x.mean(axis=0)
    norm = np.sqrt((x * x).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(norm > 0, x / norm, np.nan)
    corr = np.clip(z.T @ z, -1.0, 1.0)
    const = ~(norm > 0)
    corr[const, :] = np.nan
    corr[:, const] = np.nan
    return corr


def cluster_order(corr: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - corr (NaN correlations count as 0, i.e. distance 1)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = corr.shape[0]
    if n < 3:
        return np.arange(n)
    dist = 1.0 - np.nan_to_num(corr, nan=0.0)
    dist = np.clip((dist + dist.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def _upper(corr: np.ndarray) -> np.ndarray:
    return corr[np.triu_indices(corr.shape[0], k=1)]


def correlation_heatmaps(truth, preds: Mapping[str, np.ndarray], genes: Sequence[str], selected_genes: Sequence[str],
                         out_base: str | Path, title: str | None = None,
                         where: str | Path = "selected_genes") -> dict[str, list[str]]:
    """Gene-gene correlation heatmaps of `selected_genes` (e.g. top-50 HEG), truth then each method (Fig 4).

    `truth` and the predictions are spots x genes ordered as `genes`. Genes are ordered once, by clustering
    the truth's matrix, and every panel uses that order; each method's title gives the Pearson r between its
    matrix and the truth's (upper triangles). Constant genes have undefined correlations, drawn blank.
    Returns the gene order each panel was drawn in, keyed by panel label (all the same list).
    A selected gene missing from `genes` raises CMRCNetError at `where`, naming close names.
    """
    genes = [str(g) for g in genes]
    truth = check_matrix("truth", truth, (None, len(genes)))
    preds = {str(k): check_matrix(f"prediction {k}", v, truth.shape) for k, v in preds.items()}
    selected = [check_gene(str(g), genes, where) for g in dict.fromkeys(selected_genes)]
    if len(selected) < 2:
        raise ValueError(f"need at least 2 selected genes for a correlation heatmap, got {len(selected)}")
    columns = [genes.index(g) for g in selected]
    matrices = {TRUTH_LABEL: correlation_matrix(truth[:, columns])}
    matrices.update({label: correlation_matrix(p[:, columns]) for label, p in preds.items()})
    order = cluster_order(matrices[TRUTH_LABEL])
    ordered_genes = [selected[i] for i in order]

    n = len(selected)
    rows, cols = grid_shape(len(matrices), MAX_PANELS_ACROSS)
    font = min(8.0, 260.0 / n)
    labelled = n <= MAX_LABELLED_GENES
    # room for the rotated gene names under each panel (and left of the first column), in inches
    label_in = 0.62 * font / 72 * max(map(len, selected)) + 0.15 if labelled else 0.0
    fig = new_figure(4.0 * cols + label_in + 1.0, (4.0 + label_in + 0.35) * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    drawn: dict[str, list[str]] = {}
    image = None
    for k, (ax, (label, corr)) in enumerate(zip(axes, matrices.items())):
        image = ax.imshow(np.ma.masked_invalid(corr[np.ix_(order, order)]), cmap=cmap, vmin=-1, vmax=1,
                          interpolation="nearest")
        drawn[label] = list(ordered_genes)
        if label == TRUTH_LABEL:
            ax.set_title(f"{TRUTH_LABEL} (clustered)")
        else:
            similarity = pearson(_upper(matrices[TRUTH_LABEL]), _upper(corr))
            ax.set_title(f"{label} (vs truth: {format_r(similarity)})")
        if labelled:
            ax.set_xticks(range(n), ordered_genes, rotation=90, fontsize=font)
            ax.set_yticks(range(n), ordered_genes if k % cols == 0 else [], fontsize=font)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.tick_params(length=0)
    for ax in axes[len(matrices):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(matrices)]), shrink=0.7, label="Pearson r between genes over spots")
    fig.suptitle(title or f"Gene-gene correlation of {n} genes (order: average-linkage clustering of the truth)")
    save_figure(fig, out_base)
    return drawn
