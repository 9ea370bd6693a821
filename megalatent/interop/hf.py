"""Hugging Face checkpoints in and out of megalatent (tools/convert_checkpoint.py from-hf / to-hf).

    from_hf   HF folder (config.json + safetensors, sharded or not, any dtype)  ->  a checkpoint under --save:
              iteration 0, weights only (the trainer resumes it with a fresh optimizer), the model config and
              the tokenizer (copied to <save>/tokenizer) recorded in its train state
    to_hf     a checkpoint (any layout)  ->  an HF folder transformers.AutoModelForCausalLM opens with our logits

One table per architecture (`ARCHITECTURES`), read both ways:

    llama    LlamaForCausalLM    <->  gpt (dense).  Import only, into: longnet (same weights, dilated attention),
                                      bitnet (continued ternary training from full-precision weights), and
                                      --num-experts E (sparse upcycling, see `upcycle`)
    bitnet   BitNetForCausalLM   <->  bitnet --bitnet-variant hf-2b4t (the released b1.58 2B4T layout: its
                                      ternary weights packed 4 rows per byte with one scale per tensor)
    mixtral  MixtralForCausalLM  <->  gpt --num-experts E: Mixtral's router takes the softmax over all experts,
                                      the top k, and renormalises them, which is the softmax over the top-k logits,
                                      our default router. (Qwen2-MoE adds a shared expert and q/k/v biases,
                                      Qwen3-MoE q/k norms: neither computes our layer.)

Everything is checked before anything is written; what an architecture cannot express (LongNet's dilated
attention, YOCO, LatentLM, LongViT, MH-MoE heads, the X-MoE router, ...) is refused with the reason, and
`to-torch` is the way out for those weights. RoPE is the half-split ("rotate_half") convention on both sides,
so q/k are not permuted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from megalatent.config import ConfigError, ModelConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model, build_parser, parse_args, validate
from megalatent.interop.convert import (ConvertError, _check_output, _single_process, check_save_dir, model_config,
                                        read_state, resolve_checkpoint)
from megalatent.interop.tokenizer_files import TokenizerError, copy_tokenizer, resolve_tokenizer, special_ids
from megalatent.models.decoder import uses_bitlinear
from megalatent.nn.bitlinear import quantize_weights

Log = Callable[[str], None]
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------ the tables

@dataclass(frozen=True)
class Row:
    """Our parameter name <-> the HF tensor name(s): `{i}` is the layer, `{e}` the expert. kind: "same" (the
    tensor as it is), "ternary" (a packed HF BitLinear: codes + weight_scale, see `ternary_to_hf`), "experts"
    (our stacked [E, in, out] <-> one [out, in] tensor per expert)."""
    ours: str
    hf: str
    kind: str = "same"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    rows: tuple[Row, ...]
    fixed: Mapping[str, Any]  # config.json values the architecture has (written on export, required on import)
    fields: Mapping[str, str]  # config.json keys <-> our ModelConfig fields, beyond those every architecture has


def _attention(kind: str = "same") -> tuple[Row, ...]:
    return tuple(Row(f"layers.{{i}}.attention.{p}.weight", f"model.layers.{{i}}.self_attn.{p}.weight", kind)
                 for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


def _dense_mlp(kind: str = "same") -> tuple[Row, ...]:
    return tuple(Row(f"layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}.weight", kind)
                 for p in ("gate_proj", "up_proj", "down_proj"))


_TRUNK = (
    Row("embed_tokens.weight", "model.embed_tokens.weight"),
    Row("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    Row("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Row("norm.weight", "model.norm.weight"),
    Row("output.weight", "lm_head.weight"),  # untied only (HF re-ties a tied head on load)
)
_MOE = "model.layers.{i}.block_sparse_moe"

ARCHITECTURES: Mapping[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", _TRUNK + _attention() + _dense_mlp(),
                 fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                        "pretraining_tp": 1},
                 fields={}),
    Architecture("bitnet", "BitNetForCausalLM", _TRUNK + _attention("ternary") + _dense_mlp("ternary") + (
                     Row("layers.{i}.attention.o_proj.norm_weight", "model.layers.{i}.self_attn.attn_sub_norm.weight"),
                     Row("layers.{i}.mlp.down_proj.norm_weight", "model.layers.{i}.mlp.ffn_sub_norm.weight")),
                 # The released 2B4T checkpoint's: ternary weights stored packed, quantised offline.
                 fixed={"hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
                        "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                                "quantization_mode": "offline"}},
                 fields={}),
    Architecture("mixtral", "MixtralForCausalLM", _TRUNK + _attention() + (
                     Row("layers.{i}.mlp.router.weight", f"{_MOE}.gate.weight"),
                     Row("layers.{i}.mlp.experts.gate_proj", f"{_MOE}.experts.{{e}}.w1.weight", "experts"),
                     Row("layers.{i}.mlp.experts.up_proj", f"{_MOE}.experts.{{e}}.w3.weight", "experts"),
                     Row("layers.{i}.mlp.experts.down_proj", f"{_MOE}.experts.{{e}}.w2.weight", "experts")),
                 fixed={"hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": None,
                        "router_jitter_noise": 0.0},
                 fields={"num_local_experts": "num_experts", "num_experts_per_tok": "moe_router_topk",
                         "router_aux_loss_coef": "moe_aux_loss_coeff"}),
)}

# config.json keys that do not change the function the weights compute.
_IGNORED_KEYS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
                 "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path",
                 "output_router_logits"}
# config.json keys read into our config by `model_fields_from_hf` (every architecture has them).
_SHARED_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings"}
# The ModelConfig fields an export has been checked against: a field added later refuses the export when it is
# set to anything but its default, until the export learns what it means.
_UNDERSTOOD = {
    "model_family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "seq_length", "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
    "normalization", "norm_epsilon", "swiglu", "position_embedding_type", "rotary_base",
    "untie_embeddings_and_output_weights", "init_method_std", "linear_impl", "attention_backend", "bitnet_variant",
    # the MoE flags Mixtral expresses, or that only shape training (checked in `export_architecture`)
    "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk", "moe_num_heads", "moe_router_type",
    "moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_capacity_factor",
    "moe_token_drop_policy", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
}


# ------------------------------------------------------------------------------ ternary tensors

def pack_ternary(w_int: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} [out, in] -> uint8 [out/4, in], transformers' BitNet layout: stored row r holds rows
    r, r + out/4, r + 2 out/4, r + 3 out/4 in its bits 0-1, 2-3, 4-5, 6-7, each as value + 1."""
    codes = (w_int + 1).to(torch.uint8).view(4, w_int.shape[0] // 4, w_int.shape[1])
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_ternary`, as float32."""
    return torch.cat([((packed >> (2 * j)) & 3) for j in range(4)]).float() - 1


def ternary_to_hf(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our latent weight -> (packed codes, weight_scale) as transformers' BitLinear reads them: it computes
    (x_int W_intᵀ) / (s_x * weight_scale), so weight_scale is 1/γ (γ = mean|W|, our training quantiser's)."""
    w_int, gamma = quantize_weights(weight)
    return pack_ternary(w_int), (1 / gamma).reshape(1).to(dtype)


def ternary_from_hf(packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """A latent weight our quantiser maps back to these codes and this scale: W_int γ / p, p the fraction of
    non-zero codes, so that mean|W| = γ and round(W / γ) = W_int."""
    w_int = unpack_ternary(packed)
    p = (w_int != 0).float().mean()
    if p == 0:
        return w_int
    return w_int * (1 / weight_scale.float().reshape(())) / p


# ------------------------------------------------------------------------------ config.json

def _rope_base(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default" or any(k not in ("rope_type", "type", "rope_theta") for k in {**params, **scaling}):
        raise ConvertError(f"config.json asks for RoPE scaling {dict(scaling or params)} (rope_type {kind!r}); "
                           "megalatent implements plain RoPE only (no llama3/yarn/linear/dynamic scaling), so the "
                           "imported model would compute something else. Import a checkpoint without rope scaling")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_fields_from_hf(config: Mapping[str, Any]) -> tuple[Architecture, dict[str, Any]]:
    """The architecture of a config.json and our ModelConfig fields for it; refuses what we do not compute."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConvertError(f"config.json has model_type {kind!r} ({config.get('architectures')}); from-hf reads "
                           f"{', '.join(a.hf_class for a in ARCHITECTURES.values())}")
    arch = ARCHITECTURES[kind]
    unknown = sorted(set(config) - _IGNORED_KEYS - _SHARED_KEYS - set(arch.fixed) - set(arch.fields))
    if unknown:
        raise ConvertError(f"config.json has fields the import does not know for {arch.hf_class}: "
                           f"{', '.join(f'{k}={config[k]!r}' for k in unknown)}; it cannot tell whether the model "
                           "computes what ours does, so it refuses (teach megalatent/interop/hf.py what they mean)")
    wrong = [f"{k}={config[k]!r} (we compute {v!r})" for k, v in arch.fixed.items()
             if k in config and config[k] != v and not (k == "quantization_config" and config[k] is None)]
    if wrong:
        raise ConvertError(f"config.json: {'; '.join(wrong)}; megalatent's {arch.hf_class} layers compute only the "
                           "values in brackets")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise ConvertError(f"config.json: head_dim {config.get('head_dim')} with hidden_size {hidden} and "
                           f"{heads} heads; megalatent's head size is hidden_size / heads")
    vocab = config["vocab_size"]
    fields = {"num_layers": config["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
              "group_query_attention": kv != heads, "num_query_groups": kv if kv != heads else None,
              "ffn_hidden_size": config["intermediate_size"], "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
              "rotary_base": _rope_base(config), "max_position_embeddings": config.get("max_position_embeddings"),
              "vocab_size": vocab, "make_vocab_size_divisible_by": math.gcd(vocab, 128),  # no padding rows
              "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False)}
    fields.update({ours: config[key] for key, ours in arch.fields.items() if key in config})
    return arch, fields


def hf_config(cfg: ModelConfig, arch: Architecture, dtype: str, ids: dict[str, int]) -> dict[str, Any]:
    """config.json of `arch` for `cfg`. vocab_size is the padded embedding size (the rows the weights have).
    RoPE's base is written both as `rope_theta` (transformers 4.x, vLLM, llama.cpp) and `rope_parameters`
    (transformers 5), and the dtype as both `torch_dtype` and `dtype`."""
    fields = {key: getattr(cfg, ours) for key, ours in arch.fields.items()}
    return {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_width if cfg.num_experts is not None else cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "vocab_size": cfg.padded_vocab_size, "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        **arch.fixed, **fields, "initializer_range": cfg.init_method_std, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype, **ids,
    }


# ------------------------------------------------------------------------------ export

def export_architecture(cfg: ModelConfig) -> tuple[Optional[Architecture], list[str]]:
    """The HF architecture that computes the model of `cfg`, or None and why none does."""
    family = cfg.model_family
    if family not in ("gpt", "bitnet"):
        return None, [f"model family {family!r} has no Hugging Face equivalent (transformers has no "
                      f"{'dilated attention' if family in ('longnet', 'longvit') else family} model); use "
                      "`to-torch` for its raw weights"]
    problems = [f"the export does not know what --{f.name.replace('_', '-')} {getattr(cfg, f.name)!r} means for "
                "Hugging Face (teach megalatent/interop/hf.py)" for f in dataclasses.fields(cfg)
                if f.name not in _UNDERSTOOD and getattr(cfg, f.name) != f.default]
    if cfg.normalization != "RMSNorm":
        problems.append(f"the model uses --normalization {cfg.normalization}; the HF architectures have RMSNorm")
    if cfg.position_embedding_type != "rope":
        problems.append(f"the model uses --position-embedding-type {cfg.position_embedding_type}; the HF "
                        "architectures always apply RoPE")
    if family == "bitnet":
        if cfg.bitnet_variant != "hf-2b4t":
            problems.append("the model is --bitnet-variant b1.58 (every BitLinear with its own input norm, no block "
                            "norms): transformers' BitNet is the 2B4T layout; train with --bitnet-variant hf-2b4t to "
                            "export to it, or pack this one with tools/export_bitnet.py")
        return ARCHITECTURES["bitnet"], problems
    if not cfg.swiglu:
        problems.append("the model has a GELU MLP (--no-swiglu); LLaMA's and Mixtral's MLPs are SwiGLU")
    if uses_bitlinear(cfg):
        problems.append("the model has BitLinear layers (--linear-impl bitlinear); LLaMA has none: export it with "
                        "tools/export_bitnet.py, or train --model-family bitnet --bitnet-variant hf-2b4t")
    if cfg.num_experts is None:
        return ARCHITECTURES["llama"], problems
    differs = {"moe_layer_freq": (1, "--moe-layer-freq > 1 (Mixtral's layers are all MoE)"),
               "moe_num_heads": (1, "MH-MoE heads (--moe-num-heads > 1: Mixtral has no head/merge projections)"),
               "moe_router_type": ("linear", "the X-MoE router (--moe-router-type xmoe)"),
               "moe_router_pre_softmax": (False, "--moe-router-pre-softmax (Mixtral renormalises the top-k weights)"),
               "moe_expert_capacity_factor": (None, "a capacity factor (Mixtral is dropless)"),
               "moe_router_enable_expert_bias": (False, "an expert-selection bias (Mixtral's router has none)")}
    problems += [f"Mixtral cannot express {what}" for field, (value, what) in differs.items()
                 if getattr(cfg, field) != value]
    return ARCHITECTURES["mixtral"], problems


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _row_of(arch: Architecture, name: str) -> tuple[Row, Optional[str]]:
    m = _LAYER.match(name)
    template = _LAYER.sub("layers.{i}.", name) if m else name
    for row in arch.rows:
        if row.ours == template:
            return row, m.group(1) if m else None
    raise ConvertError(f"parameter {name} has no {arch.hf_class} equivalent; the export knows "
                       f"{sorted(r.ours for r in arch.rows)}")


def hf_state_dict(model_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, arch: Architecture,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under `arch`'s names, as contiguous tensors of their own (SafeTensors refuses views and
    shared storage). With tied embeddings there is no lm_head.weight: HF ties it on load, and its own
    save_pretrained leaves it out the same way."""
    out = {}
    for name, tensor in model_sd.items():
        row, layer = _row_of(arch, name)
        hf = row.hf.replace("{i}", layer or "")
        tensor = tensor.detach().to("cpu")
        if row.kind == "ternary":
            codes, scale = ternary_to_hf(tensor, dtype)
            out[hf], out[hf.replace(".weight", ".weight_scale")] = codes, scale
        elif row.kind == "experts":  # ours [E, in, out] (x @ w[e]) -> HF's [out, in] per expert
            for e, w in enumerate(tensor):
                out[hf.replace("{e}", str(e))] = w.t().to(dtype).contiguous()
        else:
            out[hf] = tensor.to(dtype=dtype, copy=True).contiguous()
    missing = sorted(set(expected_hf_names(arch, cfg)) - set(out))
    if missing:
        raise ConvertError(f"the checkpoint's weights do not make a {cfg.num_layers}-layer {arch.hf_class}: "
                           f"missing {missing[:6]}")
    return out


def _hf_names(row: Row, cfg: ModelConfig) -> list[str]:
    if row.ours == "output.weight" and not cfg.untie_embeddings_and_output_weights:
        return []
    layers = range(cfg.num_layers) if "{i}" in row.hf else [None]
    experts = range(cfg.num_experts) if "{e}" in row.hf else [None]
    return [row.hf.replace("{i}", str(i)).replace("{e}", str(e)) for i in layers for e in experts]


def expected_hf_names(arch: Architecture, cfg: ModelConfig) -> list[str]:
    """Every tensor name of `arch` for the model of `cfg` (ternary rows: the codes; their scales beside)."""
    return [name for row in arch.rows for name in _hf_names(row, cfg)]


def to_hf(load: str, output: str, iteration: Optional[int] = None, dtype: str = "float32",
          tokenizer_model: Optional[str] = None, data_cache_path: Optional[str] = None, force: bool = False,
          log: Log = print) -> str:
    """Export checkpoint (`load`, `iteration`) as the HF folder `output` of the architecture that computes it.

    Writes config.json, model.safetensors, generation_config.json and the tokenizer's files when it is known,
    into `output.partial/`, renamed to `output` at the end (replacing it under force). Returns the checkpoint read.
    """
    if dtype not in HF_DTYPES:
        raise ConvertError(f"--dtype {dtype}: choose one of {', '.join(HF_DTYPES)}")
    path = resolve_checkpoint(load, iteration)
    _check_output(output, force, "--output")
    train_state = ckpt.read_train_state(path)
    cfg = model_config(train_state)
    arch, problems = export_architecture(cfg)
    if problems:
        target = arch.hf_class if arch is not None else "Hugging Face"
        raise ConvertError(f"checkpoint {path} cannot be exported to {target}: " + "; ".join(problems))
    try:
        tokenizer_model = resolve_tokenizer(cfg, tokenizer_model, data_cache_path, train_state, log)
        ids = special_ids(tokenizer_model)
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    from safetensors.torch import save_file

    log(f"reading the weights of {path}")
    weights = hf_state_dict(read_state(path, keys=["model"])["model"], cfg, arch, HF_DTYPES[dtype])
    partial = output.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    log(f"writing {output} ({arch.hf_class}, {len(weights)} tensors, {dtype})")
    save_file(weights, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(partial, "config.json"), hf_config(cfg, arch, dtype, ids))
    _write_json(os.path.join(partial, "generation_config.json"), {"_from_model_config": True, **ids})
    if tokenizer_model is not None:
        log(f"included tokenizer {tokenizer_model}: {', '.join(copy_tokenizer(tokenizer_model, partial))}")
    if os.path.exists(output):
        shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    os.replace(partial, output)
    return path


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


# ------------------------------------------------------------------------------ import

class HFWeights:
    """The tensors of an HF folder: model.safetensors, or the shards model.safetensors.index.json names."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                files = {name: os.path.join(directory, shard) for name, shard in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                files = {name: single for name in f.keys()}
        else:
            raise ConvertError(f"--input {directory} has no model.safetensors or model.safetensors.index.json; "
                               "re-save .bin checkpoints with transformers' save_pretrained (SafeTensors)")
        missing = sorted({f for f in files.values() if not os.path.isfile(f)})
        if missing:
            raise ConvertError(f"--input {directory}: the index names shards that are not there: {missing}")
        self.files, self._open = files, {}
        self._safe_open = safe_open

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._safe_open(file, "pt")
        return self._open[file].get_tensor(name)


def from_hf_state_dict(weights: HFWeights, arch: Architecture, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF tensors under our names (fp32), by `arch`'s table. Every tensor of the folder must be used."""
    expected = expected_hf_names(arch, cfg)
    present = weights.names()
    ternary_scales = {n.replace(".weight", ".weight_scale") for r in arch.rows if r.kind == "ternary"
                      for n in _hf_names(r, cfg)}
    missing = sorted(set(expected) - present)
    # a tied head may be stored anyway; ternary weights stored as latent (unquantised) tensors have no scale
    unexpected = sorted(present - set(expected) - ternary_scales - {"lm_head.weight"})
    if missing or unexpected:
        raise ConvertError(f"the safetensors do not hold a {cfg.num_layers}-layer {arch.hf_class} as config.json "
                           f"describes: missing {missing[:6]}, unexpected {unexpected[:6]}")
    out = {}
    for row in arch.rows:
        if row.ours == "output.weight" and not cfg.untie_embeddings_and_output_weights:
            continue
        for i in range(cfg.num_layers) if "{i}" in row.ours else [None]:
            ours, hf = row.ours.replace("{i}", str(i)), row.hf.replace("{i}", str(i))
            if row.kind == "experts":
                out[ours] = torch.stack([weights.get(hf.replace("{e}", str(e))).float().t()
                                         for e in range(cfg.num_experts)])
                continue
            tensor = weights.get(hf)
            if row.kind == "ternary" and tensor.dtype == torch.uint8:  # packed (else latent weights, no scale)
                out[ours] = ternary_from_hf(tensor, weights.get(hf.replace(".weight", ".weight_scale")))
            else:
                out[ours] = tensor.float()
    return out


# The parameters an import may leave as a new model initialises them (logged): the source has no such thing.
_FRESH = re.compile(r"\.mlp\.(router|head_proj|merge_proj|experts)\.|\.(o_proj|down_proj)\.norm_weight$")


def upcycle(model_sd: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], cfg: ModelConfig, log: Log) -> set[str]:
    """Sparse upcycling (Komatsuzaki et al. 2022) of the dense MLPs of the layers that are MoE in `cfg`: every
    expert starts as the dense MLP, the router as a new model's. With all experts equal and combine weights
    summing to 1 (the softmax over the top-k logits), the layer computes the dense MLP exactly.

    MH-MoE (--moe-num-heads h > 1) cannot start as the dense model: its experts see d/h-wide sub-tokens, and no
    function of a d/h-wide slice is the d-wide MLP. Its head and merge projections start as the identity (so a
    sub-token is a slice of the residual stream, and the layer is a plain MoE over the slices), its experts and
    router as a new model's. Returns the names of `model_sd` it filled; pops the dense weights it used."""
    filled = set()
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"layers.{i}.mlp."
        dense_weights = {n: dense.pop(f"{p}{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")}
        if cfg.moe_num_heads > 1:
            for proj in ("head_proj", "merge_proj"):
                model_sd[f"{p}{proj}.weight"].copy_(torch.eye(cfg.hidden_size))
                model_sd[f"{p}{proj}.bias"].zero_()
                filled |= {f"{p}{proj}.weight", f"{p}{proj}.bias"}
            continue
        for n, w in dense_weights.items():
            target = model_sd[f"{p}experts.{n}"]
            if tuple(target.shape[1:]) != tuple(w.t().shape):
                raise ConvertError(f"layer {i}: the experts' {n} is {tuple(target.shape[1:])}, the dense MLP's "
                                   f"{tuple(w.t().shape)}: upcycling copies the dense MLP, so leave "
                                   "--moe-ffn-hidden-size at the dense width")
            target.copy_(w.t().expand_as(target))
            filled.add(f"{p}experts.{n}")
    if cfg.moe_num_heads > 1:
        log("WARNING: MH-MoE layers cannot start as the dense MLP (their experts see hidden/heads-wide sub-tokens): "
            "head/merge projections start as the identity, experts and routers as a new model's")
    elif cfg.moe_router_pre_softmax or cfg.moe_expert_capacity_factor is not None:
        log("WARNING: with --moe-router-pre-softmax or a capacity factor the upcycled layers do not compute the "
            "dense MLP at the start (combine weights that do not sum to 1, dropped assignments)")
    return filled


def fold_block_norms(model_sd: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], cfg: ModelConfig) -> set[str]:
    """Into the b1.58 layout (every BitLinear normalises its own input, the blocks have no norms): each block
    norm's gain becomes the input-norm gain of the BitLinears that read its output (q/k/v, gate/up); o_proj's
    and down_proj's input norms are new (ones). Returns the names filled; pops the norms used."""
    filled = set()
    for i in range(cfg.num_layers):
        for norm, projs in (("attention_norm", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
                            ("mlp_norm", ("mlp.gate_proj", "mlp.up_proj"))):
            gain = dense.pop(f"layers.{i}.{norm}.weight")
            for proj in projs:
                model_sd[f"layers.{i}.{proj}.norm_weight"].copy_(gain)
                filled.add(f"layers.{i}.{proj}.norm_weight")
    return filled


def _target_config(arch: Architecture, hf_fields: dict[str, Any], model_flags: list[str]) -> ModelConfig:
    """The model to import into: the family and its flags from `model_flags`, the architecture from config.json."""
    try:
        given = set(vars(build_parser().parse_args(model_flags))) - {"config"}
        if arch.model_type == "bitnet" and "model_family" not in given:  # its one family
            model_flags = ["--model-family", "bitnet"] + model_flags
        cfg = parse_args(model_flags)
    except SystemExit:
        raise ConvertError(f"from-hf: cannot read the model flags {model_flags} (see the message above)") from None
    except ConfigError as e:
        raise ConvertError(f"from-hf: {e}") from None
    errors = [f"--{k.replace('_', '-')} is read from config.json; drop it" for k in sorted(given & set(hf_fields))
              if k != "make_vocab_size_divisible_by"]
    errors += [f"--{k.replace('_', '-')} is not a model flag; from-hf takes the model's family and its flags only "
               "(give training flags to megalatent-pretrain)" for k in sorted(given)
               if not hasattr(cfg.model, k) and k != "model_family"]
    family = cfg.model.model_family
    if arch.model_type == "bitnet":
        if family != "bitnet" or "bitnet_variant" in given and cfg.model.bitnet_variant != "hf-2b4t":
            errors.append("a BitNetForCausalLM imports into --model-family bitnet --bitnet-variant hf-2b4t only "
                          "(its layout)")
        else:
            cfg.model.bitnet_variant = "hf-2b4t"
    elif family not in ("gpt", "longnet", "bitnet"):
        errors.append(f"--model-family {family}: from-hf imports a {arch.hf_class} into gpt, longnet or bitnet; "
                      f"{family}'s layers have no counterpart in it")
    if family == "bitnet" and (arch.model_type == "mixtral" or cfg.model.num_experts is not None):
        errors.append("--model-family bitnet with experts: importing into ternary experts is not supported; import "
                      "into --model-family gpt")
    if errors:
        raise ConvertError("from-hf: " + "; ".join(errors))
    for k, v in hf_fields.items():
        if k != "make_vocab_size_divisible_by" or k not in given:
            setattr(cfg.model, k, v)
    if cfg.model.max_position_embeddings is not None:
        cfg.model.seq_length = min(cfg.model.seq_length, cfg.model.max_position_embeddings)
    try:
        validate(cfg, world_size=1)
    except ConfigError as e:
        raise ConvertError(f"from-hf: the model to import into is not valid:\n{e}") from None
    return cfg.model


def from_hf(input: str, save: str, model_flags: Iterable[str] = (), seed: int = 1234, force: bool = False,
            log: Log = print) -> str:
    """Import the HF folder `input` as iteration 0 of a checkpoint under `save`; returns its path.

    `model_flags` are megalatent-pretrain's model flags (the family, its flags, --num-experts ...); the
    architecture comes from config.json. What the source lacks (routers, sub-norms) starts as a new model
    seeded with `seed` initialises it. Nothing is written until every tensor is converted."""
    config_path = os.path.join(input, "config.json")
    if not os.path.isfile(config_path):
        raise ConvertError(f"--input {input}: no config.json; give a folder written by save_pretrained")
    check_save_dir(save, force)
    with open(config_path) as f:
        config = json.load(f)
    arch, hf_fields = model_fields_from_hf(config)
    cfg = _target_config(arch, hf_fields, list(model_flags))
    weights = HFWeights(input)
    log(f"reading {input} ({arch.hf_class}, {len(weights.names())} tensors) into --model-family {cfg.model_family}")
    dense = from_hf_state_dict(weights, arch, cfg)

    torch.manual_seed(seed)
    model = build_model(cfg)  # fp32 on the host: the values of whatever the source has no counterpart for
    model_sd = model.state_dict()
    filled = set()
    if arch.model_type == "llama" and cfg.num_experts is not None:
        filled |= upcycle(model_sd, dense, cfg, log)
    if arch.model_type == "llama" and "layers.0.attention_norm.weight" not in model_sd:  # the b1.58 layout
        filled |= fold_block_norms(model_sd, dense, cfg)
    for name, tensor in dense.items():
        if name not in model_sd:
            raise ConvertError(f"{input}: {name} has no place in the --model-family {cfg.model_family} model")
        target = model_sd[name]
        rows = tensor.shape[0]
        if name in ("embed_tokens.weight", "output.weight") and rows <= target.shape[0]:
            target.zero_()  # padding rows (--make-vocab-size-divisible-by) are zero
            target = target[:rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ConvertError(f"{input}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}")
        target.copy_(tensor)
        filled.add(name)
    fresh = sorted(set(model_sd) - filled)
    unknown = [n for n in fresh if not _FRESH.search(n)]
    if unknown:
        raise ConvertError(f"{input} has nothing for {unknown[:6]} of the --model-family {cfg.model_family} model")
    if fresh:
        log(f"new (initialised as a new model, seed {seed}): {', '.join(fresh[:8])}{' ...' if len(fresh) > 8 else ''}")
    if arch.model_type == "llama" and cfg.model_family == "bitnet" and cfg.bitnet_variant == "hf-2b4t":
        log("WARNING: the hf-2b4t layout's MLP is a squared-ReLU GLU; the imported SwiGLU weights start computing "
            "another function (--bitnet-variant b1.58 keeps SwiGLU)")

    tokenizer = _import_tokenizer(input, save, log)
    train_state = {"consumed_samples": 0, "skipped": 0, "nan": 0, "data_loader": {"consumed_samples": 0},
                   "model_config": dataclasses.asdict(cfg), "tokenizer_model": tokenizer, "weights_only": True,
                   "source": {"format": "huggingface", "path": os.path.abspath(input), "architecture": arch.hf_class}}
    log(f"writing iteration 0 to {save} (weights only)")
    with _single_process():
        return ckpt.save_state_dicts(save, 0, {"model": model_sd}, train_state, {})


def _import_tokenizer(input: str, save: str, log: Log) -> Optional[str]:
    """Copy the HF folder's tokenizer to <save>/tokenizer (atomically); returns what the run should load."""
    if os.path.isfile(os.path.join(input, "tokenizer.json")):
        source, name = input, None
    elif os.path.isfile(os.path.join(input, "tokenizer.model")):
        source, name = os.path.join(input, "tokenizer.model"), "tokenizer.model"
    else:
        log(f"WARNING: {input} has no tokenizer.json or tokenizer.model: the checkpoint records no tokenizer")
        return None
    final = os.path.join(save, "tokenizer")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    files = copy_tokenizer(source, partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    log(f"copied the tokenizer ({', '.join(files)}) to {final}")
    return os.path.abspath(os.path.join(final, name) if name else final)


__all__ = ["ARCHITECTURES", "HF_DTYPES", "export_architecture", "from_hf", "hf_config", "hf_state_dict",
           "model_fields_from_hf", "pack_ternary", "to_hf", "unpack_ternary"]
