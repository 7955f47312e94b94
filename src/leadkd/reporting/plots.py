"""The report's plots, drawn with matplotlib's object-oriented API (``Figure`` + ``FigureCanvasAgg``).

No pyplot, no backend switch, no global state touched, so plots can be drawn inside any other program;
matplotlib is imported only when a plot is drawn (the CLI starts without it). Every PNG is written
atomically, and the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..runtime.fileio import atomic_write
from .results import finite_number

__all__ = ["new_figure", "save_png", "palette", "run_colors", "plot_per_layer", "plot_training",
           "plot_layer_weights"]

DPI = 100
_TERM_TITLES = {"loss": "loss (total)", "ce": "ce (single-model contrastive)", "student_ce": "student_ce",
                "teacher_ce": "teacher_ce", "response_kl": "response_kl", "layer_kl": "layer_kl (LEAD, weighted)"}
#: The colour of a model no stage produced (an untrained start, such as the initial student).
UNTRAINED = "#7f7f7f"


def new_figure(width: float, height: float):
    """A ``width`` x ``height`` inch figure with an Agg canvas of its own (pyplot and its backend untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> None:
    """Render ``figure`` atomically to ``path`` (a temporary file beside it, renamed into place)."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI)


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
        if finite_number(value):
            xs.append(row["step"] + offset)
            ys.append(float(value))
    return xs, ys


def palette(count: int) -> list[str]:
    """``count`` distinct colours (repeating after ten)."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", UNTRAINED]
    return [colors[i % len(colors)] for i in range(count)]


def run_colors(stages: Sequence[str], models: Mapping[str, str | None]) -> dict[str, str]:
    """One colour per name in every plot: each stage its own, in order, shared by the model it produced
    (``models``: model name -> the stage that produced it, or None). The first model no stage produced is
    gray (an untrained start); further ones take the colours no stage has."""
    stage_colors = [color for color in palette(10) if color != UNTRAINED]
    colors = {name: stage_colors[i % len(stage_colors)] for i, name in enumerate(stages)}
    free = [UNTRAINED] + [color for color in stage_colors if color not in colors.values()]
    others = [name for name, stage in models.items() if stage not in colors]
    return {**colors, **{name: colors[stage] for name, stage in models.items() if stage in colors},
            **{name: free[i % len(free)] for i, name in enumerate(others)}}


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_per_layer(layers: Mapping[str, Sequence[float | None]], measure: str, colors: Mapping[str, str],
                   teacher: str | None, path: Path) -> None:
    """Each model's per-layer test ``measure`` (values by layer 0..L-1), the teacher in black."""
    figure = new_figure(8, 4.8)
    axes = figure.add_subplot()
    for name, values in layers.items():
        xs = list(range(len(values)))
        ys = [math.nan if value is None else value for value in values]  # a gap, not a bridge
        if name == teacher:
            axes.plot(xs, ys, color="black", marker="s", linewidth=2.2, markersize=6, label=name)
        else:
            axes.plot(xs, ys, color=colors[name], marker="o", linewidth=1.6, markersize=5, label=name)
        known = [(x, y) for x, y in zip(xs, ys, strict=True) if not math.isnan(y)]
        if known:  # the last layer's value, written beside it
            axes.annotate(f"{known[-1][1]:.3f}", known[-1], textcoords="offset points", xytext=(6, 0),
                          va="center", fontsize=8, color="black" if name == teacher else colors[name])
    axes.set_title(f"Per-layer test {measure}: each layer's pooled vectors used as a retriever")
    axes.set_xlabel("layer (0 = first transformer block, last = final layer)")
    axes.set_ylabel(f"test {measure}")
    _integer_ticks(axes.xaxis)
    axes.margins(x=0.08)
    axes.grid(True, alpha=0.35)
    axes.legend(loc="best", fontsize=9)
    save_png(figure, path)


def _log_scale_fits(values: Iterable[float]) -> bool:
    values = list(values)
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def _stage_bounds(axes, stages: Sequence) -> None:
    for stage in stages[1:]:
        axes.axvline(stage.offset, color="gray", linestyle=":", linewidth=1)


def plot_training(stages: Sequence, terms: list[str], measures: list[str], colors: Mapping[str, str],
                  path: Path) -> None:
    """Loss ``terms`` and dev ``measures`` of stage logs (``name``, ``steps``, ``evals``, ``offset``) over
    steps laid end to end: raw values faint, a trailing moving average bold, one colour per stage."""
    from matplotlib.lines import Line2D

    # loss terms fill the first rows, dev metrics start on a row of their own
    widest = max(len(terms), len(measures))
    columns = 2 if widest in (2, 4) else min(3, widest)
    term_rows = math.ceil(len(terms) / columns)
    rows = term_rows + math.ceil(len(measures) / columns)
    places = [divmod(i, columns) for i in range(len(terms))]
    places += [(term_rows + i // columns, i % columns) for i in range(len(measures))]
    panels = [("term", term) for term in terms] + [("eval", measure) for measure in measures]
    figure = new_figure(5.2 * columns, 3.4 * rows + 0.6)
    grid = figure.add_gridspec(rows, columns)
    for (kind, key), (row, column) in zip(panels, places, strict=True):
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
    save_png(figure, path)


def _step_label(stages: Sequence) -> str:
    starts = {stage.name: stage.offset for stage in stages}
    if len(starts) == 1:
        return "step"
    beside = len(set(starts.values())) < len(starts)  # two stages starting at the same step: arms
    return "step (stages one after another" + ("; distillation arms side by side)" if beside else ")")


def plot_layer_weights(rows: Sequence[tuple], student_depth: int, teacher_depth: int, multi_stage: bool,
                       path: Path) -> None:
    """LEAD's layer choice from the (stage log, step row) pairs that logged ``pairs``: the weights w_k over
    steps, the teacher layer chosen for each student layer, and how often each pair was chosen."""
    import numpy as np

    figure = new_figure(12, 8.4)
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
    for k, color in zip(range(k_max), palette(k_max), strict=True):
        series = [(offset + row["step"], row["layer_weights"][k]) for offset, row in rows
                  if len(row.get("layer_weights") or []) > k and finite_number(row["layer_weights"][k])]
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
    student_colors = palette(student_depth)
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
    save_png(figure, path)

