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

The same computation runs as fused Triton kernels (kernels/dilated_attention.py: the sparse rows are read
by strided loads, never gathered; kernels/lse_merge.py), tested against the functions here;
`megalatent.kernels.backend` chooses between them (--attention-backend). The sequence split over
context-parallel ranks is distributed/context_parallel/dilated.py.
"""
from __future__ import annotations

import math

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


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
                      dilated_ratios: list[int], causal: bool = True, first_head: int = 0) -> torch.Tensor:
    """The mixture of (w_i, r_i) patterns on [b, h, n, d]; K/V may have fewer heads (GQA)."""
    k, v = _expand_kv(q, k, v)
    parts = [attention_pattern(q, k, v, w, r, causal, first_head) for w, r in zip(segment_lengths, dilated_ratios)]
    return merge_by_lse([o for o, _ in parts], [lse for _, lse in parts])


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
