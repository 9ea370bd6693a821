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
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A data cache dir holding the default stdlib corpus, built once for every test that trains."""
    cache = str(tmp_path_factory.mktemp("megalatent-cache"))
    from megalatent.data.stdlib_corpus import prepare_default_corpus
    prepare_default_corpus(cache, 8192)
    return cache


def run_trainer(args, cache, nproc=1, timeout=600, env=None, check=True):
    """Run the trainer as a user would (its own process or torchrun); returns the completed process, which
    must have succeeded unless `check` is False."""
    base = ["-m", "megalatent.pretrain", "--config", "examples/tiny/gpt.yaml", "--data-cache-path", cache]
    if nproc == 1:
        cmd = [sys.executable] + base + list(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + base + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert out.returncode == 0 or not check, f"trainer failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def losses(stdout: str) -> dict[int, str]:
    """iteration -> the printed 'lm loss' of every iteration line."""
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) \|")
    return {int(m.group(1)): m.group(2) for m in pattern.finditer(stdout)}
