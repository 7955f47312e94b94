"""Retrieval: exact search (torch), dense indexes (torch / faiss), and the runs they produce."""

from leadkd.retrieval.index import DenseIndex
from leadkd.retrieval.search import exact_search, to_run

__all__ = ["DenseIndex", "exact_search", "to_run"]
