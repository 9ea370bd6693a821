"""End-to-end SLURM tests: real sbatch jobs of launch/pretrain_gpt.sh (and each family's script) on a running cluster.

Start the single-machine cluster first (needs root; ~2 s):

    bash launch/local_cluster.sh up 2
    pytest tests/test_slurm.py
    bash launch/local_cluster.sh down

Without a cluster the tests are skipped, unless MEGALATENT_REQUIRE_SLURM=1 (set by CI), which turns
a missing cluster into a failure. Each job is a tiny training run (seconds); every wait is bounded.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CORPUS_FLAGS
from launcher import launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "pretrain_gpt.sh"
REQUIRE = os.environ.get("MEGALATENT_REQUIRE_SLURM") == "1"
# The first job may build the default corpus (~10 s here, a minute or two on a slow machine).
FIRST_JOB_TIMEOUT = 300
JOB_TIMEOUT = 300  # the requeued run queues behind the jobs still waiting
TINY = ["--log-interval", "1", "--save-interval", "1000"]
SHORT = ["--lr-warmup-iters", "1"]  # the jobs of a few steps (the tiny configs warm up for 10)


ITERATION_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+)\s*\|.*?lm loss: ([0-9.]+E[+-]\d+)")
RESUMED_RE = re.compile(r"resumed from checkpoint at iteration (\d+)")


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"MEGALATENT_REQUIRE_SLURM=1 but {reason}. Start the local cluster with "
                    f"`bash launch/local_cluster.sh up 2` (as root) before running tests/test_slurm.py.",
                    pytrace=False)
    pytest.skip(f"no SLURM cluster: {reason} (start one with `bash launch/local_cluster.sh up 2`)")


@pytest.fixture(scope="module", autouse=True)
def cluster_nodes() -> list[str]:
    """Names of the idle/usable nodes; skips (or fails under MEGALATENT_REQUIRE_SLURM=1) without a cluster."""
    if shutil.which("sbatch") is None:
        _unavailable("`sbatch` is not on PATH")
    try:
        r = _run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20)
    except subprocess.TimeoutExpired:
        _unavailable("`sinfo` did not answer within 20 s")
    if r.returncode != 0:
        _unavailable(f"`sinfo` failed: {'; '.join((r.stderr or r.stdout).strip().splitlines())[:300]}")
    nodes = sorted({line.split()[0] for line in r.stdout.splitlines()
                    if len(line.split()) == 2 and line.split()[1].rstrip("*~#") in ("idle", "mix", "alloc")})
    if not nodes:
        _unavailable(f"`sinfo` shows no usable node:\n{r.stdout}")
    return nodes


@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        lines = [ln for ln in self.text().splitlines() if "UserWarning" not in ln and "warnings.warn" not in ln]
        return f"--- last lines of {self.log} ---\n" + "\n".join(lines[-n:])

    def info(self) -> dict[str, str]:
        out = _run(["scontrol", "show", "job", self.id]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def active(self) -> bool:
        return bool(_run(["squeue", "-h", "-j", self.id]).stdout.strip())

    def iterations(self) -> list[tuple[int, int, str]]:
        """(iteration, train_iters, lm loss as printed) for every training iteration line, in order."""
        return [(int(i), int(n), loss) for i, n, loss in ITERATION_RE.findall(self.text())]


class Submitter:
    """submit(name, sbatch_args, trainer_args) -> Job, each job in a directory of its own under `root`."""

    def __init__(self, root: Path):
        self.root, self.jobs = root, []

    def submit(self, name: str, sbatch_args: list[str], trainer_args: list[str], script: Path = SCRIPT,
               env: dict[str, str] | None = None) -> Job:
        run_dir = self.root / name
        log = self.root / f"{name}-%j.out"
        env = ",".join([f"ALL,RUN_DIR={run_dir},PYTHON={sys.executable}"] + [f"{k}={v}" for k, v in (env or {}).items()])
        cmd = ["sbatch", "--parsable", f"--export={env}", f"--output={log}", f"--job-name=ml-test-{name}",
               *sbatch_args, str(script), *trainer_args]
        r = _run(cmd)
        assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
        job_id = r.stdout.strip().split(";")[0]
        job = Job(job_id, Path(str(log).replace("%j", job_id)), run_dir)
        self.jobs.append(job)
        return job

    def cancel_active(self) -> None:
        for job in self.jobs:
            if job.active():
                _run(["scancel", job.id])


def wait_done(job: Job, timeout: float) -> dict[str, str]:
    """Poll squeue until the job leaves the queue (bounded); return `scontrol show job` fields."""
    deadline = time.monotonic() + timeout
    while job.active():
        if time.monotonic() > deadline:
            _run(["scancel", job.id])
            pytest.fail(f"job {job.id} not finished after {timeout:.0f} s (cancelled)\n{job.tail()}")
        time.sleep(1)
    return job.info()


def assert_completed(job: Job, info: dict[str, str], train_iters: int) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job.id}: JobState={info.get('JobState')} ExitCode={info.get('ExitCode')}\n{job.tail()}")
    its = job.iterations()
    assert its and its[-1][:2] == (train_iters, train_iters), (
        f"job {job.id}: no final 'iteration {train_iters}/ {train_iters}' line with an lm loss\n{job.tail()}")
    ckpts = job.run_dir / "checkpoints"
    assert ckpts.is_dir() and any(ckpts.iterdir()), f"job {job.id}: no checkpoint in {ckpts}\n{job.tail()}"


@pytest.fixture
def two_nodes(cluster_nodes):
    if len(cluster_nodes) < 2:
        msg = f"needs 2 nodes, the cluster has {cluster_nodes} (`bash launch/local_cluster.sh up 2`)"
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)


# Job shapes: sbatch arguments, the line the trainer must print about its world, and the nodes it must span.
# n1x2 is pretrain_gpt.sh's own shape and also the unsignalled reference of the USR1 test (same arguments).
SHAPES = {
    "n1x2": ([], "1 node(s), 2 task(s)", "1"),
    "n2x1": (["--nodes=2", "--ntasks-per-node=1"], "2 node(s), 2 task(s)", "2"),
    # The parallel engine under SLURM: TP=2 inside each node (adjacent ranks), DP=2 across the nodes.
    "tp2dp2": (["--nodes=2", "--ntasks-per-node=2"], "world 4 = pp 1 x dp 2 x cp 1 x tp 2 (slurm)", "2"),
}
USR1_ITERS = 20  # the signalled job and its reference, n1x2: long enough to be signalled and resumed mid-run
SHAPE_ITERS = 4  # the other shapes: a few steps show that the world is the one the shape asks for (CPU is the budget)
SIGNAL_AFTER = 3  # the USR1 test signals its job once it has logged this iteration

# Every model family's batch script other than pretrain_gpt.sh (tested above), with its default tiny config
# (the text families on the tests' corpus); whether it trains on text.
FAMILY_SCRIPTS = {"pretrain_longnet.sh": ([], True), "pretrain_mhmoe.sh": ([], True), "pretrain_latentlm.sh": ([], False),
                  "pretrain_longvit.sh": ([], False), "pretrain_yoco.sh": ([], True),
                  "pretrain_bitnet.sh": (["--lr-two-stage-boundary-iter", "2"], True)}  # tiny: 30
FAMILY_ITERS = 4
# The σ-VAEs of the LatentLM jobs: seconds to train (the default takes ~16 CPU-s), enough to encode digits.
SMALL_VAE = ["--train-iters", "100", "--hidden-size", "32", "--num-layers", "1", "--num-attention-heads", "2",
             "--micro-batch-size", "32"]


def shape_iters(name: str) -> int:
    return USR1_ITERS if name == "n1x2" else SHAPE_ITERS


def steps(iters: int) -> list[str]:
    return ["--train-iters", str(iters), *TINY, *(SHORT if iters < USR1_ITERS else [])]


@pytest.fixture(scope="module")
def jobs(cluster_nodes, tmp_path_factory, corpus_cache) -> dict[str, Job]:
    """Every job of this file, submitted at once at the start: the tests then wait for theirs. The cluster
    queues what does not fit its 2 x 4 CPUs, so no test waits for another's jobs to finish before its own are
    submitted, and SLURM's scheduling waits (seconds each) overlap. The USR1 test's job goes first: its test
    must see it running to signal it. (The 2-node shapes only on a 2-node cluster: test_job_shapes fails or
    skips without one.)"""
    root = tmp_path_factory.mktemp("slurm")
    text_data = ["--data-cache-path", corpus_cache, *CORPUS_FLAGS]
    submitter = Submitter(root)
    out = {"signalled": submitter.submit("signalled", [], steps(USR1_ITERS) + text_data)}
    out.update({name: submitter.submit(name, sbatch, steps(shape_iters(name)) + text_data + (
                    ["--tensor-model-parallel-size", "2"] if name == "tp2dp2" else []))
                for name, (sbatch, _, nodes) in SHAPES.items() if int(nodes) <= len(cluster_nodes)})
    one_task = ["--ntasks-per-node=1"]
    # LatentLM on documents trains its own σ-VAE, small (VAE_ARGS), and captions its documents with the tests'
    # corpus's tokenizer (the trainer's --data-cache-path, passed on by the script).
    out["LATENTLM_DATA=documents"] = submitter.submit(
        "latentlm-documents", one_task, steps(FAMILY_ITERS) + text_data,
        script=ROOT / "launch" / "pretrain_latentlm.sh",
        env={"LATENTLM_DATA": "documents", "LATENT_TOKENIZER": root / "vae", "DOCUMENTS": root / "docs",
             "VAE_ARGS": " ".join(SMALL_VAE)})
    # LatentLM on classes is given a small σ-VAE: its job is submitted held, and released once a thread has
    # trained the σ-VAE (while the other jobs run; the USR1 test must not wait for it to watch its job).
    given_vae = str(root / "vae-classes")
    for name, (extra, text) in FAMILY_SCRIPTS.items():
        given = "latentlm" in name
        out[name] = submitter.submit(name.removesuffix(".sh"), one_task + (["--hold"] if given else []),
                                     [*steps(FAMILY_ITERS), *extra, *(text_data if text else [])],
                                     script=ROOT / "launch" / name, env={"LATENT_TOKENIZER": given_vae} if given else None)

    def train_given_vae():
        trained = launch(["tools/train_vae.py", "--save", given_vae, *SMALL_VAE])
        vae_training["returncode"], vae_training["stderr"] = trained.returncode, trained.stderr
        if trained.returncode == 0:
            _run(["scontrol", "release", out["pretrain_latentlm.sh"].id])

    vae_training = {}
    out["vae training"] = vae_training
    thread = threading.Thread(target=train_given_vae, daemon=True)
    thread.start()
    vae_training["thread"] = thread
    out["root"], out["corpus"] = root, corpus_cache
    yield out
    submitter.cancel_active()


def test_usr1_requeue_resumes_exactly(jobs):
    """scancel --signal=USR1 --full: the trainer checkpoints, the batch shell requeues, the rerun resumes
    from the checkpoint, and the final loss equals that of an unsignalled run with the same arguments
    (the n1x2 job shape)."""
    job, reference = jobs["signalled"], jobs["n1x2"]
    deadline = time.monotonic() + FIRST_JOB_TIMEOUT
    while not any(i >= SIGNAL_AFTER for i, _, _ in job.iterations()):
        if not job.active():
            pytest.fail(f"job {job.id} ended before iteration {SIGNAL_AFTER}: {job.info().get('JobState')}\n"
                        f"{job.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.id} did not reach iteration {SIGNAL_AFTER} in {FIRST_JOB_TIMEOUT} s\n{job.tail()}")
        time.sleep(0.3)
    r = _run(["scancel", "--signal=USR1", "--full", job.id])
    assert r.returncode == 0, f"scancel --signal=USR1 --full {job.id}: {r.stderr}"

    # The requeued run waits ~15 s (cred_expire=10, sched_interval=5) before it starts again.
    info = wait_done(job, JOB_TIMEOUT)
    ref_info = wait_done(reference, JOB_TIMEOUT)
    assert_completed(reference, ref_info, USR1_ITERS)
    assert_completed(job, info, USR1_ITERS)

    text = job.text()
    assert int(info.get("Restarts", "0")) >= 1, f"job {job.id} was not requeued (Restarts={info.get('Restarts')})\n" \
                                                f"{job.tail()}"
    assert "(restart 1)" in text, f"no second start (SLURM_RESTART_COUNT=1) in the log\n{job.tail()}"
    resumed = [int(k) for k in RESUMED_RE.findall(text)]
    assert resumed and SIGNAL_AFTER <= resumed[-1] < USR1_ITERS, (
        f"the rerun did not resume from a checkpoint taken after iteration {SIGNAL_AFTER}\n{job.tail()}")

    final, ref_final = job.iterations()[-1][2], reference.iterations()[-1][2]
    assert final == ref_final, (f"final lm loss after requeue {final} != unsignalled {ref_final}\n"
                                f"{job.tail()}\n{reference.tail(15)}")
    ref_curve = {i: loss for i, _, loss in reference.iterations()}
    diffs = [(i, loss, ref_curve.get(i)) for i, _, loss in job.iterations() if ref_curve.get(i) != loss]
    assert not diffs, f"lm loss differs from the unsignalled run at (iteration, requeued, reference): {diffs[:5]}"


def test_job_shapes(jobs, two_nodes):
    """pretrain_gpt.sh at one node x 2 tasks, 2 nodes x 1 task, and 2 nodes x 2 tasks with TP2 x DP2."""
    for name, (_, printed, nodes) in SHAPES.items():
        job = jobs[name]
        info = wait_done(job, FIRST_JOB_TIMEOUT)
        assert_completed(job, info, shape_iters(name))
        assert printed in job.text(), job.tail()
        assert info.get("NumNodes") == nodes, f"NumNodes={info.get('NumNodes')}\n{job.tail()}"


def test_every_family_batch_script_trains(jobs):
    """`sbatch launch/pretrain_<family>.sh` as the README says, one task each (their 2-task shape is
    pretrain_gpt.sh's, above; the families' layouts are tested against one process elsewhere): each must
    finish. LatentLM on documents: the script trains its own σ-VAE tokenizer first and writes its documents
    (in the test's directory, not the repo's); LatentLM on classes is given a small σ-VAE trained by the
    fixture (its job held until then), which the script must use rather than train its own."""
    vae_training = jobs["vae training"]
    vae_training["thread"].join(timeout=FIRST_JOB_TIMEOUT)
    assert vae_training.get("returncode") == 0, f"training the given σ-VAE: {vae_training.get('stderr', '')[-3000:]}"
    for name in [*FAMILY_SCRIPTS, "LATENTLM_DATA=documents"]:
        job = jobs[name]
        assert_completed(job, wait_done(job, FIRST_JOB_TIMEOUT), FAMILY_ITERS)
    training_vae = "[megalatent] training the σ-VAE tokenizer into"
    assert training_vae not in jobs["pretrain_latentlm.sh"].text(), jobs["pretrain_latentlm.sh"].tail()
    documents = jobs["LATENTLM_DATA=documents"].text()
    assert f"{training_vae} {jobs['root'] / 'vae'}" in documents
    assert "--tokenizer-model " + str(Path(jobs["corpus"]) / "stdlib-py") in documents, documents[-3000:]
