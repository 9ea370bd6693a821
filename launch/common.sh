# Shared launcher, sourced by every launch/pretrain_<model>.sh (not run directly).
#
# Under SLURM (sbatch launch/pretrain_<model>.sh [trainer args...]) it runs one trainer process per
# task with `srun --kill-on-bad-exit=1 python -m megalatent.pretrain ...`; the trainer reads its rank
# from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and MASTER_ADDR/MASTER_PORT set here. Outside SLURM
# (bash launch/pretrain_<model>.sh [trainer args...]) it runs
# `python -m torch.distributed.run --standalone --nproc-per-node $NPROC_PER_NODE -m megalatent.pretrain ...`.
# Both pass --config "$CONFIG" --save/--load "$RUN_DIR/checkpoints" --tensorboard-dir "$RUN_DIR/tensorboard",
# then the script's own arguments (later flags override earlier ones).
#
# Preemption and time limits: the batch scripts use `#SBATCH --requeue --signal=B:USR1@120`, which
# delivers SIGUSR1 to this batch shell only. The trap below forwards it to the job steps
# (scancel --signal=USR1 $SLURM_JOB_ID); the trainer saves a checkpoint at the next iteration
# boundary and exits 0; then this shell runs `scontrol requeue $SLURM_JOB_ID`, and the rerun (same
# job id, same RUN_DIR, SLURM_RESTART_COUNT=1, 2, ...) resumes from $RUN_DIR/checkpoints.
# `scancel --signal=USR1 --full ID` does the same by hand (the steps get the signal directly; a
# forwarded duplicate is harmless: the trainer only sets a flag). `scancel --signal=USR1 ID`
# (steps only) makes the trainer save and stop without a requeue.
#
# Environment knobs (all optional; set them in the environment or with sbatch --export=ALL,NAME=...):
#   CONFIG          trainer YAML config (each pretrain_<model>.sh sets its default)
#   RUN_DIR         run directory (checkpoints/, tensorboard/). Default: under SLURM
#                   runs/$SLURM_JOB_NAME-$SLURM_JOB_ID (stable across requeues), otherwise
#                   runs/<config name>-<timestamp>; relative paths are taken from the repo root
#   PYTHON          python of the environment to use (default: the active virtualenv/conda env's, else the
#                   repo's .venv made by launch/quickstart.sh); checked before anything starts
#   NPROC_PER_NODE  processes for the torchrun launch outside SLURM (default 1)
#   MASTER_ADDR     default: first host of $SLURM_JOB_NODELIST under SLURM
#   MASTER_PORT     default: 20000 + SLURM_JOB_ID % 20000 under SLURM (distinct for concurrent jobs)
#   OMP_NUM_THREADS default: $SLURM_CPUS_PER_TASK, else CPU cores / tasks on this node (at least 1)
#   SRUN_ARGS       extra srun arguments, e.g. "--cpu-bind=none" or "--container-image=..."
#   REQUEUE_ON_USR1 1 (default): requeue the job after a USR1-triggered save; 0: just stop

# Repo root: this file lives in <root>/launch/.
MEGALATENT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MEGALATENT_ROOT
cd "$MEGALATENT_ROOT"

CONFIG=${CONFIG:?set CONFIG (e.g. examples/tiny/gpt.yaml) before sourcing launch/common.sh}
# The project's environment, found whether or not the submitting shell activated it (sbatch copies that
# shell's environment into the job), and checked here, in seconds, so that a job without it fails with the fix
# instead of with "No module named 'torch'" in every task. Found, not imported: importing torch costs each job
# ~2 CPU-seconds before its tasks import it again.
if [[ -z ${PYTHON:-} ]]; then
    if [[ -n ${VIRTUAL_ENV:-} || -n ${CONDA_PREFIX:-} ]]; then
        PYTHON=python
    elif [[ -x $MEGALATENT_ROOT/.venv/bin/python ]]; then
        PYTHON=$MEGALATENT_ROOT/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
if ! "$PYTHON" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'yaml', 'sentencepiece', 'megalatent.config')))" >/dev/null 2>&1
then
    echo "[megalatent] error: $PYTHON (${VIRTUAL_ENV:-no virtualenv active}) cannot import torch and megalatent's" \
        "dependencies. Run 'bash launch/quickstart.sh' once (it installs into $MEGALATENT_ROOT/.venv), or" \
        "'source .venv/bin/activate' / activate the env you installed megalatent into before sbatch, or pass" \
        "PYTHON=/path/to/python (sbatch --export=ALL,PYTHON=...)." >&2
    exit 2
fi
export PYTHONUNBUFFERED=1   # iteration lines reach the log as they happen

_ml_log() { echo "[megalatent $(date '+%F %T')] $*"; }

_ml_abs() { case $1 in /*) echo "$1" ;; *) echo "$MEGALATENT_ROOT/$1" ;; esac; }

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # ------------------------------------------------------------------ SLURM batch job
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    RUN_DIR=$(_ml_abs "${RUN_DIR:-runs/${SLURM_JOB_NAME:-megalatent}-$SLURM_JOB_ID}")
    _ml_tasks_here=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
    _ml_tasks_here=${_ml_tasks_here:-1}
else
    # ------------------------------------------------------------------ local torchrun
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    _ml_name=$(basename "$CONFIG"); _ml_name=${_ml_name%.*}
    RUN_DIR=$(_ml_abs "${RUN_DIR:-runs/$_ml_name-$(date +%Y%m%d-%H%M%S)}")
    _ml_tasks_here=$NPROC_PER_NODE
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
    else
        OMP_NUM_THREADS=$(( $(nproc) / _ml_tasks_here ))
        (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    fi
fi
export OMP_NUM_THREADS RUN_DIR
mkdir -p "$RUN_DIR/checkpoints" "$RUN_DIR/tensorboard"

_ML_TRAINER_ARGS=(-m megalatent.pretrain --config "$CONFIG"
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
    --tensorboard-dir "$RUN_DIR/tensorboard" "$@")

_ml_log "repo: $MEGALATENT_ROOT"
_ml_log "run dir: $RUN_DIR"
_ml_log "config: $CONFIG, python: $(command -v "$PYTHON" || echo "$PYTHON"), OMP_NUM_THREADS=$OMP_NUM_THREADS"

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    _ml_cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE"
        "${_ML_TRAINER_ARGS[@]}")
    _ml_log "command: ${_ml_cmd[*]}"
    exec "${_ml_cmd[@]}"
fi

_ml_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "${SLURM_NNODES:-?} node(s), ${SLURM_NTASKS:-?} task(s); MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"

_ml_usr1=0
_ml_on_usr1() {
    _ml_usr1=1
    _ml_log "batch shell got SIGUSR1: forwarding it to the job steps (trainer saves and exits)"
    scancel --signal=USR1 "$SLURM_JOB_ID" || _ml_log "scancel --signal=USR1 failed"
}
trap _ml_on_usr1 USR1

# shellcheck disable=SC2086  # SRUN_ARGS is a word list on purpose
_ml_cmd=(srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$PYTHON" "${_ML_TRAINER_ARGS[@]}")
_ml_log "command: ${_ml_cmd[*]}"
"${_ml_cmd[@]}" &
_ml_pid=$!
# `wait` returns 128+signal (138 for USR1) when a trapped signal interrupts it: keep waiting.
while :; do
    wait "$_ml_pid"
    _ml_rc=$?
    if (( _ml_rc > 128 )) && kill -0 "$_ml_pid" 2>/dev/null; then continue; fi
    break
done
_ml_log "srun exited with status $_ml_rc"

if (( _ml_usr1 )) && [[ ${REQUEUE_ON_USR1:-1} == 1 ]]; then
    _ml_log "requeueing job $SLURM_JOB_ID to resume from $RUN_DIR/checkpoints"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    _ml_log "scontrol requeue failed"
fi
exit "$_ml_rc"
