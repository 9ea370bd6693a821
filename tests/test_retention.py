"""YOCO's self-decoder mixers against their definitions (reference/models.md §2): gated retention's
parallel, chunkwise and recurrent forms give the same outputs, final states and gradients (from a
zero or a carried-in state, chunk sizes that do and do not divide the length); sliding-window
attention equals dense attention under the band mask t - C < s <= t."""
import pytest
import torch
import torch.nn.functional as F

from megalatent.nn.attention import SlidingWindowCore, sliding_window_attention
from megalatent.nn.retention import GatedRetention, gated_retention
from megalatent.nn.rotary import Positions


def inputs(b=2, h=3, n=23, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    log_gate = F.logsigmoid(torch.randn(b, h, n, generator=g, dtype=torch.float64) + 2) / 4
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, log_gate, state)]


def by_definition(q, k, v, log_gate, state):
    """o_n = sum_{m<=n} (q_n . k_m) prod_{i=m+1..n} gamma_i v_m + prod_{i<=n} gamma_i q_n S_0, by loops."""
    gamma = log_gate.exp()
    n = q.shape[2]
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    for t in range(n):
        acc = torch.prod(gamma[:, :, :t + 1], dim=-1)[..., None] * (q[:, :, t, None, :] @ state)[:, :, 0]
        for m in range(t + 1):
            decay = torch.prod(gamma[:, :, m + 1:t + 1], dim=-1)[..., None]
            acc = acc + decay * (q[:, :, t] * k[:, :, m]).sum(-1, keepdim=True) * v[:, :, m]
        out[:, :, t] = acc
    return out


def test_parallel_form_is_the_definition():
    q, k, v, lg, s0 = inputs(n=9)
    out, _ = gated_retention(q, k, v, lg, "parallel", initial_state=s0)
    torch.testing.assert_close(out, by_definition(q, k, v, lg, s0))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 23, 64])
def test_parallel_chunkwise_recurrent_agree_with_gradients(chunk, with_state):
    q, k, v, lg, s0 = inputs()
    init = s0 if with_state else None
    results = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        out, state = gated_retention(q, k, v, lg, mode, chunk_size=chunk, initial_state=init)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (state * state).sum()
        grads = torch.autograd.grad(loss, (q, k, v, lg) + ((s0,) if with_state else ()))
        results[mode] = (out, state, grads)
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(results[mode][0], results["parallel"][0])
        torch.testing.assert_close(results[mode][1], results["parallel"][1])
        for a, b in zip(results[mode][2], results["parallel"][2]):
            torch.testing.assert_close(a, b)


def test_split_sequence_continues_from_the_carried_state():
    """What decoding and context parallelism rely on: the second half from the first half's state."""
    q, k, v, lg, _ = inputs(n=20)
    full, _ = gated_retention(q, k, v, lg, "chunkwise", chunk_size=4)
    first, state = gated_retention(q[:, :, :7], k[:, :, :7], v[:, :, :7], lg[:, :, :7], "chunkwise", 4)
    second, _ = gated_retention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], lg[:, :, 7:], "recurrent", initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=2), full)


def test_gated_retention_layer_gate_and_norm():
    """gamma = sigmoid(x W_gamma)^(1/16) per head, and the layer's pieces compose as in the paper."""
    torch.manual_seed(0)
    layer = GatedRetention(16, 2, "parallel").double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    pos = Positions(torch.arange(5)[None], None)
    q = layer.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    k = layer.k_proj(x).view(1, 5, 2, 8).transpose(1, 2) / 8 ** 0.5
    v = layer.v_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    gamma = torch.sigmoid(layer.gate_proj(x)).transpose(1, 2) ** (1 / 16)
    o = by_definition(q, k, v, gamma.log(), torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    o = o / o.pow(2).mean(-1, keepdim=True).add(layer.norm_eps).sqrt()  # per-head RMSNorm, no affine
    expected = layer.o_proj(F.silu(layer.g_proj(x)) * o.transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(layer(x, pos), expected)


def band_reference(q, k, v, window):
    n = q.shape[2]
    behind = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    mask = (behind >= 0) & (behind < window)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


@pytest.mark.parametrize("window", [1, 3, 4, 7, 19, 40])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sliding_window_equals_dense_with_band_mask(window, kv_heads):
    """Query t sees keys t - C + 1 .. t: C keys, itself included (flash-attn window_size=(C-1, 0))."""
    g = torch.Generator().manual_seed(window)
    q = torch.randn(2, 4, 19, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 19, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, ref = sliding_window_attention(q, k, v, window), band_reference(q, k, v, window)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


def test_sliding_window_core_with_key_positions_is_the_same_band():
    """The masked path (window cache, gathered keys) applies the band to global positions."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g) for _ in range(3))
    core = SlidingWindowCore(5)
    ids = torch.arange(12)[None]
    full = core(q, k, v, Positions(ids, None))
    # the last 3 queries against the 4 keys before them and their own: what a window cache holds
    part = core(q[:, :, 9:], k[:, :, 5:], v[:, :, 5:], Positions(ids[:, 9:], None, ids[:, 5:]))
    torch.testing.assert_close(part, full[:, :, 9:])
