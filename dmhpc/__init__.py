"""dmhpc: domain-adaptive deep learning on galaxy images, from a laptop to many SLURM nodes."""

import functools

__version__ = "0.1.0"


@functools.cache
def code_version() -> str:
    """`__version__`, with the git commit of the source where it runs from a checkout of its own
    ("0.1.0+g1a2b3c4d5e6f", "+...dirty" with the package's files changed since): what a catalog, a
    run or an exported model records as the code that made it (0.1.0 alone named every state of the
    code since the first commit). A package installed elsewhere (no checkout above it, or another
    project's) is `__version__`."""
    import subprocess
    from pathlib import Path

    package = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(package.parent), *args], capture_output=True, text=True,
                                  timeout=10)

        found = git("rev-parse", "--show-toplevel", "HEAD")
        lines = found.stdout.split()
        if found.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
            return __version__
        dirty = git("diff", "--quiet", "HEAD", "--", package.name).returncode != 0
    except (OSError, subprocess.SubprocessError):  # no git here, or it hung on a file system
        return __version__
    return f"{__version__}+g{lines[1][:12]}{'.dirty' if dirty else ''}"
