"""LongNet's dilated attention (arXiv 2307.02486, §2.2–2.3), the plain-PyTorch reference.

One pattern (w, r): cut the sequence into segments of w tokens; inside each segment head j keeps the
rows with index ≡ j (mod r) (its offset), runs ordinary softmax attention among the kept rows (causal
in their original order) and writes the outputs back to those rows; rows it does not keep get output 0
and a log-sum-exp of "minus infinity". A mixture of patterns is merged by their log-sum-exps,

    O = sum_i exp(LSE_i - LSE) O_i,   LSE = logsumexp_i LSE_i,

which is exactly one softmax over the union of the patterns' keys, a key counted once per pattern that
contains it. The LSEs here are computed with autograd, so the backward is exact too (the public code
detaches them, which biases the gradient).

Padding: the sequence is padded to a multiple of w (a w longer than the sequence is clamped to it) and
each segment to a multiple of r; padded rows are never attended to and their outputs are dropped.
"Minus infinity" is a large finite negative (NOT_COVERED) so that rows no pattern covers give a zero
output and finite gradients instead of NaN.

On CUDA the same computation runs as fused Triton kernels (kernels/dilated_attention.py: the sparse rows
are read by strided loads, never gathered; kernels/lse_merge.py), tested against the functions here;
`use_kernel` decides (MEGALATENT_DILATED_KERNEL=0 keeps the reference).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

NOT_COVERED = -1e30


class _Sparsifier:
    """The gather of one (w, r) pattern for a sequence of length n and h heads, and its inverse."""

    def __init__(self, n: int, h: int, w: int, r: int, device: torch.device, first_head: int = 0):
        self.n, self.h, self.r = n, h, r
        self.w = min(w, n)
        self.segments = math.ceil(n / self.w)
        self.rows = math.ceil(self.w / r)  # kept rows per segment and head
        self.offset = (torch.arange(first_head, first_head + h, device=device) % r).view(1, h, 1, 1, 1, 1)

    def _blocks(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """[b, h, n, d] -> [b, h, segments, rows, r, d], padded with `fill`."""
        b, h, _, d = x.shape
        x = F.pad(x, (0, 0, 0, self.segments * self.w - self.n), value=fill).view(b, h, self.segments, self.w, d)
        x = F.pad(x, (0, 0, 0, self.rows * self.r - self.w), value=fill)
        return x.view(b, h, self.segments, self.rows, self.r, d)

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, rows, _, d = x.shape
        return self.offset.expand(b, h, s, rows, 1, d)

    def gather(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[b, h, n, d] -> [b, h, segments, rows, d]: each head's kept rows of every segment."""
        blocks = self._blocks(x, fill)
        return torch.take_along_dim(blocks, self._index(blocks), dim=4).squeeze(4)

    def scatter(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """The inverse: [b, h, segments, rows, d] -> [b, h, n, d], rows not kept set to `fill`."""
        b, h, s, rows, d = x.shape
        full = x.new_full((b, h, s, rows, self.r, d), fill)
        full = full.scatter(4, self._index(full), x.unsqueeze(4))
        return full.view(b, h, s, rows * self.r, d)[:, :, :, :self.w].reshape(b, h, s * self.w, d)[:, :, :self.n]


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor):
    """softmax(q k^T / sqrt(d)) v over the visible keys, with its log-sum-exp; [..., rows, d] inputs.
    Query rows that see no key (padding) get output 0 and lse NOT_COVERED, with finite gradients."""
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, NOT_COVERED)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v
    has_keys = visible.any(-1)
    lse = torch.where(has_keys, lse, torch.full_like(lse, NOT_COVERED))
    out = torch.where(has_keys.unsqueeze(-1), out, torch.zeros_like(out))
    return out, lse


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped-query attention: repeat each K/V head for the query heads that share it."""
    if k.shape[1] == q.shape[1]:
        return k, v
    repeat = q.shape[1] // k.shape[1]
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int,
                      causal: bool, first_head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, r) pattern on [b, h, n, d] (K/V with as many heads as Q). `first_head` is the global index
    of head 0 (tensor parallelism holds a slice of the heads; offsets follow the global index).
    Returns (out [b, h, n, d], lse [b, h, n]); rows the pattern does not cover: 0 and NOT_COVERED."""
    b, h, n, d = q.shape
    sp = _Sparsifier(n, h, w, r, q.device, first_head)
    positions = torch.arange(n, device=q.device, dtype=torch.float32).view(1, 1, n, 1).expand(1, h, n, 1)
    pos = sp.gather(positions, fill=-1.0)[..., 0]  # [1, h, segments, rows]; -1 marks padding
    qs, ks, vs = sp.gather(q.float()), sp.gather(k.float()), sp.gather(v.float())
    visible = (pos >= 0).unsqueeze(-2)  # [1, h, segments, 1, rows]: real keys only
    if causal:
        visible = visible & (pos.unsqueeze(-1) >= pos.unsqueeze(-2))
    out, lse = _masked_attention(qs, ks, vs, visible)
    return sp.scatter(out, 0.0).to(q.dtype), sp.scatter(lse.unsqueeze(-1), NOT_COVERED)[..., 0]


def merge_by_lse(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """sum_i softmax_i(LSE_i) O_i: the partial attentions combined as one softmax over all their keys."""
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)
    return (weights * torch.stack([o.float() for o in outputs])).sum(0).to(outputs[0].dtype)


KERNEL_ENV = "MEGALATENT_DILATED_KERNEL"


def use_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: bool | None = None) -> bool:
    """Whether to run the Triton kernels. `kernel=True` forces them (on CPU they need TRITON_INTERPRET=1 set
    before Triton is imported) and fails on tensors they cannot take; False forces the reference. By
    default they run on CUDA tensors when Triton is installed and the kernel takes the shapes and dtypes
    (head dim <= 128; fp16, bf16, fp32); MEGALATENT_DILATED_KERNEL=0 or 1 forces either way instead."""
    if kernel is None and os.environ.get(KERNEL_ENV) in ("0", "1"):
        kernel = os.environ[KERNEL_ENV] == "1"
    if kernel is False:
        return False
    if kernel is None:
        from megalatent.kernels import available
        if not q.is_cuda or not available():
            return False
    from megalatent.kernels.dilated_attention import check_inputs
    problem = check_inputs(q, k, v)
    if problem and kernel:
        raise ValueError(f"dilated attention: the Triton kernel was asked for but cannot run: {problem}")
    return problem is None


def _pattern_and_merge(kernel: bool):
    """One pattern's attention and the merge: the Triton kernels, or the reference above."""
    if kernel:
        from megalatent.kernels.dilated_attention import dilated_pattern
        from megalatent.kernels.lse_merge import lse_merge
        return dilated_pattern, lse_merge
    return attention_pattern, merge_by_lse


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
                      dilated_ratios: list[int], causal: bool = True, first_head: int = 0,
                      kernel: bool | None = None) -> torch.Tensor:
    """The mixture of (w_i, r_i) patterns on [b, h, n, d]; K/V may have fewer heads (GQA).
    `kernel`: True/False forces the Triton kernels / the reference; None chooses (`use_kernel`)."""
    kernel = use_kernel(q, k, v, kernel)
    pattern, merge = _pattern_and_merge(kernel)
    if not kernel:  # the kernel reads each group's K/V head in place
        k, v = _expand_kv(q, k, v)
    parts = [pattern(q, k, v, w, r, causal, first_head) for w, r in zip(segment_lengths, dilated_ratios)]
    return merge([o for o, _ in parts], [lse for _, lse in parts])


def dilated_attention_at_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                                   k_pos: torch.Tensor, segment_lengths: list[int], dilated_ratios: list[int],
                                   first_head: int = 0) -> torch.Tensor:
    """Causal dilated attention for queries at global positions `q_pos` [s] against keys at `k_pos` [t]
    (decoding against a KV cache). By the definition rather than by gathering: for pattern (w, r), head j
    keeps position p when (p mod w) mod r == (j + first_head) mod r, and its kept query p sees the kept keys
    of its own segment (same p div w) at positions <= p; the patterns merge by LSE with multiplicity.
    Segments follow absolute positions, so a query gets the same keys as in a full forward over
    the sequence (there, a w longer than the sequence is clamped to it, which keeps the same rows).
    """
    k, v = _expand_kv(q, k, v)
    heads = torch.arange(first_head, first_head + q.shape[1], device=q.device).view(-1, 1, 1)  # [h, 1, 1]
    qp, kp = q_pos.view(1, -1, 1), k_pos.view(1, 1, -1)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilated_ratios):
        kept_q = (qp % w) % r == heads % r  # [h, s, 1]
        kept_k = (kp % w) % r == heads % r  # [h, 1, t]
        visible = kept_q & kept_k & (qp // w == kp // w) & (kp <= qp)  # [h, s, t]
        out, lse = _masked_attention(q.float(), k.float(), v.float(), visible)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return merge_by_lse(outs, lses)


def received_rows(segment_lengths: list[int], dilated_ratios: list[int], local: int, cp: int) -> int:
    """K/V rows (per head and sequence) one rank receives per layer under the distributed algorithm:
    (g - 1) * ceil(local / r) for each pattern spanning g > 1 ranks — bounded by w / r, so it does not
    grow with the sequence length once that exceeds the largest segment."""
    total = 0
    for w, r in zip(segment_lengths, dilated_ratios):
        g = max(1, min(w, local * cp) // local)
        total += (g - 1) * math.ceil(local / r)
    return total


_SUBGROUPS: dict[tuple[int, ...], object] = {}


def _subgroup(ranks: tuple[int, ...]):
    """One process group per set of ranks for the whole process: a second group over the same ranks
    would share its rendezvous keys with the first."""
    import torch.distributed as dist
    if ranks not in _SUBGROUPS:
        _SUBGROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _SUBGROUPS[ranks]


class DistributedDilatedAttention:
    """LongNet's distributed algorithm (§3.1) for a sequence split contiguously over the cp ranks.

    Local length l = N / C. A pattern with w <= l lives inside each rank (segments never cross a rank
    boundary because l % w == 0) and runs locally. A pattern with w > l spans g = w / l ranks: each rank
    keeps its own rows of the pattern (global position mod r, per head), all-gathers only those sparse
    K/V rows among the g ranks of its segment, and attends with its local sparse queries, masked by
    global position (causal) — so every rank, rank 0 and its own keys included, sees exactly the keys
    the single-device pattern gives it. The all-gather's backward is a reduce-scatter. Traffic per rank
    and pattern: (g - 1) * l / r rows of K and V, about w / r — independent of N for the paper's
    geometric schedules (w_i / r_i is nearly constant).
    """

    def __init__(self, segment_lengths: list[int], dilated_ratios: list[int], cp_group, local_length: int,
                 causal: bool = True, first_head: int = 0, kernel: bool | None = None):
        import torch.distributed as dist
        self.segment_lengths, self.dilated_ratios, self.causal = segment_lengths, dilated_ratios, causal
        self.first_head = first_head
        self.kernel = kernel  # the local patterns and the merge: as in dilated_attention
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
            self._groups[g] = _subgroup(tuple(ranks[first:first + g]))
        self.gathered_rows = 0  # K/V rows received by this rank in the last forward (for logs and tests)
        self.expected_rows = received_rows(segment_lengths, dilated_ratios, local_length, self.cp)

    def _ranks_per_segment(self, w: int) -> int:
        return max(1, min(w, self.local * self.cp) // self.local)

    def __call__(self, q, k, v, positions):
        k, v = _expand_kv(q, k, v)
        local = q.shape[2]
        assert local == self.local, f"expected {self.local} tokens per context-parallel rank, got {local}"
        self.gathered_rows = 0
        pattern, merge = _pattern_and_merge(use_kernel(q, k, v, self.kernel))
        parts = []
        for w, r in zip(self.segment_lengths, self.dilated_ratios):
            g = self._ranks_per_segment(w)
            if g == 1:
                parts.append(pattern(q, k, v, w, r, self.causal, self.first_head))
            else:
                parts.append(self._spanning_pattern(q, k, v, min(w, local * self.cp), r, g))
        return merge([o for o, _ in parts], [lse for _, lse in parts])

    def _spanning_pattern(self, q, k, v, w: int, r: int, g: int):
        from megalatent.distributed.context_parallel import all_gather_sequence
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
        k_all, v_all = all_gather_sequence(torch.stack([ks, vs]), group, dim=3)  # each [b, h, g*rows, d]
        k_pos = all_gather_sequence(q_pos.unsqueeze(0), group, dim=2)[0]  # [h, g*rows]
        self.gathered_rows += (g - 1) * rows
        visible = (k_pos >= 0).unsqueeze(1) & (q_pos >= 0).unsqueeze(2)  # [h, rows, g*rows]
        if self.causal:
            visible = visible & (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
        out, lse = _masked_attention(qs, k_all, v_all, visible)
        # Back to local positions; the padded (invalid) rows go to a spare slot that is cut off.
        target = torch.where(valid, order, torch.full_like(order, local)).view(1, h, rows, 1)
        full_out = out.new_zeros(b, h, local + 1, d).scatter(2, target.expand(b, h, rows, d), out)
        full_lse = lse.new_full((b, h, local + 1), NOT_COVERED).scatter(2, target[..., 0].expand(b, h, rows), lse)
        return full_out[:, :, :local].to(q.dtype), full_lse[:, :, :local]
