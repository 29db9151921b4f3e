"""Figures: each writes a real PNG and PDF atomically; orders, scales and gene checks are what they claim."""

from __future__ import annotations

import importlib
import struct

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.axes import Axes

from cmrcnet.data.slide import Slide
from cmrcnet.data.synthetic import synthesize_sample
from cmrcnet.errors import CMRCNetError
from cmrcnet.figures import (
    boxplots,
    check_gene,
    cluster_order,
    correlation_heatmaps,
    correlation_matrix,
    mean_variance,
    read_thumbnail,
    save_figure,
    spatial_maps,
    training_curves,
)
from cmrcnet.figures import thumbnail as thumbnail_module
from cmrcnet.figures.common import PALETTE, new_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ("CMRCNet", "STNet", "BLEEP")


def assert_figure_files(out_base, min_px=200):
    """Both files exist, the PNG is a real PNG of a sensible size, the PDF starts like a PDF; nothing else beside."""
    png, pdf = out_base.with_name(out_base.name + ".png"), out_base.with_name(out_base.name + ".pdf")
    head = png.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= min_px and height >= min_px
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not [p for p in out_base.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    return png, pdf


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A real synthetic Visium slide: 2400 x 1800 px at level 0, pyramid levels 2400, 1200 and 600 px wide."""
    root = tmp_path_factory.mktemp("raw")
    synthesize_sample(root, "S1", technology="visium", sample_index=0, seed=0, patient="P", width_um=1200,
                      height_um=900, pixel_size_um=0.5, n_genes=100)
    adata = ad.read_h5ad(root / "st" / "S1.h5ad")
    return {"wsi": root / "wsis" / "S1.tif", "X": np.log1p(adata.X.toarray()), "genes": list(adata.var_names),
            "xy": np.asarray(adata.obsm["spatial"], float)}


def noisy_preds(X, seed=0):
    rng = np.random.default_rng(seed)
    preds = {m: X * w + rng.normal(0, s, X.shape) for m, w, s in zip(METHODS, (0.7, 0.3, 0.0), (0.2, 0.4, 0.3))}
    preds["BLEEP"][:, 1] = 2.0  # a constant prediction: undefined correlations
    return preds


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the plotting functions save, kept for inspection after it is written (files as usual)."""
    figures = []
    for name in ("boxplots", "mean_variance", "spatial", "curves"):
        module = importlib.import_module(f"cmrcnet.figures.{name}")

        def spy(fig, out_base, real=module.save_figure):
            paths = real(fig, out_base)  # closing a figure pyplot does not know leaves its artists intact
            figures.append(fig)
            return paths

        monkeypatch.setattr(module, "save_figure", spy)
    return figures


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def tick_labels(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def rgba(colour):
    from matplotlib.colors import to_rgba

    return np.round(to_rgba(colour), 6)


# ---------------------------------------------------------------------------------------------- saving


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig = new_figure(3, 2)
    fig.subplots().plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "sub" / "fig2")
    assert paths == [tmp_path / "sub" / "fig2.png", tmp_path / "sub" / "fig2.pdf"]
    assert_figure_files(tmp_path / "sub" / "fig2", min_px=150)


def test_save_figure_leaves_nothing_on_failure(tmp_path, monkeypatch):
    fig = new_figure(3, 2)
    real = fig.savefig

    def savefig(path, **kwargs):  # the PNG succeeds, the PDF fails
        if kwargs.get("format") == "pdf":
            raise RuntimeError("disk full")
        real(path, **kwargs)

    monkeypatch.setattr(fig, "savefig", savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "fig")
    assert list(tmp_path.iterdir()) == []


def test_save_figure_keeps_old_outputs_on_failure(tmp_path, monkeypatch):
    (tmp_path / "fig.png").write_bytes(b"old")
    fig = new_figure(3, 2)
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    assert (tmp_path / "fig.png").read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------- genes


def test_check_gene_lists_close_names():
    genes = ["CD24", "EPCAM", "GATA3", "ITLN1", "SYN00001"]
    assert check_gene("CD24", genes, "figures.genes.COAD") == "CD24"
    with pytest.raises(CMRCNetError) as err:
        check_gene("CD2", genes, "figures.genes.COAD")
    message = str(err.value)
    assert message.startswith("figures.genes.COAD: gene CD2 is not in the data") and "\n" not in message
    assert "close names: CD24" in message
    with pytest.raises(CMRCNetError, match="close names: GATA3"):
        check_gene("gata3", genes, "x")  # case differs: suggested, not silently accepted
    with pytest.raises(CMRCNetError, match="no close names among its 5 genes"):
        check_gene("QQQQQQ", genes, "x")


# ---------------------------------------------------------------------------------------------- Fig 2


def per_gene_table(nan_for=("BLEEP", "HVG50", 3)):
    rng = np.random.default_rng(1)
    rows = [{"method": m, "gene_set": gs, "gene": f"G{i}", "r": rng.uniform(-0.2, 0.9)}
            for gs in ("HEG50", "HVG50", "marker") for m in METHODS for i in range(20)]
    table = pd.DataFrame(rows)
    method, gene_set, n = nan_for
    idx = table.index[(table["method"] == method) & (table["gene_set"] == gene_set)][:n]
    table.loc[idx, "r"] = np.nan
    return table


def boxes(ax):
    """(position, q1, median, q3, face colour) of every box on `ax`, left to right."""
    medians = [line for line in ax.lines if line.get_linewidth() == 1.5]  # the boxplot's medianprops
    assert len(medians) == len(ax.patches)
    out = []
    for patch, median in zip(ax.patches, medians):
        v = patch.get_path().vertices
        centre = (v[:, 0].min() + v[:, 0].max()) / 2
        assert np.mean(median.get_xdata()) == pytest.approx(centre)
        out.append((centre, v[:, 1].min(), median.get_ydata()[0], v[:, 1].max(), tuple(patch.get_facecolor()[:3])))
    return sorted(out)


def points(ax):
    """(x offsets, r values, colour) of every scatter of per-gene r on `ax`."""
    return [(c.get_offsets()[:, 0], c.get_offsets()[:, 1], tuple(c.get_facecolor()[0][:3])) for c in ax.collections]


def assert_panel(ax, table, gene_set, methods, colours):
    """`ax` shows, for each method in order at x = 0, 1, ..., a box of its finite r in `gene_set` and its genes."""
    part = table[table["gene_set"] == gene_set]
    r = {m: part.loc[part["method"] == m, "r"].to_numpy(float) for m in methods}
    n_nan = {m: int(np.isnan(r[m]).sum()) for m in methods}
    assert ax.get_title() == f"{gene_set} ({part['gene'].nunique()} genes)"
    assert tick_labels(ax) == [f"{m}\n({n_nan[m]} NaN)" if n_nan[m] else m for m in methods]
    assert list(ax.get_xticks()) == list(range(len(methods)))
    dropped = sum(n_nan.values())
    assert ax.get_ylabel() == "Pearson r per gene" + (f" ({dropped} NaN dropped)" if dropped else "")
    expected = [(i, *np.percentile(r[m][np.isfinite(r[m])], [25, 50, 75]), colours[i])
                for i, m in enumerate(methods) if np.isfinite(r[m]).any()]
    found = boxes(ax)
    assert [b[0] for b in found] == [e[0] for e in expected]
    for b, e in zip(found, expected):
        np.testing.assert_allclose(b[1:4], e[1:4], atol=1e-12)
        np.testing.assert_allclose(b[4], rgba(e[4])[:3], atol=1e-6)
    scattered = points(ax)
    assert len(scattered) == len(expected)
    for (x, y, colour), e in zip(scattered, expected):
        i, m = e[0], methods[e[0]]
        np.testing.assert_array_equal(y, r[m][np.isfinite(r[m])])  # every gene of the method, in table order
        assert np.all(np.abs(x - i) <= 0.18)  # jittered around its box
        np.testing.assert_allclose(colour, rgba(colours[i])[:3], atol=1e-6)


def test_boxplots(tmp_path, drawn):
    table = per_gene_table()
    assert boxplots(table, tmp_path / "fig2", title="Fig 2") == [tmp_path / "fig2.png", tmp_path / "fig2.pdf"]
    assert_figure_files(tmp_path / "fig2")
    fig = drawn[-1]
    assert fig.get_suptitle() == "Fig 2"
    # by default: panels and boxes in order of first appearance, one colour per method by position
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["HEG50 (20 genes)", "HVG50 (20 genes)", "marker (20 genes)"]
    for ax, gs in zip(axes, ("HEG50", "HVG50", "marker")):
        assert_panel(ax, table, gs, list(METHODS), PALETTE)
    assert tick_labels(axes[1])[2] == "BLEEP\n(3 NaN)"


def test_boxplots_follow_the_given_order_and_selection(tmp_path, drawn):
    table = per_gene_table()
    boxplots(table, tmp_path / "fig2", methods=["BLEEP", "CMRCNet"], gene_sets=["marker", "HEG50"])
    axes = panels(drawn[-1])
    assert [ax.get_title().split()[0] for ax in axes] == ["marker", "HEG50"]
    for ax, gs in zip(axes, ("marker", "HEG50")):
        assert_panel(ax, table, gs, ["BLEEP", "CMRCNet"], PALETTE)
    stnet = set(table.loc[table["method"] == "STNet", "r"])
    assert not any(stnet & set(y) for ax in axes for _, y, _ in points(ax))  # a method not asked for is not drawn

    # a method whose r are all NaN in a panel keeps its place and says so, without a box
    table.loc[(table["method"] == "STNet") & (table["gene_set"] == "marker"), "r"] = np.nan
    boxplots(table, tmp_path / "fig2b", methods=["STNet", "CMRCNet"], gene_sets=["marker"])
    assert_figure_files(tmp_path / "fig2b")
    (ax,) = panels(drawn[-1])
    assert tick_labels(ax) == ["STNet\n(20 NaN)", "CMRCNet"] and [b[0] for b in boxes(ax)] == [1]
    assert ax.get_ylabel() == "Pearson r per gene (20 NaN dropped)"
    assert_panel(ax, table, "marker", ["STNet", "CMRCNet"], PALETTE)
    with pytest.raises(ValueError, match="lacks column"):
        boxplots(table.drop(columns="r"), tmp_path / "bad")
    with pytest.raises(ValueError, match="no rows for method HisToGene"):
        boxplots(table, tmp_path / "bad", methods=["HisToGene"])
    with pytest.raises(ValueError, match="no rows for gene set HVG250"):
        boxplots(table, tmp_path / "bad", gene_sets=["HVG250"])
    assert not list(tmp_path.glob("bad*"))


# ---------------------------------------------------------------------------------------------- Fig 3


def assert_mean_variance(fig, truth, preds):
    """One row per prediction, in the given order: truth's per-gene mean (variance) on x, the prediction's on y."""
    axes = panels(fig)
    assert len(axes) == 2 * len(preds)
    t_stats = {"mean": np.nanmean(truth, axis=0), "variance": np.nanvar(truth, axis=0)}
    for i, (label, pred) in enumerate(preds.items()):
        p_stats = {"mean": np.nanmean(pred, axis=0), "variance": np.nanvar(pred, axis=0)}
        for ax, what in zip(axes[2 * i: 2 * i + 2], ("mean", "variance")):
            r = np.corrcoef(t_stats[what], p_stats[what])[0, 1]
            assert ax.get_title() == f"{label}: gene {what} (r = {r:.3f})"
            assert (ax.get_xlabel(), ax.get_ylabel()) == (f"true {what}", f"predicted {what}")
            (dots,) = ax.collections
            np.testing.assert_allclose(dots.get_offsets(), np.column_stack([t_stats[what], p_stats[what]]),
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(dots.get_facecolor()[0][:3], rgba(PALETTE[i])[:3], atol=1e-6)
            (identity,) = ax.lines
            both = np.concatenate([t_stats[what], p_stats[what]])
            pad = 0.04 * (both.max() - both.min())
            np.testing.assert_allclose(identity.get_xdata(), [both.min() - pad, both.max() + pad])
            np.testing.assert_allclose(identity.get_ydata(), identity.get_xdata())


def test_mean_variance_by_hand(tmp_path, drawn):
    truth = np.array([[1.0, 10, 0], [3, 10, 4], [5, 40, 8]])  # means 3, 20, 4; variances 8/3, 200, 32/3
    preds = {"reversed": truth[:, ::-1], "double": 2 * truth}
    mean_variance(truth, preds, ["G0", "G1", "G2"], tmp_path / "fig3")
    fig = drawn[-1]
    assert fig.get_suptitle() == "Per-gene mean and variance (3 genes)"
    axes = panels(fig)
    expected = [([3, 20, 4], [4, 20, 3]), ([8 / 3, 200, 32 / 3], [32 / 3, 200, 8 / 3]),
                ([3, 20, 4], [6, 40, 8]), ([8 / 3, 200, 32 / 3], [32 / 3, 800, 128 / 3])]
    for ax, (x, y) in zip(axes, expected):
        np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([x, y]))
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["reversed: gene mean", "reversed: gene variance",
                                                              "double: gene mean", "double: gene variance"]
    assert axes[2].get_title() == "double: gene mean (r = 1.000)"
    assert_mean_variance(fig, truth, preds)


def test_mean_variance(tmp_path, sample, drawn):
    X = sample["X"]
    preds = noisy_preds(X)
    mean_variance(X, preds, sample["genes"], tmp_path / "fig3", title="Fig 3")
    assert_figure_files(tmp_path / "fig3")
    assert drawn[-1].get_suptitle() == "Fig 3"
    assert_mean_variance(drawn[-1], X, preds)
    assert panels(drawn[-1])[5].collections[0].get_offsets()[1, 1] == 0.0  # BLEEP's constant gene: no variance
    with pytest.raises(ValueError, match="prediction STNet: expected shape"):
        mean_variance(X, {"STNet": X[:, :5]}, sample["genes"], tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- Fig 4


def test_correlation_matrix_handles_constant_genes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 4))
    x[:, 2] = 3.0
    corr = correlation_matrix(x)
    keep = [0, 1, 3]
    np.testing.assert_allclose(corr[np.ix_(keep, keep)], np.corrcoef(x[:, keep].T), atol=1e-12)
    assert np.isnan(corr[2]).all() and np.isnan(corr[:, 2]).all()
    order = cluster_order(corr)
    assert sorted(order) == [0, 1, 2, 3]


def test_correlation_heatmaps_use_truths_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    n_spots, genes = 80, [f"G{i}" for i in range(12)]
    a, b = rng.normal(size=(2, n_spots))
    truth = rng.normal(0, 0.3, (n_spots, 12))
    truth[:, 0::2] += a[:, None]  # even genes one programme, odd genes another: clustering must group them
    truth[:, 1::2] += b[:, None]
    truth[:, 11] = 1.0  # a constant gene in the truth too
    preds = {"CMRCNet": truth + rng.normal(0, 0.5, truth.shape), "BLEEP": rng.normal(size=truth.shape)}
    preds["BLEEP"][:, 0] = 0.0
    selected = genes[:11] + ["G11"]

    drawn = []
    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, data, **kw: drawn.append(np.ma.filled(data, np.nan))
                        or real_imshow(self, data, **kw))
    orders = correlation_heatmaps(truth, preds, genes, selected, tmp_path / "fig4", title="Fig 4")
    assert_figure_files(tmp_path / "fig4")

    assert list(orders) == ["Truth", "CMRCNet", "BLEEP"]
    order = orders["Truth"]
    assert all(o == order for o in orders.values())
    assert sorted(order) == sorted(selected)
    idx = [genes.index(g) for g in order]
    assert idx == [selected.index(genes[i]) for i in cluster_order(correlation_matrix(truth[:, [genes.index(g)
                                                                                               for g in selected]]))]
    clustered = [g for g in order if g != "G11"]
    parities = [int(g[1:]) % 2 for g in clustered]
    assert parities.count(parities[0]) == 6 and len(set(parities[:6])) == 1  # each programme is contiguous
    # every panel is its own matrix, indexed by the truth's order
    for image, values in zip(drawn, [truth, *preds.values()]):
        expected = correlation_matrix(values[:, idx])
        np.testing.assert_allclose(image, expected, atol=1e-12)
    assert np.isnan(drawn[2][order.index("G0")]).all()  # constant prediction: a blank row

    with pytest.raises(CMRCNetError, match="figures.heatmap_genes: gene G1x is not in the data; close names: G1"):
        correlation_heatmaps(truth, preds, genes, ["G1x", "G2"], tmp_path / "bad", where="figures.heatmap_genes")
    assert not list(tmp_path.glob("bad*"))


# ---------------------------------------------------------------------------------------------- thumbnails


def record_levels(monkeypatch):
    levels = []
    real = Slide.read_region

    def spy(self, x, y, w, h, level=0, fill=255):
        levels.append(level)
        return real(self, x, y, w, h, level=level, fill=fill)

    monkeypatch.setattr(Slide, "read_region", spy)
    return levels


@pytest.mark.parametrize(("max_px", "level", "size"), [(512, 2, (512, 384)), (1000, 1, (1000, 750)),
                                                       (600, 2, (600, 450)), (4000, 0, (2400, 1800))])
def test_read_thumbnail_level_and_scale(sample, monkeypatch, max_px, level, size):
    levels = record_levels(monkeypatch)
    thumb, scale = read_thumbnail(sample["wsi"], max_px=max_px)
    assert set(levels) == {level}  # the coarsest level still big enough; never level 0 unless the slide is small
    assert thumb.dtype == np.uint8 and thumb.shape == (size[1], size[0], 3)
    assert scale == pytest.approx(size[0] / 2400)
    with Slide(sample["wsi"]) as slide:
        ref = slide.read_region(0, 0, 600, 450, level=2)
    assert abs(thumb.mean() - ref.mean()) < 3  # same picture, not a blank canvas


def test_read_thumbnail_single_level_is_read_in_bands(tmp_path, monkeypatch):
    """A slide without a pyramid is shrunk band by band, never decoded whole in one read."""
    h, w = 300, 500
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 40, 40)
    image[:, w // 2:] = (40, 40, 200)
    tifffile.imwrite(tmp_path / "flat.tif", image, tile=(64, 64), photometric="rgb")
    monkeypatch.setattr(thumbnail_module, "BAND_ROWS", 64)
    reads = []
    real = Slide.read_region
    monkeypatch.setattr(Slide, "read_region", lambda self, x, y, rw, rh, level=0, fill=255:
                        reads.append(rh) or real(self, x, y, rw, rh, level=level, fill=fill))
    thumb, scale = read_thumbnail(tmp_path / "flat.tif", max_px=50)
    assert thumb.shape == (30, 50, 3) and scale == pytest.approx(0.1)
    assert len(reads) > 1 and max(reads) < h
    np.testing.assert_allclose(thumb[:, :20].reshape(-1, 3).mean(0), (200, 40, 40), atol=3)
    np.testing.assert_allclose(thumb[:, 30:].reshape(-1, 3).mean(0), (40, 40, 200), atol=3)


# ---------------------------------------------------------------------------------------------- Figs 5-7


def assert_spatial(fig, gene, truth, preds, xy, scale, diameter):
    """Truth then each method, every panel the spots at their place coloured by its own values on the truth's
    1st-99th percentile scale, each method titled with its r over spots; one colour bar named after the gene."""
    labels = ["Truth", *preds]
    axes = panels(fig)
    assert len(axes) == len(labels)
    lo, hi = np.percentile(truth, [1, 99])
    for ax, label, values in zip(axes, labels, [truth, *preds.values()]):
        if label == "Truth":
            assert ax.get_title() == "Truth"
        else:
            ok = np.isfinite(values)
            assert ax.get_title() == f"{label} (r = {np.corrcoef(truth[ok], values[ok])[0, 1]:.3f})"
        assert len(ax.images) == 1
        (spots,) = ax.collections
        shown = spots.get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(shown), ~np.isfinite(values))
        np.testing.assert_allclose(shown.filled(np.nan), values, rtol=1e-12)
        np.testing.assert_allclose(spots.get_offsets(), xy * scale)
        np.testing.assert_allclose(spots.get_widths(), diameter * scale)
        assert (spots.norm.vmin, spots.norm.vmax) == pytest.approx((lo, hi)) and spots.norm.clip
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1 and colourbars[0].get_ylabel() == f"{gene} expression"


def test_spatial_maps_on_real_thumbnail(tmp_path, sample, drawn):
    from scipy.spatial import cKDTree

    X, genes, xy = sample["X"], sample["genes"], sample["xy"]
    thumb, scale = read_thumbnail(sample["wsi"], max_px=400)
    j = genes.index(check_gene("CD24", genes, "figures.genes"))
    preds = {m: p[:, j] for m, p in noisy_preds(X).items()}
    preds["STNet"][:5] = np.nan  # missing values are left uncoloured
    paths = spatial_maps("CD24", X[:, j], preds, xy[:, 0], xy[:, 1], thumb, scale, tmp_path / "fig6",
                         title="CD24 on synthetic COAD")
    assert paths == [tmp_path / "fig6.png", tmp_path / "fig6.pdf"]
    assert_figure_files(tmp_path / "fig6")
    assert drawn[-1].get_suptitle() == "CD24 on synthetic COAD"
    spacing = np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])
    assert_spatial(drawn[-1], "CD24", X[:, j], preds, xy, scale, 0.8 * spacing)
    spatial_maps("CD24", X[:, j], {}, xy[:, 0], xy[:, 1], thumb, scale, tmp_path / "truth_only", spot_diameter_px=110)
    assert_figure_files(tmp_path / "truth_only")
    assert drawn[-1].get_suptitle() == "CD24: truth vs predictions"
    assert_spatial(drawn[-1], "CD24", X[:, j], {}, xy, scale, 110)
    with pytest.raises(ValueError, match="prediction CMRCNet: expected shape"):
        spatial_maps("CD24", X[:, j], {"CMRCNet": X[:-1, j]}, xy[:, 0], xy[:, 1], thumb, scale, tmp_path / "bad")
    assert not list(tmp_path.glob("bad*"))


def test_dataset_figures_map_the_chosen_gene_on_the_first_tested_sample(tmp_path, monkeypatch):
    """What `dataset_figures` hands each plotting function: the spatial map gets the chosen gene's column of the
    first listed sample that was tested, for the truth and every method; Fig 2 the methods asked for."""
    from test_evaluate import GENES, _truth, write_normalised, write_prediction

    import cmrcnet.figures
    from cmrcnet.evaluation.evaluate import evaluate_dataset
    from cmrcnet.figures.paper import dataset_figures

    paths = [write_prediction(tmp_path / f"{m}/fold{f}.h5ad", method=m, fold=f, layers={"pred": shift})
             for m, shift in (("a", lambda t: t + 1.0), ("b", lambda t: 2.0 * t)) for f in range(2)]
    scores, sets, _ = evaluate_dataset(paths, write_normalised(tmp_path), dataset="d", marker_genes=["G3", "G7"],
                                       top_genes=[5], protocols=["paper"])
    calls = {}
    for name in ("boxplots", "mean_variance", "correlation_heatmaps", "spatial_maps", "training_curves"):
        monkeypatch.setattr(cmrcnet.figures, name, lambda *a, _name=name, **k: calls.setdefault(_name, []).append(
            (a, k)) or [])
    monkeypatch.setattr(cmrcnet.figures, "read_thumbnail", lambda path, max_px: (np.zeros((4, 4, 3), np.uint8), 0.5))
    common = {"dataset": "d", "prediction_paths": paths, "scores": scores, "gene_sets": sets, "labels": ["b", "a"],
              "histories": {}, "wsis": {"S1": "s1.tif", "S2": "s2.tif"}, "out_dir": tmp_path / "figs"}
    for gene, markers, samples, expected_gene, fold in (("G4", [], ["S3", "S2", "S1"], "G4", 1),
                                                        (None, ["NOPE", "G7"], ["S1", "S2"], "G7", 0)):
        calls.clear()
        dataset_figures(**common, gene=gene, markers=markers, samples=samples)
        (args, kwargs), = calls["spatial_maps"]
        col, truth = GENES.index(expected_gene), _truth(fold)
        assert args[0] == expected_gene and kwargs["title"] == f"d: {expected_gene} on S{fold + 1}"
        np.testing.assert_allclose(args[1], truth[:, col], rtol=1e-6)
        assert list(args[2]) == ["b", "a"]
        np.testing.assert_allclose(args[2]["a"], truth[:, col] + 1.0, rtol=1e-6)
        np.testing.assert_allclose(args[2]["b"], 2.0 * truth[:, col], rtol=1e-6)
        np.testing.assert_allclose(args[3], np.arange(len(truth)) * 10.0)
        (_, box_kwargs), = calls["boxplots"]
        assert box_kwargs["methods"] == ["b", "a"] and box_kwargs["gene_sets"] == ["marker"]
        (mv_args, _), = calls["mean_variance"]
        assert list(mv_args[1]) == ["b", "a"] and mv_args[0].shape == (80, len(GENES))


# ---------------------------------------------------------------------------------------------- curves


def test_training_curves(tmp_path, drawn):
    epochs = np.arange(1, 16)
    histories = {m: pd.DataFrame({"epoch": epochs, "train_loss": 1 + np.exp(-epochs / 4),
                                  "val_loss": 1.2 + np.exp(-epochs / 5) + 0.02 * epochs, "seconds": 1.0})
                 for m in METHODS}
    histories["STNet"] = histories["STNet"].iloc[::-1]  # rows in any order: drawn by epoch
    histories["BLEEP"] = histories["BLEEP"].assign(train_loss=np.geomspace(30, 1.25, 15))  # a 24x range: log axis
    histories["HisToGene"] = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.4]})  # no validation
    training_curves(histories, tmp_path / "curves", title="Training")
    assert_figure_files(tmp_path / "curves")
    fig = drawn[-1]
    assert fig.get_suptitle() == "Training"
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [*METHODS, "HisToGene"]
    for ax, (label, table) in zip(axes, histories.items()):
        table = table.sort_values("epoch")
        train, *rest = ax.lines
        np.testing.assert_array_equal(train.get_xdata(), table["epoch"])
        np.testing.assert_allclose(train.get_ydata(), table["train_loss"])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        if "val_loss" not in table:
            assert rest == [] and len(ax.collections) == 0 and legend == ["train"]
            continue
        val, best_line = rest
        np.testing.assert_array_equal(val.get_xdata(), table["epoch"])
        np.testing.assert_allclose(val.get_ydata(), table["val_loss"])
        best = int(table["epoch"].iloc[int(np.argmin(table["val_loss"].to_numpy()))])
        assert best == 12  # 1.2 + exp(-e/5) + 0.02 e is lowest near e = 5 ln 10 = 11.5, and lower at 12 than 11
        assert list(best_line.get_xdata()) == [best, best]
        (star,) = ax.collections
        np.testing.assert_allclose(star.get_offsets(), [[best, table["val_loss"].min()]])
        assert legend == ["train", "validation", f"best (epoch {best})"]
        assert ax.get_yscale() == ("log" if label == "BLEEP" else "linear")
    with pytest.raises(ValueError, match="history X: lacks column"):
        training_curves({"X": pd.DataFrame({"epoch": [1]})}, tmp_path / "bad")


def test_pooled_predictions_align_every_method_to_the_truths_spots(tmp_path):
    from test_evaluate import GENES, _truth, write_prediction

    from cmrcnet.figures.paper import pooled_predictions

    def shifted(t):
        return t + 1.0

    paths = [write_prediction(tmp_path / f"a/fold{f}.h5ad", method="a", fold=f, layers={"pred": shifted})
             for f in range(2)]
    # method b's file for fold 0 lists the same spots in reverse order
    reverse = write_prediction(tmp_path / "b/fold0.h5ad", method="b", fold=0, layers={"k5": shifted},
                               truth=_truth(0)[::-1].copy())
    flipped = ad.read_h5ad(reverse)
    flipped.obs_names = flipped.obs_names[::-1]
    flipped.write_h5ad(reverse)
    b1 = write_prediction(tmp_path / "b/fold1.h5ad", method="b", fold=1, layers={"k5": shifted})
    truth, preds, obs, genes = pooled_predictions([*paths, reverse, b1], ["a", "b-k5"])
    assert genes == GENES and truth.shape == (80, len(GENES)) and list(obs["sample"].unique()) == ["S1", "S2"]
    np.testing.assert_allclose(preds["a"], truth + 1.0, rtol=1e-6)
    np.testing.assert_allclose(preds["b-k5"], truth + 1.0, rtol=1e-6)


def test_pooled_predictions_refuse_a_method_missing_spots(tmp_path):
    from test_evaluate import write_prediction

    from cmrcnet.figures.paper import dataset_figures, pooled_predictions

    a = [write_prediction(tmp_path / f"a/fold{f}.h5ad", method="a", fold=f, layers={"pred": lambda t: t})
         for f in range(2)]
    b = write_prediction(tmp_path / "b/fold0.h5ad", method="b", fold=0, layers={"pred": lambda t: t})
    with pytest.raises(CMRCNetError, match="b does not predict every test spot"):
        pooled_predictions([*a, b], ["a", "b"])
    with pytest.raises(CMRCNetError, match="no method to draw"):
        dataset_figures(dataset="d", prediction_paths=a, scores=None, gene_sets=None, labels=[], histories={},
                        wsis={}, samples=[], out_dir=tmp_path)
