"""Train the SentencePiece BPE tokenizer used for pretraining data.

Trains on JSONL files (the ``--json-keys`` fields of each line) and/or .txt files, or on the
Python standard library with ``--stdlib``. Writes ``<output-prefix>.model`` (pass it to
tools/preprocess_data.py as ``--tokenizer-model``), ``<output-prefix>.vocab`` (readable pieces)
and megatron-core's ``tokenizer_metadata.json`` beside them.

Example::

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output-prefix data/tok
"""

import argparse
import sys

from megalatent.cli import run_tool
from megalatent.data.preprocess import iter_records
from megalatent.data.stdlib_corpus import iter_stdlib_documents
from megalatent.data.tokenizer import train_sentencepiece


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="JSONL and/or .txt files to train on")
    source.add_argument(
        "--stdlib", action="store_true", help="train on the Python standard library"
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"],
        help="JSON fields to train on (default: text)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192,
        help="vocabulary size, special and byte pieces included (default: 8192)",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="writes <output-prefix>.model and .vocab"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the training-line sample")
    args = parser.parse_args(argv)

    if args.stdlib:
        texts = iter_stdlib_documents()
    else:
        records = iter_records(args.input, args.json_keys)
        texts = (text for record in records for text in record.values())
    model_path = train_sentencepiece(texts, args.output_prefix, args.vocab_size, seed=args.seed)
    print(f"wrote {model_path}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
