"""Tensor and sequence parallelism for the decoder trunk as DTensor plans (Megatron's partitioning).

Per layer: q/k/v and the MLP's gate/up are column-parallel (each rank holds a slice of the heads /
hidden units), o_proj and down_proj are row-parallel (their partial sums are reduced), so a layer
costs two all-reduces forward and two backward. With sequence parallelism the activations between
those blocks (norms, residual stream) are sharded along the sequence instead of replicated, turning
each all-reduce into a reduce-scatter + all-gather pair of the same volume and dividing the norm
activations' memory by the TP size. The embedding is vocab-parallel, and the output projection
leaves the logits sharded over the vocabulary: the loss is computed on the shards (`loss_parallel`)
without ever gathering [batch, seq, vocab] logits.

BitLinear layers (ternary b1.58 weights) take the same column/row split; their input-norm weight is
replicated in column-parallel layers (the input is whole) and sharded with the input features in
row-parallel ones, and their scales reduce over the whole tensors (see megalatent/nn/bitlinear.py).

A family whose modules differ from the trunk's passes its own plan entries (`extra_plan`, which also
overrides entries) from its parallel plan (megalatent/families/).

FP8 layers with tensorwise scales take torchao's float8 styles in any plan (`float8_styles`): the activations
all-gathered by sequence parallelism are cast to FP8 first.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from megalatent.distributed.fp8 import float8_all_gathers_as_bytes, gathers_in_fp8
from megalatent.nn.bitlinear import BitLinear
from megalatent.nn.moe import MoELayer


def _shard_bitlinear(module: BitLinear, mesh: DeviceMesh, weight: Placement, norm_weight: Placement,
                     src_data_rank) -> None:
    module.weight = nn.Parameter(distribute_tensor(module.weight, mesh, [weight], src_data_rank=src_data_rank))
    module.norm_weight = nn.Parameter(distribute_tensor(module.norm_weight, mesh, [norm_weight],
                                                        src_data_rank=src_data_rank))


class BitLinearColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a BitLinear: the weight's rows are sharded, its input-norm weight replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _shard_bitlinear(module, device_mesh, Shard(0), Replicate(), self.src_data_rank)


class BitLinearRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a BitLinear: the weight's columns and the input-norm weight follow the
    sharded input features."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _shard_bitlinear(module, device_mesh, Shard(1), Shard(0), self.src_data_rank)


def _is_bitlinear(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), BitLinear)
    except AttributeError:  # not in this model (the GELU MLP has no gate_proj): the plan entry matches nothing
        return False


def _colwise(model: nn.Module, path: str):
    return BitLinearColwiseParallel() if _is_bitlinear(model, path) else ColwiseParallel()


def _rowwise(model: nn.Module, path: str, **kwargs):
    return (BitLinearRowwiseParallel if _is_bitlinear(model, path) else RowwiseParallel)(**kwargs)


def sequence_layout(sequence_parallel: bool) -> Placement:
    """The layout of the residual stream between blocks: sequence-sharded under SP, else replicated."""
    return Shard(1) if sequence_parallel else Replicate()


def decoder_plan(model: nn.Module, sequence_parallel: bool) -> dict:
    """The plan for `megalatent.models.decoder.Decoder` (and any model keeping its module names)."""
    stream = sequence_layout(sequence_parallel)
    plan = {}
    # A pipeline stage holds only some of these (see distributed/pipeline.py).
    if getattr(model, "embed_tokens", None) is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if getattr(model, "output", None) is not None:
        # The head needs the full sequence on every rank; it returns DTensor logits Shard(-1).
        plan["output"] = PrepareModuleInput(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None),
                                            use_local_output=False)
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
    for name, layer in model.layers.items():
        p = f"layers.{name}."
        # (a layer may lack some of these modules: an attention to keys made elsewhere has no k/v projections)
        plan.update({p + path: _colwise(model, p + path) for path in
                     ("attention.q_proj", "attention.k_proj", "attention.v_proj") if _has_module(model, p + path)})
        if _has_module(model, p + "attention.o_proj"):
            plan[p + "attention.o_proj"] = _rowwise(model, p + "attention.o_proj", output_layouts=stream)
        moe = isinstance(layer.mlp, MoELayer)
        if moe:
            # An MoE layer's weights are not split over the TP ranks (expert tensor parallelism 1); its tokens
            # are: each TP rank routes and computes its 1/tp of the sequence. Under sequence parallelism that is
            # the shard it already holds (no communication); otherwise it takes its slice and the outputs are
            # all-gathered. The MoE weights' gradients are then summed over tp (parallelize.apply_fsdp).
            plan[p + "mlp"] = PrepareModuleInputOutput(
                input_layouts=(stream,), desired_input_layouts=(Shard(1),), use_local_input=True,
                output_layouts=(Shard(1),), desired_output_layouts=(stream,), use_local_output=True)
        else:
            plan.update({p + path: _colwise(model, p + path) for path in ("mlp.gate_proj", "mlp.up_proj")
                         if _has_module(model, p + path)})
            plan[p + "mlp.down_proj"] = _rowwise(model, p + "mlp.down_proj", output_layouts=stream)
        if sequence_parallel:
            plan.update({
                p + "attention_norm": SequenceParallel(),
                p + "attention": PrepareModuleInput(input_layouts=(stream, None),
                                                    desired_input_layouts=(Replicate(), None), use_local_output=True),
                p + "mlp_norm": SequenceParallel(),
            })
            if not moe:
                plan[p + "mlp"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                                     use_local_output=True)
    return plan


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def float8_styles(model: nn.Module, plan: dict, tp_mesh: DeviceMesh) -> dict:
    """The plan with torchao's float8 styles (torchao.float8.float8_tensor_parallel, as torchtitan's float8 TP
    path) in place of the plain ones where the layers are FP8 with tensorwise scales (fp8.gathers_in_fp8):
    activations are cast to FP8 before the all-gathers instead of after them, so sequence parallelism's
    all-gathers, forward (the inputs of the attention and MLP blocks) and backward (the row-parallel layers'
    output gradients), move 1-byte values:
      - ColwiseParallel -> Float8ColwiseParallel and RowwiseParallel -> Float8RowwiseParallel on such a layer:
        the input cast (and any redistribution of it) in the input hook, the output gradient's cast before its
        redistribution in backward;
      - PrepareModuleInput -> PrepareFloat8ModuleInput on a block (attention, MLP) whose input it gathers
        (a layout that changes) and whose linear layers all are such layers: the input cast once, gathered in
        FP8 and handed to all of them (torchao's module-input style passes every gathered input to the block as
        an FP8 tensor, which only FP8 linear layers take: a block with another linear layer, e.g. gated
        retention's per-head gate kept in high precision, keeps the plain style and gathers in high precision).
    The casts are the ones the layers would make (tensorwise, torchao takes a DTensor's amax over all its
    shards), so results do not change. Other entries, and every entry of a model without such layers, stay.
    An entry must declare the layout its input arrives in (`input_layouts`): an input arriving in another layout
    is redistributed by DTensor inside torchao's matmul, after the cast, and an FP8 sequence shard cannot be
    gathered there. (On CPU, gloo moves the FP8 values as bytes: fp8.float8_all_gathers_as_bytes.)"""
    if not any(gathers_in_fp8(m) for m in model.modules()):
        return plan
    if tp_mesh.device_type == "cpu":
        float8_all_gathers_as_bytes()
    from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                       PrepareFloat8ModuleInput)

    styled = {}
    for path, style in plan.items():
        module = model.get_submodule(path) if _has_module(model, path) else None
        if type(style) in (ColwiseParallel, RowwiseParallel) and gathers_in_fp8(module):
            float8 = Float8ColwiseParallel if type(style) is ColwiseParallel else Float8RowwiseParallel
            style = float8(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                           use_local_output=style.use_local_output)
        elif type(style) is PrepareModuleInput and module is not None and not style.with_kwargs \
                and style.input_layouts is not None and style.input_layouts != style.desired_input_layouts:
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears and all(gathers_in_fp8(m) for m in linears):
                style = PrepareFloat8ModuleInput(input_layouts=style.input_layouts,
                                                 desired_input_layouts=style.desired_input_layouts,
                                                 use_local_output=style.use_local_output)
        styled[path] = style
    return styled


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          extra_plan: dict | None = None) -> None:
    """The trunk's plan, with a family's entries added (or overriding), applied to `model`; FP8 layers take
    torchao's float8 styles (`float8_styles`)."""
    plan = {**decoder_plan(model, sequence_parallel), **(extra_plan or {})}
    parallelize_module(model, tp_mesh, float8_styles(model, plan, tp_mesh))
    head = getattr(model, "output", None)
    if head is not None and head.weight is not None:  # untied head: shard its rows (the vocabulary) like the embedding's
        head.weight = nn.Parameter(distribute_tensor(head.weight.data, tp_mesh, [Shard(0)]))
