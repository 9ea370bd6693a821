"""LongNet's dilated attention (arXiv 2307.02486, §2.2–2.3), the plain-PyTorch reference.

One pattern (w, r): cut the sequence into segments of w tokens; inside each segment head j keeps the
rows with index ≡ j (mod r) (its offset), runs ordinary softmax attention among the kept rows (causal
in their original order) and writes the outputs back to those rows; rows it does not keep get output 0
and a log-sum-exp of "minus infinity". A mixture of patterns is merged by their log-sum-exps,

    O = sum_i exp(LSE_i - LSE) O_i,   LSE = logsumexp_i LSE_i,

which is exactly one softmax over the union of the patterns' keys, a key counted once per pattern that
contains it. The LSEs here carry their gradient (d O / d LSE_i = w_i (O_i - O)), so the backward is exact
too (the public code detaches them, which biases the gradient).

Padding: the sequence is padded to a multiple of w (a w longer than the sequence is clamped to it) and
each segment to a multiple of r; padded rows are never attended to and their outputs are dropped.
"Minus infinity" is a large finite negative (NOT_COVERED) so that rows no pattern covers give a zero
output and finite gradients instead of NaN.

How (`_DilatedAttention`, one autograd function for a pattern or a whole mixture): by chunks of segments,
each head's kept rows are gathered into one attention problem per (head, segment), run by a fused core,
torch's CPU flash attention (on other devices: blocks of query rows in plain PyTorch), and merged into
the output by LSE; the backward gathers again. Nothing of size rows x rows is kept. Computed in the
inputs' dtype (fp64 stays fp64), bf16 and fp16 in fp32.

The same computation runs as fused Triton kernels (kernels/dilated_attention.py: the sparse rows are read
by strided loads, never gathered; kernels/lse_merge.py), tested against the functions here;
`megalatent.kernels.backend` chooses between them (--attention-backend). The sequence split over
context-parallel ranks is distributed/context_parallel/dilated.py.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

NOT_COVERED = -1e30


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention runs in the inputs' dtype, but at least fp32: fp64 stays fp64, bf16/fp16 accumulate in fp32."""
    return torch.promote_types(dtype, torch.float32)


# What a padded key scores: exp() of it vanishes in fp32 and fp64, and it stays finite.
_FAR = 1e30
# Query rows (over batch, heads and segments) that one call of the attention core takes: bounds the
# gathered copies to a few MB whatever the sequence length.
_CHUNK_ROWS = 2**14


class _PatternRows:
    """Where one (w, r) pattern's rows lie in [b, h, n, ...] tensors, and their gather and scatter.

    Segment s holds positions s*w .. s*w + w - 1, and head j keeps the rows s*w + o_j + r*i (i = 0 .. rows-1)
    with offset o_j = (first_head + j) mod r. A kept row past its segment (w not a multiple of r) or past
    the sequence is padding; padding rows are always the last rows of a head's segment.
    """

    def __init__(self, n: int, h: int, w: int, r: int, first_head: int):
        self.n, self.h, self.r, self.first_head = n, h, r, first_head
        self.w = min(w, n)
        self.segments = math.ceil(n / self.w)
        self.rows = math.ceil(self.w / r)
        self.padded = self.segments * self.w != n or self.rows * r != self.w
        # Heads j, j + r, j + 2r, ... share an offset: one strided copy moves all of their rows.
        self.offsets = [(j, (first_head + j) % r) for j in range(min(h, r))]

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[b, h, n, ...] -> [b, h, segments, rows, r, ...]: a view, or a copy padded with zeros if the pattern
        pads (then `write_back` returns what was scattered into it)."""
        if not self.padded:
            return x.unflatten(2, (self.segments, self.rows, self.r))
        trailing = (0, 0) * (x.dim() - 3)
        x = F.pad(x, trailing + (0, self.segments * self.w - self.n)).unflatten(2, (self.segments, self.w))
        return F.pad(x, trailing + (0, self.rows * self.r - self.w)).unflatten(3, (self.rows, self.r))

    def write_back(self, blocks: torch.Tensor, x: torch.Tensor) -> None:
        """Copy `blocks` (of x, scattered into) back to x, padding dropped; nothing to do when it is a view."""
        if self.padded:
            x.copy_(blocks.flatten(3, 4)[:, :, :, :self.w].flatten(2, 3)[:, :, :self.n])

    def count(self, segments: slice) -> int:
        return len(range(self.segments)[segments])

    def chunks(self, batch: int) -> list[slice]:
        """Runs of segments of about _CHUNK_ROWS kept rows (all heads and sequences) each."""
        step = max(1, _CHUNK_ROWS // (batch * self.h * self.rows))
        return [slice(s, min(s + step, self.segments)) for s in range(0, self.segments, step)]

    def gather(self, blocks: torch.Tensor, segments: slice, out: torch.Tensor) -> None:
        """Each head's kept rows of `segments`: blocks [b, h, segments, rows, r, ...] -> out [b, h, len, rows, ...]."""
        for j, offset in self.offsets:
            out[:, j::self.r].copy_(blocks[:, j::self.r, segments, :, offset])

    def scatter(self, rows: torch.Tensor, segments: slice, blocks: torch.Tensor, add: bool = False) -> None:
        """The inverse of `gather` (or, with `add`, adds the rows to what is there)."""
        for j, offset in self.offsets:
            target = blocks[:, j::self.r, segments, :, offset]
            if add:
                target.add_(rows[:, j::self.r])
            else:
                target.copy_(rows[:, j::self.r])

    def real(self, segments: slice, device: torch.device) -> torch.Tensor:
        """[h, len, rows]: which kept rows of `segments` are not padding."""
        offset = ((torch.arange(self.h, device=device) + self.first_head) % self.r).view(-1, 1, 1)
        within = offset + self.r * torch.arange(self.rows, device=device)
        start = self.w * torch.arange(self.segments, device=device)[segments].view(1, -1, 1)
        return (within < self.w) & (start + within < self.n)


def _gathered(pattern: _PatternRows, blocks: torch.Tensor, segments: slice, dtype: torch.dtype,
              column=None) -> torch.Tensor:
    """The kept rows of `segments` as one attention problem per (head, segment): [b, h * len, rows, ...] in
    `dtype`. With `column`, the rows [.., d] get one more column set to it (see _DilatedAttention)."""
    b, h, _, rows, _, *trailing = blocks.shape
    if column is None:
        out = blocks.new_empty((b, h, pattern.count(segments), rows, *trailing), dtype=dtype)
        pattern.gather(blocks, segments, out)
    else:
        d = trailing[0]
        out = blocks.new_empty((b, h, pattern.count(segments), rows, d + 1), dtype=dtype)
        pattern.gather(blocks, segments, out[..., :d])
        out[..., d] = column
    return out.flatten(1, 2)


def _operands(pattern: _PatternRows, q_blocks, k_blocks, v_blocks, segments: slice, dtype, column: bool):
    """Q, K and V of the core for `segments`; with `column`, their extra columns: 1, the padding mask (0 for
    real keys, -FAR for padded ones) and 0."""
    if not column:
        return tuple(_gathered(pattern, x, segments, dtype) for x in (q_blocks, k_blocks, v_blocks))
    mask = 0.0 if not pattern.padded else torch.where(pattern.real(segments, q_blocks.device), 0.0, -_FAR)
    return (_gathered(pattern, q_blocks, segments, dtype, 1.0), _gathered(pattern, k_blocks, segments, dtype, mask),
            _gathered(pattern, v_blocks, segments, dtype, 0.0))


class _Core(NamedTuple):
    """Softmax attention on [B, H, L, D] with its LSE, and its backward, which takes the gradient of the
    output only and computes D = rowsum(dO * O) itself (the flash-attention-2 backward)."""
    forward: Callable
    backward: Callable


def _flash_cpu_forward(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_cpu_backward(do, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, scale=scale)


# Query rows per block of the plain core: its [B, H, block, L] scores stay at about 2^22 elements.
_PLAIN_SCORES = 2**22


def _plain_blocks(q: torch.Tensor) -> list[slice]:
    b, h, n, _ = q.shape
    step = max(1, _PLAIN_SCORES // (b * h * n))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _plain_scores(q, k, rows: slice, causal: bool, scale: float) -> torch.Tensor:
    scores = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
    if causal:
        query = torch.arange(rows.start, rows.stop, device=q.device).unsqueeze(-1)
        scores = scores.masked_fill(torch.arange(k.shape[2], device=q.device) > query, -math.inf)
    return scores


def _plain_forward(q, k, v, causal: bool, scale: float):
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
    for rows in _plain_blocks(q):
        scores = _plain_scores(q, k, rows, causal, scale)
        lse[:, :, rows] = torch.logsumexp(scores, dim=-1)
        out[:, :, rows] = torch.exp(scores - lse[:, :, rows, None]) @ v
    return out, lse


def _plain_backward(do, q, k, v, out, lse, causal: bool, scale: float):
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (do * out).sum(-1, keepdim=True)
    for rows in _plain_blocks(q):
        probs = torch.exp(_plain_scores(q, k, rows, causal, scale) - lse[:, :, rows, None])
        dv += probs.transpose(-1, -2) @ do[:, :, rows]
        dscores = probs * (do[:, :, rows] @ v.transpose(-1, -2) - delta[:, :, rows]) * scale
        dq[:, :, rows] = dscores @ k
        dk += dscores.transpose(-1, -2) @ q[:, :, rows]
    return dq, dk, dv


# On CPU: torch's fused flash attention. Elsewhere (the GPU fallback for fp64 or head dims the Triton
# kernel does not take): blocks of query rows in plain PyTorch, every dtype and device.
FLASH_CPU = _Core(_flash_cpu_forward, _flash_cpu_backward)
PLAIN = _Core(_plain_forward, _plain_backward)


def _core(device: torch.device) -> _Core:
    return FLASH_CPU if device.type == "cpu" else PLAIN


class _DilatedAttention(torch.autograd.Function):
    """(w_i, r_i) patterns on [b, h, n, d] merged by their LSEs -> (out [b, h, n, d], lse [b, h, n]): with one
    pattern, that pattern's output and LSE (0 and NOT_COVERED on the rows it does not keep).

    Pattern by pattern and by chunks of segments, each head's kept rows of a segment are one attention
    problem for the core; its output merges into the running output by LSE. The backward runs each
    pattern's core backward with dO_i = w_i dO (w_i = exp(LSE_i - LSE)) and the merged O in place of O_i:
    the core's D = rowsum(dO_i * O) = w_i <dO, O> is then the whole mixture's, as for one softmax over the
    union of the keys, and each pattern adds its rows' dq, dk, dv. One extra head-dim column carries what
    the core cannot take otherwise, where needed:
    - the padding mask: Q's column is 1, K's is 0 for real keys and -FAR for padded ones, so a padded key
      scores -FAR (its weight is 0); in causal patterns padding rows come last and are never seen anyway.
    - a gradient g on the merged LSE: d LSE / d S_i = w_i P_i, so g turns D into w_i (<dO, O> - g). With
      O's column 1 and dO's column -w_i g the core's own rowsum computes it, while V's column 0 keeps
      dO V^T (and the forward's O) as they were.
    Padded query rows get dO = 0 and g = 0, so they add nothing to the gradients. Nothing of size rows x
    rows is kept: the backward saves the inputs, the outputs and each pattern's LSE, and gathers again.
    """

    @staticmethod
    def forward(ctx, q, k, v, patterns: tuple, causal: bool, first_head: int, core: _Core):
        b, h, n, d = q.shape
        dtype = _compute_dtype(q.dtype)
        out = q.new_zeros((b, h, n, d), dtype=dtype)
        lse = q.new_full((b, h, n), NOT_COVERED, dtype=dtype)
        lses = []  # each pattern's: its merge weights in the backward
        for w, r in patterns:
            pattern = _PatternRows(n, h, w, r, first_head)
            q_blocks, k_blocks, v_blocks, out_blocks, lse_blocks = map(pattern.blocks, (q, k, v, out, lse))
            lses.append(q.new_full((b, h, n), NOT_COVERED, dtype=dtype))
            own_blocks = pattern.blocks(lses[-1])
            for segments in pattern.chunks(b):
                operands = _operands(pattern, q_blocks, k_blocks, v_blocks, segments, dtype, pattern.padded)
                part, part_lse = core.forward(*operands, causal, d ** -0.5)
                running_lse = _gathered(pattern, lse_blocks, segments, dtype)
                merged_lse = torch.logaddexp(running_lse, part_lse)
                merged = _gathered(pattern, out_blocks, segments, dtype)
                merged.mul_(torch.exp(running_lse - merged_lse).unsqueeze(-1))
                merged.addcmul_(part[..., :d], torch.exp(part_lse - merged_lse).unsqueeze(-1))
                for rows, blocks in ((merged, out_blocks), (merged_lse, lse_blocks), (part_lse, own_blocks)):
                    pattern.scatter(rows.unflatten(1, (h, -1)), segments, blocks)
            for blocks, x in ((out_blocks, out), (lse_blocks, lse), (own_blocks, lses[-1])):
                pattern.write_back(blocks, x)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *lses)
        ctx.patterns, ctx.causal, ctx.first_head, ctx.core = patterns, causal, first_head, core
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *lses = ctx.saved_tensors
        (b, h, n, d), dtype = q.shape, lse.dtype
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        if dout is None:
            dout = torch.zeros_like(out)
        for (w, r), own_lse in zip(ctx.patterns, lses):
            pattern = _PatternRows(n, h, w, r, ctx.first_head)
            column = pattern.padded or dlse is not None
            q_blocks, k_blocks, v_blocks, out_blocks, dout_blocks, lse_blocks, own_blocks = map(
                pattern.blocks, (q, k, v, out, dout, lse, own_lse))
            dlse_blocks = pattern.blocks(dlse) if dlse is not None else None
            grad_blocks = [pattern.blocks(grad) for grad in grads]
            for segments in pattern.chunks(b):
                own = _gathered(pattern, own_blocks, segments, dtype)
                weight = torch.exp(own - _gathered(pattern, lse_blocks, segments, dtype))
                if not column:
                    dout_column = None
                elif dlse is None:
                    dout_column = 0.0
                else:
                    dout_column = -_gathered(pattern, dlse_blocks, segments, dtype).unflatten(1, (h, -1))
                dout_rows = _gathered(pattern, dout_blocks, segments, dtype, dout_column)
                dout_rows.mul_(weight.unsqueeze(-1))  # dO_i = w_i dO, and the column -w_i g
                part_grads = ctx.core.backward(
                    dout_rows, *_operands(pattern, q_blocks, k_blocks, v_blocks, segments, dtype, column),
                    _gathered(pattern, out_blocks, segments, dtype, 1.0 if column else None), own, ctx.causal,
                    d ** -0.5)
                for grad, blocks in zip(part_grads, grad_blocks):
                    pattern.scatter(grad[..., :d].unflatten(1, (h, -1)), segments, blocks, add=True)
            for blocks, grad in zip(grad_blocks, grads):
                pattern.write_back(blocks, grad)
        return (*grads, None, None, None, None)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int,
                      causal: bool, first_head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, r) pattern on [b, h, n, d] (K/V with as many heads as Q). `first_head` is the global index
    of head 0 (tensor parallelism holds a slice of the heads; offsets follow the global index).
    Returns (out [b, h, n, d], lse [b, h, n]); rows the pattern does not cover: 0 and NOT_COVERED.
    Computed in the inputs' dtype (bf16/fp16 in fp32; the LSE in that dtype)."""
    return _DilatedAttention.apply(q, k, v, ((w, r),), causal, first_head, _core(q.device))


class _LseMerge(torch.autograd.Function):
    """`merge_by_lse` without stacked copies of the partial outputs. With w_i = softmax_i(LSE_i) and, per
    row, a_i = <dO, O_i>, the backward is

        dO_i = w_i dO,   dLSE_i = w_i (a_i - sum_j w_j a_j)     (d O / d LSE_i = w_i (O_i - O)),

    so it saves only the weights and the partial outputs themselves (which their patterns keep anyway)."""

    @staticmethod
    def forward(ctx, *parts):
        outputs, lses = parts[:len(parts) // 2], parts[len(parts) // 2:]
        weights = torch.softmax(torch.stack(lses).to(_compute_dtype(outputs[0].dtype)), dim=0)
        merged = outputs[0] * weights[0].unsqueeze(-1)
        for out, weight in zip(outputs[1:], weights[1:]):
            merged.addcmul_(out, weight.unsqueeze(-1))
        ctx.save_for_backward(weights, *outputs)
        return merged.to(outputs[0].dtype)

    @staticmethod
    def backward(ctx, dout):
        weights, *outputs = ctx.saved_tensors
        dots = torch.stack([(dout * out).sum(-1, dtype=weights.dtype) for out in outputs])
        dlses = weights * (dots - (weights * dots).sum(0))
        douts = [(dout * weight.unsqueeze(-1)).to(out.dtype) for weight, out in zip(weights, outputs)]
        return (*douts, *dlses)


def merge_by_lse(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """sum_i softmax_i(LSE_i) O_i: the partial attentions combined as one softmax over all their keys.
    Computed in the outputs' dtype, at least fp32; the LSEs get their exact gradient."""
    return _LseMerge.apply(*outputs, *lses)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
                      dilated_ratios: list[int], causal: bool = True, first_head: int = 0) -> torch.Tensor:
    """The mixture of (w_i, r_i) patterns on [b, h, n, d]; K/V may have fewer heads (GQA). All patterns in one
    autograd function, which needs no gradient on their LSEs."""
    k, v = _expand_kv(q, k, v)
    patterns = tuple(zip(segment_lengths, dilated_ratios))
    return _DilatedAttention.apply(q, k, v, patterns, causal, first_head, _core(q.device))[0]


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
