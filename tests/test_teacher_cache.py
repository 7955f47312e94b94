"""The frozen dual-encoder teacher's vector cache: same vectors as the teacher, each text encoded once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.config import load_config
from leadkd.data.datasets import load_corpus, load_queries
from leadkd.distill.teacher_cache import TeacherVectorCache
from leadkd.distill.trainer import Trainer, run_job
from leadkd.models.dual_encoder import DualEncoder
from leadkd.runtime.errors import ConfigError, LeadkdError


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache")
    return {"teacher": make_tiny_bert_folder(root / "teacher", layers=3, seed=7, dropout=0.1, init_range=0.3),
            "data": make_tiny_beir(root / "data"), "groups": make_tiny_groups(root / "groups.jsonl")}


def counting(model: DualEncoder) -> list[int]:
    """Patch ``layer_embeddings`` to record how many texts each call encodes."""
    calls, original = [], model.layer_embeddings

    def wrapped(texts, kind, layers=None):
        calls.append(len(texts))
        return original(texts, kind, layers)

    model.layer_embeddings = wrapped
    return calls


def test_cached_vectors_equal_the_teachers_and_are_computed_once(setup, tmp_path):
    teacher = DualEncoder.from_pretrained(setup["teacher"], pooling="mean", normalize=True).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "t"}, log=lambda m: None)
    calls = counting(teacher)
    q_ids, p_ids = [queries.id_at(i) for i in (0, 3)], [corpus.id_at(i) for i in (5, 1, 5, 9)]
    q_text, p_text = [queries.text(i) for i in (0, 3)], [corpus.text(i) for i in (5, 1, 5, 9)]
    first = cache.encode(q_ids, q_text, p_ids, p_text, layers=[0, 2])
    with torch.no_grad():  # the naive way: the teacher on exactly these texts
        q_ref = DualEncoder.layer_embeddings(teacher, q_text, "query", [0, 2])
        p_ref = DualEncoder.layer_embeddings(teacher, p_text, "passage", [0, 2])
    assert torch.allclose(first.queries, q_ref, atol=1e-5) and torch.allclose(first.passages, p_ref, atol=1e-5)
    assert first.scale == teacher.similarity_scale and not first.passages.requires_grad
    assert calls == [2, 4]
    again = cache.encode(q_ids, q_text, p_ids[::-1], p_text[::-1], layers=[-1])  # -1: the last layer
    assert calls == [2, 4]  # nothing re-encoded
    assert torch.equal(again.passages[0], first.passages[1].flip(0))  # layer 2 == last, order follows the batch
    assert cache.filled() == {"query": 2, "passage": 3}


def test_short_writes_are_finished_and_a_full_disk_raises(setup, tmp_path, monkeypatch):
    """A nearly full disk may take part of a row without an error: the rest must still be written (or an
    ENOSPC raised), never a partial row served later as a hit."""
    import errno
    import os

    teacher = DualEncoder.from_pretrained(setup["teacher"], pooling="mean", normalize=True).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "t"}, log=lambda m: None)
    real_pwrite, budget = os.pwrite, {"bytes": 10**9}

    def stingy(fd, data, offset):  # at most 7 bytes per call, and nothing once the budget is spent
        take = min(len(data), 7, budget["bytes"])
        budget["bytes"] -= take
        return real_pwrite(fd, bytes(data[:take]), offset) if take else 0

    monkeypatch.setattr(os, "pwrite", stingy)
    ids, texts = [corpus.id_at(i) for i in (2, 4)], [corpus.text(i) for i in (2, 4)]
    first = cache.encode([], [], ids, texts, layers=[0, 1, 2])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    calls = counting(teacher)
    assert torch.equal(cache.encode([], [], ids, texts, layers=[0, 1, 2]).passages, first.passages)
    assert calls == []  # served from the rows written 7 bytes at a time
    budget["bytes"] = 100  # the disk fills up inside the next row
    monkeypatch.setattr(os, "pwrite", stingy)
    with pytest.raises(LeadkdError, match=r"passages\.npy: cannot write the teacher cache \(No space left on "
                                          r"device\); free space there or set teacher\.cache: false") as error:
        cache.encode([], [], [corpus.id_at(7)], [corpus.text(7)], layers=[0])
    assert error.value.__cause__.errno == errno.ENOSPC
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert cache.filled()["passage"] == 2  # the half-written row is not marked as filled


def test_a_row_is_served_only_for_the_exact_text_it_was_computed_from(setup, tmp_path):
    """A groups file may give its own text for a collection id: that text is encoded, never the cached one."""
    teacher = DualEncoder.from_pretrained(setup["teacher"]).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {}, log=lambda m: None)
    pid = corpus.id_at(2)
    first = cache.encode([], [], [pid], [corpus.text(2)], layers=[2]).passages
    calls = counting(teacher)
    other = cache.encode([], [], [pid], ["protein gene cancer"], layers=[2]).passages
    assert calls == [1] and not torch.allclose(first, other)
    with torch.no_grad():
        assert torch.allclose(other, DualEncoder.layer_embeddings(teacher, ["protein gene cancer"], "passage", [2]),
                              atol=1e-5)
    cache.encode([], [], [pid], ["protein gene cancer"], layers=[2])
    assert calls == [1]  # the row now holds the new text


def test_without_a_queries_file_queries_are_encoded_and_passages_cached(setup, tmp_path):
    teacher = DualEncoder.from_pretrained(setup["teacher"]).eval()
    corpus = load_corpus(setup["data"])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, None, {}, layers=[-1], log=lambda m: None)
    calls = counting(teacher)
    for _ in range(2):
        encoded = cache.encode(["q1"], ["cells"], [corpus.id_at(0)], [corpus.text(0)], layers=[-1])
    assert calls == [1, 1, 1] and encoded.queries.shape == (1, 1, teacher.hidden_size)
    with pytest.raises(ValueError, match="holding layers"):
        cache.encode(["q1"], ["cells"], [], [], layers=[0])  # response-only cache: the last layer only


def test_texts_outside_the_collections_are_encoded_every_time(setup, tmp_path):
    teacher = DualEncoder.from_pretrained(setup["teacher"]).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {}, log=lambda m: None)
    calls = counting(teacher)
    for _ in range(2):
        encoded = cache.encode(["inline-q"], ["cells and genes"], ["inline-p", corpus.id_at(0)],
                               ["protein risk", corpus.text(0)], layers=[1])
    assert calls == [1, 2, 1, 1]  # the inline texts each time; the corpus passage once
    assert encoded.passages.shape == (1, 2, teacher.hidden_size)
    assert cache.filled() == {"query": 0, "passage": 1}


def test_a_cache_for_other_settings_is_rebuilt_and_a_matching_one_reused(setup, tmp_path):
    teacher = DualEncoder.from_pretrained(setup["teacher"]).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    said: list[str] = []
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "a"}, log=said.append)
    cache.encode([], [], [corpus.id_at(0)], [corpus.text(0)], layers=[0])
    reopened = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "a"}, log=said.append)
    assert reopened.filled()["passage"] == 1 and said == []
    rebuilt = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "b"}, log=said.append)
    assert rebuilt.filled()["passage"] == 0 and "rebuilding" in said[0]
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["teacher"] == "b" and meta["passages"] == len(corpus) and meta["layers"] == [0, 1, 2]


def test_a_cache_holding_more_layers_serves_fewer_and_one_holding_fewer_is_rebuilt(setup, tmp_path):
    """A response-KD run (last layer) reuses a LEAD run's cache (every layer); the other way round rebuilds."""
    teacher = DualEncoder.from_pretrained(setup["teacher"]).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    ids, texts = [corpus.id_at(i) for i in (0, 3)], [corpus.text(i) for i in (0, 3)]
    full = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "a"}, log=lambda m: None)
    every = full.encode([], [], ids, texts, layers=[0, 1, 2]).passages
    said: list[str] = []
    last = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "a"}, layers=[-1], log=said.append)
    calls = counting(teacher)
    assert said == [] and last.layers == [0, 1, 2]
    assert torch.equal(last.encode([], [], ids, texts, layers=[2]).passages[0], every[2]) and calls == []
    TeacherVectorCache(tmp_path / "d", teacher, corpus, queries, {"teacher": "a"}, layers=[2], log=lambda m: None)
    grown = TeacherVectorCache(tmp_path / "d", teacher, corpus, queries, {"teacher": "a"}, log=said.append)
    assert grown.layers == [0, 1, 2] and "rebuilding" in said[0]


def test_a_cache_filled_from_a_corpus_encoding_serves_what_the_teacher_would_compute(setup, tmp_path):
    """The quickstart fills the cache with mining's corpus vectors (``encode_passages`` of every layer): the
    rows it writes are hits, equal to the teacher's own vectors, and a wrongly shaped array is refused."""
    teacher = DualEncoder.from_pretrained(setup["teacher"], pooling="mean", normalize=True).eval()
    corpus, queries = load_corpus(setup["data"]), load_queries(setup["data"])
    vectors = teacher.encode_passages(corpus.passages(range(len(corpus))), batch_size=7, layers=[0, 1, 2])
    cache = TeacherVectorCache(tmp_path / "c", teacher, corpus, queries, {"teacher": "t"}, log=lambda m: None)
    with pytest.raises(ValueError, match="expected 3 layers"):
        cache.prefill_passages(vectors[:2])
    assert cache.prefill_passages(vectors, chunk=5) == len(corpus) == cache.filled()["passage"]
    calls = counting(teacher)
    rows = [4, 0, 11]
    served = cache.encode([], [], [corpus.id_at(i) for i in rows], corpus.passages(rows), layers=[0, 2]).passages
    assert calls == []
    with torch.no_grad():
        expected = DualEncoder.layer_embeddings(teacher, corpus.passages(rows), "passage", [0, 2])
    assert torch.allclose(served, expected, atol=1e-5)


def test_runs_share_a_cache_folder(setup, tmp_path):
    """teacher.cache_dir: the second run (another variant and seed) never runs the teacher on a text the first
    one cached, and its losses match a run with a cache of its own up to float rounding."""
    shared = tmp_path / "shared-cache"
    run_job(distill_config(setup, tmp_path / "lead", **{"teacher.cache": True, "teacher.cache_dir": str(shared)}),
            log=lambda m: None)
    assert (shared / "rank0" / "meta.json").is_file() and not (tmp_path / "lead" / "teacher-cache").exists()
    config = {"teacher.cache": True, "loss.layer": "none", "seed": 5}
    run_job(distill_config(setup, tmp_path / "own", **config), log=lambda m: None)
    trainer = Trainer(distill_config(setup, tmp_path / "rkd", **config, **{"teacher.cache_dir": str(shared)}),
                      log=lambda m: None, show_progress=False)
    calls = counting(trainer.models["teacher"].model)
    trainer.fit()
    trainer.close()
    assert calls == [] and np.allclose(losses(tmp_path / "own"), losses(tmp_path / "rkd"), atol=1e-4)


def distill_config(setup, output: Path, **overrides):
    values = {"teacher.path": str(setup["teacher"]), "teacher.train": False, "teacher.max_query_length": 16,
              "teacher.max_passage_length": 32, "student.init": "teacher_layers=[0,2]",
              "student.max_query_length": 16, "student.max_passage_length": 32, "data.corpus": str(setup["data"]),
              "data.train_groups": str(setup["groups"]), "data.num_negatives": 4, "optim.steps": 6,
              "optim.batch_size": 4, "optim.lr": 1e-3, "layers.k": 2, "layers.resample_every": 1,
              "checkpoint.every": 3, "eval.split": None, "log_every": 1, "output_dir": str(output)}
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if v is None else v}" for k, v in values.items()], kind="distill")


def losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.parametrize("layer_loss", ["lead", "none"])
def test_training_with_the_cache_matches_training_without_it(setup, tmp_path, layer_loss):
    """12 groups of 4 negatives, batch 4: 6 steps are two epochs that see the same texts (in another order and
    other batches), so the second epoch never runs the teacher."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_job(distill_config(setup, plain, **{"loss.layer": layer_loss}), log=lambda m: None)
    trainer = Trainer(distill_config(setup, cached, **{"teacher.cache": True, "loss.layer": layer_loss}),
                      log=lambda m: None, show_progress=False)
    calls = counting(trainer.models["teacher"].model)
    per_step = []
    original = trainer.train_step

    def step():
        before = len(calls)
        result = original()
        per_step.append(len(calls) - before)
        return result

    trainer.train_step = step
    trainer.fit()
    trainer.close()
    assert np.allclose(losses(plain), losses(cached), atol=1e-4)
    assert all(n > 0 for n in per_step[:3]) and per_step[3:] == [0, 0, 0]
    a, b = load_file(str(plain / "final" / "model.safetensors")), load_file(str(cached / "final" / "model.safetensors"))
    # Cached vectors differ from recomputed ones by float rounding only (another batch's padding); Adam
    # scales the updates of near-zero gradients up to ~lr, so the weights agree to a fraction of one step.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.5 * 1e-3


def test_resume_reuses_the_cache(setup, tmp_path):
    import shutil

    out = tmp_path / "run"
    config = distill_config(setup, out, **{"teacher.cache": True, "checkpoint.keep_last": 2})
    run_job(config, log=lambda m: None)
    assert (out / "teacher-cache" / "rank0" / "meta.json").is_file()
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if the run had died after step 3
    shutil.rmtree(out / "final")
    trainer = Trainer(config, resume=True, log=lambda m: None, show_progress=False)
    assert trainer.step == 3 and trainer.objective.teacher_cache.filled()["passage"] > 0
    calls = counting(trainer.models["teacher"].model)
    trainer.fit()
    trainer.close()
    assert calls == []  # every text of the second epoch was cached by the first run


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.train": True}, "only a frozen teacher"),
    ({"loss.layer": "hidden_mse"}, "token states"),
    ({"teacher.cache": False, "teacher.train": False, "teacher.cache_dir": "c"}, "set teacher.cache: true"),
])
def test_cache_settings_that_cannot_work_are_refused(setup, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        distill_config(setup, tmp_path / "x", **{"teacher.cache": True, **overrides})


def test_a_teacher_without_vectors_per_text_cannot_be_cached(setup, tmp_path):
    """A cross-encoder reads each query-passage pair jointly: the trainer refuses its cache in one line."""
    config = distill_config(setup, tmp_path / "x", **{"teacher.cache": True, "teacher.kind": "cross_encoder"})
    with pytest.raises(ConfigError, match="teacher.cache stores per-text vectors; a cross_encoder teacher"):
        Trainer(config, log=lambda m: None)
