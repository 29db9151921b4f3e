"""Benchmark exact top-k retrieval: blocked `topk_cosine` against the dense approach.

Why: retrieval models (CMRCNet, BLEEP) look up the k most similar training spots for every test spot. The
dense approach builds the whole queries x references similarity matrix and sorts every row; at 1e4 queries x
1e6 references that matrix alone is 40 GB. `cmrcnet.inference.retrieval.topk_cosine` keeps a running top-k
over blocks instead. This measures queries/s and peak memory of both on random 256-d embeddings, checks
that they return the same neighbours, and times the bare matrix product of the same blocks, so the cost of the
search beyond the product (the `blocked / matmul` ratio) is measured by the benchmark itself.

Methods (each run is a fresh subprocess, so its peak RSS is its own; on CUDA, max_memory_allocated):
- blocked:    topk_cosine (default blocks for the device);
- dense-sort: normalise, S = Q @ R.T, torch.sort(S, descending=True, stable=True), keep the first k columns;
- dense-topk: normalise, S = Q @ R.T, torch.topk(S, k) (the cheaper dense variant; order of ties arbitrary);
- matmul:     the hardware floor for blocked: the same normalisation (`_normalised`, timed apart as
              `normalise_seconds`) and the same products, query block x reference block (topk_cosine's blocks,
              equal query blocks included) into one reused buffer with torch.mm, and nothing else (no top-k, no
              results). Its time includes the normalisation, as blocked's does; `blocked_over_matmul` (printed, and
              in the blocked case's JSON) is blocked's median time over matmul's at the same size.
A dense case whose memory estimate exceeds the budget is skipped with a note; the dense methods then run on
fewer queries (halved until they fit), next to blocked on the same queries, so there is still a ratio.

    python bench/retrieval.py --queries 10000 --references 100000 1000000 --dim 256 --k 500 --repeats 3 \\
        --device cpu --out bench/out/retrieval.json
    python bench/retrieval.py --methods blocked matmul ...   # only the ratio to the bare product
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("blocked", "dense-sort", "dense-topk", "matmul")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def make_data(n_queries: int, n_refs: int, dim: int, seed: int):
    """Standard-normal float32 embeddings, the same in every process (queries: the first n of a fixed set)."""
    import torch

    queries = torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(seed))
    references = torch.randn(n_refs, dim, generator=torch.Generator().manual_seed(seed + 1))
    return queries, references


def dense_bytes(method: str, n: int, m: int, dim: int, k: int) -> int:
    """Memory the dense method needs beyond its inputs: normalised copies, S, and the sort / top-k output."""
    copies = 4 * (n + m) * dim
    if method == "dense-sort":
        return copies + 16 * n * m  # S (float32) + sorted values (float32) + sort indices (int64)
    return copies + 4 * n * m + 12 * n * k


def run_child(args) -> dict:
    """One timed run in this (fresh) process; prints nothing but the JSON result."""
    import torch
    import torch.nn.functional as F

    from cmrcnet.inference.retrieval import topk_cosine

    device = torch.device(args.device)
    queries, references = make_data(args.all_queries, args.n_refs, args.dim, args.seed)
    queries = queries[:args.n_queries].clone()
    inputs_rss = current_rss_mb()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    start = time.perf_counter()
    extra = {}
    if args.child == "blocked":
        sims, idx = topk_cosine(queries, references, args.k, device=device)
    elif args.child == "matmul":
        extra["normalise_seconds"] = matmul_blocks(queries, references, device)
        sims = idx = None
    else:
        with torch.inference_mode():
            q = F.normalize(queries.to(device), dim=1)
            r = F.normalize(references.to(device), dim=1)
            full = q @ r.T
            if args.child == "dense-sort":
                values, order = torch.sort(full, dim=1, descending=True, stable=True)
                sims, idx = values[:, :args.k].cpu(), order[:, :args.k].cpu()
            else:
                values, order = torch.topk(full, args.k, dim=1)
                sims, idx = values.cpu(), order.cpu()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    if args.save and sims is not None:
        np.savez(args.save, sims=sims.numpy(), idx=idx.numpy())
    result = {"method": args.child, "queries": args.n_queries, "references": args.n_refs, "seconds": seconds,
              "queries_per_s": args.n_queries / seconds, "peak_rss_mb": peak_rss_mb(), "inputs_rss_mb": inputs_rss,
              "threads": torch.get_num_threads(), **extra}
    if cuda:
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return result


def matmul_blocks(queries, references, device) -> float:
    """The products `topk_cosine` computes, in its blocks, and nothing else; returns the normalisation's seconds."""
    import torch

    from cmrcnet.inference.retrieval import DEFAULT_BLOCKS, _normalised

    start = time.perf_counter()
    q, r = _normalised(queries, device), _normalised(references, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    normalise = time.perf_counter() - start
    n, m = q.shape[0], r.shape[0]
    qb, rb = DEFAULT_BLOCKS.get(device.type, DEFAULT_BLOCKS["cpu"])
    qb, rb = -(-n // -(-n // qb)), min(rb, m)  # equal query blocks, as topk_cosine makes them
    buf = torch.empty(qb * rb, dtype=torch.float32, device=device)
    with torch.inference_mode():
        for q0 in range(0, n, qb):
            block = q[q0:q0 + qb]
            for r0 in range(0, m, rb):
                ref = r[r0:r0 + rb]
                torch.mm(block, ref.T, out=buf[:block.shape[0] * ref.shape[0]].view(block.shape[0], ref.shape[0]))
    return normalise


def compare(a: dict, b: dict) -> dict:
    """How far two saved results agree: exact indices, and (for ties/rounding) sets and similarities."""
    n = min(len(a["idx"]), len(b["idx"]))
    ia, ib, sa, sb = a["idx"][:n], b["idx"][:n], a["sims"][:n], b["sims"][:n]
    same_sets = np.mean([set(x) == set(y) for x, y in zip(ia, ib)])
    return {"queries_compared": int(n), "identical_indices": bool(np.array_equal(ia, ib)),
            "positions_differing": int((ia != ib).sum()), "rows_with_same_set": float(same_sets),
            "identical_similarities": bool(np.array_equal(sa, sb)), "max_similarity_diff": float(np.abs(sa - sb).max())}


def machine_info() -> dict:
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    info = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--references", type=int, nargs="+", default=[100000, 1000000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-repeats", type=int, help="repeats of the dense methods (default: --repeats)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dense-fallback-queries", type=int, default=1000,
                        help="queries for the dense methods when the full case does not fit (halved until it does)")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="largest dense estimate to run (default: 75%% of MemAvailable, or of free GPU memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/retrieval.json"))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n-queries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--all-queries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n-refs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.memory_budget_gb is not None:
        budget = int(args.memory_budget_gb * 1e9)
    elif args.device == "cuda":
        budget = int(0.75 * torch.cuda.mem_get_info()[0])
    else:
        budget = int(0.75 * mem_available_bytes())
    dense_repeats = args.repeats if args.dense_repeats is None else args.dense_repeats
    print(f"dense memory budget {budget / 1e9:.1f} GB", file=sys.stderr)
    bench_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="retrieval_bench_"))
    cases, notes, checks = [], [], []

    def measure(method: str, n: int, m: int) -> dict:
        saved = work / f"{method}_{n}_{m}.npz"
        runs = []
        for r in range(args.repeats if method == "blocked" else dense_repeats):
            cmd = [sys.executable, __file__, "--child", method, "--n-queries", str(n), "--all-queries",
                   str(args.queries), "--n-refs", str(m), "--dim", str(args.dim), "--k", str(args.k),
                   "--device", args.device, "--seed", str(args.seed)]
            if r == 0:
                cmd += ["--save", str(saved)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. killed for memory: note it and go on with the other cases
                note = f"{method} at {n} x {m} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
                notes.append(note)
                print(note, file=sys.stderr)
                return None
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            mem = runs[-1].get("cuda_peak_mb", runs[-1]["peak_rss_mb"])
            print(f"{method:10s} {n:>6d} x {m:>8d}: run {r + 1} {runs[-1]['seconds']:7.2f} s, "
                  f"{runs[-1]['queries_per_s']:9.1f} queries/s, peak {mem:7.0f} MB", file=sys.stderr)
        case = {"method": method, "queries": n, "references": m, "dim": args.dim, "k": args.k,
                "seconds_median": statistics.median(x["seconds"] for x in runs),
                "queries_per_s_median": statistics.median(x["queries_per_s"] for x in runs),
                "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] for x in runs),
                "inputs_rss_mb_median": statistics.median(x["inputs_rss_mb"] for x in runs), "runs": runs}
        if args.device == "cuda":
            case["cuda_peak_mb_median"] = statistics.median(x["cuda_peak_mb"] for x in runs)
        case["saved"] = str(saved)
        cases.append(case)
        return case

    for m in args.references:
        full, skipped = {}, []
        for method in args.methods:
            need = dense_bytes(method, args.queries, m, args.dim, args.k) if method.startswith("dense") else 0
            if need <= budget:
                full[method] = measure(method, args.queries, m)
            else:
                skipped.append((method, need))
        groups = [full]
        if skipped:
            n = args.dense_fallback_queries
            while n > 1 and any(dense_bytes(method, n, m, args.dim, args.k) > budget for method, _ in skipped):
                n //= 2
            for method, need in skipped:
                note = (f"{method} at {args.queries} x {m} skipped: it needs ~{need / 1e9:.0f} GB "
                        f"(budget {budget / 1e9:.1f} GB); measured at {n} x {m} instead, next to blocked")
                notes.append(note)
                print(note, file=sys.stderr)
            small = {"blocked": measure("blocked", n, m)} if "blocked" in args.methods else {}
            small.update({method: measure(method, n, m) for method, _ in skipped})
            groups.append(small)
            if full.get("blocked") and small.get("blocked"):
                checks.append({"against": f"blocked at {n} queries (a prefix of the {args.queries})", "references": m,
                               **compare(np.load(full["blocked"]["saved"]), np.load(small["blocked"]["saved"]))})
        for group in groups:
            ref = group.get("blocked")
            if ref is None:
                continue
            ref_data = np.load(ref["saved"])
            for method, case in group.items():
                if method == "matmul" and case is not None:
                    ref["blocked_over_matmul"] = ref["seconds_median"] / case["seconds_median"]
                    print(f"blocked / matmul ({case['queries']} x {m}): {ref['blocked_over_matmul']:.3f} "
                          f"(normalisation {statistics.median(x['normalise_seconds'] for x in case['runs']):.2f} s "
                          f"of matmul's {case['seconds_median']:.2f} s)", file=sys.stderr)
                if method in ("blocked", "matmul") or case is None:
                    continue
                check = {"against": method, "queries": case["queries"], "references": m,
                         **compare(ref_data, np.load(case["saved"]))}
                case["speedup_of_blocked"] = ref["queries_per_s_median"] / case["queries_per_s_median"]
                case["peak_rss_ratio_to_blocked"] = case["peak_rss_mb_median"] / ref["peak_rss_mb_median"]
                checks.append(check)
                print(f"check blocked vs {method} ({case['queries']} x {m}): {check}", file=sys.stderr)

    for case in cases:
        Path(case.pop("saved")).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "config": {"queries": args.queries, "references": args.references, "dim": args.dim, "k": args.k,
                   "repeats": args.repeats, "dense_repeats": dense_repeats, "device": args.device,
                   "seed": args.seed, "dense_budget_gb": budget / 1e9},
        "machine": machine_info(), "cases": cases, "checks": checks, "notes": notes,
        "total_seconds": time.perf_counter() - bench_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
