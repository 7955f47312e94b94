"""Evaluation and search outputs on a full disk: run files, metrics and per-query files, embeddings folders
and indexes. The disk fills up part-way through one output: `leadkd` exits 2 with ONE line naming that
output (not its temporary name) and "No space left", nothing is left under the final name or beside it,
and an earlier complete output there is kept byte for byte.

A small real filesystem cannot be mounted here, so ENOSPC is injected: ``os.fsync`` of the one file being
written (every text output goes through ``atomic_write``, which fsyncs before renaming) or ``np.save`` of
the vectors, or FAISS's ``write_index`` (its own error, from writing to /dev/full), each after some bytes
of it already reached the file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_beir, make_tiny_bert_folder
from leadkd.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full-disk")
    return {"root": root, "model": make_tiny_bert_folder(root / "bert", dropout=0.0),
            "data": make_tiny_beir(root / "tiny")}


def cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, err.getvalue()


def model_args(env) -> list:
    return ["--model", env["model"], "--max-query-length", "16", "--max-passage-length", "32", "--device", "cpu"]


def fail_fsync_of(monkeypatch, name: str) -> None:
    """ENOSPC from ``os.fsync`` of the temporary file that will become ``name`` (its data already written)."""
    real = os.fsync

    def fsync(fd):
        if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def fail_np_save(monkeypatch) -> None:
    """ENOSPC from ``np.save`` after the first 100 bytes reached the file."""
    def save(file, array, *args, **kwargs):
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as handle:
            handle.write(b"\x93NUMPY" + b"\0" * 94)
            handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", save)


def fail_faiss_write(monkeypatch) -> None:
    """A full disk under ``faiss.write_index`` after the first 100 bytes of the index, by either way FAISS
    writes: to a file name (the real FAISS writing to /dev/full, which refuses every byte: FAISS prints a
    failed close and returns) or through a Python writer (whose writes fail with ENOSPC)."""
    import faiss

    real_write, real_writer = faiss.write_index, faiss.PyCallbackIOWriter

    def write_index(index, file, *args):
        real_write(index, "/dev/full" if isinstance(file, (str, os.PathLike)) else file, *args)

    def writer(write, *args):
        room = [100]

        def write_until_full(data):
            done = write(bytes(data[:room[0]]))
            room[0] -= done or 0
            if len(data) > done:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return done

        return real_writer(write_until_full, *args)

    monkeypatch.setattr(faiss, "write_index", write_index)
    monkeypatch.setattr(faiss, "PyCallbackIOWriter", writer)


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line_naming(err: str, path: Path, what: str) -> None:
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"leadkd: error: {path}: cannot write the {what} (No space left on device; "), err
    assert errors[0] == err.strip().splitlines()[-1]


def assert_nothing_beside(path: Path) -> None:
    """No temporary or half-written copy of ``path`` is left in its folder."""
    debris = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]
    assert debris == [], debris


@pytest.fixture(scope="module")
def written(env):
    """Complete outputs of every command, written once before the disk fills."""
    root, data = env["root"] / "out", env["data"]
    retrieve = root / "retrieve"
    assert cli("retrieve", *model_args(env), "--data", data, "--split", "dev", "--output", retrieve,
               "--save-embeddings")[0] == 0
    assert cli("encode", *model_args(env), "--data", data, "--output", root / "emb")[0] == 0
    assert cli("index", "--embeddings", root / "emb", "--output", root / "index")[0] == 0
    assert cli("index", "--embeddings", root / "emb", "--backend", "faiss", "--output", root / "faiss-index")[0] == 0
    assert cli("search", *model_args(env), "--index", root / "index", "--data", data, "--split", "dev",
               "--output", root / "search.trec")[0] == 0
    assert cli("evaluate", "--run", retrieve / "run.trec", "--qrels", data / "qrels" / "dev.tsv",
               "--output", root / "metrics.json", "--per-query", root / "per_query.jsonl")[0] == 0
    return root


CASES = {  # command (@x: a path under the output folder), the output that fails, what the line calls it, how
    "retrieve run": ("retrieve MODEL --data DATA --split dev --output @retrieve", "retrieve/run.trec", "run file",
                     "fsync"),
    "retrieve metrics": ("retrieve MODEL --data DATA --split dev --output @retrieve", "retrieve/metrics.json",
                         "metrics file", "fsync"),
    "retrieve per-query": ("retrieve MODEL --data DATA --split dev --output @retrieve", "retrieve/per_query.jsonl",
                           "per-query file", "fsync"),
    "retrieve embeddings": ("retrieve MODEL --data DATA --split dev --output @retrieve --save-embeddings",
                            "retrieve/corpus_embeddings", "embeddings folder", "np.save"),
    "encode": ("encode MODEL --data DATA --output @emb", "emb", "embeddings folder", "np.save"),
    "index": ("index --embeddings @emb --output @index", "index", "index", "np.save"),
    "index written back": ("index --embeddings @emb --output @index", "index", "index", "fsync"),
    "faiss index": ("index --embeddings @emb --backend faiss --output @faiss-index", "faiss-index", "index",
                    "faiss"),
    "search": ("search MODEL --index @index --data DATA --split dev --output @search.trec", "search.trec",
               "run file", "fsync"),
    "evaluate metrics": ("evaluate --run @retrieve/run.trec --qrels QRELS --output @metrics.json", "metrics.json",
                         "metrics file", "fsync"),
    "evaluate per-query": ("evaluate --run @retrieve/run.trec --qrels QRELS --per-query @per_query.jsonl",
                           "per_query.jsonl", "per-query file", "fsync"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-earlier-one", "new"])
def test_a_full_disk_names_the_output_and_leaves_no_partial_file(env, written, tmp_path, monkeypatch, case, earlier):
    import shutil

    argv, target, what, how = CASES[case]
    root = tmp_path / "out"
    shutil.copytree(written, root)
    target = root / target
    if not earlier:
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    before = snapshot(target) if earlier else None
    args = []
    for arg in argv.split():
        if arg == "MODEL":
            args += model_args(env)
        else:
            args.append({"DATA": env["data"], "QRELS": env["data"] / "qrels" / "dev.tsv"}.get(arg, arg))
    args = [root / a[1:] if isinstance(a, str) and a.startswith("@") else a for a in args]
    if how == "fsync":
        fail_fsync_of(monkeypatch, target.name)
    elif how == "faiss":
        fail_faiss_write(monkeypatch)
    else:
        fail_np_save(monkeypatch)
    status, err = cli(*args)
    monkeypatch.undo()
    assert status == 2, err
    assert_one_line_naming(err, target, what)
    assert err.strip().endswith("the earlier one there is unchanged") == earlier
    assert_nothing_beside(target)
    if earlier:
        assert snapshot(target) == before
    else:
        assert not target.exists()


@pytest.mark.parametrize("where", ["share", "folder"])
def test_sharded_embeddings_on_a_full_disk(tmp_path, monkeypatch, where):
    """``save_shards`` (encode/retrieve under torchrun; one process here): the disk fills while a process
    writes its share, or while rank 0 takes room for the merged folder (taken before the memory-mapped copy,
    so that a full disk is an error rather than a SIGBUS). One line names the folder; no share is left."""
    from leadkd.retrieval.pipeline import Embeddings, save_shards, shards_folder
    from leadkd.runtime.errors import LeadkdError

    folder, vectors = tmp_path / "emb", np.arange(12, dtype=np.float32).reshape(4, 3)
    ids, meta = ["a", "b", "c", "d"], {"what": "passages", "count": 4, "dim": 3}
    save_shards(folder, ids, range(4), vectors, meta)
    before = snapshot(folder)
    if where == "share":
        fail_np_save(monkeypatch)
    else:
        def fallocate(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(LeadkdError) as error:
        save_shards(folder, ids, range(4), vectors + 1, meta)
    monkeypatch.undo()
    assert str(error.value).startswith(f"{folder}: cannot write the embeddings folder (No space left on device; ")
    assert snapshot(folder) == before and np.array_equal(Embeddings.load(folder).vectors, vectors)
    assert not any(shards_folder(folder).rglob("*")) if shards_folder(folder).exists() else True
    assert [p.name for p in tmp_path.iterdir()
            if p.name.startswith(".emb") and p.name != shards_folder(folder).name] == []
