"""Training curves: train and validation loss per epoch for each trained model, best epoch marked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.figures.common import PALETTE, grid_shape, new_figure, save_figure

MAX_PANELS_ACROSS = 3
LOG_SCALE_RATIO = 20.0  # use a log loss axis when positive losses span more than this factor


def training_curves(histories: Mapping[str, pd.DataFrame], out_base: str | Path, title: str | None = None) -> list[Path]:
    """One panel per label (e.g. method or method/fold): train_loss and val_loss against epoch.

    Each history needs columns epoch and train_loss; val_loss is optional (NaN-only or missing: no
    validation curve). The best epoch (lowest val_loss, the one training keeps) is marked. Returns the paths.
    """
    if not histories:
        raise ValueError("no training histories to plot")
    for label, table in histories.items():
        missing = [c for c in ("epoch", "train_loss") if c not in table.columns]
        if missing:
            raise ValueError(f"history {label}: lacks column(s) {', '.join(missing)}")
    rows, cols = grid_shape(len(histories), MAX_PANELS_ACROSS)
    fig = new_figure(3.8 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    train_colour, val_colour = PALETTE[0], PALETTE[3]
    for ax, (label, table) in zip(axes, histories.items()):
        table = table.sort_values("epoch")
        epoch = pd.to_numeric(table["epoch"], errors="coerce").to_numpy(float)
        train = pd.to_numeric(table["train_loss"], errors="coerce").to_numpy(float)
        val = (pd.to_numeric(table["val_loss"], errors="coerce").to_numpy(float) if "val_loss" in table.columns
               else np.full(len(table), np.nan))
        ax.plot(epoch, train, marker="o", markersize=3, color=train_colour, label="train")
        if np.isfinite(val).any():
            ax.plot(epoch, val, marker="s", markersize=3, color=val_colour, label="validation")
            best = int(np.nanargmin(val))
            ax.axvline(epoch[best], color="0.5", linestyle=":", linewidth=1)
            ax.scatter([epoch[best]], [val[best]], s=70, marker="*", color=val_colour, edgecolors="black",
                       linewidths=0.6, zorder=3, label=f"best (epoch {epoch[best]:g})")
        losses = np.concatenate([train, val])
        losses = losses[np.isfinite(losses)]
        if losses.size and losses.min() > 0 and losses.max() / losses.min() > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.set_title(str(label))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(color="0.92", linewidth=0.6)
        ax.legend(fontsize=8, frameon=False)
    for ax in axes[len(histories):]:
        ax.set_visible(False)
    fig.suptitle(title or "Training curves")
    return save_figure(fig, out_base)
