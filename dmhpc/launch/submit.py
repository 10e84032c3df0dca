"""Running launch points as submitit jobs: executors, the checkpointable trainer, waiting, re-attaching.

Every point is one job of `nodes x tasks_per_node` tasks, one task per rank (per GPU where there
are GPUs); the points of one launch that share their resources are one job array
(`executor.map_array`, at most `array_parallelism` running at once, on a cluster or on this
machine). Executors:

    slurm   sbatch through submitit (needs a shared file system for OUT)
    local   subprocesses on this machine (one node; jobs end with the launcher, so it waits;
            at most array_parallelism at once)
    debug   in this process, one task, one point after the other (breakpoints work)

Signals, and which handler wins. submitit installs its handler for its preemption signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) when the job process starts; the trainer
replaces it with its own `StopRequest` handler from the moment it has joined the process group
(the start-up checks, the training, the final test) to its teardown, and puts it back afterwards.
So a signal then makes every rank finish its step (or the test), write last.pt and return
REQUEUE_EXIT_CODE; `TrainTask` then raises the signal again on rank 0, where submitit's restored
handler calls `checkpoint()` (the same call again, as a DelayedSubmission), requeues the job and
exits; the other ranks exit without a result file, which would otherwise pass for the result of
the requeued run. Before that (joining the group) submitit's handler acts directly. The next
start resumes from last.pt (`resume="auto"`). Launch points are trained with
`train.signals` = [that signal] only: submitit ignores SIGTERM (it comes first on preemption, and
alone on `scancel`), and a stop on SIGTERM must not requeue a job the user cancelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import submitit

from dmhpc.checks import (Check, Problems, boolean, integer, mapping, number, optional, show, take, text, text_list,
                          unknown_keys)
from dmhpc.config import config_from_dict, config_to_dict
from dmhpc.cpus import usable_cpus
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write, hold_lock, inside, write_reason
from dmhpc.launch.spec import Point
from dmhpc.rendezvous import slurm_rendezvous

EXECUTORS = ("slurm", "local", "debug")
TRACE_RULE = "----------------------\n"  # around the job's traceback in submitit's FailedJobError
JOBS_FILE = "jobs.json"  # OUT/submitit/jobs.json: point name -> Slurm job id, to find jobs still queued
# OUT/submitit/submitting.json: the job array being submitted (its points, and a token sbatch gets as
# the jobs' comment), written before sbatch and removed once jobs.json holds its jobs.
SUBMITTING_FILE = "submitting.json"
SUBMISSION_COMMENT = "dmhpc-launch:"  # + the token: how squeue shows a submission's jobs
CONTROLLERS_LOG = "local_controllers.log"  # OUT/submitit/: what submitit's local job controllers say
LAUNCH_LOCK = "launch.lock"  # OUT/submitit/launch.lock: held by the launcher running points into OUT

# Keys of a launch file's `slurm` section that a site may need, beyond the job's shape.
SITE_KEYS = ("partition", "account", "qos", "constraint", "gpu_type", "cpus_per_task", "mem_gb", "time", "exclusive",
             "array_parallelism", "signal_delay_s", "max_num_timeout", "setup", "additional_parameters")
SHAPE_KEYS = ("nodes", "gpus_per_node", "tasks_per_node")
SLURM_MINUTES = 60  # a Slurm job's time limit where the launch file gives none
# sbatch options the launcher sets itself or through a key of the slurm section (-> what sets them).
# Given in additional_parameters they replaced its own: a job of 2 nodes recorded as 1 rank (its
# relaunch refused, scaling tables wrong), or a --signal that never reached the trainer.
LAUNCHER_SBATCH = {
    "nodes": "slurm.nodes", "ntasks": "slurm.tasks_per_node", "ntasks-per-node": "slurm.tasks_per_node",
    "ntasks-per-gpu": "slurm.tasks_per_node", "gpus": "slurm.gpus_per_node", "gpus-per-node": "slurm.gpus_per_node",
    "gpus-per-task": "slurm.gpus_per_node", "gpus-per-socket": "slurm.gpus_per_node",
    # Where they ask for GPUs; a GPU type is slurm.gpu_type (a GRES type), or slurm.constraint (a node feature).
    "gres": "slurm.gpus_per_node (a GPU type: slurm.gpu_type)",
    "tres-per-task": "slurm.gpus_per_node (a GPU type: slurm.gpu_type)",
    "cpus-per-task": "slurm.cpus_per_task", "mem": "slurm.mem_gb (0: all of the node's)", "time": "slurm.time",
    "signal": "slurm.signal_delay_s (and SUBMITIT_PREEMPT_SIGNAL)", "partition": "slurm.partition",
    "account": "slurm.account", "qos": "slurm.qos", "constraint": "slurm.constraint",
    "exclusive": "slurm.exclusive", "array": "the launcher (one array of the points; slurm.array_parallelism)",
    "job-name": "the launcher", "output": "the launcher (the jobs' logs)", "error": "the launcher (the jobs' logs)",
    "open-mode": "the launcher (a requeued job appends to its log)",
    "no-requeue": "the launcher (its jobs are requeued at a time limit or preemption)",
    "requeue": "the launcher (its jobs are requeued at a time limit or preemption)",
    "wait": "the launcher (it waits for its jobs itself)",
    "comment": "the launcher (the token that finds a submission's jobs)",
    "clusters": "the launcher (it watches its jobs with squeue on this cluster)",
}
# A local job's where the file gives none: submitit's local controller always enforces one (its own
# default cut every local run off after an hour, and failed it after max_num_timeout such cut-offs).
LOCAL_UNLIMITED_MINUTES = 10 * 365 * 24 * 60


def preempt_signal() -> str:
    """The signal submitit's jobs get ahead of a time limit or preemption, e.g. "SIGUSR2"."""
    return "SIG" + submitit.JobEnvironment.USR_SIG


@dataclass(frozen=True)
class Resources:
    """What each job of a launch asks for, and how submitit treats it."""

    nodes: int = 1
    gpus_per_node: int = 0        # 0: CPU ranks
    tasks_per_node: int = 1       # ranks per node: one per GPU where there are GPUs
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None   # None: SLURM_MINUTES on Slurm, no limit on this machine
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpu_type: str | None = None   # a GRES type: --gpus-per-node=TYPE:N
    exclusive: bool = False
    array_parallelism: int = 256
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    setup: tuple[str, ...] = ()
    additional_parameters: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node


def _minutes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = isinstance(value, str) and re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ValueError
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = (parts + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif len(parts) == 3:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 60
    if seconds <= 0:
        raise ValueError
    return -(-seconds // 60)


# Minutes of a Slurm time limit: an integer, or "MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]".
slurm_minutes = Check('minutes (an integer) or a Slurm time such as "02:00:00" or "1-12:00:00"', _minutes)


def read_resources(problems: Problems, data: Any, *, shape: bool, executor: str) -> Resources:
    """The `slurm` section of a launch file. `shape`: it also says nodes, GPUs and tasks per node."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.add("slurm", f"expected a mapping, got {show(data)}")
        return Resources()
    unknown_keys(problems, data, SITE_KEYS + SHAPE_KEYS, "slurm.")
    if not shape:
        for key in SHAPE_KEYS:
            if key in data:
                problems.add(f"slurm.{key}", "set by the study's nodes and gpus_per_node lists, not here")
    p = "slurm."
    get = lambda key, check, default: take(problems, data, key, check, default, p)  # noqa: E731
    kw: dict[str, Any] = {}
    for key in ("partition", "account", "qos", "constraint", "gpu_type"):
        kw[key] = get(key, optional(text()), None)
    if kw["gpu_type"] is not None and not re.fullmatch(r"[\w.+-]+", kw["gpu_type"]):
        problems.add("slurm.gpu_type", f"a GRES type name such as a100, got {show(kw['gpu_type'])}")
    kw["cpus_per_task"] = get("cpus_per_task", optional(integer(1)), None)
    kw["mem_gb"] = get("mem_gb", optional(number(0)), None)  # 0: all of a node's memory (--mem=0)
    kw["time_min"] = get("time", slurm_minutes, None)
    kw["exclusive"] = get("exclusive", boolean(), False)
    d = Resources()  # the defaults have one home
    kw["array_parallelism"] = get("array_parallelism", integer(1), d.array_parallelism)
    kw["signal_delay_s"] = get("signal_delay_s", integer(0), d.signal_delay_s)
    kw["max_num_timeout"] = get("max_num_timeout", integer(0), d.max_num_timeout)
    limit = kw["time_min"] or (SLURM_MINUTES if executor == "slurm" else None)  # (as make_executor's)
    if isinstance(limit, (int, float)) and isinstance(kw["signal_delay_s"], int) and kw["signal_delay_s"] >= 60 * limit:
        # The warning signal is sent that long before the limit: from the start, or (submitit's
        # local executor) never, and the run was killed at the limit without its checkpoint.
        problems.add("slurm.signal_delay_s", f"{kw['signal_delay_s']} s before the end of a time limit of "
                     f"{limit:g} min (slurm.time{'' if kw['time_min'] else ', by default'}): the run would have no "
                     f"time before its warning; lower it or give more time")
    kw["setup"] = get("setup", text_list(), ())
    kw["additional_parameters"] = _additional_parameters(problems, get("additional_parameters", mapping(), {}),
                                                         shape)
    if shape:
        kw["nodes"] = get("nodes", integer(1), 1)
        gpus = kw["gpus_per_node"] = get("gpus_per_node", integer(0), 0)
        tasks = get("tasks_per_node", optional(integer(1)), None)
        if gpus and tasks is not None and tasks != gpus:
            problems.add("slurm.tasks_per_node", f"one task per GPU: leave it out or make it {gpus} "
                         f"(gpus_per_node), got {tasks}")
        kw["tasks_per_node"] = gpus or tasks or 1
        if kw["gpu_type"] is not None and not gpus:
            problems.add("slurm.gpu_type", "a type of GPU, and slurm.gpus_per_node asks for none")
    res = Resources(**kw)
    check_executor_shape(problems, executor, res)
    return res


def _additional_parameters(problems: Problems, extra: dict, shape: bool) -> tuple[tuple[str, Any], ...]:
    """slurm.additional_parameters, each to become one `#SBATCH --key=value` line (and part of a
    hashable key): a scalar under an option name that is not the launcher's (LAUNCHER_SBATCH)."""
    good = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not key:
            problems.add("slurm.additional_parameters", f"key {show(key)} is not an sbatch option name")
            continue
        where, option = f"slurm.additional_parameters.{key}", key.replace("_", "-")  # as submitit writes it
        # sbatch takes an abbreviation of a long option (--sig) for the option (--signal).
        owned = option if option in LAUNCHER_SBATCH else next((o for o in LAUNCHER_SBATCH if o.startswith(option)),
                                                              None)
        if owned in ("gres", "tres-per-task") and "gpu" not in str(value).lower():
            owned = None  # another generic resource (local scratch, licences) is the site's to ask for
        if owned == "exclusive" and str(value) in ("user", "mcs", "topo"):
            owned = None  # sharing nodes with one's own jobs only: what slurm.exclusive (true/false) cannot say
        if not isinstance(value, (str, int, float)):
            problems.add(where, f"expected a string or number, got {show(value)}")
        elif owned is not None:
            by = LAUNCHER_SBATCH[owned]
            if not shape and by.removeprefix("slurm.") in SHAPE_KEYS:
                by = "the study's nodes and gpus_per_node lists"
            problems.add(where, f"set by {by}" if owned == option else f"abbreviates --{owned}, set by {by}")
        else:
            good[key] = value
    return tuple(sorted(good.items()))


def check_executor_shape(problems: Problems, executor: str, res: Resources) -> None:
    if executor == "local" and res.nodes > 1:
        problems.add("executor", f"local runs on this machine only: one node, got {res.nodes} nodes")
    if executor == "debug" and res.ranks > 1:
        problems.add("executor", f"debug runs one task in this process, got {res.nodes} node(s) x "
                     f"{res.tasks_per_node} task(s); use local or slurm for several ranks")


def local_threads(ranks_at_once: int) -> int | None:
    """CPU threads per rank when `ranks_at_once` local ranks share this machine; None: leave torch's default.

    Each torch process otherwise starts one thread per core: three ResNet18 runs at once on two
    cores, two threads each, did 3.6x less work per second in all than one alone, and three with a
    thread each as much as one alone (docs/benchmarks.md). As with torchrun, an OMP_NUM_THREADS the
    user set wins.
    """
    if ranks_at_once <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, usable_cpus() // ranks_at_once)


def local_threads_of(points: list[Point], resources: Mapping[str, Resources]) -> int | None:
    """`local_threads` of a local launch of `points`, all of them counted, finished or not: a point
    must get the threads it would get beside the others also when it runs alone (a relaunch after
    the others finished, or after it was stopped), or its timing is of another setting."""
    at_once = min((resources[p.name].array_parallelism for p in points), default=1)
    ranks = max((resources[p.name].ranks for p in points), default=1)
    return local_threads(min(at_once, len(points)) * ranks)


def local_gpus(wanted: int) -> tuple[int, ...] | None:
    """The GPUs local jobs that want `wanted` GPUs each may use, as the indices submitit's local
    executor puts in a job's CUDA_VISIBLE_DEVICES: the launcher's own CUDA_VISIBLE_DEVICES where it
    lists indices, else those `nvidia-smi -L` lists, else (no nvidia-smi, or it fails) those torch
    counts. None where no GPU is wanted (nothing is asked). Fewer than `wanted` are refused: submitit
    would give the job GPUs 0.. that are not there, or that the launcher's CUDA_VISIBLE_DEVICES kept
    from it ("" and "-1" included), and the trainer, finding no GPU, trained on the CPU (a scaling
    study's GPU table then held CPU timings). GPUs listed by UUID are refused too: submitit takes
    indices, and gave the job GPUs 0.., which need not be those."""
    if not wanted:
        return None
    gpus, where = _listed_gpus(wanted)
    if len(gpus) < wanted:
        raise DmhpcError(f"gpus_per_node {wanted}: {where} {len(gpus)} GPU(s) here for local jobs; ask for fewer "
                         f"(0 runs on the CPU), or run where there are more")
    return gpus


def _listed_gpus(wanted: int) -> tuple[tuple[int, ...], str]:
    """The GPU indices local jobs may use, and what told them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = []
        for item in (v.strip() for v in visible.split(",")):
            if item.startswith(("GPU-", "MIG-")):
                raise DmhpcError(f"gpus_per_node {wanted}: CUDA_VISIBLE_DEVICES={visible!r} names GPUs by UUID, and "
                                 f"local jobs are given indices; list them by index (nvidia-smi -L)")
            if not item.isdecimal():  # CUDA's rule: no device from there on ("-1" hides them all)
                break
            gpus.append(int(item))
        return tuple(gpus), f"CUDA_VISIBLE_DEVICES={visible!r} gives"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        if listed.returncode == 0:
            return tuple(range(sum(line.startswith("GPU ") for line in listed.stdout.splitlines()))), \
                "nvidia-smi -L lists"
    except (OSError, subprocess.SubprocessError):
        pass
    import torch  # only here: a launch that wants no GPU never imports it for this

    return tuple(range(torch.cuda.device_count())), "nvidia-smi cannot list GPUs and torch finds"


def pick_gpus(gpus: tuple[int, ...] | None, running: list[tuple[int, ...]], wanted: int) -> tuple[int, ...] | None:
    """The GPUs of `gpus` for a local job that wants `wanted`, beside running jobs that hold
    `running`: those the fewest of them use (the first of equals), so jobs running together get
    GPUs of their own while there are enough. None leaves submitit's default (GPUs 0 to wanted-1):
    no GPU wanted, or too few to choose among."""
    if not wanted or not gpus or wanted > len(gpus):
        return None
    use = {g: 0 for g in gpus}
    for held in running:
        for g in held:
            if g in use:
                use[g] += 1
    chosen = set(sorted(gpus, key=use.__getitem__)[:wanted])
    return tuple(g for g in gpus if g in chosen)


def use_gpus(executor: submitit.AutoExecutor, gpus: tuple[int, ...] | None) -> None:
    """Give the local executor's next jobs `gpus` (see `pick_gpus`); it gave every job GPU 0 (to
    gpus_per_node - 1), so jobs running at once shared one GPU while others idled."""
    if gpus is not None:
        # AutoExecutor refuses local_visible_gpus (LocalExecutor lists only "setup" as its own
        # parameter); the local executor inside takes it.
        executor._executor.update_parameters(visible_gpus=gpus)


def make_executor(kind: str, folder: Path, res: Resources, name: str,
                  comment: str | None = None) -> submitit.AutoExecutor:
    """A submitit executor for `kind` ("slurm", "local" or "debug") asking for `res` per job (on
    Slurm with `comment` as the jobs' comment)."""
    executor = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=res.max_num_timeout,
                                     local_max_num_timeout=res.max_num_timeout)
    minutes = res.time_min or (SLURM_MINUTES if kind == "slurm" else LOCAL_UNLIMITED_MINUTES)
    params: dict[str, Any] = dict(
        name=name, timeout_min=minutes, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, stderr_to_stdout=True,
        # --gpus-per-node=0 is refused by sites without GPU resources: ask only for GPUs wanted.
        gpus_per_node=res.gpus_per_node or None,
    )
    if kind == "slurm":
        params.update(
            slurm_partition=res.partition, slurm_account=res.account, slurm_qos=res.qos,
            slurm_constraint=res.constraint, slurm_exclusive=res.exclusive or None,
            slurm_setup=list(res.setup) or None,
            # --requeue: a site's JobRequeue=0 makes jobs unrequeueable by default, and submitit's
            # `scontrol requeue` at the time limit's signal then failed the job (slurm/*.sh say it too).
            slurm_additional_parameters={"requeue": True, **dict(res.additional_parameters)}, slurm_comment=comment,
            slurm_array_parallelism=res.array_parallelism, slurm_signal_delay_s=res.signal_delay_s,
            # From Slurm 22.05 srun no longer takes --cpus-per-task from the job: said again, or
            # each task (rank) gets one CPU for its loader workers and threads. --kill-on-bad-exit: a
            # rank that fails or is killed (out of memory, a lost node) ends the job's other ranks, as
            # in slurm/lib.sh, instead of leaving them to wait in a collective or at the rendezvous
            # until its 30-minute timeout, holding their GPUs.
            slurm_srun_args=[*([f"--cpus-per-task={res.cpus_per_task}"] if res.cpus_per_task else []),
                             "--kill-on-bad-exit=1"])
        if res.gpu_type and res.gpus_per_node:  # submitit's generic gpus_per_node takes a number only
            params.pop("gpus_per_node")
            params["slurm_gpus_per_node"] = f"{res.gpu_type}:{res.gpus_per_node}"
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    if kind == "local":  # AutoExecutor takes no local_signal_delay_s; the local executor inside does
        executor._executor.update_parameters(signal_delay_s=res.signal_delay_s)
    return executor


def warn_setup_unused(kind: str, resources) -> None:
    """slurm.setup runs in SLURM jobs only (sbatch's script): said where the local or debug executor
    leaves it out, as a launch tried here before the cluster would otherwise pass without it."""
    if kind != "slurm" and any(res.setup for res in resources):
        print(f"dmhpc launch: warning: slurm.setup runs in SLURM jobs only; the {kind} executor runs the jobs "
              f"without it", file=sys.stderr, flush=True)


def _say_threads(threads: int | None) -> None:
    if threads:
        print(f"dmhpc launch: {threads} CPU thread(s) per rank (OMP_NUM_THREADS) for the jobs running at once "
              f"here; set OMP_NUM_THREADS to choose", flush=True)


# Where the launcher runs in a job or a launch of its own (a tuner in an sbatch job, inside salloc or
# srun, under torchrun): the variables Slurm and torchrun set for that job, step or rank, which are
# not its jobs'. Variables users set for Slurm's commands (SLURM_CONF, SLURM_CLUSTERS, SBATCH_*,
# SLURM_CPU_BIND, SLURM_MPI_TYPE, ...) are kept.
_LAUNCH_VARIABLES = re.compile(
    r"(MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK|ROLE_WORLD_SIZE"
    r"|TORCHELASTIC_\w+|SRUN_CPUS_PER_TASK|SLURMD_\w+"
    r"|SLURM_(JOB|STEP|ARRAY|HET|SRUN_COMM|TOPOLOGY|CPUS|MEM|GPUS|NTASKS|TRES)_\w+"
    r"|SLURM_(JOBID|STEPID|NPROCS|NTASKS|NNODES|NODELIST|TASKS_PER_NODE|PROCID|LOCALID|NODEID|TASK_PID|GTIDS"
    r"|RESTART_COUNT|SUBMIT_DIR|SUBMIT_HOST|LAUNCH_NODE_IPADDR|DISTRIBUTION|PRIO_PROCESS|CLUSTER_NAME"
    r"|GPUS|OVERCOMMIT|UMASK|WORKING_CLUSTER|EXPORT_ENV|NODE_ALIASES))")


def launchers_own(name: str) -> bool:
    """Whether the environment variable `name` belongs to the launcher's own job, step or launch."""
    return _LAUNCH_VARIABLES.fullmatch(name) is not None


@contextlib.contextmanager
def submission(threads: int | None, controllers_log: Path | None = None):
    """The block that submits jobs and records them.

    - SIGINT and SIGTERM arriving inside it take effect when it ends: a job started in the block is
      recorded (so cancelled by the launcher's Ctrl-C/SIGTERM handling, or re-attached by the next
      launch) before the launcher stops, never left training unrecorded behind it. A second signal
      takes effect at once: a way out of a submission that hangs (sbatch on a stuck controller).
    - Local jobs start with OMP_NUM_THREADS = `threads` (see `local_threads`), through the
      environment rather than a submitit setup line: that line puts a shell between the job handle
      and submitit's job controller, and cancelling the job (a pruned trial) then stops the shell
      while the training goes on.
    - Local jobs start with SIGINT not ignored (the handler held here is the default in a child
      after exec; an ignored signal stays ignored): a launcher started in the background (`cmd &`,
      nohup) ignores SIGINT, and submitit cancels a local job with SIGINT.
    - Jobs start without the variables of the launcher's own job or launch (`launchers_own`): a
      local job's ranks took MASTER_ADDR and MASTER_PORT (an sbatch script that sourced
      slurm/lib.sh, torchrun) for their rendezvous, and two multi-rank local jobs at once met on
      one port; sbatch exports the environment into a job, where srun took a launcher's job's
      SLURM_* for its options (SLURM_MEM_PER_CPU beside the point's --mem: refused;
      SLURM_CPUS_PER_TASK: other CPUs per rank, not recorded with a scaling point's figures) and
      the trainer took RANK and WORLD_SIZE for its own.
    - Local jobs start with their stderr on `controllers_log` (where given): submitit's job
      controller inherits the launcher's, and a cancelled one (Ctrl-C reaches it too) prints a
      KeyboardInterrupt traceback there, after the launcher's one line. The jobs' own output goes to
      their logs either way.
    """
    before = os.environ.get("OMP_NUM_THREADS")
    own = {key: os.environ.pop(key) for key in [k for k in os.environ if launchers_own(k)]}
    held: list[int] = []
    previous: dict = {}

    def release() -> None:
        """Back to the handlers from before, then the first signal held (one: a second
        KeyboardInterrupt would break into the launcher's cancelling of its jobs)."""
        handlers = dict(previous)
        while previous:
            s, handler = previous.popitem()
            signal.signal(s, handler)
        first = held[:1]
        held.clear()
        if first and handlers:
            signal.raise_signal(first[0])

    def hold(signum, frame) -> None:
        if previous.get(signum) is signal.SIG_IGN:
            return
        held.append(signum)
        if len(held) > 1:  # asked twice: handled now as it would be outside the block
            release()

    try:
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                previous[s] = signal.signal(s, hold)
        with _stderr_to(controllers_log):
            yield
    finally:
        if threads:
            if before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = before
        os.environ.update(own)
        release()


@contextlib.contextmanager
def _stderr_to(log: Path | None):
    """File descriptor 2, which child processes started in the block inherit, on `log` (appended)."""
    if log is None:
        yield
        return
    sys.stderr.flush()
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise DmhpcError(f"{log}: cannot create the job controllers' log: {exc.strerror}") from None
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (scancel of a launcher's own job, `kill`, a shutdown) ends a launcher as Ctrl-C does
    (exit 130), so that its local jobs are cancelled rather than left training behind it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_SUBMISSION_FILE = re.compile(r"[0-9a-f]{32}\.pkl|\.submission_file_[0-9a-f]{32}\.sh")


@contextlib.contextmanager
def refused_submission(what: str, folder: Path):
    """A submission that fails as one DmhpcError: sbatch refusing it (a partition, account or QOS
    the site does not have, a controller out of reach), with sbatch's error lines (the first often
    names the bad value), instead of submitit's FailedJobError and its traceback; or the job's files
    not written (a full disk, a quota: an OSError traceback). submitit also prints sbatch's stderr
    itself: held here, and dropped when the submission was refused (the error repeats it). The
    files submitit wrote into `folder` for the refused jobs (pickled calls, the sbatch script, a
    pickle cut short) are removed: no job will ever read them."""
    held = io.StringIO()
    refused = False
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        refused = True
        for name in set(os.listdir(folder)) - before if folder.is_dir() else ():
            # Only what submitit writes to submit (a running job writes its logs and results here too).
            if _SUBMISSION_FILE.fullmatch(name):
                (folder / name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DmhpcError(f"{exc.filename or folder}: cannot submit {what}: {write_reason(exc)}") from None
        said = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        said = said.decode(errors="replace") if isinstance(said, bytes) else (said or "")
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines[-1:] or [type(exc).__name__]
        raise DmhpcError(f"sbatch refused {what}: {'; '.join(dict.fromkeys(errors))}") from None
    finally:
        if not refused:
            sys.stderr.write(held.getvalue())


# --- the job ---------------------------------------------------------------------------------------

class TrainTask(submitit.helpers.Checkpointable):
    """`dmhpc.train.loop.train` as a submitit job: each task of the job is one rank.

    Called with the point's resolved configuration (a dict: what was validated at submission is
    what runs, even if the config files change meanwhile). The inherited `checkpoint()` resubmits
    the same call; the requeued job resumes from RUN/checkpoints/last.pt. Returns this rank's
    {"rank", "exit_code"}.
    """

    def __call__(self, config: dict) -> dict:
        from dmhpc.config import config_from_dict
        from dmhpc.train.checkpoint import REQUEUE_EXIT_CODE
        from dmhpc.train.loop import train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # The trainer's bootstrap reads torchrun's variables first; submitit provides them.
            # Device binding stays with dmhpc.distributed (local rank, or the one GPU Slurm shows).
            dist_env = submitit.helpers.TorchDistributedEnvironment()
            if env.cluster == "slurm":  # the rendezvous every dmhpc job on SLURM uses
                dist_env.master_addr, dist_env.master_port = slurm_rendezvous(os.environ)
            dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        cfg = config_from_dict(config, source=f"submitted configuration of {config['run']['dir']}")
        try:
            code = train(cfg, resume="auto")
        except DmhpcError as exc:
            if env.cluster != "debug":
                raise
            # submitit's debug job opens pdb on its task's exception: kept for a bug's traceback,
            # while a user's mistake (a missing data set) is the point's one-line failure.
            return {"rank": env.global_rank, "exit_code": 1, "error": str(exc)}
        # Only where submitit handles the signal (slurm, local): the debug executor runs in the
        # caller's process and installs no handler.
        if code == REQUEUE_EXIT_CODE and env.cluster != "debug":
            if env.global_rank == 0:
                # The requeue ends this step at once: Slurm sends SIGTERM to every process of it,
                # the handler's `scontrol requeue` too, which could die of it before it had exited:
                # the handler then failed, and its error result told a waiter that a requeued job
                # had failed. Ignored (submitit's own SIGTERM handler only logs it), the signal is
                # ignored by scontrol too: an ignored signal stays so across fork and exec.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                # submitit's handler: checkpoint(), requeue, exit; it does not return.
                signal.raise_signal(signal.Signals[preempt_signal()])
            # No result file from this run: it would be taken for the result of the requeued one.
            # Exit 0, not the requeue code: under --kill-on-bad-exit a non-zero exit here makes srun
            # end the step, rank 0 with it (SIGTERM, which submitit ignores, then SIGKILL after the
            # site's KillWait), before rank 0 has requeued the job where that takes longer.
            sys.exit(0)
        return {"rank": env.global_rank, "exit_code": code}


# --- submitting, re-attaching and waiting ----------------------------------------------------------

def _squeue(fmt: str) -> list[str]:
    """squeue's lines in `fmt` for every job of this user Slurm still has (pending, running,
    requeued), array tasks one by one (ARRAY_TASK). Only this user's: a large site's whole queue is
    slow to list and loads its controller."""
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", fmt, f"--user={os.getuid()}"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DmhpcError(f"squeue: cannot list queued jobs to avoid submitting a point twice: {exc}") from None
    if proc.returncode != 0:
        raise DmhpcError(f"squeue: cannot list queued jobs to avoid submitting a point twice: "
                         f"{proc.stderr.strip()}")
    return proc.stdout.splitlines()


def _queued_slurm_jobs() -> set[str]:
    """Ids of every job of this user Slurm still has, array tasks as ARRAY_TASK."""
    return {line.strip() for line in _squeue("%i") if line.strip()}


def jobs_commented(token: str) -> list[str]:
    """Ids of this user's queued jobs submitted with the comment SUBMISSION_COMMENT + `token`, array
    tasks one by one: the jobs of a launcher killed before it recorded their ids."""
    lines = (line.strip().partition(" ") for line in _squeue("%i %k"))
    return [job_id for job_id, _, comment in lines if f"{SUBMISSION_COMMENT}{token}" in comment.split()]


def _submitted_unrecorded(folder: Path) -> dict:
    """The jobs.json entries of a submission whose launcher was killed (SIGKILL, a lost login
    session) after sbatch and before jobs.json: its jobs, still queued, found by the token in their
    comment. The next launch submitted their points a second time beside them. Where this machine
    has no squeue, the file is another cluster's (an OUT copied here): none."""
    path = folder / SUBMITTING_FILE
    if not path.is_file():
        return {}
    try:
        pending = json.loads(path.read_text(encoding="utf-8"))
        token, tasks, names, configs = (pending[k] for k in ("token", "tasks", "points", "configs"))
        if not (isinstance(token, str) and token and isinstance(names, list) and isinstance(configs, list)
                and len(names) == len(configs) and all(isinstance(name, str) for name in names)):
            raise ValueError("a field of the wrong type")
        # Each becomes a jobs.json entry: checked as one, or dmhpc would write a file it then refuses.
        entries = {name: {"job_id": f"{token}_{i}", "tasks": tasks, "config": config}
                   for i, (name, config) in enumerate(zip(names, configs))}
        problem = next(filter(None, (_entry_problem(name, entry) for name, entry in entries.items())), None)
        if problem:
            raise ValueError(problem)
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        what = f"no key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DmhpcError(f"{path}: damaged ({what}); remove it, after scancel of any job squeue shows with the "
                         f"comment {SUBMISSION_COMMENT}<token> (its points are then submitted again)") from None
    if shutil.which("squeue") is None:
        return {}
    found = {}
    for job_id in jobs_commented(token):
        index = int(job_id.partition("_")[2] or 0)  # (submitit submits an array of one as one job)
        if index < len(names):
            found[names[index]] = {**entries[names[index]], "job_id": job_id}
    return found


def _submitted_as(entry: Mapping, point: Point) -> bool:
    """Whether a jobs file's entry was submitted with the point's configuration now. The entry holds
    the configuration (an older file, its hash; older still, nothing: taken as the same). Read
    through the schema, as the queued job will read it: keys added to dmhpc since it was submitted
    take their defaults there, and are no change."""
    now = config_to_dict(point.config)
    then = entry.get("config")
    if then is None:
        return True
    if isinstance(then, str):
        return then == hashlib.sha256(json.dumps(now, sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        return config_to_dict(config_from_dict(then)) == now
    except DmhpcError:  # a key dmhpc no longer knows: the queued job would fail on it
        return False


def _read_jobs(folder: Path) -> dict:
    """{point name: {"job_id", "tasks", "config"}} of the jobs submitted into this folder. A damaged
    file is an error: a traceback otherwise, or a job id never found in squeue, so its point was
    submitted a second time beside its queued job."""
    path = folder / JOBS_FILE
    if not path.is_file():
        return {}

    def damaged(what: str) -> DmhpcError:
        return DmhpcError(f"{path}: {what}; repair it, or remove it (points whose jobs are still queued are then "
                          f"submitted again)")

    try:
        jobs = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(f"not valid JSON ({exc})") from None
    if not isinstance(jobs, dict):
        raise damaged(f"expected an object of point name -> job, got {show(jobs)}")
    problem = next(filter(None, (_entry_problem(name, entry) for name, entry in jobs.items())), None)
    if problem:
        raise damaged(problem)
    return jobs


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with one jobs file's entry {"job_id", "tasks", "config"}, or None."""
    if not isinstance(entry, dict):
        return f"point {name}: expected an object with job_id and tasks, got {show(entry)}"

    def got(key: str) -> str:
        return show(entry[key]) if key in entry else "nothing"

    job_id, tasks = entry.get("job_id"), entry.get("tasks")
    if not isinstance(job_id, str) or not job_id:
        return f"point {name}: job_id must be a Slurm job id in quotes, such as \"1234_0\", got {got('job_id')}"
    if type(tasks) is not int or tasks < 1:
        return f"point {name}: tasks must be the job's number of tasks, a positive integer, got {got('tasks')}"
    if not isinstance(entry.get("config", ""), (dict, str)):
        return f"point {name}: config must be the configuration its job was submitted with, got {got('config')}"
    return None


def submit_points(points: list[Point], resources: Mapping[str, Resources], *, kind: str, folder: Path,
                  job_name: str, task: TrainTask, on_submit: Callable[[], None] = lambda: None
                  ) -> dict[str, submitit.Job]:
    """Submit the unfinished points, one job array per distinct Resources; {point name: job}.

    Finished points are skipped. A point whose Slurm job from an earlier launch into the same
    folder is still queued or running is not submitted again: its job is re-attached instead.
    `on_submit` is called after each submission that went in.
    """
    if kind not in EXECUTORS:
        raise DmhpcError(f"executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    folder.mkdir(parents=True, exist_ok=True)
    recorded = {**_read_jobs(folder), **_submitted_unrecorded(folder)} if kind == "slurm" else {}
    if (folder / SUBMITTING_FILE).exists() and kind == "slurm":  # what the killed launcher left: recorded now
        atomic_write(folder / JOBS_FILE, json.dumps(recorded, indent=1) + "\n")
        (folder / SUBMITTING_FILE).unlink()
    queued = _queued_slurm_jobs() if recorded else set()
    jobs: dict[str, submitit.Job] = {}
    groups: dict[Resources, list[Point]] = defaultdict(list)
    finished = 0
    for p in points:
        if p.finished:
            finished += 1
        elif p.name in recorded and recorded[p.name]["job_id"] in queued:
            entry = recorded[p.name]
            if not _submitted_as(entry, p):
                # The queued job runs the configuration pickled when it was submitted.
                raise DmhpcError(f"point {p.name}: its Slurm job {entry['job_id']}, still queued or running, was "
                                 f"submitted with another configuration (the launch file changed since); scancel "
                                 f"{entry['job_id']} and launch again, or restore the file")
            if entry["tasks"] != resources[p.name].ranks:
                # Its ranks train it (BatchNorm's batches, the run's world size): not the file's point.
                raise DmhpcError(f"point {p.name}: its Slurm job {entry['job_id']}, still queued or running, runs "
                                 f"{entry['tasks']} rank(s); the launch file now asks {resources[p.name].ranks}; "
                                 f"scancel {entry['job_id']} and launch again, or restore the file")
            jobs[p.name] = submitit.SlurmJob(folder=folder, job_id=entry["job_id"], tasks=range(entry["tasks"]))
        else:
            groups[resources[p.name]].append(p)
    attached = len(jobs)
    # Local jobs submitted here all start at once and share the cores.
    threads = local_threads(sum(len(g) * res.ranks for res, g in groups.items())) if kind == "local" else None
    _say_threads(threads)
    for res, group in groups.items():
        log = folder / CONTROLLERS_LOG if kind == "local" else None
        configs = [config_to_dict(p.config) for p in group]
        with submission(threads, log):  # every job submitted is in the jobs file before an interrupt stops this
            comment = None
            if kind == "slurm":  # a launcher killed from sbatch to jobs.json: the next finds the jobs by it
                token = uuid.uuid4().hex
                comment = SUBMISSION_COMMENT + token
                atomic_write(folder / SUBMITTING_FILE, json.dumps(
                    {"token": token, "tasks": res.ranks, "points": [p.name for p in group], "configs": configs}) + "\n")
            try:
                with refused_submission(f"the job array of {len(group)} point(s)", folder):
                    submitted = make_executor(kind, folder, res, job_name, comment).map_array(task, configs)
            except DmhpcError:  # refused: nothing was submitted
                (folder / SUBMITTING_FILE).unlink(missing_ok=True)
                raise
            on_submit()
            for p, job, config in zip(group, submitted, configs):
                jobs[p.name] = job
                recorded[p.name] = {"job_id": job.job_id, "tasks": res.ranks, "config": config}
            if kind == "slurm":
                atomic_write(folder / JOBS_FILE, json.dumps(recorded, indent=1) + "\n")
                (folder / SUBMITTING_FILE).unlink()
        ids = submitted[0].job_id.split("_")[0] if kind == "slurm" else ", ".join(j.job_id for j in submitted)
        print(f"dmhpc launch: {kind} job{' array' if kind == 'slurm' else 's'} {ids}: {len(group)} point(s), "
              f"{res.nodes} node(s) x {res.tasks_per_node} task(s) each", flush=True)
    print(f"dmhpc launch: {len(points)} point(s): {finished} finished, {attached} still queued, "
          f"{len(jobs) - attached} submitted; logs in {folder}", flush=True)
    return jobs


def queued_points(points: list[Point], folder: Path) -> dict[str, str]:
    """{point name: job id} of the unfinished points whose Slurm job from an earlier launch into this
    folder (`--no-wait`) is still queued or running. Where this machine has no squeue, the jobs
    recorded are another cluster's (an OUT copied here): none."""
    recorded = {**_read_jobs(folder), **_submitted_unrecorded(folder)}
    waiting = [p.name for p in points if p.name in recorded and not p.finished]
    if not waiting or shutil.which("squeue") is None:
        return {}
    queued = _queued_slurm_jobs()
    return {name: recorded[name]["job_id"] for name in waiting if recorded[name]["job_id"] in queued}


def _check_no_queued_slurm_job(points: list[Point], folder: Path) -> None:
    """Refuse to run here a point whose Slurm job from an earlier launch into this folder (`--no-wait`)
    is still queued or running: the two would meet in its run directory, one failing as "in use", or
    the Slurm job training again, when it starts, what the local run finished."""
    still = queued_points(points, folder)
    if still:
        first = next(iter(still))
        more = f" (and {len(still) - 1} more)" if len(still) > 1 else ""
        raise DmhpcError(f"point {first}: its Slurm job {still[first]} from an earlier launch "
                         f"into this out is still queued or running{more}; launch with the slurm executor (which "
                         f"waits for it), or scancel it first")


def check_executor_here(kind: str) -> None:
    """The slurm executor needs SLURM on this machine: a one-line error that says what to do instead."""
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise DmhpcError("executor slurm: no SLURM here (sbatch is not on PATH); to run the points on this machine, "
                         "give --executor local (or executor: local in the file)")


def hold_launch_lock(folder: Path, made: list[Path] | None = None) -> IO:
    """The lock of the launcher running jobs in `folder` (OUT/submitit), held until closed: grid,
    scaling and tune take it, since each stops the jobs it finds there as orphans of a killed one
    of its own kind (a grid started into a tuner's out stopped every trial of the tuner). `made`
    gets the folders made for it (see `hold_lock`)."""
    lock = folder / LAUNCH_LOCK
    return hold_lock(lock, f"{lock}: another launcher is running points into this out ({{holder}}); wait for it or "
                           f"use another out", "launcher", made=made)


def launch_points(points: list[Point], resources: Mapping[str, Resources], *, kind: str, folder: Path,
                  job_name: str, task: TrainTask, wait: bool = True, at_once_why: str = "",
                  before: Callable[[], Callable[[], None] | None] | None = None,
                  after: Callable[[dict[str, str]], None] | None = None,
                  noted: Callable[[dict[str, str]], None] = lambda failures: None) -> dict[str, str]:
    """Run the points' jobs: local ones here (`_launch_local`; `at_once_why` follows "N at a time" in
    its start line), others by `submit_points` and (with wait) `wait_for`; {point name: why its job
    failed}. `before` runs first under the launch lock (what a launcher records of its points: one
    refused as a second launcher must not have written it); what it returns, if anything, undoes it
    when the launch is refused before any job went in (sbatch refusing, no GPU here). `after` gets
    the failures while the lock is still held: a second launcher, started once it is released, runs
    points again, and what this one recorded of them after that was out of date. `noted` gets the
    failures known so far as each becomes known: a launcher stopped while it waits (Ctrl-C, a lost
    login) never reaches `after`."""
    if not wait and kind != "slurm":
        raise DmhpcError(f"executor {kind}: its jobs end with the launcher, so the launcher must wait for them")
    check_executor_here(kind)
    if kind == "debug":  # in this process: the trainer takes what torch sees (local jobs are checked as they start)
        local_gpus(max((resources[p.name].gpus_per_node for p in points), default=0))
    warn_setup_unused(kind, [resources[p.name] for p in points])
    # Two launchers of one OUT would both find a point unfinished and run it twice: local jobs meet
    # in its run directory, where one fails as "in use"; SLURM jobs go in twice, before either is in
    # jobs.json.
    made: list[Path] = []  # the folders made for the lock file, nearest first
    submitted: list[bool] = []
    with hold_launch_lock(folder, made):
        undo = None
        try:
            undo = before() if before is not None else None
            if kind != "slurm":
                _check_no_queued_slurm_job(points, folder)
            jobs = None
            if kind == "local":
                failures = _launch_local(points, resources, folder=folder, job_name=job_name, task=task,
                                         at_once_why=at_once_why, on_submit=lambda: submitted.append(True),
                                         noted=noted)
            else:
                jobs = submit_points(points, resources, kind=kind, folder=folder, job_name=job_name, task=task,
                                     on_submit=lambda: submitted.append(True))
        except BaseException:  # a refusal, Ctrl-C, or submitit's own error before any job went in
            if not submitted:
                if undo is not None:
                    undo()
                if made:  # an OUT made for the lock, which it alone would hold: a study that seemed begun
                    (folder / LAUNCH_LOCK).unlink(missing_ok=True)  # (while held, as locked_directory does)
                    for d in made:
                        with contextlib.suppress(OSError):  # (not empty: something else is there now)
                            d.rmdir()
            raise
        if jobs is not None:
            failures = wait_for(jobs, noted) if wait else {}
        if after is not None:
            after(failures)
        return failures


def local_controllers(folder: Path, job_id: str | None = None) -> list[int]:
    """The pids of submitit's local controllers still running on this machine for `folder` (of job
    `job_id` only, if given: the pid it was started as, or that shell's child where the job has
    setup commands): found by their command line, as a pid alone may since belong to another process."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue  # gone meanwhile, or another user's
        if (job_id is None or job_id in (entry.name, ppid)) and argv[1:3] == ["-m", "submitit.local._local"] and \
                len(argv) > 3 and inside(argv[3], folder):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """The process runs (a zombie has ended: its parent has yet to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cancel_local_jobs(folder: Path, job_id: str | None = None, who: str = "an earlier launcher") -> None:
    """Stop the local jobs (or job `job_id`) an earlier launcher into `folder` left running when it was
    killed outright (SIGKILL, a lost session): their trainers train on as orphans, and the points'
    reruns failed on the run directories they hold. Interrupted as submitit's own cancel does (SIGINT
    to the controller, which stops its tasks; SIGTERM would make them requeue), and waited for:
    their points resume from their last checkpoint."""
    pids = local_controllers(folder, job_id)
    if not pids:
        return
    print(f"dmhpc: stopping {len(pids)} local job(s) of {who} still running for {folder} (pid "
          f"{', '.join(map(str, pids))}); their points resume from their last checkpoint", flush=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    for _ in range(120):
        if not any(map(_alive, pids)):
            return
        time.sleep(0.5)
    print(f"dmhpc: warning: local job(s) of {who} still run after a minute; their points' reruns may find "
          f"their run directories in use", flush=True)


def _launch_local(points: list[Point], resources: Mapping[str, Resources], *, folder: Path, job_name: str,
                  task: TrainTask, poll_s: float = 1.0, at_once_why: str = "",
                  on_submit: Callable[[], None] = lambda: None,
                  noted: Callable[[dict[str, str]], None] = lambda failures: None) -> dict[str, str]:
    """Run the unfinished points here, at most `array_parallelism` at once, the next one starting as
    soon as one ends (submitit's local executor would start every job at once, and runs of one
    study differ in length: waiting for a whole batch left cores idle). The jobs end with the
    launcher: Ctrl-C or SIGTERM cancels the running ones, which resume from their last checkpoint
    at the next launch, instead of leaving them to train on beside it."""
    todo = [p for p in points if not p.finished]
    gpus = local_gpus(max((resources[p.name].gpus_per_node for p in todo), default=0))
    at_once = min((resources[p.name].array_parallelism for p in todo), default=1)
    print(f"dmhpc launch: {len(points) - len(todo)} of {len(points)} point(s) finished; running the "
          f"other {len(todo)}, {at_once} at a time{at_once_why}; logs in {folder}", flush=True)
    threads = local_threads_of(points, resources)
    _say_threads(threads)
    cancel_local_jobs(folder)  # we hold the launch lock: any job still running here is an orphan
    folder.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    running: dict[str, submitit.Job] = {}
    held = {}  # point name -> the GPUs its running job was given
    try:
        with sigterm_as_interrupt():
            while todo or running:
                while todo and len(running) < at_once:
                    p = todo.pop(0)
                    executor = make_executor("local", folder, resources[p.name], job_name)
                    held[p.name] = pick_gpus(gpus, list(filter(None, held.values())), resources[p.name].gpus_per_node)
                    use_gpus(executor, held[p.name])
                    submitted_at = time.time()
                    with submission(threads, folder / CONTROLLERS_LOG), \
                            refused_submission(f"the job of point {p.name}", folder):
                        running[p.name] = executor.submit(task, config_to_dict(p.config))
                    on_submit()
                    job = running[p.name]
                    _forget_earlier_results(folder, job.job_id, submitted_at)
                    on = f" on GPU(s) {', '.join(map(str, held[p.name]))}" if held[p.name] else ""
                    print(f"dmhpc launch: point {p.name}: local job {job.job_id}{on}", flush=True)
                ended = {name: job for name, job in running.items() if job.done()}
                for name in ended:
                    del running[name]
                    del held[name]
                failures.update(wait_for(ended, lambda failed: noted({**failures, **failed})))
                if not ended:
                    time.sleep(poll_s)
    except BaseException:
        for job in running.values():
            job.cancel(check=False)  # it may have ended meanwhile
        raise
    return failures


def _forget_earlier_results(folder: Path, job_id: str, submitted_at: float) -> None:
    """Remove the result files of job `job_id` written before `submitted_at`. A local job's id is its
    controller's pid, which recurs (a container numbers afresh): an earlier job's result under it was
    read as this one's, and a killed job passed for a success. (The job's tasks may have started by
    now: only files older than its submission go.)"""
    for stale in folder.glob(f"{job_id}_*_result.pkl"):
        with contextlib.suppress(FileNotFoundError):
            if stale.stat().st_mtime < submitted_at:
                stale.unlink()


# A SLURM job Slurm no longer lists, with no result file this long after: it ended without one.
GONE_AFTER_S = 180.0  # (a result written at the end may take a while to show on a shared file system)
WAIT_POLL_S = 10.0
_missing_since: dict[str, float] = {}  # job id -> when squeue first did not list it
_queue_seen: list = [-math.inf, set()]  # when squeue was last asked, and what it listed: one call a poll


def left_without_result(job: submitit.Job) -> bool:
    """A SLURM job that ended without a result file (killed: cancelled, out of memory, a lost node, the
    time limit): gone from squeue GONE_AFTER_S ago. submitit learns a job's end from sacct, or its
    result file: on a site without Slurm accounting it waited for such a job for ever (and a tuner's
    trial held its place). A squeue that fails says nothing."""
    if not isinstance(job, submitit.SlurmJob) or job.paths.result_pickle.exists():
        return False
    if time.monotonic() - _queue_seen[0] >= WAIT_POLL_S / 2:
        try:
            _queue_seen[1] = _queued_slurm_jobs()
        except DmhpcError:
            return False
        _queue_seen[0] = time.monotonic()
    if job.job_id in _queue_seen[1]:
        _missing_since.pop(job.job_id, None)
        return False
    return time.monotonic() - _missing_since.setdefault(job.job_id, time.monotonic()) >= GONE_AFTER_S


def wait_for(jobs: Mapping[str, submitit.Job],
             noted: Callable[[dict[str, str]], None] = lambda failures: None) -> dict[str, str]:
    """Wait for every job; {point name: why it failed} for those that did, given to `noted` too as
    each one fails."""
    failures: dict[str, str] = {}
    waiting = dict(jobs)
    while waiting:
        # Every job's end looked for in each round: one by one, each gone job's clock started only
        # when the jobs before it had ended (a hundred killed points, five hours).
        for name, job in list(waiting.items()):
            # (a debug job runs in results(); a local one's end is its controller's)
            ended = not isinstance(job, submitit.SlurmJob) or job.done()
            gone = not ended and left_without_result(job)
            if not ended and not gone:
                continue
            del waiting[name]
            why = _failure_of(job, gone)
            if why is not None:
                failures[name] = why
                noted(dict(failures))
        if waiting:
            time.sleep(WAIT_POLL_S)
    return {name: failures[name] for name in jobs if name in failures}


def _failure_of(job: submitit.Job, gone: bool) -> str | None:
    """Why `job`, ended (or `gone` from the queue without a result), failed, or None."""
    log = (job.task(0) if job.num_tasks > 1 else job).paths.stdout  # rank 0's
    if gone:
        return (f"job {job.job_id} ended without a result (killed? Slurm no longer lists it and keeps no record "
                f"here to say why; its log: {log})")
    try:
        results = job.results()
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError
        return f"job {job.job_id} failed: {_why(exc)} (log: {log})"
    # A stop signal ends a trainer with the requeue code: submitit requeues a slurm or local
    # job, and never returns that result; the debug executor (in this process) does. Taken
    # for a success, the point was unfinished with nothing said.
    codes = [r.get("exit_code") for r in results if isinstance(r, dict)]
    errors = [r["error"] for r in results if isinstance(r, dict) and r.get("error")]
    if errors:  # (the debug executor's: see TrainTask)
        return f"job {job.job_id} failed: {errors[0]}"
    if any(codes):
        return f"job {job.job_id} stopped before its end (exit {max(codes)}: a stop signal); launch again to resume it"
    return None


def _why(exc: Exception) -> str:
    """The line that says why a job failed: the last of the job's traceback where submitit gives one;
    for a job that ended without a result (killed: out of memory, a time limit, a node lost), that,
    its scheduler state and its last line of output (the last line alone read as a failure's reason)."""
    message = str(exc)
    # (FailedJobError, a traceback, is an UncompletedJobError too: told apart by submitit's words)
    state = re.search(r"has not produced any output \(state: ([^)]*)\)", message)
    if isinstance(exc, submitit.core.utils.UncompletedJobError) and state:
        log = message.split("-" * 40 + "\n", 1)[1] if "-" * 40 + "\n" in message else ""
        last = [line.strip() for line in log.splitlines() if line.strip()][-1:]
        return (f"ended without a result (killed? state {state.group(1)})"
                + (f", its last output: {last[0]}" if last else ""))
    parts = message.split(TRACE_RULE)
    # FailedJobError: "...with trace:\n<rule>\n<traceback>\n<rule>\nYou can check full logs ... paths: ..."
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else message).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
