"""dmhpc: domain-adaptive deep learning on galaxy images, from a laptop to many SLURM nodes."""

import functools

__version__ = "0.1.0"


@functools.cache
def source_digest() -> str:
    """SHA-256 of the package's Python source (each file's path in it, size and bytes): the same code
    gives the same digest wherever it is installed, any edit another. What a result made in parts
    by several processes or attempts records, to be made by one version of the code throughout."""
    import hashlib
    from pathlib import Path

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(package).as_posix()}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


@functools.cache
def code_version() -> str:
    """`__version__`, with the git commit of the source where it runs from a checkout of its own
    ("0.1.0+g1a2b3c4d5e6f", "+...dirty" with the package's files changed or added since): what a
    catalog, a run or an exported model records as the code that made it (0.1.0 alone named every
    state of the code since the first commit). A package installed elsewhere (no checkout above it,
    or another project's) is `__version__`. For display; `source_digest` tells versions apart."""
    import subprocess
    from pathlib import Path

    import os

    package = Path(__file__).resolve().parent
    # Git's own variables (GIT_DIR in a hook or a CI job) would name another repository; the status
    # takes no lock and writes no index (a user's git commit met the lock of every rank's status).
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(package.parent), *args],
                                  capture_output=True, text=True, timeout=10, env=env)

        found = git("rev-parse", "--show-toplevel", "HEAD")
        lines = found.stdout.splitlines()
        if found.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
            return __version__
        status = git("status", "--porcelain", "--", package.name)
        if status.returncode != 0:
            return __version__
        dirty = bool(status.stdout.strip())  # (files changed or added in the package)
    except (OSError, subprocess.SubprocessError):  # no git here, or it hung on a file system
        return __version__
    return f"{__version__}+g{lines[1][:12]}{'.dirty' if dirty else ''}"
