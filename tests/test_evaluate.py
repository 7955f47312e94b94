"""Evaluation: hand-computed trec_eval values, the rel threshold, missing queries, ties, parsing and output files."""

from __future__ import annotations

import json
import logging
from math import log2

import pytest

from leadkd.retrieval.evaluate import (
    DEFAULT_MEASURES,
    evaluate,
    format_table,
    parse_measures,
    write_metrics,
    write_per_query,
)
from leadkd.runtime.errors import ConfigError, LeadkdError

# One query; the run ranks d4 d1 d2 x d5 d8 (x unjudged); d6 and d7 are relevant but not retrieved.
QRELS = {"q": {"d1": 0, "d2": 2, "d4": 1, "d5": 0, "d6": 3, "d7": 1, "d8": 3}}
RUN = {"q": {"d4": 6.0, "d1": 5.0, "d2": 4.0, "x": 3.0, "d5": 2.0, "d8": 1.0}}


def test_single_query_against_hand_computed_trec_eval():
    aggregate, per_query = evaluate(RUN, QRELS, ["AP", "RR@10", "R@100", "nDCG@10", "P@5"])
    # relevant (>= 1): d4 @1, d2 @3, d8 @6, plus d6, d7 unretrieved -> 5 relevant
    assert aggregate["AP"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 5)
    assert aggregate["RR@10"] == pytest.approx(1.0)
    assert aggregate["R@100"] == pytest.approx(3 / 5)
    assert aggregate["P@5"] == pytest.approx(2 / 5)
    dcg = 1 / log2(2) + 2 / log2(4) + 3 / log2(7)  # trec_eval: linear gain, log2(rank + 1)
    ideal = 3 / log2(2) + 3 / log2(3) + 2 / log2(4) + 1 / log2(5) + 1 / log2(6)
    assert aggregate["nDCG@10"] == pytest.approx(dcg / ideal)
    assert per_query == [{"query_id": "q", **aggregate}]


def test_rel_threshold_applies_to_binary_measures_only():
    measures = parse_measures(["nDCG@10", "AP", "RR@10", "R@100", "P@5"], rel=2)
    assert [str(m) for m in measures] == ["nDCG@10", "AP(rel=2)", "RR(rel=2)@10", "R(rel=2)@100", "P(rel=2)@5"]
    aggregate, _ = evaluate(RUN, QRELS, ["nDCG@10", "AP", "RR@10", "R@100"], rel=2)
    # relevant (>= 2): d2 @3, d8 @6, d6 unretrieved -> 3 relevant
    assert aggregate["AP(rel=2)"] == pytest.approx((1 / 3 + 2 / 6) / 3)
    assert aggregate["RR(rel=2)@10"] == pytest.approx(1 / 3)
    assert aggregate["R(rel=2)@100"] == pytest.approx(2 / 3)
    assert aggregate["nDCG@10"] == evaluate(RUN, QRELS, ["nDCG@10"])[0]["nDCG@10"]
    # an explicit threshold in the name wins over rel
    assert [str(m) for m in parse_measures(["AP(rel=3)"], rel=2)] == ["AP(rel=3)"]


# Two queries for the counts: relevance >= 2 is a, d (q1) and f (q2); >= 1 adds b (q1) and a (q2).
COUNT_QRELS = "q1 0 a 2\nq1 0 b 1\nq1 0 c 0\nq1 0 d 2\nq2 0 a 1\nq2 0 f 3\n"
COUNT_RUN = "q1 Q0 a 1 3 t\nq1 Q0 b 2 2 t\nq1 Q0 x 3 1 t\nq2 Q0 f 1 2 t\nq2 Q0 g 2 1 t\nq2 Q0 h 3 0.5 t\n"


@pytest.mark.parametrize("rel, expected", [
    # retrieved: 3 + 3 whatever the threshold; relevant retrieved: q1 a, b + q2 f at 1, q1 a + q2 f at 2;
    # relevant: q1 a, b, d + q2 a, f at 1, q1 a, d + q2 f at 2 (trec_eval -l 2: num_ret 6, num_rel_ret 2, num_rel 3)
    (None, {"NumRet": 6, "NumRet(rel=1)": 3, "NumRel": 5}),
    ("2", {"NumRet": 6, "NumRet(rel=2)": 2, "NumRel(rel=2)": 3}),
])
def test_cli_rel_applies_to_counts_as_trec_eval_l(tmp_path, capsys, rel, expected):
    from leadkd.cli import main

    (tmp_path / "qrels.trec").write_text(COUNT_QRELS)
    (tmp_path / "run.trec").write_text(COUNT_RUN)
    argv = ["evaluate", "--run", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.trec"),
            "--measures", "NumRet", "NumRelRet", "NumRel", "--output", str(tmp_path / "m.json")]
    assert main(argv + (["--rel", rel] if rel else [])) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text()) == expected
    out = capsys.readouterr().out
    assert all(f"{name} " in out for name in expected), out


def test_rel_threshold_of_counts():
    qrels = {"q": {"a": 2, "b": 1, "c": 0, "d": 3}, "r": {"a": 1}}
    run = {"q": {"a": 3.0, "b": 2.0, "x": 1.0}, "r": {"a": 1.0, "y": 0.5}}
    # NumRet keeps counting everything; an explicit threshold in the name still wins over rel
    assert evaluate(run, qrels, ["NumRet", "NumRelRet", "NumRel", "NumRel(rel=3)", "NumRet(rel=1)"], rel=2)[0] \
        == {"NumRet": 5, "NumRet(rel=2)": 1, "NumRel(rel=2)": 2, "NumRel(rel=3)": 1, "NumRet(rel=1)": 3}
    _, rows = evaluate(run, qrels, ["NumRel(rel=2)", "NumRel"])
    assert rows == [{"query_id": "q", "NumRel(rel=2)": 2, "NumRel": 3},
                    {"query_id": "r", "NumRel(rel=2)": 0, "NumRel": 1}]
    assert [str(m) for m in parse_measures(["NumRet", "NumRelRet", "NumRel"], rel=3)] \
        == ["NumRet", "NumRet(rel=3)", "NumRel(rel=3)"]


def test_minus_one_is_pooled_but_unjudged_as_in_trec_eval():
    """-1 is not relevant, and unlike 0 not judged either: bpref skips it (trec_eval's RELVALUE_UNJUDGED)."""
    run = {"q": {"c": 3.0, "a": 2.0, "b": 1.0}}  # c, a, b
    # bpref = 1 - (judged non-relevant above a) / min(R, N): with c = -1 nothing judged is above a (1 - 0/1),
    # with c = 0 c is (1 - 1/1); AP is 1/2 either way.
    assert evaluate(run, {"q": {"a": 1, "b": 0, "c": -1}}, ["Bpref", "AP", "RR"])[0] \
        == pytest.approx({"Bpref": 1.0, "AP": 0.5, "RR": 0.5})
    assert evaluate(run, {"q": {"a": 1, "b": 0, "c": 0}}, ["Bpref"])[0] == pytest.approx({"Bpref": 0.0})


def test_missing_queries_count_as_zero_and_unjudged_queries_count(caplog):
    qrels = {**QRELS, "absent": {"d1": 1}, "nothing-relevant": {"d1": 0}}
    run = {**RUN, "nothing-relevant": {"d1": 1.0}, "no-qrels": {"d1": 1.0}}
    with caplog.at_level(logging.WARNING, logger="leadkd.retrieval.evaluate"):
        aggregate, per_query = evaluate(run, qrels, ["AP", "RR@10"])
    single, _ = evaluate(RUN, QRELS, ["AP", "RR@10"])
    assert [row["query_id"] for row in per_query] == ["q", "absent", "nothing-relevant"]
    assert per_query[1] == {"query_id": "absent", "AP": 0.0, "RR@10": 0.0}
    assert per_query[2] == {"query_id": "nothing-relevant", "AP": 0.0, "RR@10": 0.0}
    assert aggregate["AP"] == pytest.approx(single["AP"] / 3)
    assert aggregate["RR@10"] == pytest.approx(single["RR@10"] / 3)
    assert "1 of 3 qrels queries have no retrieved documents" in caplog.text
    assert "no document with relevance >= 1" in caplog.text


def test_ties_are_ranked_by_doc_id_descending_for_every_measure():
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}  # trec_eval order: c, b, a
    aggregate, _ = evaluate(run, qrels, ["RR", "RR@10", "AP", "P@1"])
    assert aggregate == pytest.approx({"RR": 1 / 3, "RR@10": 1 / 3, "AP": 1 / 3, "P@1": 0.0})


def test_default_measures_and_aggregate_is_mean_of_rows():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}
    run = {"q1": {"x": 2.0, "a": 1.0}, "q2": {"b": 3.0}}
    aggregate, rows = evaluate(run, qrels)
    assert list(aggregate) == DEFAULT_MEASURES
    for name in DEFAULT_MEASURES:
        assert aggregate[name] == pytest.approx(sum(row[name] for row in rows) / 2)
    assert rows[0]["RR@10"] == 0.5 and rows[1]["R@100"] == 0.5


def test_parse_errors():
    with pytest.raises(LeadkdError, match=r"unknown measure 'ndcg@10'.*did you mean 'nDCG@10'.*valid names: e\.g\."):
        parse_measures(["ndcg@10"])
    with pytest.raises(LeadkdError, match="unknown measure 'R@'"):
        parse_measures(["R@"])
    with pytest.raises(LeadkdError, match="unknown measure 'nDCG\\(rel=2\\)@10'"):
        parse_measures(["nDCG(rel=2)@10"])
    with pytest.raises(ConfigError):
        parse_measures(["AP"], rel=0)
    with pytest.raises(ConfigError):
        parse_measures([])


def test_input_errors():
    with pytest.raises(LeadkdError, match="none of the run's 1 queries appear in the qrels"):
        evaluate({"other": {"a": 1.0}}, QRELS)
    with pytest.raises(LeadkdError, match="qrels hold no queries"):
        evaluate(RUN, {})
    with pytest.raises(LeadkdError, match="relevance 'high' is not an integer"):
        evaluate(RUN, {"q": {"a": "high"}})


def test_output_files_and_table(tmp_path):
    aggregate, rows = evaluate(RUN, QRELS, ["nDCG@10", "AP(rel=2)"])
    assert json.loads(write_metrics(aggregate, tmp_path / "m.json").read_text()) == aggregate
    lines = write_per_query(rows, tmp_path / "q.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    table = format_table(aggregate).splitlines()
    assert table[0].split() == ["measure", "value"]
    assert table[2].split() == ["nDCG@10", f"{aggregate['nDCG@10']:.4f}"]
    assert table[3].startswith("AP(rel=2)")


@pytest.mark.slow
def test_matches_beir_style_pytrec_eval_on_real_qrels(data_dir):
    """On a complete run, our numbers equal BEIR's recipe (pytrec_eval, mean over the run's queries)."""
    import csv
    import random

    import pytrec_eval

    folder = data_dir / "trec-dl19-passage-pool"
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    pool = sorted({d for docs in qrels.values() for d in docs})
    rng = random.Random(0)
    run = {q: {d: rng.random() for d in rng.sample(pool, 300)} for q in qrels}
    ours, _ = evaluate(run, qrels, ["nDCG@10", "R@100", "AP", "RR"])
    beir = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map", "recip_rank"}).evaluate(run)
    for name, key in [("nDCG@10", "ndcg_cut_10"), ("R@100", "recall_100"), ("AP", "map"), ("RR", "recip_rank")]:
        assert ours[name] == pytest.approx(sum(v[key] for v in beir.values()) / len(beir), abs=1e-12)


# trec_eval's measure names -> ours, for the figures its own test file prints (tests/trec_eval/README.md).
# IPrec is left out: trec_eval 10 changed its rounding of the recall points, ir-measures did not.
TREC_EVAL_NAMES = {
    "num_q": "NumQ", "num_ret": "NumRet", "num_rel": "NumRel", "num_rel_ret": "NumRet(rel=1)", "map": "AP",
    "Rprec": "Rprec", "bpref": "Bpref", "recip_rank": "RR", "ndcg": "nDCG", "infAP": "infAP",
    "set_P": "SetP", "set_recall": "SetR", "set_F": "SetF",
    **{f"P_{k}": f"P@{k}" for k in (5, 10, 20, 100, 1000)},
    **{f"recall_{k}": f"R@{k}" for k in (5, 10, 100, 1000)},
    **{f"ndcg_cut_{k}": f"nDCG@{k}" for k in (5, 10, 100)},
    **{f"map_cut_{k}": f"AP@{k}" for k in (10, 100)},
    **{f"success_{k}": f"Success@{k}" for k in (1, 5, 10)},
}


def test_leadkd_evaluate_prints_what_trec_eval_c_prints_for_its_own_test_files(tmp_path, capsys):
    """``trec_eval -m all_trec -q -c qrels.test results.trunc`` (its make quicktest): query 302 is judged
    but not retrieved, so it counts in num_q (3) and its 77 relevant documents in num_rel (561)."""
    from pathlib import Path

    from leadkd.cli import main

    folder = Path(__file__).parent / "trec_eval"
    expected: dict[str, dict[str, float]] = {}
    for line in (folder / "out.test.aqc").read_text().splitlines():
        name, qid, value = line.split()
        if name in TREC_EVAL_NAMES:
            expected.setdefault(qid, {})[TREC_EVAL_NAMES[name]] = float(value)
    assert expected["all"]["NumQ"] == 3 and expected["all"]["NumRel"] == 561 and expected["302"]["NumRel"] == 77
    measures = ["NumQ", "NumRet", "NumRel", "NumRelRet"] + [m for m in TREC_EVAL_NAMES.values() if m[:3] != "Num"]
    argv = ["evaluate", "--run", str(folder / "results.trunc"), "--qrels", str(folder / "qrels.test"),
            "--measures", *measures, "--output", str(tmp_path / "m.json"), "--per-query", str(tmp_path / "q.jsonl")]
    assert main(argv) == 0, capsys.readouterr().err
    aggregate = json.loads((tmp_path / "m.json").read_text())
    rows = {row["query_id"]: row for row in map(json.loads, (tmp_path / "q.jsonl").read_text().splitlines())}
    assert set(rows) == {"301", "302", "303"}
    got = {"all": aggregate, **rows}
    compared = 0
    for qid, values in expected.items():
        for name, value in values.items():
            assert got[qid][name] == pytest.approx(value, abs=5e-5), (qid, name)  # trec_eval prints 4 decimals
            compared += 1
    assert compared >= 4 * (len(TREC_EVAL_NAMES) - 1)  # every measure, aggregate and per query (num_q: all only)
    table = dict(line.split() for line in capsys.readouterr().out.splitlines()[2:])
    assert (table["NumQ"], table["NumRel"], table["NumRet(rel=1)"], table["AP"]) == ("3", "561", "77", "0.1016")


def test_judged_counts_minus_one_as_pooled_but_unjudged():
    run = {"q": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}}  # a, b, c, d
    qrels = {"q": {"a": 1, "b": 0, "c": -1}}
    # a (relevant) and b (judged non-relevant) are judged; c (-1: pooled, never judged) and d (absent) are not
    assert evaluate(run, qrels, ["Judged@2", "Judged@4", "P@4"])[0] == pytest.approx(
        {"Judged@2": 1.0, "Judged@4": 0.5, "P@4": 0.25})
    # the -1 still counts where trec_eval counts it: not relevant, not a judged non-relevant for bpref
    assert evaluate(run, qrels, ["Bpref"])[0] == pytest.approx({"Bpref": 1.0})
