"""The manifest-wide part of the data-set check (split lists and objects), old and new side by side.

    python bench/split_check.py                  # 5,000,000 rows
    python bench/split_check.py --rows 50000000 --old 9ef568b

`split_problem` (split lists a partition of the rows) and `combine` (objects per split, objects in
two splits) run on every rank at every trainer start, at every data.verify level. This builds a
manifest's split lists (Python ints, as json gives them) and one rank's parts (each 4096-row
shard's sorted distinct object ids per split, as `check_part` returns them) for --rows rows, two
images per object with ids drawn like SDSS objids, and times both functions of dmhpc/data/check.py
at commit --old (np.unique and np.intersect1d) and of this checkout, checking they give the same
verdicts.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import types
from pathlib import Path

import numpy as np

import dmhpc.data.check as new
from dmhpc.data.shards import SPLITS

ROOT = Path(__file__).resolve().parents[1]


def old_module(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:dmhpc/data/check.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"check_{commit}")
    exec(compile(source, f"{commit}:dmhpc/data/check.py", "exec"), module.__dict__)
    return module


def inputs(rows: int, shard: int = 4096):
    rng = np.random.default_rng(0)
    ids = rng.integers(10**18, 2 * 10**18, (rows + 1) // 2)  # input i shows object ids[i // 2]
    by_object = (2 * rng.permutation(len(ids))[:, None] + np.arange(2)).ravel()
    by_object = by_object[by_object < rows]
    cuts = [0, int(0.8 * rows) // 2 * 2, int(0.9 * rows) // 2 * 2, rows]  # whole objects to each split
    order = np.concatenate([rng.permutation(by_object[a:b]) for a, b in zip(cuts, cuts[1:])])
    in_row = ids[order // 2]
    splits = {s: order[cuts[k]:cuts[k + 1]].tolist() for k, s in enumerate(SPLITS)}
    split_of = np.repeat(np.arange(3, dtype=np.int8), np.diff(cuts))
    parts = [{"problems": [], "objects": {s: [] for s in SPLITS}, "classes": {s: np.zeros(0, np.int64) for s in SPLITS}}]
    for a in range(0, rows, shard):
        for k, s in enumerate(SPLITS):
            parts[0]["objects"][s].append(np.unique(in_row[a:a + shard][split_of[a:a + shard] == k]))
    manifest = {"count": rows, "splits": splits, "labelled": False, "num_classes": 2,
                "objects": {s: int(len(np.unique(in_row[cuts[k]:cuts[k + 1]]))) for k, s in enumerate(SPLITS)}}
    return manifest, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of the data set (default 5,000,000)")
    parser.add_argument("--old", default="9ef568b", help="commit of the old check (default 9ef568b, np.unique)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is printed (default 3)")
    opts = parser.parse_args()
    old = old_module(opts.old)
    manifest, parts = inputs(opts.rows)
    print(f"{opts.rows:,} rows, {sum(len(v) for v in parts[0]['objects'].values())} shard parts; best of {opts.repeat}")
    print("| check | old (np.unique) | new | same verdict |")
    print("|---|---|---|---|")
    for name, call in (("split_problem", lambda m: m.split_problem(manifest)),
                       ("combine", lambda m: m.combine(manifest, parts))):
        seconds, verdicts = {}, {}
        for label, module in (("old", old), ("new", new)):
            best = float("inf")
            for _ in range(opts.repeat):
                t0 = time.perf_counter()
                verdicts[label] = call(module)
                best = min(best, time.perf_counter() - t0)
            seconds[label] = best
        assert verdicts["new"] == verdicts["old"] and not verdicts["new"], verdicts
        print(f"| {name} | {seconds['old']:.3f} s | {seconds['new']:.3f} s | yes |", flush=True)


if __name__ == "__main__":
    main()
