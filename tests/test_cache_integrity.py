"""The teacher cache's row checksums: a row damaged on disk is recomputed by the teacher, never trained on.

Each test fills a cache with a tiny frozen teacher, damages its files as a bad disk or an interrupted copy
would (one flipped byte in the vectors, the hashes or the checksums; a file cut short; a broken header),
and reopens it: one warning naming the file and how many rows, those rows computed again and equal to the
teacher's own vectors, every other row served without running the teacher.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.data.datasets import load_corpus, load_queries
from leadkd.distill.teacher_cache import TeacherVectorCache
from leadkd.distill.trainer import run_job
from leadkd.models.dual_encoder import DualEncoder
from test_teacher_cache import counting, distill_config, losses

LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    return {"teacher": make_tiny_bert_folder(root / "teacher", layers=3, seed=7, dropout=0.1, init_range=0.3),
            "data": make_tiny_beir(root / "data"), "groups": make_tiny_groups(root / "groups.jsonl")}


@pytest.fixture
def filled(setup, tmp_path):
    """A cache holding every passage (as the quickstart fills it), closed; and what opens it again."""
    teacher = DualEncoder.from_pretrained(setup["teacher"], pooling="mean", normalize=True).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    folder = tmp_path / "cache"
    cache = TeacherVectorCache(folder, teacher, corpus, queries, {"teacher": "t"}, log=lambda m: None)
    cache.prefill_passages(teacher.encode_passages(corpus.passages(range(len(corpus))), batch_size=8, layers=LAYERS))
    cache.close()

    def reopen():
        return TeacherVectorCache(folder, teacher, corpus, queries, {"teacher": "t"}, log=lambda m: None)

    return {"folder": folder, "teacher": teacher, "corpus": corpus, "reopen": reopen}


def data_offset(path: Path) -> tuple[int, int]:
    """Where the rows of a ``.npy`` file start, and the bytes of one row (read independently of the cache)."""
    array = np.load(path, mmap_mode="r")
    return array.offset, array[0].nbytes


def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([byte ^ 0x10]))


def reopen_warning(filled) -> tuple[TeacherVectorCache, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = filled["reopen"]()
    return cache, [str(w.message) for w in caught]


def served_and_calls(filled, cache, rows) -> tuple[torch.Tensor, list[int]]:
    corpus = filled["corpus"]
    calls = counting(filled["teacher"])
    served = cache.encode([], [], [corpus.id_at(i) for i in rows], corpus.passages(rows), layers=LAYERS).passages
    return served, calls


def teacher_vectors(filled, rows) -> torch.Tensor:
    with torch.no_grad():  # the naive way: the teacher itself on these texts
        return DualEncoder.layer_embeddings(filled["teacher"], filled["corpus"].passages(rows), "passage", LAYERS)


@pytest.mark.parametrize("file", ["passages.npy", "passages.hash.npy", "passages.crc.npy"])
def test_a_flipped_byte_is_found_on_open_and_only_that_row_recomputed(filled, file):
    path = filled["folder"] / file
    offset, row_bytes = data_offset(path)
    flip_byte(path, offset + 5 * row_bytes + row_bytes // 2)  # inside row 5
    cache, said = reopen_warning(filled)
    assert said == [(f"{filled['folder'] / 'passages.npy'}: 1 of 24 cached rows fail their checksum (passages.crc.npy; "
                     "a damaged or truncated cache file); the teacher computes them again")]
    assert cache.filled()["passage"] == 23
    rows = [3, 5, 7, 20]
    served, calls = served_and_calls(filled, cache, rows)
    assert calls == [1]  # row 5 alone
    assert torch.allclose(served, teacher_vectors(filled, rows), atol=1e-5)
    cache.close()
    again, said = reopen_warning(filled)
    assert said == [] and again.filled()["passage"] == 24  # the recomputed row is stored with a good checksum
    assert served_and_calls(filled, again, rows)[1] == []


def test_a_truncated_file_loses_only_the_rows_it_cut(filled):
    path = filled["folder"] / "passages.npy"
    offset, row_bytes = data_offset(path)
    with open(path, "r+b") as handle:
        handle.truncate(offset + 20 * row_bytes + row_bytes // 3)  # rows 20..23 lost, 20 in part
    cache, said = reopen_warning(filled)
    assert len(said) == 1 and said[0].startswith(f"{path}: 4 of 24 cached rows fail their checksum")
    rows = list(range(24))
    served, calls = served_and_calls(filled, cache, rows)
    assert calls == [4]
    assert torch.allclose(served, teacher_vectors(filled, rows), atol=1e-5)


def test_a_damaged_header_empties_that_file_and_every_row_is_recomputed(filled):
    path = filled["folder"] / "passages.hash.npy"
    with open(path, "r+b") as handle:
        handle.write(b"garbage!")
    cache, said = reopen_warning(filled)
    assert len(said) == 1 and "24 of 24 cached rows" in said[0]
    rows = [0, 9]
    served, calls = served_and_calls(filled, cache, rows)
    assert calls == [2] and torch.allclose(served, teacher_vectors(filled, rows), atol=1e-5)


def test_checksums_are_crc32_of_the_vectors_then_the_hash(filled):
    """The sidecar's format, checked by hand: CRC-32 over a row's float32 bytes followed by its int64 hash."""
    folder = filled["folder"]
    vectors, hashes = np.load(folder / "passages.npy"), np.load(folder / "passages.hash.npy")
    checks = np.load(folder / "passages.crc.npy")
    assert checks.dtype == np.uint32 and vectors.dtype == np.float32 and hashes.dtype == np.int64
    for row in (0, 13):
        assert checks[row] == zlib.crc32(vectors[row].tobytes() + hashes[row].tobytes())


def test_a_cache_written_without_checksums_is_rebuilt(filled):
    folder = filled["folder"]
    meta = json.loads((folder / "meta.json").read_text())
    del meta["checksums"]
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "passages.crc.npy").unlink()
    said = []
    cache = TeacherVectorCache(folder, filled["teacher"], filled["corpus"], None, {"teacher": "t"}, log=said.append)
    assert said == [f"{folder}: teacher cache built without row checksums (an older leadkd); rebuilding it"]
    assert cache.filled()["passage"] == 0


def test_training_on_a_damaged_shared_cache_recomputes_the_rows_and_matches(setup, tmp_path):
    """A run fills teacher.cache_dir; one byte of it flips; the next run warns once, recomputes that row and
    trains exactly as the first did (up to float rounding)."""
    shared = tmp_path / "shared"
    settings = {"teacher.cache": True, "teacher.cache_dir": str(shared)}
    run_job(distill_config(setup, tmp_path / "first", **settings), log=lambda m: None)
    path = shared / "rank0" / "passages.npy"
    hashes = np.load(shared / "rank0" / "passages.hash.npy")
    row = int(np.flatnonzero(hashes)[0])
    offset, row_bytes = data_offset(path)
    flip_byte(path, offset + row * row_bytes + 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_job(distill_config(setup, tmp_path / "second", **settings), log=lambda m: None)
    said = [str(w.message) for w in caught if "checksum" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{path}: 1 of ")
    assert np.allclose(losses(tmp_path / "first"), losses(tmp_path / "second"), atol=1e-4)
