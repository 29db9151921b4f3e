"""`snakemake --profile slurm all`, literally, from the repository root, on a real one-node SLURM with two fake GPUs.

The SLURM test installs Debian's SLURM and munge (apt-get), starts munged, slurmctld and slurmd itself
(tests/slurm_cluster.py), runs a tiny two-dataset config through the profile with GPU training jobs, checks in
slurmctld that every job really was a SLURM job and that the training jobs got a GPU in the GPU partition,
compares every result with a local run (`--profile profiles/local`), and stops exactly the daemons it started.
Skipped, with the reason, where it cannot run (not root, no apt-get, a host with its own SLURM).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from slurm_cluster import OneNodeSlurm, cannot_run, install
from test_pipeline import TINY

from cmrcnet.config import REPO_ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]
SLURM_TIMEOUT_S = 1200  # the whole SLURM run took about 2 min on two cores before 2026-11-30, about 7 min after (see note)
GPU_RULES = {"train", "predict"}

# The pipeline test's two tiny synthetic datasets, two methods; every training job asks for one GPU.
CONFIG = {
    "seed": 0,
    "genes": TINY["genes"],
    "datasets": TINY["datasets"],
    "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 3, "num_workers": 0, "amp": False},
    "resources": {
        "train": {"gpus": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10},
        "predict": {"gpus": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10},
    },
    "methods": {
        "stnet": {"model": "stnet", "params": {"encoder": "test_resnet", "input_size": 32}},
        "histogene": {"model": "histogene", "params": {"patch_px": 16, "dim": 16, "depth": 1, "heads": 2},
                      "datasets": ["tiny-xenium"], "train": {"batch_size": 1}},
    },
}


def environment(**extra: str) -> dict[str, str]:
    """This environment without any SLURM/sbatch/profile settings of the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "CMRCNET_GPU_")) and k != "SNAKEMAKE_PROFILE"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def write_config(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def snakemake(args: list[str], env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    """Snakemake from the repository root, as a user types it (targets before --configfile)."""
    return subprocess.run([*SNAKEMAKE, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def steps_done(output: str) -> int:
    found = re.findall(r"(\d+) of (\d+) steps \(100%\) done", output)
    assert found, output[-3000:]
    return int(found[-1][1])


# -- the profiles, without SLURM (runs everywhere) -------------------------------------------------------------


def test_profile_name_slurm_resolves_from_the_repository_root(tmp_path):
    """`--profile slurm` from the repo root finds profiles/slurm, and its environment variables reach the jobs."""
    assert (REPO_ROOT / "slurm").resolve() == (REPO_ROOT / "profiles" / "slurm").resolve(), (
        "`snakemake --profile slurm` looks for ./slurm (then ~/.config/snakemake/slurm): "
        "the repository needs the symlink `slurm -> profiles/slurm`")
    cfg = write_config(tmp_path)
    env = environment(SBATCH_ACCOUNT="proj1", SBATCH_PARTITION="cpuq", CMRCNET_GPU_PARTITION="gpuq",
                      CMRCNET_GPU_MODEL="a100")
    plan = snakemake(["--profile", "slurm", "all", "-n", "-d", str(tmp_path), "--configfile", str(cfg)], env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    out = plan.stdout + plan.stderr
    assert "Using profile slurm " in out
    resources = [line.strip() for line in out.splitlines() if line.strip().startswith("resources:")]
    gpu = [line for line in resources if "gpu=1" in line]
    assert len(gpu) >= 7, resources  # 3 + 2 + 2 training jobs (and any inference jobs)
    for line in gpu:
        assert "gpu_model=a100" in line and "slurm_partition=gpuq" in line and "slurm_account=proj1" in line, line
        assert "mem_mb=1000" in line and "runtime=10" in line and "cpus_per_task=1" in line, line
    cpu = [line for line in resources if "gpu=" not in line and "slurm_partition=" in line]
    assert cpu and all("slurm_partition=cpuq" in line and "slurm_account=proj1" in line for line in cpu), resources
    assert all("mem_mb=8000" in line and "runtime=60" in line for line in cpu), resources

    bare = snakemake(["--profile", "slurm", "all", "-n", "-d", str(tmp_path), "--configfile", str(cfg)], environment())
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert not re.search(r"slurm_account|slurm_partition|gpu_model", bare.stdout + bare.stderr)


def test_local_profile_plans_the_demo(tmp_path):
    cfg = write_config(tmp_path)
    plan = snakemake(["--profile", "profiles/local", "all", "-n", "-d", str(tmp_path), "--configfile", str(cfg)],
                     environment())
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "Using profile profiles/local " in plan.stderr and "train" in plan.stdout


# -- the same pipeline through a real SLURM and locally ------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cannot_run()
    if reason:
        pytest.skip(f"no throwaway SLURM here: {reason}")
    started = time.monotonic()
    install()  # a failure here fails the test: CI must run it
    slurm = OneNodeSlurm(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        slurm.start()
        print(f"SLURM up after {time.monotonic() - started:.1f} s: {slurm.pids()}")
        yield slurm
    finally:
        slurm.stop()
        alive = {name: p.pid for name, p in slurm.procs.items() if p.poll() is None}
        assert not alive, f"daemons still running after stop: {alive}"


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """(SLURM run folder, its output, local run folder, its output)."""
    on_slurm = tmp_path_factory.mktemp("on-slurm")
    cfg = write_config(on_slurm)
    env = environment(CMRCNET_GPU_PARTITION=cluster.GPU_PARTITION, CMRCNET_GPU_MODEL=cluster.GPU_TYPE)
    # The literal command, plus what only this one-node CI cluster needs: squeue instead of sacct (no
    # accounting storage here), a 2-s first status check, and the per-job logs kept for the checks below.
    args = ["--profile", "slurm", "all", "-d", str(on_slurm),
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
            "--slurm-keep-successful-logs", "--configfile", str(cfg)]
    local = tmp_path_factory.mktemp("local")
    local_cfg = write_config(local)
    log = on_slurm / "snakemake-slurm.out"
    started = time.monotonic()
    with open(log, "w") as out:  # the local reference run goes on meanwhile: SLURM jobs mostly wait on polling
        proc = subprocess.Popen(["timeout", "-k", "30", str(SLURM_TIMEOUT_S), *SNAKEMAKE, *args], cwd=REPO_ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            ref = snakemake(["--profile", "profiles/local", "all", "-d", str(local), "--cores", "2",
                             "--configfile", str(local_cfg)], environment())
            local_s = time.monotonic() - started
            returncode = proc.wait(timeout=SLURM_TIMEOUT_S + 60)
        finally:
            if proc.poll() is None:  # Snakemake cancels its SLURM jobs on SIGTERM
                proc.terminate()
                proc.wait(timeout=60)
    slurm_s = time.monotonic() - started
    output = log.read_text()
    failed_logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                            for p in (on_slurm / ".snakemake" / "slurm_logs").rglob("*.log")
                            if "Error" in p.read_text(errors="replace"))
    assert returncode == 0, (f"snakemake --profile slurm all: exit {returncode} after {slurm_s:.0f} s\n"
                             f"{output[-5000:]}\n{failed_logs}\n{cluster.diagnostics()}")
    assert ref.returncode == 0, ref.stderr[-5000:]
    print(f"SLURM run {slurm_s:.0f} s, local run {local_s:.0f} s (at the same time)")
    return on_slurm, output, local, ref.stdout + ref.stderr


def slurm_jobs_of_the_run(cluster, output: str) -> dict[str, dict]:
    """SLURM job id -> slurmctld's record of it, for every job Snakemake says it submitted."""
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", output, re.M)
    known = cluster.jobs()
    jobs = {}
    for jobid, log in submitted:
        assert jobid in known, f"SLURM job {jobid} unknown to slurmctld"
        jobs[jobid] = dict(known[jobid], snakemake_log=log)
    return jobs


def test_every_job_ran_as_a_slurm_job(cluster, runs):
    on_slurm, output, local, local_output = runs
    jobs = slurm_jobs_of_the_run(cluster, output)
    # every job but the target rule `all`, which Snakemake runs itself
    assert len(jobs) == steps_done(output) - 1 == steps_done(local_output) - 1 > 20, output[-3000:]
    run_ids = {job["JobName"] for job in jobs.values()}
    assert len(run_ids) == 1, run_ids  # the plugin names every job of a run by the run's id
    rules = set()
    for jobid, job in jobs.items():
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["WorkDir"] == str(on_slurm), job
        rule = re.fullmatch(r"rule_([a-z_]+?)(?:_wildcards_.*)?", job["Comment"]).group(1)
        rules.add(rule)
        # the plugin's per-job log: written by SLURM (StdOut), from a Snakemake started inside the job
        log = Path(job["snakemake_log"])
        # .snakemake/slurm_logs/rule_{rule}/[{wildcards}/]{jobid}.log
        assert job["StdOut"] == str(log) and f"rule_{rule}" in (log.parent.name, log.parent.parent.name), job
        text = log.read_text()
        assert "--executor slurm-jobstep" in text and f"rule {rule}:" in text, text[-2000:]
        assert f"Allocate JobId={jobid} " in cluster.ctld_log.read_text()
    assert rules == set(re.findall(r"^(?:local)?rule (\w+):$", local_output, re.M)) - {"all"}
    assert {"synthesize", "normalise", "folds", "extract_patches", "train", "predict", "evaluate", "figures",
            "tables"} <= rules


def test_training_jobs_got_a_gpu_in_the_gpu_partition(cluster, runs):
    on_slurm, output, _, _ = runs
    jobs = slurm_jobs_of_the_run(cluster, output).values()
    gpu_jobs = [j for j in jobs if re.fullmatch(r"rule_([a-z_]+?)(?:_wildcards_.*)?", j["Comment"]).group(1) in GPU_RULES]
    assert len([j for j in gpu_jobs if j["Comment"].startswith("rule_train_")]) == 7
    for job in gpu_jobs:  # sbatch --gpus=fake:1 -p gpu; scontrol -d shows the GPU it was given
        assert job["Partition"] == cluster.GPU_PARTITION, job
        assert job.get("TresPerJob") == f"gres:gpu:{cluster.GPU_TYPE}:1", job
        assert job.get("JOB_GRES") == f"gpu:{cluster.GPU_TYPE}:1", job
    for job in jobs:
        if job not in gpu_jobs:
            assert job["Partition"] == cluster.DEFAULT_PARTITION and "gpu" not in job.get("TresPerJob", ""), job


def test_results_equal_a_local_run(runs):
    on_slurm, _, local, _ = runs
    rel = sorted(p.relative_to(local) for p in local.rglob("*")
                 if p.is_file() and p.parts[len(local.parts)] in ("processed", "models"))
    assert rel == sorted(p.relative_to(on_slurm) for p in on_slurm.rglob("*")
                         if p.is_file() and p.parts[len(on_slurm.parts)] in ("processed", "models"))
    for path in rel:
        a, b = local / path, on_slurm / path
        if path.suffix == ".tsv":
            assert a.read_bytes() == b.read_bytes(), path
        elif path.suffix == ".h5ad":
            x, y = ad.read_h5ad(a), ad.read_h5ad(b)
            assert list(x.obs_names) == list(y.obs_names) and list(x.var_names) == list(y.var_names), path
            X, Y = (m.toarray() if hasattr(m, "toarray") else m for m in (x.X, y.X))
            assert np.array_equal(X, Y), path
        elif path.suffix == ".h5":
            with h5py.File(a) as f, h5py.File(b) as g:
                assert np.array_equal(f["img"][:], g["img"][:]) and np.array_equal(f["coords"][:], g["coords"][:])
        elif path.suffix == ".pt":  # best.pt, checkpoints/{best,last}.pt
            x, y = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in (a, b))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), path
        elif path.name == "history.csv":
            x, y = pd.read_csv(a), pd.read_csv(b)
            pd.testing.assert_frame_equal(x.drop(columns="seconds"), y.drop(columns="seconds"))
    assert len([p for p in rel if p.name == "best.pt" and p.parent.name.startswith("fold")]) == 7

