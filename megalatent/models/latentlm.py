"""LatentLM (arXiv 2412.08635): one causal Transformer over discrete tokens and continuous latent vectors.

    x_i = embed(token_i), or latent_in(z_i) where position i holds a latent
    h   = norm(trunk(x))
    discrete next token:    cross-entropy of head(h_i)
    continuous next token:  the diffusion head's DDPM loss on z_{i+1} conditioned on h_i
                            (--diffusion-batch-mul noise draws per latent; only the head reruns)

The trunk and its names are the baseline decoder's. The model is single-device PyTorch; its parallel plan
(families/latentlm.py) keeps the latent projection and the diffusion head whole on every tensor-parallel
rank and puts them on the first and the last pipeline stage. The diffusion loss's noise comes with the
data (`data/latent_data.DiffusionDraws`), so every layout trains on the same draws.
Sampling (`sample_latents`) continues a prompt latent by latent against an inference cache, with
classifier-free guidance against an unconditional prompt; the σ-VAE then decodes the latents to pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.config import ModelConfig, flag
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token
from megalatent.nn.diffusion_head import DiffusionHead, sample
from megalatent.nn.init import Init


@dataclass
class LatentLMConfig(ModelConfig):
    latent_dim: int = flag(8, "width of a continuous (latent) token; must equal the σ-VAE tokenizer's")
    diffusion_head_layers: int = flag(3, "adaLN blocks of the diffusion head")
    diffusion_batch_mul: int = flag(4, "noise draws per latent per step (only the head reruns)")
    diffusion_loss_weight: float = flag(1.0, "weight of the diffusion loss against the cross-entropy")
    num_classes: int = flag(1000, "classes: of the class-conditional images, or of an image classifier")
    latent_tokenizer: Optional[str] = flag(None, "σ-VAE tokenizer directory (tools/train_vae.py --save)",
                                           architectural=False)
    class_dropout: float = flag(0.1, "fraction of images whose class is replaced by the null class "
                                     "(classifier-free guidance)", architectural=False)


class LatentInput(nn.Linear):
    """The latent projection, as the module that puts projected latents in place of the token embeddings at
    latent positions: one module, so that a tensor-parallel plan can place the combined embeddings (under
    sequence parallelism it scatters them over the sequence; see families/latentlm.py)."""

    def __init__(self, latent_dim: int, hidden_size: int):
        super().__init__(latent_dim, hidden_size, bias=False)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        return F.linear(latents, self.weight)

    def forward(self, embedded: torch.Tensor, latents: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(latent_mask.unsqueeze(-1), self.project(latents).to(embedded.dtype), embedded)


class LatentLM(Decoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.latent_in = LatentInput(cfg.latent_dim, cfg.hidden_size)
        self.diffusion_head = DiffusionHead(cfg.latent_dim, cfg.hidden_size, depth=cfg.diffusion_head_layers)

    def initial_value(self, name: str, shape: tuple[int, ...]) -> Init:
        """The trunk's rules, the latent projection's Normal(0, std) among them; the diffusion head's own."""
        head = "diffusion_head."
        if name.startswith(head):
            return self.diffusion_head.initial_value(name[len(head):], shape)
        return super().initial_value(name, shape)

    def embed(self, tokens, latents, latent_mask) -> torch.Tensor:
        return self.latent_in(self.embed_tokens(tokens), latents, latent_mask)

    def diffusion_loss(self, hidden: torch.Tensor, target_latents: torch.Tensor, diffusion_mask: torch.Tensor,
                       diffusion_t: torch.Tensor | None = None, diffusion_noise: torch.Tensor | None = None):
        """The weighted diffusion loss summed over the positions whose next token is a latent, with the draws
        the data carries (t [b, s, mul], noise [b, s, mul, k]; None: the head draws them). The head's loss is
        a mean over its targets' noise draws and channels; times the number of targets it is their sum, the
        trainer's convention (no target: the head's zero "dummy" loss, so every rank runs the head)."""
        where = diffusion_mask.flatten() > 0
        condition = hidden.flatten(0, 1)[where]
        targets = target_latents.flatten(0, 1)[where].to(condition.dtype)
        t = None if diffusion_t is None else diffusion_t.flatten(0, 1)[where].flatten()
        noise = None if diffusion_noise is None else diffusion_noise.flatten(0, 1)[where].flatten(0, 1)
        loss = self.diffusion_head.loss(condition, targets, self.cfg.diffusion_batch_mul, t=t, noise=noise)
        return self.cfg.diffusion_loss_weight * loss * condition.shape[0]

    def forward(self, tokens, position_ids, latents=None, latent_mask=None, target_latents=None, diffusion_mask=None,
                diffusion_t=None, diffusion_noise=None):
        """-> (logits [b, s, V], the weighted diffusion loss summed over the latent targets).

        As a pipeline stage: the first takes (tokens, positions, latents, latent mask), later ones the
        hidden states; every stage but the last returns (hidden, positions); the last returns (logits,
        normed hidden states), from which the objective computes the diffusion loss with this stage's head."""
        x = self.embed(tokens, latents, latent_mask) if not tokens.is_floating_point() else tokens
        x = self.trunk(x, position_ids)
        if self.output is None:
            return x, position_ids
        h = self.norm(x)
        if target_latents is None:
            return self.head(h), h
        return self.head(h), self.diffusion_loss(h, target_latents, diffusion_mask, diffusion_t, diffusion_noise)

    def _continue(self, cache, tokens: torch.Tensor | None = None, latent: torch.Tensor | None = None):
        """Continue the cached sequences with tokens [n, L] or one latent [n, k] per row; returns the last
        position's normed hidden state [n, hidden]."""
        x = self.embed_tokens(tokens) if latent is None else self.latent_in.project(latent).unsqueeze(1)
        n, length = x.shape[:2]
        positions = torch.arange(cache.length, cache.length + length, device=x.device).expand(n, length)
        h = self.norm(self.trunk(x, positions, cache)[:, -1])
        cache.length += length
        return h

    @torch.no_grad()
    def sample_latents(self, prompt: torch.Tensor, num_latents: int, steps: int = 20, cfg_scale: float = 4.0,
                       uncond_prompt: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [n, num_latents, latent_dim] that continue `prompt` [n, P] (token ids ending in <boi>), one
        position at a time against an inference cache (each new latent costs one position of the Transformer).
        With cfg_scale != 1 a second cache continues `uncond_prompt` [n or 1, P'] (the null class, or no text)
        with the same latents: its hidden state is the guidance's unconditional condition."""
        n = prompt.shape[0]
        if cfg_scale != 1 and uncond_prompt is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs uncond_prompt (the null class, or an empty text)")
        prompts = [prompt] + ([uncond_prompt.expand(n, -1)] if cfg_scale != 1 else [])
        caches = [self.new_cache() for _ in prompts]
        hidden = [self._continue(cache, tokens=p) for cache, p in zip(caches, prompts)]
        latents = []
        for i in range(num_latents):
            z = sample(self.diffusion_head, hidden[0], steps=steps, cfg_scale=cfg_scale,
                       uncond_condition=hidden[1] if cfg_scale != 1 else None, generator=generator)
            latents.append(z)
            if i < num_latents - 1:
                hidden = [self._continue(cache, latent=z) for cache in caches]
        return torch.stack(latents, dim=1)


def flops_per_token(cfg: ModelConfig) -> float:
    """The trunk's (as the baseline decoder); the latent projection and the diffusion head are small next
    to it at the configured sizes and are not counted."""
    return dense_decoder_flops_per_token(cfg)
