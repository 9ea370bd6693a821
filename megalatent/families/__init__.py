"""The model families, and the registry's view of a run's configuration.

Each family is a module (or package) here that hands the rest of the system one `Family` (family.py):
its flags, rules, objective, FLOPs, model and parallel plan. Registering one is one line in FAMILIES.

    parse_args(argv)           flags + YAML -> Config, with the chosen family's section of flags
    validate(cfg, world_size)  every rule (the shared ones, the layout's, the family's), reported at once
    build_model(cfg.model)     the single-device model of a config, initialised
    model_config(**fields)     a family's ModelConfig from keyword arguments (tests, tools)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import nn

from megalatent import config as config_module
from megalatent.config import Config, ConfigError, ModelConfig
from megalatent.data.gpt_data import parse_data_path
from megalatent.distributed.fp8 import fp8_errors
from megalatent.distributed.layout import layout_errors
from megalatent.distributed.materialize import initialize
from megalatent.families import bitnet, gpt, latentlm, longnet, longvit, yoco
from megalatent.families.family import Family

FAMILIES: Mapping[str, Family] = {family.name: family for family in (
    gpt.FAMILY,
    longnet.FAMILY,
    bitnet.FAMILY,
    yoco.FAMILY,
    latentlm.FAMILY,
    longvit.FAMILY,
)}

CONFIG_CLASSES: Mapping[str, type[ModelConfig]] = {name: family.config for name, family in FAMILIES.items()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError([f"--model-family {name!r} is unknown; choose one of {sorted(FAMILIES)}"])
    return FAMILIES[name]


def parse_args(argv: Optional[list[str]] = None) -> Config:
    return config_module.parse_args(argv, CONFIG_CLASSES)


def build_parser():
    return config_module.build_parser(CONFIG_CLASSES)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every rule a run must satisfy before anything is allocated; raises ConfigError listing all."""
    errors, dp = layout_errors(cfg, world_size)
    family = FAMILIES.get(cfg.model.model_family)
    text_data = family is None or family.data is None  # a family with data of its own checks that itself
    errors += config_module.config_errors(cfg, dp, text_data)
    if text_data and cfg.data.data_path is not None:
        try:
            parse_data_path(cfg.data.data_path)  # the .bin/.idx of every prefix exist and are sound
        except ValueError as err:
            errors += str(err).splitlines()  # one line per damaged dataset
    if family is not None:
        errors += family.validate(cfg)
        if cfg.parallel.pipeline_model_parallel_size > 1 and family.objective.pipeline_loss is None:
            errors.append(f"--model-family {family.name} does not support pipeline parallelism yet")
        # FP8's rules read the model's layers (built on the meta device), once the model's flags are valid.
        errors += fp8_errors(cfg, None if errors else lambda: _meta_model(family, cfg.model),
                             list(family.parallel.pipeline.with_layer(cfg.model)))
    if errors:
        raise ConfigError(errors)


def _meta_model(family: Family, cfg: ModelConfig) -> nn.Module:
    """The model without memory; the vocabulary (resolved later from the tokenizer) does not matter here."""
    with torch.device("meta"):
        return family.build(dataclasses.replace(cfg, vocab_size=cfg.vocab_size or cfg.make_vocab_size_divisible_by))


def model_config(**fields: Any) -> ModelConfig:
    """The `model_family` family's config with these fields (the others default)."""
    cls = get_family(fields.get("model_family", ModelConfig.model_family)).config
    return cls(**fields)


def build_model(cfg: ModelConfig, seed: Optional[int] = None) -> nn.Module:
    """The single-device model of a config, initialised from `seed` (default: torch's, so that
    `torch.manual_seed(s)` then `build_model(cfg)` gives the weights a run with --seed s starts from); built
    under `torch.device("meta")`, it is left uninitialised (see distributed/materialize.py)."""
    model = get_family(cfg.model_family).build(cfg)
    if not any(t.is_meta for t in model.state_dict().values()):
        initialize(model, torch.initial_seed() if seed is None else seed)
    return model


def model_config_from_saved(saved: Mapping[str, Any], fallback: Mapping[str, Any] = {}) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig a checkpoint recorded (see config.model_config_from_saved)."""
    return config_module.model_config_from_saved(saved, CONFIG_CLASSES, fallback)


__all__ = ["FAMILIES", "Family", "build_model", "build_parser", "get_family", "model_config",
           "model_config_from_saved", "parse_args", "validate"]
