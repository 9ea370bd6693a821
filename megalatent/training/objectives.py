"""What a model family trains on: how a micro-batch feeds the model, the summed loss it gives, over how
many items that sum runs, and how context parallelism splits a micro-batch between the cp ranks.

The trainer's loss of a step is (sum of every rank's summed losses) / (sum of every rank's counts), and
each rank's backward is scaled by dp x cp / that global count (see Trainer.train_step), so the same
objective object serves one process and any layout.
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
    # Additive parts of the loss the log reports on their own (LatentLM: cross-entropy and diffusion). With
    # names here, `loss_sum` and `pipeline_loss` return one sum per part [n] (the loss is their total) and
    # `part_counts` the items each part averages over [n].
    loss_parts: tuple[str, ...] = ()
    part_counts: Optional[Callable[[Batch], torch.Tensor]] = None


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


def _shard_tokens(batch: Batch, cp_rank: int, cp: int, split: str) -> Batch:
    return {k: shard_sequence(v, cp_rank, cp, split) for k, v in batch.items()}


def _pack(*columns: torch.Tensor) -> torch.Tensor:
    """Per-token targets [b, s] (or [b, s, k]) side by side in one float tensor [b, s, n] (ids are exact in
    float32 up to 2^24)."""
    return torch.cat([c.float().unsqueeze(-1) if c.dim() == 2 else c.float() for c in columns], dim=-1)


LANGUAGE_MODELING = Objective(
    batch_keys={"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64},
    forward=lambda model, b: model(b["tokens"], b["position_ids"]),
    loss_sum=lambda logits, b: lm_loss_sum(logits, b["labels"], b["loss_mask"]),
    count=lambda b: b["loss_mask"].sum(),
    shard=_shard_tokens,
    pipeline_inputs=lambda b: (b["tokens"], b["position_ids"]),
    pipeline_targets=lambda b: _pack(b["labels"], b["loss_mask"]),
    pipeline_loss=lambda stage, logits, t: lm_loss_sum(logits, t[..., 0].long(), t[..., 1]),
)

# One label per image. Under context parallelism every cp rank gets the whole micro-batch: the model
# embeds only its own share of the patches (LongViT) and computes the (same) loss; counting the labels on
# every cp rank makes the dp x cp gradient average come out as the single-device gradient.
IMAGE_CLASSIFICATION = Objective(
    batch_keys={"images": torch.float32, "labels": torch.int64},
    forward=lambda model, b: model(b["images"]),
    loss_sum=lambda logits, b: F.cross_entropy(logits.float(), b["labels"], reduction="sum"),
    count=lambda b: torch.tensor(float(b["labels"].numel())),
    shard=lambda b, cp_rank, cp, split: b,
)

def _latent_lm_pipeline_loss(stage: nn.Module, out, packed: torch.Tensor) -> torch.Tensor:
    mul, k = stage.cfg.diffusion_batch_mul, stage.cfg.latent_dim
    labels, loss_mask, diffusion_mask, t, target, noise = packed.split([1, 1, 1, mul, k, mul * k], dim=-1)
    return torch.stack([lm_loss_sum(out[0], labels[..., 0].long(), loss_mask[..., 0]),
                        stage.diffusion_loss(out[1], target, diffusion_mask[..., 0], t.long(),
                                             noise.unflatten(-1, (mul, k)))])


# LatentLM: cross-entropy on discrete positions plus the (weighted) diffusion loss on continuous ones;
# the model returns (logits, summed diffusion loss), and the mean is over both kinds of predictions (the
# log shows each part's own mean too). The
# diffusion loss's timesteps and noises come with the data (latent_data.DiffusionDraws), so that every layout
# draws the same ones.
LATENT_LM = Objective(
    batch_keys={"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64, "latents": torch.float32, "latent_mask": torch.bool,
                "target_latents": torch.float32, "diffusion_mask": torch.float32,
                "diffusion_t": torch.int64, "diffusion_noise": torch.float32},
    forward=lambda model, b: model(b["tokens"], b["position_ids"], b["latents"], b["latent_mask"],
                                   b["target_latents"], b["diffusion_mask"], b["diffusion_t"], b["diffusion_noise"]),
    loss_sum=lambda out, b: torch.stack([lm_loss_sum(out[0], b["labels"], b["loss_mask"]), out[1]]),
    count=lambda b: b["loss_mask"].sum() + b["diffusion_mask"].sum(),
    shard=_shard_tokens,
    # The last stage returns (logits, normed hidden states); its diffusion head turns them into the loss.
    pipeline_inputs=lambda b: (b["tokens"], b["position_ids"], b["latents"], b["latent_mask"]),
    pipeline_targets=lambda b: _pack(b["labels"], b["loss_mask"], b["diffusion_mask"], b["diffusion_t"],
                                     b["target_latents"], b["diffusion_noise"].flatten(2)),
    pipeline_loss=_latent_lm_pipeline_loss,
    loss_parts=("cross-entropy", "diffusion"),
    part_counts=lambda b: torch.stack([b["loss_mask"].sum(), b["diffusion_mask"].sum()]),
)
