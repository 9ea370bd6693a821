"""Benchmark (not a test): an MoE / MH-MoE layer against the dense SwiGLU MLP with the same active
parameters, and how much of the MoE layer's time is routing and dispatch rather than expert matmuls.

    python tools/bench_moe.py --output benchmarks/results/moe-cpu.json

For each MH-MoE head count h the layer has --experts experts of width (dense width / top-k), so that a
token's h sub-tokens through k experts do the dense MLP's FLOPs (plus 4 d^2 for MH-MoE's head and merge
projections when h > 1). Times are forward + backward of one call on --tokens tokens. "experts only" runs
the same grouped matmuls on tokens already sorted by expert with the same per-expert counts; the rest of
the layer's time (router, sort, gather, weighted scatter back, head/merge) is reported as the dispatch
overhead and its share of the layer's time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench_parallel import environment  # tools/ is on sys.path when run as a script
from megalatent.nn.mlp import SwiGLU
from megalatent.nn.moe import MoELayer


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() (forward + backward), after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dense-ffn", type=int, default=1408, help="the dense SwiGLU's width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    d, expert_ffn = args.hidden, args.dense_ffn // args.topk
    x = torch.randn(1, args.tokens, d, device=device, dtype=dtype, requires_grad=True)

    def fwd_bwd(module):
        return lambda: module(x).float().square().mean().backward()

    dense = SwiGLU(d, args.dense_ffn).to(device, dtype)
    dense_s = timed(fwd_bwd(dense), args.repeats, device)
    records = [{"kind": "dense", "ffn": args.dense_ffn, "ms": 1000 * dense_s, "tokens_per_s": args.tokens / dense_s,
                "flops_per_token": 6 * d * args.dense_ffn}]
    print(f"{'layer':>14} {'ms fwd+bwd':>11} {'tokens/s':>10} {'vs dense':>9} {'dispatch share':>15}")
    print(f"{'dense':>14} {1000 * dense_s:>11.1f} {args.tokens / dense_s:>10.0f} {1.0:>9.2f}")
    for h in args.heads:
        layer = MoELayer(d, expert_ffn, args.experts, args.topk, heads=h).to(device, dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.02)
        moe_s = timed(fwd_bwd(layer), args.repeats, device)
        # The same expert work on pre-sorted sub-tokens with the counts this routing produced.
        with torch.no_grad():
            sub = (layer.head_proj(x) if layer.head_proj is not None else x).reshape(-1, d // h)
            counts = torch.bincount(layer.router(sub).experts.flatten(), minlength=args.experts)
        sorted_rows = torch.randn(int(counts.sum()), d // h, device=device, dtype=dtype, requires_grad=True)
        experts_s = timed(lambda: layer.experts(sorted_rows, counts).float().square().mean().backward(),
                          args.repeats, device)
        share = (moe_s - experts_s) / moe_s
        flops = 6 * d * expert_ffn * args.topk + 2 * d * args.experts + (4 * d * d if h > 1 else 0)
        records.append({"kind": "moe", "heads": h, "experts": args.experts, "topk": args.topk, "expert_ffn": expert_ffn,
                        "ms": 1000 * moe_s, "tokens_per_s": args.tokens / moe_s, "experts_only_ms": 1000 * experts_s,
                        "dispatch_share": share, "speed_vs_dense": dense_s / moe_s, "flops_per_token": flops,
                        "max_expert_load": float(counts.max() / counts.float().mean())})
        print(f"{f'MoE h={h}':>14} {1000 * moe_s:>11.1f} {args.tokens / moe_s:>10.0f} {dense_s / moe_s:>9.2f} "
              f"{100 * share:>14.1f}%", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(sys.argv), "config": vars(args), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
