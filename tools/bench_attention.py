"""Benchmark (not a test): LongNet's dilated attention against dense causal attention (PyTorch SDPA).

For each sequence length, times forward + backward of one attention call and records peak memory, as JSON:

    python tools/bench_attention.py --lengths 2048 4096 8192 16384 --output benchmarks/results/attention-cpu.json

The dilated patterns follow the paper's geometric shape scaled to the length: w = {L/8, L/4, L/2, L} capped
from below at --min-segment, r = {1, 2, 4, 8}, or fixed with --segment-lengths/--dilated-ratios.
Peak memory is recorded on GPU only (torch.cuda.max_memory_allocated above what was allocated before);
a CPU process's peak RSS never goes down, so it cannot attribute a peak to one call.
The goal the numbers are read against: dilated time grows linearly with L (x2 length -> <= x2.2 time) while
dense grows quadratically. On a GPU the dilated runs use the Triton kernels (megalatent/nn/dilated.py
dispatches, and the reference is timed beside them as "dilated-reference"), on CPU the plain-PyTorch
reference.

--peer: instead, the same comparison against the dilated-attention-pytorch library (PyPI, 0.2.0) at equal
attention FLOPs: that library splits the heads between the patterns while every head of ours runs every
pattern, so it gets --heads x (number of patterns) heads. Causal, fixed patterns; each (length, library)
point runs in a fresh process, which records its peak RSS above what it held before the inputs existed
(ru_maxrss; the allocator returns large blocks to the system at once, so the peak is the call's own):

    OMP_NUM_THREADS=1 python tools/bench_attention.py --peer --peer-python PEER_VENV/bin/python \
        --lengths 4096 8192 16384 32768 --heads 8 --segment-lengths 512 1024 2048 --dilated-ratios 1 2 4 \
        --output benchmarks/results/dilated-vs-peer-cpu.json

The library needs xformers, which has no CPU kernel for these shapes (its one CPU operator takes head dims
<= 32 and no causal mask) and whose wheels bring a CUDA torch: install the library with
`pip install --no-deps dilated-attention-pytorch einops` (into another venv if you like: --peer-python), and
this tool stands PyTorch's SDPA in for xformers.ops.memory_efficient_attention (on CPU that is the fused
flash attention our CPU path uses too).

--max-trainable-length: instead, the largest sequence length for which ONE training step (forward, backward,
clipping, AdamW) of the tiny LongNet (examples/tiny/longnet.yaml: its layers, widths, heads and patterns;
one sequence per step) completes on this device, and the same for that model with dense causal attention
(the gpt family). Lengths double from --start-length until a step fails, then the gap to the failure is
bisected --bisect-steps times. Each step runs in a fresh process, so its memory is its own:

    python tools/bench_attention.py --max-trainable-length --memory-limit-gb 4 --time-limit 60 \
        --output benchmarks/results/max-length-cpu.json

A step fails when it runs out of memory (GPU: torch.cuda.OutOfMemoryError, within --memory-limit-gb via
torch.cuda.set_per_process_memory_fraction if given; CPU: the process's resident memory, polled, passes
--memory-limit-gb) or when the process (start-up included) takes longer than --time-limit seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # this checkout's megalatent, also when it is not installed

from megalatent.kernels.backend import dilated_attention, dilated_uses_triton  # noqa: E402

TINY_LONGNET = os.path.join(REPO, "examples", "tiny", "longnet.yaml")


def patterns(length: int, min_segment: int) -> tuple[list[int], list[int]]:
    w = sorted({max(min_segment, length // 8), max(min_segment, length // 4), max(min_segment, length // 2), length})
    return w, [2 ** i for i in range(len(w))]


def measure(fn, q, k, v, repeats: int, device: torch.device) -> tuple[float, float, float | None]:
    """Median seconds of forward + backward (wall and this process's CPU time: on a shared machine the wall
    time includes waiting for a core), and the peak memory (GiB) it needed (GPU only)."""
    times, cpu_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats + 1):  # the first call warms up
        for x in (q, k, v):
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(q, k, v).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return statistics.median(times[1:]), statistics.median(cpu_times[1:]), peak


def tiny_config(length: int, kind: str, vocab_size: int, backend: str = "auto"):
    """The tiny LongNet's config at `length` tokens, one sequence per step; kind "dense" swaps in the same
    decoder with dense causal attention."""
    from megalatent.config import ModelConfig
    from megalatent.families import parse_args, validate
    argv = ["--config", TINY_LONGNET, "--seq-length", str(length), "--vocab-size", str(vocab_size),
            "--attention-backend", backend,
            "--micro-batch-size", "1", "--global-batch-size", "1"]
    if kind == "dense":
        argv += ["--model-family", "gpt"]
    cfg = parse_args(argv)
    if kind == "dense":  # the same shared fields, without the dilated patterns
        shared = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)}
        cfg.model = ModelConfig(**{**shared, "model_family": "gpt"})
    validate(cfg)
    return cfg


def train_one_step(length: int, kind: str, vocab_size: int, memory_limit_gb: float | None,
                   backend: str = "auto") -> dict:
    """One training step at `length` tokens in this process (the child of `trial`); its measurements."""
    from megalatent.families import build_model
    from megalatent.training.optim import build_optimizer, clip_grad_norm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and memory_limit_gb:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, memory_limit_gb * 2**30 / torch.cuda.get_device_properties(device).total_memory))
    cfg = tiny_config(length, kind, vocab_size, backend)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.training)
    tokens = torch.randint(0, vocab_size, (1, length + 1), device=device)
    base_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    try:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # as the trainer on GPU
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        clip_grad_norm([model], cfg.training.clip_grad)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return {"status": "out of memory", "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"status": "ok", "step_s": time.perf_counter() - t0, "loss": loss.item(), "peak_gib": peak,
            "base_gib": None if device.type == "cuda" else base_gib}


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def trial(length: int, kind: str, args) -> dict:
    """`train_one_step` in a fresh process, killed past the time limit or (CPU) the memory limit."""
    cmd = [sys.executable, os.path.abspath(__file__), "--trial-step", str(length), kind,
           "--vocab-size", str(args.vocab_size), "--attention-backend", args.attention_backend]
    if args.memory_limit_gb:
        cmd += ["--memory-limit-gb", str(args.memory_limit_gb)]
    cap = args.memory_limit_gb if not torch.cuda.is_available() else None
    record = {"length": length, "kind": kind}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)
        start, rss = time.perf_counter(), 0.0
        while child.poll() is None:
            rss = max(rss, _rss_gib(child.pid))
            if cap and rss > cap:
                record["status"] = f"over --memory-limit-gb {cap}"
            elif time.perf_counter() - start > args.time_limit:
                record["status"] = f"over --time-limit {args.time_limit} s"
            if "status" in record:
                child.kill()
                child.wait()
                break
            time.sleep(0.05)
        record["wall_s"] = time.perf_counter() - start
        if "status" in record:
            record["peak_gib"] = rss
            return record
        out.seek(0)
        lines = out.read().strip().splitlines()
        if child.returncode != 0 or not lines:
            err.seek(0)
            tail = err.read()[-2000:]
            oom = "out of memory" in tail.lower() or child.returncode == -9
            return {**record, "status": "out of memory" if oom else f"failed ({child.returncode})", "error": tail}
        return {**record, **json.loads(lines[-1])}


def max_trainable_length(kind: str, args) -> tuple[int | None, list[dict]]:
    """Double from --start-length until a step fails, then bisect the gap --bisect-steps times."""
    records, best, length = [], None, args.start_length
    failed = None
    while length <= args.max_length:
        records.append(trial(length, kind, args))
        _print_trial(records[-1])
        if records[-1]["status"] != "ok":
            failed = length
            break
        best, length = length, length * 2
    if best is not None and failed is not None:
        step = best // 2
        for _ in range(args.bisect_steps):
            if step < 256 or best + step >= failed:
                break
            records.append(trial(best + step, kind, args))
            _print_trial(records[-1])
            if records[-1]["status"] == "ok":
                best += step
            else:
                failed = best + step
            step //= 2
    return best, records


def _print_trial(r: dict) -> None:
    extra = f"{r['step_s']:.2f} s/step, loss {r['loss']:.3f}" if r["status"] == "ok" else r["status"]
    print(f"{r['kind']:>8} {r['length']:>9} tokens  peak {r.get('peak_gib') or 0:6.2f} GiB  "
          f"wall {r['wall_s']:6.1f} s  {extra}", flush=True)


PEER = "dilated-attention-pytorch"


def _max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _xformers_on_sdpa() -> None:
    """Stand PyTorch's SDPA in for xformers before the peer library imports it (see the module's doc): the
    library calls xformers.ops.memory_efficient_attention on [b, n, h, d] with a LowerTriangularMask when causal."""
    import types

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, op=None):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        causal = isinstance(attn_bias, LowerTriangularMask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask, ops.AttentionOp = (
        memory_efficient_attention, LowerTriangularMask, object)
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules.update({"xformers": package, "xformers.ops": ops})


def peer_point(implementation: str, length: int, args) -> dict:
    """Forward + backward of one causal call at `length` tokens in this (fresh) process: ours with --heads
    heads, each in every pattern, or the peer library with --heads x patterns heads split between them."""
    w, r = args.segment_lengths, args.dilated_ratios
    if implementation == PEER:
        _xformers_on_sdpa()
        from dilated_attention_pytorch.dilated_attention import DilatedAttention
        peer = DilatedAttention(w, r)
        shape = (args.batch, length, args.heads * len(w), args.head_dim)  # its layout: [b, n, h, d]
        heads = shape[2]
        fn = lambda q, k, v: peer(q, k, v, is_causal=True)  # noqa: E731
    else:
        shape = (args.batch, args.heads, length, args.head_dim)
        heads = shape[1]
        fn = lambda q, k, v: dilated_attention(q, k, v, w, r, causal=True)  # noqa: E731
    base = _max_rss_gib()
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    seconds, cpu_seconds, _ = measure(fn, q, k, v, args.repeats, torch.device("cpu"))
    peak = _max_rss_gib()
    return {"implementation": implementation, "length": length, "heads": heads, "ms": 1000 * seconds,
            "cpu_ms": 1000 * cpu_seconds, "peak_rss_gib": peak, "base_rss_gib": base,
            "peak_above_base_gib": peak - base}


def peer_main(args) -> None:
    """--peer: every (length, implementation) point in its own process, the implementations taking turns."""
    if not args.segment_lengths or not args.dilated_ratios:
        raise SystemExit("--peer needs --segment-lengths and --dilated-ratios")
    forwarded = ["--heads", str(args.heads), "--head-dim", str(args.head_dim), "--batch", str(args.batch),
                 "--repeats", str(args.repeats), "--segment-lengths", *map(str, args.segment_lengths),
                 "--dilated-ratios", *map(str, args.dilated_ratios)]
    print(f"{'length':>8} {'implementation':>26} {'heads':>5} {'ms fwd+bwd':>11} {'CPU ms':>9} {'peak GiB':>9}")
    records = []
    for length in args.lengths:
        for implementation in args.implementations:
            python = args.peer_python if implementation == PEER else sys.executable
            cmd = [python, os.path.abspath(__file__), "--peer-point", implementation, str(length), *forwarded]
            child = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if child.returncode != 0:
                raise SystemExit(f"{implementation} at {length} failed:\n{child.stderr[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            records.append(r)
            print(f"{length:>8} {implementation:>26} {r['heads']:>5} {r['ms']:>11.1f} {r['cpu_ms']:>9.1f} "
                  f"{r['peak_above_base_gib']:>9.3f}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(torch.float32), "segment_lengths": args.segment_lengths,
                       "dilated_ratios": args.dilated_ratios, "head_dim": args.head_dim, "batch": args.batch,
                       "equal_flops": f"megalatent: {args.heads} heads, each in all {len(args.segment_lengths)} "
                                      f"patterns; {PEER}: {args.heads * len(args.segment_lengths)} heads split "
                                      "between the patterns", "records": records}, f, indent=1)


def environment(dtype) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda
            else platform.processor() or platform.machine(), "dtype": str(dtype),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
            "dilated_kernel": cuda}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--trial-step":  # the child of `trial`
        parser = argparse.ArgumentParser()
        parser.add_argument("--trial-step", nargs=2)
        parser.add_argument("--vocab-size", type=int)
        parser.add_argument("--memory-limit-gb", type=float)
        parser.add_argument("--attention-backend")
        a = parser.parse_args()
        print(json.dumps(train_one_step(int(a.trial_step[0]), a.trial_step[1], a.vocab_size, a.memory_limit_gb,
                                        a.attention_backend)))
        return
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
    peer = parser.add_argument_group(f"--peer (against {PEER} at equal attention FLOPs, CPU)")
    peer.add_argument("--peer", action="store_true", help=f"compare with {PEER} instead of dense attention")
    peer.add_argument("--peer-python", default=sys.executable,
                      help=f"the Python that has {PEER} and einops installed (default: this one)")
    peer.add_argument("--implementations", nargs="+", default=["megalatent", PEER], choices=["megalatent", PEER])
    peer.add_argument("--peer-point", nargs=2, metavar=("IMPLEMENTATION", "LENGTH"), help=argparse.SUPPRESS)
    search = parser.add_argument_group("--max-trainable-length (one training step of the tiny LongNet)")
    search.add_argument("--max-trainable-length", action="store_true",
                        help="search the longest sequence one training step fits, dilated and dense")
    search.add_argument("--kinds", nargs="+", default=["dilated", "dense"], choices=["dilated", "dense"])
    search.add_argument("--start-length", type=int, default=1024)
    search.add_argument("--max-length", type=int, default=2**24, help="stop doubling here")
    search.add_argument("--bisect-steps", type=int, default=2, help="halvings of the gap after the first failure")
    search.add_argument("--memory-limit-gb", type=float,
                        help="CPU: cap on the step process's resident memory (needed there); GPU: optional cap")
    search.add_argument("--time-limit", type=float, default=300.0, help="seconds per step process, start-up included")
    search.add_argument("--vocab-size", type=int, default=8192, help="the tiny configs' tokenizer size")
    search.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"],
                        help="dilated attention's implementation (torch: the PyTorch reference on a GPU too)")
    args = parser.parse_args()
    if args.peer_point:  # the child of peer_main
        print(json.dumps(peer_point(args.peer_point[0], int(args.peer_point[1]), args)))
        return
    if args.peer:
        return peer_main(args)
    if args.max_trainable_length:
        return search_main(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    print(f"{'length':>8} {'kind':>17} {'ms fwd+bwd':>11} {'CPU ms':>9} {'peak GiB':>9}  patterns")
    for length in args.lengths:
        w, r = (args.segment_lengths, args.dilated_ratios) if args.segment_lengths else patterns(length, args.min_segment)
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        runs = [("dilated", lambda q, k, v: dilated_attention(q, k, v, w, r, causal=True))]
        if dilated_uses_triton(q, k, v):  # "dilated" ran the Triton kernels: time the reference too
            runs.append(("dilated-reference", lambda q, k, v: dilated_attention(q, k, v, w, r, causal=True,
                                                                                backend="torch")))
        if length <= args.dense_max_length:
            runs.append(("dense", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        for kind, fn in runs:
            try:
                seconds, cpu_seconds, peak = measure(fn, q, k, v, args.repeats, device)
            except torch.cuda.OutOfMemoryError:  # recorded; the other kinds (and longer lengths) still run
                torch.cuda.empty_cache()
                records.append({"length": length, "kind": kind, "status": "out of memory"})
                print(f"{length:>8} {kind:>17} {'out of memory':>11}", flush=True)
                continue
            records.append({"length": length, "kind": kind, "ms": 1000 * seconds, "cpu_ms": 1000 * cpu_seconds,
                            "peak_gib": peak,
                            "segment_lengths": w if kind != "dense" else None,
                            "dilated_ratios": r if kind != "dense" else None})
            memory = f"{peak:>9.3f}" if peak is not None else f"{'-':>9}"
            print(f"{length:>8} {kind:>17} {1000 * seconds:>11.1f} {1000 * cpu_seconds:>9.1f} {memory}  "
                  f"{(w, r) if kind != 'dense' else ''}",
                  flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(dtype), "records": records}, f, indent=1)


def search_main(args) -> None:
    cuda = torch.cuda.is_available()
    if not cuda and not args.memory_limit_gb:
        raise SystemExit("--max-trainable-length on CPU needs --memory-limit-gb (the machine would swap first)")
    cfg = tiny_config(args.start_length, "dilated", args.vocab_size).model
    print(f"tiny LongNet: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
          f"({cfg.kv_heads} K/V), w={cfg.segment_lengths} r={cfg.dilated_ratios}, vocab {args.vocab_size}; "
          f"limits: {args.memory_limit_gb or 'device'} GiB, {args.time_limit:.0f} s", flush=True)
    result, records = {}, []
    for kind in args.kinds:
        result[kind], trials = max_trainable_length(kind, args)
        records += trials
        print(f"{kind}: longest sequence that trains one step: {result[kind]}", flush=True)
    if args.output:
        limits = {"memory_limit_gb": args.memory_limit_gb, "time_limit_s": args.time_limit,
                  "start_length": args.start_length, "max_length": args.max_length, "bisect_steps": args.bisect_steps}
        model = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                               "segment_lengths", "dilated_ratios", "vocab_size")}
        with open(args.output, "w") as f:
            json.dump({"environment": environment(torch.bfloat16 if cuda else torch.float32), "model": model,
                       "limits": limits, "max_trainable_length": result, "trials": records}, f, indent=1)


if __name__ == "__main__":
    main()
