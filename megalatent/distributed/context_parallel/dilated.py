"""Dilated attention for a sequence split contiguously over the cp ranks (arXiv 2307.02486 §3.1).

Local length l = N / C. A pattern with w <= l lives inside each rank (segments never cross a rank
boundary because l % w == 0) and runs locally. A pattern with w > l spans g = w / l ranks: each rank keeps
its own rows of the pattern (global position mod r, per head), all-gathers only those sparse K/V rows
among the g ranks of its segment, and attends with its local sparse queries, masked by global position
(causal) — so every rank, rank 0 and its own keys included, sees exactly the keys the single-device
pattern gives it. (The public reference code's causal multi-GPU path drops rank 0's keys and a rank's
own; this does not.) The all-gather's backward is a reduce-scatter.

Traffic per rank and layer: sum over the spanning patterns of (g_i - 1) * ceil(l / r_i) rows of K and V
(`received_rows`), bounded by w_i / r_i: independent of N for the paper's geometric schedules.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from megalatent.distributed.context_parallel.split import all_gather_sequence
from megalatent.kernels.backend import dilated_pattern_and_merge, dilated_uses_triton
from megalatent.nn.dilated import NOT_COVERED, _expand_kv, _masked_attention


def received_rows(segment_lengths: list[int], dilated_ratios: list[int], local: int, cp: int) -> int:
    """The most K/V rows (per head and sequence) a rank receives per layer: (g - 1) * ceil(local / r) for
    each pattern spanning g > 1 ranks (a rank of a ragged last group of fewer ranks receives less)."""
    total = 0
    for w, r in zip(segment_lengths, dilated_ratios):
        g = max(1, min(w, local * cp) // local)
        total += (g - 1) * math.ceil(local / r)
    return total


class DistributedDilatedAttention:
    """The attention core of a dilated layer on one cp rank.

    `new_group(ranks)` returns the process group of a tuple of global ranks (ParallelLayout.subgroup: one
    group per set of ranks for the whole process). `backend` chooses the local patterns' and the merge's
    implementation (kernels/backend.py)."""

    def __init__(self, segment_lengths: list[int], dilated_ratios: list[int], cp_group, local_length: int,
                 new_group: Callable[[tuple[int, ...]], object], causal: bool = True, first_head: int = 0,
                 backend: str = "auto"):
        self.segment_lengths, self.dilated_ratios, self.causal = segment_lengths, dilated_ratios, causal
        self.first_head, self.backend = first_head, backend
        self.local = local_length
        self.cp = dist.get_world_size(cp_group)
        self.cp_rank = dist.get_rank(cp_group)
        ranks = dist.get_process_group_ranks(cp_group)
        for w in segment_lengths:
            w = min(w, local_length * self.cp)
            if (w <= local_length and local_length % w) or (w > local_length and w % local_length):
                raise ValueError(f"segment length {w} straddles context-parallel ranks of {local_length} tokens: "
                                 "it must divide that or be a multiple of it")
        # The g consecutive cp ranks that hold this rank's segment, for each span g > 1 in use. Only the
        # members create (and synchronise on) a group, so other cp groups of the job need not take part.
        self._groups: dict[int, object] = {}
        for g in sorted({self._ranks_per_segment(w) for w in segment_lengths} - {1}):
            first = self.cp_rank // g * g
            self._groups[g] = new_group(tuple(ranks[first:first + g]))
        self.gathered_rows = 0  # K/V rows received from other ranks in the last forward (logs and tests)
        self.expected_rows = received_rows(segment_lengths, dilated_ratios, local_length, self.cp)

    def _ranks_per_segment(self, w: int) -> int:
        return max(1, min(w, self.local * self.cp) // self.local)

    def __call__(self, q, k, v, positions):
        local = q.shape[2]
        assert local == self.local, f"expected {self.local} tokens per context-parallel rank, got {local}"
        self.gathered_rows = 0
        pattern, merge = dilated_pattern_and_merge(dilated_uses_triton(q, k, v, self.backend))
        parts = []
        for w, r in zip(self.segment_lengths, self.dilated_ratios):
            g = self._ranks_per_segment(w)
            if g == 1:
                parts.append(pattern(q, k, v, w, r, self.causal, self.first_head))
            else:
                parts.append(self._spanning_pattern(q, *_expand_kv(q, k, v), min(w, local * self.cp), r, g))
        return merge([o for o, _ in parts], [lse for _, lse in parts])

    def _spanning_pattern(self, q, k, v, w: int, r: int, g: int):
        b, h, local, d = q.shape
        start = self.cp_rank * local
        pos = torch.arange(start, start + local, device=q.device)
        heads = torch.arange(self.first_head, self.first_head + h, device=q.device)
        keep = ((pos % w) % r).unsqueeze(0) == (heads % r).unsqueeze(1)  # [h, l]
        rows = math.ceil(local / r)
        # Indices of each head's kept rows, padded to `rows` with an invalid marker (position -1).
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :rows]  # kept rows first
        valid = torch.take_along_dim(keep, order, dim=1)
        q_pos = torch.where(valid, pos[order], torch.full_like(order, -1))  # [h, rows]
        index = order.view(1, h, rows, 1).expand(b, h, rows, d)
        qs, ks, vs = (torch.take_along_dim(x.float(), index, dim=2) for x in (q, k, v))
        group = self._groups[g]
        # K and V travel in one collective (and their gradients in one reduce-scatter).
        k_all, v_all = all_gather_sequence(torch.stack([ks, vs]), group, dim=3)  # each [b, h, members*rows, d]
        k_pos = all_gather_sequence(q_pos.unsqueeze(0), group, dim=2)[0]  # [h, members*rows]
        self.gathered_rows += k_all.shape[2] - rows  # what the collective brought from the other members
        visible = (k_pos >= 0).unsqueeze(1) & (q_pos >= 0).unsqueeze(2)  # [h, rows, members*rows]
        if self.causal:
            visible = visible & (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
        out, lse = _masked_attention(qs, k_all, v_all, visible)
        # Back to local positions; the padded (invalid) rows go to a spare slot that is cut off.
        target = torch.where(valid, order, torch.full_like(order, local)).view(1, h, rows, 1)
        full_out = out.new_zeros(b, h, local + 1, d).scatter(2, target.expand(b, h, rows, d), out)
        full_lse = lse.new_full((b, h, local + 1), NOT_COVERED).scatter(2, target[..., 0].expand(b, h, rows), lse)
        return full_out[:, :, :local].to(q.dtype), full_lse[:, :, :local]
