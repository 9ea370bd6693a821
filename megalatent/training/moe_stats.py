"""The training side of MoE layers, as a step hook (training/hooks.py): scaling their auxiliary losses,
gathering their statistics for the logs, and the auxiliary-loss-free expert-bias update after each step.

Statistics are per MoE layer and per step: the balance loss and z-loss (means over the step's
micro-batches, each over every data/context-parallel rank's tokens) and the tokens routed to each
expert. Pipeline stages hold different layers, so the table is summed over the pp ranks before logging.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from megalatent.distributed.layout import ParallelLayout
from megalatent.nn.moe import moe_layers
from megalatent.training.hooks import StepReport

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_step_hooks(parts, layout: ParallelLayout, cfg) -> list["MoEStepStats"]:
    """The hook for a model configured with experts (`cfg` a ModelConfig), else none. Every rank of such a
    run gets it, also a pipeline stage without MoE layers: the statistics' collectives must match."""
    if cfg.num_experts is None:
        return []
    return [MoEStepStats(parts, layout, cfg.num_layers, cfg.num_experts, cfg.moe_router_bias_update_rate)]


class MoEStepStats:
    def __init__(self, parts, layout: ParallelLayout, num_layers: int, num_experts: int, bias_update_rate: float):
        self.layout, self.num_layers, self.num_experts = layout, num_layers, num_experts
        self.layers = [(int(_LAYER_INDEX.search(name).group(1)), layer) for name, layer in moe_layers(parts)]
        self.bias_update_rate = bias_update_rate
        self.micro_batches = 1
        self.stats: Optional[dict] = None  # the last step's (see `gather`)

    def start_step(self, micro_batches: int) -> None:
        """The auxiliary losses' gradient is scaled like the LM loss's: the data/context-parallel gradient
        reduction averages over dp x cp ranks, and the step's auxiliary loss is the mean over micro-batches."""
        self.micro_batches = micro_batches
        for _, layer in self.layers:
            layer.reset_statistics()
            layer.aux_loss_scale = self.layout.dp * self.layout.cp / micro_batches

    def _step_records(self, layer):
        """The step's records of a layer. On the first step of a pipeline, torch.distributed.pipelining runs
        one extra forward per stage to infer shapes (on placeholder tensors); only the last
        `micro_batches` records are the step's."""
        return layer.records[-self.micro_batches:]

    def after_optimizer_step(self) -> None:
        """Moves the expert biases toward balance (the same update on every rank holding the layer: the
        counts are already summed over the data/context-parallel ranks)."""
        for _, layer in self.layers:
            if layer.router.expert_bias is not None and layer.records:
                counts = sum(r[0] for r in self._step_records(layer))
                layer.router.update_expert_bias(counts.to(layer.router.expert_bias.device), self.bias_update_rate)

    def end_step(self, device: torch.device) -> Optional[StepReport]:
        """Megatron's MoE entries on the iteration line, plus the worst expert's load over the mean (1 = balanced)."""
        self.stats = stats = self.gather(device)
        if stats is None:
            return None
        line = [("load_balancing_loss", f"{stats['balance_loss']:.6E}"), ("z_loss", f"{stats['z_loss']:.6E}"),
                ("max expert load", f"{stats['max_load']:.2f}")]
        scalars = {"moe/load-balancing-loss": stats["balance_loss"], "moe/z-loss": stats["z_loss"],
                   "moe/max-expert-load": stats["max_load"]}
        scalars.update({f"moe/layer-{i}/max-expert-load": v for i, v in stats["layer_loads"].items()})
        return StepReport(line, scalars)

    def gather(self, device: torch.device) -> Optional[dict]:
        """{'balance_loss', 'z_loss', 'max_load'} averaged/maxed over MoE layers, plus per-layer loads
        (max tokens of an expert / mean tokens per expert; 1.0 is perfect balance), or None when no rank
        holds an MoE layer."""
        table = torch.zeros(self.num_layers, 3 + self.num_experts, device=device)
        for index, layer in self.layers:
            records = self._step_records(layer)
            if records:
                counts, balance, z = (torch.stack([r[i].to(device) for r in records]) for i in range(3))
                table[index, 0] = 1.0
                table[index, 1] = balance.mean()
                table[index, 2] = z.mean()
                table[index, 3:] = counts.sum(0)
        table = self.layout.all_reduce_sum(table, ("pp",))
        present = table[:, 0] > 0
        if not present.any():
            return None
        counts = table[present, 3:]
        loads = (counts.max(1).values / counts.mean(1).clamp(min=1e-9)).tolist()
        layer_ids = present.nonzero().flatten().tolist()
        return {"balance_loss": table[present, 1].mean().item(), "z_loss": table[present, 2].mean().item(),
                "max_load": max(loads), "layer_loads": dict(zip(layer_ids, loads))}
