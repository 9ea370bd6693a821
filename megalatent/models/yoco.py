"""YOCO, "You Only Cache Once" (arXiv 2405.05254): a decoder-decoder.

    x = embed(tokens)
    self-decoder, layers 0 .. L/2-1:   x = x + effattn(norm(x));  x = x + mlp(norm(x))
                                       effattn = gated retention (gret) | sliding-window attention (swa)
    K^ = rope(RMSNorm(x) W_K),  V^ = RMSNorm(x) W_V          once: the only cache the cross-decoder needs
    cross-decoder, layers L/2 .. L-1:  x = x + W_O^l attn(rope(norm(x) W_Q^l), K^, V^, causal)
                                       x = x + mlp(norm(x))
    logits = head(norm(x))

    --model-family yoco --yoco-self-attention gret [--retention-chunk-size 256]
    --model-family yoco --yoco-self-attention swa --sliding-window-size 1024

Every cross-decoder layer has its own query and output projections and reads the one shared K^/V^
(GQA-shaped, --num-query-groups heads), which is not any layer's own K/V. Decoding therefore caches
K^/V^ once plus a constant-size state per self-decoder layer (a window of C - 1 tokens, or the
retention state), and prefill runs the cross-decoder for the prompt's last token only (early exit).

The model is single-device PyTorch. As a pipeline stage it passes K^/V^ on to later stages in the tuple
that flows between them; how it is split over devices is the family's parallel plan (families/yoco.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megalatent.config import ModelConfig, flag
from megalatent.kernels.backend import retention_uses_triton
from megalatent.models.decoder import Decoder, DecoderLayer, LayerSpec, default_attention, default_mlp, default_norm
from megalatent.nn.attention import SlidingWindowCore, causal_attention
from megalatent.nn.cache import InferenceCache, KVCache, RetentionState, WindowKVCache
from megalatent.nn.retention import GatedRetention, RetentionCore
from megalatent.nn.rotary import Positions, apply_rotary


@dataclass
class YOCOConfig(ModelConfig):
    yoco_self_attention: str = flag("gret", "the self-decoder's efficient attention: gated retention or "
                                    "sliding-window attention", choices=["gret", "swa"])
    sliding_window_size: Optional[int] = flag(
        None, "with --yoco-self-attention swa: the window C (a query sees itself and the C-1 tokens before)",
        architectural=False)
    retention_chunk_size: int = flag(256, "gated retention: chunk length of the chunkwise form", architectural=False)


class BackendRetentionCore(RetentionCore):
    """The chunkwise core, run by the Triton kernel where --attention-backend takes it (kernels/backend.py;
    kernels/retention.py's backward recomputes the reference, so `auto` takes it only without gradients)."""

    def __init__(self, chunk_size: int, backend: str):
        super().__init__("chunkwise", chunk_size)
        self.backend = backend

    def with_state(self, q, k, v, log_gate, initial_state=None):
        if retention_uses_triton(q, self.backend):
            from megalatent.kernels.retention import chunk_retention
            dtype = q.dtype
            compute = torch.promote_types(dtype, torch.float32)
            out, state = chunk_retention(*(t.to(compute) for t in (q, k, v, log_gate)),
                                         None if initial_state is None else initial_state.to(compute))
            return out.to(dtype), state
        return super().with_state(q, k, v, log_gate, initial_state)


class SharedKV(nn.Module):
    """K^, V^ = rope(RMSNorm(M) W_K), RMSNorm(M) W_V from the self-decoder's output M: [b, kv_heads, s, d]."""

    def __init__(self, cfg: ModelConfig, linear=nn.Linear):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.norm = default_norm(cfg)
        self.k_proj = linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, bias=False)

    def forward(self, x: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x)
        k, v = self.k_proj(x), self.v_proj(x)  # (full sequence: under sequence parallelism x is a shard)
        k = k.view(k.shape[0], k.shape[1], -1, self.head_dim)
        v = v.view(v.shape[0], v.shape[1], -1, self.head_dim)
        if positions.rope is not None:  # rotated once here; each cross layer rotates only its queries
            k = apply_rotary(k, *positions.rope)
        return k.transpose(1, 2), v.transpose(1, 2)


class CrossAttention(nn.Module):
    """A cross-decoder layer's attention: its own W_Q and W_O, causal attention to the shared K^/V^.
    Keys sit at the queries' positions in training; `positions.key_ids` says where they are when not
    (the decode cache, K^/V^ gathered over the context-parallel ranks)."""

    def __init__(self, hidden: int, num_heads: int, linear=nn.Linear):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.q_proj = linear(hidden, hidden, bias=False)
        self.o_proj = linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        if positions.rope is not None:
            q = apply_rotary(q, *positions.rope)
        out = causal_attention(q.transpose(1, 2), k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward returns a contiguous gradient. K^/V^ received from the previous pipeline
    stage send their gradient back to it, and the pipeline receives gradients into buffers laid out like
    the first one it saw: attention's backward may produce a transposed layout, gloo needs contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class CrossDecoderLayer(DecoderLayer):
    def forward(self, x: torch.Tensor, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), positions, k, v)
        return x + self.mlp(self.mlp_norm(x))


def first_cross_layer(cfg: ModelConfig) -> int:
    return cfg.num_layers // 2


def yoco_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    if layer >= first_cross_layer(cfg):
        return CrossAttention(cfg.hidden_size, cfg.num_attention_heads)
    if cfg.yoco_self_attention == "swa":
        module = default_attention(cfg, layer)
        module.core_attention = SlidingWindowCore(cfg.sliding_window_size)
        return module
    return GatedRetention(cfg.hidden_size, cfg.num_attention_heads, norm_eps=cfg.norm_epsilon,
                          core=BackendRetentionCore(cfg.retention_chunk_size, cfg.attention_backend))


class YOCO(Decoder):
    """tokens [b, s] (+ position_ids) -> logits; as a pipeline stage, see `forward`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, LayerSpec(attention=yoco_attention, mlp=default_mlp, norm=default_norm))
        self.first_cross = first_cross_layer(cfg)
        self.shared_kv = SharedKV(cfg)

    def build_layer(self, cfg: ModelConfig, layer: int, spec: LayerSpec) -> nn.Module:
        cls = CrossDecoderLayer if layer >= first_cross_layer(cfg) else DecoderLayer
        return cls(cfg, layer, spec)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                shared_k: torch.Tensor | None = None, shared_v: torch.Tensor | None = None, cache=None):
        """tokens -> logits [b, s, vocab]. A pipeline stage takes (hidden, position_ids[, K^, V^]) from the
        stage before and, unless last, returns the same tuple, with K^/V^ once they exist.

        With an inference cache: the self-decoder continues from its cached states, K^/V^ of the new
        tokens join the shared cache, and the cross-decoder runs for the last token only (prefill early
        exit); returns that token's logits [b, 1, vocab].
        """
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2]).contiguous()
        x = self.embed_tokens(tokens) if not tokens.is_floating_point() else tokens  # (a later stage: hidden)
        positions = self.positions(position_ids)
        cross = [(name, layer) for name, layer in self.layers.items() if int(name) >= self.first_cross]
        for name, layer in self.layers.items():
            if int(name) < self.first_cross:
                x = layer(x, positions) if cache is None else layer(x, positions, cache=cache.layers[name])
        if cross:
            if shared_k is None:  # this stage holds the first cross-decoder layer
                shared_k, shared_v = self.shared_kv(x, positions)
            else:
                shared_k, shared_v = _ContiguousGrad.apply(shared_k), _ContiguousGrad.apply(shared_v)
            shared_k, shared_v, positions = self._cross_keys(shared_k, shared_v, positions, cache)
            if cache is not None:
                x = x[:, -1:]
            for _, layer in cross:
                x = layer(x, positions, shared_k, shared_v)
        if self.output is not None:
            return self.logits(x if cache is None else x[:, -1:])
        if not cross:
            return x, position_ids
        # Contiguous: the next stage receives into buffers laid out like these outputs.
        return x, position_ids, shared_k.contiguous(), shared_v.contiguous()

    @staticmethod
    def _cross_keys(k, v, positions: Positions, cache):
        """The shared K^/V^ the cross-decoder attends to, and the queries' positions. The keys are always
        a run of the sequence from its start to the queries' last token (causal_attention's lower-right
        case), so no mask is built: not for a 1M-token cache, not for the keys of a sequence split over
        devices (where `shared_kv` returns the keys of every token up to this device's last)."""
        if cache is None:
            return k, v, positions
        # The new tokens join the cache; the last one is the only query (early exit).
        k, v, _ = cache.shared.update(k, v, positions)
        rope = tuple(t[:, -1:] for t in positions.rope) if positions.rope is not None else None
        return k, v, Positions(positions.ids[:, -1:], rope)

    def new_cache(self) -> InferenceCache:
        """Constant-size states for the self-decoder, and one K^/V^ cache for the whole cross-decoder."""
        def self_cache():
            if self.cfg.yoco_self_attention == "swa":
                return WindowKVCache(self.cfg.sliding_window_size)
            return RetentionState()
        layers = {name: self_cache() for name in self.layers if int(name) < self.first_cross}
        return InferenceCache(layers, shared=KVCache())


def flops_per_token(cfg: YOCOConfig) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward; 2 per multiply-add, as
    decoder_flops_per_token): L/2 self-decoder layers, one shared K/V projection, L/2 cross-decoder
    layers (q and o projections, causal attention over s/2 keys on average), the head."""
    h, s, L = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    n_self, n_cross = first_cross_layer(cfg), L - first_cross_layer(cfg)
    kv_dim = cfg.kv_heads * cfg.head_dim
    mlp = 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2)
    if cfg.yoco_self_attention == "swa":
        c = min(cfg.sliding_window_size, s)
        keys = c - c * (c - 1) / (2 * s)  # mean over t of min(t + 1, C)
        self_layer = 2 * h * (2 * h + 2 * kv_dim) + 2 * 2 * h * keys
    else:
        b = min(cfg.retention_chunk_size, s)
        # q, k, v, g, o projections and the gates; intra-chunk scores over b/2 keys; q S and k^T v per head.
        self_layer = 2 * h * (5 * h + cfg.num_attention_heads) + 2 * 2 * h * b / 2 + 2 * 2 * h * cfg.head_dim
    cross_layer = 2 * h * 2 * h + 2 * 2 * h * s / 2
    shared = 2 * h * 2 * kv_dim
    head = 2 * h * cfg.padded_vocab_size
    return 3.0 * (n_self * (self_layer + mlp) + n_cross * (cross_layer + mlp) + shared + head)
