"""Mixture of experts: the top-k MoE layer and MH-MoE (arXiv 2404.15045, 2411.16205) in one module.

    MH-MoE:  x [tokens, d] -> head_proj (d x d) -> h sub-tokens of width d/h each
             -> route every sub-token to its top-k experts (experts work at width d/h)
             -> put the sub-tokens back in order -> merge_proj (d x d)
    h = 1 without head/merge projections is the plain top-k MoE layer.

Dispatch is index-based: the (sub-)token/expert assignments are sorted by expert, the tokens gathered
in that order, each expert applied to its contiguous block (a grouped matmul), and the outputs
scattered back weighted by the router. Memory is O(tokens * k), never a dense tokens x experts x
capacity mask (which MH-MoE's h-fold more tokens would make h^2 larger). With expert parallelism the
sorted blocks travel to the experts' ranks by all-to-all (distributed/expert_parallel.py).

Balancing (see `balance_loss`): the Switch/GShard auxiliary loss with statistics over the tokens of every
data- and context-parallel rank, the router z-loss, and the auxiliary-loss-free expert bias (DeepSeek-V3).
The auxiliary losses enter backward through `_AttachAuxLoss` on the layer's output, so that a model's
forward keeps returning only logits (pipeline stages included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.nn.bitlinear import quantize_activations, quantize_weights, rms_norm


@dataclass
class Routing:
    """The router's decision for T (sub-)tokens."""
    experts: torch.Tensor  # [T, k] expert index of each assignment
    weights: torch.Tensor  # [T, k] combine weight of each assignment (fp32)
    probs: torch.Tensor    # [T, E] softmax over all experts (fp32), for the balance loss
    logits: torch.Tensor   # [T, E] (fp32), for the z-loss


class Router(nn.Module):
    """Top-k router in fp32.

    kind "linear": logits = x W^T.  kind "xmoe" (X-MoE, arXiv 2204.09179): x is projected to 16
    dimensions and scored by cosine similarity against L2-normalised expert embeddings, divided by a
    temperature; low-dimensional cosine routing avoids the representation collapse of dot-product routing.

    Combine weights follow Megatron: the softmax over the k selected logits, or with `pre_softmax` the
    full softmax's probabilities of the selected experts. With `expert_bias` a per-expert bias (a buffer,
    not trained by gradient) shifts which experts are *selected*, never the weights; the trainer moves it
    toward balance after every step (auxiliary-loss-free balancing, DeepSeek-V3).
    """

    XMOE_DIM = 16
    XMOE_TEMPERATURE = 0.07

    def __init__(self, dim: int, num_experts: int, topk: int, kind: str = "linear", pre_softmax: bool = False,
                 expert_bias: bool = False):
        super().__init__()
        self.num_experts, self.topk, self.kind, self.pre_softmax = num_experts, topk, kind, pre_softmax
        if kind == "linear":
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
        elif kind == "xmoe":
            self.proj = nn.Linear(dim, self.XMOE_DIM, bias=False)
            self.expert_embeddings = nn.Parameter(torch.empty(num_experts, self.XMOE_DIM))
        else:
            raise ValueError(f"unknown router kind {kind!r}")
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.kind == "linear":
                return F.linear(x, self.weight.float())
            q = F.normalize(F.linear(x, self.proj.weight.float()), dim=-1)
            return F.linear(q, F.normalize(self.expert_embeddings.float(), dim=-1)) / self.XMOE_TEMPERATURE

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        scores = logits if self.expert_bias is None else logits + self.expert_bias
        experts = scores.topk(self.topk, dim=-1).indices
        if self.pre_softmax:
            weights = probs.gather(-1, experts)
        else:
            weights = logits.gather(-1, experts).softmax(dim=-1)
        return Routing(experts, weights, probs, logits)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones by `rate`."""
        self.expert_bias += rate * torch.sign(tokens_per_expert.mean() - tokens_per_expert)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [T, d_in] sorted by expert, counts [E] rows per expert, weight [E, d_in, d_out] -> [T, d_out].

    One `torch._grouped_mm` call (CUTLASS grouped GEMM on Hopper, a per-group fallback on CPU) when
    this torch has it and the rows are 16-byte aligned as it requires; else a loop over the experts'
    blocks (`grouped_mm_loop`, also the reference the tests hold it to). Under torch.compile only bf16 takes
    the one call: torch 2.13's compile-time (meta) kernel of _grouped_mm refuses other dtypes, though the CPU
    kernel runs them.
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    aligned = all(n * torch.finfo(dtype).bits // 8 % 16 == 0 for n in (x.shape[-1], weight.shape[-1]))
    traceable = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if hasattr(torch, "_grouped_mm") and aligned and traceable:
        return torch._grouped_mm(x.to(dtype), weight.to(dtype), offs=counts.cumsum(0).to(torch.int32))
    return grouped_mm_loop(x, weight, counts)


@torch.compiler.disable  # block sizes are data: run eagerly (one graph break) rather than recompile per routing
def grouped_mm_loop(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    blocks = x.split(counts.tolist())
    return torch.cat([block @ weight[e] for e, block in enumerate(blocks)]) if blocks else x.new_zeros(0, weight.shape[-1])


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the assignments `experts` (expert ids) each expert got, [num_experts]. (bincount's length
    depends on the data for torch.compile, a graph break; this count's does not.)"""
    return torch.zeros(num_experts, dtype=torch.long, device=experts.device).index_add_(
        0, experts, torch.ones_like(experts))


def on_this_device(t: torch.Tensor) -> torch.Tensor:
    """The sum over every device holding other tokens of a statistic: on one device, the statistic itself.
    (A parallel layout gives an MoE layer the all-reduce over its ranks; see `MoELayer.sum_over_token_ranks`.)"""
    return t


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights [E, d_in, d_out] (one tensor per projection, so one grouped
    matmul per projection, and expert parallelism shards dim 0).

    `ternary` makes them BitNet b1.58 experts (--linear-impl bitlinear): as a BitLinear, each projection's
    input is RMS-normalised (a gain per expert; gate and up share theirs, as in BitNet's reference model)
    and quantised to int8 per token, and each expert's weight is ternary with its own absmean scale, all
    passed straight through in backward (see megalatent/nn/bitlinear.py).

    `matmul`, a seam for low-precision training: None computes with `grouped_mm` in the weights' (or autocast's)
    precision; FP8 training sets a module with grouped_mm's signature that quantises every expert's operands
    (distributed/fp8.py). It holds no parameters, so the state dict is the same either way."""

    def __init__(self, num_experts: int, dim: int, ffn: int, ternary: bool = False, eps: float = 1e-5):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, ffn))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, ffn))
        self.down_proj = nn.Parameter(torch.empty(num_experts, ffn, dim))
        self.ternary, self.eps = ternary, eps
        if ternary:
            self.input_norm = nn.Parameter(torch.ones(num_experts, dim))
            self.hidden_norm = nn.Parameter(torch.ones(num_experts, ffn))
        self.matmul: Optional[nn.Module] = None

    def _quantized_input(self, x: torch.Tensor, norm: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
        x_n = rms_norm(x, norm[expert_of_row], self.eps)
        x_int, scale = quantize_activations(x_n)
        return x_n + (x_int / scale - x_n).detach()

    @staticmethod
    def _quantized_weight(w: torch.Tensor) -> torch.Tensor:
        w_int, gamma = torch.vmap(quantize_weights)(w)  # one scale per expert
        return w + (w_int * gamma.view(-1, 1, 1) - w).detach()

    def weights(self) -> dict[str, torch.Tensor]:
        """The stacked tensors this module computes with, by name (expert parallelism hands a subclass this
        rank's experts: distributed/expert_parallel.py)."""
        return dict(self.named_parameters(recurse=False))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x sorted by (local) expert with counts[e] rows for expert e."""
        w = self.weights()
        gate, up, down = w["gate_proj"], w["up_proj"], w["down_proj"]
        if self.ternary:
            x = self._quantized_input(x, w["input_norm"], counts)
            gate, up, down = (self._quantized_weight(t) for t in (gate, up, down))
        mm = grouped_mm if self.matmul is None else self.matmul
        hidden = F.silu(mm(x, gate, counts)) * mm(x, up, counts)
        if self.ternary:
            hidden = self._quantized_input(hidden, w["hidden_norm"], counts)
        return mm(hidden, down, counts)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward, the auxiliary loss gets gradient 1 (it was scaled before), so its
    gradient joins the main loss's without changing what the layer returns."""

    @staticmethod
    def forward(ctx, out, aux_loss):
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), device=grad.device, dtype=torch.float32)


def _in_backward() -> bool:
    """True while activation recomputation re-runs a forward inside backward: statistics must not be
    counted twice."""
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    """The MoE / MH-MoE feed-forward block: [b, s, d] -> [b, s, d] (the residual stays outside).

    Two seams for a parallel layout (distributed/parallelize.py sets them; single-device values here):
    `sum_over_token_ranks` (sums a statistic over the ranks that hold other tokens: the balance statistics
    are those of the global batch) and `dispatcher` (None, or expert parallelism's: runs the experts on the
    rows sorted by expert). `aux_loss_scale` is set by the step hook (training/moe_stats.py) before each
    step so that the auxiliary losses' gradient matches the loss it reports.
    """

    def __init__(self, dim: int, ffn: int, num_experts: int, topk: int, heads: int = 1, router: str = "linear",
                 pre_softmax: bool = False, expert_bias: bool = False, capacity_factor: Optional[float] = None,
                 drop_policy: str = "probs", aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0,
                 linear=nn.Linear, ternary_experts: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MH-MoE: hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.sub_dim = heads, dim // heads
        self.num_experts, self.topk = num_experts, topk
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        # MH-MoE's head and merge layers (with bias, as in the reference code, unless BitNet's bias-free
        # linear layers); absent for plain MoE.
        self.head_proj = linear(dim, dim, bias=not ternary_experts) if heads > 1 else None
        self.merge_proj = linear(dim, dim, bias=not ternary_experts) if heads > 1 else None
        self.router = Router(self.sub_dim, num_experts, topk, router, pre_softmax, expert_bias)
        self.experts = Experts(num_experts, self.sub_dim, ffn, ternary=ternary_experts)
        self.sum_over_token_ranks: Callable[[torch.Tensor], torch.Tensor] = on_this_device
        self.dispatcher = None
        self.aux_loss_scale = 1.0
        self.reset_statistics()

    # ------------------------------------------------------------------ statistics for logs and balancing
    def reset_statistics(self) -> None:
        """One record per training micro-batch forward: (tokens per expert, balance loss, z-loss), each over
        every data/context-parallel rank's tokens; read by training/moe_stats.py."""
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self.head_proj(x) if self.head_proj is not None else x
        # A token's h sub-tokens are adjacent rows, so reshaping back reassembles every token in order.
        tokens = h.reshape(-1, self.sub_dim)
        routing = self.router(tokens)
        experts, weights = routing.experts.flatten(), routing.weights.flatten()
        token_of = torch.arange(tokens.shape[0], device=x.device).repeat_interleave(self.topk)
        counts = tokens_per_expert(experts, self.num_experts)
        order, kept_counts = self._dispatch_order(experts, weights, counts)
        rows = token_of[order]
        if self.dispatcher is not None:
            y = self.dispatcher(tokens[rows], kept_counts, self.experts)
        else:
            y = self.experts(tokens[rows], kept_counts)
        combined = torch.zeros_like(tokens).index_add_(0, rows, y * weights[order].unsqueeze(-1).to(y.dtype))
        out = combined.view(shape)
        if self.merge_proj is not None:
            out = self.merge_proj(out)
        if self.training and torch.is_grad_enabled():
            out = self._attach_aux_losses(out, routing, counts)
        return out

    def _dispatch_order(self, experts: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor):
        """The assignments in expert order, and the kept count per expert.

        Dropless unless a capacity factor is set: then expert e keeps at most
        C = ceil(factor * assignments / E) of its assignments, those with the highest router weight
        ("probs", Megatron's default) or the earliest tokens ("position"); a dropped assignment adds
        nothing (its token still has the residual and its other experts).
        """
        if self.capacity_factor is None:
            return experts.argsort(stable=True), counts
        capacity = math.ceil(self.capacity_factor * experts.numel() / self.num_experts)
        if self.drop_policy == "probs":  # by weight (descending), then stably by expert
            by_weight = weights.argsort(descending=True, stable=True)
            order = by_weight[experts[by_weight].argsort(stable=True)]
        else:
            order = experts.argsort(stable=True)
        starts = counts.cumsum(0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[experts[order]]
        order = order[rank_in_expert < capacity]
        return order, counts.clamp(max=capacity)

    # Eager under torch.compile: traced, the growing list would be guarded on its length and the block
    # recompiled for every micro-batch of a step.
    @torch.compiler.disable
    def _record(self, *statistics: torch.Tensor) -> None:
        if not _in_backward():
            self.records.append(statistics)

    def _attach_aux_losses(self, out: torch.Tensor, routing: Routing, counts: torch.Tensor) -> torch.Tensor:
        balance, z, global_counts = balance_and_z_losses(routing, counts, self.topk, self.sum_over_token_ranks)
        self._record(global_counts, balance.value, z.value)
        aux = self.aux_loss_coeff * balance.local_part + self.z_loss_coeff * z.local_part
        if not aux.requires_grad:
            return out
        return _AttachAuxLoss.apply(out, aux * self.aux_loss_scale)


@dataclass
class _Loss:
    value: torch.Tensor       # the loss over every rank's tokens (no gradient), for logs
    local_part: torch.Tensor  # this rank's additive share of it (with gradient); the shares sum to `value`


def balance_and_z_losses(routing: Routing, counts: torch.Tensor, topk: int,
                         sum_over_token_ranks: Callable[[torch.Tensor], torch.Tensor] = on_this_device):
    """The Switch/GShard balance loss and the router z-loss over the tokens of every rank (the ranks whose
    statistics `sum_over_token_ranks` sums).

        balance = E * sum_e f_e * P_e,   f_e = (assignments to e) / (T k),   P_e = (sum_t p_te) / T
        z       = (1/T) sum_t logsumexp(logits_t)^2

    with T the number of (sub-)tokens over all ranks of the group (Megatron's "global_aux_loss": the
    statistics of the batch across the data-parallel ranks, not of one rank's shard). f carries no
    gradient; each rank's share of P (its own tokens' probabilities over the global T) is the part of the
    loss its backward differentiates, and the shares sum to the global loss over the ranks.
    Returns (balance, z, global assignment counts per expert).
    """
    num_experts = routing.probs.shape[-1]
    stats = sum_over_token_ranks(torch.cat([counts.float(), torch.tensor([float(routing.probs.shape[0])],
                                                                          device=counts.device)]))
    global_counts, total = stats[:-1], stats[-1]
    f = global_counts / (total * topk)
    balance_local = num_experts * (f * routing.probs.sum(0)).sum() / total
    z_local = routing.logits.logsumexp(-1).square().sum() / total
    values = sum_over_token_ranks(torch.stack([balance_local.detach(), z_local.detach()]))
    return _Loss(values[0], balance_local), _Loss(values[1], z_local), global_counts


def moe_layers(parts) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every MoE layer in a model or a list of pipeline-stage modules."""
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    return [(name, m) for part in parts for name, m in part.named_modules() if isinstance(m, MoELayer)]
