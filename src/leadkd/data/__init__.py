"""Data layer: every corpus / query / qrels format read into one compact, validated in-memory form."""

from leadkd.data.collection import CollectionBuilder, Corpus, IdView, Qrels, Queries, TextCollection
from leadkd.data.datasets import Dataset, available_splits, load_corpus, load_dataset, resolve_dataset
from leadkd.data.formats import (
                                 DataWarning,
                                 check_qrels,
                                 read_beir_qrels,
                                 read_collection_tsv,
                                 read_corpus,
                                 read_corpus_jsonl,
                                 read_qrels,
                                 read_queries,
                                 read_queries_jsonl,
                                 read_queries_tsv,
                                 read_trec_qrels,
                                 write_beir_qrels,
                                 write_collection_tsv,
                                 write_corpus_jsonl,
                                 write_queries_jsonl,
                                 write_queries_tsv,
                                 write_trec_qrels,
)

__all__ = [
    "TextCollection", "Corpus", "Queries", "Qrels", "CollectionBuilder", "IdView",
    "Dataset", "load_dataset", "load_corpus", "resolve_dataset", "available_splits",
    "DataWarning", "check_qrels", "read_corpus_jsonl", "read_queries_jsonl", "read_collection_tsv",
    "read_queries_tsv", "read_corpus", "read_queries", "read_beir_qrels", "read_trec_qrels", "read_qrels",
    "write_corpus_jsonl", "write_queries_jsonl", "write_collection_tsv", "write_queries_tsv", "write_beir_qrels",
    "write_trec_qrels",
]
