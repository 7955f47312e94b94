"""A frozen teacher's per-layer scores of every training group, computed once and read by many runs.

What is stored (a folder, written by ``leadkd score-teacher``; docs/training.md, "Score once, distill many"):

- ``scores.npy``, ``[groups, candidates, slices]`` float16 or float32: group g's query against its
  candidates - its positives, then its first N mined negatives, in the groups file's order - at each
  stored teacher layer (``meta.json``'s ``layers``, the layer view LEAD's layer loss compares), then one
  more slice, the teacher's ordinary score (what the response loss compares). A group with fewer
  candidates than the widest leaves the rest of its row 0.
- ``rows.npy``, ``[groups, 4]`` int64: each group's positives, its candidates, a 64-bit hash of its query
  id and candidate ids, and a CRC-32 of its row of scores followed by those three numbers. A row of zeros
  was never written.
- ``meta.json``: the format, the teacher (path, kind, settings, a fingerprint of its weights, its depth),
  the stored layers, the dtype, the negatives cap N, and the groups file's sha256 and size.

Why it is never stale: a run reads a score folder only for the groups file it was made from (sha256), a
``teacher.path`` given beside it must be the teacher that scored it (its weights' fingerprint), and on
opening, the stored id hashes of 1,024 rows spread over the file are compared with the groups' own ids
(every row's would cost ~40 µs a group, 20 s at MS MARCO's 500k; the sha256 already pins the file).

What a crash or damage costs: ``score-teacher`` writes into ``.<name>.partial`` beside the folder, each
row's scores first and its record (with the checksum) last, so a kill costs the rows in flight and the same
command scores only the rest; the folder appears, in one rename, only once every row is written and checked.
Opening a folder checks every row (checksum, written, finite) and each batch's rows are checked again as
they are read (0.4 ms for 64 rows); a row that fails is named in one line, never trained on, and rerunning
``score-teacher`` on the folder rescores exactly the rows that fail.

Sentence-transformers' style of publishing (final-layer ``qid pid score`` lines) is read by
:func:`read_published_scores` as a folder of one slice, the final score, for response-KD and MarginMSE.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.errors import InputError

META = "meta.json"
SCORES = "scores.npy"
ROWS = "rows.npy"
FORMAT = "leadkd teacher scores"
VERSION = 1
#: Recorded in ``meta.json``; what each row's checksum covers.
CHECKSUMS = "crc32 per group of its scores as stored, then its positives, candidates and ids hash (int64)"
DTYPES = ("float16", "float32")
#: Suffixes of a published final-score file (``qid pid score`` lines, or JSON lines), read in memory.
PUBLISHED_SUFFIXES = (".tsv", ".txt", ".jsonl", ".tsv.gz", ".txt.gz", ".jsonl.gz")


# --------------------------------------------------------------------------- what a row holds

def ids_hash(query_id: str, passage_ids: Sequence[str]) -> int:
    """A nonzero signed 64-bit hash of a group's query id and candidate ids, in order (0 marks "unwritten")."""
    text = "\x1f".join([query_id, *passage_ids]).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True) or 1


def row_checksum(scores: np.ndarray, positives: int, candidates: int, hashed: int) -> int:
    """CRC-32 of one row's scores (as stored, padding included), then its three int64 numbers."""
    numbers = np.array([positives, candidates, hashed], dtype=np.int64).tobytes()
    return zlib.crc32(numbers, zlib.crc32(np.ascontiguousarray(scores).tobytes()))


def candidate_keys(groups, g: int, negatives: int | None) -> tuple[int, list[int]]:
    """Group ``g``'s positives count and its candidates' passage keys: every positive, then its first
    ``negatives`` mined negatives (all of them for None), in the groups file's order."""
    positives, mined = groups.positive_keys(g), groups.negative_keys(g)
    kept = mined if negatives is None else mined[:negatives]
    return len(positives), [int(k) for k in positives] + [int(k) for k in kept]


def group_ids_hash(groups, g: int, negatives: int | None) -> int:
    _, keys = candidate_keys(groups, g, negatives)
    return ids_hash(groups.query_id(g), [groups.passage_id(k) for k in keys])


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(location: str) -> str:
    """sha256 over a model folder's weight files (names and bytes); a hub name stands for itself."""
    folder = Path(location)
    if not folder.is_dir():
        return f"name:{location}"
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    for file in files:
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file_sha256(file).encode())
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- reading

class TeacherScores:
    """The teacher's scores of every group, served per batch: ``[teacher layers asked + final, B, 1 + n]``.

    ``scores`` / ``rows`` are the two arrays (memory-mapped for a folder, in memory for a published file);
    ``layers`` the teacher layers stored (the last slice, the final score, comes after them);
    ``teacher_layers`` the teacher's depth; ``negatives`` the cap N (None: every mined negative).
    """

    def __init__(self, source: Path, meta: dict[str, Any], scores: np.ndarray, rows: np.ndarray, groups):
        self.source, self.meta = source, meta
        self.scores, self.rows = scores, rows
        self.groups = groups
        self.layers: list[int] = [int(x) for x in meta["layers"]]
        self.teacher_layers = int(meta["teacher"]["num_layers"])
        self.negatives: int | None = meta["negatives"]
        self.teacher = meta["teacher"]

    def check_all(self, chunk: int = 4096, sampled_ids: int = 1024) -> None:
        """Every row written, matching its checksum and finite, and ``sampled_ids`` rows' id hashes equal to
        their groups'; else one line naming the first bad group."""
        for begin in range(0, len(self.rows), chunk):
            rows = np.asarray(self.rows[begin:begin + chunk])
            scores = np.asarray(self.scores[begin:begin + chunk])
            bad = bad_rows(scores, rows)
            if len(bad):
                g, why = begin + int(bad[0][0]), bad[0][1]
                more = f" (and {len(bad) - 1} more rows of these {len(rows)})" if len(bad) > 1 else ""
                raise self._row_error(g, why + more)
        for g in np.unique(np.linspace(0, len(self.rows) - 1, num=min(sampled_ids, len(self.rows))).astype(np.int64)):
            if int(self.rows[g, 2]) != group_ids_hash(self.groups, int(g), self.negatives):
                raise self._row_error(int(g), "was scored for other candidate ids than this groups file gives it")

    def _row_error(self, g: int, why: str) -> InputError:
        query = self.groups.query_id(g) if self.groups is not None else "?"
        fix = ("; score it again with the same `leadkd score-teacher` command, which rescores the rows that fail"
               if self.source.is_dir() else "")
        return InputError(self.source, f"group {g} (query {query!r}): {why}{fix}")

    def read(self, group_rows: Sequence[int]) -> np.ndarray:
        """The checked float32 rows ``[B, candidates, slices]`` of these groups (a bad row is refused)."""
        index = np.asarray(group_rows, dtype=np.int64)
        scores, rows = np.asarray(self.scores[index]), np.asarray(self.rows[index])
        bad = bad_rows(scores, rows)
        if len(bad):
            raise self._row_error(int(index[bad[0][0]]), bad[0][1])
        return scores.astype(np.float32, copy=False)

    def for_batch(self, batch, teacher_layers: Sequence[int]) -> torch.Tensor:
        """``[len(teacher_layers) + 1, B, 1 + n]``: the asked layers' scores, then the final score, of each
        query's own sampled candidates (the batch's ``columns``), as float32 on the CPU."""
        stored = self.read(batch.groups)                                     # [B, C, S]
        slices = [self.layers.index(t) for t in teacher_layers] + [len(self.layers)]
        columns = batch.columns.numpy()                                      # [B, 1 + n]
        picked = np.take_along_axis(stored, columns[:, :, None], axis=1)     # [B, 1 + n, S]
        return torch.from_numpy(np.ascontiguousarray(picked[:, :, slices].transpose(2, 0, 1)))


def bad_rows(scores: np.ndarray, rows: np.ndarray) -> list[tuple[int, str]]:
    """(position, reason) of each row in this chunk that is unwritten, damaged or not finite."""
    bad = []
    for i in range(len(rows)):
        positives, candidates, hashed, crc = (int(v) for v in rows[i])
        if candidates == 0 and hashed == 0:
            bad.append((i, "has no scores (never written; the score file is incomplete)"))
        elif not 0 < candidates <= scores.shape[1] or row_checksum(scores[i], positives, candidates, hashed) != crc:
            bad.append((i, "fails its checksum (a damaged or truncated score file)"))
        elif not np.isfinite(scores[i, :candidates]).all():
            bad.append((i, "holds a NaN or infinite score"))
    return bad


def read_meta(folder: Path) -> dict[str, Any]:
    file = folder / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(folder, f"not a teacher score folder (no {META}; `leadkd score-teacher` writes one)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(file, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(file, f"not a leadkd teacher score file (format {found!r})")
    if meta.get("version") != VERSION:
        raise InputError(file, f"score file version {meta.get('version')!r}; this leadkd reads version {VERSION}")
    return meta


def _array(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    from ..runtime.row_file import readable_size

    size = readable_size(path, dtype, shape)
    if size is None:
        raise InputError(path, f"not the {'x'.join(map(str, shape))} {np.dtype(dtype).name} array "
                         f"{path.parent / META} describes (a damaged or replaced file)")
    if path.stat().st_size < size:
        raise InputError(path, f"cut short ({path.stat().st_size} of {size} bytes; a damaged or truncated "
                         "score file); score it again with the same `leadkd score-teacher` command")
    return np.load(path, mmap_mode="r")


def open_teacher_scores(source: str | Path, groups, groups_path: str | Path, check: bool = True) -> TeacherScores:
    """A score folder (or a published ``qid pid score`` file) checked against the training groups it is for."""
    source = Path(source)
    if source.is_file() and source.name.endswith(PUBLISHED_SUFFIXES):
        return read_published_scores(source, groups)
    if not source.exists():
        raise InputError(source, "teacher score folder does not exist (write it with `leadkd score-teacher`)")
    meta = read_meta(source)
    checksum = file_sha256(groups_path)
    if meta["groups"]["sha256"] != checksum or meta["groups"]["count"] != len(groups):
        raise InputError(source, f"scored for another groups file ({meta['groups']['path']}, {meta['groups']['count']}"
                         f" groups, sha256 {meta['groups']['sha256'][:12]}...), not {groups_path} ({len(groups)} "
                         f"groups, sha256 {checksum[:12]}...)")
    slices = len(meta["layers"]) + 1
    scores = _array(source / SCORES, np.dtype(meta["dtype"]), (len(groups), int(meta["width"]), slices))
    rows = _array(source / ROWS, np.int64, (len(groups), 4))
    found = TeacherScores(source, meta, scores, rows, groups)
    if check:
        found.check_all()
    return found


# --------------------------------------------------------------------------- files others publish

def _published_lines(path: Path):
    """(line number, qid, pid, score text) of a ``qid pid score`` file (tab or space separated; ``#`` lines and
    a header skipped) or of JSON lines with ``qid``/``query_id``, ``pid``/``corpus_id``/``passage_id``, ``score``."""
    opener = gzip.open if path.suffix == ".gz" else open
    as_json = ".jsonl" in path.suffixes
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if as_json:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(path, line=number, message=f"not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(path, line=number, message="expected a JSON object with qid, pid and score")
                fields = [next((obj[k] for k in keys if k in obj), None) for keys in
                          (("qid", "query_id", "query-id"), ("pid", "corpus_id", "passage_id", "corpus-id"),
                           ("score",))]
                missing = [name for name, value in zip(("qid", "pid", "score"), fields, strict=True) if value is None]
                if missing:
                    raise InputError(path, line=number, message=f"field {missing[0]!r}: missing")
                yield number, str(fields[0]), str(fields[1]), fields[2]
                continue
            parts = line.split()
            if len(parts) != 3:
                raise InputError(path, line=number, message=f"expected 3 fields (qid pid score), got {len(parts)}")
            if number == 1 and not _is_number(parts[2]):
                continue  # a header such as "query-id corpus-id score"
            yield number, parts[0], parts[1], parts[2]


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return not isinstance(text, bool)


def read_published_scores(path: str | Path, groups) -> TeacherScores:
    """Final-layer scores of ``qid pid score`` lines as a one-slice :class:`TeacherScores`, in memory.

    Every positive and negative of every group needs a score (lines for other pairs of known ids are
    ignored); an unknown query or passage id, a score that is not a finite number, or one pair given two
    scores is one line naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "score file does not exist")
    wanted: dict[str, list[int]] = {}
    for g in range(len(groups)):
        wanted.setdefault(groups.query_id(g), []).append(g)
    known_queries = set(wanted) | (set(groups.queries.ids) if groups.queries is not None else set())
    corpus = groups.corpus
    found: dict[str, dict[str, float]] = {}
    for number, qid, pid, text in _published_lines(path):
        if qid not in known_queries:
            raise InputError(path, line=number, field="qid",
                             message=f"unknown query id {qid!r} (not in the queries or groups)")
        if not _is_number(text) or not math.isfinite(float(text)):
            raise InputError(path, line=number, field="score", message=f"expected a finite number, got {text!r}")
        if corpus.lookup([pid])[0] < 0 and not _inline(groups, wanted.get(qid, ()), pid):
            raise InputError(path, line=number, field="pid", message=f"unknown passage id {pid!r} (not in the corpus)")
        if qid not in wanted:
            continue
        scores = found.setdefault(qid, {})
        value = float(text)
        if pid in scores and scores[pid] != value:
            raise InputError(path, line=number, message=f"({qid}, {pid}) scored twice, {scores[pid]!r} and {value!r}")
        scores[pid] = value
    counts = [candidate_keys(groups, g, None) for g in range(len(groups))]
    width = max(len(keys) for _, keys in counts)
    table = np.zeros((len(groups), width, 1), dtype=np.float32)
    rows = np.zeros((len(groups), 4), dtype=np.int64)
    for g, (positives, keys) in enumerate(counts):
        qid, ids = groups.query_id(g), [groups.passage_id(k) for k in keys]
        given = found.get(qid, {})
        for j, pid in enumerate(ids):
            if pid not in given:
                role = "positive" if j < positives else "negative"
                raise InputError(path, f"no score for query {qid!r}'s {role} {pid!r} (group {g}); give one for "
                                 "every positive and negative of each group")
            table[g, j, 0] = given[pid]
        hashed = ids_hash(qid, ids)
        rows[g] = (positives, len(ids), hashed, row_checksum(table[g], positives, len(ids), hashed))
    meta = {"format": FORMAT, "version": VERSION, "teacher": {"path": str(path), "num_layers": 1, "published": True},
            "layers": [], "dtype": "float32", "negatives": None, "width": width,
            "groups": {"count": len(groups)}}
    return TeacherScores(path, meta, table, rows, groups)


def _inline(groups, group_rows, pid: str) -> bool:
    """Whether ``pid`` is an inline passage of one of these groups (given in the groups file, not the corpus)."""
    for g in group_rows:
        for key in (*groups.positive_keys(g), *groups.negative_keys(g)):
            if key < 0 and groups.passage_id(key) == pid:
                return True
    return False



def check_scored_by(scores: TeacherScores, teacher_path: str) -> None:
    """``teacher.path`` given beside ``teacher.scores`` must be the teacher whose weights scored the file."""
    from ..models.base import resolve_model_path

    if scores.teacher.get("published"):
        return  # a published file does not say which weights scored it
    found = weights_fingerprint(resolve_model_path(teacher_path))
    if found != scores.teacher["fingerprint"]:
        raise InputError(scores.source, f"scored by another teacher ({scores.teacher['path']}, weights "
                         f"{scores.teacher['fingerprint'][:19]}...) than teacher.path {teacher_path} (weights "
                         f"{found[:19]}...); score this teacher, or name the one that scored the file")
