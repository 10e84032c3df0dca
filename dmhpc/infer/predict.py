"""`dmhpc predict`: a merger probability for every image, as a catalog, streamed across ranks and resumable.

    dmhpc predict --run RUN [--checkpoint best|last] (--data DIR | --images FILE | --catalog TABLE) --out CATALOG
    torchrun --nproc_per_node=4 -m dmhpc predict --run-dir RUN ...   (srun and mpiexec alike; slurm/predict.sh)

The images are cut into parts of --part-size rows (in the source's storage order); part k is
computed by rank k mod world size, a batch at a time, and written atomically to
CATALOG.parts/part-K.npz. The images held are a batch's, whatever the survey's size (the
input catalog's ids and file names are held whole, a few hundred bytes a row).
A rerun skips the parts already written, so a preempted job resumes where it stopped: on a stop
signal every rank finishes the part it is computing and exits with the requeue code (also after
the last part: the requeued job merges). When every
part is there, rank 0 merges them, sorted back into input order, into one catalog (an astropy
Table: the format follows the extension: .parquet, .fits, .csv, .ecsv, .h5/.hdf5) with the run,
checkpoint, data set and dmhpc version in its metadata (for plain CSV, which has no place for
it, in CATALOG.json beside it), and removes the parts. The catalog
itself (a few hundred bytes a row, docs/benchmarks.md) is assembled in memory on rank 0; the images
never are.

Batches start at part boundaries and have the same rows whatever the number of ranks, so one
rank and many give the same catalog, bit for bit on CPU, and a killed and rerun job gives the
catalog of an uninterrupted one.

Normalization: `--normalize target` (default) applies the per-channel statistics the run
normalized its target domain with during training (recorded in the checkpoint), so a new survey is
seen exactly as the run's target images were; `--normalize own` uses the new images' own
statistics (a prepared set's training statistics, else one extra pass over the images), which
is what per-domain normalization means for a survey whose flux scale differs from the target's.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from dmhpc import code_version, source_digest
from dmhpc.checks import show
from dmhpc.config import changed_keys
from dmhpc.data.batches import Normalizer, read_ahead
from dmhpc.data.inputs import CATALOG_FORMATS, CUTOUTS_HELP
from dmhpc.data.shards import file_sha256
from dmhpc.distributed import (AgreedError, agree, agreed, all_gather_object, barrier, bootstrap, gather,
                               meet_before_leaving, on_main, shutdown)
from dmhpc.errors import DmhpcError, reason_of
from dmhpc.files import (atomic_path, atomic_write, inside, is_temporary, locked_directory, make_folders, remove_empty,
                         remove_orphans, same_place, staged_write, temporary_path)
from dmhpc.progress import progress_bar
from dmhpc.infer.sources import DIGEST_BLOCK, Source, open_source
from dmhpc.names import MERGER, MERGER_THRESHOLD, VERIFY_LEVELS
from dmhpc.infer.trained import load_trained
from dmhpc.run import RunDir, check_shape, statistics
from dmhpc.train.checkpoint import IDLE_ATTEMPTS, REQUEUE_EXIT_CODE, STOP_SIGNALS, StopRequest
from dmhpc.train.step import autocast

HDF5_TABLE = "catalog"  # the table's path inside an HDF5 catalog
CSV_SHA = "CSVSHA"  # a plain CSV's provenance file: the SHA-256 of the CSV it stands beside
SPEC = "predict.json"
OWN_STATS = "own_stats.json"  # --normalize own's statistics in the parts folder, with the inputs they are of
ATTEMPTS = "attempts.json"  # the attempts of the job predicting into the parts folder, and the parts each found
PATHS = ("data", "images", "catalog", "cutouts")


def catalog_format(out: Path) -> str:
    fmt = CATALOG_FORMATS.get(out.suffix.lower())
    if fmt is None and out.is_dir():  # (its extension was blamed)
        raise DmhpcError(f"--out {out}: a folder; name the catalog file, its extension its format: one of "
                         f"{', '.join(CATALOG_FORMATS)}")
    if fmt is None:
        raise DmhpcError(f"--out {out}: the extension names the catalog format: one of {', '.join(CATALOG_FORMATS)}")
    return fmt


def provenance_file(catalog: Path) -> Path:
    """Where a plain CSV catalog's provenance is kept (CSV has no place for it; ECSV does)."""
    return Path(f"{catalog}.json")


class Model:
    """A run's classifier for inference: input normalization, forward, merger probability."""

    def __init__(self, run: RunDir, checkpoint: str, device: torch.device, amp: str = "none"):
        trained = load_trained(run, checkpoint)
        # The catalog records the SHA-256 of what was loaded: name, epoch and step alone are the same
        # for a run retrained with --overwrite.
        self.cfg, self.path, self.sha256, self.data = trained.cfg, trained.path, trained.sha256, trained.data
        self.checkpoint = trained.info
        self.net = trained.net.to(device)
        if self.cfg.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device, self.amp = device, amp

    def normalization(self, role: str) -> tuple[list[float], list[float]]:
        """(mean, std) per channel the run normalized `role` ("source" or "target") with."""
        return statistics(self.data[role])

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, classes) float64 class probabilities, (n,) float64 merger log-odds, logit(merger) -
        logit(non-merger)) of a normalized batch on the device."""
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.amp, self.device):
            _, logits = self.net(x)
        # float64, as the evaluation's: float32 rounds p to exactly 1.0 beyond a logit margin of ~17,
        # and every confident candidate of a catalog then ties (float64: beyond ~37; the log-odds
        # keep their order past that).
        logits = logits.double()
        return torch.softmax(logits, dim=1), logits[:, MERGER] - logits[:, 1 - MERGER]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(n, classes) float64 class probabilities of a normalized batch on the device."""
        return self.outputs(x)[0]


def _part_rows(count: int, part_size: int, k: int) -> tuple[int, int]:
    return k * part_size, min((k + 1) * part_size, count)


def _part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:06d}.npz"


def _part_problem(columns, index: np.ndarray, names: set) -> str | None:
    """What makes a part's columns not those of its rows (input positions `index`), or None. A part
    of the right length is not enough: an edited or foreign file would put rows twice into the
    catalog, leave others out, or break the merge."""
    if set(columns) != names:
        return f"columns {', '.join(sorted(columns))}; expected {', '.join(sorted(names))}"
    if any(len(columns[key]) != len(index) for key in names):
        return f"columns of other lengths than its {len(index)} rows"
    if not np.array_equal(columns["index"], index):
        return f"rows other than its {len(index)} rows (from input position {index[0]})"
    # A probability is in [0, 1], and the spread of values in [0, 1] at most 0.5 (NaN fails both).
    for key, top in (("p_merger", 1.0), ("p_merger_std", 0.5)):
        if key in names and not ((columns[key] >= 0) & (columns[key] <= top)).all():
            return f"{key} values outside [0, {top:g}]"
    return None


# A part's entries beside its columns: Source.cutout_files of its rows when it was computed, and
# the part's checksum (see _part_checksum).
PART_INPUTS, PART_CHECKSUM = "_cutout_files", "_checksum"


def _spec_digest(spec: dict) -> str:
    """What a part's checksum says it was computed for: the prediction's spec (without nan_fill where
    there is no fill, as before the key)."""
    text = json.dumps({key: value for key, value in spec.items() if not (key == "nan_fill" and value is None)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _spec_digests(spec: dict) -> tuple[str, str]:
    """The digests a part of this prediction may be checksummed with: its own (what its parts are
    written with), and that of the same prediction without --nan-fill, whose parts are only written
    when their images are finite, which no fill changes. A part of another fill is not one: its
    filled pixels were other numbers."""
    return _spec_digest(spec), _spec_digest({**spec, "nan_fill": None})


def _part_checksum(entries: dict, spec_digest: str) -> str:
    """SHA-256 of a part's entries (names, types, shapes, bytes) and of the prediction it belongs to:
    a part edited by hand, or copied from another prediction's folder, is computed again (on resume)
    or refused (at the merge) instead of being merged with numbers it does not hold."""
    digest = hashlib.sha256(spec_digest.encode())
    for key in sorted(entries):
        if key != PART_CHECKSUM:
            value = np.ascontiguousarray(entries[key])
            digest.update(json.dumps([key, value.dtype.str, value.shape]).encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _read_part(path: Path, spec_digests: tuple[str, ...]) -> tuple[dict, str] | str:
    """(the part's columns, its cutout-files entry), or why it is not a whole part of this prediction
    (`_spec_digests`). Missing or unreadable files raise (np.load's own errors)."""
    with np.load(path, allow_pickle=False) as z:
        entries = {key: z[key] for key in z.files}
    if PART_CHECKSUM not in entries or \
            str(entries[PART_CHECKSUM]) not in {_part_checksum(entries, d) for d in set(spec_digests)}:
        return "its checksum does not match its contents and this prediction (edited, or another prediction's)"
    # A part written before cutouts were recorded stands for inputs without cutout files.
    inputs = str(entries.get(PART_INPUTS, ""))
    return {key: value for key, value in entries.items() if key not in (PART_INPUTS, PART_CHECKSUM)}, inputs


def _part_done(path: Path, index: np.ndarray, names: set, inputs: str, spec_digests: tuple[str, ...]) -> bool:
    try:
        part = _read_part(path, spec_digests)
    except Exception:  # missing, or not a whole part: compute it (again)
        return False
    return not isinstance(part, str) and part[1] == inputs and _part_problem(part[0], index, names) is None


def _part_names(source: Source, tta: bool) -> set:
    return {*source.columns, "p_merger", "log_odds", *(("p_merger_std",) if tta else ())}


def _compute_part(model: Model, source: Source, normalize: Normalizer, start: int, stop: int, batch: int,
                  tta: bool) -> dict:
    """The part's columns: p_merger and log_odds (and p_merger_std with TTA) plus the source's columns."""
    out: dict[str, list] = {}
    spans = [(a, min(a + batch, stop)) for a in range(start, stop, batch)]
    with contextlib.closing(read_ahead(source.read, spans, ahead=model.device.type == "cuda")) as batches:
        for images, columns in batches:
            for key, value in batch_columns(model, normalize, images, columns, tta).items():
                out.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(values) for key, values in out.items()}


def _part_error(exc: Exception, batch_size: int, device: torch.device) -> tuple[str, bool]:
    """What every rank says of an error computing or writing a part, and whether it is a defect
    (its traceback stays on the rank it happened on). Out of memory is a user's choice of batch."""
    if isinstance(exc, DmhpcError):
        return str(exc), False
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc):
        return (f"out of memory on {device} at --batch-size {batch_size}: run again with a smaller one and "
                f"--overwrite (the parts written are computed again: a batch's size moves its results' last "
                f"bits)"), False
    return f"{type(exc).__name__}: {exc}", True


def batch_columns(model: Model, normalize: Normalizer, images: np.ndarray, columns: dict, tta: bool) -> dict:
    """One batch's source columns with p_merger and log_odds (and p_merger_std) added."""
    x = torch.from_numpy(images).to(model.device, non_blocking=True)
    if tta:
        square = x.shape[-1] == x.shape[-2]
        out = [model.outputs(normalize(x, torch.full((len(x),), c, dtype=torch.uint8, device=model.device)))
               for c in range(8 if square else 4)]
        p, log_odds = torch.stack([p[:, MERGER] for p, _ in out]), torch.stack([odds for _, odds in out])
        columns["p_merger"] = p.mean(0).cpu().numpy()
        columns["p_merger_std"] = p.std(0, unbiased=False).cpu().numpy()
        columns["log_odds"] = log_odds.mean(0).cpu().numpy()
    else:  # the batch is ours (read for this step): normalize it where it is
        p, log_odds = model.outputs(normalize.in_place(x))
        columns["p_merger"], columns["log_odds"] = p[:, MERGER].cpu().numpy(), log_odds.cpu().numpy()
    _finite_probabilities(model, columns)
    return columns


def _finite_probabilities(model: Model, columns: dict) -> None:
    """Refuse a batch with a non-finite probability before its part is written: the merge would only
    refuse the part, and a rerun compute it again. Finite pixels can still get there (one near 3e38
    overflows float32 when normalized; a checkpoint with NaN weights is refused when it is loaded).
    The values are on the host already."""
    bad = ~np.isfinite(columns["p_merger"]) | ~np.isfinite(columns["log_odds"])
    if "p_merger_std" in columns:
        bad |= ~np.isfinite(columns["p_merger_std"])
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DmhpcError(f"{model.path}: non-finite merger probability for image {int(columns['index'][k])} "
                         f"(id {columns['id'][k]}): a pixel too large for float32 once normalized, or an "
                         f"overflow in the network")


def _spec(run: RunDir, model: Model, source: Source, source_args: dict, options: dict) -> dict:
    """Everything a part's numbers depend on: the checkpoint's and the inputs' files as they are now
    (a prepared set's fingerprint covers its shards' contents), every source argument, the options."""
    # The checkpoint's record as predict has always written it: the early stopping it trained under
    # (recorded since 2026-12-05) changes no number, and refused the parts of a requeued prediction.
    checkpoint = {k: v for k, v in model.checkpoint.items() if k != "early_stopping"}
    return {"run": str(run.path.resolve()), "checkpoint": checkpoint, "checkpoint_sha256": model.sha256,
            "source": source.describe, "input_files": source.identity, **source_args, "count": source.count,
            "dmhpc_source": source_digest(), **options}


# What each provenance keyword holds, in COMMENT cards of a FITS catalog's header, for its reader
# (the other formats keep the values only; docs/catalog.md says the same).
META_COMMENTS = {
    "DMHPC": "dmhpc version (and git commit) that predicted", "RUN": "run directory of the model",
    "CKPT": "checkpoint of the run (best or last)", "CKPTSTEP": "training step of the checkpoint",
    "CKPTSHA": "SHA-256 of the checkpoint file", "SELECT": "criterion that chose the checkpoint",
    "SOURCE": "kind of input: data, images or catalog", "DATA": "input read",
    "DATASHA": "fingerprint of a prepared data set read", "INPUTSHA": "digest of input sizes and times",
    "NORM": "normalization: target (run's) or own", "MEAN": "per-filter mean normalized with",
    "STD": "per-filter standard deviation normalized with", "TTA": "mean over flips and rotations",
    "AMP": "precision of the forward pass", "SRCARGS": "how the input was opened (JSON)"}


def _write_fits(table, path: Path) -> None:
    """The catalog as astropy writes it, plus each column's description in its TCOMMn card (readers
    other than astropy's see only those) and CHECKSUM/DATASUM cards (fitsverify, `astropy.io.fits`
    with checksum=True check them): a FITS catalog carried no description a reader outside astropy
    sees, and no checksum of its own. Written once: the cards added to the written file grew its
    header, and astropy rewrote the whole file into a temporary file of its own, left on a full disk."""
    from astropy.io import fits
    from astropy.io.fits.connect import _encode_mixins  # what Table.write does first (private; pinned)

    hdu = fits.table_to_hdu(_encode_mixins(table), character_as_bytes=True)
    for n, column in enumerate(table.columns.values(), start=1):
        hdu.header.set(f"TCOMM{n}", column.description, after=f"TFORM{n}")
    hdu.writeto(path, overwrite=True, checksum=True)


def _check_writable(out: Path, meta: dict) -> None:
    """Refuse, before the inputs are read (a survey's checksums, its own statistics), what the
    catalog's name or format cannot hold of its provenance. FITS holds ASCII only: a header value
    that is not printable ASCII (a run or data path; a tab in it) was dropped from the header."""
    fmt = catalog_format(out)
    # The merge's temporary files, named longer than --out (".NAME.XXXXXXXX.tmp"): one past the file
    # system's name length failed the merge after the whole survey, "a rerun merges them" (never).
    for target in (out, provenance_file(out)) if fmt == "ascii.csv" else (out,):
        temporary_path(target).unlink()
    if fmt == "fits":
        for key, value in meta.items():
            if not all(32 <= ord(c) < 127 for c in str(value)):
                raise DmhpcError(f"--out {out}: a FITS header holds printable ASCII only and {key} {str(value)!r} "
                                 f"is not; write .parquet or .ecsv instead")


def _check_ids(out: Path, source: Source) -> None:
    """Refuse, before any image is predicted, ids the catalog's format cannot hold. FITS holds ASCII
    only: a non-ASCII id failed the write after the whole survey was computed. ECSV writes an id
    starting with # as it is, and reads that row back as a comment: the candidate was lost without
    a word."""
    fmt = catalog_format(out)
    if fmt == "fits":
        bad = source.first_id(lambda v: not v.isascii())
        if bad is not None:
            raise DmhpcError(f"--out {out}: FITS holds ASCII only and the id {bad[1]!r} of image {bad[0]} is not; "
                             f"write .parquet or .ecsv instead")
    elif fmt == "ascii.ecsv":
        bad = source.first_id(lambda v: v.lstrip().startswith("#"))
        if bad is not None:
            raise DmhpcError(f"--out {out}: ECSV would read the row of id {bad[1]!r} (image {bad[0]}) back as a "
                             f"comment; write .parquet or .csv instead")
    if fmt in ("ascii.csv", "ascii.ecsv"):
        # astropy writes a \r, a NEL or a U+2028 in an id unquoted, and its reader ends a line there: the
        # CSV read back had more rows than images, the ECSV none.
        bad = source.first_id(lambda v: len(v.splitlines()) > 1 or "\r" in v or "\n" in v)
        if bad is not None:
            raise DmhpcError(f"--out {out}: the id {bad[1]!r} of image {bad[0]} holds a line break, which a text "
                             f"table reads as the end of its row; write .parquet or .h5 instead")


def _saved_stats(parts: Path, inputs: str, read_as: dict, channels: int) -> tuple[list, list] | None:
    """The statistics a stopped prediction of the same inputs (`Source.digest`) read the same way
    (`read_as`: how open_source was called; --nan-fill and --layout change the pixels) computed, or
    None: a requeued survey job would read every image again for them. It is written whole
    (atomically), and only reused when it names these very inputs and holds what the pass would
    give (a positive, finite std per channel)."""
    try:
        saved = json.loads((parts / OWN_STATS).read_text())
        mean, std = saved["mean"], saved["std"]
        numbers = [v for v in mean + std if isinstance(v, (int, float)) and not isinstance(v, bool)]  # not "0.4"
        if saved["inputs"] != inputs or saved.get("read_as") != read_as or len(mean) != channels \
                or len(std) != channels or len(numbers) != 2 * channels \
                or not all(np.isfinite(numbers)) or min(std) <= 0:
            return None
        return mean, std
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: computed again
        return None


def _refuse_out_among_inputs(out: Path, **inputs) -> None:
    """Refuse a catalog (or the .json and .parts beside it) that would replace an input: --overwrite,
    which the refusal of an existing --out suggests, destroyed the survey's catalog or image cube."""
    for path in (out, provenance_file(out), Path(f"{out}.parts")):
        for flag, given in inputs.items():
            if given is None:
                continue
            folder = flag == "data"  # a prepared data set: its folder holds its shards only
            if inside(path, given) if folder else same_place(path, given):
                raise DmhpcError(f"--out {out}: {'inside' if folder else 'is'} --{flag} {given}, an input of this "
                                 f"prediction; write the catalog elsewhere")


def _lock_parts(out: Path, parts: Path, overwrite: bool, held: contextlib.ExitStack) -> None:
    """Rank 0, before any image is read (a survey's checksums and digest take long, and were read in
    full before these refusals): refuse a finished catalog (unless overwrite) and a folder in its
    place; make the parts folder and lock it into `held` until the merge, so a second predict on the
    same --out stops in one line instead of merging (or removing) this one's parts. The folders made
    here go again when the prediction ends with them empty (refused before it wrote in them)."""
    if out.is_dir():
        raise DmhpcError(f"--out {out}: is a folder; name the catalog file")
    if out.exists() and not overwrite:
        raise DmhpcError(f"--out {out}: exists; --overwrite replaces it")
    beside = provenance_file(out)
    if catalog_format(out) == "ascii.csv" and beside.exists() and not overwrite:  # (the CSV's, written with it)
        raise DmhpcError(f"--out {out}: {beside.name} beside it exists (its provenance file, which the catalog "
                         f"writes); --overwrite replaces it")
    try:
        made = make_folders(parts)
    except OSError as exc:  # a read-only folder, /proc, a file where a folder should be
        raise DmhpcError(f"--out {out}: cannot create {parts.name} beside it: {exc.strerror}; "
                         f"nothing written") from None
    if not parts.is_dir():
        raise DmhpcError(f"--out {out}: {parts.name} beside it is a file, not a prediction's parts; remove it or "
                         f"choose another --out")
    held.callback(remove_empty, made)
    held.enter_context(locked_directory(parts, "dmhpc predict"))
    # What killed writes of this catalog left (as large as it, beside it), and of its parts.
    remove_orphans(out.parent, of=(out.name, beside.name))
    remove_orphans(parts)


def _is_part(name: str) -> bool:
    """Whether `name` is a part's file name (see `_part_path`)."""
    return bool(re.fullmatch(r"part-\d{6,}\.npz", name))


def _part_count(parts: Path) -> int:
    return sum(1 for entry in parts.iterdir() if _is_part(entry.name))


def _requeued_attempts(parts: Path, job: str) -> list[dict]:
    """The attempts of job `job` that stopped for a requeue, as recorded in the parts folder."""
    try:
        record = json.loads((parts / ATTEMPTS).read_text())
        if record.get("job") != job:
            return []
        return [{"restart": int(a["restart"]), "before": int(a["before"]), "after": int(a["after"])}
                for a in record["requeued"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # none yet, or edited: nothing known
        return []


def _check_progress(parts: Path, attempt: dict | None) -> int:
    """Rank 0, holding the parts folder's lock: the parts there now; refuse to start attempt
    `attempt` (`DistInfo.attempt`) of a job whose last IDLE_ATTEMPTS attempts stopped for a requeue
    with no part added, none since. Such a job (a time limit shorter than a survey's checks and
    digest, or than one part) requeued itself without end, each attempt waiting in the queue and
    running to its limit again."""
    found = _part_count(parts)
    if attempt is None:
        return found
    before = [a for a in _requeued_attempts(parts, attempt["job"]) if a["restart"] < attempt["restart"]]
    idle = before[-IDLE_ATTEMPTS:]
    if len(idle) == IDLE_ATTEMPTS and all(a["before"] == a["after"] == found for a in idle):
        raise DmhpcError(f"{parts}: this is attempt {attempt['restart']} of job {attempt['job']}; attempts "
                         f"{' and '.join(str(a['restart']) for a in idle)} stopped for a requeue with no part added "
                         f"({found} there); not starting again to stop the same way: the job's log says where they "
                         f"stopped; submit it again with a longer --time or a smaller --part-size")
    return found


def _record_requeue(parts: Path, attempt: dict | None, before: int) -> None:
    """Rank 0, holding the lock, as attempt `attempt` stops for its job to requeue itself: note the
    parts it found (`before`) and leaves, for the next attempt's _check_progress."""
    if attempt is None:
        return
    requeued = [a for a in _requeued_attempts(parts, attempt["job"]) if a["restart"] != attempt["restart"]]
    requeued.append({"restart": attempt["restart"], "before": before, "after": _part_count(parts)})
    atomic_write(parts / ATTEMPTS, json.dumps({"job": attempt["job"], "requeued": sorted(
        requeued, key=lambda a: a["restart"])}) + "\n")


def _claim_parts(parts: Path, spec: dict, overwrite: bool) -> None:
    """Rank 0, holding the parts folder's lock: refuse parts of another prediction (unless overwrite,
    which empties the folder)."""
    saved = parts / SPEC
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):  # (a UnicodeDecodeError of a hand-edited file too)
            old = None
        old = old if isinstance(old, dict) else {}
        new = json.loads(json.dumps(spec))
        differs = changed_keys(old, new)
        # A prediction stopped at a NaN pixel, rerun with --nan-fill as told: its parts hold finite
        # images only, which the fill does not change; they are kept under the new spec.
        filled = differs == ["nan_fill"] and "nan_fill" in old and old["nan_fill"] is None
        # Parts of a dmhpc before part checksums (its spec named the checkpoint by size and time):
        # never reused, so nothing is lost by computing them again.
        older = "checkpoint_file" in old and "checkpoint_sha256" not in old
        # Parts of other code (dmhpc changed between a job's attempts; or named by no spec before):
        # computed again, so that no catalog joins two versions' numbers; a requeued job goes on.
        other_code = differs == ["dmhpc_source"]
        if old != new and filled:
            atomic_write(saved, json.dumps(spec, indent=2) + "\n")
        elif old != new:
            if older or other_code:
                what = "an older dmhpc, without checksums" if older else "another version of dmhpc"
                print(f"dmhpc predict: {parts}: parts of {what}; computing them again", flush=True)
            # Without a part computed there is nothing to lose: the new spec replaces the old one.
            if not overwrite and not older and not other_code and any(parts.glob("part-*.npz")):
                raise DmhpcError(f"{parts}: holds parts of another prediction (differs in {', '.join(differs)}); "
                                 f"--overwrite starts again")
            _remove_parts(parts, keep_folder=True)
    elif any(parts.iterdir()):
        # Parts without their spec: a removal of the folder killed halfway (the spec goes last). Its
        # parts were being thrown away; each one's checksum says whose it is in any case. Anything
        # else stays, as every removal leaves it (a scratch folder others share, left so by the last
        # prediction: refused, it stopped every later one to that --out).
        _remove_parts(parts, keep_folder=True)
    if not saved.is_file():
        atomic_write(saved, json.dumps(spec, indent=2) + "\n")


def _ours(entry: Path) -> bool:
    """Whether an entry of a parts folder is a file of a name a prediction writes there."""
    name = entry.name
    return (_is_part(name) or name in (SPEC, OWN_STATS, ATTEMPTS) or is_temporary(name)) and not entry.is_dir()


def _remove_parts(parts: Path, keep_folder: bool = False) -> None:
    """Remove the files a prediction wrote in its parts folder, its spec last: killed halfway, what is
    left still says whose parts it holds. Anything else there is left, with the folder, and said: the
    folder may be a link to scratch space that other files share (their folders and files were
    deleted with the parts)."""
    others = []
    for entry in sorted(parts.iterdir(), key=lambda e: e.name == SPEC):
        if keep_folder and entry.name == ATTEMPTS:  # (the job's attempts at this --out, whatever their parts)
            continue
        if _ours(entry):
            entry.unlink()
        else:
            others.append(entry.name)
    if others:
        print(f"dmhpc predict: {parts}: left in place, with what a prediction does not write there: "
              f"{', '.join(sorted(others)[:3])}{f' and {len(others) - 3} more' if len(others) > 3 else ''}",
              flush=True)
    if keep_folder or others:
        return
    if parts.is_symlink():  # a link to scratch space, the parts' natural place: the link goes, its folder stays
        parts.unlink()
    else:
        parts.rmdir()


COLUMN_ORDER = ("id", "index", "p_merger", "p_merger_std", "log_odds", "merger", "label", "object", "split")


def _joined(parts: Path, source: Source, part_size: int, tta: bool, spec_digests: tuple[str, ...]):
    """The parts' rows as one astropy table, in input order (rank 0's, for `_merge`)."""
    from astropy.table import Table  # astropy only where a catalog is written

    columns: dict[str, list] = {}
    names = _part_names(source, tta)
    for k in range(-(-source.count // part_size)):
        path = _part_path(parts, k)
        try:
            read = _read_part(path, spec_digests)
        except Exception as exc:  # removed or replaced since the ranks checked it
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DmhpcError(f"{path}: cannot read the part ({reason}); run again to compute it") from None
        part = None if isinstance(read, str) else read[0]
        problem = read if part is None else _part_problem(part, source.positions(*_part_rows(source.count, part_size,
                                                                                               k)), names)
        if problem is not None:
            raise DmhpcError(f"{path}: not a part of this prediction: {problem}; remove it and run again")
        for key, value in part.items():
            columns.setdefault(key, []).append(value)
    # A survey's rows on rank 0: each column is joined (the parts' arrays let go as it is), and
    # reordered only where its rows are not in input order already; the table takes the arrays.
    data = {}
    for key in list(columns):
        data[key] = np.concatenate(columns.pop(key))
    index = data["index"]
    if len(index) > 1 and not bool(np.all(index[1:] > index[:-1])):
        order = np.argsort(index, kind="stable")
        for key in data:
            data[key] = data[key][order]
    # uint8, not int8: astropy writes an int8 column to FITS as a logical one, which reads back as bool.
    data["merger"] = (data["p_merger"] >= MERGER_THRESHOLD).astype(np.uint8)
    table = Table([data[key] for key in COLUMN_ORDER if key in data],
                  names=[key for key in COLUMN_ORDER if key in data], copy=False)
    if source.id_dtype:  # the parts hold ids as text; a survey's integer ids must join back as integers
        # (int8 widened: astropy writes an int8 column to FITS as a logical one, and every id read back True)
        table["id"] = table["id"].astype("i2" if source.id_dtype == "i1" else source.id_dtype)
    if "split" in table.colnames:
        table["split"] = np.array(["train", "val", "test"])[table["split"]]
    return table


def _merge(out: Path, parts: Path, source: Source, part_size: int, tta: bool, meta: dict, overwrite: bool,
           spec_digests: tuple[str, ...]) -> int:
    """Rank 0: the parts, back in input order, as one catalog; returns its rows."""
    # Taken again: a survey's cube saved again, or a set prepared again, while the ranks read it gave a
    # catalog of both versions under the first one's INPUTSHA. Its parts are of both: none is kept.
    if source.changed():
        _remove_parts(parts)
        raise DmhpcError(f"{source.path}: changed while this prediction read it (another size or modification "
                         f"time, or a data set prepared again); its parts are removed; run again")
    if out.exists() and not overwrite:  # another predict may have finished it since the start
        raise DmhpcError(f"--out {out}: exists (written since this prediction started); --overwrite replaces it")
    kept = f"the parts are kept in {parts}; a rerun merges them"
    try:
        table = _joined(parts, source, part_size, tta, spec_digests)
    except MemoryError:  # a survey's columns on rank 0 alone: a traceback, as if the parts were lost
        raise DmhpcError(f"--out {out}: not enough memory on rank 0 to join {source.count} rows; {kept} (run "
                         f"again with more memory for rank 0: it alone merges)") from None
    transforms = "8 dihedral transforms" if source.shape[1] == source.shape[2] else "4 flips (images not square)"
    # Each column says what it holds, in every format that keeps descriptions (FITS TCOMMn, ECSV, HDF5, Parquet).
    described = {"id": "catalog id of the image, else its input position",
                 "index": "input position of the image (0-based)",
                 "p_merger": "merger probability" + (f" (mean over the {transforms})"
                                                     if "p_merger_std" in table.colnames else ""),
                 "p_merger_std": f"population standard deviation of the merger probability over the {transforms}",
                 "log_odds": "merger log-odds, logit(merger) - logit(non-merger)" + (
                     f" (mean over the {transforms})" if "p_merger_std" in table.colnames else "")
                 + ": orders candidates whose p_merger rounds to 1",
                 "label": "true class from the input: 1 merger, 0 non-merger",
                 "object": "object id of the image in its prepared data set",
                 "split": "split of its prepared data set the image is in",
                 "merger": f"1 where p_merger >= {MERGER_THRESHOLD}, else 0"}
    for key in table.colnames:
        table[key].description = described[key]
    fmt = catalog_format(out)
    table.meta.update(meta)
    if fmt == "fits":  # COMMENT cards: a card's own comment is cut off after a long value (CKPTSHA's, a path)
        table.meta["comments"] = [f"{key}: {META_COMMENTS[key]}" for key in meta]
    kwargs = {"path": HDF5_TABLE, "serialize_meta": True} if fmt == "hdf5" else {}
    beside, staged = provenance_file(out), None
    try:
        with atomic_path(out) as tmp:
            if fmt == "hdf5":  # built in memory, then written as bytes: on a full disk h5py's close of the
                buffer = io.BytesIO()  # file crashed the process (a segmentation fault, no error line)
                with h5py.File(buffer, "w") as f:
                    table.write(f, format=fmt, **kwargs)
                tmp.write_bytes(buffer.getbuffer())
            elif fmt == "fits":
                _write_fits(table, tmp)
            else:
                table.write(tmp, format=fmt, overwrite=True, **kwargs)
            if fmt == "ascii.csv":
                # With the CSV's own SHA-256: explain takes the pair only together (two files, two renames).
                staged = staged_write(beside, json.dumps({**meta, CSV_SHA: file_sha256(tmp)}, indent=2) + "\n")
                # The replaced catalog's goes just before the new one takes its name: killed in between,
                # a CSV stands without provenance (explain refuses it), never beside another's.
                beside.unlink(missing_ok=True)
        if staged is not None:
            os.replace(staged, beside)
    except DmhpcError as exc:  # an OSError, said by atomic_path
        raise DmhpcError(f"{exc}; {kept}") from None
    except Exception as exc:  # whatever astropy or its writers raise: the survey's parts must not be lost
        raise DmhpcError(f"--out {out}: cannot write the catalog ({type(exc).__name__}: {reason_of(exc)}); "
                         f"{kept}") from None
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)  # if it was not put in place
    _remove_parts(parts)
    return len(table)


def predict(run_dir, out, *, data=None, split=None, images=None, catalog=None, id_column="id", label_column=None,
            file_column=None, cutouts=None, layout=None, checkpoint="best", tta=False, normalize="target",
            part_size=DIGEST_BLOCK, batch_size=256, amp="none", overwrite=False, nan_fill=None, verify=None,
            signals=STOP_SIGNALS) -> int:
    """Write the catalog; returns the exit code (0, or REQUEUE_EXIT_CODE after a stop signal)."""
    out = Path(out)
    catalog_format(out)
    for flag, value in (("--batch-size", batch_size), ("--part-size", part_size)):
        if value < 1:
            raise DmhpcError(f"{flag} {value}: expected a positive integer")
    if part_size % batch_size:
        raise DmhpcError(f"--part-size {part_size} must be a positive multiple of --batch-size {batch_size}, so "
                         f"batches (and so results) do not depend on how parts are shared out")
    if verify is not None and data is None:
        raise DmhpcError(f"--verify {verify} goes with --data: only a prepared data set has checksums to verify")
    if normalize not in ("target", "own"):
        raise DmhpcError(f"--normalize {normalize!r}: expected target or own")
    run = RunDir(run_dir)
    run.refuse_inside(out, "--out")
    _refuse_out_among_inputs(out, data=data, images=images, catalog=catalog)
    dist = bootstrap()
    # Caught from the start: a stop signal during the checks, the digest or the statistics pass
    # (minutes on a survey) ended the job by its default action, exit 143, not a requeue. Caught to
    # the end, through the teardown (see dmhpc.cli.run).
    stop = StopRequest(signals)
    source, held = None, contextlib.ExitStack()

    def stopped() -> bool:  # asked of every rank at once, between the phases before the parts
        return any(all_gather_object(stop.signal_name is not None))

    parts_before = None  # the parts there at the start (rank 0's count), once rank 0 holds their folder's lock

    def requeue(kept: str) -> int:
        # A SIGTERM is the scheduler's (a preemption, a cancel), which requeues the job or not: no
        # fault of the job's. (A record that cannot be written leaves the guard a requeue short.)
        if dist.is_main and parts_before is not None and stop.signal_name != "SIGTERM":
            with contextlib.suppress(OSError):
                _record_requeue(parts, dist.attempt, parts_before)
        if dist.is_main:
            print(f"dmhpc predict: stopped by a signal; {kept}; exiting with {REQUEUE_EXIT_CODE} so the launcher "
                  f"requeues (a rerun resumes)", flush=True)
        meet_before_leaving()
        return REQUEUE_EXIT_CODE

    try:
        model = agree(lambda: Model(run, checkpoint, dist.device, amp))
        # How to open the source again (dmhpc explain --catalog reads the candidates' images back).
        # Absolute, links kept: a catalog's file names are relative to its folder, the folder of the
        # link given (as prepare reads them), not of the file a link points to.
        source_args = {k: (os.path.abspath(v) if isinstance(v, (str, os.PathLike)) and k in PATHS else v)
                       for k, v in dict(data=data, split=split, images=images, catalog=catalog, id_column=id_column,
                                        label_column=label_column, file_column=file_column, cutouts=cutouts,
                                        nan_fill=nan_fill, layout=layout).items()}
        source = agree(lambda: open_source(**source_args))
        if on_main(lambda: out.exists() and source.reads(out)):  # (a file not there yet is no input)
            raise DmhpcError(f"--out {out}: is one of the cutout files of {source.path}, an input of this "
                             f"prediction; write the catalog elsewhere")
        # Each rank loaded its own copies: a checkpoint or input replaced meanwhile (a run still
        # training writes last.pt every epoch) would give parts of two models in one catalog.
        # (its digest: the identity of a set of 1e8 rows names ~50,000 shards, 1.6 MB, from every rank)
        seen = hashlib.sha256(json.dumps([model.checkpoint, model.sha256, source.identity, source.describe],
                                         sort_keys=True).encode()).hexdigest()
        if len(set(all_gather_object(seen))) > 1:
            raise DmhpcError(f"{run.checkpoint(checkpoint)} or {source.path}: replaced while the ranks were "
                             f"reading it (a run still training?); start again")
        check_shape(source.shape_of, source.shape, model.data["source"]["shape"])
        if stopped():
            return requeue("nothing computed yet")
        parts = Path(f"{out}.parts")
        on_main(lambda: _lock_parts(out, parts, overwrite, held))
        parts_before = on_main(lambda: _check_progress(parts, dist.attempt))
        # Keys of at most 8 characters: they are FITS header keywords too. INPUTSHA, MEAN and STD are
        # read from the inputs below; the rest is known now, and what the format cannot hold of it is
        # said before that reading.
        meta = {"DMHPC": code_version() if dist.is_main else "", "RUN": str(run.path.resolve()), "CKPT": checkpoint,
                "CKPTSTEP": model.checkpoint.get("step", -1), "CKPTSHA": model.sha256,
                "SELECT": str(model.checkpoint.get("criterion")),
                "SOURCE": source.kind, "DATA": str(source.path.resolve()),
                "DATASHA": source.describe.get("fingerprint", ""), "INPUTSHA": "",
                "NORM": normalize, "MEAN": "", "STD": "", "TTA": tta, "AMP": amp, "SRCARGS": json.dumps(source_args)}
        on_main(lambda: _check_writable(out, meta))
        source.check(verify != "structure", dist.rank, dist.world_size, gather)
        if stopped():  # (checksums: minutes on a survey; the digest and the statistics as long)
            return requeue("nothing computed yet")
        # Before the digest and the statistics: a prepared set's ids are read from its shards, once
        # they are verified; other sources' are in memory.
        on_main(lambda: _check_ids(out, source))
        shares = gather(lambda: (source.digest_blocks(dist.rank, dist.world_size), source.missing))
        digest = source.digest({k: v for blocks, _ in shares for k, v in blocks.items()})
        # The digest stat'ed every cutout: one not there is said now, not when its part is reached,
        # after the parts before it were computed (the first of the catalog, whatever the ranks).
        missing = min((row for _, row in shares if row is not None), default=None)
        if missing is not None:
            raise AgreedError(source.missing_error(missing))
        if stopped():
            return requeue("nothing computed yet")
        if normalize == "target":
            mean, std = model.normalization("target")
        else:
            # A prepared set's statistics are in its manifest; other inputs' are of `digest`.
            saved = None if source.kind == "data" else on_main(
                lambda: _saved_stats(parts, digest, source_args, source.shape[0]))
            # Every rank reads a share: rank 0 alone, on a large survey, could outlast the others' wait.
            mean, std = saved or source.own_stats(dist.rank, dist.world_size, gather)
        norm = Normalizer(mean, std, dist.device)
        options = {"tta": tta, "normalize": normalize, "mean": mean, "std": std, "part_size": part_size,
                   "batch_size": batch_size, "amp": amp}
        meta.update(INPUTSHA=digest, MEAN=show(mean), STD=show(std))  # (printable ASCII: hex digits, numbers)
        spec = _spec(run, model, source, source_args, options)
        spec_digests = _spec_digests(spec)
        on_main(lambda: _claim_parts(parts, spec, overwrite))
        if normalize == "own" and source.kind != "data":
            on_main(lambda: atomic_write(parts / OWN_STATS, json.dumps({"inputs": digest, "read_as": source_args,
                                                                         "mean": mean, "std": std})))
        n_parts = -(-source.count // part_size)
        names = _part_names(source, tta)

        def done_before(k: int) -> bool:
            rows = _part_rows(source.count, part_size, k)
            return _part_done(_part_path(parts, k), source.positions(*rows), names, source.cutout_files(*rows),
                              spec_digests)

        todo = [k for k in range(dist.rank, n_parts, dist.world_size) if not done_before(k)]
        counts = all_gather_object(len(todo))
        remaining = sum(counts)
        t0, done, error, failure = time.perf_counter(), 0, None, None
        mine = sum(b - a for a, b in (_part_rows(source.count, part_size, k) for k in todo))
        with progress_bar(mine, "predict", unit="img", show=dist.is_main) as bar:
            if dist.is_main:  # a stop signal sent on seeing this line: the ranks stop after the part in hand
                print(f"dmhpc predict: {source.count} images of {source.path} in {n_parts} parts "
                      f"({n_parts - remaining} done before); world {dist.world_size} on {dist.device}; "
                      f"{checkpoint} checkpoint of {run.path}", flush=True)
            # In rounds of one part per rank, the ranks agreeing before each: a signal or an error on one
            # rank stops every rank within a part (the others computed all their parts first, while
            # it waited, past the scheduler's grace time or the collective timeout).
            for k in todo + [None] * (max(counts) - len(todo)):
                if any(s or e for s, e in all_gather_object((stop.signal_name is not None, error))):
                    break  # the parts computed are written
                if k is not None:
                    start, stop_row = _part_rows(source.count, part_size, k)
                    try:
                        inputs = source.cutout_files(start, stop_row)
                        columns = _compute_part(model, source, norm, start, stop_row, batch_size, tta)
                        columns[PART_INPUTS] = inputs
                        columns[PART_CHECKSUM] = _part_checksum(columns, spec_digests[0])
                        atomic_write(_part_path(parts, k), writer=lambda f: np.savez(f, **columns), durable=False)
                        done += stop_row - start
                        bar.update(stop_row - start)
                    # Any error (a bad image, a full disk, memory, a defect), said by every rank below:
                    # one raised on its rank alone left the others waiting in the next round's gather.
                    except Exception as exc:
                        error, defect = _part_error(exc, batch_size, dist.device)
                        failure = exc if defect else None
        ended = all_gather_object((stop.signal_name is not None, error))
        errors = [e for _, e in ended if e is not None]
        if errors:
            if failure is not None:
                failure.dmhpc_agreed = True  # (see dmhpc.distributed.agreed)
                raise failure
            raise AgreedError(errors[0])
        computed = sum(all_gather_object(done))
        rate = computed / max(time.perf_counter() - t0, 1e-9)
        # A signal during the last parts too: the merge (minutes for tens of millions of rows) would
        # outlast the signal's lead on the time limit, and the job killed in it is not requeued.
        if any(s for s, _ in ended):
            return requeue(f"finished parts are kept in {parts}")
        rows = on_main(lambda: _merge(out, parts, source, part_size, tta, meta, overwrite, spec_digests))
        if dist.is_main:
            # (every part found done: no rate, "0 images/s" said of a catalog merged from them)
            how = f"{rate:.0f} images/s over {dist.world_size} rank(s)" if computed else "from parts done before"
            print(f"dmhpc predict: wrote {out} ({rows} rows; {how})", flush=True)
        barrier()
        return 0
    except Exception as exc:
        if agreed(exc):  # every rank holds it: all say it before any exits (torchrun ends the rest)
            meet_before_leaving()
        raise
    finally:
        held.close()
        if source is not None:
            source.close()
        try:
            shutdown()
        finally:
            stop.close()


def predict_arguments(parser) -> None:
    d = {name: p.default for name, p in inspect.signature(predict).parameters.items()}  # the defaults' one home
    # --run-dir too: under torchrun, --run is an ambiguous abbreviation of torchrun's own --run-path.
    parser.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="run directory (write --run-dir under torchrun)")
    parser.add_argument("--checkpoint", default=d["checkpoint"], choices=["best", "last"],
                        help=f"default: {d['checkpoint']}")
    parser.add_argument("--data", type=Path, metavar="DIR", help="a prepared data set (every split, or --split)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="with --data: this split only")
    parser.add_argument("--images", type=Path, metavar="FILE",
                        help="a .npy array or FITS cube, (N, C, H, W) or (N, H, W, C) (see --layout)")
    parser.add_argument("--catalog", type=Path, metavar="TABLE",
                        help="a catalog (CSV, ECSV, FITS, Parquet or HDF5 table) of FITS cutouts, or of the --images rows")
    parser.add_argument("--id-column", default=d["id_column"], metavar="NAME",
                        help=f"catalog id column (default: {d['id_column']})")
    parser.add_argument("--label-column", metavar="NAME", help="catalog label column, copied to the output")
    parser.add_argument("--file-column", metavar="NAME", help="catalog cutout file column")
    parser.add_argument("--cutouts", type=Path, metavar="DIR", help=CUTOUTS_HELP)
    parser.add_argument("--layout", choices=["NCHW", "NHWC"],
                        help="of --images or of the cutouts, where their shape does not tell (as in prepare)")
    parser.add_argument("--out", required=True, type=Path,
                        help=f"the catalog to write: {', '.join(CATALOG_FORMATS)} (the format by extension)")
    parser.add_argument("--tta", action="store_true",
                        help="average over the 8 flips and 90-degree rotations (4 flips for non-square images); adds p_merger_std (8x the work)")
    parser.add_argument("--normalize", default=d["normalize"], choices=["target", "own"],
                        help=f"target: the statistics the run normalized its target domain with; own: these images' own "
                             f"statistics (default: {d['normalize']})")
    # Parts of the digest's blocks: each cutout of a survey is then stat'ed once (see Source.cutout_files).
    parser.add_argument("--part-size", type=int, default=d["part_size"], metavar="N",
                        help=f"images per part, the unit of resumption (default {d['part_size']}); a multiple of "
                             f"--batch-size")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="N",
                        help=f"default {d['batch_size']}")
    parser.add_argument("--amp", default=d["amp"], choices=["none", "bf16"], help=f"autocast (default {d['amp']})")
    parser.add_argument("--nan-fill", type=float, metavar="VALUE", help="replace NaN pixels by VALUE")
    parser.add_argument("--verify", choices=VERIFY_LEVELS,
                        help="with --data: check every shard's SHA-256 (checksums, the default; reads the data set "
                             "once more, shared among the ranks) or its structure only, as the trainer's data.verify")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing catalog")


def predict_main(args) -> int:
    return predict(args.run, args.out, data=args.data, split=args.split, images=args.images, catalog=args.catalog,
                   id_column=args.id_column, label_column=args.label_column, file_column=args.file_column,
                   cutouts=args.cutouts, layout=args.layout, checkpoint=args.checkpoint, tta=args.tta, normalize=args.normalize,
                   part_size=args.part_size, batch_size=args.batch_size, amp=args.amp, overwrite=args.overwrite,
                   nan_fill=args.nan_fill, verify=args.verify)
