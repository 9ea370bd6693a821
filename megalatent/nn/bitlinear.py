"""BitNet b1.58's BitLinear (arXiv 2402.17764 and its "Training Tips, Code and FAQ").

    x_n   = RMSNorm(x)                               every BitLinear normalises its own input
    s_x   = 127 / max|x_n|             per token     8-bit absmax activations, symmetric
    x_int = clip(round(x_n * s_x), -128, 127)
    γ     = mean|W|                    per tensor    ternary absmean weights
    W_int = clip(round(W / γ), -1, 1)
    y     = (x_int W_intᵀ) * γ / s_x

Training keeps full-precision latent weights, gradients and optimizer state. Both quantisers are
passed straight through (STE): the backward is that of y = x_q W_qᵀ with x_q = x_int / s_x and
W_q = W_int γ (the unquantised layer evaluated at the quantised point), with dx_q/dx_n = dW_q/dW = I.

The forward multiplies on the integer grid first and applies the two scales after, as the packed
W2A8 inference kernel does (kernels/bitnet.py): a sum of products of integers is exact in fp32 as
long as it stays below 2^24 (|x_int W_int| <= 127 per term: true for any width below 132K), so a model
trained in fp32 gives bit-identical logits from its packed export. Backward keeps x_int as int8,
a quarter of the activation memory a fake-quantised fp32 input would take.

Tensor parallelism. The scales are those of the whole, unsharded tensors, so the numbers do not depend
on the TP degree (beyond the order of float sums). Everything here is plain tensor ops, so under the
DTensor plan of distributed/tensor_parallel.py the reductions over a sharded dimension become
collectives: mean|W| of a row- or column-sharded weight is an all-reduce of one partial sum per
layer; for a row-parallel layer, whose input is sharded over its features, the RMS is an all-reduce
(mean) of Σx² per token and s_x an all-reduce (max) of max|x_n| per token. The input-norm weight is
replicated in column-parallel layers (their input is whole) and sharded like the input features in
row-parallel ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_MAX = 127  # int8, symmetric: x_int in [-128, 127] with s_x = 127 / max|x|
SCALE_FLOOR = 1e-5  # the FAQ's clamp: an all-zero token or weight gets a finite scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 (or wider). Written out rather than F.rms_norm so that
    a feature dimension sharded under tensor parallelism is reduced over the whole tensor."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax to int8: returns (x_int, s_x) with x ≈ x_int / s_x; x_int holds integers in
    [-128, 127] in x's dtype, s_x is [..., 1]."""
    scale = ACTIVATION_MAX / x.abs().amax(-1, keepdim=True).clamp(min=SCALE_FLOOR)
    return (x * scale).round().clamp(-ACTIVATION_MAX - 1, ACTIVATION_MAX), scale


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean to ternary: returns (W_int, γ) with W ≈ W_int * γ, W_int in {-1, 0, 1} (fp32);
    γ is a 0-d fp32 tensor, computed in fp32 even from bf16 weights."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    gamma = w.abs().mean().clamp(min=SCALE_FLOOR)
    return (w / gamma).round().clamp(-1, 1), gamma


class _TernaryLinear(torch.autograd.Function):
    """y = (x_int W_intᵀ) γ / s_x forward; the straight-through backward of y = x_q W_qᵀ."""

    # Under bf16 autocast on a GPU the backward's matmuls run in bf16 too, as the forward's did.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x_n: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_int, s_x = quantize_activations(x_n)
        w_int, gamma = quantize_weights(weight)
        ctx.save_for_backward(x_int.to(torch.int8), s_x, w_int.to(torch.int8), gamma)
        ctx.dtypes = (x_n.dtype, weight.dtype)
        return F.linear(x_int, w_int.to(x_int.dtype)) * (gamma / s_x)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y: torch.Tensor):
        x_int, s_x, w_int, gamma = ctx.saved_tensors
        dtype = grad_y.dtype
        w_q = w_int.to(dtype) * gamma.to(dtype)
        x_q = x_int.to(dtype) / s_x.to(dtype)
        grad_x = grad_y @ w_q
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_q.reshape(-1, x_q.shape[-1])
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1])


class TernaryLinear(nn.Linear):
    """A bias-free linear layer with b1.58's ternary weights and int8 activations, and no norm of its own: the
    input is quantised as it comes (the layout of transformers' BitNetForCausalLM, where a block RMSNorm or a
    sub-layer norm feeds each projection). `weight` is the full-precision latent weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        if bias:
            raise ValueError("BitLinear has no bias (BitNet b1.58 is LLaMA-like: bias-free)")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TernaryLinear.apply(x.to(torch.promote_types(x.dtype, torch.float32)), self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary weights, int8 activations"


class BitLinear(TernaryLinear):
    """A TernaryLinear with BitNet b1.58's input RMSNorm: the paper's BitLinear.

    `norm_weight` is the RMSNorm's gain (ones at init, not weight-decayed, like every vector). Drop-in for
    nn.Linear in the decoder's `linear=` hooks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_n = rms_norm(x, self.norm_weight, self.eps)
        return _TernaryLinear.apply(x_n, self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, input RMSNorm"
