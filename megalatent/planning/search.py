"""`--search`: every valid layout of a configuration for a GPU count, each simulated, ranked by predicted step
time among those that fit.

The layouts: tensor parallelism inside a node (tp divides the GPUs per node), with sequence parallelism
(Megatron's pairing); pipeline, context and data parallelism take the rest; expert parallelism (MoE models)
any divisor of dp x cp that divides the experts; optionally 2 virtual stages per pipeline rank (interleaved
1F1B). A layout is valid when the trainer's own rules accept it (families.validate).
"""
from __future__ import annotations

import copy
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

from megalatent.config import Config, ConfigError
from megalatent.families import validate
from megalatent.planning.plan import Allowances, Plan, plan_layout, set_vocab_size
from megalatent.planning.hardware import Target
from megalatent.planning.workers import SimulationError, process_context


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: Config, world_size: int, gpus_per_node: int, virtual_stages: bool = False) -> Iterator[Config]:
    """The configurations of every valid layout (the trainer's rules decide validity)."""
    m = cfg.model
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(world_size // tp) if world_size % tp == 0 else []:
            for cp in _divisors(world_size // (tp * pp)):
                dp = world_size // (tp * pp * cp)
                eps = [e for e in _divisors(dp * cp) if m.num_experts and m.num_experts % e == 0] or [1]
                for ep in eps:
                    for per_stage in ([None, m.num_layers // (2 * pp)] if virtual_stages and pp > 1 else [None]):
                        candidate = copy.deepcopy(cfg)
                        p = candidate.parallel
                        p.tensor_model_parallel_size, p.sequence_parallel = tp, tp > 1
                        p.pipeline_model_parallel_size, p.context_parallel_size = pp, cp
                        p.expert_model_parallel_size = ep
                        p.num_layers_per_virtual_pipeline_stage = per_stage or None
                        p.pipeline_schedule = p.decoder_first_pipeline_num_layers = None
                        p.decoder_last_pipeline_num_layers = None
                        try:
                            validate(candidate, world_size)
                        except ConfigError:
                            continue
                        yield candidate


def describe(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "cp": p.context_parallel_size, "ep": p.expert_model_parallel_size,
            "layers_per_virtual_stage": p.num_layers_per_virtual_pipeline_stage}


def _plan(candidate: Config, nodes: int, gpus_per_node: int, target: Target, allowances: Allowances,
          full_depth: bool) -> tuple[Optional[Plan], Optional[str]]:
    try:
        return plan_layout(candidate, nodes, gpus_per_node, target, allowances, full_depth), None
    except SimulationError as err:
        return None, str(err).strip().splitlines()[-1]


def search(cfg: Config, nodes: int, gpus_per_node: int, target: Target, allowances: Allowances = Allowances(),
           virtual_stages: bool = False, jobs: int = 1,
           full_depth: bool = False) -> tuple[list[Plan], list[tuple[dict, str]]]:
    """(the plans of every valid layout, the layouts whose simulation failed with the reason). `jobs` > 1:
    that many layouts at once, each in a process of its own (a simulation holds torch.distributed's
    process-wide state)."""
    cfg = target.prepare(copy.deepcopy(cfg))
    set_vocab_size(cfg)  # once, before the layouts (plan_layout would for each)
    candidates = list(layouts(cfg, nodes * gpus_per_node, gpus_per_node, virtual_stages))
    args = [(c, nodes, gpus_per_node, target, allowances, full_depth) for c in candidates]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=process_context()) as pool:
            results = list(pool.map(_plan, *zip(*args)))
    else:
        results = [_plan(*a) for a in args]
    plans = [plan for plan, _ in results if plan is not None]
    failed = [(describe(c), reason) for c, (plan, reason) in zip(candidates, results) if plan is None]
    return plans, failed
