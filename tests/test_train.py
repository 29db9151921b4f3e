"""Training loop: it learns, writes its outputs, stops early, and resumes to bit-identical weights on CPU."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_datasets import GENES, build_synthetic_processed, write_dataset
from torch import nn
from torch.nn import functional as F

import cmrcnet.train as train_module
from cmrcnet.errors import CMRCNetError
from cmrcnet.train import load_checkpoint, train_fold


class TinySpotModel(nn.Module):
    """Stand-in for the spot models: patch colour and texture (per-channel mean, std) -> small MLP.

    The dropout makes the RNG state matter, as it does for the real models.
    """

    kind, slide_level = "regression", False

    def __init__(self, n_genes, input_size=16, hidden=16):
        super().__init__()
        self.input_size = input_size
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))

    def set_output_bias(self, mean):
        self.bias.copy_(mean)

    def forward(self, batch):
        assert batch["image"].shape[1:] == (3, self.input_size, self.input_size)
        image = batch["image"]
        pred = self.net(torch.cat([image.mean((2, 3)), image.std((2, 3))], 1)) + self.bias
        mse = F.mse_loss(pred, batch["expr"])
        return {"loss": mse, "mse": mse, "l1": (pred - batch["expr"]).abs().mean(), "pred": pred}


class TinySlideModel(nn.Module):
    """Stand-in for HisToGene: whole slide in, grid position embeddings sized by n_pos."""

    kind, slide_level = "regression", True

    def __init__(self, n_genes, n_pos, input_size=16):
        super().__init__()
        self.input_size = input_size
        self.row, self.col = nn.Embedding(n_pos, 4), nn.Embedding(n_pos, 4)
        self.head = nn.Linear(3 + 8, n_genes)

    def forward(self, batch):
        image, pos = batch["image"], batch["pos"]
        assert image.ndim == 5 and image.shape[0] == 1 and pos.dtype == torch.int64
        feats = torch.cat([image.mean((-1, -2)), self.row(pos[..., 0]), self.col(pos[..., 1])], -1)
        mse = F.mse_loss(self.head(feats), batch["expr"])
        return {"loss": mse, "mse": mse}


@pytest.fixture
def built(monkeypatch):
    """Replace the model factory with the stand-ins and record what it was asked for."""
    calls = []

    def build(name, n_genes, params):
        calls.append((name, n_genes, dict(params)))
        model = TinySlideModel if name == "histogene" else TinySpotModel
        return model(n_genes, **params)

    monkeypatch.setattr(train_module, "build_model", build)
    return calls


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "ds")


def run(dataset_dir, out_dir, model="stnet", params=None, **train):
    # a constant rate unless a test asks for the schedule: these tests are about the loop, not the schedule
    cfg = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "num_workers": 0, "patience": None, "val_fraction": 0.2,
           "schedule": "constant"}
    cfg.update(train)
    stop = cfg.pop("stop_after_epochs", None)
    return train_fold(method="tiny", method_cfg={"model": model, "params": params or {}}, train_cfg=cfg,
                      dataset_dir=dataset_dir, fold=0, out_dir=out_dir, seed=0, progress=False,
                      stop_after_epochs=stop)


def test_training_learns_and_writes_its_outputs(dataset_dir, tmp_path, built):
    out = tmp_path / "out"
    summary = run(dataset_dir, out, epochs=15, lr=5e-3)
    assert summary["epochs_run"] == 15 and not summary["stopped_early"] and summary["complete"]
    assert summary["n_train_spots"] == 64 and summary["n_val_spots"] == 16 and summary["device"] == "cpu"
    assert summary["best_val_loss"] < 0.8 * summary["first_val_loss"]

    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "train_l1", "train_mse", "val_l1",
                                     "val_mse", "lr", "seconds"]
    assert list(history["epoch"]) == list(range(1, 16))
    assert history["val_loss"].iloc[-1] < 0.8 * history["val_loss"].iloc[0]
    assert (history["lr"] == 5e-3).all()
    assert summary["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])

    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["genes"] == GENES and best["model_name"] == "stnet"
    assert best["val_loss"] == pytest.approx(summary["best_val_loss"])
    assert best["train_cfg"]["lr"] == 5e-3 and "versions" in best["provenance"]
    model = TinySpotModel(len(GENES))
    model.load_state_dict(best["model"])
    # STNet-style models start from the training mean expression
    assert built[0] == ("stnet", 8, {})

    info = json.loads((out / "train.json").read_text())
    assert info["summary"]["best_epoch"] == summary["best_epoch"] and info["device"]["type"] == "cpu"
    assert info["config"]["train_cfg"]["epochs"] == 15 and "torch" in info["provenance"]["versions"]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["epoch"] == 15 and len(last["history"]) == 15


def test_output_bias_is_the_training_mean(dataset_dir, tmp_path, monkeypatch):
    seen = {}

    class Recorder(TinySpotModel):
        def set_output_bias(self, mean):
            seen["mean"] = mean.clone()
            super().set_output_bias(mean)

    monkeypatch.setattr(train_module, "build_model", lambda name, n, params: Recorder(n, **params))
    run(dataset_dir, tmp_path / "out", epochs=1, val_split="sample")
    from cmrcnet.data.datasets import load_fold

    fold = load_fold(dataset_dir, 0)
    torch.testing.assert_close(seen["mean"], torch.from_numpy(fold.sample("S1").expression.mean(0)))


def test_resumed_run_ends_with_the_same_weights(dataset_dir, tmp_path, built):
    whole = run(dataset_dir, tmp_path / "whole")
    part = run(dataset_dir, tmp_path / "resumed", stop_after_epochs=1)
    assert part["epochs_run"] == 1 and not part["complete"]
    assert not (tmp_path / "resumed" / "train.json").exists()
    # resume with workers: num_workers is not part of the fingerprint, and results do not depend on it
    resumed = run(dataset_dir, tmp_path / "resumed", num_workers=2)
    assert resumed["epochs_run"] == 3 and resumed["complete"]
    for name in ("best.pt", "checkpoints/last.pt"):
        a, b = load_checkpoint(tmp_path / "whole" / name), load_checkpoint(tmp_path / "resumed" / name)
        assert a["epoch"] == b["epoch"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
    ha = pd.read_csv(tmp_path / "whole" / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)
    assert resumed["best_val_loss"] == whole["best_val_loss"]
    # equality is not trivial: another seed gives other weights
    other = train_fold(method="tiny", method_cfg={"model": "stnet", "params": {}}, train_cfg={
        "epochs": 3, "batch_size": 16, "lr": 3e-3, "num_workers": 0, "patience": None, "val_fraction": 0.2},
        dataset_dir=dataset_dir, fold=0, out_dir=tmp_path / "other", seed=1, progress=False)
    assert other["best_val_loss"] != whole["best_val_loss"]
    # a finished run called again changes nothing
    again = run(dataset_dir, tmp_path / "whole")
    assert again["epochs_run"] == 3 and again["best_val_loss"] == whole["best_val_loss"]


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_start_afresh_instead_of_wedging(dataset_dir, tmp_path, built, caplog):
    """A checkpoint of other settings is moved aside (one line in the log) and training starts from scratch:
    the result is what a clean run with the new settings gives, bit for bit."""
    out = tmp_path / "out"
    run(dataset_dir, out, stop_after_epochs=2)
    with caplog.at_level("WARNING", logger="cmrcnet"):
        run(dataset_dir, out, lr=1e-2)
    assert "train.lr changed" in caplog.text and "training from scratch" in caplog.text
    assert (out / "checkpoints.previous" / "last.pt").is_file()
    run(dataset_dir, tmp_path / "clean", lr=1e-2)
    assert _same_weights(_weights(out / "best.pt"), _weights(tmp_path / "clean" / "best.pt"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="cmrcnet"):
        run(dataset_dir, out, batch_size=8, params={"hidden": 8}, stop_after_epochs=1)
    assert "params.hidden" in caplog.text and "train.batch_size" in caplog.text


def test_epochs_fewer_more_and_under_the_cosine(dataset_dir, tmp_path, built):
    out = tmp_path / "out"
    run(dataset_dir, out, stop_after_epochs=2)
    # more epochs than first planned under a constant rate: the run just continues from epoch 2
    assert run(dataset_dir, out, epochs=4)["epochs_run"] == 4
    assert not (out / "checkpoints.previous").exists()
    # fewer epochs than the checkpoint holds (a finished run asked again): a fresh run of that length
    assert run(dataset_dir, out, epochs=1)["epochs_run"] == 1
    assert load_checkpoint(out / "checkpoints.previous" / "last.pt")["epoch"] == 4
    # under the cosine schedule the number of epochs shapes every rate: a change starts afresh
    cosine = tmp_path / "cosine"
    run(dataset_dir, cosine, schedule="cosine", epochs=3, stop_after_epochs=1)
    run(dataset_dir, cosine, schedule="cosine", epochs=4)
    run(dataset_dir, tmp_path / "clean", schedule="cosine", epochs=4)
    assert _same_weights(_weights(cosine / "best.pt"), _weights(tmp_path / "clean" / "best.pt"))


def test_changed_data_starts_afresh(dataset_dir, tmp_path, built, caplog):
    """New patches for a training sample (a replaced slide) never resume the old weights."""
    out = tmp_path / "out"
    run(dataset_dir, out, stop_after_epochs=2)
    other = write_dataset(tmp_path / "other", seed=3)
    shutil.copyfile(other / "patches" / "S1.h5", dataset_dir / "patches" / "S1.h5")
    with caplog.at_level("WARNING", logger="cmrcnet"):
        run(dataset_dir, out)
    assert "data.patches/S1 changed" in caplog.text
    run(dataset_dir, tmp_path / "clean")
    assert _same_weights(_weights(out / "best.pt"), _weights(tmp_path / "clean" / "best.pt"))


def test_forced_rerun_of_a_finished_run_trains_from_scratch(dataset_dir, tmp_path, built):
    out = tmp_path / "out"
    first = run(dataset_dir, out)
    (out / "best.pt").unlink()  # what Snakemake does before a --forcerun
    again = run(dataset_dir, out)
    assert again["epochs_run"] == 3 and again["best_val_loss"] == first["best_val_loss"]
    assert (out / "checkpoints.previous" / "last.pt").is_file() and (out / "best.pt").is_file()


def test_cosine_schedule_resumes_bit_identical_and_logs_its_rates(dataset_dir, tmp_path, built):
    """The rate of each epoch follows the cosine (history's lr column), and a run killed after epoch 2 ends with
    the same weights and rates as an uninterrupted one (the scheduler state travels in last.pt)."""
    settings = {"schedule": "cosine", "epochs": 4, "lr": 4e-3, "min_lr": 1e-4}
    run(dataset_dir, tmp_path / "whole", **settings)
    run(dataset_dir, tmp_path / "split", stop_after_epochs=2, **settings)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["scheduler"]["last_epoch"] == 2
    run(dataset_dir, tmp_path / "split", **settings)
    whole, split = (pd.read_csv(tmp_path / d / "history.csv") for d in ("whole", "split"))
    expected = [1e-4 + (4e-3 - 1e-4) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert whole["lr"].tolist() == pytest.approx(expected, rel=1e-9)
    assert split["lr"].tolist() == pytest.approx(expected, rel=1e-9)
    a, b = (load_checkpoint(tmp_path / d / "best.pt")["model"] for d in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_checkpoint_names_the_file(dataset_dir, tmp_path, built):
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"half a checkpoint")
    with pytest.raises(CMRCNetError, match=r"last\.pt: cannot read checkpoint"):
        run(dataset_dir, tmp_path / "out")


def test_early_stopping_on_validation_loss(dataset_dir, tmp_path, built, caplog):
    summary = run(dataset_dir, tmp_path / "out", epochs=10, lr=0.0, patience=2)
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert len(pd.read_csv(tmp_path / "out" / "history.csv")) == 3
    # an early-stopped run is finished although it ran fewer epochs than set: asked again, it starts afresh
    with caplog.at_level("WARNING", logger="cmrcnet"):
        assert run(dataset_dir, tmp_path / "out", epochs=10, lr=0.0, patience=2) == {
            **summary, "seconds": pytest.approx(summary["seconds"], abs=5)}
    assert "because it holds a finished run (3 epochs); moved to" in caplog.text


@pytest.mark.parametrize("val_split", ["spot", "sample"])
def test_slide_level_model_gets_n_pos_and_whole_slides(dataset_dir, tmp_path, built, val_split):
    summary = run(dataset_dir, tmp_path / "out", model="histogene", epochs=2, val_split=val_split)
    assert built[0][0] == "histogene" and built[0][2]["n_pos"] == 8
    assert summary["n_train_spots"] + summary["n_val_spots"] == 80
    best = load_checkpoint(tmp_path / "out" / "best.pt")
    assert best["params"]["n_pos"] == 8 and best["slide_level"] is True  # prediction feeds it whole slides
    with pytest.raises(CMRCNetError, match=r"params\.n_pos: 3 is below the data's 8"):
        run(dataset_dir, tmp_path / "other", model="histogene", params={"n_pos": 3})


def test_bad_settings_name_the_key(dataset_dir, tmp_path, built):
    with pytest.raises(CMRCNetError, match=r"train\.epoch: unknown training setting"):
        run(dataset_dir, tmp_path / "out", epoch=3)
    with pytest.raises(CMRCNetError, match=r"methods\.tiny\.model: unknown model 'unet'"):
        run(dataset_dir, tmp_path / "out", model="unet")
    with pytest.raises(CMRCNetError, match=r"optimizer"):
        run(dataset_dir, tmp_path / "out", optimizer="Lion")
    with pytest.raises(CMRCNetError, match=r"train\.shuffle_pairs: .*spot-level models only"):
        run(dataset_dir, tmp_path / "slide", model="histogene", shuffle_pairs=True)
    with pytest.raises(CMRCNetError, match=r"shuffle_pairs: invalid value 'yes'"):
        run(dataset_dir, tmp_path / "out", shuffle_pairs="yes")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """Three synthetic Visium samples taken through the real stages: genes, normalisation, patches, folds."""
    return build_synthetic_processed(tmp_path_factory.mktemp("synthetic"), patch_px=32, um_per_px=2.0)[1]


def test_learns_on_synthetic_slides(synthetic_dir, tmp_path, built):
    from cmrcnet.data.datasets import load_fold

    summary = train_fold(method="tiny", method_cfg={"model": "stnet", "params": {"input_size": 32}},
                         train_cfg={"epochs": 25, "batch_size": 16, "lr": 1e-2, "num_workers": 0, "patience": None},
                         dataset_dir=synthetic_dir, fold=0, out_dir=tmp_path / "out", progress=False)
    fold = load_fold(synthetic_dir, 0)
    train, val = fold.split("spot", 0.1, 0)
    mean_baseline = float(((fold.expression(val) - fold.expression(train).mean(0)) ** 2).mean())
    assert summary["best_val_loss"] < 0.85 * mean_baseline  # the image explains expression beyond its mean


REAL_PARAMS = {
    # tiny versions of the real models, small enough for a CPU test
    "cmrcnet": {"encoder": "vit_base_patch32_224", "input_size": 32, "snn_hidden": 32, "embed_dim": 32,
                "n_gene_tokens": 2, "cross_heads": 2, "fusion_heads": 2, "n_fusion_blocks": 1,
                "encoder_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "bleep": {"encoder": "test_resnet", "input_size": 32, "embed_dim": 32},
    "stnet": {"encoder": "test_resnet", "input_size": 32},
    "histogene": {"patch_px": 16, "dim": 32, "depth": 1, "heads": 2},
}


@pytest.mark.parametrize("name", ["cmrcnet", "bleep", "stnet", "histogene"])
def test_real_models_train_and_resume_exactly(dataset_dir, tmp_path, name):

    def real(out, **extra):
        return train_fold(method=name, method_cfg={"model": name, "params": REAL_PARAMS[name]},
                          train_cfg={"epochs": 2, "batch_size": 8, "num_workers": 0, "max_steps_per_epoch": 3},
                          dataset_dir=dataset_dir, fold=0, out_dir=out, progress=False, **extra)

    whole = real(tmp_path / "whole")
    assert whole["complete"] and math.isfinite(whole["best_val_loss"])
    real(tmp_path / "resumed", stop_after_epochs=1)
    real(tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = pd.read_csv(tmp_path / "whole" / "history.csv")
    assert len(history) == 2 and history[["train_loss", "val_loss"]].notna().all().all()


@pytest.mark.parametrize("name", ["cmrcnet", "bleep", "stnet", "histogene"])
def test_real_models_learn_on_synthetic_slides(synthetic_dir, tmp_path, name):
    from cmrcnet.data.datasets import load_fold

    summary = train_fold(method=name, method_cfg={"model": name, "params": REAL_PARAMS[name]},
                         train_cfg={"epochs": 15, "batch_size": 16, "lr": 1e-3, "num_workers": 0, "patience": None,
                                    "schedule": "constant"},
                         dataset_dir=synthetic_dir, fold=0, out_dir=tmp_path / "out", progress=False)
    if name in ("stnet", "histogene"):  # MSE models start at the mean: beat the mean, not the first epoch
        fold = load_fold(synthetic_dir, 0)
        train, val = fold.split("spot", 0.1, 0)
        mean_baseline = float(((fold.expression(val) - fold.expression(train).mean(0)) ** 2).mean())
        assert summary["best_val_loss"] < 0.9 * mean_baseline, (summary["best_val_loss"], mean_baseline)
    else:
        assert summary["best_val_loss"] < 0.85 * summary["first_val_loss"]


def test_prediction_records_its_tables_and_refuses_a_model_of_older_tables(dataset_dir, tmp_path):
    """A model is only ever applied to the gene and fold tables it was trained with; its predictions carry
    their tables' identity, so scoring can check it (tests/test_reruns.py)."""
    import json

    import anndata as ad

    from cmrcnet.inference.predict import predict_fold
    from cmrcnet.train import file_identity

    run(dataset_dir, tmp_path / "out", epochs=1)
    model = tmp_path / "out" / "best.pt"
    predict_fold(model_path=model, dataset_dir=dataset_dir, fold=0, out_path=tmp_path / "p.h5ad", method="tiny",
                 device="cpu")
    info = json.loads(ad.read_h5ad(tmp_path / "p.h5ad").uns["cmrcnet"])
    assert info["inputs"] == {"genes.tsv": file_identity(dataset_dir / "genes.tsv"),
                              "folds.tsv": file_identity(dataset_dir / "folds.tsv")}
    folds = dataset_dir / "folds.tsv"
    folds.write_text(folds.read_text() + "\n")
    with pytest.raises(CMRCNetError, match=r"best\.pt: trained on another folds\.tsv"):
        predict_fold(model_path=model, dataset_dir=dataset_dir, fold=0, out_path=tmp_path / "q.h5ad",
                     method="tiny", device="cpu")
    assert not (tmp_path / "q.h5ad").exists()


# Validation losses of epochs 1-10, scripted. Patience 3 by hand: best 4.0 at epoch 2; epochs 3, 4 worse (2 of 3);
# epoch 5 improves (3.5, counter back to 0); epochs 6, 7, 8 worse (1, 2, 3 of 3): early stop after epoch 8, best
# epoch 5. A counter reset to 0 on resume after epoch 6 or 7 would instead reach epoch 9 (3.0), improve, and run
# all 10 epochs.
SCRIPTED_VAL_LOSS = [5.0, 4.0, 4.5, 4.2, 3.5, 3.6, 3.7, 3.8, 3.0, 2.0]


@pytest.fixture
def scripted_val_loss(monkeypatch):
    """The validation pass reports SCRIPTED_VAL_LOSS[epoch - 1] as its loss; training is untouched."""
    real = train_module._run_epoch

    def scripted(model, loader, optimizer, device, cfg, channels_last, desc, progress):
        stats = real(model, loader, optimizer, device, cfg, channels_last, desc, progress)
        if optimizer is None:
            epoch = int(re.search(r" epoch (\d+)/", desc).group(1))
            stats["loss"] = SCRIPTED_VAL_LOSS[epoch - 1]
        return stats

    monkeypatch.setattr(train_module, "_run_epoch", scripted)


@pytest.mark.parametrize("killed_after, bad_epochs", [(6, 1), (7, 2)])  # 1 and 2 of 3
def test_resuming_mid_patience_stops_where_an_uninterrupted_run_does(dataset_dir, tmp_path, built,
                                                                    scripted_val_loss, killed_after, bad_epochs):
    settings = {"epochs": 10, "patience": 3}
    whole = run(dataset_dir, tmp_path / "whole", **settings)
    assert whole["stopped_early"] and whole["epochs_run"] == 8
    assert whole["best_epoch"] == 5 and whole["best_val_loss"] == 3.5

    part = run(dataset_dir, tmp_path / "split", stop_after_epochs=killed_after, **settings)
    assert part["epochs_run"] == killed_after and not part["complete"] and not part["stopped_early"]
    last = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert last["bad_epochs"] == bad_epochs  # the counter travels in last.pt
    resumed = run(dataset_dir, tmp_path / "split", **settings)
    assert resumed["stopped_early"] and resumed["complete"]
    assert resumed["epochs_run"] == 8 and resumed["best_epoch"] == 5 and resumed["best_val_loss"] == 3.5
    history = pd.read_csv(tmp_path / "split" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 9))
    assert history["val_loss"].tolist() == SCRIPTED_VAL_LOSS[:8]
    assert load_checkpoint(tmp_path / "split" / "best.pt")["epoch"] == 5
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["bad_epochs"] == 3


class TinyRetrievalModel(TinySpotModel):
    """Stand-in for CMRCNet/BLEEP: a gene tower besides the image head, so best.pt must carry a bank."""

    kind = "retrieval"

    def __init__(self, n_genes, input_size=16, hidden=16):
        super().__init__(n_genes, input_size, hidden)
        self.gene = nn.Linear(n_genes, 5)

    def embed_expression(self, expr):
        return self.gene(expr)

    def forward(self, batch):
        out = super().forward(batch)
        out["loss"] = out["loss"] + self.gene(batch["expr"]).pow(2).mean()  # the gene tower trains too
        return out


@pytest.mark.parametrize("model", ["bleep", "stnet"])
def test_deployable_model_trains_on_every_sample_and_carries_its_bank(dataset_dir, tmp_path, monkeypatch, model):
    """Fold `all`: every sample trains, none is tested; best.pt records the patch resolution and the technology,
    and a retrieval model's bank holds the gene-tower embedding and expression of every training spot in order."""
    from cmrcnet.data.datasets import load_fold

    monkeypatch.setattr(train_module, "build_model", lambda name, n, params: (
        TinyRetrievalModel if name == "bleep" else TinySpotModel)(n, **params))
    out = tmp_path / "all"
    cfg = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "num_workers": 0, "patience": None, "val_fraction": 0.2,
           "schedule": "constant"}
    train_fold(method="m", method_cfg={"model": model, "params": {}}, train_cfg=cfg, dataset_dir=dataset_dir,
               fold="all", out_dir=out, seed=0, progress=False, technology="visium")
    info = json.loads((out / "train.json").read_text())
    assert info["train_samples"] == ["S0", "S1", "S2"] and info["test_samples"] == []
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["fold"] == "all" and ckpt["technology"] == "visium"
    assert ckpt["patches"] == {"um_per_px": 0.5, "size_px": 32, "fill": 255}  # as write_patches records them
    if model == "stnet":
        assert "bank" not in ckpt
        return
    data = load_fold(dataset_dir, "all")
    bank = ckpt["bank"]
    expected_barcodes = [str(b) for s in ["S0", "S1", "S2"] for b in data.sample(s).barcodes]
    assert bank["barcodes"] == expected_barcodes
    assert bank["samples"] == [s for s in ["S0", "S1", "S2"] for _ in data.sample(s).barcodes]
    expression = torch.from_numpy(data.expression(data.all_spots(["S0", "S1", "S2"])))
    assert torch.equal(bank["expression"], expression)
    tower = TinyRetrievalModel(len(data.genes))
    tower.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert torch.allclose(bank["embeddings"], tower.embed_expression(expression), atol=1e-6)


@pytest.mark.parametrize("fold", ["al", "1.5", None, True])
def test_a_fold_is_a_number_or_all(dataset_dir, fold):
    from cmrcnet.data.datasets import load_fold

    with pytest.raises(CMRCNetError, match="fold: a fold number or 'all'"):
        load_fold(dataset_dir, fold)


# ---------------------------------------------------------------------------------------------- mutation survivors


def test_build_model_passes_the_methods_params():
    bleep = train_module.build_model("bleep", len(GENES), REAL_PARAMS["bleep"])
    assert bleep.input_size == 32 and bleep.image_head.projection.out_features == 32
    assert bleep.expression_head.projection.in_features == len(GENES)


def test_fingerprint_diff_names_nested_keys_and_keys_only_one_side_has():
    old = {"train": {"lr": 1e-4, "batch_size": 64}, "params": {}, "seed": 0, "x": None}
    new = {"train": {"lr": 1e-3, "batch_size": 64}, "params": {"hidden": 8}, "seed": 0, "y": None}
    assert train_module.fingerprint_diff(old, new) == ["params", "params.hidden", "train.lr", "x", "y"]
    assert train_module.fingerprint_diff(new, old) == ["params", "params.hidden", "train.lr", "x", "y"]
    assert train_module.fingerprint_diff(old, old) == []


def test_short_keys_lists_six_then_counts_the_rest():
    keys = [f"k{i}" for i in range(8)]
    assert train_module._short_keys(keys[:6]) == keys[:6]
    assert train_module._short_keys(keys[:7]) == [*keys[:6], "1 more"]
    assert train_module._short_keys(keys) == [*keys[:6], "2 more"]


def test_moving_a_checkpoint_aside_logs_why_and_where(dataset_dir, tmp_path, built, caplog):
    out = tmp_path / "out"
    run(dataset_dir, out, stop_after_epochs=1)
    with caplog.at_level("WARNING", logger="cmrcnet"):
        run(dataset_dir, out, lr=1e-2, stop_after_epochs=1)
    last = out / "checkpoints" / "last.pt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"tiny fold 0: not resuming {last} because train.lr changed; moved to "
                        f"{out / 'checkpoints.previous'}, training from scratch"]


def test_cpu_training_never_autocasts_even_with_amp(dataset_dir, tmp_path, monkeypatch):
    """`amp` is bfloat16 autocast on a GPU only: on the CPU it would change the numbers the tests pin."""
    seen = []

    class Recording(TinySpotModel):
        def forward(self, batch):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(batch)

    monkeypatch.setattr(train_module, "build_model", lambda name, n_genes, params: Recording(n_genes))
    run(dataset_dir, tmp_path / "out", epochs=1, amp=True)
    assert seen and not any(seen)


def test_a_methods_own_train_settings_override_the_shared_ones():
    cfg = train_module.resolve_train_cfg({"lr": 1e-3, "batch_size": 32}, {"train": {"lr": 5e-4, "epochs": 2}}, "m")
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["patience"]) == (5e-4, 32, 2, 10)
    with pytest.raises(CMRCNetError) as err:
        train_module.resolve_train_cfg({}, {"train": {"lr_max": 1}}, "m")
    assert str(err.value) == ("methods.m.train.lr_max: unknown training setting; known: "
                              + ", ".join(train_module.DEFAULT_TRAIN))
    assert ", batch_size, lr, " in str(err.value)


def test_no_settings_give_the_defaults_untouched():
    cfg = train_module.resolve_train_cfg(None, {}, "m")
    assert cfg == train_module.DEFAULT_TRAIN and cfg is not train_module.DEFAULT_TRAIN
    cfg["lr"] = 9.0
    assert train_module.DEFAULT_TRAIN["lr"] == 1e-4
    assert train_module.resolve_train_cfg({}, {"train": None}, "m") == train_module.DEFAULT_TRAIN


# Each setting's boundary: the smallest accepted value, then refused values (wrong type, one below, YAML's true).
ACCEPTED = [("epochs", 1), ("batch_size", 1), ("lr", 0), ("lr", 0.0), ("optimizer", "Adam"), ("optimizer", "AdamW"),
            ("patience", None), ("patience", 1), ("num_workers", 0), ("max_steps_per_epoch", None),
            ("max_steps_per_epoch", 1), ("grad_clip", None), ("grad_clip", 1e-9), ("shuffle_pairs", True),
            ("shuffle_pairs", False), ("schedule", "constant"), ("schedule", "cosine"), ("min_lr", 0),
            ("min_lr", 0.0), ("warmup_epochs", 0), ("warmup_epochs", 59)]
REFUSED = [("epochs", 0), ("epochs", 2.0), ("epochs", True), ("batch_size", 0), ("batch_size", 8.0), ("lr", -1e-9),
           ("lr", "1e-4"), ("lr", True), ("optimizer", "adamw"), ("optimizer", "SGD"), ("patience", 0),
           ("patience", 1.5), ("num_workers", -1), ("num_workers", 1.0), ("max_steps_per_epoch", 0),
           ("max_steps_per_epoch", "2"), ("grad_clip", 0), ("grad_clip", -1.0), ("grad_clip", "1"),
           ("shuffle_pairs", 1), ("shuffle_pairs", "yes"), ("schedule", "linear"), ("min_lr", -1e-9),
           ("min_lr", "0"), ("warmup_epochs", -1), ("warmup_epochs", 60), ("warmup_epochs", 1.0)]


@pytest.mark.parametrize("key, value", ACCEPTED)
def test_the_smallest_valid_settings_are_accepted(key, value):
    cfg = train_module.resolve_train_cfg({key: value}, {}, "m")
    assert cfg[key] == value and type(cfg[key]) is type(value)


@pytest.mark.parametrize("key, value", REFUSED)
def test_invalid_settings_name_the_line_that_set_them(key, value):
    for shared, own, where in (({key: value}, {}, "train"), ({}, {"train": {key: value}}, "methods.m.train")):
        with pytest.raises(CMRCNetError) as err:
            train_module.resolve_train_cfg(shared, own, "m")
        assert str(err.value) == f"{where}.{key}: invalid value {value!r}"


def test_a_warm_up_as_long_as_the_run_is_refused_where_the_warm_up_is_set():
    assert train_module.resolve_train_cfg({"epochs": 3}, {"train": {"warmup_epochs": 2}}, "m")["warmup_epochs"] == 2
    with pytest.raises(CMRCNetError) as err:
        train_module.resolve_train_cfg({"warmup_epochs": 3}, {"train": {"epochs": 3}}, "m")
    assert str(err.value) == "train.warmup_epochs: invalid value 3"
    with pytest.raises(CMRCNetError) as err:  # the first invalid setting in the table's order is the one named
        train_module.resolve_train_cfg({"epochs": 0, "lr": -1}, {}, "m")
    assert str(err.value) == "train.epochs: invalid value 0"


def test_the_fingerprint_holds_what_decides_the_weights_as_plain_sorted_json():
    cfg = {**train_module.DEFAULT_TRAIN, "schedule": "cosine", "num_workers": 7}
    fp = train_module.fingerprint("bleep", {"dim": 8, "weights": Path("w.pt")}, cfg, ("B", "A"), 2, 3.0,
                                  {"genes.tsv": "sha256:ab"})
    train = {k: v for k, v in cfg.items() if k != "num_workers"}  # epochs shape a cosine run, so they stay
    assert fp == {"model": "bleep", "params": {"dim": 8, "weights": "w.pt"}, "train": train, "genes": ["B", "A"],
                  "fold": 2, "seed": 3, "data": {"genes.tsv": "sha256:ab"}}
    assert list(fp) == sorted(fp) and list(fp["train"]) == sorted(train)  # the same bytes for any config order
    assert train_module.fingerprint("bleep", {}, cfg, ["A"], "all", 0)["fold"] == "all"


def test_the_fingerprint_hash_is_of_the_sorted_json():
    expected = hashlib.sha256(b'{"a": 1, "b": [2, 3]}').hexdigest()[:16]
    assert train_module.fingerprint_hash({"b": [2, 3], "a": 1}) == expected
    assert train_module.fingerprint_hash({"a": 1, "b": [2, 3]}) == expected and len(expected) == 16
    assert train_module.fingerprint_hash({"a": 2, "b": [2, 3]}) != expected


def test_seeding_fixes_python_numpy_and_torch_from_the_seed_and_the_epoch():
    import random

    import numpy as np

    def draws(*seeds):
        train_module._seed_everything(*seeds)
        return random.random(), float(np.random.random()), float(torch.rand(1))

    value = int(np.random.SeedSequence([7, 3]).generate_state(1)[0])
    expected = (random.Random(value).random(), float(np.random.RandomState(value).random_sample()),
                float(torch.rand(1, generator=torch.Generator().manual_seed(value))))
    assert draws(7, 3) == expected
    assert draws(7, 3) == draws(7, 3) != draws(7, 4) and draws(7) != draws(8)
    assert draws(-1) == draws(2**64 - 1)  # seeds are taken modulo 2**64, so a negative seed is valid


def test_frozen_parameters_are_left_out_and_exempt_ones_get_no_weight_decay():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.head = nn.Linear(2, 1)
            self.scale = nn.Parameter(torch.ones(()))

    plain = Model()
    # torch lists a module's own parameters before its children's
    assert [id(p) for p in train_module._parameter_groups(plain)] == [id(plain.scale), id(plain.head.weight),
                                                                      id(plain.head.bias)]
    exempt = Model()
    exempt.no_weight_decay = lambda: ["scale"]
    groups = train_module._parameter_groups(exempt)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(exempt.head.weight), id(exempt.head.bias)],
                                                              [id(exempt.scale)]]
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0


def test_the_history_table_puts_epoch_and_losses_first_and_rate_and_time_last():
    history = [{"seconds": 1.5, "lr": 1e-4, "val_loss": 0.5, "z_part": 1, "epoch": 0, "train_loss": 0.7, "a_part": 2}]
    table = train_module._history_table(history)
    assert list(table.columns) == ["epoch", "train_loss", "val_loss", "a_part", "z_part", "lr", "seconds"]
    assert table.iloc[0].to_dict() == {"epoch": 0, "train_loss": 0.7, "val_loss": 0.5, "a_part": 2, "z_part": 1,
                                       "lr": 1e-4, "seconds": 1.5}
    assert train_module._n_spots({"s1": [0, 1, 2], "s2": [], "s3": [5]}) == 4


def _loader_setup(dataset_dir, model, **cfg):
    from cmrcnet.data.datasets import load_fold

    data = load_fold(dataset_dir, 0)
    train_part, val_part = data.split("spot", 0.2, 0)
    cfg = {**train_module.DEFAULT_TRAIN, "num_workers": 0, **cfg}
    loaders = train_module._make_loaders(data, train_part, val_part, model, cfg, 5, torch.device("cpu"))
    return data, train_part, val_part, loaders


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # built, never iterated
def test_spot_loaders_shuffle_and_augment_training_only_and_cap_the_steps(dataset_dir):
    model = TinySpotModel(len(GENES))
    data, train_part, val_part, (train, val, sampler) = _loader_setup(dataset_dir, model, batch_size=4,
                                                                       max_steps_per_epoch=2)
    n_train = train_module._n_spots(train_part)
    assert n_train > 8 and train.batch_size == val.batch_size == 4
    assert train.sampler is sampler and (sampler.n, sampler.seed, sampler.shuffle, sampler.limit) == (n_train, 5, True, 8)
    assert train.drop_last and not val.drop_last and len(train) == 2
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert len(val.dataset) == train_module._n_spots(val_part)
    assert (train.dataset.augment, val.dataset.augment, train.dataset.seed, train.dataset.input_size) == (True, False, 5, 16)
    assert train.num_workers == val.num_workers == 0 and not train.persistent_workers and not train.pin_memory
    _, _, _, (train, val, _) = _loader_setup(dataset_dir, model, num_workers=2)
    assert train.num_workers == val.num_workers == 2 and train.persistent_workers and val.persistent_workers
    _, _, _, (train, val, _) = _loader_setup(dataset_dir, model, num_workers=1)  # one worker is kept alive too
    assert train.num_workers == val.num_workers == 1 and train.persistent_workers and val.persistent_workers
    _, _, _, (train, val, _) = _loader_setup(dataset_dir, model, num_workers=n_train)  # never more than items
    assert (train.num_workers, val.num_workers) == (n_train, len(val.dataset)) and len(val.dataset) < n_train
    np.testing.assert_array_equal(train.dataset.expression, data.expression(train_part))  # pairs kept


def test_uncapped_loader_takes_every_spot_and_keeps_a_short_last_batch_only_when_alone(dataset_dir):
    model = TinySpotModel(len(GENES))
    _, train_part, _, (train, _, sampler) = _loader_setup(dataset_dir, model, batch_size=4)
    assert sampler.limit is None and len(sampler) == train_module._n_spots(train_part) and train.drop_last
    _, train_part, _, (train, _, sampler) = _loader_setup(dataset_dir, model, batch_size=1000)
    assert len(sampler) < 1000 and not train.drop_last and len(train) == 1  # one short batch is all there is


def test_the_shuffled_pairing_control_permutes_training_expression_by_the_seed(dataset_dir):
    model = TinySpotModel(len(GENES))
    data, train_part, val_part, (train, val, _) = _loader_setup(dataset_dir, model, shuffle_pairs=True)
    plain = data.expression(train_part)
    order = np.random.default_rng(5).permutation(len(plain))
    np.testing.assert_array_equal(train.dataset.expression, plain[order])
    assert not np.array_equal(train.dataset.expression, plain)
    np.testing.assert_array_equal(val.dataset.expression, data.expression(val_part))


def test_slide_loaders_take_one_slide_per_batch_and_no_more_workers_than_slides(dataset_dir):
    model = TinySlideModel(len(GENES), n_pos=8)
    _, train_part, val_part, (train, val, sampler) = _loader_setup(dataset_dir, model, batch_size=16, num_workers=50)
    assert train.batch_size == val.batch_size == 1 and sampler.n == len(train.dataset) == len(train_part) >= 2
    assert train.drop_last and (train.dataset.augment, val.dataset.augment) == (True, False)
    assert train.dataset.seed == 5  # whole-slide turns and flips follow the run's seed
    assert (train.num_workers, val.num_workers) == (len(train_part), len(val_part)) and train.persistent_workers
    with pytest.raises(CMRCNetError) as err:
        _loader_setup(dataset_dir, model, shuffle_pairs=True)
    assert str(err.value) == "train.shuffle_pairs: the shuffled-pairing control supports spot-level models only"


class Probe(nn.Module):
    """loss = w * mean(expr): hand-checkable gradients; records what each call saw."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.seen = []

    def forward(self, batch):
        self.seen.append({"keys": sorted(batch), "training": self.training, "grad": torch.is_grad_enabled(),
                          "channels_last": batch["image"].is_contiguous(memory_format=torch.channels_last)
                          and not batch["image"].is_contiguous()})
        mean = batch["expr"].mean()
        return {"loss": self.w * mean, "part": batch["expr"].sum(), "pred": batch["expr"] * self.w}


def _batches(*sizes, genes=2, slide=False):
    out = []
    for i, n in enumerate(sizes):
        expr = torch.full((n, genes), float(i + 1))
        image = torch.ones(n, 3, 4, 4)
        out.append({"image": image[None] if slide else image, "expr": expr[None] if slide else expr,
                    "index": torch.arange(n)})
    return out


def _epoch(model, loader, optimizer=None, channels_last=False, **cfg):
    cfg = {"amp": False, "grad_clip": None, **cfg}
    return train_module._run_epoch(model, loader, optimizer, torch.device("cpu"), cfg, channels_last, "val", False)


def test_an_epochs_losses_are_means_weighted_by_spots():
    model = Probe()
    means = _epoch(model, _batches(3, 1))  # batch means 1 and 2, sums 6 and 4
    assert means == {"loss": pytest.approx(2.0 * (1 * 3 + 2 * 1) / 4), "part": pytest.approx((6 * 3 + 4 * 1) / 4)}
    slide = _epoch(Probe(), _batches(5, 1, slide=True))  # a slide's spots are its second axis
    assert slide["loss"] == pytest.approx(2.0 * (1 * 5 + 2 * 1) / 6)
    assert all(s["keys"] == ["expr", "image"] and not s["training"] and not s["grad"] for s in model.seen)


def test_training_steps_once_per_batch_from_fresh_gradients():
    model = Probe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _epoch(model, _batches(2, 2), optimizer)  # d loss / d w = mean(expr): 1, then 2 (not 1 + 2)
    assert model.w.item() == pytest.approx(2.0 - 0.5 * 1 - 0.5 * 2)
    assert all(s["training"] and s["grad"] for s in model.seen)


def test_a_parameter_a_batch_does_not_use_is_left_alone_by_that_step():
    """Gradients are reset to None, not zero, so AdamW neither decays nor moves (by momentum) a parameter that a
    batch did not touch, as in a branch used only for some batches."""

    class Sometimes(Probe):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.tensor(1.0))

        def forward(self, batch):
            out = super().forward(batch)
            if len(self.seen) == 1:  # the first batch only
                out["loss"] = out["loss"] + self.u * 3
            return out

    model = Sometimes()
    _epoch(model, _batches(2, 2), torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5))
    assert model.u.item() == pytest.approx(1.0 * (1 - 0.1 * 0.5) - 0.1)  # one step: decay, then Adam's unit step


def test_gradients_are_clipped_to_the_set_norm():
    model = Probe()
    _epoch(model, _batches(2, 2)[1:], torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0.25)  # gradient 2
    assert model.w.item() == pytest.approx(2.0 - 0.25)
    model = Probe()
    _epoch(model, _batches(2, 2)[1:], torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=5.0)  # under the norm
    assert model.w.item() == pytest.approx(0.0)


def test_channels_last_applies_to_patch_batches_only():
    model = Probe()
    _epoch(model, _batches(2), channels_last=True)
    _epoch(model, _batches(2), channels_last=False)
    _epoch(model, _batches(2, slide=True), channels_last=True)  # a 5-D slide stays as it is
    assert [s["channels_last"] for s in model.seen] == [True, False, False]


def test_an_epoch_without_batches_says_so():
    with pytest.raises(RuntimeError) as err:
        _epoch(Probe(), [])
    assert str(err.value) == "val: no batches (too few spots for the batch size?)"


class _RecordingBar:
    """Stands in for tqdm: records how the bar was made and what it was told."""

    made: list = []

    def __init__(self, iterable, **kwargs):
        self.iterable, self.kwargs, self.postfix, self.closed = iterable, kwargs, [], False
        type(self).made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("tty, interval", [(True, 0.1), (False, 30)])
def test_the_progress_bar_names_the_epoch_shows_the_running_loss_and_goes_away(monkeypatch, tty, interval):
    """A live bar on a terminal, a line every 30 s in a log file; the running loss every 10 batches."""
    import tqdm

    monkeypatch.setattr(_RecordingBar, "made", [])
    monkeypatch.setattr(tqdm, "tqdm", _RecordingBar)
    monkeypatch.setattr(train_module.sys.stderr, "isatty", lambda: tty, raising=False)
    batches = _batches(*[1] * 21)  # batch i has mean i + 1
    train_module._run_epoch(Probe(), batches, None, torch.device("cpu"), {"amp": False, "grad_clip": None},
                            False, "m fold 0 epoch 2/5", True)
    train_module._run_epoch(Probe(), batches, None, torch.device("cpu"), {"amp": False, "grad_clip": None},
                            False, "quiet", False)
    shown, quiet = _RecordingBar.made
    assert shown.kwargs == {"desc": "m fold 0 epoch 2/5", "leave": False, "disable": False, "unit": "batch",
                            "mininterval": interval}
    # running means of loss = 2 * (i + 1) after batches 1, 11 and 21
    assert shown.postfix == [{"loss": "2.0000"}, {"loss": f"{2 * 6:.4f}"}, {"loss": f"{2 * 11:.4f}"}]
    assert shown.closed and quiet.closed and quiet.kwargs["disable"] is True and quiet.postfix == []


def test_a_finished_run_records_its_config_summary_and_model_exactly(dataset_dir, tmp_path, built):
    from cmrcnet.data.datasets import load_fold

    out = tmp_path / "out"
    method_cfg = {"model": "stnet", "params": {"hidden": 8}}
    train_cfg = {"epochs": 3, "batch_size": 16, "lr": 2e-3, "num_workers": 0, "patience": None, "schedule": "cosine",
                 "min_lr": 1e-4, "weight_decay": 0.0}
    tic = time.perf_counter()
    summary = train_fold(method="tiny", method_cfg=method_cfg, train_cfg=train_cfg, dataset_dir=dataset_dir, fold=0,
                         out_dir=out, seed=4, progress=False, technology="visium")
    elapsed = time.perf_counter() - tic
    data = load_fold(dataset_dir, 0)
    train_part, val_part = data.split("spot", 0.1, 4)
    history = pd.read_csv(out / "history.csv")
    best_row = history.loc[history["val_loss"].idxmin()]
    cfg = train_module.resolve_train_cfg(train_cfg, method_cfg, "tiny")
    assert summary == {"epochs_run": 3, "best_epoch": int(best_row["epoch"]),
                       "best_val_loss": pytest.approx(best_row["val_loss"]),
                       "first_val_loss": pytest.approx(history["val_loss"][0]), "stopped_early": False,
                       "seconds": pytest.approx(history["seconds"].sum(), abs=2e-3), "device": "cpu",
                       "n_train_spots": train_module._n_spots(train_part), "n_val_spots": train_module._n_spots(val_part),
                       "complete": True}
    assert history["lr"].tolist() == pytest.approx([2e-3 * train_module.lr_factor(e, cfg) for e in range(3)])
    info = json.loads((out / "train.json").read_text())
    assert info["config"] == {"method": "tiny", "method_cfg": method_cfg, "train_cfg": cfg, "params": {"hidden": 8},
                              "dataset_dir": str(dataset_dir), "fold": 0, "seed": 4}
    assert info["summary"] == summary
    assert info["train_samples"] == list(train_part) and info["test_samples"] == data.test_samples
    assert info["device"] == {"type": "cpu", "name": "cpu"}
    wall = info["wall_seconds_this_call"]  # this call's own time, in milliseconds, around its epochs
    assert info["summary"]["seconds"] <= wall <= elapsed + 1e-3 and wall == round(wall, 3)
    identity = train_module.data_identity(dataset_dir, data)
    fp = train_module.fingerprint("stnet", {"hidden": 8}, cfg, data.genes, 0, 4, identity)
    assert info["fingerprint_hash"] == train_module.fingerprint_hash(fp)

    best = load_checkpoint(out / "best.pt")
    assert {k: best[k] for k in ("method", "model_name", "params", "train_cfg", "genes", "fold", "seed", "kind",
                                 "slide_level", "input_size", "fingerprint", "technology", "epoch")} == {
        "method": "tiny", "model_name": "stnet", "params": {"hidden": 8}, "train_cfg": cfg, "genes": data.genes,
        "fold": 0, "seed": 4, "kind": "regression", "slide_level": False, "input_size": 16, "fingerprint": fp,
        "technology": "visium", "epoch": summary["best_epoch"]}
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (last["epoch"], last["best_epoch"], last["bad_epochs"], last["stopped_early"]) == (
        3, summary["best_epoch"], 3 - summary["best_epoch"], False)
    assert best["provenance"]["config"] == cfg and set(info["provenance"]) == {"versions"}
    assert last["fingerprint"] == fp and last["fingerprint_hash"] == info["fingerprint_hash"]
    assert last["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    assert [r["epoch"] for r in last["history"]] == [1, 2, 3] and last["scheduler"]["last_epoch"] == 3


def test_data_identity_names_every_file_training_reads(dataset_dir):
    from cmrcnet.data.datasets import load_fold

    data = load_fold(dataset_dir, 0)
    identity = train_module.data_identity(dataset_dir, data)
    expected = {"genes.tsv": data.genes_tsv, "folds.tsv": dataset_dir / "folds.tsv"}
    for sample in data.train_samples:
        expected |= {f"st/{sample}": data.st_path(sample), f"patches/{sample}": data.patch_path(sample)}
    assert identity == {name: train_module.file_identity(path) for name, path in expected.items()}
    assert len(identity) == 2 + 2 * len(data.train_samples) >= 6  # test samples are not training inputs


def test_file_identity_hashes_small_files_and_stamps_large_ones(tmp_path, monkeypatch):
    small = tmp_path / "genes.tsv"
    small.write_bytes(b"gene\nA\n")
    assert train_module.file_identity(small) == "sha256:" + hashlib.sha256(b"gene\nA\n").hexdigest()[:16]
    monkeypatch.setattr(train_module, "SMALL_FILE", 7)  # the file's own size is still hashed
    assert train_module.file_identity(str(small)).startswith("sha256:")
    monkeypatch.setattr(train_module, "SMALL_FILE", 6)
    stat = small.stat()
    assert train_module.file_identity(small) == f"size:7,mtime_ns:{stat.st_mtime_ns}"
    with pytest.raises(CMRCNetError) as err:
        train_module.file_identity(tmp_path / "gone.h5")
    assert str(err.value) == f"{tmp_path / 'gone.h5'}: training input not found"
    with pytest.raises(CMRCNetError, match="training input not found"):
        train_module.file_identity(tmp_path)  # a folder is not a file


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"half a checkpoint")
    with pytest.raises(CMRCNetError) as err:
        load_checkpoint(bad)
    assert re.fullmatch(rf"{re.escape(str(bad))}: cannot read checkpoint \(\w+\); delete it to start over", str(err.value))
    assert err.value.__cause__ is None and err.value.__suppress_context__
    torch.save({"epoch": 2, "weights": torch.ones(2)}, tmp_path / "good.pt")
    good = load_checkpoint(str(tmp_path / "good.pt"))
    assert good["epoch"] == 2 and good["weights"].device.type == "cpu"


def test_a_deployable_model_refuses_patches_cut_at_different_settings(dataset_dir, tmp_path, built):
    import h5py

    with h5py.File(dataset_dir / "patches" / "S1.h5", "a") as h5:
        h5.attrs["um_per_px"] = 1.0
    cfg = {"epochs": 1, "batch_size": 16, "num_workers": 0, "patience": None, "schedule": "constant"}
    with pytest.raises(CMRCNetError) as err:
        train_fold(method="m", method_cfg={"model": "stnet"}, train_cfg=cfg, dataset_dir=dataset_dir, fold="all",
                   out_dir=tmp_path / "all", seed=0, progress=False)
    message = str(err.value)
    assert message.startswith(f"{dataset_dir / 'patches'}: patches cut at different settings: ")
    assert "'S1': {'um_per_px': 1.0" in message and "'S0': {'um_per_px': 0.5" in message
    assert not (tmp_path / "all" / "best.pt").exists() and not (tmp_path / "all" / "train.json").exists()


class _Pickled:
    """Not a tensor or plain type: only an unsafe, full unpickle can rebuild it."""


def test_checkpoints_load_weights_only_so_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"epoch": 1, "payload": _Pickled()}, path)
    with pytest.raises(CMRCNetError, match=r"foreign\.pt: cannot read checkpoint \(UnpicklingError\)"):
        load_checkpoint(path)


def test_the_log_says_what_trains_each_epochs_losses_the_resume_the_early_stop_and_the_end(dataset_dir, tmp_path,
                                                                                       built, caplog):
    """The INFO lines a user follows in a SLURM log, checked against the run's own history and split."""
    from cmrcnet.data.datasets import load_fold

    out = tmp_path / "out"
    settings = {"epochs": 10, "lr": 0.0, "patience": 2}
    with caplog.at_level("INFO", logger="cmrcnet"):
        run(dataset_dir, out, stop_after_epochs=2, **settings)
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        summary = run(dataset_dir, out, **settings)
        second = [r.getMessage() for r in caplog.records]
    train_part, val_part = load_fold(dataset_dir, 0).split("spot", 0.2, 0)
    start = (f"tiny fold 0: {train_module._n_spots(train_part)} training spots ({', '.join(train_part)}), "
             f"{train_module._n_spots(val_part)} validation spots, {len(GENES)} genes, device cpu")
    history = pd.read_csv(out / "history.csv")

    def epoch_line(i):
        row = history.iloc[i - 1]
        return (f"tiny fold 0 epoch {i}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}"
                f"{' *' if i == 1 else ''} ({row['seconds']:.1f} s)")

    assert first == [start, epoch_line(1), epoch_line(2)]
    assert second == [start, f"tiny fold 0: resuming from {out / 'checkpoints' / 'last.pt'} after epoch 2",
                      epoch_line(3), "tiny fold 0: early stop, no better validation loss for 2 epochs",
                      f"tiny fold 0: done, best epoch 1, val loss {summary['best_val_loss']:.4f}"]


def test_an_unknown_model_lists_the_known_ones(dataset_dir, tmp_path, built):
    with pytest.raises(CMRCNetError, match=re.escape(
            "methods.tiny.model: unknown model 'unet'; use one of cmrcnet, bleep, stnet, histogene, crossmodal")):
        run(dataset_dir, tmp_path / "out", model="unet")


def test_a_slide_models_grid_exactly_as_large_as_the_datas_is_accepted(dataset_dir, tmp_path, built):
    run(dataset_dir, tmp_path / "out", model="histogene", params={"n_pos": 8}, epochs=1)
    assert built[0][2] == {"n_pos": 8}


def test_the_optimizer_is_the_set_one_with_the_set_rate_and_weight_decay(dataset_dir, tmp_path, built):
    for name, out in (("Adam", tmp_path / "adam"), ("AdamW", tmp_path / "adamw")):
        run(dataset_dir, out, epochs=1, lr=2e-3, weight_decay=0.05, optimizer=name)
        groups = load_checkpoint(out / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
        assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in groups] == [(2e-3, 2e-3, 0.05)]
        # Adam folds the decay into the gradient (L2), AdamW decays the weights: the same start ends apart
    adam, adamw = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("adam", "adamw"))
    assert not torch.equal(adam["net.0.weight"], adamw["net.0.weight"])


class _FittedPartModel(TinySpotModel):
    """A model with a part fitted before training (as the cross-modal grid's scVI tower is)."""

    prepared: list = []

    def prepare(self, expression, seed, device):
        type(self).prepared.append((expression.copy(), seed, device))


def test_a_part_fitted_before_training_sees_the_training_spots_once(dataset_dir, tmp_path, monkeypatch):
    from cmrcnet.data.datasets import load_fold

    monkeypatch.setattr(_FittedPartModel, "prepared", [])
    monkeypatch.setattr(train_module, "build_model", lambda name, n_genes, params: _FittedPartModel(n_genes))
    run(dataset_dir, tmp_path / "out", stop_after_epochs=1)
    assert len(_FittedPartModel.prepared) == 1  # before the first epoch
    run(dataset_dir, tmp_path / "out")  # resumes: the fitted part is in the checkpoint, not fitted again
    data = load_fold(dataset_dir, 0)
    train_part, _ = data.split("spot", 0.2, 0)
    assert len(_FittedPartModel.prepared) == 1
    expression, seed, device = _FittedPartModel.prepared[0]
    np.testing.assert_array_equal(expression, data.expression(train_part))
    assert seed == 0 and device == torch.device("cpu")


def test_a_run_stopped_part_way_reports_itself_incomplete_and_writes_no_deliverables(dataset_dir, tmp_path, built):
    out = tmp_path / "out"
    assert run(dataset_dir, out, stop_after_epochs=0) == {
        "epochs_run": 0, "best_epoch": None, "best_val_loss": None, "first_val_loss": None, "stopped_early": False,
        "seconds": 0, "device": "cpu", "n_train_spots": 64, "n_val_spots": 16, "complete": False}
    summary = run(dataset_dir, out, stop_after_epochs=1)
    history = pd.read_csv(out / "history.csv")
    assert (summary["epochs_run"], summary["best_epoch"], summary["complete"]) == (1, 1, False)
    assert summary["best_val_loss"] == summary["first_val_loss"] == pytest.approx(history["val_loss"][0])
    # milliseconds: not float noise, and not whole seconds (an epoch here takes well under one)
    assert 0 < history["seconds"][0] == round(history["seconds"][0], 3) and summary["seconds"] == history["seconds"][0]
    assert not (out / "best.pt").exists() and not (out / "train.json").exists()
    assert (out / "checkpoints" / "best.pt").exists() and (out / "checkpoints" / "last.pt").exists()


class _LossModel(TinySpotModel):
    """Loss `train_loss` while training and `val_loss` in evaluation."""

    train_loss, val_loss = 1.0, 1.0

    def forward(self, batch):
        out = super().forward(batch)
        value = self.train_loss if self.training else self.val_loss
        return {**out, "loss": out["loss"] * 0 + value}


@pytest.mark.parametrize("train_loss, val_loss, message", [
    (math.inf, 1.0, "tiny fold 0: training loss is inf in epoch 1; try a lower lr or set grad_clip"),
    (1.0, math.nan, "tiny fold 0: no epoch gave a finite validation loss; no best.pt"),
])
def test_a_loss_that_is_not_finite_stops_the_run_with_the_reason(dataset_dir, tmp_path, monkeypatch, train_loss,
                                                                 val_loss, message):
    model = type("M", (_LossModel,), {"train_loss": train_loss, "val_loss": val_loss})
    monkeypatch.setattr(train_module, "build_model", lambda name, n_genes, params: model(n_genes))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        run(dataset_dir, tmp_path / "out", epochs=2)
    assert not (tmp_path / "out" / "best.pt").exists()


def test_a_stale_best_checkpoint_is_not_deployed_when_no_epoch_of_this_run_scores(dataset_dir, tmp_path, built,
                                                                                  monkeypatch):
    """A job that died after writing best.pt and before last.pt leaves a best.pt of a run that is not resumed."""
    out = tmp_path / "out"
    run(dataset_dir, out, epochs=2, stop_after_epochs=1)
    (out / "checkpoints" / "last.pt").unlink()
    model = type("M", (_LossModel,), {"val_loss": math.nan})
    monkeypatch.setattr(train_module, "build_model", lambda name, n_genes, params: model(n_genes))
    with pytest.raises(RuntimeError, match="no epoch gave a finite validation loss; no best.pt"):
        run(dataset_dir, out, epochs=2)
    assert not (out / "best.pt").exists()


def test_a_checkpoint_without_a_fingerprint_is_moved_aside_and_training_starts_afresh(dataset_dir, tmp_path, built,
                                                                                     caplog):
    """A last.pt from before fingerprints (or otherwise stripped of one) cannot be trusted to match the config."""
    run(dataset_dir, tmp_path / "fresh", epochs=2)
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    run(dataset_dir, tmp_path / "out", epochs=2, stop_after_epochs=1)
    ckpt = load_checkpoint(last)
    del ckpt["fingerprint"]
    torch.save(ckpt, last)
    with caplog.at_level("WARNING", logger="cmrcnet"):
        run(dataset_dir, tmp_path / "out", epochs=2)
    assert re.search(r"not resuming \S+last\.pt because data\.folds\.tsv, .*, \d+ more changed", caplog.text)
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("fresh", "out"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_epoch_starts_from_randomness_fixed_by_its_number_and_validates_after_training(dataset_dir, tmp_path,
                                                                                           built, monkeypatch):
    """Every epoch reseeds from (seed, epoch), tells the sampler its epoch, trains, then validates without an
    optimizer; the progress flag and the epoch's name reach both passes."""
    calls = []
    run_epoch = train_module._run_epoch

    def recording(model, loader, optimizer, device, cfg, channels_last, desc, progress):
        calls.append((desc, optimizer is not None, loader.sampler.epoch if optimizer else None,
                      torch.random.get_rng_state().clone(), channels_last, progress))
        return run_epoch(model, loader, optimizer, device, cfg, channels_last, desc, progress)

    monkeypatch.setattr(train_module, "_run_epoch", recording)
    run(dataset_dir, tmp_path / "out", epochs=2, stop_after_epochs=1)
    run(dataset_dir, tmp_path / "out", epochs=2)  # the resumed epoch 2 starts where an uninterrupted one would
    assert [c[:3] for c in calls] == [("tiny fold 0 epoch 1/2", True, 1), ("tiny fold 0 epoch 1/2 (val)", False, None),
                                      ("tiny fold 0 epoch 2/2", True, 2), ("tiny fold 0 epoch 2/2 (val)", False, None)]
    for epoch, call in ((1, calls[0]), (2, calls[2])):
        train_module._seed_everything(0, epoch)
        assert torch.equal(call[3], torch.random.get_rng_state())
    assert all(c[4:] == (False, False) for c in calls)


def test_channels_last_is_a_cuda_option_the_cpu_ignores(dataset_dir, tmp_path, monkeypatch):
    layouts = []

    class Recording(TinySpotModel):
        def forward(self, batch):
            layouts.append(batch["image"].is_contiguous())
            return super().forward(batch)

    monkeypatch.setattr(train_module, "build_model", lambda name, n_genes, params: Recording(n_genes))
    run(dataset_dir, tmp_path / "out", epochs=1, channels_last=True)
    assert layouts and all(layouts)


def test_by_default_a_run_is_seeded_with_0_shows_its_progress_and_splits_by_its_seed(dataset_dir, tmp_path, built,
                                                                                    monkeypatch):
    import tqdm

    from cmrcnet.data.datasets import Fold

    splits = []
    split = Fold.split

    def recording(self, val_split="spot", val_fraction=0.1, seed=0):
        splits.append((val_split, val_fraction, seed))
        return split(self, val_split, val_fraction, seed)

    monkeypatch.setattr(Fold, "split", recording)
    monkeypatch.setattr(_RecordingBar, "made", [])
    monkeypatch.setattr(tqdm, "tqdm", _RecordingBar)
    settings = {"epochs": 1, "batch_size": 16, "num_workers": 0, "val_fraction": 0.25}
    train_fold(method="tiny", method_cfg={"model": "stnet"}, train_cfg=settings, dataset_dir=dataset_dir, fold=0,
               out_dir=tmp_path / "default")
    assert load_checkpoint(tmp_path / "default" / "best.pt")["seed"] == 0
    assert _RecordingBar.made and all(bar.kwargs["disable"] is False for bar in _RecordingBar.made)
    train_fold(method="tiny", method_cfg={"model": "stnet"}, train_cfg=settings, dataset_dir=dataset_dir, fold=0,
               out_dir=tmp_path / "seeded", seed=7, progress=False)
    assert splits == [("spot", 0.25, 0), ("spot", 0.25, 7)]


def test_a_bad_setting_in_a_methods_own_train_block_names_that_block(dataset_dir, tmp_path, built):
    with pytest.raises(CMRCNetError, match=re.escape("methods.tiny.train.lr: invalid value -1")):
        train_fold(method="tiny", method_cfg={"model": "stnet", "train": {"lr": -1}}, train_cfg={},
                   dataset_dir=dataset_dir, fold=0, out_dir=tmp_path / "out", progress=False)


def test_an_unscored_first_epoch_counts_against_the_patience_once(dataset_dir, tmp_path, built, monkeypatch):
    """A first epoch without a finite validation loss is one bad epoch, not two: patience 2 still reaches the
    improvement in epoch 2 and stops after two more epochs without one."""
    real = train_module._run_epoch
    scripted = [math.nan, 1.0, 2.0, 3.0, 0.5]

    def run_epoch(model, loader, optimizer, device, cfg, channels_last, desc, progress):
        stats = real(model, loader, optimizer, device, cfg, channels_last, desc, progress)
        if optimizer is None:
            stats["loss"] = scripted[int(re.search(r" epoch (\d+)/", desc).group(1)) - 1]
        return stats

    monkeypatch.setattr(train_module, "_run_epoch", run_epoch)
    summary = run(dataset_dir, tmp_path / "out", epochs=5, patience=2)
    assert (summary["epochs_run"], summary["best_epoch"], summary["stopped_early"]) == (4, 2, True)
    assert summary["best_val_loss"] == 1.0 and math.isnan(summary["first_val_loss"])
