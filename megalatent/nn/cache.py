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
    """Keys and values [b, kv_heads, t, d] of every token so far, with their positions [b, t].

    They live in buffers that grow by doubling, so a decoding step writes its token in place: the copies
    are amortised O(1) per token instead of the whole past re-concatenated at every step (which doubled the
    memory traffic of decoding). `k`, `v` and `ids` are views of the filled part."""

    def __init__(self):
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self._ids: Optional[torch.Tensor] = None
        self.length = 0

    @property
    def k(self) -> Optional[torch.Tensor]:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def v(self) -> Optional[torch.Tensor]:
        return None if self._v is None else self._v[:, :, :self.length]

    @property
    def ids(self) -> Optional[torch.Tensor]:
        return None if self._ids is None else self._ids[:, :self.length]

    def _reserve(self, needed: int, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity)

        def grown(old: Optional[torch.Tensor], like: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(like.shape)
            shape[dim] = capacity
            new = like.new_empty(shape)
            if old is not None:
                new.narrow(dim, 0, self.length).copy_(old.narrow(dim, 0, self.length))
            return new

        self._k, self._v, self._ids = grown(self._k, k, 2), grown(self._v, v, 2), grown(self._ids, ids, 1)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: Positions):
        """Append the new tokens' K/V; returns every key and value so far and the queries' positions,
        with the keys' positions attached when they differ from the queries' (there was a past)."""
        had_past, n = self.length > 0, k.shape[2]
        self._reserve(self.length + n, k, v, positions.ids)
        self._k[:, :, self.length:self.length + n] = k
        self._v[:, :, self.length:self.length + n] = v
        self._ids[:, self.length:self.length + n] = positions.ids
        self.length += n
        if not had_past:
            return k, v, positions
        return self.k, self.v, Positions(positions.ids, positions.rope, self.ids)

    def nbytes(self) -> int:
        """The bytes of the cached keys and values (the buffers hold up to twice that while they grow)."""
        return _nbytes(self.k, self.v)


class WindowKVCache:
    """The last `window - 1` tokens' keys and values: a sliding-window layer's next query (position t) sees
    keys t - window + 1 .. t, its own included, so nothing older is ever read again. Small, so kept as plain
    tensors, re-cut at every step."""

    def __init__(self, window: int):
        self.window = window
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.ids: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: Positions):
        """As KVCache.update: every key and value the new queries may see, and their positions."""
        if self.k is None:
            out, ids = (k, v, positions), positions.ids
        else:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            ids = torch.cat([self.ids, positions.ids], dim=1)
            out = (k, v, Positions(positions.ids, positions.rope, ids))
        keep = self.window - 1
        if keep == 0:
            self.k = self.v = self.ids = None
        else:  # copies: a view would keep a whole prompt's K/V alive
            self.k, self.v, self.ids = k[:, :, -keep:].clone(), v[:, :, -keep:].clone(), ids[:, -keep:].clone()
        return out

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


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
