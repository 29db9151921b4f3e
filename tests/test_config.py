import copy
from pathlib import Path

import pytest
import yaml

from cmrcnet.config import REPO_ROOT, check_config, load_config, validate_schema
from cmrcnet.errors import CMRCNetError

DEMO = REPO_ROOT / "config" / "config.yaml"
PAPER = REPO_ROOT / "config" / "paper.yaml"


def write(tmp_path, config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config) if not isinstance(config, str) else config)
    return path


def minimal():
    return {"datasets": {"d1": {"source": "synthetic", "technology": "visium", "samples": ["S1", "S2"]}}}


def test_shipped_configs_are_valid_and_get_defaults():
    demo = load_config(DEMO)
    assert demo["patches"]["size_px"] == 224 and demo["patches"]["um_per_px"] == 0.5
    assert demo["datasets"]["demo-xenium"]["gene_selection"] == "panel"
    assert demo["datasets"]["demo-visium"]["gene_selection"] == "hvg_union"
    paper = load_config(PAPER)
    assert set(paper["datasets"]) == {"IDC-LymphNode", "SKCM", "READ", "COAD", "IDC", "PSC"}
    assert paper["datasets"]["READ"]["samples"] == ["ZEN36", "ZEN40", "ZEN48", "ZEN49"]
    assert all(d["source"] == "hest" for d in paper["datasets"].values())
    assert paper["genes"]["n_top_hvg"] == 1000


def test_paper_config_matches_shared_dataset_table():
    import pandas as pd

    table = REPO_ROOT / "cmrcnet" / "paper_data" / "datasets.csv"
    paper = load_config(PAPER)["datasets"]
    for row in pd.read_csv(table).itertuples():
        assert paper[row.dataset]["samples"] == row.hest_ids.split()
        assert paper[row.dataset]["marker_genes"] == row.marker_genes.split()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["datasets"]["d1"].update(samples=["S1", "S1"]), "datasets.d1.samples"),
        (lambda c: c["datasets"]["d1"].update(samples=["S1"]), "cross-validation needs at least 2"),
        (lambda c: c["datasets"]["d1"].update(source="ftp"), "datasets.d1.source"),
        (lambda c: c["datasets"]["d1"].update(technology="slideseq"), "datasets.d1.technology"),
        (lambda c: c.update(patches={"size_px": "big"}), "patches.size_px"),
        (lambda c: c.update(unknown_key=1), "unknown_key"),
        (lambda c: c["datasets"].update(d2={"source": "synthetic", "technology": "xenium", "samples": ["S2", "S3"]}),
         "sample S2 is also listed in dataset d1"),
        (lambda c: c["datasets"]["d1"].update(source="local"), "datasets.d1.local_dir: required"),
        (lambda c: c["datasets"]["d1"].update(patients={"S9": "P"}), "unknown samples S9"),
        (lambda c: c["datasets"].clear(), "datasets"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, mutate, expected):
    config = minimal()
    mutate(config)
    path = write(tmp_path, config)
    with pytest.raises(CMRCNetError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


@pytest.mark.parametrize("text, expected", [("", "config is empty"), ("datasets: [\n", "invalid YAML"),
                                            ("- a\n- b\n", "must be a mapping")])
def test_empty_or_broken_config(tmp_path, text, expected):
    with pytest.raises(CMRCNetError, match=expected):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(CMRCNetError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_do_not_override_given_values():
    config = minimal()
    config["datasets"]["d1"]["gene_selection"] = "panel"
    config["folds"] = {"scheme": "leave_one_patient_out"}
    check_config(validate_schema(copy.deepcopy(config)))
    done = check_config(validate_schema(config))
    assert done["datasets"]["d1"]["gene_selection"] == "panel"
    assert done["datasets"]["d1"]["folds_scheme"] == "leave_one_patient_out"


# The paper's "genes used" per dataset (Methods, "Datasets"; shared/paper/README.md's counts table)
PAPER_GENES_USED = {"IDC-LymphNode": 3467, "SKCM": 541, "READ": 3355, "COAD": 412, "IDC": 500, "PSC": 3355}


def test_paper_config_uses_the_papers_spots_genes_and_nan_rule():
    paper = load_config(PAPER)
    assert paper["spots"] == "all" and all(d["spots"] == "all" for d in paper["datasets"].values())
    assert {n: d["paper_n_genes"] for n, d in paper["datasets"].items()} == PAPER_GENES_USED
    panels = {n: d["panel_controls"] for n, d in paper["datasets"].items() if d["gene_selection"] == "panel"}
    assert panels == {"SKCM": "keep", "COAD": "drop", "IDC": "drop"}
    assert paper["evaluation"]["undefined_r"] == "zero"
    demo = load_config(DEMO)
    assert all(d["spots"] == "in_tissue" and d["panel_controls"] == "drop" and d["paper_n_genes"] is None
               for d in demo["datasets"].values())


def test_spots_and_control_patterns_default_per_dataset_and_can_be_overridden():
    config = minimal()
    config["datasets"]["d2"] = {"source": "synthetic", "technology": "xenium", "samples": ["S3", "S4"],
                                "spots": "in_tissue", "control_probe_patterns": ["^BLANK"]}
    config["spots"] = "all"
    done = check_config(validate_schema(config))
    assert done["datasets"]["d1"]["spots"] == "all" and done["datasets"]["d2"]["spots"] == "in_tissue"
    assert done["datasets"]["d1"]["control_probe_patterns"] == done["genes"]["control_probe_patterns"]
    assert done["datasets"]["d2"]["control_probe_patterns"] == ["^BLANK"]
    assert validate_schema(minimal())["evaluation"]["undefined_r"] == "zero"


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(spots="tissue"), "spots"),
    (lambda c: c["datasets"]["d1"].update(spots="some"), "datasets.d1.spots"),
    (lambda c: c["datasets"]["d1"].update(panel_controls="maybe"), "datasets.d1.panel_controls"),
    (lambda c: c["datasets"]["d1"].update(paper_n_genes=0), "datasets.d1.paper_n_genes"),
    (lambda c: c.update(evaluation={"undefined_r": "nan"}), "evaluation.undefined_r"),
])
def test_new_keys_are_validated(tmp_path, mutate, expected):
    config = minimal()
    mutate(config)
    with pytest.raises(CMRCNetError, match=expected):
        load_config(write(tmp_path, config))


@pytest.mark.parametrize("entry, message", [
    ({"slide": "s.tif", "dataset": "d2", "method": "m"}, "predict_slides.new.dataset: unknown dataset 'd2'; known: d1"),
    ({"slide": "s.tif", "dataset": "d1", "method": "other"},
     "predict_slides.new.method: 'other' is not a method trained on d1 (those are: m)"),
    ({"slide": "", "dataset": "d1", "method": "m"}, "predict_slides.new.slide"),
    ({"slide": "s.tif", "dataset": "d1", "method": "m", "mpp": 0}, "predict_slides.new.mpp"),
    ({"slide": "s.tif", "dataset": "d1", "method": "m", "layout": "hex"}, "predict_slides.new.layout"),
])
def test_predict_slides_entries_name_a_trained_dataset_and_method(tmp_path, entry, message):
    config = minimal()
    config["methods"] = {"m": {"model": "stnet"}}
    config["predict_slides"] = {"new": entry}
    with pytest.raises(CMRCNetError) as err:
        load_config(write(tmp_path, config))
    assert message in str(err.value)


def test_predict_slides_default_to_none_and_an_entry_gets_its_defaults(tmp_path):
    config = minimal()
    assert load_config(write(tmp_path, config))["predict_slides"] == {}
    config["methods"] = {"m": {"model": "stnet"}}
    config["predict_slides"] = {"new": {"slide": "s.tif", "dataset": "d1", "method": "m"}}
    entry = load_config(write(tmp_path, config))["predict_slides"]["new"]
    assert entry == {"slide": "s.tif", "dataset": "d1", "method": "m", "mpp": None, "tissue": None, "layout": None,
                     "pitch_um": None, "k": None, "genes": []}
