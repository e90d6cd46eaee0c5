"""Map a per-batch function over the rows of JSONL files, in this process or on Ray Data, in row order.

Every stage that touches every row (dedup signatures, embeddings) is written as one function from a batch of JSONL
lines to a dict of numpy arrays.  `local` runs it here, batch by batch; `ray` runs it as Ray Data `map_batches`
(tasks, or an actor pool when the function is a class that loads a model once), on local Ray or a cluster.  Both
yield the same arrays in the same order (`preserve_order`), which a test checks.  `auto` picks Ray for large
inputs on machines or clusters with enough CPUs (`choose_engine`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BatchFn = Callable[[list[str]], dict[str, np.ndarray]]


MIN_RAY_CPUS = 8


def choose_engine(engine: str, n_rows: int, ray_threshold: int) -> str:
    """`auto`: Ray Data from `ray_threshold` rows where it has at least 8 CPUs to spread over (the cluster a
    recipe runs on, or this machine); in process otherwise.  On 2 cores, Ray Data's scheduling and serialisation
    cost more than the second core gives back (bench/curate.py measures both)."""
    if engine != "auto":
        return engine
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else os.cpu_count() or 1
    return "ray" if n_rows >= ray_threshold and cpus >= MIN_RAY_CPUS else "local"


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


def _local_batches(files: list[Path], fn: BatchFn, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for path in files:
        batch: list[str] = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    batch.append(line)
                    if len(batch) == batch_size:
                        yield fn(batch)
                        batch = []
        if batch:
            yield fn(batch)


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
    else:
        yield from _local_batches(files, fn(**(constructor_kwargs or {})) if isinstance(fn, type) else fn,
                                  batch_size)
