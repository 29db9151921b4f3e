"""Figs 5-7: one gene over the tissue, truth and every method side by side on the slide thumbnail."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize

from cmrcnet.figures.common import TRUTH_LABEL, check_matrix, format_r, grid_shape, new_figure, pearson, save_figure

MAX_PANELS_ACROSS = 4
SPOT_FILL = 0.8  # default spot diameter as a fraction of the nearest-neighbour spacing
CMAP = "viridis"


def default_spot_diameter(x: np.ndarray, y: np.ndarray) -> float:
    """Eight tenths of the median distance from a spot to its nearest neighbour (full-resolution px)."""
    from scipy.spatial import cKDTree

    points = np.column_stack([x, y])
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) < 2:
        return 1.0
    dist, _ = cKDTree(points).query(points, k=2)
    spacing = float(np.median(dist[:, 1]))
    return SPOT_FILL * spacing if spacing > 0 else 1.0


def colour_range(values: np.ndarray) -> tuple[float, float]:
    """1st to 99th percentile of the finite values; widened when that is a single value."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def spatial_maps(gene: str, truth_values, preds: Mapping[str, np.ndarray], x, y, thumbnail: np.ndarray, scale: float,
                 out_base: str | Path, spot_diameter_px: float | None = None, title: str | None = None) -> list[Path]:
    """Spots coloured by `gene`'s expression over the thumbnail: truth first, then one panel per method.

    `x`, `y` are spot centres in level-0 pixels and `scale` is thumbnail px per level-0 px (read_thumbnail).
    All panels share one colour scale, the truth's 1st-99th percentiles (values beyond are clipped to the
    ends), with one colour bar; each method's title gives its Pearson r with the truth over spots.
    `spot_diameter_px` (level-0 px) defaults to 0.8 x the median nearest-neighbour spacing. Returns the paths.
    """
    truth_values = check_matrix("truth values", truth_values, (None,))
    n = truth_values.size
    x = check_matrix("x", x, (n,))
    y = check_matrix("y", y, (n,))
    preds = {str(k): check_matrix(f"prediction {k}", v, (n,)) for k, v in preds.items()}
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim not in (2, 3) or thumbnail.shape[0] < 1 or thumbnail.shape[1] < 1:
        raise ValueError(f"thumbnail: expected an image (rows x cols [x channels]), got shape {thumbnail.shape}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if spot_diameter_px is None:
        spot_diameter_px = default_spot_diameter(x, y)
    elif not np.isfinite(spot_diameter_px) or spot_diameter_px <= 0:
        raise ValueError(f"spot_diameter_px must be positive, got {spot_diameter_px!r}")

    # everything is drawn in thumbnail pixels
    tx, ty, diameter = x * scale, y * scale, float(spot_diameter_px) * scale
    panels = {TRUTH_LABEL: truth_values, **preds}
    norm = Normalize(*colour_range(truth_values), clip=True)
    cmap = matplotlib.colormaps[CMAP]
    h, w = thumbnail.shape[:2]
    x0, x1, y0, y1 = 0.0, float(w), 0.0, float(h)  # whole thumbnail unless the spots say otherwise
    placed = np.isfinite(tx) & np.isfinite(ty)
    if placed.any():  # zoom to the spots, a spot's width of margin
        box = (max(x0, tx[placed].min() - diameter), min(x1, tx[placed].max() + diameter),
               max(y0, ty[placed].min() - diameter), min(y1, ty[placed].max() + diameter))
        if box[1] > box[0] and box[3] > box[2]:
            x0, x1, y0, y1 = box
    aspect = (y1 - y0) / (x1 - x0)
    rows, cols = grid_shape(len(panels), MAX_PANELS_ACROSS)
    panel_w = 3.4
    fig = new_figure(panel_w * cols + 0.9, (panel_w * min(max(aspect, 0.4), 2.5) + 0.5) * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    spots = None
    offsets = np.column_stack([tx, ty])
    for ax, (label, values) in zip(axes, panels.items()):
        ax.imshow(thumbnail, cmap="gray" if thumbnail.ndim == 2 else None, interpolation="antialiased")
        spots = EllipseCollection(np.full(n, diameter), np.full(n, diameter), np.zeros(n), units="xy",
                                  offsets=offsets, offset_transform=ax.transData, cmap=cmap, norm=norm,
                                  edgecolors="none", alpha=0.85)
        spots.set_array(np.ma.masked_invalid(values))
        ax.add_collection(spots)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)  # image rows grow downwards
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label if label == TRUTH_LABEL else f"{label} ({format_r(pearson(truth_values, values))})")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(spots, ax=list(axes[: len(panels)]), shrink=0.8, label=f"{gene} expression")
    fig.suptitle(title or f"{gene}: truth vs predictions")
    return save_figure(fig, out_base)
