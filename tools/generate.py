"""Generate text from a checkpoint of any model family, with the family's inference cache; images
from a LatentLM checkpoint (class-conditional, or text-to-image for a run on interleaved documents).

    python tools/generate.py --load runs/yoco --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load runs/gpt --prompt "import os" --temperature 0.8 --top-p 0.9 --seed 1
    python tools/generate.py --load runs/bitnet-packed --prompt "import os"      # a tools/export_bitnet.py dir
    python tools/generate.py --load runs/latentlm --classes 0 1 2 3 --solver-steps 20 --cfg-scale 4 --output digits.png
    python tools/generate.py --load runs/latentlm-docs --prompt "a handwritten seven." --num-images 4 --output 7.png

The prompt is processed in one prefill (YOCO: the self-decoder over the prompt, then the cross-decoder
for its last token only), then one token at a time against the cache. Greedy by default
(--temperature 0); --top-k / --top-p filter the sampled distribution. Prints the prompt and the
continuation, and the cache size and speed on stderr.
"""
import argparse
import sys
import time

import torch

from megalatent.cli import run_tool
from megalatent.data.tokenizer import load_tokenizer
from megalatent.interop.convert import ConvertError
from megalatent.inference.generate import decode_step, prefill, sample
from megalatent.inference.loading import load_for_inference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, metavar="DIR",
                   help="the --save directory of a training run, or a packed BitNet directory (tools/export_bitnet.py)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the newest)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-document token)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the checkpoint records")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    images = p.add_argument_group("LatentLM (images)")
    images.add_argument("--classes", type=int, nargs="+",
                        help="class-conditional run: one image per class id (a run on documents takes --prompt)")
    images.add_argument("--num-images", type=int, default=1, help="text-to-image: images drawn for the --prompt")
    images.add_argument("--solver-steps", type=int, default=20, help="DPM-Solver++ steps per latent")
    images.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance (1 = none)")
    images.add_argument("--latent-tokenizer", default=None, help="default: the σ-VAE the checkpoint records")
    images.add_argument("--output", default="samples.png", help="where the image grid is written (PNG)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        print("error: need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1", file=sys.stderr)
        return 2
    try:
        loaded = load_for_inference(args.load, args.iteration, args.device, DTYPES[args.dtype], args.tokenizer_model)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if loaded.config.model_family == "latentlm":
        return images_from_latentlm(args, loaded)
    if loaded.tokenizer_model is None:
        print("error: the checkpoint's tokenizer is not on disk; pass --tokenizer-model", file=sys.stderr)
        return 2
    tok = load_tokenizer(loaded.tokenizer_model)
    model, cfg = loaded.model, loaded.config
    ids = tok.encode(args.prompt) if args.prompt else [tok.eod]
    prompt = torch.tensor([ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    print(f"{cfg.model_family} model from {loaded.checkpoint}; prompt of {len(ids)} tokens", file=sys.stderr)

    t0 = time.perf_counter()
    cache = model.new_cache()
    logits = prefill(model, prompt, cache)
    t_prefill = time.perf_counter() - t0
    new = []
    t0 = time.perf_counter()
    for i in range(args.max_new_tokens):
        token = sample(logits[:, :tok.vocab_size], args.temperature, args.top_k, args.top_p, generator)
        if args.stop_at_eos and int(token) == tok.eod:
            break
        new.append(int(token))
        if i < args.max_new_tokens - 1:
            logits = decode_step(model, token, cache)
    t_decode = time.perf_counter() - t0
    print(args.prompt + tok.decode(new))
    print(f"prefill {t_prefill * 1e3:.1f} ms; {len(new)} tokens in {t_decode:.2f} s "
          f"({len(new) / max(t_decode, 1e-9):.1f} tok/s); cache {cache.nbytes() / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def images_from_latentlm(args, loaded) -> int:
    """Images from a LatentLM: latents one by one after the prompt (a class, or text), pixels from its σ-VAE."""
    from PIL import Image

    from megalatent.families.latentlm.images import image_prompts, sample_images
    from megalatent.models.sigma_vae import load_tokenizer
    tokenizer_dir = args.latent_tokenizer or loaded.latent_tokenizer
    if tokenizer_dir is None or args.solver_steps < 1 or args.num_images < 1:
        print("error: a LatentLM samples images: need --latent-tokenizer (unless the checkpoint records it), "
              "--solver-steps >= 1 and --num-images >= 1", file=sys.stderr)
        return 2
    try:
        prompt, uncond = image_prompts(loaded, args.device, args.classes, args.prompt, args.num_images)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vae = load_tokenizer(tokenizer_dir).to(args.device).eval()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    images = sample_images(loaded, vae, prompt, uncond, args.solver_steps, args.cfg_scale, generator)
    seconds = time.perf_counter() - t0
    grid = torch.cat(list(images), dim=-1)  # side by side
    pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(args.output)
    print(f"{len(images)} images ({args.solver_steps} solver steps, guidance {args.cfg_scale}) in {seconds:.2f} s "
          f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
