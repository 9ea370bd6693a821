"""Checkpoints written by an earlier megalatent still load (tests/fixtures/make_checkpoint_fixtures.py wrote them
with commit e82aa41, before each family got its own section of flags): their weights give the logits they
gave then, a run with their flags resumes from them, and their optimizer state loads by parameter name."""
import json
import os

import pytest
import torch

from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model, model_config_from_saved, parse_args
from megalatent.inference.loading import load_for_inference
from megalatent.interop.convert import read_state
from megalatent.pretrain import check_resumable
from megalatent.training.optim import build_optimizer

from conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures", "checkpoints")
RUNS = ["gpt_moe", "longnet", "yoco"]


def flags_of(name):
    with open(os.path.join(FIXTURES, name, "flags.txt")) as f:
        return f.read().split()


@pytest.mark.parametrize("name", RUNS)
def test_old_checkpoint_gives_the_same_logits(name):
    loaded = load_for_inference(os.path.join(FIXTURES, name, "run"))
    expected = torch.load(os.path.join(FIXTURES, name, "expected.pt"))
    with torch.no_grad():
        logits = loaded.model(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    assert loaded.config.model_family == flags_of(name)[flags_of(name).index("--model-family") + 1]


@pytest.mark.parametrize("name", RUNS)
def test_old_checkpoint_resumes_with_its_flags(name):
    run = os.path.join(FIXTURES, name, "run")
    cfg = parse_args(flags_of(name) + ["--load", run, "--vocab-size", "512"])
    path = check_resumable(cfg)[0]  # the newest of the checkpoints to try
    assert path == ckpt.iteration_dir(run, 2)
    # Weights and AdamW state load into this version's model and optimizer, by parameter name.
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.training)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()  # the optimizer's state exists once it stepped
    optimizer.step()
    state = ckpt.load_checkpoint(path, [model], [optimizer], load_rng=False)
    assert state["iteration"] == 2
    saved = read_state(path)
    for name_, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), saved["model"][name_], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], saved["optim"][f"state.{name_}.exp_avg"],
                                   rtol=0, atol=0)


def test_another_model_is_still_refused():
    from megalatent.config import ConfigError
    run = os.path.join(FIXTURES, "longnet", "run")
    argv = [a for a in flags_of("longnet")]
    argv[argv.index("--hidden-size") + 1] = "64"
    with pytest.raises(ConfigError, match="hidden_size: checkpoint 32, this run 64"):
        check_resumable(parse_args(argv + ["--load", run]))
    argv = flags_of("gpt_moe")
    argv[argv.index("--model-family") + 1] = "gpt"
    with pytest.raises(ConfigError, match="model_family: checkpoint 'longnet', this run 'gpt'"):
        check_resumable(parse_args(argv + ["--load", run]))


def test_every_tiny_config_recorded_then_reads_as_it_parses_now():
    """The model_config an old checkpoint of each examples/tiny/*.yaml recorded (every family's fields, and
    LatentLM's tokenizer flags in its data section) reads back as the config those files parse to today."""
    with open(os.path.join(FIXTURES, "model_configs.json")) as f:
        records = json.load(f)
    assert set(records) == {f for f in os.listdir(os.path.join(REPO, "examples", "tiny")) if f.endswith(".yaml")}
    for yaml_file, record in records.items():
        saved, problems = model_config_from_saved(record["model_config"], fallback=record["data"])
        assert not problems, (yaml_file, problems)
        assert saved == parse_args(["--config", os.path.join(REPO, "examples", "tiny", yaml_file)]).model, yaml_file
