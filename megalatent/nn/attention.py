"""Causal self-attention with grouped-query heads and RoPE (the baseline decoder's attention), and the
sliding-window core (YOCO's SWA self-decoder)."""
import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megalatent.nn.rotary import Positions, apply_rotary


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: Positions) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v on [batch, heads, seq, head_dim]; K/V heads may be fewer (GQA).

    Without `positions.key_ids` the keys are a contiguous run of the sequence ending with the queries'
    last token (more keys than queries: the queries are the run's tail, "lower-right" causal; the fused
    kernels take that without a mask). With `key_ids` (gathered keys) a query sees the keys at or
    before its position."""
    gqa = q.shape[1] != k.shape[1]
    if positions.key_ids is None:
        if k.shape[2] == q.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              enable_gqa=gqa)
    visible = positions.key_ids[:, None, None, :] <= positions.ids[:, None, :, None]  # [b, 1, s, t]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention on [b, heads, n, d]: the query at position t sees the keys at
    t - window + 1 .. t (`window` keys, itself included; flash-attn's window_size=(window - 1, 0)).

    Blockwise, so memory is O(n window) rather than O(n^2): queries in blocks of `window` tokens attend
    to their own block and the block before, under a band mask.
    """
    b, h, n, d = q.shape
    gqa = h != k.shape[1]
    if window >= n:  # the band covers every earlier token: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    c = window
    pad = (-n) % c
    blocks = (n + pad) // c
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, blocks, c, d).transpose(1, 2)  # [b, blocks, h, c, d]

    def previous_and_own(x):  # [b, kv, n, d] -> [b, blocks - 1, kv, 2c, d] for blocks 1, 2, ...
        xb = F.pad(x, (0, 0, 0, pad)).view(b, x.shape[1], blocks, c, d)
        return torch.cat([xb[:, :, :-1], xb[:, :, 1:]], dim=3).transpose(1, 2)

    # Query a of block i sits at i*c + a, key j of the pair at (i-1)*c + j: visible iff 0 <= c + a - j < c.
    # One [c, 2c] band serves every block (padded keys at the end lie after every real query).
    a = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(2 * c, device=q.device)[None, :]
    band = (j > a) & (j <= a + c)
    later = F.scaled_dot_product_attention(qb[:, 1:], previous_and_own(k), previous_and_own(v), attn_mask=band,
                                           enable_gqa=gqa)
    first = F.scaled_dot_product_attention(qb[:, :1], k[:, None, :, :c], v[:, None, :, :c], is_causal=True,
                                           enable_gqa=gqa)  # block 0 has no block before it
    out = torch.cat([first, later], dim=1)
    return out.transpose(1, 2).reshape(b, h, blocks * c, d)[:, :, :n]


class SlidingWindowCore:
    """Attention core of a sliding-window layer (window C). With `positions.key_ids` (a window cache,
    keys gathered from other ranks) the band is applied to global positions."""

    def __init__(self, window: int):
        self.window = window

    def __call__(self, q, k, v, positions: Positions) -> torch.Tensor:
        if positions.key_ids is None:
            return sliding_window_attention(q, k, v, self.window)
        behind = positions.ids[:, None, :, None] - positions.key_ids[:, None, None, :]  # [b, 1, s, t]
        visible = (behind >= 0) & (behind < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1])

    def __repr__(self) -> str:
        return f"SlidingWindowCore(window={self.window})"


class SelfAttention(nn.Module):
    """Activations are [batch, seq, hidden] throughout (see README, "Activation layout").

    The local head counts are derived from the projection widths at run time, so the module stays
    correct when a tensor-parallel plan shards q/k/v column-wise. With an inference cache (see
    megalatent/inference/cache.py) the new K/V join the cached ones and the core sees all of them.
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, linear=nn.Linear):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.q_proj = linear(hidden, num_heads * self.head_dim, bias=False)
        self.k_proj = linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = linear(hidden, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = linear(num_heads * self.head_dim, hidden, bias=False)
        # The attention core (q, k, v, positions) -> out: swapped by a family for another kind of attention,
        # and by its parallel plan for the context-parallel form (distributed/context_parallel/).
        self.core_attention = causal_attention

    def forward(self, x: torch.Tensor, positions: Positions, cache=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if positions.rope is not None:
            q, k = apply_rotary(q, *positions.rope), apply_rotary(k, *positions.rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v, positions = cache.update(k, v, positions)
        out = self.core_attention(q, k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
