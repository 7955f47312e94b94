"""Crash-safe file writes: write to a temporary name in the same folder, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a finished file gets the usual mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "\n") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: Files that mark a folder as something leadkd (or Hugging Face) wrote, and so may be replaced.
REPLACEABLE_MARKERS = ("meta.json", "leadkd_config.json", "config.json", "modules.json", "state.pt")


def check_replaceable(path: Path, markers: tuple[str, ...] = REPLACEABLE_MARKERS) -> None:
    """Refuse to replace a file, or a non-empty folder that none of ``markers`` identifies as ours.

    An output path that points at the user's own folder must never be deleted by a rewrite.
    """
    from .errors import LeadkdError

    if path.is_file() or path.is_symlink():
        raise LeadkdError(f"{path}: exists and is a file; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not any((path / name).exists() for name in markers):
        raise LeadkdError(f"{path}: exists and holds files leadkd did not write; refusing to replace it "
                          "(choose another output folder, or empty this one)")


def _fsync_files(folder: Path) -> None:
    """fsync every file under ``folder`` before it is renamed into place, as ``atomic_write`` does for one
    file: a disk that filled up only shows it when the data is written back (an ENOSPC here, not a short
    file after the rename), and a crash after the rename cannot leave the new name with empty files."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, markers: tuple[str, ...] = REPLACEABLE_MARKERS) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``path`` (the old one is removed).

    An existing ``path`` is replaced only if it is empty or holds one of ``markers`` (see
    :func:`check_replaceable`); that is checked before any work is done.
    """
    path = Path(path)
    check_replaceable(path, markers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_files(tmp)
        check_replaceable(path, markers)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: Signs of a failed write in the text of errors that are not ``OSError``: faiss's ``write_index`` raises a
#: RuntimeError carrying the OS error's text, torch.save one from its zip writer, safetensors a
#: SafetensorError carrying the OS error.
_WRITE_FAILURE_SIGNS = ("no space left", "disk quota", "write error", "file write failed", "unexpected pos",
                        "os error 28", "storagefull")


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write (a full disk, a quota, an I/O error), whichever library raised it."""
    return isinstance(exc, OSError) or any(sign in str(exc).lower() for sign in _WRITE_FAILURE_SIGNS)


_OS_WORDS = {os.strerror(code) for code in errno.errorcode}


def _os_words_at_the_end(message: str) -> str | None:
    """``strerror`` text a C++ library put in parentheses at the end of its message, if any."""
    found = re.search(r"\(([^()]+)\)\s*$", message)
    return found.group(1) if found and found.group(1) in _OS_WORDS else None


def write_failure_reason(exc: BaseException, path: str | os.PathLike, default: str | None = None) -> str:
    """The OS's words for a failed write (else ``default``, else the error's last line), with the free
    space left where ``path`` (or its nearest existing parent) lives."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    elif (words := _os_words_at_the_end(str(exc))) is not None:
        reason = words  # FAISS: "Error in ... write_index(...): write error in F: 4051 != 320000 (No space ...)"
    else:
        reason = default or str(exc).strip().splitlines()[-1]
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if existing is not None:
        try:
            reason += f"; {shutil.disk_usage(existing).free / 2**20:.1f} MiB free there"
        except OSError:
            pass
    return reason


def remove_tree(path: Path, aside: Path) -> None:
    """Delete the folder ``path`` so that a kill halfway leaves no half-deleted ``path``: it is renamed to
    ``aside`` first (one atomic rename; a stale ``aside`` from an earlier kill is cleared), then deleted."""
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def reporting_write_failures(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failed write of the output ``path`` (a full disk, a quota, an I/O error) into one
    :class:`~leadkd.runtime.errors.LeadkdError` line naming ``path``, not the temporary name beside it.

    Meant to wrap an :func:`atomic_write` or :func:`atomic_directory` block, which has already removed
    the partial file by the time the error is reported, and left an earlier complete ``path`` as it was.
    """
    from .errors import LeadkdError

    path = Path(path)
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LeadkdError) or not is_write_failure(exc):
            raise
        kept = "; the earlier one there is unchanged" if path.exists() else ""
        raise LeadkdError(f"{path}: cannot write the {what} ({write_failure_reason(exc, path)}){kept}") from exc
