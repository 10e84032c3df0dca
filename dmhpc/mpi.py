"""MPI launches, recognised from the launcher's environment; mpi4py is imported only under one.

Importing mpi4py initializes MPI, which a plain or torchrun process must not do by accident, so
every MPI-aware command asks here first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import NamedTuple

from dmhpc.errors import DmhpcError

# Open MPI, MPICH/Hydra and Slurm's PMI-2, PMIx, and HPE/Cray PALS.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "PALS_RANKID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PALS_SIZE")


class Launched(NamedTuple):
    """What an MPI launcher told this process."""

    variable: str  # the rank variable it set, for messages
    rank: int
    size: int  # 0 where the launcher does not say (PALS, PMIx outside Slurm): ask MPI


def launched(env: Mapping[str, str] = os.environ) -> Launched | None:
    """The rank and size an MPI launcher set, or None when no MPI launcher started this process."""
    rank_var = next((v for v in RANK_VARS if v in env), None)
    if rank_var is None:
        return None
    size_var = next((v for v in SIZE_VARS if v in env), None)
    size = env_int(env, size_var) if size_var else 0
    if not size and "SLURM_STEP_NUM_TASKS" in env:
        # Slurm's pmix plugin sets PMIX_RANK in every task, even a lone one (a submitit job, `srun
        # --pty`), but no size: the step's tasks are the world. Asking MPI instead would start it,
        # and an MPI of another process manager aborts in MPI_Init.
        size = env_int(env, "SLURM_STEP_NUM_TASKS")
    return Launched(rank_var, env_int(env, rank_var), size)


def env_int(env: Mapping[str, str], name: str) -> int:
    """An integer launcher variable; a one-line error naming it when it is not one."""
    try:
        return int(env[name])
    except ValueError:
        raise DmhpcError(f"environment variable {name}: expected an integer, got {env[name]!r}") from None


def launched_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as the MPI launcher set it (0 when not launched by one)."""
    mpi = launched(env)
    return mpi.rank if mpi else 0


# Slurm's pmi2 plugin takes each PMI-1 request (MPICH's wire protocol) from a single read of at
# most 1024 bytes (src/plugins/mpi/pmi2/pmi1.c). MPICH's UCX netmod publishes a ~4.5 kB address in
# segments whose put requests mostly come to 750-1000 bytes, and now and then over 1024 (the address
# holds bytes that change from run to run): the request is cut and every rank hangs in MPI_Init. The
# OFI netmod's address is 16 bytes. dmhpc's MPI traffic is prepare's small collectives and synth's
# rendered images to rank 0, which writes them to disk too (OFI against UCX there is not measured
# between real nodes). A netmod the user chose is kept; an MPICH built with UCX only ignores it.
SLURM_PMI2_DEFAULTS = {"MPIR_CVAR_CH4_NETMOD": "ofi"}


def library_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """MPI library settings this launch needs that env does not set already: under Slurm's pmi2
    plugin (it sets PMI_JOBID), not under hydra (MPI_LOCALNRANKS), whose server reads whole lines
    even where its proxies inherited SLURM_MPI_TYPE from srun."""
    if env.get("SLURM_MPI_TYPE") != "pmi2" or "PMI_JOBID" not in env or "MPI_LOCALNRANKS" in env:
        return {}
    return {name: value for name, value in SLURM_PMI2_DEFAULTS.items() if name not in env}


def import_mpi(env: Mapping[str, str] = os.environ):
    """mpi4py's MPI module for a process an MPI launcher started, imported (which initialises MPI)
    with the settings this launch needs, its world checked (`check_shared_world`). Without mpi4py
    (an optional extra), one line."""
    mpi = launched(env)
    os.environ.update(library_defaults(os.environ))
    try:
        from mpi4py import MPI
    except ImportError:
        raise DmhpcError(
            f"launched under MPI ({mpi.variable}={env[mpi.variable]}) but mpi4py is not installed;"
            " install dmhpc[mpi] or run without mpiexec"
        ) from None
    check_shared_world(MPI, mpi)
    return MPI


def world_comm(env: Mapping[str, str] = os.environ):
    """MPI.COMM_WORLD when an MPI launcher started this process with more than one rank, else None."""
    mpi = launched(env)
    if mpi is None or mpi.size == 1:
        return None
    MPI = import_mpi(env)
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def check_shared_world(MPI, mpi: Launched) -> None:
    """Refuse an MPI library that sees a world of one process where the launcher started several:
    every task would do the whole job alone, into the same files."""
    if MPI.COMM_WORLD.Get_size() == 1 and mpi.size > 1:
        raise DmhpcError(
            f"launched as rank {mpi.rank} of {mpi.size} ({mpi.variable}) but MPI sees a world of one process: "
            f"the launcher and this MPI library do not share a process manager (under srun: --mpi=pmi2 for "
            f"MPICH and Intel MPI, --mpi=pmix for Open MPI)"
        )


ABORT_PAUSE_S = 1.0


def abort_all(comm, code: int = 1) -> None:
    """End every rank (MPI_Abort) a moment after this one said why: mpiexec kills the processes at
    once, and the line a rank had just written (its one-line error) went missing on its way to the
    terminal once, on a loaded machine (not reproduced; the pause is cheap beside a failed job)."""
    try:
        sys.stderr.flush()
        time.sleep(ABORT_PAUSE_S)
    finally:  # never returns: a second Ctrl-C in the pause, or one that MPI_Abort returned on, went on
        try:  # with the caller's code after it (a second message, or an abort with another code)
            comm.Abort(code)
        finally:
            os._exit(code)
