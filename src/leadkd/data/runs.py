"""TREC run files: ``qid Q0 docid rank score tag``, one retrieved document per line.

Order and ties: a run is ``{query_id: {doc_id: score}}``; its ranking is score descending, and equal
scores are ordered by doc id *descending* (plain string comparison). That is the order trec_eval (and so
pytrec_eval, BEIR, ir-measures' pytrec_eval provider) evaluates in, whatever the rank column says, so
the rank column we write is the rank every evaluator will use. :mod:`leadkd.retrieval.evaluate` ranks the same way.

Reading: ties are allowed; the rank column must be an integer but is otherwise ignored (as trec_eval
does); the second column and any fields after the run tag are ignored, and a line whose first non-blank
character is ``#`` is a comment, as in trec_eval; a repeated (query, document) pair is an error, since
evaluators would silently keep one of the two scores. Files ending in ``.gz`` are (de)compressed
transparently.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from leadkd.data.formats import _lines
from leadkd.runtime.errors import InputError, LeadkdError
from leadkd.runtime.fileio import atomic_write, reporting_write_failures

Run = dict[str, dict[str, float]]


def ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """``docs`` as (doc_id, score) best first: score desc, then doc id desc (trec_eval's order)."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def _check_token(value: str, what: str) -> None:
    if not value or any(ch.isspace() for ch in value):
        raise LeadkdError(f"{what} {value!r} cannot be written to a TREC run: it is empty or contains whitespace")


@contextlib.contextmanager
def _open_text_for_write(path: Path) -> Iterator[IO[str]]:
    if path.suffix == ".gz":
        with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed, \
                io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as text:
            yield text
    else:
        with atomic_write(path) as text:
            yield text


def write_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str = "leadkd",
              k: int | None = None) -> Path:
    """Write ``run`` atomically, queries in the run's order, each ranked by :func:`ranked` from rank 1.

    ``k`` keeps the best ``k`` documents per query. Scores are written with full float precision
    (``repr``), so :func:`read_run` gives back exactly the same numbers and no ties appear by rounding.
    """
    path = Path(path)
    _check_token(tag, "run tag")
    if k is not None and k < 1:
        raise LeadkdError(f"k must be at least 1, got {k}")
    with reporting_write_failures(path, "run file"), _open_text_for_write(path) as handle:
        for qid, docs in run.items():
            _check_token(qid, "query id")
            if qid.startswith("#"):
                raise LeadkdError(f"query id {qid!r} cannot be written to a TREC run: a line starting with '#' "
                                  "is a comment")
            for rank, (doc_id, score) in enumerate(ranked(docs)[:k], start=1):
                _check_token(doc_id, "document id")
                score = float(score)
                if not math.isfinite(score):
                    raise LeadkdError(f"query {qid!r}, document {doc_id!r}: score {score} is not finite")
                handle.write(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n")
    return path


def _open_text_for_read(path: Path) -> IO[str]:
    if not path.is_file():
        raise InputError(path, "run file not found")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")  # a BOM must not join the first id
    return open(path, encoding="utf-8-sig")


def _records(handle: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the lines that are neither blank nor ``#`` comments."""
    for line_no, line in enumerate(handle, start=1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield line_no, fields


def _first_line_of(path: Path, qid: str, doc_id: str) -> int | None:
    """Line of the first (qid, doc_id) entry; rescanning only on error beats remembering millions of lines."""
    with _open_text_for_read(path) as handle:
        for line_no, fields in _records(handle):
            if len(fields) >= 6 and fields[0] == qid and fields[2] == doc_id:
                return line_no
    return None


def read_run(path: str | os.PathLike) -> Run:
    """Read a TREC run into ``{query_id: {doc_id: score}}`` (queries and documents in file order).

    Raises :class:`InputError` (``file:line: field 'x': message``) on fewer than 6 columns, a
    non-integer rank, a non-numeric or non-finite score, a (query, document) pair seen twice, bytes that
    are not UTF-8 (binary files), or a file without a single run line.
    """
    path = Path(path)
    run: Run = {}
    with _open_text_for_read(path) as handle:
        try:
            for line_no, fields in _records(handle):
                if len(fields) < 6:
                    raise InputError(path, "expected 6 columns 'qid Q0 docid rank score tag' (more are ignored), "
                                           f"found {len(fields)}", line=line_no)
                qid, _, doc_id, rank, score = fields[:5]
                try:
                    int(rank)
                except ValueError:
                    raise InputError(path, f"rank {rank!r} is not an integer", line=line_no, field="rank") from None
                try:
                    value = float(score)
                except ValueError:
                    raise InputError(path, f"score {score!r} is not a number", line=line_no, field="score") from None
                if not math.isfinite(value):
                    raise InputError(path, f"score {score!r} is not finite", line=line_no, field="score")
                docs = run.setdefault(qid, {})
                if doc_id in docs:
                    first = _first_line_of(path, qid, doc_id)
                    raise InputError(path, f"query {qid!r} lists document {doc_id!r} again (first on line {first})",
                                     line=line_no, field="docid")
                docs[doc_id] = value
        except UnicodeDecodeError:
            raise _where_not_utf8(path) from None
        except (OSError, EOFError) as exc:  # e.g. a truncated .gz
            raise InputError(path, f"cannot be read ({exc})") from None
    if not run:  # trec_eval refuses it too; scoring it would print every measure as 0
        raise InputError(path, "holds no run lines (the file is empty or has only '#' comments): nothing to evaluate")
    return run


def _where_not_utf8(path: Path) -> InputError:
    """The text decoder fails a whole block at a time; find the line and column of the first bad byte again."""
    try:
        for _ in _lines(path, validate_utf8=True):
            pass
    except InputError as located:
        where = located.reason.removeprefix("invalid UTF-8: ")
        return InputError(path, f"not UTF-8 text ({where}; a binary file?)", line=located.line)
    return InputError(path, "not UTF-8 text")
