"""The two-node test cluster works, and so do the launch and requeue mechanics of slurm/lib.sh.

Real slurmctld, two real slurmd, real sbatch/srun/scancel/scontrol, real torchrun and gloo.
slurm/lib.sh's launch tests start tests/cluster/ddp_probe.py where train_ddp.sh starts
`-m dmhpc.train`: the same function builds the same srun + torchrun line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "ddp_probe.py"

# A batch script that launches the probe exactly as train_ddp.sh launches the trainer.
LAUNCH_PROBE = """#!/bin/bash
set -euo pipefail
source @REPO@/slurm/lib.sh
dmhpc_launch_command @PROBE@ @OUT@ @ARGS@
echo "run ${SLURM_RESTART_COUNT:-0}: $(printf '%q ' "${DMHPC_LAUNCH_CMD[@]}")"
rc=0
dmhpc_run_requeueable "${DMHPC_LAUNCH_CMD[@]}" || rc=$?
echo "run ${SLURM_RESTART_COUNT:-0} exits with $rc"
exit "$rc"
"""


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.sh"
    path.write_text(text)
    return path


def _launch_probe(cluster, tmp_path, *probe_args, env=None, nodes=2) -> tuple[str, Path]:
    out = tmp_path / "ranks"
    out.mkdir()
    script = _script(tmp_path, LAUNCH_PROBE.replace("@REPO@", str(REPO)).replace("@PROBE@", str(PROBE))
                     .replace("@OUT@", str(out)).replace("@ARGS@", " ".join(probe_args)))
    job = cluster.sbatch(f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=2", "--open-mode=append",
                         f"--output={tmp_path}/job.out", str(script), cwd=tmp_path,
                         env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})})
    return job, out


def _own_lines(output: str) -> list[str]:
    """The job's own lines, without slurmstepd's notes (requeue, signals to exited processes)."""
    return [line for line in output.splitlines() if not line.startswith("slurmstepd")]


def _records(out: Path, run: int = 0) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob(f"rank*-run{run}.json")), key=lambda r: r["rank"])


def test_sinfo_shows_two_nodes(slurm_cluster):
    lines = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %P %c %t").split()
    nodes = [tuple(lines[i:i + 4]) for i in range(0, len(lines), 4)]
    assert [n[0] for n in nodes] == ["n1", "n2"], nodes
    assert all(n[1] == "debug*" and int(n[2]) >= 1 and n[3] in ("idle", "mix", "alloc") for n in nodes), nodes


def test_two_node_job_runs_one_task_on_each_node(slurm_cluster, tmp_path):
    script = _script(tmp_path, "#!/bin/bash\n"
                     "srun bash -c 'echo task $SLURM_PROCID node $SLURM_NODEID name $SLURMD_NODENAME'\n")
    job = slurm_cluster.wait(slurm_cluster.sbatch("-N", "2", "--ntasks-per-node=1", f"--output={tmp_path}/out",
                                                  str(script), cwd=tmp_path), timeout=60)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    tasks = sorted(line.split() for line in job.output.splitlines() if line.startswith("task"))
    assert tasks == [["task", "0", "node", "0", "name", "n1"], ["task", "1", "node", "1", "name", "n2"]], job


def test_batch_shell_trap_receives_the_time_limit_signal(slurm_cluster, tmp_path):
    # What train_ddp.sh relies on: --signal=B:USR2@SECONDS before the limit reaches the batch
    # shell's trap. slurmctld checks time limits every 30 s, so with a 1-minute limit and @55
    # the signal comes 5 to 35 s after the start.
    script = _script(tmp_path, """#!/bin/bash
#SBATCH --time=1 --signal=B:USR2@55
trap 'echo got USR2; exit 0' USR2
while :; do sleep 0.5 & wait $!; done
""")
    job = slurm_cluster.wait(slurm_cluster.sbatch(f"--output={tmp_path}/out", str(script), cwd=tmp_path),
                             timeout=90)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert _own_lines(job.output) == ["got USR2"], job


def test_requeue_from_the_trap_restarts_the_job(slurm_cluster, tmp_path):
    # The cluster holds a requeued job for cred_expire (10 s, not the default 120 s) before it
    # may run again.
    script = _script(tmp_path, """#!/bin/bash
#SBATCH --open-mode=append
# The trap first: the test signals the job as soon as it sees "started".
trap 'echo "got USR2"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR2
echo "run ${SLURM_RESTART_COUNT:-0} started"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo resumed; exit 0; fi
while :; do sleep 0.5 & wait $!; done
""")
    job_id = slurm_cluster.sbatch(f"--output={tmp_path}/out", str(script), cwd=tmp_path)
    slurm_cluster.wait_for(lambda: "run 0 started" in slurm_cluster.job(job_id).output, "first run", job_id)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=90)
    print(f"requeue and second run took {time.monotonic() - t0:.0f} s")
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), job
    # --open-mode=append kept the first run's lines.
    assert _own_lines(job.output) == ["run 0 started", "got USR2", "run 1 started", "resumed"], job


def test_srun_pmi2_makes_one_mpi_world_across_nodes_with_short_pmi_values(slurm_cluster):
    """dmhpc's MPI under srun --mpi=pmi2: one world, and no PMI value near Slurm's 1024-byte read.

    Slurm's pmi2 plugin reads each of MPICH's PMI-1 requests in one read of at most 1024 bytes.
    MPICH's UCX netmod published 700-1000-character address segments, and a request cut at 1024
    bytes hung every rank in MPI_Init (in about one CI run in ten). slurmstepd's debug2 log
    (srun --slurmd-debug) shows every value it hands out; UCX's are all far above the bound here.
    """
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install dmhpc[mpi])")
    code = ("import os; from dmhpc.mpi import world_comm; c = world_comm(); "
            "print(c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), os.environ['SLURM_NODEID'])")
    proc = subprocess.run(["srun", "--mpi=pmi2", "--slurmd-debug=debug2", "-N", "2", "--ntasks-per-node=2",
                           sys.executable, "-c", code], env=slurm_cluster.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ranks = sorted(tuple(int(x) for x in line.split()) for line in proc.stdout.splitlines())
    assert ranks == [(0, 4, 10, 0), (1, 4, 10, 0), (2, 4, 10, 1), (3, 4, 10, 1)], proc.stdout
    values = re.findall(r"cmd=get_result rc=0 value=(\S*)", proc.stderr)
    assert values, proc.stderr  # the log shows what the ranks fetched
    assert max(map(len, values)) <= 256, sorted(values, key=len)[-1]


def _fnv1a(text: str) -> int:
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def test_segments_left_by_an_earlier_clusters_killed_ranks_do_not_block_mpi(slurm_cluster):
    """A killed MPICH rank leaves /dev/shm/mpich_shm_<FNV-1a of its step id "J.S">_<n>; a step of
    a later cluster that counted job ids from 1 again found it and hung in MPI_Init (the second
    `make test` on a machine). Here: the segments of steps 1.0-400.0 of such an earlier cluster."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install dmhpc[mpi])")
    shm = Path("/dev/shm")
    stale = [shm / f"mpich_shm_{_fnv1a(f'{job}.0'):x}_{n}" for job in range(1, 401) for n in (0, 1)]
    made = [path for path in stale if not path.exists()]
    try:
        for path in made:
            path.touch()
        code = "from dmhpc.mpi import world_comm; c = world_comm(); print(c.allreduce(1))"
        out = slurm_cluster.run("srun", "--mpi=pmi2", "-N", "2", "--ntasks-per-node=2", sys.executable, "-c",
                                code, timeout=60)
        assert out.split() == ["4"] * 4, out
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_a_one_node_job_meets_on_a_port_of_its_own(slurm_cluster, tmp_path):
    """The port from the job id can be another job's on a shared node: torchrun joined that job's
    rendezvous, and its end killed this one. One node needs no agreed port."""
    job_id, out = _launch_probe(slurm_cluster, tmp_path, env={"NPROC_PER_NODE": "2"}, nodes=1)
    job = slurm_cluster.wait(job_id, timeout=180)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "--rdzv-endpoint=localhost:0" in job.output, job
    ranks = _records(out)
    assert [(r["rank"], r["world_size"], r["result"]) for r in ranks] == [(0, 2, 3.0), (1, 2, 3.0)], ranks


def test_srun_torchrun_c10d_allreduce_across_two_nodes(slurm_cluster, tmp_path):
    job_id, out = _launch_probe(slurm_cluster, tmp_path)
    job = slurm_cluster.wait(job_id, timeout=180)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "torch.distributed.run --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d" in job.output, job
    ranks = _records(out)
    assert [(r["rank"], r["world_size"], r["local_rank"], r["result"]) for r in ranks] == [
        (0, 2, 0, 3.0), (1, 2, 0, 3.0)], ranks
    assert sorted(r["node_id"] for r in ranks) == [0, 1] and all(r["launched_by_torchrun"] for r in ranks), ranks


def test_srun_mode_makes_one_rank_per_task(slurm_cluster, tmp_path):
    job_id, out = _launch_probe(slurm_cluster, tmp_path, env={"DMHPC_LAUNCH": "srun", "NPROC_PER_NODE": "2"})
    job = slurm_cluster.wait(job_id, timeout=180)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    ranks = _records(out)
    assert [(r["rank"], r["world_size"], r["local_rank"], r["node_id"], r["result"]) for r in ranks] == [
        (0, 4, 0, 0, 10.0), (1, 4, 1, 0, 10.0), (2, 4, 0, 1, 10.0), (3, 4, 1, 1, 10.0)], ranks
    assert not any(r["launched_by_torchrun"] for r in ranks), ranks


def test_usr2_reaches_torchrun_workers_and_the_job_requeues(slurm_cluster, tmp_path):
    job_id, out = _launch_probe(slurm_cluster, tmp_path, "--until-signal")
    slurm_cluster.wait_for(lambda: len(_records(out)) == 2, "rank files from both nodes", job_id, timeout=120)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=180)
    print(f"signal, requeue and second run took {time.monotonic() - t0:.0f} s")
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), job
    # Both workers saw the signal and finished their "checkpoint", and torchrun lived to report
    # their exit code: had it died of USR2, its workers would be orphans outside its control
    # (and killed with the step where cgroups track processes).
    assert sorted(p.read_text() for p in out.glob("rank*-run0.signal")) == ["3", "3"], job
    assert "exitcode: 3" in job.output and "requeueing job" in job.output, job
    assert [r["run"] for r in _records(out, run=1)] == [1, 1], job
    assert job.output.count("run 0: ") == 1 and job.output.count("run 1: ") == 1, job
