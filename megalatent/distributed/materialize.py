"""Materialising a model that was built and parallelized on the meta device.

Every rank builds the model on the meta device (no memory), applies its layout there (TP/SP plans, CP
cores, EP, recomputation, FSDP2: the parameters become DTensors whose local shards are still meta), and
only then allocates what it holds: `to_empty` gives each local shard its memory on the device, and each is
filled with the values a single process would hold at those positions of the whole tensor
(megalatent/nn/init.py draws them in blocks of rows keyed by (seed, name, block)). So a rank's memory
during construction is its shard plus one block of rows, and the initial weights do not depend on the
layout: every equivalence test compares like with like.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megalatent.nn.init import fill_region_, initial_tensors


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate this rank's shards of a meta-device `model` on `device` and initialise them (the model's
    `initial_value` rules, names as in checkpoints)."""
    model.to_empty(device=device)
    initialize(model, seed)
    return model


@torch.no_grad()
def initialize(model: nn.Module, seed: int) -> None:
    """Fill every parameter and persistent buffer of `model` (its local shard, for a DTensor) by the model's
    `initial_value` rules: the same values wherever a position is held."""
    for name, tensor in initial_tensors(model):
        init = model.initial_value(name, tuple(tensor.shape))
        if isinstance(tensor, DTensor):
            local = tensor.to_local()
            shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            assert tuple(local.shape) == tuple(shape), (name, local.shape, shape)
        else:
            local, offset = tensor, (0,) * tensor.dim()
        fill_region_(local, init, seed, name, tensor.shape, offset)
