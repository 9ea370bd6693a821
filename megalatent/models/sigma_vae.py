"""σ-VAE: the image tokenizer of LatentLM (arXiv 2412.08635, §2 and Fig. 3).

A ViT-style patch autoencoder whose encoder predicts only the *mean* μ of each latent token. The
variance is not learned: in training, each example b gets one noise scale σ_b and

    z = μ + σ_b · ε,    ε ~ N(0, I),    σ_b = |n_b| · noise_std / 0.8,    n_b ~ N(0, 1).

This is exactly the reference tokenizer's draw (unilm LatentLM/tokenizer_models/modeling_sigma_vae.py,
`std` = our `noise_std`, default 0.75) except that we take |n_b|: the reference multiplies by a signed
n_b, which gives the same distribution of z because ε is symmetric and independent of n_b, and a
non-negative scale reads better. The 0.8 makes E[σ_b] = noise_std · sqrt(2/π) / 0.8 ≈ 0.997 · noise_std,
i.e. `noise_std` is (almost) the mean noise scale. Why a random σ: a fixed variance floor keeps the
latent space from collapsing to the small-variance regime a KL-VAE drifts into, and a per-example scale
trains the decoder to tolerate the errors an autoregressive model will make (the paper's exposure-bias
argument; Fig. 6 prefers larger-variance tokenizers).

Loss = MSE(decode(z), image) + reg_weight · mean(μ²): with a fixed variance the KL term reduces to the
mean-square of μ (reference: `kl_weight` 1e-2). It stops μ from growing until the noise is negligible.

The tokens of one image are in raster order (row by row), [batch, num_tokens, latent_dim]: the order
in which LatentLM generates them. For the language model, latents are normalised per channel,
(z - mean) / std, with statistics estimated from data after training (`estimate_latent_stats`) and
stored with the tokenizer (reference: one scalar scale 1/std and bias -mean from the first batch of
sampled latents; per-channel statistics over the whole data set are the same idea with less variance).

A tokenizer directory (`save_tokenizer` / `load_tokenizer`) holds config.json (architecture + what
the caller adds, e.g. the training run), latent_stats.json (the normalisation statistics, readable)
and model.pt (the weights), and appears only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from megalatent.formats import read_format_json

TOKENIZER_FORMAT = "megalatent-sigma-vae"
TOKENIZER_FORMAT_VERSION = 1
CONFIG_FILE, STATS_FILE, WEIGHTS_FILE = "config.json", "latent_stats.json", "model.pt"

# The reference divides its `std` by 0.8 ≈ sqrt(2/π) so that `std` is about the mean of |σ|.
_SIGMA_DIVISOR = 0.8


@dataclass
class SigmaVAEConfig:
    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 4
    latent_dim: int = 8
    hidden_size: int = 64
    num_layers: int = 2  # Transformer layers in the encoder, and again in the decoder
    num_attention_heads: int = 4
    noise_std: float = 0.75  # σ_b = |N(0, 1)| · noise_std / 0.8 (see the module docstring)
    reg_weight: float = 1e-2  # weight of mean(μ²)

    def problems(self) -> list[str]:
        """Every rule this config breaks, as messages naming the field (empty when valid)."""
        errors = []
        for name in ("image_size", "in_channels", "patch_size", "latent_dim", "hidden_size",
                     "num_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            errors.append(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            errors.append(f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.noise_std < 0:
            errors.append(f"noise_std={self.noise_std} must be >= 0")
        if self.reg_weight < 0:
            errors.append(f"reg_weight={self.reg_weight} must be >= 0")
        return errors

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)·(W/p), C·p·p], patches in raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch_size) * (w // patch_size), -1)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid_size: int) -> torch.Tensor:
    """The inverse of `patchify` for a square grid."""
    b = patches.shape[0]
    x = patches.reshape(b, grid_size, grid_size, channels, patch_size, patch_size)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, grid_size * patch_size, grid_size * patch_size)


class _TokenTransformer(nn.Module):
    """Linear in -> learned positions -> bidirectional pre-norm Transformer -> LayerNorm.

    The encoder and the decoder are each one of these; they differ only in their input and output
    projections. Attention is bidirectional (an image tokenizer sees the whole image).
    """

    def __init__(self, in_dim: int, cfg: SigmaVAEConfig):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, cfg.hidden_size)
        self.positions = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden_size))
        nn.init.trunc_normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.num_attention_heads, 4 * cfg.hidden_size, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.proj_in(tokens) + self.positions))


@dataclass
class SigmaVAELoss:
    loss: torch.Tensor  # recon_mse + reg_weight · reg: what to backpropagate
    recon_mse: torch.Tensor  # MSE of the reconstruction from the noised latents z
    reg: torch.Tensor  # mean(μ²)


class SigmaVAE(nn.Module):
    def __init__(self, cfg: SigmaVAEConfig):
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid σ-VAE config: " + "; ".join(problems))
        super().__init__()
        self.cfg = cfg
        self.encoder = _TokenTransformer(cfg.patch_dim, cfg)
        self.to_latent = nn.Linear(cfg.hidden_size, cfg.latent_dim)
        self.decoder = _TokenTransformer(cfg.latent_dim, cfg)
        # The reference's pixel head: one hidden layer with tanh, then pixels of the patch.
        self.to_pixels = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, cfg.patch_dim)
        )
        # Data statistics, not learned weights: saved in latent_stats.json, so they are not persistent
        # buffers (a tokenizer's statistics can be re-estimated on other data without touching its weights).
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_dim), persistent=False)
        self.register_buffer("latent_std", torch.ones(cfg.latent_dim), persistent=False)
        self.latent_stats_count = 0  # latents the statistics were estimated from; 0 = not estimated

    # --- the autoencoder ---------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """μ: [B, C, S, S] -> [B, num_tokens, latent_dim]."""
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"σ-VAE expects images [batch, {', '.join(map(str, expected))}], "
                             f"got {list(images.shape)}")
        return self.to_latent(self.encoder(patchify(images, cfg.patch_size)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, latent_dim] -> images [B, C, S, S] (unnormalised latents)."""
        cfg = self.cfg
        patches = self.to_pixels(self.decoder(latents))
        return unpatchify(patches, cfg.patch_size, cfg.in_channels, cfg.grid_size)

    def sample_sigma(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None
                     ) -> torch.Tensor:
        """One noise scale per example: |N(0, 1)| · noise_std / 0.8, shape [batch_size]."""
        n = torch.randn(batch_size, device=device, generator=generator)
        return n.abs() * (self.cfg.noise_std / _SIGMA_DIVISOR)

    def add_noise(self, mu: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = μ + σ_b · ε with one σ_b per example (dimension 0) and ε ~ N(0, I)."""
        sigma = self.sample_sigma(mu.shape[0], mu.device, generator).to(mu.dtype)
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + sigma.view(-1, *([1] * (mu.dim() - 1))) * eps

    def loss(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> SigmaVAELoss:
        mu = self.encode(images)
        recon = self.decode(self.add_noise(mu, generator))
        recon_mse = F.mse_loss(recon.float(), images.float())
        reg = mu.float().pow(2).mean()
        return SigmaVAELoss(recon_mse + self.cfg.reg_weight * reg, recon_mse, reg)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """decode(μ): the deterministic reconstruction, for evaluation."""
        return self.decode(self.encode(images))

    # --- latent normalisation for the language model -----------------------------------------------

    @torch.no_grad()
    def estimate_latent_stats(self, image_batches: Iterable[torch.Tensor], sample: bool = True,
                              generator: Optional[torch.Generator] = None) -> None:
        """Set the per-channel mean and std of the latents over ``image_batches``.

        With ``sample`` (default) the statistics are those of z = μ + σε, the latents the language
        model is trained on (as in the reference); without it, of μ alone.
        """
        total = torch.zeros(self.cfg.latent_dim, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for images in image_batches:
            mu = self.encode(images)
            z = self.add_noise(mu, generator) if sample else mu
            z = z.reshape(-1, self.cfg.latent_dim).double().cpu()
            total += z.sum(0)
            total_sq += z.pow(2).sum(0)
            count += z.shape[0]
        if count < 2:
            raise ValueError("estimate_latent_stats needs at least two latents; the image batches were empty")
        mean = total / count
        var = (total_sq / count - mean.pow(2)).clamp_min(0) * count / (count - 1)
        self.set_latent_stats(mean, var.sqrt(), count)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor, count: int) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.cfg.latent_dim,) or std.shape != (self.cfg.latent_dim,):
            raise ValueError(f"latent statistics must have shape [{self.cfg.latent_dim}] (latent_dim), "
                             f"got mean {list(mean.shape)} and std {list(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"latent std must be > 0 in every channel, got {std.tolist()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.latent_stats_count = int(count)

    def _check_stats(self) -> None:
        if self.latent_stats_count == 0:
            raise RuntimeError("this σ-VAE has no latent statistics: call estimate_latent_stats() on training "
                               "images (tools/train_vae.py does) before normalising latents")

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_stats()
        return (latents - self.latent_mean.to(latents.dtype)) / self.latent_std.to(latents.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_stats()
        return latents * self.latent_std.to(latents.dtype) + self.latent_mean.to(latents.dtype)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, sample: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images -> normalised latents [B, num_tokens, latent_dim], the language model's continuous tokens."""
        mu = self.encode(images)
        return self.normalize(self.add_noise(mu, generator) if sample else mu)

    @torch.no_grad()
    def detokenize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (e.g. sampled by the language model) -> images."""
        return self.decode(self.denormalize(latents))


# --- the tokenizer directory ---------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_tokenizer(model: SigmaVAE, directory: str, metadata: Optional[dict] = None) -> None:
    """Write the tokenizer to ``directory`` (replacing one that is there).

    Everything is written into ``directory.partial-<pid>`` first and renamed into place, so a reader
    (or a later load after a crash) sees either the old complete tokenizer or the new complete one.
    ``metadata`` (JSON-serialisable, e.g. the training flags and final errors) goes into config.json.
    """
    model._check_stats()
    directory = os.path.abspath(directory)
    partial = f"{directory}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    _write_json(os.path.join(partial, CONFIG_FILE), {
        "format": TOKENIZER_FORMAT,
        "format_version": TOKENIZER_FORMAT_VERSION,
        "config": dataclasses.asdict(model.cfg),
        "metadata": metadata or {},
    })
    _write_json(os.path.join(partial, STATS_FILE), {
        "mean": model.latent_mean.tolist(),
        "std": model.latent_std.tolist(),
        "num_latents": model.latent_stats_count,
    })
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(partial, WEIGHTS_FILE))
    if os.path.exists(directory):
        # os.replace cannot replace a non-empty directory: move the old one aside, then drop it.
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(partial, directory)
        shutil.rmtree(old)
    else:
        os.replace(partial, directory)


def read_tokenizer_config(directory: str) -> dict:
    """config.json of a tokenizer directory, checked to be a σ-VAE tokenizer this code can read."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a σ-VAE tokenizer directory: {CONFIG_FILE} is missing "
                                f"(write one with tools/train_vae.py)")
    return read_format_json(path, TOKENIZER_FORMAT, TOKENIZER_FORMAT_VERSION)


def load_tokenizer(directory: str, map_location="cpu") -> SigmaVAE:
    """The σ-VAE saved in ``directory``, with its latent statistics, in eval mode."""
    info = read_tokenizer_config(directory)
    fields = {f.name for f in dataclasses.fields(SigmaVAEConfig)}
    unknown = sorted(set(info["config"]) - fields)
    if unknown:
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)}: unknown σ-VAE config fields {unknown}")
    model = SigmaVAE(SigmaVAEConfig(**info["config"]))
    state = torch.load(os.path.join(directory, WEIGHTS_FILE), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    with open(os.path.join(directory, STATS_FILE)) as f:
        stats = json.load(f)
    model.set_latent_stats(torch.tensor(stats["mean"]), torch.tensor(stats["std"]), stats["num_latents"])
    return model.to(map_location).eval()


def mean_image_mse(images: torch.Tensor) -> float:
    """MSE of predicting the mean image for every image: the baseline a tokenizer that ignores its
    input can reach, against which reconstruction errors are read."""
    return F.mse_loss(images, images.mean(0, keepdim=True).expand_as(images)).item()

