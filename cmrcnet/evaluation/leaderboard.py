"""The HEST-Benchmark leaderboard: our probes' Pearson r per task and encoder beside the published value.

Ours come from `cmrcnet.data.hestbench.probe_task` (mean +- sd over the task's folds, sd with ddof 0 as HEST);
the published values are package data (`cmrcnet/paper_data/hestbench_published.csv`, sources in the README
there), several sources in one file. A table uses ONE source, by default the newest that has a full per-task table
(all 9 published tasks), and says which. Published encoder names are mapped to our registry names
(PUBLISHED_NAMES); an encoder that source has no number for shows "not published".

The average row per encoder and probe is the plain mean of the per-task means over the 9 published tasks (as
HEST's "Average" column), given only when all 9 are present; otherwise it names the missing tasks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.data.hestbench import PUBLISHED_TASKS, TASKS
from cmrcnet.errors import input_error

AVERAGE = "average"
NOT_PUBLISHED = "not published"
PUBLISHED_COLUMNS = ("source", "date", "reference", "task", "published_task", "encoder", "mean", "std")
COLUMNS = ["task", "encoder", "probe", "n_folds", "ours_mean", "ours_std", "ours", "published_encoder",
           "published_mean", "published", "diff", "source", "note"]

# Published encoder names (lower case, letters and digits only) -> our registry names. Names without an entry are
# kept (lower case) and so only match an encoder registered under that name.
PUBLISHED_NAMES = {
    "resnet50": "resnet50-imagenet",  # HEST's ResNet-50: timm resnet50.tv_in1k truncated after layer3 (1024-d)
    "ctranspath": "ctranspath",
    "phikon": "phikon",
    "phikonv2": "phikon-v2",
    "conch": "conch",
    "gigapath": "gigapath",
    "provgigapath": "gigapath",
    "uni": "uni",
    "uni2h": "uni2-h",
    "virchow": "virchow",
    "virchow2": "virchow2",
    "hoptimus0": "h-optimus-0",
    "hoptimus1": "h-optimus-1",
    "h0mini": "h0-mini",
    "univ15": "uni-v1.5",  # HEST's "UNIv1.5": not known to be UNI2-h, kept apart
    "remedis": "remedis",
    "plip": "plip",
}


def registry_name(published: str) -> str:
    """Our encoder name for a published one ('Hoptimus0' -> 'h-optimus-0', 'ResNet-50' -> 'resnet50-imagenet')."""
    key = re.sub(r"[^a-z0-9]", "", str(published).lower())
    return PUBLISHED_NAMES.get(key, str(published).strip().lower())


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The published numbers (package data by default), with `registry` = our name of each encoder."""
    if path is None:
        with resources.files("cmrcnet").joinpath("paper_data", "hestbench_published.csv").open() as f:
            df = pd.read_csv(f, dtype={"date": str})
        where = "cmrcnet/paper_data/hestbench_published.csv"
    else:
        try:
            df = pd.read_csv(path, dtype={"date": str})
        except (OSError, ValueError) as exc:
            raise input_error(path, f"cannot read as CSV ({type(exc).__name__})") from None
        where = path
    missing = [c for c in PUBLISHED_COLUMNS if c not in df.columns]
    if missing:
        raise input_error(where, f"no column(s) {', '.join(missing)}")
    df["registry"] = df["encoder"].map(registry_name)
    return df


def _full_tables(published: pd.DataFrame) -> list[str]:
    full = []
    for source, part in published.groupby("source", sort=False):
        tasks = part.groupby("encoder")["task"].apply(set)
        if any(set(PUBLISHED_TASKS) <= t for t in tasks):
            full.append(source)
    return full


def pick_source(published: pd.DataFrame, source: str | None = None) -> str:
    """`source` if the table has it (one-line error listing the sources otherwise), else the newest source (by
    date) with a full per-task table."""
    sources = list(dict.fromkeys(published["source"]))
    if source is not None:
        if source not in sources:
            raise input_error("leaderboard source", f"unknown source {source!r}; published sources: {', '.join(sources)}")
        return source
    full = _full_tables(published)
    if not full:
        raise input_error("leaderboard source", "no published source has all 9 tasks; name one: " + ", ".join(sources))
    dates = published.drop_duplicates("source").set_index("source")["date"].astype(str)
    return max(full, key=lambda s: dates[s])


def _rows(results: Iterable[Mapping]) -> list[dict]:
    rows = []
    for r in results:
        if "probes" in r:  # a probe_task result
            for label, p in r["probes"].items():
                rows.append({"task": r["task"], "encoder": r["encoder"], "probe": label, "n_folds": p.get("n_folds"),
                             "pearson_mean": p.get("pearson_mean"), "pearson_std": p.get("pearson_std")})
        else:
            missing = [k for k in ("task", "encoder", "probe", "pearson_mean") if k not in r]
            if missing:
                raise input_error("leaderboard results", f"a result without {', '.join(missing)}: {dict(r)!r:.200}")
            rows.append({"task": r["task"], "encoder": r["encoder"], "probe": r["probe"], "n_folds": r.get("n_folds"),
                         "pearson_mean": r["pearson_mean"], "pearson_std": r.get("pearson_std")})
    seen = set()
    for row in rows:
        key = (row["task"], row["encoder"], row["probe"])
        if key in seen:
            raise input_error("leaderboard results", f"two results for task {key[0]}, encoder {key[1]}, probe {key[2]}")
        seen.add(key)
    return rows


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _text(mean: float, sd: float | None = None) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None and math.isfinite(sd) else "")


def leaderboard(results: Iterable[Mapping], published: pd.DataFrame | None = None, *,
                source: str | None = None) -> pd.DataFrame:
    """Ours beside the published value per task, encoder and probe, plus an average row per encoder and probe.

    `results`: `probe_task` results, or flat rows with task, encoder, probe, pearson_mean (pearson_std, n_folds).
    `published`: `load_published()` (default). Columns: COLUMNS; `df.attrs` holds source, reference and date."""
    published = load_published() if published is None else published
    if "registry" not in published.columns:
        published = published.assign(registry=published["encoder"].map(registry_name))
    source = pick_source(published, source)
    pub = published[published["source"] == source]
    lookup = {(t, r): (float(m), e) for t, r, m, e in zip(pub["task"], pub["registry"], pub["mean"], pub["encoder"])}
    first = pub.iloc[0]
    rows = _rows(results)
    out = []
    for row in rows:
        task = row["task"]
        mean, sd = _num(row["pearson_mean"]), _num(row["pearson_std"])
        hit = lookup.get((task, row["encoder"]))
        note = "" if task in PUBLISHED_TASKS else "task not in the published leaderboard"
        out.append(_row(task, row["encoder"], row["probe"], row["n_folds"], mean, sd, hit, source, note))

    for (encoder, probe), group in pd.DataFrame(rows, columns=["task", "encoder", "probe", "n_folds", "pearson_mean",
                                                             "pearson_std"]).groupby(["encoder", "probe"], sort=False):
        by_task = dict(zip(group["task"], group["pearson_mean"].map(_num)))
        missing = [t for t in PUBLISHED_TASKS if t not in by_task or not math.isfinite(by_task[t])]
        mean = math.nan if missing else float(np.mean([by_task[t] for t in PUBLISHED_TASKS]))
        hit = lookup.get((AVERAGE, encoder))
        if hit is None:
            per_task = [lookup.get((t, encoder)) for t in PUBLISHED_TASKS]
            if all(per_task):
                hit = (float(np.mean([h[0] for h in per_task])), per_task[0][1])
        note = f"missing tasks: {', '.join(missing)}" if missing else f"mean over the {len(PUBLISHED_TASKS)} published tasks"
        out.append(_row(AVERAGE, encoder, probe, None, mean, math.nan, hit, source, note))

    df = pd.DataFrame(out, columns=COLUMNS)
    order = {t: i for i, t in enumerate((*TASKS, AVERAGE))}
    df = df.assign(_o=df["task"].map(lambda t: order.get(t, len(order))))
    df = df.sort_values(["_o", "task", "encoder", "probe"], kind="stable").drop(columns="_o").reset_index(drop=True)
    df.attrs.update({"source": source, "reference": str(first["reference"]), "date": str(first["date"])})
    return df


def _row(task, encoder, probe, n_folds, mean, sd, hit, source, note) -> dict:
    pub_mean, pub_name = hit if hit is not None else (math.nan, None)
    return {
        "task": task, "encoder": encoder, "probe": probe, "n_folds": n_folds, "ours_mean": mean, "ours_std": sd,
        "ours": _text(mean, sd) if math.isfinite(mean) else ("incomplete" if task == AVERAGE else "-"),
        "published_encoder": pub_name, "published_mean": pub_mean,
        "published": _text(pub_mean) if hit is not None else NOT_PUBLISHED,
        "diff": mean - pub_mean if hit is not None else math.nan, "source": source, "note": note,
    }


def to_markdown(df: pd.DataFrame, title: str = "HEST-Benchmark leaderboard") -> str:
    """One row per encoder and probe (best complete 9-task average first), one column per task and the average; a
    cell is ours (mean ± sd over folds) with the published value under it, so a reader compares within the cell."""
    source = df.attrs.get("source") or (df["source"].iloc[0] if len(df) else "")
    lines = [f"# {title}", "",
             f"Pearson r per task (mean ± sd over the benchmark's folds, sd with ddof 0 as HEST); published values from "
             f"`{source}` ({df.attrs.get('reference', '')}, {df.attrs.get('date', '')}), "
             "see cmrcnet/paper_data/README.md.", ""]
    if df.empty:
        return "\n".join(lines + ["(no results)", ""])
    tasks = [t for t in (*TASKS, AVERAGE) if t in set(df["task"])]
    tasks += sorted(set(df["task"]) - set(tasks))
    header = ["encoder", "probe"] + [f"{t} (9 tasks)" if t == AVERAGE else t for t in tasks]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = {(r.task, r.encoder, r.probe): r for r in df.itertuples(index=False)}
    pairs = list(dict.fromkeys(zip(df["encoder"], df["probe"])))
    average = {(r.encoder, r.probe): r.ours_mean for r in df.itertuples(index=False) if r.task == AVERAGE}
    # best complete average first; incomplete ones after, by name
    pairs.sort(key=lambda ep: (-average[ep] if math.isfinite(average.get(ep, math.nan)) else math.inf, ep))
    for encoder, probe in pairs:
        row = [str(encoder), str(probe)]
        for task in tasks:
            r = cells.get((task, encoder, probe))
            if r is None:
                row.append("")
                continue
            pub = f"published {r.published}" if r.published != NOT_PUBLISHED else NOT_PUBLISHED
            row.append(f"{r.ours}<br>({pub})")
        lines.append("| " + " | ".join(row) + " |")
    notes = sorted({f"{r.encoder} / {r.probe}: {r.note}" for r in df.itertuples(index=False)
                    if r.task == AVERAGE and str(r.note).startswith("missing")})
    unpublished = sorted(set(df.loc[df["task"] == "HCC", "task"]))
    if notes or unpublished:
        lines.append("")
    lines += [f"- {n}" for n in notes]
    if unpublished:
        lines.append("- HCC is a benchmark task without a published value (HEST's tables leave it out).")
    return "\n".join(lines) + "\n"


def write_leaderboard(df: pd.DataFrame, out_csv: str | Path, out_md: str | Path,
                      title: str = "HEST-Benchmark leaderboard") -> None:
    """The leaderboard as CSV (every column) and Markdown (`to_markdown`), both written atomically."""
    from cmrcnet.io import atomic_path, write_table

    write_table(out_csv, df)
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(df, title))
