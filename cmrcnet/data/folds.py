"""Cross-validation folds: leave-one-sample-out (the paper) or leave-one-patient-out (HEST-bench)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from cmrcnet.data.layout import read_metadata
from cmrcnet.errors import input_error
from cmrcnet.io import write_table

log = logging.getLogger("cmrcnet")
SCHEMES = ("leave_one_sample_out", "leave_one_patient_out")


def make_folds(samples: Sequence[str], patients: Mapping[str, str], scheme: str, dataset: str = "dataset") -> pd.DataFrame:
    """One row per (fold, sample): role is `test` for the held-out sample(s) and `train` otherwise."""
    if len(set(samples)) != len(samples):
        dupes = sorted({s for s in samples if list(samples).count(s) > 1})
        raise input_error(f"dataset {dataset}", f"sample listed twice: {', '.join(dupes)}")
    if len(samples) < 2:
        raise input_error(f"dataset {dataset}", f"{len(samples)} sample(s); cross-validation needs at least 2")
    if scheme == "leave_one_sample_out":
        groups = [[s] for s in samples]
    elif scheme == "leave_one_patient_out":
        by_patient: dict[str, list[str]] = {}
        for s in samples:
            by_patient.setdefault(patients[s], []).append(s)
        if len(by_patient) < 2:
            raise input_error(
                f"dataset {dataset}",
                f"leave_one_patient_out needs at least 2 patients, the metadata gives 1 ({next(iter(by_patient))})",
            )
        groups = [by_patient[p] for p in sorted(by_patient)]
    else:
        raise input_error("folds.scheme", f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    rows = []
    for fold, test in enumerate(groups):
        for s in samples:
            rows.append({"fold": fold, "sample": s, "role": "test" if s in test else "train", "patient": patients[s]})
    return pd.DataFrame(rows)


def patients_from_metadata(
    metadata_files: Mapping[str, str | Path], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Patient per sample: the config's override, else HEST metadata, else the sample is its own patient."""
    overrides = overrides or {}
    patients = {}
    for sample, path in metadata_files.items():
        patient = read_metadata(path).get("patient")
        if sample in overrides:
            if patient is not None and str(patient) != overrides[sample]:
                log.warning("%s: patient %s in metadata, %s in the config; using the config", path, patient,
                            overrides[sample])
            patient = overrides[sample]
        elif patient is None or str(patient).strip() in ("", "nan", "None"):
            log.warning("%s: no patient in metadata; treating sample %s as its own patient", path, sample)
            patient = sample
        patients[sample] = str(patient)
    return patients


def write_folds(
    metadata_files: Mapping[str, str | Path], out_tsv: str | Path, *, scheme: str, dataset: str,
    patients: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    folds = make_folds(list(metadata_files), patients_from_metadata(metadata_files, patients), scheme, dataset)
    write_table(out_tsv, folds)
    log.info("dataset %s: %d folds (%s)", dataset, folds["fold"].nunique(), scheme)
    return folds


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds table and check it: every fold has a test sample and at least one training sample."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "folds table not found")
    folds = pd.read_csv(path, sep="\t")
    missing = {"fold", "sample", "role"} - set(folds.columns)
    if missing:
        raise input_error(path, f"missing columns {', '.join(sorted(missing))}")
    for fold, rows in folds.groupby("fold"):
        roles = set(rows["role"])
        if "test" not in roles or "train" not in roles:
            raise input_error(path, f"fold {fold} is empty on one side (roles present: {', '.join(sorted(roles))})")
    return folds
