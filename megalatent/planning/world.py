"""The simulated world: one rank of a job of any size, run in this process on fake tensors.

What is simulated and how:

- Process groups: torch's fake backend (`FakeProcessGroup`: every collective returns at once and moves
  nothing) for every group of the job, so the real mesh, DTensor plans, FSDP2 and our collectives run at
  the full world size. The one exception is the pipeline group when the pipeline ranks of one
  (dp, cp, tp) coordinate are simulated together, one process each (planning/workers.py): pipelining's
  set-up messages between stages (its vote on shape inference, the stages' output shapes) are values the
  schedule reads, so they travel for real over gloo between those processes (`control_exchanges`).
- FSDP at the full world size, with one shortcut: the ranks past a parameter's rows share one empty chunk
  (`_chunk_with_one_empty`), the same shards made faster.
- Tensors: FakeTensorMode on the CPU device (torch's CPU build cannot run autograd on fake CUDA
  tensors). What a GPU run would do differently is set by the planner (planning/hardware.py): bf16
  autocast and bf16 FSDP all-gathers, the attention kernels, fused AdamW, flash attention.
- Values the program reads (`ValueModel`): tensors that were real before the simulation started (the
  mesh's rank tables, the pipeline's control messages) stay real; the MoE layers' counts of tokens per
  expert (nn/moe.tokens_per_expert) are the balanced counts, real (the assumption the planner states);
  collectives of real tensors over a fake group return what they would if every rank held this rank's
  values. Any other read of a fake value, or an operator whose output shape depends on fake values, stops
  the simulation with torch's error.
- torch's own quirks under fake tensors, handled in `fake_tensors`: DTensor's shape inference, CausalBias.
- The world is torn down on exit, DTensor's sharding caches (which name its groups) cleared with it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import uuid
import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import FakeProcessGroup, ProcessGroup
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.fsdp._fully_shard import _fsdp_param as fsdp_param
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.nn.attention.bias import CausalBias
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from megalatent.nn import moe

# Registers fake implementations of the c10d operators (torch.distributed._tools uses them the same way).
import torch.distributed._tools.fake_collectives  # noqa: F401

aten, c10d = torch.ops.aten, torch.ops.c10d

# Operators on real tensors over a fake group whose result `ValueModel` gives as if every member held this
# rank's values (the only ones the simulated programs issue on real tensors: MoE token counts, statistics).
_SYMMETRIC_COLLECTIVES = {c10d.alltoall_base_.default, c10d.allreduce_.default, c10d._allgather_base_.default,
                          c10d.broadcast_.default}


def balanced_counts(assignments: int, bins: int) -> torch.Tensor:
    """`assignments` spread as evenly as possible over `bins` (the first `assignments % bins` get one more)."""
    base, extra = divmod(assignments, bins)
    return torch.tensor([base + (i < extra) for i in range(bins)], dtype=torch.int64)


class ValueModel(TorchDispatchMode):
    """The values a simulated rank may read, between the program and FakeTensorMode (see the module doc).

    `placeholder_reads` (a context): reads of fake values give 0 instead of an error. The planner's step uses
    it around the step hooks' logging statistics only, whose values nobody reads in a simulation but whose
    collectives are part of the step."""

    def __init__(self):
        super().__init__()
        self._placeholders = False

    @contextlib.contextmanager
    def placeholder_reads(self) -> Iterator[None]:
        self._placeholders, before = True, self._placeholders
        try:
            yield
        finally:
            self._placeholders = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if FakeTensor not in types:  # (the dispatcher lists the type of every tensor argument: none is fake)
            tensors = tensors_in(args, kwargs)
            # Meta tensors (a model before it is allocated) are shapes, like fake ones: FakeTensorMode takes them.
            if tensors and not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
                if func in _SYMMETRIC_COLLECTIVES and _is_fake_group(func, args):
                    return _symmetric_collective(func, args, kwargs)
                with _disable_current_modes():  # real in, real out: bookkeeping the program computes
                    return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default and self._placeholders:
            return False if args[0].dtype is torch.bool else 0
        return func(*args, **kwargs)


def tensors_in(*trees) -> list[torch.Tensor]:
    """The tensors of an operator's arguments or result (tensors in tuples, lists and dicts, in no particular
    order): pytree's flatten without its generality, which cost more than many of the operators it served."""
    found, pending = [], list(trees)
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return found


def _group(func, args) -> ProcessGroup:
    """The process group of one of the _SYMMETRIC_COLLECTIVES (its argument's position differs by operator)."""
    return ProcessGroup.unbox(args[1 if func in (c10d.allreduce_.default, c10d.broadcast_.default) else 2])


def _is_fake_group(func, args) -> bool:
    return isinstance(_group(func, args)._get_backend(torch.device("cpu")), FakeProcessGroup)


def _symmetric_collective(func, args, kwargs):
    """Run the (no-op) collective, then give its output the value it has when every rank holds ours."""
    with _disable_current_modes():
        result = func(*args, **kwargs)
        group = _group(func, args)
        size, rank = group.size(), group.rank()
        if func is c10d.alltoall_base_.default:
            output, inp, _, out_splits, in_splits = args[:5]
            if out_splits or in_splits:
                raise NotImplementedError("simulated all-to-all of real tensors with uneven splits")
            # Every rank sends us its chunk `rank`, which equals our own chunk `rank`.
            output.copy_(inp.chunk(size)[rank].repeat((size,) + (1,) * (inp.dim() - 1)))
        elif func is c10d.allreduce_.default:
            op = args[2].op()  # the boxed ReduceOp's code
            if op == int(dist.ReduceOp.SUM):
                for t in args[0]:
                    t.mul_(size)
            elif op not in (int(dist.ReduceOp.MAX), int(dist.ReduceOp.MIN), int(dist.ReduceOp.AVG)):
                raise NotImplementedError(f"simulated all-reduce of real tensors with reduce op {op}")
        elif func is c10d._allgather_base_.default:
            output, inp = args[0], args[1]
            output.copy_(inp.repeat((size,) + (1,) * (inp.dim() - 1)).view_as(output))
        return result


_DEVICE = torch.ops.prim.device.default
# Queries of a tensor's metadata: the most frequent operators by far (`.device` of a FakeTensor dispatches),
# answered by the tensor itself, with no tensor out and nothing for a tracker to see.
_METADATA = {_DEVICE, aten.size.default, aten.sym_size.int, aten.stride.default,
             aten.sym_stride.int, aten.storage_offset.default, aten.sym_storage_offset.default,
             aten.numel.default, aten.sym_numel.default, aten.dim.default, aten.is_contiguous.default,
             aten.is_contiguous.memory_format, aten.is_strides_like_format.default,
             aten.is_non_overlapping_and_dense.default, torch.ops.prim.layout.default}


class MetadataFastPath(TorchDispatchMode):
    """The innermost mode of a simulation: metadata queries skip every other mode (see _METADATA). A fake
    tensor's `.device`, most of them (autograd's engine asks it of every tensor it handles), is answered here
    as FakeTensor answers it, without leaving and re-entering the modes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and isinstance(args[0], FakeTensor) and not args[0].fake_mode.in_kernel_invocation:
            return args[0].fake_device
        if func in _METADATA:
            with _disable_current_modes():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_tensors() -> Iterator[ValueModel]:
    """Fake tensors with the value model; yields the ValueModel (for `placeholder_reads`).

    DTensor infers an operator's output shape by running it on fake tensors of the global shapes, in the fake
    mode it finds active: in a simulation that is ours, where the trackers would count those global-size
    tensors as the rank's. As in a real run, it gets a fake mode of its own, outside every mode of ours.
    torch's CausalBias (SDPA's lower-right causal mask) is a tensor subclass whose constructor makes an
    uninitialised tensor of [variant, queries, keys] elements (on the host, never read), which FakeTensorMode
    would make a FakeTensor that cannot become a CausalBias: here it is made outside the modes, on the meta
    device."""
    values = ValueModel()
    propagator = ShardingPropagator._propagate_tensor_meta_non_cached

    @functools.wraps(propagator)
    def outside_our_modes(self, op_schema):
        with _disable_current_modes():
            return propagator(self, op_schema)

    def causal_bias(cls, variant, seq_len_q, seq_len_kv):
        with _disable_current_modes():
            return torch.Tensor._make_subclass(cls, torch.empty((variant, seq_len_q, seq_len_kv), device="meta"))

    def balanced(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
        with _disable_current_modes():  # a real tensor: the program reads it (expert parallelism's splits)
            return balanced_counts(experts.numel(), num_experts).to(experts.device)

    own_new = CausalBias.__dict__.get("__new__")  # None: it inherits torch.Tensor's
    routed = moe.tokens_per_expert
    ShardingPropagator._propagate_tensor_meta_non_cached = outside_our_modes
    CausalBias.__new__ = causal_bias
    moe.tokens_per_expert = balanced
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), values:
            yield values
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = propagator
        moe.tokens_per_expert = routed
        if own_new is None:
            del CausalBias.__new__
        else:
            CausalBias.__new__ = own_new


def _create_backend(pipeline_ranks: tuple[int, ...], store_path: Optional[str], common, backend_options):
    """A group's backend: gloo between the processes simulating one pipeline column (its pipeline group),
    the fake backend for every other group."""
    ranks = tuple(common.global_ranks_in_group) or tuple(range(common.group_size))  # empty: the default group
    if store_path is not None and ranks == pipeline_ranks:
        # The same ranks may form several groups (the mesh's, the tied embedding's): each its own keys.
        store = dist.PrefixStore(f"{common.group_id}/", dist.FileStore(store_path, len(ranks)))
        return dist.ProcessGroupGloo(store, common.group_rank, common.group_size, timeout=common.timeout)
    return FakeProcessGroup._create_internal(common.group_rank, common.group_size, backend_options)


def _chunk_with_one_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> list[torch.Tensor]:
    """FSDP's split of a parameter into one chunk per rank, the ranks past its rows given one empty tensor
    between them rather than one each: the same shards, but at 16,384 ranks a few fake tensors instead of
    half a million (each made in Python), which took most of a simulation's time."""
    chunks = list(torch.chunk(tensor, num_chunks, dim=dim))
    if len(chunks) < num_chunks:
        chunks += [chunks[0].new_empty(0)] * (num_chunks - len(chunks))
    return chunks


@contextlib.contextmanager
def simulated_world(rank: int, world_size: int, pipeline_ranks: tuple[int, ...] = (),
                    store_path: Optional[str] = None) -> Iterator[None]:
    """torch.distributed initialised as global rank `rank` of `world_size`, every group fake; with
    `store_path`, the group of `pipeline_ranks` (each simulated by its own process, rendezvous through that
    file) is real gloo. Torn down on exit, so that one process can simulate several ranks in turn."""
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; the planner needs its own")
    name = f"megalatent_sim_{uuid.uuid4().hex[:12]}"
    dist.Backend.register_backend(name, functools.partial(_create_backend, pipeline_ranks, store_path),
                                  extended_api=True, devices=["cpu"])
    dist.init_process_group(name, store=FakeStore(), rank=rank, world_size=world_size)
    chunk_with_empty = fsdp_param._chunk_with_empty
    fsdp_param._chunk_with_empty = _chunk_with_one_empty
    try:
        yield
    finally:
        fsdp_param._chunk_with_empty = chunk_with_empty
        dist.destroy_process_group()
        # DTensor caches its sharding decisions by mesh shape and names, which the next simulated world's
        # mesh shares; the cached decisions name this world's process groups, gone now.
        _clear_sharding_prop_cache()


@contextlib.contextmanager
def run_logs_silenced() -> Iterator[None]:
    """The simulated run's own prints and warnings (its layout, its parameter count, deprecations) are not the
    simulation's output."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def control_exchanges() -> Iterator[None]:
    """Pipelining's set-up messages run on real tensors (see the module doc): its vote on shape inference
    and its metadata objects. They are control, not data: the simulation's trackers do not count them, and
    a steady-state step of a real run does not send them either."""
    from torch.distributed.pipelining import stage as pipeline_stage

    def real(fn):
        @functools.wraps(fn)
        def run_real(*args, **kwargs):
            with _disable_current_modes():
                return fn(*args, **kwargs)
        return run_real

    patched = [(pipeline_stage.PipelineStage, "_warmup_forward_vote"),
               (pipeline_stage.PipelineStage, "_warmup_backward_result"),
               (dist, "send_object_list"), (dist, "recv_object_list")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in patched]
    for owner, attr, fn in saved:
        setattr(owner, attr, real(fn))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
