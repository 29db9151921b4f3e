"""HEST download and local linking, against a fake hub that huggingface_hub really talks HTTP to."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_counts_adata
from fakehub import ACCEPTED, NO_TERMS, FakeHub
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from cmrcnet.data import layout
from cmrcnet.data.hest import HEST_REPO, allow_patterns, fetch_hest_sample, link_local_sample, validate_sample
from cmrcnet.errors import CMRCNetError

TOKEN = "hf_FAKEsecretTOKEN1234567890"
NO_TERMS_TOKEN = "hf_FAKEnoTERMStoken0987654321"
TERMS_URL = "https://huggingface.co/datasets/MahmoodLab/hest"
CORE = ("st/{s}.h5ad", "wsis/{s}.tif", "metadata/{s}.json")


def write_hest_sample(root: Path, sample: str, *, meta: dict | None = None, tiff_um: float | None = 0.5,
                      extras: bool = False) -> None:
    """A small but valid HEST sample: AnnData with spots, tiled TIFF, metadata JSON (and HEST-style extras)."""
    st = layout.st_path(root, sample)
    st.parent.mkdir(parents=True, exist_ok=True)
    make_counts_adata(n_spots=12).write_h5ad(st)
    wsi = layout.wsi_path(root, sample)
    wsi.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((64, 64, 3), 200, np.uint8)
    if tiff_um is None:
        tifffile.imwrite(wsi, image, tile=(16, 16))
    else:
        res = 1e4 / tiff_um  # pixels per centimetre
        tifffile.imwrite(wsi, image, tile=(16, 16), resolution=(res, res), resolutionunit="CENTIMETER")
    md = layout.metadata_path(root, sample)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(json.dumps({"id": sample, "pixel_size_um_estimated": 0.5} if meta is None else meta))
    if extras:
        for name in (f"tissue_seg/{sample}_contours.geojson", f"tissue_seg/{sample}_vis.jpg", f"patches/{sample}.h5",
                     f"cellvit_seg/{sample}_cellvit_seg.geojson.zip"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(f"{name}\n".encode())


def tree(root: Path) -> set[str]:
    """Files under root, as repo paths, leaving out huggingface_hub's bookkeeping folder."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Isolate huggingface_hub: no real token, no Xet, no shared cache; returns a function pointing it at a URL."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))

    def point_at(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    return point_at


@pytest.fixture
def hub(tmp_path, hub_env):
    """A running fake HEST repo with TENX1 and TENX11 (the prefix trap), plus a README."""
    repo = tmp_path / "repo"
    for sample in ("TENX1", "TENX11"):
        write_hest_sample(repo, sample, extras=True)
    (repo / "README.md").write_text("fake HEST\n")
    with FakeHub(repo, HEST_REPO, {TOKEN: ACCEPTED, NO_TERMS_TOKEN: NO_TERMS}) as server:
        hub_env(server.url)
        yield server


def test_allow_patterns_do_not_confuse_prefixed_ids():
    repo_files = [f.format(s=s) for s in ("TENX1", "TENX11", "TENX10") for f in CORE] + [
        "tissue_seg/TENX1_contours.geojson", "tissue_seg/TENX11_contours.geojson",
        "patches/TENX1.h5", "patches/TENX11.h5", "patches_vis/TENX1.png", "README.md",
    ]
    patterns = allow_patterns("TENX1", extras=["tissue_seg", "patches/"])
    assert patterns[:3] == ["st/TENX1.h5ad", "wsis/TENX1.tif", "metadata/TENX1.json"]
    picked = set(filter_repo_objects(repo_files, allow_patterns=patterns))
    assert picked == {"st/TENX1.h5ad", "wsis/TENX1.tif", "metadata/TENX1.json",
                      "tissue_seg/TENX1_contours.geojson", "patches/TENX1.h5"}


@pytest.mark.parametrize("bad", ["", "TENX*", "../TENX1", "a/b", "TENX[1]"])
def test_allow_patterns_reject_ids_that_would_glob(bad):
    with pytest.raises(CMRCNetError):
        allow_patterns(bad)


def test_allow_patterns_reject_odd_extras():
    with pytest.raises(CMRCNetError, match="extra"):
        allow_patterns("TENX1", extras=["patches/*"])


def test_fetch_puts_the_sample_in_hest_layout(hub, tmp_path):
    out = tmp_path / "data"
    paths = fetch_hest_sample("TENX1", out, token=TOKEN)
    assert paths == layout.sample_paths(out, "TENX1")
    assert tree(out) == {"st/TENX1.h5ad", "wsis/TENX1.tif", "metadata/TENX1.json"}  # nothing of TENX11
    assert paths["wsi"].read_bytes() == (hub.repo_dir / "wsis/TENX1.tif").read_bytes()
    assert hub.count("GET") == 3


def test_fetch_extras_without_the_prefix_trap(hub, tmp_path):
    out = tmp_path / "data"
    fetch_hest_sample("TENX1", out, token=TOKEN, extras=["tissue_seg", "patches"])
    assert tree(out) == {"st/TENX1.h5ad", "wsis/TENX1.tif", "metadata/TENX1.json", "tissue_seg/TENX1_contours.geojson",
                         "tissue_seg/TENX1_vis.jpg", "patches/TENX1.h5"}


def test_second_fetch_downloads_nothing_and_a_rerun_completes_an_interrupted_one(hub, tmp_path):
    out = tmp_path / "data"
    fetch_hest_sample("TENX1", out, token=TOKEN)
    gets, heads = hub.count("GET"), hub.count("HEAD")
    fetch_hest_sample("TENX1", out, token=TOKEN)
    assert (hub.count("GET"), hub.count("HEAD")) == (gets, heads)

    layout.wsi_path(out, "TENX1").unlink()  # as if the run had stopped before this file
    fetch_hest_sample("TENX1", out, token=TOKEN)
    assert hub.count("GET") == gets + 1
    assert layout.wsi_path(out, "TENX1").is_file()


def test_token_from_env_then_cached_login(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fetch_hest_sample("TENX1", tmp_path / "a")
    monkeypatch.delenv("HF_TOKEN")
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    fetch_hest_sample("TENX1", tmp_path / "b")
    assert tree(tmp_path / "b") == tree(tmp_path / "a")


def test_missing_token_is_one_clear_line(hub, tmp_path):
    with pytest.raises(CMRCNetError) as err:
        fetch_hest_sample("TENX1", tmp_path / "data")
    msg = str(err.value)
    assert "\n" not in msg and "gated" in msg and "HF_TOKEN" in msg and "hf auth login" in msg and TERMS_URL in msg
    assert hub.requests == []  # nothing was asked of the hub


def assert_safe(msg: str, out: Path) -> None:
    """One line, no token in the message, no token in any file our run left on disk."""
    assert "\n" not in msg
    assert TOKEN not in msg and NO_TERMS_TOKEN not in msg
    for path in out.rglob("*") if out.exists() else ():
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and NO_TERMS_TOKEN.encode() not in data, path


def test_terms_not_accepted_says_where_to_accept(hub, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(CMRCNetError) as err:
        fetch_hest_sample("TENX1", out, token=NO_TERMS_TOKEN)
    assert "gated" in str(err.value) and TERMS_URL in str(err.value)
    assert_safe(str(err.value), out)
    assert tree(out) == set()


def test_invalid_token_is_rejected(hub, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(CMRCNetError) as err:
        fetch_hest_sample("TENX1", out, token="hf_notAtokenTheHubKnows")
    assert "401" in str(err.value) and TERMS_URL in str(err.value)
    assert "hf_notAtokenTheHubKnows" not in str(err.value)


def test_hub_error_that_echoes_the_token_is_scrubbed(hub, tmp_path):
    hub.fail_status = 500
    out = tmp_path / "data"
    with pytest.raises(CMRCNetError) as err:
        fetch_hest_sample("TENX1", out, token=TOKEN)
    assert "500" in str(err.value) and "***" in str(err.value)
    assert_safe(str(err.value), out)


def test_no_token_in_files_after_a_download(hub, tmp_path):
    out = tmp_path / "data"
    fetch_hest_sample("TENX1", out, token=TOKEN, extras=["patches"])
    assert (out / ".cache").is_dir()  # huggingface_hub's resume bookkeeping is there, and checked too
    assert_safe("", out)


def test_unknown_sample(hub, tmp_path):
    with pytest.raises(CMRCNetError, match=r"^sample TENX999 not found in MahmoodLab/hest"):
        fetch_hest_sample("TENX999", tmp_path / "data", token=TOKEN)


def test_unknown_repo(hub, tmp_path):
    with pytest.raises(CMRCNetError, match="not found"):
        fetch_hest_sample("TENX1", tmp_path / "data", token=TOKEN, repo_id="Nobody/nothing")


def test_unknown_revision(hub, tmp_path):
    with pytest.raises(CMRCNetError, match="revision 'v9' not found"):
        fetch_hest_sample("TENX1", tmp_path / "data", token=TOKEN, revision="v9")
    fetch_hest_sample("TENX1", tmp_path / "data", token=TOKEN, revision=hub.commit())  # a commit hash works


def test_unreachable_hub(hub_env, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hub_env(f"http://127.0.0.1:{port}")
    out = tmp_path / "data"
    with pytest.raises(CMRCNetError, match="^cannot reach the Hugging Face hub") as err:
        fetch_hest_sample("TENX1", out, token=TOKEN)
    assert_safe(str(err.value), out)


def test_download_that_fails_validation(hub, tmp_path):
    (hub.repo_dir / "st/TENX1.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(CMRCNetError, match=r"TENX1\.h5ad: cannot read as AnnData"):
        fetch_hest_sample("TENX1", tmp_path / "data", token=TOKEN)


def test_validate_sample_accepts_a_good_one(tmp_path):
    write_hest_sample(tmp_path, "S1", meta={"id": "S1", "pixel_size_um_estimated": 0.25})
    assert validate_sample(tmp_path, "S1")["pixel_size_um_estimated"] == 0.25
    write_hest_sample(tmp_path, "S2", meta={"id": "S2"})  # pixel size from the TIFF tags instead
    assert validate_sample(tmp_path, "S2") == {"id": "S2"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: layout.wsi_path(root, "S1").unlink(), r"wsis/S1\.tif: whole-slide image \(\.tif\) not found"),
        (lambda root: layout.metadata_path(root, "S1").unlink(), r"metadata/S1\.json: metadata file .* not found"),
        (lambda root: layout.st_path(root, "S1").unlink(), r"st/S1\.h5ad: expression file .* not found"),
        (lambda root: layout.metadata_path(root, "S1").write_text("{oops"), r"S1\.json: not valid JSON"),
        (lambda root: layout.st_path(root, "S1").write_bytes(b"\x89HDF garbage"), r"S1\.h5ad: cannot read as AnnData"),
    ],
)
def test_validate_sample_errors(tmp_path, damage, message):
    write_hest_sample(tmp_path, "S1")
    damage(tmp_path)
    with pytest.raises(CMRCNetError, match=message) as err:
        validate_sample(tmp_path, "S1")
    assert "\n" not in str(err.value)


def test_validate_sample_without_pixel_size(tmp_path):
    write_hest_sample(tmp_path, "S1", meta={"id": "S1"}, tiff_um=None)
    with pytest.raises(CMRCNetError, match=r"S1\.tif: no pixel size"):
        validate_sample(tmp_path, "S1")


def test_validate_sample_without_spatial_coordinates(tmp_path):
    write_hest_sample(tmp_path, "S1")
    make_counts_adata(n_spots=5, with_spatial=False).write_h5ad(layout.st_path(tmp_path, "S1"))
    with pytest.raises(CMRCNetError, match="no spatial coordinates"):
        validate_sample(tmp_path, "S1")


def test_link_local_sample_makes_absolute_symlinks(tmp_path, monkeypatch):
    src, out = tmp_path / "hest", tmp_path / "data"
    write_hest_sample(src, "S1")
    monkeypatch.chdir(tmp_path)
    links = link_local_sample("S1", Path("hest"), Path("data"))  # relative roots in, absolute targets out
    for kind, link in links.items():
        source = layout.sample_paths(src, "S1")[kind]
        assert os.path.islink(link)
        assert os.path.isabs(os.readlink(link))
        assert Path(link).resolve() == source.resolve()
        assert os.path.samefile(link, source)
    assert tree(out) == {"st/S1.h5ad", "wsis/S1.tif", "metadata/S1.json"}
    assert not list(out.rglob(".*"))  # no temporary link left behind
    validate_sample(out, "S1")


def test_link_local_sample_replaces_links_on_rerun(tmp_path):
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "data"
    write_hest_sample(old, "S1")
    write_hest_sample(new, "S1")
    link_local_sample("S1", old, out)
    link_local_sample("S1", old, out)  # idempotent
    link_local_sample("S1", new, out)
    for kind, link in layout.sample_paths(out, "S1").items():
        assert Path(link).resolve() == layout.sample_paths(new, "S1")[kind].resolve()


def test_link_local_sample_validates_the_source_first(tmp_path):
    write_hest_sample(tmp_path / "hest", "S1")
    layout.wsi_path(tmp_path / "hest", "S1").unlink()
    with pytest.raises(CMRCNetError, match="not found"):
        link_local_sample("S1", tmp_path / "hest", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_link_local_sample_never_replaces_real_files(tmp_path):
    write_hest_sample(tmp_path / "hest", "S1")
    write_hest_sample(tmp_path / "data", "S1")
    with pytest.raises(CMRCNetError, match="not a link"):
        link_local_sample("S1", tmp_path / "hest", tmp_path / "data")
    # Linking a tree onto itself leaves the real files alone.
    link_local_sample("S1", tmp_path / "hest", tmp_path / "hest")
    assert not os.path.islink(layout.st_path(tmp_path / "hest", "S1"))
    validate_sample(tmp_path / "hest", "S1")
