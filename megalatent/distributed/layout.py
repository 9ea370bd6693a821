"""The parallel layout of a job: its rules, its device mesh and its process groups.

One object carries the sizes of every parallel dimension, the mesh built from them and every process
group made for the job (`subgroup`); no module keeps parallel state in globals. The mesh has named dims `pp, dp, cp, tp` with tp innermost,
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

from megalatent.distributed.pipeline import PipelinePlanError, plan_pipeline


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
    _sequence_mesh: Optional[DeviceMesh] = field(default=None, repr=False)
    _subgroups: dict = field(default_factory=dict, repr=False)

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

    def sequence_mesh(self) -> DeviceMesh:
        """The ranks one micro-batch's sequence is spread over: cp x tp of this (pp, dp) coordinate (context
        parallelism cuts the sequence; tensor parallelism shards it, or its features, or replicates it). Under
        context parallelism FP8's activation and output-gradient scales are reduced over them (fp8.py)."""
        if self._sequence_mesh is None:
            dims = tuple(d for d in ("cp", "tp") if getattr(self, d) > 1) or ("cp",)
            self._sequence_mesh = self.mesh[dims]._flatten("_".join(dims)) if len(dims) > 1 else self.mesh[dims[0]]
        return self._sequence_mesh

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

    def subgroup(self, ranks: tuple[int, ...]):
        """The process group of these global ranks, made once per job: a second group over the same ranks
        would share its rendezvous keys with the first. Only the members call this for a set of ranks
        (use_local_synchronization), so groups of other members need not take part."""
        if ranks not in self._subgroups:
            self._subgroups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
        return self._subgroups[ranks]

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


def layout_errors(cfg, world_size: int) -> tuple[list[str], int]:
    """The layout rules: every parallel size must divide what it splits. Returns (errors, dp size).
    Pure: run before any process group exists."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    e: list[str] = []
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for flag, size in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                       ("context-parallel-size", cp)):
        if size < 1:
            e.append(f"--{flag} must be >= 1, got {size}")
    if e:
        return e, 1
    if world_size % (tp * pp * cp):
        e.append(f"the world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                 f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple of "
                 f"{tp * pp * cp} processes")
        return e, 1
    dp = world_size // (tp * pp * cp)
    if cp > 1 and m.seq_length % (2 * cp):
        e.append(f"--context-parallel-size {cp}: --seq-length {m.seq_length} must be divisible by 2 x {cp} "
                 "(each rank holds two chunks, one early and one late, to balance causal attention)")

    for key, value in (("num_attention_heads", m.num_attention_heads), ("make_vocab_size_divisible_by",
                       m.make_vocab_size_divisible_by), ("ffn_hidden_size", m.mlp_width)):
        if value >= 1 and value % tp:
            e.append(f"--{key.replace('_', '-')} {value} must be divisible by --tensor-model-parallel-size {tp}")
    if m.group_query_attention and m.num_query_groups and m.num_query_groups % tp:
        e.append(f"--num-query-groups {m.num_query_groups} must be divisible by --tensor-model-parallel-size "
                 f"{tp} (each tensor-parallel rank holds whole K/V heads)")
    ep = p.expert_model_parallel_size
    if ep < 1:
        e.append(f"--expert-model-parallel-size must be >= 1, got {ep}")
    elif ep > 1 and (dp * cp) % ep:
        e.append(f"--expert-model-parallel-size {ep} must divide data-parallel size {dp} x --context-parallel-size "
                 f"{cp} = {dp * cp} (expert parallelism is carved out of those ranks)")
    elif ep > 1 and (m.num_experts is None or m.num_experts % ep):
        e.append(f"--expert-model-parallel-size {ep} needs --num-experts divisible by it (each rank holds "
                 f"--num-experts / {ep} experts), got --num-experts {m.num_experts}")
    if m.num_experts is not None and tp > 1 and (m.seq_length // cp) % tp:
        e.append(f"--num-experts with --tensor-model-parallel-size {tp}: each TP rank routes 1/{tp} of the tokens, so "
                 f"the tokens per context-parallel rank (--seq-length {m.seq_length} / {cp}) must be divisible by {tp}")
    if p.sequence_parallel and tp == 1:
        e.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards over the TP ranks)")
    elif p.sequence_parallel and (m.seq_length // cp) % tp:
        e.append(f"--sequence-parallel: the tokens per context-parallel rank (--seq-length {m.seq_length} / "
                 f"{cp}) must be divisible by --tensor-model-parallel-size {tp}")

    pipeline_flags = {"num_layers_per_virtual_pipeline_stage": p.num_layers_per_virtual_pipeline_stage,
                      "pipeline_schedule": p.pipeline_schedule,
                      "decoder_first_pipeline_num_layers": p.decoder_first_pipeline_num_layers,
                      "decoder_last_pipeline_num_layers": p.decoder_last_pipeline_num_layers}
    if pp == 1:
        for key, value in pipeline_flags.items():
            if value is not None:
                e.append(f"--{key.replace('_', '-')} needs --pipeline-model-parallel-size > 1")
        return e, dp
    try:
        plan = plan_pipeline(cfg, pp)
    except PipelinePlanError as err:
        return e + [str(err)], dp
    if t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0:
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if n_micro < pp or (plan.stages_per_rank > 1 and n_micro % pp):
            e.append(f"{plan.schedule} over {pp} pipeline stages needs a number of micro-batches per step "
                     f"(--global-batch-size / (--micro-batch-size x data-parallel size) = {n_micro}) that is "
                     f">= {pp}" + (f" and a multiple of {pp}" if plan.stages_per_rank > 1 else ""))
    return e, dp
