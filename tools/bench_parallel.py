"""Throughput and memory of the parallel engine at several layouts, for one fixed model and global batch.

For each layout the tool launches itself under ``torch.distributed.run --standalone`` (one launch per
layout, so that every layout starts from a fresh process and the per-process peak memory is its own; a
one-process layout runs without torchrun),
builds the model exactly as ``megalatent.pretrain`` does (``parse_args``, ``validate``,
``ParallelLayout.from_config``, ``build_mesh``, ``pretrain.build_model_parts`` = ``build_model`` + the
pipeline split + ``parallelize``, ``Trainer``), feeds
synthetic token batches through ``MicroBatchLoader`` and times ``--steps`` calls of
``Trainer.train_step`` (full optimizer steps) after ``--warmup`` untimed ones. It records per layout:
step time (median/mean/min/max over the timed steps; a step's time is that of its slowest rank),
tokens/s (global and per device, from the median step time), model TFLOP/s per device and MFU from the model family's
``flops_per_token``, peak memory of every rank, and the loss of every step (every layout trains the same
model on the same data, so in fp32 the losses agree to ~1e-6: a cheap check that the layout is correct).

    python tools/bench_parallel.py --nproc 4 \\
        --layouts "nproc=1" "tp=1" "dp_strategy=optim" "tp=2" "tp=2,sp" "tp=4,sp" \\
        --steps 10 --warmup 3 --output benchmarks/results/cpu-$(date +%F).json \\
        -- --recompute-granularity selective          # any megalatent flag, applied to every layout

A layout is either sugar, comma-separated ``key=value`` / ``key`` items:

    tp=N          --tensor-model-parallel-size N        sp            --sequence-parallel
    dp_strategy=S --data-parallel-sharding-strategy S   (optim | optim_grads | optim_grads_params)
    pp=N          --pipeline-model-parallel-size N      cp=N          --context-parallel-size N
    recompute=G   --recompute-granularity G             nproc=N       processes for this layout
    any-other-flag=V / any_other_flag=V -> --any-other-flag V;  a bare name -> --name;  name=false -> --no-name

or megalatent flags verbatim (quote them as one argument containing a space):
``"--tensor-model-parallel-size 2 --sequence-parallel"`` (``--nproc N`` inside it sets the processes).
The data-parallel size is what the world size (``--nproc``) leaves after the other dimensions.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak resident set size
(``getrusage``) on CPU; the latter includes the ~0.27 GiB of the Python/torch runtime, whose RSS before
the model is built is recorded as ``base_mem_gib_per_rank``. On a GPU machine the layouts run on
``cuda`` with bf16 autocast, as the trainer does, and need ``nproc <= torch.cuda.device_count()``.
Without ``--output`` the table is printed and nothing is written.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # this checkout's megalatent, also when it is not installed (as for the workers)

SUGAR = {
    "tp": "--tensor-model-parallel-size",
    "sp": "--sequence-parallel",
    "dp_strategy": "--data-parallel-sharding-strategy",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "recompute": "--recompute-granularity",
}

# The tool's model/batch flags (defaults small enough for a CPU) and the megalatent flags they set.
MODEL_FLAGS = [
    ("model_family", str, "gpt"),
    ("num_layers", int, 4),
    ("hidden_size", int, 256),
    ("num_attention_heads", int, 8),
    ("seq_length", int, 256),
    ("vocab_size", int, 8192),
    ("micro_batch_size", int, 2),
    ("global_batch_size", int, 16),
]


# ------------------------------------------------------------------------------------------ layouts
def parse_layout(spec: str, default_nproc: int) -> tuple[int, list[str]]:
    """A layout string -> (number of processes, megalatent flags)."""
    spec = spec.strip()
    nproc = default_nproc
    if spec.startswith("-"):
        tokens = shlex.split(spec)
        flags = []
        i = 0
        while i < len(tokens):
            if tokens[i] == "--nproc" and i + 1 < len(tokens):
                nproc = int(tokens[i + 1])
                i += 2
                continue
            if tokens[i].startswith("--nproc="):
                nproc = int(tokens[i].split("=", 1)[1])
            else:
                flags.append(tokens[i])
            i += 1
        return nproc, flags
    flags = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, has_value, value = item.partition("=")
        key = key.strip()
        if key == "nproc":
            nproc = int(value)
            continue
        flag = SUGAR.get(key) or "--" + key.lstrip("-").replace("_", "-")
        if not has_value or value.lower() == "true":
            flags.append(flag)
        elif value.lower() == "false":
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, value.strip()]
    return nproc, flags


# ------------------------------------------------------------------------------------------ worker
def synthetic_samples(n: int, seq_length: int, vocab_size: int, seed: int) -> list[dict]:
    """n deterministic samples: token walks t[i+1] = t[i] + d (mod V), d in {1, 2, 3}, so the loss
    falls from ln(V) as the model learns; identical on every rank and at every layout."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab_size, (1,), generator=g)
        steps = torch.randint(1, 4, (seq_length,), generator=g)
        t = (torch.cat([start, start + steps.cumsum(0)]) % vocab_size).long()
        out.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq_length),
                    "position_ids": torch.arange(seq_length)})
    return out


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _model_parameters(model_cfg) -> int | None:
    """Parameters of the whole model (built on the meta device: no memory, no effect on any RNG)."""
    import torch

    from megalatent.families import build_model

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(model_cfg).parameters())
    except Exception:  # a family whose constructor needs real tensors
        return None


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def worker(spec_path: str) -> None:
    """One rank of one layout (under torch.distributed.run, or alone for one process). Rank 0 writes the record
    to spec['result']."""
    code = 0
    try:
        # The driver ends stray workers by these pids after a timeout (torchrun starts each worker in
        # its own session, so killing torchrun alone can leave them running).
        with open(f"{spec_path}.pid{os.environ.get('RANK', '0')}", "w") as f:
            f.write(str(os.getpid()))
        _worker(spec_path)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter shutdown: see reference/platform.md (teardown trap)


def _worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from megalatent.data.gpt_data import MicroBatchLoader
    from megalatent.distributed.env import discover, init_process_group
    from megalatent.distributed.layout import ParallelLayout
    from megalatent.families import get_family, parse_args, validate
    from megalatent.pretrain import build_model_parts, make_trainer
    from megalatent.training.metrics import peak_memory_gb
    from megalatent.training.trainer import uses_bf16

    with open(spec_path) as f:
        spec = json.load(f)
    warmup, steps = spec["warmup"], spec["steps"]

    # The same order as megalatent.pretrain.run, minus the dataset: flags, layout, group, mesh, model.
    env = discover()
    cfg = parse_args(spec["argv"])
    validate(cfg, world_size=env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    device = init_process_group(env)
    layout.build_mesh(device)
    base_mem = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else _current_rss_gib()
    flops_per_token = get_family(cfg.model.model_family).flops_per_token(cfg.model)
    t = cfg.training
    data = synthetic_samples((warmup + steps) * t.global_batch_size, cfg.model.seq_length, cfg.model.vocab_size,
                             t.seed)
    torch.manual_seed(t.seed)  # the same on every rank: TP plans slice identical full weights
    # The trainer's own model building: the full model, split into this rank's pipeline stages when
    # pp > 1, each parallelized (TP/SP, CP, recompute, FSDP).
    parts, pipeline = build_model_parts(cfg, layout, device)
    params = [p for part in parts for p in part.parameters()]
    local_params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    loader = MicroBatchLoader(data, t.micro_batch_size, t.global_batch_size, layout.dp_rank, layout.dp)
    trainer = make_trainer(cfg, layout, device, parts, loader, None, pipeline)

    losses, times = [], []
    cpu0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if env.world_size > 1:
                dist.barrier()  # start the timed steps together
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(loader.next_global_batch())
        trainer.iteration += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= warmup:
            times.append(dt)

    cpu_per_step = (time.process_time() - cpu0) / steps  # CPU seconds of all this process's threads
    mine = {"times": times, "cpu_s": cpu_per_step, "peak_mem_gib": peak_memory_gb(device),
            "base_mem_gib": base_mem, "threads": torch.get_num_threads(), "local_params": local_params,
            "coords": layout.coordinates() if layout.mesh is not None else ""}
    ranks = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if env.rank != 0:
        return

    world = env.world_size
    step_times = [max(r["times"][k] for r in ranks) for k in range(steps)]  # a step ends with its slowest rank
    median, mean = statistics.median(step_times), statistics.fmean(step_times)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    tokens_per_s = tokens_per_step / median
    tflops = flops_per_token * tokens_per_s / world / 1e12
    peak = trainer.peak_tflops
    bf16 = uses_bf16(cfg, device)
    record = {
        "layout": spec["label"],
        "flags": spec["layout_flags"],
        "megalatent_argv": spec["argv"],
        "nproc": world,
        "world_size": world,
        "dp": layout.dp,
        "tp": layout.tp,
        "pp": getattr(layout, "pp", 1),
        "cp": getattr(layout, "cp", 1),
        "dp_sharding_strategy": cfg.parallel.data_parallel_sharding_strategy if layout.dp > 1 else None,
        "sequence_parallel": bool(cfg.parallel.sequence_parallel),
        "micro_batches_per_step": loader.num_micro_batches,
        "device": device.type,
        "device_name": _device_name(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "threads_per_rank": [r["threads"] for r in ranks],
        "parameters": _model_parameters(cfg.model),
        "local_parameters_per_rank": [r["local_params"] for r in ranks],
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_times_s": step_times,
        "step_time_median_s": median,
        "step_time_mean_s": mean,
        "step_time_min_s": min(step_times),
        "step_time_max_s": max(step_times),
        # CPU time each rank's process used per timed step (all threads): against the step time it shows
        # how much of the wall time a rank was computing rather than waiting (or descheduled).
        "cpu_s_per_step_per_rank": [r["cpu_s"] for r in ranks],
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_mean": tokens_per_step / mean,
        "tokens_per_s_per_device": tokens_per_s / world,
        "tflops_per_device": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (getrusage)",
        "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in ranks],
        "base_mem_gib_per_rank": [r["base_mem_gib"] for r in ranks],
        "peak_mem_gib_max": max(r["peak_mem_gib"] for r in ranks),
        "losses": losses,
        "loss": losses[-1],
        "rank_coordinates": [r["coords"] for r in ranks],
    }
    with open(spec["result"] + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(spec["result"] + ".tmp", spec["result"])
    print(f"[bench] {spec['label']}: {1000 * median:.1f} ms/step, {tokens_per_s:.1f} tokens/s, loss {losses[-1]:.6f}",
          flush=True)


# ------------------------------------------------------------------------------------------ driver
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """GPU names without creating a CUDA context in this (driver) process: nvidia-smi, else torch."""
    import torch

    if not torch.cuda.is_available():
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment(argv: list[str]) -> dict:
    import torch

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + shlex.join(argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda": torch.version.cuda,
        "gpus": gpu_names(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    env["device_name"] = env["gpus"][0] if env["gpus"] else env["cpu"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            env["git_commit"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def table(records: list[dict]) -> str:
    head = ["layout", "nproc", "mesh", "thr/rank", "ms/step", "tokens/s", "tok/s/dev", "TFLOP/s/dev", "MFU",
            "peak mem/rank GiB", "loss"]
    rows, errors = [], []
    for r in records:
        if "error" in r:
            errors.append(f"{r['layout']}: " + " ".join(ln.strip() for ln in r["error"].splitlines()))
            rows.append([r["layout"], str(r.get("nproc", "")), "", "", "FAILED"] + [""] * 6)
            continue
        mems = r["peak_mem_gib_per_rank"]
        mem = f"{mems[0]:.2f}" if max(mems) - min(mems) < 0.005 else f"{min(mems):.2f}-{max(mems):.2f}"
        mesh = " ".join(f"{d}{r[d]}" for d in ("dp", "tp", "pp", "cp") if d in ("dp", "tp") or r.get(d, 1) > 1)
        rows.append([r["layout"], str(r["nproc"]), mesh, str(max(r["threads_per_rank"])),
                     f"{1000 * r['step_time_median_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s_per_device']:.0f}", f"{r['tflops_per_device']:.4f}",
                     f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-", mem, f"{r['loss']:.5f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
                     + [f"FAILED {e}" for e in errors])


def _check_layout(argv: list[str], nproc: int) -> str | None:
    """Validate the flags at this world size before paying for a launch; the error text or None."""
    from megalatent.config import ConfigError
    from megalatent.families import parse_args, validate

    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its whole usage on a bad flag
            cfg = parse_args(argv)
        validate(cfg, world_size=nproc)
    except ConfigError as e:
        return str(e)
    except SystemExit:
        reason = usage.getvalue().strip().splitlines()
        return (reason[-1] if reason else "megalatent rejects these flags") + f" (flags: {shlex.join(argv)})"
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        return f"{nproc} processes but {torch.cuda.device_count()} GPU(s): use nproc <= the number of GPUs"
    return None


def _stop_launch(proc: subprocess.Popen, spec_path: str) -> str:
    """End a launch that ran out of time: torchrun first (SIGTERM: it stops its workers), then any of
    this launch's workers still alive, by the pids they recorded. Returns the output read so far."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid_file in glob.glob(glob.escape(spec_path) + ".pid*"):
        try:
            with open(pid_file) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = spec_path.encode() in f.read()  # the pid still belongs to this launch's worker
            if mine:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # already gone
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out = ""
    return out or ""


def run_layout(label: str, nproc: int, layout_flags: list[str], argv: list[str], args, workdir: str) -> dict:
    spec_path = os.path.join(workdir, f"spec{run_layout.count}.json")
    result = os.path.join(workdir, f"result{run_layout.count}.json")
    run_layout.count += 1
    with open(spec_path, "w") as f:
        json.dump({"label": label, "layout_flags": layout_flags, "argv": argv, "warmup": args.warmup,
                   "steps": args.steps, "result": result}, f)
    # One process needs no rendezvous: without torchrun's agent (an interpreter importing torch) it starts sooner.
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, os.path.abspath(__file__), "--worker", spec_path]
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun would set; explicit so that the record is clear
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        out = _stop_launch(proc, spec_path)
        rc, out = "timeout", out + f"\ntimed out after {args.timeout:.0f} s"
    wall = time.time() - t0
    if args.verbose:
        print(out, flush=True)
    if rc == 0 and os.path.exists(result):
        with open(result) as f:
            record = json.load(f)
        record["launch_wall_s"] = round(wall, 2)
        return record
    sys.stderr.write(f"--- layout {label!r} failed (exit {rc}); last output:\n{out[-4000:]}\n")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    last = lines[-1] if rc == "timeout" else \
        next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return {"layout": label, "flags": layout_flags, "nproc": nproc, "megalatent_argv": argv,
            "error": f"exit {rc}: {last.strip()}", "launch_wall_s": round(wall, 2)}


run_layout.count = 0


def main() -> None:
    raw = sys.argv[1:]
    if raw[:1] == ["--worker"]:
        worker(raw[1])
        return
    extra: list[str] = []
    if "--" in raw:
        i = raw.index("--")
        raw, extra = raw[:i], raw[i + 1:]
    parser = argparse.ArgumentParser(
        description="Tokens/s, TFLOP/s, MFU and peak memory per rank of megalatent's parallel layouts "
                    "(one fixed model and global batch). Flags after '--' go to megalatent unchanged.",
        epilog=__doc__.split("\n\n", 2)[2].split("Peak memory")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes (world size) of each layout (default 1)")
    parser.add_argument("--layouts", nargs="+", default=["tp=1"], help="layouts to measure, in order (default tp=1)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per layout (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them (default 3)")
    parser.add_argument("--output", default=None, help="JSON file to write (rewritten after every layout)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per layout (default 1800)")
    parser.add_argument("--verbose", action="store_true", help="print each worker's output")
    for name, tp, default in MODEL_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=tp, default=default,
                            help=f"megalatent --{name.replace('_', '-')} (default {default})")
    args = parser.parse_args(raw)
    if args.steps < 1 or args.warmup < 0 or args.nproc < 1:
        parser.error("--steps must be >= 1, --warmup >= 0 and --nproc >= 1")

    base = []
    for name, _, _ in MODEL_FLAGS:
        base += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    # train-iters only sizes the LR schedule (cosine over the benchmark's steps); eval off; no logging dir.
    base += ["--train-iters", str(args.warmup + args.steps), "--eval-interval", "0"]

    env_block = environment(sys.argv)
    print(f"# {env_block['device_name']}, torch {env_block['torch']}, {env_block['cpus_available']} CPU(s)"
          + (f", GPUs: {', '.join(env_block['gpus'])}" if env_block["gpus"] else ""), flush=True)
    records: list[dict] = []

    def write():
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output + ".tmp", "w") as f:
                json.dump({"environment": env_block, "records": records}, f, indent=1)
            os.replace(args.output + ".tmp", args.output)

    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as workdir:
        for n, label in enumerate(args.layouts, 1):
            try:
                nproc, layout_flags = parse_layout(label, args.nproc)
            except ValueError as e:
                records.append({"layout": label, "error": f"cannot parse the layout: {e}"})
                continue
            argv = base + extra + layout_flags
            shown = shlex.join(extra + layout_flags) or "no flags"
            print(f"[{n}/{len(args.layouts)}] {label} (nproc {nproc}): {shown}", flush=True)
            error = _check_layout(argv, nproc)
            if error is not None:
                print(f"    skipped: {error}", flush=True)
                records.append({"layout": label, "flags": layout_flags, "nproc": nproc, "megalatent_argv": argv,
                                "error": error})
            else:
                rec = run_layout(label, nproc, layout_flags, argv, args, workdir)
                records.append(rec)
                if "error" in rec:
                    print(f"    FAILED: {rec['error']}", flush=True)
                else:
                    print(f"    {1000 * rec['step_time_median_s']:.1f} ms/step, {rec['tokens_per_s']:.1f} tokens/s, "
                          f"peak mem {rec['peak_mem_gib_max']:.2f} GiB, loss {rec['loss']:.6f} "
                          f"({rec['launch_wall_s']:.0f} s)", flush=True)
            if records and "error" not in records[-1]:
                records[-1]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            write()

    env_block["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write()
    ok = [r for r in records if "error" not in r]
    print()
    print(f"model: {args.model_family}, {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_attention_heads} heads, seq {args.seq_length}, vocab {args.vocab_size}; global batch "
          f"{args.global_batch_size} x {args.seq_length} tokens, micro-batch {args.micro_batch_size}; "
          f"{args.steps} timed steps after {args.warmup}" + (f"; extra flags: {shlex.join(extra)}" if extra else ""))
    print(table(records))
    if len(ok) > 1:
        # Layouts of the same model (e.g. not those with --untie-embeddings-and-output-weights) must agree.
        groups: dict = {}
        for r in ok:
            groups.setdefault((r["parameters"], r["flops_per_token"]), []).append(r)
        for (n_params, _), group in groups.items():
            if len(group) < 2 and len(groups) > 1:
                continue
            spread = max(r["loss"] for r in group) - min(r["loss"] for r in group)
            tolerance = 3e-2 if any(r["precision"] != "fp32" for r in group) else 1e-3
            size = f"{n_params:,}" if n_params is not None else "?"
            which = "" if len(groups) == 1 else f" of the {size}-parameter model ({len(group)} layouts)"
            print(f"last-step loss spread over layouts{which}: {spread:.2e}"
                  + (f"  (WARNING: they disagree by more than {tolerance:g})" if spread > tolerance else ""))
    if args.output:
        print(f"wrote {args.output}")
    sys.stdout.flush()
    sys.exit(0 if len(ok) == len(records) else 1)


if __name__ == "__main__":
    main()
