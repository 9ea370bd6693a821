"""The planner's instruments around a real run: what the planner predicts, measured.

    torchrun --nproc-per-node N -m megalatent.planning.measure OUT_DIR [trainer flags]
    python -m megalatent.planning.measure OUT_DIR [trainer flags]          (one process)

Each rank builds and initialises its model as a run does (pretrain.build_model_parts), takes one training
step on the planner's synthetic batch (the warm-up: optimizer state, pipeline set-up), then a second inside
the same trackers the simulation uses (memory.StepMemoryTracker, collectives.CollectiveRecorder), and writes
OUT_DIR/rank<r>.json: the tracker's memory, the collectives, and the process's resident memory (the operating
system's count, independent of torch's trackers): its size just before the model was built and its high-water
mark after the second step.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict

import torch

from megalatent.distributed.env import discover, exit_process, init_process_group
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import get_family, parse_args, validate
from megalatent.planning.collectives import CollectiveRecorder
from megalatent.planning.memory import StepMemoryTracker, memory_of_step
from megalatent.planning.step import synthetic_micro_batches
from megalatent.pretrain import build_model_parts, make_trainer


def resident_bytes() -> int:
    """The process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(argv: list[str]) -> dict:
    env = discover()
    cfg = parse_args(argv)
    validate(cfg, env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    device = init_process_group(env)
    layout.build_mesh(device)
    torch.manual_seed(cfg.training.seed)
    resident_before = resident_bytes()
    parts, pipeline = build_model_parts(cfg, layout, device)
    trainer = make_trainer(cfg, layout, device, parts, None, None, pipeline)
    micro_batches = synthetic_micro_batches(cfg, get_family(cfg.model.model_family).objective, layout)
    trainer.train_step(micro_batches)
    tracker, recorder = StepMemoryTracker(), CollectiveRecorder()
    tracker.track_external(*parts, *trainer.optimizers)
    with tracker, recorder:
        trainer.train_step(micro_batches)
        tracker.name_gradients(parts)
        memory = memory_of_step(tracker.get_tracker_snapshot("current"), tracker.get_tracker_snapshot("peak"), device)
    return {"rank": env.rank, "memory": asdict(memory), "resident_before_build": resident_before,
            "peak_resident": peak_resident_bytes(),
            "transfers": [[t.kind, list(t.ranks), t.bytes] for t in recorder.transfers]}


def main() -> None:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    code = 0
    try:
        result = measure(argv)
        with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        exit_process(code)


if __name__ == "__main__":
    main()
