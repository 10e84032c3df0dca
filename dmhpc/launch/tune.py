"""Label-free hyperparameter search: Optuna's TPE sampler and median pruner over training runs.

    dmhpc tune configs/tune/coral-fisher-entropy-laptop.yaml
    dmhpc.launch.tune("configs/tune/coral-fisher-entropy-laptop.yaml")   # or a dict of the same keys

A tune file (every key; docs/cluster.md has the reference):

    base: ../deepmerge-mmd-fisher-entropy.yaml  # training config, relative to the tune file
    out: runs/tune/mmd                          # trials' run directories + the study, relative to the cwd
    objective: snd                              # a label-free selection criterion (names.LABEL_FREE)
    trials: 20                                  # finished trials wanted (complete, pruned or failed)
    parallel: 2                                 # trials running at once
    seed: 0                                     # the sampler's
    executor: slurm                             # slurm | local | debug
    overrides: {train.epochs: 20}               # the same for every trial
    space:                                      # what is searched, as a grid file's random.space
      optim.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      loss.entropy_weight: {low: 1.0e-3, high: 0.5, log: true}
      model.name: [deepmerge2, resnet18]
    enqueue:                                    # trials to run first, when the study begins
      - {optim.lr: 1.0e-3, loss.entropy_weight: 0.05, model.name: deepmerge2}   # e.g. the shipped values
    sampler: {startup_trials: 5}                # random trials before TPE takes over
    pruner: {startup_trials: 4, warmup_epochs: 5}   # median pruner; {} for its defaults, false: none
    slurm: {gpus_per_node: 1, time: "02:00:00", partition: gpu}

Each trial is one training run, OUT/<point name> (its values, as in a grid), trained with
`select.criterion` = the objective, so the run keeps the checkpoint the objective likes best and
the trial's value is that checkpoint's score: the search never reads a target label (a base that
trains on the target's data set is refused, and so are data sets in the space: the objectives of
other data do not compare). Target test metrics of each trial are recorded beside it
(OUT/trials.md), for reporting only.

The study lives in OUT/study.journal, an Optuna journal file (no database server; on a cluster,
put OUT on the shared file system). The tuner holds OUT/tune.lock while it runs: a second tuner of
the same OUT is refused (and OUT/submitit/launch.lock: so is a grid or scaling launch into it).
Relaunching continues the study up to `trials`: a trial left running by a tuner that was killed
is run again with the same values in the same run directory, which resumes from its last
checkpoint (its SLURM job, if it had one, is cancelled first). Changing the
objective, the training configuration (base with overrides, resolved), the space, the ranks per
trial, `enqueue`, `seed`, `sampler` or `pruner` since the study began is refused (`trials`,
`parallel`, `executor` and the rest of `slurm` may change).

Pruning: the tuner reads each running trial's metrics log and reports the best objective score
so far at every evaluation; the median pruner stops a trial whose best score is below the median
of earlier trials at the same epoch (its job is cancelled; the run directory stays, unfinished).
Past the last epoch any earlier trial reached there is no median, so no pruning; a trial whose
training has ended is left to its final test; the debug executor, which runs a trial to its end
before the tuner reads it, never prunes.

A trial fails (and the search goes on) when its job fails, its values give an invalid config, or
its run directory holds another run; three failures in a row stop the search.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dmhpc.checks import Problems, choice, integer, path_text, show, take, unknown_keys
from dmhpc.config import SEED_MAX, ConfigFiles, changed_keys, config_from_dict, config_to_dict, read_config_files
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write, hold_lock, write_reason
from dmhpc.launch.spec import (Range, base_path, data_ids, dotted_keys, finished_as, foreign_tables, out_problem,
                               point_name, point_problem, read_launch_file, read_space, resolve_point,
                               warn_missing_data)
from dmhpc.launch.submit import (CONTROLLERS_LOG, EXECUTORS, SUBMISSION_COMMENT, Resources, TrainTask,
                                 cancel_local_jobs, check_executor_here, hold_launch_lock, jobs_commented,
                                 left_without_result, local_gpus, local_threads, make_executor, pick_gpus,
                                 preempt_signal, read_resources, refused_submission, sigterm_as_interrupt, submission,
                                 use_gpus, wait_for, warn_setup_unused)
from dmhpc.markdown import table
from dmhpc.names import CRITERIA, DIVERGED, LABEL_FREE
from dmhpc.run import LENGTH_KEYS, RESULT_KEYS, RESUMABLE, RunDir

TUNE_KEYS = ("base", "out", "objective", "trials", "parallel", "seed", "executor", "overrides", "space", "enqueue",
             "sampler", "pruner", "slurm")
SAMPLER_DEFAULTS = {"startup_trials": 5}  # the sections' keys, and their values when left out
PRUNER_DEFAULTS = {"startup_trials": 4, "warmup_epochs": 5}
# Keys the tuner sets for every trial, and why.
TUNER_KEYS = {"run.dir": "OUT/<trial's point name>", "train.signals": "[submitit's preemption signal]",
              "select.criterion": "the objective"}
JOURNAL, LOCK, TABLE = "study.journal", "tune.lock", "trials"
FAILURES_IN_A_ROW = 3  # consecutive failed trials that stop the search: most likely not the values' fault
_NO_CHOICE = object()  # an enqueue value matching none of its key's choices
STOPPING_WAIT_S = 600  # how long a trial waits for a cancelled job to let go of its run directory
ATTR_VALUES, ATTR_RUN = "values", "run_dir"
ATTR_SUBMISSION = "submission"  # the token in a SLURM trial's job comment
ATTR_BY_VALUES = "failed_by_values"  # a trial its own values failed (told as pruned: see _values_failed)


@dataclass(frozen=True)
class Tune:
    """A checked tune file."""

    source: str
    base: Path
    out: Path
    objective: str
    trials: int
    parallel: int
    seed: int
    executor: str
    overrides: dict
    space: dict  # dotted key -> list of choices or Range
    enqueue: tuple[dict, ...]  # values of the first trials
    startup_trials: int
    pruner: dict | None  # {startup_trials, warmup_epochs}, or None: no pruning
    resources: Resources

    def identity(self) -> dict:
        """What the study's trials depend on, comparable across launches: the objective, the space,
        the training configuration every trial starts from (base + overrides, resolved, so an
        edit of the base file or of a file it inherits from counts; the path to it does not), the
        ranks that train each trial (BatchNorm's batches, the losses' scope), the manifest
        fingerprints of the data sets prepared so far (one prepared again under the same path is
        other data), and how the trials are chosen and stopped: the enqueued values (read at the
        first launch only: an edit ran nothing), the seed, the sampler's and the pruner's settings
        (an edit changed them midway through the study without a word)."""
        space = {k: (v if isinstance(v, list) else {"low": float(v.low), "high": float(v.high), "log": v.log})
                 for k, v in self.space.items()}
        cfg = resolve_point(self.base_files, self.overrides)
        config = _trials_config(config_to_dict(cfg))
        return json.loads(json.dumps({"objective": self.objective, "config": config, "space": space,
                                      "ranks": self.resources.ranks, "data": data_ids(cfg),
                                      "enqueue": list(self.enqueue), "seed": self.seed,
                                      "sampler": {"startup_trials": self.startup_trials},
                                      "pruner": self.pruner}, sort_keys=True))

    @functools.cached_property
    def base_files(self) -> ConfigFiles:
        """The base file and those it inherits from, read once a launch, when it reads the tune file:
        every trial's configuration is built from them. Each trial's read the files as it started: a
        file edited while the tuner ran (another experiment's batch size) trained the later trials
        otherwise, in one study with the earlier ones and without a word (the next launch refuses
        the edit)."""
        return read_config_files(self.base)

    def point(self, values: Mapping[str, Any]):
        """(run directory, validated config) of the trial with these values."""
        run_dir = self.out / point_name(values)
        cfg = resolve_point(self.base_files, {**self.overrides, **values, "run.dir": str(run_dir),
                                              "select.criterion": self.objective,
                                              "train.signals": [preempt_signal()]},
                            self.resources.ranks)
        return run_dir, cfg


def _trials_config(config: dict) -> dict:
    """What every trial's configuration shares: `config` but the keys the tuner sets per trial."""
    config["run"].pop("dir", None)  # set per trial
    config["select"].pop("criterion", None)  # the objective's
    return json.loads(json.dumps(config, sort_keys=True))


def _recorded_config(config: Any, journal: Path) -> Any:
    """The identity's configuration as a study began it, read through the schema as a trial's is:
    keys added to dmhpc since take their defaults, and are no change. A key dmhpc no longer knows
    leaves it as it was (a change)."""
    if not isinstance(config, dict):
        return config
    try:
        return _trials_config(config_to_dict(config_from_dict(config, f"{journal}: the study's configuration")))
    except DmhpcError:
        return config


def _read_options(problems: Problems, data: Any, where: str, defaults: dict) -> dict:
    if data is None:
        return dict(defaults)
    if not isinstance(data, Mapping):
        problems.add(where, f"expected a mapping with {', '.join(defaults)}, got {show(data)}")
        return dict(defaults)
    unknown_keys(problems, data, tuple(defaults), where + ".")
    return {k: take(problems, data, k, integer(0), v, where + ".") for k, v in defaults.items()}


def _read_enqueue(problems: Problems, data: Any, space: Mapping[str, list | Range], asked) -> tuple[dict, ...]:
    """The `enqueue` list: each entry a value for every key of the space, inside it. `asked`: every
    key the file's space names (one that was refused is reported there, not again here)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.add("enqueue", f"expected a list of mappings (a value for every key of space), got {show(data)}")
        return ()
    good = []
    for i, entry in enumerate(data):
        where = f"enqueue[{i}]"
        if not isinstance(entry, Mapping):
            problems.add(where, f"expected a mapping of space keys to values, got {show(entry)}")
            continue
        bad, values = len(problems.lines), dict(entry)
        for key in sorted(set(space) - set(entry)):
            problems.add(f"{where}.{key}", "missing: give a value for every key of space")
        for key, value in entry.items():
            dim = space.get(key)
            if dim is None and key in asked:
                continue
            if dim is None:
                problems.add(f"{where}.{key}", f"not a key of space ({', '.join(sorted(space))})")
            elif isinstance(dim, list):
                # The choice itself is enqueued, as the sampler knows it (its JSON text): a list equal
                # to a choice but written otherwise ([0.0, 0.5] for [0, 0.5]) was no choice there.
                match = next((c for c in dim if type(c) is type(value) and c == value), _NO_CHOICE)
                if match is _NO_CHOICE:
                    problems.add(f"{where}.{key}", f"{show(value)} is not one of the choices {show(dim)}")
                values[key] = match
            elif isinstance(dim, Range) and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                 and dim.low <= value <= dim.high):
                problems.add(f"{where}.{key}", f"{show(value)} is outside [{dim.low:g}, {dim.high:g}]")
        if len(problems.lines) == bad:
            good.append(values)
    return tuple(good)


def load_tune(spec: str | Path | Mapping, executor: str | None = None) -> Tune:
    """Read and check a tune file (or dict); raise all problems at once."""
    data, source, here = read_launch_file(spec)
    problems = Problems(source)
    unknown_keys(problems, data, TUNE_KEYS)
    base = base_path(problems, "base", take(problems, data, "base", path_text()), here)
    out_text = take(problems, data, "out", path_text())
    objective = take(problems, data, "objective", choice(*CRITERIA))
    if objective is not None and objective not in LABEL_FREE:
        problems.add("objective", f"{objective} reads target labels; the search must not. Choose one of "
                     f"{', '.join(LABEL_FREE)} (target metrics are recorded beside each trial anyway)")
    trials = take(problems, data, "trials", integer(1))
    parallel = take(problems, data, "parallel", integer(1), 1)
    seed = take(problems, data, "seed", integer(0, SEED_MAX), 0)
    # The file's is checked where --executor replaces it too: a typo passed until the flag was left out.
    in_file = take(problems, data, "executor", choice(*EXECUTORS), "slurm")
    executor = executor or in_file
    overrides = dotted_keys(problems, data.get("overrides"), "overrides", TUNER_KEYS)
    if "space" not in data or not data["space"]:
        problems.add("space", "missing or empty: give at least one dotted key with choices or {low, high, log}")
    space = read_space(problems, data.get("space"), "space", TUNER_KEYS)
    for key in sorted(set(space) & set(overrides)):
        problems.add(key, "set in both overrides and space")
    for key in sorted(k for k in space if k == "data" or k.startswith(("data.source", "data.target"))):
        # The objective of other data sets is another number (SND grows with the rows): TPE ranked them as one.
        problems.add(f"space.{key}", "the data sets are the study's, not a value to search: their objectives do "
                     "not compare; tune each data pair in a study of its own")
    if "seed" in space:  # TPE would take a seed's luck for the others' values, and fit it as one
        problems.add("space.seed", "the training seed is the study's, not a value to search: the best trial "
                     "would be its seed's luck as much as its values; set it in overrides (a grid compares seeds)")
    sampler = _read_options(problems, data.get("sampler"), "sampler", SAMPLER_DEFAULTS)
    # `false` turns pruning off; null is refused: a section whose keys were all commented out read as
    # null too, and turned pruning off without a word (a config section so left keeps its defaults).
    if "pruner" in data and data["pruner"] is None:
        problems.add("pruner", "null: write false for no pruning, or leave the section out for its defaults")
    pruner = None if data.get("pruner") is False else _read_options(
        problems, data.get("pruner", {}), "pruner", PRUNER_DEFAULTS)
    asked = set(data["space"]) if isinstance(data.get("space"), Mapping) else set()
    enqueue = _read_enqueue(problems, data.get("enqueue"), space, asked)
    resources = read_resources(problems, data.get("slurm"), shape=True, executor=executor)
    if executor == "debug" and parallel > 1:
        problems.add("parallel", f"the debug executor runs one trial at a time in this process, got {parallel}")
    if out_text is not None:
        for problem in (out_problem(Path(out_text).resolve()),
                        foreign_tables(Path(out_text).resolve(), (f"{TABLE}.md", f"{TABLE}.csv"), LOCK)):
            if problem is not None:
                problems.add("out", problem)
    problems.raise_if_any()
    t = Tune(source, base, Path(out_text).resolve(), objective, trials, parallel, seed, executor, overrides,
             space, enqueue, sampler["startup_trials"], pruner, resources)
    # The study records base + overrides as what every trial starts from (`identity`): they must be a
    # valid configuration without the space's values (it failed later, blaming a "command line").
    try:
        # (Without the ranks: the rows per step depend on a batch size the space may set.)
        if resolve_point(base, overrides).data.trains_on_target():
            # Every trial would train (and could select) on target labels: trials.md said "label-free".
            problems.add("overrides", "data.source and data.target are one data set: every trial trains on the "
                         "target's labels, which a label-free search must not read; give the source domain")
    except DmhpcError as exc:
        problems.add("overrides", f"{point_problem(exc)} (with the base alone, as the study records them; a key "
                     f"that is valid only beside a space's value goes in the space, as a single choice)")
    # Every corner of the space must give a valid config: checked now, not when a trial starts.
    corners = ({k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()},
               {k: (v[-1] if isinstance(v, list) else v.high) for k, v in space.items()})
    for corner in corners:
        try:
            t.point(corner)
        except DmhpcError as exc:
            problems.add("space", f"at {show(corner)}: {point_problem(exc)}")
    # A listed choice is refused when no setting of the other keys takes it: at either corner, or
    # as the base config sets them. At one corner alone, that corner's own problem was blamed on
    # every choice; on the base config alone, a choice valid beside another key's choice (a ResNet
    # stem beside model.name resnet18) was refused. The problem said is its own where it has one.
    for key, dim in space.items():
        for value in (dim if isinstance(dim, list) else []):
            said = []
            for others in (*corners, {}):
                try:
                    t.point({**others, key: value})
                    break
                except DmhpcError as exc:
                    said.append(point_problem(exc))
            else:
                problems.add(f"space.{key}", f"{show(value)}: {said[-1]}")
    # An enqueued trial is a point of its own, run first: one that is no valid config failed at its
    # launch and, counted, used up the budget on every later launch.
    for number, values in enumerate(enqueue):
        try:
            t.point(values)
        except DmhpcError as exc:
            problems.add(f"enqueue[{number}]", point_problem(exc))
    problems.raise_if_any()
    return t


# --- the study -------------------------------------------------------------------------------------

def _lock(out: Path):
    """An OS lock on OUT/tune.lock for the tuner's lifetime; released when the process dies."""
    return hold_lock(out / LOCK, f"{out / LOCK}: a tuner is already running this study ({{holder}}); wait for it or "
                                 f"use another out", "tuner of this study")


class JournalUnwritable(DmhpcError):
    """The journal could not take a record: the search's, never a trial's fault. Taken for a trial's
    (a damaged log of its run), a failed write on a shared file system failed a healthy trial, its
    job cancelled, or a finished one with its result lost; the search stops with it instead, the
    trial left running, for the next launch to take up."""


def _journal_storage(journal: Path):
    """Optuna's storage in the journal file `journal`, whose records are whole or not written: a
    record that cannot be written (a full disk, over quota) is the file's one-line error with the
    part of it that was written cut off again (Optuna would append the next record to the fragment,
    and every later launch would be refused)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    class Journal(JournalFileBackend):
        def append_logs(self, logs):
            size = journal.stat().st_size
            try:
                super().append_logs(logs)
            except OSError as exc:
                try:
                    os.truncate(journal, size)
                except OSError:
                    pass  # (said: the next launch refuses a record cut short)
                raise JournalUnwritable(f"{journal}: cannot record the search: {write_reason(exc)}; the study "
                                        f"is as it was before") from None

    return JournalStorage(Journal(str(journal)))


# Optuna's journal record that creates a trial (JournalOperation.CREATE_TRIAL): a code of the file
# format, which journals written by every Optuna version keep.
CREATE_TRIAL = 4


def _check_trial_records(journal: Path) -> None:
    """Refuse a journal with a record of a trial no earlier record created: Optuna numbers trials by
    their creation records and drops, without a word, every record of a trial it does not know, so
    one trial's lines removed by hand (a failed trial, say) lost every later trial's parameters and
    results, and they ran again as trials "left running by a tuner that was killed"."""
    created = 0
    with journal.open("rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # (Optuna's replay refuses it, below)
            if not isinstance(record, dict):
                continue
            if record.get("op_code") == CREATE_TRIAL:
                created += 1
            elif isinstance(record.get("trial_id"), int) and not 0 <= record["trial_id"] < created:
                raise DmhpcError(f"{journal}: line {n} is of trial {record['trial_id']}, which no earlier line "
                                 f"created (lines removed by hand?): Optuna would drop it and the later trials' "
                                 f"results; restore the file, or tune into another out")


def _open_study(t: Tune):
    """The study of OUT/study.journal (created on the first launch), checked against the file."""
    import optuna

    journal = t.out / JOURNAL
    # A record cut short (a kill or a full disk mid-write, a hand edit) would make Optuna append the
    # next one to the fragment and fail later on every launch: refuse it now, naming the file.
    if journal.exists() and journal.stat().st_size:
        with journal.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                raise DmhpcError(f"{journal}: its last record is incomplete (the tuner was killed while writing, "
                                 f"or the disk filled); remove the last line to continue the study")
        _check_trial_records(journal)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=t.pruner["startup_trials"],
                                          n_warmup_steps=t.pruner["warmup_epochs"])
              if t.pruner is not None else optuna.pruners.NopPruner())
    try:
        storage = _journal_storage(journal)
        # (read before the study is created: a journal of other studies is not to be written into)
        others = sorted(set(optuna.get_all_study_names(storage)) - {"dmhpc-tune"})
        study = None if others else optuna.create_study(storage=storage, pruner=pruner, study_name="dmhpc-tune",
                                                        direction="maximize", load_if_exists=True)
        launched = len(study.get_trials(deepcopy=False)) if study else 0
    # json.JSONDecodeError is a ValueError; JSON that is no journal record fails optuna's replay
    # with a TypeError or an AssertionError.
    except (ValueError, KeyError, AttributeError, TypeError, AssertionError) as exc:
        raise DmhpcError(f"{journal}: not a readable Optuna journal ({type(exc).__name__}: {exc})") from None
    # A journal of another Optuna study (or one minimizing): its trials' sampler and pruner would
    # work against the objective, or a second study went into someone's file without a word.
    if study is None or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise DmhpcError(f"{journal}: " + (f"holds other Optuna studies ({', '.join(others)})" if others else
                                            "its study minimizes; a dmhpc tune maximizes its objective")
                         + "; not this tuner's journal: tune into another out")
    # Seeded by the file's seed and the trials so far: the same seed on every launch would propose
    # the first launch's random start-up values again, and a relaunch would repeat trials.
    # constant_liar: trials running count as bad ones, so that parallel proposals differ (Optuna 5's
    # default; off in Optuna 4, which setup.cfg takes too, and whose parallel proposals then repeat).
    study.sampler = optuna.samplers.TPESampler(seed=(t.seed + launched) % (SEED_MAX + 1),
                                               n_startup_trials=t.startup_trials, constant_liar=True)
    identity = t.identity()
    before = study.user_attrs.get("identity")
    if before is None:  # a new study, or one whose first launch stopped before its identity was recorded
        # The identity last: a study that has it has every enqueued trial. A launch stopped before
        # (a kill, a full disk) enqueued the first ones, in order: the next enqueues the rest.
        wanted = [{k: (json.dumps(v) if isinstance(t.space[k], list) else v) for k, v in values.items()}
                  for values in t.enqueue]
        there = [trial.system_attrs.get("fixed_params") for trial in study.get_trials(deepcopy=False)]
        if there != wanted[:len(there)]:
            raise DmhpcError(f"{journal}: holds trials that are not the first of this file's enqueue (a study "
                             f"begun by another tune file, stopped before it started); use another out")
        for params in wanted[len(there):]:
            study.enqueue_trial(params)
        study.set_user_attr("identity", identity)
    elif json.dumps(before, sort_keys=True) != json.dumps(identity, sort_keys=True):  # (see `_as_stored`)
        # A study an older dmhpc began records no ranks: its trials' are not known, and not refused.
        if not isinstance(before, dict):
            raise DmhpcError(f"{journal}: the study's identity is {show(before)}, not what dmhpc records; use "
                             f"another out")
        if "config" in before:  # (the first tuner recorded none)
            before = {**before, "config": _recorded_config(before["config"], journal)}
        # (each only where the study recorded it: an older dmhpc's study is not refused for it)
        changed = [k for k in ("objective", "space", "ranks", "seed", "sampler", "pruner")
                   if k in before and _as_stored(k, before[k]) != _as_stored(k, identity[k])]
        # Read at the first launch only: values added since ran nothing (values removed are no change).
        added = [e for e in identity["enqueue"] if e not in before.get("enqueue", identity["enqueue"])]
        if added:
            raise DmhpcError(f"{journal}: enqueue: {show(added[0])} was not in the file when the study began, "
                             f"and enqueue is read at its first launch only; tune it in another out")
        # Keys a trial's run resumes across without training differently (cadence, loader, checks)
        # are no other study: a harmless edit refused every trial of the study.
        then = before.get("config", identity["config"])
        keys = [k for k in changed_keys(then, identity["config"]) if k not in RESUMABLE or k in LENGTH_KEYS
                or k in RESULT_KEYS] if isinstance(then, dict) else []
        if keys or not isinstance(then, dict):
            changed.insert(1, "config")
        if changed:
            raise DmhpcError(f"{journal}: holds a study of another tune file ({', '.join(changed)} changed since "
                             f"it began{': ' + ', '.join(keys) if keys else ''}); use another out, or restore the "
                             f"file")
        # The same paths (the config's check above): only a data set fingerprinted at both launches is
        # compared, one prepared since the study began is no change, and a fingerprint is never
        # forgotten (a launch that found the set missing or unfinished would let any data in after it).
        then_data = before.get("data") if isinstance(before.get("data"), dict) else {}  # (older tuners: none)
        again = [f"{k} {identity['config']['data'][k.partition('.')[2]]}" for k in sorted(identity["data"])
                 if k in then_data and then_data[k] != identity["data"][k]]
        if again:
            raise DmhpcError(f"{journal}: its trials trained on other data ({', '.join(again)} prepared again "
                             f"since the study began: their scores and the new trials' are not comparable); "
                             f"use another out")
        study.set_user_attr("identity", {**identity, "enqueue": before.get("enqueue", identity["enqueue"]),
                                          "data": {**then_data, **identity["data"]}})
    return study


def _as_stored(key: str, value) -> str:
    """An identity entry as JSON text, as Optuna stores choices: [1, 2] and [1.0, 2.0] are other
    choices to it (equal in Python, they passed, and the next proposal failed with a traceback that
    left a trial behind). A range's bounds are floats whatever their spelling (an older dmhpc
    recorded them as written)."""
    if key == "space" and isinstance(value, dict):
        value = {k: ({**v, "low": float(v["low"]), "high": float(v["high"])}
                     if isinstance(v, dict) and all(type(v.get(b)) in (int, float) for b in ("low", "high")) else v)
                 for k, v in value.items()}
    return json.dumps(value, sort_keys=True)


def _distributions(space: Mapping[str, list | Range]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {k: (CategoricalDistribution([json.dumps(c) for c in v]) if isinstance(v, list)
                else FloatDistribution(v.low, v.high, log=v.log)) for k, v in space.items()}


def _values(params: Mapping[str, Any], space: Mapping[str, list | Range]) -> dict:
    """The values a trial trains with: choices as given, floats as a grid draws them (Range.rounded)."""
    return {k: (json.loads(params[k]) if isinstance(space[k], list) else space[k].rounded(params[k]))
            for k in sorted(space)}


def _cancel_slurm_job(job_id: str) -> None:
    """Cancel a job of an earlier tuner and wait until SLURM lists it no more (its trainer holds the
    run directory until then)."""
    try:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        for _ in range(60):
            queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=60)
            if queued.returncode != 0 or not queued.stdout.strip():
                return
            time.sleep(5)
        why = "SLURM still lists it after 5 minutes"
    except (OSError, subprocess.SubprocessError) as exc:
        why = str(exc)
    print(f"dmhpc tune: warning: cannot cancel SLURM job {job_id} of an earlier tuner ({why}); its trial's "
          f"rerun may find the run directory in use", flush=True)


def _requeue_stale(study, folder: Path) -> int:
    """Trials a killed tuner left running: the same values queued again (same run directory, so the
    new trial resumes from its last checkpoint), then the old trial failed. Returns how many."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    stale = [tr for tr in trials if tr.state == TrialState.RUNNING]
    # A tuner killed between the two steps below queued the rerun already: a second one spent the
    # budget on the same values twice.
    queued = {tr.user_attrs.get("rerun_of") for tr in trials if tr.state == TrialState.WAITING}
    failed = [tr for tr in stale if tr.user_attrs.get("failure") and tr.number not in queued]
    for tr in failed:
        # A failure recorded, the tuner killed before it told the study: a failure, not a trial to
        # run again (rerun, it was no longer counted, and trials.md kept its old failure); told as
        # it would have been (pruned where its values failed it).
        study.tell(tr.number, state=TrialState.PRUNED if tr.user_attrs.get(ATTR_BY_VALUES) else TrialState.FAIL)
    stale = [tr for tr in stale if tr not in failed]
    for tr in stale:
        job_id, executor = str(tr.user_attrs.get("job_id", "")), tr.user_attrs.get("executor")
        # A tuner killed after the submission and before it recorded the job id left the job
        # unnamed: found on SLURM by its comment's token, locally as any job left in the folder
        # (this tuner holds the study's lock: no other started it).
        if executor == "slurm":
            token, found = tr.user_attrs.get(ATTR_SUBMISSION), [job_id] if job_id else []
            if not job_id and isinstance(token, str) and token:
                try:
                    found = jobs_commented(token)
                except DmhpcError as exc:  # (no squeue here: a study relaunched off the cluster)
                    print(f"dmhpc tune: warning: cannot look for the SLURM job of trial {tr.number} of an earlier "
                          f"tuner ({exc}); its rerun may find the run directory in use", flush=True)
            for job in found:
                _cancel_slurm_job(job)
        elif executor == "local" and (job_id.isdecimal() or not job_id):
            cancel_local_jobs(folder, job_id or None, who="an earlier tuner")
        if tr.number not in queued:
            _queue_again(study, tr)  # first: a crash here loses nothing
        study.tell(tr.number, state=TrialState.FAIL)
    return len(stale)


def _evaluations(run: RunDir) -> tuple[list[tuple[int, float]], bool]:
    """(epoch, best objective score so far) at each evaluation in the run's log, and whether its
    training has ended (its last epoch record says so; the test of its selected checkpoint follows)."""
    out, best, ended = [], -math.inf, False
    for r in run.read_log():
        if r.get("kind") != "epoch":
            continue
        ended = r.get("last") is True  # a resume's records follow a finished run's last one
        score = r.get("selection", {}).get("score")
        if isinstance(score, (int, float)) and math.isfinite(score):
            best = max(best, score)
            out.append((int(r["epoch"]), best))
    return out, ended


@dataclass
class _Running:
    trial: Any  # optuna.Trial
    run: RunDir
    job: Any  # submitit.Job; None for values whose run had finished already
    reported: int = -1  # last epoch reported to the pruner
    trained: bool = False  # the run's training has ended: its final test is under way, nothing to prune
    gpus: tuple[int, ...] | None = None  # what a local job was given (None: submitit's default)


def _report(r: _Running) -> None:
    """Report the run's new evaluations to the study (what the pruner compares trials by)."""
    evaluations, r.trained = _evaluations(r.run)
    for epoch, best in evaluations:
        if epoch > r.reported:
            r.trial.report(best, epoch)
            r.reported = epoch


def _queue_again(study, trial) -> None:
    """The trial's values queued for a trial of its own, which runs them again. Its enqueued values
    first: a tuner killed while the sampler filled in a trial left some of them unset, and the rerun
    drew them anew (an enqueued baseline never ran). (A trial of this launch, asked whole, is no
    FrozenTrial and keeps no system_attrs.)"""
    values = {**getattr(trial, "system_attrs", {}).get("fixed_params", {}), **trial.params}
    study.enqueue_trial(values, user_attrs={"rerun_of": trial.number})


def _fail(study, trial, why: str) -> str:
    from optuna.trial import TrialState

    trial.set_user_attr("failure", why)
    study.tell(trial, state=TrialState.FAIL)
    print(f"dmhpc tune: trial {trial.number} failed: {why}", flush=True)
    return "fail"


def _values_failed(study, trial, why: str) -> str:
    """A trial its own values failed (a run that diverged, values giving an invalid configuration):
    told to the sampler as pruned with what it reported, which TPE ranks below every complete trial,
    so that it learns to avoid them. A failed trial it ignores: told so, TPE went on proposing
    values where runs diverge (34 of 40 trials in a simulation), and three in a row stopped the search."""
    from optuna.trial import TrialState

    trial.set_user_attr(ATTR_BY_VALUES, True)  # (before its failure: a kill between is told as this)
    trial.set_user_attr("failure", why)
    study.tell(trial, state=TrialState.PRUNED)
    print(f"dmhpc tune: trial {trial.number} failed by its values (told as pruned): {why}", flush=True)
    return "pruned"


def _diverged(run: RunDir) -> str | None:
    """Why the run diverged, where its log ends with the trainer's record of it."""
    records = run.read_log()
    return records[-1].get("error", "diverged") if records and records[-1].get("kind") == DIVERGED else None


def _finish(study, r: _Running, objective: str) -> str:
    """Tell the study how a finished job did: 'complete', 'pruned' (its values failed it) or 'fail'."""
    try:
        failed = wait_for({str(r.trial.number): r.job}) if r.job is not None else {}  # a debug job runs here
        _report(r)  # every evaluation, for the pruner's medians at each epoch
        result = r.run.read_result("best", "test")
        diverged = _diverged(r.run) if failed else None
    except JournalUnwritable:
        raise
    except DmhpcError as exc:  # a damaged log or result file
        return _fail(study, r.trial, str(exc))
    if diverged is not None:
        return _values_failed(study, r.trial, f"diverged: {diverged}")
    if failed and result is not None and r.run.finished:
        # The run's end, its selected checkpoint's test, written before the job failed (a rank that
        # torchrun ended after rank 0's last line): the result stands, as a later trial of these values
        # took it (finished_as) once this one was failed, its score lost to the sampler.
        print(f"dmhpc tune: trial {r.trial.number} {r.run.path.name}: its job failed after the run finished "
              f"({failed[str(r.trial.number)]}); its result is taken", flush=True)
    elif failed or result is None:
        return _fail(study, r.trial, failed.get(str(r.trial.number), "the run wrote no test result"))
    checkpoint = result.get("checkpoint", {})
    if checkpoint.get("criterion") != objective or not isinstance(checkpoint.get("score"), (int, float)):
        return _fail(study, r.trial, f"{r.run.path}: its checkpoint was selected by {checkpoint.get('criterion')}, "
                                     f"not by the objective {objective}")
    for domain in ("source", "target"):  # for reporting only; the search never reads them
        for metric in ("accuracy", "roc_auc"):
            value = result.get(domain, {}).get(metric)
            if value is not None:
                r.trial.set_user_attr(f"{domain}_test_{metric}", value)
    r.trial.set_user_attr("epoch", checkpoint.get("epoch"))
    study.tell(r.trial, float(checkpoint["score"]))
    print(f"dmhpc tune: trial {r.trial.number} {r.run.path.name}: {objective} {float(checkpoint['score']):.4f} "
          f"(epoch {checkpoint.get('epoch')})", flush=True)
    return "complete"


def _counted(study) -> int:
    """Trials that used up the budget: complete, pruned, or failed other than by a killed tuner."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rerun = {tr.user_attrs.get("rerun_of") for tr in trials}
    return sum(tr.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (tr.state == TrialState.FAIL and tr.number not in rerun) for tr in trials)


class _Search:
    """One launch of the tuner: starts trials, reads the running ones, stops the bad ones."""

    def __init__(self, t: Tune, study, poll_s: float):
        self.t, self.study, self.poll_s = t, study, poll_s
        self.distributions = _distributions(t.space)
        self.folder = t.out / "submitit"
        self.threads = local_threads(t.parallel * t.resources.ranks) if t.executor == "local" else None
        self.submitter = make_executor(t.executor, self.folder, t.resources, f"dmhpc-tune-{t.out.name}")
        self.gpus = local_gpus(t.resources.gpus_per_node) if t.executor == "local" else None
        self.running: list[_Running] = []
        self.stopping: dict[Path, Any] = {}  # run directory: the job cancelled in it, until it has ended
        self.failures_in_a_row = 0

    def outcome(self, what: str) -> None:
        """Count a job's outcome ('complete', 'pruned' or 'fail'): a pruned trial trained, as a complete
        one did, so neither is a failure's fault of the setup."""
        self.failures_in_a_row = self.failures_in_a_row + 1 if what == "fail" else 0

    def start(self) -> None:
        """Ask the sampler for one trial and start it (or attach it to what already has its values)."""
        t, study = self.t, self.study
        trial = study.ask(self.distributions)
        try:
            values = _values(trial.params, t.space)
            trial.set_user_attr(ATTR_VALUES, values)
            run_dir, cfg = t.point(values)
        except JournalUnwritable:
            raise
        except DmhpcError as exc:
            self.outcome(_values_failed(study, trial, str(exc)))  # (the start every trial shares was valid)
            return
        try:
            trial.set_user_attr(ATTR_RUN, str(run_dir))
            same = next((r for r in self.running if r.run.path == run_dir), None)
            if same is not None:  # values a running trial has: share its job, its result, its fate
                print(f"dmhpc tune: trial {trial.number} {run_dir.name}: the values of running trial "
                      f"{same.trial.number}; sharing its job", flush=True)
                self.running.append(_Running(trial, same.run, same.job, gpus=same.gpus))
                return
            run = RunDir(run_dir)
            self.await_stopped(run)
            run.check_relaunch(cfg, data_ids(cfg), ranks=t.resources.ranks)  # another run here would fail the job
            if finished_as(run, cfg):  # values an earlier trial trained with: its result
                self.outcome(_finish(study, _Running(trial, run, None), t.objective))
                return
        except JournalUnwritable:
            raise
        except DmhpcError as exc:
            self.outcome(_fail(study, trial, str(exc)))
            return
        held = {id(r.job): r.gpus for r in self.running if r.job is not None and r.gpus}
        gpus = pick_gpus(self.gpus, list(held.values()), t.resources.gpus_per_node)
        use_gpus(self.submitter, gpus)
        try:
            log = self.folder / CONTROLLERS_LOG if t.executor == "local" else None
            with submission(self.threads, log):
                # Recorded before the job exists, so that the next launch finds a job whose id a
                # killed tuner never recorded (see _requeue_stale).
                trial.set_user_attr("executor", t.executor)
                if t.executor == "slurm":
                    token = uuid.uuid4().hex
                    trial.set_user_attr(ATTR_SUBMISSION, token)
                    self.submitter.update_parameters(slurm_comment=SUBMISSION_COMMENT + token)
                with refused_submission(f"the job of trial {trial.number}", self.folder):
                    job = self.submitter.submit(TrainTask(), config_to_dict(cfg))
                self.running.append(_Running(trial, run, job, gpus=gpus))
                trial.set_user_attr("job_id", job.job_id)
        except DmhpcError as exc:
            # Told before the search stops: a trial left RUNNING would be taken for one of a killed
            # tuner and rerun (its SLURM job looked for) at every launch. Its values are queued again
            # first (a crash between loses nothing): not submitted, it trained nothing, and counted as
            # a failure it used up the budget, and an enqueued baseline never ran.
            try:
                _queue_again(study, trial)
                _fail(study, trial, str(exc))
            except DmhpcError as unrecorded:  # (the same full disk, most likely): both are said
                raise DmhpcError(f"{exc}; and {unrecorded} (the next launch runs the trial again)") from None
            raise
        print(f"dmhpc tune: trial {trial.number} {run_dir.name}: job {job.job_id}", flush=True)

    def poll(self) -> None:
        """Finish the trials whose job ended; prune the running ones the pruner rejects."""
        from optuna.trial import TrialState

        counted = set()  # jobs whose outcome is counted: trials sharing one failed job are one failure
        for r in list(self.running):
            if r not in self.running:  # pruned with the trial whose job it shares
                continue
            # A debug job runs when its result is asked for, so it is only ever read finished.
            if self.t.executor == "debug" or r.job.done() or left_without_result(r.job):
                self.running.remove(r)
                what = _finish(self.study, r, self.t.objective)
                if id(r.job) not in counted:
                    counted.add(id(r.job))
                    self.outcome(what)
                continue
            try:
                _report(r)
            except JournalUnwritable:
                raise
            except DmhpcError as exc:  # a damaged log: this trial's fault, not the search's
                why = str(exc)
                self.stop(r.job, lambda o: _fail(self.study, o.trial, why))
                self.outcome("fail")
                continue
            # Not once training has ended: cancelled in its final test, a trial that trained to its end
            # lost its result, and ranked below every complete one.
            if not r.trained and r.trial.should_prune():
                epoch = r.reported

                def prune(o: _Running) -> None:
                    self.study.tell(o.trial, state=TrialState.PRUNED)
                    print(f"dmhpc tune: trial {o.trial.number} pruned after epoch {epoch}", flush=True)
                self.stop(r.job, prune)
                self.outcome("pruned")

    def stop(self, job, tell) -> None:
        """Cancel `job`, then tell every trial of it (several share one job when their values are
        equal). In this order: a tuner killed between the two left a told trial's job training on,
        which no launch looked for again; the other way its trial is rerun, its job cancelled."""
        sharing = [o for o in self.running if o.job is job]
        if job is not None:
            job.cancel(check=False)  # it may have ended meanwhile
            self.stopping[sharing[0].run.path] = job
        for o in sharing:
            tell(o)
            self.running.remove(o)

    def await_stopped(self, run: RunDir) -> None:
        """A cancelled job holds its run directory until its processes have ended (on SLURM after
        KillWait; its state reads CANCELLED before): a trial with the same values started then
        would fail as "in use". Wait for the job, then for the run's lock."""
        job = self.stopping.pop(run.path, None)
        deadline = time.monotonic() + STOPPING_WAIT_S
        while job is not None and (not job.done() or run.holder()):
            if time.monotonic() > deadline:
                raise DmhpcError(f"{run.path}: job {job.job_id}, cancelled, still holds it after {STOPPING_WAIT_S} s "
                                 f"({run.holder() or 'not ended'}); this trial's values need its run directory")
            time.sleep(self.poll_s)

    def abandon(self) -> None:
        """The tuner is ending early (Ctrl-C, SIGTERM, an error): local jobs end with it, their trials
        queued again as the search's stopped ones are; SLURM jobs go on, and the next launch cancels
        and reruns their trials (still RUNNING in the journal). Local trials left RUNNING were taken
        by the next launch for a killed tuner's, and listed as failed."""
        if self.t.executor == "local":
            # Every job cancelled first: a journal that cannot be written (the full disk the tuner is
            # ending for, a second Ctrl-C) left the jobs after it training as orphans.
            for job in {id(r.job): r.job for r in self.running if r.job is not None}.values():
                job.cancel(check=False)
            for o in list(self.running):
                with contextlib.suppress(Exception):  # (left RUNNING: the next launch reruns it as stale)
                    _queue_again(self.study, o.trial)
                    _fail(self.study, o.trial, "stopped: the tuner was stopped; the next launch runs it again")

    def run(self) -> None:
        t = self.t
        started = _counted(self.study)
        print(f"dmhpc tune: {t.source}: {started} of {t.trials} trial(s) done; maximizing {t.objective}; "
              f"{t.parallel} at a time ({t.executor}); study in {t.out / JOURNAL}", flush=True)
        while self.running or started < t.trials:
            while (len(self.running) < t.parallel and started < t.trials
                   and self.failures_in_a_row < FAILURES_IN_A_ROW):
                self.start()
                started += 1
            if self.failures_in_a_row >= FAILURES_IN_A_ROW:
                def stopped(o: _Running) -> str:
                    # A trial that was doing well, stopped with the search: run again by the next
                    # launch (its run resumes), not counted against the budget (see _counted).
                    _queue_again(self.study, o.trial)
                    return _fail(self.study, o.trial, "stopped: the search stopped; the next launch runs it again")

                for job in {id(r.job): r.job for r in self.running}.values():
                    self.stop(job, stopped)
                # Their jobs ended before the tuner does: the next launch's reruns started at once, found
                # the runs still held by the cancelled jobs, and failed as "in use".
                for path in list(self.stopping):
                    with contextlib.suppress(DmhpcError):  # (said by the rerun, which waits no longer)
                        self.await_stopped(RunDir(path))
                raise DmhpcError(f"{t.source}: {self.failures_in_a_row} trials failed in a row; search stopped "
                                 f"(each failure is in {t.out / (TABLE + '.md')}, the jobs' logs in {self.folder})")
            if self.running and t.executor != "debug":
                time.sleep(self.poll_s)
            self.poll()


def tune(spec: str | Path | Mapping, executor: str | None = None, poll_s: float = 10.0) -> dict:
    """Run the search to `trials` finished trials; write OUT/trials.{md,csv}; return the best trial
    as {"number", "value", "values", "run_dir", "user_attrs"} (None values when nothing completed).

    `executor` replaces the file's. `poll_s`: how often running trials are read for pruning.
    """
    if importlib.util.find_spec("optuna") is None:
        raise DmhpcError("dmhpc tune needs optuna: pip install dmhpc[tune]")

    t = load_tune(spec, executor)
    check_executor_here(t.executor)
    warn_setup_unused(t.executor, [t.resources])
    warn_missing_data([resolve_point(t.base_files, t.overrides)])
    lock = _lock(t.out)
    study, launching = None, None
    try:
        launching = hold_launch_lock(t.out / "submitit")  # (its jobs' folder: no grid stops them as orphans)
        study = _open_study(t)
        # From here on SIGTERM ends the tuner as Ctrl-C does (trials.md written, exit 130): cancelling
        # an earlier tuner's SLURM jobs waits minutes for the queue, and was killed outright there.
        with sigterm_as_interrupt():
            # Its checks first (the GPUs here, the executor): a relaunch they refused had stopped the
            # earlier tuner's running trials already.
            search = _Search(t, study, poll_s)
            stale = _requeue_stale(study, t.out / "submitit")
            if stale:
                print(f"dmhpc tune: {stale} trial(s) left running by an earlier tuner: run again, resuming "
                      f"their run directories", flush=True)
            try:
                search.run()
            except BaseException:
                search.abandon()
                raise
        return best_trial(study, t.out)
    finally:
        if study is not None:
            try:
                write_trials(t.out, study, t.objective)
            except (OSError, DmhpcError) as exc:  # never hide why the search ended
                print(f"dmhpc tune: warning: cannot write {t.out / (TABLE + '.md')}: {exc}", flush=True)
        if launching is not None:
            launching.close()
        lock.close()


def best_trial(study, out: Path) -> dict:
    """The best complete trial; its run directory in `out` (the journal's path is where the study
    ran first: a study copied or moved reported the old folder)."""
    from optuna.trial import TrialState

    done = [tr for tr in study.get_trials(deepcopy=False) if tr.state == TrialState.COMPLETE]
    if not done:
        return {"number": None, "value": None, "values": None, "run_dir": None, "user_attrs": {}}
    best = max(done, key=lambda tr: (tr.value, -tr.number))
    return {"number": best.number, "value": best.value, "values": best.user_attrs.get(ATTR_VALUES),
            "run_dir": str(out / Path(best.user_attrs[ATTR_RUN]).name) if ATTR_RUN in best.user_attrs else None,
            "user_attrs": dict(best.user_attrs)}


def trial_rows(study) -> list[dict]:
    """One row per trial: state, values, objective, target metrics (reporting only), why it failed."""
    trials = study.get_trials(deepcopy=False)
    rerun_as = {tr.user_attrs["rerun_of"]: tr.number for tr in trials if "rerun_of" in tr.user_attrs}
    rows = []
    for tr in trials:
        a = dict(tr.user_attrs)
        # A rerun trial without a failure of its own was left running by a killed tuner; one with
        # a reason (stopped with the search) keeps it, or trials.md says the wrong thing happened.
        if tr.number in rerun_as and not a.get("failure"):
            a["failure"] = f"left running by a tuner that was killed; run again as trial {rerun_as[tr.number]}"
        rows.append({"trial": tr.number, "state": tr.state.name.lower(), "value": tr.value,
                     "epoch": a.get("epoch"), **{f"{k}": v for k, v in (a.get(ATTR_VALUES) or {}).items()},
                     "target_test_accuracy": a.get("target_test_accuracy"),
                     "target_test_roc_auc": a.get("target_test_roc_auc"),
                     "source_test_accuracy": a.get("source_test_accuracy"),
                     "pruned_at_epoch": (max(tr.intermediate_values) if tr.state.name == "PRUNED"
                                         and tr.intermediate_values else None),
                     "run": Path(a.get(ATTR_RUN, "")).name, "failure": a.get("failure")})
    return rows


def write_trials(out: Path, study, objective: str) -> None:
    """OUT/trials.csv and OUT/trials.md: every trial, best first."""
    import csv
    import io

    # Complete trials first, best first: a pruned trial's value is only its last intermediate one.
    rows = sorted(trial_rows(study), key=lambda r: (r["state"] != "complete", r["value"] is None,
                                                    -(r["value"] or 0.0), r["trial"]))
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / f"{TABLE}.csv", buf.getvalue())
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    space_keys = [k for k in keys if k not in ("trial", "state", "value", "epoch", "target_test_accuracy",
                                               "target_test_roc_auc", "source_test_accuracy", "pruned_at_epoch",
                                               "run", "failure")]
    lines = [f"# Tuning: {out}", "",
             f"Maximizing {objective} (label-free) over the search space; each trial's value is the {objective} "
             f"score of its selected checkpoint. Target accuracy and AUC † are the target test metrics of "
             f"that checkpoint, recorded for reporting only: the search never reads them.", ""]
    header = ["trial", "state", *space_keys, objective, "epoch", "source acc", "target acc †", "target AUC †", "note"]
    cells = ([r["trial"], r["state"], *(fmt(r.get(k)) for k in space_keys), fmt(r["value"]), fmt(r["epoch"]),
              fmt(r["source_test_accuracy"]), fmt(r["target_test_accuracy"]), fmt(r["target_test_roc_auc"]),
              r["failure"] or (f"pruned after epoch {r['pruned_at_epoch']}" if r["pruned_at_epoch"] is not None
                               else "")] for r in rows)
    lines += table(header, cells)
    atomic_write(out / f"{TABLE}.md", "\n".join(lines) + "\n")


def tune_arguments(parser) -> None:
    parser.add_argument("file", type=Path, help="tune file (YAML)")
    parser.add_argument("--executor", choices=EXECUTORS,
                        help="run the trials with this executor instead of the file's: slurm (sbatch), local "
                             "(processes on this machine) or debug (in this process, one after the other)")


def tune_main(args) -> int:
    best = tune(args.file, executor=args.executor)
    if best["number"] is None:
        print("dmhpc tune: no trial completed", flush=True)
        return 1
    print(f"dmhpc tune: best trial {best['number']}: {best['value']:.4f} with {show(best['values'])} "
          f"({best['run_dir']})", flush=True)
    return 0
