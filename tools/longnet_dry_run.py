"""LongNet's claim at full scale, from our code: a rank's memory and the K/V rows it receives per layer stay
flat as the sequence grows from 2^20 to 2^30 tokens over more and more context-parallel ranks.

    python tools/longnet_dry_run.py --config examples/cluster/longnet_1b_tokens.yaml \\
        --context-parallel-size 16384 [--json out.json]

The config's tokens per rank l = seq-length / context-parallel-size stay fixed; for each N = 2^20, 2^22, ...,
2^30 the sequence is split over N / l ranks. The config's patterns that fit in one rank (w <= l) stay as they
are; the longer ones scale with the sequence and keep their rows per segment (w / r): at N tokens, w' = w N / S
and r' = r N / S (S the config's seq-length), the paper's schedule (§3.2: 2,048, the tokens per device, the
full length). Rank 0 of that world (simulated: fake tensors, fake process groups, megalatent/planning) runs
one layer's real attention core, made distributed by the family's plan (DistributedDilatedAttention,
distributed/context_parallel/dilated.py), forward and backward on bf16 q, k, v of its l tokens, as on a GPU
(the Triton kernels for the local patterns: kernels/backend.py's `gpu` choice). Printed: its peak memory
(torch's MemTracker), the K/V rows it received per head (the core's own count; the formula `received_rows`
must agree) and the bytes its collectives moved.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
from queue import Empty

import torch

from megalatent.cli import run_tool
from megalatent.config import ConfigError
from megalatent.distributed.context_parallel.dilated import received_rows
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.plan import ContextParallel
from megalatent.families import get_family, parse_args, validate
from megalatent.planning.collectives import CollectiveRecorder
from megalatent.planning.memory import StepMemoryTracker
from megalatent.planning.world import MetadataFastPath, fake_tensors, run_logs_silenced, simulated_world

DEVICE = torch.device("cpu")  # fake tensors live on the CPU device (planning/world.py)


def patterns(cfg, n: int, local: int) -> tuple[list[int], list[int]]:
    """The config's patterns at n tokens (see the module doc)."""
    s = cfg.model.seq_length
    lengths, ratios = [], []
    for w, r in zip(cfg.model.segment_lengths, cfg.model.dilated_ratios):
        if w > local:
            w, r = w * n // s, r * n // s
        lengths.append(w)
        ratios.append(r)
    return lengths, ratios


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
    """Rank 0 of the world of n / local context-parallel ranks (a process of its own: planning/workers.py)."""
    cp = n // local
    cfg = copy.deepcopy(cfg)
    cfg.model.segment_lengths, cfg.model.dilated_ratios = patterns(cfg, n, local)
    cfg.model.seq_length, cfg.parallel.context_parallel_size = n, cp
    cfg.model.attention_backend = "gpu"
    m = cfg.model
    with run_logs_silenced(), simulated_world(0, cp):
        layout = ParallelLayout(world_size=cp, cp=cp)
        layout.build_mesh(DEVICE)
        core = attention_core(cfg, layout, local)
        with fake_tensors():
            q = torch.empty(1, m.num_attention_heads, local, m.head_dim, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.empty(1, m.kv_heads, local, m.head_dim, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            tracker, recorder = StepMemoryTracker(), CollectiveRecorder()
            tracker.track_external(q, k, v)
            with tracker, recorder, MetadataFastPath():
                core(q, k, v, None).sum().backward()
            peak = tracker.get_tracker_snapshot("peak")[DEVICE]["Total"]
    results.put({"tokens": n, "context_parallel_ranks": cp, "tokens_per_rank": local,
                 "segment_lengths": m.segment_lengths, "dilated_ratios": m.dilated_ratios,
                 "peak_bytes": peak, "received_rows": core.gathered_rows,
                 "received_rows_formula": received_rows(m.segment_lengths, m.dilated_ratios, local, cp),
                 "collective_bytes": sum(t.bytes for t in recorder.transfers),
                 "collectives": len(recorder.transfers)})


def in_own_process(context, cfg, n: int, local: int):
    """run_point's row, or None when its process died."""
    results = context.Queue()
    worker = context.Process(target=run_point, args=(cfg, n, local, results))
    worker.start()
    while True:
        try:
            row = results.get(timeout=1.0)
            break
        except Empty:
            if not worker.is_alive():
                return None
    worker.join()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-log2", type=int, default=20)
    p.add_argument("--max-log2", type=int, default=30)
    p.add_argument("--json", help="also write the table as JSON to this file")
    ours, rest = p.parse_known_args(argv)
    cfg = parse_args(rest)
    validate(cfg, cfg.parallel.context_parallel_size)
    if cfg.model.model_family != "longnet" or cfg.parallel.context_parallel_size < 2:
        raise ConfigError(["the dry run is LongNet's distributed attention: give a --model-family longnet "
                           "config and its --context-parallel-size (> 1)"])
    local = cfg.model.seq_length // cfg.parallel.context_parallel_size
    context = multiprocessing.get_context("spawn")
    rows = []
    print(f"{'tokens':>15}{'cp ranks':>10}  {'patterns w/r':<40}{'peak GiB':>9}{'rows in':>9}{'MiB moved':>11}")
    for log2 in range(ours.min_log2, ours.max_log2 + 1, 2):
        n = 2 ** log2
        lengths, ratios = patterns(cfg, n, local)
        if n < 2 * local or n % local or min(ratios) < 1:
            print(f"{n:>15,}  skipped: needs at least 2 ranks of {local:,} tokens and every r >= 1")
            continue
        row = in_own_process(context, cfg, n, local)
        if row is None:
            print(f"error: the simulation at {n:,} tokens failed (its traceback is above)", file=sys.stderr)
            return 1
        assert row["received_rows"] == row["received_rows_formula"], row
        rows.append(row)
        shape = " ".join(f"{w}/{r}" for w, r in zip(row["segment_lengths"], row["dilated_ratios"]))
        print(f"{n:>15,}{row['context_parallel_ranks']:>10}  {shape:<40}{row['peak_bytes'] / 2**30:>9.3f}"
              f"{row['received_rows']:>9}{row['collective_bytes'] / 2**20:>11.1f}", flush=True)
    if ours.json:
        with open(ours.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
