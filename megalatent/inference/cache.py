"""Inference caches: what a layer keeps between decoding steps.

    KVCache          every past key and value (the baseline's and LongNet's attention, YOCO's shared K^/V^)
    WindowKVCache    the last window - 1 keys and values (YOCO's sliding-window self-decoder): O(C)
    RetentionState   the [heads, d_k, d_v] recurrent state (YOCO's gated retention): O(1)

A model's `new_cache()` returns an `InferenceCache` holding one of these per layer (and, for YOCO, the
one K^/V^ cache every cross-decoder layer reads). Caches hold tensors on the model's device, in the
dtype the layers produce, and report their size so the memory of a family can be measured
(tools/bench_inference.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from megalatent.nn.rotary import Positions


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache:
    """Keys and values [b, kv_heads, t, d] of every token so far, with their positions [b, t]."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.ids: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: Positions):
        """Append the new tokens' K/V; returns every key and value so far and the queries' positions,
        with the keys' positions attached when they differ from the queries' (there was a past)."""
        had_past = self.k is not None
        self.k = k if not had_past else torch.cat([self.k, k], dim=2)
        self.v = v if not had_past else torch.cat([self.v, v], dim=2)
        self.ids = positions.ids if not had_past else torch.cat([self.ids, positions.ids], dim=1)
        if not had_past:
            return k, v, positions
        return self.k, self.v, Positions(positions.ids, positions.rope, self.ids)

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class WindowKVCache(KVCache):
    """As KVCache, but only the last `window - 1` tokens are kept: a sliding-window layer's next query
    (position t) sees keys t - window + 1 .. t, its own included, so nothing older is ever read again."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def update(self, k, v, positions):
        out = super().update(k, v, positions)
        keep = self.window - 1
        if keep == 0:
            self.k = self.v = self.ids = None
        else:  # copies: a view would keep a whole prompt's K/V alive
            self.k, self.v, self.ids = (t[..., -keep:, :].clone() for t in (self.k, self.v, self.ids[..., None]))
            self.ids = self.ids[..., 0]
        return out


class RetentionState:
    """The recurrent state S [b, heads, d_k, d_v] of a gated-retention layer (None before the first token)."""

    def __init__(self):
        self.state: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        return _nbytes(self.state)


class InferenceCache:
    """The caches of one model: `layers[name]` per layer, `shared` for a cache several layers read
    (YOCO's K^/V^), and `length`, the number of tokens already processed (the next token's position)."""

    def __init__(self, layers: dict, shared: Optional[KVCache] = None):
        self.layers, self.shared, self.length = layers, shared, 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values() if c is not None) + \
            (self.shared.nbytes() if self.shared is not None else 0)
