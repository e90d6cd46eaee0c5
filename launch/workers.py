"""What runs inside Ray: one phase, looked up in the phase table.  Kept importable by name so Ray can ship it to any
node."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import TrainerCallback

from patho_r1.config import validate_config
from patho_r1.launch.console import worker_output
from patho_r1.launch.liveness import WorkerLease
from patho_r1.launch.phases import get_phase


def run_phase(phase_type: str, config: dict[str, Any], callbacks=()) -> dict:
    """Validate (paths included, now that earlier phases have run) and run one phase.  Returns its step count, final
    directory and metrics."""
    phase = get_phase(phase_type)
    cfg = validate_config(phase.config_class(), config, prefix=f"{phase_type}.")
    result = phase.run(cfg, callbacks=callbacks)
    return {"global_step": result.global_step, "model_dir": str(result.model_dir), "metrics": result.metrics}


def run_phase_task(phase_type: str, config: dict[str, Any], log_file: str | None = None,
                   driver: dict | None = None) -> dict:
    """A phase as one Ray task (evaluation), its output in `log_file`; it stops if the driver dies."""
    with worker_output(Path(log_file) if log_file else None), WorkerLease(driver, phase_type):
        return run_phase(phase_type, config)


class _StopIfDriverGone(TrainerCallback):
    """Checks the driver at every step end, before HF Trainer decides to save: no checkpoint for a dead driver."""

    def __init__(self, lease: WorkerLease):
        self.lease = lease

    def on_step_end(self, args, state, control, **kwargs):
        self.lease.check()


class _RayProgress(TrainerCallback):
    """Forwards each log event to Ray Train, so `ray job logs` and the dashboard show live metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        if state.is_world_process_zero and logs:
            ray.train.report({"step": state.global_step, **{k: v for k, v in logs.items()
                                                            if isinstance(v, (int, float))}})


def should_resume(config: dict[str, Any], asked: bool, started: float) -> bool:
    """Resume when asked, or when the newest checkpoint is this run's own (written since the phase started)."""
    from patho_r1.training import latest_checkpoint

    if asked:
        return True
    newest = latest_checkpoint(SimpleNamespace(output_dir=config["output_dir"]))
    return newest is not None and (Path(newest) / "trainer_state.json").stat().st_mtime >= started


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: Ray has set RANK/WORLD_SIZE/MASTER_ADDR and the process group; HF Trainer joins it.

    An HF-Trainer phase resumes from its newest intermediate checkpoint when the user asked (`--resume`), or when
    that checkpoint was written by this very run: Ray's FailureConfig restarted the worker group, which continues
    instead of starting over.  A fresh run never picks up a stale checkpoint left in its output folder.
    """
    import ray.train

    for key, value in loop_config.get("env", {}).items():
        os.environ.setdefault(key, value)
    config = dict(loop_config["config"])
    phase = get_phase(loop_config["phase_type"])
    if phase.hf_trainer:
        config["resume"] = should_resume(config, loop_config.get("resume", False), loop_config.get("started", 0.0))
    log_file = loop_config.get("log_file")
    rank = ray.train.get_context().get_world_rank()
    with worker_output(Path(log_file.format(rank=rank)) if log_file else None), \
            WorkerLease(loop_config.get("driver"), f"{phase.name} rank {rank}") as lease:
        callbacks = [_StopIfDriverGone(lease)] + ([_RayProgress()] if loop_config.get("report") else [])
        run_phase(phase.name, config, callbacks=callbacks if phase.hf_trainer else [])
