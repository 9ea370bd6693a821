"""The parallel layout of a job and its device mesh.

One object carries the sizes of every parallel dimension and the mesh built from them; nothing else
keeps parallel state in module globals. The mesh has named dims `pp, dp, cp, tp` with tp innermost,
so tensor-parallel peers are adjacent ranks (inside one node). Today every rank is data-parallel;
tensor, context and pipeline sizes plug in here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelLayout:
    world_size: int
    rank: int = 0
    pp: int = 1
    cp: int = 1
    tp: int = 1
    mesh: Optional[DeviceMesh] = field(default=None, repr=False)

    @property
    def dp(self) -> int:
        return self.world_size // (self.pp * self.cp * self.tp)

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def validation_errors(self) -> list[str]:
        product = self.pp * self.cp * self.tp
        if self.world_size % product:
            return [f"world size {self.world_size} is not divisible by pipeline x context x tensor parallel "
                    f"sizes = {self.pp} x {self.cp} x {self.tp}"]
        return []

    def build_mesh(self, device: torch.device) -> None:
        """Create the device mesh; needs the process group (call after init_process_group)."""
        if self.world_size > 1:
            self.mesh = init_device_mesh(device.type, (self.pp, self.dp, self.cp, self.tp),
                                         mesh_dim_names=("pp", "dp", "cp", "tp"))

    def describe(self) -> str:
        return f"world {self.world_size} = pp {self.pp} x dp {self.dp} x cp {self.cp} x tp {self.tp}"

    def all_reduce_max(self, value: float) -> float:
        """Agree on a value across the job (e.g. 'some rank was signalled')."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], device=self.device_of_group())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def device_of_group(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
