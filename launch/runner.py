"""The recipe runner: prepare inputs, then run each phase on Ray (training phases on Ray Train workers), with
lineage, resume, failure policy and a final report.

    patho-r1 run recipes/demo.yaml [--phases sft,rl] [--resume] [--dry-run]
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from patho_r1.checkpoint import Manifest, is_complete, read_manifest, write_manifest
from patho_r1.errors import ConfigError, PathoError
from patho_r1.launch.phases import get_phase
from patho_r1.launch.recipe import Plan, PlannedPhase

STATE_FILE = "run_state.json"


class PhaseFailed(PathoError):
    pass


@dataclass
class PhaseOutcome:
    name: str
    type: str
    status: str  # done | skipped | failed
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------

def prepare_inputs(plan: Plan) -> None:
    """Build the tiny base model and generate the synthetic world when the recipe asks for them (idempotent)."""
    recipe = plan.recipe
    if recipe.model.base == "tiny":
        from patho_r1.fixtures.tiny import TinySpec, build_tiny_model

        base = Path(recipe.base_model_path)
        spec = TinySpec(**recipe.model.tiny.model_dump())
        spec_file = base / "tiny_spec.json"
        if spec_file.is_file() and json.loads(spec_file.read_text()) != asdict(spec):
            print(f"[prepare] tiny model settings changed; previous model kept at {_move_aside(base)}", flush=True)
        if not (base / "config.json").is_file():
            print(f"[prepare] building the tiny Qwen2.5-VL in {base}", flush=True)
            build_tiny_model(base, spec)
    if recipe.data.synth is not None:
        from patho_r1.fixtures.synth import generate_world

        root = Path(recipe.data_root)
        wanted = {"seed": recipe.data.synth.seed, "config": asdict(recipe.data.synth.world_config())}
        marker = root / "world.json"
        if marker.is_file():
            have = json.loads(marker.read_text())
            if {"seed": have.get("seed"), "config": have.get("config")} == wanted:
                return
            backup = _move_aside(root)
            print(f"[prepare] world settings changed; previous world kept at {backup}", flush=True)
        print(f"[prepare] generating the synthetic world (seed {recipe.data.synth.seed}) in {root}", flush=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_world(tmp, seed=recipe.data.synth.seed, config=recipe.data.synth.world_config())
        os.replace(tmp, root)


def _move_aside(path: Path) -> Path:
    """Keep an earlier output under a new name instead of deleting it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.prev-{stamp}"), 1
    while backup.exists():
        backup, n = path.with_name(f"{path.name}.prev-{stamp}-{n}"), n + 1
    os.replace(path, backup)
    return backup


# ----------------------------------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------------------------------

def _worker_env(plan: Plan) -> dict[str, str]:
    # Ray Train 2.60 reroutes print() through its logger and also tees it when stdout is wrapped, so every progress
    # line would appear twice; our phases print one line per log event themselves.
    env = {"WANDB_MODE": plan.recipe.wandb.mode, "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for key in ("HF_HOME", "HF_HUB_OFFLINE", "WANDB_API_KEY", "WANDB_DIR", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(plan: Plan) -> None:
    import ray

    if ray.is_initialized():
        return
    address = plan.recipe.resources.ray_address
    kwargs = dict(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": _worker_env(plan)})
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=max(1, os.cpu_count() or 1), **kwargs)


def run_training_phase(plan: Plan, phase: PlannedPhase) -> dict:
    """One training phase on Ray Train workers (TorchTrainer: process group, placement group, restarts)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from patho_r1.launch.workers import train_loop_per_worker

    res = phase.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"phase_type": phase.type, "config": phase.config.model_dump(mode="json"),
                           "env": _worker_env(plan), "report": False},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=res.placement_strategy),
        run_config=RunConfig(name=f"{plan.recipe.name}-{phase.name}",
                             storage_path=str((Path(plan.recipe.output_root) / "_ray").resolve()),
                             failure_config=FailureConfig(max_failures=res.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the worker's exception; surface the root cause in one line
        root = exc
        while getattr(root, "__cause__", None) is not None:
            root = root.__cause__
        attempts = "unlimited" if res.max_failures < 0 else str(res.max_failures + 1)
        raise PhaseFailed(f"phase {phase.name!r} ({phase.type}) failed after {attempts} attempt(s): "
                          f"{type(root).__name__}: {root}") from exc
    manifest = read_manifest(phase.final_dir)
    if manifest is None or not manifest.complete:
        raise PhaseFailed(f"phase {phase.name!r} finished but wrote no complete checkpoint in {phase.final_dir}")
    return {"step": manifest.step, **manifest.metrics}


def run_task_phase(plan: Plan, phase: PlannedPhase) -> dict:
    """A non-training phase (evaluation) as one Ray task with the phase's resources."""
    import ray

    from patho_r1.launch.workers import run_phase

    res = phase.resources
    remote = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if res.use_gpu else 0,
                        max_retries=max(res.max_failures, 0))(run_phase)
    try:
        out = ray.get(remote.remote(phase.type, phase.config.model_dump(mode="json")))
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        raise PhaseFailed(f"phase {phase.name!r} ({phase.type}) failed: {type(cause).__name__}: {cause}") from exc
    write_manifest(phase.final_dir, Manifest(phase=phase.type, recipe_hash=plan.recipe_hash, complete=True,
                                             extra=_json_safe(out["metrics"])))
    return out["metrics"]


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------

def _load_state(plan: Plan) -> dict:
    path = Path(plan.recipe.output_root) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"phases": {}}


def _save_state(plan: Plan, state: dict) -> None:
    path = Path(plan.recipe.output_root) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def select_phases(plan: Plan, names: list[str] | None) -> list[PlannedPhase]:
    if not names:
        return plan.phases
    known = {p.name for p in plan.phases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--phases: unknown phase(s) {unknown}; the recipe has {sorted(known)}")
    return [p for p in plan.phases if p.name in names]


def run_recipe(plan: Plan, *, phases: list[str] | None = None, resume: bool = False) -> list[PhaseOutcome]:
    selected = select_phases(plan, phases)
    root = Path(plan.recipe.output_root)
    root.mkdir(parents=True, exist_ok=True)
    state = _load_state(plan)
    prepare_inputs(plan)
    init_ray(plan)
    outcomes: list[PhaseOutcome] = []
    for i, phase in enumerate(selected, 1):
        phase_dir = root / phase.name
        if resume and is_complete(phase.final_dir):
            manifest = read_manifest(phase.final_dir)
            if manifest.recipe_hash != plan.recipe_hash:
                print(f"[run] note: {phase.name} was completed by a different version of the recipe "
                      f"({manifest.recipe_hash} != {plan.recipe_hash}); keeping it", flush=True)
            print(f"[run] {i}/{len(selected)} {phase.name}: complete, skipped", flush=True)
            prior = state["phases"].get(phase.name, {})
            outcomes.append(PhaseOutcome(phase.name, phase.type, "skipped", prior.get("seconds", 0.0),
                                         prior.get("metrics", {})))
            continue
        if not resume and phase_dir.exists():
            backup = _move_aside(phase_dir)
            print(f"[run] previous {phase.name} output moved to {backup}", flush=True)
        print(f"[run] {i}/{len(selected)} {phase.name} [{phase.type}] on {phase.resources.describe()}", flush=True)
        t0 = time.time()
        try:
            if get_phase(phase.type).ray_train:
                metrics = run_training_phase(plan, phase)
            else:
                metrics = run_task_phase(plan, phase)
        except PhaseFailed as exc:
            outcomes.append(PhaseOutcome(phase.name, phase.type, "failed", time.time() - t0))
            state["phases"][phase.name] = asdict(outcomes[-1])
            _save_state(plan, state)
            raise exc
        seconds = time.time() - t0
        outcomes.append(PhaseOutcome(phase.name, phase.type, "done", seconds, _json_safe(metrics)))
        state["phases"][phase.name] = asdict(outcomes[-1])
        _save_state(plan, state)
        print(f"[run] {phase.name} done in {seconds:.1f}s", flush=True)
    from patho_r1.launch.report import write_report

    write_report(plan, state)
    return outcomes


def _json_safe(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, default=str))
