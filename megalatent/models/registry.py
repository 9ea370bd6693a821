"""The one registry of model families: `--model-family NAME` -> how to build, check and count it.

A family (gpt, longnet, yoco, mhmoe, bitnet, ...) registers a `ModelFamily`; the trainer, the
config validation and the FLOP accounting look families up here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from megalatent.config import Config, ModelConfig
from megalatent.training.objectives import LANGUAGE_MODELING, Objective


@dataclass(frozen=True)
class ModelFamily:
    name: str
    build: Callable[[ModelConfig], nn.Module]
    # Training FLOPs per token (forward + backward) at the configured sequence length.
    flops_per_token: Callable[[ModelConfig], float]
    # Rules beyond the generic ones in config.validate (which calls this): one message per broken rule.
    validate: Callable[[Config], list[str]] = field(default=lambda cfg: [])
    # How context parallelism splits a sequence: "zigzag" (chunks r and 2C-1-r, balanced causal work for
    # dense attention) or "contiguous" (LongNet: segments stay on consecutive ranks).
    context_parallel_split: str = "zigzag"
    # What the family trains on (the batch's keys, the loss); see training/objectives.py.
    objective: Objective = LANGUAGE_MODELING
    # (cfg, layout) -> (train loader, valid loader or None); None: the Megatron language-modelling data.
    build_data: Optional[Callable] = None
    # With build_data: the vocabulary that data needs, used when --vocab-size is not given.
    vocab_size: Optional[Callable[[Config], int]] = None


MODEL_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in MODEL_FAMILIES:
        raise ValueError(f"model family {family.name!r} registered twice")
    MODEL_FAMILIES[family.name] = family
    return family


def build_model(cfg: ModelConfig) -> nn.Module:
    return MODEL_FAMILIES[cfg.model_family].build(cfg)
