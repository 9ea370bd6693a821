"""LongNet (arXiv 2307.02486): the baseline decoder with dilated attention in every layer.

    --model-family longnet --segment-lengths 2048 4096 8192 16384 32768 --dilated-ratios 1 2 4 6 12

Each layer's attention is the baseline's (projections, RoPE with global positions, GQA) with its core
replaced by the mixture of dilated patterns (megalatent/nn/dilated.py). Training FLOPs count, per query
and head, the keys of each pattern: about w_i / r_i^2 averaged over heads (a head sees 1/r_i of the
queries, each with w_i / r_i keys), halved for the causal mask (paper Eq. 16).
"""
from __future__ import annotations

from megalatent.config import Config, ModelConfig
from megalatent.models.decoder import BASELINE_SPEC, Decoder, LayerSpec, decoder_flops_per_token, default_attention
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.dilated import DistributedDilatedAttention, dilated_attention, dilated_attention_at_positions


class DilatedCore:
    """The attention core of a LongNet layer: dilated attention over the configured patterns, causal for
    the language model, non-causal for an encoder (LongViT). `first_head` is the global index of the first
    head this rank holds (non-zero under TP)."""

    def __init__(self, segment_lengths: list[int], dilated_ratios: list[int], first_head: int = 0,
                 causal: bool = True):
        self.segment_lengths, self.dilated_ratios = list(segment_lengths), list(dilated_ratios)
        self.first_head, self.causal = first_head, causal

    def __call__(self, q, k, v, positions):
        if positions.key_ids is not None:  # decoding against a KV cache (positions are the same in every row)
            return dilated_attention_at_positions(q, k, v, positions.ids[0], positions.key_ids[0],
                                                  self.segment_lengths, self.dilated_ratios, self.first_head)
        return dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios, self.causal, self.first_head)

    def tensor_parallel(self, first_head: int) -> "DilatedCore":
        """The core for a rank holding the heads from `first_head` on: dilation offsets follow global heads."""
        return DilatedCore(self.segment_lengths, self.dilated_ratios, first_head, self.causal)

    def distributed(self, cp_group, local_length: int) -> DistributedDilatedAttention:
        """The same attention for a sequence split contiguously over `cp_group` (LongNet §3.1)."""
        return DistributedDilatedAttention(self.segment_lengths, self.dilated_ratios, cp_group, local_length,
                                           causal=self.causal, first_head=self.first_head)

    def __repr__(self) -> str:
        kind = "" if self.causal else ", non-causal"
        return f"DilatedCore(w={self.segment_lengths}, r={self.dilated_ratios}{kind})"


def build(cfg: ModelConfig) -> Decoder:
    core = DilatedCore(cfg.segment_lengths, cfg.dilated_ratios)  # stateless: one for every layer

    def attention(cfg: ModelConfig, layer: int):
        module = default_attention(cfg, layer)
        module.core_attention = core
        return module

    return Decoder(cfg, LayerSpec(attention=attention, mlp=BASELINE_SPEC.mlp, norm=BASELINE_SPEC.norm))


def flops_per_token(cfg: ModelConfig) -> float:
    s = cfg.seq_length
    keys = sum(min(w, s) / r ** 2 for w, r in zip(cfg.segment_lengths, cfg.dilated_ratios)) / 2
    return decoder_flops_per_token(cfg, keys)


def validate(cfg: Config) -> list[str]:
    """The dilated patterns' rules, for any family built on dilated attention (LongNet, LongViT)."""
    m, p = cfg.model, cfg.parallel
    w, r = m.segment_lengths, m.dilated_ratios
    if not w or not r:
        return [f"--model-family {m.model_family} needs --segment-lengths and --dilated-ratios "
                "(e.g. --segment-lengths 2048 4096 8192 --dilated-ratios 1 2 4)"]
    e = []
    if len(w) != len(r):
        e.append(f"--segment-lengths has {len(w)} values and --dilated-ratios {len(r)}; give one ratio per length")
    if any(x < 1 for x in w + r):
        e.append("--segment-lengths and --dilated-ratios must be >= 1")
    if any(b <= a for a, b in zip(w, w[1:])) or any(b < a for a, b in zip(r, r[1:])):
        e.append(f"LongNet's patterns are geometric: --segment-lengths {w} must increase and --dilated-ratios "
                 f"{r} must not decrease")
    cp = p.context_parallel_size
    if cp > 1 and m.seq_length % cp == 0 and not e:
        local = m.seq_length // cp
        for x in w:
            x = min(x, m.seq_length)
            if (x <= local and local % x) or (x > local and x % local):
                e.append(f"--context-parallel-size {cp}: each rank holds {local} tokens; a segment length must "
                         f"divide that or be a multiple of it (segments must not straddle ranks), got {x}")
    return e


register(ModelFamily(name="longnet", build=build, flops_per_token=flops_per_token, validate=validate,
                     context_parallel_split="contiguous"))
