"""A model family's parallel plan: how each kind of parallelism splits its (single-device) model.

`parallelize` (parallelize.py) applies a layout to a model by calling the plan of the model's family;
the plan is the only place that knows the family's module names. Defaults serve the decoder trunk
(megalatent/models/decoder.py); a family overrides what differs and composes the defaults for the rest,
as the families in megalatent/families/ do.

    tensor_parallel(model, mesh, sequence_parallel)  apply TP (+ SP): DTensor plans and anything a family's
                                                     layers need beyond them (distributed/tensor_parallel.py)
    context_parallel(model, cp)                      give every token-mixing core its context-parallel form
                                                     and wrap sequence-wide steps (distributed/context_parallel/)
    context_parallel_split                           how a sequence is cut over the cp ranks
    pipeline                                         which of the model's modules each pipeline stage keeps
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megalatent.distributed.context_parallel import ContextParallelAttention
from megalatent.distributed.tensor_parallel import apply_tensor_parallel
from megalatent.nn.attention import causal_attention


@dataclass(frozen=True)
class ContextParallel:
    """What a context-parallel plan needs to know: the cp group, this rank's place in it, the tokens each
    rank holds, and where to get further process groups (ParallelLayout.subgroup)."""
    group: object
    rank: int
    size: int
    local_length: int
    new_group: Callable[[tuple[int, ...]], object]


@dataclass(frozen=True)
class PipelineSplit:
    """What a pipeline stage keeps of the model besides its layers (`model.layers`, a ModuleDict keyed by
    the global layer index). `first`: top-level modules only the first stage holds (the embedding); `last`:
    only the last stage (final norm, head); `with_layer(cfg)`: {module: layer index}, modules kept by the
    stage that holds that layer (e.g. a projection shared by the layers after it). A stage sets the modules
    it does not keep to None; the model's forward treats a missing embedding as "the input is hidden
    states", a missing head as "return what the next stage needs"."""
    first: tuple[str, ...] = ("embed_tokens",)
    last: tuple[str, ...] = ("norm", "output")
    with_layer: Callable[[object], dict[str, int]] = lambda cfg: {}


def replace_cores(model: nn.Module, make: Callable[[object], object | None]) -> list[object]:
    """Swap every layer's attention core `c` for `make(c)` (None: keep it). Layers sharing a core keep sharing
    its replacement. Returns the new cores."""
    replaced: dict[int, object] = {}
    for layer in model.layers.values():
        core = getattr(layer.attention, "core_attention", None)
        if core is None:
            continue
        if id(core) not in replaced:
            replaced[id(core)] = make(core)
        if replaced[id(core)] is not None:
            layer.attention.core_attention = replaced[id(core)]
    return [c for c in replaced.values() if c is not None]


def dense_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Causal softmax attention cores get the all-gather form (distributed/context_parallel/dense.py)."""
    replace_cores(model, lambda core: ContextParallelAttention(cp.group) if core is causal_attention else None)


@dataclass(frozen=True)
class ParallelPlan:
    tensor_parallel: Callable[[nn.Module, DeviceMesh, bool], None] = apply_tensor_parallel
    context_parallel: Callable[[nn.Module, ContextParallel], None] = dense_context_parallel
    context_parallel_split: str = "zigzag"
    pipeline: PipelineSplit = field(default_factory=PipelineSplit)


DECODER_PLAN = ParallelPlan()
