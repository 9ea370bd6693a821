"""Tokenize JSONL or text files into Megatron indexed datasets for pretraining.

Takes Megatron-LM's tools/preprocess_data.py flags and writes the same files,
``<output-prefix>_<key>_document.{bin,idx}``, one per ``--json-keys`` field; pass that prefix to
``--data-path``. The tokenizer is a SentencePiece model (see tools/train_tokenizer.py) or a Hugging Face
tokenizer (a directory holding tokenizer.json, or the tokenizer.json file; the eod id is its eos token's).

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-model data/tok.model --json-keys text --append-eod --workers 8
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model llama3/ --append-eod
"""

import argparse
import sys

from megalatent.cli import run_tool
from megalatent.data.preprocess import preprocess_files
from megalatent.data.tokenizer import TOKENIZER_TYPES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True,
        help="JSONL files (one object per line) and/or .txt files (one document each)",
    )
    parser.add_argument(
        "--output-prefix", required=True,
        help="outputs are <output-prefix>_<key>_document.bin/.idx",
    )
    parser.add_argument(
        "--tokenizer-model", required=True,
        help="SentencePiece .model file, or Hugging Face tokenizer directory / tokenizer.json",
    )
    parser.add_argument(
        "--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
        help="default: HuggingFaceTokenizer for a directory or .json, else SentencePieceTokenizer",
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"],
        help="JSON fields to tokenize, one dataset each (default: text)",
    )
    parser.add_argument(
        "--append-eod", action="store_true",
        help="append the end-of-document token to each document",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    args = parser.parse_args(argv)

    prefixes = preprocess_files(
        args.input,
        args.output_prefix,
        args.tokenizer_model,
        json_keys=args.json_keys,
        workers=args.workers,
        append_eod=args.append_eod,
        progress=not args.no_progress,
        tokenizer_type=args.tokenizer_type,
    )
    for prefix in prefixes:
        print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    sys.exit(run_tool(main))
