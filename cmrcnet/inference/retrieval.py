"""Exact top-k cosine retrieval in bounded memory, and expression predicted as the mean of the neighbours.

Retrieval models (CMRCNet, BLEEP) predict a test spot's expression by embedding its patch with the image
tower, embedding every training spot's expression with the gene tower, and averaging the expression of the
k training spots whose embeddings are most cosine-similar (the paper uses k = 50, 250, 500).

Why blocked: the dense way (the whole queries x references similarity matrix, then a sort per row) needs
N x M floats plus the sort's output; for 1e4 test spots and 1e6 training spots that is 40 GB before sorting.
`topk_cosine` walks the queries in blocks and, within each, the references in blocks, and keeps a running
top-k per query, so its working memory is O(query_block x (reference_block + k)) whatever N and M are. The
result is exact, not approximate, up to the rounding of float32 products (see "Order and ties").

How (per query block): the first reference block goes through a selection of its k best per query; from then on
each query has a k-th best similarity so far, and only similarities strictly above it can still enter its top k.
Those are found with one compare per block on the CPU, and on a GPU with a cheap screen (the maximum of every run
of 64 columns, then the passing runs entry by entry); they are pooled, and merged into the running top-k by
another selection once k or more have been pooled. The running top-k is kept unordered (a selection, numpy's
`argpartition`, costs about a quarter of a stable sort) but for its k-th value, the threshold; it is sorted once,
at the end. Late in a long reference set almost nothing passes, so the cost approaches that of the matrix product
alone.

On the CPU the compare, the search for the passing entries and the selections run on numpy views of the same
memory (no copies): torch's CPU `nonzero` costs ~6 ns per entry of a bool mask and a broadcast `torch.gt` ~2 ns,
against ~0.3-0.5 and ~0.5 ns for `np.flatnonzero` and `np.greater` (2-core EPYC, torch 2.14). With k = 500 and
1e6 references the numpy compare cut the search's cost beyond the matrix product by about 30 %, the selections
instead of stable sorts by more (docs/benchmarks.md, "Retrieval"). On CUDA the same steps stay in torch.

Order and ties: neighbours come sorted by decreasing similarity; equal similarities are ordered by increasing
reference index (the lower index wins a place in the top k), as a stable descending sort of each row of the
full similarity matrix S = normalize(Q) @ normalize(R).T would order them. The promise, precisely: each returned
similarity is the float32 product of that query and that reference, and equals the dense S at the same rank
to within float32 rounding (a BLAS may round one product differently, by about one ulp, when it is computed
in a block of another shape; seen with MKL/oneDNN). So neighbours whose similarities lie within that rounding
(1e-6 here) of each other may come in another order, or trade places at the k-th position; copies of one
reference row are such neighbours. Nothing else can differ. Query blocks are made equal in size rather than
leaving a small remainder, which makes such differences rarer.

Memory (bytes), on the device that does the work:
- normalised float32 copies of the inputs: 4 (N + M) D (the inputs themselves are not modified);
- working set per query block: 5 query_block x reference_block (similarities + a bool mask, both reused)
  + about 100 query_block x k (top-k candidates, pooled candidates, running top-k, selections);
- results on the CPU: 12 N k (float32 similarities + int64 indices).
With the CPU defaults (512 x 8192 blocks) and k = 500 the working set is ~50 MB; with the CUDA defaults
(4096 x 32768) ~0.8 GB of GPU memory.

Zero vectors have no direction: they are given similarity 0 to everything (as `torch.nn.functional.normalize`
does) rather than an error. Rows are scaled by their largest magnitude before their norm is taken, so finite
rows whose norm overflows float32 (entries near 3e38) keep their direction.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from cmrcnet.errors import input_error

# Block sizes (query_block, reference_block) by device type. On a 2-core CPU, blocks from 256 x 4096 to
# 2048 x 16384 ran within 10 % of each other. With k = 500 and 1e6 references, 512 x 2048 (4 MB of
# similarities, cache-resident for the screen) cost more than 512 x 8192 (more blocks and merges, each with a
# fixed cost), 512 x 16384 the same. On a GPU larger blocks keep it busy (4096 x 32768 float32 is 512 MiB;
# not tuned).
DEFAULT_BLOCKS = {"cpu": (512, 8192), "cuda": (4096, 32768)}
_CHECK_ROWS = 65536  # rows per chunk when checking inputs for NaN/inf (bounded temporary)
_EPS = 1e-12  # as torch.nn.functional.normalize
_CHUNK = 64  # columns screened together by their maximum in the threshold phase


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_tensor(x, name: str) -> torch.Tensor:
    """A 2-D real tensor view of `x` (numpy arrays are not copied here), checked finite chunk by chunk."""
    if not isinstance(x, torch.Tensor):
        array = np.asarray(x)
        if array.dtype == object:
            raise input_error(name, f"expected a 2-D numeric array, got {type(x).__name__}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise input_error(name, f"expected a numeric array, got dtype {array.dtype}")
        with warnings.catch_warnings():  # read-only arrays are fine: they are only ever copied
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
    if x.ndim != 2:
        raise input_error(name, f"expected a 2-D array (rows x dimensions), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise input_error(name, f"complex values ({x.dtype}) are not supported")
    if x.shape[1] == 0:
        raise input_error(name, "has 0 dimensions")
    if x.is_floating_point():
        for start in range(0, x.shape[0], _CHECK_ROWS):
            chunk = x[start:start + _CHECK_ROWS]
            # A row sum is NaN/inf whenever the row holds a NaN/inf; a fast pass, confirmed exactly when it fires
            # (the sum of large finite values can overflow).
            if bool(torch.isfinite(chunk.sum(dim=1)).all()):
                continue
            bad = ~torch.isfinite(chunk).all(dim=1)
            if bool(bad.any()):
                row = start + int(torch.nonzero(bad)[0, 0])
                raise input_error(name, f"contain NaN or infinite values (first in row {row})")
    return x


def _normalised(x: torch.Tensor, device: torch.device, rows: int = _CHECK_ROWS) -> torch.Tensor:
    """An L2-normalised float32 copy of `x` on `device`, normalised in place chunk by chunk (one copy in all)."""
    out = x.to(device=device, dtype=torch.float32, copy=True).contiguous()
    for chunk in out.split(rows):
        # scaled by the largest magnitude first: the norm of a finite row can overflow float32, never this one's
        chunk.div_(chunk.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
        chunk.div_(torch.linalg.vector_norm(chunk, dim=1, keepdim=True).clamp_min(_EPS))
    return out


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise input_error(name, f"must be an integer, got {value!r}")
    if value < 1:
        raise input_error(name, f"must be at least 1, got {value}")
    return int(value)


def _best_k(values: torch.Tensor, indices: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries of every row (higher value first, equal values: lower index first), unordered but for
    one thing: column k - 1 holds the k-th best, the row's threshold for the rest of the search.

    `indices` are the reference indices of `values`' columns (None: the column numbers). Fewer than k columns
    are returned whole (a copy). Why unordered: a selection (numpy's introselect, O(width) per row)
    costs a third of a sort, and the search needs the order only once, at the end (`_ordered`). A selection
    picks arbitrarily among values equal to the k-th; rows where such a value is left out are redone by an
    exact sort on (value, index), so the lower index wins there as everywhere.
    """
    n, width = values.shape
    if indices is None:
        indices = torch.arange(width, device=values.device).expand(n, width)
    if width < k:  # no threshold yet (fewer than k references seen)
        return values.clone(), indices.clone()
    if values.device.type == "cpu":
        order = torch.from_numpy(np.argpartition(-values.numpy(), k - 1, axis=1))
    else:
        order = torch.topk(values, width, dim=1, sorted=True).indices  # k-th at column k - 1, as a selection
    chosen = order[:, :k]
    best_values, best_indices = values.gather(1, chosen), indices.gather(1, chosen)
    kth = best_values[:, k - 1:k]
    tied = (values == kth).sum(dim=1) > (best_values == kth).sum(dim=1)  # a value equal to the k-th left out
    if bool(tied.any()):
        rows = torch.nonzero(tied).squeeze(1)
        exact = _sort_order(values[rows], indices[rows])[:, :k]
        best_values[rows] = values[rows].gather(1, exact)
        best_indices[rows] = indices[rows].gather(1, exact)
    return best_values, best_indices


def _sort_order(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Column order of every row by decreasing value, equal values by increasing index (computed on the CPU).

    numpy's default sort (vectorised where the CPU allows) orders the values; the rare rows with equal values
    are redone by a lexicographic sort on (value, index).
    """
    neg = -values.cpu().numpy()
    order = np.argsort(neg, axis=1)
    ranked = np.take_along_axis(neg, order, axis=1)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.lexsort((indices.cpu().numpy()[tied], neg[tied]), axis=1)
    return torch.from_numpy(order).to(values.device)


def _ordered(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by decreasing value, equal values by increasing index: the search's final order."""
    order = _sort_order(values, indices)
    return values.gather(1, order), indices.gather(1, order)


def _hits(sims: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the entries of `sims` strictly above their row's `threshold`, in row-major order.

    Late in a search few entries pass, so the block is first screened by the maximum of each run of `_CHUNK`
    columns (a fast reduction) and only the runs whose maximum passes are compared entry by entry; when many
    runs pass, one compare over the whole block (into the reusable bool buffer `mask`) is cheaper. On the CPU
    the work is done by `_flat_hits` on numpy views of the same memory.
    """
    n, m = sims.shape
    if sims.device.type == "cpu":
        flat = torch.from_numpy(_flat_hits(sims.numpy(), threshold.numpy(), mask.numpy()))
        return flat // m, flat % m
    if m % _CHUNK == 0:
        runs = sims.view(n, m // _CHUNK, _CHUNK)
        passing = torch.nonzero(runs.amax(dim=2) > threshold)
        if passing.shape[0] * 4 <= n * (m // _CHUNK):
            rows, run = passing[:, 0], passing[:, 1]
            inner = torch.nonzero(runs[rows, run] > threshold[rows])
            return rows[inner[:, 0]], run[inner[:, 0]] * _CHUNK + inner[:, 1]
    hits = torch.nonzero(torch.gt(sims, threshold, out=mask))
    return hits[:, 0], hits[:, 1]


def _flat_hits(values: np.ndarray, cut: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`_hits` on the CPU, as sorted flat (row-major) indices into `values`: one compare over the whole block
    into the reusable bool buffer `mask`, then `np.flatnonzero`.

    numpy, not torch: `np.flatnonzero` is an order of magnitude faster than torch's CPU `nonzero` (about 0.5
    against 6 ns per entry on a 2-core EPYC). No screen by run maxima here: on a 512 x 8192 block the plain
    compare took 3.5 ms whether 1, 8 or 50 entries per row passed, a screen by strided runs of 64 columns 3.6,
    9.6 and 13 ms (its gather of the passing runs is scattered in memory), by adjacent runs more still.
    """
    return np.flatnonzero(np.greater(values, cut, out=mask))


def _above_threshold(
    sims: torch.Tensor, threshold: torch.Tensor, limit: int, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entries of each row of `sims` strictly above that row's `threshold`, in increasing column order.

    Returns (values, columns) padded to the longest row with -inf (which sorts after every real similarity),
    or None when some row has more than `limit` of them (then `_best_k` is cheaper). Entries equal
    to the threshold are left out on purpose: the threshold is the similarity of a neighbour already found,
    which has a lower index, so they cannot enter the top k. `mask` is a reusable bool buffer shaped as `sims`.
    """
    n, m = sims.shape
    if sims.device.type == "cpu":  # numpy's flat indexing: torch's 2-d scatter on the CPU cost ~10 % of a search
        flat = _flat_hits(sims.numpy(), threshold.numpy(), mask.numpy())
        rows = flat // m
        counts = np.bincount(rows, minlength=n)
        longest = int(counts.max()) if flat.size else 0
        if longest > limit:
            return None
        position = np.arange(flat.size) - (np.cumsum(counts) - counts)[rows]
        slots = rows * longest + position
        values = np.full(n * longest, -np.inf, dtype=np.float32)
        values[slots] = sims.numpy().reshape(-1)[flat]
        columns = np.zeros(n * longest, dtype=np.int64)
        columns[slots] = flat - rows * m
        return torch.from_numpy(values.reshape(n, longest)), torch.from_numpy(columns.reshape(n, longest))
    rows, cols = _hits(sims, threshold, mask)
    if rows.shape[0] == 0:
        return sims.new_empty((n, 0)), cols.new_empty((n, 0))
    counts = torch.bincount(rows, minlength=n)
    longest = int(counts.max())
    if longest > limit:
        return None
    position = torch.arange(rows.shape[0], device=sims.device) - (torch.cumsum(counts, 0) - counts)[rows]
    values = torch.full((n, longest), float("-inf"), dtype=sims.dtype, device=sims.device)
    values[rows, position] = sims[rows, cols]
    columns = torch.zeros((n, longest), dtype=torch.int64, device=sims.device)
    columns[rows, position] = cols
    return values, columns


def _search_block(q: torch.Tensor, refs: torch.Tensor, k: int, rb: int, sims_buf: torch.Tensor,
                  mask_buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one block of normalised queries against all normalised references, sorted.

    Block by block: the first blocks go through a selection (`_best_k`) until every query has k neighbours;
    after that only similarities above the query's current k-th similarity are kept (`_above_threshold`, far
    cheaper than a selection), and the kept candidates are pooled and merged into the running top-k (another
    selection) once they number k or more, so merges are paid rarely. The threshold is stale between merges,
    which only lets a few more candidates through; it never drops a true neighbour.
    """
    nq, m = q.shape[0], refs.shape[0]
    best: tuple[torch.Tensor, torch.Tensor] | None = None  # the running top-k (`_best_k`'s layout)
    pool: list[tuple[torch.Tensor, torch.Tensor]] = []
    pooled = 0
    for r0 in range(0, m, rb):
        r = refs[r0:r0 + rb]
        shape = (nq, r.shape[0])
        sims = torch.mm(q, r.T, out=sims_buf[:nq * shape[1]].view(shape))
        found = None
        if best is not None and best[0].shape[1] == k:
            found = _above_threshold(sims, best[0][:, k - 1:k], k, mask_buf[:nq * shape[1]].view(shape))
            if found is not None and found[0].shape[1] == 0:
                continue
        values, columns = _best_k(sims, None, k) if found is None else found
        pool.append((values, columns + r0))
        pooled += values.shape[1]
        if best is None or best[0].shape[1] < k or pooled >= k:
            best = _merged(pool if best is None else [best, *pool], k)
            pool, pooled = [], 0
    return _ordered(*(_merged([best, *pool], k) if pool else best))


def _merged(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the concatenated (values, indices) parts (`_best_k`'s layout)."""
    return _best_k(torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1), k)


def topk_cosine(
    queries,
    references,
    k: int,
    *,
    query_block: int | None = None,
    reference_block: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of every query among the references, in blocks of bounded memory.

    `queries` (N, D) and `references` (M, D) are torch tensors or numpy arrays (any real dtype, any device;
    they are L2-normalised copies in float32 on `device`, default CUDA when available). Returns CPU tensors
    `(similarities float32 (N, k), indices int64 (N, k))`, each row sorted by decreasing similarity, equal
    similarities by increasing reference index. `query_block` / `reference_block` default to
    `DEFAULT_BLOCKS[device.type]`; the working set is about 5 query_block x reference_block + 100 query_block x k
    bytes (see the module docstring). Raises CMRCNetError for k < 1 or k > M, mismatched dimensions, or NaN/inf
    in either input (the message names which).
    """
    dev = _device(device)
    k = _positive_int(k, "k")
    queries = _as_tensor(queries, "queries")
    references = _as_tensor(references, "references")
    n, d = queries.shape
    m, d_ref = references.shape
    if d != d_ref:
        raise input_error("references", f"have {d_ref} dimensions but the queries have {d}")
    if k > m:
        raise input_error("k", f"{k} neighbours requested but there are only {m} references")
    default_q, default_r = DEFAULT_BLOCKS.get(dev.type, DEFAULT_BLOCKS["cpu"])
    qb = _positive_int(default_q if query_block is None else query_block, "query_block")
    rb = _positive_int(default_r if reference_block is None else reference_block, "reference_block")
    # Equal query blocks (1025 queries in blocks of 512 -> 342, 342, 341): no tiny trailing block, which would
    # be slow and could take another BLAS kernel than the rest.
    qb, rb = -(-n // -(-n // qb)) if n else 1, min(rb, m)

    out_sims = torch.empty((n, k), dtype=torch.float32)
    out_idx = torch.empty((n, k), dtype=torch.int64)
    if n == 0:
        return out_sims, out_idx
    q_all = _normalised(queries, dev)
    r_all = _normalised(references, dev)
    sims_buf = torch.empty(qb * rb, dtype=torch.float32, device=dev)  # reused for every similarity block
    mask_buf = torch.empty(qb * rb, dtype=torch.bool, device=dev)

    starts = range(0, n, qb)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, unit="block", desc=f"top-{k} of {m} references")
    with torch.inference_mode():
        for q0 in starts:
            best_sims, best_idx = _search_block(q_all[q0:q0 + qb], r_all, k, rb, sims_buf, mask_buf)
            out_sims[q0:q0 + qb] = best_sims.cpu()
            out_idx[q0:q0 + qb] = best_idx.cpu()
    return out_sims, out_idx


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except ValueError:  # ragged nested lists: numpy refuses to make an array of them
        raise input_error(name, f"expected a dense 2-D array, got a ragged {type(x).__name__}") from None


def _prefix_means(
    indices: np.ndarray,
    similarities: np.ndarray | None,
    values: np.ndarray,
    ks: list[int],
    weighted: bool,
    block_elements: int,
) -> dict[int, np.ndarray]:
    """Mean (or similarity-weighted mean) of the first k neighbours' values, for every k in sorted `ks`.

    One gather of the first max(ks) neighbours per block of queries; sums are accumulated segment by segment
    (0..k1, k1..k2, ...) in float64, so every k costs one pass. A block holds at most `block_elements` gathered
    values (queries x max(ks) x genes).
    """
    n, g = indices.shape[0], values.shape[1]
    kmax = ks[-1]
    out_dtype = np.float64 if values.dtype == np.float64 else np.float32
    out = {k: np.empty((n, g), dtype=out_dtype) for k in ks}
    rows = max(1, block_elements // max(1, kmax * g))
    bounds = list(zip([0, *ks[:-1]], ks))
    for q0 in range(0, n, rows):
        q1 = min(n, q0 + rows)
        gathered = values[indices[q0:q1, :kmax]]  # (b, kmax, g)
        plain = np.zeros((q1 - q0, g))
        if weighted:
            weights = np.clip(similarities[q0:q1, :kmax].astype(np.float64), 0.0, None)
            weighted_sum = np.zeros((q1 - q0, g))
            weight_total = np.zeros(q1 - q0)
        for lo, hi in bounds:
            segment = gathered[:, lo:hi]
            plain += segment.sum(axis=1, dtype=np.float64)
            mean = plain / hi
            if weighted:
                w = weights[:, lo:hi]
                weighted_sum += np.matmul(w[:, None, :], segment.astype(np.float64, copy=False))[:, 0]
                weight_total += w.sum(axis=1)
                positive = weight_total > 0
                # All weights 0 (no neighbour with positive similarity): fall back to the plain mean.
                mean = np.where(positive[:, None], weighted_sum / np.where(positive, weight_total, 1.0)[:, None], mean)
            out[hi][q0:q1] = mean
    return out


def _check_neighbours(indices, similarities, reference_values, weighted: bool):
    idx = _as_numpy(indices, "indices")
    values = _as_numpy(reference_values, "reference_values")
    if values.ndim != 2 or values.dtype == object:
        raise input_error("reference_values", f"expected a dense 2-D array (references x genes), got "
                                              f"{type(reference_values).__name__} of shape {np.shape(values)}")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool) or np.iscomplexobj(values):
        raise input_error("reference_values", f"expected real numbers, got dtype {values.dtype}")
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise input_error("indices", f"expected a 2-D array (queries x k) with k >= 1, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise input_error("indices", f"expected integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= values.shape[0]):
        raise input_error("indices", f"out of range for {values.shape[0]} references "
                                     f"(min {idx.min()}, max {idx.max()})")
    sims = None
    if weighted:
        if similarities is None:
            raise input_error("similarities", "required for the weighted mean")
        sims = _as_numpy(similarities, "similarities")
        if sims.shape != idx.shape:
            raise input_error("similarities", f"shape {sims.shape} differs from the indices' {idx.shape}")
        if not np.isfinite(sims).all():
            raise input_error("similarities", "contain NaN or infinite values")
    return idx, sims, values


def neighbour_mean(
    indices,
    similarities,
    reference_values,
    *,
    weighted: bool = False,
    block_elements: int = 1 << 23,
) -> np.ndarray:
    """Predicted values (N, G): the mean of `reference_values` (M, G) over each query's neighbours.

    `indices` (N, k) index rows of `reference_values` (as `topk_cosine` returns them). With `weighted=True` the
    mean is weighted by the similarities clipped at 0 (neighbours with negative cosine similarity get no weight);
    a query whose weights are all 0 gets the plain mean. `similarities` (N, k) may be None when not weighted.
    Queries are processed in blocks so that at most `block_elements` neighbour values (block x k x G) are
    gathered at once. Output dtype: float64 for float64 values, else float32; sums are accumulated in float64.
    """
    idx, sims, values = _check_neighbours(indices, similarities, reference_values, weighted)
    k = idx.shape[1]
    return _prefix_means(idx, sims, values, [k], weighted, _positive_int(block_elements, "block_elements"))[k]


def predict_by_retrieval(
    query_emb,
    reference_emb,
    reference_values,
    ks: Iterable[int],
    *,
    weighted: bool = False,
    device: str | torch.device | None = None,
    query_block: int | None = None,
    reference_block: int | None = None,
    block_elements: int = 1 << 23,
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """Expression predicted by retrieval for every k in `ks`: {k: (N, G) array}.

    One exact top-max(ks) search (`topk_cosine`); the top-k for a smaller k is a prefix of it because the
    neighbours are sorted, so every k is averaged from the same search (`neighbour_mean` semantics, including
    `weighted`). `reference_values` (M, G) are the expression values of the M reference spots whose embeddings
    are `reference_emb` (M, D).
    """
    ks = list(ks) if not isinstance(ks, numbers.Integral) else [ks]
    if not ks:
        raise input_error("ks", "no neighbour counts given")
    ks = sorted({_positive_int(k, "ks") for k in ks})
    reference_values = _as_numpy(reference_values, "reference_values")
    n_refs, values_rows = len(reference_emb), (reference_values.shape[0] if reference_values.ndim else 0)
    if values_rows != n_refs:
        raise input_error("reference_values", f"have {values_rows} rows but there are {n_refs} reference embeddings")
    sims, idx = topk_cosine(query_emb, reference_emb, ks[-1], query_block=query_block,
                            reference_block=reference_block, device=device, progress=progress)
    idx_np, sims_np, values = _check_neighbours(idx, sims, reference_values, weighted)
    return _prefix_means(idx_np, sims_np, values, ks, weighted, _positive_int(block_elements, "block_elements"))
