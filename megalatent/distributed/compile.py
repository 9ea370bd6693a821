"""Regional compilation (--compile): torch.compile of each transformer block, as torchtitan does.

Every block of a model is the same code with other weights, so one compiled graph serves them all (dynamo
inlines the module and guards on its type, not its identity) and compile time does not grow with depth;
the embedding, head and loss stay eager. Applied by parallelize.py after tensor/context/expert parallelism
and activation recomputation (the compiled region is the block as those left it: DTensor plans, the
recomputation wrapper) and before FSDP2.

What is compiled is each block's `forward`; its module hooks (FSDP2's all-gather and reduce-scatter, and
`_materialise_inputs` below) run eagerly around it, as they do around torchtitan's compiled blocks. The
modules stay where they were, so parameter names (and checkpoints) do not change.

Graph breaks (dynamo splitting a block into several graphs) cost speed, not correctness: a dense decoder
block has none (tests/test_compile.py checks it); tools/graph_breaks.py lists those of every family's blocks.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor


def _materialise_inputs(module: nn.Module, args: tuple) -> tuple:
    """A tensor-parallel embedding hands the first block its output as an AsyncCollectiveTensor (a collective
    not yet waited for). Entering a compiled region that way goes wrong (torch 2.13, gloo: dynamo traces the
    wait into the graph; backward then fails in DTensor's redistribution, and with only a norm compiled it
    silently gave the embedding a gradient off by 0.17), so it is waited for here, outside the region: a
    non-view op on it (the copy) returns a plain tensor with its autograd history."""
    return tuple(a.clone() if isinstance(a, AsyncCollectiveTensor) else a for a in args)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    for layer in model.layers.values():
        layer.register_forward_pre_hook(_materialise_inputs)
        layer.forward = torch.compile(layer.forward, backend=backend)


def graph_breaks(run: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(graphs compiled, {reason: count} of graph breaks) while `run()` calls compiled blocks: dynamo's own
    counters (what TORCH_LOGS=graph_breaks prints), reset first. tools/graph_breaks.py reports them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run()
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])
