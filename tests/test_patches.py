"""Patch extraction: HEST patch layout, right pixels at the right resolution, edge handling, atomic failure."""

from __future__ import annotations

import json
import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from test_slide import pattern, write_pyramid

from cmrcnet.data.patches import extract_patches
from cmrcnet.errors import CMRCNetError

GRID = [(x, y) for y in (300, 600, 900, 1200) for x in (300, 600, 900, 1200, 1500)]  # patches fully inside
EDGE = [(100, 700), (2000, 1500)]  # in tissue, but a 448 px (level-0) window reaches past the slide edge
OFF_TISSUE = [(1000, 1000), (-500, 3000)]  # in_tissue = 0; the second is even off the slide


def write_st(path, spots, in_tissue, with_spatial=True):
    n = len(spots)
    obs = pd.DataFrame(
        {"in_tissue": in_tissue, "array_row": np.arange(n) // 5, "array_col": np.arange(n) % 5},
        index=[f"spot{i:02d}-1" for i in range(n)],
    )
    counts = np.random.default_rng(0).poisson(3.0, size=(n, 4)).astype(np.int32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D"]))
    if with_spatial:
        adata.obsm["spatial"] = np.asarray(spots, dtype=float)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


@pytest.fixture
def sample(tmp_path):
    """A tiny HEST-layout sample: 2048x1536 px slide at 0.25 um/px (levels /1 /2 /4), 26 spots, metadata."""

    def _make(spots=None, in_tissue=None, meta=None, tiff_pixel_size_um=0.25, **tiff_opts):
        spots = GRID + EDGE + OFF_TISSUE if spots is None else spots
        if in_tissue is None:
            in_tissue = [1] * (len(spots) - len(OFF_TISSUE)) + [0] * len(OFF_TISSUE)
        paths = {
            "wsi": tmp_path / "wsis" / "S1.tif",
            "st": tmp_path / "st" / "S1.h5ad",
            "metadata": tmp_path / "metadata" / "S1.json",
        }
        paths["wsi"].parent.mkdir(parents=True, exist_ok=True)
        pyramid = write_pyramid(paths["wsi"], pattern(), pixel_size_um=tiff_pixel_size_um, **tiff_opts)
        write_st(paths["st"], spots, in_tissue)
        paths["metadata"].parent.mkdir(parents=True, exist_ok=True)
        meta = {"pixel_size_um_estimated": 0.25} if meta is None else meta
        paths["metadata"].write_text(json.dumps(meta))
        out = {"out_h5": tmp_path / "out" / "S1.h5", "out_parquet": tmp_path / "out" / "S1.parquet"}
        return paths, out, pyramid

    return _make


def run(paths, out, **kwargs):
    kwargs.setdefault("progress", False)
    return extract_patches(paths["wsi"], paths["st"], paths["metadata"], out["out_h5"], out["out_parquet"],
                           sample="S1", **kwargs)


def assert_no_outputs(out):
    assert not out["out_h5"].exists() and not out["out_parquet"].exists()
    if out["out_h5"].parent.exists():
        assert list(out["out_h5"].parent.iterdir()) == []  # no temporary files left either


def test_hest_layout_and_table(sample):
    paths, out, _ = sample()
    summary = run(paths, out, provenance_info={"step": "patches"})
    n = len(GRID) + len(EDGE)
    assert summary["n_spots"] == n and summary["n_written"] == n
    assert summary["n_padded"] == len(EDGE) and summary["n_dropped"] == 0
    assert summary["level"] == 1 and summary["level_downsample"] == 2.0  # 0.25 um/px slide, 0.5 um/px target
    assert summary["slide_pixel_size_um"] == 0.25 and summary["seconds"] >= 0
    with h5py.File(out["out_h5"]) as h5:
        img, barcode, coords = h5["img"], h5["barcode"], h5["coords"]
        assert img.shape == (n, 224, 224, 3) and img.dtype == np.uint8
        assert img.chunks == (1, 224, 224, 3) and img.compression == "lzf"
        assert barcode.shape == (n, 1) and barcode.dtype.kind == "S"
        assert coords.shape == (n, 2) and coords.dtype == np.int64
        attrs = dict(h5.attrs)
        barcodes = [b.decode() for b in barcode[:, 0]]
        coords = coords[:]
    assert attrs["patch_size_px"] == 224 and attrs["um_per_px"] == 0.5 and attrs["level"] == 1
    assert attrs["level_downsample"] == 2.0 and attrs["slide_pixel_size_um"] == 0.25
    assert (attrs["n_spots"], attrs["n_padded"], attrs["n_dropped"], attrs["sample"]) == (n, 2, 0, "S1")
    assert json.loads(attrs["provenance"]) == {"step": "patches"}

    table = pd.read_parquet(out["out_parquet"])
    assert list(table.columns) == [
        "barcode", "sample", "patch_index", "x_px", "y_px", "array_row", "array_col", "in_tissue", "padded",
    ]
    assert table["barcode"].tolist() == barcodes and table["patch_index"].tolist() == list(range(n))
    assert (table["sample"] == "S1").all() and (table["in_tissue"] == 1).all()
    assert "spot22-1" not in barcodes and "spot23-1" not in barcodes  # in_tissue = 0
    assert table["padded"].sum() == 2 and set(table.loc[table["padded"], "barcode"]) == {"spot20-1", "spot21-1"}
    assert list(zip(table["y_px"], table["x_px"])) == sorted(zip(table["y_px"], table["x_px"]))  # (y, x) order
    # HEST convention: coords = level-0 top-left corner of the 448 px (level-0) window
    np.testing.assert_array_equal(coords, np.stack([table["x_px"] - 224, table["y_px"] - 224], 1))


@pytest.mark.parametrize(
    ("um_per_px", "level"),
    [(0.5, 1), (0.6, 1), (1.0, 2), (0.25, 0), (0.3, 0)],
)
def test_patch_pixels_and_level(sample, um_per_px, level):
    """Each patch is the window around its spot, read from the coarsest sufficient level, resized."""
    paths, out, pyramid = sample()
    summary = run(paths, out, um_per_px=um_per_px, patch_px=112)
    assert summary["level"] == level
    ds = 2.0**level
    window = round(112 * um_per_px / 0.25 / ds)
    table = pd.read_parquet(out["out_parquet"])
    with h5py.File(out["out_h5"]) as h5:
        for i in table.index[~table["padded"]][:6]:
            cx, cy = table.loc[i, "x_px"] / ds, table.loc[i, "y_px"] / ds
            x, y = int(np.rint(cx - window / 2)), int(np.rint(cy - window / 2))
            crop = pyramid[level][y:y + window, x:x + window]
            expected = np.asarray(Image.fromarray(crop).resize((112, 112), Image.Resampling.LANCZOS))
            got = h5["img"][table.loc[i, "patch_index"]]
            if window == 112:
                np.testing.assert_array_equal(got, crop)
            assert np.abs(got.astype(float) - expected).mean() < 1.0


def test_upsampling_warns_and_uses_level0(sample, caplog):
    paths, out, _ = sample(meta={"pixel_size_um_estimated": 1.0})  # claims a slide coarser than 0.5 um/px
    logger = logging.getLogger("cmrcnet")
    logger.addHandler(caplog.handler)  # the project logger may not propagate to the root logger
    try:
        summary = run(paths, out, um_per_px=0.5, patch_px=64)
    finally:
        logger.removeHandler(caplog.handler)
    assert summary["level"] == 0 and summary["n_written"] > 0
    assert any(r.levelno == logging.WARNING and "upsampled" in r.getMessage() for r in caplog.records)


def test_pad_versus_drop(sample):
    paths, out, _ = sample()
    summary = run(paths, out, off_slide="pad", fill=17)
    with h5py.File(out["out_h5"]) as h5:
        table = pd.read_parquet(out["out_parquet"])
        left = int(table.index[table["barcode"] == "spot20-1"][0])  # centre x=100: 124 px of 448 are off-slide
        patch = h5["img"][left]
    assert (patch[:, :60] == 17).all() and (patch[:, 70:] != 17).any()
    assert summary["n_padded"] == 2
    with h5py.File(out["out_h5"]) as h5:
        assert h5.attrs["fill"] == 17  # recorded: prediction on a new slide pads with the same colour

    out["out_h5"].unlink()
    out["out_parquet"].unlink()
    summary = run(paths, out, off_slide="drop")
    assert (summary["n_dropped"], summary["n_padded"], summary["n_written"]) == (2, 0, len(GRID))
    table = pd.read_parquet(out["out_parquet"])
    assert len(table) == len(GRID) and not table["padded"].any()
    with h5py.File(out["out_h5"]) as h5:
        assert h5["img"].shape[0] == len(GRID) and h5.attrs["n_dropped"] == 2


def test_all_spots_cuts_every_spot_of_the_st_file(sample):
    """`spots="all"` (the paper's spot counts): off-tissue spots get patches too; one centred off the slide is
    handled by `off_slide` instead of stopping the run, since only in-tissue spots must lie on the slide."""
    paths, out, _ = sample()
    summary = run(paths, out, spots="all", off_slide="pad", fill=17)
    n = len(GRID) + len(EDGE) + len(OFF_TISSUE)
    assert summary["n_spots"] == n and summary["n_written"] == n and summary["n_padded"] == 3
    table = pd.read_parquet(out["out_parquet"]).set_index("barcode")
    assert table.loc["spot22-1", "in_tissue"] == 0 and table.loc["spot23-1", "in_tissue"] == 0
    assert table["in_tissue"].sum() == len(GRID) + len(EDGE) and bool(table.loc["spot23-1", "padded"])
    with h5py.File(out["out_h5"]) as h5:
        assert (h5["img"][int(table.loc["spot23-1", "patch_index"])] == 17).all()  # wholly off the slide
        assert h5.attrs["spots"] == "all"
    for path in out.values():
        path.unlink()
    summary = run(paths, out, spots="all", off_slide="drop")
    assert (summary["n_written"], summary["n_dropped"]) == (len(GRID) + 1, 3)  # the on-slide off-tissue spot stays


def test_normalised_spots_and_patches_agree_for_either_spot_set(sample, tmp_path):
    """The normalised h5ad and the patch file hold the same spots; the training join keeps the h5ad's order."""
    from cmrcnet.data.datasets import load_sample
    from cmrcnet.data.genes import normalise_sample

    paths, out, _ = sample(spots=GRID + [(1000, 1000), (1300, 1000)])  # two off-tissue spots, on the slide
    genes_tsv = tmp_path / "genes.tsv"
    pd.DataFrame({"gene": ["C", "A"]}).to_csv(genes_tsv, sep="\t", index=False)
    raw = ad.read_h5ad(paths["st"])
    for spots, n in (("in_tissue", len(GRID)), ("all", len(GRID) + 2)):
        norm = normalise_sample(paths["st"], genes_tsv, tmp_path / f"{spots}.h5ad", sample="S1", dataset="d",
                                target_sum=10.0, spots=spots)
        h5, parquet = tmp_path / f"{spots}.h5", tmp_path / f"{spots}.parquet"
        extract_patches(paths["wsi"], paths["st"], paths["metadata"], h5, parquet, sample="S1", spots=spots,
                        progress=False)
        table = pd.read_parquet(parquet)
        assert norm.n_obs == n and set(table["barcode"]) == set(norm.obs_names)
        assert list(norm.obs_names) == [b for b in raw.obs_names if b in set(table["barcode"])]  # st file order
        joined = load_sample("S1", tmp_path / f"{spots}.h5ad", h5, ["C", "A"], genes_tsv)
        assert list(joined.barcodes) == list(norm.obs_names)
        np.testing.assert_allclose(joined.expression, norm.X.toarray())
        rows = table.set_index("barcode").loc[joined.barcodes, "patch_index"].to_numpy()
        np.testing.assert_array_equal(joined.patch_rows, rows)


def test_all_dropped_is_an_error(sample):
    paths, out, _ = sample(spots=EDGE, in_tissue=[1, 1])
    with pytest.raises(CMRCNetError, match="all 2 spots were dropped"):
        run(paths, out, off_slide="drop")
    assert_no_outputs(out)


def test_no_in_tissue_spots_is_an_error(sample):
    paths, out, _ = sample(spots=GRID[:3], in_tissue=[0, 0, 0])
    with pytest.raises(CMRCNetError, match="no in-tissue spots"):
        run(paths, out)
    assert_no_outputs(out)


def test_centre_outside_slide(sample):
    spots = GRID + [(5000, 100), (100, -40)]
    paths, out, _ = sample(spots=spots, in_tissue=[1] * len(spots))
    with pytest.raises(CMRCNetError) as excinfo:
        run(paths, out)
    message = str(excinfo.value)
    assert str(paths["st"]) in message and "2 spot centres lie outside" in message and "spot20-1" in message
    assert "\n" not in message
    assert_no_outputs(out)


def test_missing_pixel_size(sample):
    paths, out, _ = sample(meta={"patient": "P1"}, tiff_pixel_size_um=None)
    with pytest.raises(CMRCNetError, match="no pixel size"):
        run(paths, out)
    assert_no_outputs(out)


def test_pixel_size_from_tiff_tags(sample):
    paths, out, _ = sample(meta={"patient": "P1"})  # TIFF says 0.25 um/px in centimetre units
    assert run(paths, out)["slide_pixel_size_um"] == pytest.approx(0.25)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tiff(sample, damage):
    paths, out, _ = sample()
    data = paths["wsi"].read_bytes()
    if damage == "garbage":
        data = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:
        data = data[: len(data) // 3]
    paths["wsi"].write_bytes(data)
    with pytest.raises(CMRCNetError) as excinfo:
        run(paths, out)
    assert str(paths["wsi"]) in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert_no_outputs(out)


def test_corrupt_tile_midway_leaves_no_outputs(sample):
    """The error comes after the outputs were started; neither may appear."""
    import tifffile

    paths, out, _ = sample()
    with tifffile.TiffFile(paths["wsi"]) as tif:
        page = tif.series[0].levels[1].keyframe  # the level patches are read from
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]  # bottom-right tile, read last
    with open(paths["wsi"], "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x01" * count)
    with pytest.raises(CMRCNetError, match="corrupt image data"):
        run(paths, out)
    assert_no_outputs(out)


def test_corrupt_h5ad(sample):
    paths, out, _ = sample()
    paths["st"].write_bytes(b"not an hdf5 file at all")
    with pytest.raises(CMRCNetError, match="cannot read as AnnData"):
        run(paths, out)
    assert_no_outputs(out)


def test_missing_spatial(sample):
    paths, out, _ = sample()
    write_st(paths["st"], GRID, [1] * len(GRID), with_spatial=False)
    with pytest.raises(CMRCNetError, match="no spatial coordinates"):
        run(paths, out)
    assert_no_outputs(out)


def test_jpeg_and_striped_slides(sample):
    for opts in ({"compression": "jpeg"}, {"tile": None, "rowsperstrip": 64, "compression": "lzw"}):
        paths, out, _ = sample(**opts)
        summary = run(paths, out)
        assert summary["n_written"] == len(GRID) + len(EDGE) and summary["level"] == 1
        out["out_h5"].unlink()
        out["out_parquet"].unlink()
