"""Exact search: agrees with a brute-force sort, is blocking-invariant, breaks ties by index, honours exclusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leadkd.retrieval.search import exact_search, to_run
from leadkd.runtime.errors import ConfigError, LeadkdError


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full score matrix, stable sort (lower index first among ties)."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(docs).T
    values, index = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k].numpy(), index[:, :k].numpy()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((37, 16), dtype=np.float32), rng.standard_normal((203, 16), dtype=np.float32)


@pytest.mark.parametrize("query_batch,doc_block", [(1024, 32768), (5, 17), (2, 5), (37, 203), (8, 64)])
def test_matches_brute_force_for_any_blocking(data, query_batch, doc_block):
    queries, docs = data
    scores, indices = exact_search(queries, docs, 10, query_batch_size=query_batch, doc_block_size=doc_block)
    ref_scores, ref_indices = brute_force(queries, docs, 10)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (37, 10)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_accepts_tensors_and_clamps_k(data):
    queries, docs = data
    scores, indices = exact_search(torch.from_numpy(queries), torch.from_numpy(docs[:7]), 50, doc_block_size=3)
    assert scores.shape == (37, 7)
    assert sorted(indices[0].tolist()) == list(range(7))
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ties_break_by_lower_index_even_across_the_cut():
    # Docs 1..6 tie exactly; k=3 cuts through the tie: the lowest indices must win, in order.
    docs = np.array([[0.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [2.0]], dtype=np.float32)
    queries = np.ones((2, 1), dtype=np.float32)
    for block in (1, 2, 3, 8):
        scores, indices = exact_search(queries, docs, 3, doc_block_size=block, query_batch_size=1)
        assert indices.tolist() == [[7, 1, 2]] * 2
        assert scores.tolist() == [[2.0, 1.0, 1.0]] * 2


def test_many_random_ties_match_stable_sort():
    rng = np.random.default_rng(1)
    docs = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)  # small integers: lots of exact ties
    queries = rng.integers(-2, 3, size=(20, 4)).astype(np.float32)
    for block in (7, 64, 300):
        _, indices = exact_search(queries, docs, 25, doc_block_size=block, query_batch_size=6)
        np.testing.assert_array_equal(indices, brute_force(queries, docs, 25)[1])


def test_exclusion_removes_documents_and_pads(data):
    queries, docs = data
    _, top = brute_force(queries, docs, 5)
    exclude = [set(top[i, :2].tolist()) for i in range(len(queries))]
    exclude[3] = set()
    exclude[4] = None
    _, indices = exact_search(queries, docs, 5, exclude=exclude, doc_block_size=50, query_batch_size=10)
    for i, row in enumerate(indices):
        assert not set(row.tolist()) & (exclude[i] or set())
    assert indices[0, :3].tolist() == top[0, 2:].tolist()
    assert indices[3].tolist() == top[3].tolist()

    small = docs[:4]
    scores, indices = exact_search(queries[:2], small, 4, exclude=[{0, 2}, {1, 2, 3}])
    assert indices[1].tolist()[1:] == [-1, -1, -1] and indices[1, 0] == 0
    assert np.isneginf(scores[1, 1:]).all() and (indices[0] >= 0).sum() == 2


def test_memmap_documents(tmp_path, data):
    queries, docs = data
    np.save(tmp_path / "docs.npy", docs)
    mapped = np.load(tmp_path / "docs.npy", mmap_mode="r")
    _, indices = exact_search(queries, mapped, 10, doc_block_size=40)
    np.testing.assert_array_equal(indices, brute_force(queries, docs, 10)[1])


def test_errors(data):
    queries, docs = data
    with pytest.raises(LeadkdError, match="dimension 16 .* dimension 8"):
        exact_search(queries, docs[:, :8], 3)
    with pytest.raises(ConfigError):
        exact_search(queries, docs, 0)
    with pytest.raises(ValueError, match="entries"):
        exact_search(queries, docs, 3, exclude=[set()])
    with pytest.raises(ValueError, match="outside"):
        exact_search(queries[:1], docs, 3, exclude=[{999}])


def test_empty_queries(data):
    scores, indices = exact_search(np.zeros((0, 16), np.float32), data[1], 3)
    assert scores.shape == indices.shape == (0, 3)


def test_to_run_maps_ids_and_drops_padding():
    run = to_run(["q1", "q2"], ["a", "b", "c"], np.array([[3.0, 2.0], [1.5, -np.inf]], np.float32),
                 np.array([[2, 0], [1, -1]]))
    assert run == {"q1": {"c": 3.0, "a": 2.0}, "q2": {"b": 1.5}}
    assert list(run["q1"]) == ["c", "a"]


@pytest.mark.parametrize("bounds", [(0, 17, 33, 50), (0, 3, 50), (0, 25, 25, 50)], ids=["three", "tiny", "empty"])
def test_merging_the_shards_top_k_gives_the_collections_top_k(bounds):
    """Under torchrun each process searches a contiguous share of the corpus; the merge must be the
    brute-force top-k of all of it, ties by lower global index, with a share smaller than k or empty."""
    from leadkd.retrieval.search import merge_top_k

    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, (9, 4)).astype(np.float32)  # small integers: many exact ties
    d = rng.integers(-2, 3, (50, 4)).astype(np.float32)
    k = 8
    full = q @ d.T
    expected = np.array([sorted(range(50), key=lambda j: (-row[j], j))[:k] for row in full])
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi == lo:
            parts.append((np.empty((9, 0), np.float32), np.empty((9, 0), np.int64)))
            continue
        scores, indices = exact_search(q, d[lo:hi], k)
        parts.append((scores, np.where(indices >= 0, indices + lo, -1)))
    scores, indices = merge_top_k(parts, k)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, expected, axis=1))
    # Padding (-1, -inf) from an exclusion never outranks a document.
    padded = [(np.array([[5.0, -np.inf]], np.float32), np.array([[3, -1]])),
              (np.array([[-7.0]], np.float32), np.array([[9]]))]
    assert merge_top_k(padded, 3)[1].tolist() == [[3, 9, -1]]
