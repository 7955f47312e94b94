"""Readers and writers for the corpus, query and qrels files of BEIR, MS MARCO and TREC.

Every reader validates as it goes and reports the first problem as one
:class:`~leadkd.runtime.errors.InputError` (``file:line: field 'x': message``): a bad input is found
when it is loaded, not hours later as a ``KeyError`` in training. Files are read as bytes in
large blocks and split on ``\\n`` only (so U+2028 inside JSON text stays text); a UTF-8 BOM and
CRLF line ends are removed, blank lines are skipped, ``.gz`` files are read transparently. In qrels,
as in trec_eval, a line whose first non-blank character is ``#`` is a comment and any integer is a
relevance (``-1`` marks a pooled but unjudged document).
Writers go through :func:`leadkd.runtime.fileio.atomic_write`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from leadkd.data.collection import Corpus, Qrels, Queries, TextCollection
from leadkd.runtime.errors import InputError, LeadkdError
from leadkd.runtime.fileio import atomic_write

__all__ = [
    "DataWarning", "read_corpus_jsonl", "read_queries_jsonl", "read_collection_tsv", "read_queries_tsv",
    "read_corpus", "read_queries", "read_beir_qrels", "read_trec_qrels", "read_qrels", "check_qrels",
    "write_corpus_jsonl", "write_queries_jsonl", "write_collection_tsv", "write_queries_tsv",
    "write_beir_qrels", "write_trec_qrels", "BEIR_QRELS_HEADER",
]

BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")
_BLOCK = 1 << 24
_BOM = b"\xef\xbb\xbf"
_TSV_BREAKS = "\t\n\r"
PathLike = str | os.PathLike


class DataWarning(UserWarning):
    """Something was dropped or repaired because the caller asked for leniency."""


# -- line reading ------------------------------------------------------------------------------------
def _open_binary(path: PathLike) -> io.BufferedIOBase:
    try:
        return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, not a file") from None


def _bad_utf8(path: PathLike, block: bytes, err: UnicodeDecodeError, first_line: int) -> InputError:
    line = first_line + block.count(b"\n", 0, err.start)
    col = err.start - (block.rfind(b"\n", 0, err.start) + 1) + 1
    return InputError(path, f"invalid UTF-8: byte 0x{block[err.start]:02x} at column {col}", line=line)


def _lines(path: PathLike, validate_utf8: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, line bytes) for the non-blank lines; BOM and CR removed.

    With ``validate_utf8`` each block is decoded once to check it (cheaper than per line), so
    callers can keep the bytes as they are.
    """
    with _open_binary(path) as f:
        lineno = 0
        rest = b""
        first = True
        while True:
            try:
                chunk = f.read(_BLOCK)
            except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz
                raise InputError(path, f"cannot read: {e}", line=lineno + 1) from None
            if first:
                first = False
                if chunk.startswith(_BOM):
                    chunk = chunk[len(_BOM):]
            if chunk:
                data = rest + chunk if rest else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                block, rest = data[:cut], data[cut + 1:]
            else:
                block, rest = rest, b""
            if validate_utf8:
                try:
                    block.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _bad_utf8(path, block, e, lineno + 1) from None
            for line in block.split(b"\n"):
                lineno += 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if line and not line.isspace():
                    yield lineno, line
            if not chunk:
                return


def _qrels_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    """:func:`_lines` without ``#`` comment lines, which trec_eval (and so every TREC tool) skips in qrels."""
    return ((n, line) for n, line in _lines(path) if not line.lstrip().startswith(b"#"))


def _record_lines(path: PathLike, rows: Sequence[int]) -> list[int]:
    """Line numbers of the given record numbers (one record per non-blank line); used only for errors."""
    want = dict.fromkeys(rows)
    for k, (lineno, _) in enumerate(_lines(path)):
        if k in want:
            want[k] = lineno
            if all(v is not None for v in want.values()):
                break
    return [want[r] or 0 for r in rows]


def _raise_duplicate(path: PathLike, coll: TextCollection, field: str) -> None:
    dup = coll._first_duplicate()
    if dup is not None:
        key, a, b = dup
        la, lb = _record_lines(path, [a, b])
        raise InputError(path, f"duplicate id {key!r} (first on line {la})", line=lb, field=field)


def _require_records(path: PathLike, coll: TextCollection) -> None:
    if len(coll) == 0:
        raise InputError(path, f"no {coll.kind} records (the file is empty or blank)")


# -- BEIR jsonl ----------------------------------------------------------------------------------------
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _utf8(path: PathLike, lineno: int, field: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(path, "contains an unpaired surrogate (a lone \\ud800-\\udfff escape)",
                         line=lineno, field=field) from None


def _read_jsonl(path: PathLike, cls: type[TextCollection], with_title: bool) -> TextCollection:
    builder = cls.builder(source=path)
    add = builder.add_utf8
    loads = json.loads
    for n, raw in _lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(path, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}",
                             line=n) from None
        try:
            obj = loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"invalid JSON: {e.msg} at column {e.colno}", line=n) from None
        if type(obj) is not dict:
            raise InputError(path, f"expected a JSON object, found {_json_type(obj)}", line=n)
        if "_id" not in obj:
            raise InputError(path, "missing", line=n, field="_id")
        id_ = obj["_id"]
        if type(id_) is int:
            id_ = str(id_)
        elif type(id_) is not str:
            raise InputError(path, f"must be a string or an integer, found {_json_type(id_)}", line=n, field="_id")
        if not id_:
            raise InputError(path, "empty", line=n, field="_id")
        text = obj.get("text")
        if type(text) is not str:
            what = "missing" if "text" not in obj else f"must be a string, found {_json_type(text)}"
            raise InputError(path, what, line=n, field="text")
        title: str | None  # None only until a missing JSON title becomes ""
        title = ""
        if with_title:
            title = obj.get("title")
            if title is None:
                title = ""
            elif type(title) is not str:
                raise InputError(path, f"must be a string, found {_json_type(title)}", line=n, field="title")
        if not text.strip() and not title.strip():
            raise InputError(path, "empty (and no title)" if with_title else "empty", line=n, field="text")
        add(_utf8(path, n, "_id", id_), _utf8(path, n, "text", text), _utf8(path, n, "title", title))
    coll = builder.build(check_unique=False)
    _require_records(path, coll)
    _raise_duplicate(path, coll, "_id")
    return coll


def read_corpus_jsonl(path: PathLike) -> Corpus:
    """BEIR ``corpus.jsonl``: one object per line with ``_id`` (string or integer), ``text``, optional ``title``.

    Other keys (``metadata``...) are ignored. A record needs a non-blank text or title.
    """
    return _read_jsonl(path, Corpus, with_title=True)  # type: ignore[return-value]


def read_queries_jsonl(path: PathLike) -> Queries:
    """BEIR ``queries.jsonl``: one object per line with ``_id`` and a non-blank ``text``."""
    return _read_jsonl(path, Queries, with_title=False)  # type: ignore[return-value]


# -- MS MARCO tsv --------------------------------------------------------------------------------------
def _read_tsv(path: PathLike, cls: type[TextCollection], layouts: dict[int, tuple[str, ...]]) -> TextCollection:
    builder = cls.builder(source=path)
    add = builder.add_utf8
    ncols = 0
    first = 0
    names: tuple[str, ...] = ()
    for n, line in _lines(path, validate_utf8=True):
        parts = line.split(b"\t")
        if len(parts) != ncols:
            if ncols == 0 and len(parts) in layouts:
                ncols, first, names = len(parts), n, layouts[len(parts)]
            else:
                if ncols == 0:
                    expected = " or ".join(f"{k} ({', '.join(v)})" for k, v in layouts.items())
                    expected += " tab-separated columns"
                else:
                    expected = f"{ncols} ({', '.join(names)}) tab-separated columns as on line {first}"
                raise InputError(path, f"expected {expected}, found {len(parts)}", line=n)
        if ncols == 2:
            pid, text = parts
            title = b""
        else:
            pid, title, text = parts
        if not pid or pid.isspace():
            raise InputError(path, "empty", line=n, field=names[0])
        if (not text or text.isspace()) and (not title or title.isspace()):
            raise InputError(path, "empty (and no title)" if ncols == 3 else "empty", line=n, field="text")
        add(pid, text, title)
    coll = builder.build(check_unique=False)
    _require_records(path, coll)
    _raise_duplicate(path, coll, names[0])
    return coll


def read_collection_tsv(path: PathLike) -> Corpus:
    """MS MARCO ``collection.tsv``: ``pid<TAB>text`` or ``pid<TAB>title<TAB>text`` (one layout per file)."""
    return _read_tsv(path, Corpus, {2: ("pid", "text"), 3: ("pid", "title", "text")})  # type: ignore[return-value]


def read_queries_tsv(path: PathLike) -> Queries:
    """MS MARCO ``queries.<split>.tsv``: ``qid<TAB>text``."""
    return _read_tsv(path, Queries, {2: ("qid", "text")})  # type: ignore[return-value]


def _stem(path: PathLike) -> str:
    name = Path(path).name
    return name[:-3] if name.endswith(".gz") else name


def read_corpus(path: PathLike) -> Corpus:
    """A corpus file by extension: ``.jsonl`` (BEIR) or ``.tsv`` (MS MARCO), optionally ``.gz``."""
    name = _stem(path)
    if name.endswith(".jsonl"):
        return read_corpus_jsonl(path)
    if name.endswith(".tsv"):
        return read_collection_tsv(path)
    raise InputError(path, "unknown corpus format: expected a .jsonl (BEIR) or .tsv (MS MARCO) file")


def read_queries(path: PathLike) -> Queries:
    """A queries file by extension: ``.jsonl`` (BEIR) or ``.tsv`` (MS MARCO), optionally ``.gz``."""
    name = _stem(path)
    if name.endswith(".jsonl"):
        return read_queries_jsonl(path)
    if name.endswith(".tsv"):
        return read_queries_tsv(path)
    raise InputError(path, "unknown queries format: expected a .jsonl (BEIR) or .tsv (MS MARCO) file")


# -- qrels ---------------------------------------------------------------------------------------------
class _Judgments:
    """Judgments in file order with their line numbers, before validation."""

    def __init__(self, path: PathLike, qfield: str, dfield: str, with_lines: bool = True):
        self.path = path
        self.qfield, self.dfield = qfield, dfield
        self.qids: list[str] = []
        self.dids: list[str] = []
        self.rels: list[int] = []
        self.lines: list[int] | None = [] if with_lines else None


def _decode(path: PathLike, n: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}", line=n) from None


def _relevance(path: PathLike, n: int, field: str, value: str) -> int:
    """Any integer: trec_eval >= 8.1 writes -1 for pooled but unjudged documents (infAP), and every
    evaluator counts rel <= 0 as not relevant, so negatives are legal in TREC and BEIR files alike."""
    try:
        rel = int(value)
    except ValueError:
        try:
            f = float(value)
        except ValueError:
            raise InputError(path, f"{value!r} is not a number", line=n, field=field) from None
        if not f.is_integer():
            raise InputError(path, f"{value!r} is not an integer", line=n, field=field) from None
        rel = int(f)
    return rel


def _add(j: _Judgments, n: int, qid: str, did: str, rel: int) -> None:
    if not qid:
        raise InputError(j.path, "empty", line=n, field=j.qfield)
    if not did:
        raise InputError(j.path, "empty", line=n, field=j.dfield)
    j.qids.append(qid)
    j.dids.append(did)
    j.rels.append(rel)
    j.lines.append(n)  # type: ignore[union-attr]


def _beir_rows(path: PathLike, lines: Iterator[tuple[int, bytes]]) -> _Judgments:
    j = _Judgments(path, "query-id", "corpus-id")
    header = next(lines, None)
    if header is None:
        raise InputError(path, "empty file: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    n, raw = header
    cols: Sequence[str] = tuple(_decode(path, n, raw).split("\t"))
    if tuple(c.strip() for c in cols) != BEIR_QRELS_HEADER:
        shown = "<TAB>".join(cols)
        raise InputError(path, f"expected the header 'query-id<TAB>corpus-id<TAB>score', found {shown!r}", line=n)
    for n, raw in lines:
        cols = _decode(path, n, raw).split("\t")
        if len(cols) != 3:
            raise InputError(path, f"expected 3 tab-separated columns (query-id, corpus-id, score), found {len(cols)}",
                             line=n)
        _add(j, n, cols[0], cols[1], _relevance(path, n, "score", cols[2].strip()))
    return j


def _trec_rows(path: PathLike, lines: Iterator[tuple[int, bytes]]) -> _Judgments:
    j = _Judgments(path, "qid", "docid")
    ncols = 0
    first = 0
    for n, raw in lines:
        cols = _decode(path, n, raw).split()
        if ncols == 0:
            if len(cols) not in (2, 4):
                raise InputError(path, f"expected 4 columns (qid iter docid rel) or 2 columns (qid docid), "
                                       f"found {len(cols)}", line=n)
            ncols, first = len(cols), n
        elif len(cols) != ncols:
            layout = "qid iter docid rel" if ncols == 4 else "qid docid"
            raise InputError(path, f"expected {ncols} columns ({layout}) as on line {first}, found {len(cols)}",
                             line=n)
        if ncols == 4:
            _add(j, n, cols[0], cols[2], _relevance(path, n, "rel", cols[3]))
        else:
            _add(j, n, cols[0], cols[1], 1)
    return j


def _no_judgments(path: PathLike) -> InputError:
    return InputError(path, "no judgments (the file is empty, blank or only comments)")


def read_beir_qrels(path: PathLike, corpus: TextCollection | None = None, queries: TextCollection | None = None,
                    lenient: bool = False) -> Qrels:
    """BEIR ``qrels/<split>.tsv``: header ``query-id<TAB>corpus-id<TAB>score``, then one judgment per line.

    With ``corpus``/``queries`` given, every id must exist there (see :func:`check_qrels`).
    """
    j = _beir_rows(path, _qrels_lines(path))
    if not j.qids:
        raise _no_judgments(path)
    return _assemble(j, corpus, queries, lenient)


def read_trec_qrels(path: PathLike, corpus: TextCollection | None = None, queries: TextCollection | None = None,
                    lenient: bool = False) -> Qrels:
    """TREC qrels ``qid iter docid rel`` (whitespace-separated), or the 2-column ``qid docid`` form
    (MS MARCO / RocketQA training pairs) where every listed pair has relevance 1."""
    j = _trec_rows(path, _qrels_lines(path))
    if not j.qids:
        raise _no_judgments(path)
    return _assemble(j, corpus, queries, lenient)


def read_qrels(path: PathLike, corpus: TextCollection | None = None, queries: TextCollection | None = None,
               lenient: bool = False) -> Qrels:
    """Any qrels file, format told by its first line that is not a comment: the BEIR header, 4 columns
    (TREC) or 2 (pairs).

    A 3-column first line that is not the BEIR header is reported as a wrong header.
    """
    lines = _qrels_lines(path)
    first = next(lines, None)
    if first is None:
        raise _no_judgments(path)
    n, raw = first
    text = _decode(path, n, raw)

    def again() -> Iterator[tuple[int, bytes]]:
        yield first
        yield from lines

    if len(text.split("\t")) == 3 or len(text.split()) == 3:
        j = _beir_rows(path, again())
    else:
        j = _trec_rows(path, again())
    if not j.qids:
        raise _no_judgments(path)
    return _assemble(j, corpus, queries, lenient)


def check_qrels(qrels: dict[str, dict[str, int]], corpus: TextCollection | None = None,
                queries: TextCollection | None = None, lenient: bool = False, source: str = "<qrels>") -> Qrels:
    """Validate in-memory qrels against a corpus and queries; returns a (possibly filtered) Qrels copy.

    Unknown ids raise InputError, or with ``lenient`` the judgments naming them are dropped with a
    :class:`DataWarning` giving the count.
    """
    j = _Judgments(source, "query-id", "corpus-id", with_lines=False)
    for q, docs in qrels.items():
        for d, r in docs.items():
            j.qids.append(str(q))
            j.dids.append(str(d))
            j.rels.append(int(r))
    return _assemble(j, corpus, queries, lenient)


def _missing(coll: TextCollection | None, ids: list[str]) -> set[str]:
    if coll is None:
        return set()
    unique = list(dict.fromkeys(ids))
    rows = coll.lookup(unique)
    return {i for i, r in zip(unique, rows.tolist(), strict=True) if r < 0}


def _assemble(j: _Judgments, corpus: TextCollection | None, queries: TextCollection | None,
              lenient: bool) -> Qrels:
    path = str(j.path)
    miss_q, miss_d = _missing(queries, j.qids), _missing(corpus, j.dids)
    drop: set[int] = set()
    if miss_q or miss_d:
        drop = {k for k, (q, d) in enumerate(zip(j.qids, j.dids, strict=True)) if q in miss_q or d in miss_d}
        if not lenient:
            k = min(drop)
            line = j.lines[k] if j.lines is not None else None
            if j.qids[k] in miss_q:
                what, field, src = f"query id {j.qids[k]!r}", j.qfield, queries
            else:
                what, field, src = f"document id {j.dids[k]!r}", j.dfield, corpus
            where = f" ({src.source})" if src is not None and src.source else ""
            raise InputError(path, f"{what} is not in the {src.kind if src is not None else ''} collection{where}; "
                                   f"{len(drop)} of {len(j.qids)} judgments name unknown ids "
                                   f"({len(miss_q)} query ids, {len(miss_d)} document ids); "
                                   "pass --lenient (lenient=True) to drop them", line=line, field=field)
        warnings.warn(f"{path}: dropped {len(drop)} of {len(j.qids)} judgments naming ids absent from the "
                      f"queries/corpus ({len(miss_q)} query ids, {len(miss_d)} document ids)", DataWarning,
                      stacklevel=3)
    out = Qrels()
    for k, (q, d, r) in enumerate(zip(j.qids, j.dids, j.rels, strict=True)):
        if k in drop:
            continue
        docs = out.get(q)
        if docs is None:
            docs = out[q] = {}
        elif d in docs:
            first = next(i for i in range(k) if j.qids[i] == q and j.dids[i] == d)
            line = j.lines[k] if j.lines is not None else None
            again = f" (first on line {j.lines[first]})" if j.lines is not None else ""
            raise InputError(path, f"duplicate judgment of query {q!r} and document {d!r}{again}", line=line,
                             field=j.dfield)
        docs[d] = r
    return out


# -- writers -------------------------------------------------------------------------------------------
def _writable(path: PathLike, kind: str, value: str, forbidden: str) -> str:
    bad = next((c for c in value if c in forbidden), None)
    if bad is not None or not value:
        why = "it is empty" if not value else f"it contains {bad!r}"
        raise LeadkdError(f"{path}: cannot write {kind} {value!r}: {why}")
    return value


def _first_column(path: PathLike, qid: str) -> str:
    """A query id opens its qrels line, and a line opening with '#' would be read back as a comment."""
    if qid.lstrip().startswith("#"):
        raise LeadkdError(f"{path}: cannot write query id {qid!r}: a line starting with '#' is a comment")
    return qid


def write_corpus_jsonl(path: PathLike, corpus: TextCollection) -> None:
    """BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``), UTF-8, non-ASCII kept literal."""
    with atomic_write(path) as f:
        for id_, title, text in corpus.records():
            f.write(json.dumps({"_id": id_, "title": title, "text": text}, ensure_ascii=False))
            f.write("\n")


def write_queries_jsonl(path: PathLike, queries: TextCollection) -> None:
    """BEIR ``queries.jsonl`` (``_id``, ``text``)."""
    with atomic_write(path) as f:
        for id_, _, text in queries.records():
            f.write(json.dumps({"_id": id_, "text": text}, ensure_ascii=False))
            f.write("\n")


def _write_tsv(path: PathLike, coll: TextCollection, id_name: str, with_title: bool) -> None:
    with atomic_write(path) as f:
        for id_, title, text in coll.records():
            cols = [_writable(path, id_name, id_, _TSV_BREAKS)]
            if with_title:
                cols.append(_check_cell(path, "title", title))
            cols.append(_check_cell(path, "text", text))
            f.write("\t".join(cols))
            f.write("\n")


def _check_cell(path: PathLike, kind: str, value: str) -> str:
    if "\t" in value or "\n" in value or "\r" in value:
        raise LeadkdError(f"{path}: cannot write {kind} {value[:40]!r}... as TSV: it contains a tab or line break")
    return value


def write_collection_tsv(path: PathLike, corpus: TextCollection) -> None:
    """MS MARCO ``collection.tsv``: ``pid<TAB>text``, or ``pid<TAB>title<TAB>text`` when the corpus has titles."""
    _write_tsv(path, corpus, "pid", corpus.has_titles)


def write_queries_tsv(path: PathLike, queries: TextCollection) -> None:
    """MS MARCO ``queries.<split>.tsv``: ``qid<TAB>text``."""
    _write_tsv(path, queries, "qid", False)


def _judgments(qrels: dict[str, dict[str, int]]) -> Iterable[tuple[str, str, int]]:
    for q, docs in qrels.items():
        for d, r in docs.items():
            yield q, d, r


def write_beir_qrels(path: PathLike, qrels: dict[str, dict[str, int]]) -> None:
    """BEIR ``qrels/<split>.tsv`` with its header, in the qrels' own order."""
    with atomic_write(path) as f:
        f.write("\t".join(BEIR_QRELS_HEADER) + "\n")
        for q, d, r in _judgments(qrels):
            q = _first_column(path, _writable(path, "query id", q, _TSV_BREAKS))
            d = _writable(path, "document id", d, _TSV_BREAKS)
            f.write(f"{q}\t{d}\t{int(r)}\n")


def write_trec_qrels(path: PathLike, qrels: dict[str, dict[str, int]]) -> None:
    """TREC qrels ``qid 0 docid rel``; ids must not contain whitespace."""
    with atomic_write(path) as f:
        for q, d, r in _judgments(qrels):
            for kind, value in (("query id", q), ("document id", d)):
                _writable(path, kind, value, "")
                if any(c.isspace() for c in value):
                    raise LeadkdError(f"{path}: cannot write {kind} {value!r} in TREC qrels: it contains whitespace")
            _first_column(path, q)
            f.write(f"{q} 0 {d} {int(r)}\n")
