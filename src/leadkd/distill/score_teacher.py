"""``leadkd score-teacher``: score every training group with a frozen teacher once, at every asked layer.

The teacher may be of any kind (anything ``teacher.path`` takes); it is asked only through the kinds'
protocol, ``encode_batch(queries, passages, layers, final=True).scores()``, for batches of groups of equal
size, and a model that scores the whole batch keeps each query's own group. What is written, and why a
crash costs only the rows in flight, is :mod:`leadkd.distill.teacher_scores`'s docstring.

Under ``torchrun`` each process scores every ``world_size``-th group (its share) into the same unfinished
folder - rows are disjoint, so no two processes write the same bytes - and rank 0 checks every row and
publishes the folder once all are done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..config import TeacherConfig
from ..data.datasets import load_corpus, load_queries
from ..data.groups import read_training_groups
from ..models.base import Retriever, resolve_layers, resolve_model_path
from ..models.loading import build_model
from ..runtime.distributed import DistContext, all_gather_object
from ..runtime.errors import ConfigError, LeadkdError
from ..runtime.fileio import atomic_write, check_replaceable, remove_tree
from ..runtime.row_file import RowFile
from .losses import own_group_scores
from .teacher_scores import (
    CHECKSUMS,
    DTYPES,
    FORMAT,
    META,
    ROWS,
    SCORES,
    VERSION,
    TeacherScores,
    bad_rows,
    candidate_keys,
    file_sha256,
    ids_hash,
    read_meta,
    row_checksum,
    weights_fingerprint,
)

Log = Callable[[str], None]
#: Keys of ``meta.json`` that describe where and by whom, not what: two requests differing only there match.
_INCIDENTAL = ("written_by",)


def parse_layers(text: str | Sequence[int] | None, depth: int) -> list[int]:
    """``all`` (or None) for every layer, else ``0,3,7,11`` (negative counts from the end); sorted, distinct."""
    if text is None or text == "all":
        return list(range(depth))
    if isinstance(text, str):
        try:
            text = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"--layers must be 'all' or comma-separated layer numbers, got {text!r}") from None
    return sorted(set(resolve_layers(list(text), depth)))


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The ``meta.json`` keys whose values differ; the groups file counts by its checksum, not its path."""
    def request(meta: dict[str, Any]) -> dict[str, Any]:
        found = {key: value for key, value in meta.items() if key not in _INCIDENTAL}
        if isinstance(found.get("groups"), dict):
            found["groups"] = {key: value for key, value in found["groups"].items() if key != "path"}
        return found

    mine, theirs = request(stored), request(wanted)
    return sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))


class _Writer:
    """The unfinished folder's two arrays, written row by row (scores first, the record with its checksum last)."""

    def __init__(self, folder: Path, meta: dict[str, Any], groups: int, fresh: bool):
        what, hint = "the teacher scores", "free space there, then run the same command again to continue"
        shape = (groups, int(meta["width"]), len(meta["layers"]) + 1)
        self.scores = RowFile(folder / SCORES, np.dtype(meta["dtype"]), shape, fresh, what, hint)
        self.rows = RowFile(folder / ROWS, np.int64, (groups, 4), fresh, what, hint)

    def write(self, rows: np.ndarray, scores: np.ndarray, records: np.ndarray) -> None:
        order = np.argsort(rows)  # consecutive rows go out in one write
        self.scores.write(rows[order], scores[order])
        self.rows.write(rows[order], records[order])

    def unfinished(self, share: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """The rows of ``share`` that are not written, or fail their checksum (scored again)."""
        todo: list[int] = []
        for begin in range(0, len(share), chunk):
            part = share[begin:begin + chunk]
            bad = bad_rows(np.asarray(self.scores.array[part]), np.asarray(self.rows.array[part]))
            todo.extend(int(part[i]) for i, _ in bad)
        return np.asarray(todo, dtype=np.int64)

    def close(self, sync: bool = True) -> None:
        for file in (self.scores, self.rows):
            if sync:
                file.sync()
            file.close()


def _prepare_folder(output: Path, partial: Path, meta: dict[str, Any], groups: int, overwrite: bool,
                    log: Log) -> str:
    """Rank 0: decide what to do with what is on disk: ``done`` (a complete folder for this request, every
    row sound), ``resume`` (continue ``partial``; a finished folder with bad rows becomes one) or ``fresh``
    (``partial`` made anew). A folder or unfinished one of another request is refused in one line."""
    if output.exists():
        check_replaceable(output, (META,))
        stored = read_meta(output) if (output / META).is_file() else None
        if stored is not None and not _differences(stored, meta):
            writer = _Writer(output, meta, groups, fresh=False)
            try:
                bad = len(writer.unfinished(np.arange(groups, dtype=np.int64)))
            finally:
                writer.close(sync=False)
            if not bad:
                log(f"{output}: already scored for this teacher, these settings and groups; every row checks")
                return "done"
            log(f"{output}: {bad} rows fail their checks; scoring them again")
            if partial.exists():
                shutil.rmtree(partial)
            os.replace(output, partial)  # completed as an unfinished one, then published again
            return "resume"
        if not overwrite and stored is not None:
            raise LeadkdError(f"{output}: holds scores of another request (differs in "
                              f"{', '.join(_differences(stored, meta))}); choose another "
                              "--output, or pass --overwrite to replace it")
    if partial.exists():
        stored = read_meta(partial) if (partial / META).is_file() else None
        if stored is not None and not _differences(stored, meta):
            return "resume"
        if not overwrite:
            raise LeadkdError(f"{partial}: an unfinished score file of another request (differs in "
                              f"{', '.join(_differences(stored or {}, meta))}); remove it, "
                              "or pass --overwrite to start again")
        log(f"{partial}: removing an unfinished score file of another request (--overwrite)")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with atomic_write(partial / META) as handle:
        json.dump(meta, handle, indent=2)
    return "fresh"


def _batches(todo: np.ndarray, sizes: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``todo`` in batches of at most ``batch_size`` groups of one candidate count (no padding)."""
    order = todo[np.lexsort((todo, sizes[todo]))]
    batches = []
    for size in np.unique(sizes[order]):
        same = order[sizes[order] == size]
        batches += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    return batches


def score_teacher(teacher: TeacherConfig, data: str, groups_path: str, output: str | os.PathLike,
                  layers: str | Sequence[int] | None = "all", negatives: int | None = None, dtype: str = "float16",
                  batch_size: int = 8, raw_last_layer: bool = True, overwrite: bool = False, bf16: bool = False,
                  ctx: DistContext | None = None, log: Log = print, show_progress: bool = True,
                  ) -> Path:
    """Score every group of ``groups_path`` with ``teacher`` into the folder ``output``; returns it.

    ``negatives`` keeps each group's first N mined negatives (all for None), ``layers`` the teacher layers
    stored (``raw_last_layer``: ColBERT's last layer raw in the layer view, ``loss.colbert_last_layer``);
    ``bf16`` runs the teacher under bfloat16 autocast (a GPU's fast path; recorded in ``meta.json``).
    Rerunning the same command continues an interrupted one, or checks (and repairs) a finished one.
    """
    ctx = ctx or DistContext()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or (negatives is not None and negatives < 0):
        raise ConfigError(f"need --batch-size >= 1 and --candidates >= 0, got {batch_size} and {negatives}")
    if teacher.path is None:
        raise ConfigError("--teacher: required")
    corpus, queries = load_corpus(data), load_queries(data)
    groups = read_training_groups(groups_path, corpus=corpus, queries=queries)
    model = build_model(teacher).to(ctx.device)
    model.eval()
    model.requires_grad_(False)
    retriever = cast(Retriever, model)
    asked = parse_layers(layers, retriever.num_layers)
    candidates = [candidate_keys(groups, g, negatives) for g in range(len(groups))]
    sizes = np.array([len(keys) for _, keys in candidates], dtype=np.int64)
    meta = {"format": FORMAT, "version": VERSION, "checksums": CHECKSUMS,
            "teacher": {"path": teacher.path, "kind": retriever.kind, "settings": retriever.settings(),
                        "num_layers": retriever.num_layers,
                        "fingerprint": weights_fingerprint(resolve_model_path(teacher.path))},
            "layers": asked, "raw_last_layer": raw_last_layer, "dtype": dtype, "negatives": negatives,
            "compute": "bfloat16 autocast" if bf16 else "float32",
            "width": int(sizes.max()) if len(sizes) else 0,
            "groups": {"path": str(groups_path), "sha256": file_sha256(groups_path), "count": len(groups)},
            "written_by": _version()}
    output = Path(output)
    partial = output.with_name(f".{output.name}.partial")
    state = _prepare_folder(output, partial, meta, len(groups), overwrite, log) if ctx.is_main else ""
    if ctx.is_distributed:
        state = all_gather_object(state)[0]  # rank 0's decision, for every process
    if state == "done":
        return output
    writer = _Writer(partial, meta, len(groups), fresh=False)
    started = time.perf_counter()
    try:
        share = np.arange(ctx.rank, len(groups), ctx.world_size, dtype=np.int64)
        todo = writer.unfinished(share) if state != "fresh" else share
        if ctx.is_main and state == "resume":
            log(f"{partial}: {len(share) - len(todo)} of this process's {len(share)} groups already scored; "
                f"scoring the other {len(todo)}")
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            _score(retriever, groups, candidates, todo, sizes, asked, batch_size, raw_last_layer, writer, meta, ctx,
                   show_progress)
    finally:
        writer.close()
    ctx.barrier()
    if ctx.is_main:
        _publish(partial, output, meta, groups)
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in output.iterdir()) / 2**20
        log(f"wrote {output}: {len(groups)} groups x {meta['width']} candidates x {len(asked)} layers + final, "
            f"{dtype}, {size:.1f} MiB, {seconds:.1f} s")
    ctx.barrier()
    return output


def _score(model: Retriever, groups, candidates, todo: np.ndarray, sizes: np.ndarray, layers: list[int],
           batch_size: int, raw_last_layer: bool, writer: _Writer, meta: dict[str, Any], ctx: DistContext,
           show_progress: bool) -> None:
    width, dtype = int(meta["width"]), np.dtype(meta["dtype"])
    progress = None
    if show_progress and ctx.is_main and len(todo):
        from tqdm.auto import tqdm

        progress = tqdm(total=len(todo), desc="score-teacher", unit="group")
    try:
        for batch in _batches(todo, sizes, batch_size):
            size = int(sizes[batch[0]])
            queries = [groups.query_text(int(g)) for g in batch]
            passages = [groups.passage(k) for g in batch for k in candidates[int(g)][1]]
            with torch.no_grad():
                scores = model.encode_batch(queries, passages, layers, final=True,
                                            raw_last_layer=raw_last_layer).scores()
                if model.scores_whole_batch:
                    scores = own_group_scores(scores, size)
            values = scores.float().cpu().numpy().transpose(1, 2, 0)           # [B, size, slices]
            stored = np.zeros((len(batch), width, values.shape[2]), dtype=dtype)
            with np.errstate(over="ignore"):
                stored[:, :size] = values.astype(dtype)
            _check_finite(stored, values, batch, groups, dtype)
            records = np.zeros((len(batch), 4), dtype=np.int64)
            for i, g in enumerate(batch.tolist()):
                positives, keys = candidates[g]
                hashed = ids_hash(groups.query_id(g), [groups.passage_id(k) for k in keys])
                records[i] = (positives, size, hashed, row_checksum(stored[i], positives, size, hashed))
            writer.write(batch, stored, records)
            if progress is not None:
                progress.update(len(batch))
    finally:
        if progress is not None:
            progress.close()


def _check_finite(stored: np.ndarray, values: np.ndarray, batch: np.ndarray, groups, dtype: np.dtype) -> None:
    bad = ~np.isfinite(stored).all(axis=(1, 2))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        g = int(batch[i])
        overflow = np.isfinite(values[i]).all()
        why = (f"a score beyond {dtype.name}'s range (|score| up to {np.abs(values[i]).max():.4g}); use --dtype float32"
               if overflow else "a NaN or infinite score from the teacher")
        raise LeadkdError(f"group {g} (query {groups.query_id(g)!r}): {why}; nothing of it was written")


def _publish(partial: Path, output: Path, meta: dict[str, Any], groups) -> None:
    """Check every row of the finished folder, then give it its name (replacing an older one)."""
    shape = (len(groups), int(meta["width"]), len(meta["layers"]) + 1)
    found = TeacherScores(partial, meta, np.load(partial / SCORES, mmap_mode="r"),
                          np.load(partial / ROWS, mmap_mode="r"), groups)
    assert found.scores.shape == shape
    found.check_all()
    if output.exists():
        remove_tree(output, output.with_name(f".{output.name}.old"))
    os.replace(partial, output)


def _version() -> str:
    from .. import __version__

    return f"leadkd {__version__}"
