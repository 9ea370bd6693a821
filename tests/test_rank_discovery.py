"""Rank discovery from torchrun, SLURM (srun tasks) and mpirun, and a real mpirun job."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import CORPUS_FLAGS, REPO, losses
from megalatent.distributed.env import discover

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_single_process(clean_env):
    env = discover()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_torchrun(clean_env):
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="1234").items():
        clean_env.setenv(k, v)
    env = discover()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_task(clean_env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5", SLURM_STEP_ID="0",
                     SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a").items():
        clean_env.setenv(k, v)
    env = discover()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu-a"  # first host of the nodelist
    assert env.master_port == 20000 + 4242 % 20000  # derived from the job id, same on every task


def test_slurm_batch_shell_is_not_a_task(clean_env):
    # The batch script's own shell has SLURM_PROCID=0 but no step: it must not think it is rank 0 of N.
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="16", SLURM_JOB_ID="1").items():
        clean_env.setenv(k, v)
    assert discover().launcher == "single"


def test_torchrun_inside_slurm_wins(clean_env):
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0", RANK="6", WORLD_SIZE="16").items():
        clean_env.setenv(k, v)
    env = discover()
    assert (env.rank, env.world_size, env.launcher) == (6, 16, "torchrun")


mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(mpirun is None, reason="no MPI: pip install -e '.[mpi]'")
def test_mpirun_job_trains(corpus_cache, tmp_path):
    cmd = [mpirun, "-n", "2", sys.executable, "-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml",
           "--data-cache-path", corpus_cache, *CORPUS_FLAGS, "--train-iters", "2", "--log-interval", "1",
           "--eval-interval", "0",
           "--lr-warmup-iters", "1", "--global-batch-size", "8", "--save", str(tmp_path / "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29733"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "world 2 = pp 1 x dp 2 x cp 1 x tp 1 (mpi)" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2]
