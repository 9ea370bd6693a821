"""Checkpoint conversion: our DCP checkpoints <-> one plain torch file, and export to Hugging Face LLaMA.

tools/convert_checkpoint.py is the command line over these functions:

    to_torch   iter_XXXXXXX/ (DCP, any number of ranks)  ->  FILE.pt = {"model", "optim", "train_state", "rng"}
    from_torch FILE.pt  ->  a complete checkpoint (manifest, `latest` pointer, atomic) the trainer resumes from
    to_hf      iter_XXXXXXX/ of the `gpt` family  ->  a LlamaForCausalLM folder (config.json, model.safetensors, ...)

The torch file is for people who want to look at or edit weights with nothing but `torch.load` (no
process group, no megalatent): every value in it is a tensor or a plain Python value, so it loads
under torch's default `weights_only=True` (Megatron's pickled `argparse.Namespace` is what broke
for its users when torch 2.6 changed that default). Everything is read into CPU memory at once,
which is the point of the format and also its limit: convert on a machine with RAM for the model
and the optimizer state (about 16 bytes per parameter).

Every problem a user can cause (no checkpoint where they pointed, an output that exists, a model the
export cannot express) raises `ConvertError` with a message that names the problem and the fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
# The same two pieces the public `format_utils.dcp_to_torch_save` is made of; calling them directly
# reads the checkpoint into memory without the intermediate file that function insists on writing.
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from megalatent.config import ModelConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model, model_config_from_saved

Log = Callable[[str], None]


class ConvertError(Exception):
    """A conversion refused because of its inputs; the message says what is wrong and how to fix it."""


@contextlib.contextmanager
def _single_process():
    """DCP warns on every call without a process group; here that is the intent, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# ------------------------------------------------------------------------------------------ reading

def _iterations(root: str) -> list[int]:
    return ckpt.iterations(root)


def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> str:
    """The checkpoint directory to read: iteration `iteration` under `load`, else the newest complete one."""
    if not os.path.isdir(load):
        raise ConvertError(f"--load {load}: no such directory; give the --save directory of a training run")
    if iteration is None:
        try:
            path = ckpt.find_loadable(load)
        except ckpt.CheckpointError as e:  # a pointer to a missing iteration, or every checkpoint damaged
            raise ConvertError(f"--load {load}: {e}") from None
        if path is None:
            raise ConvertError(f"--load {load}: no complete checkpoint: it holds no iter_XXXXXXX/ directory; give "
                               "the --save directory of a run that saved one")
        return path
    path = ckpt.iteration_dir(load, iteration)
    if not os.path.isdir(path):
        raise ConvertError(f"--load {load} has no checkpoint of iteration {iteration}; it has iterations "
                           f"{_iterations(load)}: pick one with --iteration, or leave it out for the newest")
    problem = ckpt.verify(path)
    if problem is not None:
        raise ConvertError(f"checkpoint {path} is incomplete ({problem}); pick another --iteration or "
                           "leave it out for the newest complete one")
    return path


def read_state(path: str, keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """The DCP part of checkpoint `path` as full CPU tensors: {"model": ..., "optim": ...}, or only `keys`.

    Works whatever number of ranks and whichever sharding wrote it, and needs no process group.
    """
    state: dict[str, Any] = {}
    with _single_process():
        _load_state_dict(state, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys=set(keys) if keys is not None else None),
                         no_dist=True)
    return state


def read_rng_states(path: str) -> dict[int, dict[str, Any]]:
    """Every rank's RNG states saved in checkpoint `path` (rank -> states)."""
    rng_dir = os.path.join(path, "rng")
    names = os.listdir(rng_dir) if os.path.isdir(rng_dir) else []
    return {int(m.group(1)): torch.load(os.path.join(rng_dir, m.group(0)), weights_only=False)
            for m in map(re.compile(r"^rank_(\d+)\.pt$").match, sorted(names)) if m}


def model_config(train_state: dict[str, Any]) -> ModelConfig:
    """The ModelConfig (its family's class) a checkpoint was written by: its train state records it as a
    dict. Older checkpoints recorded every family's fields, and some values at the top of the train state:
    both still read."""
    saved = train_state.get("model_config")
    if not isinstance(saved, dict):
        raise ConvertError("the train state has no model_config; it was not written by megalatent-pretrain "
                           "or tools/convert_checkpoint.py to-torch")
    cfg, problems = model_config_from_saved(saved, fallback=train_state)
    if problems:
        raise ConvertError(f"the checkpoint's model_config does not fit this megalatent ({'; '.join(problems)}): "
                           "it was written by another version; convert it with that version")
    return cfg


# The RNG states hold numpy's Mersenne-Twister key as an ndarray, which torch's default
# weights_only unpickler refuses; in the torch file it is a tensor instead.

def _rng_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, key, *rest = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest)}


def _rng_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, key, *rest = state["numpy"]
    return {**state, "numpy": (name, key.numpy().astype(np.uint32), *rest)}


def _check_output(path: str, force: bool, what: str) -> None:
    """Refuse to overwrite `path` (a file, or a non-empty directory) unless --force."""
    if not force and (os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))):
        raise ConvertError(f"{what} {path} already exists; pass --force to replace it, or choose another path")


# ------------------------------------------------------------------------------ one torch file

def to_torch(load: str, output: str, iteration: Optional[int] = None, force: bool = False,
             log: Log = print) -> str:
    """Write checkpoint (`load`, `iteration`) as one torch file; returns the checkpoint it read."""
    if os.path.isdir(output):
        raise ConvertError(f"--output {output} is a directory; give the path of the .pt file to write")
    path = resolve_checkpoint(load, iteration)
    _check_output(output, force, "--output")
    log(f"reading {path}")
    state = read_state(path)
    state["train_state"] = ckpt.read_train_state(path)
    state["rng"] = {rank: _rng_to_plain(s) for rank, s in read_rng_states(path).items()}
    n = sum(t.numel() for t in state["model"].values())
    log(f"writing {output} ({n:,} parameters, iteration {state['train_state']['iteration']})")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"  # a crash leaves no half-written file under the real name
    torch.save(state, tmp)
    os.replace(tmp, output)
    return path


def _shape_problems(cfg: ModelConfig, model_sd: dict[str, torch.Tensor]) -> list[str]:
    """How `model_sd` differs from what the model of `cfg` holds (names and shapes), checked on the
    meta device so nothing is allocated. Catches a hand-edited file before training does."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in model_sd]
    problems += [f"unexpected {k}" for k in model_sd if k not in expected]
    problems += [f"{k} has shape {tuple(model_sd[k].shape)}, the model needs {shape}"
                 for k, shape in expected.items() if k in model_sd and tuple(model_sd[k].shape) != shape]
    return problems


def from_torch(input: str, save: str, iteration: Optional[int] = None, force: bool = False,
               log: Log = print) -> str:
    """Write the torch file `input` (as to_torch writes it) as a checkpoint under `save`; returns its path.

    Goes through `checkpoint.save_state_dicts`, the trainer's own atomic save, so the result has the
    manifest and the `latest` pointer and `megalatent-pretrain --load save` resumes from it.
    """
    if not os.path.isfile(input):
        raise ConvertError(f"--input {input}: no such file")
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConvertError(f"--save {save} is a file; give a directory (new, or one to add a checkpoint to)")
    if os.path.isdir(save) and _iterations(save) and not force:
        raise ConvertError(f"--save {save} already holds checkpoints {_iterations(save)}; the converted one "
                           "would become the one a resume picks. Pass --force to write it there anyway, or "
                           "choose an empty directory")
    log(f"reading {input}")
    try:
        data = torch.load(input, weights_only=True)
    except Exception as e:
        # torch's message is a page of advice; the line naming what it refused is what the user needs.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line),
                      lines[0] if lines else type(e).__name__)
        raise ConvertError(f"--input {input} is not a torch file of plain tensors and values ({detail}); "
                           "write it with tools/convert_checkpoint.py to-torch") from None
    missing = [k for k in ("model", "train_state") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConvertError(f"--input {input} has no {' or '.join(missing)} entry; it needs "
                           "{'model', 'optim', 'train_state'} as tools/convert_checkpoint.py to-torch writes")
    train_state = dict(data["train_state"])
    version = train_state.get("format_version")
    if version != ckpt.FORMAT_VERSION:
        raise ConvertError(f"--input {input} comes from a checkpoint of format version {version}, and this "
                           f"megalatent writes version {ckpt.FORMAT_VERSION} (the optimizer state is laid out "
                           "differently): convert it back with the megalatent that wrote it, or delete its "
                           "'optim' entry and resume with --no-load-optim")
    problems = _shape_problems(model_config(train_state), data["model"])
    if problems:
        raise ConvertError(f"--input {input}: the weights do not fit the model its train_state.model_config "
                           f"describes: {'; '.join(problems[:8])}" + (" ..." if len(problems) > 8 else ""))
    iteration = iteration if iteration is not None else train_state.get("iteration")
    if iteration is None:
        raise ConvertError(f"--input {input}: its train_state has no iteration; give one with --iteration")
    state = {"model": data["model"]}
    if "optim" in data:
        state["optim"] = data["optim"]
    else:
        log("WARNING: the file has no optimizer state: resume from it with --no-load-optim")
    for key in ("iteration", "format_version"):  # the save writes them
        train_state.pop(key, None)
    rng = {int(rank): _rng_from_plain(s) for rank, s in data.get("rng", {}).items()}
    log(f"writing iteration {iteration} to {save}")
    with _single_process():
        return ckpt.save_state_dicts(save, int(iteration), state, train_state, rng)


# ------------------------------------------------------------------------- Hugging Face LLaMA

HF_FAMILIES = ("gpt",)

# Our parameter name -> LlamaForCausalLM's; `{i}` is the layer index. The tensors need no change:
# both apply RoPE in the half-split ("rotate_half") convention, so q/k are not permuted (Meta's
# original LLaMA checkpoints, which interleave, need that; ours do not).
HF_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # untied only: see hf_state_dict
}
_LAYER = re.compile(r"^layers\.(\d+)\.")

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The ModelConfig fields the export has been checked against. A field added later (a new architectural
# option) refuses the export when it is set to anything but its default, until the export learns it.
_HF_UNDERSTOOD = {
    "model_family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "seq_length", "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
    "normalization", "norm_epsilon", "swiglu", "position_embedding_type", "rotary_base",
    "untie_embeddings_and_output_weights", "init_method_std", "linear_impl", "attention_backend",
}


def hf_export_problems(cfg: ModelConfig) -> list[str]:
    """Why LlamaForCausalLM cannot express the model of `cfg` (empty when it can)."""
    if cfg.model_family not in HF_FAMILIES:
        return [f"model family {cfg.model_family!r} has no Hugging Face equivalent; the export supports "
                f"{', '.join(HF_FAMILIES)} (the LLaMA-style baseline). Use `to-torch` for its raw weights"]
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"the model uses --normalization {cfg.normalization}; LlamaForCausalLM has RMSNorm only")
    if not cfg.swiglu:
        problems.append("the model has a GELU MLP (--no-swiglu); LlamaForCausalLM's MLP is SwiGLU only")
    if cfg.linear_impl == "bitlinear":
        problems.append("the model has BitLinear layers (--linear-impl bitlinear); LlamaForCausalLM has none: "
                        "export it with tools/export_bitnet.py")
    if cfg.position_embedding_type != "rope":
        problems.append(f"the model uses --position-embedding-type {cfg.position_embedding_type}; "
                        "LlamaForCausalLM always applies RoPE")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _HF_UNDERSTOOD and getattr(cfg, f.name) != f.default:
            problems.append(f"the export does not know what --{f.name.replace('_', '-')} "
                            f"{getattr(cfg, f.name)!r} means for LLaMA (teach convert.hf_export_problems)")
    return problems


def hf_state_dict(model_sd: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names, as contiguous tensors of their own (SafeTensors refuses
    views and shared storage).

    With tied embeddings there is no lm_head.weight: HF ties it to model.embed_tokens.weight on load
    (`_tied_weights_keys`) and its own save_pretrained leaves it out the same way.
    """
    out = {}
    for name, tensor in model_sd.items():
        m = _LAYER.match(name)
        template = _LAYER.sub("layers.{i}.", name) if m else name
        if template not in HF_NAMES:
            raise ConvertError(f"parameter {name} has no LlamaForCausalLM equivalent; the export knows "
                               f"{sorted(HF_NAMES)}")
        hf_name = HF_NAMES[template].format(i=m.group(1) if m else "")
        out[hf_name] = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    expected = {HF_NAMES[t].format(i=i) for t in HF_NAMES if "{i}" in t for i in range(cfg.num_layers)}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    if cfg.untie_embeddings_and_output_weights:
        expected.add("lm_head.weight")
    if set(out) != expected:
        raise ConvertError(f"the checkpoint's weights do not make a {cfg.num_layers}-layer LLaMA: missing "
                           f"{sorted(expected - set(out))}, unexpected {sorted(set(out) - expected)}")
    return out


def hf_llama_config(cfg: ModelConfig, dtype: str, special_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of LlamaForCausalLM for `cfg`.

    vocab_size is the padded embedding size (the rows the weights have; ids past the tokenizer's
    are never produced by it). RoPE's base is written both as `rope_theta` (transformers 4.x, vLLM,
    llama.cpp) and `rope_parameters` (transformers 5), and the dtype as both `torch_dtype` and `dtype`.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "vocab_size": cfg.padded_vocab_size,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        **special_ids,
    }


def _special_ids(tokenizer_model: Optional[str]) -> dict[str, int]:
    """bos/eos/pad ids from the sentencepiece model (those it defines; none without a model)."""
    if tokenizer_model is None:
        return {}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def find_default_tokenizer(data_cache_path: str, vocab_size: Optional[int]) -> list[str]:
    """Default-corpus tokenizers under a --data-cache-path that could have trained a model of `vocab_size`
    (<cache>/stdlib-pyX.Y-vocabN/tokenizer.model, N = vocab_size)."""
    if not os.path.isdir(data_cache_path):
        return []
    pattern = re.compile(rf"^stdlib-py\d+\.\d+-vocab{vocab_size}$")
    return sorted(os.path.join(data_cache_path, d, "tokenizer.model") for d in os.listdir(data_cache_path)
                  if pattern.match(d) and os.path.isfile(os.path.join(data_cache_path, d, "tokenizer.model")))


def _resolve_tokenizer(cfg: ModelConfig, tokenizer_model: Optional[str], data_cache_path: Optional[str],
                       train_state: dict[str, Any], log: Log) -> Optional[str]:
    """Which sentencepiece model to ship: --tokenizer-model, else the one the train state names, else
    the default corpus's under --data-cache-path when exactly one fits. A tokenizer whose size differs
    from the model's vocabulary is refused: it cannot be the one the model was trained with."""
    if tokenizer_model is None and train_state.get("tokenizer_model"):
        tokenizer_model = train_state["tokenizer_model"]
        if not os.path.isfile(tokenizer_model):
            log(f"WARNING: the checkpoint names tokenizer {tokenizer_model}, which is gone; "
                "pass --tokenizer-model to include one")
            return None
    if tokenizer_model is None and data_cache_path is not None:
        found = find_default_tokenizer(data_cache_path, cfg.vocab_size)
        if len(found) > 1:
            raise ConvertError(f"--data-cache-path {data_cache_path} holds several default-corpus tokenizers "
                               f"of {cfg.vocab_size} tokens ({', '.join(found)}); pick one with --tokenizer-model")
        if not found:
            raise ConvertError(f"--data-cache-path {data_cache_path} holds no default-corpus tokenizer of "
                               f"{cfg.vocab_size} tokens (stdlib-pyX.Y-vocab{cfg.vocab_size}/tokenizer.model); "
                               "give the tokenizer with --tokenizer-model")
        tokenizer_model = found[0]
    if tokenizer_model is None:
        from megalatent.data.gpt_data import default_cache_dir

        found = find_default_tokenizer(default_cache_dir(), cfg.vocab_size)
        hint = (f"; the default cache has {', '.join(found)}: add --data-cache-path {default_cache_dir()} if the "
                "run used the default corpus" if found else "")
        log("WARNING: no tokenizer in the export (and no bos/eos ids in its config): pass --tokenizer-model "
            f"FILE, or the run's --data-cache-path for the default corpus's{hint}")
        return None
    if not os.path.isfile(tokenizer_model):
        raise ConvertError(f"--tokenizer-model {tokenizer_model}: no such file")
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()
    if cfg.vocab_size is not None and size != cfg.vocab_size:
        raise ConvertError(f"tokenizer {tokenizer_model} has {size} tokens but the model was trained with "
                           f"--vocab-size {cfg.vocab_size}; give the tokenizer it was trained with")
    return tokenizer_model


def to_hf(load: str, output: str, iteration: Optional[int] = None, dtype: str = "float32",
          tokenizer_model: Optional[str] = None, data_cache_path: Optional[str] = None, force: bool = False,
          log: Log = print) -> str:
    """Export checkpoint (`load`, `iteration`) of the `gpt` family as a LlamaForCausalLM folder.

    Writes config.json, model.safetensors, generation_config.json and, when known, the tokenizer's
    tokenizer.model, into `output.partial/`, renamed to `output` at the end (replacing it under force).
    Returns the checkpoint it read.
    """
    if dtype not in HF_DTYPES:
        raise ConvertError(f"--dtype {dtype}: choose one of {', '.join(HF_DTYPES)}")
    path = resolve_checkpoint(load, iteration)
    _check_output(output, force, "--output")
    train_state = ckpt.read_train_state(path)
    cfg = model_config(train_state)
    problems = hf_export_problems(cfg)
    if problems:
        raise ConvertError(f"checkpoint {path} cannot be exported to Hugging Face LLaMA: " + "; ".join(problems))
    tokenizer_model = _resolve_tokenizer(cfg, tokenizer_model, data_cache_path, train_state, log)
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConvertError("to-hf writes SafeTensors and needs the safetensors package: pip install safetensors "
                           "(or pip install -e '.[dev]')") from None

    log(f"reading the weights of {path}")
    weights = hf_state_dict(read_state(path, keys=["model"])["model"], cfg, HF_DTYPES[dtype])
    special_ids = _special_ids(tokenizer_model)

    partial = output.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    log(f"writing {output} ({sum(t.numel() for t in weights.values()):,} parameters, {dtype})")
    save_file(weights, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(hf_llama_config(cfg, dtype, special_ids), f, indent=2)
    with open(os.path.join(partial, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, **special_ids}, f, indent=2)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, os.path.join(partial, "tokenizer.model"))
        log(f"included tokenizer {tokenizer_model}")
    if os.path.exists(output):
        shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    os.replace(partial, output)
    return path
