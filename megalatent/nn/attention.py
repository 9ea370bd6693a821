"""Causal self-attention with grouped-query heads and RoPE (the baseline decoder's attention)."""
import torch
from torch import nn
import torch.nn.functional as F

from megalatent.nn.rotary import apply_rotary


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
