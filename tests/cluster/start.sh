#!/usr/bin/env bash
# Start a two-node SLURM cluster on this machine for dmhpc's tests:
#   tests/cluster/start.sh [STATE_DIR]      (root; default STATE_DIR: ${TMPDIR:-/tmp}/dmhpc-slurm)
# Installs slurm-wlm and munge when missing, starts a private munged, slurmctld and
# `slurmd -N n1`, `slurmd -N n2`, waits until both nodes answer, and prints on stdout
#   export SLURM_CONF=STATE_DIR/slurm.conf
# Running it again while the cluster runs starts only what is missing. Stop with stop.sh.
# Exit status 77 means the cluster cannot be had here (not root, packages not installable);
# the test fixture skips on it and fails on any other error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=$(realpath -m "${1:-${TMPDIR:-/tmp}/dmhpc-slurm}")
CONF=$STATE/slurm.conf
START_TIMEOUT_S=60

say() { echo "start.sh: $*" >&2; }
unavailable() { say "cannot start a cluster here: $*"; exit 77; }
fail() {
    say "error: $*"
    for log in "$STATE"/log/*.log "$STATE"/munge/munged.log; do
        [ -s "$log" ] && { echo "--- tail of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

# The daemon named $2 whose pid is in file $1 is running (not a recycled pid, not a zombie).
alive() {
    local pid stat
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] &&
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) && [ "$(cut -d' ' -f3 <<<"$stat")" != Z ]
}

[ "$(id -u)" = 0 ] || unavailable "must run as root (slurmd runs jobs as any user; packages may need installing)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || unavailable "slurm-wlm and munge are not installed and there is no apt-get"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"${TMPDIR:-/tmp}/dmhpc-slurm-apt.log" 2>&1 ||
        unavailable "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/dmhpc-slurm-apt.log)"
fi

# A Unix socket path is limited to 108 bytes.
mkdir -p "$STATE"/{ctld,run,log,spool/n1,spool/n2,munge}
chmod 755 "$STATE" "$STATE/munge"
[ ${#STATE} -le 80 ] || fail "STATE_DIR path is too long for a Unix socket: $STATE"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_conf() {
    local base found="" cpus mem_mb
    for base in $(seq 16817 3 16997); do
        if ! port_in_use "$base" && ! port_in_use $((base + 1)) && ! port_in_use $((base + 2)); then
            found=1
            break
        fi
    done
    [ -n "$found" ] || fail "no three free ports in 16817-16999"
    # The CPUs this process may use; GNU nproc reports OMP_NUM_THREADS instead where it is set (the
    # suite sets 1), and a node of 1 CPU refused every job asking for 2.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # Each slurmd checks RealMemory against the whole machine; half each keeps the sum honest.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    sed -e "s|@HOST@|$(hostname -s)|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@CTLD_PORT@|$base|" -e "s|@PORT_N1@|$((base + 1))|" -e "s|@PORT_N2@|$((base + 2))|" \
        -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
        -e "s|@FIRST_JOB_ID@|$(($(date +%s) % 60000000 + 1000))|" "$HERE/slurm.conf.in" >"$CONF"
}

# Ports are chosen when nothing runs: a restart after a reboot may find them taken.
if ! alive "$STATE/run/slurmctld.pid" slurmctld && ! alive "$STATE/run/slurmd-n1.pid" slurmd &&
    ! alive "$STATE/run/slurmd-n2.pid" slurmd; then
    write_conf
fi
export SLURM_CONF=$CONF

if ! alive "$STATE/munge/munged.pid" munged; then
    [ -s "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key"
    # --force: munged refuses a socket below a directory that not every user can traverse
    # (pytest's and many sites' temporary directories); all clients here run as root.
    munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" || fail "munged did not start"
fi

# stop.sh finds the job step daemons these leave behind by this variable in their environment.
export DMHPC_SLURM_STATE=$STATE
alive "$STATE/run/slurmctld.pid" slurmctld || slurmctld -f "$CONF" || fail "slurmctld did not start"
for node in n1 n2; do
    alive "$STATE/run/slurmd-$node.pid" slurmd || slurmd -f "$CONF" -N "$node" || fail "slurmd -N $node did not start"
done

deadline=$((SECONDS + START_TIMEOUT_S))
while :; do
    # A node with a running job reads mixed or allocated: a second start must accept those too.
    states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)
    ready=$(grep -cE '^n[12] (idle|mix|alloc|comp)$' <<<"$states" || true)
    [ "$ready" = 2 ] && break
    [ $SECONDS -lt $deadline ] || fail "nodes not idle after ${START_TIMEOUT_S}s; sinfo says: ${states:-nothing}"
    sleep 0.5
done
say "cluster up: nodes n1 n2 in partition debug (state in $STATE)"
echo "export SLURM_CONF=$CONF"
