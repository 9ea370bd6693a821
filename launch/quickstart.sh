#!/usr/bin/env bash
# The quick start: install, (start a local SLURM cluster,) train a tiny LongNet as a SLURM job, report.
#
#   bash launch/quickstart.sh [--keep-cluster] [--family F] [trainer args, e.g. --train-iters 100]
#
# 1. Installs megalatent into the active environment (venv or conda), or into a new .venv with the
#    CPU build of torch when none is active (launch/python_env.sh).
# 2. If no SLURM cluster answers (no `sbatch`, or `sinfo` fails) it starts the single-machine one
#    (launch/local_cluster.sh up; needs root) and stops it at the end unless --keep-cluster.
# 3. Submits launch/pretrain_longnet.sh (examples/tiny/longnet.yaml), or launch/pretrain_F.sh with
#    --family F (gpt, longnet, mhmoe, ...), with `sbatch --parsable`, waits for it
#    (at most QUICKSTART_TIMEOUT seconds, default 1800), then prints the log, tensorboard and
#    checkpoint paths and the first and last training `lm loss`. Exits non-zero if the job failed.
# 4. Plots the run (tools/plot_runs.py -> RUN_DIR/runs.png) and prints the next steps (activating the
#    environment in a new shell, tensorboard, generate, convert) and each phase's time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TIMEOUT=${QUICKSTART_TIMEOUT:-1800}

KEEP_CLUSTER=0
FAMILY=longnet
TRAINER_ARGS=()
while (( $# )); do
    case $1 in
        --keep-cluster) KEEP_CLUSTER=1 ;;
        --family) FAMILY=${2:?--family needs a name}; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) TRAINER_ARGS+=("$1") ;;
    esac
    shift
done
SCRIPT=launch/pretrain_$FAMILY.sh
if [[ ! -f $SCRIPT ]]; then
    echo "[quickstart] --family $FAMILY: there is no $SCRIPT; choose one of:" \
        $(ls launch/pretrain_*.sh | sed 's#launch/pretrain_\(.*\)\.sh#\1#') >&2
    exit 2
fi

say() { echo "[quickstart] $*"; }
PHASES=()
phase_done() { PHASES+=("$1 $(( SECONDS - PHASE_START ))s"); PHASE_START=$SECONDS; }
PHASE_START=$SECONDS

# ---------------------------------------------------------------- 1. environment
# shellcheck disable=SC1091
source "$ROOT/launch/python_env.sh"   # sets and exports PYTHON (the job's tasks use it too)
say "using $PYTHON"
phase_done install

# ---------------------------------------------------------------- 2. cluster
STARTED_CLUSTER=0
stop_cluster() {
    if [[ $STARTED_CLUSTER == 1 ]]; then
        if [[ $KEEP_CLUSTER == 1 ]]; then
            say "local cluster left running; stop it with: bash $ROOT/launch/local_cluster.sh down"
        else
            bash "$ROOT/launch/local_cluster.sh" down
        fi
    fi
}
trap stop_cluster EXIT
if ! command -v sbatch >/dev/null 2>&1 || ! timeout 15 sinfo -h >/dev/null 2>&1; then
    say "no SLURM cluster answers: starting the local one (launch/local_cluster.sh up)"
    STARTED_CLUSTER=1
    bash "$ROOT/launch/local_cluster.sh" up
fi
phase_done cluster

# ---------------------------------------------------------------- 3. job
mkdir -p runs/logs
JOB=$(sbatch --parsable "$SCRIPT" "${TRAINER_ARGS[@]}")
JOB=${JOB%%;*}
say "submitted job $JOB (sbatch $SCRIPT ${TRAINER_ARGS[*]})"

field() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<"$2" | head -n1; }
LOG=$(field StdOut "$(scontrol show job "$JOB")")
say "log: $LOG"

start=$SECONDS
last=""
while squeue -h -j "$JOB" 2>/dev/null | grep -q .; do
    if (( SECONDS - start > TIMEOUT )); then
        say "job $JOB still not finished after ${TIMEOUT}s: cancelling it"
        scancel "$JOB" || true
        tail -n 40 "$LOG" 2>/dev/null || true
        exit 1
    fi
    state=$(squeue -h -j "$JOB" -o %T 2>/dev/null || true)
    iter=$(grep -o 'iteration *[0-9]*/ *[0-9]*' "$LOG" 2>/dev/null | tail -n1 | tr -s ' ' || true)
    now="${state:-?} ${iter}"
    if [[ $now != "$last" ]]; then say "$(( SECONDS - start ))s: job $JOB $now"; last=$now; fi
    sleep 3
done

INFO=$(scontrol show job "$JOB")
STATE=$(field JobState "$INFO")
EXIT=$(field ExitCode "$INFO")
RUN_DIR=$(sed -n 's/.*megalatent.*\] run dir: //p' "$LOG" | tail -n1)
losses=$(grep 'iteration *[0-9]*/' "$LOG" | grep -o 'lm loss: [^ |]*' | sed 's/lm loss: //' || true)
phase_done "job (queue + training)"
say "job $JOB: JobState=$STATE ExitCode=$EXIT after $(( SECONDS - start ))s"
say "log:             $LOG"
say "tensorboard dir: $RUN_DIR/tensorboard   (tensorboard --logdir $RUN_DIR/tensorboard)"
say "checkpoint dir:  $RUN_DIR/checkpoints"
if [[ $STATE != COMPLETED || $EXIT != 0:0 ]]; then
    say "job failed; last lines of the log:"
    tail -n 40 "$LOG" || true
    exit 1
fi
say "lm loss: first (iteration 1) $(head -n1 <<<"$losses"), last $(tail -n1 <<<"$losses")"
if "$PYTHON" tools/plot_runs.py "$RUN_DIR" --output "$RUN_DIR/runs.png" >/dev/null; then
    say "curves:          $RUN_DIR/runs.png   (loss, grad norm, tokens/s, lr vs tokens)"
fi
phase_done plot

# ---------------------------------------------------------------- 4. next steps
ACTIVATE=""
if [[ $PYTHON == "$ROOT/.venv/bin/python" ]]; then
    ACTIVATE="source $ROOT/.venv/bin/activate"
elif [[ -n ${VIRTUAL_ENV:-} ]]; then
    ACTIVATE="source $VIRTUAL_ENV/bin/activate"
elif [[ -n ${CONDA_DEFAULT_ENV:-} ]]; then
    ACTIVATE="conda activate $CONDA_DEFAULT_ENV"
fi
case $FAMILY in
    latentlm) GENERATE="python tools/generate.py --load $RUN_DIR/checkpoints --classes 0 1 2 3 --output digits.png" ;;
    longvit) GENERATE="" ;;  # a classifier: nothing to generate
    *) GENERATE="python tools/generate.py --load $RUN_DIR/checkpoints --prompt 'def main(' --max-new-tokens 64" ;;
esac
echo "[quickstart] times: $(IFS=,; echo "${PHASES[*]}" | sed 's/,/, /g'); total ${SECONDS}s"
echo "[quickstart] next steps, in a new shell:"
echo "  cd $ROOT${ACTIVATE:+ && $ACTIVATE}   # megalatent's environment: the commands below need it"
echo "  tensorboard --logdir $RUN_DIR/tensorboard   # the curves, live"
echo "  python tools/plot_runs.py $RUN_DIR --output runs.png   # as a PNG; give several runs to compare them"
[[ -n $GENERATE ]] && echo "  $GENERATE"
echo "  python tools/convert_checkpoint.py to-torch --load $RUN_DIR/checkpoints --output $RUN_DIR/model.pt"
echo "  RUN_DIR=$RUN_DIR sbatch $SCRIPT --train-iters 500   # continue this run (it resumes) to 500 iterations"
