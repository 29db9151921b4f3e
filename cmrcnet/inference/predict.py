"""Predict the test samples of one fold with a trained model, keeping the truth beside every prediction.

Retrieval models (CMRCNet, BLEEP) embed the test patches with the image tower and every training spot's
expression with the gene tower, then average the expression of the top-k training spots (one search for the
largest k; smaller k are prefixes). Regression models (STNet, HisToGene) predict directly; spot-level ones can
average the 8 flips/rotations of each patch (test-time augmentation).

One AnnData per (method, fold): X = truth, one layer per prediction variant (`k50`, `pred`, `tta`, ...),
`uns['labels']` maps each layer to the method label the tables use (`cmrcnet-k50`, `stnet`, `stnet-tta`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmrcnet.data.datasets import apply_dihedral, load_fold
from cmrcnet.errors import input_error
from cmrcnet.io import atomic_path, provenance

log = logging.getLogger("cmrcnet")


def load_trained_model(path: str | Path, device: torch.device, expected_model: str | None = None):
    """Rebuild the model a `best.pt` describes and load its weights, in eval mode.

    With `expected_model` (the method's `model`), a checkpoint of another model is refused before it is built:
    its predictions would be labelled and fingerprinted as the wrong method."""
    from cmrcnet.models import create_model
    from cmrcnet.train import load_checkpoint

    if not Path(path).is_file():
        raise input_error(path, "model checkpoint not found (training not finished?)")
    ckpt = load_checkpoint(path)
    for key in ("model", "model_name", "params", "genes"):
        if key not in ckpt:
            raise input_error(path, f"not a model checkpoint written by `cmrcnet train` (no {key!r})")
    if expected_model is not None and ckpt["model_name"] != expected_model:
        raise input_error(path, f"a {ckpt['model_name']} model (method {ckpt.get('method', '?')}), but the method "
                                f"to predict is a {expected_model} model; give the checkpoint of that method")
    model = create_model(ckpt["model_name"], n_genes=len(ckpt["genes"]), **ckpt["params"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=False)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _embed_images(model, dataset, device, batch_size: int, num_workers: int) -> torch.Tensor:
    out = []
    for batch in _loader(dataset, batch_size, num_workers):
        with _autocast(device):
            out.append(model.embed_image(batch["image"].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _regress_spots(model, dataset, device, batch_size: int, num_workers: int, tta: bool) -> np.ndarray:
    codes = range(8) if tta else (0,)
    out = []
    for batch in _loader(dataset, batch_size, num_workers):
        images = batch["image"].to(device)
        total = 0
        for code in codes:
            with _autocast(device):
                total = total + model.predict({"image": apply_dihedral(images, code)}).float()
        out.append((total / len(codes)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _regress_slides(model, dataset, device) -> np.ndarray:
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        batch = {"image": item["image"][None].to(device), "pos": item["pos"][None].to(device)}
        with _autocast(device):
            out.append(model.predict(batch).float()[0].cpu())
    return torch.cat(out).numpy()


def _test_obs(fold, part):
    """sample, barcode and full-resolution pixel centre of every test spot, in prediction order."""
    import anndata as ad
    import pandas as pd

    frames = []
    for sample, idx in part.items():
        spots = fold.sample(sample)
        adata = ad.read_h5ad(spots.st_path, backed="r")
        try:
            position = {b: i for i, b in enumerate(adata.obs_names)}
            rows = [position[b] for b in spots.barcodes[idx]]
            xy = np.asarray(adata.obsm["spatial"])[rows] if "spatial" in adata.obsm else np.full((len(rows), 2), np.nan)
        finally:
            adata.file.close()
        frames.append(pd.DataFrame({"sample": sample, "barcode": spots.barcodes[idx], "x": xy[:, 0], "y": xy[:, 1]}))
    obs = pd.concat(frames, ignore_index=True)
    obs.index = (obs["sample"] + ":" + obs["barcode"].astype(str)).to_numpy()
    return obs


def upstream_identity(dataset_dir, data) -> dict[str, str]:
    """The identity (`cmrcnet.train.file_identity`) of the gene and fold tables a prediction is made from:
    stored in the prediction file, so that scoring can refuse predictions made from older tables."""
    from cmrcnet.train import file_identity

    return {"genes.tsv": file_identity(data.genes_tsv), "folds.tsv": file_identity(Path(dataset_dir) / "folds.tsv")}


def predict_fold(*, model_path, dataset_dir, fold: int, out_path, method: str, ks=(50,), weighted: bool = False,
                 tta: bool = False, batch_size: int = 256, num_workers: int = 0, device: str | None = None,
                 fingerprint: str | None = None, expected_model: str | None = None) -> dict:
    """Predict fold `fold`'s test samples with the model in `model_path`; write the AnnData to `out_path`."""

    from cmrcnet.train import fingerprint_hash

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_trained_model(model_path, dev, expected_model)
    data = load_fold(dataset_dir, fold)
    if list(ckpt["genes"]) != list(data.genes):
        raise input_error(model_path, f"trained on {len(ckpt['genes'])} genes that differ from {data.genes_tsv}; "
                                      "retrain the model")
    if int(ckpt.get("fold", fold)) != int(fold):
        raise input_error(model_path, f"trained on fold {ckpt['fold']}, asked to predict fold {fold}")
    inputs = upstream_identity(dataset_dir, data)
    trained_on = (ckpt.get("fingerprint") or {}).get("data") or {}
    for name, identity in inputs.items():
        if name in trained_on and trained_on[name] != identity:
            raise input_error(model_path, f"trained on another {name} than {Path(dataset_dir) / name}; retrain "
                                          "the model (rerun the pipeline)")
    test = data.all_spots(data.test_samples)
    truth = data.expression(test)
    layers, labels = {}, {}
    if model.kind == "retrieval":
        from cmrcnet.inference.bank import embed_expression
        from cmrcnet.inference.retrieval import predict_by_retrieval

        reference = data.all_spots(data.train_samples)  # every training spot, validation spots included
        ref_expr = data.expression(reference)
        ks = sorted({int(k) for k in ks})
        if ks[-1] > len(ref_expr):
            raise input_error(f"evaluation.k ({ks[-1]})", f"more neighbours than the {len(ref_expr)} training "
                                                          f"spots of fold {fold}")
        queries = _embed_images(model, data.spot_dataset(test, model.input_size), dev, batch_size, num_workers)
        refs = embed_expression(model, ref_expr, dev, batch_size)
        preds = predict_by_retrieval(queries, refs, ref_expr, ks, weighted=weighted, device=dev)
        for k in ks:
            layers[f"k{k}"], labels[f"k{k}"] = preds[k], f"{method}-k{k}"
    elif model.slide_level:
        layers["pred"], labels["pred"] = _regress_slides(model, data.slide_dataset(test, model.input_size), dev), method
    else:
        dataset = data.spot_dataset(test, model.input_size)
        layers["pred"], labels["pred"] = _regress_spots(model, dataset, dev, batch_size, num_workers, False), method
        if tta:
            layers["tta"], labels["tta"] = _regress_spots(model, dataset, dev, batch_size, num_workers, True), \
                f"{method}-tta"
    info = {"method": method, "model_name": ckpt["model_name"], "kind": model.kind, "fold": int(fold),
            "test_samples": data.test_samples, "train_samples": data.train_samples, "labels": labels,
            "ks": list(ks) if model.kind == "retrieval" else [], "weighted": bool(weighted), "tta": bool(tta),
            "model_path": str(model_path), "best_epoch": ckpt.get("epoch"), "device": str(dev),
            "fingerprint": fingerprint, "inputs": inputs,
            "model_fingerprint": fingerprint_hash(ckpt["fingerprint"]) if ckpt.get("fingerprint") else None}
    result = write_prediction_file(out_path, data, test, truth, layers, info)
    log.info("%s fold %d: %d test spots of %s predicted (%s)", method, fold, result.n_obs,
             ", ".join(data.test_samples), ", ".join(labels.values()))
    return info


def write_prediction_file(out_path, data, test, truth: np.ndarray, layers: dict[str, np.ndarray], info: dict):
    """The prediction file evaluation scores, for a trained model or a probe: X = the test spots' truth, one layer
    per prediction (k50, pred, tta, ...), obs = sample, barcode and pixel centre, uns = labels and `info` with
    provenance. Each layer is checked against the truth first; written atomically. Returns the AnnData."""
    import anndata as ad
    import pandas as pd

    where = f"{info['method']} fold {info['fold']}"
    for name, values in layers.items():
        if values.shape != truth.shape:
            raise RuntimeError(f"{where}: prediction {name} has shape {values.shape}, truth {truth.shape}")
        if not np.isfinite(values).all():
            raise input_error(where, f"prediction {name} contains NaN or infinite values")
    result = ad.AnnData(X=truth.astype(np.float32), obs=_test_obs(data, test), var=pd.DataFrame(index=list(data.genes)),
                        layers={k: v.astype(np.float32) for k, v in layers.items()})
    result.uns["labels"] = info["labels"]
    result.uns["cmrcnet"] = json.dumps({**info, "provenance": provenance()}, default=str)
    with atomic_path(out_path) as tmp:
        result.write_h5ad(tmp)
    return result


def check_k_fits(dataset_dir, fold: int, ks, model_name: str) -> None:
    """Before a retrieval model trains: `evaluation.k` must not exceed the fold's training spots (every training
    spot is a reference), or the whole training would be wasted on a prediction that cannot be made."""
    from cmrcnet.config import RETRIEVAL_MODELS

    if model_name not in RETRIEVAL_MODELS or not ks:
        return
    data = load_fold(dataset_dir, fold)
    n_ref = sum(len(idx) for idx in data.all_spots(data.train_samples).values())
    if max(ks) > n_ref:
        raise input_error(f"evaluation.k ({max(ks)})", f"more neighbours than the {n_ref} training spots of fold "
                                                       f"{fold} ({', '.join(data.train_samples)}); lower evaluation.k")
