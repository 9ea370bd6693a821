"""YOCO against its definition (reference/models.md §2) and against itself at every layout: the model's
structure and FLOPs, its config rules, and TP / SP / PP (with K^/V^ carried between stages) / CP (the
retention state and the window passed between ranks, K^/V^ gathered once) equal to one process.
Gated retention's three forms and the sliding window are in test_retention.py; decoding in test_inference.py."""
import json

import pytest
import torch

from megalatent.config import ConfigError
from megalatent.families import build_model, model_config, parse_args, validate
from megalatent.models.yoco import CrossAttention, flops_per_token
from megalatent.nn.attention import SlidingWindowCore
from megalatent.nn.retention import GatedRetention
from flop_count import count
from test_parallel import assert_equivalent, run_worker

GRET = {"model-family": "yoco", "retention-chunk-size": 4}  # 16-token sequences: 4 chunks
SWA = {"model-family": "yoco", "yoco-self-attention": "swa", "sliding-window-size": 5}
UNTIED = {"untie-embeddings-and-output-weights": True}
SIX = {"num-layers": 6}  # 3 cross-decoder layers: with one layer per stage, a stage passes K^/V^ through
MODEL_KEYS = {"model-family", "retention-chunk-size", "yoco-self-attention", "sliding-window-size",
              "untie-embeddings-and-output-weights", "num-layers"}


def tiny(**kw):
    base = dict(model_family="yoco", num_layers=4, hidden_size=32, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, vocab_size=100, seq_length=16, make_vocab_size_divisible_by=64)
    return model_config(**{**base, **kw})


def test_structure_self_decoder_then_cross_decoder_with_one_shared_kv():
    model = build_model(tiny(yoco_self_attention="gret"))
    kinds = [type(layer.attention) for layer in model.layers.values()]
    assert kinds == [GatedRetention, GatedRetention, CrossAttention, CrossAttention]
    names = {n for n, _ in model.named_parameters()}
    # one K^/V^ projection for the whole cross-decoder; cross layers have only their own q and o
    assert {"shared_kv.k_proj.weight", "shared_kv.v_proj.weight", "shared_kv.norm.weight"} <= names
    assert not any(n.startswith("layers.2.attention.k_proj") or n.startswith("layers.3.attention.v_proj") for n in names)
    assert model.shared_kv.k_proj.weight.shape == (2 * 8, 32)  # GQA-shaped: 2 K/V heads of 8
    swa = build_model(tiny(yoco_self_attention="swa", sliding_window_size=3))
    assert isinstance(swa.layers["1"].attention.core_attention, SlidingWindowCore)


@pytest.mark.parametrize("kind", ["gret", "swa"])
def test_causal_and_trains(kind):
    torch.manual_seed(0)
    cfg = tiny(yoco_self_attention=kind, sliding_window_size=4 if kind == "swa" else None, retention_chunk_size=4)
    model = build_model(cfg)
    tokens = torch.randint(0, 100, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 128)
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    torch.testing.assert_close(model(changed)[:, :9], logits[:, :9])  # the past does not see the future
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


@pytest.mark.parametrize("kind", ["gret", "swa"])
def test_flops_per_token_is_what_the_model_computes(kind):
    """flops_per_token against the matmuls of one forward and backward, counted by FlopCounterMode
    (tests/flop_count.py: what it counts and the convention). Self-decoder layers 0-1, cross-decoder 2-3."""
    chunk, window = 8, 4
    cfg = tiny(yoco_self_attention=kind, sliding_window_size=window if kind == "swa" else None,
               retention_chunk_size=chunk)
    b, s, h, d = 2, cfg.seq_length, cfg.hidden_size, cfg.head_dim
    torch.manual_seed(0)
    counted = count(build_model(cfg), torch.randint(0, 100, (b, s)))
    assert counted.training == 3 * counted.forward_total
    self_core = sum(counted.op("bmm", f"layers.{i}.attention") for i in (0, 1))
    cross_core = sum(counted.op("bmm", f"layers.{i}.attention") for i in (2, 3))
    assert self_core + cross_core == counted.op("bmm")  # no batched product outside the attention cores
    # Cross-attention: causal over the shared K^/V^, all s x s pairs computed; the convention counts half.
    assert cross_core == 2 * b * s * s * 2 * 2 * h
    if kind == "gret":
        # Chunkwise retention: within each chunk of 8 tokens, scores and values over all 8 x 8 pairs (causal
        # inside the chunk: the convention counts half, as for attention), and two state products per token
        # and head, q S and k^T v (2 * d * d each: not masked, counted whole by both). The states at the chunks'
        # ends come from one product per head of the [chunks x chunks] decay matrix with the chunks' [d x d]
        # contributions: the implementation's, outside the convention (like the recurrent form's d x d updates).
        intra, state = 2 * b * s * chunk * 2 * 2 * h, 2 * b * s * 2 * (2 * h * d)
        chunks = -(-s // chunk)
        scan = 2 * (2 * b * (h // d) * chunks * chunks * d * d)
        assert self_core == intra + state + scan
        self_convention = intra / 2 + state
    else:
        # The sliding window runs in blocks of `window` queries against their own block and the one before
        # (the first block: its own), computing pairs outside the window too. The convention counts the keys
        # each query sees: min(t + 1, window) at position t.
        visible = sum(len([k for k in range(s) if t - window < k <= t]) for t in range(s))
        self_convention = 2 * b * visible * 2 * 2 * h
        assert self_core > self_convention
    conventional = counted.forward_total - self_core - cross_core + self_convention + cross_core / 2
    assert flops_per_token(cfg) * b * s == pytest.approx(3 * conventional, rel=1e-12)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputation_changes_nothing(granularity):
    from megalatent.distributed.parallelize import apply_recompute
    torch.manual_seed(0)
    model = build_model(tiny(retention_chunk_size=4))
    tokens = torch.randint(0, 100, (2, 16))
    reference = torch.autograd.grad(model(tokens).square().mean(), list(model.parameters()))
    apply_recompute(model, granularity)
    for a, b in zip(torch.autograd.grad(model(tokens).square().mean(), list(model.parameters())), reference):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flags,message", [
    (["--num-layers", "3"], "must be even"),
    (["--yoco-self-attention", "swa"], "needs --sliding-window-size"),
    (["--sliding-window-size", "64"], "applies to --yoco-self-attention swa"),
    (["--segment-lengths", "4", "--dilated-ratios", "1"], "--segment-lengths configures --model-family longnet"),
])
def test_invalid_configs_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_args(["--model-family", "yoco", "--num-layers", "4"] + flags))
    with pytest.raises(ConfigError, match="--sliding-window-size configures --model-family yoco, not gpt"):
        validate(parse_args(["--sliding-window-size", "64"]))


TWO_RANKS = [
    {**GRET, "tensor-model-parallel-size": 2},
    {**SWA, "tensor-model-parallel-size": 2, "sequence-parallel": True},
    {**GRET, "context-parallel-size": 2},  # retention state passed to the next rank
    {**SWA, "context-parallel-size": 2},  # the window's K/V borrowed from the rank before
    {**GRET, "pipeline-model-parallel-size": 2, **UNTIED},  # 1F1B: self-decoder | cross-decoder
    {**SWA, "pipeline-model-parallel-size": 2, "num-layers-per-virtual-pipeline-stage": 1, **SIX, **UNTIED},
    {**GRET, "tensor-model-parallel-size": 2, "sequence-parallel": True},  # per-head gates under SP
]
FOUR_RANKS = [
    {**SWA, "sliding-window-size": 7, "context-parallel-size": 4},  # window wider than a rank's 4 tokens
    {**GRET, "context-parallel-size": 4},  # the state crosses three ranks
    {**GRET, "tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, **SIX, **UNTIED},
    # stage 0: layers 0-3 (K^/V^ made and gathered there), stage 1: layers 4-5 (receives them gathered)
    {**GRET, "context-parallel-size": 2, "pipeline-model-parallel-size": 2, "decoder-first-pipeline-num-layers": 4,
     **SIX, **UNTIED},
]


def model_flags(layout):
    return {k: v for k, v in layout.items() if k in MODEL_KEYS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process results of every model the layouts use, from one launch."""
    models = []
    for layout in TWO_RANKS + FOUR_RANKS:
        if model_flags(layout) not in models:
            models.append(model_flags(layout))
    results = run_worker(tmp_path_factory.mktemp("ref"), 1, models, "ref")
    return lambda layout: results[models.index(model_flags(layout))]


def check_layouts(tmp_path, reference, nproc, layouts):
    for layout, result in zip(layouts, run_worker(tmp_path, nproc, layouts, f"n{nproc}")):
        assert_equivalent(result, reference(layout), f"{nproc} ranks {json.dumps(layout)}")


def test_two_rank_layouts_equal_one_process(tmp_path, reference):
    check_layouts(tmp_path, reference, 2, TWO_RANKS)


def test_four_rank_layouts_equal_one_process(tmp_path, reference):
    check_layouts(tmp_path, reference, 4, FOUR_RANKS)
