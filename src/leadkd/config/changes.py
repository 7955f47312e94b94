"""What differs between two configs: the resume guard's question, and ``leadkd compare``'s about its ledger.

A resumed run must be the run it continues, so every setting that changes what is computed is compared
(paths after resolving them); the settings of :data:`RESUMABLE_CHANGES` decide only what is evaluated,
logged and kept, or how, not what, is computed, and may change. A ledger row stored with an old spelling
of a setting compares equal to today's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .jobs import Config, LayerConfig

__all__ = ["RESUMABLE_CHANGES", "changed_settings", "todays_spelling"]


def todays_spelling(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config mapping (a ledger row's) with its layer strategy in today's spelling, so that an old
    ``strategy: "0:1,2:5"`` compares equal to ``strategy: map`` with those pairs. Left as it is if unreadable."""
    try:
        layers = LayerConfig.model_validate(data["layers"])
    except (KeyError, ValidationError):
        return dict(data)
    return {**data, "layers": layers.model_dump(mode="json")}


#: Settings a resumed run may change: they decide what is evaluated, logged and kept, or how (not what)
#: is computed: skipping non-finite batches after a NaN stop, trading compute for memory, the teacher cache.
RESUMABLE_CHANGES = ("eval.", "log_every", "ddp_timeout", "checkpoint.keep_last", "checkpoint.every",
                     "output_dir", "optim.skip_non_finite", "optim.cpu_dropout", "optim.gradient_checkpointing",
                     "teacher.cache", "data.workers")
#: Settings that name files: compared after resolving, so ./data and /abs/data are the same.
_PATH_SETTINGS = ("data.corpus", "data.train_groups", "model.path", "teacher.path", "student.path")


def changed_settings(before: Config, after: Config) -> list[str]:
    """Dotted keys whose values differ between two configs of the same kind, as ``key: old -> new``."""
    def flat(config: BaseModel, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in type(config).model_fields:
            value = getattr(config, name)
            out.update(flat(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else {prefix + name: value})
        return out

    def same(key: str, a: Any, b: Any) -> bool:
        if a == b:
            return True
        if key in _PATH_SETTINGS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a):
            return os.path.realpath(a) == os.path.realpath(b)
        return False

    old, new = flat(before), flat(after)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if not same(key, old.get(key), new.get(key)) and not key.startswith(RESUMABLE_CHANGES)]
