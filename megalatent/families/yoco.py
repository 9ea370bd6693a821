"""YOCO (arXiv 2405.05254): the decoder-decoder (megalatent/models/yoco.py), and how it splits over devices.

Tensor parallelism: the trunk's plan, plus gated retention's output gate and per-head gate projections
(column-parallel, split with the heads) and the shared K^/V^ projection (column-parallel: K^/V^ heads
split like the cross-decoder's query heads). Context parallelism (contiguous split, YOCO App. A): the
self-decoder's cores pass the retention state, or the window's keys, from rank to rank, and K^/V^ are
all-gathered once per step by the module that makes them, not once per cross-decoder layer. Pipeline:
the shared K/V projection lives on the stage of the first cross-decoder layer; later stages receive
K^/V^ in the tuple that flows between stages.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, SequenceParallel

from megalatent.config import Config
from megalatent.distributed.context_parallel import all_gather_sequence
from megalatent.distributed.context_parallel.retention import DistributedRetentionCore
from megalatent.distributed.context_parallel.sliding_window import DistributedSlidingWindowCore
from megalatent.distributed.plan import ContextParallel, ParallelPlan, PipelineSplit, replace_cores
from megalatent.distributed.tensor_parallel import apply_tensor_parallel, sequence_layout
from megalatent.families.family import Family
from megalatent.models.yoco import YOCO, CrossAttention, YOCOConfig, first_cross_layer, flops_per_token
from megalatent.nn.attention import SlidingWindowCore
from megalatent.nn.retention import GatedRetention, RetentionCore


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    stream = sequence_layout(sequence_parallel)
    plan = {}
    for name, layer in model.layers.items():
        p = f"layers.{name}.attention"
        if isinstance(layer.attention, GatedRetention):
            plan[p + ".g_proj"] = ColwiseParallel()
            plan[p + ".gate_proj"] = ColwiseParallel()  # one gate per head: split with the heads
        if isinstance(layer.attention, CrossAttention) and sequence_parallel:
            plan[p] = PrepareModuleInput(input_layouts=(stream, None, None, None),
                                         desired_input_layouts=(Replicate(), None, None, None), use_local_output=True)
    if model.shared_kv is not None:
        # Under sequence parallelism the norm's output is sequence-sharded; the projections gather it (declared,
        # so that the style gathers it before the matmul: an FP8 input cannot be gathered inside it).
        plan.update({"shared_kv.k_proj": ColwiseParallel(input_layouts=stream),
                     "shared_kv.v_proj": ColwiseParallel(input_layouts=stream)})
        if sequence_parallel:
            plan["shared_kv.norm"] = SequenceParallel()
    apply_tensor_parallel(model, mesh, sequence_parallel, plan)


def context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    def distributed(core):
        if isinstance(core, RetentionCore):
            return DistributedRetentionCore(core, cp.group)
        if isinstance(core, SlidingWindowCore):
            return DistributedSlidingWindowCore(core.window, cp.group, cp.local_length)
        return None

    replace_cores(model, distributed)
    if model.shared_kv is not None:
        model.shared_kv.register_forward_hook(_gathered_keys(cp))


def _gathered_keys(cp: ContextParallel):
    """A forward hook on the shared K/V projection: K^/V^ of every rank's tokens up to this rank's last one
    (the split is contiguous, so this rank's queries are the last of those keys), in one all-gather per step."""
    def hook(module, inputs, kv):
        k, v = all_gather_sequence(torch.stack(kv), cp.group, dim=3)
        end = (cp.rank + 1) * cp.local_length
        return k[:, :, :end], v[:, :, :end]

    return hook


def validate(cfg: Config) -> list[str]:
    m = cfg.model
    e = []
    if m.num_layers < 2 or m.num_layers % 2:
        e.append(f"--model-family yoco splits --num-layers into a self-decoder and a cross-decoder of equal depth: "
                 f"it must be even and >= 2, got {m.num_layers}")
    if m.yoco_self_attention == "swa":
        if m.sliding_window_size is None or m.sliding_window_size < 1:
            e.append("--yoco-self-attention swa needs --sliding-window-size >= 1 (the paper uses 1024)")
    elif m.sliding_window_size is not None:
        e.append("--sliding-window-size applies to --yoco-self-attention swa; drop it or choose swa")
    if m.retention_chunk_size < 1:
        e.append(f"--retention-chunk-size must be >= 1, got {m.retention_chunk_size}")
    return e


FAMILY = Family(name="yoco", config=YOCOConfig, build=YOCO, flops_per_token=flops_per_token, validate=validate,
                parallel=ParallelPlan(tensor_parallel=tensor_parallel, context_parallel=context_parallel,
                                      context_parallel_split="contiguous",
                                      pipeline=PipelineSplit(with_layer=lambda cfg: {"shared_kv": first_cross_layer(cfg)})))
