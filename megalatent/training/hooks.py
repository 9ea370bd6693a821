"""Step hooks: what a model's optional features do around each training step, without the trainer
knowing them (today: the mixture-of-experts bookkeeping, training/moe_stats.py).

Per step the trainer calls, on every rank:
    start_step(micro_batches)   before the first micro-batch's forward
    end_step(device)            after the last backward, before the optimizer step; may run collectives
                                (every rank calls it); returns what to log, or None
    after_optimizer_step()      once the optimizer has stepped (not on a skipped step)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


@dataclass
class StepReport:
    line: list[tuple[str, str]] = field(default_factory=list)  # (label, formatted value) on the iteration line
    scalars: dict[str, float] = field(default_factory=dict)    # tensorboard / wandb scalars


class StepHook(Protocol):
    def start_step(self, micro_batches: int) -> None: ...

    def end_step(self, device: torch.device) -> Optional[StepReport]: ...

    def after_optimizer_step(self) -> None: ...
