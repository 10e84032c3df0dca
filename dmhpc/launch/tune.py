"""Label-free hyperparameter search: Optuna's TPE sampler and median pruner over training runs.

    dmhpc tune configs/tune/mmd-fisher-entropy-laptop.yaml
    dmhpc.launch.tune("configs/tune/mmd-fisher-entropy-laptop.yaml")   # or a dict of the same keys

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
    pruner: {startup_trials: 4, warmup_epochs: 5}   # median pruner; {} for its defaults, null: none
    slurm: {gpus_per_node: 1, time: "02:00:00", partition: gpu}

Each trial is one training run, OUT/<point name> (its values, as in a grid), trained with
`select.criterion` = the objective, so the run keeps the checkpoint the objective likes best and
the trial's value is that checkpoint's score: the search never reads a target label. Target test
metrics of each trial are recorded beside it (OUT/trials.md), for reporting only.

The study lives in OUT/study.journal, an Optuna journal file (no database server; on a cluster,
put OUT on the shared file system). The tuner holds OUT/tune.lock while it runs: a second tuner of
the same OUT is refused. Relaunching continues the study up to `trials`: a trial left running by
a tuner that was killed is run again with the same values in the same run directory, which
resumes from its last checkpoint. Changing `objective`, `base`, `overrides` or `space` since the
study began is refused (`trials`, `parallel`, `executor` and `slurm` may change).

Pruning: the tuner reads each running trial's metrics log and reports the best objective score
so far at every evaluation; the median pruner stops a trial whose best score is below the median
of earlier trials at the same epoch (its job is cancelled; the run directory stays, unfinished).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dmhpc.checks import Problems, choice, integer, show, take, text, unknown_keys
from dmhpc.config import config_to_dict
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write
from dmhpc.launch.spec import (Range, base_path, dotted_keys, point_name, point_problem,
                               read_launch_file, read_space, resolve_point)
from dmhpc.launch.submit import (EXECUTORS, Resources, TrainTask, local_threads, make_executor, preempt_signal,
                                 read_resources, wait_for)
from dmhpc.names import CRITERIA, LABEL_FREE
from dmhpc.run import RunDir

TUNE_KEYS = ("base", "out", "objective", "trials", "parallel", "seed", "executor", "overrides", "space", "enqueue",
             "sampler", "pruner", "slurm")
SAMPLER_KEYS = ("startup_trials",)
PRUNER_KEYS = ("startup_trials", "warmup_epochs")
# Keys the tuner sets for every trial, and why.
TUNER_KEYS = {"run.dir": "OUT/<trial's point name>", "train.signals": "[submitit's preemption signal]",
              "select.criterion": "the objective"}
# What a relaunch must share with the study it continues (the rest may change between launches).
STUDY_IDENTITY = ("objective", "base", "overrides", "space")
JOURNAL, LOCK, TABLE = "study.journal", "tune.lock", "trials"
FAILURES_IN_A_ROW = 3  # consecutive failed trials that stop the search: most likely not the values' fault
ATTR_VALUES, ATTR_RUN = "values", "run_dir"


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
        """What the study's trials depend on, comparable across launches."""
        space = {k: (v if isinstance(v, list) else {"low": v.low, "high": v.high, "log": v.log})
                 for k, v in self.space.items()}
        return json.loads(json.dumps({"objective": self.objective, "base": str(self.base.resolve()),
                                      "overrides": self.overrides, "space": space}, sort_keys=True))

    def point(self, values: Mapping[str, Any]):
        """(run directory, validated config dict) of the trial with these values."""
        run_dir = self.out / point_name(values)
        cfg = resolve_point(self.base, {**self.overrides, **values, "run.dir": str(run_dir),
                                        "select.criterion": self.objective, "train.signals": [preempt_signal()]})
        return run_dir, cfg


def _read_options(problems: Problems, data: Any, keys: tuple[str, ...], where: str, defaults: dict) -> dict | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        problems.add(where, f"expected a mapping with {', '.join(keys)}, got {show(data)}")
        return dict(defaults)
    unknown_keys(problems, data, keys, where + ".")
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
        bad = len(problems.lines)
        for key in sorted(set(space) - set(entry)):
            problems.add(f"{where}.{key}", "missing: give a value for every key of space")
        for key, value in entry.items():
            dim = space.get(key)
            if dim is None and key in asked:
                continue
            if dim is None:
                problems.add(f"{where}.{key}", f"not a key of space ({', '.join(sorted(space))})")
            elif isinstance(dim, list) and value not in dim:
                problems.add(f"{where}.{key}", f"{show(value)} is not one of the choices {show(dim)}")
            elif isinstance(dim, Range) and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                 and dim.low <= value <= dim.high):
                problems.add(f"{where}.{key}", f"{show(value)} is outside [{dim.low:g}, {dim.high:g}]")
        if len(problems.lines) == bad:
            good.append(dict(entry))
    return tuple(good)


def load_tune(spec: str | Path | Mapping, executor: str | None = None) -> Tune:
    """Read and check a tune file (or dict); raise all problems at once."""
    data, source, here = read_launch_file(spec)
    problems = Problems(source)
    unknown_keys(problems, data, TUNE_KEYS)
    base = base_path(problems, "base", take(problems, data, "base", text()), here)
    out_text = take(problems, data, "out", text())
    objective = take(problems, data, "objective", choice(*CRITERIA))
    if objective is not None and objective not in LABEL_FREE:
        problems.add("objective", f"{objective} reads target labels; the search must not. Choose one of "
                     f"{', '.join(LABEL_FREE)} (target metrics are recorded beside each trial anyway)")
    trials = take(problems, data, "trials", integer(1))
    parallel = take(problems, data, "parallel", integer(1), 1)
    seed = take(problems, data, "seed", integer(0), 0)
    executor = executor or take(problems, data, "executor", choice(*EXECUTORS), "slurm")
    overrides = dotted_keys(problems, data.get("overrides"), "overrides", TUNER_KEYS)
    if "space" not in data or not data["space"]:
        problems.add("space", "missing or empty: give at least one dotted key with choices or {low, high, log}")
    space = read_space(problems, data.get("space"), "space", TUNER_KEYS)
    for key in sorted(set(space) & set(overrides)):
        problems.add(key, "set in both overrides and space")
    sampler = _read_options(problems, data.get("sampler"), SAMPLER_KEYS, "sampler", {"startup_trials": 5}) or {}
    pruner = _read_options(problems, data.get("pruner", {}), PRUNER_KEYS, "pruner",
                           {"startup_trials": 4, "warmup_epochs": 5})
    asked = set(data["space"]) if isinstance(data.get("space"), Mapping) else set()
    enqueue = _read_enqueue(problems, data.get("enqueue"), space, asked)
    resources = read_resources(problems, data.get("slurm"), shape=True, executor=executor)
    if executor == "debug" and parallel > 1:
        problems.add("parallel", f"the debug executor runs one trial at a time in this process, got {parallel}")
    problems.raise_if_any()
    t = Tune(source, base, Path(out_text).resolve(), objective, trials, parallel, seed, executor, overrides,
             space, enqueue, sampler.get("startup_trials", 5), pruner, resources)
    # Every corner of the space must give a valid config: checked now, not when a trial starts.
    for corner in ({k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()},
                   {k: (v[-1] if isinstance(v, list) else v.high) for k, v in space.items()}):
        try:
            t.point(corner)
        except DmhpcError as exc:
            problems.add("space", f"at {show(corner)}: {point_problem(exc)}")
    for key, dim in space.items():
        for value in (dim if isinstance(dim, list) else []):
            try:
                t.point({**{k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()}, key: value})
            except DmhpcError as exc:
                problems.add(f"space.{key}", f"{show(value)}: {point_problem(exc)}")
    problems.raise_if_any()
    return t


# --- the study -------------------------------------------------------------------------------------

def _lock(out: Path):
    """An OS lock on OUT/tune.lock for the tuner's lifetime; released when the process dies."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DmhpcError(f"{out / LOCK}: a tuner is already running this study ({holder}); "
                         f"wait for it or use another out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def _open_study(t: Tune):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(t.out / JOURNAL)))
    sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.startup_trials)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=t.pruner["startup_trials"],
                                          n_warmup_steps=t.pruner["warmup_epochs"])
              if t.pruner is not None else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name="dmhpc-tune",
                                direction="maximize", load_if_exists=True)
    identity = t.identity()
    before = study.user_attrs.get("identity")
    if before is None:  # a new study
        study.set_user_attr("identity", identity)
        for values in t.enqueue:
            study.enqueue_trial({k: (json.dumps(v) if isinstance(t.space[k], list) else v)
                                 for k, v in values.items()})
    elif before != identity:
        changed = [k for k in STUDY_IDENTITY if before.get(k) != identity.get(k)]
        raise DmhpcError(f"{t.out / JOURNAL}: holds a study of another tune file ({', '.join(changed)} changed "
                         f"since it began); use another out, or restore the file")
    return study


def _distributions(space: Mapping[str, list | Range]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {k: (CategoricalDistribution([json.dumps(c) for c in v]) if isinstance(v, list)
                else FloatDistribution(v.low, v.high, log=v.log)) for k, v in space.items()}


def _values(params: Mapping[str, Any], space: Mapping[str, list | Range]) -> dict:
    """The values a trial trains with: choices as given, floats to 4 digits (the value trained with
    is the value in the run directory's name, as in a grid)."""
    return {k: (json.loads(params[k]) if isinstance(space[k], list) else float(f"{params[k]:.4g}"))
            for k in sorted(space)}


def _requeue_stale(study, t: Tune) -> int:
    """Trials a killed tuner left running: failed, and the same values queued again (same run
    directory, so the new trial resumes from its last checkpoint). Returns how many."""
    from optuna.trial import TrialState

    stale = [tr for tr in study.get_trials(deepcopy=False) if tr.state == TrialState.RUNNING]
    for tr in stale:
        job = tr.user_attrs.get("job_id")
        if job and t.executor == "slurm":  # it may still run in that directory: its rerun takes over
            subprocess.run(["scancel", str(job)], capture_output=True, timeout=60)
        study.tell(tr.number, state=TrialState.FAIL)
        study.enqueue_trial(tr.params, user_attrs={"rerun_of": tr.number})
    return len(stale)


def _evaluations(run: RunDir) -> list[tuple[int, float]]:
    """(epoch, best objective score so far) at each evaluation in the run's log."""
    out, best = [], -math.inf
    for r in run.read_log():
        score = r.get("selection", {}).get("score") if r.get("kind") == "epoch" else None
        if isinstance(score, (int, float)) and math.isfinite(score):
            best = max(best, score)
            out.append((int(r["epoch"]), best))
    return out


@dataclass
class _Running:
    trial: Any  # optuna.Trial
    run: RunDir
    job: Any  # submitit.Job; None for values whose run had finished already
    reported: int = -1  # last epoch reported to the pruner


def _report(r: _Running) -> None:
    """Report the run's new evaluations to the study (what the pruner compares trials by)."""
    for epoch, best in _evaluations(r.run):
        if epoch > r.reported:
            r.trial.report(best, epoch)
            r.reported = epoch


def _finish(study, r: _Running) -> str:
    """Tell the study how a finished job did: 'complete' or 'fail'."""
    from optuna.trial import TrialState

    failed = wait_for({str(r.trial.number): r.job}) if r.job is not None else {}  # a debug job runs here
    _report(r)  # every evaluation, for the pruner's medians at each epoch
    result = r.run.read_result("best", "test")
    if failed or result is None:
        why = failed.get(str(r.trial.number), "the run wrote no test result")
        r.trial.set_user_attr("failure", why)
        study.tell(r.trial, state=TrialState.FAIL)
        print(f"dmhpc tune: trial {r.trial.number} failed: {why}", flush=True)
        return "fail"
    checkpoint = result["checkpoint"]
    for domain in ("source", "target"):  # for reporting only; the search never reads them
        for metric in ("accuracy", "roc_auc"):
            value = result.get(domain, {}).get(metric)
            if value is not None:
                r.trial.set_user_attr(f"{domain}_test_{metric}", value)
    r.trial.set_user_attr("epoch", checkpoint.get("epoch"))
    study.tell(r.trial, float(checkpoint["score"]))
    print(f"dmhpc tune: trial {r.trial.number} {r.run.path.name}: {checkpoint['criterion']} "
          f"{float(checkpoint['score']):.4f} (epoch {checkpoint.get('epoch')})", flush=True)
    return "complete"


def _counted(study) -> int:
    """Trials that used up the budget: complete, pruned, or failed other than by a killed tuner."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rerun = {tr.user_attrs.get("rerun_of") for tr in trials}
    return sum(tr.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (tr.state == TrialState.FAIL and tr.number not in rerun) for tr in trials)


def tune(spec: str | Path | Mapping, executor: str | None = None, poll_s: float = 10.0) -> dict:
    """Run the search to `trials` finished trials; write OUT/trials.{md,csv}; return the best trial
    as {"number", "value", "values", "run_dir", "user_attrs"} (None values when nothing completed).

    `executor` replaces the file's. `poll_s`: how often running trials are read for pruning.
    """
    try:
        from optuna.trial import TrialState
    except ImportError:
        raise DmhpcError("dmhpc tune needs optuna: pip install dmhpc[tune]") from None

    t = load_tune(spec, executor)
    lock = _lock(t.out)
    try:
        study = _open_study(t)
        stale = _requeue_stale(study, t)
        if stale:
            print(f"dmhpc tune: {stale} trial(s) left running by an earlier tuner: run again, resuming "
                  f"their run directories", flush=True)
        distributions = _distributions(t.space)
        folder = t.out / "submitit"
        threads = local_threads(t.parallel * t.resources.ranks) if t.executor == "local" else None
        submitter = make_executor(t.executor, folder, t.resources, f"dmhpc-tune-{t.out.name}", threads)
        running: list[_Running] = []
        started = _counted(study)
        failures_in_a_row = 0
        print(f"dmhpc tune: {t.source}: {started} of {t.trials} trial(s) done; maximizing {t.objective}; "
              f"{t.parallel} at a time ({t.executor}); study in {t.out / JOURNAL}", flush=True)
        while running or started < t.trials:
            while len(running) < t.parallel and started < t.trials:
                trial = study.ask(distributions)
                values = _values(trial.params, t.space)
                run_dir, cfg = t.point(values)
                trial.set_user_attr(ATTR_VALUES, values)
                trial.set_user_attr(ATTR_RUN, str(run_dir))
                started += 1
                same = next((r for r in running if r.run.path == run_dir), None)
                if same is not None:  # values a running trial has: share its job, its result, its fate
                    print(f"dmhpc tune: trial {trial.number} {run_dir.name}: the values of running trial "
                          f"{same.trial.number}; sharing its job", flush=True)
                    running.append(_Running(trial, same.run, same.job))
                    continue
                if RunDir(run_dir).finished:  # values an earlier trial trained with: its result
                    outcome = _finish(study, _Running(trial, RunDir(run_dir), None))
                    failures_in_a_row = failures_in_a_row + 1 if outcome == "fail" else 0
                    continue
                try:  # a directory holding a run of another configuration would fail the job
                    RunDir(run_dir).check_relaunch(cfg)
                except DmhpcError as exc:
                    trial.set_user_attr("failure", str(exc))
                    study.tell(trial, state=TrialState.FAIL)
                    print(f"dmhpc tune: trial {trial.number} failed: {exc}", flush=True)
                    failures_in_a_row += 1
                    continue
                job = submitter.submit(TrainTask(), config_to_dict(cfg))
                trial.set_user_attr("job_id", job.job_id)
                print(f"dmhpc tune: trial {trial.number} {run_dir.name}: job {job.job_id}", flush=True)
                running.append(_Running(trial, RunDir(run_dir), job))
            if failures_in_a_row < FAILURES_IN_A_ROW and t.executor != "debug":
                time.sleep(poll_s)
            for r in list(running):
                if r not in running:  # pruned with the trial whose job it shares
                    continue
                # A debug job runs when its result is asked for, so it is only ever read finished.
                if t.executor == "debug" or r.job.done():
                    outcome = _finish(study, r)
                    running.remove(r)
                    failures_in_a_row = failures_in_a_row + 1 if outcome == "fail" else 0
                    continue
                _report(r)
                if r.trial.should_prune():
                    for other in [o for o in running if o.job is r.job]:  # and the trials sharing its job
                        study.tell(other.trial, state=TrialState.PRUNED)
                        print(f"dmhpc tune: trial {other.trial.number} pruned after epoch {r.reported}", flush=True)
                        running.remove(other)
                    r.job.cancel()
            if failures_in_a_row >= FAILURES_IN_A_ROW:
                for r in running:
                    r.job.cancel()
                    study.tell(r.trial, state=TrialState.FAIL)
                raise DmhpcError(f"{t.source}: {failures_in_a_row} trials failed in a row; stopping the search "
                                 f"(each failure is in {t.out / (TABLE + '.md')} and the jobs' logs in {folder})")
        return best_trial(study)
    finally:
        try:
            if "study" in locals():
                write_trials(t.out, study, t.objective)
        finally:
            lock.close()


def best_trial(study) -> dict:
    from optuna.trial import TrialState

    done = [tr for tr in study.get_trials(deepcopy=False) if tr.state == TrialState.COMPLETE]
    if not done:
        return {"number": None, "value": None, "values": None, "run_dir": None, "user_attrs": {}}
    best = max(done, key=lambda tr: (tr.value, -tr.number))
    return {"number": best.number, "value": best.value, "values": best.user_attrs.get(ATTR_VALUES),
            "run_dir": best.user_attrs.get(ATTR_RUN), "user_attrs": dict(best.user_attrs)}


def trial_rows(study) -> list[dict]:
    rows = []
    for tr in study.get_trials(deepcopy=False):
        a = tr.user_attrs
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

    rows = sorted(trial_rows(study), key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["trial"]))
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
             f"that checkpoint, recorded for reporting only: the search never reads them.", "",
             "| trial | state | " + " | ".join(space_keys) + f" | {objective} | epoch | source acc | target acc † "
             "| target AUC † | note |",
             "|" + "---|" * (len(space_keys) + 8)]
    for r in rows:
        note = r["failure"] or (f"pruned after epoch {r['pruned_at_epoch']}" if r["pruned_at_epoch"] is not None
                                else "")
        lines.append(f"| {r['trial']} | {r['state']} | " + " | ".join(fmt(r.get(k)) for k in space_keys)
                     + f" | {fmt(r['value'])} | {fmt(r['epoch'])} | {fmt(r['source_test_accuracy'])} | "
                     f"{fmt(r['target_test_accuracy'])} | {fmt(r['target_test_roc_auc'])} | {note} |")
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
