"""Worker for tests/test_planner.py: real steps measured by the planner's instruments (planning/measure.py),
several layouts of several world sizes in one launch, so that the ranks start (import torch) once.

    torchrun --nproc-per-node 8 tests/planner_worker.py OUT_DIR CASES_JSON

CASES_JSON: [{"ranks": k, "argv": [trainer flags]}, ...]. Case i runs on ranks 0..k-1 of the launch, in a
process group of its own (a file store in OUT_DIR); the other ranks go on to the next case. Each rank writes
OUT_DIR/case<i>/rank<r>.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from megalatent.distributed.env import exit_process
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import parse_args, validate
from megalatent.planning.measure import measure_step


def main():
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
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
    exit_process(code)


if __name__ == "__main__":
    main()
