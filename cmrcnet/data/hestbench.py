"""HEST-Benchmark as published: one task's own files from the gated Hugging Face dataset `MahmoodLab/hest-bench`,
read as the benchmark reads them, and a probe scored on exactly its splits and genes.

The layout and protocol follow HEST's own benchmark code (github.com/mahmoodlab/HEST, `src/hest/bench/
benchmark.py`, `st_dataset.py`, `trainer.py` at commit afd42c3, hest 1.1.1; facts collected in the project's notes,
no code copied):

- the hub repo has one folder per task (IDC, PRAD, PAAD, SKCM, COAD, READ, CCRCC, HCC, LUNG, LYMPH_IDC) and
  `fm_v1/` (encoder checkpoints). A task folder holds `splits/train_{i}.csv` and `splits/test_{i}.csv` (columns
  `sample_id`, `patches_path`, `expr_path`; paths relative to the task folder), `patches/{sample}.h5` (datasets
  `img`, `barcode`, `coords`; `patches/vis/` holds pictures, not fetched), `adata/{sample}.h5ad` and
  `var_50genes.json` (`{"genes": [...]}`);
- targets: the task's genes in the order of `var_50genes.json`, log1p of the values stored in the expression
  file (HEST's `normalize_adata` only takes log1p: there is no total-count normalisation), rows in the barcode
  order of the patch file (and so of the embeddings);
- per fold, the probe is fitted on all spots of the training samples and predicts all spots of the test samples;
  Pearson r per gene over all test spots of the fold, the mean over genes per fold, then mean and standard deviation
  (np.std, ddof 0) of the fold means over folds.

One difference, stated in every result: a gene whose r is undefined on a fold (constant truth or prediction) is
reported and left out of that fold's mean over genes, where HEST's np.mean would make the fold's mean NaN.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cmrcnet.errors import CMRCNetError, input_error

log = logging.getLogger("cmrcnet")

HESTBENCH_REPO = "MahmoodLab/hest-bench"  # a dataset repo, gated: the same token as HEST-1k
TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "HCC", "LUNG", "LYMPH_IDC")
# The 9 tasks of the published leaderboard: HCC has been left out of HEST's README tables since 08.30.24.
PUBLISHED_TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
# Names the HEST README (and papers) use for task folders.
TASK_ALIASES = {"LUAD": "LUNG", "LYMPH IDC": "LYMPH_IDC", "LYMPH-IDC": "LYMPH_IDC"}
GENES_FILE = "var_50genes.json"
GENES_KEY = "genes"
MANIFEST = "TASK.json"
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
PROTOCOL = ("HEST-Benchmark: probe fitted on the pooled spots of each fold's training samples; Pearson r per gene over "
            "all test spots of the fold; mean over genes per fold (genes with undefined r left out and reported); "
            "mean and sd (ddof 0) over folds; targets log1p of the stored counts")

_SPLIT_FILE = re.compile(r"^(train|test)_(\d+)\.csv$")


def task_name(task: str) -> str:
    """The hub folder of a task: TASKS as spelled there; README names (LUAD, ccRCC, 'LYMPH IDC') and any case are
    accepted. An unknown name is a one-line error listing the tasks."""
    text = str(task).strip()
    key = TASK_ALIASES.get(text.upper(), text.upper())
    if key not in TASKS:
        raise input_error("hest-bench task", f"unknown task {task!r}; the benchmark's tasks are {', '.join(TASKS)}")
    return key


def task_patterns(task: str) -> tuple[list[str], list[str]]:
    """(allow, ignore) hub patterns for one task's files: splits, patch files, expression files and the gene list;
    not the pictures in `patches/vis/`, not other tasks, not `fm_v1/`. (The hub's patterns are fnmatch patterns,
    where `*` also matches `/`, hence the explicit ignore.)"""
    task = task_name(task)
    allow = [f"{task}/splits/*.csv", f"{task}/patches/*.h5", f"{task}/adata/*.h5ad", f"{task}/{GENES_FILE}"]
    return allow, [f"{task}/patches/vis/*"]


# ------------------------------------------------------------------------------------------------ reading a task


@dataclass(frozen=True)
class BenchSample:
    """One sample of a task: its patch file (HEST layout) and expression file."""

    sample_id: str
    patches: Path
    expression: Path


@dataclass(frozen=True)
class BenchTask:
    """A task as the benchmark defines it. `folds[i]` is (train sample ids, test sample ids) of
    `splits/train_{i}.csv` / `splits/test_{i}.csv`, in the files' row order; `split_files[i]` names those files."""

    name: str
    root: Path
    genes: tuple[str, ...]
    folds: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    samples: dict[str, BenchSample]
    split_files: tuple[tuple[Path, Path], ...] = field(default=())

    def sample(self, sample_id: str) -> BenchSample:
        if sample_id not in self.samples:
            raise input_error(self.root, f"no sample {sample_id!r} in task {self.name} "
                                         f"(its samples: {', '.join(self.samples)})")
        return self.samples[sample_id]


def read_genes(path: str | Path) -> list[str]:
    """The task's genes from `var_50genes.json` (`{"genes": [...]}`), in file order. HEST uses 50; any number of
    distinct names is accepted here (small test tasks use fewer)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "gene list not found (every hest-bench task has var_50genes.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise input_error(path, f"not valid JSON ({type(exc).__name__})") from None
    genes = data.get(GENES_KEY) if isinstance(data, dict) else None
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise input_error(path, f"expected {{\"{GENES_KEY}\": [gene names]}} with at least one name")
    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise input_error(path, f"gene(s) listed twice: {', '.join(duplicated)}")
    return list(genes)


def _read_split(path: Path, task_dir: Path) -> list[tuple[str, Path, Path]]:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise input_error(path, f"cannot read as CSV ({type(exc).__name__})") from None
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise input_error(path, f"no column(s) {', '.join(missing)}; a split file has columns "
                                f"{', '.join(SPLIT_COLUMNS)} (found: {', '.join(map(str, df.columns)) or 'none'})")
    rows = []
    for i, row in enumerate(df.itertuples(index=False), start=2):
        sample, patches, expr = (str(getattr(row, c)).strip() for c in SPLIT_COLUMNS)
        if not sample or not patches or not expr:
            raise input_error(path, f"line {i}: empty sample_id, patches_path or expr_path")
        rows.append((sample, task_dir / patches, task_dir / expr))
    ids = [r[0] for r in rows]
    twice = sorted({s for s in ids if ids.count(s) > 1})
    if twice:
        raise input_error(path, f"sample(s) listed twice: {', '.join(twice)}")
    return rows


def _split_files(task_dir: Path) -> list[tuple[Path, Path]]:
    splits = task_dir / "splits"
    if not splits.is_dir():
        raise input_error(splits, "splits folder not found (a hest-bench task has splits/train_i.csv and test_i.csv)")
    found: dict[str, set[int]] = {"train": set(), "test": set()}
    for p in splits.iterdir():
        if m := _SPLIT_FILE.match(p.name):
            found[m.group(1)].add(int(m.group(2)))
    indices = found["train"] | found["test"]
    if not indices:
        raise input_error(splits, "no split files (expected train_0.csv, test_0.csv, ...)")
    n = max(indices) + 1
    for i in range(n):
        for part in ("train", "test"):
            if i not in found[part]:
                raise input_error(splits / f"{part}_{i}.csv", f"not found, but split {max(indices)} exists; folds "
                                                              "are numbered 0, 1, ... with a train and a test file each")
    return [(splits / f"train_{i}.csv", splits / f"test_{i}.csv") for i in range(n)]


def _read_elem(group):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(group)


def expression_index(path: str | Path) -> tuple[list[str], list[str]]:
    """(barcodes, genes) of an .h5ad file, read without its matrix."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "obs" not in h5 or "var" not in h5:
                raise input_error(path, "no obs/var; not an AnnData file")
            obs, var = _read_elem(h5["obs"]), _read_elem(h5["var"])
    except CMRCNetError:
        raise
    except Exception as exc:  # h5py's OSError, anndata's own errors on a foreign layout
        raise input_error(path, f"cannot read as AnnData ({type(exc).__name__})") from None
    return [str(b) for b in obs.index], [str(g) for g in var.index]


def _check_genes(path: Path, available: Sequence[str], genes: Sequence[str]) -> None:
    have = set(available)
    missing = [g for g in genes if g not in have]
    if missing:
        raise input_error(path, f"{len(missing)} of the task's {len(genes)} genes missing from the expression file "
                                f"(first: {', '.join(missing[:5])})")
    twice = sorted({g for g in genes if list(available).count(g) > 1})
    if twice:
        raise input_error(path, f"gene(s) {', '.join(twice)} appear more than once in the expression file")


def read_task(task_dir: str | Path, *, check_genes: bool = True) -> BenchTask:
    """Read a task folder as HEST's benchmark does: its folds, genes, and every split sample's files.

    One-line errors naming the file: no splits, a split without its columns, a split sample whose patch or
    expression file is missing (or listed with different files in two splits), a fold whose test set is empty or
    shares samples with its training set, and (with `check_genes`) a task gene missing from an expression file."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise input_error(task_dir, "hest-bench task folder not found (fetch the task first)")
    name = task_dir.name
    manifest = task_dir / MANIFEST
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            name = str(json.loads(manifest.read_text()).get("task") or name)
    genes = read_genes(task_dir / GENES_FILE)
    samples: dict[str, BenchSample] = {}
    folds, split_files = [], []
    for train_csv, test_csv in _split_files(task_dir):
        parts = []
        for csv in (train_csv, test_csv):
            ids = []
            for sample, patches, expr in _read_split(csv, task_dir):
                known = samples.get(sample)
                if known is None:
                    for path, what in ((patches, "patch file"), (expr, "expression file")):
                        if not path.is_file():
                            raise input_error(csv, f"sample {sample}: {what} {path.relative_to(task_dir)} not found")
                    samples[sample] = BenchSample(sample, patches, expr)
                elif (known.patches, known.expression) != (patches, expr):
                    raise input_error(csv, f"sample {sample} listed with other files than in an earlier split")
                ids.append(sample)
            parts.append(tuple(ids))
        train, test = parts
        if not test:
            raise input_error(test_csv, "empty test set")
        if not train:
            raise input_error(train_csv, "empty training set")
        shared = sorted(set(train) & set(test))
        if shared:
            raise input_error(test_csv, f"sample(s) {', '.join(shared)} also in {train_csv.name}; "
                                        "a fold's test samples must not be trained on")
        folds.append((train, test))
        split_files.append((train_csv, test_csv))
    if check_genes:
        for s in samples.values():
            _check_genes(s.expression, expression_index(s.expression)[1], genes)
    return BenchTask(name=name, root=task_dir, genes=tuple(genes), folds=tuple(folds), samples=samples,
                     split_files=tuple(split_files))


def patch_barcodes(path: str | Path) -> np.ndarray:
    """The barcodes of a patch file (HEST layout: `img` (N, H, W, 3) uint8, `barcode` (N, 1) bytes), in file order;
    one-line errors on another layout."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            for key in ("img", "barcode"):
                if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                    raise input_error(path, f"no '{key}' dataset; not a HEST patch file")
            img = h5["img"]
            if img.ndim != 4 or img.shape[-1] != 3 or img.dtype != np.uint8:
                raise input_error(path, f"'img' is {img.dtype} {img.shape}; expected uint8 (N, H, W, 3)")
            codes = np.asarray(h5["barcode"][()]).reshape(-1)
            n = img.shape[0]
    except CMRCNetError:
        raise
    except OSError as exc:
        raise input_error(path, f"cannot read as HDF5 ({type(exc).__name__})") from None
    if len(codes) != n:
        raise input_error(path, f"{len(codes)} barcodes for {n} patches")
    return np.array([c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in codes], dtype=str)


def validate_task(task: BenchTask) -> dict:
    """Check every sample's files can be read and fit together: a patch file in HEST's layout whose barcodes are
    all spots of the expression file, which has the task's genes. Returns {sample: number of patches}."""
    counts = {}
    for s in task.samples.values():
        barcodes = patch_barcodes(s.patches)
        obs, var = expression_index(s.expression)
        _check_genes(s.expression, var, task.genes)
        known = set(obs)
        missing = [b for b in barcodes if b not in known]
        if missing:
            raise input_error(s.patches, f"{len(missing)} of {len(barcodes)} patch barcodes have no spot in "
                                         f"{s.expression.name} (first: {missing[0]!r})")
        counts[s.sample_id] = int(len(barcodes))
    return counts


# ------------------------------------------------------------------------------------------------ targets


def task_targets(task: BenchTask, sample: str) -> tuple[np.ndarray, np.ndarray]:
    """(barcodes, Y) of one sample: Y (spots x the task's genes, float64) = log1p of the stored values, columns in
    the order of the gene list, rows in the expression file's barcode order (see `align_targets`)."""
    import anndata as ad
    import scipy.sparse as sp

    path = task.sample(sample).expression
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise input_error(path, f"cannot read as AnnData ({type(exc).__name__})") from None
    genes = list(task.genes)
    var = [str(g) for g in adata.var_names]
    _check_genes(path, var, genes)
    barcodes = np.array([str(b) for b in adata.obs_names], dtype=str)
    if len(set(barcodes)) != len(barcodes):
        raise input_error(path, "duplicate spot barcodes")
    col = {g: i for i, g in enumerate(var)}
    X = adata.X[:, [col[g] for g in genes]]
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise input_error(path, "expression of the task's genes contains NaN or infinite values")
    if (X < 0).any():
        raise input_error(path, "negative expression values; expected raw counts (the benchmark takes log1p)")
    if not np.array_equal(X, np.round(X)):
        log.warning("%s: expression values are not whole numbers; HEST takes log1p of them as stored, as done here",
                    path)
    return barcodes, np.log1p(X)


def align_targets(barcodes: Sequence[str], Y: np.ndarray, wanted: Sequence[str], where: str | Path) -> np.ndarray:
    """The rows of Y (in `barcodes` order) in the order of `wanted` (e.g. the embeddings' barcodes); a wanted
    barcode without expression is a one-line error naming `where`."""
    row = {b: i for i, b in enumerate(map(str, barcodes))}
    wanted = [str(b) for b in wanted]
    missing = [b for b in wanted if b not in row]
    if missing:
        raise input_error(where, f"{len(missing)} of {len(wanted)} spots have no expression (first: {missing[0]!r})")
    return np.asarray(Y)[[row[b] for b in wanted]]


# ------------------------------------------------------------------------------------------------ fetching


def _manifest_ok(task_dir: Path, repo_id: str, revision: str | None) -> dict | None:
    path = task_dir / MANIFEST
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("repo_id") != repo_id:
        return None
    if revision is not None and revision not in (info.get("revision"), info.get("commit")):
        return None
    for entry in info.get("files", []):
        file = task_dir / entry.get("path", "")
        if not file.is_file() or file.stat().st_size != entry.get("size"):
            log.info("%s: %s missing or changed; fetching the task again", path, entry.get("path"))
            return None
    return info if info.get("files") else None


def read_manifest(task_dir: str | Path) -> dict:
    """A fetched task's TASK.json (repo, commit, samples, folds, genes, files); one-line error if absent."""
    path = Path(task_dir) / MANIFEST
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise input_error(path, "not found; fetch the task first (cmrcnet.data.hestbench.fetch_task)") from None
    except (OSError, ValueError) as exc:
        raise input_error(path, f"cannot read ({type(exc).__name__})") from None
    return info


def fetch_task(task: str, root: str | Path, *, repo_id: str = HESTBENCH_REPO, revision: str | None = None,
               token: str | None = None) -> Path:
    """Download one task's files from the hest-bench dataset into `root/{task}` and validate them; returns that
    folder.

    Only the task's splits, patch files, expression files and gene list are fetched (not `patches/vis/`, not other
    tasks, not `fm_v1/`). A task whose TASK.json manifest is complete (same repo, the requested revision if any,
    every listed file present with its size) is not fetched again: no request is made, so offline compute nodes
    can re-run. The token comes from `token`, HF_TOKEN or the CLI login and is never printed or written; a
    missing token, terms not accepted (the dataset is gated), a bad token, an unknown repo or revision, and no
    network are one-line errors. The manifest is written (atomically) only after the task validated."""
    from huggingface_hub import HfApi, snapshot_download

    from cmrcnet.data.hest import _hub_error, _resolve_token
    from cmrcnet.io import write_json

    task = task_name(task)
    root = Path(root)
    task_dir = root / task
    if _manifest_ok(task_dir, repo_id, revision) is not None:
        log.info("hest-bench %s: already fetched into %s", task, task_dir)
        return task_dir
    allow, ignore = task_patterns(task)
    token = _resolve_token(token, repo_id)
    log.info("fetching hest-bench task %s from %s into %s", task, repo_id, root)
    try:
        info = HfApi().repo_info(repo_id, repo_type="dataset", revision=revision, token=token)
        commit = info.sha or revision
        snapshot_download(repo_id=repo_id, repo_type="dataset", revision=commit, local_dir=root,
                          allow_patterns=allow, ignore_patterns=ignore, token=token)
    except Exception as exc:
        error = _hub_error(exc, repo_id, revision, token)
        if error is None:
            raise
        raise error from None
    if not task_dir.is_dir():
        raise CMRCNetError(f"task {task} not found in {repo_id} (no {task}/ folder at commit {commit})")
    bench = read_task(task_dir)
    counts = validate_task(bench)
    files = sorted(p for p in task_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not any(part.startswith(".") for part in p.relative_to(task_dir).parts))
    write_json(task_dir / MANIFEST, {
        "repo_id": repo_id, "repo_type": "dataset", "revision": revision, "commit": commit, "task": task,
        "samples": {s: {"patches": b.patches.relative_to(task_dir).as_posix(),
                        "expression": b.expression.relative_to(task_dir).as_posix(), "n_patches": counts[s]}
                    for s, b in bench.samples.items()},
        "folds": [{"train": list(tr), "test": list(te)} for tr, te in bench.folds],
        "n_folds": len(bench.folds), "genes": list(bench.genes),
        "files": [{"path": p.relative_to(task_dir).as_posix(), "size": p.stat().st_size} for p in files],
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    log.info("hest-bench %s: %d samples, %d folds, %d genes", task, len(bench.samples), len(bench.folds),
             len(bench.genes))
    return task_dir


# ------------------------------------------------------------------------------------------------ probing


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _load_features(task: BenchTask, embeddings: Mapping[str, str | Path], encoder: str | None,
                   weights_sha256: str | None) -> tuple[dict, str, str]:
    """{sample: (X, Y)} with Y aligned to the embeddings' barcodes, and the encoder / weights all files share."""
    from cmrcnet.inference.embed import read_embeddings

    needed = [s for train, test in task.folds for s in (*train, *test)]
    needed = list(dict.fromkeys(needed))
    missing = [s for s in needed if s not in embeddings]
    if missing:
        raise input_error(f"hest-bench {task.name}", f"no embedding file given for sample(s) {', '.join(missing)}")
    data, seen = {}, {}
    for sample in needed:
        path = Path(embeddings[sample])
        emb = read_embeddings(path, encoder=encoder, weights_sha256=weights_sha256)
        for key in ("encoder", "weights_sha256"):
            value = str(emb.attrs.get(key))
            if seen.setdefault(key, (value, path))[0] != value:
                first, where = seen[key]
                raise input_error(path, f"{key} {value!r} differs from {first!r} of {where.name}; "
                                        "all samples of a task must be embedded by the same encoder and weights")
        barcodes, Y = task_targets(task, sample)
        Y = align_targets(barcodes, Y, emb.barcodes, task.sample(sample).expression)
        data[sample] = (emb.values, Y)
    return data, seen["encoder"][0], seen["weights_sha256"][0]


def _stack(data: dict, samples: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.concatenate([data[s][0] for s in samples])
    Y = np.concatenate([data[s][1] for s in samples])
    groups = np.concatenate([np.full(len(data[s][0]), s, dtype=object) for s in samples])
    return X, Y, groups


def _summary(fold_means: list[float], per_gene: np.ndarray, genes: Sequence[str]) -> dict:
    means = np.array(fold_means, dtype=np.float64)
    ok = np.isfinite(means)
    gene_mean = {g: _finite(np.nanmean(col)) if np.isfinite(col).any() else None for g, col in zip(genes, per_gene.T)}
    gene_std = {g: _finite(np.nanstd(col)) if np.isfinite(col).any() else None for g, col in zip(genes, per_gene.T)}
    return {
        "pearson_mean": _finite(means[ok].mean()) if ok.any() else None,
        "pearson_std": _finite(means[ok].std()) if ok.any() else None,  # np.std, ddof 0, as HEST
        "n_folds": int(len(means)), "n_folds_undefined": int((~ok).sum()),
        "per_gene": {g: {"mean": gene_mean[g], "std": gene_std[g]} for g in genes},
    }


def probe_task(task_dir: str | Path, embeddings: Mapping[str, str | Path], probe_kind: str, *, seed: int = 1,
               probe_params: Mapping | None = None, encoder: str | None = None, weights_sha256: str | None = None,
               out_json: str | Path | None = None) -> dict:
    """Fit `probe_kind` (`cmrcnet.probes.make_probe`) on each fold's training samples and score its test samples.

    `embeddings` maps every split sample to its embedding cache file (`cmrcnet.inference.embed`; with `encoder` /
    `weights_sha256` another encoder's cache is refused). `seed` goes to probes that take one (HEST's default: 1);
    the probe's groups are the sample ids. Returns (and with `out_json` writes atomically):

    task, encoder, weights_sha256, probe_kind, probe_params, seed, genes, protocol, folds (train, test, spot
    counts) and `probes`: {label: {pearson_mean, pearson_std (over folds, ddof 0), n_folds, per_gene (mean/std over
    folds), folds: [{fold, pearson_mean, pearson_per_gene, undefined_genes, info}]}}. The label is the probe kind,
    or `knn-k{k}` for each k of a knn probe. Undefined r (constant gene) is null in JSON."""
    from cmrcnet.evaluation.metrics import pearson_per_gene
    from cmrcnet.io import package_versions, write_json
    from cmrcnet.probes import make_probe
    from cmrcnet.probes import probe_params as accepted_params

    task = read_task(task_dir)
    params = dict(probe_params or {})
    if "seed" in accepted_params(probe_kind) and "seed" not in params:
        params["seed"] = int(seed)
    data, enc, sha = _load_features(task, embeddings, encoder, weights_sha256)
    genes = list(task.genes)
    folds_out, scored = [], {}
    for i, (train, test) in enumerate(task.folds):
        X_tr, Y_tr, groups = _stack(data, train)
        X_te, Y_te, _ = _stack(data, test)
        probe = make_probe(probe_kind, **params)
        probe.fit(X_tr, Y_tr, groups)
        pred = probe.predict(X_te)
        variants = {f"{probe_kind}-k{k}": p for k, p in pred.items()} if isinstance(pred, dict) else {probe_kind: pred}
        info = getattr(probe, "info_", {})
        for label, P in variants.items():
            r, reason = pearson_per_gene(Y_te, P, where=f"hest-bench {task.name} fold {i} ({label})", genes=genes)
            undefined = {g: str(why) for g, v, why in zip(genes, r, reason) if not np.isfinite(v)}
            if undefined:
                log.warning("hest-bench %s fold %d %s: r undefined for %d gene(s) (%s), left out of the fold's mean",
                            task.name, i, label, len(undefined), ", ".join(list(undefined)[:5]))
            mean = float(np.nanmean(r)) if np.isfinite(r).any() else math.nan
            scored.setdefault(label, []).append((r, {
                "fold": i, "pearson_mean": _finite(mean), "pearson_per_gene": dict(zip(genes, map(_finite, r))),
                "undefined_genes": undefined, "n_genes_scored": int(np.isfinite(r).sum()), "info": info,
            }))
        folds_out.append({"fold": i, "train": list(train), "test": list(test), "n_train_spots": int(len(X_tr)),
                          "n_test_spots": int(len(X_te))})
        log.info("hest-bench %s fold %d: %s", task.name, i,
                 ", ".join(f"{lab} r={rows[-1][1]['pearson_mean']}" for lab, rows in scored.items()))
    probes = {}
    for label, rows in scored.items():
        per_gene = np.array([r for r, _ in rows], dtype=np.float64)
        summary = _summary([np.nan if f["pearson_mean"] is None else f["pearson_mean"] for _, f in rows], per_gene,
                           genes)
        probes[label] = {**summary, "folds": [f for _, f in rows]}
    result = {
        "task": task.name, "encoder": enc, "weights_sha256": sha, "probe_kind": probe_kind, "probe_params": params,
        "seed": int(seed), "genes": genes, "n_genes": len(genes), "protocol": PROTOCOL, "folds": folds_out,
        "probes": probes, "created": datetime.now(UTC).isoformat(timespec="seconds"), "versions": package_versions(),
    }
    if out_json is not None:
        write_json(out_json, result)
    return result


def result_rows(result: Mapping) -> list[dict]:
    """One flat row per probe label of a `probe_task` result: task, encoder, probe, pearson_mean, pearson_std,
    n_folds (the rows `cmrcnet.evaluation.leaderboard.leaderboard` takes)."""
    return [{"task": result["task"], "encoder": result["encoder"], "probe": label,
             "pearson_mean": r["pearson_mean"], "pearson_std": r["pearson_std"], "n_folds": r["n_folds"]}
            for label, r in result["probes"].items()]
