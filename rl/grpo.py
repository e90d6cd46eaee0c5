"""Phase 3: GRPO / DAPO on TRL's `GRPOTrainer` (with our dynamic-sampling subclass), HF or vLLM rollouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from patho_r1.config import PhaseResult
from patho_r1.rewards.registry import build_rewards
from patho_r1.rl.config import RLPhaseConfig, to_grpo_config
from patho_r1.rl.dapo import DynamicSamplingGRPOTrainer
from patho_r1.rl.data import build_rl_dataset
from patho_r1.rl.vllm_engine import vllm_processor_kwargs
from patho_r1.training import (
    JsonlMetricsCallback,
    load_phase_backbone,
    quiet_trainer_printing,
    setup_wandb,
    train_and_finalize,
    training_arguments,
)


def check_rollout_engine(cfg: RLPhaseConfig) -> None:
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError("rollout.engine is 'vllm' but vllm is not installed: pip install -e '.[vllm]' on a GPU "
                          "machine, or set rollout.engine: hf")


def build_rl_trainer(cfg: RLPhaseConfig, callbacks=()) -> DynamicSamplingGRPOTrainer:
    check_rollout_engine(cfg)
    cfg.check_inputs()
    run_name = f"rl-{cfg.algorithm}-{Path(cfg.output_dir).name}"
    setup_wandb(cfg.wandb, run_name, cfg.output_dir)
    backbone = load_phase_backbone(cfg, padding_side="left")
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm_mode == "server":
        # A colocated engine gets the processor's pixel budget (rl/dapo.py); a server resizes images with its own
        budget = json.dumps(vllm_processor_kwargs(backbone.processor))
        print(f"[rl] vLLM server mode: start the server with --mm-processor-kwargs '{budget}', or its image token "
              "counts differ from the trainer's", flush=True)
    dataset = build_rl_dataset(cfg.data, cfg.system_prompt, backbone.processor, cfg.max_prompt_length)
    reward_set = build_rewards(cfg.rewards, max_completion_length=cfg.max_completion_length)
    args = to_grpo_config(cfg, training_arguments(cfg, run_name), reward_weights=reward_set.weights)
    ds = cfg.dynamic_sampling
    trainer = DynamicSamplingGRPOTrainer(
        model=backbone.model,
        reward_funcs=reward_set.funcs,
        args=args,
        train_dataset=dataset,
        processing_class=backbone.processor,
        peft_config=cfg.lora.to_peft() if cfg.lora else None,
        callbacks=[JsonlMetricsCallback(Path(cfg.output_dir) / "metrics.jsonl", f"rl-{cfg.algorithm}"), *callbacks],
        dynamic_sampling=ds.enabled,
        max_rounds=ds.max_rounds,
        min_std=ds.min_std,
        filter_metric=ds.filter_metric,
        refill_seed=cfg.seed,
    )
    quiet_trainer_printing(trainer)
    trainer.reward_set = reward_set
    return trainer


def run_rl(cfg: RLPhaseConfig, callbacks=()) -> PhaseResult:
    trainer = build_rl_trainer(cfg, callbacks)
    return train_and_finalize(trainer, trainer.processing_class, cfg, f"rl-{cfg.algorithm}",
                              after_train=trainer.reward_set.close)
