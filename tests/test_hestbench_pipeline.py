"""The frozen-encoder path end to end through Snakemake, on a local fake hub: fetch the tiny encoder's weights and a
HEST-Benchmark task -> embed -> the four probes -> the leaderboard; and, on a synthetic dataset, probe methods
on the embedding cache -> evaluation -> Table 4 beside the paper's cTransPath values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from fakehub import ACCEPTED, FakeHub
from hestbench_fake import SAMPLES, write_fake_bench

from cmrcnet.config import REPO_ROOT
from cmrcnet.encoders import write_tiny_test_weights
from cmrcnet.inference.embed import read_embeddings

pytestmark = pytest.mark.slow

TOKEN = "hf_FAKEpipelineTOKEN1234567890"
PROBES = ["ridge-hestbench", "ridge-cv", "mlp", "knn"]
CONFIG = {
    "seed": 0,
    "genes": {"n_top_hvg": 100},
    "datasets": {
        "tiny-visium": {
            "source": "synthetic", "technology": "visium", "samples": ["V1", "V2", "V3"],
            "synthetic": {"seed": 5, "width_um": 600, "height_um": 600, "n_genes": 300},
        },
    },
    "patches": {"size_px": 32, "um_per_px": 2.0},
    "evaluation": {"k": [3, 5], "tta": False, "top_genes": [20, 50], "bootstrap": 100},
    "encoders": {"dtype": "float32", "batch_size": 16},
    # the paper's Table 4 path: a frozen encoder read out by HEST's ridge and by retrieval, labelled cTransPath to
    # print the paper's numbers beside ours (there are none for this dataset, so the paper column stays empty)
    "methods": {
        "tiny-ridge": {"model": "probe", "paper_name": "cTransPath",
                       "params": {"encoder": "tiny-test", "probe": "ridge-hestbench"}},
        "tiny-knn": {"model": "probe", "params": {"encoder": "tiny-test", "probe": "knn"}},
        "bleep": {"model": "bleep", "params": {"encoder": "test_resnet", "input_size": 32, "embed_dim": 16}},
    },
    "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 2, "num_workers": 0, "amp": False},
    # the deployable BLEEP's image tower (trained on V1-V3) benchmarked beside the registered encoder
    "hestbench": {"tasks": ["IDC"], "encoders": ["tiny-test"], "probes": PROBES,
                  "trained_encoders": {"bleep-tiny": {"dataset": "tiny-visium", "method": "bleep"}}},
}


def _snakemake(workdir: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "-d", str(workdir), "--configfile",
         str(config), "--cores", "2", *args], capture_output=True, text=True, env=env, timeout=1200)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    repo, model = root / "repo", root / "model"
    write_fake_bench(repo, "IDC")
    write_tiny_test_weights(model / "pytorch_model.bin", seed=3)
    workdir = root / "run"
    workdir.mkdir()
    with FakeHub(repo, "MahmoodLab/hest-bench", {TOKEN: ACCEPTED}) as hub:
        hub.add_repo(model, "cmrcnet/tiny-test-encoder", repo_type="model", gated=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", HF_ENDPOINT=hub.url,
                   HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf_home"))
        targets = ["results/tables/hestbench_leaderboard.csv", "results/tables/hestbench_leaderboard.md",
                   "results/tables/summary.csv"]
        result = _snakemake(workdir, env, *targets)
        assert result.returncode == 0, result.stderr[-4000:]
        downloads = hub.count("GET")
        again = _snakemake(workdir, env, *targets)
        assert again.returncode == 0, again.stderr[-4000:]
        assert "Nothing to be done" in again.stdout + again.stderr
        assert hub.count("GET") == downloads  # nothing fetched twice
    return workdir, result


def test_weights_come_from_the_hub_once_and_are_recorded(bench_run):
    workdir, result = bench_run
    source = json.loads((workdir / "weights/tiny-test/SOURCE.json").read_text())
    assert source["repo_id"] == "cmrcnet/tiny-test-encoder" and source["filename"] == "pytorch_model.bin"
    assert (workdir / "weights/tiny-test/model.safetensors").is_file()
    assert TOKEN not in result.stdout + result.stderr
    assert not any(TOKEN in p.read_text(errors="ignore") for p in workdir.rglob("*.log"))


def test_bench_embeddings_follow_the_patch_files(bench_run):
    workdir, _ = bench_run
    sha = json.loads((workdir / "weights/tiny-test/SOURCE.json").read_text())
    for sample in SAMPLES:
        emb = read_embeddings(workdir / f"processed/hest-bench/IDC/embeddings/tiny-test/{sample}.h5", encoder="tiny-test")
        with h5py.File(workdir / f"data/hest-bench/IDC/patches/{sample}.h5") as f:
            barcodes = [b[0].decode() for b in f["barcode"][:]]
        assert list(emb.barcodes) == barcodes and emb.values.shape == (len(barcodes), 16)
        assert emb.attrs["weights_sha256"] in (sha.get("local_sha256"), sha.get("sha256"))


def test_leaderboard_has_every_probe_and_says_nothing_is_published_for_the_tiny_encoder(bench_run):
    workdir, _ = bench_run
    for encoder in ("tiny-test", "bleep-tiny"):
        for probe in PROBES:
            result = json.loads((workdir / f"results/hest-bench/IDC/{encoder}/{probe}.json").read_text())
            assert result["task"] == "IDC" and len(result["folds"]) == 2
    board = pd.read_csv(workdir / "results/tables/hestbench_leaderboard.csv")
    assert set(board["encoder"]) == {"tiny-test", "bleep-tiny"}
    labels = set(board["probe"])
    assert {"ridge-hestbench", "ridge-cv", "mlp"} <= labels and {"knn-k3", "knn-k5"} <= labels
    idc = board[board["task"] == "IDC"]
    assert idc["ours_mean"].notna().all() and np.isfinite(idc["ours_mean"]).all()
    md = (workdir / "results/tables/hestbench_leaderboard.md").read_text()
    assert "not published" in md


def test_a_trained_models_image_tower_is_benchmarked_as_an_encoder(bench_run):
    """bleep-tiny's cache holds the deployable BLEEP's retrieval embedding of each bench patch."""
    from cmrcnet.encoders.trained import trained_encoder

    workdir, _ = bench_run
    model_path = workdir / "models/tiny-visium/bleep/all/best.pt"
    encoder = trained_encoder("bleep-tiny", model_path)
    sample = SAMPLES[0]
    emb = read_embeddings(workdir / f"processed/hest-bench/IDC/embeddings/bleep-tiny/{sample}.h5", encoder="bleep-tiny")
    with h5py.File(workdir / f"data/hest-bench/IDC/patches/{sample}.h5") as f:
        images = f["img"][()]
    np.testing.assert_allclose(emb.values, encoder.embed_uint8(images).numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(emb.values, axis=1), 1.0, rtol=1e-3)  # the L2-normalised embedding


def test_probe_methods_reach_table4_beside_the_paper(bench_run):
    workdir, _ = bench_run
    for fold in range(3):
        for method in ("tiny-ridge", "tiny-knn"):
            assert (workdir / f"results/tiny-visium/predictions/{method}/fold{fold}.h5ad").is_file()
        assert (workdir / f"processed/tiny-visium/embeddings/tiny-test/V{fold + 1}.h5").is_file()
    assert not list((workdir / "models").glob("*/tiny-*"))  # probes train nothing
    table4 = pd.read_csv(workdir / "results/tables/table4_foundation.csv", comment="#")
    # the ridge probe (no k) and the retrieval probe at the largest k only
    assert set(table4["method"]) == {"tiny-ridge", "tiny-knn-k5"}
