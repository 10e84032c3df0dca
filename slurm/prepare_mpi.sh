#!/usr/bin/env bash
#SBATCH --job-name=dmhpc-prepare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
#SBATCH --no-requeue
#
# Convert a data set to sharded HDF5 with one MPI rank per Slurm task, optionally rendering the
# embedded GalSim data set first (also under MPI):
#   sbatch [SBATCH FLAGS] slurm/prepare_mpi.sh DATA_CONFIG [--synth N_PER_CLASS] [--synth-seed S] [PREPARE OPTIONS]
#   sbatch slurm/prepare_mpi.sh configs/data/embedded.yaml --synth 2000
#   sbatch -N 2 --ntasks-per-node=16 slurm/prepare_mpi.sh configs/data/deepmerge2-simsim.yaml --root /path/to/zenodo
# PREPARE OPTIONS go to `dmhpc prepare --data-config DATA_CONFIG` (--root DIR, --out DIR, ...).
# --synth N runs `dmhpc synth --out ROOT --n-per-class N --seed S` first, ROOT being --root or the
# config's root, with --survey when the config reads the survey files (both after any --set). The
# job can be submitted again after any earlier run (finished, killed, timed out): a finished render
# of the same N and S in ROOT (its meta.json; one with the survey also serves a config without) is
# kept, an unfinished one is rendered again; a finished render of other settings is an error unless
# --overwrite, which then goes to synth too. PYTHON names the environment's interpreter (default:
# python on PATH).
#
# Ranks start with `srun --mpi=pmi2`, which MPICH (the mpich wheel included) and Intel MPI
# speak (dmhpc picks MPICH's OFI netmod there: docs/cluster.md); for Open MPI submit with
# SLURM_MPI_TYPE=pmix. Without an --mpi plugin every task would be an MPI world of its own,
# converting the whole data set into the same files.
set -euo pipefail

usage="usage: sbatch [SBATCH FLAGS] slurm/prepare_mpi.sh DATA_CONFIG [--synth N_PER_CLASS] [--synth-seed S] [PREPARE OPTIONS]"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "prepare_mpi.sh: not in a SLURM job; $usage" >&2; exit 2; }
[ $# -ge 1 ] || { echo "prepare_mpi.sh: $usage" >&2; exit 2; }
config=$1
shift
[ -f "$config" ] || { echo "prepare_mpi.sh: error: data config '$config' not found (in $PWD)" >&2; exit 2; }
python=${PYTHON:-python}
command -v "$python" >/dev/null || { echo "prepare_mpi.sh: error: no '$python'; activate the environment before sbatch or set PYTHON" >&2; exit 2; }

synth_n="" synth_seed=0 root="" overwrite="" sets=() prepare_args=()
while [ $# -gt 0 ]; do
    case $1 in
    --synth) synth_n=${2:?--synth needs N_PER_CLASS}; shift 2 ;;
    --synth-seed) synth_seed=${2:?--synth-seed needs S}; shift 2 ;;
    --root) root=${2:?--root needs DIR}; prepare_args+=("$1" "$2"); shift 2 ;;
    --root=*) root=${1#--root=}; prepare_args+=("$1"); shift ;;
    --overwrite) overwrite=--overwrite; prepare_args+=("$1"); shift ;;
    --set) sets+=("${2:?--set needs KEY=VALUE}"); prepare_args+=("$1" "$2"); shift 2 ;;
    --set=*) sets+=("${1#--set=}"); prepare_args+=("$1"); shift ;;
    *) prepare_args+=("$1"); shift ;;
    esac
done

# srun takes the tasks from the allocation but, since Slurm 22.05, not --cpus-per-task: each rank
# would get one CPU (bound to it where task/affinity is on) whatever the job asked for.
mpi_run=(srun --mpi="${SLURM_MPI_TYPE:-pmi2}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 --export=ALL
         "$python" -m dmhpc)

if [ -n "$synth_n" ]; then
    # The config as prepare reads it, --set included (its problems are prepare's one line, before
    # anything runs): the render's folder, and --survey when a domain reads the survey files
    # (configs/data/embedded-survey.yaml).
    settings=$("$python" - "$config" "$root" ${sets[@]+"${sets[@]}"} <<'PY'
import sys
from dmhpc.data.prepare import load_data_config, read_data_config
from dmhpc.data.synth import SURVEY_FILES
from dmhpc.errors import DmhpcError
config, root, sets = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
try:
    domains = load_data_config(config, root=root, out=".", sets=sets)
except DmhpcError as exc:
    print(f"prepare_mpi.sh: error: {exc}", file=sys.stderr)
    sys.exit(2)
files = [f for d in domains for f in (d.images, d.labels, d.objects) if f is not None]
print("--survey" if any(f.name in SURVEY_FILES for f in files) else "-")
print(root or read_data_config(config, sets)["root"])
PY
)
    survey=${settings%%$'\n'*}
    [ "$survey" = "-" ] && survey=""
    root=${settings#*$'\n'}
    # The settings of the finished render in root, as synth flags (empty: none finished there). Knobs
    # and --augment count: a render with other ones holds other images under the same N and seed.
    rendered=$("$python" - "$root" <<'PY'
import json, sys
from dmhpc.data.synth import DEFAULT_KNOBS, KNOB_FLAGS
try:
    with open(f"{sys.argv[1]}/meta.json") as f:
        meta = json.load(f)
    flags = f"--n-per-class {meta['n_per_class']} --seed {meta['seed']}" + " --augment" * bool(meta["augment"])
    flags += " --survey" * ("survey" in meta)
    flags += "".join(f" {KNOB_FLAGS[k][0]} {v:g}" for k, v in meta["knobs"].items() if v != getattr(DEFAULT_KNOBS, k))
except FileNotFoundError:
    sys.exit()
except Exception:
    flags = "unreadable settings"
print(flags)
PY
)
    wanted="--n-per-class $synth_n --seed $synth_seed${survey:+ $survey}"
    # A render with the survey holds everything one without it does.
    if [ "$rendered" = "$wanted" ] || [ "$rendered" = "$wanted --survey" ]; then
        echo "prepare_mpi.sh: $root already holds the render $rendered (meta.json); not rendering it again"
    else
        if [ -n "$rendered" ] && [ -z "$overwrite" ]; then
            echo "prepare_mpi.sh: error: $root holds a finished render of other settings ($rendered, from its" \
                 "meta.json) than --synth asks ($wanted); pass --overwrite to replace it, or choose another --root" >&2
            exit 2
        fi
        synth=("${mpi_run[@]}" synth --out "$root" --n-per-class "$synth_n" --seed "$synth_seed" ${survey:+"$survey"}
               ${overwrite:+"$overwrite"})
        echo "prepare_mpi.sh: job $SLURM_JOB_ID, ${SLURM_NTASKS:-${SLURM_NNODES:-1}} ranks: $(printf '%q ' "${synth[@]}")"
        "${synth[@]}"
    fi
fi

prepare=("${mpi_run[@]}" prepare --data-config "$config" ${prepare_args[@]+"${prepare_args[@]}"})  # empty arrays: bash < 4.4
echo "prepare_mpi.sh: job $SLURM_JOB_ID, ${SLURM_NTASKS:-${SLURM_NNODES:-1}} ranks: $(printf '%q ' "${prepare[@]}")"
"${prepare[@]}"
