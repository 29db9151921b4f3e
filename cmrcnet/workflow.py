"""The functions behind each Snakemake rule: take the `snakemake` object, call one library function.

Kept here (not in scripts/) so that the CLI, the scripts and the tests share one code path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmrcnet.io import provenance
from cmrcnet.logs import exit_on_input_error, setup_logging

log = logging.getLogger("cmrcnet")


def _dataset_provenance(smk, *sections: str) -> dict:
    ds = smk.wildcards.dataset
    cfg = {"dataset": smk.config["datasets"][ds], "seed": smk.config["seed"]}
    cfg.update({s: smk.config[s] for s in sections})
    return provenance(cfg, rule=smk.rule, wildcards=dict(smk.wildcards.items()))


def synthesize(smk) -> None:
    from cmrcnet.data.synthetic import synthesize_sample

    ds = smk.config["datasets"][smk.wildcards.dataset]
    spec = ds["synthetic"]
    sample = smk.wildcards.sample
    root = smk.params.root
    synthesize_sample(
        root, sample, technology=ds["technology"], sample_index=ds["samples"].index(sample),
        patient=ds["patients"].get(sample, sample), provenance_info=_dataset_provenance(smk), **spec,
    )


def fetch_hest(smk) -> None:
    from cmrcnet.data.hest import fetch_hest_sample

    hest = smk.config["hest"]
    fetch_hest_sample(
        smk.wildcards.sample, smk.params.root, repo_id=hest["repo_id"], extras=hest["extras"], revision=hest["revision"]
    )


def fetch_weights(smk) -> None:
    from cmrcnet.weights import fetch_weights as fetch
    from cmrcnet.weights import import_local_weights

    out_dir = Path(smk.output.weights).parent
    if smk.input.get("local"):
        import_local_weights(smk.wildcards.name, smk.input.local, out_dir)
    else:
        fetch(smk.wildcards.name, out_dir, revision=smk.params.revision)


def tiny_test_weights(smk) -> None:
    from cmrcnet.encoders import write_tiny_test_weights
    from cmrcnet.io import atomic_path

    with atomic_path(smk.output[0]) as tmp:
        write_tiny_test_weights(tmp, seed=int(smk.wildcards.seed))


def embed(smk) -> None:
    """Rules embed and embed_hestbench: a registered encoder, or a trained model's image tower
    (hestbench.trained_encoders, its deployable model as the weights)."""
    import torch

    from cmrcnet.encoders.trained import trained_encoder
    from cmrcnet.inference.embed import embed_patches

    enc = smk.config["encoders"]
    encoder = smk.wildcards.encoder
    if encoder in smk.config["hestbench"]["trained_encoders"]:
        encoder = trained_encoder(encoder, smk.input.weights, "cuda" if torch.cuda.is_available() else "cpu")
    embed_patches(encoder, smk.input.weights, smk.input.patches, smk.output[0], dtype=enc["dtype"],
                  batch_size=enc["batch_size"], num_workers=enc["num_workers"], amp=enc["amp"])


def probe(smk) -> None:
    from cmrcnet.probes.fold import probe_fold

    method = smk.config["methods"][smk.wildcards.method]
    params = method["params"]
    probe_fold(embeddings_dir=Path(smk.input.embeddings[0]).parent, dataset_dir=Path(smk.input.genes).parent,
               fold=int(smk.wildcards.fold), out_path=smk.output[0], method=smk.wildcards.method,
               probe=params["probe"], encoder=params["encoder"], params=params.get("probe_params") or {},
               ks=smk.config["evaluation"]["k"], seed=smk.config["seed"], fingerprint=smk.params.fingerprint)


def fetch_hestbench(smk) -> None:
    from cmrcnet.data.hestbench import fetch_task

    bench = smk.config["hestbench"]
    fetch_task(smk.wildcards.task, smk.params.root, repo_id=bench["repo_id"], revision=bench["revision"])


def probe_hestbench(smk) -> None:
    from cmrcnet.data.hestbench import probe_task

    bench = smk.config["hestbench"]
    probe = smk.wildcards.probe
    params = dict(bench["probe_params"].get(probe) or {})
    if probe == "knn":
        params.setdefault("ks", smk.config["evaluation"]["k"])
    probe_task(Path(smk.input.task).parent, dict(zip(smk.params.samples, smk.input.embeddings)), probe,
               seed=bench["seed"], probe_params=params, encoder=smk.wildcards.encoder, out_json=smk.output[0])


def hestbench_leaderboard(smk) -> None:
    import json

    from cmrcnet.evaluation.leaderboard import leaderboard, write_leaderboard

    results = [json.loads(Path(p).read_text()) for p in smk.input.results]
    table = leaderboard(results, source=smk.config["hestbench"]["published_source"])
    write_leaderboard(table, smk.output.csv, smk.output.md)


def link_local(smk) -> None:
    from cmrcnet.data.hest import link_local_sample

    ds = smk.config["datasets"][smk.wildcards.dataset]
    link_local_sample(smk.wildcards.sample, ds["local_dir"], smk.params.root)


def select_genes(smk) -> None:
    from cmrcnet.data.genes import select_genes as select

    ds = smk.config["datasets"][smk.wildcards.dataset]
    genes = smk.config["genes"]
    select(
        dict(zip(ds["samples"], smk.input.st)), smk.output[0], method=ds["gene_selection"],
        dataset=smk.wildcards.dataset, n_top_hvg=genes["n_top_hvg"], hvg_flavor=genes["hvg_flavor"],
        min_spots=genes["min_spots"], control_probe_patterns=ds["control_probe_patterns"],
        marker_genes=ds["marker_genes"], panel_controls=ds["panel_controls"], paper_n_genes=ds["paper_n_genes"],
    )


def normalise(smk) -> None:
    from cmrcnet.data.genes import normalise_sample

    normalise_sample(
        smk.input.st, smk.input.genes, smk.output[0], sample=smk.wildcards.sample, dataset=smk.wildcards.dataset,
        target_sum=smk.config["normalise"]["target_sum"], spots=smk.config["datasets"][smk.wildcards.dataset]["spots"],
        provenance_info=_dataset_provenance(smk, "genes", "normalise"),
    )


def folds(smk) -> None:
    from cmrcnet.data.folds import write_folds

    ds = smk.config["datasets"][smk.wildcards.dataset]
    write_folds(
        dict(zip(ds["samples"], smk.input.metadata)), smk.output[0], scheme=ds["folds_scheme"],
        dataset=smk.wildcards.dataset, patients=ds["patients"],
    )


def extract_patches(smk) -> None:
    from cmrcnet.data.patches import extract_patches as extract

    p = smk.config["patches"]
    extract(
        smk.input.wsi, smk.input.st, smk.input.metadata, smk.output.h5, smk.output.spots,
        sample=smk.wildcards.sample, patch_px=p["size_px"], um_per_px=p["um_per_px"], off_slide=p["off_slide"],
        fill=p["fill"], spots=smk.config["datasets"][smk.wildcards.dataset]["spots"],
        provenance_info=_dataset_provenance(smk, "patches"),
    )


def train(smk) -> None:
    import torch

    from cmrcnet.data.datasets import fold_id
    from cmrcnet.inference.predict import check_k_fits
    from cmrcnet.recipes import training_method_cfg
    from cmrcnet.train import train_fold

    torch.set_num_threads(max(1, int(smk.threads)))
    method = smk.wildcards.method
    method_cfg = training_method_cfg(smk.config, method)
    # a retrieval model whose evaluation.k exceeds its training spots could never predict: stop before training
    fold = fold_id(getattr(smk.params, "fold", None) or smk.wildcards.fold)  # params.fold `all`: deployable model
    check_k_fits(Path(smk.input.genes).parent, fold, smk.config["evaluation"]["k"], method_cfg["model"])
    train_fold(
        method=method, method_cfg=method_cfg, train_cfg=smk.config["train"],
        dataset_dir=Path(smk.input.genes).parent, fold=fold, out_dir=Path(smk.output.model).parent,
        seed=smk.config["seed"], technology=smk.config["datasets"][smk.wildcards.dataset]["technology"],
    )


def predict(smk) -> None:
    import torch

    from cmrcnet.inference.predict import predict_fold
    from cmrcnet.recipes import effective_method

    torch.set_num_threads(max(1, int(smk.threads)))
    ev = smk.config["evaluation"]
    method = effective_method(smk.config, smk.wildcards.method)
    tta = method["tta"]  # evaluation.tta, or STNet's original recipe
    predict_fold(
        model_path=smk.input.model, dataset_dir=Path(smk.input.genes).parent, fold=int(smk.wildcards.fold),
        out_path=smk.output[0], method=smk.wildcards.method, ks=ev["k"], weighted=ev["weighted"], tta=tta,
        batch_size=ev["batch_size"], fingerprint=smk.params.fingerprint, expected_model=method["model"],
    )


def predict_slide(smk) -> None:
    import json

    import torch

    from cmrcnet.inference.slide_predict import predict_slide as predict

    torch.set_num_threads(max(1, int(smk.threads)))
    entry = json.loads(smk.params.settings)
    predict(
        smk.input.model, smk.input.slide, smk.output.adata, mpp=entry["mpp"], tissue=entry["tissue"],
        layout=entry["layout"], pitch_um=entry["pitch_um"], k=entry["k"], weighted=entry["weighted"],
        tta=entry["tta"], genes=entry["genes"], maps_prefix=str(Path(smk.output.maps[0]).with_suffix("")),
        batch_size=entry["batch_size"], expected_model=smk.config["methods"][entry["method"]]["model"],
    )


def evaluate(smk) -> None:
    from cmrcnet.evaluation.evaluate import evaluate_dataset, write_evaluation

    dataset = smk.wildcards.dataset
    ds, ev = smk.config["datasets"][dataset], smk.config["evaluation"]
    scores, gene_sets, labels = evaluate_dataset(
        smk.input.predictions, dict(zip(ds["samples"], smk.input.st)), dataset=dataset,
        marker_genes=ds["marker_genes"], top_genes=ev["top_genes"], protocols=ev["protocols"],
        hest_bench_n=ev["hest_bench_genes"], hest_bench_min_fraction=ev["hest_bench_min_fraction"],
        fingerprints=smk.params.fingerprints, upstream={"genes.tsv": smk.input.genes, "folds.tsv": smk.input.folds},
    )
    write_evaluation(smk.output, scores, gene_sets, labels,
                     {**_dataset_provenance(smk, "evaluation"), "undefined_r": ev["undefined_r"]})


def tables(smk) -> None:
    import pandas as pd

    from cmrcnet.evaluation.tables import best_genes_markdown, build_tables, gene_counts, write_tables
    from cmrcnet.io import atomic_path, write_json, write_table

    scores = pd.concat([pd.read_parquet(p) for p in smk.input.scores], ignore_index=True)
    gene_sets = pd.concat([pd.read_parquet(p) for p in smk.input.gene_sets], ignore_index=True)
    labels = pd.concat([pd.read_csv(p, sep="\t") for p in smk.input.labels], ignore_index=True)
    paper_tables, plain = build_tables(scores, gene_sets, labels, smk.config,
                                       n_boot=smk.config["evaluation"]["bootstrap"], seed=smk.config["seed"])
    out_dir = Path(smk.output.summary).parent
    write_tables(out_dir, paper_tables)
    for name, frame in plain.items():
        write_table(out_dir / f"{name}.csv", frame)
    with atomic_path(out_dir / "table3_best_genes.md") as tmp:
        tmp.write_text(best_genes_markdown(plain["table3_best_genes"]))
    counts = gene_counts(dict(zip(smk.config["datasets"], smk.input.genes)), smk.config)
    for row in counts:
        log.info("%s: %d genes selected, the paper: %s", row["dataset"], row["n_genes"],
                 "not given" if row["paper_n_genes"] is None else row["paper_n_genes"])
    write_json(out_dir / "provenance.json", provenance(smk.config, rule=smk.rule, gene_counts=counts,
                                                       undefined_r=smk.config["evaluation"]["undefined_r"]))


def figures(smk) -> None:
    import pandas as pd

    from cmrcnet.evaluation.tables import figure_labels
    from cmrcnet.figures.paper import dataset_figures

    dataset = smk.wildcards.dataset
    ds = smk.config["datasets"][dataset]
    labels = pd.read_csv(smk.input.labels, sep="\t")
    dataset_figures(
        dataset=dataset, prediction_paths=smk.input.predictions, scores=pd.read_parquet(smk.input.scores),
        gene_sets=pd.read_parquet(smk.input.gene_sets), labels=figure_labels(labels, smk.config),
        histories=dict(zip(smk.params.history_names, smk.input.histories)),
        wsis=dict(zip(ds["samples"], smk.input.wsis)), samples=ds["samples"], out_dir=Path(smk.output[0]).parent,
        gene=ds["figure_gene"], markers=ds["marker_genes"],
    )


def crossmodal_eval(smk) -> None:
    import torch

    from cmrcnet.crossmodal.evaluate import evaluate_cell_fold
    from cmrcnet.evaluation.evaluate import bench_genes_of

    torch.set_num_threads(max(1, int(smk.threads)))
    dataset = smk.wildcards.dataset
    ds, ev = smk.config["datasets"][dataset], smk.config["evaluation"]
    bench = None
    if "hest-bench" in ev["protocols"]:
        bench = bench_genes_of(dict(zip(ds["samples"], smk.input.st)), ev["hest_bench_genes"],
                               ev["hest_bench_min_fraction"], dataset)
    evaluate_cell_fold(
        model_path=smk.input.model, dataset_dir=Path(smk.input.genes).parent, fold=int(smk.wildcards.fold),
        out_path=smk.output.result, joint_path=smk.output.joint, method=smk.wildcards.method,
        block=smk.config["crossmodal"], k=min(ev["k"]), dataset=dataset, patients=ds["patients"], bench_genes=bench,
        metadata_dir=Path(smk.input.metadata[0]).parent if smk.input.metadata else None, seed=smk.config["seed"],
        batch_size=ev["batch_size"],
    )


def crossmodal_table(smk) -> None:
    from cmrcnet.crossmodal.grid import grid_methods
    from cmrcnet.crossmodal.table import read_fold_results, write_crossmodal_table

    write_crossmodal_table(smk.output.csv, smk.output.md, read_fold_results(smk.input.results),
                           smk.config["crossmodal"], k=min(smk.config["evaluation"]["k"]), seed=smk.config["seed"],
                           order=grid_methods(smk.config))


def crossmodal_figures(smk) -> None:
    import pandas as pd

    from cmrcnet.crossmodal.table import grid_heatmaps, joint_umaps

    block = smk.config["crossmodal"]
    table = pd.read_csv(smk.input.table)
    grid_heatmaps(table, smk.wildcards.dataset, Path(smk.output.grid).with_suffix(""), max(block["ks"]),
                  block["probe"], min(smk.config["evaluation"]["k"]))
    joint_umaps(dict(zip(smk.params.methods, smk.input.joints)), Path(smk.output.umap).with_suffix(""),
                seed=smk.config["seed"])


def run(smk, step) -> None:
    """Entry point for scripts/: log to the rule's log file, one-line errors, exit status 1 on bad input."""
    setup_logging(smk.log[0] if smk.log else None)
    with exit_on_input_error():
        step(smk)
