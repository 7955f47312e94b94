"""Typed configuration of the two training jobs: ``train`` (one model on ground truth) and ``distill`` (LEAD).

The paper's code had one flat argparse namespace of ~100 options, many of them dead. Here every option
lives in a small frozen dataclass, a file (YAML or JSON) sets any subset of them, and ``key.sub=value``
overrides from the command line go on top. Nothing is silently ignored: an unknown key, a value of the
wrong type or out of range stops the run before any model is loaded, with the file, the dotted key and
(for a misspelt key) the nearest real one in the message. The resolved configuration is saved beside
every run, and loading that file gives back an equal object.

Only this module knows the file layout; the trainer reads attributes (``config.optim.lr``). Checks that
need a model (layer indices against a depth) happen where the model is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from .errors import ConfigError
from .fileio import atomic_write

__all__ = [
    "ModelConfig", "TeacherConfig", "StudentConfig", "DataConfig", "TrainLossConfig", "LossConfig",
    "LayerConfig", "OptimConfig", "CheckpointConfig", "EvalConfig", "TrainConfig", "DistillConfig",
    "Config", "JOB_KINDS", "MODEL_KINDS", "LAYER_STRATEGIES", "load_config", "config_from_dict",
    "config_to_dict", "save_config", "validate_config", "parse_student_init", "parse_layer_map", "read_config_file",
]

ModelKind = Literal["dual_encoder", "colbert", "cross_encoder"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)
#: Named layer-selection strategies; anything else must be an explicit ``student:teacher`` map.
LAYER_STRATEGIES: tuple[str, ...] = ("random", "last", "skip", "paper_last", "paper_skip")


# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class ModelConfig:
    """One retriever: where its weights are and how it reads text."""

    path: str | None = None
    kind: ModelKind = "dual_encoder"
    pooling: Literal["cls", "mean"] | None = None
    normalize: bool | None = None
    max_query_length: int | None = None
    max_passage_length: int | None = None
    similarity_scale: float | None = None
    colbert_dim: int | None = None        # colbert: projection width; 0 = none (the paper's); null = folder's, else 128
    token_type_ids: bool | None = None    # cross_encoder: segment ids 0/1; false = all 0 (the paper's)
    trust_remote_code: bool = False
    use_safetensors: bool = True          # false: also accept pickled weights (pytorch_model.bin), tensors only


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The teacher; ``train`` keeps the paper's joint training (its own optimizer, same schedule).

    ``cache`` (frozen dual-encoder teacher only) stores its per-layer vectors of every query and passage
    on disk the first time they are seen, so later epochs cost only the student. ``cache_dir`` puts the
    cache elsewhere than ``output_dir/teacher-cache``, so runs of the same frozen teacher on the same data
    (the variants and seeds of a comparison) encode each text once between them.
    """

    train: bool = True
    cache: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student; ``init`` builds it from a subset of the teacher's blocks instead of ``path``."""

    init: str | None = None

    @property
    def init_teacher_layers(self) -> tuple[int, ...] | None:
        """The teacher blocks the student starts from (``init: teacher_layers=[0,2,4]``), or None."""
        return None if self.init is None else parse_student_init(self.init)


@dataclass(frozen=True)
class DataConfig:
    """Training data. Relative paths are relative to the working directory, not to the config file."""

    corpus: str | None = None
    train_groups: str | None = None
    num_negatives: int = 7
    shuffle_positives: bool = False


@dataclass(frozen=True)
class TrainLossConfig:
    """Ground-truth contrastive loss of a single model (the warm-up stage)."""

    in_batch_negatives: bool = True
    cross_process_negatives: bool = True
    mask_duplicate_positives: bool = True  # false = the paper's code: a positive's copy elsewhere is a negative


@dataclass(frozen=True)
class LossConfig:
    """The LEAD objective (spec §2.5): weights, distribution temperatures and switches."""

    student_ce: float = 1.0
    teacher_ce: float = 1.0
    response: Literal["kl", "margin_mse", "none"] = "kl"
    response_weight: float = 1.0
    temperature: float = 1.0
    layer: Literal["lead", "hidden_mse", "none"] = "lead"
    layer_weight: float = 1.0
    layer_temperature: float = 10.0
    reweight: bool = True
    detach_teacher_targets: bool = False
    in_batch_negatives: bool = True
    cross_process_negatives: bool = True
    mask_duplicate_positives: bool = True  # false = the paper's code: a positive's copy elsewhere is a negative
    colbert_last_layer: Literal["raw", "final"] = "raw"  # ColBERT teacher's last layer in the layer loss


@dataclass(frozen=True)
class LayerConfig:
    """Which teacher layer teaches which student layer, and how often the choice is re-drawn."""

    strategy: str = "random"
    k: int = 5
    resample_every: int | None = 10

    @property
    def pairs(self) -> tuple[tuple[int, int], ...] | None:
        """The ``(student, teacher)`` pairs of an explicit map, or None for a named strategy."""
        if self.strategy.strip().lower() in LAYER_STRATEGIES:
            return None
        return parse_layer_map(self.strategy)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and decay, one optimizer per trained model."""

    lr: float = 2e-5
    teacher_lr: float | None = None
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 2.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False
    #: On CPU, dropout masks from 16 random bits per element and attention dropout outside SDPA
    #: (accel/cpu_dropout.py): the same dropout, a ~15% faster forward and backward.
    cpu_dropout: bool = True
    #: A NaN/inf loss stops the run (0), or up to this many such batches in a row are skipped (no update).
    skip_non_finite: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    """Periodic checkpoints; the last step is always saved."""

    every: int | None = 1000
    keep_last: int | None = 2


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training (of the student, in a distill job)."""

    split: str | None = "dev"
    every: int | None = None
    metric: str = "nDCG@10"
    k: int = 100
    max_queries: int | None = None
    #: Score the starting model too, so it competes for ``best/``; false skips that evaluation where the
    #: start is already scored (the quickstart's arms start from the warm-up's chosen checkpoint).
    at_start: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """``leadkd train``: one model on ground truth (warm-up, or plain fine-tuning)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: TrainLossConfig = field(default_factory=TrainLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 888
    output_dir: str | None = None
    log_every: int = 10
    #: Seconds a process may wait in a collective (torch.distributed's timeout; 10 min for NCCL otherwise).
    #: Rank 0 alone writes checkpoints and scores dev evaluations while the others wait in a collective.
    ddp_timeout: int = 1800


@dataclass(frozen=True)
class DistillConfig:
    """``leadkd distill``: teacher and student trained together with LEAD."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    layers: LayerConfig = field(default_factory=LayerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 888
    output_dir: str | None = None
    log_every: int = 10
    #: Seconds a process may wait in a collective (torch.distributed's timeout; 10 min for NCCL otherwise).
    #: Rank 0 alone writes checkpoints and scores dev evaluations while the others wait in a collective.
    ddp_timeout: int = 1800


Config = Union[TrainConfig, DistillConfig]
JOB_KINDS: dict[str, type] = {"train": TrainConfig, "distill": DistillConfig}


# --------------------------------------------------------------------------- small parsers

_INIT = re.compile(r"^\s*teacher_layers\s*=\s*\[([^\]]*)\]\s*$")
_PAIR = re.compile(r"^(\d+):(\d+)$")


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


def _format_init(layers: Sequence[int]) -> str:
    return "teacher_layers=[" + ",".join(str(layer) for layer in layers) + "]"


def parse_layer_map(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:1,1:3"`` -> ``((0, 1), (1, 3))``: explicit ``student:teacher`` pairs, sorted by student layer.

    Syntax and repeats only; indices are checked against both depths once the models are loaded.
    """
    entries = [re.sub(r"\s+", "", entry) for entry in str(text).split(",")]
    pairs = []
    for entry in entries:
        match = _PAIR.match(entry)
        if match is None:
            raise ValueError(f"expected one of {', '.join(LAYER_STRATEGIES)} or student:teacher pairs like "
                             f"'0:1,1:3,2:5', got {text!r}")
        pairs.append((int(match.group(1)), int(match.group(2))))
    for side, index in (("student", 0), ("teacher", 1)):
        seen = [pair[index] for pair in pairs]
        if len(set(seen)) != len(seen):
            raise ValueError(f"{text!r} uses a {side} layer twice")
    return tuple(sorted(pairs))


def _format_layer_map(pairs: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{student}:{teacher}" for student, teacher in pairs)


# --------------------------------------------------------------------------- typed conversion

_NONE_WORDS = ("none", "null")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def _number(value: Any) -> float:
    """A finite float from a number or a numeric string (PyYAML reads ``2e-5`` as a string)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.strip().replace("_", ""))
    else:
        raise ValueError
    if not math.isfinite(number):
        raise ValueError
    return number


def _convert(value: Any, hint: Any, dotted: str) -> Any:
    """``value`` as type ``hint``, or ValueError with a message (without the key: the caller adds it)."""
    origin = typing.get_origin(hint)
    optional = origin in (Union, types.UnionType)
    if optional:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        hint = options[0] if len(options) == 1 else Union[tuple(options)]
        origin = typing.get_origin(hint)
        if hint is not str and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            raise ValueError(f"expected {_expected(hint)} or null, got {value!r} (write null, unquoted, "
                             "for no value)")
    if value is None:
        raise ValueError(f"expected {_expected(hint)}, got null (this option cannot be empty)")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping of options, got {_describe(value)}")
        return _build(hint, value, dotted)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str):
            for choice in choices:
                if value.strip().lower() == choice:
                    return choice
        close = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.5)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"expected one of {', '.join(choices)}, got {_describe(value)}{hint_text}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {_describe(value)}")
    if hint is int:
        try:
            number = _number(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {_describe(value)}") from None
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {_describe(value)}")
        return int(value) if isinstance(value, int) else int(number)
    if hint is float:
        try:
            return _number(value)
        except ValueError:
            raise ValueError(f"expected a number, got {_describe(value)}") from None
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `split: 2019` as a number; the option means the text
        raise ValueError(f"expected a string, got {_describe(value)}")
    raise TypeError(f"{dotted}: unsupported option type {hint!r}")  # a bug in this module, not user input


def _expected(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "a value")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a mapping already checked for unknown keys."""
    hints = _hints(cls)
    values = {}
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        try:
            values[name] = _convert(value, hints[name], dotted + ".")
        except ValueError as exc:
            raise _KeyedError(dotted, str(exc)) from None
    return cls(**values)


class _KeyedError(Exception):
    """A conversion failure tied to a dotted key; turned into a ConfigError naming its source."""

    def __init__(self, dotted: str, message: str):
        super().__init__(message)
        self.dotted = dotted
        self.message = message


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a job, sections included (``optim``, ``optim.lr``, ...)."""
    keys = []
    for name, hint in _hints(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hint):
            keys.extend(_schema_keys(hint, dotted + "."))
    return keys


def _suggest(dotted: str, cls: type) -> str:
    """`` (did you mean 'x.y'?)`` for the nearest real key, searching all sections for a misplaced leaf."""
    keys = _schema_keys(cls)
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.7)
    if not close:
        leaf = dotted.rsplit(".", 1)[-1]
        by_leaf = {key.rsplit(".", 1)[-1]: key for key in reversed(keys)}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
        close = [by_leaf[near[0]]] if near else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str, job: type) -> None:
    hints = _hints(cls)
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            where = f"in section {prefix[:-1]}" if prefix else "at the top level"
            raise _KeyedError(str(dotted), f"unknown option {where}{_suggest(str(dotted), job)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _check_keys(hint, value, dotted + ".", job)


# --------------------------------------------------------------------------- validation

def _fail(dotted: str, message: str) -> None:
    raise _KeyedError(dotted, message)


def _positive(config: Any, prefix: str, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if value is None:
            _fail(prefix + name, "required but not set")
        if not value > 0:
            _fail(prefix + name, f"must be > 0, got {value}")


def _non_negative(config: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            _fail(prefix + name, f"must be >= 0, got {value}")


def _required_text(config: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or not str(value).strip():
            _fail(prefix + name, "required but not set")


def _check_model(model: ModelConfig, prefix: str, need_path: bool = True) -> None:
    if need_path:
        _required_text(model, prefix, "path")
    _positive(model, prefix, "max_query_length", "max_passage_length", allow_none=True)
    _positive(model, prefix, "similarity_scale", allow_none=True)
    _non_negative(model, prefix, "colbert_dim")
    owner = {"pooling": "dual_encoder", "normalize": "dual_encoder", "similarity_scale": "dual_encoder",
             "colbert_dim": "colbert", "token_type_ids": "cross_encoder"}
    for name, kind in owner.items():
        if model.kind != kind and getattr(model, name) is not None:
            _fail(prefix + name, f"only applies to a {kind}, not to a {model.kind}")


def _check_common(config: Config) -> None:
    _required_text(config.data, "data.", "corpus", "train_groups")
    _non_negative(config.data, "data.", "num_negatives")
    optim = config.optim
    _positive(optim, "optim.", "lr", "adam_eps", "batch_size", "grad_accum", "steps")
    _positive(optim, "optim.", "teacher_lr", "max_grad_norm", allow_none=True)
    _non_negative(optim, "optim.", "weight_decay", "skip_non_finite")
    if not 0.0 <= optim.warmup_ratio < 1.0:
        _fail("optim.warmup_ratio", f"must be in [0, 1), got {optim.warmup_ratio}")
    _positive(config.checkpoint, "checkpoint.", "every", "keep_last", allow_none=True)
    _positive(config.eval, "eval.", "k")
    _positive(config.eval, "eval.", "every", "max_queries", allow_none=True)
    if config.eval.split is not None and not config.eval.split.strip():
        _fail("eval.split", "must name a qrels split (e.g. dev), or be null to skip evaluation")
    _check_metric(config.eval.metric)
    _required_text(config, "", "output_dir")
    _positive(config, "", "log_every", "ddp_timeout")
    if not 0 <= config.seed < 2**32:
        _fail("seed", f"must be in [0, 2**32), got {config.seed}")


def _check_metric(metric: str) -> None:
    """The metric must be an ir-measures name, so a typo fails now rather than after the first eval."""
    try:
        import ir_measures
    except ImportError:  # evaluation will say so itself; nothing to check against here
        return
    try:
        ir_measures.parse_measure(metric)
    except Exception as exc:  # ir-measures raises NameError/ValueError/TypeError for bad names
        _fail("eval.metric", f"not an ir-measures measure name like nDCG@10 or RR@10 ({exc})")


def _check_models(config: DistillConfig) -> None:
    _check_model(config.teacher, "teacher.")
    student = config.student
    _check_model(student, "student.", need_path=student.init is None)
    if student.init is not None:
        if student.path is not None:
            _fail("student.init", "builds the student from the teacher's blocks; remove student.path "
                                  "(or remove student.init to load the student from student.path)")
        if student.kind != config.teacher.kind:
            _fail("student.kind", f"must match teacher.kind ({config.teacher.kind}) when the student is built "
                                  "from the teacher's blocks (student.init)")


def _check_distill(config: DistillConfig) -> None:
    loss = config.loss
    if config.teacher.cache:
        if config.teacher.train:
            _fail("teacher.cache", "only a frozen teacher's vectors can be cached; set teacher.train: false")
        if config.teacher.kind != "dual_encoder":
            _fail("teacher.cache", f"caches dual-encoder vectors; a {config.teacher.kind} teacher scores each "
                                   "query-passage pair, so there is nothing per text to cache")
        if loss.layer == "hidden_mse":
            _fail("teacher.cache", "holds pooled vectors; loss.layer=hidden_mse needs the teacher's token states")
    elif config.teacher.cache_dir:
        _fail("teacher.cache_dir", "names where the teacher cache goes; set teacher.cache: true to use one")
    _non_negative(loss, "loss.", "student_ce", "teacher_ce", "response_weight", "layer_weight")
    _positive(loss, "loss.", "temperature", "layer_temperature")
    terms = [loss.student_ce > 0, config.teacher.train and loss.teacher_ce > 0,
             loss.response != "none" and loss.response_weight > 0, loss.layer != "none"]
    if not any(terms):
        _fail("loss", "every loss term is off (weights 0 or 'none'): nothing would be trained")
    _positive(config.layers, "layers.", "k")
    _positive(config.layers, "layers.", "resample_every", allow_none=True)


def _canonical(config: Config) -> Config:
    """Normalise free-text values that have a canonical form, so that equal settings compare equal."""
    if isinstance(config, DistillConfig):
        try:
            pairs = config.layers.pairs
        except ValueError as exc:
            raise _KeyedError("layers.strategy", str(exc)) from None
        strategy = _format_layer_map(pairs) if pairs is not None else config.layers.strategy
        if config.layers.strategy.strip().lower() in LAYER_STRATEGIES:
            strategy = config.layers.strategy.strip().lower()
        if strategy != config.layers.strategy:
            config = dataclasses.replace(config, layers=dataclasses.replace(config.layers, strategy=strategy))
        if config.student.init is not None:
            try:
                layers = parse_student_init(config.student.init)
            except ValueError as exc:
                raise _KeyedError("student.init", str(exc)) from None
            config = dataclasses.replace(config, student=dataclasses.replace(
                config.student, init=_format_init(layers)))
    return config


def validate_config(config: Config) -> Config:
    """Check every value; return the config with canonical spellings. Raises ConfigError naming the key."""
    try:
        if not isinstance(config, (TrainConfig, DistillConfig)):
            raise TypeError(f"not a leadkd job config: {type(config).__name__}")
        config = _canonical(config)
        # In file order: models first, so a half-written file reports its first gap.
        if isinstance(config, DistillConfig):
            _check_models(config)
        else:
            _check_model(config.model, "model.")
        _check_common(config)
        if isinstance(config, DistillConfig):
            _check_distill(config)
    except _KeyedError as exc:
        raise ConfigError(f"{exc.dotted}: {exc.message}") from None
    return config


# --------------------------------------------------------------------------- files and overrides

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

# YAML 1.1 reads `5:11` as the base-60 integer 311 and `010` as octal 8, which would corrupt explicit
# layer maps and ids; numbers here are plain decimals (with `2e-5`, which YAML 1.1 leaves a string).
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$")
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_StrictLoader.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
_StrictLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings our loader would read as numbers (``2e-5``, ``1e5``)."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    if _INT_RE.match(text) or _FLOAT_RE.match(text):
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="'")
    return dumper.represent_str(text)


_Dumper.add_representer(str, _represent_str)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    else:
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level, got {_describe(data)}")
    return data


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML/JSON file, read as configs are (duplicate keys refused, plain
    decimals, one-line errors with the line): for files that hold more than one job, e.g. a comparison."""
    return _read_file(Path(path))


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=2e-5")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted option name like optim.lr")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a path with a colon and space): take it as the text it is
    return parts, value


def _merge(target: dict, source: Mapping, origin: str, origins: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``source`` into ``target``, remembering where each leaf came from (for error messages)."""
    for key, value in source.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value, origin, origins, dotted + ".")
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            for existing in [name for name in origins if name == dotted or name.startswith(dotted + ".")]:
                del origins[existing]
            origins[dotted] = origin


def _origin_of(dotted: str, origins: Mapping[str, str], default: str) -> str:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in origins:
            return origins[key]
    # a key under a section set elsewhere (e.g. the section's own origin), or a default value
    for key, origin in origins.items():
        if key.startswith(dotted + "."):
            return origin
    return default


def _job_class(kind: str) -> type:
    try:
        return JOB_KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}") from None


def _from_dict(data: Mapping[str, Any], kind: str, origins: Mapping[str, str], default_origin: str) -> Config:
    cls = _job_class(kind)
    try:
        _check_keys(cls, data, "", cls)
        config = _build(cls, data)
    except _KeyedError as exc:
        origin = _origin_of(exc.dotted, origins, default_origin)
        raise ConfigError(f"{origin}: {exc.dotted}: {exc.message}") from None
    try:
        return validate_config(config)
    except ConfigError as exc:
        dotted = str(exc).split(":", 1)[0]
        origin = _origin_of(dotted, origins, default_origin)
        raise ConfigError(f"{origin}: {exc}") from None


def config_from_dict(data: Mapping[str, Any], kind: str = "distill") -> Config:
    """A validated config from a nested mapping (as read from YAML/JSON)."""
    return _from_dict(data, kind, {}, "config")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), kind: str = "distill") -> Config:
    """Read a YAML/JSON file (or start from defaults when ``path`` is None), apply ``key.sub=value``
    overrides (values parsed as YAML: ``2e-5``, ``true``, ``[0,2,4]``, ``null``) and validate.

    Every problem is a :class:`ConfigError` naming its source (the file or the override) and the dotted
    key, e.g. ``run.yaml: optim.lr: expected a number, got 'abc'``.
    """
    _job_class(kind)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = "config"
    if path is not None:
        source = str(path)
        _merge(data, _read_file(Path(path)), source, origins)
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        # An override must not silently replace a whole section with a scalar, nor dig into a scalar.
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not a section")
        _merge(data, nested, f"override {text!r}", origins)
    return _from_dict(data, kind, origins, source)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable) of every option, defaults included."""
    if not isinstance(config, (TrainConfig, DistillConfig)):
        raise TypeError(f"not a leadkd job config: {type(config).__name__}")
    return _plain(config)


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically; ``load_config(path, kind=...)`` gives it back."""
    kind = "distill" if isinstance(config, DistillConfig) else "train"
    path = Path(path)
    text = yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)
    with atomic_write(path) as handle:
        handle.write(f"# leadkd {kind} config, every option resolved; load_config(path, kind={kind!r}) reads it back\n")
        handle.write(text)
    return path


#: Settings a resumed run may change: they decide what is evaluated, logged and kept, or how (not what)
#: is computed: skipping non-finite batches after a NaN stop, trading compute for memory, the teacher cache.
RESUMABLE_CHANGES = ("eval.", "log_every", "ddp_timeout", "checkpoint.keep_last", "checkpoint.every",
                     "output_dir", "optim.skip_non_finite", "optim.cpu_dropout", "optim.gradient_checkpointing",
                     "teacher.cache")
#: Settings that name files: compared after resolving, so ./data and /abs/data are the same.
_PATH_SETTINGS = ("data.corpus", "data.train_groups", "model.path", "teacher.path", "student.path")


def changed_settings(before: Config, after: Config) -> list[str]:
    """Dotted keys whose values differ between two configs of the same kind, as ``key: old -> new``."""
    def flat(config: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in dataclasses.fields(config):
            value = getattr(config, item.name)
            if dataclasses.is_dataclass(value):
                out.update(flat(value, f"{prefix}{item.name}."))
            else:
                out[f"{prefix}{item.name}"] = value
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

