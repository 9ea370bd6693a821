"""Rotary position embeddings (RoPE) driven by explicit position ids.

Positions are passed in rather than assumed to be 0..S-1 so that a sequence split across devices
(context parallelism) rotates every token by its global position.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Positions:
    """Where the tokens a rank holds sit in their sequences: what attention needs besides q, k, v.

    `ids` [b, s] are global positions (under context parallelism a rank holds non-contiguous
    chunks); `rope` is (cos, sin) for those positions, or None without rotary embeddings.
    `key_ids` [b, t] are the positions of the keys when they are not the queries' (decoding against a
    cache, keys gathered from other ranks); None means the keys are the queries' own tokens.
    """
    ids: torch.Tensor
    rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    key_ids: Optional[torch.Tensor] = None


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not a parameter and not checkpointed: it is a pure function of the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [b, s, head_dim] in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, head_dim]; the half-split (GPT-NeoX/LLaMA-HF) convention."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)
