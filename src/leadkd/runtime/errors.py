"""User-facing errors.

Every problem a user can fix (a bad file, a bad option) is raised as a :class:`LeadkdError`; the CLI
prints its message as one line on stderr and exits non-zero, without a traceback (unless ``--debug``).
Anything else is a bug in leadkd and keeps its traceback.
"""

from __future__ import annotations

import os


class LeadkdError(Exception):
    """An error the user can fix; its message is a complete, single-line explanation."""


class InputError(LeadkdError):
    """A malformed input file, located as precisely as possible: ``file:line: field 'x': message``."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field {field!r}: " if field else ""  # repr: a field name can never break the one line
        super().__init__(f"{where}: {what}{message}")


class ConfigError(LeadkdError):
    """An invalid option or configuration value."""
