"""Benchmark (not a test): the image families.

    python tools/bench_vision.py --output benchmarks/results/vision-cpu.json

LongViT: forward + backward time, patches/s and peak memory of one step of a small LongViT over growing
images (patch counts), with the paper's geometric dilated schedule scaled to each length (w = N/16 .. N,
r = 1, 2, 4, 8, 16). Peak memory is torch.cuda.max_memory_allocated on a GPU; on a CPU each size runs in a
fresh process and its peak RSS (ru_maxrss) is reported.
LatentLM: one training step of the tiny class-conditional LatentLM (examples/tiny/latentlm.yaml shape,
untrained weights) per second, and the latency of sampling one image (16 latents) against the number of
solver steps, with and without classifier-free guidance.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_parallel import environment  # tools/ is on sys.path when run as a script
from megalatent.families import parse_args
from megalatent.families import build_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def longvit_step(patches_per_side: int, patch: int, repeats: int, device: torch.device) -> dict:
    n = patches_per_side ** 2
    w = sorted({max(16, n // 16), max(16, n // 8), max(16, n // 4), max(16, n // 2), n})
    r = [2 ** i for i in range(len(w))]
    size = patches_per_side * patch
    cfg = parse_args(["--model-family", "longvit", "--num-layers", "2", "--hidden-size", "128",
                      "--num-attention-heads", "4", "--img-h", str(size), "--img-w", str(size), "--patch-dim",
                      str(patch), "--num-channels", "3", "--num-classes", "10", "--seq-length", str(n),
                      "--segment-lengths", *map(str, w), "--dilated-ratios", *map(str, r),
                      "--position-embedding-type", "none", "--normalization", "LayerNorm", "--no-swiglu"]).model
    model = build_model(cfg).to(device)
    images = torch.randn(1, 3, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        model(images).float().square().sum().backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    return {"patches": n, "image_side": size, "segment_lengths": w, "dilated_ratios": r, "ms": 1000 * seconds,
            "patches_per_s": n / seconds, "peak_gib": peak}


def latentlm(repeats: int, steps_list: list[int], device: torch.device) -> dict:
    from megalatent.data.latent_data import ClassConditionalLatents, class_prompts
    cfg = parse_args(["--config", "examples/tiny/latentlm.yaml", "--vocab-size", "16",
                      "--latent-tokenizer", "unused"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    data = ClassConditionalLatents(torch.randn(64, 16, cfg.latent_dim), torch.randint(0, 10, (64,)), 10, 0.1, 0)
    batch = {k: torch.stack([data[i][k] for i in range(16)]).to(device) for k in data[0]}
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        logits, diffusion = model(batch["tokens"], batch["position_ids"], batch["latents"], batch["latent_mask"],
                                  batch["target_latents"], batch["diffusion_mask"])
        (logits.float().logsumexp(-1).mean() + diffusion).backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    train_s = statistics.median(times[1:])
    sampling = []
    prompt, uncond = class_prompts(torch.arange(4, device=device), 10)
    for steps in steps_list:
        for cfg_scale in (1.0, 4.0):
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                model.sample_latents(prompt, 16, steps=steps, cfg_scale=cfg_scale, uncond_prompt=uncond)
                _sync(device)
                times.append(time.perf_counter() - t0)
            sampling.append({"solver_steps": steps, "cfg_scale": cfg_scale,
                             "ms_per_image": 1000 * statistics.median(times[1:]) / len(prompt)})
    return {"train_step_ms_micro_batch_16": 1000 * train_s, "train_steps_per_s": 1 / train_s,
            "train_sequences_per_s": 16 / train_s, "sampling": sampling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches-per-side", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--solver-steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--one-longvit-size", type=int, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.one_longvit_size:
        print(json.dumps(longvit_step(args.one_longvit_size, args.patch, args.repeats, device)))
        return
    records = {"longvit": [], "latentlm": None}
    print(f"{'patches':>8} {'ms fwd+bwd':>11} {'patches/s':>10} {'peak GiB':>9}")
    for side in args.patches_per_side:
        out = subprocess.run([sys.executable, __file__, "--one-longvit-size", str(side), "--patch", str(args.patch),
                              "--repeats", str(args.repeats)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{side * side:>8} failed: {out.stderr.strip().splitlines()[-1:]}")
            break
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        records["longvit"].append(rec)
        print(f"{rec['patches']:>8} {rec['ms']:>11.1f} {rec['patches_per_s']:>10.0f} {rec['peak_gib']:>9.2f}", flush=True)
    records["latentlm"] = latentlm(args.repeats, args.solver_steps, device)
    lat = records["latentlm"]
    print(f"LatentLM tiny: train step (16 sequences) {lat['train_step_ms_micro_batch_16']:.1f} ms")
    for s in lat["sampling"]:
        print(f"  sampling {s['solver_steps']:>3} steps, cfg {s['cfg_scale']}: {s['ms_per_image']:.1f} ms/image")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(sys.argv), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
