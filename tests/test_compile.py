"""--compile (megalatent/distributed/compile.py): each block compiled equals eager, over 5 training steps, for the
baseline, a LongNet with MoE layers (LongNet's and the MoE's blocks in one model) and the baseline under FP8 with
every second layer MoE (FP8 linears and FP8 experts),
at one rank (the baseline also with selective recomputation), at TP2 x DP2 (FSDP2; the baseline with sequence
parallelism) and for the baseline at PP2 x TP2; a dense decoder block compiles to one graph, without breaks;
and the one combination torch cannot compile (TP with recomputation) is refused before anything starts.

The compiled runs use the aot_eager backend (--compile-backend): dynamo's capture and AOTAutograd's joint
graph, which is where regional compilation meets DTensor plans, FSDP2's hooks, recomputation and our blocks'
code, run by eager kernels. Inductor's C++ code generation for these blocks costs ~35 CPU-seconds per model
on CPU, beyond this suite's budget; the CPU benchmark (benchmarks/README.md) and the GPU acceptance run
train with inductor and record its losses beside eager's.
"""
import pytest

from test_parallel import UNTIED, assert_equivalent, run_worker

STEPS = {"steps": 5}
GPT = {}
LONGNET_MOE = {"model-family": "longnet", "segment-lengths": [8, 16], "dilated-ratios": [1, 2],
               "num-experts": 4}
FP8_MOE = {"fp8-format": "hybrid", "num-experts": 4, "moe-layer-freq": 2}  # FP8 linears and FP8 experts
COMPILED = {"compile": True, "compile-backend": "aot_eager"}
MODELS = {"baseline": GPT, "LongNet + MoE": LONGNET_MOE, "baseline FP8 + MoE": FP8_MOE}
EAGER_ONLY = {"baseline untied": UNTIED}  # the pipeline's reference
RECOMPUTED = {"baseline recomputed": ("baseline", {"recompute-granularity": "selective"})}  # compiled only


def assert_compiled_equals_eager(result, reference, label):
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label  # every one of the 5 steps
    assert_equivalent(result, reference, label)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """{name: (eager run or None, compiled run or None)} at one rank, from one launch."""
    eager = {**MODELS, **EAGER_ONLY}
    compiled = {**MODELS, **{name: {**MODELS[base], **extra} for name, (base, extra) in RECOMPUTED.items()}}
    layouts = [{**STEPS, **m} for m in eager.values()] + [{**STEPS, **COMPILED, **m} for m in compiled.values()]
    runs = run_worker(tmp_path_factory.mktemp("one-rank"), 1, layouts, "one-rank")
    eager_runs, compiled_runs = dict(zip(eager, runs)), dict(zip(compiled, runs[len(eager):]))
    return {name: (eager_runs.get(name), compiled_runs.get(name)) for name in {**eager, **compiled}}


def test_compiled_blocks_equal_eager_on_one_rank(one_rank):
    for name in MODELS:
        eager, compiled = one_rank[name]
        assert_compiled_equals_eager(compiled, eager, f"{name}, compiled")
    for name, (base, _) in RECOMPUTED.items():
        assert_compiled_equals_eager(one_rank[name][1], one_rank[base][0], f"{name}, compiled")


def test_compiled_blocks_equal_eager_at_tp2_dp2_and_pp2_tp2(tmp_path, one_rank):
    tp2 = {**STEPS, **COMPILED, "tensor-model-parallel-size": 2}
    cases = {"baseline, TP2+SP x DP2": ("baseline", {**tp2, "sequence-parallel": True}),
             "LongNet + MoE, TP2 x DP2": ("LongNet + MoE", {**tp2, **LONGNET_MOE}),
             "baseline, PP2 x TP2": ("baseline untied", {**tp2, **UNTIED, "pipeline-model-parallel-size": 2})}
    results = run_worker(tmp_path, 4, [layout for _, layout in cases.values()], "compiled-4-ranks")
    for (label, (reference, _)), result in zip(cases.items(), results):
        assert_compiled_equals_eager(result, one_rank[reference][0], f"compiled, {label}")


@pytest.mark.parametrize("flags", [[], ["--fp8-format", "hybrid"]], ids=["bf16", "fp8"])
def test_a_dense_decoder_block_compiles_without_graph_breaks(flags):
    import torch
    from megalatent.distributed.compile import compile_blocks, graph_breaks
    from megalatent.distributed.fp8 import convert_to_fp8
    from megalatent.families import build_model, parse_args

    cfg = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--vocab-size",
                      "128"] + flags)
    model = build_model(cfg.model)
    if cfg.fp8.fp8_format is not None:
        convert_to_fp8(model, cfg.fp8, [], tp=1)
    compile_blocks(model, backend="eager")  # capture only: breaks are decided there
    tokens = torch.randint(0, 128, (2, 32))
    graphs, breaks = graph_breaks(lambda: model(tokens).sum().backward())
    assert breaks == {} and graphs == 1, breaks


def test_compile_with_tensor_parallelism_and_recomputation_is_refused():
    from megalatent.config import ConfigError
    from megalatent.families import parse_args, validate

    with pytest.raises(ConfigError, match="torch 2.13 cannot compile a recomputed block that holds tensor-parallel"):
        validate(parse_args(["--compile", "--tensor-model-parallel-size", "2", "--recompute-granularity", "full"]),
                 world_size=2)
