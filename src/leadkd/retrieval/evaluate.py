"""Evaluation glue around ir-measures: every number comes from ir-measures (pytrec_eval underneath).

Conventions (chosen to match trec_eval, and BEIR's published numbers for complete runs):

* The query set is the qrels' query set. Run queries without qrels are ignored.
* A qrels query the run has no results for scores 0 on every measure but the counts: it adds 1 to NumQ
  and its relevant documents to NumRel, exactly as ``trec_eval -c`` counts it. BEIR averages
  only over queries present in the run, but its runs (and ours: search returns k documents for every
  query) cover every query, so the two agree; for a partial run ours is the honest number. A warning
  says how many queries were missing.
* A qrels query with no document at the relevance threshold still counts: binary measures give it 0,
  as trec_eval does (nDCG uses graded gains and is 0 only when no judgment is positive). A warning
  says how many such queries there are.
* ``rel`` (e.g. 2 for TREC DL) means what trec_eval's ``-l`` means: a document is relevant iff its
  judgment is >= rel. It is applied to binary measures (AP, RR, R, P, Success, ...) and to the counts
  NumRelRet and NumRel, never to NumRet (everything retrieved) nor to the graded nDCG, which uses the raw
  judgment as gain. Judgments <= 0 (trec_eval's -1: pooled but unjudged) are never relevant.
* ``Judged@k`` counts a document as judged iff its judgment is >= 0: a -1 is pooled but unjudged, as
  docs/data-formats.md and trec_eval read it (ir-measures alone would count any qrels line as judged).
* Ranking is score descending, ties by doc id descending, exactly as :func:`leadkd.data.runs.write_run`
  writes and trec_eval evaluates. ir-measures' providers break ties differently (pytrec_eval: doc id
  desc; its msmarco provider, used for RR@k: doc id asc), so scores are replaced by rank-derived
  values before evaluation: every measure sees the same single ranking.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import ir_measures
from ir_measures import Measure

from leadkd.data.runs import ranked
from leadkd.runtime.errors import ConfigError, LeadkdError
from leadkd.runtime.fileio import atomic_write, reporting_write_failures

logger = logging.getLogger(__name__)

DEFAULT_MEASURES = ["nDCG@10", "RR@10", "R@100", "R@1000", "AP"]
_EXAMPLES = "e.g. nDCG@10, RR@10, R@100, AP, P@5, Success@10, AP(rel=2)"


def _suggestion(name: str) -> str:
    """A case-insensitive match of the measure's base name, since 'ndcg@10' is the usual slip."""
    base = name.split("@")[0].split("(")[0].strip()
    for known in ir_measures.measures.registry:
        if known.lower() == base.lower() and known != base:
            return f" (did you mean {name.replace(base, known, 1)!r}?)"
    return ""


def _numrel_level(measure: Measure) -> int | None:
    """The threshold of a ``NumRel(rel=N)`` with N != 1, which ir-measures' providers refuse (only rel=1)."""
    if measure.NAME == "NumRel" and measure["rel"] != 1:
        return int(measure["rel"])
    return None


def _with_rel(measure: Measure, name: str | Measure, rel: int) -> Measure:
    """``measure`` thresholded at ``rel`` as by trec_eval ``-l``, unless its name gives a threshold itself.

    ir-measures spells relevant-retrieved ``NumRet(rel=N)`` and defines ``NumRelRet`` as ``NumRet(rel=1)``:
    so the plain NumRet (all retrieved) must not take ``rel``, and the NumRelRet alias's 1 is no user's choice.
    """
    if measure.NAME == "NumRet":
        return measure(rel=rel) if isinstance(name, str) and name.strip() == "NumRelRet" else measure
    if "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
        return measure(rel=rel)
    return measure


def parse_measure(name: str | Measure, rel: int | None = None) -> Measure:
    """One ir-measures measure from its name; ``rel`` sets the threshold of measures that lack one."""
    if isinstance(name, Measure):
        measure = name
    else:
        try:
            measure = ir_measures.parse_measure(str(name).strip())
            measure.validate_params()
        except (NameError, ValueError, SyntaxError, AssertionError) as exc:
            reason = str(exc).split(";")[0]
            raise LeadkdError(f"unknown measure {name!r}: {reason}{_suggestion(str(name))}; valid names: {_EXAMPLES}") \
                from None
    if rel is not None:
        measure = _with_rel(measure, name, rel)
    if _numrel_level(measure) is None and not ir_measures.DefaultPipeline.supports(measure):
        raise LeadkdError(f"measure {measure} is not supported by the installed ir-measures providers; "
                          f"valid names: {_EXAMPLES}")
    return measure


def parse_measures(names: Iterable[str | Measure], rel: int | None = None) -> list[Measure]:
    """Parse measure names; with ``rel`` binary measures and counts get ``rel=...`` (``AP`` -> ``AP(rel=2)``,
    ``NumRelRet`` -> ``NumRet(rel=2)``), nDCG and NumRet do not."""
    if rel is not None and (not isinstance(rel, int) or rel < 1):
        raise ConfigError(f"relevance threshold must be an integer >= 1, got {rel!r}")
    measures = list(dict.fromkeys(parse_measure(name, rel) for name in names))
    if not measures:
        raise ConfigError(f"no measures given; {_EXAMPLES}")
    return measures


def _clean_qrels(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    clean: dict[str, dict[str, int]] = {}
    for qid, docs in qrels.items():
        row: dict[str, int] = {}
        for doc_id, relevance in docs.items():
            try:
                valid = not isinstance(relevance, bool) and int(relevance) == relevance
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise LeadkdError(f"qrels: query {qid!r}, document {doc_id!r}: "
                                  f"relevance {relevance!r} is not an integer")
            row[str(doc_id)] = int(relevance)
        clean[str(qid)] = row
    if not clean:
        raise LeadkdError("qrels hold no queries: nothing to evaluate")
    return clean


def _rank_scores(run: Mapping[str, Mapping[str, float]], qids: set[str]) -> dict[str, dict[str, float]]:
    """Replace scores by ``n - rank`` so every ir-measures provider sees the one ranking of :func:`ranked`."""
    out: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        if str(qid) in qids and docs:
            order = ranked({str(d): float(s) for d, s in docs.items()})
            out[str(qid)] = {doc_id: float(len(order) - i) for i, (doc_id, _) in enumerate(order)}
    return out


def evaluate(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
             measures: Sequence[str | Measure] = DEFAULT_MEASURES, rel: int | None = None
             ) -> tuple[dict[str, float], list[dict]]:
    """Score ``run`` against ``qrels`` (conventions in the module docstring).

    Returns ``(aggregate, per_query)``: ``aggregate`` maps each measure's ir-measures name
    (``"nDCG@10"``, ``"AP(rel=2)"``) to its mean over the qrels' queries; ``per_query`` has one row
    ``{"query_id": ..., name: value, ...}`` per qrels query, in qrels order.
    """
    parsed = parse_measures(measures, rel)
    clean_qrels = _clean_qrels(qrels)
    qids = set(clean_qrels)
    ranked_run = _rank_scores(run, qids)
    if run and not any(str(q) in qids for q in run):
        raise LeadkdError(f"none of the run's {len(run)} queries appear in the qrels ({len(qids)} queries): "
                          "wrong split, or query ids in another format?")
    missing = len(qids) - len(ranked_run)
    if missing:
        logger.warning("%d of %d qrels queries have no retrieved documents; they score 0", missing, len(qids))
    threshold = rel or 1
    unjudged = sum(1 for docs in clean_qrels.values() if not any(r >= threshold for r in docs.values()))
    if unjudged:
        logger.warning("%d of %d qrels queries have no document with relevance >= %d; binary measures score them 0",
                       unjudged, len(qids), threshold)

    values: dict[str, dict[Measure, float]] = {qid: {} for qid in clean_qrels}
    for measure, metric in _calc(parsed, clean_qrels, ranked_run):
        if metric.query_id in values:
            values[metric.query_id][measure] = float(metric.value)
    per_query: list[dict] = []
    aggregators = {measure: measure.aggregator() for measure in parsed}
    for qid, row in values.items():
        out: dict = {"query_id": qid}
        for measure in parsed:
            if qid in ranked_run:
                value = row.get(measure, float(measure.DEFAULT))  # ir-measures versions differ on filling these
            else:
                value = _unretrieved_value(measure, clean_qrels[qid])
            aggregators[measure].add(value)
            out[str(measure)] = value
        per_query.append(out)
    aggregate = {str(measure): float(agg.result()) for measure, agg in aggregators.items()}
    return aggregate, per_query


def _unretrieved_value(measure: Measure, judgments: Mapping[str, int]) -> float:
    """A qrels query the run retrieved nothing for, as ``trec_eval -c`` counts it: it is one of NumQ's
    queries and its relevant documents are in NumRel (ir-measures emits no row for it, so both would
    otherwise be 0 while every mean divides by it); every other measure is 0."""
    if measure.NAME == "NumQ":
        return 1.0
    if measure.NAME == "NumRel":
        return float(sum(1 for relevance in judgments.values() if relevance >= measure["rel"]))
    return float(measure.DEFAULT)


def _calc(measures: Sequence[Measure], qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]):
    """(measure, ir-measures metric) pairs; ``NumRel(rel=N)`` is ir-measures' NumRel over the qrels
    binarised at N (relevant iff >= N), which is the very count trec_eval ``-l N`` gives."""
    direct = [m for m in measures if _numrel_level(m) is None and m.NAME != "Judged"]
    if direct:
        for metric in ir_measures.iter_calc(direct, qrels, run):
            yield metric.measure, metric
    judged = [m for m in measures if m.NAME == "Judged"]
    if judged:  # ir-measures counts every qrels line as judged; trec_eval's -1 says "pooled, not judged"
        assessed = {qid: {doc: r for doc, r in docs.items() if r >= 0} for qid, docs in qrels.items()}
        for metric in ir_measures.iter_calc(judged, assessed, run):
            yield metric.measure, metric
    for measure in measures:
        level = _numrel_level(measure)
        if level is not None:
            binary = {qid: {doc: int(r >= level) for doc, r in docs.items()} for qid, docs in qrels.items()}
            for metric in ir_measures.iter_calc([ir_measures.measures.NumRel], binary, run):
                yield measure, metric


def write_metrics(aggregate: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Aggregate metrics as one JSON object, written atomically."""
    with reporting_write_failures(path, "metrics file"), atomic_write(path) as handle:
        json.dump(dict(aggregate), handle, indent=2)
        handle.write("\n")
    return Path(path)


def write_per_query(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Per-query rows as JSON lines, written atomically (for significance tests and error analysis)."""
    with reporting_write_failures(path, "per-query file"), atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(dict(row)) + "\n")
    return Path(path)


def format_table(aggregate: Mapping[str, float], digits: int = 4) -> str:
    """A two-column plain-text table of measure names and values, for terminals and logs."""
    width = max([len("measure")] + [len(name) for name in aggregate])
    lines = [f"{'measure':<{width}}  value", f"{'-' * width}  {'-' * (digits + 2)}"]
    for name, value in aggregate.items():
        if isinstance(value, float) and math.isnan(value):
            shown = "nan"
        elif name.startswith("Num") and float(value).is_integer():  # counts, printed as trec_eval prints them
            shown = str(int(value))
        else:
            shown = f"{value:.{digits}f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)
