"""A rank's memory over one training step, by torch's MemTracker.

MemTracker (torch.distributed._tools.mem_tracker) follows every tensor storage the step creates or frees
(its dispatch mode; sizes rounded up to the CUDA caching allocator's 512-byte blocks) and keeps the peak.
`StepMemoryTracker` uses it without its per-module statistics, which a training step cannot give it: a step
runs the model once per micro-batch (MemTracker refuses a second forward of the root module), and the
backward hooks it puts on module outputs break `torch.autograd.grad`, which pipelining runs to infer shapes
and in its zero-bubble schedules. Without them it still knows parameters, buffers and optimizer state (what
it is told to track, and what the optimizer step makes); gradients are named as such after the step.

What a rank holds (`Memory`): its parameters, gradients and optimizer state are held from step to step; the
peak is the most the step held at once, and `activations` the rest of the peak (activations, temporaries,
weights gathered by FSDP, communication buffers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType


class _NoModules:
    """Stands in for MemTracker's ModTracker: no module hooks, never 'in backward' (so MemTracker calls every
    new storage outside the optimizer step an activation)."""

    is_bw = False
    parents = frozenset({"Global"})

    def register_user_hooks(self, *hooks) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def __enter__(self) -> "_NoModules":
        return self

    def __exit__(self, *args) -> None:
        pass


class StepMemoryTracker(MemTracker):
    def __init__(self):
        super().__init__()
        self._mod_tracker = _NoModules()

    def name_gradients(self, parts: list[nn.Module]) -> None:
        """After the step: the parameters' gradients are gradients (the step made them as other storages)."""
        for part in parts:
            self._track_module_params_and_buffers(part, install_grad_hooks=False)


@dataclass
class Memory:
    parameters: int = 0        # this rank's parameters and buffers (its shards)
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0       # the rest of the peak
    peak: int = 0


def memory_of_step(after: dict, peak: dict, device: torch.device) -> Memory:
    """`Memory` from the tracker's snapshot after the step (with gradients named) and its peak snapshot."""
    held, top = after.get(device, {}), peak.get(device, {})
    kinds = _MemRefType
    memory = Memory(parameters=held.get(kinds.PARAM, 0) + held.get(kinds.BUFFER, 0),
                    gradients=held.get(kinds.GRAD, 0), optimizer_state=held.get(kinds.OPT, 0),
                    peak=top.get("Total", 0))
    memory.activations = memory.peak - memory.parameters - memory.gradients - memory.optimizer_state
    return memory
