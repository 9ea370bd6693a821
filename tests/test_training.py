"""Training: the step's loss and gradient are the masked cross-entropy computed by hand (in the Trainer and
through the command line); the loss falls on the stdlib corpus; gradient accumulation equals one big batch; a
resumed run equals an uninterrupted one bit for bit, also after a stop on SIGUSR1; a damaged checkpoint is
detected and the previous one used; data-parallel ranks give the single-process result."""
import copy
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import CORPUS_FLAGS, losses, run_trainer, unigram_entropy
from megalatent.families import parse_args, validate
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import build_model
from megalatent.training.trainer import Trainer


def test_loss_decreases_within_50_iterations(corpus_cache, tmp_path):
    """The tiny GPT learns the corpus: after 50 steps its loss is well below the entropy of the corpus's token
    frequencies, the best a model that does not read its input can do (5.0 nats; it reaches ~4.4)."""
    out = run_trainer(["--train-iters", "50", "--log-interval", "5", "--tensorboard-dir", str(tmp_path / "tb")],
                      corpus_cache)
    curve = {i: float(v) for i, v in losses(out.stdout).items()}
    assert sorted(curve) == [1] + list(range(5, 55, 5))  # the first step, then every --log-interval
    floor = unigram_entropy(corpus_cache)
    assert curve[50] < floor - 0.3 and curve[50] < curve[5] - 1.0, (floor, curve)
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


def _masked_cross_entropy(model, micro_batches) -> torch.Tensor:
    """The loss by hand: -log softmax(logits)[label] at every position whose loss_mask is 1, averaged over
    those positions of all the micro-batches together (in float64, from the model's own logits)."""
    total, count = 0.0, 0.0
    for mb in micro_batches:
        logits = model(mb["tokens"], mb["position_ids"]).double()
        log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
        label_log_probs = log_probs.gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
        total = total - (label_log_probs * mb["loss_mask"]).sum()
        count = count + mb["loss_mask"].sum()
    return total / count


def test_step_loss_and_gradient_are_the_masked_cross_entropy():
    """The oracle for the loss the trainer optimises and reports: with masked positions (and micro-batches
    holding different numbers of them) the step's loss, its gradient and the validation loss equal the mean
    cross-entropy over the unmasked positions only, computed here from the model's logits."""
    from megalatent.data.gpt_data import MicroBatchLoader
    batch = _batch(4)
    batch["loss_mask"][0, :12] = 0  # micro-batch 0 has far fewer loss-bearing tokens than micro-batch 1
    batch["loss_mask"][3, 5] = 0
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    samples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = _trainer(["--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1"])
    trainer.valid_loader = MicroBatchLoader(samples, 2, 4, 0, 1)
    before = copy.deepcopy(trainer.model)
    expected = _masked_cross_entropy(before, micro)
    # The masked positions matter here: with them the loss would differ by far more than the tolerances.
    assert abs(_masked_cross_entropy(before, [{**mb, "loss_mask": torch.ones_like(mb["loss_mask"])}
                                              for mb in micro]).item() - expected.item()) > 1e-3
    expected.backward()

    valid_loss, _ = trainer.evaluate()
    loss, _ = trainer.train_step(micro)
    assert valid_loss == pytest.approx(expected.item(), rel=1e-6)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), reference in zip(trainer.model.named_parameters(), before.parameters()):
        torch.testing.assert_close(p.grad, reference.grad, rtol=1e-5, atol=1e-7, msg=name)


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


@pytest.fixture(scope="module")
def uninterrupted(corpus_cache, tmp_path_factory):
    """One run of 16 iterations with checkpoints at 8 and 16: the reference that interrupted and resumed
    runs must reproduce, and the checkpoints the tests below read (read-only: copy before writing)."""
    save = str(tmp_path_factory.mktemp("uninterrupted") / "a")
    out = run_trainer(COMMON + ["--train-iters", "16", "--save", save, "--save-interval", "8"], corpus_cache)
    return out.stdout, save


def test_logged_loss_is_the_masked_cross_entropy_of_the_saved_model(corpus_cache, uninterrupted):
    """Through the command line: the loss printed at iteration 9 is the mean cross-entropy, computed here by
    hand, of the model saved at iteration 8 on the 9th global batch (rebuilt from the saved data position)."""
    from megalatent.inference.loading import load_for_inference
    from megalatent.pretrain import build_data, setup
    stdout, save = uninterrupted
    loaded = load_for_inference(save, iteration=8)
    assert loaded.checkpoint == ckpt.iteration_dir(save, 8)
    cfg, _, layout, tokenizer, prefixes, weights = setup(
        ["--config", "examples/tiny/gpt.yaml", "--data-cache-path", corpus_cache] + CORPUS_FLAGS + COMMON
        + ["--train-iters", "16"])
    loader, _ = build_data(cfg, layout, tokenizer, prefixes, weights)
    loader.load_state_dict(ckpt.read_train_state(loaded.checkpoint)["data_loader"])
    batch = loader.next_global_batch()
    assert len(batch) == 8  # --global-batch-size 16 in micro-batches of 2
    with torch.no_grad():
        expected = _masked_cross_entropy(loaded.model, batch).item()
    assert float(losses(stdout)[9]) == pytest.approx(expected, rel=1e-5)  # printed with 7 significant digits


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(corpus_cache, tmp_path, uninterrupted):
    full_stdout, full_save = uninterrupted
    first = run_trainer(COMMON + ["--train-iters", "8", "--save", str(tmp_path / "b")], corpus_cache)
    second = run_trainer(COMMON + ["--train-iters", "16", "--save", str(tmp_path / "b"), "--load",
                                   str(tmp_path / "b")], corpus_cache)
    assert "resumed from checkpoint at iteration 8" in second.stdout
    resumed = {**losses(first.stdout), **losses(second.stdout)}
    assert resumed == losses(full_stdout)
    a = _weights(ckpt.iteration_dir(full_save, 16), tmp_path, "a.pt")
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
    assert losses(again.stdout)[9] == losses(full_stdout)[9]


def test_a_save_that_crashed_midway_never_replaces_the_last_good_one(corpus_cache, tmp_path, uninterrupted):
    root = tmp_path / "c"
    shutil.copytree(uninterrupted[1], root)  # checkpoints at 8 and 16, the pointer at 16
    good = ckpt.iteration_dir(str(root), 16)
    # What a crash during the save of iteration 18 leaves behind: a partial directory, no pointer move.
    partial = ckpt.iteration_dir(str(root), 18) + ".partial"
    os.makedirs(partial)
    with open(os.path.join(partial, "__0_0.distcp"), "wb") as f:
        f.write(b"half")
    assert ckpt.find_loadable(str(root)) == good
    # A complete-looking directory whose save never finished (no manifest) beyond the pointer is ignored too.
    os.makedirs(ckpt.iteration_dir(str(root), 20))
    assert ckpt.find_loadable(str(root)) == good
    # ... and a resumed save of iteration 18 clears the leftovers.
    run_trainer(COMMON + ["--train-iters", "18", "--save", str(root), "--load", str(root)], corpus_cache)
    assert not os.path.exists(partial)
    assert ckpt.find_loadable(str(root)) == ckpt.iteration_dir(str(root), 18)


def test_checkpoint_from_another_model_is_refused_before_training(corpus_cache, uninterrupted):
    out = run_trainer(["--hidden-size", "64", "--load", uninterrupted[1]], corpus_cache, timeout=300, check=False)
    assert out.returncode == 2
    assert "was written by a different model (hidden_size: checkpoint 128, this run 64)" in out.stderr


def test_two_data_parallel_ranks_equal_one_process(corpus_cache, tmp_path):
    args = ["--train-iters", "4", "--log-interval", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--eval-interval", "0", "--lr-warmup-iters", "2"]
    single = run_trainer(args + ["--save", str(tmp_path / "s")], corpus_cache)
    dp2 = run_trainer(args + ["--save", str(tmp_path / "d")], corpus_cache, nproc=2, real_launcher=True)  # torchrun
    s, d = losses(single.stdout), losses(dp2.stdout)
    assert len(s) == 4
    for it in s:
        assert float(d[it]) == pytest.approx(float(s[it]), rel=1e-5)
    a = _weights(ckpt.iteration_dir(str(tmp_path / "s"), 4), tmp_path, "s.pt")["model"]
    b = _weights(ckpt.iteration_dir(str(tmp_path / "d"), 4), tmp_path, "d.pt")["model"]
    # atol: Adam divides each gradient by its own running RMS, so an element whose gradient is at the level of
    # rounding (the two runs sum the same 8 sequences' gradients in a different order) moves by up to lr a step
    # either way; measured 1.4e-6 on one element of 49,152 on one machine (lr 1.5e-3..3e-3 here). A data-parallel
    # bug (a rank's gradient lost, a sum for a mean) moves every element by a good part of lr.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_sigusr1_saves_and_exits_cleanly_then_resumes(corpus_cache, tmp_path, uninterrupted):
    """SLURM's pre-emption warning: the run saves at the next step boundary and exits 0; resumed from that
    checkpoint, it continues the uninterrupted run's loss curve exactly."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    save = str(tmp_path / "s")
    # The uninterrupted run's flags (its schedule does not depend on --train-iters: --lr-decay-iters is set),
    # and a length that its signal cuts short but that keeps the data within one epoch, as that run's
    # (megatron-core's sample order depends on how many epochs a run spans).
    cmd = [sys.executable, "-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml", "--data-cache-path",
           corpus_cache] + CORPUS_FLAGS + COMMON + ["--train-iters", "40", "--save", save]
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
    assert 3 <= stopped <= 14, stopped  # acted on at a step boundary soon after the signal
    assert ckpt.find_loadable(save) == ckpt.iteration_dir(save, stopped)
    full = losses(uninterrupted[0])
    assert losses(out) == {it: full[it] for it in range(1, stopped + 1)}
    resumed = run_trainer(COMMON + ["--train-iters", str(stopped + 2), "--load", save], corpus_cache)
    assert f"resumed from checkpoint at iteration {stopped}" in resumed.stdout
    assert losses(resumed.stdout) == {it: full[it] for it in (stopped + 1, stopped + 2)}


def test_exit_duration_saves_and_stops(corpus_cache, tmp_path):
    out = run_trainer(["--train-iters", "400", "--log-interval", "1", "--eval-interval", "0",
                       "--exit-duration-in-mins", "0.0001", "--save", str(tmp_path / "t")], corpus_cache)
    assert "stopping at iteration 1 on --exit-duration-in-mins: saving a checkpoint" in out.stdout
    assert ckpt.find_loadable(str(tmp_path / "t")) == ckpt.iteration_dir(str(tmp_path / "t"), 1)
