"""Reranking a run with a pair scorer: how a cross-encoder teacher is scored on a retrieval split.

A cross-encoder cannot search a corpus; it rescores what a first-stage retriever found. The standard
protocol (BEIR's, MS MARCO's) is to rescore each query's top ``depth`` candidates of a run and rank them
by the new score alone. Documents below ``depth`` are dropped, not kept behind the reranked ones, so a
reranker's figures at cut-offs beyond ``depth`` say only what the candidates allow (R@100 of a top-100
rerank is the first stage's).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..data.runs import Run, ranked
from ..runtime.errors import LeadkdError


def top_candidates(run: Mapping[str, Mapping[str, float]], depth: int) -> dict[str, list[str]]:
    """Each query's first ``depth`` documents in the run's own order (score descending, ties as evaluators
    break them)."""
    if depth < 1:
        raise LeadkdError(f"rerank depth must be >= 1, got {depth}")
    return {qid: [doc for doc, _ in ranked(docs)[:depth]] for qid, docs in run.items()}


def rerank_run(model, run: Mapping[str, Mapping[str, float]], queries, corpus, depth: int = 100,
               batch_size: int = 32, activation: bool = False) -> Run:
    """``run``'s top ``depth`` of every judged query rescored by ``model.score_pairs`` (a
    :class:`~leadkd.models.cross_encoder.CrossEncoder`); ``activation`` applies the checkpoint's own
    activation (e.g. a sentence-transformers sigmoid), which changes no ranking, only the scores written."""
    if not hasattr(model, "score_pairs"):
        raise LeadkdError(f"a {getattr(model, 'kind', type(model).__name__)} model scores no (query, passage) pairs; "
                          "rerank with a cross-encoder")
    candidates = {qid: docs for qid, docs in top_candidates(run, depth).items() if qid in queries}
    if not candidates:
        raise LeadkdError("the run shares no query with the split: nothing to rerank")
    pair_queries, pair_docs, owners = [], [], []
    for qid, docs in candidates.items():
        text = queries.text(queries.index(qid))
        rows = corpus.lookup(docs)
        if (rows < 0).any():
            raise LeadkdError(f"the run retrieves {docs[int(np.flatnonzero(rows < 0)[0])]!r} for query {qid!r}, "
                              "a passage the corpus does not hold")
        pair_queries += [text] * len(docs)
        pair_docs += corpus.passages(rows)
        owners += [(qid, doc) for doc in docs]
    scores = np.asarray(model.score_pairs(pair_queries, pair_docs, batch_size=batch_size, activation=activation),
                        dtype=np.float64)
    reranked: Run = {qid: {} for qid in candidates}
    for (qid, doc), score in zip(owners, scores, strict=True):
        reranked[qid][doc] = float(score)
    return reranked
