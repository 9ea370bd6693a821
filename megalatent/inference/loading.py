"""Load a trained model for inference from a checkpoint directory the trainer wrote (`--save DIR`).

The one place a checkpoint becomes a model to decode with: `load_for_inference` reads the weights
(any training layout: DCP reassembles full tensors without a process group), rebuilds the model its
train state records, and finds the tokenizer recorded there. A family whose inference model differs
from its training model (e.g. BitNet's packed ternary weights) converts it here, after loading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megalatent.config import ModelConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.convert import ConvertError, model_config, read_state, resolve_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    checkpoint: str  # the iter_XXXXXXX directory read
    tokenizer_model: Optional[str]  # the sentencepiece model the run trained with, if still on disk
    latent_tokenizer: Optional[str] = None  # LatentLM: the σ-VAE tokenizer directory the run trained with


def load_for_inference(load: str, iteration: Optional[int] = None, device: str | torch.device = "cpu",
                       dtype: Optional[torch.dtype] = None, tokenizer_model: Optional[str] = None) -> LoadedModel:
    """The model of checkpoint (`load`, `iteration`; default the newest complete one) in eval mode on
    `device`, in `dtype` (default: as saved, fp32), or of a packed BitNet directory (tools/export_bitnet.py:
    2-bit weights, 8-bit activations; loaded as exported). Raises ConvertError naming the problem."""
    import megalatent.models  # noqa: F401  (registers the families)
    from megalatent.models.registry import MODEL_FAMILIES, build_model

    from megalatent.models.bitnet_packed import is_packed_dir, load_packed_model, read_packed_config

    if is_packed_dir(load):  # a tools/export_bitnet.py directory: 2-bit weights
        meta = read_packed_config(load)
        model = load_packed_model(load, device)
        bundled = os.path.join(load, meta["tokenizer"]) if meta.get("tokenizer") else None
        return LoadedModel(model, model_config(meta), load, tokenizer_model or bundled)
    path = resolve_checkpoint(load, iteration)
    train_state = ckpt.read_train_state(path)
    cfg = model_config(train_state)
    if cfg.model_family not in MODEL_FAMILIES:
        raise ConvertError(f"checkpoint {path} holds a {cfg.model_family!r} model, unknown here "
                           f"(known: {sorted(MODEL_FAMILIES)})")
    weights = read_state(path, keys=["model"])["model"]
    with torch.device("meta"):
        model = build_model(cfg)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ConvertError(f"checkpoint {path} lacks weights of its {cfg.model_family} model: {missing[:5]}")
    model.load_state_dict(weights, assign=True)
    # Buffers that are not checkpointed (RoPE frequencies) are recomputed off the meta device.
    if getattr(model, "rotary", None) is not None:
        model.rotary = type(model.rotary)(cfg.head_dim, cfg.rotary_base)
    head = getattr(model, "diffusion_head", None)
    if head is not None:  # LatentLM: the noise schedule's tables
        head.schedule = type(head.schedule)(head.schedule.num_steps)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer_model = tokenizer_model or train_state.get("tokenizer_model")
    if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
        tokenizer_model = None
    return LoadedModel(model, cfg, path, tokenizer_model, train_state.get("latent_tokenizer"))
