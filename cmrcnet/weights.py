"""Pretrained image-encoder weights: fetched once from the Hugging Face hub into `weights/{name}/`, then local.

Why a separate step: cluster compute nodes are often offline and a training job must not depend on which
weights a hub serves that day. Rule `fetch_weights` (a Snakemake localrule, so it runs on the login node) calls
`fetch_weights` once per timm weight name (`resnet50.a1_in1k`, `densenet121.tv_in1k`, ...); training jobs take
the file as an input and load it through the models' `pretrained_path` (`encoders.load_weights`).

timm's own registry (its `pretrained_cfg`, available offline) says which hub repo and file hold a name's
weights; the download itself goes through `huggingface_hub.hf_hub_download` (never timm's downloader), with the
token from HF_TOKEN or `hf auth login` when there is one (timm's ImageNet weights are public), never printed or
written. A dropped connection is resumed by huggingface_hub within the call; a finished, checksummed file is
never downloaded again; an interrupted run leaves no partial file in place (the file is moved in when complete).

`weights/{name}/SOURCE.json` records the repo, the commit it was fetched at, the hub's filename, size, sha256
(checked against the hub's LFS sha256 when the hub lists one) and the date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from cmrcnet.errors import CMRCNetError, input_error

log = logging.getLogger(__name__)

LOCAL_FILE = "model.safetensors"  # the local name of every fetched weight file (safetensors: no pickle)
SOURCE_FILE = "SOURCE.json"
HUB_URL = "https://huggingface.co"


def hub_source(name: str) -> tuple[str, str]:
    """(repo id, filename) of timm weight `name` (architecture.tag) on the Hugging Face hub, from timm's registry."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(str(name))
    if not tag or not timm.is_model(arch):
        raise input_error(f"weights {name!r}", "expected a timm model name with its pretrained tag, e.g. resnet50.a1_in1k")
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm: invalid pretrained tag
        cfg = None
    if cfg is None:
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise input_error(f"weights {name!r}", f"timm has no such pretrained weights; {arch} has: {tags}")
    if not cfg.hf_hub_id:
        raise input_error(f"weights {name!r}", "timm lists no Hugging Face hub repo for these weights; download them "
                                               "yourself and set params.pretrained_path")
    filename = cfg.hf_hub_filename or LOCAL_FILE
    if not filename.endswith(".safetensors"):
        raise input_error(f"weights {name!r}", f"the hub file {filename} is not a safetensors file; only safetensors "
                                               "weights are fetched (no pickles)")
    return cfg.hf_hub_id, filename


def pretrained_name(encoder: str, preferred: str | None = None) -> str:
    """The timm weight name (architecture.tag) for `encoder`: the encoder itself when it carries a tag
    (`densenet121.tv_in1k`), `preferred` when that is weights for the same architecture, else timm's default tag."""
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    arch, tag = split_model_name_tag(str(encoder))
    if tag:
        name = str(encoder)
    elif preferred and split_model_name_tag(preferred)[0] == arch:
        name = preferred
    else:
        tags = [tag for tag, cfg in get_arch_pretrained_cfgs(arch).items() if cfg.hf_hub_id]  # default tag first
        if not tags:
            raise input_error(f"encoder {encoder!r}", "timm lists no pretrained weights for it on the Hugging Face hub; "
                                                      "set params.pretrained_path to a local file or use recipe: paper")
        name = tags[0]
    hub_source(name)  # checks the name and that the hub has the file
    return name


def weights_file(weights_dir: str | Path, name: str) -> str:
    """Where weight `name` lives once fetched (the training jobs' input and the models' pretrained_path)."""
    return f"{str(weights_dir).rstrip('/')}/{name}/{LOCAL_FILE}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_source(out_dir: str | Path) -> dict | None:
    """SOURCE.json of a fetched weight folder, or None when missing or unreadable."""
    try:
        return json.loads((Path(out_dir) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _already_fetched(out_dir: Path, repo_id: str, filename: str, revision: str | None) -> bool:
    """True when the file is there and matches SOURCE.json (same repo, file, revision if pinned, sha256)."""
    target, source = out_dir / LOCAL_FILE, read_source(out_dir)
    if not target.is_file() or source is None:
        return False
    if (source.get("repo_id"), source.get("filename")) != (repo_id, filename):
        return False
    if revision is not None and revision not in (source.get("revision"), source.get("requested_revision")):
        return False
    if sha256_file(target) != source.get("sha256"):
        log.warning("%s: does not match the sha256 in %s; fetching it again", target, SOURCE_FILE)
        target.unlink()
        return False
    return True


def _resolve_token(token: str | None) -> str | None:
    """Explicit token, else HF_TOKEN, else the cached `hf auth login`, else none (timm's weights are public)."""
    from huggingface_hub import get_token

    return (token or os.environ.get("HF_TOKEN") or get_token() or "").strip() or None


def _model_url(repo_id: str) -> str:
    return f"{HUB_URL}/{repo_id}"


def _hub_error(exc: Exception, repo_id: str, filename: str, revision: str | None, token: str | None) -> CMRCNetError | None:
    """A huggingface_hub failure as our one-line error (token scrubbed); None when it is not a hub failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from cmrcnet.data.hest import _one_line, _transport_errors

    detail = _one_line(exc, token)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    login = "set HF_TOKEN or run `hf auth login`"
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError) and status == 403):
        return CMRCNetError(f"{repo_id}: access denied ({status}), the model is gated: accept its terms at "
                            f"{_model_url(repo_id)} with the account of your token ({login}), then retry")
    if isinstance(exc, RepositoryNotFoundError):
        return CMRCNetError(f"{repo_id}: model repository not found on the hub ({status}), or not visible to your token")
    if isinstance(exc, RevisionNotFoundError):
        return CMRCNetError(f"{repo_id}: revision {revision!r} not found")
    if isinstance(exc, EntryNotFoundError):
        return CMRCNetError(f"{repo_id}: no file {filename} at revision {revision or 'main'}")
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return CMRCNetError(f"{repo_id}: the hub rejected the token (401): check it ({login}) or unset HF_TOKEN")
    if isinstance(exc, HfHubHTTPError):
        return CMRCNetError(f"{repo_id}: Hugging Face hub error ({status}): {detail}")
    if isinstance(exc, _transport_errors()):
        return CMRCNetError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {type(exc).__name__}: {detail}); check the "
            "network (or HF_ENDPOINT / HF_HUB_OFFLINE) and retry; fetch weights on a machine with internet access "
            "(rule fetch_weights runs on the login node)"
        )
    return None


def fetch_weights(name: str, out_dir: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """Download timm weight `name` into `out_dir/model.safetensors` and record `out_dir/SOURCE.json`;
    returns the file's path. Does nothing (no request) when the file is already there with a matching sha256."""
    from huggingface_hub import HfApi, __version__, hf_hub_download

    from cmrcnet.io import write_json

    repo_id, filename = hub_source(name)
    out_dir = Path(out_dir)
    target = out_dir / LOCAL_FILE
    if _already_fetched(out_dir, repo_id, filename, revision):
        log.info("%s: already fetched (%s), sha256 matches", target, SOURCE_FILE)
        return target
    token = _resolve_token(token)
    log.info("fetching %s weights from %s (%s) into %s", name, repo_id, revision or "main", out_dir)
    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token or False, files_metadata=True)
        sibling = next((s for s in info.siblings or [] if s.rfilename == filename), None)
        if sibling is None:
            raise CMRCNetError(f"{repo_id}: no file {filename} at revision {info.sha} (the hub lists "
                               f"{', '.join(s.rfilename for s in info.siblings or []) or 'no files'})")
        path = Path(hf_hub_download(repo_id, filename, revision=info.sha, local_dir=out_dir, token=token or False))
    except CMRCNetError:
        raise
    except Exception as exc:
        error = _hub_error(exc, repo_id, filename, revision, token)
        if error is None:
            raise
        raise error from None
    if path.resolve() != target.resolve():
        os.replace(path, target)
    sha = sha256_file(target)
    lfs = getattr(sibling, "lfs", None)
    hub_sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
    if hub_sha and hub_sha != sha:
        target.unlink()
        raise CMRCNetError(f"{repo_id}/{filename}: sha256 {sha} of the download differs from the hub's {hub_sha}; "
                           "the file was removed, fetch again")
    import timm

    write_json(out_dir / SOURCE_FILE, {
        "name": name, "repo_id": repo_id, "revision": info.sha, "requested_revision": revision,
        "filename": filename, "file": LOCAL_FILE, "size": target.stat().st_size, "sha256": sha,
        "hub_sha256": hub_sha, "url": f"{_model_url(repo_id)}/blob/{info.sha}/{filename}",
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"timm": timm.__version__, "huggingface_hub": __version__},
    })
    log.info("%s: %d bytes, sha256 %s (%s at %s)", target, target.stat().st_size, sha, repo_id, info.sha)
    return target
