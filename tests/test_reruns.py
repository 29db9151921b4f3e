"""Nothing stale: a config or data change between two `snakemake` runs reruns exactly the stages it shapes
(and everything after them), and scoring refuses predictions made from older gene or fold tables."""

from __future__ import annotations

import copy
import re
import shutil

import pandas as pd
import pytest
from test_pipeline import snakemake

pytestmark = pytest.mark.slow  # the Snakemake pipeline or real training: minutes on 2 cores

MINI = {
    "seed": 0,
    "genes": {"n_top_hvg": 60},
    "patches": {"size_px": 32},
    "datasets": {
        "mini": {
            "source": "synthetic", "technology": "visium", "samples": ["M1", "M2", "M3"],
            "patients": {"M1": "PA", "M2": "PA", "M3": "PB"},
            "synthetic": {"seed": 3, "width_um": 500, "height_um": 500, "n_genes": 150},
        },
    },
    "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "num_workers": 0, "amp": False},
    "resources": {"train": {"gpus": 0, "cpus": 1, "mem_mb": 1000, "runtime": 10}},
    "evaluation": {"k": [5], "top_genes": [50], "bootstrap": 100, "protocols": ["paper"]},
    "methods": {"stnet": {"model": "stnet", "params": {"encoder": "test_resnet", "input_size": 32}}},
}
DOWNSTREAM = {"train", "predict", "evaluate", "figures", "tables"}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reruns")
    result = snakemake(workdir, MINI, "all")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def planned(workdir, config) -> dict[str, int]:
    """The jobs a dry run plans, by rule."""
    result = snakemake(workdir, config, "all", "-n")
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text[text.index("Job stats:"):]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] not in ("total", "all")}


def changed(**sections) -> dict:
    config = copy.deepcopy(MINI)
    for path, value in sections.items():
        node = config
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return config


def test_unchanged_config_plans_nothing(done):
    assert planned(done, MINI) == {}


@pytest.mark.parametrize(("setting", "value", "first"), [
    ("patches__size_px", 16, {"extract_patches": 3}),
    ("genes__n_top_hvg", 5, {"select_genes": 1, "normalise": 3}),
    ("normalise", {"target_sum": 1000.0}, {"normalise": 3}),
    ("datasets__mini__folds_scheme", "leave_one_patient_out", {"folds": 1}),
    ("datasets__mini__spots", "all", {"normalise": 3, "extract_patches": 3}),
])
def test_an_upstream_setting_reruns_its_stage_and_everything_after(done, setting, value, first):
    jobs = planned(done, changed(**{setting: value}))
    assert {rule: jobs.get(rule) for rule in first} == first
    assert set(jobs) >= DOWNSTREAM, jobs
    untouched = {"synthesize", "select_genes", "normalise", "folds", "extract_patches"} - set(first)
    if "genes" in setting:
        untouched -= {"normalise"}
    assert not untouched & set(jobs), jobs


def test_a_replaced_slide_reruns_its_patches_and_everything_after(done):
    """New data for one sample (a replaced slide): its patches, then every model trained on it; the training
    jobs start afresh because their checkpoints belong to the old data (tests/test_train.py)."""
    wsis = done / "data" / "mini" / "wsis"
    original = (wsis / "M1.tif").read_bytes()
    try:
        shutil.copyfile(wsis / "M2.tif", wsis / "M1.tif")  # another slide in M1's place
        jobs = planned(done, MINI)
        assert jobs.get("extract_patches") == 1 and set(jobs) >= DOWNSTREAM, jobs
        assert not {"synthesize", "select_genes", "normalise", "folds"} & set(jobs), jobs
    finally:
        (wsis / "M1.tif").write_bytes(original)


def test_evaluation_setting_reruns_scoring_only(done):
    jobs = planned(done, changed(evaluation__bootstrap=200))
    assert set(jobs) == {"evaluate", "figures", "tables"}, jobs


def test_changed_genes_change_the_tables(done, tmp_path):
    before = pd.read_csv(done / "results" / "tables" / "summary.csv")
    result = snakemake(done, changed(genes__n_top_hvg=5), "all")
    assert result.returncode == 0, result.stderr[-4000:]
    after = pd.read_csv(done / "results" / "tables" / "summary.csv")
    genes = pd.read_csv(done / "processed" / "mini" / "genes.tsv", sep="\t")
    assert len(genes) < 60
    assert not before["mean_r"].equals(after["mean_r"])
    # back to the first config: the first tables again (seeded, deterministic on the CPU)
    result = snakemake(done, MINI, "all")
    assert result.returncode == 0, result.stderr[-4000:]
    again = pd.read_csv(done / "results" / "tables" / "summary.csv")
    pd.testing.assert_series_equal(before["mean_r"], again["mean_r"])


def test_scoring_refuses_predictions_from_older_tables(done):
    """Defense in depth: a prediction made from another genes.tsv than the one scored against is refused with one
    line naming the file (what the `evaluate` rule does with its inputs), whatever Snakemake was told to do."""
    from cmrcnet.errors import CMRCNetError
    from cmrcnet.evaluation.evaluate import evaluate_dataset

    proc = done / "processed" / "mini"
    predictions = sorted((done / "results" / "mini" / "predictions" / "stnet").glob("fold*.h5ad"))
    normalised = {s: proc / "st" / f"{s}.h5ad" for s in ("M1", "M2", "M3")}
    upstream = {"genes.tsv": proc / "genes.tsv", "folds.tsv": proc / "folds.tsv"}
    scores, _, _ = evaluate_dataset(predictions, normalised, dataset="mini", protocols=["paper"], top_genes=[50],
                                    upstream=upstream)
    assert len(scores)
    other = done / "other-genes.tsv"
    other.write_text((proc / "genes.tsv").read_text() + "\n")  # same genes, other bytes: another table
    with pytest.raises(CMRCNetError, match=r"fold0\.h5ad: predicted from another genes\.tsv"):
        evaluate_dataset(predictions, normalised, dataset="mini", protocols=["paper"], top_genes=[50],
                         upstream={**upstream, "genes.tsv": other})
