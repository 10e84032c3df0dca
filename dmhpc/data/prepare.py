"""`dmhpc prepare`: convert images (and labels, if any) to sharded HDF5 data sets (docs/data-format.md).

One domain from --images [--labels] [--objects] or from a --catalog of FITS cutouts, or every
domain a data config names (each to OUT/<domain>/). Inputs are read a block of rows at a time
(.npy memory-mapped, FITS through astropy: dmhpc/data/inputs.py), so files larger than memory
convert in bounded memory. Without labels the data set is unlabelled (a survey to adapt to or to
predict on). Without object ids, images that are exact flips or rotations of each other (the
augmented copies in the DeepMerge files) are counted and reported, or grouped into objects with
--group-duplicates, so that no object straddles two splits (dmhpc/data/duplicates.py). Under
`mpiexec -n K` the checks and shards are divided among the ranks; the bytes written are those of
a serial run.

Every input is validated, on every rank, before anything is written: a bad input leaves no output
directory and no partial file. Ranks agree on each step's outcome before the next, so an error on
one rank stops them all instead of leaving the others waiting.

The Python API is `prepare(domains, options)` with `DomainSpec`s and `Options`, values only.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmhpc.checks import REQUIRED, Problems, mapping, path_text, read_yaml, show, take, text, unknown_keys
from dmhpc.config import parse_override
from dmhpc.data import duplicates, shards
from dmhpc.data.inputs import (CUTOUTS_HELP, LAYOUTS, ArrayRows, Cutouts, check_nan_fill, open_images, open_npy,
                               read_catalog, resolve_spelling)
from dmhpc.errors import DmhpcError
from dmhpc.files import TEMP_SUFFIX, file_version, locked_directory
from dmhpc.mpi import abort_all, world_comm

CONFIG_KEYS = ("root", "out", "domains")
# A domain is made of images (.npy or FITS cube) or a catalog of cutouts, plus what they need.
DOMAIN_KEYS = ("images", "labels", "objects", "catalog", "id_column", "label_column", "file_column", "cutouts")
PATH_KEYS = ("images", "labels", "objects", "catalog", "cutouts")
# Read from a catalog only: given without one, they were ignored and an unlabelled set written.
CATALOG_KEYS = ("id_column", "label_column", "file_column", "cutouts")
CUTOUT_KEYS = ("file_column", "cutouts")  # where the images come from when no images file is given
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DOMAINS = mapping("a non-empty mapping of each domain's name to its files", empty=False)


@dataclass(frozen=True)
class Options:
    """How every domain is converted (the command line's options, as values)."""

    shard_size: int = shards.SHARD_SIZE
    seed: int = 0
    fractions: tuple = shards.SPLIT_FRACTIONS
    layout: str | None = None
    dtype: str = shards.DTYPES[0]
    num_classes: int = 2
    overwrite: bool = False
    group_duplicates: bool = False
    nan_fill: float | None = None


@dataclass(frozen=True)
class DomainSpec:
    """One domain's inputs and output directory."""

    name: str
    out: Path
    images: Path | None = None
    labels: Path | None = None
    objects: Path | None = None
    catalog: Path | None = None
    id_column: str = "id"
    label_column: str | None = None
    file_column: str | None = None
    cutouts: Path | None = None


# ----------------------------------------------------------------------------- data configs


def read_data_config(path, sets=()) -> dict:
    """A data config's mapping with its `KEY=VALUE` overrides applied, not yet checked (see
    `load_data_config`)."""
    name = str(path)
    config = read_yaml(Path(path), "data config")
    for item in sets:
        key, value = parse_override(item)
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise DmhpcError(f"command line: --set {key}: {'.'.join(parts[:parts.index(part) + 1])} is not a "
                                 f"mapping in {name}")
            node = node[part]
        node[parts[-1]] = value
    return config


def load_data_config(path, root: str | None = None, out: str | None = None, sets=()) -> list[DomainSpec]:
    """Domains named by a data config, with `KEY=VALUE` overrides (`domains.sdss.images=...`).

    File paths are relative to `root` (the config's, or the one given); `root` and `out` are
    relative to the working directory. Unknown or missing keys raise DmhpcError naming the key
    and the config file (or the command line, for an override).
    """
    name = str(path)
    config = read_data_config(path, sets)
    problems = Problems(name, "nothing written", overridden=[parse_override(item)[0] for item in sets])
    unknown_keys(problems, config, CONFIG_KEYS)
    # A root or out given on the command line replaces the file's: that one is never read.
    root_text = take(problems, config, "root", path_text(), REQUIRED) if root is None else None
    out_text = take(problems, config, "out", path_text(), REQUIRED) if out is None else None
    domains = take(problems, config, "domains", DOMAINS)
    result = []
    for domain, files in (domains or {}).items():
        where = f"domains.{domain}"
        if not isinstance(domain, str):  # YAML read 2020 as a number and `no` as false
            what = "a boolean" if isinstance(domain, bool) else "a number" if isinstance(domain, (int, float)) else "no text"
            problems.add(where, f"the name {show(domain)} is {what} to YAML: quote it")
        elif not _DOMAIN_NAME.fullmatch(domain):
            problems.add(where, "a domain name is made of letters, digits, '_', '-' and '.'")
        if not isinstance(files, dict):
            problems.add(where, f"expected a mapping of {', '.join(DOMAIN_KEYS)}, got {show(files)}")
            continue
        unknown_keys(problems, files, DOMAIN_KEYS, where + ".")
        if "images" not in files and "catalog" not in files:
            problems.add(f"{where}.images", "missing (required, or a catalog of cutouts)")
        elif "catalog" not in files:
            for key in (k for k in CATALOG_KEYS if k in files):
                problems.add(f"{where}.{key}", f"read from a catalog only, and {where} has no catalog")
        if "images" in files:
            for key in (k for k in CUTOUT_KEYS if k in files):
                problems.add(f"{where}.{key}", f"names cutout files to read, and {where}.images gives the images")
        values = {key: take(problems, files, key, path_text() if key in PATH_KEYS else text(), None, where + ".")
                  for key in DOMAIN_KEYS if key in files}
        result.append((domain, values))
    problems.raise_if_any()
    root_dir = Path(root if root is not None else root_text)
    out_dir = Path(out if out is not None else out_text)
    return [DomainSpec(name=domain, out=out_dir / domain,
                       **{k: (root_dir / v if k in PATH_KEYS else v) for k, v in values.items() if v is not None})
            for domain, values in result]


# ----------------------------------------------------------------------------- opening a domain


def _path(p: Path | None, say: bool) -> Path | None:
    """The input file, or the one whose name differs in letter case only (with a note, if `say`).
    One in a folder whose files were being replaced (marked by synth) is refused."""
    if p is None:
        return None
    if (p.parent / shards.INCOMPLETE).exists():
        # A synth killed among its renames: new images beside the old render's labels, say.
        raise DmhpcError(f"{p.parent}: its files were being replaced when that stopped ({shards.INCOMPLETE}), and "
                         f"may be of two renders; render it again (dmhpc synth --overwrite)")
    found, note = resolve_spelling(p)
    if note and say:
        print(f"dmhpc prepare: note: {note}", file=sys.stderr, flush=True)
    return found


def _open_domain(spec: DomainSpec, options: Options, say: bool) -> dict:
    """Open one domain's inputs and check them (all but the pixels). Objects are drawn later. Notes
    are said where `say` (rank 0: every rank opens the inputs)."""
    # Each resolved once: its note (a name that differs in letter case) said once.
    images_path, catalog_path, labels_path, objects_path = (_path(spec.images, say), _path(spec.catalog, say),
                                                            _path(spec.labels, say), _path(spec.objects, say))
    catalog = None
    if catalog_path is not None:
        catalog = read_catalog(catalog_path, id_column=spec.id_column, label_column=spec.label_column,
                               file_column=spec.file_column, cutouts=_path(spec.cutouts, say))
    if images_path is not None:
        images = open_images(images_path, options.layout, options.nan_fill)
        if catalog is not None and len(catalog.ids) != len(images):
            raise DmhpcError(f"{catalog.path}: {len(catalog.ids)} rows for the {len(images)} images of {images_path}")
    elif catalog is not None and catalog.files is not None:
        images = Cutouts(catalog, options.nan_fill, options.layout)
    elif catalog is not None:
        raise DmhpcError(f"{catalog.path}: no file column nor cutouts folder to find its images by; give "
                         f"--file-column or --cutouts (or --images)")
    else:
        raise DmhpcError(f"{spec.name}: give images (.npy or a FITS cube), or a catalog with a file column or a "
                         f"cutouts folder")
    if spec.labels is not None and catalog is not None and catalog.labels is not None:
        raise DmhpcError(f"{spec.name}: labels from both {spec.labels} and the catalog's {spec.label_column!r} column")
    labels = open_npy(labels_path) if labels_path is not None else (catalog.labels if catalog else None)
    # A catalog's ids are one per row (a repeated one is refused): they name images, not objects, so
    # without --objects each image is its own object, and copies are looked for as without a catalog.
    objects = open_npy(objects_path) if objects_path is not None else None
    names = {"images": str(images_path or catalog_path),
             "labels": str(spec.labels) if spec.labels is not None else f"{catalog_path}:{spec.label_column}",
             "objects": str(spec.objects)}
    # Now, not in plan_dataset: the pixel scan comes first, and strings, a structured dtype or
    # images of no pixels made it a traceback.
    shards.check_images(images, names["images"])
    layout = images.layout
    try:  # as opened: a file written again from here on is refused once the shards are written
        # Each link followed once, here: a link pointed elsewhere meanwhile ("current" data) was
        # followed again for the checksums and the manifest, a KeyError traceback (the file read is named).
        inputs = [(role, p.resolve()) for role, p in (("images", images_path), ("catalog", catalog_path),
                                                      ("labels", labels_path), ("objects", objects_path))
                  if p is not None]
        versions = {p: file_version(p.stat()) for _, p in inputs}
    except OSError as exc:
        raise DmhpcError(f"{exc.filename}: cannot read ({exc.strerror})") from None
    return {"spec": spec, "name": spec.name, "out": spec.out, "images": images, "labels": labels,
            "objects": objects, "ids": catalog.ids if catalog is not None else None, "layout": layout,
            "names": names, "inputs": inputs, "versions": versions, "cutouts": isinstance(images, Cutouts)}


def _hash_share(domains: list[dict], candidates: list, rank: int, size: int) -> list:
    """This rank's share of the exact duplicate test: the canonical hashes of its contiguous part of
    each domain's candidates (None where the domain has object ids). Every rank hashed them all:
    nearly every image of the DeepMerge files, eight digests of each, the whole input read on every
    rank."""
    found = []
    for d, rows in zip(domains, candidates):
        if rows is None:
            found.append(None)
            continue
        part = rows[len(rows) * rank // size:len(rows) * (rank + 1) // size]
        try:
            found.append(duplicates.canonical_hashes(d["images"], part))
        except OSError as exc:
            raise DmhpcError(f"{d['names']['images']}: cannot read ({exc})") from None
    return found


def _group_domains(domains: list[dict], options: Options, signatures: list, candidates: list,
                   hashes: list) -> tuple[list, list[list[str]]]:
    """Each domain's duplicate groups (None where it has object ids), and the names of the domains
    grouped together. With --group-duplicates, domains of as many images are taken as the same
    objects row by row (DeepMerge's pristine and noisy) and share one grouping: grouped apart, noise
    added to each copy hid the noisy domain's copies, so its objects and split differed from the
    pristine domain's: twins on both sides of the split."""
    groups = [duplicates.objects_from(s, c, h) if d["objects"] is None else None
              for d, s, c, h in zip(domains, signatures, candidates, hashes)]
    if not options.group_duplicates:
        return groups, []
    for d, g in zip(domains, groups):
        if g is None:
            raise DmhpcError(f"{d['name']}: --group-duplicates derives object ids; this domain has them already")
    together = []
    for count in sorted({len(g) for g in groups}):
        paired = [k for k, g in enumerate(groups) if len(g) == count]
        if len(paired) > 1:
            joined = duplicates.join_groupings([groups[k] for k in paired])
            for k in paired:
                groups[k] = joined
            together.append([domains[k]["name"] for k in paired])
    return groups, together


def _plan_domain(d: dict, options: Options, grouped: np.ndarray | None) -> dict:
    """Draw the split (objects: the duplicate groups when asked), check the output directory."""
    objects, copies = d["objects"], (0, 0)
    if objects is None:
        copies = duplicates.count_copies(grouped)
        if options.group_duplicates:
            objects = grouped
    plan = shards.plan_dataset(
        d["images"], d["labels"], objects, shard_size=options.shard_size, seed=options.seed,
        fractions=options.fractions, dtype=options.dtype, num_classes=options.num_classes, names=d["names"],
        ids=d["ids"])
    shards.check_output_dir(d["out"], options.overwrite)
    return {**d, "plan": plan, "copies": copies}


# ----------------------------------------------------------------------------- MPI


def _agree(comm, step):
    """Run `step()` here and return its result.

    If it raises DmhpcError on any rank, raise the first rank's message on every rank, so that
    no rank goes on to a collective step the others will never reach.
    """
    if comm is None:
        return step()
    try:
        result, error = step(), None
    except DmhpcError as exc:
        result, error = None, str(exc)
    # Wait for the slowest rank asleep: MPI's blocking collectives spin, which takes a core from
    # the ranks still working when there are more ranks and threads than cores.
    arrived = comm.Ibarrier()
    while not arrived.Test():
        time.sleep(0.002)
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise DmhpcError(errors[0])
    return result


def _allgather(comm, value) -> list:
    """Every rank's `value`, in rank order (small values only: they are pickled)."""
    return [value] if comm is None else comm.allgather(value)


# ----------------------------------------------------------------------------- the conversion


def _scan_source(d: dict):
    """What the pixel scan reads: the raw array (its own dtype, so an overflow is told apart from
    an Inf) where there is one, else the rows as read (cutouts: NaN filled already)."""
    images = d["images"]
    return images.array if isinstance(images, ArrayRows) else images


def _scan(domains: list[dict], rank: int, size: int, want_signatures: list[bool], dtype: str) -> list:
    """This rank's share of the pixel checks (and of the duplicate signatures, where wanted)."""
    found = []
    for d, want in zip(domains, want_signatures):
        n = len(d["images"])
        a, b = n * rank // size, n * (rank + 1) // size
        try:
            pixels = shards.scan_pixels(_scan_source(d), a, b, nan_ok=d["images"].nan_fill is not None,
                                        faint=shards.faint_below(dtype))
            sigs = duplicates.signatures(d["images"], a, b) if want else None
        except OSError as exc:
            raise DmhpcError(f"{d['names']['images']}: cannot read ({exc})") from None
        found.append((pixels, sigs))
    return found


def _check_pixels(domains: list[dict], scans: list[list], dtype: str) -> None:
    """Combine every rank's pixel scans; the same outcome on every rank."""
    for k, d in enumerate(domains):
        scan = shards.PixelScan.merged(shards.PixelScan(*scan[k][0]) for scan in scans)
        hint = " (--nan-fill replaces NaN only)" if d["images"].nan_fill is not None else \
            " (survey cutouts padded with NaN: --nan-fill 0)" if scan.nans else ""
        first_file = str(d["images"].files[scan.first]) if d["cutouts"] and scan.first >= 0 else None
        try:
            shards.check_pixels(scan, dtype, d["names"]["images"], first_file)
        except DmhpcError as exc:
            raise DmhpcError(f"{exc}{hint if 'NaN' in str(exc) else ''}") from None


def _check_one_version(seen: list[dict]) -> None:
    """Refuse inputs that the ranks opened in different versions (`seen`: each rank's {path:
    `file_version`}): each rank opens them itself, at its own moment, and a file replaced in
    between (a render writing it again) was converted half from each version, where only the rank
    that checksums it checks it again, against the version it opened itself. Size and time only:
    device and inode numbers differ between nodes on some file systems (FUSE mounts, inputs staged
    to each node's disk), and a file written again has another time."""
    for rank, versions in enumerate(seen[1:], start=1):
        for path, version in versions.items():
            if path not in seen[0] or version[2:] != seen[0][path][2:]:  # (a link pointed elsewhere between)
                raise DmhpcError(f"{path}: written again or replaced while the ranks opened it (rank {rank} read "
                                 f"another version than rank 0); nothing written: prepare it again once it is "
                                 f"complete")


def _input_files(domains: list[dict]) -> list[Path]:
    """Every distinct input file (a file shared by domains is read once), in a fixed order."""
    return list(dict.fromkeys(p for d in domains for _, p in d["inputs"]))


def _hash_in_background(paths: list[Path], stop: threading.Event, opened: dict):
    """Start checksumming `paths` in a thread (hashlib releases the GIL, so it overlaps the
    conversion); returns a function that waits and gives {path: sha256}, called once the shards are
    written: a file written again or replaced since it was opened (`opened`: {path: `file_version`})
    is refused (the checksum, read apart from the pixels, would describe another version of it than
    the data set holds)."""
    versions = {path: opened[path] for path in paths}
    digests, failures = {}, []

    def run():
        for path in paths:
            try:
                digests[path] = shards.file_sha256(path, stop)
            except OSError as exc:
                failures.append(f"{path}: cannot read ({exc.strerror})")
                return
            except Exception as exc:  # (a MemoryError): ended the thread unsaid, a KeyError at the manifest
                failures.append(f"{path}: cannot checksum ({type(exc).__name__}: {exc})")
                return

    thread = threading.Thread(target=run, name="dmhpc-input-sha256", daemon=True)
    thread.start()

    def result() -> dict:
        thread.join()
        if failures:
            raise DmhpcError(failures[0])
        for path, version in versions.items():
            try:
                changed = file_version(path.stat()) != version
            except OSError:
                changed = True
            if changed:
                raise DmhpcError(f"{path}: written again or replaced while it was converted; nothing written: "
                                 f"prepare it again once it is complete")
        return digests

    return result


def prepare(domains: list[DomainSpec], options: Options, comm=None) -> list[dict]:
    """Convert each domain; returns the manifests (on rank 0; None elsewhere). Python API of the command."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    with contextlib.ExitStack() as held:  # rank 0's locks on the output folders
        shards.check_fractions(options.fractions)
        if options.dtype in shards.DTYPES:  # (an unknown one is plan_dataset's to refuse)
            check_nan_fill(options.nan_fill, options.dtype)
        opened = _agree(comm, lambda: [_open_domain(spec, options, rank == 0) for spec in domains])
        # The input checksums are only needed for the manifests: compute them (each file on one
        # rank) while the pixels are checked and the shards written.
        stop = threading.Event()
        files = _input_files(opened)
        versions = {p: v for d in opened for p, v in d["versions"].items()}
        seen = _allgather(comm, versions)
        _agree(comm, lambda: _check_one_version(seen))
        input_digests = _hash_in_background([p for j, p in enumerate(files) if j % size == rank], stop, versions)
        try:
            want = [d["objects"] is None for d in opened]
            scans = _allgather(comm, _agree(comm, lambda: _scan(opened, rank, size, want, options.dtype)))
            _check_pixels(opened, scans, options.dtype)
            sigs = [np.concatenate([scan[k][1] for scan in scans]) if want[k] else None for k in range(len(opened))]
            candidates = [duplicates.candidates(s) if s is not None else None for s in sigs]
            shares = _allgather(comm, _agree(comm, lambda: _hash_share(opened, candidates, rank, size)))
            hashes = [np.concatenate([share[k] for share in shares]) if want[k] else None for k in range(len(opened))]
            grouped, together = _agree(comm, lambda: _group_domains(opened, options, sigs, candidates, hashes))
            if rank == 0:
                for names in together:
                    print(f"dmhpc prepare: {' and '.join(names)}: as many images each, taken as the same objects "
                          f"row by row: copies found in any are one object in all", flush=True)
                paired = {name for names in together for name in names}
                for d in opened if options.group_duplicates else ():
                    if d["name"] not in paired:
                        # Prepared alone, twins got their own split: a noisy set, whose noise hid its
                        # copies, split apart from the pristine set grouped in another run.
                        print(f"dmhpc prepare: note: {d['name']}: its copies are grouped within it alone; a domain "
                              f"of the same objects (its noisy or pristine twin) shares these groups, and the "
                              f"split, only when prepared in the same run", flush=True)
            planned = _agree(comm, lambda: _distinct_outputs([_plan_domain(d, options, g)
                                                              for d, g in zip(opened, grouped)]))
            if rank == 0:
                for d in planned:
                    n, objects = d["copies"]
                    if n and not options.group_duplicates:
                        print(f"dmhpc prepare: warning: {d['name']}: {n} images are flips or rotations of {objects} "
                              f"others and have no object ids, so copies of one object can land in different "
                              f"splits; --group-duplicates makes each group one object", file=sys.stderr, flush=True)

            # Validated: now write. Rank 0 makes each directory's staging folder, the shards of all
            # domains are dealt round-robin to the ranks and written there; rank 0 writes each
            # manifest from everyone's results, and moves each new data set into place.
            created = [not d["out"].exists() for d in planned]
            _agree(comm, lambda: _claim_outputs(planned, created, options.overwrite, held) if rank == 0 else None)
            if comm is not None:
                try:
                    _check_one_folder(comm, planned)
                except DmhpcError:
                    if rank == 0:
                        for d, made in zip(planned, created):
                            shards.abandon_dataset(d["out"], remove_dir=made)
                    raise
            tasks = [(k, s) for k, d in enumerate(planned) for s in range(d["plan"].num_shards)]
            mine = tasks[rank::size]

            def write():
                try:
                    written = shards.write_shards(
                        [(planned[k]["plan"], planned[k]["out"] / shards.STAGING, s) for k, s in mine],
                        progress=rank == 0,
                    )
                except OSError as exc:
                    raise DmhpcError(f"{exc.filename or 'output'}: cannot write ({exc.strerror})") from None
                return dict(zip(mine, written))

            results, digests = {}, {}
            try:
                for done in _allgather(comm, _agree(comm, write)):
                    results.update(done)
                # An input unreadable now (the checksums run beside the writes) fails the data set too.
                for done in _allgather(comm, _agree(comm, input_digests)):
                    digests.update(done)
            except Exception:
                # Not only a DmhpcError: an input reader's own error, a MemoryError. (An interrupt
                # leaves the staged shards, which the next run finishes.)
                if rank == 0:
                    for d, made in zip(planned, created):
                        shards.abandon_dataset(d["out"], remove_dir=made)
                raise
        finally:
            stop.set()

        def finish():
            manifests = []
            for k, d in enumerate(planned):
                inputs = [{"role": role, "file": str(p), "sha256": digests[p]} for role, p in d["inputs"]]
                if d["cutouts"]:  # each folder the catalog's file column reaches, by first use, with its count
                    folders = Counter(str(f.parent.resolve()) for f in d["images"].files)
                    inputs += [{"role": "cutouts", "file": folder, "count": n} for folder, n in folders.items()]
                manifests.append(
                    shards.finish_dataset(
                        d["plan"], d["out"] / shards.STAGING, [results[k, s] for s in range(d["plan"].num_shards)],
                        inputs=inputs, layout=d["layout"],
                    )
                )
            shards.mark_datasets([d["out"] for d in planned])
            return manifests

        try:
            manifests = _agree(comm, lambda: finish() if rank == 0 else None)
        except Exception:
            # A write failed (a full disk, say): leave no shard of this conversion behind.
            if rank == 0:
                for d, made in zip(planned, created):
                    shards.abandon_dataset(d["out"], remove_dir=made)
            raise
        # Every manifest written before any data set is replaced: a failure until now left them all
        # as they were. One in the moves themselves (renames) is said, and nothing is abandoned.
        _agree(comm, lambda: shards.publish_datasets([d["out"] for d in planned]) if rank == 0 else None)
        if rank == 0:
            for d, m in zip(planned, manifests):
                split = ", ".join(f"{s} {b - a}" for s, (a, b) in m["rows"].items())
                what = "" if m["labelled"] else ", unlabelled"
                print(f"{d['name']}: {m['count']} images ({d['layout']}{what}) -> {d['out']}/ "
                      f"({len(m['shards'])} shards; {split})")
                # A share that rounded to no image (few images): said in the summary only, the set was
                # refused by the trainer at its start. (A share of 0 asked for none: a set to predict on.)
                empty = [s for s, (a, b) in m["rows"].items() if a == b and m["fractions"][s] > 0]
                if empty:
                    print(f"dmhpc prepare: warning: {d['name']}: its {' and '.join(empty)} split"
                          f"{'s are' if len(empty) > 1 else ' is'} empty, {m['count']} images too few for "
                          f"--fractions {','.join(f'{f:g}' for f in m['fractions'].values())}; the trainer needs "
                          f"rows in every split", file=sys.stderr, flush=True)
        return manifests


def _check_one_folder(comm, planned: list[dict]) -> None:
    """Refuse ranks that do not see the staging folders rank 0 made: each would write its shards
    into a folder of its own (--out on node-local scratch, or a relative --out from other working
    directories), and rank 0 published its own share as the whole data set. Rank 0 leaves a file of
    a random name in each; every rank looks for it, before anything is written."""
    rank = comm.Get_rank()

    def leave() -> list[str]:
        names = []
        for d in planned:
            try:
                fd, path = tempfile.mkstemp(prefix=".ranks.", suffix=TEMP_SUFFIX, dir=d["out"] / shards.STAGING)
            except OSError as exc:
                raise DmhpcError(f"{d['out'] / shards.STAGING}: cannot write ({exc.strerror})") from None
            os.close(fd)
            names.append(path)
        return names

    names = comm.bcast(_agree(comm, lambda: leave() if rank == 0 else None), root=0)

    def look():
        for d, path in zip(planned, names):
            if not Path(d["out"], shards.STAGING, Path(path).name).exists():
                raise DmhpcError(f"{d['out']}: rank {rank} (on {socket.gethostname()}) does not see the output folder "
                                 f"rank 0 made: every rank must write to one shared file system; give --out an "
                                 f"absolute path that every node shares")

    _agree(comm, look)
    if rank == 0:
        for path in names:
            os.unlink(path)


def _distinct_outputs(planned: list[dict]) -> list[dict]:
    """`planned`, refused where two domains' folders are one (a link): the second's lock was said to
    be "another prepare", this process itself."""
    seen: dict[str, Path] = {}
    for d in planned:
        other = seen.setdefault(os.path.realpath(d["out"]), d["out"])
        if other != d["out"]:
            raise DmhpcError(f"{d['out']}: the same folder as {other} (a link?); each domain needs a folder of its own")
    return planned


def _claim_outputs(planned: list[dict], created: list[bool], overwrite: bool, held: contextlib.ExitStack) -> None:
    """Rank 0: lock each output folder for this conversion (a second `prepare` into it stops with a
    one-line error), check it again under the lock (another conversion may have finished into it
    since the first check: its data set is never replaced unasked), and make its staging folder."""
    locked, started = [], []
    try:
        for d in planned:
            # The lock file lies beside the folder: lock first, so a folder made here is never left
            # behind by a lock that failed (a full disk), nor one another conversion has locked.
            held.enter_context(locked_directory(d["out"], "dmhpc prepare"))
            locked.append(d)
            try:
                d["out"].mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DmhpcError(f"{d['out']}: cannot create: {exc.strerror}") from None
            shards.check_output_dir(d["out"], overwrite)
        for d in planned:
            shards.start_dataset(d["out"])
            started.append(d["out"])
    except DmhpcError:
        for d, made in zip(locked, created):
            if d["out"] in started:
                shards.abandon_dataset(d["out"], remove_dir=made)
            elif made and d["out"].is_dir() and not any(d["out"].iterdir()):
                d["out"].rmdir()
        raise


# ----------------------------------------------------------------------------- the command


def _parse_fractions(text: str) -> tuple:
    try:
        return shards.check_fractions(text.split(","))
    except DmhpcError as exc:
        raise DmhpcError(f"--{exc}") from None  # ("fractions 0.8,0.1,0.2: need ...")


def _domains(args) -> list[DomainSpec]:
    one = {k: getattr(args, k) for k in ("images", "labels", "objects", "catalog", "cutouts")}
    options = {f"--{k.replace('_', '-')}": getattr(args, k) for k in (*one, "id_column", "label_column", "file_column")}
    if args.data_config is not None:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise DmhpcError(f"{', '.join(given)} cannot be combined with --data-config (it names the files)")
        return load_data_config(args.data_config, args.root, args.out, args.set)
    if args.root is not None:
        raise DmhpcError("--root needs --data-config")
    if args.set:
        raise DmhpcError("--set needs --data-config (it changes the config's entries)")
    if args.images is None and args.catalog is None:
        raise DmhpcError("missing --images or --catalog (or give --data-config)")
    if args.catalog is None:
        given = [f"--{k.replace('_', '-')}" for k in CATALOG_KEYS if getattr(args, k) is not None]
        if given:
            raise DmhpcError(f"{', '.join(given)} read{'s' if len(given) == 1 else ''} a catalog only: give --catalog"
                             + (", or the labels with --labels" if args.label_column is not None else ""))
    if args.images is not None:
        given = [f"--{k.replace('_', '-')}" for k in CUTOUT_KEYS if getattr(args, k) is not None]
        if given:
            raise DmhpcError(f"{', '.join(given)} name{'s' if len(given) == 1 else ''} cutout files to read, and "
                             f"--images gives the images: give one or the other")
    if args.out is None:
        raise DmhpcError("missing --out")
    # Named as its folder ("--out ." too, whose name is empty: the summary named nothing).
    return [DomainSpec(name=Path(os.path.abspath(args.out)).name or str(args.out), out=Path(args.out),
                       id_column=args.id_column if args.id_column is not None else "id",
                       label_column=args.label_column, file_column=args.file_column,
                       **{k: (Path(v) if v is not None else None) for k, v in one.items()})]


def prepare_arguments(parser) -> None:
    one = parser.add_argument_group("one domain")
    one.add_argument("--images", metavar="X.npy|X.fits",
                     help="images: .npy (N, C, H, W) or (N, H, W, C), float16/32/64, or a FITS cube of either layout")
    one.add_argument("--labels", metavar="Y.npy",
                     help="labels .npy, (N,) whole numbers 0 to K-1 (K: --num-classes); without labels (and "
                          "without --label-column) the data set is unlabelled")
    one.add_argument(
        "--objects",
        metavar="O.npy",
        help="object ids .npy, (N,): images of one object (augmented copies, views) share an id and "
        "land in one split; default: each image its own object, stored as its input row (global index; "
        "a catalog's ids name images, not objects; --group-duplicates joins exact flips and rotations)",
    )
    cat = parser.add_argument_group("a catalog (CSV, ECSV, FITS, Parquet or HDF5 table)")
    cat.add_argument("--catalog", metavar="TABLE", help="one row per image: ids (and labels, cutout files); "
                     "with --images its rows are the images' rows, else each row names a FITS cutout")
    cat.add_argument("--id-column", metavar="NAME", help="image id column, one id per row, kept in the shards for "
                     "predict's catalog; not an object id: see --objects (default: id)")
    cat.add_argument("--label-column", metavar="NAME", help="class label column (default: none, unlabelled)")
    cat.add_argument("--file-column", metavar="NAME", help="cutout file column (default: ID.fits in --cutouts)")
    cat.add_argument("--cutouts", metavar="DIR", help=CUTOUTS_HELP)
    many = parser.add_argument_group("domains named by a data config")
    many.add_argument("--data-config", metavar="YAML", help="YAML naming each domain's files (configs/data/*.yaml)")
    many.add_argument("--root", metavar="DIR", help="directory holding the config's files (default: the config's root)")
    many.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override an entry of the data config, e.g. "
                           "domains.sdss.images=SimReal_TARGET_x_postmergers_SDSS.npy (repeatable)")
    parser.add_argument(
        "--out", metavar="DIR", help="output data-set directory (with --data-config: the parent of one directory per domain)"
    )
    d = Options()  # the defaults have one home
    parser.add_argument("--shard-size", type=int, metavar="N", default=d.shard_size,
                        help=f"rows per shard (default {d.shard_size})")
    parser.add_argument("--seed", type=int, default=d.seed, metavar="S",
                        help=f"seed of the split and of the training-row order (default {d.seed})")
    fractions = ",".join(f"{f:g}" for f in d.fractions)
    parser.add_argument("--fractions", default=fractions, metavar="TRAIN,VAL,TEST",
                        help=f"train,val,test fractions of the images (default {fractions})")
    parser.add_argument("--layout", choices=LAYOUTS, help="input layout (default: detected from the shape)")
    parser.add_argument(
        "--dtype", choices=shards.DTYPES, default=d.dtype, help=f"stored pixel type (default {d.dtype})"
    )
    parser.add_argument("--num-classes", type=int, default=d.num_classes, metavar="K",
                        help=f"number of classes, 2 to {shards.MAX_CLASSES} (default {d.num_classes})")
    parser.add_argument("--group-duplicates", action="store_true",
                        help="without object ids: make images that are exact flips or 90-degree rotations of "
                             "each other one object, so they share a split; domains of a data config with as many "
                             "images are grouped together, row by row")
    parser.add_argument("--nan-fill", type=float, metavar="VALUE",
                        help="replace NaN pixels (survey cutouts padded at the footprint's edge) by VALUE; "
                             "default: refuse them")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing data set; files dmhpc did not write are left in place",
    )


def prepare_main(args) -> int:
    comm = world_comm()
    try:
        options = Options(shard_size=args.shard_size, seed=args.seed, fractions=_parse_fractions(args.fractions),
                          layout=args.layout, dtype=args.dtype, num_classes=args.num_classes,
                          overwrite=args.overwrite, group_duplicates=args.group_duplicates, nan_fill=args.nan_fill)
        prepare(_agree(comm, lambda: _domains(args)), options, comm)
    except DmhpcError:
        # Every rank holds the same message; one line from rank 0 is enough.
        if comm is None or comm.Get_rank() == 0:
            raise
        return 1
    except KeyboardInterrupt:
        if comm is None:
            raise
        # Ctrl-C reaches every rank (mpiexec passes it on): one line, as a serial run says it, not a
        # traceback from each. The staged shards are left for the next run to finish.
        if comm.Get_rank() == 0:
            print("dmhpc prepare: interrupted", file=sys.stderr)
        abort_all(comm, 130)
    except BaseException:
        if comm is None:
            raise
        # An unexpected failure on one rank: end all of them rather than let the others wait.
        traceback.print_exc()
        abort_all(comm)
    return 0
