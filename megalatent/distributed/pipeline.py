"""Pipeline parallelism with torch.distributed.pipelining: which layers form each stage, which rank
runs which stages, the stage modules and the schedule (1F1B, interleaved 1F1B, zero-bubble).

A stage module is the model itself with the parts it does not own removed (layers of other stages, and
what the family's `PipelineSplit` gives only to the first stage, the last, or the stage of one layer), so
parameter names stay global (`layers.7.mlp.up_proj.weight` on whichever rank holds layer 7) and
checkpoints do not depend on the pipeline layout. Between stages flows a tuple of tensors — (hidden
states, position ids), plus whatever a family's later stages need from earlier ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megalatent.distributed.plan import PipelineSplit

SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


class PipelinePlanError(ValueError):
    """A pipeline layout that cannot be built; the message names the flags to change."""


@dataclass(frozen=True)
class PipelinePlan:
    schedule: str
    stage_layers: list[list[int]]  # global layer indices of each stage, in pipeline order
    pp: int

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp

    def stages_of_rank_holding(self, stage: int) -> int:
        """The pipeline rank that runs `stage`."""
        return next(rank for rank in range(self.pp) if stage in self.stages_of_rank(rank))

    def stages_of_rank(self, rank: int) -> list[int]:
        """The stage indices a pipeline rank runs: looped (rank, rank + pp, ...) or V-shaped for ZBV."""
        if self.schedule == "ZBVZeroBubble":
            return [rank, self.num_stages - 1 - rank]
        return list(range(rank, self.num_stages, self.pp))


def _split(layers: list[int], parts: int) -> list[list[int]]:
    size = len(layers) // parts
    return [layers[i * size:(i + 1) * size] for i in range(parts)]


def plan_pipeline(cfg, pp: int) -> PipelinePlan:
    """Check the pipeline flags and decide the stages. Pure: no process group or tensor needed."""
    p, num_layers = cfg.parallel, cfg.model.num_layers
    per_virtual = p.num_layers_per_virtual_pipeline_stage
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    layers = list(range(num_layers))
    if per_virtual is not None:
        if first is not None or last is not None:
            raise PipelinePlanError("--num-layers-per-virtual-pipeline-stage cannot be combined with "
                                    "--decoder-first/last-pipeline-num-layers")
        if per_virtual < 1 or num_layers % per_virtual or (num_layers // per_virtual) % pp \
                or num_layers // per_virtual < 2 * pp:
            raise PipelinePlanError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual}: --num-layers {num_layers} must split into "
                f"virtual stages of that many layers, at least 2 per pipeline rank and the same number on each of "
                f"the {pp} ranks (e.g. {num_layers // (2 * pp) if num_layers % (2 * pp) == 0 else 'a divisor'})")
        stage_layers = _split(layers, num_layers // per_virtual)
    elif first is not None or last is not None:
        head = first if first is not None else 0
        tail = last if last is not None else 0
        inner = pp - (first is not None) - (last is not None)
        middle = num_layers - head - tail
        if head < 0 or tail < 0 or middle < 0 or (inner == 0 and middle) or (inner and middle % inner):
            raise PipelinePlanError(
                f"--decoder-first/last-pipeline-num-layers ({first}, {last}) leave {middle} of --num-layers "
                f"{num_layers} for the {inner} other stage(s); that must be >= 0 and split evenly")
        stage_layers = ([layers[:head]] if first is not None else []) \
            + (_split(layers[head:num_layers - tail], inner) if inner else []) \
            + ([layers[num_layers - tail:]] if last is not None else [])
    else:
        if num_layers % pp:
            raise PipelinePlanError(f"--num-layers {num_layers} must be divisible by --pipeline-model-parallel-size "
                                    f"{pp} (or set --decoder-first/last-pipeline-num-layers)")
        stage_layers = _split(layers, pp)

    per_rank = len(stage_layers) // pp
    schedule = p.pipeline_schedule or ("Interleaved1F1B" if per_rank > 1 else "1F1B")
    if schedule == "1F1B" and per_rank != 1:
        raise PipelinePlanError("--pipeline-schedule 1F1B runs one stage per rank; drop "
                                "--num-layers-per-virtual-pipeline-stage or choose Interleaved1F1B")
    if schedule != "1F1B" and per_rank < 2:
        raise PipelinePlanError(f"--pipeline-schedule {schedule} needs several stages per rank: set "
                                "--num-layers-per-virtual-pipeline-stage")
    if schedule == "ZBVZeroBubble" and per_rank != 2:
        raise PipelinePlanError("--pipeline-schedule ZBVZeroBubble needs exactly 2 stages per rank "
                                f"(--num-layers-per-virtual-pipeline-stage {num_layers // (2 * pp)})")
    return PipelinePlan(schedule, stage_layers, pp)


def stage_module(model: nn.Module, split: PipelineSplit, layer_ids: list[int], is_first: bool,
                 is_last: bool, tied: tuple[str, ...] = ()) -> nn.Module:
    """`model` (a fresh one, built on the meta device) reduced to what this stage owns, in place, global names
    preserved: its layers, the modules `split` gives to the first stage, the last, or the stage of one of its
    layers, and on the last stage the `tied` modules whose weights its output layer shares."""
    for name in list(model.layers):
        if int(name) not in layer_ids:
            del model.layers[name]
    kept = set(split.first if is_first else ()) | set(split.last + tied if is_last else ())
    dropped = [name for name in split.first + split.last if name not in kept]
    dropped += [name for name, layer in split.with_layer(model.cfg).items() if layer not in layer_ids]
    for name in dropped:
        setattr(model, name, None)
    return model


def build_schedule(plan: PipelinePlan, stages: list[nn.Module], stage_ids: list[int], pp_group, device,
                   n_microbatches: int, loss_fn):
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    pipeline_stages = [PipelineStage(module, sid, plan.num_stages, device, group=pp_group)
                       for module, sid in zip(stages, stage_ids)]
    # scale_grads=False: the loss function already normalises by the global token count.
    if plan.schedule == "1F1B":
        return Schedule1F1B(pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"Interleaved1F1B": ScheduleInterleaved1F1B, "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
           "ZBVZeroBubble": ScheduleZBVZeroBubble}[plan.schedule]
    return cls(pipeline_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


class Pipeline:
    """This rank's share of a pipeline: its stages, and the schedule that runs them.

    Tied weights (Megatron's default: the output layer reuses the input embedding): the first and the last
    stage both hold the `tied` modules, start from the same values (initialisation keyed by name) and stay
    equal: after each backward their gradients are summed over the two stages (`tied_weight_hooks`, over an
    embedding group of the ranks holding them), so both take the same optimizer step; the gradient norm counts
    them once (`replicas`)."""

    def __init__(self, plan: PipelinePlan, keeps: PipelineSplit, layout, device: torch.device,
                 tied: tuple[str, ...] = ()):
        self.plan, self.keeps, self.device, self.tied = plan, keeps, device, tied
        self.layout, self.group = layout, layout.group("pp")
        self.stage_ids = plan.stages_of_rank(layout.pp_rank)
        self.has_first = 0 in self.stage_ids
        self.has_last = plan.num_stages - 1 in self.stage_ids
        self.schedule = None

    def last_stage(self, parts: list[nn.Module]) -> Optional[nn.Module]:
        """The module of the pipeline's last stage among this rank's `parts` (None if it holds it not)."""
        last = self.plan.num_stages - 1
        return parts[self.stage_ids.index(last)] if last in self.stage_ids else None

    def stages(self, build: Callable[[], nn.Module]) -> list[nn.Module]:
        """This rank's stage modules, each from a fresh model of `build()` (on the meta device: nothing of the
        layers a stage drops is ever allocated)."""
        last = self.plan.num_stages - 1
        return [stage_module(build(), self.keeps, self.plan.stage_layers[s], s == 0, s == last, self.tied)
                for s in self.stage_ids]

    def _tied_holders(self, parts: list[nn.Module]) -> list[nn.Module]:
        """This rank's modules of the tied weights: the first stage's and the last stage's."""
        last = self.plan.num_stages - 1
        return [getattr(part, name) for part, sid in zip(parts, self.stage_ids) if sid in (0, last)
                for name in self.tied]

    def replicas(self, parts: list[nn.Module]) -> set[int]:
        """ids of the parameters that are a second copy of a tied weight (the last stage's): the gradient norm
        counts each weight once."""
        if not self.tied:
            return set()
        last = self.plan.num_stages - 1
        return {id(p) for part, sid in zip(parts, self.stage_ids) if sid == last
                for name in self.tied for p in getattr(part, name).parameters()}

    def tied_weight_hooks(self, parts: list[nn.Module]) -> list["TiedWeightSync"]:
        if not self.tied:
            return []
        pp_ranks = torch.distributed.get_process_group_ranks(self.group)
        holders = sorted({pp_ranks[self.plan.stages_of_rank_holding(0)],
                          pp_ranks[self.plan.stages_of_rank_holding(self.plan.num_stages - 1)]})
        mine = self._tied_holders(parts)
        group = self.layout.subgroup(tuple(holders)) if len(holders) > 1 and mine else None
        return [TiedWeightSync(mine, group)]

    def run(self, parts: list[nn.Module], inputs: tuple, target: torch.Tensor, n_microbatches: int, loss_fn,
            train: bool) -> list[torch.Tensor]:
        """One global batch (this rank's micro-batches concatenated: the first stage's `inputs`, the last
        stage's `target`) through the schedule; the schedule splits it back into `n_microbatches` and calls
        `loss_fn(output, target)` on the last stage. Returns the loss_fn values of the micro-batches (empty
        off the last stage)."""
        self._loss_fn = loss_fn  # the schedule keeps the function it was built with: delegate to this step's
        if self.schedule is None:
            self.schedule = build_schedule(self.plan, parts, self.stage_ids, self.group, self.device,
                                           n_microbatches, lambda output, target: self._loss_fn(output, target))
        args = inputs if self.has_first else ()
        target = target if self.has_last else None
        losses: list[torch.Tensor] = []
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.eval(*args, target=target, losses=losses)
        return losses


class TiedWeightSync:
    """A step hook (training/hooks.py): after the backward, every holder of a tied weight gets the sum of
    their gradients — over the modules this rank holds, then over `group` (the embedding group: the ranks of
    the first and the last stage with this rank's data/context/tensor coordinates)."""

    def __init__(self, modules: list[nn.Module], group):
        self.modules, self.group = modules, group

    def start_step(self, micro_batches: int) -> None:
        pass

    @torch.no_grad()
    def end_step(self, device: torch.device):
        copies = [list(m.parameters()) for m in self.modules]
        for params in zip(*copies):
            grads = [_local_gradient(p) for p in params]
            total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0]
            if self.group is not None:
                torch.distributed.all_reduce(total, group=self.group)
            for grad in grads:
                grad.copy_(total)
        return None

    def after_optimizer_step(self) -> None:
        pass


def _local_gradient(p: nn.Parameter) -> torch.Tensor:
    """This rank's piece of p's gradient, laid out like p's own shard: a DTensor gradient may come back with
    other placements than its parameter's (a vocab-parallel embedding's is replicated), so it is put in the
    parameter's first."""
    grad = p.grad
    if isinstance(grad, DTensor):
        if grad.placements != p.placements:
            p.grad = grad = grad.redistribute(placements=p.placements)
        return grad.to_local()
    return grad
