"""The job configurations: what a run is told, read from YAML / JSON and ``key=value`` overrides.

``jobs`` holds the train and distill config models; ``values`` the option types and pydantic's report as
one line; ``files`` reading and writing config files; ``changes`` what differs between two configs (the
resume guard, compare's ledger); ``layer_strategy`` the names of the layer-pair strategies. None of them
imports torch (an import-linter contract in pyproject.toml checks it), so a config is validated before
any model code loads.

The names below load on first use (PEP 562): ``distill.layers`` and the sentence-transformers integration
read ``config.layer_strategy`` alone, and importing the package for it must not load the job models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .changes import changed_settings, todays_spelling
    from .files import read_config_file
    from .jobs import (
        JOB_KINDS,
        MODEL_KINDS,
        CheckpointConfig,
        Config,
        DataConfig,
        DistillConfig,
        EvalConfig,
        LayerConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        StudentConfig,
        TeacherConfig,
        TrainConfig,
        TrainLossConfig,
        config_from_dict,
        config_to_dict,
        load_config,
        parse_student_init,
        save_config,
        teacher_config,
        validate_config,
    )
    from .layer_strategy import parse_layer_map

__all__ = [
    "ModelConfig", "TeacherConfig", "StudentConfig", "DataConfig", "TrainLossConfig", "LossConfig",
    "LayerConfig", "OptimConfig", "CheckpointConfig", "EvalConfig", "TrainConfig", "DistillConfig",
    "Config", "JOB_KINDS", "MODEL_KINDS", "load_config", "config_from_dict", "config_to_dict", "save_config",
    "validate_config", "changed_settings", "todays_spelling", "parse_student_init", "parse_layer_map",
    "read_config_file", "teacher_config",
]

#: Where each name lives; the job models' module unless said.
_HOME = dict.fromkeys(__all__, "jobs") | {"changed_settings": "changes", "todays_spelling": "changes",
                                          "read_config_file": "files", "parse_layer_map": "layer_strategy"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value
