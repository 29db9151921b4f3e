"""Per-gene Pearson r and the gene sets it is averaged over, for the paper's protocol and HEST-bench.

Everything here is a pure function of numpy arrays and returns the long `scores` / `gene_sets` tables that
`cmrcnet.evaluation.stats` summarises. Scores columns (SCORE_COLUMNS): protocol, dataset, method, fold,
sample, gene, r, nan_reason, mean_expr, var_expr. Gene-set columns (GENE_SET_COLUMNS): protocol, dataset,
fold, sample, gene_set, gene.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

SCORE_COLUMNS = ["protocol", "dataset", "method", "fold", "sample", "gene", "r", "nan_reason", "mean_expr", "var_expr"]
GENE_SET_COLUMNS = ["protocol", "dataset", "fold", "sample", "gene_set", "gene"]
NAN_REASONS = ("", "constant truth", "constant prediction", "constant truth and prediction")

# A column counts as constant when its standard deviation is at most CONSTANT_RTOL times its largest absolute
# value (an all-zero column is constant). 1e-6 is ~10 float32 ulps: a prediction that is one value stored in
# float32 and averaged (retrieval over identical neighbours) differs only by rounding, and r on rounding noise
# would be a random number rather than a score.
CONSTANT_RTOL = 1e-6
# A test sample with fewer spots than this gives a noisy r per gene, yet the paper's protocol averages it with the
# same weight as a sample of thousands of spots: it is scored, with a warning naming it.
MIN_TEST_SPOTS = 10


def _as_matrix(x, name: str, where: str) -> np.ndarray:
    arr = np.asarray(x.toarray() if sp.issparse(x) else x)
    if arr.ndim != 2:
        raise input_error(where, f"{name} must be a spots x genes matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise input_error(where, f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_finite(arr: np.ndarray, name: str, where: str, genes: Sequence[str] | None) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        spot, col = np.argwhere(bad)[0]
        gene = f"gene {genes[col]!r}" if genes is not None else f"gene column {col}"
        raise input_error(where, f"{name} hold {int(bad.sum())} NaN/inf values (first at spot {spot}, {gene})")


def column_stats(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (ddof=1) of each gene over spots: stored as mean_expr / var_expr in the scores and
    used to rank HEG / HVG, so the gene sets can be re-derived from the scores table."""
    x = np.asarray(truth, dtype=np.float64)
    ddof = 1 if x.shape[0] > 1 else 0
    return x.mean(axis=0), x.var(axis=0, ddof=ddof)


def pearson_per_gene(truth, pred, where: str = "scores", genes: Sequence[str] | None = None,
                     rtol: float = CONSTANT_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of each gene (column) over spots, in float64.

    Returns (r, reason): r is NaN where truth or prediction is constant (see CONSTANT_RTOL), and reason says
    which ("constant truth", "constant prediction", "constant truth and prediction"; "" where r is defined).
    NaN/inf in the inputs, shape mismatch or fewer than 2 spots are input errors naming `where` (and the gene
    when `genes` is given): a NaN prediction is a bug upstream, not a score of zero.
    """
    t = _as_matrix(truth, "truth", where)
    p = _as_matrix(pred, "predictions", where)
    if t.shape != p.shape:
        raise input_error(where, f"truth has shape {t.shape} but predictions have shape {p.shape}")
    if genes is not None and len(genes) != t.shape[1]:
        raise input_error(where, f"{len(genes)} gene names for {t.shape[1]} columns")
    if t.shape[0] < 2:
        raise input_error(where, f"Pearson r needs at least 2 spots, got {t.shape[0]}")
    _check_finite(t, "truth", where, genes)
    _check_finite(p, "predictions", where, genes)

    n = t.shape[0]
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    ss_t = np.einsum("ij,ij->j", tc, tc)
    ss_p = np.einsum("ij,ij->j", pc, pc)
    const_t = np.sqrt(ss_t / n) <= rtol * np.abs(t).max(axis=0)
    const_p = np.sqrt(ss_p / n) <= rtol * np.abs(p).max(axis=0)
    ok = ~(const_t | const_p)
    r = np.full(t.shape[1], np.nan)
    cov = np.einsum("ij,ij->j", tc[:, ok], pc[:, ok])
    r[ok] = np.clip(cov / np.sqrt(ss_t[ok] * ss_p[ok]), -1.0, 1.0)

    reason = np.full(t.shape[1], "", dtype=object)
    reason[const_t & ~const_p] = NAN_REASONS[1]
    reason[const_p & ~const_t] = NAN_REASONS[2]
    reason[const_t & const_p] = NAN_REASONS[3]
    return r, reason


def _rank(stat: np.ndarray, genes: Sequence[str], n: int) -> list[str]:
    """The n genes with the largest `stat`, ties broken by gene name so the choice never depends on order."""
    names = np.asarray(genes, dtype=str)
    order = np.lexsort((names, -np.asarray(stat, dtype=np.float64)))
    return [str(g) for g in names[order[:n]]]


def top_genes(truth, genes: Sequence[str], n: int, by: str = "mean", where: str = "top_genes") -> list[str]:
    """HEG (by="mean": highest mean expression) or HVG (by="var": highest variance) of `truth`.

    The paper chooses these on each test sample's truth. Ties go to the alphabetically first gene. Asking for
    more genes than there are returns all of them, with a warning, rather than failing a whole evaluation.
    """
    if by not in ("mean", "var"):
        raise input_error(where, f"by must be 'mean' or 'var', got {by!r}")
    if n < 1:
        raise input_error(where, f"number of top genes must be at least 1, got {n}")
    t = _as_matrix(truth, "truth", where)
    if len(genes) != t.shape[1]:
        raise input_error(where, f"{len(genes)} gene names for {t.shape[1]} columns")
    return _top_from_stats(*column_stats(t), genes, n, by, where)


def _top_from_stats(mean, var, genes, n: int, by: str, where: str) -> list[str]:
    if n > len(genes):
        log.warning("%s: top %d %s asked for but only %d genes; using all of them",
                    where, n, "HEG" if by == "mean" else "HVG", len(genes))
    return _rank(mean if by == "mean" else var, genes, n)


def hest_bench_genes(samples: Mapping[str, tuple[object, Sequence[str]]], n: int = 50, min_fraction: float = 0.1,
                     where: str = "hest-bench genes") -> list[str]:
    """HEST-bench's fixed gene list: the n highest-variance genes among those measured in every sample and
    expressed (> 0) in at least `min_fraction` of the spots of *each* sample.

    The 10% rule is applied per sample (not to the pooled spots) so that no sample, and hence no
    leave-one-patient-out test split, gets a gene that is almost never expressed there. The variance is then
    taken over the pooled spots of all samples. Ties go to the alphabetically first gene. Fewer than n
    qualifying genes gives a warning and the shorter list; none is an error.
    """
    if not samples:
        raise input_error(where, "no samples given")
    if n < 1:
        raise input_error(where, f"number of genes must be at least 1, got {n}")
    if not 0.0 <= min_fraction <= 1.0:
        raise input_error(where, f"min_fraction must lie in [0, 1], got {min_fraction}")

    keep: set[str] | None = None
    for name, (matrix, genes) in samples.items():
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            raise input_error(f"{where}: sample {name}", "duplicate gene names")
        n_spots, n_cols = matrix.shape
        if n_cols != len(genes):
            raise input_error(f"{where}: sample {name}", f"{len(genes)} gene names for {n_cols} columns")
        if n_spots == 0:
            raise input_error(f"{where}: sample {name}", "no spots")
        expressed = np.asarray((matrix > 0).sum(axis=0)).ravel()
        passing = {g for g, c in zip(genes, expressed) if c >= min_fraction * n_spots - 1e-9}
        keep = passing if keep is None else keep & passing
    if not keep:
        raise input_error(where, f"no gene is shared by all {len(samples)} samples and expressed in at least "
                                 f"{min_fraction:.0%} of the spots of each")
    shared = sorted(keep)

    # Pooled variance in two passes over the shared columns only (samples may be sparse and wide).
    blocks = []
    for name, (matrix, genes) in samples.items():
        index = {str(g): i for i, g in enumerate(genes)}
        block = matrix[:, [index[g] for g in shared]]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        _check_finite(block, "expression", f"{where}: sample {name}", shared)
        blocks.append(block)
    total = sum(b.shape[0] for b in blocks)
    mean = sum(b.sum(axis=0) for b in blocks) / total
    var = sum(((b - mean) ** 2).sum(axis=0) for b in blocks) / max(total - 1, 1)
    if len(shared) < n:
        log.warning("%s: only %d genes are shared by all samples and expressed in >= %.0f%% of spots of each; "
                    "using all of them instead of %d", where, len(shared), 100 * min_fraction, n)
    return _rank(var, shared, n)


def _scores_frame(protocol, dataset, method, fold, sample, genes, r, reason, mean, var) -> pd.DataFrame:
    return pd.DataFrame({
        "protocol": protocol, "dataset": dataset, "method": method, "fold": int(fold), "sample": str(sample),
        "gene": [str(g) for g in genes], "r": np.asarray(r, dtype=np.float64), "nan_reason": reason,
        "mean_expr": mean, "var_expr": var,
    }, columns=SCORE_COLUMNS)


def _sets_frame(protocol, dataset, fold, sample, sets: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    rows = [(protocol, dataset, int(fold), str(sample), name, str(g)) for name, genes in sets.items() for g in genes]
    return pd.DataFrame(rows, columns=GENE_SET_COLUMNS)


def _check_genes(genes: Sequence[str], n_cols: int, where: str) -> list[str]:
    genes = [str(g) for g in genes]
    if len(genes) != n_cols:
        raise input_error(where, f"{len(genes)} gene names for {n_cols} columns")
    if len(set(genes)) != len(genes):
        raise input_error(where, "duplicate gene names")
    return genes


def _checked_pair(truth, pred, genes: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Truth and prediction as float64 spots x genes of one shape, finite, with unique gene names."""
    t = _as_matrix(truth, "truth", where)
    p = _as_matrix(pred, "predictions", where)
    genes = _check_genes(genes, t.shape[1], where)
    if t.shape != p.shape:
        raise input_error(where, f"truth has shape {t.shape} but predictions have shape {p.shape}")
    _check_finite(t, "truth", where, genes)
    _check_finite(p, "predictions", where, genes)
    return t, p, genes


def score_paper_protocol(truth, pred, genes: Sequence[str], spot_samples: Sequence[str], *, dataset: str,
                         method: str, fold: int, marker_genes: Sequence[str] = (),
                         heg_hvg_sizes: Sequence[int] = (50, 150, 250),
                         where: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's protocol for one fold: per test sample, r of every gene over that sample's spots, and the
    gene sets chosen on that sample's truth (HEG{n}, HVG{n} for each n, and `marker`).

    A fold may hold several test samples (leave-one-patient-out); `spot_samples` names each spot's sample.
    Marker genes that were not predicted are left out of the marker set with a warning. Returns
    (scores, gene_sets) in the formats of SCORE_COLUMNS and GENE_SET_COLUMNS.
    """
    where = where or f"{dataset}/{method}/fold {fold}"
    t, p, genes = _checked_pair(truth, pred, genes, where)
    spot_samples = np.asarray([str(s) for s in spot_samples], dtype=object)
    if len(spot_samples) != t.shape[0]:
        raise input_error(where, f"{len(spot_samples)} sample labels for {t.shape[0]} spots")

    markers = list(dict.fromkeys(str(g) for g in marker_genes))
    present = set(genes)
    missing = [g for g in markers if g not in present]
    if missing:
        log.warning("%s: %d of %d marker genes were not predicted and are left out: %s",
                    where, len(missing), len(markers), " ".join(missing))
    markers = [g for g in markers if g in present]

    scores, sets = [], []
    for sample in sorted(set(spot_samples)):
        mask = spot_samples == sample
        here = f"{where} sample {sample}"
        if mask.sum() < MIN_TEST_SPOTS:
            log.warning("%s: only %d spots (fewer than %d); its r per gene is noisy but enters the fold's mean with "
                        "the same weight as every other test sample", here, int(mask.sum()), MIN_TEST_SPOTS)
        r, reason = pearson_per_gene(t[mask], p[mask], where=here, genes=genes)
        mean, var = column_stats(t[mask])
        scores.append(_scores_frame("paper", dataset, method, fold, sample, genes, r, reason, mean, var))
        chosen = {}
        for n in heg_hvg_sizes:
            chosen[f"HEG{n}"] = _top_from_stats(mean, var, genes, int(n), "mean", here)
            chosen[f"HVG{n}"] = _top_from_stats(mean, var, genes, int(n), "var", here)
        if markers:
            chosen["marker"] = markers
        sets.append(_sets_frame("paper", dataset, fold, sample, chosen))
    return pd.concat(scores, ignore_index=True), pd.concat(sets, ignore_index=True)


def score_hest_bench(truth, pred, genes: Sequence[str], *, dataset: str, method: str, fold: int,
                     bench_genes: Sequence[str], gene_set: str = "hest50",
                     where: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """HEST-bench for one fold: r of each fixed bench gene over all spots of the test split at once
    (sample "all"), however many samples it holds. A bench gene that was not predicted is an error, since the
    bench genes are chosen among genes every sample has. Returns (scores, gene_sets); the set is `gene_set`.
    """
    where = where or f"{dataset}/{method}/fold {fold}"
    t, p, genes = _checked_pair(truth, pred, genes, where)
    bench = list(dict.fromkeys(str(g) for g in bench_genes))
    if not bench:
        raise input_error(where, "no HEST-bench genes given")
    index = {g: i for i, g in enumerate(genes)}
    missing = [g for g in bench if g not in index]
    if missing:
        raise input_error(where, f"{len(missing)} HEST-bench genes were not predicted: {' '.join(missing[:10])}")
    cols = [index[g] for g in bench]
    r, reason = pearson_per_gene(t[:, cols], p[:, cols], where=where, genes=bench)
    mean, var = column_stats(t[:, cols])
    scores = _scores_frame("hest-bench", dataset, method, fold, "all", bench, r, reason, mean, var)
    return scores, _sets_frame("hest-bench", dataset, fold, "all", {gene_set: bench})
