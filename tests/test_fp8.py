"""FP8 training (megalatent/distributed/fp8.py, torchao's float8 linears), on CPU where torch._scaled_mm runs:

- a converted linear equals its quantise -> dequantise -> matmul emulation, forward and both gradients, for
  each recipe and format (the emulation is written here from the recipes' definitions, not torchao's code); the
  context-parallel FP8 linear (scales over the cp ranks) over one rank is torchao's, bias gradient included;
- MoE experts in FP8 (each expert's block through the same casts, with its own scales) equal the same emulation,
  and the GPU's grouped-GEMM path pads and lays out the groups so that it computes what the per-expert path does;
- a tiny model (one MoE layer, one dense) trained 50 steps in FP8 stays within 2% of the full-precision loss
  (fp32: the CPU's training precision, as bf16 is a GPU's);
- TP2 + SP (torchao's float8 styles: the all-gathers checked to move FP8), DP2 with FP8 weight all-gathers (their
  scales checked to be precomputed after each optimizer step) and PP2 under FP8 equal one process under FP8; so
  does CP2 under tensorwise (scales over the cp ranks), and under rowwise but for the FP8 layers' weight gradients
  (a few % of FP8's own error: their column scales span this rank's tokens); EP2 with FP8 experts (checked to be
  FP8 by type) equals it under rowwise but for the experts' weight gradients (likewise: an expert's block holds
  both ranks' tokens), and is within FP8's noise of it under tensorwise;
- checkpoints: an FP8 run's (FSDP2 with FP8 all-gathers; EP2 with FP8 experts) loads into a full-precision
  model with the same parameter names, and a full-precision run's (MH-MoE) loads into an FP8 model;
- bad combinations are refused before anything is built, each with its reason.
"""
import dataclasses
import statistics

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8")

from megalatent.config import ConfigError, FP8Config  # noqa: E402
from megalatent.distributed import checkpoint as ckpt  # noqa: E402
from megalatent.distributed.fp8 import convert_to_fp8, float8_linear_config  # noqa: E402
from megalatent.distributed.layout import ParallelLayout  # noqa: E402
from megalatent.families import build_model, parse_args, validate  # noqa: E402
from megalatent.interop.convert import read_state  # noqa: E402
from megalatent.training.optim import build_optimizer  # noqa: E402
from megalatent.training.trainer import Trainer  # noqa: E402

from test_parallel import UNTIED, assert_equivalent, run_worker  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantise_dequantise(t: torch.Tensor, dtype: torch.dtype, rowwise_over: int | None) -> torch.Tensor:
    """t through FP8 and back: scale = max representable / amax (of the whole tensor, or over dimension
    `rowwise_over`, rounded down to a power of two as the rowwise recipe does), round to `dtype`, unscale."""
    amax = t.abs().amax() if rowwise_over is None else t.abs().amax(dim=rowwise_over, keepdim=True)
    scale = torch.finfo(dtype).max / amax.double().clamp(min=1e-12)
    if rowwise_over is not None:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    scale = scale.float()
    return (t * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).float() / scale


def emulated_linear(x, w, grad_out, recipe, fmt):
    """(out, grad_x, grad_w) of y = x w^T with every matmul operand through FP8 as the recipe says: rows of
    the operand read along its rows, columns of the one read along its columns (rowwise), or whole tensors."""
    rowwise = recipe == "rowwise"
    grad_dtype = E5M2 if fmt == "hybrid" else E4M3

    def q(t, dtype, over):
        return quantise_dequantise(t, dtype, over if rowwise else None)

    # Rowwise products come back in bf16 (torch._scaled_mm has no fp32 output for them; torchao rounds).
    rounded = (lambda t: t.to(torch.bfloat16).float()) if rowwise else (lambda t: t)
    out = rounded(q(x, E4M3, -1) @ q(w.t(), E4M3, 0))  # sums over the input features
    grad_x = rounded(q(grad_out, grad_dtype, -1) @ q(w.t(), E4M3, -1).t())  # over the output features
    grad_w = rounded(q(grad_out, grad_dtype, 0).t() @ q(x, E4M3, 0))  # over the tokens
    return out, grad_x, grad_w


# On a GPU (the acceptance run) the same test runs torchao on the FP8 tensor cores.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_fp8_linear_equals_its_emulation(recipe, fmt):
    from torchao.float8 import convert_to_float8_training

    g = torch.Generator().manual_seed(0)
    # Columns of very different size make rowwise and tensorwise scales (and the formats) disagree visibly.
    x = (torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 96)).to(DEVICE)
    grad_out = (torch.randn(64, 48, generator=g) * torch.logspace(1, -2, 48)).to(DEVICE)
    linear = nn.Sequential(nn.Linear(96, 48, bias=False)).to(DEVICE)
    with torch.no_grad():
        linear[0].weight.copy_(torch.randn(48, 96, generator=g) * torch.logspace(0, -2, 48)[:, None])
    w = linear[0].weight.detach().clone()
    convert_to_float8_training(linear, config=float8_linear_config(FP8Config(fp8_format=fmt, fp8_recipe=recipe)))
    assert type(linear[0]).__name__ == "Float8Linear"
    x.requires_grad_()
    out = linear(x)
    out.backward(grad_out)

    expected = emulated_linear(x.detach(), w, grad_out, recipe, fmt)
    for name, got, want in zip(["output", "input gradient", "weight gradient"],
                               [out.detach(), x.grad, linear[0].weight.grad], expected):
        # Equal up to the order of the fp32 sums (CPU: ~1e-7; the tensor cores' FP8 accumulation keeps fewer
        # bits); FP8 itself is 3.6e-2 away from the fp32 product, the other format 6e-2 from this one.
        error = ((got - want).norm() / want.norm()).item()
        assert error < (1e-6 if DEVICE == "cpu" else 2e-3), \
            f"{recipe} {fmt}: {name} differs from its emulation by {error:.2e} (relative norm)"


def test_a_context_parallel_fp8_linear_over_one_rank_is_torchaos(tmp_path):
    """fp8_context_parallel.ContextParallelFloat8Linear, whose input and output-gradient scales are amaxes
    all-reduced over a mesh, over a mesh of one rank is torchao's Float8Linear (tensorwise, both formats): the same
    output and input, weight and bias gradients, bit for bit; the bias's gradient summed from the high-precision
    output gradient, as Float8Linear's (cast before the bias, it would differ). Its equality with one process over
    the context-parallel ranks: test_layouts_under_fp8_equal_one_process."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchao.float8 import convert_to_float8_training

    from megalatent.distributed.fp8_context_parallel import reduce_scales_over

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g) * torch.logspace(-2, 1, 64)
    grad_out = torch.randn(32, 48, generator=g) * torch.logspace(1, -2, 48)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
        for fmt in ("e4m3", "hybrid"):
            plain = nn.Sequential(nn.Linear(64, 48))
            convert_to_float8_training(plain, config=float8_linear_config(FP8Config(fp8_format=fmt)))
            over = copy.deepcopy(plain)
            reduce_scales_over([over[0]], mesh)
            assert type(over[0]).__name__ == "ContextParallelFloat8Linear"
            results = []
            for model in (plain, over):
                xi = x.clone().requires_grad_()
                out = model(xi)
                out.backward(grad_out)
                results.append((out.detach(), xi.grad, model[0].weight.grad, model[0].bias.grad))
            for name, a, b in zip(["output", "input gradient", "weight gradient", "bias gradient"], *results):
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{fmt}: {name}")
    finally:
        dist.destroy_process_group()


# Experts 0..3: the second gets no token, blocks are not multiples of 16, and weights and tokens differ in size
# by 10^5 between experts, so that scales shared by the experts would flush the small one's values to FP8's
# subnormals (tensorwise) or zero (rowwise's weight columns) and differ from per-expert scales visibly.
COUNTS, SIZES = [40, 0, 23, 9], [1.0, 1.0, 30.0, 3e-4]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_fp8_experts_equal_their_emulation(recipe, fmt):
    """MoE experts in FP8 (fp8.Float8GroupedMM, the experts' grouped matmul): each expert's block of tokens times
    its weight equals the emulation above with that expert's own scales, in the output and both gradients (on a
    GPU, rowwise e4m3 runs torchao's FP8 grouped GEMM); the same emulation with scales shared by all experts
    does not."""
    from megalatent.distributed.fp8 import Float8GroupedMM

    g = torch.Generator().manual_seed(0)
    counts, sizes = torch.tensor(COUNTS), torch.tensor(SIZES)
    rows = sizes.repeat_interleave(counts)[:, None]
    x = (torch.randn(sum(COUNTS), 32, generator=g) * torch.logspace(-2, 1, 32) * rows).to(DEVICE)
    grad_out = (torch.randn(sum(COUNTS), 48, generator=g) * torch.logspace(1, -2, 48) * rows).to(DEVICE)
    w = (torch.randn(4, 32, 48, generator=g) * torch.logspace(0, -2, 48) * sizes[:, None, None]).to(DEVICE)
    mm = Float8GroupedMM(float8_linear_config(FP8Config(fp8_format=fmt, fp8_recipe=recipe)))
    x.requires_grad_(), w.requires_grad_()
    out = mm(x, w, counts.to(DEVICE))
    out.backward(grad_out)

    expected_out, expected_grad_x, expected_grad_w = [], [], torch.zeros_like(w)
    for e, (xe, ge) in enumerate(zip(x.detach().split(COUNTS), grad_out.split(COUNTS))):
        if COUNTS[e]:
            o, gx, gw = emulated_linear(xe, w[e].detach().t(), ge, recipe, fmt)
            expected_out.append(o), expected_grad_x.append(gx)
            expected_grad_w[e] = gw.t()
    expected = [torch.cat(expected_out), torch.cat(expected_grad_x), expected_grad_w]
    for name, got, want in zip(["output", "input gradient", "weight gradient"], [out.detach(), x.grad, w.grad],
                               expected):
        for e in (0, 2, 3):  # (relative to each expert's own size)
            part = (lambda t: t[e]) if name == "weight gradient" else (lambda t: t.split(COUNTS)[e])
            error = ((part(got) - part(want)).norm() / part(want).norm()).item()
            assert error < (1e-6 if DEVICE == "cpu" else 2e-3), \
                f"{recipe} {fmt}: expert {e}'s {name} differs from its emulation by {error:.2e} (relative norm)"
    assert not w.grad[1].any()  # (the expert without tokens)

    # Scales shared by the experts (over the stacked weights and all tokens) give another output.
    rowwise = recipe == "rowwise"
    shared_x = quantise_dequantise(x.detach(), E4M3, -1 if rowwise else None)
    shared_w = quantise_dequantise(w.detach(), E4M3, (0, 1) if rowwise else None)
    shared = torch.cat([xe @ shared_w[e] for e, xe in enumerate(shared_x.split(COUNTS))])
    small = slice(sum(COUNTS[:3]), None)
    assert ((shared[small] - out[small]).norm() / out[small].norm()).item() > 1e-2


def test_the_grouped_gemm_path_pads_groups_and_equals_the_per_expert_path():
    """A GPU's path for rowwise e4m3 (torchao's FP8 grouped GEMM, CUDA-only) takes groups of rows that are multiples of
    16 and column-major weights. fp8.padded_grouped_mm's padding, offsets and layout, checked here with the grouped
    GEMM stood in by the per-expert path on each padded group (the same rowwise numerics: zero rows change no
    amax), give the per-expert path's output and gradients."""
    from megalatent.distributed.fp8 import Float8GroupedMM, float8_mm_per_expert, padded_grouped_mm

    mm = Float8GroupedMM(float8_linear_config(FP8Config(fp8_format="e4m3", fp8_recipe="rowwise")))
    assert mm.rowwise_e4m3 and not Float8GroupedMM(float8_linear_config(FP8Config(fp8_format="hybrid"))).rowwise_e4m3

    def grouped_gemm(a, b_t, offs):
        sizes = offs.diff(prepend=offs.new_zeros(1))
        assert offs.dtype == torch.int32 and int(offs[-1]) == a.shape[0] and a.stride(-1) == 1 and b_t.stride(-2) == 1
        assert (sizes % 16 == 0).all() and (sizes > 0).all(), sizes
        return float8_mm_per_expert(a, b_t, sizes, mm.mm_config, mm.config).to(torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(COUNTS)
    # (bf16 inputs, as the GPU path takes: its products, and so its output gradients, are bf16)
    x = torch.randn(sum(COUNTS), 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(4, 32, 48, generator=g, requires_grad=True)
    grad_out = torch.randn(sum(COUNTS), 48, generator=g).bfloat16()
    results = []
    for run in (lambda: padded_grouped_mm(x, w, counts, grouped_gemm), lambda: mm(x, w, counts)):
        x.grad = w.grad = None
        out = run()
        out.backward(grad_out)
        results.append((out.detach(), x.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def _synthetic_batch(n, seq, vocab, g):
    """Token walks t[i+1] = t[i] + {1, 2, 3} mod V: learnable, so the loss falls within a few dozen steps."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, seq), generator=g)
    tokens = (torch.cat([start, steps], 1).cumsum(1) % vocab)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(n, seq),
            "position_ids": torch.arange(seq).expand(n, seq)}


def _train(flags, steps=50):
    """The losses of `steps` steps of a tiny model whose first layer is MoE (4 experts, top-2) and second dense, and
    the names of the modules made FP8."""
    cfg = parse_args(["--vocab-size", "128", "--make-vocab-size-divisible-by", "16", "--num-layers", "2",
                      "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size",
                      "8", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "5", "--num-experts", "4",
                      "--moe-layer-freq", "2", "--train-iters", str(steps)] + flags)
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    converted = convert_to_fp8(model, cfg.fp8, [], tp=1) if cfg.fp8.fp8_format is not None else []
    trainer = Trainer(cfg, ParallelLayout(world_size=1), torch.device("cpu"), model, None, None, 1.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step([_synthetic_batch(8, 32, 128, g)])[0])
        trainer.iteration += 1
    return losses, converted


def test_fifty_fp8_steps_stay_within_two_percent_of_full_precision():
    """(Measured: within 0.2% at every step.)"""
    full, _ = _train([])
    fp8, converted = _train(["--fp8-format", "hybrid"])
    assert {"layers.0.mlp.experts", "layers.1.mlp.down_proj"} <= set(converted)  # FP8 experts and dense MLP
    assert full[-1] < full[0] - 1.0, full  # it learns, so the comparison means something
    for step, (a, b) in enumerate(zip(full, fp8)):
        assert abs(b - a) <= 0.02 * a, f"step {step}: fp32 {a:.4f}, FP8 {b:.4f}"


FP8 = {"fp8-format": "hybrid", "steps": 2}


def assert_tp_equivalent(result, reference, full_precision, label):
    """Tensor parallelism sums partial products in another order (row-parallel layers, SP's reduce-scatter), so
    fp32 results differ by ~1e-7, and the few values that sit on an FP8 rounding boundary round the other way:
    one FP8 step (2^-3 or 2^-2 of that value, more below e5m2's normal range) in a few elements, which reaches
    the gradients upstream of it. Compared after one step: the loss as closely as ever; the typical gradient as
    fp32 does (median error below 1e-5 of its norm; measured ~3e-7); and every gradient well inside FP8's own
    error, the distance between the one-process FP8 and full-precision gradients (~0.1 of the norm): measured,
    TP2 without SP <= 5% of it, with SP flips in layer 0's attention and layer 1's MLP at <= 13% and every
    other layer at ~1e-7. An FP8 bug, e.g. one rank's scale instead of the tensor's, is FP8 error of its own
    in every layer. After further steps AdamW's normalised update turns the flips' differences in near-zero
    gradients into weight differences of ~lr, which the next step's FP8 casts amplify."""
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), label

    def error(grads, name):
        return ((grads[name] - reference["grads"][name]).norm() / reference["grads"][name].norm()).item()

    errors = {name: error(result["grads"], name) for name in reference["grads"]}
    assert statistics.median(errors.values()) < 1e-5, f"{label}: gradients differ: {errors}"
    for name, e in errors.items():
        fp8_error = error(full_precision["grads"], name)
        assert e < 0.25 * fp8_error, f"{label}: grad {name} differs by {e:.2e} of its norm (FP8's own: {fp8_error:.2e})"


def assert_within_fp8_noise(result, reference, full_precision, label):
    """Each rank quantising a different set of tokens than one process (expert parallelism under tensorwise: see
    assert_ep_equivalent) changes every cast a little, all through the model: the gradients differ from one-process
    FP8 by up to about as much as FP8 differs from full precision, while a layout bug costs O(1)."""
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-4), label
    for name, g in reference["grads"].items():
        error = ((result["grads"][name] - g).norm() / g.norm()).item()
        fp8_error = ((full_precision["grads"][name] - g).norm() / g.norm()).item()
        assert error < 2 * fp8_error, f"{label}: grad {name} differs by {error:.2e} (FP8's own: {fp8_error:.2e})"


def assert_cp_equivalent(result, reference, label):
    """Context parallelism under the tensorwise recipe: every FP8 linear layer is a ContextParallelFloat8Linear,
    whose input and output-gradient scales come from amaxes all-reduced over the cp ranks (fp8_context_parallel.py),
    so every cast is one process's and CP2 equals one process under FP8 as any layout does without FP8 (measured:
    loss equal, gradients within 2e-7 of their norm; with each rank's own amax, as torchao alone casts, they
    differed by 0.6-1.3 times FP8's own error, up to 0.12 of the gradient's norm: this fails then)."""
    assert {"ContextParallelFloat8Linear"} <= set(result["module_types"]), label
    assert "Float8Linear" not in result["module_types"], label  # every FP8 linear layer scales over cp
    assert_equivalent(result, reference, label)


def fp8_weights(grads) -> set[str]:
    """The weights of the FP8 layers (linear projections, experts) of the test models: not norms, embeddings,
    biases or routers."""
    return {name for name in grads if name.endswith("_proj.weight") or ".experts." in name}


def assert_rowwise_cp_equivalent(result, reference, full_precision, label):
    """Context parallelism under the rowwise recipe (MH-MoE layers: FP8 experts too). Rowwise scales are per token
    row in the output and input-gradient products, so the loss and every activation's gradient, and with them every
    gradient but the FP8 layers' weight gradients, are one process's; a weight gradient's operands are scaled per
    column over the tokens it sums, which are this rank's (torchao computes those scales in its matmul's backward,
    without a hook to reduce them; an expert's block holds this rank's tokens): those differ by a few percent of
    FP8's own error (measured 0.8-4%: 2.3e-3 of the gradient's norm)."""
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label
    weights = fp8_weights(reference["grads"])
    for name, g in reference["grads"].items():
        if name not in weights:
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{label}: {name}")
            continue
        error = ((result["grads"][name] - g).norm() / g.norm()).item()
        fp8_error = ((full_precision["grads"][name] - g).norm() / g.norm()).item()
        assert error < 0.1 * fp8_error, f"{label}: grad {name} differs by {error:.2e} (FP8's own: {fp8_error:.2e})"


MOE = {"num-experts": 4, "moe-num-heads": 2}  # MH-MoE layers: FP8 head/merge projections and experts
ROWWISE_MOE = {**MOE, "fp8-format": "e4m3", "fp8-recipe": "rowwise", "steps": 1}
TENSORWISE_MOE = {**MOE, **FP8, "steps": 1}


def assert_ep_equivalent(result, reference, full_precision, label):
    """Expert parallelism under FP8. Each expert quantises the block of rows it computes on (fp8.Float8GroupedMM),
    and at EP2 that block holds the tokens of both ranks' micro-batches, where one process sees one micro-batch's:
    the rowwise recipe scales rows (tokens) and each expert's weight columns alike at any layout, so the loss and
    every gradient but the experts' weight gradients (whose column scales span the block's tokens) are one
    process's, and those differ by a few percent of FP8's own error (measured 1.3-1.4%: 2.4e-3 of the gradient's
    norm, FP8's own 0.18-0.29 after one step from initialisation); under tensorwise every expert block's scale is its
    amax over the two micro-batches, and the gradients all through the model differ from one process's by less
    than FP8's own error (measured 0.02 to 0.7 of it), as under context parallelism."""
    if full_precision is None:  # rowwise
        experts = {n for n in reference["grads"] if ".experts." in n}
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label
        for name, g in reference["grads"].items():
            if name not in experts:
                torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{label}: {name}")
        return experts
    assert_within_fp8_noise(result, reference, full_precision, label)
    return set()


def test_layouts_under_fp8_equal_one_process(tmp_path):
    """TP2+SP (torchao's float8 styles: FP8 all-gathers), DP2 with FP8 all-gathers (scales precomputed after each
    optimizer step), PP2, CP2 (tensorwise: scales over the cp ranks; and rowwise) and EP2 (MH-MoE layers, FP8
    experts) against one process under FP8. Tensorwise scales are amaxes over the whole tensor, which torchao
    takes over every shard (DTensors, FSDP's all-gather) and ContextParallelFloat8Linear over the cp ranks, so
    each layout quantises as one process does. Data and pipeline parallelism change no sum: equal after two steps
    (the second on updated weights, all-gathered in FP8) as any layout is. Tensor parallelism: see
    assert_tp_equivalent; context parallelism: assert_cp_equivalent, assert_rowwise_cp_equivalent; expert
    parallelism: assert_ep_equivalent."""
    tp = {**FP8, "steps": 1}
    tied, untied, tied_one_step, full_one_step, rowwise_moe, tensorwise_moe, full_moe = run_worker(
        tmp_path, 1, [FP8, {**FP8, **UNTIED}, tp, {"steps": 1}, ROWWISE_MOE, TENSORWISE_MOE, {**MOE, "steps": 1}],
        "fp8-ref")
    saved, saved_moe = str(tmp_path / "fp8-dp2"), str(tmp_path / "fp8-ep2")
    layouts = [{**tp, "tensor-model-parallel-size": 2, "sequence-parallel": True, "record-collectives": True},
               {**FP8, "fp8-param-gather": True, "save": saved, "record-collectives": True},
               {**FP8, **UNTIED, "pipeline-model-parallel-size": 2},
               {**tp, "context-parallel-size": 2},
               {**ROWWISE_MOE, "context-parallel-size": 2},
               {**ROWWISE_MOE, "expert-model-parallel-size": 2, "save": saved_moe},
               {**TENSORWISE_MOE, "expert-model-parallel-size": 2}]
    tp_result, dp_result, pp_result, cp_result, cp_rowwise, ep_rowwise, ep_tensorwise = run_worker(
        tmp_path, 2, layouts, "fp8-two")
    assert_tp_equivalent(tp_result, tied_one_step, full_one_step, "TP2+SP")
    _tp_all_gathers_are_fp8(tp_result)
    assert_cp_equivalent(cp_result, tied_one_step, "CP2")
    assert_rowwise_cp_equivalent(cp_rowwise, rowwise_moe, full_moe, "CP2 (MH-MoE), rowwise")
    # The experts are FP8 (Float8GroupedMM) in every FP8 MoE run here, and in the rowwise EP2 run's expert gradients
    # FP8's own error is ~70x what the layout changes.
    for result in (rowwise_moe, tensorwise_moe, cp_rowwise, ep_rowwise, ep_tensorwise):
        assert {"Float8GroupedMM", "Float8Linear"} <= set(result["module_types"])
    assert "Float8GroupedMM" not in full_moe["module_types"]
    for name in assert_ep_equivalent(ep_rowwise, rowwise_moe, None, "EP2 (MH-MoE), rowwise"):
        def error(grads):
            return ((grads[name] - rowwise_moe["grads"][name]).norm() / rowwise_moe["grads"][name].norm()).item()
        assert error(ep_rowwise["grads"]) < 0.05 * error(full_moe["grads"]), (name, error(ep_rowwise["grads"]))
    assert_ep_equivalent(ep_tensorwise, tensorwise_moe, full_moe, "EP2 (MH-MoE), tensorwise")
    assert_equivalent(dp_result, tied, "DP2 with FP8 all-gathers")
    assert "WeightWithDynamicFloat8CastTensor" in dp_result["local_tensor_types"]  # (FSDP2 gathers these in FP8)
    _fsdp_scales_were_precomputed(dp_result)
    assert_equivalent(pp_result, untied, "PP2")
    _fp8_checkpoint_loads_without_fp8(ckpt.iteration_dir(saved, 2), dp_result["weights"])
    _fp8_checkpoint_loads_without_fp8(ckpt.iteration_dir(saved_moe, 1), ep_rowwise["weights"],
                                      ["--num-experts", "4", "--moe-num-heads", "2"])


def _tp_all_gathers_are_fp8(result):
    """TP2+SP with torchao's float8 styles (tensor_parallel.float8_styles) all-gathers in FP8. A step's all-gathers
    (4 micro-batches of [2, 16, 64] activations): those of the attention and MLP blocks' inputs (forward) and of the
    row-parallel layers' output gradients (backward), 4 per layer and micro-batch, move one byte per value, cast
    before the gather; the head's input and the embedding's output gradient (not FP8 layers) four, fp32's. Without
    the styles (the layers cast after the all-gathers) every one moves four: measured 589,824 bytes a step, with
    them 196,608 (the planner's recorder, which counts an FP8 tensor's all-gather as its 1-byte data)."""
    values = 2 * 16 * 64  # [micro-batch, sequence, hidden]
    all_gathers = [nbytes for kind, _, nbytes, _ in result["collectives"] if kind == "all_gather"]
    assert sorted(all_gathers) == [values] * (4 * 4 * 4) + [4 * values] * (2 * 4), all_gathers


def _fsdp_scales_were_precomputed(result):
    """DP2 with --fp8-param-gather: after each optimizer step the PrecomputeFloat8Scales hook set every FP8-gathered
    weight's scale (torchao's precompute_float8_dynamic_scale_for_fsdp), equal to the amax-derived scale of the
    whole updated weight (the one the all-gather would compute), and the last step's FP8 all-gathers used them: FSDP
    issued no amax all-reduce (the first step, before any update, issues one per weight and all-gather)."""
    scales = result["precomputed_scales"]
    assert set(scales) == fp8_weights(result["weights"]) and len(scales) == 28
    for name, scale in scales.items():
        amax = result["weights"][name].abs().max().double()
        assert scale == (torch.finfo(E4M3).max / amax).float(), name
    assert not [c for c in result["collectives"] if c[0] == "all_reduce" and c[3]]  # (FSDP's, fsdp=True)


def _fp8_checkpoint_loads_without_fp8(path, weights, flags=()):
    """An FP8 run's checkpoint (DP2 with FP8 all-gathers, saved through FSDP2 with its weights wrapped for the FP8
    all-gather; EP2 with FP8 experts, sharded over the expert-parallel ranks): the names are a full-precision
    model's, and its weights and optimizer state load into one."""
    from parallel_worker import MODEL
    cfg = parse_args(MODEL + list(flags))
    model = build_model(cfg.model)
    assert set(read_state(path, keys=["model"])["model"]) == set(model.state_dict())
    optimizer = build_optimizer(model, cfg.training)
    ckpt.load_checkpoint(path, [model], [optimizer], load_rng=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=0, msg=name)


def test_full_precision_checkpoint_loads_into_an_fp8_model():
    """A checkpoint a full-precision run wrote (a fixture of tests/test_checkpoint_compat.py: MH-MoE layers,
    GQA) loads into the model converted to FP8 (its experts included), weights and AdamW state by name."""
    from test_checkpoint_compat import FIXTURES, flags_of
    path = ckpt.iteration_dir(f"{FIXTURES}/gpt_moe/run", 2)
    cfg = parse_args(flags_of("gpt_moe") + ["--vocab-size", "512", "--fp8-format", "hybrid"])
    model = build_model(cfg.model)
    assert any(name.endswith(".experts") for name in convert_to_fp8(model, cfg.fp8, [], tp=1))  # FP8 experts too
    optimizer = build_optimizer(model, cfg.training)
    model(torch.zeros(1, 16, dtype=torch.long)).sum().backward()  # the optimizer's state exists once it stepped
    optimizer.step()
    ckpt.load_checkpoint(path, [model], [optimizer], load_rng=False)
    saved = read_state(path)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), saved["model"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], saved["optim"][f"state.{name}.exp_avg"],
                                   rtol=0, atol=0)


BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--vocab-size", "256", "--micro-batch-size", "2", "--global-batch-size", "8"]


def _errors(flags, world_size=1):
    with pytest.raises(ConfigError) as e:
        validate(parse_args(BASE + flags), world_size=world_size)
    return str(e.value)


@pytest.mark.parametrize("flags, world_size, expected", [
    (["--hidden-size", "72", "--num-attention-heads", "4"], 1, "--hidden-size 72 must be a multiple of 16"),
    (["--ffn-hidden-size", "200"], 1, "--ffn-hidden-size (the MLP width) 200 must be a multiple of 16"),
    (["--hidden-size", "80", "--tensor-model-parallel-size", "2"], 2,
     "--hidden-size 80 must be a multiple of 32 (FP8 matmuls need every dimension a multiple of 16 on each of the"),
    (["--seq-length", "20", "--micro-batch-size", "1", "--global-batch-size", "4"], 1,
     "a micro-batch holds 20 tokens per rank"),
    (["--fp8-recipe", "rowwise", "--fp8-param-gather"], 1, "--fp8-param-gather needs --fp8-recipe tensorwise"),
    (["--linear-impl", "bitlinear"], 1, "linear layers are BitLinear"),
    (["--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2", "--num-layers-at-end-in-bf16", "2"], 1,
     "leave some of the 4 layers in FP8"),
])
def test_bad_fp8_combinations_are_refused(flags, world_size, expected):
    assert expected in _errors(["--fp8-format", "hybrid"] + flags, world_size)


def test_fp8_flags_without_a_format_are_refused():
    assert "--fp8-param-gather configures FP8 training: add --fp8-format" in _errors(["--fp8-param-gather"])


def test_a_gpu_without_fp8_tensor_cores_needs_the_emulation_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "NVIDIA A100 (compute capability 8.0) has no FP8 tensor cores" in _errors(["--fp8-format", "e4m3"])
    validate(parse_args(BASE + ["--fp8-format", "e4m3", "--fp8-emulate"]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    validate(parse_args(BASE + ["--fp8-format", "e4m3"]))


def test_what_is_converted_and_what_is_kept():
    """The blocks' projections and MoE experts become FP8; the head, embedding, routers and norms do not; MH-MoE's
    head/merge projections do; --first-last-layers-bf16 keeps the outer layers; experts whose widths are not
    multiples of 16, and ternary (BitLinear) experts, are kept."""
    from megalatent.distributed.fp8 import Float8GroupedMM, select_modules

    cfg = parse_args(BASE + ["--fp8-format", "hybrid", "--num-experts", "4", "--moe-num-heads", "2",
                             "--moe-router-type", "xmoe", "--moe-layer-freq", "2"])
    model = build_model(cfg.model)
    converted = set(convert_to_fp8(model, cfg.fp8, [], tp=1))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    experts = {f"layers.{i}.mlp.experts" for i in (0, 2)}
    assert converted == linears - {f"layers.{i}.mlp.router.proj" for i in (0, 2)} | experts
    assert "layers.0.mlp.head_proj" in converted and "layers.1.mlp.down_proj" in converted
    assert all(type(m).__name__ == "Float8Linear" for n, m in model.named_modules() if n in converted - experts)
    assert all(isinstance(model.get_submodule(n).matmul, Float8GroupedMM) for n in experts)
    fp8 = dataclasses.replace(cfg.fp8, first_last_layers_bf16=True)
    outer_model = build_model(cfg.model)
    outer = set(convert_to_fp8(outer_model, fp8, [], tp=1))
    assert outer == {n for n in converted if n.startswith(("layers.1.", "layers.2."))}
    assert outer_model.get_submodule("layers.0.mlp.experts").matmul is None

    narrow = parse_args(BASE + ["--num-experts", "4", "--moe-ffn-hidden-size", "40"])
    _, kept = select_modules(build_model(narrow.model), [], cfg.fp8, tp=1)
    assert kept["layers.0.mlp.experts"] == "experts 64->40->64 not multiples of 16"
    ternary = parse_args(BASE + ["--num-experts", "4", "--linear-impl", "bitlinear"])
    _, kept = select_modules(build_model(ternary.model), [], cfg.fp8, tp=1)
    assert kept["layers.0.mlp.experts"] == "ternary experts" and kept["layers.0.attention.q_proj"] == "BitLinear"
