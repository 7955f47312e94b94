"""BM25 ranking (bm25s) for `leadkd mine --retriever bm25`: hard negatives before any dense retriever exists.

DPR and the Tevatron recipes draw their first round of hard negatives from BM25. The defaults are those of
BEIR's BM25 baseline (Elasticsearch): k1 = 1.2, b = 0.75, Lucene's variant — a term scores
``idf * tf / (tf + k1 * (1 - b + b * len / avglen))`` with ``idf = log(1 + (N - df + 0.5) / (df + 0.5))``,
and a query scores the sum over its tokens, a repeated token counting each time. Tokens are bm25s's:
lower-cased ``\\w\\w+`` words without its English stop words. Elasticsearch's English analyzer also stems;
bm25s stems only with the PyStemmer package, which leadkd does not require, so by default nothing is
stemmed (pass ``stemmer=`` a callable on a list of words, e.g. ``Stemmer.Stemmer("english")``, to stem).

A passage that shares no token with the query scores 0 and is *not* a candidate: it was not retrieved,
and a random passage is no hard negative. Such queries come out short, and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError, LeadkdError

K1 = 1.2
B = 0.75
METHOD = "lucene"
STOPWORDS = "en"
INSTALL_HINT = "BM25 mining needs the bm25s package: pip install leadkd[bm25]"


def import_bm25s():
    """The bm25s module, or one clear error saying how to install it."""
    try:
        import bm25s
    except ImportError:
        raise LeadkdError(INSTALL_HINT) from None
    return bm25s


def top_rows(scores: np.ndarray, exclude: set[int], depth: int) -> np.ndarray:
    """Rows with a positive score, not in ``exclude``, best first (ties: lower row first), at most ``depth``."""
    scores = np.asarray(scores)  # read only: one query's scores over the whole corpus are not copied
    rows = np.flatnonzero(scores > 0)
    if exclude:
        rows = rows[~np.isin(rows, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))]
    if len(rows) > depth:  # keep every row tied with the depth-th score, then sort exactly
        cut = np.partition(scores[rows], len(rows) - depth)[len(rows) - depth]
        rows = rows[scores[rows] >= cut]
    return rows[np.lexsort((rows, -scores[rows]))][:depth]


class BM25Ranker:
    """A bm25s index of the corpus (built on first use) that ranks query texts for :func:`mine_with_ranker`."""

    def __init__(self, corpus, k1: float = K1, b: float = B, stemmer: Callable[[list[str]], list[str]] | None = None,
                 show_progress: bool = False):
        if not k1 >= 0:
            raise ConfigError(f"BM25 k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise ConfigError(f"BM25 b must be in [0, 1], got {b}")
        self.bm25s = import_bm25s()
        self.corpus, self.k1, self.b, self.stemmer = corpus, float(k1), float(b), stemmer
        self.show_progress = show_progress
        self._index = None

    def settings(self) -> dict[str, Any]:
        tokenizer = {"lower": True, "token_pattern": r"(?u)\b\w\w+\b", "stopwords": STOPWORDS,
                     "stemmer": None if self.stemmer is None else _name(self.stemmer)}
        return {"retriever": "bm25", "bm25": {
            "k1": self.k1, "b": self.b, "method": METHOD, "idf_method": METHOD, "tokenizer": tokenizer,
            "passage": "title + text", "zero_score_passages": "not candidates",
            "bm25s_version": getattr(self.bm25s, "__version__", None)}}

    def tokenize(self, texts: list[str], return_ids: bool):
        return self.bm25s.tokenize(texts, lower=True, stopwords=STOPWORDS, stemmer=self.stemmer,
                                   return_ids=return_ids, show_progress=self.show_progress)

    def index(self):
        """The bm25s retriever over the corpus, in corpus row order."""
        if self._index is None:
            texts = self.corpus.passages(range(len(self.corpus)))  # title and text, as BEIR indexes both
            retriever = self.bm25s.BM25(k1=self.k1, b=self.b, method=METHOD)
            retriever.index(self.tokenize(texts, return_ids=True), show_progress=self.show_progress)
            self._index = retriever
        return self._index

    def scores(self, query_texts: list[str]) -> np.ndarray:
        """BM25 scores ``[Q, N]`` of every passage; tokens the corpus lacks add nothing."""
        return np.stack([self._scores(tokens) for tokens in self.tokenize(query_texts, return_ids=False)])

    def rank(self, query_texts: list[str], exclude: list[set[int]], depth: int) -> list[np.ndarray]:
        if len(exclude) != len(query_texts):
            raise LeadkdError(f"internal error: {len(exclude)} exclusion sets for {len(query_texts)} queries")
        return [top_rows(self._scores(tokens), banned, depth)
                for tokens, banned in zip(self.tokenize(query_texts, return_ids=False), exclude, strict=True)]

    def _scores(self, tokens: list[str]) -> np.ndarray:
        retriever = self.index()
        columns = retriever.scores["indptr"].shape[0] - 1  # bm25s's added empty token "" has no column
        ids = [t for t in retriever.get_tokens_ids(tokens) if t < columns]
        if not ids:
            return np.zeros(len(self.corpus), dtype=np.float32)
        return retriever.get_scores_from_ids(ids)


def _name(stemmer) -> str:
    owner = getattr(stemmer, "__self__", None)
    return type(owner).__name__ if owner is not None else getattr(stemmer, "__name__", type(stemmer).__name__)
