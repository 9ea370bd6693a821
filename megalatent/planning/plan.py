"""A plan: a configuration at one layout on a cluster, simulated rank role by rank role, with its verdict.

    plan = plan_layout(cfg, nodes=4, gpus_per_node=8, target=hardware.target("h100-80gb"))
    plan.fits, plan.step.step_s, plan.step.mfu, plan.to_dict()

Fitting: a role fits when its predicted peak, grown by the allocator's fragmentation allowance, plus the
memory a run holds outside PyTorch's tensors (CUDA context, NCCL buffers, cuBLAS workspaces: `reserved`)
is at most the device's memory. Both allowances are assumptions (flags of tools/plan.py), stated with the
result.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from megalatent.config import Config, ConfigError
from megalatent.families import get_family, validate
from megalatent.planning.depth import extrapolate, reduced_depths
from megalatent.planning.estimate import StepEstimate, estimate_step
from megalatent.planning.hardware import GiB, Target, device_memory
from megalatent.planning.simulate import RankReport
from megalatent.planning.workers import simulate_roles


@dataclass(frozen=True)
class Allowances:
    reserved_gib: float = 3.0      # outside PyTorch's allocations: CUDA context, NCCL buffers, workspaces
    fragmentation: float = 0.10    # the caching allocator's reserved-over-allocated, as a fraction


@dataclass
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    target: Target
    allowances: Allowances
    roles: list[RankReport]
    step: StepEstimate
    simulated_layers: Optional[tuple[int, int]] = None  # the two depths extrapolated from (depth.py), or None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def capacity(self) -> int:
        return device_memory(self.target) if self.target.gpu else 0

    def needed(self, report: RankReport) -> int:
        return int(report.memory.peak * (1 + self.allowances.fragmentation) + self.allowances.reserved_gib * GiB)

    def headroom(self, report: RankReport) -> int:
        return self.capacity - self.needed(report)

    @property
    def fits(self) -> bool:
        return all(self.headroom(r) >= 0 for r in self.roles)

    def layout(self) -> dict[str, int]:
        p = self.cfg.parallel
        pp, cp, tp = p.pipeline_model_parallel_size, p.context_parallel_size, p.tensor_model_parallel_size
        return {"tp": tp, "pp": pp, "cp": cp, "dp": self.world_size // (pp * cp * tp),
                "ep": p.expert_model_parallel_size,
                "virtual_stages": max(1, len(self.roles[0].stages)), "sequence_parallel": p.sequence_parallel}

    def to_dict(self) -> dict:
        roles = []
        for report, role in zip(self.roles, self.step.roles):
            roles.append({"rank": report.rank, "coordinates": report.coordinates, "stages": report.stages,
                          "memory_bytes": asdict(report.memory), "needed_bytes": self.needed(report),
                          "headroom_bytes": self.headroom(report), "fits": self.headroom(report) >= 0,
                          "micro_batches": {"simulated": report.micro_batches[0], "step": report.micro_batches[1]},
                          "counted_flops": report.cost.flops, "compute_s": role.compute_s,
                          "memory_bound_compute_s": role.memory_bound_s,
                          "exposed_communication_s": role.exposed_comm_s,
                          "overlapped_communication_s": role.overlapped_comm_s,
                          "communication": [asdict(g) for g in role.traffic],
                          "simulated_in_s": report.simulated_s})
        return {"model_family": self.cfg.model.model_family, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "world_size": self.world_size, "gpu": self.target.name, "capacity_bytes": self.capacity,
                "num_layers": self.cfg.model.num_layers, "simulated_layers": self.simulated_layers,
                "compute_tflops": self.target.peak_flops / 1e12, "peak_tflops": self.target.peak_tflops,
                "allowances": asdict(self.allowances), "layout": self.layout(), "fits": self.fits, "roles": roles,
                "step_s": self.step.step_s, "pipeline_bubble_fraction": self.step.bubble_fraction,
                "model_flops_per_step": self.step.model_flops, "tokens_per_step": self.step.tokens_per_step,
                "tokens_per_s_per_gpu": self.step.tokens_per_s_per_gpu, "mfu": self.step.mfu}


def set_vocab_size(cfg: Config) -> None:
    """The vocabulary a run takes from its data (pretrain.setup), without the data: a family with data of its
    own says it; a text run's is its tokenizer's, which the planner does not read, so --vocab-size must say."""
    if cfg.model.vocab_size is not None:
        return
    data = get_family(cfg.model.model_family).data
    if data is None:
        raise ConfigError(["--vocab-size is needed: the planner reads no tokenizer (give the size of the "
                           "vocabulary of the tokenizer the run will use, e.g. --vocab-size 32000)"])
    if data.vocab_size is not None:
        cfg.model.vocab_size = data.vocab_size(cfg)


def plan_layout(cfg: Config, nodes: int, gpus_per_node: int, target: Target,
                allowances: Allowances = Allowances(), full_depth: bool = False,
                simulate: Callable[[Config, int, Target], list[RankReport]] = simulate_roles) -> Plan:
    """Simulate `cfg` (its layout flags) on nodes x gpus_per_node GPUs of `target`: at two smaller depths,
    extrapolated, when its layers repeat (depth.py) unless `full_depth`. The configuration is checked by the
    trainer's own rules first (ConfigError names every broken one)."""
    world_size = nodes * gpus_per_node
    cfg = target.prepare(copy.deepcopy(cfg))
    set_vocab_size(cfg)
    validate(cfg, world_size)
    reduced = None if full_depth else reduced_depths(cfg, world_size)
    if reduced is None:
        reports, depths = simulate(cfg, world_size, target), None
    else:
        small, large, factor = reduced
        reports = [extrapolate(a, b, factor) for a, b in zip(simulate(small, world_size, target),
                                                              simulate(large, world_size, target))]
        depths = (small.model.num_layers, large.model.num_layers)
    return Plan(cfg, nodes, gpus_per_node, target, allowances, reports,
                estimate_step(cfg, world_size, reports, target, gpus_per_node), depths)
