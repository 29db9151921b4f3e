"""Frozen-feature retrieval: a test spot's expression is the mean expression of the k training spots whose image
embeddings are most cosine-similar to its own (image-to-image, unlike CMRCNet's image-to-expression retrieval).

The search and the mean are `cmrcnet.inference.retrieval.predict_by_retrieval` (exact top-k, ties by lower
training index): one search for the largest k, smaller k are its prefixes.
"""

from __future__ import annotations

import numpy as np

from cmrcnet.errors import input_error
from cmrcnet.probes.base import check_features, check_fit_inputs


class KNNProbe:
    """`predict` returns {k: (N, G) prediction} for every k of `ks`. `weighted` weighs neighbours by their
    similarity (clipped at 0), as `neighbour_mean` does. Runs on `device` (default: the CPU, for results that do
    not depend on a GPU's rounding)."""

    kind = "knn"

    def __init__(self, ks=(50,), weighted: bool = False, device: str = "cpu"):
        self.ks, self.weighted, self.device = ks, weighted, device

    def fit(self, X, Y, groups=None) -> KNNProbe:
        X, Y, _ = check_fit_inputs(X, Y, groups)
        ks = [self.ks] if isinstance(self.ks, (int, np.integer)) else list(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise input_error("probe ks", f"must be a non-empty list of whole numbers of at least 1, got {self.ks!r}")
        if max(ks) > len(X):
            raise input_error("probe ks", f"{max(ks)} neighbours asked for, but there are only {len(X)} training spots")
        self.ks_ = sorted({int(k) for k in ks})
        self.X_, self.Y_ = X.astype(np.float32), Y
        self.info_ = {"ks": self.ks_, "weighted": bool(self.weighted), "n_references": int(len(X))}
        return self

    def predict(self, X) -> dict[int, np.ndarray]:
        from cmrcnet.inference.retrieval import predict_by_retrieval

        X = check_features(X, "X", self.X_.shape[1]).astype(np.float32)
        preds = predict_by_retrieval(X, self.X_, self.Y_, self.ks_, weighted=bool(self.weighted), device=self.device)
        return {k: np.asarray(v, dtype=np.float64) for k, v in preds.items()}
