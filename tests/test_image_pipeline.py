"""Image pipelines: the DALI CPU pipeline and the PyTorch fallback give the same batches; sharding; errors.

Test images are the scikit-learn digits written as PNG (lossless, so both decoders are exact): RGB images
stack three digits as channels, non-square ones put two digits side by side.
"""
import os

import numpy as np
import pytest
import torch

from megalatent.data.image_pipeline import ImagePipeline, image_folder, read_file_list

Image = pytest.importorskip("PIL.Image")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _digits_uint8(size: int) -> np.ndarray:
    from megalatent.data.images import load_digits

    images, _ = load_digits(size)
    return ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _write_folder(root, num_classes=3, per_class=4, size=16, rgb=True, varied=False) -> str:
    """root/<class>/<i>.png; with ``varied`` the images have different, non-square sizes."""
    digits, k = _digits_uint8(size), 0
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c}"))
        for i in range(per_class):
            pick = [digits[(k * 3 + j) % len(digits)] for j in range(3)]
            image = np.stack(pick, -1) if rgb else pick[0]
            if varied:  # widths size+3 .. size+8 and heights size..size+5: odd crops, half-way roundings
                image = np.concatenate([image, image], axis=1)[: size + k % 6, : size + 3 + k % 6]
            Image.fromarray(image).save(os.path.join(root, f"class_{c}", f"{i}.png"))
            k += 1
    return str(root)


def _epochs(pipeline: ImagePipeline, epochs: int) -> list[dict]:
    return [b for _ in range(epochs) for b in pipeline]


# ------------------------------------------------------------------------------------------------ DALI == torch

CASES = {
    # exact: no resize; nearest-neighbour resize of the shorter side + center crop; grey; direct resize
    "no_resize": dict(rgb=True, varied=False, kw=dict(), atol=0.0),
    "shorter_nearest_crop": dict(rgb=True, varied=True, kw=dict(resize_shorter=13, crop=(11, 12)), atol=0.0),
    "grey_resize_to_nearest": dict(rgb=False, varied=True, kw=dict(channels=1, resize_to=(10, 21)), atol=0.0),
    # bilinear: DALI and torch round to 8 bits differently in a few pixels: within one grey level
    "shorter_linear_crop": dict(rgb=True, varied=True, kw=dict(resize_shorter=23, crop=(20, 20),
                                                              interpolation="linear"),
                                atol=1 / (255 * min(IMAGENET_STD)) + 1e-6),
}


@pytest.mark.parametrize("case", CASES)
def test_dali_cpu_pipeline_matches_torch(tmp_path, case):
    pytest.importorskip("nvidia.dali")
    spec = CASES[case]
    root = _write_folder(tmp_path / "images", rgb=spec["rgb"], varied=spec["varied"])
    kw = dict(batch_size=2, rank=1, world_size=2, seed=5, **spec["kw"])
    if kw.get("channels", 3) == 3:
        kw.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:
        kw.update(mean=(0.5,), std=(0.25,))
    dali = _epochs(ImagePipeline(root, backend="dali", device_id=None, **kw), 2)
    torch_ = _epochs(ImagePipeline(root, backend="torch", **kw), 2)
    assert len(dali) == len(torch_) == 6  # 12 images / (2 per batch * 2 ranks) * 2 epochs
    for d, t in zip(dali, torch_):
        assert d["images"].dtype == t["images"].dtype == torch.float32
        assert d["labels"].dtype == t["labels"].dtype == torch.int64
        assert d["images"].shape == t["images"].shape
        assert torch.equal(d["labels"], t["labels"])
        if spec["atol"] == 0.0:
            assert torch.equal(d["images"], t["images"]), (d["images"] - t["images"]).abs().max()
        else:
            torch.testing.assert_close(d["images"], t["images"], rtol=0, atol=spec["atol"])
    expected = {"no_resize": (3, 16, 16), "shorter_nearest_crop": (3, 11, 12),
                "grey_resize_to_nearest": (1, 10, 21), "shorter_linear_crop": (3, 20, 20)}[case]
    assert tuple(torch_[0]["images"].shape[1:]) == expected


def test_nearest_resize_follows_dali_float32_where_it_decides(tmp_path):
    """504 -> 250 rows: (62 + 0.5) * 504 / 250 is exactly 126, but DALI's float32 running sum lands below."""
    pytest.importorskip("nvidia.dali")
    from megalatent.data.image_pipeline import _nearest_rows

    exact = (np.arange(250) * 2 + 1) * 504 // 500
    assert (_nearest_rows(504, 250).numpy() != exact).any()  # so this case tests the float32 arithmetic
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "noise" / "c")
    for i, (h, w) in enumerate([(504, 452), (610, 445)]):  # shorter side 224: rows 504 -> 250, 610 -> 307
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "noise" / "c" / f"{i}.png")
    kw = dict(batch_size=1, resize_shorter=224, crop=(240, 224), shuffle=False)
    for d, t in zip(ImagePipeline(str(tmp_path / "noise"), backend="dali", **kw),
                    ImagePipeline(str(tmp_path / "noise"), backend="torch", **kw)):
        assert torch.equal(d["images"], t["images"])


def test_dali_resume_matches_uninterrupted(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = _write_folder(tmp_path / "images")
    full = ImagePipeline(root, batch_size=3, seed=1, backend="dali")
    batches = [full.next_batch() for _ in range(7)]  # 4 per epoch: crosses into the second epoch
    resumed = ImagePipeline(root, batch_size=3, seed=1, backend="dali")
    resumed.load_state_dict({"epoch": 1, "batch_index": 1})
    for want in batches[5:]:
        got = resumed.next_batch()
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["labels"], want["labels"])


# ------------------------------------------------------------------------------------------------ order, sharding

def test_sharding_covers_each_image_once_per_epoch(tmp_path):
    root = _write_folder(tmp_path / "images", num_classes=2, per_class=6)
    # A list file with one label per image identifies every image in the batches.
    samples = image_folder(root)
    list_file = tmp_path / "list.txt"
    list_file.write_text("# path label\n" + "".join(f"{os.path.relpath(p, tmp_path)} {i}\n"
                                                   for i, (p, _) in enumerate(samples)))
    assert [p for p, _ in read_file_list(str(list_file))] == [p for p, _ in samples]
    ranks = [ImagePipeline(str(list_file), batch_size=3, rank=r, world_size=2, seed=7, backend="torch")
             for r in range(2)]
    assert len(ranks[0]) == 2
    orders = []
    for _ in range(3):
        seen = [torch.cat([b["labels"] for b in pipe]) for pipe in ranks]
        assert sorted(torch.cat(seen).tolist()) == list(range(12))  # every image once, no rank overlap
        orders.append(torch.cat(seen).tolist())
    assert len({tuple(order) for order in orders}) == 3  # reshuffled every epoch: no two epochs alike
    again = ImagePipeline(str(list_file), batch_size=3, rank=0, world_size=2, seed=7, backend="torch")
    assert torch.cat([b["labels"] for b in again]).tolist() == orders[0][:6]  # same seed, same order
    resumed = ImagePipeline(str(list_file), batch_size=3, rank=1, world_size=2, seed=7, backend="torch")
    resumed.load_state_dict({"epoch": 2, "batch_index": 1})
    assert resumed.next_batch()["labels"].tolist() == orders[2][9:]


def test_remainder_dropped_equally_on_all_ranks(tmp_path):
    root = _write_folder(tmp_path / "images", num_classes=1, per_class=7)
    pipes = [ImagePipeline(root, batch_size=2, rank=r, world_size=2, backend="torch") for r in range(2)]
    assert [len(p) for p in pipes] == [1, 1]  # 7 images: one global batch of 4, 3 dropped this epoch
    labels = [b["images"] for p in pipes for b in p]
    assert len(labels) == 2


# ------------------------------------------------------------------------------------------------ errors

def test_auto_backend_falls_back_to_torch_without_dali(tmp_path, monkeypatch):
    import megalatent.data.image_pipeline as image_pipeline

    monkeypatch.setattr(image_pipeline, "dali_available", lambda: False)
    root = _write_folder(tmp_path / "images", num_classes=1, per_class=2)
    assert ImagePipeline(root, batch_size=2).backend == "torch"
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        ImagePipeline(root, batch_size=2, backend="dali")


def test_clear_errors_for_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImagePipeline(str(tmp_path / "missing"), batch_size=1, backend="torch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        ImagePipeline(str(tmp_path / "empty"), batch_size=1, backend="torch")
    (tmp_path / "no_images" / "cats").mkdir(parents=True)
    (tmp_path / "no_images" / "cats" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="found 1 sub-folders"):
        ImagePipeline(str(tmp_path / "no_images"), batch_size=1, backend="torch")
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("a.png 0\nb.png cat\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        ImagePipeline(str(bad_list), batch_size=1, backend="torch")
    root = _write_folder(tmp_path / "images", num_classes=1, per_class=3)
    with pytest.raises(ValueError, match="no full batch"):
        ImagePipeline(root, batch_size=2, world_size=2, backend="torch")
    with pytest.raises(ValueError, match="std=.*must be positive.*backend='tf'"):
        ImagePipeline(root, batch_size=1, backend="tf", std=(0.0,))
    varied = _write_folder(tmp_path / "varied", num_classes=1, per_class=2, varied=True)
    with pytest.raises(ValueError, match="different sizes"):
        ImagePipeline(varied, batch_size=2, backend="torch").next_batch()
    with pytest.raises(ValueError, match="larger than the resized image"):
        ImagePipeline(root, batch_size=1, crop=(40, 40), backend="torch").next_batch()
