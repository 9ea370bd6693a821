"""Entry point: flags -> config -> (validate) -> process group + mesh -> data -> model -> parallelize -> train.

    megalatent-pretrain --config examples/tiny/gpt.yaml --train-iters 50
    python -m megalatent.pretrain ...              (same thing)
    torchrun --nproc-per-node 2 -m megalatent.pretrain ...   /   srun python -m megalatent.pretrain ...

Everything that can be wrong with a run (flags, layout, data files, the checkpoint to resume) is
checked before a process group, a tensor or a dataset index is made.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from megalatent.config import Config, ConfigError, architectural_differences
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.env import DistEnv, discover, exit_process, init_process_group
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.parallelize import parallelize
from megalatent.distributed.pipeline import Pipeline, plan_pipeline
from megalatent.families import build_model, get_family, model_config_from_saved, parse_args, validate
from megalatent.training.metrics import log
from megalatent.training.moe_stats import moe_step_hooks
from megalatent.training.trainer import StopRequest, Trainer, uses_bf16


def resolve_data(cfg: Config):
    """(tokenizer, dataset prefixes, weights); builds the default stdlib corpus on first use."""
    from megalatent.data.gpt_data import default_cache_dir, parse_data_path
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    from megalatent.data.tokenizer import Tokenizer

    d = cfg.data
    if d.data_path is None:
        model_path, prefix = prepare_default_corpus(d.data_cache_path or default_cache_dir(),
                                                    d.default_corpus_vocab_size)
        prefixes, weights = [prefix], None
    else:
        model_path = d.tokenizer_model
        prefixes, weights = parse_data_path(d.data_path)
    return Tokenizer.load(model_path), prefixes, weights


def check_resumable(cfg: Config) -> Optional[str]:
    """The checkpoint to resume from, after checking it was written by this model."""
    if cfg.checkpoint.load is None:
        return None
    path = ckpt.find_loadable(cfg.checkpoint.load)
    if path is None:
        return None
    train_state = ckpt.read_train_state(path)
    saved, problems = model_config_from_saved(train_state["model_config"], fallback=train_state)
    diffs = problems + ([f"model_family: checkpoint {saved.model_family!r}, this run {cfg.model.model_family!r}"]
                        if saved.model_family != cfg.model.model_family else architectural_differences(saved, cfg.model))
    if diffs:
        raise ConfigError([f"--load {cfg.checkpoint.load}: checkpoint {path} was written by a different model "
                           f"({'; '.join(diffs)}); use that model's flags or another --load directory"])
    return path


def setup(argv: Optional[list[str]] = None) -> tuple[Config, DistEnv, ParallelLayout, object, list, Optional[list]]:
    """Everything that can fail cheaply, in order: flags, layout, data, checkpoint."""
    env = discover()
    cfg = parse_args(argv)
    validate(cfg, world_size=env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    family = get_family(cfg.model.model_family)
    if family.data is not None:  # a family with data of its own (images), no text tokenizer
        if cfg.model.vocab_size is None and family.data.vocab_size is not None:
            cfg.model.vocab_size = family.data.vocab_size(cfg)
        return cfg, env, layout, None, None, None
    tokenizer, prefixes, weights = resolve_data(cfg)
    cfg.data.tokenizer_model = tokenizer.model_path  # recorded in checkpoints (HF export finds it there)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError([f"--vocab-size {cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size}; drop --vocab-size to use the tokenizer's"])
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
    """The model, split into this rank's pipeline stages when pp > 1, each parallelized.
    Returns (parts, pipeline or None). Every rank builds the same full model from the same seed first,
    so any layout starts from the weights a single process would have."""
    family = get_family(cfg.model.model_family)
    model = build_model(cfg.model).to(device)
    if layout.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"parameters: {n_params:,}; training FLOPs per token: {family.flops_per_token(cfg.model):.4e}")
    pipeline, parts = None, [model]
    if layout.pp > 1:
        plan = plan_pipeline(cfg, layout.pp)
        pipeline = Pipeline(plan, family.parallel.pipeline, layout.pp_rank, layout.group("pp"), device)
        parts = pipeline.split(model)
        if layout.tp_rank == 0 and layout.dp_rank == 0:
            print(f"[layout] pp rank {layout.pp_rank}: {plan.schedule}, stages {pipeline.stage_ids} with layers "
                  f"{[plan.stage_layers[s] for s in pipeline.stage_ids]}", flush=True)
    param_dtype = torch.bfloat16 if uses_bf16(cfg, device) else None
    return [parallelize(part, layout, cfg.parallel, family.parallel, cfg.model.seq_length, param_dtype,
                        fp8=cfg.fp8, compile_backend=cfg.training.compile_backend if cfg.training.compile else None)
            for part in parts], pipeline


def make_trainer(cfg: Config, layout: ParallelLayout, device: torch.device, parts, train_loader, valid_loader,
                 pipeline: Optional[Pipeline] = None, stop: Optional[StopRequest] = None) -> Trainer:
    """The trainer of this rank's parts, with what the model's family and features bring to it: the
    objective, the context-parallel split, the FLOPs, and the step hooks (mixture-of-experts bookkeeping)."""
    family = get_family(cfg.model.model_family)
    return Trainer(cfg, layout, device, parts, train_loader, valid_loader, family.flops_per_token(cfg.model), stop,
                   pipeline, objective=family.objective, cp_split=family.parallel.context_parallel_split,
                   hooks=tuple(moe_step_hooks(parts, layout, cfg.model)))


def run(argv: Optional[list[str]] = None) -> None:
    stop = StopRequest().install()
    cfg, env, layout, tokenizer, prefixes, weights = setup(argv)
    if not cfg.training.exit_signal_handler:
        stop.uninstall()
    resume_path = check_resumable(cfg)

    device = init_process_group(env)
    layout.build_mesh(device)
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
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
