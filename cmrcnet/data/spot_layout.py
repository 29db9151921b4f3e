"""Spot geometry of the spatial technologies, and spots laid over the tissue of a new slide.

Why: a model trained on Visium spots predicts the expression of a Visium-sized piece of tissue; on a new slide
without spatial transcriptomics the spots are laid where that technology would have put them: Visium's hexagonal
grid (100 um between centres, 55 um spots) or Xenium-style square pseudo-spots (100 um squares on a 100 um grid,
as the synthetic data and HEST's Xenium pseudo-spots use), or at a pitch the user chooses. The synthetic data
generator (`cmrcnet.data.synthetic.spot_grid`) uses the same lattice, so a spot laid on a synthetic slide sits
exactly on the generator's spot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmrcnet.errors import input_error

SPOT_PITCH_UM = 100.0  # centre-to-centre distance of Visium spots and Xenium pseudo-spots


@dataclass(frozen=True)
class Geometry:
    """A spot lattice: hexagonal (odd rows shifted half a pitch) or square, its pitch and its spot size (the
    diameter of a round spot, the side of a square one)."""

    hexagonal: bool
    pitch_um: float
    diameter_um: float

    @property
    def shape(self) -> str:
        return "hexagon" if self.hexagonal else "square"


TECHNOLOGIES = {
    "visium": Geometry(hexagonal=True, pitch_um=SPOT_PITCH_UM, diameter_um=55.0),
    "xenium": Geometry(hexagonal=False, pitch_um=SPOT_PITCH_UM, diameter_um=100.0),  # square pseudo-spots
}


def geometry(technology: str, pitch_um: float | None = None, where: str = "--layout") -> Geometry:
    """The lattice of `technology`, optionally at another pitch (the spot size scales with it)."""
    if technology not in TECHNOLOGIES:
        raise input_error(where, f"unknown layout {technology!r}; use one of {', '.join(TECHNOLOGIES)}")
    base = TECHNOLOGIES[technology]
    if pitch_um is None:
        return base
    if isinstance(pitch_um, bool) or not (isinstance(pitch_um, (int, float)) and math.isfinite(pitch_um)
                                          and pitch_um > 0):
        raise input_error("--pitch", f"must be a distance above 0 um, got {pitch_um!r}")
    pitch_um = float(pitch_um)
    return Geometry(base.hexagonal, pitch_um, base.diameter_um * pitch_um / base.pitch_um)


def _n_fit(length_um: float, step_um: float, pitch_um: float) -> int:
    """How many centres `step_um` apart fit with half a pitch of margin at both ends."""
    return max(0, math.floor((length_um - pitch_um) / step_um + 1e-9) + 1)


def lattice(width_um: float, height_um: float, pitch_um: float, hexagonal: bool) -> dict:
    """Spot centres (um) of a hexagonal or square lattice, half a pitch inside a `width_um` x `height_um` area,
    row by row: {row, col, x_um, y_um}. Hexagonal rows are pitch x sqrt(3)/2 apart, odd rows shifted half a pitch
    to the right, and columns are numbered in steps of 2 as Visium's are."""
    half = pitch_um / 2
    row_step = pitch_um * math.sqrt(3) / 2 if hexagonal else pitch_um
    n_rows = _n_fit(height_um, row_step, pitch_um)
    rows, cols, xs, ys = [], [], [], []
    for parity in (0, 1) if hexagonal else (0,):
        shift = half if parity else 0.0  # odd hexagonal rows sit half a pitch to the right
        i = np.arange(parity, n_rows, 2 if hexagonal else 1)
        j = np.arange(_n_fit(width_um - shift, pitch_um, pitch_um))
        ii, jj = np.repeat(i, len(j)), np.tile(j, len(i))
        rows.append(ii)
        cols.append(2 * jj + parity if hexagonal else jj)  # Visium numbers columns in steps of 2
        xs.append(half + shift + jj * pitch_um)
        ys.append(half + ii * row_step)
    row, col = np.concatenate(rows).astype(int), np.concatenate(cols).astype(int)
    order = np.lexsort((col, row))
    return {"row": row[order], "col": col[order], "x_um": np.concatenate(xs).astype(float)[order],
            "y_um": np.concatenate(ys).astype(float)[order]}


def spots_on_tissue(mask: np.ndarray, mask_scale: float, width_px: int, height_px: int, pixel_size_um: float,
                    geom: Geometry) -> dict:
    """The lattice of `geom` over a `width_px` x `height_px` slide (level-0 pixels of `pixel_size_um`), keeping the
    spots whose centre falls on the slide and on the tissue `mask` (mask px per level-0 px: `mask_scale`).

    The lattice starts half a pitch from the slide's top-left corner, as `lattice` (and the synthetic data's
    spots) do, and runs to the far edges: a spot near an edge is kept when its centre is on the slide (its patch
    is padded as in training). Returns {row, col, x_px, y_px} (centres in level-0 pixels), row by row."""
    grid = lattice(width_px * pixel_size_um + geom.pitch_um, height_px * pixel_size_um + geom.pitch_um,
                   geom.pitch_um, geom.hexagonal)
    x_px, y_px = grid["x_um"] / pixel_size_um, grid["y_um"] / pixel_size_um
    on_slide = (x_px < width_px) & (y_px < height_px)
    mx = np.clip(np.floor(x_px * mask_scale).astype(np.int64), 0, mask.shape[1] - 1)
    my = np.clip(np.floor(y_px * mask_scale).astype(np.int64), 0, mask.shape[0] - 1)
    keep = on_slide & np.asarray(mask, bool)[my, mx]
    return {"row": grid["row"][keep], "col": grid["col"][keep], "x_px": x_px[keep], "y_px": y_px[keep]}
