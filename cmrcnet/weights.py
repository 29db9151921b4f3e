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

Registered pathology encoders (`cmrcnet.encoders`: uni, virchow2, ctranspath, ...) go through the same
`fetch_weights(name, out_dir)`: their hub file (a model or dataset repo, often gated) is downloaded into
`out_dir/.download/` (resumable there), read (torch.load with weights_only for .bin/.pth, safetensors otherwise),
converted to the encoder's build() keys, checked key by key and shape by shape against the architecture built on
the meta device (no memory), and written as the same single local form, `out_dir/model.safetensors`, with
SOURCE.json (hub repo, type, revision, file name, the original's sha256 as the hub lists it and as downloaded, the
local file's sha256). The original download is removed once converted. `import_local_weights(name, file, out_dir)`
does the same for a file the user already has (SOURCE.json then records its path and sha256).
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
    return _already_converted(out_dir, {"repo_id": repo_id, "filename": filename, "revision": revision})


def _resolve_token(token: str | None) -> str | None:
    """Explicit token, else HF_TOKEN, else the cached `hf auth login`, else none (timm's weights are public)."""
    from huggingface_hub import get_token

    return (token or os.environ.get("HF_TOKEN") or get_token() or "").strip() or None


def _model_url(repo_id: str, repo_type: str = "model") -> str:
    return f"{HUB_URL}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def _hub_error(exc: Exception, repo_id: str, filename: str, revision: str | None, token: str | None,
               repo_type: str = "model") -> CMRCNetError | None:
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
    kind = "dataset" if repo_type == "dataset" else "model"
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError) and status == 403):
        return CMRCNetError(f"{repo_id}: access denied ({status}), the {kind} is gated: accept its terms at "
                            f"{_model_url(repo_id, repo_type)} with the account of your token ({login}), then retry")
    if isinstance(exc, RepositoryNotFoundError):
        return CMRCNetError(f"{repo_id}: {kind} repository not found on the hub ({status}), or not visible to your token")
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
    """Download timm weight `name` (or registered encoder `name`, see `fetch_encoder_weights`) into
    `out_dir/model.safetensors` and record `out_dir/SOURCE.json`; returns the file's path. Does nothing (no request)
    when the file is already there with a matching sha256."""
    from huggingface_hub import HfApi, __version__, hf_hub_download

    from cmrcnet.io import write_json

    if is_encoder_name(name):
        return fetch_encoder_weights(name, out_dir, revision=revision, token=token)

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


# ---- registered pathology encoders (cmrcnet.encoders) ----------------------------------------------------------------

DOWNLOAD_DIR = ".download"  # where an encoder's original hub file is downloaded (and resumed), removed once converted
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def is_encoder_name(name: str) -> bool:
    """True when `name` is a registered encoder (`cmrcnet.encoders`), not a timm weight name."""
    from cmrcnet.encoders import is_encoder

    return is_encoder(name)


def _read_original(path: Path, shown: str) -> object:
    """A checkpoint's content, memory-mapped when torch can; a file that cannot be read is a one-line error naming
    `shown` (the hub file or the user's file)."""
    import torch

    from cmrcnet.encoders import read_checkpoint

    if path.suffix in _TORCH_SUFFIXES:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old (non-zip) torch file cannot be mapped: read it the ordinary way
            pass
    try:
        return read_checkpoint(path)
    except CMRCNetError as err:
        raise CMRCNetError(str(err).replace(str(path), shown, 1)) from None


def _convert_checked(spec, raw: object, shown: str) -> dict:
    """The checkpoint in build()'s layout, checked against the meta-device architecture (one-line errors)."""
    from cmrcnet.encoders import check_state_dict

    try:
        state = spec.prepare_state_dict(raw, shown)
    except (KeyError, ValueError, RuntimeError) as err:
        raise input_error(shown, f"cannot convert for encoder {spec.name!r}: {' '.join(str(err).split())}") from None
    check_state_dict(spec, state, shown)
    return state


def _saveable(state: dict) -> dict:
    """Contiguous tensors owning their storage (safetensors refuses tensors that share memory, as tied or
    sliced checkpoint tensors do): a tensor is cloned only when its storage was seen already or it is a view."""
    import torch

    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.numel() * tensor.element_size() == storage.nbytes()
        if ptr in seen or not whole:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _write_local_form(state: dict, target: Path, metadata: dict[str, str]) -> str:
    """Write `state` atomically as `target` (safetensors); returns its sha256."""
    from safetensors.torch import save_file

    from cmrcnet.io import atomic_path

    with atomic_path(target) as tmp:  # one metadata entry: safetensors writes a map's entries in no fixed order
        save_file(_saveable(state), str(tmp), metadata={"cmrcnet": json.dumps(metadata, sort_keys=True)})
    return sha256_file(target)


def _versions() -> dict[str, str]:
    import timm
    import torch
    from huggingface_hub import __version__

    return {"timm": timm.__version__, "torch": torch.__version__, "huggingface_hub": __version__}


def _already_converted(out_dir: Path, expected: dict) -> bool:
    """True when out_dir holds our form with a SOURCE.json whose `expected` fields match and whose sha256 is the
    file's. A damaged file is removed (fetched again)."""
    target, source = out_dir / LOCAL_FILE, read_source(out_dir)
    if not target.is_file() or source is None:
        return False
    for key, value in expected.items():
        if key == "revision":
            if value is not None and value not in (source.get("revision"), source.get("requested_revision")):
                return False
        elif source.get(key) != value:
            return False
    if sha256_file(target) != source.get("sha256"):
        log.warning("%s: does not match the sha256 in %s; fetching it again", target, SOURCE_FILE)
        target.unlink()
        return False
    return True


def _remove_download(download_dir: Path) -> None:
    import shutil

    shutil.rmtree(download_dir, ignore_errors=True)


def fetch_encoder_weights(name: str, out_dir: str | Path, *, revision: str | None = None,
                          token: str | None = None) -> Path:
    """Registered encoder `name`'s hub weights as `out_dir/model.safetensors` (build()'s keys) + SOURCE.json.

    The hub file (spec.hub: a model or dataset repo) is downloaded into `out_dir/.download/` with huggingface_hub
    (token: `token`, HF_TOKEN or the `hf auth login` cache, never printed or written; an interrupted download
    resumes there), checked against the hub's sha256, read, converted, checked against the architecture and
    written atomically; the original is then removed. Nothing is asked of the hub when the converted file is
    already there with matching SOURCE.json."""
    from huggingface_hub import HfApi, hf_hub_download

    from cmrcnet.encoders import get_encoder
    from cmrcnet.io import write_json

    spec = get_encoder(name)
    hub = spec.hub
    if hub is None:
        raise input_error(f"encoder {name!r}", "has no hub file; give a local file with import_local_weights")
    repo_id, filename, repo_type = hub.repo_id, hub.filename, hub.repo_type
    revision = revision or hub.revision
    out_dir = Path(out_dir)
    target = out_dir / LOCAL_FILE
    if _already_converted(out_dir, {"name": name, "repo_id": repo_id, "filename": filename, "revision": revision}):
        log.info("%s: already fetched (%s), sha256 matches", target, SOURCE_FILE)
        return target
    token = _resolve_token(token)
    download_dir = out_dir / DOWNLOAD_DIR
    shown = f"{repo_id}/{filename}"
    log.info("fetching encoder %s weights: %s (%s repo, %s) into %s", name, shown, repo_type, revision or "main",
             out_dir)
    try:
        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, token=token or False,
                                 files_metadata=True)
        sibling = next((s for s in info.siblings or [] if s.rfilename == filename), None)
        if sibling is None:
            listed = [s.rfilename for s in info.siblings or []]
            more = f" (the hub lists {', '.join(listed[:8])}{', ...' if len(listed) > 8 else ''})" if listed else ""
            raise CMRCNetError(f"{repo_id}: no file {filename} at revision {info.sha}{more}")
        path = Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=info.sha, local_dir=download_dir,
                                    token=token or False))
    except CMRCNetError:
        raise
    except Exception as exc:
        error = _hub_error(exc, repo_id, filename, revision, token, repo_type=repo_type)
        if error is None:
            raise
        raise error from None
    original_sha = sha256_file(path)
    lfs = getattr(sibling, "lfs", None)
    hub_sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
    if hub_sha and hub_sha != original_sha:
        _remove_download(download_dir)
        raise CMRCNetError(f"{shown}: sha256 {original_sha} of the download differs from the hub's {hub_sha}; "
                           "the file was removed, fetch again")
    original_size = path.stat().st_size
    state = _convert_checked(spec, _read_original(path, shown), shown)
    sha = _write_local_form(state, target, {"encoder": name, "source": shown, "revision": str(info.sha)})
    del state
    write_json(out_dir / SOURCE_FILE, {
        "name": name, "kind": "encoder", "repo_id": repo_id, "repo_type": repo_type, "revision": info.sha,
        "requested_revision": revision, "filename": filename, "original_size": original_size,
        "original_sha256": original_sha, "hub_sha256": hub_sha, "file": LOCAL_FILE, "size": target.stat().st_size,
        "sha256": sha, "url": f"{_model_url(repo_id, repo_type)}/blob/{info.sha}/{filename}",
        "source": spec.source, "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"), "versions": _versions(),
    })
    _remove_download(download_dir)
    log.info("%s: %s converted (%d bytes, sha256 %s; original sha256 %s)", target, shown, target.stat().st_size, sha,
             original_sha)
    return target


def import_local_weights(name: str, src_file: str | Path, out_dir: str | Path) -> Path:
    """A local checkpoint of registered encoder `name` (as its authors distribute it, or already converted) as
    `out_dir/model.safetensors` + SOURCE.json (the file's path and sha256); the source file is left in place.
    Nothing is done when out_dir already holds the conversion of a file with the same sha256."""
    from cmrcnet.encoders import get_encoder
    from cmrcnet.io import write_json

    spec = get_encoder(name)
    src = Path(src_file)
    if not src.is_file():
        raise input_error(src, "weights file not found")
    out_dir = Path(out_dir)
    target = out_dir / LOCAL_FILE
    src_sha = sha256_file(src)
    if _already_converted(out_dir, {"name": name, "original_sha256": src_sha}):
        log.info("%s: already imported from a file with sha256 %s", target, src_sha)
        return target
    if src.resolve() == target.resolve():
        raise input_error(src, f"is the output itself; import from another path than {target}")
    state = _convert_checked(spec, _read_original(src, str(src)), str(src))
    sha = _write_local_form(state, target, {"encoder": name, "source": str(src.resolve())})
    del state
    write_json(out_dir / SOURCE_FILE, {
        "name": name, "kind": "encoder", "local_path": str(src.resolve()), "filename": src.name,
        "original_size": src.stat().st_size, "original_sha256": src_sha, "file": LOCAL_FILE,
        "size": target.stat().st_size, "sha256": sha, "source": spec.source,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"), "versions": _versions(),
    })
    log.info("%s: converted from %s (sha256 %s)", target, src, src_sha)
    return target
