"""--compile (megalatent/distributed/compile.py): each block compiled equals eager, over 5 training steps, for the
baseline, a LongNet with MoE layers (LongNet's and the MoE's blocks in one model) and the baseline under FP8,
at one rank and at TP2 x DP2 (FSDP2); and a dense decoder block compiles to one graph, without breaks.

The compiled runs use the aot_eager backend (--compile-backend): dynamo's capture and AOTAutograd's joint
graph, which is where regional compilation meets DTensor plans, FSDP2's hooks, recomputation and our blocks'
code, run by eager kernels. Inductor's C++ code generation for these blocks costs ~35 CPU-seconds per model
on CPU, beyond this suite's budget; the CPU benchmark (benchmarks/README.md) and the GPU acceptance run
train with inductor and record its losses beside eager's.
"""
import pytest

from test_parallel import assert_equivalent, run_worker

STEPS = {"steps": 5}
GPT = {}
LONGNET_MOE = {"model-family": "longnet", "segment-lengths": [8, 16], "dilated-ratios": [1, 2],
               "num-experts": 4}
FP8 = {"fp8-format": "hybrid"}
COMPILED = {"compile": True, "compile-backend": "aot_eager"}
MODELS = {"baseline": GPT, "LongNet + MoE": LONGNET_MOE, "baseline FP8": FP8}


def assert_compiled_equals_eager(result, reference, label):
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label  # every one of the 5 steps
    assert_equivalent(result, reference, label)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """{model: (eager run, compiled run)} at one rank, from one launch."""
    layouts = [{**STEPS, **m} for m in MODELS.values()] + [{**STEPS, **COMPILED, **m} for m in MODELS.values()]
    runs = run_worker(tmp_path_factory.mktemp("one-rank"), 1, layouts, "one-rank")
    return dict(zip(MODELS, zip(runs[:len(MODELS)], runs[len(MODELS):])))


def test_compiled_blocks_equal_eager_on_one_rank(one_rank):
    for name, (eager, compiled) in one_rank.items():
        assert_compiled_equals_eager(compiled, eager, f"{name}, compiled")


def test_compiled_blocks_equal_eager_at_tp2_dp2(tmp_path, one_rank):
    names = ["baseline", "LongNet + MoE"]
    layouts = [{**STEPS, **COMPILED, **MODELS[name], "tensor-model-parallel-size": 2} for name in names]
    for name, result in zip(names, run_worker(tmp_path, 4, layouts, "compiled-tp2-dp2")):
        assert_compiled_equals_eager(result, one_rank[name][0], f"{name}, compiled, TP2 x DP2")


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
