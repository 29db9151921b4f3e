"""Where the tissue is on a slide: detected on a thumbnail, or read from a HEST tissue outline (GeoJSON).

Why: prediction on a new slide lays spots over the tissue only. Stained tissue is coloured (haematoxylin purple,
eosin pink) while glass is pale grey, so saturation (HSV) separates them; its Otsu threshold is kept within
[MIN_SATURATION, MAX_SATURATION] so that a slide with no background (a crop of tissue) keeps all its tissue and
a blank slide finds none. Closing joins tissue broken by pale gaps, small holes (gland lumens, fat) are filled
and specks (dust, debris) removed; sizes are in um, so the result does not depend on the thumbnail's size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cmrcnet.errors import input_error

MIN_SATURATION = 0.05  # glass and background stay below (synthetic background: 0.016)
MAX_SATURATION = 0.15  # even pale eosin-stained tissue lies above
WORK_UM_PER_PX = 8.0  # detection resolution: a Visium spot is about 7 pixels across
MIN_VALUE = 0.15  # darker pixels (scanner borders, pen, folds) have no reliable saturation and are not tissue
CLOSING_UM = 20.0  # radius of the closing that joins tissue across thin pale gaps
MIN_TISSUE_UM2 = 2 * 100.0 * 100.0  # tissue pieces smaller than two Visium pitches squared are specks
MAX_HOLE_UM2 = 4 * 100.0 * 100.0  # pale holes inside tissue up to this size are filled (lumens, fat)


def _keep_large(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """Connected components (8-connected) of `mask` of at least `min_px` pixels (and, with `keep_border`, every
    component touching the image border, whatever its size)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.copy()
    keep = np.bincount(labels.ravel()) >= min_px
    if keep_border:
        keep[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    keep[0] = False
    return keep[labels]


def detect_tissue(rgb: np.ndarray, um_per_px: float, where: str | Path = "slide") -> np.ndarray:
    """Boolean tissue mask, the shape of the RGB thumbnail `rgb` whose pixels are `um_per_px` wide (thumbnail
    pixels, not the slide's). The work is done at WORK_UM_PER_PX or coarser, so its cost does not grow with the
    thumbnail. One-line error naming `where` when no tissue is found."""
    from PIL import Image
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import disk

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ValueError(f"expected an RGB image (rows x cols x 3), got shape {rgb.shape}")
    if not (math.isfinite(um_per_px) and um_per_px > 0):
        raise ValueError(f"um_per_px must be positive, got {um_per_px!r}")
    shape = rgb.shape[:2]
    shrink = max(1.0, WORK_UM_PER_PX / um_per_px)
    if shrink > 1:
        size = (max(2, round(shape[1] / shrink)), max(2, round(shape[0] / shrink)))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(size, Image.Resampling.BOX))
        shrink = shape[1] / size[0]
    work_um = um_per_px * shrink
    hsv = rgb2hsv(rgb)
    sat = gaussian(hsv[..., 1], sigma=1.0)
    valid = hsv[..., 2] >= MIN_VALUE
    values = sat[valid]
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        threshold = MIN_SATURATION
    else:
        threshold = float(np.clip(threshold_otsu(values), MIN_SATURATION, MAX_SATURATION))
    mask = (sat > threshold) & valid
    px_area = work_um**2
    radius = int(round(CLOSING_UM / work_um))
    if radius >= 1 and mask.any():
        # pad so that closing does not glue tissue to the image border
        mask = ndimage.binary_closing(np.pad(mask, radius), disk(radius).astype(bool))[radius:-radius, radius:-radius]
    # fill holes up to MAX_HOLE_UM2; background reaching the border is no hole
    mask = ~_keep_large(~mask, MAX_HOLE_UM2 / px_area + 1, keep_border=True)
    mask = _keep_large(mask, MIN_TISSUE_UM2 / px_area)
    if not mask.any():
        raise input_error(where, f"no tissue found (no stained area of at least {MIN_TISSUE_UM2 / 1e6:g} mm2 with "
                                 f"saturation above {threshold:.2f}); give its outline with --tissue GEOJSON")
    if mask.shape != shape:
        mask = np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return mask


# ---------------------------------------------------------------------------------------------- GeoJSON


def _polygons(obj, path) -> list:
    """Every polygon (a list of rings, each a list of [x, y]) in a GeoJSON object."""
    if isinstance(obj, list):
        return [p for item in obj for p in _polygons(item, path)]
    if not isinstance(obj, dict):
        return []
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _polygons(obj.get("features") or [], path)
    if kind == "Feature":
        return _polygons(obj.get("geometry"), path)
    if kind == "GeometryCollection":
        return _polygons(obj.get("geometries") or [], path)
    if kind == "Polygon":
        return [obj.get("coordinates")]
    if kind == "MultiPolygon":
        return list(obj.get("coordinates") or [])
    return []


def _ring(ring, path) -> np.ndarray:
    try:
        xy = np.asarray(ring, dtype=float)
    except (TypeError, ValueError):
        xy = np.zeros((0, 0))
    if xy.ndim != 2 or xy.shape[0] < 3 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise input_error(path, "a polygon ring is not a list of at least 3 finite [x, y] points")
    return xy[:, :2]


def read_tissue_geojson(path: str | Path, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Boolean mask of `shape` (rows, cols) from a tissue outline: GeoJSON Polygons / MultiPolygons (holes as
    inner rings) in level-0 pixels, as HEST's tissue segmentation gives them, rasterised at `scale` (mask px per
    level-0 px). One-line errors naming the file when it is unreadable, has no polygons or none on the slide."""
    from skimage.draw import polygon

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "tissue outline (GeoJSON) not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise input_error(path, f"not valid JSON ({type(exc).__name__})") from None
    polys = _polygons(obj, path)
    if not polys:
        raise input_error(path, "no Polygon or MultiPolygon geometry; not a tissue outline")
    mask = np.zeros(shape, bool)
    for rings in polys:
        if not isinstance(rings, list) or not rings:
            raise input_error(path, "a polygon has no rings")
        for i, ring in enumerate(rings):
            xy = _ring(ring, path) * scale - 0.5  # pixel (r, c) covers [c, c + 1) x [r, r + 1)
            rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
            mask[rr, cc] = i == 0  # the outer ring adds tissue, inner rings (holes) remove it
    if not mask.any():
        raise input_error(path, f"no tissue: its polygons do not cover any of the {math.ceil(shape[1] / scale)} x "
                                f"{math.ceil(shape[0] / scale)} px slide (coordinates must be level-0 pixels)")
    return mask
