"""Seeded synthetic samples in HEST-1k layout whose expression is driven by what the slide shows.

Why: the pipeline, its tests and the demo need slides with a known, learnable image -> expression link,
without downloading HEST-1k. Tissue types have their own colour, texture and nuclei and their own gene
programme; two continuous gradients (eosin intensity, local nuclei density) modulate further genes.

Gene names and programmes depend only on (seed, technology), so all samples of a dataset share them;
layout, nuclei, stain shift and counts depend on (seed, sample_index). Same arguments -> same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, sparse

from cmrcnet.data.layout import metadata_path, st_path, wsi_path
from cmrcnet.data.spot_layout import SPOT_PITCH_UM, TECHNOLOGIES, lattice
from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, write_json

TECH_CODES = {"visium": 1, "xenium": 2}
TECH_NAMES = {"visium": "Visium", "xenium": "Xenium"}
TISSUE_TYPES = ("tumour", "stroma", "immune", "normal_epithelium")
MARKERS = {
    "tumour": ("EPCAM", "KRT8", "KRT18", "MKI67", "CD24", "GATA3", "ERBB2", "ESR1"),
    "stroma": ("COL1A1", "COL3A1", "DCN", "ACTA2", "VIM"),
    "immune": ("PTPRC", "CD3E", "CD8A", "MS4A1", "GZMA", "PRF1"),
    "normal_epithelium": ("OLFM4", "MUC2", "ITLN1", "ZG16", "CLCA1"),
}
ALL_MARKERS = tuple(g for t in TISSUE_TYPES for g in MARKERS[t])
CONTROL_FORMATS = ("BLANK_{:04d}", "NegControlProbe_{:05d}", "UnassignedCodeword_{:04d}")
CONTROL_FRACTION = 0.05
GRADIENT_SET_SIZE = 8  # filler genes per gradient (eosin, nuclei density)

SPOT_DIAMETER_UM = {t: g.diameter_um for t, g in TECHNOLOGIES.items()}  # xenium: side of the square pseudo-spot
LIBRARY_SIZE = {"visium": 3000.0, "xenium": 1500.0}  # median counts of a spot fully on tissue
DISPERSION = {"visium": 3.0, "xenium": 8.0}  # negative binomial size: lower = noisier
BASE_SIGMA = {"visium": 1.8, "xenium": 0.9}  # spread of gene abundances: wider = sparser
AMBIENT = 0.04  # off-tissue counts relative to tissue
CELL_UM = 2.0  # resolution of the label map (tissue types, mask, eosin)
TILE = 256
MAX_PIXELS = 400_000_000

BACKGROUND_RGB = (242.0, 240.0, 244.0)
NUCLEUS_RGB = (72.0, 42.0, 125.0)
LUMEN_RGB = (248.0, 242.0, 238.0)


@dataclass(frozen=True)
class Look:
    """How a tissue type appears: base colour, grain, fibres, glands and nuclei."""

    rgb: tuple[float, float, float]
    grain: float  # amplitude of fine texture (grey levels)
    fibres: float  # amplitude of streaks
    lumens: bool  # pale gland lumens (normal glands)
    nuclei_per_1000um2: float
    nucleus_radius_um: float
    nucleus_elongation: float  # long axis / short axis


LOOKS = {
    "tumour": Look((176.0, 90.0, 166.0), 10.0, 0.0, False, 6.0, 4.0, 1.2),
    "stroma": Look((238.0, 148.0, 176.0), 6.0, 18.0, False, 1.6, 2.0, 3.0),
    "immune": Look((178.0, 152.0, 214.0), 8.0, 0.0, False, 14.0, 2.4, 1.0),
    "normal_epithelium": Look((240.0, 192.0, 212.0), 5.0, 0.0, True, 3.5, 3.0, 1.5),
}


# ---------------------------------------------------------------------------------------------- genes


def gene_programmes(seed: int, technology: str, n_total: int) -> dict:
    """Gene names and per-type expression programmes; depend only on (seed, technology, size).

    Returns names, `programmes` (4 types x genes, rows sum to 1), `ambient` (genes,) and the index
    arrays of the eosin- and nuclei-density-driven gene sets.
    """
    rng = np.random.default_rng([seed, TECH_CODES[technology], 101])
    n_ctrl = n_controls(technology, n_total)
    controls = [CONTROL_FORMATS[i % 3].format(i // 3 + 1) for i in range(n_ctrl)]
    n_fill = n_total - len(ALL_MARKERS) - n_ctrl
    names = list(ALL_MARKERS) + [f"SYN{i:05d}" for i in range(1, n_fill + 1)] + controls
    n_mark = len(ALL_MARKERS)
    fill = np.arange(n_mark, n_mark + n_fill)

    log_base = rng.normal(0.0, BASE_SIGMA[technology], n_total)
    log_base[:n_mark] = np.quantile(log_base[fill], 0.9) + rng.uniform(-0.7, 0.7, n_mark)
    log_prog = np.tile(log_base, (len(TISSUE_TYPES), 1))
    start = 0
    for t, tissue in enumerate(TISSUE_TYPES):
        stop = start + len(MARKERS[tissue])
        log_prog[t, start:stop] += rng.uniform(2.5, 3.5, stop - start)  # markers up in their own type
        start = stop
        affected = rng.choice(fill, size=max(1, int(0.15 * n_fill)), replace=False)
        log_prog[t, affected] += rng.normal(0.0, 0.8, affected.size)  # weaker type-specific fillers
    log_prog[:, n_mark + n_fill:] = np.median(log_base) - 5.0  # controls: near zero everywhere
    programmes = np.exp(log_prog)
    programmes /= programmes.sum(axis=1, keepdims=True)
    grad = rng.choice(fill, size=2 * GRADIENT_SET_SIZE, replace=False)
    return {
        "names": names,
        "programmes": programmes,
        "ambient": AMBIENT * programmes.mean(axis=0),
        "eosin_genes": np.sort(grad[:GRADIENT_SET_SIZE]),
        "density_genes": np.sort(grad[GRADIENT_SET_SIZE:]),
    }


def n_controls(technology: str, n_total: int) -> int:
    """Xenium panels carry ~5% control probes/codewords; Visium none."""
    return max(3, round(CONTROL_FRACTION * n_total)) if technology == "xenium" else 0


# ---------------------------------------------------------------------------------------------- geometry


def spot_grid(technology: str, width_um: float, height_um: float) -> dict:
    """Spot centres (um) on a Visium hexagonal or Xenium square grid, half a pitch inside the slide."""
    return lattice(width_um, height_um, SPOT_PITCH_UM, technology == "visium")


def _grid_shape(grid: dict) -> tuple[int, int]:
    """Rows x (fewest spots in a row)."""
    if grid["row"].size == 0:
        return 0, 0
    return int(grid["row"].max()) + 1, int(np.bincount(grid["row"]).min())


# ---------------------------------------------------------------------------------------------- layout


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell_um: float, scale_um: float) -> np.ndarray:
    """Standardised smooth random field on the label grid, made at ~10 um and upsampled (fast)."""
    k = max(1, round(10.0 / cell_um))
    low_shape = (-(-shape[0] // k), -(-shape[1] // k))
    low = ndimage.gaussian_filter(rng.standard_normal(low_shape), scale_um / (k * cell_um), mode="reflect")
    low = (low - low.mean()) / (low.std() + 1e-12)
    up = ndimage.zoom(low, k, order=1, mode="nearest", grid_mode=True) if k > 1 else low
    return up[: shape[0], : shape[1]].astype(np.float32)


def _layout(rng: np.random.Generator, shape: tuple[int, int], cell_um: float, n_types: int) -> dict:
    """Tissue-type labels (n_types = background), eosin intensity in [0, 1] and a nuclei-density factor."""
    fields = np.stack([_smooth_field(rng, shape, cell_um, 60.0) + rng.normal(0, 0.25) for _ in range(n_types)])
    labels = np.argmax(fields, axis=0).astype(np.uint8)
    tissue = _smooth_field(rng, shape, cell_um, 150.0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    tissue -= 0.8 * (xx**2 + yy**2)  # tissue sits mostly in the middle, background at the edges
    tissue_mask = tissue > np.quantile(tissue, rng.uniform(0.15, 0.25))
    labels[~tissue_mask] = n_types
    eosin = 1.0 / (1.0 + np.exp(-1.5 * _smooth_field(rng, shape, cell_um, 120.0)))
    density = np.exp(0.35 * _smooth_field(rng, shape, cell_um, 80.0))
    return {"labels": labels, "eosin": eosin.astype(np.float32), "density": density.astype(np.float32)}


def _nuclei(rng, labels, density, cell_px, pixel_size_um, types) -> dict:
    """Nuclei centres (full-res px) from a Poisson process whose rate depends on type and density field."""
    cell_area_um2 = (cell_px * pixel_size_um) ** 2
    rate = np.array([LOOKS[t].nuclei_per_1000um2 for t in types] + [0.0]) / 1000.0 * cell_area_um2
    counts = rng.poisson(rate[labels] * density).ravel()
    cells = np.repeat(np.arange(counts.size), counts)
    cy, cx = np.divmod(cells, labels.shape[1])
    y = (cy + rng.random(cells.size)) * cell_px
    x = (cx + rng.random(cells.size)) * cell_px
    return {"x": x, "y": y, "type": labels.ravel()[cells], "size": rng.integers(0, 3, cells.size),
            "angle": rng.integers(0, 4, cells.size)}


def _footprint(a_px: float, b_px: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets of a filled ellipse with semi-axes a, b rotated by angle."""
    r = int(np.ceil(max(a_px, b_px)))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / max(a_px, 0.5), (-dx * s + dy * c) / max(b_px, 0.5)
    keep = u**2 + v**2 <= 1.0
    return dy[keep], dx[keep]


def _nuclei_mask(nuclei: dict, shape: tuple[int, int], pixel_size_um: float, types) -> np.ndarray:
    """Rasterise nuclei as ellipses: one vectorised scatter per (type, size, angle) footprint."""
    h, w = shape
    alpha = np.zeros(h * w, np.float32)
    iy, ix = nuclei["y"].astype(np.int64), nuclei["x"].astype(np.int64)
    for t, tissue in enumerate(types):
        look = LOOKS[tissue]
        for size in range(3):
            radius = look.nucleus_radius_um * (0.8 + 0.2 * size) / pixel_size_um
            a, b = radius * math.sqrt(look.nucleus_elongation), radius / math.sqrt(look.nucleus_elongation)
            for k in range(4 if look.nucleus_elongation > 1 else 1):
                sel = (nuclei["type"] == t) & (nuclei["size"] == size)
                if look.nucleus_elongation > 1:
                    sel &= nuclei["angle"] == k
                if not sel.any():
                    continue
                dy, dx = _footprint(a, b, k * math.pi / 4)
                yy = np.clip(iy[sel, None] + dy[None, :], 0, h - 1)
                xx = np.clip(ix[sel, None] + dx[None, :], 0, w - 1)
                alpha[(yy * w + xx).ravel()] = 0.75 + 0.05 * size
    return alpha.reshape(shape)


# ---------------------------------------------------------------------------------------------- image


def _upsample(a: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    return a.repeat(k, axis=0).repeat(k, axis=1)[: shape[0], : shape[1]]


def _texture(rng, shape, sigma) -> np.ndarray:
    """Smoothed noise with unit std, made at quarter resolution and upsampled (fast)."""
    small = (-(-shape[0] // 4), -(-shape[1] // 4))
    field = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma, mode="reflect")
    field /= field.std() + 1e-12
    return _upsample(field, 4, shape)


def _render(rng, layout, nuclei, shape, cell_px, pixel_size_um, types, stain) -> np.ndarray:
    """H&E-like RGB image: type colour + grain + fibres + lumens + eosin shift, then nuclei."""
    n_types = len(types)
    labels = _upsample(layout["labels"], cell_px, shape)
    eosin = _upsample(layout["eosin"], cell_px, shape) - 0.5
    looks = [LOOKS[t] for t in types]

    def lut(values):  # per-pixel value of a per-type property (0 on background)
        return np.array(list(values) + [0.0], np.float32)[labels]

    q_um = 4 * pixel_size_um  # texture grid spacing
    grain = _texture(rng, shape, 0.6) * lut(lk.grain for lk in looks)
    across = _texture(rng, shape, (0.5 / q_um, 6.0 / q_um))
    along = _texture(rng, shape, (6.0 / q_um, 0.5 / q_um))
    turn = _upsample(layout["density"], cell_px, shape) > 1.0  # fibre direction follows a smooth field
    fibres = np.where(turn, across, along) * lut(lk.fibres for lk in looks)
    del across, along, turn
    lumen = (_texture(rng, shape, 6.0 / q_um) > 0.9) & (lut(float(lk.lumens) for lk in looks) > 0)

    alpha = _nuclei_mask(nuclei, shape, pixel_size_um, types)
    alpha[lumen] = 0.0
    eosin *= labels < n_types  # eosin tints tissue only
    image = np.empty(shape + (3,), np.uint8)
    eosin_shift = (14.0, -32.0, -8.0)  # more eosin: redder, less green
    for c in range(3):
        chan = np.array([lk.rgb[c] for lk in looks] + [BACKGROUND_RGB[c]], np.float32)[labels]
        chan += grain
        chan += fibres * (0.4 if c == 0 else 1.0)
        chan += eosin * eosin_shift[c]
        chan[lumen] = LUMEN_RGB[c]
        chan += (NUCLEUS_RGB[c] - chan) * alpha
        chan *= stain[0][c]
        chan += stain[1][c]
        image[..., c] = np.clip(chan, 0, 255, out=chan)
    return image


def _pyramid(image: np.ndarray) -> list[np.ndarray]:
    """Levels downsampled by 2, 4, 8 ... (2x2 area averaging) while the longest side stays >= 512."""
    levels = [image]
    while max(levels[-1].shape[:2]) // 2 >= 512:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        total = prev[0:h:2, 0:w:2].astype(np.uint16) + prev[1:h:2, 0:w:2] + prev[0:h:2, 1:w:2] + prev[1:h:2, 1:w:2]
        levels.append(((total + 2) // 4).astype(np.uint8))
    return levels


def _write_tiff(path: Path, image: np.ndarray, pixel_size_um: float, write_pixel_size: bool) -> int:
    """Tiled JPEG pyramidal TIFF, lower levels as SubIFDs, resolution tags in centimetres."""
    import tifffile

    levels = _pyramid(image)
    opts = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg",
            "compressionargs": {"level": 90}, "metadata": None}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        for i, level in enumerate(levels):
            res = {}
            if write_pixel_size:
                px_cm = 1e4 / (pixel_size_um * 2**i)
                res = {"resolution": (px_cm, px_cm), "resolutionunit": "CENTIMETER"}
            extra = {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(level, **res, **extra, **opts)
    return len(levels)


# ---------------------------------------------------------------------------------------------- spots


def _spot_stats(grid, layout, nuclei, technology, cell_px, pixel_size_um, n_types) -> dict:
    """Per spot: type fractions (last column = background), tissue eosin and nuclei per 1000 um^2."""
    cell_um = cell_px * pixel_size_um
    half = SPOT_DIAMETER_UM[technology] / 2 / cell_um
    r = int(np.ceil(half))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dx**2 + dy**2 <= half**2 if technology == "visium" else (abs(dx) <= half) & (abs(dy) <= half)
    dy, dx = dy[keep], dx[keep]
    h, w = layout["labels"].shape
    cy = np.floor(grid["y_um"] / cell_um).astype(int)
    cx = np.floor(grid["x_um"] / cell_um).astype(int)
    yy = np.clip(cy[:, None] + dy[None, :], 0, h - 1)
    xx = np.clip(cx[:, None] + dx[None, :], 0, w - 1)
    labels = layout["labels"][yy, xx]
    fractions = np.stack([(labels == t).mean(axis=1) for t in range(n_types + 1)], axis=1)
    on = labels < n_types
    eosin = np.where(on.any(axis=1), (layout["eosin"][yy, xx] * on).sum(axis=1) / np.maximum(on.sum(axis=1), 1), 0.5)
    per_cell = np.bincount(
        (nuclei["y"] // cell_px).astype(int) * w + (nuclei["x"] // cell_px).astype(int), minlength=h * w
    )
    area_1000 = keep.sum() * cell_um**2 / 1000.0
    density = per_cell[yy * w + xx].sum(axis=1) / area_1000
    centre_on = layout["labels"][np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)] < n_types
    return {"fractions": fractions, "eosin": eosin, "density": density, "in_tissue": centre_on.astype(int)}


def _counts(rng, stats, genes, technology, n_types, lib_shift) -> sparse.csr_matrix:
    """Negative-binomial counts around library size x (type mixture) x (gradient factors)."""
    frac = stats["fractions"]
    mix = frac[:, :n_types] @ genes["programmes"][:n_types] + frac[:, n_types:] * genes["ambient"]
    mix[:, genes["eosin_genes"]] *= np.exp(3.0 * (stats["eosin"][:, None] - 0.5))
    mix[:, genes["density_genes"]] *= np.clip(stats["density"][:, None] / 4.0, 0.1, 10.0) ** 0.8
    lib = np.exp(np.log(LIBRARY_SIZE[technology]) + lib_shift + rng.normal(0, 0.25, frac.shape[0]))
    mu = lib[:, None] * mix
    r = DISPERSION[technology]
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.int32)
    return sparse.csr_matrix(counts)


# ---------------------------------------------------------------------------------------------- entry


def _validate(sample, technology, sample_index, seed, patient, width_um, height_um, pixel_size_um, n_total,
              n_tissue_types) -> None:
    if technology not in TECH_CODES:
        raise input_error("technology", f"unknown technology {technology!r}; expected one of {', '.join(TECH_CODES)}")
    if not isinstance(sample, str) or not sample or "/" in sample or "\\" in sample:
        raise input_error("sample", f"invalid sample name {sample!r}")
    if not isinstance(patient, str) or not patient:
        raise input_error("patient", f"must be a non-empty string, got {patient!r}")
    for key, value in (("seed", seed), ("sample_index", sample_index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise input_error(key, f"must be a non-negative integer, got {value!r}")
    for key, value in (("width_um", width_um), ("height_um", height_um), ("pixel_size_um", pixel_size_um)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise input_error(key, f"must be a positive number, got {value!r}")
    if (width_um / pixel_size_um) * (height_um / pixel_size_um) > MAX_PIXELS:
        raise input_error("pixel_size_um", f"slide of {width_um}x{height_um} um is too many pixels at {pixel_size_um} um/px")
    if isinstance(n_tissue_types, bool) or not isinstance(n_tissue_types, (int, np.integer)) \
            or not 1 <= n_tissue_types <= len(TISSUE_TYPES):
        raise input_error("n_tissue_types", f"must be an integer from 1 to {len(TISSUE_TYPES)}, got {n_tissue_types!r}")
    key = "n_genes" if technology == "visium" else "n_panel_genes"
    if isinstance(n_total, bool) or not isinstance(n_total, (int, np.integer)):
        raise input_error(key, f"must be an integer, got {n_total!r}")
    need = len(ALL_MARKERS) + 2 * GRADIENT_SET_SIZE + n_controls(technology, n_total)
    if n_total < need:
        raise input_error(key, f"{n_total} genes cannot hold the {len(ALL_MARKERS)} markers, "
                               f"{2 * GRADIENT_SET_SIZE} gradient genes and controls; need at least {need}")
    rows, cols = _grid_shape(spot_grid(technology, width_um, height_um))
    if rows < 2 or cols < 2:
        raise input_error("width_um/height_um", f"slide of {width_um}x{height_um} um holds {rows}x{cols} spots; "
                                                "need at least 2x2 (spots are 100 um apart)")


def synthesize_sample(root, sample: str, *, technology: str, sample_index: int, seed: int, patient: str,
                      width_um: float = 1600, height_um: float = 1600, pixel_size_um: float = 0.35,
                      n_genes: int = 1000, n_panel_genes: int = 300, n_tissue_types: int = 4,
                      write_pixel_size: bool = True, provenance_info: dict | None = None) -> dict:
    """Write one synthetic sample (WSI, expression, metadata) under `root` in HEST-1k layout.

    Returns a summary: n_spots, n_in_tissue, n_genes, width_px, height_px.
    """
    n_total = n_genes if technology == "visium" else n_panel_genes
    _validate(sample, technology, sample_index, seed, patient, width_um, height_um, pixel_size_um, n_total,
              n_tissue_types)
    import anndata as ad
    import pandas as pd

    types = TISSUE_TYPES[:n_tissue_types]
    genes = gene_programmes(seed, technology, n_total)
    rng = np.random.default_rng([seed, TECH_CODES[technology], 202, sample_index])

    shape = (round(height_um / pixel_size_um), round(width_um / pixel_size_um))
    cell_px = max(1, round(CELL_UM / pixel_size_um))
    layout = _layout(rng, (-(-shape[0] // cell_px), -(-shape[1] // cell_px)), cell_px * pixel_size_um,
                     n_tissue_types)
    nuclei = _nuclei(rng, layout["labels"], layout["density"], cell_px, pixel_size_um, types)
    stain = (1.0 + rng.normal(0, 0.03, 3), rng.normal(0, 4.0, 3))  # per-sample batch effect on colour
    lib_shift = rng.normal(0, 0.15)  # per-sample batch effect on depth
    image = _render(rng, layout, nuclei, shape, cell_px, pixel_size_um, types, stain)

    grid = spot_grid(technology, width_um, height_um)
    stats = _spot_stats(grid, layout, nuclei, technology, cell_px, pixel_size_um, n_tissue_types)
    counts = _counts(rng, stats, genes, technology, n_tissue_types, lib_shift)

    # each spot's dominant tissue type (or background): spot labels for the cross-modal benchmark's label probes
    dominant = np.array([*types, "background"], dtype=object)[stats["fractions"].argmax(axis=1)]
    obs = pd.DataFrame(
        {"array_row": grid["row"], "array_col": grid["col"], "in_tissue": stats["in_tissue"],
         "tissue_type": pd.Categorical(dominant)},
        index=pd.Index([f"{r}x{c}" for r, c in zip(grid["row"], grid["col"])], name="barcode"),
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes["names"], name="gene")))
    adata.obsm["spatial"] = np.column_stack([grid["x_um"], grid["y_um"]]) / pixel_size_um
    with atomic_path(st_path(root, sample)) as tmp:
        adata.write_h5ad(tmp)
    _write_tiff(wsi_path(root, sample), image, pixel_size_um, write_pixel_size)

    meta = {
        "spot_diameter": SPOT_DIAMETER_UM[technology],
        "inter_spot_dist": SPOT_PITCH_UM,
        "st_technology": TECH_NAMES[technology],
        "patient": patient,
        "species": "Homo sapiens",
        "organ": "Synthetic",
        "fullres_px_width": shape[1],
        "fullres_px_height": shape[0],
        "synthetic": True,
        "seed": int(seed),
        "sample_index": int(sample_index),
        "tissue_types": list(types),
    }
    if write_pixel_size:
        meta["pixel_size_um_estimated"] = meta["pixel_size_um_embedded"] = float(pixel_size_um)
    if provenance_info is not None:
        meta["provenance"] = provenance_info
    write_json(metadata_path(root, sample), meta)
    return {"n_spots": int(adata.n_obs), "n_in_tissue": int(stats["in_tissue"].sum()), "n_genes": int(adata.n_vars),
            "width_px": shape[1], "height_px": shape[0]}
