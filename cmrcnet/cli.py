"""The `cmrcnet` command: every pipeline step, callable without Snakemake.

Each subcommand calls the same library function as the matching Snakemake rule.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cmrcnet.errors import input_error
from cmrcnet.logs import exit_on_input_error, setup_logging


def _device(value: str | None) -> str | None:
    """`--device`, checked before any work: a torch device that exists here (None: cuda when visible, else cpu)."""
    if value is None:
        return None
    import torch

    flag = f"--device {value}"
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise input_error(flag, "not a device; use cpu, cuda or cuda:N (or leave --device out)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise input_error(flag, "no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device "
                                    "cpu, or leave --device out to use a GPU only when there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise input_error(flag, f"no such GPU; {torch.cuda.device_count()} visible (cuda:0 to "
                                    f"cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise input_error(flag, "no Apple GPU (MPS) is available here; use --device cpu")
    elif dev.type != "cpu":
        raise input_error(flag, f"{dev.type} devices are not supported; use cpu or cuda")
    return str(dev)


def _at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise input_error(flag, f"must be at least {minimum:g}, got {value:g}")


def _positive(flag: str, value) -> None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise input_error(flag, f"must be a number above 0, got {value:g}")


def _validate_config(args) -> None:
    from cmrcnet.config import load_config

    config = load_config(args.config)
    n = sum(len(d["samples"]) for d in config["datasets"].values())
    print(f"{args.config}: valid ({len(config['datasets'])} datasets, {n} samples)")


def _synthesize(args) -> None:
    from cmrcnet.data.synthetic import synthesize_sample

    summary = synthesize_sample(
        args.root, args.sample, technology=args.technology, sample_index=args.sample_index, seed=args.seed,
        patient=args.patient or args.sample, width_um=args.width_um, height_um=args.height_um,
        pixel_size_um=args.pixel_size_um,
    )
    print(json.dumps(summary, default=str))


def _fetch(args) -> None:
    from cmrcnet.data.hest import HEST_REPO, fetch_hest_sample

    for sample in args.samples:
        fetch_hest_sample(sample, args.root, repo_id=args.repo_id or HEST_REPO, extras=args.extras)
        print(f"{sample}: fetched into {args.root}")


def _fetch_weights(args) -> None:
    from cmrcnet.weights import fetch_weights, import_local_weights

    if args.from_file and len(args.names) != 1:
        raise input_error("--from-file", "give exactly one encoder name")
    for name in args.names:
        if args.from_file:
            path = import_local_weights(name, args.from_file, Path(args.dir) / name)
        else:
            path = fetch_weights(name, Path(args.dir) / name, revision=args.revision)
        print(f"{name}: {path} (checksum in {path.parent / 'SOURCE.json'})")


def _list_encoders(args) -> None:
    from cmrcnet.encoders import get_encoder, list_encoders

    for name in list_encoders():
        spec = get_encoder(name)
        hub = f"{spec.hub.repo_id}/{spec.hub.filename}{' (gated)' if spec.hub.gated else ''}" if spec.hub else "-"
        print(f"{name:20s} dim {spec.embed_dim:5d}  {spec.input_size:4d} px  {hub}")


def _embed(args) -> None:
    from cmrcnet.inference.embed import embed_patches

    summary = embed_patches(args.encoder, args.weights, args.patches, args.out, dtype=args.dtype,
                            batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                            amp=not args.no_amp)
    print(f"{args.out}: {summary}")


def _link(args) -> None:
    from cmrcnet.data.hest import link_local_sample

    for sample in args.samples:
        link_local_sample(sample, args.source, args.root)
        print(f"{sample}: linked from {args.source}")


def _select_genes(args) -> None:
    from cmrcnet.data.genes import select_genes

    _at_least("--n-top-hvg", args.n_top_hvg, 1)
    _at_least("--paper-n-genes", args.paper_n_genes, 1)
    st = {Path(p).stem: p for p in args.st}
    table = select_genes(
        st, args.out, method=args.method, dataset=args.dataset, n_top_hvg=args.n_top_hvg,
        control_probe_patterns=args.control_patterns, marker_genes=args.markers, panel_controls=args.panel_controls,
        paper_n_genes=args.paper_n_genes,
    )
    print(f"{args.out}: {len(table)} genes")


def _normalise(args) -> None:
    from cmrcnet.data.genes import normalise_sample

    _positive("--target-sum", args.target_sum)
    adata = normalise_sample(args.st, args.genes, args.out, sample=Path(args.st).stem, dataset=args.dataset,
                             target_sum=args.target_sum, spots=args.spots)
    print(f"{args.out}: {adata.n_obs} spots x {adata.n_vars} genes")


def _folds(args) -> None:
    from cmrcnet.data.folds import write_folds

    folds = write_folds({Path(p).stem: p for p in args.metadata}, args.out, scheme=args.scheme, dataset=args.dataset)
    print(folds.to_string(index=False))


def _patches(args) -> None:
    from cmrcnet.data.patches import check_patch_settings, extract_patches

    check_patch_settings(args.size_px, args.um_per_px, "--size-px", "--um-per-px")
    summary = extract_patches(
        args.wsi, args.st, args.metadata, args.out_h5, args.out_spots, sample=Path(args.st).stem,
        patch_px=args.size_px, um_per_px=args.um_per_px, off_slide=args.off_slide, spots=args.spots,
    )
    print(json.dumps(summary, default=str))


def _config_for_run(args) -> dict:
    """The validated config, with the dataset and method of a train/predict command checked."""
    from cmrcnet.config import dataset_config, load_config

    config = load_config(args.config)
    dataset_config(config, args.dataset)
    if args.method not in config["methods"]:
        known = ", ".join(config["methods"]) or "none"
        raise input_error(args.config, f"methods.{args.method}: no such method; the config has {known}")
    return config


def _train(args) -> None:
    from cmrcnet.data.datasets import ALL, fold_id
    from cmrcnet.inference.predict import check_k_fits
    from cmrcnet.recipes import training_method_cfg
    from cmrcnet.train import train_fold

    device = _device(args.device)
    config = _config_for_run(args)
    dataset_dir = Path(args.processed_dir or config["processed_dir"]) / args.dataset
    fold = fold_id(args.fold)
    run_name = fold if fold == ALL else f"fold{fold}"  # `all`: the deployable model, trained on every sample
    out_dir = Path(args.out or Path(config["models_dir"]) / args.dataset / args.method / run_name)
    method_cfg = training_method_cfg(config, args.method)
    check_k_fits(dataset_dir, fold, config["evaluation"]["k"], method_cfg["model"])
    summary = train_fold(method=args.method, method_cfg=method_cfg, train_cfg=config["train"],
                         dataset_dir=dataset_dir, fold=fold, out_dir=out_dir, seed=config["seed"],
                         technology=config["datasets"][args.dataset]["technology"],
                         device=device)
    print(json.dumps(summary, default=str))


def _predict(args) -> None:
    from cmrcnet.config import run_fingerprint
    from cmrcnet.inference.predict import predict_fold
    from cmrcnet.recipes import effective_method

    device = _device(args.device)
    config = _config_for_run(args)
    ev = config["evaluation"]
    method = effective_method(config, args.method)
    run_dir = Path(config["models_dir"]) / args.dataset / args.method / f"fold{args.fold}"
    default_out = Path(config["results_dir"]) / args.dataset / "predictions" / args.method / f"fold{args.fold}.h5ad"
    out = Path(args.out or default_out)
    info = predict_fold(model_path=args.model or run_dir / "best.pt",
                        dataset_dir=Path(args.processed_dir or config["processed_dir"]) / args.dataset, fold=args.fold,
                        out_path=out, method=args.method, ks=ev["k"], weighted=ev["weighted"],
                        tta=method["tta"], expected_model=method["model"],
                        batch_size=ev["batch_size"], device=device,
                        fingerprint=run_fingerprint(config, args.dataset, args.method))
    print(json.dumps({**info, "out": str(out)}, default=str))


def _predict_slide(args) -> None:
    from cmrcnet.inference.slide_predict import predict_slide

    device = _device(args.device)
    _positive("--mpp", args.mpp)
    _positive("--pitch", args.pitch)
    _at_least("--k", args.k, 1)
    info = predict_slide(args.model, args.slide, args.out, mpp=args.mpp, tissue=args.tissue, layout=args.layout,
                         pitch_um=args.pitch, k=args.k, weighted=args.weighted, tta=args.tta, genes=args.genes,
                         maps_prefix=args.maps, batch_size=args.batch_size, device=device)
    print(json.dumps(info, default=str))


def build_parser() -> argparse.ArgumentParser:
    from cmrcnet import __version__
    from cmrcnet.config import SCHEMA_PATH, load_yaml

    defaults = {k: v.get("default") for k, v in load_yaml(SCHEMA_PATH)["properties"]["genes"]["properties"].items()}
    parser = argparse.ArgumentParser(prog="cmrcnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cmrcnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate-config", help="check a config file against config/schema.yaml")
    p.add_argument("config")
    p.set_defaults(func=_validate_config)

    p = sub.add_parser("synthesize", help="write one synthetic sample in HEST layout")
    p.add_argument("root", help="dataset folder (st/, wsis/, metadata/ are created inside)")
    p.add_argument("sample")
    p.add_argument("--technology", choices=["visium", "xenium"], default="visium")
    p.add_argument("--sample-index", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patient")
    p.add_argument("--width-um", type=float, default=1600)
    p.add_argument("--height-um", type=float, default=1600)
    p.add_argument("--pixel-size-um", type=float, default=0.35)
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("fetch", help="download HEST-1k samples (needs HF_TOKEN or `hf auth login`)")
    p.add_argument("root")
    p.add_argument("samples", nargs="+")
    p.add_argument("--repo-id")
    p.add_argument("--extras", nargs="*", default=[])
    p.set_defaults(func=_fetch)

    p = sub.add_parser("fetch-weights", help="download weights once, with checksum: timm ImageNet weights (e.g. "
                                             "resnet50.a1_in1k) or a registered encoder (uni, ctranspath, ...)")
    p.add_argument("names", nargs="+", help="timm weight names (architecture.tag) or registered encoder names")
    p.add_argument("--dir", default="weights", help="weights go to DIR/NAME/model.safetensors + SOURCE.json")
    p.add_argument("--revision", help="hub commit or tag (default main)")
    p.add_argument("--from-file", help="import this local weight file for the (one) encoder named, not the hub")
    p.set_defaults(func=_fetch_weights)

    p = sub.add_parser("list-encoders", help="the registered frozen encoders: embedding size, input size, hub file")
    p.set_defaults(func=_list_encoders)

    p = sub.add_parser("embed", help="embed a patch HDF5 file with a registered encoder (the embedding cache)")
    p.add_argument("encoder")
    p.add_argument("patches", help="patch HDF5 (img, barcode), as extract_patches or HEST-Benchmark write them")
    p.add_argument("--weights", help="model.safetensors from fetch-weights (default: random weights, with a warning)")
    p.add_argument("--out", required=True, help="the cache file to write (.h5)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.set_defaults(func=_embed)

    p = sub.add_parser("link", help="validate samples of a local HEST-layout folder and symlink them")
    p.add_argument("source")
    p.add_argument("root")
    p.add_argument("samples", nargs="+")
    p.set_defaults(func=_link)

    p = sub.add_parser("select-genes", help="choose a dataset's gene set from its samples' raw .h5ad")
    p.add_argument("out")
    p.add_argument("st", nargs="+", help="raw .h5ad files, one per sample (sample = file stem)")
    p.add_argument("--method", choices=["hvg_union", "panel"], required=True)
    p.add_argument("--dataset", default="dataset")
    p.add_argument("--n-top-hvg", type=int, default=defaults["n_top_hvg"])
    p.add_argument("--markers", nargs="*", default=[])
    p.add_argument("--control-patterns", nargs="*", default=defaults["control_probe_patterns"])
    p.add_argument("--panel-controls", choices=["drop", "keep"], default="drop",
                   help="panel: drop the control probes (default) or keep them as genes")
    p.add_argument("--paper-n-genes", type=int, help="warn when the number of genes selected differs")
    p.set_defaults(func=_select_genes)

    p = sub.add_parser("normalise", help="in-tissue (or all) spots, normalize_total + log1p, then the gene set")
    p.add_argument("st")
    p.add_argument("genes")
    p.add_argument("out")
    p.add_argument("--dataset", default="dataset")
    p.add_argument("--target-sum", type=float)
    p.add_argument("--spots", choices=["in_tissue", "all"], default="in_tissue")
    p.set_defaults(func=_normalise)

    p = sub.add_parser("folds", help="cross-validation folds from the samples' metadata JSON")
    p.add_argument("out")
    p.add_argument("metadata", nargs="+")
    p.add_argument("--scheme", choices=["leave_one_sample_out", "leave_one_patient_out"],
                   default="leave_one_sample_out")
    p.add_argument("--dataset", default="dataset")
    p.set_defaults(func=_folds)

    p = sub.add_parser("patches", help="extract spot-centred patches to HDF5 + Parquet")
    p.add_argument("wsi")
    p.add_argument("st")
    p.add_argument("metadata")
    p.add_argument("out_h5")
    p.add_argument("out_spots")
    p.add_argument("--size-px", type=int, default=224, help="patch side in pixels, at least 16 (default 224)")
    p.add_argument("--um-per-px", type=float, default=0.5, help="patch resolution, above 0 and at most 100 (default 0.5)")
    p.add_argument("--off-slide", choices=["pad", "drop"], default="pad")
    p.add_argument("--spots", choices=["in_tissue", "all"], default="in_tissue")
    p.set_defaults(func=_patches)

    p = sub.add_parser("train", help="train one method on one fold (resumes from its last checkpoint)")
    p.add_argument("config", help="pipeline config (methods, train settings, seed)")
    p.add_argument("dataset")
    p.add_argument("method", help="a name under `methods:` in the config")
    p.add_argument("fold", help="a fold number, or `all` for the deployable model (every sample trains it)")
    p.add_argument("--processed-dir", help="default: the config's processed_dir")
    p.add_argument("--out", help="default: {models_dir}/{dataset}/{method}/fold{fold} (fold all: .../all)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="predict one fold's test samples with a trained model (evaluation.k, tta)")
    p.add_argument("config")
    p.add_argument("dataset")
    p.add_argument("method")
    p.add_argument("fold", type=int)
    p.add_argument("--model", help="default: {models_dir}/{dataset}/{method}/fold{fold}/best.pt")
    p.add_argument("--processed-dir", help="default: the config's processed_dir")
    p.add_argument("--out", help="default: {results_dir}/{dataset}/predictions/{method}/fold{fold}.h5ad")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("predict-slide", help="predict expression over the tissue of a new whole slide (AnnData + maps)")
    p.add_argument("model", help="a trained best.pt (models/{dataset}/{method}/all/best.pt: the deployable model)")
    p.add_argument("slide", help="pyramidal TIFF / OME-TIFF; SVS, NDPI, MRXS need OpenSlide")
    p.add_argument("--out", required=True, help="the AnnData to write (.h5ad)")
    p.add_argument("--mpp", type=float, help="slide pixel size in um at full resolution, when the file has none")
    p.add_argument("--tissue", help="tissue outline, GeoJSON polygons in level-0 px (HEST tissue_seg); "
                                    "default: detected on a thumbnail")
    p.add_argument("--layout", choices=["visium", "xenium"],
                   help="spot lattice: Visium hexagonal 55 um spots or Xenium-style 100 um squares, 100 um apart "
                        "(default: the technology the model was trained on)")
    p.add_argument("--pitch", type=float, help="distance between spot centres in um (default 100)")
    p.add_argument("--k", type=int, default=50, help="neighbours averaged by retrieval models (default 50)")
    p.add_argument("--weighted", action="store_true", help="retrieval: weight neighbours by similarity")
    p.add_argument("--tta", action="store_true", help="regression models: average the 8 flips/rotations")
    p.add_argument("--genes", nargs="+", default=[], help="genes to draw (with --maps)")
    p.add_argument("--maps", help="write maps of the --genes (default: the 3 most variable) to MAPS.png and MAPS.pdf")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.set_defaults(func=_predict_slide)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    with exit_on_input_error():
        args.func(args)


if __name__ == "__main__":
    main()
