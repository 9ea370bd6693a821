"""How a sequence is cut over the cp ranks, and the all-gather that puts pieces back together.

"zigzag" (load-balanced causal attention): the sequence is cut into 2*C chunks and rank r holds chunks r
and 2C-1-r, so under the causal mask every rank has the same amount of attention work. "contiguous":
rank r holds chunk r of C (what the distributed dilated attention and the recurrent scans need).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SPLITS = ("zigzag", "contiguous")


def shard_sequence(t: torch.Tensor, cp_rank: int, cp: int, split: str, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor whose length the chunks divide (config.py checks it). One
    view per chunk of its own, not one per chunk of the sequence (16,384 ranks would make 16,384 views)."""
    if split == "contiguous":
        size = t.shape[dim] // cp
        return t.narrow(dim, cp_rank * size, size).contiguous()
    size = t.shape[dim] // (2 * cp)
    return torch.cat([t.narrow(dim, cp_rank * size, size), t.narrow(dim, (2 * cp - 1 - cp_rank) * size, size)],
                     dim=dim).contiguous()


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over the ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (differentiable: the backward is a reduce-scatter)."""
    moved = x.movedim(dim, 0)
    return _AllGatherSeq.apply(moved, group).movedim(0, dim)
