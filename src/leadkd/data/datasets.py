"""Turn what a user names (a folder, a dataset name, an ir_datasets id) into a validated :class:`Dataset`.

Resolution order for ``spec``:

1. ``irds:<id>`` -- loaded through ``ir_datasets`` (optional dependency, ``pip install leadkd[irds]``);
2. an existing folder -- BEIR layout (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) or
   MS MARCO layout (``collection.tsv``, ``queries.<split>.tsv``, ``qrels.<split>.tsv``);
3. a name -- the folder ``<data_dir>/<name>``, where ``data_dir`` defaults to ``$LEADKD_DATA_DIR``.

Nothing is downloaded. Qrels are always checked against the corpus and queries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leadkd.data.collection import Corpus, Qrels, Queries
from leadkd.data.formats import (
    check_qrels,
    read_collection_tsv,
    read_corpus,
    read_corpus_jsonl,
    read_qrels,
    read_queries_jsonl,
    read_queries_tsv,
)
from leadkd.runtime.errors import InputError, LeadkdError

__all__ = ["Dataset", "load_dataset", "load_corpus", "load_split_queries", "resolve_dataset", "available_splits",
           "export_irds", "DATA_DIR_ENV"]

DATA_DIR_ENV = "LEADKD_DATA_DIR"
_QRELS_SUFFIXES = (".tsv", ".trec", ".txt")
_LAYOUTS = ("a dataset folder (BEIR: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; or MS MARCO: collection.tsv, "
            "queries.<split>.tsv, qrels.<split>.tsv), a dataset name under $LEADKD_DATA_DIR, or irds:<ir_datasets id>")


@dataclass
class Dataset:
    """One split of a retrieval dataset: the whole corpus, the queries judged in the split, their qrels."""

    name: str
    split: str
    corpus: Corpus
    queries: Queries
    qrels: Qrels
    source: str | None = None

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, split={self.split!r}: {len(self.corpus)} passages, {len(self.queries)} "
                f"queries, {self.qrels.num_judgments()} judgments)")


# -- resolution ----------------------------------------------------------------------------------------
def _existing(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _layout(folder: Path) -> str | None:
    if _existing(folder, "corpus.jsonl"):
        return "beir"
    if _existing(folder, "collection.tsv"):
        return "msmarco"
    return None


def resolve_dataset(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str | Path:
    """The ir_datasets id (``str``, for ``irds:`` specs) or the path a spec names; LeadkdError if none.

    A path that exists is taken as it is (a file is returned too, for :func:`load_corpus`).
    """
    text = str(spec)
    if text.startswith("irds:"):
        return text[len("irds:"):]
    path = Path(text).expanduser()
    if path.exists():
        return path
    root_text = str(data_dir) if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not root_text:
        raise LeadkdError(f"dataset {text!r} not found: no such folder, and ${DATA_DIR_ENV} is not set "
                          f"(set it to the folder holding your datasets, or pass data_dir); pass {_LAYOUTS}")
    root = Path(root_text).expanduser()
    origin = "data_dir" if data_dir is not None else f"${DATA_DIR_ENV}"
    if not root.is_dir():
        raise LeadkdError(f"dataset {text!r} not found: {origin}={root} is not a folder; pass {_LAYOUTS}")
    if (root / text).exists():
        return root / text
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "nothing"
    raise LeadkdError(f"dataset {text!r} not found: no such folder, nor under {origin}={root} (which holds: {shown}); "
                      f"pass {_LAYOUTS}")


def available_splits(folder: str | os.PathLike) -> list[str]:
    """Splits that have a qrels file: ``qrels/<split>.tsv|.trec|.txt`` (BEIR) or ``qrels.<split>.tsv`` (MS MARCO)."""
    folder = Path(folder)
    found: set[str] = set()
    if _layout(folder) == "beir":
        qdir = folder / "qrels"
        if qdir.is_dir():
            for p in qdir.iterdir():
                name = p.name[:-3] if p.name.endswith(".gz") else p.name
                for suffix in _QRELS_SUFFIXES:
                    if name.endswith(suffix) and p.is_file():
                        found.add(name[: -len(suffix)])
    else:
        for p in folder.glob("qrels.*"):
            name = p.name[:-3] if p.name.endswith(".gz") else p.name
            if name.endswith(".tsv") and p.is_file():
                found.add(name[len("qrels."):-len(".tsv")])
    return sorted(found)


def _qrels_file(folder: Path, layout: str, split: str) -> Path:
    if layout == "beir":
        tried = [f"qrels/{split}{s}" for s in _QRELS_SUFFIXES]
    else:
        tried = [f"qrels.{split}.tsv"]
    for rel in tried:
        hit = _existing(folder, rel)
        if hit:
            return hit
    splits = available_splits(folder)
    have = f"available splits: {', '.join(splits)}" if splits else "the folder has no qrels files"
    raise LeadkdError(f"{folder}: no qrels for split {split!r} (looked for {tried[0]}); {have}")


def _no_layout(folder: Path) -> LeadkdError:
    return LeadkdError(f"{folder}: not a dataset folder: it holds neither corpus.jsonl (BEIR) nor collection.tsv "
                       "(MS MARCO)")


def _folder_and_layout(spec, data_dir) -> tuple:
    """``(folder, "beir" | "msmarco")`` for a dataset folder, ``(ir_datasets id, None)`` for ``irds:``."""
    target = resolve_dataset(spec, data_dir)
    if isinstance(target, str):
        return target, None
    if not target.is_dir():
        raise LeadkdError(f"{target}: a dataset is a folder, not a file; pass {_LAYOUTS}")
    layout = _layout(target)
    if layout is None:
        raise _no_layout(target)
    return target, layout


# -- loading -------------------------------------------------------------------------------------------
def load_dataset(spec: str | os.PathLike, split: str = "test", lenient: bool = False,
                 data_dir: str | os.PathLike | None = None, corpus: Corpus | None = None) -> Dataset:
    """Load one split of a dataset (see the module docstring for what ``spec`` may be).

    ``corpus``: this folder's corpus, already loaded (e.g. by a trainer), used instead of reading it again.

    ``Dataset.queries`` keeps only the queries judged in ``split`` (a BEIR ``queries.jsonl`` holds
    every split's). Judgments naming unknown queries or passages raise InputError, or with
    ``lenient`` are dropped with a warning. For ``irds:`` specs the id names the split already;
    ``split`` is then ignored and ``Dataset.split`` is the id's last part.
    """
    target, layout = _folder_and_layout(spec, data_dir)
    if layout is None:
        return _load_irds(target, lenient)
    qrels_path = _qrels_file(target, layout, split)  # before the slow corpus read: fail fast
    if layout == "beir":
        queries_path = _existing(target, "queries.jsonl")
        if queries_path is None:
            raise LeadkdError(f"{target}: BEIR folder without queries.jsonl")
        if corpus is None:
            corpus = read_corpus_jsonl(_existing(target, "corpus.jsonl"))  # type: ignore[arg-type]
        queries = read_queries_jsonl(queries_path)
    else:
        queries_path = _existing(target, f"queries.{split}.tsv")
        if queries_path is None:
            raise LeadkdError(f"{target}: MS MARCO folder without queries.{split}.tsv for split {split!r}")
        if corpus is None:
            corpus = read_collection_tsv(_existing(target, "collection.tsv"))  # type: ignore[arg-type]
        queries = read_queries_tsv(queries_path)
    qrels = read_qrels(qrels_path, corpus=corpus, queries=queries, lenient=lenient)
    return Dataset(target.name, split, corpus, _judged(queries, qrels), qrels, source=str(target))


def load_corpus(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Corpus:
    """Only the corpus: a corpus file (``.jsonl``/``.tsv``), a dataset folder or name, or ``irds:<id>``."""
    target = resolve_dataset(spec, data_dir)
    if isinstance(target, str):
        return _irds_corpus(_irds(target), target)
    if target.is_file():
        return read_corpus(target)
    layout = _layout(target)
    if layout == "beir":
        return read_corpus_jsonl(_existing(target, "corpus.jsonl"))  # type: ignore[arg-type]
    if layout == "msmarco":
        return read_collection_tsv(_existing(target, "collection.tsv"))  # type: ignore[arg-type]
    raise _no_layout(target)


def load_queries(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Queries | None:
    """Every query of a BEIR folder (``queries.jsonl``), so training groups may name queries by id alone.

    None for other layouts (MS MARCO keeps one query file per split; groups then carry query texts).
    """
    target = resolve_dataset(spec, data_dir)
    if isinstance(target, str) or not target.is_dir() or _layout(target) != "beir":
        return None
    path = _existing(target, "queries.jsonl")
    return read_queries_jsonl(path) if path else None


def load_split_queries(spec: str | os.PathLike, split: str = "test", lenient: bool = False,
                       data_dir: str | os.PathLike | None = None) -> Queries:
    """The queries of one split, without reading the corpus (encoding queries needs no passages).

    With qrels for ``split``, the queries judged in it (as :func:`load_dataset` gives them; judgments
    naming unknown queries raise, or with ``lenient`` are dropped); without, every query of the split's
    query file (BEIR: ``queries.jsonl``; MS MARCO: ``queries.<split>.tsv``). Judgments are not checked
    against the corpus here: nothing is evaluated.
    """
    target, layout = _folder_and_layout(spec, data_dir)
    if layout is None:
        return _irds_queries(target, lenient)
    name = "queries.jsonl" if layout == "beir" else f"queries.{split}.tsv"
    path = _existing(target, name)
    if path is None:
        raise LeadkdError(f"{target}: no {name}: encoding queries needs the split's queries")
    queries = read_queries_jsonl(path) if layout == "beir" else read_queries_tsv(path)
    if split not in available_splits(target):
        return queries
    qrels = read_qrels(_qrels_file(target, layout, split), queries=queries, lenient=lenient)
    return _judged(queries, qrels)


def _judged(queries: Queries, qrels: Qrels) -> Queries:
    rows = queries.lookup(list(qrels))
    rows.sort()
    return queries.subset(rows)


# -- ir_datasets ---------------------------------------------------------------------------------------
def _irds_module(dataset_id: str):
    try:
        import ir_datasets
    except ImportError:
        raise LeadkdError(f"'irds:{dataset_id}' needs the ir_datasets package: pip install leadkd[irds]") from None
    return ir_datasets


def _irds(dataset_id: str):
    ir_datasets = _irds_module(dataset_id)
    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise LeadkdError(f"ir_datasets has no dataset {dataset_id!r} (see https://ir-datasets.com)") from None


def _text_of(record) -> str:
    text = getattr(record, "text", None)
    if text is None and hasattr(record, "default_text"):
        text = record.default_text()
    return text or ""


def _irds_corpus(ds, dataset_id: str) -> Corpus:
    source = f"irds:{dataset_id}"
    if not ds.has_docs():
        raise LeadkdError(f"{source}: this ir_datasets id has no documents")
    builder = Corpus.builder(source=source)
    for doc in ds.docs_iter():
        title = getattr(doc, "title", "") or ""
        text = _text_of(doc)
        if not text.strip() and not title.strip():
            raise InputError(source, f"document {doc.doc_id!r} is empty (and has no title)", field="text")
        builder.add(doc.doc_id, text, title)
    corpus = builder.build()
    if len(corpus) == 0:
        raise InputError(source, "no documents")
    return corpus  # type: ignore[return-value]


def _irds_judged(ds, dataset_id: str, corpus: Corpus, lenient: bool) -> tuple[Queries, Qrels]:
    """The queries judged in one ir_datasets split, and their checked qrels."""
    source = f"irds:{dataset_id}"
    _require_judgments(ds, dataset_id)
    queries = _irds_query_collection(ds, source)
    qrels = check_qrels(_irds_raw_qrels(ds), corpus=corpus, queries=queries, lenient=lenient, source=source)
    return _judged(queries, qrels), qrels


def _irds_raw_qrels(ds) -> dict[str, dict[str, int]]:
    """An ir_datasets split's judgments as ``{query: {doc: relevance}}``, unchecked."""
    raw: dict[str, dict[str, int]] = {}
    for j in ds.qrels_iter():
        raw.setdefault(j.query_id, {})[j.doc_id] = int(j.relevance)
    return raw


def _irds_query_collection(ds, source: str) -> Queries:
    qb = Queries.builder(source=source)
    for q in ds.queries_iter():
        text = _text_of(q)
        if not text.strip():
            raise InputError(source, f"query {q.query_id!r} is empty", field="text")
        qb.add(q.query_id, text)
    return qb.build()  # type: ignore[return-value]


def _irds_queries(dataset_id: str, lenient: bool) -> Queries:
    """An ir_datasets id's queries (judged ones, when it has qrels), without iterating its documents."""
    source = f"irds:{dataset_id}"
    ds = _irds(dataset_id)
    if not ds.has_queries():
        raise LeadkdError(f"{source}: this ir_datasets id has no queries; name a split, e.g. irds:beir/scifact/test")
    queries = _irds_query_collection(ds, source)
    if not ds.has_qrels():
        return queries
    return _judged(queries, check_qrels(_irds_raw_qrels(ds), queries=queries, lenient=lenient, source=source))


def _require_judgments(ds, dataset_id: str) -> None:
    if not ds.has_queries() or not ds.has_qrels():
        raise LeadkdError(f"irds:{dataset_id}: this ir_datasets id has no queries or no qrels; name a split, "
                          "e.g. irds:beir/scifact/test")


def _load_irds(dataset_id: str, lenient: bool) -> Dataset:
    ds = _irds(dataset_id)
    _require_judgments(ds, dataset_id)  # before the slow corpus read
    corpus = _irds_corpus(ds, dataset_id)
    queries, qrels = _irds_judged(ds, dataset_id, corpus, lenient)
    source = f"irds:{dataset_id}"
    return Dataset(source, dataset_id.rsplit("/", 1)[-1], corpus, queries, qrels, source=source)


def export_irds(dataset_id: str, target: str | os.PathLike, splits: Sequence[str] = ("train", "dev", "test"),
                lenient: bool = False) -> list[str]:
    """Write the ir_datasets splits ``<dataset_id>/<split>`` that exist as one BEIR folder; returns them.

    Commands that need several splits of one dataset on disk (the quickstart: train, dev, test; a
    training config's ``data.corpus``) then read it like any local folder. The corpus is read once (the
    splits of a BEIR dataset in ir_datasets share their documents); the folder appears whole or not at all.
    """
    from leadkd.data.formats import write_beir_qrels, write_corpus_jsonl, write_queries_jsonl
    from leadkd.runtime.fileio import atomic_directory

    _irds_module(dataset_id)  # a missing package is its own error, not "no such split"
    found = {}
    for split in splits:
        try:
            found[split] = _irds(f"{dataset_id}/{split}")
        except LeadkdError:
            continue
    if not found:
        raise LeadkdError(f"irds:{dataset_id}: ir_datasets has none of the splits {dataset_id}/"
                          f"{{{','.join(splits)}}}; name the dataset without its split, e.g. irds:beir/scifact")
    first = next(iter(found))
    corpus = _irds_corpus(found[first], f"{dataset_id}/{first}")
    texts: dict[str, str] = {}
    with atomic_directory(target) as tmp:
        write_corpus_jsonl(tmp / "corpus.jsonl", corpus)
        for split, ds in found.items():
            queries, qrels = _irds_judged(ds, f"{dataset_id}/{split}", corpus, lenient)
            for row in range(len(queries)):
                texts.setdefault(queries.id_at(row), queries.text(row))
            write_beir_qrels(tmp / "qrels" / f"{split}.tsv", qrels)
        write_queries_jsonl(tmp / "queries.jsonl", Queries.from_records(list(texts), list(texts.values())))
    return list(found)
