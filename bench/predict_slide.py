"""Benchmark prediction on a new whole slide: spots/s, peak memory and where the time goes.

Why: `cmrcnet predict-slide` promises bounded memory whatever the slide size (100k x 100k px slides on a 24 GB
machine) and a useful speed on a CPU. This measures both on a large synthetic slide, end to end through
`cmrcnet.inference.slide_predict.predict_slide` (thumbnail, tissue detection, spot lattice, patch cutting, model
input, embedding or regression, exact retrieval against the reference bank, AnnData write), with the time of each
stage.

How:
- The slide is a pyramidal BigTIFF (default 60000 x 60000 px at 0.25 um/px, i.e. 15 x 15 mm) written tile by tile
  from a generator, so this script never holds it: 512 x 512 YCbCr JPEG tiles, levels /2, /4, ... as SubIFDs,
  resolution tags in centimetres, as `cmrcnet.data.slide.Slide` reads them. Tissue is a few smooth blobs (their
  layout scales with the slide, so every size has the same tissue fraction) filled with pink H&E-like tiles with
  purple nuclei; glass is pale grey. It is cached under bench/out/predict_slide_data/ and reused; its write time is
  reported apart.
- The model is a real `create_model` model with seeded random weights (the demo config's tiny settings, or the
  paper's sizes with `--arch paper`), saved as a deployable best.pt as `cmrcnet.train._write_deployable` writes
  one: weights, genes, the patch resolution (224 px at 0.5 um/px) and, for retrieval models (CMRCNet, BLEEP), a
  reference bank of `--bank-spots` synthetic training spots (log-normalised random expression and its gene-tower
  embeddings). No training: the predictions are meaningless, their cost is not.
- Each measured run is a fresh subprocess, so its peak RSS (`ru_maxrss`, imports included) is its own. Stages are
  timed by wrapping the functions `predict_slide` calls (nothing in cmrcnet is changed); what no wrapper covers
  (the loop, tqdm, copies to the device) is "other". Medians of `--repeats` runs.

    python bench/predict_slide.py --quick                                     # 8k x 8k smoke run, < 1 min
    python bench/predict_slide.py --size-px 30000 60000 --repeats 3 --out bench/out/predict_slide.json
    python bench/predict_slide.py --device cuda --arch paper --size-px 60000  # on a GPU node
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

TILE = 512
JPEG_QUALITY = 80
GLASS = np.array([242.0, 240.0, 244.0])
EOSIN = np.array([214.0, 140.0, 186.0])
NUCLEUS = np.array([112.0, 72.0, 152.0])
TEXTURES = 8  # distinct tissue / glass tiles, chosen per tile by a hash of its position
SLIDE_VERSION = 1  # bump when the slide generator changes, so cached slides are rewritten

PATCHES = {"um_per_px": 0.5, "size_px": 224, "fill": 255}  # config/config.yaml and config/paper.yaml
ARCHS = {  # demo: config/config.yaml's methods; paper: create_model's defaults (the paper's sizes)
    "demo": {
        "cmrcnet": {"input_size": 64, "embed_dim": 64, "snn_hidden": 128,
                    "encoder_kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4}},
        "bleep": {"encoder": "test_resnet", "input_size": 64, "embed_dim": 64},
        "stnet": {"encoder": "test_resnet", "input_size": 64},
    },
    "paper": {"cmrcnet": {}, "bleep": {}, "stnet": {}},
}
STAGES = ("open slide", "load model", "read bank", "thumbnail", "tissue detection", "spot lattice", "patch cutting",
          "  of which tile decode", "model input", "embedding / regression", "retrieval", "write h5ad")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


# ------------------------------------------------------------------------------------------------ the slide


class SlidePainter:
    """Tiles of an H&E-like slide at any pyramid level, computed from level-0 coordinates, so no level is needed
    to make another and nothing but one tile is ever in memory."""

    def __init__(self, size_px: int, seed: int, tissue_fraction: float):
        from scipy import ndimage

        rng = np.random.default_rng(seed)
        self.size = size_px
        # tissue: where a sum of Gaussian blobs (centres and widths as fractions of the slide side) is high
        k = 7
        self.cx, self.cy = rng.uniform(0.2, 0.8, k), rng.uniform(0.2, 0.8, k)
        self.sigma, self.weight = rng.uniform(0.08, 0.18, k), rng.uniform(0.6, 1.0, k)
        grid = (np.arange(512) + 0.5) / 512
        self.threshold = float(np.quantile(self._field(grid, grid), 1 - tissue_fraction))
        # textures: eosin pink with purple nuclei (~3.5 um radius at 0.25 um/px) and grain; grey glass with grain
        self.tissue, self.glass = [], []
        for _ in range(TEXTURES):
            seeds = np.ones((TILE, TILE), bool)
            seeds[rng.integers(0, TILE, 350), rng.integers(0, TILE, 350)] = False
            nuclei = (ndimage.distance_transform_edt(seeds) < 14)[..., None]
            shade = rng.normal(0, 6, 3)
            grain = rng.normal(0, 9, (TILE, TILE, 3))
            tissue = np.where(nuclei, NUCLEUS, EOSIN + shade) + grain
            self.tissue.append(np.clip(tissue, 0, 255).astype(np.uint8))
            self.glass.append(np.clip(GLASS + rng.normal(0, 3, (TILE, TILE, 3)), 0, 255).astype(np.uint8))

    def _field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Blob field on the grid of x (columns) and y (rows), both as fractions of the slide side."""
        out = np.zeros((len(y), len(x)))
        for cx, cy, s, w in zip(self.cx, self.cy, self.sigma, self.weight):
            out += w * np.outer(np.exp(-((y - cy) ** 2) / (2 * s * s)), np.exp(-((x - cx) ** 2) / (2 * s * s)))
        return out

    def tiles(self, width: int, height: int):
        """Row-major tiles of the level `width` x `height` (full TILE x TILE tiles, as tifffile expects)."""
        down, block = self.size / width, 16  # the tissue mask is evaluated per 16 x 16 px block of the level
        centres = (np.arange(TILE // block) * block + block / 2) * down / self.size
        for ty in range(math.ceil(height / TILE)):
            y = ty * TILE * down / self.size + centres
            for tx in range(math.ceil(width / TILE)):
                x = tx * TILE * down / self.size + centres
                mask = self._field(x, y) > self.threshold
                pick = (ty * 7919 + tx * 104729 + width) % TEXTURES
                if mask.all():
                    yield self.tissue[pick]
                elif not mask.any():
                    yield self.glass[pick]
                else:
                    full = np.repeat(np.repeat(mask, block, 0), block, 1)[..., None]
                    yield np.where(full, self.tissue[pick], self.glass[pick])


def write_slide(path: Path, size_px: int, um_per_px: float, seed: int, tissue_fraction: float) -> dict:
    """Pyramidal BigTIFF, level 0 `size_px` square, levels /2, /4, ... down to about 2 tiles as SubIFDs."""
    import tifffile

    start = time.perf_counter()
    painter = SlidePainter(size_px, seed, tissue_fraction)
    sizes = [(size_px, size_px)]
    while max(sizes[-1]) > 2 * TILE:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    opts = {"dtype": "uint8", "tile": (TILE, TILE), "photometric": "ycbcr", "subsampling": (2, 2),
            "compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}, "metadata": None}
    px_cm = 1e4 / um_per_px
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, (w, h) in enumerate(sizes):
            extra = ({"subifds": len(sizes) - 1, "resolution": (px_cm, px_cm), "resolutionunit": "CENTIMETER"}
                     if i == 0 else {"subfiletype": 1})
            tw.write(painter.tiles(w, h), shape=(h, w, 3), **extra, **opts)
    os.replace(tmp, path)
    return {"write_s": time.perf_counter() - start, "bytes": path.stat().st_size,
            "levels": [list(s) for s in sizes], "peak_rss_mb_writer": peak_rss_mb()}


def ensure_slide(data: Path, size_px: int, um_per_px: float, seed: int, tissue_fraction: float) -> tuple[Path, dict]:
    """The cached slide of these settings, written when missing (or made by another version of the generator)."""
    config = {"size_px": size_px, "um_per_px": um_per_px, "seed": seed, "tissue_fraction": tissue_fraction,
              "tile": TILE, "jpeg_quality": JPEG_QUALITY, "version": SLIDE_VERSION}
    path = data / f"slide_{size_px}px_{um_per_px:g}um.tif"
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("config") == config:
        return path, json.loads(stamp.read_text())
    log(f"writing a {size_px} x {size_px} px slide at {um_per_px:g} um/px to {path} ...")
    info = {"config": config, **write_slide(path, size_px, um_per_px, seed, tissue_fraction)}
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    log(f"  {info['bytes'] / 2**20:.0f} MB in {info['write_s']:.1f} s")
    return path, info


# ------------------------------------------------------------------------------------------------ the model


def ensure_model(data: Path, name: str, arch: str, n_genes: int, bank_spots: int, seed: int) -> tuple[Path, dict]:
    """A deployable best.pt with seeded random weights and, for a retrieval model, a synthetic reference bank."""
    config = {"model": name, "arch": arch, "n_genes": n_genes, "bank_spots": bank_spots, "seed": seed}
    bank_part = f"_{bank_spots}ref" if name != "stnet" else ""  # regression models carry no bank
    path = data / f"model_{name}_{arch}_{n_genes}g{bank_part}.pt"
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("config") == config:
        return path, json.loads(stamp.read_text())

    import torch

    from cmrcnet.inference.bank import embed_expression
    from cmrcnet.models import create_model

    start = time.perf_counter()
    torch.manual_seed(seed)
    params = ARCHS[arch][name]
    model = create_model(name, n_genes=n_genes, **params).eval()
    genes = [f"GENE{i:04d}" for i in range(n_genes)]
    ckpt = {"model": model.state_dict(), "model_name": name, "method": name, "params": params, "genes": genes,
            "patches": dict(PATCHES), "technology": "visium", "fold": "all", "epoch": 0}
    if model.kind == "retrieval":
        rng = np.random.default_rng(seed)
        # log1p of library-normalised counts: gamma-Poisson counts around gene means spread over 3 orders
        means = np.exp(rng.normal(-1.0, 1.5, n_genes)).astype(np.float32)
        expression = np.empty((bank_spots, n_genes), dtype=np.float32)
        for lo in range(0, bank_spots, 10000):
            n = min(10000, bank_spots - lo)
            counts = rng.poisson(rng.gamma(2.0, means / 2.0, (n, n_genes)))
            lib = np.maximum(counts.sum(1, keepdims=True), 1)
            expression[lo:lo + n] = np.log1p(counts / lib * 1e4)
        with torch.no_grad():
            embeddings = embed_expression(model, expression, torch.device("cpu"), batch_size=1024)
        ckpt["bank"] = {"embeddings": embeddings.contiguous(), "expression": torch.from_numpy(expression),
                        "genes": genes, "samples": ["BANK"] * bank_spots,
                        "barcodes": [f"ref{i:07d}" for i in range(bank_spots)]}
    tmp = path.with_suffix(".tmp.pt")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    info = {"config": config, "params": params, "kind": model.kind,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "build_s": time.perf_counter() - start, "bytes": path.stat().st_size}
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {path} ({info['bytes'] / 2**20:.0f} MB, {info['params_m']:.2f} M parameters) in {info['build_s']:.1f} s")
    return path, info


# ------------------------------------------------------------------------------------------------ one run


class StageTimer:
    """Seconds and calls per stage, from wrappers around the functions `predict_slide` calls."""

    def __init__(self, cuda: bool):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak_rise_mb: dict[str, float] = {}  # how far the process's peak RSS rose during the stage's calls
        self.cuda = cuda
        self.inside: str | None = None

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def wrap(self, stage: str, fn, sync: bool = False):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            outer, self.inside = self.inside, stage
            peak, start = peak_rss_mb(), time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if sync and self.cuda:
                    import torch

                    torch.cuda.synchronize()
                return out
            finally:
                self.add(stage, time.perf_counter() - start)
                self.peak_rise_mb[stage] = self.peak_rise_mb.get(stage, 0.0) + peak_rss_mb() - peak
                self.inside = outer

        return timed

    def patch(self, owner, attr: str, stage: str, sync: bool = False) -> None:
        setattr(owner, attr, self.wrap(stage, getattr(owner, attr), sync))


def install_timers(timer: StageTimer) -> None:
    """Wrap what predict_slide imports at call time (module attributes, so the wrappers are what it gets)."""
    import anndata

    import cmrcnet.data.patches as patches
    import cmrcnet.data.slide as slide
    import cmrcnet.data.spot_layout as spot_layout
    import cmrcnet.data.tissue as tissue
    import cmrcnet.figures.thumbnail as thumbnail
    import cmrcnet.inference.bank as bank
    import cmrcnet.inference.predict as predict
    import cmrcnet.inference.retrieval as retrieval
    import cmrcnet.inference.slide_predict as slide_predict

    timer.patch(slide, "open_slide", "open slide")
    timer.patch(bank, "read_bank", "read bank")
    timer.patch(thumbnail, "thumbnail_of", "thumbnail")
    timer.patch(tissue, "detect_tissue", "tissue detection")
    timer.patch(spot_layout, "spots_on_tissue", "spot lattice")
    timer.patch(patches.PatchCutter, "cut", "patch cutting")
    timer.patch(slide_predict, "_model_input", "model input")
    timer.patch(retrieval, "predict_by_retrieval", "retrieval", sync=True)
    timer.patch(anndata.AnnData, "write_h5ad", "write h5ad")

    decode = slide.Slide._decode

    def timed_decode(self, level, index):  # tile decodes while cutting patches, counted apart from the thumbnail's
        if timer.inside != "patch cutting":
            return decode(self, level, index)
        start = time.perf_counter()
        try:
            return decode(self, level, index)
        finally:
            timer.add("  of which tile decode", time.perf_counter() - start)

    slide.Slide._decode = timed_decode

    load = predict.load_trained_model

    def timed_load(*args, **kwargs):
        peak, start = peak_rss_mb(), time.perf_counter()
        model, ckpt = load(*args, **kwargs)
        timer.add("load model", time.perf_counter() - start)
        timer.peak_rise_mb["load model"] = peak_rss_mb() - peak
        for attr in ("embed_image", "predict"):
            if hasattr(model, attr):  # an instance attribute shadows the method for this one model
                setattr(model, attr, timer.wrap("embedding / regression", getattr(model, attr), sync=True))
        return model, ckpt

    predict.load_trained_model = timed_load


def run_child(args) -> dict:
    """One measured prediction in this fresh process; returns the measurements."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    # import what predict_slide imports lazily, so the timing is the work and not Python's imports
    import anndata  # noqa: F401
    import pandas  # noqa: F401
    import skimage.color  # noqa: F401
    import skimage.filters  # noqa: F401
    import skimage.morphology  # noqa: F401
    import tqdm  # noqa: F401

    import cmrcnet.figures.slide_maps  # noqa: F401
    import cmrcnet.inference.retrieval  # noqa: F401
    import cmrcnet.models  # noqa: F401  (timm: its first create_model call imports model modules, ~5 s here)
    import cmrcnet.train  # noqa: F401
    from cmrcnet.inference.slide_predict import predict_slide

    timer = StageTimer(cuda)
    install_timers(timer)
    out = args.slide.with_name(f"{args.slide.stem}.pred.{os.getpid()}.h5ad")
    rss_before = current_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = predict_slide(args.model_path, args.slide, out, k=args.k, tta=args.tta, batch_size=args.batch_size,
                            device=args.device, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out_bytes = out.stat().st_size
    out.unlink()
    n = summary["n_spots"]
    covered = sum(v for k, v in timer.seconds.items() if not k.startswith(" "))
    stages = {**timer.seconds, "other": seconds - covered}
    result = {"n_spots": n, "seconds": seconds, "spots_per_s": n / seconds, "engine_seconds": summary["seconds"],
              "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "stages_s": stages, "calls": timer.calls,
              "peak_rise_mb": timer.peak_rise_mb,
              "level": summary["patches"]["level"], "out_bytes": out_bytes, "threads": torch.get_num_threads(),
              "device": summary["device"]}
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ------------------------------------------------------------------------------------------------ main


def environment(device: str) -> dict:
    """Versions and machine, so numbers from different machines are not compared blindly."""
    import imagecodecs
    import tifffile
    import timm
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu,
           "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
           "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "timm": timm.__version__,
           "numpy": np.__version__, "tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__,
           "device": device, "load_average": os.getloadavg()}
    if device == "cuda":
        env["device_name"], env["cuda"] = torch.cuda.get_device_name(0), torch.version.cuda
    return env


def summarise(runs: list[dict]) -> dict:
    stages = sorted({s for r in runs for s in r["stages_s"]}, key=lambda s: (STAGES + ("other",)).index(s))
    out = {"n_spots": runs[0]["n_spots"],
           "seconds_median": statistics.median(r["seconds"] for r in runs),
           "spots_per_s_median": statistics.median(r["spots_per_s"] for r in runs),
           "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
           "rss_before_mb_median": statistics.median(r["rss_before_mb"] for r in runs),
           "stages_s_median": {s: statistics.median(r["stages_s"].get(s, 0.0) for r in runs) for s in stages},
           "level": runs[0]["level"], "runs": runs}
    if "cuda_peak_mb" in runs[0]:
        out["cuda_peak_mb_max"] = max(r["cuda_peak_mb"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, nargs="+", default=[60000],
                        help="slide sides in level-0 px (several: compare peak memory across sizes)")
    parser.add_argument("--um-per-px", type=float, default=0.25, help="the slide's level-0 pixel size")
    parser.add_argument("--tissue-fraction", type=float, default=0.5, help="share of the slide covered by tissue")
    parser.add_argument("--model", choices=("cmrcnet", "bleep", "stnet"), default="cmrcnet")
    parser.add_argument("--arch", choices=tuple(ARCHS), default="demo",
                        help="demo: config/config.yaml's tiny models (64 px input); paper: the paper's sizes")
    parser.add_argument("--genes", type=int, default=1000, help="genes predicted (Visium HVG union: ~1000)")
    parser.add_argument("--bank-spots", type=int, default=50000, help="training spots in the reference bank")
    parser.add_argument("--k", type=int, default=50, help="retrieval neighbours")
    parser.add_argument("--tta", action="store_true", help="8-fold flip/rotation averaging (stnet)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = cores)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per size; medians reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: one 8000 x 8000 px slide, one repeat")
    parser.add_argument("--data", type=Path, default=Path("bench/out/predict_slide_data"), help="cached slides, models")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/out/predict_slide[_quick].json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.quick:
        args.size_px, args.repeats = [8000], 1
    out_path = args.out or Path(f"bench/out/predict_slide{'_quick' if args.quick else ''}.json")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    started = time.perf_counter()
    args.data.mkdir(parents=True, exist_ok=True)
    # slides first: this process's peak RSS while writing them is then the writer's own (recorded with each slide)
    slides = {size: ensure_slide(args.data, size, args.um_per_px, args.seed, args.tissue_fraction)
              for size in args.size_px}
    model_path, model_info = ensure_model(args.data, args.model, args.arch, args.genes, args.bank_spots, args.seed)

    results = {}
    for size, (slide, slide_info) in slides.items():
        runs = []
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", "--slide", str(slide), "--model-path", str(model_path),
                   "--k", str(args.k), "--batch-size", str(args.batch_size), "--device", args.device]
            cmd += ["--tta"] * args.tta + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{size} px run {r + 1} failed:\n{proc.stderr}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            res = runs[-1]
            log(f"{size} px run {r + 1}: {res['n_spots']} spots in {res['seconds']:.1f} s "
                f"({res['spots_per_s']:.0f} spots/s), peak RSS {res['peak_rss_mb']:.0f} MB "
                f"(before {res['rss_before_mb']:.0f} MB)")
        results[str(size)] = {"slide": {"path": str(slide), **slide_info}, **summarise(runs)}

    report = {
        "config": {"size_px": args.size_px, "um_per_px": args.um_per_px, "tissue_fraction": args.tissue_fraction,
                   "model": args.model, "arch": args.arch, "genes": args.genes, "bank_spots": args.bank_spots,
                   "k": args.k, "tta": args.tta, "batch_size": args.batch_size, "device": args.device,
                   "threads": args.threads, "repeats": args.repeats, "seed": args.seed, "patches": PATCHES},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(args.device), "model": model_info, "results": results,
        "wall_s": time.perf_counter() - started,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_path} ({report['wall_s']:.0f} s)")

    print("| slide (px) | spots | seconds | spots/s | peak RSS (MB) | RSS before predict (MB) | slide write (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size, res in results.items():
        print(f"| {size} x {size} | {res['n_spots']} | {res['seconds_median']:.1f} | {res['spots_per_s_median']:.0f} "
              f"| {res['peak_rss_mb_max']:.0f} | {res['rss_before_mb_median']:.0f} | {res['slide']['write_s']:.0f} |")
    print("\n| stage | " + " | ".join(f"{s} px: s (share)" for s in results) + " |")
    print("|---|" + "---:|" * len(results))
    for stage in [*STAGES, "other"]:
        cells = []
        for res in results.values():
            sec = res["stages_s_median"].get(stage)
            cells.append("" if sec is None else f"{sec:.2f} ({100 * sec / res['seconds_median']:.0f} %)")
        if any(cells):
            print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
