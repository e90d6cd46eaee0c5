"""Preflight: every package a phase's settings need imports where the phase runs, checked before Ray starts.

`patho-r1 run` (also `--dry-run`) and `patho-r1 plan` call `check_gpu_stack`, which raises one `ConfigError` with a
line per problem (phase, field, fix): flash-attn named but missing, vLLM, DeepSpeed or Liger not importable, a
GPU-only setting on a CPU phase.  A GPU phase planned from a machine without a GPU runs elsewhere; `check_on_cluster`
checks it on a GPU node of the cluster after Ray starts, before the first phase.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field

from patho_r1.errors import ConfigError
from patho_r1.launch.console import RunConsole
from patho_r1.launch.recipe import Plan, PlannedPhase

FLASH_INSTALL = "pip install -e '.[flash]' --no-build-isolation"
IMPORT_TIMEOUT_S = 300  # importing vLLM cold (its CUDA extensions, triton) takes tens of seconds, not minutes
PROBE_TIMEOUT_S = 900  # how long the cluster check waits for a GPU node (an autoscaler may be starting one)


@dataclass(frozen=True)
class Needs:
    """A package that a phase setting needs at run time."""

    module: str  # what must import
    package: str  # what pip calls it
    setting: str  # the field and value that need it, as the recipe writes them
    fix: str

    def problem(self) -> str | None:
        error = import_error(self.module)
        if error is None:
            return None
        if error == "not installed":
            return f"{self.setting} needs the {self.package} package (not installed): {self.fix}"
        return (f"{self.setting} needs the {self.package} package, which is installed but does not import ({error}): "
                f"{self.fix}")


@dataclass
class PhaseStack:
    """What the preflight found for one phase."""

    name: str
    on_gpu: bool
    checked: bool  # False: a GPU phase seen from a machine without a GPU (it is checked where it runs)
    attention: str | None = None  # what a trainer phase will run, e.g. "text sdpa, vision varlen"
    needs: list[Needs] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def phase_runs_on_gpu(phase: PlannedPhase) -> bool:
    """The phase's device as the recipe decides it (not this machine): its workers get GPUs (`resources.use_gpu`) and
    its config does not say `use_cpu: true` (the recipe sets that for every phase of a CPU recipe)."""
    return phase.resources.use_gpu and getattr(phase.config, "use_cpu", None) is not True


def gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def import_error(module: str) -> str | None:
    """Why `module` does not import in this Python environment; None when it does.

    An installed package is imported in a child interpreter: a build that finds its files but not its symbols (a
    flash-attn compiled against another torch: `undefined symbol`) fails there as it would in the phase, and the
    import's side effects (vLLM's and DeepSpeed's set environment variables and loggers) stay out of the driver.
    """
    if importlib.util.find_spec(module) is None:
        return "not installed"
    # -P: the environment's import path only, as a worker has it; the folder we run from is not on it (a checkout's
    # top-level `eval/` or `rl/` would shadow PyPI packages of those names)
    try:
        done = subprocess.run([sys.executable, "-P", "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"importing it took more than {IMPORT_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[-1][:240] if lines else f"the interpreter exited with {done.returncode}"


def _attention(cfg, on_gpu: bool) -> tuple[str, list[str], list[Needs]]:
    """A trainer phase's attention as it will resolve on its device, the settings that device cannot run, and the
    flash-attn builds the others need (installed ones are import-checked: `auto` picks them when found)."""
    from patho_r1.attention import (
        attention_problems,
        flash_attn_installed,
        resolve_text_attention,
        resolve_vision_attention,
    )

    problems = attention_problems(cfg.attn_implementation, cfg.vision_attention, on_gpu=on_gpu)
    if problems:
        return "", problems, []
    text = resolve_text_attention(cfg.attn_implementation, on_gpu=on_gpu)
    vision = resolve_vision_attention(cfg.vision_attention, on_gpu=on_gpu)
    needs = []
    if text == "flash_attention_2" or vision == "flash_attn":
        field_, value = ("attn_implementation", cfg.attn_implementation or "auto") if text == "flash_attention_2" \
            else ("vision_attention", cfg.vision_attention)
        undo = "uninstall flash-attn (auto then runs SDPA)" if value == "auto" else f"set {field_}: auto"
        needs.append(Needs("flash_attn", "flash-attn", f"{field_}: {value}",
                           f"{FLASH_INSTALL} --force-reinstall (it must be built against this torch), or {undo}"))
    if text == "flash_attention_3" and flash_attn_installed():
        needs.append(Needs("flash_attn_interface", "flash-attn 3", "attn_implementation: flash_attention_3",
                           "rebuild flash-attn 3 against this torch, or set attn_implementation: auto"))
    return f"text {text}, vision {vision}", [], needs


def _device_problems(cfg, on_gpu: bool) -> list[str]:
    """Settings that need a GPU on a CPU phase: wrong wherever it runs, so checked on any machine (the attention
    settings are `_attention`'s)."""
    if on_gpu:
        return []
    problems = []
    rollout = getattr(cfg, "rollout", None)
    if rollout is not None and rollout.engine == "vllm":
        problems.append("rollout.engine: vllm needs a CUDA GPU and this phase runs on the CPU (resources.use_gpu: "
                        "false); set rollout.engine: hf")
    if getattr(cfg, "engine", None) == "vllm":
        problems.append("engine: vllm needs a CUDA GPU and this phase runs on the CPU (resources.use_gpu: false); "
                        "set engine: hf")
    if (getattr(cfg, "trl", None) or {}).get("use_liger_kernel"):
        problems.append("trl.use_liger_kernel: Liger's kernels are Triton (GPU only) and this phase runs on the CPU; "
                        "remove it")
    return problems


def _package_needs(cfg, on_gpu: bool) -> list[Needs]:
    """The packages a phase's settings import when it runs (the GPU-only ones on GPU phases only: on a CPU phase
    those settings are already refused by `_device_problems`)."""
    needs = []
    if getattr(cfg, "deepspeed", None):
        needs.append(Needs("deepspeed", "deepspeed", f"deepspeed: {cfg.deepspeed}",
                           "pip install -e '.[deepspeed]', or remove deepspeed (resources.deepspeed)"))
    if not on_gpu:
        return needs
    rollout = getattr(cfg, "rollout", None)
    if rollout is not None and rollout.engine == "vllm":
        needs.append(Needs("vllm", "vllm", "rollout.engine: vllm", "pip install -e '.[vllm]', or set rollout.engine: "
                           "hf (resources.rollout_engine: hf)"))
    if getattr(cfg, "engine", None) == "vllm":
        needs.append(Needs("vllm", "vllm", "engine: vllm", "pip install -e '.[vllm]', or set engine: hf"))
    if (getattr(cfg, "trl", None) or {}).get("use_liger_kernel"):
        needs.append(Needs("liger_kernel", "liger-kernel", "trl.use_liger_kernel: true",
                           "pip install -e '.[liger]', or remove trl.use_liger_kernel"))
    return needs


def phase_stack(phase: PlannedPhase, *, here_is_gpu: bool) -> PhaseStack:
    """What `phase` needs and what is missing.  Packages are checked in this Python environment only when the phase
    could run on this machine (a CPU phase, or a GPU phase on a machine with a GPU): a GPU phase planned from a laptop
    runs on a cluster, whose environment this one says nothing about."""
    cfg = phase.config
    on_gpu = phase_runs_on_gpu(phase)
    stack = PhaseStack(phase.name, on_gpu, checked=here_is_gpu or not on_gpu)
    if cfg is None:
        return stack
    stack.problems += _device_problems(cfg, on_gpu)
    if not stack.checked:
        return stack
    if hasattr(cfg, "attn_implementation"):
        stack.attention, problems, stack.needs = _attention(cfg, on_gpu)
        stack.problems += problems
    stack.needs += _package_needs(cfg, on_gpu)
    stack.problems += [p for p in (n.problem() for n in stack.needs) if p]
    return stack


def stack_error(source: str, stacks: list[PhaseStack]) -> ConfigError | None:
    """One line per problem, naming its phases (the same problem in several phases is one line), or None."""
    phases_of: dict[str, list[str]] = {}
    for stack in stacks:
        for problem in stack.problems:
            phases_of.setdefault(problem, []).append(stack.name)
    lines = [f"phase{'s' if len(names) > 1 else ''} {', '.join(names)}: {problem}"
             for problem, names in phases_of.items()]
    if not lines:
        return None
    if len(lines) == 1:
        return ConfigError(f"{source}: {lines[0]}")
    return ConfigError(f"{source}: {len(lines)} settings cannot run in this environment\n  " + "\n  ".join(lines))


def check_gpu_stack(plan: Plan, phases: list[PlannedPhase] | None = None) -> list[PhaseStack]:
    """The preflight of `run` (also `--dry-run`) and `plan`: raise one ConfigError naming every phase setting whose
    device or packages this environment cannot provide, before anything starts."""
    here_is_gpu = gpu_here()
    stacks = [phase_stack(p, here_is_gpu=here_is_gpu) for p in (plan.phases if phases is None else phases)]
    error = stack_error(plan.source, stacks)
    if error is not None:
        raise error
    return stacks


def describe_stack(stacks: list[PhaseStack]) -> str:
    import torch

    where = "a CUDA GPU" if gpu_here() else "no CUDA GPU"
    lines = [f"runtime stack: this Python environment (torch {torch.__version__}, {where})"]
    unchecked = [s.name for s in stacks if not s.checked]
    for s in stacks:
        if s.checked:
            parts = [f"attention {s.attention}"] if s.attention else []
            parts += [f"{n.package} imports" for n in s.needs]
            lines.append(f"  {s.name} [{'GPU' if s.on_gpu else 'CPU'}]: {'; '.join(parts) or 'nothing to check'}")
    if unchecked:
        lines.append(f"  {', '.join(unchecked)} [GPU]: not checked here: this machine has no GPU, so they run on "
                     "another (a cluster: ray_address or `patho-r1 submit`), where `patho-r1 run` checks them on a "
                     "GPU node before the first phase starts")
    return "\n".join(lines)


def unchecked_gpu_phases(phases: list[PlannedPhase]) -> list[PlannedPhase]:
    """The GPU phases this machine cannot check, having no GPU: they run on another machine, or nowhere."""
    return [p for p in phases if phase_runs_on_gpu(p)] if not gpu_here() else []


def check_on_cluster(plan: Plan, phases: list[PlannedPhase], console: RunConsole) -> None:
    """The GPU phases this machine could not check (a driver on a CPU-only head node, as `patho-r1 submit` runs it),
    checked on a node Ray gives their GPUs to, one small task each, after Ray starts and before the first phase."""
    import ray

    todo = unchecked_gpu_phases(phases)
    if not todo:
        return
    remote = ray.remote(_stack_on_this_node)
    refs = [remote.options(num_cpus=min(1.0, p.resources.cpus_per_worker), num_gpus=p.resources.gpus_per_worker)
            .remote(p) for p in todo]
    try:
        found = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        for ref in refs:
            ray.cancel(ref, force=True)
        console.line(f"[run] warning: no GPU node took the package check of {', '.join(p.name for p in todo)} "
                     f"within {PROBE_TIMEOUT_S} s; going on unchecked")
        return
    error = stack_error(f"{plan.source} (checked on a GPU node of the cluster)", found)
    if error is not None:
        raise error


def _stack_on_this_node(phase: PlannedPhase) -> PhaseStack:
    """Runs on a node Ray gave the phase's GPUs to: this is where the phase will run, so check here."""
    return phase_stack(phase, here_is_gpu=True)
