"""The parallel layout of a job and its device mesh.

One object carries the sizes of every parallel dimension and the mesh built from them; nothing else
keeps parallel state in module globals. The mesh has named dims `pp, dp, cp, tp` with tp innermost,
so tensor-parallel peers are adjacent ranks (inside one node).

Expert parallelism is carved out of dp x cp (Megatron's "parallel folding"): the dp x cp ranks of one
(pp, tp) coordinate, in mesh order, are regrouped as edp x ep with ep innermost, so an `ep` group is
ep consecutive data/context-parallel ranks and `edp` (expert data parallel) the ranks holding the same
experts. That regrouping is a second mesh over the same ranks, `expert_mesh` ("pp", "edp", "tp", "ep").
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
    ep: int = 1
    mesh: Optional[DeviceMesh] = field(default=None, repr=False)
    expert_mesh: Optional[DeviceMesh] = field(default=None, repr=False)
    _fsdp_mesh: Optional[DeviceMesh] = field(default=None, repr=False)
    _token_mesh: Optional[DeviceMesh] = field(default=None, repr=False)
    _expert_fsdp_mesh: Optional[DeviceMesh] = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg, world_size: int, rank: int = 0) -> "ParallelLayout":
        return cls(world_size=world_size, rank=rank, tp=cfg.parallel.tensor_model_parallel_size,
                   pp=cfg.parallel.pipeline_model_parallel_size, cp=cfg.parallel.context_parallel_size,
                   ep=cfg.parallel.expert_model_parallel_size)

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
        if self._fsdp_mesh is None:
            self._fsdp_mesh = self.mesh["dp", "cp"]._flatten("dp_cp") if self.cp > 1 else self.mesh["dp"]
        return self._fsdp_mesh

    @property
    def edp(self) -> int:
        return self.dp * self.cp // self.ep

    def token_mesh(self) -> DeviceMesh:
        """The ranks of one pipeline stage that hold different tokens inside an MoE layer: dp x cp, and the
        tp ranks too, which split an MoE layer's tokens between them (see tensor_parallel.py)."""
        if self._token_mesh is None:
            dims = tuple(d for d in ("dp", "cp", "tp") if getattr(self, d) > 1) or ("dp",)
            self._token_mesh = self.mesh[dims]._flatten("_".join(dims)) if len(dims) > 1 else self.mesh[dims[0]]
        return self._token_mesh

    def token_group(self):
        """The process group of `token_mesh`; None when one rank holds all the tokens."""
        return self.token_mesh().get_group() if self.dp * self.cp * self.tp > 1 else None

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """The ranks holding the same experts but different tokens: edp (x tp), where expert gradients are
        summed and FSDP shards the expert weights."""
        if self._expert_fsdp_mesh is None:
            self._expert_fsdp_mesh = (self.expert_mesh["edp"] if self.tp == 1
                                      else self.expert_mesh["edp", "tp"]._flatten("edp_tp"))
        return self._expert_fsdp_mesh

    def group(self, dim: str):
        return self.mesh[dim].get_group()

    def build_mesh(self, device: torch.device) -> None:
        """Create the device mesh; needs the process group (call after init_process_group)."""
        if self.world_size > 1:
            self.mesh = init_device_mesh(device.type, (self.pp, self.dp, self.cp, self.tp),
                                         mesh_dim_names=("pp", "dp", "cp", "tp"))
            if self.ep > 1:
                # The same ranks regrouped; ep goes last (a permuted view, not a different assignment) so that
                # FSDP's mesh (edp x tp, flattened) and the experts' ep mesh form an ordered 2-D mesh.
                ranks = torch.arange(self.world_size).view(self.pp, self.edp, self.ep, self.tp).permute(0, 1, 3, 2)
                self.expert_mesh = DeviceMesh(device.type, ranks, mesh_dim_names=("pp", "edp", "tp", "ep"))

    def describe(self) -> str:
        text = f"world {self.world_size} = pp {self.pp} x dp {self.dp} x cp {self.cp} x tp {self.tp}"
        return text + (f" (experts: edp {self.edp} x ep {self.ep} over dp x cp)" if self.ep > 1 else "")

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

