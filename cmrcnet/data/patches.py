"""Cut a fixed-size, fixed-resolution image patch around every in-tissue spot (or every spot, `spots="all"`),
in HEST's patch layout.

Why: the models see each spot as a `patch_px` x `patch_px` RGB patch at `um_per_px`, whatever the slide's
own resolution. Reading from the coarsest pyramid level that still has enough detail, in (y, x) order with
a tile cache, keeps this fast and memory-flat even on 100k-pixel slides.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.data import layout
from cmrcnet.data.slide import DOWNSAMPLE_TOLERANCE, Slide
from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, write_table

LOGGER = logging.getLogger("cmrcnet")
BATCH = 64  # patches held in memory before a write
MIN_PATCH_PX = 16  # as patches.size_px in config/schema.yaml
# As patches.um_per_px's maximum in config/schema.yaml: at 100 um/px one pixel is larger than a Visium spot (55 um)
# and a 224-px patch spans 22 mm, more than a Visium capture area; larger values are a unit mistake (mm, nm).
MAX_UM_PER_PX = 100.0
# The largest slide region one patch may read (RGB bytes): beyond it the slide has no pyramid level coarse enough
# for the requested resolution, and reading would exhaust memory rather than fail.
MAX_REGION_BYTES = 1 << 30


def check_patch_settings(patch_px, um_per_px, size_key: str = "patches.size_px",
                         um_key: str = "patches.um_per_px") -> None:
    """One-line errors naming the setting for a patch size or resolution no slide can give."""
    if isinstance(patch_px, bool) or not isinstance(patch_px, (int, np.integer)) or patch_px < MIN_PATCH_PX:
        raise input_error(size_key, f"must be a whole number of pixels, at least {MIN_PATCH_PX}; got {patch_px!r}")
    try:
        um = float(um_per_px)
    except (TypeError, ValueError):
        um = float("nan")
    if isinstance(um_per_px, bool) or not (0 < um <= MAX_UM_PER_PX):
        raise input_error(um_key, f"must be a resolution above 0 and at most {MAX_UM_PER_PX:g} um per pixel "
                                  f"(the paper: 0.5); got {um_per_px!r}")


def _resize(region: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize (PIL's Lanczos filter widens with the scale factor, so it does not alias)."""
    if region.shape[0] == size and region.shape[1] == size:
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.LANCZOS))


class PatchCutter:
    """Cuts `patch_px` x `patch_px` RGB patches at `um_per_px` around spot centres of an open slide.

    The one place patches are cut, for training (`extract_patches`) and for prediction on a new slide
    (`cmrcnet.inference.slide_predict`), so that a model sees a new slide exactly as it saw its training slides.
    It reads the coarsest pyramid level that is not coarser than asked for (`Slide.best_level`), a square window of
    `window` pixels of that level centred on the spot (corners rounded with np.rint), resizes it with Lanczos
    (`_resize`) and fills what lies past the slide edge with `fill`. The slide's tile cache is sized for one band
    of tile rows as tall as a window: spots visited in (y, x) order decode each tile about once.

    `slide` is a `cmrcnet.data.slide.Slide` or anything with its interface (`levels`, `best_level`,
    `read_region`, `tile_cache_size`, `path`); `slide_um` its level-0 pixel size. A window that would read more
    than MAX_REGION_BYTES is a one-line error naming the slide, ending with `advice`.
    """

    def __init__(self, slide, patch_px: int, um_per_px: float, slide_um: float, *, fill: int = 255,
                 advice: str = "lower patches.um_per_px or patches.size_px"):
        self.slide, self.patch_px, self.um_per_px, self.slide_um = slide, int(patch_px), float(um_per_px), slide_um
        self.fill = fill
        self.scale = um_per_px / slide_um  # level-0 pixels per output pixel
        self.window0 = patch_px * self.scale  # patch side in level-0 pixels
        if self.scale < 1 - DOWNSAMPLE_TOLERANCE:
            LOGGER.warning(
                "%s: slide is %.3g um/px, coarser than the requested %.3g um/px; patches are upsampled",
                slide.path, slide_um, um_per_px,
            )
        self.level = slide.best_level(self.scale)
        lvl = slide.levels[self.level]
        self.downsample = lvl.downsample
        self.window = max(1, round(self.window0 / lvl.downsample))  # patch side in pixels of the level read
        window = self.window
        if 3 * window**2 > MAX_REGION_BYTES:
            raise input_error(slide.path, f"a {patch_px}-px patch at {um_per_px:g} um/px would read a {window} x "
                                          f"{window} px region ({3 * window**2 / 2**30:.1f} GiB) from level "
                                          f"{self.level}, the coarsest the slide has for it; {advice}")
        # Spots are visited in (y, x) order, so the tiles in use are one band of tile rows as tall as a
        # window: cache that band, and each tile is decoded about once whatever the spot layout.
        slide.tile_cache_size = lvl.segments_across * (-(-window // lvl.segment_height) + 2)

    def corners(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners of the patches around level-0 `centres` (n, 2) as (x, y): in level-0 pixels (HEST's
        `coords`) and in pixels of the level read."""
        centres = np.asarray(centres, dtype=float)
        corner0 = np.rint(centres - self.window0 / 2).astype(np.int64)
        corner = np.rint(centres / self.downsample - self.window / 2).astype(np.int64)
        return corner0, corner

    def reaches_past_edge(self, corner: np.ndarray) -> np.ndarray:
        """Which patches (corners in pixels of the level read) reach past the slide edge."""
        lvl = self.slide.levels[self.level]
        return (corner < 0).any(axis=1) | (corner[:, 0] + self.window > lvl.width) | (
            corner[:, 1] + self.window > lvl.height
        )

    def cut_at(self, corners: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (n, patch_px, patch_px, 3): the patches whose corners (pixels of the level read) are given."""
        if out is None:
            out = np.empty((len(corners), self.patch_px, self.patch_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(corners):
            region = self.slide.read_region(x, y, self.window, self.window, level=self.level, fill=self.fill)
            out[i] = _resize(region, self.patch_px)
        return out

    def cut(self, centres: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (n, patch_px, patch_px, 3): the patches around level-0 `centres` (n, 2) as (x, y)."""
        return self.cut_at(self.corners(centres)[1], out)


def extract_patches(
    wsi: str | Path,
    st: str | Path,
    metadata: str | Path,
    out_h5: str | Path,
    out_parquet: str | Path,
    *,
    sample: str,
    patch_px: int = 224,
    um_per_px: float = 0.5,
    off_slide: str = "pad",
    fill: int = 255,
    spots: str = "in_tissue",
    provenance_info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the patches of the in-tissue spots (`spots="in_tissue"`) or of every spot of the st file
    (`spots="all"`, as the paper) to `out_h5` and a per-patch table to `out_parquet`.

    An in-tissue spot centred off the slide is an error (wrong coordinates or pixel size); with `spots="all"` an
    off-tissue one is handled like a patch reaching past the edge (`off_slide`). Both outputs appear together or
    not at all. Returns a summary (counts, level used, timing).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if off_slide not in ("pad", "drop"):
        raise ValueError(f"off_slide must be 'pad' or 'drop', got {off_slide!r}")
    check_patch_settings(patch_px, um_per_px)

    adata = layout.read_st(st)
    keep = layout.spot_mask(adata, spots)
    meta = layout.read_metadata(metadata)
    obs = adata.obs.loc[keep]
    centres = np.asarray(adata.obsm["spatial"], dtype=float)[keep, :2]
    barcodes = np.asarray(adata.obs_names)[keep]
    on_tissue = layout.in_tissue_mask(adata)[keep]
    if spots == "in_tissue" and not on_tissue.any():
        raise input_error(st, "no in-tissue spots (obs['in_tissue'] is 0 everywhere)")

    with Slide(wsi) as slide:
        slide_um = layout.pixel_size_um(meta, metadata, wsi)
        cutter = PatchCutter(slide, patch_px, um_per_px, slide_um, fill=fill)
        level, lvl, window = cutter.level, slide.levels[cutter.level], cutter.window

        outside = (centres[:, 0] < 0) | (centres[:, 1] < 0) | (centres[:, 0] >= slide.width) | (
            centres[:, 1] >= slide.height
        )
        if (outside & ~on_tissue).any():
            LOGGER.info("%s: %d off-tissue spots are centred off the slide (off_slide: %s)", sample,
                        int((outside & ~on_tissue).sum()), off_slide)
        outside &= on_tissue
        if outside.any():
            raise input_error(
                st,
                f"{int(outside.sum())} spot centres lie outside the {slide.width}x{slide.height} px slide "
                f"(first: {barcodes[outside][0]}); wrong coordinates or pixel size?",
            )

        # top-left corners: in level-0 pixels (stored, HEST convention) and in pixels of the level read
        corner0, corner = cutter.corners(centres)
        partial = cutter.reaches_past_edge(corner)
        n_spots = len(barcodes)
        n_padded = int(partial.sum()) if off_slide == "pad" else 0
        n_dropped = int(partial.sum()) if off_slide == "drop" else 0
        if n_padded:
            LOGGER.info("%s: %d of %d patches reach past the slide edge, padded with %d", sample, n_padded, n_spots, fill)
        if n_dropped:
            LOGGER.info("%s: dropped %d of %d spots whose patch reaches past the slide edge", sample, n_dropped, n_spots)

        chosen = np.flatnonzero(~partial) if off_slide == "drop" else np.arange(n_spots)
        if len(chosen) == 0:
            raise input_error(st, f"all {n_spots} spots were dropped: every patch reaches past the slide edge")
        chosen = chosen[np.lexsort((centres[chosen, 0], centres[chosen, 1]))]  # rows of tiles, for the cache
        n = len(chosen)
        LOGGER.info(
            "%s: %d patches of %d px at %.3g um/px from level %d (downsample %.3g, %d px windows)",
            sample, n, patch_px, um_per_px, level, lvl.downsample, window,
        )

        table = pd.DataFrame(
            {
                "barcode": barcodes[chosen].astype(str),
                "sample": sample,
                "patch_index": np.arange(n, dtype=np.int64),
                "x_px": centres[chosen, 0],
                "y_px": centres[chosen, 1],
            }
        )
        for col in ("array_row", "array_col"):
            if col in obs:
                table[col] = np.asarray(obs[col])[chosen]
        table["in_tissue"] = on_tissue[chosen].astype(int)
        table["padded"] = partial[chosen]

        attrs = {
            "patch_size_px": patch_px,
            "um_per_px": um_per_px,
            "level": level,
            "level_downsample": lvl.downsample,
            "slide_pixel_size_um": slide_um,
            "n_spots": n_spots,
            "n_written": n,
            "n_padded": n_padded,
            "n_dropped": n_dropped,
            "sample": sample,
            "spots": spots,
            "fill": fill,  # the colour past the slide edge: prediction on a new slide pads the same way
        }
        if provenance_info is not None:
            attrs["provenance"] = json.dumps(provenance_info, default=str)

        with ExitStack() as stack:
            tmp_h5 = stack.enter_context(atomic_path(out_h5))
            tmp_parquet = stack.enter_context(atomic_path(out_parquet))
            bar = stack.enter_context(tqdm(total=n, disable=not progress, unit="patch", desc=f"patches {sample}"))
            _write_h5(tmp_h5, cutter, corner[chosen], corner0[chosen], table["barcode"].to_numpy(), attrs, bar)
            write_table(tmp_parquet, table, provenance_info)

    summary = {
        "n_spots": n_spots,
        "n_written": n,
        "n_padded": n_padded,
        "n_dropped": n_dropped,
        "level": level,
        "level_downsample": lvl.downsample,
        "slide_pixel_size_um": slide_um,
        "seconds": round(time.perf_counter() - start, 3),
    }
    LOGGER.info("%s: wrote %d patches in %.1f s", sample, n, summary["seconds"])
    return summary


def _write_h5(path, cutter: PatchCutter, corners, corners0, barcodes, attrs, bar) -> None:
    """Read, resize and write patches in batches so memory stays at one batch whatever the spot count."""
    import h5py

    n, patch_px = len(corners), cutter.patch_px
    encoded = [str(b).encode("utf-8") for b in barcodes]
    width = max(1, max(len(b) for b in encoded))
    with h5py.File(path, "w") as h5:
        img = h5.create_dataset(
            "img", shape=(n, patch_px, patch_px, 3), dtype=np.uint8,
            chunks=(1, patch_px, patch_px, 3), compression="lzf",
        )
        h5.create_dataset("barcode", data=np.array(encoded, dtype=f"S{width}").reshape(n, 1))
        h5.create_dataset("coords", data=corners0.astype(np.int64))
        for key, value in attrs.items():
            h5.attrs[key] = value
        batch = np.empty((min(BATCH, n), patch_px, patch_px, 3), dtype=np.uint8)
        for lo in range(0, n, BATCH):
            hi = min(lo + BATCH, n)
            cutter.cut_at(corners[lo:hi], out=batch[: hi - lo])
            img[lo:hi] = batch[: hi - lo]
            bar.update(hi - lo)
