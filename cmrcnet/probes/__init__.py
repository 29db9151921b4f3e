"""Probes on frozen image features: what an encoder's embeddings predict of expression, fitted per fold from the
embedding cache (`cmrcnet.inference.embed`) in seconds on the CPU.

- `ridge-hestbench`: HEST-Benchmark's published ridge recipe, exactly (`cmrcnet.probes.ridge`);
- `ridge-cv`: the same pipeline with alpha chosen by an inner cross-validation grouped by sample or patient;
- `mlp`: one hidden layer, early stopping on held-out groups (`cmrcnet.probes.mlp`);
- `knn`: image-to-image cosine retrieval among the training spots, one prediction per k (`cmrcnet.probes.knn`).

Every probe has `.fit(X, Y, groups=None)` and `.predict(X)` (an (N, G) array; `knn`: {k: (N, G) array}) and,
after fitting, `.info_` (what it chose: alpha, epochs, ...). `probe_fold` runs one on a fold and writes the
prediction file that evaluation scores.
"""

from __future__ import annotations

from cmrcnet.probes.fold import probe_fold
from cmrcnet.probes.knn import KNNProbe
from cmrcnet.probes.mlp import MLPProbe
from cmrcnet.probes.registry import PROBES, make_probe, probe_params
from cmrcnet.probes.ridge import RidgeCV, RidgeHestBench

__all__ = ["PROBES", "KNNProbe", "MLPProbe", "RidgeCV", "RidgeHestBench", "make_probe", "probe_fold", "probe_params"]
