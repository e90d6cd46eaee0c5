"""Symmetric InfoNCE with cross-rank negatives, and GradCache (Gao et al. 2021) for contrastive batches larger than
activation memory allows.

GradCache in two passes:
1. embed every chunk without a graph, concatenate, compute the loss on the detached embeddings and backpropagate it
   to the embeddings only (cheap: the loss is a function of a B x B similarity matrix);
2. re-embed each chunk with a graph and backpropagate the cached embedding gradients into the model.
The sum over chunks of `(rep_chunk * grad_chunk).sum()` has the same parameter gradient as the full-batch loss.
Randomness (dropout) is replayed in pass 2 by restoring each chunk's RNG state from pass 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather embeddings across ranks, keeping this rank's slice differentiable (in-batch negatives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def info_nce(queries: torch.Tensor, positives: torch.Tensor, temperature: float = 0.02, symmetric: bool = True,
             groups: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over cosine similarities / temperature; the i-th positive is the i-th query's target.

    Embeddings are gathered from every rank first, so each query sees the whole global batch as negatives.
    `groups` (one integer per pair, e.g. the pair's `target_id`) keeps pairs that share a target from serving as
    each other's negatives: several queries of one batch may have the same right answer.
    """
    q = F.normalize(gather_with_grad(queries), dim=-1)
    p = F.normalize(gather_with_grad(positives), dim=-1)
    logits = q @ p.T / temperature
    if groups is not None:
        g = _gather_plain(groups.to(q.device))
        same = (g[:, None] == g[None, :]) & ~torch.eye(len(g), dtype=torch.bool, device=g.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(q.size(0), device=q.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (labels) across ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def average_gradients(params) -> None:
    """Average each parameter's gradient over the ranks (no-op on one process).

    Every rank computes the same global loss from the gathered embeddings, and `gather_with_grad`'s backward sums the
    ranks' gradients into each rank's own embeddings, so a rank's parameter gradient is world x its share of the
    global one.  Summing over ranks and dividing by the world size gives exactly the gradient that one process
    holding the whole global batch would compute (`tests/test_embed.py` checks it on two gloo ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


class RandState:
    """Captures the CPU (and current CUDA device) RNG state so a forward pass can be replayed exactly."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @contextmanager
    def replay(self):
        cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        try:
            yield
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def grad_cache_step(embed: Callable[[Sequence], torch.Tensor], queries: Sequence, positives: Sequence,
                    chunk_size: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One contrastive step's backward with activation memory bounded by `chunk_size` inputs.

    `embed(chunk) -> [len(chunk), D]` must be differentiable.  Accumulates parameter gradients (call
    `optimizer.step()` afterwards); returns the detached loss.
    """
    cached: dict[str, list] = {"q": [], "p": []}
    reps = {}
    for side, items in (("q", queries), ("p", positives)):
        outs = []
        for chunk in _chunks(items, chunk_size):
            state = RandState()
            with torch.no_grad():
                outs.append(embed(chunk))
            cached[side].append((chunk, state))
        reps[side] = torch.cat(outs).detach().requires_grad_()
    loss = loss_fn(reps["q"], reps["p"])
    loss.backward()
    for side in ("q", "p"):
        grads = reps[side].grad.split([len(c) for c, _ in cached[side]])
        for (chunk, state), grad in zip(cached[side], grads, strict=True):
            with state.replay():
                rep = embed(chunk)
            (rep * grad).sum().backward()
    return loss.detach()
