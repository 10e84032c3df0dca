"""Scaling studies: training throughput over ResNet depth, GPUs and nodes, weak and strong scaling.

    python launch/scaling.py configs/scaling/resnet.yaml [--no-wait]
    dmhpc.launch.launch_scaling("configs/scaling/resnet.yaml")    # or a dict of the same keys

A study file (every key; docs/cluster.md has the reference):

    base: ../resnet18-mmd-fisher.yaml   # training config, relative to the study file
    out: runs/scaling/resnet            # run directories, table and plot; relative to the cwd
    executor: slurm                     # slurm | local | debug
    models: [resnet18, resnet34, resnet50]
    nodes: [1, 2, 4]
    gpus_per_node: [1, 2, 4]            # ranks per node, one per GPU
    device: gpu                         # cpu: ranks are CPU processes and no GPU is asked for
    weak: {batch_per_gpu: 64}           # fixed per-GPU batch (per domain, as train.batch_size)
    strong: {global_batch: 256}         # fixed global batch, split over the GPUs
    epochs: 3                           # short runs; the first epoch is warm-up, not measured
    max_steps: 0                        # cap on the steps of each run (0: none)
    overrides: {data.num_workers: 4}    # the same for every point
    slurm: {partition: gpu, cpus_per_task: 8, time: 30, exclusive: true}

Each point (model x weak/strong x nodes x gpus_per_node) is a short training run. Throughput is
read from the trainer's epoch records (`step_time_s`, measured before the epoch's evaluation)
over every epoch after the first; with a single epoch it includes the warm-up and the table says
so (and gives no speedup or efficiency of a point timed otherwise than its N0, nor of one read by
another loader than its N0: `data.loader: auto` can choose per point). Images are counted
as the trainer counts them: the images every rank's step reads, source and target (2 x global
batch per step; 1 x where no loss term reads the target, as without adaptation).
With N GPUs and the study's smallest N0 as reference:

    speedup    S = X(N) / X(N0)            X = images/s of the whole job
    efficiency E = S * N0 / N

Weak scaling (fixed per-GPU batch): E = X(N) / (N X(1)) for N0 = 1, the per-GPU throughput kept.
Strong scaling (fixed global batch G): a step is the same work at every N, X = 2G / T(N) (G / T(N)
without a term that reads the target), so
S = T(N0) / T(N) and E = T(1) / (N T(N)) for N0 = 1.

Data staging (the `staging_s` column): the slowest rank's loader set-up time, which the trainer
records in its first "setup" record of metrics.jsonl. For the gpu-resident loader that is reading
the training splits into device memory; the torch and DALI loaders read during the steps, so
their reading is in the throughput instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

from dmhpc.config import config_to_dict
from dmhpc.files import atomic_path, atomic_write
from dmhpc.markdown import table
from dmhpc.names import MODEL_NAMES
from dmhpc.errors import DmhpcError
from dmhpc.checks import Problems, choice, distinct_list, integer, path_text, show, take, unknown_keys
from dmhpc.launch.spec import (Point, check_existing_runs, check_point_problems, dotted_keys, foreign_tables,
                               out_problem, point_problem, read_launch_file, resolve_point, warn_missing_data)
from dmhpc.launch.submit import (EXECUTORS, TrainTask, check_executor_shape, launch_points, preempt_signal,
                                 local_threads_of, queued_points, read_resources)

STUDY_KEYS = ("base", "out", "executor", "models", "nodes", "gpus_per_node", "device", "weak", "strong",
              "epochs", "max_steps", "overrides", "slurm")
# Keys the study sets for each point, and why.
STUDY_OWNED = {"model.name": "models", "train.batch_size": "weak.batch_per_gpu or strong.global_batch",
               "train.epochs": "epochs", "train.max_steps": "max_steps",
               "train.eval_every": "epochs (evaluation only after the last)", "run.dir": "OUT/<point name>",
               "train.signals": "[submitit's preemption signal]"}
MODES = ("weak", "strong")
TABLES = ("scaling.csv", "scaling.md", "scaling.png")  # OUT's files of a study's table
# Local points running together would share this machine's cores, and their timings would measure
# the sharing, not the scaling.
LOCAL_ONE_AT_A_TIME = " (a scaling study: points together would share the cores and skew the timings)"
MODELS = distinct_list(choice(*MODEL_NAMES), what=f"a non-empty list of distinct model names ({', '.join(MODEL_NAMES)})")
COUNTS = distinct_list(integer(1), what="a non-empty list of distinct positive integers")
COLUMNS = ("model", "mode", "nodes", "gpus_per_node", "gpus", "batch_per_gpu", "global_batch", "step_time_s",
           "images_per_s", "images_per_s_per_gpu", "speedup", "efficiency", "baseline_gpus", "staging_s", "loader",
           "warmup_excluded", "status", "point", "run_dir")


@dataclass(frozen=True)
class Study:
    """A checked study file and its points (point.values: model, mode, nodes, gpus_per_node, batch)."""

    source: str
    out: Path
    executor: str
    device: str      # "gpu" or "cpu"
    resources: dict  # point name -> Resources
    points: tuple[Point, ...]


# --- reading and checking --------------------------------------------------------------------------

def _mode_batch(problems: Problems, data: Mapping, mode: str) -> int | None:
    key = {"weak": "batch_per_gpu", "strong": "global_batch"}[mode]
    if mode not in data:
        return None
    section = data[mode]
    # A present key that is null (its only line commented out) dropped the mode without a word.
    if not isinstance(section, Mapping):
        problems.add(mode, f"expected a mapping with {key}, got {show(section)}; remove the key to leave "
                           f"{mode} scaling out")
        return None
    unknown_keys(problems, section, (key,), f"{mode}.")
    return take(problems, section, key, integer(1), prefix=f"{mode}.")


def load_study(spec: str | Path | Mapping, executor: str | None = None) -> Study:
    """Read and check a study file (or dict) and every point; raise all problems at once.
    `executor` replaces the file's."""
    data, source, here = read_launch_file(spec)
    problems = Problems(source)
    unknown_keys(problems, data, STUDY_KEYS)
    base_text = take(problems, data, "base", path_text())
    out_text = take(problems, data, "out", path_text())
    # The file's is checked where --executor replaces it too: a typo passed until the flag was left out.
    in_file = take(problems, data, "executor", choice(*EXECUTORS), "slurm")
    executor = executor or in_file
    models = take(problems, data, "models", MODELS)
    nodes = take(problems, data, "nodes", COUNTS, (1,))
    gpn = take(problems, data, "gpus_per_node", COUNTS, (1,))
    device = take(problems, data, "device", choice("gpu", "cpu"), "gpu")
    if device == "cpu" and executor == "debug":
        import torch  # (a study of another executor imports it no sooner than its points)

        if torch.cuda.is_available():  # the debug executor's points train in this process: on its GPU
            problems.add("device", "cpu with executor debug on a machine with a GPU: its points would train on the "
                                   "GPU, which this process cannot hide; use executor local, which hides it")
    batches = {mode: _mode_batch(problems, data, mode) for mode in MODES}
    if all(b is None for b in batches.values()) and "weak" not in data and "strong" not in data:
        problems.add("weak", "give weak (batch_per_gpu), strong (global_batch) or both")
    epochs = take(problems, data, "epochs", integer(1), 3)
    max_steps = take(problems, data, "max_steps", integer(0), 0)
    overrides = dotted_keys(problems, data.get("overrides"), "overrides", STUDY_OWNED)
    site = read_resources(problems, data.get("slurm"), shape=False, executor=executor)
    if device == "cpu" and site.gpu_type is not None:  # (dropped: its points ask for no GPU)
        problems.add("slurm.gpu_type", "a type of GPU, and device cpu asks for none")
    if nodes and gpn:  # the largest job must fit the executor
        check_executor_shape(problems, executor, replace(site, nodes=max(nodes), tasks_per_node=max(gpn)))
    base = None
    if base_text is not None:
        base = (here / base_text) if not Path(base_text).is_absolute() else Path(base_text)
        if not base.is_file():
            problems.add("base", f"config file not found: {base}")
            base = None
    if out_text is not None:
        for problem in (out_problem(Path(out_text).resolve()), foreign_tables(Path(out_text).resolve(), TABLES)):
            if problem is not None:
                problems.add("out", problem)
    if problems.lines:
        problems.raise_if_any()

    out = Path(out_text).resolve()
    points, resources, failures = [], {}, {}
    for model in models:
        for mode in MODES:
            if batches[mode] is None:
                continue
            for n in nodes:
                for g in gpn:
                    gpus = n * g
                    name = f"{model}-{mode}-{n}x{g}"
                    if mode == "weak":
                        batch = batches[mode]
                    elif batches[mode] % gpus:
                        failures[name] = (f"strong.global_batch {batches[mode]} does not split evenly over "
                                          f"{gpus} GPUs")
                        continue
                    else:
                        batch = batches[mode] // gpus
                    run_dir = out / name
                    try:
                        cfg = resolve_point(base, {
                            **overrides, "model.name": model, "train.batch_size": batch, "train.epochs": epochs,
                            "train.max_steps": max_steps, "train.eval_every": epochs, "run.dir": str(run_dir),
                            "train.signals": [preempt_signal()]}, n * g)
                    except DmhpcError as exc:
                        failures[name] = point_problem(exc)
                        continue
                    res = replace(site, nodes=n, tasks_per_node=g, gpus_per_node=g if device == "gpu" else 0,
                                  array_parallelism=1 if executor == "local" else site.array_parallelism,
                                  setup=(*site.setup, HIDE_GPUS) if device == "cpu" and executor == "slurm"
                                  else site.setup)
                    values = {"model": model, "mode": mode, "nodes": n, "gpus_per_node": g, "batch_per_gpu": batch}
                    points.append(Point(name, values, run_dir, cfg))
                    resources[name] = res
    check_point_problems(problems, failures)
    check_existing_runs(problems, points)
    study = Study(source, out, executor, device, resources, tuple(points))
    _check_measured_with(problems, study)
    problems.raise_if_any()
    return study


# --- what a point is measured with -----------------------------------------------------------------

MEASURED_WITH = "measured_with.json"  # OUT/submitit/measured_with.json: point name -> settings
# Resources that do not change a timing: how long a job may run, how many run at once, who pays.
UNTIMED = ("time_min", "array_parallelism", "signal_delay_s", "max_num_timeout", "account", "qos")
# device: cpu asks Slurm for no GPU, and the trainer takes one wherever torch sees one: on nodes whose
# GPUs Slurm does not confine, the "CPU" ranks trained on the node's GPUs (other jobs' perhaps).
# (The local executor hides them itself from a job that asks for none.) Recorded as the device.
HIDE_GPUS = "export CUDA_VISIBLE_DEVICES="


def measured_with(study: Study, point: Point) -> dict:
    """Everything a point's timing depends on, flat ("config.data.loader": "torch", ...): its whole
    configuration but its folder, the device, the executor, and the resources its job asks for."""
    resources = {k: v for k, v in asdict(study.resources[point.name]).items() if k not in UNTIMED}
    resources["setup"] = [line for line in resources["setup"] if line != HIDE_GPUS]
    config = config_to_dict(point.config)
    config["run"] = {k: v for k, v in config["run"].items() if k != "dir"}
    flat: dict = {"device": study.device, "executor": study.executor}

    def add(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    add("config", config)
    add("slurm", resources)
    # The CPU threads each rank gets: local jobs share this machine's cores; the launcher's
    # OMP_NUM_THREADS reaches every rank of every executor (submitit's sbatch exports the launching
    # shell's environment), else the trainer sizes them to the CPUs given (None: recorded so).
    local = local_threads_of(list(study.points), study.resources) if study.executor == "local" else None
    flat["threads_per_rank"] = _thread_count(local or os.environ.get("OMP_NUM_THREADS"))
    return json.loads(json.dumps(flat, default=str))  # as it reads back from the file


def _thread_count(value):
    """An OMP_NUM_THREADS the user set, as a number where it is one: 1 from dmhpc and "1" from a
    shell that exports it are one setting (a study launched once with, once without, was refused)."""
    return int(value) if isinstance(value, str) and value.strip().isdecimal() else value


def _read_measured_with(study: Study) -> dict:
    path = study.out / "submitit" / MEASURED_WITH
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DmhpcError(f"{path}: unreadable ({exc}); remove it only together with the point folders it "
                         f"describes") from None
    if not isinstance(record, dict) or not all(isinstance(v, dict) for v in record.values()):
        raise DmhpcError(f"{path}: expected an object of point name -> settings; remove it only together with "
                         f"the point folders it describes")
    return record


def _check_measured_with(problems: Problems, study: Study) -> None:
    """A point that ran (finished, or resumed later) with other settings than the study's now: its
    timing would stand in the table under the new settings (a CPU timing as a GPU one, another
    loader's, another constraint's nodes). Refused, naming what changed."""
    try:
        record = _read_measured_with(study)
    except DmhpcError as exc:
        problems.add("out", str(exc))
        return
    # A point queued by an earlier --no-wait launch is measured with what it was submitted with, too.
    queued = queued_points(list(study.points), study.out / "submitit") if record else {}
    for p in study.points:
        was = record.get(p.name)
        if was is None or not (p.run.holds_run() or p.name in queued):
            continue
        now = measured_with(study, p)
        if "threads_per_rank" in was:  # (recorded as text by dmhpc before 2026-12-03)
            was = {**was, "threads_per_rank": _thread_count(was["threads_per_rank"])}
        # Keys on one side only are of another dmhpc version (a configuration key added since, the
        # threads of a local point): unknown, not changed; a study recorded before them goes on.
        changed = [k for k in sorted(set(was) & set(now)) if was[k] != now[k]]
        if changed:
            shown = "; ".join(f"{k} {show(was.get(k))} -> {show(now.get(k))}" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            # A point queued by an earlier launch may have no run directory yet: its job is the thing to stop.
            again = (f"scancel {queued[p.name]} (its job from an earlier launch) and remove {p.run_dir} if it is there"
                     if p.name in queued else f"remove {p.run_dir}")
            problems.add(f"point {p.name}", f"was measured with other settings ({shown}{more}); a scaling table "
                                            f"compares one setting: choose another out, or {again} to measure it "
                                            f"again")


def record_measured_with(study: Study) -> None:
    """Say what each point is (to be) measured with, before any runs: points that ran before this
    record existed (dmhpc before it) are left out, their settings unknown. Under the launch lock,
    checked again: another launcher may have run points with its settings since this study was read."""
    problems = Problems(study.source)
    _check_measured_with(problems, study)
    problems.raise_if_any()
    record = _read_measured_with(study)
    for p in study.points:
        if p.name in record or not p.run.holds_run():
            record[p.name] = measured_with(study, p)
    atomic_write(study.out / "submitit" / MEASURED_WITH, json.dumps(record, indent=1) + "\n")


# --- measuring ------------------------------------------------------------------------------------

def steady_step_time(records: list[dict]) -> tuple[float, bool]:
    """(mean step time in seconds over the epochs warmed up, whether warm-up was excluded).

    The first epoch after each start of the trainer (a "setup" record; the log's beginning for logs
    without them) is warm-up: allocations, autotuning, compilation and cold caches fall in it, after
    a resume (a requeued point) as after the first start. Without an epoch left, every epoch's time
    is used, warm-up included. Epochs are weighted by the steps their time averages over (after a
    resume in an epoch's middle, those since the resume).
    """
    epochs, cold, previous = [], True, 0
    for r in records:
        if r.get("kind") == "setup":
            cold = True
        elif r.get("kind") == "epoch" and r.get("step_time_s"):
            # Records of dmhpc before "steps" was logged: the steps since the previous record.
            epochs.append((r.get("steps", r["step"] - previous), r["step_time_s"], cold))
            previous, cold = r["step"], False
    warm = [(steps, t) for steps, t, cold in epochs if not cold]
    use = warm or [(steps, t) for steps, t, _ in epochs]
    total = sum(steps for steps, _ in use)
    if total <= 0:
        return math.nan, bool(warm)
    return sum(steps * t for steps, t in use) / total, bool(warm)


def staging_seconds(records: list[dict]) -> tuple[float, str]:
    """(slowest rank's loader set-up time, loader kind) from the run's first start."""
    setup = next((r for r in records if r.get("kind") == "setup"), None)
    # A setup record without them (edited, or a test's) has no staging time to show, as a log without one.
    return (setup.get("loader_setup_s", math.nan), setup.get("loader", "")) if setup else (math.nan, "")


def measure(point: Point) -> dict:
    """The point's row without speedup and efficiency (NaN where the run has not finished)."""
    v = point.values
    gpus = v["nodes"] * v["gpus_per_node"]
    try:
        records, problem = point.run.read_log(), None
    except DmhpcError as exc:  # one damaged log lost the whole table, every other point's row with it
        records, problem = [], str(exc)
    step_time, warmup_excluded = steady_step_time(records)
    staging, loader = staging_seconds(records)
    global_batch = v["batch_per_gpu"] * gpus
    # A step reads both domains' batches, or the source's alone where no loss term reads the target.
    images = (2 if point.config.loss.reads_target() else 1) * global_batch / step_time  # NaN when not measured
    return {"model": v["model"], "mode": v["mode"], "nodes": v["nodes"], "gpus_per_node": v["gpus_per_node"],
            "gpus": gpus, "batch_per_gpu": v["batch_per_gpu"], "global_batch": global_batch,
            "step_time_s": step_time, "images_per_s": images, "images_per_s_per_gpu": images / gpus,
            "staging_s": staging, "loader": loader, "warmup_excluded": warmup_excluded,
            "status": f"unreadable log: {problem}" if problem else "finished" if point.finished else "not finished",
            "point": point.name,
            "run_dir": str(point.run_dir)}


def scaling_table(rows: list[dict]) -> list[dict]:
    """Add speedup and efficiency against the smallest N of the same model and mode (baseline_gpus).

    Only finished points count: an unfinished or failed run's log may hold only its warm-up epoch,
    and a baseline taken from whichever smaller N happened to finish is not the study's N0; and
    only a point timed as its N0 was, both with their warm-up excluded or both not, and read by the
    same loader."""
    out = [dict(r) for r in rows]
    for key in {(r["model"], r["mode"]) for r in out}:
        group = [r for r in out if (r["model"], r["mode"]) == key]
        base = min(group, key=lambda r: (r["gpus"], r["nodes"]))
        for r in group:
            r["baseline_gpus"] = base["gpus"]
            # A step time with its warm-up against one without is no speedup (12x from 4 GPUs, seen):
            # where max_steps ends the small N inside its first epoch and not the large N. Nor is one
            # loader's against another's: `data.loader: auto` chooses by the memory each point's ranks
            # find free (on CPUs, the node's shared by its ranks), so N0 can read from memory and N from files.
            if base["status"] != "finished" or r["status"] != "finished" or \
                    base["warmup_excluded"] != r["warmup_excluded"] or base["loader"] != r["loader"]:
                r["speedup"] = r["efficiency"] = math.nan
            else:
                r["speedup"] = r["images_per_s"] / base["images_per_s"]
                r["efficiency"] = r["speedup"] * base["gpus"] / r["gpus"]
    order = {m: i for i, m in enumerate(MODEL_NAMES)}
    return sorted(out, key=lambda r: (order.get(r["model"], 99), MODES.index(r["mode"]), r["gpus"], r["nodes"]))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_scaling(out: Path, rows: list[dict], device: str) -> None:
    """OUT/scaling.csv, OUT/scaling.md and OUT/scaling.png."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scaling.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: ("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in COLUMNS})
    unit = "GPU" if device == "gpu" else "CPU process"
    lines = [f"# Scaling: {out}", "",
             f"Images/s count the images the steps read: source and target (2 x global batch per step), or the "
             f"source's alone where no loss term reads the target (1 x). A \"GPU\" is a {unit}. "
             "Speedup and efficiency are against the smallest N of the same model and mode (N0, the "
             "baseline column), from finished points only (blank when the point or its baseline is not "
             "finished, or when the two were read by different loaders or one was timed with its warm-up "
             "and the other not): efficiency = speedup x N0 / N (weak: per-GPU throughput kept; strong: "
             "T(N0) N0 / (T(N) N)). "
             "Staging: the slowest rank's loader set-up, not in the throughput. Loader: the one the run read "
             "its data with (data.loader auto chooses per point). Warm-up: the first epoch "
             "is excluded where the run had more than one.", ""]
    shown = ("model", "mode", "nodes", "gpus_per_node", "gpus", "batch_per_gpu", "global_batch", "step_time_s",
             "images_per_s", "images_per_s_per_gpu", "speedup", "efficiency", "baseline_gpus", "staging_s", "loader",
             "warmup_excluded", "status")
    header = ("model", "mode", "nodes", "GPUs/node", "GPUs", "batch/GPU", "global batch", "step s", "images/s",
              "images/s/GPU", "speedup", "efficiency", "baseline N0", "staging s", "loader", "warm-up excluded",
              "status")
    lines += table(header, ([_fmt(r[c]) for c in shown] for r in rows))
    atomic_write(out / "scaling.md", "\n".join(lines) + "\n")
    from dmhpc.plots import scaling_curves

    batches = "; ".join(
        f"{mode} scaling, batch {', '.join(map(str, sorted({r[key] for r in rows if r['mode'] == mode})))} {per}"
        for mode, key, per in (("weak", "batch_per_gpu", f"per {unit}"), ("strong", "global_batch", "in all"))
        if any(r["mode"] == mode for r in rows))
    scaling_curves(rows, out / "scaling.png", unit, title=f"scaling study {out} ({'GPUs' if unit == 'GPU' else 'CPU processes'}): {batches}")


def launch_scaling(spec: str | Path | Mapping, wait: bool = True, executor: str | None = None) -> list[dict]:
    """Check the study, submit its unfinished points, wait, write the table (CSV, Markdown) and plot."""
    study = load_study(spec, executor)
    warn_missing_data(p.config for p in study.points if not p.finished)
    rows: list[dict] = []

    def write_table(_failures) -> None:  # before the launch lock goes: a second launcher's points run after
        rows.extend(scaling_table([measure(p) for p in study.points]))
        write_scaling(study.out, rows, study.device)

    failures = launch_points(list(study.points), study.resources, kind=study.executor,
                             folder=study.out / "submitit", job_name=f"dmhpc-{study.out.name}",
                             task=TrainTask(), wait=wait, at_once_why=LOCAL_ONE_AT_A_TIME,
                             before=lambda: record_measured_with(study), after=write_table)
    print(f"dmhpc launch: scaling table in {study.out / 'scaling.md'}, scaling.csv and scaling.png", flush=True)
    failures.update({r["point"]: r["status"] for r in rows if r["status"].startswith("unreadable log")})
    if failures:
        raise DmhpcError("\n".join([f"{study.source}: {len(failures)} point(s) failed:",
                                    *(f"point {name}: {why}" for name, why in failures.items())]))
    return rows


def scaling_arguments(parser) -> None:
    parser.add_argument("file", type=Path, help="scaling study file (YAML)")
    parser.add_argument("--executor", choices=EXECUTORS, help="run the points with this executor instead of the file's")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm: return after submitting; run again later to write the table")


def scaling_main(args) -> int:
    launch_scaling(args.file, wait=not args.no_wait, executor=args.executor)
    return 0
