"""The planner against real runs, and the planner's command line.

Honesty: the same layouts run for real on gloo ranks (megalatent/planning/measure.py: the second training
step inside torch's MemTracker and the planner's collective recorder, on every rank) and simulated (fake
tensors, fake process groups: one process per rank role). The collectives must be the same calls with the
same bytes, exactly; the peak memory within 15%. That comparison checks the simulation (fake tensors and
groups standing in for real ones, fewer micro-batches counted for more, the roles standing for every rank)
with one instrument on both sides. The instrument itself is checked against the operating system: a ~100M
model's predicted peak against the high-water mark of its process's resident memory, where tensors are
most of it.
"""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO
from megalatent.families import parse_args
from megalatent.planning.estimate import spanned_dims
from megalatent.planning.hardware import HOST
from megalatent.planning.workers import simulate_roles

TINY = ["--config", "examples/tiny/gpt.yaml", "--vocab-size", "8192"]
TINY_LONGNET = ["--config", "examples/tiny/longnet.yaml", "--vocab-size", "8192"]
# ~110M parameters (GPT-2 small's shape): what a CPU process of a few GB holds mostly as tensors.
GPT_100M = ["--config", "examples/gpu/gpt_125m.yaml", "--vocab-size", "32000", "--seq-length", "256",
            "--micro-batch-size", "2", "--global-batch-size", "2"]


def measure(tmp_path, nproc: int, argv: list[str]) -> dict[int, dict]:
    """Each rank's measured second step (measure.py), by rank."""
    out = tmp_path / "measured"
    out.mkdir()
    module = ["-m", "megalatent.planning.measure", str(out)] + argv
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                              if nproc > 1 else []) + module
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {r: json.load(open(out / f"rank{r}.json")) for r in range(nproc)}


def simulated_calls(report) -> Counter:
    """(kind, ranks, bytes) -> calls in the full step (the simulated micro-batches' weights applied)."""
    calls = Counter()
    for t, weight in zip(report.transfers, report.weights):
        assert weight == int(weight), "a count of repeated micro-batches is a whole number here"
        calls[(t.kind, t.ranks, t.bytes)] += int(weight)
    return calls


def shape_of(calls: Counter) -> Counter:
    """The same calls without their group's ranks (another rank of the same role: other groups, same shapes)."""
    shapes = Counter()
    for (kind, ranks, nbytes), n in calls.items():
        shapes[(kind, len(ranks), nbytes)] += n
    return shapes


CASES = {
    # name: (ranks, flags); the global batches give more micro-batches than are simulated where noted
    "1 rank": (1, TINY),
    "2 ranks: LongNet, context parallel (dilated segments across ranks)": (2, TINY_LONGNET + [
        "--context-parallel-size", "2", "--global-batch-size", "8"]),
    "4 ranks: TP2+SP x FSDP2 (4 micro-batches, 3 simulated)": (4, TINY + [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--global-batch-size", "32"]),
    "8 ranks: TP2+SP x PP2 (1F1B, tied embeddings) x FSDP2 (5 micro-batches, 4 simulated)": (8, TINY + [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
        "--global-batch-size", "40"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_plan_is_what_a_real_run_does(tmp_path, case):
    nproc, argv = CASES[case]
    real = measure(tmp_path, nproc, argv)
    reports = simulate_roles(parse_args(argv), nproc, HOST)
    by_stage = {report.coordinates["pp"]: report for report in reports}
    for rank, measured in real.items():
        report = by_stage[measured_stage(rank, nproc, len(reports))]
        peak, predicted = measured["memory"]["peak"], report.memory.peak
        assert abs(predicted - peak) <= 0.15 * peak, f"{case}, rank {rank}: predicted {predicted}, measured {peak}"
        calls = Counter((kind, tuple(ranks), n) for kind, ranks, n in measured["transfers"])
        if rank == report.rank:
            assert simulated_calls(report) == calls, f"{case}, rank {rank}"
        else:  # ranks of the same role: the same calls over their own groups
            assert shape_of(simulated_calls(report)) == shape_of(calls), f"{case}, rank {rank}"


def measured_stage(rank: int, world: int, pp: int) -> int:
    return rank // (world // pp)  # ranks are laid out pipeline stage by stage (mesh pp, dp, cp, tp)


def test_a_100m_model_predicted_peak_is_its_resident_memory(tmp_path):
    real = measure(tmp_path, 1, GPT_100M)[0]
    report, = simulate_roles(parse_args(GPT_100M), 1, HOST)
    resident = real["peak_resident"] - real["resident_before_build"]
    assert report.memory.peak > 1.5 * 2**30  # tensors are most of the process
    assert abs(report.memory.peak - resident) <= 0.15 * resident, (report.memory, resident)
    assert abs(report.memory.peak - real["memory"]["peak"]) <= 0.01 * real["memory"]["peak"]


def test_a_group_is_named_by_the_mesh_dims_its_ranks_span():
    shape = {"pp": 2, "dp": 2, "cp": 2, "tp": 2}  # rank = ((pp * 2 + dp) * 2 + cp) * 2 + tp
    assert spanned_dims((0, 1), shape) == "tp"
    assert spanned_dims((0, 4), shape) == "dp"
    assert spanned_dims((0, 2, 4, 6), shape) == "dp×cp"
    assert spanned_dims((0, 8), shape) == "pp"
    assert spanned_dims((0, 2, 4), shape) == "dp×cp (part: 3 ranks)"
