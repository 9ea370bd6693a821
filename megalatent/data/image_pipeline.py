"""Image batches from JPEG/PNG files: NVIDIA DALI where installed, plain PIL + torch where not.

A source is a list of ``(path, label)`` pairs, read from an ImageFolder-style tree (``root/<class>/<file>``,
classes numbered in sorted order) or from a list file of ``path label`` lines. :class:`ImagePipeline`
decodes, resizes (shorter side, or straight to ``H x W``), center-crops, normalises ``(x/255 - mean)/std``
and batches them, each data-parallel rank taking its own shard of a per-epoch permutation drawn from
``seed``, and returns ``{"images": float32 [B, C, H, W], "labels": int64 [B]}``.

Both backends consume the same order (:class:`EpochOrder`), so they hand out the same images in the same
batches; DALI gets the encoded files through ``fn.external_source`` for that reason (``fn.readers.file``
shuffles with its own generator, which no other backend could follow).

- ``backend="dali"``: a ``@pipeline_def`` with ``fn.decoders.image`` (``device="mixed"``: GPU decoding,
  when ``device_id`` is a GPU index; ``"cpu"`` with ``device_id=None``), ``fn.resize`` and
  ``fn.crop_mirror_normalize``. Prefetching runs decoding ahead of the training step.
- ``backend="torch"``: PIL decoding and torch ops in the calling process (no torchvision), written to
  reproduce DALI's arithmetic: nearest-neighbour sampling at pixel centres in DALI's float32 arithmetic
  (``INTERP_NN``), output sizes and crop offsets rounded half up, normalisation as ``(x - 255 mean) * (1 / (255 std))``.
- ``backend="auto"``: DALI when ``nvidia.dali`` imports, else torch.

What is identical and what is not (checked against DALI 2.4 CPU pipelines in tests/test_image_pipeline.py):
PNG decoding, nearest-neighbour resizing, cropping and normalisation give bit-identical tensors.
``interpolation="linear"`` (bilinear, no antialiasing) rounds to 8 bits differently in a few pixels:
within 1 grey level, i.e. ``1 / (255 std)`` after normalisation. ``channels=1`` is exact for grey files;
from colour files PIL's and DALI's RGB -> grey conversions differ by 1 grey level in about half the pixels. JPEG decoders (libjpeg-turbo in PIL,
nvImageCodec/nvJPEG in DALI) may differ by a few grey levels. The GPU ("mixed") path is not compared here:
its resize kernels may round pixel positions differently from DALI's CPU ones.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BACKENDS = ("auto", "dali", "torch")
INTERPOLATIONS = ("nearest", "linear")


# ---------------------------------------------------------------------------------------------------------
# Sources: (path, label) pairs
# ---------------------------------------------------------------------------------------------------------

def image_folder(root: str) -> list[tuple[str, int]]:
    """``root/<class>/<file>`` as (path, label) pairs; classes numbered in sorted name order (as ImageFolder)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (expected root/<class>/<image>)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = [(os.path.join(root, c, f), label)
               for label, c in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(root, c)))
               if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise ValueError(f"image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files in class "
                         f"sub-folders (found {len(classes)} sub-folders; expected root/<class>/<image>)")
    return samples


def read_file_list(list_file: str) -> list[tuple[str, int]]:
    """A list file of ``path label`` lines as (path, label) pairs; relative paths are relative to the file.

    The label is the last field, so paths may contain spaces. Blank lines and ``#`` comments are skipped.
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"image list file {list_file!r} does not exist (expected 'path label' lines)")
    base, samples = os.path.dirname(os.path.abspath(list_file)), []
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"image list file {list_file}: not UTF-8 text ({e.reason} at byte {e.start}); expected "
                         "'path label' lines") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        if not path or not label.isdigit():
            raise ValueError(f"{list_file}:{lineno}: expected 'path label' with a label >= 0, got {line!r}")
        samples.append((os.path.join(base, path.strip()), int(label)))
    if not samples:
        raise ValueError(f"image list file {list_file!r} lists no images")
    return samples


# ---------------------------------------------------------------------------------------------------------
# Order: which files each rank reads in which batch
# ---------------------------------------------------------------------------------------------------------

class EpochOrder:
    """Per-epoch permutation of the samples, cut into global batches of ``batch_size * world_size``.

    Every rank draws the same permutation from ``(seed, epoch)`` and takes the ``rank``-th slice of
    each global batch, so the ranks together read every sample at most once per epoch and exactly once
    when the data set is a multiple of ``batch_size * world_size``; the remainder (fewer than one global
    batch, a different subset every epoch when shuffled) is dropped so that all ranks run the same
    number of steps.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, permutation): O(N) to draw

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                    else np.arange(self.num_samples))
            self._cached = (epoch, perm)
        return self._cached[1]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Sample indices of this rank's ``index``-th batch in ``epoch``."""
        start = (index * self.world_size + self.rank) * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]


# ---------------------------------------------------------------------------------------------------------
# Transform: sizes and offsets, computed the way DALI computes them
# ---------------------------------------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class ImageTransform:
    """Resize, center crop and normalisation settings shared by both backends."""

    channels: int = 3
    resize_shorter: int | None = None
    resize_to: tuple[int, int] | None = None  # (H, W)
    crop: tuple[int, int] | None = None  # (H, W), centered
    interpolation: str = "nearest"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def errors(self) -> list[str]:
        e = []
        if self.channels not in (1, 3):
            e.append(f"channels={self.channels}: 1 (grey) or 3 (RGB)")
        if self.resize_shorter is not None and self.resize_to is not None:
            e.append("give resize_shorter or resize_to, not both")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            e.append(f"resize_shorter={self.resize_shorter}: must be >= 1")
        for name in ("resize_to", "crop"):
            size = getattr(self, name)
            if size is not None and (len(size) != 2 or min(size) < 1):
                e.append(f"{name}={size}: expected (height, width) >= 1")
        if self.interpolation not in INTERPOLATIONS:
            e.append(f"interpolation={self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                e.append(f"{name}={getattr(self, name)}: one value or one per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            e.append(f"std={self.std}: must be positive")
        return e

    def per_channel(self, values: tuple[float, ...]) -> list[float]:
        return list(values) * self.channels if len(values) == 1 else list(values)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """Output size of the resize step; DALI scales the longer side and rounds it half up."""
        if self.resize_to is not None:
            return tuple(self.resize_to)
        if self.resize_shorter is not None:
            s = self.resize_shorter
            return (s, _round_half_up(w * s / h)) if h <= w else (_round_half_up(h * s / w), s)
        return h, w

    def crop_offset(self, h: int, w: int) -> tuple[int, int]:
        """Top-left corner of the centered crop: DALI's crop_pos 0.5, rounded half up."""
        ch, cw = self.crop
        if ch > h or cw > w:
            raise ValueError(f"crop {self.crop} is larger than the resized image {h} x {w}; "
                             f"resize to at least the crop size")
        return _round_half_up((h - ch) * 0.5), _round_half_up((w - cw) * 0.5)


# ---------------------------------------------------------------------------------------------------------
# Backends: one batch of (paths, labels) -> tensors
# ---------------------------------------------------------------------------------------------------------

# DALI's CPU INTERP_NN (ResampleNN, DALI 2.4) samples the source pixel under each output pixel's centre,
# floor((i + 0.5) * in / out), in float32: columns as (i + 0.5f) * scale, rows as a running sum
# 0.5f * scale + scale + ... . Where the exact value is an integer, float32 rounding picks the pixel
# above or below it, so only the same float32 arithmetic gives the same pixels.

@functools.lru_cache(maxsize=256)
def _nearest_cols(size_in: int, size_out: int) -> torch.Tensor:
    scale = np.float32(size_in) / np.float32(size_out)
    src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale
    return torch.from_numpy(np.clip(np.floor(src), 0, size_in - 1).astype(np.int64))


@functools.lru_cache(maxsize=256)
def _nearest_rows(size_in: int, size_out: int) -> torch.Tensor:
    scale = np.float32(size_in) / np.float32(size_out)
    steps = np.full(size_out, scale, dtype=np.float32)
    steps[0] = np.float32(0.5) * scale
    src = np.cumsum(steps, dtype=np.float32)  # sequential float32 additions, as DALI's loop
    return torch.from_numpy(np.clip(np.floor(src), 0, size_in - 1).astype(np.int64))


class _TorchBackend:
    """PIL decoding + torch resize/crop/normalise, following DALI's arithmetic (see the module docstring)."""

    def __init__(self, transform: ImageTransform):
        self.t = transform
        # DALI takes mean and std in pixel units (scaled in double precision, stored as float32) and
        # multiplies by the float32 reciprocal of std; doing the same gives bit-identical outputs.
        self.mean255 = torch.tensor([m * 255 for m in transform.per_channel(transform.mean)]).view(-1, 1, 1)
        self.inv_std255 = 1 / torch.tensor([s * 255 for s in transform.per_channel(transform.std)]).view(-1, 1, 1)

    def decode(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if self.t.channels == 3 else "L"))
        # One copy into contiguous CHW: strided views make the resize and the batching several times slower.
        return torch.from_numpy(np.array(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1), order="C"))

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [C, h, w] -> uint8 [C, H, W]."""
        h, w = image.shape[1:]
        oh, ow = self.t.resized_size(h, w)
        if (oh, ow) == (h, w):
            return image
        if self.t.interpolation == "nearest":
            return image[:, _nearest_rows(h, oh)][:, :, _nearest_cols(w, ow)]
        out = torch.nn.functional.interpolate(image[None].float(), size=(oh, ow), mode="bilinear",
                                              align_corners=False, antialias=False)[0]
        return (out + 0.5).floor_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, paths: Sequence[str], labels: Sequence[int]) -> dict:
        images = []
        for path in paths:
            image = self.resize(self.decode(path))
            if self.t.crop is not None:
                top, left = self.t.crop_offset(*image.shape[1:])
                image = image[:, top:top + self.t.crop[0], left:left + self.t.crop[1]]
            images.append(image)
        sizes = [tuple(i.shape[1:]) for i in images]
        if len(set(sizes)) > 1:
            raise ValueError(f"images of different sizes cannot be batched (H, W: {sorted(set(sizes))[:2]}, "
                             f"e.g. {paths[0]}); set crop or resize_to")
        x = torch.stack(images).float()
        return {"images": (x - self.mean255) * self.inv_std255,
                "labels": torch.tensor(list(labels), dtype=torch.int64)}


class _DaliFeed:
    """The encoded files of each batch, in :class:`EpochOrder`, for ``fn.external_source``.

    DALI calls ``iter()`` at the start and after every ``pipeline.reset()`` (``cycle="raise"``), and runs
    ahead of the consumer by its prefetch depth; each ``iter()`` starts the next epoch.
    """

    def __init__(self, samples, order: EpochOrder, epoch: int, start_batch: int):
        self.samples, self.order = samples, order
        self.next_epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        self.epoch, self.index = self.next_epoch, self.start_batch
        self.next_epoch, self.start_batch = self.epoch + 1, 0
        return self

    def __next__(self):
        if self.index >= self.order.batches_per_epoch:
            raise StopIteration
        chosen = [self.samples[i] for i in self.order.batch(self.epoch, self.index)]
        self.index += 1
        encoded = [np.fromfile(path, dtype=np.uint8) for path, _ in chosen]
        return encoded, [np.array([label], dtype=np.int64) for _, label in chosen]


class _DaliBackend:
    """A DALI pipeline fed by :class:`_DaliFeed`; CPU operators with ``device_id=None``, GPU decoding else."""

    def __init__(self, samples, order: EpochOrder, transform: ImageTransform, epoch: int, start_batch: int,
                 device_id: int | None, num_threads: int, prefetch: int):
        from nvidia.dali import fn, pipeline_def, types

        t, self.device_id = transform, device_id
        resize_args = {}
        if t.resize_shorter is not None:
            resize_args["resize_shorter"] = float(t.resize_shorter)
        elif t.resize_to is not None:
            resize_args["resize_y"], resize_args["resize_x"] = map(float, t.resize_to)
        interp = types.INTERP_NN if t.interpolation == "nearest" else types.INTERP_LINEAR
        crop_args = {"crop": tuple(t.crop), "crop_pos_x": 0.5, "crop_pos_y": 0.5} if t.crop else {}

        @pipeline_def(batch_size=order.batch_size, num_threads=num_threads, device_id=device_id,
                      prefetch_queue_depth=prefetch)
        def pipeline():
            encoded, labels = fn.external_source(source=_DaliFeed(samples, order, epoch, start_batch),
                                                 num_outputs=2, batch=True, cycle="raise")
            images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                       output_type=types.RGB if t.channels == 3 else types.GRAY)
            if resize_args:
                # subpixel_scale=False: scale by in/out of the rounded size, as the torch backend does.
                images = fn.resize(images, interp_type=interp, antialias=False, subpixel_scale=False,
                                   **resize_args)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=[m * 255 for m in t.per_channel(t.mean)],
                std=[s * 255 for s in t.per_channel(t.std)], **crop_args)
            return images, labels

        self.pipe = pipeline()
        self.pipe.build()

    def __call__(self) -> dict:
        try:
            images, labels = self.pipe.run()
        except StopIteration:  # epoch over: reset() re-iterates the feed, which starts the next epoch
            self.pipe.reset()
            images, labels = self.pipe.run()
        if not images.is_dense_tensor():
            sizes = sorted({tuple(images[i].shape()) for i in range(len(images))})
            raise ValueError(f"images of different sizes cannot be batched (C, H, W: {sizes[:2]}); "
                             f"set crop or resize_to")
        images = self._to_torch(images)
        return {"images": images, "labels": torch.from_numpy(np.array(labels.as_tensor())).view(-1).to(images.device)}

    def _to_torch(self, images) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(images.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(images.as_tensor().shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------

class ImagePipeline:
    """Batches ``{"images": float32 [B, C, H, W], "labels": int64 [B]}`` for one data-parallel rank.

    ``source`` is an image folder, a list file (``path label`` lines), or a list of (path, label) pairs.
    ``next_batch()`` runs on through the epochs; iterating yields the rest of the current epoch.
    ``state_dict()`` / ``load_state_dict()`` hold (epoch, batch) for resuming: the order is a function of
    ``seed`` and the epoch, so a resumed run reads the same batches as one that never stopped.
    DALI outputs land on GPU ``device_id`` (or CPU with ``device_id=None``); the torch backend's on CPU.
    """

    def __init__(self, source: str | Sequence[tuple[str, int]], *, batch_size: int, channels: int = 3,
                 resize_shorter: int | None = None, resize_to: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = None, interpolation: str = "nearest",
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 backend: str = "auto", device_id: int | None = None, num_threads: int = 2, prefetch: int = 2):
        self.transform = ImageTransform(channels, resize_shorter, tuple(resize_to) if resize_to else None,
                                        tuple(crop) if crop else None, interpolation, tuple(mean), tuple(std))
        errors = self.transform.errors()
        if backend not in BACKENDS:
            errors.append(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            errors.append(f"batch_size={batch_size}: must be >= 1")
        if seed < 0:
            errors.append(f"seed={seed}: must be >= 0")
        if not 0 <= rank < world_size:
            errors.append(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if backend == "torch" and device_id is not None:
            errors.append("device_id is for DALI's GPU decoding; the torch backend decodes on the CPU")
        if errors:
            raise ValueError("ImagePipeline: " + "; ".join(errors))
        if backend == "auto":
            backend = "dali" if dali_available() else "torch"
        elif backend == "dali" and not dali_available():
            raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or pip install -e '.[vision]'); backend='torch' needs only pillow")
        self.backend = backend

        if isinstance(source, str):
            if not os.path.exists(source):
                raise FileNotFoundError(f"image source {source!r} does not exist: expected an image folder "
                                        f"(root/<class>/<image>) or a list file of 'path label' lines")
            self.samples = image_folder(source) if os.path.isdir(source) else read_file_list(source)
        else:
            self.samples = list(source)
            if not self.samples:
                raise ValueError("ImagePipeline: the sample list is empty")
        self.order = EpochOrder(len(self.samples), batch_size, rank, world_size, seed, shuffle)
        if self.order.batches_per_epoch == 0:
            raise ValueError(f"{len(self.samples)} images make no full batch of {batch_size} per rank "
                             f"on {world_size} ranks; lower the batch size")
        self.epoch, self.batch_index = 0, 0
        self._dali_args = (device_id, num_threads, prefetch)
        self._impl = None  # built on the first batch, after a possible load_state_dict

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        if self._impl is not None and self.backend == "dali":
            raise RuntimeError("load_state_dict must come before the first batch: DALI has prefetched already")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def next_batch(self) -> dict:
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        if self._impl is None:
            self._impl = _DaliBackend(self.samples, self.order, self.transform, self.epoch, self.batch_index,
                                      *self._dali_args) if self.backend == "dali" \
                else _TorchBackend(self.transform)
        if self.backend == "dali":
            batch = self._impl()
        else:
            chosen = [self.samples[i] for i in self.order.batch(self.epoch, self.batch_index)]
            batch = self._impl([p for p, _ in chosen], [label for _, label in chosen])
        self.batch_index += 1
        return batch

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch (all of them if it has not started)."""
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        while self.batch_index < self.batches_per_epoch:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch
