"""Atomic writes and provenance: a failed step never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

TRACKED_PACKAGES = (
    "numpy", "scipy", "pandas", "anndata", "scanpy", "h5py", "tifffile", "pillow", "torch", "timm", "snakemake",
)


TMP_MARK = ".tmp"  # temporary outputs are `.{name}.{host}-{pid}.{random}.tmp{suffix}` beside `name`


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


_OPEN: set[str] = set()  # temporary files this process is writing now
# the part between `.{name}.` and `.tmp{suffix}`: `{host}-{pid}.{random}`, or mkstemp's `{random}` alone (the
# naming before the writer was recorded in it)
_TMP_MIDDLE = re.compile(r"(?:[A-Za-z0-9_]+-[0-9]+\.)?[a-z0-9_]{8}")


def _writer_alive(tmp: Path, middle: str) -> bool:
    """Whether the process that made a temporary file (its `{host}-{pid}.{random}` name part) still runs here.

    A writer on another host cannot be asked; it cannot be writing the same output either, since Snakemake (its
    lock, one job per output) and the CLI hand an output to one writer at a time."""
    owner = middle.rsplit(".", 1)[0]
    host, _, pid = owner.rpartition("-")
    if host != _host() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # this process, or a killed one with the same pid (a container's pid 1...)
        return str(tmp) in _OPEN
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer of `path` left beside it (SIGKILL, out of memory, a node lost):
    `atomic_path` never got to remove them. Those of a writer still running on this host are kept."""
    path = Path(path)
    prefix, suffix = f".{path.name}.", TMP_MARK + path.suffix
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for tmp in candidates:
        name = tmp.name
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
            continue
        middle = name[len(prefix): -len(suffix)]
        if not _TMP_MIDDLE.fullmatch(middle) or _writer_alive(tmp, middle):
            continue
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            continue
        log.info("%s: removed %s (%d bytes), left by an interrupted write", path, tmp.name, size)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    Temporary files that an earlier, killed writer of the same output left behind are removed first. An output
    whose folder does not exist gets the folder (as Snakemake does); one that cannot be created is a one-line
    error naming it.
    """
    if str(path).endswith(("/", os.sep)):
        raise input_error(path, "names a folder; give the output file's name")
    path = Path(path)
    if path.is_dir():
        raise input_error(path, "is a folder; give the output file's name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=TMP_MARK + path.suffix,
                                   dir=path.parent)
    except OSError as exc:
        raise input_error(path, f"cannot create the output ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any other file
    _OPEN.add(str(tmp))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _OPEN.discard(str(tmp))
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: str | Path, df: pd.DataFrame, provenance_info: dict | None = None) -> None:
    """Write a table as Parquet (with provenance in the file metadata) or TSV, by suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if provenance_info is not None:
                meta = dict(table.schema.metadata or {})
                meta[b"cmrcnet_provenance"] = json.dumps(provenance_info, default=str).encode()
                table = table.replace_schema_metadata(meta)
            pq.write_table(table, tmp)
        elif path.suffix in (".tsv", ".txt"):
            df.to_csv(tmp, sep="\t", index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: unsupported table format")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    from cmrcnet import __version__

    versions["cmrcnet"] = __version__
    return versions


def provenance(config: dict | None = None, **extra: Any) -> dict:
    """What produced a result: package versions plus the config section that matters for it."""
    info: dict[str, Any] = {"versions": package_versions()}
    if config is not None:
        info["config"] = config
    info.update(extra)
    return info
