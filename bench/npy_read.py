"""Rows of a .npy input read by positioned reads (FileRows, what prepare and predict use) beside a
memory map of the same file (what they used before), on prepare's access pattern.

    python bench/npy_read.py             # 8,000 images of 3x75x75 float32 (540 MB), warm page cache

Each pass reads the rows of a random permutation in blocks of --block rows, each block sorted
(write_shard gathers a shard's rows in increasing input order); the two readers alternate pass by
pass, so both see the same machine. Prints the best and median pass of each and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dmhpc.data.inputs import FileRows, open_npy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000, help="images (default 8000)")
    parser.add_argument("--size", type=int, default=75, help="image side (default 75)")
    parser.add_argument("--block", type=int, default=2048, help="rows per read, as a shard (default 2048)")
    parser.add_argument("--passes", type=int, default=7, help="timed passes per reader (default 7)")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dmhpc-bench-npy-"))
    try:
        path = tmp / "images.npy"
        images = np.random.default_rng(0).normal(size=(opts.n, 3, opts.size, opts.size)).astype(np.float32)
        np.save(path, images)
        mapped = open_npy(path)
        readers = {"memory map": mapped, "positioned reads": FileRows(path, mapped.shape, mapped.dtype, mapped.offset)}
        order = np.random.default_rng(1).permutation(opts.n)
        blocks = [np.sort(order[k:k + opts.block]) for k in range(0, opts.n, opts.block)]
        for reader in readers.values():  # warm the page cache; check they agree
            assert np.array_equal(np.asarray(reader[blocks[0]]), images[blocks[0]])
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(opts.passes):
            for name, reader in readers.items():
                start = time.perf_counter()
                for rows in blocks:
                    np.asarray(reader[rows])
                times[name].append(time.perf_counter() - start)
        mb = images.nbytes / 1e6
        for name, ts in times.items():
            best, median = min(ts), sorted(ts)[len(ts) // 2]
            print(f"{name:17s} best {best:.3f} s ({mb / best:,.0f} MB/s, {opts.n / best:,.0f} images/s), "
                  f"median {median:.3f} s")
        ratio = min(times["positioned reads"]) / min(times["memory map"])
        print(f"positioned reads / memory map (best passes): {ratio:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
