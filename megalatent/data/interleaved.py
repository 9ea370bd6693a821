"""Interleaved text+image documents for LatentLM: one Megatron indexed dataset plus a latent store.

A document is a list of segments, text and images. It is stored as one token sequence in a Megatron
indexed dataset (``<prefix>.bin/.idx``), each image written in place as

    <boi>  latent_base + r  latent_base + r + 1  ...  latent_base + r + T - 1  <eoi>

where rows r .. r + T - 1 of the latent store (``<prefix>_latents.npy``, float32 [rows, latent_dim]) hold
the image's T σ-VAE latents (normalised, sampled, raster order: what LatentLM trains on). Because the
latents live in the token stream, megatron-core's GPTDataset windows, shuffles, splits and blends these
datasets exactly as text, and a window's latents are always its own tokens' latents; a window may start or
end inside an image (a latent at position 0 still enters through the latent projection).

Ids, for a text tokenizer of V ids: text 0..V-1, ``<boi>`` V, ``<eoi>`` V + 1, the placeholder a latent
position carries in ``tokens`` V + 2 (never embedded), so the model's vocabulary is V + 3; stored latent ids
start at ``latent_base`` = V + 3 and are never valid vocabulary ids. Documents end with the text
tokenizer's eod.

``<prefix>_latents.json`` records how the store was made (the σ-VAE tokenizer and a fingerprint of its
config and statistics, the text tokenizer), so training can check it is given the same tokenizers. Every
file is written under a temporary name and renamed into place, the .json last: a store whose .json exists
is complete.

:func:`write_interleaved` writes a dataset (tools/preprocess_interleaved.py is its command line);
:class:`LatentStore` opens and checks a store; :class:`InterleavedDataset` turns a GPTDataset or a blend
of them into LATENT_LM samples; :func:`build_interleaved_datasets` builds the train and valid ones from
``--data-path``-style prefixes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from megalatent.formats import read_format_json

STORE_FORMAT = "megalatent-interleaved-latents"
STORE_FORMAT_VERSION = 1
_INT32_MAX = np.iinfo(np.int32).max
_REMAKE_HINT = "interleaved datasets are made by tools/preprocess_interleaved.py"

Segment = Union[str, torch.Tensor]  # text, or an image [C, H, W] in [-1, 1]


def special_tokens(text_vocab_size: int) -> dict[str, int]:
    return {"boi": text_vocab_size, "eoi": text_vocab_size + 1, "latent": text_vocab_size + 2}


def vocab_size(text_vocab_size: int) -> int:
    """The mixed LatentLM's vocabulary: the text ids and the three special ones."""
    return text_vocab_size + 3


def latent_base(text_vocab_size: int) -> int:
    """Stored id of latent row 0: the first id past the vocabulary, so no stored latent id is embeddable."""
    return text_vocab_size + 3


def store_paths(data_prefix: str) -> tuple[str, str]:
    """(latents .npy, metadata .json) beside the indexed dataset ``data_prefix``.bin/.idx."""
    return f"{data_prefix}_latents.npy", f"{data_prefix}_latents.json"


# --- the σ-VAE tokenizer's identity -----------------------------------------------------------------------


def _tokenizer_identity(directory: str) -> tuple[dict, dict]:
    """(architecture config, latent statistics) of a σ-VAE tokenizer directory: what fixes its latents."""
    from megalatent.models.sigma_vae import STATS_FILE, read_tokenizer_config

    config = read_tokenizer_config(directory)["config"]
    with open(os.path.join(directory, STATS_FILE)) as f:
        stats = json.load(f)
    return config, stats


def tokenizer_fingerprint(directory: str) -> str:
    """A digest of the σ-VAE tokenizer's config and latent statistics. Retraining (or re-estimating the
    statistics) changes it, so a store made with another tokenizer of the same shape is still caught."""
    return _fingerprint(*_tokenizer_identity(directory))


def _fingerprint(config: dict, stats: dict) -> str:
    blob = json.dumps({"config": config, "stats": stats}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- the writer -------------------------------------------------------------------------------------------


@dataclass
class WriteSummary:
    data_prefix: str  # what --data-path takes
    documents: int
    tokens: int  # every stored id: text, <boi>/<eoi>, latents, eod
    images: int
    latent_rows: int
    files: list[str]


def _write_npy_from_raw(raw_path: str, npy_path: str, rows: int, latent_dim: int) -> None:
    """The raw float32 rows appended while streaming, as an .npy (whose header needs the row count)."""
    out = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(rows, latent_dim))
    if rows:
        raw = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(rows, latent_dim))
        chunk = max(1, (64 << 20) // (4 * latent_dim))  # 64 MB at a time
        for start in range(0, rows, chunk):
            out[start:start + chunk] = raw[start:start + chunk]
        del raw
    out.flush()
    del out


@torch.no_grad()
def write_interleaved(documents: Iterable[Sequence[Segment]], output_prefix: str, text_tokenizer,
                      latent_tokenizer: str, seed: int, num_images: Optional[int] = None, batch_size: int = 256,
                      device: str = "cpu", progress: bool = False) -> WriteSummary:
    """Encode ``documents`` and write ``<output_prefix>_text_document``.bin/.idx, _latents.npy, _latents.json.

    Each document is a sequence of segments: text (``str``, encoded with ``text_tokenizer``, a
    :class:`megalatent.data.tokenizer.Tokenizer`) and images (float tensors [C, H, W] in [-1, 1] of the
    σ-VAE's size and channels). Images go through the σ-VAE in ``latent_tokenizer`` in document order, in
    batches of ``batch_size``, with sampled latents from one generator seeded with ``seed``: the output is a
    function of the documents, the tokenizers, ``seed``, ``batch_size`` and ``device`` (CPU and GPU draw
    different noise). Documents are streamed; only one batch of images is held at a time.

    ``num_images`` (an upper bound on the images, when known) picks the token dtype: int32, or int64 when
    the last latent id would not fit in int32; without it int32 is used and a data set too large for it
    stops with an error that asks for it. Returns what was written.
    """
    from tqdm import tqdm

    from megalatent.data.megatron_core import IndexedDatasetBuilder
    from megalatent.models.sigma_vae import load_tokenizer

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # The identity recorded in the metadata is read beside the weights, before any work.
    config, stats = _tokenizer_identity(latent_tokenizer)
    fingerprint = _fingerprint(config, stats)
    vae = load_tokenizer(latent_tokenizer, map_location=device).eval()
    cfg = vae.cfg
    t, k = cfg.num_tokens, cfg.latent_dim
    v = text_tokenizer.vocab_size
    ids, base = special_tokens(v), latent_base(v)
    wide = num_images is not None and base + num_images * t - 1 > _INT32_MAX
    dtype = np.int64 if wide else np.int32
    data_prefix = f"{output_prefix}_text_document"
    npy_path, json_path = store_paths(data_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(data_prefix)), exist_ok=True)
    tmp = f".tmp-{os.getpid()}"
    bin_tmp, idx_tmp, raw_tmp, npy_tmp, json_tmp = (p + tmp for p in (
        data_prefix + ".bin", data_prefix + ".idx", npy_path + ".raw", npy_path, json_path))
    generator = torch.Generator(device=device).manual_seed(seed)
    image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    pending: list[torch.Tensor] = []
    counts = {"documents": 0, "tokens": 0, "images": 0}

    def encode_batch(images: list[torch.Tensor], raw) -> None:
        z = vae.tokenize(torch.stack(images).to(device=device, dtype=torch.float32), sample=True,
                         generator=generator)
        raw.write(z.float().cpu().numpy().tobytes())

    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
        with open(raw_tmp, "wb") as raw, tqdm(unit="doc", desc="encoding", disable=not progress,
                                              mininterval=1.0) as bar:
            for number, document in enumerate(documents):
                doc: list[int] = []
                for segment in document:
                    if isinstance(segment, str):
                        doc.extend(text_tokenizer.encode(segment))
                        continue
                    if not isinstance(segment, torch.Tensor) or tuple(segment.shape) != image_shape:
                        what = list(segment.shape) if isinstance(segment, torch.Tensor) else type(segment).__name__
                        raise ValueError(f"document {number}: a segment is text (str) or an image tensor "
                                         f"{list(image_shape)} (the σ-VAE's channels and size), got {what}")
                    low, high = segment.min().item(), segment.max().item()
                    if low < -1.001 or high > 1.001:
                        raise ValueError(f"document {number}: image values span [{low:g}, {high:g}]; images must be "
                                         "in [-1, 1] (x / 127.5 - 1 for 8-bit pixels)")
                    first = base + counts["images"] * t
                    if not wide and first + t - 1 > _INT32_MAX:
                        raise ValueError(f"more than {(_INT32_MAX - base) // t} images do not fit int32 token "
                                         "ids; pass num_images (an upper bound) to write int64 ids")
                    doc.append(ids["boi"])
                    doc.extend(range(first, first + t))
                    doc.append(ids["eoi"])
                    pending.append(segment)
                    counts["images"] += 1
                    if len(pending) == batch_size:
                        encode_batch(pending, raw)
                        pending.clear()
                if not doc:
                    continue  # an empty document stays out, as in tools/preprocess_data.py
                doc.append(text_tokenizer.eod)
                builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
                counts["documents"] += 1
                counts["tokens"] += len(doc)
                bar.update()
                bar.set_postfix(images=counts["images"], refresh=False)
            if pending:
                encode_batch(pending, raw)
        rows = counts["images"] * t
        builder.finalize(idx_tmp)
        _write_npy_from_raw(raw_tmp, npy_tmp, rows, k)
        metadata = {
            "format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
            "latent_dim": k, "latents_per_image": t, "rows": rows, "images": counts["images"],
            "documents": counts["documents"], "tokens": counts["tokens"], "token_dtype": np.dtype(dtype).name,
            "text_vocab_size": v, "latent_base": base, "special_tokens": ids, "eod": text_tokenizer.eod,
            "latent_tokenizer": os.path.abspath(latent_tokenizer),
            "latent_tokenizer_fingerprint": fingerprint,
            "latent_tokenizer_config": config,
            "text_tokenizer_model": os.path.abspath(text_tokenizer.model_path),
            "text_tokenizer_md5": text_tokenizer.unique_identifiers.get("model_md5"),
            "seed": seed, "batch_size": batch_size, "device": str(device),
        }
        with open(json_tmp, "w") as f:
            json.dump(metadata, f, indent=2)
            f.write("\n")
        # An old .json must not sit beside the new files while they move in: it is what marks a complete store.
        if os.path.exists(json_path):
            os.remove(json_path)
        for tmp_path, path in ((bin_tmp, data_prefix + ".bin"), (idx_tmp, data_prefix + ".idx"),
                               (npy_tmp, npy_path), (json_tmp, json_path)):
            os.replace(tmp_path, path)
    finally:
        for leftover in (bin_tmp, idx_tmp, raw_tmp, npy_tmp, json_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return WriteSummary(data_prefix, counts["documents"], counts["tokens"], counts["images"], rows,
                        [data_prefix + ".bin", data_prefix + ".idx", npy_path, json_path])


# --- the reader -------------------------------------------------------------------------------------------


class LatentStore:
    """The latent store of the interleaved dataset ``data_prefix`` (.bin/.idx), memory-mapped.

    Opening checks the metadata and that the .npy holds the rows it promises; :meth:`check` compares it
    with the tokenizers a run trains with.
    """

    def __init__(self, data_prefix: str):
        self.data_prefix = data_prefix
        self.npy_path, self.json_path = store_paths(data_prefix)
        if not os.path.isfile(self.json_path):
            raise FileNotFoundError(
                f"{self.json_path} not found: --data-path {data_prefix} has no latent store, so it is not an "
                f"interleaved text+image dataset ({_REMAKE_HINT}, which writes {data_prefix}.bin/.idx, "
                f"{os.path.basename(self.npy_path)} and {os.path.basename(self.json_path)}; a text dataset from "
                "tools/preprocess_data.py has none)")
        self.meta = meta = read_format_json(self.json_path, STORE_FORMAT, STORE_FORMAT_VERSION)
        self.latent_dim: int = meta["latent_dim"]
        self.latents_per_image: int = meta["latents_per_image"]
        self.rows: int = meta["rows"]
        self.text_vocab_size: int = meta["text_vocab_size"]
        self.latent_base: int = meta["latent_base"]
        if not os.path.isfile(self.npy_path):
            raise FileNotFoundError(f"{self.npy_path} not found, though {self.json_path} describes it; "
                                    f"re-run tools/preprocess_interleaved.py for {data_prefix}")
        try:
            self.latents = np.load(self.npy_path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.npy_path}: not a readable .npy latent store ({e}): truncated or damaged; "
                             f"re-run tools/preprocess_interleaved.py for {data_prefix}") from None
        if self.latents.shape != (self.rows, self.latent_dim) or self.latents.dtype != np.float32:
            raise ValueError(f"{self.npy_path} holds {self.latents.dtype} {list(self.latents.shape)}, but "
                             f"{self.json_path} says float32 [{self.rows}, {self.latent_dim}]; the files are from "
                             f"different runs: re-run tools/preprocess_interleaved.py for {data_prefix}")

    def check(self, latent_tokenizer: Optional[str] = None, text_tokenizer=None) -> None:
        """Raise ValueError, saying what differs, unless the store was made with these tokenizers."""
        problems = []
        if latent_tokenizer is not None:
            config, stats = _tokenizer_identity(latent_tokenizer)
            made_with = f"(made with {self.meta['latent_tokenizer']})"
            from megalatent.models.sigma_vae import SigmaVAEConfig
            tokens = SigmaVAEConfig(**config).num_tokens
            if config["latent_dim"] != self.latent_dim:
                problems.append(f"latent_dim: --latent-tokenizer {latent_tokenizer} has {config['latent_dim']}, "
                                f"the store {self.latent_dim} {made_with}")
            elif tokens != self.latents_per_image:
                problems.append(f"latents per image: --latent-tokenizer {latent_tokenizer} gives {tokens}, the "
                                f"store has {self.latents_per_image} {made_with}")
            elif _fingerprint(config, stats) != self.meta["latent_tokenizer_fingerprint"]:
                stored = self.meta.get("latent_tokenizer_config", {})
                diffs = [f"{f} ({stored.get(f)} -> {config.get(f)})" for f in sorted(set(config) | set(stored))
                         if config.get(f) != stored.get(f)]
                what = (f"its config differs in {', '.join(diffs)}" if diffs else
                        "same config, other latent statistics (retrained, or its statistics re-estimated)")
                problems.append(f"σ-VAE tokenizer fingerprint: --latent-tokenizer {latent_tokenizer} is not the "
                                f"tokenizer the store was made with {made_with}: {what}")
        if text_tokenizer is not None:
            md5 = text_tokenizer.unique_identifiers.get("model_md5")
            if text_tokenizer.vocab_size != self.text_vocab_size:
                problems.append(f"text vocabulary: --tokenizer-model {text_tokenizer.model_path} has "
                                f"{text_tokenizer.vocab_size} ids, the store was made with {self.text_vocab_size} "
                                f"({self.meta['text_tokenizer_model']})")
            elif md5 is not None and self.meta.get("text_tokenizer_md5") not in (None, md5):
                problems.append(f"text tokenizer: --tokenizer-model {text_tokenizer.model_path} is not the model "
                                f"the store was made with ({self.meta['text_tokenizer_model']}; other md5)")
        if problems:
            raise ValueError(f"{self.json_path}: the interleaved dataset does not match this run: "
                             + "; ".join(problems) + ". Train with the tokenizers it was made with, or re-make it "
                             "with these (tools/preprocess_interleaved.py)")

    # Pickled (e.g. into DataLoader workers) without the memory map, which would be copied whole; reopened.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "latents": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.latents = np.load(self.npy_path, mmap_mode="r")

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Latents of ``rows`` (int64 array), [len(rows), latent_dim]."""
        return torch.from_numpy(np.ascontiguousarray(self.latents[rows]))


class InterleavedDataset:
    """LATENT_LM samples from a megatron-core GPTDataset, or a BlendedDataset of them, over interleaved data.

    The wrapped dataset gives windows of stored ids (``tokens``, and ``labels`` = the next ids); here the
    latent ids become the placeholder with their latents beside them:

        tokens[i]          the id, or the placeholder where it is a latent (latent_mask 1, latents[i] = z)
        labels[i]          the next id, or the placeholder where it is a latent (loss_mask 0 there)
        target_latents[i]  the next latent where the next id is one (diffusion_mask 1 there)

    ``stores``: one :class:`LatentStore` per dataset prefix; a blend's samples are matched to theirs by the
    path of the dataset they come from.
    """

    def __init__(self, dataset, stores: Sequence[LatentStore]):
        if not stores:
            raise ValueError("InterleavedDataset needs the latent store of each dataset")
        by_prefix = {os.path.abspath(s.data_prefix): s for s in stores}
        parts = getattr(dataset, "datasets", None)  # a BlendedDataset's, in dataset_id order
        paths = [d.dataset_path for d in parts] if parts is not None else [dataset.dataset_path]
        missing = [p for p in paths if os.path.abspath(p) not in by_prefix]
        if missing:
            raise ValueError(f"no latent store given for the dataset(s) {missing}")
        self.dataset = dataset
        self.stores = [by_prefix[os.path.abspath(p)] for p in paths]
        first = self.stores[0]
        for s in self.stores[1:]:
            if (s.latent_dim, s.text_vocab_size) != (first.latent_dim, first.text_vocab_size):
                raise ValueError(f"{s.json_path} (latent_dim {s.latent_dim}, text vocabulary {s.text_vocab_size}) "
                                 f"and {first.json_path} ({first.latent_dim}, {first.text_vocab_size}) cannot be "
                                 "blended: make them with the same tokenizers")
        self.ids = special_tokens(first.text_vocab_size)
        self.latent_base = first.latent_base
        self.latent_dim = first.latent_dim

    def __len__(self) -> int:
        return len(self.dataset)

    def _rows(self, ids: torch.Tensor, store: LatentStore, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """(latent mask, the store rows of the latent ids), after checking every id is valid."""
        is_latent = ids >= self.latent_base
        bad = (ids < 0) | ((ids >= self.ids["latent"]) & ~is_latent)
        rows = (ids[is_latent] - self.latent_base).numpy()
        if bool(bad.any()) or (rows.size and rows.max() >= store.rows):
            wrong = ids[bad].tolist()[:3] or [int(rows.max()) + self.latent_base]
            raise ValueError(f"sample {index} holds ids {wrong}, which are neither text/<boi>/<eoi> ids (< "
                             f"{self.ids['latent']}) nor latent ids of the {store.rows} rows of {store.npy_path} "
                             f"(from {self.latent_base}); {store.data_prefix}.bin/.idx and its latent store do not "
                             "belong together: re-run tools/preprocess_interleaved.py")
        return is_latent, rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        store = self.stores[int(sample.get("dataset_id", 0))]
        tokens, labels = sample["tokens"].long(), sample["labels"].long()
        latent_mask, token_rows = self._rows(tokens, store, index)
        diffusion, label_rows = self._rows(labels, store, index)
        s, placeholder = tokens.shape[0], self.ids["latent"]
        latents = torch.zeros(s, self.latent_dim)
        latents[latent_mask] = store.gather(token_rows)
        target_latents = torch.zeros(s, self.latent_dim)
        target_latents[diffusion] = store.gather(label_rows)
        return {"tokens": torch.where(latent_mask, placeholder, tokens), "position_ids": sample["position_ids"].long(),
                "latents": latents, "latent_mask": latent_mask,
                "labels": torch.where(diffusion, placeholder, labels),
                "loss_mask": sample["loss_mask"].float() * (~diffusion).float(),
                "target_latents": target_latents, "diffusion_mask": diffusion.float()}


def open_latent_stores(data_prefixes: Sequence[str], latent_tokenizer: Optional[str] = None,
                       text_tokenizer=None) -> list[LatentStore]:
    """The stores of ``data_prefixes``, each checked against the run's tokenizers (ValueError /
    FileNotFoundError naming the file otherwise). Cheap: call it with the other checks, before work."""
    stores = [LatentStore(prefix) for prefix in data_prefixes]
    for store in stores:
        store.check(latent_tokenizer, text_tokenizer)
    return stores


def build_interleaved_datasets(data_prefixes: Sequence[str], weights: Optional[Sequence[float]], split: str,
                               seq_length: int, seed: int, tokenizer, num_samples: tuple[int, int, int],
                               cache_dir: Optional[str], latent_tokenizer: Optional[str] = None):
    """(train, valid) InterleavedDatasets (None for a split with zero share) of a ``--data-path`` blend.

    The arguments are :func:`megalatent.data.gpt_data.build_gpt_datasets`'s (``tokenizer`` is the text
    tokenizer), plus the σ-VAE tokenizer directory the run trains with, which every store must have been
    made with (checked first, before the dataset indices are built).
    """
    from megalatent.data.gpt_data import build_gpt_datasets

    stores = open_latent_stores(data_prefixes, latent_tokenizer, tokenizer)
    train, valid, _ = build_gpt_datasets(data_prefixes, weights, split, seq_length, seed, tokenizer, num_samples,
                                         cache_dir)
    return tuple(None if ds is None else InterleavedDataset(ds, stores) for ds in (train, valid))
