"""Tokenize text into Megatron indexed datasets (``.bin`` token stream + ``.idx`` index).

This is the library behind ``tools/preprocess_data.py`` and the default stdlib corpus. It writes
the same files as Megatron-LM's preprocess_data.py: one dataset per JSON key, named
``<output_prefix>_<key>_document.{bin,idx}``, one sequence per document, EOD appended.
Token ids are stored as uint16 when the vocabulary allows it (Megatron's rule), else int32.

Each output is written under a temporary name and moved into place when complete, so an
interrupted run never leaves a dataset that looks valid.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from megalatent.data.tokenizer import load_tokenizer

# Documents handed to a worker at a time: large enough to amortize inter-process traffic and the worker's
# loading of the tokenizer (once per task), small enough to keep the in-flight text (and the progress bar)
# fine-grained.
_TASK_DOCUMENTS = 64


def _encode_task(task: tuple[str, Optional[str], bool, list[dict[str, str]]]) -> list[dict[str, list[int]]]:
    """Token ids per key of each document of a task; an empty text stays empty (no lone EOD)."""
    tokenizer_model, tokenizer_type, append_eod, records = task
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    encoded = []
    for record in records:
        ids_by_key = {}
        for key, text in record.items():
            ids = tokenizer.encode(text)
            if ids and append_eod:
                ids.append(tokenizer.eod)
            ids_by_key[key] = ids
        encoded.append(ids_by_key)
    return encoded


def _tasks(records: Iterable[dict[str, str]], tokenizer_model: str, tokenizer_type: Optional[str], append_eod: bool):
    task = []
    for record in records:
        task.append(record)
        if len(task) == _TASK_DOCUMENTS:
            yield tokenizer_model, tokenizer_type, append_eod, task
            task = []
    if task:
        yield tokenizer_model, tokenizer_type, append_eod, task


def encode_to_indexed_datasets(
    records: Iterable[dict[str, str]],
    output_prefix: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = True,
    progress: bool = True,
    tokenizer_type: Optional[str] = None,
) -> list[str]:
    """Tokenize a stream of documents (``{key: text}`` dicts) and write one dataset per key.

    Returns the dataset prefixes ``<output_prefix>_<key>_document`` in ``json_keys`` order.
    Documents whose text for a key is empty are left out of that key's dataset.
    """
    from megalatent.data.megatron_core import DType, IndexedDatasetBuilder

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    vocab_size = load_tokenizer(tokenizer_model, tokenizer_type).vocab_size
    dtype = DType.optimal_dtype(vocab_size)
    prefixes = [f"{output_prefix}_{key}_document" for key in json_keys]
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_suffix = f".tmp-{os.getpid()}"
    builders = {
        key: IndexedDatasetBuilder(prefix + ".bin" + tmp_suffix, dtype=dtype)
        for key, prefix in zip(json_keys, prefixes)
    }
    try:
        with multiprocessing.Pool(workers) as pool, tqdm(
            unit="doc", desc="tokenizing", disable=not progress, mininterval=1.0
        ) as bar:
            num_tokens = 0
            for encoded in pool.imap(_encode_task, _tasks(records, tokenizer_model, tokenizer_type, append_eod)):
                for document in encoded:
                    for key, ids in document.items():
                        if ids:
                            builders[key].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                            num_tokens += len(ids)
                bar.update(len(encoded))
                bar.set_postfix(tokens=num_tokens, refresh=False)
        for key, prefix in zip(json_keys, prefixes):
            builders[key].finalize(prefix + ".idx" + tmp_suffix)
            # The .idx goes last: its presence is what marks a dataset as complete, so an old
            # one must not sit beside the new .bin.
            if os.path.exists(prefix + ".idx"):
                os.remove(prefix + ".idx")
            os.replace(prefix + ".bin" + tmp_suffix, prefix + ".bin")
            os.replace(prefix + ".idx" + tmp_suffix, prefix + ".idx")
    finally:
        for prefix in prefixes:
            for leftover in (prefix + ".bin" + tmp_suffix, prefix + ".idx" + tmp_suffix):
                if os.path.exists(leftover):
                    os.remove(leftover)
    return prefixes


def iter_records(inputs: Sequence[str], json_keys: Sequence[str]) -> Iterator[dict[str, str]]:
    """Yield one ``{key: text}`` per document of JSONL/``.txt`` files, read lazily.

    A JSONL line gives the ``json_keys`` fields of its object; a ``.txt`` file is one document
    under ``json_keys[0]``.
    """
    for path in inputs:
        try:
            yield from _file_records(path, json_keys)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x}: {err.reason}); "
                             "convert it to UTF-8") from None


def _file_records(path: str, json_keys: Sequence[str]) -> Iterator[dict[str, str]]:
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield {json_keys[0]: f.read()}
        return
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({err})") from err
            if not isinstance(obj, dict) or not all(
                isinstance(obj.get(key), str) for key in json_keys
            ):
                found = list(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object with string fields "
                    f"{list(json_keys)}, found {found}"
                )
            yield {key: obj[key] for key in json_keys}


def preprocess_files(
    inputs: list[str],
    output_prefix: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = True,
    progress: bool = True,
    tokenizer_type: Optional[str] = None,
) -> list[str]:
    """Tokenize JSONL and ``.txt`` files into ``<output_prefix>_<key>_document.{bin,idx}``.

    JSONL files hold one JSON object per line and contribute the ``json_keys`` fields of each as
    documents of the matching datasets. A ``.txt`` file is one whole document; it needs a single
    json key, whose dataset it joins. All inputs go, in order, into the same datasets. Files are
    streamed, so their size is not limited by memory (a ``.txt`` file is read whole, as it is a
    single document). ``tokenizer_type`` is --tokenizer-type (default: inferred from ``tokenizer_model``,
    see :func:`megalatent.data.tokenizer.tokenizer_type_of`). Returns the dataset prefixes, in ``json_keys`` order.
    """
    if not inputs:
        raise ValueError("no input files given")
    if not json_keys:
        raise ValueError("json_keys must name at least one field")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} not found")
    if len(json_keys) > 1 and any(path.endswith(".txt") for path in inputs):
        raise ValueError(
            f".txt inputs are single documents and need exactly one json key, got {list(json_keys)}"
        )
    return encode_to_indexed_datasets(
        iter_records(inputs, json_keys),
        output_prefix,
        tokenizer_model,
        json_keys=json_keys,
        workers=workers,
        append_eod=append_eod,
        progress=progress,
        tokenizer_type=tokenizer_type,
    )
