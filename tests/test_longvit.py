"""LongViT (models.md §6): the non-causal dilated-attention ViT; context parallelism over 2 and 4 ranks
equals one device (logits and gradients); positions interpolate to other image sizes; patches are
embedded band by band exactly as all at once."""
import json
import os
import sys

import pytest
import torch

from conftest import REPO
from launcher import launch
from megalatent.config import ConfigError
from megalatent.families import parse_args, validate
from megalatent.models.longvit import PatchEmbedding, interpolate_positions
from megalatent.families import build_model

sys.path.insert(0, os.path.join(REPO, "tests"))
from longvit_worker import FLAGS  # noqa: E402


@pytest.mark.parametrize("nproc", [2, 4])
def test_context_parallel_equals_one_device(tmp_path, nproc):
    out = str(tmp_path / "errors.json")
    proc = launch([os.path.join(REPO, "tests", "longvit_worker.py"), out], nproc, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = json.load(open(out))
    assert errors["logits"] < 1e-5
    assert errors["grads"] and max(errors["grads"].values()) < 1e-4, errors["grads"]


def test_patch_embedding_by_bands_equals_whole_image():
    embed = PatchEmbedding(3, 4, 16, band_rows=3)
    images = torch.randn(2, 3, 32, 48)
    whole = embed.proj(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(images, 0, 96), whole)
    torch.testing.assert_close(embed(images, 17, 61), whole[:, 17:61])  # ranges not on row boundaries


def test_positions_interpolate_to_larger_images():
    model = build_model(parse_args(FLAGS).model)
    table = model.positions.detach()
    assert interpolate_positions(table, (8, 12), (8, 12)) is table
    assert interpolate_positions(table, (8, 12), (16, 24)).shape == (16 * 24, 32)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5)  # 4x the patches of the training size


def test_longvit_config_errors():
    with pytest.raises(ConfigError) as err:
        validate(parse_args(FLAGS[:FLAGS.index("--seq-length")] + ["--seq-length", "100"] +
                            FLAGS[FLAGS.index("--seq-length") + 2:]))
    message = str(err.value)
    assert "--seq-length 96" in message  # the patch count the image gives
    assert "equal multiples of 8" in message and "--num-classes must be >= 10" in message  # the digits' shape


def test_training_on_digits_with_context_parallelism_equals_one_process(corpus_cache):
    """The trainer's LongViT path (embedded digits, classification objective): CP=2 gives the losses of one
    process, and the model learns to read the digits."""
    from conftest import losses, run_trainer
    # The schedule of the config's 100 iterations (cosine after a short warmup), so that the 20 iterations
    # run at CP=2 are the first 20 of the 40 run in one process.
    args = ["--config", "examples/tiny/longvit.yaml", "--log-interval", "1", "--eval-interval", "0",
            "--lr-warmup-iters", "2", "--lr-decay-iters", "100"]
    single = losses(run_trainer(args + ["--train-iters", "40"], corpus_cache).stdout)
    split = losses(run_trainer(args + ["--train-iters", "20", "--context-parallel-size", "2"], corpus_cache,
                               nproc=2).stdout)
    assert sorted(single) == list(range(1, 41)) and sorted(split) == list(range(1, 21))
    for it, loss in split.items():
        assert float(loss) == pytest.approx(float(single[it]), rel=1e-5), it
    # The ten digits are about equally frequent: a model that ignores the image (or sees it with another
    # image's label) cannot do better than the labels' entropy, ln 10 = 2.30. This one, after 40 steps,
    # averages ~1.9 over its last five batches (it starts at 2.30 and stays there for ~20 steps).
    last = [float(single[it]) for it in range(36, 41)]
    assert sum(last) / 5 < 2.1, single


def test_training_on_an_image_folder(corpus_cache, tmp_path):
    """--data-path DIR (root/<class>/<image>.png) streams the folder through the image pipeline."""
    from PIL import Image

    from conftest import losses, run_trainer
    from megalatent.data.images import load_digits
    images, labels = load_digits(16)
    for i in range(64):
        folder = tmp_path / "digits" / f"class{int(labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((images[i, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    out = run_trainer(["--config", "examples/tiny/longvit.yaml", "--data-path", str(tmp_path / "digits"),
                       "--train-iters", "3", "--log-interval", "1", "--eval-interval", "0",
                       "--micro-batch-size", "4", "--global-batch-size", "8", "--lr-warmup-iters", "1",
                       "--save", str(tmp_path / "ckpt")], corpus_cache)
    assert sorted(losses(out.stdout)) == [1, 2, 3]
