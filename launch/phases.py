"""The phase table: every phase type a recipe can name, with its config class, its runner and how it runs.

    PHASES["sft"].config_class()   # -> SFTPhaseConfig
    PHASES["sft"].run(cfg)         # -> PhaseResult

Adding a phase type is one `register_phase` call (in the style of verl's `register_adv_est`): the recipe schema, the
plan, the Ray runner and the workers all read this table, and nothing else dispatches on a phase's type.  Config
classes and runners are named by import string, so looking a phase up never imports torch or TRL; the runner is
imported only on the worker that runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PhaseType:
    name: str
    config: str  # "module:Class", a `patho_r1.config.PhaseConfig` subclass
    runner: str  # "module:function", `run(cfg[, callbacks]) -> PhaseResult`
    ray_train: bool  # runs on Ray Train workers (process group, placement group, restarts); else one Ray task
    hf_trainer: bool = False  # an HF-Trainer phase: recipe `defaults` and `deepspeed` apply, it takes callbacks and
    # resumes from its newest intermediate checkpoint when Ray restarts it
    writes_checkpoint: bool = False  # its final output is a checkpoint in OUTPUT_DIR/model, named by {phase:NAME}
    produces_model: bool = False  # that checkpoint is the next phase's default `model` (embed's adapter is not)
    uses_model: bool = True  # reads a model (the recipe's base or an earlier phase's); curate does not
    headline: tuple[str, ...] = ("loss",)  # the metrics.jsonl keys the console shows beside the progress bar
    summary: str = ""

    def config_class(self) -> type:
        return _load(self.config)

    def run(self, cfg, callbacks=()):
        runner = _load(self.runner)
        return runner(cfg, callbacks=callbacks) if self.hf_trainer else runner(cfg)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


PHASES: dict[str, PhaseType] = {}


def register_phase(phase: PhaseType, *, overwrite: bool = False) -> PhaseType:
    if phase.name in PHASES and not overwrite:
        raise ValueError(f"phase type {phase.name!r} is already registered")
    PHASES[phase.name] = phase
    return phase


def get_phase(name: str) -> PhaseType:
    try:
        return PHASES[name]
    except KeyError:
        raise KeyError(f"unknown phase type {name!r}; known: {', '.join(PHASES)}") from None


register_phase(PhaseType(
    "cpt", "patho_r1.sft.config:CPTPhaseConfig", "patho_r1.sft.cpt:run_cpt", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="continued pretraining on image-caption pairs"))
register_phase(PhaseType(
    "sft", "patho_r1.sft.config:SFTPhaseConfig", "patho_r1.sft.sft:run_sft", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="chain-of-thought SFT on conversations"))
register_phase(PhaseType(
    "rl", "patho_r1.rl.config:RLPhaseConfig", "patho_r1.rl.grpo:run_rl", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="GRPO / DAPO on MCQ prompts",
    headline=("reward", "rewards/accuracy/mean", "dynamic_sampling/filtered_frac")))
register_phase(PhaseType(
    "embed", "patho_r1.embed.config:EmbedPhaseConfig", "patho_r1.embed.train:run_embed", ray_train=True,
    writes_checkpoint=True, summary="the embedding head (a LoRA adapter beside the reasoner)"))
register_phase(PhaseType(
    "clip", "patho_r1.embed.clip_config:ClipPhaseConfig", "patho_r1.embed.clip_train:run_clip", ray_train=True,
    writes_checkpoint=True, uses_model=False, summary="PathoCLIP: two-stage CLIP training on caption records"))
register_phase(PhaseType(
    "eval", "patho_r1.eval.phase:EvalPhaseConfig", "patho_r1.eval.phase:run_eval", ray_train=False, headline=(),
    summary="score checkpoints on an MCQ set"))
register_phase(PhaseType(
    "curate", "patho_r1.curate.config:CuratePhaseConfig", "patho_r1.launch.curate_phase:run_curate", ray_train=False,
    uses_model=False, headline=(), summary="the data engine: import, dedup, decontaminate, tag, cluster"))
