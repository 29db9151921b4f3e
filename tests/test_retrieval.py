"""Blocked exact top-k retrieval against a brute-force reference, and neighbour-mean predictions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmrcnet.errors import CMRCNetError
from cmrcnet.inference import retrieval
from cmrcnet.inference.retrieval import _hits, neighbour_mean, predict_by_retrieval, topk_cosine


def brute_force(queries, references, k):
    """The whole similarity matrix, then a stable descending sort: ties go to the lower reference index."""
    q = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1)
    r = F.normalize(torch.as_tensor(np.asarray(references), dtype=torch.float32), dim=1)
    sims, idx = torch.sort(q @ r.T, dim=1, descending=True, stable=True)
    return sims[:, :k], idx[:, :k]


def gaussian(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


def assert_same_neighbours(sims, idx, want_sims, want_idx):
    """Equal to the brute force. On random floats a BLAS may round a product differently in the last bit
    depending on the block shape (e.g. single-row blocks); then, and only then, neighbours whose similarities
    are within 1e-6 of each other may come in another order, so such swaps are the only difference allowed."""
    torch.testing.assert_close(sims, want_sims, rtol=0, atol=1e-6)
    differ = idx != want_idx
    near_tie = torch.zeros_like(differ)
    close = (want_sims[:, 1:] - want_sims[:, :-1]).abs() < 1e-6
    near_tie[:, 1:] |= close
    near_tie[:, :-1] |= close
    near_tie[:, -1] = True  # the k-th place may go to a near-tied (k+1)-th
    assert near_tie[differ].all()
    assert differ.float().mean() < 0.01


def lattice(n, d, seed):
    """Vectors of +-1/4 in 16-d: unit norm exactly, dot products exact multiples of 1/16, so ties are exact."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, d), generator=g) * 2 - 1).float() * 0.25


BLOCKS = [(None, None), (7, 13), (64, 100), (33, 128), (1, 1000), (1000, 5000)]


@pytest.mark.parametrize(("query_block", "reference_block"), BLOCKS)
@pytest.mark.parametrize("k", [1, 25, 130])
def test_topk_equals_brute_force(query_block, reference_block, k):
    queries, references = gaussian(90, 1100, 24, seed=k)
    sims, idx = topk_cosine(queries, references, k, query_block=query_block, reference_block=reference_block)
    want_sims, want_idx = brute_force(queries, references, k)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (90, k)
    assert_same_neighbours(sims, idx, want_sims, want_idx)
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_long_reference_set_uses_the_screen_and_stays_exact():
    # Many reference blocks of a multiple of 64 columns: the threshold phase and the run screen do most work.
    queries, references = gaussian(40, 6000, 16, seed=3)
    sims, idx = topk_cosine(queries, references, 10, query_block=16, reference_block=256)
    assert_same_neighbours(sims, idx, *brute_force(queries, references, 10))


@pytest.mark.parametrize("few", [True, False])
def test_hits_screen_matches_a_plain_compare(few):
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(37, 640, generator=g)
    threshold = torch.full((37, 1), 0.995 if few else 0.3)
    threshold[5] = 2.0  # a row with no hits at all
    rows, cols = _hits(sims, threshold, torch.empty(37, 640, dtype=torch.bool))
    want = torch.nonzero(sims > threshold)
    assert torch.equal(rows, want[:, 0]) and torch.equal(cols, want[:, 1])


@pytest.mark.parametrize(("query_block", "reference_block"), [(None, None), (5, 7), (16, 64), (50, 333)])
@pytest.mark.parametrize("k", [1, 40, 150])
def test_exact_ties_go_to_the_lower_index(query_block, reference_block, k):
    data = lattice(560, 16, seed=1)  # 33 possible similarities over 500 references: ties everywhere
    queries, references = data[:60], data[60:]
    sims, idx = topk_cosine(queries, references, k, query_block=query_block, reference_block=reference_block)
    want_sims, want_idx = brute_force(queries, references, k)
    assert torch.equal(sims, want_sims)
    assert torch.equal(idx, want_idx)


@pytest.mark.parametrize(("query_block", "reference_block"), [(None, None), (8, 30), (3, 64)])
def test_duplicate_reference_rows(query_block, reference_block):
    """The module's promise, exactly: similarities equal the dense ones up to float32 rounding of the products,
    and only neighbours within that rounding of each other (here the copies of one row) may trade places."""
    queries, base = gaussian(30, 80, 12, seed=5)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(6))
    references = base.repeat(5, 1)[order]  # every row 5 times, scattered
    sims, idx = topk_cosine(queries, references, 23, query_block=query_block, reference_block=reference_block)
    want_sims, want_idx = brute_force(queries, references, 23)
    torch.testing.assert_close(sims, want_sims, rtol=0, atol=1e-6)
    exact = (F.normalize(queries.double(), dim=1) @ F.normalize(references.double(), dim=1).T)
    # every returned similarity belongs to its index, and each rank's neighbour is as good as the dense one's
    torch.testing.assert_close(sims.double(), exact.gather(1, idx), rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.gather(1, idx), exact.gather(1, want_idx), rtol=0, atol=1e-6)
    assert all(len(set(row.tolist())) == 23 for row in idx)
    # away from the rounding zone the neighbours are the dense ones: the same base rows, rank by rank
    assert torch.equal(order[idx] % 80, order[want_idx] % 80)
    # within each run of bit-equal similarities the indices increase
    same = sims[:, 1:] == sims[:, :-1]
    assert (idx[:, 1:][same] > idx[:, :-1][same]).all()


def test_k_equal_to_the_number_of_references():
    queries, references = gaussian(11, 57, 8, seed=2)
    sims, idx = topk_cosine(queries, references, 57, query_block=4, reference_block=10)
    want_sims, want_idx = brute_force(queries, references, 57)
    assert torch.equal(idx, want_idx)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(57).expand(11, 57))
    torch.testing.assert_close(sims, want_sims, rtol=0, atol=1e-6)


def test_numpy_inputs_and_scale_invariance():
    queries, references = gaussian(20, 300, 10, seed=4)
    sims, idx = topk_cosine(queries, references, 15)
    np_sims, np_idx = topk_cosine(queries.numpy().astype(np.float64), (3.0 * references).numpy(), 15)
    assert torch.equal(idx, np_idx)
    torch.testing.assert_close(sims, np_sims, rtol=0, atol=1e-6)
    assert isinstance(np_sims, torch.Tensor) and np_sims.device.type == "cpu"


def test_no_queries_and_zero_vectors():
    _, references = gaussian(1, 50, 6, seed=0)
    sims, idx = topk_cosine(np.zeros((0, 6), np.float32), references, 5)
    assert sims.shape == (0, 5) and idx.shape == (0, 5)
    sims, idx = topk_cosine(np.zeros((2, 6), np.float32), references, 5, progress=True)
    assert (sims == 0).all() and torch.equal(idx, torch.arange(5).expand(2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    queries, references = gaussian(300, 5000, 64, seed=8)
    cpu = topk_cosine(queries, references, 50, device="cpu")
    gpu = topk_cosine(queries, references, 50, device="cuda")
    assert gpu[0].device.type == "cpu"
    torch.testing.assert_close(gpu[0], cpu[0], rtol=0, atol=1e-5)
    assert (gpu[1] == cpu[1]).float().mean() > 0.99  # TF32/reduction order may swap near-ties


@pytest.mark.parametrize(
    ("queries", "references", "k", "match"),
    [
        (np.ones((3, 4)), np.ones((5, 4)), 6, "^k: 6 neighbours requested but there are only 5 references"),
        (np.ones((3, 4)), np.ones((5, 4)), 0, "^k: must be at least 1"),
        (np.ones((3, 4)), np.ones((5, 4)), 2.5, "^k: must be an integer"),
        (np.ones((3, 4)), np.ones((5, 3)), 2, "^references: have 3 dimensions but the queries have 4"),
        (np.ones(4), np.ones((5, 4)), 2, "^queries: expected a 2-D array"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones((5, 2)), 2, r"^queries: contain NaN .* \(first in row 0\)"),
        (np.ones((2, 2)), np.array([[1.0, 0.0]] * 3 + [[np.inf, 1.0]]), 2, r"^references: contain NaN .* row 3"),
    ],
)
def test_topk_errors(queries, references, k, match):
    with pytest.raises(CMRCNetError, match=match):
        topk_cosine(queries, references, k)


def test_large_finite_values_are_not_mistaken_for_infinite():
    big = np.full((3, 4), 3e38, dtype=np.float32)  # row sums and norms overflow float32, values are finite
    big[1] = [-3e38, 3e38, 3e38, 3e38]
    sims, idx = topk_cosine(big, big, 3)
    # rows 0 and 2 point the same way (cosine 1), row 1 at 0.5 from them: not zero vectors
    torch.testing.assert_close(sims[0], torch.tensor([1.0, 1.0, 0.5]))
    assert idx[0].tolist() == [0, 2, 1] and idx[1].tolist() == [1, 0, 2]
    torch.testing.assert_close(sims[1], torch.tensor([1.0, 0.5, 0.5]))


def test_neighbour_mean_against_numpy():
    rng = np.random.default_rng(0)
    values = rng.poisson(3.0, size=(200, 7)).astype(np.float32)
    idx = rng.integers(0, 200, size=(33, 12))
    want = values[idx].mean(axis=1, dtype=np.float64)
    for block_elements in (1, 100, 1 << 23):  # one query per block, a few, all
        got = neighbour_mean(idx, None, values, block_elements=block_elements)
        assert got.dtype == np.float32 and got.shape == (33, 7)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(neighbour_mean(torch.from_numpy(idx), None, values.astype(np.float64)), want, rtol=1e-12)


def test_weighted_neighbour_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(50, 4))
    idx = rng.integers(0, 50, size=(6, 5))
    sims = rng.uniform(-0.5, 1.0, size=(6, 5))
    sims[2] = [-0.3, -0.1, 0.0, -0.9, -0.2]  # no positive weight: plain mean
    w = np.clip(sims, 0, None)
    want = np.einsum("nk,nkg->ng", w, values[idx]) / np.where(w.sum(1) > 0, w.sum(1), 1)[:, None]
    want[2] = values[idx[2]].mean(axis=0)
    got = neighbour_mean(idx, sims, values, weighted=True, block_elements=40)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, neighbour_mean(idx, sims, values))


def test_neighbour_mean_errors():
    values = np.ones((10, 3))
    with pytest.raises(CMRCNetError, match="^indices: out of range for 10 references"):
        neighbour_mean(np.array([[0, 10]]), None, values)
    with pytest.raises(CMRCNetError, match="^similarities: required for the weighted mean"):
        neighbour_mean(np.array([[0, 1]]), None, values, weighted=True)
    with pytest.raises(CMRCNetError, match="^similarities: shape"):
        neighbour_mean(np.array([[0, 1]]), np.ones((1, 3)), values, weighted=True)
    with pytest.raises(CMRCNetError, match="^reference_values: expected a dense 2-D array"):
        neighbour_mean(np.array([[0, 1]]), None, np.ones(10))


@pytest.mark.parametrize("weighted", [False, True])
def test_predict_by_retrieval_prefixes_equal_separate_searches(weighted):
    data = lattice(260, 16, seed=9)  # exact ties, so the prefix property is tested where it is hardest
    queries, references = data[:40], data[40:]
    values = np.random.default_rng(2).gamma(2.0, size=(220, 9)).astype(np.float32)
    preds = predict_by_retrieval(queries, references, values, [60, 5, 20, 60], weighted=weighted,
                                 query_block=16, reference_block=50)
    assert list(preds) == [5, 20, 60]
    for k, pred in preds.items():
        sims, idx = topk_cosine(queries, references, k)
        want = neighbour_mean(idx, sims, values, weighted=weighted)
        assert pred.shape == (40, 9) and pred.dtype == np.float32
        np.testing.assert_allclose(pred, want, rtol=1e-6)


def test_predict_by_retrieval_errors():
    emb = np.ones((5, 3))
    with pytest.raises(CMRCNetError, match="^ks: no neighbour counts given"):
        predict_by_retrieval(emb, emb, np.ones((5, 2)), [])
    with pytest.raises(CMRCNetError, match="^ks: must be at least 1"):
        predict_by_retrieval(emb, emb, np.ones((5, 2)), [0, 2])
    with pytest.raises(CMRCNetError, match="^reference_values: have 4 rows but there are 5 reference embeddings"):
        predict_by_retrieval(emb, emb, np.ones((4, 2)), [2])
    with pytest.raises(CMRCNetError, match="^k: 6 neighbours requested but there are only 5 references"):
        predict_by_retrieval(emb, emb, np.ones((5, 2)), [2, 6])


# ---- exact behaviour at the edges (each check below was added to kill a surviving mutant; docs/testing.md) ----

def _raises(message):
    """The whole error message, so that a changed name or number in it fails the test."""
    return pytest.raises(CMRCNetError, match=f"^{re.escape(message)}$")


_IDX = np.array([[0, 1], [2, 3]])


@pytest.mark.parametrize(("indices", "similarities", "values", "weighted", "message"), [
    (_IDX, None, np.ones(10), False,
     "reference_values: expected a dense 2-D array (references x genes), got ndarray of shape (10,)"),
    (_IDX, None, np.empty((10, 2), dtype=object), False,
     "reference_values: expected a dense 2-D array (references x genes), got ndarray of shape (10, 2)"),
    (_IDX, None, np.full((10, 2), "a"), False, "reference_values: expected real numbers, got dtype <U1"),
    (_IDX, None, np.ones((10, 2), dtype=complex), False, "reference_values: expected real numbers, got dtype complex128"),
    (np.array([0, 1]), None, np.ones((10, 2)), False,
     "indices: expected a 2-D array (queries x k) with k >= 1, got shape (2,)"),
    (np.zeros((2, 0), dtype=int), None, np.ones((10, 2)), False,
     "indices: expected a 2-D array (queries x k) with k >= 1, got shape (2, 0)"),
    (_IDX.astype(float), None, np.ones((10, 2)), False, "indices: expected integers, got dtype float64"),
    (_IDX, np.array([[0.5, np.nan], [0.1, 0.2]]), np.ones((10, 2)), True, "similarities: contain NaN or infinite values"),
    (_IDX, np.array([[0.5, 0.1], [np.inf, 0.2]]), np.ones((10, 2)), True, "similarities: contain NaN or infinite values"),
])
def test_neighbour_mean_error_messages(indices, similarities, values, weighted, message):
    with _raises(message):
        neighbour_mean(indices, similarities, values, weighted=weighted)


def test_neighbour_mean_one_neighbour_bool_values_and_float64_sums():
    values = np.array([[1.0, 0.0], [2.0, 5.0], [4.0, 1.0]])
    # k = 1: the prediction is the neighbour's own row
    np.testing.assert_array_equal(neighbour_mean(np.array([[2], [0]]), None, values), values[[2, 0]])
    # bool values are real numbers (0/1): the mean is the fraction of True
    flags = np.array([[True, False], [True, True], [False, False]])
    np.testing.assert_allclose(neighbour_mean(np.array([[0, 1, 2]]), None, flags), [[2 / 3, 1 / 3]], rtol=1e-7)
    # float32 values are summed in float64: 1e8 + 1 - 1e8 is 1 (in float32 it would be 0)
    big = np.array([[1e8], [1.0], [-1e8]], dtype=np.float32)
    got = neighbour_mean(np.array([[0, 1, 2]]), None, big)
    assert got.dtype == np.float32 and got[0, 0] == np.float32(1 / 3)
    with _raises("block_elements: must be at least 1, got 0"):
        neighbour_mean(np.array([[0]]), None, values, block_elements=0)


def _emb():
    data = lattice(70, 16, seed=3)
    return data[:10], data[10:], np.random.default_rng(4).gamma(2.0, size=(60, 3))


def test_predict_by_retrieval_defaults_and_single_k(capsys):
    queries, references, values = _emb()
    sims, idx = topk_cosine(queries, references, 7)
    assert not np.allclose(neighbour_mean(idx, sims, values, weighted=True), neighbour_mean(idx, sims, values))
    preds = predict_by_retrieval(queries, references, values, 7)  # one k as a plain integer; unweighted by default
    assert list(preds) == [7]
    np.testing.assert_allclose(preds[7], neighbour_mean(idx, sims, values), rtol=1e-12)
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    predict_by_retrieval(queries, references, values, [7], progress=True)
    assert "top-7 of 60 references" in capsys.readouterr().err


def test_predict_by_retrieval_passes_blocks_and_device_on(monkeypatch):
    queries, references, values = _emb()
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return topk_cosine(*args, **kwargs)

    monkeypatch.setattr(retrieval, "topk_cosine", spy)
    predict_by_retrieval(queries, references, values, [3], query_block=4, reference_block=16, device="cpu")
    assert seen == [{"query_block": 4, "reference_block": 16, "device": "cpu", "progress": False}]


@pytest.mark.parametrize(("values", "kwargs", "message"), [
    (np.float64(1.0), {}, "reference_values: have 0 rows but there are 60 reference embeddings"),
    (None, {"query_block": 0}, "query_block: must be at least 1, got 0"),
    (None, {"reference_block": 0}, "reference_block: must be at least 1, got 0"),
    (None, {"block_elements": 0}, "block_elements: must be at least 1, got 0"),
])
def test_predict_by_retrieval_error_messages(values, kwargs, message):
    queries, references, ref_values = _emb()
    with _raises(message):
        predict_by_retrieval(queries, references, ref_values if values is None else values, [2], **kwargs)


@pytest.mark.parametrize("columns", [640, 650])  # with and without the run screen (runs of 64 columns)
@pytest.mark.parametrize("cut", [0.3, 0.99])  # most runs pass / few pass
def test_hits_with_a_strided_threshold_column(columns, cut):
    """`_hits` reads the threshold as the search passes it, a column view of the running top-k (not contiguous)."""
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(29, columns, generator=g)
    best = torch.rand(29, 5, generator=g) * 0.01 + cut
    threshold = best[:, 4:5]
    assert not threshold.is_contiguous()
    rows, cols = _hits(sims, threshold, torch.empty(29, columns, dtype=torch.bool))
    want = torch.nonzero(sims > threshold)
    assert rows.dtype == cols.dtype == torch.int64
    assert torch.equal(rows, want[:, 0]) and torch.equal(cols, want[:, 1])


@pytest.mark.parametrize("field", ["indices", "reference_values", "similarities"])
def test_ragged_lists_are_refused_by_name(field):
    args = {"indices": [[0, 1], [1, 0]], "similarities": [[0.5, 0.2], [0.4, 0.1]],
            "reference_values": [[1.0, 2.0], [3.0, 4.0]]}
    args[field] = [[1, 0], [1]] if field == "indices" else [[1.0, 2.0], [3.0]]
    with pytest.raises(CMRCNetError, match=f"^{field}: expected a dense 2-D array, got a ragged list$"):
        neighbour_mean(args["indices"], args["similarities"], args["reference_values"], weighted=True)


@pytest.mark.parametrize("width,k", [(40, 40), (41, 40), (300, 17), (8, 1)])
def test_best_k_selects_by_value_then_lower_index_with_the_kth_in_column_k_minus_1(width, k):
    """The search's selection step, on rows full of equal values (8 distinct levels): the chosen set is exactly
    the first k of a lexicographic sort on (-value, index), and column k - 1 holds the k-th value (the threshold
    the search compares against). A selection left arbitrary among ties, or the k-th elsewhere, fails here."""
    from cmrcnet.inference.retrieval import _best_k

    rng = np.random.default_rng(width + k)
    values = torch.from_numpy(rng.integers(0, 8, size=(64, width)).astype(np.float32) / 8)
    indices = torch.from_numpy(np.stack([rng.permutation(1000)[:width] for _ in range(64)]))
    got_v, got_i = _best_k(values, indices, k)
    assert got_v.shape == got_i.shape == (64, k)
    for row in range(64):
        order = np.lexsort((indices[row].numpy(), -values[row].numpy()))[:k]
        assert set(got_i[row].tolist()) == set(indices[row].numpy()[order].tolist())
        assert got_v[row, k - 1] == values[row].numpy()[order[-1]]
        lookup = dict(zip(indices[row].tolist(), values[row].tolist()))
        assert [lookup[i] for i in got_i[row].tolist()] == got_v[row].tolist()


def test_ordered_sorts_by_value_then_lower_index():
    from cmrcnet.inference.retrieval import _ordered

    rng = np.random.default_rng(3)
    values = torch.from_numpy(rng.integers(0, 5, size=(50, 30)).astype(np.float32))
    values[::2] += torch.from_numpy(rng.random((25, 30)).astype(np.float32))  # rows without ties, too
    indices = torch.from_numpy(np.stack([rng.permutation(30) for _ in range(50)]))
    got_v, got_i = _ordered(values, indices)
    for row in range(50):
        order = np.lexsort((indices[row].numpy(), -values[row].numpy()))
        assert got_i[row].tolist() == indices[row].numpy()[order].tolist()
        assert got_v[row].tolist() == values[row].numpy()[order].tolist()


@pytest.mark.parametrize(("queries", "references", "message"), [
    ([[1.0, None], [2.0, 3.0]], np.ones((3, 2)), "queries: expected a 2-D numeric array, got list"),
    (np.ones((2, 2)), np.full((3, 2), "a"), "references: expected a numeric array, got dtype <U1"),
    (np.ones((2, 2), dtype=complex), np.ones((3, 2)), "queries: complex values (torch.complex128) are not supported"),
    (np.ones((2, 2)), np.ones((3, 0)), "references: has 0 dimensions"),
])
def test_topk_input_error_messages(queries, references, message):
    with _raises(message):
        topk_cosine(queries, references, 2)


def test_nan_is_found_past_the_first_check_chunk():
    """Inputs are checked for NaN/inf in chunks of _CHECK_ROWS rows: a NaN in the second chunk is found too (and
    its row named), in an input with far more rows than columns."""
    rows = retrieval._CHECK_ROWS + 5
    queries = np.ones((rows, 2), dtype=np.float32)
    queries[rows - 3, 1] = np.nan
    with _raises(f"queries: contain NaN or infinite values (first in row {rows - 3})"):
        topk_cosine(queries, np.ones((3, 2)), 2)


@pytest.mark.filterwarnings("error")  # a read-only array must not make torch warn
def test_one_query_one_dimension_bool_and_big_endian_inputs():
    """Edge inputs that are valid: a single query, 1-d vectors (cosine = product of signs), bool arrays (0/1),
    big-endian floats (converted to native order), and read-only arrays (no warning)."""
    queries, references = gaussian(1, 40, 5, seed=11)
    sims, idx = topk_cosine(queries, references, 4)
    assert_same_neighbours(sims, idx, *brute_force(queries, references, 4))

    sims, idx = topk_cosine(np.array([[2.0], [-1.0]]), np.array([[-3.0], [0.5], [4.0]]), 3)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2]] and sims.tolist() == [[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]

    flags = np.array([[True, False, True], [False, True, True], [True, True, True]])
    sims, idx = topk_cosine(flags, flags, 1)
    assert idx[:, 0].tolist() == [0, 1, 2]
    torch.testing.assert_close(sims[:, 0], torch.ones(3))

    native = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32)
    big_endian = native.astype(">f4")
    big_endian.flags.writeable = False
    got = topk_cosine(big_endian, big_endian, 3)
    want = topk_cosine(native, native, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    native.flags.writeable = False  # no conversion: torch.from_numpy sees the read-only array itself
    again = topk_cosine(native, native, 3)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])


def test_inputs_are_left_unchanged_and_rows_of_any_scale_are_normalised_alone():
    """The search normalises copies: the caller's float32 arrays and tensors keep their values. Each row is
    scaled by its own largest magnitude before normalising, so a row of 1e-30s beside a row of 1e30s is not
    flushed to a zero vector: every row is its own nearest neighbour, at similarity 1."""
    rng = np.random.default_rng(6)
    data = rng.normal(size=(4, 3)).astype(np.float32) * np.array([[1e30], [1e-30], [1.0], [1e-20]], dtype=np.float32)
    before = data.copy()
    tensor = torch.from_numpy(data.copy())
    sims, idx = topk_cosine(data, tensor, 1)
    np.testing.assert_array_equal(data, before)
    assert torch.equal(tensor, torch.from_numpy(before))
    assert idx[:, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(sims[:, 0], torch.ones(4))


def test_outputs_are_float32_whatever_the_default_dtype():
    """Similarities are float32 (as documented) even when the caller made float64 torch's default dtype."""
    queries, references = gaussian(5, 30, 4, seed=12)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sims, idx = topk_cosine(queries, references, 3)
    finally:
        torch.set_default_dtype(old)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64
    assert_same_neighbours(sims, idx, *brute_force(queries, references, 3))


def test_progress_bar_counts_query_blocks(capsys):
    queries, references = gaussian(9, 30, 4, seed=13)
    topk_cosine(queries, references, 3, query_block=3, progress=True)
    err = capsys.readouterr().err
    assert "top-3 of 30 references" in err and "3/3" in err
    assert re.search(r"[\d.?]+(block/s|s/block)\]", err), err


def test_predict_by_retrieval_names_ragged_reference_values():
    queries, references, _ = _emb()
    with _raises("reference_values: expected a dense 2-D array, got a ragged list"):
        predict_by_retrieval(queries, references, [[1.0, 2.0], [3.0]], [2])
