"""The LLaMA-style baseline decoder, and the trunk every decoder-only family reuses.

    x = embed(tokens)
    for each layer:  x = x + attn(norm(x), positions);  x = x + mlp(norm(x))
    logits = head(norm(x))

A family changes what a layer is made of through a `LayerSpec` (e.g. another attention core, or a
layer of another kind) instead of copying this file. `--num-experts` makes the MLP of the layers
`--moe-layer-freq` picks a mixture of experts (the default MLP factory does it, so every family built on
these factories has it). `--linear-impl bitlinear` swaps the linear layers of the attention and MLP
blocks for the b1.58 BitLinear; as each BitLinear normalises its own input, the layer's two pre-norms
are then dropped (the final norm before the full-precision head stays).

The model is single-device PyTorch; how it is split over devices is its family's parallel plan
(megalatent/families/, distributed/plan.py). It is also the pipeline-stage module: a later stage's input is
hidden states (floats) instead of token ids, and a stage without the head returns what the next stage needs.
How its tensors start is `initial_value` (drawn by megalatent/nn/init.py: the constructor allocates, it
does not initialise — build it with megalatent.families.build_model, or on the meta device).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.config import ModelConfig
from megalatent.nn.attention import SelfAttention
from megalatent.nn.cache import InferenceCache, KVCache
from megalatent.nn.init import ONES, ZEROS, Init
from megalatent.nn.bitlinear import BitLinear
from megalatent.nn.mlp import GeluMLP, SwiGLU
from megalatent.nn.moe import MoELayer
from megalatent.nn.norms import build_norm
from megalatent.nn.rotary import Positions, RotaryEmbedding


@dataclass(frozen=True)
class LayerSpec:
    """Factories for the parts of one layer; each gets the config and the layer's index."""
    attention: Callable[[ModelConfig, int], nn.Module]
    mlp: Callable[[ModelConfig, int], nn.Module]
    norm: Callable[[ModelConfig], nn.Module]


def uses_bitlinear(cfg: ModelConfig) -> bool:
    return cfg.linear_impl == "bitlinear"


def block_linear(cfg: ModelConfig) -> Callable[..., nn.Module]:
    """The linear layer of the attention and MLP blocks, chosen by --linear-impl."""
    return partial(BitLinear, eps=cfg.norm_epsilon) if uses_bitlinear(cfg) else nn.Linear


def default_attention(cfg: ModelConfig, layer: int, linear=None) -> nn.Module:
    return SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, linear=linear or block_linear(cfg))


def default_mlp(cfg: ModelConfig, layer: int, linear=None) -> nn.Module:
    """The dense MLP, or with --num-experts on the layers --moe-layer-freq picks, the (MH-)MoE layer."""
    if cfg.is_moe_layer(layer):
        return MoELayer(cfg.hidden_size, cfg.expert_width, cfg.num_experts, cfg.moe_router_topk,
                        heads=cfg.moe_num_heads, router=cfg.moe_router_type, pre_softmax=cfg.moe_router_pre_softmax,
                        expert_bias=cfg.moe_router_enable_expert_bias,
                        capacity_factor=cfg.moe_expert_capacity_factor, drop_policy=cfg.moe_token_drop_policy,
                        aux_loss_coeff=cfg.moe_aux_loss_coeff, z_loss_coeff=cfg.moe_z_loss_coeff or 0.0,
                        linear=linear or block_linear(cfg), ternary_experts=uses_bitlinear(cfg))
    mlp = SwiGLU if cfg.swiglu else GeluMLP
    return mlp(cfg.hidden_size, cfg.mlp_width, linear=linear or block_linear(cfg))


def default_norm(cfg: ModelConfig) -> nn.Module:
    return build_norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)


BASELINE_SPEC = LayerSpec(attention=default_attention, mlp=default_mlp, norm=default_norm)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, spec: LayerSpec):
        super().__init__()
        # BitLinear normalises its own input: a pre-norm in front of it would normalise twice.
        pre_norm = (lambda cfg: nn.Identity()) if uses_bitlinear(cfg) else spec.norm
        self.attention_norm = pre_norm(cfg)
        self.attention = spec.attention(cfg, layer)
        self.mlp_norm = pre_norm(cfg)
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


# Projections into the residual stream: their std is scaled by 1/sqrt(2L) (GPT-2/Megatron).
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.down_proj", "merge_proj.weight")


def initial_value(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> Init:
    """How a tensor of the trunk (and of any model keeping its conventions) starts: Normal(0, std) for every
    matrix, std / sqrt(2L) for the projections into the residual stream; biases and the experts' selection
    bias zero; every other vector (norm gains) ones. Drawn by megalatent/nn/init.py, keyed by name."""
    if name.endswith((".bias", "expert_bias")):
        return ZEROS
    if len(shape) < 2:
        return ONES
    std = cfg.init_method_std
    return Init("normal", std / (2 * cfg.num_layers) ** 0.5 if name.endswith(OUTPUT_PROJECTIONS) else std)


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

    def build_layer(self, cfg: ModelConfig, layer: int, spec: LayerSpec) -> nn.Module:
        """Layer `layer` (a family whose layers differ in kind, like YOCO's two halves, overrides this)."""
        return DecoderLayer(cfg, layer, spec)

    def initial_value(self, name: str, shape: tuple[int, ...]) -> Init:
        """How the tensor `name` starts (the models' initialisation protocol; see megalatent/nn/init.py)."""
        return initial_value(self.cfg, name, shape)

    def positions(self, position_ids: torch.Tensor) -> Positions:
        return Positions(position_ids, self.rotary(position_ids) if self.rotary is not None else None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The output projection of final-normed hidden states (the embedding's weight when tied)."""
        return self.output(normed, None if self.output.weight is not None else self.embed_tokens.weight)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None):
        """tokens -> logits. As a pipeline stage (see distributed/pipeline.py) a later stage takes the hidden
        states instead of tokens, and a stage without the head returns (hidden, position_ids).

        With an inference cache (from `new_cache`, see megalatent/inference) the tokens continue the
        cached sequence and only the last token's logits [b, 1, vocab] are returned.
        """
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2]).contiguous()
        x = self.embed_tokens(tokens) if not tokens.is_floating_point() else tokens  # (a later stage: hidden)
        x = self.trunk(x, position_ids, cache)
        if self.output is None:
            return x, position_ids
        return self.logits(x if cache is None else x[:, -1:])

    def trunk(self, x: torch.Tensor, position_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """The layers this module holds, on embeddings (or a previous stage's hidden states)."""
        positions = self.positions(position_ids)
        for name, layer in self.layers.items():
            x = layer(x, positions) if cache is None else layer(x, positions, cache=cache.layers[name])
        return x

    def new_cache(self) -> InferenceCache:
        """An empty inference cache: every layer keeps all its past keys and values."""
        return InferenceCache({name: KVCache() for name in self.layers})


def decoder_flops_per_token(cfg: ModelConfig, keys_per_query: float) -> float:
    """Training FLOPs per token of a decoder (forward + backward = 3 x forward) whose attention lets a
    query see `keys_per_query` keys on average.

    Forward counts 2 FLOPs per multiply-add of every matmul: per layer the q/k/v/o projections
    (2*h*(2h + 2*kv_dim)), the MLP (2*h*ffn*(3 if SwiGLU else 2)) and the attention itself (QK^T and
    AV: 2 * 2*h per attended key), plus the output head (2*h*V). Embedding lookups, norms, softmax
    and RoPE are not counted. An MoE layer counts its active parameters: the router (2*h*E), the k
    experts each of its h_moe sub-tokens visits (k * 2*h*ffn_e*3 over all sub-tokens) and MH-MoE's
    head and merge projections (2 * 2*h*h).
    """
    h, L = cfg.hidden_size, cfg.num_layers
    kv_dim = cfg.kv_heads * cfg.head_dim
    proj = 2 * h * (2 * h + 2 * kv_dim)
    dense_mlp = 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2)
    moe_mlp = 0.0
    if cfg.num_experts is not None:
        moe_mlp = (2 * h * cfg.num_experts + cfg.moe_router_topk * 2 * h * cfg.expert_width * 3
                   + (2 * 2 * h * h if cfg.moe_num_heads > 1 else 0))
    mlp = sum(moe_mlp if cfg.is_moe_layer(i) else dense_mlp for i in range(L))
    attention = 2 * 2 * h * keys_per_query
    head = 2 * h * cfg.padded_vocab_size
    return 3.0 * (L * (proj + attention) + mlp + head)


def dense_decoder_flops_per_token(cfg: ModelConfig) -> float:
    """Causal dense attention: s/2 keys per query on average (Megatron-LM's halving for the mask)."""
    return decoder_flops_per_token(cfg, cfg.seq_length / 2)
