#!/usr/bin/env bash
# A real single-machine SLURM cluster for tests, CI and the quick start.
#
#   bash launch/local_cluster.sh up [1|2]   # slurmctld + 1 or 2 (default 2) emulated slurmd nodes
#   bash launch/local_cluster.sh status
#   bash launch/local_cluster.sh down
#
# Runs Debian's Slurm (22.05) and munge as plain background daemons, as root, without systemd
# or cgroups. Config, state, logs and pid files live in ${MEGALATENT_SLURM_DIR:-/tmp/megalatent-slurm};
# a private munged (own key and socket) authenticates. The nodes mlnode1/mlnode2 listen on
# 127.0.0.1 with distinct ports (multiple-slurmd mode) and each claims MEGALATENT_SLURM_CPUS
# CPUs (default 4, via SlurmdParameters=config_overrides), so 1 node x 2 tasks and
# 2 nodes x 1 task jobs both run, and two such jobs run side by side.
#
# Client commands (sbatch, srun, sinfo, ...) find the cluster through /etc/slurm/slurm.conf, which
# `up` makes a symlink to the private config (it refuses to replace a slurm.conf it did not write)
# and `down` removes. The node names are appended once to /etc/hosts if they do not resolve.
# `up` installs slurmctld/slurmd/slurm-client/munge with apt-get when slurmctld is missing.
# Ports 6817 (slurmctld) and 6818+ (slurmd) are fixed: one local cluster per machine.
#
# Environment knobs:
#   MEGALATENT_SLURM_DIR      private directory (default /tmp/megalatent-slurm)
#   MEGALATENT_SLURM_CPUS     CPUs each emulated node claims (default 4)
#   MEGALATENT_SLURM_MEM_MB   memory each node claims, in MB (default 8192; DefMemPerCPU=1024)
#   MEGALATENT_SLURM_TIMEOUT  seconds `up` waits for the nodes to become idle (default 60)
set -euo pipefail

DIR=${MEGALATENT_SLURM_DIR:-/tmp/megalatent-slurm}
CPUS=${MEGALATENT_SLURM_CPUS:-4}
MEM_MB=${MEGALATENT_SLURM_MEM_MB:-8192}
UP_TIMEOUT=${MEGALATENT_SLURM_TIMEOUT:-60}
ETC_CONF=/etc/slurm/slurm.conf
CONF=$DIR/etc/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
NODE_PREFIX=mlnode
SLURMD_BASE_PORT=6818
MARKER="# megalatent local SLURM cluster (launch/local_cluster.sh)"
SELF="bash $(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] ERROR: $*" >&2; exit 1; }

node_names() { local i; for ((i = 1; i <= $1; i++)); do echo "$NODE_PREFIX$i"; done; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Kill the processes whose pids are in the given pid files (if alive): SIGTERM to all, wait up to
# 15 s for them to exit, then SIGKILL what is left.
kill_pidfiles() {
    local f pid pids=() i
    for f in "$@"; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null && pids+=("$pid"); fi
        rm -f "$f"
    done
    for ((i = 0; i < 75; i++)); do
        local alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        pids=("${alive[@]}")
        [[ ${#pids[@]} -eq 0 ]] && return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

running_nodes() { [[ -f $DIR/nodes ]] && cat "$DIR/nodes" || echo 0; }

# 0 if our daemons for $(running_nodes) nodes are all alive and slurmctld answers.
is_up() {
    local n name
    n=$(running_nodes)
    [[ $n -ge 1 ]] || return 1
    pid_alive "$MUNGE_DIR/munged.pid" && pid_alive "$DIR/run/slurmctld.pid" || return 1
    for name in $(node_names "$n"); do pid_alive "$DIR/run/slurmd-$name.pid" || return 1; done
    SLURM_CONF=$CONF timeout 10 sinfo -h >/dev/null 2>&1
}

ensure_packages() {
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 \
        || ! command -v sbatch >/dev/null 2>&1; then
        log "installing slurmctld slurmd slurm-client munge (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld still missing after apt-get install"
}

ensure_hosts() {
    local names=("$@") missing=() n
    for n in "${names[@]}"; do getent hosts "$n" >/dev/null 2>&1 || missing+=("$n"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    # Append (never rewrite: /etc/hosts is often a bind mount); only names that do not resolve yet.
    echo "127.0.0.1 ${missing[*]} $MARKER" >>/etc/hosts || die "cannot add ${missing[*]} to /etc/hosts"
    log "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
}

write_conf() {
    local n=$1 host i
    host=$(hostname -s)
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    {
        echo "$MARKER"
        echo "# Generated; edit launch/local_cluster.sh instead."
        cat <<EOF
ClusterName=megalatent
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=$SLURMD_BASE_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
EOF
        for ((i = 1; i <= n; i++)); do
            echo "NodeName=$NODE_PREFIX$i NodeAddr=127.0.0.1 NodeHostname=$host Port=$((SLURMD_BASE_PORT + i - 1)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
        done
        echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
}

link_etc_conf() {
    mkdir -p "$(dirname "$ETC_CONF")"
    if [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
        if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then return 0; fi
        if [[ -L $ETC_CONF ]] || head -n1 "$ETC_CONF" | grep -qF "$MARKER"; then
            rm -f "$ETC_CONF"   # written by an earlier run of this script (maybe another dir)
        else
            die "$ETC_CONF exists and was not written by this script; not replacing it"
        fi
    fi
    ln -s "$CONF" "$ETC_CONF"
}

start_munge() {
    mkdir -p "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"  # munged requires the socket dir to be world-executable
    chmod 400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged failed to start; see $MUNGE_DIR/munged.log"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || die "munge round trip failed; see $MUNGE_DIR/munged.log"
}

cmd_down() {
    local name
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Cancel jobs first so no slurmstepd/job processes outlive the daemons.
        if SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null | grep -q .; then
            SLURM_CONF=$CONF timeout 10 scancel --partition=local 2>/dev/null || true
            for _ in $(seq 1 30); do
                SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null | grep -q . || break
                sleep 0.5
            done
        fi
    fi
    local files=()
    for name in $(node_names 2); do files+=("$DIR/run/slurmd-$name.pid"); done
    kill_pidfiles "${files[@]}" "$DIR/run/slurmctld.pid"
    kill_pidfiles "$MUNGE_DIR/munged.pid"   # last: slurmctld talks to munge while it shuts down
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
    rm -f "$DIR/nodes"
    log "down (logs kept in $DIR/log)"
}

cmd_status() {
    if is_up; then
        log "up with $(running_nodes) node(s); config $CONF"
        SLURM_CONF=$CONF sinfo -N -l
        SLURM_CONF=$CONF squeue
    else
        log "down"
        return 1
    fi
}

cmd_up() {
    local n=${1:-2} name deadline states
    [[ $n == 1 || $n == 2 ]] || die "usage: local_cluster.sh up [1|2]"
    [[ $(id -u) == 0 ]] || die "must run as root (starts munged/slurmctld/slurmd)"
    if is_up && [[ $(running_nodes) == "$n" ]]; then
        link_etc_conf
        log "already up with $n node(s)"
        log "stop it with: $SELF down"
        return 0
    fi
    ensure_packages
    cmd_down >/dev/null
    ensure_hosts $(node_names "$n")
    # Keep $DIR/state: slurmctld then recovers its job id counter, so job ids (and the default run
    # dirs runs/<name>-<job id>) do not start again at 1 after a restart. Recovered jobs are cancelled below.
    rm -rf "$DIR/spool" "$DIR/run"
    write_conf "$n"
    link_etc_conf
    start_munge
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    for name in $(node_names "$n"); do
        mkdir -p "$DIR/spool/$name"
        slurmd -N "$name" -f "$CONF" || die "slurmd $name failed; see $DIR/log/slurmd-$name.log"
    done
    echo "$n" >"$DIR/nodes"
    deadline=$((SECONDS + UP_TIMEOUT))
    while :; do
        states=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        if grep -qE ' (drain|drng|drained|down)[*~#]?$' <<<"$states"; then   # recovered state from an earlier run
            timeout 10 scontrol update NodeName="$(node_names "$n" | paste -sd,)" State=RESUME 2>/dev/null || true
        fi
        if timeout 10 squeue -h -o %i 2>/dev/null | grep -q .; then   # jobs recovered from an earlier run
            timeout 10 scancel --partition=local 2>/dev/null || true
        fi
        if [[ $(grep -c ' idle$' <<<"$states") -eq $n ]]; then break; fi
        if ((SECONDS >= deadline)); then
            echo "$states" >&2
            tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
            die "nodes not idle after ${UP_TIMEOUT}s; logs in $DIR/log"
        fi
        sleep 1
    done
    sinfo -N
    log "up with $n node(s) ($CPUS CPUs each); config $CONF, logs $DIR/log"
    log "stop it with: $SELF down"
}

case ${1:-} in
    up) cmd_up "${2:-2}" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up [1|2] | down | status" >&2; exit 2 ;;
esac
