"""Images to run a trained model on, in input order, read a block of rows at a time.

    --data DIR        a prepared data set (dmhpc prepare), every split; "input order" is the
                      order of the arrays it was prepared from (the `index` column)
    --images FILE     a .npy array or a FITS cube
    --catalog TABLE   a catalog of FITS cutouts (id column, optional label and file columns)

A `Source` reads rows [start, stop) of its own storage order with the columns a catalog reports
for them: `index` (the input position), `id`, and `label`, `object`, `split` where known.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmhpc.data.check import check_dataset
from dmhpc.data.inputs import Cutouts, check_nan_fill, open_images, read_catalog
from dmhpc.data.shards import (MANIFEST, SPLITS, RowReader, fingerprint, is_labelled, load_manifest, pixel_moments,
                               split_rows, statistics_of)
from dmhpc.errors import DmhpcError


DIGEST_BLOCK = 4096  # cutout files per block of `Source.digest`: what one rank stats at a time


@dataclass
class Source:
    kind: str                  # "data", "images" or "catalog"
    path: Path
    shape: tuple               # (C, H, W)
    count: int
    labelled: bool
    describe: dict = field(default_factory=dict)  # provenance for the catalog's metadata
    identity: dict = field(default_factory=dict)  # {role: file_identity}: what a resumed prediction must still read
    _reader: object = None     # RowReader or ImageArray
    _ids: list | None = None
    _labels: np.ndarray | None = None
    _manifest: dict | None = None
    _first: int = 0            # a prepared set's first row in use (one split: its first row)
    _positions: np.ndarray | None = None  # a prepared set's input position of each storage row
    id_dtype: str | None = None  # a catalog's integer ids: the catalog written keeps them integers (joins by id)
    _cutout_digests: dict = field(default_factory=dict)  # (start, stop) -> cutout_files' digest, taken once
    _inputs: dict = field(default_factory=dict)  # input_identity's arguments: `identity` taken again
    missing: int | None = None  # the first row whose cutout file `cutout_files` could not stat

    @property
    def inputs(self) -> str:
        """What the rows are read from, in words: the path, and the cutout files a catalog names."""
        return f"{self.path} or one of the cutout files it names" if isinstance(self._reader, Cutouts) else str(self.path)

    @property
    def shape_of(self) -> Path:
        """The file `shape` was read from: a catalog's first cutout (the others are held to its shape)."""
        return Path(self._reader.files[0]) if isinstance(self._reader, Cutouts) else self.path

    @property
    def columns(self) -> tuple[str, ...]:
        """The names of the columns `read` gives."""
        names = ("index", "id", *(("object", "split") if self.kind == "data" else ()))
        return names + (("label",) if self.labelled else ())

    def positions(self, start: int, stop: int) -> np.ndarray:
        """The input positions (the `index` column) of rows [start, stop), without reading them."""
        if self.kind != "data":
            return np.arange(start, stop, dtype=np.int64)
        if self._positions is None:  # storage holds the splits one after the other (see read_inputs)
            self._positions = np.concatenate([np.asarray(self._manifest["splits"][s], np.int64) for s in SPLITS])
        return self._positions[self._first + start:self._first + stop]

    def reads(self, path: str | os.PathLike) -> bool:
        """`path` (an existing file) is one of the cutout files this source reads. Only files of its
        name are stat'ed: resolving each of a survey's millions of paths on a parallel file system
        took billions of metadata operations (a link under another name is not looked for)."""
        if not isinstance(self._reader, Cutouts):
            return False
        target, name = os.stat(path), Path(path).name
        for f in self._reader.files:
            if os.path.basename(f) == name:
                try:
                    found = os.stat(f)
                except OSError:
                    continue
                if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                    return True
        return False

    def changed(self) -> bool:
        """Whether the files of `identity` (the array, the catalog, a prepared set's manifest and
        shards; not the cutouts a catalog names, which each part records) differ from the start's."""
        try:
            return input_identity(**self._inputs) != self.identity
        except OSError:  # a data set's folder removed while it was listed
            return True

    def cutout_files(self, start: int, stop: int) -> str:
        """For a catalog of cutout files: a digest of the name, size and modification time of the
        files of rows [start, stop), which a part records and a rerun checks before reusing it (a
        cutout rewritten in place has its part computed again); the survey's other inputs are in
        `identity`. Taken before the files are read, like `file_identity`, and once: the start's
        digest, its check of the parts done before and the parts written all ask for the same rows
        (parts of DIGEST_BLOCK rows, the default), and a survey's millions of stats on a parallel
        file system were made three times over. "" for other sources."""
        if not isinstance(self._reader, Cutouts):
            return ""
        if (start, stop) not in self._cutout_digests:
            digest = hashlib.sha256()
            for row, path in enumerate(self._reader.files[start:stop], start):
                identity = file_identity(path)
                if identity is None and (self.missing is None or row < self.missing):
                    self.missing = row
                digest.update(json.dumps([str(path), identity]).encode())
            self._cutout_digests[start, stop] = digest.hexdigest()
        return self._cutout_digests[start, stop]

    def digest(self, blocks: dict[int, str] | None = None) -> str:
        """SHA-256 of what the rows are read from, as it is now: every input file's size and
        modification time (each shard's and cutout's too), the paths and a prepared set's
        fingerprint. A catalog records it (INPUTSHA) so that `dmhpc explain` can tell that the images
        it reads back are still those the probabilities are of. `blocks`: every rank's
        `digest_blocks`, merged (a survey's cutouts stat'ed in shares); None: stat'ed here."""
        blocks = self.digest_blocks() if blocks is None else blocks
        text = json.dumps([self.identity, self.describe, [blocks[k] for k in range(len(blocks))]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def digest_blocks(self, rank: int = 0, world_size: int = 1) -> dict[int, str]:
        """This rank's share of the cutout files' identities for `digest`: block k (DIGEST_BLOCK
        files) on rank k mod world size. A survey's millions of cutouts on a parallel file system,
        stat'ed by one rank, took minutes at every requeue. Empty for sources without cutouts."""
        blocks = -(-self.count // DIGEST_BLOCK) if isinstance(self._reader, Cutouts) else 0
        return {k: self.cutout_files(k * DIGEST_BLOCK, min((k + 1) * DIGEST_BLOCK, self.count))
                for k in range(rank, blocks, world_size)}

    def missing_error(self, row: int) -> str:
        """The line for row `row`'s cutout file, which `cutout_files` could not stat: the file, why (a
        folder without search permission is no missing file), and the catalog row and id naming it."""
        path = self._reader.files[row]
        try:
            os.stat(path)
            why = "could not be read"  # (there now: it came back since)
        except OSError as exc:
            why = "no such cutout file" if exc.errno == errno.ENOENT else f"cannot read: {exc.strerror}"
        return f"{path}: {why} (row {row + 1} of {self.path}, id {self._ids[row]})"

    def first_id(self, bad: Callable[[str], bool], block: int = 65536) -> tuple[int, str] | None:
        """(input position, id) of the first id for which `bad` is true, or None; reads ids only, a
        block at a time."""
        if self.kind != "data":
            ids = self._ids or []
            k = next((k for k, v in enumerate(ids) if bad(str(v))), None)
            return None if k is None else (k, str(ids[k]))
        for start in range(0, self.count, block):
            ids = self._reader.read_ids(self._first + start, self._first + min(start + block, self.count))
            if ids is None:  # a prepared set without ids: its ids are the input positions
                return None
            k = next((k for k, v in enumerate(ids) if bad(v)), None)
            if k is not None:
                return int(self.positions(start + k, start + k + 1)[0]), ids[k]
        return None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict]:
        """(images (n, C, H, W) float32, columns) of rows [start, stop) in storage order."""
        if self.kind == "data":
            start, stop = start + self._first, stop + self._first
            rows = self._reader.read(start, stop)
            split = np.searchsorted([self._manifest["rows"][s][1] for s in SPLITS], np.arange(start, stop),
                                    side="right").astype(np.int8)
            columns = {"index": rows["index"], "object": rows["objects"], "split": split}
            ids = self._reader.read_ids(start, stop)
            columns["id"] = np.array(ids) if ids is not None else rows["index"]
            if self.labelled:
                columns["label"] = rows["labels"]
            return self._finite(rows["images"].astype(np.float32, copy=False), columns), columns
        index = np.arange(start, stop, dtype=np.int64)
        columns = {"index": index, "id": np.array(self._ids[start:stop]) if self._ids is not None else index}
        if self._labels is not None:
            columns["label"] = self._labels[start:stop]
        return self._finite(self._reader[start:stop], columns), columns

    def _finite(self, images: np.ndarray, columns: dict) -> np.ndarray:
        """`images`, or a DmhpcError naming the first image with a NaN or Inf pixel: the network turns
        one into a NaN probability, which `merger` would count as a non-merger without a word. Here,
        on the host block in the read-ahead thread, it costs a min and a max (about 0.5 ms for 256
        75x75x3 images) and no device sync."""
        if np.isfinite(images.min()) and np.isfinite(images.max()):  # NaN and Inf show in min or max
            return images
        bad = ~np.isfinite(images.reshape(len(images), -1))
        k = int(np.flatnonzero(bad.any(axis=1))[0])
        index, nan = int(columns["index"][k]), bool(np.isnan(images[k]).any())
        what = "NaN" if nan else "Inf"
        # (float64 values beyond float32's range read as Inf: the file need not hold one)
        hint = ("--nan-fill 0 replaces them" if nan else
                "--nan-fill replaces NaN only (an Inf may be a float64 value beyond float32's range)")
        if self.kind == "catalog":  # one file per row: name the file
            where = f"{self._reader.files[index]}: {what} pixels in this cutout (id {columns['id'][k]})"
        else:
            ident = f" (id {columns['id'][k]})" if self._ids is not None else ""
            where = f"{self.path}: {what} pixels in image {index}{ident}"
        raise DmhpcError(f"{where}; {hint}")

    def read_inputs(self, indices) -> np.ndarray:
        """Images (n, C, H, W) float32 of the given input positions (the catalog's `index`), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        total = self._manifest["count"] if self.kind == "data" else self.count
        outside = indices[(indices < 0) | (indices >= total)]
        if outside.size:
            raise DmhpcError(f"{self.path}: no image at input position {int(outside[0])} (it holds {total})")
        if self.kind != "data":
            order = np.argsort(indices)
            out = np.empty((len(indices), *self.shape), np.float32)
            out[order] = self._reader[indices[order]]
            return out
        rows = np.empty(total, np.int64)  # input position -> storage row
        rows[np.concatenate([np.asarray(self._manifest["splits"][s], np.int64) for s in SPLITS])] = np.arange(total)
        return np.concatenate([self._reader.read(int(r), int(r) + 1)["images"] for r in rows[indices]]).astype(
            np.float32)

    def check(self, checksums: bool, rank: int = 0, world_size: int = 1,
              gather: Callable[[Callable[[], Any]], list] = lambda step: [step()]) -> None:
        """A prepared set's shards checked as the trainer checks them (dmhpc.data.check), shared out
        among the ranks: a shard replaced or damaged since it was prepared would otherwise give a
        catalog of other images without a word. Other sources have no checksums to compare."""
        if self.kind == "data":
            check_dataset(f"--data {self.path}", self.path, self._manifest, checksums=checksums, rank=rank,
                          world_size=world_size, gather=gather)

    def own_stats(self, rank: int = 0, world_size: int = 1,
                  gather: Callable[[Callable[[], Any]], list] = lambda step: [step()]) -> tuple[list, list]:
        """Per-channel mean and std of these images: a prepared set's training statistics, else one
        pass over every row, each of `world_size` ranks reading its share; `gather(step)` runs `step`
        on every rank and returns all results (dmhpc.distributed.gather). The same bits on any
        number of ranks (see `pixel_moments`)."""
        if self.kind == "data":
            return self._spread([float(v) for v in self._manifest["stats"]["mean"]],
                                [float(v) for v in self._manifest["stats"]["std"]])

        def share() -> dict:
            try:
                return pixel_moments(_Checked(self), rank, world_size)
            except (OSError, ValueError) as exc:  # said on every rank: the others wait for this one's share
                raise DmhpcError(f"{self.path}: cannot read the images for their statistics: {exc}") from None

        shares = gather(share)
        return self._spread(*statistics_of({k: v for part in shares for k, v in part.items()}, self.shape[0]))

    def _spread(self, mean: list, std: list) -> tuple[list, list]:
        """(mean, std), refused where a channel's std is 0 (a constant filter) or not finite: dividing
        by it gives every image NaN probabilities (as the trainer's check of a manifest says)."""
        flat = [c for c, s in enumerate(std) if not (np.isfinite(s) and s > 0)]
        if flat:
            c = flat[0]
            raise DmhpcError(f"{self.path}: channel {c} has standard deviation {std[c]} in these images; "
                             f"cannot normalize with --normalize own (--normalize target uses the run's statistics)")
        return mean, std

    def close(self) -> None:
        if self.kind == "data":
            self._reader.close()


class _Checked:
    """A source's rows as `pixel_moments` reads them, a block at a time through `Source.read`: an image
    with a NaN or Inf pixel is named there (its file, its id, the hint that fits), where the statistics
    made of it were only NaN, blamed on the whole input."""

    def __init__(self, source: Source):
        self.source, self.shape = source, (source.count, *source.shape)

    def __len__(self) -> int:
        return self.source.count

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.source.read(rows.start, min(rows.stop, self.source.count))[0]


def file_identity(path: str | os.PathLike) -> dict | None:
    """Size and modification time (ns) of a file, None if it cannot be read (its opener says why).
    Taken before the file is opened: a file replaced in between then differs from what was recorded
    at the next start, so its parts are refused, never reused with contents they were not made from."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_identity(*, data=None, images=None, catalog=None) -> dict:
    """{role, or a prepared set's file name: file_identity}: what a resumed prediction must still
    read. Taken before the files are read, like file_identity: a data set prepared again in place
    (--overwrite) since a part was written changes it, and its parts are refused."""
    if data is not None:
        return {name: file_identity(Path(data) / name) for name in sorted(os.listdir(data))
                if name == MANIFEST or name.endswith(".h5")} if Path(data).is_dir() else {}
    return {role: file_identity(path) for role, path in (("images", images), ("catalog", catalog)) if path is not None}


def _integer_labels(catalog, column: str, labels: np.ndarray) -> np.ndarray:
    """The label column as int64, refused when it is not 1 (merger) or 0 (not), as `prepare` refuses
    it: checked on opening, so that it is said before a parts folder is made, not as a traceback at
    the first batch (or, for labels coded 1/2 or -1, copied into the catalog beside `merger`)."""
    labels = np.asarray(labels)
    whole = labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)
    if np.issubdtype(labels.dtype, np.floating):
        whole = bool(np.all(labels == np.round(labels)))  # NaN compares unequal, so it is caught too
    if labels.dtype.kind not in "biuf":  # said it held '0' and expected... 0
        raise DmhpcError(f"{catalog}: label column {column!r} holds text ({labels.dtype}); expected an integer "
                         f"or boolean column, 1 for a merger or 0")
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DmhpcError(f"{catalog}: label column {column!r} holds {labels[bad[0]].item()!r} (row {bad[0] + 1}); "
                         f"expected {'whole numbers, ' if not whole else ''}1 for a merger or 0")
    return labels.astype(np.int64)


def open_source(*, data: str | os.PathLike | None = None, split: str | None = None,
                images: str | os.PathLike | None = None, catalog: str | os.PathLike | None = None,
                id_column: str = "id", label_column: str | None = None, file_column: str | None = None,
                cutouts: str | os.PathLike | None = None, nan_fill: float | None = None,
                layout: str | None = None) -> Source:
    """The one source given (see the module docstring); `catalog` with `images` gives their ids and
    labels; `split` keeps one split of a prepared data set."""
    if (data is not None) + (images is not None or catalog is not None) != 1:
        raise DmhpcError("give one of --data DIR, --images FILE or --catalog TABLE (--catalog may go with --images)")
    if split is not None and data is None:
        raise DmhpcError("--split needs --data (only a prepared data set has splits)")
    if layout is not None and data is not None:
        raise DmhpcError("--layout goes with --images or --catalog (a prepared data set's shards hold NCHW)")
    if nan_fill is not None and data is not None:
        raise DmhpcError("--nan-fill goes with --images or --catalog (a prepared data set holds no NaN: prepare "
                         "refused or filled them)")
    check_nan_fill(nan_fill)  # (the rows come as float32)
    # Options of a catalog without one, and where cutouts are beside --images, would be ignored:
    # a catalog without the label column asked for, ids given to the wrong images.
    column_options = {"--id-column": id_column != "id", "--label-column": label_column is not None,
                      "--file-column": file_column is not None, "--cutouts": cutouts is not None}
    given = [name for name, on in column_options.items() if on]
    if given and catalog is None:
        raise DmhpcError(f"{', '.join(given)} read{'s' if len(given) == 1 else ''} a catalog: give --catalog"
                         + (" (a prepared data set keeps its ids and labels)" if data is not None else ""))
    cutout_options = [name for name in ("--file-column", "--cutouts") if column_options[name]]
    if cutout_options and images is not None:
        raise DmhpcError(f"{', '.join(cutout_options)} name{'s' if len(cutout_options) == 1 else ''} cutout files to "
                         f"read, and --images gives the images: give one or the other")
    if data is not None:
        identity = input_identity(data=data)
        manifest = load_manifest(data)
        first, stop = split_rows(manifest, split) if split is not None else (0, manifest["count"])
        if stop == first:
            raise DmhpcError(f"{data}: the {split} split is empty" if split else f"{data}: the input has no images")
        return Source("data", Path(data), tuple(manifest["shape"]), stop - first, is_labelled(manifest),
                      {"data": str(Path(data).resolve()), "fingerprint": fingerprint(manifest),
                       **({"split": split} if split else {})}, identity,
                      _reader=RowReader(data, manifest), _manifest=manifest, _first=first, _inputs={"data": data})
    identity = input_identity(images=images, catalog=catalog)
    cat = None
    if catalog is not None:
        cat = read_catalog(catalog, id_column=id_column, label_column=label_column, file_column=file_column,
                           cutouts=cutouts)
    if images is not None:
        array = open_images(images, layout=layout, nan_fill=nan_fill)
        if cat is not None and len(cat.ids) != len(array):
            raise DmhpcError(f"{catalog}: {len(cat.ids)} rows for the {len(array)} images of {images}")
        where = {"images": str(Path(images).resolve())}
    elif cat.files is not None:
        array = Cutouts(cat, nan_fill, layout)
        where = {}
    else:
        raise DmhpcError(f"{catalog}: name each row's cutout with --file-column, or the folder of ID.fits files "
                         f"with --cutouts")
    if cat is not None:
        where["catalog"] = str(Path(catalog).resolve())
    labels = _integer_labels(catalog, label_column, cat.labels) if cat is not None and cat.labels is not None else None
    if not len(array):  # refused here, before a parts folder is made: the merge of no parts has no columns
        raise DmhpcError(f"{images or catalog}: the input has no images; nothing to predict")
    return Source("catalog" if cat is not None and images is None else "images", Path(images or catalog),
                  tuple(array.shape[1:]), len(array), labels is not None, where, identity, array,
                  cat.ids if cat is not None else None, labels, id_dtype=cat.id_dtype if cat is not None else None,
                  _inputs={"images": images, "catalog": catalog})
