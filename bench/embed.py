"""Benchmark the embedding cache: patches/s and peak memory of `embed_patches` per encoder and batch size.

Why: every frozen-feature method reads the cache, so each sample is embedded once; what that costs decides whether
a dataset is embedded on a laptop CPU, one GPU, or a cluster. This writes random uint8 patches (default 224 px, as
HEST's) into a patch HDF5 file once, then for every (encoder, batch size) runs, in a fresh subprocess (its peak
memory is its own):

- pipeline: `embed_patches` end to end (HDF5 reads through the DataLoader, preprocessing, forward, float16
  cache write), after a warm-up run on the first batches; its time excludes building the encoder;
- model:    the encoder alone on patches already in memory (preprocessing and forward, batch by batch), the
  ceiling the pipeline can reach; `pipeline_over_model` near 1 means the loader keeps the device fed.

Memory: `peak_rss_mb` is the subprocess's peak resident memory up to the end of the pipeline run (encoder weights,
one batch and the loader's prefetch); `cuda_peak_mb` is torch's peak allocated GPU memory over the same span.

Weights are random (`load_encoder(name, None)`): throughput does not depend on their values. An encoder that does
not fit (out of memory, or the subprocess killed) is skipped with a note, and the others go on.

    python bench/embed.py --encoders tiny-test resnet50-imagenet --batch-sizes 32 128 --device cpu \\
        --n-patches 256 --out bench/out/embed_cpu.json
    python bench/embed.py --encoders uni uni2-h virchow2 --batch-sizes 128 256 512 --device cuda \\
        --n-patches 4096 --num-workers 8 --out bench/out/embed_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_random_patches(path: Path, n: int, px: int, seed: int) -> None:
    """A patch file in HEST's layout with random uint8 patches, written in slices (bounded memory)."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        img = h5.create_dataset("img", shape=(n, px, px, 3), dtype=np.uint8, chunks=(1, px, px, 3))
        for lo in range(0, n, 256):
            hi = min(lo + 256, n)
            img[lo:hi] = rng.integers(0, 256, size=(hi - lo, px, px, 3), dtype=np.uint8)
        h5.create_dataset("barcode", data=np.array([f"b{i}".encode() for i in range(n)]).reshape(n, 1))
        h5.create_dataset("coords", data=np.zeros((n, 2), dtype=np.int64))
        h5.attrs.update({"um_per_px": 0.5, "patch_size_px": px})


def run_child(args) -> dict:
    """One (encoder, batch size) in this fresh process; prints nothing but the JSON result."""
    import h5py
    import torch

    from cmrcnet.encoders import load_encoder
    from cmrcnet.inference.embed import AMP_DTYPES, embed_patches

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model = load_encoder(args.child, None, device=device)
    build_seconds = time.perf_counter() - start
    work = Path(args.work)
    common = {"dtype": args.dtype, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "amp": args.amp, "progress": False}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # warm-up (kernel selection, allocator, worker start-up paths), then the timed run
    embed_patches(model, None, work / "warmup.h5", work / f"warm_{os.getpid()}.h5", **common)
    summary = embed_patches(model, None, work / "patches.h5", work / f"out_{os.getpid()}.h5", **common)
    pipeline_seconds = summary["seconds"]
    pipeline_rss = peak_rss_mb()  # before the patches are loaded into memory for the model-only pass
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    with h5py.File(work / "patches.h5", "r") as h5:
        patches = torch.from_numpy(h5["img"][()])
    amp_dtype = AMP_DTYPES.get(model.spec.precision)
    use_amp = args.amp and cuda and amp_dtype is not None
    if cuda:
        patches = patches.pin_memory()
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(patches), args.batch_size):
            batch = patches[lo: lo + args.batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=getattr(torch, amp_dtype or "float16"), enabled=use_amp):
                model.embed_uint8(batch).cpu()
    if cuda:
        torch.cuda.synchronize()
    model_seconds = time.perf_counter() - start
    n = summary["n_patches"]
    result = {"encoder": args.child, "batch_size": args.batch_size, "n_patches": n, "embed_dim": summary["embed_dim"],
              "input_size": model.spec.input_size, "precision": model.spec.precision, "amp": bool(use_amp),
              "build_seconds": build_seconds, "pipeline_seconds": pipeline_seconds,
              "pipeline_patches_per_s": n / pipeline_seconds, "model_seconds": model_seconds,
              "model_patches_per_s": n / model_seconds, "pipeline_over_model": model_seconds / pipeline_seconds,
              "peak_rss_mb": pipeline_rss, "threads": torch.get_num_threads()}
    if cuda:
        result["cuda_peak_mb"] = cuda_peak
    return result


def machine_info() -> dict:
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu_model, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["tiny-test", "resnet50-imagenet"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n-patches", type=int, default=256)
    parser.add_argument("--patch-px", type=int, default=224, help="side of the stored patches (HEST: 224)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of embed_patches")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one case may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/embed.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return

    import torch

    from cmrcnet.encoders import get_encoder

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    for name in args.encoders:
        get_encoder(name)  # an unknown name fails here, before anything runs
    bench_start = time.perf_counter()
    load_before = os.getloadavg()[0]  # other work on the machine slows the CPU numbers: recorded beside them
    cases, notes = [], []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as work:
        write_random_patches(Path(work) / "patches.h5", args.n_patches, args.patch_px, args.seed)
        write_random_patches(Path(work) / "warmup.h5", min(args.n_patches, 2 * max(args.batch_sizes)), args.patch_px,
                             args.seed + 1)
        for name in args.encoders:
            for batch in args.batch_sizes:
                cmd = [sys.executable, __file__, "--child", name, "--work", work, "--batch-size", str(batch),
                       "--device", args.device, "--num-workers", str(args.num_workers), "--dtype", args.dtype]
                if not args.amp:
                    cmd.append("--no-amp")
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    notes.append(f"{name} batch {batch}: skipped, longer than {args.timeout:g} s")
                    print(notes[-1], file=sys.stderr)
                    continue
                if proc.returncode != 0:  # out of memory (CUDA or killed): note it, go on with the others
                    tail = proc.stderr.strip().splitlines()[-1:] or [""]
                    notes.append(f"{name} batch {batch}: did not run (exit {proc.returncode}): {tail[0][-300:]}")
                    print(notes[-1], file=sys.stderr)
                    continue
                case = json.loads(proc.stdout.strip().splitlines()[-1])
                cases.append(case)
                mem = case.get("cuda_peak_mb", case["peak_rss_mb"])
                print(f"{name:20s} batch {batch:4d}: pipeline {case['pipeline_patches_per_s']:9.1f} patches/s, model "
                      f"{case['model_patches_per_s']:9.1f} patches/s ({case['pipeline_over_model']:.2f}), peak "
                      f"{mem:8.0f} MB", file=sys.stderr)
    report = {"config": {"encoders": args.encoders, "batch_sizes": args.batch_sizes, "device": args.device,
                         "n_patches": args.n_patches, "patch_px": args.patch_px, "num_workers": args.num_workers,
                         "dtype": args.dtype, "amp": args.amp, "seed": args.seed, "weights": "random"},
              "machine": {**machine_info(), "load_average_1min_before": load_before}, "cases": cases, "notes": notes,
              "total_seconds": time.perf_counter() - bench_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
