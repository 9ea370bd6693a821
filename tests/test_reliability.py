"""A run is never lost to a bad file, a full disk or a silent restart (README: Checkpoints, Training).

Through the CLI, as a user meets them: damaged checkpoints (fallback with a WARNING naming the file, exact
resume; all damaged: stop, nothing overwritten), --load semantics, the --save lock, a read-only or full --save
disk, persistent NaN, malformed inputs (YAML, .bin/.idx, tokenizer) and the tools' refusals; plot_runs on a
run's events. One small run (4 checkpoints, tensorboard events) serves most of them.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import CORPUS_VOCAB_SIZE, REPO, losses, run_trainer
from launcher import launch
from megalatent.distributed import checkpoint as ckpt

# A small model: one step in tens of milliseconds; 64 tokens per step.
TINY = ["--hidden-size", "64", "--num-layers", "1", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--eval-interval", "0", "--lr-warmup-iters", "0", "--log-interval", "1",
        "--lr-decay-iters", "4"]


def trainer(args, cache, **kwargs):
    return run_trainer(TINY + list(args), cache, check=False, **kwargs)


def error_line(out) -> str:
    """The trainer's error: exactly one line starting with 'error: ' on stderr, no traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def flip_bytes(path, at=None):
    """Same-size corruption: 16 bytes inverted in the middle of the file."""
    at = os.path.getsize(path) // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(16)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def tree_digest(root):
    """Every file under `root` with its bytes' digest: what 'nothing was touched' compares."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def run(corpus_cache, tmp_path_factory):
    """4 iterations, a checkpoint after each, tensorboard events: (save dir, tb dir, {iteration: loss})."""
    root = tmp_path_factory.mktemp("reliability")
    out = run_trainer(TINY + ["--train-iters", "4", "--save-interval", "1", "--save", str(root / "ckpt"),
                              "--tensorboard-dir", str(root / "tb")], corpus_cache)
    return str(root / "ckpt"), str(root / "tb"), losses(out.stdout)


def copy_of(run, tmp_path):
    shutil.copytree(run[0], tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_checkpoints_carry_a_checksum_of_every_file_and_the_lock_is_released(run):
    save = run[0]
    assert not os.path.exists(os.path.join(save, "run.lock"))  # the run that wrote it has ended
    path = ckpt.iteration_dir(save, 4)
    manifest = json.load(open(os.path.join(path, ckpt.MANIFEST)))
    on_disk = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs} - {ckpt.MANIFEST}
    assert set(manifest["files"]) == on_disk and manifest["checksum"] == "xxh3_64"
    assert ckpt.verify(path) is None


def test_damaged_files_fall_back_to_the_newest_intact_checkpoint_and_resume_exactly(run, corpus_cache, tmp_path):
    save = copy_of(run, tmp_path)
    damaged = [os.path.join(ckpt.iteration_dir(save, 4), "__0_0.distcp"),  # a weights shard
               os.path.join(ckpt.iteration_dir(save, 3), ".metadata"),
               os.path.join(ckpt.iteration_dir(save, 2), "train_state.pt")]
    for path in damaged:
        flip_bytes(path)
    out = trainer(["--train-iters", "2", "--load", save], corpus_cache)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING: skipping checkpoint")]
    assert len(warnings) == 3 and all(any(path in w for w in warnings) for path in damaged), warnings
    assert "resumed from checkpoint at iteration 1" in out.stdout
    assert losses(out.stdout)[2] == run[2][2]  # exactly the uninterrupted run's next step


def test_every_checkpoint_damaged_stops_and_overwrites_nothing(run, corpus_cache, tmp_path):
    save = copy_of(run, tmp_path)
    for it in (1, 2, 3, 4):
        flip_bytes(os.path.join(ckpt.iteration_dir(save, it), "__0_0.distcp"))
    before = tree_digest(save)
    out = trainer(["--train-iters", "6", "--load", save, "--save", save], corpus_cache)
    assert out.returncode == 2
    assert error_line(out).startswith(f"error: no intact checkpoint in {save}: its checkpoints [1, 2, 3, 4] are all")
    assert tree_digest(save) == before  # no fresh start, no save, no lock left behind


def test_load_semantics(corpus_cache, tmp_path):
    # A pointer to an iteration that is not there is an error, not a fresh start.
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / ckpt.LATEST).write_text("7\n")
    out = trainer(["--load", str(tmp_path / "gone")], corpus_cache)
    assert out.returncode == 2 and "names iteration 7, but" in error_line(out) and "iter_0000007/" in out.stderr
    # Nothing at all: one line, then a fresh start; Megatron's --exit-on-missing-checkpoint makes it an error.
    from megalatent.config import ConfigError
    from megalatent.families import parse_args
    from megalatent.pretrain import check_resumable
    said = []
    assert check_resumable(parse_args(["--load", str(tmp_path / "none")]), said.append) == []
    assert said == [f"--load {tmp_path / 'none'} holds no checkpoint (no {ckpt.LATEST}, no iter_XXXXXXX/): "
                    "starting from scratch"]
    with pytest.raises(ConfigError, match="holds no checkpoint .* --exit-on-missing-checkpoint is given"):
        check_resumable(parse_args(["--load", str(tmp_path / "none"), "--exit-on-missing-checkpoint"]))


def test_a_second_run_on_the_same_save_dir_refuses_and_a_stale_lock_is_taken_over(corpus_cache, tmp_path):
    save = tmp_path / "shared"
    save.mkdir()
    lock = save / "run.lock"
    # A run that is alive on this host (this test's own process) holds the directory.
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "earlier"}))
    out = trainer(["--train-iters", "1", "--save", str(save)], corpus_cache)
    assert out.returncode == 2
    assert f"is locked by another run: pid {os.getpid()} on host {socket.gethostname()}" in error_line(out)
    assert json.loads(lock.read_text())["pid"] == os.getpid() and not list(save.glob("iter_*"))
    # One whose process is gone: reported, taken over; the run says it starts from scratch and trains.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}))
    out = trainer(["--train-iters", "1", "--save", str(save), "--load", str(save)], corpus_cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"WARNING: taking over the stale lock {lock} of pid {int(dead.stdout)}" in out.stderr
    assert "holds no checkpoint" in out.stderr and "starting from scratch" in out.stderr
    assert ckpt.find_loadable(str(save)) == ckpt.iteration_dir(str(save), 1) and not lock.exists()


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A small tmpfs at `path` when this process may mount one (root); yields whether it did."""
    os.makedirs(path)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_save_directory_is_refused_before_training(corpus_cache, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root without the right to mount: no directory is read-only to this process")
            os.chmod(tmp_path / "ro", 0o555)
        out = trainer(["--train-iters", "1", "--save", str(tmp_path / "ro" / "ckpt")], corpus_cache)
        assert out.returncode == 2 and f"--save {tmp_path / 'ro' / 'ckpt'} is not writable" in error_line(out)


def test_a_full_save_disk_is_refused_before_training_and_a_failed_save_cleans_up(corpus_cache, tmp_path):
    # Too small for one checkpoint (~1 MB here): refused before training. Without a tmpfs the free space is
    # forced by the test hook (distributed/save_dir.py).
    with tmpfs(tmp_path / "full", "512k") as mounted:
        small = {} if mounted else {"MEGALATENT_TEST_FREE_BYTES": str(512 << 10)}
        save = str(tmp_path / "full" / "ckpt")
        out = trainer(["--train-iters", "1", "--save", save], corpus_cache, env=small)
        assert out.returncode == 2
        needed = re.search(r"one checkpoint needs about ([0-9.]+) MB", error_line(out))
        assert needed and float(needed.group(1)) > 0.524288, error_line(out)
        if not mounted:
            return
        # The disk fills during the save (the free-space check told it has room): the error names the disk,
        # the partial directory is gone, the run exits 1.
        out = trainer(["--train-iters", "1", "--save", save], corpus_cache,
                      env={"MEGALATENT_TEST_FREE_BYTES": str(1 << 40)})
        assert out.returncode == 1
        line = error_line(out)
        assert "No space left on device" in line and f"mounted at {tmp_path / 'full'}" in line
        assert "removed its partial directory" in line and os.listdir(save) == []


def test_persistent_nan_stops_naming_the_last_good_iteration(corpus_cache, tmp_path):
    save = str(tmp_path / "nan")
    # --lr 1e6: iteration 2 is the last finite step, then every gradient is NaN.
    out = trainer(["--lr", "1e6", "--train-iters", "40", "--save", save, "--save-interval", "2",
                   "--max-consecutive-skipped-iterations", "3"], corpus_cache)
    assert out.returncode == 1
    assert "3 steps in a row were skipped" in error_line(out) and "The last good iteration was 2" in out.stderr
    assert max(losses(out.stdout)) == 5
    latest = ckpt.find_loadable(save)
    dcp_to_torch_save(latest, str(tmp_path / "w.pt"))
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "w.pt", weights_only=False)["model"].values())


def small_trainer(argv):
    from megalatent.distributed.layout import ParallelLayout
    from megalatent.families import build_model, parse_args
    from megalatent.training.trainer import Trainer
    cfg = parse_args(["--vocab-size", "64", "--num-layers", "1", "--hidden-size", "32", "--seq-length", "16"] + argv)
    return Trainer(cfg, ParallelLayout(world_size=1), torch.device("cpu"), build_model(cfg.model), None, None, 1.0)


def test_check_for_nan_in_loss_and_grad_stops_at_the_first():
    from megalatent.training.trainer import TrainingStopped
    trainer = small_trainer(["--check-for-nan-in-loss-and-grad"])
    trainer.iteration = 1
    trainer._check_skipped(3.0, 1.0)
    trainer.iteration = 2
    with pytest.raises(TrainingStopped, match="iteration 2: loss 3.0, gradient norm nan; "
                                              "--check-for-nan-in-loss-and-grad .* last good iteration was 1"):
        trainer._check_skipped(3.0, float("nan"))


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    from megalatent.training.trainer import TrainingStopped
    trainer = small_trainer(["--save", str(tmp_path / "s")])
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    with pytest.raises(TrainingStopped, match="the weights at iteration 0 are not finite: not saving them"):
        trainer.save()
    assert not os.path.exists(tmp_path / "s")


def test_a_bad_yaml_file_is_one_line(tmp_path):
    from megalatent.config import ConfigError
    from megalatent.families import parse_args
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"num-layers: [2\n")
    out = launch(["-m", "megalatent.pretrain", "--config", str(bad)], timeout=300)
    assert out.returncode == 2
    assert error_line(out).startswith(f"error: --config {bad}: invalid YAML at line 2, column 1: ")
    bad.write_bytes(b"num-layers: 2  # caf\xe9 in latin-1\n")  # the same path to the same line, in-process
    with pytest.raises(ConfigError) as refused:
        parse_args(["--config", str(bad)])
    assert str(refused.value) == f"--config {bad}: not UTF-8 text (byte 0xe9 at offset 20); save it as UTF-8"


@pytest.fixture
def corpus(corpus_cache):
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    return prepare_default_corpus(corpus_cache, CORPUS_VOCAB_SIZE)  # (tokenizer model, dataset prefix): built


def test_damaged_datasets_and_tokenizer_are_one_line_each(corpus_cache, corpus, tmp_path):
    tokenizer, prefix = corpus
    shutil.copy(prefix + ".bin", tmp_path / "short.bin")
    shutil.copy(prefix + ".idx", tmp_path / "short.idx")
    os.truncate(tmp_path / "short.bin", os.path.getsize(prefix + ".bin") - 2)
    for name in ("header", "cut"):
        shutil.copy(prefix + ".idx", tmp_path / f"{name}.idx")
        (tmp_path / f"{name}.bin").write_bytes(b"")
    flip_bytes(tmp_path / "header.idx", at=0)
    os.truncate(tmp_path / "cut.idx", os.path.getsize(prefix + ".idx") // 2)
    blend = [str(tmp_path / n) for n in ("short", "header", "cut")]
    out = trainer(["--data-path", *blend, "--tokenizer-model", tokenizer], corpus_cache)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'short.bin'}: {os.path.getsize(tmp_path / 'short.bin')} bytes, but its index" in out.stderr
    assert f"{tmp_path / 'header.idx'}: not a Megatron indexed-dataset index" in out.stderr
    assert f"{tmp_path / 'cut.idx'}: {os.path.getsize(tmp_path / 'cut.idx')} bytes, its header" in out.stderr

    # Same-size corruption of the .bin: token ids the tokenizer does not have.
    shutil.copy(prefix + ".bin", tmp_path / "ids.bin")
    shutil.copy(prefix + ".idx", tmp_path / "ids.idx")
    flip_bytes(tmp_path / "ids.bin", at=0)
    out = trainer(["--data-path", str(tmp_path / "ids"), "--tokenizer-model", tokenizer], corpus_cache)
    assert out.returncode == 2 and f"{tmp_path / 'ids.bin'}: holds token id" in error_line(out)

    # A truncated tokenizer model: the trainer, and a tool, say so in one line.
    data = open(tokenizer, "rb").read()
    (tmp_path / "tok.model").write_bytes(data[:len(data) // 2])
    out = trainer(["--data-path", prefix, "--tokenizer-model", str(tmp_path / "tok.model")], corpus_cache)
    assert out.returncode == 2
    assert f"tokenizer model {tmp_path / 'tok.model'}: not a readable sentencepiece model" in error_line(out)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    out = launch(["tools/preprocess_data.py", "--input", str(tmp_path / "docs.jsonl"),
                  "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(tmp_path / "tok.model")],
                 timeout=300)
    assert out.returncode == 2 and "not a readable sentencepiece model" in error_line(out)


def test_the_tokenizer_tool_says_what_vocabulary_its_corpus_supports(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "x", "y", "z"]
    (tmp_path / "small.txt").write_text("\n".join(" ".join(words[(i * j) % 7] for j in range(10))
                                                  for i in range(2000)))
    out = launch(["tools/train_tokenizer.py", "--input", str(tmp_path / "small.txt"),
                  "--vocab-size", "32000", "--output-prefix", str(tmp_path / "tok")], timeout=300)
    assert out.returncode == 2
    line = error_line(out)
    assert line.startswith("error: --vocab-size 32000 is more than this corpus supports: its text gives at most ")
    assert "Use --vocab-size" in line and not os.path.exists(tmp_path / "tok.model")


def test_flag_typos_and_help(capsys):
    from megalatent.families import build_parser, parse_args
    with pytest.raises(SystemExit) as refused:
        parse_args(["--trian-iters", "5"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "megalatent-pretrain: error: unrecognized argument --trian-iters: did you mean --train-iters?",
        "(`megalatent-pretrain --help` lists every flag)"]
    text = build_parser().format_help()
    assert "--no-no-" not in text and "--no-load-optim" in text
    assert parse_args(["--no-load-optim"]).checkpoint.no_load_optim


def test_plot_runs_draws_the_runs_curves_against_tokens(run, tmp_path):
    _, tb, printed = run
    out = launch(["tools/plot_runs.py", tb, "--output", str(tmp_path / "runs.png"), "--json", str(tmp_path / "runs.json")],
                 timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert open(tmp_path / "runs.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    [(name, data)] = json.load(open(tmp_path / "runs.json")).items()
    assert name == os.path.basename(tb) and data["x_axis"] == "consumed tokens"
    loss = data["series"]["lm-loss"]
    assert loss["x"] == [64, 128, 192, 256]  # 2 sequences x 32 tokens per step
    assert loss["y"] == [pytest.approx(float(printed[i]), rel=1e-6) for i in (1, 2, 3, 4)]
    assert len(data["series"]["learning-rate"]["y"]) == len(data["series"]["tokens-per-second"]["y"]) == 4
