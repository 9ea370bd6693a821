"""Run configuration: dataclasses, YAML files and Megatron-named command-line flags.

One flat namespace of keys, spelled like Megatron-LM's flags (`num_layers` <-> `--num-layers`), grouped
into sections: the architecture every model family shares (`ModelConfig`, which a family extends with a
section of its own flags: a subclass), data, training, parallel, checkpoint and logging. A YAML file
gives any of the keys (dashes or underscores); flags given on the command line override the file.

This module knows no family: `parse_args` is handed the families' config classes, and the rules here
(`config_errors`) are the ones every run shares. `megalatent.families` puts the two together
(`families.parse_args`, `families.validate`); the layout's rules live with the layout
(distributed/layout.py). Every rule is checked before a process group or a tensor exists, and every
broken rule is reported at once, each naming the flag and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration the trainer refuses to start with; the message lists every broken rule."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(errors[0] if len(errors) == 1 else
                         "invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def flag(default, help: str, choices=None, nargs=None, architectural: bool = True, group: Optional[str] = None):
    """A config field and its command-line flag. `architectural=False`: the value does not change the
    parameters' shapes, so a checkpoint may be resumed with another one. `group`: the --help section, when it
    is not the dataclass's own (e.g. the MoE flags of ModelConfig)."""
    return field(default=default, metadata={"help": help, "choices": choices, "nargs": nargs,
                                            "architectural": architectural, "group": group})


@dataclass
class ModelConfig:
    """The architecture every model family shares. A family with flags of its own subclasses this (its
    section of the configuration: `--help` lists it under the family's name) and is registered in
    megalatent/families/."""
    model_family: str = flag("gpt", "model family (megalatent/families/)")
    num_layers: int = flag(2, "number of transformer layers")
    hidden_size: int = flag(128, "model width")
    ffn_hidden_size: Optional[int] = flag(
        None, "MLP width; default 4*hidden, or 2/3 of that rounded up to a multiple of 64 with --swiglu")
    num_attention_heads: int = flag(4, "number of query heads")
    group_query_attention: bool = flag(False, "use grouped-query attention with --num-query-groups K/V heads")
    num_query_groups: Optional[int] = flag(None, "number of K/V heads under --group-query-attention")
    seq_length: int = flag(256, "training sequence length in tokens", architectural=False)
    max_position_embeddings: Optional[int] = flag(None, "longest sequence the model supports; default --seq-length",
                                                  architectural=False)
    vocab_size: Optional[int] = flag(None, "vocabulary size; default: the tokenizer's")
    make_vocab_size_divisible_by: int = flag(128, "pad the embedding table to a multiple of this")
    normalization: str = flag("RMSNorm", "normalization layer", choices=["RMSNorm", "LayerNorm"])
    norm_epsilon: float = flag(1e-5, "epsilon of the normalization layers")
    swiglu: bool = flag(True, "SwiGLU MLP (LLaMA); --no-swiglu gives a GELU MLP")
    position_embedding_type: str = flag("rope", "position embedding", choices=["rope", "none"])
    rotary_base: float = flag(10000.0, "RoPE base (theta)")
    untie_embeddings_and_output_weights: bool = flag(False, "separate input embedding and output head weights")
    init_method_std: float = flag(0.02, "standard deviation of the normal weight initialisation", architectural=False)
    linear_impl: Optional[str] = flag(
        None, "linear layers of the attention and MLP blocks: nn.Linear, or the b1.58 BitLinear (ternary "
        "weights, 8-bit activations, its own input RMSNorm, so the blocks' pre-norms are dropped); default: "
        "the family's (linear for most)", choices=["linear", "bitlinear"])
    attention_backend: str = flag(
        "auto", "implementation of the attention cores that have a Triton kernel (dilated attention, gated "
        "retention): auto (the kernels on a GPU, PyTorch on CPU), triton (the kernels, or an error saying why "
        "not), torch (the plain-PyTorch references)", choices=["auto", "triton", "torch"], architectural=False)
    num_experts: Optional[int] = flag(None, "experts per MoE layer (unset: dense MLPs)", group="moe")
    moe_layer_freq: int = flag(1, "layers 0, k, 2k, ... are MoE layers (as Megatron); 1 = every layer", group="moe")
    moe_ffn_hidden_size: Optional[int] = flag(None, "width of each expert's SwiGLU; default the dense MLP's width "
                                                    "(as Megatron)", group="moe")
    moe_router_topk: int = flag(2, "experts per (sub-)token", group="moe")
    moe_num_heads: int = flag(1, "multi-head MoE: sub-tokens per token (head/merge projections when > 1)",
                              group="moe")
    moe_router_type: str = flag("linear", "router: linear softmax, or X-MoE's low-dimensional cosine router",
                                choices=["linear", "xmoe"], group="moe")
    moe_router_pre_softmax: bool = flag(False, "combine weights are the full softmax's probabilities of the "
                                               "selected experts (default: softmax over the top-k logits)", group="moe")
    moe_aux_loss_coeff: float = flag(0.0, "weight of the load-balancing loss (statistics over the global batch)",
                                     group="moe")
    moe_z_loss_coeff: Optional[float] = flag(None, "weight of the router z-loss", group="moe")
    moe_expert_capacity_factor: Optional[float] = flag(None, "cap each expert at factor x assignments / experts "
                                                             "(dropless when unset)", group="moe")
    moe_token_drop_policy: str = flag("probs", "with a capacity: drop an expert's lowest-weight assignments "
                                               "(probs) or its latest tokens (position)", choices=["probs", "position"],
                                      group="moe")
    moe_router_enable_expert_bias: bool = flag(False, "auxiliary-loss-free balancing with a per-expert "
                                                      "selection bias updated after every step", group="moe")
    moe_router_bias_update_rate: float = flag(1e-3, "step size of the expert-bias update", group="moe")

    @classmethod
    def section_fields(cls) -> list[dataclasses.Field]:
        """The family's own flags: the fields a subclass adds to ModelConfig."""
        shared = {f.name for f in dataclasses.fields(ModelConfig)}
        return [f for f in dataclasses.fields(cls) if f.name not in shared]

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts is not None and layer % self.moe_layer_freq == 0

    @property
    def expert_width(self) -> int:
        """Each expert's SwiGLU width. A token's h sub-tokens through k experts of width f cost
        6*k*d*f FLOPs whatever h is, so f = dense width / k matches a dense MLP's compute."""
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.mlp_width

    @property
    def mlp_width(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:  # keep the parameter count of a 4h GELU MLP, rounded for GEMM efficiency
            return int(math.ceil(4 * self.hidden_size * 2 / 3 / 64) * 64)
        return 4 * self.hidden_size


@dataclass
class DataConfig:
    data_path: Optional[list[str]] = flag(
        None, "dataset prefixes, optionally weighted: 'p' or 'w1 p1 w2 p2 ...'; default: the embedded "
        "Python-stdlib corpus", nargs="+")
    split: str = flag("969,30,1", "train,valid,test proportions of each dataset")
    tokenizer_model: Optional[str] = flag(None, "the tokenizer: a sentencepiece .model, or a Hugging Face tokenizer "
                                                "directory or tokenizer.json; required with --data-path")
    tokenizer_type: Optional[str] = flag(None, "default: HuggingFaceTokenizer for a directory or .json, else "
                                               "SentencePieceTokenizer", choices=["SentencePieceTokenizer",
                                                                                  "HuggingFaceTokenizer"])
    data_cache_path: Optional[str] = flag(
        None, "where index caches and the default corpus live; default ~/.cache/megalatent")
    default_corpus_vocab_size: int = flag(8192, "vocabulary of the tokenizer trained on the default corpus")


@dataclass
class TrainingConfig:
    micro_batch_size: int = flag(4, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = flag(16, "sequences per optimizer step over all data-parallel ranks")
    train_iters: int = flag(100, "optimizer steps to train for")
    seed: int = flag(1234, "random seed for weights, data order and any noise the data carries")
    lr: float = flag(3e-4, "peak learning rate")
    min_lr: float = flag(3e-5, "learning rate at the end of the decay")
    lr_decay_style: str = flag("cosine", "learning-rate schedule after warmup",
                               choices=["constant", "linear", "cosine", "WSD", "inverse-square-root", "two-stage"])
    lr_warmup_iters: int = flag(0, "linear warmup steps")
    lr_warmup_fraction: Optional[float] = flag(None, "warmup as a fraction of --lr-decay-iters (overrides iters)")
    lr_decay_iters: Optional[int] = flag(None, "steps over which the lr decays; default --train-iters")
    lr_wsd_decay_iters: Optional[int] = flag(None, "WSD: length of the final decay phase; default 10%% of decay")
    lr_wsd_decay_style: str = flag("linear", "WSD: shape of the final decay", choices=["linear", "cosine", "exponential"])
    lr_two_stage_boundary_iter: Optional[int] = flag(
        None, "two-stage (the b1.58 ternary recipe): the first step of the second stage; default: halfway from the end of "
        "the warmup to --lr-decay-iters")
    lr_second_stage: Optional[float] = flag(
        None, "two-stage: the lr at the start of the second stage, from which it decays linearly to --min-lr "
        "at --lr-decay-iters (the first stage decays linearly from --lr on the line to --min-lr)")
    weight_decay: float = flag(0.1, "AdamW weight decay (not applied to norms and biases)")
    weight_decay_second_stage: Optional[float] = flag(
        None, "two-stage: the weight decay from the second stage on; default 0 (ternary weights: decay on the "
        "latent weights keeps flipping ternary values late in training)")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.95, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    clip_grad: float = flag(1.0, "clip the global gradient norm to this (0 disables)")
    bf16: Optional[bool] = flag(None, "bf16 autocast; default on with a GPU, off on CPU (fp32)")
    exit_duration_in_mins: Optional[float] = flag(None, "save and exit after this many minutes")
    exit_signal_handler: bool = flag(True, "on SIGUSR1/SIGTERM save a checkpoint and exit at the next step")
    check_for_nan_in_loss_and_grad: bool = flag(
        False, "stop the run at the first step with a NaN/inf loss or gradient norm (default: skip such steps, "
        "see --max-consecutive-skipped-iterations)")
    max_consecutive_skipped_iterations: int = flag(
        10, "stop the run, naming the last good iteration, after this many non-finite (skipped) steps in a row")
    eval_interval: int = flag(1000, "run validation every this many steps (0 disables)")
    eval_iters: int = flag(10, "global batches per validation")
    compile: bool = flag(False, "torch.compile each transformer block (regional compilation, as torchtitan; "
                                "megalatent/distributed/compile.py)")
    compile_backend: str = flag("inductor", "--compile's backend: inductor (generated kernels), or aot_eager (the same "
                                            "captured graphs run by eager kernels: tells a capture problem from a "
                                            "code-generation one, and compiles in seconds)",
                                choices=["inductor", "aot_eager"])


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks (adjacent ranks, keep inside a node)")
    sequence_parallel: bool = flag(False, "shard norms/residual activations along the sequence over the "
                                          "tensor-parallel ranks")
    pipeline_model_parallel_size: int = flag(1, "pipeline stages (across nodes is fine)")
    context_parallel_size: int = flag(1, "ranks that split each sequence (load-balanced, K/V all-gathered)")
    expert_model_parallel_size: int = flag(1, "ranks that split each MoE layer's experts (carved out of the data- "
                                              "and context-parallel ranks; tokens move by all-to-all)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        None, "layers per virtual stage: each rank holds several non-adjacent stages (interleaved 1F1B)")
    pipeline_schedule: Optional[str] = flag(
        None, "pipeline schedule; default 1F1B, or Interleaved1F1B with virtual stages",
        choices=["1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"])
    decoder_first_pipeline_num_layers: Optional[int] = flag(
        None, "layers on the first pipeline stage (it also holds the embedding); default: an even split")
    decoder_last_pipeline_num_layers: Optional[int] = flag(
        None, "layers on the last pipeline stage (it also holds the head); default: an even split")
    data_parallel_sharding_strategy: str = flag(
        "optim_grads_params", "what FSDP2 shards over the data-parallel ranks: optimizer state (ZeRO-1), "
        "+gradients (ZeRO-2), +parameters (ZeRO-3)", choices=["optim", "optim_grads", "optim_grads_params"])
    recompute_granularity: Optional[str] = flag(
        None, "activation recomputation: full (whole layers) or selective (the attention core)",
        choices=["full", "selective"])


@dataclass
class FP8Config:
    """FP8 matmuls in the transformer blocks' linear layers (torchao's float8 training; Megatron's flag names;
    megalatent/distributed/fp8.py says what is converted and why)."""
    fp8_format: Optional[str] = flag(None, "FP8 for the blocks' linear layers: e4m3 (every operand e4m3) or hybrid "
                                           "(e4m3 forward, e5m2 gradients); unset: no FP8", choices=["e4m3", "hybrid"])
    fp8_recipe: str = flag("tensorwise", "FP8 scaling, from the tensor's own amax at every cast: one scale per "
                                         "tensor, or one per row (powers of two)", choices=["tensorwise", "rowwise"])
    fp8_param_gather: bool = flag(False, "FSDP2 all-gathers the FP8 weights instead of bf16 ones (tensorwise)")
    fp8_emulate: bool = flag(False, "compute each FP8 matmul as dequantised operands in fp32: FP8 numerics without "
                                    "FP8 tensor cores (GPUs before Ada/Hopper)")
    first_last_layers_bf16: bool = flag(False, "keep the first --num-layers-at-start-in-bf16 and last "
                                               "--num-layers-at-end-in-bf16 transformer layers out of FP8")
    num_layers_at_start_in_bf16: int = flag(1, "with --first-last-layers-bf16: first layers kept out of FP8")
    num_layers_at_end_in_bf16: int = flag(1, "with --first-last-layers-bf16: last layers kept out of FP8")


@dataclass
class CheckpointConfig:
    save: Optional[str] = flag(None, "directory to save checkpoints to")
    load: Optional[str] = flag(None, "directory to resume from (the newest complete checkpoint)")
    save_interval: Optional[int] = flag(None, "save every this many steps; default: only at the end")
    no_load_optim: bool = flag(False, "load weights only; start the optimizer and schedule fresh (a checkpoint "
                                      "that holds weights only, e.g. from tools/convert_checkpoint.py from-hf, "
                                      "always loads so)")
    use_checkpoint_args: bool = flag(False, "take the model's architecture (and the tokenizer, unless "
                                            "--tokenizer-model is given) from the --load checkpoint")
    no_load_rng: bool = flag(False, "do not restore random-number-generator states")
    exit_on_missing_checkpoint: bool = flag(False, "stop with an error when --load holds no checkpoint (default: "
                                                   "say so and start from scratch)")


@dataclass
class LoggingConfig:
    log_interval: int = flag(10, "print a log line every this many steps")
    tensorboard_dir: Optional[str] = flag(None, "write tensorboard events here")
    wandb_project: Optional[str] = flag(None, "also log to this wandb project (when wandb is installed)")
    peak_tflops: Optional[float] = flag(None, "per-device peak TFLOP/s for MFU; default: known GPUs' dense bf16 peak")


GENERIC_SECTIONS = {"data": DataConfig, "training": TrainingConfig, "parallel": ParallelConfig, "fp8": FP8Config,
                    "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the family's subclass of it
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Problems found while reading the flags that `config_errors` reports with every other rule (a flag of
    # another family, an unknown family).
    flag_errors: list[str] = field(default_factory=list, repr=False)

    def to_flat_dict(self) -> dict[str, Any]:
        return {k: v for section in ("model", *GENERIC_SECTIONS) for k, v in dataclasses.asdict(getattr(self, section)).items()}


@dataclass(frozen=True)
class Key:
    section: str  # "model" or one of GENERIC_SECTIONS
    field: dataclasses.Field
    type: Any
    group: str  # where --help lists it: the section, "moe", or the family's name
    owners: tuple[str, ...] = ()  # the families whose section has it (empty for shared keys)


def key_index(families: Mapping[str, type[ModelConfig]]) -> dict[str, Key]:
    """Flat key -> where it lives, for the shared sections and every family's section. A key two families
    both have (two families built on the same attention, say) is one flag; it must mean the same in both."""
    index: dict[str, Key] = {}
    hints = get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        index[f.name] = Key("model", f, hints[f.name], f.metadata["group"] or "model")
    for name, cls in families.items():
        hints = get_type_hints(cls)
        for f in cls.section_fields():
            known = index.get(f.name)
            if known is None:
                index[f.name] = Key("model", f, hints[f.name], name, (name,))
            elif known.owners and known.field.default == f.default:
                index[f.name] = dataclasses.replace(known, owners=known.owners + (name,))
            else:
                raise ValueError(f"--model-family {name}: its flag {f.name} clashes with a flag of "
                                 f"{known.owners or 'every family'}")
    for section, cls in GENERIC_SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config key {f.name} defined twice"
            index[f.name] = Key(section, f, hints[f.name], section)
    return index


def _scalar_type(tp) -> type:
    """`Optional[int]` -> int, `list[str]` -> str."""
    if get_origin(tp) in (list,):
        return get_args(tp)[0]
    args = [a for a in get_args(tp) if a is not type(None)]
    if args:
        return _scalar_type(args[0])
    return tp


def _coerce(key: str, value: Any, tp) -> Any:
    if value is None:
        return None
    base = _scalar_type(tp)
    if get_origin(tp) is list or list in [get_origin(a) for a in get_args(tp)]:
        if isinstance(value, (str, int)):
            value = str(value).split()
        try:
            return [base(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError([f"'{key}' must be a list of {base.__name__}, got {value!r}"]) from None
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError([f"'{key}' must be true or false, got {value!r}"])
    try:
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError([f"'{key}' must be {base.__name__}, got {value!r}"]) from None


def _read_yaml(path: str) -> Any:
    """The YAML document in `path`; a file that is not UTF-8 YAML is a one-line ConfigError with the place."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError([f"--config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                           "save it as UTF-8"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"--config {path}: invalid YAML{where}: {what}"]) from None
    except OSError as e:
        raise ConfigError([f"--config {path}: cannot read it ({e.strerror})"]) from None


def load_yaml(path: str, keys: Mapping[str, Key]) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError([f"--config: file {path} does not exist"])
    raw = _read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"--config: {path} must hold a mapping of keys to values"])
    values, errors = {}, []
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
            errors.append(f"{path}: unknown key '{k}'{hint}")
            continue
        values[key] = v
    if errors:
        raise ConfigError(errors)
    return values


class _Parser(argparse.ArgumentParser):
    """argparse, with short errors: the problem, the closest flag to a mistyped one, and where --help is
    (not the whole usage, which lists every flag)."""

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            typos = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
            if not typos:
                self.error(f"unexpected argument {unknown[0]!r} (flags start with --)")
            close = difflib.get_close_matches(typos[0], flags, n=1)
            self.error(f"unrecognized argument {typos[0]}" + (f": did you mean {close[0]}?" if close else "")
                       + (f" (and {len(typos) - 1} more unrecognized)" if len(typos) > 1 else ""))
        return namespace

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag)\n")


def build_parser(families: Mapping[str, type[ModelConfig]]) -> argparse.ArgumentParser:
    """Every flag of every section, grouped in --help: the shared model flags, MoE, each family's own,
    then data, training, parallel, checkpoint, logging."""
    parser = _Parser(
        prog="megalatent-pretrain",
        description="Pretrain a model of the megalatent families. A YAML --config gives defaults; "
                    "flags (Megatron-LM names) override it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of keys (flag names without '--')")
    keys = key_index(families)
    groups = {}
    for group in ("model", "moe", *families, *GENERIC_SECTIONS):
        title = f"--model-family {group}" if group in families else group
        groups[group] = parser.add_argument_group(title)
    for name, key in keys.items():
        f, tp = key.field, key.type
        help = f.metadata["help"]
        if len(key.owners) > 1:
            help += f" (--model-family {', '.join(key.owners)})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help + f" (default: {f.default})")
        if _scalar_type(tp) is bool:
            # --no-load-optim is a switch; a --no- form of it would be a double negative
            kwargs["action"] = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _scalar_type(tp)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata.get("nargs"):
                kwargs["nargs"] = f.metadata["nargs"]
        groups[key.group].add_argument("--" + name.replace("_", "-"), **kwargs)
    return parser


def config_from_dict(values: dict[str, Any], families: Mapping[str, type[ModelConfig]]) -> Config:
    """A Config from flat keys: the model section is the chosen family's class. Keys of another family's
    section are not applied; they are reported (`Config.flag_errors`) with the other rules."""
    keys = key_index(families)
    family = values.get("model_family", ModelConfig.model_family)
    cfg = Config()
    if family in families:
        cfg.model = families[family]()
    else:
        cfg.flag_errors.append(f"--model-family {family!r} is unknown; choose one of {sorted(families)}")
    own = {f.name for f in dataclasses.fields(cfg.model)}
    errors = []
    for key, value in values.items():
        k = keys[key]
        try:
            value = _coerce(key, value, k.type)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        if k.section == "model" and key not in own:
            if family in families:
                owners = ", ".join(k.owners)
                cfg.flag_errors.append(f"--{key.replace('_', '-')} configures --model-family {owners}, not "
                                       f"{family}: drop it, or choose --model-family {k.owners[0]}")
            continue
        setattr(getattr(cfg, k.section), key, value)
    if errors:
        raise ConfigError(errors)
    return cfg


def parse_args(argv: Optional[list[str]], families: Mapping[str, type[ModelConfig]]) -> Config:
    """Flags -> YAML defaults overridden by flags -> a Config (validate it before using it).
    `families`: every family's config class by name (megalatent.families passes the registry's)."""
    args = vars(build_parser(families).parse_args(argv))
    config_path = args.pop("config")
    values = load_yaml(config_path, key_index(families)) if config_path else {}
    values.update(args)
    return config_from_dict(values, families)


def model_config_from_saved(saved: Mapping[str, Any], families: Mapping[str, type[ModelConfig]],
                            fallback: Mapping[str, Any] = {}) -> tuple[ModelConfig, list[str]]:
    """The model config a checkpoint recorded (a flat dict), as its family's class. Returns (config, problems).

    Checkpoints written before the families had sections of their own recorded every family's fields;
    another family's field is ignored when it holds that field's default, and is a problem otherwise. A
    field the record lacks takes `fallback`'s value (where an older version kept it, e.g. at the top of its
    train state), else its default (a flag added since).
    """
    family = saved.get("model_family")
    if family not in families:
        return ModelConfig(), [f"model family {family!r} is unknown here (known: {sorted(families)})"]
    cls = families[family]
    fields = {f.name for f in dataclasses.fields(cls)}
    defaults = {(f.name, repr(f.default)) for c in families.values() for f in dataclasses.fields(c)}
    values, problems = {}, []
    for name, value in saved.items():
        if name in fields:
            values[name] = value
        elif (name, repr(value)) not in defaults:
            problems.append(f"{name}={value!r} is not a field of --model-family {family}")
    for name in fields - set(values):
        if name in fallback:
            values[name] = fallback[name]
    return cls(**values), problems


def architectural_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """The fields that change the parameters (see `flag`) on which a checkpoint's model and this run's differ."""
    return [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, this run {getattr(current, f.name)!r}"
            for f in dataclasses.fields(current) if f.metadata.get("architectural", True)
            and getattr(saved, f.name, None) != getattr(current, f.name)]


def _moe_errors(m: ModelConfig) -> list[str]:
    if m.num_experts is None:
        set_flags = [k for k in ("moe_ffn_hidden_size", "moe_z_loss_coeff", "moe_expert_capacity_factor")
                     if getattr(m, k) is not None] + [k for k in ("moe_num_heads",) if getattr(m, k) != 1]
        return [f"--{k.replace('_', '-')} configures MoE layers: add --num-experts" for k in set_flags]
    e = []
    if m.num_experts < 1:
        e.append(f"--num-experts must be >= 1, got {m.num_experts}")
    if not 1 <= m.moe_router_topk <= max(m.num_experts, 1):
        e.append(f"--moe-router-topk {m.moe_router_topk} must be between 1 and --num-experts {m.num_experts}")
    elif m.moe_router_topk == 1 and not m.moe_router_pre_softmax:
        e.append("--moe-router-topk 1: the softmax over one selected logit is always 1, so the router would get no "
                 "gradient from the loss; add --moe-router-pre-softmax")
    if m.moe_layer_freq < 1:
        e.append(f"--moe-layer-freq must be >= 1, got {m.moe_layer_freq}")
    if m.moe_num_heads < 1 or m.hidden_size % m.moe_num_heads:
        e.append(f"--moe-num-heads {m.moe_num_heads} must divide --hidden-size {m.hidden_size} "
                 "(each sub-token has hidden-size / heads features)")
    if m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size < 1:
        e.append(f"--moe-ffn-hidden-size must be >= 1, got {m.moe_ffn_hidden_size}")
    if m.moe_expert_capacity_factor is not None and m.moe_expert_capacity_factor <= 0:
        e.append(f"--moe-expert-capacity-factor must be > 0, got {m.moe_expert_capacity_factor}")
    if m.moe_aux_loss_coeff < 0 or (m.moe_z_loss_coeff or 0) < 0:
        e.append("--moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")
    return e


def _two_stage_errors(t: TrainingConfig, warmup: int, decay: int) -> list[str]:
    """The two-stage schedule's flags: given only with it, the lr and the boundary inside their ranges."""
    flags = {"lr_two_stage_boundary_iter": t.lr_two_stage_boundary_iter, "lr_second_stage": t.lr_second_stage,
             "weight_decay_second_stage": t.weight_decay_second_stage}
    if t.lr_decay_style != "two-stage":
        return [f"--{k.replace('_', '-')} needs --lr-decay-style two-stage" for k, v in flags.items() if v is not None]
    e = []
    if t.lr_second_stage is None:
        e.append("--lr-decay-style two-stage needs --lr-second-stage, the lr the second stage starts from "
                 "(the b1.58 700M recipe: --lr 1.5e-3 --lr-second-stage 1e-3)")
    elif not t.min_lr <= t.lr_second_stage <= t.lr:
        e.append(f"--lr-second-stage {t.lr_second_stage} must be between --min-lr {t.min_lr} and --lr {t.lr}")
    boundary = t.lr_two_stage_boundary_iter
    if boundary is not None and not warmup <= boundary < decay:
        e.append(f"--lr-two-stage-boundary-iter {boundary} must be at or after the warmup ({warmup} steps) and "
                 f"before the end of the decay (--lr-decay-iters {decay})")
    if t.weight_decay_second_stage is not None and t.weight_decay_second_stage < 0:
        e.append(f"--weight-decay-second-stage must be >= 0, got {t.weight_decay_second_stage}")
    return e


def config_errors(cfg: Config, dp: int, text_data: bool = True) -> list[str]:
    """The rules every run shares (not the layout's, not a family's own), one message per broken rule.
    `dp`: the data-parallel size; `text_data`: whether the run reads Megatron language-modelling data (a
    family with data of its own checks that itself)."""
    m, d, t, c, log = cfg.model, cfg.data, cfg.training, cfg.checkpoint, cfg.logging
    e: list[str] = list(cfg.flag_errors)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by"):
        if getattr(m, key) < 1:
            e.append(f"--{key.replace('_', '-')} must be >= 1, got {getattr(m, key)}")
    if m.num_attention_heads >= 1 and m.hidden_size % m.num_attention_heads:
        e.append(f"--hidden-size {m.hidden_size} must be divisible by --num-attention-heads {m.num_attention_heads}")
    elif m.num_attention_heads >= 1 and m.position_embedding_type == "rope" and m.head_dim % 2:
        e.append(f"rotary embeddings need an even head size; --hidden-size/--num-attention-heads = {m.head_dim}")
    if m.group_query_attention:
        if m.num_query_groups is None or m.num_query_groups < 1:
            e.append("--group-query-attention needs --num-query-groups >= 1")
        elif m.num_attention_heads % m.num_query_groups:
            e.append(f"--num-attention-heads {m.num_attention_heads} must be divisible by "
                     f"--num-query-groups {m.num_query_groups}")
    elif m.num_query_groups is not None:
        e.append("--num-query-groups is set but --group-query-attention is not; add --group-query-attention")
    if m.linear_impl == "bitlinear":
        e += packable_width_errors(m)
    if m.ffn_hidden_size is not None and m.ffn_hidden_size < 1:
        e.append(f"--ffn-hidden-size must be >= 1, got {m.ffn_hidden_size}")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        e.append(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if m.vocab_size is not None and m.vocab_size < 2:
        e.append(f"--vocab-size must be >= 2, got {m.vocab_size}")
    if m.norm_epsilon <= 0:
        e.append(f"--norm-epsilon must be > 0, got {m.norm_epsilon}")
    e += _moe_errors(m)

    if text_data and d.data_path is not None and d.tokenizer_model is None:
        e.append("--data-path needs --tokenizer-model (the tokenizer the data was tokenized with)")
    if d.tokenizer_model is not None and not os.path.exists(d.tokenizer_model):
        e.append(f"--tokenizer-model: {d.tokenizer_model} does not exist")
    parts = d.split.replace("/", ",").split(",")
    try:
        weights = [float(p) for p in parts]
        if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0 or weights[0] <= 0:
            raise ValueError
    except ValueError:
        e.append(f"--split {d.split!r} must be up to three non-negative numbers 'train,valid,test' with train > 0")
    if d.default_corpus_vocab_size < 512:
        e.append(f"--default-corpus-vocab-size must be >= 512 (byte fallback alone takes 256 ids), "
                 f"got {d.default_corpus_vocab_size}")

    for key in ("micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(t, key) < 1:
            e.append(f"--{key.replace('_', '-')} must be >= 1, got {getattr(t, key)}")
    if t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp):
        e.append(f"--global-batch-size {t.global_batch_size} must be a multiple of --micro-batch-size "
                 f"{t.micro_batch_size} x data-parallel size {dp}")
    if t.lr <= 0:
        e.append(f"--lr must be > 0, got {t.lr}")
    if t.min_lr < 0 or t.min_lr > t.lr:
        e.append(f"--min-lr {t.min_lr} must be between 0 and --lr {t.lr}")
    if t.lr_warmup_iters < 0:
        e.append(f"--lr-warmup-iters must be >= 0, got {t.lr_warmup_iters}")
    if t.lr_warmup_fraction is not None and not 0 <= t.lr_warmup_fraction <= 1:
        e.append(f"--lr-warmup-fraction must be in [0, 1], got {t.lr_warmup_fraction}")
    if t.lr_warmup_fraction is not None and t.lr_warmup_iters:
        e.append("give either --lr-warmup-iters or --lr-warmup-fraction, not both")
    decay = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
    if t.lr_decay_iters is not None and t.lr_decay_iters < 1:
        e.append(f"--lr-decay-iters must be >= 1, got {t.lr_decay_iters}")
    warmup = round(t.lr_warmup_fraction * decay) if t.lr_warmup_fraction is not None else t.lr_warmup_iters
    if warmup > decay >= 1:
        e.append(f"warmup ({warmup} steps) is longer than the decay (--lr-decay-iters {decay})")
    if t.lr_wsd_decay_iters is not None and not 0 < t.lr_wsd_decay_iters <= decay - warmup:
        e.append(f"--lr-wsd-decay-iters {t.lr_wsd_decay_iters} must be in (0, {decay - warmup}] "
                 "(the steps after warmup)")
    e += _two_stage_errors(t, warmup, decay)
    if not 0 <= t.adam_beta1 < 1 or not 0 <= t.adam_beta2 < 1:
        e.append(f"--adam-beta1/--adam-beta2 must be in [0, 1), got {t.adam_beta1}, {t.adam_beta2}")
    if t.adam_eps <= 0:
        e.append(f"--adam-eps must be > 0, got {t.adam_eps}")
    if t.weight_decay < 0:
        e.append(f"--weight-decay must be >= 0, got {t.weight_decay}")
    if t.clip_grad < 0:
        e.append(f"--clip-grad must be >= 0 (0 disables clipping), got {t.clip_grad}")
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
        e.append(f"--exit-duration-in-mins must be > 0, got {t.exit_duration_in_mins}")
    if t.max_consecutive_skipped_iterations < 1:
        e.append(f"--max-consecutive-skipped-iterations must be >= 1, got {t.max_consecutive_skipped_iterations}")
    if t.eval_interval < 0 or t.eval_iters < 1:
        e.append(f"--eval-interval must be >= 0 and --eval-iters >= 1, got {t.eval_interval}, {t.eval_iters}")
    if t.compile and cfg.parallel.tensor_model_parallel_size > 1 and cfg.parallel.recompute_granularity:
        e.append("--compile with --tensor-model-parallel-size > 1 and --recompute-granularity: torch 2.13 cannot "
                 "compile a recomputed block that holds tensor-parallel plans (AOTAutograd: 'expected all "
                 "tensors_saved_with_vc_check to be Tensors', a DeviceMesh); drop one of the three")

    if c.save_interval is not None and c.save_interval < 1:
        e.append(f"--save-interval must be >= 1, got {c.save_interval}")
    if log.log_interval < 1:
        e.append(f"--log-interval must be >= 1, got {log.log_interval}")
    if log.peak_tflops is not None and log.peak_tflops <= 0:
        e.append(f"--peak-tflops must be > 0, got {log.peak_tflops}")
    return e


def packable_width_errors(m: ModelConfig) -> list[str]:
    """BitLinear layers are exported 4 ternary codes per byte along their input (the packed export):
    checked before training, not after it."""
    widths = [("hidden-size", m.hidden_size), ("ffn-hidden-size", m.mlp_width)]
    if m.num_experts is not None:  # ternary experts: their (sub-token) input and their own width
        widths += [("hidden-size / --moe-num-heads", m.hidden_size // max(1, m.moe_num_heads)),
                   ("moe-ffn-hidden-size", m.expert_width)]
    return [f"--{flag} {width} must be divisible by 4 for the packed ternary export (4 weights per byte)"
            for flag, width in widths if width % 4]
