"""What the trainer's start-up check of a data set costs (dmhpc/data/check.py), per level and cache state.

    python bench/verify.py                   # 4 GB data set: 60,000 images of 3x75x75 float32
    python bench/verify.py --gb 8 --threads 1 2 4

Writes a data set of --gb gigabytes under --dir (default /tmp), then times `check_part` (what each
rank runs at start) at data.verify=structure and =checksums, with the page cache warm and, when
this process may drop it (root), cold: the bytes then come from the disk. Prints the rate and
what it means for a 100 GB data set on one rank and shared among the ranks of a job (each rank
checks every N-th shard, so N ranks on N nodes divide the time by N while the file system keeps
up).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import dmhpc.data.check as check
from dmhpc.cpus import usable_cpus
from dmhpc.data.shards import load_manifest, write_dataset


def drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="size of the data set (default 4)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="threads per rank to try")
    parser.add_argument("--dir", default="/tmp", help="where to write it (default /tmp)")
    opts = parser.parse_args()

    per_image = 3 * 75 * 75 * 4
    n = int(opts.gb * 1e9 / per_image)
    tmp = Path(tempfile.mkdtemp(prefix="dmhpc-bench-verify-", dir=opts.dir))
    try:
        rng = np.random.default_rng(0)
        block = rng.normal(size=(4096, 3, 75, 75)).astype(np.float32)
        images = np.lib.format.open_memmap(tmp / "x.npy", mode="w+", dtype=np.float32, shape=(n, 3, 75, 75))
        for a in range(0, n, len(block)):
            images[a:a + len(block)] = block[: n - a]
        images.flush()
        write_dataset(images, np.arange(n) % 2, None, tmp / "ds", shard_size=4096)
        del images
        (tmp / "x.npy").unlink()
        manifest = load_manifest(tmp / "ds")
        size = sum((tmp / "ds" / s["file"]).stat().st_size for s in manifest["shards"])
        print(f"data set: {n} images, {len(manifest['shards'])} shards, {size / 1e9:.2f} GB in {opts.dir}")
        print("| level | cache | threads | seconds | GB of data set per s | 100 GB, one rank | 100 GB, 8 ranks on 8 nodes |")
        print("|---|---|---|---|---|---|---|")
        for level in ("structure", "checksums"):
            for cache in ("cold", "warm"):
                for threads in opts.threads:
                    check._THREADS = threads
                    if cache == "cold":
                        if not drop_caches():
                            continue
                    else:
                        check.check_part(tmp / "ds", checksums=True, manifest=manifest)  # warm it
                    t0 = time.perf_counter()
                    part = check.check_part(tmp / "ds", checksums=level == "checksums", manifest=manifest)
                    seconds = time.perf_counter() - t0
                    assert not part["problems"], part["problems"]
                    rate = size / seconds / 1e9
                    # The threads check_part ran, not those asked for: it takes no more than the
                    # CPUs this process may use (rows of "4" on 2 CPUs ran 2).
                    ran = max(1, min(threads, usable_cpus(), len(manifest["shards"])))
                    print(f"| {level} | {cache} | {ran} | {seconds:.2f} | {rate:.2f} | {100 / rate:.0f} s "
                          f"| {100 / rate / 8:.0f} s |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
