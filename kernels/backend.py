"""Which implementation runs an operation that has both a Triton kernel and a plain-PyTorch reference.

`--attention-backend` (Megatron's flag name; our values):
    auto    the Triton kernels on CUDA tensors when Triton is installed and the kernel takes the shapes and
            dtypes, else the PyTorch reference (the CPU path)
    triton  the Triton kernels, or an error naming why they cannot run (on CPU they need TRITON_INTERPRET=1
            set before Triton is imported: the tests' way of running them)
    torch   the plain-PyTorch references in megalatent/nn
    gpu     (not a flag value) what `auto` chooses on a GPU, whatever device the tensors are on: the
            planner's simulated GPU runs (megalatent/planning), whose fake tensors live on the CPU

The choice is an argument everywhere (a model's cores hold it), never process state. Importing this
module does not import Triton.
"""
from __future__ import annotations

import torch

from megalatent.kernels import available
from megalatent.nn import dilated as reference
from megalatent.nn.dilated import _expand_kv, attention_pattern, merge_by_lse

BACKENDS = ("auto", "triton", "torch", "gpu")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def dilated_uses_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> bool:
    """Whether dilated attention on these tensors runs the Triton kernels under `backend`."""
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and not (q.is_cuda and available())):
        return False
    from megalatent.kernels.dilated_attention import check_inputs
    problem = check_inputs(q, k, v)
    if problem and backend == "triton":
        raise ValueError(f"--attention-backend triton: the dilated-attention kernel cannot run: {problem}")
    return problem is None


def dilated_pattern_and_merge(triton: bool):
    """One pattern's attention (q, k, v, w, r, causal, first_head) -> (out, lse), and the LSE merge. The kernel
    reads each group's K/V head in place; the reference takes K/V expanded to the query heads."""
    if triton:
        from megalatent.kernels.dilated_attention import dilated_pattern
        from megalatent.kernels.lse_merge import lse_merge
        return dilated_pattern, lse_merge

    def one_pattern(q, k, v, w, r, causal, first_head):
        k, v = _expand_kv(q, k, v)
        return attention_pattern(q, k, v, w, r, causal, first_head)

    return one_pattern, merge_by_lse


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
                      dilated_ratios: list[int], causal: bool = True, first_head: int = 0,
                      backend: str = "auto") -> torch.Tensor:
    """The mixture of (w_i, r_i) patterns on [b, h, n, d] (GQA K/V allowed) by the backend's implementation;
    equal to megalatent.nn.dilated.dilated_attention, which is the reference's."""
    if not dilated_uses_triton(q, k, v, backend):
        return reference.dilated_attention(q, k, v, segment_lengths, dilated_ratios, causal, first_head)
    pattern, merge = dilated_pattern_and_merge(True)
    parts = [pattern(q, k, v, w, r, causal, first_head) for w, r in zip(segment_lengths, dilated_ratios)]
    return merge([o for o, _ in parts], [lse for _, lse in parts])


def retention_uses_triton(q: torch.Tensor, backend: str = "auto") -> bool:
    """Whether chunkwise gated retention runs the Triton kernel. Its backward recomputes the reference, so a
    training step is faster without it: `auto` takes it on CUDA only where no gradient is needed (prefill)."""
    check_backend(backend)
    if backend == "triton":
        if not available():
            raise ValueError("--attention-backend triton: Triton is not installed")
        return True
    on_gpu = backend == "gpu" or (backend == "auto" and q.is_cuda and available())
    return on_gpu and not torch.is_grad_enabled()
