"""The two objectives a run can have: ground truth alone (`leadkd train`) and distillation (`leadkd distill`).

Each is a small object the trainer calls once per micro-batch, ``objective(batch, pairs) -> terms``
(``terms["loss"]`` is what is backpropagated; the other 0-d terms are logged). Both lay candidates out
the same way (spec §2.3): a model that scores the whole batch sees every passage of the batch, and under
torchrun of every process, unless in-batch negatives are off; one that scores only its own group (a
cross-encoder) sees its own group. The losses themselves are the pure functions of
:mod:`leadkd.distill.losses`; :func:`build_objective` makes a job's objective from its config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..config import DistillConfig, TrainConfig
from ..models.base import Retriever
from ..models.loading import build_model
from ..runtime import distributed as dist
from ..runtime.errors import ConfigError
from .build import Trained, build_student, hidden_state_baseline, open_teacher_cache, prepare
from .layers import LayerSchedule, pair_layers
from .losses import (
    contrastive_loss,
    duplicate_positive_mask,
    group_labels,
    lead_total_loss,
    mask_candidates,
    own_group_scores,
)
from .teacher_scores import TeacherScores, check_scored_by


@dataclass(frozen=True)
class Layout:
    """Where one batch's candidates come from: ``gathered`` (every process's passages, the local queries'
    labels starting at ``offset``) and ``own_group`` (scores cut to each query's own group)."""

    gathered: bool
    offset: int
    own_group: bool

    @classmethod
    def of(cls, scores_whole_batch: bool, in_batch: bool, cross_process: bool, queries: int) -> Layout:
        gathered = scores_whole_batch and cross_process and dist.is_distributed()
        return cls(gathered, dist.get_rank() * queries if gathered else 0, not (scores_whole_batch and in_batch))

    def labels(self, batch) -> torch.Tensor:
        return group_labels(len(batch.queries), batch.group_size, in_batch=not self.own_group,
                            query_offset=self.offset)

    def cut(self, scores: torch.Tensor, scores_whole_batch: bool, group_size: int) -> torch.Tensor:
        """Scores of a whole-batch model cut to each query's own group where the layout asks for it."""
        return own_group_scores(scores, group_size, self.offset) if self.own_group and scores_whole_batch else scores


def _inputs(batch, name: str) -> dict[str, Any]:
    """``inputs=`` for model ``name``'s ``encode_batch`` when the loader tokenised the batch for it."""
    made = batch.model_inputs(name) if hasattr(batch, "model_inputs") else None
    return {} if made is None else {"inputs": made}


def duplicate_positives(batch, layout: Layout) -> torch.Tensor | None:
    """``[B, C]`` mask of the copies of each local query's judged positives among its candidates, on the CPU,
    or None when there are none (see :func:`~leadkd.distill.losses.duplicate_positive_mask`). With gathered
    candidates, their ids (plain strings, no gradient) are gathered here too."""
    ids = list(batch.passage_ids)
    if layout.gathered:
        ids = [pid for part in dist.all_gather_object(ids) for pid in part]
    labels = group_labels(len(batch.queries), batch.group_size, query_offset=layout.offset)
    mask = duplicate_positive_mask(batch.positive_ids, ids, labels)
    if layout.own_group:
        mask = own_group_scores(mask, batch.group_size, layout.offset)
    return mask if mask.numpy().any() else None  # a host tensor: read through numpy, never a device sync


class _Objective:
    def __init__(self, loss_config, device: torch.device):
        self.loss = loss_config
        self.device = device

    def _layout(self, model, batch) -> Layout:
        return Layout.of(model.scores_whole_batch, self.loss.in_batch_negatives, self.loss.cross_process_negatives,
                         len(batch.queries))

    def _duplicates(self, batch, layout: Layout) -> torch.Tensor | None:
        if not self.loss.mask_duplicate_positives:
            return None
        mask = duplicate_positives(batch, layout)
        return None if mask is None else mask.to(self.device)


class GroundTruth(_Objective):
    """One model, contrastive over its candidates: the warm-up of the paper's recipe."""

    def __init__(self, model: Trained, loss_config, device: torch.device):
        super().__init__(loss_config, device)
        self.model = model
        self.models = {"model": model}
        self.evaluated = model

    def text_models(self) -> dict[str, nn.Module]:
        """The models that read each batch's text, by the names their tokenised inputs travel under."""
        return {"model": self.model.model}

    def __call__(self, batch, pairs=()) -> dict[str, torch.Tensor]:
        model = cast(Retriever, self.model.model)
        encoded = self.model.forward(batch.queries, batch.passages, [], final=True, **_inputs(batch, "model"))
        layout = self._layout(model, batch)
        if layout.gathered:
            encoded = encoded.gathered(with_grad=True)
        scores = layout.cut(encoded.scores()[-1], model.scores_whole_batch, batch.group_size)
        duplicates = self._duplicates(batch, layout)
        if duplicates is not None:
            scores = mask_candidates(scores, duplicates)
        loss = contrastive_loss(scores, layout.labels(batch).to(scores.device))
        return {"loss": loss, "ce": loss}


class Distillation(_Objective):
    """LEAD and its baselines: the student's and (when it trains) the teacher's ground-truth terms, the
    response term and the layer term over the drawn pairs, from one candidate set both models score.

    ``teacher_cache`` serves a frozen teacher's vectors instead of running it; ``hidden_mse`` is the
    classical hidden-state baseline's projections (it then replaces the layer-score term's pairs).
    ``own_group`` (``loss.teacher_candidates``) compares the two models over each query's own group
    while the student's ground-truth term keeps its own candidates; ``teacher_scores`` (a score file,
    :mod:`~leadkd.distill.teacher_scores`) then stands in for the teacher, which is None.
    """

    def __init__(self, student: Trained, teacher: Trained | None, loss_config, device: torch.device,
                 teacher_cache=None, hidden_mse=None, teacher_scores=None, own_group: bool = False):
        super().__init__(loss_config, device)
        self.student, self.teacher = student, teacher
        self.models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
        self.evaluated = student
        self.teacher_cache = teacher_cache
        self.hidden_mse = hidden_mse
        self.teacher_scores = teacher_scores
        self.own_group = own_group or teacher_scores is not None
        self.teacher_trains = teacher is not None and teacher.trains

    def text_models(self) -> dict[str, nn.Module]:
        """The models that read each batch's text, by the names their tokenised inputs travel under: the
        student, and the teacher unless a score file or a vector cache stands in for it (the hidden-state
        baseline tokenises in the step: it needs every token state)."""
        if self.hidden_mse is not None:
            return {}
        models = {"student": self.student.model}
        if self.teacher is not None and self.teacher_cache is None:
            models["teacher"] = self.teacher.model
        return models

    def _encode_teacher(self, batch, layers: list[int], with_states: bool):
        assert self.teacher is not None  # a score file's run never encodes with a teacher
        if self.teacher_cache is not None:
            return self.teacher_cache.encode(batch.query_ids, batch.queries, batch.passage_ids, batch.passages,
                                             layers, final=True)
        options = {"with_states": True} if with_states else _inputs(batch, "teacher")
        with contextlib.nullcontext() if self.teacher.trains else torch.no_grad():
            return self.teacher.forward(batch.queries, batch.passages, layers, final=True, **options)

    def _scores(self, student_enc, teacher_enc, batch):
        """Both models' scores over one candidate set, the labels, and the duplicate-positive mask."""
        assert self.teacher is not None
        student, teacher = cast(Retriever, self.student.model), cast(Retriever, self.teacher.model)
        layout = Layout.of(teacher.scores_whole_batch and student.scores_whole_batch, self.loss.in_batch_negatives,
                           self.loss.cross_process_negatives, len(batch.queries))
        if layout.gathered:
            student_enc = student_enc.gathered(with_grad=True)
            teacher_enc = teacher_enc.gathered(with_grad=self.teacher.trains)
        size = batch.group_size
        student_scores = layout.cut(student_enc.scores(), student.scores_whole_batch, size)
        teacher_scores = layout.cut(teacher_enc.scores(), teacher.scores_whole_batch, size)
        return student_scores, teacher_scores, layout.labels(batch), self._duplicates(batch, layout), {}

    def _own_group_scores(self, student_enc, teacher_enc, batch, t_layers: list[int]):
        """The own-group layout: both models over each query's own group, and the student's ground-truth
        scores and labels over its own candidates (in-batch, across processes, as its layout has them)."""
        student = cast(Retriever, self.student.model)
        layout = self._layout(student, batch)
        if layout.gathered:
            student_enc = student_enc.gathered(with_grad=True)
        size = batch.group_size
        every = student_enc.scores()
        ce_scores = layout.cut(every[-1], student.scores_whole_batch, size)
        duplicates = self._duplicates(batch, layout)
        if duplicates is not None:
            ce_scores = mask_candidates(ce_scores, duplicates)
        student_scores = own_group_scores(every, size, layout.offset) if student.scores_whole_batch else every
        if self.teacher_scores is not None:
            teacher_scores = self.teacher_scores.for_batch(batch, t_layers).to(self.device)
        else:
            assert self.teacher is not None
            teacher_scores = teacher_enc.scores()
            if cast(Retriever, self.teacher.model).scores_whole_batch:
                teacher_scores = own_group_scores(teacher_scores, size)
        own = Layout(gathered=False, offset=0, own_group=True)
        ce = {"student_ce_scores": ce_scores, "student_ce_labels": layout.labels(batch).to(ce_scores.device)}
        return student_scores, teacher_scores, own.labels(batch), self._duplicates(batch, own), ce

    def __call__(self, batch, pairs) -> dict[str, torch.Tensor]:
        cfg = self.loss
        hidden = self.hidden_mse is not None
        s_layers, t_layers, positions = pair_layers([] if hidden else pairs)
        options = {"with_states": True} if hidden else _inputs(batch, "student")
        student_enc = self.student.forward(batch.queries, batch.passages, s_layers, final=True, **options)
        teacher_enc = None if self.teacher_scores is not None else self._encode_teacher(batch, t_layers, hidden)
        if self.own_group:
            student_scores, teacher_scores, labels, duplicates, ce = self._own_group_scores(
                student_enc, teacher_enc, batch, t_layers)
        else:
            student_scores, teacher_scores, labels, duplicates, ce = self._scores(student_enc, teacher_enc, batch)
        # a tensor's mean comes back as a tensor (all_reduce_mean is typed for floats and tensors alike)
        reduce = cast("Callable[[torch.Tensor], torch.Tensor]", dist.all_reduce_mean) if dist.is_distributed() else None
        terms = lead_total_loss(
            teacher_scores, student_scores, labels.to(student_scores.device), positions,
            train_teacher=self.teacher_trains, response=cfg.response, temperature=cfg.temperature,
            layer_temperature=cfg.layer_temperature, reweight=cfg.reweight, student_weight=cfg.student_ce,
            teacher_weight=cfg.teacher_ce, response_weight=cfg.response_weight, layer_weight=cfg.layer_weight,
            detach_teacher_targets=cfg.detach_teacher_targets, reduce_layer_ce=reduce, candidate_mask=duplicates,
            **ce)
        if hidden:  # the classical baseline: projected student token states regress the teacher's
            assert teacher_enc is not None
            (sq, sq_mask, sp, sp_mask), (tq, tq_mask, tp, tp_mask) = student_enc.states, teacher_enc.states
            detach = cfg.detach_teacher_targets
            feature = (self.hidden_mse(sq, tq, pairs, sq_mask, tq_mask, detach_teacher_targets=detach)
                       + self.hidden_mse(sp, tp, pairs, sp_mask, tp_mask, detach_teacher_targets=detach))
            terms["hidden_mse"] = feature
            terms["loss"] = terms["loss"] + cfg.layer_weight * feature
        return terms


def build_objective(config: TrainConfig | DistillConfig, checkpoint: Path | None, corpus, queries, ctx,
                    total_steps: int, output: Path, log: Callable[[str], None],
                    teacher_scores: TeacherScores | None = None,
                    ) -> tuple[GroundTruth | Distillation, LayerSchedule | None]:
    """A job's objective with its models built and prepared (from ``checkpoint`` when resuming), and the
    layer schedule its layer loss draws pairs from (None without one). ``teacher_scores``: the opened
    ``teacher.scores`` file, which replaces the teacher."""
    def ready(name: str, model: nn.Module, **options: Any) -> Trained:
        return prepare(name, model, config.optim, total_steps, ctx, **options)

    if not isinstance(config, DistillConfig):
        model = build_model(config.model, str(checkpoint / "model") if checkpoint else None)
        return GroundTruth(ready("model", model, trains=True, lr=config.optim.lr), config.loss, ctx.device), None
    optim, loss = config.optim, config.loss
    if teacher_scores is not None:
        return _from_scores(config, checkpoint, teacher_scores, ready, ctx)
    teacher = build_model(config.teacher, str(checkpoint / "teacher") if checkpoint and config.teacher.train else None)
    student = build_student(config, teacher, checkpoint)
    hidden_mse = hidden_state_baseline(student, teacher, ctx) if loss.layer == "hidden_mse" else None
    raw = loss.raw_last_layer
    objective = Distillation(
        ready("student", student, trains=True, lr=optim.lr, raw_last_layer=raw, extra=hidden_mse),
        ready("teacher", teacher, trains=config.teacher.train, lr=optim.teacher_lr or optim.lr, raw_last_layer=raw),
        loss, ctx.device, hidden_mse=hidden_mse, own_group=config.teacher_own_group)
    if config.teacher.cache:
        objective.teacher_cache = open_teacher_cache(config, teacher, corpus, queries, output, ctx.rank, log)
    return objective, _layer_schedule(config, cast(Retriever, student).num_layers, teacher.num_layers)


def _layer_schedule(config: DistillConfig, student_layers: int, teacher_layers: int,
                    teacher_choices: list[int] | None = None) -> LayerSchedule | None:
    if config.loss.layer not in ("lead", "hidden_mse"):
        return None
    layers = config.layers
    return LayerSchedule(layers.strategy, student_layers, teacher_layers, k=layers.k, seed=config.seed,
                         resample_interval=layers.resample_every, pairs=layers.pairs, teacher_choices=teacher_choices)


def _from_scores(config: DistillConfig, checkpoint: Path | None, scores: TeacherScores, ready, ctx,
                 ) -> tuple[Distillation, LayerSchedule | None]:
    """The objective of a run whose teacher is a score file: the teacher model is loaded only to build the
    student from its blocks (``student.init``, not on resume) or to check it scored the file."""
    if config.teacher.path is not None:
        check_scored_by(scores, config.teacher.path)
    stored_raw = scores.meta.get("raw_last_layer", config.loss.raw_last_layer)
    if config.loss.layer == "lead" and stored_raw != config.loss.raw_last_layer:
        views = {True: "raw", False: "final"}
        raise ConfigError(f"the layer loss reads the last layer {views[config.loss.raw_last_layer]}, but "
                          f"{scores.source} stores it {views[stored_raw]}; score it with the loss's last-layer view")
    if config.loss.layer == "lead" and not scores.layers:
        raise ConfigError(f"loss.layer=lead compares teacher layers, but {scores.source} holds final scores only; "
                          "score per layer with `leadkd score-teacher --layers all`, or set loss.layer: none")
    if checkpoint is None and config.student.init_teacher_layers:
        student = build_student(config, build_model(config.teacher))
    else:
        student = build_student(config, cast(nn.Module, None), checkpoint)
    optim = config.optim
    objective = Distillation(ready("student", student, trains=True, lr=optim.lr,
                                   raw_last_layer=config.loss.raw_last_layer),
                             None, config.loss, ctx.device, teacher_scores=scores)
    schedule = _layer_schedule(config, cast(Retriever, student).num_layers, scores.teacher_layers, scores.layers)
    return objective, schedule
