"""Train the σ-VAE image tokenizer of LatentLM and save it with its latent statistics.

By default trains on the handwritten digits that ship with scikit-learn (no download; 16x16,
patch 4 -> 16 latent tokens of 8 dimensions per image) in well under a minute on one CPU core.
Logs the training loss and the reconstruction error, and at the end the validation reconstruction
error of decode(μ) next to the error of predicting the mean image (what a useless tokenizer reaches).
Then estimates the per-channel latent mean/std on the training images and writes the tokenizer
directory (config.json, latent_stats.json, model.pt; see megalatent/models/sigma_vae.py) atomically.

Example::

    python tools/train_vae.py --save checkpoints/vae-digits
"""

import argparse
import dataclasses
import math
import time

import torch
from torch.utils.data import DataLoader

from megalatent.data.images import DIGITS_SIZE, DigitsDataset
from megalatent.models.sigma_vae import (
    SigmaVAE, SigmaVAEConfig, mean_image_mse, save_tokenizer,
)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = SigmaVAEConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, help="tokenizer directory to write (replaced if it exists)")
    model = parser.add_argument_group("tokenizer")
    model.add_argument("--image-size", type=int, default=defaults.image_size,
                       help="digits are upsampled from 8x8 to this size (multiple of 8)")
    model.add_argument("--patch-size", type=int, default=defaults.patch_size, help="pixels per latent token side")
    model.add_argument("--latent-dim", type=int, default=defaults.latent_dim, help="dimensions per latent token")
    model.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    model.add_argument("--num-layers", type=int, default=defaults.num_layers,
                       help="Transformer layers in the encoder and again in the decoder")
    model.add_argument("--num-attention-heads", type=int, default=defaults.num_attention_heads)
    model.add_argument("--noise-std", type=float, default=defaults.noise_std,
                       help="σ per example = |N(0,1)|·noise-std/0.8 (reference default 0.75)")
    model.add_argument("--reg-weight", type=float, default=defaults.reg_weight, help="weight of mean(μ²)")
    train = parser.add_argument_group("training")
    train.add_argument("--train-iters", type=int, default=300)
    train.add_argument("--micro-batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay to 10%%)")
    train.add_argument("--lr-warmup-iters", type=int, default=20)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--log-interval", type=int, default=100)
    train.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for name in ("train_iters", "micro_batch_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.image_size < DIGITS_SIZE or args.image_size % DIGITS_SIZE:
        parser.error(f"--image-size {args.image_size}: the digits are {DIGITS_SIZE}x{DIGITS_SIZE}; "
                     f"choose a multiple of {DIGITS_SIZE}")
    return args


def lr_at(iteration: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of --lr at --train-iters."""
    if iteration < args.lr_warmup_iters:
        return args.lr * (iteration + 1) / args.lr_warmup_iters
    progress = (iteration - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def reconstruction_mse(model: SigmaVAE, images: torch.Tensor) -> float:
    return torch.nn.functional.mse_loss(model.reconstruct(images), images).item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The tokenizer flags are the config's fields spelled as flags (in_channels is 1: the digits are grey).
    cfg = SigmaVAEConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SigmaVAEConfig)
                            if f.name != "in_channels"})
    problems = "; ".join(cfg.problems())
    if problems:
        for field in dataclasses.fields(SigmaVAEConfig):
            problems = problems.replace(f"{field.name}=", f"--{field.name.replace('_', '-')} ")
        raise SystemExit(f"train_vae.py: {problems}")
    torch.manual_seed(args.seed)
    train_set = DigitsDataset("train", image_size=args.image_size)
    valid_images = DigitsDataset("valid", image_size=args.image_size).images
    model = SigmaVAE(cfg)
    print(f"σ-VAE: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.num_tokens} tokens x "
          f"{cfg.latent_dim} dims per {cfg.image_size}x{cfg.image_size} image; {len(train_set)} training / "
          f"{len(valid_images)} validation digits", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(train_set, batch_size=args.micro_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    initial_valid = reconstruction_mse(model, valid_images)
    baseline = mean_image_mse(valid_images)

    iteration, start = 0, time.perf_counter()
    window_loss = window_recon = 0.0
    window = 0
    while iteration < args.train_iters:
        for images, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(iteration, args)
            out = model.loss(images)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            iteration += 1
            window_loss += out.loss.item()
            window_recon += out.recon_mse.item()
            window += 1
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                elapsed = time.perf_counter() - start
                print(f" iteration {iteration:6d}/{args.train_iters} | lr {lr_at(iteration - 1, args):.3e} | "
                      f"loss {window_loss / window:.4f} | recon mse (noised z) {window_recon / window:.4f} | "
                      f"mean(mu^2) {out.reg.item():.3f} | grad norm {grad_norm.item():.3f} | "
                      f"ms/iter {1000 * elapsed / iteration:.1f}", flush=True)
                window_loss = window_recon = 0.0
                window = 0
            if iteration == args.train_iters:
                break

    model.eval()
    final_valid = reconstruction_mse(model, valid_images)
    print(f"validation recon mse of decode(mu): {final_valid:.4f} (untrained {initial_valid:.4f}, "
          f"mean-image baseline {baseline:.4f})", flush=True)
    model.estimate_latent_stats(
        (images for images, _ in DataLoader(train_set, batch_size=256)),
        generator=torch.Generator().manual_seed(args.seed),
    )
    summary = {
        "train_iters": args.train_iters,
        "valid_recon_mse": final_valid,
        "valid_recon_mse_untrained": initial_valid,
        "valid_recon_mse_mean_image": baseline,
        "train_seconds": round(time.perf_counter() - start, 2),
        "data": "sklearn digits",
        "args": vars(args),
    }
    save_tokenizer(model, args.save, metadata=summary)
    print(f"latent mean {[round(v, 3) for v in model.latent_mean.tolist()]}", flush=True)
    print(f"latent std  {[round(v, 3) for v in model.latent_std.tolist()]}", flush=True)
    print(f"wrote {args.save}", flush=True)
    return summary


if __name__ == "__main__":
    main()
