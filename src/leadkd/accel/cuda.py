"""GPU inference: the tokenizer works one chunk ahead of the GPU instead of between its batches.

Why: a fast tokenizer needs about as long for a batch of 256-token passages as an H200 needs to run
BERT-base over it (a few milliseconds each), so tokenising in line with the model leaves the GPU idle
for about half of every encode; sentence-transformers' ``encode`` does so, batch by batch. Here a thread
tokenises chunk ``i + 1`` (the Rust tokenizer releases the GIL) while the model runs chunk ``i``, and a
GPU batch holds up to :data:`GPU_BATCH_TOKENS` padded tokens. Nothing here changes what the model
computes: outputs equal the model's own ``encode`` exactly (tests/test_accel_cuda.py). The measured
effect is in docs/benchmarks.md (benchmarks/gpu/speed.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

#: Padded tokens per GPU batch: 128 passages of 256 tokens, ~6 TFLOP for BERT-base, about 10 ms on an
#: H200, long enough that kernel launches and the per-batch copy back are lost in it.
GPU_BATCH_TOKENS = 32768

#: Texts per chunk: small enough that the first chunk (tokenised before the GPU can start) is a small
#: part of a corpus, large enough that each chunk fills many batches.
GPU_CHUNK = 2048


def encode(model, texts: Sequence[str], side: str = "passage", *, tokenize_ahead: bool = True,
           **kwargs: Any) -> np.ndarray:
    """``model.encode(texts, side, **kwargs)`` with the chunk tokenised ahead on a thread, batches of at
    most :data:`GPU_BATCH_TOKENS` padded tokens and chunks of :data:`GPU_CHUNK` texts (each overridable)."""
    kwargs.setdefault("max_batch_tokens", GPU_BATCH_TOKENS)
    kwargs.setdefault("chunk_size", GPU_CHUNK)
    if tokenize_ahead:
        kwargs.setdefault("tokenize_chunks", map_ahead)
    return model.encode(texts, side, **kwargs)


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
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, who re-raises it
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
