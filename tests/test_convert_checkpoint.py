"""tools/convert_checkpoint.py: a checkpoint -> one torch file holds exactly the live model and optimizer;
torch file -> checkpoint resumes training with the same losses as the original; the gpt family exported
to Hugging Face gives LlamaForCausalLM the same logits (tied, untied, GQA); what LLaMA cannot express,
and inputs that are not there, are refused with messages that say so."""
import dataclasses
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from conftest import CORPUS_VOCAB_SIZE, REPO, losses, run_trainer
from megalatent.config import TrainingConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.interop import convert
from megalatent.interop.tokenizer_files import find_default_tokenizer
from megalatent import families
from megalatent.families import build_model
from megalatent.training.optim import build_optimizer

# The checkpoints made here are saved without a process group, which DCP warns about every time.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

# vocab 100 padded to 128: the export must carry the padded rows.
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
            make_vocab_size_divisible_by=64)


def _make_checkpoint(root, iteration=1, model_config=None, **overrides):
    """A tiny model after one AdamW step (so the optimizer has state), saved the trainer's way."""
    cfg = families.model_config(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, TrainingConfig(lr=1e-2))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    train_state = {"consumed_samples": 2, "skipped": 0, "nan": 0, "data_loader": {"consumed_samples": 2},
                   "model_config": model_config or dataclasses.asdict(cfg)}
    ckpt.save_checkpoint(str(root), iteration, [model], [optimizer], train_state)
    return cfg, model, optimizer


def _optimizer_entries(optim_sd) -> dict:
    """{("state" | "param_groups", parameter name, key): value} of an optimizer state dict keyed by
    parameter name, nested ({"state": {name: {key: v}}, "param_groups": [...]}) or flattened
    ({"state.<name>.<key>": v, "param_groups.<name>.<key>": v}), so that either layout compares."""
    if "state" in optim_sd and "param_groups" in optim_sd:
        entries = {("state", name, k): v for name, state in optim_sd["state"].items() for k, v in state.items()}
        entries.update({("param_groups", name, k): v for group in optim_sd["param_groups"]
                        for name in group["params"] for k, v in group.items() if k != "params"})
        return entries
    return {(flat.split(".", 1)[0], *flat.split(".", 1)[1].rsplit(".", 1)): v for flat, v in optim_sd.items()}


def _assert_same_rng(a, b):
    assert a.keys() == b.keys() and a["python"] == b["python"] and torch.equal(a["torch"], b["torch"])
    assert a["numpy"][0] == b["numpy"][0] and a["numpy"][2:] == b["numpy"][2:]
    assert a["numpy"][1].dtype == b["numpy"][1].dtype and (a["numpy"][1] == b["numpy"][1]).all()


def _convert(*argv):
    assert tool.main([str(a) for a in argv]) == 0


def _refused(capsys, *argv) -> str:
    assert tool.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_to_torch_holds_the_live_model_and_optimizer(tmp_path):
    _, model, optimizer = _make_checkpoint(tmp_path / "ck", iteration=7)
    _convert("to-torch", "--load", tmp_path / "ck", "--output", tmp_path / "ck.pt")
    data = torch.load(tmp_path / "ck.pt")  # torch's default weights_only=True: plain tensors and values only
    assert set(data) == {"model", "optim", "train_state", "rng"}

    live = model.state_dict()
    assert data["model"].keys() == live.keys()
    for name, tensor in live.items():
        assert torch.equal(data["model"][name], tensor), name
    saved, live_optim = _optimizer_entries(data["optim"]), _optimizer_entries(get_state_dict(model, optimizer)[1])
    assert saved.keys() == live_optim.keys() and any(k[2] == "exp_avg_sq" for k in saved)
    for key, value in live_optim.items():
        assert torch.equal(saved[key], value) if torch.is_tensor(value) else saved[key] == value, key
    assert data["train_state"]["iteration"] == 7 and data["train_state"]["consumed_samples"] == 2
    saved_rng = convert.read_rng_states(ckpt.iteration_dir(str(tmp_path / "ck"), 7))
    _assert_same_rng(convert._rng_from_plain(data["rng"][0]), saved_rng[0])


def test_torch_file_round_trip_resumes_training_exactly(corpus_cache, tmp_path):
    """The converted copy must resume with the very losses (as printed) that the original resumes with."""
    args = ["--log-interval", "1", "--eval-interval", "0", "--lr-warmup-iters", "1", "--lr-decay-iters", "4",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "64"]
    run_trainer(args + ["--train-iters", "2", "--save", tmp_path / "orig"], corpus_cache)
    _convert("to-torch", "--load", tmp_path / "orig", "--output", tmp_path / "ck.pt")
    _convert("from-torch", "--input", tmp_path / "ck.pt", "--save", tmp_path / "conv")

    orig, conv = ckpt.iteration_dir(str(tmp_path / "orig"), 2), ckpt.find_loadable(str(tmp_path / "conv"))
    assert conv == ckpt.iteration_dir(str(tmp_path / "conv"), 2) and ckpt.verify(conv) is None
    assert ckpt.read_train_state(conv) == ckpt.read_train_state(orig)
    rng_orig, rng_conv = convert.read_rng_states(orig), convert.read_rng_states(conv)
    assert sorted(rng_conv) == [0]
    for rank in rng_orig:
        _assert_same_rng(rng_conv[rank], rng_orig[rank])
    a, b = convert.read_state(orig), convert.read_state(conv)
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name

    with ThreadPoolExecutor(2) as pool:  # two independent processes: run them side by side
        runs = pool.map(lambda d: run_trainer(args + ["--train-iters", "4", "--load", tmp_path / d], corpus_cache),
                        ("orig", "conv"))
        resumed = dict(zip(("orig", "conv"), runs))
    assert "resumed from checkpoint at iteration 2" in resumed["conv"].stdout
    assert sorted(losses(resumed["conv"].stdout)) == [3, 4]
    assert losses(resumed["conv"].stdout) == losses(resumed["orig"].stdout)

    # The default corpus's tokenizer travels with the HF export when the run's cache is named.
    _convert("to-hf", "--load", tmp_path / "orig", "--output", tmp_path / "hf", "--data-cache-path", corpus_cache)
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.model")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("variant", [
    dict(),  # tied embeddings, multi-head attention
    dict(untie_embeddings_and_output_weights=True, group_query_attention=True, num_query_groups=2,
         rotary_base=500000.0, norm_epsilon=1e-6, max_position_embeddings=64),
    dict(group_query_attention=True, num_query_groups=1, ffn_hidden_size=48),  # tied, multi-query
], ids=["tied-mha", "untied-gqa", "tied-mqa"])
def test_hf_llama_gives_our_logits(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    cfg, model, _ = _make_checkpoint(tmp_path / "ck", **variant)
    _convert("to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf")

    hf, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tied = not cfg.untie_embeddings_and_output_weights
    assert hf.config.tie_word_embeddings is tied and hf.config.vocab_size == 128
    assert hf.config.num_key_value_heads == cfg.kv_heads
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied

    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # HF re-ties it on load; writing it is not needed

    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_hf_export_in_bfloat16(tmp_path):
    pytest.importorskip("safetensors")
    _make_checkpoint(tmp_path / "ck")
    _convert("to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf", "--dtype", "bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_what_llama_cannot_express_is_refused(tmp_path, capsys):
    _make_checkpoint(tmp_path / "odd", normalization="LayerNorm", swiglu=False, position_embedding_type="none")
    err = _refused(capsys, "to-hf", "--load", tmp_path / "odd", "--output", tmp_path / "hf")
    assert "cannot be exported to LlamaForCausalLM" in err
    assert "--normalization LayerNorm" in err and "--no-swiglu" in err and "--position-embedding-type none" in err
    cfg = dataclasses.asdict(families.model_config(**TINY, model_family="yoco"))
    _make_checkpoint(tmp_path / "yoco", model_config=cfg)
    err = _refused(capsys, "to-hf", "--load", tmp_path / "yoco", "--output", tmp_path / "hf")
    assert "model family 'yoco' has no Hugging Face equivalent" in err and "to-torch" in err
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "hf.partial")


def test_missing_inputs_and_existing_outputs_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, "to-torch", "--load", tmp_path / "empty", "--output", tmp_path / "x.pt")
    assert "no complete checkpoint" in err and "no iter_XXXXXXX/" in err
    _make_checkpoint(tmp_path / "ck", iteration=3)
    os.remove(os.path.join(ckpt.iteration_dir(str(tmp_path / "ck"), 3), ckpt.MANIFEST))  # a save that died
    err = _refused(capsys, "to-torch", "--load", tmp_path / "ck", "--output", tmp_path / "x.pt")
    assert "its checkpoints [3] are all incomplete" in err
    _make_checkpoint(tmp_path / "ck", iteration=5)
    err = _refused(capsys, "to-torch", "--load", tmp_path / "ck", "--iteration", 4, "--output", tmp_path / "x.pt")
    assert "has no checkpoint of iteration 4; it has iterations [3, 5]" in err

    _convert("to-torch", "--load", tmp_path / "ck", "--output", tmp_path / "x.pt")
    assert "already exists; pass --force" in _refused(capsys, "to-torch", "--load", tmp_path / "ck",
                                                      "--output", tmp_path / "x.pt")
    _convert("to-torch", "--load", tmp_path / "ck", "--output", tmp_path / "x.pt", "--force")
    err = _refused(capsys, "from-torch", "--input", tmp_path / "x.pt", "--save", tmp_path / "ck")
    assert "already holds checkpoints [3, 5]" in err and "--force" in err

    # A hand-edited file that no longer fits its model is caught before it becomes a checkpoint.
    data = torch.load(tmp_path / "x.pt")
    data["model"]["norm.weight"] = torch.ones(7)
    torch.save(data, tmp_path / "edited.pt")
    err = _refused(capsys, "from-torch", "--input", tmp_path / "edited.pt", "--save", tmp_path / "new")
    assert "norm.weight has shape (7,), the model needs (32,)" in err
    data = torch.load(tmp_path / "x.pt")
    data["train_state"]["format_version"] = ckpt.FORMAT_VERSION - 1
    torch.save(data, tmp_path / "old.pt")
    err = _refused(capsys, "from-torch", "--input", tmp_path / "old.pt", "--save", tmp_path / "new")
    assert f"format version {ckpt.FORMAT_VERSION - 1}" in err and "--no-load-optim" in err
    assert not os.path.exists(tmp_path / "new")

    tokenizer = tmp_path / "tok.model"
    err = _refused(capsys, "to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf",
                   "--tokenizer-model", tokenizer)
    assert f"--tokenizer-model {tokenizer}: no such file" in err


def test_a_tokenizer_of_another_size_is_refused(tmp_path, capsys, corpus_cache):
    _make_checkpoint(tmp_path / "ck")
    err = _refused(capsys, "to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf",
                   "--data-cache-path", corpus_cache)
    assert "holds no default-corpus tokenizer of 100 tokens" in err
    [tokenizer] = find_default_tokenizer(corpus_cache, CORPUS_VOCAB_SIZE)
    err = _refused(capsys, "to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf",
                   "--tokenizer-model", tokenizer)
    assert f"has {CORPUS_VOCAB_SIZE} tokens but the model was trained with --vocab-size 100" in err
