"""The images users have, opened as one array-like of (N, C, H, W) float32 rows, never read whole.

- `.npy` files (NCHW or NHWC),
- FITS cubes: one file whose first image HDU is (N, C, H, W) or (N, H, W, C) (or (N, H, W) for
  one filter),
- FITS cutouts: one file per object, listed by a catalog table (CSV, ECSV, FITS, Parquet, HDF5) with an
  id column, an optional label column and an optional file column (without one, the file of id X
  is CUTOUTS/X.fits). A cutout holds one (C, H, W) or (H, W, C) image HDU or one (H, W) HDU per
  filter.

The layout of a .npy array, a cube and a cutout's one HDU is detected from the shape, or given,
with the same checks (`detect_layout`); one HDU per filter, or a one-filter cube, has no channel
axis to place.

FITS headers are read with astropy (`astropy.io.fits`), and catalogs with `astropy.table`. The rows
of a .npy array and of a plain FITS cube are read by positioned reads (`FileRows`), those of a
scaled or tile-compressed cube through astropy's section, never through a memory map (see
`FileRows`); big-endian data are converted to native float32 row by row. NaN pixels (survey cutouts are often
NaN-padded at the edges of the footprint) are refused downstream unless a fill value is given
(`nan_fill`), which replaces them as rows are read.

Every reader is an `ImageArray`: `shape`, `dtype` (float32) and `__getitem__` with an integer, a
slice or an array of indices, returning a numpy array. So `dmhpc prepare` and `dmhpc predict` read
a block of rows at a time whatever the source.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmhpc.errors import DmhpcError

LAYOUTS = ("NCHW", "NHWC")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz")  # .fz: fpack's tile-compressed FITS
CATALOG_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits",
                   ".parquet": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}


class RowIndexed:
    """Indexed along its first axis as an array is (a slice, an index, an index array), each read
    by `_rows` with the rows' indices."""

    shape: tuple

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, index: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            index = np.arange(*key.indices(len(self)))
        elif isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        else:
            index = np.asarray(key, dtype=np.int64)
        return self._rows(index)


class ImageArray(RowIndexed):
    """(N, C, H, W) float32 rows read on demand; see the module docstring."""

    dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 4


class ArrayRows(ImageArray):
    """Rows of an in-memory array, a `FileRows` or a FITS section (any float dtype or byte order), as native
    float32 in NCHW, NaN replaced by `nan_fill` when given."""

    def __init__(self, array, layout: str = "NCHW", nan_fill: float | None = None, keep=None):
        self.array, self.layout, self.nan_fill = array, layout, nan_fill
        self._keep = keep  # an open file the array maps, kept open as long as we are
        n, a, b, c = array.shape
        self.shape = (n, a, b, c) if layout == "NCHW" else (n, c, a, b)
        self.dtype = array.dtype  # what the source holds (refused if not floating point); rows come as float32

    def _rows(self, index: np.ndarray) -> np.ndarray:
        block = np.asarray(self.array[index])
        if self.layout == "NHWC":
            block = block.transpose(0, 3, 1, 2)
        with np.errstate(over="ignore"):  # a float64 value beyond float32 becomes Inf, refused as such downstream
            block = np.ascontiguousarray(block, dtype=np.float32)
        return fill_nan(block, self.nan_fill)


class FileRows(RowIndexed):
    """A C-ordered array of `shape` and `dtype` stored from byte `offset` of a file (a .npy file's, a
    plain FITS cube's), its rows read with positioned reads (os.preadv) rather than through a memory
    map: a file saved again or cut short while it is read (np.save to its name, a copy onto it) is a
    one-line error naming it, where a map's read past the new end killed the process with SIGBUS, no
    word said."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, offset: int):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._offset = offset
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        # Positioned reads only: no shared position to race on. Closed with the object (a file
        # object left to the collector was a ResourceWarning, and an open file until then).
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DmhpcError(f"{path}: cannot read ({exc.strerror})") from None
        weakref.finalize(self, os.close, self._fd)

    def _rows(self, index: np.ndarray) -> np.ndarray:
        index = np.where(index < 0, index + len(self), index)  # (counted from the end, as an array's)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.path}: rows {index.min()}..{index.max()} of {len(self)}")
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        rows = out.reshape(len(index), self._row_bytes // self.dtype.itemsize).view(np.uint8)
        starts = np.flatnonzero(np.diff(index, prepend=-2) != 1)  # runs of consecutive rows: one read each
        for a, b in zip(starts, [*starts[1:], len(index)]):
            self._read_into(rows[a:b], int(index[a]))
        return out

    def _read_into(self, rows: np.ndarray, first: int) -> None:
        view, want, got = memoryview(rows).cast("B"), rows.size, 0
        while got < want:
            try:
                n = os.preadv(self._fd, [view[got:]], self._offset + first * self._row_bytes + got)
            except OSError as exc:
                raise DmhpcError(f"{self.path}: cannot read ({exc.strerror})") from None
            if n == 0:
                raise DmhpcError(f"{self.path}: ends before its row {first + len(rows) - 1} now (saved again or cut "
                                 f"short while being read?); start again once it is whole")
            got += n


def check_nan_fill(value: float | None, dtype: str = "float32") -> None:
    """A --nan-fill must be a finite value pixels of `dtype` can hold: a NaN or an Inf there (or a
    value the type turns into Inf) filled nothing, or was refused later as the image's bad pixels,
    or (prepare) went into the statistics and gave a manifest load_manifest refuses."""
    if value is None:
        return
    largest = float(np.finfo(dtype).max)
    if not abs(value) <= largest:
        raise DmhpcError(f"--nan-fill {value:g}: expected a finite value that {dtype} can hold "
                         f"(at most {largest:g} in magnitude)")


def fill_nan(block: np.ndarray, value: float | None) -> np.ndarray:
    """`block` with its NaN replaced by `value` (None: left as they are). NaN only: an Inf is a
    broken pixel (or a float64 value beyond float32), still refused downstream; numpy's
    nan_to_num would turn it into float32's largest value and wreck the statistics."""
    if value is not None:
        np.copyto(block, np.float32(value), where=np.isnan(block))
    return block


def _fits_error(path, exc: Exception) -> DmhpcError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DmhpcError(f"{path}: not a readable FITS file ({reason})")


def open_fits_cube(path: str | os.PathLike, nan_fill: float | None = None, layout: str | None = None) -> ArrayRows:
    """The first image HDU of a FITS file as (N, C, H, W) rows: (N, C, H, W) or (N, H, W, C), detected
    unless `layout` is given, or (N, H, W) for one filter."""
    from astropy.io import fits  # noqa: F401  heavy, so only when FITS is used; imported before the
    # recording below, as astropy installs its own warning printer when first imported.
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            rows = _open_fits_cube(path, nan_fill, layout)
    except _Unreadable as exc:
        # A file cut short (a copy that stopped) fails only when its data is mapped, with a cryptic
        # TypeError; astropy's warning at opening says what happened: that is the reason given.
        cut = [str(w.message) for w in said if "truncated" in str(w.message)]
        raise _fits_error(path, Exception(cut[0]) if cut else exc.__cause__) from None
    for w in said:  # said as they would have been, outside the recording
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rows


class _Unreadable(Exception):
    pass


def _open_fits_cube(path: str | os.PathLike, nan_fill: float | None, layout: str | None) -> ArrayRows:
    from astropy.io import fits

    try:
        with open(path, "rb") as f:
            magic = f.read(3)
    except FileNotFoundError:
        raise DmhpcError(f"{path}: no such file") from None
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read ({exc.strerror})") from None
    compressed = "gzip" if magic[:2] == b"\x1f\x8b" else "bzip2" if magic == b"BZh" else None
    if compressed:
        # astropy would decompress the whole file into memory, on every rank: the cube is read by rows
        # only when plain (as a .fits.gz name is refused).
        raise DmhpcError(f"{path}: a compressed file ({compressed}); decompress it first")
    try:
        hdul = fits.open(path, memmap=False)  # headers only: no data is read through astropy but sections
    except FileNotFoundError:
        raise DmhpcError(f"{path}: no such file") from None
    except Exception as exc:
        raise _fits_error(path, exc) from None
    for number, hdu in enumerate(hdul):
        try:
            # Tile-compressed cubes too: their `data` decompressed the whole cube at opening, on every
            # rank; their section decompresses the tiles of the rows asked for.
            if hdu.is_image and hdu.header.get("NAXIS", 0) and (_scaled(hdu.header)
                                                               or isinstance(hdu, fits.CompImageHDU)):
                data = _SectionRows(Path(path), hdu.section, tuple(hdu.shape))  # (scaled by astropy as rows are read)
            elif hdu.is_image and hdu.header.get("NAXIS", 0):
                data = _plain_rows(Path(path), hdul, number, hdu)
            else:
                data = None
        except Exception as exc:
            hdul.close()
            raise _Unreadable() from exc
        if data is None:
            continue
        one_filter = len(hdu.shape) == 3  # _SectionRows adds the axis itself
        if data.ndim == 3:
            data = data[:, None]
        try:
            if data.ndim != 4:
                raise DmhpcError(f"{path}: HDU {hdu.name or 0} holds a {data.ndim}-d image {data.shape}; "
                                 f"expected a cube (N, C, H, W), (N, H, W, C) or (N, H, W)")
            check_fits_pixels(data.dtype, path, hdu.header)
            # A cube's layout as a .npy array's: an HWC cube was read as W channels of H x C pixels.
            found = "NCHW" if one_filter else detect_layout(data.shape, layout, str(path))
        except DmhpcError:
            hdul.close()
            raise
        # A one-filter cube beside another of its shape: a band each (g in the primary HDU, r and i in
        # extensions), of which the first alone was read, as a data set of one filter. (A variance or
        # weight cube by its name is none; a multi-filter cube's is its own business.)
        same = [f"{k}{f' ({h.name})' if h.name else ''}" for k, h in enumerate(hdul) if one_filter and k > number
                and h.is_image and h.header.get("NAXIS", 0) and tuple(h.shape) == tuple(hdu.shape)
                and not _not_a_filter(h.header)]
        if same:
            hdul.close()
            raise DmhpcError(f"{path}: HDU {number}{f' ({hdu.name})' if hdu.name else ''} and HDU {', '.join(same)} "
                             f"hold images of the same shape {tuple(hdu.shape)}, a filter each?; a file's images are "
                             f"read from one HDU: stack the filters into one (N, C, H, W) cube")
        if isinstance(data, FileRows):
            hdul.close()  # (the rows have a file of their own)
        return ArrayRows(data, found, nan_fill, keep=None if isinstance(data, FileRows) else hdul)
    hdul.close()
    raise DmhpcError(f"{path}: no image HDU with data")


_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}  # FITS data are big-endian


def _plain_rows(path: Path, hdul, number: int, hdu) -> FileRows:
    """The rows of an unscaled image HDU, read from the file by position (astropy would map them)."""
    dtype = np.dtype(_BITPIX[hdu.header["BITPIX"]])
    start, shape = hdul.fileinfo(number)["datLoc"], tuple(hdu.shape)
    if len(shape) == 3:  # (N, H, W), one filter: the same bytes as (N, 1, H, W)
        shape = (shape[0], 1, *shape[1:])
    need = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) < need:  # (astropy's warning at opening says it in its words)
        raise ValueError(f"File may have been truncated: {os.path.getsize(path)} bytes, its data end at {need}")
    return FileRows(path, shape, dtype, start)


def check_fits_pixels(dtype: np.dtype, path, header=None) -> None:
    """FITS pixels must come as floats, as astropy gives scaled ones (BSCALE): unscaled integers (int16,
    uint16 by BZERO 32768) are raw counts, whose scale no model trained on calibrated images shares.
    One rule for cubes and cutouts: cutouts had their integers converted to float32 and predicted on.
    With the HDU's `header`, integers are known by it: astropy gives floats for some (a BLANK, an
    offset other than the unsigned one), which passed as calibrated pixels."""
    raw = _raw_integers(header) if header is not None else None
    if raw or dtype.kind != "f":
        raise DmhpcError(f"{path}: pixels of dtype {raw or dtype.name}; expected floating point (integers without a "
                         f"BSCALE are raw counts: calibrate them first)")


def _raw_integers(header) -> str | None:
    """The integer type of pixels stored without a scale (BITPIX above 0, BSCALE 1), whatever BZERO
    and BLANK say; None for floating-point or scaled pixels."""
    bits = header.get("BITPIX", -32)
    if not isinstance(bits, int) or bits <= 0 or header.get("BSCALE", 1) != 1:
        return None
    zero, unsigned = header.get("BZERO", 0), 2 ** (bits - 1)
    name = f"uint{bits}" if bits > 8 and zero == unsigned else np.dtype(_BITPIX.get(bits, "i8")).name
    return name if zero in (0, unsigned) else f"{name} offset by BZERO {zero:g}"


def _scaled(header) -> bool:
    """Pixels with a scale or offset (BSCALE, BZERO: unsigned 16-bit integers, floats in other units),
    or integers with a blank value (BLANK); astropy maps none of them."""
    return header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or \
        (header.get("BITPIX", -32) > 0 and "BLANK" in header)


class _SectionRows:
    """Rows of a FITS image section (read from the file when asked for, scaled by astropy) as an
    (N, C, H, W) array; each run of consecutive rows asked for is one read."""

    def __init__(self, path: Path, section, shape: tuple):
        self.path, self.section = path, section
        self._lock = threading.Lock()  # every read is a seek and a read on one file: prepare's writers share it
        self._one_filter = len(shape) == 3  # (N, H, W)
        self.shape = (shape[0], 1, *shape[1:]) if self._one_filter else shape
        self.ndim = len(self.shape)
        # The last row now: a file cut short is refused at opening, not partway through a conversion.
        last = self[np.array([shape[0] - 1])] if shape[0] else self.section[0:0]
        self.dtype = last.dtype  # BSCALE gives floats; the unsigned BZERO alone, integers

    def __getitem__(self, index):
        # Indexed as an array is: negative rows from the end, rows past it an IndexError (a section
        # gave one row for two, or none).
        index = np.arange(self.shape[0])[index if isinstance(index, slice) else np.asarray(index, dtype=np.int64)]
        runs = [r for r in np.split(index, np.flatnonzero(np.diff(index) != 1) + 1) if r.size]
        try:
            with self._lock, np.errstate(over="ignore"):  # (a BSCALE past float32: Inf, refused downstream)
                blocks = [self.section[int(r[0]):int(r[-1]) + 1] for r in runs]
        except Exception as exc:  # astropy's, of a file cut short, or its decompressor's of a damaged tile
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DmhpcError(f"{self.path}: cannot read images {int(index[0])} to {int(index[-1])} ({reason}); "
                             f"saved again or cut short while it was read?") from None
        block = np.concatenate(blocks) if blocks else self.section[0:0]
        return block[:, None] if self._one_filter else block


def _refuse_underflow(plane: np.ndarray, path: Path) -> None:
    """A float64 filter whose every pixel is below float32's smallest normal number reads as 0 in
    float32: a cutout that passed as blank, and a data set of zeros (a .npy or a cube is checked on
    its own dtype before it is converted; a cutout is read converted)."""
    if plane.dtype.itemsize > 4 and plane.dtype.kind == "f":
        largest = float(np.nanmax(np.abs(plane), initial=0.0))
        tiny = float(np.finfo(np.float32).tiny)
        if 0.0 < largest < tiny:
            raise DmhpcError(f"{path}: no pixel brighter than {largest:.2g}, below float32's smallest normal number "
                             f"({tiny:.2g}): its flux units round to 0; scale the images up")


# Words of the EXTNAMEs of the planes surveys keep beside their filters (variance, inverse variance,
# weight, error, PSF, mask or flags, exposure map: VARIANCE, IVAR_G, WGT): one of same shape was
# stacked as one more filter, without a word.
_NOT_A_FILTER = re.compile(r"(VAR(IANCE)?|I(NV)?VAR|WE?I?GH?TS?|WHT|WT|ERR(OR)?S?|SIGMA|RMS|NOISE|PSF|MASK|"
                           r"FLAGS?|DQ|BPM|EXP(MAP|TIME)?)", re.IGNORECASE)


def _not_a_filter(header) -> bool:
    """Whether an HDU's EXTNAME names a plane other than a filter (`_NOT_A_FILTER`, any of its words)."""
    words = re.split(r"[\s_.\-]+", str(header.get("EXTNAME", "")).strip())
    return any(_NOT_A_FILTER.fullmatch(word) for word in words)


def _filter_name(header) -> str | None:
    """The filter a per-filter HDU says it holds: its FILTER or BAND card, else its EXTNAME (upper case)."""
    for key in ("FILTER", "BAND", "EXTNAME"):
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().upper()
    return None


def _read_cutout(path: Path) -> tuple[np.ndarray, tuple | None]:
    """A cutout's pixels as float32, as its file holds them, and None where they were one 3-d HDU
    (whose layout is to be placed), else the filters' names (`_filter_name`, None for an unnamed one)
    of its one (H, W) HDU per filter, stacked (C, H, W) in the file's order."""
    from astropy.io import fits

    try:
        # (a BSCALE past float32 overflows in astropy's scaling: Inf, refused as such downstream)
        with fits.open(path, memmap=False) as hdul, np.errstate(over="ignore"):
            found = [(k, hdu) for k, hdu in enumerate(hdul) if hdu.is_image and hdu.data is not None]
            planes = [hdu.data for _, hdu in found]
            # Every image HDU is a filter: an integer plane among floating-point ones is a mask or a
            # flag map (HSC's MASK), which was stacked as one more filter. Refused, not skipped: which
            # planes are filters is the user's to say, by the files they give.
            # (by the header: astropy gives a mask with a BLANK as floats)
            raw = [_raw_integers(hdu.header) or (None if hdu.data.dtype.kind == "f" else hdu.data.dtype.name)
                   for _, hdu in found]
            if not all(raw):
                for (k, hdu), integers in zip(found, raw):
                    if integers:
                        raise DmhpcError(f"{path}: HDU {k}{f' ({hdu.name})' if hdu.name else ''} holds "
                                         f"{integers} integers beside floating-point filters (a mask?); "
                                         f"every image HDU of a cutout is taken as a filter")
            for (k, hdu), plane in zip(found, planes):
                check_fits_pixels(plane.dtype, path, hdu.header)
                _refuse_underflow(plane, path)
                if len(found) > 1 and _not_a_filter(hdu.header):
                    raise DmhpcError(f"{path}: HDU {k} ({hdu.name}) is no filter, by its name; every image HDU "
                                     f"of a cutout is taken as a filter: write cutouts of the filters alone")
            # (beyond float32: Inf, refused as such downstream)
            if len(planes) == 1 and planes[0].ndim == 3:
                return planes[0].astype(np.float32), None
            if planes and all(p.ndim == 2 for p in planes):
                if len({p.shape for p in planes}) > 1:
                    raise DmhpcError(f"{path}: filters of different shapes {[p.shape for p in planes]}")
                return np.stack(planes).astype(np.float32), tuple(_filter_name(hdu.header) for _, hdu in found)
            raise DmhpcError(f"{path}: expected one (C, H, W) or (H, W, C) image HDU or one (H, W) HDU per filter, "
                             f"found {[p.shape for p in planes] or 'no image data'}")
    except FileNotFoundError:
        raise DmhpcError(f"{path}: no such cutout file") from None
    except DmhpcError:
        raise
    except Exception as exc:
        raise _fits_error(path, exc) from None


class Cutouts(ImageArray):
    """A catalog's cutouts, one FITS file per row; every cutout must have the first one's shape. The
    layout of a cutout's one HDU is the first one's, detected as a .npy array's unless given; one HDU
    per filter is NCHW. A cutout's error names its catalog row and id."""

    def __init__(self, catalog: Catalog, nan_fill: float | None = None, layout: str | None = None):
        files = catalog.files
        if not files:
            raise DmhpcError(f"{catalog.path}: lists no cutouts")
        self.files, self.nan_fill, self._catalog = files, nan_fill, catalog
        first, self._filters = self._read(0, _read_cutout)
        cube = self._filters is None
        if not cube and not 1 <= len(first) <= 4:  # no layout of the user's to name: its HDUs are the filters
            raise DmhpcError(f"{files[0]}: {len(first)} image HDUs, one per filter; expected 1 to 4 filters")
        self.layout = detect_layout((len(files), *first.shape), layout if cube else "NCHW", str(files[0]))
        self._cube_layout = self.layout if cube else (layout or "NCHW")  # of later files holding one HDU
        self.shape = (len(files), *(first.transpose(2, 0, 1) if self.layout == "NHWC" else first).shape)

    def _image(self, i: int) -> np.ndarray:
        """Cutout `i` as (C, H, W): one HDU in the layout of the first cutout's, or one HDU per filter,
        in the first's filter order where its HDUs name the first's filters in another order (a
        download of another pipeline had its channels swapped without a word), else in file order
        (names that differ otherwise, such as HSC's R and R2, or none, say nothing of the order)."""
        image, filters = self._read(i, _read_cutout)
        if filters is None:
            return image.transpose(2, 0, 1) if self._cube_layout == "NHWC" else image
        first = self._filters
        if first is None or None in filters or None in first or len(set(filters)) < len(filters) or \
                filters == first or sorted(filters) != sorted(first):
            return image
        return image[[filters.index(name) for name in first]]

    def _rows(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), *self.shape[1:]), np.float32)
        for k, i in enumerate(index):
            image = self._image(i)
            if image.shape != self.shape[1:]:
                raise DmhpcError(f"{self.files[i]}: cutout of shape {image.shape}; the first one "
                                 f"({self.files[0].name}) is {self.shape[1:]} ({self._row(i)})")
            out[k] = image
        return fill_nan(out, self.nan_fill)

    def _read(self, i: int, read: Callable[[Path], Any]) -> Any:
        try:
            return read(self.files[i])
        except DmhpcError as exc:
            raise DmhpcError(f"{exc} ({self._row(i)})") from None

    def _row(self, i: int) -> str:
        """Which catalog row and id named cutout `i` (the user's way to find it)."""
        return f"row {i + 1} of {self._catalog.path}, id {self._catalog.ids[i]}"


class CutoutFiles(Sequence):
    """Each row's cutout file, `folder / name`, made as it is asked for: a Path held for each row of
    a survey of millions took about 600 bytes a row, on every rank (its name, about 70)."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = folder, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.folder / name for name in self.names[index]]
        return self.folder / self.names[index]


@dataclass
class Catalog:
    """What a catalog table says of each row: id, label (or None), cutout file (or None)."""

    path: Path
    ids: list[str]
    labels: np.ndarray | None
    files: CutoutFiles | None
    id_dtype: str | None = None  # "i8", "u4"...: a typed id column's integers, which a catalog written keeps


CUTOUTS_HELP = ("folder of the cutout files; with --file-column, default the catalog's folder; without it, needed "
                "(each row's file is ID.fits there)")
"""The --cutouts option of every command that reads a catalog (read_catalog's rule)."""


def read_catalog(path: str | os.PathLike, *, id_column: str = "id", label_column: str | None = None,
                 file_column: str | None = None, cutouts: str | os.PathLike | None = None) -> Catalog:
    """Read a catalog with astropy.table. A file column's names are relative to `cutouts` (default:
    the catalog's folder); without one, the file of id X is X.fits in `cutouts`, and without
    `cutouts` either the rows name no files (`files` is None)."""
    from astropy.io import ascii
    from astropy.table import Table

    path = Path(path)
    fmt = CATALOG_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DmhpcError(f"{path}: unknown catalog format; expected one of {', '.join(CATALOG_FORMATS)}")
    if not path.is_file():
        raise DmhpcError(f"{path}: no such catalog")
    # A CSV carries no types: astropy would guess the ids 007 and 0123 are the numbers 7 and 123,
    # which name other cutout files (7.fits) and store other ids. Typed formats keep theirs.
    text_columns = {column: [ascii.convert_numpy(str)] for column in (id_column, file_column) if column is not None}
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would otherwise
    # become part of the first column's name.
    options = {"converters": text_columns, "encoding": "utf-8-sig"} if fmt == "ascii.csv" else {}

    if fmt == "fits":  # astropy reads the first table of several with a warning that names no file
        tables = _fits_tables(path)
        if len(tables) > 1:
            raise DmhpcError(f"{path}: holds {len(tables)} tables (HDUs {', '.join(tables)}); keep the catalog's "
                             f"in a file of its own")

    def read(**more):
        try:
            return Table.read(path, format=fmt, **options, **more)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DmhpcError(f"{path}: cannot read the catalog ({reason})") from None

    # A survey's catalog has hundreds of columns: read whole on every rank, they took more memory
    # than the nodes had. Only the columns asked for are read from CSV, Parquet and HDF5, and FITS
    # is paged in from the file. (ECSV is read whole: astropy rebuilds its Time, SkyCoord and unit
    # columns even when they are left out, and fails.)
    roles = {"id": id_column, "label": label_column, "file": file_column}
    if fmt == "ascii.csv":
        _refuse_repeated_names(path, [column for column in roles.values() if column is not None])
    wanted = list(dict.fromkeys(column for column in roles.values() if column is not None))  # (one in two roles)
    if fmt == "parquet":  # its schema first: the reader refuses names it does not have
        every = read(schema_only=True).colnames
        missing = [column for column in wanted if column not in every]
        table = None if missing else read(include_names=wanted)
    else:
        table = (read(include_names=wanted) if fmt == "ascii.csv" else read(memmap=True) if fmt == "fits"
                 else _hdf5_fields(path, wanted) if fmt == "hdf5" else None)
        if table is None:
            table = read()
        missing = [column for column in wanted if column not in table.colnames]
        every = read().colnames if missing and fmt == "ascii.csv" else table.colnames
    for role, column in roles.items():
        if column in missing:
            raise DmhpcError(f"{path}: no {role} column {column!r} (columns: {', '.join(every)})")
    for role, column in roles.items():
        if column is not None and table[column].ndim != 1:  # a vector column: a traceback, or labels of 2 values
            raise DmhpcError(f"{path}: {role} column {column!r} holds {table[column].shape[1:]} values per row; "
                             f"expected one")
    if len(table) == 0:
        raise DmhpcError(f"{path}: the catalog has no rows")
    kind = table[id_column].dtype
    if kind.kind in "fc":
        # As text a float id is 1.23765e+18 or 12.0, and beyond 2**53 (float32: 2**24) its digits were
        # lost when the column was written: the catalog predicted would not join back to the survey.
        raise DmhpcError(f"{path}: id column {id_column!r} holds floating-point numbers ({kind.name}, e.g. "
                         f"{str(table[id_column][0]).strip()}), which do not keep an id's digits; give an integer "
                         f"or text id column")
    ids = _cells(path, table, id_column, "id")
    labels = None
    if label_column is not None:
        labels = np.array(table[label_column])  # a copy: not a view of the FITS file's pages
        # An empty float cell is NaN, which FITS read paged in does not mask.
        if np.ma.is_masked(table[label_column]) or (labels.dtype.kind == "f" and not np.isfinite(labels).all()):
            raise DmhpcError(f"{path}: column {label_column!r} has empty labels")
    names = _cells(path, table, file_column, "file", ids) if file_column is not None else None
    del table  # a survey's table is several times its cells: gone before the checks below
    _refuse_repeats(path, ids, id_column, "id", "its own id")
    folder = Path(cutouts) if cutouts is not None else path.parent
    files = None
    if names is not None:
        files = CutoutFiles(folder, names)
        # Spelt apart, one file: "a.fits", "./a.fits" and its absolute path are the same image.
        where = os.path.abspath(folder)
        _refuse_repeats(path, [os.path.normpath(os.path.join(where, name)) for name in names], file_column, "file",
                        "its own cutout file", names)
    elif cutouts is not None:
        # ID.fits in the folder: an id of a path ("../x", "sub/y") reached outside it, or into another.
        bad = next((k for k, i in enumerate(ids) if "/" in i or "\0" in i or i in (".", "..")), None)
        if bad is not None:
            raise DmhpcError(f"{path}: id {ids[bad]!r} (row {bad + 1}) is no file name, and without a file column "
                             f"each row's cutout is ID.fits in {folder}; give a file column (--file-column)")
        files = CutoutFiles(folder, [f"{i}.fits" for i in ids])
    return Catalog(path, ids, labels, files, f"{kind.kind}{kind.itemsize}" if kind.kind in "iu" else None)


def _refuse_repeated_names(path: Path, columns: list[str]) -> None:
    """A CSV whose header names a column asked for twice (two catalogs pasted side by side): astropy
    renames the second (label_1) and read the first without a word."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next((row for row in csv.reader(f) if row and not row[0].lstrip().startswith("#")), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # the reader says what is wrong with the file
    names = [name.strip() for name in header]
    for column in columns:
        if names.count(column) > 1:
            raise DmhpcError(f"{path}: column {column!r} appears {names.count(column)} times in the header; "
                             f"rename all but the one to read")


def _fits_tables(path: Path) -> list[str]:
    """The names (or numbers) of a FITS file's table HDUs; none where it cannot be read (its reader
    says why)."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=True) as hdul:
            return [hdu.name or str(k) for k, hdu in enumerate(hdul)
                    if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU))]
    except Exception:
        return []


def _hdf5_fields(path: Path, columns: list[str]):
    """The `columns` of an HDF5 catalog's table, read alone (astropy reads every column of every row),
    each masked where the table stores its mask beside it (`NAME.mask`, astropy's masked columns).
    None where astropy must read the table: the file is not one table of these fields (its error,
    or a column it rebuilds from parts, such as a Time). Several tables are refused."""
    import h5py
    from astropy.table import MaskedColumn, Table

    try:
        with h5py.File(path, "r") as f:
            tables = []
            f.visititems(lambda name, item: tables.append(item) if isinstance(item, h5py.Dataset)
                         and item.dtype.kind == "V" else None)
            if len(tables) > 1:  # astropy reads the first, with a warning that names no file
                raise DmhpcError(f"{path}: holds {len(tables)} tables ({', '.join(t.name for t in tables)}); "
                                 f"keep the catalog's in a file of its own")
            fields = tables[0].dtype.names if tables else ()
            if not set(columns) <= set(fields):
                return None
            masks = [f"{c}.mask" for c in columns if f"{c}.mask" in fields]
            rows = tables[0].fields([*columns, *masks])[:]
    except DmhpcError:
        raise
    except Exception:  # (h5py's errors of a file that is no HDF5 table of these fields: astropy's reader says)
        return None
    return Table([MaskedColumn(rows[c], name=c, mask=rows[f"{c}.mask"]) if f"{c}.mask" in masks else rows[c]
                  for c in columns], names=columns, copy=False)


def _cells(path: Path, table, column: str, role: str, ids: list[str] | None = None) -> list[str]:
    """A column's cells as stripped strings; a one-line error for empty ones. An empty cell reads as
    masked (str "--") or as blanks: as an id it would merge unrelated rows into one object (or
    name a row "--"); as a file, name another file or the cutouts folder itself."""
    cells = [str(v).strip() for v in table[column]]
    masked = np.ma.getmaskarray(table[column])
    empty = [k for k, cell in enumerate(cells) if masked[k] or not cell]
    if empty:
        where = f" (id {ids[empty[0]]})" if ids else ""
        raise DmhpcError(f"{path}: column {column!r} has {len(empty)} empty {role} cell(s), the first in "
                         f"row {empty[0] + 1}{where}")
    return cells


def _refuse_repeats(path: Path, keys: list[str], column: str, role: str, wanted: str,
                    cells: list[str] | None = None) -> None:
    """A one-line error for the first value of a column found in more than one row. A repeated id
    or file was one image converted twice, possibly with two different labels, and an id that no
    longer names one row of the catalog `predict` writes."""
    if len(set(keys)) == len(keys):  # the usual case, in a set: a survey's dict of first rows was ~100 B a row
        return
    first, repeated = {}, None
    for k, key in enumerate(keys):
        if key in first:
            repeated = key
            break
        first[key] = k
    if repeated is None:
        return
    rows = [k + 1 for k, key in enumerate(keys) if key == repeated]
    shown = ", ".join(map(str, rows[:5])) + (f" (and {len(rows) - 5} more)" if len(rows) > 5 else "")
    value = (cells or keys)[rows[0] - 1]
    raise DmhpcError(f"{path}: {role} {value!r} of column {column!r} is in rows {shown}; each row must have {wanted}")


def open_npy(path: str | os.PathLike, expected: str = "a .npy file") -> np.ndarray:
    """Memory-map a .npy file; DmhpcError naming the file if it is missing or not a usable .npy
    (`expected`: what the file should have been, for that message)."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DmhpcError(f"{name}: no such file{_spelling_hint(p)}")
    if not p.is_file():
        raise DmhpcError(f"{name}: not a file")
    try:
        with open(p, "rb") as f:
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as exc:
        raise DmhpcError(f"{name}: cannot read ({exc.strerror})") from None
    if magic != np.lib.format.MAGIC_PREFIX:
        raise DmhpcError(f"{name}: not {expected}")
    try:
        array = np.load(p, mmap_mode="r", allow_pickle=False)
    # Truncated, Python objects that cannot be mapped, or a header edited by hand: a shape with a
    # negative or huge dimension (OverflowError), or one no memory map can take (MemoryError).
    except (ValueError, OSError, OverflowError, TypeError, MemoryError) as exc:
        raise DmhpcError(f"{name}: cannot read ({exc})") from None
    extra = p.stat().st_size - (getattr(array, "offset", 0) + array.nbytes)
    if extra > 0:  # numpy ignores them: files joined with `cat` read as the first, its rows lost
        raise DmhpcError(f"{name}: {extra} bytes after the {array.shape} array its header describes (files "
                         f"joined with cat, or a header edited by hand?); join arrays with np.concatenate")
    if array.ndim > 1 and not array.flags.c_contiguous:
        # Gathering rows from a column-major memmap reads the whole file for every block.
        raise DmhpcError(f"{name}: Fortran-ordered array; save it with np.save(path, np.ascontiguousarray(a))")
    return array


def resolve_spelling(path: Path) -> tuple[Path, str | None]:
    """`path`, or the one file in its folder whose name differs only in letter case (copies of the
    DeepMerge files spell `_X_` as `_x_`), with a note saying so."""
    if path.exists() or not path.parent.is_dir():
        return path, None
    matches = [p for p in path.parent.iterdir() if p.name.lower() == path.name.lower()]
    if len(matches) == 1:
        return matches[0], f"{path.name} not found; using {matches[0].name}, which differs in letter case only"
    return path, None


def _spelling_hint(path: Path) -> str:
    if not path.parent.is_dir():
        return ""
    close = [p.name for p in path.parent.iterdir() if p.name.lower() == path.name.lower()]
    return f" (did you mean {close[0]}?)" if close else ""


def detect_layout(shape: tuple, layout: str | None, name: str) -> str:
    """NCHW or NHWC for an image array of `shape`: `layout` if given, else detected.

    Detected when exactly one reading has 1 to 4 channels and square images; where neither has
    square images, when exactly one has 1 to 4 channels (a (N, 3, 16, 20) cube has no other reading).
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
    if not (nchw or nhwc):
        nchw, nhwc = 1 <= a <= 4, 1 <= c <= 4
    if nchw and nhwc:
        raise DmhpcError(f"{name}: shape {tuple(shape)} reads as NCHW or NHWC; pass --layout")
    if not (nchw or nhwc):
        raise DmhpcError(
            f"{name}: shape {tuple(shape)} has no channel axis of 1 to 4 beside square images;"
            " expected (N, C, H, W) or (N, H, W, C), or pass --layout"
        )
    return "NCHW" if nchw else "NHWC"


def check_pixel_dtype(dtype: np.dtype, name: str) -> None:
    """Pixels are real floating-point numbers: integers (counts) need a calibration first, and a
    complex array would lose its imaginary part, a structured one fail deep in a cast."""
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):  # FITS data are big-endian
        raise DmhpcError(f"{name}: dtype {dtype}; expected float16, float32 or float64")


def open_images(path: str | os.PathLike, layout: str | None = None, nan_fill: float | None = None) -> ArrayRows:
    """A .npy array or a FITS cube as rows; the layout is detected unless given."""
    path = Path(path)
    if path.suffix.lower() in FITS_SUFFIXES:
        return open_fits_cube(path, nan_fill, layout)
    header = open_npy(path, f"a .npy file or a FITS cube ({', '.join(FITS_SUFFIXES)}; a gzipped one decompressed)")
    check_pixel_dtype(header.dtype, str(path))
    raw = FileRows(path, header.shape, header.dtype, header.offset)  # (the map open_npy read the header with)
    return ArrayRows(raw, detect_layout(raw.shape, layout, str(path)), nan_fill)
