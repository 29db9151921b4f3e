"""HEST-1k's on-disk layout and the checks every reader of it shares.

A sample `ID` lives under a root as `st/ID.h5ad` (raw counts, `obsm['spatial']` = full-resolution pixel
centres), `wsis/ID.tif` (pyramidal TIFF) and `metadata/ID.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cmrcnet.errors import input_error

PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


def st_path(root: str | Path, sample: str) -> Path:
    return Path(root) / "st" / f"{sample}.h5ad"


def wsi_path(root: str | Path, sample: str) -> Path:
    return Path(root) / "wsis" / f"{sample}.tif"


def metadata_path(root: str | Path, sample: str) -> Path:
    return Path(root) / "metadata" / f"{sample}.json"


def sample_paths(root: str | Path, sample: str) -> dict[str, Path]:
    return {"st": st_path(root, sample), "wsi": wsi_path(root, sample), "metadata": metadata_path(root, sample)}


def read_metadata(path: str | Path) -> dict:
    """Read a sample's metadata JSON, with a one-line error when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "metadata file not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise input_error(path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise input_error(path, "metadata must be a JSON object")
    return meta


def metadata_pixel_size_um(meta: dict, where: str | Path = "metadata") -> float | None:
    """HEST's pixel size from the metadata; the estimated value is the one HEST recommends.

    The first key present (not null) decides: a value that is not a positive finite number is a one-line error
    naming `where` (the metadata file) and the key, never a silent fall-back to the TIFF tags, which may
    disagree with it. None when neither key is given."""
    for key in PIXEL_SIZE_KEYS:
        raw = meta.get(key)
        if raw is None:
            continue
        try:
            value = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not (np.isfinite(value) and value > 0):
            raise input_error(where, f"{key}: {raw!r} is not a pixel size (a positive number of um per pixel)")
        return value
    return None


def tiff_pixel_size_um(path: str | Path) -> float | None:
    """Pixel size from the TIFF resolution tags of the first page, or None when they are absent."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tags = page.tags
        if "XResolution" not in tags:
            return None
        num, den = tags["XResolution"].value
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        if not num or not den:
            return None
        per_unit = num / den  # pixels per unit
        unit = int(unit)
        if unit == 3:  # centimetre
            return 1e4 / per_unit
        if unit == 2:  # inch
            # An inch resolution of exactly 72 or 1 px/inch is a writer's default, not a measurement.
            if per_unit in (1.0, 72.0, 96.0, 300.0):
                return None
            return 25400.0 / per_unit
        return None


def pixel_size_um(meta: dict, metadata_file: str | Path, wsi_file: str | Path) -> float:
    """Full-resolution pixel size: metadata first, TIFF tags second, otherwise a clear error."""
    value = metadata_pixel_size_um(meta, metadata_file)
    if value is None:
        try:
            value = tiff_pixel_size_um(wsi_file)
        except Exception as exc:  # a corrupt TIFF is reported by the slide reader with more detail
            raise input_error(wsi_file, f"cannot read TIFF tags ({exc})") from None
    if value is None:
        raise input_error(
            wsi_file,
            f"no pixel size: neither {metadata_file} ({' / '.join(PIXEL_SIZE_KEYS)}) nor the TIFF resolution tags give one",
        )
    return value


def read_st(path: str | Path):
    """Read a sample's expression AnnData and check what every stage relies on."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "expression file (.h5ad) not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise input_error(path, f"cannot read as AnnData, file is corrupt or not .h5ad ({type(exc).__name__})") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise input_error(path, f"empty expression matrix ({adata.n_obs} spots x {adata.n_vars} genes)")
    if "spatial" not in adata.obsm:
        raise input_error(path, "no spatial coordinates (obsm['spatial'] is missing)")
    coords = np.asarray(adata.obsm["spatial"])
    if coords.ndim != 2 or coords.shape[1] < 2 or coords.shape[0] != adata.n_obs:
        raise input_error(path, f"obsm['spatial'] has shape {coords.shape}, expected ({adata.n_obs}, 2)")
    if not np.isfinite(coords[:, :2].astype(float)).all():
        raise input_error(path, "obsm['spatial'] contains NaN or infinite coordinates")
    if not adata.obs_names.is_unique:
        raise input_error(path, "spot barcodes (obs_names) are not unique")
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if "in_tissue" in adata.obs:  # one type (0/1) for every reader, whatever the file stores; checked here
        adata.obs["in_tissue"] = in_tissue_values(adata.obs["in_tissue"], path).astype(int)
    return adata


IN_TISSUE_TRUE = ("1", "true")
IN_TISSUE_FALSE = ("0", "false")


def in_tissue_values(values, where: str | Path = "obs['in_tissue']") -> np.ndarray:
    """`obs['in_tissue']` as booleans: 0/1 numbers, booleans, or the strings "1"/"0"/"True"/"False" (any case,
    as some exports store it); anything else is a one-line error naming `where`."""
    import pandas as pd

    array = np.asarray(values)
    if array.dtype.kind == "b":
        return array.astype(bool)
    if array.dtype.kind in "iuf" and np.isin(array, (0, 1)).all():  # the usual 0/1 column
        return array == 1
    series = pd.Series(array.astype(object))
    if series.map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return series.to_numpy(dtype=bool)
    numeric = pd.to_numeric(series, errors="coerce")
    text = series.map(lambda v: str(v).strip().lower() if isinstance(v, str) else None)
    is_true = numeric.eq(1) | text.isin(IN_TISSUE_TRUE)
    is_false = numeric.eq(0) | text.isin(IN_TISSUE_FALSE)
    bad = ~(is_true | is_false)
    if bad.any():
        shown = ", ".join(list(dict.fromkeys(repr(v) for v in series[bad].tolist()))[:3])
        n = int(bad.sum())
        raise input_error(where, f"obs['in_tissue'] holds {n} value{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} "
                                 f"not 0/1 or True/False (e.g. {shown})")
    return is_true.to_numpy(dtype=bool)


def in_tissue_mask(adata, where: str | Path = "obs['in_tissue']") -> np.ndarray:
    """Spots on tissue; all spots when the data carries no `in_tissue` column (e.g. Xenium pseudo-spots)."""
    if "in_tissue" not in adata.obs:
        return np.ones(adata.n_obs, dtype=bool)
    return in_tissue_values(adata.obs["in_tissue"], where)


SPOT_SETS = ("in_tissue", "all")


def spot_mask(adata, spots: str = "in_tissue") -> np.ndarray:
    """The spots a stage uses: in-tissue ones (`in_tissue`) or every spot of the st file (`all`, as the paper)."""
    if spots == "all":
        return np.ones(adata.n_obs, dtype=bool)
    if spots == "in_tissue":
        return in_tissue_mask(adata)
    raise ValueError(f"spots must be one of {', '.join(SPOT_SETS)}, got {spots!r}")
