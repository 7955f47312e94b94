"""One compact in-memory form for every corpus and query set, whatever file it came from.

MS MARCO has 8.8M passages; one Python ``str`` per passage plus a dict from id to row costs several
GB more than the text itself. So a :class:`TextCollection` keeps ids, titles and texts as UTF-8
bytes in single numpy ``uint8`` buffers with ``int64`` offsets (row ``i`` is
``buf[off[i]:off[i+1]]``), and finds a row by id with a binary search (``np.searchsorted``) over a
sorted fixed-width byte array of the ids. Strings are made only when asked for.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from leadkd.runtime.errors import InputError

__all__ = ["TextCollection", "Corpus", "Queries", "CollectionBuilder", "IdView", "Qrels"]

T = TypeVar("T", bound="TextCollection")

_EMPTY_U8 = np.zeros(0, dtype=np.uint8)
_CHUNK = 1 << 22  # bytes per vectorised step in char_lengths: bounds temporary memory
_ROWS = 1 << 20  # ids turned into Python bytes at a time while building the index


def _span(buf: np.ndarray, off: np.ndarray, i: int) -> str:
    return buf[off[i]:off[i + 1]].tobytes().decode("utf-8")


class IdView(Sequence[str]):
    """A read-only sequence of a collection's ids, decoded on access (no list of 8.8M strings)."""

    __slots__ = ("_c",)

    def __init__(self, collection: TextCollection):
        self._c = collection

    def __len__(self) -> int:
        return len(self._c)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._c.id_at(j) for j in range(*i.indices(len(self._c)))]
        return self._c.id_at(i)

    def __iter__(self) -> Iterator[str]:
        c = self._c
        for i in range(len(c)):
            yield _span(c._id_buf, c._id_off, i)

    def __contains__(self, item: object) -> bool:
        return item in self._c

    def __repr__(self) -> str:
        return f"IdView({len(self)} ids)"


class TextCollection:
    """Rows of (id, title, text), stored as UTF-8 buffers; ids are unique strings.

    Build one with :meth:`from_records` or a :class:`CollectionBuilder` (``cls.builder()``); the
    readers in :mod:`leadkd.data.formats` do the latter. Instances are immutable and picklable.
    """

    kind = "record"  # word used in messages and reprs

    def __init__(self, id_buf: np.ndarray, id_off: np.ndarray, text_buf: np.ndarray, text_off: np.ndarray,
                 title_buf: np.ndarray | None = None, title_off: np.ndarray | None = None,
                 source: str | os.PathLike | None = None, check_unique: bool = True):
        n = len(id_off) - 1
        if len(text_off) != n + 1 or (title_off is not None and len(title_off) != n + 1):
            raise ValueError("offset arrays of ids, texts and titles must have the same length")
        self._id_buf, self._id_off = id_buf, id_off
        self._text_buf, self._text_off = text_buf, text_off
        self._title_buf, self._title_off = title_buf, title_off
        self.source = None if source is None else str(source)
        self._build_index()
        if check_unique:
            dup = self._first_duplicate()
            if dup is not None:
                key, a, b = dup
                raise InputError(self.source or "<records>", f"duplicate id {key!r} (records {a + 1} and {b + 1})",
                                 field="id")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def builder(cls: type[T], source: str | os.PathLike | None = None) -> CollectionBuilder:
        """An append-only builder; ``build()`` freezes it into an instance of ``cls``."""
        return CollectionBuilder(cls, source)

    @classmethod
    def from_records(cls: type[T], ids: Iterable[str | int], texts: Iterable[str],
                     titles: Iterable[str] | None = None, source: str | os.PathLike | None = None) -> T:
        """Build from parallel iterables; integer ids become strings. Duplicate ids raise InputError."""
        b = cls.builder(source)
        if titles is None:
            for i, t in zip(ids, texts, strict=True):
                b.add(i, t)
        else:
            for i, t, ti in zip(ids, texts, titles, strict=True):
                b.add(i, t, ti)
        return b.build()  # type: ignore[return-value]

    def _build_index(self) -> None:
        n = len(self)
        lengths = np.diff(self._id_off)
        width = max(int(lengths.max()) if n else 0, 1)
        keys = np.zeros(n, dtype=f"S{width}")
        mv = memoryview(self._id_buf)  # type: ignore[arg-type]  # numpy types ndarray.__buffer__ for 3.12+ only
        off = self._id_off
        for s in range(0, n, _ROWS):
            e = min(n, s + _ROWS)
            bounds = off[s:e + 1].tolist()
            keys[s:e] = [bytes(mv[bounds[k]:bounds[k + 1]]) for k in range(e - s)]
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        del keys
        self._sorted_rows = order.astype(np.int32) if n < 2**31 else order

    def _first_duplicate(self) -> tuple[str, int, int] | None:
        """(id, earlier row, later row) of the earliest repeated id, or None."""
        k = self._sorted_keys
        if len(k) < 2:
            return None
        same = np.flatnonzero(k[1:] == k[:-1])
        if len(same) == 0:
            return None
        later = self._sorted_rows[same + 1]
        p = same[int(np.argmin(later))]
        return k[p].decode("utf-8"), int(self._sorted_rows[p]), int(self._sorted_rows[p + 1])

    # -- size and ids -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._id_off) - 1

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"{type(self).__name__}({len(self)} {self.kind}s{src})"

    def id_at(self, i: int) -> str:
        return _span(self._id_buf, self._id_off, self._row(i))

    @property
    def ids(self) -> IdView:
        """A lazy sequence view of the ids in row order."""
        return IdView(self)

    def list_ids(self) -> list[str]:
        return list(self.ids)

    def index(self, id: str) -> int:
        """Row of ``id``; KeyError if absent. A binary search, ~2 us."""
        row = self._find(id)
        if row < 0:
            raise KeyError(id)
        return row

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and self._find(id) >= 0

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """Rows of many ids at once (int64), ``-1`` where absent: vectorised, for validating qrels or runs."""
        enc = [i.encode("utf-8", "surrogatepass") for i in ids]
        out = np.full(len(enc), -1, dtype=np.int64)
        if not enc or len(self) == 0:
            return out
        keys = self._sorted_keys
        width = keys.dtype.itemsize
        ok = np.fromiter((0 < len(e) <= width and b"\0" not in e for e in enc), dtype=bool, count=len(enc))
        cand = np.array([e for e, o in zip(enc, ok, strict=True) if o], dtype=keys.dtype)
        pos = np.searchsorted(keys, cand)
        pos_c = np.minimum(pos, len(keys) - 1)
        hit = keys[pos_c] == cand
        rows = np.where(hit, self._sorted_rows[pos_c], -1)
        out[np.flatnonzero(ok)] = rows
        return out

    def _find(self, id: str) -> int:
        if not isinstance(id, str):
            raise TypeError(f"ids are strings, got {type(id).__name__}")
        key = id.encode("utf-8", "surrogatepass")
        keys = self._sorted_keys
        if not key or len(key) > keys.dtype.itemsize or b"\0" in key or len(keys) == 0:
            return -1
        probe = np.array(key, dtype=keys.dtype)
        pos = int(np.searchsorted(keys, probe))
        if pos < len(keys) and keys[pos] == key:
            return int(self._sorted_rows[pos])
        return -1

    def _row(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} {self.kind}s")
        return i

    # -- text access --------------------------------------------------------------------------------
    @property
    def has_titles(self) -> bool:
        return self._title_off is not None

    def text(self, i: int) -> str:
        return _span(self._text_buf, self._text_off, self._row(i))

    def title(self, i: int) -> str:
        """The title, or "" when the row (or the whole collection) has none."""
        if self._title_off is None:
            self._row(i)
            return ""
        return _span(self._title_buf, self._title_off, self._row(i))  # type: ignore[arg-type]  # set with _title_off

    def passage(self, i: int, sep: str = " ") -> str:
        """Title and text joined by ``sep``, the title left out when empty (BEIR / sentence-transformers)."""
        title = self.title(i)
        return f"{title}{sep}{self.text(i)}" if title else self.text(i)

    def passages(self, indices: Iterable[int], sep: str = " ") -> list[str]:
        return [self.passage(i, sep) for i in indices]

    def texts(self, indices: Iterable[int]) -> list[str]:
        return [self.text(i) for i in indices]

    def titles(self, indices: Iterable[int]) -> list[str]:
        return [self.title(i) for i in indices]

    def records(self) -> Iterator[tuple[str, str, str]]:
        """(id, title, text) for every row, in order."""
        for i in range(len(self)):
            yield self.id_at(i), self.title(i), self.text(i)

    def char_lengths(self, sep: str = " ") -> np.ndarray:
        """Characters of each :meth:`passage` (int64), computed on the buffers without decoding.

        Used to sort passages by length before encoding. A UTF-8 character is one byte that is
        not a continuation byte (``0b10xxxxxx``), so counting those per row is exact.
        """
        n = _char_counts(self._text_buf, self._text_off)
        if self._title_off is not None:
            t = _char_counts(self._title_buf, self._title_off)  # type: ignore[arg-type]  # set with _title_off
            n = n + t + np.where(t > 0, len(sep), 0)
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers, offsets and id index (what dominates memory)."""
        arrays = [self._id_buf, self._id_off, self._text_buf, self._text_off, self._title_buf, self._title_off,
                  self._sorted_keys, self._sorted_rows]
        return sum(a.nbytes for a in arrays if a is not None)

    # -- derived collections ------------------------------------------------------------------------
    def subset(self: T, indices: Iterable[int] | np.ndarray) -> T:
        """A new collection of the given rows, in the given order (same class, same source)."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset rows out of range for {len(self)} {self.kind}s")
        idx = np.where(idx < 0, idx + len(self), idx)
        ids = _gather(self._id_buf, self._id_off, idx)
        texts = _gather(self._text_buf, self._text_off, idx)
        titles: tuple[np.ndarray | None, np.ndarray | None] = (
            _gather(self._title_buf, self._title_off, idx)  # type: ignore[arg-type]  # set with _title_off
            if self._title_off is not None else (None, None))
        if titles[0] is not None and titles[0].size == 0:
            titles = (None, None)
        return type(self)(*ids, *texts, *titles, source=self.source, check_unique=True)


def _gather(buf: np.ndarray, off: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = off[idx], off[idx + 1]
    new_off = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=new_off[1:])
    mv = memoryview(buf)  # type: ignore[arg-type]  # numpy types ndarray.__buffer__ for Python 3.12+ only
    joined = b"".join(mv[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True))
    return np.frombuffer(joined, dtype=np.uint8) if joined else _EMPTY_U8, new_off


def _char_counts(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Per-row count of non-continuation bytes, chunk by chunk so no buffer-sized temporary is made."""
    cont_before = np.zeros(len(off), dtype=np.int64)  # continuation bytes in buf[:off[k]]
    running = 0
    for s in range(0, len(buf), _CHUNK):
        e = min(len(buf), s + _CHUNK)
        pos = np.flatnonzero((buf[s:e] & 0xC0) == 0x80)  # few in mostly-ASCII text
        lo = np.searchsorted(off, s, side="right")
        hi = np.searchsorted(off, e, side="right")
        cont_before[lo:hi] = running + np.searchsorted(pos, off[lo:hi] - s, side="left")
        running += len(pos)
    return np.diff(off) - np.diff(cont_before)


class CollectionBuilder:
    """Append rows, then :meth:`build` once. Rows go straight into growing byte buffers (no list of strings).

    Titles cost nothing until the first non-empty one arrives, so title-less corpora (MS MARCO)
    carry no title offsets.
    """

    def __init__(self, cls: type[TextCollection] = TextCollection, source: str | os.PathLike | None = None):
        self._cls = cls
        self.source = source
        self._ids = bytearray()
        self._id_off = array("q", [0])
        self._texts = bytearray()
        self._text_off = array("q", [0])
        self._titles: bytearray | None = None
        self._title_off: array | None = None
        self._built = False

    def __len__(self) -> int:
        return len(self._id_off) - 1

    def add(self, id: str | int, text: str, title: str = "") -> None:
        """Append one row from Python strings (integer ids become strings)."""
        if isinstance(id, bool) or not isinstance(id, (str, int)):
            raise TypeError(f"ids must be str or int, got {type(id).__name__}")
        if not isinstance(text, str) or not isinstance(title, str):
            raise TypeError("text and title must be str")
        self.add_utf8(str(id).encode("utf-8"), text.encode("utf-8"), title.encode("utf-8"))

    def add_utf8(self, id: bytes, text: bytes, title: bytes = b"") -> None:
        """Append one row given as UTF-8 bytes the caller has validated (the fast path of the readers)."""
        if self._built:
            raise RuntimeError("builder already built")
        self._ids += id
        self._id_off.append(len(self._ids))
        self._texts += text
        self._text_off.append(len(self._texts))
        if title:
            if self._titles is None:
                self._titles = bytearray()
                self._title_off = array("q", [0]) * (len(self._id_off) - 1)  # earlier rows: no title
            self._titles += title
        if self._title_off is not None:
            self._title_off.append(len(self._titles))  # type: ignore[arg-type]

    def build(self, check_unique: bool = True) -> TextCollection:
        """Freeze into the collection class (zero-copy); duplicate ids raise InputError unless unchecked."""
        if self._built:
            raise RuntimeError("builder already built")
        self._built = True

        def frozen(buffer: bytearray | array | None, dtype: type) -> np.ndarray | None:
            if buffer is None:
                return None
            out: np.ndarray = np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype=dtype)
            out.flags.writeable = False
            return out

        def u8(b: bytearray | None) -> np.ndarray | None:
            return frozen(b, np.uint8)

        def i64(a: array | None) -> np.ndarray | None:
            return frozen(a, np.int64)

        where = self.source or "<records>"
        if b"\0" in self._ids:
            raise InputError(where, "an id contains a NUL character", field="id")
        off = np.frombuffer(self._id_off, dtype=np.int64)
        empty = np.flatnonzero(off[1:] == off[:-1])  # a bool temporary, not an int64 one
        if len(empty):
            raise InputError(where, f"empty id (record {int(empty[0]) + 1})", field="id")
        out = self._cls(u8(self._ids), i64(self._id_off),  # type: ignore[arg-type]  # None only for a None buffer
                        u8(self._texts), i64(self._text_off),  # type: ignore[arg-type]  # None only for a None buffer
                        u8(self._titles), i64(self._title_off), source=self.source, check_unique=check_unique)
        self._ids = self._texts = self._titles = None  # type: ignore[assignment]
        return out


class Corpus(TextCollection):
    """Passages (id, optional title, text)."""

    kind = "passage"


class Queries(TextCollection):
    """Queries (id, text); titles are unused."""

    kind = "query"

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"Queries({len(self)} queries{src})"


class Qrels(dict):
    """Relevance judgments ``{query_id: {doc_id: relevance}}``; a plain dict with two helpers."""

    def relevant(self, qid: str, min_rel: int = 1) -> list[str]:
        """Documents judged at least ``min_rel`` for ``qid`` (judgment order); [] if unjudged."""
        return [d for d, r in self.get(qid, {}).items() if r >= min_rel]

    def num_judgments(self) -> int:
        return sum(len(v) for v in self.values())

    def __repr__(self) -> str:
        return f"Qrels({len(self)} queries, {self.num_judgments()} judgments)"
