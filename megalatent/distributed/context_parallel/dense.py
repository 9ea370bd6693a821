"""Causal softmax attention for a sequence split over the cp ranks: local queries against all ranks' keys.

K and V are all-gathered (Megatron's `allgather` CP mode) and masked by global position, so any split
works; the backward of the all-gather is a reduce-scatter of dK, dV. Correct for every layout, but the
boolean mask keeps GPU SDPA off its flash kernel: a ring or flash-varlen core is the speed follow-up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalatent.distributed.context_parallel.split import all_gather_sequence
from megalatent.nn.rotary import Positions


class ContextParallelAttention:
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
