"""Processes for tests/test_planner.py, forked from the tests' forkserver (tests/launcher.py), which imports
megalatent once: eight ranks start in a second, not after eight interpreters' imports (~5 s of CPU each).

Ranks: real steps measured by the planner's instruments (planning/measure.py), several layouts of several
world sizes from one set of processes.

    processes = start(out_dir, cases, world_size)   ...   wait(processes, timeout_s)

`cases`: [{"ranks": k, "argv": [trainer flags]}, ...]. Case i runs on ranks 0..k-1, in a gloo process group
of its own (a file store in out_dir); the other ranks go on to the next case. Each rank writes
out_dir/case<i>/rank<r>.json.

Planners: `planners(jobs)`, a pool whose `plan_command(argv)` runs tools/plan.py as its command line does,
for commands planned side by side.
"""
import importlib.util
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.distributed as dist

from launcher import forkserver
from megalatent.cli import run_tool
from megalatent.distributed.env import exit_process
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import parse_args, validate
from megalatent.planning.measure import measure_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out: str, cases: list[dict], rank: int) -> None:
    """One rank: every case it takes part in, then the end of its process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    device = torch.device("cpu")
    code = 0
    try:
        for i, case in enumerate(cases):
            ranks, argv = case["ranks"], case["argv"]
            if rank >= ranks:
                continue
            cfg = parse_args(argv)
            validate(cfg, ranks)
            dist.init_process_group("gloo", store=dist.FileStore(os.path.join(out, f"case{i}.store"), ranks),
                                    rank=rank, world_size=ranks)
            layout = ParallelLayout.from_config(cfg, ranks, rank)
            layout.build_mesh(device)
            result = measure_step(cfg, layout, device)
            dist.destroy_process_group()
            os.makedirs(os.path.join(out, f"case{i}"), exist_ok=True)
            with open(os.path.join(out, f"case{i}", f"rank{rank}.json"), "w") as f:
                json.dump(result, f)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    exit_process(code)  # teardown, flush, os._exit (reference/platform.md)


def start(out: str, cases: list[dict], world_size: int) -> list:
    context = forkserver()
    processes = [context.Process(target=run, args=(out, cases, rank)) for rank in range(world_size)]
    for p in processes:
        p.start()
    return processes


def wait(processes: list, timeout_s: float) -> list[int]:
    """The exit codes; a rank still running at the deadline is killed (and reads as failed)."""
    deadline = time.time() + timeout_s
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in processes]


def plan_command(argv: list[str]) -> int:
    """tools/plan.py's exit code for these arguments, run in this process."""
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(REPO, "tools", "plan.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return run_tool(tool.main, argv)


def planners(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=forkserver())
