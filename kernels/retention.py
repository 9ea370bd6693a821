"""Chunkwise gated retention (YOCO's self-decoder) as a Triton kernel, beside its plain-PyTorch reference
`megalatent.nn.retention.retention_chunkwise`.

One program per (batch x head, block of value columns) walks the sequence chunk by chunk, keeping the
running state S [d_k, BLOCK_V] in registers: per chunk of BLOCK_T tokens, with c the running sum of
log gates inside the chunk,

    o     = ((q k^T) * exp(c_n - c_m) [m <= n]) v  +  (q * exp(c)) S          (intra + carried state)
    S_new = exp(c_last) S + (k * exp(c_last - c))^T v

so the sequence is read once and no [n, n] or per-chunk state tensor is written to memory (the PyTorch
reference materialises the states entering every chunk). Forward only: `chunk_retention`'s backward
recomputes the reference with autograd (exact, at the reference's cost and memory).

Tested on CPU under TRITON_INTERPRET=1 (tests/test_retention_kernel.py). Not yet timed on a GPU, so the
trainer does not select it by default: measure it first (tools/bench_inference.py --retention-form
triton; in code, RetentionCore mode "triton" or `chunk_retention`); flash-linear-attention's
`chunk_simple_gla` is the alternative to measure against.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dev/GPU dependency
    triton = None


if triton is not None:
    @triton.jit
    def _chunk_retention_fwd(Q, K, V, G, O, S0, SN, n, HAS_S0: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
        bh = tl.program_id(0)
        vb = tl.program_id(1)
        rows = tl.arange(0, BLOCK_T)
        kcols = tl.arange(0, DK)
        vcols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        q_base, k_base = Q + bh * n * DK, K + bh * n * DK
        v_base, o_base, g_base = V + bh * n * DV, O + bh * n * DV, G + bh * n
        state_offsets = bh * DK * DV + kcols[:, None] * DV + vcols[None, :]
        if HAS_S0:
            state = tl.load(S0 + state_offsets).to(tl.float32)
        else:
            state = tl.zeros((DK, BLOCK_V), dtype=tl.float32)
        causal = rows[:, None] >= rows[None, :]
        for start in range(0, n, BLOCK_T):
            t = start + rows
            valid = t < n
            # Padding past the end: gate 1 (log 0) and k = 0, so outputs and state are unchanged.
            q = tl.load(q_base + t[:, None] * DK + kcols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            k = tl.load(k_base + t[:, None] * DK + kcols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_base + t[:, None] * DV + vcols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            g = tl.load(g_base + t, mask=valid, other=0.0).to(tl.float32)
            c = tl.cumsum(g, axis=0)
            c_last = tl.sum(g, axis=0)
            # exp of (c_n - c_m) only where m <= n: above the diagonal it is positive and may overflow.
            decay = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))
            scores = tl.dot(q, tl.trans(k)) * decay
            out = tl.dot(scores, v) + tl.dot(q * tl.exp(c)[:, None], state)
            tl.store(o_base + t[:, None] * DV + vcols[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])
            k_to_end = k * tl.exp(c_last - c)[:, None]
            state = state * tl.exp(c_last) + tl.dot(tl.trans(k_to_end), v)
        tl.store(SN + state_offsets, state)


def chunk_retention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                            initial_state: torch.Tensor | None = None, block_t: int = 64,
                            block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [b, h, n, d_k], v [b, h, n, d_v], log_gate [b, h, n] -> (out [b, h, n, d_v] in q's dtype, final
    state [b, h, d_k, d_v] in fp32). d_k, d_v powers of two >= 16; block_t >= 16 (tl.dot's minimum)."""
    if triton is None:
        raise RuntimeError("the Triton retention kernel needs the triton package (pip install triton)")
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    for name, d in (("d_k", dk), ("d_v", dv)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"the Triton retention kernel needs {name} a power of two >= 16, got {d}")
    block_v = block_v or min(dv, 64)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_gate = log_gate.float().contiguous()
    out = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
    final = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    s0 = initial_state.float().contiguous() if initial_state is not None else final  # unread without HAS_S0
    _chunk_retention_fwd[(b * h, dv // block_v)](q, k, v, log_gate, out, s0, final, n, HAS_S0=initial_state is not None,
                                                 DK=dk, DV=dv, BLOCK_T=block_t, BLOCK_V=block_v)
    return out, final


class _ChunkRetention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_gate, initial_state, block_t):
        ctx.save_for_backward(q, k, v, log_gate, initial_state)
        ctx.block_t = block_t
        return chunk_retention_forward(q, k, v, log_gate, initial_state, block_t)

    @staticmethod
    def backward(ctx, d_out, d_state):
        from megalatent.nn.retention import gated_retention
        q, k, v, log_gate, initial_state = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (q, k, v, log_gate, initial_state)]
        with torch.enable_grad():
            out, state = gated_retention(*inputs[:4], "chunkwise", ctx.block_t, inputs[4])
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((out, state), wanted, (d_out, d_state), allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs) + (None,)


def chunk_retention(q, k, v, log_gate, initial_state=None, block_t: int = 64):
    """Differentiable chunkwise gated retention: the Triton forward, the reference's backward."""
    return _ChunkRetention.apply(q, k, v, log_gate, initial_state, block_t)
