"""Worker for tests/test_meta_init.py: builds the model the trainer's way (meta device, split into stages,
parallelized, materialised) at several layouts, and writes per layout every weight gathered to full
tensors, what this rank allocated during construction (MemTracker's peak), its shards' bytes and the
reference init of one process.

    torchrun --nproc-per-node N tests/init_worker.py OUT.pt LAYOUT_JSON [LAYOUT_JSON ...]
"""
import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from megalatent.distributed.layout import ParallelLayout
from megalatent.families import build_model, parse_args, validate
from megalatent.nn.init import initial_tensors
from megalatent.pretrain import build_model_parts
from parallel_worker import MODEL, flags, main


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def run_layout(layout_flags: dict, env, device) -> dict:
    cfg = parse_args(MODEL + flags(layout_flags))
    validate(cfg, world_size=env.world_size)
    layout = ParallelLayout.from_config(cfg, env.world_size, env.rank)
    layout.build_mesh(device)
    tracker = MemTracker()
    with tracker:
        parts, _ = build_model_parts(cfg, layout, device)
    peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
    tensors = [(name, t) for part in parts for name, t in initial_tensors(part)]
    mine = {"peak": peak, "shards": sum(local_bytes(t) for _, t in tensors)}
    full = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for name, t in tensors}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, (mine, full))
    result = {"ranks": [g[0] for g in gathered], "weights": {n: t for g in gathered for n, t in g[1].items()},
              "copies": [g[1] for g in gathered]}
    reference = build_model(cfg.model, seed=cfg.training.seed)
    result["reference"] = {n: t.detach().clone() for n, t in initial_tensors(reference)}
    # The largest unit one rank may hold whole at a time besides its shards: a layer, the embedding or the head.
    units = list(reference.layers.values()) + [m for m in reference.children() if m is not reference.layers]
    result["largest_unit"] = max(sum(p.numel() * p.element_size() for p in u.parameters()) for u in units)
    return result


if __name__ == "__main__":
    main(run_layout)
