"""Learning test: on synthetic slides, trained CMRCNet and BLEEP predict held-out expression by retrieval
clearly better than the same models trained with image-expression pairs shuffled (a control that can learn
nothing but the marginal distribution). Not timed: it checks that the whole chain learns."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import REAL_PARAMS, synthetic_dir  # noqa: F401 - the fixture is shared

from cmrcnet.evaluation.evaluate import read_predictions
from cmrcnet.evaluation.metrics import pearson_per_gene
from cmrcnet.inference.predict import predict_fold
from cmrcnet.train import train_fold

pytestmark = pytest.mark.slow  # the Snakemake pipeline or real training: minutes on 2 cores

TRAIN = {"epochs": 15, "batch_size": 16, "lr": 1e-3, "num_workers": 0, "patience": None, "schedule": "constant"}


def mean_r(name, data_dir, out, shuffle_pairs: bool) -> float:
    train_fold(method=name, method_cfg={"model": name, "params": REAL_PARAMS[name]},
               train_cfg={**TRAIN, "shuffle_pairs": shuffle_pairs}, dataset_dir=data_dir, fold=0, out_dir=out,
               progress=False)
    predict_fold(model_path=out / "best.pt", dataset_dir=data_dir, fold=0, out_path=out / "pred.h5ad", method=name,
                 ks=[10], device="cpu")
    adata, _, _ = read_predictions(out / "pred.h5ad")
    r, _ = pearson_per_gene(adata.X, adata.layers["k10"])
    return float(np.nanmean(r))


@pytest.mark.parametrize("name", ["cmrcnet", "bleep"])
def test_trained_model_beats_shuffled_pairing_control(synthetic_dir, tmp_path, name):  # noqa: F811
    trained = mean_r(name, synthetic_dir, tmp_path / "trained", shuffle_pairs=False)
    control = mean_r(name, synthetic_dir, tmp_path / "control", shuffle_pairs=True)
    print(f"{name}: mean r trained {trained:.3f}, shuffled-pairing control {control:.3f}")
    assert trained > control + 0.2, (trained, control)
    assert trained > 0.2


GRID_BLOCK = {"ks": [1, 5, 10], "inbatch_batch_size": 16, "probe": "ridge-hestbench", "batch_key": "sample",
              "labels": {"spot": "tissue_type", "sample": {}, "sample_metadata_key": None}, "bootstrap": 0}


def grid_recall(data_dir, out, shuffle_pairs: bool) -> tuple[float, float, int]:
    """Whole-test-split recall@10 (image -> gene, gene -> image) of a grid cell (tiny ResNet from scratch, MLP gene
    tower, CLIP loss) trained on fold 0, and the number of test spots."""
    from cmrcnet.crossmodal.evaluate import evaluate_cell_fold

    params = {"image": "test_resnet", "image_mode": "scratch", "input_size": 32, "gene": "mlp", "loss": "clip",
              "embed_dim": 32}
    train_fold(method="xm", method_cfg={"model": "crossmodal", "params": params},
               train_cfg={**TRAIN, "shuffle_pairs": shuffle_pairs}, dataset_dir=data_dir, fold=0, out_dir=out,
               progress=False)
    result = evaluate_cell_fold(model_path=out / "best.pt", dataset_dir=data_dir, fold=0, out_path=out / "xm.json",
                                joint_path=out / "joint.npz", method="xm", block=GRID_BLOCK, k=10, dataset="synthetic",
                                device="cpu")
    r = result["retrieval"]
    return r["img2gene_recall@10"], r["gene2img_recall@10"], result["n_test"]


def test_grid_cell_retrieves_its_partner_over_the_whole_test_split(synthetic_dir, tmp_path):  # noqa: F811
    trained = grid_recall(synthetic_dir, tmp_path / "trained", shuffle_pairs=False)
    control = grid_recall(synthetic_dir, tmp_path / "control", shuffle_pairs=True)
    chance = 10 / trained[2]
    print(f"grid cell recall@10 (image->gene, gene->image): trained {trained[:2]}, shuffled {control[:2]}, "
          f"chance {chance:.3f} over {trained[2]} test spots")
    for direction in (0, 1):
        assert trained[direction] > 2 * chance, (trained, chance)
        assert trained[direction] > control[direction] + chance, (trained, control)
