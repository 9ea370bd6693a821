"""Simulating the rank roles of a layout: which ranks, and in which processes.

The roles are the ranks of rank 0's pipeline column (one per pipeline rank): tensor, data and expert
parallelism split evenly (MoE routing is simulated balanced), so every other rank of a stage holds shards of
the same sizes and issues the same collectives over its own groups. Context parallelism splits evenly too
when the family's split balances causal attention (zigzag); when it is contiguous, the last context-parallel
rank's queries see the most keys, so the column of that rank is simulated as well. (Rank 0 is the worst case
of what remains uneven: a rank of a ragged last group of dilated segments receives fewer rows than rank 0.)

Without pipeline parallelism each role is simulated in this process, one after the other
(world.simulated_world tears torch.distributed down after each). The pipeline ranks of a column are simulated
at the same time, one process each, because pipelining's set-up messages between stages are values its
schedule reads (world.py); each process is fresh (forked from multiprocessing's forkserver, which holds no
process group), so that torch.distributed's process-wide state belongs to one simulated rank.
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
from megalatent.families import get_family
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


def process_context():
    """Fresh processes, started from a server that imported this module once (multiprocessing's forkserver):
    a process of its own per simulated rank without an interpreter's start-up and imports each time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _in_this_process(cfg: Config, world_size: int, rank: int, target: Target) -> RankReport:
    try:
        return simulate_rank(cfg, world_size, rank, target)
    except Exception as err:  # the same report as from a process of its own
        raise SimulationError(f"simulating rank {rank} of {world_size} failed:\n{traceback.format_exc()}") from err


def columns(cfg: Config, world_size: int) -> list[tuple[int, ...]]:
    """The pipeline columns to simulate (see the module doc), each its ranks in pipeline order."""
    layout = ParallelLayout.from_config(cfg, world_size, 0)
    firsts = [0]
    if layout.cp > 1 and get_family(cfg.model.model_family).parallel.context_parallel_split == "contiguous":
        firsts.append((layout.cp - 1) * layout.tp)  # pp 0, dp 0, the last cp coordinate, tp 0
    return [pipeline_column(layout, first) for first in firsts]


def simulate_roles(cfg: Config, world_size: int, target: Target, timeout_s: float = 3600.0) -> list[RankReport]:
    """Simulate every role of `cfg`'s layout at `world_size` ranks; reports column by column, each in
    pipeline order."""
    cols = columns(cfg, world_size)
    if len(cols[0]) == 1:
        return [_in_this_process(cfg, world_size, rank, target) for (rank,) in cols]
    context = process_context()
    results = context.Queue()
    ranks = [rank for col in cols for rank in col]
    with tempfile.TemporaryDirectory(prefix="megalatent-plan-") as tmp:
        processes = [context.Process(target=_run, daemon=True, args=(
            cfg, world_size, rank, target, os.path.join(tmp, f"pipeline-store-{i}"), results))
            for i, col in enumerate(cols) for rank in col]
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
