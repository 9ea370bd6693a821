"""BitNet b1.58 inference: weight memory and decode latency of the packed model (2-bit weights, int8
activations) against the LLaMA-style baseline of the same shape in bf16 and fp32; JSON to benchmarks/results/.

    python tools/bench_bitnet.py                                   # CPU: memory of the paper's shapes,
                                                                   #      latency of a 220M shape
    python tools/bench_bitnet.py --device cuda --latency-shapes 700m 1.3b 3b   # GPU: Triton W2A8 kernels

What is measured, honestly:
- Weight memory is counted exactly from the modules (built on the meta device, nothing allocated):
  the baseline's parameters at 2 (bf16) or 4 (fp32) bytes; the packed model's 2-bit codes (1 byte per 4
  weights), its per-layer scale and input-norm gains, and the embedding, final norm and head in bf16.
  The paper's memory figures (FasterTransformer) are measured GPU memory, weights plus runtime buffers.
- Decode latency is one forward of one token at batch 1 (a decoding step without attention context):
  the weight-bound matmuls that dominate decoding and that the paper's 2-bit kernel speeds up. On CPU
  the packed model runs the plain-PyTorch reference (unpack the 2-bit codes to int8 at every call, then
  oneDNN's int8 GEMM: a correctness path, not a fast one); on CUDA it runs the Triton fused
  RMSNorm+quant and W2A8 kernels (kernels/bitnet.py). The baseline runs nn.Linear (oneDNN / cuBLAS).
  On a shared CPU run it with OMP_NUM_THREADS=1: with more threads than free cores, time goes to waiting.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_parallel import environment  # noqa: E402  (machine, date, git commit, command, load average)

from megalatent.config import ModelConfig
from megalatent.interop.packed import PackedBitLinear, PackedExperts, pack_experts, pack_model
from megalatent.families import model_config, build_model

VOCAB = 32000  # LLaMA's tokenizer, as in the paper
# hidden, GLU width (each expert's for MoE), heads, layers[, experts, top-k]; 700M/1.3B/3B are arXiv
# 2402.17764 Tab. 1. "700m-moe8" (not in the paper): the 700M shape with 8 top-2 experts in every layer.
SHAPES = {
    "220m": (1024, 2816, 16, 12),
    "700m": (1536, 4096, 24, 24),
    "1.3b": (2048, 5460, 32, 24),
    "3b": (3200, 8640, 32, 26),
    "700m-moe8": (1536, 4096, 24, 24, 8, 2),
    "tiny": (64, 128, 4, 2),  # seconds on a CPU: benchmarks/gpu/acceptance.sh --dry-run
}
# The paper's Tab. 1-3 (FasterTransformer + Ladder 2-bit kernel, A100): LLaMA fp16 -> BitNet b1.58.
PAPER = {"700m": {"memory_gb": (2.08, 0.80), "latency_ms": (1.18, 0.96)},
         "1.3b": {"memory_gb": (3.34, 1.14), "latency_ms": (1.62, 0.97)},
         "3b": {"memory_gb": (7.89, 2.22), "latency_ms": (5.07, 1.87)}}


def shape_config(shape: str, family: str) -> ModelConfig:
    hidden, ffn, heads, layers, *moe = SHAPES[shape]
    experts = dict(num_experts=moe[0], moe_router_topk=moe[1]) if moe else {}
    return model_config(model_family=family, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, vocab_size=VOCAB, seq_length=2048,
                       untie_embeddings_and_output_weights=True, **experts)


def pack(model) -> None:
    """The export's packing: every BitLinear and every ternary MoE expert group."""
    pack_model(model)
    pack_experts(model)


def nbytes(tensors, bytes_per_element=None) -> int:
    return sum(t.numel() * (bytes_per_element or t.element_size()) for t in tensors)


def weight_memory(shape: str) -> dict:
    with torch.device("meta"):
        baseline = build_model(shape_config(shape, "gpt"))
        packed = build_model(shape_config(shape, "bitnet"))
        pack(packed)
    params = list(baseline.parameters())
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    experts = [m for m in packed.modules() if isinstance(m, PackedExperts)]
    stacks = layers + [getattr(x, n) for x in experts for n in ("gate_proj", "up_proj", "down_proj")]
    codes = nbytes(m.packed_weight for m in stacks)
    scales = nbytes(m.weight_scale for m in stacks)
    norms = nbytes([m.norm_weight for m in layers] + [t for x in experts for t in (x.input_norm, x.hidden_norm)], 2)
    # The embedding, final norm, head (and MoE routers) in bf16: what packing leaves as parameters.
    full_precision = nbytes((p for n, p in packed.named_parameters()), 2)
    bf16 = nbytes(params, 2)
    out = {"parameters": sum(p.numel() for p in params), "fp32_bytes": nbytes(params, 4), "bf16_bytes": bf16,
           "packed_bytes": codes + scales + norms + full_precision,
           "packed_breakdown": {"ternary_codes": codes, "scales": scales, "input_norm_gains_bf16": norms,
                                "embedding_norm_head_bf16": full_precision}}
    out["bf16_over_packed"] = bf16 / out["packed_bytes"]
    out["fp32_over_packed"] = out["fp32_bytes"] / out["packed_bytes"]
    return out


def _timed_forward_ms(model, token: torch.Tensor) -> float:
    if token.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(token)
    if token.is_cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


@torch.no_grad()
def latency(shape: str, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Median time of a 1-token forward of each model. The models take turns, one forward each per
    round, so that a change in the machine's load (a shared CPU) hits all of them alike."""
    torch.manual_seed(0)
    models = {name: build_model(shape_config(shape, "gpt")).to(device=device, dtype=dtype).eval()
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    packed = build_model(shape_config(shape, "bitnet")).eval()
    pack(packed)  # quantise and pack on the host; only the packed model goes to the device
    packed = packed.to(device)
    if device.type == "cuda":  # the full-precision parts in bf16 like the baseline's; γ stays fp32
        for part in (packed.embed_tokens, packed.norm, packed.output):
            part.to(torch.bfloat16)
    models["packed"] = packed
    token = torch.tensor([[1]], device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            ms = _timed_forward_ms(model, token)
            if i >= warmup:
                times[name].append(ms)
    out = {f"{name}_ms": statistics.median(t) for name, t in times.items()}
    out["all_ms"] = times
    out["packed_path"] = ("Triton fused RMSNorm+int8 quant and W2A8 kernels" if device.type == "cuda"
                          else "plain-PyTorch reference: unpack to int8 at every call, then torch._int_mm (int8 x int8 -> int32)")
    out["bf16_over_packed"] = out["bf16_ms"] / out["packed_ms"]
    out["fp32_over_packed"] = out["fp32_ms"] / out["packed_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--latency-shapes", nargs="*", default=["220m"], choices=list(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per model (median reported)")
    p.add_argument("--output", default=None, help="JSON path; default benchmarks/results/bitnet-<device>-<date>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = {**environment(sys.argv if argv is None else [sys.argv[0]] + list(argv)), "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "vocab": VOCAB, "memory": {}, "latency": {}, "paper": PAPER}
    for shape in args.memory_shapes:
        m = result["memory"][shape] = weight_memory(shape)
        print(f"{shape:>5} weights: fp32 {m['fp32_bytes'] / 1e9:6.2f} GB  bf16 {m['bf16_bytes'] / 1e9:6.2f} GB  "
              f"packed {m['packed_bytes'] / 1e9:5.2f} GB  (bf16/packed {m['bf16_over_packed']:.2f}x"
              + (f"; paper {PAPER[shape]['memory_gb'][0] / PAPER[shape]['memory_gb'][1]:.2f}x" if shape in PAPER else "")
              + ")", flush=True)
    for shape in args.latency_shapes:
        t = result["latency"][shape] = latency(shape, device, args.repeats)
        print(f"{shape:>5} decode step ({device.type}): fp32 {t['fp32_ms']:.1f} ms  bf16 {t['bf16_ms']:.1f} ms  "
              f"packed {t['packed_ms']:.1f} ms  (bf16/packed {t['bf16_over_packed']:.2f}x"
              + (f"; paper {PAPER[shape]['latency_ms'][0] / PAPER[shape]['latency_ms'][1]:.2f}x" if shape in PAPER else "")
              + ")", flush=True)
    path = args.output or os.path.join("benchmarks", "results",
                                       f"bitnet-{device.type}-{result['date'][:10]}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
