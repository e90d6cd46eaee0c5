"""What runs inside Ray: one function per phase kind.  Kept importable by name so Ray can ship it to any node."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback


def run_phase(phase_type: str, config: dict[str, Any], callbacks=()) -> dict:
    """Validate (paths included, now that earlier phases have run) and run one phase; returns its final metrics."""
    from launch.recipe import phase_config_class
    from patho.config import validate_config

    cfg = validate_config(phase_config_class(phase_type), config, prefix=f"{phase_type}.")
    if phase_type == "cpt":
        from sft.cpt import run_cpt

        result = run_cpt(cfg, callbacks=callbacks)
    elif phase_type == "sft":
        from sft.sft import run_sft

        result = run_sft(cfg, callbacks=callbacks)
    elif phase_type == "rl":
        from rl.grpo import run_rl

        result = run_rl(cfg, callbacks=callbacks)
    elif phase_type == "embed":
        from embed.train import run_embed

        result = run_embed(cfg)
        return {"global_step": result.global_step, "model_dir": str(result.model_dir)}
    elif phase_type == "eval":
        from patho.eval.phase import run_eval

        return {"summary": run_eval(cfg)}
    else:
        raise ValueError(f"unknown phase type {phase_type!r}")
    return {"global_step": result.global_step, "model_dir": str(result.model_dir),
            **{k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}


class _RayProgress(TrainerCallback):
    """Forwards each log event to Ray Train, so `ray job logs` and the dashboard show live metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        if state.is_world_process_zero and logs:
            ray.train.report({"step": state.global_step, **{k: v for k, v in logs.items()
                                                            if isinstance(v, (int, float))}})


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: Ray has set RANK/WORLD_SIZE/MASTER_ADDR and the process group; HF Trainer joins it.

    Every (re)start resumes from the phase's newest intermediate checkpoint, so a worker restarted by Ray's
    FailureConfig continues instead of starting over.
    """
    for key, value in loop_config.get("env", {}).items():
        os.environ.setdefault(key, value)
    config = dict(loop_config["config"])
    if loop_config["phase_type"] in ("cpt", "sft", "rl"):
        config["resume"] = True
    run_phase(loop_config["phase_type"], config, callbacks=[_RayProgress()] if loop_config.get("report") else [])
