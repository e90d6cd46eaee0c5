"""Map a per-batch function over the rows of JSONL files, in this process, in a pool of this machine's processes,
or on Ray Data, in row order.

Every stage that touches every row (dedup signatures, embeddings) is written as one function from a batch of JSONL
lines to a dict of numpy arrays.  `local` runs it here, batch by batch; `processes` in a pool of one process per
core (`ordered_map`); `ray` as Ray Data `map_batches` (tasks, or an actor pool when the function is a class that
loads a model once), on local Ray or a cluster.  All three yield the same arrays in the same order, which a test
checks.  `auto` picks by the input's size and the CPUs there are (`choose_engine`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BatchFn = Callable[[list[str]], dict[str, np.ndarray]]


MIN_RAY_CPUS = 8


def choose_engine(engine: str, n_rows: int, parallel_threshold: int) -> str:
    """`auto`: below `parallel_threshold` rows, in process; from it, Ray Data where it has at least 8 CPUs to
    spread over (the cluster a recipe runs on, or this machine), else a pool of this machine's processes where it
    has 2 cores or more.  On 2 cores, Ray Data's scheduling and serialisation cost more than the second core gives
    back; a process pool's do not (bench/curate.py measures all three)."""
    if engine != "auto":
        return engine
    if n_rows < parallel_threshold:
        return "local"
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else os.cpu_count() or 1
    return "ray" if cpus >= MIN_RAY_CPUS else "processes" if (os.cpu_count() or 1) > 1 else "local"


_worker_fn: Callable | None = None  # the function a pool worker process was started with (`_start_worker`)


def _start_worker(fn: Callable) -> None:
    import signal

    global _worker_fn
    _worker_fn = fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool, quietly


def _call_worker(item):
    return _worker_fn(item)


def ordered_map(fn: Callable, items: Iterable, workers: int | None = None) -> Iterator:
    """`fn(item)` for every item, in order, from a pool of `workers` processes (default: one per core), with at most
    two items a worker in flight, so a stream of items is never all held.  `fn` is sent once to each worker, which
    keeps it for every item (its caches stay warm).  Workers are forked where the OS can (as PyTorch's DataLoader
    does): spawned ones would re-run the caller's script unless it guards its `__main__`, and take a second each to
    import.  A fork copies the parent's memory but not its other threads, so `fn` must not wait on a lock one of
    them may hold; the stage functions here take none (logging's locks Python re-creates in the child)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or os.cpu_count() or 1
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
                               initargs=(fn,))
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(_call_worker, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ensure_ray() -> None:
    """Join the Ray a recipe runs in, or start a quiet local one (a `patho-r1 curate` command): Ray's and Ray
    Data's INFO lines stay off the console."""
    import logging

    import ray
    import ray.data  # configures Ray Data's logger on import; quieted after that

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False, logging_level=logging.WARNING)


def line_batches(files: list[Path], batch_size: int) -> Iterator[list[str]]:
    """The non-blank lines of each file, `batch_size` at a time (a file's last batch may be short)."""
    for path in files:
        batch: list[str] = []
        with open(path, encoding="utf-8") as fh:
            # a MiB of lines per call, and isspace (false at a row's first "{"): a third of the time of a loop over
            # the lines calling strip on each
            while chunk := fh.readlines(1 << 20):
                batch.extend(line for line in chunk if not line.isspace())
                while len(batch) >= batch_size:
                    yield batch[:batch_size]
                    del batch[:batch_size]
        if batch:
            yield batch


class _OnText:
    """Adapts a lines -> arrays function to Ray Data's `{"text": array}` batches."""

    def __init__(self, fn: BatchFn | type, constructor_kwargs: dict | None = None):
        self.fn = fn(**(constructor_kwargs or {})) if isinstance(fn, type) else fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn([str(x) for x in batch["text"]])


def _ray_batches(files: list[Path], fn: BatchFn | type, batch_size: int, concurrency: int | None,
                 constructor_kwargs: dict | None, num_gpus: float) -> Iterator[dict[str, np.ndarray]]:
    import ray
    import ray.data

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # our RowProgress reports; Ray's bars would fill the console
    for path in files:
        ds = ray.data.read_text(str(path))
        if isinstance(fn, type):  # a model: an actor pool loads it once per actor
            # None: an autoscaling pool, from one actor up to what the cluster's CPUs (or GPUs) hold
            pool = concurrency or (1, max(1, int(ray.cluster_resources().get("GPU" if num_gpus else "CPU", 1)
                                                 / (num_gpus or 1))))
            ds = ds.map_batches(_OnText, batch_size=batch_size, batch_format="numpy",
                                fn_constructor_args=(fn, constructor_kwargs), concurrency=pool,
                                num_gpus=num_gpus or None)
        else:
            ds = ds.map_batches(_OnText(fn), batch_size=batch_size, batch_format="numpy")
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def map_batches(files: list[Path], fn: BatchFn | type, *, engine: str, batch_size: int = 4096,
                concurrency: int | None = None, constructor_kwargs: dict[str, Any] | None = None,
                num_gpus: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
    """Yield `fn(lines)` over every line of `files`, in order.  `fn` may be a class (constructed with
    `constructor_kwargs` once per worker) for stateful work such as a model."""
    if engine == "ray":
        yield from _ray_batches(files, fn, batch_size, concurrency, constructor_kwargs, num_gpus)
    elif engine == "processes" and not isinstance(fn, type):
        yield from ordered_map(fn, line_batches(files, batch_size))
    else:  # a model (a class) runs here under `processes` too: loaded once, its library spreads over the cores
        yield from map(fn(**(constructor_kwargs or {})) if isinstance(fn, type) else fn,
                       line_batches(files, batch_size))
