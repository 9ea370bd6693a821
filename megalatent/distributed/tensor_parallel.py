"""Tensor and sequence parallelism for the decoder as DTensor plans (Megatron's partitioning).

Per layer: q/k/v and the MLP's gate/up are column-parallel (each rank holds a slice of the heads /
hidden units), o_proj and down_proj are row-parallel (their partial sums are reduced), so a layer
costs two all-reduces forward and two backward. With sequence parallelism the activations between
those blocks (norms, residual stream) are sharded along the sequence instead of replicated, turning
each all-reduce into a reduce-scatter + all-gather pair of the same volume and dividing the norm
activations' memory by the TP size. The embedding is vocab-parallel, and the output projection
leaves the logits sharded over the vocabulary: the loss is computed on the shards (`loss_parallel`)
without ever gathering [batch, seq, vocab] logits.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def decoder_plan(model: nn.Module, sequence_parallel: bool) -> dict:
    """The plan for `megalatent.models.decoder.Decoder` (and any family keeping its module names)."""
    # Layout of the residual stream between blocks: sequence-sharded under SP, else replicated.
    stream = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    # A pipeline stage holds only some of these (see distributed/pipeline.py).
    if model.embed_tokens is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if model.output is not None:
        # The head needs the full sequence on every rank; it returns DTensor logits Shard(-1).
        plan["output"] = PrepareModuleInput(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None),
                                            use_local_output=False)
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
    for name in model.layers:
        p = f"layers.{name}."
        plan.update({k: style for k, style in {
            p + "attention.q_proj": ColwiseParallel(),
            p + "attention.k_proj": ColwiseParallel(),
            p + "attention.v_proj": ColwiseParallel(),
            p + "attention.o_proj": RowwiseParallel(output_layouts=stream),
            p + "mlp.gate_proj": ColwiseParallel(),
            p + "mlp.up_proj": ColwiseParallel(),
            p + "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }.items() if _has_module(model, k)})  # a family's layer may lack some (YOCO's cross-attention: no k/v)
        if sequence_parallel:
            plan.update({
                p + "attention_norm": SequenceParallel(),
                p + "attention": PrepareModuleInput(input_layouts=(stream, None),
                                                    desired_input_layouts=(Replicate(), None), use_local_output=True),
                p + "mlp_norm": SequenceParallel(),
                p + "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                              use_local_output=True),
            })
    if hasattr(model, "tensor_parallel_plan"):  # a family's own modules and overrides (YOCO)
        plan.update(model.tensor_parallel_plan(stream, sequence_parallel))
    return plan


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    parallelize_module(model, tp_mesh, decoder_plan(model, sequence_parallel))
    # An attention core whose per-head behaviour depends on the head index (LongNet's dilation offsets)
    # learns which global heads this rank holds.
    first_head = tp_mesh.get_local_rank() * (model.cfg.num_attention_heads // tp_mesh.size())
    replaced: dict[int, object] = {}  # layers sharing a core keep sharing it
    for layer in model.layers.values():
        core = getattr(layer.attention, "core_attention", None)
        if hasattr(core, "tensor_parallel"):
            replaced.setdefault(id(core), core.tensor_parallel(first_head))
            layer.attention.core_attention = replaced[id(core)]
    head = model.output
    if head is not None and head.weight is not None:  # untied head: shard its rows (the vocabulary) like the embedding's
        head.weight = nn.Parameter(distribute_tensor(head.weight.data, tp_mesh, [Shard(0)]))
