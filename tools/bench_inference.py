"""Benchmark (not a test): YOCO against the baseline decoder of the same size at inference — the cache
after prefill (bytes), the prefill time and the decoding speed after it, over context lengths, as JSON.

    python tools/bench_inference.py --lengths 1024 4096 16384 65536 --output benchmarks/results/inference-cpu.json

Both models are built from the same shape flags (layers, width, heads, K/V heads, FFN): the baseline
`gpt` caches K/V in every layer and prefills with every layer over the whole prompt; YOCO caches one
K^/V^ plus a constant-size state per self-decoder layer, and its prefill runs the cross-decoder for the
last token only. A length is skipped for a model once its prefill took longer than --max-seconds at a
shorter length (the next would take about (ratio of lengths)^k times longer).

Beside the measurements, the same quantities are computed analytically for the paper's YOCO-3B
(examples/cluster/yoco_3b.yaml, bf16 weights and caches, fp32 retention state) at the paper's lengths
and printed next to the paper's numbers (§4.4: 9.4x less memory at 1M, 71.8x faster prefill at 1M):
memory = weights + cache; prefill = forward FLOPs (a proxy for time on a compute-bound GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time

import torch

from megalatent.config import ModelConfig
from megalatent.inference.generate import decode_step, prefill
from megalatent.families import build_model, model_config, parse_args

PAPER = {"memory_ratio_1m": 9.4, "prefill_speedup_1m": 71.8, "prefill_speedup_32k": 2.87, "memory_ratio_32k": 2.0}


def model_configs(args) -> tuple[ModelConfig, ModelConfig]:
    shape = dict(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                 group_query_attention=True, num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn,
                 vocab_size=args.vocab_size, seq_length=max(args.lengths), rotary_base=args.rotary_base)
    yoco = model_config(model_family="yoco", yoco_self_attention=args.self_attention,
                       sliding_window_size=args.window if args.self_attention == "swa" else None,
                       retention_chunk_size=args.chunk, attention_backend=args.attention_backend, **shape)
    return yoco, model_config(model_family="gpt", **shape)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, length: int, device, repeats: int, decode_tokens: int) -> tuple[int, float, float]:
    """(cache bytes after prefill, median prefill seconds, decode tokens/s) for a random prompt of `length`
    tokens; decoding runs `decode_tokens` greedy steps against the last prefill's cache."""
    prompt = torch.randint(0, 1000, (1, length), device=device)
    prefill(model, prompt[:, :256], model.new_cache())  # warm up (allocator, kernels)
    times, cache, logits = [], None, None
    for _ in range(repeats):
        cache = model.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        logits = prefill(model, prompt, cache)
        _sync(device)
        times.append(time.perf_counter() - t0)
    nbytes = cache.nbytes()
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = decode_step(model, logits.argmax(-1), cache)
    _sync(device)
    return nbytes, sorted(times)[len(times) // 2], decode_tokens / max(time.perf_counter() - t0, 1e-9)


# ---------------------------------------------------------------- analytic: the paper's 3B
def cache_bytes(cfg: ModelConfig, n: int, elem: int = 2) -> int:
    kv_token = 2 * cfg.kv_heads * cfg.head_dim * elem  # one layer's K and V of one token
    if cfg.model_family != "yoco":
        return cfg.num_layers * kv_token * n
    n_self = cfg.num_layers // 2
    if cfg.yoco_self_attention == "swa":
        per_layer = kv_token * min(n, cfg.sliding_window_size - 1)
    else:
        per_layer = cfg.num_attention_heads * cfg.head_dim * cfg.head_dim * 4  # fp32 state
    return kv_token * n + n_self * per_layer


def prefill_flops(cfg: ModelConfig, n: int) -> float:
    """Forward FLOPs of a prefill of n tokens (2 per multiply-add). Baseline: every layer over every token,
    causal attention over n/2 keys on average. YOCO: the self-decoder and K^/V^ over every token, the
    cross-decoder and the head for the last token only (early exit)."""
    h, kv_dim = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    mlp = 2 * h * cfg.mlp_width * (3 if cfg.swiglu else 2)
    head = 2 * h * cfg.padded_vocab_size
    if cfg.model_family != "yoco":
        per_token = cfg.num_layers * (2 * h * (2 * h + 2 * kv_dim) + mlp + 2 * 2 * h * n / 2)
        return n * per_token + head
    n_self, n_cross = cfg.num_layers // 2, cfg.num_layers - cfg.num_layers // 2
    if cfg.yoco_self_attention == "swa":
        c = min(cfg.sliding_window_size, n)
        mixing = 2 * h * (2 * h + 2 * kv_dim) + 2 * 2 * h * (c - c * (c - 1) / (2 * n))
    else:
        b = min(cfg.retention_chunk_size, n)
        mixing = 2 * h * (5 * h + cfg.num_attention_heads) + 2 * 2 * h * b / 2 + 2 * 2 * h * cfg.head_dim
    self_part = n * (n_self * (mixing + mlp) + 2 * h * 2 * kv_dim)
    cross_last = n_cross * (2 * h * 2 * h + mlp + 2 * 2 * h * n)
    return self_part + cross_last + head


def paper_3b_analysis(lengths: list[int]) -> list[dict]:
    cfg = parse_args(["--config", "examples/cluster/yoco_3b.yaml", "--vocab-size", "100288"]).model
    gpt = dataclasses.replace(cfg, model_family="gpt")
    with torch.device("meta"):
        params = {m.model_family: sum(p.numel() for p in build_model(m).parameters()) for m in (cfg, gpt)}
    rows = []
    for n in lengths:
        mem = {f: params[f] * 2 + cache_bytes(m, n) for f, m in (("yoco", cfg), ("gpt", gpt))}
        flops = {f: prefill_flops(m, n) for f, m in (("yoco", cfg), ("gpt", gpt))}
        rows.append({"length": n, "weights_gb": {f: params[f] * 2 / 1e9 for f in params},
                     "cache_gb": {"yoco": cache_bytes(cfg, n) / 1e9, "gpt": cache_bytes(gpt, n) / 1e9},
                     "memory_ratio": mem["gpt"] / mem["yoco"], "cache_ratio": cache_bytes(gpt, n) / cache_bytes(cfg, n),
                     "prefill_tflop": {f: v / 1e12 for f, v in flops.items()},
                     "prefill_flop_ratio": flops["gpt"] / flops["yoco"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--rotary-base", type=float, default=10000.0)
    p.add_argument("--self-attention", choices=["gret", "swa"], default="gret")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--attention-backend", choices=["auto", "triton", "torch"], default="torch",
                   help="YOCO gRet prefill: the PyTorch chunkwise form (torch) or the Triton kernel (triton; auto "
                        "takes it on a GPU)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decoding steps timed after the prefill")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop growing a model's length past this")
    p.add_argument("--paper-lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--output", help="write the records as JSON here")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    configs = model_configs(args)
    models = {cfg.model_family: build_model(cfg).to(device, dtype).eval() for cfg in configs}
    params = {f: sum(p.numel() for p in m.parameters()) for f, m in models.items()}
    print(f"parameters: yoco ({args.self_attention}) {params['yoco']:,}, baseline {params['gpt']:,}; {device}, {dtype}")
    records, too_slow = [], set()
    print(f"{'length':>8} {'yoco cache MiB':>15} {'gpt cache MiB':>14} {'ratio':>7} {'yoco prefill s':>15} "
          f"{'gpt prefill s':>14} {'speed-up':>9} {'yoco decode tok/s':>18} {'gpt decode tok/s':>17}")
    for n in sorted(args.lengths):
        row = {"length": n}
        for family, model in models.items():
            if family in too_slow:
                continue
            nbytes, seconds, decode = measure(model, n, device, args.repeats, args.decode_tokens)
            row[family] = {"cache_bytes": nbytes, "prefill_s": seconds, "decode_tokens_per_s": decode}
            if seconds > args.max_seconds:
                too_slow.add(family)
        records.append(row)

        def fmt(family, key, scale, width):
            return f"{row[family][key] / scale:>{width}.3f}" if family in row else f"{'-':>{width}}"
        both = "yoco" in row and "gpt" in row
        ratio = f"{row['gpt']['cache_bytes'] / row['yoco']['cache_bytes']:>7.1f}" if both else f"{'-':>7}"
        speed = f"{row['gpt']['prefill_s'] / row['yoco']['prefill_s']:>9.1f}" if both else f"{'-':>9}"
        print(f"{n:>8} {fmt('yoco', 'cache_bytes', 2**20, 15)} {fmt('gpt', 'cache_bytes', 2**20, 14)} {ratio} "
              f"{fmt('yoco', 'prefill_s', 1, 15)} {fmt('gpt', 'prefill_s', 1, 14)} {speed} "
              f"{fmt('yoco', 'decode_tokens_per_s', 1, 18)} {fmt('gpt', 'decode_tokens_per_s', 1, 17)}", flush=True)

    analysis = paper_3b_analysis(args.paper_lengths)
    print("\nYOCO-3B vs a 3B Transformer of the same shape, analytic (bf16 weights + cache; prefill forward FLOPs):")
    print(f"{'length':>8} {'cache GB yoco/gpt':>20} {'memory ratio':>13} {'prefill FLOP ratio':>19}")
    for r in analysis:
        print(f"{r['length']:>8} {r['cache_gb']['yoco']:>9.2f}/{r['cache_gb']['gpt']:<10.2f} {r['memory_ratio']:>13.1f} "
              f"{r['prefill_flop_ratio']:>19.1f}")
    print("paper (H100, measured): memory 9.4x at 1M (~2x at 32K); prefill 71.8x at 1M, 2.87x at 32K")
    if args.output:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda"
               else platform.processor() or platform.machine(), "dtype": str(dtype), "threads": torch.get_num_threads(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "command": " ".join(sys.argv), "parameters": params}
        with open(args.output, "w") as f:
            json.dump({"environment": env, "records": records, "paper_3b_analytic": analysis, "paper": PAPER}, f,
                      indent=1)


if __name__ == "__main__":
    main()
