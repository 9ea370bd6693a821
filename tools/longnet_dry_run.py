"""LongNet's claim at full scale, from our code: a rank's memory and the K/V rows it receives per layer stay
flat as the sequence grows from 2^20 to 2^30 tokens over more and more context-parallel ranks.

    python tools/longnet_dry_run.py --config examples/cluster/longnet_1b_tokens.yaml [--json out.json]

For each N = 2^20, 2^22, ..., 2^30 the sequence is split over N / l context-parallel ranks (l: the config's
tokens per rank, seq-length / context-parallel-size), with the paper's three segment lengths (§3.2: 2,048,
the tokens per device, the full length), each keeping 2,048 rows (r = w / 2,048). Rank 0 of that world
(simulated: fake tensors, fake process groups, megalatent/planning) runs one layer's real attention core,
made distributed by the family's plan (DistributedDilatedAttention, distributed/context_parallel/dilated.py),
forward and backward on q, k, v of its l tokens; printed: its peak memory (torch's MemTracker), the rows it
received (the core's own count, and the formula `received_rows`), and the bytes its all-gathers moved.
As on a GPU: bf16, the Triton kernels for the local patterns (kernels/backend.py's `gpu` choice).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys

import torch

from megalatent.distributed.context_parallel.dilated import received_rows
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.plan import ContextParallel
from megalatent.families import get_family, parse_args
from megalatent.planning.collectives import CollectiveRecorder
from megalatent.planning.memory import StepMemoryTracker
from megalatent.planning.world import MetadataFastPath, fake_tensors, simulated_world

DEVICE = torch.device("cpu")
ROWS = 2048  # rows each pattern keeps per segment and head (the paper's w / r)


def patterns(n: int, local: int) -> tuple[list[int], list[int]]:
    """The paper's segment lengths for n tokens, `local` per rank: 2,048, the tokens per rank, the full length
    (those that are distinct), each with r = w / 2,048."""
    lengths = sorted({ROWS, local, n})
    return lengths, [w // ROWS for w in lengths]


def attention_core(cfg, layout: ParallelLayout, local: int):
    """One layer's attention core as the family's context-parallel plan makes it on this rank."""
    family = get_family(cfg.model.model_family)
    one_layer = copy.deepcopy(cfg.model)
    one_layer.num_layers = 1
    with torch.device("meta"):
        model = family.build(one_layer)
    family.parallel.context_parallel(model, ContextParallel(layout.group("cp"), layout.cp_rank, layout.cp, local,
                                                            layout.subgroup))
    return model.layers["0"].attention.core_attention


def run_point(cfg, n: int, local: int, results) -> None:
    """Rank 0 of the world of n / local context-parallel ranks (its own process: see planning/workers.py)."""
    cp = n // local
    cfg = copy.deepcopy(cfg)
    cfg.model.seq_length, cfg.parallel.context_parallel_size = n, cp
    cfg.model.segment_lengths, cfg.model.dilated_ratios = patterns(n, local)
    cfg.model.attention_backend = "gpu"
    m = cfg.model
    with simulated_world(0, cp):
        layout = ParallelLayout(world_size=cp, cp=cp)
        layout.build_mesh(DEVICE)
        core = attention_core(cfg, layout, local)
        with fake_tensors():
            heads, kv_heads = m.num_attention_heads, m.kv_heads
            q = torch.empty(1, heads, local, m.head_dim, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.empty(1, kv_heads, local, m.head_dim, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            tracker, recorder = StepMemoryTracker(), CollectiveRecorder()
            tracker.track_external(q, k, v)
            with tracker, recorder, MetadataFastPath():
                core(q, k, v, None).sum().backward()
            peak = tracker.get_tracker_snapshot("peak")[DEVICE]["Total"]
    gathered = [t.bytes for t in recorder.transfers if t.kind == "all_gather"]
    results.put({"tokens": n, "context_parallel_ranks": cp, "tokens_per_rank": local,
                 "segment_lengths": m.segment_lengths, "dilated_ratios": m.dilated_ratios,
                 "peak_bytes": peak, "received_rows": core.gathered_rows,
                 "received_rows_formula": received_rows(m.segment_lengths, m.dilated_ratios, local, cp),
                 "all_gather_bytes_forward_backward": sum(t.bytes for t in recorder.transfers),
                 "all_gathers": len(gathered)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-log2", type=int, default=20)
    p.add_argument("--max-log2", type=int, default=30)
    p.add_argument("--json")
    ours, rest = p.parse_known_args(argv)
    cfg = parse_args(rest)
    local = cfg.model.seq_length // cfg.parallel.context_parallel_size
    context = multiprocessing.get_context("spawn")
    rows = []
    print(f"{'tokens':>14}{'cp ranks':>10}{'patterns (w/r)':>44}{'peak GiB':>10}{'rows in':>10}{'MiB moved':>11}")
    for log2 in range(ours.min_log2, ours.max_log2 + 1, 2):
        n = 2 ** log2
        if n % local or n < local:
            continue
        results = context.Queue()
        worker = context.Process(target=run_point, args=(cfg, n, local, results))
        worker.start()
        row = results.get()
        worker.join()
        rows.append(row)
        shape = " ".join(f"{w}/{r}" for w, r in zip(row["segment_lengths"], row["dilated_ratios"]))
        print(f"{n:>14,}{row['context_parallel_ranks']:>10}{shape:>44}{row['peak_bytes'] / 2**30:>10.2f}"
              f"{row['received_rows']:>10}{row['all_gather_bytes_forward_backward'] / 2**20:>11.1f}", flush=True)
    if ours.json:
        with open(ours.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
