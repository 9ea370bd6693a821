"""The Triton kernels equal their plain-PyTorch references (DESIGN rule 1): one dilated pattern (output, LSE,
and dq/dk/dv with a gradient on the LSE too), the LSE merge (forward and backward), and the whole mixture
through `dilated_attention`'s dispatch with the kernels forced on. On CPU they run in Triton's interpreter
at tiny sizes; on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton = pytest.importorskip("triton")  # conftest.py set TRITON_INTERPRET=1 before, on a machine without GPU
if DEVICE == "cpu" and type(triton.language.zeros).__name__ != "InterpretedFunction":
    raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it); "
                       "its kernels cannot run on CPU tensors in this process")

from megalatent.kernels import dilated_attention as pattern_kernel  # noqa: E402
from megalatent.kernels import lse_merge as merge_kernel  # noqa: E402
from megalatent.kernels.backend import dilated_attention, dilated_uses_triton  # noqa: E402
from megalatent.nn.dilated import NOT_COVERED  # noqa: E402


def tensors(b, h, kv_heads, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = (torch.randn(b, kv_heads, n, d, generator=g) for _ in range(2))
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


# (h, kv_heads, n, d, w, r, causal, first_head, blocks): GQA groups whose heads share or split offsets,
# n not a multiple of w or r, w > n (clamped), several query/key blocks per segment (blocks=(16, 16), or
# the default blocks, which differ between the backward's two kernels, at 64 rows), a head dim that is not
# a power of two.
PATTERNS = [
    (2, 2, 32, 16, 16, 1, True, 0, None),
    (4, 2, 40, 16, 16, 2, True, 1, None),
    (4, 1, 50, 16, 32, 4, False, 3, None),
    (4, 2, 64, 16, 64, 1, True, 0, (16, 16)),
    (3, 3, 61, 16, 64, 2, False, 0, (16, 16)),
    (4, 4, 45, 16, 128, 3, True, 2, None),
    (2, 1, 100, 24, 64, 1, True, 1, None),
]


@pytest.mark.parametrize("h, kv_heads, n, d, w, r, causal, first_head, blocks", PATTERNS)
def test_pattern_kernel_equals_reference(h, kv_heads, n, d, w, r, causal, first_head, blocks):
    q, k, v = tensors(1, h, kv_heads, n, d, seed=n + w + r)
    out, lse = pattern_kernel.dilated_pattern(q, k, v, w, r, causal, first_head, blocks)
    ref_out, ref_lse = pattern_kernel.reference(q, k, v, w, r, causal, first_head)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)  # NOT_COVERED where the pattern skips a row
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(out.shape, generator=g).to(DEVICE), torch.randn(lse.shape, generator=g).to(DEVICE)]
    covered = ref_lse > NOT_COVERED / 2
    cotangents[1] = cotangents[1] * covered  # an LSE gradient where the LSE is a constant has no effect
    got = grads((out, lse), cotangents, (q, k, v))
    want = grads((ref_out, ref_lse), cotangents, (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter computes tl.dot on bf16 wrongly (a 16x16 bf16 x @ x is off "
                                "by 1e10); the bf16 path is checked on GPU only")),
])
def test_pattern_kernel_16_bit_within_rounding(dtype):
    q, k, v = tensors(1, 4, 2, 48, 16, dtype=dtype)
    out, lse = pattern_kernel.dilated_pattern(q, k, v, 32, 2, True, 0)
    ref_out, ref_lse = pattern_kernel.reference(*(x.float() for x in (q, k, v)), 32, 2, True, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)
    dq, dk, dv = torch.autograd.grad(out.float().sum() + lse.clamp_min(-1e4).sum(), (q, k, v))
    ref = torch.autograd.grad(ref_out.sum() + ref_lse.clamp_min(-1e4).sum(), (q, k, v))
    for a, b in zip((dq, dk, dv), ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 3, 20, 16, generator=g).to(DEVICE, dtype) for _ in range(3)]
    lses = [(3 * torch.randn(2, 3, 20, generator=g)).to(DEVICE) for _ in range(3)]
    lses[0][:, :, ::4] = NOT_COVERED  # rows one pattern skips
    for x in lses:
        x[:, 0, 5] = NOT_COVERED  # a row no pattern covers: output 0
    for o, x in zip(outputs, lses):
        o[x == NOT_COVERED] = 0  # as the patterns give them
        o.requires_grad_(), x.requires_grad_()
    got = merge_kernel.lse_merge(outputs, lses)
    want = merge_kernel.reference(outputs, lses)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    assert (got[:, 0, 5] == 0).all()
    cotangent = torch.randn(got.shape, generator=g).to(DEVICE)
    for a, b in zip(grads([got], [cotangent], outputs + lses), grads([want], [cotangent], outputs + lses)):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("causal", [True, False])
def test_mixture_through_dispatch_equals_reference(causal):
    """The tiny LongNet's patterns (w = 64, 128, 256 over r = 1, 2, 4, here clamped by n = 72) with GQA and
    a head slice (first_head = 1), q/k/v as the attention layer passes them: [b, n, h, d] transposed."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 72, 4, 16, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 72, 2, 16, generator=g).to(DEVICE).transpose(1, 2).requires_grad_() for _ in range(2))
    args = ([64, 128, 256], [1, 2, 4], causal, 1)
    got = dilated_attention(q, k, v, *args, backend="triton")
    want = dilated_attention(q, k, v, *args, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cotangent = torch.randn(got.shape, generator=g).to(DEVICE)
    for a, b in zip(grads([got], [cotangent], (q, k, v)), grads([want], [cotangent], (q, k, v))):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_tiny_longnet_gradients_with_kernels_equal_reference():
    """The LongNet family's attention layers (projections, RoPE, GQA, the dispatch) with the kernels forced
    on by --attention-backend triton give the loss and parameter gradients of --attention-backend torch."""
    from megalatent.families import build_model, parse_args
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/tiny/longnet.yaml")
    results = []
    for backend in ("triton", "torch"):
        cfg = parse_args(["--config", config, "--num-layers", "1", "--hidden-size", "64", "--seq-length", "80",
                          "--vocab-size", "128", "--attention-backend", backend]).model
        torch.manual_seed(0)
        model = build_model(cfg).to(DEVICE)
        tokens = torch.randint(0, 128, (1, 81), device=DEVICE)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss, got), (ref_loss, want) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dispatch_rules():
    q, k, v = tensors(1, 2, 2, 16, 16)
    assert dilated_uses_triton(q, k, v, "torch") is False
    assert dilated_uses_triton(q, k, v, "auto") is (DEVICE == "cuda")  # the reference stays the CPU path
    assert dilated_uses_triton(q, k, v, "triton") is True
    wide = torch.zeros(1, 2, 16, 256, device=DEVICE)
    assert dilated_uses_triton(wide, wide, wide, "auto") is False  # head dim > 128: the reference, silently
    with pytest.raises(ValueError, match="head dim 256"):
        dilated_attention(wide, wide, wide, [16], [1], backend="triton")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        dilated_uses_triton(q, k, v, "flash")


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU run executes the compiled kernels themselves")
def test_kernels_compile_for_h100():
    """The kernels lower through Triton's real NVIDIA backend (to sm_90 cubins), not only the interpreter.
    Compiling needs no GPU; it runs in a fresh process because this one imported them for the interpreter."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from megalatent.kernels import dilated_attention as a, lse_merge as m
        common = dict(HEAD_DIM=128, CAUSAL=True, PRECISION="tf32", BLOCK_D=128)
        def tiles(kernel):  # the launch's tiles for d = 128
            block_m, block_n, warps = a.TILES[kernel][128]
            return dict(common, BLOCK_M=block_m, BLOCK_N=block_n), warps
        jobs = [(a._fwd_kernel, *tiles("fwd")), (a._bwd_dkdv_kernel, *tiles("dkdv")), (a._bwd_dq_kernel, *tiles("dq")),
                (a._bwd_delta_kernel, dict(HAS_DLSE=True, HEAD_DIM=128, BLOCK=64, BLOCK_D=128), 4),
                (m._merge_fwd_kernel, dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_D=128), 4),
                (m._merge_bwd_kernel, dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_D=128), 4)]
        fp32_pointers = {"LSE", "DELTA", "DLSE", "OUT_LSE"}
        bf16_pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "OUT", "DOUT"}
        for fn, constants, warps in jobs:
            signature = {name: "constexpr" if name in constants else "*fp32" if name in fp32_pointers else
                         "*bf16" if name in bf16_pointers else "fp32" if name.endswith("scale") else "i32"
                         for name in fn.arg_names}
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(fn.arg_names.index(c),): x for c, x in constants.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert compiled.asm["cubin"], fn
            print("compiled", fn.__name__)
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 6
