"""Read throughput of RowReader: contiguous batches of 256 images, warm page cache.

    python bench/read.py                 # 16,000 images of 3x75x75 float32, 4096 rows per shard
    python bench/read.py --dtype float16

Writes a data set with write_dataset under $TMPDIR (/tmp by default), reads it once to warm the page cache, then
times --epochs passes of contiguous batches (the last batch of a pass may be short; batches
may span two shards). Target: at least 20,000 images/s on the 2-core CI-like machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dmhpc.data.shards import RowReader, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000, help="images (default 16000)")
    parser.add_argument("--size", type=int, default=75, help="image side (default 75)")
    parser.add_argument("--batch", type=int, default=256, help="rows per read (default 256)")
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per shard (default 4096)")
    parser.add_argument("--epochs", type=int, default=5, help="timed passes, best kept (default 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dmhpc-bench-read-"))
    try:
        rng = np.random.default_rng(0)
        images = rng.normal(size=(opts.n, 3, opts.size, opts.size)).astype(np.float32)
        manifest = write_dataset(images, rng.integers(0, 2, opts.n), None, tmp / "ds",
                                 shard_size=opts.shard_size, dtype=opts.dtype)
        del images
        per_image = 3 * opts.size * opts.size * np.dtype(opts.dtype).itemsize
        print(f"{opts.n} images 3x{opts.size}x{opts.size} {opts.dtype} in {len(manifest['shards'])} shards, "
              f"batches of {opts.batch}", flush=True)
        reader = RowReader(tmp / "ds")
        starts = range(0, opts.n, opts.batch)
        for a in starts:  # warm the page cache and open the files
            reader.read(a, min(a + opts.batch, opts.n))
        times = []
        for _ in range(opts.epochs):
            t0 = time.perf_counter()
            for a in starts:
                reader.read(a, min(a + opts.batch, opts.n))
            times.append(time.perf_counter() - t0)
        reader.close()
        best, median = min(times), float(np.median(times))
        print(f"RowReader.read, best of {opts.epochs} passes: {opts.n / best:,.0f} images/s, "
              f"{opts.n * per_image / best / 1e9:.2f} GB/s, {best / len(starts) * 1e3:.2f} ms per batch; "
              f"median pass {opts.n / median:,.0f} images/s")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
