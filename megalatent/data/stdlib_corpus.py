"""A default pretraining corpus that needs no download: the running Python's standard library.

About 12 MB of code in ~700 files on CPython 3.11, which is enough to train small models
end to end (tokenizer, indexed dataset, loss going down) on any machine that has Python.
The corpus is identical across runs on one machine; it differs between Python versions, which
is why the cache is keyed on the version.
"""

from __future__ import annotations

import fcntl
import os
import sys
import sysconfig
import time
from typing import Iterator

from megalatent.data.preprocess import encode_to_indexed_datasets
from megalatent.data.tokenizer import train_sentencepiece

# Directories that hold installed third-party packages, test suites or test data (for example
# lib2to3/tests/data, which is deliberately unparseable Python 2), rather than library code.
_SKIPPED_DIRECTORIES = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def _stdlib_paths() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED_DIRECTORIES]
        paths.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
    return sorted(paths)


def iter_stdlib_documents() -> Iterator[str]:
    """Yield the text of each standard-library ``.py`` file, in sorted path order.

    Skips installed packages, test suites, test data, and files that are not valid UTF-8.
    """
    for path in _stdlib_paths():
        with open(path, "rb") as f:
            data = f.read()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def _log(message: str) -> None:
    print(f"[stdlib corpus] {message}", file=sys.stderr, flush=True)


def prepare_default_corpus(cache_dir: str, vocab_size: int = 8192) -> tuple[str, str]:
    """Build (once) and return ``(tokenizer_model_path, data_prefix)`` for the stdlib corpus.

    The first call trains a tokenizer on the corpus and tokenizes it into a Megatron indexed
    dataset (one document per file, EOD appended); later calls return the cached paths at once.
    Outputs live in ``cache_dir/stdlib-py<major>.<minor>-vocab<vocab_size>/``.

    Safe to call from many processes at once (e.g. every rank of a job, on nodes that share
    ``cache_dir``): the first to take an exclusive ``flock`` on the cache builds it while the
    others wait, and every output is written under a temporary name and renamed into place, so
    a cache left by a killed build is never used. ``flock`` needs a filesystem with working
    locks (local disks, NFSv4, Lustre with ``-o flock``).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    directory = os.path.join(cache_dir, f"stdlib-py{version}-vocab{vocab_size}")
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, "tokenizer.model")
    output_prefix = os.path.join(directory, "stdlib")
    data_prefix = f"{output_prefix}_text_document"

    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Both outputs appear by rename, the data index last, so this is a complete cache.
        if os.path.exists(model_path) and os.path.exists(data_prefix + ".idx"):
            return model_path, data_prefix

        start = time.perf_counter()
        _log(f"building the default corpus in {directory} (runs once)")
        tokenizer_prefix = os.path.join(directory, "tokenizer")
        train_sentencepiece(iter_stdlib_documents(), tokenizer_prefix, vocab_size)
        _log(f"trained a {vocab_size}-token tokenizer in {time.perf_counter() - start:.1f} s")

        encode_to_indexed_datasets(
            ({"text": text} for text in iter_stdlib_documents()),
            output_prefix,
            model_path,
            workers=min(8, os.cpu_count() or 1),
        )
        _log(f"done in {time.perf_counter() - start:.1f} s: {data_prefix}.{{bin,idx}}")
    return model_path, data_prefix
