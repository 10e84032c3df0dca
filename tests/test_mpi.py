"""MPI launches are recognised from the environment, and mpi4py is imported only under one."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import clean_env
from dmhpc.mpi import RANK_VARS, launched_rank

CODE = "import sys; from dmhpc.mpi import world_comm; assert world_comm() is None; assert 'mpi4py' not in sys.modules"


def test_no_launch_and_a_one_rank_launch_never_import_mpi4py():
    subprocess.run([sys.executable, "-c", CODE], check=True, env=clean_env(), timeout=60)
    subprocess.run([sys.executable, "-c", CODE], check=True, env=clean_env(PMI_SIZE="1", PMI_RANK="0"),
                   timeout=60)


def test_launched_rank_reads_every_launcher():
    assert launched_rank({}) == 0
    for var in RANK_VARS:
        assert launched_rank({var: "3"}) == 3
