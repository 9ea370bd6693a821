"""Image-classification batches for the trainer (LongViT): a dataset of (image, label) pairs as the
same resumable, Megatron-ordered micro-batches the language models use.

Without a dataset argument the embedded scikit-learn digits are used (megalatent/data/images.py), so a
LongViT demo needs no download.
"""
from __future__ import annotations

from megalatent.config import Config
from megalatent.data.gpt_data import MicroBatchLoader
from megalatent.training.objectives import IMAGE_CLASSIFICATION


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


def build_digits_loaders(cfg: Config, layout):
    from megalatent.data.images import DigitsDataset

    t = cfg.training

    def loader(split: str) -> MicroBatchLoader:
        images = LabelledImages(DigitsDataset(split, image_size=cfg.model.img_h), cfg.model.num_channels)
        return MicroBatchLoader(images, t.micro_batch_size, t.global_batch_size, layout.dp_rank, layout.dp,
                                keys=IMAGE_CLASSIFICATION.batch_keys)

    return loader("train"), (loader("valid") if t.eval_interval else None)
