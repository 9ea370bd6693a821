"""Decoding with caches against full forward passes, for every family: the logits of an early-exit
prefill and of each decode step equal those of a full forward over the growing sequence (baseline and
LongNet with an ordinary KV cache, YOCO with its window / retention states and one shared K^/V^);
YOCO's cache sizes; greedy and sampled generation."""
import pytest
import torch

from megalatent.nn.cache import KVCache, RetentionState, WindowKVCache
from megalatent.inference.generate import decode_step, generate, prefill, sample
from megalatent.families import model_config, build_model

FAMILIES = {
    "gpt": {},
    "longnet": dict(model_family="longnet", segment_lengths=[4, 8, 16], dilated_ratios=[1, 2, 4]),
    "longnet-long-segments": dict(model_family="longnet", segment_lengths=[6, 64], dilated_ratios=[2, 3]),
    "yoco-gret": dict(model_family="yoco", retention_chunk_size=4),
    "yoco-swa": dict(model_family="yoco", yoco_self_attention="swa", sliding_window_size=5),
}


def tiny(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
                vocab_size=100, seq_length=32, make_vocab_size_divisible_by=64)
    return model_config(**{**base, **kw})


def model_of(name, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny(**FAMILIES[name])).double().eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefill_and_decode_equal_full_forward(name):
    model = model_of(name)
    tokens = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    cache = model.new_cache()
    torch.testing.assert_close(prefill(model, tokens[:, :7], cache), full[:, 6].float(), rtol=1e-5, atol=1e-5)
    for t in range(7, 21):
        torch.testing.assert_close(decode_step(model, tokens[:, t], cache), full[:, t].float(), rtol=1e-5, atol=1e-5)


def test_yoco_prefill_runs_the_cross_decoder_for_the_last_token_only():
    model = model_of("yoco-gret")
    seen = {}
    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].shape[1]))
    prefill(model, torch.randint(0, 100, (1, 12)), model.new_cache())
    assert seen == {"0": 12, "1": 12, "2": 1, "3": 1}


@pytest.mark.parametrize("name", ["yoco-gret", "yoco-swa"])
def test_yoco_cache_is_constant_per_layer_plus_one_shared_kv(name):
    model, cfg = model_of(name), tiny(**FAMILIES[name])
    cache = model.new_cache()
    kinds = {type(c) for c in cache.layers.values()}
    assert set(cache.layers) == {"0", "1"} and kinds == ({RetentionState} if "gret" in name else {WindowKVCache})
    assert isinstance(cache.shared, KVCache)
    sizes = []
    prefill(model, torch.randint(0, 100, (1, 9)), cache)
    for t in range(6):
        self_bytes = sum(c.nbytes() for c in cache.layers.values())
        sizes.append(self_bytes)
        assert cache.shared.nbytes() == 2 * cfg.kv_heads * cfg.head_dim * (10 + t - 1) * 8  # K^, V^: fp64 here
        decode_step(model, torch.tensor([3]), cache)
    assert len(set(sizes)) == 1  # the self-decoder's state does not grow
    per_layer = 4 * 8 * 8 if "gret" in name else 2 * 2 * 8 * (5 - 1)  # heads x d x d  |  K+V x kv x d x (C-1)
    assert sizes[0] == 2 * per_layer * 8
    gpt = model_of("gpt")
    gpt_cache = gpt.new_cache()
    prefill(gpt, torch.randint(0, 100, (1, 9)), gpt_cache)
    assert gpt_cache.nbytes() == 4 * 2 * cfg.kv_heads * cfg.head_dim * 9 * 8  # every layer caches its K/V


def test_greedy_generation_is_argmax_of_full_forward():
    model = model_of("yoco-swa")
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, max_new_tokens=6, vocab_size=100)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 11):
            torch.testing.assert_close(out[:, t], model(out[:, :t])[:, -1, :100].argmax(-1))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits).item() == 1
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p: the two top tokens hold ~0.85 of the mass, so 0.8 keeps both and 0.3 only the first
    assert {sample(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(200)} == {1, 2}
    assert {sample(logits, 1.0, top_p=0.3, generator=g).item() for _ in range(50)} == {1}
    assert len({sample(logits, 5.0, generator=g).item() for _ in range(300)}) == 5  # high temperature: all


def test_generation_is_reproducible_and_stops_at_eos():
    model = model_of("gpt")
    prompt = torch.randint(0, 100, (1, 4))
    a = generate(model, prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    greedy = generate(model, prompt, 8, vocab_size=100)
    last = max(t for t in range(4, 12) if int(greedy[0, t]) not in greedy[0, 4:t].tolist())  # a token's first time
    stopped = generate(model, prompt, 8, vocab_size=100, eos_id=int(greedy[0, last]))
    assert torch.equal(stopped, greedy[:, :last + 1])


def test_generate_tool_from_a_trained_checkpoint(tmp_path, corpus_cache, capsys):
    """Train a tiny YOCO with the trainer, then tools/generate.py continues a prompt from its checkpoint,
    greedily, exactly as `generate` on the model that load_for_inference rebuilds."""
    from conftest import load_tool, run_trainer
    from megalatent.data.tokenizer import Tokenizer
    from megalatent.inference.loading import load_for_inference

    save = str(tmp_path / "ckpt")
    run_trainer(["--model-family", "yoco", "--yoco-self-attention", "swa", "--sliding-window-size", "16",
                 "--num-layers", "2", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
                 "--train-iters", "2", "--lr-warmup-iters", "0", "--eval-interval", "0", "--save", save], corpus_cache)
    capsys.readouterr()
    assert load_tool("generate").main(["--load", save, "--prompt", "import os", "--max-new-tokens", "8",
                                       "--no-stop-at-eos"]) == 0
    out = capsys.readouterr()
    assert "yoco model from" in out.err and "cache" in out.err
    loaded = load_for_inference(save)
    tok = Tokenizer.load(loaded.tokenizer_model)
    ids = generate(loaded.model, torch.tensor([tok.encode("import os")]), 8, vocab_size=tok.vocab_size)
    assert out.out.rstrip("\n") == "import os" + tok.decode(ids[0, len(tok.encode("import os")):].tolist())


def test_kv_cache_appends_in_place_into_doubling_buffers():
    """The cache returns exactly the concatenation of everything appended, while its buffers grow by doubling
    (few reallocations, never more than twice the tokens held)."""
    from megalatent.nn.rotary import Positions

    torch.manual_seed(0)
    cache, ks, vs, reallocations, buffer = KVCache(), [], [], 0, None
    for step, n in enumerate([3] + [1] * 20):
        k, v = torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4)
        ids = torch.arange(cache.length, cache.length + n).expand(2, n)
        ks.append(k)
        vs.append(v)
        keys, values, positions = cache.update(k, v, Positions(ids, None))
        torch.testing.assert_close(keys, torch.cat(ks, dim=2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat(vs, dim=2), rtol=0, atol=0)
        if step:
            assert positions.key_ids.tolist() == [list(range(cache.length))] * 2
        reallocations += cache._k.data_ptr() != buffer
        buffer = cache._k.data_ptr()
        assert cache.length <= cache._k.shape[2] <= 2 * cache.length
    assert reallocations == 4  # 3 -> 6 -> 12 -> 24 tokens
    assert cache.nbytes() == 2 * 23 * 2 * 2 * 4 * 4
