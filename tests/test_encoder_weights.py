"""Registered encoders' weights fetched from a fake hub (or imported from a local file) into our one local form:
`model.safetensors` in build()'s keys + SOURCE.json, the original removed, one-line errors for hub failures."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from fakehub import ACCEPTED, NO_TERMS, FakeHub
from huggingface_hub import constants
from safetensors.torch import load_file
from test_hest import hub_env  # noqa: F401 - the isolated-hub fixture is shared

from cmrcnet.encoders import (
    EncoderSpec,
    HubFile,
    get_encoder,
    load_encoder,
    register_encoder,
    unregister_encoder,
    write_tiny_test_weights,
)
from cmrcnet.encoders.registry import drop_keys
from cmrcnet.errors import CMRCNetError
from cmrcnet.weights import LOCAL_FILE, SOURCE_FILE, fetch_weights, import_local_weights

REPO = "cmrcnet/tiny-test-encoder"
HUB_FILE = "pytorch_model.bin"
TOKEN = "hf_FAKEencoderTOKEN1234567890"
NO_TERMS_TOKEN = "hf_FAKEencoderNOterms0987654321"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in get_encoder("tiny-test").build().state_dict().items()}


def assert_token_safe(msg: str, out: Path) -> None:
    assert "\n" not in msg and TOKEN not in msg and NO_TERMS_TOKEN not in msg
    for path in out.rglob("*") if out.exists() else ():
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and NO_TERMS_TOKEN.encode() not in data, path


@pytest.fixture
def state():
    return tiny_state()


@pytest.fixture
def hub(tmp_path, hub_env, state):  # noqa: F811
    """The tiny-test encoder's gated model repo: pytorch_model.bin (a plain state dict) and a README."""
    repo = tmp_path / "repo"
    repo.mkdir()
    torch.save(state, repo / HUB_FILE)
    (repo / "README.md").write_text("tiny test encoder\n")
    with FakeHub(repo, REPO, {TOKEN: ACCEPTED, NO_TERMS_TOKEN: NO_TERMS}, repo_type="model") as server:
        hub_env(server.url)
        yield server


def test_fetch_converts_to_our_form_and_removes_the_original(hub, tmp_path, state, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "weights" / "tiny-test"
    path = fetch_weights("tiny-test", out)
    assert path == out / LOCAL_FILE
    assert files_under(out) == {LOCAL_FILE, SOURCE_FILE}  # the download (and its resume bookkeeping) is gone
    saved = load_file(path)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    source = json.loads((out / SOURCE_FILE).read_text())
    original = hub.repo_dir / HUB_FILE
    assert source["sha256"] == sha256(path)
    assert source["hub_sha256"] == source["original_sha256"] == sha256(original)
    assert (source["name"], source["repo_id"], source["repo_type"], source["filename"], source["revision"]) == (
        "tiny-test", REPO, "model", HUB_FILE, hub.commit())
    assert source["original_size"] == original.stat().st_size and source["size"] == path.stat().st_size
    assert_token_safe("", out)
    enc = load_encoder("tiny-test", path)
    assert torch.equal(enc.model.cls_token, state["cls_token"])

    seen = len(hub.requests)
    fetch_weights("tiny-test", out)
    assert len(hub.requests) == seen  # already there: the hub is not asked


def test_a_damaged_local_file_is_fetched_again(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "w"
    path = fetch_weights("tiny-test", out)
    good = sha256(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    fetch_weights("tiny-test", out)
    assert sha256(path) == good and hub.count("GET") == 2


def test_a_dropped_download_resumes(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 12)
    size = (hub.repo_dir / HUB_FILE).stat().st_size
    hub.drop_after = size // 2
    fetch_weights("tiny-test", tmp_path / "w")
    assert len(hub.ranges) == 1
    assert int(hub.ranges[0].removeprefix("bytes=").removesuffix("-")) > 0


def test_gated_without_a_token(hub, tmp_path):
    out = tmp_path / "w"
    with pytest.raises(CMRCNetError) as err:
        fetch_weights("tiny-test", out)
    msg = str(err.value)
    assert msg.startswith(f"{REPO}: access denied (401), the model is gated: accept its terms at "
                          f"https://huggingface.co/{REPO}")
    assert "HF_TOKEN" in msg and "hf auth login" in msg
    assert not (out / LOCAL_FILE).exists() and not (out / SOURCE_FILE).exists()


def test_terms_not_accepted_then_the_login_token(hub, tmp_path):
    out = tmp_path / "w"
    with pytest.raises(CMRCNetError, match=r"access denied \(403\), the model is gated") as err:
        fetch_weights("tiny-test", out, token=NO_TERMS_TOKEN)
    assert_token_safe(str(err.value), out)
    token_file = Path(constants.HF_TOKEN_PATH)  # as `hf auth login` leaves it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    assert fetch_weights("tiny-test", out).is_file()
    assert_token_safe("", out)


def test_a_bad_token_is_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_unknownTOKEN")
    with pytest.raises(CMRCNetError, match=f"^{REPO}: the hub rejected the token \\(401\\)") as err:
        fetch_weights("tiny-test", tmp_path / "w")
    assert "hf_unknownTOKEN" not in str(err.value)


def test_missing_hub_file_is_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (hub.repo_dir / HUB_FILE).rename(hub.repo_dir / "other.bin")
    with pytest.raises(CMRCNetError) as err:
        fetch_weights("tiny-test", tmp_path / "w")
    msg = str(err.value)
    assert msg.startswith(f"{REPO}: no file {HUB_FILE} at revision ") and "other.bin" in msg and "\n" not in msg


@pytest.fixture
def other_spec():
    """An entry whose hub repo the fake hub does not hold."""
    spec = EncoderSpec(name="tiny-elsewhere", build=get_encoder("tiny-test").build, embed_dim=16, input_size=32,
                       hub=HubFile("someone/absent", HUB_FILE, gated=True), source="test")
    register_encoder(spec)
    yield spec
    unregister_encoder(spec.name)


def test_unknown_repo_is_one_line(hub, tmp_path, other_spec):
    with pytest.raises(CMRCNetError) as err:
        fetch_weights("tiny-elsewhere", tmp_path / "w")
    assert str(err.value) == ("someone/absent: model repository not found on the hub (404), or not visible to your "
                              "token")


def test_no_network_is_one_line(hub_env, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_env(f"http://127.0.0.1:{port}")  # nothing listens there
    with pytest.raises(CMRCNetError, match="^cannot reach the Hugging Face hub") as err:
        fetch_weights("tiny-test", tmp_path / "w", token=TOKEN)
    assert "\n" not in str(err.value)


def test_a_checkpoint_that_does_not_fit_leaves_no_output(hub, tmp_path, state, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bad = dict(state)
    bad["pos_embed"] = torch.zeros(1, 5, 16)
    torch.save(bad, hub.repo_dir / HUB_FILE)
    out = tmp_path / "w"
    with pytest.raises(CMRCNetError) as err:
        fetch_weights("tiny-test", out)
    msg = str(err.value)
    assert msg.startswith(f"{REPO}/{HUB_FILE}: does not fit encoder 'tiny-test': shape mismatches: 1 (pos_embed")
    assert "\n" not in msg
    assert not (out / LOCAL_FILE).exists() and not (out / SOURCE_FILE).exists()


def test_a_checksum_that_differs_from_the_hubs_leaves_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.lfs_sha256[HUB_FILE] = "0" * 64
    out = tmp_path / "w"
    with pytest.raises(CMRCNetError, match="sha256 .* differs from the hub's"):
        fetch_weights("tiny-test", out)
    assert files_under(out) == set()


@pytest.fixture
def dataset_spec():
    """A ctranspath-like entry: a 'model'-wrapped checkpoint with a classifier head, in a gated dataset repo."""
    spec = EncoderSpec(name="tiny-in-dataset", build=get_encoder("tiny-test").build, embed_dim=16, input_size=32,
                       hub=HubFile("MahmoodLab/hest-bench", "fm_v1/tiny/tiny.pth", repo_type="dataset", gated=True),
                       convert=drop_keys("head."), source="test")
    register_encoder(spec)
    yield spec
    unregister_encoder(spec.name)


def test_a_dataset_repo_file_in_a_subfolder(tmp_path, hub_env, state, dataset_spec):  # noqa: F811
    repo = tmp_path / "dsrepo"
    (repo / "fm_v1" / "tiny").mkdir(parents=True)
    (repo / "IDC").mkdir()
    (repo / "IDC" / "var_50genes.json").write_text('{"genes": []}')
    torch.save({"model": {**state, "head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)}},
               repo / "fm_v1" / "tiny" / "tiny.pth")
    with FakeHub(repo, "MahmoodLab/hest-bench", {TOKEN: ACCEPTED}, repo_type="dataset") as server:
        hub_env(server.url)
        out = tmp_path / "w" / "tiny-in-dataset"
        with pytest.raises(CMRCNetError, match=r"access denied \(401\), the dataset is gated: accept its terms at "
                                               r"https://huggingface.co/datasets/MahmoodLab/hest-bench"):
            fetch_weights("tiny-in-dataset", out)
        path = fetch_weights("tiny-in-dataset", out, token=TOKEN)
        assert server.count("GET") == 1  # only the checkpoint, not the rest of the repo
    assert files_under(out) == {LOCAL_FILE, SOURCE_FILE}
    saved = load_file(path)
    assert saved.keys() == state.keys()
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["repo_type"] == "dataset" and source["filename"] == "fm_v1/tiny/tiny.pth"
    assert source["original_sha256"] == sha256(repo / "fm_v1" / "tiny" / "tiny.pth")
    assert source["url"].startswith("https://huggingface.co/datasets/MahmoodLab/hest-bench/blob/")


def test_import_a_local_file_with_shared_storage(tmp_path, state):
    """A user's checkpoint whose tensors share storage (views of one buffer): safetensors needs them apart."""
    both = torch.randn(32)
    state = dict(state, **{"norm.weight": both[:16], "norm.bias": both[16:]})
    src = tmp_path / "mine" / "uni_like.pth"
    src.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, src)
    out = tmp_path / "weights" / "tiny-test"
    path = import_local_weights("tiny-test", src, out)
    assert src.is_file() and files_under(out) == {LOCAL_FILE, SOURCE_FILE}
    saved = load_file(path)
    assert all(torch.equal(saved[k], state[k]) for k in state)
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["local_path"] == str(src.resolve()) and source["original_sha256"] == sha256(src)
    assert source["sha256"] == sha256(path)
    mtime = path.stat().st_mtime_ns
    import_local_weights("tiny-test", src, out)  # same file again: nothing to do
    assert path.stat().st_mtime_ns == mtime


def test_import_errors_are_one_line(tmp_path, state):
    with pytest.raises(CMRCNetError, match="weights file not found"):
        import_local_weights("tiny-test", tmp_path / "absent.pth", tmp_path / "w")
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, bad)
    with pytest.raises(CMRCNetError, match=f"^{bad}: does not fit encoder 'tiny-test': missing keys: 1 "):
        import_local_weights("tiny-test", bad, tmp_path / "w")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(CMRCNetError, match=f"^{junk}: cannot read weights") as err:
        import_local_weights("tiny-test", junk, tmp_path / "w")
    assert "\n" not in str(err.value)
    with pytest.raises(CMRCNetError, match="not a registered encoder"):
        import_local_weights("tiny-tset", junk, tmp_path / "w")
    assert files_under(tmp_path / "w") == set()


def test_half_precision_checkpoints_load_as_float32(tmp_path, state):
    src = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, src)
    path = import_local_weights("tiny-test", src, tmp_path / "w")
    assert load_file(path)["cls_token"].dtype == torch.float16  # stored as distributed: no doubled disk
    enc = load_encoder("tiny-test", path)
    assert enc.model.cls_token.dtype == torch.float32
    assert enc.embed_uint8(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).dtype == torch.float32


def test_the_demo_checkpoint_is_seeded_and_imports(tmp_path):
    a = write_tiny_test_weights(tmp_path / "a" / HUB_FILE, seed=1)
    b = write_tiny_test_weights(tmp_path / "b" / HUB_FILE, seed=1)
    assert a.read_bytes() != b"" and sha256(a) == sha256(b)
    path = import_local_weights("tiny-test", a, tmp_path / "w")
    assert load_file(path).keys() == tiny_state().keys()
