"""Score once, distill many: `leadkd score-teacher` folders and `teacher.scores` runs.

The reference everywhere is the frozen online teacher restricted to each query's own group
(``loss.teacher_candidates: own_group``): a run from the score file must equal it, in losses and gradients,
for a dual-encoder, a ColBERT and a cross-encoder teacher.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, make_tiny_beir, make_tiny_bert_folder, make_tiny_groups, run_processes
from leadkd.cli import main
from leadkd.config import load_config, teacher_config
from leadkd.data.datasets import load_corpus, load_queries
from leadkd.data.groups import read_training_groups
from leadkd.distill.score_teacher import score_teacher
from leadkd.distill.teacher_scores import open_teacher_scores
from leadkd.distill.trainer import Trainer, run_job
from leadkd.runtime.errors import ConfigError, InputError, LeadkdError

KINDS = ("dual_encoder", "colbert", "cross_encoder")
LENGTHS = {"max_query_length": 16, "max_passage_length": 32}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from leadkd.models import ColBERT, CrossEncoder

    root = tmp_path_factory.mktemp("scores")
    dense = make_tiny_bert_folder(root / "dense", layers=3, seed=7, dropout=0.0, init_range=0.3)
    # The other kinds add weights of their own (a projection, a head): saved once, so every load is the same teacher.
    ColBERT.from_pretrained(dense, dim=16, **LENGTHS).save_pretrained(root / "colbert")
    CrossEncoder.from_pretrained(dense, max_length=48).save_pretrained(root / "cross_encoder")
    return {"dual_encoder": dense, "colbert": root / "colbert", "cross_encoder": root / "cross_encoder",
            "student": make_tiny_bert_folder(root / "student", layers=2, seed=3, dropout=0.0, init_range=0.3),
            "data": make_tiny_beir(root / "data"), "groups": make_tiny_groups(root / "groups.jsonl"),
            "root": root}


def teacher_options(kind: str) -> list[str]:
    return [f"kind={kind}"] + [f"{key}={value}" for key, value in LENGTHS.items()]


def score(setup, kind: str, output: Path, **options) -> Path:
    teacher = teacher_config(str(setup[kind]), teacher_options(kind))
    settings = {"dtype": "float32", "log": lambda message: None, "show_progress": False, **options}
    return score_teacher(teacher, str(setup["data"]), str(setup["groups"]), output, **settings)


def distill_config(setup, output: Path, **overrides):
    values = {"student.path": str(setup["student"]), "student.max_query_length": 16,
              "student.max_passage_length": 32, "teacher.train": False, "data.corpus": str(setup["data"]),
              "data.train_groups": str(setup["groups"]), "data.num_negatives": 3, "optim.steps": 4,
              "optim.batch_size": 4, "optim.lr": 1e-3, "optim.max_grad_norm": None, "layers.k": 2,
              "layers.resample_every": 1, "checkpoint.every": 2, "eval.split": None, "log_every": 1,
              "output_dir": str(output)}
    values.update(overrides)
    return load_config(None, [f"{key}={json.dumps(value) if value is None else value}"
                              for key, value in values.items()], kind="distill")


def online(setup, kind: str, output: Path, **overrides):
    """The reference: the frozen online teacher, restricted to each query's own group."""
    teacher = {f"teacher.{key}": value for key, value in LENGTHS.items()}
    return distill_config(setup, output, **{"teacher.path": str(setup[kind]), "teacher.kind": kind, **teacher,
                                            "loss.teacher_candidates": "own_group", **overrides})


def from_file(setup, scores: Path, output: Path, **overrides):
    return distill_config(setup, output, **{"teacher.scores": str(scores), **overrides})


def first_step(config) -> dict:
    """Terms and raw gradients of the first optimizer step."""
    trainer = Trainer(config, log=lambda m: None, show_progress=False)
    grads: dict[str, torch.Tensor] = {}
    student = trainer.models["student"]

    def record(optimizer, args, kwargs):
        grads.update({k: p.grad.detach().clone() for k, p in student.model.named_parameters() if p.grad is not None})

    student.optimizer.register_step_pre_hook(record)
    trainer._iterator = trainer._batches()
    result = trainer.train_step()
    trainer.close()
    return {"terms": result.terms, "pairs": result.pairs, "grads": grads}


def losses(output: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


# --------------------------------------------------------------------------- the file

def test_the_file_holds_each_groups_own_scores_at_every_layer_then_the_final_score(setup, tmp_path):
    from leadkd.models import load_model

    folder = score(setup, "dual_encoder", tmp_path / "s")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["layers"] == [0, 1, 2] and meta["teacher"]["num_layers"] == 3 and meta["dtype"] == "float32"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "rows.npy", "scores.npy"]
    scores, rows = np.load(folder / "scores.npy"), np.load(folder / "rows.npy")
    corpus, queries = load_corpus(str(setup["data"])), load_queries(str(setup["data"]))
    groups = read_training_groups(setup["groups"], corpus=corpus, queries=queries)
    assert scores.shape == (len(groups), 5, 4) and rows.shape == (len(groups), 4)
    teacher = load_model(setup["dual_encoder"], **LENGTHS)
    for g in range(len(groups)):  # an independent reference: one query against its own candidates, alone
        keys = [*groups.positive_keys(g), *groups.negative_keys(g)]
        with torch.no_grad():
            expected = teacher.encode_batch([groups.query_text(g)], [groups.passage(k) for k in keys], [0, 1, 2],
                                            final=True).scores()[:, 0]             # [4, 5]
        np.testing.assert_allclose(scores[g], expected.numpy().T, atol=1e-5)
        assert rows[g, 0] == 1 and rows[g, 1] == len(keys)


def test_candidates_and_layers_and_float16(setup, tmp_path):
    full = np.load(score(setup, "dual_encoder", tmp_path / "full") / "scores.npy")
    folder = score(setup, "dual_encoder", tmp_path / "cut", layers="0,2", negatives=2, dtype="float16")
    cut = np.load(folder / "scores.npy")
    assert cut.dtype == np.float16 and cut.shape == (12, 3, 3)                # 1 positive + 2 negatives; 0, 2, final
    np.testing.assert_allclose(cut.astype(np.float32), full[:, :3][:, :, [0, 2, 3]], rtol=2e-3, atol=2e-3)
    assert json.loads((folder / "meta.json").read_text())["negatives"] == 2


def test_an_interrupted_scoring_keeps_its_rows_and_scores_only_the_rest(setup, tmp_path, monkeypatch):
    from leadkd.distill import score_teacher as module

    written = []
    original = module._Writer.write

    def dies_after_two(self, rows, scores, records):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(len(rows))
        original(self, rows, scores, records)

    monkeypatch.setattr(module._Writer, "write", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        score(setup, "dual_encoder", tmp_path / "s", batch_size=3)
    assert not (tmp_path / "s").exists() and (tmp_path / ".s.partial" / "meta.json").is_file()
    monkeypatch.setattr(module._Writer, "write", original)
    again = []
    monkeypatch.setattr(module._Writer, "write", lambda self, rows, *a: (again.append(len(rows)),
                                                                          original(self, rows, *a)))
    folder = score(setup, "dual_encoder", tmp_path / "s", batch_size=3)
    assert sum(written) == 6 and sum(again) == 12 - 6
    np.testing.assert_allclose(np.load(folder / "scores.npy"),
                               np.load(score(setup, "dual_encoder", tmp_path / "ref") / "scores.npy"), rtol=1e-6)
    assert not (tmp_path / ".s.partial").exists()


def test_a_finished_folder_is_checked_and_only_its_bad_rows_scored_again(setup, tmp_path, monkeypatch):
    from leadkd.distill import score_teacher as module

    folder = score(setup, "dual_encoder", tmp_path / "s")
    reference = np.load(folder / "scores.npy")
    said = []
    original = module._Writer.write
    monkeypatch.setattr(module._Writer, "write", lambda *a: pytest.fail("a sound folder was scored again"))
    score(setup, "dual_encoder", folder, log=said.append)
    assert said == [f"{folder}: already scored for this teacher, these settings and groups; every row checks"]
    monkeypatch.setattr(module._Writer, "write", original)
    flip(folder / "scores.npy", row=5, width=5 * 4 * 4)
    with pytest.raises(InputError, match=r"s: group 5 \(query 'q5'\): fails its checksum"):
        open_groups_scores(setup, folder)
    again = []
    monkeypatch.setattr(module._Writer, "write", lambda self, rows, *a: (again.append(rows.tolist()),
                                                                          original(self, rows, *a)))
    score(setup, "dual_encoder", tmp_path / "s")
    assert again == [[5]]
    np.testing.assert_allclose(np.load(folder / "scores.npy"), reference, rtol=1e-6)


def test_another_request_is_refused_unless_overwritten(setup, tmp_path):
    folder = score(setup, "dual_encoder", tmp_path / "s")
    with pytest.raises(LeadkdError, match=r"s: holds scores of another request \(differs in layers\)"):
        score(setup, "dual_encoder", folder, layers="0")
    score(setup, "dual_encoder", folder, layers="0", overwrite=True)
    assert json.loads((folder / "meta.json").read_text())["layers"] == [0]


def _score_worker(rank: int, port: int, setup: dict, out: str) -> None:
    from leadkd.runtime import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = D.init_distributed(device="cpu", timeout_s=60)
    try:
        score(setup, "cross_encoder", Path(out), ctx=ctx)
    finally:
        ctx.cleanup()


def test_two_processes_score_a_share_each_into_one_folder(setup, tmp_path):
    run_processes(_score_worker, (free_port(), setup, str(tmp_path / "two")), 2, 120)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "scores.npy"),
                               np.load(score(setup, "cross_encoder", tmp_path / "one") / "scores.npy"), atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "rows.npy")[:, :3],
                                  np.load(tmp_path / "one" / "rows.npy")[:, :3])


# --------------------------------------------------------------------------- training from it

def exact_score(setup, kind: str, output: Path) -> Path:
    """A score folder to compare with the online teacher to 1e-5. ColBERT's raw layer scores are ~500 here
    (sums of unnormalised token products), where one float32 ulp is 3e-5: scored one group at a time, their
    rounding is the training batch's; batched, the KL terms move by ~3e-5 (float rounding, not a defect)."""
    return score(setup, kind, output, batch_size=1 if kind == "colbert" else 8)


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_from_the_file_equals_the_online_teacher_on_its_own_groups(setup, tmp_path, kind):
    folder = exact_score(setup, kind, tmp_path / "s")
    reference = first_step(online(setup, kind, tmp_path / "a"))
    found = first_step(from_file(setup, folder, tmp_path / "b"))
    assert found["pairs"] == reference["pairs"] and reference["pairs"]
    assert found["terms"].keys() == reference["terms"].keys()
    for term, value in reference["terms"].items():
        assert found["terms"][term] == pytest.approx(value, abs=1e-5), term
    assert found["grads"].keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(found["grads"][key], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("response", ["kl", "margin_mse"])
def test_response_only_baselines_read_the_file_too(setup, tmp_path, response):
    folder = score(setup, "cross_encoder", tmp_path / "s", layers="2")
    overrides = {"loss.layer": "none", "loss.response": response}
    run_job(online(setup, "cross_encoder", tmp_path / "a", **overrides), log=lambda m: None)
    run_job(from_file(setup, folder, tmp_path / "b", **overrides), log=lambda m: None)
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), atol=1e-5)


def test_the_students_ground_truth_keeps_its_in_batch_negatives(setup, tmp_path):
    """Own-group distillation, but the student's contrastive term sees the whole batch (4 x 4 candidates):
    its value is the cross-entropy over the batch, not over the query's own 4 (copies of a positive left in,
    so that the reference is plain cross-entropy)."""
    folder = score(setup, "dual_encoder", tmp_path / "s")
    trainer = Trainer(from_file(setup, folder, tmp_path / "b", **{"loss.mask_duplicate_positives": False}),
                      log=lambda m: None, show_progress=False)
    batch = next(iter(trainer.loader))
    student = trainer.models["student"].model
    with torch.no_grad():
        terms = trainer.objective(batch, trainer.schedule.pairs_for_step(0))
        scores = student.encode_batch(batch.queries, batch.passages, [], final=True).scores()[-1]   # [4, 16]
    trainer.close()
    expected = torch.nn.functional.cross_entropy(scores, batch.labels)
    assert scores.shape == (4, 16) and float(terms["student_ce"]) == pytest.approx(float(expected), abs=1e-5)


def test_resume_from_the_file_is_exact(setup, tmp_path):
    import shutil

    folder = exact_score(setup, "colbert", tmp_path / "s")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_job(from_file(setup, folder, straight), log=lambda m: None)
    run_job(from_file(setup, folder, stopped), log=lambda m: None)
    shutil.rmtree(stopped / "final")
    shutil.rmtree(stopped / "checkpoints" / "step-00000004")
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run_job(from_file(setup, folder, stopped), resume=True, log=lambda m: None)
    assert losses(stopped) == losses(straight)


def test_a_run_from_the_file_with_loader_workers_is_the_same_run(setup, tmp_path):
    """``data.workers``: the student's inputs tokenised in two workers, the teacher's scores still read in the
    step (a score file has no text view): the same losses as without workers."""
    folder = exact_score(setup, "dual_encoder", tmp_path / "s")
    plain, workers = tmp_path / "plain", tmp_path / "workers"
    run_job(from_file(setup, folder, plain), log=lambda m: None)
    run_job(from_file(setup, folder, workers, **{"data.workers": 2}), log=lambda m: None)
    assert losses(workers) == pytest.approx(losses(plain), abs=1e-6, rel=0)


def _train_worker(rank: int, port: int, setup: dict, out: str, teacher: str, source: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(out)
    overrides = {"optim.batch_size": 2}
    config = (from_file(setup, root / "s", root / "file", **overrides) if source == "file"
              else online(setup, teacher, root / "online", **overrides))
    torch.save(first_step(config), root / f"{source}{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_gloo_processes_from_the_file_equal_the_online_teacher(setup, tmp_path, kind):
    """Each process holds 2 of the 4 queries; the student's ground truth gathers the other's passages."""
    exact_score(setup, kind, tmp_path / "s")
    for source in ("file", "online"):
        run_processes(_train_worker, (free_port(), setup, str(tmp_path), kind, source), 2, 180)
    for rank in range(2):
        found = torch.load(tmp_path / f"file{rank}.pt", weights_only=False)
        reference = torch.load(tmp_path / f"online{rank}.pt", weights_only=False)
        assert found["pairs"] == reference["pairs"]
        for term, value in reference["terms"].items():
            assert found["terms"][term] == pytest.approx(value, abs=1e-5), term
        for key, grad in reference["grads"].items():
            torch.testing.assert_close(found["grads"][key], grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- layers

def test_random_pairs_draw_only_stored_layers_and_a_fixed_strategy_needing_another_is_refused(setup, tmp_path):
    folder = score(setup, "dual_encoder", tmp_path / "s", layers="0,2")
    trainer = Trainer(from_file(setup, folder, tmp_path / "b", **{"layers.k": 2}), log=lambda m: None)
    drawn = {t for step in range(20) for _, t in trainer.schedule.pairs_for_step(step)}
    trainer.close()
    assert drawn == {0, 2}
    with pytest.raises(ConfigError, match=r"layers.strategy=last needs teacher layer 1, which the teacher score "
                                          r"file does not store \(it stores layers 0, 2\)"):
        Trainer(from_file(setup, folder, tmp_path / "c", **{"layers.strategy": "last"}), log=lambda m: None)


# --------------------------------------------------------------------------- files others publish

def write_published(path: Path, setup, scores: np.ndarray, header: bool = True) -> Path:
    """``qid pid score`` lines (TSV), or JSON lines for a ``.jsonl`` name, gzipped for a ``.gz`` one."""
    import gzip

    groups = open_groups(setup)
    as_json = ".jsonl" in path.name
    lines = ["query-id\tcorpus-id\tscore"] if header and not as_json else []
    for g in range(len(groups)):
        keys = [*groups.positive_keys(g), *groups.negative_keys(g)]
        for j, k in enumerate(keys):
            qid, pid, value = groups.query_id(g), groups.passage_id(k), float(scores[g, j])
            lines.append(json.dumps({"query_id": qid, "corpus_id": pid, "score": value}) if as_json
                         else f"{qid}\t{pid}\t{value!r}")
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["ce.tsv", "ce.jsonl.gz"])
def test_a_published_qid_pid_score_file_equals_a_score_folder_of_the_same_final_scores(setup, tmp_path, name):
    folder = score(setup, "cross_encoder", tmp_path / "s", layers="2")
    published = write_published(tmp_path / name, setup, np.load(folder / "scores.npy")[:, :, -1])
    overrides = {"loss.layer": "none", "loss.response": "margin_mse"}
    run_job(from_file(setup, folder, tmp_path / "a", **overrides), log=lambda m: None)
    run_job(from_file(setup, published, tmp_path / "b", **overrides), log=lambda m: None)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"loss.layer=lead compares teacher layers, but .*ce.* holds final "
                                          "scores only"):
        Trainer(from_file(setup, published, tmp_path / "c"), log=lambda m: None)


# --------------------------------------------------------------------------- bad input

def open_groups(setup):
    corpus, queries = load_corpus(str(setup["data"])), load_queries(str(setup["data"]))
    return read_training_groups(setup["groups"], corpus=corpus, queries=queries)


def open_groups_scores(setup, folder: Path):
    return open_teacher_scores(folder, open_groups(setup), setup["groups"])


def flip(path: Path, row: int, width: int) -> None:
    """Flip one byte inside row ``row`` of a ``.npy`` whose rows are ``width`` bytes."""
    offset = np.load(path, mmap_mode="r").offset + row * width + 3
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def scored(setup, tmp_path_factory) -> Path:
    return score(setup, "dual_encoder", tmp_path_factory.mktemp("scored") / "s")


def copy_of(scored: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(scored, tmp_path / "s"))


def test_a_file_cut_short_is_refused(setup, scored, tmp_path):
    folder = copy_of(scored, tmp_path)
    os.truncate(folder / "scores.npy", os.path.getsize(folder / "scores.npy") - 10)
    with pytest.raises(InputError, match=r"scores.npy: cut short \(\d+ of \d+ bytes"):
        open_groups_scores(setup, folder)


def test_nan_scores_are_refused_even_with_a_matching_checksum(setup, scored, tmp_path):
    from leadkd.distill.teacher_scores import row_checksum

    folder = copy_of(scored, tmp_path)
    scores, rows = np.load(folder / "scores.npy", mmap_mode="r+"), np.load(folder / "rows.npy", mmap_mode="r+")
    scores[3, 1, 0] = np.nan
    rows[3, 3] = row_checksum(scores[3], *(int(v) for v in rows[3, :3]))
    scores.flush()
    rows.flush()
    with pytest.raises(InputError, match=r"s: group 3 \(query 'q3'\): holds a NaN or infinite score"):
        open_groups_scores(setup, folder)


def test_a_file_for_another_groups_file_is_refused(setup, scored, tmp_path):
    other = make_tiny_groups(tmp_path / "other.jsonl", seed=9)
    groups = read_training_groups(other, corpus=load_corpus(str(setup["data"])),
                                  queries=load_queries(str(setup["data"])))
    with pytest.raises(InputError, match=r"s: scored for another groups file \(.*groups.jsonl, 12 groups"):
        open_teacher_scores(scored, groups, other)


def test_a_file_from_another_teacher_is_refused(setup, scored, tmp_path):
    config = from_file(setup, scored, tmp_path / "b", **{"teacher.path": str(setup["student"])})
    with pytest.raises(InputError, match=r"s: scored by another teacher \(.*dense, weights sha256:"):
        Trainer(config, log=lambda m: None)
    Trainer(from_file(setup, scored, tmp_path / "c", **{"teacher.path": str(setup["dual_encoder"])}),
            log=lambda m: None).close()


@pytest.mark.parametrize("line, message", [
    ("q1\td999\t1.5", r"ce.tsv:2: field 'pid': unknown passage id 'd999' \(not in the corpus\)"),
    ("qx\td1\t1.5", r"ce.tsv:2: field 'qid': unknown query id 'qx'"),
    ("q1\td1\tnan", r"ce.tsv:2: field 'score': expected a finite number, got 'nan'"),
    ("q1\td1", r"ce.tsv:2: expected 3 fields \(qid pid score\), got 2"),
])
def test_a_published_file_naming_unknown_ids_or_bad_scores_is_refused(setup, tmp_path, line, message):
    path = tmp_path / "ce.tsv"
    path.write_text("qid\tpid\tscore\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        open_teacher_scores(path, open_groups(setup), setup["groups"])


def test_a_published_file_missing_a_candidate_is_refused(setup, tmp_path):
    path = write_published(tmp_path / "ce.tsv", setup, np.zeros((12, 5)))
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(InputError, match=r"ce.tsv: no score for query 'q11''s negative 'd\d+' \(group 11\)"):
        open_teacher_scores(path, open_groups(setup), setup["groups"])


def test_the_cli_says_one_line_and_exits_2(setup, scored, tmp_path, capsys):
    folder = copy_of(scored, tmp_path)
    flip(folder / "rows.npy", row=2, width=32)
    overrides = [f"teacher.scores={folder}", f"student.path={setup['student']}", "teacher.train=false",
                 f"data.corpus={setup['data']}", f"data.train_groups={setup['groups']}", "optim.steps=2",
                 "optim.batch_size=4", "eval.split=null", f"output_dir={tmp_path / 'run'}"]
    assert main(["distill", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s: group 2 (query 'q2'): fails its checksum" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    code = main(["score-teacher", "--teacher", str(setup["dual_encoder"]), "--data", str(setup["data"]),
                 "--groups", str(setup["groups"]), "--output", str(tmp_path / "cli"), "--dtype", "float32",
                 "max_query_length=16", "max_passage_length=32"])
    assert code == 0 and (tmp_path / "cli" / "meta.json").is_file()
    assert zlib.crc32((tmp_path / "cli" / "scores.npy").read_bytes()) == zlib.crc32(
        (scored / "scores.npy").read_bytes())


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.train": True}, "teacher.scores: holds a frozen teacher's scores; set teacher.train: false"),
    ({"teacher.cache": True}, "teacher.scores: replaces the teacher cache"),
    ({"loss.teacher_candidates": "batch"}, "teacher.scores: holds each query's own group only"),
])
def test_settings_a_score_file_cannot_serve_are_refused(setup, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_file(setup, tmp_path / "s", tmp_path / "b", **overrides)


def test_a_row_scored_for_other_candidate_ids_is_refused(setup, scored, tmp_path):
    """A row whose checksum holds but whose id hash is not its group's (as if scored under another
    candidate rule): the sampled id check at opening names it."""
    from leadkd.distill.teacher_scores import row_checksum

    folder = copy_of(scored, tmp_path)
    scores, rows = np.load(folder / "scores.npy", mmap_mode="r"), np.load(folder / "rows.npy", mmap_mode="r+")
    rows[7, 2] += 1
    rows[7, 3] = row_checksum(scores[7], *(int(v) for v in rows[7, :3]))
    rows.flush()
    with pytest.raises(InputError, match=r"s: group 7 \(query 'q7'\): was scored for other candidate ids"):
        open_groups_scores(setup, folder)


@pytest.mark.parametrize("value, message", [
    (float("nan"), (r"group \d+ \(query 'q\d+'\): a NaN or infinite score from the teacher; nothing of it was "
                   "written")),
    (1e6, (r"group \d+ \(query 'q\d+'\): a score beyond float16's range \(\|score\| up to 1e\+06\); use "
          "--dtype float32")),
])
def test_a_teacher_giving_non_finite_scores_writes_nothing_of_that_group(setup, tmp_path, monkeypatch, value, message):
    from leadkd.models.dual_encoder import DualEncoder

    original = DualEncoder.encode_batch

    def broken(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        scores = found.scores()
        return type("Scores", (), {"scores": lambda _: scores.index_fill(-1, torch.tensor([1]), value)})()

    monkeypatch.setattr(DualEncoder, "encode_batch", broken)
    with pytest.raises(LeadkdError, match=message):
        score(setup, "dual_encoder", tmp_path / "s", dtype="float16")
    rows = np.load(tmp_path / ".s.partial" / "rows.npy")
    assert not rows.any()


def test_the_model_card_names_the_teacher_that_scored_the_file(setup, scored, tmp_path):
    run_job(from_file(setup, scored, tmp_path / "b", **{"optim.steps": 1}), log=lambda m: None)
    card = (tmp_path / "b" / "final" / "README.md").read_text()
    assert f"{setup['dual_encoder']} (dual_encoder), frozen, its scores read from {scored}" in card


def test_a_file_scored_with_another_last_layer_view_is_refused_for_lead(setup, scored, tmp_path):
    with pytest.raises(ConfigError, match=r"the layer loss reads the last layer final, but .*s stores it raw; "
                                          "score it with the loss's last-layer view"):
        Trainer(from_file(setup, scored, tmp_path / "b", **{"loss.colbert_last_layer": "final"}), log=lambda m: None)


def test_bf16_scoring_is_recorded_and_close_to_float32(setup, scored, tmp_path):
    folder = score(setup, "dual_encoder", tmp_path / "b", bf16=True)
    assert json.loads((folder / "meta.json").read_text())["compute"] == "bfloat16 autocast"
    found, reference = np.load(folder / "scores.npy"), np.load(scored / "scores.npy")
    assert not np.array_equal(found, reference)
    np.testing.assert_allclose(found, reference, rtol=0.03)
