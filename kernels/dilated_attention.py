"""One dilated-attention pattern (w, r) as fused Triton kernels: forward with its log-sum-exp, and the
flash-attention-2 backward, which also takes a gradient on that log-sum-exp.

The plain-PyTorch reference is `attention_pattern` in megalatent/nn/dilated.py (`reference` below); this
computes the same thing without materialising the sparse rows. Head j of a segment s keeps the rows

    seg_row(i) = s * w + offset_j + r * i,   offset_j = (first_head + j) mod r,   i = 0 .. ceil(w / r) - 1,

which the kernels address with strided loads straight from q/k/v [b, h, n, d] (any strides). A row is
real when offset_j + r * i < w (segment padding) and seg_row(i) < n (sequence padding); padded rows are
masked out of every load, score and store. Causal masking compares i, the index among the kept rows,
which has the same order as the position since queries and keys share the stride.

Programs: forward and dq run over (segment * query blocks, batch * head); dk/dv over (segment * key
blocks, batch * kv-head * offset class). Segments and blocks share grid axis 0 (2^31 programs) because a
million-token sequence of short segments would overflow axis 1 or 2 (65535). Under grouped-query
attention the query heads of a group that share a K/V head have offsets (first_head + j) mod r: heads
with equal offsets use the same key rows (their dk/dv add up), heads with different offsets use disjoint
rows. So one dk/dv program per (kv head, offset class) loops over the query heads of its class and owns
its key rows: no atomics, each row written once.

Rows this pattern does not keep get output 0 and LSE = NOT_COVERED (and zero gradients), as in the
reference. Scores use exp2 with the scale folded in (log2 e / sqrt(d)); accumulation is fp32 for bf16,
fp16 and fp32 inputs (fp32 matmuls in IEEE precision unless torch allows TF32 matmuls, as torch does).
Block sizes are powers of two, at least 16 (tl.dot's minimum) and at most 64 (`TILES`); d <= 128.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from megalatent.nn.dilated import NOT_COVERED, _expand_kv, attention_pattern

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference(q, k, v, w: int, r: int, causal: bool = True, first_head: int = 0):
    """The plain-PyTorch pattern this kernel must equal (GQA K/V expanded to the query heads)."""
    k, v = _expand_kv(q, k, v)
    return attention_pattern(q, k, v, w, r, causal, first_head)


@triton.jit
def _kept_rows(segment, index, offset, n, W, R):
    """Sequence positions of kept rows `index` of one head's pattern in `segment`, and which are real."""
    within = offset + R * index
    position = segment * W + within
    return position.to(tl.int64), (within < W) & (position < n)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                n, H, GROUP, W, R, ROWS, BLOCKS, first_head, qk_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    segment, block = tl.program_id(0) // BLOCKS, tl.program_id(0) % BLOCKS
    bh = tl.program_id(1)
    batch, head = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets can pass 2^31
    kv_head = head // GROUP
    offset = (first_head + head) % R
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    i = block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos, q_ok = _kept_rows(segment, i, offset, n, W, R)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + q_pos[:, None] * stride_qn + dims[None, :],
                mask=q_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    # Running max starts finite, so rows that see no key in a block never compute (-inf) - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(ROWS, (block + 1) * BLOCK_M) if CAUSAL else ROWS  # causal: no key after the block
    for start in range(0, end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k_pos, k_ok = _kept_rows(segment, j, offset, n, W, R)
        k = tl.load(k_base + k_pos[:, None] * stride_kn + dims[None, :], mask=k_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = k_ok[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= i[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + k_pos[:, None] * stride_vn + dims[None, :], mask=k_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + batch * stride_ob + head * stride_oh + q_pos[:, None] * stride_on + dims[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & dim_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634  # log2 -> natural log (LOG2E; no globals in jit)
    tl.store(LSE + bh.to(tl.int64) * n + q_pos, lse, mask=q_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DLSE, DELTA,
                      stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                      n, H, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE: the per-row term of dS = P * (dP - delta). A gradient on the LSE adds
    dLSE * P to dS (d LSE / d s = P), which is the same as lowering delta by dLSE."""
    block, bh = tl.program_id(0), tl.program_id(1)
    batch, head = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets can pass 2^31
    rows = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < n)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + batch * stride_ob + head * stride_oh + rows[:, None] * stride_on + dims[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + batch * stride_db + head * stride_dh + rows[:, None] * stride_dn + dims[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * n + rows, mask=rows < n, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * n + rows, delta, mask=rows < n)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                     n, H, KV_HEADS, GROUP, CLASSES, W, R, ROWS, BLOCKS, first_head, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    segment, block = tl.program_id(0) // BLOCKS, tl.program_id(0) % BLOCKS
    pid = tl.program_id(1)
    batch = (pid // (KV_HEADS * CLASSES)).to(tl.int64)  # int64: offsets can pass 2^31
    kv_head = ((pid // CLASSES) % KV_HEADS).to(tl.int64)
    first_in_class = kv_head * GROUP + pid % CLASSES  # query heads of this class: every R-th from here
    offset = (first_head + first_in_class) % R
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    j = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k_pos, k_ok = _kept_rows(segment, j, offset, n, W, R)
    kv_mask = k_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + k_pos[:, None] * stride_kn + dims[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + k_pos[:, None] * stride_vn + dims[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    begin = block * BLOCK_N if CAUSAL else 0  # causal: no query before the block's first key
    for head in range(first_in_class, (kv_head + 1) * GROUP, R):
        q_base = Q + batch * stride_qb + tl.cast(head, tl.int64) * stride_qh
        do_base = DO + batch * stride_db + tl.cast(head, tl.int64) * stride_dh
        row_base = (batch * H + head) * n
        for start in range(begin, ROWS, BLOCK_M):
            i = start + tl.arange(0, BLOCK_M)
            q_pos, q_ok = _kept_rows(segment, i, offset, n, W, R)
            q_mask = q_ok[:, None] & dim_ok[None, :]
            q = tl.load(q_base + q_pos[:, None] * stride_qn + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + q_pos[:, None] * stride_dn + dims[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_base + q_pos, mask=q_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + q_pos, mask=q_ok, other=0.0)
            # Transposed scores [keys, queries], so the accumulations below need no transpose of P.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            visible = k_ok[:, None] & q_ok[None, :]
            if CAUSAL:
                visible = visible & (i[None, :] >= j[:, None])
            p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    kv_row = (batch * KV_HEADS + kv_head) * n + k_pos  # dk, dv are allocated contiguous [b, kv_heads, n, d]
    tl.store(DK + (kv_row[:, None] * HEAD_DIM + dims[None, :]), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + (kv_row[:, None] * HEAD_DIM + dims[None, :]), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                   n, H, GROUP, W, R, ROWS, BLOCKS, first_head, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    segment, block = tl.program_id(0) // BLOCKS, tl.program_id(0) % BLOCKS
    bh = tl.program_id(1)
    batch, head = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets can pass 2^31
    kv_head = head // GROUP
    offset = (first_head + head) % R
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    i = block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos, q_ok = _kept_rows(segment, i, offset, n, W, R)
    q_mask = q_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + batch * stride_qb + head * stride_qh + q_pos[:, None] * stride_qn + dims[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + batch * stride_db + head * stride_dh + q_pos[:, None] * stride_dn + dims[None, :],
                 mask=q_mask, other=0.0)
    row = bh.to(tl.int64) * n + q_pos
    lse = tl.load(LSE + row, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(ROWS, (block + 1) * BLOCK_M) if CAUSAL else ROWS
    for start in range(0, end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k_pos, k_ok = _kept_rows(segment, j, offset, n, W, R)
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + k_pos[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_pos[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= i[:, None])
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + (row[:, None] * HEAD_DIM + dims[None, :]), (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# (query rows, key rows, warps) per program for each kernel, for head dims up to 64 and up to 128: the
# largest tiles whose sm_90 cubins (bf16) use no spill stack (cuobjdump -res-usage: 164-236 registers).
# Not timed yet: tune on a GPU.
TILES = {"fwd": {64: (64, 64, 8), 128: (32, 64, 8)},
         "dkdv": {64: (32, 64, 8), 128: (32, 32, 8)},
         "dq": {64: (64, 32, 8), 128: (32, 32, 8)}}


def _block(rows: int, cap: int) -> int:
    """A power of two covering the kept rows of a segment, between tl.dot's minimum (16) and `cap`."""
    return max(16, min(cap, triton.next_power_of_2(rows)))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors, or None when it can."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return f"expected q [b, h, n, d] and k, v [b, kv_heads, n, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] or q.shape[1] % k.shape[1]:
        return f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (kv heads must divide the query heads)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one of fp16, bf16, fp32"
    return None


def _precision(q: torch.Tensor) -> str:
    """tl.dot's precision for fp32 inputs follows torch's matmul setting (IEEE unless TF32 is allowed);
    fp16/bf16 inputs multiply natively whatever it says."""
    tf32 = q.dtype != torch.float32 or (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "ieee"


class _Launch:
    """The sizes every kernel of one call shares: the pattern clamped to the sequence, and strides."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, w: int, r: int, causal: bool, first_head: int,
                 blocks: tuple[int, int] | None):
        self.b, self.h, self.n, self.d = q.shape
        self.kv_heads = k.shape[1]
        self.w = min(w, self.n)
        self.r = r
        self.segments = math.ceil(self.n / self.w)
        self.rows = math.ceil(self.w / r)  # kept rows per segment and head, padding included
        self.causal, self.first_head, self.blocks = causal, first_head, blocks
        self.common = dict(HEAD_DIM=self.d, CAUSAL=causal, BLOCK_D=max(16, triton.next_power_of_2(self.d)),
                           PRECISION=_precision(q))
        self.qk_scale = LOG2E / math.sqrt(self.d)

    def tiles(self, kernel: str) -> dict:
        """BLOCK_M, BLOCK_N (no larger than the kept rows need) and num_warps of one kernel's launch."""
        block_m, block_n, warps = TILES[kernel][64 if self.d <= 64 else 128]
        if self.blocks:
            block_m, block_n = self.blocks
        return dict(BLOCK_M=_block(self.rows, block_m), BLOCK_N=_block(self.rows, block_n), num_warps=warps)


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _forward(q, k, v, p: _Launch):
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows this pattern does not keep stay 0
    lse = torch.full((p.b, p.h, p.n), NOT_COVERED, dtype=torch.float32, device=q.device)
    tiles = p.tiles("fwd")
    blocks = triton.cdiv(p.rows, tiles["BLOCK_M"])
    _fwd_kernel[(p.segments * blocks, p.b * p.h)](
        q, k, v, o, lse, *_strides(q, k, v, o),
        p.n, p.h, p.h // p.kv_heads, p.w, p.r, p.rows, blocks, p.first_head, p.qk_scale, **tiles, **p.common)
    return o, lse


def _backward(q, k, v, o, lse, do, dlse, p: _Launch):
    sm_scale = 1.0 / math.sqrt(p.d)
    delta = torch.empty((p.b, p.h, p.n), dtype=torch.float32, device=q.device)
    dlse = dlse.contiguous() if dlse is not None else None
    _bwd_delta_kernel[(triton.cdiv(p.n, 64), p.b * p.h)](
        o, do, dlse if dlse is not None else delta, delta, *_strides(o, do), p.n, p.h,
        HAS_DLSE=dlse is not None, HEAD_DIM=p.d, BLOCK=64, BLOCK_D=p.common["BLOCK_D"])

    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)  # rows no head of the group keeps stay 0
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    group = p.h // p.kv_heads
    classes = min(p.r, group)  # distinct offsets among a group's query heads
    tiles = p.tiles("dkdv")
    blocks = triton.cdiv(p.rows, tiles["BLOCK_N"])
    _bwd_dkdv_kernel[(p.segments * blocks, p.b * p.kv_heads * classes)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q, k, v, do),
        p.n, p.h, p.kv_heads, group, classes, p.w, p.r, p.rows, blocks, p.first_head, p.qk_scale, sm_scale,
        **tiles, **p.common)
    tiles = p.tiles("dq")
    blocks = triton.cdiv(p.rows, tiles["BLOCK_M"])
    _bwd_dq_kernel[(p.segments * blocks, p.b * p.h)](
        q, k, v, do, lse, delta, dq, *_strides(q, k, v, do),
        p.n, p.h, group, p.w, p.r, p.rows, blocks, p.first_head, p.qk_scale, sm_scale, **tiles, **p.common)
    return dq, dk, dv


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and the head dim densely: [b, n, h, d].transpose(1, 2) is fine."""
    return x if x.stride(-1) == 1 else x.contiguous()


# The launches as torch operators (torch.library.custom_op): their fake implementations give the outputs'
# shapes without running a kernel, so the planner's fake tensors (megalatent/planning) and tracing take them,
# and their FLOP formulas let torch's flop counter see them. `block_m`/`block_n` 0: the default tiles.
@torch.library.custom_op("megalatent::dilated_pattern_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, causal: bool, first_head: int,
                block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, _Launch(q, k, w, r, causal, first_head, (block_m, block_n) if block_m else None))


@_forward_op.register_fake
def _(q, k, v, w, r, causal, first_head, block_m, block_n):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("megalatent::dilated_pattern_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, dlse: Optional[torch.Tensor], w: int, r: int, causal: bool, first_head: int,
                 block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    launch = _Launch(q, k, w, r, causal, first_head, (block_m, block_n) if block_m else None)
    return _backward(q, k, v, o, lse, do, dlse, launch)


@_backward_op.register_fake
def _(q, k, v, o, lse, do, dlse, w, r, causal, first_head, block_m, block_n):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def pattern_flops(q_shape, w: int, r: int, causal: bool) -> int:
    """FLOPs of one pattern's forward: q k^T and p v on each segment's kept rows (2 x 2 x rows x rows x d per
    head and segment), about half of the pairs under the causal mask."""
    b, h, n, d = q_shape
    w = min(w, n)
    rows = math.ceil(w / r)
    pairs = rows * (rows + 1) // 2 if causal else rows * rows
    return 4 * b * h * math.ceil(n / w) * pairs * d


@register_flop_formula(torch.ops.megalatent.dilated_pattern_forward)
def _forward_flops(q_shape, k_shape, v_shape, w, r, causal, first_head, block_m, block_n, out_shape=None, **kw):
    return pattern_flops(q_shape, w, r, causal)


@register_flop_formula(torch.ops.megalatent.dilated_pattern_backward)
def _backward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
    w, r, causal = args[4:7]
    return 5 * pattern_flops(q_shape, w, r, causal) // 2  # flash-attention-2: 5 matmuls to the forward's 2


class DilatedPatternFunction(torch.autograd.Function):
    """(out, lse) of one pattern; the backward takes gradients on both."""

    @staticmethod
    def forward(ctx, q, k, v, w, r, causal, first_head, blocks):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        block_m, block_n = blocks or (0, 0)
        o, lse = torch.ops.megalatent.dilated_pattern_forward(q, k, v, w, r, causal, first_head, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern = (w, r, causal, first_head, block_m, block_n)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else _last_dim_contiguous(do)
        dq, dk, dv = torch.ops.megalatent.dilated_pattern_backward(q, k, v, o, lse, do, dlse, *ctx.pattern)
        return dq, dk, dv, None, None, None, None, None


def dilated_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, causal: bool = True,
                    first_head: int = 0, blocks: tuple[int, int] | None = None):
    """One (w, r) pattern on q [b, h, n, d], k/v [b, kv_heads, n, d]: (out [b, h, n, d], lse [b, h, n] fp32),
    equal to `reference`. `blocks` = (query rows, key rows) per program overrides the defaults (tests)."""
    problem = check_inputs(q, k, v)
    if problem:
        raise ValueError(f"dilated attention kernel: {problem}")
    if blocks and any(x < 16 or x & (x - 1) for x in blocks):
        raise ValueError(f"dilated attention kernel: block sizes {blocks} must be powers of two >= 16")
    return DilatedPatternFunction.apply(q, k, v, w, r, causal, first_head, blocks)
