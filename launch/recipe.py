"""The recipe: one YAML file that says what to train, on what, in which order, with which resources.

    name: demo
    output_root: runs/demo
    model: {base: tiny}                 # or Qwen/Qwen2.5-VL-7B-Instruct, or a local directory
    data: {synth: {seed: 0}}            # or {root: /data/patho}
    resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 2}
    defaults: {per_device_train_batch_size: 8}     # merged into every cpt/sft/rl phase
    phases:
      - {name: cpt, type: cpt, config: {data: "{data}/cpt/train.jsonl", max_steps: 300}}
      - {name: sft, type: sft, config: {data: "{data}/sft/train.jsonl"}}
      - {name: rl,  type: rl,  config: {data: "{data}/rl/train.jsonl", algorithm: dapo}}
      - {name: eval, type: eval, config: {data: "{data}/eval/PathoSynth_MCQ.tsv",
                                          checkpoints: [base, cpt, sft, rl]}}

Strings may use `{data}` (the data root), `{output}` (the output root) and `{phase:NAME}` (the final model of phase
NAME).  A training phase's `model` defaults to the previous training phase's final model (the base model for the
first); its `output_dir` to `{output}/NAME`.  Validation checks every phase and reports every bad field at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from patho_r1.checkpoint import config_hash
from patho_r1.config import StrictModel, WandbConfig, format_validation_error, read_yaml
from patho_r1.errors import ConfigError
from patho_r1.fixtures.synth import WorldConfig
from patho_r1.launch.phases import PHASES, get_phase


class TinyModelSpec(StrictModel):
    """Fields of `patho_r1.fixtures.tiny.TinySpec`; impossible shapes fail here, at recipe validation."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = Field(1e6, gt=0)  # mRoPE's base; small heads at 1e6 barely tell one image column from the next
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _buildable(self):
        from patho_r1.fixtures.tiny import TinySpec

        TinySpec(**self.model_dump())  # its checks raise ValueError with the field named first
        return self


class ModelSpec(StrictModel):
    base: str = Field(..., description="'tiny' (built locally), a hub id, or a local directory")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec)


class SynthSpec(StrictModel):
    """`seed` plus any field of `patho_r1.fixtures.synth.WorldConfig` (its defaults apply to the rest)."""

    model_config = ConfigDict(extra="allow")
    seed: int = 0

    @model_validator(mode="after")
    def _known_fields(self):
        try:
            self.world_config()
        except TypeError as exc:
            raise ValueError(f"not a WorldConfig field ({exc})") from None
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("WorldConfig: ")) from None
        return self

    def world_config(self) -> WorldConfig:
        return WorldConfig(**(self.model_extra or {}))


class DataSpec(StrictModel):
    synth: SynthSpec | None = None
    root: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.synth is None) == (self.root is None):
            raise ValueError("data: give exactly one of synth (generate the synthetic world) or root (a folder)")
        return self


class ResourcesSpec(StrictModel):
    ray_address: str | None = Field(None, description="None: start a local Ray; 'auto': join the cluster")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (processes) per training phase")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1, description="worker-group restarts per phase (-1: unlimited)")
    deepspeed: str | None = None
    rollout_engine: Literal["hf", "vllm"] | None = Field(None, description="overrides rl rollout.engine")
    gpu_type: str | None = Field(None, description="what the planner checks memory against (patho-r1 plan): "
                                 "H100-80GB (default), H200, A100-80GB, A100-40GB, L40S")

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, v):
        from patho_r1.launch.planner import GPUS

        if v is not None and v not in GPUS:
            raise ValueError(f"unknown GPU {v!r}; known: {', '.join(GPUS)}")
        return v

    def describe(self) -> str:
        accel = f"{self.gpus_per_worker:g} GPU" if self.use_gpu else "no GPU"
        return (f"{self.num_workers} worker(s) x ({self.cpus_per_worker:g} CPU, {accel}), "
                f"{self.placement_strategy}, max_failures={self.max_failures}")


class PhaseSpec(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-]+$")
    type: str = Field(..., description="a phase type of the phase table (launch/phases.py)")
    config: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict, description="overrides of the recipe's resources")

    @field_validator("type")
    @classmethod
    def _known_type(cls, v):
        if v not in PHASES:
            raise ValueError(f"unknown phase type {v!r}; known: {', '.join(PHASES)}")
        return v


class Recipe(StrictModel):
    name: str
    output_root: str
    seed: int = Field(0, ge=0)
    model: ModelSpec
    data: DataSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    defaults: dict[str, Any] = Field(default_factory=dict, description="merged into every HF-Trainer phase's config "
                                     "(cpt, sft, rl)")
    phases: list[PhaseSpec] = Field(..., min_length=1)

    @field_validator("output_root")
    @classmethod
    def _stays_inside(cls, v: str):
        # A relative root is read against the folder the run starts from; `..` would write (and, on a rerun, replace
        # phase folders) outside it without the user ever naming that place.  An absolute path names it.
        if not v.strip():
            raise ValueError("empty")
        if not Path(v).expanduser().is_absolute() and ".." in Path(v).parts:
            raise ValueError(f"{v!r} climbs out of the folder the run starts from; give an absolute path to write "
                             "outside it")
        return v

    @model_validator(mode="after")
    def _unique_names(self):
        names = [p.name for p in self.phases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"phases: duplicate phase names {dupes}")
        return self

    @property
    def base_model_path(self) -> str:
        return str(Path(self.output_root) / "base-model") if self.model.base == "tiny" else self.model.base

    @property
    def data_root(self) -> str:
        return str(Path(self.output_root) / "world") if self.data.synth else str(self.data.root)


@dataclass
class PlannedPhase:
    spec: PhaseSpec
    config: Any  # the validated phase config
    resources: ResourcesSpec
    final_dir: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type


@dataclass
class Plan:
    recipe: Recipe
    recipe_hash: str
    phases: list[PlannedPhase]
    source: str
    warnings: list[str] = field(default_factory=list)  # valid, but probably not what was meant

    def phase(self, name: str) -> PlannedPhase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def describe(self) -> str:
        r = self.recipe
        lines = [f"recipe {r.name} ({self.source}, hash {self.recipe_hash})",
                 f"  base model: {r.model.base}" + (f" -> {r.base_model_path}" if r.model.base == "tiny" else ""),
                 f"  data: {r.data_root}" + (" (synthetic world, generated)" if r.data.synth else ""),
                 f"  ray: {r.resources.ray_address or 'local'}; wandb: {r.wandb.mode}", "  phases:"]
        for i, p in enumerate(self.phases, 1):
            cfg = p.config
            src = getattr(cfg, "model", None) or ", ".join(getattr(cfg, "checkpoints", {}) or [])
            lines.append(f"   {i}. {p.name} [{p.type}] {src} -> {p.final_dir}")
            lines.append(f"      resources: {p.resources.describe()}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


_PLACEHOLDER = re.compile(r"\{(data|output|tiny_clip|phase:[A-Za-z0-9_\-]+)\}")
TINY_CLIP_DIR = "tiny-clip"  # `{tiny_clip}`: a tiny random-init CLIP under the output root, built when first needed


def _substitute(value, mapping: dict[str, str], where: str, errors: list[str]):
    if isinstance(value, str):
        def repl(m):
            key = m.group(1)
            if key not in mapping:
                errors.append(f"{where}: unknown reference {{{key}}} (phases named so far: "
                              f"{', '.join(k[6:] for k in mapping if k.startswith('phase:')) or 'none'})")
                return m.group(0)
            return mapping[key]

        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, mapping, f"{where}.{k}", errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, mapping, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    return value


def absolute_inputs(config, data: dict) -> dict[str, str]:
    """Make each relative input path of a phase config (`input_paths()`, by dotted field name) absolute in `data` (the
    phase's config as written), against the directory the runner was started from, as the data and output roots
    are: a Ray worker runs in its own working directory, where `rows/train.jsonl` names nothing.  Values with a
    `{placeholder}` are left to substitution.  Returns {dotted name: absolute path} of what it changed."""
    changed = {}
    for dotted in config.input_paths():
        node, *keys = data, *dotted.split(".")
        try:
            for key in keys[:-1]:
                node = node[int(key)] if isinstance(node, list) else node[key]
            leaf = int(keys[-1]) if isinstance(node, list) else keys[-1]
            value = node[leaf]
        except (KeyError, IndexError, ValueError, TypeError):  # a default the recipe did not write: left as it is
            continue
        if isinstance(value, str) and value and "{" not in value and not Path(value).expanduser().is_absolute():
            node[leaf] = changed[dotted] = str(Path(value).expanduser().resolve())
    return changed


def build_plan(raw: dict, source: str = "<recipe>") -> Plan:
    """Validate a recipe and every phase config in it; raise one ConfigError listing every problem."""
    errors: list[str] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None
    recipe_hash = config_hash(raw)
    # Ray workers run in their own working directory: every local path is made absolute here, against the
    # directory the runner was started from.
    recipe.output_root = str(Path(recipe.output_root).expanduser().resolve())
    if recipe.data.root:
        recipe.data.root = str(Path(recipe.data.root).expanduser().resolve())
    if recipe.model.base != "tiny" and Path(recipe.model.base).expanduser().exists():
        recipe.model.base = str(Path(recipe.model.base).expanduser().resolve())
    mapping = {"data": recipe.data_root, "output": recipe.output_root, "phase:base": recipe.base_model_path,
               "tiny_clip": str(Path(recipe.output_root) / TINY_CLIP_DIR)}
    previous_model = recipe.base_model_path
    phases: list[PlannedPhase] = []
    warnings: list[str] = []
    for i, spec in enumerate(recipe.phases):
        where = f"phases[{i}] ({spec.name})"
        try:
            resources = ResourcesSpec.model_validate({**recipe.resources.model_dump(), **spec.resources})
        except ValidationError as exc:
            errors.extend(format_validation_error(exc, prefix=f"{where}.resources.").split("\n  ")[1:])
            resources = recipe.resources
        phase_type = get_phase(spec.type)
        cls = phase_type.config_class()
        out_dir = Path(recipe.output_root) / spec.name
        data = _substitute(spec.config, mapping, f"{where}.config", errors)
        if phase_type.hf_trainer:
            data = {**_substitute(recipe.defaults, mapping, "defaults", errors), **data}
            if resources.deepspeed:
                data.setdefault("deepspeed", resources.deepspeed)
        if resources.rollout_engine and "rollout" in cls.model_fields:
            data.setdefault("rollout", {})["engine"] = resources.rollout_engine
        ckpts = data.get("checkpoints")
        if isinstance(ckpts, list):  # checkpoints named by phase: resolve them to their final models
            resolved = {}
            for label in ckpts:
                if f"phase:{label}" in mapping:  # "base" is always there
                    resolved[label] = mapping[f"phase:{label}"]
                else:
                    errors.append(f"{where}.config.checkpoints: {label!r} is not 'base' or an earlier phase")
            data["checkpoints"] = resolved
        elif ckpts is None and phase_type.uses_model:
            data.setdefault("model", previous_model)
        data.setdefault("output_dir", str(out_dir))
        data.setdefault("seed", recipe.seed)
        data.setdefault("wandb", recipe.wandb.model_dump())
        if resources.use_gpu is False:
            data.setdefault("use_cpu", True)
        data["recipe_hash"] = recipe_hash
        if phase_type.writes_checkpoint:
            data.setdefault("parent", data.get("model"))
        try:
            config = cls.model_validate(data, context={"defer_path_checks": True})
            if absolute_inputs(config, data):
                config = cls.model_validate(data, context={"defer_path_checks": True})
        except ValidationError as exc:
            errors.extend(format_validation_error(exc, prefix=f"{where}.config.").split("\n  ")[1:])
            config = None
        final_dir = out_dir / "model" if phase_type.writes_checkpoint else out_dir
        if phase_type.writes_checkpoint:
            mapping[f"phase:{spec.name}"] = str(final_dir)
        if phase_type.produces_model:
            previous_model = str(final_dir)
        phases.append(PlannedPhase(spec=spec, config=config, resources=resources, final_dir=final_dir))
        save_steps, max_steps = getattr(config, "save_steps", None), getattr(config, "max_steps", -1)
        if phase_type.hf_trainer and save_steps and 0 < max_steps < save_steps:
            warnings.append(f"{where}: max_steps {max_steps} < save_steps {save_steps}: the phase writes no "
                            "intermediate checkpoint, so a failure or a kill loses all of it")
    if errors:
        raise ConfigError(f"{source}: {len(errors)} invalid field(s)\n  " + "\n  ".join(errors))
    return Plan(recipe=recipe, recipe_hash=recipe_hash, phases=phases, source=source, warnings=warnings)


def load_plan(path: str | Path) -> Plan:
    return build_plan(read_yaml(path), source=str(path))
