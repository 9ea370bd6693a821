"""The GPU acceptance run (issue 14): every GPU path of megalatent executed and measured in one command, sized to
finish in under 8 minutes on one H100/H200, with one JSON and one markdown table as its record.

    bash benchmarks/gpu/acceptance.sh                 on the GPU machine (installs benchmarks/gpu/wheels first)
    bash benchmarks/gpu/acceptance.sh --dry-run       on a CPU: every step at tiny shapes, in about a minute

Steps (each a tool of this repository in its own process, under its own time limit; a step that fails or runs
out of time is recorded as such and the run goes on):

  kernels        tests/test_kernels.py on CUDA: the Triton kernels against their references, bf16 included
  fp8-numerics   tests/test_fp8.py's emulation tests on the GPU's FP8 tensor cores (torch._scaled_mm, cuBLAS)
  mfu            a ~1B decoder (18 x 2048, vocab 32000) at sequence 4K on one GPU: bf16, bf16 + --compile and
                 FP8 (tensorwise, hybrid) + --compile (tools/bench_parallel.py: tokens/s, TFLOP/s, MFU, losses);
                 goals: >= 55% MFU in bf16, FP8 >= 1.4x bf16
  attention      dilated attention fwd+bwd from 8K tokens to 4M (or the longest that fits): the Triton kernels,
                 the PyTorch reference and flash SDPA (tools/bench_attention.py)
  max-length     the longest sequence one training step of the tiny LongNet fits on the GPU
                 (tools/bench_attention.py --max-trainable-length)
  bitnet         packed 2-bit decoding (Triton W2A8) against bf16, 700M shape (tools/bench_bitnet.py)
  yoco           YOCO's prefill time and cache memory against the baseline decoder, 4K to 64K tokens
                 (tools/bench_inference.py, a 24 x 2048 model)
  graph-breaks   graph breaks of compiled blocks with the GPU's kernels (tools/graph_breaks.py)

Writes <output-dir>/acceptance-<device>-<date>.json (environment, every step's command, status, time, the tool's
own JSON and the end of its log) and the same name .md (a summary table, then a table per measurement).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOAL_MFU_BF16 = 0.55  # the ~1B decoder, one H100/H200 (issue 14)
GOAL_FP8_SPEEDUP = 1.4  # FP8 + compile over bf16 + compile step time, at >= 1B parameters

# The ~1B decoder of the MFU step (0.98B parameters: 18 layers x (4 x 2048^2 + 3 x 2048 x 5504) + 32000 x 2048).
MFU_MODEL = ["--model-family", "gpt", "--num-layers", "18", "--hidden-size", "2048", "--num-attention-heads", "16",
             "--seq-length", "4096", "--vocab-size", "32000", "--micro-batch-size", "4", "--global-batch-size", "4"]
MFU_TINY = ["--model-family", "gpt", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--vocab-size", "256", "--micro-batch-size", "2", "--global-batch-size", "2"]
# dry run: aot_eager (capture, no code generation) keeps the compiled layouts in seconds on a CPU
MFU_LAYOUTS = {"gpu": ["tp=1", "compile", "compile,fp8_format=hybrid,fp8_recipe=tensorwise"],
               "dry": ["tp=1", "compile,compile_backend=aot_eager",
                       "compile,compile_backend=aot_eager,fp8_format=hybrid,fp8_recipe=tensorwise"]}
MFU_LABELS = ["bf16", "bf16 + compile", "FP8 + compile"]


@dataclass
class Step:
    name: str
    what: str
    gpu: list[str]  # arguments after `python`; {out} is the step's JSON path
    dry: list[str]
    timeout_s: int  # on the GPU (the dry run allows 120 s a step)
    summarize: Callable[[Optional[dict], str], str]  # (the tool's JSON, its output) -> one line of results


def pytest_counts(_, log: str) -> str:
    found = re.findall(r"(\d+) (passed|failed|skipped|error)", log)
    return ", ".join(f"{n} {kind}" for n, kind in found) or "no test summary"


def mfu_summary(data: Optional[dict], _) -> str:
    rows = mfu_rows(data)
    if not rows:
        return "no layout finished"
    parts = [f"{r['label']}: " + (r["error"] if "error" in r else f"{r['mfu']} MFU, {r['tokens_per_s']} tok/s")
             for r in rows]
    return "; ".join(parts) + mfu_goals(data)


def mfu_rows(data: Optional[dict]) -> list[dict]:
    rows = []
    for label, rec in zip(MFU_LABELS, (data or {}).get("records", [])):
        if "error" in rec:
            rows.append({"label": label, "error": rec["error"][:120]})
            continue
        rows.append({"label": label, "precision": rec["precision"], "tokens_per_s": f"{rec['tokens_per_s']:,.0f}",
                     "ms_per_step": f"{1000 * rec['step_time_median_s']:.0f}",
                     "tflops": f"{rec['tflops_per_device']:.1f}",
                     "mfu": f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") else "-",
                     "peak_mem_gib": f"{rec['peak_mem_gib_max']:.1f}", "loss": f"{rec['loss']:.4f}",
                     "parameters": rec.get("parameters")})
    return rows


def mfu_goals(data: Optional[dict]) -> str:
    recs = {label: rec for label, rec in zip(MFU_LABELS, (data or {}).get("records", [])) if "error" not in rec}
    out = []
    if recs.get("bf16", {}).get("mfu"):
        best = max(recs[k]["mfu"] for k in ("bf16", "bf16 + compile") if k in recs)
        out.append(f"bf16 goal {100 * GOAL_MFU_BF16:.0f}% MFU: {'met' if best >= GOAL_MFU_BF16 else 'not met'}")
    if "FP8 + compile" in recs and "bf16 + compile" in recs:
        ratio = recs["bf16 + compile"]["step_time_median_s"] / recs["FP8 + compile"]["step_time_median_s"]
        out.append(f"FP8 {ratio:.2f}x bf16+compile (goal {GOAL_FP8_SPEEDUP}x: "
                   f"{'met' if ratio >= GOAL_FP8_SPEEDUP else 'not met'})")
    return (" | " + "; ".join(out)) if out else ""


def attention_summary(data: Optional[dict], _) -> str:
    recs = (data or {}).get("records", [])
    fits = {r["kind"]: r["length"] for r in recs if "ms" in r}
    longest = max((r["length"] for r in recs if r["kind"] == "dilated" and "ms" in r), default=None)
    if longest is None:
        return "no length ran"
    at = {r["kind"]: r for r in recs if r["length"] == longest and "ms" in r}
    return (f"dilated ran to {longest:,} tokens ({at['dilated']['ms']:.1f} ms fwd+bwd); longest per kind: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(fits.items())))


def max_length_summary(data: Optional[dict], _) -> str:
    return ", ".join(f"{kind}: {n:,} tokens" if n else f"{kind}: none"
                     for kind, n in (data or {}).get("max_trainable_length", {}).items()) or "no result"


def bitnet_summary(data: Optional[dict], _) -> str:
    out = []
    for shape, t in (data or {}).get("latency", {}).items():
        out.append(f"{shape} decode step: bf16 {t['bf16_ms']:.2f} ms, packed {t['packed_ms']:.2f} ms "
                   f"({t['bf16_over_packed']:.2f}x)")
    return "; ".join(out) or "no result"


def yoco_summary(data: Optional[dict], _) -> str:
    out = []
    for row in (data or {}).get("records", []):
        if "yoco" in row and "gpt" in row:
            out.append(f"{row['length']:,}: cache {row['gpt']['cache_bytes'] / row['yoco']['cache_bytes']:.1f}x "
                       f"smaller, prefill {row['gpt']['prefill_s'] / row['yoco']['prefill_s']:.1f}x faster")
    return "; ".join(out) or "no result"


def log_lines(pattern: str) -> Callable[[Optional[dict], str], str]:
    return lambda _, log: "; ".join(m.strip() for m in re.findall(pattern, log, flags=re.M)) or "no result"


def steps() -> list[Step]:
    attention_lengths = [str(2 ** k) for k in range(13, 23)]  # 8K .. 4M
    return [
        Step("kernels", "Triton kernels = references on CUDA (bf16 included)",
             ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
             ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-k", "dispatch_rules"],
             90, pytest_counts),
        Step("fp8-numerics", "FP8 linears on the FP8 tensor cores = their emulation (both recipes and formats)",
             ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fp8.py", "-k", "emulation"],
             ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fp8.py", "-k", "equals_its_emulation"],
             40, pytest_counts),
        Step("mfu", "~1B decoder, seq 4K, one GPU: bf16, bf16 + compile, FP8 + compile",
             ["tools/bench_parallel.py", "--nproc", "1", "--steps", "8", "--warmup", "3", "--timeout", "110",
              "--output", "{out}", "--layouts", *MFU_LAYOUTS["gpu"], "--", *MFU_MODEL],
             ["tools/bench_parallel.py", "--nproc", "1", "--steps", "2", "--warmup", "1", "--timeout", "60",
              "--output", "{out}", "--layouts", *MFU_LAYOUTS["dry"], "--", *MFU_TINY],
             300, mfu_summary),
        Step("attention", "dilated attention fwd+bwd, 8K..4M tokens: kernels, PyTorch reference, flash SDPA",
             ["tools/bench_attention.py", "--lengths", *attention_lengths, "--heads", "4", "--head-dim", "64",
              "--dense-max-length", "262144", "--repeats", "3", "--output", "{out}"],
             ["tools/bench_attention.py", "--lengths", "256", "512", "--heads", "2", "--head-dim", "16",
              "--min-segment", "64", "--repeats", "1", "--output", "{out}"],
             60, attention_summary),
        Step("max-length", "longest sequence one training step of the tiny LongNet fits",
             ["tools/bench_attention.py", "--max-trainable-length", "--kinds", "dilated", "--start-length",
              "262144", "--max-length", "8388608", "--bisect-steps", "1", "--time-limit", "60", "--output", "{out}"],
             ["tools/bench_attention.py", "--max-trainable-length", "--kinds", "dilated", "--start-length", "256",
              "--max-length", "256", "--memory-limit-gb", "4", "--time-limit", "60", "--output", "{out}"],
             100, max_length_summary),
        Step("bitnet", "packed b1.58 decoding (W2A8 kernels) against bf16",
             ["tools/bench_bitnet.py", "--memory-shapes", "700m", "--latency-shapes", "700m", "--repeats", "20",
              "--output", "{out}"],
             ["tools/bench_bitnet.py", "--memory-shapes", "tiny", "--latency-shapes", "tiny", "--repeats", "1",
              "--device", "cpu", "--output", "{out}"],
             45, bitnet_summary),
        Step("yoco", "YOCO prefill time and cache memory against the baseline (24 x 2048)",
             ["tools/bench_inference.py", "--lengths", "4096", "16384", "65536", "--num-layers", "24",
              "--hidden-size", "2048", "--heads", "16", "--kv-heads", "4", "--ffn", "5504", "--vocab-size", "32000",
              "--attention-backend", "triton", "--decode-tokens", "16", "--max-seconds", "20", "--output", "{out}"],
             ["tools/bench_inference.py", "--lengths", "64", "128", "--num-layers", "2", "--hidden-size", "64",
              "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--chunk", "32",
              "--decode-tokens", "2", "--paper-lengths", "32768", "--output", "{out}"],
             60, yoco_summary),
        Step("graph-breaks", "graph breaks of compiled blocks with the GPU kernels (bf16)",
             ["tools/graph_breaks.py", "gpt", "longnet", "mhmoe", "yoco-gret", "--bf16",
              "--attention-backend", "triton"],
             ["tools/graph_breaks.py", "gpt"],
             40, log_lines(r"^\w[\w-]*: \d+ graph\(s\), \d+ break\(s\)$")),
    ]


def environment(dry_run: bool) -> dict:
    import torch

    def version(module):
        try:
            return __import__(module).__version__
        except Exception as e:  # noqa: BLE001  (recorded, not fatal: the steps that need it will say why)
            return f"not importable: {type(e).__name__}"

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "bash benchmarks/gpu/acceptance.sh " + shlex.join(sys.argv[1:]),
            "dry_run": dry_run, "git_commit": commit or None, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "torchao": version("torchao"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "cpus": os.cpu_count()}


def run_step(step: Step, dry_run: bool, work: str, budget_left: float) -> dict:
    out = os.path.join(work, f"{step.name}.json")
    args = [a.replace("{out}", out) for a in (step.dry if dry_run else step.gpu)]
    timeout = max(1, int(min(120 if dry_run else step.timeout_s, budget_left)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # each step compiles into a cache of its own run (not a stale one from another checkout)
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    print(f"[acceptance] {step.name}: {step.what} (limit {timeout} s)", flush=True)
    # A session of its own, so that a step out of time is ended with everything it started (torchrun's workers).
    proc = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status, rc = "timeout", None
    seconds = time.time() - t0
    data = None
    if os.path.isfile(out):
        with open(out) as f:
            data = json.load(f)
    try:
        summary = step.summarize(data, log)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        summary = f"could not summarise: {type(e).__name__}: {e}"
    print(f"[acceptance] {step.name}: {status} in {seconds:.0f} s: {summary}", flush=True)
    return {"name": step.name, "what": step.what, "command": "python " + shlex.join(args), "status": status,
            "returncode": rc, "seconds": round(seconds, 1), "summary": summary, "result": data,
            "log_tail": log[-4000:]}


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# megalatent GPU acceptance{' (dry run, tiny shapes)' if env['dry_run'] else ''}: {env['device']}",
             "", f"{env['date']}, commit `{env['git_commit']}`, torch {env['torch']} (CUDA {env['cuda']}), "
             f"Triton {env['triton']}, torchao {env['torchao']}; `{env['command']}`; {record['seconds']:.0f} s in all.",
             "", "| step | status | s | result |", "|---|---|---|---|"]
    for s in record["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['summary'].replace('|', '/')} |")
    by_name = {s["name"]: s for s in record["steps"]}
    rows = mfu_rows(by_name.get("mfu", {}).get("result"))
    if rows:
        lines += ["", "MFU (one GPU; model FLOPs per Megatron's convention over the dense bf16 peak):", "",
                  "| run | precision | ms/step | tokens/s | TFLOP/s | MFU | peak GiB | last loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | " + (f"failed: {r['error']} | | | | | | |" if "error" in r else
                         f"{r['precision']} | {r['ms_per_step']} | {r['tokens_per_s']} | {r['tflops']} | {r['mfu']} | "
                         f"{r['peak_mem_gib']} | {r['loss']} |"))
    attention = (by_name.get("attention", {}).get("result") or {}).get("records", [])
    if attention:
        kinds = sorted({r["kind"] for r in attention})
        lines += ["", "Dilated attention, fwd+bwd ms (out of memory: -):", "",
                  "| tokens | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for n in sorted({r["length"] for r in attention}):
            cell = {r["kind"]: f"{r['ms']:.1f}" if "ms" in r else "-" for r in attention if r["length"] == n}
            lines.append(f"| {n:,} | " + " | ".join(cell.get(k, "") for k in kinds) + " |")
    yoco = (by_name.get("yoco", {}).get("result") or {}).get("records", [])
    if yoco:
        lines += ["", "YOCO against the baseline (prefill s, cache MiB):", "",
                  "| tokens | YOCO prefill | baseline prefill | YOCO cache | baseline cache |", "|---|---|---|---|---|"]
        for row in yoco:
            def cell(family, key, scale):
                return f"{row[family][key] / scale:.3f}" if family in row else "-"
            lines.append(f"| {row['length']:,} | {cell('yoco', 'prefill_s', 1)} | {cell('gpt', 'prefill_s', 1)} | "
                         f"{cell('yoco', 'cache_bytes', 2**20)} | {cell('gpt', 'cache_bytes', 2**20)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every step on a CPU at tiny shapes")
    p.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--steps", nargs="+", help="run only these steps (default: all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the whole run's time limit: each step's own limit is cut to what is left (default on a "
                        "GPU 470 s, under 8 minutes with start-up; none for --dry-run)")
    args = p.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: the acceptance run measures a GPU (use --dry-run to check the steps on a CPU)")
    selected = [s for s in steps() if not args.steps or s.name in args.steps]
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 470.0)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="megalatent-acceptance-") as work:
        record = {"environment": environment(args.dry_run), "goals": {"mfu_bf16": GOAL_MFU_BF16,
                                                                       "fp8_speedup": GOAL_FP8_SPEEDUP},
                  "steps": []}
        for step in selected:
            # Later steps keep 10 s each, so that every step runs and is recorded.
            reserve = 10 * (len(selected) - len(record["steps"]) - 1)
            left = budget - (time.time() - t0) - reserve
            record["steps"].append(run_step(step, args.dry_run, work, left))
    record["seconds"] = round(time.time() - t0, 1)
    device = "dry-run" if args.dry_run else re.sub(r"[^A-Za-z0-9]+", "-", record["environment"]["device"]).strip("-")
    stem = os.path.join(args.output_dir, f"acceptance-{device.lower()}-{record['environment']['date'][:10]}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(record))
    print(markdown(record))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(s["status"] == "ok" for s in record["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
