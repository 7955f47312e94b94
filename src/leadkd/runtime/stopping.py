"""Stopping a training run on SIGTERM or SIGINT at a step boundary, with a checkpoint to resume from.

A cluster's scheduler asks a job to stop with SIGTERM and kills it a little later; a person presses Ctrl-C.
Either way the step under way is finished, a checkpoint is written (atomically, like every checkpoint) and
the run ends with :class:`Stopped`, which the CLI turns into one stderr line and the shell's usual status,
128 + the signal (143 for SIGTERM, 130 for SIGINT). A second signal means "now": the process leaves at
once with the same status, and the newest checkpoint is the last one written whole (a write it cuts stays
under its temporary name, which is never read as a checkpoint).

Under torchrun the ranks agree on the step to stop at (:class:`StepBoundaryStop` all-reduces the request once
per step), so no rank saves a step the others did not take. Ctrl-C in a terminal reaches torchrun and every worker,
and torchrun then forwards the same signal to the workers again; a repeat of the same signal within
``repeat_window_s`` is therefore taken as the same request, not as the second one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module at start; torch (under distributed) only when a run needs it
    from .distributed import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Under torchrun a terminal's Ctrl-C reaches every worker twice (directly, then forwarded by torchrun):
#: a repeat of the same signal this soon after the first is the same request, not "stop at once".
TORCHRUN_REPEAT_WINDOW_S = 1.0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(Exception):
    """A run stopped early on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, rank: int | None = None):
        self.signum, self.step, self.checkpoint, self.rank = signum, step, checkpoint, rank
        who = f" (rank {rank})" if rank is not None else ""
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "checkpoint written by rank 0"
        super().__init__(f"stopped by {signal_name(signum)}{who} after step {step}; {where}; "
                         "resume with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """While active, the first SIGTERM/SIGINT only records a request to stop (read :attr:`signum`); a second
    one writes ``at_once(signal)`` to stderr and leaves with ``os._exit(128 + signal)``. The handlers in place
    before are put back by :meth:`restore` (or on leaving the ``with`` block). Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    def __init__(self, at_once: Callable[[int], str], repeat_window_s: float = 0.0):
        self.at_once = at_once
        self.repeat_window_s = repeat_window_s
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the earlier handlers back (safe to call twice)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if signum == self.signum and now - self._first_at < self.repeat_window_s:
            return  # the same request again (torchrun forwarding a terminal's signal)
        try:
            # On a line of its own even after a progress bar (which leaves the cursor at its end).
            os.write(2, f"\nleadkd: {self.at_once(signum)}\n".encode("utf-8", "replace"))
        finally:
            os._exit(128 + signum)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT where no step boundary waits for it (loading models, mining, encoding, a final
    evaluation): raised where the program is, as Ctrl-C's KeyboardInterrupt is, so that every ``with`` and
    ``finally`` on the way out runs (a temporary file or folder is removed, a lock released) and no output is
    left half-written. The CLI turns it into one line and 128 + the signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptOnSignal(StopOnSignal):
    """The handlers of a whole command (the CLI installs them): the first SIGTERM/SIGINT raises
    :class:`Interrupted`, a second leaves at once. A training loop puts its own :class:`StepBoundaryStop` in
    front while it runs and these back after it."""

    def __init__(self):
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        super().__init__(lambda signum: f"stopped at once by a second {signal_name(signum)}",
                         TORCHRUN_REPEAT_WINDOW_S if under_torchrun else 0.0)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        super()._handle(signum, frame)
        if first:
            raise Interrupted(signum)


class StepBoundaryStop:
    """A training loop's whole stop handling: the loop asks :meth:`after_step` once per step, nothing else.

    While installed (:meth:`install` before the loop, :meth:`restore` after it, or after an error once its
    line is printed, so that torchrun's SIGTERM to the survivors of a dead rank cannot cut a process down
    before it has said why it stops), a first SIGTERM/SIGINT is recorded and a second leaves at once with
    ``at_once`` naming the step and the newest checkpoint. ``newest()`` says where to resume from and
    ``step()`` which step the run is at, so the line is right whenever the signal comes.
    """

    def __init__(self, ctx: DistContext, step: Callable[[], int], newest: Callable[[], str]):
        self.ctx, self._step, self._newest = ctx, step, newest
        under_torchrun = ctx.is_distributed or "TORCHELASTIC_RUN_ID" in os.environ
        self._signals = StopOnSignal(self._at_once, TORCHRUN_REPEAT_WINDOW_S if under_torchrun else 0.0)

    def install(self) -> StepBoundaryStop:
        self._signals.install()
        return self

    def restore(self) -> None:
        self._signals.restore()

    @property
    def _rank(self) -> int | None:
        return self.ctx.rank if self.ctx.is_distributed else None

    def requested(self) -> int:
        """The signal any process got (0: none), the same on every rank.

        MAX of the signal numbers, one tiny collective per step and only when distributed, so every rank
        stops after the same step and the checkpoint holds a step all of them took.
        """
        signum = self._signals.signum or 0
        if not self.ctx.is_distributed:
            return signum
        from .distributed import all_reduce_max

        return all_reduce_max(signum)

    def after_step(self, checkpoint: Callable[[], Path]) -> None:
        """If a stop was asked: ``checkpoint()`` (every rank calls it; it returns the step's folder), then
        raise :class:`Stopped`."""
        signum = self.requested()
        if signum:
            raise Stopped(signum, self._step(), checkpoint(), rank=self._rank)

    def _at_once(self, signum: int) -> str:
        who = f" (rank {self._rank})" if self._rank is not None else ""
        return f"stopped at once by a second {signal_name(signum)}{who} after step {self._step()}; {self._newest()}"
