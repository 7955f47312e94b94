"""One writer per output folder (src/leadkd/runtime/run_lock.py): refusal of a live holder, takeover of a dead one.

Records are written here by hand (JSON, as a holder would), so the tests do not read the module's own
writer to decide what a lock file says; the subprocess tests race real processes for one folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import leadkd
from conftest import make_tiny_beir, make_tiny_bert_folder, make_tiny_groups
from leadkd.runtime import run_lock
from leadkd.runtime.run_lock import LOCK_NAME, RunLockError, output_lock, read_record

SRC = str(Path(leadkd.__file__).resolve().parents[1])
HOST = socket.gethostname()


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat, parsed here independently of the module."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.split(")")[-1].split()[19])


def _write_record(folder: Path, pid: int, host: str = HOST, started: float | None = None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    record = {"leadkd_lock": 1, "pid": pid, "host": host, "started": started or time.time(), **extra}
    lock.write_text(json.dumps(record))
    return lock


def _dead_pid() -> int:
    """A PID no process can have: above the kernel's maximum."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2 ** 22 + 1


@pytest.fixture()
def sleeper():
    """A live process on this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def no_wait_for_half_written_records(monkeypatch):
    monkeypatch.setattr(run_lock, "_RECORD_WAIT_S", 0.05)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# --------------------------------------------------------------------------- in one process

def test_a_run_holds_a_record_of_itself_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "run"
    with output_lock(folder) as lock:
        assert lock == folder / LOCK_NAME
        data = json.loads(lock.read_text())
        assert (data["pid"], data["host"]) == (os.getpid(), HOST)
        assert abs(data["started"] - time.time()) < 60
        (folder / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl"]
    with output_lock(tmp_path / "refused-before-writing"):
        pass
    assert not (tmp_path / "refused-before-writing").exists(), "a folder the lock created and nothing used stays"


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with output_lock(folder):
            raise KeyboardInterrupt
    assert not (folder / LOCK_NAME).exists()
    with output_lock(folder):  # and can be taken again
        pass


def test_a_live_holder_on_this_host_is_refused_even_when_its_lock_is_old(tmp_path, sleeper):
    folder = tmp_path / "run"
    year_ago = time.time() - 365 * 86400
    lock = _write_record(folder, sleeper.pid, started=year_ago, proc_start=_start_time(sleeper.pid))
    os.utime(lock, (year_ago, year_ago))
    with pytest.raises(RunLockError) as caught:
        with output_lock(folder, option="--output"):
            pytest.fail("entered a folder a live run holds")
    message = str(caught.value)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(year_ago))
    assert message == (f"{folder} is in use by pid {sleeper.pid} on {HOST} since {since} (its lock {lock}); "
                       "wait for it or choose another --output")
    assert json.loads(lock.read_text())["pid"] == sleeper.pid, "the holder's lock was touched"


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path):
    folder = tmp_path / "run"
    dead = _dead_pid()
    lock = _write_record(folder, dead)
    with pytest.warns(RuntimeWarning, match=f"taking over the lock of pid {dead} on {HOST}"):
        with output_lock(folder):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc: PID reuse cannot be seen")
def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path, sleeper):
    """The PID lives, but it is another process than the one that wrote the lock: it started at another time."""
    folder = tmp_path / "run"
    _write_record(folder, sleeper.pid, proc_start=_start_time(sleeper.pid) - 1)
    with pytest.warns(RuntimeWarning, match="taking over"):
        with output_lock(folder):
            pass
    _write_record(folder, sleeper.pid, proc_start=_start_time(sleeper.pid),
                  boot_id="an earlier boot of this machine")
    with pytest.warns(RuntimeWarning, match="taking over"):
        with output_lock(folder):
            pass


def test_a_flock_held_by_anyone_means_the_holder_lives_whatever_its_pid(tmp_path):
    """E.g. a holder in another PID namespace: its PID means nothing here, its flock does."""
    folder = tmp_path / "run"
    lock = _write_record(folder, _dead_pid())
    with open(lock) as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts even here
        with pytest.raises(RunLockError, match=f"is in use by pid {_dead_pid()} on {HOST}"):
            with output_lock(folder):
                pass
    assert lock.exists()


def test_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    folder = tmp_path / "run"
    lock = _write_record(folder, _dead_pid(), host="another-host.example", started=time.time() - 86400)
    with pytest.raises(RunLockError) as caught:
        with output_lock(folder):
            pass
    message = str(caught.value)
    assert f"in use by pid {_dead_pid()} on another-host.example since" in message
    assert f"delete {lock} once it has ended" in message and "\n" not in message
    assert lock.exists()


@pytest.mark.parametrize("content, why", [
    ("", "empty"),
    ("pid=12 host=a", "not JSON"),
    ('["leadkd_lock", 1]', "no 'leadkd_lock': 1"),
    ('{"leadkd_lock": 1, "pid": "12", "host": "a", "started": 1}', "field 'pid' is '12'"),
    ('{"leadkd_lock": 1, "pid": 12, "started": 1}', "field 'host' is None"),
    ('{"leadkd_lock": 1, "pid": 12, "host": "a", "started": "noon"}', "field 'started' is 'noon'"),
])
def test_a_file_that_is_not_a_lock_record_is_one_clear_line_and_kept(tmp_path, content, why):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(content)
    with pytest.raises(RunLockError) as caught:
        with output_lock(folder):
            pass
    assert str(caught.value) == (f"{folder / LOCK_NAME}: not a leadkd lock file ({why}); if no leadkd run is "
                                 f"using {folder}, delete it")
    assert (folder / LOCK_NAME).read_text() == content


def test_nested_folders_and_reentry_do_not_wait_on_themselves(tmp_path):
    outer, inner = tmp_path / "compare", tmp_path / "compare" / "dense" / "seed1"
    with output_lock(outer):
        with output_lock(inner):
            assert (outer / LOCK_NAME).exists() and (inner / LOCK_NAME).exists()
            with output_lock(outer):  # a job whose folder is its caller's
                pass
            assert (outer / LOCK_NAME).exists(), "the inner exit released the outer hold"
        assert not (inner / LOCK_NAME).exists()
    assert not (outer / LOCK_NAME).exists()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch, sleeper):
    folder = tmp_path / "run"
    lock = _write_record(folder, sleeper.pid, proc_start=_start_time(sleeper.pid))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with output_lock(folder) as taken:  # rank 0 holds it (here: the sleeper); rank 1 neither waits nor refuses
        assert taken is None
    for world, rank in (("2", "0"), ("1", "1")):  # RANK alone, outside a group of several, does not count
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(RunLockError):
            with output_lock(folder):
                pass
    assert lock.exists()


def test_read_record_parses_what_a_holder_writes(tmp_path):
    with output_lock(tmp_path / "run") as lock:
        record = read_record(lock)
    assert (record.pid, record.host) == (os.getpid(), HOST)
    assert record.proc_start in (None, _start_time(os.getpid()))


# --------------------------------------------------------------------------- real processes racing

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([SRC, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_WAIT_POLICY="PASSIVE")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


HOLDER = ("import sys, time\n"
          "from leadkd.runtime.run_lock import output_lock\n"
          "with output_lock(sys.argv[1]):\n"
          "    print('held', flush=True)\n"
          "    time.sleep(120)\n")


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _distill(root: Path, output: Path) -> subprocess.CompletedProcess:
    values = {"teacher.path": root / "teacher", "teacher.max_query_length": 16, "teacher.max_passage_length": 32,
              "student.init": "teacher_layers=[0,2]", "student.max_query_length": 16,
              "student.max_passage_length": 32, "data.corpus": root / "data",
              "data.train_groups": root / "groups.jsonl",
              "data.num_negatives": 3, "optim.steps": 2, "optim.batch_size": 4, "optim.lr": 1e-3, "layers.k": 2,
              "eval.split": "null", "log_every": 1, "output_dir": output}
    argv = [sys.executable, "-m", "leadkd.cli", "--threads", "1", "distill", *[f"{k}={v}" for k, v in values.items()]]
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    folder = tmp_path / "run"
    holder = _hold(folder)
    try:
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(folder)], env=_env(), capture_output=True,
                               text=True, timeout=60)
        assert probe.returncode != 0 and "held" not in probe.stdout
        assert f"{folder} is in use by pid {holder.pid} on {HOST} since" in probe.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).exists(), "SIGKILL runs no cleanup: the stale file stays for the next run"
    again = _hold(folder)  # the kernel dropped the flock and the PID is gone: taken over
    again.kill()
    again.wait()
    assert "taking over the lock of pid" in again.stderr.read()


RACER = ("import sys, time\n"
         "from leadkd.runtime.run_lock import RunLockError, output_lock\n"
         "while time.time() < float(sys.argv[2]): pass\n"  # all start together
         "try:\n"
         "    with output_lock(sys.argv[1]):\n"
         "        print('held', flush=True)\n"
         "        time.sleep(1)\n"
         "except RunLockError:\n"
         "    sys.exit(3)\n")


@pytest.mark.parametrize("stale", [False, True])
def test_of_processes_starting_together_exactly_one_gets_the_folder(tmp_path, stale):
    folder = tmp_path / "run"
    if stale:
        _write_record(folder, _dead_pid())
    start = str(time.time() + 0.7)
    racers = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", RACER, str(folder), start], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = [(proc.wait(timeout=60), proc.stdout.read().strip(), proc.stderr.read()) for proc in racers]
    for proc in racers:
        proc.stdout.close()
        proc.stderr.close()
    assert sorted(code for code, _, _ in outcomes) == [0, 3, 3, 3, 3, 3], outcomes
    assert [out for _, out, _ in outcomes].count("held") == 1
    assert not (folder / LOCK_NAME).exists()


def _tiny_job_held(tmp_path: Path):
    """A tiny teacher, data and groups in ``tmp_path``, and its output folder held by a live process."""
    make_tiny_bert_folder(tmp_path / "teacher", layers=4, seed=5)
    make_tiny_beir(tmp_path / "data")
    make_tiny_groups(tmp_path / "groups.jsonl")
    output = tmp_path / "run"
    return output, _hold(output)


@pytest.mark.slow  # three `leadkd distill` processes, each importing torch and transformers
def test_distill_is_refused_by_a_live_holder_and_takes_over_after_a_kill(tmp_path):
    output, holder = _tiny_job_held(tmp_path)
    try:
        refused = _distill(tmp_path, output)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines() == [
            (f"leadkd: error: {output} is in use by pid {holder.pid} on {HOST} since "
             f"{read_record(output / LOCK_NAME).since()} (its lock {output / LOCK_NAME}); "
             "wait for it or choose another output_dir")]
        assert sorted(p.name for p in output.iterdir()) == [LOCK_NAME], "the refused run wrote something"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finished = _distill(tmp_path, output)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"taking over the lock of pid {holder.pid} on {HOST}" in finished.stderr
    assert (output / "final").is_dir()
    assert not (output / LOCK_NAME).exists(), "a finished run left its lock behind"


@pytest.mark.slow  # torchrun with two processes
def test_under_torchrun_a_refused_rank_0_stops_the_others_instead_of_leaving_them_waiting(tmp_path):
    from conftest import free_port

    output, holder = _tiny_job_held(tmp_path)
    try:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "-m", "leadkd.cli", "distill", f"teacher.path={tmp_path / 'teacher'}",
                   "student.init=teacher_layers=[0,2]", f"data.corpus={tmp_path / 'data'}",
                   f"data.train_groups={tmp_path / 'groups.jsonl'}", "data.num_negatives=3", "optim.batch_size=2",
                   "optim.steps=2", "layers.k=2", "eval.split=null", f"output_dir={output}"]
        started = time.monotonic()
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
        assert result.returncode != 0
        assert f"{output} is in use by pid {holder.pid} on {HOST} since" in result.stderr
        assert time.monotonic() - started < 120, "the other rank waited for a rank 0 that had stopped"
        assert sorted(p.name for p in output.iterdir()) == [LOCK_NAME]
        assert json.loads((output / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
