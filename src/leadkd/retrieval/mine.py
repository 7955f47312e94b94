"""Hard-negative mining (`leadkd mine`): a retriever's near misses become each query's negatives.

The paper's miner dropped only documents equal to the *first* positive and compared a string id with an
int, so on MS MARCO passages it dropped nothing and judged positives became "negatives" (spec §7.4-2).
Here every judged positive (relevance >= ``min_rel``) and the query's own id are excluded *inside* the
search, by corpus row, after ids were matched as strings; a second check on the results guards that.

Ranks are counted after that exclusion: rank 1 is the best-scoring passage that is neither a positive
nor the query itself. ``rank_range=(start, end)`` keeps ranks ``start <= r < end`` (1-based), so the
default ``(10, 100)`` skips the top 9 — the likeliest unjudged relevant passages — and offers 90.

What ranks is pluggable (:class:`Ranker`): :class:`DenseRanker` (a dual encoder's exact search, the
default) or :class:`leadkd.retrieval.bm25.BM25Ranker`; the choice of queries, the exclusion, ranks,
sampling and the report are shared (:func:`mine_with_ranker`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .. import accel
from ..data.groups import GroupsBuilder, TrainingGroups
from ..runtime import distributed as dist
from ..runtime.errors import ConfigError, LeadkdError
from .pipeline import Embeddings, encode_corpus, search_device, search_shards, share_of
from .search import ArrayLike, compute_dtype, documents_on, exact_search

#: Queries searched per pass over the corpus vectors: bounds the [Q, depth] results, not the passes' cost.
SEARCH_CHUNK = 65536
#: Short queries listed by id in the report.
SHORT_EXAMPLES = 10


@dataclass
class MiningReport:
    """What mining did, so a user can see whether the groups are what they expect."""

    queries_judged: int = 0          # queries with judgments in the split's qrels
    processed: int = 0               # groups written
    skipped_no_positive: int = 0     # judged, but nothing >= min_rel in the corpus
    skipped_no_query: int = 0        # judged, but absent from the queries
    positives_excluded: int = 0      # judged positives kept out of the candidates
    self_excluded: int = 0           # queries whose own id is a corpus passage (kept out too)
    positives_not_in_corpus: int = 0  # judged positive ids the corpus does not hold
    short_queries: int = 0           # got fewer than `negatives` candidates in range
    missing_negatives: int = 0       # sum over short queries of how many they lacked
    fewest_negatives: int | None = None  # smallest number of negatives a group got
    short_examples: list[tuple[str, int]] = field(default_factory=list)  # (query id, negatives got)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["short_examples"] = [list(x) for x in self.short_examples]
        return out

    def summary(self) -> str:
        """One line for the terminal."""
        text = (f"{self.processed} groups from {self.queries_judged} judged queries; "
                f"skipped {self.skipped_no_positive} without a positive, {self.skipped_no_query} without text; "
                f"{self.positives_excluded} positives excluded from candidates")
        if self.short_queries:
            text += (f"; {self.short_queries} queries short of negatives by {self.missing_negatives} in all "
                     f"(fewest: {self.fewest_negatives})")
        return text


def _check_settings(depth: int, rank_range: tuple[int, int], negatives: int, num_docs: int) -> None:
    start, end = rank_range
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    if not 1 <= start < end <= depth + 1:
        raise ConfigError(f"rank range ({start}, {end}) must satisfy 1 <= start < end <= depth + 1 = {depth + 1} "
                          "(1-based ranks, start included, end excluded)")
    if negatives < 1:
        raise ConfigError(f"negatives must be >= 1, got {negatives}")
    if num_docs == 0:
        raise LeadkdError("the corpus is empty: nothing to mine")


def _corpus_vectors(model, corpus, corpus_embeddings: Embeddings | np.ndarray | None, batch_size: int,
                    show_progress: bool, rows: range | None = None) -> np.ndarray:
    """The corpus vectors in corpus row order, encoding only when none were given; with ``rows`` (this
    process's share under torchrun) only those rows' vectors."""
    if rows is not None:
        if corpus_embeddings is None:
            return accel.encode_passages(model, corpus.passages(rows), batch_size=batch_size,
                                         show_progress=show_progress)
        return _corpus_vectors(model, corpus, corpus_embeddings, batch_size, show_progress)[rows.start:rows.stop]
    if corpus_embeddings is None:
        return encode_corpus(model, corpus, batch_size=batch_size, show_progress=show_progress).vectors
    if isinstance(corpus_embeddings, Embeddings):
        ids = corpus_embeddings.ids
        if len(ids) != len(corpus) or any(a != b for a, b in zip(ids, corpus.ids, strict=True)):
            raise LeadkdError(f"the corpus embeddings ({len(ids)} ids) are not of this corpus ({len(corpus)} "
                              "passages) in its order")
        return corpus_embeddings.vectors
    vectors = corpus_embeddings
    if vectors.ndim != 2 or len(vectors) != len(corpus):
        raise LeadkdError(f"corpus embeddings of shape {tuple(vectors.shape)} do not match {len(corpus)} passages")
    return vectors


def _pick(candidates: np.ndarray, negatives: int, seed: int, query_id: str) -> np.ndarray:
    """``negatives`` candidates uniformly without replacement, kept in rank order (hardest first).

    Seeded per query id, so a query's negatives do not change when other queries are added or dropped.
    """
    if len(candidates) <= negatives:
        return candidates
    rng = np.random.default_rng([seed, zlib.crc32(query_id.encode("utf-8"))])
    return candidates[np.sort(rng.choice(len(candidates), size=negatives, replace=False))]


class Ranker(Protocol):
    """The pluggable step of mining: a retriever that ranks corpus rows for query texts.

    ``rank`` returns, per query, at most ``depth`` corpus rows best first, none of them in that query's
    ``exclude`` set (positives and the query's own row), so that ranks count after the exclusion.
    ``settings`` says what ranked, for the mining report.
    """

    def settings(self) -> dict[str, Any]: ...

    def rank(self, query_texts: list[str], exclude: list[set[int]], depth: int) -> list[np.ndarray] | None: ...


class DenseRanker:
    """A dual encoder's exact inner-product top-``depth`` search, the corpus encoded once on first use.

    The search runs on the model's device (:func:`~leadkd.retrieval.pipeline.search_device`) unless
    ``device`` says otherwise; on a GPU the corpus vectors are copied there once when they fit
    (:func:`~leadkd.retrieval.search.documents_on`), else streamed for every chunk of queries.
    ``dtype``: ``"float16"``/``"bfloat16"`` halve what the GPU holds, at half precision's rounding.
    """

    def __init__(self, model, corpus, corpus_embeddings: Embeddings | np.ndarray | None = None,
                 batch_size: int = 64, show_progress: bool = False, device: torch.device | str | None = None,
                 dtype: str = "float32"):
        self.model, self.corpus, self.corpus_embeddings = model, corpus, corpus_embeddings
        self.batch_size, self.show_progress = batch_size, show_progress
        self.device = search_device(model) if device is None else torch.device(device)
        self.dtype = str(compute_dtype(dtype)).removeprefix("torch.")
        self._doc_vectors: ArrayLike | None = None

    def settings(self) -> dict[str, Any]:
        return {"retriever": "dense", "search_dtype": self.dtype}

    def rank(self, query_texts: list[str], exclude: list[set[int]], depth: int) -> list[np.ndarray] | None:
        """Under torchrun every process holds and searches its share of the corpus (on its own GPU when the
        model is on one) and rank 0 merges the shares' lists, exactly as one process ranks them; the other
        ranks get None."""
        share = share_of(len(self.corpus)) if dist.is_distributed() else None
        if self._doc_vectors is None:
            vectors = _corpus_vectors(self.model, self.corpus, self.corpus_embeddings, self.batch_size,
                                      self.show_progress, share)
            self._doc_vectors = documents_on(vectors, self.device, self.dtype)
        query_vectors = accel.encode_queries(self.model, query_texts, batch_size=self.batch_size,
                                             show_progress=self.show_progress)
        if query_vectors.shape[1] != self._doc_vectors.shape[1]:
            raise LeadkdError(f"query vectors have {query_vectors.shape[1]} dimensions but passage vectors "
                              f"{self._doc_vectors.shape[1]}: not the same model?")
        if share is None:
            _, ranked = exact_search(query_vectors, self._doc_vectors, depth, exclude=exclude, device=self.device,
                                     dtype=self.dtype)
        else:
            merged = search_shards(query_vectors, self._doc_vectors, share, depth, exclude=exclude,
                                   device=self.device, dtype=self.dtype)
            if merged is None:
                return None
            ranked = merged[1]
        return [row[row >= 0] for row in ranked]


def mine_hard_negatives(model, dataset, depth: int = 200, rank_range: tuple[int, int] = (10, 100),
                        negatives: int = 30, seed: int = 0, min_rel: int = 1, batch_size: int = 64,
                        corpus_embeddings: Embeddings | np.ndarray | None = None, show_progress: bool = False,
                        search_chunk: int = SEARCH_CHUNK, search_dtype: str = "float32"
                        ) -> tuple[TrainingGroups | None, MiningReport]:
    """Groups of (query, judged positives, sampled hard negatives) for every judged query of ``dataset``.

    ``dataset`` has ``corpus``, ``queries`` and ``qrels``; the split's queries are those with judgments.
    ``model`` needs ``encode_queries`` (and ``encode_passages`` unless ``corpus_embeddings`` — a saved
    :class:`Embeddings` of this corpus or an array in corpus row order — is given). Negatives are sampled
    from ranks ``rank_range`` of an exact top-``depth`` search with positives and the query's own id removed.

    The search runs on the model's device (its GPU when it is on one) in ``search_dtype`` (float32, or
    float16/bfloat16 operands with float32 accumulation). Under torchrun every process encodes (or takes
    from ``corpus_embeddings``) and searches its share of the corpus on its own device, rank 0 merges the
    shares' top-``depth`` lists, exactly as one process would rank them, and builds the groups; the other
    ranks get ``(None, report)``. Every process encodes all the queries.
    """
    ranker = DenseRanker(model, dataset.corpus, corpus_embeddings, batch_size=batch_size,
                         show_progress=show_progress, dtype=search_dtype)
    return mine_with_ranker(ranker, dataset, depth=depth, rank_range=rank_range, negatives=negatives, seed=seed,
                            min_rel=min_rel, search_chunk=search_chunk)


def mine_with_ranker(ranker: Ranker, dataset, depth: int = 200, rank_range: tuple[int, int] = (10, 100),
                     negatives: int = 30, seed: int = 0, min_rel: int = 1,
                     search_chunk: int = SEARCH_CHUNK) -> tuple[TrainingGroups | None, MiningReport]:
    """:func:`mine_hard_negatives` with any :class:`Ranker` (dense, BM25): the choice of queries, the
    exclusion of positives, ranks, sampling and the report are the same whatever ranked."""
    corpus, queries, qrels = dataset.corpus, dataset.queries, dataset.qrels
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    _check_settings(depth, rank_range, negatives, len(corpus))
    if search_chunk < 1:
        raise ConfigError(f"search_chunk must be >= 1, got {search_chunk}")
    start, end = rank_range
    report = MiningReport(settings={**ranker.settings(), "depth": depth, "rank_range": [start, end],
                                    "negatives": negatives, "seed": seed, "min_rel": min_rel})

    # Which queries can be mined: judged, with text, with at least one positive the corpus holds.
    judged = list(qrels.items())
    report.queries_judged = len(judged)
    qrows = queries.lookup([str(q) for q, _ in judged]).tolist()
    todo: list[tuple[str, int, list[int]]] = []  # (query id, query row, positive corpus rows)
    for (qid, judgments), qrow in zip(judged, qrows, strict=True):
        qid = str(qid)
        if qrow < 0:
            report.skipped_no_query += 1
            continue
        relevant = [str(d) for d, r in judgments.items() if r >= min_rel]
        rows = corpus.lookup(relevant).tolist() if relevant else []
        positives = [r for r in rows if r >= 0]
        report.positives_not_in_corpus += len(rows) - len(positives)
        if not positives:
            report.skipped_no_positive += 1
            continue
        todo.append((qid, qrow, positives))

    builder = GroupsBuilder(corpus, queries)
    self_rows = corpus.lookup([qid for qid, _, _ in todo]).tolist() if todo else []
    for lo in range(0, len(todo), search_chunk):
        chunk = todo[lo:lo + search_chunk]
        exclude = []
        for (_, _, positives), own in zip(chunk, self_rows[lo:lo + search_chunk], strict=True):
            banned = set(positives)
            report.positives_excluded += len(banned)
            if own >= 0:
                banned.add(own)
                report.self_excluded += 1
            exclude.append(banned)
        ranked = ranker.rank([queries.text(r) for _, r, _ in chunk], exclude, depth)
        if ranked is None:  # under torchrun, not rank 0: rank 0 builds the groups
            continue
        if len(ranked) != len(chunk):
            raise LeadkdError(f"internal error: the ranker returned {len(ranked)} lists for {len(chunk)} queries")
        for (qid, qrow, positives), banned, rows in zip(chunk, exclude, ranked, strict=True):
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) > depth or banned.intersection(rows.tolist()):  # rankers promise neither happens
                raise LeadkdError(f"internal error: the ranker returned an excluded passage or more than "
                                  f"{depth} for query {qid!r}")
            chosen = _pick(rows[start - 1:end - 1], negatives, seed, qid)
            builder.add(qid, positives, chosen.tolist(), query_row=qrow)
            _count_short(report, qid, len(chosen), negatives)
    if dist.is_distributed() and not dist.is_main_process():
        return None, report
    report.processed = len(builder)
    if not len(builder):
        raise LeadkdError(f"no query could be mined: {report.summary()}")
    return builder.build(), report


def _count_short(report: MiningReport, qid: str, got: int, wanted: int) -> None:
    if report.fewest_negatives is None or got < report.fewest_negatives:
        report.fewest_negatives = got
    if got < wanted:
        report.short_queries += 1
        report.missing_negatives += wanted - got
        if len(report.short_examples) < SHORT_EXAMPLES:
            report.short_examples.append((qid, got))
