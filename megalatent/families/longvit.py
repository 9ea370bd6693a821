"""LongViT (arXiv 2312.03558): a ViT encoder with LongNet's dilated attention, non-causal, over the patches
of very large images (megalatent/models/longvit.py), trained as an image classifier.

Context parallelism (contiguous split): rank c embeds only its own 1/C of the patches, row band by row
band, so no rank ever holds more than its share of the image's activations; attention is LongNet's
distributed algorithm; the pooling's sum over patches is summed over the cp ranks (its backward sums
too, so that with the loss computed on every cp rank, the gradient average over dp x cp that FSDP takes
is the single-device gradient).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_reduce

from megalatent.config import Config
from megalatent.data.image_classification import build_image_loaders, digits_errors
from megalatent.data.image_pipeline import read_file_list
from megalatent.distributed.plan import ContextParallel, ParallelPlan
from megalatent.families.family import Family, FamilyData
from megalatent.families.longnet import dilated_pattern_errors, distribute_dilated_cores
from megalatent.models.longvit import LongViT, LongViTConfig, flops_per_token
from megalatent.training.objectives import Objective

# One label per image. Under context parallelism every cp rank gets the whole micro-batch: the model
# embeds only its own share of the patches and computes the (same) loss; counting the labels on every cp
# rank makes the dp x cp gradient average come out as the single-device gradient.
IMAGE_CLASSIFICATION = Objective(
    batch_keys={"images": torch.float32, "labels": torch.int64},
    forward=lambda model, b: model(b["images"]),
    loss_sum=lambda logits, b: F.cross_entropy(logits.float(), b["labels"], reduction="sum"),
    count=lambda b: torch.tensor(float(b["labels"].numel())),
    shard=lambda b, cp_rank, cp, split: b,
    batch_shapes=lambda m, b: {"images": (b, m.num_channels, m.img_h, m.img_w), "labels": (b,)},
)


def context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    distribute_dilated_cores(model, cp)

    def patch_share(num_patches: int) -> tuple[int, int]:
        if num_patches % cp.size:
            raise ValueError(f"{num_patches} patches do not split evenly over {cp.size} context-parallel ranks")
        return cp.rank * num_patches // cp.size, (cp.rank + 1) * num_patches // cp.size

    model.patch_share = patch_share
    model.sum_over_patches = lambda x: all_reduce(x.sum(dim=1), group=cp.group)  # backward: the ranks' sum


def validate(cfg: Config) -> list[str]:
    m = cfg.model
    e = []
    if m.img_h % m.patch_dim or m.img_w % m.patch_dim:
        e.append(f"--img-h {m.img_h} and --img-w {m.img_w} must be multiples of --patch-dim {m.patch_dim}")
    patches = (m.img_h // m.patch_dim) * (m.img_w // m.patch_dim)
    if m.seq_length != patches:
        e.append(f"LongViT's sequence is the image's patches: set --seq-length {patches} "
                 f"(= {m.img_h}/{m.patch_dim} x {m.img_w}/{m.patch_dim}), got {m.seq_length}")
    if m.position_embedding_type != "none":
        e.append("LongViT uses learned 2-D position embeddings: add --position-embedding-type none")
    if cfg.parallel.tensor_model_parallel_size > 1:
        e.append("--model-family longvit does not support tensor parallelism yet: split the patches with "
                 "--context-parallel-size instead")
    if cfg.data.data_path is not None and len(cfg.data.data_path) != 1:
        e.append("LongViT's --data-path is one image folder (root/<class>/<image>) or one 'path label' list file")
    elif cfg.data.data_path is not None and not os.path.exists(cfg.data.data_path[0]):
        e.append(f"--data-path {cfg.data.data_path[0]} does not exist")
    elif cfg.data.data_path is not None and os.path.isfile(cfg.data.data_path[0]):
        try:  # a list file is read now; a folder is listed by the pipeline
            read_file_list(cfg.data.data_path[0])
        except ValueError as err:
            e.append(str(err))
    return e + dilated_pattern_errors(cfg) + (digits_errors(cfg) if cfg.data.data_path is None else [])


FAMILY = Family(name="longvit", config=LongViTConfig, build=LongViT, flops_per_token=flops_per_token,
                validate=validate, objective=IMAGE_CLASSIFICATION,
                parallel=ParallelPlan(context_parallel=context_parallel, context_parallel_split="contiguous"),
                data=FamilyData(build=build_image_loaders))
