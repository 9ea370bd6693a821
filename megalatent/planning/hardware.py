"""The machines a run is planned for, and what a run on them does differently from one on this CPU.

Numbers are datasheet values (reference/systems.md §7): dense bf16 tensor-core peak, HBM bandwidth, the
memory CUDA reports as the device's total (`torch.cuda.get_device_properties().total_memory`), NVLink and
InfiniBand bandwidth per GPU and direction. `--peak-tflops`, `--nvlink-gbps`, `--ib-gbps` replace them with
measured ones.

A simulated GPU run differs from a CPU run of the same config in what the code chooses by device
(`Target.prepare`): bf16 autocast with bf16 FSDP all-gathers (the default on a GPU; `--bf16/--no-bf16` in the
config still wins), the attention kernels a GPU takes (`--attention-backend auto` becomes the kernels'
`gpu` choice: kernels/backend.py), fused AdamW (no per-tensor temporaries in the optimizer step), and what
PyTorch itself decides by device (`Target.kernels`): SDPA with a lower-right causal bias (fewer queries than
keys: a context-parallel rank's queries against the keys gathered before them) runs flash attention, where on
the CPU it would materialise the queries x keys mask.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from torch.nn.attention import bias as attention_bias

from megalatent.config import Config

GiB = 2 ** 30


@dataclass(frozen=True)
class Target:
    name: str
    peak_tflops: float            # dense bf16 (what MFU is measured against)
    memory_gib: float             # total device memory as CUDA reports it
    hbm_tbps: float               # memory bandwidth, TB/s
    nvlink_gbps: float            # per GPU and direction, GB/s (inside a node)
    ib_gbps: float                # per GPU and direction, GB/s (between nodes)
    gpu: bool = True              # False: this machine's CPU (the planner's honesty tests)
    compute_tflops: Optional[float] = None  # --peak-tflops: a measured throughput for the compute time

    @property
    def peak_flops(self) -> float:
        return 1e12 * (self.compute_tflops or self.peak_tflops)

    @property
    def memory_bandwidth(self) -> float:
        return 1e12 * self.hbm_tbps

    def prepare(self, cfg: Config) -> Config:
        """What the run does on this device that it decides by device (see the module doc); `cfg` is changed
        in place and returned."""
        if self.gpu:
            if cfg.training.bf16 is None:
                cfg.training.bf16 = True
            if cfg.model.attention_backend == "auto":
                cfg.model.attention_backend = "gpu"
        return cfg

    @contextlib.contextmanager
    def kernels(self) -> Iterator[None]:
        """PyTorch's own kernel choices as on this device (see the module doc)."""
        if not self.gpu:
            yield
            return
        chooses_flash = attention_bias.can_use_flash_attention
        attention_bias.can_use_flash_attention = lambda params, debug=False: True
        try:
            yield
        finally:
            attention_bias.can_use_flash_attention = chooses_flash

    def prepare_optimizers(self, optimizers) -> None:
        """On a GPU the trainer's AdamW is the fused kernel (training/optim.py: fused on CUDA parameters)."""
        if self.gpu:
            for opt in optimizers:
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = True, False


GPUS = {
    "h100-80gb": Target("h100-80gb", peak_tflops=989.0, memory_gib=79.18, hbm_tbps=3.35, nvlink_gbps=450.0,
                        ib_gbps=50.0),
    "h200-141gb": Target("h200-141gb", peak_tflops=989.0, memory_gib=139.8, hbm_tbps=4.8, nvlink_gbps=450.0,
                         ib_gbps=50.0),
    "a100-80gb": Target("a100-80gb", peak_tflops=312.0, memory_gib=79.15, hbm_tbps=2.04, nvlink_gbps=300.0,
                        ib_gbps=25.0),
    "a100-40gb": Target("a100-40gb", peak_tflops=312.0, memory_gib=39.4, hbm_tbps=1.56, nvlink_gbps=300.0,
                        ib_gbps=25.0),
}

# This machine's CPU: only memory and collectives are compared against a real run (tests); its "bandwidths"
# are placeholders, never reported.
HOST = Target("cpu", peak_tflops=1.0, memory_gib=0.0, hbm_tbps=0.05, nvlink_gbps=10.0, ib_gbps=10.0, gpu=False)


def target(name: str, peak_tflops: Optional[float] = None, nvlink_gbps: Optional[float] = None,
           ib_gbps: Optional[float] = None) -> Target:
    if name == "cpu":
        return HOST
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is unknown; choose one of {sorted(GPUS)}")
    t = GPUS[name]
    return replace(t, compute_tflops=peak_tflops, nvlink_gbps=nvlink_gbps or t.nvlink_gbps,
                   ib_gbps=ib_gbps or t.ib_gbps)


def device_memory(t: Target) -> int:
    return int(t.memory_gib * GiB)

