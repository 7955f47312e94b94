"""The value types of leadkd's config options, and what their failures say: one line per problem.

Options are typed with pydantic, but its report of a bad value is a multi-line list of every error, in its
own words. A user gets one line instead, naming the dotted key, as ``optim.lr: expected a number, got
'abc'`` or ``optim.lr: must be > 0, got 0``, with the nearest real key for a misspelt one. The types here
make the failures worded that way: numeric text read as a number (YAML 1.1 leaves ``2e-5`` text), no
booleans as numbers, choices in any case, ranges that say their rule, and the options written in a small
language of their own (``student.init``, ``eval.metric``) checked as they are read.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeGuard, Union

import ir_measures
from pydantic import AfterValidator, BaseModel, BeforeValidator, FiniteFloat, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["Number", "Integer", "PositiveNumber", "NonNegativeNumber", "PositiveInt", "NonNegativeInt", "choice",
           "within", "StudentInit", "SplitName", "MeasureName", "parse_student_init", "check_failed", "Problem",
           "problem_of", "describe"]


def _number(value: Any) -> Any:
    """Numeric text as a number (YAML 1.1 reads ``2e-5`` and ``1e4`` as text); a boolean is no number."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "a boolean is not a number")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def within(test: Callable[[Any], bool], rule: str) -> AfterValidator:
    """A range check that fails as ``must be <rule>, got <value>``."""
    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"must be {rule}, got {value}")
        return value
    return AfterValidator(check)


def choice(*names: str) -> Any:
    """One of ``names``, written in any case (``KL``, ``ColBERT``) and kept lower-case."""
    def canonical(value: Any) -> Any:
        text = value.strip().lower() if isinstance(value, str) else None
        return text if text in names else value
    return Annotated[Literal[names], BeforeValidator(canonical)]


Number = Annotated[FiniteFloat, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_number)]
PositiveNumber = Annotated[Number, within(lambda value: value > 0, "> 0")]
NonNegativeNumber = Annotated[Number, within(lambda value: value >= 0, ">= 0")]
PositiveInt = Annotated[Integer, within(lambda value: value > 0, "> 0")]
NonNegativeInt = Annotated[Integer, within(lambda value: value >= 0, ">= 0")]

_INIT = re.compile(r"^\s*teacher_layers\s*=\s*\[([^\]]*)\]\s*$")


def parse_student_init(text: str) -> tuple[int, ...]:
    """``"teacher_layers=[0,2,4]"`` -> ``(0, 2, 4)``: distinct, increasing, non-negative block indices.

    Whether the indices exist is checked against the teacher's depth when it is loaded.
    """
    match = _INIT.match(text)
    if match is None:
        raise ValueError(f"expected teacher_layers=[i,j,...] (e.g. teacher_layers=[0,2,4]), got {text!r}")
    items = [item.strip() for item in match.group(1).split(",")]
    if items == [""]:
        raise ValueError(f"no teacher layers in {text!r}")
    if not all(re.fullmatch(r"\d+", item) for item in items):
        raise ValueError(f"teacher layers must be non-negative integers, got {text!r}")
    layers = tuple(int(item) for item in items)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"teacher layers must be distinct and increasing, got {list(layers)}")
    return layers


def _canonical_init(text: str) -> str:
    return "teacher_layers=[" + ",".join(str(layer) for layer in parse_student_init(text)) + "]"


def _qrels_split(split: str) -> str:
    if not split.strip():
        raise ValueError("must name a qrels split (e.g. dev), or be null to skip evaluation")
    return split


def _measure_name(metric: str) -> str:
    """An ir-measures name, so that a typo fails now rather than after the first evaluation."""
    try:
        ir_measures.parse_measure(metric)
    except Exception as exc:  # ir-measures raises NameError/ValueError/TypeError for bad names
        raise ValueError(f"not an ir-measures measure name like nDCG@10 or RR@10 ({exc})") from None
    return metric


StudentInit = Annotated[str, AfterValidator(_canonical_init)]
SplitName = Annotated[str, AfterValidator(_qrels_split)]
MeasureName = Annotated[str, AfterValidator(_measure_name)]


def check_failed(key: str, message: str) -> PydanticCustomError:
    """A failed check of ``key``, a dotted path below the model whose validator raises this."""
    return PydanticCustomError("config_check", "{message}", {"key": key, "message": message})


class Problem(Exception):
    """A wrong value at a dotted key; the caller adds where the value came from."""

    def __init__(self, dotted: str, message: str):
        super().__init__(f"{dotted}: {message}")
        self.dotted = dotted


#: Which of several errors is reported: unknown keys, then wrong types (1), then failed checks.
_RANK = {"extra_forbidden": 0, "invalid_key": 0, "value_error": 2, "config_check": 2}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def describe(value: Any) -> str:
    """A value as an error message shows it: a whole mapping or list is only named."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    return "a list" if isinstance(value, (list, tuple)) else repr(value)


def _is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _did_you_mean(word: str, options: Sequence[str], cutoff: float) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _schema_keys(cls: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of a job, sections included (``optim``, ``optim.lr``, ...)."""
    keys: list[str] = []
    for name, info in cls.model_fields.items():
        keys.append(prefix + name)
        if _is_section(info.annotation):
            keys.extend(_schema_keys(info.annotation, f"{prefix}{name}."))
    return tuple(keys)


def _suggest(dotted: str, job: type[BaseModel]) -> str:
    """`` (did you mean 'x.y'?)`` for the nearest real key, searching all sections for a misplaced leaf."""
    keys = _schema_keys(job)
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in reversed(keys)}
    near = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.7)
    return _did_you_mean(dotted, keys, 0.7) or (f" (did you mean {by_leaf[near[0]]!r}?)" if near else "")


def _wrong_type(annotation: Any, value: Any) -> str:
    """``expected a number, got 'abc'`` and its variants, worded from the option's declared type."""
    optional = typing.get_origin(annotation) in (Union, types.UnionType)
    if optional:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    expected = ("one of " + ", ".join(choices) if choices else
                "a mapping of options" if _is_section(annotation) else _TYPE_WORDS.get(annotation, "a value"))
    if value is None:
        hint = " (this option cannot be empty)"
    elif optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        expected, hint = f"{expected} or null", " (write null, unquoted, for no value)"
    else:
        hint = _did_you_mean(str(value).lower(), choices, 0.5)
    return f"expected {expected}, got {describe(value)}{hint}"


def problem_of(error: ValidationError, job: type[BaseModel], file_order: Sequence[str] = ()) -> Problem:
    """The one error of pydantic's list to report for a ``job`` model, as one line: by kind of error, then in
    ``file_order`` of the top-level keys (pydantic's own order lists a base class's fields first)."""
    def rank(item: Mapping[str, Any]) -> tuple[int, int]:
        top = item["loc"][0] if item["loc"] else None
        return _RANK.get(item["type"], 1), file_order.index(top) if top in file_order else len(file_order)

    first = min(error.errors(), key=rank)
    loc, kind, context = [str(part) for part in first["loc"]], first["type"], first.get("ctx") or {}
    if kind == "config_check":
        return Problem(".".join(loc + [context["key"]]), context["message"])
    dotted = ".".join(loc)
    if kind in ("extra_forbidden", "invalid_key"):
        where = f"in section {'.'.join(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return Problem(dotted, f"unknown option {where}{_suggest(dotted, job)}")
    if kind == "value_error":
        return Problem(dotted, str(context["error"]))
    # Each step but the last lands on a section's model class; the last on the option's annotation, of any type.
    annotation = functools.reduce(lambda cls, name: cls.model_fields[name].annotation, loc, typing.cast(Any, job))
    return Problem(dotted, _wrong_type(annotation, first.get("input")))
