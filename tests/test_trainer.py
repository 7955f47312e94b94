"""The training loop: LEAD and warm-up jobs on tiny models, resume exactness, two processes vs one."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, make_tiny_beir, make_tiny_bert_folder, make_tiny_groups, run_processes
from leadkd.config import load_config
from leadkd.distill.trainer import Trainer, run_job
from leadkd.runtime.errors import ConfigError, LeadkdError


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    return {
        "teacher": make_tiny_bert_folder(root / "teacher", layers=4, seed=5, dropout=0.1),
        # Wide initial weights: distinct scores, so gradients are well above float noise.
        "teacher_nodrop": make_tiny_bert_folder(root / "teacher_nodrop", layers=4, seed=5, dropout=0.0, init_range=0.3),
        "data": make_tiny_beir(root / "data"),
        "groups": make_tiny_groups(root / "groups.jsonl"),
    }


def distill_config(setup, output: Path, teacher: str = "teacher", **overrides):
    values = {
        "teacher.path": str(setup[teacher]), "teacher.max_query_length": 16, "teacher.max_passage_length": 32,
        "student.init": "teacher_layers=[0,2]", "student.max_query_length": 16, "student.max_passage_length": 32,
        "data.corpus": str(setup["data"]), "data.train_groups": str(setup["groups"]), "data.num_negatives": 3,
        "optim.steps": 4, "optim.batch_size": 4, "optim.lr": 1e-3, "layers.k": 2, "layers.resample_every": 1,
        "checkpoint.every": 2, "eval.split": None, "log_every": 1, "output_dir": str(output),
    }
    values.update(overrides)
    return load_config(None, [f"{key}={json.dumps(value) if value is None else value}"
                              for key, value in values.items()], kind="distill")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def log_pairs(output: Path) -> list:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["pairs"]) for row in rows if "pairs" in row]


def test_distill_runs_and_writes_what_users_open(setup, tmp_path):
    out = tmp_path / "run"
    config = distill_config(setup, out, **{"eval.split": "dev", "eval.every": 2})
    result = run_job(config, log=lambda m: None)
    assert (out / "config.yaml").is_file() and load_config(out / "config.yaml", kind="distill") == config
    for folder in ("final", "final-teacher", "best"):
        assert (out / folder / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    for row in steps:
        assert {"student_ce", "teacher_ce", "response_kl", "layer_kl", "lr"} <= row.keys()
        assert len(row["pairs"]) == 2 and abs(sum(row["layer_weights"]) - 1) < 1e-5
    assert [row["step"] for row in rows if "eval" in row] == [0, 2, 4]
    assert result["best"]["metric"] == "nDCG@10"
    from leadkd.models import load_model

    student = load_model(out / "final")
    assert student.kind == "dual_encoder" and student.num_layers == 2


def test_eval_at_start_false_skips_only_the_step_0_evaluation(setup, tmp_path):
    out = tmp_path / "run"
    result = run_job(distill_config(setup, out, **{"eval.split": "dev", "eval.every": 2, "eval.at_start": False}),
                     log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval" in row] == [2, 4] and result["best"]["step"] in (2, 4)


def test_a_run_writes_only_inside_its_output_folder(setup, tmp_path):
    """Inputs (models, corpus, groups) are only read; everything written lands under ``output_dir``."""
    def snapshot(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}

    inputs = {name: snapshot(Path(setup[name]).parent) for name in ("teacher", "data")}
    (tmp_path / "out").mkdir()
    run_job(distill_config(setup, tmp_path / "out" / "run", **{"eval.split": "dev", "eval.every": 2}),
            log=lambda m: None)
    assert {name: snapshot(Path(setup[name]).parent) for name in inputs} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]


def test_a_fresh_start_never_overwrites_checkpoints_and_resume_keeps_the_settings(setup, tmp_path):
    out = tmp_path / "run"
    config = distill_config(setup, out, **{"optim.steps": 2, "checkpoint.every": 1})
    run_job(config, log=lambda m: None)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; pass --resume"):
        Trainer(config, log=lambda m: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    longer = distill_config(setup, out, **{"optim.steps": 4, "checkpoint.every": 1, "layers.k": 1})
    with pytest.raises(ConfigError, match=r"config\.yaml: the run being resumed used other settings "
                                          r"\(layers\.k: 2 -> 1; optim\.steps: 2 -> 4\)"):
        Trainer(longer, resume=True, log=lambda m: None)
    # What only decides evaluation, logging, checkpoint keeping or NaN handling may change, and the same
    # file spelled another way is the same file.
    Trainer(distill_config(setup, out, **{"optim.steps": 2, "checkpoint.every": 2, "log_every": 5,
                                          "optim.skip_non_finite": 3, "ddp_timeout": 60,
                                          "data.corpus": f"{setup['data']}/."}),
            resume=True, log=lambda m: None).close()


def test_the_collective_timeout_reaches_the_process_group(setup, tmp_path, monkeypatch):
    """Rank 0 writes checkpoints while the others wait in a collective: ``ddp_timeout`` must reach
    init_process_group."""
    import leadkd.runtime.distributed as D

    seen, real = [], D.init_distributed
    monkeypatch.setattr(D, "init_distributed", lambda **kw: seen.append(kw) or real(**kw))
    Trainer(distill_config(setup, tmp_path / "run", ddp_timeout=5400), log=lambda m: None).close()
    assert seen == [{"timeout_s": 5400}]
    with pytest.raises(ConfigError, match="ddp_timeout: must be > 0"):
        distill_config(setup, tmp_path / "run", ddp_timeout=0)


def test_frozen_teacher_is_not_updated_and_gets_no_optimizer(setup, tmp_path):
    config = distill_config(setup, tmp_path / "run", **{"teacher.train": False, "optim.steps": 2})
    trainer = Trainer(config, log=lambda m: None)
    teacher = trainer.models["teacher"]
    assert not teacher.trains and not any(p.requires_grad for p in teacher.model.parameters())
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer._iterator = trainer._batches()
    trainer.train_step()
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    assert all(p.grad is None for p in teacher.model.parameters())
    trainer.close()


def test_resume_gives_the_same_weights_and_layers(setup, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_job(distill_config(setup, straight), log=lambda m: None)

    first = Trainer(distill_config(setup, split), log=lambda m: None)  # "killed" after step 2
    first._iterator = first._batches()
    for _ in range(2):
        first.train_step()
    first.save()
    first.close()
    del first
    resumed = Trainer(distill_config(setup, split), resume=True, log=lambda m: None)
    assert resumed.step == 2
    resumed.fit()
    resumed.close()

    for folder in ("final", "final-teacher"):
        a, b = weights(straight / folder), weights(split / folder)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert log_pairs(straight)[2:] == log_pairs(split)


def test_warm_up_job_for_every_model_kind(setup, tmp_path):
    # The paper's teacher inputs: ColBERT without a projection, a cross-encoder without segment ids.
    paper = {"colbert": {"model.colbert_dim": 0}, "cross_encoder": {"model.token_type_ids": "false"}}
    for kind, extra in (("dual_encoder", {}), ("colbert", {}), ("cross_encoder", {}),
                        ("colbert", paper["colbert"]), ("cross_encoder", paper["cross_encoder"])):
        out = tmp_path / f"{kind}{'-paper' if extra else ''}"
        overrides = {"model.path": str(setup["teacher"]), "model.kind": kind, "model.max_query_length": 16,
                     "model.max_passage_length": 32, "data.corpus": str(setup["data"]),
                     "data.train_groups": str(setup["groups"]), "data.num_negatives": 3, "optim.steps": 2,
                     "optim.batch_size": 4, "eval.split": "null", "output_dir": str(out), **extra}
        config = load_config(None, [f"{k}={v}" for k, v in overrides.items()], kind="train")
        run_job(config, log=lambda m: None)
        from leadkd.models import load_model

        final = load_model(out / "final")
        assert final.kind == kind
        if kind == "colbert":  # saved with the option, so it reopens the same way without it
            assert final.options.dim == (None if extra else 128) and (final.projection is None) == bool(extra)
        if kind == "cross_encoder":
            assert final.options.use_token_type_ids is not bool(extra)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows if "loss" in row)


def test_non_finite_loss_stops_with_the_step(setup, tmp_path, monkeypatch):
    trainer = Trainer(distill_config(setup, tmp_path / "run"), log=lambda m: None)
    trainer._iterator = trainer._batches()
    trainer.train_step()
    original = trainer.objective

    def poisoned(batch, pairs):
        terms = original(batch, pairs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer, "objective", poisoned)
    assert trainer.train_step().skipped  # the update is dropped on the device; the next log step stops the run
    with pytest.raises(LeadkdError, match="the loss became nan at step 2; no checkpoint"):
        trainer.check_non_finite()
    trainer.close()


def test_skip_non_finite_drops_the_update_then_stops_when_it_persists(setup, tmp_path, monkeypatch):
    trainer = Trainer(distill_config(setup, tmp_path / "run", **{"optim.skip_non_finite": 1}), log=lambda m: None)
    trainer._iterator = trainer._batches()
    trainer.train_step()
    original, poison = trainer.objective, {"on": True}

    def poisoned(batch, pairs):
        terms = original(batch, pairs)
        if poison["on"]:
            terms["loss"] = terms["loss"] + float("inf")
        return terms

    monkeypatch.setattr(trainer, "objective", poisoned)
    before = {k: v.clone() for k, v in trainer.models["student"].model.state_dict().items()}
    lr_before = trainer.models["student"].scheduler.get_last_lr()[0]
    result = trainer.train_step()
    assert result.skipped and trainer.step == 2
    after = trainer.models["student"].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, not even from AdamW's state
    assert trainer.models["student"].scheduler.get_last_lr()[0] != lr_before  # the schedule kept going
    assert all(p.grad is None for p in trainer.models["student"].model.parameters())
    poison["on"] = False
    assert not trainer.train_step().skipped and trainer.non_finite_in_a_row == 0
    changed = trainer.models["student"].model.state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    poison["on"] = True
    assert trainer.train_step().skipped
    trainer.check_non_finite()  # one skipped in a row is allowed
    assert trainer.train_step().skipped
    with pytest.raises(LeadkdError, match="the loss became inf at step 5 after skipping 1 such batches in a row; "
                                          "no checkpoint"):
        trainer.check_non_finite()
    trainer.close()


def test_skipped_steps_are_logged_and_the_run_finishes(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(distill_config(setup, out, **{"optim.skip_non_finite": 2}), log=lambda m: None)
    original = trainer.objective

    def poisoned(batch, pairs):
        terms = original(batch, pairs)
        if trainer.step == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer, "objective", poisoned)
    trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON: no NaN
    steps = {row["step"]: row for row in rows if "epoch" in row}
    assert sorted(steps) == [1, 2, 3, 4] and steps[2] == {"step": 2, "epoch": 0, "loss": None, "skipped": True,
                                                           "lr": steps[2]["lr"], "seconds": steps[2]["seconds"]}
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("failure", ["state", "weights"])
def test_a_full_disk_while_checkpointing_names_it_and_keeps_the_previous_one(setup, tmp_path, monkeypatch, capsys,
                                                                              failure):
    """ENOSPC half-way through the second checkpoint: one clear line, the first checkpoint intact, no debris,
    and once there is room again ``--resume`` finishes the run."""
    import errno
    import re

    from leadkd import cli
    from leadkd.config import save_config
    from leadkd.distill import checkpoint
    from leadkd.models.dual_encoder import DualEncoder

    out = tmp_path / "run"
    config_file = save_config(distill_config(setup, out, **{"checkpoint.every": 1, "checkpoint.keep_last": 1}),
                              tmp_path / "config.yaml")
    real = {"state": checkpoint.torch.save, "weights": DualEncoder.save_pretrained}

    def fill_disk_on_step_2(where):
        def writer(*args, **kwargs):
            file = Path(args[1]) / ("model.safetensors" if failure == "weights" else "")
            if ".step-00000002." in str(file):
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(b"\0" * 100)  # the first bytes made it, then the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real[where](*args, **kwargs)
        return writer

    if failure == "state":
        monkeypatch.setattr(checkpoint.torch, "save", fill_disk_on_step_2("state"))
    else:
        monkeypatch.setattr(DualEncoder, "save_pretrained", fill_disk_on_step_2("weights"))
    assert cli.main(["distill", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1].split("\r")[-1]
    first, second = out / "checkpoints" / "step-00000001", out / "checkpoints" / "step-00000002"
    assert re.fullmatch(re.escape(f"leadkd: error: {second}: cannot write the checkpoint of step 2 (No space left on "
                                  "device; ") + r"[\d.]+ MiB free there\); " +
                        re.escape(f"the newest intact checkpoint is {first}"), err), err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # no half-written folder
    assert checkpoint.newest_checkpoint(out / "checkpoints")[0] == first
    monkeypatch.undo()  # room again
    assert cli.main(["distill", "--config", str(config_file), "--resume"]) == 0
    assert (out / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------ two gloo processes vs one process

WORLD, LOCAL_BATCH = 2, 2


def _first_step(config) -> dict:
    """Loss, layer choice and raw gradients (before any clipping) of the first optimizer step."""
    trainer = Trainer(config, log=lambda m: None, show_progress=False)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, trained in trainer.models.items():
        if trained.trains:
            def record(optimizer, args, kwargs, name=name, model=trained.model):
                grads[name] = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
            trained.optimizer.register_step_pre_hook(record)
    trainer._iterator = trainer._batches()
    result = trainer.train_step()
    trainer.close()
    return {"loss": result.loss, "terms": result.terms, "pairs": result.pairs, "weights": result.weights,
            "pair_kl": result.pair_kl, "grads": grads}


def test_models_that_train_on_the_cpu_get_the_cheaper_dropout(setup, tmp_path):
    from leadkd.accel.cpu_dropout import CpuDropout

    def patched(trainer) -> dict[str, bool]:
        found = {name: any(isinstance(m, CpuDropout) for m in t.model.modules()) for name, t in trainer.models.items()}
        trainer.close()
        return found

    assert patched(Trainer(distill_config(setup, tmp_path / "a"), log=lambda m: None)) == {"student": True,
                                                                                          "teacher": True}
    assert patched(Trainer(distill_config(setup, tmp_path / "b", **{"teacher.train": False}),
                           log=lambda m: None)) == {"student": True, "teacher": False}
    assert patched(Trainer(distill_config(setup, tmp_path / "c", **{"optim.cpu_dropout": False}),
                           log=lambda m: None)) == {"student": False, "teacher": False}


@pytest.mark.parametrize("cpu_dropout", [True, False])
def test_dropout_is_the_same_with_and_without_gradient_checkpointing(setup, tmp_path, cpu_dropout):
    """Recomputed blocks must draw the dropout masks of the first forward again: the same step either way."""
    runs = [_first_step(distill_config(setup, tmp_path / str(on), **{"optim.gradient_checkpointing": on,
                                                                     "optim.cpu_dropout": cpu_dropout}))
            for on in (False, True)]
    assert runs[0]["pairs"] == runs[1]["pairs"] and runs[0]["loss"] == pytest.approx(runs[1]["loss"], abs=1e-6)
    for model in ("student", "teacher"):
        assert runs[0]["grads"][model].keys() == runs[1]["grads"][model].keys()
        for key, grad in runs[0]["grads"][model].items():
            torch.testing.assert_close(runs[1]["grads"][model][key], grad, rtol=1e-4, atol=1e-6)


def _worker(rank: int, port: int, setup: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = distill_config(setup, Path(out_dir) / "ddp", "teacher_nodrop",
                            **{"optim.batch_size": LOCAL_BATCH, "optim.max_grad_norm": None})
    torch.save(_first_step(config), Path(out_dir) / f"rank{rank}.pt")


def _run_gloo_workers(worker, setup: dict, out_dir: Path, seconds: float = 120) -> None:
    """``worker(rank, port, setup, out_dir)`` in WORLD processes, killed on a hang."""
    run_processes(worker, (free_port(), setup, str(out_dir)), WORLD, seconds)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_whole_batch(setup, tmp_path):
    _run_gloo_workers(_worker, setup, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _first_step(distill_config(setup, tmp_path / "single", "teacher_nodrop",
                                        **{"optim.batch_size": WORLD * LOCAL_BATCH, "optim.max_grad_norm": None}))

    for rank in ranks:  # every process agrees with the others and with one process on the whole batch
        assert rank["pairs"] == single["pairs"]
        assert rank["loss"] == pytest.approx(single["loss"], abs=1e-5)
        for term, value in single["terms"].items():
            assert rank["terms"][term] == pytest.approx(value, abs=1e-5), term
        assert rank["weights"] == pytest.approx(single["weights"], abs=1e-6)
        for model in ("student", "teacher"):
            assert rank["grads"][model].keys() == single["grads"][model].keys()
            # Each process pads its own batch, so float sums run in another order: compare by norms, each
            # tensor against its own size plus a floor set by the whole model's gradient (some gradients,
            # e.g. attention key biases, are zero in exact arithmetic and pure rounding here).
            scale = torch.cat([g.flatten() for g in single["grads"][model].values()]).norm()
            for key, grad in single["grads"][model].items():
                error = (rank["grads"][model][key] - grad).norm()
                assert error <= 1e-4 * grad.norm() + 1e-5 * scale, \
                    f"{model} {key}: |diff| {error:.3g}, |grad| {grad.norm():.3g}"


def _eval_worker(rank: int, port: int, setup: dict, out_dir: str) -> None:
    from leadkd.models import load_model
    from leadkd.retrieval.pipeline import evaluate_retriever
    from leadkd.runtime import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = D.init_distributed(device="cpu", timeout_s=60)
    try:
        model = load_model(setup["teacher"])
        results = {k: evaluate_retriever(model, str(setup["data"]), "dev", k=k) for k in (3, 100)}
        torch.save(results, Path(out_dir) / f"eval{rank}.pt")
    finally:
        ctx.cleanup()


@pytest.mark.slow
def test_every_process_evaluates_a_share_and_rank_0_gets_the_whole_corpus_result(setup, tmp_path):
    """No process waits while rank 0 encodes everything: each encodes half the corpus, and the merged
    top-k lists give the single-process numbers (k = 3 cuts inside every share, k = 100 keeps all)."""
    from leadkd.models import load_model
    from leadkd.retrieval.pipeline import evaluate_retriever

    _run_gloo_workers(_eval_worker, setup, tmp_path)
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[1] == {3: None, 100: None}
    model = load_model(setup["teacher"])
    for k in (3, 100):
        single = evaluate_retriever(model, str(setup["data"]), "dev", k=k)
        assert ranks[0][k].keys() == single.keys() == {"nDCG@10", "R@100"}
        for measure, value in single.items():
            assert ranks[0][k][measure] == pytest.approx(value, abs=1e-6), (k, measure)
    assert ranks[0][3]["R@100"] < ranks[0][100]["R@100"]  # the cut at 3 is real


def test_hidden_state_mse_baseline_trains_and_resumes(setup, tmp_path):
    out = tmp_path / "hidden"
    config = distill_config(setup, out, **{"loss.layer": "hidden_mse", "optim.steps": 2, "checkpoint.every": 1})
    run_job(config, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert all(row["hidden_mse"] > 0 and row["layer_kl"] == 0 for row in rows)
    from leadkd.distill.checkpoint import list_checkpoints, load_state

    state = load_state(list_checkpoints(out / "checkpoints")[-1])
    assert any(key.endswith("weight") for key in state["hidden_mse"])  # the projections travel with checkpoints


def test_hidden_state_mse_refuses_different_tokenizers(setup, tiny_bert_other, tmp_path):
    from leadkd.runtime.errors import LeadkdError as Error

    config = distill_config(setup, tmp_path / "x", **{"loss.layer": "hidden_mse", "student.init": None,
                                                      "student.path": str(tiny_bert_other)})
    with pytest.raises(Error, match="share one tokenizer"):
        Trainer(config, log=lambda m: None)


@pytest.mark.filterwarnings("ignore:skipping a damaged checkpoint:UserWarning")  # the re-emitted step-4 one
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(setup, tmp_path):
    from leadkd.distill.checkpoint import list_checkpoints, newest_checkpoint

    out = tmp_path / "run"
    run_job(distill_config(setup, out, **{"checkpoint.every": 1, "checkpoint.keep_last": 3}), log=lambda m: None)
    folders = list_checkpoints(out / "checkpoints")
    weights_file = folders[-1] / "student" / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])  # a crash or full disk cut the newest weights
    with pytest.warns(UserWarning, match="damaged weights"):
        found = newest_checkpoint(out / "checkpoints")
    assert found is not None and found[0] == folders[-2]
    (folders[-2] / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable checkpoint state"):
        assert newest_checkpoint(out / "checkpoints")[0] == folders[-3]


@pytest.mark.slow
def test_torchrun_runs_distill_with_evaluation_and_checkpoints(setup, tmp_path):
    """The way users scale out: ``torchrun -m leadkd.cli distill`` with two gloo processes, evaluating
    (each process a share of the corpus) and checkpointing on schedule; ``--resume`` with other settings
    is refused there too."""
    import subprocess
    import sys

    out = tmp_path / "run"
    args = [f"teacher.path={setup['teacher']}", "teacher.max_query_length=16", "teacher.max_passage_length=32",
            "student.init=teacher_layers=[0,2]", f"data.corpus={setup['data']}",
            f"data.train_groups={setup['groups']}", "data.num_negatives=3", "optim.batch_size=2", "layers.k=2",
            "checkpoint.every=2", "eval.split=dev", "eval.every=2", "log_every=1", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", "-m", "leadkd.cli", "distill", *args, *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    first = torchrun("optim.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("optim.steps=4", "--resume")
    assert resumed.returncode != 0 and "optim.steps: 2 -> 4" in resumed.stderr  # a longer run is a new run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval" in row] == [0, 2]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]  # rank 0 alone writes the log
    for folder in ("final", "final-teacher", "best"):
        assert (out / folder / "model.safetensors").is_file()


@pytest.mark.parametrize("view", ["raw", "final"])
def test_a_colbert_teachers_last_layer_enters_the_layer_loss_raw(setup, tmp_path, view):
    """Pair (student last, teacher last) with a frozen ColBERT teacher: with the paper's raw layer view the
    pair's KL differs from the response KL(T || S); with ``colbert_last_layer: final`` both compare the
    same two final scores, so they are equal to rounding."""
    config = distill_config(setup, tmp_path / view, **{
        "teacher.kind": "colbert", "teacher.train": "false", "student.init": None,
        "student.path": str(setup["teacher"]), "layers.strategy": "3:3", "loss.colbert_last_layer": view})
    step = _first_step(config)
    (pair_kl,) = step["pair_kl"]
    response = step["terms"]["response_kl"]
    if view == "final":
        assert pair_kl == pytest.approx(response, rel=1e-5)
    else:
        assert abs(pair_kl - response) > 1e-3 * max(1.0, response)


def test_a_resumed_run_removes_the_unfinished_writes_a_kill_left(setup, tmp_path):
    out = tmp_path / "run"
    config = distill_config(setup, out, **{"optim.steps": 2, "checkpoint.every": 1})
    run_job(config, log=lambda m: None)
    checkpoints = out / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir())
    # What atomic_directory and remove_tree leave when a kill lands in the middle of them.
    leftovers = [checkpoints / ".step-00000003.k2j9x_.tmp", checkpoints / ".step-00000001.deleting",
                 out / ".final.a8b1c2.tmp", out / ".best.zz9.tmp"]
    for folder in leftovers:
        (folder / "student").mkdir(parents=True)
        (folder / "student" / "model.safetensors").write_bytes(b"half a checkpoint")
    # Not leftovers: a user's own hidden folder, a file of that name, an unrelated temporary folder.
    (out / ".my-notes.tmp").mkdir()
    (checkpoints / ".step-00000009.tmp.tmp").write_text("a file, not a write of ours")
    (out / ".cache").mkdir()
    said: list[str] = []
    Trainer(config, resume=True, log=said.append).close()
    assert not any(folder.exists() for folder in leftovers)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(kept + [".step-00000009.tmp.tmp"])
    assert (out / ".my-notes.tmp").is_dir() and (out / ".cache").is_dir()
    removal = [line for line in said if "unfinished write" in line]
    assert len(removal) == 1 and removal[0].startswith("removed 4 unfinished write(s) of an interrupted run: ")
    assert all(str(folder) in removal[0] for folder in leftovers)
    said.clear()
    Trainer(config, resume=True, log=said.append).close()  # nothing left: nothing said
    assert not [line for line in said if "unfinished write" in line]


# Every way a tensor's value reaches Python; each waits for the device to finish the work queued before it.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_steps_between_log_steps_never_read_a_device_value(setup, tmp_path, monkeypatch):
    """On CUDA a host read waits for the step; none may happen between log steps (issue 25). The batches are
    drawn first: the sampler's own host work is not device work."""
    trainer = Trainer(distill_config(setup, tmp_path / "run", **{"optim.steps": 8, "log_every": 4,
                                                                 "optim.skip_non_finite": 1}),
                      log=lambda m: None, show_progress=False)
    assert trainer._skips_on_device
    batches = iter(list(itertools.islice(trainer._batches(), 8)))
    trainer._iterator = batches
    original = trainer.objective

    def poisoned(batch, pairs):
        terms = original(batch, pairs)
        if trainer.step == 5:  # the 6th step: skipped on the device, reported at the log step after it
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer, "objective", poisoned)
    read: list[str] = []
    for step in range(8):
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                real = getattr(torch.Tensor, name)

                def refuse(tensor, *args, _name=name, _real=real, **kwargs):
                    import traceback
                    where = traceback.extract_stack()[-2]
                    read.append(f"{_name} at {Path(where.filename).name}:{where.lineno}")
                    return _real(tensor, *args, **kwargs)

                patch.setattr(torch.Tensor, name, refuse)
            result = trainer.train_step()
        assert read == [], f"step {step + 1} read {read} on the host"
        if trainer.step % 4 == 0:
            said: list[str] = []
            trainer.log = said.append
            trainer.check_non_finite()
            assert said == ([] if trainer.step == 4 else
                            [("step 8: 1 update(s) skipped since the last log step for a non-finite loss "
                              "(0 in a row now, optim.skip_non_finite=1)")])
            assert not result.skipped and set(result.terms) >= {"loss"}
    trainer.close()


@pytest.mark.parametrize("kind, teacher_train, cache", [("dual_encoder", True, False), ("dual_encoder", False, False),
                                                        ("dual_encoder", False, True), ("colbert", False, False),
                                                        ("cross_encoder", False, False)],
                         ids=["joint-teacher", "frozen-teacher", "cached-teacher", "colbert-teacher",
                              "cross-encoder-teacher"])
def test_batches_tokenised_in_loader_workers_give_the_same_run(setup, tmp_path, kind, teacher_train, cache,
                                                               monkeypatch):
    """``data.workers``: the student's and the teacher's inputs (its own layout: ColBERT's markers and
    [MASK] padding, a cross-encoder's pairs) made in two worker processes give the steps (losses, layer
    draws, weights) of tokenising in the step; each batch arrives with both models' inputs, and the
    training process tokenises nothing itself."""
    from leadkd.models.colbert import ColBERT
    from leadkd.models.cross_encoder import CrossEncoder
    from leadkd.models.dual_encoder import DualEncoder

    in_step = [(DualEncoder, "tokenize"), (ColBERT, "tokenize_queries"), (ColBERT, "tokenize_passages"),
               (CrossEncoder, "tokenize_pairs")]
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers-{workers}"
        trainer = Trainer(distill_config(setup, out, **{"data.workers": workers, "teacher.train": teacher_train,
                                                        "teacher.kind": kind, "teacher.cache": cache}),
                          log=lambda m: None, show_progress=False)
        assert trainer.loader.num_workers == workers
        with monkeypatch.context() as patch:
            if workers and not cache:  # the workers tokenise through batch_tokenizer(); this process must not
                for owner, name in in_step:
                    patch.setattr(owner, name, lambda *a, **k: pytest.fail("tokenised in the step"))
            trainer.fit()
        if workers:
            batch = next(iter(trainer.loader))
            # a cached teacher's vectors come from its cache (which encodes what it lacks from the text)
            assert set(batch.inputs.unpacked()) == ({"student"} if cache else {"student", "teacher"})
            assert batch.model_inputs("student")["passage"]["input_ids"].shape[0] == len(batch.passages)
            if not cache:
                teacher_view = batch.model_inputs("teacher")
                assert set(teacher_view) == ({"pairs"} if kind == "cross_encoder" else {"query", "passage"})
        trainer.close()
        runs[workers] = out
    assert log_pairs(runs[0]) == log_pairs(runs[2])
    losses = [[json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
              for out in runs.values()]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6, rel=0)
    for folder in ("final",) + (("final-teacher",) if teacher_train else ()):
        a, b = weights(runs[0] / folder), weights(runs[2] / folder)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_with_loader_workers_gives_the_same_weights(setup, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_job(distill_config(setup, straight), log=lambda m: None)  # no workers: the reference
    first = Trainer(distill_config(setup, split, **{"data.workers": 2}), log=lambda m: None)
    first._iterator = first._batches()
    for _ in range(3):  # "killed" mid-epoch (16 groups, batch 4: 4 batches an epoch)
        first.train_step()
    first.save()
    first.close()
    resumed = Trainer(distill_config(setup, split, **{"data.workers": 2}), resume=True, log=lambda m: None)
    assert resumed.step == 3
    resumed.fit()
    resumed.close()
    for folder in ("final", "final-teacher"):
        a, b = weights(straight / folder), weights(split / folder)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
