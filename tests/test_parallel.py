"""Every parallel layout against the single-process run: losses, grad norms, gathered gradients and
weights after several optimizer steps (gloo, CPU, tiny model). One launch runs several layouts."""
import json
import os

import pytest
import torch

from conftest import REPO
from launcher import launch

WORKER = os.path.join(REPO, "tests", "parallel_worker.py")
UNTIED = {"untie-embeddings-and-output-weights": True}  # pipeline parallelism needs an untied head


def run_worker(tmp_path, nproc, layouts, name, worker=WORKER):
    out = str(tmp_path / f"{name}.pt")
    proc = launch([worker, out] + [json.dumps(layout) for layout in layouts], nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


RECOMPUTE = [{"recompute-granularity": "full"}, {"recompute-granularity": "selective"}]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Single-process results, from one launch: the tied model and the untied one (the references), and the
    tied one with each kind of activation recomputation."""
    return run_worker(tmp_path_factory.mktemp("ref"), 1, [{}, UNTIED] + RECOMPUTE, "ref")


@pytest.fixture(scope="module")
def reference(single_process):
    tied, untied = single_process[:2]
    return lambda layout: untied if layout.get("untie-embeddings-and-output-weights") else tied


def assert_equivalent(result, reference, label):
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), label
    assert result["grads"].keys() == reference["grads"].keys(), label
    for name, g in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{label}: grad {name}")
    # Adam turns tiny gradient differences of near-zero entries into differences of up to ~lr; the
    # worker's --adam-eps 1e-6 damps that, and the weights after the steps are compared at a tolerance
    # well below one step (lr = 1e-3).
    for name, w in reference["weights"].items():
        torch.testing.assert_close(result["weights"][name], w, rtol=1e-4, atol=1e-5, msg=f"{label}: weight {name}")


def check(tmp_path, reference, nproc, layouts, name):
    for layout, result in zip(layouts, run_worker(tmp_path, nproc, layouts, name)):
        assert_equivalent(result, reference(layout), f"{nproc} ranks {json.dumps(layout)}")


def test_two_rank_layouts(tmp_path, reference):
    check(tmp_path, reference, 2, [
        {"tensor-model-parallel-size": 2},
        {"tensor-model-parallel-size": 2, "sequence-parallel": True},
        {"tensor-model-parallel-size": 2, **UNTIED},
        {"data-parallel-sharding-strategy": "optim"},
        {"data-parallel-sharding-strategy": "optim_grads"},
        {"data-parallel-sharding-strategy": "optim_grads_params"},
        {"pipeline-model-parallel-size": 2, **UNTIED},  # 1F1B
        {"pipeline-model-parallel-size": 2, "num-layers-per-virtual-pipeline-stage": 1, **UNTIED},  # interleaved
        {"pipeline-model-parallel-size": 2, "num-layers-per-virtual-pipeline-stage": 1,
         "pipeline-schedule": "ZBVZeroBubble", **UNTIED},
        {"pipeline-model-parallel-size": 2, "decoder-first-pipeline-num-layers": 1, **UNTIED},  # uneven stages
        {"context-parallel-size": 2},
    ], "two")


def test_four_rank_layouts(tmp_path, reference):
    check(tmp_path, reference, 4, [
        {"tensor-model-parallel-size": 2},
        {"tensor-model-parallel-size": 2, "sequence-parallel": True, "data-parallel-sharding-strategy": "optim"},
        {"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, **UNTIED},
        {"tensor-model-parallel-size": 2, "sequence-parallel": True, "pipeline-model-parallel-size": 2,
         "num-layers-per-virtual-pipeline-stage": 1, **UNTIED},
        {"context-parallel-size": 2, "tensor-model-parallel-size": 2, "sequence-parallel": True},
        {"context-parallel-size": 4},
        {"context-parallel-size": 2, "pipeline-model-parallel-size": 2, **UNTIED},
    ], "four")


def test_eight_ranks_tp2_pp2_dp2(tmp_path, reference):
    check(tmp_path, reference, 8, [
        {"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, **UNTIED},
        {"tensor-model-parallel-size": 2, "context-parallel-size": 2, **UNTIED},  # with dp = 2
    ], "eight")


def test_recomputation_changes_nothing(single_process, reference):
    assert len(single_process) == 2 + len(RECOMPUTE)
    for layout, result in zip(RECOMPUTE, single_process[2:]):
        assert_equivalent(result, reference(layout), f"1 ranks {json.dumps(layout)}")


def test_pipeline_with_tied_embeddings(tmp_path, reference):
    """Megatron's default: the output layer reuses the input embedding, held by the first and the last stage
    and kept equal by summing its gradient over them (1F1B, ZBV where both stages share a rank, with TP and
    with FSDP): the tied model's single-process losses, gradients and weights."""
    check(tmp_path, reference, 2, [
        {"pipeline-model-parallel-size": 2},
        {"pipeline-model-parallel-size": 2, "num-layers-per-virtual-pipeline-stage": 1,
         "pipeline-schedule": "ZBVZeroBubble"},
    ], "tied2")
    check(tmp_path, reference, 4, [
        {"pipeline-model-parallel-size": 2, "tensor-model-parallel-size": 2},
        {"pipeline-model-parallel-size": 2},  # with dp = 2 (FSDP shards the embedding on both stages)
    ], "tied4")
