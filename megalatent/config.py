"""Run configuration: dataclasses, YAML files and Megatron-named command-line flags.

One flat namespace of keys, spelled like Megatron-LM's flags (`num_layers` <-> `--num-layers`), grouped
into sections only for readability. A YAML file gives any of the keys (dashes or underscores); flags
given on the command line override the file; `validate` checks every rule before a process group or a
tensor exists and reports every broken rule at once, each naming the flag and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration the trainer refuses to start with; the message lists every broken rule."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def _opt(default, help: str, choices=None, nargs=None):
    return field(default=default, metadata={"help": help, "choices": choices, "nargs": nargs})


@dataclass
class ModelConfig:
    model_family: str = _opt("gpt", "model family from the registry (megalatent.models)")
    num_layers: int = _opt(2, "number of transformer layers")
    hidden_size: int = _opt(128, "model width")
    ffn_hidden_size: Optional[int] = _opt(
        None, "MLP width; default 4*hidden, or 2/3 of that rounded up to a multiple of 64 with --swiglu")
    num_attention_heads: int = _opt(4, "number of query heads")
    group_query_attention: bool = _opt(False, "use grouped-query attention with --num-query-groups K/V heads")
    num_query_groups: Optional[int] = _opt(None, "number of K/V heads under --group-query-attention")
    seq_length: int = _opt(256, "training sequence length in tokens")
    max_position_embeddings: Optional[int] = _opt(None, "longest sequence the model supports; default --seq-length")
    vocab_size: Optional[int] = _opt(None, "vocabulary size; default: the tokenizer's")
    make_vocab_size_divisible_by: int = _opt(128, "pad the embedding table to a multiple of this")
    normalization: str = _opt("RMSNorm", "normalization layer", choices=["RMSNorm", "LayerNorm"])
    norm_epsilon: float = _opt(1e-5, "epsilon of the normalization layers")
    swiglu: bool = _opt(True, "SwiGLU MLP (LLaMA); --no-swiglu gives a GELU MLP")
    position_embedding_type: str = _opt("rope", "position embedding", choices=["rope", "none"])
    rotary_base: float = _opt(10000.0, "RoPE base (theta)")
    untie_embeddings_and_output_weights: bool = _opt(False, "separate input embedding and output head weights")
    init_method_std: float = _opt(0.02, "standard deviation of the normal weight initialisation")
    linear_impl: Optional[str] = _opt(
        None, "linear layers of the attention and MLP blocks: nn.Linear, or BitNet b1.58's BitLinear (ternary "
        "weights, 8-bit activations, its own input RMSNorm, so the blocks' pre-norms are dropped); default: "
        "bitlinear for --model-family bitnet, linear for the others", choices=["linear", "bitlinear"])
    segment_lengths: Optional[list[int]] = _opt(
        None, "LongNet: segment length w_i of each dilated-attention pattern, increasing", nargs="+")
    dilated_ratios: Optional[list[int]] = _opt(
        None, "LongNet: dilation r_i of each pattern (same count as --segment-lengths), non-decreasing", nargs="+")
    img_h: int = _opt(224, "LongViT: image height in pixels the position embeddings are learned for")
    img_w: int = _opt(224, "LongViT: image width in pixels the position embeddings are learned for")
    patch_dim: int = _opt(16, "LongViT: patch size in pixels")
    num_channels: int = _opt(3, "LongViT: image channels")
    num_classes: int = _opt(1000, "LongViT: classes of the classification head; LatentLM: classes of its class-conditional images")
    latent_dim: int = _opt(8, "LatentLM: width of a continuous (latent) token; must equal the σ-VAE tokenizer's")
    diffusion_head_layers: int = _opt(3, "LatentLM: adaLN blocks of the diffusion head")
    diffusion_batch_mul: int = _opt(4, "LatentLM: noise draws per latent per step (only the head reruns)")
    diffusion_loss_weight: float = _opt(1.0, "LatentLM: weight of the diffusion loss against the cross-entropy")
    num_experts: Optional[int] = _opt(None, "MoE: experts per MoE layer (unset: dense MLPs)")
    moe_layer_freq: int = _opt(1, "MoE: layers 0, k, 2k, ... are MoE layers (as Megatron); 1 = every layer")
    moe_ffn_hidden_size: Optional[int] = _opt(None, "MoE: width of each expert's SwiGLU; default the dense MLP's "
                                                    "width (as Megatron)")
    moe_router_topk: int = _opt(2, "MoE: experts per (sub-)token")
    moe_num_heads: int = _opt(1, "MH-MoE: sub-tokens per token (head/merge projections when > 1)")
    moe_router_type: str = _opt("linear", "MoE router: linear softmax, or X-MoE's low-dimensional cosine router",
                                choices=["linear", "xmoe"])
    moe_router_pre_softmax: bool = _opt(False, "MoE: combine weights are the full softmax's probabilities of the "
                                               "selected experts (default: softmax over the top-k logits)")
    moe_aux_loss_coeff: float = _opt(0.0, "MoE: weight of the load-balancing loss (statistics over the global batch)")
    moe_z_loss_coeff: Optional[float] = _opt(None, "MoE: weight of the router z-loss")
    moe_expert_capacity_factor: Optional[float] = _opt(None, "MoE: cap each expert at factor x assignments / experts "
                                                             "(dropless when unset)")
    moe_token_drop_policy: str = _opt("probs", "MoE with a capacity: drop an expert's lowest-weight assignments "
                                               "(probs) or its latest tokens (position)", choices=["probs", "position"])
    moe_router_enable_expert_bias: bool = _opt(False, "MoE: auxiliary-loss-free balancing with a per-expert "
                                                      "selection bias updated after every step")
    moe_router_bias_update_rate: float = _opt(1e-3, "MoE: step size of the expert-bias update")
    yoco_self_attention: str = _opt("gret", "YOCO: the self-decoder's efficient attention: gated retention or "
                                    "sliding-window attention", choices=["gret", "swa"])
    sliding_window_size: Optional[int] = _opt(
        None, "YOCO with --yoco-self-attention swa: the window C (a query sees itself and the C-1 tokens before)")
    retention_chunk_size: int = _opt(256, "YOCO gated retention: chunk length of the chunkwise form")

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
    data_path: Optional[list[str]] = _opt(
        None, "dataset prefixes, optionally weighted: 'p' or 'w1 p1 w2 p2 ...'; default: the embedded "
        "Python-stdlib corpus", nargs="+")
    split: str = _opt("969,30,1", "train,valid,test proportions of each dataset")
    tokenizer_model: Optional[str] = _opt(None, "sentencepiece model; required with --data-path")
    data_cache_path: Optional[str] = _opt(
        None, "where index caches and the default corpus live; default ~/.cache/megalatent")
    default_corpus_vocab_size: int = _opt(8192, "vocabulary of the tokenizer trained on the default corpus")
    latent_tokenizer: Optional[str] = _opt(None, "LatentLM: σ-VAE tokenizer directory (tools/train_vae.py --save)")
    class_dropout: float = _opt(0.1, "LatentLM: fraction of images whose class is replaced by the null class "
                                     "(classifier-free guidance)")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _opt(4, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = _opt(16, "sequences per optimizer step over all data-parallel ranks")
    train_iters: int = _opt(100, "optimizer steps to train for")
    seed: int = _opt(1234, "random seed for weights, data order and (LatentLM) diffusion noise")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr: float = _opt(3e-5, "learning rate at the end of the decay")
    lr_decay_style: str = _opt("cosine", "learning-rate schedule after warmup",
                               choices=["constant", "linear", "cosine", "WSD", "inverse-square-root", "two-stage"])
    lr_warmup_iters: int = _opt(0, "linear warmup steps")
    lr_warmup_fraction: Optional[float] = _opt(None, "warmup as a fraction of --lr-decay-iters (overrides iters)")
    lr_decay_iters: Optional[int] = _opt(None, "steps over which the lr decays; default --train-iters")
    lr_wsd_decay_iters: Optional[int] = _opt(None, "WSD: length of the final decay phase; default 10%% of decay")
    lr_wsd_decay_style: str = _opt("linear", "WSD: shape of the final decay", choices=["linear", "cosine", "exponential"])
    lr_two_stage_boundary_iter: Optional[int] = _opt(
        None, "two-stage (BitNet b1.58): the first step of the second stage; default: halfway from the end of "
        "the warmup to --lr-decay-iters")
    lr_second_stage: Optional[float] = _opt(
        None, "two-stage: the lr at the start of the second stage, from which it decays linearly to --min-lr "
        "at --lr-decay-iters (the first stage decays linearly from --lr on the line to --min-lr)")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to norms and biases)")
    weight_decay_second_stage: Optional[float] = _opt(
        None, "two-stage: the weight decay from the second stage on; default 0 (BitNet b1.58: decay on the "
        "latent weights keeps flipping ternary values late in training)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    clip_grad: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    bf16: Optional[bool] = _opt(None, "bf16 autocast; default on with a GPU, off on CPU (fp32)")
    exit_duration_in_mins: Optional[float] = _opt(None, "save and exit after this many minutes")
    exit_signal_handler: bool = _opt(True, "on SIGUSR1/SIGTERM save a checkpoint and exit at the next step")
    eval_interval: int = _opt(1000, "run validation every this many steps (0 disables)")
    eval_iters: int = _opt(10, "global batches per validation")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _opt(1, "tensor-parallel ranks (adjacent ranks, keep inside a node)")
    sequence_parallel: bool = _opt(False, "shard norms/residual activations along the sequence over the "
                                          "tensor-parallel ranks")
    pipeline_model_parallel_size: int = _opt(1, "pipeline stages (across nodes is fine)")
    context_parallel_size: int = _opt(1, "ranks that split each sequence (load-balanced, K/V all-gathered)")
    expert_model_parallel_size: int = _opt(1, "ranks that split each MoE layer's experts (carved out of the data- "
                                              "and context-parallel ranks; tokens move by all-to-all)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _opt(
        None, "layers per virtual stage: each rank holds several non-adjacent stages (interleaved 1F1B)")
    pipeline_schedule: Optional[str] = _opt(
        None, "pipeline schedule; default 1F1B, or Interleaved1F1B with virtual stages",
        choices=["1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"])
    decoder_first_pipeline_num_layers: Optional[int] = _opt(
        None, "layers on the first pipeline stage (it also holds the embedding); default: an even split")
    decoder_last_pipeline_num_layers: Optional[int] = _opt(
        None, "layers on the last pipeline stage (it also holds the head); default: an even split")
    data_parallel_sharding_strategy: str = _opt(
        "optim_grads_params", "what FSDP2 shards over the data-parallel ranks: optimizer state (ZeRO-1), "
        "+gradients (ZeRO-2), +parameters (ZeRO-3)", choices=["optim", "optim_grads", "optim_grads_params"])
    recompute_granularity: Optional[str] = _opt(
        None, "activation recomputation: full (whole layers) or selective (the attention core)",
        choices=["full", "selective"])


@dataclass
class CheckpointConfig:
    save: Optional[str] = _opt(None, "directory to save checkpoints to")
    load: Optional[str] = _opt(None, "directory to resume from (the newest complete checkpoint)")
    save_interval: Optional[int] = _opt(None, "save every this many steps; default: only at the end")
    no_load_optim: bool = _opt(False, "load weights only; start the optimizer and schedule fresh")
    no_load_rng: bool = _opt(False, "do not restore random-number-generator states")


@dataclass
class LoggingConfig:
    log_interval: int = _opt(10, "print a log line every this many steps")
    tensorboard_dir: Optional[str] = _opt(None, "write tensorboard events here")
    wandb_project: Optional[str] = _opt(None, "also log to this wandb project (when wandb is installed)")
    peak_tflops: Optional[float] = _opt(None, "per-device peak TFLOP/s for MFU; default: known GPUs' dense bf16 peak")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig,
            "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_flat_dict(self) -> dict[str, Any]:
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}


def _key_index() -> dict[str, tuple[str, dataclasses.Field, type]]:
    """Flat key -> (section, field, type); keys are unique across sections by construction."""
    index = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config key {f.name} defined twice"
            index[f.name] = (section, f, hints[f.name])
    return index


KEYS = _key_index()


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


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError([f"--config: file {path} does not exist"])
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"--config: {path} must hold a mapping of keys to values"])
    values, errors = {}, []
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
            errors.append(f"{path}: unknown key '{k}'{hint}")
            continue
        values[key] = v
    if errors:
        raise ConfigError(errors)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalatent-pretrain",
        description="Pretrain a model of the megalatent family. A YAML --config gives defaults; "
                    "flags (Megatron-LM names) override it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of keys (flag names without '--')")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            tp = KEYS[f.name][2]
            flag = "--" + f.name.replace("_", "-")
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + f" (default: {f.default})")
            if _scalar_type(tp) is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _scalar_type(tp)
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                if f.metadata.get("nargs"):
                    kwargs["nargs"] = f.metadata["nargs"]
            group.add_argument(flag, **kwargs)
    return parser


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    errors = []
    for key, value in values.items():
        section, _, tp = KEYS[key]
        try:
            setattr(getattr(cfg, section), key, _coerce(key, value, tp))
        except ConfigError as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags -> YAML defaults overridden by flags -> a Config (call `validate` before using it)."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values = load_yaml(config_path) if config_path else {}
    values.update(args)
    return config_from_dict(values)


def _parallel_errors(cfg: Config, world_size: int) -> tuple[list[str], int]:
    """The layout rules: every parallel size must divide what it splits. Returns (errors, dp size)."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    e: list[str] = []
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for flag, size in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                       ("context-parallel-size", cp)):
        if size < 1:
            e.append(f"--{flag} must be >= 1, got {size}")
    if e:
        return e, 1
    if world_size % (tp * pp * cp):
        e.append(f"the world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                 f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple of "
                 f"{tp * pp * cp} processes")
        return e, 1
    dp = world_size // (tp * pp * cp)
    if cp > 1 and m.seq_length % (2 * cp):
        e.append(f"--context-parallel-size {cp}: --seq-length {m.seq_length} must be divisible by 2 x {cp} "
                 "(each rank holds two chunks, one early and one late, to balance causal attention)")

    for key, value in (("num_attention_heads", m.num_attention_heads), ("make_vocab_size_divisible_by",
                       m.make_vocab_size_divisible_by), ("ffn_hidden_size", m.mlp_width)):
        if value >= 1 and value % tp:
            e.append(f"--{key.replace('_', '-')} {value} must be divisible by --tensor-model-parallel-size {tp}")
    if m.group_query_attention and m.num_query_groups and m.num_query_groups % tp:
        e.append(f"--num-query-groups {m.num_query_groups} must be divisible by --tensor-model-parallel-size "
                 f"{tp} (each tensor-parallel rank holds whole K/V heads)")
    ep = p.expert_model_parallel_size
    if ep < 1:
        e.append(f"--expert-model-parallel-size must be >= 1, got {ep}")
    elif ep > 1 and (dp * cp) % ep:
        e.append(f"--expert-model-parallel-size {ep} must divide data-parallel size {dp} x --context-parallel-size "
                 f"{cp} = {dp * cp} (expert parallelism is carved out of those ranks)")
    elif ep > 1 and (m.num_experts is None or m.num_experts % ep):
        e.append(f"--expert-model-parallel-size {ep} needs --num-experts divisible by it (each rank holds "
                 f"--num-experts / {ep} experts), got --num-experts {m.num_experts}")
    if m.num_experts is not None and tp > 1 and (m.seq_length // cp) % tp:
        e.append(f"--num-experts with --tensor-model-parallel-size {tp}: each TP rank routes 1/{tp} of the tokens, so "
                 f"the tokens per context-parallel rank (--seq-length {m.seq_length} / {cp}) must be divisible by {tp}")
    if p.sequence_parallel and tp == 1:
        e.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards over the TP ranks)")
    elif p.sequence_parallel and (m.seq_length // cp) % tp:
        e.append(f"--sequence-parallel: the tokens per context-parallel rank (--seq-length {m.seq_length} / "
                 f"{cp}) must be divisible by --tensor-model-parallel-size {tp}")

    pipeline_flags = {"num_layers_per_virtual_pipeline_stage": p.num_layers_per_virtual_pipeline_stage,
                      "pipeline_schedule": p.pipeline_schedule,
                      "decoder_first_pipeline_num_layers": p.decoder_first_pipeline_num_layers,
                      "decoder_last_pipeline_num_layers": p.decoder_last_pipeline_num_layers}
    if pp == 1:
        for key, value in pipeline_flags.items():
            if value is not None:
                e.append(f"--{key.replace('_', '-')} needs --pipeline-model-parallel-size > 1")
        return e, dp
    if not m.untie_embeddings_and_output_weights:
        e.append("pipeline parallelism puts the embedding and the output head on different stages: add "
                 "--untie-embeddings-and-output-weights (tied weights across stages are not supported yet)")
    from megalatent.distributed.pipeline import PipelinePlanError, plan_pipeline  # late: imports torch
    try:
        plan = plan_pipeline(cfg, pp)
    except PipelinePlanError as err:
        return e + [str(err)], dp
    if t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0:
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if n_micro < pp or (plan.stages_per_rank > 1 and n_micro % pp):
            e.append(f"{plan.schedule} over {pp} pipeline stages needs a number of micro-batches per step "
                     f"(--global-batch-size / (--micro-batch-size x data-parallel size) = {n_micro}) that is "
                     f">= {pp}" + (f" and a multiple of {pp}" if plan.stages_per_rank > 1 else ""))
    return e, dp


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
                 "(BitNet b1.58 700M: --lr 1.5e-3 --lr-second-stage 1e-3)")
    elif not t.min_lr <= t.lr_second_stage <= t.lr:
        e.append(f"--lr-second-stage {t.lr_second_stage} must be between --min-lr {t.min_lr} and --lr {t.lr}")
    boundary = t.lr_two_stage_boundary_iter
    if boundary is not None and not warmup <= boundary < decay:
        e.append(f"--lr-two-stage-boundary-iter {boundary} must be at or after the warmup ({warmup} steps) and "
                 f"before the end of the decay (--lr-decay-iters {decay})")
    if t.weight_decay_second_stage is not None and t.weight_decay_second_stage < 0:
        e.append(f"--weight-decay-second-stage must be >= 0, got {t.weight_decay_second_stage}")
    return e


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every rule a run must satisfy before anything is allocated; raises ConfigError listing all."""
    m, d, t, p, c, log = cfg.model, cfg.data, cfg.training, cfg.parallel, cfg.checkpoint, cfg.logging
    e: list[str] = []

    parallel_errors, dp = _parallel_errors(cfg, world_size)
    e += parallel_errors

    from megalatent.models import registry  # late import: the registry imports model code

    family = registry.MODEL_FAMILIES.get(m.model_family)
    if family is None:
        e.append(f"--model-family {m.model_family!r} is unknown; choose one of {sorted(registry.MODEL_FAMILIES)}")
    else:
        e += family.validate(cfg)
        if cfg.parallel.pipeline_model_parallel_size > 1 and family.objective.pipeline_loss is None:
            e.append(f"--model-family {m.model_family} does not support pipeline parallelism yet")
    text_data = family is None or family.build_data is None  # families with data of their own check it
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
    if m.linear_impl == "bitlinear" and m.model_family != "bitnet":  # (bitnet's own rules include this one)
        from megalatent.models.bitnet import packable_width_errors
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
        e.append("--data-path needs --tokenizer-model (the sentencepiece model the data was tokenized with)")
    if d.tokenizer_model is not None and not os.path.isfile(d.tokenizer_model):
        e.append(f"--tokenizer-model: file {d.tokenizer_model} does not exist")
    parts = d.split.replace("/", ",").split(",")
    try:
        weights = [float(p) for p in parts]
        if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0 or weights[0] <= 0:
            raise ValueError
    except ValueError:
        e.append(f"--split {d.split!r} must be up to three non-negative numbers 'train,valid,test' with train > 0")
    if text_data and d.data_path is not None:
        from megalatent.data.gpt_data import parse_data_path
        try:
            parse_data_path(d.data_path)
        except ValueError as err:
            e.append(str(err))
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
    if t.eval_interval < 0 or t.eval_iters < 1:
        e.append(f"--eval-interval must be >= 0 and --eval-iters >= 1, got {t.eval_interval}, {t.eval_iters}")

    if c.save_interval is not None and c.save_interval < 1:
        e.append(f"--save-interval must be >= 1, got {c.save_interval}")
    if log.log_interval < 1:
        e.append(f"--log-interval must be >= 1, got {log.log_interval}")
    if log.peak_tflops is not None and log.peak_tflops <= 0:
        e.append(f"--peak-tflops must be > 0, got {log.peak_tflops}")
    if e:
        raise ConfigError(e)
