"""Sliding-window attention for a sequence split contiguously over the cp ranks (arXiv 2405.05254 App. A).

A rank needs only the window - 1 keys before its first token: every rank all-gathers the last
min(window - 1, local) K/V rows of every rank (K and V in one collective; backward reduce-scatters their
gradients), takes those of the ranks just before it, prepends them to its own and runs the blockwise
kernel on the extended sequence, dropping the outputs of the borrowed rows. Traffic per rank:
cp x min(window - 1, local) rows, independent of the sequence length.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalatent.distributed.context_parallel.split import all_gather_sequence
from megalatent.nn.attention import sliding_window_attention
from megalatent.nn.rotary import Positions


class DistributedSlidingWindowCore:
    def __init__(self, window: int, cp_group, local_length: int):
        self.window, self.group, self.local = window, cp_group, local_length
        self.cp_rank = dist.get_rank(cp_group)

    def __call__(self, q, k, v, positions: Positions) -> torch.Tensor:
        need = self.window - 1
        if need == 0:
            return sliding_window_attention(q, k, v, self.window)
        tail = min(need, self.local)
        tails = all_gather_sequence(torch.stack([k[:, :, -tail:], v[:, :, -tail:]]), self.group, dim=3)
        ranks_back = -(-need // self.local)
        first = max(0, self.cp_rank - ranks_back)
        prev = tails[:, :, :, first * tail:self.cp_rank * tail][:, :, :, -need:]  # contiguous, just before us
        p = prev.shape[3]  # 0 on rank 0: the (empty) borrowed rows still join the graph, so that rank 0
        # takes part in the backward's reduce-scatter as well
        q_ext = torch.cat([q.new_zeros(q.shape[0], q.shape[1], p, q.shape[3]), q], dim=2)
        out = sliding_window_attention(q_ext, torch.cat([prev[0], k], dim=2), torch.cat([prev[1], v], dim=2),
                                       self.window)
        return out[:, :, p:]
