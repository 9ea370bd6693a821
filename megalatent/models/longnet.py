"""LongNet (arXiv 2307.02486): the baseline decoder with dilated attention in every layer.

    --model-family longnet --segment-lengths 2048 4096 8192 16384 32768 --dilated-ratios 1 2 4 6 12

Each layer's attention is the baseline's (projections, RoPE with global positions, GQA) with its core
replaced by the mixture of dilated patterns (megalatent/nn/dilated.py, or its Triton kernels). Training
FLOPs count, per query and head, the keys of each pattern: about w_i / r_i^2 averaged over heads (a head
sees 1/r_i of the queries, each with w_i / r_i keys), halved for the causal mask (paper Eq. 16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalatent.config import ModelConfig, flag
from megalatent.kernels.backend import dilated_attention
from megalatent.models.decoder import BASELINE_SPEC, Decoder, LayerSpec, decoder_flops_per_token, default_attention
from megalatent.nn.dilated import dilated_attention_at_positions


@dataclass
class DilatedPatterns:
    """The flags of a model built on dilated attention (LongNet, LongViT). The patterns do not change the
    parameters, so a checkpoint may be resumed with others."""
    segment_lengths: Optional[list[int]] = flag(
        None, "segment length w_i of each dilated-attention pattern, increasing", nargs="+", architectural=False)
    dilated_ratios: Optional[list[int]] = flag(
        None, "dilation r_i of each pattern (same count as --segment-lengths), non-decreasing", nargs="+",
        architectural=False)


@dataclass
class LongNetConfig(ModelConfig, DilatedPatterns):
    pass


@dataclass(frozen=True)
class DilatedCore:
    """The attention core of a dilated layer: the mixture of patterns, causal for the language model,
    non-causal for an encoder. `first_head` is the global index of the first head this module holds (a
    tensor-parallel rank holds a slice: dilation offsets follow global heads); `backend` chooses the Triton
    kernels or the reference (kernels/backend.py)."""
    segment_lengths: tuple[int, ...]
    dilated_ratios: tuple[int, ...]
    causal: bool = True
    first_head: int = 0
    backend: str = "auto"

    def __call__(self, q, k, v, positions):
        if positions.key_ids is not None:  # decoding against a KV cache (positions are the same in every row)
            return dilated_attention_at_positions(q, k, v, positions.ids[0], positions.key_ids[0],
                                                  self.segment_lengths, self.dilated_ratios, self.first_head)
        return dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios, self.causal, self.first_head,
                                 self.backend)


def dilated_core(cfg: ModelConfig, causal: bool = True) -> DilatedCore:
    return DilatedCore(tuple(cfg.segment_lengths), tuple(cfg.dilated_ratios), causal, backend=cfg.attention_backend)


def build(cfg: LongNetConfig) -> Decoder:
    core = dilated_core(cfg)  # stateless: one for every layer

    def attention(cfg: ModelConfig, layer: int):
        module = default_attention(cfg, layer)
        module.core_attention = core
        return module

    return Decoder(cfg, LayerSpec(attention=attention, mlp=BASELINE_SPEC.mlp, norm=BASELINE_SPEC.norm))


def flops_per_token(cfg: LongNetConfig) -> float:
    s = cfg.seq_length
    keys = sum(min(w, s) / r ** 2 for w, r in zip(cfg.segment_lengths, cfg.dilated_ratios)) / 2
    return decoder_flops_per_token(cfg, keys)
