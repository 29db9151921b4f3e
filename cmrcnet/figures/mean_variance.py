"""Fig 3: does each method reproduce every gene's mean and variance over spots? Truth vs prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cmrcnet.figures.common import check_matrix, format_r, method_colours, new_figure, pearson, save_figure


def _identity(ax, x: np.ndarray, y: np.ndarray) -> None:
    both = np.concatenate([x, y])
    both = both[np.isfinite(both)]
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.04 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", linestyle="--", linewidth=0.9, zorder=1)


def mean_variance(truth, preds: Mapping[str, np.ndarray], genes: Sequence[str], out_base: str | Path,
                  title: str | None = None) -> list[Path]:
    """Per-gene mean and variance over spots, truth (x) vs each method (y), one row per method (Fig 3).

    `truth` and every prediction are spots x genes in the same order as `genes`. Each panel shows the
    identity line and the Pearson r of the per-gene means (or variances) in its title.
    """
    n_genes = len(genes)
    truth = check_matrix("truth", truth, (None, n_genes))
    if not preds:
        raise ValueError("no predictions to plot")
    preds = {str(k): check_matrix(f"prediction {k}", v, truth.shape) for k, v in preds.items()}
    with np.errstate(all="ignore"):
        t_stats = (np.nanmean(truth, axis=0), np.nanvar(truth, axis=0))
    colours = method_colours(preds)
    fig = new_figure(7.0, 3.3 * len(preds))
    axes = fig.subplots(len(preds), 2, squeeze=False)
    for row, (label, pred) in zip(axes, preds.items()):
        with np.errstate(all="ignore"):
            p_stats = (np.nanmean(pred, axis=0), np.nanvar(pred, axis=0))
        for ax, what, t, p in zip(row, ("mean", "variance"), t_stats, p_stats):
            ax.scatter(t, p, s=10, color=colours[label], alpha=0.7, edgecolors="none", zorder=2)
            _identity(ax, t, p)
            ax.set_title(f"{label}: gene {what} ({format_r(pearson(t, p))})", fontsize=10)
            ax.set_xlabel(f"true {what}")
            ax.set_ylabel(f"predicted {what}")
            ax.grid(color="0.92", linewidth=0.6)
            ax.set_axisbelow(True)
    fig.suptitle(title or f"Per-gene mean and variance ({n_genes} genes)")
    return save_figure(fig, out_base)
