"""scIB batch-effect and conservation metrics of an embedding (scib_metrics), as in HESCAPE's batch analysis.

Every metric is scib_metrics' scaled version, in [0, 1] (ARI: 0 at chance, may dip slightly below), higher is
better:
- batch mixing (samples/slides should not be separable): "silhouette_batch" (scIB batch ASW, 1 - |silhouette|
  of the batches within each label), "ilisi" (scaled median iLISI of the kNN graph);
- label conservation (biology should stay separable), only with `labels`: "silhouette_label" (rescaled ASW of the
  labels), "clisi" (scaled cLISI), "graph_connectivity" (largest connected share of each label's kNN subgraph),
  "nmi" and "ari" (k-means with k = number of labels against the labels).

The kNN graph is exact (sklearn `NearestNeighbors`, Euclidean, each cell its own first neighbour as scib_metrics
expects) rather than pynndescent's approximate one, so the numbers are deterministic and need no seed; `seed`
only seeds the k-means of NMI/ARI. scib_metrics imports jax (seconds), so it is imported on first use, with jax
pinned to the CPU unless JAX_PLATFORMS says otherwise.
"""

from __future__ import annotations

import logging
import numbers
import os

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

from cmrcnet.crossmodal.labels import check_embeddings
from cmrcnet.errors import input_error


def _jax_cache_dir() -> str:
    """Where jax keeps compiled metric kernels between processes: every fold's job compiles the same kernels
    (about 12 s of a 20 s batch-metrics call on 2 cores), so a disk cache pays from the second job on."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cmrcnet", "jax")


def _scib():
    """scib_metrics, imported with jax on the CPU, jax's persistent compilation cache on (unless the user set
    its directory) and without its GPU-probing warnings."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    import jax
    import scib_metrics

    if not jax.config.jax_compilation_cache_dir:  # set here, not by environment: scvi may have imported jax already
        jax.config.update("jax_compilation_cache_dir", _jax_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    return scib_metrics


def _codes(values, name: str, n: int) -> np.ndarray:
    """Integer codes of a per-cell categorical (batch or label); missing values are an error."""
    values = pd.Series(np.asarray(values, dtype=object) if not isinstance(values, pd.Series) else values.to_numpy())
    if values.shape != (n,):
        raise input_error(name, f"expected {n} entries (one per embedding row), got shape {values.shape}")
    if values.isna().any():
        raise input_error(name, f"missing value (None/NaN) in row {int(np.argmax(values.isna().to_numpy()))}")
    codes = pd.Categorical(values.astype(str)).codes.astype(np.int64)
    if np.unique(codes).size < 2:
        raise input_error(name, "only one distinct value: the metric needs at least 2")
    return codes


def _neighbours(x: np.ndarray, n_neighbors: int):
    """Exact Euclidean kNN (self included) as scib_metrics' NeighborsResults."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def _check_neighbours(n_neighbors, n_cells: int) -> int:
    """An error, not a silent clamp, when k >= the number of cells: k changes the metric's value."""
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral) or n_neighbors < 2:
        raise input_error("n_neighbors", f"must be an integer >= 2, got {n_neighbors!r}")
    if n_neighbors >= n_cells:
        raise input_error("n_neighbors", f"{n_neighbors} must be smaller than the number of cells ({n_cells})")
    return int(n_neighbors)


def _kmeans_nmi_ari(scib, x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """`scib_metrics.nmi_ari_cluster_labels_kmeans` with the seed passed to its k-means (it fixes seed 0)."""
    # a copy: KMeans.fit centres its input in place and adds the mean back (rounding), and x may be the caller's
    clusters = scib.utils.KMeans(n_clusters=int(np.unique(labels).size), seed=seed).fit(x.copy()).labels_
    return {"nmi": float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic")),
            "ari": float(adjusted_rand_score(labels, clusters))}


def batch_metrics(embeddings, batch, labels=None, *, n_neighbors: int = 15, seed: int = 0) -> dict[str, float]:
    """scIB metrics of `embeddings` (cells x dims) for `batch` (>= 2 batches) and optional `labels` (>= 2).

    Keys: "silhouette_batch", "ilisi", and with labels "silhouette_label", "clisi", "graph_connectivity", "nmi",
    "ari" (all in [0, 1] but ARI, which is 0 at chance and can be slightly negative; higher is better; see the
    module docstring). Without labels, silhouette_batch is computed
    with one label for all cells (batch separation over the whole embedding, not within cell types).
    `n_neighbors` (kNN graph for iLISI/cLISI/connectivity, self included) must be below the number of cells.
    """
    x = np.ascontiguousarray(check_embeddings(embeddings), dtype=np.float32)
    n = x.shape[0]
    batch_codes = _codes(batch, "batch", n)
    k = _check_neighbours(n_neighbors, n)
    scib = _scib()
    knn = _neighbours(x, k)
    label_codes = None if labels is None else _codes(labels, "labels", n)
    asw_labels = np.zeros(n, dtype=np.int64) if label_codes is None else label_codes
    out = {
        "silhouette_batch": float(scib.silhouette_batch(x, asw_labels, batch_codes)),
        "ilisi": float(scib.ilisi_knn(knn, batch_codes)),
    }
    if label_codes is not None:
        out["silhouette_label"] = float(scib.silhouette_label(x, label_codes))
        out["clisi"] = float(scib.clisi_knn(knn, label_codes))
        out["graph_connectivity"] = float(scib.graph_connectivity(knn, label_codes))
        out.update(_kmeans_nmi_ari(scib, x, label_codes, seed))
    return out
