"""Tokenizers: SentencePiece BPE (training, and a small wrapper that megatron-core datasets accept), and Hugging
Face fast tokenizers (a tokenizer.json, e.g. Llama 3's), chosen as Megatron-LM does with --tokenizer-type
{SentencePieceTokenizer, HuggingFaceTokenizer} (`load_tokenizer`).

The trained model is tuned for source code and exact round trips: no text normalization, no
whitespace collapsing, no dummy-prefix space, runs of spaces (indentation) may become single
pieces, and byte fallback so that any UTF-8 text encodes without ``<unk>``. Newlines are never
seen in training (SentencePiece trains on lines), so each one encodes as the byte piece
``<0x0A>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import OrderedDict
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

# Fixed special-token ids. pad gets its own id (rather than SentencePiece's default of "none")
# so that it is a valid embedding row and never collides with eod, which megatron-core's
# datasets would warn about and work around.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# SentencePiece samples at most this many lines (about 40 MB of code) from larger inputs, which
# bounds training time and memory. The stdlib (280k lines, 12 MB) trains in ~3 s on one thread.
MAX_TRAINING_LINES = 1_000_000


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Split documents into the lines SentencePiece trains on, dropping empty ones."""
    for text in texts:
        for line in text.splitlines():
            if line:
                yield line


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a renamed temporary file: readers never see half of it."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)


def _train(texts: Iterable[str], model_writer: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts),
        model_writer=model_writer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        input_sentence_size=MAX_TRAINING_LINES,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,  # errors only: SentencePiece's INFO log is thousands of lines
    )


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's refusal (a C++ check's text) as what the user can do about it."""
    most = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if most:
        return (f"--vocab-size {vocab_size} is more than this corpus supports: its text gives at most "
                f"{most.group(2)} distinct pieces. Use --vocab-size {most.group(2)} or less, or train on more text")
    if "smaller than required_chars" in message or "vocab_size" in message.lower():
        return f"--vocab-size {vocab_size} does not fit this corpus ({message.split('] ', 1)[-1]})"
    return f"sentencepiece could not train on this corpus: {message.split('] ', 1)[-1]}"


def train_sentencepiece(
    texts: Iterable[str], model_prefix: str, vocab_size: int, seed: int = 1234
) -> str:
    """Train a byte-fallback BPE model on ``texts`` and return the path of ``<model_prefix>.model``.

    Training is deterministic for a given input, seed and vocab size, down to the bytes of the
    model file: the line sample is drawn with ``seed``, SentencePiece runs on one thread (its
    result depends on the thread count), and the model is taken from memory rather than written
    by SentencePiece, which would record ``model_prefix`` in it. ``<model_prefix>.vocab`` lists
    the pieces and scores for reading. Both files appear by atomic rename.
    ``vocab_size`` counts the 4 special tokens, the 256 byte pieces and every distinct character of
    the training text, so it must be well above 260 (SentencePiece's error says by how much).

    Beside the model this also writes megatron-core's ``tokenizer_metadata.json``, so that
    ``megatron.core.tokenizers.MegatronTokenizer.from_pretrained(model_path)`` loads the model
    too. megatron-core names that file per directory, not per model; it is the same for every
    model trained here, so it is simply overwritten.
    """
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        _train(texts, model, vocab_size)
    except RuntimeError as e:
        raise ValueError(_training_error(str(e), vocab_size)) from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    _write_atomically(model_prefix + ".vocab", vocab.encode("utf-8"))
    model_path = model_prefix + ".model"
    _write_atomically(model_path, model.getvalue())

    from megalatent.data.megatron_core import MegatronTokenizer

    MegatronTokenizer.write_metadata(
        tokenizer_path=model_path,
        tokenizer_library="sentencepiece",
        model_type="gpt",
        overwrite=True,
    )
    return model_path


class Tokenizer:
    """A trained SentencePiece model with the interface megatron-core's GPTDataset reads.

    ``GPTDatasetConfig(tokenizer=...)`` uses ``vocab_size`` (token dtype), ``eod`` (end-of-document
    id, for masks), ``pad`` (masked out of the loss) and ``eos``, and hashes
    ``unique_identifiers`` into the names of its cached index files. The identifiers include a
    digest of the model file, so retraining a model at the same path invalidates those caches.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: str) -> None:
        self._sp = processor
        self.model_path = model_path
        self.vocab_size: int = processor.get_piece_size()
        self.eod: int = processor.eos_id()
        self.eos: int = self.eod
        self.pad: int = processor.pad_id()
        if self.pad < 0:  # a model trained elsewhere without a pad piece
            self.pad = processor.unk_id()
        ids = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(), "pad_token": processor.pad_id()}
        self.special_ids = {k: v for k, v in ids.items() if v >= 0}  # those it defines
        with open(model_path, "rb") as f:
            model_digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", "megalatent.data.tokenizer.Tokenizer"), ("model_md5", model_digest)]
        )

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """Load a ``.model`` written by :func:`train_sentencepiece` (or any SentencePiece model).
        Raises FileNotFoundError when it is missing, ValueError when it is not a readable model."""
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} not found; train one with tools/train_tokenizer.py"
            )
        try:
            processor = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"tokenizer model {model_path}: not a readable sentencepiece model ({str(e).strip()}; "
                f"{os.path.getsize(model_path)} bytes): truncated or not a .model file? Copy it again or "
                "retrain it with tools/train_tokenizer.py"
            ) from None
        return cls(processor, model_path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the inverse of :meth:`encode` for any text."""
        return self._sp.decode([int(i) for i in ids])


SENTENCEPIECE, HUGGINGFACE = "SentencePieceTokenizer", "HuggingFaceTokenizer"  # Megatron-LM's --tokenizer-type names
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)
# What a Hugging Face tokenizer directory holds that this reads (and the HF import and export copy).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MEGATRON_NO_PAD = -1  # megatron-core's pad id when the tokenizer has none: an id no dataset holds


def tokenizer_type_of(path: str, declared: Optional[str] = None) -> str:
    """`declared`, else what `path` is: a directory or a .json file is a Hugging Face tokenizer, anything else
    a SentencePiece model."""
    if declared is not None:
        return declared
    return HUGGINGFACE if os.path.isdir(path) or path.endswith(".json") else SENTENCEPIECE


def load_tokenizer(path: str, tokenizer_type: Optional[str] = None):
    """The tokenizer at `path` (--tokenizer-model) of `tokenizer_type` (--tokenizer-type; default: inferred
    from the path, see `tokenizer_type_of`)."""
    kind = tokenizer_type_of(path, tokenizer_type)
    if kind == HUGGINGFACE:
        return HuggingFaceTokenizer.load(path)
    if kind == SENTENCEPIECE:
        if os.path.isdir(path):
            raise ValueError(f"--tokenizer-model {path} is a directory; a SentencePiece model is a .model file "
                             f"(or give --tokenizer-type {HUGGINGFACE} for a Hugging Face tokenizer directory)")
        return Tokenizer.load(path)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r}: choose one of {', '.join(TOKENIZER_TYPES)}")


def _special_token(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json, run by the `tokenizers` library) with the interface of
    :class:`Tokenizer`.

    ``path`` is a directory holding tokenizer.json, or a tokenizer.json file; its special tokens (eos, and bos
    and pad when it has them) come from tokenizer_config.json or special_tokens_map.json beside it, as
    transformers reads them. The end-of-document id is the eos token's, as in Megatron-LM. ``encode`` adds no
    special tokens (documents are separated by eod alone, as with the SentencePiece tokenizer).
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self.tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(self.tokenizer_file):
            raise FileNotFoundError(f"Hugging Face tokenizer {path!r}: no {self.tokenizer_file}; give a directory "
                                    "holding tokenizer.json (save_pretrained writes one) or the tokenizer.json file")
        self._tok = FastTokenizer.from_file(self.tokenizer_file)
        self.model_path = path
        self.special_tokens = self._read_special_tokens(directory)
        ids = {name: self._tok.token_to_id(token) for name, token in self.special_tokens.items() if token}
        if ids.get("eos_token") is None:
            raise ValueError(f"Hugging Face tokenizer {path!r} names no eos token (the end-of-document id) in a "
                             "tokenizer_config.json or special_tokens_map.json beside its tokenizer.json; add "
                             '"eos_token" to tokenizer_config.json')
        self.special_ids = ids
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod: int = ids["eos_token"]
        self.eos: int = self.eod
        self.pad: int = ids.get("pad_token", MEGATRON_NO_PAD)
        with open(self.tokenizer_file, "rb") as f:
            digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", "megalatent.data.tokenizer.HuggingFaceTokenizer"), ("model_md5", digest)]
        )

    @staticmethod
    def _read_special_tokens(directory: str) -> dict[str, Optional[str]]:
        tokens: dict[str, Optional[str]] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
            file = os.path.join(directory, name)
            if os.path.isfile(file):
                with open(file) as f:
                    config = json.load(f)
                tokens.update({k: _special_token(config[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                               if config.get(k) is not None})
        return tokens

    @classmethod
    def load(cls, path: str) -> "HuggingFaceTokenizer":
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer {path!r} not found")
        return cls(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
