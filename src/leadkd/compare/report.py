"""A comparison's ledger (``compare.json``) as numbers a reviewer accepts: ``compare.md`` and two plots.

Per evaluation set and measure: each variant's mean ± sample std over its seeds; against the reference,
the mean of the per-seed differences with a 95% Student-t interval (:func:`leadkd.compare.stats.paired_interval`)
and the two-sided p-value of a paired randomization test on the per-query metric averaged over the seeds
both variants share (:func:`leadkd.compare.stats.randomization_test`). Plots: each variant's dev curve (mean over
seeds, band from min to max) and each variant's Δ with its interval per evaluation set.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..reporting.plots import new_figure, palette, save_png
from ..runtime.fileio import atomic_write
from .stats import paired_interval, randomization_test

__all__ = ["variant_values", "measure_key", "paired_comparison", "render_compare", "report_dir", "mean_std",
           "delta_cell", "p_cell"]


def _variants(ledger: dict) -> list[str]:
    names = list(ledger.get("spec", {}).get("variants", {}))
    seen = [row["variant"] for row in ledger["rows"].values()]
    return names + [name for name in dict.fromkeys(seen) if name not in names]


def measure_key(ledger: dict, split: str, measure: str) -> str:
    """The name a measure is stored under for ``split``: with the set's ``rel`` (TREC DL's 2) binary
    measures carry it (``R@100`` -> ``R(rel=2)@100``), as ir-measures names them; nDCG does not."""
    from ..retrieval.evaluate import parse_measure

    rel = (ledger.get("spec", {}).get("evaluate", {}).get(split) or {}).get("rel")
    return str(parse_measure(measure, rel)) if rel else measure


def variant_values(ledger: dict, split: str, measure: str) -> dict[str, dict[int, float]]:
    """``{variant: {seed: aggregate value}}`` of every finished row on ``split``."""
    out: dict[str, dict[int, float]] = {name: {} for name in _variants(ledger)}
    measure = measure_key(ledger, split, measure)
    for row in ledger["rows"].values():
        found = row["splits"].get(split, {}).get("aggregate", {})
        if measure in found:
            out[row["variant"]][int(row["seed"])] = float(found[measure])
    return out


def _per_query(ledger: dict, variant: str, split: str, measure: str, seeds: list[int]) -> dict[str, float]:
    """Each query's metric averaged over ``seeds`` (empty when a row kept no per-query metrics)."""
    rows = [ledger["rows"][f"{variant}/seed{seed}"]["splits"][split].get("per_query") for seed in seeds]
    if not all(rows):
        return {}
    measure = measure_key(ledger, split, measure)
    return {qid: statistics.fmean(row[qid][measure] for row in rows) for qid in rows[0]}


def paired_comparison(ledger: dict, split: str, measure: str, variant: str, reference: str) -> dict[str, Any] | None:
    """Δ of ``variant`` against ``reference`` over their common seeds: interval and randomization p-value."""
    values = variant_values(ledger, split, measure)
    seeds = sorted(set(values.get(variant, {})) & set(values.get(reference, {})))
    if not seeds:
        return None
    interval = paired_interval([values[variant][s] - values[reference][s] for s in seeds])
    a = _per_query(ledger, variant, split, measure, seeds)
    b = _per_query(ledger, reference, split, measure, seeds)
    queries = sorted(set(a) & set(b))
    p = randomization_test([a[q] for q in queries], [b[q] for q in queries]) if queries else math.nan
    return {"seeds": seeds, "delta": interval.mean, "low": interval.low, "high": interval.high, "p": p,
            "queries": len(queries)}


def mean_std(values: list[float]) -> str:
    """A table cell: ``mean ± sample std`` (4 decimals), the value alone for one seed, ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def delta_cell(found: dict[str, Any] | None) -> str:
    """A :func:`paired_comparison` as a table cell: ``+Δ [low, high]``, or ``+Δ (1 seed)``, or ``—``."""
    if found is None:
        return "—"
    if found["low"] is None:
        return f"{found['delta']:+.4f} (1 seed)"
    return f"{found['delta']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]"


def p_cell(found: dict[str, Any] | None) -> str:
    """Its p-value as a cell (3 significant digits), ``—`` where no per-query metrics were kept."""
    return "—" if found is None or math.isnan(found["p"]) else f"{found['p']:.3g}"


def _tables(ledger: dict, splits: list[str], measures: list[str], reference: str) -> list[str]:
    lines = []
    for split in splits:
        first = measures[0]
        lines += [f"## {split}", "", "| variant | " + " | ".join(measure_key(ledger, split, m) for m in measures)
                  + f" | Δ {measure_key(ledger, split, first)} vs {reference} "
                  "[95% CI over seeds] | p (randomization, per query) | seeds |",
                  "|---|" + "---:|" * (len(measures) + 3)]
        per_measure = {m: variant_values(ledger, split, m) for m in measures}
        for name in _variants(ledger):
            cells = [mean_std([per_measure[m][name][s] for s in sorted(per_measure[m][name])]) for m in measures]
            found = None if name == reference else paired_comparison(ledger, split, first, name, reference)
            delta = "reference" if name == reference else delta_cell(found)
            p = "" if name == reference else p_cell(found)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {delta} | {p} | {len(per_measure[first][name])} |")
        lines.append("")
    return lines


def _plot_dev(ledger: dict, path: Path) -> bool:
    curves: dict[str, list[list[list[float]]]] = {}
    for row in ledger["rows"].values():
        if row.get("dev"):
            curves.setdefault(row["variant"], []).append(row["dev"])
    if not curves:
        return False
    figure = new_figure(6.4, 3.8)
    axes = figure.add_subplot()
    for color, (name, runs) in zip(palette(len(curves)), curves.items(), strict=True):
        steps = sorted({point[0] for run in runs for point in run})
        by_step = [[v for run in runs for s, v in run if s == step] for step in steps]
        axes.plot(steps, [statistics.fmean(v) for v in by_step], color=color, label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            axes.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=color, alpha=0.2)
    axes.set_xlabel("optimizer step")
    metrics = {row.get("dev_metric") for row in ledger["rows"].values() if row.get("dev")} - {None}
    axes.set_ylabel(f"dev {metrics.pop() if len(metrics) == 1 else 'metric'} (checkpoint choice)")
    axes.set_title("Dev curves: mean over seeds, band = min..max")
    axes.legend(fontsize="small")
    save_png(figure, path)
    return True


def _plot_deltas(ledger: dict, splits: list[str], measure: str, reference: str, path: Path) -> bool:
    names = [name for name in _variants(ledger) if name != reference]
    found = {(split, name): paired_comparison(ledger, split, measure, name, reference)
             for split in splits for name in names}
    if not any(found.values()):
        return False
    figure = new_figure(6.4, 3.8)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(names))
    for offset, (color, name) in enumerate(zip(palette(len(names)), names, strict=True)):
        for index, split in enumerate(splits):
            item = found[(split, name)]
            if item is None:
                continue
            x = index + (offset - (len(names) - 1) / 2) * width
            error = None if item["low"] is None else [[item["delta"] - item["low"]], [item["high"] - item["delta"]]]
            axes.errorbar([x], [item["delta"]], yerr=error, fmt="o", color=color, capsize=4,
                          label=name if index == 0 else None)
    axes.axhline(0.0, color="gray", linewidth=0.8)
    axes.set_xticks(range(len(splits)), splits)
    axes.set_ylabel(f"Δ {measure} vs {reference}")
    axes.set_title("Paired difference per evaluation set (95% CI over seeds)")
    axes.legend(fontsize="small")
    save_png(figure, path)
    return True


def report_dir(ledger_path: str | Path) -> Path:
    """Where a ledger's page goes: beside ``compare.json``, else in a folder named after the ledger file."""
    path = Path(ledger_path)
    return path.parent if path.name == "compare.json" else path.with_suffix("")


def render_compare(ledger: dict, out_dir: str | Path) -> Path:
    """Write ``compare.md``, ``dev_curves.png`` and ``deltas.png`` into ``out_dir``; returns the page."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ledger.get("spec", {})
    reference = spec.get("reference") or _variants(ledger)[0]
    splits = list(spec.get("evaluate") or {name: None for row in ledger["rows"].values() for name in row["splits"]})
    measures = list(spec.get("measures") or ["nDCG@10"])
    rows = ledger["rows"].values()
    cpu = sum(row.get("cpu_seconds") or 0.0 for row in rows)
    wall = sum(row.get("wall_seconds") or 0.0 for row in rows)
    lines = ["# Comparison", "",
             (f"Spec: `{spec.get('source', '?')}` (base `{spec.get('base', '?')}`); reference `{reference}`; "
              f"{len(ledger['rows'])} rows; compute {wall / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU."),
             "", ("Mean ± sample std over seeds. Δ: mean of per-seed differences against the reference (same seed: "
                  "same data order and init) with a 95% Student-t interval; p: two-sided paired randomization test "
                  "on each query's metric averaged over the shared seeds. Checkpoints were chosen on the dev split; "
                  "none of these sets chose anything."), ""]
    lines += _tables(ledger, splits, measures, reference)
    if _plot_dev(ledger, out / "dev_curves.png"):
        lines += ["![dev curves](dev_curves.png)", ""]
    if _plot_deltas(ledger, splits, measures[0], reference, out / "deltas.png"):
        lines += ["![paired differences](deltas.png)", ""]
    lines += ["## Rows", "", "| row | wall s | CPU s | model |", "|---|---:|---:|---|"]
    for key, row in ledger["rows"].items():
        lines.append(f"| {key} | {row.get('wall_seconds') or 0:.0f} | {row.get('cpu_seconds') or 0:.0f} "
                     f"| `{row['model']}` |")
    page = out / "compare.md"
    with atomic_write(page) as handle:
        handle.write("\n".join(lines) + "\n")
    return page
