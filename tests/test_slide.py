"""Region reads from pyramidal TIFFs must equal crops of the fully decoded image, for every storage layout."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cmrcnet.data.slide import Slide
from cmrcnet.errors import CMRCNetError

H, W = 1536, 2048


def pattern(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Colour gradient plus seeded noise: smooth enough for JPEG, unique enough to catch off-by-one crops."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([200 * x / w, 200 * y / h, 100 + 50 * np.sin(x / 40.0) * np.cos(y / 60.0)], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def downsample2(image: np.ndarray) -> np.ndarray:
    """2x2 block mean, the way the fixture builds its pyramid levels."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, *image.shape[2:]).astype(float)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_pyramid(path, image, *, n_levels=3, tile=(256, 256), compression="zlib", rowsperstrip=None,
                  pixel_size_um=0.25, subifds=True):
    """Write `image` as a pyramid (SubIFDs, or reduced-resolution pages) and return the level arrays."""
    pyramid = [image]
    for _ in range(n_levels - 1):
        pyramid.append(downsample2(pyramid[-1]))
    opts = {"compression": compression, "photometric": "rgb" if image.ndim == 3 else "minisblack"}
    if image.ndim == 3 and image.shape[2] == 4:
        opts["extrasamples"] = ["unassalpha"]
    opts.update({"tile": tile} if tile else {"rowsperstrip": rowsperstrip})
    res = {}
    if pixel_size_um:
        res = {"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(pyramid[0], subifds=(n_levels - 1) if subifds else None, **res, **opts)
        for level in pyramid[1:]:
            tw.write(level, subfiletype=1, **opts)
    return pyramid


def decoded_levels(path):
    """What tifffile itself decodes for each level (the reference for lossy JPEG)."""
    with tifffile.TiffFile(path) as tif:
        return [lvl.asarray() for lvl in tif.series[0].levels]


LAYOUTS = {
    "tiled-zlib": {"compression": "zlib"},
    "tiled-jpeg": {"compression": "jpeg"},
    "striped-lzw": {"tile": None, "rowsperstrip": 100, "compression": "lzw"},
    "striped-raw": {"tile": None, "rowsperstrip": 37, "compression": None},
}
REGIONS = [  # x, y, w, h at level 0: across tile borders, one exact tile, the bottom-right corner, one pixel
    (250, 500, 300, 40),
    (256, 512, 256, 256),
    (W - 100, H - 70, 100, 70),
    (1000, 1000, 1, 1),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_region_equals_crop(tmp_path, layout):
    path = tmp_path / "slide.tif"
    write_pyramid(path, pattern(), **LAYOUTS[layout])
    levels = decoded_levels(path)
    with Slide(path) as slide:
        assert (slide.width, slide.height) == (W, H)
        assert [(lv.width, lv.height) for lv in slide.levels] == [(2048, 1536), (1024, 768), (512, 384)]
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        for x, y, w, h in REGIONS:
            region = slide.read_region(x, y, w, h)
            assert region.dtype == np.uint8 and region.shape == (h, w, 3)
            np.testing.assert_array_equal(region, levels[0][y:y + h, x:x + w])
        np.testing.assert_array_equal(slide.read_region(100, 200, 400, 300, level=1), levels[1][200:500, 100:500])
        np.testing.assert_array_equal(slide.read_region(0, 0, 512, 384, level=2), levels[2])


def test_level1_matches_downsampled_full_image(tmp_path):
    image = pattern()
    write_pyramid(tmp_path / "lossless.tif", image)
    write_pyramid(tmp_path / "jpeg.tif", image, compression="jpeg")
    expected = downsample2(image)[300:600, 200:650]
    with Slide(tmp_path / "lossless.tif") as slide:
        np.testing.assert_array_equal(slide.read_region(200, 300, 450, 300, level=1), expected)
    with Slide(tmp_path / "jpeg.tif") as slide:
        got = slide.read_region(200, 300, 450, 300, level=1).astype(float)
        assert np.abs(got - expected).mean() < 6  # JPEG is lossy (about 4 here); exact offsets are tested above


def test_out_of_bounds_is_filled(tmp_path):
    image = pattern()
    write_pyramid(tmp_path / "s.tif", image)
    with Slide(tmp_path / "s.tif") as slide:
        region = slide.read_region(-30, -20, 100, 50)
        np.testing.assert_array_equal(region[20:, 30:], image[:30, :70])
        assert (region[:20] == 255).all() and (region[:, :30] == 255).all()
        region = slide.read_region(W - 10, H - 5, 40, 20, fill=7)
        np.testing.assert_array_equal(region[:5, :10], image[H - 5:, W - 10:])
        assert (region[5:] == 7).all() and (region[:, 10:] == 7).all()
        assert (slide.read_region(W + 5, 0, 8, 8, fill=0) == 0).all()
        assert (slide.read_region(-100, -100, 50, 50, level=2) == 255).all()


def test_best_level(tmp_path):
    write_pyramid(tmp_path / "s.tif", pattern(), n_levels=3)
    with Slide(tmp_path / "s.tif") as slide:
        assert slide.best_level(0.5) == 0  # finer than level 0: level 0, never upsampled by the reader
        assert slide.best_level(1.0) == 0
        assert slide.best_level(1.9) == 0
        assert slide.best_level(1.999) == 1  # within tolerance of 2
        assert slide.best_level(2.0) == 1
        assert slide.best_level(3.9) == 1
        assert slide.best_level(4.0) == 2
        assert slide.best_level(100.0) == 2


def test_reduced_resolution_pages_pyramid(tmp_path):
    """Pyramids stored as successive pages (as pyvips writes them) instead of SubIFDs."""
    image = pattern()
    pyramid = write_pyramid(tmp_path / "s.tif", image, subifds=False)
    with Slide(tmp_path / "s.tif") as slide:
        assert len(slide.levels) == 3
        np.testing.assert_array_equal(slide.read_region(10, 20, 300, 300, level=2), pyramid[2][20:320, 10:310])


def test_single_level_tiff(tmp_path):
    image = pattern(300, 500)
    tifffile.imwrite(tmp_path / "flat.tif", image, photometric="rgb")
    with Slide(tmp_path / "flat.tif") as slide:
        assert len(slide.levels) == 1 and slide.best_level(8.0) == 0
        np.testing.assert_array_equal(slide.read_region(0, 0, 500, 300), image)


def test_grayscale_and_rgba(tmp_path):
    rgb = pattern(512, 768)
    write_pyramid(tmp_path / "grey.tif", rgb[..., 1], n_levels=2)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=2)
    write_pyramid(tmp_path / "rgba.tif", rgba, n_levels=2)
    with Slide(tmp_path / "grey.tif") as slide:
        region = slide.read_region(100, 50, 300, 200)
        np.testing.assert_array_equal(region, np.repeat(rgb[50:250, 100:400, 1:2], 3, axis=2))
    with Slide(tmp_path / "rgba.tif") as slide:
        np.testing.assert_array_equal(slide.read_region(100, 50, 300, 200), rgb[50:250, 100:400])


def test_tile_cache_is_bounded(tmp_path):
    image = pattern()
    write_pyramid(tmp_path / "s.tif", image)
    with Slide(tmp_path / "s.tif", tile_cache_size=3) as slide:
        for x in range(0, W - 300, 150):
            np.testing.assert_array_equal(slide.read_region(x, 700, 300, 300), image[700:1000, x:x + 300])
            assert len(slide._cache) <= 3
    with Slide(tmp_path / "s.tif", tile_cache_size=0) as slide:
        np.testing.assert_array_equal(slide.read_region(5, 5, 600, 600), image[5:605, 5:605])
        assert len(slide._cache) == 0


def assert_one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(CMRCNetError, match="not found") as excinfo:
        Slide(tmp_path / "nope.tif")
    assert_one_line_error(excinfo, tmp_path / "nope.tif")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CMRCNetError, match="not a readable TIFF") as excinfo:
        Slide(path)
    assert_one_line_error(excinfo, path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.tif"
    write_pyramid(path, pattern())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CMRCNetError) as excinfo, Slide(path) as slide:
        for level, lv in enumerate(slide.levels):
            slide.read_region(0, 0, lv.width, lv.height, level=level)
    assert_one_line_error(excinfo, path)


def test_corrupt_tile(tmp_path):
    path = tmp_path / "bad.tif"
    write_pyramid(path, pattern())
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        offset, count = page.dataoffsets[9], page.databytecounts[9]  # tile row 1, column 1
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00\xff" * (count // 2))
    with Slide(path) as slide:
        slide.read_region(0, 0, 200, 200)  # other tiles still read
        with pytest.raises(CMRCNetError, match="corrupt image data in level 0 segment 9") as excinfo:
            slide.read_region(300, 300, 10, 10)
    assert_one_line_error(excinfo, path)


def test_not_rgb_like(tmp_path):
    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    with pytest.raises(CMRCNetError, match="not an RGB-like slide") as excinfo:
        Slide(path)
    assert_one_line_error(excinfo, path)
