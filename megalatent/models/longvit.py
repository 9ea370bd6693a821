"""LongViT (arXiv 2312.03558): a ViT encoder whose attention is LongNet's dilated attention, non-causal,
over the patches of very large images (a 32,768² slide at patch 32 is 1,048,576 tokens).

    patches = embed(image tiles)  +  learned positions interpolated to the image's patch grid
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))       (dilated, non-causal)
    logits = head(norm(mean over patches))

Under context parallelism (`--context-parallel-size C`, split "contiguous") rank c embeds only its own
1/C of the patches, row band by row band, so no rank ever holds more than its share of the image's
activations; attention is LongNet's distributed algorithm; the mean over patches is summed over the
cp ranks (its backward sums too, so that with the loss computed on every cp rank, the gradient
average over dp x cp that FSDP takes is the single-device gradient).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_reduce

from megalatent.config import Config, ModelConfig
from megalatent.data.image_classification import build_image_loaders, digits_errors
from megalatent.models.decoder import (BASELINE_SPEC, DecoderLayer, LayerSpec, default_attention, default_norm,
                                       init_weights)
from megalatent.models.longnet import DilatedCore
from megalatent.models.longnet import validate as validate_dilated_patterns
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.rotary import Positions
from megalatent.training.objectives import IMAGE_CLASSIFICATION


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> d features (a linear map of each patch's pixels), computed for a
    range of patches one band of `band_rows` patch rows at a time: a huge image (e.g. uint8 on the host)
    is converted to floats and embedded tile by tile, never as a whole."""

    def __init__(self, channels: int, patch: int, hidden: int, band_rows: int = 16):
        super().__init__()
        self.patch, self.band_rows = patch, band_rows
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """images [b, C, H, W] -> the embeddings of patches [start, end) in row-major order, [b, end-start, d]."""
        p = self.patch
        grid_w = images.shape[-1] // p
        first_row, last_row = start // grid_w, (end - 1) // grid_w
        bands = []
        for row in range(first_row, last_row + 1, self.band_rows):
            rows = min(self.band_rows, last_row + 1 - row)
            tile = images[:, :, row * p:(row + rows) * p, :grid_w * p].to(self.proj.weight.device, self.proj.weight.dtype)
            bands.append(self.proj(tile).flatten(2).transpose(1, 2))  # [b, rows*grid_w, d]
        patches = torch.cat(bands, dim=1)
        offset = start - first_row * grid_w
        return patches[:, offset:offset + end - start]


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Learned positions [grid_h * grid_w, d] resized (bicubic, as ViT/BEiT) to another patch grid."""
    if tuple(grid) == tuple(new_grid):
        return table
    d = table.shape[-1]
    image = table.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    resized = F.interpolate(image.float(), size=new_grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], d).to(table.dtype)


class LongViT(nn.Module):
    """images [b, C, H, W] (H, W multiples of --patch-dim) -> class logits [b, --num-classes]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = (cfg.img_h // cfg.patch_dim, cfg.img_w // cfg.patch_dim)
        self.patch_embed = PatchEmbedding(cfg.num_channels, cfg.patch_dim, cfg.hidden_size)
        self.positions = nn.Parameter(torch.empty(self.grid[0] * self.grid[1], cfg.hidden_size))
        core = DilatedCore(cfg.segment_lengths, cfg.dilated_ratios, causal=False)

        def attention(cfg: ModelConfig, layer: int):
            module = default_attention(cfg, layer)
            module.core_attention = core
            return module

        spec = LayerSpec(attention=attention, mlp=BASELINE_SPEC.mlp, norm=BASELINE_SPEC.norm)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, spec) for i in range(cfg.num_layers)})
        self.norm = default_norm(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)
        self.cp_group = None  # set by distributed/context_parallel.py: the patches are split over it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // self.cfg.patch_dim, images.shape[-1] // self.cfg.patch_dim)
        n = grid[0] * grid[1]
        cp = 1 if self.cp_group is None else torch.distributed.get_world_size(self.cp_group)
        rank = 0 if self.cp_group is None else torch.distributed.get_rank(self.cp_group)
        if n % cp:
            raise ValueError(f"{n} patches do not split evenly over {cp} context-parallel ranks")
        start, end = rank * n // cp, (rank + 1) * n // cp
        x = self.patch_embed(images, start, end)
        x = x + interpolate_positions(self.positions, self.grid, grid)[start:end].to(x.dtype)
        position_ids = torch.arange(start, end, device=x.device).expand(x.shape[0], -1)
        positions = Positions(position_ids, None)
        for layer in self.layers.values():
            x = layer(x, positions)
        pooled = self.norm(x).float().sum(dim=1)
        if self.cp_group is not None:
            pooled = all_reduce(pooled, group=self.cp_group)  # backward: the sum of the ranks' gradients
        return self.head((pooled / n).to(x.dtype))


def flops_per_token(cfg: ModelConfig) -> float:
    """Per patch, forward + backward (3 x forward): patch embedding, q/k/v/o, MLP, and non-causal dilated
    attention over sum_i min(w_i, N) / r_i^2 keys per query (no causal halving)."""
    h, n = cfg.hidden_size, cfg.seq_length
    keys = sum(min(w, n) / r ** 2 for w, r in zip(cfg.segment_lengths, cfg.dilated_ratios))
    kv_dim = cfg.kv_heads * cfg.head_dim
    per_layer = 2 * h * (2 * h + 2 * kv_dim) + 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2) + 2 * 2 * h * keys
    embed = 2 * cfg.num_channels * cfg.patch_dim ** 2 * h
    return 3.0 * (cfg.num_layers * per_layer + embed)


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
    if cfg.data.data_path is not None and len(cfg.data.data_path) != 1:
        e.append("LongViT's --data-path is one image folder (root/<class>/<image>) or one 'path label' list file")
    elif cfg.data.data_path is not None and not os.path.exists(cfg.data.data_path[0]):
        e.append(f"--data-path {cfg.data.data_path[0]} does not exist")
    return e + validate_dilated_patterns(cfg) + (digits_errors(cfg) if cfg.data.data_path is None else [])


register(ModelFamily(name="longvit", build=LongViT, flops_per_token=flops_per_token, validate=validate,
                     context_parallel_split="contiguous", objective=IMAGE_CLASSIFICATION,
                     build_data=build_image_loaders))
