"""Initial weights as a pure function of (seed, parameter name, position): the same values whichever device,
shard or construction order holds them.

A model says how each of its tensors starts (`Init`, from its `initial_value(name, shape)`); the values of
a tensor are drawn in blocks of rows, each block from its own generator keyed by (seed, the tensor's global
name, the block's index). So a rank that holds some rows (or some columns of some rows) of a sharded
parameter draws only the blocks it overlaps, and gets exactly the values a single process holding the whole
tensor has there (distributed/materialize.py fills models, their DTensor shards included). No draw depends on the order in
which modules were built or on any global RNG state.

The generator is numpy's PCG64 seeded through a SeedSequence of the whole key (torch's CPU generator keeps
32 bits of a seed, so distinct keys could collide); values are drawn in float32 and cast.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

# Elements per block of rows (at least one row): small next to any layer, large enough that the generators'
# set-up is negligible.
BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Init:
    """How a tensor starts: "normal" (mean 0, std `scale`), "uniform" (in [-scale, scale]), "zeros", "ones"."""
    kind: str
    scale: float = 0.0

    def __post_init__(self):
        if self.kind not in ("normal", "uniform", "zeros", "ones"):
            raise ValueError(f"unknown initialisation {self.kind!r}")


ZEROS, ONES = Init("zeros"), Init("ones")


def _name_key(name: str) -> list[int]:
    """A stable key of a name (Python's hash() changes from process to process)."""
    digest = hashlib.sha256(name.encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def _draw(init: Init, seed: int, key: list[int], block: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key, block])))
    if init.kind == "normal":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(init.scale)
    return rng.uniform(-init.scale, init.scale, shape).astype(np.float32)


@torch.no_grad()
def fill_region_(local: torch.Tensor, init: Init, seed: int, name: str, global_shape: Sequence[int],
                 offset: Sequence[int]) -> None:
    """Write into `local` the values of the region of tensor `name` (of `global_shape`) that starts at `offset`
    and has `local`'s shape."""
    if init.kind in ("zeros", "ones"):
        local.fill_(0.0 if init.kind == "zeros" else 1.0)
        return
    shape = tuple(global_shape) or (1,)
    offset = tuple(offset) or (0,)
    region = local.view(1) if local.dim() == 0 else local
    row_elements = math.prod(shape[1:])
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    first, last = offset[0], offset[0] + region.shape[0]
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], region.shape[1:]))
    key = _name_key(name)
    for block in range(first // rows_per_block, -(-last // rows_per_block)):
        start, end = block * rows_per_block, min((block + 1) * rows_per_block, shape[0])
        values = _draw(init, seed, key, block, (end - start,) + shape[1:])
        lo, hi = max(first, start), min(last, end)
        region[lo - first:hi - first].copy_(torch.from_numpy(values[(slice(lo - start, hi - start),) + columns]))


def initial_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, named as in checkpoints: what must be initialised."""
    return list(module.state_dict(keep_vars=True).items())
