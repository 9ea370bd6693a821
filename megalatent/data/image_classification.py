"""Image-classification batches for the trainer (an image classifier, e.g. a dilated ViT), resumable like the language models' loaders.

`--data-path DIR` (an image folder `DIR/<class>/<image>` or a list file of `path label` lines) streams
files through megalatent/data/image_pipeline.py (NVIDIA DALI when installed, else PIL + torch), resized to
--img-h x --img-w and scaled to [-1, 1], each data-parallel rank reading its shard of a per-epoch
permutation. Without it, the embedded scikit-learn digits (megalatent/data/images.py) in Megatron's
sample order, so a LongViT demo needs no download.
"""
from __future__ import annotations

import torch

from megalatent.config import Config
from megalatent.data.gpt_data import MicroBatchLoader


class LabelledImages:
    """(image, label) pairs -> {"images", "labels"} samples, images repeated to `channels` if grey."""

    def __init__(self, pairs, channels: int):
        self.pairs, self.channels = pairs, channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image, label = self.pairs[index]
        if image.shape[0] == 1 and self.channels > 1:
            image = image.expand(self.channels, *image.shape[1:])
        return {"images": image, "labels": label}


def digits_errors(cfg: Config) -> list[str]:
    """Why the embedded digits cannot feed this config (empty when they can)."""
    m, e = cfg.model, []
    if m.img_h != m.img_w or m.img_h % 8:
        e.append(f"the embedded digits are square multiples of 8 pixels: --img-h and --img-w must be equal "
                 f"multiples of 8, got {m.img_h} x {m.img_w}")
    if m.num_classes < 10:
        e.append(f"the embedded digits have 10 classes: --num-classes must be >= 10, got {m.num_classes}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        e.append("the embedded digits ship with scikit-learn: pip install scikit-learn (or the [vision] extra)")
    return e


class PipelineBatches:
    """An ImagePipeline as the trainer's loader: per step, the rank's micro-batches of the global batch."""

    def __init__(self, pipeline, micro_batches: int, global_batch_size: int):
        self.pipeline, self.micro_batches, self.global_batch_size = pipeline, micro_batches, global_batch_size
        self.consumed_samples = 0

    def next_global_batch(self) -> list[dict]:
        self.consumed_samples += self.global_batch_size
        return [self.pipeline.next_batch() for _ in range(self.micro_batches)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "pipeline": self.pipeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self.pipeline.load_state_dict(state["pipeline"])


def build_image_loaders(cfg: Config, layout, keys: dict[str, torch.dtype]):
    """(train loader, valid loader or None) for --data-path images, or the embedded digits without it; `keys`:
    the objective's batch keys (images, labels)."""
    if cfg.data.data_path is None:
        return build_digits_loaders(cfg, layout, keys)
    from megalatent.data.image_pipeline import ImagePipeline

    t, m = cfg.training, cfg.model
    pipeline = ImagePipeline(cfg.data.data_path[0], batch_size=t.micro_batch_size, channels=m.num_channels,
                             resize_to=(m.img_h, m.img_w), mean=(0.5,) * m.num_channels,
                             std=(0.5,) * m.num_channels, rank=layout.dp_rank, world_size=layout.dp,
                             seed=t.seed, device_id=torch.cuda.current_device() if torch.cuda.is_available() else None)
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    return PipelineBatches(pipeline, micro_batches, t.global_batch_size), None  # no held-out split of a folder


def build_digits_loaders(cfg: Config, layout, keys: dict[str, torch.dtype]):
    from megalatent.data.images import DigitsDataset

    t = cfg.training

    def loader(split: str) -> MicroBatchLoader:
        images = LabelledImages(DigitsDataset(split, image_size=cfg.model.img_h), cfg.model.num_channels)
        return MicroBatchLoader(images, t.micro_batch_size, t.global_batch_size, layout.dp_rank, layout.dp,
                                keys=keys)

    return loader("train"), (loader("valid") if t.eval_interval else None)
