"""The tokenizer an export ships beside its weights, and the one an import brings along.

A run records the tokenizer it trained with (`tokenizer_model` in its train state): a SentencePiece .model,
or a Hugging Face tokenizer (a directory holding tokenizer.json, or the tokenizer.json itself; see
megalatent/data/tokenizer.py). Exports copy it next to the weights, as the files transformers reads:
tokenizer.model for SentencePiece, tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) for a
Hugging Face tokenizer.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Callable, Optional

from megalatent.config import ModelConfig
from megalatent.data.tokenizer import HF_TOKENIZER_FILES, HUGGINGFACE, load_tokenizer, tokenizer_type_of

Log = Callable[[str], None]


class TokenizerError(Exception):
    """A tokenizer an export or import cannot use; the message names it and the fix."""


def find_default_tokenizer(data_cache_path: str, vocab_size: Optional[int]) -> list[str]:
    """Default-corpus tokenizers under a --data-cache-path that could have trained a model of `vocab_size`
    (<cache>/stdlib-pyX.Y-vocabN/tokenizer.model, N = vocab_size)."""
    if not os.path.isdir(data_cache_path):
        return []
    pattern = re.compile(rf"^stdlib-py\d+\.\d+-vocab{vocab_size}$")
    return sorted(os.path.join(data_cache_path, d, "tokenizer.model") for d in os.listdir(data_cache_path)
                  if pattern.match(d) and os.path.isfile(os.path.join(data_cache_path, d, "tokenizer.model")))


def resolve_tokenizer(cfg: ModelConfig, tokenizer_model: Optional[str], data_cache_path: Optional[str],
                      train_state: dict[str, Any], log: Log) -> Optional[str]:
    """Which tokenizer to ship: --tokenizer-model, else the one the train state names, else the default
    corpus's under --data-cache-path when exactly one fits. A tokenizer with more tokens than the model's
    vocabulary is refused: it cannot be the one the model was trained with."""
    if tokenizer_model is None and train_state.get("tokenizer_model"):
        tokenizer_model = train_state["tokenizer_model"]
        if not os.path.exists(tokenizer_model):
            log(f"WARNING: the checkpoint names tokenizer {tokenizer_model}, which is gone; "
                "pass --tokenizer-model to include one")
            return None
    if tokenizer_model is None and data_cache_path is not None:
        found = find_default_tokenizer(data_cache_path, cfg.vocab_size)
        if len(found) > 1:
            raise TokenizerError(f"--data-cache-path {data_cache_path} holds several default-corpus tokenizers "
                                 f"of {cfg.vocab_size} tokens ({', '.join(found)}); pick one with --tokenizer-model")
        if not found:
            raise TokenizerError(f"--data-cache-path {data_cache_path} holds no default-corpus tokenizer of "
                                 f"{cfg.vocab_size} tokens (stdlib-pyX.Y-vocab{cfg.vocab_size}/tokenizer.model); "
                                 "give the tokenizer with --tokenizer-model")
        tokenizer_model = found[0]
    if tokenizer_model is None:
        from megalatent.data.gpt_data import default_cache_dir

        found = find_default_tokenizer(default_cache_dir(), cfg.vocab_size)
        hint = (f"; the default cache has {', '.join(found)}: add --data-cache-path {default_cache_dir()} if the "
                "run used the default corpus" if found else "")
        log("WARNING: no tokenizer in the export (and no bos/eos ids in its config): pass --tokenizer-model "
            f"FILE, or the run's --data-cache-path for the default corpus's{hint}")
        return None
    if not os.path.exists(tokenizer_model):
        raise TokenizerError(f"--tokenizer-model {tokenizer_model}: no such file")
    size = open_tokenizer(tokenizer_model).vocab_size
    # (a Hugging Face model's vocabulary may be larger than its tokenizer's: Qwen's, imported ones)
    fits = size == cfg.vocab_size or (size < cfg.vocab_size and tokenizer_type_of(tokenizer_model) == HUGGINGFACE)
    if cfg.vocab_size is not None and not fits:
        raise TokenizerError(f"tokenizer {tokenizer_model} has {size} tokens but the model was trained with "
                             f"--vocab-size {cfg.vocab_size}; give the tokenizer it was trained with")
    return tokenizer_model


def open_tokenizer(path: str):
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"tokenizer {path}: {e}") from None


def special_ids(tokenizer_model: Optional[str]) -> dict[str, int]:
    """bos/eos/pad ids as a Hugging Face config writes them (those the tokenizer defines; none without one)."""
    if tokenizer_model is None:
        return {}
    return {f"{name}_id": i for name, i in open_tokenizer(tokenizer_model).special_ids.items()
            if name in ("bos_token", "eos_token", "pad_token")}


def tokenizer_files(tokenizer_model: str) -> dict[str, str]:
    """{name in an HF folder: source file} for the tokenizer at `tokenizer_model`."""
    if tokenizer_type_of(tokenizer_model) != HUGGINGFACE:
        return {"tokenizer.model": tokenizer_model}
    directory = tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(os.path.abspath(tokenizer_model))
    files = {name: os.path.join(directory, name) for name in HF_TOKENIZER_FILES
             if os.path.isfile(os.path.join(directory, name))}
    if not os.path.isdir(tokenizer_model):
        files["tokenizer.json"] = tokenizer_model
    return files


def copy_tokenizer(tokenizer_model: str, directory: str) -> list[str]:
    """Copy the tokenizer's files into `directory` (created if needed); returns the names written."""
    os.makedirs(directory, exist_ok=True)
    files = tokenizer_files(tokenizer_model)
    for name, source in files.items():
        shutil.copyfile(source, os.path.join(directory, name))
    return sorted(files)
