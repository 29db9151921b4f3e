"""Cross-modal benchmark metrics: retrieval ranks against brute force, grouped label probes, scIB batch metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from cmrcnet.crossmodal import labels
from cmrcnet.crossmodal.batch_effects import batch_metrics
from cmrcnet.crossmodal.labels import classify_labels, classify_sample_labels
from cmrcnet.crossmodal.retrieval_metrics import in_batch_retrieval, pair_ranks, whole_split_retrieval
from cmrcnet.errors import CMRCNetError
from cmrcnet.inference.retrieval import topk_cosine

# ----------------------------------------------------------------------------------------------- retrieval


def noisy_pairs(n, d=16, noise=1.0, seed=0):
    """Image embeddings and expression embeddings = image + noise: true partners are near, not always first."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, d))
    return image, image + noise * rng.normal(size=(n, d))


def brute_force_ranks(queries, candidates):
    """Full float64 cosine matrix, stable descending argsort per row, position of the true partner (1-based);
    plus a mask of rows where some other candidate is within 1e-5 of the true similarity (float32 may order those
    differently)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    sims = q @ c.T
    order = np.argsort(-sims, axis=1, kind="stable")
    n = len(q)
    ranks = np.argmax(order == np.arange(n)[:, None], axis=1) + 1
    gap = np.abs(sims - np.diag(sims)[:, None])
    np.fill_diagonal(gap, np.inf)
    return ranks, gap.min(axis=1) < 1e-5


def test_whole_split_matches_brute_force_with_uneven_blocks():
    image, expr = noisy_pairs(1037)
    want = {"img2gene": brute_force_ranks(image, expr), "gene2img": brute_force_ranks(expr, image)}
    for block in (100, 1037, 4096):  # 1037 = 10 x 100 + 37: a short last block
        got = pair_ranks(image, expr, block=block)
        for direction, (ranks, near_tie) in want.items():
            assert not near_tie.all()
            np.testing.assert_array_equal(got[direction][~near_tie], ranks[~near_tie])
        scores = whole_split_retrieval(image, expr, ks=(1, 5, 10), block=block)
        assert scores["n"] == 1037
        for direction, (ranks, near_tie) in want.items():
            for k in (1, 5, 10):  # only near-tied rows may differ
                assert scores[f"{direction}_recall@{k}"] == pytest.approx(np.mean(ranks <= k), abs=near_tie.mean())
            assert scores[f"{direction}_median_rank"] == pytest.approx(np.median(ranks))
            assert scores[f"{direction}_mean_rank"] == pytest.approx(np.mean(ranks), rel=1e-3)
    # the noise makes the task neither trivial nor hopeless, so the comparison above is not vacuous
    assert 0.05 < scores["img2gene_recall@1"] < 0.9
    assert scores["img2gene_median_rank"] > 1


def test_recall_agrees_with_topk_cosine():
    """recall@k from the ranks = the share of queries whose true partner is in topk_cosine's top k."""
    image, expr = noisy_pairs(700, seed=3)
    scores = whole_split_retrieval(image, expr, ks=(1, 3, 10), block=64)
    for direction, (q, c) in {"img2gene": (image, expr), "gene2img": (expr, image)}.items():
        _, idx = topk_cosine(q, c, 10, device="cpu")
        hit = idx.numpy() == np.arange(len(q))[:, None]
        for k in (1, 3, 10):
            assert scores[f"{direction}_recall@{k}"] == hit[:, :k].any(axis=1).mean()


def test_perfect_embeddings_rank_first():
    image, _ = noisy_pairs(500, seed=1)
    for expr in (image, 3.0 * image):  # cosine: scaling does not matter
        scores = whole_split_retrieval(image, expr, ks=(1, 5))
        for direction in ("img2gene", "gene2img"):
            assert scores[f"{direction}_recall@1"] == 1.0
            assert scores[f"{direction}_median_rank"] == 1.0
            assert scores[f"{direction}_mean_rank"] == 1.0


def test_random_embeddings_give_chance_recall():
    rng = np.random.default_rng(7)
    n = 2000
    scores = whole_split_retrieval(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), ks=(1, 10), block=512)
    for direction in ("img2gene", "gene2img"):
        assert 0.002 <= scores[f"{direction}_recall@10"] <= 0.01  # chance 10 / 2000 = 0.005
        assert scores[f"{direction}_recall@1"] <= 0.003  # chance 0.0005
        assert abs(scores[f"{direction}_mean_rank"] - (n + 1) / 2) < 60  # uniform ranks: sd of the mean ~13


def test_ties_count_for_the_true_partner():
    """rank = 1 + candidates strictly more similar: exact copies of the true partner do not push it down."""
    image = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = whole_split_retrieval(image, image, ks=(1,))
    assert scores["img2gene_recall@1"] == 1.0
    assert scores["gene2img_mean_rank"] == 1.0
    # strictly better candidates do count: query 0 = (1, 0), its partner (1, 1) is beaten by (1, 0.1)
    ranks = pair_ranks(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0], [1.0, 0.1]]))
    np.testing.assert_array_equal(ranks["img2gene"], [2, 2])


def reference_in_batch(image, expr, batch_size, k, seed):
    order = np.random.default_rng(seed).permutation(len(image))
    hits = {"img2gene": [], "gene2img": []}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if len(rows) < 2:
            continue
        hits["img2gene"].extend(brute_force_ranks(image[rows], expr[rows])[0] <= k)
        hits["gene2img"].extend(brute_force_ranks(expr[rows], image[rows])[0] <= k)
    return {d: np.mean(h) for d, h in hits.items()}, len(hits["img2gene"])


@pytest.mark.parametrize(("n", "batch_size"), [(301, 64), (257, 128), (300, 100)])
def test_in_batch_matches_reference(n, batch_size):
    image, expr = noisy_pairs(n, noise=1.5, seed=n)
    scores = in_batch_retrieval(image, expr, batch_size, ks=(1, 5), seed=11)
    for k in (1, 5):
        want, counted = reference_in_batch(image, expr, batch_size, k, seed=11)
        for direction in ("img2gene", "gene2img"):
            assert scores[f"inbatch{batch_size}_{direction}_recall@{k}"] == pytest.approx(want[direction])
    # 257 = 2 x 128 + 1: the single left-over spot is dropped; 301 = 4 x 64 + 45: the partial batch counts
    assert scores[f"inbatch{batch_size}_n"] == counted == (n - 1 if n % batch_size == 1 else n)


def test_in_batch_depends_on_seed_and_batch_size():
    image, expr = noisy_pairs(600, noise=1.5, seed=5)
    a = in_batch_retrieval(image, expr, 50, ks=(1, 5), seed=0)
    assert a == in_batch_retrieval(image, expr, 50, ks=(1, 5), seed=0)
    assert a != in_batch_retrieval(image, expr, 50, ks=(1, 5), seed=1)  # other batches, other neighbours
    small = in_batch_retrieval(image, expr, 20, ks=(1,))["inbatch20_img2gene_recall@1"]
    large = in_batch_retrieval(image, expr, 200, ks=(1,))["inbatch200_img2gene_recall@1"]
    assert small > large + 0.1  # fewer candidates, easier retrieval


def test_in_batch_with_one_batch_equals_whole_split():
    image, expr = noisy_pairs(400, seed=2)
    whole = whole_split_retrieval(image, expr, ks=(1, 5, 10))
    for batch_size in (400, 1000):
        scores = in_batch_retrieval(image, expr, batch_size, ks=(1, 5, 10), seed=4)
        assert scores[f"inbatch{batch_size}_n"] == 400
        for direction in ("img2gene", "gene2img"):
            for k in (1, 5, 10):
                assert scores[f"inbatch{batch_size}_{direction}_recall@{k}"] == whole[f"{direction}_recall@{k}"]


def test_in_batch_is_easier_than_whole_split_on_random_data():
    rng = np.random.default_rng(0)
    image, expr = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    whole = whole_split_retrieval(image, expr, ks=(1, 5))
    batched = in_batch_retrieval(image, expr, 32, ks=(1, 5))
    for direction in ("img2gene", "gene2img"):
        assert batched[f"inbatch32_{direction}_recall@5"] > 0.1  # chance 5 / 32 = 0.16
        assert whole[f"{direction}_recall@5"] < 0.01  # chance 5 / 2000
        assert batched[f"inbatch32_{direction}_recall@1"] > whole[f"{direction}_recall@1"]


@pytest.mark.parametrize(("image", "expr", "kwargs", "message"), [
    (np.ones((5, 3)), np.ones((5, 4)), {}, "differs from image_emb"),
    (np.ones((5, 3)), np.ones((6, 3)), {}, "differs from image_emb"),
    (np.ones((1, 3)), np.ones((1, 3)), {}, "at least 2"),
    (np.ones(5), np.ones(5), {}, "2-D"),
    (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones((2, 2)), {}, "NaN or infinite values (first in row 0)"),
    (np.ones((2, 2)), np.array([[1.0, 2.0], [np.inf, 2.0]]), {}, "expr_emb: contains NaN or infinite"),
    (np.ones((3, 2)), np.ones((3, 2)), {"ks": (0, 5)}, "ks: must be at least 1"),
    (np.ones((3, 2)), np.ones((3, 2)), {"ks": ()}, "ks: no k given"),
    (np.ones((3, 2)), np.ones((3, 2)), {"block": 0}, "block: must be at least 1"),
])
def test_whole_split_input_errors(image, expr, kwargs, message):
    with pytest.raises(CMRCNetError) as err:
        whole_split_retrieval(image, expr, **kwargs)
    assert message in str(err.value)


def test_in_batch_input_errors():
    image, expr = noisy_pairs(10)
    for batch_size, message in ((1, "batch_size: must be at least 2"), (2.5, "batch_size: must be an integer")):
        with pytest.raises(CMRCNetError) as err:
            in_batch_retrieval(image, expr, batch_size)
        assert message in str(err.value)
    with pytest.raises(CMRCNetError, match="ks"):
        in_batch_retrieval(image, expr, 4, ks=(-1,))
    with pytest.raises(CMRCNetError, match="differs"):
        in_batch_retrieval(image, expr[:9], 4)


# ---------------------------------------------------------------------------------------------------- labels


def blobs(n_groups=6, per_group=60, d=8, separation=4.0, seed=0):
    """Two Gaussian blobs (one per label) in every group, with a small group offset."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], per_group)
    y = np.tile(["tumour", "stroma"], n_groups * per_group // 2)
    x = rng.normal(size=(len(y), d)) + 0.5 * rng.normal(size=(n_groups, d)).repeat(per_group, axis=0)
    x[:, 0] += np.where(y == "tumour", separation, -separation) / 2
    return x, y, groups


def test_separable_labels_are_found():
    x, y, groups = blobs()
    scores = classify_labels(x, y, groups)
    assert scores["balanced_accuracy"] > 0.95
    assert scores["macro_f1"] > 0.95
    assert (scores["n_folds"], scores["n_classes"], scores["n"]) == (5, 2, 360)


def test_three_classes_and_fewer_groups_than_splits():
    x, y, groups = blobs(n_groups=3, per_group=90)
    y = np.tile(["a", "b", "c"], 90)
    x[:, 1] += np.select([y == "a", y == "b"], [4.0, -4.0], 0.0)
    x[:, 0] += np.where(y == "a", 4.0, 0.0)
    scores = classify_labels(x, y, groups, n_splits=5)
    assert scores["n_folds"] == 3 and scores["n_classes"] == 3
    assert scores["balanced_accuracy"] > 0.9


def test_independent_labels_score_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 10))
    y = rng.permutation(np.repeat([0, 1], 400))
    groups = np.repeat(np.arange(10), 80)
    scores = classify_labels(x, y, groups)
    assert 0.35 < scores["balanced_accuracy"] < 0.65
    assert scores["macro_f1"] < 0.75


def group_identity_data(n_groups=40, per_group=15, d=128, seed=0):
    """Each group sits at its own random place; the label is the group's parity, so it can be learned only by
    recognising a group already seen in training (a leak), never from where an unseen group sits."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    x = 3.0 * rng.normal(size=(n_groups, d))[g] + 0.3 * rng.normal(size=(len(g), d))
    order = rng.permutation(len(g))  # groups interleaved, so an unshuffled KFold would leak too
    return x[order], (g % 2)[order], g[order]


def test_grouped_split_does_not_leak(monkeypatch):
    x, y, groups = group_identity_data()
    assert classify_labels(x, y, groups)["balanced_accuracy"] < 0.8
    # the same probe with a leaky split learns the groups: the assertion above would fail without GroupKFold
    leaky = KFold(5, shuffle=True, random_state=0)
    monkeypatch.setattr(labels, "GroupKFold", lambda n_splits: leaky)
    monkeypatch.setattr(leaky, "split", lambda x, y, groups: KFold.split(leaky, x, y))  # quietly ignores groups
    assert classify_labels(x, y, groups)["balanced_accuracy"] > 0.95


def test_fold_with_one_training_class_predicts_it():
    """Two groups, each holding one class: every fold trains on one class and predicts it for the other group,
    so every prediction is wrong (balanced accuracy 0) instead of a crash."""
    x, _, _ = blobs(n_groups=2)
    y = np.repeat(["x", "y"], 60)
    scores = classify_labels(x, y, np.repeat(["A", "B"], 60))
    assert scores["n_folds"] == 2
    assert scores["balanced_accuracy"] == 0.0


def test_missing_labels_are_dropped():
    x, y, groups = blobs()
    y_missing = y.astype(object)
    y_missing[[0, 7, 50]] = [None, np.nan, ""]
    keep = np.ones(len(y), bool)
    keep[[0, 7, 50]] = False
    got = classify_labels(x, y_missing, groups)
    assert got == classify_labels(x[keep], y[keep], groups[keep])
    assert got["n"] == len(y) - 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"groups": np.repeat(["g"], 360)}, "groups: 1 group(s)"),
    ({"labels": np.repeat(["a"], 360)}, "labels: 1 class(es)"),
    ({"labels": np.repeat(["a", "b"], 10)}, "labels: expected 360 entries"),
    ({"groups": np.arange(5)}, "groups: expected 360 entries"),
    ({"labels": np.array([None] * 360)}, "all labels are missing"),
    ({"n_splits": 1}, "n_splits: must be an integer >= 2"),
])
def test_classify_labels_input_errors(kwargs, message):
    x, y, groups = blobs()
    args = {"embeddings": x, "labels": y, "groups": groups, **kwargs}
    with pytest.raises(CMRCNetError) as err:
        classify_labels(args.pop("embeddings"), args.pop("labels"), args.pop("groups"), **args)
    assert message in str(err.value)


def test_classify_labels_rejects_nan_embeddings():
    x, y, groups = blobs()
    x[3, 2] = np.nan
    with pytest.raises(CMRCNetError, match=r"embeddings: contain NaN or infinite values \(first in row 3\)"):
        classify_labels(x, y, groups)


def sample_data(n_samples=12, per_sample=40, d=6, shift=2.0, offset=0.3, seed=0):
    """MSI samples shifted along dimension 0, plus a per-sample offset."""
    rng = np.random.default_rng(seed)
    names = [f"S{i}" for i in range(n_samples)]
    status = {name: ("MSI" if i % 2 else "MSS") for i, name in enumerate(names)}
    sample_of_spot = np.repeat(names, per_sample)
    x = rng.normal(size=(len(sample_of_spot), d)) + offset * rng.normal(size=(n_samples, d)).repeat(per_sample, axis=0)
    x[:, 0] += np.array([shift if status[s] == "MSI" else -shift for s in sample_of_spot])
    return x, sample_of_spot, status


def test_sample_labels_from_spots():
    x, sample_of_spot, status = sample_data()
    status_partial = {**status, "S0": None}
    del status_partial["S1"]  # two samples without a label: left out
    scores = classify_sample_labels(x, sample_of_spot, status_partial)
    assert scores["n_samples"] == 10 and scores["spot_n"] == 400
    assert scores["balanced_accuracy"] == 1.0 and scores["macro_f1"] == 1.0
    assert scores["spot_balanced_accuracy"] > 0.9
    # the spot-level scores are those of the spot probe grouped by sample, on the labelled spots
    keep = ~np.isin(sample_of_spot, ["S0", "S1"])
    spot = classify_labels(x[keep], [status[s] for s in sample_of_spot[keep]], sample_of_spot[keep])
    assert scores["spot_balanced_accuracy"] == spot["balanced_accuracy"]
    assert scores["spot_macro_f1"] == spot["macro_f1"]
    assert scores["n_folds"] == 5 and scores["n_classes"] == 2


def test_sample_prediction_is_the_mean_probability_vote():
    """A weak per-spot signal: many spots are misclassified, but averaging 40 spots' probabilities calls every
    sample right (a per-sample vote, not one spot's guess)."""
    x, sample_of_spot, status = sample_data(n_samples=16, per_sample=40, shift=0.5, offset=0.05, seed=4)
    scores = classify_sample_labels(x, sample_of_spot, status)
    assert scores["spot_balanced_accuracy"] < 0.8
    assert scores["balanced_accuracy"] == 1.0
    assert scores["n_samples"] == 16 and scores["spot_n"] == 640


def test_sample_labels_input_errors():
    x, sample_of_spot, status = sample_data()
    with pytest.raises(CMRCNetError, match="sample_labels: 1 class"):
        classify_sample_labels(x, sample_of_spot, {"S0": "MSI", "S2": "MSI"})
    with pytest.raises(CMRCNetError, match="no spot belongs to a sample with a label"):
        classify_sample_labels(x, sample_of_spot, {"other": "MSI"})
    with pytest.raises(CMRCNetError, match="expected a dict"):
        classify_sample_labels(x, sample_of_spot, list(status.items()))
    with pytest.raises(CMRCNetError, match="sample_of_spot: expected 480 entries"):
        classify_sample_labels(x, sample_of_spot[:10], status)


# --------------------------------------------------------------------------------------------- batch effects


def cells(batch_shift: float, seed=0, n=300, d=8):
    """Three batches of 100 cells, two labels as well separated blobs; batches shifted apart by `batch_shift`."""
    rng = np.random.default_rng(seed)
    batch = np.repeat(["b0", "b1", "b2"], n // 3)
    label = np.tile(["T", "S"], n // 2)
    x = rng.normal(size=(n, d))
    x[:, 0] += np.where(label == "T", 5.0, -5.0)
    x[:, 1] += batch_shift * np.searchsorted(["b0", "b1", "b2"], batch)
    return x.astype(np.float32), batch, label


@pytest.fixture(scope="module")
def scib_scores():
    mixed_x, batch, label = cells(0.0)
    separated_x, _, _ = cells(30.0)
    random_label = np.random.default_rng(3).permutation(label)
    return {
        "mixed": batch_metrics(mixed_x, batch, label),
        "separated": batch_metrics(separated_x, batch, label),
        "random_labels": batch_metrics(mixed_x, batch, random_label),
        "no_labels": batch_metrics(mixed_x, batch),
        "again": batch_metrics(mixed_x, batch, label),
        "input_after": mixed_x,
    }


def test_batch_metrics_keys_and_range(scib_scores):
    full = {"silhouette_batch", "ilisi", "silhouette_label", "clisi", "graph_connectivity", "nmi", "ari"}
    for name in ("mixed", "separated", "random_labels"):
        assert set(scib_scores[name]) == full
    assert set(scib_scores["no_labels"]) == {"silhouette_batch", "ilisi"}
    for name in ("mixed", "separated", "random_labels", "no_labels"):
        for key, value in scib_scores[name].items():
            assert isinstance(value, float)
            low = -0.5 if key == "ari" else -1e-6  # ARI is 0 at chance and may dip below it
            assert low <= value <= 1 + 1e-6, (name, key, value)


def test_batch_separation_lowers_mixing_scores(scib_scores):
    mixed, separated = scib_scores["mixed"], scib_scores["separated"]
    assert separated["ilisi"] < mixed["ilisi"] - 0.2
    assert separated["silhouette_batch"] < mixed["silhouette_batch"] - 0.2
    # batches 30 apart, 15 neighbours out of 100 per batch: every neighbourhood holds one batch, iLISI exactly 0
    assert separated["ilisi"] == pytest.approx(0.0, abs=1e-6)


def test_label_conservation_scores(scib_scores):
    real, shuffled = scib_scores["mixed"], scib_scores["random_labels"]
    for key in ("silhouette_label", "nmi", "ari", "clisi"):
        assert real[key] > shuffled[key] + 0.2, key
    # labels 10 apart: k-means recovers them exactly and no neighbourhood mixes them
    assert real["nmi"] == pytest.approx(1.0) and real["ari"] == pytest.approx(1.0)
    assert real["clisi"] == pytest.approx(1.0, abs=1e-6)
    assert shuffled["nmi"] < 0.05


def test_batch_metrics_deterministic(scib_scores):
    assert scib_scores["again"] == scib_scores["mixed"]
    np.testing.assert_array_equal(scib_scores["input_after"], cells(0.0)[0])  # the caller's array is untouched


@pytest.mark.parametrize(("batch", "kwargs", "message"), [
    (np.repeat(["b0"], 30), {}, "batch: only one distinct value"),
    (np.repeat(["b0", "b1"], 10), {}, "batch: expected 30 entries"),
    (np.repeat(["b0", None], 15), {}, "batch: missing value"),
    (np.repeat(["b0", "b1"], 15), {"n_neighbors": 30}, "smaller than the number of cells (30)"),
    (np.repeat(["b0", "b1"], 15), {"n_neighbors": 1}, "n_neighbors: must be an integer >= 2"),
    (np.repeat(["b0", "b1"], 15), {"labels": np.repeat(["T"], 30)}, "labels: only one distinct value"),
])
def test_batch_metrics_input_errors(batch, kwargs, message):
    x = np.random.default_rng(0).normal(size=(30, 4))
    with pytest.raises(CMRCNetError) as err:
        batch_metrics(x, batch, **kwargs)
    assert message in str(err.value)


def test_batch_metrics_rejects_nan():
    x = np.random.default_rng(0).normal(size=(30, 4))
    x[5, 0] = np.inf
    with pytest.raises(CMRCNetError, match="first in row 5"):
        batch_metrics(x, np.repeat(["b0", "b1"], 15))
