"""Benchmark patch extraction against a naive full-resolution reader and a whole-image load.

Why: the pipeline's patch step has to stay fast and memory-flat on real slides (HEST WSIs reach ~100k px
across). This writes a synthetic slide of realistic size (tiled JPEG pyramid, generated tile by tile so
the script itself never holds the image) plus spots on a grid, then times each method in a fresh
subprocess so that its peak RSS is its own.

    python bench/patches.py --out bench/out/patches.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
METHODS = ("ours", "naive", "whole")
DESCRIPTIONS = {
    "ours": "extract_patches: coarsest sufficient level (1), tile cache, (y, x) order",
    "naive": "per spot: read the level-0 window (no tile cache), resize with PIL",
    "whole": "load level 0 whole (tif.asarray()), then crop + resize per spot",
}


def slide_tiles(width: int, height: int, downsample: float, seed: int):
    """Tiles of an H&E-like pattern (pink tissue blobs on a pale background, grain), any pyramid level."""
    rows, cols = math.ceil(height / TILE), math.ceil(width / TILE)
    offsets = np.arange(TILE) + 0.5
    background = np.array([242.0, 240.0, 244.0])
    tissue = np.array([205.0, 130.0, 180.0])
    for ty in range(rows):
        y = (ty * TILE + offsets) * downsample  # level-0 pixel coordinates
        for tx in range(cols):
            x = (tx * TILE + offsets) * downsample
            t = np.clip(0.5 + 0.9 * np.outer(np.cos(y / 1700.0), np.sin(x / 2300.0)), 0, 1)[..., None]
            grain = np.random.default_rng([seed, int(downsample), ty, tx]).integers(-18, 18, (TILE, TILE, 3))
            yield np.clip(background + t * (tissue - background) + grain * t, 0, 255).astype(np.uint8)


def write_slide(path: Path, size: int, pixel_size_um: float, quality: int = 85) -> None:
    """Tiled YCbCr JPEG pyramid with levels /2, /4, ... as SubIFDs, down to about one tile."""
    import tifffile

    sizes = [(size, size)]
    while max(sizes[-1]) > 2 * TILE:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    opts = {
        "dtype": "uint8", "tile": (TILE, TILE), "photometric": "ycbcr", "subsampling": (2, 2),
        "compression": "jpeg", "compressionargs": {"level": quality},
    }
    res = {"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um), "resolutionunit": "CENTIMETER"}
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, (w, h) in enumerate(sizes):
            tiles = slide_tiles(w, h, size / w, seed=0)
            if i == 0:
                tw.write(tiles, shape=(h, w, 3), subifds=len(sizes) - 1, **res, **opts)
            else:
                tw.write(tiles, shape=(h, w, 3), subfiletype=1, **opts)
    os.replace(tmp, path)


def write_spots(st: Path, metadata: Path, size: int, n_spots: int, pixel_size_um: float) -> None:
    """Spots on a square grid covering the slide, 300 px from its edges, in HEST's .h5ad layout."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    side = math.ceil(math.sqrt(n_spots))
    ticks = np.linspace(300, size - 300, side)
    yy, xx = np.meshgrid(ticks, ticks, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], 1)[:n_spots]
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": np.arange(n_spots) // side, "array_col": np.arange(n_spots) % side},
        index=[f"spot{i:05d}-1" for i in range(n_spots)],
    )
    adata = ad.AnnData(X=sp.csr_matrix((n_spots, 3), dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=["A", "B", "C"]))
    adata.obsm["spatial"] = coords
    adata.write_h5ad(st)
    metadata.write_text(json.dumps({"pixel_size_um_estimated": pixel_size_um}))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_child(method: str, data: Path, patch_px: int, um_per_px: float) -> dict:
    """One measurement in this (fresh) process; prints nothing but the JSON result."""
    import h5py
    from PIL import Image

    from cmrcnet.data import layout
    from cmrcnet.data.patches import extract_patches
    from cmrcnet.data.slide import Slide

    wsi, st, metadata = data / "slide.tif", data / "slide.h5ad", data / "slide.json"
    out_h5, out_parquet = data / f"out_{method}.h5", data / f"out_{method}.parquet"
    adata = layout.read_st(st)
    centres = np.asarray(adata.obsm["spatial"], dtype=float)
    window0 = round(patch_px * um_per_px / layout.pixel_size_um(layout.read_metadata(metadata), metadata, wsi))
    corners = np.rint(centres - window0 / 2).astype(int)
    rss_before = peak_rss_mb()

    def write_all(get_patch) -> None:  # the baselines write the same HDF5 dataset as extract_patches
        with h5py.File(out_h5, "w") as h5:
            img = h5.create_dataset("img", shape=(len(corners), patch_px, patch_px, 3), dtype=np.uint8,
                                    chunks=(1, patch_px, patch_px, 3), compression="lzf")
            for i, (x, y) in enumerate(corners):
                region = get_patch(x, y)
                img[i] = np.asarray(Image.fromarray(region).resize((patch_px, patch_px), Image.Resampling.LANCZOS))

    start = time.perf_counter()
    if method == "ours":
        n = extract_patches(wsi, st, metadata, out_h5, out_parquet, sample="bench", patch_px=patch_px,
                            um_per_px=um_per_px, progress=False)["n_written"]
    elif method == "naive":
        with Slide(wsi, tile_cache_size=0) as slide:
            write_all(lambda x, y: slide.read_region(x, y, window0, window0, level=0))
        n = len(corners)
    elif method == "whole":
        import tifffile

        with tifffile.TiffFile(wsi) as tif:
            full = tif.series[0].levels[0].asarray()
        write_all(lambda x, y: full[max(y, 0):y + window0, max(x, 0):x + window0])
        n = len(corners)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    for path in (out_h5, out_parquet):
        path.unlink(missing_ok=True)
    return {"method": method, "n": n, "seconds": seconds, "patches_per_s": n / seconds,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/patches.json"))
    parser.add_argument("--data", type=Path, default=Path("bench/out/patches_data"), help="synthetic sample dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=20000, help="slide width = height in level-0 px")
    parser.add_argument("--spots", type=int, default=5000)
    parser.add_argument("--pixel-size-um", type=float, default=0.25)
    parser.add_argument("--um-per-px", type=float, default=0.5)
    parser.add_argument("--patch-px", type=int, default=224)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args.child, args.data, args.patch_px, args.um_per_px)))
        return

    args.data.mkdir(parents=True, exist_ok=True)
    config = {"size": args.size, "spots": args.spots, "pixel_size_um": args.pixel_size_um}
    stamp = args.data / "config.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != config:
        start = time.perf_counter()
        write_slide(args.data / "slide.tif", args.size, args.pixel_size_um)
        write_spots(args.data / "slide.h5ad", args.data / "slide.json", args.size, args.spots, args.pixel_size_um)
        stamp.write_text(json.dumps(config))
        print(f"wrote synthetic sample in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    results = {}
    for method in args.methods:
        runs = []
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", method, "--data", str(args.data),
                   "--patch-px", str(args.patch_px), "--um-per-px", str(args.um_per_px)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{method} run {r + 1}: {runs[-1]['patches_per_s']:.1f} patches/s, "
                  f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
        results[method] = {
            "description": DESCRIPTIONS[method],
            "patches_per_s_median": statistics.median(x["patches_per_s"] for x in runs),
            "seconds_median": statistics.median(x["seconds"] for x in runs),
            "peak_rss_mb_max": max(x["peak_rss_mb"] for x in runs),
            "runs": runs,
        }
    if "ours" in results:
        for res in results.values():
            res["speedup_of_ours"] = results["ours"]["patches_per_s_median"] / res["patches_per_s_median"]
            res["rss_ratio_to_ours"] = res["peak_rss_mb_max"] / results["ours"]["peak_rss_mb_max"]
    report = {
        "config": {**config, "um_per_px": args.um_per_px, "patch_px": args.patch_px, "repeats": args.repeats,
                   "slide_bytes": (args.data / "slide.tif").stat().st_size},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print("| method | patches/s (median) | seconds (median) | peak RSS (MB) | ours is x faster | RSS / ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, res in results.items():
        print(f"| {method}: {res['description']} | {res['patches_per_s_median']:.1f} | {res['seconds_median']:.1f} "
              f"| {res['peak_rss_mb_max']:.0f} | {res.get('speedup_of_ours', float('nan')):.1f} "
              f"| {res.get('rss_ratio_to_ours', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
