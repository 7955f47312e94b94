"""TREC run files: exact round trip, trec_eval's tie order, cut-off, atomicity, one-line located errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from leadkd.data.runs import ranked, read_run, write_run
from leadkd.runtime.errors import InputError, LeadkdError

B = Path(__file__).parent / "bad_inputs"
RUN = {"q2": {"d1": 0.5, "d2": 1 / 3, "d3": 2.0}, "q1": {"x": 1e-7, "y": -3.25}}


def test_write_format_and_order(tmp_path):
    path = write_run(RUN, tmp_path / "run.trec", tag="mine")
    assert path.read_text().splitlines() == [
        "q2 Q0 d3 1 2.0 mine",
        "q2 Q0 d1 2 0.5 mine",
        f"q2 Q0 d2 3 {1 / 3!r} mine",
        "q1 Q0 x 1 1e-07 mine",
        "q1 Q0 y 2 -3.25 mine",
    ]


@pytest.mark.parametrize("name", ["run.trec", "run.trec.gz"])
def test_roundtrip_is_exact(tmp_path, name):
    path = write_run(RUN, tmp_path / name)
    assert read_run(path) == RUN
    if name.endswith(".gz"):
        assert gzip.open(path, "rt").readline().startswith("q2 Q0 d3 1")


def test_ties_rank_by_doc_id_descending_like_trec_eval(tmp_path):
    run = {"q": {"b": 1.0, "a": 1.0, "c": 1.0, "z": 0.5, "top": 3.0}}
    assert [d for d, _ in ranked(run["q"])] == ["top", "c", "b", "a", "z"]
    lines = write_run(run, tmp_path / "r").read_text().splitlines()
    assert [line.split()[2] for line in lines] == ["top", "c", "b", "a", "z"]
    assert [line.split()[3] for line in lines] == ["1", "2", "3", "4", "5"]


def test_k_cuts_each_query(tmp_path):
    text = write_run(RUN, tmp_path / "r", k=1).read_text().splitlines()
    assert text == ["q2 Q0 d3 1 2.0 leadkd", "q1 Q0 x 1 1e-07 leadkd"]


def test_write_is_atomic_and_rejects_unwritable_values(tmp_path):
    target = tmp_path / "r"
    target.write_text("old\n")
    with pytest.raises(LeadkdError, match="whitespace"):
        write_run({"q 1": {"d": 1.0}}, target)
    with pytest.raises(LeadkdError, match="not finite"):
        write_run({"q": {"d": float("nan")}}, target)
    with pytest.raises(LeadkdError, match="run tag"):
        write_run(RUN, target, tag="two words")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_read_accepts_ties_blank_lines_and_any_rank(tmp_path):
    path = tmp_path / "r"
    path.write_text("q1 Q0 a 1 1.5 t\n\nq1 Q0 b 1 1.5 t\nq2\tQ0\ta\t7\t-2\tt\n")
    assert read_run(path) == {"q1": {"a": 1.5, "b": 1.5}, "q2": {"a": -2.0}}


CATALOGUE_RUN = {"q1": {"doc-1": 3.0, "doc-2": 2.0}, "q2": {"doc-1": 0.9, "doc-2": 0.5}}  # the *_ok.trec runs


def test_read_ignores_fields_after_the_tag(tmp_path):
    """trec_eval reads six fields and skips the rest of the line."""
    path = tmp_path / "r"
    path.write_text("q1 Q0 a 1 1.5 t extra 17\nq1 Q0 b 2 0.5 t x\nq1 Q0 a 3 0.1 t\n")
    with pytest.raises(InputError, match=r"r:3: field 'docid': .* again \(first on line 1\)"):
        read_run(path)
    path.write_text("q1 Q0 a 1 1.5 t extra 17\nq1 Q0 b 2 0.5 t x\n")
    assert read_run(path) == {"q1": {"a": 1.5, "b": 0.5}}
    assert read_run(B / "run_extra_fields_ok.trec") == CATALOGUE_RUN


def test_read_skips_comment_lines(tmp_path):
    """A line whose first non-blank character is '#' is a comment (trec_eval 10); '#' inside a field is data."""
    path = tmp_path / "r"
    path.write_text("# bm25 run\nq1 Q0 d#1 1 1.5 t\n  # q1 Q0 b 2 0.5 t\n#q2 Q0 a 1 1 t\nq1 Q0 c 3 0.2 t\n#\n")
    assert read_run(path) == {"q1": {"d#1": 1.5, "c": 0.2}}
    path.write_text("# c\nq1 Q0 a 1 1.5 t\n# c\nq1 Q0 a 2 0.5 t\n")
    with pytest.raises(InputError, match=r"r:4: field 'docid': .* again \(first on line 2\)"):
        read_run(path)
    assert read_run(B / "run_comments_ok.trec") == CATALOGUE_RUN


def test_write_refuses_a_query_id_read_back_as_a_comment(tmp_path):
    with pytest.raises(LeadkdError, match="query id '#1' cannot be written to a TREC run.*comment"):
        write_run({"q": {"a": 1.0}, "#1": {"a": 1.0}}, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert read_run(write_run({"q#1": {"#a": 1.0}}, tmp_path / "r")) == {"q#1": {"#a": 1.0}}


@pytest.mark.parametrize("line,match", [
    ("q1 Q0 a 1 0.5", r"r:2: expected 6 columns .* found 5"),
    ("q1 Q0 a", r"r:2: expected 6 columns 'qid Q0 docid rank score tag' \(more are ignored\), found 3"),
    ("q1 Q0 a one 0.5 t", r"r:2: field 'rank': rank 'one' is not an integer"),
    ("q1 Q0 a 1 high t", r"r:2: field 'score': score 'high' is not a number"),
    ("q1 Q0 a 1 nan t", r"r:2: field 'score': score 'nan' is not finite"),
])
def test_read_errors_are_located(tmp_path, line, match):
    path = tmp_path / "r"
    path.write_text(f"q0 Q0 a 1 1.0 t\n{line}\n")
    with pytest.raises(InputError, match=match) as exc:
        read_run(path)
    assert "\n" not in str(exc.value) and exc.value.line == 2


def test_duplicate_pair_names_both_lines(tmp_path):
    path = tmp_path / "r"
    path.write_text("q1 Q0 a 1 2 t\nq1 Q0 b 2 1 t\nq2 Q0 a 1 1 t\nq1 Q0 a 3 0.5 t\n")
    expected = r"r:4: field 'docid': query 'q1' lists document 'a' again \(first on line 1\)"
    with pytest.raises(InputError, match=expected):
        read_run(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_run(tmp_path / "absent")
