"""Causal self-attention with grouped-query heads and RoPE (the baseline decoder's attention)."""
import torch
from torch import nn
import torch.nn.functional as F

from megalatent.nn.rotary import Positions, apply_rotary


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: Positions) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v on [batch, heads, seq, head_dim]; K/V heads may be fewer (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class SelfAttention(nn.Module):
    """Activations are [batch, seq, hidden] throughout (see README, "Activation layout").

    The local head counts are derived from the projection widths at run time, so the module stays
    correct when a tensor-parallel plan shards q/k/v column-wise.
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, linear=nn.Linear):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.q_proj = linear(hidden, num_heads * self.head_dim, bias=False)
        self.k_proj = linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = linear(num_heads * self.head_dim, hidden, bias=False)
        # The attention core: swapped by the parallelize step for context parallelism
        # (distributed/context_parallel.py), by a family for another kind of attention.
        self.core_attention = causal_attention

    def forward(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if positions.rope is not None:
            q, k = apply_rotary(q, *positions.rope), apply_rotary(k, *positions.rope)
        out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
