"""Summaries of the long `scores` table: mean +- sd over folds per gene set, bootstrap CIs, paired Wilcoxon
tests between methods, and the best-predicted genes (the paper's Table 3).

Averaging follows the paper: the mean r over a gene set's genes per (fold, test sample), then the mean over a
fold's test samples, then mean and sd over folds. An undefined r (NaN: constant truth or prediction) counts as 0
in every mean (`undefined_r="zero"`, the authors' evaluation) or is left out (`"omit"`); either way it stays NaN
in the scores table and is counted (n_nan), and every summary names the rule it used (column undefined_r).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

from cmrcnet.errors import input_error
from cmrcnet.evaluation.metrics import GENE_SET_COLUMNS, SCORE_COLUMNS

log = logging.getLogger("cmrcnet")

GROUP = ["protocol", "dataset", "method", "gene_set"]
SAMPLE_KEY = ["protocol", "dataset", "method", "fold", "sample"]
SUMMARY_COLUMNS = GROUP + ["mean_r", "sd_r", "n_folds", "n_samples", "n_genes", "n_nan", "ci_low", "ci_high",
                           "undefined_r"]
WILCOXON_COLUMNS = ["protocol", "dataset", "gene_set", "method_a", "method_b", "n_pairs", "mean_r_a", "mean_r_b",
                    "median_diff", "statistic", "p_value", "p_holm"]
BEST_COLUMNS = ["protocol", "dataset", "method", "rank", "gene", "mean_r", "sd_r", "n_folds"]
NAN_COLUMNS = ["protocol", "dataset", "method", "fold", "sample", "nan_reason", "n_genes"]


UNDEFINED_R = ("zero", "omit")


def effective_r(r, undefined_r: str = "zero"):
    """r as it enters a mean: NaN (undefined) as 0 under `zero` (the authors' evaluation), kept NaN (and so
    left out of nan-skipping means) under `omit`."""
    if undefined_r not in UNDEFINED_R:
        raise input_error("evaluation.undefined_r", f"unknown value {undefined_r!r}; use zero or omit")
    return r.fillna(0.0) if undefined_r == "zero" else r


def _require(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise input_error(name, f"missing columns {', '.join(missing)}")


def _check_scores(scores: pd.DataFrame) -> None:
    _require(scores, SCORE_COLUMNS[:8], "scores")
    dup = scores.duplicated(SAMPLE_KEY + ["gene"])
    if dup.any():
        first = scores.loc[dup.idxmax(), SAMPLE_KEY + ["gene"]].to_dict()
        raise input_error("scores", f"{int(dup.sum())} duplicate rows (first: {first})")


def scores_in_sets(scores: pd.DataFrame, gene_sets: pd.DataFrame) -> pd.DataFrame:
    """Each score row once per gene set its gene belongs to on that (fold, sample): columns protocol, dataset,
    method, fold, sample, gene_set, gene, r. Gene sets come without a method (they are chosen on the truth), so
    copies written once per method are merged; set genes without a score are dropped with a warning."""
    _check_scores(scores)
    _require(gene_sets, GENE_SET_COLUMNS, "gene_sets")
    # fold and sample as int and str on both sides, so tables read back from CSV still join.
    scores = scores.astype({"fold": int, "sample": str})
    sets = gene_sets[GENE_SET_COLUMNS].astype({"fold": int, "sample": str}).drop_duplicates()
    keys = scores[SAMPLE_KEY].drop_duplicates()
    expected = keys.merge(sets, on=["protocol", "dataset", "fold", "sample"])
    merged = expected.merge(scores[SAMPLE_KEY + ["gene", "r"]], on=SAMPLE_KEY + ["gene"], how="left", indicator=True)
    unscored = merged["_merge"] == "left_only"
    if unscored.any():
        log.warning("scores: %d gene-set genes have no score and are left out (e.g. %s)", int(unscored.sum()),
                    merged.loc[unscored, SAMPLE_KEY + ["gene_set", "gene"]].iloc[0].to_dict())
    out = merged.loc[~unscored, SAMPLE_KEY + ["gene_set", "gene", "r"]]
    return out.astype({"r": np.float64}).reset_index(drop=True)


def _hierarchy_weights(labels: pd.DataFrame) -> pd.Series:
    """Weight of each (fold, sample) in the mean of fold means of sample means: 1 / (n_folds * n_samples in
    that fold). Only (fold, sample) with at least one finite r are passed in."""
    pairs = labels[["fold", "sample"]].drop_duplicates()
    per_fold = pairs.groupby("fold")["sample"].transform("size")
    w = 1.0 / (pairs["fold"].nunique() * per_fold)
    return pd.Series(w.to_numpy(), index=pd.MultiIndex.from_frame(pairs))


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95, groups=None,
                 weights: Mapping | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of a (weighted) mean, seeded so reruns give the same interval.

    Without `groups`: resample the values with replacement and take the mean. With `groups` (one label per
    value): resample within each group (stratified) and take sum_g weights[g] * mean(group g), weights
    defaulting to equal. `summarise` passes (fold, sample) groups with the weights of the paper's fold/sample
    averaging, so the interval is centred on mean_r and reflects which genes made up each set; the spread over
    folds is sd_r. NaN values are dropped (groups left empty are dropped and the weights renormalised).
    """
    if n_boot < 1:
        raise input_error("bootstrap", f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise input_error("bootstrap", f"level must lie in (0, 1), got {level}")
    values = np.asarray(values, dtype=np.float64).ravel()
    labels = [0] * len(values) if groups is None else list(groups)
    if len(labels) != len(values):
        raise input_error("bootstrap", f"{len(labels)} group labels for {len(values)} values")
    finite = np.isfinite(values)
    kept = [g for g, f in zip(labels, finite) if f]
    values = values[finite]
    if len(values) == 0:
        return float("nan"), float("nan")
    unique = list(dict.fromkeys(kept))
    index = {g: i for i, g in enumerate(unique)}
    codes = np.array([index[g] for g in kept])
    w = np.array([1.0 if weights is None else float(weights[g]) for g in unique])
    w = w / w.sum()
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for i, wg in enumerate(w):
        v = values[codes == i]
        boot += wg * v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarise(scores: pd.DataFrame, gene_sets: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, undefined_r: str = "zero") -> pd.DataFrame:
    """One row per (protocol, dataset, method, gene_set), columns SUMMARY_COLUMNS.

    mean_r / sd_r: mean and sd (ddof=1; NaN with one fold) over folds of the fold means, each the mean over the
    fold's test samples of the mean r over the set's genes; an undefined r counts as 0 (`undefined_r="zero"`)
    or is left out (`"omit"`). n_folds: folds with at least one r in the mean. n_samples: (fold, sample) pairs.
    n_genes: median set size per sample (undefined r included). n_nan: undefined r in total. ci_low / ci_high:
    stratified bootstrap (see bootstrap_ci) of mean_r. undefined_r: the rule used.
    """
    long = scores_in_sets(scores, gene_sets)
    if long.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    long = long.assign(undefined=long["r"].isna(), r=effective_r(long["r"], undefined_r))
    rows = []
    for key, grp in long.groupby(GROUP, sort=True):
        per_sample = grp.groupby(["fold", "sample"]).agg(n_genes=("r", "size"), n_nan=("undefined", "sum"),
                                                         mean_r=("r", "mean"))
        per_fold = per_sample.groupby(level="fold")["mean_r"].mean().dropna()
        finite = grp[grp["r"].notna()]
        if finite.empty:
            ci = (np.nan, np.nan)
        else:
            weights = _hierarchy_weights(finite)
            labels = list(zip(finite["fold"], finite["sample"]))
            ci = bootstrap_ci(finite["r"].to_numpy(), n_boot=n_boot, seed=seed, level=level, groups=labels,
                              weights=dict(zip(weights.index, weights.to_numpy())))
        rows.append({
            **dict(zip(GROUP, key)),
            "mean_r": float(per_fold.mean()) if len(per_fold) else np.nan,
            "sd_r": float(per_fold.std(ddof=1)) if len(per_fold) > 1 else np.nan,
            "n_folds": len(per_fold), "n_samples": len(per_sample),
            "n_genes": float(per_sample["n_genes"].median()), "n_nan": int(per_sample["n_nan"].sum()),
            "ci_low": ci[0], "ci_high": ci[1], "undefined_r": undefined_r,
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error); NaN p-values stay NaN and do not count as tests."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def wilcoxon_between_methods(scores: pd.DataFrame, gene_sets: pd.DataFrame, gene_set: str | Iterable[str] | None = None,
                             methods: Sequence[str] | None = None, undefined_r: str = "zero") -> pd.DataFrame:
    """Paired Wilcoxon signed-rank test (scipy defaults: two-sided, zero differences dropped) for each pair of
    methods, per (protocol, dataset, gene set); columns WILCOXON_COLUMNS.

    Pairs are (fold, sample, gene) scored by both methods (n_pairs), an undefined r as 0 (`undefined_r="zero"`)
    or the pair dropped (`"omit"`); with several test samples a gene contributes once per sample. median_diff
    is median(r_a - r_b). p_holm adjusts over the method pairs within each (protocol, dataset, gene_set). No
    pairs, or all differences zero: statistic and p are NaN.
    """
    long = scores_in_sets(scores, gene_sets)
    long["r"] = effective_r(long["r"], undefined_r)
    if gene_set is not None:
        wanted = [gene_set] if isinstance(gene_set, str) else list(gene_set)
        long = long[long["gene_set"].isin(wanted)]
    if methods is not None:
        long = long[long["method"].isin(list(methods))]
    rows = []
    for (protocol, dataset, gs), grp in long.groupby(["protocol", "dataset", "gene_set"], sort=True):
        wide = grp.pivot(index=["fold", "sample", "gene"], columns="method", values="r")
        family = []
        for a, b in combinations(sorted(wide.columns), 2):
            x, y = wide[a].to_numpy(), wide[b].to_numpy()
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            d = x - y
            stat = p = np.nan
            if len(d) and np.any(d != 0):
                res = sps.wilcoxon(x, y)
                stat, p = float(res.statistic), float(res.pvalue)
            family.append({
                "protocol": protocol, "dataset": dataset, "gene_set": gs, "method_a": a, "method_b": b,
                "n_pairs": int(ok.sum()), "mean_r_a": float(x.mean()) if len(x) else np.nan,
                "mean_r_b": float(y.mean()) if len(y) else np.nan,
                "median_diff": float(np.median(d)) if len(d) else np.nan, "statistic": stat, "p_value": p,
            })
        for row, adj in zip(family, holm_adjust([r["p_value"] for r in family])):
            row["p_holm"] = float(adj)
        rows += family
    return pd.DataFrame(rows, columns=WILCOXON_COLUMNS)


def best_genes(scores: pd.DataFrame, n: int = 5, undefined_r: str = "zero") -> pd.DataFrame:
    """The paper's Table 3: the n best-predicted genes per (protocol, dataset, method), ranked by mean r (mean
    over folds of the mean over each fold's test samples, an undefined r as 0 or left out as `undefined_r`
    says; ties by gene name). Columns BEST_COLUMNS; sd_r is over folds (NaN with one fold), n_folds counts
    folds with an r in the mean."""
    _check_scores(scores)
    if n < 1:
        raise input_error("best_genes", f"n must be at least 1, got {n}")
    scores = scores.assign(r=effective_r(scores["r"], undefined_r))
    keys = ["protocol", "dataset", "method", "gene"]
    per_fold = scores.groupby(keys + ["fold"])["r"].mean().dropna().reset_index()
    per_gene = per_fold.groupby(keys)["r"].agg(mean_r="mean", sd_r=lambda r: r.std(ddof=1), n_folds="size").reset_index()
    per_gene = per_gene.sort_values(["protocol", "dataset", "method", "mean_r", "gene"],
                                    ascending=[True, True, True, False, True])
    top = per_gene.groupby(["protocol", "dataset", "method"], sort=False).head(n).copy()
    top["rank"] = top.groupby(["protocol", "dataset", "method"], sort=False).cumcount() + 1
    return top[BEST_COLUMNS].reset_index(drop=True)


def count_nan(scores: pd.DataFrame) -> pd.DataFrame:
    """How many genes got no r, and why, per (protocol, dataset, method, fold, sample): columns NAN_COLUMNS.
    Only groups with at least one NaN appear; for logs and the report next to the summary's n_nan."""
    _check_scores(scores)
    nan = scores[scores["r"].isna()].copy()
    nan["nan_reason"] = nan["nan_reason"].fillna("").replace("", "unknown")
    out = nan.groupby(SAMPLE_KEY + ["nan_reason"]).size().rename("n_genes").reset_index()
    return out[NAN_COLUMNS]
