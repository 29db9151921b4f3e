"""Training data: H&E patches streamed from HDF5, joined by spot barcode to the log-normalised expression.

Why streaming: a dataset's patches (tens of GB for HEST-1k) do not fit in memory, so every DataLoader worker
opens the HDF5 files itself on first use and reads one patch (spot models) or one slide (HisToGene) at a time.
Augmentation is a pure function of (seed, epoch, item index), so it does not depend on the worker count and a
resumed run repeats the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cmrcnet.data.folds import read_folds
from cmrcnet.data.genes import read_gene_table
from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_SPLITS = ("spot", "sample")
ALL = "all"  # the fold id of the deployable model: trained on every sample, nothing held out
READ_CHUNK = 256  # patches per HDF5 read when a whole slide is loaded


def _entropy(*values: int) -> list[int]:
    """Seed material for numpy: non-negative ints, so a negative config seed still works."""
    return [int(v) % 2**64 for v in values]


def augmentation_code(seed: int, epoch: int, index: int) -> int:
    """One of the 8 flips/rotations of a square (0 = unchanged), decided by (seed, epoch, index) alone."""
    return int(np.random.default_rng(_entropy(seed, epoch, index)).integers(8))


def apply_dihedral(images: torch.Tensor, code: int) -> torch.Tensor:
    """Horizontal flip when code >= 4, then code % 4 quarter turns, on the last two (H, W) axes.

    These 8 cover every flip and 90-degree rotation (a vertical flip is a horizontal flip plus a half turn).
    """
    if code >= 4:
        images = images.flip(-1)
    return torch.rot90(images, code % 4, dims=(-2, -1))


def dihedral_positions(pos: np.ndarray, code: int) -> np.ndarray:
    """Move grid positions (array_row, array_col) as `apply_dihedral` moves pixels (y, x): the slide turns as one."""
    row, col = pos[:, 0].astype(np.int64), pos[:, 1].astype(np.int64)
    if code >= 4:
        col = col.max() - col
    for _ in range(code % 4):
        row, col = col.max() - col, row
    return np.stack([row, col], axis=1)


def to_model_images(patches: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1], resized with antialiasing when needed."""
    images = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)
    if images.shape[-2:] != (size, size):
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return images


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std per channel: what the pretrained encoders expect."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


class _PatchFiles:
    """HDF5 handles opened on first use in each process: an h5py handle must not cross a fork."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._open: dict[int, object] = {}
        self._pid: int | None = None

    def images(self, i: int):
        import h5py

        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if i not in self._open:
            self._open[i] = h5py.File(self.paths[i], "r")
        return self._open[i]["img"]

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._open.values():
                f.close()
        self._open = {}

    def __getstate__(self):
        return {"paths": self.paths, "_open": {}, "_pid": None}


def _split_key(key, default_epoch: int) -> tuple[int, int]:
    """Items are addressed as `index` or `(epoch, index)`: the sampler sends the epoch to persistent workers."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return default_epoch, int(key)


class SpotDataset(Dataset):
    """One item per spot: {"image": (3, S, S) normalised float, "expr": (G,) float, "index": int}.

    `items` are (patch_file, row) pairs and `expression` the matching (N, G) rows.
    """

    def __init__(self, items: Sequence[tuple[str | Path, int]], expression: np.ndarray, input_size: int,
                 augment: bool = False, seed: int = 0):
        paths = [str(p) for p, _ in items]
        self._files = _PatchFiles(sorted(set(paths)))
        file_id = {p: i for i, p in enumerate(self._files.paths)}
        # numpy arrays, not Python lists: workers then share them copy-on-write without touching refcounts
        self.file_index = np.array([file_id[p] for p in paths], dtype=np.int32)
        self.rows = np.array([int(r) for _, r in items], dtype=np.int64)
        self.expression = np.ascontiguousarray(expression, dtype=np.float32)
        if len(self.expression) != len(self.rows):
            raise ValueError(f"{len(self.rows)} items but {len(self.expression)} expression rows")
        self.input_size = int(input_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        epoch, index = _split_key(key, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(index)
        patch = self._files.images(int(self.file_index[index]))[int(self.rows[index])]
        image = to_model_images(patch[None], self.input_size)[0]
        if self.augment:
            image = apply_dihedral(image, augmentation_code(self.seed, epoch, index))
        return {
            "image": normalise(image).contiguous(),
            "expr": torch.from_numpy(self.expression[index].copy()),
            "index": index,
        }

    def close(self) -> None:
        self._files.close()


class SlideSpots(NamedTuple):
    """The spots of one sample that a slide item holds: patch rows, expression and grid positions."""

    patch_file: str
    rows: np.ndarray
    expression: np.ndarray
    pos: np.ndarray


class SlideDataset(Dataset):
    """One item per sample (HisToGene attends over a whole slide): image (N, 3, S, S), pos long (N, 2), expr (N, G).

    Augmentation turns or flips the whole slide: every patch and the grid positions, chosen per (seed, epoch, slide).
    """

    def __init__(self, slides: Sequence[SlideSpots], input_size: int, augment: bool = False, seed: int = 0):
        self.slides = list(slides)
        self._files = _PatchFiles([s.patch_file for s in self.slides])
        self.input_size = int(input_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, key) -> dict:
        epoch, index = _split_key(key, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(index)
        slide = self.slides[index]
        img = self._files.images(index)
        size = self.input_size
        images = torch.empty((len(slide.rows), 3, size, size), dtype=torch.float32)
        order = np.argsort(slide.rows, kind="stable")  # h5py reads increasing indices only
        for lo in range(0, len(order), READ_CHUNK):
            chunk = order[lo: lo + READ_CHUNK]
            images[torch.from_numpy(chunk)] = to_model_images(img[slide.rows[chunk]], size)
        pos = slide.pos
        if self.augment:
            code = augmentation_code(self.seed, epoch, index)
            images, pos = apply_dihedral(images, code), dihedral_positions(pos, code)
        return {
            "image": normalise(images).contiguous(),
            "pos": torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)),
            "expr": torch.from_numpy(np.ascontiguousarray(slide.expression, dtype=np.float32)),
            "index": index,
        }

    def close(self) -> None:
        self._files.close()


class EpochSampler(Sampler):
    """Yields (epoch, index) in an order fixed by (seed, epoch); `limit` keeps only the first items.

    Why: persistent workers hold their own copy of the dataset, so `dataset.set_epoch` in the main process would
    not reach them; the epoch travels with each index instead.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, limit: int | None = None):
        self.n, self.seed, self.shuffle, self.limit = int(n), int(seed), bool(shuffle), limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n if self.limit is None else min(self.n, self.limit)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng(_entropy(self.seed, self.epoch, 17)).permutation(self.n)
        for i in order[: len(self)]:
            yield self.epoch, int(i)


# ---------------------------------------------------------------------------------------------------------------
# Reading a fold's samples


@dataclass
class SampleSpots:
    """A sample's spots that have both expression and a patch, in the expression file's order."""

    name: str
    st_path: Path
    patch_path: Path
    barcodes: np.ndarray
    patch_rows: np.ndarray  # row in the HDF5 file of each spot
    expression: np.ndarray  # (n_spots, n_genes) float32
    pos: np.ndarray | None  # (n_spots, 2) array_row, array_col; None when the h5ad has no grid positions


def read_patch_index(path: str | Path) -> tuple[list[str], tuple[int, int]]:
    """Barcodes and patch size of a patch file, after checking the layout the datasets rely on."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "patch file not found")
    try:
        with h5py.File(path, "r") as h5:
            for key in ("img", "barcode"):
                if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                    raise input_error(path, f"no '{key}' dataset; not a patch file")
            img, barcode = h5["img"], h5["barcode"]
            if img.ndim != 4 or img.shape[3] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
                raise input_error(path, f"'img' has shape {img.shape}, expected (N, H, W, 3)")
            if img.dtype != np.uint8:
                raise input_error(path, f"'img' has dtype {img.dtype}, expected uint8")
            codes = np.asarray(barcode[()]).reshape(-1)
            if len(codes) != img.shape[0]:
                raise input_error(path, f"{len(codes)} barcodes for {img.shape[0]} patches")
            size = (int(img.shape[1]), int(img.shape[2]))
    except OSError as exc:
        raise input_error(path, f"cannot read as HDF5, file is corrupt ({type(exc).__name__})") from None
    barcodes = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in codes]
    if len(set(barcodes)) != len(barcodes):
        raise input_error(path, "barcodes are not unique")
    return barcodes, size


def patch_settings(path: str | Path) -> dict:
    """The resolution and size a patch file was cut at (attributes written by `extract_patches`): a model
    trained on these patches must be given patches cut the same way."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
    except OSError as exc:
        raise input_error(path, f"cannot read as HDF5, file is corrupt ({type(exc).__name__})") from None
    missing = [k for k in ("um_per_px", "patch_size_px") if k not in attrs]
    if missing:
        raise input_error(path, f"no {', '.join(missing)} attribute; not a patch file written by `cmrcnet patches`")
    return {"um_per_px": float(attrs["um_per_px"]), "size_px": int(attrs["patch_size_px"]),
            "fill": int(attrs.get("fill", 255))}  # files from before `fill` was recorded used the default


def _check_genes(path: Path, found: Sequence[str], genes: Sequence[str], genes_tsv: Path) -> None:
    """Every sample must carry the dataset's genes in the dataset's order: the models index genes by position."""
    found = list(found)
    if found == list(genes):
        return
    if len(found) != len(genes):
        raise input_error(path, f"{len(found)} genes, but {genes_tsv} lists {len(genes)}")
    i = next(i for i, (a, b) in enumerate(zip(found, genes)) if a != b)
    raise input_error(path, f"genes differ from {genes_tsv} (position {i}: {found[i]!r}, expected {genes[i]!r})")


def load_sample(name: str, st_path: Path, patch_path: Path, genes: Sequence[str], genes_tsv: Path) -> SampleSpots:
    """Join a sample's expression and patches by barcode; spots missing from either side are left out (logged)."""
    import anndata as ad
    import scipy.sparse as sp

    if not st_path.is_file():
        raise input_error(st_path, "expression file (.h5ad) not found")
    try:
        adata = ad.read_h5ad(st_path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise input_error(st_path, f"cannot read as AnnData, file is corrupt ({type(exc).__name__})") from None
    _check_genes(st_path, adata.var_names, genes, genes_tsv)
    if not adata.obs_names.is_unique:
        raise input_error(st_path, "spot barcodes (obs_names) are not unique")
    patch_barcodes, _ = read_patch_index(patch_path)

    row_of = {b: i for i, b in enumerate(patch_barcodes)}
    spots = np.array([i for i, b in enumerate(adata.obs_names) if b in row_of], dtype=np.int64)
    if len(spots) == 0:
        raise input_error(patch_path, f"no barcode in common with {st_path}")
    barcodes = np.asarray(adata.obs_names)[spots]
    n_no_patch = adata.n_obs - len(spots)
    n_no_expr = len(patch_barcodes) - len(spots)
    if n_no_patch or n_no_expr:
        log.info("%s: %d spots joined; %d spots without a patch and %d patches without expression left out",
                 name, len(spots), n_no_patch, n_no_expr)

    X = adata.X[spots]
    expression = (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float32)
    if not np.isfinite(expression).all():
        raise input_error(st_path, "expression contains NaN or infinite values")
    pos = None
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        pos = np.asarray(adata.obs[["array_row", "array_col"]].iloc[spots], dtype=np.int64)
        if (pos < 0).any():
            raise input_error(st_path, "negative array_row/array_col")
    return SampleSpots(name, st_path, patch_path, barcodes,
                       np.array([row_of[b] for b in barcodes], dtype=np.int64), expression, pos)


Part = dict[str, np.ndarray]  # sample -> indices of its joined spots


class Fold:
    """One cross-validation fold of a dataset: its genes, train/test samples, and the datasets built from them."""

    def __init__(self, dataset_dir: Path, fold: int | str, genes: list[str], train_samples: list[str],
                 test_samples: list[str], genes_tsv: Path):
        self.dataset_dir = dataset_dir
        self.fold = fold
        self.genes = genes
        self.train_samples = train_samples
        self.test_samples = test_samples
        self.genes_tsv = genes_tsv
        self._cache: dict[str, SampleSpots] = {}

    @property
    def samples(self) -> list[str]:
        return self.train_samples + self.test_samples

    def st_path(self, sample: str) -> Path:
        return self.dataset_dir / "st" / f"{sample}.h5ad"

    def patch_path(self, sample: str) -> Path:
        return self.dataset_dir / "patches" / f"{sample}.h5"

    def sample(self, name: str) -> SampleSpots:
        if name not in self._cache:
            self._cache[name] = load_sample(name, self.st_path(name), self.patch_path(name), self.genes,
                                            self.genes_tsv)
        return self._cache[name]

    def all_spots(self, samples: Sequence[str]) -> Part:
        return {s: np.arange(len(self.sample(s).barcodes)) for s in samples}

    def split(self, val_split: str = "spot", val_fraction: float = 0.1, seed: int = 0) -> tuple[Part, Part]:
        """Training spots minus a validation part: a seeded random fraction of spots, or the last training sample."""
        if val_split == "sample":
            if len(self.train_samples) < 2:
                raise input_error("val_split", f"'sample' needs 2 or more training samples; fold {self.fold} has "
                                               f"{len(self.train_samples)} ({', '.join(self.train_samples)})")
            return self.all_spots(self.train_samples[:-1]), self.all_spots(self.train_samples[-1:])
        if val_split != "spot":
            raise input_error("val_split", f"unknown value {val_split!r}; use one of {', '.join(VAL_SPLITS)}")
        if not 0 < val_fraction < 1:
            raise input_error("val_fraction", f"must lie strictly between 0 and 1, got {val_fraction}")
        counts = [len(self.sample(s).barcodes) for s in self.train_samples]
        total = sum(counts)
        if total < 2:
            raise input_error(self.dataset_dir, f"fold {self.fold} has {total} training spot(s); need at least 2")
        n_val = min(max(1, round(val_fraction * total)), total - 1)
        is_val = np.zeros(total, dtype=bool)
        is_val[np.random.default_rng(_entropy(seed, 29)).permutation(total)[:n_val]] = True
        train, val, start = {}, {}, 0
        for sample, n in zip(self.train_samples, counts):
            flags = is_val[start: start + n]
            train[sample], val[sample] = np.flatnonzero(~flags), np.flatnonzero(flags)
            start += n
        return train, val

    def expression(self, part: Part) -> np.ndarray:
        return np.concatenate([self.sample(s).expression[idx] for s, idx in part.items()])

    def spot_dataset(self, part: Part, input_size: int, augment: bool = False, seed: int = 0) -> SpotDataset:
        items = [(str(self.sample(s).patch_path), int(r)) for s, idx in part.items()
                 for r in self.sample(s).patch_rows[idx]]
        return SpotDataset(items, self.expression(part), input_size, augment, seed)

    def slide_dataset(self, part: Part, input_size: int, augment: bool = False, seed: int = 0) -> SlideDataset:
        slides = []
        for s, idx in part.items():
            if len(idx) == 0:
                continue
            spots = self.sample(s)
            if spots.pos is None:
                raise input_error(spots.st_path, "no obs 'array_row'/'array_col'; slide-level models need them")
            slides.append(SlideSpots(str(spots.patch_path), spots.patch_rows[idx], spots.expression[idx],
                                     spots.pos[idx]))
        return SlideDataset(slides, input_size, augment, seed)

    def n_pos(self) -> int:
        """Largest grid index + 1 over all of the dataset's samples, so every fold embeds every position."""
        import anndata as ad

        largest = 0
        for s in self.samples:
            adata = ad.read_h5ad(self.st_path(s), backed="r")
            try:
                obs = adata.obs
                if not {"array_row", "array_col"} <= set(obs.columns):
                    raise input_error(self.st_path(s), "no obs 'array_row'/'array_col'; slide-level models need them")
                largest = max(largest, int(np.asarray(obs[["array_row", "array_col"]]).max()))
            finally:
                adata.file.close()
        return largest + 1


def fold_id(fold) -> int | str:
    """A fold as the pipeline names it: a cross-validation fold number, or `all` (every sample trains the
    deployable model; nothing is held out)."""
    if isinstance(fold, str) and fold.strip() == ALL:
        return ALL
    try:
        if isinstance(fold, bool) or float(fold) != int(fold):
            raise ValueError
        return int(fold)
    except (TypeError, ValueError):
        raise input_error("fold", f"a fold number or {ALL!r}, got {fold!r}") from None


def load_fold(dataset_dir: str | Path, fold: int | str, folds_tsv: str | Path | None = None,
              genes_tsv: str | Path | None = None) -> Fold:
    """Read the fold's samples and genes and check the training samples' files (test samples load on use).

    Fold `all` trains on every sample of folds.tsv (in its order) and tests none: the deployable model."""
    dataset_dir = Path(dataset_dir)
    folds_tsv = Path(folds_tsv) if folds_tsv is not None else dataset_dir / "folds.tsv"
    genes_tsv = Path(genes_tsv) if genes_tsv is not None else dataset_dir / "genes.tsv"
    folds = read_folds(folds_tsv)
    fold = fold_id(fold)
    if fold == ALL:
        train, test = [str(s) for s in folds["sample"].drop_duplicates()], []
    else:
        rows = folds[folds["fold"] == fold]
        if rows.empty:
            known = ", ".join(str(f) for f in sorted(folds["fold"].unique()))
            raise input_error(folds_tsv, f"no fold {fold} (folds: {known})")
        train = [str(s) for s in rows.loc[rows["role"] == "train", "sample"]]
        test = [str(s) for s in rows.loc[rows["role"] == "test", "sample"]]
    if not train:
        raise input_error(folds_tsv, f"fold {fold} has no training samples")
    genes = [str(g) for g in read_gene_table(genes_tsv)["gene"]]
    result = Fold(dataset_dir, fold, genes, train, test, genes_tsv)
    for sample in train:
        result.sample(sample)
    return result
