"""LatentLM (arXiv 2412.08635): one causal Transformer over discrete tokens and continuous latent vectors.

    x_i = embed(token_i), or latent_in(z_i) where position i holds a latent
    h   = norm(trunk(x))
    discrete next token:    cross-entropy of head(h_i)
    continuous next token:  the diffusion head's DDPM loss on z_{i+1} conditioned on h_i
                            (--diffusion-batch-mul noise draws per latent; only the head reruns)

The trunk, its names and its tensor-parallel plan are the baseline decoder's; the latent projection and
the diffusion head are small and replicated on every TP rank (they see the same hidden states there, so
their gradients agree without communication); under pipeline parallelism they live on the first and the
last stage; under context parallelism each rank's head takes its own positions. The diffusion loss's
noise comes with the data (`latent_data.DiffusionDraws`), so every layout trains on the same draws.
Sampling (`sample_latents`) continues a prompt latent by latent against an inference cache, with
classifier-free guidance against an unconditional prompt; the σ-VAE then decodes the latents to pixels.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import PrepareModuleOutput, RowwiseParallel

from megalatent.config import Config, ModelConfig
from megalatent.data import interleaved, latent_data
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token
from megalatent.models.registry import ModelFamily, register
from megalatent.nn.diffusion_head import DiffusionHead, sample
from megalatent.training.objectives import LATENT_LM


class LatentInput(nn.Linear):
    """The latent projection, as the module that puts projected latents in place of the token embeddings at
    latent positions: one module, so that a tensor-parallel plan can place the combined embeddings (under
    sequence parallelism it scatters them over the sequence; see `LatentLM.tensor_parallel_plan`)."""

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
        nn.init.normal_(self.latent_in.weight, std=cfg.init_method_std)
        self.diffusion_head = DiffusionHead(cfg.latent_dim, cfg.hidden_size, depth=cfg.diffusion_head_layers)

    FIRST_STAGE = Decoder.FIRST_STAGE + ("latent_in",)
    LAST_STAGE = Decoder.LAST_STAGE + ("diffusion_head",)

    def tensor_parallel_plan(self, stream, sequence_parallel: bool) -> dict:
        """The latent projection and the diffusion head stay whole on every TP rank. Under sequence
        parallelism the token embeddings are all-reduced whole (not reduce-scattered), the latents put in
        place, and only then the sequence scattered; the head gets the gathered hidden states (`forward`)."""
        if not sequence_parallel or self.embed_tokens is None:
            return {}
        return {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                "latent_in": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=stream,
                                                 use_local_output=True)}

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
        x = self.embed(tokens, latents, latent_mask) if self.embed_tokens is not None else tokens
        x = self.trunk(x, position_ids)
        if self.output is None:
            return x, position_ids
        h = self.norm(x)
        hidden = h
        if isinstance(h, DTensor):  # sequence parallel: gathered once, for the output layer and the diffusion head
            h = h.redistribute(placements=[Replicate()])
            hidden = h.to_local()
        if target_latents is None:
            return self.head(h), hidden
        return self.head(h), self.diffusion_loss(hidden, target_latents, diffusion_mask, diffusion_t, diffusion_noise)

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


def validate(cfg: Config) -> list[str]:
    m, d = cfg.model, cfg.data
    e = []
    if m.diffusion_batch_mul < 1 or m.diffusion_head_layers < 1:
        e.append("--diffusion-batch-mul and --diffusion-head-layers must be >= 1")
    if d.latent_tokenizer is None:
        return e + ["--model-family latentlm needs --latent-tokenizer DIR (train one: python tools/train_vae.py "
                    "--save DIR)"]
    if not os.path.isfile(os.path.join(d.latent_tokenizer, "config.json")):
        return e + [f"--latent-tokenizer {d.latent_tokenizer} is not a σ-VAE tokenizer directory (no config.json); "
                    "train one with python tools/train_vae.py --save DIR"]
    from megalatent.models.sigma_vae import read_tokenizer_config
    vae = read_tokenizer_config(d.latent_tokenizer)["config"]
    if m.latent_dim != vae["latent_dim"]:
        e.append(f"--latent-dim {m.latent_dim} differs from the tokenizer's latent_dim {vae['latent_dim']}")
    if d.data_path is not None:
        return e + _document_errors(cfg)
    tokens = (vae["image_size"] // vae["patch_size"]) ** 2
    if m.seq_length != latent_data.sequence_length(tokens):
        e.append(f"--seq-length must be {latent_data.sequence_length(tokens)} for this tokenizer "
                 f"({tokens} latents per image + class, <boi>, <eoi>), got {m.seq_length}")
    if m.vocab_size is not None and m.vocab_size < latent_data.vocab_size(m.num_classes):
        e.append(f"--vocab-size {m.vocab_size} is too small for {m.num_classes} classes and 4 special tokens")
    if not 0 <= d.class_dropout < 1:
        e.append(f"--class-dropout must be in [0, 1), got {d.class_dropout}")
    return e


def _document_errors(cfg: Config) -> list[str]:
    """--data-path: interleaved text+image documents (tools/preprocess_interleaved.py), whose latent stores
    must have been made with this run's tokenizers."""
    from megalatent.data.gpt_data import parse_data_path
    from megalatent.data.interleaved import open_latent_stores
    from megalatent.data.tokenizer import Tokenizer

    d = cfg.data
    if d.tokenizer_model is None:
        return ["--data-path needs --tokenizer-model (the text tokenizer the documents were made with; "
                "tools/preprocess_interleaved.py prints the training flags)"]
    if not os.path.isfile(d.tokenizer_model):
        return []  # config.validate reports the missing file
    try:
        prefixes, _ = parse_data_path(d.data_path)
        open_latent_stores(prefixes, d.latent_tokenizer, Tokenizer.load(d.tokenizer_model))
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab_size(cfg):
        return [f"--vocab-size {cfg.model.vocab_size} is too small for the text tokenizer's ids and <boi>, <eoi> "
                f"and the latent placeholder ({vocab_size(cfg)}); leave it out"]
    return []


def vocab_size(cfg: Config) -> int:
    """Class-conditional: the classes, the null class and 3 special ids; on documents: the text tokenizer's
    ids and 3 special ids."""
    if cfg.data.data_path is None:
        return latent_data.vocab_size(cfg.model.num_classes)
    from megalatent.data.tokenizer import Tokenizer
    return interleaved.vocab_size(Tokenizer.load(cfg.data.tokenizer_model).vocab_size)


register(ModelFamily(name="latentlm", build=LatentLM, flops_per_token=flops_per_token, validate=validate,
                     objective=LATENT_LM, build_data=latent_data.build_latent_loaders, vocab_size=vocab_size))
