"""The synthetic generator writes valid HEST-layout samples whose expression can be learnt from the image."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest
import tifffile

from cmrcnet.data.layout import (
    metadata_path,
    pixel_size_um,
    read_metadata,
    st_path,
    tiff_pixel_size_um,
    wsi_path,
)
from cmrcnet.data.synthetic import synthesize_sample
from cmrcnet.errors import CMRCNetError

PX = 0.35
MARKERS = ("EPCAM", "COL1A1", "PTPRC", "OLFM4")
CONTROL_PREFIXES = ("BLANK_", "NegControlProbe_", "UnassignedCodeword_")


def make(root, technology, sample_index=0, seed=7, size_um=800, **kwargs):
    sample = f"{technology}{sample_index}"
    summary = synthesize_sample(root, sample, technology=technology, sample_index=sample_index, seed=seed,
                                patient="P1", width_um=size_um, height_um=size_um, pixel_size_um=PX, **kwargs)
    return sample, summary


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    out = {tech: make(root, tech) for tech in ("visium", "xenium")}
    out["xenium_other"] = make(root, "xenium", sample_index=1)
    return root, out


def level0(root, sample):
    return tifffile.imread(wsi_path(root, sample))


@pytest.mark.parametrize("tech", ["visium", "xenium"])
def test_files_counts_and_tiff(samples, tech):
    root, out = samples
    sample, summary = out[tech]
    adata = ad.read_h5ad(st_path(root, sample))
    meta = read_metadata(metadata_path(root, sample))
    assert adata.X.dtype == np.int32 and adata.X.format == "csr"
    assert (adata.X.data >= 0).all() and adata.X.nnz > 0
    assert summary["n_spots"] == adata.n_obs and summary["n_genes"] == adata.n_vars
    assert set(adata.obs["in_tissue"]) == {0, 1} and adata.obs_names.is_unique
    xy = adata.obsm["spatial"]
    assert xy.shape == (adata.n_obs, 2)
    assert (xy >= 0).all() and (xy[:, 0] < summary["width_px"]).all() and (xy[:, 1] < summary["height_px"]).all()
    assert meta["fullres_px_width"] == summary["width_px"] == round(800 / PX)
    assert meta["st_technology"] == tech.capitalize() and meta["synthetic"] is True
    assert meta["pixel_size_um_estimated"] == pytest.approx(PX)
    with tifffile.TiffFile(wsi_path(root, sample)) as tif:
        page = tif.pages.first
        assert page.is_tiled and page.tilewidth == 256 and page.shape == (summary["height_px"], summary["width_px"], 3)
        levels = [page] + list(page.pages)
        assert len(levels) >= 3
        assert [lv.shape[1] for lv in levels[1:]] == [summary["width_px"] // 2**i for i in range(1, len(levels))]
    assert tiff_pixel_size_um(wsi_path(root, sample)) == pytest.approx(PX, rel=1e-4)
    assert pixel_size_um(meta, metadata_path(root, sample), wsi_path(root, sample)) == pytest.approx(PX)


def _nearest_distances(xy):
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def test_grid_geometry(samples):
    root, out = samples
    pitch_px = 100 / PX
    vis = ad.read_h5ad(st_path(root, out["visium"][0]))
    xy, rows = vis.obsm["spatial"], vis.obs["array_row"].to_numpy()
    assert np.allclose(_nearest_distances(xy), pitch_px)
    row_y = {r: xy[rows == r, 1] for r in np.unique(rows)}
    assert np.allclose(row_y[1][0] - row_y[0][0], pitch_px * math.sqrt(3) / 2)
    shift = xy[rows == 1, 0].min() - xy[rows == 0, 0].min()
    assert shift == pytest.approx(pitch_px / 2)  # odd rows offset by half a pitch
    xen = ad.read_h5ad(st_path(root, out["xenium"][0]))
    xy = xen.obsm["spatial"]
    assert np.allclose(_nearest_distances(xy), pitch_px)
    assert len(np.unique(xy[:, 0])) * len(np.unique(xy[:, 1])) == xen.n_obs  # full square grid
    for tech, diameter in (("visium", 55), ("xenium", 100)):
        meta = json.loads(metadata_path(root, out[tech][0]).read_text())
        assert meta["inter_spot_dist"] == 100 and meta["spot_diameter"] == diameter


def test_panels_and_sample_variation(samples):
    root, out = samples
    vis = ad.read_h5ad(st_path(root, out["visium"][0]))
    xen = ad.read_h5ad(st_path(root, out["xenium"][0]))
    other = ad.read_h5ad(st_path(root, out["xenium_other"][0]))
    for prefix in CONTROL_PREFIXES:
        assert xen.var_names.str.startswith(prefix).sum() >= 1
        assert not vis.var_names.str.startswith(prefix).any()
    controls = xen.var_names.str.startswith(CONTROL_PREFIXES)
    assert 0.03 <= controls.mean() <= 0.07 and xen.n_vars == 300 and vis.n_vars == 1000
    assert xen[:, controls].X.mean() < 0.01 * xen[:, ~controls].X.mean()
    assert set(MARKERS) <= set(vis.var_names) and set(MARKERS) <= set(xen.var_names)
    assert (vis.X.toarray() == 0).mean() > (xen.X.toarray() == 0).mean()  # visium sparser
    assert list(other.var_names) == list(xen.var_names)
    assert not np.array_equal(other.obs["in_tissue"], xen.obs["in_tissue"]) or \
        not np.array_equal(level0(root, out["xenium_other"][0]), level0(root, out["xenium"][0]))


def test_deterministic(samples, tmp_path):
    root = samples[0]
    sample, _ = make(tmp_path, "visium")
    a, b = ad.read_h5ad(st_path(root, sample)), ad.read_h5ad(st_path(tmp_path, sample))
    assert (a.X != b.X).nnz == 0 and np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert np.array_equal(level0(root, sample), level0(tmp_path, sample))
    assert st_path(root, sample).read_bytes() == st_path(tmp_path, sample).read_bytes()


def _r2(features, y):
    beta = np.linalg.lstsq(features, y, rcond=None)[0]
    return 1 - ((y - features @ beta) ** 2).sum() / ((y - y.mean()) ** 2).sum()


@pytest.mark.parametrize("tech", ["visium", "xenium"])
def test_morphology_predicts_markers(tmp_path, tech):
    """Mean colour + texture of the spot's image window explains much of each tissue marker."""
    sample, _ = make(tmp_path, tech, seed=3, size_um=1000)
    adata = ad.read_h5ad(st_path(tmp_path, sample))
    image = level0(tmp_path, sample)
    half = round(27.5 / PX)
    feats = []
    for x, y in np.round(adata.obsm["spatial"]).astype(int):
        window = image[y - half : y + half, x - half : x + half].astype(float)
        grey = window.mean(axis=2)
        feats.append([*window.reshape(-1, 3).mean(axis=0), grey.std(), (grey < 120).mean(), 1.0])
    on = adata.obs["in_tissue"].to_numpy() == 1
    feats = np.array(feats)[on]
    shuffled = feats[np.random.default_rng(0).permutation(len(feats))]
    real, null = [], []
    for gene in MARKERS:
        y = np.log1p(adata[:, gene].X.toarray().ravel())[on]
        real.append(_r2(feats, y))
        null.append(_r2(shuffled, y))
    assert np.mean(real) > 0.35 and min(real) > 0.1, real
    assert np.mean(null) < 0.15, null


def test_no_pixel_size(tmp_path):
    sample, _ = make(tmp_path, "xenium", size_um=600, write_pixel_size=False)
    meta = read_metadata(metadata_path(tmp_path, sample))
    assert "pixel_size_um_estimated" not in meta and "pixel_size_um_embedded" not in meta
    assert tiff_pixel_size_um(wsi_path(tmp_path, sample)) is None
    with pytest.raises(CMRCNetError, match="no pixel size"):
        pixel_size_um(meta, metadata_path(tmp_path, sample), wsi_path(tmp_path, sample))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"technology": "slideseq"}, "technology"),
        ({"size_um": 150}, "2x2"),
        ({"technology": "xenium", "n_panel_genes": 20}, "n_panel_genes"),
        ({"n_genes": 10}, "n_genes"),
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"seed": -1}, "seed"),
        ({"n_tissue_types": 5}, "n_tissue_types"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"technology": "visium", "sample_index": 0, "seed": 1, "patient": "P", "width_um": 600, "height_um": 600}
    size = kwargs.pop("size_um", None)
    if size is not None:
        args["width_um"] = args["height_um"] = size
    args.update(kwargs)
    with pytest.raises(CMRCNetError, match=match):
        synthesize_sample(tmp_path, "S", **args)
    assert not list(tmp_path.rglob("*.*"))  # nothing written
