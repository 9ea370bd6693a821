"""Shared fixtures: a small corpus and tokenizer built once per test session, and a trainer runner."""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be chosen before
# anything imports triton (torch may, early): here, before any test module is imported.
if "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


# The tests train on the default corpus with a 512-token tokenizer rather than examples/tiny/gpt.yaml's 8192:
# the tiny GPT's output layer is then 16x smaller (it held 70% of the model's FLOPs), which halves the time of
# a step; no test is about the tokenizer's size (tests/test_data.py builds the 8192-token one).
CORPUS_VOCAB_SIZE = 512
CORPUS_FLAGS = ["--default-corpus-vocab-size", str(CORPUS_VOCAB_SIZE)]  # with --data-cache-path corpus_cache


# Files that take longest start first (tests/run.sh's workers take a file at a time, in collection order): a long
# file that started last would run alone on one core at the end. The SLURM file first (its jobs run in the
# background from its start), then by CPU-seconds each file took alone (README, Tests): every file after these
# takes under 30.
LONGEST_FILES = ["test_slurm.py", "test_planner.py", "test_parallel.py", "test_compile.py", "test_acceptance.py",
                 "test_yoco.py", "test_moe.py", "test_training.py", "test_latentlm.py", "test_dilated.py",
                 "test_longvit.py", "test_hf_interop.py", "test_checkpoint_reshard.py", "test_fp8.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory, worker_id):
    """A data cache dir holding the default stdlib corpus, built once for every test that trains (pass
    CORPUS_FLAGS with it, as run_trainer does). Under pytest-xdist the workers share one (the first to get
    there builds it; prepare_default_corpus makes the others wait for it)."""
    base = tmp_path_factory.getbasetemp()
    cache = str(base.parent / "megalatent-cache" if worker_id != "master" else base / "megalatent-cache")
    os.makedirs(cache, exist_ok=True)
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    prepare_default_corpus(cache, CORPUS_VOCAB_SIZE)
    return cache


def unigram_entropy(cache: str) -> float:
    """The entropy (nats) of the token frequencies of the corpus in `cache`: the lowest loss a language model
    that does not read its input can reach on it (it can learn the frequencies, nothing more), so a model
    that beats it by a margin has learnt from the tokens it reads."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    _, prefix = prepare_default_corpus(cache, CORPUS_VOCAB_SIZE)  # built by corpus_cache: returns its paths
    corpus = IndexedDataset(prefix)
    counts = np.bincount(np.concatenate([corpus[i] for i in range(len(corpus))]))
    frequencies = counts[counts > 0] / counts.sum()
    return float(-(frequencies * np.log(frequencies)).sum())


def run_trainer(args, cache, nproc=1, timeout=600, env=None, check=True, real_launcher=False):
    """Run the trainer's command line (`python -m megalatent.pretrain ...`) in `nproc` processes; returns the
    completed process, which must have succeeded unless `check` is False. The processes are forked from a
    server that imported megalatent once (tests/launcher.py); `real_launcher` starts them as a user does
    instead, with `python` or `torchrun --standalone`."""
    command = ["-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml", "--data-cache-path", cache,
               *CORPUS_FLAGS, *args]
    if real_launcher:
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        out = subprocess.run([sys.executable] + launcher + command, cwd=REPO, capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    else:
        from launcher import launch
        out = launch(command, nproc, env=env, timeout=timeout)
    assert out.returncode == 0 or not check, f"trainer failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def load_tool(name: str):
    """tools/<name>.py as a module, to call its main(argv) in this process: a tool's own interpreter would
    spend seconds importing torch and megalatent again."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(stdout: str) -> dict[int, str]:
    """iteration -> the printed 'lm loss' of every iteration line."""
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) \|")
    return {int(m.group(1)): m.group(2) for m in pattern.finditer(stdout)}
