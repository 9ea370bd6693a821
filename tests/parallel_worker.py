"""Worker for the parallel-equivalence tests: trains the same tiny model on the same data at several
layouts and writes, per layout, the losses, grad norms, gathered gradients and final weights.

    torchrun --nproc-per-node N tests/parallel_worker.py OUT.pt LAYOUT_JSON [LAYOUT_JSON ...]
    python tests/parallel_worker.py OUT.pt '{}'          (the single-process reference)

A layout is a dict of megalatent flags (e.g. {"tensor-model-parallel-size": 2, "sequence-parallel": true}),
optionally with "steps": the optimizer steps to run (default STEPS). With "save" (the --save flag) the run
writes a checkpoint after its steps; with "load" the model starts from that checkpoint's weights; with
"record-collectives": true the result holds the last step's collectives (kind, ranks, bytes, issued by FSDP), as
the planner's recorder sees them.
"""
import contextlib
import json
import sys

import torch
import torch.distributed as dist

from megalatent.data.gpt_data import MicroBatchLoader
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.env import discover, exit_process, init_process_group
from megalatent.distributed.layout import ParallelLayout
from megalatent.families import FAMILIES, parse_args, validate
from megalatent.planning.collectives import CollectiveRecorder
from megalatent.pretrain import build_model_parts, make_trainer
from megalatent.training.moe_stats import MoEStepStats

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
         "--num-query-groups", "2", "--seq-length", "16", "--vocab-size", "200", "--make-vocab-size-divisible-by", "8",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "0",
         "--lr-decay-style", "constant", "--clip-grad", "0.5", "--adam-eps", "1e-6"]
STEPS = 3


def samples(n, seed):
    """n deterministic samples with uneven loss masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 200, (17,), generator=g)
        out.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": (torch.rand(16, generator=g) > 0.25).float(),
                    "position_ids": torch.arange(16)})
    return out


def latent_samples(cfg, n):
    """LatentLM sequences (class, <boi>, latents, <eoi>) over random latents and classes."""
    from megalatent.data.latent_data import ClassConditionalLatents
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, cfg.model.seq_length - 3, cfg.model.latent_dim, generator=g)
    return ClassConditionalLatents(latents, torch.randint(0, 10, (n,), generator=g), 10, 0.25, seed=0)


def flags(layout: dict) -> list[str]:
    argv = []
    for k, v in layout.items():
        if v is True:
            argv += [f"--{k}"]
        elif isinstance(v, list):
            argv += [f"--{k}"] + [str(x) for x in v]
        else:
            argv += [f"--{k}", str(v)]
    return argv


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def run_layout(layout_flags: dict, env, device) -> dict:
    layout_flags = dict(layout_flags)
    steps = layout_flags.pop("steps", STEPS)
    record = layout_flags.pop("record-collectives", False)  # the last step's collectives, as the planner sees them
    cfg = parse_args(MODEL + flags(layout_flags))
    validate(cfg, world_size=env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    layout.build_mesh(device)
    torch.manual_seed(0)
    parts, pipeline = build_model_parts(cfg, layout, device)
    t = cfg.training
    objective = FAMILIES[cfg.model.model_family].objective
    if cfg.model.model_family == "latentlm":  # with the diffusion draws keyed by sample
        from megalatent.data.latent_data import latent_loader
        loader = latent_loader(latent_samples(cfg, steps * t.global_batch_size), cfg, layout, objective.batch_keys)
    else:
        loader = MicroBatchLoader(samples(steps * t.global_batch_size, seed=1), t.micro_batch_size,
                                  t.global_batch_size, layout.dp_rank, layout.dp, keys=objective.batch_keys)
    trainer = make_trainer(cfg, layout, device, parts, loader, None, pipeline)
    if cfg.checkpoint.load is not None:  # e.g. an imported checkpoint: its weights at this layout
        trainer.resume(ckpt.find_loadable(cfg.checkpoint.load))
    result = {"loss": [], "grad_norm": [], "moe": []}
    for step in range(steps):
        recorder = CollectiveRecorder() if record and step == steps - 1 else contextlib.nullcontext()
        with recorder:
            loss, norm = trainer.train_step(loader.next_global_batch())
        if record and step == steps - 1:
            result["collectives"] = [(t.kind, t.ranks, t.bytes, t.fsdp) for t in recorder.transfers]
        trainer.iteration += 1
        result["loss"].append(loss)
        result["grad_norm"].append(norm)
        result["moe"].append(next((h.stats for h in trainer.hooks if isinstance(h, MoEStepStats)), None))
    trainer.save()  # (when the layout gives --save)
    # The last step's gradients (after clipping) and the weights after it, gathered to full tensors
    # and, over the pipeline ranks, to rank 0.
    named = [(clean(n), p) for part in parts for n, p in part.named_parameters()]
    # The classes of the tensors this rank holds (e.g. torchao's weights that FSDP2 all-gathers in FP8).
    result["local_tensor_types"] = sorted({type(p.to_local() if hasattr(p, "to_local") else p.data).__name__
                                           for _, p in named})
    # The classes of its modules (e.g. which layers are FP8: torchao's Float8Linear, fp8.Float8GroupedMM).
    result["module_types"] = sorted({type(m).__name__ for part in parts for m in part.modules()})
    # The FP8 scales precomputed for FSDP2's FP8 all-gathers (--fp8-param-gather), by weight.
    result["precomputed_scales"] = {n: p._local_tensor._precomputed_scale.clone() for n, p in named
                                    if getattr(getattr(p, "_local_tensor", None), "_precomputed_scale", None)
                                    is not None}
    local = {"grads": {n: full(p.grad).detach().clone() for n, p in named},
             "weights": {n: full(p).detach().clone() for n, p in named}}
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    for key in ("grads", "weights"):
        result[key] = {n: t for g in gathered for n, t in g[key].items()}
    return result


def main(run=run_layout):
    """Runs `run(layout, env, device)` for each layout of the command line; rank 0 saves the results."""
    out_path, layouts = sys.argv[1], [json.loads(a) for a in sys.argv[2:]]
    env = discover()
    device = init_process_group(env)
    results = [run(layout, env, device) for layout in layouts]
    if env.rank == 0:
        torch.save(results, out_path)
    exit_process()


if __name__ == "__main__":
    main()
