"""Conversion throughput of `dmhpc prepare` against a same-run numpy baseline.

The baseline reads the same .npy files and writes the same arrays with np.save: the cost of
moving the bytes. `prepare` also checks every pixel, checksums inputs and shards, permutes rows
by split, and accumulates statistics. Target: at least half the baseline's throughput.

    python bench/prepare.py                     # 12,000 images of 3x75x75 float32
    python bench/prepare.py --n 16000 --mpi 2   # also time `mpiexec -n 2 dmhpc prepare`

Input and output live in a temporary directory (under $TMPDIR, /tmp by default), deleted at the end. Both sides read
the input from the page cache (a warm-up read first) and write to the page cache; their runs are
interleaved, and the best and the median of each are printed.
"""

from __future__ import annotations

import argparse
import resource
import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from dmhpc.cli import main


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of run()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def report(name: str, runs: list, n: int, nbytes: int, baseline: list | None = None) -> None:
    """Best and median wall time, throughput of the best, median CPU time; the machine is shared,
    so the CPU time is the steadier figure."""
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    best, median, cpu = min(walls), float(np.median(walls)), float(np.median(cpus))
    line = (f"{name:<40}best {best:5.2f} s {nbytes / best / 1e6:5.0f} MB/s {n / best:6.0f} images/s"
            f"  median {median:5.2f} s  CPU {cpu:5.2f} s")
    if baseline is not None:
        line += (f"  {min(w for w, _ in baseline) / best:.2f} x baseline"
                 f" (median {np.median([w for w, _ in baseline]) / median:.2f} x)")
    print(line, flush=True)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="images (default 12000)")
    parser.add_argument("--size", type=int, default=75, help="image side (default 75)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--mpi", type=int, default=0, help="also time mpiexec -n MPI (default: no)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dmhpc-bench-prepare-"))
    try:
        rng = np.random.default_rng(0)
        images = tmp / "X.npy"
        x = np.lib.format.open_memmap(images, mode="w+", dtype=np.float32, shape=(opts.n, 3, opts.size, opts.size))
        for a in range(0, opts.n, 1000):
            x[a : a + 1000] = rng.normal(size=x[a : a + 1000].shape)
        x.flush()
        del x
        np.save(tmp / "y.npy", rng.integers(0, 2, opts.n))
        np.save(tmp / "o.npy", np.arange(opts.n) // 4)
        nbytes = (tmp / "X.npy").stat().st_size
        print(f"input: {opts.n} images 3x{opts.size}x{opts.size} float32, {nbytes / 1e6:.0f} MB; "
              f"stored as {opts.dtype}; {opts.repeat} runs of each", flush=True)
        np.load(images).sum()  # warm the page cache

        def baseline():
            for name in ("X", "y", "o"):
                np.save(tmp / f"copy_{name}.npy", np.load(tmp / f"{name}.npy"))

        argv = ["prepare", "--images", str(images), "--labels", str(tmp / "y.npy"), "--objects", str(tmp / "o.npy"),
                "--dtype", opts.dtype, "--overwrite"]

        def prepare():
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv + ["--out", str(tmp / "shards")]) == 0

        # Interleaved, so that both sides see the same machine (it is shared and noisy).
        runs = {"baseline": [], "prepare": []}
        for _ in range(opts.repeat):
            runs["baseline"].append(timed(baseline))
            runs["prepare"].append(timed(prepare))
        report("baseline np.load + np.save", runs["baseline"], opts.n, nbytes)
        report("dmhpc prepare (in process)", runs["prepare"], opts.n, nbytes, runs["baseline"])
        # Bounded memory: the peak of what Python and numpy allocate (tracemalloc sees both; the
        # memory-mapped input is page cache, not allocated).
        tracemalloc.start()
        prepare()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"dmhpc prepare peak allocated memory: {peak / 1e6:.0f} MB (input {nbytes / 1e6:.0f} MB)", flush=True)
        if opts.mpi:
            mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
            command = [mpiexec, "-n", str(opts.mpi), sys.executable, "-m", "dmhpc", *argv, "--out", str(tmp / "mpi")]
            single = [sys.executable, "-m", "dmhpc", *argv, "--out", str(tmp / "single")]
            runs = {"mpi": [], "single": []}
            for _ in range(opts.repeat):
                runs["single"].append(timed(lambda: subprocess.run(single, check=True, capture_output=True)))
                runs["mpi"].append(timed(lambda: subprocess.run(command, check=True, capture_output=True)))
            report("python -m dmhpc prepare", runs["single"], opts.n, nbytes)
            report(f"mpiexec -n {opts.mpi} python -m dmhpc prepare", runs["mpi"], opts.n, nbytes)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main_bench()
