"""MoE / MH-MoE against explicit references (models.md §3): dispatch vs a loop over tokens, MH-MoE vs
head -> plain MoE on sub-tokens -> merge, capacity drop order, the balance and z losses by formula, the
expert bias; and expert parallelism (EP = 2, 4; with TP, CP, PP and dp) against one process, balance
loss included; a checkpoint written at EP = 2 loads at EP = 1."""
import math

import pytest
import torch
import torch.nn.functional as F

from megalatent.config import ConfigError
from megalatent.families import parse_args, validate
from megalatent.nn.moe import MoELayer, balance_and_z_losses, grouped_mm, grouped_mm_loop


def make_layer(**kw) -> MoELayer:
    torch.manual_seed(0)  # each test's weights and inputs do not depend on which tests ran before
    args = dict(dim=16, ffn=12, num_experts=4, topk=2)
    args.update(kw)
    layer = MoELayer(**args)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def loop_reference(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """Each (sub-)token through each of its selected experts explicitly, weighted by the router."""
    routing = layer.router(tokens)
    out = torch.zeros_like(tokens)
    kept = kept_assignments(layer, routing)
    for t in range(tokens.shape[0]):
        for j in range(layer.topk):
            if (t, j) not in kept:
                continue
            e = routing.experts[t, j]
            w = layer.experts
            hidden = F.silu(tokens[t] @ w.gate_proj[e]) * (tokens[t] @ w.up_proj[e])
            out[t] = out[t] + routing.weights[t, j] * (hidden @ w.down_proj[e])
    return out


def kept_assignments(layer: MoELayer, routing) -> set:
    """Assignments that survive the capacity, by the documented policy, written independently."""
    pairs = [(t, j) for t in range(routing.experts.shape[0]) for j in range(layer.topk)]
    if layer.capacity_factor is None:
        return set(pairs)
    capacity = math.ceil(layer.capacity_factor * len(pairs) / layer.num_experts)
    kept = set()
    for e in range(layer.num_experts):
        mine = [(t, j) for t, j in pairs if routing.experts[t, j] == e]
        if layer.drop_policy == "probs":
            mine.sort(key=lambda tj: -float(routing.weights[tj]))
        kept.update(mine[:capacity])
    return kept


def grads(module, x):
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("kw", [dict(), dict(topk=1, pre_softmax=True), dict(router="xmoe"),
                                dict(capacity_factor=0.5), dict(capacity_factor=0.75, drop_policy="position")])
def test_dispatch_equals_loop_over_tokens(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    got = grads(layer, x)
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    ref = loop_reference(layer, x2.reshape(-1, 16)).view_as(x2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, grads(layer, x2)):  # float32 sums in another order: relative to each tensor's scale
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_capacity_drops_lowest_weights_first():
    layer = make_layer(capacity_factor=0.25)  # 10 tokens x 2 / 4 experts x 0.25 -> 2 slots per expert
    tokens = torch.randn(10, 16)
    routing = layer.router(tokens)
    experts, weights = routing.experts.flatten(), routing.weights.flatten()
    order, kept = layer._dispatch_order(experts, weights, torch.bincount(experts, minlength=4))
    assert kept.max() <= 2 and order.numel() == kept.sum()
    for e in range(4):
        mine = weights[experts == e]
        chosen = weights[order][experts[order] == e]
        torch.testing.assert_close(chosen, mine.sort(descending=True).values[:2])


def test_mh_moe_is_head_then_plain_moe_on_sub_tokens_then_merge():
    heads = 4
    mh = make_layer(dim=32, ffn=8, heads=heads, num_experts=6, topk=2)
    plain = MoELayer(dim=8, ffn=8, num_experts=6, topk=2)
    plain.router, plain.experts = mh.router, mh.experts  # shared weights
    assert plain.head_proj is None and plain.merge_proj is None
    x = torch.randn(3, 5, 32)
    sub_tokens = mh.head_proj(x).reshape(3, 5 * heads, 8)  # token t's sub-tokens are rows t*h .. t*h+h-1
    expected = mh.merge_proj(plain(sub_tokens).reshape(3, 5, 32))
    torch.testing.assert_close(mh(x), expected)


def test_token_order_is_restored():
    layer = make_layer(heads=2)
    x = torch.randn(1, 9, 16)
    perm = torch.randperm(9)
    torch.testing.assert_close(layer(x)[:, perm], layer(x[:, perm]), rtol=1e-5, atol=1e-6)


def test_balance_and_z_loss_formulas():
    layer = make_layer(num_experts=5, topk=2)
    routing = layer.router(torch.randn(7, 16))
    counts = torch.bincount(routing.experts.flatten(), minlength=5)
    balance, z, _ = balance_and_z_losses(routing, counts, 2)
    probs = routing.logits.softmax(-1)
    expected = sum(5 * (counts[e] / (7 * 2)) * probs[:, e].mean() for e in range(5))
    torch.testing.assert_close(balance.value, expected)
    torch.testing.assert_close(z.value, (torch.logsumexp(routing.logits, -1) ** 2).mean())
    # A perfectly balanced router (uniform probabilities, equal counts) has balance loss 1.
    uniform = type(routing)(routing.experts, routing.weights, torch.full((10, 5), 0.2), routing.logits)
    b, _, _ = balance_and_z_losses(uniform, torch.full((5,), 4), 2)
    assert b.value.item() == pytest.approx(1.0)


def test_expert_bias_changes_selection_not_weights_and_moves_toward_balance():
    layer = make_layer(expert_bias=True, topk=1, pre_softmax=True)
    tokens = torch.randn(20, 16)
    before = layer.router(tokens)
    layer.router.expert_bias[0] = 100.0  # expert 0 now always selected ...
    after = layer.router(tokens)
    assert (after.experts == 0).all()
    torch.testing.assert_close(after.weights[:, 0], before.probs[:, 0])  # ... with its unbiased probability
    layer.router.expert_bias.zero_()
    layer.router.update_expert_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.1)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


@pytest.mark.parametrize("d_out", [8, 5])  # 5: rows not 16-byte aligned -> the loop
def test_grouped_mm_equals_per_expert_matmuls(d_out):
    x, w = torch.randn(9, 4, requires_grad=True), torch.randn(3, 4, d_out, requires_grad=True)
    counts = torch.tensor([2, 0, 7])
    grouped_mm(x, w, counts).square().sum().backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    expected.square().sum().backward()
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)
    torch.testing.assert_close(grouped_mm_loop(x, w, counts), expected)
    torch.testing.assert_close(got, (x.grad, w.grad))


@pytest.mark.parametrize("flags, message", [
    (["--moe-num-heads", "2"], "add --num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "1"], "--moe-router-pre-softmax"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk 5"),
    (["--num-experts", "4", "--moe-num-heads", "3"], "--moe-num-heads 3 must divide"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], "--num-experts divisible"),
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], "must divide data-parallel size"),
])
def test_moe_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        validate(parse_args(["--vocab-size", "100"] + flags), world_size=4)


@pytest.mark.parametrize("heads", [1, 2], ids=["moe", "mh-moe"])
def test_moe_flops_count_active_parameters(heads):
    """flops_per_token of a model with MoE layers against the matmuls of one forward and backward, counted by
    FlopCounterMode (tests/flop_count.py): the router, the top-k experts each (sub-)token visits, MH-MoE's head
    and merge projections; the dense layers and attention as in the baseline."""
    from flop_count import count
    from megalatent.models.decoder import dense_decoder_flops_per_token
    from megalatent.families import build_model
    cfg = parse_args(["--vocab-size", "128", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-layers", "2",
                      "--num-attention-heads", "4", "--seq-length", "16", "--num-experts", "8", "--moe-router-topk", "2",
                      "--moe-layer-freq", "2", "--moe-num-heads", str(heads)]).model
    assert cfg.is_moe_layer(0) and not cfg.is_moe_layer(1)
    b, s = 2, cfg.seq_length
    torch.manual_seed(0)
    counted = count(build_model(cfg), torch.randint(0, 128, (b, s)))
    assert counted.training == 3 * counted.forward_total
    # The experts of layer 0 ran on top-k x (sub-)tokens rows (dropless: no capacity factor), each through
    # gate, up and down projections of width 256: twice the dense MLP of layer 1 (top-2), whatever the routing.
    assert counted.op("mm", "layers.0.mlp.experts") == 2 * counted.op("mm", "layers.1.mlp")
    # Attention's scores and values (the only batched products) over all s x s pairs; causal: the convention
    # counts half of them.
    attention = counted.op("bmm")
    assert dense_decoder_flops_per_token(cfg) * b * s == 3 * (counted.forward_total - attention / 2)


# ---------------------------------------------------------------------------------------------- parallel
# MH-MoE (h = 2) in layers 0 and 2 with every balancing term on. The balance statistics of a micro-batch
# are those of all data/context-parallel ranks' tokens, so a layout with dp ranks is compared with one
# process whose micro-batch is dp times larger (the same tokens per statistic).
MOE = {"num-experts": 4, "moe-router-topk": 2, "moe-num-heads": 2, "moe-layer-freq": 2, "moe-aux-loss-coeff": 0.01,
       "moe-z-loss-coeff": 0.001, "moe-router-enable-expert-bias": True}
UNTIED = {"untie-embeddings-and-output-weights": True}


def moe_layout(mbs, **flags):
    return {**MOE, "micro-batch-size": mbs, **flags}


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    from test_parallel import run_worker
    layouts = [moe_layout(2), moe_layout(4), moe_layout(8), moe_layout(4, **UNTIED)]
    results = run_worker(tmp_path_factory.mktemp("moe_ref"), 1, layouts, "moe_ref")
    return lambda mbs, untied=False: results[3] if untied else results[{2: 0, 4: 1, 8: 2}[mbs]]


def check_moe(tmp_path, moe_reference, nproc, cases, name):
    from test_parallel import assert_equivalent, run_worker
    results = run_worker(tmp_path, nproc, [layout for layout, _ in cases], name)
    for (layout, ref_key), result in zip(cases, results):
        ref = moe_reference(*ref_key)
        label = f"{nproc} ranks {layout}"
        assert_equivalent(result, ref, label)
        for name, g in ref["grads"].items():  # relative to each tensor's scale: expert gradients are tiny here
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                       msg=f"{label}: grad {name}")
        for got, want in zip(result["moe"], ref["moe"]):  # per step: global balance/z loss, expert loads
            assert got["balance_loss"] == pytest.approx(want["balance_loss"], rel=1e-5), label
            assert got["z_loss"] == pytest.approx(want["z_loss"], rel=1e-5), label
            assert got["layer_loads"] == pytest.approx(want["layer_loads"], rel=1e-6), label


def test_moe_two_ranks(tmp_path, moe_reference):
    check_moe(tmp_path, moe_reference, 2, [
        (moe_layout(2, **{"expert-model-parallel-size": 2}), (4,)),  # dp 2 = ep 2
        (moe_layout(2, **{"tensor-model-parallel-size": 2, "sequence-parallel": True}), (2,)),  # tokens split over tp
        (moe_layout(2, **{"tensor-model-parallel-size": 2}), (2,)),
        (moe_layout(2, **{"context-parallel-size": 2, "expert-model-parallel-size": 2}), (2,)),  # ep over cp
    ], "moe2")


def test_moe_four_ranks(tmp_path, moe_reference):
    check_moe(tmp_path, moe_reference, 4, [
        (moe_layout(2, **{"expert-model-parallel-size": 4}), (8,)),  # dp 4 = ep 4
        (moe_layout(2, **{"expert-model-parallel-size": 2}), (8,)),  # dp 4 = edp 2 x ep 2
        (moe_layout(2, **{"expert-model-parallel-size": 2, "tensor-model-parallel-size": 2}), (4,)),  # + TP, dp 2
        (moe_layout(2, **{"tensor-model-parallel-size": 2, "sequence-parallel": True}), (4,)),  # TP x dp 2, no EP
        (moe_layout(2, **{"expert-model-parallel-size": 2, "pipeline-model-parallel-size": 2}, **UNTIED), (4, True)),
    ], "moe4")


def test_checkpoint_written_at_ep2_loads_at_ep1(corpus_cache, tmp_path):
    """Saved at EP = 2 (dp 2), resumed at EP = 2 and in one process (with the same tokens per micro-batch):
    the first loss after loading (the loaded weights' logits) and the next ones are equal; the checkpoint
    holds the global [experts, ...] tensors."""
    from conftest import losses, run_trainer
    from megalatent.distributed import checkpoint as ckpt
    from megalatent.interop import convert
    moe = ["--num-experts", "4", "--moe-num-heads", "2", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "1e-3",
           "--moe-router-enable-expert-bias", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "0",
           "--lr-warmup-iters", "1", "--lr-decay-iters", "4", "--seq-length", "64"]
    save = str(tmp_path / "ckpt")
    run_trainer(moe + ["--micro-batch-size", "4", "--expert-model-parallel-size", "2", "--train-iters", "2",
                       "--save", save], corpus_cache, nproc=2)
    path = convert.resolve_checkpoint(save)
    model_sd = convert.read_state(path, keys=["model"])["model"]
    assert model_sd["layers.0.mlp.experts.gate_proj"].shape[0] == 4  # all experts, not one rank's two
    assert convert._shape_problems(convert.model_config(ckpt.read_train_state(path)), model_sd) == []
    resumed = {}
    for name, nproc, layout in [("ep2", 2, ["--micro-batch-size", "4", "--expert-model-parallel-size", "2"]),
                                ("single", 1, ["--micro-batch-size", "8"])]:
        out = run_trainer(moe + layout + ["--train-iters", "4", "--load", save], corpus_cache, nproc=nproc)
        assert "resumed from checkpoint at iteration 2" in out.stdout, name
        resumed[name] = losses(out.stdout)
    assert sorted(resumed["ep2"]) == [3, 4]
    for it in (3, 4):
        assert float(resumed["single"][it]) == pytest.approx(float(resumed["ep2"][it]), rel=1e-5), it


def test_bitnet_experts_are_ternary_with_int8_inputs():
    """--linear-impl bitlinear with --num-experts: each expert computes with {-1, 0, 1} x its own scale on int8
    per-token inputs (equal to the explicit quantised matmuls), and gradients reach the latent weights."""
    from megalatent.nn.bitlinear import quantize_activations, quantize_weights, rms_norm
    layer = make_layer(ternary_experts=True, heads=2)
    assert layer.head_proj.bias is None  # BitNet is bias-free
    x = torch.randn(2, 5, 16)
    out = layer(x)
    out.square().sum().backward()
    assert layer.experts.gate_proj.grad.abs().sum() > 0 and layer.experts.input_norm.grad is not None
    experts, counts = layer.experts, torch.tensor([3, 4])
    rows = torch.randn(7, 8)
    got = experts(rows, torch.cat([counts, torch.zeros(2, dtype=torch.long)]))

    def quantized(v, norm):
        x_int, s = quantize_activations(rms_norm(v, norm, experts.eps))
        return x_int / s

    def ternary(w):
        w_int, gamma = quantize_weights(w)
        assert set(w_int.unique().tolist()) <= {-1.0, 0.0, 1.0}
        return w_int * gamma

    expected = []
    for e, block in enumerate(rows.split(counts.tolist())):
        xq = quantized(block, experts.input_norm[e])
        h = F.silu(xq @ ternary(experts.gate_proj[e])) * (xq @ ternary(experts.up_proj[e]))
        expected.append(quantized(h, experts.hidden_norm[e]) @ ternary(experts.down_proj[e]))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)
