"""Parallel scoring with a hard per-sample time limit, so one slow or hanging verifier never stalls a training step.

`VerifierPool` runs a picklable function over many argument tuples in worker processes (pebble's `ProcessPool`,
which kills and replaces a worker whose task overruns its timeout).  A sample that times out or raises gets the
`default` value and is counted.  `workers=0` runs inline in the calling process: no hard limit, no process overhead;
use it for cheap verifiers and in tests of the verifier itself.

Workers are started with the `spawn` method: forking a process that holds torch, Ray or vLLM threads can deadlock.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    last_error: str | None = field(default=None, repr=False)


class VerifierPool:
    def __init__(self, workers: int = 2, timeout: float = 5.0, max_tasks_per_worker: int = 10_000):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.workers = workers
        self.timeout = timeout
        self.max_tasks_per_worker = max_tasks_per_worker
        self.stats = PoolStats()
        self._pool = None

    def _ensure_pool(self):
        if self._pool is None and self.workers > 0:
            from pebble import ProcessPool

            self._pool = ProcessPool(
                max_workers=self.workers,
                max_tasks=self.max_tasks_per_worker,
                context=multiprocessing.get_context("spawn"),
            )
        return self._pool

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], default: Any = 0.0) -> list[Any]:
        """`[fn(*args) for args in calls]`, in parallel; timeouts and exceptions become `default`."""
        self.stats.calls += len(calls)
        pool = self._ensure_pool()
        if pool is None:
            return [self._inline(fn, args, default) for args in calls]
        futures = [pool.schedule(fn, args=args, timeout=self.timeout) for args in calls]
        out = []
        for args, fut in zip(calls, futures, strict=True):
            try:
                out.append(fut.result())
            except FutureTimeout:
                self.stats.timeouts += 1
                logger.warning("verifier %s timed out after %.1fs on %r", getattr(fn, "__name__", fn), self.timeout,
                               _short(args))
                out.append(default)
            except Exception as exc:  # a worker that raised or died: score the sample as default, keep going
                self._error(fn, args, exc)
                out.append(default)
        return out

    def _inline(self, fn, args, default):
        try:
            return fn(*args)
        except Exception as exc:
            self._error(fn, args, exc)
            return default

    def _error(self, fn, args, exc: Exception) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        if self.stats.errors == 1 or self.stats.errors % 100 == 0:  # a worker that died shows up here too
            logger.warning("verifier %s failed (%d so far) on %r: %s", getattr(fn, "__name__", fn), self.stats.errors,
                           _short(args), self.stats.last_error)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=5)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # a pool handle does not cross process boundaries; the copy starts its own
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _short(args: tuple, n: int = 80) -> str:
    text = repr(args)
    return text if len(text) <= n else text[: n - 3] + "..."
