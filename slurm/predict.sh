#!/usr/bin/env bash
#SBATCH --job-name=dmhpc-predict
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@90
#SBATCH --requeue
#
# A merger catalog from a trained run, on every node and GPU of the allocation:
#   sbatch [SBATCH FLAGS] slurm/predict.sh RUN (--data DIR | --images FILE | --catalog TABLE ...) --out CATALOG [PREDICT OPTIONS]
#   sbatch --nodes=4 --gpus-per-node=4 slurm/predict.sh runs/r18 --catalog /scratch/survey.fits --file-column file \
#       --out /scratch/candidates.parquet --tta
# Like slurm/train_ddp.sh: one torchrun per node (or DMHPC_LAUNCH=srun: one task per GPU), PYTHON
# names the environment's interpreter, NPROC_PER_NODE overrides the ranks per node. Each rank
# writes its parts of the catalog as it goes; near the time limit (--signal=B:USR2@90) every rank
# finishes its current part and the job requeues itself; the next start skips the finished parts.
# The last start merges them into CATALOG. See docs/catalog.md.
set -euo pipefail
# A USR2 (or USR1) before lib.sh is sourced (scontrol below) would kill the shell: noted, as lib.sh notes it.
DMHPC_EARLY_USR2=0
trap 'DMHPC_EARLY_USR2=1' USR1 USR2

usage="usage: sbatch [SBATCH FLAGS] slurm/predict.sh RUN (--data DIR | --images FILE | --catalog TABLE) --out CATALOG [OPTIONS]"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "predict.sh: not in a SLURM job; $usage" >&2; exit 2; }
[ $# -ge 1 ] || { echo "predict.sh: $usage" >&2; exit 2; }

# A heterogeneous job's record holds one Command per component; a relative one is the submit
# directory's (under sbatch --chdir the job runs elsewhere).
here=$(dirname "$0")
if [ ! -f "$here/lib.sh" ]; then
    job=$(scontrol show job "$SLURM_JOB_ID" 2>&1) ||
        { echo "predict.sh: error: cannot find lib.sh: scontrol show job $SLURM_JOB_ID failed: ${job##*$'\n'}" >&2; exit 2; }
    command=$(printf '%s\n' "$job" | awk '!found && sub(/^ *Command=/, "") { print; found = 1 }')
    command=${command%" $*"}
    [ "${command#/}" != "$command" ] || command="${SLURM_SUBMIT_DIR:-$PWD}/$command"
    here=$(dirname "$command")
fi
[ -f "$here/lib.sh" ] || { echo "predict.sh: error: cannot find lib.sh in '$here', next to the submitted script" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$here/lib.sh"

run=$1
shift
[ -f "$run/config.yaml" ] || { echo "predict.sh: error: '$run' is not a dmhpc run directory (no config.yaml, in $PWD)" >&2; exit 2; }
command -v "${PYTHON:-python}" >/dev/null || { echo "predict.sh: error: no '${PYTHON:-python}'; activate the environment before sbatch or set PYTHON" >&2; exit 2; }

# --run-dir: under torchrun, --run would be taken for an abbreviation of torchrun's --run-path.
dmhpc_launch_command -m dmhpc predict --run-dir "$run" "$@" || exit 2
echo "predict.sh: job $SLURM_JOB_ID run ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $(printf '%q ' "${DMHPC_LAUNCH_CMD[@]}")"
rc=0
dmhpc_run_requeueable "${DMHPC_LAUNCH_CMD[@]}" || rc=$?
exit "$rc"
