"""One probe on one fold, from the embedding cache: the prediction file evaluation scores.

Features come only from the cache files `{embeddings_dir}/{sample}.h5` (`cmrcnet.inference.embed`), matched to the
fold's spots by barcode; targets are the fold's normalised expression (`cmrcnet.data.datasets.load_fold`), the same
truth every other method of the dataset is scored against. The output has the layout of
`cmrcnet.inference.predict.predict_fold`: X = truth, one layer per prediction (`pred`, or `k{k}` for `knn`),
`uns['labels']` and `uns['cmrcnet']` (JSON: method, fold, probe, encoder, what the probe chose, the identity of the
gene and fold tables, provenance).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from cmrcnet.errors import input_error
from cmrcnet.probes.registry import make_probe

log = logging.getLogger("cmrcnet")


def embedding_path(embeddings_dir, sample: str) -> Path:
    return Path(embeddings_dir) / f"{sample}.h5"


def _features(data, part, embeddings_dir, encoder: str, cache: dict) -> np.ndarray:
    """(N, D) float32 features of the spots of `part`, in `data.expression(part)`'s order."""
    from cmrcnet.inference.embed import read_embeddings

    blocks = []
    for sample, idx in part.items():
        path = embedding_path(embeddings_dir, sample)
        if sample not in cache:
            cache[sample] = read_embeddings(path, encoder=encoder)
        emb = cache[sample]
        row_of = {b: i for i, b in enumerate(emb.barcodes)}
        wanted = data.sample(sample).barcodes[idx]
        missing = [b for b in wanted if b not in row_of]
        if missing:
            raise input_error(path, f"no embedding for {len(missing)} of the {len(wanted)} spots of {sample} (first: "
                                    f"{missing[0]!r}); the patches changed since it was made: re-embed the sample")
        blocks.append(emb.values[[row_of[b] for b in wanted]])
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)


def spot_groups(dataset_dir, data, part) -> tuple[np.ndarray, str]:
    """The group of every spot of `part` for the probes' inner splits: its patient when folds.tsv names patients
    for all the part's samples, else its sample."""
    from cmrcnet.data.folds import read_folds

    folds = read_folds(Path(dataset_dir) / "folds.tsv")
    by = "sample"
    name = {s: s for s in part}
    if "patient" in folds.columns:
        patients = folds.dropna(subset=["patient"]).drop_duplicates("sample").set_index("sample")["patient"]
        if all(s in patients.index for s in part):
            name, by = {s: str(patients[s]) for s in part}, "patient"
    return np.concatenate([np.full(len(idx), name[s], dtype=object) for s, idx in part.items()]).astype(str), by


def probe_fold(*, embeddings_dir, dataset_dir, fold, out_path, method: str, probe: str, encoder: str,
               params: dict | None = None, ks=(50,), seed: int = 0, fingerprint: str | None = None) -> dict:
    """Fit probe `probe` (a `make_probe` kind, with `params`) on fold `fold`'s training spots and write the
    predictions of its test spots to `out_path` under the method label `method`.

    `encoder` must be the encoder the cache files were made with (checked in each file). `seed` seeds the probe
    (ridge: the PCA; mlp: initialisation, order, validation groups) unless `params` sets it; `ks` are the
    neighbour counts of a `knn` probe (layers `k{k}`, labels `{method}-k{k}`). Returns the info stored in the file.
    """

    from cmrcnet.data.datasets import load_fold
    from cmrcnet.inference.predict import upstream_identity, write_prediction_file

    params = dict(params or {})
    if probe == "knn":
        params.setdefault("ks", [int(k) for k in ks])
    elif "seed" not in params:
        params["seed"] = int(seed)
    model = make_probe(probe, **params)
    data = load_fold(dataset_dir, fold)
    if not data.test_samples:
        raise input_error(f"{method} fold {fold}", "has no test samples to predict")
    train, test = data.all_spots(data.train_samples), data.all_spots(data.test_samples)
    cache: dict = {}
    X_train = _features(data, train, embeddings_dir, encoder, cache)
    X_test = _features(data, test, embeddings_dir, encoder, cache)
    shas = {s: str(e.attrs.get("weights_sha256")) for s, e in cache.items()}
    if len(set(shas.values())) > 1:
        (first, sha), *rest = sorted(shas.items())
        other = next(s for s, v in rest if v != sha)
        raise input_error(embedding_path(embeddings_dir, other),
                          f"made with other {encoder} weights than {embedding_path(embeddings_dir, first)}; "
                          "re-embed every sample with one set of weights")
    Y_train, truth = data.expression(train), data.expression(test)
    groups, group_by = spot_groups(dataset_dir, data, train)

    start = time.perf_counter()
    model.fit(X_train, Y_train, groups)
    preds = model.predict(X_test)
    seconds = time.perf_counter() - start
    if isinstance(preds, dict):
        layers = {f"k{k}": v for k, v in preds.items()}
        labels = {f"k{k}": f"{method}-k{k}" for k in preds}
    else:
        layers, labels = {"pred": preds}, {"pred": method}
    info = {"method": method, "model_name": f"probe-{probe}", "kind": "probe", "probe": probe, "encoder": encoder,
            "fold": int(fold), "test_samples": data.test_samples, "train_samples": data.train_samples,
            "labels": labels, "ks": list(getattr(model, "ks_", [])), "params": params, "seed": int(seed),
            "probe_info": getattr(model, "info_", {}), "groups": group_by, "n_train": int(len(X_train)),
            "n_features": int(X_train.shape[1]), "fit_seconds": round(seconds, 3),
            "embeddings_dir": str(embeddings_dir), "weights_sha256": next(iter(shas.values()), None),
            "fingerprint": fingerprint, "inputs": upstream_identity(dataset_dir, data)}
    result = write_prediction_file(out_path, data, test, truth, layers, info)
    log.info("%s fold %s: %s probe on %d %s features of %d training spots, %d test spots predicted in %.1f s (%s)",
             method, fold, probe, X_train.shape[1], encoder, len(X_train), result.n_obs, seconds,
             ", ".join(labels.values()))
    return info
