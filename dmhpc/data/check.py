"""What `dmhpc verify` and the trainer check of a sharded data set, and what it costs.

Three levels, each including the ones before:

- manifest: manifest.json parses and every field has its type (`shards.load_manifest`); the split
  lists are a partition of the rows (every global index once, none out of range).
- structure: each shard opens as HDF5 with `images` (n, C, H, W) of the manifest's dtype and
  `labels`, `objects`, `index` (n,) integers, and `ids` (n,) bytes when the manifest keeps ids;
  labels lie in the classes and match the manifest's counts; `index` holds the manifest's split
  lists in row order; no object is in two splits.
  Reads 24 bytes per row plus HDF5 metadata: milliseconds per shard.
- checksums: every shard's SHA-256 against the manifest. Reads every byte, so it costs what the
  disk (or the page cache) delivers: docs/training.md has the measured figure.

The work divides over ranks (shard k is checked by rank k mod world size) and over a few threads
per rank (hashing and HDF5 reads release the GIL); `combine` puts the parts together.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from dmhpc.cpus import usable_cpus
from dmhpc.data.shards import (ROWS_KEY, SPLITS, UNLABELLED, RowReader, file_sha256, is_labelled, load_manifest,
                               split_rows)
from dmhpc.errors import DmhpcError

_THREADS = 4  # per rank: enough to keep a parallel file system busy, few enough to share a node


def split_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's split lists, or None: they must partition range(count)."""
    # A flag per row, not np.unique: sorting every split took minutes per rank at every trainer start
    # on 50 million rows; the flags are linear and name the same (smallest) index.
    count = manifest["count"]
    parts = {s: np.asarray(manifest["splits"][s], dtype=np.int64) for s in SPLITS}
    holds = {}
    for split, idx in parts.items():
        bad = idx[(idx < 0) | (idx >= count)]
        if bad.size:
            return f"splits[{split!r}]: index {int(bad[0])} outside [0, {count})"
        flags = np.zeros(count, dtype=bool)
        flags[idx] = True
        if np.count_nonzero(flags) != idx.size:
            repeated = np.flatnonzero(np.bincount(idx, minlength=count) > 1)
            return f"splits[{split!r}]: index {int(repeated[0])} appears twice"
        holds[split] = flags
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            both = np.flatnonzero(holds[a] & holds[b])
            if both.size:
                return f"splits: index {int(both[0])} is in both {a} and {b}"
    return None


def _split_of_rows(manifest: dict) -> np.ndarray:
    """Split number (0 train, 1 val, 2 test) of every row."""
    out = np.empty(manifest["count"], dtype=np.int8)
    for k, split in enumerate(SPLITS):
        start, stop = manifest["rows"][split]
        out[start:stop] = k
    return out


def _check_shard(directory: Path, manifest: dict, number: int, checksums: bool, index: np.ndarray,
                 split_of: np.ndarray):
    """(problems, {split: object ids}, {split: class counts}) of one shard. `index` and `split_of`: the
    input index and split of every row by the manifest, built once per data set (per shard they made
    the check quadratic in the rows: 30 s for 2 million)."""
    shard = manifest["shards"][number]
    name, n, start = shard["file"], shard["count"], shard["start"]
    path = directory / name
    empty = {s: np.zeros(0, np.int64) for s in SPLITS}
    try:
        # (stat's own error too: a failing disk, a name too long behind a link, a folder not searchable)
        if not path.is_file():
            return [f"{name} missing"], empty, {}
    except OSError as exc:
        return [f"{name}: cannot read ({exc.strerror or exc})"], empty, {}
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("images", "labels", "objects", "index") if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                return [f"{name} has no dataset {missing[0]!r}"], empty, {}
            images = f["images"]
            expected = (n, *manifest["shape"])
            if images.shape != expected or images.dtype != np.dtype(manifest["dtype"]):
                return [f"{name}: images {images.dtype} {images.shape}, manifest says {manifest['dtype']} "
                        f"{expected}"], empty, {}
            columns = {}
            for key in ("labels", "objects", "index"):
                d = f[key]
                if d.shape != (n,) or d.dtype.kind not in "iu":
                    return [f"{name}: {key} {d.dtype} {d.shape}, expected integers ({n},)"], empty, {}
                columns[key] = d[()].astype(np.int64)
            # The rows' digest the manifest records (a shard of the same split, prepared from other
            # images): passed at the structure level, it failed the run at its first read.
            recorded, held = shard.get(ROWS_KEY), f.attrs.get(ROWS_KEY)
            if recorded is not None and held != recorded:
                return [f"{name}: its rows' digest ({ROWS_KEY}) is not the manifest's: a shard of another "
                        f"preparation of this data set"], empty, {}
            # `predict` reads the ids into its catalog: a data set that says it keeps them must hold them.
            if manifest.get("ids", False):
                d = f.get("ids")
                if not isinstance(d, h5py.Dataset):
                    return [f"{name} has no dataset 'ids' (the manifest keeps ids)"], empty, {}
                if d.shape != (n,) or d.dtype.kind != "S":
                    return [f"{name}: ids {d.dtype} {d.shape}, expected bytes ({n},)"], empty, {}
    except OSError as exc:
        return [f"{name} is not a readable HDF5 file ({exc})"], empty, {}
    labels = columns["labels"]
    if is_labelled(manifest):
        bad = np.flatnonzero((labels < 0) | (labels >= manifest["num_classes"]))
        outside = f"outside the {manifest['num_classes']} classes"
    else:
        bad = np.flatnonzero(labels != UNLABELLED)
        outside = f"in an unlabelled data set (expected {UNLABELLED})"
    if bad.size:
        return [f"{name}: label {int(labels[bad[0]])} at row {start + int(bad[0])} is {outside}"], empty, {}
    expected_index = index[start:start + n]
    wrong = np.flatnonzero(columns["index"] != expected_index)
    if wrong.size:
        return [f"{name}: row {start + int(wrong[0])} holds input {int(columns['index'][wrong[0]])}, the manifest's "
                f"split lists say {int(expected_index[wrong[0]])}"], empty, {}
    splits = split_of[start:start + n]
    objects = {s: np.unique(columns["objects"][splits == k]) for k, s in enumerate(SPLITS)}
    classes = {s: np.bincount(labels[splits == k], minlength=manifest["num_classes"]) for k, s in enumerate(SPLITS)
               if is_labelled(manifest)}
    problems = []
    if checksums:
        try:
            if file_sha256(path) != shard["sha256"]:
                problems.append(f"{name} checksum mismatch")
        except OSError as exc:
            # A failing disk (EIO, a Lustre OST down) is this shard's problem: raised, it hid the other
            # shards' problems, and under several ranks (only DmhpcError is passed between them) one
            # rank died while the others waited.
            problems.append(f"{name}: cannot read ({exc.strerror or exc})")
    return problems, objects, classes


def check_part(directory: str | os.PathLike, *, checksums: bool, rank: int = 0, world_size: int = 1,
               manifest: dict | None = None) -> dict:
    """This rank's share of the checks: {"problems": [...], "objects": {split: ids}, "classes": ...}."""
    directory = Path(directory)
    manifest = load_manifest(directory) if manifest is None else manifest
    numbers = range(rank, len(manifest["shards"]), world_size)
    threads = max(1, min(_THREADS, usable_cpus(), len(numbers)))
    index = np.concatenate([np.asarray(manifest["splits"][s], np.int64) for s in SPLITS])
    split_of = _split_of_rows(manifest)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda k: _check_shard(directory, manifest, k, checksums, index, split_of), numbers))
    part = {"problems": [], "objects": {s: [] for s in SPLITS},
            # An unlabelled set counts no classes: its num_classes, checked against no counts, may be anything.
            "classes": {s: np.zeros(manifest["num_classes"] if is_labelled(manifest) else 0, np.int64)
                        for s in SPLITS}}
    for problems, objects, classes in results:
        part["problems"] += problems
        for s in SPLITS:
            part["objects"][s].append(objects[s])
            if s in classes:
                part["classes"][s] += classes[s]
    return part


def _distinct(ids: np.ndarray) -> np.ndarray:
    """The sorted distinct ids. Each shard's ids come sorted (np.unique in _check_shard): a stable
    sort (timsort for int64) merges those runs instead of sorting all rows afresh as np.unique does."""
    ids = np.sort(ids.astype(np.int64, copy=False), kind="stable")
    return ids[np.concatenate(([True], ids[1:] != ids[:-1]))] if ids.size else ids


def _distinct_common(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The ids in both of two sorted distinct arrays, sorted: np.intersect1d without its three sorts
    (two runs merge in one linear pass of the stable sort)."""
    both = np.sort(np.concatenate((a, b)), kind="stable")
    return both[1:][both[1:] == both[:-1]]


def combine(manifest: dict, parts: list[dict]) -> list[str]:
    """Every problem of the data set, from all ranks' parts (in rank order)."""
    problems = [p for part in parts for p in part["problems"]]
    if problems:
        return problems  # the counts below would only repeat them
    for split in SPLITS if is_labelled(manifest) else ():
        counts = sum(part["classes"][split] for part in parts)
        stated = [manifest["counts"][split][str(k)] for k in range(manifest["num_classes"])]
        if list(counts) != stated:
            problems.append(f"{split} split holds {list(map(int, counts))} images per class, the manifest "
                            f"says {stated}")
    none = np.zeros(0, np.int64)
    objects = {s: _distinct(np.concatenate([o for part in parts for o in part["objects"][s]] or [none]))
               for s in SPLITS}
    for split in SPLITS if "objects" in manifest else ():  # what `dmhpc info` shows
        if len(objects[split]) != manifest["objects"][split]:
            problems.append(f"{split} split holds {len(objects[split])} objects, the manifest says "
                            f"{manifest['objects'][split]}")
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            both = _distinct_common(objects[a], objects[b])
            if both.size:
                problems.append(f"{both.size} objects are in both the {a} and {b} splits (e.g. object "
                                f"{int(both[0])}): their images would be tested on what was trained on")
    return problems


def _objects_file(manifest: dict) -> str | None:
    """The SHA-256 of the file of object ids the data set was prepared with, if any."""
    return next((e["sha256"] for e in manifest["inputs"] if e.get("role") == "objects" and "sha256" in e), None)


def _split_otherwise(source: dict, target: dict) -> str:
    """How two data sets' splits were drawn, where they differ."""
    said = [f"{key} {source[key]} and {target[key]}" for key in ("seed", "fractions") if source[key] != target[key]]
    return f"with {' and '.join(said)}" if said else "otherwise (their rows grouped into objects differently)"


def _objects_in(directory: Path, manifest: dict, first: str, last: str) -> np.ndarray:
    """The distinct object ids of splits `first` to `last` (contiguous rows, in split order)."""
    rows = (split_rows(manifest, first)[0], split_rows(manifest, last)[1])
    return _distinct(RowReader(directory, manifest).read_ranges([rows], ("objects",))["objects"])


def twins_trained_on(source_dir: Path, source: dict, target_dir: Path, target: dict, *, adapts: bool = True,
                     held: tuple[str, str] = ("val", "test")) -> str | None:
    """Where both data sets were prepared from one file of object ids (the same SHA-256: a pristine
    set and its noisy copy) and split otherwise (another --seed or --fractions): the target's `held`
    objects (its validation and test splits, from first to last) that the source trains on, and, for
    a run that `adapts` (reads the target's training split), the source's validation and test
    objects that split holds, as a problem line; None where there are none. Each data set's own
    check cannot see it: the target's test images had their noise-free twins in the source's
    training split, and its accuracy was inflated."""
    shared = _objects_file(source)
    if shared is None or shared != _objects_file(target):
        return None
    if all(np.array_equal(source["splits"][s], target["splits"][s]) for s in SPLITS):
        return None  # (the same draw)
    held_splits = [{"val": "validation"}.get(split, split) for split in held]
    held = _objects_in(target_dir, target, *held)
    seen = _distinct_common(_objects_in(source_dir, source, "train", "train"), held)
    source_held = _objects_in(source_dir, source, "val", "test")
    back = _distinct_common(_objects_in(target_dir, target, "train", "train"), source_held) if adapts else \
        np.zeros(0, np.int64)
    if not seen.size and not back.size:
        return None
    said = []
    if seen.size:
        said.append(f"{seen.size} of its {held.size} {' and '.join(dict.fromkeys(held_splits))} objects are in the "
                    f"training split of {source_dir} (e.g. object {int(seen[0])})")
    if back.size:  # (its labels unread, its images adapted to: the source's held-out score is no longer held out)
        said.append(f"{back.size} of the {source_held.size} validation and test objects of {source_dir} are in its "
                    f"training split (e.g. object {int(back[0])})")
    return (f"{', and '.join(said)}: both hold the objects of one file, split {_split_otherwise(source, target)}; "
            f"prepare both with one --seed and --fractions")


def twins_note(source: dict, target: dict) -> str | None:
    """Data sets of as many images, not prepared from one file of object ids (as DeepMerge's pristine
    and noisy files, row i of one the twin of row i of the other; or one of them grouped by object
    ids the other lacks), split otherwise: how many of the target's validation and test rows are
    training rows of the source, row for row, and the other way round. A note, not a refusal:
    unrelated data sets may happen to hold as many images."""
    shared = _objects_file(source)
    if source["count"] != target["count"] or (shared is not None and shared == _objects_file(target)):
        return None  # (one file of ids: twins_trained_on decides)

    def held_in_train(trains: dict, holds: dict) -> tuple[int, int]:
        trained = np.zeros(trains["count"], dtype=bool)
        trained[np.asarray(trains["splits"]["train"], np.int64)] = True
        held = np.concatenate([np.asarray(holds["splits"][s], np.int64) for s in ("val", "test")])
        return int(np.count_nonzero(trained[held])), held.size

    (count, held), (back, source_held) = held_in_train(source, target), held_in_train(target, source)
    if not count and not back:
        return None
    return (f"data.source and data.target hold as many images ({source['count']}), split "
            f"{_split_otherwise(source, target)}: if row i of one is row i of the other (a pristine set and its "
            f"noisy copy), {count} of the target's {held} validation and test images have their twin in the "
            f"source's training split, and {back} of the source's {source_held} in the target's; prepare both "
            f"with one --seed and --fractions")


def check_dataset(where: str, directory: str | os.PathLike, manifest: dict, *, checksums: bool, rank: int = 0,
                  world_size: int = 1, gather: Callable[[Callable[[], Any]], list] = lambda step: [step()]) -> None:
    """One DmhpcError starting with `where` that names the data set's first problems, or nothing.
    Shard k is checked by rank k mod `world_size`; `gather(step)` runs `step` on every rank and
    returns all results (dmhpc.distributed.gather), so every rank raises the same line."""
    problem = split_problem(manifest)
    if problem:
        raise DmhpcError(f"{where}: manifest.json: {problem}")
    parts = gather(lambda: check_part(directory, checksums=checksums, rank=rank, world_size=world_size,
                                      manifest=manifest))
    problems = combine(manifest, parts)
    if problems:
        raise DmhpcError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                         f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''} "
                         f"(`dmhpc verify {directory}` lists them)")


def verify_dataset(directory: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Every problem of a data set in one process (empty: all good); a bad manifest raises."""
    manifest = load_manifest(directory)
    problem = split_problem(manifest)
    if problem:
        return [f"manifest.json: {problem}"]
    return combine(manifest, [check_part(directory, checksums=checksums, manifest=manifest)])


def verify_arguments(parser) -> None:
    parser.add_argument("directory", help="data-set directory (holding manifest.json)")
    parser.add_argument("--structure-only", action="store_true",
                        help="check the manifest, split lists and each shard's datasets and labels, "
                             "not the checksums (what data.verify=structure does in the trainer)")


def verify_main(args) -> int:
    manifest = load_manifest(args.directory)
    problems = verify_dataset(args.directory, checksums=not args.structure_only)
    shards = len(manifest["shards"])
    if problems:
        raise DmhpcError(f"{args.directory}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                         f"{'; '.join(problems)}")
    what = "structure OK (checksums not checked)" if args.structure_only else "structure and checksums OK"
    print(f"{args.directory}: {shards} shards, {manifest['count']} rows, {what}")
    return 0
