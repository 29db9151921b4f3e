"""Get HEST-1k samples onto disk: download from the gated Hugging Face dataset, or link a local copy.

Both routes end in the same HEST layout (`st/`, `wsis/`, `metadata/`, see `cmrcnet.data.layout`) and both
check the sample before anything downstream reads it, so a bad download or a broken local copy fails here
with one line naming the file, not deep inside a later stage.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from cmrcnet.data import layout
from cmrcnet.errors import CMRCNetError, input_error

HEST_REPO = "MahmoodLab/hest"
HUB_URL = "https://huggingface.co"

log = logging.getLogger(__name__)

# HEST ids look like TENX95, NCBI783, MEND139: no glob characters, no path separators.
_SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _check_sample_id(sample_id: str) -> None:
    if not isinstance(sample_id, str) or not _SAMPLE_ID.fullmatch(sample_id):
        raise CMRCNetError(f"sample id {sample_id!r}: expected letters, digits, '.', '_' or '-' (e.g. TENX95)")


def allow_patterns(sample_id: str, extras: Sequence[str] = ()) -> list[str]:
    """Hub patterns for one sample: exact paths for the core files, `{extra}/{id}[_.]*` for extra folders.

    Why `[_.]`: HEST names extra files `{id}.h5`, `{id}_contours.geojson`, ...; a bare `{id}*` would make
    TENX1 also pull TENX11..TENX19.
    """
    _check_sample_id(sample_id)
    if isinstance(extras, str):
        extras = [extras]
    core = layout.sample_paths("", sample_id)
    patterns = [core[kind].as_posix() for kind in ("st", "wsi", "metadata")]
    for extra in extras:
        name = str(extra).strip().strip("/")
        if not _EXTRA.fullmatch(name):
            raise CMRCNetError(f"HEST extra {extra!r}: expected a folder name such as tissue_seg or patches")
        pattern = f"{name}/{sample_id}[_.]*"
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def _dataset_url(repo_id: str) -> str:
    return f"{HUB_URL}/datasets/{repo_id}"


def _resolve_token(token: str | None, repo_id: str) -> str:
    """Explicit token, else HF_TOKEN, else the cached `hf auth login`; the dataset is gated so one is required."""
    from huggingface_hub import get_token

    token = (token or os.environ.get("HF_TOKEN") or get_token() or "").strip()
    if not token:
        raise CMRCNetError(
            f"{repo_id}: no Hugging Face token found; the dataset is gated: set HF_TOKEN or run `hf auth login`, "
            f"and accept the terms at {_dataset_url(repo_id)}"
        )
    return token


def _one_line(text: object, secret: str | None) -> str:
    """Collapse a library message to one short line, with the token scrubbed out of it."""
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= 300 else text[:297] + "..."


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client the installed huggingface_hub uses."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)  # only clients already imported by huggingface_hub matter
        types += [getattr(mod, name) for name in names if mod is not None and hasattr(mod, name)]
    return tuple(types)


def _hub_error(exc: Exception, repo_id: str, revision: str | None, token: str) -> CMRCNetError | None:
    """Translate a huggingface_hub failure into our one-line error; None when it is not a hub failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    detail = _one_line(exc, token)
    terms = f"accept the terms at {_dataset_url(repo_id)} with the account of your token, then retry"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError) and status == 403):
        return CMRCNetError(f"{repo_id}: access denied ({status}), the dataset is gated: {terms}")
    if isinstance(exc, RepositoryNotFoundError):
        return CMRCNetError(f"{repo_id}: dataset repository not found on the hub, or not visible to your token")
    if isinstance(exc, RevisionNotFoundError):
        return CMRCNetError(f"{repo_id}: revision {revision!r} not found")
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return CMRCNetError(
            f"{repo_id}: the hub rejected the token (401): check HF_TOKEN or run `hf auth login`, and {terms}"
        )
    if isinstance(exc, HfHubHTTPError):
        return CMRCNetError(f"{repo_id}: Hugging Face hub error ({status}): {detail}")
    if isinstance(exc, _transport_errors()):
        return CMRCNetError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {type(exc).__name__}: {detail}); "
            "check the network (or HF_ENDPOINT / HF_HUB_OFFLINE) and retry, finished files are kept"
        )
    return None


def fetch_hest_sample(
    sample_id: str,
    out_root: str | Path,
    *,
    repo_id: str = HEST_REPO,
    extras: Sequence[str] = (),
    token: str | None = None,
    revision: str | None = None,
) -> dict[str, Path]:
    """Download one HEST sample into `out_root` (HEST layout) and validate it; returns its layout paths.

    A re-run skips files that are already complete: huggingface_hub records each file's commit and ETag
    under `out_root/.cache/huggingface/`. The revision is resolved to a commit first, which also turns a
    missing token, closed terms or a dead network into a clear error before any file is touched.
    """
    from huggingface_hub import HfApi, snapshot_download

    patterns = allow_patterns(sample_id, extras)
    token = _resolve_token(token, repo_id)
    out_root = Path(out_root)
    log.info("fetching HEST sample %s from %s into %s", sample_id, repo_id, out_root)
    try:
        info = HfApi().repo_info(repo_id, repo_type="dataset", revision=revision, token=token)
        snapshot_download(
            repo_id=repo_id,
            repo_type="dataset",
            revision=info.sha or revision,
            local_dir=out_root,
            allow_patterns=patterns,
            token=token,
        )
    except Exception as exc:
        error = _hub_error(exc, repo_id, revision, token)
        if error is None:
            raise
        raise error from None

    paths = layout.sample_paths(out_root, sample_id)
    missing = [p.relative_to(out_root).as_posix() for p in paths.values() if not p.is_file()]
    if missing:
        raise CMRCNetError(f"sample {sample_id} not found in {repo_id} (missing {', '.join(missing)})")
    for extra in patterns[3:]:
        if not any(out_root.glob(extra)):
            log.warning("%s: no files match %s in %s", sample_id, extra, repo_id)
    validate_sample(out_root, sample_id)
    return paths


def validate_sample(root: str | Path, sample_id: str) -> dict:
    """Check a sample is usable (files present, metadata, pixel size, spots with coordinates); returns its metadata."""
    _check_sample_id(sample_id)
    paths = layout.sample_paths(root, sample_id)
    what = {"st": "expression file (.h5ad)", "wsi": "whole-slide image (.tif)", "metadata": "metadata file (.json)"}
    for kind, path in paths.items():
        if not path.is_file():
            raise input_error(path, f"{what[kind]} not found for sample {sample_id}")
    meta = layout.read_metadata(paths["metadata"])
    layout.pixel_size_um(meta, paths["metadata"], paths["wsi"])
    layout.read_st(paths["st"])
    return meta


def _replace_with_symlink(target: Path, link: Path) -> None:
    """Point `link` at `target` atomically, so a reader never sees the link missing or half made."""
    if link.is_symlink() or not link.exists():
        pass
    elif os.path.samefile(link, target):
        return  # out_root is the source tree itself: the file is already where it belongs
    else:
        raise input_error(link, "exists and is not a link; refusing to replace a real file with a link")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def link_local_sample(sample_id: str, src_root: str | Path, out_root: str | Path) -> dict[str, Path]:
    """Expose an already-downloaded HEST sample under `out_root` by symlinks: slides are GBs, copies waste disk."""
    validate_sample(src_root, sample_id)
    sources = layout.sample_paths(src_root, sample_id)
    links = layout.sample_paths(out_root, sample_id)
    for kind, link in links.items():
        _replace_with_symlink(sources[kind].resolve(), link)
    return links
