"""Predict expression over the tissue of a new whole slide, with no spatial transcriptomics: AnnData plus maps.

How: the slide is opened (pyramidal TIFF / OME-TIFF; SVS, NDPI, MRXS through OpenSlide when installed) and its
pixel size read from the file or given. The tissue is found on a thumbnail (`cmrcnet.data.tissue`) or read from a
HEST tissue outline, and spots are laid over it on the training technology's lattice (`cmrcnet.data.spot_layout`).
Each spot's patch is cut by the same `PatchCutter` as training cut its patches, at the um/px and size the model
records, and goes through the same `to_model_images` + `normalise` as a training patch. Spots stream through in
(y, x) order, in batches: patches -> image embeddings -> exact top-k retrieval against the reference bank the model
carries (CMRCNet, BLEEP), or direct regression with optional 8-fold flip/rotation averaging (STNet). Memory stays
at one chunk of patches and embeddings plus the output matrix, whatever the slide size.

Output: AnnData with X = predicted expression (float32), `obsm['spatial']` in level-0 pixels and `uns['spatial']`
as scanpy/squidpy expect it (thumbnail as the `hires` image, its scale, the spot diameter), `uns['cmrcnet']` (JSON:
model, its fingerprint, settings, versions), written atomically; and, on request, PNG + PDF maps of chosen genes.
Bad input is a one-line error naming the file or option, raised before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, provenance

log = logging.getLogger("cmrcnet")

THUMBNAIL_PX = 2000  # long side of the thumbnail kept in the AnnData (as Visium's `hires` image) and searched for tissue
# A slide may be at most this much coarser than the resolution the model was trained at: beyond it its patches
# would be upsampled, blurrier than anything the model saw in training.
MAX_UPSAMPLING = 1.25
RETRIEVAL_CHUNK = 8192  # spots embedded before one retrieval search (a search per chunk amortises the bank's copy)
DEFAULT_MAP_GENES = 3  # genes drawn when maps are asked for without genes: the most variable predictions


def _positive_number(flag: str, value) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise input_error(flag, f"must be a number above 0, got {value!r}")
    return number


def _positive_int(flag: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise input_error(flag, f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def _check_output(path) -> Path:
    """Refuse an output that names a folder before any work is done (atomic_path would, but only at the end)."""
    if str(path).endswith(("/", "\\")) or Path(path).is_dir():
        raise input_error(path, "is a folder; give the output file's name (.h5ad)")
    return Path(path)


def _check_genes(genes, model_genes: list[str], model_path) -> list[str]:
    """The genes to draw, each one the model predicts; otherwise a one-line error with close names."""
    from cmrcnet.figures.common import close_names

    genes = [str(g) for g in genes]
    known = set(model_genes)
    for gene in genes:
        if gene not in known:
            close = close_names(gene, model_genes)
            hint = f"close names: {', '.join(close)}" if close else "no close names"
            raise input_error(model_path, f"gene {gene} is not one of the {len(model_genes)} genes the model "
                                          f"predicts; {hint}")
    return list(dict.fromkeys(genes))


def _check_centres(centres, slide, where: str = "centres") -> np.ndarray:
    xy = np.asarray(centres, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0 or not np.isfinite(xy).all():
        raise input_error(where, f"expected finite (x, y) level-0 pixel centres, shape (n, 2); got {xy.shape}")
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= slide.width) | (xy[:, 1] >= slide.height)
    if outside.any():
        raise input_error(where, f"{int(outside.sum())} centres lie outside the {slide.width}x{slide.height} px "
                                 f"slide (first: {xy[outside][0].tolist()})")
    return xy


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _model_input(patches: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 patches -> normalised model input, as `SpotDataset.__getitem__` makes it."""
    from cmrcnet.data.datasets import normalise, to_model_images

    return normalise(to_model_images(patches, input_size)).contiguous()


def predict_slide(model_path, slide_path, out_h5ad, *, mpp: float | None = None, tissue=None,
                  layout: str | None = None, pitch_um: float | None = None, centres=None, k: int = 50,
                  weighted: bool = False, tta: bool = False, genes=(), maps_prefix=None, batch_size: int = 256,
                  device: str | None = None, progress: bool = True, expected_model: str | None = None) -> dict:
    """Predict the expression of spots over the tissue of `slide_path` with the trained model `model_path`
    (a `best.pt` from `cmrcnet train`) and write them to `out_h5ad`; return a summary.

    `mpp`: the slide's level-0 pixel size (um), when its file does not record one (or records a wrong one).
    `tissue`: a GeoJSON tissue outline (level-0 px) instead of detection. `layout` (visium / xenium; default: the
    technology the model was trained on, else visium) and `pitch_um` set the spot lattice. `centres` (n, 2)
    level-0 pixel centres replace tissue detection and the lattice. `k`, `weighted`: retrieval settings (as
    evaluation.k, evaluation.weighted); `tta`: average the 8 flips/rotations (regression models). `genes` with
    `maps_prefix`: `{maps_prefix}.png` and `.pdf`, a map (panel) per gene (without `genes`, the DEFAULT_MAP_GENES
    most variable predictions).
    """
    import anndata as ad
    import pandas as pd
    from tqdm import tqdm

    from cmrcnet.data.datasets import apply_dihedral
    from cmrcnet.data.patches import PatchCutter
    from cmrcnet.data.slide import file_pixel_size_um, open_slide
    from cmrcnet.data.spot_layout import geometry, spots_on_tissue
    from cmrcnet.data.tissue import detect_tissue, read_tissue_geojson
    from cmrcnet.figures.thumbnail import thumbnail_of
    from cmrcnet.inference.bank import patch_settings_of, read_bank
    from cmrcnet.inference.predict import load_trained_model
    from cmrcnet.inference.retrieval import predict_by_retrieval
    from cmrcnet.train import file_identity, fingerprint_hash

    start = time.perf_counter()
    out_h5ad = _check_output(out_h5ad)
    batch_size = _positive_int("batch_size", batch_size)
    if mpp is not None:
        mpp = _positive_number("--mpp", mpp)
    if maps_prefix is not None and (str(maps_prefix).strip() == "" or str(maps_prefix).endswith(("/", "\\"))):
        raise input_error("--maps", f"{str(maps_prefix)!r} is no file name; give the maps' path without .png/.pdf")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ---- the model: everything it must carry is checked before the slide is touched
    model, ckpt = load_trained_model(model_path, dev, expected_model)
    model_genes = [str(g) for g in ckpt["genes"]]
    if model.slide_level:
        raise input_error(model_path, f"a slide-level {ckpt['model_name']} model predicts whole training slides "
                                      "at once, not spots of a new slide; use a spot-level method (cmrcnet, bleep, "
                                      "stnet)")
    settings = patch_settings_of(ckpt, model_path)
    fill = int((ckpt.get("patches") or {}).get("fill", 255))
    retrieval = model.kind == "retrieval"
    bank = None
    if retrieval:
        bank = read_bank(ckpt, model_path)
        k = _positive_int("--k", k)
        if k > len(bank.expression):
            raise input_error("--k", f"{k} neighbours requested but the model's reference bank has "
                                     f"{len(bank.expression)} spots")
    if retrieval and tta:
        log.info("%s: test-time augmentation applies to regression models; not used by this %s model", model_path,
                 ckpt["model_name"])
    draw = _check_genes(genes, model_genes, model_path)
    if draw and maps_prefix is None:
        log.warning("genes %s given without a maps prefix: no maps are drawn", ", ".join(draw))
    technology = layout or ckpt.get("technology") or "visium"
    geom = geometry(technology, pitch_um, where="--layout" if layout else f"{model_path}: technology")

    # ---- the slide: pixel size, tissue, spots
    with open_slide(slide_path) as slide:
        slide_um, um_source = mpp, "--mpp"
        if slide_um is None:
            slide_um, um_source = file_pixel_size_um(slide), "file"
        if slide_um is None:
            raise input_error(slide_path, "no pixel size: the file records none (TIFF resolution tags, OME "
                                          "PhysicalSizeX, OpenSlide mpp); give it with --mpp (um per pixel)")
        if slide_um > settings["um_per_px"] * MAX_UPSAMPLING:
            raise input_error(slide_path, f"slide is {slide_um:.3g} um/px, coarser than the {settings['um_per_px']:g} "
                                          f"um/px the model was trained at: its patches would be upsampled "
                                          f"{slide_um / settings['um_per_px']:.2g}x; use a finer scan (or check "
                                          f"--mpp), or a model trained at {slide_um:.3g} um/px or coarser")
        cutter = PatchCutter(slide, settings["size_px"], settings["um_per_px"], slide_um, fill=fill,
                             advice="the slide has no pyramid level coarse enough for the model's patches")
        thumbnail, scale = thumbnail_of(slide, THUMBNAIL_PX)
        rows = cols = None
        if centres is not None:
            xy, tissue_source = _check_centres(centres, slide), "centres given"
        else:
            if tissue is not None:
                mask, tissue_source = read_tissue_geojson(tissue, thumbnail.shape[:2], scale), str(tissue)
            else:
                mask, tissue_source = detect_tissue(thumbnail, slide_um / scale, where=slide_path), "detected"
            spots = spots_on_tissue(mask, scale, slide.width, slide.height, slide_um, geom)
            if len(spots["x_px"]) == 0:
                raise input_error(slide_path, f"no spot of the {technology} lattice ({geom.pitch_um:g} um pitch) has "
                                              "its centre on the tissue found; the tissue is smaller than a spot")
            xy = np.column_stack([spots["x_px"], spots["y_px"]])
            rows, cols = spots["row"], spots["col"]
        n = len(xy)
        log.info("%s: %d spots (%s layout, %g um pitch, tissue %s), %d-px patches at %g um/px from level %d, "
                 "%s model on %s", slide_path, n, technology, geom.pitch_um, tissue_source, settings["size_px"],
                 settings["um_per_px"], cutter.level, ckpt["model_name"], dev)

        # ---- stream the spots: patches -> model input -> embeddings / predictions
        order = np.lexsort((xy[:, 0], xy[:, 1]))  # (y, x): rows of tiles, for the tile cache
        predicted = np.empty((n, len(model_genes)), dtype=np.float32)
        chunk = max(batch_size, RETRIEVAL_CHUNK // batch_size * batch_size) if retrieval else batch_size
        buffer = np.empty((min(batch_size, n), settings["size_px"], settings["size_px"], 3), dtype=np.uint8)
        refs = bank.embeddings.to(dev) if retrieval else None
        codes = range(8) if tta and not retrieval else (0,)
        bar = tqdm(total=n, unit="spot", desc=f"predict {Path(slide_path).name}", disable=not progress)
        try:
            with torch.no_grad():
                for c0 in range(0, n, chunk):
                    idx = order[c0: c0 + chunk]
                    parts = []
                    for b0 in range(0, len(idx), batch_size):
                        bidx = idx[b0: b0 + batch_size]
                        patches = cutter.cut(xy[bidx], out=buffer[: len(bidx)])
                        images = _model_input(patches, model.input_size).to(dev)
                        if retrieval:
                            with _autocast(dev):
                                parts.append(model.embed_image(images).float().cpu())
                        else:
                            total = 0
                            for code in codes:
                                with _autocast(dev):
                                    total = total + model.predict({"image": apply_dihedral(images, code)}).float()
                            parts.append((total / len(codes)).cpu())
                        bar.update(len(bidx))
                    if retrieval:
                        values = predict_by_retrieval(torch.cat(parts), refs, bank.expression, [k],
                                                      weighted=weighted, device=dev)[k]
                    else:
                        values = torch.cat(parts).numpy()
                    if values.shape != (len(idx), len(model_genes)):
                        raise input_error(model_path, f"the model predicts {values.shape[1]} values per spot for its "
                                                      f"{len(model_genes)} genes")
                    predicted[idx] = values
        finally:
            bar.close()
        width, height = slide.width, slide.height
    if not np.isfinite(predicted).all():
        raise input_error(model_path, "predictions contain NaN or infinite values")

    # ---- AnnData, as scanpy/squidpy read Visium
    library = Path(slide_path).name.split(".")[0] or "slide"
    diameter_px = geom.diameter_um / slide_um
    if rows is not None:
        names = [f"{r}x{c}" for r, c in zip(rows, cols)]
        obs = pd.DataFrame({"array_row": rows, "array_col": cols}, index=names)
    else:
        obs = pd.DataFrame(index=[f"spot{i}" for i in range(n)])
    obs["in_tissue"] = 1
    obs["x"], obs["y"] = xy[:, 0], xy[:, 1]
    result = ad.AnnData(X=predicted, obs=obs, var=pd.DataFrame(index=pd.Index(model_genes, name="gene")))
    result.obsm["spatial"] = xy.astype(np.float64)
    result.uns["spatial"] = {library: {
        "images": {"hires": thumbnail},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(diameter_px)},
        "metadata": {"source_image_path": str(slide_path), "pixel_size_um": float(slide_um),
                     "software_version": "cmrcnet predict-slide"},
    }}
    fp = ckpt.get("fingerprint")
    info = {
        "model_path": str(model_path), "model_file": file_identity(model_path), "model_name": ckpt["model_name"],
        "method": ckpt.get("method"), "kind": model.kind, "fold": ckpt.get("fold"), "best_epoch": ckpt.get("epoch"),
        "model_fingerprint": fingerprint_hash(fp) if fp else None, "trained_technology": ckpt.get("technology"),
        "slide": str(slide_path), "slide_size_px": [int(width), int(height)], "pixel_size_um": float(slide_um),
        "pixel_size_source": um_source, "patches": {**settings, "fill": fill, "level": cutter.level},
        "tissue": tissue_source, "layout": {"technology": technology, "shape": geom.shape, "pitch_um": geom.pitch_um,
                                            "spot_diameter_um": geom.diameter_um},
        "k": k if retrieval else None, "weighted": bool(weighted) if retrieval else None,
        "tta": bool(tta) if not retrieval else None,
        "n_reference_spots": len(bank.expression) if retrieval else None, "n_spots": int(n),
        "device": str(dev), "library_id": library,
    }
    result.uns["cmrcnet"] = json.dumps({**info, "provenance": provenance()}, default=str)

    maps = []
    with atomic_path(out_h5ad) as tmp:
        result.write_h5ad(tmp)
        if maps_prefix is not None:
            from cmrcnet.figures.slide_maps import prediction_maps

            if not draw:
                variance = predicted.var(axis=0)
                draw = [model_genes[i] for i in np.argsort(-variance, kind="stable")[:DEFAULT_MAP_GENES]]
            columns = {gene: predicted[:, model_genes.index(gene)] for gene in draw}
            maps = prediction_maps(columns, xy[:, 0], xy[:, 1], thumbnail, scale, maps_prefix, diameter_px,
                                   title=f"{library}: expression predicted by {ckpt.get('method') or ckpt['model_name']} "
                                         f"({n} spots)")
    seconds = time.perf_counter() - start
    log.info("%s: %d spots predicted in %.1f s (%.0f spots/s) -> %s", slide_path, n, seconds, n / seconds, out_h5ad)
    return {**info, "out": str(out_h5ad), "maps": [str(p) for p in maps], "seconds": round(seconds, 3)}
