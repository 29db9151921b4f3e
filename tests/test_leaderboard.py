"""The HEST-Benchmark leaderboard: published numbers as package data, ours beside them."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cmrcnet.data.hestbench import PUBLISHED_TASKS, TASKS
from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.leaderboard import (
    AVERAGE,
    NOT_PUBLISHED,
    leaderboard,
    load_published,
    pick_source,
    registry_name,
    to_markdown,
    write_leaderboard,
)

NEWEST_FULL = "hest-readme-2025-05"
ISSUE = "issue11-quote-2026"


def test_published_numbers_as_shipped():
    pub = load_published()
    assert set(pub["source"]) == {NEWEST_FULL, "hest-readme-2024-08-30", ISSUE, "uni-readme-2025-03"}
    table = pub[pub["source"] == NEWEST_FULL]
    assert set(table["task"]) == {*PUBLISHED_TASKS, AVERAGE}  # HCC is not in the published tables
    assert table.groupby("encoder").size().eq(10).all() and table["encoder"].nunique() == 12
    cell = table.set_index(["task", "encoder"])["mean"]
    assert cell[("IDC", "UNI")] == 0.5702 and cell[("LUNG", "Hoptimus0")] == 0.5582
    assert cell[("average", "Resnet50")] == 0.326
    for encoder, part in table.groupby("encoder"):  # the README's averages are the means of its 9 tasks
        tasks = part.set_index("task")["mean"]
        assert tasks[list(PUBLISHED_TASKS)].mean() == pytest.approx(tasks[AVERAGE], abs=6e-4), encoder
    issue = pub[pub["source"] == ISSUE].set_index("registry")["mean"]
    assert issue.to_dict() == {"h-optimus-1": 0.4229, "uni2-h": 0.4141, "virchow2": 0.4034, "gigapath": 0.3875,
                               "uni": 0.3873, "conch": 0.3696, "ctranspath": 0.3468, "resnet50-imagenet": 0.3252}
    assert set(pub["task"]) <= {*TASKS, AVERAGE}


@pytest.mark.parametrize(("published", "ours"), [
    ("Resnet50", "resnet50-imagenet"), ("ResNet-50", "resnet50-imagenet"), ("Hoptimus0", "h-optimus-0"),
    ("H-optimus-1", "h-optimus-1"), ("UNI2-h", "uni2-h"), ("Gigapath", "gigapath"), ("Prov-GigaPath", "gigapath"),
    ("H0-mini", "h0-mini"), ("Virchow 2", "virchow2"), ("CTransPath", "ctranspath"), ("UNIv1.5", "uni-v1.5"),
    ("Phikon-v2", "phikon-v2"),
])
def test_published_names_map_to_the_registry(published, ours):
    assert registry_name(published) == ours


def test_source_choice():
    pub = load_published()
    assert pick_source(pub) == NEWEST_FULL  # newest with all 9 tasks; the 2026 quote has averages only
    assert pick_source(pub, ISSUE) == ISSUE
    with pytest.raises(CMRCNetError, match="unknown source 'nope'; published sources: hest-readme-2025-05"):
        pick_source(pub, "nope")


def results(encoder: str, tasks, base: float = 0.4, probe: str = "ridge-hestbench") -> list[dict]:
    return [{"task": t, "encoder": encoder, "probe": probe, "pearson_mean": base + 0.01 * i, "pearson_std": 0.02,
             "n_folds": 2} for i, t in enumerate(tasks)]


def test_leaderboard_puts_ours_beside_the_published_value():
    rows = results("uni", TASKS) + results("tiny-test", ["IDC"], base=0.1)
    df = leaderboard(rows)
    assert df.attrs["source"] == NEWEST_FULL and set(df["source"]) == {NEWEST_FULL}
    cell = df.set_index(["task", "encoder", "probe"])
    idc = cell.loc[("IDC", "uni", "ridge-hestbench")]
    assert (idc["published_mean"], idc["published"], idc["published_encoder"]) == (0.5702, "0.5702", "UNI")
    assert idc["ours"] == "0.4000 ± 0.0200" and idc["diff"] == pytest.approx(0.4 - 0.5702)
    hcc = cell.loc[("HCC", "uni", "ridge-hestbench")]
    assert hcc["published"] == NOT_PUBLISHED and math.isnan(hcc["diff"]) and "not in the published" in hcc["note"]
    avg = cell.loc[(AVERAGE, "uni", "ridge-hestbench")]
    ours = [r["pearson_mean"] for r in rows if r["encoder"] == "uni" and r["task"] in PUBLISHED_TASKS]
    assert len(ours) == 9 and avg["ours_mean"] == pytest.approx(sum(ours) / 9)
    assert avg["published_mean"] == 0.3862
    tiny = cell.loc[("IDC", "tiny-test", "ridge-hestbench")]
    assert tiny["published"] == NOT_PUBLISHED and tiny["ours"] == "0.1000 ± 0.0200"
    tiny_avg = cell.loc[(AVERAGE, "tiny-test", "ridge-hestbench")]
    assert tiny_avg["ours"] == "incomplete" and tiny_avg["published"] == NOT_PUBLISHED
    assert tiny_avg["note"] == "missing tasks: PRAD, PAAD, SKCM, COAD, READ, CCRCC, LUNG, LYMPH_IDC"
    assert list(df["task"]) == sorted(df["task"], key=[*TASKS, AVERAGE].index)  # task order, average last


def test_leaderboard_with_the_issue_means_only():
    df = leaderboard(results("uni", PUBLISHED_TASKS) + results("phikon", ["IDC"]), source=ISSUE)
    cell = df.set_index(["task", "encoder"])
    assert cell.loc[("IDC", "uni"), "published"] == NOT_PUBLISHED  # that source has no per-task numbers
    assert cell.loc[(AVERAGE, "uni"), "published_mean"] == 0.3873
    assert cell.loc[(AVERAGE, "phikon"), "published"] == NOT_PUBLISHED


def test_leaderboard_takes_probe_task_results():
    result = {"task": "IDC", "encoder": "uni", "probes": {
        "knn-k1": {"pearson_mean": 0.3, "pearson_std": 0.1, "n_folds": 4},
        "knn-k50": {"pearson_mean": 0.5, "pearson_std": 0.05, "n_folds": 4}}}
    df = leaderboard([result])
    assert set(df.loc[df["task"] == "IDC", "probe"]) == {"knn-k1", "knn-k50"}
    with pytest.raises(CMRCNetError, match="two results for task IDC, encoder uni, probe knn-k1"):
        leaderboard([result, result])
    with pytest.raises(CMRCNetError, match="a result without probe"):
        leaderboard([{"task": "IDC", "encoder": "uni", "pearson_mean": 0.1}])


def test_write_leaderboard(tmp_path):
    df = leaderboard(results("uni", TASKS) + results("tiny-test", ["IDC", "HCC"], base=0.1))
    out_csv, out_md = tmp_path / "tables" / "hestbench_leaderboard.csv", tmp_path / "tables" / "hestbench_leaderboard.md"
    write_leaderboard(df, out_csv, out_md)
    back = pd.read_csv(out_csv)
    assert len(back) == len(df) and list(back.columns) == list(df.columns)
    md = out_md.read_text()
    assert md.startswith("# HEST-Benchmark leaderboard\n") and f"`{NEWEST_FULL}`" in md
    header = next(line for line in md.splitlines() if line.startswith("| encoder"))
    assert header == ("| encoder | probe | IDC | PRAD | PAAD | SKCM | COAD | READ | CCRCC | HCC | LUNG | LYMPH_IDC "
                      "| average (9 tasks) |")
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    assert [r.split(" | ")[0] for r in rows] == ["| uni", "| tiny-test"]  # complete averages first
    assert "| uni | ridge-hestbench | 0.4000 ± 0.0200<br>(published 0.5702) |" in md
    assert "0.1000 ± 0.0200<br>(not published)" in md
    assert "- tiny-test / ridge-hestbench: missing tasks: PRAD" in md
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["hestbench_leaderboard.csv", "hestbench_leaderboard.md"]
    assert to_markdown(df.iloc[0:0]).endswith("(no results)\n")
