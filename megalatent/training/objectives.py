"""What a model trains on: how a micro-batch feeds the model, the summed loss it gives, over how many
items that sum runs, and how context parallelism splits a micro-batch between the cp ranks.

The trainer's loss of a step is (sum of every rank's summed losses) / (sum of every rank's counts), and
each rank's backward is scaled by dp x cp / that global count (see Trainer.train_step), so the same
objective object serves one process and any layout. Language modelling is defined here; a family with
another objective defines it in its own module (megalatent/families/) from the same pieces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from megalatent.distributed.context_parallel import shard_sequence

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    batch_keys: dict[str, torch.dtype]  # what a sample holds, and the dtype of each key
    forward: Callable[[nn.Module, Batch], torch.Tensor]
    loss_sum: Callable[[torch.Tensor, Batch], torch.Tensor]
    count: Callable[[Batch], torch.Tensor]  # the number of items `loss_sum` sums over
    shard: Callable[[Batch, int, int, str], Batch]  # (micro-batch, cp rank, cp, split) -> this rank's part
    # Under pipeline parallelism (None: the family does not support it): what the first stage takes, the
    # targets as one tensor (the schedule splits it into micro-batches), and the summed loss from the last
    # stage's output, its module and a micro-batch's targets.
    pipeline_inputs: Optional[Callable[[Batch], tuple]] = None
    pipeline_targets: Optional[Callable[[Batch], torch.Tensor]] = None
    pipeline_loss: Optional[Callable[[nn.Module, object, torch.Tensor], torch.Tensor]] = None
    # Additive parts of the loss the log reports on their own (e.g. cross-entropy and diffusion). With
    # names here, `loss_sum` and `pipeline_loss` return one sum per part [n] (the loss is their total) and
    # `part_counts` the items each part averages over [n].
    loss_parts: tuple[str, ...] = ()
    part_counts: Optional[Callable[[Batch], torch.Tensor]] = None
    # The shape of each key in a micro-batch of b samples, (model config, b) -> {key: shape}, for batches made
    # without data (the planner's). None: every key is per token, [b, seq_length].
    batch_shapes: Optional[Callable[[object, int], dict[str, tuple[int, ...]]]] = None


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies where loss_mask is 1 (fp32 or wider for a stable log-softmax).

    Under tensor parallelism the logits are a DTensor sharded over the vocabulary and this runs
    inside `loss_parallel()` (see Trainer.loss_context), which computes the log-softmax on the shards.
    """
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), labels.flatten(),
                         reduction="none")
    if isinstance(ce, DTensor):
        ce = ce.to_local()  # replicated per-token losses
    return (ce * loss_mask.flatten()).sum()


def shard_tokens(batch: Batch, cp_rank: int, cp: int, split: str) -> Batch:
    """Every per-token tensor of the micro-batch cut to this cp rank's tokens."""
    return {k: shard_sequence(v, cp_rank, cp, split) for k, v in batch.items()}


def pack_targets(*columns: torch.Tensor) -> torch.Tensor:
    """Per-token targets [b, s] (or [b, s, k]) side by side in one float tensor [b, s, n] (ids are exact in
    float32 up to 2^24)."""
    return torch.cat([c.float().unsqueeze(-1) if c.dim() == 2 else c.float() for c in columns], dim=-1)


LANGUAGE_MODELING = Objective(
    batch_keys={"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64},
    forward=lambda model, b: model(b["tokens"], b["position_ids"]),
    loss_sum=lambda logits, b: lm_loss_sum(logits, b["labels"], b["loss_mask"]),
    count=lambda b: b["loss_mask"].sum(),
    shard=shard_tokens,
    pipeline_inputs=lambda b: (b["tokens"], b["position_ids"]),
    pipeline_targets=lambda b: pack_targets(b["labels"], b["loss_mask"]),
    pipeline_loss=lambda stage, logits, t: lm_loss_sum(logits, t[..., 0].long(), t[..., 1]),
)
