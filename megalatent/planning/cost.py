"""What a rank's operators cost: FLOPs by torch's own formulas, and a roofline time on a given GPU.

torch.utils.flop_counter.FlopCounterMode counts an operator on DTensors at the DTensor's global shape, so a
tensor-parallel rank would be charged the whole matmul; and RuntimeEstimator's roofline asks the local CUDA
driver for the GPU's peak, which a CPU machine has not. `OperatorCost` applies the same two things to the
operators each rank really runs: it lets DTensor desugar first (as torch's MemTracker does), takes every
operator's FLOPs from FlopCounterMode's registry (`flop_registry`), and charges it RuntimeEstimator's roofline,
max(FLOPs / peak, bytes read and written / memory bandwidth), skipping the operators torch's estimator skips
(views, tensor creation) and collectives (priced by estimate.py).

The time is that of eager PyTorch, one kernel per operator, at the GPU's peaks: no launch overheads and no
fusion (torch.compile would fuse the memory-bound chains).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._runtime_estimation import _IGNORE_OPS
from torch.utils.flop_counter import flop_registry

from megalatent.planning.collectives import _OPS as COLLECTIVES
from megalatent.planning.world import tensors_in

aten = torch.ops.aten
# Fake tensors live on the CPU, where SDPA picks its CPU flash-attention kernel; it stands for the GPU's flash
# attention, whose formula (same arguments first) applies. (CPU operator -> GPU operator)
_CPU_STAND_INS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        aten._scaled_dot_product_flash_attention_backward,
}
# Flash attention skips the key blocks its causal mask hides, which torch's formulas count: operator ->
# (position of is_causal, of the query, of the key).
_CAUSAL = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (4, 0, 1),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (7, 1, 2),
    aten._scaled_dot_product_flash_attention.default: (4, 0, 1),
    aten._scaled_dot_product_flash_attention_backward.default: (11, 1, 2),
}
# Allocations without a write: no memory traffic.
_NO_TRAFFIC = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided}


def visible_fraction(queries: int, keys: int) -> float:
    """The pairs a causal mask leaves visible when the queries are the last of the keys (flash attention's
    alignment): query i of q sees k - q + 1 + i keys; 1/2 + 1/(2q) for as many queries as keys."""
    return (queries * (keys - queries) + queries * (queries + 1) / 2) / (queries * keys)


def operator_flops(func, args, kwargs, out) -> float:
    """FLOPs of one operator by torch's formulas (flop_counter.flop_registry); 0 for one without a formula."""
    packet = _CPU_STAND_INS.get(func, func._overloadpacket)
    if packet not in flop_registry:
        return 0.0
    flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
    if func in _CAUSAL:
        causal_at, q_at, k_at = _CAUSAL[func]
        if (args[causal_at] if len(args) > causal_at else kwargs.get("is_causal", False)):
            flops *= visible_fraction(args[q_at].shape[-2], args[k_at].shape[-2])
    return flops


@dataclass
class Cost:
    flops: float = 0.0          # counted FLOPs (matmuls, attention kernels) of this rank's operators
    compute_s: float = 0.0      # roofline time of those operators
    memory_bound_s: float = 0.0  # the part of compute_s set by memory bandwidth rather than FLOPs

    def minus(self, other: "Cost") -> "Cost":
        return Cost(self.flops - other.flops, self.compute_s - other.compute_s,
                    self.memory_bound_s - other.memory_bound_s)

    def plus(self, other: "Cost", times: float = 1.0) -> "Cost":
        return Cost(self.flops + times * other.flops, self.compute_s + times * other.compute_s,
                    self.memory_bound_s + times * other.memory_bound_s)


class OperatorCost(TorchDispatchMode):
    """Adds up FLOPs and roofline time of the operators run inside it, for a GPU of `peak_flops` FLOP/s and
    `memory_bandwidth` bytes/s. Only operators on fake tensors count: real ones are the host's bookkeeping."""

    def __init__(self, peak_flops: float, memory_bandwidth: float):
        super().__init__()
        self.peak_flops, self.memory_bandwidth = peak_flops, memory_bandwidth
        self.cost = Cost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # price the local operators DTensor runs, which come back here
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _IGNORE_OPS or packet in _NO_TRAFFIC or func in COLLECTIVES or func.is_view:
            return out
        outputs, inputs = tensors_in(out), tensors_in(args, kwargs)
        if not outputs or not any(isinstance(t, FakeTensor) for t in outputs + inputs):
            return out  # metadata queries; real tensors are the host's bookkeeping
        flops = operator_flops(func, args, kwargs, out)
        moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
        compute, transfer = flops / self.peak_flops, moved / self.memory_bandwidth
        self.cost.flops += flops
        self.cost.compute_s += max(compute, transfer)
        if transfer > compute:
            self.cost.memory_bound_s += transfer
        return out
