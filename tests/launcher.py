"""Start a test's processes (one, or the ranks of a job) by forking a server that imported torch and megalatent
once, in place of `python ...` or `torchrun --standalone ...`: an interpreter's start-up and imports cost
~4 s of CPU per process, which, at 1 to 8 processes per launch and ~150 launches, was a third of the
suite's time on 2 cores.

    result = launch(["-m", "megalatent.pretrain", "--config", ...], nproc=2)
    result = launch(["tests/parallel_worker.py", out, layout_json], nproc=4, env={...})

`command` is what would follow the interpreter on its command line: a script's path or `-m module`, then its
arguments. The result is a subprocess.CompletedProcess: the ranks' stdout and stderr each concatenated in
rank order, the exit code of the first rank that failed (0 if none did).

What a rank gets is what torchrun gives it: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (a free port of this host) in its environment, `command`'s arguments in sys.argv, the working
directory, and when one rank fails the others are stopped as torchrun stops them (they would otherwise wait
on it in a collective forever). A single process gets none of the rendezvous variables, as under `python`.
What it cannot give: environment variables read while torch or megalatent is imported (TORCH_LOGS,
TRITON_INTERPRET set differently than for the tests) and the launcher's own signal handling. Tests that
need those, and the tests of the launchers themselves (torchrun in test_training, srun in test_slurm,
mpirun in test_rank_discovery), start real interpreters.
"""
import multiprocessing
import multiprocessing.connection
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time

import torch

# Imported once, by the server every test's processes are forked from (one server per pytest process: the first
# to start it fixes its imports, so every test that forks asks for the same list, through forkserver()): the
# trainer; the parts of megatron-core it imports when it builds its data (~0.4 CPU-seconds per process); the
# planner's instruments (tests/planner_worker.py).
PRELOAD = ["megalatent.pretrain", "megalatent.data.megatron_core", "megalatent.planning.measure"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILURE_GRACE_S = 5.0  # after a rank fails, how long the others may take to end by themselves


def launch(command: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 600,
           cwd: str = REPO) -> subprocess.CompletedProcess:
    command = [os.fspath(arg) for arg in command]  # paths too, as subprocess takes them
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: os.fspath(v) for k, v in (env or {}).items()}}
    if nproc > 1:
        full_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc))
    context = forkserver()
    with tempfile.TemporaryDirectory(prefix="megalatent-launch-") as logs:
        outputs = [(os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")) for rank in range(nproc)]
        processes = []
        for rank, (out, err) in enumerate(outputs):
            rank_env = dict(full_env, RANK=str(rank), LOCAL_RANK=str(rank)) if nproc > 1 else full_env
            processes.append(context.Process(target=_run, args=(command, cwd, rank_env, out, err)))
            processes[-1].start()
        timed_out = not _wait(processes, timeout)
        stdout, stderr = ("".join(_read(paths[i]) for paths in outputs) for i in (0, 1))
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    codes = [p.exitcode for p in processes]
    failed = [code for code in codes if code != 0]
    return subprocess.CompletedProcess(command, failed[0] if failed else 0, stdout, stderr)


def forkserver() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    # The server imports these by name from its own interpreter's sys.path (Python 3.11's forkserver does not
    # apply the parent's, and ignores an ImportError): installed modules, not a module of tests/ (which each
    # process imports, cheaply, when it unpickles its target).
    context.set_forkserver_preload(PRELOAD)
    return context


def _wait(processes: list, timeout: float) -> bool:
    """Wait for every process; after the first failure give the others FAILURE_GRACE_S, then kill them.
    False if `timeout` ran out first (every process still running is killed then)."""
    end = time.monotonic() + timeout
    grace_end = None
    running = list(processes)
    while running and time.monotonic() < min(end, grace_end or end):
        multiprocessing.connection.wait([p.sentinel for p in running], min(end, grace_end or end) - time.monotonic())
        for p in [p for p in running if not p.is_alive()]:
            p.join()
            running.remove(p)
            if p.exitcode != 0 and grace_end is None:
                grace_end = time.monotonic() + FAILURE_GRACE_S
    for p in running:
        p.kill()
        p.join()
    return not running or grace_end is not None


def _run(command: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """One process: its environment, working directory, argv and output files, then the script or module
    as `python` would run it as __main__; it exits as that process would."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    code = 0
    try:
        if command[0] == "-m":
            module, sys.argv = command[1], [command[1]] + command[2:]
            sys.path[0] = cwd
            # A module the server imported would run again as __main__ beside its imported copy, with runpy's
            # warning; a fresh interpreter imports it once, as __main__.
            sys.modules.pop(module, None)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = os.path.join(cwd, command[0])
            sys.argv = [command[0]] + command[1:]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
