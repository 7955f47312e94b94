"""One writer per output folder: a lock file that a second run on the same folder is refused by.

Two runs writing one folder interleave checkpoints, logs and ``final/`` into something neither made. A run
(``train``, ``distill``, ``compare``, ``quickstart``) therefore holds ``<output>/.leadkd.lock`` while it works,
and a second run on that folder stops with one line naming the holder: its PID, host and start time.

How the lock is taken, and why two mechanisms:

- **Atomic create** (``os.open`` with ``O_CREAT | O_EXCL``): exactly one process creates the file, on every
  filesystem including NFS. The file holds a JSON record (PID, host, boot id, the process's start time,
  when). This is what decides who holds the folder, and what the refusal quotes.
- **flock** on the open lock file, where the system offers it: the kernel drops it the moment the holder dies,
  however it dies (SIGKILL, OOM killer), and it sees holders the PID check cannot (another PID namespace,
  e.g. a container sharing the folder). It is only ever extra evidence that the holder is alive: flock is a
  no-op or local-only on some network filesystems, so its absence never proves a holder dead by itself.

A lock file left behind (the holder was killed, so its ``finally`` never ran) is judged from its record:

- **Same host** (same hostname): the holder is alive if nobody can take the file's flock, or if its PID
  exists (``os.kill(pid, 0)``), is not a zombie, and - on Linux, against PID reuse - started at the same
  time as recorded (``/proc/<pid>/stat`` field 22, in clock ticks since boot; a different boot id means the
  machine restarted, so the holder is gone). A dead holder's lock is taken over with a warning.
- **Another host**: nothing here can see whether that process still runs, so the run is refused with the
  lock's path to delete once the user knows it has ended. No timeout or heartbeat guesses for them: a slow
  or paused run must never find a second writer in its folder.
- **A file that is not a lock record** (empty after a second's wait, not JSON, missing fields) is refused with
  one line naming it; leadkd never deletes a file it cannot read.

Taking over is safe against a second contender doing the same: the stale file's flock is held while checking
that the path still names that file, and only then is it unlinked and the atomic create tried again (where
flock is unavailable two contenders could, in a narrow window, both take over the same stale lock).

Under torchrun only global rank 0 (environment ``RANK``, where ``WORLD_SIZE`` > 1) takes the lock, before
the process group exists: if it is refused it exits, and torchrun stops the other processes waiting for it.
A file shared by runs with different folders (``compare``'s ledger outside its output folder) is held the
same way by ``.<name>.lock`` beside it (:func:`file_lock`).
Locks nest by folder: ``compare`` and ``quickstart`` hold their own folder while each job they run holds its
own sub-folder, and a process that already holds a folder may enter it again, so nothing waits on itself.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LeadkdError

try:  # not on Windows: the atomic create and the PID record still work there
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLockError", "LockRecord", "output_lock", "file_lock", "takes_the_lock", "read_record",
           "holder_is_alive"]

LOCK_NAME = ".leadkd.lock"

#: How long a freshly created lock file may be empty or half-written before it counts as malformed: its
#: creator writes the record right after the create.
_RECORD_WAIT_S = 1.0


class RunLockError(LeadkdError):
    """The output folder is held by another run, or its lock file cannot be read."""


@dataclass(frozen=True)
class LockRecord:
    """What a lock file says about its holder."""

    pid: int
    host: str
    started: float  # seconds since the epoch
    boot_id: str | None = None
    proc_start: int | None = None  # /proc/<pid>/stat field 22, where there is a /proc

    def since(self) -> str:
        return datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")

    def to_json(self) -> str:
        return json.dumps({"leadkd_lock": 1, "pid": self.pid, "host": self.host, "started": self.started,
                           "since": datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(),
                           "boot_id": self.boot_id, "proc_start": self.proc_start}) + "\n"


# --------------------------------------------------------------------------- facts about processes

def _host() -> str:
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name in (...) may hold spaces; field 3 follows it
    try:
        return fields[0], int(fields[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None


def _current_record() -> LockRecord:
    stat = _proc_stat(os.getpid())
    return LockRecord(pid=os.getpid(), host=_host(), started=time.time(), boot_id=_boot_id(),
                      proc_start=stat[1] if stat else None)


def holder_is_alive(record: LockRecord) -> bool:
    """Whether the process a same-host record names still runs (the flock aside); see the module docstring."""
    here = _boot_id()
    if record.boot_id and here and record.boot_id != here:
        return False  # the machine restarted since
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OverflowError:
        return False
    stat = _proc_stat(record.pid)
    if stat is None:
        return True  # no /proc: the PID exists, and that is all we can know
    state, start = stat
    if state == "Z":
        return False  # exited, not yet reaped
    return record.proc_start is None or start == record.proc_start


# --------------------------------------------------------------------------- the lock file

def _flock(fd: int) -> bool | None:
    """Try to take the file's flock: True taken, False held by someone else, None no flock here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL...: this filesystem has no flock


def _parse(path: Path, text: str) -> LockRecord:
    def bad(why: str) -> RunLockError:
        return RunLockError(f"{path}: not a leadkd lock file ({why}); if no leadkd run is using {path.parent}, "
                            "delete it")

    try:
        data = json.loads(text)
    except ValueError:
        raise bad("empty" if not text.strip() else "not JSON") from None
    if not isinstance(data, dict) or data.get("leadkd_lock") != 1:
        raise bad("no 'leadkd_lock': 1")
    pid, host, started = data.get("pid"), data.get("host"), data.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise bad(f"field 'pid' is {pid!r}")
    if not isinstance(host, str) or not host:
        raise bad(f"field 'host' is {host!r}")
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        raise bad(f"field 'started' is {started!r}")
    boot_id, proc_start = data.get("boot_id"), data.get("proc_start")
    return LockRecord(pid, host, float(started), boot_id if isinstance(boot_id, str) else None,
                      proc_start if isinstance(proc_start, int) and not isinstance(proc_start, bool) else None)


def read_record(path: str | os.PathLike, wait_s: float | None = None) -> LockRecord:
    """The record in lock file ``path``; waits up to ``wait_s`` (default 1 s) for a creator still writing it."""
    path = Path(path)
    deadline = time.monotonic() + (_RECORD_WAIT_S if wait_s is None else wait_s)
    while True:
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            return _parse(path, text)
        except RunLockError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _refusal(folder: Path, lock: Path, record: LockRecord, option: str) -> RunLockError:
    holder = f"{folder} is in use by pid {record.pid} on {record.host} since {record.since()} (its lock {lock})"
    if record.host != _host():
        return RunLockError(f"{holder}; leadkd cannot see from {_host()} whether it still runs: wait for it, "
                            f"or delete {lock} once it has ended")
    return RunLockError(f"{holder}; wait for it or choose another {option}")


@dataclass
class _Held:
    fd: int
    path: Path


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def _close_in_forked_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: a flock lives while any copy is open."""
    for held in _held.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def _create(lock: Path) -> int | None:
    """Atomically create ``lock`` holding this process's record; None if it exists already."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, _current_record().to_json().encode())  # first: a contender reading it waits for this
        os.fsync(fd)
        deadline = time.monotonic() + 2.0
        while _flock(fd) is False and time.monotonic() < deadline:  # a contender is peeking at the new file
            time.sleep(0.01)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise
    return fd


def _try_take_over(folder: Path, lock: Path, option: str) -> bool:
    """Judge an existing lock: raise if its holder lives (or cannot be judged); remove it if dead.

    Returns False when the file vanished or changed meanwhile (try again), True once a stale one is removed.
    """
    try:
        fd = os.open(lock, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        record = read_record(lock)  # before the flock: a creator still writing must not wait for us
        flocked = _flock(fd)
        if flocked is False:
            raise _refusal(folder, lock, record, option)  # the kernel says its holder lives
        if record.host != _host() or holder_is_alive(record):
            raise _refusal(folder, lock, record, option)
        try:
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                return False  # someone replaced it meanwhile: look again
        except FileNotFoundError:
            return False
        os.unlink(lock)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    warnings.warn(f"{lock}: taking over the lock of pid {record.pid} on {record.host} (since {record.since()}), "
                  "which no longer runs", RuntimeWarning, stacklevel=2)
    return True


def takes_the_lock() -> bool:
    """Only torchrun's global rank 0 (or a plain process) locks: it is the one that writes the folder.

    Read from the environment, as :mod:`leadkd.runtime.distributed` does (``WORLD_SIZE`` decides whether a process is
    one of several), because the lock is taken before the process group exists.
    """
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return True  # distributed.py reports the bad variable; meanwhile lock rather than risk two writers
    return not several or rank == 0


def _release(held: _Held) -> None:
    try:
        if os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:  # still ours: never delete a successor's
            os.unlink(held.path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(held.fd)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, option: str = "output folder") -> Iterator[Path | None]:
    """Hold ``folder`` (created if missing) for this run; yields the lock file's path, None on ranks > 0.

    Raises :class:`RunLockError` (one line) when a live run holds it. ``option`` names what the user would
    change to write elsewhere (``--output``, ``output_dir``). Released on every exit, exceptions included;
    a folder this call created is removed again if the run left it empty.
    """
    folder = Path(folder)
    with _hold(folder, folder, LOCK_NAME, option) as lock:
        yield lock


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, option: str = "file") -> Iterator[Path | None]:
    """Hold one file that runs with different output folders may share (``compare``'s ledger kept outside
    its output folder): the lock is ``.<name>.lock`` beside it, taken and judged as :func:`output_lock`'s."""
    path = Path(path)
    with _hold(path, path.parent, f".{path.name}.lock", option) as lock:
        yield lock


@contextlib.contextmanager
def _hold(subject: Path, folder: Path, name: str, option: str) -> Iterator[Path | None]:
    """Take ``folder/name`` for ``subject`` (what the refusal says is in use)."""
    if not takes_the_lock():
        yield None
        return
    key = folder.resolve() / name
    with _held_guard:
        nested = _held.get(key)
    if nested is not None:  # this process holds it already (a job run in its caller's folder): the outer one releases
        yield nested.path
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    fd = None
    try:
        for _ in range(20):  # each round ends in a create, a refusal, or a file that changed under us
            fd = _create(lock)
            if fd is not None:
                break
            _try_take_over(subject, lock, option)
        else:
            raise RunLockError(f"{lock}: could not take the lock (it keeps changing); is another run starting "
                               f"in {folder}?")
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    held = _Held(fd, lock)
    with _held_guard:
        _held[key] = held
    try:
        yield lock
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(held)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run refused before it wrote anything leaves no trace
