"""MPI launches are recognised from the environment, and mpi4py is imported only under one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, clean_env
from dmhpc.mpi import launched_rank, library_defaults

CODE = "import sys; from dmhpc.mpi import world_comm; assert world_comm() is None; assert 'mpi4py' not in sys.modules"


def test_no_launch_and_a_one_rank_launch_never_import_mpi4py():
    subprocess.run([sys.executable, "-c", CODE], check=True, env=clean_env(), timeout=60)
    subprocess.run([sys.executable, "-c", CODE], check=True, env=clean_env(PMI_SIZE="1", PMI_RANK="0"),
                   timeout=60)


PMIX_ONE_TASK = {"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.9.0", "SLURM_STEP_NUM_TASKS": "1",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "n1"}


def test_a_lone_task_of_slurms_pmix_plugin_is_a_single_process():
    """Slurm's pmix plugin says a rank but no size: a lone task (a submitit job, `srun --pty`) was
    taken for an MPI launch, and MPICH aborted in MPI_Init ("unsupported PMI version PMIx")."""
    from dmhpc.distributed import detect_launch

    subprocess.run([sys.executable, "-c", CODE], check=True, env=clean_env(**PMIX_ONE_TASK), timeout=60)
    assert detect_launch(PMIX_ONE_TASK).world_size == 1
    assert detect_launch({**PMIX_ONE_TASK, "PMIX_RANK": "1", "SLURM_PROCID": "1",
                          "SLURM_STEP_NUM_TASKS": "2"}).world_size == 2


def test_a_launcher_mpi_does_not_hear_is_one_line(tmp_path):
    """Ranks 0 and 1 of 2 by the launcher's word, but MPI (no process manager to ask) makes each a
    world of its own: srun with the wrong --mpi plugin. Each ran the whole conversion into the same
    folder, deleting the other's shards; now each stops before reading anything."""
    pytest.importorskip("mpi4py")
    data = tmp_path / "X.npy"
    np.save(data, np.zeros((8, 3, 4, 4), np.float32))
    for rank in (0, 1):
        proc = subprocess.run([sys.executable, "-m", "dmhpc", "prepare", "--images", str(data), "--out",
                               str(tmp_path / "ds")], env=clean_env(PMI_RANK=str(rank), PMI_SIZE="2"),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == (f"dmhpc prepare: error: launched as rank {rank} of 2 (PMI_RANK) but MPI sees a "
                               f"world of one process: the launcher and this MPI library do not share a process "
                               f"manager (under srun: --mpi=pmi2 for MPICH and Intel MPI, --mpi=pmix for Open "
                               f"MPI)\n")
    assert not (tmp_path / "ds").exists()


WITHOUT_MPI4PY = "import sys; sys.modules['mpi4py'] = None; from dmhpc.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_an_mpi_launch_without_mpi4py_is_one_line(tmp_path, command):
    """mpi4py is an optional extra (dmhpc[mpi]): the trainer under mpiexec without it was a traceback
    of 22 lines (prepare's and synth's were one line already)."""
    from tests.conftest import TINY

    data = tmp_path / "X.npy"
    np.save(data, np.zeros((8, 3, 4, 4), np.float32))
    argv = {"prepare": ["--images", str(data), "--out", str(tmp_path / "ds")],
            "train": ["--config", str(TINY), f"run.dir={tmp_path / 'run'}"]}[command]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MPI4PY, command, *argv], cwd=ROOT, capture_output=True,
                          text=True, env=clean_env(PMI_RANK="0", PMI_SIZE="2"), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"dmhpc {command}: error: launched under MPI (PMI_RANK=0) but mpi4py is not installed; "
                           f"install dmhpc[mpi] or run without mpiexec\n")
    assert list(tmp_path.iterdir()) == [data]


def test_launched_rank_reads_every_launcher():
    assert launched_rank({}) == 0
    # Open MPI, MPICH's hydra (PMI), PMIx (srun --mpi=pmix, prrte), HPE Cray PALS: named here, not
    # read from the module's own list, which a dropped launcher would leave out of the test too.
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "PALS_RANKID"):
        assert launched_rank({var: "3"}) == 3, var


SRUN_PMI2 = {"SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "PMI_JOBID": "32.0", "PMI_RANK": "0", "PMI_SIZE": "4"}
# hydra's proxies started by srun inside an allocation whose MpiDefault is pmi2
HYDRA_UNDER_SRUN = {"SLURM_MPI_TYPE": "pmi2", "PMI_FD": "9", "PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2",
                    "MPI_LOCALRANKID": "0", "PMI_HOSTNAME": "n1"}


@pytest.mark.parametrize("env, defaults", [
    # Slurm's pmi2 plugin cuts PMI-1 requests at 1024 bytes: OFI's short address (see
    # tests/cluster's pmi2 test for the values themselves).
    (SRUN_PMI2, {"MPIR_CVAR_CH4_NETMOD": "ofi"}),
    ({**SRUN_PMI2, "MPIR_CVAR_CH4_NETMOD": "ucx"}, {}),  # the user's choice stands
    ({"PMI_FD": "5", "PMI_RANK": "0", "PMI_SIZE": "4"}, {}),  # hydra's server reads whole lines
    (HYDRA_UNDER_SRUN, {}),
    ({"SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "0"}, {}),
    ({"SLURM_MPI_TYPE": "pmi2"}, {}),  # a batch script, not a step's task
])
def test_library_defaults_only_under_slurms_pmi2_plugin(env, defaults):
    assert library_defaults(env) == defaults


def test_a_launcher_that_gives_no_size_asks_mpi_and_a_world_of_one_is_no_world():
    """PALS (and PMIx outside Slurm) set a rank but no size: taken for one process, each rank of a
    many-rank launch did the whole job alone; MPI is asked instead, and where it answers a world of
    one the process runs as a single one."""
    pytest.importorskip("mpi4py")
    code = ("import sys; from dmhpc.mpi import world_comm; assert world_comm() is None; "
            "assert 'mpi4py' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=clean_env(PALS_RANKID="0"), timeout=120)


def test_hydra_under_srun_gets_no_pmi2_defaults_even_with_srun_variables():
    """hydra's proxies started by srun inherit the pmi2 plugin's PMI_JOBID and SLURM_MPI_TYPE, but
    hydra's own server reads whole lines: its MPI_LOCALNRANKS says the ranks are hydra's."""
    assert library_defaults({**SRUN_PMI2, "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0"}) == {}


ONE_RANK_FAILS = """
import sys, time
import dmhpc.cli as cli
from dmhpc.distributed import bootstrap

def main(argv):  # a command whose rank 1 fails on its own while rank 0 computes (a part, a step)
    dist = bootstrap()
    if dist.rank == 1 or argv == ["both"]:
        print(f"rank {dist.rank}: failed", flush=True)
        if argv == ["raise"]:
            raise RuntimeError("rank 1's defect")
        return 3
    time.sleep(600)
    return 0

cli.main = main
cli.run(sys.argv[1:])
"""


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["return", "raise", "both"])
def test_a_rank_that_fails_alone_under_mpiexec_ends_every_rank(tmp_path, how):
    """The failed rank waited at exit in mpi4py's MPI_Finalize for the others, which went on (in an
    NCCL collective: until its 30-minute timeout), and mpiexec saw no failure until they ended."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"mpiexec not found beside {sys.executable}")
    script = tmp_path / "fails.py"
    script.write_text(ONE_RANK_FAILS)
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(script), how], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (1 if how == "raise" else 3), proc.stdout + proc.stderr
    assert "rank 1: failed" in proc.stdout
    if how == "raise":
        assert "RuntimeError: rank 1's defect" in proc.stderr, proc.stderr
    if how == "both":  # ranks that all fail (an error they agreed on): each said its line first
        assert "rank 0: failed" in proc.stdout, proc.stdout
