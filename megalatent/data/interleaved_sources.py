"""Document sources for tools/preprocess_interleaved.py: JSONL files of text and image segments, and the
embedded digits as captioned images (a demo that needs no download).

Each yields documents as :func:`megalatent.data.interleaved.write_interleaved` takes them: lists of text
strings and image tensors [C, S, S] in [-1, 1] at the σ-VAE's channels and size.

JSONL: one document per line, ``{"segments": [{"text": "..."}, {"image": "path"}, ...]}``, image paths
relative to the JSONL file's directory (or absolute). :func:`scan_jsonl` reads every line and checks every
image file exists before any image is decoded, so a bad line or a missing file stops the run before work.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from typing import Iterator, Sequence

import numpy as np
import torch

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _segments(path: str, line_number: int, line: str) -> list[tuple[str, str]]:
    """[("text", text) | ("image", absolute path)] of one JSONL line; ValueError naming file:line."""
    where = f"{path}:{line_number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err})") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        raise ValueError(f'{where}: expected an object {{"segments": [{{"text": ...}} or {{"image": path}}, ...]}}')
    segments = []
    for i, segment in enumerate(obj["segments"]):
        kinds = [k for k in ("text", "image") if isinstance(segment, dict) and k in segment]
        if len(kinds) != 1 or len(segment) != 1 or not isinstance(segment[kinds[0]], str):
            raise ValueError(f'{where}: segment {i} is {json.dumps(segment)[:80]}; a segment is {{"text": "..."}} '
                             'or {"image": "path"}')
        if kinds[0] == "text":
            segments.append(("text", segment["text"]))
        else:
            image = os.path.join(os.path.dirname(os.path.abspath(path)), segment["image"])
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{where}: segment {i}: image file {image} not found (image paths are "
                                        "relative to the JSONL file's directory)")
            segments.append(("image", image))
    return segments


def _lines(inputs: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield path, line_number, line


def scan_jsonl(inputs: Sequence[str]) -> tuple[int, int]:
    """Check every line and image file of ``inputs``; returns (documents, images)."""
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} not found")
    documents = images = 0
    for path, line_number, line in _lines(inputs):
        documents += 1
        images += sum(kind == "image" for kind, _ in _segments(path, line_number, line))
    return documents, images


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
    """A PNG/JPEG as float32 [channels, S, S] in [-1, 1]: the shorter side resized to S (PIL's antialiased
    bicubic, so large photos do not alias), the centre S x S crop, grey or RGB, x / 127.5 - 1 (as
    data/images.py)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        w, h = image.size
        scale = image_size / min(w, h)
        rw, rh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - image_size) // 2, (rh - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(image, dtype=np.float32).reshape(image_size, image_size, -1)
    return np.ascontiguousarray(array.transpose(2, 0, 1)) / np.float32(127.5) - np.float32(1.0)


def _load_document(job: tuple[str, int, str, int, int]) -> list:
    """One JSONL line's segments, images decoded (numpy: what crosses a process boundary cheaply)."""
    path, line_number, line, image_size, channels = job
    return [value if kind == "text" else load_image(value, image_size, channels)
            for kind, value in _segments(path, line_number, line)]


def iter_jsonl_documents(inputs: Sequence[str], image_size: int, channels: int, workers: int = 1) -> Iterator[list]:
    """The documents of ``inputs`` (check them with :func:`scan_jsonl` first), in file order; with
    ``workers`` > 1 the images are decoded in that many processes (the order, and so the output, is the same)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = ((path, number, line, image_size, channels) for path, number, line in _lines(inputs))
    if workers == 1:
        documents = map(_load_document, jobs)
        yield from ([s if isinstance(s, str) else torch.from_numpy(s) for s in doc] for doc in documents)
        return
    with multiprocessing.Pool(workers) as pool:
        for doc in pool.imap(_load_document, jobs, chunksize=16):
            yield [s if isinstance(s, str) else torch.from_numpy(s) for s in doc]


def digit_caption(label: int) -> str:
    """The caption of a digit in the demo documents (and the prompt that asks for one)."""
    return f"a handwritten {DIGIT_NAMES[label]}."


def digits_documents(image_size: int, channels: int, caption_dropout: float, seed: int) -> tuple[list, int]:
    """One document per embedded digit (all 1,797, in data set order): "a handwritten seven." then the image;
    a ``caption_dropout`` share of them (drawn from ``seed``) is the image alone, the unconditional examples
    classifier-free guidance needs. Returns (documents, images)."""
    from megalatent.data.images import DigitsDataset

    if not 0 <= caption_dropout <= 1:
        raise ValueError(f"caption dropout must be in [0, 1], got {caption_dropout}")
    data = DigitsDataset("all", image_size=image_size)
    images = data.images.expand(-1, channels, -1, -1) if channels != 1 else data.images
    drop = torch.rand(len(images), generator=torch.Generator().manual_seed(seed)) < caption_dropout
    documents = [[image] if dropped else [digit_caption(label), image]
                 for image, label, dropped in zip(images, data.labels.tolist(), drop.tolist())]
    return documents, len(documents)
