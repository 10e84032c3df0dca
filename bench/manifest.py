"""What a data set's manifest costs a process at scale: reading it, reading it again, and a row
reader (what every loader worker is handed).

    python bench/manifest.py                  # a manifest of 1e7 rows (no shards are written)
    python bench/manifest.py --rows 1e8

Writes only the manifest of a data set of --rows rows in shards of 4096 (its index lists are what
grows with the rows), then times the first `load_manifest` (parse, check of every field, content
hash), a second one, and a read past the cache (what every call cost before: a run reads each of
its manifests ~10 times, in preflight, loaders and every evaluation); the fingerprint twice; and
building a `RowReader`. Prints the reader's pickled size beside that of the index lists as the
file holds them (what each worker got with its reader before), and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dmhpc.data import shards


def fake_manifest(directory: Path, n: int, shard_size: int = 4096) -> None:
    order = np.random.default_rng(0).permutation(n)
    a, b = int(0.7 * n), int(0.8 * n)
    starts = list(range(0, n, shard_size))
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION, "count": n, "shape": [3, 75, 75], "dtype": "float32",
        "num_classes": 2, "seed": 0, "fractions": {"train": 0.7, "val": 0.1, "test": 0.2},
        "shards": [{"file": shards.shard_name(k), "count": min(shard_size, n - s), "start": s, "sha256": "0" * 64}
                   for k, s in enumerate(starts)],
        "rows": {"train": [0, a], "val": [a, b], "test": [b, n]},
        "splits": {"train": order[:a].tolist(), "val": order[a:b].tolist(), "test": order[b:].tolist()},
        "counts": {"train": {"0": a - a // 2, "1": a // 2}, "val": {"0": (b - a) - (b - a) // 2, "1": (b - a) // 2},
                   "test": {"0": (n - b) - (n - b) // 2, "1": (n - b) // 2}},
        "stats": {"mean": [0.0] * 3, "std": [1.0] * 3}, "inputs": [], "layout": "NCHW", "created_by": "bench",
    }
    shards.write_manifest(directory, manifest)


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, default=1e7)
    args = parser.parse_args()
    n = int(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        fake_manifest(directory, n)
        size = (directory / shards.MANIFEST).stat().st_size
        manifest, first = timed(lambda: shards.load_manifest(directory))
        _, again = timed(lambda: shards.load_manifest(directory))
        _, uncached = timed(lambda: shards._read_manifest(directory, directory / shards.MANIFEST))
        _, fp_first = timed(lambda: shards.fingerprint(manifest))
        _, fp_again = timed(lambda: shards.fingerprint(manifest))
        reader, build = timed(lambda: shards.RowReader(directory))
        lists = pickle.dumps(json.loads((directory / shards.MANIFEST).read_text())["splits"])
        print(f"manifest of {n:,} rows: {size / 1e6:.0f} MB, {len(manifest['shards'])} shards")
        print(f"load_manifest   first {first:8.2f} s   again {again * 1e3:8.3f} ms   "
              f"(read anew, as every call did before: {uncached:.2f} s)")
        print(f"fingerprint     first {fp_first:8.2f} s   again {fp_again * 1e3:8.3f} ms")
        print(f"RowReader built in {build:.2f} s; pickled {len(pickle.dumps(reader)) / 1e6:.2f} MB "
              f"(the index lists alone: {len(lists) / 1e6:.0f} MB pickled)")
        print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB")  # (KiB on Linux)


if __name__ == "__main__":
    main()
