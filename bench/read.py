"""Read throughput of RowReader: contiguous batches of 256 images, warm page cache.

    python bench/read.py                 # 16,000 images of 3x75x75 float32, 4096 rows per shard
    python bench/read.py --dtype float16
    python bench/read.py --pieces 16 --chunk-cache   # random 16-row pieces (the block loaders'); the
                                                     # reader beside one with h5py's default chunk cache

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

from dmhpc.data import shards
from dmhpc.data.shards import RowReader, write_dataset


_HELD = """
import json, sys
from dmhpc.data import shards
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
directory, cache, ranges = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
shards._CHUNK_CACHE_BYTES = cache
reader = shards.RowReader(directory)
reader.read(*ranges[0])
before = rss()
reader.open_limit = len(reader.manifest["shards"])  # every shard kept open, as a loader's reader may
for a, b in ranges:
    out = reader.read(a, b)
del out
print(rss() - before)
"""


def _held_mib(directory: Path, cache, ranges) -> float:
    """The resident memory (MiB) a reader under this chunk cache holds after one pass over `ranges`,
    measured in a process of its own (in this one, the allocator's reuse blurs it)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HELD, str(directory), json.dumps(cache), json.dumps(ranges)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000, help="images (default 16000)")
    parser.add_argument("--size", type=int, default=75, help="image side (default 75)")
    parser.add_argument("--batch", type=int, default=256, help="rows per read (default 256)")
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per shard (default 4096)")
    parser.add_argument("--epochs", type=int, default=5, help="timed passes, best kept (default 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype")
    parser.add_argument("--pieces", type=int, default=0, metavar="ROWS",
                        help="read --n / ROWS pieces of ROWS rows at random starts instead of contiguous batches")
    parser.add_argument("--chunk-cache", action="store_true",
                        help="also time a reader with h5py's default chunk cache, passes alternating")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dmhpc-bench-read-"))
    try:
        rng = np.random.default_rng(0)
        images = rng.normal(size=(opts.n, 3, opts.size, opts.size)).astype(np.float32)
        manifest = write_dataset(images, rng.integers(0, 2, opts.n), None, tmp / "ds",
                                 shard_size=opts.shard_size, dtype=opts.dtype)
        del images
        per_image = 3 * opts.size * opts.size * np.dtype(opts.dtype).itemsize
        if opts.pieces:
            ranges = [(int(a), int(a) + opts.pieces) for a in rng.integers(0, opts.n - opts.pieces + 1,
                                                                             opts.n // opts.pieces)]
            what = f"{len(ranges)} random pieces of {opts.pieces} rows"
        else:
            ranges = [(a, min(a + opts.batch, opts.n)) for a in range(0, opts.n, opts.batch)]
            what = f"batches of {opts.batch}"
        rows = sum(b - a for a, b in ranges)
        print(f"{opts.n} images 3x{opts.size}x{opts.size} {opts.dtype} in {len(manifest['shards'])} shards, "
              f"{what}", flush=True)
        caches = {"RowReader.read": shards._CHUNK_CACHE_BYTES}
        if opts.chunk_cache:
            caches["with h5py's default chunk cache"] = None
        readers, held = {}, {}
        for name, cache in caches.items():  # each opened under its own cache setting, and warm
            shards._CHUNK_CACHE_BYTES = cache
            readers[name] = RowReader(tmp / "ds")
            for a, b in ranges:
                readers[name].read(a, b)
            held[name] = _held_mib(tmp / "ds", cache, ranges)
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(opts.epochs):
            for name, reader in readers.items():
                t0 = time.perf_counter()
                for a, b in ranges:
                    reader.read(a, b)
                times[name].append(time.perf_counter() - t0)
        for name, reader in readers.items():
            reader.close()
            best, median = min(times[name]), float(np.median(times[name]))
            print(f"{name}, best of {opts.epochs} passes: {rows / best:,.0f} images/s, "
                  f"{rows * per_image / best / 1e9:.2f} GB/s, {best / len(ranges) * 1e3:.2f} ms per read; "
                  f"median pass {rows / median:,.0f} images/s; {held[name]:.0f} MiB more resident after a pass "
                  f"with all {len(manifest['shards'])} shards open")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
