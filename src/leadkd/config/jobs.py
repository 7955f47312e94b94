"""Typed configuration of the two training jobs: ``train`` (one model on ground truth) and ``distill`` (LEAD).

The paper's code had one flat argparse namespace of ~100 options, many of them dead. Here every option
lives in a small frozen pydantic model, a file (YAML or JSON) sets any subset of them, and ``key.sub=value``
overrides from the command line go on top. Nothing is silently ignored: an unknown key, a value of the
wrong type or out of range stops the run before any model is loaded, in one line with the file, the
dotted key and (for a misspelt key) the nearest real one; pydantic's own multi-line report is never shown.
The resolved configuration is saved beside every run, and loading that file gives back an equal object.

Only this module knows the file layout; the trainer reads attributes (``config.optim.lr``). Checks that
need a model (layer indices against a depth) happen where the model is known.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

from ..kinds import DEFAULT_KIND, MODEL_KINDS, owners
from ..runtime.errors import ConfigError
from ..runtime.fileio import atomic_write
from .files import dump_yaml, origin_of, read_sources
from .layer_strategy import STRATEGIES, Pair, StrategyError, resolve_strategy
from .values import (
    Integer,
    MeasureName,
    NonNegativeInt,
    NonNegativeNumber,
    Number,
    PositiveInt,
    PositiveNumber,
    Problem,
    SplitName,
    StudentInit,
    check_failed,
    choice,
    parse_student_init,
    problem_of,
    within,
)


def _registered_kind(value: Any) -> Any:
    """A kind of the registry (:mod:`leadkd.kinds`), in any case; kinds registered at run time count."""
    text = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(text, str) or text not in MODEL_KINDS:
        raise ValueError(f"expected one of {', '.join(MODEL_KINDS)}, got {value!r}")
    return text


ModelKind = Annotated[str, BeforeValidator(_registered_kind)]
if TYPE_CHECKING:  # the values as the type checker sees them; choice() adds any-case spelling at run time
    Pooling = Literal["cls", "mean"]
    ResponseLoss = Literal["kl", "margin_mse", "none"]
    LayerLoss = Literal["lead", "hidden_mse", "none"]
    CrossEncoderHead = Literal["linear", "sequence_classification"]
    ColbertLastLayer = Literal["raw", "final"]
    TeacherCandidates = Literal["batch", "own_group"]
    StrategyName = str
else:
    Pooling = choice("cls", "mean")
    ResponseLoss = choice("kl", "margin_mse", "none")
    LayerLoss = choice("lead", "hidden_mse", "none")
    CrossEncoderHead = choice("linear", "sequence_classification")
    ColbertLastLayer = choice("raw", "final")  # what a ColBERT teacher's last layer is in the layer loss
    TeacherCandidates = choice("batch", "own_group")
    StrategyName = Literal[STRATEGIES]


class _Section(BaseModel):
    """Frozen, every key known, every value typed; a number where text is meant (``split: 2019``) is text."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


# --------------------------------------------------------------------------- sections

class ModelConfig(_Section):
    """One retriever: where its weights are and how it reads text."""

    path: str | None = None
    kind: ModelKind = DEFAULT_KIND
    pooling: Pooling | None = None
    normalize: StrictBool | None = None
    max_query_length: PositiveInt | None = None
    max_passage_length: PositiveInt | None = None
    similarity_scale: PositiveNumber | None = None
    #: colbert: projection width; 0 = none (the paper's); null = the folder's, else 128
    colbert_dim: NonNegativeInt | None = None
    token_type_ids: StrictBool | None = None    # cross_encoder: segment ids 0/1; false = all 0 (the paper's)
    #: cross_encoder: "linear" (the paper's) or "sequence_classification" (HF head, HF folder); null = the folder's
    cross_encoder_head: CrossEncoderHead | None = None
    trust_remote_code: StrictBool = False
    use_safetensors: StrictBool = True          # false: also accept pickled weights (pytorch_model.bin), tensors only

    @model_validator(mode="after")
    def _options_of_its_kind(self) -> ModelConfig:
        """Options of one kind (the registry's) set on another are errors rather than ignored."""
        for name in type(self).model_fields:
            kinds = owners(name)
            if kinds and self.kind not in kinds and getattr(self, name) is not None:
                raise check_failed(name, f"only applies to a {' or a '.join(kinds)}, not to a {self.kind}")
        return self


class TeacherConfig(ModelConfig):
    """The teacher; ``train`` keeps the paper's joint training (its own optimizer, same schedule).

    ``cache`` (frozen dual-encoder teacher only) stores its per-layer vectors of every query and passage
    on disk the first time they are seen, so later epochs cost only the student. ``cache_dir`` puts the
    cache elsewhere than ``output_dir/teacher-cache``, so runs of the same frozen teacher on the same data
    (the variants and seeds of a comparison) encode each text once between them.
    """

    train: StrictBool = True
    cache: StrictBool = False
    cache_dir: str | None = None
    #: A folder ``leadkd score-teacher`` wrote (or a published ``qid pid score`` file): no teacher runs, each
    #: query's teacher candidates are its own group's (``loss.teacher_candidates: own_group``); ``path`` may be
    #: left out, or given to check it is the teacher that scored the file (and for ``student.init``).
    scores: str | None = None


class StudentConfig(ModelConfig):
    """The student; ``init`` builds it from a subset of the teacher's blocks instead of ``path``."""

    init: StudentInit | None = None

    @property
    def init_teacher_layers(self) -> tuple[int, ...] | None:
        """The teacher blocks the student starts from (``init: teacher_layers=[0,2,4]``), or None."""
        return None if self.init is None else parse_student_init(self.init)


class DataConfig(_Section):
    """Training data. Relative paths are relative to the working directory, not to the config file."""

    corpus: str | None = None
    train_groups: str | None = None
    num_negatives: NonNegativeInt = 7
    shuffle_positives: StrictBool = False
    #: DataLoader worker processes that sample and tokenise the next batches while this step runs. Unset:
    #: 0 on a CPU host, whose cores all run the model; 4 on CUDA, what an H200 step needs at MS MARCO lengths
    #: (docs/benchmarks.md, "Host time per step").
    workers: NonNegativeInt | None = None


class TrainLossConfig(_Section):
    """Which candidates a model's ground-truth contrastive loss sees: the warm-up's whole loss, part of LEAD's."""

    in_batch_negatives: StrictBool = True
    cross_process_negatives: StrictBool = True
    mask_duplicate_positives: StrictBool = True  # false = the paper's code: a positive's copy elsewhere is a negative


class LossConfig(TrainLossConfig):
    """The LEAD objective (spec §2.5): weights, distribution temperatures and switches."""

    student_ce: NonNegativeNumber = 1.0
    teacher_ce: NonNegativeNumber = 1.0
    response: ResponseLoss = "kl"
    response_weight: NonNegativeNumber = 1.0
    temperature: PositiveNumber = 1.0
    layer: LayerLoss = "lead"
    layer_weight: NonNegativeNumber = 1.0
    layer_temperature: PositiveNumber = 10.0
    reweight: StrictBool = True
    detach_teacher_targets: StrictBool = False
    colbert_last_layer: ColbertLastLayer = "raw"
    #: Which candidates the teacher's distributions cover: ``batch``, the paper's (every passage of the
    #: batch for a dual-encoder or ColBERT teacher; a cross-encoder's own group, where the student's
    #: ground-truth loss is cut to that group too, as in the paper's code) or ``own_group`` (each query's
    #: own group for every teacher; the student's ground-truth loss keeps its in-batch negatives). Unset:
    #: ``own_group`` with ``teacher.scores``, else ``batch``.
    teacher_candidates: TeacherCandidates | None = None

    @property
    def raw_last_layer(self) -> bool:
        """Whether the layer loss scores every model's last block raw (the paper's ColBERT view)."""
        return self.colbert_last_layer == "raw"


class LayerConfig(_Section):
    """Which teacher layer teaches which student layer, and how often the choice is re-drawn.

    ``pairs`` (``[[student, teacher], ...]``) belong to ``strategy: map`` alone. The old spelling, the map
    as the strategy (``strategy: "0:1,2:5"``), is read as ``map`` with those pairs.
    """

    strategy: StrategyName = "random"
    pairs: tuple[Pair, ...] | None = None
    k: PositiveInt = 5
    resample_every: PositiveInt | None = 10

    @model_validator(mode="before")
    @classmethod
    def _todays_spelling(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        try:
            strategy, pairs = resolve_strategy(data.get("strategy", "random"), data.get("pairs"))
        except StrategyError as exc:
            raise check_failed(exc.key, str(exc)) from None
        return {**data, "strategy": strategy, "pairs": pairs}


class OptimConfig(_Section):
    """AdamW with linear warm-up and decay, one optimizer per trained model."""

    lr: PositiveNumber = 2e-5
    teacher_lr: PositiveNumber | None = None
    weight_decay: NonNegativeNumber = 0.0
    adam_eps: PositiveNumber = 1e-8
    warmup_ratio: Annotated[Number, within(lambda value: 0 <= value < 1, "in [0, 1)")] = 0.1
    max_grad_norm: PositiveNumber | None = 2.0
    steps: PositiveInt | None = None
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    bf16: StrictBool = False
    gradient_checkpointing: StrictBool = False
    #: On CPU, dropout masks from 16 random bits per element and attention dropout outside SDPA
    #: (accel/cpu_dropout.py): the same dropout, a ~15% faster forward and backward.
    cpu_dropout: StrictBool = True
    #: A NaN/inf loss stops the run (0), or up to this many such batches in a row are skipped (no update).
    skip_non_finite: NonNegativeInt = 0


class CheckpointConfig(_Section):
    """Periodic checkpoints; the last step is always saved."""

    every: PositiveInt | None = 1000
    keep_last: PositiveInt | None = 2


class EvalConfig(_Section):
    """Held-out evaluation during training (of the student, in a distill job)."""

    split: SplitName | None = "dev"
    every: PositiveInt | None = None
    metric: MeasureName = "nDCG@10"
    k: PositiveInt = 100
    max_queries: PositiveInt | None = None
    #: Score the starting model too, so it competes for ``best/``; false skips that evaluation where the
    #: start is already scored (the quickstart's arms start from the warm-up's chosen checkpoint).
    at_start: StrictBool = True


class _Job(_Section):
    """What every job has besides its models and loss, declared once for ``train`` and ``distill``."""

    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: Annotated[Integer, within(lambda value: 0 <= value < 2**32, "in [0, 2**32)")] = 888
    output_dir: str | None = None
    log_every: PositiveInt = 10
    #: Seconds a process may wait in a collective (torch.distributed's timeout; 10 min for NCCL otherwise).
    #: Rank 0 alone writes checkpoints and scores dev evaluations while the others wait in a collective.
    ddp_timeout: PositiveInt = 1800


class TrainConfig(_Job):
    """``leadkd train``: one model on ground truth (warm-up, or plain fine-tuning)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: TrainLossConfig = Field(default_factory=TrainLossConfig)


class DistillConfig(_Job):
    """``leadkd distill``: teacher and student trained together with LEAD."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    layers: LayerConfig = Field(default_factory=LayerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        teacher, student, loss = self.teacher, self.student, self.loss
        if student.init is not None and student.path is not None:
            raise check_failed("student.init", "builds the student from the teacher's blocks; remove student.path "
                                               "(or remove student.init to load the student from student.path)")
        if teacher.cache and teacher.train:
            raise check_failed("teacher.cache", "only a frozen teacher's vectors can be cached; "
                                                "set teacher.train: false")
        if teacher.cache and loss.layer == "hidden_mse":
            raise check_failed("teacher.cache", "holds pooled vectors; loss.layer=hidden_mse needs the teacher's "
                                                "token states")
        if teacher.scores is not None:
            for key, clash, why in (("teacher.train", teacher.train, ("holds a frozen teacher's scores; set "
                                     "teacher.train: false")),
                                    ("teacher.cache", teacher.cache, ("replaces the teacher cache; remove "
                                     "teacher.cache")),
                                    ("loss.layer", loss.layer == "hidden_mse", ("holds scores, not the token states "
                                     "loss.layer=hidden_mse compares")),
                                    ("loss.teacher_candidates", loss.teacher_candidates == "batch",
                                     "holds each query's own group only; remove loss.teacher_candidates: batch")):
                if clash:
                    raise check_failed("teacher.scores", f"{why} (from {key})")
        if teacher.cache_dir and not teacher.cache:
            raise check_failed("teacher.cache_dir", "names where the teacher cache goes; set teacher.cache: true "
                                                    "to use one")
        terms = [loss.student_ce > 0, teacher.train and loss.teacher_ce > 0,
                 loss.response != "none" and loss.response_weight > 0, loss.layer != "none"]
        if not any(terms):
            raise check_failed("loss", "every loss term is off (weights 0 or 'none'): nothing would be trained")
        return self

    @property
    def teacher_own_group(self) -> bool:
        """Whether the teacher's distributions cover each query's own group (``loss.teacher_candidates``)."""
        chosen = self.loss.teacher_candidates
        return chosen == "own_group" or (chosen is None and self.teacher.scores is not None)


Config = TrainConfig | DistillConfig
JobClass = type[TrainConfig] | type[DistillConfig]
JOB_KINDS: dict[str, JobClass] = {"train": TrainConfig, "distill": DistillConfig}


# --------------------------------------------------------------------------- validating, reading, writing

#: The order a recipe reads in, its models first, for errors and saved files (pydantic lists base fields first).
_FILE_ORDER = ("model", "teacher", "student", "data", "loss", "layers", "optim", "checkpoint", "eval")


def _required(config: Config) -> list[str]:
    """Keys a job must set to run, in file order; they default to unset so that sections build in code."""
    if isinstance(config, TrainConfig):
        models = ["model.path"]
    else:
        teacher = [] if config.teacher.scores and not config.student.init else ["teacher.path"]
        models = teacher + ([] if config.student.init else ["student.path"])
    return models + ["data.corpus", "data.train_groups", "optim.steps", "output_dir"]


def _checked(job: JobClass, data: Any) -> Config:
    """A validated job config, or the Problem to report."""
    try:
        config = job.model_validate(data)
    except ValidationError as exc:
        raise problem_of(exc, job, _FILE_ORDER) from None
    for key in _required(config):
        value = functools.reduce(getattr, key.split("."), config)
        if value is None or not str(value).strip():
            raise Problem(key, "required but not set")
    return config


def validate_config(config: Config) -> Config:
    """Check every value of a config built in code; return it with canonical spellings (ConfigError names the key)."""
    if not isinstance(config, (TrainConfig, DistillConfig)):
        raise TypeError(f"not a leadkd job config: {type(config).__name__}")
    try:
        return _checked(type(config), config.model_dump())
    except Problem as problem:
        raise ConfigError(str(problem)) from None


def _job_class(kind: str) -> JobClass:
    try:
        return JOB_KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}") from None


def _from_dict(data: Mapping[str, Any], kind: str, origins: Mapping[str, str], default_origin: str) -> Config:
    try:
        return _checked(_job_class(kind), data)
    except Problem as problem:
        raise ConfigError(f"{origin_of(problem.dotted, origins, default_origin)}: {problem}") from None


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
    data, origins, source = read_sources(path, overrides)
    return _from_dict(data, kind, origins, source)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable) of every option, defaults included."""
    if not isinstance(config, (TrainConfig, DistillConfig)):
        raise TypeError(f"not a leadkd job config: {type(config).__name__}")
    data = config.model_dump(mode="json")
    return {key: data[key] for key in _FILE_ORDER if key in data} | data


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically; ``load_config(path, kind=...)`` gives it back."""
    kind = "distill" if isinstance(config, DistillConfig) else "train"
    path = Path(path)
    text = dump_yaml(config_to_dict(config))
    with atomic_write(path) as handle:
        handle.write(f"# leadkd {kind} config, every option resolved; load_config(path, kind={kind!r}) reads it back\n")
        handle.write(text)
    return path


def teacher_config(path: str, overrides: Sequence[str] = ()) -> TeacherConfig:
    """A teacher section alone (``leadkd score-teacher``): ``path`` and ``key=value`` options of a config's
    ``teacher:`` section (``kind=colbert``, ``max_passage_length=180``), checked with one-line errors."""
    data, origins, _ = read_sources(None, [f"teacher.{text}" for text in overrides])
    try:
        return TeacherConfig.model_validate({**data.get("teacher", {}), "path": path})
    except ValidationError as exc:
        problem = problem_of(exc, TeacherConfig)
        where = origin_of("teacher." + problem.dotted, origins, "--teacher")
        raise ConfigError(f"{where}: teacher.{problem}") from None
