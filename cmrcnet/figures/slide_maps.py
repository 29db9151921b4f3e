"""Predicted expression over a whole slide: for each chosen gene, spots coloured by value over the thumbnail."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize

from cmrcnet.figures.common import check_matrix, grid_shape, new_figure, save_figure
from cmrcnet.figures.spatial import CMAP, colour_range

MAX_PANELS_ACROSS = 3
PANEL_IN = 4.2  # panel width, inches


def prediction_maps(values: Mapping[str, np.ndarray], x, y, thumbnail: np.ndarray, scale: float,
                    out_base: str | Path, spot_diameter_px: float, title: str | None = None) -> list[Path]:
    """`{out_base}.png` and `.pdf`: one panel per gene of `values` ({gene: (n,) predicted values}), spots at
    level-0 centres (`x`, `y`) drawn `spot_diameter_px` (level-0 px) wide over `thumbnail` (thumbnail px per
    level-0 px: `scale`), each panel with its own colour bar spanning its values' 1st to 99th percentiles.
    Returns the paths."""
    if not values:
        raise ValueError("no genes to draw")
    x = check_matrix("x", x, (None,))
    n = x.size
    y = check_matrix("y", y, (n,))
    values = {str(g): check_matrix(f"{g} values", v, (n,)) for g, v in values.items()}
    if not (np.isfinite(scale) and scale > 0) or not (np.isfinite(spot_diameter_px) and spot_diameter_px > 0):
        raise ValueError(f"scale and spot_diameter_px must be positive, got {scale!r}, {spot_diameter_px!r}")
    h, w = thumbnail.shape[:2]
    rows, cols = grid_shape(len(values), MAX_PANELS_ACROSS)
    fig = new_figure(PANEL_IN * cols + 0.6 * cols, (PANEL_IN * min(max(h / w, 0.4), 2.5) + 0.4) * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    diameter = float(spot_diameter_px) * scale
    offsets = np.column_stack([x * scale, y * scale])
    for ax, (gene, v) in zip(axes, values.items()):
        ax.imshow(thumbnail, interpolation="antialiased")
        spots = EllipseCollection(np.full(n, diameter), np.full(n, diameter), np.zeros(n), units="xy",
                                  offsets=offsets, offset_transform=ax.transData, cmap=matplotlib.colormaps[CMAP],
                                  norm=Normalize(*colour_range(v), clip=True), edgecolors="none", alpha=0.85)
        spots.set_array(np.ma.masked_invalid(v))
        ax.add_collection(spots)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)  # image rows grow downwards
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(gene)
        fig.colorbar(spots, ax=ax, shrink=0.8, label="predicted expression")
    for ax in axes[len(values):]:
        ax.set_visible(False)
    fig.suptitle(title or f"predicted expression ({n} spots)")
    return save_figure(fig, out_base)
