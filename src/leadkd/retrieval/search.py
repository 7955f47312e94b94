"""Exact inner-product search: blocked matrix products and a running top-k, in torch.

Why not just ``faiss.IndexFlatIP``: on CPU, torch's GEMM + ``topk`` is ~2.5x faster (see
docs/benchmarks-search.md), and blocking over documents keeps memory at one score block plus the running
top-k, so an 8.8M-passage corpus (even a ``np.memmap`` of it) is searched without materialising
``[Q, N]`` scores.

Tie-breaking is deterministic: among documents with exactly equal scores the lower document index
ranks first, also when the tie straddles the top-k cut (the set returned is the first ``k`` in
(score desc, index asc) order). Scores must be finite; excluded documents never appear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from leadkd.runtime.errors import ConfigError, LeadkdError

ArrayLike = np.ndarray | torch.Tensor

# A [query_batch, doc_block] float32 score block is 128 MiB at these defaults.
DEFAULT_QUERY_BATCH = 1024
DEFAULT_DOC_BLOCK = 32768


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    """A float32 CPU tensor view of ``x`` (no copy when it is already float32 and contiguous)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32)
    array = np.asarray(x, dtype=np.float32)
    if not (array.flags.c_contiguous and array.flags.writeable):  # e.g. a read-only np.memmap block
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _check_shapes(queries: ArrayLike, docs: ArrayLike) -> None:
    if len(queries.shape) != 2 or len(docs.shape) != 2:
        raise LeadkdError(f"search needs 2-d arrays, got queries {tuple(queries.shape)} and docs {tuple(docs.shape)}")
    if queries.shape[1] != docs.shape[1]:
        raise LeadkdError(f"queries have dimension {queries.shape[1]} but documents have dimension {docs.shape[1]} "
                          "(were they encoded by the same model?)")


def _exclusion_pairs(exclude: Sequence[Iterable[int] | None], num_queries: int, num_docs: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-query exclusions into (query row, doc index) pairs sorted by doc index."""
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    rows: list[int] = []
    cols: list[int] = []
    for row, doc_indices in enumerate(exclude):
        for doc in doc_indices or ():
            doc = int(doc)
            if not 0 <= doc < num_docs:
                raise ValueError(f"exclude[{row}] holds document index {doc}, outside 0..{num_docs - 1}")
            rows.append(row)
            cols.append(doc)
    cols_t = torch.tensor(cols, dtype=torch.int64)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    order = torch.argsort(cols_t, stable=True)
    return rows_t[order], cols_t[order]


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` columns of each row in (score desc, column asc) order, exact under ties.

    ``torch.topk`` picks arbitrarily among tied values; fetching one extra value tells us cheaply
    whether a tie straddles the cut, and only those (rare) rows pay for a stable full sort.
    """
    n = scores.shape[1]
    k = min(k, n)
    fetch = min(k + 1, n)
    values, index = torch.topk(scores, fetch, dim=1, largest=True, sorted=True)
    if fetch > k:
        straddle = (values[:, k] == values[:, k - 1]) & torch.isfinite(values[:, k])
        values, index = values[:, :k], index[:, :k]
        rows = straddle.nonzero().flatten()
        if rows.numel():
            exact_values, exact_index = torch.sort(scores[rows], dim=1, descending=True, stable=True)
            values, index = values.clone(), index.clone()
            values[rows] = exact_values[:, :k]
            index[rows] = exact_index[:, :k]
    # Put tied values in column order: sort by column, then stable sort by value.
    index, perm = torch.sort(index, dim=1)
    values = values.gather(1, perm)
    values, perm = torch.sort(values, dim=1, descending=True, stable=True)
    return values, index.gather(1, perm)


def exact_search(queries: ArrayLike, docs: ArrayLike, k: int, query_batch_size: int = DEFAULT_QUERY_BATCH,
                 doc_block_size: int = DEFAULT_DOC_BLOCK, exclude: Sequence[Iterable[int] | None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product for every query.

    Returns ``(scores float32 [Q, k'], indices int64 [Q, k'])`` with ``k' = min(k, N)``, best first,
    ties broken by lower document index. ``exclude[i]`` holds document indices query ``i`` must never
    get (its own id, known positives when mining); a query left with fewer than ``k'`` documents is
    padded with score ``-inf`` and index ``-1``. ``docs`` may be a ``np.memmap``: it is read one block at a
    time, exactly once, so memory stays at ``query_batch_size x doc_block_size`` scores plus ``[Q, k']``.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if query_batch_size < 1 or doc_block_size < 1:
        raise ConfigError("query_batch_size and doc_block_size must be at least 1")
    _check_shapes(queries, docs)
    q = _as_float_tensor(queries)
    num_queries, num_docs = q.shape[0], docs.shape[0]
    k = min(k, num_docs)
    best_values = torch.empty(num_queries, 0)
    best_index = torch.empty(num_queries, 0, dtype=torch.int64)
    if num_queries == 0 or k == 0:
        return np.empty((num_queries, k), np.float32), np.empty((num_queries, k), np.int64)
    ex_rows, ex_cols = _exclusion_pairs(exclude, num_queries, num_docs) if exclude is not None else (None, None)
    query_batch = min(query_batch_size, num_queries)
    doc_block = min(doc_block_size, num_docs)
    buffer = torch.empty(query_batch * doc_block)  # reused: a fresh 128 MiB block per step costs page faults
    merged_values: list[torch.Tensor] = []
    merged_index: list[torch.Tensor] = []

    for start in range(0, num_docs, doc_block):
        stop = min(start + doc_block, num_docs)
        block = _as_float_tensor(docs[start:stop])
        if ex_cols is not None:
            assert ex_rows is not None  # both come from _exclusion_pairs, or both are None
            lo, hi = torch.searchsorted(ex_cols, torch.tensor([start, stop])).tolist()
            block_rows, block_cols = ex_rows[lo:hi], ex_cols[lo:hi] - start
        merged_values.clear()
        merged_index.clear()
        for q_start in range(0, num_queries, query_batch):
            q_stop = min(q_start + query_batch, num_queries)
            scores = buffer[: (q_stop - q_start) * (stop - start)].view(q_stop - q_start, stop - start)
            torch.mm(q[q_start:q_stop], block.T, out=scores)
            if ex_cols is not None and block_rows.numel():
                mine = (block_rows >= q_start) & (block_rows < q_stop)
                scores[block_rows[mine] - q_start, block_cols[mine]] = float("-inf")
            values, index = _block_topk(scores, k)
            # Earlier blocks hold lower indices, so a stable sort of [kept, new] keeps index order in ties.
            values = torch.cat([best_values[q_start:q_stop], values], dim=1)
            index = torch.cat([best_index[q_start:q_stop], index + start], dim=1)
            values, order = torch.sort(values, dim=1, descending=True, stable=True)
            merged_values.append(values[:, :k])
            merged_index.append(index.gather(1, order[:, :k]))
        best_values = torch.cat(merged_values)
        best_index = torch.cat(merged_index)

    best_index[torch.isneginf(best_values)] = -1
    return best_values.numpy(), best_index.numpy()


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of several searches of the same queries over disjoint document shards.

    Each part is ``(scores [Q, k_i], indices [Q, k_i])`` from :func:`exact_search` with indices already
    made global; ``-1`` padding (score ``-inf``) goes last. The result follows :func:`exact_search`'s order
    (score desc, index asc), so merging the shards' top-k gives the top-k of the whole collection.
    """
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    indices = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    padding = indices < 0
    order = np.lexsort((np.where(padding, np.iinfo(np.int64).max, indices), -scores, padding), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: ArrayLike, indices: ArrayLike
           ) -> dict[str, dict[str, float]]:
    """Turn search output into a run ``{query_id: {doc_id: score}}`` (best first; ``-1`` padding dropped)."""
    scores = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    indices = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if scores.shape != indices.shape or scores.ndim != 2 or scores.shape[0] != len(query_ids):
        raise ValueError(f"scores {scores.shape} and indices {indices.shape} must both be [{len(query_ids)}, k]")
    run: dict[str, dict[str, float]] = {}
    for qid, row_scores, row_index in zip(query_ids, scores.tolist(), indices.tolist(), strict=True):
        run[qid] = {doc_ids[i]: s for s, i in zip(row_scores, row_index, strict=True) if i >= 0}
    return run

