"""`leadkd retrieve` with its default model (all-MiniLM-L6-v2, served offline from its package) on a
300-passage slice of the real SciFact test set: the whole user path, checked against a known quality level.

The slice holds every passage judged for the first QUERIES test queries plus unjudged SciFact passages
(in corpus order) as distractors, written as a BEIR folder. Measured here: nDCG@10 = 0.883,
R@100 = 0.990 (on the full 5,183-passage corpus the model scores ~0.645 nDCG@10); the bounds leave
margin for float and library-version noise while catching a wrong pooling, normalisation, title
handling or truncation, each of which costs far more.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from leadkd.cli import main
from leadkd.data.runs import read_run

QUERIES = 100
PASSAGES = 300


def build_slice(source: Path, target: Path, queries: int = QUERIES, passages: int = PASSAGES) -> dict:
    """Write the slice as a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv); return its qrels."""
    qrels: dict[str, dict[str, int]] = {}
    for line in (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, doc_id, relevance = line.split("\t")
        qrels.setdefault(qid, {})[doc_id] = int(relevance)
    chosen = {qid: qrels[qid] for qid in list(qrels)[:queries]}
    judged = {doc_id for docs in chosen.values() for doc_id in docs}

    kept, fillers = [], []
    with open(source / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc_id = json.loads(line)["_id"]
            if doc_id in judged:
                kept.append(line)
            elif len(fillers) < passages:
                fillers.append(line)
    assert len(kept) == len(judged) < passages
    target.mkdir(parents=True)
    (target / "corpus.jsonl").write_text("".join(kept + fillers[:passages - len(kept)]), encoding="utf-8")

    texts = {}
    with open(source / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            texts[json.loads(line)["_id"]] = line
    (target / "queries.jsonl").write_text("".join(texts[qid] for qid in chosen), encoding="utf-8")
    (target / "qrels").mkdir()
    rows = [f"{qid}\t{doc_id}\t{rel}\n" for qid, docs in chosen.items() for doc_id, rel in docs.items()]
    (target / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows), encoding="utf-8")
    return chosen


@pytest.mark.slow
def test_default_model_retrieves_well_on_a_scifact_slice(data_dir, tmp_path):
    qrels = build_slice(data_dir / "scifact", tmp_path / "scifact-slice")
    output = tmp_path / "out"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["retrieve", "--data", str(tmp_path / "scifact-slice"), "--max-passage-length", "128",
                       "--output", str(output)])
    assert status == 0, err.getvalue()
    assert f"{PASSAGES} passages, {QUERIES} queries" in err.getvalue()

    run = read_run(output / "run.trec")
    assert list(run) == list(qrels)  # every query, in order
    assert all(len(docs) == PASSAGES for docs in run.values())  # --k 1000 > corpus: the whole slice
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["nDCG@10"] > 0.80, metrics
    assert metrics["R@100"] > 0.95, metrics
    assert metrics["R@1000"] == 1.0
    assert "nDCG@10" in out.getvalue()
