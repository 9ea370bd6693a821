"""Gated retention for a sequence split contiguously over the cp ranks (arXiv 2405.05254 App. A), exact.

Rank r runs its tokens from a zero state (the single-device core's own form: chunkwise, or a kernel),
giving its outputs without the past, its state contribution S_r and its total decay G_r = exp(sum of its
log gates). The state entering rank r is the exclusive scan S_in(r) = sum_{j<r} S_j prod_{j<i<r} G_i,
built from one all-gather of the small [h, d_k, d_v] states (not of the sequence); then exp(c_n) q_n
S_in(r) is added to each output. The all-gather's backward (a reduce-scatter) returns to each rank the
gradient of its state and decay.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalatent.distributed.context_parallel.split import all_gather_sequence
from megalatent.nn.retention import RetentionCore, _from_state
from megalatent.nn.rotary import Positions


class DistributedRetentionCore:
    def __init__(self, local: RetentionCore, cp_group):
        self.local, self.group = local, cp_group
        self.cp_rank = dist.get_rank(cp_group)

    def __call__(self, q, k, v, log_gate, positions: Positions) -> torch.Tensor:
        out, state = self.local.with_state(q, k, v, log_gate)
        cum = log_gate.to(state.dtype).cumsum(-1)
        states = all_gather_sequence(state.unsqueeze(0), self.group, dim=0)  # [cp, b, h, dk, dv]
        totals = all_gather_sequence(cum[..., -1].unsqueeze(0), self.group, dim=0)  # [cp, b, h]: log G_j
        # S_in = sum_j w_j S_j with log w_j = sum_{j<i<r} log G_i for j < r, and w_j = 0 for j >= r. Every
        # gathered state takes part (with weight 0 if not before us), so every rank runs the backward
        # collective, rank 0 included.
        through = totals.cumsum(0)  # sum_{i<=j} log G_i
        before_us = through[self.cp_rank] - totals[self.cp_rank]  # sum_{i<r} log G_i
        ranks = torch.arange(totals.shape[0], device=totals.device).view(-1, 1, 1)
        log_w = (before_us - through).masked_fill(ranks >= self.cp_rank, float("-inf"))
        incoming = (log_w.exp()[..., None, None] * states).sum(0)
        return out + _from_state(q.to(state.dtype), cum, incoming).to(out.dtype)
