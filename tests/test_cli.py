"""The `leadkd` command end to end on tiny models and data: what each subcommand writes, that the
step-by-step path (encode -> index -> search -> evaluate) gives the one-shot `retrieve` numbers, and that
every user error is one `leadkd: error:` line on stderr with exit status 2 (a traceback only with --debug).

The CLI is called in-process (``leadkd.cli.main``) for speed; one test runs the installed console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.cli import main
from leadkd.data.datasets import load_corpus, load_dataset
from leadkd.data.groups import read_training_groups
from leadkd.data.runs import ranked, read_run
from leadkd.retrieval.evaluate import DEFAULT_MEASURES, evaluate
from leadkd.retrieval.pipeline import Embeddings
from leadkd.runtime.errors import LeadkdError

NUM_DOCS, NUM_QUERIES = 24, 12


# ---------------------------------------------------------------------------------------------- helpers

def cli(*args: str | os.PathLike) -> tuple[int, str, str]:
    """Run ``leadkd ARGS`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def ok(*args: str | os.PathLike) -> tuple[str, str]:
    status, out, err = cli(*args)
    assert status == 0, f"leadkd {' '.join(map(str, args))} exited {status}:\n{err}"
    return out, err


def user_error(*args: str | os.PathLike) -> str:
    """Assert ``leadkd ARGS`` fails as a user error: status 2, nothing on stdout, ONE stderr line; return it."""
    status, out, err = cli(*args)
    assert status == 2, f"exit status {status}, stderr:\n{err}"
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("leadkd: error: "), lines[0]
    return lines[0]


def model_args(model: Path) -> list[str]:
    # The tiny BERT has 128 positions, fewer than the default passage length of 256.
    return ["--model", str(model), "--max-query-length", "16", "--max-passage-length", "32"]


def read_trec_lines(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text(encoding="utf-8").splitlines()]


def graded_qrels(data: Path) -> dict[str, dict[str, int]]:
    return {q: dict(d) for q, d in load_dataset(data, split="test").qrels.items()}



# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    # Wide initial weights and no dropout: well-separated scores, so no ranking hinges on float rounding
    # and the torch and faiss exact backends must agree exactly.
    model = make_tiny_bert_folder(root / "bert", dropout=0.0, init_range=0.3)
    data = make_tiny_beir(root / "tiny", docs=NUM_DOCS, queries=NUM_QUERIES)
    # A graded `test` split (the CLI's default): q_i -> d_i with relevance 2 for even i, 1 for odd i, and
    # q_i -> d_{i+12} with relevance 1, so binary measures at rel=2 differ from rel=1 and nDCG is graded.
    with open(data / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(NUM_QUERIES):
            f.write(f"q{i}\td{i}\t{2 if i % 2 == 0 else 1}\n")
            f.write(f"q{i}\td{i + NUM_QUERIES}\t1\n")
    teacher = make_tiny_bert_folder(root / "teacher", layers=4, seed=5)
    groups = make_tiny_groups(root / "groups.jsonl", queries=NUM_QUERIES, docs=NUM_DOCS)
    return {"root": root, "model": model, "data": data, "teacher": teacher, "groups": groups}


@pytest.fixture(scope="module")
def retrieved(env) -> dict:
    """One `leadkd retrieve` on the default (test) split, shared by the tests that compare against it."""
    output = env["root"] / "retrieve"
    out, err = ok("retrieve", *model_args(env["model"]), "--data", env["data"], "--device", "cpu", "--output", output)
    return {"output": output, "stdout": out, "stderr": err,
            "metrics": json.loads((output / "metrics.json").read_text())}


@pytest.fixture(scope="module")
def bad(env) -> dict[str, Path]:
    """Broken inputs for the user-error tests."""
    root = env["root"] / "bad"
    root.mkdir()
    (root / "empty_folder").mkdir()
    broken_json = shutil.copytree(env["data"], root / "broken_json")
    lines = (broken_json / "corpus.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"_id": "d2", "text": oops}\n'
    (broken_json / "corpus.jsonl").write_text("".join(lines))
    no_text = shutil.copytree(env["data"], root / "no_text")
    lines = (no_text / "corpus.jsonl").read_text().splitlines(keepends=True)
    lines[4] = '{"_id": "d4", "txt": "typo in the field name"}\n'
    (no_text / "corpus.jsonl").write_text("".join(lines))
    (root / "short.trec").write_text("q0 Q0 d0 1 2.5 t\nq0 Q0 d1 2\n")
    (root / "bad_score.trec").write_text("q0 Q0 d0 1 2.5 t\nq0 Q0 d1 2 2.5 t\nq0 Q0 d2 3 high t\n")
    (root / "good.trec").write_text("q0 Q0 d0 1 2.5 t\nq0 Q0 d12 2 1.5 t\nq1 Q0 d3 1 0.5 t\n")
    return {"root": root, "empty_folder": root / "empty_folder", "broken_json": broken_json, "no_text": no_text,
            "short_run": root / "short.trec", "bad_score_run": root / "bad_score.trec",
            "good_run": root / "good.trec"}


def distill_overrides(env, output: Path, **extra) -> list[str]:
    values = {
        "teacher.path": env["teacher"], "teacher.max_query_length": 16, "teacher.max_passage_length": 32,
        "student.init": "teacher_layers=[0,2]", "student.max_query_length": 16, "student.max_passage_length": 32,
        "data.corpus": env["data"], "data.train_groups": env["groups"], "data.num_negatives": 3,
        "optim.steps": 3, "optim.batch_size": 4, "optim.lr": 1e-3, "layers.k": 2, "eval.split": "dev",
        "log_every": 1, "output_dir": output,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def log_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: dict[str, torch.Tensor]) -> None:
    now = weights(a)
    assert now.keys() == b.keys()
    for key in b:
        assert torch.equal(now[key], b[key]), key


# ---------------------------------------------------------------------------------------------- retrieve

def test_retrieve_writes_a_valid_run(env, retrieved):
    rows = read_trec_lines(retrieved["output"] / "run.trec")
    assert all(len(row) == 6 and row[1] == "Q0" and row[5] == "leadkd" for row in rows)
    by_query: dict[str, list[list[str]]] = {}
    for row in rows:
        by_query.setdefault(row[0], []).append(row)
    assert list(by_query) == [f"q{i}" for i in range(NUM_QUERIES)]  # every test query, in order
    for _qid, hits in by_query.items():
        assert [int(h[3]) for h in hits] == list(range(1, NUM_DOCS + 1))  # k=1000 > corpus: all, ranks from 1
        assert {h[2] for h in hits} == {f"d{i}" for i in range(NUM_DOCS)}
        scores = [float(h[4]) for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_retrieve_metrics_are_ir_measures_numbers(env, retrieved):
    metrics = retrieved["metrics"]
    assert list(metrics) == ["nDCG@10", "RR@10", "R@100", "R@1000", "AP"] == list(DEFAULT_MEASURES)
    assert metrics["R@100"] == metrics["R@1000"] == 1.0  # the whole corpus is retrieved
    assert 0.0 < metrics["nDCG@10"] < 1.0
    # The same numbers straight from ir-measures on the written run (no ties here, so no tie convention matters).
    run = read_run(retrieved["output"] / "run.trec")
    assert all(len(set(docs.values())) == len(docs) for docs in run.values())
    qrels = graded_qrels(env["data"])
    direct = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in DEFAULT_MEASURES], qrels, run)
    for name, value in metrics.items():
        assert value == pytest.approx(direct[ir_measures.parse_measure(name)], abs=1e-9), name


def test_retrieve_per_query_rows_and_printed_table(env, retrieved):
    rows = [json.loads(line) for line in (retrieved["output"] / "per_query.jsonl").read_text().splitlines()]
    assert [row["query_id"] for row in rows] == [f"q{i}" for i in range(NUM_QUERIES)]
    for name, value in retrieved["metrics"].items():
        assert sum(row[name] for row in rows) / len(rows) == pytest.approx(value, abs=1e-12), name
    table = retrieved["stdout"].splitlines()
    assert table[0].split() == ["measure", "value"]
    assert {line.split()[0]: line.split()[1] for line in table[2:]} == {
        name: f"{value:.4f}" for name, value in retrieved["metrics"].items()}
    assert f"{NUM_DOCS} passages, {NUM_QUERIES} queries" in retrieved["stderr"]


def test_retrieve_rel_measures_and_k(env, retrieved, tmp_path):
    out, _ = ok("retrieve", *model_args(env["model"]), "--data", env["data"], "--output", tmp_path,
                "--rel", "2", "--measures", "AP", "nDCG@10", "RR@10", "P@5", "--k", "10", "--tag", "mine",
                "--save-embeddings")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["AP(rel=2)", "nDCG@10", "RR(rel=2)@10", "P(rel=2)@5"]
    assert "AP(rel=2)" in out and "RR(rel=2)@10" in out
    # nDCG stays graded: --rel and --k 10 do not change it.
    assert metrics["nDCG@10"] == retrieved["metrics"]["nDCG@10"]
    run = read_run(tmp_path / "run.trec")
    assert all(len(docs) == 10 for docs in run.values())
    assert {row[5] for row in read_trec_lines(tmp_path / "run.trec")} == {"mine"}
    saved = Embeddings.load(tmp_path / "corpus_embeddings")
    assert saved.ids == [f"d{i}" for i in range(NUM_DOCS)] and saved.vectors.shape == (NUM_DOCS, 32)
    expected, _ = evaluate(run, graded_qrels(env["data"]), measures=["AP(rel=2)", "RR(rel=2)@10", "P(rel=2)@5"])
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12)
    # Only half the queries have a rel-2 document: thresholded measures must differ from rel=1 ones.
    assert metrics["AP(rel=2)"] != pytest.approx(evaluate(run, graded_qrels(env["data"]), measures=["AP"])[0]["AP"])


# ---------------------------------------------------------------------------------------------- step by step

@pytest.mark.parametrize("kind, backend", [("flat", None), ("flat", "faiss"), ("hnsw", None)])
def test_encode_index_search_evaluate_give_the_retrieve_numbers(env, retrieved, tmp_path, kind, backend):
    embeddings = tmp_path / "emb"
    ok("encode", *model_args(env["model"]), "--data", env["data"], "--output", embeddings)
    assert (embeddings / "ids.txt").read_text().split() == [f"d{i}" for i in range(NUM_DOCS)]
    assert json.loads((embeddings / "meta.json").read_text())["model"] == str(env["model"])

    index = tmp_path / "index"
    ok("index", "--embeddings", embeddings, "--kind", kind, "--output", index,
       *(["--backend", backend] if backend else []))
    meta = json.loads((index / "meta.json").read_text())
    assert (meta["kind"], meta["backend"], meta["count"]) == (kind, backend or ("torch" if kind == "flat" else "faiss"),
                                                              NUM_DOCS)

    run_file = tmp_path / "run.trec"
    ok("search", *model_args(env["model"]), "--data", env["data"], "--index", index, "--output", run_file)
    reference = read_run(retrieved["output"] / "run.trec")
    run = read_run(run_file)
    assert list(run) == list(reference)
    if kind == "flat":  # exact search: the same ranking as retrieve (torch: the very same file)
        assert all([d for d, _ in ranked(run[q])] == [d for d, _ in ranked(reference[q])] for q in run)
        if backend is None:
            assert run_file.read_text() == (retrieved["output"] / "run.trec").read_text()

    metrics_file, per_query = tmp_path / "metrics.json", tmp_path / "per_query.jsonl"
    out_qrels, _ = ok("evaluate", "--run", run_file, "--qrels", env["data"] / "qrels" / "test.tsv",
                      "--output", metrics_file, "--per-query", per_query)
    out_data, _ = ok("evaluate", "--run", run_file, "--data", env["data"], "--split", "test")
    assert out_qrels == out_data
    metrics = json.loads(metrics_file.read_text())
    assert list(metrics) == list(retrieved["metrics"])
    if kind == "flat":
        assert metrics == retrieved["metrics"]
        assert out_qrels == retrieved["stdout"]
        assert per_query.read_text() == (retrieved["output"] / "per_query.jsonl").read_text()
    else:  # approximate, but on 24 vectors with the default beam it should be (nearly) exact
        for name, value in retrieved["metrics"].items():
            assert metrics[name] == pytest.approx(value, abs=0.05), name


def test_encode_queries(env, tmp_path):
    ok("--threads", "1", "encode", *model_args(env["model"]), "--data", env["data"], "--split", "dev", "--queries",
       "--output", tmp_path / "q")
    assert (tmp_path / "q" / "ids.txt").read_text().split() == [f"q{i}" for i in range(NUM_QUERIES // 2)]


def test_evaluate_finds_a_dataset_name_under_the_data_dir(env, bad, monkeypatch, tmp_path):
    monkeypatch.setenv("LEADKD_DATA_DIR", str(env["data"].parent))
    monkeypatch.chdir(tmp_path)
    out, _ = ok("evaluate", "--run", bad["good_run"], "--data", env["data"].name, "--measures", "RR@10")
    assert out.splitlines()[2].split()[0] == "RR@10"


# ---------------------------------------------------------------------------------------------- mine

def test_mine_writes_readable_groups_without_positives_among_negatives(env, tmp_path):
    groups_file = tmp_path / "groups.jsonl"
    _, err = ok("mine", *model_args(env["model"]), "--data", env["data"], "--depth", "20", "--range", "2:10",
                "--negatives", "4", "--output", groups_file)
    assert f"wrote {groups_file} ({NUM_QUERIES} groups)" in err
    corpus = load_corpus(env["data"])
    groups = read_training_groups(groups_file, corpus=corpus)
    train = load_dataset(env["data"], split="train").qrels
    assert len(groups) == NUM_QUERIES

    # Negatives are sampled from ranks 2..9 of an exact search with the positives removed, kept in rank order.
    ok("retrieve", *model_args(env["model"]), "--data", env["data"], "--split", "train", "--output", tmp_path / "r")
    run = read_run(tmp_path / "r" / "run.trec")
    for group in groups:
        positives = {d for d, r in train[group.query_id].items() if r >= 1}
        assert set(group.positive_ids) == positives
        assert not positives & set(group.negative_ids)
        assert len(group.negative_ids) == len(set(group.negative_ids)) == 4
        candidates = [d for d, _ in ranked(run[group.query_id]) if d not in positives][1:9]
        assert set(group.negative_ids) <= set(candidates)
        assert sorted(group.negative_ids, key=candidates.index) == group.negative_ids

    report = json.loads(Path(str(groups_file) + ".report.json").read_text())
    assert report["processed"] == report["queries_judged"] == NUM_QUERIES
    assert report["settings"]["rank_range"] == [2, 10] and report["settings"]["negatives"] == 4
    assert report["fewest_negatives"] == 4 and report["short_queries"] == 0


# ---------------------------------------------------------------------------------------------- train / distill

def test_distill_writes_final_and_log_and_resume_is_a_no_op(env, tmp_path):
    output = tmp_path / "run"
    _, err = ok("distill", *distill_overrides(env, output))
    for folder in ("final", "final-teacher", "best", "checkpoints"):
        assert (output / folder).is_dir(), folder
    assert (output / "config.yaml").is_file()
    rows = log_rows(output)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert [row["step"] for row in rows if "eval" in row] == [0, 3]
    assert "best dev nDCG@10 = " in err
    student, teacher = weights(output / "final"), weights(output / "final-teacher")

    _, err = ok("distill", "--resume", *distill_overrides(env, output))
    assert "resumed from" in err and "at step 3" in err
    assert_same_weights(output / "final", student)
    assert_same_weights(output / "final-teacher", teacher)
    assert [row["step"] for row in log_rows(output) if "loss" in row] == [1, 2, 3]

    # The distilled student is a model the retrieval commands load.
    ok("retrieve", "--model", output / "final", "--data", env["data"], "--output", tmp_path / "r")


def test_resume_after_a_finished_run_leaves_the_log_alone(env, tmp_path):
    output = tmp_path / "run"
    ok("distill", *distill_overrides(env, output, **{"optim.steps": 2}))
    before = (output / "metrics.jsonl").read_text()
    ok("distill", "--resume", *distill_overrides(env, output, **{"optim.steps": 2}))
    assert (output / "metrics.jsonl").read_text() == before


def test_train_from_a_config_file_with_overrides_on_top(env, tmp_path):
    output = tmp_path / "warmup"
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model:\n  path: {env['model']}\n  max_query_length: 16\n  max_passage_length: 32\n"
        f"data:\n  corpus: {env['data']}\n  train_groups: {env['groups']}\n  num_negatives: 3\n"
        f"optim:\n  steps: 50\n  batch_size: 4\n  lr: 1.0e-3\n"
        f"eval:\n  split: null\n"
        f"log_every: 1\noutput_dir: {tmp_path / 'ignored'}\n")
    ok("train", "--config", config, "optim.steps=2", f"output_dir={output}")
    assert not (tmp_path / "ignored").exists()
    assert [row["step"] for row in log_rows(output) if "loss" in row] == [1, 2]
    assert not any("eval" in row for row in log_rows(output))
    assert (output / "final" / "model.safetensors").is_file()
    assert "steps: 2" in (output / "config.yaml").read_text()
    final = weights(output / "final")
    ok("train", "--config", config, "optim.steps=2", f"output_dir={output}", "--resume")
    assert_same_weights(output / "final", final)


# ---------------------------------------------------------------------------------------------- user errors

def test_dataset_name_not_found_without_a_data_dir(env, monkeypatch, tmp_path):
    monkeypatch.delenv("LEADKD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    line = user_error("retrieve", *model_args(env["model"]), "--data", "no-such-dataset", "--output", "out")
    assert "dataset 'no-such-dataset' not found" in line and "$LEADKD_DATA_DIR is not set" in line
    assert not (tmp_path / "out").exists()


def test_dataset_name_not_found_under_the_data_dir(env, monkeypatch, tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / "datasets" / name).mkdir(parents=True)
    monkeypatch.setenv("LEADKD_DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    line = user_error("encode", *model_args(env["model"]), "--data", "no-such-dataset", "--output", "out")
    assert "dataset 'no-such-dataset' not found" in line and "alpha, beta" in line


def test_missing_split(env):
    line = user_error("retrieve", *model_args(env["model"]), "--data", env["data"], "--split", "validation",
                      "--output", env["root"] / "never")
    assert "no qrels for split 'validation'" in line and "available splits: dev, test, train" in line


@pytest.mark.parametrize("model, needle", [
    ("{root}/no/such/model", "{root}/no/such/model: model folder does not exist"),
    ("./no-such-model-folder", "./no-such-model-folder: model folder does not exist"),
    ("{empty}", "{empty}: not a model folder (no config.json)"),
    ("{data}/corpus.jsonl", "is a file, not a model folder"),
    ("no-such-model-xyz", "no-such-model-xyz: cannot load model"),  # a hub name: the hub is offline in tests
])
def test_model_that_cannot_be_loaded(env, bad, model, needle):
    fill = {"root": env["root"], "empty": bad["empty_folder"], "data": env["data"]}
    line = user_error("retrieve", "--model", model.format(**fill), "--data", env["data"],
                      "--output", env["root"] / "never")
    assert needle.format(**fill) in line


@pytest.mark.parametrize("folder, where, what", [
    ("broken_json", "corpus.jsonl:3: ", "invalid JSON"),
    ("no_text", "corpus.jsonl:5: ", "field 'text': missing"),
])
def test_malformed_corpus_line_names_file_and_line(env, bad, folder, where, what):
    line = user_error("retrieve", *model_args(env["model"]), "--data", bad[folder], "--output", env["root"] / "never")
    assert f"{bad[folder]}/{where}" in line and what in line


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1e-3", ["override 'optim.lrr=1e-3'", "optim.lrr: unknown option in section optim",
                        "(did you mean 'optim.lr'?)"]),
    ("outptu_dir=x", ["outptu_dir: unknown option at the top level", "(did you mean 'output_dir'?)"]),
    ("optim.lr=abc", ["override 'optim.lr=abc'", "optim.lr: expected a number, got 'abc'"]),
    ("optim.steps=1.5", ["optim.steps: expected an integer, got 1.5"]),
    ("loss.response=kll", ["loss.response", "(did you mean 'kl'?)"]),
    ("optim.lr", ["override 'optim.lr': expected key=value"]),
])
def test_bad_config_override(env, tmp_path, override, needles):
    line = user_error("distill", *distill_overrides(env, tmp_path / "never"), override)
    for needle in needles:
        assert needle in line
    assert not (tmp_path / "never").exists()  # refused before anything was built


def test_unknown_key_in_a_config_file(env, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("optim:\n  batch_sise: 4\n")
    line = user_error("train", "--config", config)
    assert f"{config}: optim.batch_sise: unknown option" in line and "(did you mean 'optim.batch_size'?)" in line
    line = user_error("train", "--config", tmp_path / "missing.yaml")
    assert "missing.yaml: config file does not exist" in line


@pytest.mark.parametrize("option", ["--max-passage-length", "--max-query-length", "--batch-size"])
def test_non_positive_lengths(env, option):
    line = user_error("retrieve", "--model", env["model"], "--data", env["data"], option, "0",
                      "--output", env["root"] / "never")
    assert f"{option} must be > 0, got 0" in line


@pytest.mark.parametrize("device, message", [
    ("gpu0", "device 'gpu0' is not a device name (auto, cpu, cuda, cuda:N)"),
    pytest.param("cuda", "device 'cuda' was asked for but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_device_is_one_line(env, device, message):
    line = user_error("encode", "--model", env["model"], "--data", env["data"], "--device", device,
                      "--output", env["root"] / "never")
    assert message in line


def test_unknown_measure(env, bad):
    line = user_error("evaluate", "--run", bad["good_run"], "--qrels", env["data"] / "qrels" / "test.tsv",
                      "--measures", "ndcg@10")
    assert "unknown measure 'ndcg@10'" in line and "(did you mean 'nDCG@10'?)" in line
    line = user_error("evaluate", "--run", bad["good_run"], "--qrels", env["data"] / "qrels" / "test.tsv",
                      "--measures", "nDCG@10", "Bogus@3")
    assert "unknown measure 'Bogus@3'" in line


def test_retrieve_checks_measures_before_any_work(env, tmp_path):
    line = user_error("retrieve", *model_args(env["model"]), "--data", env["data"], "--output", tmp_path / "out",
                      "--measures", "ndcg@10")
    assert "unknown measure 'ndcg@10'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sources", [[], ["--qrels", "{qrels}", "--data", "{data}"]])
def test_evaluate_needs_exactly_one_of_qrels_and_data(env, bad, sources):
    fill = {"qrels": env["data"] / "qrels" / "test.tsv", "data": env["data"]}
    line = user_error("evaluate", "--run", bad["good_run"], *[s.format(**fill) for s in sources])
    assert "pass either --qrels FILE or --data D --split S" in line


@pytest.mark.parametrize("run, where, what", [
    ("short_run", ":2: ", "expected 6 columns"),
    ("bad_score_run", ":3: ", "field 'score': score 'high' is not a number"),
])
def test_run_file_with_a_bad_line(env, bad, run, where, what):
    line = user_error("evaluate", "--run", bad[run], "--qrels", env["data"] / "qrels" / "test.tsv")
    assert f"{bad[run]}{where}" in line and what in line


def test_other_missing_inputs(env, tmp_path):
    line = user_error("evaluate", "--run", tmp_path / "none.trec", "--qrels", env["data"] / "qrels" / "test.tsv")
    assert "none.trec: run file not found" in line
    line = user_error("index", "--embeddings", tmp_path / "none", "--output", tmp_path / "index")
    assert "not an embeddings folder" in line
    line = user_error("search", *model_args(env["model"]), "--data", env["data"], "--index", tmp_path / "none",
                      "--output", tmp_path / "run.trec")
    assert "no index folder there" in line
    line = user_error("mine", *model_args(env["model"]), "--data", env["data"], "--range", "5-10",
                      "--output", tmp_path / "g.jsonl")
    assert "--range must look like 10:100, got '5-10'" in line


def test_unwritable_output_is_a_user_error(env, bad, tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    line = user_error("evaluate", "--run", bad["good_run"], "--qrels", env["data"] / "qrels" / "test.tsv",
                      "--output", tmp_path / "a_file" / "metrics.json")
    assert "a_file" in line


def test_encode_never_deletes_an_unrelated_folder(env, tmp_path):
    victim = tmp_path / "my_notes"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious\n")
    status, _, err = cli("encode", *model_args(env["model"]), "--data", env["data"], "--output", victim)
    assert (victim / "notes.txt").read_text() == "precious\n"
    if status != 0:  # refusing is the expected outcome; then as a one-line user error
        assert status == 2 and err.splitlines()[-1].startswith("leadkd: error: ")


def test_argparse_errors_exit_2(env):
    # argparse's own checks (types, required options) exit 2 too, with its usage text.
    status, _, err = cli("retrieve", "--model", env["model"], "--data", env["data"], "--output", "x", "--k", "0")
    assert status == 2 and "--k must be > 0, got 0" in err and "Traceback" not in err
    status, _, err = cli("retrieve", "--data", env["data"])
    assert status == 2 and "--output" in err
    status, _, err = cli("--threads", "0", "evaluate", "--run", "x", "--qrels", "y")
    assert status == 2 and "--threads must be > 0, got 0" in err
    status, out, _ = cli("--version")
    assert status == 0 and out.startswith("leadkd ")


def test_debug_raises_instead(env, bad):
    with pytest.raises(LeadkdError, match=r"short\.trec:2: expected 6 columns"):
        main(["--debug", "evaluate", "--run", str(bad["short_run"]),
              "--qrels", str(env["data"] / "qrels" / "test.tsv")])
    with pytest.raises(LeadkdError, match=r"optim\.lrr: unknown option"):
        main(["--debug", "distill", "optim.lrr=1"])


def test_console_script_user_error_is_one_line(tmp_path):
    script = shutil.which("leadkd", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    assert script is not None, "the `leadkd` console script is not installed (pip install -e .)"
    env = {key: value for key, value in os.environ.items() if key != "LEADKD_DATA_DIR"}
    result = subprocess.run([script, "retrieve", "--data", "no-such-dataset", "--output", "out"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("leadkd: error: dataset 'no-such-dataset' not found"), \
        result.stderr
