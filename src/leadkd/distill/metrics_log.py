"""A run's ``metrics.jsonl``, one JSON object per logged step or evaluation, mirrored to TensorBoard.

Rank 0 alone writes. On resume the lines written after the checkpoint the run continues from are dropped
(they will be written again), through an atomic rewrite, so a crash while truncating cannot lose the log;
a line cut by a crash is dropped there too. TensorBoard is optional: the mirror is made on the first write
when ``torch.utils.tensorboard`` imports, and silently left out when it does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runtime.fileio import atomic_write

LOG_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, output: Path, is_main: bool):
        self.path, self.output, self.is_main = output / LOG_NAME, output, is_main
        self._board: Any = None
        self._board_tried = False

    def resume_at(self, step: int) -> None:
        """Keep only the lines of steps up to ``step`` (the checkpoint resumed from; 0 for a fresh run)."""
        if not self.is_main or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        with atomic_write(self.path) as handle:  # a crash here must not lose the log
            handle.write("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._mirror(record)

    def _mirror(self, record: dict[str, Any]) -> None:
        if not self._board_tried:
            self._board_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._board = SummaryWriter(str(self.output / "tensorboard"))
            except ImportError:
                self._board = None
        if self._board is None:
            return
        step, evaluated = record["step"], record.get("eval", {})
        for name, value in {**evaluated, **record}.items():
            if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                self._board.add_scalar(("dev/" if name in evaluated else "train/") + name, value, step)
        for k, weight in enumerate(record.get("layer_weights", [])):
            self._board.add_scalar(f"layers/weight_{k}", weight, step)
        self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
