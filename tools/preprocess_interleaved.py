"""Encode interleaved text+image documents into a LatentLM dataset: a Megatron indexed dataset + a latent store.

Text goes through the text tokenizer, images through the σ-VAE tokenizer (sampled, normalised latents);
each image is written in place as <boi>, its latent ids, <eoi>, and each document ends with the eod
token (see megalatent/data/interleaved.py for the format). Writes, for --output-prefix P,

    P_text_document.bin/.idx          token ids (megatron-core IndexedDataset)
    P_text_document_latents.npy       the latent store, float32 [rows, latent_dim]
    P_text_document_latents.json      how it was made (tokenizers, fingerprint); written last

and a LatentLM trains on it with --data-path P_text_document (blends as for GPT data).

Inputs: --input JSONL files, one document per line,
``{"segments": [{"text": "a cat"}, {"image": "cat.png"}, ...]}`` (image paths relative to the JSONL file;
PNG/JPEG, resized and centre-cropped to the σ-VAE's size, converted to its channels), or --demo digits:
one document per embedded scikit-learn digit, "a handwritten seven." then the image, with
--caption-dropout of them uncaptioned (for classifier-free guidance).

Example::

    python tools/train_vae.py --save checkpoints/vae-digits
    python tools/preprocess_interleaved.py --demo digits --latent-tokenizer checkpoints/vae-digits \\
        --output-prefix data/digits
"""

import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="JSONL files of documents (see above)")
    source.add_argument("--demo", choices=["digits"], help="a built-in source that needs no download")
    parser.add_argument("--output-prefix", required=True, help="outputs are <output-prefix>_text_document.*")
    parser.add_argument("--latent-tokenizer", required=True, help="σ-VAE tokenizer directory (tools/train_vae.py)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece text tokenizer (default: the default corpus's, as megalatent.pretrain "
                             "uses without --data-path; built on first use)")
    parser.add_argument("--data-cache-path", default=None,
                        help="where the default tokenizer is found or built (default: ~/.cache/megalatent)")
    parser.add_argument("--default-corpus-vocab-size", type=int, default=8192,
                        help="vocabulary of the default tokenizer")
    parser.add_argument("--seed", type=int, default=1234, help="the σ-VAE's latent noise and the caption dropout")
    parser.add_argument("--caption-dropout", type=float, default=0.1,
                        help="--demo digits: share of images written without their caption")
    parser.add_argument("--batch-size", type=int, default=256, help="images per σ-VAE batch")
    parser.add_argument("--workers", type=int, default=1, help="--input: image decoding processes")
    parser.add_argument("--device", default="cpu", help="where the σ-VAE runs (cpu, cuda); CPU and GPU draw "
                                                         "different latent noise")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser.parse_args(argv)


def check_paths(args) -> list[str]:
    """The mistakes that can be seen before anything is loaded."""
    errors = []
    if not os.path.isfile(os.path.join(args.latent_tokenizer, "config.json")):
        errors.append(f"--latent-tokenizer {args.latent_tokenizer} is not a σ-VAE tokenizer directory (no "
                      "config.json); train one with python tools/train_vae.py --save DIR")
    if args.tokenizer_model is not None and not os.path.isfile(args.tokenizer_model):
        errors.append(f"--tokenizer-model {args.tokenizer_model} not found; train one with tools/train_tokenizer.py "
                      "or leave the flag out for the default tokenizer")
    for path in args.input or []:
        if not os.path.isfile(path):
            errors.append(f"--input {path} not found")
    if not 0 <= args.caption_dropout <= 1:
        errors.append(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")
    for flag in ("batch_size", "workers"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return errors


def main(argv=None) -> int:
    args = parse_args(argv)
    errors = check_paths(args)
    if errors:
        print("error: " + "\n       ".join(errors), file=sys.stderr)
        return 2

    from megalatent.data.interleaved import vocab_size, write_interleaved
    from megalatent.data.interleaved_sources import digits_documents, iter_jsonl_documents, scan_jsonl
    from megalatent.data.tokenizer import Tokenizer
    from megalatent.models.sigma_vae import read_tokenizer_config

    vae = read_tokenizer_config(args.latent_tokenizer)["config"]
    size, channels = vae["image_size"], vae["in_channels"]
    if args.input:
        num_documents, num_images = scan_jsonl(args.input)  # every line and image file, before work
        documents = iter_jsonl_documents(args.input, size, channels, args.workers)
    else:
        documents, num_images = digits_documents(size, channels, args.caption_dropout, args.seed)
    model_path = args.tokenizer_model
    if model_path is None:
        from megalatent.data.stdlib_corpus import prepare_default_corpus
        from megalatent.data.gpt_data import default_cache_dir
        model_path, _ = prepare_default_corpus(args.data_cache_path or default_cache_dir(),
                                               args.default_corpus_vocab_size)
    tokenizer = Tokenizer.load(model_path)

    start = time.perf_counter()
    summary = write_interleaved(documents, args.output_prefix, tokenizer, args.latent_tokenizer, args.seed,
                                num_images=num_images, batch_size=args.batch_size, device=args.device,
                                progress=not args.no_progress)
    print(f"{summary.documents} documents, {summary.tokens} tokens, {summary.images} images, "
          f"{summary.latent_rows} latent rows in {time.perf_counter() - start:.1f} s; wrote")
    for path in summary.files:
        print(f"  {path}")
    print(f"LatentLM vocabulary: {tokenizer.vocab_size} text ids + <boi>, <eoi>, latent = "
          f"{vocab_size(tokenizer.vocab_size)}")
    print(f"train with: --data-path {summary.data_prefix} --tokenizer-model {model_path} "
          f"--latent-tokenizer {args.latent_tokenizer}")
    return 0


if __name__ == "__main__":
    from megalatent.cli import run_tool
    sys.exit(run_tool(main))
