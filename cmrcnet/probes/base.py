"""What every probe shares: input checks and the grouped inner splits the tuned probes validate on."""

from __future__ import annotations

import logging

import numpy as np

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")


def check_features(X, name: str = "X", dims: int | None = None) -> np.ndarray:
    """A finite 2-D float64 array; one-line errors naming `name` otherwise."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise input_error(name, f"expected a 2-D array (spots x features), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool) or np.iscomplexobj(X):
        raise input_error(name, f"expected real numbers, got dtype {X.dtype}")
    X = X.astype(np.float64)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise input_error(name, f"is empty (shape {X.shape})")
    if dims is not None and X.shape[1] != dims:
        raise input_error(name, f"has {X.shape[1]} features, the probe was fitted on {dims}")
    if not np.isfinite(X).all():
        row = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise input_error(name, f"contains NaN or infinite values (first in row {row})")
    return X


def check_fit_inputs(X, Y, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    X = check_features(X, "X")
    Y = check_features(Y, "Y")
    if len(Y) != len(X):
        raise input_error("Y", f"has {len(Y)} rows but X has {len(X)}")
    if X.shape[0] < 2:
        raise input_error("X", f"{X.shape[0]} training spot(s); a probe needs at least 2")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (len(X),):
            raise input_error("groups", f"expected one group per training spot ({len(X)}), got shape {groups.shape}")
    return X, Y, groups


def inner_splits(n: int, groups, n_splits: int, seed: int, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs for an inner cross-validation over `n` spots.

    Grouped (sklearn's GroupKFold over `groups`, no group on both sides) with min(n_splits, number of groups)
    folds when there are at least 2 groups; otherwise a seeded shuffled KFold over spots, with a logged note
    (spots of one sample are correlated, so such a choice is optimistic)."""
    from sklearn.model_selection import GroupKFold, KFold

    labels = np.unique(groups) if groups is not None else np.array([])
    if len(labels) >= 2:
        splitter = GroupKFold(n_splits=min(int(n_splits), len(labels)))
        return [(tr, va) for tr, va in splitter.split(np.zeros(n), groups=groups)]
    k = min(int(n_splits), n)
    log.info("%s: %s; inner %d-fold split over spots instead of groups", what,
             "no groups given" if groups is None else f"only {len(labels)} group", k)
    return [(tr, va) for tr, va in KFold(n_splits=k, shuffle=True, random_state=int(seed)).split(np.zeros(n))]


def mean_pearson(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over genes (columns) of the Pearson correlation between truth and prediction, as HEST-Benchmark
    scores a split; genes constant on either side (no correlation defined) are left out. NaN when none is left."""
    t = truth - truth.mean(axis=0)
    p = pred - pred.mean(axis=0)
    denom = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    ok = denom > 0
    if not ok.any():
        return float("nan")
    return float(np.mean((t * p).sum(axis=0)[ok] / denom[ok]))
