"""DenseIndex: backends agree with exact search, HNSW is close, folders round-trip, damage gives one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leadkd.retrieval.index import DenseIndex
from leadkd.retrieval.search import exact_search
from leadkd.runtime.errors import ConfigError, InputError, LeadkdError


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((300, 16), dtype=np.float32)
    return docs, [f"d{i}" for i in range(300)], rng.standard_normal((12, 16), dtype=np.float32)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_flat_backends_are_exact(corpus, backend):
    docs, ids, queries = corpus
    index = DenseIndex.build(docs, ids, backend=backend)
    assert (index.count, index.dim, index.backend) == (300, 16, backend)
    scores, indices = index.search(queries, 10)
    ref_scores, ref_indices = exact_search(queries, docs, 10)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_default_backend_is_torch_and_hnsw_needs_faiss(corpus):
    docs, ids, _ = corpus
    assert DenseIndex.build(docs, ids).backend == "torch"
    assert DenseIndex.build(docs, ids, kind="hnsw").backend == "faiss"
    with pytest.raises(ConfigError, match="HNSW"):
        DenseIndex.build(docs, ids, kind="hnsw", backend="torch")
    with pytest.raises(ConfigError, match="kind"):
        DenseIndex.build(docs, ids, kind="ivf")


def test_hnsw_recall(corpus):
    docs, ids, queries = corpus
    index = DenseIndex.build(docs, ids, kind="hnsw", m=16, ef_construction=64, ef_search=64)
    _, indices = index.search(queries, 10)
    _, ref = exact_search(queries, docs, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices.tolist(), ref.tolist(), strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclusion_and_search_run(corpus, backend):
    docs, ids, queries = corpus
    index = DenseIndex.build(docs, ids, backend=backend)
    _, top = exact_search(queries, docs, 3)
    run = index.search_run([f"q{i}" for i in range(12)], queries, 5,
                           exclude_ids=[[ids[top[i, 0]], "not-indexed"] for i in range(12)])
    assert list(run) == [f"q{i}" for i in range(12)]
    for i in range(12):
        ranked = list(run[f"q{i}"])
        assert len(ranked) == 5 and ids[top[i, 0]] not in ranked and ranked[:2] == [ids[j] for j in top[i, 1:3]]


@pytest.mark.parametrize("kind,backend", [("flat", "torch"), ("flat", "faiss"), ("hnsw", "faiss")])
def test_save_load_roundtrip(tmp_path, corpus, kind, backend):
    docs, ids, queries = corpus
    index = DenseIndex.build(docs, ids, kind=kind, backend=backend, m=8, ef_construction=32, ef_search=40)
    before = index.search(queries, 7)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert {k: meta[k] for k in ("kind", "backend", "dim", "count", "metric")} == {
        "kind": kind, "backend": backend, "dim": 16, "count": 300, "metric": "inner_product"}
    loaded = DenseIndex.load(tmp_path / "idx")
    assert loaded.doc_ids == ids and loaded.kind == kind and loaded.backend == backend
    after = loaded.search(queries, 7)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    if kind == "hnsw":
        assert loaded.hnsw == {"m": 8, "ef_construction": 32, "ef_search": 40}
    assert not [p for p in tmp_path.iterdir() if p.name != "idx"]  # no temporary leftovers


@pytest.mark.parametrize("saved,wanted", [("torch", "faiss"), ("faiss", "torch")])
def test_flat_switches_backend_at_load(tmp_path, corpus, saved, wanted):
    docs, ids, queries = corpus
    DenseIndex.build(docs, ids, backend=saved).save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx", backend=wanted)
    assert loaded.backend == wanted
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], exact_search(queries, docs, 5)[1])


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_load_errors(tmp_path, corpus):
    docs, ids, _ = corpus
    with pytest.raises(LeadkdError, match="no index folder") as exc:
        DenseIndex.load(tmp_path / "nothing")
    one_line(exc)

    DenseIndex.build(docs, ids).save(tmp_path / "a")
    (tmp_path / "a" / "ids.txt").write_text("\n".join(ids[:-1]) + "\n")
    with pytest.raises(InputError, match="299 ids but meta.json says the index has 300") as exc:
        DenseIndex.load(tmp_path / "a")
    one_line(exc)

    DenseIndex.build(docs, ids, backend="faiss").save(tmp_path / "b")
    (tmp_path / "b" / "index.faiss").unlink()
    with pytest.raises(InputError, match=r"index\.faiss: missing"):
        DenseIndex.load(tmp_path / "b")

    DenseIndex.build(docs, ids).save(tmp_path / "c")
    np.save(tmp_path / "c" / "embeddings.npy", docs[:, :8].copy())
    with pytest.raises(InputError, match="8-dimensional vectors but meta.json says 16"):
        DenseIndex.load(tmp_path / "c")
    np.save(tmp_path / "c" / "embeddings.npy", docs[:10])
    with pytest.raises(InputError, match="holds 10 vectors"):
        DenseIndex.load(tmp_path / "c")

    DenseIndex.build(docs, ids).save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "metric": "l2"}))
    with pytest.raises(InputError, match="field 'metric'"):
        DenseIndex.load(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON") as exc:
        DenseIndex.load(tmp_path / "d")
    one_line(exc)


def test_build_and_search_errors(corpus):
    docs, ids, queries = corpus
    with pytest.raises(LeadkdError, match="299 document ids for 300"):
        DenseIndex.build(docs, ids[:-1])
    with pytest.raises(LeadkdError, match="appears twice"):
        DenseIndex.build(docs[:3], ["a", "b", "a"])
    bad = docs[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(LeadkdError, match="row 1 is not finite"):
        DenseIndex.build(bad, ["a", "b", "c"])
    for backend in ("torch", "faiss"):
        index = DenseIndex.build(docs, ids, backend=backend)
        expected = r"queries have shape \(12, 8\) but the index holds 16-dimensional"
        with pytest.raises(LeadkdError, match=expected) as exc:
            index.search(queries[:, :8], 3)
        one_line(exc)
