"""Errors that mean "your input is wrong", as opposed to bugs.  The CLI prints these in one line, without a
traceback."""

from __future__ import annotations

from pathlib import Path


class PathoError(Exception):
    """Base of user-facing errors."""


class DataError(PathoError, ValueError):
    """Bad data, located: `file:row: field 'x': what is wrong`.  Rows are 1-based (the line number in JSONL)."""

    def __init__(self, path: str | Path, row: int | None, field: str | None, message: str):
        self.path, self.row, self.field, self.message = str(path), row, field, message
        where = self.path if row is None else f"{self.path}:{row}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")

    def __reduce__(self):  # picklable with its fields, so it crosses process and Ray task boundaries whole
        return DataError, (self.path, self.row, self.field, self.message)


class ConfigError(PathoError, ValueError):
    """A bad config or recipe; the message lists every bad field, with its location."""
