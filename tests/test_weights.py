"""Pretrained weights fetched once from the hub (rule fetch_weights), against a fake hub huggingface_hub talks HTTP to."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fakehub import ACCEPTED, NO_TERMS, FakeHub
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from test_hest import hub_env  # noqa: F401 - the isolated-hub fixture is shared

from cmrcnet.config import REPO_ROOT
from cmrcnet.errors import CMRCNetError
from cmrcnet.models import create_model
from cmrcnet.recipes import effective_method
from cmrcnet.weights import LOCAL_FILE, SOURCE_FILE, fetch_weights, hub_source, pretrained_name

NAME = "test_resnet.r160_in1k"  # a tiny timm architecture with ImageNet weights on the hub (timm/test_resnet.r160_in1k)
REPO = f"timm/{NAME}"
TOKEN = "hf_FAKEweightsTOKEN1234567890"
NO_TERMS_TOKEN = "hf_FAKEnoTERMSweights0987654321"




def write_weight_repo(repo: Path) -> Path:
    """A timm hub repo: model.safetensors of a seeded test_resnet with its ImageNet classifier, plus config.json."""
    repo.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False)  # num_classes=1000, as timm's hub files
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, repo / LOCAL_FILE)
    (repo / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 1000}))
    return repo / LOCAL_FILE


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tmp_path, hub_env):  # noqa: F811
    """A public model repo, as timm's ImageNet weights are."""
    write_weight_repo(tmp_path / "repo")
    with FakeHub(tmp_path / "repo", REPO, {TOKEN: ACCEPTED}, repo_type="model", gated=False) as server:
        hub_env(server.url)
        yield server


@pytest.fixture
def gated_hub(tmp_path, hub_env):  # noqa: F811
    write_weight_repo(tmp_path / "repo")
    with FakeHub(tmp_path / "repo", REPO, {TOKEN: ACCEPTED, NO_TERMS_TOKEN: NO_TERMS}, repo_type="model") as server:
        hub_env(server.url)
        yield server


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


def assert_token_safe(msg: str, out: Path) -> None:
    assert "\n" not in msg and TOKEN not in msg and NO_TERMS_TOKEN not in msg
    for path in out.rglob("*") if out.exists() else ():
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and NO_TERMS_TOKEN.encode() not in data, path


def test_timm_registry_names_the_hub_repo_and_file():
    assert hub_source("resnet50.a1_in1k") == ("timm/resnet50.a1_in1k", "model.safetensors")
    assert hub_source("densenet121.tv_in1k") == ("timm/densenet121.tv_in1k", "model.safetensors")
    assert pretrained_name("densenet121", preferred="densenet121.tv_in1k") == "densenet121.tv_in1k"
    assert pretrained_name("densenet121") == "densenet121.ra_in1k"  # timm's default tag, not torchvision's
    assert pretrained_name("resnet50.tv_in1k", preferred="resnet50.a1_in1k") == "resnet50.tv_in1k"


@pytest.mark.parametrize("name, expected", [
    ("resnet50", "with its pretrained tag"),
    ("resnet50.nope_in1k", "resnet50.a1_in1k"),  # lists the tags there are
    ("not_a_model.x", "timm model name"),
])
def test_bad_weight_names_are_one_line(name, expected):
    with pytest.raises(CMRCNetError, match=expected) as err:
        hub_source(name)
    assert "\n" not in str(err.value)


def test_fetch_writes_the_file_and_a_matching_checksum(hub, tmp_path):
    out = tmp_path / "weights" / NAME
    path = fetch_weights(NAME, out)
    assert path == out / LOCAL_FILE
    assert path.read_bytes() == (hub.repo_dir / LOCAL_FILE).read_bytes()
    assert files_under(out) == {LOCAL_FILE, SOURCE_FILE}  # not config.json: only the weights
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["sha256"] == sha256(path) == sha256(hub.repo_dir / LOCAL_FILE) == source["hub_sha256"]
    assert (source["repo_id"], source["filename"], source["revision"]) == (REPO, LOCAL_FILE, hub.commit())
    assert source["size"] == path.stat().st_size
    assert datetime.fromisoformat(source["fetched_at"]).tzinfo is not None
    assert hub.count("GET") == 1


def test_second_fetch_asks_the_hub_nothing_and_a_damaged_file_is_fetched_again(hub, tmp_path):
    out = tmp_path / "weights" / NAME
    fetch_weights(NAME, out)
    seen = len(hub.requests)
    fetch_weights(NAME, out)
    assert len(hub.requests) == seen  # not even a HEAD: the checksum in SOURCE.json decides

    path = out / LOCAL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a corrupted copy (same size) must not be kept
    path.write_bytes(bytes(data))
    fetch_weights(NAME, out)
    assert hub.count("GET") == 2
    assert sha256(path) == json.loads((out / SOURCE_FILE).read_text())["sha256"] == sha256(hub.repo_dir / LOCAL_FILE)


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path, monkeypatch):
    # huggingface_hub writes in chunks (10 MB) and resumes after the last one written; small chunks for a small file
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    size = (hub.repo_dir / LOCAL_FILE).stat().st_size
    hub.drop_after = size // 3
    path = fetch_weights(NAME, tmp_path / "weights" / NAME)
    assert len(hub.ranges) == 1  # the rest only, not the whole file again
    start = int(hub.ranges[0].removeprefix("bytes=").removesuffix("-"))
    assert size // 3 - (1 << 16) < start <= size // 3
    assert sha256(path) == sha256(hub.repo_dir / LOCAL_FILE)


def test_a_checksum_that_differs_from_the_hubs_leaves_nothing(hub, tmp_path):
    hub.lfs_sha256[LOCAL_FILE] = "0" * 64
    out = tmp_path / "weights" / NAME
    with pytest.raises(CMRCNetError, match="sha256") as err:
        fetch_weights(NAME, out)
    assert "\n" not in str(err.value)
    assert files_under(out) == set()


def test_gated_repo_without_a_token_is_one_clear_line(gated_hub, tmp_path):
    out = tmp_path / "weights" / NAME
    with pytest.raises(CMRCNetError) as err:
        fetch_weights(NAME, out)
    msg = str(err.value)
    assert msg.startswith(f"{REPO}: access denied (401), the model is gated")
    assert "HF_TOKEN" in msg and "hf auth login" in msg and f"https://huggingface.co/{REPO}" in msg
    assert_token_safe(msg, out)
    assert files_under(out) == set()


def test_gated_repo_terms_not_accepted_and_a_token_from_the_login(gated_hub, tmp_path):
    out = tmp_path / "weights" / NAME
    with pytest.raises(CMRCNetError, match=r"access denied \(403\), the model is gated") as err:
        fetch_weights(NAME, out, token=NO_TERMS_TOKEN)
    assert_token_safe(str(err.value), out)
    token_file = Path(constants.HF_TOKEN_PATH)  # as `hf auth login` leaves it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    path = fetch_weights(NAME, out)
    assert sha256(path) == sha256(gated_hub.repo_dir / LOCAL_FILE)
    assert_token_safe("", out)  # SOURCE.json and huggingface_hub's bookkeeping hold no token


def test_missing_repo_is_one_clear_line(hub, tmp_path):
    out = tmp_path / "weights" / "test_vit.r160_in1k"
    with pytest.raises(CMRCNetError) as err:
        fetch_weights("test_vit.r160_in1k", out)
    msg = str(err.value)
    assert msg == "timm/test_vit.r160_in1k: model repository not found on the hub (404), or not visible to your token"
    assert files_under(out) == set()


def test_hub_error_that_echoes_the_token_is_scrubbed(hub, tmp_path, monkeypatch):
    hub.fail_status = 500
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "weights" / NAME
    with pytest.raises(CMRCNetError) as err:
        fetch_weights(NAME, out)
    assert "500" in str(err.value) and "***" in str(err.value)
    assert_token_safe(str(err.value), out)


def test_fetched_weights_load_into_the_recipes_model(hub, tmp_path):
    config = {"weights": {"dir": str(tmp_path / "weights")}, "evaluation": {"tta": False},
              "methods": {"bleep": {"model": "bleep", "recipe": "original", "params": {"encoder": "test_resnet"}}}}
    eff = effective_method(config, "bleep")
    assert eff["weights"] == NAME
    assert eff["params"]["pretrained_path"] == f"{tmp_path}/weights/{NAME}/{LOCAL_FILE}"
    fetch_weights(eff["weights"], Path(eff["params"]["pretrained_path"]).parent)
    model = create_model("bleep", 7, **eff["params"], input_size=32)
    saved = load_file(eff["params"]["pretrained_path"])
    own = model.image_encoder.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in own)  # every encoder tensor from the file (classifier dropped)
    first = next(iter(own))
    fresh = create_model("bleep", 7, encoder="test_resnet", input_size=32)  # recipe paper: from scratch
    assert not torch.equal(fresh.image_encoder.state_dict()[first], saved[first])


SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile")]


def plan_blocks(text: str) -> list[dict]:
    """Jobs of a `snakemake -n` plan: rule name, input, output, wildcards."""
    jobs = []
    for line in text.splitlines():
        if m := re.match(r"^(local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(2), "input": "", "output": "", "wildcards": ""})
        elif jobs and (m := re.match(r"^\s+(input|output|wildcards): (.*)$", line)):
            jobs[-1][m.group(1)] = m.group(2)
    return jobs


def test_paper_plan_fetches_each_weight_file_once_for_the_jobs_that_load_it():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    plan = subprocess.run([*SNAKEMAKE, "-d", str(REPO_ROOT), "-n", "all", "--configfile", "config/paper.yaml"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = plan_blocks(plan.stdout + plan.stderr)
    fetches = sorted(j["output"] for j in jobs if j["rule"] == "fetch_weights")
    expected = {"bleep": "weights/resnet50.a1_in1k/model.safetensors",
                "stnet": "weights/densenet121.tv_in1k/model.safetensors"}
    ctranspath = "weights/ctranspath/model.safetensors"  # Table 4's frozen encoder, read by the embed jobs
    assert fetches == [f"{p}, {p.replace('model.safetensors', 'SOURCE.json')}"
                       for p in sorted([*expected.values(), ctranspath])]
    # planning says in one line where the missing cTransPath weights come from
    assert "fm_v1/ctranspath/ctranspath.pth from MahmoodLab/hest-bench" in plan.stderr
    runs = [j for j in jobs if j["rule"] in ("train", "predict")]
    assert len(runs) == 2 * 264
    for job in runs:
        method = re.search(r"method=([^,]+)", job["wildcards"]).group(1)
        weights = [f for f in job["input"].split(", ") if f.startswith("weights/")]
        assert weights == ([expected[method]] if method in expected else []), (job["rule"], method, weights)
    embeds = [j for j in jobs if j["rule"] == "embed"]
    assert embeds and all(ctranspath in j["input"].split(", ") for j in embeds)
    assert all(j["output"].split("/")[3] == "ctranspath" for j in embeds)  # processed/{ds}/embeddings/ctranspath/


def test_fetch_weights_runs_as_a_localrule_and_feeds_training(hub, tmp_path):
    config = {
        "datasets": {"tiny": {"source": "synthetic", "technology": "visium", "samples": ["V1", "V2"]}},
        "evaluation": {"k": [5]},  # a fold trains on one sample: fewer spots than the default k of 500
        "methods": {"bleep": {"model": "bleep", "recipe": "original", "params": {"encoder": "test_resnet"}},
                    "stnet": {"model": "stnet", "params": {"encoder": "test_resnet"}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    target = f"weights/{NAME}/{LOCAL_FILE}"

    def snakemake(*args):
        return subprocess.run([*SNAKEMAKE, "-d", str(tmp_path), "--configfile", str(path), "--cores", "1", *args],
                              capture_output=True, text=True, env=env, timeout=600)

    # under the SLURM executor (no SLURM here): a localrule runs in place, any other rule would be submitted and fail
    run = snakemake("--executor", "slurm", "--jobs", "1", target)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "localrule fetch_weights:" in run.stdout + run.stderr  # runs where snakemake runs, never on a node
    source = json.loads((tmp_path / "weights" / NAME / SOURCE_FILE).read_text())
    assert source["sha256"] == sha256(tmp_path / target) == sha256(hub.repo_dir / LOCAL_FILE)
    assert (tmp_path / "logs" / "fetch_weights" / f"{NAME}.log").is_file()

    plan = snakemake("-n", "all")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = plan_blocks(plan.stdout + plan.stderr)
    assert not [j for j in jobs if j["rule"] == "fetch_weights"]  # fetched once: nothing left to fetch
    trains = {re.search(r"method=([^,]+)", j["wildcards"]).group(1): j["input"] for j in jobs if j["rule"] == "train"}
    assert target in trains["bleep"].split(", ") and "weights/" not in trains["stnet"]


def test_cli_fetch_weights_and_its_one_line_error(hub, tmp_path, capsys):
    from cmrcnet.cli import main

    main(["fetch-weights", NAME, "--dir", str(tmp_path / "w")])
    assert sha256(tmp_path / "w" / NAME / LOCAL_FILE) == sha256(hub.repo_dir / LOCAL_FILE)
    assert f"{NAME}: {tmp_path / 'w' / NAME / LOCAL_FILE}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["fetch-weights", "resnet50", "--dir", str(tmp_path / "w")])
    assert exit_.value.code == 1
