#!/usr/bin/env bash
# Stop the cluster that start.sh started from STATE_DIR: its jobs, both slurmd, slurmctld and
# its private munged. Safe to run twice; touches no process that start.sh did not start.
#   tests/cluster/stop.sh [STATE_DIR]      (default STATE_DIR: ${TMPDIR:-/tmp}/dmhpc-slurm)
set -uo pipefail

STATE=$(realpath -m "${1:-${TMPDIR:-/tmp}/dmhpc-slurm}")
export SLURM_CONF=$STATE/slurm.conf

say() { echo "stop.sh: $*" >&2; }
# The daemon named $2 whose pid is in file $1 is running (not a recycled pid, not a zombie).
alive() {
    local pid stat
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] &&
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) && [ "$(cut -d' ' -f3 <<<"$stat")" != Z ]
}

# TERM the daemon in pid file $1 (named $2), give it 10 s, then KILL it.
stop_daemon() {
    alive "$1" "$2" || return 0
    local pid
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do
        alive "$1" "$2" || { say "stopped $2 (pid $pid)"; return 0; }
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null
    say "killed $2 (pid $pid): it ignored SIGTERM for 10 s"
}

if alive "$STATE/run/slurmctld.pid" slurmctld; then
    # Kill jobs first: their processes die with their step daemons only while slurmd is up.
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "killing jobs $jobs"
        # shellcheck disable=SC2086
        scancel --signal=KILL --full $jobs 2>/dev/null
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 40); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
fi

stop_daemon "$STATE/run/slurmd-n1.pid" slurmd
stop_daemon "$STATE/run/slurmd-n2.pid" slurmd
stop_daemon "$STATE/run/slurmctld.pid" slurmctld
stop_daemon "$STATE/munge/munged.pid" munged

# Step daemons (slurmstepd) outlive a stopped slurmd; start.sh marked everything it started.
leftovers=$(grep -lzxF "DMHPC_SLURM_STATE=$STATE" /proc/[0-9]*/environ 2>/dev/null |
    cut -d/ -f3 | grep -vx "$$" | tr '\n' ' ')
if [ -n "${leftovers// /}" ]; then
    say "killing leftover processes $leftovers"
    # shellcheck disable=SC2086
    kill -KILL $leftovers 2>/dev/null
fi
exit 0
