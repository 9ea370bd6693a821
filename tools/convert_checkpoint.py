"""Convert megalatent checkpoints: to and from one plain torch file, and to a Hugging Face LLaMA folder.

A checkpoint is what `megalatent-pretrain --save DIR` writes: DIR/iter_XXXXXXX/ (torch.distributed
.checkpoint shards, train state, RNG states, manifest) and DIR/latest_checkpointed_iteration.txt.
Each command reads the newest complete checkpoint of --load, or --iteration N. No GPU and no
process group is needed; the logic lives in megalatent/interop/convert.py.

Examples::

    # everything (weights, AdamW state, train state) in one file that plain torch.load reads
    python tools/convert_checkpoint.py to-torch --load runs/ckpt --output runs/ckpt.pt
    # ... and back into a checkpoint that megalatent-pretrain --load resumes from exactly
    python tools/convert_checkpoint.py from-torch --input runs/ckpt.pt --save runs/ckpt2
    # the baseline decoder (model family gpt) as transformers.LlamaForCausalLM
    python tools/convert_checkpoint.py to-hf --load runs/ckpt --output runs/hf --dtype bfloat16 \\
        --tokenizer-model ~/.cache/megalatent/stdlib-py3.11-vocab8192/tokenizer.model
"""
import argparse
import functools
import sys
import time

from megalatent.cli import run_tool
from megalatent.interop.convert import HF_DTYPES, ConvertError, from_torch, to_hf, to_torch


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

    p = commands.add_parser("to-hf", help="checkpoint of model family gpt -> Hugging Face LlamaForCausalLM folder",
                            description="Export the LLaMA-style baseline decoder (model family gpt, RMSNorm, "
                                        "SwiGLU, RoPE) as a folder transformers.LlamaForCausalLM.from_pretrained "
                                        "loads: config.json, model.safetensors, generation_config.json and the "
                                        "tokenizer's tokenizer.model when it is known.")
    source(p)
    p.add_argument("--output", required=True, metavar="HF_DIR", help="the folder to write")
    p.add_argument("--dtype", default="float32", choices=list(HF_DTYPES),
                   help="dtype of the exported weights (default: float32, as trained)")
    p.add_argument("--tokenizer-model", default=None, metavar="FILE",
                   help="sentencepiece model to include (the one the run trained with)")
    p.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="the run's --data-cache-path: include the default corpus's tokenizer from it")
    force(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    log = functools.partial(print, flush=True)
    try:
        if args.command == "to-torch":
            to_torch(args.load, args.output, args.iteration, force=args.force, log=log)
            result = args.output
        elif args.command == "from-torch":
            result = from_torch(args.input, args.save, args.iteration, force=args.force, log=log)
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
