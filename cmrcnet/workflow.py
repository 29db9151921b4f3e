"""The functions behind each Snakemake rule: take the `snakemake` object, call one library function.

Kept here (not in scripts/) so that the CLI, the scripts and the tests share one code path.
"""

from __future__ import annotations

from cmrcnet.io import provenance
from cmrcnet.logs import exit_on_input_error, setup_logging


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
        min_spots=genes["min_spots"], control_probe_patterns=genes["control_probe_patterns"],
        marker_genes=ds["marker_genes"],
    )


def normalise(smk) -> None:
    from cmrcnet.data.genes import normalise_sample

    normalise_sample(
        smk.input.st, smk.input.genes, smk.output[0], sample=smk.wildcards.sample, dataset=smk.wildcards.dataset,
        target_sum=smk.config["normalise"]["target_sum"], provenance_info=_dataset_provenance(smk, "genes", "normalise"),
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
        fill=p["fill"], provenance_info=_dataset_provenance(smk, "patches"),
    )


def train(smk) -> None:
    from pathlib import Path

    import torch

    from cmrcnet.train import train_fold

    torch.set_num_threads(max(1, int(smk.threads)))
    method = smk.wildcards.method
    train_fold(
        method=method, method_cfg=smk.config["methods"][method], train_cfg=smk.config["train"],
        dataset_dir=Path(smk.input.genes).parent, fold=int(smk.wildcards.fold), out_dir=Path(smk.output.model).parent,
        seed=smk.config["seed"],
    )


def run(smk, step) -> None:
    """Entry point for scripts/: log to the rule's log file, one-line errors, exit status 1 on bad input."""
    setup_logging(smk.log[0] if smk.log else None)
    with exit_on_input_error():
        step(smk)
