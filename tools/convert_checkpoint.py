"""Convert megalatent checkpoints: to and from one plain torch file, and to and from Hugging Face folders.

A checkpoint is what `megalatent-pretrain --save DIR` writes: DIR/iter_XXXXXXX/ (torch.distributed
.checkpoint shards, train state, RNG states, manifest) and DIR/latest_checkpointed_iteration.txt.
Each command reads the newest complete checkpoint of --load, or --iteration N. No GPU and no
process group is needed; the logic lives in megalatent/interop/convert.py (torch file) and
megalatent/interop/hf.py (Hugging Face).

Examples::

    # everything (weights, AdamW state, train state) in one file that plain torch.load reads
    python tools/convert_checkpoint.py to-torch --load runs/ckpt --output runs/ckpt.pt
    # ... and back into a checkpoint that megalatent-pretrain --load resumes from exactly
    python tools/convert_checkpoint.py from-torch --input runs/ckpt.pt --save runs/ckpt2
    # to the Hugging Face architecture that computes the model: LlamaForCausalLM (gpt), MixtralForCausalLM
    # (gpt --num-experts), BitNetForCausalLM (bitnet --bitnet-variant hf-2b4t)
    python tools/convert_checkpoint.py to-hf --load runs/ckpt --output runs/hf --dtype bfloat16 \\
        --tokenizer-model ~/.cache/megalatent/stdlib-py3.11-vocab8192/tokenizer.model
    # a Llama (or Mixtral, BitNet) folder -> iteration 0 of a checkpoint, weights only, tokenizer included;
    # any model flags after the others choose what to import into (LongNet, BitNet, upcycled MoE, ...)
    python tools/convert_checkpoint.py from-hf --input llama/ --save runs/llama-longnet \\
        --model-family longnet --segment-lengths 2048 4096 --dilated-ratios 1 2
    megalatent-pretrain --load runs/llama-longnet --use-checkpoint-args --data-path ... --save runs/llama-longnet
"""
import argparse
import functools
import sys
import time

from megalatent.cli import run_tool
from megalatent.interop.convert import ConvertError, from_torch, to_torch
from megalatent.interop.hf import HF_DTYPES, from_hf, to_hf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `convert_checkpoint.py COMMAND --help` for a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def source(p: argparse.ArgumentParser) -> None:
        p.add_argument("--load", required=True, metavar="DIR", help="the --save directory of a training run")
        p.add_argument("--iteration", type=int, default=None, metavar="N",
                       help="convert iteration N (default: the newest complete checkpoint)")

    def force(p: argparse.ArgumentParser, help: str = "replace --output if it exists") -> None:
        p.add_argument("--force", action="store_true", help=help)

    p = commands.add_parser("to-torch", help="checkpoint -> one torch file {model, optim, train_state, rng}",
                            description="Write a checkpoint as one file that torch.load reads (weights_only "
                                        "too): {'model', 'optim', 'train_state', 'rng'}, full CPU tensors, "
                                        "global parameter names.")
    source(p)
    p.add_argument("--output", required=True, metavar="FILE.pt", help="the torch file to write")
    force(p)

    p = commands.add_parser("from-torch", help="torch file (from to-torch) -> checkpoint to resume from",
                            description="Write a torch file as to-torch makes it (possibly edited) as a "
                                        "complete checkpoint that megalatent-pretrain --load resumes from.")
    p.add_argument("--input", required=True, metavar="FILE.pt", help="the torch file to read")
    p.add_argument("--save", required=True, metavar="DIR", help="checkpoint directory to write into")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="save as iteration N (default: the iteration recorded in the file)")
    force(p, "write into --save even if it already holds checkpoints (this one becomes the latest)")

    p = commands.add_parser("to-hf", help="checkpoint -> Hugging Face folder (Llama, Mixtral or BitNet)",
                            description="Export a checkpoint as the folder of the transformers architecture that "
                                        "computes it (gpt: LlamaForCausalLM; gpt --num-experts: MixtralForCausalLM; "
                                        "bitnet --bitnet-variant hf-2b4t: BitNetForCausalLM, weights 2-bit packed): "
                                        "config.json, model.safetensors, generation_config.json and the tokenizer "
                                        "when it is known. What no architecture computes is refused, with the reason.")
    source(p)
    p.add_argument("--output", required=True, metavar="HF_DIR", help="the folder to write")
    p.add_argument("--dtype", default="float32", choices=list(HF_DTYPES),
                   help="dtype of the exported weights (default: float32, as trained)")
    p.add_argument("--tokenizer-model", default=None, metavar="PATH",
                   help="tokenizer to include (sentencepiece .model, or HF directory / tokenizer.json); default: "
                        "the one the checkpoint records")
    p.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="the run's --data-cache-path: include the default corpus's tokenizer from it")
    force(p)

    p = commands.add_parser("from-hf", help="Hugging Face folder -> checkpoint (iteration 0, weights only)",
                            usage="convert_checkpoint.py from-hf --input HF_DIR --save DIR [--seed N] [--force] "
                                  "[MODEL FLAGS ...]",
                            description="Import a LlamaForCausalLM, MixtralForCausalLM or BitNetForCausalLM folder "
                                        "(config.json + model.safetensors or sharded safetensors, any dtype) as "
                                        "iteration 0 of a checkpoint that megalatent-pretrain --load DIR "
                                        "--use-checkpoint-args trains at any layout (a fresh optimizer). The "
                                        "tokenizer is copied to DIR/tokenizer and recorded. Further arguments are "
                                        "megalatent-pretrain's model flags: the family to import into and its "
                                        "flags (e.g. --model-family longnet --segment-lengths ..., --model-family "
                                        "bitnet, --num-experts 8 for sparse upcycling); the architecture itself "
                                        "comes from config.json.")
    p.add_argument("--input", required=True, metavar="HF_DIR", help="the folder save_pretrained wrote")
    p.add_argument("--save", required=True, metavar="DIR", help="checkpoint directory to write into")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of what the source has no weights for (routers, new norms)")
    force(p, "write into --save even if it already holds checkpoints")
    return parser


def main(argv=None) -> int:
    args, model_flags = build_parser().parse_known_args(argv)
    if model_flags and args.command != "from-hf":
        build_parser().error(f"unrecognized arguments: {' '.join(model_flags)}")
    start = time.time()
    log = functools.partial(print, flush=True)
    try:
        if args.command == "to-torch":
            to_torch(args.load, args.output, args.iteration, force=args.force, log=log)
            result = args.output
        elif args.command == "from-torch":
            result = from_torch(args.input, args.save, args.iteration, force=args.force, log=log)
        elif args.command == "from-hf":
            result = from_hf(args.input, args.save, model_flags, seed=args.seed, force=args.force, log=log)
        else:
            to_hf(args.load, args.output, args.iteration, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
                  data_cache_path=args.data_cache_path, force=args.force, log=log)
            result = args.output
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {result} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
