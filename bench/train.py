"""Benchmark training throughput: one optimizer step per model at the paper's sizes, and the data loader alone.

Why: a training job is only as fast as the slower of its two halves. The model step sets how many patches per
second the job consumes (batch / step time); the loader (HDF5 read, dihedral augmentation, ImageNet
normalisation, collation) must deliver at least that rate, or the accelerator waits. This measures both.

Every model repeat runs in a fresh subprocess, so its peak memory is its own: on the CPU the process's peak
RSS (`ru_maxrss`), on CUDA `torch.cuda.max_memory_allocated`. A step is what `cmrcnet.train._run_epoch`
does for one batch: copy to the device, forward under bf16 autocast (CUDA only, as in training), zero_grad,
backward, AdamW step; on CUDA the images are channels_last (spot models) and come from pinned memory.
Inputs are seeded random tensors of the shapes the training loader delivers. The loader is measured on a real
processed dataset: synthetic Visium samples taken through gene selection, normalisation, 224 px patch extraction
and folds, as the pipeline does.

    python bench/train.py --out bench/out/train.json
    python bench/train.py --device cuda --batch-size 64 --workers 0 2 4 8   # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("cmrcnet", "bleep", "stnet", "histogene")
PAPER_SETTINGS = {  # the defaults are the paper's sizes; written out so the JSON says what was measured
    "cmrcnet": {"encoder": "vit_base_patch32_224"},
    "bleep": {"encoder": "resnet50"},
    "stnet": {"encoder": "densenet121"},
    "histogene": {"patch_px": 112, "dim": 1024, "depth": 8, "heads": 16, "n_pos": 128},
}
DEFAULT_BATCH = {"cpu": 8, "cuda": 64}  # small on the CPU; the paper's 64 on a GPU


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    """Resident memory now (not the peak), so the step's own increase can be told from the setup's."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def environment(device: str) -> dict:
    """Versions and machine, so numbers from different machines are not compared blindly."""
    import h5py
    import timm
    import torch

    env = {
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__,
        "h5py": h5py.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
        env["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu_model()
    return env


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ model step


def make_inputs(model, n_genes: int, batch_size: int, histogene_spots: int, seed: int) -> dict:
    """Seeded tensors with the shapes and dtypes the training loader delivers for this model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    size = int(model.input_size)
    if model.slide_level:  # one whole slide per step: (1, N, 3, S, S) patches, (1, N, 2) grid positions
        n = histogene_spots
        return {"image": torch.randn(1, n, 3, size, size, generator=gen),
                "pos": torch.randint(0, model.n_pos, (1, n, 2), generator=gen),
                "expr": torch.rand(1, n, n_genes, generator=gen) * 3}
    return {"image": torch.randn(batch_size, 3, size, size, generator=gen),
            "expr": torch.rand(batch_size, n_genes, generator=gen) * 3}  # log1p-normalised scale


def run_model(name: str, device_name: str, n_genes: int, batch_size: int, histogene_spots: int, steps: int,
              warmup: int, seed: int, threads: int | None) -> dict:
    """Time `warmup + steps` training steps of one model in this (fresh) process; returns the measurements."""
    import torch

    from cmrcnet.models import create_model

    if threads:
        torch.set_num_threads(threads)
    rss_imports = current_rss_mb()
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    model = create_model(name, n_genes=n_genes, **PAPER_SETTINGS[name])
    n_params = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(model, n_genes, batch_size, histogene_spots, seed)
    if hasattr(model, "set_output_bias"):  # as train_fold does (STNet starts at the mean expression)
        model.set_output_bias(inputs["expr"].reshape(-1, n_genes).mean(0))
    channels_last = cuda and not model.slide_level  # train_fold: channels_last only on CUDA, spot models
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cuda:  # the loader pins its batches (pin_memory=True on CUDA)
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)  # the paper's optimizer
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)  # amp only on CUDA, as in training
    model.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}  # as _run_epoch, per batch
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        sync()
        seconds = time.perf_counter() - start
        if not torch.isfinite(out["loss"].detach()).item():
            raise RuntimeError(f"{name}: loss is {out['loss'].item()}")
        return seconds

    rss_setup, peak_setup = current_rss_mb(), peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        static_mb = torch.cuda.memory_allocated(device) / 2**20
    warm = [step() for _ in range(warmup)]  # the first steps allocate AdamW's state and pick kernels
    times = [step() for _ in range(steps)]
    n_samples = histogene_spots if model.slide_level else batch_size
    median = statistics.median(times)
    result = {
        "model": name, "settings": PAPER_SETTINGS[name], "n_genes": n_genes, "params": n_params,
        "input_size": int(model.input_size), "slide_level": bool(model.slide_level),
        "batch": {"slides": 1, "spots": histogene_spots} if model.slide_level else {"spots": batch_size},
        "samples_per_step": n_samples, "warmup_s": warm, "step_s": times, "step_s_median": median,
        "samples_per_s": n_samples / median, "amp_bf16": cuda, "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "rss_after_imports_mb": rss_imports, "rss_before_steps_mb": rss_setup, "peak_rss_setup_mb": peak_setup,
        "peak_rss_mb": peak_rss_mb(),
    }
    result["peak_rss_step_increase_mb"] = result["peak_rss_mb"] - rss_setup
    if cuda:
        result.update(cuda_static_mb=static_mb, cuda_peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                      cuda_peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                      device_name=torch.cuda.get_device_name(device))
    return result


def peak_memory_mb(run: dict) -> float:
    """The memory column: CUDA peak allocated on a GPU, else the process's peak RSS."""
    return run.get("cuda_peak_allocated_mb", run["peak_rss_mb"])


# ------------------------------------------------------------------------------------------------ data loader


def build_dataset(root: Path, n_samples: int, width_um: float, n_genes: int, seed: int) -> Path:
    """A processed dataset (genes.tsv, st/, 224 px patches/, folds.tsv) from synthetic Visium samples, built by
    the pipeline's own stages as tests/test_train.py's `synthetic_dir` does; reused while its settings match.

    Each sample measures `n_genes` genes and contributes its top 80 % as HVGs, so the union (the expression
    width the loader carries) is close to `n_genes`, as for the paper's Visium datasets."""
    from cmrcnet.data.folds import write_folds
    from cmrcnet.data.genes import normalise_sample, select_genes
    from cmrcnet.data.patches import extract_patches
    from cmrcnet.data.synthetic import synthesize_sample

    n_top_hvg = int(0.8 * n_genes)
    config = {"n_samples": n_samples, "width_um": width_um, "n_genes": n_genes, "n_top_hvg": n_top_hvg, "seed": seed,
              "patch_px": 224, "um_per_px": 0.5}
    raw, proc = root / "raw", root / "processed"
    stamp = root / "config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == config:
        return proc
    start = time.perf_counter()
    samples = [f"S{i}" for i in range(n_samples)]
    for i, s in enumerate(samples):
        synthesize_sample(raw, s, technology="visium", sample_index=i, seed=seed, patient=s, width_um=width_um,
                          height_um=width_um, n_genes=n_genes)
    st = {s: raw / "st" / f"{s}.h5ad" for s in samples}
    select_genes(st, proc / "genes.tsv", method="hvg_union", dataset="bench", n_top_hvg=n_top_hvg)
    for s in samples:
        normalise_sample(st[s], proc / "genes.tsv", proc / "st" / f"{s}.h5ad", sample=s, dataset="bench")
        extract_patches(raw / "wsis" / f"{s}.tif", st[s], raw / "metadata" / f"{s}.json",
                        proc / "patches" / f"{s}.h5", proc / "patches" / f"{s}.parquet", sample=s,
                        patch_px=config["patch_px"], um_per_px=config["um_per_px"], progress=False)
    write_folds({s: raw / "metadata" / f"{s}.json" for s in samples}, proc / "folds.tsv",
                scheme="leave_one_sample_out", dataset="bench")
    stamp.write_text(json.dumps(config))
    log(f"built the loader dataset ({n_samples} synthetic samples) in {time.perf_counter() - start:.1f} s")
    return proc


def run_loader(dataset_dir: Path, kind: str, workers: int, batch_size: int, n_items: int, seed: int,
               pin_memory: bool) -> dict:
    """Items/s of the training loader as `cmrcnet.train._make_loaders` builds it (augmented, shuffled by
    EpochSampler, persistent workers), over all spots of the dataset, epoch after epoch until `n_items` items.

    The first batch (worker start-up, HDF5 opens) is timed apart; the rate is over the batches after it."""
    import torch
    from torch.utils.data import DataLoader

    from cmrcnet.data.datasets import EpochSampler, load_fold

    fold = load_fold(dataset_dir, 0)
    part = fold.all_spots(fold.samples)
    if kind == "spot":
        ds = fold.spot_dataset(part, 224, augment=True, seed=seed)
    else:  # HisToGene: one whole slide per item, patches resized to 112 px
        ds = fold.slide_dataset(part, PAPER_SETTINGS["histogene"]["patch_px"], augment=True, seed=seed)
        batch_size, workers = 1, min(workers, len(ds))
    sampler = EpochSampler(len(ds), seed, shuffle=True)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) > batch_size,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    n_batches = n_spots = 0
    epoch = 0
    start = time.perf_counter()
    first_s = None
    while first_s is None or n_batches * (batch_size if kind == "spot" else 1) < n_items:
        epoch += 1
        sampler.set_epoch(epoch)
        for batch in loader:
            if first_s is None:
                first_s = time.perf_counter() - start
                start = time.perf_counter()
                continue
            n_batches += 1
            n_spots += int(batch["expr"].numel() // batch["expr"].shape[-1])
            if n_batches * (batch_size if kind == "spot" else 1) >= n_items:
                break
    seconds = time.perf_counter() - start
    del loader  # stops the persistent workers
    ds.close()
    items = n_batches * batch_size if kind == "spot" else n_batches
    return {"kind": kind, "workers": workers, "batch_size": batch_size, "items": items, "spots": n_spots,
            "seconds": seconds, "first_batch_s": first_s, "items_per_s": items / seconds,
            "spots_per_s": n_spots / seconds, "dataset_items": len(ds), "pin_memory": pin_memory}


# ------------------------------------------------------------------------------------------------ main


def summarise_models(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, reps in runs.items():
        step = statistics.median(r["step_s_median"] for r in reps)
        first = reps[0]
        out[name] = {
            "params_m": first["params"] / 1e6, "samples_per_step": first["samples_per_step"],
            "batch": first["batch"], "step_s_median": step, "samples_per_s": first["samples_per_step"] / step,
            "step_s_min": min(min(r["step_s"]) for r in reps), "step_s_max": max(max(r["step_s"]) for r in reps),
            "peak_memory_mb_max": max(peak_memory_mb(r) for r in reps),
            "peak_rss_step_increase_mb_max": max(r["peak_rss_step_increase_mb"] for r in reps),
            "rss_before_steps_mb_median": statistics.median(r["rss_before_steps_mb"] for r in reps),
            "runs": reps,
        }
    return out


def summarise_loader(runs: dict[str, list[dict]]) -> dict:
    return {key: {"items_per_s_median": statistics.median(r["items_per_s"] for r in reps),
                  "spots_per_s_median": statistics.median(r["spots_per_s"] for r in reps),
                  "first_batch_s_median": statistics.median(r["first_batch_s"] for r in reps), "runs": reps}
            for key, reps in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, help="spots per step for the spot models (default 8 on cpu, 64 on "
                                                         "cuda); HisToGene takes one slide of --histogene-spots")
    parser.add_argument("--histogene-spots", type=int, default=1024, help="spots in HisToGene's one-slide batch")
    parser.add_argument("--n-genes", type=int, default=1000, help="genes predicted (Visium HVG union: ~1000)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat, after --warmup steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per model; medians reported")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = cores)")
    parser.add_argument("--workers", nargs="*", type=int, default=[0, 1, 2], help="loader worker counts; none: skip")
    parser.add_argument("--loader-patches", type=int, default=2048, help="patches timed per loader run")
    parser.add_argument("--loader-slides", type=int, default=12, help="slides timed per HisToGene loader run")
    parser.add_argument("--samples", type=int, default=3, help="synthetic samples in the loader dataset")
    parser.add_argument("--width-um", type=float, default=2000.0, help="side of each synthetic sample (~350 spots)")
    parser.add_argument("--data", type=Path, default=Path("bench/out/train_data"), help="loader dataset dir (kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/train.json"))
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_size = args.batch_size or DEFAULT_BATCH[args.device]

    if args.child:
        print(json.dumps(run_model(args.child, args.device, args.n_genes, batch_size, args.histogene_spots,
                                   args.steps, args.warmup, args.seed, args.threads)))
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model_runs: dict[str, list[dict]] = {}
    for name in args.models:
        model_runs[name] = []
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--batch-size", str(batch_size),
                   "--histogene-spots", str(args.histogene_spots), "--n-genes", str(args.n_genes),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} run {r + 1} failed:\n{proc.stderr}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            model_runs[name].append(res)
            log(f"{name} run {r + 1}: step {res['step_s_median']:.3f} s (median of {args.steps}), "
                f"{res['samples_per_s']:.1f} samples/s, peak memory {peak_memory_mb(res):.0f} MB")
    models = summarise_models(model_runs)

    loader: dict = {}
    if args.workers:
        data = build_dataset(args.data, args.samples, args.width_um, n_genes=args.n_genes, seed=args.seed)
        kinds = ["spot"] * any(m != "histogene" for m in args.models) + ["slide"] * ("histogene" in args.models)
        loader_runs: dict[str, list[dict]] = {}
        for kind in kinds:
            for workers in args.workers:
                key = f"{kind}/{workers}"
                loader_runs[key] = []
                for r in range(args.repeats):
                    n_items = args.loader_patches if kind == "spot" else args.loader_slides
                    res = run_loader(data, kind, workers, batch_size, n_items, args.seed, args.device == "cuda")
                    loader_runs[key].append(res)
                    log(f"loader {kind}, {workers} workers, run {r + 1}: {res['items_per_s']:.1f} items/s, "
                        f"{res['spots_per_s']:.0f} spots/s (first batch {res['first_batch_s']:.2f} s)")
        loader = summarise_loader(loader_runs)
        n_genes = len((data / "genes.tsv").read_text().splitlines()) - 1  # header line
        loader["dataset"] = {"dir": str(data), "n_genes": n_genes, **json.loads((args.data / "config.json").read_text())}

    # What each model needs from the loader: patches (spots) per second = spots per step / step time.
    needed = {name: {"spots_per_s_needed": m["samples_per_s"],
                     "loader": "slide" if model_runs[name][0]["slide_level"] else "spot"} for name, m in models.items()}
    for need in needed.values():
        best = [v for k, v in loader.items() if k.startswith(need["loader"] + "/")]
        if best:
            top = max(best, key=lambda v: v["spots_per_s_median"])
            need["best_loader_spots_per_s"] = top["spots_per_s_median"]
            need["best_loader_workers"] = top["runs"][0]["workers"]
            need["loader_keeps_up"] = top["spots_per_s_median"] >= need["spots_per_s_needed"]

    report = {
        "config": {"models": args.models, "device": args.device, "batch_size": batch_size,
                   "histogene_spots": args.histogene_spots, "n_genes": args.n_genes, "steps": args.steps,
                   "warmup": args.warmup, "repeats": args.repeats, "workers": args.workers,
                   "loader_patches": args.loader_patches, "loader_slides": args.loader_slides, "seed": args.seed,
                   "settings": {m: PAPER_SETTINGS[m] for m in args.models}},
        "environment": environment(args.device),
        "models": models, "loader": loader, "needed": needed,
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} ({report['wall_s']:.0f} s)")

    print("| model | params (M) | batch (spots) | step s (median) | samples/s | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        print(f"| {name} | {m['params_m']:.1f} | {m['samples_per_step']} | {m['step_s_median']:.2f} "
              f"| {m['samples_per_s']:.1f} | {m['peak_memory_mb_max']:.0f} |")
    if loader:
        print("\n| loader | workers | items/s | spots/s | first batch s |")
        print("|---|---:|---:|---:|---:|")
        for key, v in loader.items():
            if key != "dataset":
                kind, workers = key.split("/")
                print(f"| {kind} | {workers} | {v['items_per_s_median']:.1f} | {v['spots_per_s_median']:.0f} "
                      f"| {v['first_batch_s_median']:.2f} |")


if __name__ == "__main__":
    main()
