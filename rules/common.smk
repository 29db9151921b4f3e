# Config validation, sample tables, path helpers and input functions shared by every stage.
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate

from cmrcnet.config import (
    PROBE_MODELS,
    RETRIEVAL_MODELS,
    check_config,
    datasets_by_source,
    methods_for,
    planned_folds,
    probe_encoders,
    run_fingerprint,
    validate_schema,
)
from cmrcnet.crossmodal.grid import grid_encoders, grid_methods
from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.tables import MARKDOWN_TABLES
from cmrcnet.recipes import effective_method
from cmrcnet.weights import SOURCE_FILE, weights_file

# Our validator first for a one-line message naming the file and key; Snakemake's then fills the same defaults.
CONFIG_NAME = ", ".join(map(str, workflow.config_settings.configfiles)) or "config"
try:
    validate_schema(config, where=CONFIG_NAME)
    validate(config, schema="../config/schema.yaml")
    # the checks that import timm run once, when the run is planned, not again in every cluster job
    check_config(config, where=CONFIG_NAME, planning=workflow.is_main_process)
    # fold ids are planned from the config alone, so training jobs exist before any data does
    FOLD_IDS = {ds: planned_folds(config, ds) for ds in config["datasets"]}
    # each method's settings with its recipe applied (pretrained weights, optimiser, test-time averaging)
    RECIPES = {
        m: effective_method(config, m, where=CONFIG_NAME) for m in config["methods"]
    }
except CMRCNetError as err:  # one line, not a traceback, for a config mistake
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(1)

DATA = config["data_dir"]
PROC = config["processed_dir"]
LOGS = config["log_dir"]
MODELS = config["models_dir"]
RESULTS = config["results_dir"]
WEIGHTS = config["weights"]["dir"]
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])
# probe methods are fitted on cached frozen embeddings (rule probe); the others are trained (rule train)
PROBE_METHODS = [m for m in METHODS if config["methods"][m]["model"] in PROBE_MODELS]
TRAINED_METHODS = [m for m in METHODS if m not in PROBE_METHODS]
# the cross-modal grid's cells (config `crossmodal`), trained methods with their own evaluation (rules/crossmodal.smk)
GRID_METHODS = grid_methods(config)
HESTBENCH = config["hestbench"]
# every encoder embedded: those the probe methods read and those the HEST-Benchmark runs
ENCODERS = sorted(set(probe_encoders(config)) | set(HESTBENCH["encoders"]))
# trained retrieval models' image towers benchmarked as encoders (their deployable model is the "weights")
TRAINED_ENCODERS = HESTBENCH["trained_encoders"]
BENCH_ENCODERS = HESTBENCH["encoders"] + list(TRAINED_ENCODERS)
TRAIN_RESOURCES = config["resources"]["train"]
PREDICT_RESOURCES = config["resources"]["predict"]


def one_of(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(map(re.escape, names)) if names else "(?!x)x"


wildcard_constraints:
    dataset=one_of(DATASETS),
    sample=one_of([s for ds in config["datasets"].values() for s in ds["samples"]]),
    method=one_of(METHODS),
    fold=r"\d+",
    slide=one_of(list(config["predict_slides"])),
    encoder=one_of(ENCODERS + list(TRAINED_ENCODERS)),
    task=one_of(HESTBENCH["tasks"]),
    probe=one_of(HESTBENCH["probes"]),
    bench_sample=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def samples(dataset):
    return config["datasets"][dataset]["samples"]


def raw_files(kind, wildcards):
    """Every sample's raw `st`, `wsis` or `metadata` file of the wildcard's dataset."""
    pattern = {"st": RAW_ST, "wsis": RAW_WSI, "metadata": RAW_META}[kind]
    return expand(pattern, dataset=wildcards.dataset, sample=samples(wildcards.dataset))


RAW_ST = f"{DATA}/{{dataset}}/st/{{sample}}.h5ad"
RAW_WSI = f"{DATA}/{{dataset}}/wsis/{{sample}}.tif"
RAW_META = f"{DATA}/{{dataset}}/metadata/{{sample}}.json"
GENES = f"{PROC}/{{dataset}}/genes.tsv"
NORMALISED = f"{PROC}/{{dataset}}/st/{{sample}}.h5ad"
FOLDS = f"{PROC}/{{dataset}}/folds.tsv"
PATCHES = f"{PROC}/{{dataset}}/patches/{{sample}}.h5"
SPOTS = f"{PROC}/{{dataset}}/spots/{{sample}}.parquet"
RUN = f"{MODELS}/{{dataset}}/{{method}}/fold{{fold}}"
MODEL = f"{RUN}/best.pt"
HISTORY = f"{RUN}/history.csv"
TRAIN_SUMMARY = f"{RUN}/train.json"
WEIGHTS_FILE = weights_file(WEIGHTS, "{name}")
WEIGHTS_SOURCE = f"{WEIGHTS}/{{name}}/{SOURCE_FILE}"
WEIGHT_NAMES = sorted(
    {r["weights"] for r in RECIPES.values() if r["weights"]} | set(ENCODERS)
)
# frozen embeddings of one sample's patches by one encoder (rule embed), read by the probes
EMBEDDINGS = f"{PROC}/{{dataset}}/embeddings/{{encoder}}/{{sample}}.h5"
# HEST-Benchmark (config/hestbench.yaml): its task files, embeddings, one result per task x encoder x probe
BENCH_ROOT = f"{DATA}/hest-bench"
BENCH_TASK = f"{BENCH_ROOT}/{{task}}/TASK.json"
BENCH_EMBEDDINGS = (
    f"{PROC}/hest-bench/{{task}}/embeddings/{{encoder}}/{{bench_sample}}.h5"
)
BENCH_RESULT = f"{RESULTS}/hest-bench/{{task}}/{{encoder}}/{{probe}}.json"
LEADERBOARD = f"{RESULTS}/tables/hestbench_leaderboard"
# the cross-modal grid: one result per dataset x cell x fold, and the joint embeddings the UMAP figure draws
CROSSMODAL_RESULT = f"{RESULTS}/{{dataset}}/crossmodal/{{method}}/fold{{fold}}.json"
CROSSMODAL_JOINT = f"{RESULTS}/{{dataset}}/crossmodal/{{method}}/fold{{fold}}_joint.npz"
# the deployable model of a dataset x method: trained on every sample (fold `all`), carrying its reference bank
DEPLOY_RUN = f"{MODELS}/{{dataset}}/{{method}}/all"
DEPLOYABLE = f"{DEPLOY_RUN}/best.pt"
PREDICTIONS = f"{RESULTS}/{{dataset}}/predictions/{{method}}/fold{{fold}}.h5ad"
SLIDES = f"{RESULTS}/slides"
SLIDE_PREDICTION = f"{SLIDES}/{{slide}}.h5ad"
SLIDE_MAPS = f"{SLIDES}/{{slide}}_maps"
PREDICT_SLIDES = config["predict_slides"]
SCORES = f"{RESULTS}/{{dataset}}/evaluation/scores.parquet"
GENE_SET_TABLE = f"{RESULTS}/{{dataset}}/evaluation/gene_sets.parquet"
LABELS = f"{RESULTS}/{{dataset}}/evaluation/labels.tsv"
FIGURES = f"{RESULTS}/{{dataset}}/figures"
FIGURE_NAMES = [
    "fig2_boxplots",
    "fig3_mean_variance",
    "fig4_heatmaps_heg",
    "fig4_heatmaps_hvg",
    "fig5_spatial",
    "training_curves",
]
TABLES = f"{RESULTS}/tables"
# written beside the captioned CSVs: Markdown versions, NaN counts, the label key and provenance
TABLE_EXTRAS = [f"{t}.md" for t in MARKDOWN_TABLES] + [
    "nan_counts.csv",
    "labels.csv",
    "provenance.json",
]


def method_settings(method):
    """Everything that defines a method's training run, its recipe applied, as one string (a Snakemake param)."""
    r = RECIPES[method]
    settings = {
        "model": r["model"],
        "params": r["params"],
        "method_train": r["train"],
        "train": config["train"],
        "seed": config["seed"],
    }
    return json.dumps(settings, sort_keys=True)


def method_weights(wildcards):
    """The pretrained weight file a method's recipe loads (none for most), made by rule fetch_weights."""
    r = RECIPES[wildcards.method]
    if not r["weights"]:
        return []
    return [r["params"].get("pretrained_path") or r["params"]["weights_path"]]


def training_runs(dataset):
    """(method, fold) of every training job planned for `dataset` (probe methods train nothing)."""
    return [
        (m, f)
        for m in methods_for(config, dataset)
        if m in TRAINED_METHODS
        for f in FOLD_IDS[dataset]
    ]


def prediction_runs(dataset):
    """(method, fold) of every prediction file of `dataset`: trained methods and probes."""
    return [(m, f) for m in methods_for(config, dataset) for f in FOLD_IDS[dataset]]


def probe_embeddings(wildcards):
    """Every sample's cached embeddings by the encoder a probe method reads."""
    return expand(
        EMBEDDINGS,
        dataset=wildcards.dataset,
        encoder=config["methods"][wildcards.method]["params"]["encoder"],
        sample=samples(wildcards.dataset),
    )


def encoder_weights(wildcards):
    """The fetched (or imported) weight file of the wildcard's encoder (rule fetch_weights), or for a trained
    encoder its deployable model."""
    if wildcards.encoder in TRAINED_ENCODERS:
        entry = TRAINED_ENCODERS[wildcards.encoder]
        return DEPLOYABLE.format(dataset=entry["dataset"], method=entry["method"])
    return WEIGHTS_FILE.format(name=wildcards.encoder)


def fingerprints(dataset):
    """{method: hash of the config entries that shape its predictions}; see cmrcnet.config.run_fingerprint."""
    return {
        m: run_fingerprint(config, dataset, m) for m in methods_for(config, dataset)
    }


def figure_methods(dataset):
    """The methods a dataset's training curves show: trained ones but the ablation variants."""
    return [
        m
        for m in methods_for(config, dataset)
        if not config["methods"][m]["ablation"] and m in TRAINED_METHODS
    ]


def figure_output(name, caption):
    """A figure's PNG as a report item, captioned by report/{caption}.rst, grouped by dataset."""
    return report(
        f"{FIGURES}/{name}.png",
        caption=f"../report/{caption}.rst",
        category="Figures",
        subcategory="{dataset}",
    )


def all_targets():
    """Everything the pipeline makes: data, models, predictions, figures per dataset, and the tables."""
    targets = []
    for ds in DATASETS:
        targets += [GENES.format(dataset=ds), FOLDS.format(dataset=ds)]
        for pattern in (NORMALISED, PATCHES, SPOTS):
            targets += expand(pattern, dataset=ds, sample=samples(ds))
        targets += [
            MODEL.format(dataset=ds, method=m, fold=f) for m, f in training_runs(ds)
        ]
        targets += [
            PREDICTIONS.format(dataset=ds, method=m, fold=f)
            for m, f in prediction_runs(ds)
        ]
        targets += [
            f"{FIGURES.format(dataset=ds)}/{name}.{ext}"
            for name in FIGURE_NAMES
            for ext in ("png", "pdf")
        ]
    if DATASETS:
        targets += [f"{TABLES}/summary.csv"]
    targets += slide_targets()
    targets += hestbench_targets()
    targets += crossmodal_targets()
    return targets


def grid_methods_for(dataset):
    """The grid's cells run on `dataset`."""
    return [m for m in GRID_METHODS if m in methods_for(config, dataset)]


def crossmodal_results():
    """Every fold result of every grid cell on every dataset."""
    return [
        CROSSMODAL_RESULT.format(dataset=ds, method=m, fold=f)
        for ds in DATASETS
        for m in grid_methods_for(ds)
        for f in FOLD_IDS[ds]
    ]


def crossmodal_joints(dataset):
    """The joint embeddings of each grid cell's first fold on `dataset` (the UMAP figure's input)."""
    return [
        CROSSMODAL_JOINT.format(dataset=dataset, method=m, fold=FOLD_IDS[dataset][0])
        for m in grid_methods_for(dataset)
    ]


def crossmodal_targets():
    """The grid's table and, per dataset it runs on, its heatmap and UMAP figures."""
    if not GRID_METHODS:
        return []
    targets = [f"{TABLES}/crossmodal.csv", f"{TABLES}/crossmodal.md"]
    for ds in DATASETS:
        if grid_methods_for(ds):
            targets += [
                f"{FIGURES.format(dataset=ds)}/{name}.{ext}"
                for name in ("crossmodal_grid", "crossmodal_umap")
                for ext in ("png", "pdf")
            ]
    return targets


def hestbench_targets():
    """The HEST-Benchmark leaderboard, when the config names tasks."""
    if not HESTBENCH["tasks"]:
        return []
    return [f"{LEADERBOARD}.csv", f"{LEADERBOARD}.md"]


def deployable_models():
    """The deployable model of every dataset x method (target `deploy`)."""
    return [
        DEPLOYABLE.format(dataset=ds, method=m)
        for ds in DATASETS
        for m in methods_for(config, ds)
        if m in TRAINED_METHODS
    ]


def slide_targets():
    """The AnnData and maps of every `predict_slides` entry."""
    return [
        path.format(slide=name)
        for name in PREDICT_SLIDES
        for path in (SLIDE_PREDICTION, f"{SLIDE_MAPS}.png", f"{SLIDE_MAPS}.pdf")
    ]


def slide_model(wildcards):
    """The deployable model a `predict_slides` entry names."""
    entry = PREDICT_SLIDES[wildcards.slide]
    return DEPLOYABLE.format(dataset=entry["dataset"], method=entry["method"])


def slide_settings(slide):
    """A `predict_slides` entry with its defaults filled, as one string (a Snakemake param: a change reruns)."""
    entry = dict(PREDICT_SLIDES[slide])
    ds = config["datasets"][entry["dataset"]]
    entry["layout"] = entry["layout"] or ds["technology"]
    entry["k"] = entry["k"] or min(config["evaluation"]["k"])
    entry["genes"] = entry["genes"] or [g for g in [ds["figure_gene"]] if g]
    # test-time averaging as the method's evaluation does (regression models only)
    entry["tta"] = (
        RECIPES[entry["method"]]["tta"]
        and RECIPES[entry["method"]]["model"] not in RETRIEVAL_MODELS
    )
    entry["weighted"] = config["evaluation"]["weighted"]
    entry["batch_size"] = config["evaluation"]["batch_size"]
    return json.dumps(entry, sort_keys=True)


def bench_samples(task):
    """The samples of a fetched task, in the order its manifest lists them."""
    manifest = checkpoints.fetch_hestbench.get(task=task).output.task
    return sorted(json.loads(Path(manifest).read_text())["samples"])


def bench_patches(wildcards):
    """A bench sample's patch file, as the task's manifest names it."""
    manifest = checkpoints.fetch_hestbench.get(task=wildcards.task).output.task
    entry = json.loads(Path(manifest).read_text())["samples"][wildcards.bench_sample]
    return str(Path(manifest).parent / entry["patches"])


# Say, once when a run is planned, where each encoder's missing weights will come from.
if workflow.is_main_process:
    from cmrcnet.config import missing_weights_note

    for _name in sorted(set(ENCODERS) | set(grid_encoders(config))):
        _note = missing_weights_note(
            _name, WEIGHTS_FILE.format(name=_name), config["weights"]["local"]
        )
        if _note:
            print(f"note: {_note}", file=sys.stderr)
