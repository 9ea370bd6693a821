"""Feed-forward blocks."""
import torch
from torch import nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — LLaMA's MLP. `linear` lets a family swap the projection (BitLinear)."""

    def __init__(self, hidden: int, ffn: int, linear=nn.Linear):
        super().__init__()
        self.gate_proj = linear(hidden, ffn, bias=False)
        self.up_proj = linear(hidden, ffn, bias=False)
        self.down_proj = linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — the GPT-2 MLP, for `--no-swiglu`."""

    def __init__(self, hidden: int, ffn: int, linear=nn.Linear):
        super().__init__()
        self.up_proj = linear(hidden, ffn, bias=False)
        self.down_proj = linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
