"""What a user sees while a recipe runs, and where everything else goes.

* The console: one line when a phase starts and one when it ends, and between them a live progress display (phase,
  step/total, rate, ETA and the phase's headline metrics) drawn with rich on a terminal, or a plain line at each
  quarter of the phase when the output is a file or a pipe.
* `RUN/logs/`: `run.log` (the driver: our messages, Ray's, warnings), one `PHASE.rankN.log` per phase and worker
  (everything the worker process prints, C libraries included), and `ray/` (Ray's own session logs).
* `--verbose` puts everything back on the console, as before.

Progress comes from the files the phases write anyway: each training phase appends one row per log event to its
`metrics.jsonl` (step, total steps, metrics), and the driver reads new rows while the phase runs.  That works for a
worker on any node that writes to the run's (shared) output folder, and needs no extra channel between processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

logger = logging.getLogger("patho_r1")

# Libraries whose INFO lines are noise on a console; they go to the log files.
_NOISY = ("ray", "transformers", "datasets", "accelerate", "torch", "urllib3", "filelock", "httpx", "wandb", "peft")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives (a test harness may swap it)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


class _OnlyTo(logging.Filter):
    """A logger filter that hands each record to one handler and stops it there (the logger's own handlers and
    propagation never see it)."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


@contextlib.contextmanager
def driver_logging(log_dir: Path, verbose: bool) -> Iterator[Path]:
    """While a run lasts, route every logger to `log_dir/run.log` and keep the console for our own warnings and
    errors (everything with `verbose`).  Library warnings (`warnings.warn`, Deprecation and Future warnings
    included) are logged, not printed.  Yields the log file's path; restores the logging setup afterwards."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "run.log"
    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in _NOISY}
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = _StderrHandler()
    to_console.setLevel(logging.INFO if verbose else logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_console.addFilter(lambda record: verbose or record.name.startswith("patho_r1"))
    root.addHandler(to_file)
    root.addHandler(to_console)
    # DeepSpeed's logger prints to stdout through its own handler, and does not propagate: when transformers first
    # imports it (saving a model) it announces "Setting accelerator to CPU".  A filter on that logger (it keeps
    # filters added before DeepSpeed creates it) sends its records to the file instead.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_to_file = _OnlyTo(to_file)
    if not verbose:
        deepspeed_logger.addFilter(deepspeed_to_file)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # transformers prints through a handler of its own, so its INFO lines (a tiny model saved while preparing the
    # run) would reach the console; route them through ours (the file) instead
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    logging.captureWarnings(True)
    if not verbose:  # Hugging Face progress bars (weights written, datasets cast) are not the run's progress
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # transformers read its setting when it was imported; its "Writing model shards" bar (a tiny model saved
        # while preparing the run) would reach the console
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # every warning once per place, into the log
            yield path
    finally:
        logging.captureWarnings(False)
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        if not verbose and bars_were_on:
            with warnings.catch_warnings():  # huggingface_hub warns that the variable set above keeps its bars off
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()
        root.removeHandler(to_file)
        root.removeHandler(to_console)
        deepspeed_logger.removeFilter(deepspeed_to_file)
        to_file.close()
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def route_ray_logging_to_file() -> None:
    """Ray's driver-side logger prints through its own console handler; send its records to ours (the file)."""
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True


@contextlib.contextmanager
def worker_output(log_file: Path | None) -> Iterator[None]:
    """Inside a Ray worker: send everything the process prints (file descriptors 1 and 2, so C/C++ libraries too)
    and every log record to `log_file`, then restore the descriptors (Ray reuses task workers).  None: leave the
    output alone (`--verbose`)."""
    if log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    handler = None
    if not root.handlers:  # Ray's worker has one, writing to stderr: the log file now
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # transformers prints through its own handler; send it to ours
        hf_logging.enable_propagation()
    except ImportError:
        pass
    try:
        yield
    except BaseException:
        traceback.print_exc()  # the full traceback belongs in this log; Ray reports the error itself to the driver
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if handler is not None:
            root.removeHandler(handler)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class MetricsTail:
    """Reads the rows a phase appends to its `metrics.jsonl` since the last call (rows already there when it starts,
    from an earlier attempt that is being resumed, are not this run's progress)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0

    def new_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a row being written is read next time
        self.offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows


def format_metrics(row: dict, keys: tuple[str, ...]) -> str:
    shown = []
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            shown.append(f"{key.removeprefix('rewards/').removeprefix('dynamic_sampling/')}={value:.3g}")
    return " ".join(shown)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        unit = task.fields.get("unit", "step")
        return Text((f"{task.speed:,.0f} {unit}/s" if task.speed > 100 else f"{task.speed:.2f} {unit}/s")
                    if task.speed else "")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class RunConsole:
    """The console of one `patho-r1 run`."""

    def __init__(self, verbose: bool = False, console: Console | None = None, poll_s: float = 0.5):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.verbose = verbose
        self.poll_s = poll_s

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)

    @contextlib.contextmanager
    def phase_progress(self, name: str, metrics_file: Path | None, headline: tuple[str, ...]) -> Iterator[None]:
        """While the body runs, follow `metrics_file` and show the phase's progress."""
        if metrics_file is None or self.verbose:  # verbose: the phase's own progress lines are on the console
            yield
            return
        tail, stop = MetricsTail(metrics_file), threading.Event()
        if self.console.is_terminal:
            progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("{task.fields[metrics]}"), console=self.console, transient=True)
            task = progress.add_task(name, total=None, metrics="", unit="step")

            def update(row: dict) -> None:
                progress.update(task, completed=row["step"], total=row.get("total") or None,
                                description=f"{name}{':' + row['stage'] if row.get('stage') else ''}",
                                metrics=format_metrics(row, headline), unit=row.get("unit", "step"))
            context = progress
        else:
            reported: set[tuple] = set()
            first: dict = {}  # stage -> its first row (embed counts steps per stage)

            def update(row: dict) -> None:
                total, step = row.get("total") or 0, row["step"]
                ref = first.setdefault(row.get("stage"), row)
                quarter = (row.get("stage"), int(4 * step / total) if total else 0)
                if not total or quarter[1] in (0, 4) or quarter in reported:
                    return
                reported.add(quarter)
                # the phase's own clock (`time`: seconds since it started logging), not when the row was read
                if step > ref["step"] and row.get("time", 0) > ref.get("time", 0):
                    rate = (step - ref["step"]) / (row["time"] - ref["time"])
                else:
                    rate = step / max(row.get("time") or 0.0, 1e-3)
                eta = (total - step) / rate if rate > 0 else 0.0
                stage = f":{row['stage']}" if row.get("stage") else ""
                unit = row.get("unit", "step")
                self.line(f"  {name}{stage} {unit} {step}/{total} ({100 * step // total}%) {rate:.2f} {unit}/s "
                          f"ETA {_clock(eta)}  {format_metrics(row, headline)}")
            context = contextlib.nullcontext()

        def follow() -> None:
            while not stop.wait(self.poll_s):
                for row in tail.new_rows():
                    if "step" in row:
                        update(row)

        with context:
            thread = threading.Thread(target=follow, name="patho-r1-progress", daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
