"""A ``.npy`` array on disk read through a memory map and written row by row with ``os.pwrite``.

Why positional writes rather than writing through the memory map: a full disk is then an ``OSError`` (one
line naming the file) instead of a SIGBUS in the middle of a step. Why ``.npy``: the header says the
shape and dtype, so ``numpy.load(mmap_mode="r")`` or any other tool reads the file without leadkd. Rows
never written are sparse holes (zeros) where the filesystem has them. The caches that use it (the
teacher's vectors, the teacher's scores) keep a checksum per row, so what a crash or a flipped byte
leaves is found by the reader, not here.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from .errors import LeadkdError


def readable_size(path: Path, dtype, shape: tuple[int, ...]) -> int | None:
    """The size ``path`` must have for its header's array, or None when that header is not ``shape`` x
    ``dtype`` (unreadable, cut inside, or another array)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            found, fortran, kind = read[version](handle)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError, EOFError, KeyError):
        return None
    if tuple(found) != shape or fortran or np.dtype(kind) != np.dtype(dtype):
        return None
    return offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class RowFile:
    """One array of ``shape`` (rows first), created empty when ``fresh`` or when its header is damaged.

    An existing file cut short is grown back to its size, so its missing rows read as zeros (unwritten);
    ``what`` and ``hint`` make a failed write's one line (``<file>: cannot write <what> (<reason>); <hint>``).
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], fresh: bool, what: str, hint: str):
        size = None if fresh else readable_size(path, dtype, shape)
        if size is None:
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        elif os.path.getsize(path) < size:
            os.truncate(path, size)
        self.array = np.load(path, mmap_mode="r")
        self.offset = self.array.offset
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        self.path = path
        self.what, self.hint = what, hint
        self.fd = os.open(path, os.O_RDWR)

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` to row ``rows[i]``; consecutive rows go out in one call."""
        values = np.ascontiguousarray(values, dtype=self.array.dtype)
        rows = np.asarray(rows, dtype=np.int64)
        try:
            start = 0
            while start < len(rows):  # runs of consecutive rows, one pwrite each
                end = start + 1
                while end < len(rows) and rows[end] == rows[end - 1] + 1:
                    end += 1
                self._write_at(self.offset + int(rows[start]) * self.row_bytes, values[start:end].tobytes())
                start = end
        except OSError as exc:
            raise LeadkdError(f"{self.path}: cannot write {self.what} ({exc.strerror or exc}); {self.hint}") from exc

    def _write_at(self, position: int, payload: bytes) -> None:
        data = memoryview(payload)
        while data:  # a nearly full disk may take part of a write without an error; finish or raise
            written = os.pwrite(self.fd, data, position)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data, position = data[written:], position + written

    def sync(self) -> None:
        """Make every written row durable (before a file that claims them complete is written)."""
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
