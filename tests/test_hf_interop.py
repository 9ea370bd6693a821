"""Hugging Face in and out (tools/convert_checkpoint.py from-hf / to-hf, megalatent/interop/hf.py), against
models transformers makes itself (tiny, random, save_pretrained; nothing downloaded): imports give
transformers' logits, exports open in transformers with ours, round trips give the same tensors; sparse
upcycling starts as the dense model; an import trains at TP2 and TP2 x PP2 from transformers' loss; the
BitNet 2B4T variant trains at every layout; a Hugging Face tokenizer preprocesses data that trains; and what
cannot be converted is refused before anything is written."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, losses, run_trainer
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model
from megalatent.interop.convert import model_config, read_state
from megalatent.nn.moe import moe_layers

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402  (after transformers, which brings it)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TOKENS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))


def convert(*argv):
    assert tool.main([str(a) for a in argv]) == 0


def refused(capsys, *argv) -> str:
    assert tool.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def hf_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, sharded or not."""
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def ours(run):
    """The model of the newest checkpoint under `run`, and its config."""
    path = ckpt.find_loadable(str(run))
    cfg = model_config(ckpt.read_train_state(path))
    model = build_model(cfg)
    model.load_state_dict(read_state(path, ["model"])["model"])
    return model.eval(), cfg


def save_hf(model, path, **kwargs):
    torch.manual_seed(0)
    model.eval().save_pretrained(path, **kwargs)
    return model


def llama(path, seed=0, **config):
    torch.manual_seed(seed)
    return save_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **config})), path)


def hf_tokenizer(path, texts=("def f(x):\n    return x + 1\n", "print('hello world')\n", "for i in range(10): pass")):
    """A byte-level BPE trained on a few strings, saved as transformers does (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts) * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


# ------------------------------------------------------------------------------------------- Llama

@pytest.mark.parametrize("variant", ["untied-sharded", "tied-bf16"])
def test_llama_in_and_out(tmp_path, variant):
    """from-hf gives transformers' logits; to-hf opens in transformers with ours; the round trip keeps every
    tensor. Sharded input (an index and several files) and bf16 input (converted exactly to fp32)."""
    tied, dtype = variant.startswith("tied"), torch.bfloat16 if variant.endswith("bf16") else torch.float32
    torch.manual_seed(0)
    # (a vocabulary of 320 holds the test tokenizer's ids)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 320}, tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(config).to(dtype)
    save_hf(hf, tmp_path / "hf", **({"max_shard_size": "40KB"} if not tied else {}))
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json") is (not tied)
    hf_tokenizer(tmp_path / "hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()

    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "run")
    model, cfg = ours(tmp_path / "run")
    assert cfg.untie_embeddings_and_output_weights is not tied and cfg.padded_vocab_size == 320
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)
    state = ckpt.read_train_state(ckpt.find_loadable(str(tmp_path / "run")))
    assert state["iteration"] == 0 and state["weights_only"] and os.path.isdir(state["tokenizer_model"])

    convert("to-hf", "--load", tmp_path / "run", "--output", tmp_path / "out",
            "--dtype", "bfloat16" if dtype == torch.bfloat16 else "float32")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["eos_token_id"] == 2  # the tokenizer's eos
    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, model(TOKENS), rtol=1e-5, atol=1e-5)


def test_llama_into_longnet_and_bitnet(tmp_path):
    """The same weights under other attention or ternary layers: LongNet with one pattern (w = n, r = 1) is dense
    attention, so it gives transformers' logits; BitNet b1.58 takes every weight, and each block norm's gain
    becomes the input-norm gain of the BitLinears that read it."""
    reference = llama(tmp_path / "hf").eval()
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "longnet", "--model-family", "longnet",
            "--segment-lengths", 16, "--dilated-ratios", 1)
    model, cfg = ours(tmp_path / "longnet")
    assert cfg.model_family == "longnet" and cfg.segment_lengths == [16]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)

    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "bitnet", "--model-family", "bitnet")
    model, cfg = ours(tmp_path / "bitnet")
    hf = reference.model.layers[1]
    layer = model.layers["1"]
    assert torch.equal(layer.attention.k_proj.weight, hf.self_attn.k_proj.weight)
    assert torch.equal(layer.mlp.down_proj.weight, hf.mlp.down_proj.weight)
    assert torch.equal(layer.attention.v_proj.norm_weight, hf.input_layernorm.weight)
    assert torch.equal(layer.mlp.up_proj.norm_weight, hf.post_attention_layernorm.weight)
    assert torch.equal(layer.attention.o_proj.norm_weight, torch.ones(64))  # new: Llama has no norm there


# ------------------------------------------------------------------------------------------- MoE

def test_sparse_upcycling_starts_as_the_dense_model_and_then_diverges(tmp_path, capsys):
    reference = llama(tmp_path / "hf").eval()
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "moe", "--num-experts", 4,
            "--moe-router-topk", 2)
    model, cfg = ours(tmp_path / "moe")
    experts = model.layers["0"].mlp.experts
    assert torch.equal(experts.gate_proj[3], reference.model.layers[0].mlp.gate_proj.weight.t())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)

    # A few steps: the router sends tokens to different experts, whose gradients then differ.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(TOKENS[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(experts.gate_proj[0], experts.gate_proj[1])

    # MH-MoE cannot start as the dense MLP: the rest is imported, head/merge start as the identity.
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "mhmoe", "--num-experts", 4,
            "--moe-num-heads", 2)
    assert "MH-MoE layers cannot start as the dense MLP" in capsys.readouterr().out
    model, _ = ours(tmp_path / "mhmoe")
    [(_, layer), _] = moe_layers(model)
    assert torch.equal(layer.head_proj.weight, torch.eye(64)) and torch.equal(layer.merge_proj.bias, torch.zeros(64))
    assert torch.equal(model.layers["1"].attention.q_proj.weight, reference.model.layers[1].self_attn.q_proj.weight)


def test_mixtral_in_and_out(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    reference = save_hf(transformers.MixtralForCausalLM(config), tmp_path / "hf")
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "run")
    model, cfg = ours(tmp_path / "run")
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_router_pre_softmax) == (4, 2, False)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)
    convert("to-hf", "--load", tmp_path / "run", "--output", tmp_path / "out")
    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(after[k], t) for k, t in before.items())
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, model(TOKENS), rtol=1e-5, atol=1e-5)

    # What Mixtral's routing does not compute is named: here an upcycled MH-MoE with pre-softmax weights.
    llama(tmp_path / "dense")
    convert("from-hf", "--input", tmp_path / "dense", "--save", tmp_path / "mh", "--num-experts", 4,
            "--moe-num-heads", 2, "--moe-router-pre-softmax")
    err = refused(capsys, "to-hf", "--load", tmp_path / "mh", "--output", tmp_path / "mh-out")
    assert "cannot be exported to MixtralForCausalLM" in err and "MH-MoE heads" in err
    assert "--moe-router-pre-softmax" in err and not os.path.exists(tmp_path / "mh-out")


# ------------------------------------------------------------------------------------------- BitNet

def packed_bitnet(path):
    """A BitNetForCausalLM in the released 2B4T layout: transformers' own model, its projections quantised as
    transformers' WeightQuant does and packed with transformers' pack_weights, quantisation_config offline."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    torch.manual_seed(0)
    save_hf(transformers.BitNetForCausalLM(transformers.BitNetConfig(**TINY)), path)
    weights = load_file(path / "model.safetensors")
    for name in [n for n in weights if n.startswith("model.layers.") and n.endswith("proj.weight")]:
        scale = 1 / weights[name].abs().mean().clamp(min=1e-5)
        weights[name] = pack_weights((weights[name] * scale).round().clamp(-1, 1).to(torch.int8))
        weights[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.load(open(path / "config.json"))
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                     "quantization_mode": "offline"}
    json.dump(config, open(path / "config.json", "w"))


@pytest.fixture
def without_compiler():
    """transformers' BitNet @torch.compile kernels run eagerly. (config.patch restores the flag; monkeypatch's
    undo would delete it from the config module, breaking every later torch.compile in the process.)"""
    with torch._dynamo.config.patch(disable=True):
        yield


def test_bitnet_2b4t_in_and_out(tmp_path, without_compiler):
    pytest.importorskip("accelerate")  # transformers' BitNet quantizer needs it
    packed_bitnet(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "run")
    model, cfg = ours(tmp_path / "run")
    assert (cfg.model_family, cfg.bitnet_variant) == ("bitnet", "hf-2b4t")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)

    convert("to-hf", "--load", tmp_path / "run", "--output", tmp_path / "out")
    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name, tensor in before.items():  # the codes exactly; 1/γ recomputed from the latent weights to an ulp
        torch.testing.assert_close(after[name], tensor, rtol=1e-6 if name.endswith("_scale") else 0, atol=0)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, model(TOKENS), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ layouts and training

def test_imported_model_trains_at_tp2_and_tp2_pp2(tmp_path):
    """The import's first loss at TP2 (tied; with dp 2) and TP2 x PP2 (tied: the embedding on the first and
    last stages; and untied) is transformers' loss on the same batch; the BitNet 2B4T variant (sub-norms
    sharded with the row-parallel inputs) equals one process at TP2 + SP and TP2 x PP2."""
    from parallel_worker import MODEL, samples
    from test_parallel import UNTIED, assert_equivalent, run_worker

    # parallel_worker's model: 4 layers, width 64, 4 heads in 2 groups, vocabulary 200 (a multiple of 8), SwiGLU 192
    shape = dict(num_hidden_layers=4, intermediate_size=192, rope_theta=10000.0)
    hf = {tied: llama(tmp_path / f"hf-{tied}", tie_word_embeddings=tied, **shape) for tied in (True, False)}
    for tied in (True, False):
        convert("from-hf", "--input", tmp_path / f"hf-{tied}", "--save", tmp_path / f"run-{tied}")
    assert "--make-vocab-size-divisible-by" in MODEL and MODEL[MODEL.index("--make-vocab-size-divisible-by") + 1] == "8"

    torch.set_default_dtype(torch.float64)  # as in the float64 worker below (its random loss masks follow the dtype)
    try:
        batch = samples(8, seed=1)  # the worker's first global batch
    finally:
        torch.set_default_dtype(torch.float32)
    tokens, labels, mask = (torch.stack([s[k] for s in batch]) for k in ("tokens", "labels", "loss_mask"))

    def hf_loss(model):
        with torch.no_grad():
            ce = F.cross_entropy(model(tokens).logits.flatten(0, 1), labels.flatten(), reduction="none")
        return ((ce * mask.flatten()).sum() / mask.sum()).item()

    # One launch of the float64 worker (BitNet's: see tests/bitnet_worker.py) for all five layouts.
    worker = os.path.join(REPO, "tests", "bitnet_worker.py")
    bitnet = {"model-family": "bitnet", "bitnet-variant": "hf-2b4t", **UNTIED}
    imported = [{"tensor-model-parallel-size": 2, "load": str(tmp_path / "run-True")},
                {"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, "load": str(tmp_path / "run-True")},
                {"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, **UNTIED,
                 "load": str(tmp_path / "run-False")}]
    layouts = imported + [{**bitnet, "tensor-model-parallel-size": 2, "sequence-parallel": True},
                          {**bitnet, "tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2}]
    [reference] = run_worker(tmp_path, 1, [bitnet], "bitnet-ref", worker=worker)
    results = run_worker(tmp_path, 4, layouts, "layouts", worker=worker)
    for layout, result in zip(imported, results):
        tied = "untie-embeddings-and-output-weights" not in layout
        assert result["loss"][0] == pytest.approx(hf_loss(hf[tied].eval()), rel=1e-5), layout
    for layout, result in zip(layouts[len(imported):], results[len(imported):]):
        assert_equivalent(result, reference, json.dumps(layout))


def test_hf_tokenizer_preprocesses_data_that_trains_from_an_import(tmp_path, monkeypatch):
    """tools/preprocess_data.py with a Hugging Face tokenizer writes the tokenizer's own ids (+ eos as eod);
    an imported checkpoint trains on that data with its recorded tokenizer, from iteration 0 with a fresh
    optimizer, given nothing but --load and --use-checkpoint-args."""
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [f"def add{i}(a, b):\n    return a + {i} * b\n" * 8 for i in range(40)]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tokenizer = hf_tokenizer(tmp_path / "hf")
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preprocess)
    monkeypatch.setattr(sys, "argv", ["preprocess_data.py", "--input", str(tmp_path / "docs.jsonl"), "--output-prefix",
                                      str(tmp_path / "data"), "--tokenizer-type", "HuggingFaceTokenizer",
                                      "--tokenizer-model", str(tmp_path / "hf" / "tokenizer.json"), "--append-eod",
                                      "--no-progress"])
    preprocess.main()
    dataset = IndexedDataset(str(tmp_path / "data_text_document"))
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    llama(tmp_path / "hf", vocab_size=len(tokenizer), max_position_embeddings=64)
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "run")
    args = ["--load", tmp_path / "run", "--use-checkpoint-args", "--data-path", tmp_path / "data_text_document",
            "--seq-length", 32, "--train-iters", 2, "--log-interval", 1, "--eval-interval", 0,
            "--micro-batch-size", 2, "--global-batch-size", 4, "--lr-warmup-iters", 0, "--split", "1,0,0"]
    out = run_trainer([str(a) for a in args], str(tmp_path / "cache"))
    assert "resumed from checkpoint at iteration 0" in out.stdout and sorted(losses(out.stdout)) == [1, 2]


# ------------------------------------------------------------------------------------------- refusals

def test_what_cannot_be_converted_is_refused_before_writing(tmp_path, capsys):
    llama(tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))

    def variant(name, **changes):
        (tmp_path / name).mkdir()
        os.link(tmp_path / "hf" / "model.safetensors", tmp_path / name / "model.safetensors")
        json.dump({**config, **changes}, open(tmp_path / name / "config.json", "w"))
        return tmp_path / name

    cases = [
        (variant("scaled", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
         [], "RoPE scaling", "rope_type 'llama3'"),
        (variant("unknown", qk_layernorm=True), [], "fields the import does not know", "qk_layernorm=True"),
        (variant("biased", attention_bias=True), [], "attention_bias=True (we compute False)", ""),
        (variant("narrow", intermediate_size=80), [], "has shape (96, 64), the model needs (80, 64)", ""),
        (tmp_path / "hf", ["--hidden-size", "32"], "--hidden-size is read from config.json", ""),
        (tmp_path / "hf", ["--model-family", "yoco"], "into gpt, longnet or bitnet", ""),
        (tmp_path / "hf", ["--lr", "1"], "--lr is not a model flag", ""),
    ]
    for source, flags, *expected in cases:
        err = refused(capsys, "from-hf", "--input", source, "--save", tmp_path / "run", *flags)
        assert all(e in err for e in expected), err
        assert not os.path.exists(tmp_path / "run"), source

    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "longnet", "--model-family", "longnet",
            "--segment-lengths", 16, "--dilated-ratios", 1)
    err = refused(capsys, "to-hf", "--load", tmp_path / "longnet", "--output", tmp_path / "out")
    assert "model family 'longnet' has no Hugging Face equivalent" in err and "to-torch" in err
    convert("from-hf", "--input", tmp_path / "hf", "--save", tmp_path / "bitnet", "--model-family", "bitnet")
    err = refused(capsys, "to-hf", "--load", tmp_path / "bitnet", "--output", tmp_path / "out")
    assert "--bitnet-variant hf-2b4t" in err and not os.path.exists(tmp_path / "out")
