"""Expert parallelism: the experts of every MoE layer are split over the `ep` ranks (carved out of the
data- and context-parallel ranks), and tokens travel to their experts' ranks and back by all-to-all.

Per layer and micro-batch, on each rank (E experts, ep ranks, E/ep local experts each):
  1. the rank's assignments, already sorted by expert, are cut into ep blocks (experts of rank 0, 1, ...);
  2. an all-to-all of the [ep, E/ep] count matrix tells every rank how many rows it will receive from
     each source rank for each of its experts (the splits are uneven: routing decides them);
  3. all-to-all of the rows; received rows are ordered (source, expert) and are regrouped to
     (expert, source) so that each local expert's rows are contiguous for the grouped matmul;
  4. the inverse regrouping and the reverse all-to-all bring the outputs back in the sender's order.
Backward of an all-to-all is the all-to-all with the splits swapped (`_AllToAll`).

Expert weights are DTensors sharded on dim 0 over the `ep` mesh, so checkpoints hold the global
[E, ...] tensors and load at any other expert-parallel size; FSDP shards them further over the
expert-data-parallel ranks (`edp`, the dp x cp ranks that hold the same experts). The module computes
with this rank's experts (`LocalExperts`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from megalatent.nn.moe import Experts, moe_layers


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def _regroup(counts: torch.Tensor) -> torch.Tensor:
    """Row permutation of a [blocks_a, blocks_b] grid of contiguous blocks with `counts` rows each, stored
    a-major, that makes it b-major: rows of block (a, b) move after every block (a', b') with b' < b."""
    a, b = counts.shape
    starts = (counts.flatten().cumsum(0) - counts.flatten()).view(a, b)
    starts_t, counts_t = starts.t().flatten(), counts.t().flatten()
    total = int(counts_t.sum())
    block_of_row = torch.repeat_interleave(torch.arange(a * b, device=counts.device), counts_t)
    offset_in_block = torch.arange(total, device=counts.device) - (counts_t.cumsum(0) - counts_t)[block_of_row]
    return starts_t[block_of_row] + offset_in_block


class ExpertDispatcher:
    """Runs a layer's experts on rows sorted by global expert id when the experts are split over `group`."""

    def __init__(self, group, num_experts: int):
        self.group, self.ep = group, dist.get_world_size(group)
        self.local_experts = num_experts // self.ep

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: Experts) -> torch.Tensor:
        send_counts = counts.view(self.ep, self.local_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all(rows, send_splits, recv_splits, self.group)
        by_expert = _regroup(recv_counts)  # (source, expert) -> (expert, source)
        out = experts(received[by_expert], recv_counts.sum(0))
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        return all_to_all(out[back], recv_splits, send_splits, self.group)


class LocalExperts(Experts):
    """Experts whose stacked weights are DTensors sharded over the ep ranks: they compute with this rank's."""

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.to_local() for name, p in super().weights().items()}


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` (dim 0) and route its tokens through all-to-all."""
    for _, layer in moe_layers(model):
        experts = layer.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))
        experts.__class__ = LocalExperts  # (as fully_shard does: the same module, one method more)
        layer.dispatcher = ExpertDispatcher(ep_mesh.get_group(), layer.num_experts)
