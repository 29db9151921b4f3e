"""A small RGB overview of a pyramidal slide, read from a coarse level (never the whole of level 0 of a big slide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmrcnet.data.slide import Slide

BAND_ROWS = 2048  # rows of the source level decoded at a time when it must be shrunk a lot


def _source_level(slide: Slide, max_px: int) -> int:
    """The coarsest level whose long side is still >= max_px; level 0 if even that is smaller."""
    fits = [i for i, lvl in enumerate(slide.levels) if max(lvl.width, lvl.height) >= max_px]
    return max(fits, key=lambda i: slide.levels[i].downsample) if fits else 0


def _block_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
    return rgb[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))


def _read_shrunk(slide: Slide, level: int, k: int) -> np.ndarray:
    """The whole level, averaged over k x k blocks, decoded in bands so a big level never sits in memory whole."""
    lvl = slide.levels[level]
    w = lvl.width // k * k
    band = max(k, BAND_ROWS // k * k)
    parts = []
    for y in range(0, lvl.height // k * k, band):
        h = min(band, lvl.height // k * k - y)
        parts.append(_block_mean(slide.read_region(0, y, w, h, level=level), k))
    return np.concatenate(parts, axis=0)


def read_thumbnail(wsi_path: str | Path, max_px: int = 1024) -> tuple[np.ndarray, float]:
    """RGB uint8 thumbnail whose long side is at most `max_px`, and its scale (thumbnail px per level-0 px).

    Reads the coarsest pyramid level that is at least `max_px` on its long side, then shrinks it; a slide
    smaller than `max_px` comes back at full size (scale 1). Spot centres in level-0 pixels map to
    thumbnail pixels by multiplying with the scale.
    """
    _check_max_px(max_px)
    with Slide(wsi_path) as slide:
        return thumbnail_of(slide, max_px)


def _check_max_px(max_px) -> None:
    if isinstance(max_px, bool) or not isinstance(max_px, (int, np.integer)) or max_px < 16:
        raise ValueError(f"max_px must be an integer >= 16, got {max_px!r}")


def thumbnail_of(slide, max_px: int = 1024) -> tuple[np.ndarray, float]:
    """`read_thumbnail` of a slide already open (a `Slide`, or anything with its interface such as
    `cmrcnet.data.slide.OpenSlideSlide`)."""
    from PIL import Image

    _check_max_px(max_px)
    level = _source_level(slide, max_px)
    lvl = slide.levels[level]
    scale = min(1.0, max_px / max(slide.width, slide.height), 1.0 / lvl.downsample)
    size = (max(1, round(slide.width * scale)), max(1, round(slide.height * scale)))
    k = int(max(lvl.width / size[0], lvl.height / size[1]) // 2)  # pre-shrink only where it is many times too big
    if k >= 2:
        source = _read_shrunk(slide, level, k).round().astype(np.uint8)
    else:
        source = slide.read_region(0, 0, lvl.width, lvl.height, level=level)
    if source.shape[1] != size[0] or source.shape[0] != size[1]:
        source = np.asarray(Image.fromarray(source).resize(size, Image.Resampling.LANCZOS))
    return np.ascontiguousarray(source, dtype=np.uint8), float(scale)
