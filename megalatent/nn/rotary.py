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
    """No state: the frequencies are a pure function of the config, computed where the positions are (so a
    model built on the meta device needs nothing recomputed, and no checkpoint holds them)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [b, s, head_dim] in fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device) / self.head_dim
        freqs = position_ids.float()[..., None] * (1.0 / self.base ** exponents)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, head_dim]; the half-split (GPT-NeoX/LLaMA-HF) convention."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)
