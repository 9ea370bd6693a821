"""LongNet's dilated attention against its definition (reference/models.md §1): one pattern with w = N,
r = 1 is dense attention; a mixture is one softmax over the union of the patterns' keys counted with
multiplicity — values and gradients, causal and not, lengths that are not multiples of w. One pattern
(its autograd function, both attention cores) and the LSE merge against their materialised formulas,
gradients through the LSEs included. fp64 inputs are computed in fp64, so they agree to ~1e-15."""
import math

import pytest
import torch

from megalatent.nn import dilated
from megalatent.nn.dilated import NOT_COVERED, attention_pattern, dilated_attention, merge_by_lse

FP64 = dict(atol=1e-12, rtol=1e-12)


def union_multiplicity(n, h, segment_lengths, dilated_ratios, causal, first_head=0):
    """count[j, p, q] = how many patterns let head j's query p see key q (the definition, by loops)."""
    count = torch.zeros(h, n, n)
    for w, r in zip(segment_lengths, dilated_ratios):
        w = min(w, n)
        for j in range(h):
            s = (j + first_head) % r
            for p in range(n):
                for q in range(n):
                    same_segment = p // w == q // w
                    kept = (p % w) % r == s and (q % w) % r == s
                    if same_segment and kept and (q <= p or not causal):
                        count[j, p, q] += 1
    return count


def reference(q, k, v, count):
    """Dense attention with weights exp(score) x multiplicity; queries no pattern covers give 0."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores + torch.log(count.to(scores.dtype))  # log 0 = -inf removes a key; log 2 in fp64
    covered = count.sum(-1) > 0
    probs = torch.softmax(scores.masked_fill(~covered[..., None], 0.0), dim=-1) * covered[..., None]
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def run_both(n, h, segment_lengths, dilated_ratios, causal, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), segment_lengths, dilated_ratios, causal)
    assert out.dtype == dtype
    ref = reference(q, k, v, union_multiplicity(n, h, segment_lengths, dilated_ratios, causal))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out.double(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    tolerance = FP64 if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tolerance)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("causal", [True, False])
def test_one_pattern_w_n_r_1_is_dense_attention(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 20, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = dilated_attention(q, k, v, [20], [1], causal)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, dense, **FP64)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(dense.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **FP64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,h,segments,ratios", [
    (16, 2, [4, 8, 16], [1, 2, 4]),   # the paper's geometric shape, lengths multiples of w
    (23, 3, [4, 8, 16], [1, 2, 4]),   # a length that is a multiple of no w: padding
    (19, 4, [6, 12, 32], [1, 3, 6]),  # w not a multiple of r, w longer than the sequence
    (17, 5, [5, 10], [2, 3]),         # no r = 1 pattern: some (query, head) pairs are not covered
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_is_one_softmax_over_the_union_with_multiplicity(n, h, segments, ratios, causal, dtype):
    run_both(n, h, segments, ratios, causal, dtype)


# (n, h, w, r, first_head): lengths that are multiples of w; a padded last segment; w not a multiple of r
# (heads keep different numbers of rows); w longer than the sequence and n < r (heads that keep no row
# of a segment: rows not covered); one dense segment.
PATTERNS = [(16, 2, 8, 2, 0), (23, 3, 8, 2, 1), (19, 4, 6, 4, 0), (17, 5, 10, 3, 2), (3, 5, 16, 4, 1),
            (32, 2, 32, 1, 0)]
CORES = {"flash-cpu": dilated.FLASH_CPU, "plain": dilated.PLAIN}


@pytest.fixture(params=["flash-cpu", "plain"])
def core(request, monkeypatch):
    """Each attention core (the plain one runs on GPUs for what the Triton kernel does not take)."""
    monkeypatch.setattr(dilated, "_core", lambda device: CORES[request.param])
    return request.param


@pytest.mark.parametrize("chunk_rows", [dilated._CHUNK_ROWS, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, h, w, r, first_head", PATTERNS)
def test_pattern_equals_masked_attention(n, h, w, r, first_head, causal, chunk_rows, core, monkeypatch):
    """attention_pattern (gather, fused core, scatter, its own backward) against the materialised formula:
    dense attention over the pattern's visible keys. Values, LSE (NOT_COVERED where a head keeps no row),
    and the gradients of q, k, v from cotangents on the output and on the LSE; several chunks of segments
    (and several query blocks of the plain core) with chunk_rows = 8."""
    monkeypatch.setattr(dilated, "_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(dilated, "_PLAIN_SCORES", 4 * chunk_rows)
    g = torch.Generator().manual_seed(n + w + r)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    visible = union_multiplicity(n, h, [w], [r], causal, first_head) > 0
    out, lse = attention_pattern(q, k, v, w, r, causal, first_head)
    ref_out, ref_lse = dilated._masked_attention(q, k, v, visible)
    torch.testing.assert_close(out, ref_out, **FP64)
    torch.testing.assert_close(lse, ref_lse, **FP64)
    assert (lse[:, ~visible.any(-1)] == NOT_COVERED).all() and (out[:, ~visible.any(-1)] == 0).all()
    cotangents = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                   dtype=torch.float64)
    for weights in [(1, 0), (0, 1), (1, 1)]:  # through the output, through the LSE, both
        def loss(o, s):
            return weights[0] * (o * cotangents[0]).sum() + weights[1] * (s * cotangents[1]).sum()
        got = torch.autograd.grad(loss(out, lse), (q, k, v), retain_graph=True)
        want = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v), retain_graph=True)
        for name, a, b in zip("qkv", got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **FP64, msg=lambda m: f"d{name}, weights {weights}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_pattern_with_grouped_query_heads(causal, core):
    """Under GQA the K/V heads are expanded first (as dilated_attention and the kernel's reference do); the
    gradients of the shared K/V heads sum over their query heads."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 21, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, 21, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    out, lse = attention_pattern(q, *dilated._expand_kv(q, k, v), 10, 3, causal, 1)
    visible = union_multiplicity(21, 4, [10], [3], causal, first_head=1) > 0
    ref_out, ref_lse = dilated._masked_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), visible)
    torch.testing.assert_close(out, ref_out, **FP64)
    loss = out.sum() + lse.clamp_min(-1e3).sum()
    ref_loss = ref_out.sum() + ref_lse.clamp_min(-1e3).sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
        torch.testing.assert_close(a, b, **FP64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pattern_dtypes(dtype, core):
    """fp32 is computed in fp32; bf16 and fp16 accumulate in fp32 (their LSE stays fp32), within rounding."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 3, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref_out, ref_lse = attention_pattern(q, k, v, 16, 2, True, 0)
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = attention_pattern(*low, 16, 2, True, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, **tolerance)
    torch.testing.assert_close(lse.double(), ref_lse, **tolerance)
    grads = torch.autograd.grad(out.float().sum() + lse.clamp_min(-1e3).sum(), low)
    assert all(grad.dtype == dtype and torch.isfinite(grad).all() for grad in grads)


def test_padded_keys_stay_masked_when_every_score_is_very_negative(core):
    """Scores near -100 (fp32's exp overflows at +88): padded keys must still weigh 0, in the backward too,
    where an unmasked zero key would get weight exp(0 - LSE) = inf."""
    g = torch.Generator().manual_seed(6)
    q = (6 + 0.5 * torch.randn(1, 2, 13, 8, generator=g, dtype=torch.float64)).requires_grad_()
    k = (-6 + 0.5 * torch.randn(1, 2, 13, 8, generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn(1, 2, 13, 8, generator=g, dtype=torch.float64).requires_grad_()
    out = dilated_attention(q.float(), k.float(), v.float(), [5, 10], [1, 2], causal=False)
    ref = reference(q, k, v, union_multiplicity(13, 2, [5, 10], [1, 2], causal=False))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(out.double().sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_mixture_lse_is_the_union_logsumexp(causal, core):
    """The mixture's autograd function also returns the merged LSE, logsumexp over the union of the keys with
    multiplicity (NOT_COVERED where no pattern covers a row), and takes a gradient on it."""
    n, h, segments, ratios = 17, 5, [5, 10], [2, 3]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out, lse = dilated._DilatedAttention.apply(q, k, v, tuple(zip(segments, ratios)), causal, 0, CORES[core])
    count = union_multiplicity(n, h, segments, ratios, causal).double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8) + torch.log(count)
    covered = count.sum(-1) > 0
    ref_lse = torch.where(covered, torch.logsumexp(scores.masked_fill(~covered[..., None], 0.0), -1), NOT_COVERED)
    ref_out = reference(q, k, v, count)
    torch.testing.assert_close(out, ref_out, **FP64)
    torch.testing.assert_close(lse, ref_lse, **FP64)
    cotangents = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                   dtype=torch.float64)
    got = torch.autograd.grad((out, lse), (q, k, v), cotangents)
    want = torch.autograd.grad((ref_out, ref_lse), (q, k, v), cotangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP64)


def test_merge_equals_the_softmax_formula():
    """merge_by_lse against softmax over the stacked LSEs, with autograd through both: fp64 values and the
    gradients of the outputs and of the LSEs, rows one partial skips and a row none covers (output 0)."""
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    lses = [3 * torch.randn(2, 3, 20, generator=g, dtype=torch.float64) for _ in range(3)]
    lses[0][:, :, ::4] = NOT_COVERED
    for out, lse in zip(outputs, lses):
        lse[:, 0, 5] = NOT_COVERED
        out[lse == NOT_COVERED] = 0  # as the patterns give them
        out.requires_grad_(), lse.requires_grad_()
    merged = merge_by_lse(outputs, lses)
    formula = (torch.softmax(torch.stack(lses), 0).unsqueeze(-1) * torch.stack(outputs)).sum(0)
    torch.testing.assert_close(merged, formula, **FP64)
    assert (merged[:, 0, 5] == 0).all()
    cotangent = torch.randn(merged.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(merged, outputs + lses, cotangent)
    want = torch.autograd.grad(formula, outputs + lses, cotangent)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP64)


def test_grouped_query_heads_are_shared():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    out = dilated_attention(q, k, v, [4, 12], [1, 2])
    full = dilated_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), [4, 12], [1, 2])
    torch.testing.assert_close(out, full)


def test_longnet_with_one_full_pattern_is_the_dense_decoder():
    from megalatent.families import model_config, build_model
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16,
                 make_vocab_size_divisible_by=64)
    torch.manual_seed(0)
    dense = build_model(model_config(model_family="gpt", **shape))
    longnet = build_model(model_config(model_family="longnet", segment_lengths=[16], dilated_ratios=[1], **shape))
    longnet.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(longnet(tokens), dense(tokens), atol=1e-5, rtol=1e-5)
    # and with real dilation it is a different (sparser) model that is still causal
    sparse = build_model(model_config(model_family="longnet", segment_lengths=[4, 8, 16], dilated_ratios=[1, 2, 4],
                                     **shape))
    sparse.load_state_dict(dense.state_dict())
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    torch.testing.assert_close(sparse(changed)[:, :9], sparse(tokens)[:, :9])
    assert not torch.allclose(sparse(tokens), dense(tokens))


def test_tiny_longnet_trains(corpus_cache):
    """The example config learns the corpus: below the entropy of its token frequencies (5.0 nats), which a
    model that does not read its input cannot beat (it reaches ~4.6 in 30 steps)."""
    from conftest import losses, run_trainer, unigram_entropy
    out = run_trainer(["--config", "examples/tiny/longnet.yaml", "--train-iters", "30", "--log-interval", "5",
                       "--eval-interval", "0"], corpus_cache)
    curve = {i: float(v) for i, v in losses(out.stdout).items()}
    assert curve[30] < unigram_entropy(corpus_cache) - 0.2 and curve[30] < curve[5] - 1.0, curve


def test_longnet_flops_per_token_is_what_the_model_computes():
    """LongNet's flops_per_token against the matmuls of one forward and backward, counted by FlopCounterMode
    (tests/flop_count.py: what it counts and the convention)."""
    from flop_count import count
    from megalatent.families import build_model, model_config
    from megalatent.models.longnet import flops_per_token
    w, r = [4, 8, 16, 32], [1, 2, 4, 4]  # the last pattern is longer than the sequence: clamped to it
    cfg = model_config(model_family="longnet", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                      seq_length=16, make_vocab_size_divisible_by=64, group_query_attention=True, num_query_groups=2,
                      segment_lengths=w, dilated_ratios=r)
    b, s, heads, d = 2, cfg.seq_length, cfg.num_attention_heads, cfg.head_dim
    torch.manual_seed(0)
    counted = count(build_model(cfg), torch.randint(0, 100, (b, s)))
    # Each pattern's scores and values, the only batched products, are computed for every pair of rows a head
    # keeps in a segment (the causal mask is applied to computed scores): per head, the pairs the definition
    # lets a query see without the mask, 2 * 2 * head_dim FLOPs each. The convention (LongNet Eq. 16) counts
    # half of them: w_i / r_i^2 keys per query and head over the mixture, halved for the causal mask.
    pairs = union_multiplicity(s, heads, w, r, causal=False).sum().item()
    attention = counted.op("bmm")
    assert attention == cfg.num_layers * b * pairs * 2 * 2 * d
    # Backward: two products per forward product, and the scores Q K^T once more (recomputed, not stored).
    assert counted.training == 3 * counted.forward_total + attention / 2
    assert flops_per_token(cfg) * b * s == 3 * (counted.forward_total - attention / 2)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_distributed_dilated_attention_equals_single_process(tmp_path, ranks):
    """Every rank (rank 0 and the last included) gets the single-device values and gradients; 3 ranks have a
    ragged last segment group."""
    import importlib.util
    import json
    import os
    from conftest import REPO
    from launcher import launch
    out = tmp_path / "errors.json"
    proc = launch([os.path.join(REPO, "tests", "dilated_worker.py"), str(out)], ranks, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert {e["rank"] for e in errors} == set(range(ranks))
    if ranks == 2 and os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        assert any(e["case"].endswith("kernel") for e in errors)  # the local patterns ran the Triton kernels too
    for e in errors:
        assert e["out"] < 1e-5, e
        assert max(e["grads"]) < 1e-4, e
    # Patterns longer than a rank's share were gathered from the segment's ranks only. What the collectives
    # brought (counted from their output tensors) is what the module reports, and at most the bound
    # sum_i (g_i - 1) * ceil(local / r_i); every rank of a full group of g ranks receives exactly that, a rank
    # alone in a ragged last group nothing.
    from megalatent.distributed.context_parallel.dilated import received_rows
    assert any(e["received_rows"] > 0 for e in errors)
    for e in errors:
        bound = received_rows(e["segments"], e["ratios"], e["local"], ranks)
        assert e["gathered_rows"] == e["received_rows"] <= bound, e
        if ranks != 3:
            assert e["received_rows"] == bound, e
    if ranks == 3:
        alone = [e for e in errors if e["rank"] == 2]
        assert alone and all(e["received_rows"] < received_rows(e["segments"], e["ratios"], 32, 3) for e in alone)


LONGNET = {"model-family": "longnet", "segment-lengths": [4, 8, 16], "dilated-ratios": [1, 2, 4]}


def test_longnet_training_with_context_parallelism_equals_one_device(tmp_path):
    """C = 2, C = 2 x DP = 2, TP = 2 and C = 2 x TP = 2 + SP give the single-device losses, gradients and
    weights (tests/parallel_worker.py)."""
    from test_parallel import assert_equivalent, run_worker
    reference = run_worker(tmp_path, 1, [LONGNET], "longnet-ref")[0]
    layouts = {2: [{}, {"context-parallel-size": 1, "tensor-model-parallel-size": 2}],
               4: [{"data-parallel-sharding-strategy": "optim"},
                   {"tensor-model-parallel-size": 2, "sequence-parallel": True}]}
    for nproc, extras in layouts.items():  # one launch per world size
        batch = [{**LONGNET, "context-parallel-size": 2, **extra} for extra in extras]
        results = run_worker(tmp_path, nproc, batch, f"longnet-{nproc}")
        assert len(results) == len(batch)
        for layout, result in zip(batch, results):
            assert_equivalent(result, reference, f"longnet {nproc} ranks {layout}")


def test_communication_per_rank_does_not_grow_with_the_sequence():
    """LongNet §3.1: with w_i / r_i constant, what a rank receives is the same at 64K and at 1M tokens."""
    from megalatent.distributed.context_parallel.dilated import received_rows
    w = [2048, 4096, 8192, 16384, 32768]
    r = [1, 2, 4, 8, 16]
    local = 2048
    volumes = [received_rows(w, r, local, cp=n // local) for n in (65536, 131072, 262144, 1048576)]
    assert len(set(volumes)) == 1 and volumes[0] > 0
    assert volumes[0] <= sum(wi // ri for wi, ri in zip(w, r))
    # the paper's schedule (r = 1 2 4 6 12) stays within a constant bound too
    paper = [received_rows(w, [1, 2, 4, 6, 12], local, cp=n // local) for n in (65536, 1048576)]
    assert paper[0] == paper[1]



def test_positions_are_exact_beyond_float32_integers():
    """Past 2^24 float32 cannot tell n from n + 1; a causal mask built on float positions lets a query see the
    key after it. Positions here are integers: the gather of a pattern's rows at n = 2^24 + 16 picks the
    exact positions, and decoding at position 2^24 does not see the key at 2^24 + 1."""
    import math

    from megalatent.nn.dilated import _PatternRows, dilated_attention_at_positions
    n = 2**24 + 16
    pattern = _PatternRows(n, 2, 16, 2, first_head=0)
    positions = torch.arange(n).view(1, 1, n, 1).expand(1, 2, n, 1)
    last = slice(pattern.segments - 1, pattern.segments)
    rows = torch.empty(1, 2, 1, pattern.rows, 1, dtype=torch.int64)
    pattern.gather(pattern.blocks(positions), last, rows)
    for head in range(2):
        assert rows[0, head, 0, :, 0].tolist() == list(range(2**24 + head, n, 2))
    assert pattern.real(last, torch.device("cpu")).all()

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 1, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    keys = torch.tensor([2**24 - 1, 2**24, 2**24 + 1])
    out = dilated_attention_at_positions(q, k, v, torch.tensor([2**24]), keys, [2**25], [1])
    weights = (q[0, 0] @ k[0, 0, :2].T / math.sqrt(4)).softmax(-1)
    torch.testing.assert_close(out[0, 0], weights @ v[0, 0, :2])
