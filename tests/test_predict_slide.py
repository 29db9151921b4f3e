"""Prediction on a new whole slide: it reproduces the fold's own predictions at the real spot centres, finds the
synthetic generator's tissue, predicts a marker that follows the truth, writes an AnnData scanpy can draw, and
refuses bad input with a one-line error and nothing written."""

from __future__ import annotations

import importlib.util
import json

import anndata as ad
import numpy as np
import pytest
import tifffile
import torch
from test_datasets import build_synthetic_processed
from torch import nn
from torch.nn import functional as F

import cmrcnet.models
import cmrcnet.train as train_module
from cmrcnet.data.synthetic import ALL_MARKERS, BACKGROUND_RGB
from cmrcnet.errors import CMRCNetError
from cmrcnet.inference.predict import predict_fold
from cmrcnet.inference.slide_predict import predict_slide

PATCH_PX, UM_PER_PX = 32, 2.0  # as tests/test_train.py's synthetic data: 64 um patches


def _features(images: torch.Tensor) -> torch.Tensor:
    """Colour and texture per channel, and the left half's mean: changes under flips, so TTA matters."""
    half = images.shape[-1] // 2
    return torch.cat([images.mean((2, 3)), images.std((2, 3)), images[..., :half].mean((2, 3))], 1)


class TinyRegressor(nn.Module):
    """Stand-in for STNet: patch colour/texture -> small MLP."""

    kind, slide_level = "regression", False

    def __init__(self, n_genes, input_size=PATCH_PX):
        super().__init__()
        self.input_size = input_size
        self.net = nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))

    def set_output_bias(self, mean):
        self.bias.copy_(mean)

    def predict(self, batch):
        return self.net(_features(batch["image"])) + self.bias

    def forward(self, batch):
        mse = F.mse_loss(self.predict(batch), batch["expr"])
        return {"loss": mse, "mse": mse}


class TinyRetriever(nn.Module):
    """Stand-in for CMRCNet/BLEEP: two small towers trained with the symmetric contrastive loss."""

    kind, slide_level = "retrieval", False

    def __init__(self, n_genes, input_size=PATCH_PX, dim=16):
        super().__init__()
        self.input_size = input_size
        self.image = nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, dim))
        self.gene = nn.Sequential(nn.Linear(n_genes, 32), nn.ReLU(), nn.Linear(32, dim))

    def embed_image(self, images):
        return self.image(_features(images))

    def embed_expression(self, expression):
        return self.gene(expression)

    def forward(self, batch):
        img = F.normalize(self.embed_image(batch["image"]), dim=1)
        gene = F.normalize(self.embed_expression(batch["expr"]), dim=1)
        logits = img @ gene.T / 0.1
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss}


class TinySlideModel(TinyRegressor):
    slide_level = True


MODELS = {"stnet": TinyRegressor, "bleep": TinyRetriever, "histogene": TinySlideModel}


def _create(name, n_genes, **params):
    return MODELS[name](n_genes, **params)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    """Prediction rebuilds checkpoints through `cmrcnet.models.create_model`: build the stand-ins."""
    monkeypatch.setattr(cmrcnet.models, "create_model", _create)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one thread is several times faster than two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three synthetic Visium samples through the real stages (genes, normalisation, patches, folds), a regression
    and a retrieval model trained on fold 0, and that fold's prediction files."""
    root = tmp_path_factory.mktemp("slides")
    raw, proc = build_synthetic_processed(root, PATCH_PX, UM_PER_PX)

    out = {"raw": raw, "proc": proc}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_model", lambda name, n_genes, params: _create(name, n_genes, **params))
        mp.setattr(cmrcnet.models, "create_model", _create)
        for name, lr, epochs in (("stnet", 1e-2, 20), ("bleep", 3e-3, 5)):
            train_module.train_fold(method=name, method_cfg={"model": name, "params": {}},
                                    train_cfg={"epochs": epochs, "batch_size": 16, "lr": lr, "num_workers": 0,
                                               "patience": None, "schedule": "constant"},
                                    dataset_dir=proc, fold=0, out_dir=root / name, progress=False,
                                    technology="visium")
            out[name] = root / name / "best.pt"
            out[f"{name}_pred"] = root / f"{name}_fold0.h5ad"
            predict_fold(model_path=out[name], dataset_dir=proc, fold=0, out_path=out[f"{name}_pred"], method=name,
                         ks=(5,), tta=True, device="cpu", batch_size=64)
    from cmrcnet.data.datasets import load_fold

    test = load_fold(proc, 0).test_samples
    assert len(test) == 1
    out["test"] = test[0]
    out["slide"] = raw / "wsis" / f"{test[0]}.tif"
    return out


def _predict(trained, model, out, **kwargs):
    return predict_slide(trained[model], trained["slide"], out, device="cpu", progress=False, batch_size=64,
                         **kwargs)


# ---------------------------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("model, layer, kwargs", [("stnet", "pred", {}), ("stnet", "tta", {"tta": True}),
                                                  ("bleep", "k5", {"k": 5})])
def test_same_predictions_as_the_fold_at_the_real_spot_centres(trained, tmp_path, model, layer, kwargs):
    fold = ad.read_h5ad(trained[f"{model}_pred"])
    centres = fold.obs[["x", "y"]].to_numpy()
    out = tmp_path / "slide.h5ad"
    info = _predict(trained, model, out, centres=centres, **kwargs)
    result = ad.read_h5ad(out)
    assert info["n_spots"] == len(centres) and info["tissue"] == "centres given"
    assert list(result.var_names) == list(fold.var_names)
    np.testing.assert_allclose(result.obsm["spatial"], centres)
    np.testing.assert_allclose(result.X, fold.layers[layer], rtol=1e-5, atol=1e-5)
    assert not np.allclose(result.X, fold.X, atol=1e-3)  # a prediction, not the truth


# ---------------------------------------------------------------------------------------------- synthetic truth


def test_tissue_is_found_and_the_marker_map_follows_the_truth(trained, tmp_path):
    out, maps = tmp_path / "slide.h5ad", tmp_path / "maps" / "slide"
    raw = ad.read_h5ad(trained["raw"] / "st" / f"{trained['test']}.h5ad")
    truth = ad.read_h5ad(trained["proc"] / "st" / f"{trained['test']}.h5ad")  # normalised, in-tissue spots
    markers = [g for g in truth.var_names if g in ALL_MARKERS]
    assert markers
    values = truth[:, markers].X
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    marker = markers[int(np.argmax(values.var(axis=0)))]
    info = _predict(trained, "stnet", out, genes=[marker], maps_prefix=maps)
    result = ad.read_h5ad(out)

    # spots lie on the generator's lattice, named as its barcodes; they cover its in-tissue spots, little else
    on_tissue = set(raw.obs_names[raw.obs["in_tissue"].to_numpy() == 1])
    off_tissue = set(raw.obs_names) - on_tissue
    laid = set(result.obs_names)
    assert laid <= set(raw.obs_names) and info["tissue"] == "detected" and info["layout"]["technology"] == "visium"
    assert len(laid & on_tissue) >= 0.9 * len(on_tissue), (len(laid & on_tissue), len(on_tissue))
    assert len(laid & off_tissue) <= 0.5 * max(len(off_tissue), 1), (len(laid & off_tissue), len(off_tissue))
    np.testing.assert_allclose(result.obsm["spatial"], raw[result.obs_names].obsm["spatial"], atol=1e-6)

    shared = [b for b in truth.obs_names if b in laid]
    predicted = result[shared, marker].X.ravel()
    true = np.asarray(truth[shared, marker].X.toarray() if hasattr(truth.X, "toarray") else truth[shared, marker].X)
    r = np.corrcoef(predicted, true.ravel())[0, 1]
    assert r > 0.5, (marker, r)
    assert info["maps"] == [str(maps) + ".png", str(maps) + ".pdf"]
    assert all((tmp_path / "maps" / f"slide.{ext}").stat().st_size > 1000 for ext in ("png", "pdf"))


@pytest.mark.filterwarnings("ignore:Use `squidpy.pl.spatial_scatter` instead:FutureWarning",
                            "ignore:The set_bad function:PendingDeprecationWarning")
def test_anndata_is_readable_by_scanpy(trained, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    out = tmp_path / "slide.h5ad"
    info = _predict(trained, "bleep", out, k=5, layout="xenium")
    adata = ad.read_h5ad(out)
    assert adata.X.dtype == np.float32 and adata.n_obs == info["n_spots"] > 20
    library = trained["test"]
    spatial = adata.uns["spatial"][library]
    assert spatial["images"]["hires"].dtype == np.uint8 and spatial["images"]["hires"].ndim == 3
    scalef = spatial["scalefactors"]["tissue_hires_scalef"]
    assert 0 < scalef <= 1 and spatial["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / 0.35)
    assert np.all(adata.obsm["spatial"] * scalef < np.array(spatial["images"]["hires"].shape[1::-1]))
    meta = json.loads(adata.uns["cmrcnet"])
    assert meta["k"] == 5 and meta["kind"] == "retrieval" and meta["layout"]["shape"] == "square"
    assert meta["model_fingerprint"] and meta["pixel_size_um"] == pytest.approx(0.35)
    assert meta["patches"]["um_per_px"] == UM_PER_PX and "versions" in meta["provenance"]
    # Xenium-style square pseudo-spots: a square lattice, 100 um apart
    xs = np.unique(np.round(adata.obsm["spatial"][:, 0] * 0.35, 6))
    assert np.allclose(np.diff(xs) % 100, 0)
    gene = adata.var_names[0]
    sc.pl.spatial(adata, color=gene, show=False)
    plt.close("all")


def test_cli_writes_the_anndata_and_maps(trained, tmp_path, capsys):
    from cmrcnet.cli import main

    out = tmp_path / "cli.h5ad"
    gene = ad.read_h5ad(trained["stnet_pred"]).var_names[0]
    main(["predict-slide", str(trained["stnet"]), str(trained["slide"]), "--out", str(out), "--tta",
          "--device", "cpu", "--maps", str(tmp_path / "maps" / "cli"), "--genes", gene, gene])
    info = json.loads(capsys.readouterr().out)
    assert out.is_file() and info["tta"] is True
    assert info["maps"] == [str(tmp_path / "maps" / "cli.png"), str(tmp_path / "maps" / "cli.pdf")]
    # without genes: the most variable predictions are drawn
    main(["predict-slide", str(trained["bleep"]), str(trained["slide"]), "--out", str(tmp_path / "b.h5ad"),
          "--k", "3", "--device", "cpu", "--maps", str(tmp_path / "maps" / "bleep")])
    assert (tmp_path / "maps" / "bleep.png").is_file() and json.loads(capsys.readouterr().out)["k"] == 3


# ---------------------------------------------------------------------------------------------- bad input


def _write_tiff(path, image, um_per_px=None):
    """A tiled pyramidal TIFF (two levels), with resolution tags when `um_per_px` is given."""
    res = {"resolution": (1e4 / um_per_px, 1e4 / um_per_px), "resolutionunit": "CENTIMETER"} if um_per_px else {}
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", compression="zlib", subifds=1, **res)
        tw.write(image[::2, ::2], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def _without(trained, path, model, *keys, **changes):
    """A copy of a trained checkpoint, at `path`, without `keys` and with `changes`."""
    ckpt = torch.load(trained[model], map_location="cpu", weights_only=True)
    for key in keys:
        del ckpt[key]
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def _bad_inputs(trained, tmp_path):
    """(what, kwargs for predict_slide, error regex) for every refused input."""
    blank = _write_tiff(tmp_path / "blank.tif", np.full((700, 700, 3), BACKGROUND_RGB, np.uint8), 0.35)
    no_size = _write_tiff(tmp_path / "nosize.tif", tifffile.imread(trained["slide"], level=1), None)
    text = tmp_path / "text.tif"
    text.write_text("not a slide\n")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(trained["slide"].read_bytes()[: trained["slide"].stat().st_size // 2])
    svs = tmp_path / "slide.svs"
    svs.write_bytes(b"\0" * 100)
    empty_json = tmp_path / "none.geojson"
    empty_json.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "Polygon", "coordinates": [[[1e6, 1e6], [1e6 + 10, 1e6], [1e6, 1e6 + 10]]]}))
    slide = trained["slide"]
    fold_genes = list(ad.read_h5ad(trained["stnet_pred"]).var_names)
    return [
        ("no pixel size", {"slide": no_size}, rf"{no_size}: no pixel size: .* give it with --mpp"),
        ("bad mpp", {"mpp": -1.0}, r"--mpp: must be a number above 0"),
        ("coarser slide", {"mpp": 5.0}, rf"{slide}: slide is 5 um/px, coarser than the 2 um/px the model was "
                                        r"trained at"),
        ("no tissue", {"slide": blank}, rf"{blank}: no tissue found .* --tissue GEOJSON"),
        ("no polygons", {"tissue": empty_json}, rf"{empty_json}: no Polygon or MultiPolygon"),
        ("polygons off the slide", {"tissue": far}, rf"{far}: no tissue: its polygons do not cover"),
        ("unknown gene", {"genes": [fold_genes[0].lower() + "x"]},
         rf"stnet/best.pt: gene {fold_genes[0].lower()}x is not one of the {len(fold_genes)} genes the model "
         rf"predicts; close names: {fold_genes[0]}"),
        ("not a TIFF", {"slide": text}, rf"{text}: not a readable TIFF"),
        ("truncated TIFF", {"slide": truncated}, rf"{truncated}: (not a readable TIFF|corrupt image data)"),
        ("missing slide", {"slide": tmp_path / "absent.tif"}, r"absent\.tif: slide image \(TIFF\) not found"),
        ("OpenSlide format", {"slide": svs}, rf"{svs}: not a readable slide" if importlib.util.find_spec("openslide")
         else rf"{svs}: \.svs slides are read through OpenSlide, which is not installed"),
        ("retrieval model without a bank", {"model": _without(trained, tmp_path / "no-bank.pt", "bleep", "bank"), "k": 5},
         r"no-bank\.pt: no reference bank"),
        ("k beyond the bank", {"model": trained["bleep"], "k": 10**6}, r"--k: 1000000 neighbours requested"),
        ("model without patch settings", {"model": _without(trained, tmp_path / "no-patches.pt", "stnet", "patches")},
         r"no-patches\.pt: does not record the patch resolution"),
        ("a >1 GiB region", {"model": _without(trained, tmp_path / "coarse.pt", "stnet", patches={"um_per_px": 100.0,
                                                                                    "size_px": 1024})},
         rf"{slide}: a 1024-px patch at 100 um/px would read a \d+ x \d+ px region"),
        ("slide-level model", {"model": _without(trained, tmp_path / "slide-level.pt", "stnet", model_name="histogene")},
         r"slide-level\.pt: a slide-level histogene model"),
        ("centres off the slide", {"centres": [[10.0, 10.0], [1e7, 5.0]]}, r"centres: 1 centres lie outside"),
        ("unknown layout", {"layout": "slideseq"}, r"--layout: unknown layout 'slideseq'"),
        ("bad pitch", {"pitch_um": 0}, r"--pitch: must be a distance above 0 um"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "out" / "slide.h5ad"
    maps = tmp_path / "out" / "map"
    for what, kwargs, pattern in _bad_inputs(trained, tmp_path):
        kwargs = {"model": trained["stnet"], "slide": trained["slide"], **kwargs}
        model, slide = kwargs.pop("model"), kwargs.pop("slide")
        with pytest.raises(CMRCNetError, match=pattern) as err:
            predict_slide(model, slide, out, device="cpu", progress=False, maps_prefix=maps, **kwargs)
        assert "\n" not in str(err.value), what
        assert not out.parent.exists() or not any(out.parent.iterdir()), (what, list(out.parent.iterdir()))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(CMRCNetError, match=r"folder: is a folder"):
        predict_slide(trained["stnet"], trained["slide"], folder, device="cpu", progress=False)


def test_given_pixel_size_and_tissue_outline(trained, tmp_path):
    """A slide without a recorded pixel size predicts with --mpp; a GeoJSON outline limits the spots to it."""
    raw = tmp_path / "nosize.tif"
    image = tifffile.imread(trained["slide"])
    _write_tiff(raw, image, None)
    h, w = image.shape[:2]
    box = [[w * 0.25, h * 0.25], [w * 0.75, h * 0.25], [w * 0.75, h * 0.75], [w * 0.25, h * 0.75], [w * 0.25, h * 0.25]]
    hole = [[w * 0.4, h * 0.4], [w * 0.6, h * 0.4], [w * 0.6, h * 0.6], [w * 0.4, h * 0.6]]
    outline = tmp_path / "tissue.geojson"
    outline.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [box, hole]}}]}))
    info = predict_slide(trained["stnet"], raw, tmp_path / "p.h5ad", mpp=0.35, tissue=outline, device="cpu",
                         progress=False)
    xy = ad.read_h5ad(tmp_path / "p.h5ad").obsm["spatial"]
    assert info["pixel_size_source"] == "--mpp" and info["tissue"] == str(outline)
    inside = (xy >= [w * 0.25, h * 0.25]).all(1) & (xy <= [w * 0.75, h * 0.75]).all(1)
    in_hole = (xy > [w * 0.4, h * 0.4]).all(1) & (xy < [w * 0.6, h * 0.6]).all(1)
    assert inside.all() and not in_hole.any() and len(xy) > 10


# ---------------------------------------------------------------------------------------------- pieces


def test_vendor_slides_are_read_through_openslide(trained, tmp_path, monkeypatch):
    """An .svs goes through OpenSlide (here a stand-in serving the synthetic TIFF, with OpenSlide's conventions:
    level-0 coordinates, RGBA transparent off the slide) and predicts what the TIFF predicts."""
    import sys
    import types

    from PIL import Image

    from cmrcnet.data.slide import Slide

    class FakeOpenSlide:
        def __init__(self, path):
            self._slide = Slide(trained["slide"])
            self.level_dimensions = [(lvl.width, lvl.height) for lvl in self._slide.levels]
            self.level_downsamples = [lvl.downsample for lvl in self._slide.levels]
            self.properties = {"openslide.mpp-x": "0.35"}

        def read_region(self, location, level, size):
            down = self.level_downsamples[level]
            x, y = round(location[0] / down), round(location[1] / down)
            rgb = self._slide.read_region(x, y, size[0], size[1], level=level, fill=0)
            lvl = self._slide.levels[level]
            yy, xx = np.mgrid[y: y + size[1], x: x + size[0]]
            alpha = ((xx >= 0) & (yy >= 0) & (xx < lvl.width) & (yy < lvl.height)).astype(np.uint8) * 255
            return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")

        def close(self):
            self._slide.close()

    monkeypatch.setitem(sys.modules, "openslide", types.SimpleNamespace(OpenSlide=FakeOpenSlide))
    svs = tmp_path / "slide.svs"
    svs.write_bytes(b"")
    a = predict_slide(trained["stnet"], trained["slide"], tmp_path / "tif.h5ad", device="cpu", progress=False)
    b = predict_slide(trained["stnet"], svs, tmp_path / "svs.h5ad", device="cpu", progress=False)
    assert b["pixel_size_um"] == 0.35 and b["n_spots"] == a["n_spots"]
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "svs.h5ad").X, ad.read_h5ad(tmp_path / "tif.h5ad").X,
                               rtol=1e-5, atol=1e-5)


def test_pixel_size_from_ome_metadata(tmp_path):
    from cmrcnet.data.slide import Slide, file_pixel_size_um

    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"})
    with Slide(path) as slide:
        assert file_pixel_size_um(slide) == pytest.approx(0.25)


def test_spot_lattices():
    from cmrcnet.data.spot_layout import geometry, lattice, spots_on_tissue
    from cmrcnet.data.synthetic import spot_grid

    for tech in ("visium", "xenium"):
        grid, same = spot_grid(tech, 1000, 700), lattice(1000, 700, 100.0, tech == "visium")
        assert all(np.array_equal(grid[k], same[k]) for k in grid)
    hexagon = lattice(1000, 1000, 100.0, True)
    xy = np.column_stack([hexagon["x_um"], hexagon["y_um"]])
    nearest = np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=2), axis=1)[:, 1]
    assert np.allclose(nearest, 100.0)  # every spot's nearest neighbours are 100 um away
    assert set(hexagon["col"][hexagon["row"] == 1] % 2) == {1}  # Visium's column numbering
    assert geometry("visium", 50.0).diameter_um == pytest.approx(27.5)
    # a mask covering the left half of a 1000 x 1000 um slide at 0.5 um/px, drawn at 0.01 mask px per level-0 px
    mask = np.zeros((20, 20), bool)
    mask[:, :10] = True
    spots = spots_on_tissue(mask, 0.01, 2000, 2000, 0.5, geometry("xenium"))
    assert len(spots["x_px"]) == 5 * 10 and (spots["x_px"] < 1000).all()
