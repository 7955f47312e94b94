"""Exact inner-product search: blocked matrix products and a running top-k, in torch, where the vectors are.

Why not just ``faiss.IndexFlatIP``: blocking over documents keeps memory at one score block plus the
running top-k, so an 8.8M-passage corpus (even a ``np.memmap`` of it) is searched without materialising
``[Q, N]`` scores; ties are broken deterministically; and the same code searches on a GPU. Speed on the
CPU (docs/benchmarks-search.md) depends on the machine's load: on the shared 2-core machine torch took
0.4x faiss's time under load (load average 5), and 1.3x-1.5x faiss's time when it was quiet (load ~1).

Tie-breaking is deterministic: among documents with exactly equal scores the lower document index
ranks first, also when the tie straddles the top-k cut (the set returned is the first ``k`` in
(score desc, index asc) order). Scores must be finite; excluded documents never appear.

Where it runs (``device``): by default where the vectors are - a CUDA query tensor (else a CUDA document
tensor) searches on its GPU, numpy arrays and CPU tensors on the CPU. On a GPU the queries are copied
there once; documents already there are searched in place, documents on the host (numpy, ``np.memmap``,
CPU tensors) are streamed block by block through two pinned buffers, a thread filling the next while the
GPU searches the current one. Results always come back as numpy arrays, the same on every device up to
float32 summation order.

Memory: one search step holds a ``[query_batch, doc_block]`` float32 score block and a
``[doc_block, dim]`` document block; beside them live the queries ``[Q, dim]`` and the running top-k
(``Q x k`` scores and int64 indices). On the CPU the step is 1,024 x 32,768 (128 MiB of scores, the
measured default); on a GPU, or wherever ``max_bytes`` is given, the step is sized so that score block
plus document block stay within ``max_bytes`` (1 GiB by default on a GPU). Rows whose tie straddles the
cut are re-sorted in full, which for those rows alone takes three times their scores' memory again.

Precision (``dtype``): float32 by default. ``float16`` / ``bfloat16`` round queries and documents to
that type and accumulate the products in float32, which returns float32 scores: on a GPU the product
runs on half-precision tensor cores (``torch.mm(..., out_dtype=float32)``, and the documents kept there
take half the memory); on the CPU, which has no fast half GEMM, the rounded values are multiplied in
float32 - the same numbers, for tests and for a CPU check of what a GPU run will rank, at float32 speed.

Under torchrun (:func:`leadkd.retrieval.pipeline.search_shards`) every process searches its contiguous
share of the corpus on its own device; the shares' top-k lists, made global, merge exactly
(:func:`merge_top_k`) into the top-k of the whole corpus with the same tie rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from leadkd.runtime.errors import ConfigError, LeadkdError

ArrayLike = np.ndarray | torch.Tensor
DeviceLike = str | torch.device

# A [query_batch, doc_block] float32 score block is 128 MiB at these (CPU) defaults.
DEFAULT_QUERY_BATCH = 1024
DEFAULT_DOC_BLOCK = 32768
#: Queries per step on an accelerator: a GEMM this tall keeps the GPU busy; the doc block follows from the budget.
DEVICE_QUERY_BATCH = 4096
#: Bytes of one step (score block + document block) on an accelerator when ``max_bytes`` is not given.
DEVICE_MAX_BYTES = 1 << 30
SCORE_BYTES = 4  # scores, and the documents' staging, are float32
#: Rows per host-to-device copy when documents are placed on the device whole (:func:`documents_on`).
UPLOAD_ROWS = 65536

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NO_OUT_DTYPE: set[str] = set()  # device types whose torch.mm lacks out_dtype (found on first use)


def compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"float16"`` or ``"bfloat16"`` (or that torch dtype) as a torch dtype; others are refused."""
    for name, value in _DTYPES.items():
        if dtype in (name, value):
            return value
    raise ConfigError(f"search dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def where_to_search(queries: ArrayLike, docs: ArrayLike, device: DeviceLike | None = None) -> torch.device:
    """``device``, else the device of the query tensor, else that of the document tensor, else the CPU."""
    if device is not None:
        return torch.device(device)
    for x in (queries, docs):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def block_shape(num_queries: int, num_docs: int, dim: int, device: torch.device, query_batch_size: int | None = None,
                doc_block_size: int | None = None, max_bytes: int | None = None) -> tuple[int, int]:
    """``(query_batch, doc_block)`` of one search step, each at least 1 and at most the count it blocks.

    Sizes given explicitly are used as they are. Otherwise: on the CPU without ``max_bytes``, the measured
    1,024 x 32,768; else the doc block is the largest whose float32 scores for a query batch plus its own
    float32 rows fit in ``max_bytes`` (1 GiB on an accelerator): ``4 * doc_block * (query_batch + dim)``.
    """
    if device.type == "cpu" and max_bytes is None:
        query_batch = query_batch_size or DEFAULT_QUERY_BATCH
        doc_block = doc_block_size or DEFAULT_DOC_BLOCK
    else:
        budget = DEVICE_MAX_BYTES if max_bytes is None else max_bytes
        query_batch = min(query_batch_size or DEVICE_QUERY_BATCH, max(num_queries, 1))
        doc_block = doc_block_size or budget // (SCORE_BYTES * (query_batch + dim))
        if doc_block < 1:
            raise ConfigError(f"max_bytes={budget} cannot hold one document's scores for {query_batch} queries "
                              f"({SCORE_BYTES * (query_batch + dim)} bytes)")
    return max(1, min(query_batch, num_queries)), max(1, min(doc_block, num_docs))


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    """A float32 CPU tensor view of ``x`` (no copy when it is already float32 and contiguous)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32)
    array = np.asarray(x, dtype=np.float32)
    if not (array.flags.c_contiguous and array.flags.writeable):  # e.g. a read-only np.memmap block
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _operands(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on ``device`` as the matrix product takes it: in ``dtype`` on an accelerator; on the CPU in float32,
    rounded to ``dtype`` first (the CPU has no fast half GEMM; the rounded values are what a GPU multiplies)."""
    x = x.detach().to(device=device)
    if device.type != "cpu":
        return x.to(dtype)
    return x.to(torch.float32) if dtype == torch.float32 else x.to(dtype).to(torch.float32)


def _scores(q: torch.Tensor, block: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``q @ block.T`` as float32 scores (into ``out`` when given and the operands are float32).

    Half operands are multiplied with float32 accumulation *and output* (``out_dtype``): a half-precision
    score matrix would round scores to 3 significant digits and tie documents that differ. A torch or a
    device without that kernel multiplies the (already rounded) operands in float32: the same numbers, slower.
    """
    if q.dtype == torch.float32:
        return torch.mm(q, block.T, out=out)
    if q.device.type not in _NO_OUT_DTYPE:
        try:
            return torch.mm(q, block.T, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            _NO_OUT_DTYPE.add(q.device.type)
    return torch.mm(q.float(), block.T.float(), out=out)


def _staged_blocks(docs: ArrayLike, bounds: Sequence[tuple[int, int]], device: torch.device) -> Iterator[torch.Tensor]:
    """``docs[start:stop]`` for each ``(start, stop)`` of ``bounds``, as float32 on ``device``, read from the host.

    Two staging buffers (pinned for CUDA, so each copy to the GPU is asynchronous) take turns; a thread fills
    the next one - reading a ``np.memmap`` from disk, if need be - while the caller searches the current one.
    A block is valid until the next is asked for (on the CPU it *is* a staging buffer).
    """
    pin = device.type == "cuda"
    rows = max(stop - start for start, stop in bounds)
    staging = [torch.empty((rows, docs.shape[1]), dtype=torch.float32, pin_memory=pin) for _ in range(2)]
    uploaded: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each buffer

    def fill(slot: int, start: int, stop: int) -> torch.Tensor:
        done = uploaded[slot]
        if done is not None:
            done.synchronize()  # the GPU has read this buffer: it may be overwritten
        target = staging[slot][: stop - start]
        if isinstance(docs, torch.Tensor):
            target.copy_(docs[start:stop])
        else:
            target.numpy()[...] = docs[start:stop]
        return target

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="leadkd-search-staging") as pool:
        pending: Future[torch.Tensor] = pool.submit(fill, 0, *bounds[0])
        for i in range(len(bounds)):
            block = pending.result().to(device, non_blocking=pin)
            if pin:
                event = torch.cuda.Event()
                event.record()
                uploaded[i % 2] = event
            if i + 1 < len(bounds):
                pending = pool.submit(fill, (i + 1) % 2, *bounds[i + 1])
            yield block


def _document_blocks(docs: ArrayLike, bounds: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
                     ) -> Iterator[torch.Tensor]:
    """The documents of each ``(start, stop)`` of ``bounds`` on ``device`` as the product takes them: in place
    when they are on an accelerator already, one block at a time on the CPU, staged from the host otherwise."""
    on_accelerator = isinstance(docs, torch.Tensor) and docs.device.type != "cpu"
    if on_accelerator or device.type == "cpu":
        for start, stop in bounds:
            block = docs[start:stop]
            if not (isinstance(block, torch.Tensor) and block.device.type != "cpu"):
                block = _as_float_tensor(block)
            yield _operands(block, device, dtype)
        return
    for block in _staged_blocks(docs, bounds, device):
        yield _operands(block, device, dtype)


def documents_on(docs: ArrayLike, device: DeviceLike, dtype: str | torch.dtype = "float32",
                 fraction: float = 0.5) -> ArrayLike:
    """``docs`` copied once onto the CUDA ``device`` (in ``dtype``) where they take at most ``fraction`` of its free
    memory; otherwise, and off CUDA, ``docs`` as they are (:func:`exact_search` then streams them).

    Why: a caller that searches the same documents many times (mining, one chunk of queries after another)
    pays the host-to-device copy once instead of once per search, and float16/bfloat16 halve what stays there.
    """
    device, dtype = torch.device(device), compute_dtype(dtype)
    if device.type != "cuda":
        return docs
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(docs, torch.Tensor) and docs.device == device and docs.dtype == dtype:
        return docs
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache is free to us
    if docs.shape[0] * docs.shape[1] * dtype.itemsize > fraction * free:
        return docs
    placed = torch.empty(tuple(docs.shape), dtype=dtype, device=device)
    for start in range(0, docs.shape[0], UPLOAD_ROWS):  # bounded host copies: docs may be a many-GB np.memmap
        block = docs[start:start + UPLOAD_ROWS]
        placed[start:start + len(block)] = block if isinstance(block, torch.Tensor) else _as_float_tensor(block)
    return placed


def _check_shapes(queries: ArrayLike, docs: ArrayLike) -> None:
    if len(queries.shape) != 2 or len(docs.shape) != 2:
        raise LeadkdError(f"search needs 2-d arrays, got queries {tuple(queries.shape)} and docs {tuple(docs.shape)}")
    if queries.shape[1] != docs.shape[1]:
        raise LeadkdError(f"queries have dimension {queries.shape[1]} but documents have dimension {docs.shape[1]} "
                          "(were they encoded by the same model?)")


def _exclusion_pairs(exclude: Sequence[Iterable[int] | None], num_queries: int, num_docs: int, query_batch: int,
                     device: torch.device) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Per-query exclusions as ``(keys, query rows, doc indices)``, ordered by (query batch, doc index).

    ``keys = (row // query_batch) * num_docs + doc``: the pairs of one search step (a query batch against a
    doc block) are one contiguous run, found by a binary search on the host; the rows and indices live on
    ``device``, so masking a step neither scans the other steps' pairs nor waits for the device.
    """
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
    rows_np, cols_np = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
    keys = rows_np // query_batch * num_docs + cols_np
    order = np.argsort(keys, kind="stable")
    return (keys[order], torch.from_numpy(rows_np[order]).to(device), torch.from_numpy(cols_np[order]).to(device))


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` columns of each row in (score desc, column asc) order, exact under ties.

    ``torch.topk`` picks arbitrarily among tied values; fetching one extra value tells us cheaply
    whether a tie straddles the cut, and only those (rare) rows pay for a stable full sort. (Finding
    them reads one number back from a GPU per step: a short wait, next to a step's matrix product.)
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


def exact_search(queries: ArrayLike, docs: ArrayLike, k: int, query_batch_size: int | None = None,
                 doc_block_size: int | None = None, exclude: Sequence[Iterable[int] | None] | None = None, *,
                 device: DeviceLike | None = None, dtype: str | torch.dtype = "float32", max_bytes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product for every query.

    Returns ``(scores float32 [Q, k'], indices int64 [Q, k'])`` (numpy, wherever the search ran) with
    ``k' = min(k, N)``, best first, ties broken by lower document index. ``exclude[i]`` holds document
    indices query ``i`` must never get (its own id, known positives when mining); a query left with fewer
    than ``k'`` documents is padded with score ``-inf`` and index ``-1``. ``docs`` may be a ``np.memmap``:
    it is read one block at a time, exactly once.

    ``device``: where to compute (default: where the query tensor is, else the document tensor, else the
    CPU). ``dtype``: ``"float32"``, or ``"float16"``/``"bfloat16"`` operands with float32 accumulation.
    Memory per step is a ``query_batch x doc_block`` float32 score block plus ``doc_block`` document rows,
    beside the queries and the ``[Q, k']`` running top-k; :func:`block_shape` picks the step from
    ``query_batch_size``, ``doc_block_size`` and the ``max_bytes`` budget (see the module docstring).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if any(size is not None and size < 1 for size in (query_batch_size, doc_block_size, max_bytes)):
        raise ConfigError("query_batch_size, doc_block_size and max_bytes must be at least 1")
    _check_shapes(queries, docs)
    target, dtype = where_to_search(queries, docs, device), compute_dtype(dtype)
    num_queries, num_docs = queries.shape[0], docs.shape[0]
    k = min(k, num_docs)
    if num_queries == 0 or k == 0:
        return np.empty((num_queries, k), np.float32), np.empty((num_queries, k), np.int64)
    query_batch, doc_block = block_shape(num_queries, num_docs, docs.shape[1], target, query_batch_size,
                                         doc_block_size, max_bytes)
    q = _operands(queries if isinstance(queries, torch.Tensor) else _as_float_tensor(queries), target, dtype)
    excluded = None if exclude is None else _exclusion_pairs(exclude, num_queries, num_docs, query_batch, target)
    best_values = torch.full((num_queries, k), float("-inf"), device=target)
    best_index = torch.full((num_queries, k), -1, dtype=torch.int64, device=target)
    # Reused on the CPU: a fresh 128 MiB block per step costs page faults (a GPU's caching allocator has none).
    buffer = torch.empty(query_batch * doc_block) if target.type == "cpu" else None
    bounds = [(start, min(start + doc_block, num_docs)) for start in range(0, num_docs, doc_block)]

    for (start, stop), block in zip(bounds, _document_blocks(docs, bounds, target, dtype), strict=True):
        for batch, q_start in enumerate(range(0, num_queries, query_batch)):
            q_stop = min(q_start + query_batch, num_queries)
            out = None if buffer is None else buffer[: (q_stop - q_start) * (stop - start)].view(q_stop - q_start, -1)
            scores = _scores(q[q_start:q_stop], block, out)
            if excluded is not None:
                keys, rows, cols = excluded
                lo, hi = np.searchsorted(keys, (batch * num_docs + start, batch * num_docs + stop)).tolist()
                if hi > lo:
                    scores[rows[lo:hi] - q_start, cols[lo:hi] - start] = float("-inf")
            values, index = _block_topk(scores, k)
            # Earlier blocks hold lower indices, so a stable sort of [kept, new] keeps index order in ties.
            values = torch.cat([best_values[q_start:q_stop], values], dim=1)
            index = torch.cat([best_index[q_start:q_stop], index + start], dim=1)
            values, order = torch.sort(values, dim=1, descending=True, stable=True)
            best_values[q_start:q_stop] = values[:, :k]
            best_index[q_start:q_stop] = index.gather(1, order[:, :k])

    best_index[torch.isneginf(best_values)] = -1
    return best_values.cpu().numpy(), best_index.cpu().numpy()


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

