"""The one interface between a model family and the rest of the system.

A family hands the shared code (config, pretrain, training, distributed, data, inference) one `Family`;
nothing shared names a family. Adding one is a module in this package and a line in its __init__.py
(README: "Adding a model family").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from megalatent.config import Config, ModelConfig
from megalatent.distributed.plan import DECODER_PLAN, ParallelPlan
from megalatent.training.objectives import LANGUAGE_MODELING, Objective


def no_rules(cfg: Config) -> list[str]:
    return []


@dataclass(frozen=True)
class FamilyData:
    """Data of a family's own, instead of Megatron language-modelling data (`--data-path` prefixes of
    tokenized text, or the default corpus)."""
    # (cfg, layout, the objective's batch keys) -> (train loader, validation loader or None)
    build: Callable[..., tuple]
    # The vocabulary that data needs, used when --vocab-size is not given (None: the flag's value).
    vocab_size: Optional[Callable[[Config], int]] = None


@dataclass(frozen=True)
class Family:
    name: str
    # Its flags: ModelConfig, or a subclass whose own fields are the family's section of the configuration.
    config: type[ModelConfig]
    # The single-device model of a config (built on whatever device is current, the meta device included).
    build: Callable[[ModelConfig], nn.Module]
    # Training FLOPs per token (forward + backward) at the configured sequence length.
    flops_per_token: Callable[[ModelConfig], float]
    # Rules beyond the ones every run shares: one message per broken rule, naming the flag and the fix.
    validate: Callable[[Config], list[str]] = no_rules
    # What it trains on: the batch's keys, the loss and its logged parts, pipeline support.
    objective: Objective = LANGUAGE_MODELING
    # How tensor, sequence, context and pipeline parallelism split its model.
    parallel: ParallelPlan = field(default=DECODER_PLAN)
    data: Optional[FamilyData] = None
