"""The CPUs this process may run on, for thread and worker counts; without torch, for the launchers
and `dmhpc verify`."""

from __future__ import annotations

import math
import os

from dmhpc.cgroups import hierarchy


def cpu_mask() -> list[int]:
    """This process's affinity mask (what taskset, Slurm or mpiexec bound it to); every CPU where the
    platform has no masks (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cpus(proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may keep busy: its affinity mask, capped by a CPU quota on its cgroups
    (a container's `--cpus=4`: the mask holds every CPU of the host, and a thread per CPU of it
    was throttled to the quota's share of the time)."""
    mask = len(cpu_mask())
    quota = cpu_quota(proc, cgroup_fs)
    return mask if quota is None else max(1, min(mask, math.ceil(quota)))


def quota_share(ranks: int) -> int | None:
    """CPUs of the quota on this process's cgroups for one of `ranks` processes that share it (at
    least 1); None where no quota is set."""
    quota = cpu_quota()
    return None if quota is None else max(1, math.ceil(quota / max(1, ranks)))


def cpu_quota(proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time per period the tightest quota on this process's cgroups allows (v2
    cpu.max "QUOTA PERIOD", v1 cpu.cfs_quota_us / cpu.cfs_period_us); None where none is set."""
    quotas = []
    for version, directory in hierarchy("cpu", proc, cgroup_fs):
        try:
            if version == "v2":
                quota, period = (directory / "cpu.max").read_text().split()[:2]
            else:
                quota = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
            if quota.isdecimal() and period.isdecimal() and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    return min(quotas, default=None)
