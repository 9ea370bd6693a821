"""The LLaMA-style baseline decoder, and the trunk every decoder-only family reuses.

    x = embed(tokens)
    for each layer:  x = x + attn(norm(x), positions);  x = x + mlp(norm(x))
    logits = head(norm(x))

A family changes what a layer is made of through a `LayerSpec` (LongNet swaps the attention,
MH-MoE the MLP, BitNet the linear layers) instead of copying this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.config import ModelConfig
from megalatent.inference.cache import InferenceCache, KVCache
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.attention import SelfAttention
from megalatent.nn.mlp import GeluMLP, SwiGLU
from megalatent.nn.norms import build_norm
from megalatent.nn.rotary import Positions, RotaryEmbedding


@dataclass(frozen=True)
class LayerSpec:
    """Factories for the parts of one layer; each gets the config and the layer's index."""
    attention: Callable[[ModelConfig, int], nn.Module]
    mlp: Callable[[ModelConfig, int], nn.Module]
    norm: Callable[[ModelConfig], nn.Module]


def default_attention(cfg: ModelConfig, layer: int, linear=nn.Linear) -> nn.Module:
    return SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, linear=linear)


def default_mlp(cfg: ModelConfig, layer: int, linear=nn.Linear) -> nn.Module:
    mlp = SwiGLU if cfg.swiglu else GeluMLP
    return mlp(cfg.hidden_size, cfg.mlp_width, linear=linear)


def default_norm(cfg: ModelConfig) -> nn.Module:
    return build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)


BASELINE_SPEC = LayerSpec(attention=default_attention, mlp=default_mlp, norm=default_norm)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, spec: LayerSpec):
        super().__init__()
        self.attention_norm = spec.norm(cfg)
        self.attention = spec.attention(cfg, layer)
        self.mlp_norm = spec.norm(cfg)
        self.mlp = spec.mlp(cfg, layer)

    def forward(self, x: torch.Tensor, positions: Positions, cache=None) -> torch.Tensor:
        h = self.attention_norm(x)
        # (an attention without inference support need not take a cache argument)
        x = x + (self.attention(h, positions) if cache is None else self.attention(h, positions, cache=cache))
        return x + self.mlp(self.mlp_norm(x))


class OutputLayer(nn.Module):
    """logits = x @ W^T, with W its own (untied) or the input embedding's, passed in (tied).

    The tied weight is an argument rather than a second reference to the embedding's parameter, so
    the parameter has one name and a tensor-parallel plan that shards it is seen by both uses.
    """

    def __init__(self, hidden: int, vocab: int, tied: bool):
        super().__init__()
        self.weight = None if tied else nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight if self.weight is not None else tied_weight)


class Decoder(nn.Module):
    """tokens [b, s] (+ position_ids [b, s]) -> logits [b, s, padded_vocab]."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec = BASELINE_SPEC):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.rotary = (RotaryEmbedding(cfg.head_dim, cfg.rotary_base)
                       if cfg.position_embedding_type == "rope" else None)
        # A ModuleDict keyed by the global layer index keeps parameter names stable when a pipeline
        # stage holds only some layers, so checkpoints do not depend on the layout.
        self.layers = nn.ModuleDict({str(i): self.build_layer(cfg, i, spec) for i in range(cfg.num_layers)})
        self.norm = spec.norm(cfg)
        self.output = OutputLayer(cfg.hidden_size, cfg.padded_vocab_size,
                                  tied=not cfg.untie_embeddings_and_output_weights)
        self.reset_parameters()

    def build_layer(self, cfg: ModelConfig, layer: int, spec: LayerSpec) -> nn.Module:
        """Layer `layer` (a family whose layers differ in kind, like YOCO's two halves, overrides this)."""
        return DecoderLayer(cfg, layer, spec)

    def reset_parameters(self) -> None:
        """Normal(0, std) for every matrix; output projections scaled by 1/sqrt(2L) (GPT-2/Megatron)."""
        std = self.cfg.init_method_std
        out_std = std / (2 * self.cfg.num_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights keep their ones
            is_output_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_output_proj else std)

    def positions(self, position_ids: torch.Tensor) -> Positions:
        return Positions(position_ids, self.rotary(position_ids) if self.rotary is not None else None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x), None if self.output.weight is not None else self.embed_tokens.weight)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None):
        """tokens -> logits. As a pipeline stage (see distributed/pipeline.py) a later stage takes the
        hidden states instead of tokens, and every stage but the last returns (hidden, position_ids).

        With an inference cache (from `new_cache`, see megalatent/inference) the tokens continue the
        cached sequence and only the last token's logits [b, 1, vocab] are returned.
        """
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2]).contiguous()
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        positions = self.positions(position_ids)
        for name, layer in self.layers.items():
            x = layer(x, positions) if cache is None else layer(x, positions, cache=cache.layers[name])
        if self.output is None:
            return x, position_ids
        return self.logits(x if cache is None else x[:, -1:])

    def new_cache(self) -> InferenceCache:
        """An empty inference cache: every layer keeps all its past keys and values."""
        return InferenceCache({name: KVCache() for name in self.layers})


def decoder_flops_per_token(cfg: ModelConfig, keys_per_query: float) -> float:
    """Training FLOPs per token of a decoder (forward + backward = 3 x forward) whose attention lets a
    query see `keys_per_query` keys on average.

    Forward counts 2 FLOPs per multiply-add of every matmul: per layer the q/k/v/o projections
    (2*h*(2h + 2*kv_dim)), the MLP (2*h*ffn*(3 if SwiGLU else 2)) and the attention itself (QK^T and
    AV: 2 * 2*h per attended key), plus the output head (2*h*V). Embedding lookups, norms, softmax
    and RoPE are not counted.
    """
    h, L = cfg.hidden_size, cfg.num_layers
    kv_dim = cfg.kv_heads * cfg.head_dim
    proj = 2 * h * (2 * h + 2 * kv_dim)
    mlp = 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2)
    attention = 2 * 2 * h * keys_per_query
    head = 2 * h * cfg.padded_vocab_size
    return 3.0 * (L * (proj + mlp + attention) + head)


def dense_decoder_flops_per_token(cfg: ModelConfig) -> float:
    """Causal dense attention: s/2 keys per query on average (Megatron-LM's halving for the mask)."""
    return decoder_flops_per_token(cfg, cfg.seq_length / 2)


def validate_dense(cfg) -> list[str]:
    if cfg.model.segment_lengths or cfg.model.dilated_ratios:
        return ["--segment-lengths/--dilated-ratios configure dilated attention: add --model-family longnet"]
    if cfg.model.sliding_window_size is not None:
        return ["--sliding-window-size configures YOCO's sliding-window self-decoder: add --model-family yoco "
                "--yoco-self-attention swa"]
    return []


register(ModelFamily(name="gpt", build=lambda cfg: Decoder(cfg), flops_per_token=dense_decoder_flops_per_token,
                     validate=validate_dense))
