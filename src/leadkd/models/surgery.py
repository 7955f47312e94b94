"""Make a shallow student from a deep teacher by keeping a subset of its transformer blocks.

This is how DistilBERT and PROD initialise students (e.g. blocks 0, 2, 4 of a 6-layer model give a
3-layer student): the student starts close to the teacher, so distillation converges in few steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch

from ..runtime.errors import ConfigError

#: Any module type: :func:`keep_layers` returns a copy of the model it is given, of the same class.
_M = TypeVar("_M", bound=torch.nn.Module)

# Where the list of blocks lives, by architecture family.
_BLOCK_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h")


def _find_blocks(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    for dotted in _BLOCK_LISTS:
        parent, _, attr = dotted.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        blocks = getattr(owner, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return owner, attr, blocks
    raise ConfigError(f"cannot find the transformer blocks of a {type(model).__name__} to keep a subset of them")


def check_layers(layers: Sequence[int], depth: int) -> None:
    """Layers must be distinct, increasing and inside the model."""
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"layers {list(layers)} must be distinct and increasing")
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise ConfigError(f"layers {bad} are out of range for a model of {depth} layers (0..{depth - 1})")


def keep_layers(model: _M, layers: Sequence[int]) -> _M:
    """A copy of ``model`` with only the given blocks (in order); embeddings and the rest are shared copies."""
    _, _, blocks = _find_blocks(model)
    check_layers(layers, len(blocks))
    student = copy.deepcopy(model)
    owner, attr, student_blocks = _find_blocks(student)
    kept = torch.nn.ModuleList([student_blocks[i] for i in layers])
    for new_index, block in enumerate(kept):
        attention = getattr(block, "attention", None)
        inner = getattr(attention, "self", attention)
        if inner is not None and hasattr(inner, "layer_idx"):
            inner.layer_idx = new_index  # cache bookkeeping in recent transformers
    setattr(owner, attr, kept)
    config = student.config
    for name in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, len(layers))
            break
    return student
