"""Per-layer vectors of a frozen dense teacher, cached per query and passage on disk.

A frozen teacher runs in eval mode under ``no_grad``, so a text gets the same vectors in every epoch:
after it has been seen once, response-KD and LEAD cost only the student's forward and backward.

Each side (queries, passages) has three arrays with one row per row of its collection, so no id-to-slot
table is held in memory: the vectors ``[rows, layers, dim]`` (float32; only the layers the loss can ask
for), and for each row a 64-bit hash of the exact text that was encoded there, 0 for "empty". A row is a
hit only when the batch's text hashes the same, so a query text given in the groups file, an inline
passage that reuses a corpus id, or a corpus edited in place is encoded anew, never served stale. Rows
are written with positional writes rather than through a memory map, so a full disk is an ``OSError``
(a one-line error) instead of a SIGBUS; the hash is written after the vectors, so a crash in between
costs a recomputation, never a wrong vector. Unwritten rows are sparse holes where the filesystem has them.

Each row also has a CRC-32 of its vectors and its hash, written after both (a third array, ``*.crc.npy``).
Opening a cache checks every filled row against it: a row damaged on disk (a flipped byte in any of the
three files, a file cut short, a checksum lost) is emptied, so it is computed again by the teacher the
next time a batch asks for it, never trained on; one warning per collection says how many rows that was.
A truncated file is grown back to its size first (the lost tail reads as empty rows), so only the rows
it cut are recomputed. A cache from before checksums (its ``meta.json`` says nothing of them) is rebuilt.

Within a run, a cached vector equals the one the teacher would compute now up to float rounding (the
padding of the batch it was first computed in differs). ``meta.json`` holds what the vectors depend on
(teacher, its settings, the cached layers, collection sizes); a cache that does not match is rebuilt,
and one that holds more layers than asked for serves the ones asked for (a response-KD run reuses a LEAD
run's cache). Runs may share a cache folder (``teacher.cache_dir``) one at a time, not concurrently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.base import resolve_layers
from ..runtime.fileio import atomic_write
from ..runtime.row_file import RowFile

META = "meta.json"
#: Recorded in ``meta.json``: a cache written without these checksums does not match, and is rebuilt.
CHECKSUMS = "crc32 per row of the vectors, then the text hash"


def text_hash(text: str) -> int:
    """A nonzero signed 64-bit hash of the text (0 marks an empty row)."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                           "little", signed=True)
    return value or 1


def row_checksums(vectors: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's float32 vectors followed by its int64 text hash, as the files hold them."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    hashes = np.ascontiguousarray(hashes, dtype=np.int64)
    return np.array([zlib.crc32(h.tobytes(), zlib.crc32(v.tobytes())) for v, h in zip(vectors, hashes, strict=True)],
                    dtype=np.uint32)


class _Side:
    """The cached vectors of one collection (the queries, or the passages)."""

    def __init__(self, folder: Path, name: str, collection, num_layers: int, dim: int, fresh: bool):
        self.collection = collection
        self.empty = collection is None or len(collection) == 0  # nothing to key on: always encode
        if not self.empty:
            rows = len(collection)
            what = "the teacher cache"
            hint = "free space there or set teacher.cache: false, then continue with --resume"
            self.vectors = RowFile(folder / f"{name}.npy", np.float32, (rows, num_layers, dim), fresh, what, hint)
            self.hashes = RowFile(folder / f"{name}.hash.npy", np.int64, (rows,), fresh, what, hint)
            self.checks = RowFile(folder / f"{name}.crc.npy", np.uint32, (rows,), fresh, what, hint)
            if not fresh:
                self._empty_damaged_rows()

    def _empty_damaged_rows(self, chunk: int = 4096) -> None:
        """Empty every row whose checksum does not match its vectors and hash (one warning for them all)."""
        damaged, filled = 0, 0
        for begin in range(0, len(self.collection), chunk):
            hashes = np.asarray(self.hashes.array[begin:begin + chunk])
            checks = np.asarray(self.checks.array[begin:begin + chunk])
            used = np.flatnonzero((hashes != 0) | (checks != 0))  # a row never written holds zeros in all three
            if not len(used):
                continue
            filled += len(used)
            vectors = np.asarray(self.vectors.array[begin + used])
            bad = used[row_checksums(vectors, hashes[used]) != checks[used]]
            if len(bad):
                zeros = np.zeros(len(bad), dtype=np.int64)
                self.hashes.write(begin + bad, zeros)  # the hash first: a row without one is never a hit
                self.checks.write(begin + bad, zeros.astype(np.uint32))
                damaged += len(bad)
        if damaged:
            warnings.warn(f"{self.vectors.path}: {damaged} of {filled} cached rows fail their checksum "
                          f"({self.checks.path.name}; a damaged or truncated cache file); the teacher computes "
                          "them again", stacklevel=4)

    def store(self, rows: np.ndarray, vectors: np.ndarray, hashes: np.ndarray) -> None:
        """Write rows in the order that keeps a half-written one from ever counting as cached."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors.write(rows, vectors)
        self.hashes.write(rows, hashes)
        self.checks.write(rows, row_checksums(vectors, hashes))

    def vectors_for(self, encode, ids: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """``[cached layers, n, dim]`` for ``texts``: rows holding these exact texts are read, the rest
        encoded with ``encode(texts) -> [layers, m, dim]`` and stored."""
        if self.empty:
            with torch.no_grad():
                return encode(list(texts)).float().cpu()
        rows = self.collection.lookup(ids)
        hashes = np.array([text_hash(t) for t in texts], dtype=np.int64)
        known = rows >= 0
        hit = np.zeros(len(ids), dtype=bool)
        hit[known] = self.hashes.array[rows[known]] == hashes[known]
        out = np.empty((len(ids),) + self.vectors.array.shape[1:], dtype=np.float32)
        if hit.any():
            out[hit] = self.vectors.array[rows[hit]]
        missing = np.flatnonzero(~hit)
        if len(missing):
            with torch.no_grad():
                fresh = encode([texts[int(i)] for i in missing])
            out[missing] = fresh.float().transpose(0, 1).cpu().numpy()
            store = missing[known[missing]]
            if len(store):
                self.store(rows[store], out[store], hashes[store])
        return torch.from_numpy(out).transpose(0, 1)

    def filled(self) -> int:
        return 0 if self.empty else int(np.count_nonzero(self.hashes.array))

    def close(self) -> None:
        if not self.empty:
            self.vectors.close()
            self.hashes.close()
            self.checks.close()


class TeacherVectorCache:
    """Serves a frozen dense teacher's per-layer vectors for training batches, computing each text once.

    ``layers`` are the teacher layers the loss can ask for (every layer for LEAD's random pairs, the last
    one for response-only KD); ``queries`` may be None (a corpus without a queries file: every query is
    then encoded, passages are still cached).
    """

    def __init__(self, folder: str | Path, model, corpus, queries, fingerprint: dict,
                 layers: Sequence[int] | None = None, log=print):
        folder = Path(folder)
        self.model = model
        self.layers = sorted(set(resolve_layers(layers, model.num_layers)))
        width = getattr(model, "layer_width", model.hidden_size)  # a projected final layer may be wider
        meta = {**fingerprint, "checksums": CHECKSUMS, "layers": self.layers, "dim": int(width),
                "passages": len(corpus), "queries": len(queries) if queries is not None else 0}
        stored = json.loads((folder / META).read_text()) if (folder / META).is_file() else None
        if stored is not None and set(self.layers) <= set(stored.get("layers", ())) \
                and {**stored, "layers": None} == {**meta, "layers": None}:
            meta, self.layers = stored, stored["layers"]  # a shared cache holding more layers serves these too
        fresh = stored != meta
        if fresh:
            if folder.exists():
                why = "without row checksums (an older leadkd)" if stored is not None and "checksums" not in stored \
                    else "for another teacher or data"
                log(f"{folder}: teacher cache built {why}; rebuilding it")
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        self.sides = {"query": _Side(folder, "queries", queries, len(self.layers), meta["dim"], fresh),
                      "passage": _Side(folder, "passages", corpus, len(self.layers), meta["dim"], fresh)}
        if fresh:  # written last: a cache without it is rebuilt
            with atomic_write(folder / META) as handle:
                json.dump(meta, handle, indent=2)

    def encode(self, query_ids: Sequence[str], queries: Sequence[str], passage_ids: Sequence[str],
               passages: Sequence[str], layers: Sequence[int], final: bool = False):
        """What the teacher's ``encode_batch`` would return, for the requested ``layers`` (and ``final``)."""
        wanted = list(layers) + ([self.model.num_layers - 1] if final else [])
        wanted = resolve_layers(wanted, self.model.num_layers)
        if not set(wanted) <= set(self.layers):
            raise ValueError(f"layers {wanted} asked of a cache holding layers {self.layers}")
        index = torch.as_tensor([self.layers.index(x) for x in wanted], dtype=torch.long)
        q = self.sides["query"].vectors_for(lambda t: self.model.layer_embeddings(t, "query", self.layers),
                                            query_ids, queries)
        p = self.sides["passage"].vectors_for(lambda t: self.model.layer_embeddings(t, "passage", self.layers),
                                              passage_ids, passages)
        device = next(self.model.parameters()).device
        return self.model.vectors_batch(q.index_select(0, index).to(device), p.index_select(0, index).to(device))

    def prefill_passages(self, vectors: np.ndarray, chunk: int = 4096) -> int:
        """Store the teacher's vectors of the whole corpus computed elsewhere: ``[every layer of the teacher,
        passages, dim]`` in corpus row order (the encoding that mining searched), so that no training step
        runs the teacher on a corpus passage. Each row is keyed by the passage's text as training batches
        give it; returns how many rows were written."""
        side = self.sides["passage"]
        if side.empty:
            return 0
        corpus = side.collection
        if tuple(vectors.shape[:2]) != (self.model.num_layers, len(corpus)):
            raise ValueError(f"vectors of shape {tuple(vectors.shape)}: expected {self.model.num_layers} layers x "
                             f"{len(corpus)} passages")
        for begin in range(0, len(corpus), chunk):
            rows = np.arange(begin, min(begin + chunk, len(corpus)))
            values = np.ascontiguousarray(np.asarray(vectors[self.layers][:, rows], dtype=np.float32)
                                          .transpose(1, 0, 2))
            side.store(rows, values, np.array([text_hash(t) for t in corpus.passages(rows)], dtype=np.int64))
        return len(corpus)

    def filled(self) -> dict[str, int]:
        """How many queries and passages are cached so far (for the log)."""
        return {side: s.filled() for side, s in self.sides.items()}

    def close(self) -> None:
        for side in self.sides.values():
            side.close()
