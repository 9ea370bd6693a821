"""The matmul FLOPs a model runs, counted with torch.utils.flop_counter.FlopCounterMode, so that each family's
flops_per_token (a formula in the library) is held to the model rather than restated in its tests.

What FlopCounterMode counts: 2 FLOPs per multiply-add of every matrix product dispatched, by op: aten.mm and
aten.addmm (every nn.Linear: attention projections, MLPs, routers, retention's gates, the head; the MoE
experts' per-expert products) and aten.bmm (attention's scores Q K^T and values P V, retention's state
products). Forward and, counted separately here, backward. Nothing else: embedding lookups, norms,
softmax, RoPE, elementwise gates, decays and masks, the loss.

The convention of flops_per_token (Megatron-LM's and PaLM's, models.md):
- training = forward + backward = 3 x forward, since backward runs two products per forward product (the
  input's gradient and the weight's). `count` measures backward rather than assuming it; the tests assert 3x.
- the same matmuls, at 2 FLOPs per multiply-add; attention costs 2 * 2 * head_dim per head for each
  (query, key) pair a query attends to (its score and its share of the values).
- causal halving: a causal query is counted with s/2 keys on average (not the exact (s + 1)/2; LongNet
  Eq. 16 halves each dilated pattern the same way). Kernels compute whole blocks of pairs, masked ones
  included, and the counter counts what is computed, so each test turns the counted score/value FLOPs
  into the convention's for its family's kernels, and says how.

Three substitutions let the counter see every product, each computing the same products as the path it
replaces: SDPA's math backend (CPU's fused flash kernel has no FLOP formula: it would count 0), the dilated
attention's plain core for the same reason (blocks of query rows; like flash attention, its backward
recomputes the scores Q K^T), and the MoE experts' per-expert loop (torch._grouped_mm has no formula either;
tests/test_moe.py holds grouped_mm to the loop).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalatent.nn import dilated, moe


@dataclass
class Counts:
    forward: dict[str, Counter]  # module name ("" for the whole model, "layers.0.attention", ...) -> op -> FLOPs
    backward: int

    def op(self, name: str, module: str = "") -> int:
        """Forward FLOPs of one op ("mm", "addmm", "bmm") inside `module` (its submodules included)."""
        return self.forward.get(module, Counter())[f"aten.{name}"]

    @property
    def forward_total(self) -> int:
        return sum(self.forward[""].values())

    @property
    def training(self) -> int:
        return self.forward_total + self.backward


def count(model: torch.nn.Module, *inputs) -> Counts:
    """One forward of `model` on `inputs` and the backward of a scalar made from its output."""
    with sdpa_kernel(SDPBackend.MATH), mock.patch.object(moe, "grouped_mm", moe.grouped_mm_loop), \
            mock.patch.object(dilated, "_core", lambda device: dilated.PLAIN):
        with FlopCounterMode(display=False) as forward:
            out = model(*inputs)
        with FlopCounterMode(display=False) as backward:
            out.float().square().mean().backward()
    root = type(model).__name__
    per_module = {}
    for name, ops in forward.get_flop_counts().items():
        if name == root:
            name = ""
        elif name.startswith(root + "."):
            name = name[len(root) + 1:]
        else:  # "Global": the same as the root module's
            continue
        per_module[name] = Counter({str(op): n for op, n in ops.items()})
    return Counts(per_module, backward.get_total_flops())
