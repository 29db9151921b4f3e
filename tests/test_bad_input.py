"""Issue 10, items 4-7: bad input stops with one line naming the file or config key, as early as it can be known,
and leaves no output behind; the figures and tables say what they could not compute; orphaned temporary files
of a killed write are cleaned by the next write of the same output."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import make_counts_adata

from cmrcnet.cli import main
from cmrcnet.config import REPO_ROOT, load_config, load_yaml
from cmrcnet.errors import CMRCNetError

LOGGER = logging.getLogger("cmrcnet")


@contextlib.contextmanager
def restored_logging():
    """`cmrcnet.cli.main` sets up the cmrcnet logger for a terminal (no propagation); put it back afterwards so
    that other tests' caplog still sees the warnings."""
    saved = (list(LOGGER.handlers), LOGGER.level, LOGGER.propagate, list(logging.getLogger("py.warnings").handlers))
    try:
        yield
    finally:
        LOGGER.handlers[:] = saved[0]
        LOGGER.setLevel(saved[1])
        LOGGER.propagate = saved[2]
        logging.getLogger("py.warnings").handlers = saved[3]
        logging.captureWarnings(False)


@pytest.fixture(autouse=True)
def _logging_back():
    with restored_logging():
        yield


def cli_error(capsys, *argv) -> str:
    """Run `cmrcnet ARGV` as a user does; it must exit 1 with exactly one error line (no traceback): return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [line.split(" ERROR ", 1)[1] for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def cli_ok(*argv) -> None:
    main([str(a) for a in argv])


def write_genes(path: Path, genes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("gene\n" + "\n".join(genes) + "\n")
    return path


def leftovers(folder: Path) -> list[str]:
    """Every file under `folder` (outputs and temporary files alike)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ shared data


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """One small synthetic Visium sample (slide with pixel-size tags, counts, metadata)."""
    from cmrcnet.data.synthetic import synthesize_sample

    root = tmp_path_factory.mktemp("slide")
    synthesize_sample(root, "S1", technology="visium", sample_index=0, seed=1, patient="S1", width_um=500,
                      height_um=500, n_genes=60)
    return {"wsi": root / "wsis" / "S1.tif", "st": root / "st" / "S1.h5ad", "metadata": root / "metadata" / "S1.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two synthetic samples taken through the real stages, a config using them, and a trained STNet fold 0."""
    from cmrcnet.data.folds import write_folds
    from cmrcnet.data.genes import normalise_sample, select_genes
    from cmrcnet.data.patches import extract_patches
    from cmrcnet.data.synthetic import synthesize_sample

    root = tmp_path_factory.mktemp("run")
    raw, proc = root / "data" / "d1", root / "processed" / "d1"
    samples = ["S1", "S2"]
    for i, s in enumerate(samples):
        synthesize_sample(raw, s, technology="visium", sample_index=i, seed=4, patient=s, width_um=600,
                          height_um=600, n_genes=60)
    st = {s: raw / "st" / f"{s}.h5ad" for s in samples}
    select_genes(st, proc / "genes.tsv", method="hvg_union", dataset="d1", n_top_hvg=20)
    for s in samples:
        normalise_sample(st[s], proc / "genes.tsv", proc / "st" / f"{s}.h5ad", sample=s, dataset="d1")
        extract_patches(raw / "wsis" / f"{s}.tif", st[s], raw / "metadata" / f"{s}.json", proc / "patches" / f"{s}.h5",
                        proc / "spots" / f"{s}.parquet", sample=s, patch_px=32, um_per_px=2.0, progress=False)
    write_folds({s: raw / "metadata" / f"{s}.json" for s in samples}, proc / "folds.tsv",
                scheme="leave_one_sample_out", dataset="d1")
    config = {
        "data_dir": str(root / "data"), "processed_dir": str(root / "processed"), "models_dir": str(root / "models"),
        "results_dir": str(root / "results"),
        "datasets": {"d1": {"source": "local", "local_dir": str(raw), "technology": "visium", "samples": samples}},
        "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "num_workers": 0, "amp": False,
                  "patience": None},
        "evaluation": {"k": [5]},
        "methods": {"bleep": {"model": "bleep", "params": {"encoder": "test_resnet", "input_size": 32, "embed_dim": 16}},
                    "stnet": {"model": "stnet", "params": {"encoder": "test_resnet", "input_size": 32}}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with restored_logging():
        cli_ok("train", path, "d1", "stnet", "0", "--device", "cpu")
    return {"root": root, "config": config, "config_path": path, "processed": proc}


def config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def minimal_config() -> dict:
    return {"datasets": {"d1": {"source": "synthetic", "technology": "visium", "samples": ["S1", "S2"]}}}


# ------------------------------------------------------------------------- item 4: a sample without counts


def zero_counts(n_spots=40, genes=tuple(f"G{i}" for i in range(8))):
    adata = make_counts_adata(n_spots=n_spots, genes=genes)
    adata.X = sp.csr_matrix((n_spots, len(genes)), dtype=np.int32)
    return adata


@pytest.mark.parametrize("method", ["hvg_union", "panel"])
def test_all_zero_sample_stops_gene_selection_naming_the_file(tmp_path, capsys, write_sample, method):
    good, _ = write_sample("A", make_counts_adata(genes=tuple(f"G{i}" for i in range(8))))
    empty, _ = write_sample("Z", zero_counts())
    out = tmp_path / "out" / "genes.tsv"
    message = cli_error(capsys, "select-genes", out, good, empty, "--method", method, "--n-top-hvg", 3)
    assert message.startswith(f"{empty}: no counts") and "all zero" in message
    assert leftovers(tmp_path / "out") == []


def test_all_zero_sample_stops_normalisation_naming_the_file(tmp_path, capsys, write_sample):
    """A panel dataset whose genes were chosen before a sample lost its counts: stop at normalise, not at evaluate."""
    empty, _ = write_sample("Z", zero_counts())
    genes = write_genes(tmp_path / "genes.tsv", ["G0", "G1"])
    out = tmp_path / "out" / "Z.h5ad"
    message = cli_error(capsys, "normalise", empty, genes, out)
    assert message.startswith(f"{empty}: no counts")
    assert leftovers(tmp_path / "out") == []


def test_no_gene_detected_in_enough_spots_names_the_file_and_key(tmp_path):
    from cmrcnet.data.genes import select_genes

    path = tmp_path / "A.h5ad"
    make_counts_adata(n_spots=20).write_h5ad(path)
    with pytest.raises(CMRCNetError, match=r"A\.h5ad: no gene is detected in at least 50 in-tissue spots "
                                           r"\(genes\.min_spots\)"):
        select_genes({"A": path}, tmp_path / "genes.tsv", method="hvg_union", dataset="d", n_top_hvg=2, min_spots=50)
    assert not (tmp_path / "genes.tsv").exists()


# ------------------------------------------------------------ item 5: figures and tables without top-50 or markers


GENES = [f"G{i}" for i in range(12)]


def _truth(seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, np.linspace(0.5, 3.0, len(GENES)), size=(n, len(GENES))).astype(np.float32)


def write_prediction(path: Path, *, method: str, fold: int, sample: str, n: int = 40, model_label=None) -> Path:
    """A file as `cmrcnet predict` writes it: X = truth, layer `pred` = a noisy prediction."""
    truth = _truth(fold, n)
    obs = pd.DataFrame({"sample": sample, "barcode": [f"b{i}" for i in range(n)],
                        "x": 60.0 + np.arange(n) * 10.0, "y": 80.0})
    obs.index = (sample + ":" + obs["barcode"]).to_numpy()
    pred = truth + np.random.default_rng(fold + 7).normal(0, 1.0, truth.shape).astype(np.float32)
    adata = ad.AnnData(X=truth, obs=obs, var=pd.DataFrame(index=GENES), layers={"pred": pred})
    adata.uns["labels"] = {"pred": model_label or method}
    adata.uns["cmrcnet"] = json.dumps({"method": method, "fold": fold, "labels": adata.uns["labels"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def write_normalised(folder: Path, samples) -> dict:
    paths = {}
    for i, s in enumerate(samples):
        p = folder / f"{s}.h5ad"
        p.parent.mkdir(parents=True, exist_ok=True)
        ad.AnnData(X=_truth(i), var=pd.DataFrame(index=GENES)).write_h5ad(p)
        paths[s] = p
    return paths


def scored(tmp_path: Path, dataset: str, markers, methods=("stnet",), top_genes=(5,), **kwargs):
    from cmrcnet.evaluation.evaluate import evaluate_dataset

    samples = ["P1", "P2"]
    paths = [write_prediction(tmp_path / dataset / m / f"fold{f}.h5ad", method=m, fold=f, sample=samples[f])
             for m in methods for f in range(2)]
    normalised = write_normalised(tmp_path / dataset / "st", samples)
    scores, sets, labels = evaluate_dataset(paths, normalised, dataset=dataset, marker_genes=markers,
                                            top_genes=list(top_genes), **kwargs)
    return paths, scores, sets, labels


@pytest.mark.parametrize("markers, drawn", [([], False), (["G3"], True)])
def test_figures_without_top50_draw_what_they_can_and_say_why(tmp_path, slide, caplog, markers, drawn):
    from cmrcnet.figures.paper import FIGURES, dataset_figures

    paths, scores, sets, _ = scored(tmp_path, "d", markers, protocols=["paper"])
    history = tmp_path / "history.csv"
    pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [1.1, 0.9]}).to_csv(history, index=False)
    out = tmp_path / "figures"
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        dataset_figures(dataset="d", prediction_paths=paths, scores=scores, gene_sets=sets, labels=["stnet"],
                        histories={"stnet": history}, wsis={"P1": slide["wsi"], "P2": slide["wsi"]},
                        samples=["P1", "P2"], out_dir=out, markers=markers, thumbnail_px=256)
    assert all((out / f"{name}.{ext}").is_file() for name in FIGURES for ext in ("png", "pdf"))
    assert "fig2_boxplots: panel skipped, HEG50 not computed: evaluation.top_genes has no 50" in caplog.text
    assert "HVG50 not computed: evaluation.top_genes has no 50" in caplog.text
    assert ("marker not computed: the dataset lists no marker_genes" in caplog.text) is not drawn


def test_tables_say_why_a_column_shows_a_dash(tmp_path, caplog):
    from cmrcnet.evaluation.tables import build_tables, to_markdown

    parts = [scored(tmp_path, "d1", ["G3"], methods=("stnet", "fm"), protocols=["paper"]),
             scored(tmp_path, "d2", ["NOPE"], methods=("stnet", "fm"), protocols=["paper"])]
    scores = pd.concat([p[1] for p in parts], ignore_index=True)
    sets = pd.concat([p[2] for p in parts], ignore_index=True)
    labels = pd.concat([p[3] for p in parts], ignore_index=True)
    config = {"seed": 0, "evaluation": {"k": [5], "top_genes": [5], "protocols": ["paper"], "bootstrap": 100},
              "datasets": {"d1": {"marker_genes": ["G3"]}, "d2": {"marker_genes": ["NOPE"]}},
              "methods": {"stnet": {"model": "stnet", "params": {}}, "fm": {"model": "foundation", "params": {}}}}
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        tables, _ = build_tables(scores, sets, labels, config, n_boot=100)
    table1, table1_sets, title, note = tables["table1_top50"]
    assert "HEG50 not computed: evaluation.top_genes has no 50" in note
    assert "marker not computed: none of d2's marker genes (NOPE) is measured" in note
    markdown = to_markdown(table1, table1_sets, title, note)
    row = next(line for line in markdown.splitlines() if line.startswith("| d1 | stnet"))
    assert row.count("| - ") == 2  # HEG50 and HVG50; the marker column has a value
    note4 = tables["table4_foundation"][3]
    assert "HEG50 not computed: evaluation.top_genes has no 50" in note4 and "marker" not in note4.split('"-"')[1]
    assert "evaluation.top_genes has no 50" in caplog.text


# ------------------------------------------------------------------------------------------ item 6: the rest


@pytest.mark.parametrize("key", ["data_dir", "processed_dir", "log_dir", "results_dir", "models_dir", "weights.dir",
                                 "datasets.d1.local_dir"])
def test_empty_folder_keys_are_refused(tmp_path, key):
    config = minimal_config()
    if key == "datasets.d1.local_dir":
        config["datasets"]["d1"].update(source="local", local_dir="")
    elif key == "weights.dir":
        config["weights"] = {"dir": ""}
    else:
        config[key] = ""
    path = config_file(tmp_path, config)
    with pytest.raises(CMRCNetError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: must not be empty") and "\n" not in message


def _killed_write(path: Path) -> Path:
    """A process killed by SIGKILL in the middle of writing `path` through atomic_path; returns its temporary file."""
    code = ("import os, signal, sys\nfrom cmrcnet.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'x' * 100000)\n"
            "    print(tmp, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    tmp = Path(proc.stdout.strip())
    assert tmp.is_file() and tmp.parent == path.parent
    return tmp


def test_temporary_file_of_a_killed_write_is_removed_by_the_next_write(tmp_path, write_sample, capsys):
    _, m1 = write_sample("S1", patient="P1")
    _, m2 = write_sample("S2", patient="P2")
    out = tmp_path / "out" / "folds.tsv"
    tmp = _killed_write(out)
    assert not out.exists()
    cli_ok("folds", out, m1, m2)  # the user reruns the step
    assert not tmp.exists() and out.is_file()
    assert leftovers(tmp_path / "out") == ["folds.tsv"]
    assert "left by an interrupted write" in capsys.readouterr().err


def test_temporary_file_of_a_running_writer_is_kept(tmp_path):
    from cmrcnet.io import write_json

    out = tmp_path / "result.json"
    code = ("import sys, time\nfrom cmrcnet.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    print(tmp, flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.is_file()
        write_json(out, {"a": 1})
        assert tmp.is_file() and json.loads(out.read_text()) == {"a": 1}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("values, n_in", [(["True", "False"] * 20, 20), (["1", "0", "0", "0"] * 10, 10),
                                          ([" true", "FALSE"] * 20, 20)])
def test_in_tissue_stored_as_strings_is_read(tmp_path, write_sample, values, n_in):
    st, _ = write_sample("S1", make_counts_adata(n_spots=len(values), in_tissue=values))
    genes = write_genes(tmp_path / "genes.tsv", ["A", "B"])
    cli_ok("normalise", st, genes, tmp_path / "out" / "S1.h5ad")
    assert ad.read_h5ad(tmp_path / "out" / "S1.h5ad").n_obs == n_in


def test_in_tissue_with_other_strings_is_an_error_naming_the_file(tmp_path, write_sample, capsys):
    st, _ = write_sample("S1", make_counts_adata(n_spots=20, in_tissue=["yes", "no"] * 10))
    genes = write_genes(tmp_path / "genes.tsv", ["A", "B"])
    message = cli_error(capsys, "normalise", st, genes, tmp_path / "out" / "S1.h5ad")
    assert message == f"{st}: obs['in_tissue'] holds 20 values that are not 0/1 or True/False (e.g. 'yes', 'no')"
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("value", [0, -0.5, "abc", None])
def test_bad_pixel_size_in_the_metadata_names_the_file_and_key(tmp_path, slide, capsys, value):
    meta = json.loads(slide["metadata"].read_text())
    meta.pop("pixel_size_um_embedded")
    meta["pixel_size_um_estimated"] = value
    metadata = tmp_path / "S1.json"
    metadata.write_text(json.dumps(meta))
    out = tmp_path / "out"
    args = ["patches", slide["wsi"], slide["st"], metadata, out / "S1.h5", out / "S1.parquet", "--size-px", 32,
            "--um-per-px", 2]
    if value is None:  # no pixel size in the metadata at all: the TIFF tags are used, as before
        cli_ok(*args)
        assert leftovers(out) == ["S1.h5", "S1.parquet"]
        return
    message = cli_error(capsys, *args)
    assert message == (f"{metadata}: pixel_size_um_estimated: {value!r} is not a pixel size (a positive number of "
                       "um per pixel)")
    assert leftovers(out) == []


def test_a_test_sample_with_few_spots_is_scored_with_a_warning(tmp_path, caplog):
    from cmrcnet.evaluation.evaluate import evaluate_dataset
    from cmrcnet.evaluation.metrics import MIN_TEST_SPOTS

    paths = [write_prediction(tmp_path / "p0.h5ad", method="stnet", fold=0, sample="TINY", n=3),
             write_prediction(tmp_path / "p1.h5ad", method="stnet", fold=1, sample="BIG", n=40)]
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        scores, _, _ = evaluate_dataset(paths, {}, dataset="d", top_genes=[5], protocols=["paper"])
    assert MIN_TEST_SPOTS == 10 and set(scores["sample"]) == {"TINY", "BIG"}
    assert "sample TINY: only 3 spots (fewer than 10)" in caplog.text and "BIG: only" not in caplog.text


def test_unknown_timm_encoder_is_refused_when_planning(tmp_path):
    config = minimal_config()
    config["methods"] = {"bleep": {"model": "bleep", "params": {"encoder": "resnet5"}}}
    path = config_file(tmp_path, config)
    with pytest.raises(CMRCNetError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: methods.bleep.params.encoder: 'resnet5' is not a timm model; did you mean ")
    assert "resnet50" in message and "\n" not in message


def test_k_beyond_a_synthetic_datasets_training_spots_is_refused_when_planning(tmp_path):
    from cmrcnet.config import synthetic_spots_per_sample

    config = minimal_config()
    config["datasets"]["d1"]["synthetic"] = {"width_um": 500, "height_um": 500}
    config["methods"] = {"bleep": {"model": "bleep"}, "stnet": {"model": "stnet"}}
    config["evaluation"] = {"k": [5, 500]}
    path = config_file(tmp_path, config)
    per_sample = synthetic_spots_per_sample({"technology": "visium", "synthetic": {"width_um": 500, "height_um": 500}})
    with pytest.raises(CMRCNetError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: evaluation.k: 500 neighbours, but a fold of dataset d1 trains on at most "
                              f"{per_sample} spots (1 sample x {per_sample} spots of 500 x 500 um); lower evaluation.k "
                              "or enlarge datasets.d1.synthetic")
    config["methods"] = {"stnet": {"model": "stnet"}}  # no retrieval method: k is not used
    load_config(config_file(tmp_path, config))


def test_k_beyond_the_training_spots_stops_before_training(run, tmp_path, capsys):
    from cmrcnet.data.datasets import load_fold

    fold = load_fold(run["processed"], 0)
    n_train = sum(len(i) for i in fold.all_spots(fold.train_samples).values())
    config = {**run["config"], "evaluation": {"k": [n_train + 1]}, "models_dir": str(tmp_path / "models")}
    message = cli_error(capsys, "train", config_file(tmp_path, config), "d1", "bleep", "0", "--device", "cpu")
    assert message == (f"evaluation.k ({n_train + 1}): more neighbours than the {n_train} training spots of fold 0 "
                       f"({', '.join(fold.train_samples)}); lower evaluation.k")
    assert leftovers(tmp_path / "models") == []


def test_hest_bench_uses_the_genes_that_qualify_labelled_by_their_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        _, scores, sets, _ = scored(tmp_path, "d", [], protocols=["hest-bench"], hest_bench_n=100000)
    bench = sets[sets["protocol"] == "hest-bench"]
    assert bench["gene_set"].unique().tolist() == [f"hest{len(GENES)}"] and len(set(bench["gene"])) == len(GENES)
    assert "evaluation.hest_bench_genes = 100000" in caplog.text and f"only {len(GENES)} genes" in caplog.text


def test_predict_before_training_finished_says_so(run, tmp_path, capsys):
    config = {**run["config"], "results_dir": str(tmp_path / "results")}
    message = cli_error(capsys, "predict", config_file(tmp_path, config), "d1", "bleep", "0", "--device", "cpu")
    model = Path(run["config"]["models_dir"]) / "d1" / "bleep" / "fold0" / "best.pt"
    assert message == f"{model}: model checkpoint not found (training not finished?)"
    assert leftovers(tmp_path / "results") == []


# ---------------------------------------------------------------------------------------------- item 7: the CLI


def test_predict_refuses_a_checkpoint_of_another_model(run, tmp_path, capsys):
    config = {**run["config"], "results_dir": str(tmp_path / "results")}
    stnet = Path(run["config"]["models_dir"]) / "d1" / "stnet" / "fold0" / "best.pt"
    message = cli_error(capsys, "predict", config_file(tmp_path, config), "d1", "bleep", "0", "--model", stnet,
                        "--device", "cpu")
    assert message == (f"{stnet}: a stnet model (method stnet), but the method to predict is a bleep model; give the "
                       "checkpoint of that method")
    assert leftovers(tmp_path / "results") == []


@pytest.mark.parametrize("command", ["train", "predict"])
@pytest.mark.parametrize("device, expected", [
    ("cuda", "--device cuda: no CUDA GPU is visible here"),
    ("bogus", "--device bogus: not a device; use cpu, cuda or cuda:N"),
], ids=["cuda-without-gpu", "bogus"])
def test_device_is_checked_before_any_work(run, tmp_path, capsys, monkeypatch, command, device, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = {**run["config"], "results_dir": str(tmp_path / "results"), "models_dir": str(tmp_path / "models")}
    message = cli_error(capsys, command, config_file(tmp_path, config), "d1", "stnet", "0", "--device", device)
    assert message.startswith(expected)
    assert leftovers(tmp_path / "results") == [] and leftovers(tmp_path / "models") == []


@pytest.mark.parametrize("flags, expected", [
    (["--size-px", 0], "--size-px: must be a whole number of pixels, at least 16; got 0"),
    (["--um-per-px", -1], "--um-per-px: must be a resolution above 0 and at most 100 um per pixel (the paper: 0.5); "
                          "got -1.0"),
    (["--um-per-px", 1000], "--um-per-px: must be a resolution above 0 and at most 100 um per pixel (the paper: 0.5); "
                            "got 1000.0"),
], ids=["size-0", "um-negative", "um-1000"])
def test_patch_flags_out_of_range(tmp_path, slide, capsys, flags, expected):
    out = tmp_path / "out"
    message = cli_error(capsys, "patches", slide["wsi"], slide["st"], slide["metadata"], out / "S1.h5",
                        out / "S1.parquet", *flags)
    assert message == expected
    assert leftovers(out) == []


def test_patch_limits_match_the_schema():
    from cmrcnet.data.patches import MAX_UM_PER_PX, MIN_PATCH_PX

    patches = load_yaml(REPO_ROOT / "config" / "schema.yaml")["properties"]["patches"]["properties"]
    assert patches["size_px"]["minimum"] == MIN_PATCH_PX and patches["um_per_px"]["maximum"] == MAX_UM_PER_PX


def test_schema_bounds_the_patch_resolution(tmp_path):
    config = minimal_config()
    config["patches"] = {"um_per_px": 1000}
    with pytest.raises(CMRCNetError, match="patches.um_per_px: 1000 is greater than the maximum of 100"):
        load_config(config_file(tmp_path, config))


def test_normalise_refuses_an_h5ad_as_the_gene_table(tmp_path, write_sample, capsys):
    st, _ = write_sample("S1")
    message = cli_error(capsys, "normalise", st, st, tmp_path / "out" / "S1.h5ad")
    assert message.startswith(f"{st}: not a gene table (this is an .h5ad, not a gene table): expected a "
                              "tab-separated text file with a 'gene' column")
    assert leftovers(tmp_path / "out") == []


def test_normalise_refuses_a_target_sum_below_zero(tmp_path, write_sample, capsys):
    st, _ = write_sample("S1")
    genes = write_genes(tmp_path / "genes.tsv", ["A", "B"])
    message = cli_error(capsys, "normalise", st, genes, tmp_path / "out" / "S1.h5ad", "--target-sum", -1)
    assert message == "--target-sum: must be a number above 0, got -1"
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("n", [0, -3])
def test_select_genes_refuses_no_or_negative_hvgs(tmp_path, write_sample, capsys, n):
    st, _ = write_sample("S1")
    message = cli_error(capsys, "select-genes", tmp_path / "out" / "genes.tsv", st, "--method", "hvg_union",
                        "--n-top-hvg", n)
    assert message == f"--n-top-hvg: must be at least 1, got {n}"
    assert leftovers(tmp_path / "out") == []


def test_output_folder_that_does_not_exist_is_created(tmp_path, write_sample):
    """Chosen behaviour: like Snakemake, a step creates the folders of its outputs."""
    _, m1 = write_sample("S1", patient="P1")
    _, m2 = write_sample("S2", patient="P2")
    cli_ok("folds", tmp_path / "new" / "deeper" / "folds.tsv", m1, m2)
    assert leftovers(tmp_path / "new") == ["deeper/folds.tsv"]


def test_output_that_is_a_folder_or_under_a_file_is_one_line(tmp_path, write_sample, capsys):
    st, _ = write_sample("S1")
    genes = write_genes(tmp_path / "genes.tsv", ["A", "B"])
    folder = tmp_path / "existing"
    folder.mkdir()
    assert cli_error(capsys, "normalise", st, genes, folder) == f"{folder}: is a folder; give the output file's name"
    slash = f"{tmp_path / 'newdir'}/"
    assert cli_error(capsys, "normalise", st, genes, slash) == f"{slash}: names a folder; give the output file's name"
    assert not (tmp_path / "newdir").exists()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    message = cli_error(capsys, "normalise", st, genes, blocker / "S1.h5ad")
    assert message.startswith(f"{blocker / 'S1.h5ad'}: cannot create the output (")
    assert leftovers(folder) == [] and blocker.read_text() == "x"


def test_concurrent_writer_check_uses_only_this_process(tmp_path):
    """Nested atomic writes of one process keep each other's temporary files."""
    from cmrcnet.io import atomic_path

    out = tmp_path / "x.txt"
    with atomic_path(out) as outer:
        outer.write_text("outer")
        with atomic_path(out) as inner:
            assert outer.is_file()
            inner.write_text("inner")
        assert outer.is_file()
    assert out.read_text() == "outer" and leftovers(tmp_path) == ["x.txt"]
