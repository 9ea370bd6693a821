"""Checkpoints: torch.distributed.checkpoint (DCP) in Megatron's directory layout, written atomically.

    <save>/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    <save>/run.lock                                the run that writes here (save_dir.py)
    <save>/iter_0000100/                            one checkpoint
        .metadata, __*_*.distcp                    model + optimizer, DCP, global parameter names
        train_state.pt                             iteration, consumed samples, scheduler, data position,
                                                   the model config (checked on load)
        rng/rank_00000.pt ...                      each rank's RNG states
        manifest.json                              every file's size and checksum, written last

A save goes to `iter_XXXXXXX.partial/`, which becomes `iter_XXXXXXX/` by one rename once every rank
has finished and the manifest is on disk; only then does the `latest` pointer move (again by rename).
A crash at any point therefore leaves the previous checkpoint intact and pointed to. A save that fails
(a full disk, a read-only or vanished directory) removes its partial directory and raises
CheckpointWriteError on every rank, naming the disk. Which checkpoint a run loads, and how a damaged one
is found and skipped: checkpoint_integrity.py.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from megalatent.distributed import checkpoint_integrity as integrity
from megalatent.distributed.checkpoint_integrity import (LATEST, MANIFEST, TRAIN_STATE, CheckpointError,  # noqa: F401
                                                         iteration_dir, iterations)
from megalatent.distributed.save_dir import describe_disk

FORMAT_VERSION = 2  # 2: optimizer state flattened by parameter name


class CheckpointWriteError(RuntimeError):
    """A save failed (full disk, read-only or vanished directory); its partial directory was removed."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn(message: str) -> None:
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Optimizer state keyed by parameter name ("state.layers.3.mlp.up_proj.weight.exp_avg"), not by position
# in one optimizer: the state of several model parts (pipeline stages) merges into one flat namespace
# that any other layout can load.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _part_state_dicts(parts: list[torch.nn.Module], optimizers: Optional[list[torch.optim.Optimizer]]):
    """[(model_sd, optim_sd or None)] for each part, with global names."""
    if optimizers is None:
        return [(get_model_state_dict(part, options=_OPTIONS), None) for part in parts]
    return [get_state_dict(part, opt, options=_OPTIONS) for part, opt in zip(parts, optimizers)]


def save_checkpoint(root: str, iteration: int, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
                    train_state: dict[str, Any]) -> str:
    """Collective: every rank calls it with its model parts (one, or its pipeline stages) and their
    optimizers. Returns the final checkpoint directory."""
    state = {"model": {}, "optim": {}}
    for model_sd, optim_sd in _part_state_dicts(parts, optimizers):
        state["model"].update(model_sd)
        state["optim"].update(optim_sd)
    return save_state_dicts(root, iteration, state, train_state, {_rank(): rng_state()})


def save_state_dicts(root: str, iteration: int, state: dict[str, Any], train_state: dict[str, Any],
                     rng_states: dict[int, dict[str, Any]]) -> str:
    """Write `state` ({"model": ..., "optim": ...} with global names) as checkpoint `iteration` under `root`.

    The one atomic save path: `save_checkpoint` calls it from a live model on every rank, and
    tools/convert_checkpoint.py from plain tensors in one process without a process group.
    `rng_states` maps a rank to its RNG states; each rank writes the ones it is given (a converter
    writes every rank's). Collective when a process group exists. Returns the final directory.
    Raises CheckpointWriteError on every rank if any rank's writes fail.
    """
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    algorithm = integrity.default_algorithm()
    rank = _rank()

    def prepare() -> None:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a save that crashed
            os.makedirs(os.path.join(partial, "rng"))

    def write_own_files(fs: integrity.HashingFileSystem) -> dict[str, str]:
        """The RNG states (each rank its own) and the train state (rank 0), hashed as they are written.
        Returns the checksums of every file this rank wrote, by path inside the checkpoint."""
        files = {os.path.join(partial, "rng", f"rank_{r:05d}.pt"): rng for r, rng in rng_states.items()}
        if rank == 0:
            files[os.path.join(partial, TRAIN_STATE)] = {**train_state, "iteration": iteration,
                                                          "format_version": FORMAT_VERSION}
        for path, obj in files.items():
            fs.checksums[os.path.abspath(path)] = integrity.write_file(path, integrity.torch_save_bytes(obj),
                                                                       algorithm)
        return {os.path.relpath(path, partial): digest for path, digest in fs.checksums.items()}

    def finish(checksums: dict[str, str]) -> None:
        if rank == 0:
            _fsync_write(os.path.join(partial, MANIFEST), integrity.manifest_bytes(partial, checksums, algorithm))
            if os.path.exists(final):  # re-saving an iteration (e.g. after a resume) replaces it
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(root)
            _fsync_write(os.path.join(root, LATEST), f"{iteration}\n".encode())

    _agreed(prepare, root, iteration, partial)
    fs = integrity.HashingFileSystem(algorithm)
    writer = FileSystemWriter(partial)
    writer.fs = fs  # DCP's writes go through it: each file's checksum is taken as it is written
    _agreed(lambda: dcp.save(state, storage_writer=writer, checkpoint_id=partial) and None, root, iteration, partial,
            fs.errors)
    checksums = {}
    for share in _agreed(lambda: write_own_files(fs), root, iteration, partial):
        checksums.update(share)
    _agreed(lambda: finish(checksums), root, iteration, partial)
    return final


def _write_failure(error: BaseException, io_errors: list[OSError]) -> str:
    """The I/O error under what DCP or torch.save raised, as one line."""
    if isinstance(error, CheckpointException):
        errors = [e for e, _ in error.failures.values()]
        error = next((e for e in errors if isinstance(e, OSError)), errors[0] if errors else error)
    if not isinstance(error, OSError) and io_errors:
        error = io_errors[0]
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _agreed(step: Callable[[], Any], root: str, iteration: int, partial: str,
            io_errors: Optional[list[OSError]] = None) -> list[Any]:
    """Run one step of a save on every rank; every rank's result, or, when any rank's step failed, the partial
    directory removed and CheckpointWriteError raised on every rank (so that none waits for the others)."""
    failure, result = None, None
    try:
        result = step()
    except (OSError, RuntimeError, CheckpointException) as e:
        failure = _write_failure(e, io_errors or [])
    outcomes = [(failure, result)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (failure, result))
    failed = [(r, f) for r, (f, _) in enumerate(outcomes) if f is not None]
    if not failed:
        return [r for _, r in outcomes]
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    rank, failure = failed[0]
    cleaned = (f"removed its partial directory {partial}" if not os.path.exists(partial) else
               f"could not remove its partial directory {partial}: delete it by hand")
    latest = integrity.iterations(root)
    raise CheckpointWriteError(
        f"saving checkpoint {iteration} to {root} failed on rank {rank}: {failure}, on {describe_disk(root)}; "
        f"{cleaned}. The checkpoints written before ({latest[-5:] or 'none'}) are untouched: free space or fix "
        f"the directory, then resume with --load {root}")


def verify(path: str) -> Optional[str]:
    """None if checkpoint `path` is complete and intact (every file's checksum), else what is wrong."""
    return integrity.verify(path)


def find_loadable(root: str) -> Optional[str]:
    """The newest intact checkpoint under `root` (one process); None when it holds no checkpoint at all.
    A damaged checkpoint is skipped with a WARNING; raises CheckpointError when --load's pointer names a
    missing iteration or every checkpoint is damaged."""
    return integrity.find_loadable(root, _warn)


def read_train_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, TRAIN_STATE), weights_only=False)


def load_checkpoint(path: str, parts: list[torch.nn.Module], optimizers: Optional[list[torch.optim.Optimizer]],
                    load_rng: bool = True) -> dict[str, Any]:
    """Collective. Loads weights (and optimizer state unless `optimizers` is None) into the live,
    already-parallelized model parts, whatever layout wrote the checkpoint. Returns the train state."""
    per_part = _part_state_dicts(parts, optimizers)
    state = {"model": {k: v for m, _ in per_part for k, v in m.items()}}
    if optimizers is not None:
        state["optim"] = {k: v for _, o in per_part for k, v in o.items()}
    dcp.load(state, checkpoint_id=path)  # fills tensors in place, replaces non-tensor values
    for i, (model_sd, optim_sd) in enumerate(per_part):
        model_sd = {k: state["model"][k] for k in model_sd}
        if optimizers is None:
            set_model_state_dict(parts[i], model_sd, options=_OPTIONS)
        else:
            set_state_dict(parts[i], optimizers[i], model_state_dict=model_sd,
                           optim_state_dict={k: state["optim"][k] for k in optim_sd}, options=_OPTIONS)
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_train_state(path)
