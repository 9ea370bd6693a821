"""A layout's predicted step time and MFU, from its simulated ranks.

Per rank role (simulate.RankReport):
  compute        the roofline time of its operators (cost.py)
  communication  each collective at the bandwidth of its group's links: NVLink when all its ranks share a
                 node (ranks are numbered node by node), else InfiniBand (one NIC per GPU, the bottleneck of a
                 ring that leaves the node), plus a fixed latency per call; the usual formulas for the bytes
                 one rank sends: ring all-reduce 2(n-1)/n x S, all-gather and reduce-scatter (n-1)/n x S
                 (S the gathered size), all-to-all (n-1)/n x S, broadcast and send/recv S.
  overlap        FSDP's all-gathers and reduce-scatters (collectives.Transfer.fsdp: FSDP issued them) run on
                 their own streams, prefetched a layer ahead: they overlap the compute, so the role takes
                 max(compute, FSDP time). Every other collective
                 (tensor and context parallelism, expert all-to-all, pipeline send/recv, the loss and
                 grad-norm all-reduces) waits in eager PyTorch and adds to it.
Pipeline: the stages run their micro-batches in a schedule whose bubble stretches the slowest stage by
(p - 1) / (v m) (p pipeline ranks, v stages per rank, m micro-batches): 1F1B and interleaved 1F1B; the
zero-bubble schedules are charged the same (an upper bound).
MFU = the model's FLOPs per step (the family's count, Megatron's convention, as the trainer logs) / (step
time x GPUs x the GPU's dense bf16 peak).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megalatent.config import Config
from megalatent.families import get_family
from megalatent.planning.collectives import Transfer
from megalatent.planning.hardware import Target
from megalatent.planning.simulate import RankReport

LATENCY_S = {"nvlink": 10e-6, "ib": 20e-6}  # per collective call (NCCL's small-message latency, roughly)
_SENT_FRACTION = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
                  "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
                  "broadcast": lambda n: 1.0, "send": lambda n: 1.0, "recv": lambda n: 1.0}


@dataclass
class GroupTraffic:
    """One rank's collectives of one kind over one mesh dimension in a step."""
    label: str
    collective: str  # all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send, recv
    calls: float = 0   # fractional when a pipeline's simulated micro-batches are scaled to the step's
    bytes: float = 0
    seconds: float = 0.0
    link: str = "nvlink"
    overlapped: bool = False


@dataclass
class RoleEstimate:
    rank: int
    stages: list[int]
    compute_s: float
    memory_bound_s: float  # the part of compute_s set by HBM bandwidth rather than FLOPs
    exposed_comm_s: float
    overlapped_comm_s: float
    traffic: list[GroupTraffic] = field(default_factory=list)

    @property
    def busy_s(self) -> float:
        return max(self.compute_s, self.overlapped_comm_s) + self.exposed_comm_s


@dataclass
class StepEstimate:
    roles: list[RoleEstimate]
    bubble_fraction: float
    step_s: float
    model_flops: float
    tokens_per_step: int
    mfu: float
    tokens_per_s_per_gpu: float


def mesh_shape(cfg: Config, world_size: int) -> dict[str, int]:
    p = cfg.parallel
    pp, cp, tp = p.pipeline_model_parallel_size, p.context_parallel_size, p.tensor_model_parallel_size
    return {"pp": pp, "dp": world_size // (pp * cp * tp), "cp": cp, "tp": tp}


def spanned_dims(ranks: tuple[int, ...], shape: dict[str, int]) -> str:
    """The mesh dims along which `ranks` differ ('cp', 'dp×cp', ...; '(part)' when they are not all of them)."""
    sizes = list(shape.values())
    coordinates = []
    for r in ranks:
        c = []
        for size in reversed(sizes):
            c.append(r % size)
            r //= size
        coordinates.append(tuple(reversed(c)))
    varying = [d for i, d in enumerate(shape) if len({c[i] for c in coordinates}) > 1]
    full = 1
    for d in varying:
        full *= shape[d]
    return "×".join(varying) + ("" if full == len(ranks) else f" (part: {len(ranks)} ranks)")


def link(ranks: tuple[int, ...], gpus_per_node: int) -> str:
    return "nvlink" if len({r // gpus_per_node for r in ranks}) == 1 else "ib"


def transfer_seconds(t: Transfer, link_kind: str, target: Target) -> float:
    n = len(t.ranks)
    bandwidth = 1e9 * (target.nvlink_gbps if link_kind == "nvlink" else target.ib_gbps)
    return LATENCY_S[link_kind] + _SENT_FRACTION[t.kind](n) * t.bytes / bandwidth


def estimate_role(report: RankReport, target: Target, gpus_per_node: int, shape: dict[str, int]) -> RoleEstimate:
    traffic: dict[tuple[str, str, bool], GroupTraffic] = {}
    overlapped = exposed = 0.0
    for t, weight in zip(report.transfers, report.weights):
        name = t.group or spanned_dims(t.ranks, shape)
        kind = link(t.ranks, gpus_per_node)
        seconds = weight * transfer_seconds(t, kind, target)
        g = traffic.setdefault((name, t.kind, t.fsdp), GroupTraffic(name, t.kind, link=kind, overlapped=t.fsdp))
        g.calls, g.bytes, g.seconds = g.calls + weight, g.bytes + weight * t.bytes, g.seconds + seconds
        g.link = "ib" if kind == "ib" else g.link
        if t.fsdp:
            overlapped += seconds
        else:
            exposed += seconds
    return RoleEstimate(report.rank, report.stages, report.cost.compute_s, report.cost.memory_bound_s, exposed,
                        overlapped, sorted(traffic.values(), key=lambda g: -g.bytes))


def estimate_step(cfg: Config, world_size: int, reports: list[RankReport], target: Target,
                  gpus_per_node: int) -> StepEstimate:
    shape = mesh_shape(cfg, world_size)
    roles = [estimate_role(r, target, gpus_per_node, shape) for r in reports]
    t, p = cfg.training, cfg.parallel
    pp = p.pipeline_model_parallel_size
    dp = world_size // (pp * p.tensor_model_parallel_size * p.context_parallel_size)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    stages_per_rank = max(1, len(reports[0].stages))
    bubble = (pp - 1) / (stages_per_rank * micro_batches) if pp > 1 else 0.0
    step = max(r.busy_s for r in roles) * (1 + bubble)
    tokens = t.global_batch_size * cfg.model.seq_length
    model_flops = get_family(cfg.model.model_family).flops_per_token(cfg.model) * tokens
    mfu = model_flops / (step * world_size * 1e12 * target.peak_tflops)
    return StepEstimate(roles, bubble, step, model_flops, tokens, mfu, tokens / step / world_size)
