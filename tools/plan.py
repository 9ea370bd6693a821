"""Plan a run before submitting it: does it fit, how fast will it go, which layout is best.

    python tools/plan.py --config examples/cluster/gpt_1b.yaml --nodes 4 --gpus-per-node 8 --gpu h100-80gb
    python tools/plan.py --config examples/cluster/bitnet_3b.yaml --nodes 4 --gpus-per-node 8 \\
        --tensor-model-parallel-size 2 --sequence-parallel --json plan.json
    python tools/plan.py --config examples/cluster/gpt_1b.yaml --nodes 4 --gpus-per-node 8 --search

Every flag the trainer takes (layout flags included) configures the run; the rest are the planner's. The
real build, parallelization and one training step run for each rank role on fake tensors at the full world
size (megalatent/planning); nothing is allocated and no GPU, dataset or tokenizer is needed. A bad input (an
unknown GPU, a layout the trainer refuses) is one line per broken rule and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megalatent.cli import run_tool
from megalatent.families import parse_args
from megalatent.planning import hardware
from megalatent.planning.plan import Allowances, plan_layout
from megalatent.planning.report import format_plan, format_search
from megalatent.planning.search import search
from megalatent.planning.workers import SimulationError


def planner_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", help=f"one of {sorted(hardware.GPUS)}")
    p.add_argument("--peak-tflops", type=float, help="a measured bf16 throughput for the compute time (default: "
                                                     "the GPU's dense peak; MFU is always against the peak)")
    p.add_argument("--nvlink-gbps", type=float, help="NVLink bandwidth per GPU and direction, GB/s")
    p.add_argument("--ib-gbps", type=float, help="InfiniBand bandwidth per GPU and direction, GB/s")
    p.add_argument("--reserved-gib", type=float, default=Allowances.reserved_gib,
                   help="memory outside PyTorch's tensors (CUDA context, NCCL buffers, workspaces)")
    p.add_argument("--fragmentation", type=float, default=Allowances.fragmentation,
                   help="the caching allocator's overhead over the tensors' peak, as a fraction")
    p.add_argument("--full-depth", action="store_true",
                   help="simulate every layer (default: layers that repeat are simulated at two smaller depths "
                        "and extrapolated, which gives the same numbers faster)")
    p.add_argument("--search", action="store_true", help="simulate every valid layout; rank those that fit")
    p.add_argument("--virtual-stages", action="store_true", help="--search: also 2 stages per pipeline rank")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="--search: layouts simulated at once")
    p.add_argument("--json", help="also write the plan (or the search) as JSON to this file")
    return p


def main(argv=None) -> int:
    ours, rest = planner_flags().parse_known_args(argv)
    cfg = parse_args(rest)
    target = hardware.target(ours.gpu, ours.peak_tflops, ours.nvlink_gbps, ours.ib_gbps)
    allowances = Allowances(ours.reserved_gib, ours.fragmentation)
    try:
        if ours.search:
            plans, failed = search(cfg, ours.nodes, ours.gpus_per_node, target, allowances, ours.virtual_stages,
                                   ours.jobs, ours.full_depth)
            print(format_search(plans, failed))
            result = {"plans": [p.to_dict() for p in sorted(plans, key=lambda p: (not p.fits, p.step.step_s))],
                      "failed": [{"layout": layout, "error": reason} for layout, reason in failed]}
        else:
            plan = plan_layout(cfg, ours.nodes, ours.gpus_per_node, target, allowances, ours.full_depth)
            print(format_plan(plan, title=cfg.model.model_family))
            result = plan.to_dict()
    except SimulationError as err:  # the code failed on fake tensors: a bug, with the rank's traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ours.json:
        with open(ours.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
