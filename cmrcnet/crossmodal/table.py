"""The grid's table (results/tables/crossmodal.{csv,md}) and figures, from the per-fold results of `evaluate`.

Pooling over folds: every test spot is tested in exactly one fold, so recall@k and the ranks are pooled over all
test spots of a dataset, with a bootstrap over those spots for the confidence intervals; the paper protocol's r
is pooled over test samples (bootstrap over samples); in-batch recall is the spot-weighted mean over folds; label
and batch scores are the mean over folds (one number per fold: no interval).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.errors import input_error

DIRECTIONS = ("img2gene", "gene2img")


def read_fold_results(paths: Sequence[str | Path]) -> list[dict]:
    out = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise input_error(path, f"cannot read a cross-modal fold result ({type(err).__name__})") from None
        for key in ("method", "dataset", "fold", "cell", "ranks", "retrieval", "expression"):
            if key not in result:
                raise input_error(path, f"not a cross-modal fold result (no {key!r})")
        out.append(result)
    return out


def _bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` over `n_boot` resamples (NaN, NaN without any)."""
    values = np.asarray(values, dtype=float)
    if n_boot <= 0 or len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _mean_over_folds(results: list[dict], *path: str) -> float:
    values = []
    for r in results:
        node = r
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            values.append(float(node))
    return float(np.mean(values)) if values else float("nan")


def cell_row(results: list[dict], ks: Sequence[int], n_boot: int = 1000, seed: int = 0) -> dict:
    """One row of the table: one grid cell on one dataset, pooled over its folds."""
    first = results[0]
    row = {"dataset": first["dataset"], "method": first["method"], **{k: first["cell"].get(k) for k in
           ("image", "image_mode", "gene", "loss")}, "folds": len(results),
           "test_spots": int(sum(r["n_test"] for r in results))}
    for d in DIRECTIONS:
        ranks = np.concatenate([np.asarray(r["ranks"][d], dtype=np.int64) for r in results])
        for k in ks:
            hits = (ranks <= k).astype(float)
            row[f"{d}_R@{k}"] = float(hits.mean())
            row[f"{d}_R@{k}_ci_low"], row[f"{d}_R@{k}_ci_high"] = _bootstrap_mean(hits, n_boot, seed)
        row[f"{d}_median_rank"] = float(np.median(ranks))
        row[f"{d}_mean_rank"] = float(ranks.mean())
        row[f"{d}_chance_R@{max(ks)}"] = float(np.mean([min(max(ks), r["n_test"]) / r["n_test"] for r in results]))
    for key in first["inbatch"]:
        if key.endswith("_n"):
            continue
        n = np.array([r["inbatch"].get(key.split("_", 1)[0] + "_n", r["n_test"]) for r in results], dtype=float)
        row[key] = float(np.average([r["inbatch"][key] for r in results], weights=n))
    for pred in first["expression"]:
        by_sample = {s: v for r in results for s, v in r["expression"][pred]["paper_heg50_r_by_sample"].items()}
        values = np.array(list(by_sample.values()), dtype=float)
        row[f"{pred}_paper_heg50_r"] = float(np.nanmean(values))
        row[f"{pred}_paper_heg50_r_ci_low"], row[f"{pred}_paper_heg50_r_ci_high"] = _bootstrap_mean(
            values[np.isfinite(values)], n_boot, seed)
        row[f"{pred}_hest_bench_r"] = _mean_over_folds(results, "expression", pred, "hest_bench_r")
    for level in ("spot", "sample"):
        for modality in ("image", "expression"):
            for metric in ("balanced_accuracy", "macro_f1"):
                row[f"{level}_label_{modality}_{metric}"] = _mean_over_folds(
                    results, "labels", level, modality, metric)
    for modality in ("image", "expression"):
        metrics = sorted({m for r in results for m in (r.get("batch") or {}).get(modality, {})})
        for metric in metrics:
            row[f"batch_{modality}_{metric}"] = _mean_over_folds(results, "batch", modality, metric)
    return row


def crossmodal_table(results: list[dict], ks: Sequence[int], n_boot: int = 1000, seed: int = 0,
                     order: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per dataset x grid cell (`order`: the methods' order, default as they come)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    rank = {m: i for i, m in enumerate(order or [])}
    keys = sorted(groups, key=lambda dm: (dm[0], rank.get(dm[1], len(rank)), dm[1]))
    rows = [cell_row(sorted(groups[key], key=lambda r: r["fold"]), ks, n_boot, seed) for key in keys]
    return pd.DataFrame(rows)


def _fmt(value: float, low: float | None = None, high: float | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if low is None or not np.isfinite(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def to_markdown(table: pd.DataFrame, ks: Sequence[int], batch_size: int, probe: str, k: int) -> str:
    """The table as Markdown: retrieval first (whole split, then in-batch, labelled), then prediction, labels,
    batch effects."""
    kmax = max(ks)
    lines = ["# Cross-modal grid (image encoder x gene encoder x loss)", "",
             f"Recall@k over the **whole test split** of each fold (every test spot a candidate; 95 % bootstrap CI "
             f"over test spots), median rank of the true partner, and HESCAPE's **in-batch** recall@{kmax} at batch "
             f"size {batch_size} (candidates: the batch only; depends on the batch size). Expression r: the paper's "
             f"protocol (mean r over each test sample's 50 most expressed genes, then over samples; CI over samples) "
             f"for retrieval (k = {k}) and the {probe} probe on the aligned image embeddings. Labels: balanced "
             "accuracy of a linear probe, samples held out. Batch: scIB's iLISI and batch silhouette (higher = "
             "better mixed).", ""]
    header = ["dataset", "method", "folds"]
    header += [f"{d} R@{k_}" for d in DIRECTIONS for k_ in ks] + [f"{d} median rank" for d in DIRECTIONS]
    header += [f"in-batch{batch_size} {d} R@{kmax}" for d in DIRECTIONS]
    header += [f"r retrieval k{k}", f"r {probe}", "spot label BA (image)", "sample label BA (image)",
               "iLISI (image)", "batch ASW (image)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["dataset"], row["method"], str(int(row["folds"]))]
        cells += [_fmt(row[f"{d}_R@{k_}"], row[f"{d}_R@{k_}_ci_low"], row[f"{d}_R@{k_}_ci_high"])
                  for d in DIRECTIONS for k_ in ks]
        cells += [f"{row[f'{d}_median_rank']:g}" for d in DIRECTIONS]
        cells += [_fmt(row.get(f"inbatch{batch_size}_{d}_recall@{kmax}", np.nan)) for d in DIRECTIONS]
        for pred in (f"retrieval_k{k}", probe):
            cells.append(_fmt(row.get(f"{pred}_paper_heg50_r", np.nan), row.get(f"{pred}_paper_heg50_r_ci_low"),
                              row.get(f"{pred}_paper_heg50_r_ci_high")))
        cells += [_fmt(row.get(c, np.nan)) for c in ("spot_label_image_balanced_accuracy",
                                                      "sample_label_image_balanced_accuracy",
                                                      "batch_image_ilisi", "batch_image_silhouette_batch")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_crossmodal_table(out_csv, out_md, results: list[dict], block: dict, k: int, seed: int = 0,
                           order: Sequence[str] | None = None) -> pd.DataFrame:
    """Both files, atomically; provenance in the CSV's neighbour JSON is the fold results' own."""
    from cmrcnet.io import atomic_path, provenance

    ks = [int(x) for x in block["ks"]]
    table = crossmodal_table(results, ks, int(block["bootstrap"]), seed, order)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    text = to_markdown(table, ks, int(block["inbatch_batch_size"]), block["probe"], k)
    text += f"\n<!-- {json.dumps(provenance())} -->\n"
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(text)
    return table


def grid_heatmaps(table: pd.DataFrame, dataset: str, out_base, k_recall: int, probe: str, k: int) -> list[Path]:
    """Heatmaps of the grid on one dataset: rows image tower (and mode), columns gene tower x loss; panels
    image->gene R@k, gene->image R@k, and the probe's r on the aligned image embedding."""
    from cmrcnet.figures.common import close_figure, new_figure, save_figure

    part = table[table["dataset"] == dataset].copy()
    if part.empty:
        raise input_error(dataset, "no grid cell was scored on this dataset")
    part["row"] = part["image"] + np.where(part["image_mode"].isin(["frozen", "scratch"]), "",
                                           " (" + part["image_mode"] + ")")
    part["col"] = part["gene"] + " / " + part["loss"]
    panels = [(f"img2gene_R@{k_recall}", f"image -> gene R@{k_recall}"),
              (f"gene2img_R@{k_recall}", f"gene -> image R@{k_recall}"),
              (f"{probe}_paper_heg50_r", f"{probe} r (HEG-50)")]
    rows, cols = list(dict.fromkeys(part["row"])), list(dict.fromkeys(part["col"]))
    fig = new_figure(4.2 * len(panels), 1.2 + 0.5 * len(rows) + 0.05 * max(map(len, cols)))
    for i, (column, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        grid = part.pivot(index="row", columns="col", values=column).reindex(index=rows, columns=cols)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            ax.text(c, r, "-" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows if i == 0 else [""] * len(rows), fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{dataset}: cross-modal grid", fontsize=10)
    paths = save_figure(fig, out_base)
    close_figure(fig)
    return paths


def joint_umaps(joints: dict[str, str | Path], out_base, seed: int = 0) -> list[Path]:
    """UMAP of each cell's joint embedding (image and expression embeddings of the same spots in the shared space),
    coloured by modality, by sample and by label: one row of three panels per cell."""
    import umap
    from matplotlib import colormaps

    from cmrcnet.figures.common import close_figure, new_figure, save_figure

    fig = new_figure(11, 3.2 * len(joints))
    for i, (method, path) in enumerate(joints.items()):
        with np.load(path, allow_pickle=False) as z:
            image, expression, sample, label = z["image"], z["expression"], z["sample"], z["label"]
        both = np.concatenate([image, expression])
        n_neighbors = max(2, min(15, len(both) - 1))
        xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(both)
        colourings = [("modality", np.array(["image"] * len(image) + ["expression"] * len(expression))),
                      ("sample", np.concatenate([sample, sample])), ("label", np.concatenate([label, label]))]
        for j, (title, values) in enumerate(colourings):
            ax = fig.add_subplot(len(joints), 3, 3 * i + j + 1)
            names = list(dict.fromkeys(values.tolist()))
            cmap = colormaps["tab10"]
            for c, name in enumerate(names):
                on = values == name
                ax.scatter(xy[on, 0], xy[on, 1], s=2, color=cmap(c % 10), label=name or "(none)")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{method}: {title}" if j == 0 else title, fontsize=8)
            if len(names) <= 10:
                ax.legend(fontsize=6, markerscale=3, loc="best")
    paths = save_figure(fig, out_base)
    close_figure(fig)
    return paths
