"""Context parallelism for dense causal attention: each sequence is split over the `cp` ranks.

Layout (load-balanced "zigzag"): the sequence is cut into 2*C chunks and rank r holds chunks r and
2C-1-r, so under the causal mask every rank has the same amount of attention work. Everything outside
attention is per token and needs no communication; positions stay global (RoPE and the causal mask
use them). Attention all-gathers K and V over the cp ranks (Megatron's `allgather` CP mode) and
masks by global position; the backward of the all-gather is a reduce-scatter of dK, dV.

This is the dense baseline's CP. LongNet's distributed dilated attention, which gathers only the
sparsified K/V of the segments a rank needs, replaces the core in its own module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalatent.nn.rotary import Positions


def shard_sequence(t: torch.Tensor, cp_rank: int, cp: int, split: str, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor: "zigzag" takes chunks cp_rank and 2*cp-1-cp_rank of
    2*cp; "contiguous" takes chunk cp_rank of cp."""
    if split == "contiguous":
        return t.chunk(cp, dim=dim)[cp_rank].contiguous()
    chunks = t.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim).contiguous()


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
    """Concatenate every cp rank's `x` along `dim` (differentiable)."""
    moved = x.movedim(dim, 0)
    return _AllGatherSeq.apply(moved, group).movedim(0, dim)


class ContextParallelAttention:
    """Attention core for a sequence split over `group`: local queries against all ranks' keys."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: Positions) -> torch.Tensor:
        k_all = all_gather_sequence(k, self.group, dim=2)  # [b, kv_heads, S, d]
        v_all = all_gather_sequence(v, self.group, dim=2)
        with torch.no_grad():
            k_pos = all_gather_sequence(positions.ids, self.group, dim=1)  # [b, S]
        visible = k_pos[:, None, None, :] <= positions.ids[:, None, :, None]  # [b, 1, s, S]
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible,
                                              enable_gqa=q.shape[1] != k.shape[1])


def apply_context_parallel(model: nn.Module, cp_group, local_length: int) -> None:
    """Give every layer's attention its context-parallel core: the core's own distributed form when it
    has one (LongNet's dilated attention, YOCO's retention and sliding window), else dense attention
    over all-gathered K/V."""
    replaced: dict[int, object] = {}  # one distributed core per distinct core (they create process groups)
    for layer in model.layers.values():
        core = getattr(layer.attention, "core_attention", None)
        if core is None:  # attention to keys made elsewhere (YOCO's cross-decoder): the model gathers them
            continue
        if id(core) not in replaced:
            replaced[id(core)] = (core.distributed(cp_group, local_length) if hasattr(core, "distributed")
                                  else ContextParallelAttention(cp_group))
        layer.attention.core_attention = replaced[id(core)]
    if hasattr(model, "cp_group"):  # a model with sequence-wide steps of its own (LongViT's pooling)
        model.cp_group = cp_group
    if hasattr(model, "set_context_parallel"):  # a model-level collective (YOCO: K^/V^ once per step)
        model.set_context_parallel(cp_group)
    for core in replaced.values():
        if hasattr(core, "expected_rows") and torch.distributed.get_rank() == 0:
            print(f"[context parallel] dilated attention: each rank receives {core.expected_rows} K/V rows per "
                  f"head, sequence and layer ({local_length} local tokens)", flush=True)
