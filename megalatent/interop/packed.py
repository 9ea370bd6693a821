"""The packed BitNet b1.58 model: export a trained checkpoint to 2-bit weights, and run it.

    export_packed(load, output)   checkpoint (any layout) -> packed directory   (tools/export_bitnet.py)
    load_packed_model(output)     packed directory -> a model whose forward(tokens) gives logits

A packed directory holds

    config.json       the format, the model config, the names of the packed layers, the source checkpoint
    weights.pt        per BitLinear `L`: L.packed_weight (uint8 [out, in/4], kernels/bitnet.py's layout),
                      L.weight_scale (γ, 0-d fp32), L.norm_weight (its input RMSNorm's gain);
                      per ternary MoE `Experts` `X` (config.json's packed_experts), for P in gate_proj,
                      up_proj, down_proj: X.P.packed_weight (uint8 [E, out, in/4]: each expert's weight in
                      that layout), X.P.weight_scale (γ per expert, fp32 [E]); X.input_norm [E, dim] and
                      X.hidden_norm [E, ffn] (the experts' input-norm gains);
                      the embedding, final norm, routers and head as they were trained (or in --dtype)
    tokenizer.model   the sentencepiece model, when the checkpoint names one (a Hugging Face tokenizer: its
                      tokenizer.json, tokenizer_config.json, ...; config.json's "tokenizer" is then ".")

Every BitLinear of the trained model becomes a `PackedBitLinear`: its weights are quantised once,
offline, with the training quantiser; at run time the fused RMSNorm + int8 kernel and the W2A8 kernel
(Triton on a GPU, their references on CPU) compute exactly what the training layer's forward computes,
so greedy decoding from the packed model gives the fake-quantised model's tokens (tests/test_bitnet.py).
Ternary MoE experts become `PackedExperts` the same way (equal to the training experts up to float
rounding, see its forward).

Format versions: 1 has BitLinear layers only; 2 adds `packed_experts` (a version-1 directory still
loads: it has none). A reader older than version 2 refuses a version-2 directory rather than failing
on weights it does not know.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalatent.data.tokenizer import HUGGINGFACE, tokenizer_type_of
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model
from megalatent.interop import convert
from megalatent.interop.tokenizer_files import TokenizerError, copy_tokenizer, resolve_tokenizer
from megalatent.kernels.bitnet import CODES_PER_BYTE, pack_ternary, rmsnorm_act_quant, w2a8_matmul
from megalatent.nn.bitlinear import BitLinear, TernaryLinear, quantize_weights
from megalatent.nn.moe import Experts

FORMAT = "megalatent-bitnet-packed"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: BitLinear layers only (no packed_experts)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PackedBitLinear(nn.Module):
    """The inference form of BitLinear: y = (x_int8 · W_ternaryᵀ) * γ / s_x with W read 2-bit packed."""

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        if in_features % CODES_PER_BYTE:
            raise ValueError(f"a packed layer needs an input width divisible by {CODES_PER_BYTE}, got {in_features}")
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.register_buffer("packed_weight", torch.zeros(out_features, in_features // CODES_PER_BYTE,
                                                          dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("norm_weight", torch.ones(in_features))

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        """Quantise a trained layer's weights once, with the training quantiser, and pack them."""
        packed = cls(layer.in_features, layer.out_features, layer.eps)
        w_int, gamma = quantize_weights(layer.weight.detach())
        packed.packed_weight, packed.weight_scale = pack_ternary(w_int), gamma
        packed.norm_weight = layer.norm_weight.detach().clone()
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int, s_x = rmsnorm_act_quant(x, self.norm_weight, self.eps)
        return w2a8_matmul(x_int, self.packed_weight, self.weight_scale / s_x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2-bit weights, int8 activations"


class _PackedStack(nn.Module):
    """One projection of E experts: the 2-bit codes of every expert's ternary weight and its scale γ."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("packed_weight", torch.zeros(num_experts, out_features, in_features // CODES_PER_BYTE,
                                                          dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(num_experts))

    @classmethod
    def from_stacked(cls, w: torch.Tensor) -> "_PackedStack":
        """w [E, d_in, d_out] (the training layout: x @ w[e]) -> each expert's [d_out, d_in/4] codes."""
        num_experts, d_in, d_out = w.shape
        stack = cls(num_experts, d_in, d_out)
        w_int, gamma = torch.vmap(quantize_weights)(w.detach())  # Experts._quantized_weight's quantiser
        stack.packed_weight = torch.stack([pack_ternary(w_e.t()) for w_e in w_int])
        stack.weight_scale = gamma
        return stack


class PackedExperts(nn.Module):
    """The inference form of ternary MoE `Experts` (megalatent/nn/moe.py): per expert and projection
    y = (x_int8 · W_ternaryᵀ) * γ_e / s_x, each projection's input RMS-normalised with the expert's gain
    and quantised per token; the weights read 2-bit packed. forward(x, counts) has Experts.forward's
    contract: x sorted by expert, counts[e] rows for expert e."""

    def __init__(self, num_experts: int, dim: int, ffn: int, eps: float):
        super().__init__()
        if dim % CODES_PER_BYTE or ffn % CODES_PER_BYTE:
            raise ValueError(f"packed experts need widths divisible by {CODES_PER_BYTE}, got dim {dim}, ffn {ffn}")
        self.num_experts, self.dim, self.ffn, self.eps = num_experts, dim, ffn, eps
        self.gate_proj = _PackedStack(num_experts, dim, ffn)
        self.up_proj = _PackedStack(num_experts, dim, ffn)
        self.down_proj = _PackedStack(num_experts, ffn, dim)
        self.register_buffer("input_norm", torch.ones(num_experts, dim))
        self.register_buffer("hidden_norm", torch.ones(num_experts, ffn))

    @classmethod
    def from_experts(cls, experts: Experts) -> "PackedExperts":
        """Quantise trained ternary experts once, with the training quantiser, and pack them."""
        if not experts.ternary:
            raise ValueError("only ternary experts (--linear-impl bitlinear / --model-family bitnet) can be packed")
        num_experts, dim, ffn = experts.gate_proj.shape
        packed = cls(num_experts, dim, ffn, experts.eps)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(packed, name, _PackedStack.from_stacked(getattr(experts, name)))
        packed.input_norm = experts.input_norm.detach().clone()
        packed.hidden_norm = experts.hidden_norm.detach().clone()
        return packed

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Not bit-exact with the training Experts, unlike PackedBitLinear with BitLinear: the training
        experts multiply the fake-quantised operands x_int / s_x and W_int * γ in float (a grouped matmul
        of straight-through values), whose products and sums round, while this sums the integer products
        exactly and applies γ / s_x once. The outputs differ by a few ulps; a hidden value that lands on an
        int8 rounding boundary can then round to the neighbouring code. (Exactness would need the training
        experts to multiply on the integer grid first, as BitLinear's _TernaryLinear does.)"""
        outs = []
        for e, block in enumerate(x.split(counts.tolist())):
            if not block.shape[0]:
                continue
            x_int, s_x = rmsnorm_act_quant(block, self.input_norm[e], self.eps)  # gate and up share it
            gate = w2a8_matmul(x_int, self.gate_proj.packed_weight[e], self.gate_proj.weight_scale[e] / s_x)
            up = w2a8_matmul(x_int, self.up_proj.packed_weight[e], self.up_proj.weight_scale[e] / s_x)
            h_int, s_h = rmsnorm_act_quant(F.silu(gate) * up, self.hidden_norm[e], self.eps)
            outs.append(w2a8_matmul(h_int, self.down_proj.packed_weight[e], self.down_proj.weight_scale[e] / s_h))
        return torch.cat(outs).to(x.dtype) if outs else x.new_zeros(0, self.dim)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, ffn={self.ffn}, 2-bit weights, "
                "int8 activations")


def bitlinear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BitLinear)]


def ternary_experts_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Experts) and m.ternary]


def _replace(model: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))


def pack_model(model: nn.Module, layers: Optional[list[str]] = None,
               make: Callable[[BitLinear], nn.Module] = PackedBitLinear.from_bitlinear) -> list[str]:
    """Replace the BitLinear layers of `model` (all, or those named) in place by `make(layer)`: by default
    their packed form. Returns the names replaced."""
    layers = bitlinear_names(model) if layers is None else layers
    _replace(model, layers, make)
    return layers


def pack_experts(model: nn.Module, names: Optional[list[str]] = None,
                 make: Callable[[Experts], nn.Module] = PackedExperts.from_experts) -> list[str]:
    """pack_model for the ternary MoE experts: replace them (all, or those named) by `make(experts)`."""
    names = ternary_experts_names(model) if names is None else names
    _replace(model, names, make)
    return names


def export_problems(cfg) -> list[str]:
    """Why the model of `cfg` cannot be packed (empty when it can); checked on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg)
    names = bitlinear_names(model)
    if any(type(m) is TernaryLinear for m in model.modules()):
        return ["its ternary layers without an input norm (--bitnet-variant hf-2b4t) have no packed form here: export "
                "it with tools/convert_checkpoint.py to-hf (transformers' BitNet layout, weights 2-bit packed too)"]
    if not names:
        return [f"the model (family {cfg.model_family!r}, --linear-impl {cfg.linear_impl}) has no BitLinear layers: "
                "train it with --model-family bitnet or --linear-impl bitlinear"]
    problems = []
    narrow = sorted({m.in_features for m in model.modules() if isinstance(m, BitLinear)
                     and m.in_features % CODES_PER_BYTE})
    if narrow:
        problems.append(f"input widths {narrow} are not divisible by {CODES_PER_BYTE} (4 codes per byte): "
                        "choose --hidden-size/--ffn-hidden-size divisible by 4")
    # The experts' inputs: the (sub-)token width to gate/up, the expert width to down.
    experts = [model.get_submodule(n) for n in ternary_experts_names(model)]
    dims = sorted({x.gate_proj.shape[1] for x in experts if x.gate_proj.shape[1] % CODES_PER_BYTE})
    ffns = sorted({x.gate_proj.shape[2] for x in experts if x.gate_proj.shape[2] % CODES_PER_BYTE})
    if dims:
        problems.append(f"the experts' input width {dims[0]} (--hidden-size / --moe-num-heads) is not divisible by "
                        f"{CODES_PER_BYTE} (4 codes per byte): choose --hidden-size or --moe-num-heads so that it is")
    if ffns:
        problems.append(f"the experts' width {ffns[0]} (--moe-ffn-hidden-size, default the dense MLP's) is not "
                        f"divisible by {CODES_PER_BYTE} (4 codes per byte): choose --moe-ffn-hidden-size so that it is")
    return problems


def export_packed(load: str, output: str, iteration: Optional[int] = None, dtype: str = "float32",
                  tokenizer_model: Optional[str] = None, force: bool = False,
                  log: Callable[[str], None] = print) -> str:
    """Pack checkpoint (`load`, `iteration`) into the directory `output`; returns the checkpoint read.

    `dtype` is that of the full-precision parts (embedding, norms, head). Written to `output.partial/`
    and renamed at the end, so a crash leaves no half-written directory under the real name.
    """
    if dtype not in DTYPES:
        raise convert.ConvertError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    path = convert.resolve_checkpoint(load, iteration)
    convert._check_output(output, force, "--output")
    train_state = ckpt.read_train_state(path)
    cfg = convert.model_config(train_state)
    problems = export_problems(cfg)
    if problems:
        raise convert.ConvertError(f"checkpoint {path} cannot be packed: " + "; ".join(problems))
    try:
        tokenizer_model = resolve_tokenizer(cfg, tokenizer_model, None, train_state, log)
    except TokenizerError as e:
        raise convert.ConvertError(str(e)) from None

    log(f"reading the weights of {path}")
    model = build_model(cfg)
    model.load_state_dict(convert.read_state(path, keys=["model"])["model"], strict=True)
    layers = pack_model(model)
    experts = pack_experts(model)
    # The full-precision parts in `dtype`; the 2-bit codes as they are and γ in fp32.
    out = {k: v if k.endswith((".packed_weight", ".weight_scale")) else v.to(DTYPES[dtype])
           for k, v in model.state_dict().items()}
    del model

    partial = output.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    packed_bytes = sum(t.numel() * t.element_size() for k, t in out.items() if k.endswith(".packed_weight"))
    log(f"writing {output}: {len(layers)} packed layers and {len(experts)} packed expert groups "
        f"({packed_bytes / 2**20:.1f} MiB of 2-bit weights), the rest in {dtype}")
    torch.save(out, os.path.join(partial, "weights.pt"))
    meta = {"format": FORMAT, "version": VERSION, "model_config": train_state["model_config"],
            "packed_layers": layers, "packed_experts": experts, "dtype": dtype, "source": os.path.abspath(path),
            "iteration": train_state["iteration"], "tokenizer": None}
    if tokenizer_model is not None:
        copy_tokenizer(tokenizer_model, partial)
        meta["tokenizer"] = "." if tokenizer_type_of(tokenizer_model) == HUGGINGFACE else "tokenizer.model"
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(output):
        shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    os.replace(partial, output)
    return path


def is_packed_dir(path: str) -> bool:
    """Whether `path` is a directory written by export_packed (rather than a training --save directory)."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "weights.pt"))


def read_packed_config(path: str) -> dict:
    meta_path = os.path.join(path, "config.json")
    if not os.path.isfile(meta_path):
        raise convert.ConvertError(f"{path} is not a packed BitNet directory (no config.json); write one with "
                                   "tools/export_bitnet.py")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise convert.ConvertError(f"{meta_path} is format {meta.get('format')!r} version {meta.get('version')}; "
                                   f"this megalatent reads {FORMAT!r} versions {readable}")
    meta.setdefault("packed_experts", [])  # version 1: BitLinear layers only
    return meta


def load_packed_model(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a packed directory, in eval mode on `device`: forward(tokens [b, s]) -> logits.

    The model is built by its family (so any decoder family with BitLinear layers loads), then each
    BitLinear is replaced by a PackedBitLinear and each ternary Experts by a PackedExperts. The build
    allocates the full-precision latent weights once, on the host, before they are dropped; only the
    packed model goes to `device`.
    """
    meta = read_packed_config(path)
    cfg = convert.model_config(meta)
    model = build_model(cfg)
    pack_model(model, meta["packed_layers"], lambda old: PackedBitLinear(old.in_features, old.out_features, old.eps))
    pack_experts(model, meta["packed_experts"], lambda old: PackedExperts(*old.gate_proj.shape, old.eps))
    weights = torch.load(os.path.join(path, "weights.pt"), weights_only=True)
    model.load_state_dict(weights, strict=True, assign=True)  # assign: keep the file's dtypes
    return model.to(device).eval()
