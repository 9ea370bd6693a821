"""FP8 under context parallelism: tensorwise scales of activations and output gradients over the whole sequence.

A tensorwise FP8 cast takes its scale from the amax of the tensor it casts. A linear layer's input and output
gradient span the tokens of a micro-batch, which context parallelism cuts over the cp ranks: torchao's
Float8Linear would take each rank's amax of its own part, so every cast, and through the model every gradient,
would differ from one process's (measured: by 0.7-1.3 times FP8's own error). Megatron/Transformer Engine reduce
the amax over the context-parallel group; so does `ContextParallelFloat8Linear`, which is torchao's Float8Linear
with two casts of its own, both through torchao's amax, scale and cast functions (`cast_over`):

    forward   the input, to FP8 before the matmul, with the amax all-reduced (MAX) over the sequence mesh;
    backward  the matmul's output gradient (the bias's gradient is summed before, in high precision, as in one
              process), likewise, before the matmul's backward (`_CastGradOver`).

torchao's matmul then takes both as already cast (as it takes the casts of its tensor-parallel styles) and uses
them in all three products: the same scale and bits as one process's casts of the whole sequence, so CP equals
one process under FP8 to float rounding (tests/test_fp8.py). The weight is whole on every cp rank (FSDP gathers
it): its cast is unchanged.

The sequence mesh (ParallelLayout.sequence_mesh) is cp x tp: the amax is taken of each rank's local tensor, so
that a tensor the tensor-parallel plan shards (a row-parallel layer's input over its features, an output gradient
over the column shards, a sequence-parallel or an MoE layer's token share) or replicates is covered as a whole
on every layout. A DTensor's local shard goes in; its scale comes back as a replicated DTensor, as torchao's
casts of DTensors return it.

Only the tensorwise recipe: rowwise scales of the input and of the output gradient are per token row in the
output and input-gradient products, which context parallelism does not cut; the weight-gradient product's
column scales (each over a column's tokens) stay over this rank's tokens, as torchao's matmul computes them in
its backward without a reduction hook (fp8.py's docstring says what that costs).
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torchao.float8.distributed_utils import tensor_already_casted_to_fp8
from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig, hp_tensor_and_scale_to_float8
from torchao.float8.float8_utils import amax_to_scale, tensor_to_amax


def cast_over(t: torch.Tensor, mesh: DeviceMesh, float8_dtype: torch.dtype, mm_config: LinearMMConfig,
              role: GemmInputRole, round_scales_to_power_of_2: bool = False) -> torch.Tensor:
    """`t` (a tensor, or a DTensor over a sub-mesh of `mesh`) cast to FP8 with one scale, from the largest |t| on
    every rank of `mesh` (torchao's tensor_to_amax with reduce_amax: one all-reduce MAX)."""
    with torch.no_grad():
        local = t
        if isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                raise ValueError(f"an FP8 cast of a partial sum ({t.placements}): reduce it first")
            local = t.to_local()
        amax = tensor_to_amax(local, reduce_amax=True, device_mesh=mesh)
        scale = amax_to_scale(amax, float8_dtype, round_scales_to_power_of_2)
        if isinstance(t, DTensor):
            scale = DTensor.from_local(scale, t.device_mesh, [Replicate()] * t.device_mesh.ndim, run_check=False)
    return hp_tensor_and_scale_to_float8(t, scale, float8_dtype, mm_config, role)


class _CastGradOver(torch.autograd.Function):
    """Forward: identity. Backward: the gradient cast to FP8 by `cast_over` (torchao's NoopFwToFloat8BwDynamic,
    with the scale over the mesh rather than over this rank's gradient)."""

    @staticmethod
    def forward(ctx, t, mesh, float8_dtype, mm_config, round_scales_to_power_of_2):
        ctx.cast = mesh, float8_dtype, mm_config, GemmInputRole.GRAD_OUTPUT, round_scales_to_power_of_2
        return t

    @staticmethod
    def backward(ctx, grad):
        if not tensor_already_casted_to_fp8(grad):
            grad = cast_over(grad, *ctx.cast)
        return grad, None, None, None, None


class ContextParallelFloat8Linear(Float8Linear):
    """torchao's Float8Linear (tensorwise casts) whose input and output-gradient scales are over `scale_mesh`
    (see the module doc). The weight, bias, state-dict names and the weight's cast are Float8Linear's."""

    scale_mesh: DeviceMesh

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Float8Linear.forward with the two casts around torchao's matmul: the output gradient's before the bias
        # (whose gradient one process sums from the high-precision output gradient).
        if torch.is_autocast_enabled():  # as Float8Linear: cast from the autocast dtype
            input = input.to(torch.get_autocast_dtype("cuda"))
        c = self.config
        if not tensor_already_casted_to_fp8(input):
            input = cast_over(input, self.scale_mesh, c.cast_config_input.target_dtype, self.linear_mm_config,
                              GemmInputRole.INPUT, c.round_scales_to_power_of_2)
        output = matmul_with_hp_or_float8_args.apply(input, self.weight.t(), self.linear_mm_config, c)
        output = _CastGradOver.apply(output, self.scale_mesh, c.cast_config_grad_output.target_dtype,
                                     self.linear_mm_config, c.round_scales_to_power_of_2)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales over {self.scale_mesh.mesh_dim_names}"


def reduce_scales_over(linears: list[Float8Linear], mesh: DeviceMesh) -> None:
    """Make each of these (tensorwise) Float8Linear a ContextParallelFloat8Linear over `mesh`, in place: the class
    changes (as FSDP2's fully_shard changes a module's class), the parameters and their wrappers stay."""
    for linear in linears:
        assert type(linear) is Float8Linear, type(linear)
        linear.__class__ = ContextParallelFloat8Linear
        linear.scale_mesh = mesh
