"""PathoCLIP training, in the Patho-R1 paper's two stages, on `caption` records (the data engine's output).

    patho-r1 clip train CONFIG.yaml            # or a `clip` phase in a recipe

Stage I trains image and text towers contrastively on a morphology-rich corpus.  Stage II continues on a mixed corpus
and must not wash out what stage I learned.  Two mechanisms, both in `ClipStage`:

- `anchor_weight` (L2-SP, Li et al. 2018, "Explicit inductive bias for transfer learning"): the loss gains
  `w * sum((theta - theta_I)^2)` over every trained weight, `theta_I` being the weights stage I ended with.  This is
  the recipes' choice: it bounds how far *every* weight drifts, costs one copy of the weights, and needs no second
  forward pass (a distillation anchor would run the frozen stage I model on every batch).
- `vision_lr_scale`: the image tower at a fraction of the learning rate, the lighter alternative.

`drift` (the relative L2 distance from stage I's weights) is logged, and the tests check that the anchor limits it.

The loss is `embed.loss.info_nce` (symmetric, negatives gathered across ranks) at CLIP's own learned temperature,
and `grad_cache_step` when `grad_cache_chunk` is set: the same code the HOMIE embedder trains with.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from patho_r1.checkpoint import Manifest, seal
from patho_r1.config import PhaseResult
from patho_r1.data import CaptionRecord, load_records
from patho_r1.embed.clip import ClipEmbedder
from patho_r1.embed.clip_config import ClipPhaseConfig, ClipStage
from patho_r1.embed.contrastive_loop import StepLog, phase_log, stage_plan, train_contrastive_stage, world
from patho_r1.embed.loss import info_nce
from patho_r1.errors import ConfigError
from patho_r1.training import compute_dtype


def load_pairs(stage: ClipStage) -> list[CaptionRecord]:
    """Every file's caption records (each capped at `max_pairs`), pooled."""
    return [r for path in stage.data for r in load_records(path, "caption")[: stage.max_pairs]]


def snapshot(clip: ClipEmbedder) -> dict[str, torch.Tensor]:
    """A detached copy of the trained weights: stage II's anchor."""
    return {n: p.detach().clone() for n, p in clip.model.named_parameters() if p.requires_grad}


def anchor_penalty(clip: ClipEmbedder, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-SP: the squared distance of the trained weights from the anchor's."""
    return sum(((p - anchor[n]) ** 2).sum() for n, p in clip.model.named_parameters() if n in anchor)


def drift(clip: ClipEmbedder, anchor: dict[str, torch.Tensor]) -> float:
    """||theta - theta_I|| / ||theta_I||: how far training moved the weights from the anchor, as a share."""
    with torch.no_grad():
        moved = math.sqrt(float(anchor_penalty(clip, anchor)))
        size = math.sqrt(sum(float((a ** 2).sum()) for a in anchor.values()))
    return moved / max(size, 1e-12)


def _optimizer(clip: ClipEmbedder, stage: ClipStage) -> torch.optim.Optimizer:
    vision = {id(p) for p in clip.vision_parameters}
    params = [p for p in clip.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in vision], "lr": stage.learning_rate},
              {"params": [p for p in params if id(p) in vision], "lr": stage.learning_rate * stage.vision_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=stage.weight_decay)


def train_stage(clip: ClipEmbedder, stage: ClipStage, name: str, cfg: ClipPhaseConfig, log: StepLog,
                anchor: dict[str, torch.Tensor] | None = None) -> dict:
    """One stage; returns {"steps", "first_loss", "last_loss", "drift"} (losses: means over the first and last
    tenth of the steps)."""
    records = load_pairs(stage)
    plan, _ = stage_plan(cfg.seed, name, [(records, stage.epochs)], stage.batch_size, stage.max_steps)
    if not plan:
        raise ValueError(f"{name}: {len(records)} pairs make no batch of {stage.batch_size} per rank")
    optimizer = _optimizer(clip, stage)
    params = [p for p in clip.model.parameters() if p.requires_grad]
    # the temperature is CLIP's learned logit scale, read inside the loss so that it trains too
    loss_fn = functools.partial(_clip_loss, clip)

    def sides(batch: list[CaptionRecord]):
        return [{"images": r.images[:1]} for r in batch], [r.caption for r in batch], loss_fn

    penalty = None
    if anchor is not None and stage.anchor_weight > 0:
        def penalty() -> torch.Tensor:
            return stage.anchor_weight * anchor_penalty(clip, anchor)

    losses = train_contrastive_stage(clip, plan, name, params=params, optimizer=optimizer, log=log, sides=sides,
                                     grad_cache_chunk=stage.grad_cache_chunk, penalty=penalty,
                                     log_extra=(lambda: {"drift": drift(clip, anchor)}) if anchor is not None else None)
    tenth = max(1, len(losses) // 10)
    return {"steps": len(plan), "first_loss": float(np.mean(losses[:tenth])),
            "last_loss": float(np.mean(losses[-tenth:])), "drift": drift(clip, anchor) if anchor else None}


def _clip_loss(clip: ClipEmbedder, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    return info_nce(image_emb, text_emb, temperature=clip.temperature())


def clip_compute_dtype(cfg: ClipPhaseConfig) -> torch.dtype | None:
    """The autocast dtype of `dtype` (`auto`: bf16 on a GPU, fp32 on a CPU); None for fp32.  The weights stay fp32
    either way, as in every phase (`patho_r1.training.Precision`)."""
    compute = compute_dtype(cfg.dtype, cfg.runs_on_cpu())
    if compute == "float16":
        raise ConfigError("dtype: float16 needs loss scaling, which the clip phase does not do; use bfloat16")
    return torch.bfloat16 if compute == "bfloat16" else None


def run_clip(cfg: ClipPhaseConfig) -> PhaseResult:
    """Stage I, stage II (anchored to stage I), optional evaluation, then the checkpoint under OUTPUT_DIR/model."""
    cfg.check_inputs()
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    clip = ClipEmbedder.from_pretrained(cfg.model)  # fp32 weights: the optimizer's master copy
    clip.autocast_dtype = clip_compute_dtype(cfg)
    if not cfg.runs_on_cpu():
        clip.to(f"cuda:{torch.cuda.current_device()}")
    is_main = world()[0] == 0
    metrics: dict = {}
    with phase_log(cfg, "clip") as log:
        metrics["stage1"] = train_stage(clip, cfg.stage1, "stage1", cfg, log)
        if cfg.stage2:
            metrics["stage2"] = train_stage(clip, cfg.stage2, "stage2", cfg, log, anchor=snapshot(clip))
        steps = sum(m["steps"] for m in (metrics["stage1"], metrics.get("stage2") or {"steps": 0}))
        if is_main:
            clip.eval()
            if cfg.eval:
                from patho_r1.embed.clip_eval import evaluate_model, write_comparison

                metrics["eval"] = evaluate_model(clip, cfg.eval)
                write_comparison(out / "eval", {"pathoclip": metrics["eval"]}, cfg.eval)
                log.wandb_log({"eval": metrics["eval"]})
            stages = {k: v for k, v in metrics.items() if k != "eval"}
            flat = {f"{stage}_{key}": float(value) for stage, m in stages.items() for key, value in m.items()
                    if value is not None}
            seal(out / "model", Manifest.of_phase(cfg, "clip", steps, metrics=flat, extra={"stages": stages}),
                 clip.save_pretrained)
    return PhaseResult(model_dir=out / "model", global_step=steps, metrics=metrics)
