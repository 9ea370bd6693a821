"""Worker for tests/test_longvit.py: LongViT with its patches split over the ranks of a gloo job (context
parallelism) against the same model in one process: logits and gradients (averaged over the ranks, as
FSDP averages over dp x cp). Writes rank 0's errors as JSON."""
import json
import sys

import torch
import torch.distributed as dist

from megalatent.distributed.env import exit_process
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.plan import ContextParallel
from megalatent.families import build_model, get_family, parse_args

# 32 x 48 pixels at patch 4: an 8 x 12 grid of 96 patches; patterns up to the whole image.
FLAGS = ["--model-family", "longvit", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--img-h", "32", "--img-w", "48", "--patch-dim", "4", "--num-channels", "3", "--num-classes", "5",
         "--seq-length", "96", "--segment-lengths", "24", "48", "96", "--dilated-ratios", "1", "2", "4",
         "--position-embedding-type", "none", "--normalization", "LayerNorm", "--no-swiglu"]


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    cfg = parse_args(FLAGS).model
    torch.manual_seed(0)
    reference = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 3])
    ref_logits = reference(images)
    torch.nn.functional.cross_entropy(ref_logits, labels).backward()
    plan = get_family("longvit").parallel  # the family's context-parallel plan, as parallelize applies it
    plan.context_parallel(model, ContextParallel(dist.group.WORLD, rank, cp, 96 // cp,
                                                 ParallelLayout(world_size=cp).subgroup))
    logits = model(images)  # each rank embeds and attends over its own 96 / cp patches
    torch.nn.functional.cross_entropy(logits, labels).backward()
    errors = {"logits": (logits - ref_logits).abs().max().item(), "grads": {}}
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errors["grads"][name] = ((grad / cp - ref.grad).abs().max() / ref.grad.abs().max().clamp(min=1e-12)).item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(errors, f)
    exit_process()


if __name__ == "__main__":
    main()
