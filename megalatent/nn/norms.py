"""Normalization layers selected by `--normalization`."""
import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "RMSNorm":
        return RMSNorm(dim, eps)
    if kind == "LayerNorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}")
