"""The planner's training step: the trainer's own step (Trainer.compute_gradients + apply_gradients) on a
synthetic global batch, with nothing read back to the host.

The batch has the shapes the family's objective takes (`Objective.batch_keys`, `batch_shapes`) and no
data: zeros, a loss on every token, positions 0..s-1. No dataset or tokenizer is needed.

Fewer micro-batches (`simulated_micro_batches`): a step of m micro-batches repeats the same work, so the
simulation runs m' <= m of them, enough for every distinct state of the step to occur, and counts one
steady-state micro-batch again for the ones it did not run (`StepMarks.repeated`). Without a pipeline, when
FSDP reduces gradients after every micro-batch (ZeRO-2/3): the first micro-batch (no gradients held yet) and a
second (gradients held), m' = 2, the first one's work counted m - 1 times (the second adds them to the held
ones: a few element-wise additions more). With ZeRO-1, which holds full gradients until the last micro-batch
reduces them: the first, a middle one and the last, m' = 3, the middle one counted m - 2 times. With 1F1B
(torch's: p - stage forwards, then backward-forward pairs, then the remaining backwards): the rank holds its
most micro-batches in flight, with gradients, from its first pair on, and the pairs after the first are alike
(the first forward of the step and of a pair before any backward gathers FSDP's shards, the last backward
reduces them): m' = p + 2, the second pair (counted from its forward to the next forward) counted m - m' + 1
times. Schedules with several stages per rank run all their micro-batches. So memory (the peak over the
states) and the step's totals are those of the full step.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalatent.config import Config
from megalatent.distributed.layout import ParallelLayout
from megalatent.training.objectives import Batch, Objective
from megalatent.training.trainer import Trainer


def micro_batches_per_step(cfg: Config, layout: ParallelLayout) -> int:
    t = cfg.training
    return t.global_batch_size // (t.micro_batch_size * layout.dp)


def simulated_micro_batches(cfg: Config, layout: ParallelLayout, stages_per_rank: int) -> int:
    """m' of the step's m micro-batches (see the module doc)."""
    m = micro_batches_per_step(cfg, layout)
    if layout.pp == 1:
        return min(m, 3 if _reduces_once_per_step(cfg) else 2)
    return min(m, layout.pp + 2) if stages_per_rank == 1 else m


def _reduces_once_per_step(cfg: Config) -> bool:
    """ZeRO-1: full gradients accumulate until the step's last micro-batch (Trainer._sync_grads_on)."""
    return cfg.parallel.data_parallel_sharding_strategy == "optim"


def synthetic_micro_batches(cfg: Config, objective: Objective, layout: ParallelLayout,
                            count: Optional[int] = None) -> list[Batch]:
    """`count` (default: all of one global batch) micro-batches of this data-parallel rank (before the
    context-parallel split)."""
    t, m = cfg.training, cfg.model
    count = micro_batches_per_step(cfg, layout) if count is None else count
    b = t.micro_batch_size
    shapes = (objective.batch_shapes(m, b) if objective.batch_shapes is not None
              else {key: (b, m.seq_length) for key in objective.batch_keys})

    def tensor(key: str, dtype: torch.dtype) -> torch.Tensor:
        shape = shapes[key]
        if key == "position_ids":
            return torch.arange(m.seq_length).expand(shape).contiguous()
        fill = 1 if key == "loss_mask" else 0  # every token carries a loss, as in pretraining
        return torch.full(shape, fill, dtype=dtype)

    return [{key: tensor(key, dtype) for key, dtype in objective.batch_keys.items()} for _ in range(count)]


class _QuietHook:
    """A step hook whose logging statistics are computed (their collectives are part of the step) but whose
    values, meaningless on fake tensors, read as placeholders (world.ValueModel.placeholder_reads)."""

    def __init__(self, hook, values):
        self.hook, self.values = hook, values

    def start_step(self, micro_batches: int) -> None:
        self.hook.start_step(micro_batches)

    def end_step(self, device: torch.device):
        with self.values.placeholder_reads():
            return self.hook.end_step(device)

    def after_optimizer_step(self) -> None:
        self.hook.after_optimizer_step()


def quiet_hooks(trainer: Trainer, values) -> None:
    trainer.hooks = tuple(_QuietHook(hook, values) for hook in trainer.hooks)


def warm_up(trainer: Trainer, micro_batches: list[Batch]) -> None:
    """Bring the trainer to a steady-state step: AdamW makes its state at its first step, and a pipeline
    schedule sets itself up (infers its stages' shapes, running each stage forward and backward) at its first
    step. With a pipeline, a first full step does both; without, one optimizer step on zero gradients makes the
    state at a fraction of the cost."""
    if trainer.pipeline is not None:
        training_step(trainer, micro_batches)
        return
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def training_step(trainer: Trainer, micro_batches: list[Batch]) -> None:
    """The trainer's step as a training run takes it when its gradient norm is finite."""
    trainer.compute_gradients(micro_batches)
    trainer.apply_gradients()


class StepMarks:
    """Where each micro-batch's forward begins on this rank (its model part's forward pre-hook), as positions
    of running records (`position()`: e.g. the collectives so far and the cost so far)."""

    def __init__(self, parts, position):
        self.position, self.starts = position, []
        self.handles = [part.register_forward_pre_hook(lambda module, args: self.starts.append(self.position()))
                        for part in parts]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def repeated(self, simulated: int, steps: int, layout: ParallelLayout):
        """(start, end, weight): the records between positions start and end (one steady-state micro-batch) count
        `weight` times in the full step (see the module doc); None when every micro-batch ran."""
        if steps == simulated:
            return None
        if layout.pp == 1 and simulated == 2:  # the first micro-batch, from its forward to the second's
            return self.starts[0], self.starts[1], float(steps - 1)
        if layout.pp == 1:  # the second micro-batch, from its forward to the third's
            return self.starts[1], self.starts[2], float(steps - 2)
        first = layout.pp - layout.pp_rank  # 1F1B: the forward of the second backward-forward pair
        return self.starts[first], self.starts[first + 1], float(steps - simulated + 1)
