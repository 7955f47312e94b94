"""BM25 mining: bm25s's scores against a BM25 written out by hand, rankings, `leadkd mine --retriever bm25`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("bm25s")

from conftest import make_tiny_beir
from leadkd.cli import build_parser, main
from leadkd.data.collection import Corpus, Qrels, Queries
from leadkd.data.datasets import Dataset, load_corpus, load_dataset
from leadkd.data.groups import read_training_groups
from leadkd.retrieval import bm25
from leadkd.retrieval.bm25 import BM25Ranker, top_rows
from leadkd.retrieval.mine import mine_with_ranker
from leadkd.runtime.errors import LeadkdError

# Every stop word here is in any English list; every other word is in none.
STOP = {"the", "of", "and", "is", "in", "to", "with", "for", "on", "are"}
TITLES = ["", "Heart", "", "", "", "", "", ""]
TEXTS = [
    "The heart pumps blood and the blood carries oxygen",
    "Blood pressure in the heart rises with age",
    "Cancer cells divide and cancer cells spread",
    "A vaccine trains the immune system",
    "Cancer cells divide and cancer cells spread",  # a duplicate of row 2: an exact tie
    "the of and is",                                # only stop words: length 0
    "Mouse brain cells and human brain cells differ in size",
    "Drug dose trial results show a low dose works",
]
QUERIES = [
    "heart blood",
    "cancer cancer cells",       # a repeated term counts twice
    "vaccine for zebrafish",     # zebrafish is in no passage
    "brain DOSE",                # case folded
    "zebrafish unicorn",         # nothing in the corpus
]


def naive_tokens(text: str, stem=None) -> list[str]:
    words = [w for w in re.findall(r"\w\w+", text.lower()) if w not in STOP]
    return [stem(w) for w in words] if stem else words


def naive_bm25(docs: list[str], query: str, k1: float, b: float, stem=None) -> list[float]:
    """Lucene's BM25 (Kamphuis et al. 2020): idf = log(1 + (N - df + .5) / (df + .5)) times
    tf / (tf + k1 (1 - b + b dl / avgdl)), summed over the query's words, repeats included."""
    tokens = [naive_tokens(d, stem) for d in docs]
    n = len(tokens)
    avgdl = sum(len(t) for t in tokens) / n
    df: dict[str, int] = {}
    for t in tokens:
        for word in set(t):
            df[word] = df.get(word, 0) + 1
    scores = []
    for t in tokens:
        tf = Counter(t)
        total = 0.0
        for word in naive_tokens(query, stem):
            if tf[word]:
                idf = math.log(1 + (n - df[word] + 0.5) / (df[word] + 0.5))
                total += idf * tf[word] / (tf[word] + k1 * (1 - b + b * len(t) / avgdl))
        scores.append(total)
    return scores


def naive_ranking(scores: list[float], exclude: set[int], depth: int) -> list[int]:
    rows = [r for r, s in enumerate(scores) if s > 0 and r not in exclude]
    return sorted(rows, key=lambda r: (-scores[r], r))[:depth]


def corpus() -> Corpus:
    return Corpus.from_records([f"d{i}" for i in range(len(TEXTS))], TEXTS, titles=TITLES)


def passages() -> list[str]:
    return [f"{t} {x}" if t else x for t, x in zip(TITLES, TEXTS, strict=True)]


@pytest.mark.parametrize("k1,b", [(bm25.K1, bm25.B), (0.9, 0.4), (2.0, 1.0)])
def test_scores_equal_a_naive_lucene_bm25(k1, b):
    got = BM25Ranker(corpus(), k1=k1, b=b).scores(QUERIES)
    want = np.array([naive_bm25(passages(), q, k1, b) for q in QUERIES])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[1, 2] == got[1, 4] > 0  # the duplicate passages tie exactly
    assert not got[4].any()  # a query of unknown words scores nothing
    assert got[0, 1] > 0  # the title "Heart" is indexed with the text


def strip_plural(words: list[str]) -> list[str]:
    return [w[:-1] if w.endswith("s") else w for w in words]


def test_a_stemmer_is_applied_to_passages_and_queries_alike():
    ranker = BM25Ranker(corpus(), stemmer=strip_plural)
    queries = ["cell", "pump hearts"]
    want = [naive_bm25(passages(), q, bm25.K1, bm25.B, stem=lambda w: strip_plural([w])[0]) for q in queries]
    np.testing.assert_allclose(ranker.scores(queries), np.array(want), rtol=1e-5, atol=1e-6)
    assert ranker.scores(["cell"])[0, 2] > 0  # "cells" in the passage met "cell" in the query
    assert ranker.settings()["bm25"]["tokenizer"]["stemmer"] == "strip_plural"


def test_rankings_equal_the_naive_ranking():
    ranker = BM25Ranker(corpus())
    exclude = [{1}, {4}, set(), {6, 7}, set()]
    for depth in (1, 2, 3, 8):
        got = ranker.rank(QUERIES, exclude, depth)
        for query, banned, rows in zip(QUERIES, exclude, got, strict=True):
            scores = naive_bm25(passages(), query, bm25.K1, bm25.B)
            gaps = sorted({round(s, 9) for s in scores})
            assert min(np.diff(gaps), default=1) > 1e-4  # no near-tie a float32 could reorder
            assert rows.tolist() == naive_ranking(scores, banned, depth), (query, depth)


def test_top_rows_breaks_ties_by_row_and_keeps_ties_across_the_cut():
    scores = np.array([0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 3.0], dtype=np.float32)
    assert top_rows(scores, set(), 3).tolist() == [6, 1, 3]
    assert top_rows(scores, {1}, 3).tolist() == [6, 3, 2]
    assert top_rows(scores, set(), 4).tolist() == [6, 1, 3, 2]
    assert top_rows(scores, set(), 100).tolist() == [6, 1, 3, 2, 4, 5]  # row 0 shares no word: not retrieved


def test_mining_with_bm25_excludes_every_positive_and_records_its_settings():
    ids = [f"d{i}" for i in range(len(TEXTS))]
    queries = Queries.from_records(["q0", "q1", "d3"], ["heart blood pressure", "cancer cells", "immune heart"])
    qrels = Qrels({"q0": {"d0": 1, "d1": 2}, "q1": {"d2": 1, "d6": 0}, "d3": {"d0": 1}})
    dataset = Dataset("tiny", "train", corpus(), queries, qrels)
    groups, report = mine_with_ranker(BM25Ranker(dataset.corpus, k1=0.9, b=0.4), dataset, depth=5,
                                      rank_range=(1, 6), negatives=3)
    by_query = {g.query_id: g for g in groups}
    assert set(by_query["q0"].positive_ids) == {"d0", "d1"}
    assert not {"d0", "d1"} & set(by_query["q0"].negative_ids)
    assert "d2" not in by_query["q1"].negative_ids and "d6" in by_query["q1"].negative_ids  # rel 0: a negative
    assert "d3" not in by_query["d3"].negative_ids  # a query's own id is never its negative
    # q1's candidates are the duplicate d4 and d6 (they share "cells"): two, short of three.
    assert by_query["q1"].negative_ids == ["d4", "d6"]
    assert report.short_queries >= 1 and report.positives_excluded == 4 and report.self_excluded == 1
    settings = report.as_dict()["settings"]
    assert settings["retriever"] == "bm25"
    assert settings["bm25"]["k1"] == 0.9 and settings["bm25"]["b"] == 0.4 and settings["bm25"]["method"] == "lucene"
    assert settings["bm25"]["tokenizer"]["stopwords"] == "en" and settings["bm25"]["tokenizer"]["stemmer"] is None
    assert json.loads(json.dumps(report.as_dict())) == report.as_dict()
    assert ids  # the corpus ids are the groups' vocabulary


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([str(a) for a in args])
    return status, err.getvalue()


def test_cli_mines_with_bm25_without_a_model(tmp_path, monkeypatch):
    data = make_tiny_beir(tmp_path / "beir")
    out = tmp_path / "groups.jsonl"
    import leadkd.cli.commands

    monkeypatch.setattr(leadkd.cli.commands, "_load_model", lambda args: pytest.fail("BM25 mining loaded a model"))
    status, err = run_cli("mine", "--data", data, "--retriever", "bm25", "--depth", "20", "--range", "1:20",
                          "--negatives", "4", "--bm25-k1", "1.5", "--output", out)
    assert status == 0, err
    groups = read_training_groups(out, corpus=load_corpus(data))
    train = load_dataset(data, split="train").qrels
    assert len(groups) == 12
    for group in groups:
        positives = {d for d, r in train[group.query_id].items() if r >= 1}
        assert set(group.positive_ids) == positives
        assert group.negative_ids and not positives & set(group.negative_ids)
        assert len(set(group.negative_ids)) == len(group.negative_ids) <= 4
    report = json.loads((tmp_path / "groups.jsonl.report.json").read_text())
    assert report["settings"]["retriever"] == "bm25" and report["settings"]["bm25"]["k1"] == 1.5
    assert report["settings"]["bm25"]["b"] == 0.75 and report["processed"] == 12


def test_cli_defaults_are_the_modules():
    args = build_parser().parse_args(["mine", "--data", "x", "--output", "y"])
    assert args.retriever == "dense"
    assert (args.bm25_k1, args.bm25_b) == (bm25.K1, bm25.B)


def test_a_missing_bm25s_is_one_line_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # `import bm25s` now raises ImportError
    with pytest.raises(LeadkdError, match=r"pip install leadkd\[bm25\]"):
        BM25Ranker(corpus())
    status, err = run_cli("mine", "--data", tmp_path / "nowhere", "--retriever", "bm25", "--output", tmp_path / "g")
    assert status == 2
    assert err.splitlines() == [f"leadkd: error: {bm25.INSTALL_HINT}"]
    assert "pip install leadkd[bm25]" in err


@pytest.mark.parametrize("kwargs", [{"k1": -1.0}, {"b": 1.5}, {"b": float("nan")}])
def test_bad_bm25_settings(kwargs):
    with pytest.raises(LeadkdError):
        BM25Ranker(corpus(), **kwargs)
