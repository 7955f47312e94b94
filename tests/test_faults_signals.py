"""Faults on real processes: SIGTERM / SIGINT during `leadkd distill` (a checkpoint of the step it stopped
after, status 143 / 130, one stderr line; a second signal stops at once), a 2-process torchrun job where one
rank is signalled (both stop after the same step), and a torchrun job whose rank dies by SIGKILL (the other
stops within the process group's timeout with one line). Each resume ends with the weights of an
uninterrupted run (within 1e-6)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.distill.checkpoint import list_checkpoints, load_state, newest_checkpoint
from leadkd.runtime.stopping import StopOnSignal, Stopped

STEPS, TORCHRUN_STEPS = 24, 12
STOP_LINE = re.compile(r"^leadkd: stopped by (SIG\w+)(?: \(rank (\d)\))? after step (\d+); checkpoint (\S+); "
                       r"resume with --resume$")


# ------------------------------------------------------------------ the handler itself (fast, in-process)

def test_the_first_signal_only_asks_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopOnSignal(lambda signum: "never") as stopper:
        assert signal.getsignal(signal.SIGTERM) == stopper._handle
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python runs the handler at the next bytecode
            if stopper.signum is not None:
                break
            time.sleep(0.001)
        assert stopper.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stopped_names_the_signal_step_and_checkpoint_and_the_shell_status():
    stop = Stopped(signal.SIGINT, 7, Path("/x/checkpoints/step-00000007"))
    assert stop.exit_code == 130 and Stopped(signal.SIGTERM, 1, None).exit_code == 143
    assert STOP_LINE.match(f"leadkd: {stop}").groups() == ("SIGINT", None, "7", "/x/checkpoints/step-00000007")


# ------------------------------------------------------------------ real processes

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signals")
    return {"teacher": make_tiny_bert_folder(root / "teacher", layers=4, seed=5, dropout=0.1),
            "data": make_tiny_beir(root / "data"), "groups": make_tiny_groups(root / "groups.jsonl"),
            "root": root}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1"}


def _settings(setup, output: Path, steps: int, **extra) -> list[str]:
    values = {"teacher.path": setup["teacher"], "teacher.max_query_length": 16, "teacher.max_passage_length": 32,
              "student.init": "teacher_layers=[0,2]", "student.max_query_length": 16,
              "student.max_passage_length": 32, "layers.k": 2, "layers.resample_every": 1,
              "data.corpus": setup["data"], "data.train_groups": setup["groups"], "data.num_negatives": 3,
              "optim.steps": steps, "optim.lr": 1e-3, "checkpoint.every": 5, "checkpoint.keep_last": 2,
              "eval.split": "null", "log_every": 1, "output_dir": output, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _distill(setup, output: Path, *flags: str, **extra) -> list[str]:
    return [sys.executable, "-m", "leadkd.cli", "--threads", "1", "distill", *flags,
            *_settings(setup, output, STEPS, **{"optim.batch_size": 4, **extra})]


def _torchrun(setup, output: Path, *flags: str, **extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "leadkd.cli", "distill", *flags,
            *_settings(setup, output, TORCHRUN_STEPS, **{"optim.batch_size": 2, **extra})]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


_straight: dict[str, Path] = {}


def _uninterrupted(kind: str, setup) -> Path:
    """The reference run, made once per module for each launcher."""
    if kind not in _straight:
        output = setup["root"] / f"straight-{kind}"
        _run((_distill if kind == "single" else _torchrun)(setup, output))
        _straight[kind] = output
    return _straight[kind]


def _last_logged_step(output: Path) -> int:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass  # being written
    return max(steps, default=0)


def _start_and_wait(argv: list[str], output: Path, step: int) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _last_logged_step(output) < step:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (status {proc.returncode}) before step {step}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} in 300 s")
        time.sleep(0.005)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return stderr


def _leadkd_lines(stderr: str) -> list[str]:
    """Our lines; under torchrun two processes share one stderr, so a line may follow another's progress bar."""
    return [line[line.index("leadkd:"):] for line in stderr.replace("\r", "\n").splitlines() if "leadkd:" in line]


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def _assert_newest_is_complete(output: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged newest one would be skipped with a warning
        found = newest_checkpoint(output / "checkpoints")
    assert found is not None and found[0] == list_checkpoints(output / "checkpoints")[-1]
    assert found[1]["step"] == _step_of(found[0])
    return found[0]


def _assert_same_final(a: Path, b: Path) -> None:
    for folder in ("final", "final-teacher"):
        wa, wb = load_file(str(a / folder / "model.safetensors")), load_file(str(b / folder / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6,
                                       msg=lambda m: f"{folder}/{key}: {m}")  # noqa: B023  (called at once)


def _stop_with(sig: int, code: int, setup, out: Path, after_steps: int) -> tuple[str, list[str]]:
    """A distill job sent ``sig`` once it has logged ``after_steps`` steps: its stderr and leadkd's lines
    in it, after checking it exited with ``code``."""
    proc = _start_and_wait(_distill(setup, out), out, after_steps)
    proc.send_signal(sig)
    stderr = _finish(proc)
    assert proc.returncode == code, stderr[-3000:]
    return stderr, _leadkd_lines(stderr)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_stopped_after_and_resume_matches(setup, tmp_path):
    out = tmp_path / "run"
    stderr, lines = _stop_with(signal.SIGTERM, 143, setup, out, after_steps=2)
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
    name, rank, step, checkpoint = STOP_LINE.match(lines[0]).groups()
    step = int(step)
    assert name == "SIGTERM" and rank is None and 2 <= step < STEPS and not (out / "final").exists()
    assert Path(checkpoint) == _assert_newest_is_complete(out) == out / "checkpoints" / f"step-{step:08d}"
    assert load_state(checkpoint)["step"] == step == _last_logged_step(out)

    _run(_distill(setup, out, "--resume"))
    _assert_same_final(_uninterrupted("single", setup), out)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigint_exits_130_with_a_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    _, (line,) = _stop_with(signal.SIGINT, 130, setup, out, after_steps=1)
    name, _, step, checkpoint = STOP_LINE.match(line).groups()
    assert name == "SIGINT" and Path(checkpoint) == _assert_newest_is_complete(out)
    assert _step_of(Path(checkpoint)) == int(step) == _last_logged_step(out)


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once_and_leaves_a_complete_newest_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    proc = _start_and_wait(_distill(setup, out, **{"checkpoint.every": 1}), out, 3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)  # long enough for Python to run the first handler, far shorter than a step and a save
    proc.send_signal(signal.SIGTERM)
    stderr = _finish(proc)
    assert proc.returncode == 143, stderr[-3000:]
    (line,) = _leadkd_lines(stderr)
    assert re.match(r"^leadkd: stopped at once by a second SIGTERM after step \d+; the newest complete "
                    r"checkpoint is \S+; resume with --resume$", line), line
    newest = _assert_newest_is_complete(out)
    assert str(newest) in line or _step_of(newest) >= 2
    assert not (out / "final").exists()


def _workers(torchrun: subprocess.Popen, count: int = 2) -> dict[int, psutil.Process]:
    """torchrun's worker processes by rank (read from their environment)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None:
                found[int(rank)] = child
        if len(found) == count:
            return found
        time.sleep(0.05)
    pytest.fail("torchrun's workers not found")


@pytest.mark.slow
def test_torchrun_ranks_stop_after_the_same_step_when_one_is_signalled(setup, tmp_path):
    out = tmp_path / "run"
    proc = _start_and_wait(_torchrun(setup, out), out, 2)
    _workers(proc)[1].send_signal(signal.SIGTERM)
    stderr = _finish(proc)
    assert proc.returncode != 0
    stops = {int(m.group(2)): int(m.group(3)) for line in _leadkd_lines(stderr) if (m := STOP_LINE.match(line))}
    assert 1 in stops, stderr[-3000:]  # rank 0 may be cut down by torchrun once rank 1 has left
    assert len(set(stops.values())) == 1, stops
    step = stops[1]
    assert step < TORCHRUN_STEPS and _step_of(_assert_newest_is_complete(out)) == step == _last_logged_step(out)

    _run(_torchrun(setup, out, "--resume"))
    _assert_same_final(_uninterrupted("torchrun", setup), out)


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_the_job_within_the_timeout_and_resume_matches(setup, tmp_path):
    out = tmp_path / "run"
    timeout_s = 10
    argv = _torchrun(setup, out, **{"checkpoint.every": 1, "ddp_timeout": timeout_s})
    proc = _start_and_wait(argv, out, 3)
    _workers(proc)[0].kill()  # rank 0: the one that writes checkpoints, likely in the middle of one
    killed_at = time.monotonic()
    stderr = _finish(proc)
    took = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert took < timeout_s + 15, f"the job took {took:.1f} s to stop after its rank 0 died"
    lines = [line for line in _leadkd_lines(stderr) if "stopped answering" in line]
    assert len(lines) == 1 and re.match(r"^leadkd: error: a process of this torchrun job stopped answering "
                                        r"\(.+\); rank 1 stops too; ", lines[0]), stderr[-3000:]
    _assert_newest_is_complete(out)
    assert not (out / "final").exists()

    _run(_torchrun(setup, out, "--resume", **{"checkpoint.every": 1, "ddp_timeout": timeout_s}))
    _assert_same_final(_uninterrupted("torchrun", setup), out)


# ------------------------------------------------------------------ signals outside the training loop
# A command paused at a chosen call (the wrapper below: the Nth call of module:attr prints "paused" and
# sleeps), signalled there, must stop with one line and 128 + the signal, leave every output whole or
# absent (no temporary file, no lock), and its next run must finish.

PAUSED = """
import importlib, sys, time
target, nth = sys.argv[1], int(sys.argv[2])
module, attr = target.split(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        print("paused", flush=True)
        time.sleep(120)
    return real(*args, **kwargs)
setattr(owner, name, paused)
from leadkd.cli import main
sys.exit(main(sys.argv[3:]))
"""
OUTSIDE_LINE = re.compile(r"^leadkd: stopped by (SIG\w+); no output was left half-written; run the same command "
                          r"again (with --resume )?to continue$")


def _signalled_at(target: str, nth: int, argv: list, sig: int) -> tuple[int, list[str], str]:
    """Run ``leadkd ARGV`` paused at the ``nth`` call of ``target``, send ``sig`` there: (status, our lines, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, target, str(nth), "--threads", "1", *map(str, argv)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the command's own output may come first
            if line.strip() == "paused":
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail(f"never paused at {target} (status {proc.wait()}):\n{proc.stderr.read()[-3000:]}")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, _leadkd_lines(stderr), stderr


def _debris(folder: Path) -> list[str]:
    """What an unclean stop leaves: temporary files and folders, lock files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".lock", ".deleting", ".old")))


def _leadkd(*argv) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "leadkd.cli", "--threads", "1", *map(str, argv)], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_models_are_built_stops_cleanly_and_the_rerun_trains(setup, tmp_path, sig, code):
    out = tmp_path / "run"
    argv = ["distill", *_settings(setup, out, 4, **{"optim.batch_size": 4, "checkpoint.every": 2})]
    status, lines, stderr = _signalled_at("leadkd.distill.trainer:Trainer._build", 1, argv, sig)
    assert status == code, stderr[-3000:]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
    assert OUTSIDE_LINE.match(lines[0]).groups() == (signal.Signals(sig).name, "with --resume ")
    assert _debris(out) == [] and not (out / "checkpoints").exists() and not (out / "final").exists()
    _leadkd("distill", "--resume", *_settings(setup, out, 4, **{"optim.batch_size": 4, "checkpoint.every": 2}))
    assert (out / "final" / "model.safetensors").is_file() and _debris(out) == []


def test_a_signal_while_mining_writes_its_file_leaves_no_part_of_it(setup, tmp_path):
    groups = tmp_path / "mined" / "groups.jsonl"
    argv = ["mine", "--retriever", "bm25", "--data", setup["data"], "--split", "train", "--depth", "8",
            "--range", "1:8", "--negatives", "3", "--output", groups]
    # the 10th passage written: a few groups are in the temporary file
    status, lines, stderr = _signalled_at("leadkd.data.groups:_passage_json", 10, argv, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert len(lines) == 1 and OUTSIDE_LINE.match(lines[0]).groups() == ("SIGTERM", None), stderr[-3000:]
    assert sorted(p.name for p in groups.parent.iterdir()) == []  # no file, no temporary file, no report
    _leadkd(*argv)
    assert len(groups.read_text().splitlines()) == 12 and groups.with_name("groups.jsonl.report.json").is_file()


def test_a_signal_in_the_warm_ups_final_evaluation_keeps_the_last_step_and_resume_only_evaluates(setup, tmp_path):
    out = tmp_path / "warmup"
    settings = [f"{key}={value}" for key, value in {
        "model.path": setup["teacher"], "model.max_query_length": 16, "model.max_passage_length": 32,
        "data.corpus": setup["data"], "data.train_groups": setup["groups"], "data.num_negatives": 3,
        "optim.steps": 6, "optim.batch_size": 4, "optim.lr": 1e-3, "checkpoint.every": 4, "log_every": 1,
        "eval.split": "dev", "eval.every": "null", "eval.at_start": "false", "output_dir": out}.items()]
    status, lines, stderr = _signalled_at("leadkd.distill.trainer:Trainer.evaluate", 1, ["train", *settings],
                                          signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    name, rank, step, checkpoint = STOP_LINE.match(lines[0]).groups()
    assert (name, rank, step) == ("SIGTERM", None, "6")  # every step taken; the evaluation was cut
    assert Path(checkpoint) == _assert_newest_is_complete(out) == out / "checkpoints" / "step-00000006"
    assert not (out / "final").exists() and not (out / "best").exists() and _debris(out) == []
    saved = load_file(str(Path(checkpoint) / "model" / "model.safetensors"))

    _leadkd("train", "--resume", *settings)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == list(range(1, 7))  # no step trained twice
    assert [row["step"] for row in logged if "eval" in row] == [6]
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    assert (out / "best").is_dir() and _debris(out) == []


def test_a_signal_in_the_quickstarts_final_evaluation_and_the_rerun_scores_every_model(setup, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    shutil.copy(data / "qrels" / "dev.tsv", data / "qrels" / "test.tsv")
    teacher = make_tiny_bert_folder(tmp_path / "teacher", layers=6, seed=5)  # the fast plan keeps 5 layers
    argv = ["quickstart", "--data", data, "--teacher", teacher, "--fast", "--output", tmp_path / "qs"]
    # the third model scored on test: two model cards already carry their figures
    status, lines, stderr = _signalled_at("leadkd.retrieval.pipeline:evaluate_layers", 3, argv, signal.SIGINT)
    assert status == 130, stderr[-3000:]
    assert len(lines) == 1 and OUTSIDE_LINE.match(lines[0]).groups() == ("SIGINT", None), stderr[-3000:]
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert not any(model.get("metrics") for model in results["models"]) and _debris(tmp_path / "qs") == []
    assert not (tmp_path / "qs" / "report.md").exists()
    rerun = _leadkd(*argv)
    assert "warm-up" not in rerun.stdout and "mining" not in rerun.stdout  # only the evaluation was left
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert all(model["metrics"] for model in results["models"]) and (tmp_path / "qs" / "report.md").is_file()
