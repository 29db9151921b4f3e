"""Read RGB regions of a pyramidal TIFF by decoding only the tiles (or strips) they touch.

Why: HEST slides are up to ~100k x 100k px; loading a whole level costs tens of GB, while a patch needs a
handful of tiles. Decoded tiles go into a small LRU cache because neighbouring spots share tiles.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from cmrcnet.errors import input_error

JPEG_COMPRESSIONS = {6, 7, 33007, 34892}  # old JPEG, JPEG, ALT_JPEG, lossy JPEG (DNG)
DOWNSAMPLE_TOLERANCE = 0.01  # level sizes are rounded, so 2.0 may read as 2.0001


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size, how much smaller than level 0 it is, and how it is cut into segments."""

    width: int
    height: int
    downsample: float  # level-0 width / this level's width
    segment_height: int  # tile height, or rows per strip
    segment_width: int  # tile width, or the image width for strips
    segments_across: int
    page: Any  # tifffile TiffPage (or TiffFrame) holding offsets and byte counts


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _unsupported(key, n_pages: int) -> str | None:
    """Why a level is not a plain 8-bit grey/RGB/RGBA image we can decode segment by segment, or None."""
    if key.dtype is None or np.dtype(key.dtype) != np.uint8:
        return f"{key.dtype} pixels, expected 8-bit"
    if key.samplesperpixel not in (1, 3, 4):
        return f"{key.samplesperpixel} samples per pixel, expected 1, 3 or 4"
    if key.samplesperpixel > 1 and key.planarconfig != 1:
        return "colour planes stored separately (PlanarConfiguration=2)"
    if key.imagedepth != 1 or n_pages != 1:
        return "more than one image plane per level"
    if key.photometric not in (0, 1, 2, 6):  # MINISWHITE, MINISBLACK, RGB, YCBCR
        return f"photometric interpretation {key.photometric}"
    return None


def _level(page, level0_width: int) -> Level:
    key = page.keyframe
    if key.is_tiled:
        seg_h, seg_w = key.tilelength, key.tilewidth
    else:
        seg_h, seg_w = min(key.rowsperstrip or key.imagelength, key.imagelength), key.imagewidth
    return Level(
        width=key.imagewidth,
        height=key.imagelength,
        downsample=level0_width / key.imagewidth,
        segment_height=seg_h,
        segment_width=seg_w,
        segments_across=-(-key.imagewidth // seg_w),
        page=page,
    )


class Slide:
    """A pyramidal TIFF opened for region reads; use as a context manager so the file is closed."""

    def __init__(self, path: str | Path, tile_cache_size: int = 512):
        import tifffile

        self.path = Path(path)
        self.tile_cache_size = int(tile_cache_size)
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._tif = None
        if not self.path.is_file():
            raise input_error(self.path, "slide image (TIFF) not found")
        try:
            self._tif = tifffile.TiffFile(self.path)
            if not self._tif.series:
                raise ValueError("no image series")
            pages = [(lvl.pages[0], len(lvl.pages)) for lvl in self._tif.series[0].levels]
            problems = [_unsupported(page.keyframe, n) for page, n in pages]
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a damaged file
            self.close()
            raise input_error(self.path, f"not a readable TIFF, file is corrupt or not a TIFF ({_one_line(exc)})") from None
        problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            self.close()
            raise input_error(self.path, f"not an RGB-like slide ({problem})")
        self.width = pages[0][0].keyframe.imagewidth
        self.height = pages[0][0].keyframe.imagelength
        self.levels = [_level(page, self.width) for page, _ in pages]

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is not coarser than asked for, so a read never has to upsample."""
        best = 0
        for i, lvl in enumerate(self.levels):
            if lvl.downsample <= downsample * (1 + DOWNSAMPLE_TOLERANCE) and lvl.downsample > self.levels[best].downsample:
                best = i
        return best

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, in that level's pixels; parts outside the image are `fill`."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} out of range (slide has {len(self.levels)})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        x, y, w, h = int(x), int(y), int(w), int(h)
        lvl = self.levels[level]
        out = np.full((h, w, 3), fill, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lvl.width), min(y + h, lvl.height)
        if x0 >= x1 or y0 >= y1:
            return out
        sh, sw = lvl.segment_height, lvl.segment_width
        for ty in range(y0 // sh, (y1 - 1) // sh + 1):
            for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                seg = self._segment(level, ty * lvl.segments_across + tx)
                # overlap of the region with this segment, in level pixels
                ox0, oy0 = max(x0, tx * sw), max(y0, ty * sh)
                ox1, oy1 = min(x1, (tx + 1) * sw), min(y1, (ty + 1) * sh)
                if seg is None:  # empty segment (byte count 0): leave the fill value
                    continue
                out[oy0 - y:oy1 - y, ox0 - x:ox1 - x] = seg[oy0 - ty * sh:oy1 - ty * sh, ox0 - tx * sw:ox1 - tx * sw]
        return out

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Decoded RGB segment (tile or strip), from the LRU cache when possible."""
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        seg = self._decode(level, index)
        if self.tile_cache_size > 0:
            self._cache[key] = seg
            while len(self._cache) > self.tile_cache_size:
                self._cache.popitem(last=False)
        return seg

    def _decode(self, level: int, index: int) -> np.ndarray | None:
        page = self.levels[level].page
        keyframe = page.keyframe
        try:
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            if count == 0:
                return None
            fh = self._tif.filehandle
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
            if len(data) != count:
                raise ValueError(f"file ends early ({len(data)} of {count} bytes)")
            kwargs = {}
            if keyframe.compression in JPEG_COMPRESSIONS:
                kwargs = {"jpegtables": page.jpegtables, "jpegheader": keyframe.jpegheader}
            arr, _, shape = keyframe.decode(data, index, **kwargs)
            # decode returns (depth, rows, cols, samples); strips at the bottom edge are shorter
            arr = np.asarray(arr).reshape(shape[1], shape[2], shape[3])
        except Exception as exc:  # noqa: BLE001 - codecs raise their own error types
            raise input_error(
                self.path, f"corrupt image data in level {level} segment {index} ({_one_line(exc)})"
            ) from None
        if arr.shape[2] == 1:
            if keyframe.photometric == 0:  # MINISWHITE: 0 is white
                arr = 255 - arr
            return np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3])  # RGBA: drop alpha

    def close(self) -> None:
        self._cache.clear()
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lvl.width}x{lvl.height}" for lvl in self.levels)
        return f"Slide({str(self.path)!r}, levels=[{sizes}])"


# ---------------------------------------------------------------------------------------------- other formats

# Vendor formats read through OpenSlide (an optional dependency): `open_slide` opens these with it.
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
OPENSLIDE_TILE = 256  # read size assumed for the tile cache when the file does not say


class OpenSlideSlide:
    """A vendor slide (SVS, NDPI, MRXS, ...) read through OpenSlide, with `Slide`'s interface: `levels`,
    `best_level`, `read_region(x, y, w, h, level, fill)` in that level's pixels, `tile_cache_size` (OpenSlide keeps
    its own cache, so it is only recorded), `pixel_size_um()` and use as a context manager."""

    def __init__(self, path: str | Path, tile_cache_size: int = 512):
        self.path = Path(path)
        self.tile_cache_size = int(tile_cache_size)
        self._osr = None
        if not self.path.exists():
            raise input_error(self.path, "slide image not found")
        try:
            import openslide
        except ImportError:
            raise input_error(self.path, f"{self.path.suffix} slides are read through OpenSlide, which is not "
                                         "installed (pip install openslide-python openslide-bin); or convert the "
                                         "slide to a pyramidal TIFF") from None
        try:
            self._osr = openslide.OpenSlide(str(self.path))
            dims, downsamples = self._osr.level_dimensions, self._osr.level_downsamples
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises its own error types for damaged files
            self.close()
            raise input_error(self.path, f"not a readable slide ({_one_line(exc)})") from None
        props = self._osr.properties
        self.width, self.height = (int(v) for v in dims[0])
        self.levels = []
        for i, ((w, h), down) in enumerate(zip(dims, downsamples)):
            tw = int(props.get(f"openslide.level[{i}].tile-width", OPENSLIDE_TILE) or OPENSLIDE_TILE)
            th = int(props.get(f"openslide.level[{i}].tile-height", OPENSLIDE_TILE) or OPENSLIDE_TILE)
            self.levels.append(Level(width=int(w), height=int(h), downsample=float(down), segment_height=th,
                                     segment_width=tw, segments_across=-(-int(w) // tw), page=None))

    best_level = Slide.best_level

    def pixel_size_um(self) -> float | None:
        """Level-0 pixel size from the vendor metadata (openslide.mpp-x), or None."""
        try:
            value = float(self._osr.properties.get("openslide.mpp-x", "nan"))
        except (TypeError, ValueError):
            return None
        return value if np.isfinite(value) and value > 0 else None

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, in that level's pixels; transparent parts (off the slide) are `fill`."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} out of range (slide has {len(self.levels)})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        down = self.levels[level].downsample
        try:
            rgba = np.asarray(self._osr.read_region((round(x * down), round(y * down)), level, (int(w), int(h))))
        except Exception as exc:  # noqa: BLE001
            raise input_error(self.path, f"corrupt image data in level {level} ({_one_line(exc)})") from None
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + float(fill) * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path):
    """A slide opened for region reads: vendor formats (OPENSLIDE_SUFFIXES) through OpenSlide, everything else
    (TIFF, OME-TIFF, BigTIFF) with `Slide`. Use as a context manager."""
    if Path(path).suffix.lower() in OPENSLIDE_SUFFIXES:
        return OpenSlideSlide(path)
    return Slide(path)


def file_pixel_size_um(slide) -> float | None:
    """The level-0 pixel size (um) a slide file records: OpenSlide's mpp, the TIFF resolution tags, or the OME-XML
    PhysicalSizeX; None when it records none."""
    if hasattr(slide, "pixel_size_um"):
        return slide.pixel_size_um()
    from cmrcnet.data.layout import tiff_pixel_size_um

    value = tiff_pixel_size_um(slide.path)
    if value is None and slide._tif is not None and slide._tif.is_ome:
        value = _ome_pixel_size_um(slide._tif.ome_metadata)
    return value


_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_pixel_size_um(xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, in um (OME's default unit), or None."""
    import re

    if not xml:
        return None
    match = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not match:
        return None
    size = re.search(r'\bPhysicalSizeX="([^"]+)"', match.group(0))
    unit = re.search(r'\bPhysicalSizeXUnit="([^"]+)"', match.group(0))
    try:
        value = float(size.group(1)) * _OME_UNITS_UM[unit.group(1) if unit else "µm"] if size else math.nan
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
