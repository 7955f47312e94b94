"""Reranking a run with a cross-encoder: each query's top ``depth`` rescored, the rest dropped."""

from __future__ import annotations

import pytest

from conftest import make_tiny_beir
from leadkd.data.datasets import load_dataset
from leadkd.models.cross_encoder import CrossEncoder
from leadkd.models.dual_encoder import DualEncoder
from leadkd.retrieval.rerank import rerank_run, top_candidates
from leadkd.runtime.errors import LeadkdError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_dataset(make_tiny_beir(tmp_path_factory.mktemp("rerank") / "data"), split="dev")


def test_top_candidates_follow_the_evaluators_order():
    run = {"q": {"a": 1.0, "b": 3.0, "c": 3.0, "d": 0.5}}
    assert top_candidates(run, 3) == {"q": ["c", "b", "a"]}  # a tie: doc id descending, as trec_eval
    with pytest.raises(LeadkdError, match="depth"):
        top_candidates(run, 0)


def test_each_pair_gets_the_cross_encoders_own_score(tiny_bert, data):
    model = CrossEncoder.from_pretrained(tiny_bert, max_length=32)
    qids = [data.queries.id_at(i) for i in range(3)]
    docs = [data.corpus.id_at(i) for i in range(6)]
    run = {qid: {doc: float(rank) for rank, doc in enumerate(docs)} for qid in qids}
    reranked = rerank_run(model, run, data.queries, data.corpus, depth=4, batch_size=5)
    for qid in qids:
        kept = docs[-4:]  # the run's top 4: the highest scores
        assert sorted(reranked[qid]) == sorted(kept)
        query = data.queries.text(data.queries.index(qid))
        for doc in kept:
            passage = data.corpus.passage(data.corpus.index(doc))
            alone = float(model.score_pairs([query], [passage])[0])
            assert reranked[qid][doc] == pytest.approx(alone, abs=1e-5)


def test_what_cannot_be_reranked_is_one_clear_line(tiny_bert, data):
    model = CrossEncoder.from_pretrained(tiny_bert, max_length=32)
    qid = data.queries.id_at(0)
    with pytest.raises(LeadkdError, match="'nowhere' for query"):
        rerank_run(model, {qid: {"nowhere": 1.0}}, data.queries, data.corpus)
    with pytest.raises(LeadkdError, match="no query"):
        rerank_run(model, {"unknown-query": {data.corpus.id_at(0): 1.0}}, data.queries, data.corpus)
    with pytest.raises(LeadkdError, match="rerank with a cross-encoder"):
        rerank_run(DualEncoder.from_pretrained(tiny_bert), {qid: {data.corpus.id_at(0): 1.0}}, data.queries,
                   data.corpus)


def test_the_rerank_command_writes_the_rescored_run_and_its_evaluation(tiny_bert, data, tmp_path):
    import json

    from leadkd.cli import main
    from leadkd.data.runs import read_run, write_run
    from leadkd.models import load_model

    folder = tmp_path / "reranker"
    CrossEncoder.from_pretrained(tiny_bert, max_length=32, head="sequence_classification").save_pretrained(folder)
    (folder / "leadkd_config.json").unlink()  # as transformers saved it: found a reranker by its architecture
    qids = [data.queries.id_at(i) for i in range(len(data.queries))]
    docs = [data.corpus.id_at(i) for i in range(8)]
    write_run({qid: {doc: float(-rank) for rank, doc in enumerate(docs)} for qid in qids}, tmp_path / "first.trec")
    out = tmp_path / "out"
    assert main(["rerank", "--model", str(folder), "--run", str(tmp_path / "first.trec"), "--data",
                 str(data.source or ""), "--split", "dev", "--depth", "5", "--device", "cpu",
                 "--output", str(out)]) == 0
    run = read_run(out / "run.trec")
    model = load_model(folder)
    assert model.kind == "cross_encoder" and sorted(run) == sorted(qids)
    expected = rerank_run(model, {q: {d: float(-r) for r, d in enumerate(docs)} for q in qids}, data.queries,
                          data.corpus, depth=5)
    for qid in qids:
        assert sorted(run[qid]) == sorted(docs[:5])
        for doc, score in run[qid].items():
            assert score == pytest.approx(expected[qid][doc], abs=1e-5)
    assert set(json.loads((out / "metrics.json").read_text())) >= {"nDCG@10"}
