"""Worker for the cross-rank contrastive test: one gloo rank computes the training step on its half of the batch."""

import functools
import os
import sys

import torch
import torch.distributed as dist

from patho_r1.embed.loss import average_gradients, grad_cache_step, info_nce


def model_and_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    xq, xp = torch.randn(12, 8), torch.randn(12, 8)
    groups = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10])  # items 0 and 6 share a target
    return net, xq, xp, groups


def step(net, xq, xp, groups, chunk):
    def embed(chunk_rows):
        return net(torch.stack(list(chunk_rows)))

    loss_fn = functools.partial(info_nce, temperature=0.1, groups=groups)
    if chunk:
        loss = grad_cache_step(embed, list(xq), list(xp), chunk, loss_fn)
    else:
        loss = loss_fn(embed(xq), embed(xp))
        loss.backward()
    average_gradients(list(net.parameters()))
    return float(loss.detach()), [p.grad.clone() for p in net.parameters()]


def main(rank: int, world: int, store: str, out: str, chunk: int) -> None:
    # A file store, not TCP: no port to pick and lose to another process between the test's bind and init.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net, xq, xp, groups = model_and_batch()
    share = slice(rank * 12 // world, (rank + 1) * 12 // world)
    loss, grads = step(net, xq[share], xp[share], groups[share], chunk)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.barrier()
    # Out without C++ teardown: gloo's destroy_process_group (and exit-time destructors) at times aborted a rank
    # with "terminate called without an active exception" once both had passed the barrier (seen in CI).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
