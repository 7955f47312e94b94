"""A run's results as one typed object: what the quickstart writes as ``results.json`` and the report reads.

The writer says what its models and stages are (name, role, order, which stage made which model); the
report renders what it is given and knows no stage or model names. The file is written atomically and read
back strictly: every problem is one line naming the file and the field, e.g.
``run/results.json: field 'models[2].metrics.test.MRR@10': expected a number or null, got 'n/a'``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, Union

from ..runtime.errors import InputError
from ..runtime.fileio import atomic_write

__all__ = ["SCHEMA", "RESULTS_NAME", "MODEL_ROLES", "STAGE_ROLES", "Model", "Stage", "PairedComparison",
           "RunResults", "finite_number", "read_json_object", "read_results", "write_results"]

#: Names the format; a file without it (or with another) was written by another version of leadkd.
SCHEMA = "leadkd-results/1"
RESULTS_NAME = "results.json"
#: What a model is in the LEAD recipe: the report quotes the teacher and measures LEAD against its start.
MODEL_ROLES = ("teacher", "student", "lead", "response_kd")
#: What a training stage is for: the report states what a warm-up changed.
STAGE_ROLES = ("warmup", "distill", "train")


@dataclass(frozen=True)
class Model:
    """One evaluated model. ``label`` is how sentences name it ("the warmed-up student"); ``metrics`` maps
    a split name to measure -> value (None: not computed); ``layers`` maps a measure to the value of each
    layer 0..L-1 on the test split, each layer's pooled vectors used as a retriever."""

    name: str
    role: str
    label: str
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    layers: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A training stage; its log is ``folder/metrics.jsonl`` (relative to the run folder). It starts from
    the model ``start`` and makes ``produces``: stages that start from the same model ran side by side."""

    name: str
    role: str
    folder: str
    steps: int
    start: str | None = None
    produces: str | None = None


@dataclass(frozen=True)
class PairedComparison:
    """``model`` minus ``reference`` over the queries of ``split`` both were scored on: the difference of
    the means of ``measure`` and the two-sided paired randomization p-value. ``per_query`` keeps each
    model's scores by query id, so the test can be checked or redone."""

    model: str
    reference: str
    split: str
    measure: str
    delta: float
    queries: int
    p: float
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResults:
    """Everything a run's report shows besides its training logs; ``splits`` maps a role (train, dev,
    test) to a split name, ``settings`` is free-form, ``timings`` is wall seconds by step of the run."""

    dataset: str
    splits: dict[str, str | None]
    measures: tuple[str, ...]
    models: tuple[Model, ...]
    stages: tuple[Stage, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    lead_vs_response_kd: PairedComparison | None = None

    @property
    def test_split(self) -> str | None:
        return self.splits.get("test")

    @property
    def evaluated(self) -> bool:
        """Every model has its test metrics (a run writes its models first, and scores them last)."""
        split = self.test_split
        return all(split is not None and model.metrics.get(split) for model in self.models)

    def model(self, name: str | None) -> Model | None:
        return next((model for model in self.models if model.name == name), None)

    def with_role(self, role: str) -> Model | None:
        """The first model of ``role``."""
        return next((model for model in self.models if model.role == role), None)

    def stage_producing(self, name: str) -> Stage | None:
        return next((stage for stage in self.stages if stage.produces == name), None)

    def start_of(self, name: str) -> Model | None:
        """The model that the stage making ``name`` started from (LEAD's warm start), if it was evaluated."""
        stage = self.stage_producing(name)
        return self.model(stage.start) if stage else None

    def to_dict(self) -> dict[str, Any]:
        """JSON values (lists, not tuples), ``schema`` first: what :meth:`from_dict` reads back."""
        return {"schema": SCHEMA, **_as_json(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike = RESULTS_NAME) -> RunResults:
        """The results in ``data`` (as read from JSON), checked field by field; :class:`InputError` names
        ``source`` and the first bad field."""
        try:
            if not isinstance(data, dict):
                raise _FieldError("", f"expected a JSON object, got {_describe(data)}")
            if data.get("schema") != SCHEMA:
                found = "missing" if "schema" not in data else f"{data['schema']!r}"
                raise _FieldError("schema", f"expected {SCHEMA!r}, got {found}: written by another version of "
                                            "leadkd; delete it and rerun what wrote it (the quickstart scores "
                                            "its trained models again)")
            results = _decode({k: v for k, v in data.items() if k != "schema"}, cls, "")
            _check(results)
        except _FieldError as error:
            raise InputError(source, error.message, field=error.field or None) from None
        return results


def read_json_object(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """The JSON object in ``path``; :class:`InputError` (file, line) when it is missing, not JSON or not an
    object. ``what`` names the expected content in that last message."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON ({error.msg})", line=error.lineno) from None
    if not isinstance(data, dict):
        raise InputError(path, f"expected {what}, got {_describe(data)}")
    return data


def read_results(path: str | os.PathLike) -> RunResults:
    """A ``results.json`` read back and validated (see :meth:`RunResults.from_dict`)."""
    return RunResults.from_dict(read_json_object(path), source=path)


def write_results(path: str | os.PathLike, results: RunResults) -> Path:
    """Write ``results`` atomically (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    with atomic_write(path) as handle:
        json.dump(results.to_dict(), handle, indent=2, allow_nan=False)
        handle.write("\n")
    return path


# --------------------------------------------------------------------------- decoding and checks

def finite_number(value: Any) -> TypeGuard[float]:
    """A JSON value that is a finite number (a bool is not one, though Python says it is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _FieldError(Exception):
    def __init__(self, field_: str, message: str):
        super().__init__(message)
        self.field, self.message = field_, message


def _as_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    return value


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else repr(value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _decode(value: Any, hint: Any, where: str, nullable: bool = False) -> Any:
    """``value`` (from JSON) as type ``hint``: a dataclass, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
    ``dict[str, X]``, str, int, float (finite) or Any. ``nullable``: the message says null would do."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _decode(value, inner, where, nullable=True)
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(value, typing.cast(type, hint), where)  # a hint is a class, not an instance
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _FieldError(where, f"expected a list, got {_describe(value)}")
        items = [_decode(item, args[0], f"{where}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _FieldError(where, f"expected an object, got {_describe(value)}")
        return {key: _decode(item, args[1], _join(where, key)) for key, item in value.items()}
    if hint is float and finite_number(value):
        return float(value)
    if hint is int and finite_number(value) and float(value).is_integer():
        return int(value)
    if hint is str and isinstance(value, str):
        return value
    expected = {float: "a number", int: "an integer", str: "a string"}[hint]
    raise _FieldError(where, f"expected {expected}{' or null' if nullable else ''}, got {_describe(value)}")


def _decode_dataclass(value: Any, cls: type, where: str) -> Any:
    if not isinstance(value, dict):
        raise _FieldError(where, f"expected an object, got {_describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in value if key not in fields]
    if unknown:
        raise _FieldError(_join(where, unknown[0]), f"unknown field; expected one of {', '.join(fields)}")
    for name, spec in fields.items():
        if name not in value and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise _FieldError(_join(where, name), "missing")
    hints = _hints(cls)
    return cls(**{name: _decode(item, hints[name], _join(where, name)) for name, item in value.items()})


def _check(results: RunResults) -> None:
    """What types alone do not say: unique names, known roles, and references that name a model."""
    names = [model.name for model in results.models]
    measures = set(results.measures)
    splits = {split for split in results.splits.values() if split}
    if not results.test_split:
        raise _FieldError("splits.test", "missing: the split the models' test metrics are on")
    for index, model in enumerate(results.models):
        where = f"models[{index}]"
        if names.index(model.name) != index:
            raise _FieldError(f"{where}.name", f"{model.name!r} is used twice")
        _one_of(model.role, MODEL_ROLES, f"{where}.role")
        for split, values in model.metrics.items():
            _one_of(split, sorted(splits), f"{where}.metrics.{split}", "a split of 'splits'")
            for measure in values:
                _one_of(measure, results.measures, f"{where}.metrics.{split}.{measure}", "a measure of 'measures'")
        for measure in model.layers:
            _one_of(measure, sorted(measures), f"{where}.layers.{measure}", "a measure of 'measures'")
    stage_names = [stage.name for stage in results.stages]
    for index, stage in enumerate(results.stages):
        where = f"stages[{index}]"
        if stage_names.index(stage.name) != index:
            raise _FieldError(f"{where}.name", f"{stage.name!r} is used twice")
        _one_of(stage.role, STAGE_ROLES, f"{where}.role")
        for key in ("start", "produces"):
            if getattr(stage, key) is not None:
                _one_of(getattr(stage, key), names, f"{where}.{key}", "a model of 'models'")
    paired = results.lead_vs_response_kd
    if paired is not None:
        for key in ("model", "reference"):
            _one_of(getattr(paired, key), names, f"lead_vs_response_kd.{key}", "a model of 'models'")
        for name in paired.per_query:
            _one_of(name, [paired.model, paired.reference], f"lead_vs_response_kd.per_query.{name}",
                    "the model or the reference")


def _one_of(value: str, choices: typing.Sequence[str], where: str, what: str = "") -> None:
    if value not in choices:
        listed = ", ".join(choices) or "none"
        raise _FieldError(where, f"{value!r} is not {what or 'a known value'} (choose from {listed})")
