"""Encode → search → run: the dense-retrieval steps that `leadkd retrieve`, `encode` and `search` share.

Kept apart from the CLI so that the trainer's dev evaluation and the quickstart call the very same code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import accel
from ..runtime import distributed as dist
from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_directory, reporting_write_failures

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
META_FILE = "meta.json"


@dataclass
class Embeddings:
    """Vectors with the ids they belong to (row i is ``ids[i]``)."""

    ids: list[str]
    vectors: np.ndarray
    meta: dict

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``embeddings.npy``, ``ids.txt`` and ``meta.json`` into ``folder``, atomically as a whole."""
        with reporting_write_failures(folder, "embeddings folder"), atomic_directory(folder) as tmp:
            np.save(tmp / EMBEDDINGS_FILE, self.vectors, allow_pickle=False)
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2), encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Embeddings:
        """Read a folder written by :meth:`save`; never unpickles anything."""
        folder = Path(folder)
        for name in (EMBEDDINGS_FILE, IDS_FILE):
            if not (folder / name).is_file():
                raise LeadkdError(f"{folder}: not an embeddings folder (missing {name})")
        try:
            vectors = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:
            raise LeadkdError(f"{folder / EMBEDDINGS_FILE}: unreadable ({exc})") from None
        ids = (folder / IDS_FILE).read_text(encoding="utf-8").splitlines()
        if len(ids) != len(vectors):
            raise LeadkdError(f"{folder / IDS_FILE}: {len(ids)} ids for {len(vectors)} vectors")
        meta_file = folder / META_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        return cls(ids, np.asarray(vectors), meta)

    @classmethod
    def load_passages(cls, folder: str | os.PathLike) -> Embeddings:
        """A folder of passage vectors (``leadkd mine --corpus-embeddings``); query vectors are refused."""
        embeddings = cls.load(folder)
        if embeddings.meta.get("what", "passages") != "passages":
            raise LeadkdError(f"{folder}: holds {embeddings.meta['what']} vectors, not passages "
                              "(encode without --queries)")
        return embeddings


def encode_corpus(model, corpus, batch_size: int = 32, show_progress: bool = True) -> Embeddings:
    """Passage vectors of a whole corpus (title and text joined), in corpus order."""
    texts = corpus.passages(range(len(corpus)))
    vectors = accel.encode_passages(model, texts, batch_size=batch_size, show_progress=show_progress)
    ids = [corpus.id_at(i) for i in range(len(corpus))]
    return Embeddings(ids, vectors, {"what": "passages", "count": len(ids), "dim": int(vectors.shape[1])})


def encode_queries(model, queries, batch_size: int = 64, show_progress: bool = True) -> Embeddings:
    """Query vectors of every query, in order."""
    texts = [queries.text(i) for i in range(len(queries))]
    vectors = accel.encode_queries(model, texts, batch_size=batch_size, show_progress=show_progress)
    ids = [queries.id_at(i) for i in range(len(queries))]
    return Embeddings(ids, vectors, {"what": "queries", "count": len(ids), "dim": int(vectors.shape[1])})


def search_device(model) -> torch.device:
    """Where a model's vectors are searched: on its device (a GPU when the model is on one), else the CPU.

    Encoding hands vectors back as numpy; searching them on the model's GPU (copied there block by block)
    is what keeps retrieval, dev evaluation and mining off the CPU when a GPU is there."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def search_run(query_embeddings: Embeddings, doc_embeddings: Embeddings, k: int, exclude_same_id: bool = False,
               device: torch.device | str | None = None, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """Exact inner-product top-k of every query over every passage, as a run (qid → docid → score).

    ``device``/``dtype``: where and in what precision to search (:func:`~leadkd.retrieval.search.exact_search`;
    pass :func:`search_device` of the model that encoded the vectors to search on its GPU)."""
    from .search import exact_search, to_run

    exclude = None
    if exclude_same_id:
        position = {doc_id: row for row, doc_id in enumerate(doc_embeddings.ids)}
        exclude = [{position[q]} if q in position else set() for q in query_embeddings.ids]
    scores, indices = exact_search(query_embeddings.vectors, doc_embeddings.vectors, k, exclude=exclude,
                                   device=device, dtype=dtype)
    return to_run(query_embeddings.ids, doc_embeddings.ids, scores, indices)


def evaluate_layers(model, dataset, measures: Sequence[str] = ("nDCG@10", "R@100"), k: int = 100,
                    batch_size: int = 32, show_progress: bool = False, per_query: bool = False,
                    corpus_vectors=None) -> list[dict]:
    """Retrieval quality of every layer of a dual encoder, each layer's pooled vectors used as a retriever.

    One encoding pass yields all layers, so this costs about one ordinary corpus encoding. Returns one
    row per layer, ``{"layer": l, measure: value, ...}``; the last row is the model's ordinary quality,
    and with ``per_query`` it also holds ``"per_query": {query_id: {measure: value}}`` (for paired tests).
    ``corpus_vectors``: this model's ``[layers, passages, dim]`` vectors of the corpus, already computed
    (e.g. for mining), so the corpus is not encoded again.
    """
    from .evaluate import evaluate

    layers = list(range(model.num_layers))
    corpus, queries = dataset.corpus, dataset.queries
    doc_ids = [corpus.id_at(i) for i in range(len(corpus))]
    query_ids = [queries.id_at(i) for i in range(len(queries))]
    docs = corpus_vectors
    if docs is None:
        docs = accel.encode_passages(model, corpus.passages(range(len(corpus))), batch_size=batch_size, layers=layers,
                                     show_progress=show_progress)
    elif tuple(docs.shape[:2]) != (len(layers), len(corpus)):
        raise ValueError(f"corpus_vectors of shape {tuple(docs.shape)}: expected {len(layers)} layers x "
                         f"{len(corpus)} passages")
    vectors = accel.encode_queries(model, [queries.text(i) for i in range(len(queries))], batch_size=batch_size,
                                     layers=layers, show_progress=show_progress)
    rows: list[dict[str, Any]] = []
    for layer in layers:
        run = search_run(Embeddings(query_ids, vectors[layer], {}), Embeddings(doc_ids, docs[layer], {}), k,
                         device=search_device(model))
        aggregate, by_query = evaluate(run, dataset.qrels, measures=list(measures))
        rows.append({"layer": layer, **aggregate})
    if per_query:
        rows[-1]["per_query"] = {row["query_id"]: {m: v for m, v in row.items() if m != "query_id"} for row in by_query}
    return rows


def evaluate_retriever(model, corpus_spec: str, split: str, metric: str = "nDCG@10", k: int = 100,
                       max_queries: int | None = None, corpus=None) -> dict[str, float] | None:
    """Full-corpus retrieval of a split's queries by a dense retriever (dev evaluation), scored with ir-measures.

    Under torchrun every process encodes and searches its own contiguous share of the corpus (on its own
    GPU when the model is on one), and rank 0 merges the shares' top-k lists and scores them: evaluation
    then takes 1/processes of the time, with no process idling at a barrier. Returns the measures on rank 0,
    None on the others. ``corpus``: the corpus already loaded from ``corpus_spec``, so it is not read again.
    """
    from ..data.datasets import load_dataset
    from .evaluate import evaluate
    from .search import to_run

    dataset = load_dataset(corpus_spec, split=split, corpus=corpus)
    queries, qrels, corpus = dataset.queries, dataset.qrels, dataset.corpus
    if max_queries and len(queries) > max_queries:
        queries = queries.subset(range(max_queries))
        keep = {queries.id_at(i) for i in range(len(queries))}
        qrels = type(qrels)({q: d for q, d in qrels.items() if q in keep})
    query_embeddings = encode_queries(model, queries, show_progress=False)
    rows, share = encode_corpus_share(model, corpus, batch_size=32, show_progress=False)
    merged = search_shards(query_embeddings.vectors, share, rows, k, device=search_device(model))
    if merged is None:
        return None
    run = to_run(query_embeddings.ids, corpus.ids, *merged)
    measures = [metric] + [m for m in ("R@100",) if m != metric]
    aggregate, _ = evaluate(run, qrels, measures=measures)
    return aggregate


# --------------------------------------------------------------------------- one share per process
# Under torchrun every process encodes and searches a contiguous share of the corpus; rank 0 merges the
# shares' top-k lists (exact: the shards are disjoint and both sides break ties by the global row) and
# assembles the shares' vectors into one embeddings folder. In one process the share is everything.

SHARDS_SUFFIX = ".shards"


def share_of(count: int, rank: int | None = None, world: int | None = None) -> range:
    """This process's contiguous rows of ``count`` items: process r of W gets ``[r*count//W, (r+1)*count//W)``.

    Contiguous (not strided) so that the shares, concatenated in rank order, are the corpus in its order."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    return range(rank * count // world, (rank + 1) * count // world)


def encode_corpus_share(model, corpus, batch_size: int = 32, show_progress: bool = True) -> tuple[range, np.ndarray]:
    """This process's rows of the corpus and their passage vectors (length-sorted batches within the share)."""
    rows = share_of(len(corpus))
    return rows, accel.encode_passages(model, corpus.passages(rows), batch_size=batch_size, show_progress=show_progress)


def encode_queries_share(model, queries, batch_size: int = 64, show_progress: bool = True) -> tuple[range, np.ndarray]:
    """This process's rows of the queries and their vectors."""
    rows = share_of(len(queries))
    vectors = accel.encode_queries(model, [queries.text(i) for i in rows], batch_size=batch_size,
                                   show_progress=show_progress)
    return rows, vectors


def search_shards(query_vectors, share_vectors, rows: range, k: int, exclude: Sequence[set[int]] | None = None,
                  device: torch.device | str | None = None, dtype: str = "float32"
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact top-``k`` of every query over the whole corpus, each process searching its share ``rows``.

    ``exclude[i]``: *global* corpus rows query ``i`` must never get. Returns ``(scores, global indices)``
    on rank 0 - the same as :func:`~leadkd.retrieval.search.exact_search` over the concatenated shares -
    and None on the other ranks. Every process must call it with the same queries. ``device``: this
    process's own (its GPU under torchrun, :func:`search_device`); only the shares' top-k lists travel.
    """
    from .search import exact_search, merge_top_k

    local = None
    if exclude is not None:
        local = [{row - rows.start for row in banned if rows.start <= row < rows.stop} for banned in exclude]
    scores, indices = exact_search(query_vectors, share_vectors, k, exclude=local,  # [Q, 0] for an empty share
                                   device=device, dtype=dtype)
    parts = dist.gather_object((scores, np.where(indices >= 0, indices + rows.start, -1)))
    if parts is None:
        return None
    return merge_top_k(parts, k)


def shards_folder(folder: str | os.PathLike) -> Path:
    """Where the processes leave their shares of ``folder`` for rank 0 (beside it, hidden)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{SHARDS_SUFFIX}")


def save_shards(folder: str | os.PathLike, ids: Sequence[str], rows: range, vectors: np.ndarray, meta: dict) -> Path:
    """Every process's share of the vectors into one embeddings folder, written by rank 0 (collective).

    Each process writes its share beside ``folder`` (a file system every process sees: one machine, or a
    shared one across nodes); rank 0 then copies them in rank order into ``embeddings.npy`` through a
    memory map, so no process ever holds more than its own share, and the folder appears whole
    (:func:`~leadkd.runtime.fileio.atomic_directory`). ``ids`` are all the rows' ids, in order.
    """
    from numpy.lib.format import open_memmap

    from ..runtime.fileio import check_replaceable

    folder = Path(folder)
    check_replaceable(folder)
    parts = shards_folder(folder)
    parts.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, partial = parts / f"rank{rank}.npy", parts / f".rank{rank}.tmp.npy"
    try:
        with reporting_write_failures(folder, "embeddings folder"), open(partial, "wb") as handle:
            np.save(handle, np.ascontiguousarray(vectors), allow_pickle=False)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, mine)
    dist.barrier()
    if not dist.is_main_process():
        return folder
    shares = [np.load(parts / f"rank{r}.npy", mmap_mode="r", allow_pickle=False) for r in range(world)]
    expected = [len(share_of(len(ids), r, world)) for r in range(world)]
    filled = [s for s in shares if len(s)] or shares  # more processes than rows leaves some shares empty
    if [len(s) for s in shares] != expected or len({s.shape[1:] for s in filled}) != 1:
        raise LeadkdError(f"{parts}: the shares hold {[s.shape for s in shares]} vectors, expected {expected} rows")
    try:  # the shares go either way: on a full disk they are what fills it
        with reporting_write_failures(folder, "embeddings folder"), atomic_directory(folder) as tmp:
            out = open_memmap(tmp / EMBEDDINGS_FILE, mode="w+", dtype=filled[0].dtype,
                              shape=(len(ids),) + filled[0].shape[1:])
            with open(tmp / EMBEDDINGS_FILE, "r+b") as handle:  # room taken now: a full disk is an OSError
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)  # here, not a SIGBUS
            start = 0
            for share in shares:
                for lo in range(0, len(share), 65536):  # bounded copies: a share may be many GB
                    block = share[lo:lo + 65536]
                    out[start + lo:start + lo + len(block)] = block
                start += len(share)
            out.flush()
            del out
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    finally:
        del shares
        shutil.rmtree(parts, ignore_errors=True)
    return folder
