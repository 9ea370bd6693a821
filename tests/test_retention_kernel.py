"""The Triton chunkwise gated-retention kernel (kernels/retention.py) against its plain-PyTorch reference,
run on CPU in Triton's interpreter: outputs and final state, with and without a carried-in state, a
length that is not a multiple of the block, and the gradients of its autograd wrapper."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # (on CPU, conftest.py selects Triton's interpreter)

from megalatent.kernels.retention import chunk_retention, chunk_retention_forward  # noqa: E402
from megalatent.nn.retention import gated_retention  # noqa: E402


def inputs(n, dk=16, dv=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, dk, generator=g) for _ in range(2))
    v = torch.randn(1, 2, n, dv, generator=g)
    log_gate = F.logsigmoid(torch.randn(1, 2, n, generator=g) + 2) / 4
    return q, k * dk ** -0.5, v, log_gate, torch.randn(1, 2, dk, dv, generator=g)


@pytest.mark.parametrize("n,with_state", [(40, False), (32, True)])
def test_kernel_equals_reference(n, with_state):
    q, k, v, lg, s0 = inputs(n)
    init = s0 if with_state else None
    out, state = chunk_retention_forward(q, k, v, lg, init, block_t=16, block_v=16)
    ref_out, ref_state = gated_retention(q, k, v, lg, "chunkwise", 16, init)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)


def test_autograd_wrapper_gradients():
    q, k, v, lg, s0 = (t.requires_grad_() for t in inputs(24))
    out, state = chunk_retention(q, k, v, lg, s0, block_t=16)
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(out.shape, generator=g), torch.randn(state.shape, generator=g)
    got = torch.autograd.grad((out * weights[0]).sum() + (state * weights[1]).sum(), (q, k, v, lg, s0))
    ref_out, ref_state = gated_retention(q, k, v, lg, "parallel", initial_state=s0)
    want = torch.autograd.grad((ref_out * weights[0]).sum() + (ref_state * weights[1]).sum(), (q, k, v, lg, s0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_retention_layer_prefills_with_the_kernel():
    """YOCO's gated-retention core under --attention-backend triton (as tools/bench_inference.py
    --attention-backend triton) gives the chunkwise layer's output and state, in a prefill and in training."""
    from megalatent.models.yoco import BackendRetentionCore
    from megalatent.nn.cache import RetentionState
    from megalatent.nn.retention import GatedRetention
    from megalatent.nn.rotary import Positions
    torch.manual_seed(0)
    layer = GatedRetention(32, 2, "chunkwise", chunk_size=8)
    x, pos = torch.randn(1, 20, 32), Positions(torch.arange(20)[None], None)
    want_cache, got_cache = RetentionState(), RetentionState()
    want = layer(x, pos, cache=want_cache)
    torch.testing.assert_close(layer(x, pos), want)
    layer.core_attention = BackendRetentionCore(8, "triton")
    torch.testing.assert_close(layer(x, pos), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x, pos, cache=got_cache), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_cache.state, want_cache.state, atol=1e-4, rtol=1e-4)
