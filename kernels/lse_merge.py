"""The LSE merge of partial attentions as Triton kernels, forward and backward:

    O = sum_i w_i O_i,   w_i = exp(LSE_i - LSE),   LSE = logsumexp_i LSE_i

(one softmax over the union of the partials' keys). The reference is `merge_by_lse` in
megalatent/nn/dilated.py (`reference` below), which differentiates through the LSEs; so does this:

    dO_i = w_i dO,   dLSE_i = w_i * <dO, O_i - O>     (d O / d LSE_i = w_i (O_i - O)).

Each program takes a block of rows (b * h * n flattened) and loops over the partials, in fp32. The backward
recomputes O in fp32 from the partials instead of reading the rounded output, so it is exact for bf16
partials too. Rows that no partial covers (every LSE_i = NOT_COVERED) get w_i = 1 / count and O = 0, as in
the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalatent.nn.dilated import merge_by_lse as reference  # noqa: F401  (the plain-PyTorch reference)

BLOCK_ROWS = 32


@triton.jit
def _merge_fwd_kernel(O, LSE, OUT, OUT_LSE, rows, PARTS, HEAD_DIM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    r_ok = r < rows
    mask = r_ok[:, None] & (dims < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for i in range(PARTS):
        m = tl.maximum(m, tl.load(LSE + i * rows + r, mask=r_ok, other=0.0))
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(PARTS):
        weight = tl.exp(tl.load(LSE + i * rows + r, mask=r_ok, other=0.0) - m)
        o = tl.load(O + (i * rows + r)[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        total += weight
        acc += weight[:, None] * o.to(tl.float32)
    tl.store(OUT + r[:, None] * HEAD_DIM + dims[None, :], (acc / total[:, None]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT_LSE + r, m + tl.log(total), mask=r_ok)


@triton.jit
def _merge_bwd_kernel(O, LSE, DOUT, DO, DLSE, rows, PARTS, HEAD_DIM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    r_ok = r < rows
    mask = r_ok[:, None] & (dims < HEAD_DIM)[None, :]
    # The weights again from the partial LSEs, not from the merged LSE: where no partial covers a row,
    # NOT_COVERED + log(P) rounds to NOT_COVERED and exp(LSE_i - LSE) would be 1 instead of 1 / P.
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for i in range(PARTS):
        m = tl.maximum(m, tl.load(LSE + i * rows + r, mask=r_ok, other=0.0))
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(PARTS):  # O again, in fp32
        weight = tl.exp(tl.load(LSE + i * rows + r, mask=r_ok, other=0.0) - m)
        total += weight
        out += weight[:, None] * tl.load(O + (i * rows + r)[:, None] * HEAD_DIM + dims[None, :], mask=mask,
                                         other=0.0).to(tl.float32)
    out = out / total[:, None]
    dout = tl.load(DOUT + r[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    for i in range(PARTS):
        weight = tl.exp(tl.load(LSE + i * rows + r, mask=r_ok, other=0.0) - m) / total
        offsets = (i * rows + r)[:, None] * HEAD_DIM + dims[None, :]
        o = tl.load(O + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DO + offsets, (weight[:, None] * dout).to(DO.dtype.element_ty), mask=mask)
        tl.store(DLSE + i * rows + r, weight * tl.sum(dout * (o - out), 1), mask=r_ok)


# The launches as torch operators with fake implementations (see dilated_attention.py): fake tensors take them.
@torch.library.custom_op("megalatent::lse_merge_forward", mutates_args=())
def _forward_op(outputs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    parts, d = outputs.shape[0], outputs.shape[-1]
    rows = lses[0].numel()
    out = torch.empty(outputs.shape[1:], dtype=outputs.dtype, device=outputs.device)
    out_lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    block_d = max(16, triton.next_power_of_2(d))
    _merge_fwd_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](outputs, lses, out, out_lse, rows, parts,
                                                        HEAD_DIM=d, BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d)
    return out


@_forward_op.register_fake
def _(outputs, lses):
    return outputs.new_empty(outputs.shape[1:])


@torch.library.custom_op("megalatent::lse_merge_backward", mutates_args=())
def _backward_op(outputs: torch.Tensor, lses: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parts, d = outputs.shape[0], outputs.shape[-1]
    rows = lses[0].numel()
    doutputs = torch.empty_like(outputs)
    dlses = torch.empty_like(lses)
    _merge_bwd_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        outputs, lses, dout, doutputs, dlses, rows, parts,
        HEAD_DIM=d, BLOCK_R=BLOCK_ROWS, BLOCK_D=max(16, triton.next_power_of_2(d)))
    return doutputs, dlses


@_backward_op.register_fake
def _(outputs, lses, dout):
    return torch.empty_like(outputs), torch.empty_like(lses)


class LseMergeFunction(torch.autograd.Function):
    """Stacked partials O [P, ..., d] and LSE [P, ...] (fp32) -> the merged output [..., d]. The merged LSE
    is computed too but not returned: the mixture's callers need only O."""

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, lses: torch.Tensor):
        outputs, lses = outputs.contiguous(), lses.float().contiguous()
        ctx.save_for_backward(outputs, lses)
        return torch.ops.megalatent.lse_merge_forward(outputs, lses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        outputs, lses = ctx.saved_tensors
        return torch.ops.megalatent.lse_merge_backward(outputs, lses, dout.contiguous())


def lse_merge(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """sum_i softmax_i(LSE_i) O_i, equal to `reference(outputs, lses)`; O_i [..., d] share a dtype, LSE_i [...]."""
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"lse_merge: {len(outputs)} outputs and {len(lses)} LSEs; give one LSE per output")
    if len(outputs) == 1:  # softmax over one partial is 1: nothing to merge (and no gradient to the LSE)
        return outputs[0]
    return LseMergeFunction.apply(torch.stack(outputs), torch.stack(lses))
