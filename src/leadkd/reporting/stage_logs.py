"""The trainer's logs of a run's stages: each ``metrics.jsonl`` read as rows, the stages laid end to end.

A log may be read while it is being written (its cut last line is dropped); a stage whose log is missing
or broken becomes a one-line note, so a report can always be built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import InputError, LeadkdError
from .results import Stage, finite_number

__all__ = ["load_metrics", "StageLog", "read_stage_logs"]


def load_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a trainer log, one per non-blank line.

    A last line that is not valid JSON (cut by a crash or read while being written) is dropped; any
    other bad line raises :class:`InputError` naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, not a metrics.jsonl file") from None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if index == last:
                break  # a line cut short: the writer died or is still writing
            raise InputError(path, f"not valid JSON ({error.msg} at column {error.colno})", line=index + 1) from None
        if not isinstance(row, dict):
            raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line=index + 1)
        rows.append(row)
    return rows


@dataclass
class StageLog:
    """One training stage's log: step rows and eval rows, sorted by step, laid after the stages before it."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    offset: int = 0

    @property
    def last_step(self) -> int:
        steps = [row["step"] for row in self.steps + self.evals]
        return max(steps) if steps else 0


def _read_log(run: Path, name: str, folder: Path) -> StageLog | str:
    """The log in ``folder``, or a one-line note saying why there is none."""
    log = folder / "metrics.jsonl"
    if not log.is_file():
        return f"Stage `{name}`: no `metrics.jsonl`."
    try:
        rows = load_metrics(log)
    except LeadkdError as error:
        return f"Stage `{name}` skipped: {str(error).replace(str(run) + os.sep, '')}"
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for row in rows:
        step = row.get("step")
        if not finite_number(step):
            continue
        if isinstance(row.get("eval"), dict):
            evals[int(step)] = row  # a repeated step (a resumed run) keeps its last row
        else:
            steps[int(step)] = row
    if not steps and not evals:
        return f"Stage `{name}`: `metrics.jsonl` has no rows."
    return StageLog(name, [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)])


def read_stage_logs(run: Path, declared: Sequence[Stage] = ()) -> tuple[list[StageLog], list[str]]:
    """The logs of the ``declared`` stages, in their order, then of any other folder under ``stages/`` (by
    name), and one-line notes on what is missing.

    Steps are laid end to end: a stage starts where the stage that produced its start model ended (so
    arms from one warm start lie side by side), any other after every stage before it.
    """
    root = run / "stages"
    names = {stage.name for stage in declared}
    others = sorted(path for path in root.iterdir() if path.is_dir() and path.name not in names) \
        if root.is_dir() else []
    wanted = [(stage.name, stage.folder, run / stage.folder) for stage in declared]
    wanted += [(path.name, f"stages/{path.name}", path) for path in others]
    if not any(folder.is_dir() for _, _, folder in wanted):
        where = "`stages/` holds no stage folders" if root.is_dir() else "`stages/` not found"
        return [], [f"No training logs: {where}."]
    logs: list[StageLog] = []
    notes: list[str] = []
    for name, shown, folder in wanted:
        found = _read_log(run, name, folder) if folder.is_dir() else \
            f"No {name} logs (`{shown}/metrics.jsonl` not found)."
        if isinstance(found, StageLog):
            logs.append(found)
        else:
            notes.append(found)
    producer: dict[str | None, str] = {stage.produces: stage.name for stage in declared if stage.produces}
    start = {stage.name: stage.start for stage in declared}
    ends: dict[str, int] = {}
    offset = 0
    for log in logs:
        after = producer.get(start.get(log.name))
        log.offset = ends[after] if after in ends else offset
        ends[log.name] = log.offset + log.last_step
        offset = max(offset, ends[log.name])
    return logs, notes


