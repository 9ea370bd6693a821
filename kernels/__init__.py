"""Triton kernels, each beside its plain-PyTorch reference; imported as `megalatent.kernels`.

    dilated_attention  one dilated-attention pattern (w, r): forward with LSE, flash-attention-2 backward
    lse_merge          the LSE merge of partial attentions, forward and backward
    retention          chunkwise gated retention, forward (backward through the reference)
    bitnet             fused RMSNorm + int8 activation quantisation, and the W2A8 ternary matmul
    backend            --attention-backend: which of a kernel and its reference runs

Importing this package does not import Triton (it is optional on CPU); `available()` says whether the
kernels can run, and the kernel modules are imported where they are used.
"""
import importlib.util


def available() -> bool:
    """Whether Triton is installed (the kernels then run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
