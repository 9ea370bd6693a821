"""LongNet's dilated attention against its definition (reference/models.md §1): one pattern with w = N,
r = 1 is dense attention; a mixture is one softmax over the union of the patterns' keys counted with
multiplicity — values and gradients, causal and not, lengths that are not multiples of w."""
import math

import pytest
import torch

from megalatent.nn.dilated import dilated_attention


def union_multiplicity(n, h, segment_lengths, dilated_ratios, causal):
    """count[j, p, q] = how many patterns let head j's query p see key q (the definition, by loops)."""
    count = torch.zeros(h, n, n)
    for w, r in zip(segment_lengths, dilated_ratios):
        w = min(w, n)
        for j in range(h):
            s = j % r
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
    scores = scores + torch.log(count)  # log 0 = -inf removes a key
    covered = count.sum(-1) > 0
    probs = torch.softmax(scores.masked_fill(~covered[..., None], 0.0), dim=-1) * covered[..., None]
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def run_both(n, h, segment_lengths, dilated_ratios, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = dilated_attention(q.float(), k.float(), v.float(), segment_lengths, dilated_ratios, causal)
    ref = reference(q, k, v, union_multiplicity(n, h, segment_lengths, dilated_ratios, causal))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out.double(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_one_pattern_w_n_r_1_is_dense_attention(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 20, 8, generator=g).requires_grad_() for _ in range(3))
    out = dilated_attention(q, k, v, [20], [1], causal)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(dense.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,h,segments,ratios", [
    (16, 2, [4, 8, 16], [1, 2, 4]),   # the paper's geometric shape, lengths multiples of w
    (23, 3, [4, 8, 16], [1, 2, 4]),   # a length that is a multiple of no w: padding
    (19, 4, [6, 12, 32], [1, 3, 6]),  # w not a multiple of r, w longer than the sequence
    (17, 5, [5, 10], [2, 3]),         # no r = 1 pattern: some (query, head) pairs are not covered
])
def test_mixture_is_one_softmax_over_the_union_with_multiplicity(n, h, segments, ratios, causal):
    run_both(n, h, segments, ratios, causal)


def test_grouped_query_heads_are_shared():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    out = dilated_attention(q, k, v, [4, 12], [1, 2])
    full = dilated_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), [4, 12], [1, 2])
    torch.testing.assert_close(out, full)


def test_longnet_with_one_full_pattern_is_the_dense_decoder():
    from megalatent.config import ModelConfig
    from megalatent.models.registry import build_model
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16,
                 make_vocab_size_divisible_by=64)
    torch.manual_seed(0)
    dense = build_model(ModelConfig(model_family="gpt", **shape))
    longnet = build_model(ModelConfig(model_family="longnet", segment_lengths=[16], dilated_ratios=[1], **shape))
    longnet.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(longnet(tokens), dense(tokens), atol=1e-5, rtol=1e-5)
    # and with real dilation it is a different (sparser) model that is still causal
    sparse = build_model(ModelConfig(model_family="longnet", segment_lengths=[4, 8, 16], dilated_ratios=[1, 2, 4],
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
    from megalatent.config import ModelConfig
    from megalatent.models.longnet import flops_per_token
    from megalatent.models.registry import build_model
    w, r = [4, 8, 16, 32], [1, 2, 4, 4]  # the last pattern is longer than the sequence: clamped to it
    cfg = ModelConfig(model_family="longnet", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                      seq_length=16, make_vocab_size_divisible_by=64, group_query_attention=True, num_query_groups=2,
                      segment_lengths=w, dilated_ratios=r)
    b, s, heads, d = 2, cfg.seq_length, cfg.num_attention_heads, cfg.head_dim
    torch.manual_seed(0)
    counted = count(build_model(cfg), torch.randint(0, 100, (b, s)))
    assert counted.training == 3 * counted.forward_total
    # Each pattern's scores and values, the only batched products, are computed for every pair of rows a head
    # keeps in a segment (the causal mask is applied to computed scores): per head, the pairs the definition
    # lets a query see without the mask, 2 * 2 * head_dim FLOPs each. The convention (LongNet Eq. 16) counts
    # half of them: w_i / r_i^2 keys per query and head over the mixture, halved for the causal mask.
    pairs = union_multiplicity(s, heads, w, r, causal=False).sum().item()
    attention = counted.op("bmm")
    assert attention == cfg.num_layers * b * pairs * 2 * 2 * d
    assert flops_per_token(cfg) * b * s == 3 * (counted.forward_total - attention / 2)


@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_dilated_attention_equals_single_process(tmp_path, ranks):
    """Every rank (rank 0 and the last included) gets the single-device values and gradients."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from conftest import REPO
    out = tmp_path / "errors.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           os.path.join(REPO, "tests", "dilated_worker.py"), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert {e["rank"] for e in errors} == set(range(ranks))
    if ranks == 2 and os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        assert any(e["case"].endswith("kernel") for e in errors)  # the local patterns ran the Triton kernels too
    for e in errors:
        assert e["out"] < 1e-5, e
        assert max(e["grads"]) < 1e-4, e
    # Patterns longer than a rank's share were gathered, from the segment's ranks only, in the amount
    # the communication formula states.
    from megalatent.nn.dilated import received_rows
    assert any(e["gathered_rows"] > 0 for e in errors)
    for e in errors:
        assert e["gathered_rows"] == received_rows(e["segments"], e["ratios"], e["local"], ranks), e


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
    from megalatent.nn.dilated import received_rows
    w = [2048, 4096, 8192, 16384, 32768]
    r = [1, 2, 4, 8, 16]
    local = 2048
    volumes = [received_rows(w, r, local, cp=n // local) for n in (65536, 131072, 262144, 1048576)]
    assert len(set(volumes)) == 1 and volumes[0] > 0
    assert volumes[0] <= sum(wi // ri for wi, ri in zip(w, r))
    # the paper's schedule (r = 1 2 4 6 12) stays within a constant bound too
    paper = [received_rows(w, [1, 2, 4, 6, 12], local, cp=n // local) for n in (65536, 1048576)]
    assert paper[0] == paper[1]

