"""One rank of a job, simulated: the real build, parallelization and one full training step on fake tensors,
with its memory (memory.py: torch's MemTracker), its collectives (collectives.py) and its operators' cost (cost.py).

    report = simulate_rank(cfg, world_size, rank, target)

The model is built and parallelized on the meta device exactly as a run builds it (pretrain.meta_model_parts),
allocated on fake tensors instead of being initialised, brought to a steady state (step.warm_up: optimizer
state, pipeline set-up), and then the trainer's step runs once inside the trackers (on fewer micro-batches
when they repeat: step.simulated_micro_batches).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megalatent.config import Config
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import get_family
from megalatent.planning.collectives import CollectiveRecorder, Transfer
from megalatent.planning.cost import Cost, OperatorCost
from megalatent.planning.hardware import Target
from megalatent.planning.memory import Memory, StepMemoryTracker, memory_of_step
from megalatent.planning.step import (StepMarks, micro_batches_per_step, quiet_hooks, simulated_micro_batches,
                                     synthetic_micro_batches, training_step, warm_up)
from megalatent.planning.world import (MetadataFastPath, control_exchanges, fake_tensors, run_logs_silenced,
                                      simulated_world)
from megalatent.pretrain import make_trainer, meta_model_parts

DEVICE = torch.device("cpu")  # fake tensors live on the CPU device (see world.py)


@dataclass
class RankReport:
    rank: int
    coordinates: dict[str, int]           # pp, dp, cp, tp of this rank
    stages: list[int]                     # its pipeline stages (empty without pipeline parallelism)
    memory: Memory
    # The collectives of the simulated micro-batches, each with the mesh dims its group spans as its `group`
    # ('' for a group outside the layout's meshes), and how often each counts in the full step.
    transfers: list[Transfer] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)                 # of the full step
    micro_batches: tuple[int, int] = (1, 1)                  # (simulated, in the step): step.simulated_micro_batches
    simulated_s: float = 0.0                                 # how long the simulation took on this machine


def simulate_rank(cfg: Config, world_size: int, rank: int, target: Target,
                  store_path: Optional[str] = None) -> RankReport:
    """Simulate global rank `rank` of a `world_size`-rank job of `cfg` (already prepared for `target`: see
    hardware.Target.prepare). `store_path`: the pipeline ranks of this rank's column are simulated by other
    processes at the same time, meeting through that file (planning/workers.py)."""
    start = time.time()
    layout = ParallelLayout.from_config(cfg, world_size, rank)
    pipeline_ranks = pipeline_column(layout, rank)
    with run_logs_silenced(), simulated_world(rank, world_size, pipeline_ranks, store_path):
        layout.build_mesh(DEVICE)
        parts, pipeline = meta_model_parts(cfg, layout, DEVICE)
        family = get_family(cfg.model.model_family)
        exchanges = control_exchanges() if layout.pp > 1 else contextlib.nullcontext()
        with fake_tensors() as values, exchanges, target.kernels():
            for part in parts:
                part.to_empty(device=DEVICE)  # allocated, never initialised: values play no part
            trainer = make_trainer(cfg, layout, DEVICE, parts, None, None, pipeline)
            target.prepare_optimizers(trainer.optimizers)
            quiet_hooks(trainer, values)
            steps = micro_batches_per_step(cfg, layout)
            simulated = simulated_micro_batches(cfg, layout, len(parts))
            micro_batches = synthetic_micro_batches(cfg, family.objective, layout, simulated)
            warm_up(trainer, micro_batches)
            tracker, recorder = StepMemoryTracker(), CollectiveRecorder()
            cost = OperatorCost(target.peak_flops, target.memory_bandwidth)
            tracker.track_external(*parts, *trainer.optimizers)
            marks = StepMarks(parts, lambda: (len(recorder.transfers), dataclasses.replace(cost.cost)))
            with tracker, recorder, cost, MetadataFastPath():
                training_step(trainer, micro_batches)
                tracker.name_gradients(parts)
                memory = memory_of_step(tracker.get_tracker_snapshot("current"),
                                        tracker.get_tracker_snapshot("peak"), DEVICE)
            marks.remove()
            weights, step_cost = [1.0] * len(recorder.transfers), cost.cost
            repeated = marks.repeated(simulated, steps, layout)
            if repeated is not None:
                (first, cost_before), (last, cost_after), weight = repeated
                weights[first:last] = [weight] * (last - first)
                step_cost = step_cost.plus(cost_after.minus(cost_before), weight - 1)
        coordinates = {d: layout._local_rank(d) for d in ("pp", "dp", "cp", "tp")}
        stages = list(pipeline.stage_ids) if pipeline is not None else []
        labels = group_labels(layout)
        transfers = [dataclasses.replace(t, group=labels.get(t.group, "")) for t in recorder.transfers]
    return RankReport(rank, coordinates, stages, memory, transfers, weights, step_cost, (simulated, steps),
                      time.time() - start)


def group_labels(layout: ParallelLayout) -> dict[str, str]:
    """The name of every process group of the layout's meshes -> the mesh dims it spans ('dp', 'dp×cp', 'ep',
    ...). Groups outside the meshes (a dilated segment's ranks, the tied-embedding ranks) are not here."""
    if layout.mesh is None:
        return {}
    meshes = [layout.mesh[d] for d in ("pp", "dp", "cp", "tp")]
    if layout.expert_mesh is not None:
        meshes += [layout.expert_mesh[d] for d in ("edp", "ep")]
    meshes += [m for m in (layout._fsdp_mesh, layout._token_mesh, layout._expert_fsdp_mesh, layout._sequence_mesh)
               if m is not None]
    labels: dict[str, str] = {}
    for m in meshes:  # a group of several meshes (dp x cp flattened with dp = 1 is cp's) keeps its first name
        labels.setdefault(m.get_group().group_name, m.mesh_dim_names[0].replace("_", "×"))
    return labels


def pipeline_column(layout: ParallelLayout, rank: int) -> tuple[int, ...]:
    """The global ranks of `rank`'s pipeline group (same dp, cp, tp coordinates, every pp coordinate): ranks
    are laid out pp-major, so they are `rank` modulo the size of one pipeline stage's ranks, stepping by it."""
    stride = layout.world_size // layout.pp
    return tuple(range(rank % stride, layout.world_size, stride))
