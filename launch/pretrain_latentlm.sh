#!/usr/bin/env bash
# LatentLM pretraining: next-token diffusion over σ-VAE latents of the embedded digits, class-conditional, or
# with LATENTLM_DATA=documents on interleaved text+image documents (captioned digits). Any arguments are
# passed to the trainer (python -m megalatent.pretrain).
#   mkdir -p runs/logs && sbatch launch/pretrain_latentlm.sh [--train-iters 100 ...]   # SLURM batch job
#     (from the repo root: --output is relative to it, and SLURM fails a job whose log dir is missing)
#   bash launch/pretrain_latentlm.sh [...]                          # local: torchrun, NPROC_PER_NODE procs
# On a GPU cluster choose the shape on the command line (the header stays GPU-free because a
# cluster rejects GRES/partitions it does not define, e.g. the local one of launch/local_cluster.sh):
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 [--partition P] launch/pretrain_latentlm.sh
# Environment knobs (CONFIG, RUN_DIR, PYTHON, ...) are documented in launch/common.sh.
#SBATCH --job-name=megalatent-latentlm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --output=runs/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --time=04:00:00
set -uo pipefail
LATENTLM_DATA=${LATENTLM_DATA:-classes}
case $LATENTLM_DATA in
    classes) CONFIG=${CONFIG:-examples/tiny/latentlm.yaml} ;;
    documents) CONFIG=${CONFIG:-examples/tiny/latentlm-docs.yaml} ;;
    *) echo "[megalatent] LATENTLM_DATA must be classes or documents, got '$LATENTLM_DATA'" >&2; exit 2 ;;
esac
# sbatch runs a copy of this script from the spool dir: find the repo via the submitted path.
for _r in "${MEGALATENT_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "$(dirname "$(scontrol show job \
    "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=//p')")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $_r/launch/common.sh ]] && break; done
# The σ-VAE image tokenizer the sequences are made of: LATENT_TOKENIZER (default runs/vae-digits), trained
# on the embedded digits first if it does not exist yet (about half a minute on a CPU; VAE_ARGS, e.g.
# "--train-iters 2000", are tools/train_vae.py's flags), unless the arguments name one with --latent-tokenizer.
if [[ " $* " != *" --latent-tokenizer"* ]]; then
    LATENT_TOKENIZER=${LATENT_TOKENIZER:-$_r/runs/vae-digits}
    if [[ ! -f $LATENT_TOKENIZER/config.json ]]; then
        echo "[megalatent] training the σ-VAE tokenizer into $LATENT_TOKENIZER"
        # shellcheck disable=SC2086  # VAE_ARGS is a list of flags
        (cd "$_r" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${PYTHON:-python}" tools/train_vae.py \
            --save "$LATENT_TOKENIZER" ${VAE_ARGS:-}) || exit 1
    fi
    set -- "$@" --latent-tokenizer "$LATENT_TOKENIZER"
    # Documents: DOCUMENTS (default runs/digit-docs) from tools/preprocess_interleaved.py --demo digits, written
    # first if missing, unless the arguments name the data with --data-path (and then --tokenizer-model). Their
    # captions are tokenized by the default corpus's tokenizer, from the cache the trainer's arguments name
    # (--data-cache-path, --default-corpus-vocab-size), as the trainer would find it.
    if [[ $LATENTLM_DATA == documents && " $* " != *" --data-path"* ]]; then
        DOCUMENTS=${DOCUMENTS:-$_r/runs/digit-docs}
        if [[ ! -f ${DOCUMENTS}_text_document_latents.json ]]; then
            _corpus=()
            _args=("$@")
            for ((_i = 0; _i < ${#_args[@]}; _i++)); do
                case ${_args[_i]} in
                    --data-cache-path=* | --default-corpus-vocab-size=*) _corpus+=("${_args[_i]}") ;;
                    --data-cache-path | --default-corpus-vocab-size) _corpus+=("${_args[@]:_i:2}") ;;
                esac
            done
            echo "[megalatent] writing the captioned digits as interleaved documents into $DOCUMENTS"
            (cd "$_r" && "${PYTHON:-python}" tools/preprocess_interleaved.py --demo digits --no-progress \
                --latent-tokenizer "$LATENT_TOKENIZER" --output-prefix "$DOCUMENTS" "${_corpus[@]}") || exit 1
        fi
        _text_model=$("${PYTHON:-python}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["text_tokenizer_model"])' \
            "${DOCUMENTS}_text_document_latents.json") || exit 1
        set -- "$@" --data-path "${DOCUMENTS}_text_document" --tokenizer-model "$_text_model"
    fi
elif [[ $LATENTLM_DATA == documents && " $* " != *" --data-path"* ]]; then
    echo "[megalatent] with --latent-tokenizer, LATENTLM_DATA=documents needs --data-path and --tokenizer-model" \
         "(tools/preprocess_interleaved.py prints them)" >&2
    exit 2
fi
source "$_r/launch/common.sh"
