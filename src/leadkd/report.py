"""`leadkd report RUN`: a Markdown report with tables and plots of one LEAD run folder.

Reads (see docs/report.md for the contract)::

    RUN/results.json                 test metrics of every model, per-layer quality, settings
    RUN/stages/<stage>/metrics.jsonl the trainer's logs of each training stage (any may be missing)

Writes, each file atomically (a reader never sees half of one)::

    RUN/report.md  RUN/per_layer.png  RUN/training_curves.png  RUN/layer_weights.png

Plots use matplotlib's object-oriented API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no backend
switch, no global state touched, so the report can be built inside any other program. A section
whose data is missing becomes one line in the report saying so; its PNG is not written (and a stale
one from an earlier build is removed). Building twice from the same inputs gives the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import InputError, LeadkdError
from .fileio import atomic_write

__all__ = [
    "build_report", "load_metrics", "markdown_table", "parse_markdown_table",
    "LOSS_TERMS", "REPORT_NAME", "PLOTS",
]

REPORT_NAME = "report.md"
PLOTS = {"per_layer": "per_layer.png", "training_curves": "training_curves.png",
         "layer_weights": "layer_weights.png"}

#: Scalar loss terms the trainer logs, in plotting order (``ce`` is a single-model `train` stage's loss).
LOSS_TERMS = ("loss", "ce", "student_ce", "teacher_ce", "response_kl", "layer_kl")
_TERM_TITLES = {"loss": "loss (total)", "ce": "ce (single-model contrastive)", "student_ce": "student_ce",
                "teacher_ce": "teacher_ce", "response_kl": "response_kl", "layer_kl": "layer_kl (LEAD, weighted)"}
#: Stage folders are ordered by these name prefixes (then by name); their steps are laid end to end.
_STAGE_ORDER = ("init", "warmup", "warm", "train", "mine", "distill", "lead", "response")
#: Distillation arms trained side by side from the same warm start (LEAD, response-KD): they share a start.
_ARM_PREFIXES = ("distill", "lead", "response")
#: Stages a full quickstart writes; a missing one gets a one-line note.
_EXPECTED_STAGES = (("warmup", ("warm",)), ("distill", ("distill", "lead")))
#: The LEAD student and, in order of preference, the model its delta column is measured against.
_LEAD_MODEL = "student_lead"
_BASELINES = ("student_warmup", "student_init")
_MODEL_PHRASES = {"teacher": "the teacher", "student_init": "the initial student",
                  "student_warmup": "the warmed-up student", "student_response_kd": "the response-KD student",
                  "student_lead": "the LEAD student"}
_MISSING = "—"
_DIGITS = 4
_DPI = 100


# =============================================================================== metrics.jsonl

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


# =============================================================================== Markdown tables

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _escape(value) if str(value) else _MISSING


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], bold_best: bool | Iterable[str] = True,
                   *, digits: int = _DIGITS, headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) over ``columns`` (keys, in order).

    Floats are shown with ``digits`` decimals, ints as they are, strings as given (pipes escaped),
    ``None``/NaN/missing keys as ``—``. ``bold_best``: ``True`` bolds the highest value of every column
    holding at least two numbers (ties all bold, compared as displayed), ``False`` none, or a collection
    of column names to bold only those. ``headers`` renames columns in the header line. Columns whose
    values are all numbers (or missing) are right-aligned. Ends with a newline.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("a table needs at least one column")
    if bold_best is True:
        bolded = set(columns)
    elif not bold_best:
        bolded = set()
    else:
        bolded = set(bold_best)
    best: dict[str, float] = {}
    for column in columns:
        numbers = [round(row.get(column), digits) for row in rows if _is_number(row.get(column))]
        if column in bolded and len(numbers) >= 2:
            best[column] = max(numbers)
    headers = headers or {}
    lines = ["| " + " | ".join(_escape(headers.get(column, column)) for column in columns) + " |"]
    numeric = {column for column in columns  # right-aligned: every cell reads back as a number or a blank
               if all(isinstance(_parse_cell(_cell(row.get(column), digits)), (int, float, type(None)))
                      for row in rows)}
    lines.append("|" + "|".join("---:" if column in numeric else "---" for column in columns) + "|")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = _cell(value, digits)
            if column in best and _is_number(value) and round(value, digits) == best[column]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells, current, escaped = [], [], False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            cells.append("".join(current))
            current = []
        else:
            current.append(char)
    cells.append("".join(current))
    return [cell.strip() for cell in cells]


def _unbold(text: str) -> str:
    for mark in ("**", "__"):
        if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
            return text[len(mark):-len(mark)].strip()
    return text


def _parse_cell(text: str) -> Any:
    text = _unbold(text)
    if text in ("", _MISSING, "-", "–"):
        return None
    plain = text.replace("\u2212", "-")  # a typographic minus
    if _INT.match(plain):
        return int(plain)
    if _FLOAT.match(plain):
        return float(plain)
    return text


def parse_markdown_table(text: str, index: int = 0) -> list[dict]:
    """The rows (dicts keyed by header) of the ``index``-th Markdown table in ``text``.

    The inverse of :func:`markdown_table`: bold marks are removed, ``—`` or an empty cell is ``None``,
    integers and decimals (signed, e.g. ``+0.0120``) become numbers, anything else stays a string.
    Raises ``ValueError`` when ``text`` has fewer than ``index + 1`` tables.
    """
    lines = text.splitlines()
    found = -1
    position = 0
    while position < len(lines) - 1:
        header, separator = lines[position].strip(), lines[position + 1].strip()
        if header.startswith("|") and _SEPARATOR.match(separator) and "-" in separator:
            found += 1
            body_start = position + 2
            end = body_start
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            if found == index:
                names = [_unbold(name) for name in _split_row(header)]
                rows = []
                for line in lines[body_start:end]:
                    cells = _split_row(line)
                    cells += [""] * (len(names) - len(cells))
                    rows.append({name: _parse_cell(cell) for name, cell in zip(names, cells)})
                return rows
            position = end
        else:
            position += 1
    raise ValueError(f"no Markdown table number {index} in the text ({found + 1} found)")


# =============================================================================== reading a run

@dataclass
class Stage:
    """One training stage's log: step rows and eval rows, sorted by step, laid after earlier stages."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    offset: int = 0

    @property
    def last_step(self) -> int:
        steps = [row["step"] for row in self.steps + self.evals]
        return max(steps) if steps else 0


def _stage_key(name: str) -> tuple[int, str]:
    lower = name.lower()
    for rank, prefix in enumerate(_STAGE_ORDER):
        if lower.startswith(prefix):
            return rank, name
    return len(_STAGE_ORDER), name


def _read_stages(run: Path) -> tuple[list[Stage], list[str]]:
    """Every ``stages/<name>/metrics.jsonl`` in run order, and one-line notes on what is missing."""
    root = run / "stages"
    notes: list[str] = []
    if not root.is_dir():
        return [], ["No training logs: `stages/` not found."]
    stages: list[Stage] = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _stage_key(p.name)):
        log = folder / "metrics.jsonl"
        if not log.is_file():
            notes.append(f"Stage `{folder.name}`: no `metrics.jsonl`.")
            continue
        try:
            rows = load_metrics(log)
        except LeadkdError as error:
            notes.append(f"Stage `{folder.name}` skipped: {_escape(str(error)).replace(str(run) + os.sep, '')}")
            continue
        steps: dict[int, dict] = {}
        evals: dict[int, dict] = {}
        for row in rows:
            step = row.get("step")
            if not _is_number(step):
                continue
            if isinstance(row.get("eval"), dict):
                evals[int(step)] = row  # a repeated step (a resumed run) keeps its last row
            else:
                steps[int(step)] = row
        if not steps and not evals:
            notes.append(f"Stage `{folder.name}`: `metrics.jsonl` has no rows.")
            continue
        stages.append(Stage(folder.name, [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]))
    offset, arms_start = 0, None
    for stage in stages:
        if stage.name.lower().startswith(_ARM_PREFIXES):
            arms_start = offset if arms_start is None else arms_start
            stage.offset = arms_start
            offset = max(offset, arms_start + stage.last_step)
        else:
            stage.offset = offset
            offset += stage.last_step
    names = [folder.name.lower() for folder in root.iterdir() if folder.is_dir()]
    for label, prefixes in _EXPECTED_STAGES:
        if names and not any(name.startswith(prefixes) for name in names):
            notes.append(f"No {label} logs (`stages/{label}/metrics.jsonl` not found).")
    if not stages and not notes:
        notes.append("No training logs: `stages/` holds no stage folders.")
    return stages, notes


def _read_results(run: Path) -> dict | None:
    path = run / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON ({error.msg})", line=error.lineno) from None
    if not isinstance(results, dict):
        raise InputError(path, f"expected a JSON object, got {type(results).__name__}")
    return results


def _models(results: dict) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Test metrics by model (non-numbers as None) and the measures, in the file's order."""
    raw = results.get("models")
    if not isinstance(raw, dict):
        return {}, []
    models = {str(name): {str(k): (v if _is_number(v) else None) for k, v in values.items()}
              for name, values in raw.items() if isinstance(values, dict)}
    declared = results.get("measures")
    measures = [str(m) for m in declared] if isinstance(declared, list) else []
    for values in models.values():
        measures += [m for m in values if m not in measures]
    return models, measures


def _layers(results: dict, measures: list[str]) -> tuple[dict[str, dict[int, float | None]], str]:
    """Per-layer values of one measure by model ({layer: value}) and that measure's name."""
    raw = results.get("layers")
    if not isinstance(raw, dict):
        return {}, measures[0] if measures else "nDCG@10"
    present: list[str] = []
    for entries in raw.values():
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                present += [k for k, v in entry.items() if k != "layer" and _is_number(v) and k not in present]
    measure = next((m for m in measures if m in present), present[0] if present else
                   (measures[0] if measures else "nDCG@10"))
    layers: dict[str, dict[int, float | None]] = {}
    for name, entries in raw.items():
        if not isinstance(entries, list) or not entries:
            continue
        values: dict[int, float | None] = {}
        for position, entry in enumerate(entries):
            if isinstance(entry, dict):
                layer = entry.get("layer", position)
                value = entry.get(measure)
            else:  # a bare list of numbers: the position is the layer
                layer, value = position, entry
            if _is_number(layer):
                values[int(layer)] = value if _is_number(value) else None
        if values:
            layers[str(name)] = dict(sorted(values.items()))
    return layers, measure


# =============================================================================== plotting

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: Path) -> None:
    """Render ``figure`` atomically to ``path`` (a temporary file beside it, renamed into place)."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=_DPI)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _window(count: int) -> int:
    return max(1, min(100, count // 20))


def _series(rows: Sequence[dict], key: str, offset: int = 0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if _is_number(value):
            xs.append(row["step"] + offset)
            ys.append(float(value))
    return xs, ys


def _colors(count: int) -> list:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return [palette[i % len(palette)] for i in range(count)]


#: One colour per role in every plot: a training stage and the model it produced share it.
_ROLE_COLORS = {"warmup": "#1f77b4", "student_warmup": "#1f77b4", "distill": "#d62728", "student_lead": "#d62728",
                "response_kd": "#2ca02c", "student_response_kd": "#2ca02c", "student_init": "#7f7f7f"}


def _named_colors(names: Sequence[str]) -> dict[str, str]:
    """Role colours for the quickstart's stages and models, the rest of the palette for other names."""
    free = [color for color in _colors(10) if color not in _ROLE_COLORS.values()]
    others = [name for name in names if name not in _ROLE_COLORS]
    return {**{name: _ROLE_COLORS[name] for name in names if name in _ROLE_COLORS},
            **{name: free[i % len(free)] for i, name in enumerate(others)}}


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _plot_per_layer(layers: dict[str, dict[int, float | None]], measure: str, path: Path) -> None:
    figure = _figure(8, 4.8)
    axes = figure.add_subplot()
    students = [name for name in layers if name != "teacher"]
    colors = _named_colors(students)
    for name, values in layers.items():
        xs = list(range(max(values) + 1))
        ys = [math.nan if values.get(layer) is None else values[layer] for layer in xs]  # a gap, not a bridge
        if name == "teacher":
            axes.plot(xs, ys, color="black", marker="s", linewidth=2.2, markersize=6, label="teacher")
        else:
            axes.plot(xs, ys, color=colors[name], marker="o", linewidth=1.6, markersize=5, label=name)
        known = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
        if known:  # the last layer's value, written beside it
            axes.annotate(f"{known[-1][1]:.3f}", known[-1], textcoords="offset points", xytext=(6, 0),
                          va="center", fontsize=8, color="black" if name == "teacher" else colors[name])
    axes.set_title(f"Per-layer test {measure}: each layer's pooled vectors used as a retriever")
    axes.set_xlabel("layer (0 = first transformer block, last = final layer)")
    axes.set_ylabel(f"test {measure}")
    _integer_ticks(axes.xaxis)
    axes.margins(x=0.08)
    axes.grid(True, alpha=0.35)
    axes.legend(loc="best", fontsize=9)
    _save_png(figure, path)


def _log_scale_fits(values: Iterable[float]) -> bool:
    values = list(values)
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def _stage_bounds(axes, stages: Sequence[Stage]) -> None:
    for stage in stages[1:]:
        axes.axvline(stage.offset, color="gray", linestyle=":", linewidth=1)


def _plot_training(stages: Sequence[Stage], terms: list[str], measures: list[str], path: Path) -> None:
    from matplotlib.lines import Line2D

    # loss terms fill the first rows, dev metrics start on a row of their own
    widest = max(len(terms), len(measures))
    columns = 2 if widest in (2, 4) else min(3, widest)
    term_rows = math.ceil(len(terms) / columns)
    rows = term_rows + math.ceil(len(measures) / columns)
    places = [divmod(i, columns) for i in range(len(terms))]
    places += [(term_rows + i // columns, i % columns) for i in range(len(measures))]
    panels = [("term", term) for term in terms] + [("eval", measure) for measure in measures]
    figure = _figure(5.2 * columns, 3.4 * rows + 0.6)
    grid = figure.add_gridspec(rows, columns)
    colors = _named_colors([stage.name for stage in stages])
    for (kind, key), (row, column) in zip(panels, places):
        axes = figure.add_subplot(grid[row, column])
        plotted: list[float] = []
        for stage in stages:
            color = colors[stage.name]
            if kind == "term":
                xs, ys = _series(stage.steps, key, stage.offset)
                if not xs:
                    continue
                axes.plot(xs, ys, color=color, alpha=0.22, linewidth=0.8)
                axes.plot(xs, _moving_average(ys, _window(len(ys))), color=color, linewidth=1.8)
            else:
                rows_ = [{"step": row["step"], key: row["eval"].get(key)} for row in stage.evals]
                xs, ys = _series(rows_, key, stage.offset)
                if not xs:
                    continue
                axes.plot(xs, ys, color=color, marker="o", markersize=4, linewidth=1.6)
            plotted += ys
        if kind == "term":
            axes.set_title(_TERM_TITLES.get(key, key))
            axes.set_ylabel(key)
            if _log_scale_fits(plotted):
                axes.set_yscale("log")
        else:
            axes.set_title(f"dev {key} (eval rows)")
            axes.set_ylabel(f"dev {key}")
        axes.set_xlabel(_step_label(stages))
        _stage_bounds(axes, stages)
        axes.grid(True, alpha=0.35)
    handles = [Line2D([], [], color=colors[stage.name], linewidth=1.8, label=stage.name) for stage in stages]
    handles.append(Line2D([], [], color="gray", alpha=0.35, linewidth=0.8, label="raw (faint); bold = moving average"))
    figure.suptitle("Training curves", fontsize=13)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=9)
    _save_png(figure, path)


def _step_label(stages: Sequence[Stage]) -> str:
    names = {stage.name for stage in stages}
    if len(names) == 1:
        return "step"
    arms = sum(name.lower().startswith(_ARM_PREFIXES) for name in names)
    return "step (stages one after another" + ("; distillation arms side by side)" if arms > 1 else ")")


def _plot_layer_weights(rows: Sequence[tuple[Stage, dict]], student_depth: int, teacher_depth: int,
                        multi_stage: bool, path: Path) -> None:
    import numpy as np

    figure = _figure(12, 8.4)
    panels = figure.subplot_mosaic([["weights", "weights"], ["chosen", "counts"]])
    if multi_stage:  # steps laid end to end, as in the training curves
        xlabel = _step_label([stage for stage, _ in rows])
        rows = [(stage.offset, row) for stage, row in rows]
    else:  # one stage: its own step numbers
        xlabel = f"step ({rows[0][0].name} stage)"
        rows = [(0, row) for _, row in rows]
    # w_k over steps
    k_max = max(len(row.get("layer_weights") or []) for _, row in rows)
    fixed = rows[0][1]["pairs"] if all(row["pairs"] == rows[0][1]["pairs"] for _, row in rows) else None
    axes = panels["weights"]
    for k, color in zip(range(k_max), _colors(k_max)):
        series = [(offset + row["step"], row["layer_weights"][k]) for offset, row in rows
                  if len(row.get("layer_weights") or []) > k and _is_number(row["layer_weights"][k])]
        if not series:
            continue
        xs, ys = [x for x, _ in series], [y for _, y in series]
        axes.plot(xs, ys, color=color, alpha=0.22, linewidth=0.8)
        label = f"k = {k}"
        if fixed and k < len(fixed):
            label += f": student {fixed[k][0]} ← teacher {fixed[k][1]}"
        axes.plot(xs, _moving_average(ys, _window(len(ys))), color=color, linewidth=1.8, label=label)
    axes.set_title("LEAD layer weights w_k = softmax(-teacher layer CE / T) per pair position k "
                   "(raw faint, moving average bold)")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("w_k")
    axes.grid(True, alpha=0.35)
    axes.legend(loc="upper right", fontsize=8, ncols=min(k_max, 3 if fixed else 6))
    # the teacher layer chosen over time, coloured by the student layer it teaches; each teacher layer's
    # row is split into one thin band per student layer so that points of different students never overlap
    axes = panels["chosen"]
    student_colors = _colors(student_depth)
    band = 0.7 / max(1, student_depth)
    for student in range(student_depth):
        shift = (student - (student_depth - 1) / 2) * band
        points = [(offset + row["step"], teacher + shift) for offset, row in rows
                  for s, teacher in (row.get("pairs") or []) if s == student]
        if points:
            axes.scatter([x for x, _ in points], [y for _, y in points], s=7, marker="s",
                         color=student_colors[student], label=f"student {student}", linewidths=0)
    axes.set_title("Teacher layer chosen for each student layer")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("teacher layer")
    axes.set_ylim(-0.5, teacher_depth - 0.5)
    _integer_ticks(axes.yaxis)
    axes.grid(True, axis="x", alpha=0.35)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, markerscale=1.6)
    for edge in range(teacher_depth - 1):
        axes.axhline(edge + 0.5, color="lightgray", linewidth=0.6)
    # how often each pair was chosen
    axes = panels["counts"]
    counts = np.zeros((student_depth, teacher_depth))
    for _, row in rows:
        for student, teacher in row.get("pairs") or []:
            counts[student, teacher] += 1
    image = axes.imshow(counts, origin="lower", aspect="auto", cmap="viridis",
                        extent=(-0.5, teacher_depth - 0.5, -0.5, student_depth - 0.5))
    if student_depth * teacher_depth <= 400:
        top = counts.max() or 1
        for student in range(student_depth):
            for teacher in range(teacher_depth):
                if counts[student, teacher]:
                    axes.text(teacher, student, f"{int(counts[student, teacher])}", ha="center", va="center",
                              fontsize=7, color="black" if counts[student, teacher] > 0.6 * top else "white")
    figure.colorbar(image, ax=axes, label="logged steps")
    axes.set_title(f"How often each (student, teacher) pair was chosen ({len(rows)} logged steps)")
    axes.set_xlabel("teacher layer")
    axes.set_ylabel("student layer")
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    _save_png(figure, path)


# =============================================================================== report text

def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting_text(v) for v in value) if value else "[]"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def _run_section(results: dict | None, stages: Sequence[Stage]) -> list[str]:
    lines = ["## Run", ""]
    if results is None:
        lines += ["No `results.json`: dataset, settings and test metrics are unknown.", ""]
    else:
        dataset = results.get("dataset")
        lines.append(f"- Dataset: {_escape(dataset) if dataset else 'not recorded'}")
        splits = results.get("splits")
        if isinstance(splits, dict) and splits:
            lines.append("- Splits: " + ", ".join(f"{_escape(k)} = `{_escape(v)}`" for k, v in splits.items()))
        else:
            lines.append("- Splits: not recorded")
    if stages:
        lines.append("- Training stages: " + ", ".join(
            f"`{stage.name}` ({stage.last_step} steps)" for stage in stages))
    lines.append("")
    if results is not None:
        settings = results.get("settings")
        if isinstance(settings, dict) and settings:
            rows = [{"setting": key, "value": _setting_text(value)} for key, value in _flatten(settings)]
            lines += [markdown_table(rows, ["setting", "value"], bold_best=False)]
        else:
            lines += ["No settings recorded in `results.json`.", ""]
        lines += _time_section(results.get("timings"), stages)
    return lines


def _time_section(timings: Any, stages: Sequence[Stage]) -> list[str]:
    """Where the wall time went: each stage (from ``results.json``) and its dev evaluations (from its log)."""
    if not isinstance(timings, dict) or not timings:
        return []
    evals = {stage.name: sum(row.get("eval_seconds", 0.0) for row in stage.evals if _is_number(row.get("eval_seconds")))
             for stage in stages}
    def seconds(value: float | None) -> str | None:
        return f"{value:.0f}" if value else None

    known = {name: float(value) for name, value in timings.items() if _is_number(value)}
    rows = [{"stage": name, "seconds": seconds(value), "of which dev evaluation": seconds(evals.get(name))}
            for name, value in known.items()]
    rows.append({"stage": "total", "seconds": seconds(sum(known.values())),
                 "of which dev evaluation": seconds(sum(evals.values()))})
    return ["Wall time by stage (seconds; `test_*`: the test-split evaluation of each model, per layer):", "",
            markdown_table(rows, ["stage", "seconds", "of which dev evaluation"], bold_best=False)]


def _baseline(models: Mapping[str, Any]) -> str | None:
    if _LEAD_MODEL not in models:
        return None
    return next((name for name in _BASELINES if name in models), None)


def _results_section(results: dict | None, models: dict, measures: list[str]) -> list[str]:
    lines = ["## Test results", ""]
    if results is None:
        return lines + ["No test metrics: `results.json` not found.", ""]
    if not models or not measures:
        return lines + ["No test metrics: `results.json` has no `models`.", ""]
    baseline = _baseline(models)
    rows = []
    for name, values in models.items():
        row: dict[str, Any] = {"model": name, **{m: values.get(m) for m in measures}}
        if baseline:
            for m in measures:
                here, there = values.get(m), models[baseline].get(m)
                if name != baseline and here is not None and there is not None:
                    row[f"Δ {m}"] = f"{here - there:+.{_DIGITS}f}"
        rows.append(row)
    columns = ["model", *measures] + ([f"Δ {m}" for m in measures] if baseline else [])
    split = (results.get("splits") or {}).get("test") if isinstance(results.get("splits"), dict) else None
    lines.append(f"Metrics on the test split{f' (`{_escape(split)}`)' if split else ''}. "
                 "**Bold**: best value per measure."
                 + (f" Δ: difference to `{baseline}`." if baseline else ""))
    lines += ["", markdown_table(rows, columns, bold_best=measures)]
    return lines + _lead_vs_response_kd(results)


def _lead_vs_response_kd(results: dict) -> list[str]:
    """The paired comparison the quickstart runs: LEAD against response-only KD from the same warm start."""
    found = results.get("lead_vs_response_kd")
    if not isinstance(found, dict) or not all(_is_number(found.get(k)) for k in ("delta", "p", "queries")):
        return []
    return [f"**LEAD against response-only KD** (same warm start, teacher, data and budget; the layer term is "
            f"the only difference): Δ {_escape(str(found.get('measure', '')))} = {found['delta']:+.{_DIGITS}f} "
            f"over {found['queries']} test queries, paired randomization test p = {found['p']:.3g}. One seed: "
            "another seed can move Δ by about as much as the seed-to-seed spread; `leadkd compare` runs several "
            "seeds and gives a confidence interval.", ""]


def _per_layer_section(results: dict | None, layers: dict, measure: str, image: str | None) -> list[str]:
    lines = ["## Per-layer quality", ""]
    if results is None:
        return lines + ["No per-layer results: `results.json` not found.", ""]
    if not layers:
        return lines + ["No per-layer results: `results.json` has no `layers`.", ""]
    lines.append(f"Test {measure} of each layer's pooled vectors used as a retriever. Layers are numbered "
                 "0..L-1 over the transformer blocks' outputs (the embedding output is not a layer; L-1 is the "
                 "final layer). **Bold**: each model's best layer.")
    lines.append("")
    depth = max(max(values) for values in layers.values()) + 1
    rows = [{"layer": layer, **{name: values.get(layer) for name, values in layers.items()}} for layer in range(depth)]
    lines.append(markdown_table(rows, ["layer", *layers], bold_best=list(layers)))
    if image:
        lines += [f"![Per-layer test {measure}]({image})", ""]
    return lines


def _training_section(stages: Sequence[Stage], notes: list[str], image: str | None) -> list[str]:
    lines = ["## Training", ""]
    if image:
        lines += ["Loss terms against optimizer step (faint: each logged value; bold: trailing moving average), "
                  "one colour per stage, stages laid end to end (dotted lines mark where a stage starts); "
                  "dev metrics from the eval rows.", "", f"![Training curves]({image})", ""]
    elif stages:
        lines += ["The training logs hold no loss terms or dev metrics to plot.", ""]
    lines += [f"{note}" for note in notes] + ([""] if notes else [])
    return lines


def _layer_section(pair_rows: list, image: str | None, has_distill: bool) -> list[str]:
    lines = ["## Layer selection (LEAD)", ""]
    if not pair_rows:
        why = ("the distill logs have no `pairs` (the LEAD layer loss was off)" if has_distill
               else "no distill stage logs")
        return lines + [f"No layer-selection data: {why}.", ""]
    lines += ["Top: the weight w_k of each chosen pair position k over steps. Bottom left: the teacher layer "
              "taught to each student layer over time; bottom right: how often each (student, teacher) pair "
              "was chosen among the logged steps.", ""]
    if image:
        lines += [f"![Layer weights and chosen layers]({image})", ""]
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _facts(models: dict, measures: list[str], layers: dict, layer_measure: str, stages: Sequence[Stage],
           pair_rows: list) -> str:
    """Plain statements of what the numbers say, no judgement: one paragraph on the test results, one on
    training."""
    results: list[str] = []
    main = measures[0] if measures else None
    lead = models.get(_LEAD_MODEL)
    baseline = _baseline(models)
    if main and lead and baseline:
        changes = []
        for m in measures:
            here, there = lead.get(m), models[baseline].get(m)
            if here is not None and there is not None:
                changes.append(f"{m} by {here - there:+.{_DIGITS}f} ({there:.{_DIGITS}f} → {here:.{_DIGITS}f})")
        if changes:
            results.append(f"LEAD changed test {' and '.join(changes)} over {_MODEL_PHRASES[baseline]}.")
    if main and "student_init" in models and "student_warmup" in models:
        before, after = models["student_init"].get(main), models["student_warmup"].get(main)
        if before is not None and after is not None:
            results.append(f"Warm-up took the student's test {main} from {before:.{_DIGITS}f} to {after:.{_DIGITS}f} "
                           f"({after - before:+.{_DIGITS}f}).")
    teacher = models.get("teacher")
    if main and teacher and teacher.get(main) is not None:
        sentence = f"The teacher scores {teacher[main]:.{_DIGITS}f} test {main}"
        if lead and lead.get(main) is not None and teacher[main] > 0:
            sentence += f"; the LEAD student reaches {100 * lead[main] / teacher[main]:.1f}% of that"
        results.append(sentence + ".")
    elif main and models and not (lead and baseline):
        scored = {name: values[main] for name, values in models.items() if values.get(main) is not None}
        if scored:
            results.append("Test " + main + ": " + ", ".join(f"`{n}` {v:.{_DIGITS}f}" for n, v in scored.items()) + ".")
    final_best, elsewhere = [], []
    for name, values in layers.items():
        known = {layer: value for layer, value in values.items() if value is not None}
        if known:
            layer = max(known, key=lambda key: (known[key], -key))
            if layer == max(values):
                final_best.append(f"`{name}`")
            else:
                final = values[max(values)]
                versus = "no value" if final is None else f"{final:.{_DIGITS}f}"
                elsewhere.append(f"`{name}`'s best single layer is layer {layer} of 0..{max(values)} "
                                 f"({known[layer]:.{_DIGITS}f}; its final layer: {versus})")
    if final_best:
        whose = f"{final_best[0]}'s best single layer is its" if len(final_best) == 1 else \
            f"the best single layer of {', '.join(final_best)} is each one's"
        results.append(f"By per-layer test {layer_measure}, {whose} final layer.")
    if elsewhere:
        results.append("; ".join(elsewhere) + ".")
    training: list[str] = []
    for stage in stages:
        parts = [f"{len(stage.steps)} logged training rows up to step {stage.last_step}"]
        seconds = [row["seconds"] for row in stage.steps if _is_number(row.get("seconds"))]
        if seconds:
            parts[0] += f" in {max(seconds):.0f} s"
        losses = [float(row["loss"]) for row in stage.steps if _is_number(row.get("loss"))]
        if losses:
            window = max(1, min(len(losses) // 10, 50))
            parts.append(f"loss {_mean(losses[:window]):.4f} → {_mean(losses[-window:]):.4f} "
                         f"(means of the first and last {window} logged rows)")
        evals = [(row["step"], row["eval"]) for row in stage.evals]
        dev = next((m for m in ([main] if main else []) + [k for _, e in evals for k in e]
                    if any(_is_number(e.get(m)) for _, e in evals)), None)
        if dev:
            points = [(step, float(e[dev])) for step, e in evals if _is_number(e.get(dev))]
            best_step, best_value = max(points, key=lambda p: (p[1], -p[0]))
            parts.append(f"dev {dev} {points[0][1]:.4f} (step {points[0][0]}) → {points[-1][1]:.4f} "
                         f"(step {points[-1][0]}), best {best_value:.4f} at step {best_step}")
        training.append(f"Stage `{stage.name}`: " + "; ".join(parts) + ".")
    if pair_rows:
        counts = Counter(tuple(pair) for _, row in pair_rows for pair in row.get("pairs") or [])
        (student, teacher), count = max(counts.items(), key=lambda item: (item[1], [-x for x in item[0]]))
        training.append(f"LEAD chose {len(counts)} distinct (student, teacher) layer pairs; the most frequent, "
                        f"student {student} ← teacher {teacher}, in {count} of {len(pair_rows)} logged steps.")
    paragraphs = [" ".join(part) for part in (results, training) if part]
    return "\n\n".join(paragraphs) if paragraphs else "Nothing to summarise: the run folder holds no results or logs."


# =============================================================================== the report

def _emit(path: Path, draw, *args) -> str | None:
    """Draw a plot to ``path`` (returns its relative link), or remove a stale one when ``draw`` is None."""
    if draw is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    draw(*args, path)
    return path.name


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` and its PNGs from ``results.json`` and ``stages/*/metrics.jsonl``.

    Missing data becomes a one-line note in the report; a malformed ``results.json`` (not JSON, not an
    object) raises :class:`InputError`, a missing folder :class:`LeadkdError`. Returns the report's path.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise LeadkdError(f"{run}: no such run folder")
    results = _read_results(run)
    models, measures = _models(results) if results else ({}, [])
    layers, layer_measure = _layers(results, measures) if results else ({}, "nDCG@10")
    stages, stage_notes = _read_stages(run)

    per_layer = _emit(run / PLOTS["per_layer"], _plot_per_layer if layers else None, layers, layer_measure)

    terms = [t for t in LOSS_TERMS if any(_series(stage.steps, t)[0] for stage in stages)]
    if "ce" in terms and all(row.get("ce") == row.get("loss") for stage in stages for row in stage.steps
                             if "ce" in row):
        terms.remove("ce")  # a single-model stage's loss is its contrastive loss: one panel says it all
    dev_measures: list[str] = []
    for stage in stages:
        for row in stage.evals:
            dev_measures += [k for k, v in row["eval"].items() if _is_number(v) and k not in dev_measures]
    curves = _emit(run / PLOTS["training_curves"], _plot_training if terms or dev_measures else None,
                   stages, terms, dev_measures)

    pair_rows = [(stage, row) for stage in stages for row in stage.steps
                 if isinstance(row.get("pairs"), list) and row["pairs"]
                 and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
                         for p in row["pairs"])]
    student_depth = max([s + 1 for _, row in pair_rows for s, _ in row["pairs"]]
                        + [max(layers.get(name, {-1: None})) + 1 for name in (_LEAD_MODEL, *_BASELINES)], default=1)
    teacher_depth = max([t + 1 for _, row in pair_rows for _, t in row["pairs"]]
                        + [max(layers.get("teacher", {-1: None})) + 1], default=1)
    weights = _emit(run / PLOTS["layer_weights"], _plot_layer_weights if pair_rows else None,
                    pair_rows, student_depth, teacher_depth, len({stage.name for stage, _ in pair_rows}) > 1)

    dataset = results.get("dataset") if results else None
    lines = [f"# LEAD run report{f': {_escape(dataset)}' if dataset else ''}", "",
             "Built by `leadkd report` from `results.json` and `stages/*/metrics.jsonl` in this folder.", ""]
    lines += _run_section(results, stages)
    lines += ["## What happened", "", _facts(models, measures, layers, layer_measure, stages, pair_rows), ""]
    lines += _results_section(results, models, measures)
    lines += _per_layer_section(results, layers, layer_measure, per_layer)
    lines += _training_section(stages, stage_notes, curves)
    has_distill = any(stage.name.lower().startswith(("distill", "lead")) for stage in stages)
    lines += _layer_section(pair_rows, weights, has_distill)
    text = "\n".join(lines).rstrip("\n") + "\n"
    text = re.sub(r"\n{3,}", "\n\n", text)
    report = run / REPORT_NAME
    with atomic_write(report) as handle:
        handle.write(text)
    return report
