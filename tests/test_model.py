"""The baseline decoder against its formulas: RMSNorm, RoPE, grouped-query causal attention, SwiGLU,
tied/untied heads, and the FLOP count against the matmuls the model runs."""
import math

import pytest
import torch

from megalatent.families import build_model, model_config
from megalatent.models.decoder import dense_decoder_flops_per_token
from megalatent.nn.attention import SelfAttention
from megalatent.nn.norms import RMSNorm
from megalatent.nn.rotary import Positions, RotaryEmbedding, apply_rotary
from flop_count import count


def test_rmsnorm_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.randn(16)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_rotates_pairs_by_position_angle():
    d = 8
    rope = RotaryEmbedding(d, base=10000.0)
    pos = torch.tensor([[0, 1, 7]])
    x = torch.randn(1, 3, 1, d)
    y = apply_rotary(x, *rope(pos))
    for s, p in enumerate(pos[0].tolist()):
        for i in range(d // 2):
            theta = p * 10000.0 ** (-2 * i / d)
            a, b = x[0, s, 0, i], x[0, s, 0, i + d // 2]
            torch.testing.assert_close(y[0, s, 0, i], a * math.cos(theta) - b * math.sin(theta))
            torch.testing.assert_close(y[0, s, 0, i + d // 2], b * math.cos(theta) + a * math.sin(theta))
    # relative: <R(m)q, R(n)k> depends on m - n only
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    def dot(m, n):
        return (apply_rotary(q, *rope(torch.tensor([[m]]))) * apply_rotary(k, *rope(torch.tensor([[n]])))).sum()
    torch.testing.assert_close(dot(5, 2), dot(103, 100))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_causal_attention_formula(kv_heads):
    torch.manual_seed(0)
    b, s, h, heads = 2, 6, 32, 4
    attn = SelfAttention(h, heads, kv_heads)
    x = torch.randn(b, s, h)
    hd = h // heads
    q = attn.q_proj(x).view(b, s, heads, hd)
    k = attn.k_proj(x).view(b, s, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=2)
    v = attn.v_proj(x).view(b, s, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, h)
    torch.testing.assert_close(attn(x, Positions(torch.arange(s).expand(b, s), None)), attn.o_proj(out),
                               atol=1e-5, rtol=1e-5)


def tiny_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16,
                make_vocab_size_divisible_by=64)
    base.update(kw)
    return model_config(**base)


def test_decoder_is_causal_and_shapes():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    tokens = torch.randint(0, 100, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 128)  # vocab padded to a multiple of 64
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 100
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])  # the past does not see the future
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_tied_and_untied_heads():
    tied, untied = build_model(tiny_cfg()), build_model(tiny_cfg(untie_embeddings_and_output_weights=True))
    assert not any("output" in n for n, _ in tied.named_parameters())
    assert untied.output.weight.shape == (128, 32) and tied.output.weight is None
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 128 * 32


def test_parameter_names_are_global_layer_indices():
    names = {n for n, _ in build_model(tiny_cfg(num_layers=3)).named_parameters()}
    assert "layers.2.attention.q_proj.weight" in names and "layers.0.mlp.gate_proj.weight" in names


@pytest.mark.parametrize("kw", [dict(swiglu=True, group_query_attention=True, num_query_groups=2),
                                dict(swiglu=False, untie_embeddings_and_output_weights=True)],
                         ids=["swiglu-gqa-tied", "gelu-mha-untied"])
def test_flops_per_token_is_what_the_model_computes(kw):
    """dense_decoder_flops_per_token against the matmuls of one forward and backward, counted by
    FlopCounterMode (tests/flop_count.py: what it counts and the convention)."""
    cfg = tiny_cfg(**kw)
    b, s, h = 3, cfg.seq_length, cfg.hidden_size
    counted = count(build_model(cfg), torch.randint(0, cfg.vocab_size, (b, s)))
    assert counted.training == 3 * counted.forward_total
    # The only batched products are attention's scores and values, computed for all s x s pairs (the mask
    # is applied to computed scores) at 2 * 2 * head_dim per pair and head; the convention's causal query
    # sees s / 2 keys: half of them.
    attention = counted.op("bmm")
    assert attention == cfg.num_layers * b * s * s * 2 * 2 * h
    assert dense_decoder_flops_per_token(cfg) * b * s == 3 * (counted.forward_total - attention / 2)
