"""Images from a LatentLM checkpoint: the prompts that condition them, and sampling plus σ-VAE decoding.

A class-conditional run continues (class, <boi>) and guides against (null, <boi>); a run on interleaved
documents continues the text after the end-of-document token (as a document starts in the training windows)
and <boi>, and guides against <eod> <boi>, an image without text.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalatent.data import interleaved
from megalatent.data.latent_data import class_prompts

# `loaded` below is a megalatent.inference.loading.LoadedModel of a LatentLM checkpoint.


def trained_on_text(loaded) -> bool:
    """Whether a LatentLM checkpoint was trained on documents (it records a text tokenizer) or on classes."""
    return loaded.tokenizer_model is not None


def image_prompts(loaded, device, classes: Optional[list[int]] = None, text: Optional[str] = None,
                  num_images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts [n, P], the unconditional prompt [1, P']) for `classes` (one image each) of a class-conditional
    run, or `num_images` images of `text` for a run on documents. ValueError for the wrong kind of condition."""
    if not trained_on_text(loaded):
        num_classes = loaded.config.num_classes
        if not classes or any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"this LatentLM was trained class-conditionally: give classes in [0, {num_classes}) "
                             "(if it was trained on text, its tokenizer is not on disk: pass --tokenizer-model)")
        return class_prompts(torch.tensor(classes, device=device), num_classes)
    if classes:
        raise ValueError("this LatentLM was trained on text+image documents: describe the image with a text prompt")
    from megalatent.data.tokenizer import Tokenizer
    tok = Tokenizer.load(loaded.tokenizer_model)
    boi = interleaved.special_tokens(tok.vocab_size)["boi"]
    prompt = torch.tensor([[tok.eod] + tok.encode(text or "") + [boi]], device=device)
    return prompt.expand(num_images, -1), torch.tensor([[tok.eod, boi]], device=device)


@torch.no_grad()
def sample_images(loaded, vae, prompt: torch.Tensor, uncond: torch.Tensor, steps: int = 20,
                  cfg_scale: float = 4.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images [n, C, H, W] in [-1, 1]: the prompts' latents, one by one, decoded by the σ-VAE `vae`."""
    latents = loaded.model.sample_latents(prompt, vae.cfg.num_tokens, steps, cfg_scale, uncond, generator)
    return vae.detokenize(latents).clamp(-1, 1)
