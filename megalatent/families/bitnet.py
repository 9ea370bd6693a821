"""BitNet b1.58 (arXiv 2402.17764): the baseline decoder with every linear layer of the attention and MLP
blocks a BitLinear (megalatent/nn/bitlinear.py) — the same model as `--model-family gpt --linear-impl
bitlinear`.

Where the norms sit (paper, FAQ): each BitLinear normalises its own input with an RMSNorm before
quantising it, so the blocks' pre-attention and pre-MLP norms are removed; the embedding, the final norm
and the output head stay full precision. Training is fake-quantised at full cost (the paper reports no
training speed-up), so the FLOPs are the baseline's. The recipe's two-stage lr and weight decay:
--lr-decay-style two-stage (training/schedules.py); packed 2-bit export: tools/export_bitnet.py
(megalatent/interop/packed.py).

`--bitnet-variant hf-2b4t` is instead the layout of the released b1.58 2B4T model and of transformers'
BitNetForCausalLM (megalatent/models/bitnet.py): the blocks keep their RMSNorms, sub-layer norms sit before
o_proj and down_proj, and the MLP is a squared-ReLU GLU. A model trained in that variant exports to
transformers (tools/convert_checkpoint.py to-hf) and opens there with our logits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megalatent.config import Config, ModelConfig, flag, packable_width_errors
from megalatent.families.family import Family
from megalatent.models.bitnet import HF_2B4T_SPEC
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token


@dataclass
class BitNetConfig(ModelConfig):
    bitnet_variant: str = flag(
        "b1.58", "where the norms sit: b1.58 (the paper: every BitLinear normalises its own input, SwiGLU, no block "
        "norms; --linear-impl bitlinear), or hf-2b4t (the released 2B4T model, transformers' BitNetForCausalLM: "
        "block RMSNorms, sub-norms before o_proj and down_proj, squared-ReLU GLU; exports to Hugging Face)",
        choices=["b1.58", "hf-2b4t"])


def build(cfg: BitNetConfig) -> Decoder:
    if cfg.bitnet_variant == "hf-2b4t":
        return Decoder(cfg, HF_2B4T_SPEC)  # (--linear-impl unset: the blocks keep their norms)
    return Decoder(dataclasses.replace(cfg, linear_impl="bitlinear"))


def hf_2b4t_errors(m: BitNetConfig) -> list[str]:
    """The 2B4T layout fixes what the shared flags would otherwise choose; its ternary weights are packed 4 rows
    per byte in transformers' format, so every projection's output width must be divisible by 4."""
    fixed = {"linear_impl": (m.linear_impl, None, "drop --linear-impl (the variant places its norms itself)"),
             "swiglu": (m.swiglu, True, "drop --no-swiglu (its MLP is a squared-ReLU GLU)"),
             "normalization": (m.normalization, "RMSNorm", "use --normalization RMSNorm"),
             "position_embedding_type": (m.position_embedding_type, "rope", "use --position-embedding-type rope"),
             "num_experts": (m.num_experts, None, "drop --num-experts (the variant has dense MLPs)")}
    e = [f"--bitnet-variant hf-2b4t: {fix}" for value, wanted, fix in fixed.values() if value != wanted]
    widths = {"hidden-size": m.hidden_size, "ffn-hidden-size": m.mlp_width,
              "num-query-groups x head size": m.kv_heads * m.head_dim}
    e += [f"--bitnet-variant hf-2b4t: --{name} {w} must be divisible by 4 (transformers packs 4 ternary rows per "
          "byte)" for name, w in widths.items() if w % 4]
    return e


def validate(cfg: Config) -> list[str]:
    m = cfg.model
    if m.bitnet_variant == "hf-2b4t":
        return hf_2b4t_errors(m)
    if m.linear_impl == "linear":
        return ["--model-family bitnet is the decoder with BitLinear layers; --linear-impl linear contradicts it "
                "(use --model-family gpt for the full-precision baseline)"]
    return [] if m.linear_impl == "bitlinear" else packable_width_errors(m)  # (the shared rules check bitlinear)


FAMILY = Family(name="bitnet", config=BitNetConfig, build=build, flops_per_token=dense_decoder_flops_per_token,
                validate=validate)
