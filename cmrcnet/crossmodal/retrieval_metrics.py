"""Cross-modal retrieval scores (image <-> expression) over a whole test split, and HESCAPE's in-batch variant.

A test split of N spots gives N true pairs: row i of the image embeddings and row i of the expression
embeddings are the same spot. A query (an image, say) is scored by the rank of its true partner among the
candidates (all expression embeddings) by cosine similarity. HESCAPE reports recall@k within shuffled batches
of the test set, a number that depends on the batch size (fewer candidates, easier retrieval); the whole-split
ranks here depend only on the split.

Rank convention: rank = 1 + the number of candidates whose similarity is strictly greater than the true pair's.
Ties with the true pair therefore count in its favour (an exactly tied candidate does not push it down); for
real-valued embeddings exact ties are rare, and `cmrcnet.inference.retrieval.topk_cosine` (which breaks ties by
the lower index) gives the same recall@k except where they occur. recall@k is the fraction of queries with
rank <= k; for k >= the number of candidates it is 1.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from cmrcnet.errors import input_error

DIRECTIONS = ("img2gene", "gene2img")


def _pair_arrays(image_emb, expr_emb) -> tuple[np.ndarray, np.ndarray]:
    """Both embeddings as finite 2-D float arrays of the same shape (true pairs row by row), N >= 2."""
    arrays = []
    for name, x in (("image_emb", image_emb), ("expr_emb", expr_emb)):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        a = np.asarray(x)
        if a.ndim != 2 or a.shape[1] == 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise input_error(name, f"expected a 2-D numeric array (spots x dimensions), got shape {a.shape}, "
                                    f"dtype {a.dtype}")
        if np.iscomplexobj(a):
            raise input_error(name, f"complex values ({a.dtype}) are not supported")
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            raise input_error(name, f"contains NaN or infinite values (first in row {int(np.argmax(bad))})")
        arrays.append(a)
    image, expr = arrays
    if image.shape != expr.shape:
        raise input_error("expr_emb", f"shape {expr.shape} differs from image_emb's {image.shape} (row i of each "
                                      "must be the same spot)")
    if image.shape[0] < 2:
        raise input_error("image_emb", f"{image.shape[0]} spots: retrieval needs at least 2")
    return image, expr


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise input_error(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise input_error(name, f"must be at least {minimum}, got {value}")
    return int(value)


def _check_ks(ks: Iterable[int]) -> list[int]:
    """Sorted distinct k's, each >= 1 (a single int is accepted)."""
    ks = [ks] if isinstance(ks, numbers.Integral) else list(ks)
    if not ks:
        raise input_error("ks", "no k given")
    return sorted({_positive_int(k, "ks") for k in ks})


def _normalised(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """L2-normalised float32 rows on `device` (a zero row stays zero: similarity 0 to everything)."""
    return F.normalize(torch.as_tensor(x, dtype=torch.float32, device=device), dim=1)


def _ranks(queries: torch.Tensor, candidates: torch.Tensor, block: int) -> np.ndarray:
    """Rank of candidate i for query i, among all candidates, for every i; `block` queries at a time.

    The true similarity is read from the same block product as the others, so every comparison in a row is
    between numbers rounded the same way. Memory: block x N floats, never N x N.
    """
    n = queries.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    with torch.inference_mode():
        for q0 in range(0, n, block):
            sims = queries[q0:q0 + block] @ candidates.T
            rows = torch.arange(sims.shape[0], device=sims.device)
            true = sims[rows, rows + q0].unsqueeze(1)
            ranks[q0:q0 + block] = (1 + (sims > true).sum(dim=1)).cpu().numpy()
    return ranks


def _summaries(ranks: np.ndarray, ks: list[int], prefix: str) -> dict:
    out = {f"{prefix}_recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return out


def pair_ranks(image_emb, expr_emb, *, device: str | torch.device = "cpu", block: int = 4096) -> dict[str, np.ndarray]:
    """Rank of every spot's true partner in both directions: {"img2gene": (N,), "gene2img": (N,)} int64.

    img2gene: query image i among all N expression embeddings; gene2img: query expression i among all N images.
    """
    image, expr = _pair_arrays(image_emb, expr_emb)
    block = _positive_int(block, "block")
    dev = torch.device(device)
    img, gene = _normalised(image, dev), _normalised(expr, dev)
    return {"img2gene": _ranks(img, gene, block), "gene2img": _ranks(gene, img, block)}


def whole_split_retrieval(
    image_emb, expr_emb, ks: Iterable[int] = (1, 5, 10), *, device: str | torch.device = "cpu", block: int = 4096
) -> dict:
    """Recall@k and ranks of the true partner among all N spots of the split, both directions.

    Keys: `{d}_recall@{k}` for every k, `{d}_median_rank`, `{d}_mean_rank` with d in "img2gene", "gene2img",
    and `n` (N). Cosine similarity after L2 normalisation, float32 products in blocks of `block` queries
    (memory block x N). Ties: see the module docstring (strictly greater candidates only).
    """
    ks = _check_ks(ks)
    ranks = pair_ranks(image_emb, expr_emb, device=device, block=block)
    out: dict = {}
    for direction in DIRECTIONS:
        out.update(_summaries(ranks[direction], ks, direction))
    out["n"] = int(ranks["img2gene"].shape[0])
    return out


def in_batch_retrieval(image_emb, expr_emb, batch_size: int, ks: Iterable[int] = (1, 5, 10), *, seed: int = 0) -> dict:
    """HESCAPE's recall@k: candidates are only the spots of the query's own batch of `batch_size`.

    The spots are shuffled (numpy `default_rng(seed).permutation`) and cut into consecutive batches; recall is
    averaged over queries (a last partial batch counts with its own size, a batch of one spot is dropped). The
    value rises as the batch shrinks (chance is k / batch_size, not k / N), so it is only comparable at equal
    batch sizes; `whole_split_retrieval` is the batch-free number. Keys: `inbatch{B}_{d}_recall@{k}` with d in
    "img2gene", "gene2img", and `inbatch{B}_n` (queries counted).
    """
    image, expr = _pair_arrays(image_emb, expr_emb)
    ks = _check_ks(ks)
    batch_size = _positive_int(batch_size, "batch_size", minimum=2)
    order = np.random.default_rng(seed).permutation(image.shape[0])
    ranks: dict[str, list[np.ndarray]] = {d: [] for d in DIRECTIONS}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if rows.size < 2:
            continue
        batch_ranks = pair_ranks(image[rows], expr[rows], block=batch_size)
        for direction in DIRECTIONS:
            ranks[direction].append(batch_ranks[direction])
    prefix = f"inbatch{batch_size}"
    out: dict = {}
    for direction in DIRECTIONS:
        all_ranks = np.concatenate(ranks[direction])
        out.update({f"{prefix}_{direction}_recall@{k}": float(np.mean(all_ranks <= k)) for k in ks})
    out[f"{prefix}_n"] = int(all_ranks.shape[0])
    return out
