"""Atomic writes and provenance: a failed step never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

TRACKED_PACKAGES = (
    "numpy", "scipy", "pandas", "anndata", "scanpy", "h5py", "tifffile", "pillow", "torch", "timm", "snakemake",
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any other file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
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
