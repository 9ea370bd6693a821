"""A checkpoint written at one layout loads at any other: weights, optimizer state and data position.
Written at TP=2 x PP=2 (4 ranks: tensor shards and pipeline stages in one checkpoint), resumed at 1 rank,
TP=2, and PP=2 x DP=2 (FSDP shards): the loss of the first step after loading (computed from the logits of
the loaded weights), every later training loss and the validation loss equal those of the run resumed at
the original layout. (It used to be written at TP=2 x PP=2 x DP=2 on 8 ranks, twice the cost on two cores;
checkpoints written from FSDP shards are loaded elsewhere at other layouts: test_training's data-parallel
test and test_moe's EP=2 checkpoint.)"""
import pytest

from conftest import losses, run_trainer

MODEL = ["--untie-embeddings-and-output-weights", "--log-interval", "1", "--lr-warmup-iters", "1",
         "--lr-decay-iters", "6", "--global-batch-size", "8", "--micro-batch-size", "2", "--eval-iters", "1"]
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def validation_losses(stdout):
    import re
    return [float(v) for v in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", stdout)]


def test_save_at_tp2_pp2_load_anywhere(corpus_cache, tmp_path):
    save = str(tmp_path / "ckpt")
    run_trainer(MODEL + TP2_PP2 + ["--train-iters", "3", "--eval-interval", "0", "--save", save], corpus_cache,
                nproc=4)
    resumed = {}
    for name, nproc, layout in [("tp2_pp2", 4, TP2_PP2), ("single", 1, []),
                                ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                                ("pp2_dp2", 4, ["--pipeline-model-parallel-size", "2"])]:
        out = run_trainer(MODEL + layout + ["--train-iters", "6", "--eval-interval", "3", "--load", save],
                          corpus_cache, nproc=nproc)
        assert "resumed from checkpoint at iteration 3" in out.stdout, name
        resumed[name] = (losses(out.stdout), validation_losses(out.stdout))
    ref_losses, ref_valid = resumed.pop("tp2_pp2")
    assert sorted(ref_losses) == [4, 5, 6] and len(ref_valid) == 1
    for name, (train, valid) in resumed.items():
        assert valid == pytest.approx(ref_valid, rel=1e-5), name
        assert sorted(train) == [4, 5, 6], name
        for it in train:
            assert float(train[it]) == pytest.approx(float(ref_losses[it]), rel=1e-5), (name, it)
