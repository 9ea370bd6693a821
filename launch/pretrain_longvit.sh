#!/usr/bin/env bash
# LongViT pretraining (non-causal dilated attention over image patches; --context-parallel-size splits an image). Any arguments are passed to the trainer (python -m megalatent.pretrain).
#   mkdir -p runs/logs && sbatch launch/pretrain_longvit.sh [--train-iters 100 ...]   # SLURM batch job
#     (from the repo root: --output is relative to it, and SLURM fails a job whose log dir is missing)
#   bash launch/pretrain_longvit.sh [...]                          # local: torchrun, NPROC_PER_NODE procs
# On a GPU cluster choose the shape on the command line (the header stays GPU-free because a
# cluster rejects GRES/partitions it does not define, e.g. the local one of launch/local_cluster.sh):
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 [--partition P] launch/pretrain_longvit.sh
# Environment knobs (CONFIG, RUN_DIR, PYTHON, ...) are documented in launch/common.sh.
#SBATCH --job-name=megalatent-longvit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --output=runs/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --time=04:00:00
set -uo pipefail
CONFIG=${CONFIG:-examples/tiny/longvit.yaml}
# sbatch runs a copy of this script from the spool dir: find the repo via the submitted path.
for _r in "${MEGALATENT_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "$(dirname "$(scontrol show job \
    "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=//p')")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $_r/launch/common.sh ]] && break; done
source "$_r/launch/common.sh"
