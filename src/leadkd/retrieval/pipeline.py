"""Encode → search → run: the dense-retrieval steps that `leadkd retrieve`, `encode` and `search` share.

Kept apart from the CLI so that the trainer's dev evaluation and the quickstart call the very same code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
import numpy as np

from .. import distributed as dist
from ..accel import cpu
from ..errors import LeadkdError
from ..fileio import atomic_directory

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
        with atomic_directory(folder) as tmp:
            np.save(tmp / EMBEDDINGS_FILE, self.vectors, allow_pickle=False)
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2), encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Embeddings":
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


def encode_corpus(model, corpus, batch_size: int = 32, show_progress: bool = True) -> Embeddings:
    """Passage vectors of a whole corpus (title and text joined), in corpus order."""
    texts = corpus.passages(range(len(corpus)))
    vectors = cpu.encode_passages(model, texts, batch_size=batch_size, show_progress=show_progress)
    ids = [corpus.id_at(i) for i in range(len(corpus))]
    return Embeddings(ids, vectors, {"what": "passages", "count": len(ids), "dim": int(vectors.shape[1])})


def encode_queries(model, queries, batch_size: int = 64, show_progress: bool = True) -> Embeddings:
    """Query vectors of every query, in order."""
    texts = [queries.text(i) for i in range(len(queries))]
    vectors = cpu.encode_queries(model, texts, batch_size=batch_size, show_progress=show_progress)
    ids = [queries.id_at(i) for i in range(len(queries))]
    return Embeddings(ids, vectors, {"what": "queries", "count": len(ids), "dim": int(vectors.shape[1])})


def search_run(query_embeddings: Embeddings, doc_embeddings: Embeddings, k: int,
               exclude_same_id: bool = False) -> dict[str, dict[str, float]]:
    """Exact inner-product top-k of every query over every passage, as a run (qid → docid → score)."""
    from .search import exact_search, to_run

    exclude = None
    if exclude_same_id:
        position = {doc_id: row for row, doc_id in enumerate(doc_embeddings.ids)}
        exclude = [{position[q]} if q in position else set() for q in query_embeddings.ids]
    scores, indices = exact_search(query_embeddings.vectors, doc_embeddings.vectors, k, exclude=exclude)
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
    from ..evaluate import evaluate

    layers = list(range(model.num_layers))
    corpus, queries = dataset.corpus, dataset.queries
    doc_ids = [corpus.id_at(i) for i in range(len(corpus))]
    query_ids = [queries.id_at(i) for i in range(len(queries))]
    docs = corpus_vectors
    if docs is None:
        docs = cpu.encode_passages(model, corpus.passages(range(len(corpus))), batch_size=batch_size, layers=layers,
                                   show_progress=show_progress)
    elif tuple(docs.shape[:2]) != (len(layers), len(corpus)):
        raise ValueError(f"corpus_vectors of shape {tuple(docs.shape)}: expected {len(layers)} layers x "
                         f"{len(corpus)} passages")
    vectors = cpu.encode_queries(model, [queries.text(i) for i in range(len(queries))], batch_size=batch_size,
                                   layers=layers, show_progress=show_progress)
    rows = []
    for layer in layers:
        run = search_run(Embeddings(query_ids, vectors[layer], {}), Embeddings(doc_ids, docs[layer], {}), k)
        aggregate, by_query = evaluate(run, dataset.qrels, measures=list(measures))
        rows.append({"layer": layer, **aggregate})
    if per_query:
        rows[-1]["per_query"] = {row["query_id"]: {m: v for m, v in row.items() if m != "query_id"} for row in by_query}
    return rows


def evaluate_retriever(model, corpus_spec: str, split: str, metric: str = "nDCG@10", k: int = 100,
                       max_queries: int | None = None, corpus=None) -> dict[str, float] | None:
    """Full-corpus retrieval of a split's queries by a dense retriever (dev evaluation), scored with ir-measures.

    Under torchrun every process encodes and searches its own contiguous share of the corpus, and rank 0
    merges the shares' top-k lists and scores them: evaluation then takes 1/processes of the time, with
    no process idling at a barrier. Returns the measures on rank 0, None on the others. ``corpus``: the
    corpus already loaded from ``corpus_spec``, so it is not read again.
    """
    from ..data.datasets import load_dataset
    from ..evaluate import evaluate
    from .search import exact_search, merge_top_k, to_run

    dataset = load_dataset(corpus_spec, split=split, corpus=corpus)
    queries, qrels, corpus = dataset.queries, dataset.qrels, dataset.corpus
    if max_queries and len(queries) > max_queries:
        queries = queries.subset(range(max_queries))
        keep = {queries.id_at(i) for i in range(len(queries))}
        qrels = type(qrels)({q: d for q, d in qrels.items() if q in keep})
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * len(corpus) // world, (rank + 1) * len(corpus) // world
    query_embeddings = encode_queries(model, queries, show_progress=False)
    share = cpu.encode_passages(model, corpus.passages(range(lo, hi)), batch_size=32)
    scores, indices = exact_search(query_embeddings.vectors, share, k)  # [Q, 0] for an empty share
    parts = dist.gather_object((scores, np.where(indices >= 0, indices + lo, -1)))
    if parts is None:
        return None
    run = to_run(query_embeddings.ids, corpus.ids, *merge_top_k(parts, k))
    measures = [metric] + [m for m in ("R@100",) if m != metric]
    aggregate, _ = evaluate(run, qrels, measures=measures)
    return aggregate
