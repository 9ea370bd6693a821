"""Rank discovery for every way a job is started: torchrun, SLURM's srun, mpirun, or a plain process.

Each launcher names the same facts differently; `discover()` turns them into one `DistEnv` before any
process group exists, so configuration errors can be reported first.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]  # a plain "host" nodelist needs no expansion


def _mpi_env() -> DistEnv | None:
    if not any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        return None
    from mpi4py import MPI  # only needed under mpirun: `pip install megalatent[mpi]`
    comm = MPI.COMM_WORLD
    # Rank 0's host is the rendezvous; everyone learns it from a broadcast instead of guessing.
    addr = comm.bcast(os.environ.get("MASTER_ADDR") or socket.gethostname(), root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return DistEnv(comm.Get_rank(), comm.Get_size(), local, addr, int(os.environ.get("MASTER_PORT", 29500)), "mpi")


def discover() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    # SLURM_STEP_ID marks a task started by srun; a batch script's own shell has the job vars only.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job = int(env.get("SLURM_JOB_ID", 0))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _slurm_master_addr(),
                       int(env.get("MASTER_PORT", 20000 + job % 20000)), "slurm")
    mpi = _mpi_env()
    if mpi is not None:
        return mpi
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def init_process_group(env: DistEnv) -> torch.device:
    """Join the job's process group (NCCL with GPUs, gloo on CPU) and return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return device
    if env.world_size == 1:
        # A one-rank group costs nothing and keeps one code path: megatron-core's index caching and
        # DCP both expect torch.distributed to be initialized.
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="megalatent-pg-"), "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=10),
                                device_id=device if backend == "nccl" else None)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """Tear down and leave without interpreter shutdown: after DeviceMesh/DTensor use, ranks sometimes abort
    at exit (see reference/platform.md), which would turn a good run or test worker into a failed one."""
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
