"""Bootstrap: launcher detection (pure logic on given environments) and real 2-process groups
under torchrun, mpiexec and a SLURM-style step."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch

from tests.conftest import BIN, LAUNCH_PREFIXES, LAUNCH_VARS, ROOT, clean_env, fake_commands
from dmhpc.distributed import (COLLECTIVE_TIMEOUT, Launch, all_gather_object, barrier, bootstrap, collective_device,
                               detect_launch, shutdown)
from dmhpc.errors import DmhpcError


TORCHRUN = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="node7", MASTER_PORT="29400")
SLURM_STEP = dict(SLURM_JOB_ID="12345", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4",
                  SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NODELIST="gpu[03-04]", SLURM_JOB_NODELIST="gpu[01-04]",
                  PATH="")  # PATH="": no scontrol, the built-in node-list expansion answers


# --- which launcher: pure logic --------------------------------------------------------------------

def test_plain_process_is_single():
    assert detect_launch({}) == Launch("single", 0, 0, 1, local_world_size=1)  # a world of one: alone on its node


def test_torchrun_variables():
    assert detect_launch(TORCHRUN) == Launch("torchrun", 1, 1, 4, "node7", 29400)


def test_torchrun_wins_over_slurm_for_srun_torchrun():
    assert detect_launch({**SLURM_STEP, **TORCHRUN}).launcher == "torchrun"


def test_incomplete_or_bad_torchrun_variables_are_errors():
    with pytest.raises(DmhpcError, match="RANK is set .* but MASTER_ADDR, MASTER_PORT are not"):
        detect_launch({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DmhpcError, match="environment variable WORLD_SIZE: expected an integer, got 'two'"):
        detect_launch({**TORCHRUN, "WORLD_SIZE": "two"})
    with pytest.raises(DmhpcError, match="rank 4 is outside a world of 4"):
        detect_launch({**TORCHRUN, "RANK": "4"})
    # Tracebacks from the TCP store ("world size cannot be 0", "Port out of range").
    with pytest.raises(DmhpcError, match="^environment: torchrun world size 0; expected at least 1$"):
        detect_launch({**TORCHRUN, "RANK": "0", "WORLD_SIZE": "0"})
    for port in ("abc", "70000", "0"):
        with pytest.raises(DmhpcError, match=f"^environment variable MASTER_PORT: expected a port number, got '{port}'$"):
            detect_launch({**TORCHRUN, "MASTER_PORT": port})


BOOT = textwrap.dedent("""
    import sys
    from dmhpc.distributed import bootstrap
    from dmhpc.errors import DmhpcError
    try:
        bootstrap()
    except DmhpcError as exc:
        print(f'error: {exc}')
        sys.exit(1)
""")


@pytest.mark.mpi
@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason=f"mpiexec not found in {BIN}")
def test_a_bad_master_port_under_mpiexec_is_every_ranks_one_line(tmp_path):
    """Rank 0 alone read MASTER_PORT, before its broadcast: a ValueError traceback there, and the
    other rank waited in the broadcast for ever."""
    script = tmp_path / "boot.py"
    script.write_text(BOOT)
    env = {**clean_env(), "MASTER_PORT": "abc"}
    proc = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    said = "error: environment variable MASTER_PORT: expected a port number, got 'abc'"
    assert proc.stdout.count(said) == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", [("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")])
def test_an_mpi_library_that_sees_one_process_of_a_launchers_several_is_refused(launcher):
    """A launcher of another MPI (Open MPI's mpirun, an MPICH mpi4py): each process became rank 0
    of a world of one, and the trainers met at the run's lock, told "in use by another trainer".
    Refused as prepare and synth refuse it, in one line."""
    pytest.importorskip("mpi4py")
    rank, size = launcher
    proc = subprocess.run([sys.executable, "-c", "from dmhpc.distributed import bootstrap; print(bootstrap())"],
                          cwd=ROOT, env={**clean_env(), rank: "1", size: "4"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert (f"DmhpcError: launched as rank 1 of 4 ({rank}) but MPI sees a world of one process: the launcher and "
            f"this MPI library do not share a process manager") in proc.stderr, proc.stderr[-2000:]


def test_slurm_step_with_several_tasks():
    assert detect_launch(SLURM_STEP) == Launch("slurm", 3, 1, 4, "gpu03", 29500 + 345)
    assert detect_launch({**SLURM_STEP, "SLURM_JOB_ID": "45678"}).master_port == 29500 + 1678


def test_slurm_falls_back_to_the_job_node_list_and_honours_master_variables():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_launch(env).master_addr == "gpu01"
    launch = detect_launch({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert (launch.launcher, launch.master_addr, launch.master_port) == ("slurm", "10.0.0.1", 4242)
    # A step list of another job (sbatch passed on a shell's from inside an interactive step): the
    # ranks met on that job's node, and the rendezvous timed out.
    from dmhpc.rendezvous import slurm_rendezvous

    assert slurm_rendezvous({**env, "SLURM_STEP_NODELIST": "login[1-2]"})[0] == "gpu01"
    assert slurm_rendezvous({**env, "SLURM_STEP_NODELIST": "gpu[02-03]"})[0] == "gpu02"


def test_slurm_batch_script_and_single_task_steps_are_single_processes():
    # The batch shell of an --ntasks=4 job: SLURM_NTASKS=4 and SLURM_PROCID=0, but no step.
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP_")}
    assert detect_launch({**batch, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).launcher == "single"
    assert detect_launch({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"


def test_slurm_step_errors():
    with pytest.raises(DmhpcError, match="SLURM_LOCALID is not"):
        detect_launch({k: v for k, v in SLURM_STEP.items() if k != "SLURM_LOCALID"})
    with pytest.raises(DmhpcError, match="no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"):
        detect_launch({k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k})
    with pytest.raises(DmhpcError, match="SLURM_PROCID: expected an integer"):
        detect_launch({**SLURM_STEP, "SLURM_PROCID": ""})


@pytest.mark.parametrize("env, expected", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, Launch("mpi", 1, 0, 2)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3"},
     Launch("mpi", 3, 0, 8)),
    ({"PALS_RANKID": "5", "PALS_LOCAL_RANKID": "1"}, Launch("mpi", 5, 0, 0)),  # size: ask MPI
    ({"PMIX_RANK": "0"}, Launch("mpi", 0, 0, 0)),
])
def test_mpi_variables(env, expected):
    # local rank and (when missing) world size come from mpi4py at bootstrap
    assert detect_launch(env) == expected


def test_mpi_launched_through_srun_proxies_is_mpi():
    # mpiexec under SLURM starts one proxy per node with srun: the step describes 2 proxies, not 8 ranks.
    proxies = {**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    assert detect_launch({**proxies, "PMI_RANK": "5", "PMI_SIZE": "8"}).launcher == "mpi"
    # srun --mpi=pmix: both describe the same ranks, SLURM answers without MPI
    assert detect_launch({**SLURM_STEP, "PMIX_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}).launcher == "slurm"


# --- single process ----------------------------------------------------------------------------------

def test_single_process_bootstrap_has_no_process_group(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in LAUNCH_VARS:
            monkeypatch.delenv(key)
    info = bootstrap()
    assert (info.rank, info.local_rank, info.world_size, info.backend, info.launcher) == (0, 0, 1, None, "single")
    assert info.is_main
    assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert collective_device() == torch.device("cpu")
    barrier()
    shutdown()


def test_one_mpi_process_needs_no_mpi(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in LAUNCH_VARS:
            monkeypatch.delenv(key)
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "1")
    info = bootstrap()  # that it imports no mpi4py is tests/test_mpi.py's, in a fresh interpreter
    assert (info.world_size, info.backend, info.launcher) == (1, None, "mpi")


def test_bootstrap_reports_bad_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DmhpcError, match="RANK is set"):
        bootstrap()


def test_torchrun_restarts_across_nodes_on_a_shared_store_are_refused(monkeypatch):
    """Each agent counts its own restarts, so per-attempt prefixes cannot be agreed across nodes."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DmhpcError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        bootstrap()
    assert not torch.distributed.is_initialized()


# --- real process groups -----------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as tdist
    from dmhpc.distributed import all_gather_object, barrier, bootstrap, collective_device, gather_to_main, shutdown

    info = bootstrap()
    total = torch.tensor([float(info.rank + 1)], device=collective_device())
    tdist.all_reduce(total)
    gathered = all_gather_object({"rank": info.rank})
    to_main = gather_to_main({"rank": info.rank})
    barrier()
    with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
        json.dump({"rank": info.rank, "local_rank": info.local_rank, "world": info.world_size,
                   "backend": info.backend, "launcher": info.launcher, "device": str(info.device),
                   "is_main": info.is_main, "sum": total.item(), "gathered": gathered, "to_main": to_main,
                   "group_world": tdist.get_world_size(),
                   "timeout_s": tdist.group.WORLD._get_backend(collective_device()).options._timeout.total_seconds()},
                  f)
    shutdown()
""")


def _run_two(tmp_path, argv_prefix, env_for_rank=None, timeout=180) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    if env_for_rank is None:
        proc = subprocess.run([*argv_prefix, str(script), str(out)], env=clean_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        procs = [subprocess.Popen([sys.executable, str(script), str(out)], env=env_for_rank(r), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        for p in procs:
            output = p.communicate(timeout=timeout)[0]
            assert p.returncode == 0, output
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_group(results, launcher):
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["group_world"] == 2
        assert res["launcher"] == launcher and res["backend"] == "gloo" and res["device"] == "cpu"
        assert res["sum"] == 3.0  # 1 + 2: both ranks took part
        assert res["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert res["to_main"] == ([{"rank": 0}, {"rank": 1}] if r == 0 else None)
        assert res["is_main"] == (r == 0)
        assert res["timeout_s"] == COLLECTIVE_TIMEOUT.total_seconds()


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason=f"torchrun not found in {BIN}")
def test_two_ranks_under_torchrun(tmp_path):
    results = _run_two(tmp_path, [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"])
    _check_group(results, "torchrun")
    assert [r["local_rank"] for r in results] == [0, 1]


LEAVING = textwrap.dedent("""
    import gc, glob, json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from dmhpc.distributed import bootstrap, shutdown

    info = bootstrap()

    def train():
        model = DistributedDataParallel(torch.nn.Linear(3, 2))
        model(torch.ones(4, 3)).sum().backward()
        if sys.argv[2] == "raised":
            raise RuntimeError("a failure after the model was built")
        cycle = {"model": model}
        cycle["self"] = cycle  # as a caught exception's traceback keeps the frames that held a model

    gc.disable()  # a cycle stays until something collects it
    try:
        try:
            train()
        finally:
            shutdown()  # as the trainer's finally leaves the group, while its error is raised
            threads = sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm"))
            with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
                json.dump(threads, f)
    except RuntimeError:
        pass
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads' names in /proc")
@pytest.mark.parametrize("held", ["cycle", "raised"])
def test_leaving_the_group_ends_its_threads_whatever_held_it(tmp_path, held):
    """The default group outlived destroy_process_group: DDP's first construction imported
    torch.distributed.nn.functional, whose defaults (group=group.WORLD, evaluated at import) held it,
    and a DDP model held it from a reference cycle or from the frames of the error being raised. It
    was destroyed in the interpreter's teardown, with gloo's threads still running, where a rank that
    had finished its run aborted now and then ("terminate called without an active exception": a
    two-node job that trained and tested FAILED)."""
    script = tmp_path / "leaving.py"
    script.write_text(LEAVING)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
                           held], env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], (rank, threads)


ENDING = textwrap.dedent("""
    import sys, time
    from dmhpc.distributed import AgreedError, bootstrap, meet_before_leaving, on_main, shutdown
    from dmhpc.errors import DmhpcError

    def refuse():
        raise DmhpcError("refused on rank 0")

    info = bootstrap()
    try:
        try:
            on_main(refuse)
        finally:
            if info.rank == 0:  # closing its files (a log, TensorBoard's writer, a loader) on a slow disk;
                time.sleep(2 if sys.argv[1] == "meet" else 60)  # without meeting, ended by torchrun meanwhile
    except AgreedError as exc:
        if sys.argv[1] == "meet":
            meet_before_leaving()
        print(f"rank {info.rank}: {exc}", flush=True)
        shutdown()
        sys.exit(1)
""")


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason=f"torchrun not found in {BIN}")
def test_every_rank_says_an_agreed_error_before_torchrun_ends_the_others(tmp_path):
    """torchrun ends every rank as soon as one exits non-zero: rank 0, still closing its files, lost
    its line (and the trainer's requeue line); the trainer's ranks meet before they leave."""
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    said = {}
    for mode in ("meet", "leave"):
        proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), mode],
                              env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode != 0
        # Written at the same moment, the two lines may share a line of the stream.
        said[mode] = sorted(re.findall(r"rank (\d): refused on rank 0", proc.stdout))
    assert said == {"meet": ["0", "1"], "leave": ["1"]}, said  # leaving at once: rank 0's line lost


@pytest.mark.mpi
@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason=f"mpiexec not found in {BIN}")
def test_two_ranks_under_mpiexec(tmp_path):
    results = _run_two(tmp_path, [str(BIN / "mpiexec"), "-n", "2", sys.executable])
    _check_group(results, "mpi")
    assert sorted(r["local_rank"] for r in results) == [0, 1]


def _free_slurm_port() -> int:
    """A free port a SLURM step derives from its job id (rendezvous.PORT_BASE + job id % PORT_SPAN)."""
    from dmhpc.rendezvous import PORT_BASE, PORT_SPAN

    for i in range(PORT_SPAN):
        port = PORT_BASE + (os.getpid() + i) % PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip(f"no free port in {PORT_BASE}-{PORT_BASE + PORT_SPAN - 1}")


def _binds(addr: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("addr", [None, "[::1]"])
def test_two_ranks_as_a_slurm_step(tmp_path, addr):
    """What srun -n 2 gives each task on one node; the port comes from the job id, as on a cluster.
    slurm/lib.sh exports an IPv6 MASTER_ADDR in brackets: the URL was tcp://[[::1]]:P, a traceback."""
    from dmhpc.rendezvous import PORT_BASE

    if addr == "[::1]" and not _binds("::1"):
        pytest.skip("no IPv6 loopback on this machine")

    port = _free_slurm_port()

    def env(rank):
        return clean_env(SLURM_JOB_ID=str(port - PORT_BASE), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                         SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                         PATH=str(BIN), **({"MASTER_ADDR": addr} if addr else {}))
    results = _run_two(tmp_path, None, env_for_rank=env)
    _check_group(results, "slurm")


def test_rank_0_of_a_slurm_step_refuses_a_master_addr_of_another_node(tmp_path):
    """A MASTER_ADDR exported from the submitting shell (a login node; 192.0.2.1 is reserved for
    documentation, no one's address): rank 0 hosted the store on its own node and every rank
    dialled the named one, 30 minutes without a word. Rank 0 now stops at once (srun's
    --kill-on-bad-exit ends the others)."""
    script = tmp_path / "boot.py"
    script.write_text(BOOT)
    env = clean_env(SLURM_JOB_ID="4321", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="2",
                    SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost", MASTER_ADDR="192.0.2.1",
                    MASTER_PORT=str(_free_slurm_port()), PATH=str(BIN))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == (
        f"error: environment variable MASTER_ADDR=192.0.2.1: not an address of rank 0's node "
        f"({socket.gethostname()}), where the ranks' store is; unset it (the job's first node is used) or name "
        f"that node\n"), proc.stdout + proc.stderr


def test_every_command_takes_its_ranks_share_of_the_cpus(monkeypatch):
    """The trainer alone set torch's threads to its rank's share of the node's CPUs: mpiexec's ranks
    of predict, eval and explain each took every CPU of the mask they share. bootstrap sets them for
    every command, and shutdown puts back what was there (an in-process run: the demo, a notebook)."""
    from dmhpc import cpus
    from dmhpc.distributed import bootstrap, shutdown

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpus, "cpu_mask", lambda: [0])  # a rank's share: one CPU
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default: every CPU of the process's mask
    try:
        dist = bootstrap()
        assert (dist.cpus, torch.get_num_threads()) == (1, 1)
        shutdown()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user's (or torchrun's) choice wins
        bootstrap()
        assert torch.get_num_threads() == 2
        shutdown()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.mpi
@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason=f"mpiexec not found in {BIN}")
def test_a_master_addr_of_another_node_under_mpiexec_is_every_ranks_one_line(tmp_path):
    script = tmp_path / "boot.py"
    script.write_text(BOOT)
    proc = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script)], cwd=ROOT,
                          env={**clean_env(), "MASTER_ADDR": "192.0.2.1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    said = "error: environment variable MASTER_ADDR=192.0.2.1: not an address of rank 0's node"
    assert proc.stdout.count(said) == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("local_rank, local_world, visible, isolated, expected", [
    (0, 1, 1, False, 0),      # one rank, one GPU
    (0, 1, 4, False, 0),      # one rank on a 4-GPU node
    (2, 4, 4, False, 2),      # one rank per GPU
    (1, 2, 8, False, 1),      # fewer ranks than GPUs
    (3, 4, 1, True, 0),       # srun --gpus-per-task=1: each task sees its own GPU as GPU 0
    (3, 4, 4, True, 3),       # --gpus-per-task=1 where the site does not hide the others: its own by rank
])
def test_gpu_binding_decision_table(local_rank, local_world, visible, isolated, expected):
    from dmhpc.distributed import gpu_index

    assert gpu_index(local_rank, local_world, visible, isolated) == expected


@pytest.mark.parametrize("local_rank, local_world, visible, message", [
    (1, 2, 1, "2 ranks on this node but each process sees 1 GPU: local ranks 0, 1 on GPU 0 would share it"),
    (0, 4, 2, "local ranks 0, 2 on GPU 0, local ranks 1, 3 on GPU 1 would share it"),
])
def test_ranks_sharing_a_gpu_are_refused_with_how_to_launch(local_rank, local_world, visible, message):
    from dmhpc.distributed import gpu_index

    with pytest.raises(DmhpcError) as info:
        gpu_index(local_rank, local_world, visible, isolated=False)
    text = str(info.value)
    assert message in text and "torchrun --nproc_per_node=" in text and "--gpus-per-task=1" in text
    assert "\n" not in text
    # One GPU seen by each process: a launcher that isolates GPUs its own way (srun --gpu-bind) is told how to say so.
    assert ("say so with DMHPC_GPU_PER_RANK=1" in text) == (visible == 1)


@pytest.mark.parametrize("visible", [1, 2, 8])
def test_ranks_of_a_launcher_that_does_not_say_how_many_share_the_node_are_all_refused(visible):
    """Without LOCAL_WORLD_SIZE each rank guessed local_rank + 1: with one GPU, local rank 0 bound
    it and waited in the rendezvous for 30 minutes while local rank 1 was refused for sharing it."""
    from dmhpc.distributed import gpu_index

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    for local_rank in (0, 1):
        launch = detect_launch({**env, "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)})
        with pytest.raises(DmhpcError, match="LOCAL_WORLD_SIZE is not set") as info:
            gpu_index(launch.local_rank, launch.local_world_size, visible, isolated=False)
        assert "\n" not in str(info.value)
    # A world of one needs no count; a rank with a GPU of its own needs none either.
    assert gpu_index(0, detect_launch({**env, "WORLD_SIZE": "1"}).local_world_size, visible, isolated=False) == 0
    assert gpu_index(1, 0, 1, isolated=True) == 0
    assert gpu_index(1, detect_launch({**env, "LOCAL_WORLD_SIZE": "2"}).local_world_size, 2, isolated=False) == 1


@pytest.mark.parametrize("case, env, own", [
    # srun --ntasks-per-node=4 --gpus-per-task=1: each rank is a task with its GPU.
    ("srun tasks", {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NODEID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "n[1-2]", "MASTER_ADDR": "n1",
                    "SLURM_GPUS_PER_TASK": "1"}, True),
    ("typed gres", {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NODEID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "n[1-2]", "MASTER_ADDR": "n1",
                    "SLURM_GPUS_PER_TASK": "a100:1"}, True),
    # submitit's tasks carry torchrun's variables, and are still one Slurm task per rank.
    ("submitit tasks", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "a", "MASTER_PORT": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
                        "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_PER_TASK": "1"}, True),
    # train_ddp.sh's torchrun mode under --gpus-per-task=1: 4 workers inside one task share its GPU.
    ("torchrun in one task", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                              "MASTER_ADDR": "a", "MASTER_PORT": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                              "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_GPUS_PER_TASK": "1"}, False),
    # torchrun in the batch script itself (no srun): no step, the job's GPUs are shared.
    ("torchrun in the batch step", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                                    "MASTER_ADDR": "a", "MASTER_PORT": "1", "SLURM_GPUS_PER_TASK": "1"}, False),
    ("two GPUs per task", {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
                           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "n1",
                           "MASTER_ADDR": "n1", "SLURM_GPUS_PER_TASK": "2"}, False),
    ("the user says so", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                          "MASTER_ADDR": "a", "MASTER_PORT": "1", "DMHPC_GPU_PER_RANK": "1"}, True),
])
def test_a_gpu_of_its_own_only_where_each_rank_is_a_task_with_one(case, env, own):
    """SLURM_GPUS_PER_TASK=1 reaches torchrun's workers too: taken alone, it bound every worker of a
    task to GPU 0, and NCCL refuses ranks that share a GPU."""
    from dmhpc.distributed import gpu_index, own_gpu

    launch = detect_launch(env)
    assert own_gpu(launch, env) is own, case
    if not own:  # each worker sees the task's one GPU: refused at start, not by NCCL later
        with pytest.raises(DmhpcError, match="4 ranks on this node but each process sees 1 GPU"):
            gpu_index(launch.local_rank, launch.local_world_size, 1, own_gpu(launch, env))


def test_submitits_ranks_keep_their_own_cpus():
    """submitit's ranks carry torchrun's variables but are Slurm tasks, each with its own
    --cpus-per-task: dividing their mask among the node's ranks left each a quarter of it."""
    from dmhpc.distributed import rank_is_slurm_task

    submitit = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "a",
                "MASTER_PORT": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "4"}
    assert rank_is_slurm_task(detect_launch(submitit), submitit)
    one_task = {**submitit, "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}  # torchrun inside one task
    assert not rank_is_slurm_task(detect_launch(one_task), one_task)
    plain = {k: v for k, v in submitit.items() if not k.startswith("SLURM_")}  # torchrun outside Slurm
    assert not rank_is_slurm_task(detect_launch(plain), plain)


def test_local_world_size_from_each_launcher():
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1",
                "LOCAL_WORLD_SIZE": "2"}
    assert detect_launch(torchrun).local_world_size == 2
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "7", "SLURM_NODEID": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2),3", "SLURM_STEP_NODELIST": "n1", "MASTER_ADDR": "n1"}
    assert detect_launch(slurm).local_world_size == 3
    assert detect_launch({**slurm, "SLURM_STEP_TASKS_PER_NODE": "weird"}).local_world_size == 0


def test_cpus_per_rank_shares_an_inherited_mask_but_not_an_srun_tasks_own(monkeypatch):
    from dmhpc import cpus
    from dmhpc.distributed import cpus_per_rank

    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)  # (a machine's own quota: its test below)
    mask = len(os.sched_getaffinity(0))
    assert cpus_per_rank("single", 1) == mask
    assert cpus_per_rank("slurm", 4) == mask  # srun gave each task its own CPUs
    # A site without task binding gives each task the step's whole mask: --cpus-per-task caps it.
    assert cpus_per_rank("slurm", 4, task_cpus=1) == 1
    assert cpus_per_rank("slurm", 4, task_cpus=10 * mask) == mask
    # Without --cpus-per-task, a mask of every CPU the job holds on the node is the step's, shared
    # by its tasks (each counted all of it); a smaller one is the task's own.
    assert cpus_per_rank("slurm", 4, node_cpus=mask) == max(1, mask // 4)
    assert cpus_per_rank("slurm", 4, node_cpus=4 * mask) == mask
    assert cpus_per_rank("torchrun", 2) == max(1, mask // 2)  # torchrun's workers share one mask
    assert cpus_per_rank("mpi", 64) == 1
    assert cpus_per_rank("mpi", 2, sharers=1) == mask  # mpiexec bound the rank to its own CPUs


def test_ranks_sharing_cpus_from_the_nodes_masks():
    """mpiexec with binding gives each rank its own CPUs: dividing its mask again among the node's
    ranks left each with a fraction of what it had."""
    from dmhpc.distributed import ranks_sharing_cpus

    bound = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [ranks_sharing_cpus(bound, i) for i in range(4)] == [1, 1, 1, 1]
    inherited = [list(range(8))] * 4
    assert [ranks_sharing_cpus(inherited, i) for i in range(4)] == [4, 4, 4, 4]
    mixed = [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert [ranks_sharing_cpus(mixed, i) for i in range(3)] == [2, 2, 1]


def test_a_test_not_marked_gpu_sees_no_gpu():
    """On a GPU machine too (tests/conftest.py): `-m gpu` must select every test that uses CUDA."""
    from dmhpc.distributed import _bind_device

    # The fixture's stand-in, not torch's own: on this CPU machine both say False, and a fixture that
    # hid nothing would pass unseen until a GPU machine ran the suite.
    assert torch.cuda.is_available.__module__ != torch.cuda.__name__
    assert not torch.cuda.is_available()
    assert _bind_device(detect_launch({}), {}).type == "cpu"


def test_every_backend_waits_as_long_as_gloo(monkeypatch):
    """NCCL's own timeout is 10 minutes against gloo's 30: a multi-GPU `dmhpc predict` whose rank 0
    merged a survey's catalog for longer was stopped by NCCL's watchdog while the same job on CPU
    ranks went through. The backend is chosen by the device: the group's arguments are checked."""
    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in LAUNCH_VARS:
            monkeypatch.delenv(key)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    asked = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: asked.update(kwargs))
    for backend in ("nccl", "gloo"):
        asked.clear()
        bootstrap(backend)
        assert asked["timeout"] == COLLECTIVE_TIMEOUT >= timedelta(minutes=30), backend


ANY_ERROR_TRAVELS = """
import os, socket, sys
import torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from dmhpc.distributed import on_main

    def score():
        raise ValueError("the solver did not converge")

    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as said:  # a file each: stdout mixes their lines
        try:
            on_main(score)
        except Exception as exc:
            said.write(f"{type(exc).__name__}: {exc}\\n")
        said.flush()
        dist.barrier()  # the way out of a trainer: a collective of its own (the stop flag's)
        said.write("out\\n")

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    for p in mp.spawn(run, args=(port, sys.argv[1]), nprocs=2, join=False).processes:
        p.join(40)
        if p.is_alive():
            p.kill()
"""


def test_any_error_of_a_shared_step_reaches_every_rank(tmp_path):
    """Only DmhpcError travelled: another error of a step run on rank 0 alone (rank 0's selection
    score, sklearn's) left rank 1 waiting in the exchange while rank 0 went on to the collectives
    of its way out."""
    (tmp_path / "any.py").write_text(ANY_ERROR_TRAVELS)
    proc = subprocess.run([sys.executable, str(tmp_path / "any.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=clean_env(), cwd=ROOT)
    said = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else "" for r in (0, 1)]
    assert said == ["ValueError: the solver did not converge\nout\n",
                    "AgreedError: ValueError: the solver did not converge\nout\n"], said + [proc.stderr[-2000:]]


PEER_GONE = """
import os, socket, sys, time
import torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from dmhpc.distributed import bootstrap
    bootstrap()  # torchrun's variables: a gloo group on the CPU
    dist.barrier()
    if rank == 1:
        os._exit(3)  # failed on its own and left, or was killed
    time.sleep(0.5)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as exc:
        from dmhpc.distributed import peer_lost
        print("LINE", peer_lost(exc), flush=True)

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    for p in mp.spawn(run, args=(port,), nprocs=2, join=False).processes:
        p.join(60)
"""


def test_a_rank_whose_peer_is_gone_says_so_in_one_line(tmp_path, monkeypatch):
    """A rank failing alone (a shard it reads, a kill) left the other ranks a 40-line gloo traceback
    ending in "Connection closed by peer" beside its own one line. A real gloo failure, named."""
    (tmp_path / "peer.py").write_text(PEER_GONE)
    proc = subprocess.run([sys.executable, str(tmp_path / "peer.py")], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=ROOT)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LINE"))
    assert line.startswith("LINE rank 0: another rank stopped (its own error is its line, in the job's output, "
                           "or it was killed): "), proc.stdout + proc.stderr
    from dmhpc.distributed import peer_lost

    assert peer_lost(RuntimeError("CUDA out of memory")) is None and peer_lost(ValueError("Timed out waiting")) is None
    # A single process has no other rank to blame: its own broken pipe or store timeout is its own error.
    from dmhpc import distributed

    monkeypatch.setattr(distributed, "_joined", 1)  # an earlier bootstrap's group of two, left since
    assert bootstrap().world_size == 1  # (this process's environment: one process)
    assert peer_lost(RuntimeError("[Errno 32] Broken pipe")) is None


# ---------------------------------------------------------------- what each launcher sets, binding, attempts

def test_torchrun_on_a_second_node_keeps_its_local_rank():
    """On every node but the first, the global rank is not the local one: a local rank read from RANK
    bound global rank 5 of a 4-GPU node to a GPU that does not exist (or another rank's)."""
    launch = detect_launch({**TORCHRUN, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (5, 1, 8, 4)
    with pytest.raises(DmhpcError, match="^environment: torchrun local rank -1 is negative$"):
        detect_launch({**TORCHRUN, "LOCAL_RANK": "-1"})


def test_a_nodes_task_count_is_its_own_entry_of_the_step_list():
    """SLURM_STEP_TASKS_PER_NODE gives one count per node in node order; a node past the list (an
    inconsistent environment) is unknown, not an IndexError traceback."""
    slurm = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "7", "SLURM_NODEID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_STEP_NODELIST": "n1", "MASTER_ADDR": "n1"}
    assert detect_launch(slurm).local_world_size == 3
    assert detect_launch({**slurm, "SLURM_NODEID": "3"}).local_world_size == 0


def test_torchruns_workers_inside_srun_tasks_are_no_tasks_of_their_own():
    """srun --ntasks-per-node=2 --gpus-per-task=1 each running torchrun --nproc_per_node=2: the two
    workers of a task share its one GPU. Taken for tasks, both bound GPU 0 and NCCL refused them
    ("Duplicate GPU detected"); and worker 0 of a task of its own kept all the task's CPUs."""
    from dmhpc.distributed import own_gpu, rank_is_slurm_task

    two_tasks = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
                 "MASTER_PORT": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2",
                 "SLURM_GPUS_PER_TASK": "1"}
    launch = detect_launch(two_tasks)
    assert not rank_is_slurm_task(launch, two_tasks) and not own_gpu(launch, two_tasks)
    one_task = {**two_tasks, "RANK": "0", "LOCAL_WORLD_SIZE": "4", "SLURM_LOCALID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert not rank_is_slurm_task(detect_launch(one_task), one_task)


def test_cpus_are_divided_among_the_ranks_that_share_them(monkeypatch):
    """mpiexec without binding gives two ranks one mask: each took all of it, and the node ran twice
    as many threads as it has CPUs."""
    from dmhpc import cpus
    from dmhpc.distributed import cpus_per_rank

    monkeypatch.setattr(cpus, "cpu_mask", lambda: list(range(8)))
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)
    assert cpus_per_rank("mpi", 4, sharers=2) == 4
    assert cpus_per_rank("mpi", 4, sharers=1) == 8


def test_the_ranks_of_a_cgroup_share_its_cpu_quota(monkeypatch):
    """A container's --cpus=8 is one quota for every rank in it: each of 4 ranks bound to its own 16
    CPUs counted all 8, and the node ran 32 threads on 8 CPUs' worth of time."""
    from dmhpc import cpus
    from dmhpc.distributed import cpus_per_rank

    monkeypatch.setattr(cpus, "cpu_mask", lambda: list(range(16)))
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: 8.0)
    assert cpus_per_rank("mpi", 4, sharers=1) == 2  # bound to its own CPUs: the quota's share caps it
    assert cpus_per_rank("slurm", 4) == 2
    assert cpus_per_rank("torchrun", 4) == 2
    assert cpus_per_rank("single", 1) == 8
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: 1.5)
    assert cpus_per_rank("torchrun", 4) == 1  # at least one
    assert cpus_per_rank("single", 1) == 2


def test_the_job_attempt_names_the_job_and_orders_its_restarts():
    """A restarted job's progress check and its claim of the run compare attempts: every attempt read
    as restart 0 (or no job) took a requeue for a fresh start, and torchrun's --max-restarts
    restarts, not counted, took --resume none --overwrite again and replaced what the job trained."""
    from dmhpc.distributed import job_attempt

    assert job_attempt({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}) == {"job": "77", "restart": 2}
    assert job_attempt({"SLURM_JOB_ID": "77"}) == {"job": "77", "restart": 0}
    assert job_attempt({"SLURM_RESTART_COUNT": "2"}) is None
    elastic = {"TORCHELASTIC_RUN_ID": "f00", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert job_attempt(elastic) == {"job": "torchrun-f00", "restart": 2}
    assert job_attempt({**elastic, "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RESTART_COUNT": "0"}) is None
    # torchrun's default --rdzv-id outside --standalone: every such job's, so no one job's
    assert job_attempt({**elastic, "TORCHELASTIC_RUN_ID": "none"}) is None
    # Inside a SLURM job, every requeue's torchrun restarts come after the previous requeue's.
    order = [job_attempt({**elastic, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(q),
                          "TORCHELASTIC_RESTART_COUNT": str(r)})["restart"] for q in range(3) for r in range(4)]
    assert order == list(range(12))
    assert job_attempt({**elastic, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1",
                        "TORCHELASTIC_MAX_RESTARTS": "0"}) == {"job": "77", "restart": 1}


def test_each_torchrun_attempt_on_a_shared_store_has_its_own_keys(monkeypatch):
    """torchrun's agent keeps one store across --max-restarts attempts: a restarted rank read a dead
    rank's address from the previous attempt's keys (pytorch/pytorch#135712). Across nodes without
    restarts there is nothing stale, and the job must start."""
    import torch.distributed as tdist

    from dmhpc.distributed import _torchrun_attempt_store

    shared = tdist.HashStore()
    shared.set_timeout(timedelta(seconds=5))  # a key another attempt wrote: a failure, not a wait
    asked = []
    monkeypatch.setattr(tdist, "TCPStore", lambda *args, **kwargs: asked.append(kwargs) or shared)
    launch = detect_launch(TORCHRUN)
    env = {**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    _torchrun_attempt_store(launch, env).set("addr", "node7")
    # The collectives' timeout, not TCPStore's 5 minutes (torch applies its own to the stores it makes only).
    assert asked[0]["timeout"] == COLLECTIVE_TIMEOUT
    assert shared.check(["dmhpc/attempt-2/addr"]) and shared.get("dmhpc/attempt-2/addr") == b"node7"
    assert _torchrun_attempt_store(launch, {**env, "TORCHELASTIC_RESTART_COUNT": "3"}).check(["addr"]) is False
    across = {**env, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "0"}
    assert _torchrun_attempt_store(launch, across) is None
    assert _torchrun_attempt_store(launch, {**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None


def test_a_rank_whose_peer_does_not_answer_is_told_how_long_it_waited(monkeypatch, tmp_path):
    """A collective timing out was reported as a peer that stopped, sending users to look for an error
    line no rank wrote. The rank is the one the bootstrap joined as: asked of the launcher again, a
    SLURM rank ran scontrol (30 s a call) as the peer was lost, on every rank at once."""
    from dmhpc import distributed
    from dmhpc.distributed import peer_lost

    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in LAUNCH_VARS:
            monkeypatch.delenv(key)
    asked = tmp_path / "asked"
    fake_commands(tmp_path, monkeypatch, {"scontrol": f"touch {asked}\nsleep 3\necho n1\n"})
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
                       "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "n1", "SLURM_STEP_NODELIST": "n1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "_joined", 3)
    line = peer_lost(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 1800000ms for recv"))
    assert line.startswith("rank 3: another rank did not answer within 30 minutes"), line
    line = peer_lost(RuntimeError("Connection closed by peer"))
    assert line is not None and line.startswith("rank 3: another rank stopped"), line
    assert not asked.exists()
    monkeypatch.setattr(distributed, "_joined", None)  # no group joined: no other rank to blame
    assert peer_lost(RuntimeError("Connection closed by peer")) is None


def test_bootstrap_gives_each_rank_its_share_of_cpus_and_node(monkeypatch):
    """A submitit rank (a Slurm task with torchrun's variables) kept --cpus-per-task; torchrun's
    workers without LOCAL_WORLD_SIZE each took the whole mask; a CPU group was asked for NCCL."""
    from dmhpc import cpus

    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in LAUNCH_VARS:
            monkeypatch.delenv(key)
    monkeypatch.setattr(cpus, "cpu_mask", lambda: list(range(8)))
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)
    asked = {}
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: asked.update(backend=backend, **kwargs))
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    submitit = {**torchrun, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "3"}
    # Without LOCAL_WORLD_SIZE every rank counts all as on its node: rank 0 of 4 took the whole mask.
    first_of_four = {**torchrun, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}
    for env, local, cpus in ((torchrun, 2, 4), (first_of_four, 4, 2), (submitit, 4, 3)):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            info = bootstrap()
        assert (info.rank, info.world_size, info.local_world_size, info.cpus) == (int(env["RANK"]),
                                                                                  int(env["WORLD_SIZE"]), local, cpus)
        assert info.backend == asked["backend"] == "gloo" and info.device == torch.device("cpu")
    # A job's one task (a scaling study's 1-rank point) kept the whole mask where the site does not bind
    # tasks to their CPUs, beside its points of several tasks capped at --cpus-per-task.
    one_task = {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "1",
                "SLURM_STEP_NUM_TASKS": "1", "SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_ID": "7"}
    for env, cpus in ((one_task, 3), ({}, 8)):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            info = bootstrap()
        assert (info.world_size, info.cpus, info.backend) == (1, cpus, None)


COLLECTIVE_HELPERS = """
import json, os, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from dmhpc.distributed import agree, all_reduce_mean, all_reduce_min, broadcast_buffers, gather, on_main
    from dmhpc.errors import DmhpcError

    mine = torch.tensor([1.0, 10.0]) * (rank + 1)
    said = {"mean": all_reduce_mean(mine).tolist(), "min": all_reduce_min(mine).tolist(), "mine": mine.tolist()}
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(rank + 5.0)
    broadcast_buffers(norm)
    said["buffers"] = norm.running_mean.tolist()
    said["main"] = on_main(lambda: f"rank {dist.get_rank()}")
    said["all"] = gather(lambda: rank * 10)

    def refuse():
        raise DmhpcError(f"shard {rank} damaged")

    try:
        agree(refuse)
    except DmhpcError as exc:
        said["error"] = str(exc)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(said, f)

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    for p in mp.spawn(run, args=(port, sys.argv[1]), nprocs=2, join=False).processes:
        p.join(60)
        if p.is_alive():
            p.kill()
"""


def test_the_collective_helpers_on_two_real_ranks(tmp_path):
    """What the trainer's epoch records and shard evaluation stand on, on two gloo ranks: a mean
    over ranks divided by the world (summed, every metric of 2 ranks doubled), the caller's tensor
    left as it was (reduced in place, a meter's sums held the sum over ranks), rank 0's BatchNorm
    statistics on every rank (each rank's own: a model evaluated in shards is several models),
    rank 0's result handed to all, every rank's gathered in order, and the lowest rank's error."""
    (tmp_path / "collective.py").write_text(COLLECTIVE_HELPERS)
    proc = subprocess.run([sys.executable, str(tmp_path / "collective.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=clean_env(), cwd=ROOT)
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) if (tmp_path / f"rank{r}.json").exists() else None
            for r in (0, 1)]
    common = {"mean": [1.5, 15.0], "min": [1.0, 10.0], "buffers": [5.0, 5.0], "main": "rank 0", "all": [0, 10],
              "error": "shard 0 damaged"}
    assert said == [{**common, "mine": [1.0, 10.0]}, {**common, "mine": [2.0, 20.0]}], (said, proc.stderr[-2000:])


@pytest.mark.parametrize("case, cgroup, files, quota", [
    ("v2 job", "0::/job_7/step_0", {"fs/job_7/cpu.max": "300000 100000\n", "fs/job_7/step_0/cpu.max": "max 100000\n"},
     3.0),
    # A container: its own cgroup is the root of the mount; a half CPU's quota still leaves one.
    ("container", "0::/../kubepods/pod1", {"fs/cpu.max": "150000 100000\n"}, 1.5),
    ("v1", "4:cpu,cpuacct:/docker/abc", {"fs/cpu/docker/abc/cpu.cfs_quota_us": "50000\n",
                                        "fs/cpu/docker/abc/cpu.cfs_period_us": "100000\n",
                                        "fs/cpu/cpu.cfs_quota_us": "-1\n",
                                        "fs/cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("none", "0::/user.slice", {"fs/user.slice/cpu.max": "max 100000\n"}, None),
    ("no cgroups", "", {}, None),
])
def test_a_cpu_quota_caps_the_cpus_a_process_keeps_busy(tmp_path, case, cgroup, files, quota):
    """A container run with --cpus=N sees every CPU of the host in its mask: each rank started a
    thread per host CPU (and as many loader workers), all throttled to the quota."""
    from dmhpc import cpus

    for name, text in {"proc/self/cgroup": cgroup + "\n", **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    where = (str(tmp_path / "proc"), str(tmp_path / "fs"))
    assert cpus.cpu_quota(*where) == quota, case
    mask = len(cpus.cpu_mask())
    assert cpus.usable_cpus(*where) == (mask if quota is None else max(1, min(mask, math.ceil(quota)))), case


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binds a process to one of several CPUs")
def test_the_cpu_mask_is_the_affinity_the_process_was_bound_to():
    """taskset, Slurm or mpiexec bind a process to some CPUs: thread and worker counts from every CPU
    of the machine oversubscribed the ones it was given."""
    first = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{first}}}); from dmhpc.cpus import cpu_mask; "
            f"print(cpu_mask())")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"[{first}]", out.stdout + out.stderr
