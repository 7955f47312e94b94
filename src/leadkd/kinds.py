"""The one registry of model kinds: each name, where its class lives, and the model options it reads.

Config validation, reopening a saved folder and the trainer all look kinds up here, so a new kind is one
file plus one entry (or :func:`register` from anywhere, e.g. a test). This module imports no torch: the
config checks a kind and its options without loading any model code; ``model_class`` imports a kind's
module on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .runtime.errors import LeadkdError


@dataclass(frozen=True)
class Kind:
    """Where a kind's class lives (``"module:Class"``, imported on first use, or the class itself), and the
    :class:`~leadkd.config.ModelConfig` options that only this kind reads (set on another kind they are
    errors rather than ignored)."""

    target: str | type
    options: tuple[str, ...] = ()


MODEL_KINDS: dict[str, Kind] = {
    "dual_encoder": Kind("leadkd.models.dual_encoder:DualEncoder", ("pooling", "normalize", "similarity_scale")),
    "colbert": Kind("leadkd.models.colbert:ColBERT", ("colbert_dim",)),
    "cross_encoder": Kind("leadkd.models.cross_encoder:CrossEncoder", ("token_type_ids", "cross_encoder_head")),
}

#: The kind of a plain Hugging Face / sentence-transformers folder, of a config that names none, and of a
#: student built from a teacher's blocks by a settings object that names none.
DEFAULT_KIND = "dual_encoder"

#: What the trainer asks of every model class (see :class:`~leadkd.models.base.Retriever`; ``num_layers``
#: and ``backbone`` are per instance, so a class cannot be checked for them).
PROTOCOL = ("kind", "scores_whole_batch", "from_config", "from_pretrained", "encode_batch", "save_pretrained",
            "settings")


def register(cls: type[Any], options: tuple[str, ...] = ()) -> type[Any]:
    """Make ``cls`` the model of kind ``cls.kind`` everywhere; ``options``: the ModelConfig fields only it
    reads. Nothing else needs to change for a new kind to train as teacher or student."""
    missing = [name for name in PROTOCOL if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"{cls.__name__} is not a leadkd model kind: it lacks {', '.join(missing)}")
    MODEL_KINDS[cls.kind] = Kind(cls, tuple(options))
    return cls


def known(kind: str) -> None:
    """A one-line error for a kind nobody registered."""
    if kind not in MODEL_KINDS:
        raise LeadkdError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(MODEL_KINDS))}")


def model_class(kind: str) -> type[Any]:
    """The class registered for ``kind``, imported on first use."""
    known(kind)
    target = MODEL_KINDS[kind].target
    if isinstance(target, str):
        module_name, class_name = target.split(":")
        target = getattr(importlib.import_module(module_name), class_name)
    return target


def owners(option: str) -> list[str]:
    """The kinds that read a kind-specific ModelConfig option (empty for an option every kind reads)."""
    return [name for name, kind in MODEL_KINDS.items() if option in kind.options]
