"""Speed-ups kept out of the models: each is applied explicitly by whoever runs a model.

``cpu``: fused ``dense -> GELU`` / ``dense -> + residual`` inference and batches side by side on worker
threads; ``cpu_dropout``: cheaper dropout masks for training on CPU; ``cuda``: tokenisation one chunk
ahead of the GPU and larger GPU batches. The models stay plain ``nn.Module``s; these change speed, never
the maths beyond float rounding. :func:`encode` picks the one for the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def encode(model, texts: Sequence[str], side: str = "passage", **kwargs: Any) -> np.ndarray:
    """``model.encode(texts, side, **kwargs)`` with the speed-ups of the device the model is on: CPU
    (:func:`cpu.encode`), CUDA (:func:`cuda.encode`), else the model's own ``encode``."""
    from . import cpu, cuda

    kind = getattr(getattr(model, "device", None), "type", None)
    if kind == "cuda" and callable(getattr(model, "encode", None)):
        return cuda.encode(model, texts, side, **kwargs)
    return cpu.encode(model, texts, side, **kwargs)  # the model's own encode when it is not on the CPU


def encode_queries(model, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
    return encode(model, texts, "query", **kwargs)


def encode_passages(model, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
    return encode(model, texts, "passage", **kwargs)
