"""Entry point: flags -> config -> (validate) -> process group + mesh -> data -> model -> parallelize -> train.

    megalatent-pretrain --config examples/tiny/gpt.yaml --train-iters 50
    python -m megalatent.pretrain ...              (same thing)
    torchrun --nproc-per-node 2 -m megalatent.pretrain ...   /   srun python -m megalatent.pretrain ...

Everything that can be wrong with a run (flags, layout, data files, the checkpoint to resume, the --save
directory) is checked before a process group, a tensor or a dataset index is made. Exit codes: 0 done (or
stopped by a signal or the time limit, with a checkpoint), 2 a bad input (one line naming it), 1 a run that
had to stop (it diverged, or a save failed).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

import torch
from torch import nn

from megalatent.config import Config, ConfigError, architectural_differences
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed import checkpoint_integrity
from megalatent.distributed.env import DistEnv, discover, exit_process, init_process_group
from megalatent.distributed.fp8 import fp8_step_hooks
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.materialize import materialize
from megalatent.distributed.parallelize import parallelize
from megalatent.distributed.save_dir import SaveDirLock, checkpoint_bytes, save_dir_problems
from megalatent.distributed.pipeline import Pipeline, plan_pipeline
from megalatent.families import get_family, model_config_from_saved, parse_args, validate
from megalatent.training.metrics import log
from megalatent.training.moe_stats import moe_step_hooks
from megalatent.training.optim import OPTIMIZER_STATES_PER_PARAMETER
from megalatent.training.trainer import StopRequest, Trainer, TrainingStopped, uses_bf16


def resolve_data(cfg: Config):
    """(tokenizer, dataset prefixes, weights); builds the default stdlib corpus on first use."""
    from megalatent.data.gpt_data import default_cache_dir, parse_data_path
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    from megalatent.data.tokenizer import SENTENCEPIECE, load_tokenizer

    d = cfg.data
    if d.data_path is None:
        model_path, prefix = prepare_default_corpus(d.data_cache_path or default_cache_dir(),
                                                    d.default_corpus_vocab_size)
        return load_tokenizer(model_path, SENTENCEPIECE), [prefix], None
    prefixes, weights = parse_data_path(d.data_path)
    return load_tokenizer(d.tokenizer_model, d.tokenizer_type), prefixes, weights


def use_checkpoint_args(cfg: Config) -> None:
    """--use-checkpoint-args (Megatron-LM's flag): the model's architecture (every field that shapes the
    parameters, the family's included) comes from the --load checkpoint, and so does its tokenizer unless
    --tokenizer-model is given; the run keeps its own values of the other model fields (e.g. --seq-length)."""
    path = ckpt.find_loadable(cfg.checkpoint.load) if cfg.checkpoint.load else None
    if path is None:
        raise ConfigError([f"--use-checkpoint-args needs --load with a complete checkpoint, got {cfg.checkpoint.load}"])
    train_state = ckpt.read_train_state(path)
    saved, problems = model_config_from_saved(train_state["model_config"], fallback=train_state)
    if problems:
        raise ConfigError([f"--use-checkpoint-args: checkpoint {path}: {'; '.join(problems)}"])
    own = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(saved)
           if not f.metadata.get("architectural", True) and hasattr(cfg.model, f.name)}
    cfg.model = dataclasses.replace(saved, **own)
    if cfg.data.tokenizer_model is None and train_state.get("tokenizer_model"):
        cfg.data.tokenizer_model = train_state["tokenizer_model"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_resumable(cfg: Config, warn: Callable[[str], None] = _stderr) -> list[str]:
    """The checkpoints to resume from, newest first, that pass the cheap integrity checks, after checking the
    newest was written by this model; [] to start from scratch. Their checksums are verified once the process
    group exists (`checkpoint_integrity.first_intact`)."""
    c = cfg.checkpoint
    if c.load is None:
        return []
    try:
        paths = checkpoint_integrity.candidates(c.load, warn)
    except ckpt.CheckpointError as e:
        raise ConfigError([f"--load {c.load}: {e}"]) from None
    if not paths:
        what = f"--load {c.load} holds no checkpoint (no {ckpt.LATEST}, no iter_XXXXXXX/)"
        if c.exit_on_missing_checkpoint:
            raise ConfigError([f"{what} and --exit-on-missing-checkpoint is given"])
        warn(f"{what}: starting from scratch")
        return []
    path = paths[0]
    train_state = ckpt.read_train_state(path)
    saved, problems = model_config_from_saved(train_state["model_config"], fallback=train_state)
    diffs = problems + ([f"model_family: checkpoint {saved.model_family!r}, this run {cfg.model.model_family!r}"]
                        if saved.model_family != cfg.model.model_family else architectural_differences(saved, cfg.model))
    if diffs:
        raise ConfigError([f"--load {cfg.checkpoint.load}: checkpoint {path} was written by a different model "
                           f"({'; '.join(diffs)}); use that model's flags or another --load directory"])
    return paths


def prepare_save_dir(cfg: Config, env: DistEnv) -> Optional[SaveDirLock]:
    """Before the process group: --save is writable with room for one checkpoint (each node checks), and
    locked by this run (rank 0 holds the lock; the caller releases it)."""
    save = cfg.checkpoint.save
    if save is None:
        return None
    if env.local_rank == 0:
        with torch.device("meta"):  # the parameters' sizes, without allocating them
            model = get_family(cfg.model.model_family).build(cfg.model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        problems = save_dir_problems(save, checkpoint_bytes(weights, OPTIMIZER_STATES_PER_PARAMETER))
        if problems:
            raise ConfigError(problems)
    if env.rank != 0:
        return None
    lock = SaveDirLock(save)
    problem = lock.acquire()
    if problem is not None:
        raise ConfigError([problem])
    return lock


def setup(argv: Optional[list[str]] = None) -> tuple[Config, DistEnv, ParallelLayout, object, list, Optional[list]]:
    """Everything that can fail cheaply, in order: flags, layout, data, checkpoint."""
    env = discover()
    cfg = parse_args(argv)
    if cfg.checkpoint.use_checkpoint_args:
        use_checkpoint_args(cfg)
    validate(cfg, world_size=env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    family = get_family(cfg.model.model_family)
    if family.data is not None:  # a family with data of its own (images), no text tokenizer
        if cfg.model.vocab_size is None and family.data.vocab_size is not None:
            cfg.model.vocab_size = family.data.vocab_size(cfg)
        return cfg, env, layout, None, None, None
    try:
        tokenizer, prefixes, weights = resolve_data(cfg)
    except ValueError as e:  # an unreadable tokenizer model
        raise ConfigError([str(e)]) from None
    cfg.data.tokenizer_model = tokenizer.model_path  # recorded in checkpoints (HF export finds it there)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError([f"--vocab-size {cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size}; drop --vocab-size to use the tokenizer's"])
    from megalatent.data.gpt_data import indexed_dataset_problem
    problems = [p for p in (indexed_dataset_problem(prefix, cfg.model.vocab_size) for prefix in prefixes) if p]
    if problems:  # token ids the embedding does not have: a corrupt .bin, or another tokenizer's data
        raise ConfigError(problems)
    return cfg, env, layout, tokenizer, prefixes, weights


def build_data(cfg: Config, layout: ParallelLayout, tokenizer, prefixes, weights):
    from megalatent.data.gpt_data import MicroBatchLoader, build_gpt_datasets, index_cache_dir, samples_per_split

    t = cfg.training
    num_samples = samples_per_split(cfg)
    train_ds, valid_ds, _ = build_gpt_datasets(prefixes, weights, cfg.data.split, cfg.model.seq_length, t.seed,
                                               tokenizer, num_samples, index_cache_dir(cfg))

    def loader(ds):
        return MicroBatchLoader(ds, t.micro_batch_size, t.global_batch_size, layout.dp_rank, layout.dp)

    return loader(train_ds), (loader(valid_ds) if valid_ds is not None and num_samples[1] else None)


def build_model_parts(cfg: Config, layout: ParallelLayout, device: torch.device):
    """This rank's model parts (the model, or its pipeline stages), each parallelized, holding only this rank's
    shards. Returns (parts, pipeline or None).

    Built on the meta device (no memory), split into stages (each keeps only its own layers), parallelized
    there (`meta_model_parts`), then materialised: each rank allocates its shards and fills them with the values
    a single process would hold at those positions (distributed/materialize.py), so every layout starts from the
    same weights."""
    parts, pipeline = meta_model_parts(cfg, layout, device)
    return [materialize(part, device, cfg.training.seed) for part in parts], pipeline


def meta_model_parts(cfg: Config, layout: ParallelLayout, device: torch.device):
    """`build_model_parts` before materialising: the parallelized parts still on the meta device, and the
    pipeline (the planner allocates them on fake tensors instead)."""
    family = get_family(cfg.model.model_family)

    def build_on_meta() -> nn.Module:
        with torch.device("meta"):
            return family.build(cfg.model)

    model = build_on_meta()
    if layout.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"parameters: {n_params:,}; training FLOPs per token: {family.flops_per_token(cfg.model):.4e}")
    pipeline, parts = None, [model]
    if layout.pp > 1:
        plan = plan_pipeline(cfg, layout.pp)
        pipeline = Pipeline(plan, family.parallel.pipeline, layout, device, tied=tied_embeddings(cfg))
        parts = pipeline.stages(build_on_meta)
        if layout.tp_rank == 0 and layout.dp_rank == 0:
            print(f"[layout] pp rank {layout.pp_rank}: {plan.schedule}, stages {pipeline.stage_ids} with layers "
                  f"{[plan.stage_layers[s] for s in pipeline.stage_ids]}", flush=True)
    param_dtype = torch.bfloat16 if uses_bf16(cfg, device) else None
    compile_backend = cfg.training.compile_backend if cfg.training.compile else None
    return [parallelize(part, layout, cfg.parallel, family.parallel, cfg.model.seq_length, param_dtype,
                        fp8=cfg.fp8, compile_backend=compile_backend) for part in parts], pipeline


def tied_embeddings(cfg: Config) -> tuple[str, ...]:
    """The modules whose weights the output layer shares (the input embedding, unless untied)."""
    return () if cfg.model.untie_embeddings_and_output_weights else ("embed_tokens",)


def make_trainer(cfg: Config, layout: ParallelLayout, device: torch.device, parts, train_loader, valid_loader,
                 pipeline: Optional[Pipeline] = None, stop: Optional[StopRequest] = None) -> Trainer:
    """The trainer of this rank's parts, with what the model's family and features bring to it: the
    objective, the context-parallel split, the FLOPs, and the step hooks (mixture-of-experts bookkeeping, FP8
    weight scales for FSDP2's FP8 all-gathers)."""
    family = get_family(cfg.model.model_family)
    hooks = (moe_step_hooks(parts, layout, cfg.model) + fp8_step_hooks(parts, cfg.fp8)
             + (pipeline.tied_weight_hooks(parts) if pipeline else []))
    return Trainer(cfg, layout, device, parts, train_loader, valid_loader, family.flops_per_token(cfg.model), stop,
                   pipeline, objective=family.objective, cp_split=family.parallel.context_parallel_split,
                   hooks=tuple(hooks))


def run(argv: Optional[list[str]] = None) -> None:
    stop = StopRequest().install()
    cfg, env, layout, tokenizer, prefixes, weights = setup(argv)
    if not cfg.training.exit_signal_handler:
        stop.uninstall()
    warn = _stderr if env.rank == 0 else (lambda message: None)  # rank 0 speaks for all
    resume_candidates = check_resumable(cfg, warn)
    lock = prepare_save_dir(cfg, env)
    try:
        _run(cfg, env, layout, tokenizer, prefixes, weights, stop, resume_candidates, warn)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: Config, env: DistEnv, layout: ParallelLayout, tokenizer, prefixes, weights, stop: StopRequest,
         resume_candidates: list[str], warn) -> None:
    device = init_process_group(env)
    layout.build_mesh(device)
    # every checksum of the checkpoint to resume, split over the ranks, before anything is built
    resume_path = checkpoint_integrity.first_intact(resume_candidates, warn) if resume_candidates else None
    torch.manual_seed(cfg.training.seed)  # the same on every rank: TP plans slice identical full weights
    if layout.rank == 0:
        log(f"megalatent: {cfg.model.model_family} model, {layout.describe()} ({env.launcher}), device {device}")
        if cfg.checkpoint.save is None:
            log("WARNING: no --save directory: this run writes no checkpoints")
    if layout.world_size > 1:
        print(f"[layout] {layout.coordinates()}", flush=True)

    family = get_family(cfg.model.model_family)
    if family.data is not None:
        train_loader, valid_loader = family.data.build(cfg, layout, family.objective.batch_keys)
    else:
        train_loader, valid_loader = build_data(cfg, layout, tokenizer, prefixes, weights)
    parts, pipeline = build_model_parts(cfg, layout, device)
    trainer = make_trainer(cfg, layout, device, parts, train_loader, valid_loader, pipeline, stop)
    if resume_path is not None:
        trainer.resume(resume_path)
    trainer.train()


def main(argv: Optional[list[str]] = None) -> None:
    code = 0
    try:
        run(argv)
    except (ConfigError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (TrainingStopped, ckpt.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except SystemExit as e:  # argparse: --help, or a malformed flag
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        exit_process(code)


if __name__ == "__main__":
    main()
