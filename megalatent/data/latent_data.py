"""Class-conditional image sequences for LatentLM: each image becomes

    position:  0        1      2 .. T       T+1     T+2
    input:     class    <boi>  z_1..z_{T-1} z_T     <eoi>
    predicts:  <boi>    z_1    z_2..z_T     <eoi>   -
               (CE)     (diffusion ...................) (CE)

with z the image's σ-VAE latents (normalised, raster order) entered through the model's latent
projection, discrete tokens through the embedding. A fixed `class_dropout` share of the images carry
the null class instead of theirs (chosen per image from the seed), which trains the unconditional
model classifier-free guidance needs. Token ids: classes 0..C-1, then null, <boi>, <eoi> and the id a
latent position carries in `tokens` (never embedded: the latent replaces it).
"""
from __future__ import annotations

import numpy as np
import torch

from megalatent.config import Config
from megalatent.nn.diffusion_head import NUM_TRAIN_STEPS


def special_tokens(num_classes: int) -> dict[str, int]:
    return {"null": num_classes, "boi": num_classes + 1, "eoi": num_classes + 2, "latent": num_classes + 3}


def vocab_size(num_classes: int) -> int:
    return num_classes + 4


def sequence_length(num_latents: int) -> int:
    return num_latents + 3


def class_prompts(classes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What class-conditional sampling continues: (class, <boi>) per row [n, 2], and (null, <boi>) [1, 2],
    the unconditional prompt of classifier-free guidance."""
    ids = special_tokens(num_classes)
    prompt = torch.stack([classes, torch.full_like(classes, ids["boi"])], dim=1)
    return prompt, torch.tensor([[ids["null"], ids["boi"]]], device=classes.device)


class ClassConditionalLatents:
    """Samples (dicts of tensors, the LATENT_LM objective's keys) from images' latents and labels."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, class_dropout: float,
                 seed: int):
        self.latents, self.labels = latents, labels  # [N, T, k], [N]
        self.ids = special_tokens(num_classes)
        drop = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < class_dropout
        self.classes = torch.where(drop, torch.full_like(labels, self.ids["null"]), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        z = self.latents[index]
        t, k = z.shape
        s = sequence_length(t)
        tokens = torch.full((s,), self.ids["latent"], dtype=torch.int64)
        tokens[0], tokens[1], tokens[t + 2] = self.classes[index], self.ids["boi"], self.ids["eoi"]
        latents = torch.zeros(s, k)
        latents[2:t + 2] = z
        target_latents = torch.zeros(s, k)
        target_latents[1:t + 1] = z
        labels = torch.zeros(s, dtype=torch.int64)
        labels[0], labels[t + 1] = self.ids["boi"], self.ids["eoi"]
        loss_mask = torch.zeros(s)
        loss_mask[0] = loss_mask[t + 1] = 1.0
        diffusion_mask = torch.zeros(s)
        diffusion_mask[1:t + 1] = 1.0
        return {"tokens": tokens, "position_ids": torch.arange(s), "latents": latents,
                "latent_mask": tokens == self.ids["latent"], "labels": labels, "loss_mask": loss_mask,
                "target_latents": target_latents, "diffusion_mask": diffusion_mask}


@torch.no_grad()
def tokenize_digits(tokenizer_dir: str, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits of `split` through the σ-VAE: (normalised latents [N, T, k], labels [N]); the
    tokenizer's noise is drawn once from `seed` (sampled latents, as LatentLM trains on)."""
    from megalatent.data.images import DigitsDataset
    from megalatent.models.sigma_vae import load_tokenizer

    vae = load_tokenizer(tokenizer_dir).eval()
    data = DigitsDataset(split, image_size=vae.cfg.image_size)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([vae.tokenize(data.images[i:i + 256], sample=True, generator=generator)
                         for i in range(0, len(data.images), 256)])
    return latents, data.labels


class DiffusionDraws:
    """The diffusion loss's random draws as part of the data: for every position of a sample, `batch_mul`
    timesteps t ~ U{0..T-1} ("diffusion_t" [s, batch_mul]) and noises ε ~ N(0, I) ("diffusion_noise"
    [s, batch_mul, latent_dim]), from a generator keyed by (seed, stream, the sample's index in the run).

    Drawn with the data rather than inside the model, a sample's draws do not depend on the layout: on which
    data-parallel rank reads it, how context or sequence parallelism splits its positions, which pipeline
    stage holds the head. So a parallel run draws exactly what one process draws, which the equivalence tests
    rely on; and no two samples of a run share draws (the index counts on past the dataset's end). Positions
    whose next token is not a latent carry draws too (fixed shapes); the model reads the others only.
    The generator is numpy's PCG64 seeded through a SeedSequence of the whole key (torch's CPU generator keeps
    only 32 bits of its seed, which would make distinct keys collide)."""

    def __init__(self, seed: int, batch_mul: int, latent_dim: int, stream: int = 0,
                 num_steps: int = NUM_TRAIN_STEPS):
        if not 0 <= stream <= 1:
            raise ValueError(f"stream={stream}: 0 (training) or 1 (validation)")
        self.seed, self.stream = seed, stream
        self.batch_mul, self.latent_dim, self.num_steps = batch_mul, latent_dim, num_steps

    def __call__(self, sample: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, index])
        s = sample["tokens"].shape[0]
        t = rng.integers(0, self.num_steps, (s, self.batch_mul))
        noise = rng.standard_normal((s, self.batch_mul, self.latent_dim), dtype=np.float32)
        return {**sample, "diffusion_t": torch.from_numpy(t), "diffusion_noise": torch.from_numpy(noise)}


def latent_loader(dataset, cfg: Config, layout, keys: dict[str, torch.dtype], stream: int = 0):
    """A data-parallel rank's micro-batches of samples `keys` (the objective's batch keys), with their diffusion
    draws (stream 0 for training, 1 for validation, so the two never share draws)."""
    from megalatent.data.gpt_data import MicroBatchLoader

    t, m = cfg.training, cfg.model
    return MicroBatchLoader(dataset, t.micro_batch_size, t.global_batch_size, layout.dp_rank, layout.dp,
                            keys=keys, transform=DiffusionDraws(t.seed, m.diffusion_batch_mul, m.latent_dim, stream))


def build_latent_loaders(cfg: Config, layout, keys: dict[str, torch.dtype]):
    """Interleaved text+image documents when --data-path is given (megalatent.data.interleaved), else the
    embedded digits as class-conditional sequences through the --latent-tokenizer."""
    t, d, m = cfg.training, cfg.data, cfg.model
    if d.data_path is not None:
        from megalatent.data.gpt_data import index_cache_dir, parse_data_path, samples_per_split
        from megalatent.data.interleaved import build_interleaved_datasets
        from megalatent.data.tokenizer import load_tokenizer

        prefixes, weights = parse_data_path(d.data_path)
        num_samples = samples_per_split(cfg)
        train, valid = build_interleaved_datasets(prefixes, weights, d.split, cfg.model.seq_length, t.seed,
                                                  load_tokenizer(d.tokenizer_model, d.tokenizer_type), num_samples,
                                                  index_cache_dir(cfg), m.latent_tokenizer)
        return (latent_loader(train, cfg, layout, keys, 0),
                latent_loader(valid, cfg, layout, keys, 1) if valid is not None and num_samples[1] else None)

    def loader(split: str, stream: int):
        latents, labels = tokenize_digits(m.latent_tokenizer, split, t.seed)
        dataset = ClassConditionalLatents(latents, labels, m.num_classes, m.class_dropout, t.seed)
        return latent_loader(dataset, cfg, layout, keys, stream)

    return loader("train", 0), (loader("valid", 1) if t.eval_interval else None)
