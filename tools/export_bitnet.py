"""Export a BitNet b1.58 checkpoint to packed 2-bit weights (4 ternary codes per byte) + scales + config.

Reads the newest complete checkpoint of --load (or --iteration N), whatever layout wrote it; needs no
GPU and no process group. The logic lives in megalatent/interop/packed.py, whose
`load_packed_model(DIR)` runs the result (2-bit weights, 8-bit activations). Every BitLinear layer and
every ternary MoE expert group (a BitNet trained with --num-experts) is packed.

    python tools/export_bitnet.py --load runs/bitnet --output runs/bitnet-packed
    python tools/export_bitnet.py --load runs/bitnet --output runs/bitnet-packed --dtype bfloat16 --force
"""
import argparse
import functools
import sys
import time

from megalatent.cli import run_tool
from megalatent.interop.convert import ConvertError
from megalatent.interop.packed import DTYPES, export_packed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_bitnet.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="DIR", help="the --save directory of a training run")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="export iteration N (default: the newest complete checkpoint)")
    p.add_argument("--output", required=True, metavar="DIR", help="the packed directory to write")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="dtype of the full-precision parts: embedding, norms, output head (default: float32)")
    p.add_argument("--tokenizer-model", default=None, metavar="FILE",
                   help="sentencepiece model to include (default: the one the checkpoint names)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        export_packed(args.load, args.output, args.iteration, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
                      force=args.force, log=functools.partial(print, flush=True))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {args.output} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
