"""BitNet b1.58 (arXiv 2402.17764): the baseline decoder with every linear layer of the attention and MLP
blocks a BitLinear (megalatent/nn/bitlinear.py) — the same model as `--model-family gpt --linear-impl
bitlinear`.

Where the norms sit (paper, FAQ): each BitLinear normalises its own input with an RMSNorm before
quantising it, so the blocks' pre-attention and pre-MLP norms are removed; the embedding, the final norm
and the output head stay full precision. Training is fake-quantised at full cost (the paper reports no
training speed-up), so the FLOPs are the baseline's. The recipe's two-stage lr and weight decay:
--lr-decay-style two-stage (training/schedules.py); packed 2-bit export: tools/export_bitnet.py
(megalatent/interop/packed.py).
"""
from __future__ import annotations

import dataclasses

from megalatent.config import Config, ModelConfig, packable_width_errors
from megalatent.families.family import Family
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token


def build(cfg: ModelConfig) -> Decoder:
    return Decoder(dataclasses.replace(cfg, linear_impl="bitlinear"))


def validate(cfg: Config) -> list[str]:
    m = cfg.model
    if m.linear_impl == "linear":
        return ["--model-family bitnet is the decoder with BitLinear layers; --linear-impl linear contradicts it "
                "(use --model-family gpt for the full-precision baseline)"]
    return [] if m.linear_impl == "bitlinear" else packable_width_errors(m)  # (the shared rules check bitlinear)


FAMILY = Family(name="bitnet", config=ModelConfig,  # no flags of its own: --linear-impl defaults to bitlinear
                build=build, flops_per_token=dense_decoder_flops_per_token,
                validate=validate)
