"""Fewer layers, the same plan: a model whose layers repeat is simulated at two smaller depths and its numbers
extrapolated to the full depth.

What the planner measures for a rank grows by the same amount with every repeat of the layers a pipeline stage
holds: parameters, gradients and optimizer state (each layer's own); the activation peak (reached at the same
point of the step, where one repeat more holds its saved activations); the collectives (each layer issues its
own: FSDP's gathers and reductions, tensor, context and expert parallelism's); the operators' cost. So with u
the smallest run of layers that repeats (1 for alike layers; 2 for a dense and an MoE layer at
--moe-layer-freq 2, or a decoder whose first half differs from its second), the planner simulates each stage
at d1 = 2u and d2 = 3u layers and takes X(L) = X(d1) + (L - d1) / u x (X(d2) - X(d1)) for L layers per stage.
At least two repeats: a stage of one has no layer before or after another (FSDP's prefetch, the first layer's
input) and is no steady state.

The repeat is found, not assumed: u is the smallest for which the stages of the models at d1, d2 and the full
depth, built on the meta device, hold layers whose kinds (module classes and parameter shapes) grow exactly by
that rule. A model without one (too shallow for it to save work, an uneven pipeline split, layers that do not
repeat) is simulated at its full depth. tests/test_planner.py checks extrapolated plans against full ones.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from fractions import Fraction
from typing import Optional

import torch
from torch import nn

from megalatent.config import Config, ConfigError
from megalatent.distributed.pipeline import plan_pipeline
from megalatent.families import get_family, validate
from megalatent.planning.collectives import Transfer
from megalatent.planning.memory import Memory
from megalatent.planning.simulate import RankReport


def _kind(layer: nn.Module) -> tuple:
    return (tuple((name, type(m).__name__) for name, m in layer.named_modules())
            + tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()))


def _stage_contents(cfg: Config) -> list[Counter]:
    """Per pipeline stage: the kinds of its layers, and the modules it holds besides them for a layer's sake."""
    family = get_family(cfg.model.model_family)
    with torch.device("meta"):
        model = family.build(cfg.model)
    kinds = {int(name): _kind(layer) for name, layer in model.layers.items()}
    pp = cfg.parallel.pipeline_model_parallel_size
    stages = plan_pipeline(cfg, pp).stage_layers if pp > 1 else [sorted(kinds)]
    extras = family.parallel.pipeline.with_layer(cfg.model)
    return [Counter([kinds[i] for i in layers] + [name for name, i in extras.items() if i in layers])
            for layers in stages]


def _at_depth(cfg: Config, repeats: int, unit: int, world_size: int) -> Optional[Config]:
    """`cfg` with `repeats` x `unit` layers per stage, or None when the trainer's rules refuse that depth."""
    p = cfg.parallel
    stages = p.pipeline_model_parallel_size * (cfg.model.num_layers // (p.num_layers_per_virtual_pipeline_stage
                                                                       or cfg.model.num_layers))
    reduced = copy.deepcopy(cfg)
    reduced.model.num_layers = stages * repeats * unit
    if p.num_layers_per_virtual_pipeline_stage is not None:
        reduced.parallel.num_layers_per_virtual_pipeline_stage = repeats * unit
    try:
        validate(reduced, world_size)
    except ConfigError:
        return None
    return reduced


def reduced_depths(cfg: Config, world_size: int) -> Optional[tuple[Config, Config, Fraction]]:
    """(cfg at d1, cfg at d2, (L - d1) / (d2 - d1)) for the smallest repeat u (see the module doc), or None."""
    p = cfg.parallel
    if p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None:
        return None
    stages = p.pipeline_model_parallel_size * (cfg.model.num_layers // (p.num_layers_per_virtual_pipeline_stage
                                                                       or cfg.model.num_layers))
    per_stage = cfg.model.num_layers // stages
    full = None
    for unit in range(1, per_stage // 5 + 1):  # 2u + 3u layers simulated must be fewer than the full depth
        small, large = _at_depth(cfg, 2, unit, world_size), _at_depth(cfg, 3, unit, world_size)
        if small is None or large is None:
            continue
        factor = Fraction(per_stage - 2 * unit, unit)
        full = full or _stage_contents(cfg)
        pairs = zip(full, _stage_contents(small), _stage_contents(large))
        if all(all(f[k] == s[k] + factor * (g[k] - s[k]) for k in f.keys() | s.keys() | g.keys())
               for f, s, g in pairs):
            return small, large, factor
    return None


def _affine(a, b, factor: Fraction):
    return a + float(factor) * (b - a)


def extrapolate(small: RankReport, large: RankReport, factor: Fraction) -> RankReport:
    """The report of the full depth from those of d1 and d2 layers per stage (the same rank). The collectives
    are extrapolated per group and kind, calls and bytes each: a layer may add calls, or bytes to one call (a
    statistic of every layer reduced at once); each becomes one Transfer of the mean size, counted as often as
    the calls."""
    memory = Memory(**{f: round(_affine(getattr(small.memory, f), getattr(large.memory, f), factor))
                       for f in vars(small.memory)})
    totals = [{}, {}]  # (kind, ranks, group, fsdp) -> [calls, bytes]
    for report, total in zip((small, large), totals):
        for t, weight in zip(report.transfers, report.weights):
            calls_bytes = total.setdefault((t.kind, t.ranks, t.group, t.fsdp), [0.0, 0.0])
            calls_bytes[0] += weight
            calls_bytes[1] += weight * t.bytes
    transfers, weights = [], []
    for key in dict.fromkeys(list(totals[0]) + list(totals[1])):  # in order of first appearance
        (calls_a, bytes_a), (calls_b, bytes_b) = (total.get(key, (0.0, 0.0)) for total in totals)
        calls, nbytes = _affine(calls_a, calls_b, factor), _affine(bytes_a, bytes_b, factor)
        if calls > 0:
            kind, ranks, group, fsdp = key
            transfers.append(Transfer(kind, ranks, nbytes / calls, group, fsdp))
            weights.append(calls)
    cost = small.cost.plus(large.cost.minus(small.cost), float(factor))
    return replace(large, memory=memory, transfers=transfers, weights=weights, cost=cost,
                   simulated_s=small.simulated_s + large.simulated_s)
