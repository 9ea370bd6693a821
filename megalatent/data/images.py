"""A default image data set that needs no download: scikit-learn's handwritten digits.

scikit-learn ships the UCI optical-digits test set inside its wheel (1,797 grey 8x8 images of the
digits 0-9, pixel values 0..16), so any machine with `pip install scikit-learn` (the `vision` extra)
can train the σ-VAE tokenizer and a class-conditional LatentLM end to end without fetching data.

Images come out as float32 tensors [N, 1, size, size] in [-1, 1] (the range the tokenizer's
reconstruction loss and the usual image pipelines assume), with int64 labels [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_SIZE = 8  # native resolution of the scikit-learn digits
DIGITS_MAX_VALUE = 16.0  # pixel values are counts of set pixels in 4x4 blocks: 0..16
DIGITS_NUM_CLASSES = 10


def _import_sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError(
            "the embedded digits images ship with scikit-learn: pip install scikit-learn "
            "(or pip install -e '.[vision]')"
        ) from None
    return datasets


def load_digits(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images [N, 1, image_size, image_size] in [-1, 1], labels [N])``.

    ``image_size`` must be a multiple of 8; larger sizes are bilinear upsamplings of the 8x8 originals
    (smooth strokes, so that a patch tokenizer with patch > 1 has something to compress).
    """
    if image_size < DIGITS_SIZE or image_size % DIGITS_SIZE:
        raise ValueError(f"image_size={image_size}: the digits are {DIGITS_SIZE}x{DIGITS_SIZE}; "
                         f"choose a multiple of {DIGITS_SIZE}")
    digits = _import_sklearn_datasets().load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    images = images / (DIGITS_MAX_VALUE / 2) - 1.0
    if image_size != DIGITS_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp_(-1.0, 1.0), torch.tensor(digits.target, dtype=torch.int64)


class DigitsDataset(Dataset):
    """The digits as a map-style Dataset of ``(image [1, S, S], label)``, with a fixed train/valid split.

    The split is a permutation drawn from ``split_seed``, identical on every rank and every run, so a
    validation reconstruction error is comparable across runs; ``split="all"`` keeps every image.
    """

    SPLITS = ("train", "valid", "all")

    def __init__(self, split: str = "train", image_size: int = 16, valid_fraction: float = 0.1,
                 split_seed: int = 0):
        if split not in self.SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(self.SPLITS)}")
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction={valid_fraction}: must be in (0, 1)")
        images, labels = load_digits(image_size)
        if split != "all":
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
            num_valid = round(len(images) * valid_fraction)
            keep = order[:num_valid] if split == "valid" else order[num_valid:]
            images, labels = images[keep], labels[keep]
        self.images, self.labels = images, labels
        self.num_classes = DIGITS_NUM_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
