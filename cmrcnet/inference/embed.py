"""The embedding cache: every patch of a sample embedded once by a frozen encoder, for everything that uses frozen
features (the probes, Table 4's foundation baseline, the cross-modal benchmark) to read instead of embedding again.

`embed_patches` streams the `img` dataset of a patch file (HEST's layout, as `cmrcnet.data.patches` writes it)
through the encoder in batches: a DataLoader reads contiguous slices of `batch_size` patches (each worker process
opens its own HDF5 handle), so memory holds one batch on the device plus the loader's prefetched batches whatever
the sample's size. On CUDA the forward runs under autocast (`amp`); the CPU always computes in float32.

The cache file (HDF5, written atomically): datasets `embeddings` (N, D) float16 or float32 and `barcode` (N, 1)
bytes in the patch file's order; attributes `encoder`, `weights_sha256` (from SOURCE.json beside the weights,
else the file's own sha256, or "random" for random weights), `embed_dim`, `dtype`, `input_size`, `patches` (the
patch file's path), `patches_identity` (`cmrcnet.train.file_identity`), `n_patches`, `amp`, `device`, `versions`
(JSON). `read_embeddings` reads it back and refuses another encoder's or other weights' cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

DTYPES = ("float16", "float32")
RANDOM_WEIGHTS = "random"
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # spec.precision -> autocast dtype; fp32: no autocast


@dataclass
class Embeddings:
    """A cache file's content: barcodes (N,) str in the patch file's order, values (N, D) float32, attributes."""

    barcodes: np.ndarray
    values: np.ndarray
    attrs: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_checksum(weights_path) -> str:
    """sha256 of the weights an encoder is loaded with: the local file's checksum recorded in SOURCE.json beside
    it when there is one (so a 5 GB file is not hashed again), else the file's own; "random" for None."""
    if weights_path is None:
        return RANDOM_WEIGHTS
    path = Path(weights_path)
    if not path.is_file():
        raise input_error(path, "weights file not found (fetch the encoder's weights first)")
    source = path.parent / "SOURCE.json"
    if source.is_file():
        try:
            info = json.loads(source.read_text())
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("file", path.name) == path.name:
            for key in ("local_sha256", "sha256"):
                value = info.get(key)
                if isinstance(value, str) and len(value) == 64:
                    return value.lower()
    return _sha256(path)


class _PatchSlices:
    """Item i = the uint8 patches [i * batch, (i + 1) * batch) of a patch file as one tensor (N, H, W, 3).

    Contiguous slices are what h5py reads fastest; the handle is opened on first use in each process (an h5py
    handle must not cross a fork), so every DataLoader worker has its own."""

    def __init__(self, path: Path, n: int, batch_size: int):
        self.path, self.n, self.batch_size = str(path), n, batch_size
        self._h5, self._pid = None, None

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, i: int):
        import h5py
        import torch

        if self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        lo = i * self.batch_size
        return torch.from_numpy(np.ascontiguousarray(self._h5["img"][lo: min(lo + self.batch_size, self.n)]))

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self):
        return {"path": self.path, "n": self.n, "batch_size": self.batch_size, "_h5": None, "_pid": None}


def _check_args(dtype: str, batch_size, num_workers) -> None:
    if dtype not in DTYPES:
        raise input_error("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise input_error("batch_size", f"must be a whole number of at least 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise input_error("num_workers", f"must be a whole number of at least 0, got {num_workers!r}")


def embed_patches(encoder, weights_path, patches_h5, out_h5, *, dtype: str = "float16", batch_size: int = 128,
                  device: str | None = None, num_workers: int = 0, amp: bool = True, amp_dtype: str | None = None,
                  progress: bool = True) -> dict:
    """Embed every patch of `patches_h5` with the registered `encoder` (weights from `weights_path`, a safetensors
    file from `fetch_weights`; None: random weights) and write the cache file `out_h5` (see the module docstring).
    `encoder` may also be an already loaded `FrozenEncoder` (from `load_encoder(name, weights_path, device)`), to
    embed several files with one load; `weights_path` must then be the file it was loaded from (for the checksum).

    `device` defaults to CUDA when available. With `amp`, the forward runs under autocast on CUDA (never on the
    CPU) in `amp_dtype`, by default the precision HEST-Benchmark runs the encoder in (`spec.precision`: fp16 ->
    float16, bf16 -> bfloat16; fp32 encoders stay in float32). A missing or corrupt patch file, or one whose `img`
    is not (N, H, W, 3) uint8, is a one-line error naming it, and nothing is written. Returns a summary (counts,
    seconds, patches per second)."""
    import time

    import h5py
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from cmrcnet.data.datasets import read_patch_index
    from cmrcnet.encoders import load_encoder
    from cmrcnet.io import atomic_path, package_versions
    from cmrcnet.train import file_identity

    _check_args(dtype, batch_size, num_workers)
    if amp_dtype not in (None, "float16", "bfloat16"):
        raise input_error("amp_dtype", f"must be float16 or bfloat16, got {amp_dtype!r}")
    patches_h5 = Path(patches_h5)
    barcodes, size = read_patch_index(patches_h5)  # one-line errors for a missing, corrupt or foreign file
    n = len(barcodes)
    checksum = weights_checksum(weights_path)
    if isinstance(encoder, str):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_encoder(encoder, weights_path, device=dev)
    else:  # a loaded FrozenEncoder: it stays where it is
        model = encoder
        dev = model.device
        if device is not None and torch.device(device).type != dev.type:
            raise input_error("device", f"{device} asked for, but the given encoder is on {dev}")
    spec = model.spec
    encoder = spec.name
    dim = int(spec.embed_dim)
    if amp_dtype is None:
        amp_dtype = AMP_DTYPES.get(str(getattr(spec, "precision", "fp32")))
    use_amp = bool(amp) and dev.type == "cuda" and amp_dtype is not None
    start = time.perf_counter()

    slices = _PatchSlices(patches_h5, n, int(batch_size))
    loader = DataLoader(slices, batch_size=None, shuffle=False, num_workers=int(num_workers),
                        pin_memory=dev.type == "cuda")
    attrs = {"encoder": encoder, "weights_sha256": checksum, "embed_dim": dim, "dtype": dtype,
             "input_size": int(spec.input_size), "patch_size": f"{size[0]}x{size[1]}", "patches": str(patches_h5),
             "patches_identity": file_identity(patches_h5), "n_patches": n, "amp": use_amp,
             "amp_dtype": amp_dtype if use_amp else "", "device": str(dev),
             "versions": json.dumps(package_versions(), sort_keys=True)}
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as h5:
        out = h5.create_dataset("embeddings", shape=(n, dim), dtype=dtype, chunks=(min(n, 1024), dim) if n else None)
        with h5py.File(patches_h5, "r") as src:
            h5.create_dataset("barcode", data=src["barcode"][()].reshape(n, 1))
        h5.attrs.update(attrs)
        bar = tqdm(total=n, unit="patch", desc=f"embed {encoder} {patches_h5.stem}", disable=not progress)
        lo = 0
        try:
            with torch.inference_mode():
                for batch in loader:
                    batch = batch.to(dev, non_blocking=True)
                    with torch.autocast(dev.type, dtype=getattr(torch, amp_dtype or "float16"), enabled=use_amp):
                        emb = model.embed_uint8(batch)
                    emb = emb.float().cpu().numpy()
                    if emb.shape != (len(batch), dim):
                        raise RuntimeError(f"{encoder}: embedding of shape {emb.shape}, expected ({len(batch)}, {dim})")
                    values = emb.astype(dtype)
                    if not np.isfinite(values).all():
                        hint = "; write float32 (embed dtype)" if np.isfinite(emb).all() else ""
                        raise input_error(patches_h5, f"{encoder} gives non-finite embeddings for patches {lo}-"
                                                      f"{lo + len(batch) - 1}{hint}")
                    out[lo: lo + len(batch)] = values
                    lo += len(batch)
                    bar.update(len(batch))
        except (OSError, KeyError) as exc:  # a chunk that cannot be read or decoded
            raise input_error(patches_h5, f"cannot read the patches (file corrupt?): {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        finally:
            bar.close()
            slices.close()
        if lo != n:
            raise RuntimeError(f"{patches_h5}: embedded {lo} of {n} patches")
    seconds = time.perf_counter() - start
    log.info("%s: %d patches embedded with %s in %.1f s (%.0f patches/s) -> %s", patches_h5.name, n, encoder, seconds,
             n / seconds if seconds > 0 else float("nan"), out_h5)
    return {"n_patches": n, "embed_dim": dim, "seconds": seconds, "patches_per_s": n / seconds if seconds else None,
            "device": str(dev), "weights_sha256": checksum}


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_embeddings(path, encoder: str | None = None, weights_sha256: str | None = None) -> Embeddings:
    """The cache file `path` as barcodes, float32 values and attributes; with `encoder` / `weights_sha256`, a cache
    made by another encoder or other weights is a one-line error naming the file (re-embed it)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "embedding file not found (run the embed step for this sample and encoder)")
    try:
        with h5py.File(path, "r") as h5:
            for key in ("embeddings", "barcode"):
                if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                    raise input_error(path, f"no '{key}' dataset; not an embedding file written by embed_patches")
            attrs = {k: _attr(v) for k, v in h5.attrs.items()}
            values = np.asarray(h5["embeddings"][()], dtype=np.float32)
            codes = np.asarray(h5["barcode"][()]).reshape(-1)
    except OSError as exc:
        raise input_error(path, f"cannot read as HDF5, file is corrupt ({type(exc).__name__})") from None
    missing = [k for k in ("encoder", "weights_sha256", "embed_dim") if k not in attrs]
    if missing:
        raise input_error(path, f"no {', '.join(missing)} attribute; not an embedding file written by embed_patches")
    if values.ndim != 2 or values.shape[1] != int(attrs["embed_dim"]):
        raise input_error(path, f"'embeddings' has shape {values.shape}, expected (N, {attrs['embed_dim']})")
    if len(codes) != len(values):
        raise input_error(path, f"{len(codes)} barcodes for {len(values)} embeddings")
    if encoder is not None and attrs["encoder"] != encoder:
        raise input_error(path, f"embeddings of encoder {attrs['encoder']!r}, expected {encoder!r}; re-embed")
    if weights_sha256 is not None and attrs["weights_sha256"] != weights_sha256:
        raise input_error(path, f"embeddings made with other {attrs['encoder']} weights (sha256 "
                                f"{str(attrs['weights_sha256'])[:12]}..., expected {weights_sha256[:12]}...); re-embed")
    if not np.isfinite(values).all():
        raise input_error(path, "embeddings contain NaN or infinite values")
    barcodes = np.array([b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in codes], dtype=object)
    return Embeddings(barcodes=barcodes.astype(str), values=values, attrs=attrs)
