"""Benchmark (not a test): LongNet's dilated attention against dense causal attention (PyTorch SDPA).

For each sequence length, times forward + backward of one attention call and records peak memory, as JSON:

    python tools/bench_attention.py --lengths 2048 4096 8192 16384 --output benchmarks/results/attention-cpu.json

The dilated patterns follow the paper's geometric shape scaled to the length: w = {L/8, L/4, L/2, L} capped
from below at --min-segment, r = {1, 2, 4, 8}, or fixed with --segment-lengths/--dilated-ratios.
Peak memory is recorded on GPU only (torch.cuda.max_memory_allocated above what was allocated before);
a CPU process's peak RSS never goes down, so it cannot attribute a peak to one call.
The goal the numbers are read against: dilated time grows linearly with L (x2 length -> <= x2.2 time) while
dense grows quadratically.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from megalatent.nn.dilated import dilated_attention


def patterns(length: int, min_segment: int) -> tuple[list[int], list[int]]:
    w = sorted({max(min_segment, length // 8), max(min_segment, length // 4), max(min_segment, length // 2), length})
    return w, [2 ** i for i in range(len(w))]


def measure(fn, q, k, v, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of forward + backward, and the peak memory (GiB) it needed (GPU only)."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats + 1):  # the first call warms up
        for x in (q, k, v):
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(q, k, v).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return statistics.median(times[1:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-segment", type=int, default=512)
    parser.add_argument("--segment-lengths", type=int, nargs="+", help="fixed patterns instead of scaled ones")
    parser.add_argument("--dilated-ratios", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-max-length", type=int, default=16384, help="skip dense attention above this")
    parser.add_argument("--output", help="write the records as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    print(f"{'length':>8} {'kind':>8} {'ms fwd+bwd':>11} {'peak GiB':>9}  patterns")
    for length in args.lengths:
        w, r = (args.segment_lengths, args.dilated_ratios) if args.segment_lengths else patterns(length, args.min_segment)
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        runs = [("dilated", lambda q, k, v: dilated_attention(q, k, v, w, r, causal=True))]
        if length <= args.dense_max_length:
            runs.append(("dense", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        for kind, fn in runs:
            seconds, peak = measure(fn, q, k, v, args.repeats, device)
            records.append({"length": length, "kind": kind, "ms": 1000 * seconds, "peak_gib": peak,
                            "segment_lengths": w if kind == "dilated" else None,
                            "dilated_ratios": r if kind == "dilated" else None})
            memory = f"{peak:>9.3f}" if peak is not None else f"{'-':>9}"
            print(f"{length:>8} {kind:>8} {1000 * seconds:>11.1f} {memory}  {(w, r) if kind == 'dilated' else ''}",
                  flush=True)
    if args.output:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda"
               else platform.processor() or platform.machine(), "dtype": str(dtype),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "command": " ".join(sys.argv), "threads": torch.get_num_threads()}
        with open(args.output, "w") as f:
            json.dump({"environment": env, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
