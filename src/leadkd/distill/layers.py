"""Which student layer learns from which teacher layer: the selection strategies and their schedule.

A selection is a sorted list of ``(student_layer, teacher_layer)`` pairs, layers numbered 0..L-1 over
the transformer blocks' outputs (the last index is the final layer). Strategies (spec §2.6):

* ``random`` - the paper's setting: K distinct student layers drawn uniformly and sorted, independently
  K distinct teacher layers drawn and sorted, paired by rank (so the relative order is kept). Final
  layers can be drawn, overlapping the response loss as in the paper's code.
* ``last`` - the last K layers of each side (6->12, K=5: student 1..5 <-> teacher 7..11).
* ``skip`` - the student's last K layers <-> every other teacher layer from 0, i.e. teacher
  0,2,..,2(K-1); this needs K <= ceil(teacher_layers / 2) (6->12, K=5: student 1..5 <-> 0,2,4,6,8).
* ``paper_last`` / ``paper_skip`` - the paper code's lists, hard-coded whatever the depths (spec §2.6):
  student 1..5 <-> teacher 7..11, and student 1..5 <-> teacher 0,2,4,6,8; K is ignored. For 6->12 with
  K=5 they equal ``last`` / ``skip``; for 12->24 they do not (``last`` there pairs student 7..11 with
  teacher 19..23, ``skip`` student 7..11 with teacher 0..8), so reproduce the paper's 24->12 ablations
  with these.
* ``map`` - fixed pairs of your choosing, ``pairs=[(0, 1), (1, 3), (2, 5)]`` (``student, teacher`` per
  pair). The old spelling, ``"0:1,1:3,2:5"`` in place of the name, still reads (:mod:`leadkd.config.layer_strategy`).

Random draws use a seeded ``torch.Generator`` (CPU), so every process with the same seed draws the same
layers without communicating (the paper's code relied on a shared seed for Python's ``random``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config.layer_strategy import STRATEGIES, Pair, StrategyError, resolve_strategy
from ..runtime.errors import ConfigError, LeadkdError

#: The paper code's fixed ``(student, teacher)`` lists for its last/skip ablations, for every depth pair.
PAPER_PAIRS: dict[str, tuple[Pair, ...]] = {
    "paper_last": ((1, 7), (2, 8), (3, 9), (4, 10), (5, 11)),
    "paper_skip": ((1, 0), (2, 2), (3, 4), (4, 6), (5, 8)),
}

__all__ = ["STRATEGIES", "select_layers", "LayerSchedule"]


def _resolved(strategy: Any, pairs: Any) -> tuple[str, tuple[Pair, ...] | None]:
    """Today's ``(name, pairs)`` from either spelling; a wrong setting is a one-line ConfigError naming it."""
    try:
        return resolve_strategy(strategy, pairs)
    except StrategyError as exc:
        raise ConfigError(f"layers.{exc.key}: {exc}") from None


def _check_pairs_fit(pairs: Sequence[Pair], student_layers: int, teacher_layers: int) -> None:
    for student, teacher in pairs:
        if not (student < student_layers and teacher < teacher_layers):
            raise ConfigError(
                f"layers.pairs: pair [{student}, {teacher}] is out of range; the student has {student_layers} "
                f"layers (0..{student_layers - 1}) and the teacher {teacher_layers} (0..{teacher_layers - 1})")


def _check_depths(student_layers: int, teacher_layers: int, k: int) -> None:
    if student_layers < 1 or teacher_layers < 1:
        raise ConfigError(f"models need at least one layer, got student {student_layers}, teacher {teacher_layers}")
    if k < 1:
        raise ConfigError(f"the number of distilled layer pairs must be >= 1, got {k}")
    if k > min(student_layers, teacher_layers):
        raise ConfigError(f"cannot distill {k} layer pairs: the student has {student_layers} layers and the "
                          f"teacher {teacher_layers}, so at most {min(student_layers, teacher_layers)} pairs fit")


def select_layers(strategy: str, student_layers: int, teacher_layers: int, k: int,
                  generator: torch.Generator | None = None, pairs: Sequence[Pair] | None = None) -> list[Pair]:
    """The ``(student_layer, teacher_layer)`` pairs for ``strategy``, sorted by student layer.

    ``strategy`` is one of :data:`STRATEGIES`; ``map`` takes its ``pairs``. It and the paper's lists fix
    the pairs themselves, so ``k`` is ignored for them. ``generator`` is required for ``random`` and
    advanced by exactly two ``randperm`` calls (student, then teacher), so equal seeds give equal draws
    everywhere.
    """
    strategy, pairs = _resolved(strategy, pairs)
    if pairs is not None:
        _check_pairs_fit(pairs, student_layers, teacher_layers)
        return list(pairs)
    if strategy in PAPER_PAIRS:
        pairs = list(PAPER_PAIRS[strategy])
        if student_layers < 6 or teacher_layers < 12:
            raise ConfigError(f"{strategy!r} is the paper's fixed list {pairs}, which needs a student of >= 6 "
                              f"and a teacher of >= 12 layers; these have {student_layers} and {teacher_layers} "
                              f"(use {strategy.removeprefix('paper_')!r}, which follows the depths)")
        return pairs
    _check_depths(student_layers, teacher_layers, k)
    if strategy == "random":
        if generator is None:
            raise LeadkdError("random layer selection needs a seeded torch.Generator, so that every process "
                              "draws the same layers")
        # The generator and its draws live on the host: read through numpy, which no device tensor passes.
        student = sorted(torch.randperm(student_layers, generator=generator)[:k].numpy().tolist())
        teacher = sorted(torch.randperm(teacher_layers, generator=generator)[:k].numpy().tolist())
    elif strategy == "last":
        student = list(range(student_layers - k, student_layers))
        teacher = list(range(teacher_layers - k, teacher_layers))
    else:  # skip
        if 2 * (k - 1) > teacher_layers - 1:
            raise ConfigError(f"'skip' pairs the student's last {k} layers with every other teacher layer from 0, "
                              f"which needs {2 * k - 1} teacher layers; the teacher has {teacher_layers}")
        student = list(range(student_layers - k, student_layers))
        teacher = list(range(0, 2 * k, 2))
    return list(zip(student, teacher, strict=True))


def _plain_pairs(pairs: Sequence[Pair] | None) -> list[list[int]] | None:
    """Pairs as lists, the form a saved state holds them in."""
    return None if pairs is None else [list(pair) for pair in pairs]


def pair_layers(pairs: Sequence[Pair]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """The student and teacher layers the pairs need, sorted (each encode appends its final score slice
    after them), and the pairs as positions into those lists: what one step encodes and distils."""
    s_layers, t_layers = sorted({s for s, _ in pairs}), sorted({t for _, t in pairs})
    return s_layers, t_layers, [(s_layers.index(s), t_layers.index(t)) for s, t in pairs]


class LayerSchedule:
    """Owns the layer pairs over training: drawn at step 0, re-drawn every ``resample_interval`` steps.

    ``step`` counts completed optimizer steps. Pairs for steps ``[n*I, (n+1)*I)`` are the n-th draw of
    one seeded generator, whatever the calling pattern (skipped intervals are drawn and discarded), so
    all processes agree and a resumed run (via :meth:`state_dict`) continues the same sequence. The
    interval is its own setting (default 10, the paper's value) rather than tied to checkpoint saving
    as in the paper's code (spec §7.4-6). ``resample_interval=None`` keeps the first draw for good.
    Deterministic strategies simply return the same pairs every time; ``pairs`` are those of ``map``.

    ``teacher_choices`` limits the teacher layers to those a score file stores: ``random`` draws among them
    (K of the stored layers, sorted), and a fixed strategy whose pairs need another layer is refused here,
    at the start, in one line. All layers stored is the same schedule as no limit.
    """

    def __init__(self, strategy: str, student_layers: int, teacher_layers: int, k: int = 5, seed: int = 888,
                 resample_interval: int | None = 10, pairs: Sequence[Pair] | None = None,
                 teacher_choices: Sequence[int] | None = None):
        if resample_interval is not None and resample_interval < 1:
            raise ConfigError(f"layer resample interval must be >= 1 optimizer steps (or None), "
                              f"got {resample_interval}")
        self.strategy, self.map_pairs = _resolved(strategy, pairs)
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.k = k
        self.seed = seed
        self.resample_interval = resample_interval
        self.teacher_choices = None if teacher_choices is None else sorted(int(t) for t in teacher_choices)
        if self.teacher_choices == list(range(teacher_layers)):
            self.teacher_choices = None
        self.generator = torch.Generator().manual_seed(seed)
        self._draw_index = 0
        self._pairs = self._draw()

    def _draw(self) -> list[Pair]:
        choices = self.teacher_choices
        if choices is None:
            return select_layers(self.strategy, self.student_layers, self.teacher_layers, self.k, self.generator,
                                 self.map_pairs)
        if self.strategy == "random":  # drawn among the stored layers' positions, then named by layer
            drawn = select_layers("random", self.student_layers, len(choices), self.k, self.generator)
            return [(student, choices[position]) for student, position in drawn]
        pairs = select_layers(self.strategy, self.student_layers, self.teacher_layers, self.k, self.generator,
                              self.map_pairs)
        absent = sorted({teacher for _, teacher in pairs} - set(choices))
        if absent:
            raise ConfigError(f"layers.strategy={self.strategy} needs teacher layer {absent[0]}, which the teacher "
                              f"score file does not store (it stores layers {', '.join(map(str, choices))})")
        return pairs

    @property
    def pairs(self) -> list[Pair]:
        """The current pairs (a copy)."""
        return list(self._pairs)

    def pairs_for_step(self, step: int) -> list[Pair]:
        """The pairs to use at optimizer step ``step`` (>= 0, never going back)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        target = 0 if self.resample_interval is None else step // self.resample_interval
        if target < self._draw_index:
            raise ValueError(f"layer schedule is at draw {self._draw_index} and cannot go back to step {step}")
        while self._draw_index < target:
            self._draw_index += 1
            self._pairs = self._draw()
        return list(self._pairs)

    def _settings(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "map_pairs": _plain_pairs(self.map_pairs),
                "student_layers": self.student_layers, "teacher_layers": self.teacher_layers, "k": self.k,
                "seed": self.seed, "resample_interval": self.resample_interval,
                **({"teacher_choices": self.teacher_choices} if self.teacher_choices is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        """Settings, generator state, draw counter and current pairs; ``torch.save``-able."""
        return {**self._settings(), "generator_state": self.generator.get_state(),
                "draw_index": self._draw_index, "pairs": _plain_pairs(self._pairs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved schedule; refuses one saved under other settings (other layers would follow).

        A schedule saved before ``map_pairs`` existed holds an explicit map in the old spelling, as its strategy.
        """
        strategy, map_pairs = _resolved(state.get("strategy"), state.get("map_pairs"))
        saved = {**{key: state.get(key) for key in self._settings()}, "strategy": strategy,
                 "map_pairs": _plain_pairs(map_pairs)}
        if saved != self._settings():
            diff = ", ".join(f"{key} {saved[key]!r} (now {value!r})" for key, value in self._settings().items()
                             if saved[key] != value)
            raise LeadkdError(f"the saved layer schedule was made with other settings: {diff}")
        self.generator.set_state(state["generator_state"])
        self._draw_index = int(state["draw_index"])
        self._pairs = [tuple(pair) for pair in state["pairs"]]
