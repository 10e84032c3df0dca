"""The sharded data-set format (docs/data-format.md): write, read, verify, summarize.

Writing is split into steps so that `dmhpc prepare` can divide the shards among MPI ranks and
still produce the bytes of a serial run: `plan_dataset` (validate, draw the split), `write_shard`
(one shard and its partial statistics, by whichever rank), `finish_dataset` (combine in shard
order, write the manifest last). `write_dataset` runs them in one process.

The command `dmhpc info` lives here too; `dmhpc verify` is dmhpc/data/check.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import h5py
import numpy as np

from dmhpc import __version__
from dmhpc.checks import is_int, is_number
from dmhpc.data.inputs import LAYOUTS, check_pixel_dtype
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_path, atomic_write, file_version, fsync_directory, is_temporary, reserve
from dmhpc.progress import progress_bar

FORMAT = "dmhpc-shards"
_FORMAT_FIRST = re.compile(rb'\{\s*"format": ' + json.dumps(FORMAT).encode() + b",")  # how write_manifest begins
VERSION = 1
MANIFEST = "manifest.json"
CONTENT_KEY = "content_sha256"  # the manifest's last key: the SHA-256 of the rest (see load_manifest)
# A shard's SHA-256 of its rows (pixels as stored, labels, objects, index, ids), kept both in the shard
# (an HDF5 attribute) and in its manifest record: a reader opening a shard prepared again since it read
# the manifest compares the two (see RowReader._check_rows). Data sets of an older dmhpc have none.
ROWS_KEY = "rows_sha256"
UNLABELLED = -1  # the label of every image of an unlabelled data set
SPLITS = ("train", "val", "test")
DTYPES = ("float32", "float16")
# Defaults of a conversion (`dmhpc prepare`'s Options, write_dataset): rows per shard, and the train,
# val and test fractions of the objects.
SHARD_SIZE, SPLIT_FRACTIONS = 4096, (0.7, 0.1, 0.2)
MAX_CLASSES = 1000
ROW_KEYS = ("images", "labels", "objects", "index")  # what a shard holds per row (and "ids" where kept)

# Files this format writes. Names alone do not make them ours (another tool's manifest.json, someone's
# shard-00000.h5): a directory is a data set by its dmhpc manifest, and a conversion marks the one it
# moves its files into (INCOMPLETE, until its manifest is in place), so an interrupted one is known
# as dmhpc's and completed; anything else is someone else's, and never removed.
_OWN_FILE = re.compile(r"shard-\d{5,}\.h5|manifest\.json")
_SHARD_FILE = re.compile(r"shard-\d{5,}\.h5")
INCOMPLETE = ".dmhpc-incomplete"
# A conversion writes its shards and manifest into this folder inside the output folder, and moves
# them into place only once all are written: one that fails or is killed (a full disk, an input
# unreadable halfway, Ctrl-C) leaves the data set it was to replace whole.
STAGING = ".dmhpc-new"

# A chunk of about 1 MiB of whole images: big enough that a batch read is a few large copies,
# small enough that a short batch does not read much it does not need.
_CHUNK_BYTES = 1 << 20
# Rows gathered, converted and written at a time: bounds memory whatever the shard size.
_BLOCK_BYTES = 16 << 20


def shard_name(number: int) -> str:
    """File name of shard `number` in a data-set directory."""
    return f"shard-{number:05d}.h5"


def file_sha256(path: str | os.PathLike, stop: threading.Event | None = None) -> str | None:
    """Hex SHA-256 of a file's bytes, read in blocks; None if `stop` is set before the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            if stop is not None and stop.is_set():
                return None
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- validation


def check_fractions(fractions) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three non-negative numbers, train > 0, summing to 1."""
    said = ",".join(map(str, fractions)) if isinstance(fractions, (list, tuple)) else repr(fractions)
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DmhpcError(f"fractions {said}: expected three numbers train,val,test") from None
    if len(values) != 3 or not all(np.isfinite(values)):
        raise DmhpcError(f"fractions {said}: expected three numbers train,val,test")
    if min(values) < 0 or values[0] == 0 or abs(sum(values) - 1) > 1e-6:
        raise DmhpcError(
            f"fractions {','.join(f'{v:g}' for v in values)}: need train > 0, val and test >= 0, sum 1"
        )
    return values


def check_images(images, name: str = "images") -> None:
    """Validate an NCHW image array's shape and dtype (not its pixels: see `scan_pixels`)."""
    if images.ndim != 4:
        raise DmhpcError(f"{name}: {images.ndim} dimensions {tuple(images.shape)}; expected 4 (N, C, H, W)")
    if images.shape[0] == 0:
        raise DmhpcError(f"{name}: no images (shape {tuple(images.shape)})")
    if 0 in images.shape:
        raise DmhpcError(f"{name}: empty images (shape {tuple(images.shape)})")
    check_pixel_dtype(images.dtype, name)


def _whole_numbers(values: np.ndarray, name: str, what: str) -> np.ndarray:
    """`values` as int64, refusing fractions, NaN and non-numbers."""
    if values.dtype == bool:
        return values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.integer) and not np.issubdtype(values.dtype, np.floating):
        raise DmhpcError(f"{name}: dtype {values.dtype}; expected integer {what}")
    if np.issubdtype(values.dtype, np.floating):
        bad = np.flatnonzero(values != np.round(values))  # NaN compares unequal, so it is caught too
        if bad.size:
            raise DmhpcError(
                f"{name}: {bad.size} {what} are not whole numbers (first at index {bad[0]}: {values[bad[0]]})"
            )
    # Beyond int64 the cast wraps (uint64) or is undefined (float): distinct ids became one object.
    if np.issubdtype(values.dtype, np.floating):
        wide = values.astype(np.float64)  # (2**63 is inf as a float16: numpy's overflow warning)
        big = np.flatnonzero((wide >= 2.0 ** 63) | (wide < -(2.0 ** 63)))
    else:  # compared as integers: int64's largest is no float
        big = np.flatnonzero(values > np.iinfo(np.int64).max) if values.dtype.kind == "u" else np.array([], int)
    if big.size:
        raise DmhpcError(f"{name}: {big.size} {what} do not fit a 64-bit integer (first at index {big[0]}: "
                         f"{values[big[0]]})")
    return values.astype(np.int64)


def check_labels(labels, count: int, num_classes: int = 2, name: str = "labels") -> np.ndarray:
    """Validate class labels for `count` images; returns them as a 1-D int64 array."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DmhpcError(f"{name}: shape {labels.shape}; expected one label per image (N,)")
    if labels.shape[0] != count:
        raise DmhpcError(f"{name}: {labels.shape[0]} labels for {count} images")
    labels = _whole_numbers(labels, name, "labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        classes = ", ".join(str(k) for k in range(num_classes)) if num_classes <= 5 else f"0, ..., {num_classes - 1}"
        raise DmhpcError(
            f"{name}: {bad.size} labels outside {{{classes}}} (first at index {bad[0]}: {labels[bad[0]]});"
            " set the number of classes with --num-classes"
        )
    return labels


def check_objects(objects, count: int, name: str = "objects") -> np.ndarray:
    """Validate object ids for `count` images (None: each image its own object); returns int64."""
    if objects is None:
        return np.arange(count, dtype=np.int64)
    objects = np.asarray(objects)
    if objects.ndim != 1:
        raise DmhpcError(f"{name}: shape {objects.shape}; expected one object id per image (N,)")
    if objects.shape[0] != count:
        raise DmhpcError(f"{name}: {objects.shape[0]} object ids for {count} images")
    return _whole_numbers(objects, name, "object ids")


class PixelScan(NamedTuple):
    """What `scan_pixels` found in a range of images; `merged` adds up ranges (MPI ranks' shares)."""

    bad: int = 0          # NaN/Inf pixels
    first: int = -1       # the first image holding one, -1 if none
    largest: float = 0.0  # largest finite |pixel|
    faint: int = 0        # images whose brightest |pixel| is nonzero and below `faint` (where asked for)
    first_faint: int = -1
    nans: int = 0         # of `bad`, the NaN (--nan-fill's business; an Inf is not)

    @staticmethod
    def merged(scans: Iterable[PixelScan]) -> PixelScan:
        scans = list(scans)
        firsts = [s.first for s in scans if s.first >= 0]
        faint = [s.first_faint for s in scans if s.first_faint >= 0]
        return PixelScan(sum(s.bad for s in scans), min(firsts, default=-1),
                         max((s.largest for s in scans), default=0.0), sum(s.faint for s in scans),
                         min(faint, default=-1), sum(s.nans for s in scans))


def scan_pixels(images, start: int, stop: int, nan_ok: bool = False, faint: float = 0.0) -> PixelScan:
    """Scan images[start:stop] in blocks for NaN/Inf (with `nan_ok`, NaN filled as rows are read:
    Inf only), the largest finite |pixel|, and, with `faint`, the images whose brightest pixel lies
    below it (`faint_below(dtype)`). Blocks keep memory bounded for memory-mapped inputs."""
    per_image = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, _BLOCK_BYTES // per_image)
    bad, first, largest, n_faint, first_faint, nans = 0, -1, 0.0, 0, -1, 0
    for a in range(start, stop, step):
        block = np.asarray(images[a : min(a + step, stop)])
        if faint:
            brightest = np.abs(np.where(np.isfinite(block), block, 0)).reshape(len(block), -1).max(axis=1)
            dim = np.flatnonzero((brightest > 0) & (brightest < faint))  # blank images are exact
            n_faint += len(dim)
            first_faint = a + int(dim[0]) if first_faint < 0 and len(dim) else first_faint
        high, low = float(block.max()), float(block.min())
        if not (np.isfinite(high) and np.isfinite(low)):  # NaN and Inf show in max or min
            finite = np.isfinite(block)
            broken = ~(finite | np.isnan(block)) if nan_ok else ~finite
            if first < 0 and broken.any():
                first = a + int(np.flatnonzero(broken.reshape(len(block), -1).any(axis=1))[0])
            bad += int(np.count_nonzero(broken))
            nans += 0 if nan_ok else int(np.count_nonzero(np.isnan(block)))
            block = block[finite]
            high, low = (float(block.max()), float(block.min())) if block.size else (0.0, 0.0)
        largest = max(largest, high, -low)
    return PixelScan(bad, first, largest, n_faint, first_faint, nans)


def faint_below(dtype: str) -> float:
    """The brightest pixel under which an image loses detail when stored as `dtype`, for
    `scan_pixels`: 16 times its smallest normal number. float16: ~1e-3; below its smallest normal
    number it keeps an absolute precision of ~6e-8 only (rounding fluxes in Jy, ~1e-8, to 0);
    against a brightest pixel above this limit that error is under a tenth of float16's own
    relative rounding, so unit-scale images with sky noise around zero pass. float32: ~2e-37, for
    float64 inputs (fluxes in W m^-2 Hz^-1 per pixel, ~1e-45, became an all-zero data set)."""
    return 16 * float(np.finfo(dtype).tiny)


def check_pixels(scan: PixelScan, dtype: str, name: str = "images", first_file: str | None = None) -> None:
    """Refuse NaN/Inf pixels, pixels that would overflow the stored dtype, and images too faint for
    it (results of `scan_pixels`); `first_file`: the file image `scan.first` was read from, where
    each image has its own (cutouts)."""
    if scan.bad:
        raise DmhpcError(f"{name}: {scan.bad} NaN or Inf pixels (first in image {scan.first}"
                         f"{f', {first_file}' if first_file else ''})")
    limit = float(np.finfo(dtype).max)
    if scan.largest > limit:
        raise DmhpcError(f"{name}: pixel values up to {scan.largest:.4g} overflow {dtype} (max {limit:.4g})")
    if scan.faint:
        raise DmhpcError(f"{name}: {scan.faint} images (first: image {scan.first_faint}) have no pixel brighter than "
                         f"{faint_below(dtype):.2g}, where {dtype} keeps too few significant bits (small flux "
                         f"units round to 0); " + ("store float32 (--dtype float32) or scale the images up"
                                                   if dtype == "float16" else "scale the images up"))


# ----------------------------------------------------------------------------- the split


def split_order(objects: np.ndarray, seed: int, fractions) -> dict[str, np.ndarray]:
    """Global indices of each split, in row order, drawn by object id.

    The unique object ids are permuted with `seed`; walking that order, an object goes to train
    while train holds fewer images than its fraction of the total, then to val likewise, then to
    test. So an object's images (augmented copies, views) never straddle two splits, and the split
    depends only on (object ids, seed, fractions). Train rows are then shuffled with the same
    generator; val and test rows stay in input order.
    """
    train_f, val_f, _ = check_fractions(fractions)
    rng = np.random.default_rng(seed)
    ids, inverse, sizes = np.unique(objects, return_inverse=True, return_counts=True)
    perm = rng.permutation(len(ids))
    before = np.cumsum(sizes[perm]) - sizes[perm]  # images already assigned when each object comes
    n = len(objects)
    cut_train = int(np.searchsorted(before, round(train_f * n), side="left"))
    cut_val = max(cut_train, int(np.searchsorted(before, round((train_f + val_f) * n), side="left")))
    split_of_id = np.empty(len(ids), dtype=np.int8)
    split_of_id[perm[:cut_train]] = 0
    split_of_id[perm[cut_train:cut_val]] = 1
    split_of_id[perm[cut_val:]] = 2
    split_of_image = split_of_id[inverse.reshape(-1)]
    order = {name: np.flatnonzero(split_of_image == k) for k, name in enumerate(SPLITS)}
    order["train"] = rng.permutation(order["train"])
    return order


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything needed to write a data set's shards: the validated inputs and the row order."""

    images: object  # (N, C, H, W) float array or memmap (or a transposed view of one)
    labels: np.ndarray  # (N,) int64; UNLABELLED (-1) everywhere in an unlabelled data set
    objects: np.ndarray  # (N,) int64
    order: dict  # split -> global indices in row order
    shard_size: int
    seed: int
    fractions: tuple
    dtype: str
    num_classes: int
    ids: np.ndarray | None = None  # (N,) bytes: catalog ids, kept in the shards for catalogs
    source: str = "images"  # what error messages call the images (their file)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool(self.labels[0] != UNLABELLED)

    @property
    def count(self) -> int:
        return len(self.labels)

    @functools.cached_property  # (each shard takes its slice: built once, not once per shard)
    def rows(self) -> np.ndarray:
        """Global index of every row: train, then val, then test."""
        return np.concatenate([self.order[s] for s in SPLITS])

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)


def plan_dataset(
    images,
    labels,
    objects,
    *,
    shard_size: int,
    seed: int,
    fractions,
    dtype: str,
    num_classes: int,
    names: dict | None = None,
    ids=None,
) -> Plan:
    """Validate the arrays and settings (all but the pixels: see `scan_pixels`) and draw the split.

    `labels` None makes an unlabelled data set (labels stored as UNLABELLED). `ids`: one catalog id
    (str) per image, stored in the shards. `names` maps "images", "labels", "objects" to what error
    messages call them (file names).
    """
    names = {"images": "images", "labels": "labels", "objects": "objects", **(names or {})}
    if dtype not in DTYPES:
        raise DmhpcError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if int(shard_size) < 1:
        raise DmhpcError(f"shard size {shard_size}: must be at least 1")
    if not 2 <= int(num_classes) <= MAX_CLASSES:  # (the manifest counts each class of each split)
        raise DmhpcError(f"number of classes {num_classes}: expected 2 to {MAX_CLASSES}")
    # numpy's generators take no negative seed; said here, before any rank draws the split.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DmhpcError(f"seed {seed}: expected an integer >= 0")
    fractions = check_fractions(fractions)
    check_images(images, names["images"])
    n = images.shape[0]
    labels = np.full(n, UNLABELLED, np.int64) if labels is None else check_labels(labels, n, num_classes, names["labels"])
    objects = check_objects(objects, n, names["objects"])
    if ids is not None:
        ids = np.array([str(i).encode() for i in ids], dtype=bytes)
        if ids.shape != (n,):
            raise DmhpcError(f"{names['images']}: {len(ids)} ids for {n} images")
    order = split_order(objects, seed, fractions)
    if len(order["train"]) == 0:
        raise DmhpcError(f"{names['images']}: {n} images leave the training split empty")
    return Plan(images, labels, objects, order, int(shard_size), int(seed), fractions, dtype, int(num_classes), ids,
                names["images"])


def _combine(a, b):
    """Chan et al.'s parallel update of (count, mean, M2) per channel, in float64."""
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + delta * delta * (na * nb / n)


def _block_stats(block: np.ndarray):
    """(count, mean, M2) per channel of one block (at most 16 MiB of pixels), in float64: M2 from
    the deviations from the block's mean, one channel's float64 copy at a time. Blocks, then
    shards, are combined with Chan's formula.

    sum(x^2) - n mean^2 lost 2 log10(|mean| / std) digits: a constant channel of 1234.567 had a
    std of 2.7e-4, not 0 (which the trainer refuses to divide by), and pixels of 3e6 +- 1 a std
    5% low. The second pass costs about a quarter more than one.
    """
    n = block.shape[0] * block.shape[2] * block.shape[3]
    mean = np.add.reduce(block, axis=(0, 2, 3), dtype=np.float64) / n
    m2 = np.zeros(block.shape[1])
    for c in range(block.shape[1]):
        deviations = block[:, c].astype(np.float64)
        deviations -= mean[c]
        m2[c] = np.einsum("nhw,nhw->", deviations, deviations)  # (no BLAS: its sum's order follows its threads)
    return n, mean, m2


def _reserve(f: h5py.File, data_bytes: int) -> None:
    """Allocate the disk space a new HDF5 file will need (its data plus 1% and 1 MiB for metadata).

    A full disk or a quota raises OSError here, while the file is still tiny and HDF5 closes it
    cleanly. File systems without fallocate get glibc's emulation; where even that is refused the
    shard is written without a reserve.
    """
    reserve(f.id.get_vfd_handle(), int(data_bytes * 1.01) + (1 << 20))


def pixel_moments(images, rank: int = 0, world_size: int = 1) -> dict[int, tuple]:
    """{block: (count, mean, M2) per channel} for blocks rank, rank + world_size, ... of an (N, C, H, W)
    array-like. Blocks are a fixed number of rows set by the image shape alone, so that
    `statistics_of` combines the same blocks in the same order (to the same bits) on any number of
    ranks, each of which read only its share."""
    per_image = max(1, int(np.prod(images.shape[1:])) * 4)
    step = max(1, _BLOCK_BYTES // per_image)
    return {k: _block_stats(np.ascontiguousarray(images[a:a + step], dtype=np.float32))
            for k, a in enumerate(range(0, len(images), step)) if k % world_size == rank}


def statistics_of(moments: Mapping[int, tuple], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation from every block's `pixel_moments`."""
    stats = (0, np.zeros(channels), np.zeros(channels))
    for k in sorted(moments):
        stats = _combine(stats, moments[k])
    n, mean, m2 = stats
    return [float(v) for v in mean], [float(v) for v in np.sqrt(m2 / max(n, 1))]


def write_shard(plan: Plan, out_dir: str | os.PathLike, number: int) -> tuple[dict, tuple]:
    """Write shard `number` under a temporary name, checksum it, rename it into place.

    Returns its manifest record and the (count, mean, M2) statistics of its training rows.
    """
    out_dir = Path(out_dir)
    start = number * plan.shard_size
    stop = min(start + plan.shard_size, plan.count)
    index = plan.rows[start:stop]
    n = stop - start
    train_stop = min(max(len(plan.order["train"]) - start, 0), n)  # shard rows [0, train_stop) are train
    shape = tuple(plan.images.shape[1:])
    per_image = int(np.prod(shape)) * np.dtype(plan.dtype).itemsize
    chunk = max(1, min(n, _CHUNK_BYTES // per_image))
    chunks = -(-n // chunk)
    # As many chunks, of rows shared out evenly: HDF5 stores the last chunk whole, and 400 small
    # images in chunks of 341 took 70% more disk than their data.
    chunk = -(-n // chunks)
    step = chunk * max(1, _BLOCK_BYTES // (chunk * per_image))
    stats = (0, np.zeros(shape[0]), np.zeros(shape[0]))
    rows_digest = hashlib.sha256()
    final = out_dir / shard_name(number)
    # HDF5 that meets a failed write (a full disk, a quota) is left in a state that ends the process
    # in a segmentation fault. So the shard's space is reserved first (posix_fallocate: a full disk
    # is then one clean OSError before HDF5 writes anything large), the data written into it, and
    # the file cut back to what HDF5 used. Not fsynced: after a machine crash a damaged shard
    # fails its checksum, which verify and the trainer check.
    with atomic_path(final, durable=False) as partial:
        with h5py.File(partial, "w") as f:
            ids_bytes = 0 if plan.ids is None else n * plan.ids.dtype.itemsize
            _reserve(f, chunks * chunk * per_image + n * 3 * 8 + ids_bytes + 64 * chunks)
            images = f.create_dataset(
                "images", shape=(n, *shape), dtype=plan.dtype, chunks=(chunk, *shape), track_times=False
            )
            buffer = np.empty((min(step, n), *shape), dtype=plan.dtype)
            for a in range(0, n, step):
                rows = index[a : a + step]
                # Gather in increasing input order (sequential reads of a memmap), then put in row order.
                ascending = np.argsort(rows, kind="stable")
                block = buffer[: len(rows)]
                try:
                    block[ascending] = plan.images[rows[ascending]]
                except OSError as exc:
                    # The input's disk, not the output's: atomic_path says an OSError as the shard's write error.
                    raise DmhpcError(f"{plan.source}: cannot read ({exc.strerror or exc})") from None
                # The pixels were checked on an earlier read: an input saved again since (NaN, a value
                # past the dtype) was written, and its NaN statistics made a manifest no reader took.
                finite = np.isfinite(block.reshape(len(rows), -1)).all(axis=1)
                if not finite.all():
                    first = int(rows[np.flatnonzero(~finite)[0]])
                    raise DmhpcError(f"{plan.source}: image {first} holds NaN or Inf now, though it had none when "
                                     f"checked (saved again while it was read?); prepare again once it is whole")
                images[a : a + len(rows)] = block
                rows_digest.update(block)
                k = min(train_stop - a, len(rows))
                if k > 0:
                    stats = _combine(stats, _block_stats(block[:k]))
            for key, values in (("labels", plan.labels[index]), ("objects", plan.objects[index]), ("index", index)):
                values = np.ascontiguousarray(values, dtype=np.int64)
                f.create_dataset(key, data=values, track_times=False)
                rows_digest.update(values)
            if plan.ids is not None:
                f.create_dataset("ids", data=plan.ids[index], track_times=False)
                rows_digest.update(np.ascontiguousarray(plan.ids[index]))
            f.attrs[ROWS_KEY] = rows = rows_digest.hexdigest()
            f.flush()
            used = f.id.get_filesize()  # HDF5's end of file: what it wrote, without the reserve
        os.truncate(partial, used)
        record = {"file": final.name, "count": n, "start": start, "sha256": file_sha256(partial), ROWS_KEY: rows}
    return record, stats


def write_shards(tasks: list, progress: bool = False) -> list:
    """`write_shard(plan, out_dir, number)` for each task tuple, two at a time; results in task order.

    numpy, hashlib and file I/O release the GIL, so one shard's checksum overlaps the next one's
    conversion. Each shard's bytes do not depend on which thread wrote it. `progress` shows a
    progress bar on a terminal.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(write_shard, *task) for task in tasks]
        try:
            results = []
            with progress_bar(len(futures), "shards", unit="shard", show=progress, leave=True) as bar:
                for f in futures:
                    results.append(f.result())
                    bar.update(1)
            return results
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def finish_dataset(
    plan: Plan,
    out_dir: str | os.PathLike,
    results: list,
    *,
    inputs: list | None = None,
    layout: str = "NCHW",
) -> dict:
    """Combine the shards' results (in shard order) into the manifest and write it, last. Every
    shard must be in `out_dir`: publish_datasets moves what is there, and a rank that wrote into a
    folder of its own (another node's disk) made a set without its shards."""
    records = [r for r, _ in results]
    missing = [r["file"] for r in records if not (Path(out_dir) / r["file"]).is_file()]
    if missing:
        raise DmhpcError(f"{Path(out_dir) / missing[0]}: written by this conversion but not found"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: do all ranks write to "
                         f"one shared file system?")
    stats = (0, 0.0, 0.0)
    for _, partial in results:
        stats = _combine(stats, partial)
    n, mean, m2 = stats
    starts = 0
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": plan.count,
        "shape": [int(s) for s in plan.images.shape[1:]],
        "dtype": plan.dtype,
        "num_classes": plan.num_classes,
        "seed": plan.seed,
        "fractions": dict(zip(SPLITS, plan.fractions)),
        "shards": records,
        "rows": {},
        "splits": {},
        "counts": {},
        "stats": {"mean": [float(v) for v in mean], "std": [float(v) for v in np.sqrt(m2 / n)]},
        "inputs": list(inputs or []),
        "layout": layout,
        "created_by": f"dmhpc {__version__}",  # (not code_version(): the fingerprint covers it, and the same
        # rows prepared again by another commit are the same data set to a run resuming on them)
        "labelled": plan.labelled,
        "ids": plan.ids is not None,
        "objects": {},
    }
    for split in SPLITS:
        indices = plan.order[split]
        manifest["rows"][split] = [starts, starts + len(indices)]
        manifest["splits"][split] = [int(i) for i in indices]
        if plan.labelled:
            per_class = np.bincount(plan.labels[indices], minlength=plan.num_classes)
            manifest["counts"][split] = {str(k): int(c) for k, c in enumerate(per_class)}
        else:
            manifest["counts"][split] = {}
        manifest["objects"][split] = int(len(np.unique(plan.objects[indices])))
        starts += len(indices)
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically: one top-level key per line, lists kept on one line. It ends
    with the SHA-256 of its own content (`content_sha256`, added to `manifest` too)."""
    manifest.pop(CONTENT_KEY, None)
    manifest[CONTENT_KEY] = _content_sha256(manifest)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()) + "\n}\n"
    atomic_write(Path(out_dir) / MANIFEST, text)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output directory holding a finished data set or foreign files, unless overwrite.

    A directory holding only this format's staging folder, or shards and a manifest under the mark
    of a conversion (an interrupted one) is accepted: converting again finishes the job. A name like
    a temporary file's there is someone's: dmhpc writes those in the staging folder only.
    Nothing is written here.
    """
    out_dir = Path(out_dir)
    for folder in (Path(os.path.abspath(out_dir)), *Path(os.path.abspath(out_dir)).parents):
        # A data set's staging folder: the next conversion or --overwrite of that data set empties it
        # (a data set nested elsewhere in another's folder is left alone by both).
        if folder.name == STAGING:
            raise DmhpcError(f"{out_dir}: inside {folder}, the staging folder of a conversion into "
                             f"{folder.parent}, which it empties; choose a folder outside it")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DmhpcError(f"{out_dir}: exists and is not a directory")
    try:
        names = sorted(p.name for p in out_dir.iterdir())
    except OSError as exc:
        raise DmhpcError(f"{out_dir}: cannot list ({exc.strerror})") from None
    manifest = _owner_of_manifest(out_dir) if MANIFEST in names else None
    if manifest == "other":
        raise DmhpcError(f"{out_dir / MANIFEST}: not a dmhpc data set's manifest; choose another directory "
                         f"(or remove it, if it is a damaged one of dmhpc)")
    if STAGING in names:
        _check_staging(out_dir / STAGING)
    shards = [n for n in names if _SHARD_FILE.fullmatch(n)]
    if shards and manifest is None and INCOMPLETE not in names:
        raise DmhpcError(f"{out_dir}: holds {shards[0]}{' and more' if len(shards) > 1 else ''} but no dmhpc "
                         f"manifest nor the mark of a conversion under way ({INCOMPLETE}): not dmhpc's to "
                         f"replace; choose another directory (or remove them, if dmhpc wrote them)")
    if overwrite:
        return
    if manifest == "dmhpc" and INCOMPLETE not in names:  # (marked: one this conversion's moves left unfinished)
        raise DmhpcError(f"{out_dir}: already holds a data set ({MANIFEST}); pass --overwrite to replace it")
    # (no temporary names: dmhpc writes those in its staging folder only; here they are someone's)
    foreign = [n for n in names if not (_OWN_FILE.fullmatch(n) or n in (INCOMPLETE, STAGING))]
    if foreign:
        raise DmhpcError(
            f"{out_dir}: exists and is not empty ({len(foreign)} other files, e.g. {foreign[0]});"
            " pass --overwrite or choose another directory"
        )


def _check_staging(staging: Path) -> None:
    """A staging folder a conversion made holds this format's files only: anything else (a link, a
    file of that name, someone's files put in it) is not dmhpc's to empty, and a link's target was
    emptied through it."""
    if staging.is_symlink() or not staging.is_dir():
        raise DmhpcError(f"{staging}: not the staging folder of a conversion (a link or a file by its name); "
                         f"remove it or choose another directory")
    try:
        # (a folder by a shard's name is not a conversion's either)
        foreign = sorted(p.name for p in staging.iterdir() if not (
            (_OWN_FILE.fullmatch(p.name) or is_temporary(p.name)) and (p.is_symlink() or p.is_file())))
    except OSError as exc:
        raise DmhpcError(f"{staging}: cannot list ({exc.strerror})") from None
    if foreign:
        raise DmhpcError(f"{staging}: holds {foreign[0]}{' and more' if len(foreign) > 1 else ''}, not a file of a "
                         f"conversion; move it out or choose another directory")


def holds_dataset(directory: str | os.PathLike) -> bool:
    """DIR holds this format's manifest: a data set (finished, damaged or being replaced)."""
    return (Path(directory) / MANIFEST).is_file() and _owner_of_manifest(Path(directory)) == "dmhpc"


def _owner_of_manifest(out_dir: Path) -> str:
    """"dmhpc" when DIR/manifest.json is this format's (valid or not otherwise), else "other"."""
    try:
        with open(out_dir / MANIFEST, "rb") as f:
            head = f.read(256)
            # write_manifest puts the format first: the rest (a GB of split lists at 1e8 rows) is
            # not parsed on every rank of a conversion for it. Another layout is parsed whole.
            if _FORMAT_FIRST.match(head):
                return "dmhpc"
            data = json.loads(head + f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "other"
    return "dmhpc" if isinstance(data, dict) and data.get("format") == FORMAT else "other"


def start_dataset(out_dir: str | os.PathLike) -> Path:
    """Create the output directory and an empty staging folder in it, where the conversion writes
    (what a killed one left there goes); the staging folder's path. The directory's own files stay
    until `publish_datasets`."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_staging(out_dir)
        (out_dir / STAGING).mkdir()
    except OSError as exc:
        raise DmhpcError(f"{out_dir}: cannot prepare the output directory ({exc.strerror})") from None
    return out_dir / STAGING


def mark_datasets(out_dirs: list) -> None:
    """Mark each output folder (INCOMPLETE) as about to be replaced, before `publish_datasets` moves
    the first file: readers refuse a marked folder (`load_manifest`), and the marks go only once the
    last folder's new set is in place. Data sets converted together share their splits, so a
    conversion killed between two folders' moves must not leave one new set beside an old one whose
    splits disagree with it (a test object of one a training object of the other), readable as if
    nothing had happened. A mark that cannot be made takes back those made before it (not one an
    interrupted conversion left: its folder stays refused)."""
    made = []
    try:
        for out_dir in map(Path, out_dirs):
            if not (out_dir / INCOMPLETE).exists():
                (out_dir / INCOMPLETE).touch()
                made.append(out_dir)
            fsync_directory(out_dir)
    except OSError as exc:
        for out_dir in made:
            with contextlib.suppress(OSError):
                (out_dir / INCOMPLETE).unlink()
        raise DmhpcError(f"{exc.filename}: cannot mark the data set as being replaced ({exc.strerror})") from None


def publish_datasets(out_dirs: list) -> None:
    """Move finished conversions, marked by `mark_datasets`, from their staging folders into place:
    the old data sets' files go first (each manifest first), each new manifest comes last; then the
    marks go. Files dmhpc did not write stay."""
    out_dirs = [Path(d) for d in out_dirs]
    for out_dir in out_dirs:
        staging = out_dir / STAGING
        try:
            _remove_own_files(out_dir, temporaries=False)
            for name in sorted(n for n in os.listdir(staging) if _SHARD_FILE.fullmatch(n)):
                os.replace(staging / name, out_dir / name)
            os.replace(staging / MANIFEST, out_dir / MANIFEST)
        except OSError as exc:
            # The new set's files not moved yet stay in the staging folder: the caller does not abandon it.
            raise DmhpcError(f"{out_dir}: cannot move the new data set into place ({exc.strerror}); what is not "
                             f"moved yet is in {staging}; convert again") from None
        fsync_directory(out_dir)
    # Every new set is in place now. The marks go first, each on its own: one left behind makes its
    # set refused by every reader, an error; an empty staging folder left behind is untidy only.
    left = []
    for out_dir in out_dirs:
        try:
            (out_dir / INCOMPLETE).unlink()
        except OSError as exc:
            left.append((out_dir / INCOMPLETE, exc.strerror))
    if left:  # each tried: those after the first are said too, not left for a second conversion to find
        raise DmhpcError(f"{left[0][0]}: cannot remove it ({left[0][1]}), and readers refuse the data set until "
                         f"it goes; the new data set is in place: remove the file by hand"
                         + "".join(f" (and {path}: {why})" for path, why in left[1:])) from None
    for out_dir in out_dirs:
        try:
            (out_dir / STAGING).rmdir()
        except OSError as exc:
            print(f"dmhpc prepare: warning: {out_dir}: the new data set is in place, but {exc.filename} could not be "
                  f"removed ({exc.strerror}); remove it by hand", file=sys.stderr, flush=True)


def abandon_dataset(out_dir: str | os.PathLike, remove_dir: bool = False) -> None:
    """Delete what a failed conversion wrote (its staging folder); the directory too if asked and
    empty. A data set already there stays whole."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    _remove_staging(out_dir)
    if remove_dir and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _remove_staging(out_dir: Path) -> None:
    staging = out_dir / STAGING
    if staging.is_dir() and not staging.is_symlink():  # (never emptied through a link: check_output_dir's)
        _remove_own_files(staging, temporaries=True)
        staging.rmdir()


def _remove_own_files(out_dir: Path, temporaries: bool) -> None:
    """This format's files in `out_dir`, and its temporary files where dmhpc writes them (a staging
    folder): a name like theirs elsewhere is a user's file."""
    (out_dir / MANIFEST).unlink(missing_ok=True)  # first: no moment with a manifest over missing shards
    for path in out_dir.iterdir():
        if _OWN_FILE.fullmatch(path.name) or (temporaries and is_temporary(path.name)):
            path.unlink(missing_ok=True)


def write_dataset(
    images,
    labels,
    objects,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = SHARD_SIZE,
    seed: int = 0,
    fractions=SPLIT_FRACTIONS,
    dtype: str = DTYPES[0],
    num_classes: int = 2,
    overwrite: bool = False,
) -> dict:
    """Write a sharded data set from NCHW arrays (in memory or memory-mapped); return the manifest.

    `objects` None makes each image its own object. Raises DmhpcError on bad input before
    anything is written. The same steps as `dmhpc prepare` (plan, write, finish, publish) in one
    process, without its lock, staging folder, --nan-fill or catalog grouping: for the benchmarks
    and the tests.
    """
    plan = plan_dataset(
        images, labels, objects, shard_size=shard_size, seed=seed, fractions=fractions,
        dtype=dtype, num_classes=num_classes,
    )
    check_pixels(scan_pixels(plan.images, 0, plan.count, faint=faint_below(dtype)), dtype)
    check_output_dir(out_dir, overwrite)
    created = not Path(out_dir).exists()
    staging = start_dataset(out_dir)
    try:
        results = write_shards([(plan, staging, k) for k in range(plan.num_shards)])
        manifest = finish_dataset(plan, staging, results)
        mark_datasets([out_dir])
    except DmhpcError:
        abandon_dataset(out_dir, remove_dir=created)  # a failed write leaves nothing behind
        raise
    publish_datasets([out_dir])
    return manifest


# ----------------------------------------------------------------------------- reading


def _manifest_problem(m) -> str | None:
    """What is wrong with a parsed manifest (the first thing found), or None.

    Every field is checked for its type and range, so a hand-edited manifest is one line naming
    the field, never a TypeError or IndexError later.
    """
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != FORMAT:
        return f"format {m.get('format')!r}; expected {FORMAT!r}"
    if m.get("version") != VERSION:
        return f"version {m.get('version')!r}; this dmhpc reads version {VERSION}"
    types = {
        "count": int, "shape": list, "dtype": str, "num_classes": int, "seed": int, "fractions": dict,
        "shards": list, "rows": dict, "splits": dict, "counts": dict, "stats": dict, "inputs": list,
        "layout": str, "created_by": str,
    }
    for key, kind in types.items():
        if key not in m:
            return f"missing key {key!r}"
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            return f"key {key!r}: expected {'an integer' if kind is int else 'a ' + kind.__name__}"
    if m["count"] < 1:
        return f"count {m['count']}: expected at least 1"
    if m["num_classes"] < 2:
        return f"num_classes {m['num_classes']}: expected at least 2"
    if len(m["shape"]) != 3 or not all(is_int(v, 1) for v in m["shape"]):
        return f"shape {m['shape']!r}: expected [C, H, W], three positive integers"
    if m["dtype"] not in DTYPES:
        return f"dtype {m['dtype']!r}; expected one of {', '.join(DTYPES)}"
    if m["seed"] < 0:  # numpy's generators take none: prepare refuses it
        return f"seed {m['seed']}: expected an integer >= 0"
    if m["layout"] not in LAYOUTS:
        return f"layout {m['layout']!r}: expected one of {', '.join(LAYOUTS)}"
    start = 0
    for k, shard in enumerate(m["shards"]):
        if not isinstance(shard, dict) or not {"file", "count", "start", "sha256"} <= set(shard) <= \
                {"file", "count", "start", "sha256", ROWS_KEY}:
            return f"shards[{k}]: expected keys file, count, start, sha256 and optionally {ROWS_KEY}"
        if not isinstance(shard["file"], str) or not _SHARD_FILE.fullmatch(shard["file"]):
            return f"shards[{k}].file {shard['file']!r}: expected a shard file name like {shard_name(k)!r}"
        for key in ("sha256", ROWS_KEY):
            if key in shard and not (isinstance(shard[key], str) and re.fullmatch(r"[0-9a-f]{64}", shard[key])):
                return f"shards[{k}].{key}: expected 64 hexadecimal digits"
        if not is_int(shard["count"], 1) or not is_int(shard["start"]) or shard["start"] != start:
            return f"shards[{k}] ({shard['file']}): start {shard['start']!r} and count {shard['count']!r} do not follow on"
        start += shard["count"]
    if start != m["count"]:
        return f"shards hold {start} rows; count is {m['count']}"
    for key, kind in (("labelled", bool), ("ids", bool), ("objects", dict)):  # added later: optional
        if key in m and not isinstance(m[key], kind):
            return f"key {key!r}: expected {'true or false' if kind is bool else 'a mapping of split -> objects'}"
    start = 0
    for split in SPLITS:
        rows = m["rows"].get(split)
        if not (isinstance(rows, list) and len(rows) == 2 and all(is_int(v) for v in rows)
                and rows[0] == start and rows[0] <= rows[1]):
            return f"rows[{split!r}]: expected [start, stop) following on from {start}"
        indices = m["splits"].get(split)
        if not isinstance(indices, list) or len(indices) != rows[1] - rows[0]:
            return f"splits[{split!r}]: expected {rows[1] - rows[0]} global indices"
        # (type, not is_int: ten times faster over 1e8 of them. The range is split_problem's, check.py.)
        if not all(type(i) is int and -2**63 < i < 2**63 for i in indices):
            return f"splits[{split!r}]: expected integers"
        counts = m["counts"].get(split)
        if not isinstance(counts, dict) or not all(isinstance(k, str) and is_int(v, 0) for k, v in counts.items()):
            return f"counts[{split!r}]: expected a mapping of class -> number of images"
        classes = m["num_classes"] if m.get("labelled", True) else 0
        # The length first: a hand-edited num_classes may be huge.
        if len(counts) != classes or not all(str(k) in counts for k in range(classes)):
            return (f"counts[{split!r}]: expected one number for each of the {classes} classes"
                    if classes else f"counts[{split!r}]: expected none in an unlabelled data set")
        if classes and sum(counts.values()) != rows[1] - rows[0]:
            return f"counts[{split!r}]: {sum(counts.values())} images in all for the {rows[1] - rows[0]} rows of the split"
        start = rows[1]
    if start != m["count"]:
        return f"rows cover {start} rows; count is {m['count']}"
    if "objects" in m and (set(m["objects"]) != set(SPLITS) or not all(is_int(v, 0) for v in m["objects"].values())):
        return f"objects: expected a number of objects for each of {', '.join(SPLITS)}"
    sizes = {split: m["rows"][split][1] - m["rows"][split][0] for split in SPLITS}
    for split in SPLITS if "objects" in m else ():
        objects, n = m["objects"][split], sizes[split]
        if objects > n or (objects == 0) != (n == 0):  # every object has an image in its split
            return f"objects[{split!r}] {objects}: expected {f'1 to {n}' if n else 0} for the {n} rows of the split"
    channels = m["shape"][0]
    for key in ("mean", "std"):
        values = m["stats"].get(key)
        if not isinstance(values, list) or len(values) != channels or not all(is_number(v) for v in values):
            return f"stats.{key}: expected {channels} numbers, one per channel"
    if any(v < 0 for v in m["stats"]["std"]):
        return f"stats.std {m['stats']['std']!r}: expected no negative standard deviation"
    if set(m["fractions"]) != set(SPLITS) or not all(is_number(v) for v in m["fractions"].values()):
        return f"fractions: expected a number for each of {', '.join(SPLITS)}"
    try:
        train_f, val_f, _ = check_fractions([m["fractions"][split] for split in SPLITS])
    except DmhpcError as exc:
        return str(exc)
    # What split_order's draw guarantees, whatever the objects: train takes objects until it holds
    # round(f_train * N) images, val until both hold round((f_train + f_val) * N).
    # (Fractions may sum to 1 + 1e-6: on N of 500,000 and more, the round can pass N, which no set holds.)
    n = m["count"]
    least = {"train": min(round(train_f * n), n), "val": min(round((train_f + val_f) * n), n)}
    if sizes["train"] == 0 or sizes["train"] < least["train"]:
        return (f"rows['train']: {sizes['train']} rows; fraction {train_f:g} of {n} draws at least "
                f"{max(least['train'], 1)}")
    if sizes["train"] + sizes["val"] < least["val"]:
        return (f"rows: train and val hold {sizes['train'] + sizes['val']} rows; fractions {train_f:g} and "
                f"{val_f:g} of {n} draw at least {least['val']}")
    if val_f == 0 and sizes["val"]:
        return f"rows['val']: {sizes['val']} rows; its fraction is 0"
    for k, entry in enumerate(m["inputs"]):
        if (not isinstance(entry, dict) or not {"role", "file"} <= set(entry) <= {"role", "file", "sha256", "count"}
                or not all(isinstance(entry[key], str) for key in ("role", "file"))):
            return f"inputs[{k}]: expected keys role and file (strings), and optionally sha256 and count"
        if "sha256" in entry and not (isinstance(entry["sha256"], str)
                                      and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            return f"inputs[{k}].sha256: expected 64 hexadecimal digits"
        if "count" in entry and not is_int(entry["count"], 0):
            return f"inputs[{k}].count {entry['count']!r}: expected a number of files"
    return None


def _as_json(value):
    """json.dumps' `default`: a loaded manifest's index arrays as the lists its file holds."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _content_sha256(manifest: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != CONTENT_KEY},
                                     sort_keys=True, default=_as_json).encode()).hexdigest()


def _fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=_as_json).encode()).hexdigest()


def fingerprint(manifest: dict) -> str:
    """SHA-256 of the manifest's content: the same for a copy of the data set moved elsewhere."""
    for entry in _LOADED.values():
        if entry[0] is manifest:  # one of load_manifest's: computed once
            if entry[1] is None:
                entry[1] = _fingerprint(manifest)
            return entry[1]
    return _fingerprint(manifest)


# Manifests read, by the identity of their file (device, inode, size, modification time): a run
# read each of its two ~10 times (preflight, loaders, every evaluation), each a parse, a check of
# every field and two hashes of the whole: minutes per rank at 1e8 rows. A file written again (in
# place or replaced, as prepare does) is another file and read anew (where a file system keeps whole
# seconds only, an in-place rewrite of the same size within the second it was read is not seen).
_LOADED: dict[tuple, list] = {}  # identity -> [manifest, its fingerprint or None]
_LOADED_LIMIT = 4


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read and validate DIR/manifest.json; DmhpcError naming the file if missing or invalid.

    The manifest is shared by every caller that reads the same file: read it, do not change it.
    Its per-row index lists (`splits`) are read-only int64 arrays (8 bytes a row, where a list of
    Python integers is 36)."""
    path = Path(directory) / MANIFEST
    if (Path(directory) / INCOMPLETE).exists():
        raise DmhpcError(f"{Path(directory) / INCOMPLETE}: a conversion into {directory} did not finish moving its "
                         f"data sets into place; run the same dmhpc prepare again (with --overwrite if it refuses "
                         f"a folder of it that it finished)")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DmhpcError(f"{path}: missing; {directory} is not a finished dmhpc data set") from None
    except OSError as exc:
        raise DmhpcError(f"{path}: not a valid manifest ({exc})") from None
    identity = file_version(st)
    entry = _LOADED.pop(identity, None)
    if entry is None:
        entry = [_read_manifest(directory, path), None]
        while len(_LOADED) >= _LOADED_LIMIT:
            _LOADED.pop(next(iter(_LOADED)))
    _LOADED[identity] = entry  # (the most recently read last)
    return entry[0]


def _read_manifest(directory, path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DmhpcError(f"{path}: missing; {directory} is not a finished dmhpc data set") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # (nested past
        raise DmhpcError(f"{path}: not a valid manifest ({exc})") from None           # Python's stack)
    problem = _manifest_problem(manifest)
    if problem:
        raise DmhpcError(f"{path}: {problem}")
    # Edits that keep every field plausible (a row moved from test to val with its counts, the
    # statistics the trainer normalizes with, the seed) agree with the shards, and verify passed them.
    # A manifest of dmhpc before the key has none, and is read as it is; but the shards' ROWS_KEY came
    # after it, so a manifest recording those without the key had it deleted (with an edit it hid).
    if CONTENT_KEY not in manifest and any(ROWS_KEY in shard for shard in manifest["shards"]):
        raise DmhpcError(f"{path}: edited since prepare wrote it (no {CONTENT_KEY}, which every dmhpc that "
                         f"records its shards' {ROWS_KEY} writes); restore it, or prepare the data set again")
    if CONTENT_KEY in manifest and manifest[CONTENT_KEY] != _content_sha256(manifest):
        raise DmhpcError(f"{path}: edited since prepare wrote it ({CONTENT_KEY} is not that of its content); "
                         f"restore it, or prepare the data set again")
    for split in SPLITS:
        indices = manifest["splits"][split] = np.asarray(manifest["splits"][split], dtype=np.int64)
        indices.flags.writeable = False
    return manifest


def split_rows(manifest: dict, split: str) -> tuple[int, int]:
    """Half-open row range [start, stop) of `split` ("train", "val" or "test")."""
    if split not in SPLITS:
        raise DmhpcError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    start, stop = manifest["rows"][split]
    return int(start), int(stop)


def _index_digest(index: np.ndarray) -> bytes:
    """A digest of a shard's input positions (its `index`, the manifest's `splits` in storage order)."""
    return hashlib.blake2b(np.ascontiguousarray(index, dtype=np.int64).tobytes(), digest_size=16).digest()


# HDF5's chunk cache per open dataset (h5py's default: 1 MiB; None here). A reader takes a row range
# once, so the cache holds nothing read again, and it is memory for every open shard: 530 MiB for
# 63 open against 42 without, reads as fast (bench/read.py --pieces 16 --chunk-cache --shard-size
# 256, docs/benchmarks.md); a reader keeps up to 512 open, each loader worker one per domain.
_CHUNK_CACHE_BYTES: int | None = 0


def _open_shards_limit() -> int:
    """Shards one reader keeps open: an eighth of the process's file descriptors (a process holds a
    reader per domain, the evaluation's, HDF5's and torch's own files), 16 to 512."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(512, soft // 8)) if soft != resource.RLIM_INFINITY else 512


# What reading a shard's rows raises: OSError of the disk; h5py's KeyError of a missing object and
# TypeError of a group in a dataset's place, in a shard damaged after the start's checks.
_READ_ERRORS = (OSError, KeyError, TypeError)


class RowReader:
    """Reads rows of a data set by row range, across shards.

    HDF5 files are opened on first read and kept open, up to `open_limit` of them (the least
    recently read closed first): a loader drawing blocks from every shard of a large set opened
    them all, until the process ran out of file descriptors (a data set of 1e8 rows has ~50,000
    shards) and took ~2.4 MB of HDF5 caches for each (now opened without a chunk cache, see
    `_CHUNK_CACHE_BYTES`). None is open before the first read, and
    none is carried by pickling, so a reader can be handed to forked or spawned worker processes
    (a forked child that inherits open files reopens its own).
    """

    def __init__(self, directory: str | os.PathLike, manifest: dict | None = None):
        self.directory = Path(directory)
        manifest = load_manifest(directory) if manifest is None else manifest
        # Without its index lists: a reader is pickled to every loader worker (DALI's spawned ones),
        # and those are 0.8 GB at 1e8 rows (3.6 GB as the lists of Python integers they were).
        # `_check_rows` needs only a digest of each shard's.
        self.manifest = {k: v for k, v in manifest.items() if k != "splits"}
        shards = self.manifest["shards"]
        self._starts = np.array([s["start"] for s in shards] + [self.manifest["count"]], dtype=np.int64)
        stored = np.concatenate([np.asarray(manifest["splits"][split], np.int64) for split in SPLITS])
        self._index_digests = [_index_digest(stored[a:b]) for a, b in zip(self._starts[:-1], self._starts[1:])]
        self._files: dict[int, h5py.File] = {}  # in the order they were last read
        self._datasets: dict[tuple[int, str], h5py.Dataset] = {}
        self._sizes: dict[int, int] = {}  # shard number -> file size when opened
        self._checked: dict[int, tuple] = {}  # shard number -> identity of the file whose rows were checked
        self._pid = os.getpid()
        self.open_limit = _open_shards_limit()

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _file(self, number: int) -> h5py.File:
        if self._pid != os.getpid():  # forked after opening: the parent's handles are not ours
            self._files, self._datasets, self._sizes, self._pid = {}, {}, {}, os.getpid()
        f = self._files.pop(number, None)
        if f is not None:
            self._files[number] = f  # (the most recently read now)
        else:
            while len(self._files) >= self.open_limit:
                self._close(next(iter(self._files)))
            path = self.directory / self.manifest["shards"][number]["file"]
            try:
                f = self._files[number] = h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            except OSError as exc:
                raise DmhpcError(f"{path}: cannot open shard ({exc})") from None
            st = self._stat(number)
            if st is not None:
                self._sizes[number] = st.st_size
            # Reopened (more shards read than stay open): the same file as checked before needs no
            # second check, which read its whole index at every reopen. Another file by its name
            # (prepared again) is checked.
            identity = None if st is None else file_version(st)
            if identity is None or self._checked.get(number) != identity:
                try:
                    self._check_rows(number, f, path)
                except BaseException:  # not kept open: a second read would take it unchecked
                    self._files.pop(number).close()
                    self._sizes.pop(number, None)
                    raise
                if identity is not None:
                    self._checked[number] = identity
        return f

    def _close(self, number: int) -> None:
        self._files.pop(number).close()
        self._sizes.pop(number, None)
        for key in [k for k in self._datasets if k[0] == number]:
            del self._datasets[key]

    def _check_rows(self, number: int, f: h5py.File, path: Path) -> None:
        """A shard opened after its data set was prepared again (prepare's move replaces every file)
        is the new set's: its rows are other images than the manifest this reader holds says, and
        were trained on under the old labels and splits without a word. Its input positions are read
        (8 bytes a row) and compared with those the manifest gives its rows (by a digest). The same
        positions drawn again (the same objects, seed and fractions) hold other pixels where the set
        was prepared from changed images: the SHA-256 of its rows the shard holds is compared with its
        manifest record's (where the set has one; an older dmhpc's has not)."""
        try:
            held = f["index"][:]
            rows = f.attrs.get(ROWS_KEY)
        except (KeyError, OSError) as exc:
            raise DmhpcError(f"{path}: cannot read shard ({exc})") from None
        expected = self.manifest["shards"][number].get(ROWS_KEY)
        if len(held) != self._starts[number + 1] - self._starts[number] or \
                _index_digest(held) != self._index_digests[number] or (expected is not None and rows != expected):
            raise DmhpcError(f"{path}: its rows are not those the data set's manifest this run read gives it (the "
                             f"data set was prepared again since?); put the data set back, or prepare a changed one "
                             f"into a new folder")

    def _stat(self, number: int) -> os.stat_result | None:
        """The open shard file's status, or None where its HDF5 driver has no file descriptor."""
        try:
            return os.fstat(self._files[number].id.get_vfd_handle())
        except (OSError, ValueError, TypeError, RuntimeError):
            return None

    def _size(self, number: int) -> int | None:
        st = self._stat(number)
        return None if st is None else st.st_size

    def _check_unchanged(self, number: int) -> None:
        """A shard cut short (or grown: written over) under the open file is an error: HDF5 reads
        zeros past a file's new end, and the rows would be trained on or predicted as they are not.
        Checked after each read, at the cost of one fstat (2 us here). A file written over in place
        at the same size is not seen: the checks at the next start see it. The size, not the times: `touch` (a
        scratch purge avoided) and chmod change those and no byte. A shard replaced by a rename
        (prepare's move) is not seen here: the open file is the old one, still whole (one opened
        after the move is `_check_rows`')."""
        then = self._sizes.get(number)
        if then is not None and self._size(number) != then:
            raise DmhpcError(f"{self.directory / self.manifest['shards'][number]['file']}: its size changed "
                             f"while being read (cut short or written over); the rows read from it cannot be "
                             f"trusted: prepare a changed data set into a new folder")

    def _dataset(self, number: int, key: str) -> h5py.Dataset:
        # Looked up once: h5py's lookup by name costs as much as reading a piece's labels.
        f = self._file(number)
        d = self._datasets.get((number, key))
        if d is None:
            d = self._datasets[number, key] = f[key]
        return d

    def read(self, start: int, stop: int) -> dict:
        """Rows [start, stop) as numpy arrays: images (n, C, H, W), labels, objects, index (n,)."""
        return self.read_ranges([(start, stop)])

    def read_ranges(self, ranges: Iterable[tuple[int, int]], keys: Iterable[str] = ROW_KEYS) -> dict:
        """The rows of each [start, stop) range, one range after the other, as numpy arrays: those of
        `keys` among images (n, C, H, W), labels, objects, index (n,)."""
        count = len(self)
        ranges = list(ranges)
        for start, stop in ranges:
            if not 0 <= start <= stop <= count:
                raise IndexError(f"rows [{start}, {stop}) outside [0, {count})")
        n = sum(stop - start for start, stop in ranges)
        shapes = {"images": (n, *self.manifest["shape"])}
        out = {key: np.empty(shapes.get(key, n), dtype=self.manifest["dtype"] if key == "images" else np.int64)
               for key in keys}
        at = 0
        for start, stop in ranges:
            for number, a, b in self._spans(start, stop):
                place = at + int(self._starts[number]) + a - start
                try:
                    for key, array in out.items():
                        d = self._dataset(number, key)
                        if key == "images":  # straight into the batch: no copy of the pixels
                            d.read_direct(array, np.s_[a:b], np.s_[place : place + b - a])
                        else:  # a plain slice is h5py's fast path: a tenth of read_direct's cost
                            array[place : place + b - a] = d[a:b]
                except _READ_ERRORS as exc:  # a disk or network file system failing mid-run: the shard, named
                    raise self._read_error(number, a, b, exc) from None
                self._check_unchanged(number)
            at += stop - start
        return out

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard number, first row, end row) within each shard that rows [start, stop) cover."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        row = start
        for number in range(first, len(self._starts) - 1):
            if row >= stop:
                return
            base = int(self._starts[number])
            a, b = row - base, min(stop, int(self._starts[number + 1])) - base
            yield number, a, b
            row = base + b

    def _read_error(self, number: int, a: int, b: int, exc: Exception) -> DmhpcError:
        reason = " ".join(str(exc).strip("\"'").split()) or type(exc).__name__
        return DmhpcError(f"{self.directory / self.manifest['shards'][number]['file']}: cannot read rows {a} to "
                          f"{b - 1}: {reason}")

    def read_ids(self, start: int, stop: int) -> list[str] | None:
        """The catalog ids of rows [start, stop), or None when the data set keeps none."""
        if not self.manifest.get("ids", False):
            return None
        parts = []
        for number, a, b in self._spans(start, stop):
            try:
                parts += [v.decode() for v in self._file(number)["ids"][a:b]]
            except _READ_ERRORS as exc:
                raise self._read_error(number, a, b, exc) from None
            self._check_unchanged(number)
        return parts

    def close(self) -> None:
        """Close the open shard files; a later read opens them again."""
        for f in self._files.values():
            f.close()
        self._files, self._datasets, self._sizes = {}, {}, {}

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_datasets"], state["_sizes"] = {}, {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


# ----------------------------------------------------------------------------- info


def summary(directory: str | os.PathLike) -> dict:
    """The manifest without its per-row index lists, plus the directory, its fingerprint and its
    shards' bytes."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    # The fingerprint: what runs, catalogs and model cards name the data set by.
    out = {"directory": str(directory), "fingerprint": fingerprint(manifest)}
    out.update((k, v) for k, v in manifest.items() if k != "splits")
    out["bytes"] = sum(_size(directory / s["file"]) for s in manifest["shards"])
    return out


def _size(path: Path) -> int:
    """A shard's bytes; 0 where it cannot be read (`verify` names it; a summary is no check)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def info_arguments(parser) -> None:
    parser.add_argument("directory", help="data-set directory (holding manifest.json)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def info_main(args) -> int:
    s = summary(args.directory)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    labelled = is_labelled(s)
    classes = range(s["num_classes"]) if labelled else range(0)
    objects = s.get("objects", {})
    lines = [
        f"data set    {s['directory']}",
        f"fingerprint {s['fingerprint']}",
        f"images      {s['count']} x {'x'.join(map(str, s['shape']))} {s['dtype']} "
        f"(input layout {s['layout']}), "
        + (f"{s['num_classes']} classes" if labelled else "unlabelled")
        + (", catalog ids kept" if s.get("ids") else ""),
        f"shards      {len(s['shards'])} of up to {max(x['count'] for x in s['shards'])} rows, "
        f"{s['bytes'] / 1e6:.1f} MB",
        f"split       seed {s['seed']}, fractions "
        + ", ".join(f"{k} {v:g}" for k, v in s["fractions"].items()),
        "",
        f"{'split':<8}{'rows':>20}{'images':>10}{'objects':>10}" + "".join(f"{'class ' + str(k):>10}" for k in classes),
    ]
    for split in SPLITS:
        a, b = s["rows"][split]
        lines.append(
            f"{split:<8}{f'[{a}, {b})':>20}{b - a:>10}{objects.get(split, '-'):>10}"
            + "".join(f"{s['counts'][split].get(str(k), 0):>10}" for k in classes)
        )
    lines += [
        "",
        "train statistics per channel",
        "  mean  " + " ".join(f"{v:.6g}" for v in s["stats"]["mean"]),
        "  std   " + " ".join(f"{v:.6g}" for v in s["stats"]["std"]),
    ]
    if s["inputs"]:
        lines += ["", "inputs"]
        for i in s["inputs"]:
            lines.append(f"  {i['role']:<8}{i['file']}")
            if "sha256" in i:
                lines.append(f"          sha256 {i['sha256']}")
            if "count" in i:  # a folder of cutouts: no checksum of its own, the shards' cover its bytes
                lines.append(f"          {i['count']} files")
    lines.append(f"\ncreated by {s['created_by']}")
    print("\n".join(lines))
    return 0


def is_labelled(manifest: dict) -> bool:
    """Whether a data set has labels (manifests of dmhpc before unlabelled data sets always did)."""
    return manifest.get("labelled", True)
