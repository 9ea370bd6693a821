"""FP8 training of the transformer blocks' linear layers and MoE experts, on torchao's float8 training (the engine
torchtitan uses): Megatron's --fp8-format, --fp8-recipe and --fp8-param-gather.

    --fp8-format e4m3      input, weight and output gradient cast to float8_e4m3fn
    --fp8-format hybrid    e4m3 forward, float8_e5m2 output gradients (more range, less precision)
    --fp8-recipe tensorwise  one scale per tensor from its own amax at every cast (Megatron's "tensorwise"
                           current scaling; torchao's "tensorwise" recipe is hybrid + tensorwise)
    --fp8-recipe rowwise   one scale per row (per column for the operand read along its columns), rounded
                           down to a power of two (torchao's "rowwise" recipe is e4m3 + rowwise)
    --fp8-param-gather     FSDP2 all-gathers the linear layers' weights in FP8 (tensorwise: one scale per weight,
                           so the shards can be cast before the all-gather)

Each selected `nn.Linear` becomes torchao's `Float8Linear` (a subclass that keeps its `weight` and `bias`,
so state-dict names do not change and an FP8 run's checkpoint loads into a bf16 run and back). Its three
matmuls (output, input gradient, weight gradient) quantise both operands with dynamic scales, run
`torch._scaled_mm`, and return the high-precision dtype; the master weights, the optimizer and every other
op keep their precision.

Each selected MoE `Experts` module (stacked weights [E, d_in, d_out], one grouped matmul per projection) gets a
`Float8GroupedMM` as its matmul (the `Experts.matmul` seam; no parameter changes, so checkpoints are unchanged):
every expert's matmuls are a Float8Linear's, with the same casts, so the scales are per expert — tensorwise, one
scale for each expert's weight and one for its block of tokens (and of output gradients); rowwise, per token
row and per column of each expert's weight, and per column over each expert's tokens in the weight gradient.
Per expert because each expert is its own linear layer: a scale shared by the experts would let one expert's
outlier weights or tokens take the others' resolution, and under expert parallelism it would need an amax
all-reduce, while an expert's weight and all its rows are on one rank after the all-to-all. It is also the
granularity of torchao's FP8 grouped GEMM (per-group scales), which runs the rowwise e4m3 case on CUDA (see
Float8GroupedMM); everywhere else (CPU, --fp8-emulate, tensorwise or hybrid on CUDA) a loop over the experts runs
torchao's Float8Linear matmul on each block. One consequence: under expert parallelism an expert's block holds
the tokens of every rank that routed to it, not one micro-batch's as in one process, so tensorwise scales (and
rowwise weight-gradient column scales) span more tokens: EP changes FP8's rounding within its own noise
(tests/test_fp8.py measures it). Under context parallelism (without EP) an expert's block holds this rank's part
of the sequence, and its scales are over that part: the blocks' sizes are data (an expert may get no token on
one rank, so no cast there to join an all-reduce), the grouped GEMM path casts inside torchao's kernel, and
under EP (carved out of dp x cp) a block already mixes ranks' tokens, so no group of ranks would reproduce one
process's blocks; the experts' FP8 rounding under CP is within FP8's noise, as under EP.

What is converted: the plain `nn.Linear` layers of the transformer blocks — `model.layers` and the modules
the family's pipeline plan keeps with a layer (e.g. a key/value projection shared by later layers) — whose two
dimensions are multiples of 16 on every tensor-parallel rank (torch._scaled_mm's rule), and the blocks' MoE
experts whose widths (d_in and the expert FFN width; experts are not split over tensor-parallel ranks) are
multiples of 16 (the tokens per expert can be any number: the weight-gradient matmul's inner dimension is
zero-padded). Kept in high precision, and why:
  - the output head and the embeddings: the logits' softmax and the vocabulary rows of rare tokens are
    where FP8's 3-bit mantissa costs most loss, for ~1-5% of the FLOPs (Megatron and torchtitan keep them);
  - MoE routers (fp32 by design: top-k selection flips on small errors) and norms (not matmuls);
  - BitLinear layers and ternary experts (ternary weights, int8 activations already): FP8 is refused for
    models that have them;
  - layers and experts whose shapes do not allow it (per-head gates: hidden -> heads), and whatever lies outside
    the blocks (latent projections, diffusion heads, patch embeddings, classifiers);
  - with --first-last-layers-bf16, the first/last transformer layers (Megatron's flag), experts included;
  - expert weights are all-gathered by FSDP2 in their own precision even with --fp8-param-gather (torchao's FP8
    all-gather casts a whole tensor with one scale; a stacked expert weight has one scale per expert).
The order in the parallel pipeline (parallelize.py): converted first, before tensor parallelism (the DTensor
plans then shard Float8Linear weights like any linear's; torchao computes tensorwise amaxes of DTensors over
all shards, so every rank uses the single-process scales), as torchtitan does; expert parallelism then shards
the experts, which keep their Float8GroupedMM.

With the other parallelisms (each tested against one process under FP8, tests/test_fp8.py):
  - tensor (+ sequence) parallelism, tensorwise: the plans take torchao's float8 styles (Float8ColwiseParallel,
    Float8RowwiseParallel, PrepareFloat8ModuleInput; tensor_parallel.float8_styles, as torchtitan), which cast
    before the all-gathers: sequence parallelism's all-gathers of the attention and MLP inputs and of the
    row-parallel layers' output gradients move FP8 (`gathers_in_fp8` says which layers; a block with a linear
    layer kept in high precision, e.g. gated retention's per-head gates, gathers its input in high precision).
    gloo has no float8 collectives: on CPU the FP8 values are all-gathered as bytes
    (`float8_all_gathers_as_bytes`). Rowwise: the plain styles (a row's scale needs the whole row);
  - context parallelism, tensorwise: the linear layers become ContextParallelFloat8Linear
    (fp8_context_parallel.py), whose input and output-gradient amaxes are all-reduced (MAX) over the cp (x tp)
    ranks, as Megatron/Transformer Engine reduce them over the context-parallel group, so every cast is one
    process's. They take the plain tensor-parallel styles (the float8 styles' casts would be over the tp shards
    alone): under CP x TP+SP the sequence-parallel all-gathers stay in high precision. Not over the
    data-parallel ranks: their micro-batches are other micro-batches, each cast on its own in one process too.
    Rowwise: the output and input-gradient products' scales are per token row and unchanged by CP; the
    weight-gradient product's operands are scaled per column over the tokens it sums, which are this rank's
    (torchao computes those scales inside its matmul's backward, with no reduction hook; reducing them would mean
    copying that backward), so the FP8 layers' weight gradients differ from one process's by a few percent of
    FP8's own error, and every other gradient and the loss are one process's. MoE experts: see above;
  - FSDP2 with --fp8-param-gather: the weights' shards are cast and all-gathered in FP8; after each optimizer
    step PrecomputeFloat8Scales (a step hook) computes every such weight's scale at once (torchao's
    precompute_float8_dynamic_scale_for_fsdp, one all-reduce), which the next all-gathers use instead of an
    all-reduce of each weight's amax. (torchao 0.18's Float8LinearConfig has no flag for it: its FP8 weight uses a
    precomputed scale whenever one is set.)
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megalatent.config import Config, FP8Config
from megalatent.nn.bitlinear import BitLinear
from megalatent.nn.moe import Experts, Router

# torch._scaled_mm: both dimensions of each operand (and the inner dimension of every product) a multiple of 16.
MULTIPLE = 16


def float8_linear_config(cfg: FP8Config):
    """The torchao Float8LinearConfig of the flags: the two recipes with either format."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import CastConfig, ScalingGranularity

    granularity = ScalingGranularity.TENSORWISE if cfg.fp8_recipe == "tensorwise" else ScalingGranularity.AXISWISE
    grad_dtype = torch.float8_e5m2 if cfg.fp8_format == "hybrid" else torch.float8_e4m3fn

    def cast(dtype):
        return CastConfig(scaling_granularity=granularity, target_dtype=dtype)

    return Float8LinearConfig(cast_config_input=cast(torch.float8_e4m3fn), cast_config_weight=cast(torch.float8_e4m3fn),
                              cast_config_grad_output=cast(grad_dtype),
                              enable_fsdp_float8_all_gather=cfg.fp8_param_gather, emulate=cfg.fp8_emulate,
                              round_scales_to_power_of_2=cfg.fp8_recipe == "rowwise")


# ---------------------------------------------------------------------------------------------- MoE experts in FP8

class Float8GroupedMM(nn.Module):
    """The experts' grouped matmul in FP8 (the `Experts.matmul` seam of megalatent/nn/moe.py), with grouped_mm's
    signature: x [T, d_in] sorted by expert, weight [E, d_in, d_out], counts [E] rows per expert -> [T, d_out].

    Expert e's block x_e [counts[e], d_in] times its weight W_e is computed as a torchao Float8Linear computes
    x W^T, W_e standing for W^T: its three matmuls (output, input gradient, weight gradient) quantise both
    operands with the config's casts (recipe: tensorwise or rowwise; format: e4m3, or hybrid's e5m2 output
    gradients) and run torch._scaled_mm. So every scale is one expert's: tensorwise, one scale for W_e and one
    for the expert's block of rows (its tokens), for the output gradient's block, likewise; rowwise, one per
    token row, per column of W_e (per row for the input gradient), and per column over the expert's tokens for
    the weight gradient. (A scale shared by all experts would let one expert's outlier weights or tokens take
    the resolution of every other expert's, and under expert parallelism need an all-reduce of amaxes; per
    expert, the amaxes are local to the rank that holds the expert and all its rows.)

    Two ways to run the same numerics:
      - per expert (CPU, --fp8-emulate, the tensorwise recipe and the hybrid format on CUDA): a loop over the
        experts, each block through torchao's Float8Linear matmul (`matmul_with_hp_or_float8_args`), its
        inner dimension (the tokens, in the weight gradient) zero-padded to a multiple of 16;
      - grouped (CUDA with compute capability >= 9.0, bf16 inputs as under the GPU's bf16 autocast, the rowwise
        recipe with the e4m3 format, not emulated):
        one call of torchao's FP8 grouped GEMM (prototype.moe_training `_to_fp8_rowwise_then_scaled_grouped_mm`,
        torch._scaled_grouped_mm) per matmul, which quantises exactly as the rowwise Float8Linear does (rows of
        the input and of the output gradient, columns of each expert's weight, columns of each expert's group
        of rows for the weight gradient); `padded_grouped_mm` pads each expert's rows to a multiple of 16 with
        zero rows (they change no amax and no product) and passes the weights column-major (a copy). Its products
        are bf16, so its output gradients arrive in bf16: with fp32 inputs (--no-bf16) they would be rounded to
        bf16 before their FP8 cast, unlike Float8Linear's, hence bf16 inputs only.
    """

    def __init__(self, config):
        super().__init__()
        from torchao.float8.config import ScalingGranularity
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        # The tokens an expert gets are any number: pad the inner dimension of the weight-gradient matmul.
        # Expert weights are all-gathered by FSDP in their own precision (see the module docstring).
        c = self.config = dataclasses.replace(config, pad_inner_dim=True, enable_fsdp_float8_all_gather=False)
        self.mm_config = LinearMMConfig(*(ScaledMMConfig(c.emulate, gemm.use_fast_accum, False, c.pad_inner_dim)
                                          for gemm in (c.gemm_config_output, c.gemm_config_grad_input,
                                                       c.gemm_config_grad_weight)))
        casts = (c.cast_config_input, c.cast_config_weight, c.cast_config_grad_output)
        self.rowwise_e4m3 = not c.emulate and c.round_scales_to_power_of_2 and all(
            cast.scaling_granularity is ScalingGranularity.AXISWISE and cast.target_dtype == torch.float8_e4m3fn
            for cast in casts)

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether this call takes torchao's FP8 grouped GEMM (else the per-expert loop)."""
        return (self.rowwise_e4m3 and x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
                and torch.cuda.get_device_capability(x.device) >= (9, 0))

    def forward(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as Float8Linear: compute from the autocast dtype's input
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.grouped(x):
            return padded_grouped_mm(x, weight, counts, torchao_fp8_grouped_mm)
        return float8_mm_per_expert(x, weight, counts, self.mm_config, self.config)

    def extra_repr(self) -> str:
        return f"cast_configs=i:{self.config.cast_config_input.short_str()},w:" \
               f"{self.config.cast_config_weight.short_str()},go:{self.config.cast_config_grad_output.short_str()}"


@torch.compiler.disable  # block sizes are data (as grouped_mm_loop): eager, one graph break, no recompiles
def float8_mm_per_expert(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, mm_config,
                         config) -> torch.Tensor:
    """Each expert's block of rows times its weight through torchao's Float8Linear matmul (forward and backward);
    an expert without rows is skipped (its weight gradient is zero)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    # unbind: one stacked weight gradient in backward, not E full-size ones
    out = [matmul_with_hp_or_float8_args.apply(block, w, mm_config, config) if block.shape[0]
           else block.new_zeros(0, w.shape[-1]) for block, w in zip(x.split(counts.tolist()), weight.unbind(0))]
    return torch.cat(out)


def padded_grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                      scaled_grouped_mm: Callable) -> torch.Tensor:
    """`scaled_grouped_mm(a, b_t, offs)` (torchao's FP8 grouped GEMM) on x's rows: every expert's group padded
    with zero rows to a multiple of 16 (at least 16: no empty group), the weights column-major."""
    padded = ((counts + MULTIPLE - 1) // MULTIPLE * MULTIPLE).clamp(min=MULTIPLE)
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                            output_size=x.shape[0])
    offset_in_group = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[expert_of_row]
    row = (padded.cumsum(0) - padded)[expert_of_row] + offset_in_group  # each row's place in the padded groups
    a = x.new_zeros(int(padded.sum()), x.shape[-1]).index_copy(0, row, x)
    b_t = weight.transpose(-2, -1).contiguous().transpose(-2, -1)
    return scaled_grouped_mm(a, b_t, padded.cumsum(0).to(torch.int32))[row].to(x.dtype)


def torchao_fp8_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torchao's rowwise e4m3 FP8 grouped GEMM (CUDA: Triton casts and torch._scaled_grouped_mm), bf16 out as
    torch._scaled_mm's rowwise products (the per-expert path rounds them so too)."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(a, b_t, offs, out_dtype=torch.bfloat16,
                                                  float8_dtype=torch.float8_e4m3fn,
                                                  pad_token_groups_for_grouped_mm=False)


# ---------------------------------------------------------------------------------------------- selection

def select_modules(model: nn.Module, trunk_modules: list[str], cfg: FP8Config, tp: int) -> tuple[list[str], dict]:
    """(names of the linear layers and MoE experts to convert, {name: why kept} for every other linear layer and
    experts module). `trunk_modules`: top-level modules outside `layers` that belong to the blocks
    (plan.pipeline.with_layer)."""
    in_router = {id(m) for r in model.modules() if isinstance(r, Router) for m in r.modules()}
    trunk = ("layers.",) + tuple(f"{name}." for name in trunk_modules)
    num_layers = model.cfg.num_layers
    selected, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Experts)):
            continue
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if isinstance(module, Experts):
            # Not split over the tensor-parallel ranks (expert tensor parallelism is 1): 16 is the rule at any tp.
            _, dim, ffn = module.gate_proj.shape
            shape = f"experts {dim}->{ffn}->{dim} not multiples of {MULTIPLE}" if dim % MULTIPLE or ffn % MULTIPLE \
                else None
        else:
            shape = f"{module.in_features}->{module.out_features} not multiples of {MULTIPLE * tp}" if (
                module.in_features % (MULTIPLE * tp) or module.out_features % (MULTIPLE * tp)) else None
        if not name.startswith(trunk):
            kept[name] = "outside the transformer blocks"
        elif id(module) in in_router:
            kept[name] = "MoE router"
        elif isinstance(module, Experts) and module.ternary:
            kept[name] = "ternary experts"
        elif isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            kept[name] = type(module).__name__
        elif shape is not None:
            kept[name] = shape
        elif cfg.first_last_layers_bf16 and layer is not None and not (
                cfg.num_layers_at_start_in_bf16 <= layer < num_layers - cfg.num_layers_at_end_in_bf16):
            kept[name] = "--first-last-layers-bf16"
        else:
            selected.append(name)
    return selected, kept


def convert_to_fp8(model: nn.Module, cfg: FP8Config, trunk_modules: list[str], tp: int,
                   sequence_mesh=None) -> list[str]:
    """Swap the selected linear layers for torchao Float8Linear and give the selected experts a Float8GroupedMM
    (in place); returns their names. `sequence_mesh` (under context parallelism: ParallelLayout.sequence_mesh):
    tensorwise linear layers take their activation and output-gradient scales over it
    (fp8_context_parallel.ContextParallelFloat8Linear)."""
    from torchao.float8 import convert_to_float8_training

    selected, kept = select_modules(model, trunk_modules, cfg, tp)
    config = float8_linear_config(cfg)
    experts = [name for name in selected if isinstance(model.get_submodule(name), Experts)]
    linears = set(selected) - set(experts)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in linears)
    over = ""
    if sequence_mesh is not None and cfg.fp8_recipe == "tensorwise":
        from megalatent.distributed.fp8_context_parallel import reduce_scales_over
        reduce_scales_over([model.get_submodule(name) for name in sorted(linears)], sequence_mesh)
        over = f"; activation scales over {' x '.join(sequence_mesh.mesh_dim_names[0].split('_'))}"
    for name in experts:
        model.get_submodule(name).matmul = Float8GroupedMM(config)
    if not dist.is_initialized() or dist.get_rank() == 0:
        reasons = sorted(set(kept.values()))
        print(f"[fp8] {len(linears)} linear layers and the experts of {len(experts)} MoE layers in FP8 "
              f"({cfg.fp8_recipe}, {cfg.fp8_format}{over}); {len(kept)} kept in high precision "
              f"({'; '.join(reasons) or 'none'}) besides embeddings, head and norms", flush=True)
    return selected


# ---------------------------------------------------------------------------------------------- tensor parallelism

def gathers_in_fp8(module: nn.Module) -> bool:
    """Whether torchao's float8 tensor-parallel styles (Float8ColwiseParallel, Float8RowwiseParallel,
    PrepareFloat8ModuleInput: casts before the all-gathers, tensor_parallel.float8_styles) can cast this layer's
    input and output gradient: a torchao Float8Linear without bias, with dynamic tensorwise casts of both. Not
    rowwise (one scale per row needs the whole row, not a shard of the sequence), nor a ContextParallelFloat8Linear
    (its scales span the context-parallel ranks too, which the styles' casts, over the tensor-parallel shards,
    would not), nor a layer with a bias (the styles cast the gradient of the layer's output, so the bias's
    gradient would be summed from FP8 values; one process sums it in high precision)."""
    # No Float8Linear exists unless torchao's module was imported (by convert_to_fp8): a run without FP8 imports
    # nothing here.
    float8_linear = sys.modules.get("torchao.float8.float8_linear")
    if float8_linear is None or type(module) is not float8_linear.Float8Linear or module.bias is not None:
        return False
    from torchao.float8.config import ScalingGranularity, ScalingType

    c = module.config
    return all(cast.scaling_type is ScalingType.DYNAMIC and cast.scaling_granularity is ScalingGranularity.TENSORWISE
               for cast in (c.cast_config_input, c.cast_config_grad_output))


def float8_all_gathers_as_bytes() -> None:
    """Let gloo all-gather FP8 tensors. torchao all-gathers an FP8 tensor (float8_ops, what the float8 styles'
    redistributions call) as its float8 data, which NCCL moves as bytes but gloo refuses ("Invalid scalar type":
    it has no float8 dtypes). This makes torchao's all-gather of a CPU FP8 tensor move the same bytes as uint8
    (and wait for them: gloo's collectives are synchronous on CPU anyway); CUDA tensors keep torchao's. Installed
    in torchao's FP8 op table once per process (the table is torchao's only way to extend its FP8 tensor)."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    op = torch.ops._c10d_functional.all_gather_into_tensor.default
    original = FLOAT8_OPS_TABLE[op]
    if getattr(original, "as_bytes", False):
        return

    def all_gather(aten_op, args, kwargs=None):
        fp8 = args[0]
        if fp8._data.device.type != "cpu":
            return original(aten_op, args, kwargs)
        data = fp8._data.contiguous()
        gathered = aten_op(data.view(torch.uint8), *args[1:], **(kwargs or {}))
        return Float8TrainingTensor(torch.ops._c10d_functional.wait_tensor(gathered).view(data.dtype), fp8._scale,
                                    fp8._orig_dtype, fp8._linear_mm_config, fp8._gemm_input_role)

    all_gather.as_bytes = True
    FLOAT8_OPS_TABLE[op] = all_gather


# ---------------------------------------------------------------------------------------------- FSDP2

class PrecomputeFloat8Scales:
    """A step hook (training/hooks.py) of --fp8-param-gather: after each optimizer step, the FP8 scales of every
    weight FSDP2 all-gathers in FP8, at once: torchao's precompute_float8_dynamic_scale_for_fsdp (what torchtitan
    calls after its optimizer step), one all-reduce of all their amaxes per mesh, which each weight's FP8
    all-gather then uses instead of an all-reduce of its own amax. The scale is the one the all-gather would
    compute (max of the fp8 dtype / amax of the whole weight, as of this step's update); the first step's
    all-gathers, before any update, compute their own."""

    def __init__(self, groups: list[nn.ModuleList]):
        self.groups = groups  # the FP8-gathered linear layers, one list per weight mesh (one all-reduce each)

    def start_step(self, micro_batches: int) -> None:
        pass

    def end_step(self, device: torch.device) -> None:
        return None

    def after_optimizer_step(self) -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for group in self.groups:
            precompute_float8_dynamic_scale_for_fsdp(group)


def fp8_step_hooks(parts: list[nn.Module], cfg: FP8Config) -> list[PrecomputeFloat8Scales]:
    """The step hook of a run whose FSDP2 all-gathers linear weights in FP8 (--fp8-param-gather), else none. The
    layers are grouped by their weights' mesh (torchao stacks the amaxes of one call into one tensor: one mesh), in
    module order, the same on every rank of a mesh."""
    if cfg.fp8_format is None or not cfg.fp8_param_gather:
        return []
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    by_mesh: dict = {}
    seen: set[int] = set()
    for part in parts:
        for unit in (m for m in part.modules() if isinstance(m, FSDPModule)):  # weights FSDP2 gathers
            for m in unit.modules():
                if isinstance(m, Float8Linear) and id(m) not in seen and isinstance(m.weight, DTensor) and \
                        isinstance(m.weight._local_tensor, WeightWithDynamicFloat8CastTensor):
                    seen.add(id(m))
                    by_mesh.setdefault(m.weight.device_mesh, []).append(m)
    return [PrecomputeFloat8Scales([nn.ModuleList(ms) for ms in by_mesh.values()])] if by_mesh else []


def _scaled_mm_runs_on_cpu() -> bool:
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def device_errors(cfg: FP8Config) -> list[str]:
    """FP8 tensor cores: CUDA capability 8.9 (Ada) or 9.0 (Hopper) and later; on CPU, torch._scaled_mm."""
    if cfg.fp8_emulate:
        return []
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return [f"--fp8-format: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no FP8 "
                    "tensor cores (they need 8.9, Ada, or 9.0, Hopper); add --fp8-emulate for FP8 numerics at "
                    "high-precision speed"]
        return []
    if not _scaled_mm_runs_on_cpu():
        return [f"--fp8-format: this torch ({torch.__version__}) has no CPU torch._scaled_mm; add --fp8-emulate"]
    return []


def fp8_errors(cfg: Config, build_model: Callable[[], nn.Module] | None, trunk_modules: list[str]) -> list[str]:
    """The FP8 flags' rules, one message per broken rule. `build_model`: the run's model on the meta device
    (None: the model's flags are invalid, so only the rules that need no model are checked)."""
    f, m, p = cfg.fp8, cfg.model, cfg.parallel
    if f.fp8_format is None:
        defaults = FP8Config()
        return [f"--{k.replace('_', '-')} configures FP8 training: add --fp8-format e4m3 or hybrid"
                for k in ("fp8_recipe", "fp8_param_gather", "fp8_emulate", "first_last_layers_bf16")
                if getattr(f, k) != getattr(defaults, k)]
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return ["--fp8-format needs torchao's float8 training: pip install torchao"]
    e = []
    if f.fp8_param_gather and f.fp8_recipe != "tensorwise":
        e.append("--fp8-param-gather needs --fp8-recipe tensorwise: a rowwise weight has one scale per row, which "
                 "the shards of a row cannot agree on before the all-gather")
    e += device_errors(f)
    if build_model is None:
        return e
    model = build_model()
    bitlinear = [name for name, module in model.named_modules() if isinstance(module, BitLinear)]
    if bitlinear:
        e.append(f"--fp8-format: this model's linear layers are BitLinear ({bitlinear[0]}, ...: ternary weights times "
                 "int8 activations, already below FP8); drop --fp8-format")
        return e
    tp = p.tensor_model_parallel_size
    where = f" on each of the --tensor-model-parallel-size {tp} ranks" if tp > 1 else ""
    widths = [("--hidden-size", m.hidden_size), ("K/V width (--num-query-groups x head size)", m.kv_heads * m.head_dim)]
    if any(not m.is_moe_layer(i) for i in range(m.num_layers)):
        widths.append(("--ffn-hidden-size (the MLP width)", m.mlp_width))
    for name, width in widths:
        if width % (MULTIPLE * tp):
            e.append(f"--fp8-format: {name} {width} must be a multiple of {MULTIPLE * tp} (FP8 matmuls need every "
                     f"dimension a multiple of {MULTIPLE}{where})")
    # An MoE layer's tokens are split over the tensor-parallel ranks too (MH-MoE's projections see 1/tp of them).
    mh_moe = m.num_experts is not None and m.moe_num_heads > 1
    split = p.context_parallel_size * (tp if mh_moe else 1)
    tokens = cfg.training.micro_batch_size * m.seq_length // split
    if tokens % MULTIPLE:
        e.append(f"--fp8-format: a micro-batch holds {tokens} tokens per rank (--micro-batch-size x --seq-length / "
                 f"--context-parallel-size{' / --tensor-model-parallel-size in MH-MoE layers' if split > p.context_parallel_size else ''}); "
                 f"the weight-gradient matmul sums over them, so it must be a multiple of {MULTIPLE}")
    if f.first_last_layers_bf16 and (min(f.num_layers_at_start_in_bf16, f.num_layers_at_end_in_bf16) < 0 or
                                     f.num_layers_at_start_in_bf16 + f.num_layers_at_end_in_bf16 >= m.num_layers):
        e.append(f"--first-last-layers-bf16: --num-layers-at-start-in-bf16 {f.num_layers_at_start_in_bf16} and "
                 f"--num-layers-at-end-in-bf16 {f.num_layers_at_end_in_bf16} must be >= 0 and leave some of the "
                 f"{m.num_layers} layers in FP8")
    if not e and not select_modules(model, trunk_modules, f, tp)[0]:
        e.append("--fp8-format: no linear layer or MoE expert of this model can be FP8 "
                 "(see megalatent/distributed/fp8.py)")
    return e
