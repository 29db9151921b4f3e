"""Load and check the pipeline config: the JSON schema (shape, defaults) plus the rules a schema can't say."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cmrcnet.errors import CMRCNetError, input_error

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "config" / "schema.yaml"
DEFAULT_GENE_SELECTION = {"visium": "hvg_union", "xenium": "panel"}


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise input_error(path, f"invalid YAML ({problem})") from None


def _validator_with_defaults(schema: dict):
    """A jsonschema validator that also fills `default` values, as Snakemake's `validate` does."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def validate_schema(config: Any, where: str | Path = "config", schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Validate against the schema (filling defaults in place); raise one line naming the key."""
    if config is None or config == {}:
        raise input_error(where, "config is empty; it needs at least a `datasets` section")
    if not isinstance(config, dict):
        raise input_error(where, f"config must be a mapping, got {type(config).__name__}")
    schema = load_yaml(schema_path)
    validator = _validator_with_defaults(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "minLength" and err.instance == "":
            default = err.schema.get("default")
            hint = f"; leave it out for the default ({default})" if default is not None else ""
            raise input_error(where, f"{key}: must not be empty (an empty folder would put outputs at the "
                                     f"filesystem root){hint}")
        raise input_error(where, f"{key}: {err.message}")
    return config


def check_config(config: dict, where: str | Path = "config", planning: bool = True) -> dict:
    """Cross-field rules: unique samples, enough samples for cross-validation, source-specific keys.

    Fills derived defaults (gene selection by technology, per-dataset fold scheme, spot set and control-probe
    patterns) in place. With `planning` (Snakemake's main process, the CLI) it also checks what needs heavier
    imports (timm encoders, recipe weights, k against synthetic spot counts); a cluster job's own Snakemake
    process, which re-reads the workflow for every job, skips them: they were checked when the run was planned.
    """
    from cmrcnet.crossmodal.grid import expand_grid

    expand_grid(config, where)  # the cross-modal grid's cells become methods before anything checks methods
    if not config["datasets"] and not (config.get("hestbench") or {}).get("tasks"):
        raise input_error(where, "datasets: name at least one dataset (or hestbench.tasks for the HEST-Benchmark alone)")
    seen: dict[str, str] = {}
    for name, ds in config["datasets"].items():
        key = f"datasets.{name}"
        samples = ds["samples"]
        for sample in samples:
            if sample in seen:
                raise input_error(where, f"{key}.samples: sample {sample} is also listed in dataset {seen[sample]}")
            seen[sample] = name
        if len(samples) < 2:
            raise input_error(
                where, f"{key}.samples: only {len(samples)} sample ({samples[0]}); cross-validation needs at least 2"
            )
        if ds["source"] == "local" and not ds.get("local_dir"):
            raise input_error(where, f"{key}.local_dir: required when source is local")
        if ds["source"] != "local" and ds.get("local_dir"):
            raise input_error(where, f"{key}.local_dir: only used when source is local (source is {ds['source']})")
        unknown = sorted(set(ds["patients"]) - set(samples))
        if unknown:
            raise input_error(where, f"{key}.patients: unknown samples {', '.join(unknown)}")
        ds.setdefault("gene_selection", DEFAULT_GENE_SELECTION[ds["technology"]])
        ds.setdefault("folds_scheme", config["folds"]["scheme"])
        ds.setdefault("spots", config["spots"])
        ds.setdefault("control_probe_patterns", list(config["genes"]["control_probe_patterns"]))
    for name, method in config.get("methods", {}).items():
        unknown = sorted(set(method.get("datasets") or []) - set(config["datasets"]))
        if unknown:
            raise input_error(where, f"methods.{name}.datasets: unknown datasets {', '.join(unknown)}; "
                                     f"known: {', '.join(config['datasets'])}")
        if method.get("model") in PROBE_MODELS:
            _check_probe_method(method, f"methods.{name}", where, planning)
        if not planning:
            continue
        _check_encoder(method, f"methods.{name}.params.encoder", where)
        if method.get("recipe", "paper") != "paper":  # a recipe that needs weights must name fetchable ones
            from cmrcnet.recipes import effective_method

            effective_method(config, name, where=where)
    for name in config["datasets"] if planning else ():
        _check_k_fits_synthetic(config, name, where)
    for name, entry in config.get("predict_slides", {}).items():
        _check_slide_entry(config, name, entry, where)
    if planning:
        _check_hestbench(config, where)
    return config


# Models fitted on frozen embeddings from the cache (rule probe), not trained by rule train.
PROBE_MODELS = ("probe",)


def _check_probe_method(method: dict, key: str, where, planning: bool) -> None:
    """A probe method names a registered encoder and a probe kind with parameters it takes."""
    params = method.get("params") or {}
    unknown = sorted(set(params) - {"encoder", "probe", "probe_params"})
    if unknown:
        raise input_error(where, f"{key}.params: unknown {', '.join(unknown)}; a probe method takes encoder, probe "
                                 "and probe_params")
    for field in ("encoder", "probe"):
        if not isinstance(params.get(field), str):
            raise input_error(where, f"{key}.params.{field}: required for model probe")
    if method.get("recipe", "paper") != "paper":
        raise input_error(where, f"{key}.recipe: a probe has no training recipe; leave recipe out")
    if not planning:
        return
    _check_registered_encoder(params["encoder"], f"{key}.params.encoder", where)
    from cmrcnet.probes import make_probe

    try:
        make_probe(params["probe"], **(params.get("probe_params") or {}))
    except CMRCNetError as err:
        raise input_error(where, f"{key}.params: {err}") from None


def _check_registered_encoder(name: str, key: str, where) -> None:
    import difflib

    from cmrcnet.encoders import is_encoder, list_encoders

    if not is_encoder(name):
        close = difflib.get_close_matches(str(name), list_encoders(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(list_encoders())}"
        raise input_error(where, f"{key}: {name!r} is not a registered encoder (cmrcnet.encoders); {hint}")


def _check_hestbench(config: dict, where) -> None:
    bench = config.get("hestbench") or {}
    for i, name in enumerate(bench.get("encoders", [])):
        _check_registered_encoder(name, f"hestbench.encoders[{i}]", where)
    for name, entry in bench.get("trained_encoders", {}).items():
        key = f"hestbench.trained_encoders.{name}"
        if name in bench.get("encoders", []) or _is_registered(name):
            raise input_error(where, f"{key}: {name!r} is a registered encoder's name; choose another")
        if entry["dataset"] not in config["datasets"]:
            raise input_error(where, f"{key}.dataset: unknown dataset {entry['dataset']!r}")
        method = config["methods"].get(entry["method"], {})
        if method.get("model") not in RETRIEVAL_MODELS or entry["method"] not in methods_for(config, entry["dataset"]):
            raise input_error(where, f"{key}.method: {entry['method']!r} is not a retrieval method (cmrcnet, bleep) "
                                     f"trained on {entry['dataset']}")
    if bench.get("tasks") and not (bench.get("encoders") or bench.get("trained_encoders")):
        raise input_error(where, "hestbench.encoders: name at least one registered encoder to benchmark")
    for name in config.get("weights", {}).get("local", {}):
        _check_registered_encoder(name, f"weights.local.{name}", where)


def _is_registered(name: str) -> bool:
    from cmrcnet.encoders import is_encoder

    return is_encoder(name)


def probe_encoders(config: dict) -> list[str]:
    """The encoders whose embeddings the probe methods read (each embedded once per sample, whatever the probes)."""
    return sorted({m["params"]["encoder"] for m in config.get("methods", {}).values()
                   if m.get("model") in PROBE_MODELS})


def _check_slide_entry(config: dict, name: str, entry: dict, where) -> None:
    """A `predict_slides` entry must name a dataset and a method trained on it."""
    key = f"predict_slides.{name}"
    if entry["dataset"] not in config["datasets"]:
        raise input_error(where, f"{key}.dataset: unknown dataset {entry['dataset']!r}; known: "
                                 f"{', '.join(config['datasets'])}")
    if config["methods"].get(entry["method"], {}).get("model") in PROBE_MODELS:
        raise input_error(where, f"{key}.method: {entry['method']!r} is a probe on cached embeddings; slides are "
                                 "predicted by a trained method")
    if entry["method"] not in methods_for(config, entry["dataset"]):
        raise input_error(where, f"{key}.method: {entry['method']!r} is not a method trained on {entry['dataset']} "
                                 f"(those are: {', '.join(methods_for(config, entry['dataset'])) or 'none'})")


# Models that predict by averaging the top-k training spots (their class's `kind` is "retrieval"), and models built
# on a timm image encoder (`params.encoder`): known here without importing torch.
RETRIEVAL_MODELS = ("cmrcnet", "bleep", "crossmodal")
ENCODER_MODELS = ("cmrcnet", "bleep", "stnet", "foundation")


def _check_encoder(method: dict, key: str, where) -> None:
    """A method's `params.encoder` must be a timm architecture: known when planning, not after hours of queueing."""
    encoder = (method.get("params") or {}).get("encoder")
    if encoder is None or method.get("model") not in ENCODER_MODELS:
        return
    import difflib

    import timm

    if isinstance(encoder, str) and timm.is_model(encoder):
        return
    close = difflib.get_close_matches(str(encoder), timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise input_error(where, f"{key}: {encoder!r} is not a timm model{hint}")


def synthetic_spots_per_sample(ds: dict) -> int:
    """Spots of each synthetic sample of a dataset (every spot; the in-tissue ones are fewer)."""
    from cmrcnet.data.synthetic import spot_grid

    spec = ds.get("synthetic") or {}
    grid = spot_grid(ds["technology"], spec.get("width_um", 1600), spec.get("height_um", 1600))
    return len(grid["x_um"])


def _check_k_fits_synthetic(config: dict, dataset: str, where) -> None:
    """evaluation.k against the fewest training spots of a synthetic dataset's folds, known before any data exists
    (an upper bound: every spot of every training sample). Real data is checked when training starts."""
    ds = config["datasets"][dataset]
    ks = (config.get("evaluation") or {}).get("k") or []
    if ds["source"] != "synthetic" or not ks:
        return
    if not any(config["methods"][m]["model"] in RETRIEVAL_MODELS for m in methods_for(config, dataset)):
        return
    if ds.get("folds_scheme", "leave_one_sample_out") == "leave_one_patient_out":
        patients = [ds.get("patients", {}).get(s, s) for s in ds["samples"]]
        held_out = max(patients.count(p) for p in set(patients))
    else:
        held_out = 1
    n_train = len(ds["samples"]) - held_out
    per_sample = synthetic_spots_per_sample(ds)
    bound = n_train * per_sample
    if max(ks) > bound:
        spec, plural = ds.get("synthetic") or {}, "s" if n_train != 1 else ""
        raise input_error(where, f"evaluation.k: {max(ks)} neighbours, but a fold of dataset {dataset} trains on at "
                                 f"most {bound} spots ({n_train} sample{plural} x {per_sample} spots of "
                                 f"{spec.get('width_um', 1600):g} x {spec.get('height_um', 1600):g} um); lower "
                                 f"evaluation.k or enlarge datasets.{dataset}.synthetic")


def methods_for(config: dict, dataset: str) -> list[str]:
    """The methods trained on `dataset`: all of them, unless a method lists its datasets."""
    return [name for name, method in config.get("methods", {}).items()
            if method.get("datasets") is None or dataset in method["datasets"]]


def load_config(path: str | Path, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Read, validate and complete a config file, for use outside Snakemake."""
    config = load_yaml(path)
    validate_schema(config, where=path, schema_path=schema_path)
    return check_config(config, where=path)


def dataset_config(config: dict, dataset: str) -> dict:
    try:
        return config["datasets"][dataset]
    except KeyError:
        known = ", ".join(config["datasets"])
        raise CMRCNetError(f"config: unknown dataset {dataset!r}; known datasets: {known}") from None


def datasets_by_source(config: dict, source: str) -> list[str]:
    return [name for name, ds in config["datasets"].items() if ds["source"] == source]


def planned_folds(config: dict, dataset: str) -> list[int]:
    """Fold ids known before any data exists, so Snakemake can plan one training job per fold.

    Leave-one-sample-out has one fold per sample. Leave-one-patient-out needs every sample's patient in the
    config (`patients:`); the folds rule then writes the same grouping from those patients.
    """
    ds = dataset_config(config, dataset)
    if ds["folds_scheme"] == "leave_one_sample_out":
        return list(range(len(ds["samples"])))
    missing = [s for s in ds["samples"] if s not in ds["patients"]]
    if missing and ds["source"] != "synthetic":
        raise CMRCNetError(
            f"config: datasets.{dataset}.patients: leave_one_patient_out needs each sample's patient to plan the "
            f"folds; missing for {', '.join(missing)} (HEST's metadata/{{id}}.json lists them)"
        )
    patients = {ds["patients"].get(s, s) for s in ds["samples"]}
    if len(patients) < 2:
        raise CMRCNetError(f"config: datasets.{dataset}.patients: leave_one_patient_out needs at least 2 patients")
    return list(range(len(patients)))


FINGERPRINT_SECTIONS = ("seed", "genes", "normalise", "patches", "train")
PREDICTION_SETTINGS = ("k", "weighted", "tta")


def run_fingerprint(config: dict, dataset: str, method: str) -> str:
    """A short hash of every config entry that shapes one method's predictions on one dataset.

    Stored in each prediction file and checked when scoring, so a results folder made under another config
    (other genes, patches, training or k) is refused rather than averaged with this one's.
    """
    import hashlib
    import json

    relevant = {s: config.get(s) for s in FINGERPRINT_SECTIONS}
    relevant["evaluation"] = {k: config.get("evaluation", {}).get(k) for k in PREDICTION_SETTINGS}
    relevant["dataset"] = {k: v for k, v in dataset_config(config, dataset).items()
                           if k not in ("figure_gene", "paper_n_genes")}
    relevant["method"] = {k: v for k, v in config["methods"][method].items()
                          if k not in ("paper_name", "ablation", "datasets")}
    if config["methods"][method].get("model") in PROBE_MODELS:  # its features: how they were embedded
        relevant["encoders"] = config.get("encoders")
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_weights_note(encoder: str, weights_path: str | Path, local: dict) -> str | None:
    """One line saying where an encoder's missing weight file will come from (None when it is there): shown when
    a run is planned, so that a run without the weights says which file it needs instead of failing later."""
    if Path(weights_path).is_file():
        return None
    if encoder in local:
        return f"{weights_path} is missing: rule fetch_weights imports {local[encoder]} (weights.local.{encoder})"
    from cmrcnet.encoders import get_encoder

    hub = get_encoder(encoder).hub
    if hub is None:
        return (f"{weights_path} is missing and encoder {encoder} has no hub file: set weights.local.{encoder} to "
                "its weight file")
    access = f"gated: accept its terms at {hub.url} and set HF_TOKEN" if hub.gated else "public"
    return (f"{weights_path} is missing: rule fetch_weights will download {hub.filename} from {hub.repo_id} "
            f"({access}), or set weights.local.{encoder} to a local copy")

