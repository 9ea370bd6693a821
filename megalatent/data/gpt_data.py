"""GPT pretraining data: Megatron ``--data-path`` blends, megatron-core datasets, and batching.

Datasets come from megatron-core (``GPTDataset`` behind ``BlendedMegatronDatasetBuilder``), so a
data path, split, seed and sequence length give the same samples as in Megatron-LM.
:class:`MicroBatchLoader` then hands each data-parallel rank its micro-batches in the order of
Megatron-LM's pretraining sampler, resumable from the consumed-sample count in a checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from typing import Callable, Optional, Sequence

import numpy as np
import torch

_PREPROCESS_HINT = (
    "Build it with tools/preprocess_data.py, which writes <output-prefix>_<key>_document.bin/.idx; "
    "pass that prefix, without the extension."
)


def default_cache_dir() -> str:
    """Where the default corpus and the dataset index caches live unless --data-cache-path says otherwise."""
    return os.path.join(os.path.expanduser("~"), ".cache", "megalatent")


def index_cache_dir(cfg) -> str:
    """Where rank 0 saves megatron-core's dataset indices for the other ranks and later runs."""
    return os.path.join(cfg.data.data_cache_path or default_cache_dir(), "index-cache")


def samples_per_split(cfg) -> tuple[int, int, int]:
    """The (train, valid, test) samples a run reads, as Megatron-LM asks its datasets for: every training
    step's global batch, and --eval-iters global batches at each of the evaluations (none without
    --eval-interval)."""
    t = cfg.training
    evals = (t.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    return t.train_iters * t.global_batch_size, evals * t.global_batch_size, 0


class _NoCacheWarningFilter(logging.Filter):
    """Drops megatron-core's per-dataset warning that indices are not saved without a cache path.

    build_gpt_datasets skips the cache on purpose when it cannot be shared (see there); the
    warning would otherwise print several lines on every rank at every start.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


_NO_CACHE_WARNING_FILTER = _NoCacheWarningFilter()


def _as_weight(token: str) -> float | None:
    """``token`` as a number if it is one, else None (it is then a dataset prefix)."""
    try:
        return float(token)
    except ValueError:
        return None


# Megatron's .idx (megatron.core.datasets.indexed_dataset): a 9-byte magic, version <Q> (1), dtype code <B>,
# sequence count S <Q>, document count D <Q>, then int32 lengths[S], int64 byte pointers[S], int64
# document indices[D] (+ int8 modes[S] in multimodal datasets). Codes: megatron's DType enum.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_TOKEN_SAMPLE = 1 << 16  # tokens read at the start, middle and end of a .bin to check their range


def indexed_dataset_problem(prefix: str, vocab_size: Optional[int] = None) -> Optional[str]:
    """What is wrong with the Megatron dataset ``prefix``.bin/.idx, by reading the .idx header and the
    last sequence's place (cheap at any size), or None. With ``vocab_size``, a sample of the .bin's tokens
    (start, middle, end) must also be ids below it."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            return f"dataset file {path} not found (--data-path {prefix!r}). {_PREPROCESS_HINT}"
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    try:
        with open(idx, "rb") as f:
            header = f.read(_IDX_HEADER.size)
            if len(header) < _IDX_HEADER.size:
                return f"{idx}: truncated ({idx_size} bytes, shorter than the index header): preprocess it again"
            magic, version, code, sequences, documents = _IDX_HEADER.unpack(header)
            if magic != _IDX_MAGIC or version != 1 or code not in _IDX_DTYPES:
                return (f"{idx}: not a Megatron indexed-dataset index (header {header[:9]!r}, version {version}, "
                        f"dtype code {code}): corrupt, or another file under that name. {_PREPROCESS_HINT}")
            expected = _IDX_HEADER.size + 12 * sequences + 8 * documents
            if idx_size not in (expected, expected + sequences):
                return (f"{idx}: {idx_size} bytes, its header ({sequences} sequences, {documents} documents) "
                        f"needs {expected}: truncated or corrupt; preprocess it again")
            if sequences == 0:
                return f"{idx}: the dataset holds no sequences"
            f.seek(_IDX_HEADER.size + 4 * (sequences - 1))
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_IDX_HEADER.size + 4 * sequences + 8 * (sequences - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
    except OSError as e:
        return f"{idx}: cannot read it ({e.strerror})"
    dtype = np.dtype(_IDX_DTYPES[code])
    if last_pointer + last_length * dtype.itemsize != bin_size:
        return (f"{bin_}: {bin_size} bytes, but its index {idx} places its tokens in "
                f"{last_pointer + last_length * dtype.itemsize} bytes: truncated, or the .bin and .idx are from "
                "different runs; preprocess it again")
    if vocab_size is not None:
        tokens = np.memmap(bin_, dtype=dtype, mode="r")
        starts = {0, max(0, len(tokens) // 2 - _TOKEN_SAMPLE // 2), max(0, len(tokens) - _TOKEN_SAMPLE)}
        largest = max(int(tokens[s:s + _TOKEN_SAMPLE].max()) for s in starts)
        if largest >= vocab_size:
            return (f"{bin_}: holds token id {largest}, but the tokenizer has {vocab_size} ids: corrupt, or "
                    "tokenized with another tokenizer (--tokenizer-model)")
    return None


def parse_data_path(tokens: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Parse Megatron's ``--data-path`` list into ``(prefixes, weights)`` and check each dataset's files (they
    exist, the .idx header is sound and the .bin has the size it gives: `indexed_dataset_problem`).

    Accepted forms, as in Megatron-LM:

    - ``PREFIX``: one dataset;
    - ``W1 PREFIX1 W2 PREFIX2 ...``: a blend sampled in proportion to the (normalized) weights;
    - ``PREFIX1 PREFIX2 ...``: a blend weighted by dataset size (weights are None).

    Raises ValueError for a malformed list (numbers not strictly alternating with prefixes,
    a weight that is not a positive finite number) or datasets whose ``.bin``/``.idx`` are missing or
    damaged (one line each).
    """
    tokens = [token.strip() for token in tokens]
    if not tokens:
        raise ValueError(
            "--data-path is empty: give PREFIX, W1 PREFIX1 W2 PREFIX2 ..., or PREFIX1 PREFIX2 ..."
        )
    numeric = [_as_weight(token) is not None for token in tokens]
    if not any(numeric):
        prefixes, weights = tokens, None
    else:
        alternating = len(tokens) % 2 == 0 and all(
            is_number == (i % 2 == 0) for i, is_number in enumerate(numeric)
        )
        if not alternating:
            raise ValueError(
                f"malformed --data-path {' '.join(tokens)!r}: with weights it must be "
                "'W1 PREFIX1 W2 PREFIX2 ...' (a weight before every prefix)"
            )
        prefixes = tokens[1::2]
        weights = [float(token) for token in tokens[0::2]]
        for prefix, weight in zip(prefixes, weights):
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(
                    f"malformed --data-path: the weight of {prefix!r} is {weight:g}; "
                    "weights must be positive numbers"
                )
    problems = [p for p in map(indexed_dataset_problem, prefixes) if p is not None]
    if problems:
        raise ValueError("\n".join(problems))
    return prefixes, weights


def _check_no_empty_split(config, data_prefixes: Sequence[str]) -> None:
    """Raise if ``--split`` leaves a used split of some dataset without documents.

    megatron-core loops forever on such a split (it adds epochs of zero tokens until it has
    enough samples), so this check turns a silent hang into an error. The document ranges are
    computed exactly as in ``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``.
    """
    from megalatent.data.megatron_core import IndexedDataset

    names = ("train", "valid", "test")
    for prefix in data_prefixes:
        num_documents = len(IndexedDataset(prefix))
        for name, bookends in zip(names, config.split_matrix):
            if bookends is None:
                continue
            begin, end = (int(round(b * float(num_documents))) for b in bookends)
            if begin == end:
                raise ValueError(
                    f"--split {config.split!r} leaves the {name} split of {prefix} empty (it has "
                    f"{num_documents} documents); give it more documents or set the {name} "
                    "share to 0"
                )


def build_gpt_datasets(
    data_prefixes: Sequence[str],
    weights: Sequence[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: tuple[int, int, int],
    cache_dir: str | None,
):
    """Build the (train, valid, test) GPT datasets of a blend with megatron-core.

    ``split`` is Megatron's ``--split`` (e.g. ``"949,50,1"``); a split with zero share comes back
    as None. ``num_samples`` are the samples wanted per split: one dataset gives at least that
    many (whole epochs), a weighted blend that many (rounded up per dataset), a size-weighted one
    stops after one pass over its datasets (Megatron's behaviour), so it may give fewer.
    ``tokenizer`` needs ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (see
    :class:`megalatent.data.tokenizer.Tokenizer`). Each sample is a dict of ``tokens``,
    ``labels``, ``loss_mask`` and ``position_ids`` of length ``seq_length`` (plus ``dataset_id``
    in a blend). Raises ValueError when the split leaves a split of some dataset without
    documents.

    ``cache_dir``: where rank 0 saves the document/sample/shuffle indices (``.npy``) for the other
    ranks and later runs to load; it must be shared by all ranks. It is used only once
    torch.distributed is initialized, because megatron-core's blending code calls
    ``torch.distributed.get_rank()`` unguarded when a cache path is set. Without a process group
    or without ``cache_dir``, the indices are built in memory and nothing is written; they are
    deterministic, so every rank builds the same ones.
    """
    from megalatent.data.megatron_core import (
        BlendedMegatronDatasetBuilder,
        GPTDataset,
        GPTDatasetConfig,
    )

    if len(data_prefixes) == 1:
        weights = None  # a one-dataset "blend" only adds a BlendedDataset layer and a warning
    use_cache = cache_dir is not None and torch.distributed.is_initialized()
    if not use_cache:
        for module in ("gpt_dataset", "blended_dataset"):
            logging.getLogger(f"megatron.core.datasets.{module}").addFilter(
                _NO_CACHE_WARNING_FILTER
            )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(data_prefixes), None if weights is None else list(weights)),
        split=split,
        # An empty string, unlike None, stops GPTDataset from defaulting to a cache directory
        # beside the data (<prefix>/cache/), which may be read-only or shared between jobs.
        path_to_cache=cache_dir if use_cache else "",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_no_empty_split(config, data_prefixes)
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), lambda: True, config
    ).build()
    return train, valid, test


class MicroBatchLoader:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Follows Megatron-LM's ``MegatronPretrainingSampler``: global samples are taken in order from
    ``consumed_samples``; each micro-batch step takes the next ``micro_batch_size * dp_size``
    of them and rank ``r`` gets the ``r``-th block of ``micro_batch_size``. So micro-batch ``m``
    of the global batch starting at ``c`` holds, on rank ``r``, samples
    ``c + (m * dp_size + r) * micro_batch_size + i``. Over a global batch the ranks together cover
    samples ``c .. c + global_batch_size - 1`` exactly once, for any ``dp_size``.

    Sample ``g`` is ``dataset[g % len(dataset)]``: past its end the dataset repeats in the same
    order (build it with enough samples for the run, as Megatron does, to avoid that). The only
    state is ``consumed_samples``, saved by :meth:`state_dict`.

    ``transform(sample, g)``, if given, completes sample ``g`` with what is keyed by its place in the run
    rather than by its data (a diffusion loss's noise, `latent_data.DiffusionDraws`): ``g`` counts on
    past the dataset's end, and does not depend on which rank reads the sample.
    """

    LM_KEYS = {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
    }

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        keys: dict[str, torch.dtype] | None = None,
        transform: Callable[[dict, int], dict] | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if (
            min(micro_batch_size, global_batch_size, dp_size) < 1
            or global_batch_size % (micro_batch_size * dp_size) != 0
        ):
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"micro_batch_size ({micro_batch_size}) x dp_size ({dp_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.keys = keys if keys is not None else self.LM_KEYS  # what a sample holds (a family's objective)
        self.transform = transform

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank per global batch (the gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _micro_batch(self, first_sample: int) -> dict[str, torch.Tensor]:
        samples = [self._sample(first_sample + i) for i in range(self.micro_batch_size)]
        return {
            key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]).to(dtype)
            for key, dtype in self.keys.items()
        }

    def _sample(self, g: int) -> dict:
        sample = self.dataset[g % len(self.dataset)]
        return sample if self.transform is None else self.transform(sample, g)

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step; advances ``consumed_samples``."""
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batches = [self._micro_batch(start + m * step) for m in range(self.num_micro_batches)]
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
