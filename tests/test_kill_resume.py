"""Crash exactness: `leadkd distill` / `leadkd train` killed with SIGKILL at a random step after the first
checkpoint, then rerun with ``--resume``, end with the same weights as an uninterrupted run (within 1e-6).

The models keep their dropout (0.1): the resumed run must restore the RNG states as well as the weights,
optimizers, schedulers, data position and layer schedule. Each run is a real subprocess of the console script.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.distill.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow  # ~6 subprocesses that each import torch and transformers

STEPS = 8


def _script() -> str:
    script = shutil.which("leadkd", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    assert script is not None, "the `leadkd` console script is not installed (pip install -e .)"
    return script


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    return {"teacher": make_tiny_bert_folder(root / "teacher", layers=4, seed=5, dropout=0.1),
            "model": make_tiny_bert_folder(root / "model", layers=2, seed=3, dropout=0.1),
            "data": make_tiny_beir(root / "data"), "groups": make_tiny_groups(root / "groups.jsonl")}


def _argv(kind: str, setup, output: Path) -> list[str]:
    if kind == "distill":
        values = {"teacher.path": setup["teacher"], "teacher.max_query_length": 16, "teacher.max_passage_length": 32,
                  "student.init": "teacher_layers=[0,2]", "student.max_query_length": 16,
                  "student.max_passage_length": 32, "layers.k": 2, "layers.resample_every": 1}
    else:
        values = {"model.path": setup["model"], "model.max_query_length": 16, "model.max_passage_length": 32}
    values.update({"data.corpus": setup["data"], "data.train_groups": setup["groups"], "data.num_negatives": 4,
                   "optim.steps": STEPS, "optim.batch_size": 4, "optim.lr": 1e-3, "checkpoint.every": 1,
                   "checkpoint.keep_last": 3, "eval.split": "null", "log_every": 1, "output_dir": output})
    return [_script(), "--threads", "1", kind, *[f"{key}={value}" for key, value in values.items()]]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _newest_step(output: Path) -> int:
    found = list_checkpoints(output / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


def _kill_after(argv: list[str], output: Path, step: int) -> int:
    """Start the job, SIGKILL it once checkpoint ``step`` exists; returns the newest step seen at the kill."""
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while _newest_step(output) < step:
            if proc.poll() is not None:
                pytest.fail(f"the job ended (status {proc.returncode}) before checkpoint {step}:\n"
                            f"{proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint in 240 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the job was not killed (status {proc.returncode})"
    assert not (output / "final").exists(), "the job finished before the kill; the test proved nothing"
    return _newest_step(output)


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6,
                                   msg=lambda m: f"{a.name}/{key}: {m}")  # noqa: B023  (called at once)


@pytest.mark.parametrize("kind", ["distill", "train"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(kind, setup, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_argv(kind, setup, straight))

    step = random.Random().randint(1, STEPS - 3)  # any step after the first checkpoint, well before the end
    seen = _kill_after(_argv(kind, setup, killed), killed, step)
    assert seen >= step
    argv = _argv(kind, setup, killed)
    _run(argv[:4] + ["--resume"] + argv[4:])

    for folder in (["final", "final-teacher"] if kind == "distill" else ["final"]):
        _assert_same(straight / folder, killed / folder)
    # The log of the resumed run is the uninterrupted one: each step once, in order.
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS, f"killed after checkpoint {step} (newest {seen}): {len(steps)} logged steps"
