"""Typed configuration shared by every training phase, and YAML loading that reports every bad field at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from patho_r1.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraSpec(StrictModel):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Language-model projections only; the vision tower's Linear layers are named qkv/proj/mlp.* and are not matched.
    target_modules: str | list[str] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save: list[str] | None = None

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, modules_to_save=self.modules_to_save,
                          task_type="CAUSAL_LM")


class WandbConfig(StrictModel):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "patho-r1"
    entity: str | None = None
    run_name: str | None = None

    def report_to(self) -> list[str]:
        return [] if self.mode == "disabled" else ["wandb"]


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# The vision tower's attention kernels (patho_r1.attention): auto picks the fastest this machine has.
VisionAttention = Literal["auto", "batched", "varlen", "flash_attn", "transformers"]


@dataclass
class PhaseResult:
    """What every phase's runner returns: where its final output is, how many optimizer steps it took, its metrics."""

    model_dir: Path
    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


class PhaseConfig(StrictModel):
    """What every phase config has: the model, where outputs go, seed, dtype, device, wandb, pixel budget, lineage.

    Subclasses list the files they read in `input_paths()`; they are checked when the config is validated (unless
    a recipe defers path checks until earlier phases have run) and again by `check_inputs()` when the phase starts.
    """

    model: str | None = Field(None, description="hub id or local save_pretrained directory")
    output_dir: str
    seed: int = Field(0, ge=0)
    dtype: Dtype = "auto"
    use_cpu: bool | None = Field(None, description="None: the GPU when one is visible, else the CPU")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    # Lineage, filled in by the recipe runner.
    recipe_hash: str | None = None
    parent: str | None = None

    @model_validator(mode="after")
    def _check_base(self, info: ValidationInfo):
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels: must not exceed max_pixels")
        if not paths_deferred(info):
            for name, path in self.input_paths().items():
                if not Path(path).exists():
                    raise ValueError(f"{name}: not found: {path}")
        return self

    def runs_on_cpu(self) -> bool:
        """The one reading of `use_cpu` every phase shares."""
        if self.use_cpu is not None:
            return self.use_cpu
        import torch

        return not torch.cuda.is_available()

    def input_paths(self) -> dict[str, str]:
        """Files this phase reads, by field name."""
        return {}

    def check_inputs(self) -> None:
        """Fail, naming the field, when an input is missing.  Runs before any model is loaded."""
        if self.model is not None:
            check_model_reference("model", self.model)
        for name, path in self.input_paths().items():
            if not Path(path).exists():
                raise ConfigError(f"{name}: not found: {path}")


# TrainingArguments fields that `patho_r1.training.training_arguments` sets, and the TrainConfig field that decides
# each.  A `trl:` block may not set these (the phase field is the one place); a test keeps this table equal to what
# is passed.  It lives beside TrainConfig, like `rl/config.py`'s OWNED_GRPO_ARGUMENTS, so the config imports nothing
# of the trainer.
OWNED_TRAINING_ARGUMENTS: dict[str, str] = {
    "output_dir": "output_dir", "run_name": "output_dir", "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler_type", "warmup_steps": "warmup_ratio", "weight_decay": "weight_decay",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps", "gradient_checkpointing": "gradient_checkpointing", "bf16": "dtype", "fp16": "dtype",
    "use_cpu": "use_cpu", "deepspeed": "deepspeed", "seed": "seed", "data_seed": "seed",
    "logging_steps": "logging_steps", "save_strategy": "save_steps", "save_steps": "save_steps",
    "save_total_limit": "save_total_limit", "report_to": "wandb", "dataloader_num_workers": "dataloader_num_workers",
    "ddp_find_unused_parameters": "freeze_vision_tower",
    "remove_unused_columns": "(fixed: the collators read raw columns)",
    "disable_tqdm": "(fixed: the metrics callback prints progress)",
}


class TrainConfig(PhaseConfig):
    """Fields every HF-Trainer phase has (CPT, SFT, RL), and `trl:`, a validated pass-through to TRL's config."""

    # The TRL config class this phase builds; `trl:` keys are checked against its fields.
    trl_config_class: ClassVar[str] = "SFTConfig"

    model: str = Field(..., description="hub id or local save_pretrained directory")
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    per_device_train_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides epochs; -1: train num_train_epochs")
    max_length: int | None = Field(2048, gt=0)
    attn_implementation: str | None = Field(
        None, description="the language model's attention; None/auto: flash_attention_2 where flash-attn is "
        "installed on a GPU, else sdpa")
    vision_attention: VisionAttention = Field(
        "auto", description="the vision tower's attention (patho_r1.attention); auto: the fastest this machine has")
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    merge_lora: bool = Field(False, description="merge the LoRA adapter into the saved final model")
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config path")
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0, description="intermediate checkpoint every N optimizer steps")
    save_total_limit: int | None = Field(2, gt=0)
    resume: bool = Field(False, description="continue from the newest intermediate checkpoint")
    dataloader_num_workers: int = Field(0, ge=0)
    trl: dict[str, Any] = Field(default_factory=dict, description="extra fields of TRL's SFTConfig / GRPOConfig "
                                "(max_grad_norm, optim, top_k, ...), checked against that class")

    @model_validator(mode="after")
    def _check_fields(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps: {self.max_steps} trains nothing; give a step count > 0, or -1 for epochs")
        if self.merge_lora and self.lora is None:
            raise ValueError("merge_lora: set only together with lora")
        if self.trl:
            self._check_trl_block()
        return self

    def _check_trl_block(self) -> None:
        """Every `trl:` key must be a field of the TRL config class, and not one a phase field already decides."""
        import dataclasses

        import trl

        trl_fields = {f.name for f in dataclasses.fields(getattr(trl, self.trl_config_class))}
        owned = self.owned_trl_fields()
        for key in self.trl:
            if key not in trl_fields:
                raise ValueError(f"trl.{key}: not a field of trl.{self.trl_config_class}")
            if key in owned:
                raise ValueError(f"trl.{key}: set by this phase's own field {owned[key]!r}; set it there")

    def owned_trl_fields(self) -> dict[str, str]:
        """TRL config fields this phase's own fields decide (TRL field -> our field)."""
        return dict(OWNED_TRAINING_ARGUMENTS)

    def input_paths(self) -> dict[str, str]:
        return {"deepspeed": self.deepspeed} if self.deepspeed else {}


def is_local_model_path(value: str) -> bool:
    """Whether a model reference names a local folder rather than a hub id (`org/name`)."""
    return value.startswith((".", "/", "~")) or Path(value).exists() or value.count("/") != 1


def check_model_reference(field: str, value: str) -> None:
    """A model given as a local path must be a checkpoint directory; `org/name` is left to the hub."""
    p = Path(value)
    if is_local_model_path(value) and not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise ConfigError(f"{field}: {value} is not a model directory (no config.json) and not a hub id")


def paths_deferred(info: ValidationInfo | None) -> bool:
    """A recipe validates phase configs before earlier phases have written their outputs; it passes
    `context={"defer_path_checks": True}` and each phase checks its inputs when it starts (`check_inputs`)."""
    return bool(info is not None and info.context and info.context.get("defer_path_checks"))


def format_validation_error(exc: ValidationError, prefix: str = "", source: str | None = None) -> str:
    """Every error of a pydantic validation, one line each, as `source: field.path: message`."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        if not err["loc"] and ": " in msg:  # model-level validators name their field first
            loc, _, msg = msg.partition(": ")
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "<root>"
        lines.append(f"{loc}: {msg}")
    head = f"{source}: " if source else ""
    return head + f"{len(lines)} invalid field(s)\n  " + "\n  ".join(lines)


def validate_config(cls: type[T], data: dict[str, Any], *, prefix: str = "", source: str | None = None,
                    defer_path_checks: bool = False) -> T:
    try:
        return cls.model_validate(data, context={"defer_path_checks": defer_path_checks})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8 (save the file as "
                          "UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}: invalid YAML: {where}{what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    data = read_yaml(path)
    data.update(overrides or {})
    return validate_config(cls, data, source=str(path))
