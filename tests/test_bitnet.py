"""BitNet b1.58: BitLinear against its formulas (grids, STE), the family's structure and rules, TP/PP
against one process, the two-stage schedule, packing and the Triton kernels against their references,
and the packed export decoding the fake-quantised model's tokens."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():  # before the kernels are defined: run them in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import REPO  # noqa: E402
from megalatent.config import ConfigError, TrainingConfig
from megalatent.families import model_config, parse_args, validate  # noqa: E402
from megalatent.distributed import checkpoint as ckpt  # noqa: E402
from megalatent.data.gpt_data import MicroBatchLoader  # noqa: E402
from megalatent.distributed.layout import ParallelLayout  # noqa: E402
from megalatent.kernels import bitnet as kernels  # noqa: E402
from megalatent.interop.packed import (PackedBitLinear, PackedExperts, export_problems,  # noqa: E402
                                             load_packed_model, read_packed_config)
from megalatent.families import build_model  # noqa: E402
from megalatent.nn.bitlinear import (BitLinear, _TernaryLinear, quantize_activations, quantize_weights,  # noqa: E402
                                     rms_norm)
from megalatent.nn.norms import RMSNorm  # noqa: E402
from megalatent.pretrain import build_model_parts  # noqa: E402
from megalatent.training.schedules import LRSchedule  # noqa: E402
from megalatent.training.trainer import Trainer  # noqa: E402
from parallel_worker import MODEL, samples  # noqa: E402
from test_parallel import UNTIED, assert_equivalent, run_worker  # noqa: E402

BITNET = {"model-family": "bitnet"}


# ------------------------------------------------------------------------------- BitLinear

def test_quantised_weights_and_activations_lie_on_their_grids():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 0.02
    w_int, gamma = quantize_weights(w)
    assert gamma == pytest.approx(w.abs().mean().item(), rel=1e-6)
    assert set(w_int.unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(w_int, torch.clamp(torch.round(w / gamma), -1, 1), rtol=0, atol=0)

    x = torch.randn(3, 7, 40) * torch.logspace(-3, 2, 7)[None, :, None]  # tokens of very different scales
    x_int, s_x = quantize_activations(x)
    assert torch.equal(x_int, x_int.round()) and x_int.min() >= -128 and x_int.max() <= 127
    assert torch.equal(x_int.abs().amax(-1), torch.full((3, 7), 127.0))  # every token's absmax maps to 127
    torch.testing.assert_close(s_x, 127 / x.abs().amax(-1, keepdim=True))
    assert ((x_int / s_x - x).abs() <= 0.5 / s_x * (1 + 1e-6)).all()  # within half a step of the grid

    # The layer: its input RMSNorm, then y = x_q W_qᵀ with x_q, W_q the dequantised values.
    layer = BitLinear(40, 24, eps=1e-6)
    layer.weight.data, layer.norm_weight.data = w, torch.rand(40) + 0.5
    x_n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm_weight
    x_int, s_x = quantize_activations(x_n)
    torch.testing.assert_close(layer(x), F.linear(x_int / s_x, w_int * gamma), rtol=1e-5, atol=1e-6)


def test_ste_gradient_is_the_unquantised_layers_at_the_quantised_point():
    torch.manual_seed(1)
    x_n = torch.randn(2, 5, 32, requires_grad=True)
    w = (torch.randn(16, 32) * 0.1).requires_grad_()
    y = _TernaryLinear.apply(x_n, w)
    grad = torch.randn_like(y)
    y.backward(grad)

    x_int, s_x = quantize_activations(x_n.detach())
    w_int, gamma = quantize_weights(w.detach())
    x_q, w_q = (x_int / s_x).requires_grad_(), (w_int * gamma).requires_grad_()
    y_ref = F.linear(x_q, w_q)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_n.grad, x_q.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, w_q.grad, rtol=1e-6, atol=1e-7)

    # Through the layer's own RMSNorm the gradient is the norm's, at the quantised point.
    layer = BitLinear(32, 16)
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x).backward(grad)
    x2 = x.detach().clone().requires_grad_()
    g = layer.norm_weight.detach().clone().requires_grad_()
    x_n2 = rms_norm(x2, g, layer.eps)
    x_int, s_x = quantize_activations(x_n2.detach())
    w_int, gamma = quantize_weights(layer.weight.detach())
    F.linear(x_n2 + (x_int / s_x - x_n2).detach(), w_int * gamma).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.norm_weight.grad, g.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- family, config

def small_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16,
                make_vocab_size_divisible_by=4)
    return model_config(**{**base, **kw})


@pytest.mark.parametrize("cfg", [small_cfg(model_family="bitnet"), small_cfg(linear_impl="bitlinear"),
                                 small_cfg(model_family="longnet", linear_impl="bitlinear", segment_lengths=[8, 16],
                                           dilated_ratios=[1, 2])], ids=["bitnet", "gpt+bitlinear", "longnet+bitlinear"])
def test_every_block_linear_is_bitlinear_and_the_pre_norms_are_gone(cfg):
    model = build_model(cfg)
    for layer in model.layers.values():
        assert isinstance(layer.attention_norm, nn.Identity) and isinstance(layer.mlp_norm, nn.Identity)
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 7 and all(isinstance(m, BitLinear) for m in linears)
    # Full precision: the embedding, the final norm and the head.
    assert type(model.embed_tokens) is nn.Embedding and isinstance(model.norm, RMSNorm)
    assert not any(isinstance(m, BitLinear) for m in (model.embed_tokens, model.output))
    logits = model(torch.randint(0, 100, (2, 16)))
    assert logits.shape == (2, 16, 100) and torch.isfinite(logits).all()


def test_flags_are_validated():
    def errors(*argv):
        with pytest.raises(ConfigError) as e:
            validate(parse_args(list(argv)))
        return str(e.value)

    assert "contradicts" in errors("--model-family", "bitnet", "--linear-impl", "linear")
    assert "--hidden-size 130 must be divisible by 4" in errors("--linear-impl", "bitlinear", "--hidden-size", "130",
                                                               "--num-attention-heads", "2")
    moe = ("--model-family", "bitnet", "--num-experts", "4", "--moe-router-topk", "2")
    assert "--moe-ffn-hidden-size 66 must be divisible by 4" in errors(*moe, "--moe-ffn-hidden-size", "66")
    assert "--hidden-size / --moe-num-heads 6 must be divisible by 4" in errors(
        *moe, "--hidden-size", "24", "--num-attention-heads", "2", "--moe-num-heads", "4")
    assert "--lr-second-stage needs --lr-decay-style two-stage" in errors("--lr-second-stage", "1e-4")
    assert "needs --lr-second-stage" in errors("--lr-decay-style", "two-stage")
    assert "--lr-two-stage-boundary-iter 100 must be" in errors(
        "--lr-decay-style", "two-stage", "--lr-second-stage", "1e-4", "--lr-two-stage-boundary-iter", "100")
    validate(parse_args(["--model-family", "bitnet", "--lr-decay-style", "two-stage", "--lr-second-stage", "2e-4",
                         "--weight-decay-second-stage", "0"]))


# ------------------------------------------------------------------------- parallel equivalence

WORKER = os.path.join(REPO, "tests", "bitnet_worker.py")  # parallel_worker in float64 (see its docstring)


def test_tensor_and_pipeline_parallel_equal_one_process(tmp_path):
    tied, untied = run_worker(tmp_path, 1, [BITNET, {**BITNET, **UNTIED}], "ref", WORKER)
    layouts = [
        {**BITNET, "tensor-model-parallel-size": 2},
        {**BITNET, "tensor-model-parallel-size": 2, "sequence-parallel": True},
        {**BITNET, "pipeline-model-parallel-size": 2, **UNTIED},
        {**BITNET, "data-parallel-sharding-strategy": "optim_grads_params"},
    ]
    for layout, result in zip(layouts, run_worker(tmp_path, 2, layouts, "two", WORKER)):
        reference = untied if layout.get("untie-embeddings-and-output-weights") else tied
        assert_equivalent(result, reference, f"2 ranks {layout}")


# --------------------------------------------------------------------------- two-stage schedule

def test_two_stage_lr_and_weight_decay_switch_at_the_boundary():
    s = LRSchedule(TrainingConfig(lr=1.0, min_lr=0.1, train_iters=110, lr_warmup_iters=10, lr_decay_style="two-stage",
                                  lr_second_stage=0.5, lr_two_stage_boundary_iter=60, weight_decay=0.1))
    assert s(9) == pytest.approx(1.0)  # warmup to --lr
    assert s(35) == pytest.approx(0.1 + 0.9 * (1 - 25 / 100))  # stage 1: on the line from --lr to --min-lr
    assert s(59) == pytest.approx(0.1 + 0.9 * (1 - 49 / 100))
    assert s(60) == pytest.approx(0.5)  # stage 2 starts at --lr-second-stage ...
    assert s(85) == pytest.approx(0.1 + 0.4 * 0.5)  # ... and decays linearly to --min-lr
    assert s(110) == s(200) == 0.1
    assert [s.weight_decay(i) for i in (0, 59, 60, 109)] == [0.1, 0.1, 0.0, 0.0]
    default = LRSchedule(TrainingConfig(lr=1.0, min_lr=0.1, train_iters=110, lr_warmup_iters=10,
                                        lr_decay_style="two-stage", lr_second_stage=0.5, weight_decay_second_stage=0.05))
    assert default.second_stage_start == 60 and default.weight_decay(60) == 0.05


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the trainer's save, single process
def test_trainer_applies_the_stage_of_each_step_also_after_a_resume(tmp_path):
    save = str(tmp_path / "ckpt")
    cfg = parse_args(MODEL + ["--model-family", "bitnet", "--num-layers", "1", "--train-iters", "4",
                              "--lr-decay-style", "two-stage", "--lr-second-stage", "5e-4",
                              "--lr-two-stage-boundary-iter", "2", "--weight-decay", "0.1", "--save", save])
    validate(cfg)

    def trainer():
        layout = ParallelLayout(world_size=1)
        torch.manual_seed(0)
        parts, _ = build_model_parts(cfg, layout, torch.device("cpu"))
        loader = MicroBatchLoader(samples(4 * 8, seed=1), 2, 8, 0, 1)
        return Trainer(cfg, layout, torch.device("cpu"), parts, loader, None, 1.0)

    def step(t):
        """One step as Trainer.train runs it: (loss, [(lr, weight decay) of each parameter group])."""
        loss, _ = t.train_step(t.train_loader.next_global_batch())
        t.iteration += 1
        return loss, [(g["lr"], g["weight_decay"]) for g in t.optimizers[0].param_groups]

    t = trainer()
    seen = []
    for i in range(4):
        seen.append(step(t))
        if t.iteration == 2:
            t.save()  # the last step of stage 1: its optimizer state still holds stage 1's weight decay
    # group 0 holds the matrices (decayed), group 1 the vectors (never decayed)
    assert seen[0][1] == [(pytest.approx(1e-3), 0.1), (pytest.approx(1e-3), 0.0)]
    assert seen[1][1][0] == (pytest.approx(1e-3 * 0.75 + 3e-5 * 0.25), 0.1)
    assert seen[2][1] == [(pytest.approx(5e-4), 0.0), (pytest.approx(5e-4), 0.0)]
    # A fresh trainer resumed from the checkpoint of iteration 2 (its optimizer built with --weight-decay, its
    # loaded parameter groups from stage 1) runs stage 2 from its first step, exactly as the uninterrupted run.
    resumed = trainer()
    resumed.resume(ckpt.find_loadable(save))
    assert resumed.iteration == 2 and resumed.optimizers[0].param_groups[0]["weight_decay"] == 0.1
    assert [step(resumed) for _ in range(2)] == seen[2:]
    for (name, p), q in zip(resumed.model.named_parameters(), t.model.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------ packing, kernels

def test_pack_unpack_is_lossless():
    torch.manual_seed(2)
    w = torch.randint(-1, 2, (7, 36), dtype=torch.int8)
    packed = kernels.pack_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 9)  # 4 weights per byte
    assert torch.equal(kernels.unpack_ternary(packed), w)
    # the layout: byte j of a row holds columns j, j + K/4, j + 2K/4, j + 3K/4 in bits 0-1, 2-3, 4-5, 6-7
    assert packed[0, 0].item() == sum(int(w[0, 9 * p] + 1) << 2 * p for p in range(4))
    with pytest.raises(ValueError, match="divisible by 4"):
        kernels.pack_ternary(torch.zeros(2, 6))


def test_int8_matmul_is_exact():
    torch.manual_seed(5)
    x = torch.randint(-128, 128, (3, 1000), dtype=torch.int8)
    w = torch.randint(-1, 2, (20, 1000), dtype=torch.int8)
    w[:, :500] = 1
    x[0] = 127  # sums near the largest a 1000-wide layer can reach
    assert torch.equal(kernels.int8_matmul(x, w), x.long().matmul(w.long().t()).int())


_interpreted = type(getattr(kernels, "_w2a8_kernel", None)).__name__ == "InterpretedFunction"
needs_triton = pytest.mark.skipif(kernels.triton is None or not (torch.cuda.is_available() or _interpreted),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1 when kernels are defined")


@needs_triton
def test_w2a8_kernel_equals_the_reference_matmul():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    x_int = torch.randint(-128, 128, (2, 9, 192), dtype=torch.int8, device=device)  # 18 rows: two M blocks
    packed = kernels.pack_ternary(torch.randint(-1, 2, (80, 192), device=device))  # N = 80: a ragged N block
    scale = torch.rand(2, 9, 1, device=device) * 1e-3
    y = kernels.w2a8_matmul_triton(x_int, packed, scale, block_m=16, block_n=64, block_j=32)
    y_ref = kernels.w2a8_matmul_reference(x_int, packed, scale)
    assert y.shape == (2, 9, 80)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # integer accumulation: exact


@needs_triton
def test_fused_rmsnorm_act_quant_kernel_equals_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    x = torch.randn(3, 11, 200, device=device) * torch.logspace(-2, 2, 11, device=device)[None, :, None]
    weight = torch.rand(200, device=device) + 0.5
    q, s = kernels.rmsnorm_act_quant_triton(x, weight, 1e-5)
    q_ref, s_ref = kernels.rmsnorm_act_quant_reference(x, weight, 1e-5)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (3, 11, 1)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    # The kernel sums x^2 in another order: a value within an ulp of a rounding boundary may land one
    # step away (a few in a million); everything else is identical.
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ------------------------------------------------------------------------ export and generation

def greedy(model, prompt, steps):
    """Greedy decoding with full forwards (no cache): the generated tokens and each step's logits."""
    tokens, logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            last = model(tokens)[:, -1]
            logits.append(last)
            tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits)


def test_packed_experts_equal_the_ternary_experts():
    """Uneven blocks, an expert with no rows: the packed experts compute the training experts' output up to
    float rounding (PackedExperts.forward says why not bit-exactly)."""
    from megalatent.nn.moe import Experts
    torch.manual_seed(0)
    experts = Experts(4, 16, 24, ternary=True)
    for p in experts.parameters():
        nn.init.normal_(p, mean=1.0 if p.dim() == 2 else 0.0, std=0.3 if p.dim() == 2 else 0.05)
    packed = PackedExperts.from_experts(experts)
    assert all(getattr(packed, n).packed_weight.dtype == torch.uint8 for n in ("gate_proj", "up_proj", "down_proj"))
    assert packed.gate_proj.packed_weight.shape == (4, 24, 4) and packed.down_proj.packed_weight.shape == (4, 16, 6)
    counts = torch.tensor([5, 0, 1, 9])
    x = torch.randn(15, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x, counts), experts(x, counts), rtol=1e-5, atol=1e-5)
        assert packed(x[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 16)


def trained_checkpoint(save, flags):
    """Three steps of the trainer on a 2-layer model, saved as a training run leaves it; the trainer."""
    cfg = parse_args(MODEL + ["--num-layers", "2", "--train-iters", "3", "--save", save, "--lr", "3e-3"] + flags)
    validate(cfg)
    layout = ParallelLayout(world_size=1)
    torch.manual_seed(0)
    parts, _ = build_model_parts(cfg, layout, torch.device("cpu"))
    loader = MicroBatchLoader(samples(3 * 8, seed=1), 2, 8, 0, 1)
    trainer = Trainer(cfg, layout, torch.device("cpu"), parts, loader, None, 1.0)
    for _ in range(3):
        trainer.train_step(loader.next_global_batch())
        trainer.iteration += 1
    trainer.save()
    return trainer


# MH-MoE on layer 0 (its head/merge projections are BitLinear), a dense BitNet MLP on layer 1.
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-layer-freq", "2", "--moe-num-heads", "2"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the trainer's save, single process
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_export_packs_and_packed_generation_equals_the_fake_quantised_model(tmp_path, moe):
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import export_bitnet
    from megalatent.nn.moe import Experts

    save, out = str(tmp_path / "ckpt"), str(tmp_path / "packed")
    trainer = trained_checkpoint(save, ["--model-family", "bitnet"] + (MOE if moe else []))

    assert export_bitnet.main(["--load", save, "--output", out]) == 0
    assert export_bitnet.main(["--load", save, "--output", out]) == 2  # exists: needs --force
    meta = read_packed_config(out)
    # Dense: 7 BitLinear per layer. MoE layer 0: 4 attention + head/merge projections, its experts packed whole.
    assert meta["iteration"] == 3 and len(meta["packed_layers"]) == (7 + 6 if moe else 2 * 7)
    assert meta["packed_experts"] == (["layers.0.mlp.experts"] if moe else [])
    packed = load_packed_model(out)
    linears = [m for m in packed.modules() if isinstance(m, (BitLinear, PackedBitLinear))]
    assert len(linears) == len(meta["packed_layers"]) and all(isinstance(m, PackedBitLinear) for m in linears)
    assert not any(isinstance(m, Experts) for m in packed.modules())
    packed_experts = [m for m in packed.modules() if isinstance(m, PackedExperts)]
    trained = trainer.model.eval()
    codes = [m.packed_weight for m in linears] + [getattr(m, n).packed_weight for m in packed_experts
                                                  for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(c.dtype == torch.uint8 for c in codes)
    latent = [m.weight for m in trained.modules() if isinstance(m, BitLinear)] + [
        getattr(m, n) for m in trained.modules() if isinstance(m, Experts) for n in ("gate_proj", "up_proj",
                                                                                     "down_proj")]
    assert nbytes(codes) * 16 == nbytes(latent)  # 2 bits against fp32's 32, experts included
    if moe:  # the packed directory: the embedding, head and routers dominate what is not 2-bit
        latent_file = nbytes(trained.state_dict().values())
        assert os.path.getsize(os.path.join(out, "weights.pt")) < 0.45 * latent_file

    prompt = torch.tensor([[5, 17, 42, 7], [100, 3, 3, 150]])
    tokens, logits = greedy(packed, prompt, 8)
    tokens_ref, logits_ref = greedy(trained, prompt, 8)
    assert torch.equal(tokens, tokens_ref)
    # Dense BitNet is bit-exact up to the order of sums; the experts are equal up to float rounding.
    tolerance = 1e-5 if moe else 1e-6
    torch.testing.assert_close(logits, logits_ref, rtol=tolerance, atol=tolerance)

    assert any("no BitLinear" in p for p in export_problems(model_config(vocab_size=100)))  # a gpt model
    if not moe:  # a directory of format version 1 (before packed experts) still loads
        meta_path = os.path.join(out, "config.json")
        with open(meta_path) as f:
            meta = json.load(f)
        del meta["packed_experts"]
        with open(meta_path, "w") as f:
            json.dump({**meta, "version": 1}, f)
        torch.testing.assert_close(load_packed_model(out)(prompt), packed(prompt), rtol=0, atol=0)
    else:
        problems = export_problems(small_cfg(model_family="bitnet", num_experts=4, moe_router_topk=2,
                                             moe_ffn_hidden_size=30, moe_num_heads=16))  # sub-tokens of width 2
        assert len(problems) == 2 and "input width 2 (--hidden-size / --moe-num-heads)" in problems[0]
        assert "width 30 (--moe-ffn-hidden-size" in problems[1]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)
