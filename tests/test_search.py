"""Exact search: agrees with a brute-force sort, is blocking-invariant, breaks ties by index, honours exclusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leadkd.retrieval.search import exact_search, to_run
from leadkd.runtime.errors import ConfigError, LeadkdError


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full score matrix, excluded documents at -inf, stable sort (lower index first among ties),
    -inf entries reported as index -1."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(docs).T
    for row, banned in enumerate(exclude or ()):
        scores[row, sorted(banned or ())] = float("-inf")
    values, index = torch.sort(scores, dim=1, descending=True, stable=True)
    values, index = values[:, :k], index[:, :k]
    index[torch.isneginf(values)] = -1
    return values.numpy(), index.numpy()


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


# ------------------------------------------------------------------------ devices, byte budgets, precision

def random_exclusions(num_queries: int, num_docs: int, seed: int = 2) -> list[set[int] | None]:
    rng = np.random.default_rng(seed)
    exclude: list[set[int] | None] = [set(rng.choice(num_docs, size=int(rng.integers(0, 6)), replace=False).tolist())
                                      for _ in range(num_queries)]
    exclude[1] = None
    return exclude


@pytest.mark.parametrize("max_bytes", [None, 4 * (37 + 16) * 1, 4 * (37 + 16) * 7, 4 * (5 + 16) * 40, 1 << 20])
def test_torch_cpu_tensors_equal_numpy_inputs_for_any_byte_budget(data, max_bytes):
    queries, docs = data
    exclude = random_exclusions(len(queries), len(docs))
    expected = brute_force(queries, docs, 10, exclude)
    query_batch = 5 if max_bytes == 4 * (5 + 16) * 40 else None
    for q, d in ((queries, docs), (torch.from_numpy(queries), torch.from_numpy(docs))):
        scores, indices = exact_search(q, d, 10, query_batch_size=query_batch, exclude=exclude, device="cpu",
                                       max_bytes=max_bytes)
        assert scores.dtype == np.float32 and indices.dtype == np.int64
        np.testing.assert_array_equal(indices, expected[1])
        np.testing.assert_allclose(scores, expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_bytes", [4 * (6 + 4) * 3, 4 * (6 + 4) * 50, 1 << 16])
def test_ties_and_exclusions_under_a_byte_budget_match_a_stable_sort(max_bytes):
    rng = np.random.default_rng(3)
    docs = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)  # small integers: lots of exact ties
    queries = rng.integers(-2, 3, size=(20, 4)).astype(np.float32)
    exclude = random_exclusions(20, 300)
    expected = brute_force(queries, docs, 25, exclude)
    scores, indices = exact_search(torch.from_numpy(queries), torch.from_numpy(docs), 25, query_batch_size=6,
                                   exclude=exclude, device=torch.device("cpu"), max_bytes=max_bytes)
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_array_equal(scores, expected[0])


def test_block_shape_follows_the_cpu_defaults_or_the_byte_budget():
    from leadkd.retrieval.search import DEVICE_MAX_BYTES, block_shape

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert block_shape(5000, 10**6, 768, cpu) == (1024, 32768)  # the measured CPU default
    assert block_shape(10, 100, 768, cpu) == (10, 100)  # never more than there is
    query_batch, doc_block = block_shape(10**5, 10**7, 768, cuda)
    assert query_batch == 4096 and doc_block == DEVICE_MAX_BYTES // (4 * (4096 + 768))
    assert 4 * doc_block * (query_batch + 768) <= DEVICE_MAX_BYTES < 4 * (doc_block + 1) * (query_batch + 768)
    assert block_shape(10**5, 10**7, 768, cpu, max_bytes=1 << 20) == (4096, (1 << 20) // (4 * (4096 + 768)))
    assert block_shape(100, 10**7, 768, cuda, max_bytes=1 << 20) == (100, (1 << 20) // (4 * (100 + 768)))
    assert block_shape(100, 10**7, 768, cuda, query_batch_size=7, doc_block_size=9) == (7, 9)  # given: used
    with pytest.raises(ConfigError, match="max_bytes"):
        block_shape(100, 10**7, 768, cuda, max_bytes=1000)


def test_where_to_search_and_the_dtype_option(data):
    from leadkd.retrieval.search import compute_dtype, where_to_search

    queries, docs = data
    assert where_to_search(queries, docs) == torch.device("cpu")
    assert where_to_search(torch.from_numpy(queries), docs) == torch.device("cpu")
    assert where_to_search(queries, docs, "cuda:1") == torch.device("cuda", 1)
    assert compute_dtype("bfloat16") is torch.bfloat16 and compute_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="float64"):
        compute_dtype("float64")
    with pytest.raises(ConfigError):
        exact_search(queries, docs, 3, max_bytes=0)


@pytest.mark.parametrize("dtype,tolerance", [("float16", 1e-2), ("bfloat16", 6e-2)])
def test_half_precision_rounds_the_inputs_and_accumulates_in_float32(data, dtype, tolerance):
    queries, docs = data
    low = getattr(torch, dtype)
    exclude = random_exclusions(len(queries), len(docs))
    scores, indices = exact_search(queries, docs, 10, exclude=exclude, dtype=dtype, max_bytes=4 * (37 + 16) * 50)
    # Exactly "round to half, multiply in float32": the same as a float32 search of the rounded vectors.
    rounded = [torch.from_numpy(x).to(low).float().numpy() for x in (queries, docs)]
    expected = brute_force(*rounded, 10, exclude)
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_allclose(scores, expected[0], rtol=1e-5, atol=1e-5)
    # Against float32: close scores, and the same documents wherever float32's scores are well apart.
    ref_scores, ref_indices = brute_force(queries, docs, 11, exclude)
    assert 0 < np.abs(scores - ref_scores[:, :10]).max() < tolerance  # not zero: the rounding did happen
    gaps = -np.diff(ref_scores, axis=1)  # gap after each rank, the last one to rank 11
    before = np.concatenate([np.full((len(gaps), 1), np.inf), gaps[:, :-1]], axis=1)
    separated = np.minimum(before, gaps) > 2 * tolerance
    assert separated.mean() > 0.3  # the check below is not vacuous
    np.testing.assert_array_equal(indices[separated], ref_indices[:, :10][separated])


def test_half_products_without_an_out_dtype_kernel_are_float32_products_of_the_rounded_values():
    from leadkd.retrieval.search import _scores

    rng = np.random.default_rng(4)
    q, d = (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).half() for shape in ((6, 8), (9, 8)))
    scores = _scores(q, d, None)  # the CPU has no half GEMM into float32: the fallback runs
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, q.float() @ d.float().T)


@pytest.mark.parametrize("bounds", [[(0, 40), (40, 80), (80, 120), (120, 160), (160, 200), (200, 203)],
                                    [(0, 203)], [(0, 1), (1, 2), (2, 100), (100, 203)]])
def test_staged_blocks_are_the_documents_block_by_block(tmp_path, data, bounds):
    """The host-to-device staging (two buffers, a filling thread): run here on the CPU, where the staging
    buffer itself is the block, so every block must be read before the next is asked for."""
    from leadkd.retrieval.search import _staged_blocks

    _, docs = data
    np.save(tmp_path / "docs.npy", docs)
    mapped = np.load(tmp_path / "docs.npy", mmap_mode="r")
    for source in (mapped, torch.from_numpy(docs)):
        seen = [block.clone() for block in _staged_blocks(source, bounds, torch.device("cpu"))]
        assert [len(block) for block in seen] == [stop - start for start, stop in bounds]
        for block, (start, stop) in zip(seen, bounds, strict=True):
            np.testing.assert_array_equal(block.numpy(), docs[start:stop])


def test_documents_stay_where_they_are_off_cuda(data):
    from leadkd.retrieval.search import documents_on

    _, docs = data
    assert documents_on(docs, "cpu") is docs
    tensor = torch.from_numpy(docs)
    assert documents_on(tensor, torch.device("cpu"), "float16") is tensor


def test_search_shards_in_one_process_is_the_search_on_the_given_device(data):
    from leadkd.retrieval.pipeline import search_device, search_shards

    queries, docs = data
    exclude = [set(e or ()) for e in random_exclusions(len(queries), len(docs))]
    merged = search_shards(queries, docs, range(len(docs)), 10, exclude=exclude, device="cpu")
    assert merged is not None
    expected = brute_force(queries, docs, 10, exclude)
    np.testing.assert_array_equal(merged[1], expected[1])
    np.testing.assert_allclose(merged[0], expected[0], rtol=1e-4, atol=1e-4)

    class OnAGpu:
        device = torch.device("cuda", 1)

    assert search_device(OnAGpu()) == torch.device("cuda", 1)
    assert search_device(object()) == torch.device("cpu")  # no device (a fake encoder): the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_search_equals_cpu_search(dtype):
    """On a GPU: resident tensors, numpy streamed through pinned buffers, a small byte budget (many steps),
    exclusions and exact ties all give the CPU's results (half precision: the CPU's rounded-input search)."""
    from leadkd.retrieval.search import documents_on

    rng = np.random.default_rng(5)
    # Few queries and k = 30: a float32 summation-order difference (~1e-6) swaps two documents only where their
    # scores are that close, which these sizes make unlikely; the small-integer vectors tie exactly instead.
    normal = rng.standard_normal((100, 32), dtype=np.float32), rng.standard_normal((5000, 32), dtype=np.float32)
    ties = (rng.integers(-2, 3, (300, 8)).astype(np.float32), rng.integers(-2, 3, (5000, 8)).astype(np.float32))
    cuda = torch.device("cuda", torch.cuda.current_device())
    for queries, docs in (normal, ties):
        exclude = random_exclusions(len(queries), len(docs))
        expected = exact_search(queries, docs, 30, exclude=exclude, dtype=dtype, device="cpu")
        resident = documents_on(docs, cuda, dtype)
        assert isinstance(resident, torch.Tensor) and resident.device == cuda
        for q, d, budget in ((torch.from_numpy(queries).to(cuda), resident, None),
                             (queries, docs, 1 << 20),  # streamed from the host in several blocks
                             (torch.from_numpy(queries).to(cuda), torch.from_numpy(docs), 1 << 18)):
            scores, indices = exact_search(q, d, 30, exclude=exclude, dtype=dtype, device=cuda, max_bytes=budget)
            np.testing.assert_array_equal(indices, expected[1])
            np.testing.assert_allclose(scores, expected[0], rtol=1e-4, atol=1e-4)
