"""One contrastive training stage, the loop the HOMIE embedding head (`embed.train`) and PathoCLIP (`embed.clip_train`)
share: the stage's batch plan, then per batch two sides embedded and scored by a loss (through GradCache when the
stage sets a chunk), an optional penalty, one optimizer step on a cosine schedule, and a logged step.

A plain PyTorch loop rather than HF Trainer: GradCache needs two passes per step, which Trainer's step does not allow.
Under Ray Train (or torchrun) the process group is already set up; gradients are averaged across ranks and every
rank's embeddings serve as negatives for every other (see `embed.loss`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from patho_r1.embed.loss import average_gradients, grad_cache_step
from patho_r1.training import wandb_run

# One batch as the loop trains it: the two sides to embed, and the loss of their embeddings.
Sides = tuple[Sequence, Sequence, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def no_wandb(metrics, step=None) -> None:
    """Ranks other than 0 (and runs with wandb disabled) log nothing."""


class StepLog:
    """Every `every` steps: a row in metrics.jsonl, a progress line, and a wandb point."""

    def __init__(self, path: Path, every: int, wandb_log=no_wandb, phase: str = "embed"):
        self.path, self.every, self.t0, self.wandb_log, self.phase = path, every, time.time(), wandb_log, phase
        path.parent.mkdir(parents=True, exist_ok=True)

    def due(self, step: int, total: int) -> bool:
        """Whether `step` is one that logs (on rank 0): every `every`-th, and the last."""
        return step % self.every == 0 or step == total

    def __call__(self, stage: str, step: int, total: int, loss: float, lr: float, **extra: float):
        if world()[0] != 0 or not self.due(step, total):
            return
        row = {"phase": self.phase, "stage": stage, "step": step, "total": total, "loss": loss, "learning_rate": lr,
               **extra, "time": round(time.time() - self.t0, 2)}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.wandb_log({f"{stage}/loss": loss, f"{stage}/learning_rate": lr, **{f"{stage}/{k}": v for k, v in
                                                                                 extra.items()}})
        more = "".join(f" {k}={v:.4g}" for k, v in extra.items())
        print(f"[{self.phase}:{stage}] step {step}/{total} loss={loss:.4f} lr={lr:.3g}{more}", flush=True)


@contextlib.contextmanager
def phase_log(cfg, phase: str) -> Iterator[StepLog]:
    """The phase's step log: on rank 0 into OUTPUT_DIR/metrics.jsonl and a wandb run (`wandb_run`); other ranks log
    nothing.  `log.wandb_log` takes the phase's other numbers (its evaluation)."""
    out = Path(cfg.output_dir)
    main = world()[0] == 0
    with wandb_run(cfg, f"{phase}-{out.name}") if main else contextlib.nullcontext(no_wandb) as wandb_log:
        yield StepLog(out / "metrics.jsonl", cfg.logging_steps, wandb_log, phase=phase)


def epoch_batches(records: list, epochs: float, batch_size: int, rng: np.random.Generator) -> list[list]:
    """This rank's full batches for `epochs` passes over `records` (a fresh shuffle each pass; a fractional epoch is
    a prefix of the last one).  Every rank draws the same global order and takes every world-th item."""
    rank, size = world()
    n = int(len(records) * epochs)
    order = np.concatenate([rng.permutation(len(records)) for _ in range(math.ceil(epochs))])[:n]
    order = order[rank::size]
    return [[records[i] for i in order[s:s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def stage_plan(seed: int, name: str, datasets: list[tuple[list, float]], batch_size: int,
               max_steps: int | None) -> tuple[list[list], np.random.Generator]:
    """A stage's batches, each (records, epochs) in turn, cut at `max_steps`; and the stage's generator, seeded by
    the seed, the rank and the stage, which the caller goes on drawing from (stain augmentation)."""
    rng = np.random.default_rng([seed, world()[0], len(name)])
    plan = [batch for records, epochs in datasets for batch in epoch_batches(records, epochs, batch_size, rng)]
    return (plan[:max_steps] if max_steps else plan), rng


def optimizer_step(params: list, optimizer, scheduler) -> None:
    """Average the gradients over ranks (no DDP wraps the model: GradCache takes two passes), clip, step."""
    average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_contrastive_stage(model, plan: list[list], name: str, *, params: list, optimizer, log: StepLog,
                            sides: Callable[[list], Sides], grad_cache_chunk: int | None = None,
                            penalty: Callable[[], torch.Tensor] | None = None,
                            log_extra: Callable[[], dict[str, float]] | None = None) -> list[float]:
    """Train `model` (called on a list of inputs, it returns their embeddings) over `plan`; returns each step's loss.

    `sides(batch)`: the batch's two sides and their loss.  `penalty()`: a term added to the loss's gradients each
    step (not to the logged loss).  `log_extra()`: more numbers for the steps that log.  The schedule is cosine with
    a warm-up over the first twentieth of the steps."""
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(plan) // 20), max(1, len(plan)))
    model.train()
    losses = []
    for i, batch in enumerate(plan, start=1):
        left, right, loss_fn = sides(batch)
        if grad_cache_chunk:
            loss = grad_cache_step(model, left, right, grad_cache_chunk, loss_fn)
        else:
            loss = loss_fn(model(left), model(right))
            loss.backward()
        if penalty is not None:
            penalty().backward()
        optimizer_step(params, optimizer, scheduler)
        losses.append(float(loss.detach()))
        extra = log_extra() if log_extra is not None and log.due(i, len(plan)) else {}
        log(name, i, len(plan), losses[-1], scheduler.get_last_lr()[0], **extra)
    return losses
