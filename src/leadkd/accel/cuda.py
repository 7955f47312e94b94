"""GPU inference: the tokenizer works one chunk ahead of the GPU, with its thread pool on, instead of
between the GPU's batches.

Why: on a GPU host the tokenizer, not the GPU, is the likely limit. Counted: a 256-token BERT-base
passage is 45.9 GFLOP, 0.06 ms of an H200 at its 790 TFLOP/s; measured on this project's 2-core machine,
tokenising SciFact passages costs 0.54 ms each with one thread and 0.32 ms with two (the Rust part scales
with cores, the Python conversion after it, ~0.1 ms, does not). sentence-transformers' ``encode``
tokenises in line, batch by batch, so the GPU waits for every batch's tokens. Here a thread tokenises
chunk ``i + 1`` (the Rust tokenizer releases the GIL) with the tokenizer's thread pool on while the
model runs chunk ``i``, so the slower of the two sets the pace, not their sum; a GPU batch holds up to
:data:`GPU_BATCH_TOKENS` padded tokens. Nothing here changes what the model computes: outputs equal the
model's own ``encode`` (tests/test_accel_cuda.py). Measured on a GPU by benchmarks/gpu/speed.py
(docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

#: Padded tokens per GPU batch: 128 passages of 256 tokens, ~6 TFLOP for BERT-base, about 10 ms on an
#: H200, long enough that kernel launches and the per-batch copy back are lost in it.
GPU_BATCH_TOKENS = 32768

#: Texts per chunk: small enough that the first chunk (tokenised before the GPU can start) is a small
#: part of a corpus, large enough that each chunk fills many batches.
GPU_CHUNK = 2048


def encode(model, texts: Sequence[str], side: str = "passage", *, tokenize_ahead: bool = True,
           **kwargs: Any) -> np.ndarray:
    """``model.encode(texts, side, **kwargs)`` with the chunk tokenised ahead on a thread by the Rust
    tokenizer's own thread pool (:func:`parallel_tokenizers`), batches of at most :data:`GPU_BATCH_TOKENS`
    padded tokens and chunks of :data:`GPU_CHUNK` texts (each overridable)."""
    kwargs.setdefault("max_batch_tokens", GPU_BATCH_TOKENS)
    kwargs.setdefault("chunk_size", GPU_CHUNK)
    if not tokenize_ahead:
        return model.encode(texts, side, **kwargs)
    kwargs.setdefault("tokenize_chunks", map_ahead)
    with parallel_tokenizers():
        return model.encode(texts, side, **kwargs)


@contextlib.contextmanager
def parallel_tokenizers(enabled: bool = True) -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM`` set to ``enabled`` inside the block (:func:`use_parallel_tokenizers`),
    as it was after it."""
    before = os.environ.get(TOKENIZERS_PARALLELISM)
    use_parallel_tokenizers(enabled)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TOKENIZERS_PARALLELISM, None)
        else:
            os.environ[TOKENIZERS_PARALLELISM] = before


def use_parallel_tokenizers(enabled: bool = True) -> None:
    """Turn the Rust tokenizer's thread pool on (or off) for this process, on this process's share of
    the host's cores (``RAYON_NUM_THREADS``: the cores over torchrun's ``LOCAL_WORLD_SIZE``, unless set).

    Why: the CLI turns the pool off (on a CPU host the cores belong to torch), but on a GPU host they sit
    idle while the GPU works, and serial tokenisation alone would cap an H200 far below its matrix rate
    (the module's docstring counts it). The tokenizer reads the variable at every call, so this takes
    effect at once; the pool's size is read when the pool starts, at the first parallel call.
    """
    if enabled:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    os.environ[TOKENIZERS_PARALLELISM] = "true" if enabled else "false"


TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"


@contextlib.contextmanager
def compiled(model, **options: Any) -> Iterator[Any]:
    """``model`` with its backbone swapped for ``torch.compile(backbone, dynamic=True, **options)`` until
    the block ends (then the original module is back, with its own state-dict keys).

    Why: by a count of FLOPs and bytes for BERT-base at 256 tokens on an H200 (an estimate, not a
    measurement), the matrix products need ~20 ns per token and layer and the element-wise kernels between
    them (layer norms, GELU, residual adds), each a round trip through device memory, ~12 ns more;
    Inductor fuses those. ``dynamic=True`` because every batch has its own length, so one
    compilation serves them all. Compiling costs tens of seconds, so it pays on large corpora only;
    benchmarks/gpu/speed.py measures it apart from the default path (experimental: not used by the CLI).
    """
    original = model.backbone
    model.backbone = torch.compile(original, dynamic=True, **options)
    try:
        yield model
    finally:
        model.backbone = original


_DONE = object()


def map_ahead(fn: Callable[[Any], Any], items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """``map(fn, items)``, with up to ``depth`` results computed ahead on one worker thread.

    Results come in order; an exception raised by ``fn`` (or by ``items``) is raised here, at the item it
    belongs to; a consumer that stops early (``break``, an exception) stops the worker after the item in
    hand, so no thread outlives the call that started it.
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((fn(item), None)):
                    return
        except BaseException as error:
            put((None, error))
            return
        put((_DONE, None))

    worker = threading.Thread(target=work, name="leadkd-tokenize-ahead", daemon=True)
    worker.start()
    try:
        while True:
            value, error = results.get()
            if error is not None:
                raise error
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        worker.join()
