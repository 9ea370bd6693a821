# Sourced by launch/quickstart.sh and tests/run.sh: pick the Python environment and install megalatent
# into it if needed. Sets PYTHON.
#   - an active virtualenv or conda env (VIRTUAL_ENV / CONDA_PREFIX) is used as it is;
#   - otherwise the repository's own .venv, created on first use.
# torch is installed first, as the CPU build 2.13.0 when no GPU is visible, so that pip does not pull
# a multi-GB CUDA build onto a laptop; on a GPU machine, install the CUDA torch you want beforehand.
# Usage: source launch/python_env.sh [extras, e.g. dev]
_megalatent_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    PYTHON=${PYTHON:-python}
else
    if [[ ! -x "$_megalatent_root/.venv/bin/python" ]]; then
        echo "[megalatent] creating $_megalatent_root/.venv" >&2
        python3 -m venv "$_megalatent_root/.venv"
    fi
    PYTHON="$_megalatent_root/.venv/bin/python"
fi
export PYTHON
# pip with a line per package it fetches or installs (its progress bar needs a terminal; this also goes to logs).
_megalatent_pip() {
    local start=$SECONDS
    "$PYTHON" -m pip install --progress-bar off "$@" \
        | { grep --line-buffered -E '^(Collecting|  Downloading|Installing collected|Successfully installed)' || true; } \
        | sed -u 's/^ */  pip: /'
    local status=${PIPESTATUS[0]}
    echo "[megalatent]   ... $(( SECONDS - start ))s" >&2
    return "$status"
}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[megalatent] (1/2) installing torch (CUDA build, several GB)" >&2
        _megalatent_pip torch
    else
        echo "[megalatent] (1/2) installing torch 2.13.0, the CPU build (~200 MB)" >&2
        _megalatent_pip "torch==2.13.0" || _megalatent_pip torch
    fi
fi
_megalatent_extras=${1:-}
# What must import, by extra (module names, not package names).
_megalatent_modules="'yaml', 'sentencepiece', 'megatron', 'numpy', 'tensorboard', 'tqdm', 'xxhash', 'matplotlib'"
[[ "$_megalatent_extras" == *dev* ]] && _megalatent_modules="$_megalatent_modules, 'pytest', 'pytest_timeout', 'xdist', 'transformers', 'safetensors', 'triton', 'sklearn'"
[[ "$_megalatent_extras" == *mpi* ]] && _megalatent_modules="$_megalatent_modules, 'mpi4py'"
[[ "$_megalatent_extras" == *vision* ]] && _megalatent_modules="$_megalatent_modules, 'nvidia.dali', 'sklearn', 'PIL'"
# Installed (from this checkout, e.g. not a second clone) with every dependency? Checked from / so that
# the checkout itself, being the current directory, does not pass for an installed package.
if ! (cd / && "$PYTHON" -c "
import importlib.util, os, sys
import megalatent
missing = [m for m in ($_megalatent_modules,) if importlib.util.find_spec(m) is None]
sys.exit(bool(missing) or os.path.dirname(os.path.dirname(megalatent.__file__)) != '$_megalatent_root')
") 2>/dev/null; then
    echo "[megalatent] (2/2) installing $_megalatent_root${_megalatent_extras:+[$_megalatent_extras]} and its" \
        "dependencies into $("$PYTHON" -c 'import sys; print(sys.prefix)')" >&2
    _megalatent_pip -e "$_megalatent_root${_megalatent_extras:+[$_megalatent_extras]}"
fi
