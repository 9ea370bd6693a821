"""Gated retention (YOCO's default self-decoder, arXiv 2405.05254 §3.1), in its three equivalent forms.

Per head, with a data-dependent scalar gate gamma_n = sigmoid(x_n W_gamma)^(1/16) in (0, 1):

    recurrent   S_n = gamma_n S_{n-1} + k_n^T v_n,          o_n = q_n S_n
    parallel    o = ((q k^T) * D) v,   D_nm = prod_{i=m+1..n} gamma_i  for m <= n, else 0
    chunkwise   the parallel form inside chunks of B tokens, and across chunks for the states at their ends
                (the plain-PyTorch reference of kernels/retention.py's Triton kernel)

All three take the gate as log gamma (<= 0): D_nm = exp(c_n - c_m) with c the running sum of log gamma,
so no product of many gates underflows. The state S is [batch, heads, d_k, d_v]; it is what decoding
keeps (a constant-size "cache") and what context parallelism passes from rank to rank. Training uses
the chunkwise form: O(N B d + N d^2 + (N/B)^2 d^2) work and O(N B) memory, against O(N^2) for the parallel
form.

`initial_state` lets a form start from a state accumulated elsewhere (the previous decode steps, or
the tokens on earlier context-parallel ranks): it adds exp(c_n) q_n S_0 to every output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.nn.rotary import Positions, apply_rotary

MODES = ("parallel", "chunkwise", "recurrent")
GATE_LOGIT_NORMALIZER = 16  # tau: gamma = sigmoid(.)^(1/tau), so gates start close to 1 (long memory)


def _from_state(q: torch.Tensor, cum: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """exp(c_n) q_n S_0: what a state carried in from before the first token adds to each output."""
    return (q * cum.exp().unsqueeze(-1)) @ state


def retention_parallel(q, k, v, log_gate, initial_state=None):
    """O(N^2) form: (q k^T * D) v. Returns (out, final state)."""
    cum = log_gate.cumsum(-1)  # c_n = sum_{i<=n} log gamma_i
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # Fill before exp: above the diagonal c_n - c_m > 0 and could overflow into inf * 0 = nan.
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    # Final state: S_N = sum_m exp(c_N - c_m) k_m^T v_m (+ exp(c_N) S_0).
    to_end = (cum[..., -1:] - cum).exp().unsqueeze(-1)
    state = (k * to_end).transpose(-1, -2) @ v
    if initial_state is not None:
        out = out + _from_state(q, cum, initial_state)
        state = state + cum[..., -1, None, None].exp() * initial_state
    return out, state


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """[..., c] -> [..., c, c]: out[i, j] = x_{j+1} + ... + x_i for j <= i (0 on the diagonal), -inf above it.
    Summed segment by segment (a masked cumsum), not as differences of one running sum, whose fp32 rounding at
    the large magnitudes a long sequence's gates reach would become a relative error in exp(out)."""
    c = x.shape[-1]
    ones = torch.ones(c, c, dtype=torch.bool, device=x.device)
    sums = x.unsqueeze(-1).expand(*x.shape, c).masked_fill(~ones.tril(-1), 0).cumsum(-2)  # over j < k <= i
    return sums.masked_fill(~ones.tril(), float("-inf"))


def retention_chunkwise(q, k, v, log_gate, chunk_size: int, initial_state=None):
    """The parallel form inside chunks of `chunk_size` tokens (all chunks in one batched op), and the state at
    each chunk's end by the parallel form of the chunk-level recurrence S_c = G_c S_{c-1} + U_c (G_c the chunk's
    total decay, U_c its own contribution): one [chunks x chunks] decay matrix times the U_c, a few operators
    whatever the number of chunks, where a loop over the chunks launched a few per chunk (on a GPU, and in the
    planner's simulation, their count is the cost; the extra FLOPs are chunks * d / (2 B^2) of the intra-chunk
    ones: 6% at 64 chunks of B = 256 tokens and d = 128). Under bf16 autocast these states are bf16, like every
    matmul's output there (the next use of each, q S, is a bf16 matmul anyway). Returns (out, final state)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    size = min(chunk_size, n)
    pad = (-n) % size  # padding at the end: gate 1 (log 0) and k = 0 leave outputs and state unchanged
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    chunks = (n + pad) // size
    qc, kc, vc = q.view(b, h, chunks, size, dk), k.view(b, h, chunks, size, dk), v.view(b, h, chunks, size, dv)
    cum = F.pad(log_gate, (0, pad)).view(b, h, chunks, size).cumsum(-1)  # within each chunk
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    # U_c = sum_m exp(c_end - c_m) k_m^T v_m over the chunk's tokens, flattened to [b, h, chunks, dk * dv].
    own = ((kc * (cum[..., -1:] - cum).exp().unsqueeze(-1)).transpose(-1, -2) @ vc).flatten(-2)
    chunk_log_decay = cum[..., -1]  # log G_c
    ends = segment_sums(chunk_log_decay).exp() @ own  # the state at each chunk's end, from a zero state
    if initial_state is not None:
        ends = ends + chunk_log_decay.cumsum(-1).exp().unsqueeze(-1) * initial_state.flatten(-2).unsqueeze(2)
    start = initial_state if initial_state is not None else q.new_zeros(b, h, dk, dv)
    entering = torch.cat([start.flatten(-2).unsqueeze(2), ends[:, :, :-1]], dim=2).view(b, h, chunks, dk, dv)
    inter = (qc * cum.exp().unsqueeze(-1)) @ entering
    return (intra + inter).view(b, h, chunks * size, dv)[:, :, :n], ends[:, :, -1].view(b, h, dk, dv)


def retention_recurrent(q, k, v, log_gate, initial_state=None):
    """One token at a time: S_n = gamma_n S_{n-1} + k_n^T v_n, o_n = q_n S_n (what decoding runs)."""
    b, h, n, dk = q.shape
    state = initial_state if initial_state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(n):
        state = log_gate[:, :, t, None, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ state)
    return torch.cat(outs, dim=2), state


def gated_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                    mode: str = "chunkwise", chunk_size: int = 256,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [b, h, n, d_k], v [b, h, n, d_v], log_gate [b, h, n] (log gamma <= 0), initial_state
    [b, h, d_k, d_v] or None. Returns (out [b, h, n, d_v], final state), computed in fp32 (or fp64;
    under autocast its matmuls take autocast's dtype)."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v, log_gate = (t.to(compute) for t in (q, k, v, log_gate))
    init = initial_state.to(compute) if initial_state is not None else None
    if mode == "parallel":
        out, state = retention_parallel(q, k, v, log_gate, init)
    elif mode == "chunkwise":
        out, state = retention_chunkwise(q, k, v, log_gate, chunk_size, init)
    elif mode == "recurrent":
        out, state = retention_recurrent(q, k, v, log_gate, init)
    else:
        raise ValueError(f"gated retention mode must be one of {MODES}, got {mode!r}")
    return out.to(dtype), state


class RetentionCore:
    """The sequence mixing of a gated-retention layer: a form of `gated_retention` with zero initial state.
    (A faster implementation of the chunkwise form, kernels/retention.py, and the context-parallel one,
    distributed/context_parallel/retention.py, take its place where a model or a layout asks for them.)"""

    def __init__(self, mode: str = "chunkwise", chunk_size: int = 256):
        if mode not in MODES:
            raise ValueError(f"gated retention mode must be one of {MODES}, got {mode!r}")
        self.mode, self.chunk_size = mode, chunk_size

    def __call__(self, q, k, v, log_gate, positions: Positions) -> torch.Tensor:
        return self.with_state(q, k, v, log_gate)[0]

    def with_state(self, q, k, v, log_gate, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, final state), from `initial_state` (None: zero)."""
        return gated_retention(q, k, v, log_gate, self.mode, self.chunk_size, initial_state)

    def __repr__(self) -> str:
        return f"RetentionCore({self.mode}, chunk={self.chunk_size})"


class GatedRetention(nn.Module):
    """YOCO's gated-retention layer: q, k rotated (RoPE), k scaled by d^-1/2, a per-head scalar gate
    from x, multi-scale retention, a per-head RMSNorm (no affine), a swish output gate, o_proj.

    Local head counts come from the gate projection's width, so the module is right under tensor
    parallelism (q/k/v/g/gate column-parallel, o_proj row-parallel). With an inference cache (a
    `RetentionState`) it continues from the cached state and stores the new one.
    """

    def __init__(self, hidden: int, num_heads: int, mode: str = "chunkwise", chunk_size: int = 256,
                 norm_eps: float = 1e-6, linear=nn.Linear, core: RetentionCore | None = None):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.norm_eps = norm_eps
        self.q_proj = linear(hidden, hidden, bias=False)
        self.k_proj = linear(hidden, hidden, bias=False)
        self.v_proj = linear(hidden, hidden, bias=False)
        self.g_proj = linear(hidden, hidden, bias=False)  # swish output gate
        self.gate_proj = linear(hidden, num_heads, bias=False)  # W_gamma: one scalar gate per head
        self.o_proj = linear(hidden, hidden, bias=False)
        self.core_attention = core if core is not None else RetentionCore(mode, chunk_size)

    def forward(self, x: torch.Tensor, positions: Positions, cache=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if positions.rope is not None:
            q, k = apply_rotary(q, *positions.rope), apply_rotary(k, *positions.rope)
        log_gate = F.logsigmoid(self.gate_proj(x).float()).transpose(1, 2) / GATE_LOGIT_NORMALIZER  # [b, h, s]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2) * self.head_dim ** -0.5, v.transpose(1, 2)
        if cache is None:
            out = self.core_attention(q, k, v, log_gate, positions)
        elif s == 1:  # decoding: recurrent, one token at a time
            out, cache.state = gated_retention(q, k, v, log_gate, "recurrent", initial_state=cache.state)
        else:  # a prompt: the core's block form, from the cached state
            out, cache.state = self.core_attention.with_state(q, k, v, log_gate, cache.state)
        out = F.rms_norm(out.float(), (self.head_dim,), eps=self.norm_eps).type_as(x)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(F.silu(self.g_proj(x)) * out)

