"""The run directory: its layout, its lock, its log, the configuration check on resume, its results.

Every other module asks `RunDir` for a path; nothing else spells the layout out:

    RUN/config.yaml               the resolved configuration (`dmhpc eval` and resumes read it)
    RUN/run.json                  marks a dmhpc run: format, version, its run id, the data sets it
                                  trained on
    RUN/metrics.jsonl             the log: one JSON record per line
    RUN/tensorboard/              the same scalars for TensorBoard
    RUN/checkpoints/last.pt       where training stands
    RUN/checkpoints/best.pt       the checkpoint the selection criterion chose
    RUN/checkpoints/best.next.pt  a new best, until the last.pt of its epoch is written too
    RUN/eval/CKPT_SPLIT.json      one file per evaluation: checkpoint, split (and data set, see
                                  `evaluation_tag`), never overwriting another's
    RUN/plots/*.png
    RUN/.lock                     held by the trainer's rank 0 for the life of the run, or by
                                  `dmhpc eval` (a trainer starting waits for that one)

A trainer starts in two steps, both on rank 0. `claim` takes the lock (a second trainer on the
directory is refused), refuses a directory that is not a dmhpc run, decides what to resume from and
checks the new configuration against the run's own, writing nothing. `start` then removes orphan
temporary files of killed writes, writes config.yaml and run.json, and cuts the log back to the
step it resumes from. The lock is an OS-level `flock`: the kernel drops it when its process dies,
so a requeued job is never blocked by a lock of a killed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from dmhpc import code_version
from dmhpc.checks import show
from dmhpc.config import (Config, changed_keys, config_from_dict, config_to_dict, inert_keys, load_config,
                          save_config)
from dmhpc.errors import DmhpcError, reason_of
from dmhpc.files import (LockHeld, atomic_path, atomic_write, hold_lock, inside, is_temporary, lock_holder,
                         remove_orphans, replace_durably)
from dmhpc.names import DOMAINS
from dmhpc.run_records import (FORMAT, VERSION, Unfit, check_log_record, check_record, check_result, strict_json,
                                undefined_as_nan)

CONFIG, RECORD, LOG, LOCK = "config.yaml", "run.json", "metrics.jsonl", ".lock"
CHECKPOINTS, EVAL, PLOTS, TENSORBOARD = "checkpoints", "eval", "plots", "tensorboard"
CHECKPOINT_NAMES = ("last", "best")
# What a run directory may hold; `start --overwrite` removes exactly these.
OWN_NAMES = (CONFIG, RECORD, LOG, LOCK, CHECKPOINTS, EVAL, PLOTS, TENSORBOARD)
# What a replacement removes, in this order (see RunDir.start); the lock stays.
REPLACED_IN_ORDER = (CHECKPOINTS, EVAL, LOG, RECORD, TENSORBOARD, PLOTS, CONFIG)
# What `dmhpc eval` writes into the lock it holds; how long a trainer waits for such a holder (see `_lock`).
EVAL_OWNER, LOCK_PATIENCE_S = "dmhpc eval", 600.0
LEGACY_RESULT = "metrics.json"  # eval/metrics.json of dmhpc before one file per evaluation

# Keys that may differ on resume, and why: how long and how often, how data are read, where the run
# lives. The world size may change too (it is not a configuration key). Everything else decides
# what is trained; a difference there is refused. Data paths may change when the data set they
# name is the same one (see `claim`).
RESUMABLE = {
    "train.epochs": "length", "train.max_steps": "length", "train.early_stopping": "length",
    "train.eval_every": "cadence", "train.log_every": "cadence", "train.checkpoint_every": "cadence",
    "train.signals": "how a stop is asked for", "data.loader": "loader", "data.num_workers": "loader",
    "data.verify": "start-up checks", "run.dir": "where the run lives",
    "train.deterministic": "how exactly kernels repeat, not what is trained",
    "loss.mmd.max_samples": "a memory cap (a world size grown at an epoch's end may need it raised)",
}
# How long a run trains: a finished run whose length changes is resumed, and unfinished again.
LENGTH_KEYS = frozenset(key for key, why in RESUMABLE.items() if why == "length")
# Resumable, but a finished run's result is not the result of a configuration that changed them:
# which epochs were evaluated (so which checkpoint was selected and tested) and the ranks (not a
# configuration key: train.batch_size is per rank, so the global batch). A launcher asked for such
# a point refuses the old run instead of reporting it. (loss.mmd.max_samples only refuses batches
# larger than it: a run it let train is the same run under a larger cap.)
RESULT_KEYS = ("train.eval_every", "ranks")
DATA_KEYS = ("data.source", "data.target")
_TAG_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def evaluation_tag(checkpoint: str, split: str, data: str | None = None) -> str:
    """`best_test`, or `best_test_on-NAME` for an evaluation on another data set than the run's."""
    tag = f"{checkpoint}_{split}"
    return tag if data is None else f"{tag}_on-{_TAG_SAFE.sub('_', data).strip('_') or 'data'}"


def result_text(result: dict) -> str:
    """An evaluation result file's contents."""
    return strict_json(result, indent=2) + "\n"


def statistics(entry: Mapping) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of a data set's record (run.json's, a checkpoint's), as floats."""
    return [float(v) for v in entry["mean"]], [float(v) for v in entry["std"]]


def check_shape(path, shape, trained) -> None:
    """Refuse images of another (C, H, W) than the run trained on: the network fails on them with a
    RuntimeError traceback deep in its layers, after the work before it."""
    if tuple(shape) != tuple(trained):
        raise DmhpcError(f"{path}: images of shape {tuple(shape)}; the run trained on {tuple(trained)}")


@dataclass
class Claim:
    """What `RunDir.claim` decided: the checkpoint to resume from and what changed since the run's config."""

    resume_from: Path | None
    changed: dict = field(default_factory=dict)  # dotted key -> [old, new], accepted on resume
    replaces: bool = False  # the directory holds a run that this start replaces
    own: bool = True  # resume_from is one of this run's checkpoints (not a checkpoint from elsewhere)
    run_id: str | None = None  # the id the run keeps (see `RunDir.check_identity`); None: a new run's
    note: str | None = None  # what the trainer says of the choice (a requeued attempt going on with its job's run)


class ConfigChanged(DmhpcError):
    """The run was trained with another configuration or data than this start's (`_check_changes`)."""


class RunDir:
    """One run directory. Paths and readers work on any rank; `claim`/`start` only on rank 0."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_file: IO | None = None
        self._made: list[Path] = []  # folders the claim created, nearest first
        self._attempt: dict | None = None  # the claim's job attempt (`DistInfo.attempt`)
        self.run_id: str | None = None  # set by `start`; every checkpoint the run writes carries it

    # --- the layout -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """RUN/checkpoints/NAME.pt for NAME in "last", "best"."""
        if name not in CHECKPOINT_NAMES:
            raise DmhpcError(f"checkpoint {name!r}: expected one of {', '.join(CHECKPOINT_NAMES)}")
        return self.checkpoint_dir / f"{name}.pt"

    @property
    def next_best(self) -> Path:
        """Where a new best checkpoint waits for its epoch's last.pt (see `promote_best`)."""
        return self.checkpoint_dir / "best.next.pt"

    def promote_best(self) -> None:
        """Make the waiting best checkpoint best.pt, now that last.pt of its epoch is written. Written
        as best.pt at once, a kill before last.pt left a best.pt of an epoch the resume does again,
        its record cut from the log; on a GPU the epoch done again differs, and may not beat it."""
        if self.next_best.is_file():
            replace_durably(self.next_best, self.checkpoint("best"))

    def _settle_next_best(self, claim: Claim) -> str | None:
        """A waiting best that a kill left: kept when the last.pt resumed from was written after it
        (same step), dropped when the resume does its epoch again (or starts elsewhere)."""
        waiting, last = self.next_best, self.checkpoint("last")
        if not waiting.is_file():
            return None
        if claim.resume_from is not None and claim.resume_from.resolve() == last.resolve() and \
                _load_state(waiting).get("step") == _load_state(last).get("step"):
            self.promote_best()
            return "promoted"
        waiting.unlink()
        return "dropped"

    def refuse_inside(self, path: str | os.PathLike, flag: str) -> None:
        """Refuse an output of predict, explain or export in the run directory: it would replace the
        run's own files (--overwrite over best.pt), and a run directory holding other files is
        refused as not a run at its next resume or evaluation."""
        where = Path(os.path.abspath(path))
        # Another run's directory too (explain's figures into runs/r4: r4 was no run to its trainer).
        runs = [self.path] if inside(path, self.path) else \
            [f for f in (where, *where.parents) if RunDir(f).looks_like_run()]
        if runs:
            raise DmhpcError(f"{flag} {path}: inside the run directory {runs[0]}, which holds the run's own "
                             f"files only; write it elsewhere")

    @property
    def label(self) -> str:
        """The run's name in titles and tables: its folder's, with its parent's where the name is a
        grid point's values (`noda/seed=1`: "seed=1" alone named every method's run of that seed)."""
        name = self.path.resolve().name
        return f"{self.path.resolve().parent.name}/{name}" if "=" in name else name

    def result_path(self, checkpoint: str, split: str, data: str | None = None) -> Path:
        """RUN/eval/<evaluation_tag>.json: one file per (checkpoint, split, data set)."""
        return self.path / EVAL / f"{evaluation_tag(checkpoint, split, data)}.json"

    def plot_path(self, name: str) -> Path:
        return self.path / PLOTS / f"{name}.png"

    def plot_files(self) -> list[Path]:
        return sorted((self.path / PLOTS).glob("*.png"))

    # --- what the directory is --------------------------------------------------------------------
    def holds_run(self) -> bool:
        """A config.yaml is there: some dmhpc trainer started here (valid or not: see `config`)."""
        return self.config_path.is_file()

    def holder(self) -> str | None:
        """The trainer or eval holding the run now ("pid N on HOST since ..."), or None."""
        return lock_holder(self.path / LOCK)

    def config(self) -> Config:
        """The run's own configuration; DmhpcError when the directory is not a dmhpc run."""
        if not self.path.is_dir():
            raise DmhpcError(f"{self.path}: no such run directory")
        if not self.config_path.is_file():
            raise DmhpcError(f"{self.config_path}: no such file ({self.path} is not a dmhpc run directory)")
        try:
            return load_config(self.config_path, written=True)
        except DmhpcError as exc:
            raise DmhpcError(f"{self.path} is not a dmhpc run: {exc}") from None

    def read_result(self, checkpoint: str = "best", split: str = "test", data: str | None = None) -> dict | None:
        """The stored evaluation, or None. A run of older dmhpc kept one eval/metrics.json: it counts
        only for the (checkpoint, split) it says it holds."""
        path = self.result_path(checkpoint, split, data)
        if not path.is_file() and data is None:
            legacy = self.path / EVAL / LEGACY_RESULT
            if legacy.is_file():
                old = _read_result(legacy)
                if old.get("split") == split and old.get("checkpoint", {}).get("name", "best") == checkpoint:
                    return old
            return None
        return _read_result(path) if path.is_file() else None

    def write_result(self, result: dict, checkpoint: str, split: str, data: str | None = None) -> Path:
        return atomic_write(self.result_path(checkpoint, split, data), result_text(result))

    def data_record(self, role: str) -> dict:
        """What run.json says of the run's `role` ("source" or "target") data set: path, fingerprint,
        image shape, and the per-channel mean and std it was normalized with."""
        entry = self.recorded_data().get(role, {})
        if not all(k in entry for k in ("mean", "std", "shape")):
            raise DmhpcError(f"{self.record_path}: no {role} data set recorded with its normalization (a run of "
                             f"an older dmhpc, or one that has not started)")
        return entry

    def _record(self) -> dict:
        """run.json, checked ({} before the run started); a hand-edited file is one line."""
        if not self.record_path.is_file():
            return {}
        record = _read_json(self.record_path)
        try:
            check_record(record)
        except Unfit as exc:
            raise DmhpcError(f"{self.record_path}: {exc}") from None
        return record

    def recorded_data(self) -> dict:
        """run.json's data sets by role ({} before the run started)."""
        return self._record().get("data", {})

    def check_identity(self, state: Mapping, checkpoint: Path, mine: str | None = None) -> str | None:
        """Refuse one of the run's checkpoints (loaded as `state`) that another run wrote: a last.pt
        or best.pt copied in from a run of the same configuration was resumed, evaluated or exported
        as this run's own, its log and results mixed with the other's. `mine`: the run's id, if known
        (by default run.json's). Returns the run's id (`mine`, else the checkpoint's); None where
        neither holds one (a dmhpc before 2026-12-05)."""
        mine, theirs = mine or self._record().get("run_id"), state.get("run_id")
        if mine and theirs and mine != theirs:
            raise DmhpcError(f"{checkpoint}: written by another run (run id {str(theirs)[:12]}, this run's "
                             f"{mine[:12]}): copied in from elsewhere? put this run's own back")
        return mine or (theirs if isinstance(theirs, str) and _RUN_ID.fullmatch(theirs) else None)

    def _check_own_checkpoints(self, run_id: str | None) -> str | None:
        """`check_identity` of each of the run's checkpoints, against one another too; the run's id.
        One that cannot be read is left to the reader that needs it (which says what to do)."""
        for name in CHECKPOINT_NAMES:
            path = self.checkpoint(name)
            try:
                state = _load_state(path) if path.is_file() else None
            except DmhpcError:
                continue
            if state is not None:
                run_id = self.check_identity(state, path, run_id)
        return run_id

    def started_attempts(self, job: str) -> list[int] | None:
        """The restart counts of the attempts of job `job` that started this run ([] for none,
        or a run not started yet); None for a run.json of a dmhpc before they were recorded."""
        record = self._record()
        if not record:
            return []
        if "attempts" not in record:
            return None
        return list(record["attempts"]["started"]) if record["attempts"]["job"] == job else []

    def refuse_prepared_again(self, role: str, directory, now: str, instead: str, trained: Mapping) -> None:
        """Refuse the run's own `role` data set, at `directory` with manifest fingerprint `now`, when
        it was prepared again since the checkpoint used trained on it (`trained`: its data sets by
        role, `checkpoint_data`): its test split may hold images the checkpoint trained on
        (`instead`: what to do). A data set without a recorded fingerprint is not refused."""
        was = trained.get(role, {}).get("fingerprint")
        if was and now != was:
            raise DmhpcError(f"data.{role} {directory}: prepared again since the run trained on it (manifest "
                             f"fingerprint {was[:12]} -> {now[:12]}); {instead}")

    def data_error(self, key: str, directory, exc: DmhpcError) -> DmhpcError:
        """`exc`, met reading the run's own data set at `directory` (its config.yaml's `key`), naming
        the key; a relative path to no folder here is read from the current directory, which it says."""
        relative = "" if Path(directory).is_absolute() or Path(directory).exists() else (
            f" (a relative path: read from the current directory {Path.cwd()}; run this from the directory "
            f"the run was trained in)")
        return DmhpcError(f"{key} of {self.config_path}: {exc}{relative}")

    def normalization(self, role: str) -> tuple[list[float], list[float]]:
        """(mean, std) per channel the run normalized `role` with."""
        return statistics(self.data_record(role))

    def checkpoint_data(self, state: Mapping, checkpoint: Path) -> dict:
        """The data sets `checkpoint` (loaded as `state`) trained on, by role: its own record, which
        goes with the weights; run.json's for a checkpoint of a dmhpc before 2026-12-02, which holds
        none. run.json alone was lost with its file or a copied checkpoint, and the data sets were
        then not compared at all."""
        data = state.get("data")
        if data is None:
            return self.recorded_data()
        try:
            check_record({"data": data})
        except Unfit as exc:
            raise DmhpcError(f"{checkpoint}: its data record: {exc}") from None
        return data

    def trained_data(self, state: Mapping, checkpoint: Path) -> dict:
        """The data sets the checkpoint `checkpoint` (loaded as `state`) was trained on, by role, with
        their shape and normalization: its own record, so weights and statistics are read as one (a
        run replaced with --overwrite while predict or export read run.json apart from the weights
        gave a catalog or model card of one run's weights and another's statistics). A checkpoint
        of a dmhpc before 2026-12-02 holds none: run.json's are taken."""
        if state.get("data") is None:
            data, where = {role: self.data_record(role) for role in DOMAINS}, self.record_path
        else:
            data, where = self.checkpoint_data(state, checkpoint), checkpoint
            missing = [role for role in DOMAINS if not {"mean", "std", "shape"} <= set(data.get(role, {}))]
            if missing:
                raise DmhpcError(f"{checkpoint}: its data record has no {missing[0]} data set with its "
                                 f"normalization (an edited checkpoint?)")
        shapes = [data[role]["shape"] for role in DOMAINS]
        if shapes[0] != shapes[1]:
            # The network is built for the source's channels and normalizes with the target's
            # statistics: one channel's broadcast over three, and an export its own loader refused.
            raise DmhpcError(f"{where}: its data record gives the target images {shapes[1]} and the source "
                             f"{shapes[0]}, which no run trains on (edited by hand?)")
        return data

    def has_results(self) -> bool:
        """A checkpoint, an evaluation or an evaluated epoch in the log is there: something a fresh
        start would throw away (the log too: with checkpoints/ gone, a link to scratch not mounted
        where the job was requeued, a run of many epochs was replaced without a word)."""
        return any(self.checkpoint(n).is_file() for n in CHECKPOINT_NAMES) or \
            any((self.path / EVAL).glob("*.json")) or any(r.get("kind") == "epoch" for r in self.read_log())

    def looks_like_run(self) -> bool:
        """A run's config and something it wrote: what another run, a grid's out or a data set must
        not be put inside (a config.yaml alone may be anyone's)."""
        return self.holds_run() and (self.record_path.is_file() or self.log_path.is_file() or
                                     self.checkpoint_dir.is_dir())

    @property
    def finished(self) -> bool:
        """The trainer wrote the test metrics of the selected checkpoint: nothing left to run. Only
        the trainer's own ("final"; older dmhpc wrote no such flag): `dmhpc eval` of the best
        checkpoint mid-run writes the same file, and made an unfinished run look finished."""
        result = self.read_result("best", "test")
        return result is not None and result.get("final", True) is True

    # --- the log ----------------------------------------------------------------------------------
    def evaluated_at(self, step: int) -> bool:
        """Whether the run was evaluated at `step` (progress.step): its log holds that epoch record,
        with a selection. A run that reached its end was evaluated there."""
        return any(r.get("kind") == "epoch" and r.get("step") == step and "selection" in r for r in self.read_log())

    def read_log(self) -> list[dict]:
        """Every record of metrics.jsonl. A torn last line (a kill mid-append) is dropped; a bad line
        before it, or a record whose fields are not of the types its readers take, is an error naming
        the line."""
        if not self.log_path.is_file():
            return []
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if all(not rest.strip() for rest in lines[number:]):
                    break  # the torn tail of an interrupted append
                raise DmhpcError(f"{self.log_path}: line {number} is not a JSON record") from None
            if not isinstance(record, dict):
                raise DmhpcError(f"{self.log_path}: line {number} is not a JSON object")
            try:
                check_log_record(record)
            except Unfit as exc:
                raise DmhpcError(f"{self.log_path} line {number}: {exc}") from None
            records.append(undefined_as_nan(record))
        return records

    def append_log(self, record: dict, default=None) -> None:
        """One record, one line, one write: an interrupted append tears at most that line. An epoch
        record is on disk before the call returns: the checkpoint saved after it is, and a node
        crash that kept last.pt but lost the log's tail left the checkpoint's step never evaluated
        to `evaluated_at`, refusing the run's end there (step records are cadence only: not waited for)."""
        line = strict_json(record, default=default) + "\n"
        try:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(line)
                if record.get("kind") == "epoch":
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise DmhpcError(f"{self.log_path}: cannot append: {exc.strerror}") from None

    def truncate_log(self, step: int, records: list[dict] | None = None) -> int:
        """Keep the records up to `step` (what a resumed run has not redone) of `records` (the log's,
        read now by default); returns how many went."""
        records = self.read_log() if records is None else records
        kept = [r for r in records if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
        text = "".join(strict_json(r) + "\n" for r in kept)
        if not self.log_path.exists() or self.log_path.read_text(encoding="utf-8", errors="replace") != text:
            atomic_write(self.log_path, text)
        return len(records) - len(kept)

    # --- the trainer's claim ----------------------------------------------------------------------
    def claim(self, cfg: Config, resume: str, overwrite: bool = False,
              data_ids: Mapping[str, str] | None = None, attempt: Mapping | None = None,
              stopped: Callable[[], str | None] = lambda: None) -> Claim:
        """Lock the directory for this trainer and decide how it starts; writes nothing but the lock.

        resume: "auto" (last.pt if there is one), "none" (a new run; an existing one only with
        overwrite), or a checkpoint path. data_ids maps "data.source"/"data.target" to the
        fingerprint of the data set named there (`dmhpc.data.shards.fingerprint`). attempt: which
        attempt of which job this is (`DistInfo.attempt`), for the lock (see `_lock`).
        stopped: the name of a stop signal caught meanwhile, or None (the wait for a lock ends on it).
        """
        self._check_owner()
        for role in DOMAINS:  # a replacement removes the run's own folders, and what they hold
            if inside(getattr(cfg.data, role), self.path):
                raise DmhpcError(f"data.{role} {getattr(cfg.data, role)}: inside run.dir {self.path}, which holds the "
                                 f"run's own files only; keep data sets elsewhere")
        self._lock(attempt, stopped)
        self._attempt = dict(attempt) if attempt else None
        existed = self.holds_run()
        if resume == "auto" or not existed or not self._started_by_this_job():
            return self._decide(cfg, resume, overwrite, data_ids, existed)
        # The job's arguments chose how the run began, at submission: taken again by each requeued
        # attempt, --resume none --overwrite replaced what the job trained, and --resume PATH rewound
        # it, every time (a run longer than a slot never ended).
        job = f"attempt {self._attempt['restart']} of job {self._attempt['job']}"
        try:
            return replace(self._decide(cfg, "auto", overwrite, data_ids, existed),
                           note=f"{job}, which started this run, goes on with it: --resume {resume} chose how the "
                                f"job began")
        # Its configuration edited since (or its data): the arguments say what then. Nothing else: a
        # last.pt the attempt cannot read (an I/O error, a damaged file) replaced the job's run with a
        # new one, best.pt and results gone, where --resume auto refuses it in one line.
        except ConfigChanged as exc:
            return replace(self._decide(cfg, resume, overwrite, data_ids, existed),
                           note=f"{job} cannot go on with the run the job started ({exc}); --resume {resume} "
                                f"begins it again")

    def _decide(self, cfg: Config, resume: str, overwrite: bool, data_ids: Mapping[str, str] | None,
                existed: bool) -> Claim:
        """How the claim starts (see `claim`); reads, writes nothing."""
        # The run an earlier attempt of this job began, which kept nothing trained (killed before its
        # first last.pt: a lost node, an out-of-memory kill): begun again as the job's arguments say.
        # It was refused as a run of someone else's, and the requeued job failed.
        again = existed and not self.checkpoint("last").is_file() and self._begun_by_this_job() and \
            not (self.has_results() and not self._killed_before_its_first_last())  # (results beyond that epoch)
        if resume == "none":
            if existed and not overwrite and not again:
                raise DmhpcError(f"{self.path}: already holds a run; --resume auto continues it, "
                                 f"--resume none --overwrite replaces it")
            return Claim(None, replaces=existed)
        if resume == "auto":
            last = self.checkpoint("last")
            resume_from = last if last.is_file() else None
            self._check_origin(last)
            if resume_from is None and self.has_results() and not self._killed_before_its_first_last():
                raise DmhpcError(f"{self.path}: holds results ({CHECKPOINTS}/, {EVAL}/) but no {last.name} to "
                                 f"resume from; --resume none --overwrite replaces the run")
        else:
            resume_from = Path(resume)
            if not resume_from.is_file():
                raise DmhpcError(f"--resume {resume}: checkpoint not found (use auto, none or a checkpoint file)")
            if resume_from.resolve() == self.next_best.resolve():  # start() would settle (remove) it first
                raise DmhpcError(f"--resume {resume}: a best checkpoint waiting for its epoch's last.pt; --resume "
                                 f"auto takes it (it becomes best.pt where that last.pt was written), or give "
                                 f"{self.checkpoint('best')}")
            if existed and not self._own(resume_from) and not overwrite and not again:
                # Its best.pt, eval/ and log would be taken for the new run's.
                raise DmhpcError(f"{self.path}: already holds a run; a checkpoint from elsewhere (--resume {resume}) "
                                 f"starts a run in a new run.dir, or replaces this one with --overwrite")
        if resume_from is None:
            return Claim(None, replaces=existed)  # nothing trained yet: a fresh start
        state = _load_state(resume_from)
        own = self._own(resume_from)
        # All of them, before anything is written: a best.pt of another run beside the run's own
        # last.pt was found only after start() had rewritten config.yaml and the test result.
        run_id = self._check_own_checkpoints(self.check_identity(state, resume_from)) if own else None
        old, where = self._reference_config(resume_from, state)
        # The data sets the checkpoint trained on: its own record; for an older checkpoint without
        # one, its run's run.json (none for a bare checkpoint). Without them a set prepared again at
        # the same path (its test split may now hold rows the checkpoint trained on) was taken, and
        # the same set moved to another path refused.
        origin = resume_from.resolve().parent
        trained_on = self if own else RunDir(origin.parent)
        if state.get("data") is not None or own or (origin.name == CHECKPOINTS and trained_on.holds_run()):
            recorded = trained_on.checkpoint_data(state, resume_from)
        else:
            recorded = {}  # an older bare checkpoint: nothing says what it trained on
        changed = self._check_changes(old, config_to_dict(cfg), where, data_ids or {}, recorded)
        if own and resume_from.resolve() == self.checkpoint("last").resolve():
            # As a launcher refuses it: a finished run resumed with another train.eval_every kept its
            # final result under a config.yaml that could not have selected it.
            self._check_result_stands(changed, where)
        return Claim(resume_from, changed, replaces=existed and not own, own=own, run_id=run_id)

    def _started_by_this_job(self) -> bool:
        """This claim is a later attempt (a requeue, a torchrun restart) of the job that started the
        run, which has a last.pt to go on from (without one, the job's own --resume choice starts it
        again, as it did first)."""
        return self.checkpoint("last").is_file() and self._begun_by_this_job()

    def _begun_by_this_job(self) -> bool:
        """This claim is a later attempt of the job that started the run (with or without a last.pt)."""
        if not self._attempt or self._attempt["restart"] == 0:
            return False
        try:
            started = self.started_attempts(self._attempt["job"])
        except DmhpcError:  # a run.json edited by hand says nothing of which job started the run
            return False
        return any(r < self._attempt["restart"] for r in started or [])

    def _killed_before_its_first_last(self) -> bool:
        """A run killed between its first epoch's record and its first last.pt has nothing a fresh
        start would lose but that epoch (and its requeued job must not stop): its best.pt (dmhpc
        before best.next.pt wrote it first) or best.next.pt is there, or the epoch was not evaluated.
        An evaluated epoch without either is a checkpoints/ moved away: it was replaced without a word."""
        epochs = [r for r in self.read_log() if r.get("kind") == "epoch"]
        if any((self.path / EVAL).glob("*.json")) or len(epochs) > 1:
            return False
        return not epochs or "selection" not in epochs[0] or self.checkpoint("best").is_file() or \
            self.next_best.is_file()

    def _check_origin(self, last: Path) -> None:
        """Refuse to resume "auto" a run that began from a checkpoint elsewhere and has no `last`
        yet: a fresh start would throw the checkpoint it began from away."""
        origin = None if last.is_file() else self._started_from()
        if origin is not None:
            # --overwrite too: without it, a checkpoint from elsewhere is refused in a directory that
            # holds a run (this one), and the advice led to a second refusal.
            raise DmhpcError(f"{self.path}: began from {origin} and has no {last.name} of its own yet; "
                             f"--resume {origin} --overwrite starts it again")

    def _started_from(self) -> str | None:
        """The checkpoint from elsewhere this run began from (its first setup record), if any."""
        setups = [r for r in self.read_log() if r.get("kind") == "setup"]
        origin = setups[0].get("resumed_from") if setups else None
        return origin if origin and not self._own(Path(origin)) else None

    def _own(self, checkpoint: Path) -> bool:
        """`checkpoint` is one of this run's own."""
        return checkpoint.resolve().parent == self.checkpoint_dir.resolve()

    def check_relaunch(self, cfg: Config, data_ids: Mapping[str, str], ranks: int | None = None) -> None:
        """What `claim(cfg, "auto", data_ids=...)` and the trainer's start would refuse, checked from
        outside (a launcher about to submit the run again), without the lock: a foreign directory, a
        changed configuration, data that changed under the run's paths, fewer epochs than last.pt has
        trained, and results (or a start from another run's checkpoint) without a last.pt to resume
        from; and a finished run kept as the result of a configuration (or, `ranks` given, of a job
        shape: the global batch) it was not trained with. `data_ids` as for `claim`, of the data sets
        that exist now. Also train.max_steps below the steps last.pt is at, where the run always
        trained with the job's ranks (or they are not given), and a train.early_stopping the run went
        past."""
        self._check_owner()
        if not self.config_path.is_file():
            return
        last = self.checkpoint("last")
        if not self.finished:  # a finished run is not submitted again
            self._check_origin(last)
        if last.is_file():
            state = _load_state(last)
            self._check_own_checkpoints(self.check_identity(state, last))
            old, where = self._reference_config(last, state)
            changed = self._check_changes(old, config_to_dict(cfg), where, data_ids, self.checkpoint_data(state, last))
            progress = state.get("progress")
            trained_on = progress.get("world_size") if isinstance(progress, Mapping) else None
            if ranks and isinstance(trained_on, int) and trained_on > 0 and trained_on != ranks:
                changed = {**changed, "ranks": [trained_on, ranks]}  # the global batch: batch_size per rank
            self._check_result_stands(changed, where)
            if isinstance(progress, Mapping):  # checkpoints of dmhpc's own tests may hold none
                try:
                    check_epochs(cfg.train.epochs, progress.get("epoch", 0), progress.get("step_in_epoch", 0))
                    # progress.step counts the steps of every world the run trained in, the trainer
                    # this world's: the same number only where it always trained in the job's.
                    worlds = {r.get("world_size") for r in self.read_log() if r.get("kind") == "setup"}
                    step, same_world = progress.get("step"), worlds <= {trained_on} and ranks in (None, trained_on)
                    if isinstance(step, int) and same_world:
                        check_steps(cfg.train.max_steps, step)
                    if isinstance(step, int) and step > 0 and not self.finished:  # (one finished is not run)
                        if same_world and cfg.train.max_steps == step:
                            check_end_evaluated(f"train.max_steps {step}", step, self.evaluated_at(step))
                        elif progress.get("step_in_epoch") == 0 and progress.get("epoch") == cfg.train.epochs:
                            check_end_evaluated(f"train.epochs {cfg.train.epochs}", step, self.evaluated_at(step))
                    stretches = progress.get("longest_without_best", 0), progress.get("evals_since_best", 0)
                    if all(type(n) is int for n in stretches):
                        check_patience(cfg.train.early_stopping, *stretches)
                except DmhpcError as exc:
                    raise DmhpcError(f"{self.path}: {exc}") from None
        elif self.has_results() and not self._killed_before_its_first_last():
            # Without last.pt too: a finished run's old results would count for a changed
            # configuration, and nothing else compares them. With what best.pt was trained with,
            # where there is one: config.yaml is a text file a hand edit could make agree.
            best = self.checkpoint("best")
            if best.is_file():
                state = _load_state(best)
                self.check_identity(state, best)
                (old, where), recorded = self._reference_config(best, state), self.checkpoint_data(state, best)
            else:
                (old, where), recorded = (config_to_dict(self.config()), str(self.config_path)), None
            changed = self._check_changes(old, config_to_dict(cfg), where, data_ids, recorded)
            self._check_result_stands(changed, where)
            if not self.finished or LENGTH_KEYS & set(changed):
                # It would be submitted, and its trainer would refuse it (see `claim`).
                why = "is unfinished" if not self.finished else "is asked to train for another length"
                raise DmhpcError(f"{self.path}: holds results ({CHECKPOINTS}/, {EVAL}/) but no {last.name} to "
                                 f"resume from, and {why}; restore its {last.name}, or remove the directory "
                                 f"to train it again")

    def _check_result_stands(self, changed: Mapping[str, list], where: str) -> None:
        """A finished run kept as it is (its length unchanged) stands for the new configuration only
        where none of RESULT_KEYS changed."""
        if not self.finished or LENGTH_KEYS & set(changed):
            return
        stale = [f"{key} {show(changed[key][0])} -> {show(changed[key][1])}" for key in RESULT_KEYS if key in changed]
        if stale:
            raise DmhpcError(f"{where}: the run finished with other settings ({'; '.join(stale)}): its result is "
                             f"not this configuration's (the selected checkpoint, the training or its global "
                             f"batch differ); put them back, or remove {self.path} to train it again")

    def _check_owner(self) -> None:
        """Refuse a path that is not a directory, or a directory holding something other than a run,
        or one inside another run (whose --overwrite would remove it)."""
        try:
            self._check_owner_of(self.path)
        except OSError as exc:  # a folder without search permission, a name too long
            raise DmhpcError(f"run.dir {self.path}: cannot read: {exc.strerror}") from None

    def _check_owner_of(self, p: Path) -> None:
        for folder in p.resolve().parents:
            if RunDir(folder).looks_like_run():
                raise DmhpcError(f"run.dir {p}: inside the run {folder}; choose a directory outside it")
        if p.exists() and not p.is_dir():
            raise DmhpcError(f"run.dir {p}: exists and is not a directory")
        if not p.exists():
            return
        names = sorted(n for n in os.listdir(p) if not is_temporary(n))
        foreign = [n for n in names if n not in OWN_NAMES]
        if foreign or (names and not self.holds_run() and set(names) - {LOCK}):
            example = (foreign or names)[0]
            written = [n for n in (CHECKPOINTS, RECORD, LOG) if n in names]
            if foreign and self.holds_run() and written:  # "not a dmhpc run" misled here too
                raise DmhpcError(f"run.dir {p}: a run, which holds {foreign[0]!r}"
                                 f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, not a run's "
                                 f"file; move {'it' if len(foreign) == 1 else 'them'} out of the run directory")
            if not foreign and written:  # a run's own files, its config gone: "not a dmhpc run" misled
                raise DmhpcError(f"run.dir {p}: holds {written[0]} but no {CONFIG}: a run whose {CONFIG} was "
                                 f"removed; put it back (each checkpoint holds the run's config), or choose a new "
                                 f"directory")
            raise DmhpcError(f"run.dir {p}: exists and is not a dmhpc run (it holds {example!r}"
                             f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}); choose a new or "
                             f"empty directory")
        for name in names:  # a link to a folder elsewhere (scratch) that is not there now
            if (p / name).is_symlink() and not (p / name).exists():
                raise DmhpcError(f"run.dir {p}: {name} is a link to {os.readlink(p / name)}, which is not there (its "
                                 f"file system not mounted here?); mount it or mend the link")
        if self.holds_run():
            self.config()  # a foreign or damaged config.yaml is refused here, never overwritten

    def _lock(self, attempt: Mapping | None = None, stopped: Callable[[], str | None] = lambda: None) -> None:
        """Take the run's lock for the trainer. Waited for, up to LOCK_PATIENCE_S, where its holder
        is about to go: a `dmhpc eval` (minutes), or the previous attempt of this very job,
        which ended before the requeue, but whose lock a network file system keeps for a lease time
        when its node was lost. Refused at once otherwise: a requeued job that met either failed,
        and its training ended there."""
        try:
            if not self.path.exists():
                made = [f for f in (self.path, *self.path.parents) if not f.exists()]
                try:
                    self.path.mkdir(parents=True)
                    self._made = made
                except FileExistsError:  # another trainer made it just now: its lock says who it is
                    pass
        except OSError as exc:
            raise DmhpcError(f"run.dir {self.path}: cannot create: {exc.strerror}") from None
        note = f"job {attempt['job']} attempt {attempt['restart']}" if attempt else ""
        deadline, told = time.monotonic() + LOCK_PATIENCE_S, False
        while True:
            try:
                self._lock_file = hold_lock(
                    self.path / LOCK, f"run.dir {self.path}: in use by another dmhpc trainer or eval ({{holder}}); "
                                      f"wait for it to end or choose another run.dir", "trainer on this run directory",
                    note=note)
                return
            except LockHeld as exc:
                evaluation = exc.holder.startswith(f"{EVAL_OWNER}: ")
                held = re.search(r", (?:SLURM )?job (\S+) attempt (\d+)$", exc.holder)  # ("SLURM job": older dmhpc)
                stale = bool(attempt and held) and held[1] == attempt["job"] and int(held[2]) < attempt["restart"]
                if not (evaluation or stale) or time.monotonic() > deadline:
                    raise
                if stopped():  # the job is ending: waiting on would end in a SIGKILL, without a word
                    raise DmhpcError(f"run.dir {self.path}: {stopped()} while waiting for {exc.holder} to let go of "
                                     f"it; nothing written") from None
                if not told:
                    why = "" if evaluation else " (this job's previous attempt, on a node lost?)"
                    print(f"dmhpc train: run.dir {self.path}: waiting up to {LOCK_PATIENCE_S:.0f} s for {exc.holder}"
                          f"{why} to let go of it", flush=True)
                    told = True
                time.sleep(1.0)

    def _reference_config(self, resume_from: Path, state: Mapping | None = None) -> tuple[dict, str]:
        """The configuration the run trained with so far: the checkpoint's own (`state`, if loaded
        already), which config.yaml (a text file) may have been edited away from by hand;
        config.yaml for a checkpoint of this run without one."""
        state = _load_state(resume_from) if state is None else state
        if not isinstance(state.get("config"), dict) and self.config_path.is_file() and self._own(resume_from):
            return config_to_dict(self.config()), str(self.config_path)
        if not isinstance(state.get("config"), dict):
            raise DmhpcError(f"{resume_from}: not a dmhpc checkpoint (no \"config\" entry)")
        # Through the schema, as config.yaml is read: keys added since it was written take their
        # defaults instead of differing from the new config's.
        return config_to_dict(config_from_dict(state["config"], f"{resume_from}: config")), str(resume_from)

    def check_trained_with(self, state: Mapping, checkpoint: Path) -> Config:
        """Refuse a config.yaml that differs from what `checkpoint` (loaded as `state`) was trained
        with beyond what a resume may change (RESUMABLE, the data paths): a text file edited by hand,
        with which `dmhpc eval` would read the checkpoint as another model (its normalization, its
        architecture) and replace its results. Returns the config.yaml it compared: read again
        afterwards, it may be a run's that replaced this one in between (--overwrite)."""
        self.check_identity(state, checkpoint)
        cfg = self.config()
        if not isinstance(state.get("config"), dict):
            return cfg  # checkpoints of dmhpc's own tests may hold none
        trained = config_to_dict(config_from_dict(state["config"], f"{checkpoint}: config"))
        now = config_to_dict(cfg)
        edited = [key for key in _changed_in_effect(trained, now) if key not in RESUMABLE and key not in DATA_KEYS]
        if edited:
            shown = "; ".join(f"{key} {show(_dotted(now, key))}, trained with {show(_dotted(trained, key))}"
                              for key in edited)
            raise DmhpcError(f"{self.config_path}: differs from what {checkpoint} was trained with: {shown} "
                             f"(edited by hand? restore it)")
        return cfg

    def _check_changes(self, old: dict, new: dict, where: str, data_ids: Mapping[str, str],
                       recorded: Mapping[str, Mapping] | None = None) -> dict:
        """The resumable keys that changed; refuses the others. `recorded`: the data sets the
        checkpoint trained on (`checkpoint_data`), by default run.json's."""
        recorded = self.recorded_data() if recorded is None else recorded
        saved_ids = {f"data.{k}": v.get("fingerprint") for k, v in recorded.items()}
        changed, refused = {}, []
        for key in _changed_in_effect(old, new):
            a, b = _dotted(old, key), _dotted(new, key)
            same_data = key in DATA_KEYS and saved_ids.get(key) and saved_ids.get(key) == data_ids.get(key)
            if key in RESUMABLE or same_data:
                changed[key] = [a, b]
            else:
                refused.append(f"{key} {show(a)} -> {show(b)}")
        for key in DATA_KEYS:  # the same path may now hold another data set (prepared again, replaced)
            was, now = saved_ids.get(key), data_ids.get(key)
            if key not in changed and was and now and was != now and _dotted(old, key) == _dotted(new, key):
                refused.append(f"{key} {show(_dotted(new, key))} holds another data set than the run trained on "
                               f"(manifest fingerprint {was[:12]} -> {now[:12]})")
        if refused:
            raise ConfigChanged(f"{where}: the run was trained with another configuration: {'; '.join(refused)} "
                             f"(only its length, cadence, loader and location may change on resume, see "
                             f"docs/training.md; start a new run.dir, or --resume none --overwrite)")
        return changed

    def remove_orphans(self) -> tuple[int, int]:
        """Delete the temporary files killed writes left in the run's folders: (files, bytes). Only
        under the run's lock, which every writer of them holds."""
        files = size = 0
        for directory in (self.path, self.checkpoint_dir, self.path / EVAL, self.path / PLOTS):
            n, b = remove_orphans(directory)
            files, size = files + n, size + b
        return files, size

    def start(self, cfg: Config, claim: Claim, data: Mapping[str, Mapping[str, Any]], step: int,
              trains: bool = True, check: Callable[[], None] | None = None) -> dict:
        """Write the run's identity now that every start-up check passed; returns what was cleaned up.
        `trains`: False for a finished run started again (its test result checked), which is not
        recorded among the attempts that started it: it writes no checkpoint. `check`: what must
        hold of the run's files once a waiting best.pt is settled, before anything is written.

        Removes the orphan temporary files of killed writes, the old run's files when it is being
        replaced, writes config.yaml and run.json, and cuts the log back to `step`.
        """
        # The attempts of this job that started the run, this one added (check_requeue_progress
        # counts those that wrote no checkpoint since): read before run.json goes. Kept through a
        # start that found nothing trained to resume (a "replacement" of the run by itself).
        job = self._attempt["job"] if self._attempt else None
        try:
            started = (self.started_attempts(job) or []) if job is not None else []
        except DmhpcError:  # a run.json edited by hand: refused on resume, here replaced with the run
            if not claim.replaces:
                raise
            started = []
        attempts = {"job": job, "started": [*started, *([self._attempt["restart"]] if job is not None and trains
                                                       else [])]}
        if claim.replaces:
            # last.pt first: a replacement killed midway left a run that --resume auto took up again,
            # its log or run.json gone (the order was a set's). config.yaml last: it is what makes the
            # folder a run, and the rest must be one that --overwrite (or a resume) still accepts.
            _remove_own(self.checkpoint("last"))
            for name in REPLACED_IN_ORDER:
                _remove_own(self.path / name)
        # Read before anything is written: a damaged log or result refuses the start with the run as
        # it was (config.yaml rewritten and a finished run unfinished made launchers run it again).
        records = self.read_log()
        final = self.read_result("best", "test")
        waiting_best = self._settle_next_best(claim)
        if check is not None:  # (a missing best.pt was refused after config.yaml took the new length)
            check()
        files, size = self.remove_orphans()
        last = self.checkpoint("last")
        rewound = claim.resume_from is not None and claim.own and claim.resume_from.resolve() != last.resolve()
        if claim.resume_from is not None and final and final.get("final", True) and \
                (rewound or LENGTH_KEYS & set(claim.changed)):
            # A finished run asked to train longer (or again from an earlier checkpoint): its test
            # result is the other run's, and the run is unfinished until the trainer tests its selection
            # (before the rewind below: a kill between the two left a rewound run marked finished).
            self.write_result({**final, "final": False}, "best", "test")
        if rewound:
            # Back to an earlier checkpoint of its own (best.pt): it becomes the run's last, so a kill
            # before the next checkpoint resumes from it again, not from the abandoned later one whose
            # log records are cut below.
            with atomic_path(last) as tmp:
                shutil.copyfile(claim.resume_from, tmp)
        # A run resumed keeps its id; a new one (a replacement, a start from another run's checkpoint) draws one.
        self.run_id = claim.run_id or uuid.uuid4().hex
        save_config(cfg, self.config_path)
        atomic_write(self.record_path, json.dumps({
            "format": FORMAT, "version": VERSION, "created_by": f"dmhpc {code_version()}", "run_id": self.run_id,
            "data": {k: dict(v) for k, v in data.items()}, "attempts": attempts}, indent=2) + "\n")
        dropped = self.truncate_log(step, records)
        cleaned = {"orphans_removed": files, "orphan_bytes": size, "log_records_dropped": dropped}
        return {**cleaned, "waiting_best": waiting_best} if waiting_best else cleaned

    def release(self) -> None:
        """Give the lock back; the folders this claim created and nothing else filled go too."""
        if self._lock_file is None:
            return
        handle, self._lock_file = self._lock_file, None
        try:
            # Unlinked while still held (see hold_lock's check of the inode): unlocked first, a
            # trainer starting in between locked the file, which was then unlinked and its folder
            # removed under it; a third then locked a new file, and two trained in one run.dir.
            if self._made and os.listdir(self.path) == [LOCK]:
                (self.path / LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a parent another process filled meanwhile stays
                    for folder in self._made:
                        folder.rmdir()
        finally:
            handle.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _changed_in_effect(old: dict, new: dict) -> list[str]:
    """Keys that differ, but for those that do nothing under either configuration (a warm-up an older
    dmhpc took under the cyclic schedule, removed from the file now that it is refused)."""
    inert = set(inert_keys(old)) & set(inert_keys(new))
    return [key for key in changed_keys(old, new) if key not in inert]


def check_epochs(epochs: int, epoch: int, step_in_epoch: int) -> None:
    """Refuse train.epochs below the epochs a run has trained (`epoch` and `step_in_epoch` of its
    checkpoint's progress; an epoch begun counts): its config.yaml would say fewer epochs than its
    log and checkpoints hold, and leaderboards read the config. The trainer's rule on resume, which
    a launcher applies before submitting."""
    trained = epoch + (step_in_epoch > 0)
    if trained > epochs:
        raise DmhpcError(f"train.epochs {epochs}: the run has trained {trained} epochs already; "
                         f"give at least {trained}, or start a new run.dir")


def check_patience(early_stopping: int, longest: int, since_best: int) -> None:
    """Refuse a train.early_stopping (0: off) the run has gone past: a stretch of evaluations without
    a better selection score as long as it that a better one ended (`longest`: the longest such), or
    a current one (`since_best`) longer than it. With it from the start the run would have stopped
    there and selected another checkpoint: its result would not be this setting's."""
    if early_stopping and (longest >= early_stopping or since_best > early_stopping):
        went = max(longest, since_best)
        raise DmhpcError(f"train.early_stopping {early_stopping}: the run went {went} evaluations without a better "
                         f"selection score already, where it would have stopped; give at least "
                         f"{max(longest + 1, since_best)} (or 0, off), or start a new run.dir")


def check_end_evaluated(length: str, step: int, evaluated: bool) -> None:
    """Refuse a length (`length`: "train.max_steps N" or "train.epochs N") that ends a run where its
    last checkpoint stands, at `step`, when that step was never evaluated (a checkpoint of a stop
    mid-epoch, or of an epoch train.eval_every skipped; `RunDir.evaluated_at`): the trainer would
    train nothing, the end's evaluation would never run, and the final test took an earlier best.pt,
    or failed for want of one."""
    if not evaluated:
        raise DmhpcError(f"{length}: the run would end at step {step}, where its last checkpoint stands, which was "
                         f"never evaluated (its last steps would have no epoch record and no selection); give a "
                         f"longer length")


def check_steps(max_steps: int, position: int) -> None:
    """Refuse train.max_steps (0: no limit) below the steps a run is at (`position`, in the steps of
    the world size it resumes in), for the reason `check_epochs` gives."""
    if max_steps and position > max_steps:
        raise DmhpcError(f"train.max_steps {max_steps}: the run is at step {position} already (in this "
                         f"world size's steps); give at least {position}, or start a new run.dir")


def _remove_own(target: Path) -> None:
    """One of the run's own names, replaced with the run: a link to a folder elsewhere (checkpoints
    on scratch) is emptied and kept (rmtree refused it, midway through the replacement)."""
    if target.is_symlink() and target.is_dir():
        for child in target.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def _load_state(path: Path) -> dict:
    """A checkpoint's content, memory-mapped on the CPU: only its config or progress is read here."""
    import torch  # not at import: the launchers that call this for one entry need no torch otherwise

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read: {exc.strerror}") from None
    # torch's reason for these was about torch.save's options (mmap needs its zip format)
    if not magic:
        raise DmhpcError(f"{path}: empty (0 bytes): not a checkpoint (a copy or a write that failed?)")
    if magic != b"PK\x03\x04":
        raise DmhpcError(f"{path}: not a readable dmhpc checkpoint (truncated, corrupt, or not saved by dmhpc): "
                         f"not a torch.save archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise DmhpcError(f"{path}: not a readable dmhpc checkpoint (truncated, corrupt, or not saved by dmhpc): "
                         f"{reason_of(exc)}") from None
    if not isinstance(state, dict):
        raise DmhpcError(f"{path}: not a dmhpc checkpoint (it holds a {type(state).__name__}, not a mapping)")
    return state


def _read_result(path: Path) -> dict:
    # What to do, said: eval, which would write it anew, read it first and stopped at the same line.
    # The final test is the trainer's: eval writes it unmarked, and the run stayed unfinished.
    again = ("; remove it and run the trainer again (--resume auto tests its selection)"
             if path.name == "best_test.json" else "; remove it and run dmhpc eval again")
    try:
        result = _read_json(path)
        check_result(result)
    except DmhpcError as exc:
        raise DmhpcError(f"{exc}{again}") from None
    except Unfit as exc:
        raise DmhpcError(f"{path}: {exc}{again}") from None
    return undefined_as_nan(result)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmhpcError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DmhpcError(f"{path}: expected a JSON object")
    return value


def _dotted(data: Mapping, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data
