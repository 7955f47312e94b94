"""`leadkd encode|retrieve|mine` under torchrun: two gloo processes write what one process writes.

And the data each command reads: encoding needs no judgments (nor queries for passages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, make_tiny_beir, make_tiny_bert_folder, run_processes

WORLD = 2
DOCS, QUERIES = 37, 12  # 37 passages: shares of 18 and 19, so the split is uneven


def _worker(rank: int, commands: list[tuple[int, list[str]]], out_dir: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then each command through the CLI."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from leadkd.cli import main

    codes = []
    for port, argv in commands:
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per command: each one owns its group
        codes.append(main(argv))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(codes))


def _launch(commands: list[list[str]], out_dir: Path, timeout_s: float = 120.0) -> None:
    run_processes(_worker, ([(free_port(), argv) for argv in commands], str(out_dir)), WORLD, timeout_s)
    for rank in range(WORLD):
        assert json.loads((out_dir / f"rank{rank}.json").read_text()) == [0] * len(commands), f"rank {rank} failed"


@pytest.fixture(scope="module")
def spread_bert(tmp_path_factory) -> Path:
    """A tiny random BERT with wide initial weights: conftest's tiny_bert gives nearly equal vectors to every
    text (scores within 1e-6), so its rankings would be decided by rounding, not by the model."""
    return make_tiny_bert_folder(tmp_path_factory.mktemp("spread_bert"), init_range=0.5)


def _model_args(tiny_bert: Path, batch_size: int = 4) -> list[str]:
    return ["--model", str(tiny_bert), "--device", "cpu", "--batch-size", str(batch_size)]


def _commands(tiny_bert: Path, data: Path, out: Path) -> list[list[str]]:
    # One text per batch: a share's length-sorted batches differ from the whole corpus's, and with other
    # padding the same passage's vector moves by up to ~1.3e-6 here (float rounding, measured); alone in
    # its batch it is computed identically, so what is compared is the sharding, merging and writing.
    model = _model_args(tiny_bert, batch_size=1)
    return [
        ["encode", *model, "--data", str(data), "--output", str(out / "emb")],
        ["encode", *model, "--data", str(data), "--split", "train", "--queries", "--output", str(out / "qemb")],
        ["retrieve", *model, "--data", str(data), "--split", "dev", "--k", "7", "--save-embeddings",
         "--measures", "nDCG@10", "R@5", "--output", str(out / "retrieve")],
        ["mine", *model, "--data", str(data), "--split", "train", "--depth", "12", "--range", "2:10",
         "--negatives", "4", "--output", str(out / "groups.jsonl")],
        ["mine", *model, "--data", str(data), "--split", "train", "--depth", "12", "--range", "2:10",
         "--negatives", "4", "--corpus-embeddings", str(out / "emb"), "--output", str(out / "groups-reused.jsonl")],
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_beir(tmp_path_factory.mktemp("dist_data") / "beir", docs=DOCS, queries=QUERIES)


def test_two_processes_encode_the_corpus_like_one(tmp_path, spread_bert, data):
    """The fast case: `encode` alone, two gloo processes against one."""
    from leadkd.cli import main

    argv = _commands(spread_bert, data, tmp_path / "one")[0]
    assert main(argv) == 0
    _launch([_commands(spread_bert, data, tmp_path / "two")[0]], tmp_path)
    ids1, vec1, meta1 = _embeddings(tmp_path / "one" / "emb")
    ids2, vec2, meta2 = _embeddings(tmp_path / "two" / "emb")
    assert ids2 == ids1 == [f"d{i}" for i in range(DOCS)] and meta2 == meta1
    np.testing.assert_allclose(vec2, vec1, rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["emb"]  # the shards are gone


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, spread_bert, data) -> tuple[Path, Path]:
    """The same commands run by one process and by two gloo processes; their output folders."""
    from leadkd.cli import main

    root = tmp_path_factory.mktemp("dist_encode")
    one, two = root / "one", root / "two"
    for argv in _commands(spread_bert, data, one):
        assert main(argv) == 0, argv
    _launch(_commands(spread_bert, data, two), root)
    return one, two


def _embeddings(folder: Path) -> tuple[list[str], np.ndarray, dict]:
    ids = (folder / "ids.txt").read_text().splitlines()
    vectors = np.load(folder / "embeddings.npy", allow_pickle=False)
    return ids, vectors, json.loads((folder / "meta.json").read_text())


def _read_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    run: dict[str, list[tuple[str, float]]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, rank, score, _ = line.split()
        run.setdefault(qid, []).append((doc, float(score)))
        assert len(run[qid]) == int(rank)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["emb", "qemb", "retrieve/corpus_embeddings"])
def test_two_processes_write_the_embeddings_of_one(outputs, name):
    one, two = outputs
    ids1, vec1, meta1 = _embeddings(one / name)
    ids2, vec2, meta2 = _embeddings(two / name)
    assert ids2 == ids1 and vec2.dtype == vec1.dtype and vec2.shape == vec1.shape
    np.testing.assert_allclose(vec2, vec1, rtol=0, atol=1e-6)
    assert meta2 == meta1
    expected = DOCS if name != "qemb" else QUERIES  # every query is judged in train
    assert len(ids1) == expected and ids1[:2] == (["d0", "d1"] if name != "qemb" else ["q0", "q1"])


@pytest.mark.slow
def test_two_processes_write_the_run_and_metrics_of_one(outputs):
    one, two = outputs
    run1, run2 = _read_run(one / "retrieve" / "run.trec"), _read_run(two / "retrieve" / "run.trec")
    assert list(run2) == list(run1) and len(run1) == QUERIES // 2
    for qid in run1:
        assert [d for d, _ in run2[qid]] == [d for d, _ in run1[qid]] and len(run1[qid]) == 7
        np.testing.assert_allclose([s for _, s in run2[qid]], [s for _, s in run1[qid]], rtol=1e-6, atol=0)
    m1 = json.loads((one / "retrieve" / "metrics.json").read_text())
    m2 = json.loads((two / "retrieve" / "metrics.json").read_text())
    assert m2 == pytest.approx(m1, abs=1e-9)
    assert not list((two / "retrieve").glob(".*"))  # no shards or temporary files left behind


@pytest.mark.slow
def test_two_processes_mine_the_groups_of_one(outputs):
    one, two = outputs
    assert (two / "groups.jsonl").read_text() == (one / "groups.jsonl").read_text()
    groups = [json.loads(line) for line in (one / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == QUERIES and all(len(g["negatives"]) == 4 for g in groups)
    assert all(f"d{g['query_id'][1:]}" not in g["negatives"] for g in groups)  # the positive is never a negative
    for folder in (one, two):  # the corpus vectors of `encode`, reused, give the same groups
        assert (folder / "groups-reused.jsonl").read_text() == (one / "groups.jsonl").read_text()
    report1 = json.loads((one / "groups.jsonl.report.json").read_text())
    report2 = json.loads((two / "groups.jsonl.report.json").read_text())
    assert report2 == report1


@pytest.mark.slow
def test_run_is_the_top_k_of_the_saved_vectors(outputs, spread_bert, data):
    """The reference for the comparisons above, checked against a plain numpy ranking of the vectors."""
    from leadkd.models import DualEncoder

    one, _ = outputs
    ids, docs, _ = _embeddings(one / "retrieve" / "corpus_embeddings")
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines()]
    model = DualEncoder.from_pretrained(str(spread_bert))
    vectors = model.encode_queries([q["text"] for q in queries[:QUERIES // 2]])
    run = _read_run(one / "retrieve" / "run.trec")
    for query, vector in zip(queries, vectors, strict=False):  # vectors of the first half only
        scores = docs @ vector
        best = [ids[i] for i in np.argsort(-scores, kind="stable")[:7]]
        assert [d for d, _ in run[query["_id"]]] == best


# --------------------------------------------------------------------------- what each command reads

def _corpus_only(folder: Path, source: Path, layout: str = "beir") -> Path:
    folder.mkdir()
    if layout == "beir":
        (folder / "corpus.jsonl").write_text((source / "corpus.jsonl").read_text())
    else:
        lines = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
        (folder / "collection.tsv").write_text("".join(f"{d['_id']}\t{d['text']}\n" for d in lines))
    return folder


@pytest.mark.parametrize("layout", ["beir", "msmarco"])
def test_encode_a_corpus_without_queries_or_judgments(tmp_path, spread_bert, layout):
    from leadkd.cli import main
    from leadkd.models import DualEncoder

    source = make_tiny_beir(tmp_path / "full", docs=10, queries=4)
    folder = _corpus_only(tmp_path / "corpus_only", source, layout)
    assert main(["encode", *_model_args(spread_bert), "--data", str(folder), "--output", str(tmp_path / "emb")]) == 0
    ids, vectors, meta = _embeddings(tmp_path / "emb")
    docs = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    assert ids == [d["_id"] for d in docs] and meta["what"] == "passages"
    expected = DualEncoder.from_pretrained(str(spread_bert)).encode_passages([d["text"] for d in docs])
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)


def test_encode_queries_reads_judged_queries_or_all_without_qrels(tmp_path, tiny_bert, capsys):
    from leadkd.cli import main

    data = make_tiny_beir(tmp_path / "beir", docs=10, queries=6)
    model = _model_args(tiny_bert)
    assert main(["encode", *model, "--data", str(data), "--split", "dev", "--queries", "--output",
                 str(tmp_path / "dev")]) == 0
    assert _embeddings(tmp_path / "dev")[0] == ["q0", "q1", "q2"]  # the 3 judged in dev
    code = main(["mine", *model, "--data", str(data), "--corpus-embeddings", str(tmp_path / "dev"), "--output",
                 str(tmp_path / "g.jsonl")])
    assert code == 2 and "holds queries vectors, not passages" in capsys.readouterr().err
    for split in ("train", "dev"):
        (data / "qrels" / f"{split}.tsv").unlink()
    assert main(["encode", *model, "--data", str(data), "--queries", "--output", str(tmp_path / "all")]) == 0
    assert _embeddings(tmp_path / "all")[0] == [f"q{i}" for i in range(6)]


def test_what_evaluates_still_needs_judgments(tmp_path, tiny_bert, capsys):
    from leadkd.cli import main

    folder = _corpus_only(tmp_path / "corpus_only", make_tiny_beir(tmp_path / "full", docs=6, queries=2))
    code = main(["retrieve", *_model_args(tiny_bert), "--data", str(folder), "--output", str(tmp_path / "r")])
    assert code == 2 and "no qrels for split 'test'" in capsys.readouterr().err
    code = main(["encode", *_model_args(tiny_bert), "--data", str(folder), "--queries", "--output",
                 str(tmp_path / "q")])
    assert code == 2 and "no queries.jsonl" in capsys.readouterr().err
    assert main(["encode", *_model_args(tiny_bert), "--data", str(folder), "--output", str(tmp_path / "p")]) == 0
    code = main(["mine", *_model_args(tiny_bert), "--data", str(folder), "--output", str(tmp_path / "g.jsonl")])
    assert code == 2 and "no qrels for split 'train'" in capsys.readouterr().err


def test_cli_module_runs_as_a_torchrun_target():
    source = Path(__file__).resolve().parents[1] / "src" / "leadkd" / "cli" / "__main__.py"
    assert "from . import main\n\nsys.exit(main())" in source.read_text()
