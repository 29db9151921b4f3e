"""Probes on frozen features: HEST-Benchmark's ridge against its closed form, ridge-cv's alpha against a hand-run
grouped cross-validation, the MLP and the retrieval probe, and `probe_fold`'s prediction file and refused inputs."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
from test_datasets import GENES, write_dataset

from cmrcnet.data.datasets import load_fold
from cmrcnet.errors import CMRCNetError
from cmrcnet.evaluation.evaluate import evaluate_dataset, read_predictions
from cmrcnet.inference.predict import upstream_identity
from cmrcnet.probes import PROBES, make_probe, probe_fold
from cmrcnet.probes.ridge import RidgeCV, RidgeHestBench


def linear_problem(n=90, d=30, g=5, seed=0, noise=0.5, n_groups=0):
    """Correlated features (so the PCA has something to order), targets linear in them plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(0, 3, size=d)
    Y = X @ rng.normal(size=(d, g)) * 0.1 + noise * rng.normal(size=(n, g)) + 2.0
    groups = np.repeat([f"p{i}" for i in range(n_groups)], -(-n // n_groups))[:n] if n_groups else None
    return X, Y, groups


def closed_form_ridge(X, Y, X_test, n_components, alpha=None):
    """HEST's recipe written out: standardise (population std), PCA by numpy SVD of the centred training features,
    W = (F'F + aI)^-1 F'Y without intercept, alpha = 100 / (P G) with P the components kept."""
    mu, sd = X.mean(axis=0), X.std(axis=0)
    Z = (X - mu) / sd
    centre = Z.mean(axis=0)
    _, _, Vt = np.linalg.svd(Z - centre, full_matrices=False)
    p = min(n_components, *X.shape)
    V = Vt[:p].T
    F = (Z - centre) @ V
    a = 100.0 / (p * Y.shape[1]) if alpha is None else alpha
    W = np.linalg.solve(F.T @ F + a * np.eye(p), F.T @ Y)
    return (((X_test - mu) / sd) - centre) @ V @ W, a


# ----------------------------------------------------------------------------------------------- ridge-hestbench


@pytest.mark.parametrize("n_components", [10, 256])  # 256 > 30 features: capped at min(n_spots, n_features)
def test_ridge_hestbench_equals_the_closed_form(n_components):
    X, Y, _ = linear_problem()
    X_test = linear_problem(seed=1)[0]
    probe = make_probe("ridge-hestbench", n_components=n_components, tol=1e-12).fit(X, Y)
    expected, alpha = closed_form_ridge(X, Y, X_test, n_components)
    got = probe.predict(X_test)
    assert probe.info_["alpha"] == pytest.approx(alpha) == 100.0 / (min(n_components, 30) * 5)
    assert probe.info_["n_components"] == min(n_components, 30)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-5


def test_ridge_hestbench_default_tolerance_stops_near_the_closed_form():
    """HEST leaves sklearn's lsqr tolerance at its default: the solution is then close to, not at, the closed form."""
    X, Y, _ = linear_problem()
    probe = RidgeHestBench().fit(X, Y)
    assert probe.ridge_.solver == "lsqr" and probe.ridge_.fit_intercept is False and probe.ridge_.max_iter == 1000
    expected, _ = closed_form_ridge(X, Y, X, 256)
    assert np.abs(probe.predict(X) - expected).max() / np.abs(expected).max() < 1e-2


def test_ridge_hestbench_is_deterministic_and_fits_the_pca_on_training_spots_only():
    X, Y, _ = linear_problem()
    X_test = linear_problem(seed=1)[0]
    a = RidgeHestBench(n_components=8).fit(X, Y)
    b = RidgeHestBench(n_components=8).fit(X, Y)
    np.testing.assert_array_equal(a.predict(X_test), b.predict(X_test))
    # the test features do not move the fitted scaler or PCA
    np.testing.assert_allclose(a.pipe_.scaler_.mean_, X.astype(np.float32).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(a.predict(X_test[:5]), a.predict(X_test)[:5], atol=1e-5)  # float32 rounding


def test_given_alpha_overrides_the_formula():
    X, Y, _ = linear_problem()
    probe = RidgeHestBench(n_components=10, alpha=5.0, tol=1e-12).fit(X, Y)
    expected, _ = closed_form_ridge(X, Y, X, 10, alpha=5.0)
    assert probe.info_["alpha"] == 5.0 and probe.info_["alpha_rule"] == "given"
    assert np.abs(probe.predict(X) - expected).max() / np.abs(expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------------- ridge-cv


def hand_grouped_cv(X, Y, groups, alphas, n_components, seed, n_splits=5):
    """The grouped cross-validation written out with sklearn's own pieces and scipy's Pearson."""
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(n_splits, len(set(groups)))
    scores = np.zeros((k, len(alphas)))
    for f, (tr, va) in enumerate(GroupKFold(n_splits=k).split(X, Y, groups)):
        for j, alpha in enumerate(alphas):
            p = min(n_components, len(tr), X.shape[1])
            pipe = make_pipeline(StandardScaler(), PCA(p, random_state=seed),
                                 Ridge(alpha=alpha, fit_intercept=False, solver="cholesky"))
            pred = pipe.fit(X[tr], Y[tr]).predict(X[va])
            scores[f, j] = np.mean([pearsonr(Y[va, g], pred[:, g])[0] for g in range(Y.shape[1])])
    return alphas[int(np.argmax(scores.mean(axis=0)))], scores.mean(axis=0)


def test_ridge_cv_picks_the_alpha_a_hand_run_grouped_cv_picks():
    X, Y, groups = linear_problem(n=120, d=40, noise=3.0, n_groups=6)
    alphas = np.logspace(-2, 5, 8)
    probe = make_probe("ridge-cv", alphas=list(alphas), n_components=20, seed=3).fit(X, Y, groups)
    expected, mean_scores = hand_grouped_cv(X, Y, groups, alphas, 20, 3)
    assert probe.info_["alpha"] == pytest.approx(expected)
    assert probe.info_["inner_folds"] == 5
    np.testing.assert_allclose(probe.info_["cv_scores"], mean_scores, atol=1e-5)
    assert expected not in (alphas[0], alphas[-1])  # the problem is built so that the choice matters


def test_ridge_cv_refits_on_all_spots_with_the_chosen_alpha():
    X, Y, groups = linear_problem(n=120, d=40, noise=3.0, n_groups=6)
    probe = RidgeCV(alphas=[1e-2, 10.0, 1e3], n_components=20).fit(X, Y, groups)
    expected, _ = closed_form_ridge(X, Y, X, 20, alpha=probe.alpha_)
    np.testing.assert_allclose(probe.predict(X), expected, atol=1e-4 * np.abs(expected).max())


def test_ridge_cv_without_groups_falls_back_to_spot_folds_with_a_note(caplog):
    X, Y, _ = linear_problem(n=60)
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        probe = RidgeCV(alphas=[0.1, 10.0], n_splits=3).fit(X, Y, np.array(["one"] * 60))
    assert probe.info_["inner_folds"] == 3
    assert "only 1 group; inner 3-fold split over spots instead of groups" in caplog.text


# ---------------------------------------------------------------------------------------------------------- mlp


def test_mlp_learns_a_linear_signal_and_is_deterministic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 20))
    W = rng.normal(size=(20, 4))
    Y = X @ W + 0.1 * rng.normal(size=(600, 4))
    groups = np.repeat(np.arange(6), 100)
    X_test = rng.normal(size=(200, 20))
    truth = X_test @ W
    a = make_probe("mlp", seed=7).fit(X[:600], Y, groups)
    pred = a.predict(X_test)
    r = [np.corrcoef(truth[:, g], pred[:, g])[0, 1] for g in range(4)]
    assert min(r) > 0.9, r
    assert a.info_["validation"].endswith("of 6 groups held out")
    b = make_probe("mlp", seed=7).fit(X, Y, groups)
    np.testing.assert_array_equal(pred, b.predict(X_test))
    c = make_probe("mlp", seed=8).fit(X, Y, groups)
    assert not np.array_equal(pred, c.predict(X_test))


def test_mlp_holds_out_whole_groups():
    from cmrcnet.probes.mlp import grouped_validation

    groups = np.repeat(["a", "b", "c", "d", "e"], 20)
    train, val, _ = grouped_validation(100, groups, 0.2, seed=0)
    assert set(groups[train]).isdisjoint(groups[val]) and len(val) >= 20 and len(train) > 0
    train, val, how = grouped_validation(100, None, 0.2, seed=0)
    assert len(val) == 20 and how == "20 random spots held out"


# ---------------------------------------------------------------------------------------------------------- knn


def test_knn_is_the_mean_of_the_cosine_nearest_training_spots():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 6)), rng.normal(size=(30, 3))
    Q = rng.normal(size=(7, 6))
    preds = make_probe("knn", ks=[3, 1, 5]).fit(X, Y).predict(Q)
    assert sorted(preds) == [1, 3, 5]
    cos = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1, kind="stable")
    for k in (1, 3, 5):
        np.testing.assert_allclose(preds[k], Y[order[:, :k]].mean(axis=1), rtol=1e-6)


def test_knn_refuses_more_neighbours_than_training_spots():
    with pytest.raises(CMRCNetError, match=r"probe ks: 11 neighbours asked for, but there are only 10 training spots"):
        make_probe("knn", ks=[11]).fit(np.ones((10, 2)), np.ones((10, 1)))


# ---------------------------------------------------------------------------------------------------- make_probe


def test_make_probe_refuses_unknown_kinds_and_parameters():
    with pytest.raises(CMRCNetError, match=r"probe: unknown probe 'lasso'; use one of ridge-hestbench, ridge-cv, mlp, knn"):
        make_probe("lasso")
    with pytest.raises(CMRCNetError, match=r"probe ridge-hestbench: unknown parameter\(s\) hidden; known: n_components"):
        make_probe("ridge-hestbench", hidden=3)
    assert set(PROBES) == {"ridge-hestbench", "ridge-cv", "mlp", "knn"}


@pytest.mark.parametrize("kind", ["ridge-hestbench", "ridge-cv", "mlp", "knn"])
def test_probes_refuse_bad_features(kind):
    probe = make_probe(kind, **({"ks": [2]} if kind == "knn" else {}))
    X, Y = np.ones((10, 3)), np.ones((10, 2))
    X[4, 1] = np.nan
    with pytest.raises(CMRCNetError, match=r"X: contains NaN or infinite values \(first in row 4\)"):
        probe.fit(X, Y)
    with pytest.raises(CMRCNetError, match=r"Y: has 9 rows but X has 10"):
        probe.fit(np.ones((10, 3)), Y[:9])
    rng = np.random.default_rng(0)
    probe.fit(rng.normal(size=(10, 3)), rng.normal(size=(10, 2)))
    with pytest.raises(CMRCNetError, match=r"X: has 4 features, the probe was fitted on 3"):
        probe.predict(np.ones((2, 4)))


# --------------------------------------------------------------------------------------------------- probe_fold


def write_cache(path, barcodes, values, encoder="tiny-test", sha="a" * 64):
    """An embedding cache file as `embed_patches` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("embeddings", data=np.asarray(values, dtype=np.float16))
        h5.create_dataset("barcode", data=np.array([b.encode() for b in barcodes]).reshape(-1, 1))
        h5.attrs.update({"encoder": encoder, "weights_sha256": sha, "embed_dim": values.shape[1], "dtype": "float16"})


def write_caches(dataset_dir, emb_dir, drop=None, **kwargs):
    """Caches whose features are each patch's mean colour (which predicts expression) plus 5 noise dimensions."""
    rng = np.random.default_rng(5)
    for sample in ("S0", "S1", "S2"):
        with h5py.File(dataset_dir / "patches" / f"{sample}.h5", "r") as h5:
            img = h5["img"][()]
            barcodes = [b.decode() for b in h5["barcode"][()].reshape(-1)]
        feats = np.concatenate([img.reshape(len(img), -1, 3).mean(axis=1) / 255, rng.normal(0, 0.05, (len(img), 5))], 1)
        if drop and sample == drop[0]:
            keep = [i for i, b in enumerate(barcodes) if b != drop[1]]
            barcodes, feats = [barcodes[i] for i in keep], feats[keep]
        write_cache(emb_dir / f"{sample}.h5", barcodes, feats, **kwargs)


@pytest.fixture
def fold_data(tmp_path):
    dataset_dir = write_dataset(tmp_path / "ds")  # S0 is fold 0's test sample; S1, S2 train; 40 spots, 8 genes
    emb_dir = tmp_path / "emb" / "tiny-test"
    write_caches(dataset_dir, emb_dir)
    return dataset_dir, emb_dir


def run_probe(dataset_dir, emb_dir, out, probe="ridge-hestbench", **kwargs):
    args = {"embeddings_dir": emb_dir, "dataset_dir": dataset_dir, "fold": 0, "out_path": out,
            "method": f"tiny-{probe}", "probe": probe, "encoder": "tiny-test", "params": {}, "ks": [5, 10], "seed": 1}
    return probe_fold(**{**args, **kwargs})


@pytest.mark.parametrize("probe", ["ridge-hestbench", "ridge-cv", "mlp"])
def test_probe_fold_writes_a_prediction_file_evaluation_accepts(tmp_path, fold_data, probe):
    dataset_dir, emb_dir = fold_data
    out = tmp_path / "pred" / "p.h5ad"
    info = run_probe(dataset_dir, emb_dir, out, probe=probe, fingerprint="fp1")
    adata, stored, labels = read_predictions(out)
    data = load_fold(dataset_dir, 0)
    test = data.all_spots(data.test_samples)
    np.testing.assert_allclose(adata.X, data.expression(test), rtol=1e-6)
    assert list(adata.var_names) == GENES and adata.n_obs == 40
    assert list(adata.obs.columns) == ["sample", "barcode", "x", "y"] and set(adata.obs["sample"]) == {"S0"}
    assert list(adata.obs["barcode"]) == list(data.sample("S0").barcodes)
    assert labels == {"pred": f"tiny-{probe}"} and list(adata.layers) == ["pred"]
    assert stored["inputs"] == upstream_identity(dataset_dir, data) and stored["fingerprint"] == "fp1"
    assert stored["probe"] == probe and stored["encoder"] == "tiny-test" and stored["groups"] == "patient"
    assert stored["fold"] == 0 and stored["train_samples"] == ["S1", "S2"] and stored["n_train"] == 80
    assert "provenance" in stored and stored["probe_info"] == json.loads(json.dumps(info["probe_info"]))
    # colour predicts expression: the probe must find it
    r = [np.corrcoef(adata.X[:, g], adata.layers["pred"][:, g])[0, 1] for g in range(len(GENES))]
    assert np.mean(r) > 0.8, r
    scores, _, label_table = evaluate_dataset([out], {}, dataset="ds", protocols=("paper",),
                                              fingerprints={f"tiny-{probe}": "fp1"},
                                              upstream={"genes.tsv": dataset_dir / "genes.tsv",
                                                        "folds.tsv": dataset_dir / "folds.tsv"})
    assert set(label_table["label"]) == {f"tiny-{probe}"} and len(scores) > 0


def test_probe_fold_knn_writes_one_layer_per_k(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    out = tmp_path / "knn.h5ad"
    run_probe(dataset_dir, emb_dir, out, probe="knn", method="tiny-knn", ks=[10, 5])
    adata, stored, labels = read_predictions(out)
    assert labels == {"k5": "tiny-knn-k5", "k10": "tiny-knn-k10"} and stored["ks"] == [5, 10]
    data = load_fold(dataset_dir, 0)
    train = data.all_spots(data.train_samples)
    expected = make_probe("knn", ks=[5, 10])
    from cmrcnet.inference.embed import read_embeddings
    from cmrcnet.probes.fold import _features

    feats = _features(data, train, emb_dir, "tiny-test", {})
    test_feats = read_embeddings(emb_dir / "S0.h5")
    rows = {b: i for i, b in enumerate(test_feats.barcodes)}
    q = test_feats.values[[rows[b] for b in data.sample("S0").barcodes]]
    want = expected.fit(feats, data.expression(train)).predict(q)
    np.testing.assert_allclose(adata.layers["k5"], want[5], rtol=1e-6)


def test_probe_fold_is_deterministic(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    for name in ("a", "b"):
        run_probe(dataset_dir, emb_dir, tmp_path / f"{name}.h5ad", probe="mlp")
    a, b = read_predictions(tmp_path / "a.h5ad")[0], read_predictions(tmp_path / "b.h5ad")[0]
    np.testing.assert_array_equal(a.layers["pred"], b.layers["pred"])


def test_probe_fold_missing_cache_file_names_it(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    (emb_dir / "S2.h5").unlink()
    with pytest.raises(CMRCNetError, match=r"S2\.h5: embedding file not found \(run the embed step"):
        run_probe(dataset_dir, emb_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


def test_probe_fold_missing_barcode_names_the_file(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    write_caches(dataset_dir, emb_dir, drop=("S0", "S0-7"))
    with pytest.raises(CMRCNetError, match=r"S0\.h5: no embedding for 1 of the 40 spots of S0 \(first: 'S0-7'\)"):
        run_probe(dataset_dir, emb_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


def test_probe_fold_refuses_another_encoders_cache(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    write_caches(dataset_dir, emb_dir, encoder="uni")
    with pytest.raises(CMRCNetError, match=r"S1\.h5: embeddings of encoder 'uni', expected 'tiny-test'; re-embed"):
        run_probe(dataset_dir, emb_dir, tmp_path / "p.h5ad")
    assert not (tmp_path / "p.h5ad").exists()


def test_probe_fold_refuses_caches_of_mixed_weights(tmp_path, fold_data):
    dataset_dir, emb_dir = fold_data
    with h5py.File(emb_dir / "S2.h5", "a") as h5:
        h5.attrs["weights_sha256"] = "b" * 64
    with pytest.raises(CMRCNetError, match=r"S2\.h5: made with other tiny-test weights than .*S0\.h5"):
        run_probe(dataset_dir, emb_dir, tmp_path / "p.h5ad")
