"""Benchmark (not a test): how well a LatentLM trained on the embedded digits follows its condition.

    python tools/eval_digits.py --load runs/latentlm/checkpoints --samples-per-digit 20 --solver-steps 5 20 --cfg-scale 1 4

For every digit it samples images, asking by class (a class-conditional run) or by the demo caption "a
handwritten seven." (a run on the captioned-digit documents of tools/preprocess_interleaved.py --demo digits),
and classifies them with a logistic regression fitted on the real 8x8 digits (the data set's training split;
images are average-pooled to 8x8). Reported, per solver step count and guidance scale: the share of samples
classified as the digit asked for. For scale: the classifier's accuracy on the held-out real digits, and on
those digits after the σ-VAE (upsampled to its size, encoded, decoded: what a perfect LatentLM could reach).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from megalatent.data.images import DIGITS_MAX_VALUE, DIGITS_NUM_CLASSES, DIGITS_SIZE, DigitsDataset
from megalatent.data.interleaved_sources import digit_caption
from megalatent.interop.convert import ConvertError
from megalatent.families.latentlm.images import image_prompts, sample_images, trained_on_text
from megalatent.inference.loading import load_for_inference
from megalatent.models.sigma_vae import load_tokenizer


def features(images: torch.Tensor):
    """Images [n, C, S, S] in [-1, 1] -> the digits' own 8x8 grey features (0..16), as numpy [n, 64]."""
    grey = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), DIGITS_SIZE)
    return ((grey + 1) * DIGITS_MAX_VALUE / 2).flatten(1).cpu().numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, metavar="DIR", help="the --save directory of a LatentLM run")
    p.add_argument("--latent-tokenizer", default=None, help="default: the σ-VAE the checkpoint records")
    p.add_argument("--samples-per-digit", type=int, default=20)
    p.add_argument("--solver-steps", type=int, nargs="+", default=[20])
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[4.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    from sklearn.linear_model import LogisticRegression

    try:
        loaded = load_for_inference(args.load, None, args.device)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if loaded.config.model_family != "latentlm" or (loaded.latent_tokenizer or args.latent_tokenizer) is None:
        print("error: --load must be a LatentLM run (with its σ-VAE tokenizer on disk, or --latent-tokenizer)",
              file=sys.stderr)
        return 2
    vae = load_tokenizer(args.latent_tokenizer or loaded.latent_tokenizer).to(args.device).eval()
    train, valid = DigitsDataset("train", image_size=DIGITS_SIZE), DigitsDataset("valid", image_size=DIGITS_SIZE)
    classifier = LogisticRegression(max_iter=5000).fit(features(train.images), train.labels.numpy())
    with torch.no_grad():
        upsampled = DigitsDataset("valid", image_size=vae.cfg.image_size).images.to(args.device)
        upsampled = upsampled.expand(-1, vae.cfg.in_channels, -1, -1)
        through_vae = vae.detokenize(vae.tokenize(upsampled, sample=False)).clamp(-1, 1)
    result = {"checkpoint": loaded.checkpoint, "condition": "caption" if trained_on_text(loaded) else "class",
              "real_digits_accuracy": classifier.score(features(valid.images), valid.labels.numpy()),
              "through_vae_accuracy": classifier.score(features(through_vae), valid.labels.numpy()), "runs": []}
    print(f"classifier on held-out real digits: {result['real_digits_accuracy']:.3f}; after the σ-VAE: "
          f"{result['through_vae_accuracy']:.3f} ({result['condition']}-conditioned checkpoint {loaded.checkpoint})")
    n = args.samples_per_digit
    prompts = [image_prompts(loaded, args.device, text=digit_caption(digit), num_images=n) if trained_on_text(loaded)
               else image_prompts(loaded, args.device, classes=[digit] * n) for digit in range(DIGITS_NUM_CLASSES)]
    for steps in args.solver_steps:
        for cfg_scale in args.cfg_scale:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
            correct, start = 0, time.perf_counter()
            for digit, (prompt, uncond) in enumerate(prompts):
                images = sample_images(loaded, vae, prompt, uncond, steps, cfg_scale, generator)
                correct += int((classifier.predict(features(images)) == digit).sum())
            seconds = time.perf_counter() - start
            accuracy = correct / (DIGITS_NUM_CLASSES * args.samples_per_digit)
            result["runs"].append({"solver_steps": steps, "cfg_scale": cfg_scale, "accuracy": accuracy,
                                   "seconds": seconds})
            print(f"{steps:>3} solver steps, guidance {cfg_scale:g}: {accuracy:.3f} of the samples are the digit "
                  f"asked for ({seconds:.1f} s)", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(sys.argv), **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
