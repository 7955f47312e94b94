"""leadkd.accel.cuda's tokenisation ahead of the model: the same vectors as the model's own encode, in
order, errors raised where they belong and no thread left behind. The logic is device-free, so it is
tested here on the CPU; tests/test_gpu.py runs it on CUDA."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from leadkd import accel
from leadkd.accel import cuda
from leadkd.runtime.errors import LeadkdError
from test_dual_encoder import PASSAGES


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "leadkd-tokenize-ahead"}


def test_map_ahead_is_map_in_order_and_runs_ahead_on_one_thread():
    seen: list[int] = []

    def slow_square(x: int) -> int:
        seen.append(x)
        time.sleep(0.002)
        return x * x

    out = []
    for value in cuda.map_ahead(slow_square, iter(range(20)), depth=2):
        out.append(value)
        if len(out) == 3:
            time.sleep(0.05)  # the consumer is busy: the worker fills the queue meanwhile
            assert len(seen) >= 3 + 2  # ran ahead by up to `depth` (plus the item in hand)
            assert len(seen) <= 3 + 2 + 1
    assert out == [x * x for x in range(20)]
    assert not _threads()


def test_map_ahead_raises_the_workers_error_at_its_item_and_stops_on_an_early_break():
    def fail_at_five(x: int) -> int:
        if x == 5:
            raise ValueError("chunk 5 is bad")
        return x

    got = []
    with pytest.raises(ValueError, match="chunk 5 is bad"):
        for value in cuda.map_ahead(fail_at_five, iter(range(10))):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
    calls = []
    generator = cuda.map_ahead(lambda x: calls.append(x) or x, iter(range(10_000)))
    for value in generator:
        if value == 2:
            break
    generator.close()  # what leaving a for loop does to a generator that is no longer referenced
    assert not _threads() and len(calls) < 10  # the worker stopped soon after, it did not run to the end


@pytest.mark.parametrize("layers", [None, [0, 1]])
def test_tokenizing_ahead_in_small_chunks_gives_the_models_own_vectors(models, layers):
    de = models[("mean", True)]
    texts = [" ".join(PASSAGES[i % len(PASSAGES)].split()[: 1 + i % 11]) for i in range(37)]
    plain = de.encode(texts, batch_size=4, layers=layers)
    chunks = []

    def counting_map(fn, items):
        for item in items:
            chunks.append(len(item))
            yield fn(item)

    ahead = cuda.encode(de, texts, batch_size=4, layers=layers, chunk_size=5)
    counted = de.encode(texts, batch_size=4, layers=layers, chunk_size=5, tokenize_chunks=counting_map)
    assert chunks == [5] * 7 + [2]  # 37 texts in chunks of 5: each tokenised once, in order
    np.testing.assert_array_equal(counted, ahead)
    np.testing.assert_allclose(ahead, plain, atol=1e-6)  # chunks pad to their own longest text, nothing else
    assert not _threads()


def test_a_tokenizer_error_reaches_the_caller(models, monkeypatch):
    de = models[("cls", False)]

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer broke")

    monkeypatch.setattr(de, "tokenizer", broken)
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        cuda.encode(de, PASSAGES, chunk_size=2)
    assert not _threads()
    with pytest.raises(LeadkdError, match="chunk_size"):
        de.encode(PASSAGES, chunk_size=0)


def test_the_dispatcher_sends_a_cuda_model_to_the_cuda_path_and_others_to_the_cpu_one(models, monkeypatch):
    de = models[("cls", False)]
    called = []
    monkeypatch.setattr(cuda, "encode", lambda model, texts, side, **kw: called.append(("cuda", side, kw)))
    from leadkd.accel import cpu
    monkeypatch.setattr(cpu, "encode", lambda model, texts, side, **kw: called.append(("cpu", side, kw)))
    accel.encode_passages(de, PASSAGES, batch_size=3)
    monkeypatch.setattr(type(de), "device", property(lambda self: __import__("torch").device("cuda", 0)))
    accel.encode_queries(de, PASSAGES, batch_size=3)
    assert called == [("cpu", "passage", {"batch_size": 3}), ("cuda", "query", {"batch_size": 3})]


@pytest.mark.slow
def test_a_compiled_backbone_gives_the_same_vectors_and_is_swapped_back(models):
    """torch.compile needs a C++ compiler on the CPU (~30 s on two cores): slow."""
    de = models[("mean", True)]
    texts = [" ".join(PASSAGES[i % len(PASSAGES)].split()[: 1 + i % 13]) for i in range(30)]
    plain = de.encode(texts, batch_size=4)
    keys = list(de.state_dict())
    original = de.backbone
    with cuda.compiled(de) as model:
        assert model is de and de.backbone is not original
        np.testing.assert_allclose(cuda.encode(de, texts, batch_size=4, chunk_size=8), plain, atol=1e-5)
    assert de.backbone is original and list(de.state_dict()) == keys


def test_parallel_tokenizers_sets_the_variable_inside_and_restores_it(monkeypatch):
    import os

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this host: half the cores each
    with cuda.parallel_tokenizers():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert os.environ["RAYON_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with pytest.raises(RuntimeError, match="inside"):
        with cuda.parallel_tokenizers():
            raise RuntimeError("inside")
    assert "TOKENIZERS_PARALLELISM" not in os.environ
