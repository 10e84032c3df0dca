"""The CPUs this process may run on, for thread and worker counts; without torch, for the launchers
and `dmhpc verify`."""

from __future__ import annotations

import os


def cpu_mask() -> list[int]:
    """This process's affinity mask (what taskset, Slurm or mpiexec bound it to); every CPU where the
    platform has no masks (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))
