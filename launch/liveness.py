"""Workers stop when their driver dies, and a new run never races an old run's workers.

A driver killed with SIGKILL cannot clean up.  Measured before this module: its Ray Train worker trained on for
1.6 s and wrote one more checkpoint, and two of Ray's own processes outlived it.  Three mechanisms:

- **The driver's lease.** The driver hands every worker its identity (pid, process start time, host) and, while the
  run lasts, touches a heartbeat file in the run folder.  Each worker runs a watchdog thread: on the driver's host
  it checks the driver process itself (pid and start time, so a reused pid does not count), elsewhere the heartbeat's
  age (the run folder is shared storage on a cluster).  When the driver is gone the worker exits at once, and an
  HF-Trainer phase also checks at every step end, so it never starts a checkpoint for a dead driver.
- **The worker registry.** Every worker writes `RUN/.workers/<host>-<pid>.json` and removes it when it ends.
- **Reaping.** A run, once it holds the run folder's lock, stops every registered process of an earlier run that is
  still alive on this host (workers, and the local Ray processes an earlier driver started), before it starts its
  own.  Nothing of the killed run can then write into the folder the resumed run is using.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

REGISTRY = ".workers"
HEARTBEAT = ".driver-heartbeat"
RAY_PROCESSES = ".ray-processes.json"
HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_STALE_S = 15.0  # a driver on another host is dead when its heartbeat is this old


def _identity(pid: int | None = None) -> dict:
    proc = psutil.Process(pid or os.getpid())
    return {"pid": proc.pid, "create_time": proc.create_time(), "host": socket.gethostname()}


def _alive(entry: dict) -> bool:
    """The recorded process still runs on this host (the same process: its start time matches, not a reused pid)."""
    try:
        return abs(psutil.Process(entry["pid"]).create_time() - entry["create_time"]) < 1e-3
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The driver side
# ----------------------------------------------------------------------------------------------------------------------

class DriverLease:
    """The running driver: its identity for the workers, and a heartbeat in the run folder while it lasts."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.identity = {**_identity(), "run_dir": str(self.run_dir)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverLease:
        beat = self.run_dir / HEARTBEAT

        def loop() -> None:
            while not self._stop.is_set():
                beat.write_text(json.dumps({**self.identity, "time": time.time()}))
                self._stop.wait(HEARTBEAT_EVERY_S)

        self._thread = threading.Thread(target=loop, daemon=True, name="patho-r1-heartbeat")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        (self.run_dir / HEARTBEAT).unlink(missing_ok=True)


def record_local_ray(run_dir: str | Path) -> None:
    """The processes of the local Ray this driver started, so that a later run can stop them if this one dies."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    pids = []
    for infos in (getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            if getattr(info, "process", None) is not None:
                pids.append(info.process.pid)
    entries = []
    for pid in pids:
        try:
            entries.append(_identity(pid))
        except psutil.NoSuchProcess:
            continue
    (Path(run_dir) / RAY_PROCESSES).write_text(json.dumps(entries))


def forget_local_ray(run_dir: str | Path) -> None:
    (Path(run_dir) / RAY_PROCESSES).unlink(missing_ok=True)


def reap_orphans(run_dir: str | Path, grace_s: float = 5.0) -> list[dict]:
    """Stop the processes an earlier run of this folder left alive on this host; returns what was stopped.  Call it
    holding the run folder's lock, before starting workers: every live registered process is then an orphan."""
    run_dir = Path(run_dir)
    host = socket.gethostname()
    entries: list[tuple[Path | None, dict]] = []
    registry = run_dir / REGISTRY
    for path in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        try:
            entries.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
    ray_file = run_dir / RAY_PROCESSES
    if ray_file.is_file():
        try:
            entries += [(None, {**e, "role": "local ray"}) for e in json.loads(ray_file.read_text())]
        except json.JSONDecodeError:
            pass
    live = [e for _, e in entries if e.get("host") == host and _alive(e)]
    for e in live:
        try:
            os.kill(e["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(e) for e in live):
        time.sleep(0.1)
    for e in live:
        if _alive(e):
            try:
                os.kill(e["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    for path, e in entries:  # this host's entries are dead now; another host's are that host's to reap
        if path is not None and e.get("host") == host:
            path.unlink(missing_ok=True)
    ray_file.unlink(missing_ok=True)
    return live


# ----------------------------------------------------------------------------------------------------------------------
# The worker side
# ----------------------------------------------------------------------------------------------------------------------

def driver_alive(driver: dict, by_pid: bool | None = None) -> bool:
    """By the driver's process when `by_pid` (default: when it runs on this host), else by its heartbeat's age."""
    if by_pid if by_pid is not None else driver.get("host") == socket.gethostname():
        return _alive(driver)
    beat = Path(driver["run_dir"]) / HEARTBEAT
    try:
        return time.time() - beat.stat().st_mtime < HEARTBEAT_STALE_S
    except FileNotFoundError:
        return False


def _stop_worker(driver: dict) -> None:
    print(f"[patho-r1] the driver (pid {driver['pid']} on {driver['host']}) is gone; this worker stops now",
          file=sys.stderr, flush=True)
    os._exit(70)  # no cleanup that could write into the run folder: a resumed run owns it now


class WorkerLease:
    """Inside a worker: registered in the run folder, watching the driver, stopping the moment it is gone."""

    def __init__(self, driver: dict | None, role: str, interval_s: float = 0.25):
        self.driver, self.role, self.interval_s = driver, role, interval_s
        self._stop = threading.Event()
        self._entry: Path | None = None
        self._by_pid = False

    def check(self) -> None:
        """Exit now if the driver is gone (called at step ends too)."""
        if self.driver is not None and not driver_alive(self.driver, self._by_pid):
            _stop_worker(self.driver)

    def __enter__(self) -> WorkerLease:
        if self.driver is None:  # a phase run outside `patho-r1 run`: nobody to watch
            return self
        # by pid only when the driver is visible from here now: a container on the same host name but in its own
        # pid namespace cannot see it, and must not take that for its death
        self._by_pid = self.driver.get("host") == socket.gethostname() and _alive(self.driver)
        me = {**_identity(), "role": self.role, "started": time.time()}
        registry = Path(self.driver["run_dir"]) / REGISTRY
        registry.mkdir(parents=True, exist_ok=True)
        self._entry = registry / f"{me['host']}-{me['pid']}.json"
        self._entry.write_text(json.dumps(me))

        def watch() -> None:
            while not self._stop.wait(self.interval_s):
                self.check()

        threading.Thread(target=watch, daemon=True, name="patho-r1-driver-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._entry is not None:
            self._entry.unlink(missing_ok=True)
