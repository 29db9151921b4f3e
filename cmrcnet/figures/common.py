"""Shared pieces of the figures: atomic PNG + PDF saving, gene-name checks, the palette, Pearson r."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path

PNG_DPI = 150
TRUTH_LABEL = "Truth"
TRUTH_COLOUR = "#4D4D4D"
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MAX_CLOSE_NAMES = 5


def new_figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot, so no GUI backend or global state is involved."""
    return Figure(figsize=(width, height), layout="constrained")


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A colour per method, by position, cycling through the colour-blind-safe palette."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def save_figure(fig: Figure, out_base: str | Path) -> list[Path]:
    """Write `{out_base}.png` (150 dpi) and `{out_base}.pdf`; both appear only if both were written. Closes `fig`."""
    out_base = Path(out_base)
    png, pdf = out_base.with_name(out_base.name + ".png"), out_base.with_name(out_base.name + ".pdf")
    try:
        with atomic_path(png) as tmp_png, atomic_path(pdf) as tmp_pdf:
            # the temp names end in .tmp.png / .tmp.pdf, but say the format anyway rather than rely on suffixes
            fig.savefig(tmp_png, format="png", dpi=PNG_DPI, metadata={"Software": None})
            fig.savefig(tmp_pdf, format="pdf", metadata={"Creator": None, "Producer": None, "CreationDate": None})
    finally:
        close_figure(fig)
    return [png, pdf]


def note_figure(out_base: str | Path, title: str, lines: Sequence[str]) -> list[Path]:
    """A figure that says in words why nothing could be drawn (the outputs must exist for the pipeline)."""
    fig = new_figure(7.0, 2.0 + 0.3 * len(lines))
    fig.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", wrap=True)
    fig.suptitle(title)
    return save_figure(fig, out_base)


def close_figure(fig: Figure) -> None:
    """Release a figure; only pyplot keeps references to figures, so only it needs telling."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def close_names(name: str, names: Sequence[str], n: int = MAX_CLOSE_NAMES) -> list[str]:
    """Names like `name`: case-insensitive equals first, then difflib matches, then names it starts."""
    by_upper: dict[str, list[str]] = {}
    for g in names:
        by_upper.setdefault(str(g).upper(), []).append(str(g))
    query = str(name).upper()
    found: list[str] = []
    keys = [query] if query in by_upper else []
    keys += difflib.get_close_matches(query, list(by_upper), n=n, cutoff=0.6)
    keys += sorted(k for k in by_upper if k.startswith(query) and len(query) >= 2)
    for key in keys:
        for g in by_upper[key]:
            if g not in found and g != name:
                found.append(g)
    return found[:n]


def check_gene(gene: str, genes: Sequence[str], where: str | Path) -> str:
    """Return `gene` if it is one of `genes`; otherwise raise a one-line CMRCNetError naming close names."""
    genes = [str(g) for g in genes]
    if gene in genes:
        return gene
    close = close_names(gene, genes)
    hint = f"close names: {', '.join(close)}" if close else f"no close names among its {len(genes)} genes"
    raise input_error(where, f"gene {gene} is not in the data; {hint}")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over entries finite in both; NaN when fewer than 2 such entries or either side is constant."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def format_r(r: float) -> str:
    return "r = n/a" if not np.isfinite(r) else f"r = {r:.3f}"


def check_matrix(name: str, values, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float array of the expected shape (None in `shape` = any size), or ValueError naming it."""
    arr = np.asarray(values, dtype=float)
    if shape is not None and (arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape))):
        want = " x ".join("any" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {' x '.join(map(str, arr.shape)) or 'scalar'}")
    return arr


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return -(-n // cols), cols
