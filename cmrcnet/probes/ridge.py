"""Linear probes on frozen features: HEST-Benchmark's ridge recipe, and the same pipeline with alpha chosen by an
inner cross-validation grouped by sample or patient.

HEST-Benchmark's recipe, as implemented in `src/hest/bench/benchmark.py` and `src/hest/bench/trainer.py` of
github.com/mahmoodlab/HEST at commit afd42c3 (hest 1.1.1; facts collected in the project's notes, no code copied):

- the training spots of all training samples are pooled; `StandardScaler` (population std, ddof 0) then
  `PCA(n_components=256, random_state=seed)` are fitted on the TRAINING features only and applied to both sides;
  the PCA output is cast to float32 (HEST turns it into a `torch.Tensor`);
- `Ridge(solver="lsqr", alpha=100 / (P * G), fit_intercept=False, max_iter=1000, random_state=seed)` with P the
  number of features AFTER the PCA (256) and G the number of genes (50): alpha = 0.0078125 for every encoder;
  sklearn's default `tol` is used, so lsqr stops at a relative residual of about 1e-4 rather than at the
  closed-form solution (predictions differ from it by about 1e-4 relative; `tol` can be lowered here);
- HEST's default seed is 1.

One difference, forced: HEST's PCA(256) fails when a split has fewer than 256 training spots or features; here the
component count is capped at min(n_spots, n_features) (the design's rule), and alpha uses the capped P.
"""

from __future__ import annotations

import logging

import numpy as np

from cmrcnet.errors import input_error
from cmrcnet.probes.base import check_features, check_fit_inputs, inner_splits, mean_pearson

log = logging.getLogger("cmrcnet")

HEST_N_COMPONENTS = 256
HEST_MAX_ITER = 1000
HEST_SEED = 1
# ridge-cv's default grid: from far below HEST's fixed alpha (0.0078 with 256 components and 50 genes) to strong
# shrinkage (the PCA features' squared norms are n_spots x their variance, about 1e2 to 1e6 for typical folds).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 7, 21))


def _components(n_components, n: int, d: int) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise input_error("probe n_components", f"must be a whole number of at least 1, got {n_components!r}")
    return int(min(n_components, n, d))


class _ScalerPCA:
    """StandardScaler -> PCA, fitted on the training features only; the output is float32 as in HEST."""

    def __init__(self, n_components: int, seed: int):
        self.n_components, self.seed = n_components, seed

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        X = X.astype(np.float32)  # HEST reads the cached embeddings as float32 tensors
        self.p_ = _components(self.n_components, *X.shape)
        self.scaler_ = StandardScaler()
        self.pca_ = PCA(n_components=self.p_, random_state=int(self.seed))
        return self.pca_.fit_transform(self.scaler_.fit_transform(X)).astype(np.float32)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return self.pca_.transform(self.scaler_.transform(X.astype(np.float32))).astype(np.float32)


class RidgeHestBench:
    """HEST-Benchmark's ridge probe (see the module docstring for the source): StandardScaler -> PCA(256, capped at
    min(n_spots, n_features)) -> Ridge(alpha = 100 / (P x G), fit_intercept=False, solver="lsqr", max_iter=1000).

    `alpha` overrides the formula (HEST itself ignores its alpha argument); `tol` is sklearn's (None: its
    default, as HEST). After `fit`, `info_` records the alpha and component count used."""

    kind = "ridge-hestbench"

    def __init__(self, n_components: int = HEST_N_COMPONENTS, alpha: float | None = None,
                 max_iter: int = HEST_MAX_ITER, tol: float | None = None, seed: int = HEST_SEED):
        self.n_components, self.alpha, self.max_iter, self.tol, self.seed = n_components, alpha, max_iter, tol, seed

    def fit(self, X, Y, groups=None) -> RidgeHestBench:
        from sklearn.linear_model import Ridge

        X, Y, _ = check_fit_inputs(X, Y, groups)
        self.pipe_ = _ScalerPCA(self.n_components, self.seed)
        Z = self.pipe_.fit_transform(X)
        p, g = Z.shape[1], Y.shape[1]
        alpha = 100.0 / (p * g) if self.alpha is None else float(self.alpha)
        if not alpha > 0:
            raise input_error("probe alpha", f"must be above 0, got {self.alpha!r}")
        extra = {} if self.tol is None else {"tol": float(self.tol)}
        self.ridge_ = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=int(self.max_iter),
                            random_state=int(self.seed), **extra)
        self.ridge_.fit(Z, Y.astype(np.float32))
        self.dims_ = X.shape[1]
        self.info_ = {"alpha": alpha, "n_components": p, "alpha_rule": "100/(P*G)" if self.alpha is None else "given"}
        return self

    def predict(self, X) -> np.ndarray:
        X = check_features(X, "X", self.dims_)
        return np.asarray(self.ridge_.predict(self.pipe_.transform(X)), dtype=np.float64).reshape(len(X), -1)


def _ridge_path(Z: np.ndarray, Y: np.ndarray, alphas) -> list[np.ndarray]:
    """Exact ridge coefficients (no intercept) for every alpha from one SVD: W = V diag(s / (s^2 + a)) U'Y."""
    U, s, Vt = np.linalg.svd(Z.astype(np.float64), full_matrices=False)
    UtY = U.T @ Y
    return [Vt.T @ ((s / (s * s + a))[:, None] * UtY) for a in alphas]


class RidgeCV:
    """The same StandardScaler -> PCA pipeline, with alpha chosen from a log grid by an inner cross-validation
    grouped by `groups` (samples or patients: sklearn's GroupKFold with min(n_splits, groups) folds, so no group is
    on both sides); a seeded shuffled KFold over spots, with a logged note, when there are fewer than 2 groups.

    Each inner fold refits the scaler and PCA on its own training part, solves the ridge exactly for every alpha
    (one SVD), and scores the mean over genes of the Pearson correlation on its validation part (the benchmark's
    metric). The alpha with the best mean score over the inner folds wins (the smaller on a tie), and the pipeline
    is refitted on all training spots with it, solved exactly. `info_` records the chosen alpha and every score."""

    kind = "ridge-cv"

    def __init__(self, alphas=DEFAULT_ALPHAS, n_splits: int = 5, n_components: int = HEST_N_COMPONENTS,
                 seed: int = HEST_SEED):
        self.alphas, self.n_splits, self.n_components, self.seed = alphas, n_splits, n_components, seed

    def _grid(self) -> np.ndarray:
        alphas = np.sort(np.asarray(self.alphas, dtype=np.float64).reshape(-1))
        if alphas.size == 0 or not (np.isfinite(alphas).all() and (alphas > 0).all()):
            raise input_error("probe alphas", f"must be a non-empty list of positive numbers, got {self.alphas!r}")
        return alphas

    def fit(self, X, Y, groups=None) -> RidgeCV:
        X, Y, groups = check_fit_inputs(X, Y, groups)
        alphas = self._grid()
        if isinstance(self.n_splits, bool) or not isinstance(self.n_splits, (int, np.integer)) or self.n_splits < 2:
            raise input_error("probe n_splits", f"must be a whole number of at least 2, got {self.n_splits!r}")
        rows = []
        if len(alphas) > 1:
            for train, val in inner_splits(len(X), groups, self.n_splits, self.seed, "ridge-cv"):
                pipe = _ScalerPCA(self.n_components, self.seed)
                Z_train, Z_val = pipe.fit_transform(X[train]), pipe.transform(X[val]).astype(np.float64)
                rows.append([mean_pearson(Y[val], Z_val @ W) for W in _ridge_path(Z_train, Y[train], alphas)])
        scores = np.array(rows, dtype=np.float64).reshape(len(rows), len(alphas))
        # mean over inner folds; folds where no gene varies (NaN) are left out, an alpha never scored ranks last
        mean = np.array([np.nanmean(c) if np.isfinite(c).any() else -np.inf for c in scores.T])
        if rows and not np.isfinite(mean).any():
            log.warning("ridge-cv: no inner fold could be scored (no gene varies); alpha %g, the smallest", alphas[0])
        best = int(np.argmax(mean))  # the first maximum: the smaller alpha on a tie
        self.alpha_ = float(alphas[best])
        self.pipe_ = _ScalerPCA(self.n_components, self.seed)
        Z = self.pipe_.fit_transform(X)
        self.coef_ = _ridge_path(Z, Y, [self.alpha_])[0]
        self.dims_ = X.shape[1]
        self.info_ = {"alpha": self.alpha_, "n_components": Z.shape[1], "alphas": [float(a) for a in alphas],
                      "inner_folds": len(rows), "cv_scores": [float(v) if np.isfinite(v) else None for v in mean]}
        return self

    def predict(self, X) -> np.ndarray:
        X = check_features(X, "X", self.dims_)
        return self.pipe_.transform(X).astype(np.float64) @ self.coef_
