"""Checkpoint conversion: our DCP checkpoints <-> one plain torch file, and reading checkpoints without a
process group (the Hugging Face conversions, hf.py, and the packed export, packed.py, build on these).

tools/convert_checkpoint.py is the command line over these functions:

    to_torch   iter_XXXXXXX/ (DCP, any number of ranks)  ->  FILE.pt = {"model", "optim", "train_state", "rng"}
    from_torch FILE.pt  ->  a complete checkpoint (manifest, `latest` pointer, atomic) the trainer resumes from

The torch file is for people who want to look at or edit weights with nothing but `torch.load` (no
process group, no megalatent): every value in it is a tensor or a plain Python value, so it loads
under torch's default `weights_only=True` (Megatron's pickled `argparse.Namespace` is what broke
for its users when torch 2.6 changed that default). Everything is read into CPU memory at once,
which is the point of the format and also its limit: convert on a machine with RAM for the model
and the optimizer state (about 16 bytes per parameter).

Every problem a user can cause (no checkpoint where they pointed, an output that exists, a model the
export cannot express) raises `ConvertError` with a message that names the problem and the fix.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
# The same two pieces the public `format_utils.dcp_to_torch_save` is made of; calling them directly
# reads the checkpoint into memory without the intermediate file that function insists on writing.
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from megalatent.config import ModelConfig
from megalatent.distributed import checkpoint as ckpt
from megalatent.families import build_model, model_config_from_saved

Log = Callable[[str], None]


class ConvertError(Exception):
    """A conversion refused because of its inputs; the message says what is wrong and how to fix it."""


@contextlib.contextmanager
def _single_process():
    """DCP warns on every call without a process group; here that is the intent, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# ------------------------------------------------------------------------------------------ reading

def _iterations(root: str) -> list[int]:
    return ckpt.iterations(root)


def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> str:
    """The checkpoint directory to read: iteration `iteration` under `load`, else the newest complete one."""
    if not os.path.isdir(load):
        raise ConvertError(f"--load {load}: no such directory; give the --save directory of a training run")
    if iteration is None:
        try:
            path = ckpt.find_loadable(load)
        except ckpt.CheckpointError as e:  # a pointer to a missing iteration, or every checkpoint damaged
            raise ConvertError(f"--load {load}: {e}") from None
        if path is None:
            raise ConvertError(f"--load {load}: no complete checkpoint: it holds no iter_XXXXXXX/ directory; give "
                               "the --save directory of a run that saved one")
        return path
    path = ckpt.iteration_dir(load, iteration)
    if not os.path.isdir(path):
        raise ConvertError(f"--load {load} has no checkpoint of iteration {iteration}; it has iterations "
                           f"{_iterations(load)}: pick one with --iteration, or leave it out for the newest")
    problem = ckpt.verify(path)
    if problem is not None:
        raise ConvertError(f"checkpoint {path} is incomplete ({problem}); pick another --iteration or "
                           "leave it out for the newest complete one")
    return path


def read_state(path: str, keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """The DCP part of checkpoint `path` as full CPU tensors: {"model": ..., "optim": ...}, or only `keys`.

    Works whatever number of ranks and whichever sharding wrote it, and needs no process group.
    """
    state: dict[str, Any] = {}
    with _single_process():
        _load_state_dict(state, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys=set(keys) if keys is not None else None),
                         no_dist=True)
    return state


def read_rng_states(path: str) -> dict[int, dict[str, Any]]:
    """Every rank's RNG states saved in checkpoint `path` (rank -> states)."""
    rng_dir = os.path.join(path, "rng")
    names = os.listdir(rng_dir) if os.path.isdir(rng_dir) else []
    return {int(m.group(1)): torch.load(os.path.join(rng_dir, m.group(0)), weights_only=False)
            for m in map(re.compile(r"^rank_(\d+)\.pt$").match, sorted(names)) if m}


def model_config(train_state: dict[str, Any]) -> ModelConfig:
    """The ModelConfig (its family's class) a checkpoint was written by: its train state records it as a
    dict. Older checkpoints recorded every family's fields, and some values at the top of the train state:
    both still read."""
    saved = train_state.get("model_config")
    if not isinstance(saved, dict):
        raise ConvertError("the train state has no model_config; it was not written by megalatent-pretrain "
                           "or tools/convert_checkpoint.py to-torch")
    cfg, problems = model_config_from_saved(saved, fallback=train_state)
    if problems:
        raise ConvertError(f"the checkpoint's model_config does not fit this megalatent ({'; '.join(problems)}): "
                           "it was written by another version; convert it with that version")
    return cfg


# The RNG states hold numpy's Mersenne-Twister key as an ndarray, which torch's default
# weights_only unpickler refuses; in the torch file it is a tensor instead.

def _rng_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, key, *rest = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest)}


def _rng_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, key, *rest = state["numpy"]
    return {**state, "numpy": (name, key.numpy().astype(np.uint32), *rest)}


def _check_output(path: str, force: bool, what: str) -> None:
    """Refuse to overwrite `path` (a file, or a non-empty directory) unless --force."""
    if not force and (os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))):
        raise ConvertError(f"{what} {path} already exists; pass --force to replace it, or choose another path")


# ------------------------------------------------------------------------------ one torch file

def to_torch(load: str, output: str, iteration: Optional[int] = None, force: bool = False,
             log: Log = print) -> str:
    """Write checkpoint (`load`, `iteration`) as one torch file; returns the checkpoint it read."""
    if os.path.isdir(output):
        raise ConvertError(f"--output {output} is a directory; give the path of the .pt file to write")
    path = resolve_checkpoint(load, iteration)
    _check_output(output, force, "--output")
    log(f"reading {path}")
    state = read_state(path)
    state["train_state"] = ckpt.read_train_state(path)
    state["rng"] = {rank: _rng_to_plain(s) for rank, s in read_rng_states(path).items()}
    n = sum(t.numel() for t in state["model"].values())
    log(f"writing {output} ({n:,} parameters, iteration {state['train_state']['iteration']})")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"  # a crash leaves no half-written file under the real name
    torch.save(state, tmp)
    os.replace(tmp, output)
    return path


def _shape_problems(cfg: ModelConfig, model_sd: dict[str, torch.Tensor]) -> list[str]:
    """How `model_sd` differs from what the model of `cfg` holds (names and shapes), checked on the
    meta device so nothing is allocated. Catches a hand-edited file before training does."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in model_sd]
    problems += [f"unexpected {k}" for k in model_sd if k not in expected]
    problems += [f"{k} has shape {tuple(model_sd[k].shape)}, the model needs {shape}"
                 for k, shape in expected.items() if k in model_sd and tuple(model_sd[k].shape) != shape]
    return problems


def check_save_dir(save: str, force: bool) -> None:
    """A conversion's --save: a directory, new or without checkpoints (unless forced: the converted one would
    become the one a resume picks)."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConvertError(f"--save {save} is a file; give a directory (new, or one to add a checkpoint to)")
    if os.path.isdir(save) and _iterations(save) and not force:
        raise ConvertError(f"--save {save} already holds checkpoints {_iterations(save)}; the converted one "
                           "would become the one a resume picks. Pass --force to write it there anyway, or "
                           "choose an empty directory")


def from_torch(input: str, save: str, iteration: Optional[int] = None, force: bool = False,
               log: Log = print) -> str:
    """Write the torch file `input` (as to_torch writes it) as a checkpoint under `save`; returns its path.

    Goes through `checkpoint.save_state_dicts`, the trainer's own atomic save, so the result has the
    manifest and the `latest` pointer and `megalatent-pretrain --load save` resumes from it.
    """
    if not os.path.isfile(input):
        raise ConvertError(f"--input {input}: no such file")
    check_save_dir(save, force)
    log(f"reading {input}")
    try:
        data = torch.load(input, weights_only=True)
    except Exception as e:
        # torch's message is a page of advice; the line naming what it refused is what the user needs.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line),
                      lines[0] if lines else type(e).__name__)
        raise ConvertError(f"--input {input} is not a torch file of plain tensors and values ({detail}); "
                           "write it with tools/convert_checkpoint.py to-torch") from None
    missing = [k for k in ("model", "train_state") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConvertError(f"--input {input} has no {' or '.join(missing)} entry; it needs "
                           "{'model', 'optim', 'train_state'} as tools/convert_checkpoint.py to-torch writes")
    train_state = dict(data["train_state"])
    version = train_state.get("format_version")
    if version != ckpt.FORMAT_VERSION:
        raise ConvertError(f"--input {input} comes from a checkpoint of format version {version}, and this "
                           f"megalatent writes version {ckpt.FORMAT_VERSION} (the optimizer state is laid out "
                           "differently): convert it back with the megalatent that wrote it, or delete its "
                           "'optim' entry and resume with --no-load-optim")
    problems = _shape_problems(model_config(train_state), data["model"])
    if problems:
        raise ConvertError(f"--input {input}: the weights do not fit the model its train_state.model_config "
                           f"describes: {'; '.join(problems[:8])}" + (" ..." if len(problems) > 8 else ""))
    iteration = iteration if iteration is not None else train_state.get("iteration")
    if iteration is None:
        raise ConvertError(f"--input {input}: its train_state has no iteration; give one with --iteration")
    state = {"model": data["model"]}
    if "optim" in data:
        state["optim"] = data["optim"]
    else:
        train_state["weights_only"] = True  # the trainer loads it with a fresh optimizer
        log("the file has no optimizer state: the checkpoint holds weights only (a run resumes it with a fresh "
            "optimizer)")
    for key in ("iteration", "format_version"):  # the save writes them
        train_state.pop(key, None)
    rng = {int(rank): _rng_from_plain(s) for rank, s in data.get("rng", {}).items()}
    log(f"writing iteration {iteration} to {save}")
    with _single_process():
        return ckpt.save_state_dicts(save, int(iteration), state, train_state, rng)
