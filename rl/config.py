"""The RL phase config and its one mapping onto TRL's `GRPOConfig` (`to_grpo_config`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from patho_r1.config import StrictModel, TrainConfig
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT
from patho_r1.rewards.registry import PRESETS, RewardSpec, check_reward_specs, expand_preset, reward_labels


class RolloutConfig(StrictModel):
    """Where completions are generated.  This is the only switch between CPU and GPU rollouts.  A colocated vLLM
    engine resizes images with the phase's `min_pixels`/`max_pixels`, as the HF processor does (rl/dapo.py)."""

    engine: Literal["hf", "vllm"] = "hf"
    vllm_mode: Literal["colocate", "server"] = "colocate"
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    max_model_length: int | None = None
    enable_sleep_mode: bool = False
    server_base_url: str | None = None
    server_timeout: float = Field(240.0, gt=0, description="seconds to wait for the vLLM server before failing")


class DynamicSamplingConfig(StrictModel):
    enabled: bool = True
    max_rounds: int = Field(3, ge=0, description="cap on extra generation rounds per batch")
    min_std: float = Field(1e-6, ge=0, description="groups whose filter_metric std is at or below this are dropped")
    filter_metric: str = Field("accuracy", description="the reward whose spread decides which groups are kept "
                               "(DAPO and verl filter on accuracy), or 'total' for the weighted sum")


# What each algorithm means when a field is left unset.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"loss_type": "grpo", "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2,
             "mask_truncated_completions": False, "rewards": "grpo", "dynamic_sampling": False},
    "dapo": {"loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28,
             "mask_truncated_completions": True, "rewards": "dapo", "dynamic_sampling": True},
}


# GRPOConfig fields `to_grpo_config` sets beyond the TrainingArguments ones, and the RLPhaseConfig field that decides
# each; `trl:` may not set them.
OWNED_GRPO_ARGUMENTS: dict[str, str] = {
    **{name: name for name in ("num_generations", "temperature", "top_p", "max_completion_length", "beta", "epsilon",
                               "epsilon_high", "loss_type", "mask_truncated_completions", "scale_rewards",
                               "num_iterations", "steps_per_generation", "log_completions")},
    "reward_weights": "rewards",
    **{name: "rollout" for name in ("use_vllm", "vllm_mode", "vllm_tensor_parallel_size",
                                    "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_server_timeout",
                                    "vllm_max_model_length", "vllm_server_base_url")},
}


class RLPhaseConfig(TrainConfig):
    trl_config_class: ClassVar[str] = "GRPOConfig"

    algorithm: Literal["grpo", "dapo"] = "dapo"
    data: str = Field(..., description="MCQ JSONL/Parquet (question, options, answer[, answer_type, category, images])")
    num_generations: int = Field(8, ge=2, description="group size G")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_prompt_length: int | None = Field(None, gt=0, description="drop prompts longer than this, image tokens "
                                                                  "included")
    max_completion_length: int = Field(512, gt=0)
    beta: float | None = Field(None, ge=0, description="KL coefficient; default 0.04 (grpo) / 0 (dapo)")
    epsilon: float | None = Field(None, gt=0)
    epsilon_high: float | None = Field(None, gt=0)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] | None = None
    mask_truncated_completions: bool | None = None
    scale_rewards: Literal["group", "batch", "none"] = "group"
    rewards: str | list[RewardSpec] | None = Field(None, description="preset name or list; default by algorithm")
    dynamic_sampling: DynamicSamplingConfig | None = None
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    system_prompt: str | None = REASONING_SYSTEM_PROMPT
    num_iterations: int = Field(1, gt=0)
    steps_per_generation: int | None = Field(None, gt=0)
    log_completions: bool = False
    learning_rate: float = Field(1e-6, gt=0)

    @field_validator("rewards")
    @classmethod
    def _known_preset(cls, v):
        if isinstance(v, str) and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; presets: {', '.join(PRESETS)}")
        return v

    def input_paths(self) -> dict[str, str]:
        return {**super().input_paths(), "data": self.data}

    def owned_trl_fields(self) -> dict[str, str]:
        return {**super().owned_trl_fields(), **OWNED_GRPO_ARGUMENTS}

    @model_validator(mode="after")
    def _fill_algorithm_defaults(self):
        d = ALGORITHM_DEFAULTS[self.algorithm]
        for name in ("loss_type", "beta", "epsilon", "epsilon_high", "mask_truncated_completions", "rewards"):
            if getattr(self, name) is None:
                setattr(self, name, d[name])
        if self.dynamic_sampling is None:
            self.dynamic_sampling = DynamicSamplingConfig(enabled=d["dynamic_sampling"])
        specs = expand_preset(self.rewards)
        problems = check_reward_specs(specs)  # unknown names, parameter typos, non-rewards: now, not after CPT+SFT
        if problems:
            raise ValueError("\n  ".join(problems))
        for i, spec in enumerate(specs):
            limit = spec.params.get("max_completion_length")
            if spec.name == "soft_overlong" and limit is not None and limit != self.max_completion_length:
                raise ValueError(f"rewards.{i}.max_completion_length: {limit} disagrees with the phase's "
                                 f"max_completion_length ({self.max_completion_length}); set it once, in the phase")
        labels = reward_labels(specs)
        metric = self.dynamic_sampling.filter_metric
        if self.dynamic_sampling.enabled and metric != "total" and metric not in labels:
            raise ValueError(f"dynamic_sampling.filter_metric: {metric!r} is not one of this phase's rewards "
                             f"({', '.join(labels)}) or 'total'")
        rows = self.per_device_train_batch_size * (self.steps_per_generation or self.gradient_accumulation_steps)
        if rows % self.num_generations:
            raise ValueError(f"num_generations: the generation batch (per_device_train_batch_size x "
                             f"steps_per_generation = {rows}) must be divisible by num_generations "
                             f"({self.num_generations})")
        return self


def to_grpo_config(cfg: RLPhaseConfig, base_arguments: dict[str, Any], reward_weights: list[float] | None = None):
    """The single place where our RL config becomes TRL's `GRPOConfig` (`base_arguments`: the TrainingArguments
    fields shared by every phase, from `patho_r1.training.training_arguments`)."""
    from trl import GRPOConfig

    from patho_r1.training import precision

    rollout = cfg.rollout
    vllm: dict[str, Any] = {"use_vllm": rollout.engine == "vllm"}
    if rollout.engine == "vllm":
        vllm.update(vllm_mode=rollout.vllm_mode, vllm_tensor_parallel_size=rollout.tensor_parallel_size,
                    vllm_gpu_memory_utilization=rollout.gpu_memory_utilization,
                    vllm_enable_sleep_mode=rollout.enable_sleep_mode, vllm_server_timeout=rollout.server_timeout,
                    vllm_max_model_length=rollout.max_model_length)
        if rollout.server_base_url:
            vllm["vllm_server_base_url"] = rollout.server_base_url
    mixed = precision(cfg)
    reference = {}
    if cfg.beta and mixed.weights != mixed.compute and "model_init_kwargs" not in cfg.trl:
        # TRL builds the KL reference model in the policy's dtype; a frozen model needs no fp32 master copy
        reference["model_init_kwargs"] = {"dtype": mixed.compute}
    return GRPOConfig(
        **base_arguments,
        **reference,
        num_generations=cfg.num_generations,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        mask_truncated_completions=cfg.mask_truncated_completions,
        scale_rewards=cfg.scale_rewards,
        num_iterations=cfg.num_iterations,
        steps_per_generation=cfg.steps_per_generation,
        log_completions=cfg.log_completions,
        reward_weights=reward_weights,
        **vllm,
        **cfg.trl,
    )
