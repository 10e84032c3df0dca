"""`dmhpc prepare`: convert .npy images and labels to sharded HDF5 data sets (docs/data-format.md).

One domain from --images/--labels[/--objects], or every domain a data config names (each to
OUT/<domain>/). Inputs are memory-mapped and converted a block of rows at a time, so files larger
than memory convert in bounded memory. Under `mpiexec -n K` the checks and shards are divided
among the ranks; the bytes written are those of a serial run.

Every input is validated, on every rank, before anything is written: a bad input leaves no output
directory and no partial file. Ranks agree on each step's outcome before the next, so an error on
one rank stops them all instead of leaving the others waiting.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import yaml

from dmhpc.data import shards
from dmhpc.errors import DmhpcError
from dmhpc.mpi import world_comm

LAYOUTS = ("NCHW", "NHWC")
CONFIG_KEYS = ("root", "out", "domains")
DOMAIN_KEYS = ("images", "labels", "objects")  # objects optional
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Environment variables set by the launchers: MPICH/Intel MPI/srun --mpi=pmi2, Open MPI, PMIx.


# ----------------------------------------------------------------------------- inputs


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a .npy file; DmhpcError naming the file if it is missing or not a usable .npy."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DmhpcError(f"{name}: no such file")
    if not p.is_file():
        raise DmhpcError(f"{name}: not a file")
    try:
        with open(p, "rb") as f:
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as exc:
        raise DmhpcError(f"{name}: cannot read ({exc.strerror})") from None
    if magic != np.lib.format.MAGIC_PREFIX:
        raise DmhpcError(f"{name}: not a .npy file")
    try:
        array = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:  # truncated, or Python objects that cannot be mapped
        raise DmhpcError(f"{name}: cannot read ({exc})") from None
    if array.ndim > 1 and not array.flags.c_contiguous:
        # Gathering rows from a column-major memmap reads the whole file for every block.
        raise DmhpcError(f"{name}: Fortran-ordered array; save it with np.save(path, np.ascontiguousarray(a))")
    return array


def detect_layout(shape: tuple, layout: str | None, name: str) -> str:
    """NCHW or NHWC for an image array of `shape`: `layout` if given, else detected.

    Detected when exactly one reading has 1 to 4 channels and square images.
    """
    if len(shape) != 4:
        raise DmhpcError(
            f"{name}: {len(shape)} dimensions {tuple(shape)}; expected 4: (N, C, H, W) or (N, H, W, C)"
        )
    _, a, b, c = shape
    if layout is not None:
        channels = a if layout == "NCHW" else c
        if not 1 <= channels <= 4:
            raise DmhpcError(
                f"{name}: {channels} channels in layout {layout} (shape {tuple(shape)}); expected 1 to 4"
            )
        return layout
    nchw = 1 <= a <= 4 and b == c
    nhwc = 1 <= c <= 4 and a == b
    if nchw and nhwc:
        raise DmhpcError(f"{name}: shape {tuple(shape)} reads as NCHW or NHWC; pass --layout")
    if not (nchw or nhwc):
        raise DmhpcError(
            f"{name}: shape {tuple(shape)} has no channel axis of 1 to 4 beside square images;"
            " expected (N, C, H, W) or (N, H, W, C), or pass --layout"
        )
    return "NCHW" if nchw else "NHWC"


def load_data_config(path: str | os.PathLike, root: str | None = None, out: str | None = None) -> list[dict]:
    """Domains named by a data config: [{name, images, labels, objects or None, out}].

    File paths are relative to `root` (the config's, or the one given); `root` and `out` are
    relative to the working directory. Unknown or missing keys raise DmhpcError naming the key
    and the config file.
    """
    name = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DmhpcError(f"{name}: no such data config") from None
    except OSError as exc:
        raise DmhpcError(f"{name}: cannot read ({exc.strerror})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DmhpcError(f"{name}: not valid YAML ({' '.join(str(exc).split())})") from None

    def mapping(value, where, keys, required):
        if not isinstance(value, dict):
            raise DmhpcError(f"{name}: {where} must be a mapping of {', '.join(keys)}")
        for key in value:
            if key not in keys:
                raise DmhpcError(f"{name}: unknown key {where_key(where, key)!r} (expected {', '.join(keys)})")
        for key in required:
            if key not in value:
                raise DmhpcError(f"{name}: missing key {where_key(where, key)!r}")
            if not isinstance(value[key], str) and key != "domains":
                raise DmhpcError(f"{name}: key {where_key(where, key)!r} must be a path")

    def where_key(where, key):
        return key if where == "the config" else f"{where}.{key}"

    mapping(config, "the config", CONFIG_KEYS, CONFIG_KEYS)
    domains = config["domains"]
    if not isinstance(domains, dict) or not domains:
        raise DmhpcError(f"{name}: key 'domains' must map each domain's name to its files")
    root_dir = Path(root if root is not None else config["root"])
    out_dir = Path(out if out is not None else config["out"])
    result = []
    for domain, files in domains.items():
        if not isinstance(domain, str) or not _DOMAIN_NAME.fullmatch(domain):
            raise DmhpcError(f"{name}: domain name {domain!r}: use letters, digits, '_', '-', '.'")
        mapping(files, f"domains.{domain}", DOMAIN_KEYS, ("images", "labels"))
        if "objects" in files and not isinstance(files["objects"], str):
            raise DmhpcError(f"{name}: key 'domains.{domain}.objects' must be a path")
        result.append(
            {
                "name": domain,
                **{k: (root_dir / files[k] if k in files else None) for k in DOMAIN_KEYS},
                "out": out_dir / domain,
            }
        )
    return result


def _open_domain(domain: dict, args, fractions: tuple) -> dict:
    """Open and check one domain's inputs (all but the pixels) and draw its split."""
    raw = open_npy(domain["images"])
    labels = open_npy(domain["labels"])
    objects = open_npy(domain["objects"]) if domain["objects"] is not None else None
    names = {k: str(domain[k]) for k in DOMAIN_KEYS}
    layout = detect_layout(raw.shape, args.layout, names["images"])
    images = raw if layout == "NCHW" else raw.transpose(0, 3, 1, 2)
    plan = shards.plan_dataset(
        images, labels, objects, shard_size=args.shard_size, seed=args.seed, fractions=fractions,
        dtype=args.dtype, num_classes=args.num_classes, names=names,
    )
    shards.check_output_dir(domain["out"], args.overwrite)
    return {**domain, "raw": raw, "layout": layout, "plan": plan}


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


# ----------------------------------------------------------------------------- the command


def _parse_fractions(text: str) -> tuple:
    try:
        return shards.check_fractions(text.split(","))
    except DmhpcError as exc:
        raise DmhpcError(f"--fractions {exc}") from None


def _domains(args) -> list[dict]:
    if args.data_config is not None:
        given = [f"--{k}" for k in DOMAIN_KEYS if getattr(args, k) is not None]
        if given:
            raise DmhpcError(f"{', '.join(given)} cannot be combined with --data-config (it names the files)")
        return load_data_config(args.data_config, args.root, args.out)
    if args.root is not None:
        raise DmhpcError("--root needs --data-config")
    missing = [f"--{k}" for k in ("images", "labels", "out") if getattr(args, k) is None]
    if missing:
        raise DmhpcError(f"missing {', '.join(missing)} (or give --data-config)")
    return [
        {
            "name": Path(args.out).name,
            "images": Path(args.images),
            "labels": Path(args.labels),
            "objects": Path(args.objects) if args.objects is not None else None,
            "out": Path(args.out),
        }
    ]


def _scan_pixels(domains: list[dict], rank: int, size: int) -> list:
    """This rank's share of the pixel checks: `scan_pixels` of its slice of each domain's images."""
    found = []
    for d in domains:
        n = d["raw"].shape[0]
        try:
            found.append(shards.scan_pixels(d["raw"], n * rank // size, n * (rank + 1) // size))
        except OSError as exc:
            raise DmhpcError(f"{d['images']}: cannot read ({exc})") from None
    return found


def _check_pixels(domains: list[dict], scans: list[list], dtype: str) -> None:
    """Combine every rank's pixel scans; the same outcome on every rank."""
    for k, d in enumerate(domains):
        parts = [scan[k] for scan in scans]
        firsts = [first for _, first, _ in parts if first >= 0]
        shards.check_pixels(
            sum(bad for bad, _, _ in parts), min(firsts, default=-1), max(big for _, _, big in parts),
            dtype, str(d["images"]),
        )


def _input_files(domains: list[dict]) -> list[Path]:
    """Every distinct input file (a file shared by domains is read once), in a fixed order."""
    files = [d[k].resolve() for d in domains for k in DOMAIN_KEYS if d[k] is not None]
    return list(dict.fromkeys(files))


def _hash_in_background(paths: list[Path], stop: threading.Event):
    """Start checksumming `paths` in a thread (hashlib releases the GIL, so it overlaps the
    conversion); returns a function that waits and gives {path: sha256}."""
    digests, failures = {}, []

    def run():
        for path in paths:
            try:
                digests[path] = shards.file_sha256(path, stop)
            except OSError as exc:
                failures.append(f"{path}: cannot read ({exc.strerror})")
                return

    thread = threading.Thread(target=run, name="dmhpc-input-sha256", daemon=True)
    thread.start()

    def result() -> dict:
        thread.join()
        if failures:
            raise DmhpcError(failures[0])
        return digests

    return result


def _prepare(args, comm) -> None:
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())

    def open_all():
        fractions = _parse_fractions(args.fractions)
        return [_open_domain(d, args, fractions) for d in _domains(args)]

    domains = _agree(comm, open_all)
    # The input checksums are only needed for the manifests: compute them (each file on one
    # rank) while the pixels are checked and the shards written.
    stop = threading.Event()
    files = _input_files(domains)
    input_digests = _hash_in_background([p for j, p in enumerate(files) if j % size == rank], stop)
    try:
        scans = _allgather(comm, _agree(comm, lambda: _scan_pixels(domains, rank, size)))
        _check_pixels(domains, scans, args.dtype)

        # Validated: now write. Rank 0 clears the directories, then the shards of all domains are
        # dealt round-robin to the ranks; rank 0 writes each manifest from everyone's results.
        created = [not d["out"].exists() for d in domains]
        _agree(comm, lambda: [shards.reset_output_dir(d["out"]) for d in domains] if rank == 0 else None)
        tasks = [(k, s) for k, d in enumerate(domains) for s in range(d["plan"].num_shards)]
        mine = tasks[rank::size]

        def write():
            try:
                written = shards.write_shards(
                    [(domains[k]["plan"], domains[k]["out"], s) for k, s in mine], progress=rank == 0
                )
            except OSError as exc:
                raise DmhpcError(f"{exc.filename or 'output'}: cannot write ({exc.strerror})") from None
            return dict(zip(mine, written))

        results = {}
        try:
            for done in _allgather(comm, _agree(comm, write)):
                results.update(done)
        except DmhpcError:
            if rank == 0:
                for d, made in zip(domains, created):
                    shards.remove_dataset_files(d["out"], remove_dir=made)
            raise
        digests = {}
        for done in _allgather(comm, _agree(comm, input_digests)):
            digests.update(done)
    finally:
        stop.set()

    def finish():
        manifests = []
        for k, d in enumerate(domains):
            inputs = [
                {"role": role, "file": str(d[role].resolve()), "sha256": digests[d[role].resolve()]}
                for role in DOMAIN_KEYS
                if d[role] is not None
            ]
            manifests.append(
                shards.finish_dataset(
                    d["plan"], d["out"], [results[k, s] for s in range(d["plan"].num_shards)],
                    inputs=inputs, layout=d["layout"],
                )
            )
        return manifests

    try:
        manifests = _agree(comm, lambda: finish() if rank == 0 else None)
    except DmhpcError:
        # A write failed (a full disk, say): leave no shard of this conversion behind.
        if rank == 0:
            for d, made in zip(domains, created):
                shards.remove_dataset_files(d["out"], remove_dir=made)
        raise
    if rank == 0:
        for d, m in zip(domains, manifests):
            split = ", ".join(f"{s} {b - a}" for s, (a, b) in m["rows"].items())
            shards_written = len(m["shards"])
            print(f"{d['name']}: {m['count']} images ({d['layout']}) -> {d['out']}/ ({shards_written} shards; {split})")


def prepare_arguments(parser) -> None:
    one = parser.add_argument_group("one domain")
    one.add_argument("--images", metavar="X.npy", help="images .npy, (N, C, H, W) or (N, H, W, C), float16/32/64")
    one.add_argument("--labels", metavar="Y.npy", help="labels .npy, (N,) whole numbers 0 to K-1 (K: --num-classes)")
    one.add_argument(
        "--objects",
        metavar="O.npy",
        help="object ids .npy, (N,): images of one object (augmented copies, views) share an id and "
        "land in one split; default: each image its own object",
    )
    many = parser.add_argument_group("domains named by a data config")
    many.add_argument("--data-config", metavar="YAML", help="YAML naming each domain's files (configs/data/*.yaml)")
    many.add_argument("--root", metavar="DIR", help="directory holding the config's files (default: the config's root)")
    parser.add_argument(
        "--out", metavar="DIR", help="output data-set directory (with --data-config: the parent of one directory per domain)"
    )
    parser.add_argument("--shard-size", type=int, metavar="N", default=4096, help="rows per shard (default 4096)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the split and of the training-row order (default 0)"
    )
    parser.add_argument(
        "--fractions", default="0.7,0.1,0.2", metavar="TRAIN,VAL,TEST",
        help="train,val,test fractions of the images (default 0.7,0.1,0.2)",
    )
    parser.add_argument("--layout", choices=LAYOUTS, help="input layout (default: detected from the shape)")
    parser.add_argument(
        "--dtype", choices=shards.DTYPES, default="float32", help="stored pixel type (default float32)"
    )
    parser.add_argument("--num-classes", type=int, default=2, metavar="K", help="number of classes (default 2)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing data set; files dmhpc did not write are left in place",
    )


def prepare_main(args) -> int:
    comm = world_comm()
    try:
        _prepare(args, comm)
    except DmhpcError:
        # Every rank holds the same message; one line from rank 0 is enough.
        if comm is None or comm.Get_rank() == 0:
            raise
        return 1
    except BaseException:
        if comm is None:
            raise
        # An unexpected failure on one rank: end all of them rather than let the others wait.
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    return 0
