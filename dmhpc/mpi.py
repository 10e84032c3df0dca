"""MPI launches, recognised from the launcher's environment; mpi4py is imported only under one.

Importing mpi4py initializes MPI, which a plain or torchrun process must not do by accident, so
every MPI-aware command asks here first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dmhpc.errors import DmhpcError

# Open MPI, MPICH/Hydra and Slurm's PMI-2, PMIx, and HPE/Cray PALS.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "PALS_RANKID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PALS_SIZE")


def launched_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as the MPI launcher set it (0 when not launched by one)."""
    var = next((v for v in RANK_VARS if v in env), None)
    return int(env[var]) if var else 0


def world_comm(env: Mapping[str, str] = os.environ):
    """MPI.COMM_WORLD when an MPI launcher started this process with more than one rank, else None."""
    rank_var = next((v for v in RANK_VARS if v in env), None)
    if rank_var is None:
        return None
    size_var = next((v for v in SIZE_VARS if v in env), None)
    if size_var is not None and env[size_var] == "1":
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise DmhpcError(
            f"launched under MPI ({rank_var}={env[rank_var]}) but mpi4py is not installed;"
            " install dmhpc[mpi] or run without mpiexec"
        ) from None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
