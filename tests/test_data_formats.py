"""Readers, writers and the compact collection: every accepted form and every reported error."""

from __future__ import annotations

import gzip
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from leadkd.data import formats
from leadkd.data.collection import CollectionBuilder, Corpus, Qrels, Queries, TextCollection
from leadkd.data.formats import (
    DataWarning,
    check_qrels,
    read_beir_qrels,
    read_collection_tsv,
    read_corpus,
    read_corpus_jsonl,
    read_qrels,
    read_queries,
    read_queries_jsonl,
    read_queries_tsv,
    read_trec_qrels,
    write_beir_qrels,
    write_collection_tsv,
    write_corpus_jsonl,
    write_queries_jsonl,
    write_queries_tsv,
    write_trec_qrels,
)
from leadkd.runtime.errors import InputError, LeadkdError

BAD_INPUTS = Path(__file__).parent / "bad_inputs"


def put(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def expect(reader, path: Path, line: int | None, field: str | None, fragment: str) -> InputError:
    """The reader raises one InputError whose one-line message names file, line and field."""
    with pytest.raises(InputError) as info:
        reader(path)
    err = info.value
    msg = str(err)
    assert (err.path, err.line, err.field) == (str(path), line, field), msg
    where = str(path) if line is None else f"{path}:{line}"
    assert msg.startswith(where + ": " + (f"field '{field}': " if field else "")), msg
    assert fragment in msg, msg
    assert "\n" not in msg
    return err


# -- TextCollection ------------------------------------------------------------------------------------
@pytest.fixture
def small() -> Corpus:
    return Corpus.from_records(["d1", "d2", 30, "ünï"], ["first text", "second", "third ✓", "fourth"],
                               ["Title", "", "T3", ""], source="mem")


def test_collection_access(small: Corpus) -> None:
    assert len(small) == 4 and isinstance(small, TextCollection)
    assert small.id_at(2) == "30" and small.id_at(-1) == "ünï"
    assert small.text(2) == "third ✓" and small.title(0) == "Title" and small.title(1) == ""
    assert small.passage(0) == "Title first text" and small.passage(1) == "second"
    assert small.passage(0, sep=". ") == "Title. first text"
    assert small.passages([3, 0]) == ["fourth", "Title first text"]
    assert small.texts([1, 2]) == ["second", "third ✓"] and small.titles([2]) == ["T3"]
    assert list(small.records())[2] == ("30", "T3", "third ✓")
    with pytest.raises(IndexError):
        small.text(4)
    assert repr(small) == "Corpus(4 passages, source='mem')"


def test_collection_ids_and_lookup(small: Corpus) -> None:
    ids = small.ids
    assert len(ids) == 4 and ids[1] == "d2" and ids[1:3] == ["d2", "30"] and list(ids) == small.list_ids()
    assert "30" in ids and "ünï" in small and "d3" not in small and 30 not in small
    assert small.index("ünï") == 3 and small.index("d1") == 0
    for absent in ("d", "d11", "", "a\0", "x" * 100):
        with pytest.raises(KeyError):
            small.index(absent)
    with pytest.raises(TypeError):
        small.index(30)  # type: ignore[arg-type]
    assert small.lookup(["30", "nope", "d1", "x" * 100, ""]).tolist() == [2, -1, 0, -1, -1]
    assert small.lookup([]).tolist() == []


def test_collection_char_lengths_match_passages(small: Corpus, monkeypatch) -> None:
    expected = [len(small.passage(i)) for i in range(len(small))]
    assert small.char_lengths().tolist() == expected
    monkeypatch.setattr("leadkd.data.collection._CHUNK", 3)  # chunk edges inside multi-byte characters
    assert small.char_lengths().tolist() == expected
    assert small.char_lengths(sep=" -- ").tolist() == [len(small.passage(i, " -- ")) for i in range(4)]


def test_collection_subset_keeps_class_order_and_titles(small: Corpus) -> None:
    sub = small.subset([3, 0])
    assert type(sub) is Corpus and sub.list_ids() == ["ünï", "d1"] and sub.passage(1) == "Title first text"
    assert sub.index("d1") == 1 and "d2" not in sub and sub.source == "mem"
    assert not small.subset([1, 3]).has_titles and small.subset(np.array([], dtype=np.int64)).list_ids() == []
    assert small.subset([-1]).list_ids() == ["ünï"]
    with pytest.raises(InputError, match="duplicate id 'd1'"):
        small.subset([0, 0])
    with pytest.raises(IndexError):
        small.subset([4])


def test_collection_from_records_rejects_duplicates_and_bad_ids() -> None:
    with pytest.raises(InputError) as info:
        Queries.from_records(["a", "b", "a", "b"], ["x", "y", "z", "w"], source="q.mem")
    assert str(info.value) == "q.mem: field 'id': duplicate id 'a' (records 1 and 3)"
    with pytest.raises(InputError, match="NUL"):
        Queries.from_records(["a\0"], ["x"])
    with pytest.raises(InputError, match=r"^<records>: field 'id': empty id \(record 2\)$"):
        Queries.from_records(["a", ""], ["x", "y"])
    with pytest.raises(TypeError):
        Queries.from_records([1.5], ["x"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        Queries.from_records(["a", "b"], ["x"])


def test_builder_titles_are_lazy_and_builds_once() -> None:
    b = Corpus.builder()
    assert isinstance(b, CollectionBuilder)
    b.add("a", "one")
    b.add("b", "two", "Late title")
    b.add("c", "three")
    c = b.build()
    assert type(c) is Corpus and c.has_titles and [c.title(i) for i in range(3)] == ["", "Late title", ""]
    with pytest.raises(RuntimeError):
        b.build()
    plain = Queries.from_records(["q"], ["text"])
    assert not plain.has_titles and plain.title(0) == "" and repr(plain) == "Queries(1 queries)"


def test_collection_pickles_and_empty() -> None:
    c = Corpus.from_records(["x", "y"], ["a", "b"], ["t", ""])
    back = pickle.loads(pickle.dumps(c))
    assert back.list_ids() == ["x", "y"] and back.passage(0) == "t a" and back.index("y") == 1
    empty = Corpus.from_records([], [])
    assert len(empty) == 0 and "x" not in empty and empty.lookup(["x"]).tolist() == [-1]
    assert empty.char_lengths().tolist() == [] and empty.nbytes >= 0


def test_qrels_helpers() -> None:
    q = Qrels({"q1": {"a": 2, "b": 0, "c": 1}, "q2": {"d": 1}})
    assert q.relevant("q1") == ["a", "c"] and q.relevant("q1", min_rel=2) == ["a"] and q.relevant("zz") == []
    assert q.num_judgments() == 4 and isinstance(q, dict) and repr(q) == "Qrels(2 queries, 4 judgments)"


# -- BEIR jsonl ----------------------------------------------------------------------------------------
def test_read_corpus_jsonl_accepts_bom_crlf_blank_lines_extra_keys(tmp_path: Path) -> None:
    body = jsonl({"_id": "a", "title": "T", "text": "x\u2028y", "metadata": {"k": 1}},
                 {"_id": 7, "text": "no title"}, {"_id": "c", "title": None, "text": "null title"},
                 {"_id": "d", "title": "only title", "text": ""})
    body = body.replace("\n", "\r\n", 2) + "\n   \n"
    path = put(tmp_path, "corpus.jsonl", b"\xef\xbb\xbf" + body.encode())
    c = read_corpus_jsonl(path)
    assert c.list_ids() == ["a", "7", "c", "d"] and c.text(0) == "x\u2028y" and c.passage(0) == "T x\u2028y"
    assert c.title(1) == "" and c.title(2) == "" and c.passage(3) == "only title " and c.source == str(path)


@pytest.mark.parametrize("content, line, field, fragment", [
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', 2, None, "invalid JSON: Expecting value at column"),
    ('{"_id": "a", "text": "x"}\n\n["b", "y"]\n', 3, None, "expected a JSON object, found array"),
    ('"just a string"\n', 1, None, "expected a JSON object, found string"),
    ('{"text": "x"}\n', 1, "_id", "missing"),
    ('{"_id": 1.5, "text": "x"}\n', 1, "_id", "must be a string or an integer, found number"),
    ('{"_id": null, "text": "x"}\n', 1, "_id", "found null"),
    ('{"_id": true, "text": "x"}\n', 1, "_id", "found boolean"),
    ('{"_id": "", "text": "x"}\n', 1, "_id", "empty"),
    ('{"_id": "a", "title": "t"}\n', 1, "text", "missing"),
    ('{"_id": "a", "text": ["x"]}\n', 1, "text", "must be a string, found array"),
    ('{"_id": "a", "title": 3, "text": "x"}\n', 1, "title", "must be a string, found number"),
    ('{"_id": "a", "title": " ", "text": "  "}\n', 1, "text", "empty (and no title)"),
    ('{"_id": "a", "text": "x\\ud800"}\n', 1, "text", "unpaired surrogate"),
    ('{"_id": "a", "text": "x"}\r\n\r\n{"_id": "b", "text": "y"}\r\n{"_id": "a", "text": "z"}\r\n', 4, "_id",
     "duplicate id 'a' (first on line 1)"),
])
def test_read_corpus_jsonl_errors(tmp_path: Path, content: str, line: int, field: str | None, fragment: str) -> None:
    expect(read_corpus_jsonl, put(tmp_path, "corpus.jsonl", content), line, field, fragment)


def test_jsonl_invalid_utf8_and_empty_files(tmp_path: Path) -> None:
    bad = put(tmp_path, "c.jsonl", b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
    expect(read_corpus_jsonl, bad, 2, None, "invalid UTF-8: byte 0xe9 at column 26")
    expect(read_corpus_jsonl, put(tmp_path, "e.jsonl", b""), None, None, "no passage records")
    expect(read_queries_jsonl, put(tmp_path, "b.jsonl", "\n \r\n\n"), None, None, "no query records")
    expect(read_corpus_jsonl, tmp_path / "absent.jsonl", None, None, "file not found")
    expect(read_corpus_jsonl, tmp_path, None, None, "is a folder")


def test_read_queries_jsonl(tmp_path: Path) -> None:
    path = put(tmp_path, "queries.jsonl", jsonl({"_id": "1", "text": "what is x", "metadata": {}},
                                                  {"_id": 2, "text": "why", "title": "ignored"}))
    q = read_queries_jsonl(path)
    assert type(q) is Queries and q.list_ids() == ["1", "2"] and q.text(1) == "why" and not q.has_titles
    expect(read_queries_jsonl, put(tmp_path, "q2.jsonl", jsonl({"_id": "1", "text": " "})), 1, "text", "empty")
    expect(read_queries_jsonl, put(tmp_path, "q3.jsonl", jsonl({"_id": "1", "text": "a"}, {"_id": 1, "text": "b"})),
           2, "_id", "duplicate id '1' (first on line 1)")


def test_gzip_files_are_read_transparently(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl({"_id": "a", "text": "x"}).encode()))
    assert read_corpus(path).list_ids() == ["a"]
    tsv = tmp_path / "collection.tsv.gz"
    tsv.write_bytes(gzip.compress(b"1\thello\n"))
    assert read_corpus(tsv).text(0) == "hello"
    expect(read_corpus, put(tmp_path, "corpus.csv", "x"), None, None, "unknown corpus format")
    expect(read_queries, put(tmp_path, "queries.csv", "x"), None, None, "unknown queries format")


def test_block_boundaries_keep_line_numbers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(formats, "_BLOCK", 5)  # every line straddles several blocks
    lines = [f"{i}\tpassage number {i} ✓" for i in range(30)]
    path = put(tmp_path, "collection.tsv", b"\xef\xbb\xbf" + "\r\n".join(lines).encode())  # no final newline
    c = read_collection_tsv(path)
    assert len(c) == 30 and c.text(29) == "passage number 29 ✓" and c.id_at(0) == "0"
    bad = "\n".join(lines[:20]).encode() + b"\n\n21\tbad \xff byte\n"
    expect(read_collection_tsv, put(tmp_path, "bad.tsv", bad), 22, None, "invalid UTF-8: byte 0xff at column 8")
    dup = "\n".join(lines[:20] + ["7\tagain"]).encode()
    expect(read_collection_tsv, put(tmp_path, "dup.tsv", dup), 21, "pid", "duplicate id '7' (first on line 8)")


# -- MS MARCO tsv --------------------------------------------------------------------------------------
def test_read_collection_tsv_two_and_three_columns(tmp_path: Path) -> None:
    two = read_collection_tsv(put(tmp_path, "c2.tsv", "0\tThe first passage.\r\n\n1\tSecond\u2028one\n"))
    assert two.list_ids() == ["0", "1"] and not two.has_titles and two.text(1) == "Second\u2028one"
    three = read_collection_tsv(put(tmp_path, "c3.tsv", "d1\tA title\tbody\nd2\t\tbody two\nd3\tonly title\t\n"))
    assert three.passages([0, 1, 2]) == ["A title body", "body two", "only title "]


@pytest.mark.parametrize("content, line, field, fragment", [
    ("1\ta\n2\tb\tc\n", 2, None, "expected 2 (pid, text) tab-separated columns as on line 1, found 3"),
    ("1\tt\ta\n2\tb\n", 2, None, "expected 3 (pid, title, text) tab-separated columns as on line 1, found 2"),
    ("1 no tab\n", 1, None, "expected 2 (pid, text) or 3 (pid, title, text) tab-separated columns, found 1"),
    ("1\ta\n\tb\n", 2, "pid", "empty"),
    ("1\ta\n2\t \n", 2, "text", "empty"),
    ("1\tt\ta\n2\t\t\n", 2, "text", "empty (and no title)"),
    ("", None, None, "no passage records"),
])
def test_read_collection_tsv_errors(tmp_path: Path, content: str, line: int | None, field: str | None,
                                    fragment: str) -> None:
    expect(read_collection_tsv, put(tmp_path, "collection.tsv", content), line, field, fragment)


def test_read_queries_tsv(tmp_path: Path) -> None:
    q = read_queries_tsv(put(tmp_path, "queries.dev.tsv", "11\twhat is a\n12\twho is b\n"))
    assert type(q) is Queries and q.list_ids() == ["11", "12"] and q.text(0) == "what is a"
    assert read_queries(tmp_path / "queries.dev.tsv").list_ids() == ["11", "12"]
    expect(read_queries_tsv, put(tmp_path, "q.tsv", "1\ta\tb\n"), 1, None,
           "expected 2 (qid, text) tab-separated columns, found 3")
    expect(read_queries_tsv, put(tmp_path, "q2.tsv", "1\ta\n1\tb\n"), 2, "qid", "duplicate id '1' (first on line 1)")


# -- qrels ---------------------------------------------------------------------------------------------
BEIR = "query-id\tcorpus-id\tscore\n"


def test_read_beir_qrels(tmp_path: Path) -> None:
    path = put(tmp_path, "test.tsv", "\ufeff" + BEIR.replace("\n", "\r\n") + "q1\td1\t1\nq1\td2\t0\n\nq2\td1\t2.0\n")
    q = read_beir_qrels(path)
    assert isinstance(q, Qrels) and q == {"q1": {"d1": 1, "d2": 0}, "q2": {"d1": 2}}
    assert read_qrels(path) == q


@pytest.mark.parametrize("content, line, field, fragment", [
    ("query_id\tdoc_id\tscore\nq\td\t1\n", 1, None, "expected the header 'query-id<TAB>corpus-id<TAB>score', found"),
    ("q1\td1\t1\n", 1, None, "expected the header"),
    (BEIR + "q1\td1\n", 2, None, "expected 3 tab-separated columns (query-id, corpus-id, score), found 2"),
    (BEIR + "q1\td1\t1\t7\n", 2, None, "found 4"),
    (BEIR + "q1\td1\t1\nq1\td2\thigh\n", 3, "score", "'high' is not a number"),
    (BEIR + "q1\td1\t0.5\n", 2, "score", "'0.5' is not an integer"),
    (BEIR + "\td1\t1\n", 2, "query-id", "empty"),
    (BEIR + "q1\t\t1\n", 2, "corpus-id", "empty"),
    (BEIR + "q1\td1\t1\nq2\td1\t1\nq1\td1\t0\n", 4, "corpus-id",
     "duplicate judgment of query 'q1' and document 'd1' (first on line 2)"),
    (BEIR, None, None, "no judgments"),
    ("", None, None, "empty file: expected the header"),
])
def test_read_beir_qrels_errors(tmp_path: Path, content: str, line: int | None, field: str | None,
                                fragment: str) -> None:
    expect(read_beir_qrels, put(tmp_path, "test.tsv", content), line, field, fragment)


def test_read_trec_qrels_four_and_two_columns(tmp_path: Path) -> None:
    four = put(tmp_path, "qrels.trec", "19335 0 1017759 0\n19335  Q0\t1082489   3\n\n20 0 7 1\n")
    assert read_trec_qrels(four) == {"19335": {"1017759": 0, "1082489": 3}, "20": {"7": 1}}
    assert read_qrels(four) == read_trec_qrels(four)
    msmarco = put(tmp_path, "qrels.train.tsv", "1185869\t0\t0\t1\n1185868\t0\t16\t1\n")
    assert read_qrels(msmarco) == {"1185869": {"0": 1}, "1185868": {"16": 1}}
    pairs = put(tmp_path, "pairs.tsv", "q1\td1\nq1\td2\nq2\td9\n")
    assert read_qrels(pairs) == {"q1": {"d1": 1, "d2": 1}, "q2": {"d9": 1}}


@pytest.mark.parametrize("reader, content, line, field, fragment", [
    (read_trec_qrels, "1 0 d 1\n2 0 e\n", 2, None, "expected 4 columns (qid iter docid rel) as on line 1, found 3"),
    (read_trec_qrels, "1 d\n2 0 e 1\n", 2, None, "expected 2 columns (qid docid) as on line 1, found 4"),
    (read_trec_qrels, "1 0 d 1 extra more\n", 1, None, "expected 4 columns (qid iter docid rel) or 2 columns"),
    (read_trec_qrels, "1 0 d x\n", 1, "rel", "'x' is not a number"),
    (read_trec_qrels, "1 0 d 1\n1 Q0 d 1\n", 2, "docid", "duplicate judgment of query '1' and document 'd'"),
    (read_trec_qrels, "  \n", None, None, "no judgments"),
    (read_qrels, "q1 d1 1\n", 1, None, "expected the header 'query-id<TAB>corpus-id<TAB>score'"),
    (read_qrels, "a b c d e\n", 1, None, "expected 4 columns"),
    (read_qrels, "1 0 caf\xe9 1\n".encode("latin-1"), 1, None, "invalid UTF-8: byte 0xe9 at column 8"),
    (read_qrels, "", None, None, "no judgments"),
])
def test_read_trec_and_detected_qrels_errors(tmp_path: Path, reader, content, line, field, fragment) -> None:
    expect(reader, put(tmp_path, "qrels.txt", content), line, field, fragment)


def test_negative_relevance_is_kept(tmp_path: Path) -> None:
    """trec_eval >= 8.1 writes -1 for pooled but unjudged documents (infAP); rel <= 0 is never relevant."""
    trec = put(tmp_path, "qrels.trec", "q1 0 d1 -1\nq1 0 d2 1\nq1 0 d3 -2\nq2 0 d1 0\n")
    assert read_trec_qrels(trec) == read_qrels(trec) == {"q1": {"d1": -1, "d2": 1, "d3": -2}, "q2": {"d1": 0}}
    beir = put(tmp_path, "test.tsv", BEIR + "q1\td1\t-1\nq1\td2\t1\nq2\td1\t-1.0\n")
    assert read_beir_qrels(beir) == read_qrels(beir) == {"q1": {"d1": -1, "d2": 1}, "q2": {"d1": -1}}
    assert read_qrels(trec).relevant("q1") == ["d2"]
    assert read_beir_qrels(BAD_INPUTS / "qrels_negative_ok.tsv") == {"q1": {"doc-1": 1, "doc-3": -1},
                                                                     "q2": {"doc-2": 1}}
    assert read_trec_qrels(BAD_INPUTS / "qrels_minus_one_ok.trec")["q2"] == {"doc-2": 1, "doc-1": -1}
    expect(read_trec_qrels, put(tmp_path, "bad.trec", "q1 0 d1 -x\n"), 1, "rel", "'-x' is not a number")


def test_comment_lines_are_skipped(tmp_path: Path) -> None:
    """A line whose first non-blank character is '#' is a comment (trec_eval 10); '#' anywhere else is data."""
    trec = put(tmp_path, "qrels.trec", "# pooled judgments\nq1 0 d#1 1\n  # q1 0 d2 1 (commented out)\n"
                                       "#q2 0 d3 1\nq2 0 d4 0\n")
    assert read_qrels(trec) == read_trec_qrels(trec) == {"q1": {"d#1": 1}, "q2": {"d4": 0}}
    pairs = put(tmp_path, "pairs.tsv", "# qid docid\nq1\td1\n#\nq2\td2\n")
    assert read_qrels(pairs) == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    beir = put(tmp_path, "test.tsv", "# exported from x\n" + BEIR + "q1\td1\t1\n# q1\td2\t1\nq1\td3\t2\n")
    assert read_qrels(beir) == read_beir_qrels(beir) == {"q1": {"d1": 1, "d3": 2}}
    assert read_qrels(BAD_INPUTS / "qrels_comments_ok.trec") == {"q1": {"doc-1": 1}, "q2": {"doc-2": 1}}
    # line numbers still count the comments; a file of comments only has no judgments
    expect(read_qrels, put(tmp_path, "late.trec", "# c\nq1 0 d1 1\n# c\nq1 0 d2\n"), 4, None,
           "expected 4 columns (qid iter docid rel) as on line 2, found 3")
    expect(read_qrels, put(tmp_path, "hdr.tsv", "# c\nqid\tdocid\trel\n"), 2, None, "expected the header")
    expect(read_qrels, put(tmp_path, "only.trec", "# nothing\n  # here\n"), None, None, "no judgments")
    expect(read_beir_qrels, put(tmp_path, "only.tsv", "# nothing\n"), None, None, "empty file: expected the header")


@pytest.fixture
def coll_pair() -> tuple[Corpus, Queries]:
    corpus = Corpus.from_records(["d1", "d2", "d3"], ["a", "b", "c"], source="corpus.jsonl")
    queries = Queries.from_records(["q1", "q2"], ["x", "y"], source="queries.jsonl")
    return corpus, queries


def test_qrels_validated_against_collections(tmp_path: Path, coll_pair) -> None:
    corpus, queries = coll_pair
    path = put(tmp_path, "test.tsv", BEIR + "q1\td1\t1\nq1\tdX\t1\nq9\td2\t1\nq2\td3\t1\nq9\td1\t0\n")
    err = expect(lambda p: read_qrels(p, corpus=corpus, queries=queries), path, 3, "corpus-id",
                 "document id 'dX' is not in the passage collection (corpus.jsonl); 3 of 5 judgments name unknown ids")
    assert "lenient=True" in str(err)
    expect(lambda p: read_beir_qrels(p, queries=queries), path, 4, "query-id",
           "query id 'q9' is not in the query collection (queries.jsonl)")
    trec = put(tmp_path, "t.trec", "q1 0 d1 1\nq1 0 zz 1\n")
    expect(lambda p: read_trec_qrels(p, corpus=corpus), trec, 2, "docid", "document id 'zz'")
    with pytest.warns(DataWarning, match=r"dropped 3 of 5 judgments .*\(1 query ids, 1 document ids\)"):
        q = read_qrels(path, corpus=corpus, queries=queries, lenient=True)
    assert q == {"q1": {"d1": 1}, "q2": {"d3": 1}}  # q9 lost all its judgments: gone


def test_check_qrels_in_memory(coll_pair) -> None:
    corpus, queries = coll_pair
    good = {"q1": {"d1": 1}, "q2": {"d2": 0}}
    assert check_qrels(good, corpus, queries) == good and isinstance(check_qrels(good), Qrels)
    with pytest.raises(InputError, match="^mem: field 'corpus-id': document id 'nope'"):
        check_qrels({"q1": {"nope": 1}}, corpus, queries, source="mem")
    assert check_qrels({"q1": {"d1": -1}}) == {"q1": {"d1": -1}}  # trec_eval's pooled-but-unjudged mark
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_qrels({"q1": {"nope": 1, "d1": 2}}, corpus, queries, lenient=True) == {"q1": {"d1": 2}}
    assert "dropped 1 of 2 judgments" in str(caught[0].message)


# -- writers -------------------------------------------------------------------------------------------
def test_jsonl_writers_round_trip(tmp_path: Path) -> None:
    corpus = Corpus.from_records(["a", "b\tc", "ü"], ['quote " and \\', "line\nbreak", "✓ \u2028"],
                                 ["T", "", "title"])
    write_corpus_jsonl(tmp_path / "corpus.jsonl", corpus)
    back = read_corpus_jsonl(tmp_path / "corpus.jsonl")
    assert list(back.records()) == list(corpus.records())
    assert "✓" in (tmp_path / "corpus.jsonl").read_text(encoding="utf-8")
    queries = Queries.from_records(["1", "2"], ["what", "why ✓"])
    write_queries_jsonl(tmp_path / "sub" / "queries.jsonl", queries)
    assert list(read_queries_jsonl(tmp_path / "sub" / "queries.jsonl").records()) == list(queries.records())


def test_tsv_writers_round_trip(tmp_path: Path) -> None:
    plain = Corpus.from_records(["1", "2"], ["one", "two ✓"])
    write_collection_tsv(tmp_path / "c.tsv", plain)
    assert (tmp_path / "c.tsv").read_text(encoding="utf-8") == "1\tone\n2\ttwo ✓\n"
    titled = Corpus.from_records(["1", "2"], ["one", "two"], ["T", ""])
    write_collection_tsv(tmp_path / "t.tsv", titled)
    assert list(read_collection_tsv(tmp_path / "t.tsv").records()) == list(titled.records())
    queries = Queries.from_records(["q"], ["text"])
    write_queries_tsv(tmp_path / "q.tsv", queries)
    assert read_queries_tsv(tmp_path / "q.tsv").list_ids() == ["q"]
    with pytest.raises(LeadkdError, match="contains a tab or line break"):
        write_collection_tsv(tmp_path / "bad.tsv", Corpus.from_records(["1"], ["a\tb"]))
    with pytest.raises(LeadkdError, match="cannot write pid 'a\\\\tb'"):
        write_collection_tsv(tmp_path / "bad.tsv", Corpus.from_records(["a\tb"], ["x"]))
    assert not list(tmp_path.glob("*bad*"))  # atomic: nothing left behind


def test_qrels_writers_round_trip(tmp_path: Path) -> None:
    qrels = Qrels({"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 3}})
    write_beir_qrels(tmp_path / "qrels" / "test.tsv", qrels)
    assert (tmp_path / "qrels" / "test.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    assert read_beir_qrels(tmp_path / "qrels" / "test.tsv") == qrels
    write_trec_qrels(tmp_path / "qrels.trec", qrels)
    assert (tmp_path / "qrels.trec").read_text().splitlines()[0] == "q1 0 d1 1"
    assert read_trec_qrels(tmp_path / "qrels.trec") == qrels == read_qrels(tmp_path / "qrels.trec")
    with pytest.raises(LeadkdError, match="contains whitespace"):
        write_trec_qrels(tmp_path / "x.trec", {"q 1": {"d": 1}})
    with pytest.raises(LeadkdError, match="cannot write document id"):
        write_beir_qrels(tmp_path / "x.tsv", {"q": {"d\t2": 1}})
    with pytest.raises(LeadkdError, match="it is empty"):
        write_beir_qrels(tmp_path / "x.tsv", {"": {"d": 1}})
    assert not (tmp_path / "x.trec").exists() and not (tmp_path / "x.tsv").exists()


def test_qrels_writers_refuse_a_query_id_read_back_as_a_comment(tmp_path: Path) -> None:
    """A query id opens its line, and a line opening with '#' is a comment: it would vanish on reading."""
    for writer, name in ((write_beir_qrels, "x.tsv"), (write_trec_qrels, "x.trec")):
        with pytest.raises(LeadkdError, match="cannot write query id '#1'.*comment"):
            writer(tmp_path / name, {"q": {"d": 1}, "#1": {"d": 1}})
        assert not (tmp_path / name).exists()
    write_trec_qrels(tmp_path / "ok.trec", {"q#1": {"#d": 1}})  # '#' elsewhere is data
    assert read_qrels(tmp_path / "ok.trec") == {"q#1": {"#d": 1}}


# -- fixture files kept in tests/bad_inputs ------------------------------------------------------------
BAD_FILES = [
    ("corpus_bad_json.jsonl", read_corpus_jsonl, 2, None, "invalid JSON"),
    ("corpus_duplicate_id.jsonl", read_corpus_jsonl, 3, "_id", "duplicate id 'doc-1' (first on line 1)"),
    ("corpus_latin1.jsonl", read_corpus_jsonl, 2, None, "invalid UTF-8"),
    ("queries_empty_text.jsonl", read_queries_jsonl, 2, "text", "empty"),
    ("collection_ragged.tsv", read_collection_tsv, 3, None, "as on line 1, found 3"),
    ("qrels_bad_header.tsv", read_beir_qrels, 1, None, "expected the header"),
    ("qrels_mixed.trec", read_qrels, 2, None, "expected 4 columns (qid iter docid rel) as on line 1, found 2"),
]


@pytest.mark.parametrize("name, reader, line, field, fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_files(name: str, reader, line: int, field: str | None, fragment: str) -> None:
    expect(reader, BAD_INPUTS / name, line, field, fragment)


def test_good_input_file_with_bom_and_crlf() -> None:
    c = read_corpus_jsonl(BAD_INPUTS / "corpus_bom_crlf_ok.jsonl")
    assert c.list_ids() == ["1", "2"] and c.passage(0) == "Café naïve"


def test_corrupt_gzip_is_an_input_error(tmp_path: Path) -> None:
    whole = gzip.compress(jsonl(*({"_id": str(i), "text": "x" * 50} for i in range(200))).encode())
    expect(read_corpus_jsonl, put(tmp_path, "cut.jsonl.gz", whole[: len(whole) // 2]), 1, None, "cannot read")
