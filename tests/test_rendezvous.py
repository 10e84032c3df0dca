"""Where the ranks of a SLURM job meet (dmhpc/rendezvous.py): node lists, the first node's address,
and the same address and port from slurm/lib.sh, an srun task's bootstrap and submitit's jobs."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env
from dmhpc.distributed import detect_launch
from dmhpc.errors import DmhpcError
from dmhpc.rendezvous import expand_nodelist, first_host, node_address


# --- node lists --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("node001", ["node001"]),
    ("a,b[08-10]", ["a", "b08", "b09", "b10"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("x[9-10]", ["x9", "x10"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "n[1-3", "n]", "n[]", "n[a-b]", "n[3-1]", "a,,b"])
def test_bad_nodelist(nodelist):
    with pytest.raises(DmhpcError, match="SLURM node list"):
        expand_nodelist(nodelist)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_first_host_asks_scontrol_first_and_survives_a_broken_one(tmp_path):
    # An scontrol that knows better than our expansion (what a site's real one does) ...
    _executable(tmp_path / "scontrol", "#!/bin/sh\necho from-scontrol\necho other\n")
    assert first_host("n[1-2]", {"PATH": str(tmp_path)}) == "from-scontrol"
    # ... and one that cannot run here (no slurm.conf in a container): fall back to ours.
    _executable(tmp_path / "scontrol", "#!/bin/sh\necho 'fatal: no configuration' >&2\nexit 1\n")
    assert first_host("n[1-2]", {"PATH": str(tmp_path)}) == "n1"
    assert first_host("n[7-8]", {"PATH": ""}) == "n7"


def test_a_node_name_that_does_not_resolve_is_reached_at_its_node_addr(tmp_path):
    assert node_address("localhost", {"PATH": ""}) == "localhost"  # resolves: slurmctld is not asked
    _executable(tmp_path / "scontrol", "#!/bin/sh\necho 'NodeName=n1 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=h1'\n")
    assert node_address("n1", {"PATH": str(tmp_path)}) == "10.1.2.3"
    assert node_address("n1", {"PATH": ""}) == "n1"  # nothing better to offer


def test_every_launch_path_meets_at_the_same_rendezvous(tmp_path):
    """slurm/lib.sh (torchrun's endpoint, srun mode's MASTER_*), the bootstrap of an srun task and
    submitit's jobs (which call the same function as the bootstrap) agree on address and port."""
    _executable(tmp_path / "scontrol", "#!/bin/sh\n[ \"$2\" = hostnames ] && echo n1 && echo n2 && exit 0\n"
                                       "echo 'NodeName=n1 NodeAddr=10.1.2.3'\n")
    job = {"SLURM_JOB_ID": "77777", "SLURM_JOB_NODELIST": "n[1-2]", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/lib.sh && dmhpc_rendezvous && "
                                        "echo $DMHPC_RDZV_ADDR $DMHPC_RDZV_PORT"],
                         env={**clean_env(), **job, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10.1.2.3", str(29500 + 77777 % 2000)]
    step = {**job, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NODELIST": "n[1-2]"}
    launch = detect_launch(step)
    assert (launch.master_addr, launch.master_port) == ("10.1.2.3", 29500 + 77777 % 2000)
    # A job's first step meets where the batch script said; a second step running beside it does
    # not meet it there (both bound one port: the second failed, or joined the first's store).
    assert detect_launch({**step, "SLURM_STEP_ID": "0"}).master_port == 29500 + 77777 % 2000
    assert detect_launch({**step, "SLURM_STEP_ID": "1"}).master_port == 29500 + (77777 + 889) % 2000
    # Steps 1 to 8 keep clear of the first step of the jobs near by (997 put step 2 on job id - 6's).
    from dmhpc.rendezvous import slurm_port

    first_steps = {slurm_port({"SLURM_JOB_ID": str(77777 + d)}) for d in range(-221, 222)}
    assert not first_steps & {slurm_port({"SLURM_JOB_ID": "77777", "SLURM_STEP_ID": str(k)}) for k in range(1, 9)}
    assert detect_launch({**step, "SLURM_STEP_ID": str(0xFFFFFFFB)}).master_port == 29500 + 77777 % 2000  # batch
    # no node list: one line, non-zero exit, so the batch script stops before srun
    out = subprocess.run([sys.executable, "-m", "dmhpc.rendezvous"], env={**clean_env(), "SLURM_JOB_ID": "1"},
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "SLURM_JOB_NODELIST" in out.stderr
    with pytest.raises(DmhpcError, match="MASTER_PORT: expected a port number, got 'x'"):
        detect_launch({**step, "MASTER_PORT": "x"})


def test_ranks_per_node_come_from_what_the_job_was_given(tmp_path):
    """Inside a job nvidia-smi counted every GPU of the node (other jobs' where devices are not
    confined), and srun mode ignored --ntasks-per-node on CPU nodes: one rank on each."""
    _executable(tmp_path / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done\n")

    def nproc(**env) -> str:
        out = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/lib.sh && dmhpc_nproc_per_node"],
                             env={**clean_env(), "PATH": f"{tmp_path}:{os.environ['PATH']}", **env},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    job = {"SLURM_JOB_ID": "5"}
    assert nproc(**job) == "1"  # a CPU job on a node of 8 GPUs it was not given
    assert nproc(**job, SLURM_NTASKS_PER_NODE="4") == "4"
    assert nproc(**job, SLURM_NTASKS_PER_NODE="2(x3)") == "1"
    assert nproc(**job, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="2") == "2"
    assert nproc(**job, NPROC_PER_NODE="3", SLURM_GPUS_ON_NODE="2") == "3"
    # salloc's shell has no SLURM_GPUS_ON_NODE: `salloc -N2 --gpus-per-node=4` then ran one rank per node.
    assert nproc(**job, SLURM_GPUS_PER_NODE="a100:4") == "4" and nproc(**job, SLURM_GPUS_PER_NODE="2") == "2"
    assert nproc(**job, SLURM_GPUS_PER_NODE="4", SLURM_GPUS_ON_NODE="2") == "2"  # what the node was given
    assert nproc() == "8"  # outside a job: the machine's own GPUs
    # 0 or "2x" broke the launch command's arithmetic: it ended early without a status, and the job
    # ran an empty command and exited 0.
    for bad in ("0", "2x", "gpu", "-1", "4,4"):
        out = _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **job, NPROC_PER_NODE=bad)
        assert out.returncode == 2 and out.stderr == (f"dmhpc: NPROC_PER_NODE={bad}: expected a number of ranks "
                                                      f"per node, 1 or more\n"), (bad, out.stderr)
    out = _lib("dmhpc_run_requeueable", tmp_path, **job)
    assert out.returncode == 2 and out.stderr == "dmhpc: no command to run\n", out.stderr


def _lib(function: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """Run a function of slurm/lib.sh in bash with this environment, under the batch scripts' `set
    -euo pipefail` (without it, a fallback for a variable not set passed here and failed in a job);
    `function` may end in `&& echo ...`."""
    base = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}  # (clean_env's 1 thread)
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {ROOT}/slurm/lib.sh && {function}"],
                          env={**base, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, **env},
                          capture_output=True, text=True)


def test_the_batch_shell_meets_on_the_first_node_whatever_step_it_was_sent_from(tmp_path):
    """sbatch from a shell inside a step passed that step's node list on: where its node was in the
    new job, the batch shell put the rendezvous there, and the first node hosted it alone."""
    _executable(tmp_path / "scontrol", "#!/bin/sh\nif [ \"$2\" = hostnames ]; then\n"
                                       "  if [ \"$3\" = n2 ]; then echo n2; else echo n1; echo n2; fi; exit 0\nfi\n"
                                       "[ \"$4\" = n2 ] && echo 'NodeName=n2 NodeAddr=10.1.2.4' && exit 0\n"
                                       "echo 'NodeName=n1 NodeAddr=10.1.2.3'\n")
    job = {"SLURM_JOB_ID": "77777", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_STEP_NODELIST": "n2",
           "SLURM_STEP_ID": "3"}
    out = _lib("dmhpc_rendezvous && echo $DMHPC_RDZV_ADDR $DMHPC_RDZV_PORT", tmp_path, **job)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10.1.2.3", str(29500 + 77777 % 2000)]


def test_a_step_asks_each_node_for_the_cpus_of_the_smallest(tmp_path):
    """The batch node's SLURM_CPUS_ON_NODE was asked of every node: on nodes given fewer (`-N2 -n3`:
    "2,1"), srun could not create the step."""
    for given, least in (("2,1", "1"), ("16(x3),8", "8"), ("32(x2)", "32")):
        out = _lib("dmhpc_cpus_per_node", tmp_path, SLURM_JOB_CPUS_PER_NODE=given, SLURM_CPUS_ON_NODE="99")
        assert out.stdout.strip() == least, (given, out.stdout, out.stderr)
    assert _lib("dmhpc_cpus_per_node", tmp_path, SLURM_CPUS_ON_NODE="6").stdout.strip() == "6"


def test_torchrun_ranks_get_their_share_of_the_cpus_and_uneven_gpus_are_refused(tmp_path):
    """torchrun gave each of several workers one thread (OMP_NUM_THREADS=1): CPU ranks computed on
    1 of their CPUs. And --gpus=N over nodes of different counts started ranks that never met."""
    _executable(tmp_path / "scontrol", "#!/bin/sh\n[ \"$2\" = hostnames ] && echo n1 && echo n2 && exit 0\n"
                                       "echo 'NodeName=n1 NodeAddr=10.1.2.3'\n")
    job = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
           "SLURM_JOB_CPUS_PER_NODE": "16(x2)", "SLURM_NTASKS_PER_NODE": "4"}
    # And torchrun gave its workers 30 s after a SIGTERM: a checkpoint being written was cut short.
    shown = "dmhpc_launch_command -m dmhpc.train && echo $OMP_NUM_THREADS $TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
    out = _lib(shown, tmp_path, **job)
    assert out.returncode == 0 and out.stdout.split() == ["4", "600"], out.stdout + out.stderr
    out = _lib(shown, tmp_path, **job, OMP_NUM_THREADS="2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="90")
    assert out.stdout.split() == ["2", "90"], out.stdout + out.stderr  # the user's choice stays
    out = _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **job, SLURM_GPUS="a100:6", SLURM_GPUS_ON_NODE="4")
    assert out.returncode == 2 and out.stderr == ("dmhpc: --gpus=a100:6 over 2 nodes: not 4 on every node as on "
                                                  "this one; ask --gpus-per-node\n"), out.stderr
    assert _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **job, SLURM_GPUS="8",
                SLURM_GPUS_ON_NODE="4").returncode == 0
    # --gpus-per-task=1 with 4 tasks a node: srun reads SLURM_GPUS_PER_TASK as its own option, and
    # torchrun mode's one task per node got one GPU for its 4 workers, which stopped at start.
    gpus = {**job, "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_TASK": "1"}
    out = _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **gpus)
    assert out.returncode == 2 and "asks --gpus-per-task=1 and torchrun mode runs one task of 4 ranks per node" \
        in out.stderr and "DMHPC_LAUNCH=srun" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **gpus, DMHPC_LAUNCH="srun").returncode == 0
    assert _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **{**gpus, "SLURM_GPUS_PER_TASK": "h100:4"}
                ).returncode == 0  # one task of 4 GPUs a node: what torchrun mode runs
    assert _lib("dmhpc_launch_command -m dmhpc.train", tmp_path, **{**gpus, "SLURM_GPUS_PER_TASK": "4"},
                NPROC_PER_NODE="2").returncode == 0  # more GPUs than ranks: each rank has one of its own


def test_an_ipv6_rendezvous_address_is_bracketed():
    """torch read tcp://::1:29555 as host "" and port ":1:29555" (ValueError); a MASTER_ADDR given in
    brackets (as slurm/lib.sh exports one, and torchrun's endpoint needs) became tcp://[[::1]]:29555."""
    from dmhpc.distributed import tcp_url
    from dmhpc.rendezvous import slurm_rendezvous

    assert tcp_url("::1", 29555) == "tcp://[::1]:29555" and tcp_url("n1", 29555) == "tcp://n1:29555"
    job = {"SLURM_JOB_ID": "55", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}
    assert slurm_rendezvous({**job, "MASTER_ADDR": "[::1]"}) == ("::1", 29555)
    assert slurm_rendezvous({**job, "MASTER_ADDR": "::1"}) == ("::1", 29555)


def test_the_batch_shell_refuses_a_master_addr_that_is_not_its_node(tmp_path):
    """The batch script runs on the job's first node, where a multi-node torchrun hosts the store and
    srun's rank 0 runs: a MASTER_ADDR naming another host (a login node exported from the submitting
    shell; 192.0.2.1 is reserved for documentation) had every node dial it, and fail after torchrun's
    60 s with a traceback. An address of this node goes out as torchrun's endpoint wants it."""
    import socket

    job = {"SLURM_JOB_ID": "77777", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}
    script = "dmhpc_rendezvous && echo $DMHPC_RDZV_ADDR $DMHPC_RDZV_PORT"
    out = _lib(script, tmp_path, **job, MASTER_ADDR="192.0.2.1")
    assert out.returncode != 0 and out.stdout == "" and out.stderr == (
        f"dmhpc rendezvous: error: environment variable MASTER_ADDR=192.0.2.1: not an address of the job's first "
        f"node ({socket.gethostname()}), where the ranks' store is; unset it (the job's first node is used) or name "
        f"that node\n"), out.stderr
    out = _lib(script, tmp_path, **job, MASTER_ADDR="no-such-node.invalid")
    assert out.returncode != 0 and "MASTER_ADDR=no-such-node.invalid: cannot be resolved here" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    # One node: its torchrun meets on a port of its own (srun's rank 0 checks the address itself), and
    # a MASTER_ADDR exported for something else was no reason to fail the job.
    for addr in (socket.gethostname(), "[::1]", "::1", "192.0.2.1"):
        one = {**job, "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}
        out = _lib(script, tmp_path, **one, MASTER_ADDR=addr)
        assert out.returncode == 0 and out.stdout.split()[0] == ("[::1]" if "::1" in addr else addr), out.stderr
    # Step variables of the shell sbatch ran from: a one-node step let a loopback address through.
    out = _lib(script, tmp_path, **job, MASTER_ADDR="localhost", SLURM_STEP_NUM_NODES="1")
    assert out.returncode != 0 and "MASTER_ADDR=localhost: a loopback address, and the ranks are on 2 nodes" \
        in out.stderr, out.stdout + out.stderr


def test_a_node_name_that_resolves_never_asks_slurmctld(tmp_path):
    """Every task of a job of thousands asking `scontrol show node` at once loads slurmctld: a name
    that resolves is used as it is, and scontrol is not run."""
    asked = tmp_path / "asked"
    _executable(tmp_path / "scontrol", f"#!/bin/sh\necho \"$@\" >> {asked}\necho 'NodeName=x NodeAddr=10.9.9.9'\n")
    assert node_address("localhost", {"PATH": str(tmp_path)}) == "localhost"
    assert not asked.exists()


def test_master_port_outside_the_port_range_is_refused():
    """A port of 0 (any free port: every rank a different one) or past 65535 reached the store as it
    was, and a digit int() cannot read was a ValueError's traceback; a job without an id (or with one
    of no number) meets at the base port."""
    from dmhpc.rendezvous import master_port, slurm_port

    assert slurm_port({}) == slurm_port({"SLURM_JOB_ID": "batch"}) == 29500  # no job id: the base port

    assert master_port({"MASTER_PORT": "1"}) == 1 and master_port({"MASTER_PORT": "65535"}) == 65535
    for bad in ("0", "65536", "-1", "", "\u00b2"):  # (a superscript two is a digit to str.isdigit, not to int)
        with pytest.raises(DmhpcError, match=f"MASTER_PORT: expected a port number, got '{bad}'"):
            master_port({"MASTER_PORT": bad})
    assert slurm_port({"SLURM_JOB_ID": "\u00b2"}) == 29500


def test_a_loopback_master_addr_is_refused_for_ranks_on_several_nodes():
    """MASTER_ADDR=localhost (a tutorial's line in ~/.bashrc) won over the job's first node: on four
    nodes each met alone, and every rank waited 30 minutes for a world that never formed."""
    from dmhpc.rendezvous import slurm_rendezvous

    job = {"SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4"}
    for addr in ("localhost", "127.0.0.1", "::1", "[::1]", "127.0.1.1", "LOCALHOST."):
        with pytest.raises(DmhpcError, match=rf"MASTER_ADDR={re.escape(addr)}: a loopback address, and the ranks "
                                             rf"are on 4 nodes"):
            slurm_rendezvous({**job, "MASTER_ADDR": addr})
    for addr in ("0.0.0.0", "::", "[::]"):  # each rank dialled its own node
        with pytest.raises(DmhpcError, match=rf"MASTER_ADDR={re.escape(addr)}: an unspecified address, and the ranks "
                                             rf"are on 4 nodes"):
            slurm_rendezvous({**job, "MASTER_ADDR": addr})
    # One node (or a step on one node of the job): loopback is where the ranks meet.
    assert slurm_rendezvous({**job, "SLURM_NNODES": "1", "MASTER_ADDR": "localhost"})[0] == "localhost"
    assert slurm_rendezvous({**job, "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1"})[0] == "127.0.0.1"
    assert slurm_rendezvous({**job, "MASTER_ADDR": "gpu01"})[0] == "gpu01"


@pytest.mark.parametrize("launch, nodes", [("srun", 1), ("torchrun", 1), ("torchrun", 2)])
def test_each_task_starts_with_the_stop_signals_ignored(tmp_path, launch, nodes):
    """A task started with USR2 ignored, not USR1: `scancel --signal=USR1 --full` killed torchrun
    (its workers orphaned) and any rank still importing torch. The launch command's own task
    wrapper is run, by an srun that runs it here on a probe in place of the program."""
    _executable(tmp_path / "scontrol", "#!/bin/sh\n[ \"$2\" = hostnames ] && echo n1 && echo n2 && exit 0\n")
    # srun's options, then the task: bash -c SCRIPT dmhpc-task PYTHON ...; the probe in place of the rest
    _executable(tmp_path / "srun", '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                   'exec "$1" "$2" "$3" "$4" "$5" "$PROBE"\n')
    probe = tmp_path / "probe.py"
    probe.write_text("import signal\nprint(*(signal.getsignal(s) == signal.SIG_IGN for s in "
                     "(signal.SIGUSR1, signal.SIGUSR2)))\n")
    job = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]" if nodes == 2 else "n1", "SLURM_NNODES": str(nodes),
           "SLURM_JOB_CPUS_PER_NODE": "2", "DMHPC_LAUNCH": launch, "PROBE": str(probe)}
    out = _lib('dmhpc_launch_command -m dmhpc.train && "${DMHPC_LAUNCH_CMD[@]}"', tmp_path, **job)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stdout + out.stderr
