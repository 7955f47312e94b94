"""A dense index over document embeddings: exact (flat) or approximate (HNSW), saved as one folder.

Why two backends for the same exact search: our blocked torch search breaks ties deterministically, streams
a memory-mapped corpus and runs on a GPU, so it is the default for ``kind="flat"``; on a quiet CPU it takes
~1.3-1.5x ``faiss.IndexFlatIP``'s time (docs/benchmarks-search.md; an earlier "2.5x faster" was measured
under load, where faiss slows down more). faiss is kept for HNSW and for users who want a ``.faiss`` file.
Inner product only: normalise the embeddings first for cosine.

Folder layout (written atomically, so a crash never leaves half an index)::

    meta.json        {"format", "version", "kind", "backend", "metric", "dim", "count"[, "hnsw"]}
    ids.txt          one document id per line, row i of the index = line i
    embeddings.npy   flat + torch backend (memory-mapped at load: the corpus need not fit in RAM)
    index.faiss      faiss backend (flat or HNSW)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, cast

import faiss
import numpy as np
import torch

from leadkd.retrieval.search import ArrayLike, exact_search, to_run
from leadkd.runtime.errors import ConfigError, InputError, LeadkdError
from leadkd.runtime.fileio import atomic_directory, reporting_write_failures

Kind = Literal["flat", "hnsw"]
Backend = Literal["torch", "faiss"]

FORMAT = "leadkd-dense-index"
VERSION = 1
METRIC = "inner_product"
META_FILE, IDS_FILE, NPY_FILE, FAISS_FILE = "meta.json", "ids.txt", "embeddings.npy", "index.faiss"
_CHUNK = 65536  # rows per add / finiteness check, so huge (memory-mapped) inputs are streamed


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float32).numpy()
    return x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.asarray(x, dtype=np.float32)


def _sync_faiss_threads() -> None:
    """faiss has its own OpenMP pool; keep it at torch's size so one knob controls CPU use."""
    faiss.omp_set_num_threads(torch.get_num_threads())


def _add_chunked(index: faiss.Index, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), _CHUNK):
        index.add(np.ascontiguousarray(vectors[start:start + _CHUNK], dtype=np.float32))


def _resort(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (score desc, index asc) and turn faiss's missing results into (-inf, -1)."""
    missing = indices < 0
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    indices = np.where(missing, -1, indices).astype(np.int64)
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, indices), -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


class DenseIndex:
    """Document embeddings plus their ids, searchable by inner product; see the module docstring."""

    def __init__(self, doc_ids: Sequence[str], kind: Kind, backend: Backend, *, embeddings: np.ndarray | None = None,
                 faiss_index: faiss.Index | None = None, hnsw: dict[str, int] | None = None):
        """Use :meth:`build` or :meth:`load`; this only wires already-checked parts together."""
        self.doc_ids = list(doc_ids)
        self.kind = kind
        self.backend = backend
        self.hnsw = dict(hnsw or {})
        self._embeddings = embeddings
        self._faiss = faiss_index
        self._positions: dict[str, int] | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, embeddings: ArrayLike, doc_ids: Sequence[str], kind: Kind = "flat", backend: Backend | None = None,
              m: int = 32, ef_construction: int = 200, ef_search: int = 128) -> DenseIndex:
        """Index ``embeddings[i]`` under ``doc_ids[i]``.

        ``backend`` defaults to ``"torch"`` for flat (fastest exact search here) and must be ``"faiss"``
        for HNSW. ``m``/``ef_construction``/``ef_search`` are HNSW's graph degree and beam widths
        (search uses ``max(ef_search, k)``).
        """
        if kind not in ("flat", "hnsw"):
            raise ConfigError(f"index kind must be 'flat' or 'hnsw', got {kind!r}")
        backend = backend or ("torch" if kind == "flat" else "faiss")
        if backend not in ("torch", "faiss"):
            raise ConfigError(f"index backend must be 'torch' or 'faiss', got {backend!r}")
        if kind == "hnsw" and backend == "torch":
            raise ConfigError("backend 'torch' only does exact (flat) search; an HNSW index needs backend 'faiss'")
        vectors: np.ndarray | None  # None once the vectors live in a faiss index
        vectors = _as_numpy(embeddings)
        if vectors.ndim != 2:
            raise LeadkdError(f"embeddings must be a 2-d array [count, dim], got shape {vectors.shape}")
        if len(doc_ids) != len(vectors):
            raise LeadkdError(f"{len(doc_ids)} document ids for {len(vectors)} embeddings")
        _check_ids(doc_ids)
        _check_finite(vectors)
        hnsw: dict[str, int] = {}
        faiss_index: faiss.Index | None = None
        if backend == "faiss":
            _sync_faiss_threads()
            if kind == "flat":
                faiss_index = faiss.IndexFlatIP(vectors.shape[1])
            else:
                if min(m, ef_construction, ef_search) < 1:
                    raise ConfigError("HNSW m, ef_construction and ef_search must be at least 1")
                hnsw = {"m": m, "ef_construction": ef_construction, "ef_search": ef_search}
                faiss_index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
                faiss_index.hnsw.efConstruction = ef_construction
                faiss_index.hnsw.efSearch = ef_search
            _add_chunked(faiss_index, vectors)
            vectors = None
        return cls(doc_ids, kind, backend, embeddings=vectors, faiss_index=faiss_index, hnsw=hnsw)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.doc_ids)

    @property
    def dim(self) -> int:
        # Exactly one of the two is set (build and load make sure of it).
        return int(cast(np.ndarray, self._embeddings).shape[1]) if self._faiss is None else int(self._faiss.d)

    def position(self, doc_id: str) -> int | None:
        """Row of ``doc_id`` in the index, or None when it is not indexed."""
        if self._positions is None:
            self._positions = {d: i for i, d in enumerate(self.doc_ids)}
        return self._positions.get(doc_id)

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries: ArrayLike, k: int, exclude: Sequence[Iterable[int] | None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [Q, k'], indices int64 [Q, k'])``, ``k' = min(k, count)``, as :func:`exact_search`.

        Excluded indices are removed (faiss: by fetching extra results). Exact tie order at the top-k cut
        is guaranteed by the torch backend only; faiss results are re-sorted by (score desc, index asc).
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if len(queries.shape) != 2 or queries.shape[1] != self.dim:
            raise LeadkdError(f"queries have shape {tuple(queries.shape)} but the index holds {self.dim}-dimensional "
                              "vectors (were queries and documents encoded by the same model?)")
        if self._faiss is None:
            assert self._embeddings is not None  # an index holds its vectors or a faiss index
            return exact_search(queries, self._embeddings, k, exclude=exclude)
        return self._faiss_search(_as_numpy(queries), min(k, self.count), exclude)

    def _faiss_search(self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int] | None] | None
                      ) -> tuple[np.ndarray, np.ndarray]:
        assert self._faiss is not None  # called by search for a faiss index only
        _sync_faiss_threads()
        sets = [set(map(int, e or ())) for e in exclude] if exclude is not None else None
        if sets is not None and len(sets) != len(queries):
            raise ValueError(f"exclude has {len(sets)} entries for {len(queries)} queries")
        fetch = min(self.count, k + max((len(s) for s in sets), default=0)) if sets else k
        params = None
        if self.kind == "hnsw":  # a beam narrower than k cannot return k results
            params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]  # faiss has it; its stubs do not
                efSearch=max(self.hnsw["ef_search"], fetch))
        scores, indices = self._faiss.search(np.ascontiguousarray(queries), fetch, params=params)
        if sets:
            for row, banned in enumerate(sets):
                if banned:
                    indices[row, np.isin(indices[row], list(banned))] = -1
        scores, indices = _resort(scores, indices)
        return scores[:, :k], indices[:, :k]

    def search_run(self, query_ids: Sequence[str], queries: ArrayLike, k: int,
                   exclude_ids: Sequence[Iterable[str] | None] | None = None) -> dict[str, dict[str, float]]:
        """Search and return a run ``{query_id: {doc_id: score}}``; ``exclude_ids`` are document ids per query
        (e.g. the query's own id, or known positives when mining); ids not in the index are ignored."""
        exclude = None
        if exclude_ids is not None:
            exclude = [{p for p in map(self.position, ids or ()) if p is not None} for ids in exclude_ids]
        scores, indices = self.search(queries, k, exclude=exclude)
        return to_run(query_ids, self.doc_ids, scores, indices)

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index folder atomically (see the module docstring for its layout)."""
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "backend": self.backend, "metric": METRIC,
                "dim": self.dim, "count": self.count}
        if self.kind == "hnsw":
            meta["hnsw"] = self.hnsw
        with reporting_write_failures(path, "index"), atomic_directory(path) as tmp:
            with open(tmp / IDS_FILE, "w", encoding="utf-8", newline="\n") as handle:
                handle.writelines(f"{doc_id}\n" for doc_id in self.doc_ids)
            if self._faiss is None:
                assert self._embeddings is not None  # an index holds its vectors or a faiss index
                np.save(tmp / NPY_FILE, self._embeddings)
            else:
                # Through a Python file: FAISS's own file writer only prints a failed close (a full disk
                # caught in its last buffer) and returns, leaving a short index behind without an error.
                with open(tmp / FAISS_FILE, "wb") as handle:
                    writer = faiss.PyCallbackIOWriter(handle.write)  # type: ignore[attr-defined]  # not in its stubs
                    faiss.write_index(self._faiss, writer)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend | None = None, mmap: bool = True) -> DenseIndex:
        """Read an index folder; ``backend`` may switch a flat index between torch and faiss.

        ``mmap`` memory-maps ``embeddings.npy`` (torch backend) so only the pages searched are read.
        Every problem (missing file, wrong count or dimension) is one :class:`LeadkdError` line.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise LeadkdError(f"{folder}: no index folder there (build one with DenseIndex.build(...).save())")
        meta = _read_meta(folder / META_FILE)
        kind, saved_backend, dim, count = meta["kind"], meta["backend"], meta["dim"], meta["count"]
        backend = backend or saved_backend
        if kind == "hnsw" and backend != "faiss":
            raise ConfigError(f"{folder}: an HNSW index can only be searched with backend 'faiss'")
        doc_ids = _read_ids(folder / IDS_FILE)
        if len(doc_ids) != count:
            raise InputError(folder / IDS_FILE, f"holds {len(doc_ids)} ids but {META_FILE} says the index has {count}")

        if saved_backend == "torch":
            data_path = folder / NPY_FILE
            vectors = _read_npy(data_path, mmap)
            rows, width = vectors.shape
            faiss_index = None
        else:
            data_path = folder / FAISS_FILE
            faiss_index = _read_faiss(data_path, kind)
            rows, width, vectors = faiss_index.ntotal, faiss_index.d, None
        if rows != count:
            raise InputError(data_path, f"holds {rows} vectors but {IDS_FILE} has {count} ids")
        if width != dim:
            raise InputError(data_path, f"holds {width}-dimensional vectors but {META_FILE} says {dim}")

        if backend == "faiss" and faiss_index is None:  # flat: stored vectors -> faiss
            assert vectors is not None  # read above, as there is no faiss index
            _sync_faiss_threads()
            faiss_index = faiss.IndexFlatIP(dim)
            _add_chunked(faiss_index, vectors)
            vectors = None
        elif backend == "torch" and vectors is None:  # flat: faiss -> stored vectors
            assert faiss_index is not None  # read above, as there are no stored vectors
            vectors, faiss_index = faiss_index.reconstruct_n(0, count), None
        return cls(doc_ids, kind, backend, embeddings=vectors, faiss_index=faiss_index, hnsw=meta.get("hnsw"))

    def __repr__(self) -> str:
        return f"DenseIndex(kind={self.kind!r}, backend={self.backend!r}, count={self.count}, dim={self.dim})"


def _check_ids(doc_ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for i, doc_id in enumerate(doc_ids):
        if not isinstance(doc_id, str) or not doc_id or "\n" in doc_id or "\r" in doc_id:
            raise LeadkdError(f"document id #{i} ({doc_id!r}) must be a non-empty string without line breaks")
        if doc_id in seen:
            raise LeadkdError(f"document id {doc_id!r} appears twice (row {i}); an index needs unique ids")
        seen.add(doc_id)


def _check_finite(vectors: np.ndarray) -> None:
    """NaN would sort above every real score (torch.topk) and silently top every ranking; refuse it."""
    for start in range(0, len(vectors), _CHUNK):
        block = np.asarray(vectors[start:start + _CHUNK])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise LeadkdError(f"embedding row {start + int(bad.argmax())} is not finite (NaN or inf)")


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "missing: the folder is not a complete leadkd index")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(path, f"not a leadkd index description (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise InputError(path, f"index format version {meta.get('version')!r}; this leadkd reads version {VERSION}")
    for field, allowed in (("kind", ("flat", "hnsw")), ("backend", ("torch", "faiss")), ("metric", (METRIC,))):
        if meta.get(field) not in allowed:
            raise InputError(path, f"must be one of {', '.join(allowed)}, got {meta.get(field)!r}", field=field)
    for field in ("dim", "count"):
        if not isinstance(meta.get(field), int) or meta[field] < 0:
            raise InputError(path, f"must be a non-negative integer, got {meta.get(field)!r}", field=field)
    hnsw = meta.get("hnsw")
    if meta["kind"] == "hnsw" and not (isinstance(hnsw, dict) and all(
            isinstance(hnsw.get(key), int) and hnsw[key] > 0 for key in ("m", "ef_construction", "ef_search"))):
        raise InputError(path, "an HNSW index needs its parameters (m, ef_construction, ef_search)", field="hnsw")
    return meta


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(path, "missing: the folder is not a complete leadkd index")
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "missing: the folder is not a complete leadkd index")
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"not a readable .npy array ({exc})") from None
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise InputError(path, f"expected a float32 [count, dim] array, got {vectors.dtype} {vectors.shape}")
    return vectors


def _read_faiss(path: Path, kind: Kind) -> faiss.Index:
    if not path.is_file():
        raise InputError(path, "missing: the folder is not a complete leadkd index")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"faiss cannot read it ({reason})") from None
    expected = faiss.IndexFlatIP if kind == "flat" else faiss.IndexHNSWFlat
    if not isinstance(index, expected) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(path, f"holds a {type(index).__name__}, expected an inner-product {expected.__name__}")
    return index
