"""Non-finite losses counted on the device, so a training step never waits for the GPU to answer "is it finite?".

Asking after every step (``bool(torch.isfinite(loss))``) makes the host wait for the step's kernels, so it
cannot queue step t+1 while the GPU runs step t. Instead each step hands its "finite everywhere" flag to
:meth:`NonFiniteCount.update`, which keeps three device counters: the non-finite steps in a row, the
updates skipped since the last look, and the first step whose run of non-finite steps went past the
allowed ``optim.skip_non_finite`` (with its loss, for the message). The update itself is dropped on the
device too, by the fused optimizer's found-inf input (what ``torch.amp.GradScaler`` uses), so a skipped
step leaves weights and AdamW's moments exactly as they were. :meth:`look` reads all three at once (one
transfer) at a log step; the run stops there, naming the step that went past the limit. Between two looks
the weights stay the last good ones, since every non-finite update was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Seen:
    """What :meth:`NonFiniteCount.look` found: updates skipped since the previous look, the current run of
    non-finite steps, and the step (with its loss) whose run first went past the limit, if any."""

    skipped: int
    in_a_row: int
    over_at: int | None
    over_loss: float


class NonFiniteCount:
    """Device counters of non-finite steps; ``allowed`` is how many in a row may be skipped before the run stops."""

    def __init__(self, allowed: int, device: torch.device, in_a_row: int = 0):
        self.allowed = allowed
        self.in_a_row = torch.tensor(in_a_row, dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.over_at = torch.full((), -1, dtype=torch.int64, device=device)
        self.over_loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, finite: torch.Tensor, step: int, loss: torch.Tensor) -> None:
        """Count one step (``finite``: a 0-dim bool tensor, the same on every process); no host sync."""
        bad = (~finite).to(torch.int64)
        self.in_a_row = (self.in_a_row + 1) * bad
        self.skipped = self.skipped + bad
        first_over = (self.over_at < 0) & (self.in_a_row > self.allowed)
        self.over_at = torch.where(first_over, torch.full_like(self.over_at, step), self.over_at)
        self.over_loss = torch.where(first_over, loss.detach().float(), self.over_loss)

    def look(self) -> Seen:
        """Read the counters (one device-to-host transfer) and restart the skipped count."""
        skipped, in_a_row, over_at = torch.stack([self.skipped, self.in_a_row, self.over_at]).tolist()
        over_loss = float(self.over_loss)
        self.skipped = torch.zeros_like(self.skipped)
        return Seen(int(skipped), int(in_a_row), None if over_at < 0 else int(over_at), over_loss)


def skips_on_the_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` reads a found-inf tensor and skips the whole update on the device (fused
    Adam/AdamW, as GradScaler relies on); others need the host to decide before the step."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"))


def step_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` whose update is dropped on the device when ``finite`` is False (no host sync)."""
    optimizer.grad_scale = None  # type: ignore[attr-defined]  # the fused kernel's inputs, as GradScaler sets them
    optimizer.found_inf = (~finite).to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
