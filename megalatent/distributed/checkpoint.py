"""Checkpoints: torch.distributed.checkpoint (DCP) in Megatron's directory layout, written atomically.

    <save>/latest_checkpointed_iteration.txt      the iteration of the newest complete checkpoint
    <save>/iter_0000100/                            one checkpoint
        .metadata, __*_*.distcp                    model + optimizer, DCP, global parameter names
        train_state.pt                             iteration, consumed samples, scheduler, data position,
                                                   the model config (checked on load)
        rng/rank_00000.pt ...                      each rank's RNG states
        manifest.json                              every file's size, written last

A save goes to `iter_XXXXXXX.partial/`, which becomes `iter_XXXXXXX/` by one rename once every rank
has finished and the manifest is on disk; only then does the `latest` pointer move (again by rename).
A crash at any point therefore leaves the previous checkpoint intact and pointed to. On load, a
checkpoint whose files do not match its manifest (truncated, missing) is reported and skipped in
favour of the newest earlier one that is complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: optimizer state flattened by parameter name
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


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
    """
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a save that crashed
        os.makedirs(os.path.join(partial, "rng"))
    _barrier()

    dcp.save(state, checkpoint_id=partial)
    for rank, rng in rng_states.items():
        torch.save(rng, os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    if _rank() == 0:
        torch.save({**train_state, "iteration": iteration, "format_version": FORMAT_VERSION},
                   os.path.join(partial, "train_state.pt"))
    _barrier()

    if _rank() == 0:
        files = {}
        for dirpath, _, names in os.walk(partial):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[os.path.relpath(path, partial)] = os.path.getsize(path)
        _fsync_write(os.path.join(partial, MANIFEST), json.dumps({"files": files}, indent=1).encode())
        if os.path.exists(final):  # re-saving an iteration (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        _fsync_write(os.path.join(root, LATEST), f"{iteration}\n".encode())
    _barrier()
    return final


def verify(path: str) -> Optional[str]:
    """None if the checkpoint at `path` is complete, else what is wrong with it."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return "no manifest (the save did not finish)"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        actual = os.path.getsize(full)
        if actual != size:
            return f"file {rel} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def find_loadable(root: str) -> Optional[str]:
    """The newest complete checkpoint under `root`: the `latest` one, else the newest earlier one."""
    if not os.path.isdir(root):
        return None
    iterations = sorted((int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m), reverse=True)
    latest = None
    try:
        with open(os.path.join(root, LATEST)) as f:
            latest = int(f.read().strip())
    except (OSError, ValueError):
        pass
    # The pointer wins when it is valid; later directories without it are saves it never confirmed.
    order = ([latest] if latest in iterations else []) + [i for i in iterations if latest is None or i < latest]
    for it in order:
        path = iteration_dir(root, it)
        problem = verify(path)
        if problem is None:
            return path
        print(f"WARNING: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def read_train_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, "train_state.pt"), weights_only=False)


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
