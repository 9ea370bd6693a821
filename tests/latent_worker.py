"""Worker for the data-parallel test of the diffusion head: on 2 gloo ranks, one rank's micro-batch has
continuous tokens and the other's has none (its loss is the zero-weight dummy). Under FSDP2 and under
DDP the step must complete (no rank waits on a reduction the other skipped) and the averaged gradients
must equal the single-process gradient of the non-empty rank's loss divided by the world size.
Two steps, the roles swapped in the second. Rank 0 writes the largest gradient differences as JSON.

    torchrun --nproc-per-node 2 tests/latent_worker.py OUT.json
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from megalatent.distributed.env import exit_process
from megalatent.distributed.materialize import initialize
from megalatent.nn.diffusion_head import DiffusionHead

LATENT, COND, N, BATCH_MUL = 4, 16, 3, 2


def make_head() -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(latent_dim=LATENT, cond_dim=COND, hidden=32, depth=2)
    initialize(head, seed=0)
    with torch.no_grad():  # move the zero-initialised gates, so every parameter gets a nonzero gradient
        for name, p in head.named_parameters():
            if "modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.1)
    return head


def batch(step: int, rank: int):
    """The micro-batch of `rank` at `step`: N latents on rank `step % 2`, none on the other."""
    g = torch.Generator().manual_seed(100 + step)
    n = N if rank == step % 2 else 0
    return (torch.randn(n, COND, generator=g), torch.randn(n, LATENT, generator=g),
            torch.randint(0, 1000, (n * BATCH_MUL,), generator=g), torch.randn(n * BATCH_MUL, LATENT, generator=g))


def reference_grads(step: int, world: int) -> dict:
    head = make_head()
    condition, latents, t, noise = batch(step, step % 2)
    (head.loss(condition, latents, BATCH_MUL, t=t, noise=noise) / world).backward()
    return {n: p.grad for n, p in head.named_parameters()}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(wrap, name: str, rank: int, world: int) -> dict:
    diffs = {}
    for step in range(2):
        head = make_head()
        model = wrap(head)
        condition, latents, t, noise = batch(step, rank)
        loss = model(condition, latents, BATCH_MUL, t=t, noise=noise)
        loss.backward()
        expected = reference_grads(step, world)
        diffs.setdefault("every expected gradient nonzero", True)
        diffs["every expected gradient nonzero"] &= all(bool(g.abs().max() > 0) for g in expected.values())
        diffs[f"{name} step {step}"] = max((full(p.grad) - expected[n]).abs().max().item()
                                           for n, p in head.named_parameters())
    return diffs


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    diffs = {}
    diffs.update(run(lambda head: fully_shard(head, mesh=mesh), "fsdp2", rank, world))
    diffs.update(run(lambda head: DistributedDataParallel(head), "ddp", rank, world))
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(diffs, f)
    exit_process()


if __name__ == "__main__":
    main()
