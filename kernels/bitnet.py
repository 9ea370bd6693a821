"""BitNet b1.58 inference kernels, each beside its plain-PyTorch reference.

    pack_ternary / unpack_ternary    {-1, 0, 1} weights <-> 2-bit codes, 4 per byte (lossless)
    rmsnorm_act_quant                RMSNorm + per-token int8 absmax quantisation, fused (one read of x)
    w2a8_matmul                      y = (x_int8 · W_ternaryᵀ) * scale, the weights read packed

Packed layout. A weight [N, K] (K divisible by 4) becomes uint8 [N, K/4]: byte j of row n holds the
codes (w + 1 ∈ {0, 1, 2}) of columns j, j + K/4, j + 2K/4, j + 3K/4 in bits 0-1, 2-3, 4-5, 6-7. Four
"planes" rather than four neighbours: a kernel tile of bytes [BN, BJ] decodes with one shift and mask
per plane into four [BN, BJ] int8 tiles, each multiplied with a contiguous [BM, BJ] tile of the
activations, with no interleaving or reshapes in the kernel. (microsoft/BitNet's GPU kernel packs 16
codes per int32 with an interleave made for its dp4a loop; this one is made for tl.dot.)

The references are the ones the training layer uses (megalatent/nn/bitlinear.py), so the packed
model computes exactly what the fake-quantised one does. `rmsnorm_act_quant` and `w2a8_matmul` run the
Triton kernels on CUDA tensors (when triton is installed) and the references otherwise; the tests run
the kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalatent.nn.bitlinear import ACTIVATION_MAX, SCALE_FLOOR, quantize_activations, rms_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU: the references run instead
    triton = None

CODES_PER_BYTE = 4


# ------------------------------------------------------------------------------------ packing

def pack_ternary(w_int: torch.Tensor) -> torch.Tensor:
    """[N, K] values in {-1, 0, 1} (any dtype) -> uint8 [N, K/4] (see the layout above)."""
    n, k = w_int.shape
    if k % CODES_PER_BYTE:
        raise ValueError(f"pack_ternary: the input width {k} must be divisible by {CODES_PER_BYTE}")
    codes = (w_int.to(torch.int16) + 1).to(torch.uint8).view(n, CODES_PER_BYTE, k // CODES_PER_BYTE)
    packed = torch.zeros(n, k // CODES_PER_BYTE, dtype=torch.uint8, device=w_int.device)
    for plane in range(CODES_PER_BYTE):
        packed |= codes[:, plane] << (2 * plane)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/4] -> int8 [N, K] in {-1, 0, 1}; the inverse of pack_ternary."""
    planes = [((packed >> (2 * plane)) & 3).to(torch.int8) - 1 for plane in range(CODES_PER_BYTE)]
    return torch.cat(planes, dim=1)


# --------------------------------------------------------------------------------- references

def rmsnorm_act_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [..., K] -> (x_int int8 [..., K], s_x [..., 1] in fp32 or wider): RMSNorm then int8 absmax."""
    x_int, scale = quantize_activations(rms_norm(x, weight, eps))
    return x_int.to(torch.int8), scale


def int8_matmul(x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """x_int [M, K] int8 · w_int [N, K]ᵀ int8 -> [M, N] int32, exactly. On CPU oneDNN's int8 GEMM
    (torch._int_mm, a quarter of an fp32 matmul's memory traffic); elsewhere an fp32 matmul of the
    integers, exact while the sums stay below 2^24 (|x_int w_int| <= 128 per term: any K below 131K)."""
    if x_int.device.type == "cpu":
        return torch._int_mm(x_int, w_int.t())
    return F.linear(x_int.float(), w_int.float()).to(torch.int32)


def w2a8_matmul_reference(x_int: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x_int [..., K] int8 · unpack(packed)ᵀ) * scale [..., 1], in scale's dtype: the integer product is
    exact, so this equals the training layer's fp32 product of the same integers. It unpacks the weights
    at every call: the reference, not a fast path."""
    acc = int8_matmul(x_int.reshape(-1, x_int.shape[-1]), unpack_ternary(packed))
    return acc.view(*x_int.shape[:-1], -1).to(scale.dtype) * scale


# ------------------------------------------------------------------------------------- kernels

if triton is not None:
    @triton.jit
    def _round_half_even(v):
        """torch.round's rounding (ties to even), exactly: floor and the fraction are exact in fp32."""
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def _rmsnorm_act_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, eps, QMAX: tl.constexpr,
                                  FLOOR: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_K)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xn = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps) * w
        scale = QMAX / tl.maximum(tl.max(tl.abs(xn), axis=0), FLOOR)
        q = tl.minimum(tl.maximum(_round_half_even(xn * scale), -QMAX - 1.0), QMAX * 1.0)
        tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _w2a8_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K4, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j0 in range(0, K4, BLOCK_J):
            rj = j0 + tl.arange(0, BLOCK_J)
            w_mask = (rn[:, None] < N) & (rj[None, :] < K4)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + rj[None, :], mask=w_mask, other=0).to(tl.int32)
            x_mask = (rm[:, None] < M) & (rj[None, :] < K4)
            for plane in tl.static_range(4):
                w = (((packed >> (2 * plane)) & 3) - 1).to(tl.int8)  # [BN, BJ]: columns plane*K4 + rj
                x = tl.load(x_ptr + rm[:, None] * stride_xm + (plane * K4 + rj)[None, :], mask=x_mask, other=0)
                acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        scale = tl.load(scale_ptr + rm, mask=rm < M, other=0.0)
        y = acc.to(tl.float32) * scale[:, None]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def rmsnorm_act_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """The fused kernel: same contract as rmsnorm_act_quant_reference (s_x in fp32)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)  # one program per row holds the whole row: one read of x
    _rmsnorm_act_quant_kernel[(rows.shape[0],)](rows, weight.contiguous(), q, s, k, rows.stride(0), eps,
                                                QMAX=ACTIVATION_MAX, FLOOR=SCALE_FLOOR, BLOCK_K=block,
                                                num_warps=min(max(block // 512, 1), 16))
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def w2a8_matmul_triton(x_int: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                       block_m: int = 16, block_n: int = 64, block_j: int = 64) -> torch.Tensor:
    """The W2A8 kernel: same contract as w2a8_matmul_reference (output in fp32)."""
    k4 = packed.shape[1]
    x = x_int.reshape(-1, x_int.shape[-1]).contiguous()
    m, n = x.shape[0], packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w2a8_kernel[grid](x, packed.contiguous(), scale.reshape(-1).float().contiguous(), y, m, n, k4,
                       x.stride(0), packed.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j)
    return y.view(*x_int.shape[:-1], n)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float):
    fn = rmsnorm_act_quant_triton if _use_triton(x) else rmsnorm_act_quant_reference
    return fn(x, weight, eps)


def w2a8_matmul(x_int: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    fn = w2a8_matmul_triton if _use_triton(x_int) else w2a8_matmul_reference
    return fn(x_int, packed, scale)
