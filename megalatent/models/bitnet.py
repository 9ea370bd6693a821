"""BitNet b1.58 (arXiv 2402.17764): the LLaMA-style baseline decoder with every linear layer of the
attention and MLP blocks a BitLinear (megalatent/nn/bitlinear.py).

    --model-family bitnet        (the same model as --model-family gpt --linear-impl bitlinear)

Where the norms sit (paper, FAQ): each BitLinear normalises its own input with an RMSNorm before
quantising it, so the blocks' pre-attention and pre-MLP norms are removed; the embedding, the final
norm and the output head stay full precision. Training is fake-quantised at full cost (the paper
reports no training speed-up), so the FLOPs are the baseline's. The recipe's two-stage lr and weight
decay: --lr-decay-style two-stage (training/schedules.py); packed 2-bit export: tools/export_bitnet.py.
"""
from __future__ import annotations

import dataclasses

from megalatent.config import Config, ModelConfig
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token, validate_dense
from megalatent.models.registry import ModelFamily, register


def build(cfg: ModelConfig) -> Decoder:
    return Decoder(dataclasses.replace(cfg, linear_impl="bitlinear"))


def packable_width_errors(m: ModelConfig) -> list[str]:
    """The packed export stores 4 ternary codes per byte along each BitLinear's input: checked before
    training, not after it."""
    widths = [("hidden-size", m.hidden_size), ("ffn-hidden-size", m.mlp_width)]
    if m.num_experts is not None:  # ternary experts: their (sub-token) input and their own width
        widths += [("hidden-size / --moe-num-heads", m.hidden_size // max(1, m.moe_num_heads)),
                   ("moe-ffn-hidden-size", m.expert_width)]
    return [f"--{flag} {width} must be divisible by 4 for the packed BitNet export (4 ternary weights per byte)"
            for flag, width in widths if width % 4]


def validate(cfg: Config) -> list[str]:
    e = validate_dense(cfg) + packable_width_errors(cfg.model)
    if cfg.model.linear_impl == "linear":
        e.append("--model-family bitnet is the decoder with BitLinear layers; --linear-impl linear contradicts it "
                 "(use --model-family gpt for the full-precision baseline)")
    return e


register(ModelFamily(name="bitnet", build=build, flops_per_token=dense_decoder_flops_per_token, validate=validate))
