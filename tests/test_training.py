"""Training: the loss falls on the stdlib corpus; gradient accumulation equals one big batch; a resumed
run equals an uninterrupted one bit for bit; a damaged checkpoint is detected and the previous one used;
data-parallel ranks give the single-process result."""
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import losses, run_trainer
from megalatent.families import parse_args, validate
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import build_model
from megalatent.training.trainer import Trainer


def test_loss_decreases_within_50_iterations(corpus_cache, tmp_path):
    out = run_trainer(["--train-iters", "50", "--log-interval", "5", "--tensorboard-dir", str(tmp_path / "tb")],
                      corpus_cache)
    curve = {i: float(v) for i, v in losses(out.stdout).items()}
    assert sorted(curve) == [1] + list(range(5, 55, 5))  # the first step, then every --log-interval
    assert curve[50] < curve[5] - 1.5, curve
    assert "validation loss at iteration 30" in out.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def _trainer(argv, seed=0):
    cfg = parse_args(["--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32", "--seq-length", "16",
                      "--clip-grad", "0", "--lr-warmup-iters", "0"] + argv)
    validate(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    return Trainer(cfg, ParallelLayout(world_size=1), torch.device("cpu"), model, None, None, 1.0)


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (n, 17), generator=g)
    mask = (torch.rand(n, 16, generator=g) > 0.2).float()  # uneven loss masks make the weighting matter
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(16).expand(n, 16)}


def test_gradient_accumulation_equals_one_big_batch():
    big = _batch(8)
    one = _trainer(["--micro-batch-size", "8", "--global-batch-size", "8"])
    four = _trainer(["--micro-batch-size", "2", "--global-batch-size", "8"])
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    for _ in range(3):  # several optimizer steps
        loss1, norm1 = one.train_step([big])
        loss4, norm4 = four.train_step(micro)
        assert loss4 == pytest.approx(loss1, rel=1e-6) and norm4 == pytest.approx(norm1, rel=1e-5)
        for (name, p1), (_, p4) in zip(one.model.named_parameters(), four.model.named_parameters()):
            torch.testing.assert_close(p4, p1, rtol=1e-5, atol=1e-6, msg=name)


def _weights(path, tmp_path, name):
    dcp_to_torch_save(path, str(tmp_path / name))
    return torch.load(tmp_path / name, weights_only=False)


COMMON = ["--log-interval", "1", "--lr-decay-iters", "16", "--eval-interval", "8", "--micro-batch-size", "2"]


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(corpus_cache, tmp_path):
    full = run_trainer(COMMON + ["--train-iters", "16", "--save", str(tmp_path / "a")], corpus_cache)
    first = run_trainer(COMMON + ["--train-iters", "8", "--save", str(tmp_path / "b")], corpus_cache)
    second = run_trainer(COMMON + ["--train-iters", "16", "--save", str(tmp_path / "b"), "--load",
                                   str(tmp_path / "b")], corpus_cache)
    assert "resumed from checkpoint at iteration 8" in second.stdout
    resumed = {**losses(first.stdout), **losses(second.stdout)}
    assert resumed == losses(full.stdout)
    a = _weights(ckpt.iteration_dir(str(tmp_path / "a"), 16), tmp_path, "a.pt")
    b = _weights(ckpt.iteration_dir(str(tmp_path / "b"), 16), tmp_path, "b.pt")
    assert a.keys() == b.keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bit for bit, optimizer included:
    assert any(key.endswith("exp_avg_sq") for key in a["optim"])  # optimizer state, keyed by parameter name
    for key, value in a["optim"].items():
        same = torch.equal(value, b["optim"][key]) if torch.is_tensor(value) else value == b["optim"][key]
        assert same, key

    # A checkpoint damaged after it was written (truncated file) is reported and the previous one used.
    latest = ckpt.iteration_dir(str(tmp_path / "b"), 16)
    shard = next(f for f in os.listdir(latest) if f.endswith(".distcp"))
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(latest, shard)) // 2)
    assert ckpt.find_loadable(str(tmp_path / "b")) == ckpt.iteration_dir(str(tmp_path / "b"), 8)
    again = run_trainer(COMMON + ["--train-iters", "9", "--load", str(tmp_path / "b")], corpus_cache)
    assert "skipping checkpoint" in again.stderr and "truncated" in again.stderr
    assert "resumed from checkpoint at iteration 8" in again.stdout
    assert losses(again.stdout)[9] == losses(full.stdout)[9]


def test_a_save_that_crashed_midway_never_replaces_the_last_good_one(corpus_cache, tmp_path):
    root = tmp_path / "c"
    run_trainer(COMMON + ["--train-iters", "2", "--save", str(root)], corpus_cache)
    good = ckpt.iteration_dir(str(root), 2)
    # What a crash during the save of iteration 4 leaves behind: a partial directory, no pointer move.
    partial = ckpt.iteration_dir(str(root), 4) + ".partial"
    os.makedirs(partial)
    with open(os.path.join(partial, "__0_0.distcp"), "wb") as f:
        f.write(b"half")
    assert ckpt.find_loadable(str(root)) == good
    # A complete-looking directory whose save never finished (no manifest) beyond the pointer is ignored too.
    os.makedirs(ckpt.iteration_dir(str(root), 6))
    assert ckpt.find_loadable(str(root)) == good
    # ... and a resumed save of iteration 4 clears the leftovers.
    run_trainer(COMMON + ["--train-iters", "4", "--save", str(root), "--load", str(root)], corpus_cache)
    assert not os.path.exists(partial)
    assert ckpt.find_loadable(str(root)) == ckpt.iteration_dir(str(root), 4)


def test_checkpoint_from_another_model_is_refused_before_training(corpus_cache, tmp_path):
    run_trainer(COMMON + ["--train-iters", "1", "--save", str(tmp_path / "m")], corpus_cache)
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml",
                          "--data-cache-path", corpus_cache, "--hidden-size", "64", "--load", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2
    assert "was written by a different model (hidden_size: checkpoint 128, this run 64)" in out.stderr


def test_two_data_parallel_ranks_equal_one_process(corpus_cache, tmp_path):
    args = ["--train-iters", "4", "--log-interval", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--eval-interval", "0", "--lr-warmup-iters", "2"]
    single = run_trainer(args + ["--save", str(tmp_path / "s")], corpus_cache)
    dp2 = run_trainer(args + ["--save", str(tmp_path / "d")], corpus_cache, nproc=2)
    s, d = losses(single.stdout), losses(dp2.stdout)
    assert len(s) == 4
    for it in s:
        assert float(d[it]) == pytest.approx(float(s[it]), rel=1e-5)
    a = _weights(ckpt.iteration_dir(str(tmp_path / "s"), 4), tmp_path, "s.pt")["model"]
    b = _weights(ckpt.iteration_dir(str(tmp_path / "d"), 4), tmp_path, "d.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_sigusr1_saves_and_exits_cleanly_then_resumes(corpus_cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    cmd = [sys.executable, "-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml", "--data-cache-path",
           corpus_cache, "--train-iters", "400", "--log-interval", "1", "--eval-interval", "0",
           "--save", str(tmp_path / "s")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "iteration        3/" in line:
            proc.send_signal(signal.SIGUSR1)
            break
        assert time.time() < deadline
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "on signal: saving a checkpoint" in out
    stopped = max(losses(out))
    assert stopped < 400
    assert ckpt.find_loadable(str(tmp_path / "s")) == ckpt.iteration_dir(str(tmp_path / "s"), stopped)


def test_exit_duration_saves_and_stops(corpus_cache, tmp_path):
    out = run_trainer(["--train-iters", "400", "--log-interval", "1", "--eval-interval", "0",
                       "--exit-duration-in-mins", "0.0001", "--save", str(tmp_path / "t")], corpus_cache)
    assert "stopping at iteration 1 on --exit-duration-in-mins: saving a checkpoint" in out.stdout
    assert ckpt.find_loadable(str(tmp_path / "t")) == ckpt.iteration_dir(str(tmp_path / "t"), 1)
