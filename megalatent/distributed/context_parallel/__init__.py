"""Context parallelism: each sequence is split over the `cp` ranks, and every attention core that mixes
tokens gets a distributed form of itself. Everything outside attention is per token and needs no
communication; positions stay global (RoPE and causal masks use them).

    split.py            how a sequence is cut ("zigzag" or "contiguous"), and the differentiable all-gather
    dense.py            causal softmax attention over all-gathered K/V (Megatron's `allgather` CP mode)
    dilated.py          dilated attention: only the sparse K/V rows of the segments a rank needs (arXiv 2307.02486 §3.1)
    retention.py        gated retention: the recurrent state scanned over the ranks
    sliding_window.py   sliding-window attention: the window - 1 keys before a rank's first token

Which core a layer gets is the model family's parallel plan's decision (megalatent/families/); the
cores here are plain callables with the single-device cores' signatures.
"""
from megalatent.distributed.context_parallel.dense import ContextParallelAttention
from megalatent.distributed.context_parallel.split import all_gather_sequence, shard_sequence

__all__ = ["ContextParallelAttention", "all_gather_sequence", "shard_sequence"]
