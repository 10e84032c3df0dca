"""The control groups this process runs in (Linux), read for the limits set on them: a Slurm job's
on the job's cgroup, below the root; a container's at the root of its cgroup namespace. Torch-free,
for the launchers too."""

from __future__ import annotations

from pathlib import Path


def hierarchy(controller: str, proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> list[tuple[str, Path]]:
    """("v2" or "v1", folder) of this process's own cgroup and of every one above it up to the root
    of the mount, nearest first: in the unified (v2) hierarchy, and in v1's hierarchy of
    `controller` ("memory", "cpu"), mounted at CGROUP_FS/CONTROLLER. Folders that do not exist
    are listed all the same: reading a limit there finds none."""
    try:
        lines = Path(f"{proc}/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = {}  # cgroup version -> this process's path in that hierarchy
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            own["v2"] = path
        elif controller in controllers.split(","):
            own["v1"] = path
    folders = []
    for version, base in (("v2", Path(cgroup_fs)), ("v1", Path(cgroup_fs) / controller)):
        path = own.get(version, "/").strip("/")
        # Outside a cgroup namespace the path is the host's; inside one (a container) it may not exist
        # under this mount, whose root is then the process's own cgroup.
        inside = path and ".." not in path.split("/") and (base / path).is_dir()
        here = base / path if inside else base
        for directory in [here, *here.parents]:
            folders.append((version, directory))
            if directory == base:
                break
    return folders
