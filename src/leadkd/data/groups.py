"""Training groups — a query, its positives and its hard negatives — read, validated, built and written.

The jsonl file (see docs/training-groups.md) is validated once, on reading, with one-line
``file:line: field: message`` errors. In memory a group holds *passage keys*, not text: a key ``k >= 0``
is row ``k`` of the corpus, a key ``k < 0`` is entry ``-k - 1`` of a small pool of passages given
inline in the file. So 500k MS MARCO groups of 30 negatives cost ~130 MB of int64, not gigabytes of
strings, and the texts are fetched only when a batch is made.

:mod:`leadkd.data.batches` samples them into the text batches a training step reads.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..runtime.errors import InputError
from ..runtime.fileio import atomic_write

__all__ = [
    "TrainingGroups", "GroupsBuilder", "Group", "GroupStats", "read_training_groups", "write_training_groups",
]

FIELDS = ("query_id", "query", "positives", "negatives", "teacher_scores", "meta")
PASSAGE_FIELDS = ("id", "text", "title")


def join_passage(title: str, text: str, sep: str = " ") -> str:
    """Title and text as one string, the same rule as ``TextCollection.passage`` (title dropped when empty)."""
    return f"{title}{sep}{text}" if title else text


@dataclass(frozen=True)
class Group:
    """One group decoded to strings, for inspection and tests (training uses keys, see :func:`sample_group`)."""

    query_id: str
    query: str
    positive_ids: list[str]
    negative_ids: list[str]
    teacher_scores: list[float] | None


@dataclass(frozen=True)
class GroupStats:
    """What a groups file holds; negatives per group is what bounds ``--negatives`` without repetition."""

    groups: int
    positives_min: int
    positives_mean: float
    positives_max: int
    negatives_min: int
    negatives_mean: float
    negatives_max: int
    groups_without_negatives: int
    inline_passages: int
    with_teacher_scores: bool
    dropped_false_negatives: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TrainingGroups:
    """Immutable, compact groups: CSR arrays of passage keys plus the corpus/queries they point into.

    Build with :func:`read_training_groups` or a :class:`GroupsBuilder`.
    """

    def __init__(self, corpus, queries, query_ids: list[str], query_rows: np.ndarray, query_texts: dict[int, str],
                 pos_off: np.ndarray, pos: np.ndarray, neg_off: np.ndarray, neg: np.ndarray,
                 inline: tuple[list[str], list[str], list[str]], teacher: np.ndarray | None,
                 dropped_false_negatives: int = 0):
        self.corpus = corpus
        self.queries = queries
        self._query_ids = query_ids
        self._query_rows = query_rows
        self._query_texts = query_texts
        self._pos_off, self._pos = pos_off, pos
        self._neg_off, self._neg = neg_off, neg
        self._inline_ids, self._inline_titles, self._inline_texts = inline
        self._teacher = teacher
        self.dropped_false_negatives = dropped_false_negatives

    # -- size and queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._query_ids)

    def __repr__(self) -> str:
        return f"TrainingGroups({len(self)} groups)"

    @property
    def has_teacher_scores(self) -> bool:
        return self._teacher is not None

    def query_id(self, g: int) -> str:
        return self._query_ids[g]

    def query_text(self, g: int) -> str:
        text = self._query_texts.get(g)
        return text if text is not None else self.queries.text(int(self._query_rows[g]))

    # -- passages -----------------------------------------------------------------------------------
    def positive_keys(self, g: int) -> np.ndarray:
        return self._pos[self._pos_off[g]:self._pos_off[g + 1]]

    def negative_keys(self, g: int) -> np.ndarray:
        return self._neg[self._neg_off[g]:self._neg_off[g + 1]]

    def num_positives(self) -> np.ndarray:
        """Positives per group (int64 [G])."""
        return np.diff(self._pos_off)

    def num_negatives(self) -> np.ndarray:
        """Negatives per group (int64 [G])."""
        return np.diff(self._neg_off)

    def teacher_scores(self, g: int) -> np.ndarray | None:
        """Scores aligned to ``positives + negatives`` of group ``g`` (float32), or None."""
        if self._teacher is None:
            return None
        start = self._pos_off[g] + self._neg_off[g]
        return self._teacher[start:self._pos_off[g + 1] + self._neg_off[g + 1]]

    def passage_id(self, key: int) -> str:
        key = int(key)
        return self.corpus.id_at(key) if key >= 0 else self._inline_ids[-key - 1]

    def passage(self, key: int) -> str:
        """Title + " " + text of a key (as the corpus joins them, so training sees what retrieval encodes)."""
        key = int(key)
        if key >= 0:
            return self.corpus.passage(key)
        return join_passage(self._inline_titles[-key - 1], self._inline_texts[-key - 1])

    def inline_passage(self, key: int) -> tuple[str, str, str] | None:
        """(id, title, text) of an inline key, None for a corpus row."""
        key = int(key)
        if key >= 0:
            return None
        j = -key - 1
        return self._inline_ids[j], self._inline_titles[j], self._inline_texts[j]

    def group(self, g: int) -> Group:
        scores = self.teacher_scores(g)
        return Group(self.query_id(g), self.query_text(g), [self.passage_id(k) for k in self.positive_keys(g)],
                     [self.passage_id(k) for k in self.negative_keys(g)],
                     None if scores is None else scores.tolist())

    def __iter__(self) -> Iterator[Group]:
        for g in range(len(self)):
            yield self.group(g)

    def stats(self) -> GroupStats:
        npos, nneg = np.diff(self._pos_off), np.diff(self._neg_off)

        def trio(x: np.ndarray) -> tuple[int, float, int]:
            return (int(x.min()), float(x.mean()), int(x.max())) if len(x) else (0, 0.0, 0)

        return GroupStats(len(self), *trio(npos), *trio(nneg), int((nneg == 0).sum()), len(self._inline_ids),
                          self.has_teacher_scores, self.dropped_false_negatives)


class GroupsBuilder:
    """Append groups as passage keys; :meth:`build` freezes them. Shared by the reader and the miner."""

    def __init__(self, corpus=None, queries=None):
        self.corpus = corpus
        self.queries = queries
        self._query_ids: list[str] = []
        self._query_rows = array("q")
        self._query_texts: dict[int, str] = {}
        self._pos, self._pos_off = array("q"), array("q", [0])
        self._neg, self._neg_off = array("q"), array("q", [0])
        self._teacher: array | None = None
        self._inline_index: dict[str, int] = {}
        self._inline: tuple[list[str], list[str], list[str]] = ([], [], [])
        self.dropped_false_negatives = 0

    def __len__(self) -> int:
        return len(self._query_ids)

    def inline_key(self, pid: str, title: str, text: str) -> int:
        """Key of an inline passage; the same id twice must carry the same text (ValueError otherwise)."""
        j = self._inline_index.get(pid)
        ids, titles, texts = self._inline
        if j is None:
            j = len(ids)
            self._inline_index[pid] = j
            ids.append(pid)
            titles.append(title)
            texts.append(text)
        elif titles[j] != title or texts[j] != text:
            raise ValueError(f"passage {pid!r} is given inline twice with different text or title")
        return -j - 1

    def _key_id(self, key: int) -> str:
        return self.corpus.id_at(key) if key >= 0 else self._inline[0][-key - 1]

    def add(self, query_id: str, positives: Sequence[int], negatives: Sequence[int], query_row: int = -1,
            query_text: str | None = None, teacher_scores: Sequence[float] | None = None) -> int:
        """Append one group; returns how many negatives were dropped for also being positives.

        A negative that is a positive of its own group (compared by id) would teach the model to push a
        relevant passage away, so it is removed here, with its teacher score, and counted.
        """
        if not positives:
            raise ValueError("a group needs at least one positive")
        if query_text is None and query_row < 0:
            raise ValueError("a group needs a query row or a query text")
        if len(self) and (teacher_scores is None) != (self._teacher is None):
            raise ValueError("teacher scores must be given for every group or for none")
        if teacher_scores is not None and len(teacher_scores) != len(positives) + len(negatives):
            raise ValueError("teacher scores must align with positives + negatives")
        if min(positives) < 0 or (len(negatives) and min(negatives) < 0):
            pos_ids = {self._key_id(k) for k in positives}
            keep = [self._key_id(k) not in pos_ids for k in negatives]
        else:  # corpus rows only: same row <=> same id
            pos_keys = set(map(int, positives))
            keep = [int(k) not in pos_keys for k in negatives]
        dropped = len(keep) - sum(keep)
        if dropped:
            negatives = [k for k, ok in zip(negatives, keep, strict=True) if ok]
            if teacher_scores is not None:
                n = len(positives)
                teacher_scores = (list(teacher_scores[:n])
                                  + [s for s, ok in zip(teacher_scores[n:], keep, strict=True) if ok])
        g = len(self._query_ids)
        self._query_ids.append(query_id)
        self._query_rows.append(query_row)
        if query_text is not None:
            self._query_texts[g] = query_text
        self._pos.extend(map(int, positives))
        self._pos_off.append(len(self._pos))
        self._neg.extend(map(int, negatives))
        self._neg_off.append(len(self._neg))
        if teacher_scores is not None:
            if self._teacher is None:
                self._teacher = array("f")
            self._teacher.extend(float(s) for s in teacher_scores)
        self.dropped_false_negatives += dropped
        return dropped

    def build(self) -> TrainingGroups:
        def i64(a: array) -> np.ndarray:
            return np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, dtype=np.int64)

        teacher = None
        if self._teacher is not None:
            teacher = np.frombuffer(self._teacher, dtype=np.float32) if len(self._teacher) else np.zeros(0, np.float32)
        return TrainingGroups(self.corpus, self.queries, self._query_ids, i64(self._query_rows), self._query_texts,
                              i64(self._pos_off), i64(self._pos), i64(self._neg_off), i64(self._neg), self._inline,
                              teacher, self.dropped_false_negatives)


# -- reading and writing ----------------------------------------------------------------------------------


@contextmanager
def _open_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8-sig") as handle:
            yield handle
    else:
        with open(path, encoding="utf-8-sig") as handle:
            yield handle


def _as_id(value: Any) -> str | None:
    """A JSON id as a string (ints allowed, as in MS MARCO files); None if it is not an id."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text if text.strip() else None


#: Lines parsed before their id-only passages are resolved in one vectorised corpus lookup.
RESOLVE_CHUNK = 4096


@dataclass
class _Parsed:
    """One line parsed, its id-only passages not yet looked up (their keys are placeholders)."""

    line: int
    query_id: str
    query_row: int
    query_text: str | None
    positives: list[int]
    negatives: list[int]
    scores: list[float] | None
    unresolved: list[tuple[str, list[str], Sequence[int]]]  # (field, its ids, positions given by id only)


class _LineReader:
    """Parses lines into groups, raising InputError located at the line (and field) at fault.

    Passages given by id only are looked up in the corpus a chunk of lines at a time: one vectorised
    lookup instead of one per line makes reading MS MARCO-sized files several times faster.
    """

    def __init__(self, path: str, builder: GroupsBuilder):
        self.path = path
        self.b = builder
        self.teacher_first: tuple[int, bool] | None = None  # (line, had scores) of the first group
        self.pending: list[_Parsed] = []

    def error(self, line: int, message: str, fld: str | None = None) -> InputError:
        return InputError(self.path, message, line=line, field=fld)

    def passages(self, obj: dict, name: str, line: int, unresolved: list) -> tuple[list[int], list[str]]:
        """Keys and ids of a ``positives``/``negatives`` list; id-only entries join ``unresolved``."""
        entries = obj.get(name, [])
        if not isinstance(entries, list):
            raise self.error(line, "must be a list of ids or {\"id\", \"text\", \"title\"} objects", name)
        if self.b.corpus is not None and all(type(e) is str and e for e in entries):  # the common case
            if entries:
                unresolved.append((name, entries, range(len(entries))))
            return [0] * len(entries), entries
        keys: list[int] = []
        ids: list[str] = []
        positions: list[int] = []
        for i, entry in enumerate(entries):
            key: int | None = None
            pid: str | None
            if type(entry) is str and entry:
                pid = entry
            elif isinstance(entry, dict):
                pid, key = self.inline_entry(entry, line, f"{name}[{i}]")
            else:
                pid = _as_id(entry)
                if pid is None:
                    raise self.error(line, "must be a passage id or an {\"id\", \"text\", \"title\"} object",
                                     f"{name}[{i}]")
            if key is None:
                if self.b.corpus is None:
                    raise self.error(line, f"passage {pid!r} has no text and no corpus was given to look it up",
                                     f"{name}[{i}]")
                positions.append(i)
                key = 0  # placeholder until flush
            keys.append(key)
            ids.append(pid)
        if positions:
            unresolved.append((name, ids, positions))
        return keys, ids

    def inline_entry(self, entry: dict, line: int, where: str) -> tuple[str, int | None]:
        """(id, inline key) of an object entry; the key is None when it gives no text (a corpus id)."""
        unknown = set(entry) - set(PASSAGE_FIELDS)
        if unknown:
            raise self.error(line, f"unknown key {sorted(unknown)[0]!r} (expected id, text, title)", where)
        pid = _as_id(entry.get("id"))
        if pid is None:
            raise self.error(line, "needs an 'id' (a non-empty string or integer)", where)
        text, title = entry.get("text"), entry.get("title", "")
        if text is None:
            return pid, None
        if not isinstance(text, str) or not text.strip():
            raise self.error(line, f"passage {pid!r}: 'text' must be a non-empty string", where)
        if not isinstance(title, str):
            raise self.error(line, f"passage {pid!r}: 'title' must be a string", where)
        try:
            return pid, self.b.inline_key(pid, title, text)
        except ValueError as exc:
            raise self.error(line, str(exc), where) from None

    def query(self, obj: dict, line: int) -> tuple[str, int, str | None]:
        if "query_id" not in obj:
            raise self.error(line, "missing (every group needs its query's id)", "query_id")
        qid = _as_id(obj["query_id"])
        if qid is None:
            raise self.error(line, "must be a non-empty string or integer", "query_id")
        text = obj.get("query")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise self.error(line, "must be a non-empty string", "query")
        queries = self.b.queries
        row = -1
        if queries is not None:
            try:
                row = queries.index(qid)
            except KeyError:
                row = -1
        if text is None:
            if row < 0:
                why = "is not in the queries" if queries is not None else "no queries were given"
                raise self.error(line, f"query {qid!r} has no 'query' text and {why}", "query")
            return qid, row, None
        if row >= 0 and queries.text(row) == text:
            return qid, row, None  # identical to the collection: keep the row, not a second copy
        return qid, -1, text

    def teacher(self, obj: dict, line: int, pos_ids: list[str], neg_ids: list[str]) -> list[float] | None:
        raw = obj.get("teacher_scores")
        has = raw is not None
        if self.teacher_first is None:
            self.teacher_first = (line, has)
        elif self.teacher_first[1] != has:
            first, had = self.teacher_first
            state = "has them" if had else "has none"
            raise self.error(line, f"given for some groups but not others (line {first} {state})", "teacher_scores")
        if not has:
            return None
        ids = pos_ids + neg_ids
        if isinstance(raw, list):
            if len(raw) != len(ids):
                raise self.error(line, f"has {len(raw)} scores for {len(ids)} positives + negatives", "teacher_scores")
            values = raw
        elif isinstance(raw, dict):
            missing = [pid for pid in ids if pid not in raw]
            if missing:
                raise self.error(line, f"no score for passage {missing[0]!r}", "teacher_scores")
            extra = set(raw) - set(ids)
            if extra:
                raise self.error(line, f"score for {sorted(extra)[0]!r}, which is not in this group", "teacher_scores")
            values = [raw[pid] for pid in ids]
        else:
            raise self.error(line, "must be a list aligned to positives + negatives or an {id: score} object",
                             "teacher_scores")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise self.error(line, f"scores must be finite numbers, got {v!r}", "teacher_scores")
        return [float(v) for v in values]

    def parse(self, raw: str, line: int) -> _Parsed:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise self.error(line, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise self.error(line, f"expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - set(FIELDS)
        if unknown:
            raise self.error(line, f"unknown field (expected one of {', '.join(FIELDS)})", sorted(unknown)[0])
        qid, row, text = self.query(obj, line)
        if "positives" not in obj:
            raise self.error(line, "missing (every group needs at least one positive)", "positives")
        unresolved: list = []
        pos, pos_ids = self.passages(obj, "positives", line, unresolved)
        if not pos:
            raise self.error(line, "empty (every group needs at least one positive)", "positives")
        neg, neg_ids = self.passages(obj, "negatives", line, unresolved)
        scores = self.teacher(obj, line, pos_ids, neg_ids)
        return _Parsed(line, qid, row, text, pos, neg, scores, unresolved)

    def add(self, raw: str, line: int) -> None:
        """Parse a line; an error here first reports any unknown id on an earlier line (file order)."""
        try:
            self.pending.append(self.parse(raw, line))
        except InputError:
            self.flush()
            raise
        if len(self.pending) >= RESOLVE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Resolve the pending lines' ids in one lookup, then hand the groups to the builder."""
        pending, self.pending = self.pending, []
        wanted = [ids[i] for p in pending for _, ids, positions in p.unresolved for i in positions]
        if wanted:
            rows = self.b.corpus.lookup(wanted).tolist()
            at = 0
            for p in pending:
                for name, ids, positions in p.unresolved:
                    keys = p.positives if name == "positives" else p.negatives
                    for i in positions:
                        keys[i] = rows[at]
                        at += 1
                    if min(keys[i] for i in positions) < 0:
                        i = next(i for i in positions if keys[i] < 0)
                        raise self.error(p.line, f"passage {ids[i]!r} is not in the corpus", f"{name}[{i}]")
        for p in pending:
            self.b.add(p.query_id, p.positives, p.negatives, query_row=p.query_row, query_text=p.query_text,
                       teacher_scores=p.scores)


def read_training_groups(path: str | os.PathLike, corpus=None, queries=None) -> TrainingGroups:
    """Read and validate a training-groups jsonl file (``.gz`` too); blank lines are skipped.

    ``corpus`` resolves passages given by id, ``queries`` resolves queries given without text.
    A file whose passages are all inline needs neither. Any problem raises a one-line InputError
    naming the first line at fault.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    builder = GroupsBuilder(corpus, queries)
    reader = _LineReader(path, builder)
    try:
        with _open_text(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    reader.add(raw, number)
        reader.flush()
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise InputError(path, f"unreadable ({exc})") from None
    if not len(builder):
        raise InputError(path, "no training groups (the file is empty)")
    return builder.build()


def _passage_json(groups: TrainingGroups, key: int) -> str | dict[str, str]:
    inline = groups.inline_passage(key)
    if inline is None:
        return groups.passage_id(key)
    pid, title, text = inline
    return {"id": pid, "title": title, "text": text} if title else {"id": pid, "text": text}


def write_training_groups(groups: TrainingGroups, path: str | os.PathLike, query_text: bool = True) -> None:
    """Write ``groups`` as jsonl (gzip when ``path`` ends in ``.gz``), atomically.

    Corpus passages are written as ids, inline ones as objects; teacher scores as a list. With
    ``query_text`` the query's text is written too, so the file needs only the corpus to be read back.
    """
    with atomic_write(path, "wb") as raw:
        sink = gzip.GzipFile(fileobj=raw, mode="wb") if str(path).endswith(".gz") else raw
        try:
            for g in range(len(groups)):
                obj: dict[str, Any] = {"query_id": groups.query_id(g)}
                if query_text:
                    obj["query"] = groups.query_text(g)
                obj["positives"] = [_passage_json(groups, k) for k in groups.positive_keys(g)]
                obj["negatives"] = [_passage_json(groups, k) for k in groups.negative_keys(g)]
                scores = groups.teacher_scores(g)
                if scores is not None:
                    obj["teacher_scores"] = [float(str(s)) for s in scores]  # shortest text that round-trips float32
                sink.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        finally:
            if sink is not raw:
                sink.close()
