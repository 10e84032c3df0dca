# shellcheck shell=bash disable=SC2034  # DMHPC_LAUNCH_CMD is this file's output
# Launching Python on every node of a SLURM allocation, and the requeue protocol.
# Sourced by slurm/train_ddp.sh, slurm/predict.sh and by the cluster tests (which launch a probe instead of the
# trainer through these same functions); defines functions, and keeps a USR2 that comes before
# the launch (below).

# A USR2 (the time-limit warning, `scancel --signal=USR2 --batch`), or a USR1 (a warning of
# `--signal=B:USR1@90`), that comes before the launch would kill the batch shell with its default
# action: the job ended FAILED, never requeued. It is noted from the script's first line (it sets
# the same trap) and here, and passed on once the ranks start.
DMHPC_EARLY_USR2=${DMHPC_EARLY_USR2:-0}
trap 'DMHPC_EARLY_USR2=1' USR1 USR2

# Set DMHPC_RDZV_ADDR and DMHPC_RDZV_PORT to where this job's ranks meet: the rule of
# dmhpc/rendezvous.py (first node's address, 29500 + (job id + 889 x step id) % 2000), which the trainer's bootstrap
# and the submitit jobs follow too. It needs only the standard library and dmhpc, not torch.
dmhpc_rendezvous() {
    local out
    # The batch shell is in no step: step variables here came with the environment of a shell that
    # ran inside one (sbatch from an `srun --pty bash`), and one naming a node of this job put the
    # rendezvous on that node while the first node hosted it; a step of one node let a loopback
    # MASTER_ADDR through for a job of several.
    out=$(env -u SLURM_STEP_NODELIST -u SLURM_STEP_ID -u SLURM_STEP_NUM_NODES \
        "${PYTHON:-python}" -m dmhpc.rendezvous) || return 1
    read -r DMHPC_RDZV_ADDR DMHPC_RDZV_PORT <<<"$out"
}

# The CPUs of the job's smallest node, from SLURM_JOB_CPUS_PER_NODE ("2,1", "16(x3),8"): a step
# asks every node for as many, and the batch node's own count (SLURM_CPUS_ON_NODE) made one that
# no smaller node could give ("More processors requested than permitted").
dmhpc_cpus_per_node() {
    local item n least=""
    for item in ${SLURM_JOB_CPUS_PER_NODE:+${SLURM_JOB_CPUS_PER_NODE//,/ }}; do
        n=${item%%(*}
        [[ $n =~ ^[0-9]+$ ]] || continue
        if [ -z "$least" ] || [ "$n" -lt "$least" ]; then least=$n; fi
    done
    echo "${least:-${SLURM_CPUS_ON_NODE:-1}}"
}

# Processes per node: NPROC_PER_NODE, else the GPUs Slurm gave the node (SLURM_GPUS_ON_NODE in a
# batch job or step; under salloc, whose shell has none, the --gpus-per-node asked), else the tasks
# per node asked of sbatch (--ntasks-per-node=4 on CPU nodes), else 1. In a job nvidia-smi is not asked:
# where the site does not confine devices it lists the node's GPUs, other jobs' among them. Outside
# one (a shell on a GPU machine), its count, else 1.
dmhpc_nproc_per_node() {
    local gpus per_node=${SLURM_GPUS_PER_NODE:-}
    per_node=${per_node##*:}  # "a100:4" or "4"
    if [ -n "${NPROC_PER_NODE:-}" ]; then
        # Checked: 0 or "2x" broke the arithmetic below, which ended the launch command early without
        # a status, and the job ran nothing and exited 0.
        if ! [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
            echo "dmhpc: NPROC_PER_NODE=$NPROC_PER_NODE: expected a number of ranks per node, 1 or more" >&2
            return 2
        fi
        echo "$NPROC_PER_NODE"
    elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ $per_node =~ ^[1-9][0-9]*$ ]]; then
        echo "$per_node"
    elif [[ ${SLURM_NTASKS_PER_NODE:-} =~ ^[1-9][0-9]*$ ]]; then  # "2(x3)": nodes of different counts
        echo "$SLURM_NTASKS_PER_NODE"
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
        echo 1
    else
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        echo $((gpus > 0 ? gpus : 1))
    fi
}

# Set the array DMHPC_LAUNCH_CMD to the srun line that runs `python "$@"` as the ranks of one
# job on every node of the allocation:
#   DMHPC_LAUNCH=torchrun (default): one srun task per node, each a torchrun starting
#       nproc-per-node workers; c10d rendezvous on the first node, id = job id.
#   DMHPC_LAUNCH=srun: one srun task per rank; the program reads SLURM_PROCID, SLURM_LOCALID,
#       SLURM_STEP_NUM_TASKS and the MASTER_ADDR/MASTER_PORT exported here.
dmhpc_launch_command() {
    local python=${PYTHON:-python} nnodes=${SLURM_NNODES:-1} nproc cpus DMHPC_RDZV_ADDR DMHPC_RDZV_PORT
    nproc=$(dmhpc_nproc_per_node) || return 2
    # --gpus=N over several nodes may give them different counts; torchrun and srun start as many
    # ranks on every node as this one has, and the rest never meet.
    local total=${SLURM_GPUS:-}
    total=${total##*:}
    if [ "$nnodes" -gt 1 ] && [ -z "${NPROC_PER_NODE:-}" ] && [[ $total =~ ^[0-9]+$ ]] && [ "$total" -ne $((nproc * nnodes)) ]; then
        echo "dmhpc: --gpus=$SLURM_GPUS over $nnodes nodes: not $nproc on every node as on this one; ask --gpus-per-node" >&2
        return 2
    fi
    # Every count is explicit: srun would otherwise take --ntasks from the allocation
    # (SLURM_NTASKS, from sbatch --ntasks-per-node) and, since Slurm 22.05, one CPU per task
    # (bound to it where task/affinity is on). The node's CPUs are shared out among its tasks.
    cpus=$(dmhpc_cpus_per_node) || return 2
    dmhpc_rendezvous || return 1
    # srun passes a signal to every process of the step. Each task starts with USR1 and USR2
    # ignored: torchrun would die of either and orphan its workers, and a rank still importing torch
    # would die too (`scancel --signal=USR1 --full`). The trainer installs its own handlers
    # (train.signals), so the ranks still get them.
    local ignore_usr2=(bash -c 'trap "" USR1 USR2; exec "$@"' dmhpc-task)
    # The signal dmhpc_run passes on: a trainer whose train.signals left it out kept it ignored,
    # trained on to the time limit unsaved, and was not requeued. The trainer refuses that at start.
    export DMHPC_FORWARDED_SIGNAL=SIGUSR2
    # Each srun below has --export=ALL: a job submitted with --export=NONE holds
    # SLURM_EXPORT_ENV=NONE, which srun takes for its own --export, and the ranks started without
    # PATH (bash itself not found), OMP_NUM_THREADS and the rest set here.
    case ${DMHPC_LAUNCH:-torchrun} in
    torchrun)
        # srun reads SLURM_GPUS_PER_TASK as its own --gpus-per-task: the one task per node would get
        # that many GPUs for all its workers, and they stopped at start sharing one.
        local per_task=${SLURM_GPUS_PER_TASK:-}
        per_task=${per_task##*:}
        if [[ $per_task =~ ^[0-9]+$ ]] && [ "$per_task" -lt "$nproc" ]; then
            echo "dmhpc: the job asks --gpus-per-task=$SLURM_GPUS_PER_TASK and torchrun mode runs one task of $nproc" \
                 "ranks per node, which would get $per_task GPU(s); DMHPC_LAUNCH=srun runs a task per rank, or ask" \
                 "--gpus-per-node=$nproc" >&2
            return 2
        fi
        # The port comes from the job id (rendezvous.py), so two jobs on one node can draw the same
        # one; torchrun's c10d store then quietly joined the other job's rendezvous, and one job's end
        # killed the other. One node: a free port of its own. Several: only the first node's task
        # hosts the store (is_host, known inside each task), so a port taken by another job fails
        # loudly instead.
        local task=("${ignore_usr2[@]}") rdzv=(--rdzv-endpoint="localhost:0")
        if [ "$nnodes" -gt 1 ]; then
            # $1 $2 $3: python -m torch.distributed.run; the option goes before the program's arguments.
            task=(bash -c 'trap "" USR1 USR2; exec "$1" "$2" "$3" --rdzv-conf="is_host=$([ "${SLURM_NODEID:-0}" = 0 ] && echo 1 || echo 0)" "${@:4}"' dmhpc-task)
            rdzv=(--rdzv-endpoint="$DMHPC_RDZV_ADDR:$DMHPC_RDZV_PORT")
        fi
        # torchrun gives each of several workers one thread unless told otherwise: on CPU nodes the
        # ranks computed on 1 of their CPUs each (srun mode's sized the threads).
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}
        # torchrun, sent SIGTERM (a preemption, scancel, srun ending the step), gives its workers 30 s
        # to end before SIGKILL: a checkpoint being written then was lost. The scheduler's own
        # grace time and KillWait bound the wait in any case. (Read by torch 2.13; older torch keeps 30 s.)
        export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
        DMHPC_LAUNCH_CMD=(
            srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1
            --export=ALL
            "${task[@]}" "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc"
            --rdzv-backend=c10d "${rdzv[@]}" --rdzv-id="$SLURM_JOB_ID"
            "$@"
        )
        ;;
    srun)
        export MASTER_ADDR=$DMHPC_RDZV_ADDR MASTER_PORT=$DMHPC_RDZV_PORT
        DMHPC_LAUNCH_CMD=(
            srun --nodes="$nnodes" --ntasks=$((nnodes * nproc)) --ntasks-per-node="$nproc"
            --cpus-per-task=$((cpus / nproc > 0 ? cpus / nproc : 1)) --kill-on-bad-exit=1 --export=ALL
            "${ignore_usr2[@]}" "$python" "$@"
        )
        ;;
    *)
        echo "dmhpc: DMHPC_LAUNCH must be torchrun or srun, not '$DMHPC_LAUNCH'" >&2
        return 2
        ;;
    esac
}

# Run the launch command "$@" and return its exit status. On SIGUSR2 (sbatch
# --signal=B:USR2@SECONDS before the time limit, or `scancel --signal=USR2 --batch JOB`), or a
# SIGUSR1 to the batch shell, pass SIGUSR2 on to every rank through srun (USR1 would kill torchrun,
# and NCCL uses it), wait for the ranks to checkpoint and exit, then requeue the job: it restarts
# with the same job id, SLURM_RESTART_COUNT+1, and appends to the same log (--open-mode=append).
# On SIGTERM (a cancel, a preemption, the time limit: Slurm sends it to every process of the job)
# wait for the ranks, which checkpoint on it too, and requeue nothing: the scheduler ends or requeues
# the job. By default either signal ended the batch shell at once, and with it the job, its ranks
# killed while they wrote their checkpoint. A run that ends on its own is never requeued.
dmhpc_run_requeueable() {
    local pid="" rc=0 signalled=0 terminated=0 job
    if [ $# -eq 0 ]; then  # (an empty launch command "succeeded": a job that ran nothing exited 0)
        echo "dmhpc: no command to run" >&2
        return 2
    fi
    # `wait` below is called again for a process it may have reaped: in POSIX mode (POSIXLY_CORRECT
    # exported by the submitting shell) bash forgot its status then, and a run that succeeded exited 127.
    set +o posix
    # `|| true`: under the scripts' set -e, a kill that fails (the launch already reaped, a second
    # USR2 after the first) ended the batch shell in the trap with 1: never requeued.
    trap 'signalled=1; echo "dmhpc: SIGUSR2: asking the ranks to checkpoint and stop" >&2; [ -z "$pid" ] || kill -USR2 "$pid" 2>/dev/null || true' USR2
    trap 'signalled=1; echo "dmhpc: SIGUSR1: asking the ranks to checkpoint and stop (with SIGUSR2)" >&2; [ -z "$pid" ] || kill -USR2 "$pid" 2>/dev/null || true' USR1
    trap 'terminated=1; echo "dmhpc: SIGTERM: waiting for the ranks to checkpoint and exit; the scheduler ends or requeues the job" >&2' TERM
    "$@" &
    pid=$!
    if [ "${DMHPC_EARLY_USR2:-0}" = 1 ]; then
        # Came before the launch: said to the ranks from RESEND seconds on, below (srun, just
        # started, would die of it before it installs its handlers).
        signalled=1
        echo "dmhpc: a stop signal before the launch: asking the ranks to checkpoint and stop" >&2
    fi
    # A trapped signal ends `wait` early; wait again until the launch has really exited. After
    # the signal, say it again every RESEND seconds: a rank still starting (importing, staging
    # data) ignores USR2 until the program installs its handler, and would train on to the time
    # limit, never requeued. The handlers only set a flag, so a repeat changes nothing.
    local resend=10 waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$signalled" = 0 ]; then wait "$pid" || true; continue; fi
        sleep 1
        waited=$((waited + 1))
        if [ $((waited % resend)) = 0 ]; then kill -USR2 "$pid" 2>/dev/null || true; fi
    done
    wait "$pid" || rc=$?
    trap '' USR1 USR2 TERM  # another one now would kill the shell before the requeue below
    if [ "$terminated" = 1 ]; then
        echo "dmhpc: ranks exited with $rc after SIGTERM; not requeueing (a cancel stays cancelled; a preemption" \
             "requeues the job where the site's PreemptMode says so)" >&2
    elif { [ "$signalled" = 1 ] && [ "$rc" != 0 ]; } || [ "$rc" = 75 ]; then
        # The trainer exits with REQUEUE_EXIT_CODE (75) once it has checkpointed, but torchrun
        # reports any failed worker as 1 (or dies of srun's SIGTERM when another node's torchrun
        # exited first), so the code only shows with DMHPC_LAUNCH=srun. Requeue on any failure
        # after the signal: the next run resumes from the last checkpoint, which is also the
        # right thing if the save itself failed (once: a requeued trainer whose two previous
        # attempts wrote no checkpoint refuses to start, see check_requeue_progress). A 75 without
        # the signal here: the ranks had it, the batch shell not (`scancel --signal=USR2` without
        # --batch, `--signal=USR2@90` without B:); they checkpointed for a requeue all the same.
        job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
        job=${job:-$SLURM_JOB_ID}
        echo "dmhpc: ranks exited with $rc after the stop signal$([ "$signalled" = 1 ] || echo ' (sent to them only)'); requeueing job $job" >&2
        scontrol requeue "$job" || return "$rc"
    fi
    return "$rc"
}
