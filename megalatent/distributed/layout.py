"""The parallel layout of a job and its device mesh.

One object carries the sizes of every parallel dimension and the mesh built from them; nothing else
keeps parallel state in module globals. The mesh has named dims `pp, dp, cp, tp` with tp innermost,
so tensor-parallel peers are adjacent ranks (inside one node). Expert parallelism (carved out of
dp x cp for expert weights, Megatron's "parallel folding") plugs in here.
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
    tp: int = 1
    pp: int = 1
    cp: int = 1
    mesh: Optional[DeviceMesh] = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg, world_size: int, rank: int = 0) -> "ParallelLayout":
        return cls(world_size=world_size, rank=rank, tp=cfg.parallel.tensor_model_parallel_size,
                   pp=cfg.parallel.pipeline_model_parallel_size, cp=cfg.parallel.context_parallel_size)

    @property
    def dp(self) -> int:
        return self.world_size // (self.pp * self.cp * self.tp)

    def _local_rank(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self._local_rank("tp")

    @property
    def pp_rank(self) -> int:
        return self._local_rank("pp")

    @property
    def cp_rank(self) -> int:
        return self._local_rank("cp")

    def fsdp_mesh(self) -> DeviceMesh:
        """Weights are replicated over dp and cp, so FSDP shards them (and reduces gradients) over both."""
        return self.mesh["dp", "cp"]._flatten("dp_cp") if self.cp > 1 else self.mesh["dp"]

    def group(self, dim: str):
        return self.mesh[dim].get_group()

    def build_mesh(self, device: torch.device) -> None:
        """Create the device mesh; needs the process group (call after init_process_group)."""
        if self.world_size > 1:
            self.mesh = init_device_mesh(device.type, (self.pp, self.dp, self.cp, self.tp),
                                         mesh_dim_names=("pp", "dp", "cp", "tp"))

    def describe(self) -> str:
        return f"world {self.world_size} = pp {self.pp} x dp {self.dp} x cp {self.cp} x tp {self.tp}"

    def coordinates(self) -> str:
        """This rank's place in the mesh, e.g. 'rank 5: pp 0, dp 1, cp 0, tp 1'."""
        names = ("pp", "dp", "cp", "tp")
        return f"rank {self.rank}: " + ", ".join(f"{n} {self._local_rank(n)}" for n in names)

    def all_reduce_max(self, value: float) -> float:
        """Agree on a value across the whole job (e.g. 'some rank was signalled')."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_reduce_sum(self, t: torch.Tensor, dims: tuple[str, ...]) -> torch.Tensor:
        """Sum over the named mesh dims, e.g. ("dp",) for the ranks holding different samples."""
        for dim in dims:
            if getattr(self, dim) > 1:
                dist.all_reduce(t, group=self.group(dim))
        return t

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

