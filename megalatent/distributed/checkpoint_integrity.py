"""Checkpoint integrity: a checksum of every file, a manifest that lists them all, and which checkpoint to load.

A checkpoint directory ends its save with `manifest.json`, written after every other file and before the
directory gets its final name (checkpoint.py). It lists every file with its size and checksum:

    {"format": "megalatent-checkpoint-manifest", "version": 2, "checksum": "xxh3_64",
     "files": {"__0_0.distcp": {"bytes": 17712764, "xxh3_64": "5e0b..."}, ".metadata": {...}, ...}}

The checksum is xxhash's xxh3_64 (several GB/s), or zlib's crc32 where xxhash is not installed. It is
computed while the files are written: DCP writes through `HashingFileSystem`, the trainer's own files
through `write_file`; only a file that neither saw (none today) is hashed from disk before the manifest.
Manifests of version 1 (before checksums) list sizes only and are checked for those.

Loading picks the checkpoint in two steps:
  `candidates(root)`   every rank, before the process group: the pointer's checkpoint and the older ones, newest
                       first, that pass the cheap checks (manifest readable, every file present with its size,
                       the small files' checksums: train state and DCP's .metadata, whose shard files must all be
                       in the manifest). Raises CheckpointError when --load's pointer names a missing iteration or
                       when no checkpoint passes; returns [] when the directory holds no checkpoint at all.
  `first_intact(paths)` collective: every remaining checksum, the files shared out over the ranks; the first
                       checkpoint every rank finds intact, agreed by all ranks. A damaged one is skipped with a
                       WARNING naming the file.
"""
from __future__ import annotations

import io
import json
import os
import re
import zlib
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megalatent-checkpoint-manifest"
MANIFEST_VERSION = 2  # 1: {"files": {name: bytes}}; 2: sizes and checksums
TRAIN_STATE = "train_state.pt"
DCP_METADATA = ".metadata"
ITER_DIR = re.compile(r"^iter_(\d{7})$")
_CHUNK = 8 << 20


class CheckpointError(Exception):
    """No checkpoint can be loaded from a directory; the message names the damaged file and the fix."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iterations(root: str) -> list[int]:
    """The iterations that have a directory under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(root)) if m)


# ------------------------------------------------------------------------------------------------ checksums

class _Crc32:
    """zlib's crc32 with hashlib's interface: the fallback when xxhash is not installed."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401
        return "xxh3_64"
    except ImportError:
        return "crc32"


def new_hasher(algorithm: str):
    if algorithm == "xxh3_64":
        import xxhash
        return xxhash.xxh3_64()
    if algorithm == "crc32":
        return _Crc32()
    raise CheckpointError(f"checksum algorithm {algorithm!r} is unknown here (xxh3_64 needs `pip install xxhash`)")


def file_checksum(path: str, algorithm: str) -> str:
    hasher, buffer = new_hasher(algorithm), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


class _HashingStream:
    """A file opened for writing that hashes what goes through it (DCP and pickle only append: no seeks).
    A write error is kept in `errors`: torch.save's C++ writer turns it into "unexpected pos ..."."""

    def __init__(self, stream, hasher, errors: list):
        self._stream, self._hasher, self._errors = stream, hasher, errors

    def write(self, data) -> int:
        self._hasher.update(data)
        try:
            return self._stream.write(data)
        except OSError as e:
            self._errors.append(e)
            raise

    def __getattr__(self, name):  # tell, flush, fileno (DCP fsyncs), close
        return getattr(self._stream, name)


class HashingFileSystem(FileSystem):
    """DCP's file system, recording a checksum of each file as it is written: {absolute path: checksum}."""

    def __init__(self, algorithm: str):
        super().__init__()
        self.algorithm = algorithm
        self.checksums: dict[str, str] = {}
        self.errors: list[OSError] = []  # what the file system refused (ENOSPC, EROFS, ...)

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream, new_hasher(self.algorithm), self.errors)
            yield hashing
        self.checksums[os.path.abspath(path)] = hashing._hasher.hexdigest()

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name
        super().rename(path, new_path)
        digest = self.checksums.pop(os.path.abspath(path), None)
        if digest is not None:
            self.checksums[os.path.abspath(new_path)] = digest


def write_file(path: str, data: bytes, algorithm: str) -> str:
    """Write `data` to `path` (fsynced) and return its checksum."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ manifest

def manifest_bytes(directory: str, checksums: dict[str, str], algorithm: str) -> bytes:
    """The manifest of every file under `directory`, with the checksums recorded while writing ({path inside
    `directory`: checksum}); a file without one is hashed now."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory)
            digest = checksums.get(rel) or file_checksum(path, algorithm)
            files[rel] = {"bytes": os.path.getsize(path), algorithm: digest}
    return json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "checksum": algorithm,
                       "files": files}, indent=1).encode()


def read_manifest(path: str) -> tuple[dict[str, tuple[int, Optional[str]]], Optional[str]]:
    """({file: (bytes, checksum or None)}, algorithm or None) of checkpoint `path`. Raises ValueError."""
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    algorithm = manifest.get("checksum")
    files = {}
    for name, entry in manifest["files"].items():
        if isinstance(entry, int):  # version 1: sizes only
            files[name] = (entry, None)
        else:
            files[name] = (int(entry["bytes"]), entry[algorithm])
    return files, algorithm


def _file_problem(path: str, name: str, size: int, digest: Optional[str], algorithm: Optional[str]) -> Optional[str]:
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        return f"{full} is missing"
    actual = os.path.getsize(full)
    if actual != size:
        return f"{full} has {actual} bytes, its manifest says {size} (truncated or overwritten)"
    if digest is not None and file_checksum(full, algorithm) != digest:
        return f"{full} does not match its {algorithm} checksum in {MANIFEST} (its bytes changed on disk)"
    return None


def quick_problem(path: str) -> Optional[str]:
    """What is wrong with checkpoint `path` by the cheap checks (see the module doc), or None."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return f"{os.path.join(path, MANIFEST)} is missing (the save did not finish)"
    try:
        files, algorithm = read_manifest(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{os.path.join(path, MANIFEST)} is unreadable ({type(e).__name__}: {e})"
    for required in (TRAIN_STATE, DCP_METADATA):
        if required not in files:
            return f"{os.path.join(path, MANIFEST)} does not list {required}"
    for name, (size, _) in files.items():
        problem = _file_problem(path, name, size, None, None)
        if problem is not None:
            return problem
    for name in (TRAIN_STATE, DCP_METADATA):
        problem = _file_problem(path, name, *files[name], algorithm)
        if problem is not None:
            return problem
    try:  # every shard DCP will read is in the manifest (a writer that lost a file cannot pass)
        storage = FileSystemReader(path).read_metadata().storage_data.values()
    except Exception as e:  # .metadata passed its checksum, or a version-1 manifest has none
        return f"{os.path.join(path, DCP_METADATA)} is unreadable ({type(e).__name__}: {e})"
    unlisted = sorted({info.relative_path for info in storage} - set(files))
    if unlisted:
        return f"{os.path.join(path, unlisted[0])} is not in {MANIFEST} (written by another save?)"
    return None


def checksum_problems(path: str, rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's share of the checksums of checkpoint `path` that `quick_problem` leaves out."""
    files, algorithm = read_manifest(path)
    names = sorted(set(files) - {TRAIN_STATE, DCP_METADATA})[rank::world_size]
    return [p for p in (_file_problem(path, n, *files[n], algorithm) for n in names) if p is not None]


def verify(path: str) -> Optional[str]:
    """None if checkpoint `path` is complete and intact (every checksum), else what is wrong. One process."""
    return quick_problem(path) or next(iter(checksum_problems(path)), None)


# ------------------------------------------------------------------------------------------------ choosing

def _pointer(root: str) -> Optional[int]:
    """The iteration `latest_checkpointed_iteration.txt` names, None without the file."""
    path = os.path.join(root, LATEST)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is damaged (it holds {text[:40]!r}, not an iteration number): write the "
                              f"iteration of the checkpoint to resume from into it, or delete it to resume "
                              f"from the newest intact iter_XXXXXXX/") from None


def candidates(root: str, warn: Callable[[str], None]) -> list[str]:
    """The checkpoints of `root` worth loading, newest first (see the module doc); [] when it holds none."""
    found, latest = iterations(root), _pointer(root)
    if latest is None and not found:
        return []
    if latest is not None and latest not in found:
        raise CheckpointError(f"{os.path.join(root, LATEST)} names iteration {latest}, but {root} has no "
                              f"{os.path.basename(iteration_dir(root, latest))}/ (its checkpoints: {found}): "
                              "restore it, or write one of those iterations into the pointer")
    # The pointer wins; directories after it are saves it never confirmed.
    order = [i for i in reversed(found) if latest is None or i <= latest]
    good, problems = [], []
    for it in order:
        path = iteration_dir(root, it)
        problem = quick_problem(path)
        if problem is None:
            good.append(path)
        else:
            warn(f"WARNING: skipping checkpoint {path}, it is damaged: {problem}")
            problems.append(problem)
    if not good:
        raise _no_intact_checkpoint(root, problems)
    return good


def _no_intact_checkpoint(root: str, problems: list[str]) -> CheckpointError:
    latest = _pointer(root)
    usable = [i for i in iterations(root) if latest is None or i <= latest]
    return CheckpointError(f"no intact checkpoint in {root}: its checkpoints {usable} are all incomplete or damaged "
                           f"({'; '.join(problems)}). Nothing was loaded or overwritten: restore them, or --load "
                           "another directory")


def first_intact(paths: Iterable[str], warn: Callable[[str], None], collective: bool = True) -> str:
    """The first of `paths` whose every checksum holds. Collective when a process group exists (unless
    `collective` is False): each rank verifies its share of the files, and all ranks agree on the answer."""
    paths = list(paths)
    shared = collective and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared else (0, 1)
    problems = []
    for path in paths:
        mine = checksum_problems(path, rank, world)
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        found = [p for share in everyone for p in share]
        if not found:
            return path
        warn(f"WARNING: skipping checkpoint {path}, it is damaged: {found[0]}")
        problems.append(found[0])
    raise _no_intact_checkpoint(os.path.dirname(paths[0]), problems)


def find_loadable(root: str, warn: Callable[[str], None]) -> Optional[str]:
    """The newest intact checkpoint of `root`, verified by this process alone; None when it holds no
    checkpoint at all. Raises CheckpointError as `candidates` does."""
    paths = candidates(root, warn)
    return first_intact(paths, warn, collective=False) if paths else None
