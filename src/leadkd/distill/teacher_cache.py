"""Per-layer vectors of a frozen dual-encoder teacher, cached per query and passage on disk.

A frozen teacher runs in eval mode under ``no_grad``, so a passage gets the same vectors in every epoch.
After a text has been seen once, response-KD and LEAD cost only the student's forward and backward.

The cache is two memory-mapped arrays per side (queries, passages): the vectors ``[rows, layers, dim]``
in float32, and one ``filled`` flag per row. Rows are the collection's own row numbers, so the cache
needs no id-to-slot table in memory. Until a row is written, its part of the file is a sparse hole on
filesystems that have them. A text that is not in the collection (an inline passage, or a query given
only in the groups file) is encoded every time.

Within a run, a cached vector equals the one the teacher would compute now, up to float rounding: the
padding of the batch it was first computed in differs. ``meta.json`` holds what the vectors depend on
(teacher folder, lengths, pooling, layers, collection sizes); a cache that does not match is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fileio import atomic_write
from .views import Encoded

META = "meta.json"


class _Side:
    """The cached vectors of one collection (the queries, or the passages)."""

    def __init__(self, folder: Path, name: str, collection, num_layers: int, dim: int, fresh: bool):
        self.collection = collection
        shape = (len(collection), num_layers, dim)
        mode = "w+" if fresh else "r+"
        self.vectors = np.lib.format.open_memmap(folder / f"{name}.npy", mode=mode, dtype=np.float32, shape=shape)
        self.filled = np.lib.format.open_memmap(folder / f"{name}.filled.npy", mode=mode, dtype=np.bool_,
                                                shape=(shape[0],))

    def vectors_for(self, model, kind: str, ids: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """``[layers, n, dim]`` for ``texts``: cached rows are read, the others encoded (and stored)."""
        rows = self.collection.lookup(ids) if len(self.collection) else np.full(len(ids), -1, dtype=np.int64)
        known = rows >= 0
        hit = np.zeros(len(ids), dtype=bool)
        hit[known] = self.filled[rows[known]]
        out = np.empty((len(ids),) + self.vectors.shape[1:], dtype=np.float32)
        if hit.any():
            out[hit] = self.vectors[rows[hit]]
        missing = np.flatnonzero(~hit)
        if len(missing):
            with torch.no_grad():
                fresh = model.layer_embeddings([texts[i] for i in missing], kind)  # [L, m, d], every layer
            fresh = fresh.float().transpose(0, 1).cpu().numpy()
            out[missing] = fresh
            store = known[missing]
            if store.any():
                # The flag is set only after the vectors are written, so a crash in between costs a
                # recomputation, never a wrong vector.
                target = rows[missing[store]]
                self.vectors[target] = fresh[store]
                self.filled[target] = True
        return torch.from_numpy(out).transpose(0, 1)


class TeacherVectorCache:
    """Serves a frozen DE teacher's per-layer vectors for training batches, computing each text once."""

    def __init__(self, folder: str | Path, model, corpus, queries, fingerprint: dict, log=print):
        folder = Path(folder)
        meta = {**fingerprint, "num_layers": model.num_layers, "dim": int(model.hidden_size),
                "passages": len(corpus), "queries": len(queries)}
        fresh = not (folder / META).is_file() or json.loads((folder / META).read_text()) != meta
        if fresh:
            if folder.exists():
                log(f"{folder}: teacher cache built for another teacher or data; rebuilding it")
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        self.model = model
        self.sides = {"query": _Side(folder, "queries", queries, meta["num_layers"], meta["dim"], fresh),
                      "passage": _Side(folder, "passages", corpus, meta["num_layers"], meta["dim"], fresh)}
        if fresh:  # written last: a cache without it is rebuilt
            with atomic_write(folder / META) as handle:
                json.dump(meta, handle, indent=2)

    def encode(self, query_ids: Sequence[str], queries: Sequence[str], passage_ids: Sequence[str],
               passages: Sequence[str], layers: Sequence[int]) -> Encoded:
        """What ``EncodeForward`` would return for the teacher, for the requested ``layers``."""
        index = torch.as_tensor([int(l) % self.model.num_layers for l in layers], dtype=torch.long)
        q = self.sides["query"].vectors_for(self.model, "query", query_ids, queries)
        p = self.sides["passage"].vectors_for(self.model, "passage", passage_ids, passages)
        device = next(self.model.parameters()).device
        return Encoded(queries=q.index_select(0, index).to(device), passages=p.index_select(0, index).to(device),
                       scale=self.model.similarity_scale)

    def filled(self) -> dict[str, int]:
        """How many queries and passages are cached so far (for the log)."""
        return {side: int(s.filled.sum()) for side, s in self.sides.items()}
