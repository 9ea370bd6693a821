"""The one place where a parallel layout is applied to a plain (layout-agnostic) model."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megalatent.distributed.layout import ParallelLayout


def parallelize(model: nn.Module, layout: ParallelLayout, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard the model over the data-parallel ranks with FSDP2 (ZeRO-3: weights, grads, optimizer).

    Each decoder layer is its own FSDP unit so only one layer's weights are gathered at a time; the
    root unit holds the embedding, final norm and head. Gradients are reduced in fp32.
    """
    if layout.dp == 1:
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = layout.mesh["dp"]
    for layer in getattr(model, "layers", {}).values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model
