"""The training loop of `leadkd train` (one model on ground truth) and `leadkd distill` (LEAD).

Read it top to bottom: build the models, optimizers and data; then each step draws the layer pairs,
encodes the batch with every model, gathers candidates across processes, scores, computes the pure
losses of :mod:`leadkd.distill.losses`, and steps each trained model's optimizer; checkpoints, dev
evaluation and logs happen between steps. A single process and ``torchrun`` run the same code.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..config import DistillConfig, TrainConfig, changed_settings, load_config, save_config
from ..errors import ConfigError, LeadkdError
from ..models.cpu_dropout import use_cpu_dropout
from .checkpoint import list_checkpoints, newest_checkpoint, rng_state, save_checkpoint, set_rng_state
from .layers import LayerSchedule
from .losses import contrastive_loss, group_labels, lead_total_loss, mask_candidates, own_group_scores
from .views import EncodeForward, duplicate_positives, gather_passages, gathers_candidates, score

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------- models

def load_model_for(config, path: str | None = None):
    """A model of ``config.kind`` from ``path`` (default ``config.path``) with the config's overrides."""
    from ..models.colbert import ColBERT
    from ..models.cross_encoder import CrossEncoder
    from ..models.dual_encoder import DualEncoder

    path = path or config.path
    # Strict loading (no partial loads); pickled weights only where the config opts in.
    common = {"trust_remote_code": config.trust_remote_code, "use_safetensors": config.use_safetensors}
    if config.kind == "dual_encoder":
        return DualEncoder.from_pretrained(path, pooling=config.pooling, normalize=config.normalize,
                                           max_query_length=config.max_query_length,
                                           max_passage_length=config.max_passage_length,
                                           similarity_scale=config.similarity_scale, **common)
    lengths = {key: value for key, value in (("max_query_length", config.max_query_length),
                                             ("max_passage_length", config.max_passage_length)) if value}
    if config.kind == "colbert":
        width = {} if config.colbert_dim is None else {"dim": config.colbert_dim or None}
        return ColBERT.from_pretrained(path, **lengths, **width, **common)
    if config.kind == "cross_encoder":
        length = config.max_passage_length
        segments = {} if config.token_type_ids is None else {"use_token_type_ids": config.token_type_ids}
        return CrossEncoder.from_pretrained(path, **({"max_length": length} if length else {}), **segments,
                                            **common)
    raise ConfigError(f"unknown model kind {config.kind!r}")


def _checkpoint_activations(backbone: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (transformers >= 5.x names it activation
    checkpointing; older versions gradient checkpointing). Non-reentrant, so the RNG state is restored."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def backbone_of(model: nn.Module) -> nn.Module:
    """The Hugging Face encoder inside any leadkd model."""
    return getattr(model, "backbone", None) or model.model


def student_from_teacher(teacher: nn.Module, layers: tuple[int, ...], config) -> nn.Module:
    """A dual-encoder student made of a subset of the teacher's blocks (DistilBERT/PROD-style init)."""
    from ..models.dual_encoder import DEFAULTS, DualEncoder
    from ..models.surgery import keep_layers

    settings = dict(DEFAULTS)
    if teacher.kind == "dual_encoder":
        settings.update(teacher.settings())
    overrides = {"pooling": config.pooling, "normalize": config.normalize,
                 "max_query_length": config.max_query_length, "max_passage_length": config.max_passage_length,
                 "similarity_scale": getattr(config, "similarity_scale", None)}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return DualEncoder(keep_layers(backbone_of(teacher), layers), teacher.tokenizer, **settings)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW with biases and LayerNorm weights exempt from weight decay (the paper's grouping)."""
    decay, no_decay = [], []
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


# ---------------------------------------------------------------------------------------- trainer

@dataclass
class StepResult:
    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    pair_kl: list[float] = field(default_factory=list)
    skipped: bool = False  # the loss was NaN/inf and ``optim.skip_non_finite`` let the update be dropped


class Trainer:
    """Runs one `train` or `distill` job described by a validated config."""

    def __init__(self, config: TrainConfig | DistillConfig, resume: bool = False, log: Log | None = None,
                 show_progress: bool = True):
        self.config = config
        self.distill = isinstance(config, DistillConfig)
        self.ctx = dist.init_distributed(timeout_s=config.ddp_timeout)
        self.log = log or (lambda message: print(message, flush=True))
        self.show_progress = show_progress and self.ctx.is_main
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.total_steps = int(config.optim.steps)
        self.step = 0
        self.non_finite_in_a_row = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already consumed
        self.best: dict[str, Any] = {}
        resumed = newest_checkpoint(self.checkpoints) if resume else None
        if resume and resumed is None and self.checkpoints.is_dir():
            self._say(f"no checkpoint under {self.checkpoints}; starting from the beginning")
        self._check_output(resume, resumed[0] if resumed else None)
        self._build(resumed)

    def _check_output(self, resume: bool, resumed_from: Path | None) -> None:
        """Never overwrite a run by accident, and never resume one under different settings.

        A fresh start in a folder that holds checkpoints would replace them one by one; resuming with, say,
        another ``optim.steps`` would silently bend the learning-rate schedule of the steps already taken.
        """
        if not resume and list_checkpoints(self.checkpoints):
            raise ConfigError(f"{self.output}: holds checkpoints of an earlier run; pass --resume to continue "
                              "it, or choose another output_dir")
        saved = self.output / "config.yaml"
        if resumed_from is not None and saved.is_file():
            try:
                before = load_config(saved, kind="distill" if self.distill else "train")
            except ConfigError as exc:  # written by another leadkd version: nothing reliable to compare with
                self._say(f"warning: cannot compare with the saved settings ({exc})")
                return
            changed = changed_settings(before, self.config)
            if changed:
                start = self.output / "final" if (self.output / "final").is_dir() else resumed_from
                raise ConfigError(f"{saved}: the run being resumed used other settings ({'; '.join(changed)}); "
                                  f"resume with the same settings, or start a new output_dir from {start}")

    # ------------------------------------------------------------------ building
    def _say(self, message: str) -> None:
        if self.ctx.is_main:
            self.log(message)

    def _build(self, resumed) -> None:
        from ..data.datasets import load_corpus, load_queries
        from ..data.groups import GroupDataset, group_loader, read_training_groups

        cfg = self.config
        torch.manual_seed(cfg.seed + self.ctx.rank)
        if self.ctx.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
        corpus, queries = load_corpus(cfg.data.corpus), load_queries(cfg.data.corpus)
        groups = read_training_groups(cfg.data.train_groups, corpus=corpus, queries=queries)
        self.corpus_spec, self.corpus = cfg.data.corpus, corpus  # the groups hold it anyway; evaluation reuses it
        self.dataset = GroupDataset(groups, negatives=cfg.data.num_negatives, seed=cfg.seed,
                                    random_positive=cfg.data.shuffle_positives)
        per_step = cfg.optim.batch_size * self.ctx.world_size
        if len(self.dataset) < per_step:
            raise ConfigError(f"{cfg.data.train_groups}: {len(self.dataset)} usable groups, fewer than one global "
                              f"batch ({cfg.optim.batch_size} x {self.ctx.world_size} processes)")
        self.loader = group_loader(self.dataset, cfg.optim.batch_size, rank=self.ctx.rank,
                                   world_size=self.ctx.world_size, seed=cfg.seed)
        ckpt = resumed[0] if resumed else None
        self.models: dict[str, Trained] = {}
        self.teacher_cache = None
        if self.distill:
            self._build_distill(ckpt)
            if cfg.teacher.cache:
                self.teacher_cache = self._teacher_cache(corpus, queries)
        else:
            model = load_model_for(cfg.model, str(ckpt / "model") if ckpt else None)
            self.models["model"] = self._wrap("model", model, trains=True, lr=cfg.optim.lr)
        self.schedule = None
        if self.distill and cfg.loss.layer in ("lead", "hidden_mse"):
            student, teacher = self.models["student"].model, self.models["teacher"].model
            self.schedule = LayerSchedule(cfg.layers.strategy, student.num_layers, teacher.num_layers,
                                          k=cfg.layers.k, seed=cfg.seed, resample_interval=cfg.layers.resample_every,
                                          pairs=cfg.layers.pairs)
        if resumed:
            self._restore(resumed[1])
            self._say(f"resumed from {ckpt} at step {self.step}")

    def _build_distill(self, ckpt: Path | None) -> None:
        cfg = self.config
        self.hidden_mse = None
        teacher_path = str(ckpt / "teacher") if ckpt and cfg.teacher.train else None
        teacher = load_model_for(cfg.teacher, teacher_path)
        if ckpt:
            student = load_model_for(cfg.student, str(ckpt / "student"))
        elif cfg.student.init_teacher_layers:
            student = student_from_teacher(teacher, cfg.student.init_teacher_layers, cfg.student)
        else:
            student = load_model_for(cfg.student)
        if student.kind != "dual_encoder":
            raise ConfigError(f"student.kind: the student must be a dual_encoder, got {student.kind!r}")
        if cfg.loss.layer == "hidden_mse":
            self.hidden_mse = self._hidden_mse_baseline(student, teacher)
        self.models["student"] = self._wrap("student", student, trains=True, lr=cfg.optim.lr, extra=self.hidden_mse)
        self.models["teacher"] = self._wrap("teacher", teacher, trains=cfg.teacher.train,
                                            lr=cfg.optim.teacher_lr or cfg.optim.lr)

    def _teacher_cache(self, corpus, queries):
        return open_teacher_cache(self.config, self.models["teacher"].model, corpus, queries, self.output,
                                  self.ctx.rank, self.log)

    def _hidden_mse_baseline(self, student: nn.Module, teacher: nn.Module) -> nn.Module:
        """The classical feature baseline's learned projections; it needs one shared tokenizer."""
        from .losses import HiddenStateMSE, check_same_tokenizer

        if teacher.kind != "dual_encoder":
            raise ConfigError("loss.layer=hidden_mse compares dual-encoder token states; the teacher is a "
                              f"{teacher.kind} (LEAD's layer-score loss works with any teacher)")
        if self.ctx.is_distributed:
            raise ConfigError("loss.layer=hidden_mse is a single-process baseline (its projections are not "
                              "synchronised across processes)")
        check_same_tokenizer(teacher.tokenizer, student.tokenizer)
        for name in ("max_query_length", "max_passage_length"):
            if getattr(teacher, name) != getattr(student, name):
                raise ConfigError(f"loss.layer=hidden_mse needs equal {name} for teacher and student (token by "
                                  f"token), got {getattr(teacher, name)} and {getattr(student, name)}")
        return HiddenStateMSE(student.hidden_size, teacher.hidden_size, student.num_layers).to(self.ctx.device)

    def _wrap(self, name: str, model: nn.Module, trains: bool, lr: float, extra: nn.Module | None = None) -> Trained:
        cfg = self.config.optim
        model.to(self.ctx.device)
        if cfg.gradient_checkpointing and trains:
            _checkpoint_activations(backbone_of(model))
        if cfg.cpu_dropout and trains and self.ctx.device.type == "cpu":
            use_cpu_dropout(backbone_of(model))
        last_layer_view = self.config.loss.colbert_last_layer if self.distill else "raw"  # train: finals only
        forward: nn.Module = EncodeForward(model, raw_last_layer=last_layer_view == "raw")
        if not trains:
            model.eval()
            model.requires_grad_(False)
            return Trained(name, model, forward)
        model.train()
        if self.ctx.is_distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
        optimizer = make_optimizer(model if extra is None else nn.ModuleList([model, extra]), lr, cfg.weight_decay,
                                   cfg.adam_eps)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        return Trained(name, model, forward, optimizer, linear_schedule(optimizer, warmup, self.total_steps))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "best": dict(self.best),
                 "non_finite_in_a_row": self.non_finite_in_a_row,
                 "world_size": self.ctx.world_size, "rng": rng_state(),
                 "optimizers": {n: t.optimizer.state_dict() for n, t in self.models.items() if t.trains},
                 "schedulers": {n: t.scheduler.state_dict() for n, t in self.models.items() if t.trains}}
        if self.schedule is not None:
            state["layers"] = self.schedule.state_dict()
        if getattr(self, "hidden_mse", None) is not None:
            state["hidden_mse"] = self.hidden_mse.state_dict()
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.ctx.world_size:
            raise LeadkdError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                              f"{self.ctx.world_size}; resume with the same number")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best = dict(state["best"])
        self.non_finite_in_a_row = int(state.get("non_finite_in_a_row", 0))
        for name, trained in self.models.items():
            if trained.trains:
                trained.optimizer.load_state_dict(state["optimizers"][name])
                trained.scheduler.load_state_dict(state["schedulers"][name])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["layers"])
        if getattr(self, "hidden_mse", None) is not None:
            self.hidden_mse.load_state_dict(state["hidden_mse"])
        set_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; everyone waits)."""
        path = None
        if self.ctx.is_main:
            models = {n: t.model for n, t in self.models.items() if t.trains}
            path = save_checkpoint(self.checkpoints, self.step, models, self.state_dict(),
                                   keep_last=self.config.checkpoint.keep_last)
        self.ctx.barrier()
        return path

    # ------------------------------------------------------------------ data
    def _batches(self) -> Iterator[Any]:
        """Batches forever, from the saved (epoch, position); every epoch reshuffled via set_epoch."""
        while True:
            self.loader.sampler.set_epoch(self.epoch)
            for index, batch in enumerate(self.loader):
                if index < self.position:
                    continue  # resumed mid-epoch: the same batches as before, skipped cheaply
                self.position = index + 1
                yield batch
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------ one step
    def _layers_for(self, pairs: list[tuple[int, int]]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Student and teacher layers the pairs need (each encode appends its final score slice after
        them), and the pairs as positions into those lists."""
        s_layers, t_layers = sorted({s for s, _ in pairs}), sorted({t for _, t in pairs})
        positions = [(s_layers.index(s), t_layers.index(t)) for s, t in pairs]
        return s_layers, t_layers, positions

    def _candidates(self, student_enc, teacher_enc, batch, teacher_kind: str, in_batch: bool, cross: bool):
        """Scores of both models over one candidate set, each query's positive column in it, and the mask
        of the copies of its judged positives among the candidates (None when there are none)."""
        size, count = batch.group_size, len(batch.queries)
        whole_batch, gathered, offset, own_group = self._layout(teacher_kind, in_batch, cross, count)
        if gathered:
            student_enc = gather_passages(student_enc, "dual_encoder", with_grad=True)
            teacher_enc = gather_passages(teacher_enc, teacher_kind, with_grad=self.models["teacher"].trains)
        student_scores, teacher_scores = score(student_enc, "dual_encoder"), score(teacher_enc, teacher_kind)
        if own_group:
            student_scores = own_group_scores(student_scores, size, offset)
            if whole_batch:
                teacher_scores = own_group_scores(teacher_scores, size, offset)
        labels = group_labels(count, size, in_batch=not own_group, query_offset=offset)
        return student_scores, teacher_scores, labels, self._duplicate_positives(batch, gathered, own_group, offset)

    def _layout(self, kind: str, in_batch: bool, cross: bool, count: int) -> tuple[bool, bool, int, bool]:
        """The candidate layout (spec §2.3): whether ``kind`` scores the whole batch (else each query's own
        group: a cross-encoder), whether passages are gathered across processes, the local queries'
        offset among all queries, and whether scores are cut to each query's own group."""
        whole_batch = gathers_candidates(kind)
        gathered = whole_batch and cross and self.ctx.is_distributed
        return whole_batch, gathered, self.ctx.rank * count if gathered else 0, not (whole_batch and in_batch)

    def _duplicate_positives(self, batch, gathered: bool, own_group: bool, offset: int) -> torch.Tensor | None:
        if not self.config.loss.mask_duplicate_positives:
            return None
        mask = duplicate_positives(batch, gathered, own_group, offset)
        return None if mask is None else mask.to(self.ctx.device)

    def _distill_loss(self, batch, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        cfg = self.config.loss
        student, teacher = self.models["student"], self.models["teacher"]
        hidden = self.hidden_mse is not None
        s_layers, t_layers, positions = self._layers_for([] if hidden else pairs)
        student_enc = student.forward(batch.queries, batch.passages, s_layers, with_states=hidden, final=True)
        if self.teacher_cache is not None:
            teacher_enc = self.teacher_cache.encode(batch.query_ids, batch.queries, batch.passage_ids,
                                                    batch.passages, t_layers, final=True)
        else:
            with contextlib.nullcontext() if teacher.trains else torch.no_grad():
                teacher_enc = teacher.forward(batch.queries, batch.passages, t_layers, with_states=hidden,
                                              final=True)
        student_scores, teacher_scores, labels, duplicates = self._candidates(
            student_enc, teacher_enc, batch, teacher.model.kind, cfg.in_batch_negatives, cfg.cross_process_negatives)
        reduce = dist.all_reduce_mean if self.ctx.is_distributed else None
        terms = lead_total_loss(
            teacher_scores, student_scores, labels.to(student_scores.device), positions,
            train_teacher=teacher.trains, response=cfg.response, temperature=cfg.temperature,
            layer_temperature=cfg.layer_temperature, reweight=cfg.reweight, student_weight=cfg.student_ce,
            teacher_weight=cfg.teacher_ce, response_weight=cfg.response_weight, layer_weight=cfg.layer_weight,
            detach_teacher_targets=cfg.detach_teacher_targets, reduce_layer_ce=reduce, candidate_mask=duplicates)
        if hidden:  # the classical baseline: projected student token states regress the teacher's
            (sq, sq_mask, sp, sp_mask), (tq, tq_mask, tp, tp_mask) = student_enc.states, teacher_enc.states
            detach = cfg.detach_teacher_targets
            feature = (self.hidden_mse(sq, tq, pairs, sq_mask, tq_mask, detach_teacher_targets=detach)
                       + self.hidden_mse(sp, tp, pairs, sp_mask, tp_mask, detach_teacher_targets=detach))
            terms["hidden_mse"] = feature
            terms["loss"] = terms["loss"] + cfg.layer_weight * feature
        return terms

    def _train_loss(self, batch) -> dict[str, torch.Tensor]:
        cfg = self.config.loss
        trained = self.models["model"]
        kind = trained.model.kind
        encoded = trained.forward(batch.queries, batch.passages, [], final=True)
        size, count = batch.group_size, len(batch.queries)
        whole_batch, gathered, offset, own_group = self._layout(kind, cfg.in_batch_negatives,
                                                                cfg.cross_process_negatives, count)
        if gathered:
            encoded = gather_passages(encoded, kind, with_grad=True)
        scores = score(encoded, kind)[-1]
        if own_group and whole_batch:
            scores = own_group_scores(scores, size, offset)
        labels = group_labels(count, size, in_batch=not own_group, query_offset=offset)
        duplicates = self._duplicate_positives(batch, gathered, own_group, offset)
        if duplicates is not None:
            scores = mask_candidates(scores, duplicates)
        loss = contrastive_loss(scores, labels.to(scores.device))
        return {"loss": loss, "ce": loss}

    def train_step(self) -> StepResult:
        """One optimizer step (over ``grad_accum`` micro-batches) of every trained model."""
        cfg = self.config.optim
        pairs = self.schedule.pairs_for_step(self.step) if self.schedule is not None else []
        trained = [t for t in self.models.values() if t.trains]
        totals: dict[str, float] = {}
        weights = pair_kl = None
        autocast = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        for micro in range(cfg.grad_accum):
            batch = next(self._iterator)
            last = micro == cfg.grad_accum - 1
            syncs = [t.forward.no_sync() for t in trained
                     if not last and isinstance(t.forward, nn.parallel.DistributedDataParallel)]
            with contextlib.ExitStack() as stack:
                for sync in syncs:
                    stack.enter_context(sync)
                with autocast:
                    terms = self._distill_loss(batch, pairs) if self.distill else self._train_loss(batch)
                loss = terms["loss"]
                if not self._all_finite(loss):
                    return self._skip_step(loss, trained)
                (loss / cfg.grad_accum).backward()
            for name, value in terms.items():
                if value.dim() == 0:
                    totals[name] = totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            weights, pair_kl = terms.get("layer_weights"), terms.get("layer_pair_kl")
        self.non_finite_in_a_row = 0
        for t in trained:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ctx.is_distributed:
            totals = {name: dist.all_reduce_mean(value) for name, value in totals.items()}
        return StepResult(loss=totals["loss"], terms=totals, pairs=list(pairs),
                          weights=[] if weights is None else [float(w) for w in weights],
                          pair_kl=[] if pair_kl is None else [float(k) for k in pair_kl])

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite; all ranks must agree before any skips a backward."""
        finite = bool(torch.isfinite(loss.detach()))
        if self.ctx.is_distributed:  # so that every rank stops (or skips) together instead of hanging
            finite = dist.all_reduce_mean(float(finite)) == 1.0
        return finite

    def _skip_step(self, loss: torch.Tensor, trained: list) -> StepResult:
        """Drop this step's update (or stop the run, naming the step and the last good checkpoint).

        A skipped step still counts, and the schedulers still advance, so a run keeps its length and
        learning-rate curve; too many non-finite batches in a row mean the model itself is broken.
        """
        self.non_finite_in_a_row += 1
        if self.non_finite_in_a_row > self.config.optim.skip_non_finite:
            last = newest_checkpoint(self.checkpoints)
            where = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written yet"
            tried = (f" after skipping {self.non_finite_in_a_row - 1} such batches in a row"
                     if self.config.optim.skip_non_finite else "")
            raise LeadkdError(f"the loss became {float(loss.detach())} at step {self.step + 1}{tried}; {where}")
        self._say(f"step {self.step + 1}: loss {float(loss.detach())}, update skipped "
                  f"({self.non_finite_in_a_row} in a row, optim.skip_non_finite={self.config.optim.skip_non_finite})")
        with warnings.catch_warnings():  # scheduler before optimizer is the point here
            warnings.simplefilter("ignore", UserWarning)
            for t in trained:
                t.optimizer.zero_grad(set_to_none=True)
                t.scheduler.step()
        self.step += 1
        return StepResult(loss=float("nan"), skipped=True)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float] | None:
        """Dev-split retrieval quality of the (student) dual encoder, on rank 0 (every process encodes a
        share of the corpus); None on the other ranks and where there is nothing to run."""
        cfg = self.config.eval
        model = self.models["student" if self.distill else "model"].model
        if cfg.split is None or model.kind != "dual_encoder":
            return None
        return evaluate_retriever(model, self.corpus_spec, cfg.split, cfg.metric, cfg.k, cfg.max_queries,
                                  corpus=self.corpus)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``optim.steps``; returns the final and best dev metrics (if any)."""
        cfg = self.config
        if self.step >= self.total_steps and (self.output / "final").is_dir():
            self._say(f"{self.output} already finished at step {self.step}; nothing to do")
            return {"final": None, "best": self.best}
        self._iterator = self._batches()
        log_file = self.output / "metrics.jsonl"
        if self.ctx.is_main:
            _truncate_log(log_file, self.step)
        if self.step == 0 and cfg.eval.split is not None and cfg.eval.at_start:
            self._eval_and_keep_best(log_file)  # the starting model competes for best/ too
        progress = contextlib.nullcontext()
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="distill" if self.distill else "train",
                            unit="step")
        with progress:  # closed before an error is printed, so the error stays the last line
            self._steps(progress if self.show_progress else None, log_file)
        final = self._eval_and_keep_best(log_file)
        self.save()
        self._save_final()
        return {"final": final, "best": self.best}

    def _steps(self, progress, log_file: Path) -> None:
        """Train steps up to ``optim.steps``, logging, evaluating and checkpointing on their schedules."""
        cfg = self.config
        started = time.perf_counter()
        while self.step < self.total_steps:
            result = self.train_step()
            record = {"step": self.step, "epoch": self.epoch, "loss": None if result.skipped else result.loss,
                      **result.terms, **({"skipped": True} if result.skipped else {}),
                      "lr": {n: t.scheduler.get_last_lr()[0] for n, t in self.models.items() if t.trains},
                      "seconds": round(time.perf_counter() - started, 3)}
            if result.pairs:
                record.update(pairs=result.pairs, layer_weights=result.weights, layer_pair_kl=result.pair_kl)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._write(log_file, record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss="skipped" if result.skipped else f"{result.loss:.4f}")
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                self._eval_and_keep_best(log_file)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.total_steps:
                self.save()

    def _eval_and_keep_best(self, log_file: Path) -> dict[str, float] | None:
        started = time.perf_counter()
        result = self.evaluate()
        if result is None or not self.ctx.is_main:
            return result
        metric = self.config.eval.metric
        self._write(log_file, {"step": self.step, "eval": result, "eval_seconds": round(time.perf_counter() - started, 1)})
        self._say(f"step {self.step}: dev {metric} = {result[metric]:.4f}")
        if not self.best or result[metric] > self.best["value"]:
            self.best = {"step": self.step, "value": result[metric], "metric": metric}
            self.models["student" if self.distill else "model"].model.save_pretrained(self.output / "best")
        return result

    def _save_final(self) -> None:
        if not self.ctx.is_main:
            return
        for name, trained in self.models.items():
            if trained.trains:
                trained.model.save_pretrained(self.output / ("final" if name in ("student", "model") else f"final-{name}"))
        self._say(f"wrote {self.output / 'final'}" + (f"; best dev step {self.best['step']} in {self.output / 'best'}"
                                                      if self.best else ""))

    def _write(self, log_file: Path, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        """Mirror the JSONL log to TensorBoard when it is installed (optional; never required)."""
        if not hasattr(self, "_board"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._board = SummaryWriter(str(self.output / "tensorboard"))
            except ImportError:
                self._board = None
        if self._board is None:
            return
        step = record["step"]
        for name, value in {**record.get("eval", {}), **record}.items():
            if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                self._board.add_scalar(("dev/" if name in record.get("eval", {}) else "train/") + name, value, step)
        for k, weight in enumerate(record.get("layer_weights", [])):
            self._board.add_scalar(f"layers/weight_{k}", weight, step)
        self._board.flush()

    def close(self) -> None:
        if getattr(self, "_board", None) is not None:
            self._board.close()
        if getattr(self, "teacher_cache", None) is not None:
            self.teacher_cache.close()
        self.ctx.cleanup()


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we resumed from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    from ..fileio import atomic_write

    with atomic_write(path) as handle:  # a crash here must not lose the log
        handle.write("".join(f"{line}\n" for line in kept))


def open_teacher_cache(config: DistillConfig, teacher, corpus, queries, output: Path, rank: int = 0, log: Log = print):
    """The frozen teacher's vector cache of a distill run (each process in its own files: processes never
    write the same one), keyed by what its vectors depend on; the quickstart opens it to fill it ahead."""
    from .teacher_cache import TeacherVectorCache

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


def evaluate_retriever(model, corpus_spec: str, split: str, metric: str = "nDCG@10", k: int = 100,
                       max_queries: int | None = None, corpus=None) -> dict[str, float] | None:
    """Full-corpus retrieval of a split's queries by a dual encoder, scored with ir-measures.

    Under torchrun every process encodes and searches its own contiguous share of the corpus, and rank 0
    merges the shares' top-k lists and scores them: evaluation then takes 1/processes of the time, with
    no process idling at a barrier. Returns the measures on rank 0, None on the others. ``corpus``: the
    corpus already loaded from ``corpus_spec``, so it is not read again.
    """
    from ..data.datasets import load_dataset
    from ..evaluate import evaluate
    from ..retrieval.pipeline import encode_queries
    from ..retrieval.search import exact_search, merge_top_k, to_run

    dataset = load_dataset(corpus_spec, split=split, corpus=corpus)
    queries, qrels, corpus = dataset.queries, dataset.qrels, dataset.corpus
    if max_queries and len(queries) > max_queries:
        queries = queries.subset(range(max_queries))
        keep = {queries.id_at(i) for i in range(len(queries))}
        qrels = type(qrels)({q: d for q, d in qrels.items() if q in keep})
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * len(corpus) // world, (rank + 1) * len(corpus) // world
    query_embeddings = encode_queries(model, queries, show_progress=False)
    share = model.encode_passages(corpus.passages(range(lo, hi)), batch_size=32)
    scores, indices = exact_search(query_embeddings.vectors, share, k)  # [Q, 0] for an empty share
    parts = dist.gather_object((scores, np.where(indices >= 0, indices + lo, -1)))
    if parts is None:
        return None
    run = to_run(query_embeddings.ids, corpus.ids, *merge_top_k(parts, k))
    measures = [metric] + [m for m in ("R@100",) if m != metric]
    aggregate, _ = evaluate(run, qrels, measures=measures)
    return aggregate


def run_job(config: TrainConfig | DistillConfig, resume: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Build a trainer, train, clean up — what `leadkd train` and `leadkd distill` call."""
    trainer = Trainer(config, resume=resume, log=log)
    try:
        return trainer.fit()
    finally:
        trainer.close()

