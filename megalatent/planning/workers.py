"""Simulating the rank roles of a layout, each in a process of its own.

The roles are the ranks of rank 0's pipeline column (one per pipeline stage rank): every other rank holds
a shard of the same size as the rank of its stage in that column (tensor, data, context and expert
parallelism split evenly; MoE routing is simulated balanced), so they are the ranks whose memory differs.
Rank 0 is also the worst case where ranks are not alike: a rank of a ragged last context-parallel
segment group receives fewer rows than rank 0.

The pipeline ranks of a column are simulated at the same time, one process each, because pipelining's set-up
messages between stages are values its schedule reads (world.py). Each process is a fresh interpreter
(multiprocessing's spawn), so that torch.distributed's process-wide state belongs to one simulated rank.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from queue import Empty

from megalatent.config import Config
from megalatent.distributed.layout import ParallelLayout
from megalatent.planning.hardware import Target
from megalatent.planning.simulate import RankReport, pipeline_column, simulate_rank


class SimulationError(RuntimeError):
    """A rank's simulation failed; the message carries its traceback."""


def _run(cfg: Config, world_size: int, rank: int, target: Target, store_path, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # fake tensors do no arithmetic; leave the cores to the other ranks
    try:
        results.put((rank, simulate_rank(cfg, world_size, rank, target, store_path), None))
    except BaseException:  # reported to the parent, which stops the column's other processes
        results.put((rank, None, traceback.format_exc()))


def roles(cfg: Config, world_size: int) -> tuple[int, ...]:
    """The ranks to simulate: rank 0's pipeline column."""
    return pipeline_column(ParallelLayout.from_config(cfg, world_size, 0), 0)


def simulate_roles(cfg: Config, world_size: int, target: Target, timeout_s: float = 3600.0) -> list[RankReport]:
    """Simulate every role of `cfg`'s layout at `world_size` ranks (each in its own process, at the same time);
    reports in pipeline order."""
    ranks = roles(cfg, world_size)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="megalatent-plan-") as tmp:
        store_path = os.path.join(tmp, "pipeline-store") if len(ranks) > 1 else None
        processes = [context.Process(target=_run, args=(cfg, world_size, r, target, store_path, results), daemon=True)
                     for r in ranks]
        for p in processes:
            p.start()
        reports: dict[int, RankReport] = {}
        deadline = time.time() + timeout_s
        try:
            while len(reports) < len(ranks):
                try:
                    rank, report, error = results.get(timeout=1.0)
                except Empty:
                    dead = [r for r, p in zip(ranks, processes) if p.exitcode not in (None, 0) and r not in reports]
                    if dead:
                        raise SimulationError(f"the process simulating rank {dead[0]} died "
                                              f"(exit code {processes[ranks.index(dead[0])].exitcode})")
                    if time.time() > deadline:
                        raise SimulationError(f"the simulation of ranks {ranks} did not finish in {timeout_s:.0f} s")
                    continue
                if error is not None:
                    raise SimulationError(f"simulating rank {rank} of {world_size} failed:\n{error}")
                reports[rank] = report
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                p.join()
    return [reports[r] for r in ranks]
