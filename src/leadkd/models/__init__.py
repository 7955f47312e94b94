"""Retriever models: every kind answers ``layer_scores(queries, candidates) -> [layers, Q, C]``.

``ColBERT`` and ``CrossEncoder`` are imported on first access, so ``import leadkd.models`` needs only the
dual encoder's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Retriever
from .dual_encoder import DualEncoder, pair_scores
from .loading import load_model

_LAZY = {"ColBERT": "leadkd.models.colbert", "CrossEncoder": "leadkd.models.cross_encoder"}

__all__ = ["ColBERT", "CrossEncoder", "DualEncoder", "Retriever", "load_model", "pair_scores"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
