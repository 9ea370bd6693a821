#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels (git-ignored) with what the GPU machine lacks, for its Python 3.12 on x86-64 Linux;
# run where pip reaches the package index. acceptance.sh installs them there with --no-index.
# torchao (FP8 training; its float8 path is pure Python, ~3.4 MB wheel) is the only one: the benchmarks use
# synthetic data (no megatron-core), and torch, Triton, pytest, pyyaml, sentencepiece are preinstalled there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels "torchao==${TORCHAO_VERSION:-0.18.0}"
ls -l wheels
