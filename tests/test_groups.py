"""Training groups: reading/validation, round trips, sampling (the paper's TraditionDataset) and batching."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from leadkd.data.batches import EpochSampler, GroupDataset, collate_groups, group_loader, sample_group
from leadkd.data.collection import Corpus, Queries
from leadkd.data.groups import GroupsBuilder, read_training_groups, write_training_groups
from leadkd.runtime.errors import InputError, LeadkdError


@pytest.fixture()
def corpus() -> Corpus:
    ids = [f"d{i}" for i in range(10)] + ["101"]
    texts = [f"text {i}" for i in range(10)] + ["numeric id"]
    titles = ["T0"] + [""] * 10
    return Corpus.from_records(ids, texts, titles)


@pytest.fixture()
def queries() -> Queries:
    return Queries.from_records(["q1", "q2", "q3"], ["first query", "second query", "third query"])


def write_lines(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_reads_ids_inline_texts_and_resolves_queries(tmp_path, corpus, queries):
    path = write_lines(tmp_path / "g.jsonl", [
        {"query_id": "q1", "positives": ["d0"], "negatives": ["d1", 101, {"id": "x", "text": "inline", "title": "Ti"}]},
        "",
        {"query_id": "q9", "query": "own text", "positives": [{"id": "d2"}], "negatives": []},
        {"query_id": 2, "query": "new wording", "positives": ["d3", "d4"]},
    ])
    groups = read_training_groups(path, corpus, queries)
    assert len(groups) == 3
    g0, g1, g2 = list(groups)
    assert (g0.query, g0.positive_ids, g0.negative_ids) == ("first query", ["d0"], ["d1", "101", "x"])
    assert [groups.passage(k) for k in groups.negative_keys(0)] == ["text 1", "numeric id", "Ti inline"]
    assert groups.passage(groups.positive_keys(0)[0]) == corpus.passage(0) == "T0 text 0"
    assert (g1.query_id, g1.query, g1.negative_ids) == ("q9", "own text", [])
    assert (g2.query_id, g2.query) == ("2", "new wording")  # inline text wins over the collection
    stats = groups.stats()
    assert (stats.groups, stats.negatives_min, stats.negatives_max, stats.groups_without_negatives) == (3, 0, 3, 2)
    assert (stats.positives_max, stats.inline_passages, stats.with_teacher_scores) == (2, 1, False)


def test_query_text_identical_to_collection_is_not_copied(tmp_path, corpus, queries):
    path = write_lines(tmp_path / "g.jsonl", [{"query_id": "q2", "query": "second query", "positives": ["d0"]}])
    groups = read_training_groups(path, corpus, queries)
    assert groups.query_text(0) == "second query"
    assert groups._query_texts == {}  # memory: the row is kept, not a second string


def test_corpus_free_file(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        {"query_id": "a", "query": "q", "positives": [{"id": "p", "text": "pos"}],
         "negatives": [{"id": "n", "text": "neg"}, {"id": "p2", "text": "pos two"}]},
        {"query_id": "b", "query": "r", "positives": [{"id": "n", "text": "neg"}],
         "negatives": [{"id": "p", "text": "pos"}]},
    ])
    groups = read_training_groups(path)
    assert groups.group(1).positive_ids == ["n"]
    assert groups.stats().inline_passages == 3  # deduplicated by id


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_write_read_round_trip(tmp_path, corpus, queries, suffix):
    src = write_lines(tmp_path / "in.jsonl", [
        {"query_id": "q1", "positives": ["d0", "d5"], "negatives": ["d1", {"id": "x", "text": "t", "title": "T"}],
         "teacher_scores": [0.3, 1.5, -2.25, 7.0]},
        {"query_id": "q3", "query": "changed", "positives": ["101"], "negatives": ["d9"],
         "teacher_scores": {"101": 1.0, "d9": 0.1}},
    ])
    groups = read_training_groups(src, corpus, queries)
    out = tmp_path / f"out{suffix}"
    write_training_groups(groups, out)
    again = read_training_groups(out, corpus)  # query texts were written: no queries needed
    assert list(again) == list(groups)
    assert again.group(0).teacher_scores == pytest.approx([0.3, 1.5, -2.25, 7.0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_negatives_that_are_positives_are_dropped_with_their_scores(tmp_path, corpus, queries):
    path = write_lines(tmp_path / "g.jsonl", [
        {"query_id": "q1", "positives": ["d0", "d1"], "negatives": ["d1", "d2", "d0", "d3"],
         "teacher_scores": [10, 11, 1, 2, 3, 4]},
    ])
    groups = read_training_groups(path, corpus, queries)
    assert groups.group(0).negative_ids == ["d2", "d3"]
    assert groups.group(0).teacher_scores == [10, 11, 2, 4]
    assert groups.stats().dropped_false_negatives == 2


BAD_LINES = [
    ("{not json", "invalid JSON", None),
    ("[1, 2]", "expected a JSON object, got list", None),
    ({"query_id": "q1", "negatives": ["d1"]}, "missing", "positives"),
    ({"query_id": "q1", "positives": []}, "empty", "positives"),
    ({"query_id": "q1", "positives": "d0"}, "must be a list", "positives"),
    ({"query_id": "q1", "positives": ["d0"], "negatives": ["nope"]}, "'nope' is not in the corpus", "negatives[0]"),
    ({"query_id": "q1", "positives": [True]}, "must be a passage id", "positives[0]"),
    ({"query_id": "q1", "positives": [{"text": "t"}]}, "needs an 'id'", "positives[0]"),
    ({"query_id": "q1", "positives": [{"id": "z", "text": "  "}]}, "non-empty string", "positives[0]"),
    ({"query_id": "q1", "positives": [{"id": "z", "text": "t", "score": 1}]}, "unknown key 'score'", "positives[0]"),
    ({"query_id": "q7", "positives": ["d0"]}, "query 'q7' has no 'query' text and is not in the queries", "query"),
    ({"query_id": "q1", "query": "", "positives": ["d0"]}, "non-empty string", "query"),
    ({"query": "text only", "positives": ["d0"]}, "missing", "query_id"),
    ({"query_id": "q1", "positives": ["d0"], "negative": ["d1"]}, "unknown field", "negative"),
    ({"query_id": "q1", "positives": ["d0"], "negatives": ["d1"], "teacher_scores": [1.0]},
     "has 1 scores for 2", "teacher_scores"),
    ({"query_id": "q1", "positives": ["d0"], "teacher_scores": "high"}, "must be a list", "teacher_scores"),
    ({"query_id": "q1", "positives": ["d0"], "teacher_scores": [None]}, "finite numbers", "teacher_scores"),
    ({"query_id": "q1", "positives": ["d0"], "teacher_scores": [float("nan")]}, "finite numbers", "teacher_scores"),
    ({"query_id": "q1", "positives": ["d0"], "negatives": ["d1"], "teacher_scores": {"d0": 1}},
     "no score for passage 'd1'", "teacher_scores"),
    ({"query_id": "q1", "positives": ["d0"], "teacher_scores": {"d0": 1, "d8": 2}}, "not in this group",
     "teacher_scores"),
]


@pytest.mark.parametrize("bad,message,field", BAD_LINES)
def test_bad_line_is_one_located_error(tmp_path, corpus, queries, bad, message, field):
    good = {"query_id": "q2", "positives": ["d0"], "negatives": ["d1"]}
    if isinstance(bad, dict) and "teacher_scores" in bad:
        good["teacher_scores"] = [1.0, 0.0]
    path = write_lines(tmp_path / "g.jsonl", [good, bad if isinstance(bad, str) else json.dumps(bad)])
    with pytest.raises(InputError) as info:
        read_training_groups(path, corpus, queries)
    err = info.value
    assert (err.line, err.field) == (2, field)
    assert message in str(err) and "\n" not in str(err)
    assert str(err).startswith(f"{path}:2: ")


def test_whole_file_errors(tmp_path, corpus, queries):
    with pytest.raises(InputError, match="empty"):
        read_training_groups(write_lines(tmp_path / "e.jsonl", ["", "  "]), corpus, queries)
    with pytest.raises(InputError, match="no such file"):
        read_training_groups(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no corpus was given") as info:
        read_training_groups(write_lines(tmp_path / "n.jsonl", [{"query_id": "a", "query": "q", "positives": ["d0"]}]))
    assert info.value.field == "positives[0]"
    with pytest.raises(InputError, match="some groups but not others") as info:
        read_training_groups(write_lines(tmp_path / "t.jsonl", [
            {"query_id": "q1", "positives": ["d0"], "teacher_scores": [1]},
            {"query_id": "q2", "positives": ["d0"]}]), corpus, queries)
    assert info.value.line == 2
    with pytest.raises(InputError, match="inline twice with different text") as info:
        read_training_groups(write_lines(tmp_path / "c.jsonl", [
            {"query_id": "a", "query": "q", "positives": [{"id": "p", "text": "one"}]},
            {"query_id": "b", "query": "q", "positives": [{"id": "p", "text": "two"}]}]))
    assert (info.value.line, info.value.field) == (2, "positives[0]")


def test_first_error_in_file_order_wins_over_batched_id_lookup(tmp_path, corpus, queries):
    rows = [{"query_id": "q1", "positives": ["d0"], "negatives": ["d1"]}] * 3
    rows.insert(1, {"query_id": "q1", "positives": ["d0"], "negatives": ["d1", "missing"]})
    rows.append("{broken")
    with pytest.raises(InputError) as info:
        read_training_groups(write_lines(tmp_path / "g.jsonl", rows), corpus, queries)
    assert (info.value.line, info.value.field) == (2, "negatives[1]")


# -- sampling and batching ----------------------------------------------------------------------------------


def build_groups(corpus, queries, negatives_per_group=(5, 2, 0), teacher=False):
    """Group i: query q{i+1} (cycled), positives d0 and d9, then the first n of d1..d8 as negatives."""
    b = GroupsBuilder(corpus, queries)
    for i, n in enumerate(negatives_per_group):
        neg = list(range(1, 1 + n))
        scores = [100.0, 90.0] + [float(k) for k in neg] if teacher else None
        b.add(f"q{i % 3 + 1}", [0, 9], neg, query_row=i % 3, teacher_scores=scores)
    return b.build()


def test_sample_takes_first_positive_and_distinct_shuffled_negatives(corpus, queries):
    groups = build_groups(corpus, queries, (5,), teacher=True)
    seen = set()
    for s in range(20):
        sample = sample_group(groups, 0, 3, np.random.default_rng(s))
        assert sample.passage_ids[0] == "d0" and sample.passages[0] == "T0 text 0"
        negs = sample.passage_ids[1:]
        assert len(set(negs)) == 3 and set(negs) <= {"d1", "d2", "d3", "d4", "d5"}
        assert sample.teacher_scores.tolist() == [100.0] + [float(p[1:]) for p in negs]
        seen.add(tuple(negs))
    assert len(seen) > 5  # shuffled, not always the first three
    positives = {sample_group(groups, 0, 1, np.random.default_rng(s), random_positive=True).passage_ids[0]
                 for s in range(20)}
    assert positives == {"d0", "d9"}


def test_sample_repeats_a_short_list_evenly(corpus, queries):
    groups = build_groups(corpus, queries, (2,))
    sample = sample_group(groups, 0, 5, np.random.default_rng(0))
    counts = Counter(sample.passage_ids[1:])
    assert set(counts) == {"d1", "d2"} and sorted(counts.values()) == [2, 3]
    with pytest.raises(LeadkdError, match="no negatives"):
        sample_group(build_groups(corpus, queries, (0,)), 0, 1, np.random.default_rng(0))


def test_dataset_is_a_function_of_seed_epoch_and_group(corpus, queries):
    groups = build_groups(corpus, queries, (5, 2, 0, 4))
    ds = GroupDataset(groups, negatives=2, seed=3)
    assert len(ds) == 3 and ds.skipped == 1  # the group without negatives is left out
    assert [ds[i].query_id for i in range(3)] == ["q1", "q2", "q1"]
    first = [ds[i].passage_ids for i in range(3)]
    assert [ds[(0, i)].passage_ids for i in reversed(range(3))] == first[::-1]  # order-independent
    assert [GroupDataset(groups, 2, seed=3)[i].passage_ids for i in range(3)] == first
    epochs = {tuple(GroupDataset(groups, 2, seed=3)[(e, 0)].passage_ids) for e in range(10)}
    assert len(epochs) > 1
    ds.set_epoch(4)
    assert ds[0].passage_ids == ds[(4, 0)].passage_ids
    assert len(GroupDataset(groups, negatives=0)) == 4
    with pytest.raises(LeadkdError, match="none of the"):
        GroupDataset(build_groups(corpus, queries, (0, 0)), negatives=1)


def test_collate_is_query_major(corpus, queries):
    groups = build_groups(corpus, queries, (5, 2), teacher=True)
    ds = GroupDataset(groups, negatives=3)
    batch = collate_groups([ds[0], ds[1]])
    assert len(batch) == 2 and batch.group_size == 4 and batch.negatives == 3
    assert batch.queries == ["first query", "second query"]
    assert len(batch.passages) == len(batch.passage_ids) == 8
    assert batch.labels.tolist() == [0, 4]
    assert [batch.passage_ids[i] for i in batch.labels.tolist()] == ["d0", "d0"]
    assert batch.passage_ids[:4] == ds[0].passage_ids and batch.passage_ids[4:] == ds[1].passage_ids
    assert batch.teacher_scores.shape == (2, 4) and batch.teacher_scores.dtype == torch.float32
    assert batch.teacher_scores[:, 0].tolist() == [100.0, 100.0]
    assert batch.to("cpu").labels.tolist() == [0, 4]
    assert collate_groups([GroupDataset(build_groups(corpus, queries, (1,)), 1)[0]]).teacher_scores is None


def test_loader_shards_ranks_and_reshuffles_per_epoch(corpus, queries):
    b = GroupsBuilder(corpus, queries)
    for i in range(8):
        b.add(f"g{i}", [0], [1, 2, 3], query_text=f"query {i}")
    ds = GroupDataset(b.build(), negatives=2, seed=1)

    def epoch_batches(rank, world, epoch):
        loader = group_loader(ds, batch_size=2, rank=rank, world_size=world, seed=7)
        loader.sampler.set_epoch(epoch)
        return [(b.query_ids, b.passage_ids) for b in loader]

    ranks = [epoch_batches(r, 2, 0) for r in range(2)]
    assert all(len(r) == 2 for r in ranks)
    shown = sorted(q for r in ranks for qids, _ in r for q in qids)
    assert shown == [f"g{i}" for i in range(8)]  # every group once across the two ranks
    assert epoch_batches(0, 2, 0) == ranks[0]  # a resumed run sees the same batches
    assert epoch_batches(0, 2, 1) != ranks[0]
    assert isinstance(group_loader(ds, 2).sampler, EpochSampler)


def test_packed_inputs_come_back_as_the_same_tensors_and_flags():
    """A worker's batch crosses to the training process as one buffer (``Packed``): every tensor comes back
    equal, with its shape, as a view of that buffer; flags and empty tensors survive too."""
    import torch

    from leadkd.data.batches import Packed

    query = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "padded": False}
    pairs = {"input_ids": torch.zeros(0, 4, dtype=torch.long), "token_type_ids": torch.tensor([3])}
    tree = {"student": {"query": query, "passage": {"input_ids": torch.arange(20).view(4, 5) * 7, "padded": True}},
            "teacher": {"pairs": pairs}}
    packed = Packed.of(tree)
    assert packed.flat.dim() == 1 and packed.flat.numel() == 6 + 6 + 20 + 0 + 1
    back = packed.unpacked()

    def same(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                same(a[key], b[key])
        elif isinstance(a, torch.Tensor):
            assert a.shape == b.shape and torch.equal(a, b)
            assert b.numel() == 0 or b.untyped_storage().data_ptr() == packed.flat.untyped_storage().data_ptr()
        else:
            assert a == b

    same(tree, back)
