"""BitNet b1.58 2B4T's layer layout (transformers' BitNetForCausalLM), for `--bitnet-variant hf-2b4t`.

    x = x + o_proj(attn_sub_norm(attention(input_layernorm(x))))
    x = x + down_proj(ffn_sub_norm(relu(gate_proj(h))^2 * up_proj(h))),   h = post_attention_layernorm(x)

Every projection is ternary with int8 activations (megalatent/nn/bitlinear.py). q/k/v and gate/up read the
output of the block's RMSNorm as it is (`TernaryLinear`); o_proj and down_proj are `BitLinear`s, whose own
input RMSNorm *is* the sub-layer norm (attn_sub_norm, ffn_sub_norm), so it is sharded with their input
features under tensor parallelism like any row-parallel BitLinear's. The paper's own layout (each
BitLinear with its own input norm, no block norms, SwiGLU) is the default variant, b1.58.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.config import ModelConfig
from megalatent.models.decoder import LayerSpec, default_attention, default_norm
from megalatent.nn.bitlinear import BitLinear, TernaryLinear


class ReLU2GLU(nn.Module):
    """down(ffn_sub_norm(relu(gate(x))^2 * up(x))) with ternary projections; down_proj.norm_weight is the sub-norm."""

    def __init__(self, hidden: int, ffn: int, eps: float):
        super().__init__()
        self.gate_proj = TernaryLinear(hidden, ffn)
        self.up_proj = TernaryLinear(hidden, ffn)
        self.down_proj = BitLinear(ffn, hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.gate_proj(x)).square() * self.up_proj(x))


def sub_norm_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """Self-attention with ternary q/k/v and the attention sub-norm in front of o_proj (its BitLinear norm)."""
    attention = default_attention(cfg, layer, linear=TernaryLinear)
    attention.o_proj = BitLinear(attention.o_proj.in_features, cfg.hidden_size, eps=cfg.norm_epsilon)
    return attention


def relu2_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    return ReLU2GLU(cfg.hidden_size, cfg.mlp_width, cfg.norm_epsilon)


HF_2B4T_SPEC = LayerSpec(attention=sub_norm_attention, mlp=relu2_mlp, norm=default_norm)
