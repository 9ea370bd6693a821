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

Parallelism: the model is a plain module, with three hooks the parallel engine calls —
`tensor_parallel_plan` (column-parallel gate projections and shared K/V, distributed/tensor_parallel.py),
`keep_for_stage` (the shared K/V projection lives on the stage of the first cross-decoder layer, and
later stages receive K^/V^ in the tuple that flows between stages, distributed/pipeline.py), and
`set_context_parallel` (the self-decoder's cores pass the retention state / window to the next rank,
and the cross-decoder all-gathers K^/V^ once per step, not once per layer, distributed/context_parallel.py).
"""
from __future__ import annotations

import torch
from torch import nn

from megalatent.config import Config, ModelConfig
from megalatent.inference.cache import InferenceCache, KVCache, RetentionState, WindowKVCache
from megalatent.models.decoder import Decoder, DecoderLayer, LayerSpec, default_attention, default_mlp, default_norm
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.attention import SlidingWindowCore, causal_attention
from megalatent.nn.retention import GatedRetention
from megalatent.nn.rotary import Positions, apply_rotary


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
    return GatedRetention(cfg.hidden_size, cfg.num_attention_heads, "chunkwise", cfg.retention_chunk_size,
                          cfg.norm_epsilon)


class YOCO(Decoder):
    """tokens [b, s] (+ position_ids) -> logits; as a pipeline stage, see `forward`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, LayerSpec(attention=yoco_attention, mlp=default_mlp, norm=default_norm))
        self.first_cross = first_cross_layer(cfg)
        self.shared_kv = SharedKV(cfg)
        self.cp_group = None  # set under context parallelism: K^/V^ are all-gathered over it
        self.reset_parameters()  # again, now that shared_kv exists (same seed -> same weights on every rank)

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
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        positions = self.positions(position_ids)
        cross = [(name, layer) for name, layer in self.layers.items() if int(name) >= self.first_cross]
        for name, layer in self.layers.items():
            if int(name) < self.first_cross:
                x = layer(x, positions) if cache is None else layer(x, positions, cache=cache.layers[name])
        if cross:
            made_here = shared_k is None  # this stage holds the first cross-decoder layer
            if made_here:
                shared_k, shared_v = self.shared_kv(x, positions)
            else:
                shared_k, shared_v = _ContiguousGrad.apply(shared_k), _ContiguousGrad.apply(shared_v)
            shared_k, shared_v, positions = self._cross_keys(shared_k, shared_v, positions, cache, made_here)
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

    def _cross_keys(self, k, v, positions: Positions, cache, made_here: bool):
        """The shared K^/V^ the cross-decoder attends to, and the queries' positions. The keys are always
        a run of the sequence from its start to the queries' last token (causal_attention's lower-right
        case), so no mask is built: not for a 1M-token cache, not for a 1M-token gathered sequence."""
        if cache is not None:  # the new tokens join the cache; the last one is the only query (early exit)
            k, v, _ = cache.shared.update(k, v, positions)
            rope = tuple(t[:, -1:] for t in positions.rope) if positions.rope is not None else None
            return k, v, Positions(positions.ids[:, -1:], rope)
        if self.cp_group is None:
            return k, v, positions
        if made_here:  # one all-gather per step, not per layer; later pipeline stages receive them gathered
            from megalatent.distributed.context_parallel import all_gather_sequence
            k, v = all_gather_sequence(torch.stack([k, v]), self.cp_group, dim=3)
        # The split is contiguous: this rank's queries are the last of the keys up to its last token.
        end = (self.cp_rank + 1) * positions.ids.shape[1]
        return k[:, :, :end], v[:, :, :end], positions

    def new_cache(self) -> InferenceCache:
        """Constant-size states for the self-decoder, and one K^/V^ cache for the whole cross-decoder."""
        def self_cache():
            if self.cfg.yoco_self_attention == "swa":
                return WindowKVCache(self.cfg.sliding_window_size)
            return RetentionState()
        layers = {name: self_cache() for name in self.layers if int(name) < self.first_cross}
        return InferenceCache(layers, shared=KVCache())

    # ------------------------------------------------------------ hooks of the parallel engine
    def keep_for_stage(self, layer_names: set[str]) -> None:
        """Pipeline: the shared K/V projection belongs to the stage of the first cross-decoder layer."""
        if str(self.first_cross) not in layer_names:
            self.shared_kv = None

    def set_context_parallel(self, cp_group) -> None:
        import torch.distributed as dist
        self.cp_group, self.cp_rank = cp_group, dist.get_rank(cp_group)

    def tensor_parallel_plan(self, stream, sequence_parallel: bool) -> dict:
        """Entries beyond the decoder's plan: retention's gates, the shared K/V, the cross-attention input."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, SequenceParallel
        plan = {}
        for name, layer in self.layers.items():
            p = f"layers.{name}.attention"
            if isinstance(layer.attention, GatedRetention):
                plan[p + ".g_proj"] = ColwiseParallel()
                plan[p + ".gate_proj"] = ColwiseParallel()  # one gate per head: split with the heads
            if isinstance(layer.attention, CrossAttention) and sequence_parallel:
                plan[p] = PrepareModuleInput(input_layouts=(stream, None, None, None),
                                             desired_input_layouts=(Replicate(), None, None, None),
                                             use_local_output=True)
        if self.shared_kv is not None:
            # Under sequence parallelism the norm's output is sequence-sharded; the projections gather it.
            plan.update({"shared_kv.k_proj": ColwiseParallel(), "shared_kv.v_proj": ColwiseParallel()})
            if sequence_parallel:
                plan["shared_kv.norm"] = SequenceParallel()
        return plan


def flops_per_token(cfg: ModelConfig) -> float:
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


def validate(cfg: Config) -> list[str]:
    m = cfg.model
    e = []
    if m.num_layers < 2 or m.num_layers % 2:
        e.append(f"--model-family yoco splits --num-layers into a self-decoder and a cross-decoder of equal depth: "
                 f"it must be even and >= 2, got {m.num_layers}")
    if m.segment_lengths or m.dilated_ratios:
        e.append("--segment-lengths/--dilated-ratios configure LongNet; YOCO's self-decoder is set by "
                 "--yoco-self-attention")
    if m.yoco_self_attention == "swa":
        if m.sliding_window_size is None or m.sliding_window_size < 1:
            e.append("--yoco-self-attention swa needs --sliding-window-size >= 1 (the paper uses 1024)")
    elif m.sliding_window_size is not None:
        e.append("--sliding-window-size applies to --yoco-self-attention swa; drop it or choose swa")
    if m.retention_chunk_size < 1:
        e.append(f"--retention-chunk-size must be >= 1, got {m.retention_chunk_size}")
    return e


register(ModelFamily(name="yoco", build=YOCO, flops_per_token=flops_per_token, validate=validate,
                     context_parallel_split="contiguous"))
