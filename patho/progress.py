"""Row progress for long jobs (the curate stages, benchmark generation, judge requests): a rich bar with rate
and ETA on a terminal (the CLI), or throttled rows in a `metrics.jsonl` that the recipe runner's console follows (a
phase), or both, or nothing (tests).

A job calls `progress.advance(n)`; it never prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class RowProgress:
    def __init__(self, stage: str, total: int | None = None, *, metrics_file: Path | None = None,
                 show: bool = False, every_s: float = 0.5):
        self.stage, self.total, self.done = stage, total, 0
        self.metrics_file, self.every_s = metrics_file, every_s
        self.fields: dict = {}  # running totals a stage reports beside the rows (tokens in and out, cost)
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if show and _on_terminal():  # a bar in a pipe or a log file is noise; the summary line says it all
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"  {stage}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[extra]}"), transient=True)
            self._task = self._bar.add_task(stage, total=total, rate="", extra="")
            self._bar.start()

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        if self._bar is not None:
            extra = "  ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.fields.items())
            self._bar.update(self._task, completed=self.done, total=self.total, rate=f"{rate:,.1f} rows/s",
                             extra=extra)
        if self.metrics_file is not None:
            row = {"stage": self.stage, "step": self.done, "total": self.total, "unit": "rows",
                   "time": round(now - self.t0, 3), **self.fields}
            with self.metrics_file.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def close(self) -> float:
        """Stop; returns the seconds the stage took."""
        now = time.monotonic()
        self._emit(now)
        if self._bar is not None:
            self._bar.stop()
        return now - self.t0


def count_lines(path: Path) -> int:
    """Newlines in a file, counted in 1 MiB blocks (an ETA for a CSV or JSONL source before reading it)."""
    n = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def _on_terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal

