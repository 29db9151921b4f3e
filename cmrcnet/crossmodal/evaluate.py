"""One grid cell on one fold: the judgements HESCAPE asks for, beyond the tables every method gets.

- Retrieval between the modalities over the whole test split (both directions; recall@k, median and mean rank of
  the true partner among every test spot), and HESCAPE's in-batch value at its batch size, labelled as such.
- Expression prediction from the aligned image embedding: the paper's retrieval (the mean expression of the k
  nearest training spots) and a probe (HEST-Benchmark's ridge by default) fitted on the training spots' image
  embeddings; each scored by the paper's protocol (mean r over each test sample's 50 most expressed genes) and by
  HEST-bench's (mean r over its 50 genes on the whole test split).
- Label classification (spot labels, e.g. tissue type; sample labels, e.g. a mutation status) by a linear probe
  with grouped cross-validation over the samples, and batch effects (scIB metrics), both on the embeddings of
  every sample by this fold's model: a leave-one-sample-out test split holds a single sample, which has no batch
  to mix and no group to hold out. The model never saw a label; it saw the training samples' image-expression
  pairs, as any pretrained encoder saw its own data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cmrcnet.errors import input_error

log = logging.getLogger("cmrcnet")

JOINT_SPOTS = 1500  # spots (per modality) kept for the UMAP of the joint embedding


def _embed(model, data, part, device, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, expression embeddings) of the spots of `part`, L2-normalised, float32."""
    from cmrcnet.inference.bank import embed_expression
    from cmrcnet.inference.predict import _embed_images

    with torch.inference_mode():
        images = _embed_images(model, data.spot_dataset(part, model.input_size), device, batch_size, 0)
        expression = embed_expression(model, data.expression(part), device, batch_size)
    return images.numpy().astype(np.float32), expression.numpy().astype(np.float32)


def _spot_labels(data, part, column: str | None) -> np.ndarray | None:
    """Each spot's label from the obs column `column` of its sample's expression file (None: no such column)."""
    import anndata as ad

    if not column:
        return None
    out = []
    for sample, idx in part.items():
        obs = ad.read_h5ad(data.st_path(sample), backed="r").obs
        if column not in obs.columns:
            log.info("%s: no obs column %r; spot labels left out", data.st_path(sample), column)
            return None
        labels = obs[column].astype(object).reindex(data.sample(sample).barcodes[idx])
        out.append(np.asarray(labels, dtype=object))
    return np.concatenate(out)


def sample_labels(samples: list[str], labels_cfg: dict, metadata_dir: str | Path | None) -> dict:
    """Per-sample labels: the config's `labels.sample` map, else `labels.sample_metadata_key` of each sample's
    metadata JSON (samples without one are left out)."""
    given = dict(labels_cfg.get("sample") or {})
    key = labels_cfg.get("sample_metadata_key")
    if given or not key or metadata_dir is None:
        return {s: given[s] for s in samples if s in given}
    out = {}
    for s in samples:
        path = Path(metadata_dir) / f"{s}.json"
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value not in (None, ""):
                out[s] = value
    return out


def _prediction_scores(truth, pred, genes, spot_samples, *, dataset, method, fold, bench_genes) -> dict:
    """Mean r by the paper's protocol (HEG-50 per test sample, then the mean over samples) and by HEST-bench's."""
    from cmrcnet.evaluation.metrics import score_hest_bench, score_paper_protocol

    scores, sets = score_paper_protocol(truth, pred, genes, spot_samples, dataset=dataset, method=method, fold=fold,
                                        heg_hvg_sizes=(50,))
    heg = sets[sets["gene_set"] == "HEG50"][["sample", "gene"]]
    per_sample = scores.merge(heg, on=["sample", "gene"]).groupby("sample")["r"].mean()
    out = {"paper_heg50_r": float(per_sample.mean()), "paper_heg50_r_by_sample": per_sample.to_dict()}
    if bench_genes:
        bench, _ = score_hest_bench(truth, pred, genes, dataset=dataset, method=method, fold=fold,
                                    bench_genes=bench_genes)
        out["hest_bench_r"] = float(bench["r"].mean())
    return out


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def evaluate_cell_fold(*, model_path, dataset_dir, fold: int, out_path, joint_path, method: str, block: dict,
                       k: int, dataset: str, patients: dict | None = None, bench_genes: list[str] | None = None,
                       metadata_dir=None, seed: int = 0, batch_size: int = 256, device: str | None = None) -> dict:
    """Score one grid cell on one fold; writes `out_path` (JSON, atomically) and `joint_path` (the UMAP's input:
    a subsample of every sample's image and expression embeddings with their sample and label, .npz)."""
    from cmrcnet.crossmodal.batch_effects import batch_metrics
    from cmrcnet.crossmodal.labels import classify_labels, classify_sample_labels
    from cmrcnet.crossmodal.retrieval_metrics import in_batch_retrieval, pair_ranks, whole_split_retrieval
    from cmrcnet.data.datasets import load_fold
    from cmrcnet.inference.predict import load_trained_model
    from cmrcnet.inference.retrieval import predict_by_retrieval
    from cmrcnet.io import atomic_path, provenance, write_json
    from cmrcnet.probes import make_probe

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_trained_model(model_path, dev, "crossmodal")
    data = load_fold(dataset_dir, fold)
    if list(ckpt["genes"]) != list(data.genes):
        raise input_error(model_path, f"trained on other genes than {data.genes_tsv}; retrain the model")
    train, test = data.all_spots(data.train_samples), data.all_spots(data.test_samples)
    if sum(len(i) for i in test.values()) < 2:
        raise input_error(f"{dataset} fold {fold}", "fewer than 2 test spots: no retrieval to score")
    img_test, expr_test = _embed(model, data, test, dev, batch_size)
    img_train, expr_train = _embed(model, data, train, dev, batch_size)

    ks = [int(x) for x in block["ks"]]
    cell = {key: ckpt["params"].get(key) for key in ("image", "image_mode", "gene", "loss")}
    result = {"method": method, "dataset": dataset, "fold": int(fold), "cell": cell, "test_samples": data.test_samples,
              "train_samples": data.train_samples, "n_test": int(len(img_test))}
    result["retrieval"] = whole_split_retrieval(img_test, expr_test, ks)
    result["ranks"] = {d: r.tolist() for d, r in pair_ranks(img_test, expr_test).items()}
    result["inbatch"] = in_batch_retrieval(img_test, expr_test, int(block["inbatch_batch_size"]), ks, seed=seed)

    truth, train_expr = data.expression(test), data.expression(train)
    spot_samples = np.concatenate([np.full(len(i), s, dtype=object) for s, i in test.items()])
    retrieved = predict_by_retrieval(img_test, expr_train, train_expr, [k], device=dev)[k]
    probe = make_probe(block["probe"]).fit(img_train, train_expr)
    context = {"dataset": dataset, "method": method, "fold": int(fold), "bench_genes": bench_genes}
    result["expression"] = {
        f"retrieval_k{k}": _prediction_scores(truth, retrieved, data.genes, spot_samples, **context),
        block["probe"]: _prediction_scores(truth, probe.predict(img_test), data.genes, spot_samples, **context),
    }

    every = {**train, **test}
    img_all, expr_all = np.concatenate([img_train, img_test]), np.concatenate([expr_train, expr_test])
    sample_of = np.concatenate([np.full(len(i), s, dtype=object) for s, i in every.items()])
    batch_of = sample_of if block["batch_key"] == "sample" else np.array(
        [(patients or {}).get(s, s) for s in sample_of], dtype=object)
    spot_labels = _spot_labels(data, every, block["labels"].get("spot"))
    labels_out = {}
    if spot_labels is not None:
        keep = np.array([v is not None and v == v and v != "" for v in spot_labels])
        labels_out["spot"] = {m: classify_labels(emb[keep], spot_labels[keep], sample_of[keep], seed=seed)
                              for m, emb in (("image", img_all), ("expression", expr_all))}
    by_sample = sample_labels(list(every), block["labels"], metadata_dir)
    if len(set(map(str, by_sample.values()))) >= 2:
        labels_out["sample"] = {m: classify_sample_labels(emb, sample_of, by_sample, seed=seed)
                                for m, emb in (("image", img_all), ("expression", expr_all))}
    result["labels"] = labels_out

    pick = _subsample(len(img_all), 5000, seed)
    batch = {}
    if len(set(batch_of)) >= 2:
        lab = spot_labels[pick] if spot_labels is not None else None
        if lab is not None:
            valid = np.array([v is not None and v == v and v != "" for v in lab])
            lab = lab if valid.all() else None
        for m, emb in (("image", img_all), ("expression", expr_all)):
            batch[m] = batch_metrics(emb[pick], batch_of[pick], lab, n_neighbors=min(15, len(pick) - 1), seed=seed)
    result["batch"] = batch
    result["batch_scope"] = f"every sample's spots by this fold's model ({len(pick)} spots), batch = {block['batch_key']}"
    result["provenance"] = provenance()

    joint = _subsample(len(img_all), JOINT_SPOTS, seed + 1)
    with atomic_path(joint_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=img_all[joint], expression=expr_all[joint], sample=sample_of[joint].astype(str),
                 label=(spot_labels[joint].astype(str) if spot_labels is not None
                        else np.full(len(joint), "", dtype=str)))
    write_json(out_path, result)
    r = result["retrieval"]
    log.info("%s fold %d: %d test spots, recall@%d image->gene %.3f, gene->image %.3f", method, fold,
             result["n_test"], ks[-1], r[f"img2gene_recall@{ks[-1]}"], r[f"gene2img_recall@{ks[-1]}"])
    return result
