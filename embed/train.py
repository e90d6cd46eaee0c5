"""Training the embedding head: stage 1 (text pairs into the LoRA), stage 2 (image-text pairs with a curriculum,
stain augmentation and native resolution), then optional bootstrap filtering and evaluation.

Each stage runs the contrastive loop PathoCLIP shares (`embed.contrastive_loop`: a plain PyTorch loop, for GradCache),
with this head's batches: query and positive sides, stain-jittered in stage 2, under InfoNCE.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from patho_r1.checkpoint import Manifest, seal
from patho_r1.config import PhaseResult
from patho_r1.data import EmbedPairRecord, load_image, load_records
from patho_r1.embed.config import BootstrapConfig, EmbedPhaseConfig, StageConfig
from patho_r1.embed.contrastive_loop import StepLog, phase_log, stage_plan, train_contrastive_stage, world
from patho_r1.embed.loss import info_nce
from patho_r1.embed.model import Embedder, EmbedInput
from patho_r1.stain import hed_jitter


def _group_ids(records: list[EmbedPairRecord]) -> torch.Tensor | None:
    ids = [r.target_id for r in records]
    if any(i is None for i in ids):
        return None
    vocab: dict[str, int] = {}
    return torch.tensor([vocab.setdefault(i, len(vocab)) for i in ids])


def _augment(side, rng: np.random.Generator, sigma: float, bias: float) -> EmbedInput:
    """Decode and stain-jitter a side's images once per step, so GradCache's two passes see the same pixels."""
    item = EmbedInput.of(side)
    return EmbedInput(text=item.text,
                      images=[hed_jitter(load_image(r), sigma=sigma, bias=bias, rng=rng) for r in item.images],
                      frames=[hed_jitter(load_image(r), sigma=sigma, bias=bias, rng=rng) for r in item.frames])


def train_stage(embedder: Embedder, stage: StageConfig, name: str, cfg: EmbedPhaseConfig, log: StepLog) -> int:
    """Run one stage's curriculum (datasets in order, each for its epochs).  Returns optimizer steps taken."""
    datasets = [(load_records(step.data, "embed_pair")[: step.max_pairs], step.epochs) for step in stage.curriculum]
    plan, rng = stage_plan(cfg.seed, name, datasets, stage.batch_size, stage.max_steps)
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.0)
    aug = cfg.stain_augment if name == "stage2" else None

    def sides(batch: list[EmbedPairRecord]):
        if aug is not None:
            queries = [_augment(r.query, rng, aug.hed_sigma, aug.hed_bias) for r in batch]
            positives = [_augment(r.positive, rng, aug.hed_sigma, aug.hed_bias) for r in batch]
        else:
            queries, positives = [r.query for r in batch], [r.positive for r in batch]
        return queries, positives, functools.partial(info_nce, temperature=cfg.temperature, groups=_group_ids(batch))

    return len(train_contrastive_stage(embedder, plan, name, params=params, optimizer=optimizer, log=log,
                                       sides=sides, grad_cache_chunk=stage.grad_cache_chunk))


def bootstrap_filter(embedder: Embedder, bcfg: BootstrapConfig, default_dir: Path, batch_size: int = 32) -> dict:
    """Score every pair; write the pairs with cosine similarity >= threshold as a new dataset, plus a report."""
    records = load_records(bcfg.data, "embed_pair")
    q = embedder.encode([r.query for r in records], batch_size=batch_size)
    p = embedder.encode([r.positive for r in records], batch_size=batch_size)
    sims = (q * p).sum(1)
    keep = sims >= bcfg.threshold
    out = Path(bcfg.output) if bcfg.output else default_dir / Path(bcfg.data).name
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:  # image paths were made absolute while loading, so the new file works anywhere
        for r, k in zip(records, keep, strict=True):
            if k:
                fh.write(json.dumps(r.model_dump(mode="json", exclude_none=True), ensure_ascii=False) + "\n")
    report = {"source": bcfg.data, "output": str(out), "threshold": bcfg.threshold, "total": len(records),
              "kept": int(keep.sum()), "dropped": int((~keep).sum()),
              "similarity": {"mean": float(sims.mean()), "min": float(sims.min()), "max": float(sims.max()),
                             "quantiles": {str(q_): float(np.quantile(sims, q_)) for q_ in (0.1, 0.25, 0.5, 0.75)}},
              "dropped_ids": [r.id for r, k in zip(records, keep, strict=True) if not k][:1000]}
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_embedder(cfg: EmbedPhaseConfig) -> Embedder:
    torch.manual_seed(cfg.seed)
    lora = cfg.lora.to_peft()
    modules = []
    if cfg.train_vision_tower:
        modules.append("visual")
    elif cfg.train_projector:
        modules.append("merger")
    if modules:
        lora.modules_to_save = modules
    embedder = Embedder.from_pretrained(cfg.model, dtype=cfg.dtype, min_pixels=cfg.min_pixels,
                                        max_pixels=cfg.max_pixels)
    embedder.add_adapter(lora)
    embedder.keep_fp32_masters()
    if cfg.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    if not cfg.runs_on_cpu():
        embedder.to(f"cuda:{torch.cuda.current_device()}")
    return embedder


def run_embed(cfg: EmbedPhaseConfig) -> PhaseResult:
    from patho_r1.embed.evaluate import evaluate_embedder, write_results

    cfg.check_inputs()
    out = Path(cfg.output_dir)
    embedder = build_embedder(cfg)
    is_main = world()[0] == 0
    steps = 0
    metrics: dict = {}
    with phase_log(cfg, "embed") as log:
        if cfg.stage1:
            steps += train_stage(embedder, cfg.stage1, "stage1", cfg, log)
        if cfg.stage2:
            steps += train_stage(embedder, cfg.stage2, "stage2", cfg, log)
        if is_main:
            embedder.eval()
            if cfg.bootstrap:
                metrics["bootstrap"] = bootstrap_filter(embedder, cfg.bootstrap, out / "filtered")
            if cfg.eval:
                results = evaluate_embedder(embedder, cfg.eval.composed, cfg.eval.classification,
                                            cfg.eval.batch_size)
                write_results(out / "eval", results)
                metrics["eval"] = results
                log.wandb_log({"eval": results})
            seal(out / "model", Manifest.of_phase(cfg, "embed", steps,
                                                  extra={"base_model": cfg.model, "adapter": "embed"}),
                 embedder.save_adapter)
    return PhaseResult(model_dir=out / "model", global_step=steps, metrics=metrics)
