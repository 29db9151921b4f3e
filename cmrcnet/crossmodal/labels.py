"""Linear probes that ask whether embeddings carry a label (tissue region, mutation status), scored out of fold.

Spots of one sample (or patient) share slide-level signal (staining, batch) that a probe could learn in place of
the label, so the cross-validation is grouped: no group is in both the training and the test part of a fold
(`GroupKFold`). Every spot is predicted once, by the probe of the fold that held its group out, and the scores
are computed over all these out-of-fold predictions at once.

The probe: StandardScaler -> LogisticRegression(max_iter=2000, class_weight="balanced"), so a rare class is not
ignored. A fold whose training part holds one class only cannot fit it; its test part is predicted as that
class (a constant predictor, the best the training data allow).

Missing labels (None, NaN, "") are dropped before anything else: an unlabelled spot is not evidence.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cmrcnet.errors import input_error


def check_embeddings(embeddings) -> np.ndarray:
    """A 2-D real array without NaN/inf (one-line errors naming `embeddings`); shared by the batch metrics."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise input_error("embeddings", f"expected a 2-D real array (spots x dimensions), got shape {x.shape}, "
                                        f"dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise input_error("embeddings", f"contain NaN or infinite values (first in row {int(np.argmax(bad))})")
    return x


def _missing(values: np.ndarray) -> np.ndarray:
    """True where a label is None, NaN or the empty string."""
    values = np.asarray(values, dtype=object)
    return np.fromiter((v is None or (isinstance(v, str) and v == "") or bool(np.all(pd.isna(v))) for v in values),
                       dtype=bool, count=values.size)


def _n_splits(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
        raise input_error("n_splits", f"must be an integer >= 2, got {value!r}")
    return int(value)


def _probe(seed: int) -> Pipeline:
    return Pipeline([
        ("scale", StandardScaler()),
        ("logreg", LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)),
    ])


def _out_of_fold_proba(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, n_splits: int,
                       seed: int) -> tuple[np.ndarray, int]:
    """Out-of-fold class probabilities (rows x n_classes) for integer labels `y`, and the number of folds.

    Columns follow the class codes 0..n_classes-1 whatever classes a fold's training part holds; a fold trained
    on one class gives that class probability 1.
    """
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise input_error("groups", f"{n_groups} group(s) among the labelled rows: grouped cross-validation needs 2")
    folds = GroupKFold(n_splits=min(n_splits, n_groups))
    proba = np.zeros((len(y), n_classes))
    for train, test in folds.split(x, y, groups):
        present = np.unique(y[train])
        if present.size == 1:
            proba[test, present[0]] = 1.0
            continue
        probe = _probe(seed).fit(x[train], y[train])
        proba[np.ix_(test, probe.classes_)] = probe.predict_proba(x[test])
    return proba, folds.get_n_splits()


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


def _codes(labels: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Integer codes 0..C-1 for the labels, C >= 2."""
    classes, codes = np.unique(labels.astype(str) if labels.dtype == object else labels, return_inverse=True)
    if classes.size < 2:
        raise input_error(where, f"{classes.size} class(es) among the labelled rows: a probe needs at least 2")
    return codes, int(classes.size)


def classify_labels(embeddings, labels, groups, *, n_splits: int = 5, seed: int = 0) -> dict:
    """Balanced accuracy and macro-F1 of a linear probe predicting `labels` from `embeddings`, grouped CV.

    `labels` and `groups` (sample or patient of each row) have one entry per row. Folds:
    `GroupKFold(min(n_splits, number of groups))`. Returns {"balanced_accuracy", "macro_f1", "n_folds",
    "n_classes", "n"} with n the number of labelled rows scored.
    """
    x = check_embeddings(embeddings)
    labels, groups = np.asarray(labels, dtype=object), np.asarray(groups)
    for name, values in (("labels", labels), ("groups", groups)):
        if values.shape != (x.shape[0],):
            raise input_error(name, f"expected {x.shape[0]} entries (one per embedding row), got shape {values.shape}")
    keep = ~_missing(labels)
    if not keep.any():
        raise input_error("labels", "all labels are missing (None, NaN or empty)")
    y, n_classes = _codes(labels[keep], "labels")
    proba, n_folds = _out_of_fold_proba(x[keep], y, groups[keep], n_classes, _n_splits(n_splits), seed)
    return {**_scores(y, proba.argmax(axis=1)), "n_folds": n_folds, "n_classes": n_classes, "n": int(y.size)}


def classify_sample_labels(embeddings, sample_of_spot, sample_labels: dict, *, n_splits: int = 5,
                           seed: int = 0) -> dict:
    """A per-sample label (e.g. MSI/MSS) predicted from spot embeddings, scored per sample and per spot.

    Each spot inherits its sample's label; the probe is cross-validated with groups = samples, and a sample's
    prediction is the argmax of its spots' out-of-fold probabilities averaged. Samples without a label (absent
    from `sample_labels`, or None/NaN/"") are left out. Returns {"balanced_accuracy", "macro_f1", "n_samples"}
    over samples and {"spot_balanced_accuracy", "spot_macro_f1", "spot_n"} over spots, plus "n_folds" and
    "n_classes".
    """
    x = check_embeddings(embeddings)
    samples = np.asarray(sample_of_spot)
    if samples.shape != (x.shape[0],):
        raise input_error("sample_of_spot", f"expected {x.shape[0]} entries (one per embedding row), "
                                            f"got shape {samples.shape}")
    if not isinstance(sample_labels, dict):
        raise input_error("sample_labels", f"expected a dict sample -> label, got {type(sample_labels).__name__}")
    spot_labels = np.array([sample_labels.get(s) for s in samples.tolist()], dtype=object)
    keep = ~_missing(spot_labels)
    if not keep.any():
        raise input_error("sample_labels", "no spot belongs to a sample with a label")
    y, n_classes = _codes(spot_labels[keep], "sample_labels")
    groups = samples[keep]
    proba, n_folds = _out_of_fold_proba(x[keep], y, groups, n_classes, _n_splits(n_splits), seed)
    names, sample_index = np.unique(groups, return_inverse=True)
    mean_proba = np.zeros((names.size, n_classes))
    np.add.at(mean_proba, sample_index, proba)  # sums; the argmax of a sum is that of the mean
    sample_true = np.zeros(names.size, dtype=np.int64)
    sample_true[sample_index] = y
    sample_scores = _scores(sample_true, mean_proba.argmax(axis=1))
    spot_scores = {f"spot_{k}": v for k, v in _scores(y, proba.argmax(axis=1)).items()}
    return {**sample_scores, "n_samples": int(names.size), **spot_scores, "spot_n": int(y.size),
            "n_folds": n_folds, "n_classes": n_classes}
