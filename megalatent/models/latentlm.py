"""LatentLM (arXiv 2412.08635): one causal Transformer over discrete tokens and continuous latent vectors.

    x_i = embed(token_i), or latent_in(z_i) where position i holds a latent
    h   = norm(trunk(x))
    discrete next token:    cross-entropy of head(h_i)
    continuous next token:  the diffusion head's DDPM loss on z_{i+1} conditioned on h_i
                            (--diffusion-batch-mul noise draws per latent; only the head reruns)

The trunk, its names and its tensor-parallel plan are the baseline decoder's; the latent projection and
the diffusion head are small and replicated on every TP rank (they see the same hidden states there, so
their gradients agree without communication); under pipeline parallelism they live on the first and the
last stage. Sampling (`sample_images`) decodes latents one by one with
classifier-free guidance against the null class, then the σ-VAE decodes them to pixels.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from megalatent.config import Config, ModelConfig
from megalatent.data import latent_data
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.diffusion_head import DiffusionHead, sample
from megalatent.training.objectives import LATENT_LM


class LatentLM(Decoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.latent_in = nn.Linear(cfg.latent_dim, cfg.hidden_size, bias=False)
        nn.init.normal_(self.latent_in.weight, std=cfg.init_method_std)
        self.diffusion_head = DiffusionHead(cfg.latent_dim, cfg.hidden_size, depth=cfg.diffusion_head_layers)

    FIRST_STAGE = Decoder.FIRST_STAGE + ("latent_in",)
    LAST_STAGE = Decoder.LAST_STAGE + ("diffusion_head",)

    def embed(self, tokens, latents, latent_mask) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        return torch.where(latent_mask.unsqueeze(-1), self.latent_in(latents).to(x.dtype), x)

    def hidden_states(self, tokens, position_ids, latents, latent_mask) -> torch.Tensor:
        return self.norm(self.trunk(self.embed(tokens, latents, latent_mask), position_ids))

    def diffusion_loss(self, hidden: torch.Tensor, target_latents: torch.Tensor, diffusion_mask: torch.Tensor):
        """The weighted diffusion loss summed over the positions whose next token is a latent. The head's loss
        is a mean over its targets' noise draws and channels; times the number of targets it is their sum,
        the trainer's convention (no target: the head's zero "dummy" loss, so every rank runs the head)."""
        where = diffusion_mask.flatten() > 0
        condition = hidden.flatten(0, 1)[where]
        targets = target_latents.flatten(0, 1)[where].to(condition.dtype)
        loss = self.diffusion_head.loss(condition, targets, self.cfg.diffusion_batch_mul) * condition.shape[0]
        return self.cfg.diffusion_loss_weight * loss

    def forward(self, tokens, position_ids, latents=None, latent_mask=None, target_latents=None, diffusion_mask=None):
        """-> (logits [b, s, V], the weighted diffusion loss summed over the latent targets).

        As a pipeline stage: the first takes (tokens, positions, latents, latent mask), later ones the
        hidden states; every stage but the last returns (hidden, positions); the last returns (logits,
        normed hidden states), from which the objective computes the diffusion loss with this stage's head."""
        x = self.embed(tokens, latents, latent_mask) if self.embed_tokens is not None else tokens
        x = self.trunk(x, position_ids)
        if self.output is None:
            return x, position_ids
        h = self.norm(x)
        if target_latents is None:
            return self.head(h), h
        return self.head(h), self.diffusion_loss(h, target_latents, diffusion_mask)

    @torch.no_grad()
    def sample_latents(self, classes: torch.Tensor, num_latents: int, steps: int = 20,
                       cfg_scale: float = 4.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-conditional latents [n, num_latents, latent_dim], one position at a time; with
        cfg_scale != 1 each step also runs the null-class sequence for the unconditional condition."""
        ids = latent_data.special_tokens(self.cfg.num_classes)
        n = classes.shape[0]
        rows = torch.cat([classes, torch.full_like(classes, ids["null"])]) if cfg_scale != 1 else classes
        prefix = torch.stack([rows, torch.full_like(rows, ids["boi"])], dim=1)
        latents = torch.zeros(rows.shape[0], 2 + num_latents, self.cfg.latent_dim, device=classes.device)
        for i in range(num_latents):
            s = 2 + i
            tokens = torch.cat([prefix, torch.full((rows.shape[0], i), ids["latent"], device=classes.device)], dim=1)
            positions = torch.arange(s, device=classes.device).expand(rows.shape[0], s)
            h = self.hidden_states(tokens, positions, latents[:, :s], tokens == ids["latent"])[:, -1]
            uncond = h[n:] if cfg_scale != 1 else None
            z = sample(self.diffusion_head, h[:n], steps=steps, cfg_scale=cfg_scale, uncond_condition=uncond,
                       generator=generator)
            latents[:n, s] = z
            if cfg_scale != 1:
                latents[n:, s] = z  # the unconditional row continues from the same (guided) tokens
        return latents[:n, 2:]


def flops_per_token(cfg: ModelConfig) -> float:
    """The trunk's (as the baseline decoder); the latent projection and the diffusion head are small next
    to it at the configured sizes and are not counted."""
    return dense_decoder_flops_per_token(cfg)


def validate(cfg: Config) -> list[str]:
    m, d, p = cfg.model, cfg.data, cfg.parallel
    e = []
    if d.latent_tokenizer is None:
        e.append("--model-family latentlm needs --latent-tokenizer DIR (train one: python tools/train_vae.py --save DIR)")
    elif not os.path.isfile(os.path.join(d.latent_tokenizer, "config.json")):
        e.append(f"--latent-tokenizer {d.latent_tokenizer} is not a σ-VAE tokenizer directory (no config.json); "
                 "train one with python tools/train_vae.py --save DIR")
    else:
        from megalatent.models.sigma_vae import read_tokenizer_config
        vae = read_tokenizer_config(d.latent_tokenizer)["config"]
        tokens = (vae["image_size"] // vae["patch_size"]) ** 2
        if m.latent_dim != vae["latent_dim"]:
            e.append(f"--latent-dim {m.latent_dim} differs from the tokenizer's latent_dim {vae['latent_dim']}")
        if m.seq_length != latent_data.sequence_length(tokens):
            e.append(f"--seq-length must be {latent_data.sequence_length(tokens)} for this tokenizer "
                     f"({tokens} latents per image + class, <boi>, <eoi>), got {m.seq_length}")
    if m.vocab_size is not None and m.vocab_size < latent_data.vocab_size(m.num_classes):
        e.append(f"--vocab-size {m.vocab_size} is too small for {m.num_classes} classes and 4 special tokens")
    if p.context_parallel_size > 1:
        e.append("LatentLM does not support --context-parallel-size > 1 yet; use tensor, pipeline and data parallelism")
    if p.sequence_parallel:
        e.append("LatentLM does not support --sequence-parallel yet (the latent projection takes whole sequences)")
    if m.diffusion_batch_mul < 1 or m.diffusion_head_layers < 1:
        e.append("--diffusion-batch-mul and --diffusion-head-layers must be >= 1")
    if not 0 <= d.class_dropout < 1:
        e.append(f"--class-dropout must be in [0, 1), got {d.class_dropout}")
    return e


register(ModelFamily(name="latentlm", build=LatentLM, flops_per_token=flops_per_token, validate=validate,
                     objective=LATENT_LM, build_data=latent_data.build_latent_loaders,
                     vocab_size=lambda m: latent_data.vocab_size(m.num_classes)))
