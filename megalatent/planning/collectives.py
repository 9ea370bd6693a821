"""What a rank's collectives move: every c10d and functional collective it issues, with its group and bytes.

`CollectiveRecorder` is a TorchDispatchMode over the c10d operators (torch.distributed's all_reduce,
all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, send/recv, ...) and the functional ones
that DTensor issues (_c10d_functional). It sees a DTensor's collectives after DTensor has desugared them
into operations on local tensors (and those of other wrapper subclasses, e.g. torchao's FP8 tensors, after they
have: their 1-byte data), so what it records is what the rank sends. The same recorder runs around
a real (gloo) step in the tests, which is how the planner's numbers are checked against real collectives.

The bytes of a call (`Transfer.bytes`) are its payload as the collective's API states it: all-reduce,
broadcast and send/recv the tensor; all-gather the gathered output; reduce-scatter the full input;
all-to-all what this rank sends. What crosses the wire per rank follows from the algorithm (estimate.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup, _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type

c10d, functional, functional_autograd = torch.ops.c10d, torch.ops._c10d_functional, torch.ops._c10d_functional_autograd


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _boxed(index):
    return lambda args: ProcessGroup.unbox(args[index])


def _named(index):
    return lambda args: _resolve_process_group(args[index])


# operator -> (kind, its process group from the arguments, payload bytes from (args, result))
_OPS = {
    c10d.allreduce_.default: ("all_reduce", _boxed(1), lambda a, r: _nbytes(a[0])),
    c10d.allreduce_coalesced_.default: ("all_reduce", _boxed(1), lambda a, r: _nbytes(a[0])),
    c10d.broadcast_.default: ("broadcast", _boxed(1), lambda a, r: _nbytes(a[0])),
    c10d.allgather_.default: ("all_gather", _boxed(2), lambda a, r: _nbytes([t for ts in a[0] for t in ts])),
    c10d._allgather_base_.default: ("all_gather", _boxed(2), lambda a, r: _nbytes(a[0])),
    c10d.allgather_into_tensor_coalesced_.default: ("all_gather", _boxed(2), lambda a, r: _nbytes(a[0])),
    c10d.reduce_scatter_.default: ("reduce_scatter", _boxed(2), lambda a, r: _nbytes([t for ts in a[1] for t in ts])),
    c10d._reduce_scatter_base_.default: ("reduce_scatter", _boxed(2), lambda a, r: _nbytes(a[1])),
    c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", _boxed(2), lambda a, r: _nbytes(a[1])),
    c10d.alltoall_base_.default: ("all_to_all", _boxed(2), lambda a, r: _nbytes(a[1])),
    c10d.alltoall_.default: ("all_to_all", _boxed(2), lambda a, r: _nbytes(a[1])),
    c10d.send.default: ("send", _boxed(1), lambda a, r: _nbytes(a[0])),
    c10d.recv_.default: ("recv", _boxed(1), lambda a, r: _nbytes(a[0])),
    functional.all_reduce.default: ("all_reduce", _named(2), lambda a, r: _nbytes(a[0])),
    functional.all_reduce_.default: ("all_reduce", _named(2), lambda a, r: _nbytes(a[0])),
    functional.all_reduce_coalesced.default: ("all_reduce", _named(2), lambda a, r: _nbytes(a[0])),
    functional.broadcast.default: ("broadcast", _named(2), lambda a, r: _nbytes(a[0])),
    functional.all_gather_into_tensor.default: ("all_gather", _named(2), lambda a, r: _nbytes(r)),
    functional.all_gather_into_tensor_coalesced.default: ("all_gather", _named(2), lambda a, r: _nbytes(r)),
    functional_autograd.all_gather_into_tensor.default: ("all_gather", _named(2), lambda a, r: _nbytes(r)),
    functional.reduce_scatter_tensor.default: ("reduce_scatter", _named(3), lambda a, r: _nbytes(a[0])),
    functional.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", _named(3), lambda a, r: _nbytes(a[0])),
    functional_autograd.reduce_scatter_tensor.default: ("reduce_scatter", _named(3), lambda a, r: _nbytes(a[0])),
    functional.all_to_all_single.default: ("all_to_all", _named(3), lambda a, r: _nbytes(a[0])),
    functional_autograd.all_to_all_single.default: ("all_to_all", _named(3), lambda a, r: _nbytes(a[0])),
}


@dataclass(frozen=True)
class Transfer:
    """One collective call of this rank."""
    kind: str                # all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send, recv
    ranks: tuple[int, ...]   # the global ranks of its group
    bytes: float             # payload (see the module doc; a mean over calls when extrapolated: depth.py)
    group: str = ""          # its process group's name (the simulation's reports: the mesh dims it spans)
    fsdp: bool = False       # issued by FSDP (its gathers and reductions run on streams of their own)


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective issued inside it (in `transfers`, in order)."""

    def __init__(self):
        super().__init__()
        self.transfers: list[Transfer] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) or is_traceable_wrapper_subclass_type(t) for t in types):
            # Let a tensor subclass that holds tensors desugar into collectives of those, which come back here:
            # DTensor's of its local shards, torchao's FP8 tensors' of their 1-byte data (a Float8TrainingTensor
            # presents its high-precision dtype).
            return NotImplemented
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        spec = _OPS.get(func)
        if spec is not None:
            kind, group_of, payload = spec
            group = group_of(args)
            self.transfers.append(Transfer(kind, tuple(dist.get_process_group_ranks(group)), payload(args, result),
                                           group.group_name, _issued_by_fsdp()))
        return result


def _issued_by_fsdp() -> bool:
    """Whether FSDP's code is on the call stack (its collectives run from its hooks)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.fsdp"):
            return True
        frame = frame.f_back
    return False
