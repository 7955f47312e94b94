"""The training loop of `leadkd train` (one model on ground truth) and `leadkd distill` (LEAD).

Read it top to bottom: :func:`~leadkd.distill.objectives.build_objective` builds the run's objective with
its models, optimizers and DDP (through :mod:`~leadkd.distill.build`); each step draws the layer pairs and
calls the objective (ground truth, or distillation), which encodes, gathers, scores and returns the pure
losses' terms; then each trained model's optimizer steps. Checkpoints, dev evaluation and logs happen
between steps; a stop on a signal is one question per step (:class:`~leadkd.runtime.stopping.StepBoundaryStop`).
A single process and ``torchrun`` run the same code, and the loop never asks what kind of model it holds.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..accel import cuda
from ..config import DistillConfig, TrainConfig, save_config
from ..data.batches import GroupDataset, group_loader
from ..data.datasets import load_corpus, load_queries
from ..data.groups import read_training_groups
from ..models.base import DenseRetriever, Retriever
from ..models.model_card import write_model_card
from ..retrieval.pipeline import evaluate_retriever
from ..runtime import distributed as dist
from ..runtime.errors import LeadkdError
from ..runtime.stopping import Interrupted, StepBoundaryStop, Stopped
from .build import Trained, world_batch_check
from .checkpoint import (
    check_resumable,
    checkpoint_name,
    list_checkpoints,
    newest_checkpoint,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .metrics_log import MetricsLog
from .non_finite import NonFiniteCount, skips_on_the_device, step_unless
from .objectives import build_objective
from .teacher_scores import open_teacher_scores

Log = Callable[[str], None]

#: ``data.workers`` unset on a CUDA host: at MS MARCO's passage lengths one worker tokenises ~2,800 passages/s
#: (a dual-encoder student and a ColBERT teacher, benchmarks/host_overhead.py); an H200 step of the GPU
#: benchmark's shapes needs ~7,500/s. On a CPU host 0: the model's own threads use every core.
CUDA_WORKERS = 4


# ---------------------------------------------------------------------------------------- trainer

@dataclass
class StepResult:
    """One optimizer step's figures, kept on the device: reading them (``loss``, ``terms``, ``host()``) waits
    for the step, so the loop reads them at log steps only."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)  # the scalar terms, "loss" among them
    pairs: list[tuple[int, int]] = field(default_factory=list)
    weights: torch.Tensor | None = None
    pair_kl: torch.Tensor | None = None
    finite: torch.Tensor | bool = True  # False: the loss was NaN/inf and the update was dropped

    @property
    def skipped(self) -> bool:
        return not bool(self.finite)

    @property
    def loss(self) -> float:
        return float("nan") if self.skipped else float(self.values["loss"])

    @property
    def terms(self) -> dict[str, float]:
        return self.host()["terms"]

    def host(self) -> dict[str, Any]:
        """Everything as Python numbers, in one device-to-host transfer."""
        parts = [torch.stack(list(self.values.values())).double()] if self.values else []
        parts += [t.detach().double().reshape(-1) for t in (self.weights, self.pair_kl) if t is not None]
        flat = torch.cat(parts).tolist() if parts else []
        terms = dict(zip(self.values, flat, strict=False))
        rest = flat[len(self.values):]
        weights = rest[:len(self.weights)] if self.weights is not None else []
        pair_kl = rest[len(weights):] if self.pair_kl is not None else []
        return {"terms": terms, "weights": weights, "pair_kl": pair_kl}


class Trainer:
    """Runs one `train` or `distill` job described by a validated config."""

    def __init__(self, config: TrainConfig | DistillConfig, resume: bool = False, log: Log | None = None,
                 show_progress: bool = True):
        # validate_config requires these; they default to unset only so that sections can be built in code
        assert config.output_dir is not None and config.optim.steps is not None
        self.config = config
        self.ctx = dist.init_distributed(timeout_s=config.ddp_timeout)
        if self.ctx.device.type == "cuda":  # each step tokenises its batch on the host, whose cores are idle
            cuda.use_parallel_tokenizers()
        self.log = log or (lambda message: print(message, flush=True))
        self.show_progress = show_progress and self.ctx.is_main
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.metrics = MetricsLog(self.output, self.ctx.is_main)
        self.stop = StepBoundaryStop(self.ctx, lambda: self.step, self._newest_for_resume)
        self.total_steps = int(config.optim.steps)
        self.step = 0
        self._saved_at: int | None = None
        self.non_finite = NonFiniteCount(config.optim.skip_non_finite, self.ctx.device)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already consumed
        self.best: dict[str, Any] = {}
        if self.ctx.is_main and (removed := remove_leftovers(self.output)):
            self._say(f"removed {len(removed)} unfinished write(s) of an interrupted run: "
                      + ", ".join(str(path) for path in removed))
        resumed = newest_checkpoint(self.checkpoints) if resume else None
        if resume and resumed is None and self.checkpoints.is_dir():
            self._say(f"no checkpoint under {self.checkpoints}; starting from the beginning")
        check_resumable(self.output, config, resume, resumed[0] if resumed else None, self._say)
        self._build(resumed)

    # ------------------------------------------------------------------ building
    @property
    def _job(self) -> str:
        return "distill" if isinstance(self.config, DistillConfig) else "train"

    def _say(self, message: str) -> None:
        if self.ctx.is_main:
            self.log(message)

    def _build(self, resumed) -> None:
        cfg = self.config
        assert cfg.data.corpus is not None and cfg.data.train_groups is not None  # required (validate_config)
        torch.manual_seed(cfg.seed + self.ctx.rank)
        if self.ctx.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
        corpus, queries = load_corpus(cfg.data.corpus), load_queries(cfg.data.corpus)
        groups = read_training_groups(cfg.data.train_groups, corpus=corpus, queries=queries)
        self.corpus_spec, self.corpus = cfg.data.corpus, corpus  # the groups hold it anyway; evaluation reuses it
        scores = None
        if isinstance(cfg, DistillConfig) and cfg.teacher.scores:  # negatives come from those it holds
            scores = open_teacher_scores(cfg.teacher.scores, groups, cfg.data.train_groups)
        self.dataset = GroupDataset(groups, negatives=cfg.data.num_negatives, seed=cfg.seed,
                                    random_positive=cfg.data.shuffle_positives,
                                    negative_pool=scores.negatives if scores is not None else None)
        world_batch_check(len(self.dataset), cfg.optim.batch_size, self.ctx, cfg.data.train_groups)
        ckpt = resumed[0] if resumed else None
        self.objective, self.schedule = build_objective(cfg, ckpt, corpus, queries, self.ctx, self.total_steps,
                                                        self.output, self.log, scores)
        self.models, self.evaluated = self.objective.models, self.objective.evaluated
        self.loader = self._loader()
        # Fused AdamW (build.make_optimizer's choice) drops a non-finite update itself: no per-step host check.
        self._skips_on_device = all(skips_on_the_device(_optimizer(t)) for t in self.models.values() if t.trains)
        self.evaluates = cfg.eval.split is not None and isinstance(self.evaluated.model, DenseRetriever)
        if cfg.eval.split is not None and not self.evaluates:
            self._say(f"eval.split: dev evaluation searches the corpus with dense vectors, which a "
                      f"{self.evaluated.model.kind} does not have; no dev evaluation")
        if resumed:
            self._restore(resumed[1])
            self._say(f"resumed from {ckpt} at step {self.step}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "best": dict(self.best),
                 "non_finite_in_a_row": self.non_finite_in_a_row,
                 "world_size": self.ctx.world_size, "rng": rng_state(),
                 "optimizers": {n: _optimizer(t).state_dict() for n, t in self.models.items() if t.trains},
                 "schedulers": {n: t.scheduler.state_dict() for n, t in self.models.items() if t.trains}}
        if self.schedule is not None:
            state["layers"] = self.schedule.state_dict()
        if (hidden_mse := getattr(self.objective, "hidden_mse", None)) is not None:
            state["hidden_mse"] = hidden_mse.state_dict()
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.ctx.world_size:
            raise LeadkdError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                              f"{self.ctx.world_size}; resume with the same number")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best = dict(state["best"])
        self.non_finite = NonFiniteCount(self.config.optim.skip_non_finite, self.ctx.device,
                                         in_a_row=int(state.get("non_finite_in_a_row", 0)))
        for name, trained in self.models.items():
            if trained.trains:
                _optimizer(trained).load_state_dict(state["optimizers"][name])
                trained.scheduler.load_state_dict(state["schedulers"][name])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["layers"])
        if (hidden_mse := getattr(self.objective, "hidden_mse", None)) is not None:
            hidden_mse.load_state_dict(state["hidden_mse"])
        by_rank = state.get("rng_by_rank")  # absent in checkpoints of a single process (and older ones)
        set_rng_state(by_rank[self.ctx.rank] if by_rank and len(by_rank) == self.ctx.world_size else state["rng"])

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; everyone waits)."""
        path = None
        # Each rank draws its own dropout masks (seeded seed + rank): all their RNG states are kept, or a
        # resumed multi-process run would give every rank rank 0's and drift from the uninterrupted one.
        every_rng = dist.gather_object(rng_state()) if self.ctx.is_distributed else None
        if self.ctx.is_main:
            models = {n: t.model for n, t in self.models.items() if t.trains}
            state = self.state_dict()
            if every_rng is not None:
                state["rng_by_rank"] = every_rng
            path = save_checkpoint(self.checkpoints, self.step, models, state,
                                   keep_last=self.config.checkpoint.keep_last)
        self.ctx.barrier()
        self._saved_at = self.step
        return path

    # ------------------------------------------------------------------ data
    def _loader(self) -> DataLoader:
        """The batches, sampled (and with ``data.workers``, tokenised for each model that reads text) in
        worker processes ahead of the step; pinned for a GPU."""
        cfg = self.config
        cuda = self.ctx.device.type == "cuda"
        workers = cfg.data.workers if cfg.data.workers is not None else (CUDA_WORKERS if cuda else 0)
        tokenizers = None
        if workers:
            readers = self.objective.text_models().items()  # a kind without a batch_tokenizer tokenises in the step
            tokenizers = {name: cast(Any, model).batch_tokenizer() for name, model in readers
                          if hasattr(model, "batch_tokenizer")}
        return group_loader(self.dataset, cfg.optim.batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
                            seed=cfg.seed, num_workers=workers, tokenizers=tokenizers, pin_memory=cuda and workers > 0)

    def _batches(self) -> Iterator[Any]:
        """Batches forever, from the saved (epoch, position); every epoch reshuffled via set_epoch."""
        while True:
            self.loader.sampler.set_epoch(self.epoch)  # type: ignore[attr-defined]  # group_loader's epoch sampler
            for index, batch in enumerate(self.loader):
                if index < self.position:
                    continue  # resumed mid-epoch: the same batches as before, skipped cheaply
                self.position = index + 1
                yield batch
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        """One optimizer step (over ``grad_accum`` micro-batches) of every trained model.

        Nothing here reads a device value on the host when the optimizers skip on the device (fused AdamW,
        the default): the non-finite check and the figures stay tensors until a log step reads them
        (:mod:`~leadkd.distill.non_finite`), so the host queues the next step while the device runs this one.
        """
        cfg = self.config.optim
        pairs: list[tuple[int, int]] = self.schedule.pairs_for_step(self.step) if self.schedule is not None else []
        trained = [t for t in self.models.values() if t.trains]
        totals: dict[str, torch.Tensor] = {}
        weights = pair_kl = None
        finite: torch.Tensor | None = None
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
                    terms = self.objective(batch, pairs)
                loss = terms["loss"]
                if not self._skips_on_device:  # the optimizer cannot drop an update itself: decide here
                    if not self._all_finite(loss):
                        return self._skip_step(loss, trained)
                else:
                    here = self._finite_everywhere(loss)
                    finite = here if finite is None else finite & here
                (loss / cfg.grad_accum).backward()
            for name, value in terms.items():
                if value.dim() == 0:
                    share = value.detach().float() / cfg.grad_accum
                    totals[name] = totals[name] + share if name in totals else share
            weights, pair_kl = terms.get("layer_weights"), terms.get("layer_pair_kl")
        for t in trained:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
            if finite is None:
                _optimizer(t).step()
            else:
                step_unless(_optimizer(t), finite)
            t.scheduler.step()
            _optimizer(t).zero_grad(set_to_none=True)
        self.step += 1
        if finite is None:
            self.non_finite.update(torch.ones((), dtype=torch.bool, device=loss.device), self.step, loss)
        else:
            self.non_finite.update(finite, self.step, totals["loss"])
        if self.ctx.is_distributed:  # one collective, left on the device
            means = dist.all_reduce_mean(torch.stack(list(totals.values())))
            totals = dict(zip(totals, cast(torch.Tensor, means).unbind(), strict=True))
        return StepResult(totals, list(pairs), None if weights is None else weights.detach(),
                          None if pair_kl is None else pair_kl.detach(), True if finite is None else finite)

    @property
    def non_finite_in_a_row(self) -> int:
        return int(self.non_finite.in_a_row)

    def check_non_finite(self) -> None:
        """At a log step: say how many updates were skipped since the last one, and stop the run if a run of
        non-finite steps went past ``optim.skip_non_finite`` (naming that step and the last good checkpoint)."""
        seen = self.non_finite.look()
        allowed = self.config.optim.skip_non_finite
        if seen.over_at is not None:
            last = newest_checkpoint(self.checkpoints)
            where = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written yet"
            tried = f" after skipping {allowed} such batches in a row" if allowed else ""
            raise LeadkdError(f"the loss became {seen.over_loss} at step {seen.over_at}{tried}; {where}")
        if seen.skipped:
            self._say(f"step {self.step}: {seen.skipped} update(s) skipped since the last log step for a non-finite "
                      f"loss ({seen.in_a_row} in a row now, optim.skip_non_finite={allowed})")

    def _finite_everywhere(self, loss: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: every process's loss is finite (all-reduced on the device, never read here)."""
        finite = torch.isfinite(loss.detach())
        if self.ctx.is_distributed:
            finite = cast(torch.Tensor, dist.all_reduce_mean(finite.float())) == 1.0
        return finite

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite; all ranks must agree before any skips a backward."""
        finite = bool(torch.isfinite(loss.detach()))
        if self.ctx.is_distributed:  # so that every rank stops (or skips) together instead of hanging
            finite = bool(dist.all_reduce_mean(float(finite)) == 1.0)
        return finite

    def _skip_step(self, loss: torch.Tensor, trained: list) -> StepResult:
        """Drop this step's update (an optimizer that cannot skip on the device), counted as the device
        path counts it; the next log step reports it, or stops the run.

        A skipped step still counts, and the schedulers still advance, so a run keeps its length and
        learning-rate curve; too many non-finite batches in a row mean the model itself is broken.
        """
        with warnings.catch_warnings():  # scheduler before optimizer is the point here
            warnings.simplefilter("ignore", UserWarning)
            for t in trained:
                _optimizer(t).zero_grad(set_to_none=True)
                t.scheduler.step()
        self.step += 1
        self.non_finite.update(torch.zeros((), dtype=torch.bool, device=loss.device), self.step, loss)
        return StepResult({"loss": loss.detach().float()}, finite=False)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float] | None:
        """Dev-split retrieval quality of the student (or the one trained model), on rank 0 (every process encodes a
        share of the corpus); None on the other ranks and where there is nothing to run."""
        cfg = self.config.eval
        if not self.evaluates:
            return None
        assert self.corpus_spec is not None and cfg.split is not None  # a run that evaluates has both
        return evaluate_retriever(self.evaluated.model, self.corpus_spec, cfg.split, cfg.metric, cfg.k, cfg.max_queries,
                                  corpus=self.corpus)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``optim.steps``; returns the final and best dev metrics (if any)."""
        cfg = self.config
        if self.step >= self.total_steps and (self.output / "final").is_dir():
            self._say(f"{self.output} already finished at step {self.step}; nothing to do")
            return {"final": None, "best": self.best}
        self._iterator = self._batches()
        self.metrics.resume_at(self.step)
        if self.step == 0 and cfg.eval.split is not None and cfg.eval.at_start:
            self._eval_and_keep_best()  # the starting model competes for best/ too
        progress: Any = contextlib.nullcontext()
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc=self._job,
                            unit="step")
        self.stop.install()  # until the run ends; after an error, until close() (the stop's docstring says why)
        with dist.peers_answering(cfg.ddp_timeout, self._newest_for_resume):
            with progress:  # closed before an error is printed, so the error stays the last line
                self._steps(progress if self.show_progress else None)
                self.stop.after_step(self._checkpoint_this_step)
            final = self._finish()
        return {"final": final, "best": self.best}

    def _finish(self) -> dict[str, float] | None:
        """The final evaluation and the final folders, after the last step's checkpoint.

        No step boundary is left to wait for, so the command's own handlers come back first: a signal now
        stops where it lands (:class:`~leadkd.runtime.stopping.Interrupted`; every write is atomic), and
        ``--resume`` finds the last step done and only this left to do.
        """
        checkpoint = self._checkpoint_this_step()
        self.stop.restore()
        try:
            final = self._eval_and_keep_best()
            if self.config.eval.split is not None:
                self.save()  # again: the checkpoint records the best/ this evaluation may have made
            self._save_final(final)
        except KeyboardInterrupt as stop:  # the CLI's Interrupted, or a library caller's plain Ctrl-C
            signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
            rank = self.ctx.rank if self.ctx.is_distributed else None
            raise Stopped(signum, self.step, checkpoint if self.ctx.is_main else None, rank=rank) from None
        return final

    def _checkpoint_this_step(self) -> Path:
        """Every rank: the checkpoint of the current step, written unless ``checkpoint.every`` just did."""
        if self._saved_at != self.step:
            self.save()
        return self.checkpoints / checkpoint_name(self.step)

    def _newest_for_resume(self) -> str:
        found = list_checkpoints(self.checkpoints)
        return (f"the newest complete checkpoint is {found[-1]}; resume with --resume" if found
                else "no checkpoint was written yet")

    def _steps(self, progress) -> None:
        """Train steps up to ``optim.steps``, logging, evaluating and checkpointing on their schedules."""
        cfg = self.config
        started = time.perf_counter()
        while self.step < self.total_steps:
            result = self.train_step()
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:  # the only reads of the device
                self.check_non_finite()
                skipped, figures = result.skipped, result.host()
                record: dict[str, Any] = {
                    "step": self.step, "epoch": self.epoch, "loss": None if skipped else figures["terms"]["loss"],
                    **({} if skipped else figures["terms"]), **({"skipped": True} if skipped else {}),
                    "lr": {n: t.scheduler.get_last_lr()[0] for n, t in self.models.items() if t.trains},
                    "seconds": round(time.perf_counter() - started, 3)}
                if result.pairs and not skipped:
                    record.update(pairs=result.pairs, layer_weights=figures["weights"],
                                  layer_pair_kl=figures["pair_kl"])
                self.metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss="skipped" if skipped else f"{record['loss']:.4f}")
            if progress is not None:
                progress.update(1)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                self._eval_and_keep_best()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.total_steps:
                self.save()
            if self.step < self.total_steps:
                self.stop.after_step(self._checkpoint_this_step)

    def _eval_and_keep_best(self) -> dict[str, float] | None:
        started = time.perf_counter()
        result = self.evaluate()
        if result is None or not self.ctx.is_main:
            return result
        metric = self.config.eval.metric
        self.metrics.write({"step": self.step, "eval": result, "eval_seconds": round(time.perf_counter() - started, 1)})
        self._say(f"step {self.step}: dev {metric} = {result[metric]:.4f}")
        if not self.best or result[metric] > self.best["value"]:
            self.best = {"step": self.step, "value": result[metric], "metric": metric}
            self._save_model("best", self.evaluated, result, f"the checkpoint of a {self._job} run best on "
                             f"{self.config.eval.split} {metric} (step {self.step} of {self.total_steps})")
        return result

    def _save_final(self, figures: dict[str, float] | None) -> None:
        if not self.ctx.is_main:
            return
        for name, trained in self.models.items():
            if trained.trains:
                self._save_model("final" if trained is self.evaluated else f"final-{name}", trained,
                                 figures if trained is self.evaluated else None,
                                 f"the final {name} of a {self._job} run (step {self.step})")
        self._say(f"wrote {self.output / 'final'}" + (f"; best dev step {self.best['step']} in {self.output / 'best'}"
                                                      if self.best else ""))

    def _save_model(self, folder: str, trained: Trained, figures: dict[str, float] | None, what: str) -> None:
        """A model folder with its card; ``figures``: its dev scores at this step, if measured."""
        cast(Retriever, trained.model).save_pretrained(self.output / folder)
        write_model_card(self.output / folder, self.config, trained.model,
                         {f"{self.config.eval.split} (step {self.step})": figures} if figures else {}, what)

    def close(self) -> None:
        self.stop.restore()  # the signal handlers in place before fit()
        self.metrics.close()
        if getattr(getattr(self, "objective", None), "teacher_cache", None) is not None:
            self.objective.teacher_cache.close()  # type: ignore[union-attr]  # only a Distillation has one
        self.ctx.cleanup()


def _optimizer(trained: Trained) -> torch.optim.Optimizer:
    """A trained model's optimizer (``trains`` means it has one)."""
    assert trained.optimizer is not None
    return trained.optimizer


def run_job(config: TrainConfig | DistillConfig, resume: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Build a trainer, train, clean up — what `leadkd train` and `leadkd distill` call."""
    from ..runtime.run_lock import output_lock

    assert config.output_dir is not None  # required (validate_config)
    with output_lock(config.output_dir, option="output_dir"):  # one writer per folder, before any rank joins
        trainer = Trainer(config, resume=resume, log=log)
        try:
            return trainer.fit()
        finally:
            trainer.close()

