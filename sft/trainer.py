"""One supervised run on TRL's `SFTTrainer`, shared by CPT and SFT: config -> trainer -> train/resume -> final save."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from patho_r1.config import PhaseResult
from patho_r1.sft.collator import PathoVLMCollator
from patho_r1.sft.config import _SupervisedConfig
from patho_r1.stain import hed_jitter
from patho_r1.training import (
    JsonlMetricsCallback,
    ResumeWeightsMixin,
    load_phase_backbone,
    quiet_trainer_printing,
    setup_wandb,
    train_and_finalize,
    training_arguments,
)


class PathoSFTTrainer(ResumeWeightsMixin, SFTTrainer):
    """TRL's SFTTrainer with weights that really come back on resume (see `ResumeWeightsMixin`), and a loss that is
    the mean over every trainable token of the optimizer step.

    Qwen2.5-VL declares `accepts_loss_kwargs = False`, so `Trainer` never counts `num_items_in_batch`, and TRL's loss
    became the mean of each micro-batch's token mean: with gradient accumulation or several ranks, a short sequence
    weighed more than a long one, and 2 ranks x batch b did not compute what 1 rank x 2b computes.  TRL's
    `compute_loss` normalises by `num_items_in_batch` itself (the model never sees it), so telling `Trainer` the model
    takes it makes the count happen: summed over the accumulated micro-batches and gathered across ranks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counted = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training and "attention_mask" not in inputs:
            # TRL 1.16 counts a padding-free batch's tokens as `position_ids.size(1)`, which is 1 for Qwen2.5-VL's
            # packed [4, 1, tokens] positions; every token of a packed row is real.
            local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(local).sum()) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result


def sft_arguments(cfg: _SupervisedConfig, phase: str) -> SFTConfig:
    """The single place where a supervised phase config becomes TRL's `SFTConfig` (its `trl:` block last)."""
    return SFTConfig(
        **training_arguments(cfg, run_name=f"{phase}-{Path(cfg.output_dir).name}"),
        max_length=cfg.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,  # TRL refuses packing for vision data; our collator packs (`cfg.packing`, sft/packing.py)
        **cfg.trl,
    )


def build_sft_trainer(cfg: _SupervisedConfig, phase: str, train_dataset, *, system_prompt: str | None,
                      callbacks=()) -> tuple[PathoSFTTrainer, object]:
    """Build the TRL trainer for a phase without training (benchmarks and tests reuse it)."""
    setup_wandb(cfg.wandb, run_name=f"{phase}-{Path(cfg.output_dir).name}", output_dir=cfg.output_dir)
    backbone = load_phase_backbone(cfg, padding_side="right")
    model, processor = backbone.model, backbone.processor
    augment = None
    if cfg.augment is not None:
        augment = functools.partial(hed_jitter, sigma=cfg.augment.hed_sigma, bias=cfg.augment.hed_bias)
    collator = PathoVLMCollator(processor=processor, max_length=cfg.max_length, completion_only_loss=True,
                                system_prompt=system_prompt, augment=augment, augment_seed=cfg.seed,
                                model_config=model.config, packing=cfg.packing)
    trainer = PathoSFTTrainer(
        model=model,
        args=sft_arguments(cfg, phase),
        train_dataset=train_dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=cfg.lora.to_peft() if cfg.lora else None,
        callbacks=[JsonlMetricsCallback(Path(cfg.output_dir) / "metrics.jsonl", phase), *callbacks],
    )
    quiet_trainer_printing(trainer)
    return trainer, processor


def run_supervised(cfg: _SupervisedConfig, phase: str, train_dataset, *, system_prompt: str | None,
                   callbacks=()) -> PhaseResult:
    trainer, processor = build_sft_trainer(cfg, phase, train_dataset, system_prompt=system_prompt,
                                           callbacks=callbacks)
    return train_and_finalize(trainer, processor, cfg, phase)
