"""`dmhpc synth`: render the embedded GalSim merger data set, pristine and noisy, as .npy files.

Object k (k = 0 .. 2N-1) is a merger when k is odd. Its images depend on (seed, k, knobs) only:
it draws from its own generators, seeded by SeedSequence([seed, k]), and never from a shared
stream. So the files are the same bytes whatever the number of --workers or MPI ranks, and the
objects of `--n-per-class 10` are the first 20 of `--n-per-class 1000`.

The noisy domain is the pristine image observed once more: sky plus Poisson noise at the surface
brightness limit --sb-limit. The physics lives in dmhpc.data.scenes; docs/embedded-data.md
describes it. Output files are written under temporary names and renamed into place, meta.json
last: a directory without meta.json is incomplete, and one marked .dmhpc-incomplete (while the
renames run) may hold files of two renders, which prepare refuses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import sys
import time
from collections import deque
from pathlib import Path

import galsim
import numpy as np

from dmhpc import __version__
from dmhpc.checks import Invalid, integer
from dmhpc.data import scenes
from dmhpc.data.scenes import DEFAULT_KNOBS, KNOB_CHECKS, Knobs
from dmhpc.data.shards import INCOMPLETE
from dmhpc.errors import DmhpcError
from dmhpc.files import (fsync_directory, locked_directory, remove_orphans, reserve, temporary_of, temporary_path,
                         write_error)
from dmhpc.mpi import abort_all, launched_rank, world_comm
from dmhpc.progress import progress_bar

IMAGE_FILES = ("pristine_X.npy", "noisy_X.npy")
OUTPUT_FILES = IMAGE_FILES + ("pristine_y.npy", "noisy_y.npy", "objects.npy", "meta.json")
SURVEY_FILES = ("survey_X.npy", "survey_y.npy", "survey_objects.npy")
RENDER_FILES = OUTPUT_FILES + SURVEY_FILES + (INCOMPLETE,)  # every file a render may write
# The survey objects' seed sequences are keyed [seed, k, SURVEY_STREAM], the simulated objects' [seed, k]:
# numpy pads a key of up to 4 words with zeros, so a tag anywhere but after k ([seed, 2, 0] is [seed, 2])
# made survey object 0 the simulated object 2, primary galaxy and all. Seeds stay one word (< 2**32).
SURVEY_STREAM = 2
MAX_SEED = 2**32 - 1
# Object ids, and survey ids after them (4 per pair of classes), stay one word too: an id of 2**32
# became two words of the key, and object 2**33 + 5 was survey object 5.
MAX_PER_CLASS = 2**30 - 1
CLASSES = {"0": "non-merger", "1": "merger"}
# The 8 symmetries of the square pixel grid; view v is np.rot90(flipped if v >= 4, k=v % 4).
VIEWS = ("identity", "rot90", "rot180", "rot270", "flip", "flip+rot90", "flip+rot180", "flip+rot270")
CHUNK = 16  # objects per unit of work handed to a process or sent between ranks
_TAG_HEAD, _TAG_DATA = 1, 2
_ERROR_WAIT = 300.0  # seconds a failed rank waits for rank 0 to end the render before it ends every rank



KNOB_FLAGS = {
    "sb_limit": ("--sb-limit", "MAG", "surface-brightness limit of the noisy domain, mag/arcsec^2: "
                 "its sky noise per pixel is one pixel's flux at this surface brightness"),
    "tidal_strength": ("--tidal-strength", "X", "multiplies the flux of every tidal tail, plume and bridge"),
    "neighbour_fraction": ("--neighbour-fraction", "F", "fraction of non-mergers with an unrelated faint neighbour"),
    "minor_fraction": ("--minor-fraction", "F", "fraction of mergers that are minor (flux ratio 1:10 to 1:4)"),
    "triple_fraction": ("--triple-fraction", "F", "fraction of mergers with a third galaxy"),
}


# ----------------------------------------------------------------------------- one object


def object_streams(seed: int, obj_id: int) -> list[np.random.Generator]:
    """The random streams of simulated object `obj_id`: three for its galaxies, one for its noise."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, obj_id]).spawn(4)]


def survey_streams(seed: int, k: int) -> list[np.random.Generator]:
    """The random streams of survey object k: three for its galaxies, one for its noise, one for its
    label, one for its PSF."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, k, SURVEY_STREAM]).spawn(6)]


def render_object(seed: int, obj_id: int, knobs: Knobs) -> tuple[int, np.ndarray, np.ndarray]:
    """Label (1 = merger), pristine image and noisy image ((3, 75, 75) float32) of object `obj_id`."""
    label = obj_id % 2
    streams = object_streams(seed, obj_id)
    comps = (scenes.merger if label else scenes.non_merger)(streams[:3], knobs)
    pristine = scenes.draw(comps)
    return label, pristine, scenes.observe(pristine, streams[3], knobs.sb_limit)


def render_survey_object(seed: int, k: int, knobs: Knobs) -> tuple[int, np.ndarray]:
    """Label and (3, 75, 75) float32 image (g, r, i) of survey object k: another galaxy than the
    simulation's object k, from the survey population, observed as the survey does."""
    streams = survey_streams(seed, k)
    label = scenes.survey_label(streams[4])
    comps = (scenes.merger if label else scenes.non_merger)(streams[:3], scenes.survey_knobs(knobs))
    return label, scenes.observe_survey(scenes.draw_survey(comps, streams[5]), streams[3])


def _render_chunk(task: tuple[int, int, int, Knobs, bool]) -> tuple[int, dict[str, np.ndarray]]:
    """Objects start .. start+count-1: (start, {file name: rows}), images stacked along the first axis;
    with the survey, its images and labels too."""
    seed, start, count, knobs, survey = task
    arrays = {name: np.empty((count, 3, 75, 75), dtype=np.float32) for name in IMAGE_FILES}
    if survey:
        arrays["survey_X.npy"] = np.empty((count, 3, 75, 75), dtype=np.float32)
        arrays["survey_y.npy"] = np.empty(count, dtype=np.int64)
    for i in range(count):
        _, arrays["pristine_X.npy"][i], arrays["noisy_X.npy"][i] = render_object(seed, start + i, knobs)
        if survey:
            arrays["survey_y.npy"][i], arrays["survey_X.npy"][i] = render_survey_object(seed, start + i, knobs)
    return start, arrays


def _chunks(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(size, hi - s)) for s in range(lo, hi, size)]


# ----------------------------------------------------------------------------- output


def _reserved_memmap(partial: Path, final: Path, shape: tuple[int, ...]) -> np.memmap:
    """The empty temporary file `partial` as a float32 .npy of `shape`, its space allocated, mapped
    for writing.

    A page written through a map into a sparse file the disk has no room for is a SIGBUS, which
    kills the process with no message and its temporary files left; allocated first, a full disk
    or a quota is an OSError here, before anything is rendered. The header and the zeros are the
    bytes open_memmap(mode="w+") writes (it chooses format 1.0 for any header this small)."""
    dtype = np.dtype(np.float32)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        with open(partial, "r+b") as f:
            np.lib.format.write_array_header_1_0(f, header)
            size = f.tell() + math.prod(shape) * dtype.itemsize
            if not reserve(f.fileno(), size):  # no fallocate at all: sparse as before, at the old risk
                f.truncate(size)
    except OSError as exc:
        raise write_error(final, exc) from None
    return np.lib.format.open_memmap(partial, mode="r+")


def _write_views(images: dict[str, np.ndarray], views: int, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Objects start.. of `arrays` into the image files `images`, all their views: row = object *
    views + view."""
    count = len(arrays["pristine_X.npy"])
    rows = slice(start * views, (start + count) * views)
    for name, dest_file in images.items():
        source = arrays[name]
        dest = dest_file[rows].reshape(count, views, *source.shape[1:])
        for v in range(views):
            flipped = source[..., ::-1] if v >= 4 else source
            dest[:, v] = np.rot90(flipped, k=v % 4, axes=(-2, -1))


class _Staging:
    """The output files under temporary names; renamed into place by commit(), removed on failure."""

    def __init__(self, out: Path, n_objects: int, views: int, survey: bool):
        self.out, self.views = out, views
        # meta.json last: it says the render is finished, the survey files included.
        images_and_labels = tuple(n for n in OUTPUT_FILES if n != "meta.json")
        self.files = images_and_labels + (SURVEY_FILES if survey else ()) + ("meta.json",)
        self.partial: dict[str, Path] = {}
        self.renamed: list[Path] = []
        self.images: dict[str, np.memmap] = {}
        shape = (n_objects * views, 3, 75, 75)
        try:
            for name in self.files:
                self.partial[name] = temporary_path(out / name)
            for name in IMAGE_FILES + (("survey_X.npy",) if survey else ()):
                self.images[name] = _reserved_memmap(self.partial[name], out / name, shape)
        except BaseException:
            # The caller has no staging to discard yet: the files made so far go here.
            self.discard()
            raise
        self.survey_labels = np.zeros(n_objects, dtype=np.int64) if survey else None

    def put(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write objects start.. (all their views) to their rows, and their survey labels."""
        _write_views(self.images, self.views, start, arrays)
        self.put_labels(start, arrays.get("survey_y.npy"))

    def put_labels(self, start: int, labels: np.ndarray | None) -> None:
        if self.survey_labels is not None:
            self.survey_labels[start:start + len(labels)] = labels

    def targets(self) -> tuple[int, dict[str, str]]:
        """What a render worker needs to write its rows into the staged image files itself."""
        return self.views, {name: str(self.partial[name]) for name in self.images}

    def commit(self, labels: np.ndarray, objects: np.ndarray, meta: dict) -> None:
        for images in self.images.values():
            images.flush()
        self.images.clear()
        arrays = {"pristine_y.npy": labels, "noisy_y.npy": labels, "objects.npy": objects}
        if self.survey_labels is not None:
            # Survey objects are other galaxies: ids after the simulation's, each in all its views.
            views = len(objects) // len(self.survey_labels)
            arrays["survey_y.npy"] = np.repeat(self.survey_labels, views)
            arrays["survey_objects.npy"] = objects + len(self.survey_labels)
        files = {name: lambda f, a=array: np.save(f, a) for name, array in arrays.items()}
        files["meta.json"] = lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode())
        for name, write in files.items():
            try:
                with open(self.partial[name], "wb") as f:  # np.save would append ".npy" to the name
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before meta.json says the set is finished (a node crash)
            except OSError as exc:  # np.save's OSError names no file
                raise write_error(self.out / name, exc) from None
        # The folder marked first, then an older meta.json removed, so a crash between the renames
        # leaves no complete-looking set: prepare refuses a marked folder (it took a new render's
        # survey images beside the old one's labels, and verify passed them).
        (self.out / INCOMPLETE).touch()
        fsync_directory(self.out)
        (self.out / "meta.json").unlink(missing_ok=True)
        if self.survey_labels is None:  # an older set's survey files: the new meta.json does not describe them
            for name in SURVEY_FILES:
                (self.out / name).unlink(missing_ok=True)
        for name in self.files:
            os.replace(self.partial[name], self.out / name)
            self.renamed.append(self.out / name)
        fsync_directory(self.out)
        (self.out / INCOMPLETE).unlink()
        fsync_directory(self.out)

    def discard(self) -> None:
        self.images.clear()
        for path in [*self.partial.values(), *self.renamed]:
            path.unlink(missing_ok=True)


def _claim_output(out: Path, overwrite: bool, held: contextlib.ExitStack) -> bool:
    """Create or check the output folder and lock it for this render (held until `held` closes);
    True when this call created it.

    A folder holding only synth's files and their temporary files, without meta.json, is a render that
    was killed: it is rendered again without --overwrite. Its orphan temporary files (full-size
    images, each killed run leaves a set) are removed under the lock, where no other synth can be
    writing them."""
    try:
        if not stat.S_ISDIR(out.stat().st_mode):
            raise DmhpcError(f"{out}: exists and is not a directory")
    except FileNotFoundError:
        pass
    except OSError as exc:  # a parent one may not enter, a name too long: what rank 0 sends the others
        raise DmhpcError(f"{out}: cannot look at it ({exc.strerror or exc})") from None
    # The lock first: it makes the missing parents (its file lies beside `out`) and removes those it
    # made when they are left empty, so a failed render leaves no folder behind, parents included.
    held.enter_context(locked_directory(out, "dmhpc synth"))
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        held.close()
        raise DmhpcError(f"{out}: cannot create directory ({exc.strerror})") from None
    try:
        try:
            if not overwrite:
                names = sorted(p.name for p in out.iterdir())
                if "meta.json" in names:
                    raise DmhpcError(f"{out}: holds a finished render (meta.json); pass --overwrite to replace "
                                     f"the synth files in it")
                # (another writer's temporary file, a prediction's beside a render, say, is not synth's)
                foreign = [n for n in names if n not in RENDER_FILES and temporary_of(n) not in RENDER_FILES]
                if foreign:
                    raise DmhpcError(f"{out}: not empty (holds {foreign[0]}); pass --overwrite to replace the "
                                     f"synth files in it")
            remove_orphans(out, of=RENDER_FILES)
        except OSError as exc:  # an unreadable folder, a leftover file another user owns: one line, which
            # rank 0 sends the other ranks (an OSError escaped before, and they waited for it forever)
            raise DmhpcError(f"{exc.filename or out}: cannot claim it for the render: {exc.strerror or exc}") from None
    except BaseException:
        _remove_if_empty(out, created)
        held.close()  # after: the lock removes the parents it made when they are empty
        raise
    return created


def _remove_if_empty(out: Path, created: bool) -> None:
    """A folder this render created goes when a failure leaves it empty (removed meanwhile: the
    failure is still what is said)."""
    if created:
        with contextlib.suppress(OSError):
            if not any(out.iterdir()):
                out.rmdir()


# ----------------------------------------------------------------------------- checks and meta


def _check(n_per_class: int, seed: int, knobs: Knobs, workers: int) -> None:
    values = [("--n-per-class", n_per_class, integer(1, MAX_PER_CLASS)), ("--seed", seed, integer(0, MAX_SEED)),
              ("--workers", workers, integer(1))]
    values += [(KNOB_FLAGS[key][0], value, KNOB_CHECKS[key]) for key, value in knobs._asdict().items()]
    for flag, value, check in values:
        try:
            check(value)
        except Invalid as exc:
            raise DmhpcError(f"{flag}: {exc}") from None


def _meta(n_per_class: int, seed: int, knobs: Knobs, views: tuple[str, ...], survey: bool) -> dict:
    n_objects = 2 * n_per_class
    sigma = scenes.noise_sigma(knobs.sb_limit)
    return {
        "format": "dmhpc-synth",
        "version": 1,
        "seed": seed,
        "n_per_class": n_per_class,
        "augment": len(views) > 1,
        "views": list(views),
        "counts": {
            "objects": n_objects,
            "images": n_objects * len(views),
            "per_class": {label: n_per_class * len(views) for label in CLASSES},
        },
        "classes": CLASSES,
        "rows": "row = object * len(views) + view; object k is a merger (label 1) when k is odd",
        "shape": [len(scenes.FILTERS), scenes.STAMP, scenes.STAMP],
        "dtype": "float32",
        "layout": "NCHW",
        "pixel_scale_arcsec": scenes.PIXEL_SCALE,
        "zero_point_ab": scenes.ZERO_POINT,
        "image_unit": "10 nJy per pixel: flux = 10**(-0.4 * (AB magnitude - zero_point_ab))",
        "filters": [
            {
                "name": f.name,
                "instrument": f.instrument,
                "wavelength_nm": f.wavelength_nm,
                "psf": {
                    "model": "Airy(wavelength, diameter, obscuration) convolved with Gaussian(blur)",
                    "diameter_m": f.diameter_m,
                    "obscuration": f.obscuration,
                    "blur_sigma_arcsec": f.blur_arcsec,
                    "fwhm_arcsec": round(scenes.psf_fwhm(i), 4),
                },
                "sky_mag_arcsec2": f.sky_mag_arcsec2,
                "sky_per_pixel": scenes.sky_per_pixel(f),
                "gain_counts_per_unit": scenes.gain(f, knobs.sb_limit),
                "read_noise_per_pixel": scenes.read_noise(f, knobs.sb_limit),
                "noise_sigma_per_pixel": sigma,
            }
            for i, f in enumerate(scenes.FILTERS)
        ],
        "noise": {
            "sb_limit_mag_arcsec2": knobs.sb_limit,
            "sigma_per_pixel": sigma,
            "sigma_formula": "10**(-0.4 * (sb_limit - zero_point_ab)) * pixel_scale_arcsec**2",
            "model": "noisy = Poisson(gain * (pristine + sky)) / gain - sky + Normal(0, read_noise), "
                     "gain = max(sky / sigma**2, 50 / sky), read_noise = sqrt(sigma**2 - sky / gain)",
        },
        "knobs": knobs._asdict(),
        "gsparams": {"folding_threshold": scenes.GSPARAMS.folding_threshold,
                     "maxk_threshold": scenes.GSPARAMS.maxk_threshold},
        "software": {"dmhpc": __version__, "galsim": galsim.__version__, "numpy": np.__version__},
        **({"survey": _survey_meta(n_objects, len(views), knobs)} if survey else {}),
    }


def _survey_meta(n_objects: int, views: int, knobs: Knobs) -> dict:
    pop = scenes.SURVEY_POPULATION
    return {
        "files": list(SURVEY_FILES),
        "objects": f"{n_objects} other galaxies, ids {n_objects} to {2 * n_objects - 1}, {views} view(s) each",
        "labels": f"1 = merger, drawn per object with probability {pop.merger_fraction}",
        "filters": [{"name": f.name, "wavelength_nm": f.wavelength_nm, "seeing_fwhm_arcsec": f.seeing_fwhm_arcsec,
                     "psf": f"Moffat(beta={scenes.MOFFAT_BETA})", "sky_mag_arcsec2": f.sky_mag_arcsec2,
                     "sky_per_pixel": scenes.survey_sky_per_pixel(f)} for f in scenes.SURVEY_FILTERS],
        "native_pixel_scale_arcsec": scenes.SURVEY_PIXEL_SCALE,
        "native_pixels": scenes.SURVEY_NATIVE,
        "resampled_to": [scenes.STAMP, scenes.STAMP],
        "resampling": "cubic spline (scipy.ndimage.zoom, order 3) after the noise: the noise is correlated",
        "zero_point_ab": scenes.SURVEY_ZERO_POINT,
        # (a resampled pixel is smaller than a native one: the stamp's sum is (75/64)^2 its counts)
        "image_unit": "counts per native pixel's area (a surface brightness), as resampled: a source's counts "
                      "= 10**(-0.4 * (AB magnitude - zero_point_ab)) = the sum of its pixels x "
                      "(pixel_scale_arcsec / native_pixel_scale_arcsec)**2",
        "pixel_scale_arcsec": scenes.SURVEY_PIXEL_SCALE * scenes.SURVEY_NATIVE / scenes.STAMP,
        "noise": {"sb_limit_mag_arcsec2": scenes.SURVEY_SB_LIMIT,
                  "sigma_per_native_pixel": scenes.survey_noise_sigma()},
        "spectrum": "each component's f_nu ~ lambda^alpha through its F814W and F160W fluxes",
        "population": {**pop._asdict(), "tidal_strength": knobs.tidal_strength,
                       "triple_fraction": knobs.triple_fraction},
    }


# ----------------------------------------------------------------------------- parallel rendering


def _render_into(task: tuple[tuple[int, int, int, Knobs, bool], int, dict[str, str]]
                 ) -> tuple[int, int, np.ndarray | None]:
    """A render worker's chunk, written into the staged image files `staged` by the worker itself:
    (start, count, survey labels or None) is all it sends back, a few hundred bytes.

    ProcessPoolExecutor's reader waits forever for the rest of a result a killed worker was
    sending, and megabytes of images go down its pipe in many writes; a message this small is one
    write, which a pipe takes whole or not at all."""
    chunk, views, staged = task
    start, arrays = _render_chunk(chunk)
    images = {}
    for name, path in staged.items():
        try:
            images[name] = np.load(path, mmap_mode="r+")
        except OSError as exc:  # named as the file it would have been: the temporary one is removed
            raise write_error(Path(path).parent / name, exc) from None
    _write_views(images, views, start, arrays)
    return start, len(arrays["pristine_X.npy"]), arrays.get("survey_y.npy")


def _render_local(out: Path, seed: int, knobs: Knobs, survey: bool, n_objects: int, workers: int,
                  staging: _Staging) -> None:
    """Render every object here, in `workers` processes, into `staging`."""
    size = max(1, min(CHUNK, n_objects // (4 * workers)))
    chunks = [(seed, start, count, knobs, survey) for start, count in _chunks(0, n_objects, size)]
    with progress_bar(n_objects, "synth", unit="obj", leave=True) as bar:
        if workers == 1:
            for start, arrays in map(_render_chunk, chunks):
                staging.put(start, arrays)
                bar.update(len(arrays["pristine_X.npy"]))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # Not multiprocessing.Pool: a worker killed there (the OOM killer, kill -9) loses its task
        # and the render waits for it forever; the executor fails every pending task instead.
        # spawn: the same on Linux and macOS, and no fork of a process that may hold threads.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_leaves_interrupts)
        try:
            _run_pool(pool, chunks, staging, workers, bar)
        except BrokenProcessPool:
            raise DmhpcError(f"{out}: a render worker died (killed by signal?); run again to finish the "
                             f"render") from None
        finally:
            # On any failure the chunks not started are dropped; those running end within seconds.
            pool.shutdown(wait=True, cancel_futures=True)


def _run_pool(pool, chunks: list, staging: _Staging, workers: int, bar) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    todo, running = iter(chunks), set()
    while True:
        # Two chunks per worker in flight: none waits for work.
        while len(running) < 2 * workers and (chunk := next(todo, None)) is not None:
            running.add(pool.submit(_render_into, (chunk, *staging.targets())))
        if not running:
            break
        done, running = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            start, count, labels = future.result()
            staging.put_labels(start, labels)
            bar.update(count)


def _worker_leaves_interrupts() -> None:
    """Ctrl-C reaches the whole process group: the render's process ends the workers, which
    otherwise each printed a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigterm_raises(out: Path):
    """SIGTERM (`kill PID`, a wrapper, a time limit) ends the render as a failure does: its workers
    go and its staged files with them. It died at once before, leaving the staged files, and its
    workers, which hold their task queue's pipe open themselves, waited on it for ever."""
    def stop(signum, frame):
        raise DmhpcError(f"{out}: stopped by SIGTERM; run again to render")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _render_mpi(comm, seed: int, knobs: Knobs, survey: bool, n_objects: int, sink) -> None:
    """Rank r renders objects [r*n/K, (r+1)*n/K); rank 0 hands its own and everyone's chunks to sink."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = rank * n_objects // size, (rank + 1) * n_objects // size
    mine = _chunks(lo, hi, CHUNK)
    if rank != 0:
        pending = deque()
        for start, count in mine:
            _, arrays = _render_chunk((seed, start, count, knobs, survey))
            # Sent in the order of their names; the receiver allocates the same arrays in that order.
            sends = [comm.Isend(arrays[name], dest=0, tag=_TAG_DATA) for name in sorted(arrays)]
            pending.append(([comm.isend((start, count), dest=0, tag=_TAG_HEAD), *sends], arrays))
            # Two chunks in flight: rendering goes on while rank 0 is busy, in bounded memory.
            if len(pending) > 2:
                MPI.Request.Waitall(pending.popleft()[0])
        while pending:
            MPI.Request.Waitall(pending.popleft()[0])
        return

    status = MPI.Status()

    def receive(source: int) -> int:
        start, count = comm.recv(source=source, tag=_TAG_HEAD)
        if start is None:  # the rank failed: `count` says why
            raise DmhpcError(count)
        arrays = {name: np.empty((count, 3, 75, 75), dtype=np.float32)
                  for name in IMAGE_FILES + (("survey_X.npy",) if survey else ())}
        if survey:
            arrays["survey_y.npy"] = np.empty(count, dtype=np.int64)
        for name in sorted(arrays):
            comm.Recv(arrays[name], source=source, tag=_TAG_DATA)
        sink(start, arrays)
        return count

    remote = n_objects - (hi - lo)
    with progress_bar(n_objects, "synth", unit="obj", leave=True) as bar:
        for start, count in mine:
            sink(*_render_chunk((seed, start, count, knobs, survey)))
            bar.update(count)
            while remote and comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_HEAD, status=status):
                got = receive(status.Get_source())
                remote -= got
                bar.update(got)
        while remote:
            comm.Probe(source=MPI.ANY_SOURCE, tag=_TAG_HEAD, status=status)
            got = receive(status.Get_source())
            remote -= got
            bar.update(got)


def _hand_error_to_rank_0(comm, text: str, interrupted: bool = False) -> None:
    """Sent as a chunk's head, where rank 0 looks for the next one: it fails as on an error of its
    own, so its staged files go before it ends every rank. This rank's MPI_Abort killed rank 0 in a
    receive, and its full-size temporary files stayed. Ends every rank itself when rank 0 does not
    within a few minutes (ended already, or stuck). `interrupted`: Ctrl-C, which mpiexec passes to
    every rank; rank 0 says it once, so this rank says nothing of it."""
    try:
        request = comm.isend((None, text), dest=0, tag=_TAG_HEAD)  # (held: its buffer lives as long)
        time.sleep(_ERROR_WAIT)  # rank 0 reads heads between its own chunks, seconds apart
        del request
    finally:  # (the send failed, or an interrupt: rank 0 would wait for this rank forever)
        if not interrupted:
            print(f"dmhpc synth: error: {text}; ending the other ranks", file=sys.stderr, flush=True)
        abort_all(comm, 130 if interrupted else 1)


# ----------------------------------------------------------------------------- the library function


def synthesize(
    out_dir: str | os.PathLike,
    n_per_class: int,
    seed: int,
    *,
    sb_limit: float = DEFAULT_KNOBS.sb_limit,
    tidal_strength: float = DEFAULT_KNOBS.tidal_strength,
    neighbour_fraction: float = DEFAULT_KNOBS.neighbour_fraction,
    minor_fraction: float = DEFAULT_KNOBS.minor_fraction,
    triple_fraction: float = DEFAULT_KNOBS.triple_fraction,
    augment: bool = False,
    survey: bool = False,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Render 2 * n_per_class objects into `out_dir` and return the meta written to meta.json.

    Writes pristine_X.npy and noisy_X.npy ((N, 3, 75, 75) float32, channels F814W, F356W, F160W),
    pristine_y.npy and noisy_y.npy ((N,) int64, 1 = merger), objects.npy ((N,) int64) and meta.json.
    With `augment` every object appears in the 8 flips/rotations of the pixel grid (N = 16 *
    n_per_class), all sharing its object id. Refuses a folder holding a finished render (meta.json)
    or other files unless `overwrite`, which replaces only these files; a killed render (only these
    files and temporary ones) is rendered again. `survey` also renders a survey-like target of as
    many other objects (survey_X.npy in g, r, i; survey_y.npy; survey_objects.npy; see dmhpc.data.scenes). Under
    mpiexec (detected from the environment) the ranks share the objects and rank 0 writes; `workers` > 1 renders in that many processes instead. The bytes
    written depend only on the arguments other than `workers` and `overwrite`.
    """
    knobs = Knobs(sb_limit, tidal_strength, neighbour_fraction, minor_fraction, triple_fraction)
    _check(n_per_class, seed, knobs, workers)
    comm = world_comm()
    if comm is not None and workers > 1:
        raise DmhpcError(
            f"--workers {workers}: under mpiexec every rank renders its share; use ranks or workers, not both"
        )
    rank = 0 if comm is None else comm.Get_rank()
    out = Path(out_dir)
    views = VIEWS if augment else VIEWS[:1]

    created, error = False, None
    held = contextlib.ExitStack()
    if rank == 0:
        try:
            created = _claim_output(out, overwrite, held)
        except DmhpcError as exc:
            error = str(exc)
    if comm is not None:
        error = comm.bcast(error, root=0)
    if error is not None:
        raise DmhpcError(error)
    with held:  # rank 0 holds the folder's lock until its files are in place or gone
        return _render(out, n_per_class, seed, knobs, views, survey, workers, comm, created, held.close)


def _render(out: Path, n_per_class: int, seed: int, knobs: Knobs, views: tuple[str, ...], survey: bool,
            workers: int, comm, created: bool, release) -> dict:
    """Render into the claimed folder `out` (rank 0 writes; other ranks send their objects).
    `release()` lets go of the folder's lock (and removes its file): rank 0 calls it before
    MPI_Abort, which ends the process before the caller's `with` could."""
    rank = 0 if comm is None else comm.Get_rank()
    n_objects = 2 * n_per_class
    if rank != 0:
        try:
            # A SIGTERM to every rank: this one hands it to rank 0, as an error (had it died, mpiexec
            # ended rank 0 while it removed its staged files).
            with _sigterm_raises(out):
                _render_mpi(comm, seed, knobs, survey, n_objects, sink=None)
        except KeyboardInterrupt:
            _hand_error_to_rank_0(comm, f"rank {rank}: interrupted", interrupted=True)
        except BaseException as exc:  # rank 0 would wait for this rank forever
            text = str(exc) if isinstance(exc, DmhpcError) else repr(exc)
            _hand_error_to_rank_0(comm, f"rank {rank}: {text}")
        return _meta(n_per_class, seed, knobs, views, survey)

    staging = None
    try:
        # In one process or in many, a SIGTERM (a time limit, scancel) ends the render as a failure
        # does: with the serial loop and under MPI it died at once, leaving full-size staged images.
        with _sigterm_raises(out):
            meta = _meta(n_per_class, seed, knobs, views, survey)
            staging = _Staging(out, n_objects, len(views), survey)
            if comm is None:
                _render_local(out, seed, knobs, survey, n_objects, workers, staging)
            else:
                _render_mpi(comm, seed, knobs, survey, n_objects, staging.put)
            ids = np.arange(n_objects, dtype=np.int64)
            objects = np.repeat(ids, len(views))
            staging.commit(objects % 2, objects, meta)
    except BaseException as exc:
        if staging is not None:
            staging.discard()
        _remove_if_empty(out, created)
        said = DmhpcError(f"{exc.filename or out}: {exc.strerror or exc}") if isinstance(exc, OSError) else exc
        if comm is not None:  # the other ranks may be waiting on this one
            release()
            # The line the command prints without MPI (MPI_Abort adds its own after it).
            if isinstance(exc, KeyboardInterrupt):
                print("dmhpc synth: interrupted", file=sys.stderr, flush=True)
                abort_all(comm, 130)
            text = str(said) if isinstance(said, DmhpcError) else repr(said)
            print(f"dmhpc synth: error: {text}; ending the other ranks", file=sys.stderr, flush=True)
            abort_all(comm)
        if said is not exc:
            raise said from None
        raise
    return meta


# ----------------------------------------------------------------------------- command line


def synth_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created if missing; must be empty, or hold an unfinished render, "
                             "unless --overwrite)")
    parser.add_argument("--n-per-class", type=int, default=2000, metavar="N",
                        help="objects per class: N mergers and N non-mergers (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="the images are a function of the seed (default: 0)")
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="render in K processes (default: 1); the files do not depend on K")
    parser.add_argument("--augment", action="store_true",
                        help="store each object in all 8 flips and 90-degree rotations, sharing its object id")
    parser.add_argument("--survey", action="store_true",
                        help="also render a survey-like target: other galaxies seen from the ground (g, r, i; "
                             "seeing; 0.168\" pixels resampled; bright sky; counts), 60%% mergers "
                             "(survey_X.npy, survey_y.npy, survey_objects.npy)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the synth files of a non-empty --out (other files stay)")
    knobs = parser.add_argument_group("difficulty knobs")
    for key, (flag, metavar, help_text) in KNOB_FLAGS.items():
        default = getattr(DEFAULT_KNOBS, key)
        knobs.add_argument(flag, type=float, default=default, metavar=metavar,
                           help=f"{help_text} (default: {default:g})")


def prepared_from_other_files(out: Path) -> list[Path]:
    """The data sets under `out` (a `prepare`'s shards/, say) whose manifest lists a file of this
    render with other bytes than it has now: an --overwrite with another seed or knobs left them
    describing the images it replaced, and nothing compares a manifest's inputs when training."""
    from dmhpc.data.shards import file_sha256

    out = Path(out).resolve()
    ours = {str(out / name) for name in RENDER_FILES}
    digests: dict[str, str | None] = {}
    stale = []
    for manifest in sorted(out.glob("*/*/manifest.json")) + sorted(out.glob("*/manifest.json")):
        try:
            inputs = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", [])
            for entry in inputs:
                file = entry.get("file")
                if file in ours and file not in digests:
                    digests[file] = file_sha256(file) if os.path.isfile(file) else None
                if file in ours and digests[file] != entry.get("sha256"):
                    stale.append(manifest.parent)
                    break
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # not a manifest prepare wrote: not this render's to judge
    return stale


def synth_main(args) -> int:
    t0 = time.perf_counter()
    try:
        meta = synthesize(
            args.out, args.n_per_class, args.seed,
            **{key: getattr(args, key) for key in Knobs._fields},
            augment=args.augment, survey=args.survey, workers=args.workers, overwrite=args.overwrite,
        )
    except DmhpcError:
        if launched_rank() != 0:
            return 1  # rank 0 says it, once
        raise
    if launched_rank() == 0:
        counts = meta["counts"]
        print(f"dmhpc synth: {counts['images']} images per domain ({counts['objects']} objects, "
              f"{len(meta['views'])} view(s) each) in {args.out} ({time.perf_counter() - t0:.1f} s)")
        if args.overwrite:
            for folder in prepared_from_other_files(args.out):
                print(f"dmhpc synth: warning: {folder} was prepared from the images this render replaced; "
                      f"prepare it again (with --overwrite) before training on it", file=sys.stderr)
    return 0
