"""Graph breaks of every family's compiled blocks (--compile): how many graphs dynamo makes of the blocks of a
tiny model of each family, and why it breaks them, from one training forward + backward.

    python tools/graph_breaks.py                    every family (tiny configs of examples/tiny/)
    python tools/graph_breaks.py gpt mhmoe --fp8-format hybrid --bf16     (megalatent flags after the names)

A dense decoder block compiles to one graph (tests/test_compile.py holds it there); the README lists what the
others report and why. Dynamo alone is run (backend "eager"): breaks are decided at capture, so this takes
seconds, not the minutes of code generation.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megalatent.distributed.compile import compile_blocks, graph_breaks  # noqa: E402
from megalatent.distributed.fp8 import convert_to_fp8  # noqa: E402
from megalatent.families import FAMILIES, build_model, parse_args  # noqa: E402

# name -> flags; the tiny configs at a short sequence (breaks do not depend on the length)
MODELS = {
    "gpt": ["--config", "examples/tiny/gpt.yaml"],
    "longnet": ["--config", "examples/tiny/longnet.yaml", "--segment-lengths", "16", "32", "64"],
    "mhmoe": ["--config", "examples/tiny/mhmoe.yaml"],
    "bitnet": ["--config", "examples/tiny/bitnet.yaml"],
    "yoco-gret": ["--config", "examples/tiny/yoco.yaml", "--retention-chunk-size", "16"],
    "yoco-swa": ["--config", "examples/tiny/yoco.yaml", "--yoco-self-attention", "swa", "--sliding-window-size", "16"],
    "latentlm": ["--config", "examples/tiny/latentlm.yaml"],
    "longvit": ["--config", "examples/tiny/longvit.yaml"],
}


def forward_backward(model, cfg, bf16: bool, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    if cfg.model_family == "longvit":
        inputs = [torch.randn(2, cfg.num_channels, cfg.img_h, cfg.img_w, generator=g)]
    else:
        inputs = [torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=g),
                  torch.arange(cfg.seq_length).expand(2, -1)]
    if cfg.model_family == "latentlm":  # one latent position per sequence
        mask = torch.zeros(2, cfg.seq_length, dtype=torch.bool)
        mask[:, 1] = True
        inputs += [torch.randn(2, cfg.seq_length, cfg.latent_dim, generator=g), mask]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(*(t.to(device) for t in inputs))
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


def short(reason: str) -> str:
    """Dynamo's explanation, first line, and what it names (the op or function)."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    context = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context")), "")
    return lines[0] + (f" ({context})" if context else "")


def measure(name: str, extra: list[str]) -> tuple[int, dict[str, int]]:
    argv = MODELS[name] + ["--seq-length", "64", "--vocab-size", "256"] + extra
    if name == "longvit":
        argv = MODELS[name] + extra
    cfg = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (the Triton kernels need a GPU)
    model = build_model(cfg.model).to(device)
    if cfg.fp8.fp8_format is not None:
        convert_to_fp8(model, cfg.fp8, list(FAMILIES[cfg.model.model_family].parallel.pipeline.with_layer(cfg.model)),
                       tp=1)
    model.train()
    compile_blocks(model, backend="eager")
    return graph_breaks(lambda: forward_backward(model, cfg.model, bool(cfg.training.bf16), device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help=f"some of {', '.join(MODELS)} (default: all)")
    args, extra = p.parse_known_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    os.chdir(REPO)
    for name in args.models or list(MODELS):
        graphs, breaks = measure(name, extra)
        print(f"{name}: {graphs} graph(s), {sum(breaks.values())} break(s)")
        for reason, count in sorted(breaks.items(), key=lambda kv: -kv[1]):
            print(f"    {count} x {short(reason)}")


if __name__ == "__main__":
    main()
