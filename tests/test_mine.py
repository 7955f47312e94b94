"""Hard-negative mining with a fake encoder whose ranking is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from leadkd.data.collection import Corpus, Qrels, Queries
from leadkd.data.datasets import Dataset
from leadkd.data.groups import read_training_groups, write_training_groups
from leadkd.retrieval.mine import mine_hard_negatives
from leadkd.retrieval.pipeline import encode_corpus
from leadkd.runtime.errors import ConfigError, LeadkdError

N = 40
DOC_IDS = [str(100 + j) for j in range(N)] + ["q1"]  # numeric-looking ids, as MS MARCO's; "q1" is also a query


class FakeEncoder:
    """Passage j is the unit vector e_j; a query's vector holds the score it gives each passage."""

    def __init__(self, rankings: dict[str, list[int]], allow_passages: bool = True):
        self.query_vectors = {}
        for text, order in rankings.items():
            v = np.zeros(len(DOC_IDS), dtype=np.float32)
            v[order] = np.arange(len(order), 0, -1, dtype=np.float32)  # order[0] scores highest
            self.query_vectors[text] = v
        self.allow_passages = allow_passages
        self.passage_calls = 0

    def encode_queries(self, texts, batch_size=32, show_progress=False):
        return np.stack([self.query_vectors[t] for t in texts])

    def encode_passages(self, texts, batch_size=32, show_progress=False):
        if not self.allow_passages:
            raise AssertionError("the corpus should not be re-encoded")
        self.passage_calls += 1
        return np.eye(len(DOC_IDS), dtype=np.float32)[[int(t.split()[1]) for t in texts]]


def natural(first: list[int] = ()) -> list[int]:
    """Rows ranked ``first`` then every other row in index order."""
    return list(first) + [r for r in range(len(DOC_IDS)) if r not in first]


def make_dataset(qrels: dict, query_ids=("q1", "q2", "q3")) -> Dataset:
    corpus = Corpus.from_records(DOC_IDS, [f"doc {j}" for j in range(len(DOC_IDS))])
    queries = Queries.from_records(list(query_ids), [f"query {q}" for q in query_ids])
    return Dataset("fake", "train", corpus, queries, Qrels(qrels))


def row(doc_id: str) -> int:
    return DOC_IDS.index(doc_id)


@pytest.fixture()
def setting():
    # q1 ranks "q1" (itself) 2nd and its positives 1st, 16th and 21st; "101" is judged but not relevant.
    rank_q1 = natural([row("100"), row("q1")])
    qrels = {"q1": {"100": 1, "115": 2, 120: 1, "101": 0}, "q2": {"139": 1}, "q3": {"110": 1}}
    rankings = {"query q1": rank_q1, "query q2": natural()[::-1], "query q3": natural()}
    return make_dataset(qrels), FakeEncoder(rankings), rankings


def expected_candidates(ranking: list[int], excluded: set[str]) -> list[str]:
    return [DOC_IDS[r] for r in ranking if DOC_IDS[r] not in excluded]


def test_every_positive_and_the_query_itself_are_excluded(setting):
    dataset, model, rankings = setting
    groups, report = mine_hard_negatives(model, dataset, depth=200, rank_range=(1, 100), negatives=100)
    g = {grp.query_id: grp for grp in groups}
    assert g["q1"].positive_ids == ["100", "115", "120"]  # judged >= 1, ids compared as strings
    assert not set(g["q1"].negative_ids) & {"100", "115", "120", "q1"}
    assert "101" in g["q1"].negative_ids  # judged non-relevant is a fair negative
    assert g["q1"].negative_ids == expected_candidates(rankings["query q1"], {"100", "115", "120", "q1"})
    for qid in ("q2", "q3"):
        assert not set(g[qid].negative_ids) & set(g[qid].positive_ids)
    assert (report.positives_excluded, report.self_excluded, report.processed) == (5, 1, 3)
    assert groups.stats().dropped_false_negatives == 0


def test_rank_range_is_one_based_start_inclusive_end_exclusive(setting):
    dataset, model, rankings = setting
    groups, _ = mine_hard_negatives(model, dataset, depth=20, rank_range=(3, 8), negatives=5)
    for grp in groups:
        full = expected_candidates(rankings[grp.query], set(grp.positive_ids) | {grp.query_id})
        assert grp.negative_ids == full[2:7]
    groups, _ = mine_hard_negatives(model, dataset, depth=20, rank_range=(3, 8), negatives=3)
    for grp in groups:
        full = expected_candidates(rankings[grp.query], set(grp.positive_ids) | {grp.query_id})
        assert set(grp.negative_ids) <= set(full[2:7]) and len(grp.negative_ids) == 3
        assert grp.negative_ids == sorted(grp.negative_ids, key=full.index)  # kept in rank order


def test_sampling_is_seeded(setting):
    dataset, model, _ = setting

    def negatives(seed):
        groups, _ = mine_hard_negatives(model, dataset, depth=40, rank_range=(2, 30), negatives=5, seed=seed)
        return [grp.negative_ids for grp in groups]

    assert negatives(0) == negatives(0)
    assert len({str(negatives(s)) for s in range(5)}) > 1


def test_short_and_skipped_queries_are_reported(setting):
    _, model, rankings = setting
    qrels = {"q1": {"100": 1, "115": 2, 120: 1}, "q2": {"139": 1}, "q3": {"110": 0}, "q9": {"100": 1},
             "q4": {"nowhere": 1}}
    dataset = make_dataset(qrels, ("q1", "q2", "q3", "q4"))
    rankings["query q4"] = natural()
    groups, report = mine_hard_negatives(FakeEncoder(rankings), dataset, depth=200, rank_range=(10, 100),
                                         negatives=30)
    # 41 passages: q1 loses 3 positives + itself -> 37 candidates, ranks 10..37 -> 28; q2 loses 1 -> 31.
    assert [grp.query_id for grp in groups] == ["q1", "q2"]
    assert [len(grp.negative_ids) for grp in groups] == [28, 30]
    assert (report.queries_judged, report.processed) == (5, 2)
    assert (report.skipped_no_positive, report.skipped_no_query) == (2, 1)
    assert report.positives_not_in_corpus == 1
    assert (report.short_queries, report.missing_negatives, report.fewest_negatives) == (1, 2, 28)
    assert report.short_examples == [("q1", 28)]
    assert "1 queries short of negatives by 2" in report.summary()
    assert report.as_dict()["settings"]["rank_range"] == [10, 100]


def test_min_rel(setting):
    dataset, model, _ = setting
    groups, report = mine_hard_negatives(model, dataset, depth=40, rank_range=(1, 41), negatives=50, min_rel=2)
    assert [(grp.query_id, grp.positive_ids) for grp in groups] == [("q1", ["115"])]
    assert "100" in groups.group(0).negative_ids  # only judged 1: not a positive at min_rel 2
    assert report.skipped_no_positive == 2


def test_precomputed_corpus_embeddings_are_reused(setting):
    dataset, model, rankings = setting
    embeddings = encode_corpus(model, dataset.corpus, show_progress=False)
    fresh, _ = mine_hard_negatives(model, dataset, depth=30, rank_range=(2, 20), negatives=4)
    quiet = FakeEncoder(rankings, allow_passages=False)
    for given in (embeddings, np.asarray(embeddings.vectors)):
        reused, _ = mine_hard_negatives(quiet, dataset, depth=30, rank_range=(2, 20), negatives=4,
                                        corpus_embeddings=given)
        assert list(reused) == list(fresh)
    shuffled = type(embeddings)(embeddings.ids[::-1], embeddings.vectors[::-1], {})
    with pytest.raises(LeadkdError, match="not of this corpus"):
        mine_hard_negatives(quiet, dataset, corpus_embeddings=shuffled)
    with pytest.raises(LeadkdError, match="do not match"):
        mine_hard_negatives(quiet, dataset, corpus_embeddings=embeddings.vectors[:5])


@pytest.mark.parametrize("kwargs", [{"rank_range": (0, 5)}, {"rank_range": (5, 5)},
                                    {"depth": 50, "rank_range": (10, 52)}, {"negatives": 0}, {"depth": 0},
                                    {"seed": -1}])
def test_bad_settings(setting, kwargs):
    dataset, model, _ = setting
    with pytest.raises(ConfigError):
        mine_hard_negatives(model, dataset, **kwargs)


def test_nothing_to_mine(setting):
    _, model, _ = setting
    with pytest.raises(LeadkdError, match="no query could be mined"):
        mine_hard_negatives(model, make_dataset({"q1": {"100": 0}}))


def test_mined_file_round_trips_with_the_corpus_only(setting, tmp_path):
    dataset, model, _ = setting
    groups, _ = mine_hard_negatives(model, dataset, depth=30, rank_range=(2, 20), negatives=4)
    write_training_groups(groups, tmp_path / "hard.jsonl")
    again = read_training_groups(tmp_path / "hard.jsonl", dataset.corpus)
    assert list(again) == list(groups)


def test_with_a_real_dual_encoder(tiny_bert):
    from leadkd.models.dual_encoder import DualEncoder

    model = DualEncoder.from_pretrained(tiny_bert, max_query_length=16, max_passage_length=32)
    words = "cell protein gene cancer risk study patients virus brain heart blood drug".split()
    ids = [str(i) for i in range(len(words) * 2)]
    texts = [f"the {w} {v}" for w in words for v in ("increase", "decrease")]
    corpus = Corpus.from_records(ids, texts)
    queries = Queries.from_records(["a", "b"], ["cell protein", "heart blood"])
    dataset = Dataset("tiny", "train", corpus, queries, Qrels({"a": {"0": 1, "1": 1}, "b": {"18": 1}}))
    groups, report = mine_hard_negatives(model, dataset, depth=10, rank_range=(2, 8), negatives=4, batch_size=8)
    assert report.processed == 2 and report.short_queries == 0
    for grp in groups:
        assert len(grp.negative_ids) == 4 and not set(grp.negative_ids) & set(grp.positive_ids)


def test_the_search_runs_on_the_models_device_in_the_asked_precision(setting, monkeypatch):
    """The dense ranker hands the model's device and the search dtype to the search; half precision mines
    the same groups here, where every score is a small integer (exact in float16 and bfloat16)."""
    import torch

    from leadkd.retrieval import mine

    dataset, model, _ = setting
    model.device = torch.device("cpu")
    seen = []
    real_search = mine.exact_search

    def spy(*args, **kwargs):
        seen.append((kwargs["device"], kwargs["dtype"]))
        return real_search(*args, **kwargs)

    monkeypatch.setattr(mine, "exact_search", spy)
    full, report = mine_hard_negatives(model, dataset, depth=30, rank_range=(2, 20), negatives=4)
    half, half_report = mine_hard_negatives(model, dataset, depth=30, rank_range=(2, 20), negatives=4,
                                            search_dtype="bfloat16")
    assert seen == [(torch.device("cpu"), "float32"), (torch.device("cpu"), "bfloat16")]
    assert list(half) == list(full)
    assert (report.settings["search_dtype"], half_report.settings["search_dtype"]) == ("float32", "bfloat16")
    with pytest.raises(ConfigError, match="search dtype"):
        mine_hard_negatives(model, dataset, search_dtype="int8")
