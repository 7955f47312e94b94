"""Building a run: its models through the one registry, their optimizers and schedule, DDP, the teacher cache.

Everything here happens once, before the first step; :mod:`leadkd.distill.trainer` only runs what it gets.
No model kind is named: what differs between kinds is asked of the models themselves
(:class:`~leadkd.models.base.Retriever`, :class:`~leadkd.models.base.DenseRetriever`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..accel.cpu_dropout import use_cpu_dropout
from ..config import DistillConfig
from ..kinds import DEFAULT_KIND, model_class
from ..models.base import DenseRetriever, Retriever
from ..models.loading import build_model
from ..runtime.errors import ConfigError
from .losses import HiddenStateMSE, check_same_tokenizer
from .teacher_cache import TeacherVectorCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Log = Callable[[str], None]


def build_student(config: DistillConfig, teacher: nn.Module, checkpoint: Path | None = None) -> nn.Module:
    """The student: from the checkpoint being resumed, else built from a subset of the teacher's blocks
    (``student.init``), else loaded from ``student.path``."""
    if checkpoint is not None:
        return build_model(config.student, str(checkpoint / "student"))
    if config.student.init_teacher_layers:
        return student_from_teacher(teacher, config.student.init_teacher_layers, config.student)
    return build_model(config.student)


def student_from_teacher(teacher: nn.Module, layers: Sequence[int], config) -> nn.Module:
    """A student made of ``layers`` of the teacher's blocks, what ``student.init: teacher_layers=[...]``
    builds: of ``config.kind`` (a :class:`~leadkd.config.StudentConfig`; the default kind for a plain
    settings object), with the config's settings over the teacher's."""
    kind = getattr(config, "kind", DEFAULT_KIND)
    cls = model_class(kind)
    if not hasattr(cls, "from_blocks"):
        raise ConfigError(f"student.init: a {kind} student cannot be built from a teacher's blocks; give "
                          "student.path instead")
    return cls.from_blocks(teacher, tuple(layers), config)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW with biases and LayerNorm weights exempt from weight decay (the paper's grouping)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel instead of a loop of per-tensor ops: ~5x faster updates on CPU, same maths
        return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, eps=eps)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then linear decay to 0 at ``total`` (as transformers' schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EncodeForward(nn.Module):
    """One ``forward`` that encodes a whole batch with ``model.encode_batch``: the call a
    DistributedDataParallel wrapper must see to synchronise gradients."""

    def __init__(self, model: nn.Module, raw_last_layer: bool = True):
        super().__init__()
        self.model = model
        self.raw_last_layer = raw_last_layer

    def forward(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int], **options: Any):
        return cast(Retriever, self.model).encode_batch(queries, passages, layers, raw_last_layer=self.raw_last_layer,
                                                       **options)


@dataclass
class Trained:
    """One model the loop updates (or, for a frozen teacher, only runs)."""

    name: str
    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    @property
    def trains(self) -> bool:
        return self.optimizer is not None


def _checkpoint_activations(backbone: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward pass (transformers >= 5.x names it activation
    checkpointing; older versions gradient checkpointing). Non-reentrant, so the RNG state is restored."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare(name: str, model: nn.Module, optim, total_steps: int, ctx, *, trains: bool, lr: float,
            raw_last_layer: bool = True, extra: nn.Module | None = None) -> Trained:
    """Move ``model`` to the run's device and make it ready: frozen (eval, no gradients), or trained with its
    optimizer and schedule, the CPU dropout and activation checkpointing the config asks for, and DDP under
    torchrun. ``extra``: more trained parameters stepped by the same optimizer (the baseline's projections)."""
    model.to(ctx.device)
    if optim.gradient_checkpointing and trains:
        _checkpoint_activations(cast("PreTrainedModel", model.backbone))  # every kind's backbone is one
    if optim.cpu_dropout and trains and ctx.device.type == "cpu":
        use_cpu_dropout(cast(Retriever, model).backbone)
    forward: nn.Module = EncodeForward(model, raw_last_layer=raw_last_layer)
    if not trains:
        model.eval()
        model.requires_grad_(False)
        return Trained(name, model, forward)
    model.train()
    if ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
    optimizer = make_optimizer(model if extra is None else nn.ModuleList([model, extra]), lr, optim.weight_decay,
                               optim.adam_eps)
    warmup = int(optim.warmup_ratio * total_steps)
    return Trained(name, model, forward, optimizer, linear_schedule(optimizer, warmup, total_steps))


def check_dense_teacher(teacher: nn.Module, what: str) -> None:
    """``what`` (a config key and why) needs a teacher that encodes every text alone into vectors."""
    if not isinstance(teacher, DenseRetriever):
        raise ConfigError(f"{what}; a {teacher.kind} teacher does not encode each text alone into vectors")


def hidden_state_baseline(student: nn.Module, teacher: nn.Module, ctx) -> HiddenStateMSE:
    """The classical feature baseline's learned projections; it compares token states one to one, so it
    needs two dense models with one tokenizer and equal lengths, in one process."""
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, DenseRetriever):
            raise ConfigError(f"loss.layer=hidden_mse compares the token states of two dense retrievers; the {role} "
                              f"is a {model.kind} (LEAD's layer-score loss works with any teacher)")
    if ctx.is_distributed:
        raise ConfigError("loss.layer=hidden_mse is a single-process baseline (its projections are not "
                          "synchronised across processes)")
    assert isinstance(student, DenseRetriever) and isinstance(teacher, DenseRetriever)  # checked above
    check_same_tokenizer(teacher.tokenizer, student.tokenizer)
    for name in ("max_query_length", "max_passage_length"):
        if getattr(teacher, name) != getattr(student, name):
            raise ConfigError(f"loss.layer=hidden_mse needs equal {name} for teacher and student (token by "
                              f"token), got {getattr(teacher, name)} and {getattr(student, name)}")
    return HiddenStateMSE(student.hidden_size, teacher.hidden_size, student.num_layers).to(ctx.device)


def open_teacher_cache(config: DistillConfig, teacher, corpus, queries, output: Path, rank: int = 0,
                       log: Log = print) -> TeacherVectorCache:
    """The frozen teacher's vector cache of a distill run (each process in its own files: processes never
    write the same one), keyed by what its vectors depend on; the quickstart opens it to fill it ahead."""
    check_dense_teacher(teacher, "teacher.cache stores per-text vectors")
    assert config.data.corpus is not None  # a distill job requires one
    corpus_path = Path(config.data.corpus)
    fingerprint = {
        "teacher": config.teacher.path, "settings": teacher.settings(),
        "corpus": str(corpus_path.resolve()) if corpus_path.exists() else str(corpus_path),
        # the weights themselves, cheaply and device-independently: a folder rewritten in place must
        # not reuse old vectors
        "weights_sum": float(sum(p.detach().cpu().double().sum() for p in teacher.parameters()))}
    layers = None if config.loss.layer != "none" else [teacher.num_layers - 1]
    folder = Path(config.teacher.cache_dir) if config.teacher.cache_dir else Path(output) / "teacher-cache"
    return TeacherVectorCache(folder / f"rank{rank}", teacher, corpus, queries, fingerprint, layers=layers, log=log)


def world_batch_check(groups: int, batch_size: int, ctx, source: str) -> None:
    """At least one global batch of usable groups, or a one-line error naming the groups file."""
    if groups < batch_size * ctx.world_size:
        raise ConfigError(f"{source}: {groups} usable groups, fewer than one global batch ({batch_size} x "
                          f"{ctx.world_size} processes)")

