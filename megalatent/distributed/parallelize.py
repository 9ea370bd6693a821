"""The one place where a parallel layout is applied to a plain (single-device) model.

What is split how is the model family's parallel plan (distributed/plan.py); the order is this module's,
and follows torchtitan: FP8 linear layers first (--fp8-format, fp8.py), tensor/sequence parallelism (it
rewrites weights into DTensors on the tp mesh), context parallelism (swaps the token-mixing cores), expert
parallelism (shards the experts over ep, attaches the all-to-all dispatcher), then activation recomputation
(wraps whole layers), regional compilation (--compile, compile.py), then FSDP2 over the data- and
context-parallel ranks (which shards those DTensors again: 2-D TP x FSDP; experts over the
expert-data-parallel ranks).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megalatent.config import FP8Config, ParallelConfig
from megalatent.distributed.compile import compile_blocks
from megalatent.distributed.expert_parallel import apply_expert_parallel
from megalatent.distributed.fp8 import convert_to_fp8
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.plan import ContextParallel, ParallelPlan
from megalatent.nn.moe import moe_layers

# Selective recomputation keeps the outputs of the matmuls (the expensive ops) and recomputes the
# rest of the layer in backward: norms, activations, RoPE and the attention core, whose score matrix
# is the largest activation of all when a non-fused kernel is used. Every second matmul output is
# also recomputed, halving the memory of the saved ones (torchtitan's rule).
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _selective_policy():
    counts: Counter = Counter()

    def policy(ctx, op, *args, **kwargs):
        if op in _SAVED_OPS:
            key = "recompute" if ctx.is_recompute else "forward"
            counts[key] += 1
            return CheckpointPolicy.MUST_SAVE if counts[key] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_recompute(model: nn.Module, granularity: str) -> None:
    """Wrap every layer so its activations are recomputed in backward instead of stored.

    Parameter names in checkpoints are unchanged: DCP's state-dict helpers drop the wrapper's prefix.
    """
    for name, layer in list(model.layers.items()):
        if granularity == "full":
            model.layers[name] = checkpoint_wrapper(layer, preserve_rng_state=False)
        else:
            model.layers[name] = checkpoint_wrapper(layer, context_fn=_selective_policy, preserve_rng_state=False)


def summed_over(group):
    """t -> the sum of every rank's t over `group` (in place)."""
    def sum_over(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t
    return sum_over


def parallelize(model: nn.Module, layout: ParallelLayout, cfg: ParallelConfig, plan: ParallelPlan,
                seq_length: int, param_dtype: torch.dtype | None = None, fp8: FP8Config | None = None,
                compile_backend: str | None = None) -> nn.Module:
    if fp8 is not None and fp8.fp8_format is not None:  # FP8 linears first: the TP plans shard them (fp8.py)
        # Under context parallelism a sequence's tokens are spread over cp x tp: the activation scales too.
        convert_to_fp8(model, fp8, list(plan.pipeline.with_layer(model.cfg)), layout.tp,
                       layout.sequence_mesh() if layout.cp > 1 else None)
    if layout.tp > 1:
        plan.tensor_parallel(model, layout.mesh["tp"], cfg.sequence_parallel)
    if layout.cp > 1:
        plan.context_parallel(model, ContextParallel(layout.group("cp"), layout.cp_rank, layout.cp,
                                                     seq_length // layout.cp, layout.subgroup))
    token_group = layout.token_group()
    if token_group is not None:
        for _, moe in moe_layers(model):
            moe.sum_over_token_ranks = summed_over(token_group)  # balance statistics over every rank's tokens
    if layout.ep > 1:
        apply_expert_parallel(model, layout.expert_mesh["ep"])
    if cfg.recompute_granularity is not None:
        apply_recompute(model, cfg.recompute_granularity)
    if compile_backend is not None:  # each block as TP, CP, EP and recomputation left it; before FSDP (compile.py)
        compile_blocks(model, compile_backend)
    if layout.dp * layout.cp > 1 or (layout.tp > 1 and moe_layers(model)):
        apply_fsdp(model, layout, cfg.data_parallel_sharding_strategy, param_dtype)
    return model


def apply_fsdp(model: nn.Module, layout: ParallelLayout, strategy: str, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the data-parallel (and context-parallel) ranks; each decoder layer is its own unit (one layer's weights
    gathered at a time), the root holds the embedding, final norm and head.

    Megatron's --data-parallel-sharding-strategy maps onto FSDP2 as:
      optim_grads_params (ZeRO-3): weights resharded after forward, gathered again for backward;
                                   gradients reduce-scattered after every micro-batch;
      optim_grads (ZeRO-2):        weights kept gathered from forward to backward (one all-gather per
                                   micro-batch); gradients reduce-scattered after every micro-batch;
      optim (ZeRO-1):              as optim_grads, but gradients accumulate unsharded over the
                                   micro-batches and are reduce-scattered once per step.
    In every case the optimizer state is sharded. Gradients are reduced in fp32.
    (The gradient-sync half of the mapping lives in the trainer: see Trainer._sync_grads_on.)

    MoE layers are units of their own when their ranks differ from the layer's. Their tokens are split
    over the tp ranks too, so the router's and MH-MoE projections' gradients are summed over dp x cp x tp
    (`token_mesh`); with expert parallelism the experts are a unit over the ranks that hold the same
    experts (edp x tp). Those gradients each sum the tokens of all dp x cp (x tp) ranks (the all-to-all
    brought them), so they are divided by dp x cp, the same mean as every other gradient.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = strategy == "optim_grads_params"

    def shard(module: nn.Module, mesh, divide_by: float | None = None) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        if divide_by is not None:
            module.set_gradient_divide_factor(divide_by)
            # gloo lacks the PREMUL_SUM a custom factor becomes: sum, then divide. Not on one rank: FSDP2
            # (torch 2.13) skips the collective there but would then divide twice.
            if torch.distributed.get_backend() == "gloo" and mesh.size() > 1:
                module.set_force_sum_reduction_for_comms(True)

    mean_over = float(layout.dp * layout.cp)  # the ranks every gradient is averaged over
    for _, moe in moe_layers(model):
        if layout.ep > 1:
            shard(moe.experts, layout.expert_fsdp_mesh(), mean_over)
        if layout.tp > 1:
            shard(moe, layout.token_mesh(), mean_over)
    if layout.dp * layout.cp == 1:
        return  # tensor parallelism alone: only the MoE layers needed sharding (their gradients sum over tp)
    dp_mesh = layout.fsdp_mesh()
    for layer in model.layers.values():
        shard(layer, dp_mesh)
    shard(model, dp_mesh)
