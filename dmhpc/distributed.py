"""One bootstrap for every launcher: torchrun, srun (one task per GPU), mpiexec, or a plain process.

    dist = bootstrap()          # DistInfo(rank, local_rank, world_size, device, backend, launcher)
    ...
    shutdown()

The launcher is recognised from its environment, first match wins:

1. torchrun (or anything that exports its variables, e.g. submitit's TorchDistributedEnvironment):
   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
2. A SLURM job step with several tasks (`srun -n N`): SLURM_PROCID, SLURM_LOCALID,
   SLURM_STEP_NUM_TASKS. The step variables exist only inside `srun`, so the batch script of a job
   with --ntasks=4 (where SLURM_NTASKS=4 and SLURM_PROCID=0) runs as a single process instead of
   waiting forever for three ranks that never come. Master address and port: the job's rendezvous
   (dmhpc/rendezvous.py, the rule slurm/lib.sh and the submitit jobs use too).
3. MPI (mpiexec/mpirun/PALS): OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE, PMIX_RANK, PALS_RANKID.
   mpi4py is imported only here (importing it initialises MPI); rank 0 broadcasts its host name
   and a free port. An MPI launcher that started its proxies with srun leaves SLURM step variables
   that describe the proxies, not the ranks: when an MPI world size disagrees with the step's task
   count, MPI wins.
4. Otherwise a single process, without a process group.

MASTER_ADDR / MASTER_PORT, when set, override the derived address and port on paths 2 and 3.
A world of one process never creates a process group. NCCL on GPUs, gloo on CPUs; each rank binds
its own GPU (`gpu_index`): the local rank's when the node's ranks see at least as many GPUs, GPU 0
when the node runs one rank or the scheduler gave each task its own GPU (SLURM_GPUS_PER_TASK=1, or
DMHPC_GPU_PER_RANK=1 for a launcher of your own), and otherwise a one-line error: two ranks on one
GPU are refused by NCCL at the first collective. A torchrun-style launch without LOCAL_WORLD_SIZE is
refused on a GPU alike on every rank; on CPUs each rank counts every rank as on its node (its share
of the CPUs the smallest it could be).

Together with dmhpc/mpi.py (the MPI launchers' variables) and dmhpc/rendezvous.py (the SLURM
rendezvous), this is the only place in dmhpc that reads the environment for distribution.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from dmhpc.cpus import cpu_mask, quota_share, usable_cpus
from dmhpc.errors import DmhpcError
from dmhpc.mpi import env_int, import_mpi, launched
from dmhpc.rendezvous import check_hosted_here, check_master_addr, master_addr, master_port, slurm_rendezvous

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a rank waits in a collective before the job fails: gloo's default, for NCCL too (its own
# is 10 minutes). Rank 0 works alone while the others wait where one file is written (a survey's
# catalog merged from its parts, a checkpoint on a slow file system); a GPU job must not be stopped
# by the watchdog where the same job on CPU ranks goes through.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as the launcher's environment tells it."""

    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    local_rank: int
    world_size: int  # 0 for "mpi" when no variable says it (mpi4py tells)
    master_addr: str | None = None  # None: not needed (single) or found later (mpi)
    master_port: int | None = None
    local_world_size: int = 0  # ranks on this node; 0 when the launcher does not say
    cpu_sharers: int = 0  # ranks of this node whose CPU masks overlap this one's (MPI finds out); 0: unknown


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run, as the training code needs it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when there is no process group (a single process)
    launcher: str = "single"
    local_world_size: int = 1  # ranks on this node (at least this rank's local rank + 1 when unknown)
    cpus: int = 1  # CPUs this rank may use (see `cpus_per_rank`)
    attempt: dict | None = field(default=None, hash=False)  # which attempt of which job (`job_attempt`)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes checkpoints."""
        return self.rank == 0


def _mpi_launch(env: Mapping[str, str]) -> Launch | None:
    mpi = launched(env)
    return Launch("mpi", mpi.rank, 0, mpi.size) if mpi else None


_joined: int | None = None  # this process's rank in a group of several, once the bootstrap joined it

_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Timed out waiting|Broken pipe|NCCL communicator was aborted|"
                        r"ProcessGroupNCCL.*(timeout|Watchdog)", re.IGNORECASE | re.DOTALL)


def peer_lost(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone (it failed and left, or
    was killed) or did not answer within COLLECTIVE_TIMEOUT, or None when `exc` is something else.
    Such a rank printed a 40-line gloo traceback beside the one line of the rank that failed."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, RuntimeError) or not _PEER_LOST.search(text):
        return None
    if _joined is None:  # no other rank: a broken pipe of its own
        return None
    # The rank as the bootstrap found it: asked again here, the launcher's detection ran scontrol
    # (30 s each) on every rank, as the controller was busiest.
    rank = f"rank {_joined}"
    if re.search(r"Timed out|timeout|Watchdog", text, re.IGNORECASE):
        return (f"{rank}: another rank did not answer within {int(COLLECTIVE_TIMEOUT.total_seconds() // 60)} "
                f"minutes (stopped, or far slower than this one): {text[:160]}")
    return (f"{rank}: another rank stopped (its own error is its line, in the job's output, or it was killed): "
            f"{text[:160]}")


def detect_launch(env: Mapping[str, str]) -> Launch:
    """Rank, local rank, world size and rendezvous of this process, from a launcher's variables."""
    if "RANK" in env:
        missing = [v for v in _TORCHRUN_VARS if v not in env]
        if missing:
            raise DmhpcError(f"environment: RANK is set (torchrun-style launch) but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not")
        launch = Launch("torchrun", env_int(env, "RANK"), env_int(env, "LOCAL_RANK"), env_int(env, "WORLD_SIZE"),
                        env["MASTER_ADDR"], master_port(env),
                        env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 0)
    else:
        mpi = _mpi_launch(env)
        launch = _slurm_launch(env, mpi) or mpi or Launch("single", 0, 0, 1)
    if launch.world_size == 1:
        launch = replace(launch, local_world_size=1)
    if launch.launcher != "mpi" and launch.world_size < 1:  # 0 means "ask MPI" on the MPI path only
        raise DmhpcError(f"environment: {launch.launcher} world size {launch.world_size}; expected at least 1")
    if launch.world_size and not 0 <= launch.rank < launch.world_size:
        raise DmhpcError(f"environment: {launch.launcher} rank {launch.rank} is outside a world "
                         f"of {launch.world_size} processes")
    if launch.local_rank < 0:
        raise DmhpcError(f"environment: {launch.launcher} local rank {launch.local_rank} is negative")
    return launch


def _slurm_launch(env: Mapping[str, str], mpi: Launch | None) -> Launch | None:
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return None
    tasks = env_int(env, "SLURM_STEP_NUM_TASKS")
    if tasks <= 1 or (mpi is not None and mpi.world_size and mpi.world_size != tasks):
        return None
    if "SLURM_LOCALID" not in env:
        raise DmhpcError("environment: SLURM_PROCID is set but SLURM_LOCALID is not")
    addr, port = slurm_rendezvous(env)
    return Launch("slurm", env_int(env, "SLURM_PROCID"), env_int(env, "SLURM_LOCALID"), tasks, addr, port,
                  _slurm_tasks_on_node(env))


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE ("4(x2),1") and SLURM_NODEID; 0 if unknown."""
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not spec or node is None or not node.isdecimal():
        return 0
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            return 0
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(node)] if int(node) < len(counts) else 0


def _mpi_rendezvous(launch: Launch, env: Mapping[str, str]) -> Launch:
    """Rank, size and node-local rank from MPI itself; rank 0's host and a free port for everyone."""
    # Initialises MPI: only on this path. Its world checked: each process rank 0 of its own world
    # otherwise, the trainers met at the run's lock, refused as "in use by another dmhpc trainer".
    MPI = import_mpi(env)
    global _mpi_world
    _mpi_world = MPI.COMM_WORLD

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    # mpiexec binds each rank to its own CPUs or lets them all share one mask, by its options.
    sharers = ranks_sharing_cpus(node.allgather(cpu_mask()), local_rank)
    node.Free()
    # MASTER_PORT checked on every rank, and rank 0's refusal of MASTER_ADDR said by all: a refusal
    # on rank 0 alone hung the others.
    addr, port, refused = None, master_port(env), None
    if rank == 0 and size > 1:
        addr = master_addr(env) or socket.gethostname()
        port = _free_port() if port is None else port
        try:
            if master_addr(env):
                check_hosted_here(addr, "rank 0's node")
        except DmhpcError as exc:
            refused = str(exc)
    addr, port, refused = comm.bcast((addr, port, refused), root=0)
    if refused:
        raise DmhpcError(refused)
    if addr is not None:  # on every rank, as the port: each says the same line
        check_master_addr(addr, len(set(comm.allgather(socket.gethostname()))))
    return Launch("mpi", rank, local_rank, size, addr, port, local_size, sharers)


def ranks_sharing_cpus(masks: list, index: int) -> int:
    """How many of the node's ranks (their CPU masks) use a CPU of rank `index`'s, itself included."""
    mine = set(masks[index])
    return sum(1 for mask in masks if mine & set(mask))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cpus_per_rank(launcher: str, local_world_size: int, sharers: int = 0, task_cpus: int = 0,
                  node_cpus: int = 0) -> int:
    """The CPUs this rank may use: its affinity mask (capped by a cgroup's CPU quota, `usable_cpus`),
    divided among the `sharers` ranks whose masks overlap it where that is known (MPI: mpiexec binds
    ranks or not, by its options), else shared with the node's other ranks where they all inherit
    one (torchrun's workers). An srun task's mask is its own where Slurm binds tasks; a site
    without task binding gives every task the whole step's mask, so the task's --cpus-per-task
    (`task_cpus`, 0 when not given) caps it; without one, a mask of all the node's CPUs the job
    holds (`node_cpus`, SLURM_CPUS_ON_NODE) is the step's, and the node's tasks share it. A CPU
    quota is one for every process of its cgroup (a container's `--cpus=N` holds the node's ranks):
    each rank counts its share of it, bound or not (a rank bound to its own 16 CPUs counted all of a
    quota of 8, and so did each other rank)."""
    mask = usable_cpus()
    if sharers:
        cpus = mask // sharers
    elif launcher == "slurm" and task_cpus > 0:
        cpus = min(mask, task_cpus)
    elif launcher == "slurm":
        shared = node_cpus > 0 and local_world_size > 1 and mask >= node_cpus
        cpus = mask // local_world_size if shared else mask
    else:
        cpus = mask // max(1, local_world_size) if launcher in ("torchrun", "mpi") else mask
    share = quota_share(local_world_size)
    return max(1, cpus if share is None else min(cpus, share))


def gpu_index(local_rank: int, local_world_size: int, visible: int, isolated: bool) -> int:
    """The GPU (among the `visible` ones) this rank binds, or a DmhpcError when ranks would share one.

    - the launcher gave this process a GPU of its own (`isolated`, see `own_gpu`) and it sees one: GPU 0;
    - one rank on the node: GPU 0;
    - at least as many GPUs as ranks on the node: the local rank's;
    - otherwise two ranks would share a GPU (NCCL refuses: "Duplicate GPU detected"): refused,
      with how to launch instead;
    - `local_world_size` 0 (the launcher does not say): refused on every rank alike.
    """
    if visible < 1 or (isolated and visible == 1):
        return 0
    if local_world_size < 1:
        # Each rank would guess local_rank + 1: rank 0 bound GPU 0 and waited 30 minutes for a rank 1
        # that had been refused for sharing it.
        raise DmhpcError("the launcher does not say how many ranks run on this node (LOCAL_WORLD_SIZE is not set), "
                         "so the ranks cannot agree which GPU each binds: set LOCAL_WORLD_SIZE (torchrun does), or "
                         "DMHPC_GPU_PER_RANK=1 if your launcher gives each rank a GPU of its own")
    ranks = max(local_world_size, local_rank + 1)
    if ranks == 1:
        return 0
    if visible >= ranks:
        return local_rank
    shared = ", ".join(f"local ranks {', '.join(str(r) for r in range(g, ranks, visible))} on GPU {g}"
                       for g in range(visible) if len(range(g, ranks, visible)) > 1)
    raise DmhpcError(f"{ranks} ranks on this node but each process sees {visible} GPU{'s' if visible > 1 else ''}: "
                     f"{shared} would share it; start one rank per GPU (torchrun --nproc_per_node={visible}, or "
                     f"srun --ntasks-per-node={ranks} --gpus-per-task=1, as DMHPC_LAUNCH=srun sbatch "
                     f"--ntasks-per-node={ranks} --gpus-per-task=1 slurm/train_ddp.sh does), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run "
                     f"the ranks on the CPU"
                     + ("; if your launcher gives each rank a GPU of its own (srun --gpu-bind, a wrapper setting "
                        "CUDA_VISIBLE_DEVICES per rank), say so with DMHPC_GPU_PER_RANK=1" if visible == 1 else ""))


def own_gpu(launch: Launch, env: Mapping[str, str]) -> bool:
    """Whether the launcher gave this process a GPU of its own: the user says so
    (DMHPC_GPU_PER_RANK=1), or Slurm gave each task one GPU (--gpus-per-task=1, or "a100:1") and
    each rank is a Slurm task of its own (srun, submitit). Not for torchrun's workers inside one
    task, nor for a batch script's processes: they share the task's GPUs."""
    if env.get("DMHPC_GPU_PER_RANK") == "1":
        return True
    return env.get("SLURM_GPUS_PER_TASK", "").rsplit(":", 1)[-1] == "1" and rank_is_slurm_task(launch, env)


def rank_is_slurm_task(launch: Launch, env: Mapping[str, str]) -> bool:
    """Whether each rank on this node is a Slurm task of its own (srun's ranks, submitit's, which
    carry torchrun's variables too), with its own GPUs and CPUs where the site binds them; not
    torchrun's workers inside one task, nor a batch script's processes."""
    if "SLURM_LOCALID" not in env:
        return False
    ranks_here = max(launch.local_world_size, launch.local_rank + 1)
    return env_int(env, "SLURM_LOCALID") == launch.local_rank and _slurm_tasks_on_node(env) == ranks_here


def _bind_device(launch: Launch, env: Mapping[str, str]) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = gpu_index(launch.local_rank, launch.local_world_size, torch.cuda.device_count(), own_gpu(launch, env))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


_threads_before: int | None = None  # torch's thread count before bootstrap set its own
_mpi_world = None  # MPI.COMM_WORLD where the ranks met through MPI (bootstrap under mpiexec)


def mpi_world():
    """MPI.COMM_WORLD where this process's ranks met through MPI (bootstrap under mpiexec) and MPI
    is still up, else None. (prepare and synth, which use MPI themselves, end their world their way.)"""
    if _mpi_world is None:
        return None
    from mpi4py import MPI

    return _mpi_world if MPI.Is_initialized() and not MPI.Is_finalized() and _mpi_world.Get_size() > 1 else None


def _use_cpus(cpus: int, env: Mapping[str, str]) -> None:
    """torch's threads: this rank's share of the CPUs. torch's default is every CPU of the process's
    mask: under mpiexec and srun the ranks of a node sharing one each took all of it (the trainer
    alone divided them; predict, eval and explain ran the node's CPUs several times over).
    torchrun sets OMP_NUM_THREADS=1; a user's wins. Put back by `shutdown` (an in-process run: the
    demo, a notebook)."""
    global _threads_before
    if "OMP_NUM_THREADS" not in env:
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(cpus)


def bootstrap(backend: str | None = None) -> DistInfo:
    """Join the run's process group (if there is more than one process) and bind this rank's device.

    `backend` forces "nccl" or "gloo"; by default NCCL on GPUs and gloo on CPUs.
    """
    if is_distributed():
        raise RuntimeError("bootstrap() called twice: the process group already exists")
    global _joined
    _joined = None  # (a group of an earlier bootstrap in this process, left since: no peer of this one)
    env = os.environ
    launch = detect_launch(env)
    if launch.launcher == "mpi" and launch.world_size != 1:
        launch = _mpi_rendezvous(launch, env)
    device = _bind_device(launch, env)
    # Where the launcher does not say (no LOCAL_WORLD_SIZE, on CPUs: refused on GPUs), every rank
    # counted as on this node: each guessing local_rank + 1, rank 0 took the whole mask, rank 3 of 4 a
    # quarter, and the node's threads were oversubscribed.
    local = max(launch.local_world_size or launch.world_size, launch.local_rank + 1)
    # submitit's ranks look like torchrun's but are Slurm tasks, each with its own --cpus-per-task; so
    # is a job's one task (a scaling study's reference point took the whole node beside its points'
    # --cpus-per-task where the site does not bind tasks to their CPUs).
    srun_task = rank_is_slurm_task(launch, env)
    cpus = cpus_per_rank("slurm" if srun_task else launch.launcher, local, launch.cpu_sharers,
                         env_int(env, "SLURM_CPUS_PER_TASK") if srun_task and "SLURM_CPUS_PER_TASK" in env else 0,
                         env_int(env, "SLURM_CPUS_ON_NODE") if srun_task and "SLURM_CPUS_ON_NODE" in env else 0)
    if launch.world_size == 1:
        _use_cpus(cpus, env)
        return DistInfo(0, launch.local_rank, 1, device, None, launch.launcher, 1, cpus, job_attempt(env))
    _joined = launch.rank
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    store = _torchrun_attempt_store(launch, env) if launch.launcher == "torchrun" else None
    if store is not None:
        rendezvous: dict[str, Any] = {"store": store}
    elif launch.launcher == "torchrun":
        rendezvous = {"init_method": "env://"}  # a fresh store per attempt, hosted by rank 0
    else:
        if launch.launcher == "slurm" and launch.rank == 0 and master_addr(env):
            # Rank 0 hosts the store; its refusal ends the step (srun --kill-on-bad-exit).
            check_hosted_here(launch.master_addr, "rank 0's node")
        rendezvous = {"init_method": tcp_url(launch.master_addr, launch.master_port)}
    # Imported before the group forms: its functions take `group=group.WORLD` as a default, evaluated
    # at import. Imported by DDP's first construction, they held the default group past
    # destroy_process_group, its gloo threads running into the interpreter's teardown, where a rank
    # that had finished its run aborted now and then ("terminate called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None, **rendezvous)
    _use_cpus(cpus, env)  # (once nothing can fail: shutdown puts them back, and a failed bootstrap has none)
    return DistInfo(launch.rank, launch.local_rank, launch.world_size, device, backend, launch.launcher, local, cpus,
                    job_attempt(env))


def job_attempt(env: Mapping[str, str]) -> dict | None:
    """Which attempt of which job this is: {"job", "restart"}, the restart an ordinal of the job's
    attempts (every one starts with the same arguments). None where nothing restarts the ranks.

    A SLURM job keeps its id when requeued and counts SLURM_RESTART_COUNT up. torchrun
    `--max-restarts N` starts the workers again with TORCHELASTIC_RESTART_COUNT up (0..N), inside
    each SLURM attempt, or as the job itself (its rendezvous id: a uuid with --standalone, else
    --rdzv-id's, whose default names no job). Without them a worker restart took --resume none
    --overwrite again and replaced what the job trained.
    """
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0)
        restart = int(env.get("TORCHELASTIC_RESTART_COUNT") or 0) if restarts > 0 else 0
    except ValueError:
        restarts = restart = 0
    if env.get("SLURM_JOB_ID"):
        try:
            requeues = int(env.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            requeues = 0
        return {"job": env["SLURM_JOB_ID"], "restart": requeues * (restarts + 1) + restart}
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if restarts > 0 and run_id and run_id != "none":  # ("none": torchrun's default --rdzv-id, no one job's)
        return {"job": f"torchrun-{run_id}", "restart": restart}
    return None


def _torchrun_attempt_store(launch: Launch, env: Mapping[str, str]) -> dist.Store | None:
    """The store of this torchrun attempt, when torchrun's agent shares one store between attempts.

    torchrun's agent keeps its TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE=True, the
    default since torch 2.4), so after `--max-restarts` restarts the workers, the keys the previous
    workers wrote to build their process group are still there, and a new rank can read a dead
    rank's address: gloo's connectFullMesh then fails or hangs (pytorch/pytorch#135712). Every
    attempt gets its own key prefix from TORCHELASTIC_RESTART_COUNT. That count is kept by each
    agent, so it names the attempt only when one agent runs every worker; with several agents the
    shared store cannot be made safe from here, and restarts are refused up front.
    None: torchrun does not share its store (env:// then gives each attempt a new one).
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agents = env_int(env, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in env else 1
    if agents > 1:
        if env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
            raise DmhpcError(
                f"environment: torchrun --max-restarts across {agents} nodes shares one rendezvous store "
                f"between attempts, so a restart can join a stale process group (pytorch/pytorch#135712); "
                f"export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
        return None
    # Its own timeout: torch applies init_process_group's to the stores it makes, not to one given
    # (the default 5 minutes failed ranks that arrived further apart than that).
    store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                          timeout=COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(f"dmhpc/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_distributed() -> bool:
    """True when a process group exists (several processes)."""
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the rank's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group; nothing to do in a single process.

    What still holds the group goes first: a DDP model left in a reference cycle (an exception caught
    while a figure was drawn keeps the frames above it), or in the frames of the error being raised
    (called from a `finally`), kept it past destroy_process_group, to be destroyed in the
    interpreter's teardown, where gloo's threads aborted a finished rank now and then. The error's
    traceback keeps its lines; its frames lose their variables."""
    global _threads_before
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None
    if is_distributed():
        raised = sys.exc_info()[1]
        if raised is not None:
            traceback.clear_frames(raised.__traceback__)
        gc.collect()
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier() -> None:
    """Wait for every rank; nothing to do in a single process."""
    if is_distributed():
        dist.barrier()


def tcp_url(addr: str, port: int) -> str:
    """torch's tcp:// rendezvous URL; an IPv6 address in brackets (torch read "::1:29500" as a port)."""
    return f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"


def meet_before_leaving() -> None:
    """Wait for every rank before leaving the process group: torchrun ends the others as soon as
    one rank exits non-zero (a requeue's 75, an error), and a rank still closing its files lost its
    last line. Best effort: a rank that left already (a failure of its own while closing) lets the
    others go on with their own ending instead of a transport error."""
    if is_distributed():
        try:
            dist.barrier()
        except RuntimeError:  # torch's DistBackendError: a peer closed its connection
            pass


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0 and None on the others; `[obj]` in
    a single process. For what rank 0 alone uses: all_gather_object hands every rank everything."""
    if not is_distributed():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics). A collective. Each rank's
    drift apart in training (each normalizes its own batches; DDP copies rank 0's over them only at
    the start of the next forward), so a model evaluated in shards is otherwise several models."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over ranks of a small tensor, returned on the CPU."""
    if not is_distributed():
        return values.cpu()
    out = values.to(collective_device(), copy=True)  # (the same tensor otherwise: reduced in place)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.cpu()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks of a small tensor, returned on the CPU."""
    if not is_distributed():
        return values.cpu()
    # A copy: where `values` is on the collective's device already, .to() returned it, and the
    # caller's tensor (a meter's sums) was left holding the sum over ranks.
    out = values.to(collective_device(), copy=True)
    dist.all_reduce(out)
    return (out / dist.get_world_size()).cpu()


class AgreedError(DmhpcError):
    """A DmhpcError every rank raised alike, right after exchanging it: all of them are alive and
    at the same point, so they can still meet (`meet_before_leaving`)."""


def agreed(exc: BaseException) -> bool:
    """Whether every rank raised `exc` at the same point: an AgreedError, or the error other than a
    DmhpcError of the rank it happened on, which the others hold as an AgreedError. All of them can
    meet before leaving (the rank of such an error left without meeting, and the others waited at
    the barrier: on NCCL until the watchdog's timeout)."""
    return isinstance(exc, AgreedError) or getattr(exc, "dmhpc_agreed", False)


def _run_agreed(step: Callable[[], Any], runs: bool, share: str) -> Any:
    result, error, failure = None, None, None
    if runs:
        try:
            result = step()
        except Exception as exc:
            if not is_distributed():
                raise
            # Any error travels, not only ours: a rank that raised another alone went on to the
            # collectives of its way out while the others waited in this one, mismatched.
            error = str(exc) if isinstance(exc, DmhpcError) else f"{type(exc).__name__}: {exc}"
            failure = exc
    if not is_distributed():
        return [result] if share == "all" else result
    sent = result if share == "all" or (share == "main" and dist.get_rank() == 0) else None
    gathered = all_gather_object((sent, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        if failure is not None and not isinstance(failure, DmhpcError):
            failure.dmhpc_agreed = True  # (see `agreed`)
            raise failure  # a defect: its traceback on the rank it happened on
        raise AgreedError(errors[0])
    return {"all": [r for r, _ in gathered], "main": gathered[0][0], "own": result}[share]


def agree(step: Callable[[], Any]) -> Any:
    """Run `step()` on every rank and return this rank's result; an error on any rank is raised
    on every rank (AgreedError with the lowest rank's message; the rank of an error other than
    DmhpcError raises its own, traceback and all), so no rank goes on to a collective that the
    others will never reach. Only errors travel between ranks."""
    return _run_agreed(step, True, "own")


def on_main(step: Callable[[], Any]) -> Any:
    """Run `step()` on rank 0 only and hand its result (small, picklable) to every rank; its
    error is raised on every rank (see `agree`)."""
    return _run_agreed(step, not is_distributed() or dist.get_rank() == 0, "main")


def gather(step: Callable[[], Any]) -> list:
    """Run `step()` on every rank; every rank gets all results in rank order (or the first error)."""
    return _run_agreed(step, True, "all")
