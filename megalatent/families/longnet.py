"""LongNet (arXiv 2307.02486): the baseline decoder with dilated attention (megalatent/models/longnet.py),
and how its attention splits over devices.

Tensor parallelism: a rank holds a slice of the heads, and a head's dilation offset follows its global
index. Context parallelism: the sequence is split contiguously (segments stay on consecutive ranks) and
each dilated core becomes LongNet's distributed algorithm (distributed/context_parallel/dilated.py).
"""
from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megalatent.config import Config
from megalatent.distributed.context_parallel.dilated import DistributedDilatedAttention
from megalatent.distributed.plan import ContextParallel, ParallelPlan, replace_cores
from megalatent.distributed.tensor_parallel import apply_tensor_parallel
from megalatent.families.family import Family
from megalatent.models.longnet import DilatedCore, LongNetConfig, build, flops_per_token


def dilated_pattern_errors(cfg: Config) -> list[str]:
    """The dilated patterns' rules, for any family built on dilated attention."""
    m, p = cfg.model, cfg.parallel
    w, r = m.segment_lengths, m.dilated_ratios
    if not w or not r:
        return [f"--model-family {m.model_family} needs --segment-lengths and --dilated-ratios "
                "(e.g. --segment-lengths 2048 4096 8192 --dilated-ratios 1 2 4)"]
    e = []
    if len(w) != len(r):
        e.append(f"--segment-lengths has {len(w)} values and --dilated-ratios {len(r)}; give one ratio per length")
    if any(x < 1 for x in w + r):
        e.append("--segment-lengths and --dilated-ratios must be >= 1")
    if any(b <= a for a, b in zip(w, w[1:])) or any(b < a for a, b in zip(r, r[1:])):
        e.append(f"LongNet's patterns are geometric: --segment-lengths {w} must increase and --dilated-ratios "
                 f"{r} must not decrease")
    cp = p.context_parallel_size
    if cp > 1 and m.seq_length % cp == 0 and not e:
        local = m.seq_length // cp
        for x in w:
            x = min(x, m.seq_length)
            if (x <= local and local % x) or (x > local and x % local):
                e.append(f"--context-parallel-size {cp}: each rank holds {local} tokens; a segment length must "
                         f"divide that or be a multiple of it (segments must not straddle ranks), got {x}")
    return e


def offset_heads(model: nn.Module, mesh: DeviceMesh) -> None:
    """Under tensor parallelism: every dilated core learns the global index of this rank's first head."""
    first = mesh.get_local_rank() * (model.cfg.num_attention_heads // mesh.size())
    replace_cores(model, lambda core: dataclasses.replace(core, first_head=first)
                  if isinstance(core, DilatedCore) else None)


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    apply_tensor_parallel(model, mesh, sequence_parallel)
    offset_heads(model, mesh)


def distribute_dilated_cores(model: nn.Module, cp: ContextParallel) -> None:
    """Every dilated core becomes its distributed form; what a rank receives per layer is logged once."""
    def distributed(core):
        if not isinstance(core, DilatedCore):
            return None
        return DistributedDilatedAttention(core.segment_lengths, core.dilated_ratios, cp.group, cp.local_length,
                                           cp.new_group, core.causal, core.first_head, core.backend)

    for core in replace_cores(model, distributed):
        if dist.get_rank() == 0:
            print(f"[context parallel] dilated attention: each rank receives at most {core.expected_rows} K/V "
                  f"rows per head, sequence and layer ({cp.local_length} local tokens)", flush=True)


FAMILY = Family(name="longnet", config=LongNetConfig, build=build, flops_per_token=flops_per_token,
                validate=dilated_pattern_errors,
                parallel=ParallelPlan(tensor_parallel=tensor_parallel, context_parallel=distribute_dilated_cores,
                                      context_parallel_split="contiguous"))
