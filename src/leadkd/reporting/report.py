"""`leadkd report RUN`: a Markdown report with tables and plots of one LEAD run folder.

Reads (see docs/report.md for the contract)::

    RUN/results.json                  the run's results (:mod:`leadkd.reporting.results`): models, stages, settings
    RUN/<stage folder>/metrics.jsonl  the trainer's log of each training stage (any may be missing)

Writes, each file atomically (a reader never sees half of one)::

    RUN/report.md  RUN/per_layer.png  RUN/training_curves.png  RUN/layer_weights.png

The report knows no stage or model names: ``results.json`` says what the run's models and stages are
(name, role, order, which stage made which model) and the report renders that. A section whose data is
missing becomes one line saying so; its PNG is not written (and a stale one from an earlier build is
removed). Building twice from the same inputs gives the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runtime.errors import LeadkdError
from ..runtime.fileio import atomic_write
from .plots import plot_layer_weights, plot_per_layer, plot_training, run_colors
from .results import RESULTS_NAME, Model, RunResults, finite_number, read_results
from .stage_logs import StageLog, read_stage_logs

__all__ = ["build_report", "markdown_table", "LOSS_TERMS", "REPORT_NAME", "PLOTS"]

REPORT_NAME = "report.md"
PLOTS = {"per_layer": "per_layer.png", "training_curves": "training_curves.png",
         "layer_weights": "layer_weights.png"}

#: Scalar loss terms the trainer logs, in plotting order (``ce`` is a single-model `train` stage's loss).
LOSS_TERMS = ("loss", "ce", "student_ce", "teacher_ce", "response_kl", "layer_kl")
#: Terms only a distillation stage logs: a stage with them and no ``pairs`` ran without the LEAD layer loss.
_DISTILL_TERMS = ("student_ce", "teacher_ce", "response_kl")
_MISSING = "—"
_DIGITS = 4


# =============================================================================== Markdown tables

def _escape(text: object) -> str:
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


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _reads_as_number(text: str) -> bool:
    """A cell a reader takes for a number (signed, ``+0.0120`` or ``−0.5``) or for a blank."""
    return text in (_MISSING, "-", "–") or bool(_NUMBER.match(text.replace("\u2212", "-")))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], bold_best: bool | Iterable[str] = True,
                   *, digits: int = _DIGITS, headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) over ``columns`` (keys, in order).

    Floats are shown with ``digits`` decimals, ints as they are, strings as given (pipes escaped),
    ``None``/NaN/missing keys as ``—``. ``bold_best``: ``True`` bolds the highest value of every column
    holding at least two numbers (ties all bold, compared as displayed), ``False`` none, or a collection
    of column names to bold only those. ``headers`` renames columns in the header line. Columns whose
    cells all read as numbers (or blanks) are right-aligned. Ends with a newline.
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
        numbers = [round(row[column], digits) for row in rows if finite_number(row.get(column))]
        if column in bolded and len(numbers) >= 2:
            best[column] = max(numbers)
    headers = headers or {}
    lines = ["| " + " | ".join(_escape(headers.get(column, column)) for column in columns) + " |"]
    numeric = {column for column in columns
               if all(_reads_as_number(_cell(row.get(column), digits)) for row in rows)}
    lines.append("|" + "|".join("---:" if column in numeric else "---" for column in columns) + "|")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = _cell(value, digits)
            if column in best and finite_number(value) and round(value, digits) == best[column]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# =============================================================================== what the results hold

def _scored(results: RunResults | None) -> dict[str, dict[str, float | None]]:
    """Test metrics by model name, for the models that have them, in the file's order."""
    if results is None:
        return {}
    assert results.test_split is not None  # read_results checks that the splits name one
    return {model.name: model.metrics[results.test_split] for model in results.models
            if model.metrics.get(results.test_split)}


def _lead_and_start(results: RunResults | None, scored: Mapping[str, Any]) -> tuple[Model, Model] | None:
    """The LEAD student and the model its stage started from (its Δ baseline), both scored on test."""
    lead = results.with_role("lead") if results else None
    start = results.start_of(lead.name) if results and lead else None
    return (lead, start) if lead and start and lead.name in scored and start.name in scored else None


def _layers(results: RunResults | None) -> tuple[dict[str, list[float | None]], str]:
    """Per-layer values by model of the first measure any model has them for, and that measure."""
    models = results.models if results else ()
    measure = next((m for m in (results.measures if results else ()) if any(x.layers.get(m) for x in models)),
                   "nDCG@10")
    return {model.name: list(model.layers[measure]) for model in models if model.layers.get(measure)}, measure


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


def _run_section(results: RunResults | None, stages: Sequence[StageLog]) -> list[str]:
    lines = ["## Run", ""]
    if results is None:
        lines += ["No `results.json`: dataset, settings and test metrics are unknown.", ""]
    else:
        lines.append(f"- Dataset: {_escape(results.dataset) if results.dataset else 'not recorded'}")
        lines.append("- Splits: " + ", ".join(f"{_escape(k)} = `{_escape(v)}`" for k, v in results.splits.items()))
    if stages:
        lines.append("- Training stages: " + ", ".join(
            f"`{stage.name}` ({stage.last_step} steps)" for stage in stages))
    lines.append("")
    if results is not None:
        if results.settings:
            rows = [{"setting": key, "value": _setting_text(value)} for key, value in _flatten(results.settings)]
            lines += [markdown_table(rows, ["setting", "value"], bold_best=False)]
        else:
            lines += ["No settings recorded in `results.json`.", ""]
        lines += _time_section(results.timings, stages)
    return lines


def _time_section(timings: Mapping[str, float], stages: Sequence[StageLog]) -> list[str]:
    """Where the wall time went: each step of the run (from ``results.json``) and its dev evaluations
    (from its log)."""
    if not timings:
        return []
    evals = {stage.name: sum(row["eval_seconds"] for row in stage.evals if finite_number(row.get("eval_seconds")))
             for stage in stages}

    def seconds(value: float | None) -> str | None:
        return f"{value:.0f}" if value else None

    rows = [{"stage": name, "seconds": seconds(value), "of which dev evaluation": seconds(evals.get(name))}
            for name, value in timings.items()]
    rows.append({"stage": "total", "seconds": seconds(sum(timings.values())),
                 "of which dev evaluation": seconds(sum(evals.values()))})
    return ["Wall time by stage (seconds; `test_*`: the test-split evaluation of each model, per layer):", "",
            markdown_table(rows, ["stage", "seconds", "of which dev evaluation"], bold_best=False)]


def _results_section(results: RunResults | None, scored: dict, measures: list[str]) -> list[str]:
    lines = ["## Test results", ""]
    if results is None:
        return lines + ["No test metrics: `results.json` not found.", ""]
    if not scored or not measures:
        return lines + ["No test metrics: no model in `results.json` has been scored on the test split.", ""]
    pair = _lead_and_start(results, scored)
    baseline = pair[1].name if pair else None
    rows = []
    for name, values in scored.items():
        row: dict[str, Any] = {"model": name, **{m: values.get(m) for m in measures}}
        if baseline:
            for m in measures:
                here, there = values.get(m), scored[baseline].get(m)
                if name != baseline and here is not None and there is not None:
                    row[f"Δ {m}"] = f"{here - there:+.{_DIGITS}f}"
        rows.append(row)
    columns = ["model", *measures] + ([f"Δ {m}" for m in measures] if baseline else [])
    lines.append(f"Metrics on the test split (`{_escape(results.test_split)}`). **Bold**: best value per measure."
                 + (f" Δ: difference to `{baseline}`." if baseline else ""))
    lines += ["", markdown_table(rows, columns, bold_best=measures)]
    return lines + _lead_vs_response_kd(results)


def _lead_vs_response_kd(results: RunResults) -> list[str]:
    """The paired comparison the quickstart runs: LEAD against response-only KD from the same warm start."""
    found = results.lead_vs_response_kd
    if found is None:
        return []
    return [(f"**LEAD against response-only KD** (same warm start, teacher, data and budget; the layer term is "
             f"the only difference): Δ {_escape(found.measure)} = {found.delta:+.{_DIGITS}f} "
             f"over {found.queries} test queries, paired randomization test p = {found.p:.3g}. One seed: "
             "another seed can move Δ by about as much as the seed-to-seed spread; `leadkd compare` runs several "
             "seeds and gives a confidence interval."), ""]


def _per_layer_section(results: RunResults | None, layers: dict, measure: str, image: str | None) -> list[str]:
    lines = ["## Per-layer quality", ""]
    if results is None:
        return lines + ["No per-layer results: `results.json` not found.", ""]
    if not layers:
        return lines + ["No per-layer results: `results.json` has no `layers`.", ""]
    lines.append(f"Test {measure} of each layer's pooled vectors used as a retriever. Layers are numbered "
                 "0..L-1 over the transformer blocks' outputs (the embedding output is not a layer; L-1 is the "
                 "final layer). **Bold**: each model's best layer.")
    lines.append("")
    depth = max(len(values) for values in layers.values())
    rows = [{"layer": layer,
             **{name: values[layer] if layer < len(values) else None for name, values in layers.items()}}
            for layer in range(depth)]
    lines.append(markdown_table(rows, ["layer", *layers], bold_best=list(layers)))
    if image:
        lines += [f"![Per-layer test {measure}]({image})", ""]
    return lines


def _training_section(stages: Sequence[StageLog], notes: list[str], image: str | None) -> list[str]:
    lines = ["## Training", ""]
    if image:
        lines += [("Loss terms against optimizer step (faint: each logged value; bold: trailing moving average), "
                   "one colour per stage, stages laid end to end (dotted lines mark where a stage starts); "
                   "dev metrics from the eval rows."), "", f"![Training curves]({image})", ""]
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
    lines += [("Top: the weight w_k of each chosen pair position k over steps. Bottom left: the teacher layer "
               "taught to each student layer over time; bottom right: how often each (student, teacher) pair "
               "was chosen among the logged steps."), ""]
    if image:
        lines += [f"![Layer weights and chosen layers]({image})", ""]
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _result_facts(results: RunResults | None, scored: dict, measures: list[str], layers: dict,
                  layer_measure: str) -> list[str]:
    """What the test and per-layer numbers say: LEAD against its start, the warm-up, the teacher."""
    facts: list[str] = []
    main = measures[0] if measures else None
    pair = _lead_and_start(results, scored)
    if main and pair:
        changes = []
        for m in measures:
            here, there = scored[pair[0].name].get(m), scored[pair[1].name].get(m)
            if here is not None and there is not None:
                changes.append(f"{m} by {here - there:+.{_DIGITS}f} ({there:.{_DIGITS}f} → {here:.{_DIGITS}f})")
        if changes:
            facts.append(f"LEAD changed test {' and '.join(changes)} over {pair[1].label}.")
    warmup = next((stage for stage in results.stages if stage.role == "warmup"), None) if results else None
    if main and warmup and warmup.start in scored and warmup.produces in scored:
        before, after = scored[warmup.start].get(main), scored[warmup.produces].get(main)
        if before is not None and after is not None:
            facts.append(f"Warm-up took the student's test {main} from {before:.{_DIGITS}f} to {after:.{_DIGITS}f} "
                         f"({after - before:+.{_DIGITS}f}).")
    teacher = results.with_role("teacher") if results else None
    lead = results.with_role("lead") if results else None
    top = scored.get(teacher.name, {}).get(main) if teacher and main else None
    if top is not None:
        assert teacher is not None  # top is the teacher's score
        sentence = f"{_sentence_case(teacher.label)} scores {top:.{_DIGITS}f} test {main}"
        reached = scored.get(lead.name, {}).get(main) if lead else None
        if reached is not None and top > 0:
            assert lead is not None  # reached is the LEAD student's score
            sentence += f"; {lead.label} reaches {100 * reached / top:.1f}% of that"
        facts.append(sentence + ".")
    elif main and scored and not pair:
        known = {name: values[main] for name, values in scored.items() if values.get(main) is not None}
        if known:
            facts.append("Test " + main + ": " + ", ".join(f"`{n}` {v:.{_DIGITS}f}" for n, v in known.items()) + ".")
    final_best, elsewhere = [], []
    for name, values in layers.items():
        known = {layer: value for layer, value in enumerate(values) if value is not None}
        if known:
            layer = max(known, key=lambda key: (known[key], -key))
            last = len(values) - 1
            if layer == last:
                final_best.append(f"`{name}`")
            else:
                versus = "no value" if values[last] is None else f"{values[last]:.{_DIGITS}f}"
                elsewhere.append(f"`{name}`'s best single layer is layer {layer} of 0..{last} "
                                 f"({known[layer]:.{_DIGITS}f}; its final layer: {versus})")
    if final_best:
        whose = f"{final_best[0]}'s best single layer is its" if len(final_best) == 1 else \
            f"the best single layer of {', '.join(final_best)} is each one's"
        facts.append(f"By per-layer test {layer_measure}, {whose} final layer.")
    if elsewhere:
        facts.append("; ".join(elsewhere) + ".")
    return facts


def _training_facts(stages: Sequence[StageLog], pair_rows: list, main: str | None) -> list[str]:
    """What each stage's log says: rows, time, loss from first to last rows, the dev metric, the layer pairs."""
    facts: list[str] = []
    for stage in stages:
        parts = [f"{len(stage.steps)} logged training rows up to step {stage.last_step}"]
        seconds = [row["seconds"] for row in stage.steps if finite_number(row.get("seconds"))]
        if seconds:
            parts[0] += f" in {max(seconds):.0f} s"
        losses = [float(row["loss"]) for row in stage.steps if finite_number(row.get("loss"))]
        if losses:
            window = max(1, min(len(losses) // 10, 50))
            parts.append(f"loss {_mean(losses[:window]):.4f} → {_mean(losses[-window:]):.4f} "
                         f"(means of the first and last {window} logged rows)")
        evals = [(row["step"], row["eval"]) for row in stage.evals]
        dev = next((m for m in ([main] if main else []) + [k for _, e in evals for k in e]
                    if any(finite_number(e.get(m)) for _, e in evals)), None)
        if dev:
            points = [(step, float(e[dev])) for step, e in evals if finite_number(e.get(dev))]
            best_step, best_value = max(points, key=lambda p: (p[1], -p[0]))
            parts.append(f"dev {dev} {points[0][1]:.4f} (step {points[0][0]}) → {points[-1][1]:.4f} "
                         f"(step {points[-1][0]}), best {best_value:.4f} at step {best_step}")
        facts.append(f"Stage `{stage.name}`: " + "; ".join(parts) + ".")
    if pair_rows:
        counts = Counter(tuple(pair) for _, row in pair_rows for pair in row.get("pairs") or [])
        (student, teacher), count = max(counts.items(), key=lambda item: (item[1], [-x for x in item[0]]))
        facts.append(f"LEAD chose {len(counts)} distinct (student, teacher) layer pairs; the most frequent, "
                     f"student {student} ← teacher {teacher}, in {count} of {len(pair_rows)} logged steps.")
    return facts


# =============================================================================== the report

def _emit(path: Path, draw, *args) -> str | None:
    """Draw a plot to ``path`` (returns its relative link), or remove a stale one when ``draw`` is None."""
    if draw is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    draw(*args, path)
    return path.name


def _colors(results: RunResults | None, stages: Sequence[StageLog]) -> dict[str, str]:
    """Every stage's and student's plot colour: a stage and the model it produced share one."""
    declared = results.stages if results else ()
    names = list(dict.fromkeys([stage.name for stage in declared] + [stage.name for stage in stages]))
    students = [model for model in (results.models if results else ()) if model.role != "teacher"]
    made_by = {model.name: getattr(results.stage_producing(model.name) if results else None, "name", None)
               for model in students}
    return run_colors(names, made_by)


def _pair_rows(stages: Sequence[StageLog]) -> list[tuple[StageLog, dict]]:
    """The step rows that logged LEAD's layer pairs (``[[student, teacher], ...]``), with their stage."""
    return [(stage, row) for stage in stages for row in stage.steps
            if isinstance(row.get("pairs"), list) and row["pairs"]
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
                    for p in row["pairs"])]


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` and its PNGs from ``results.json`` and the stages' ``metrics.jsonl``.

    Missing data becomes a one-line note in the report; a malformed ``results.json`` raises
    :class:`InputError` naming the field, a missing folder :class:`LeadkdError`. Returns the report's path.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise LeadkdError(f"{run}: no such run folder")
    results = read_results(run / RESULTS_NAME) if (run / RESULTS_NAME).is_file() else None
    scored, measures = _scored(results), list(results.measures) if results else []
    layers, layer_measure = _layers(results)
    stages, stage_notes = read_stage_logs(run, results.stages if results else ())
    colors = _colors(results, stages)
    teacher = getattr(results.with_role("teacher") if results else None, "name", None)

    per_layer = _emit(run / PLOTS["per_layer"], plot_per_layer if layers else None, layers, layer_measure,
                      colors, teacher)

    terms = [t for t in LOSS_TERMS if any(finite_number(row.get(t)) for stage in stages for row in stage.steps)]
    if "ce" in terms and all(row.get("ce") == row.get("loss") for stage in stages for row in stage.steps
                             if "ce" in row):
        terms.remove("ce")  # a single-model stage's loss is its contrastive loss: one panel says it all
    dev_measures: list[str] = []
    for stage in stages:
        for row in stage.evals:
            dev_measures += [k for k, v in row["eval"].items() if finite_number(v) and k not in dev_measures]
    curves = _emit(run / PLOTS["training_curves"], plot_training if terms or dev_measures else None,
                   stages, terms, dev_measures, colors)

    pair_rows = _pair_rows(stages)
    student_depth = max([s + 1 for _, row in pair_rows for s, _ in row["pairs"]]
                        + [len(values) for name, values in layers.items() if name != teacher], default=1)
    teacher_depth = max([t + 1 for _, row in pair_rows for _, t in row["pairs"]]
                        + [len(layers.get(teacher, [])) if teacher is not None else 0], default=1)
    weights = _emit(run / PLOTS["layer_weights"], plot_layer_weights if pair_rows else None,
                    pair_rows, student_depth, teacher_depth, len({stage.name for stage, _ in pair_rows}) > 1)

    dataset = results.dataset if results else None
    facts = [" ".join(part) for part in (_result_facts(results, scored, measures, layers, layer_measure),
                                         _training_facts(stages, pair_rows, measures[0] if measures else None))
             if part]
    lines = [f"# LEAD run report{f': {_escape(dataset)}' if dataset else ''}", "",
             "Built by `leadkd report` from `results.json` and `stages/*/metrics.jsonl` in this folder.", ""]
    lines += _run_section(results, stages)
    lines += ["## What happened", "",
              "\n\n".join(facts) if facts else "Nothing to summarise: the run folder holds no results or logs.", ""]
    lines += _results_section(results, scored, measures)
    lines += _per_layer_section(results, layers, layer_measure, per_layer)
    lines += _training_section(stages, stage_notes, curves)
    has_distill = any(any(term in row for term in _DISTILL_TERMS) for stage in stages for row in stage.steps)
    lines += _layer_section(pair_rows, weights, has_distill)
    text = "\n".join(lines).rstrip("\n") + "\n"
    text = re.sub(r"\n{3,}", "\n\n", text)
    report = run / REPORT_NAME
    with atomic_write(report) as handle:
        handle.write(text)
    return report
