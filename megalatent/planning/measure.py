"""The planner's instruments around a real run: what the planner predicts, measured.

    torchrun --nproc-per-node N -m megalatent.planning.measure OUT_DIR [trainer flags]
    python -m megalatent.planning.measure OUT_DIR [trainer flags]          (one process; a GPU's too)

Each rank builds and initialises its model as a run does (pretrain.build_model_parts), reaches the
simulation's steady state the simulation's way (step.warm_up: the optimizer's state; a pipeline's set-up
step), takes one training step on the planner's synthetic batch inside the simulation's instruments
(memory.StepMemoryTracker, collectives.CollectiveRecorder), and writes OUT_DIR/rank<r>.json: the tracker's
memory, the collectives, and measures independent of the tracker: on the CPU the process's resident memory
just before the build and its high-water mark after the step; on a GPU, over one more step outside the
instruments, its wall time and the caching allocator's peaks (allocated: the tensors; reserved: with the
allocator's fragmentation).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict

import torch

from megalatent.config import Config
from megalatent.distributed.env import discover, exit_process, init_process_group
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import get_family, parse_args, validate
from megalatent.planning.collectives import CollectiveRecorder
from megalatent.planning.memory import StepMemoryTracker, memory_of_step
from megalatent.planning.step import synthetic_micro_batches, training_step, warm_up
from megalatent.pretrain import build_model_parts, make_trainer


def resident_bytes() -> int:
    """The process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_step(cfg: Config, layout: ParallelLayout, device: torch.device) -> dict:
    """One rank's measured step (see the module doc); the process group and mesh exist."""
    torch.manual_seed(cfg.training.seed)
    resident_before = resident_bytes()
    parts, pipeline = build_model_parts(cfg, layout, device)
    trainer = make_trainer(cfg, layout, device, parts, None, None, pipeline)
    # All of one step's micro-batches: the simulation runs fewer, but stands for all of them. (A pipeline
    # schedule keeps the micro-batch count of its first step: the warm-up's must be the step's.)
    micro_batches = synthetic_micro_batches(cfg, get_family(cfg.model.model_family).objective, layout)
    warm_up(trainer, micro_batches)
    tracker, recorder = StepMemoryTracker(), CollectiveRecorder()
    tracker.track_external(*parts, *trainer.optimizers)
    with tracker, recorder:
        training_step(trainer, micro_batches)
        tracker.name_gradients(parts)
        memory = memory_of_step(tracker.get_tracker_snapshot("current"), tracker.get_tracker_snapshot("peak"), device)
    result = {"rank": layout.rank, "memory": asdict(memory),
              "transfers": [[t.kind, list(t.ranks), t.bytes] for t in recorder.transfers]}
    if device.type == "cuda":  # one more step, outside the instruments: its time and the allocator's peak
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        training_step(trainer, micro_batches)
        torch.cuda.synchronize(device)
        result.update(step_s=time.perf_counter() - start, max_memory_allocated=torch.cuda.max_memory_allocated(device),
                      max_memory_reserved=torch.cuda.max_memory_reserved(device))
    else:
        result.update(resident_before_build=resident_before, peak_resident=peak_resident_bytes())
    return result


def main() -> None:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    code = 0
    try:
        env = discover()
        cfg = parse_args(argv)
        validate(cfg, env.world_size)
        layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
        device = init_process_group(env)
        layout.build_mesh(device)
        result = measure_step(cfg, layout, device)
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
