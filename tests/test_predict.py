"""Prediction of a fold's test spots: refused inputs name the file and problem, test-time augmentation is the
mean over the 8 flips/rotations, and retrieval searches the fold's training spots only."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_datasets import GENES, write_dataset, write_patches
from torch import nn

import cmrcnet.models
from cmrcnet.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_fold
from cmrcnet.errors import CMRCNetError
from cmrcnet.inference.predict import check_k_fits, load_trained_model, predict_fold
from cmrcnet.train import file_identity, fingerprint_hash

SIZE = 8  # model input: patches are resized to 8 x 8


class TinyRegressor(nn.Module):
    """Stand-in for STNet: a small MLP over the raw pixels, so every flip and rotation predicts differently, and
    the mean of its outputs is not its output for the mean image."""

    kind, slide_level = "regression", False

    def __init__(self, n_genes, input_size=SIZE, extra_outputs=0, nan=False):
        super().__init__()
        self.input_size, self.nan = input_size, nan
        self.head = nn.Sequential(nn.Linear(3 * input_size * input_size, 32), nn.ReLU(),
                                  nn.Linear(32, n_genes + extra_outputs))

    def predict(self, batch):
        out = self.head(batch["image"].flatten(1))
        if self.nan:
            out[0, 0] = float("nan")
        return out


class TinyRetriever(nn.Module):
    """Stand-in for CMRCNet/BLEEP: an image embeds as its mean colour in [0, 1] (3 dims), an expression profile
    (3 genes) as itself, so which reference spot a query finds can be worked out by hand."""

    kind, slide_level = "retrieval", False

    def __init__(self, n_genes, input_size=SIZE):
        super().__init__()
        assert n_genes == 3
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def embed_image(self, images):
        return (images * self.std + self.mean).mean((2, 3))

    def embed_expression(self, expression):
        return expression


MODELS = {"stnet": TinyRegressor, "bleep": TinyRetriever}


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    """`load_trained_model` rebuilds checkpoints through `cmrcnet.models.create_model`: build the stand-ins."""
    monkeypatch.setattr(cmrcnet.models, "create_model", lambda name, n_genes, **params: MODELS[name](n_genes, **params))


def write_checkpoint(path, model_name="stnet", genes=GENES, fold=0, params=None, model=None, drop=(), **extra):
    """A `best.pt` as `cmrcnet train` writes it (the keys prediction reads)."""
    params = dict(params or {})
    if model is None:
        torch.manual_seed(0)
        model = MODELS[model_name](len(genes), **params)
    ckpt = {"model": model.state_dict(), "model_name": model_name, "params": params, "genes": list(genes),
            "fold": fold, "method": "tiny", "epoch": 3, **extra}
    for key in drop:
        del ckpt[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "ds")  # S0 is fold 0's test sample; S1, S2 train; 40 spots each, 8 genes


def predict(model_path, dataset_dir, out_path, **kwargs):
    kwargs = {"fold": 0, "method": "tiny", "device": "cpu", "batch_size": 16, **kwargs}
    return predict_fold(model_path=model_path, dataset_dir=dataset_dir, out_path=out_path, **kwargs)


# ---------------------------------------------------------------------------------------------- refused inputs


def test_missing_or_unreadable_checkpoint_names_the_file(tmp_path, dataset_dir):
    with pytest.raises(CMRCNetError, match=r"nope\.pt: model checkpoint not found \(training not finished\?\)"):
        predict(tmp_path / "nope.pt", dataset_dir, tmp_path / "p.h5ad")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"half a checkpoint")
    with pytest.raises(CMRCNetError, match=r"junk\.pt: cannot read checkpoint"):
        predict(junk, dataset_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize("key", ["model", "model_name", "params", "genes"])
def test_checkpoint_without_a_key_is_not_a_model_checkpoint(tmp_path, key):
    path = write_checkpoint(tmp_path / "best.pt", drop=[key])
    with pytest.raises(CMRCNetError, match=rf"best\.pt: not a model checkpoint written by `cmrcnet train` "
                                           rf"\(no '{key}'\)"):
        load_trained_model(path, torch.device("cpu"))


def test_checkpoint_of_another_model_is_refused_before_it_is_built(tmp_path, dataset_dir, monkeypatch):
    path = write_checkpoint(tmp_path / "best.pt", model_name="stnet")
    built = []
    monkeypatch.setattr(cmrcnet.models, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(CMRCNetError, match=r"best\.pt: a stnet model \(method tiny\), but the method to predict "
                                           r"is a bleep model; give the checkpoint of that method"):
        predict(path, dataset_dir, tmp_path / "p.h5ad", expected_model="bleep")
    assert built == [] and not (tmp_path / "p.h5ad").exists()


def test_model_of_other_genes_or_another_fold_is_refused(tmp_path, dataset_dir):
    other = write_checkpoint(tmp_path / "genes" / "best.pt", genes=GENES[:-1])
    with pytest.raises(CMRCNetError, match=rf"genes/best\.pt: trained on 7 genes that differ from "
                                           rf"{dataset_dir / 'genes.tsv'}; retrain the model"):
        predict(other, dataset_dir, tmp_path / "p.h5ad")
    renamed = write_checkpoint(tmp_path / "renamed" / "best.pt", genes=[g.lower() for g in GENES])
    with pytest.raises(CMRCNetError, match=r"renamed/best\.pt: trained on 8 genes that differ"):
        predict(renamed, dataset_dir, tmp_path / "p.h5ad")
    fold1 = write_checkpoint(tmp_path / "fold1" / "best.pt", fold=1)
    with pytest.raises(CMRCNetError, match=r"fold1/best\.pt: trained on fold 1, asked to predict fold 0"):
        predict(fold1, dataset_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize("table", ["genes.tsv", "folds.tsv"])
def test_model_of_older_tables_is_refused(tmp_path, dataset_dir, table):
    data = {"genes.tsv": file_identity(dataset_dir / "genes.tsv"), "folds.tsv": file_identity(dataset_dir / "folds.tsv")}
    fp = {"data": data}
    current = write_checkpoint(tmp_path / "current" / "best.pt", fingerprint=fp)
    info = predict(current, dataset_dir, tmp_path / "p.h5ad")
    assert info["inputs"] == data and info["model_fingerprint"] == fingerprint_hash(fp)
    old = write_checkpoint(tmp_path / "old" / "best.pt", fingerprint={"data": {**data, table: "sha256:0123"}})
    with pytest.raises(CMRCNetError, match=rf"old/best\.pt: trained on another {table} than "
                                           rf"{dataset_dir / table}; retrain the model"):
        predict(old, dataset_dir, tmp_path / "q.h5ad")
    assert not (tmp_path / "q.h5ad").exists()


def test_prediction_of_the_wrong_shape_or_with_nan_is_not_written(tmp_path, dataset_dir):
    wide = write_checkpoint(tmp_path / "wide" / "best.pt", params={"extra_outputs": 1})
    with pytest.raises(RuntimeError, match=r"tiny fold 0: prediction pred has shape \(40, 9\), truth \(40, 8\)"):
        predict(wide, dataset_dir, tmp_path / "p.h5ad")
    nan = write_checkpoint(tmp_path / "nan" / "best.pt", params={"nan": True})
    with pytest.raises(CMRCNetError, match=r"tiny fold 0: prediction pred contains NaN or infinite values"):
        predict(nan, dataset_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


# ---------------------------------------------------------------------------------------------- TTA


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square, written independently of `apply_dihedral`: 4 turns of the image and 4 of
    its transpose (a reflection)."""
    mirrored = images.transpose(-2, -1)
    return [torch.rot90(im, k, dims=(-2, -1)) for im in (images, mirrored) for k in range(4)]


def test_tta_is_the_mean_over_the_eight_flips_and_rotations(tmp_path, dataset_dir):
    model_path = write_checkpoint(tmp_path / "best.pt")
    info = predict(model_path, dataset_dir, tmp_path / "p.h5ad", tta=True, batch_size=7)  # batches of 7, 7, ..., 5
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert dict(result.uns["labels"]) == {"pred": "tiny", "tta": "tiny-tta"} and info["tta"] is True

    model = TinyRegressor(len(GENES))
    model.load_state_dict(torch.load(model_path, weights_only=True)["model"])
    data = load_fold(dataset_dir, 0)
    dataset = data.spot_dataset(data.all_spots(data.test_samples), SIZE)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    views = dihedral_views(images)
    assert len({v.numpy().tobytes() for v in views}) == 8  # the patches' dark corner makes every view differ
    with torch.no_grad():
        outputs = torch.stack([model.predict({"image": v}) for v in views]).numpy()
    np.testing.assert_allclose(result.layers["pred"], outputs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.layers["tta"], outputs.mean(0), rtol=1e-5, atol=1e-5)
    # not trivially so: each view alone, the 4 turns alone, or the model applied to the mean view differ
    for one in outputs:
        assert np.abs(result.layers["tta"] - one).max() > 1e-2
    assert np.abs(result.layers["tta"] - outputs[:4].mean(0)).max() > 1e-3
    with torch.no_grad():
        of_mean_image = model.predict({"image": torch.stack(views).mean(0)}).numpy()
    assert np.abs(result.layers["tta"] - of_mean_image).max() > 1e-2
    np.testing.assert_allclose(result.X, data.expression(data.all_spots(["S0"])))


def test_without_tta_there_is_no_tta_layer(tmp_path, dataset_dir):
    info = predict(write_checkpoint(tmp_path / "best.pt"), dataset_dir, tmp_path / "p.h5ad")
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(result.layers) == ["pred"] and dict(result.uns["labels"]) == {"pred": "tiny"}
    assert info["tta"] is False and info["ks"] == [] and info["kind"] == "regression"


# ---------------------------------------------------------------------------------------------- retrieval

RGB = ["R", "G", "B"]
# training spots' expression (3 genes); their patches are plain grey, which no query resembles
TRAIN = {"A": {"a": (1, 0, 0), "b": (0, 1, 0), "c": (0, 0, 1), "d": (1, 1, 0)},
         "B": {"e": (3, 0.5, 0), "f": (0, 0.2, 2), "g": (1, 1, 1)}}
# test spots: the patch colour points the same way as the spot's own expression, so a test spot in the
# reference set would be its own nearest neighbour (cosine 1) and k = 1 would return the truth
TEST = {"t0": ((200, 20, 20), (10, 1, 1)), "t1": ((20, 20, 200), (1, 1, 10))}


def write_rgb_dataset(root):
    """Fold 0: test sample T, training samples A and B, with the spots above (8 x 8 px patches)."""
    (root / "st").mkdir(parents=True)
    (root / "patches").mkdir()
    samples = {"T": {name: expr for name, (_, expr) in TEST.items()}, **TRAIN}
    for sample, spots in samples.items():
        names = list(spots)
        adata = ad.AnnData(X=np.array([spots[n] for n in names], np.float32), var=pd.DataFrame(index=RGB),
                           obs=pd.DataFrame(index=names))
        adata.obsm["spatial"] = np.array([[100.0 * i, 7.0] for i in range(len(names))])
        adata.write_h5ad(root / "st" / f"{sample}.h5ad")
        colours = [TEST[n][0] if sample == "T" else (128, 128, 128) for n in names]
        img = np.broadcast_to(np.array(colours, np.uint8)[:, None, None, :], (len(names), SIZE, SIZE, 3)).copy()
        write_patches(root / "patches" / f"{sample}.h5", img[::-1], names[::-1])  # stored in another order
    rows = [{"fold": 0, "sample": s, "role": "test" if s == "T" else "train", "patient": s} for s in samples]
    pd.DataFrame(rows).to_csv(root / "folds.tsv", sep="\t", index=False)
    pd.DataFrame({"gene": RGB}).to_csv(root / "genes.tsv", sep="\t", index=False)
    return root


def test_retrieval_averages_the_nearest_training_spots(tmp_path):
    root = write_rgb_dataset(tmp_path / "ds")
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="bleep", genes=RGB)
    info = predict(model_path, root, tmp_path / "p.h5ad", ks=[3, 1, 2, 2], expected_model="bleep")
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert info["ks"] == [1, 2, 3] and info["kind"] == "retrieval" and json.loads(result.uns["cmrcnet"])["ks"] == [1, 2, 3]
    assert dict(result.uns["labels"]) == {"k1": "tiny-k1", "k2": "tiny-k2", "k3": "tiny-k3"}
    assert list(result.obs_names) == ["T:t0", "T:t1"] and list(result.var_names) == RGB
    np.testing.assert_allclose(result.obs[["x", "y"]].to_numpy(), [[0, 7], [100, 7]])
    np.testing.assert_allclose(result.X, [TEST["t0"][1], TEST["t1"][1]])

    # cosine to t0 (10, 1, 1): e .993, a .990, d .770, g .686, f .108, b = c .099
    # cosine to t1 (1, 1, 10): f .995, c .990, g .686, d .140, e .114, a = b .099
    a, c, d, e, f, g = (np.array(v, float) for v in (*(TRAIN["A"][n] for n in "acd"), *(TRAIN["B"][n] for n in "efg")))
    expected = {1: [e, f], 2: [(e + a) / 2, (f + c) / 2], 3: [(e + a + d) / 3, (f + c + g) / 3]}
    for k, rows in expected.items():
        np.testing.assert_allclose(result.layers[f"k{k}"], rows, rtol=1e-6, err_msg=f"k = {k}")
    assert not np.allclose(result.layers["k1"], result.X)  # the test spots themselves were not found


def test_retrieval_k_is_bounded_by_the_training_spots(tmp_path):
    root = write_rgb_dataset(tmp_path / "ds")
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="bleep", genes=RGB)
    info = predict(model_path, root, tmp_path / "p.h5ad", ks=[7])  # every training spot, none of the test's
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "p.h5ad").layers["k7"],
                               np.tile(np.mean([*TRAIN["A"].values(), *TRAIN["B"].values()], 0), (2, 1)), rtol=1e-6)
    assert info["train_samples"] == ["A", "B"] and info["test_samples"] == ["T"]
    with pytest.raises(CMRCNetError, match=r"evaluation\.k \(8\): more neighbours than the 7 training spots of "
                                           r"fold 0$"):
        predict(model_path, root, tmp_path / "q.h5ad", ks=[2, 8])
    assert not (tmp_path / "q.h5ad").exists()
    with pytest.raises(CMRCNetError, match=r"evaluation\.k \(8\): more neighbours than the 7 training spots of "
                                           r"fold 0 \(A, B\); lower evaluation\.k"):
        check_k_fits(root, 0, [2, 8], "bleep")
    check_k_fits(root, 0, [7], "cmrcnet")
    check_k_fits(root, 0, [8], "stnet")  # regression models have no neighbours
    check_k_fits(root, 0, [], "bleep")


def test_weighted_retrieval_weights_each_neighbour_by_its_cosine(tmp_path):
    root = write_rgb_dataset(tmp_path / "ds")
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="bleep", genes=RGB)
    info = predict(model_path, root, tmp_path / "p.h5ad", ks=[2], weighted=True)
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert info["weighted"] is True and json.loads(result.uns["cmrcnet"])["weighted"] is True

    def cos(u, v):
        u, v = np.asarray(u, float), np.asarray(v, float)
        return u @ v / np.linalg.norm(u) / np.linalg.norm(v)

    a, c, e, f = (np.array(v, float) for v in (TRAIN["A"]["a"], TRAIN["A"]["c"], TRAIN["B"]["e"], TRAIN["B"]["f"]))
    q0, q1 = (np.array(TEST[t][0], float) / 255 for t in ("t0", "t1"))  # the query embedding is the mean colour
    expected = [(cos(q0, e) * e + cos(q0, a) * a) / (cos(q0, e) + cos(q0, a)),
                (cos(q1, f) * f + cos(q1, c) * c) / (cos(q1, f) + cos(q1, c))]
    np.testing.assert_allclose(result.layers["k2"], expected, rtol=1e-5)
    plain = [(e + a) / 2, (f + c) / 2]
    assert np.abs(result.layers["k2"] - np.array(plain)).max() > 1e-3  # weighting made a difference here


class RecordingRetriever(TinyRetriever):
    """TinyRetriever that records the batch shapes each tower is given."""

    seen: dict = {}

    def embed_image(self, images):
        RecordingRetriever.seen.setdefault("image", []).append(tuple(images.shape))
        return super().embed_image(images)

    def embed_expression(self, expression):
        RecordingRetriever.seen.setdefault("expr", []).append(tuple(expression.shape))
        return super().embed_expression(expression)


def test_batch_size_reaches_both_towers(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "bleep", RecordingRetriever)
    monkeypatch.setattr(RecordingRetriever, "seen", {})
    root = write_rgb_dataset(tmp_path / "ds")
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="bleep", genes=RGB)
    predict(model_path, root, tmp_path / "p.h5ad", ks=[1], batch_size=3)
    assert RecordingRetriever.seen == {"image": [(2, 3, SIZE, SIZE)], "expr": [(3, 3), (3, 3), (1, 3)]}
    RecordingRetriever.seen = {}
    predict(model_path, root, tmp_path / "q.h5ad", ks=[1], batch_size=1)
    assert RecordingRetriever.seen == {"image": [(1, 3, SIZE, SIZE)] * 2, "expr": [(1, 3)] * 7}


def test_the_k_too_large_message_names_the_largest_of_several(tmp_path):
    root = write_rgb_dataset(tmp_path / "ds")
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="bleep", genes=RGB)
    with pytest.raises(CMRCNetError, match=r"evaluation\.k \(9\): more neighbours than the 7 training spots"):
        predict(model_path, root, tmp_path / "p.h5ad", ks=[9, 2, 5])


# ---------------------------------------------------------------------------------------------- slide level


class TinySlideRegressor(nn.Module):
    """Stand-in for HisToGene: predicts a whole slide at once from each patch's pixels plus its grid position,
    and records the batch shapes it is given."""

    kind, slide_level = "regression", True
    seen: list = []

    def __init__(self, n_genes, input_size=SIZE):
        super().__init__()
        self.input_size = input_size
        self.pixels = nn.Linear(3 * input_size * input_size, n_genes)
        self.position = nn.Linear(2, n_genes)

    def predict(self, batch):
        TinySlideRegressor.seen.append((tuple(batch["image"].shape), tuple(batch["pos"].shape)))
        return self.pixels(batch["image"].flatten(2)) + self.position(batch["pos"].float())


def test_slide_level_model_predicts_each_test_slide_whole(tmp_path, dataset_dir, monkeypatch):
    monkeypatch.setitem(MODELS, "histogene", TinySlideRegressor)
    monkeypatch.setattr(TinySlideRegressor, "seen", [])
    model_path = write_checkpoint(tmp_path / "best.pt", model_name="histogene")
    info = predict(model_path, dataset_dir, tmp_path / "p.h5ad", tta=True)  # TTA is for spot-level models only
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(result.layers) == ["pred"] and dict(result.uns["labels"]) == {"pred": "tiny"}
    assert info["kind"] == "regression" and info["ks"] == []
    assert TinySlideRegressor.seen == [((1, 40, 3, SIZE, SIZE), (1, 40, 2))]  # S0, all 40 spots in one call

    # by hand: the test spots' patches (resized to SIZE) and grid positions, in the prediction file's order
    model = TinySlideRegressor(len(GENES))
    model.load_state_dict(torch.load(model_path, weights_only=True)["model"])
    data = load_fold(dataset_dir, 0)
    spots = data.spot_dataset(data.all_spots(["S0"]), SIZE)
    images = torch.stack([spots[i]["image"] for i in range(len(spots))])
    obs = ad.read_h5ad(dataset_dir / "st" / "S0.h5ad").obs.loc[[b.split(":", 1)[1] for b in result.obs_names]]
    pos = torch.tensor(obs[["array_row", "array_col"]].to_numpy())
    with torch.no_grad():
        expected = (model.pixels(images.flatten(1)) + model.position(pos.float())).numpy()
    np.testing.assert_allclose(result.layers["pred"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.X, data.expression(data.all_spots(["S0"])))


# ---------------------------------------------------------------------------------------------- the record


def test_prediction_file_records_where_it_came_from(tmp_path, dataset_dir, caplog):
    folds = pd.read_csv(dataset_dir / "folds.tsv", sep="\t")
    folds.loc[(folds["fold"] == 0) & (folds["sample"] == "S1"), "role"] = "test"  # fold 0 tests S0 and S1
    folds.to_csv(dataset_dir / "folds.tsv", sep="\t", index=False)
    model_path = write_checkpoint(tmp_path / "best.pt")
    with caplog.at_level("INFO", logger="cmrcnet"):
        info = predict(model_path, dataset_dir, tmp_path / "p.h5ad", tta=True, device=None, fingerprint="fp123")
    assert "tiny fold 0: 80 test spots of S0, S1 predicted (tiny, tiny-tta)" in caplog.messages
    expected = {"method": "tiny", "model_name": "stnet", "kind": "regression", "fold": 0, "test_samples": ["S0", "S1"],
                "train_samples": ["S2"], "ks": [], "weighted": False, "tta": True, "model_path": str(model_path),
                "best_epoch": 3, "device": "cpu", "fingerprint": "fp123", "model_fingerprint": None}
    assert {k: info[k] for k in expected} == expected
    stored = json.loads(ad.read_h5ad(tmp_path / "p.h5ad").uns["cmrcnet"])
    assert {k: stored[k] for k in expected} == expected
    assert "torch" in stored["provenance"]["versions"]


def test_checkpoint_without_a_fold_predicts_the_fold_asked_for(tmp_path, dataset_dir):
    path = write_checkpoint(tmp_path / "best.pt", drop=["fold"])
    assert predict(path, dataset_dir, tmp_path / "p.h5ad", fold=1)["test_samples"] == ["S1"]


def test_checkpoint_without_a_method_is_named_as_unknown_when_refused(tmp_path, dataset_dir):
    path = write_checkpoint(tmp_path / "best.pt", drop=["method"])
    with pytest.raises(CMRCNetError, match=r"best\.pt: a stnet model \(method \?\), but the method to predict is a "
                                           r"bleep model"):
        predict(path, dataset_dir, tmp_path / "p.h5ad", expected_model="bleep")


def test_prediction_file_is_float32_and_records_any_value_as_text(tmp_path, dataset_dir):
    from cmrcnet.inference.predict import write_prediction_file

    data = load_fold(dataset_dir, 0)
    test = data.all_spots(data.test_samples)
    truth = data.expression(test).astype(np.float64)
    info = {"method": "m", "fold": 0, "labels": {"pred": "m"}, "model_path": tmp_path / "best.pt",
            "best_epoch": np.int64(4)}
    write_prediction_file(tmp_path / "p.h5ad", data, test, truth, {"pred": truth + 1.0}, info)
    result = ad.read_h5ad(tmp_path / "p.h5ad")
    assert result.X.dtype == np.float32 and result.layers["pred"].dtype == np.float32
    stored = json.loads(result.uns["cmrcnet"])
    assert stored["model_path"] == str(tmp_path / "best.pt") and stored["best_epoch"] == "4"
    assert "versions" in stored["provenance"]
