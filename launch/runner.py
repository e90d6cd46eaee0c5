"""The recipe runner: check that every phase's packages import where it runs, prepare inputs, then run each phase on
Ray (training phases on Ray Train workers), with lineage, resume, failure policy and a final report.

    patho-r1 run recipes/demo.yaml [--phases sft,rl] [--resume] [--dry-run]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from patho_r1.checkpoint import Manifest, checkpoint_problem, lineage_digest, read_manifest, write_manifest
from patho_r1.errors import ConfigError, PathoError
from patho_r1.launch.console import RunConsole, driver_logging, route_ray_logging_to_file
from patho_r1.launch.context import RECIPE_AS_RUN, now, run_context
from patho_r1.launch.liveness import DriverLease, forget_local_ray, reap_orphans, record_local_ray
from patho_r1.launch.phases import get_phase
from patho_r1.launch.planner import check_data_kinds
from patho_r1.launch.preflight import check_gpu_stack, check_on_cluster, unchecked_gpu_phases
from patho_r1.launch.recipe import TINY_CLIP_DIR, Plan, PlannedPhase
from patho_r1.launch.report import STATE_FILE, mcq_lines, phase_headline, write_report

LOG_DIR = "logs"
logger = logging.getLogger(__name__)


class PhaseFailed(PathoError):
    """A phase failed for good (its retries spent); `outcome` is what the run state records of it."""

    outcome: PhaseOutcome | None = None


@dataclass
class PhaseOutcome:
    name: str
    type: str
    status: str  # done | skipped | failed
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    output_dir: str | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------

def prepare_inputs(plan: Plan) -> None:
    """Build the tiny base model and generate the synthetic world when the recipe asks for them (idempotent)."""
    recipe = plan.recipe
    if recipe.model.base == "tiny" and any(get_phase(p.type).uses_model for p in plan.phases):
        from patho_r1.fixtures.tiny import TinySpec, build_tiny_model

        base = Path(recipe.base_model_path)
        spec = TinySpec(**recipe.model.tiny.model_dump())
        spec_file = base / "tiny_spec.json"
        if spec_file.is_file() and json.loads(spec_file.read_text()) != asdict(spec):
            print(f"[prepare] tiny model settings changed; previous model kept at {_move_aside(base)}", flush=True)
        if not (base / "config.json").is_file():
            print(f"[prepare] building the tiny Qwen2.5-VL in {base}", flush=True)
            build_tiny_model(base, spec)
    tiny_clip = Path(recipe.output_root) / TINY_CLIP_DIR
    if any(p.config is not None and getattr(p.config, "model", None) == str(tiny_clip) for p in plan.phases) \
            and not (tiny_clip / "config.json").is_file():
        from patho_r1.fixtures.tiny_clip import build_tiny_clip

        print(f"[prepare] building the tiny CLIP in {tiny_clip}", flush=True)
        build_tiny_clip(tiny_clip)
    if recipe.data.synth is not None:
        from patho_r1.fixtures.synth import WORLD_VERSION, generate_world

        root = Path(recipe.data_root)
        wanted = {"version": WORLD_VERSION, "seed": recipe.data.synth.seed,
                  "config": asdict(recipe.data.synth.world_config())}
        marker = root / "world.json"
        if marker.is_file():
            have = json.loads(marker.read_text())
            if {k: have.get(k) for k in wanted} == wanted:
                return
            backup = _move_aside(root)
            print(f"[prepare] world settings (or the world's format) changed; previous world kept at {backup}",
                  flush=True)
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
    # No secrets here: Ray writes runtime environments to its logs in plain text.  Local workers inherit the
    # driver's environment (WANDB_API_KEY included); on a cluster, set it on the nodes or run `wandb login` there.
    for key in ("HF_HOME", "HF_HUB_OFFLINE", "WANDB_DIR", "PYTHONPATH", "HF_HUB_DISABLE_PROGRESS_BARS",
                "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        if key in os.environ:
            env[key] = os.environ[key]
    if cluster_address(plan) is None:
        # A Ray this driver starts has one node, which no autoscaler drains: Ray Train's preemption watcher (an actor
        # per phase, about 2 s of CPU to start, measured) has nothing to watch.  On a cluster it stays on.
        watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
        env[watcher] = os.environ.get(watcher, "0")
    return env


def cluster_address(plan: Plan) -> str | None:
    """The cluster to join: the recipe's `ray_address`, else RAY_ADDRESS, which Ray sets for a job's driver (`patho-r1
    submit`); None: start a local Ray.  Joining passes no local resource counts, which Ray refuses when connecting."""
    return plan.recipe.resources.ray_address or os.environ.get("RAY_ADDRESS")


def init_ray(plan: Plan, verbose: bool = False) -> bool:
    """Start (or join) Ray; True when this call started it (or connected: `ray.shutdown` then disconnects).

    Worker output stays in the workers' log files unless `verbose` (`log_to_driver`).  The dashboard runs, on
    localhost: Ray Train's placement-group cleaner asks the State API, which the dashboard serves, every second
    whether the phase's controller is alive; without it every one of those questions failed and logged a warning.
    """
    import ray

    if ray.is_initialized():
        return False
    if not verbose:
        route_ray_logging_to_file()
    address = cluster_address(plan)
    kwargs = dict(log_to_driver=verbose, logging_level=logging.DEBUG if verbose else logging.INFO,
                  configure_logging=verbose, runtime_env={"env_vars": _worker_env(plan)})
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
                 **kwargs)
    return True


def _log_file(plan: Plan, phase: PlannedPhase, verbose: bool, rank: str = "{rank}") -> str | None:
    """Where a phase's worker writes everything it prints (None with --verbose: on the console)."""
    return None if verbose else str(Path(plan.recipe.output_root) / LOG_DIR / f"{phase.name}.rank{rank}.log")


def _root_cause(exc: BaseException) -> BaseException:
    while getattr(exc, "__cause__", None) is not None:
        exc = exc.__cause__
    return getattr(exc, "cause", None) or exc


def run_training_phase(plan: Plan, phase: PlannedPhase, verbose: bool = False, resume: bool = False,
                       driver: dict | None = None) -> dict:
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
                           "env": _worker_env(plan), "report": False, "log_file": _log_file(plan, phase, verbose),
                           "resume": resume, "started": time.time(), "driver": driver},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=res.placement_strategy),
        run_config=RunConfig(name=f"{plan.recipe.name}-{phase.name}",
                             storage_path=str((Path(plan.recipe.output_root) / "_ray").resolve()),
                             failure_config=FailureConfig(max_failures=res.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the worker's exception; surface the root cause, then where the rest is
        root = _root_cause(exc)
        attempts = "unlimited" if res.max_failures < 0 else str(res.max_failures + 1)
        raise PhaseFailed(f"phase {phase.name!r} ({phase.type}) failed after {attempts} attempt(s): "
                          f"{type(root).__name__}: {root}{_see_log(plan, phase, verbose)}") from exc
    manifest = read_manifest(phase.final_dir)
    if manifest is None or not manifest.complete:
        raise PhaseFailed(f"phase {phase.name!r} finished but wrote no complete checkpoint in {phase.final_dir}")
    return {"step": manifest.step, **manifest.metrics}


def run_task_phase(plan: Plan, phase: PlannedPhase, verbose: bool = False, driver: dict | None = None) -> dict:
    """A non-training phase (evaluation) as one Ray task with the phase's resources."""
    import ray

    from patho_r1.launch.workers import run_phase_task

    res = phase.resources
    remote = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if res.use_gpu else 0,
                        max_retries=max(res.max_failures, 0))(run_phase_task)
    try:
        out = ray.get(remote.remote(phase.type, phase.config.model_dump(mode="json"),
                                    _log_file(plan, phase, verbose, rank="0"), driver))
    except Exception as exc:
        cause = _root_cause(exc)
        raise PhaseFailed(f"phase {phase.name!r} ({phase.type}) failed: {type(cause).__name__}: {cause}"
                          f"{_see_log(plan, phase, verbose)}") from exc
    inputs = getattr(phase.config, "checkpoints", {}) or {}
    write_manifest(phase.final_dir, Manifest(phase=phase.type, recipe_hash=plan.recipe_hash, complete=True,
                                             parents={p: lineage_digest(p) for p in inputs.values()},
                                             extra=_json_safe(out["metrics"])))
    return out["metrics"]


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------

def _see_log(plan: Plan, phase: PlannedPhase, verbose: bool) -> str:
    path = _log_file(plan, phase, verbose, rank="*")
    return f"\n  full log: {path}" if path else ""


def _load_state(plan: Plan) -> dict:
    path = Path(plan.recipe.output_root) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"phases": {}}


def _save_state(plan: Plan, state: dict) -> None:
    """run_state.json, atomically.  A phase folder inside the run folder is recorded relative to it, so a copied or
    moved run (rsync off the cluster) still reads its own phases."""
    root = Path(plan.recipe.output_root)
    path = root / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for entry in state.get("phases", {}).values():
        out = entry.get("output_dir")
        if out and Path(out).is_absolute() and Path(out).is_relative_to(root):
            entry["output_dir"] = Path(out).relative_to(root).as_posix()
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


def refuse_local_gpu_phases(plan: Plan, phases: list[PlannedPhase]) -> None:
    """A GPU phase on a local Ray (no cluster to join) of a machine without a GPU would wait for one forever."""
    todo = unchecked_gpu_phases(phases)
    if todo and not cluster_address(plan):
        names = ", ".join(p.name for p in todo)
        raise ConfigError(f"{plan.source}: phase(s) {names}: resources.use_gpu is true, but this machine has no CUDA "
                          "GPU and the recipe starts a local Ray (no ray_address): set ray_address to join a GPU "
                          "cluster, run it there with `patho-r1 submit`, or set use_gpu: false")


def run_recipe(plan: Plan, *, phases: list[str] | None = None, resume: bool = False, verbose: bool = False,
               console: RunConsole | None = None) -> list[PhaseOutcome]:
    """Run the selected phases in order; write the report.  The console shows one line per phase start and end and
    the live progress between them; everything else goes to `OUTPUT_ROOT/logs/` (all of it on the console with
    `verbose`)."""
    from filelock import FileLock, Timeout

    selected = select_phases(plan, phases)
    check_gpu_stack(plan, selected)  # a missing package fails now, not in a worker after Ray has started
    check_data_kinds(plan, selected)  # an MCQ file given to SFT fails now, not when SFT starts on a worker
    refuse_local_gpu_phases(plan, selected)
    root = Path(plan.recipe.output_root)
    root.mkdir(parents=True, exist_ok=True)
    console = console or RunConsole(verbose=verbose)
    lock = FileLock(root / ".patho-r1.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"{root}: another patho-r1 run is using this output folder (it holds {lock.lock_file}); "
                          "wait for it, or give this run another output_root") from None
    try:
        return _run_locked(plan, selected, root, resume, verbose, console)
    finally:
        lock.release()


def _run_locked(plan: Plan, selected: list[PlannedPhase], root: Path, resume: bool, verbose: bool,
                console: RunConsole) -> list[PhaseOutcome]:
    for warning in plan.warnings:
        console.line(f"[run] warning: {warning}")
    stopped = reap_orphans(root)  # we hold the lock: any registered process still alive is a killed run's
    if stopped:
        console.line(f"[run] stopped {len(stopped)} process(es) left running by an earlier, killed run of {root} "
                     f"(pids {', '.join(str(e['pid']) for e in stopped)})")
    with driver_logging(root / LOG_DIR, verbose) as log_path, DriverLease(root) as lease:
        state = _load_state(plan)
        state.update(recipe=plan.recipe.name, recipe_hash=plan.recipe_hash, context=run_context())
        (root / RECIPE_AS_RUN).write_text(yaml.safe_dump(plan.recipe.model_dump(mode="json"), sort_keys=False))
        prepare_inputs(plan)
        started_ray = init_ray(plan, verbose)
        if started_ray and not cluster_address(plan):  # only a Ray we started is ours to stop after a crash
            record_local_ray(root)
        outcomes: list[PhaseOutcome] = []
        try:
            check_on_cluster(plan, selected, console)
            for i, phase in enumerate(selected, 1):
                try:
                    outcomes.append(_run_one(plan, phase, f"{i}/{len(selected)}", state, resume, verbose, console,
                                             lease.identity))
                except PhaseFailed as exc:
                    state["phases"][phase.name] = asdict(exc.outcome)
                    _save_state(plan, state)
                    raise
                state["phases"][phase.name] = asdict(outcomes[-1])
                state["context"]["finished"] = now()
                _save_state(plan, state)
        finally:
            _keep_ray_logs(root / LOG_DIR / "ray")
            if started_ray:  # stop our local Ray before the interpreter exits, not under it
                import ray

                ray.shutdown()
                forget_local_ray(root)
        numbers = write_report(root)
    if numbers["mcq"]:  # the one table that says whether it learned; the rest is in the report
        console.line("\nheld-out MCQ:")
        for line in "\n".join(mcq_lines(numbers)).strip().splitlines():
            console.line(line)
    console.line(f"report: {root / 'report.md'} (plots in {root / 'plots'}, all in one page: {root / 'report.html'})")
    console.line(f"logs: {log_path.parent}")
    return outcomes


def _run_one(plan: Plan, phase: PlannedPhase, position: str, state: dict, resume: bool, verbose: bool,
             console: RunConsole, driver: dict | None = None) -> PhaseOutcome:
    out_dir = str(getattr(phase.config, "output_dir", Path(plan.recipe.output_root) / phase.name))
    manifest = read_manifest(phase.final_dir) if resume else None
    finished = manifest is not None and manifest.complete
    why_redo, fresh = _why_redo(phase, manifest) if finished else (None, False)
    phase_dir = Path(plan.recipe.output_root) / phase.name
    if why_redo:
        console.line(f"[run] {position} {phase.name}: done before, but {why_redo}; running it again")
        if fresh and phase_dir.exists():  # new inputs: its checkpoints belong to the old ones
            console.line(f"[run] previous {phase.name} output moved to {_move_aside(phase_dir)}")
    elif finished:
        if manifest.recipe_hash != plan.recipe_hash:
            console.line(f"[run] note: {phase.name} was completed by a different version of the recipe "
                         f"({manifest.recipe_hash} != {plan.recipe_hash}); keeping it")
        console.line(f"[run] {position} {phase.name}: complete, skipped")
        prior = state["phases"].get(phase.name, {})
        return PhaseOutcome(phase.name, phase.type, "skipped", prior.get("seconds", 0.0), prior.get("metrics", {}),
                            out_dir)
    if not resume and phase_dir.exists():
        console.line(f"[run] previous {phase.name} output moved to {_move_aside(phase_dir)}")
    phase_type = get_phase(phase.type)
    resumed = ""
    if resume and phase_type.hf_trainer:
        from patho_r1.training import latest_checkpoint

        checkpoint = latest_checkpoint(phase.config)
        resumed = f", resuming from {Path(checkpoint).name}" if checkpoint else ""
    console.line(f"[run] {position} {phase.name} [{phase.type}] on {phase.resources.describe()}{resumed}")
    metrics_file = Path(out_dir) / "metrics.jsonl"  # training steps, or a curate stage's rows
    t0 = time.time()
    try:
        with console.phase_progress(phase.name, metrics_file, phase_type.headline):
            if phase_type.ray_train:
                metrics = run_training_phase(plan, phase, verbose, resume, driver)
            else:
                metrics = run_task_phase(plan, phase, verbose, driver)
    except PhaseFailed as exc:
        console.line(f"[run] {phase.name} failed after {time.time() - t0:.1f}s")
        exc.outcome = PhaseOutcome(phase.name, phase.type, "failed", time.time() - t0, output_dir=out_dir)
        raise
    seconds = time.time() - t0
    console.line(f"[run] {phase.name} done in {seconds:.1f}s  {phase_headline(out_dir, metrics, phase.type)}".rstrip())
    return PhaseOutcome(phase.name, phase.type, "done", seconds, _json_safe(metrics), out_dir)


def _why_redo(phase: PlannedPhase, manifest: Manifest) -> tuple[str | None, bool]:
    """Whether a finished phase must run again on --resume: (why, or None to keep it; whether from scratch).

    A damaged final output is redone from the phase's own intermediate checkpoints; a phase whose input changed
    (an upstream phase was re-run) is stale and starts over, so that no result built on an old model survives."""
    problem = checkpoint_problem(phase.final_dir)
    if problem:
        return f"its output is damaged ({problem})", False
    for parent, digest in manifest.parents.items():
        if digest is not None and lineage_digest(parent) != digest:
            return f"its input {parent} changed since it ran", True
    return None, False


def _keep_ray_logs(dest: Path) -> None:
    """Copy this Ray session's own logs (raylet, GCS, dashboard, workers) next to ours, with every secret-looking
    environment value (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`) blanked out: Ray logs environments verbatim."""
    try:
        import ray

        if not ray.is_initialized():
            return
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # no public accessor in Ray 2.60
        secrets = [v.encode() for k, v in os.environ.items()
                   if len(v) >= 8 and any(word in k.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]
        for path in logs.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for secret in secrets:
                    data = data.replace(secret, b"[redacted]")
                target = dest / path.relative_to(logs)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    except Exception as exc:  # logs are a courtesy: never fail a finished run over them
        logger.info("could not copy Ray's session logs: %s", exc)


def _json_safe(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, default=str))
