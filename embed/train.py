"""Training the embedding head: stage 1 (text pairs into the LoRA), stage 2 (image-text pairs with a curriculum,
stain augmentation and native resolution), then optional bootstrap filtering and evaluation.

A plain PyTorch loop rather than HF Trainer: GradCache needs two passes per step, which Trainer's step does not allow.
Under Ray Train (or torchrun) the process group is already set up; gradients are averaged across ranks and every
rank's embeddings serve as negatives for every other (see `embed.loss`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from patho_r1.checkpoint import Manifest, atomic_directory, lineage_digest, write_manifest
from patho_r1.config import PhaseResult
from patho_r1.data import EmbedPairRecord, load_image, load_records
from patho_r1.embed.config import BootstrapConfig, EmbedPhaseConfig, StageConfig
from patho_r1.embed.loss import average_gradients, grad_cache_step, info_nce
from patho_r1.embed.model import Embedder, EmbedInput
from patho_r1.stain import hed_jitter
from patho_r1.training import wandb_run


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _no_wandb(metrics, step=None) -> None:
    """Ranks other than 0 (and runs with wandb disabled) log nothing."""


class _Log:
    """Every `every` steps: a row in metrics.jsonl, a progress line, and a wandb point."""

    def __init__(self, path: Path, every: int, wandb_log=_no_wandb, phase: str = "embed"):
        self.path, self.every, self.t0, self.wandb_log, self.phase = path, every, time.time(), wandb_log, phase
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, step: int, total: int, loss: float, lr: float, **extra: float):
        if _world()[0] != 0 or (step % self.every and step != total):
            return
        row = {"phase": self.phase, "stage": stage, "step": step, "total": total, "loss": loss, "learning_rate": lr,
               **extra, "time": round(time.time() - self.t0, 2)}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.wandb_log({f"{stage}/loss": loss, f"{stage}/learning_rate": lr, **{f"{stage}/{k}": v for k, v in
                                                                                 extra.items()}})
        more = "".join(f" {k}={v:.4g}" for k, v in extra.items())
        print(f"[{self.phase}:{stage}] step {step}/{total} loss={loss:.4f} lr={lr:.3g}{more}", flush=True)


def epoch_batches(records: list, epochs: float, batch_size: int, rng: np.random.Generator) -> list[list]:
    """This rank's full batches for `epochs` passes over `records` (a fresh shuffle each pass; a fractional epoch is
    a prefix of the last one).  Every rank draws the same global order and takes every world-th item."""
    rank, world = _world()
    n = int(len(records) * epochs)
    order = np.concatenate([rng.permutation(len(records)) for _ in range(math.ceil(epochs))])[:n]
    order = order[rank::world]
    return [[records[i] for i in order[s:s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def optimizer_step(params: list, optimizer, scheduler) -> None:
    """Average the gradients over ranks (no DDP wraps the model: GradCache takes two passes), clip, step."""
    average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_stage(embedder: Embedder, stage: StageConfig, name: str, cfg: EmbedPhaseConfig, log: _Log) -> int:
    """Run one stage's curriculum (datasets in order, each for its epochs).  Returns optimizer steps taken."""
    rng = np.random.default_rng([cfg.seed, _world()[0], len(name)])
    datasets = [(step, load_records(step.data, "embed_pair")[: step.max_pairs]) for step in stage.curriculum]
    plan = [batch for step, records in datasets for batch in epoch_batches(records, step.epochs, stage.batch_size, rng)]
    if stage.max_steps:
        plan = plan[: stage.max_steps]
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(plan) // 20), max(1, len(plan)))
    embedder.train()
    aug = cfg.stain_augment if name == "stage2" else None
    for i, batch in enumerate(plan, start=1):
        if aug is not None:
            queries = [_augment(r.query, rng, aug.hed_sigma, aug.hed_bias) for r in batch]
            positives = [_augment(r.positive, rng, aug.hed_sigma, aug.hed_bias) for r in batch]
        else:
            queries, positives = [r.query for r in batch], [r.positive for r in batch]
        loss_fn = functools.partial(info_nce, temperature=cfg.temperature, groups=_group_ids(batch))
        if stage.grad_cache_chunk:
            loss = grad_cache_step(embedder, queries, positives, stage.grad_cache_chunk, loss_fn)
        else:
            loss = loss_fn(embedder(queries), embedder(positives))
            loss.backward()
        optimizer_step(params, optimizer, scheduler)
        log(name, i, len(plan), float(loss.detach()), scheduler.get_last_lr()[0])
    return len(plan)


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
    is_main = _world()[0] == 0
    steps = 0
    metrics: dict = {}
    with wandb_run(cfg, f"embed-{out.name}") if is_main else contextlib.nullcontext(_no_wandb) as wandb_log:
        log = _Log(out / "metrics.jsonl", cfg.logging_steps, wandb_log)
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
                wandb_log({"eval": results})
            with atomic_directory(out / "model") as tmp:
                embedder.save_adapter(tmp)
                parent = cfg.parent or cfg.model
                write_manifest(tmp, Manifest(phase="embed", step=steps, recipe_hash=cfg.recipe_hash,
                                             parent=parent, parents={parent: lineage_digest(parent)}, complete=True,
                                             extra={"base_model": cfg.model, "adapter": "embed"}))
    return PhaseResult(model_dir=out / "model", global_step=steps, metrics=metrics)
