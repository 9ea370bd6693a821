"""Load a trained model for inference from a checkpoint directory the trainer wrote (`--save DIR`).

The one place a checkpoint becomes a model to decode with: `load_for_inference` reads the weights
(any training layout: DCP reassembles full tensors without a process group), rebuilds the model its
train state records, and finds the tokenizer recorded there. A family whose inference model differs
from its training model (packed ternary weights, megalatent/interop/packed.py) loads from its own
directory format.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megalatent.config import ModelConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model
from megalatent.interop.convert import ConvertError, model_config, read_state, resolve_checkpoint
from megalatent.interop.packed import is_packed_dir, load_packed_model, read_packed_config


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    checkpoint: str  # the iter_XXXXXXX directory read
    tokenizer_model: Optional[str]  # the tokenizer the run trained with (a .model, or a HF directory / .json), if on disk

    @property
    def latent_tokenizer(self) -> Optional[str]:
        """The σ-VAE tokenizer directory the run trained with (a model of text and image latents), or None."""
        return getattr(self.config, "latent_tokenizer", None)


def load_for_inference(load: str, iteration: Optional[int] = None, device: str | torch.device = "cpu",
                       dtype: Optional[torch.dtype] = None, tokenizer_model: Optional[str] = None) -> LoadedModel:
    """The model of checkpoint (`load`, `iteration`; default the newest complete one) in eval mode on
    `device`, in `dtype` (default: as saved, fp32), or of a packed directory (interop/packed.py: 2-bit
    weights, 8-bit activations; loaded as exported). Raises ConvertError naming the problem."""
    if is_packed_dir(load):  # a packed directory: 2-bit weights
        meta = read_packed_config(load)
        model = load_packed_model(load, device)
        bundled = os.path.join(load, meta["tokenizer"]) if meta.get("tokenizer") else None
        return LoadedModel(model, model_config(meta), load, tokenizer_model or bundled)
    path = resolve_checkpoint(load, iteration)
    train_state = ckpt.read_train_state(path)
    cfg = model_config(train_state)
    weights = read_state(path, keys=["model"])["model"]
    with torch.device("meta"):
        model = build_model(cfg)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ConvertError(f"checkpoint {path} lacks weights of its {cfg.model_family} model: {missing[:5]}")
    model.load_state_dict(weights, assign=True)  # (the models keep no state a checkpoint lacks)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer_model = tokenizer_model or train_state.get("tokenizer_model")
    if tokenizer_model is not None and not os.path.exists(tokenizer_model):
        tokenizer_model = None
    return LoadedModel(model, cfg, path, tokenizer_model)
