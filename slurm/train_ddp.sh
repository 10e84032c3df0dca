#!/usr/bin/env bash
#SBATCH --job-name=dmhpc-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@90
#SBATCH --requeue
#
# Data-parallel training on SLURM, from one node to many, surviving time limits and preemption:
#   sbatch [SBATCH FLAGS] slurm/train_ddp.sh CONFIG [dotted.key=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 slurm/train_ddp.sh configs/resnet18-dann.yaml seed=1
# The #SBATCH lines are defaults; a flag given to sbatch wins. GPUs are asked for at submit time
# (--gpus-per-node=N): a GPU request here would make the job unschedulable on CPU-only nodes.
# --cpus-per-task is per task: per node with the default one task per node (torchrun shares them
# among its ranks' data loaders); with --ntasks-per-node=R each node gets R times as many.
#
# Environment (exported by sbatch from the submitting shell, like the active virtual env):
#   PYTHON          interpreter of the environment to train with (default: python on PATH)
#   DMHPC_LAUNCH    torchrun: one torchrun per node, c10d rendezvous (default);
#                   srun: one srun task per rank (sites that discourage torchrun)
#   NPROC_PER_NODE  ranks per node (default: GPUs Slurm gave the node, else --ntasks-per-node, else 1)
#
# Near the time limit (--signal=B:USR2@90) or on `scancel --signal=USR2 --batch JOB`, the ranks are
# told to checkpoint and stop, and the job requeues itself; the next run resumes (--resume auto)
# and appends to the same log. See docs/cluster.md.
set -euo pipefail
# A USR2 (or USR1) before lib.sh is sourced (scontrol below) would kill the shell: noted, as lib.sh notes it.
DMHPC_EARLY_USR2=0
trap 'DMHPC_EARLY_USR2=1' USR1 USR2

usage="usage: sbatch [SBATCH FLAGS] slurm/train_ddp.sh CONFIG [dotted.key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "train_ddp.sh: not in a SLURM job; $usage" >&2; exit 2; }
[ $# -ge 1 ] || { echo "train_ddp.sh: $usage" >&2; exit 2; }

# sbatch runs a copy of this script from slurmd's spool directory; the job's Command still
# names the submitted script (relative to the submit directory, followed by the arguments).
# A heterogeneous job's record holds one Command per component; a relative one is the submit
# directory's (under sbatch --chdir the job runs elsewhere).
here=$(dirname "$0")
if [ ! -f "$here/lib.sh" ]; then
    job=$(scontrol show job "$SLURM_JOB_ID" 2>&1) ||
        { echo "train_ddp.sh: error: cannot find lib.sh: scontrol show job $SLURM_JOB_ID failed: ${job##*$'\n'}" >&2; exit 2; }
    command=$(printf '%s\n' "$job" | awk '!found && sub(/^ *Command=/, "") { print; found = 1 }')
    command=${command%" $*"}
    [ "${command#/}" != "$command" ] || command="${SLURM_SUBMIT_DIR:-$PWD}/$command"
    here=$(dirname "$command")
fi
[ -f "$here/lib.sh" ] || { echo "train_ddp.sh: error: cannot find lib.sh in '$here', next to the submitted script" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$here/lib.sh"

config=$1
shift
[ -f "$config" ] || { echo "train_ddp.sh: error: config '$config' not found (in $PWD)" >&2; exit 2; }
command -v "${PYTHON:-python}" >/dev/null || { echo "train_ddp.sh: error: no '${PYTHON:-python}'; activate the environment before sbatch or set PYTHON" >&2; exit 2; }

dmhpc_launch_command -m dmhpc.train --config "$config" --resume auto "$@" || exit 2
echo "train_ddp.sh: job $SLURM_JOB_ID run ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $(printf '%q ' "${DMHPC_LAUNCH_CMD[@]}")"
rc=0
dmhpc_run_requeueable "${DMHPC_LAUNCH_CMD[@]}" || rc=$?
exit "$rc"
