"""LongViT (arXiv 2312.03558): a ViT encoder whose attention is LongNet's dilated attention, non-causal,
over the patches of very large images (a 32,768² slide at patch 32 is 1,048,576 tokens).

    patches = embed(image tiles)  +  learned positions interpolated to the image's patch grid
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))       (dilated, non-causal)
    logits = head(norm(mean over patches))

The model is single-device PyTorch with two seams its context-parallel plan (families/longvit.py) uses:
`patch_share` (which patches this module embeds and attends over: all of them here; a cp rank its
contiguous 1/C, embedded band by band, so no rank holds more than its share of the activations) and
`sum_over_patches` (the pooling's sum: over the ranks' shares under context parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.config import ModelConfig, flag
from megalatent.models.decoder import BASELINE_SPEC, DecoderLayer, LayerSpec, default_attention, default_norm, initial_value
from megalatent.nn.init import Init
from megalatent.models.longnet import DilatedPatterns, dilated_core
from megalatent.nn.rotary import Positions


@dataclass
class LongViTConfig(ModelConfig, DilatedPatterns):
    img_h: int = flag(224, "image height in pixels the position embeddings are learned for")
    img_w: int = flag(224, "image width in pixels the position embeddings are learned for")
    patch_dim: int = flag(16, "patch size in pixels")
    num_channels: int = flag(3, "image channels")
    num_classes: int = flag(1000, "classes: of the class-conditional images, or of an image classifier")


def whole_image(num_patches: int) -> tuple[int, int]:
    """The patches [start, end) a module embeds and attends over: on one device, all of them."""
    return 0, num_patches


def sum_patches(x: torch.Tensor) -> torch.Tensor:
    """[b, patches, d] -> [b, d]: the pooling's sum over the patches this module holds."""
    return x.sum(dim=1)


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
        core = dilated_core(cfg, causal=False)

        def attention(cfg: ModelConfig, layer: int):
            module = default_attention(cfg, layer)
            module.core_attention = core
            return module

        spec = LayerSpec(attention=attention, mlp=BASELINE_SPEC.mlp, norm=BASELINE_SPEC.norm)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, spec) for i in range(cfg.num_layers)})
        self.norm = default_norm(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)
        # The seams of context parallelism (families/longvit.py replaces them); single-device values here.
        self.patch_share = whole_image
        self.sum_over_patches = sum_patches

    def initial_value(self, name: str, shape: tuple[int, ...]) -> Init:
        """The trunk's rules (megalatent/models/decoder.py) for every tensor, patch embedding and head included."""
        return initial_value(self.cfg, name, shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // self.cfg.patch_dim, images.shape[-1] // self.cfg.patch_dim)
        n = grid[0] * grid[1]
        start, end = self.patch_share(n)
        x = self.patch_embed(images, start, end)
        x = x + interpolate_positions(self.positions, self.grid, grid)[start:end].to(x.dtype)
        position_ids = torch.arange(start, end, device=x.device).expand(x.shape[0], -1)
        positions = Positions(position_ids, None)
        for layer in self.layers.values():
            x = layer(x, positions)
        pooled = self.sum_over_patches(self.norm(x).float())
        return self.head((pooled / n).to(x.dtype))


def flops_per_token(cfg: LongViTConfig) -> float:
    """Per patch, forward + backward (3 x forward): patch embedding, q/k/v/o, MLP, and non-causal dilated
    attention over sum_i min(w_i, N) / r_i^2 keys per query (no causal halving)."""
    h, n = cfg.hidden_size, cfg.seq_length
    keys = sum(min(w, n) / r ** 2 for w, r in zip(cfg.segment_lengths, cfg.dilated_ratios))
    kv_dim = cfg.kv_heads * cfg.head_dim
    per_layer = 2 * h * (2 * h + 2 * kv_dim) + 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2) + 2 * 2 * h * keys
    embed = 2 * cfg.num_channels * cfg.patch_dim ** 2 * h
    return 3.0 * (cfg.num_layers * per_layer + embed)
