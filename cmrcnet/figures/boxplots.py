"""Fig 2: per-gene Pearson r of each method, one panel per gene set, a box per method with the genes on top."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.figures.common import grid_shape, method_colours, new_figure, save_figure

COLUMNS = ("method", "gene_set", "gene", "r")
MAX_PANELS_ACROSS = 3


def _order(given: Sequence[str] | None, present: pd.Series, what: str) -> list[str]:
    """`given` (each must be present), or the values in order of first appearance."""
    if given is None:
        return list(dict.fromkeys(present.astype(str)))
    missing = [v for v in given if v not in set(present.astype(str))]
    if missing:
        raise ValueError(f"per-gene table has no rows for {what} {', '.join(map(str, missing))}")
    return [str(v) for v in given]


def boxplots(per_gene: pd.DataFrame, out_base: str | Path, title: str | None = None,
             methods: Sequence[str] | None = None, gene_sets: Sequence[str] | None = None) -> list[Path]:
    """Box plots of per-gene r by method (Fig 2); returns the PNG and PDF paths.

    `per_gene` has columns method, gene_set, gene, r. Panels follow `gene_sets` and boxes `methods`, each
    by default in order of first appearance (given lists also select). NaN r (e.g. constant predictions)
    are left out and counted in each panel's axis label.
    """
    missing = [c for c in COLUMNS if c not in per_gene.columns]
    if missing:
        raise ValueError(f"per-gene table lacks column(s) {', '.join(missing)}")
    if per_gene.empty:
        raise ValueError("per-gene table is empty")
    methods = _order(methods, per_gene["method"], "method")
    gene_sets = _order(gene_sets, per_gene["gene_set"], "gene set")
    table = per_gene.assign(method=per_gene["method"].astype(str), gene_set=per_gene["gene_set"].astype(str),
                            r=pd.to_numeric(per_gene["r"], errors="coerce"))
    colours = method_colours(methods)
    rows, cols = grid_shape(len(gene_sets), MAX_PANELS_ACROSS)
    fig = new_figure(max(3.2, 0.75 * len(methods) + 1.4) * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    rng = np.random.default_rng(0)  # jitter only; fixed so reruns give identical figures
    for ax, gs in zip(axes, gene_sets):
        part = table[table["gene_set"] == gs]
        data, nans = [], []
        for m in methods:
            r = part.loc[part["method"] == m, "r"].to_numpy(float)
            nans.append(int((~np.isfinite(r)).sum()))
            data.append(r[np.isfinite(r)])
        n_nan = sum(nans)
        drawn = [i for i, d in enumerate(data) if d.size]
        if drawn:
            boxes = ax.boxplot([data[i] for i in drawn], positions=drawn, widths=0.6, patch_artist=True,
                               showfliers=False, medianprops={"color": "black", "linewidth": 1.5})
            for i, patch in zip(drawn, boxes["boxes"]):
                patch.set_facecolor(colours[methods[i]])
                patch.set_alpha(0.45)
        for i, d in enumerate(data):
            if d.size:
                ax.scatter(i + rng.uniform(-0.18, 0.18, d.size), d, s=9, color=colours[methods[i]],
                           edgecolors="none", alpha=0.8, zorder=3)
        ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        ticks = [f"{m}\n({k} NaN)" if k else m for m, k in zip(methods, nans)]
        many = len(methods) > 3
        ax.set_xticks(range(len(methods)), ticks, rotation=30 if many else 0, ha="right" if many else "center")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        n_genes = part["gene"].nunique()
        ax.set_title(f"{gs} ({n_genes} genes)")
        ax.set_ylabel("Pearson r per gene" + (f" ({n_nan} NaN dropped)" if n_nan else ""))
        ax.tick_params(axis="y", labelleft=True)
        ax.grid(axis="y", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
    for ax in axes[len(gene_sets):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_base)
