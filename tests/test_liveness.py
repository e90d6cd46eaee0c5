"""Workers stop when their driver dies; a run reaps what a killed run left alive (launch/liveness.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from patho_r1.launch.liveness import (
    HEARTBEAT,
    RAY_PROCESSES,
    REGISTRY,
    DriverLease,
    _identity,
    driver_alive,
    reap_orphans,
)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_worker_exits_within_a_second_of_its_driver_dying(tmp_path):
    driver = _sleeper()
    identity = {**_identity(driver.pid), "run_dir": str(tmp_path)}
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        from patho_r1.launch.liveness import WorkerLease
        with WorkerLease(json.loads({json.dumps(json.dumps(identity))!s}), "sft rank 0"):
            print("registered", flush=True)
            time.sleep(60)
            print("survived", flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "registered"
    entry = json.loads(next((tmp_path / REGISTRY).glob("*.json")).read_text())
    assert entry["pid"] == worker.pid and entry["role"] == "sft rank 0"
    time.sleep(0.5)
    assert worker.poll() is None  # the driver lives: the worker goes on
    driver.kill()
    driver.wait()
    t0 = time.time()
    out, err = worker.communicate(timeout=10)
    assert time.time() - t0 < 1.5 and worker.returncode == 70
    assert "survived" not in out and "the driver" in err and "is gone" in err


def test_a_driver_invisible_from_the_worker_is_watched_by_its_heartbeat_not_taken_for_dead(tmp_path):
    """Same host name, another pid namespace (a container): the driver's pid is not visible, so the worker must go
    by the heartbeat, and stop only when that stops."""
    import socket

    unseen = {"pid": 2 ** 22 - 3, "create_time": 0.0, "host": socket.gethostname(), "run_dir": str(tmp_path)}
    with DriverLease(tmp_path) as lease:
        worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import json, time
            from patho_r1.launch.liveness import WorkerLease
            with WorkerLease(json.loads({json.dumps(json.dumps(unseen))!s}), "eval"):
                print("registered", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "registered"
        time.sleep(1.0)
        assert worker.poll() is None and lease.identity["pid"] == os.getpid()
    # the heartbeat file is gone with the lease: the worker stops
    assert worker.wait(timeout=5) == 70


def test_a_driver_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    remote = {"pid": 1, "create_time": 0.0, "host": "another-node", "run_dir": str(tmp_path)}
    assert not driver_alive(remote)  # no heartbeat at all
    with DriverLease(tmp_path):
        time.sleep(0.2)
        assert (tmp_path / HEARTBEAT).is_file() and driver_alive(remote)
    assert not (tmp_path / HEARTBEAT).exists()
    (tmp_path / HEARTBEAT).write_text("{}")
    old = time.time() - 60
    os.utime(tmp_path / HEARTBEAT, (old, old))
    assert not driver_alive(remote)  # a stale heartbeat: the driver is gone


def test_reaping_stops_a_killed_runs_live_processes_and_forgets_dead_ones(tmp_path):
    orphan, finished = _sleeper(), _sleeper()
    finished_identity = _identity(finished.pid)
    finished.kill()
    finished.wait()
    (tmp_path / REGISTRY).mkdir()
    for name, entry in (("orphan", _identity(orphan.pid)), ("finished", finished_identity),
                        ("reused", {**_identity(os.getpid()), "create_time": 1.0})):  # a pid now someone else's
        (tmp_path / REGISTRY / f"{name}.json").write_text(json.dumps(entry))
    ray_helper = _sleeper()  # a local Ray process the killed driver had started
    (tmp_path / RAY_PROCESSES).write_text(json.dumps([_identity(ray_helper.pid)]))
    stopped = reap_orphans(tmp_path, grace_s=2)
    assert sorted(e["pid"] for e in stopped) == sorted([orphan.pid, ray_helper.pid])
    assert orphan.wait(timeout=5) == -signal.SIGTERM and ray_helper.wait(timeout=5) == -signal.SIGTERM
    assert not list((tmp_path / REGISTRY).glob("*.json")) and not (tmp_path / RAY_PROCESSES).exists()
    assert reap_orphans(tmp_path) == []


def _steps(out, phase: str) -> list[int]:
    """The steps a phase logged (its metrics.jsonl, a torn last line left out), in order."""
    path = out / phase / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _checkpoints(out, phase: str) -> set[str]:
    return {p.name for p in (out / phase / "checkpoints").glob("checkpoint-*")}


def _complete(out, phase: str) -> bool:
    from patho_r1.checkpoint import read_manifest

    manifest = read_manifest(out / phase / "model")
    return bool(manifest and manifest.complete)


@pytest.mark.slow
def test_kill_anywhere_then_resume_loses_at_most_save_steps_redoes_nothing_and_ends_bit_identical(tmp_path):
    """The driver is killed at random moments (while preparing and starting Ray, at random training steps of each
    phase, right after a checkpoint or between two), alone (SIGKILL to the driver, not its process group: its Ray
    Train workers must notice) or with its whole process group, then resumed, until the run completes.  Every kill
    stops every worker within seconds (a driver killed alone: within 3 s, and at most the checkpoint being saved is
    written afterwards), loses at most `save_steps` steps of the phase it interrupts, no finished phase is redone,
    the resumed runs find nothing of the old ones running, every console stays quiet, no key reaches a file, and the
    final SFT weights equal those of a run that was never interrupted."""
    import random
    import re

    from in_process import run_recipe_in_this_process
    from safetensors.torch import load_file
    from test_launch import FAKE_KEY, _run, training_recipe

    from patho_r1.checkpoint import read_manifest
    from patho_r1.launch.recipe import load_plan

    save_steps = 5
    phases = [{"name": "cpt", "type": "cpt", "config": {"data": "{data}/cpt/train.jsonl", "max_steps": 24}},
              {"name": "sft", "type": "sft", "config": {"data": "{data}/sft/train.jsonl", "max_steps": 48}}]

    def recipe(root):
        return training_recipe(root, phases, save_steps=save_steps, save_total_limit=2)

    (tmp_path / "cut").mkdir()
    path, out = recipe(tmp_path / "cut"), tmp_path / "cut" / "out"
    rng = random.Random(7)
    # where to kill: after some seconds (preparing, starting Ray), or once a phase logs a step at or past k
    targets = [("time", rng.uniform(1, 8)), ("cpt", rng.randint(3, 22)), ("sft", rng.randint(3, 24)),
               ("sft", rng.randint(25, 46))]
    kills = []
    for attempt in range(len(targets) + 3):
        log_path = tmp_path / f"cut{attempt}.log"
        target = targets[len(kills)] if len(kills) < len(targets) else None
        seen = {p: len(_steps(out, p)) for p in ("cpt", "sft")}  # rows of earlier attempts do not count
        with open(log_path, "w") as log:
            proc = _run([str(path)] + (["--resume"] if attempt else []), log)
            t0, fire = time.time(), False
            while proc.poll() is None and target is not None and not fire:
                if target[0] == "time":
                    fire = time.time() - t0 >= target[1]
                else:
                    fire = any(step >= target[1] for step in _steps(out, target[0])[seen[target[0]]:]) \
                        or _complete(out, target[0])
                time.sleep(0.02)
            if proc.poll() is None and fire:
                workers = [json.loads(p.read_text()) for p in (out / REGISTRY).glob("*.json")]
                alone = len(kills) % 2 == 1  # the driver alone in cpt and late in sft; its group otherwise
                checkpoints = _checkpoints(out, target[0])
                if alone:
                    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its workers must notice
                else:
                    os.killpg(proc.pid, signal.SIGKILL)  # everything it started
                killed_at = time.time()
                proc.wait()
                while any(psutil.pid_exists(w["pid"]) for w in workers) and time.time() < killed_at + 10:
                    time.sleep(0.05)
                assert not any(psutil.pid_exists(w["pid"]) for w in workers), "a worker outlived its driver"
                if alone:
                    assert any(w["role"] == f"{target[0]} rank 0" for w in workers), workers
                    assert time.time() - killed_at < 3, "a worker outlived its driver by 3 s"
                    time.sleep(1)
                    # at most the save that was under way when the driver died
                    assert len(_checkpoints(out, target[0]) - checkpoints) <= 1
                # what the killed run left, read once nothing of it runs any more
                done = {p: _complete(out, p) for p in ("cpt", "sft")}
                stamps = {p: (out / p / "model/patho_manifest.json").stat().st_mtime_ns for p in done if done[p]}
                reached = {p: max(_steps(out, p), default=0) for p in ("cpt", "sft")}
                kills.append({"target": target, "alone": alone, "done": done, "stamps": stamps, "reached": reached,
                              "log": log_path})
                continue
            assert proc.wait(timeout=900) == 0, log_path.read_text()[-3000:]
            break
    assert len(kills) == len(targets), kills
    assert not list((out / REGISTRY).glob("*.json"))  # every worker unregistered on its way out
    logs = [k["log"] for k in kills[1:]] + [log_path]  # the run after each kill
    resumed_mid_phase = 0
    for kill, next_log in zip(kills, logs, strict=True):
        text = next_log.read_text()
        for phase, was_done in kill["done"].items():
            if was_done:  # a finished phase is skipped, not redone
                assert f"{phase}: complete, skipped" in text, (kill, text[-2000:])
                continue
            if f"{phase}: complete, skipped" in text:  # it finished while the driver was being killed: kept
                continue
            resumed = re.search(rf"\[run\] \d+/\d+ {phase} \[{phase}\] on .*resuming from checkpoint-(\d+)", text)
            lost = kill["reached"][phase] - (int(resumed.group(1)) if resumed else 0)
            assert 0 <= lost <= save_steps, (phase, lost, kill, text[-2000:])
            resumed_mid_phase += resumed is not None
    assert resumed_mid_phase >= 2  # the kills did land inside training, after checkpoints
    for kill in kills:  # a finished phase is never rewritten afterwards
        for phase, stamp in kill["stamps"].items():
            assert (out / phase / "model/patho_manifest.json").stat().st_mtime_ns == stamp
    # every console stayed quiet (phase lines, progress and the report: Ray's, the workers' and the libraries' output
    # is in the logs), the last one short; no key reached any file; the final model names its parent and recipe
    for console in [k["log"] for k in kills] + [log_path]:
        for noise in ("PlacementGroupCleaner", "core_worker", "Warning", "WARNING", "find_unused_parameters",
                      "Writing model shards"):
            assert noise not in console.read_text(), (noise, console)
    assert len(log_path.read_text().splitlines()) <= 15, log_path.read_text()
    worker_log = (out / "logs/sft.rank0.log").read_text()
    assert "[sft] step 48/48" in worker_log and "resuming from" in worker_log
    assert not any("Failed to query Ray Train Controller" in p.read_text(errors="replace")
                   for p in (out / "logs/ray").rglob("*") if p.is_file())
    assert not [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    manifest = read_manifest(out / "sft/model")
    assert manifest.parent == str(out / "cpt/model") and manifest.recipe_hash == load_plan(path).recipe_hash
    assert (out / "report.md").is_file()
    # the reference: the same phases uninterrupted, in this process on the base model and world the cut run built
    ref_out = run_recipe_in_this_process(path, tmp_path / "ref", out)
    ref = load_file(next((ref_out / "sft/model").glob("*.safetensors")))
    cut = load_file(next((out / "sft/model").glob("*.safetensors")))
    assert ref.keys() == cut.keys()
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "resumed SFT weights differ from an uninterrupted run's"
