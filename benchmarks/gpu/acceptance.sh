#!/usr/bin/env bash
# The GPU acceptance run (issue 14): bash benchmarks/gpu/acceptance.sh [--dry-run] [--output-dir DIR] [--steps ...]
# What it runs and writes: benchmarks/gpu/acceptance.py. The GPU machine has torch, Triton, pytest, pyyaml and
# sentencepiece but no network: what else the run needs (torchao, for FP8) travels as wheels in
# benchmarks/gpu/wheels (git-ignored; fill it with benchmarks/gpu/fetch_wheels.sh where there is a network),
# installed here with --no-index into a directory of its own. megalatent itself is installed editable (no
# dependencies, no build isolation: nothing is fetched) when this Python cannot import it yet.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/gpu/wheels
if compgen -G "$WHEELS/*.whl" >/dev/null && ! "$PY" -c "import torchao.float8" 2>/dev/null; then
    SITE=$(mktemp -d /tmp/megalatent-wheels-XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import megalatent.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
exec "$PY" benchmarks/gpu/acceptance.py "$@"
