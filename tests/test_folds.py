import pandas as pd
import pytest

from cmrcnet.data.folds import make_folds, read_folds, write_folds
from cmrcnet.errors import CMRCNetError


def test_leave_one_sample_out_holds_out_each_sample_once():
    folds = make_folds(["A", "B", "C"], {"A": "p1", "B": "p1", "C": "p2"}, "leave_one_sample_out")
    assert folds["fold"].nunique() == 3
    test = folds[folds.role == "test"]
    assert list(test["sample"]) == ["A", "B", "C"] and list(test["fold"]) == [0, 1, 2]
    assert (folds.groupby("fold")["role"].apply(lambda r: (r == "train").sum()) == 2).all()


def test_leave_one_patient_out_keeps_replicates_together():
    # READ: two patients with two replicates each (the paper's data).
    patients = {"ZEN36": "7", "ZEN40": "7", "ZEN48": "1", "ZEN49": "1"}
    folds = make_folds(list(patients), patients, "leave_one_patient_out")
    assert folds["fold"].nunique() == 2
    for _, rows in folds.groupby("fold"):
        test_patients = set(rows.loc[rows.role == "test", "patient"])
        train_patients = set(rows.loc[rows.role == "train", "patient"])
        assert len(test_patients) == 1 and not test_patients & train_patients


def test_one_patient_cannot_do_leave_one_patient_out():
    with pytest.raises(CMRCNetError, match="at least 2 patients"):
        make_folds(["A", "B"], {"A": "p", "B": "p"}, "leave_one_patient_out", "ds")


def test_one_sample_and_duplicates_are_refused():
    with pytest.raises(CMRCNetError, match="at least 2"):
        make_folds(["A"], {"A": "p"}, "leave_one_sample_out")
    with pytest.raises(CMRCNetError, match="listed twice: A"):
        make_folds(["A", "A", "B"], {"A": "p", "B": "q"}, "leave_one_sample_out")


def test_write_folds_reads_patients_from_metadata(tmp_path, write_sample):
    md = {name: write_sample(name, patient=p)[1] for name, p in [("S1", "P1"), ("S2", "P1"), ("S3", "P2")]}
    out = tmp_path / "folds.tsv"
    folds = write_folds(md, out, scheme="leave_one_patient_out", dataset="ds")
    assert folds["fold"].nunique() == 2
    back = read_folds(out)
    pd.testing.assert_frame_equal(back, folds, check_dtype=False)


def test_read_folds_refuses_empty_fold(tmp_path):
    path = tmp_path / "folds.tsv"
    pd.DataFrame({"fold": [0, 0], "sample": ["A", "B"], "role": ["train", "train"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(CMRCNetError, match="fold 0 is empty"):
        read_folds(path)


def test_config_patients_override_metadata(tmp_path, write_sample, caplog):
    md = {name: write_sample(name, patient="same")[1] for name in ("S1", "S2", "S3")}
    folds = write_folds(md, tmp_path / "f.tsv", scheme="leave_one_patient_out", dataset="ds",
                        patients={"S1": "A", "S2": "A", "S3": "B"})
    assert folds["fold"].nunique() == 2
    assert "using the config" in caplog.text
