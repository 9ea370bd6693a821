"""The --save directory, checked before training and held by one run.

Before the process group starts (pretrain.py):
- `SaveDirLock.acquire`: rank 0 creates `<save>/run.lock` (host, pid, SLURM job, start time). A second run
  on the same directory stops, naming the holder. A stale lock (its pid is dead on this host, or it belongs
  to an earlier run of this same SLURM job, i.e. a requeue) is reported with a WARNING and taken over. The
  lock goes when the run ends; a lock of another host cannot be checked and is never taken over.
- `save_dir_problems`: the directory exists or can be made, a file can be written in it, and its file system
  has room for one checkpoint (`checkpoint_bytes`).

`describe_disk` names the file system of a path in error messages (the free-space check's and a failed
save's). Test hook: the environment variable MEGALATENT_TEST_FREE_BYTES, when set, is taken as the free space
of every file system, so that a test can pretend a disk is full (or roomy) without filling one.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
from typing import Optional

LOCK = "run.lock"
FREE_BYTES_OVERRIDE = "MEGALATENT_TEST_FREE_BYTES"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def free_bytes(path: str) -> int:
    override = os.environ.get(FREE_BYTES_OVERRIDE)
    if override is not None:
        return int(override)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def describe_disk(path: str, with_free: bool = True) -> str:
    """'the <type> file system mounted at <mount point>, <free> free' of `path` (or its nearest existing parent)."""
    path = _existing_parent(path)
    mount = os.path.realpath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    kind = "a"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == mount:
                    kind = f"the {fields[2]}"  # the last mount at a point is the visible one
    except OSError:
        pass
    try:
        free = f", {_gb(free_bytes(path))} free" if with_free else ""
    except OSError:
        free = ""
    return f"{kind} file system mounted at {mount}{free}"


def checkpoint_bytes(num_parameters_bytes: int, optimizer_states: int) -> int:
    """One checkpoint: the weights and, per weight, the optimizer's states of the same size (AdamW: 2)."""
    return num_parameters_bytes * (1 + optimizer_states)


def save_dir_problems(path: str, needed_bytes: int) -> list[str]:
    """Why checkpoints cannot be written to `path` (made if missing), one message each; [] when they can."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        try:
            os.write(fd, b"megalatent")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        return [f"--save {path} is not writable ({e.strerror}) on {describe_disk(path)}: choose another --save "
                "directory or fix its permissions"]
    free = free_bytes(path)
    if free < needed_bytes:
        return [f"--save {path}: one checkpoint needs about {_gb(needed_bytes)} (the weights and the optimizer "
                f"states), but {describe_disk(path, with_free=False)} has only {_gb(free)} free: free some space or choose "
                "another --save directory"]
    return []


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of process `pid` (to tell a reused pid from the lock's process), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (False); it appears complete, never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=".run.lock-", dir=os.path.dirname(path))
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails if `path` exists
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.write(fd, data)
            os.close(fd)
            return True
    finally:
        os.remove(tmp)


class SaveDirLock:
    """`<save>/run.lock`: which run writes checkpoints into a directory."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self.held = False

    def _mine(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}

    def _stale_reason(self, holder: dict) -> Optional[str]:
        """Why the holder is gone, or None when it may still be running."""
        job = os.environ.get("SLURM_JOB_ID")
        if job is not None and holder.get("slurm_job_id") == job:
            return f"it was an earlier run of this SLURM job {job} (requeued)"
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return f"process {pid} no longer runs on this host"
        start = holder.get("process_start")
        if start is not None and _process_start(pid) != start:
            return f"process {pid} no longer runs on this host (its pid now belongs to another process)"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock: None, or why not (the holder). A stale lock is taken over with a WARNING."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        mine = json.dumps(self._mine()).encode()
        for _ in range(2):  # a second try after removing a stale lock
            if _create_exclusive(self.path, mine):
                self.held = True
                return None
            try:
                with open(self.path, encoding="utf-8") as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}"
                   + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
                   + f", started {holder.get('started')}")
            reason = self._stale_reason(holder) if holder else None
            if reason is None:
                return (f"--save {os.path.dirname(self.path)} is locked by another run: {who}. Two runs writing "
                        f"one directory destroy each other's checkpoints: give this run another --save, or, if "
                        f"that run is gone, delete {self.path}")
            print(f"WARNING: taking over the stale lock {self.path} of {who}: {reason}", file=sys.stderr, flush=True)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        return f"--save {os.path.dirname(self.path)}: could not take the lock {self.path}; delete it and retry"

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path, encoding="utf-8") as f:
                if json.load(f).get("pid") != os.getpid():
                    return
            os.remove(self.path)
        except (OSError, ValueError):
            pass
