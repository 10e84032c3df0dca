"""Grids of training runs: the grid file, its points and run directories, and the launch.

    python launch/grid.py configs/grid/mmd-fisher-weights.yaml [--no-wait | --report]
    dmhpc.launch.launch_grid("configs/grid/mmd-fisher-weights.yaml")   # or a dict of the same keys
    dmhpc.launch.report_grid("configs/grid/mmd-fisher-weights.yaml")   # the tables only

A grid file (every key; docs/cluster.md has the reference):

    base: ../deepmerge-mmd-fisher-entropy.yaml  # training config, relative to the grid file
    out: runs/grid/mmd-fisher                   # run directories + leaderboard, relative to the cwd
    executor: slurm                             # slurm | local | debug
    overrides: {train.epochs: 50}               # the same for every point (not in the names)
    grid:                                       # cartesian product of these values
      loss.transfer_weight: [0.5, 1.0]
      seed: [0, 1]
    random:                                     # n seeded samples, each crossed with every grid point
      n: 4
      seed: 0
      space:
        optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # uniform (log-uniform), 4 digits
        loss.entropy_weight: [0.0, 0.05, 0.1]               # one of these
    slurm: {nodes: 1, gpus_per_node: 1, cpus_per_task: 8, time: "04:00:00", partition: gpu}

A study compares methods over the same grid: `methods` instead of `base`, each method a base
config with its own overrides (on top of the file's), and optionally the two methods between
which `gap` measures how much of the target-accuracy gap every method closes:

    methods:
      noda: {base: ../deepmerge-noda.yaml}
      mmd: {base: ../deepmerge-mmd-fisher-entropy.yaml, overrides: {loss.entropy_weight: 0.0}}
      oracle: {base: ../deepmerge-oracle.yaml}
    gap: {from: noda, to: oracle}

Every point is run directory OUT/<name> (OUT/<method>/<name> in a study), the name made of its
grid and random values (`loss.transfer_weight=0.5,seed=0`). Every point's configuration is
validated before anything is submitted; all problems are reported together. A second launch skips
finished points (their eval/best_test.json exists and their run trained as long as the point asks:
spec.finished_as), resumes the others from their last checkpoint, and refuses a run directory that
holds a run of another configuration. Besides the leaderboard,
a grid over `seed` gets OUT/summary.md: mean ± std over seeds (dmhpc.launch.summary).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from dmhpc.data.shards import is_labelled, load_manifest
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write, hold_lock
from dmhpc.launch.leaderboard import write_leaderboard
from dmhpc.launch.summary import write_summary
from dmhpc.launch.validators import write_validators
from dmhpc.checks import Problems, choice, integer, path_text, show, take, text, unknown_keys
from dmhpc.launch.spec import (NAME_LIMIT, Point, Range, base_path, check_existing_runs, check_point_problems,
                               dotted_keys, foreign_tables, out_problem, repeats, point_name, point_problem,
                               read_launch_file, read_space, relaunch_problems, resolve_point, warn_missing_data)
from dmhpc.launch.submit import EXECUTORS, Resources, TrainTask, launch_points, preempt_signal, read_resources

GRID_KEYS = ("base", "methods", "gap", "out", "executor", "overrides", "grid", "random", "slurm")
METHOD_KEYS = ("base", "overrides")
GAP_KEYS = ("from", "to")
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# What a study writes in OUT beside its methods' folders: a method of one of these names trained, and
# then its tables were refused ("OUT/summary.csv: Is a directory").
TABLE_NAMES = ("submitit", *(f"{t}.{x}" for t in ("leaderboard", "summary", "validators") for x in ("csv", "md")))
RANDOM_KEYS = ("n", "seed", "space")
# Keys the launcher sets for every point, and why.
LAUNCHER_KEYS = {"run.dir": "OUT/<point name>", "train.signals": "[submitit's preemption signal]"}


@dataclass(frozen=True)
class Grid:
    """A checked grid file: where it came from, where runs go, how they are submitted, its points."""

    source: str
    out: Path
    executor: str
    resources: Resources
    points: tuple[Point, ...]
    gap: tuple[str, str] | None = None  # (from, to) methods of a study's "gap closed"


# --- expansion -------------------------------------------------------------------------------------

def _draw(dimension: list | Range, rng: random.Random) -> Any:
    u = rng.random()  # random() is the one stream Python keeps stable across versions
    if isinstance(dimension, list):
        return dimension[min(int(u * len(dimension)), len(dimension) - 1)]
    if dimension.log:
        value = math.exp(math.log(dimension.low) + u * (math.log(dimension.high) - math.log(dimension.low)))
    else:
        value = dimension.low + u * (dimension.high - dimension.low)
    return dimension.rounded(value)


def sample_space(space: Mapping[str, list | Range], n: int, seed: int) -> list[dict]:
    """n distinct seeded samples of `space` (dotted key -> list of choices or Range)."""
    if all(isinstance(d, list) for d in space.values()):
        # Said at once: the draws below went on 100 * n times first (minutes at n = 10**6).
        size = math.prod(len({json.dumps(v) for v in d}) for d in space.values())
        if n > size:
            raise DmhpcError(f"random.n: {n} distinct samples asked for, the space holds only {size}")
    rng = random.Random(seed)
    samples: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        if len(samples) == n:
            break
        sample = {key: _draw(space[key], rng) for key in sorted(space)}
        text_ = json.dumps(sample, sort_keys=True)
        if text_ not in seen:
            seen.add(text_)
            samples.append(sample)
    if len(samples) < n:
        raise DmhpcError(f"random.n: {n} distinct samples asked for, the space gave only {len(samples)}")
    return samples


def expand(grid: Mapping[str, list], samples: list[dict] | None = None) -> list[dict]:
    """The points' values: the cartesian product of `grid`, each crossed with every random sample."""
    keys = sorted(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if samples:
        points = [{**p, **s} for p in points for s in samples]
    return points


# --- reading and checking --------------------------------------------------------------------------

def _read_grid(problems: Problems, data: Any) -> dict[str, list]:
    grid = dotted_keys(problems, data, "grid", LAUNCHER_KEYS)
    for key, values in list(grid.items()):
        if not isinstance(values, list) or not values:
            problems.add(f"grid.{key}", f"expected a non-empty list of values, got {show(values)}")
            del grid[key]
        elif repeats(values):
            problems.add(f"grid.{key}", f"a value is repeated in {show(values)}")
            del grid[key]
    return grid


def _read_random(problems: Problems, data: Any) -> tuple[dict, int, int]:
    """(space, n, seed) of the `random` section; an empty space when absent or bad."""
    if data is None:
        return {}, 0, 0
    if not isinstance(data, Mapping):
        problems.add("random", f"expected a mapping with n, seed and space, got {show(data)}")
        return {}, 0, 0
    unknown_keys(problems, data, RANDOM_KEYS, "random.")
    n = take(problems, data, "n", integer(1), prefix="random.")
    seed = take(problems, data, "seed", integer(0), 0, "random.")
    if "space" not in data:
        problems.add("random.space", "missing (required)")
    elif not data["space"]:
        problems.add("random.space", "empty: give at least one dotted key with choices or a range")
    space = read_space(problems, data.get("space"), "random.space", LAUNCHER_KEYS)
    return space, n or 0, seed


def _read_methods(problems: Problems, data: Any, here: Path) -> dict[str, tuple[Path | None, dict]]:
    """method name -> (base config, the method's own overrides)."""
    if not isinstance(data, Mapping) or not data:
        problems.add("methods", f"expected a mapping of method name -> {{base, overrides}}, got {show(data)}")
        return {}
    methods = {}
    for name, spec in data.items():
        where = f"methods.{name}"
        if not isinstance(name, str) or not METHOD_NAME.fullmatch(name) or len(name) > NAME_LIMIT:
            problems.add(f"methods.{show(name)[:NAME_LIMIT + 10]}", f"a method name is a directory name: letters, "
                         f"digits and ._+- (not starting with a punctuation mark), at most {NAME_LIMIT} of them")
            continue
        if name in TABLE_NAMES:
            problems.add(where, f"a name of the study's own files in OUT ({', '.join(TABLE_NAMES)}); choose another")
            continue
        if not isinstance(spec, Mapping):
            problems.add(where, f"expected a mapping with base and overrides, got {show(spec)}")
            continue
        unknown_keys(problems, spec, METHOD_KEYS, where + ".")
        base = base_path(problems, where + ".base", take(problems, spec, "base", path_text(), prefix=where + "."), here)
        methods[name] = (base, dotted_keys(problems, spec.get("overrides"), where + ".overrides", LAUNCHER_KEYS))
    return methods


def _read_gap(problems: Problems, data: Any, methods: Mapping) -> tuple[str, str] | None:
    if data is None:
        return None
    if not methods:
        problems.add("gap", "needs methods: it names the two methods whose target accuracies span the gap")
        return None
    if not isinstance(data, Mapping):
        problems.add("gap", f"expected {{from: METHOD, to: METHOD}}, got {show(data)}")
        return None
    unknown_keys(problems, data, GAP_KEYS, "gap.")
    ends = [take(problems, data, key, text(), prefix="gap.") for key in GAP_KEYS]
    for key, name in zip(GAP_KEYS, ends):
        if name is not None and name not in methods:
            problems.add(f"gap.{key}", f"{show(name)} is not one of the methods ({', '.join(methods)})")
    if None in ends or any(name not in methods for name in ends):
        return None
    if ends[0] == ends[1]:
        problems.add("gap", f"from and to are the same method ({ends[0]})")
        return None
    return ends[0], ends[1]


def load_grid(spec: str | Path | Mapping, executor: str | None = None, *, check_runs: bool = True) -> Grid:
    """Read and check a grid file (or dict) and every point it expands to; raise all problems at once.

    `executor` replaces the file's (`dmhpc grid FILE --executor local` runs a cluster's grid here).
    `check_runs=False` leaves the points' run directories unchecked (a report launches nothing).
    """
    data, source, here = read_launch_file(spec)
    problems = Problems(source)
    unknown_keys(problems, data, GRID_KEYS)
    out_text = take(problems, data, "out", path_text())
    # The file's is checked where --executor replaces it too: a typo passed until the flag was left out.
    in_file = take(problems, data, "executor", choice(*EXECUTORS), "slurm")
    executor = executor or in_file
    overrides = dotted_keys(problems, data.get("overrides"), "overrides", LAUNCHER_KEYS)
    grid = _read_grid(problems, data.get("grid"))
    space, n, seed = _read_random(problems, data.get("random"))
    resources = read_resources(problems, data.get("slurm"), shape=True, executor=executor)
    if "grid" in data and not data["grid"]:
        problems.add("grid", "empty: give at least one dotted key with a list of values "
                     "(or leave grid out and use random)")
    if "random" in data and data["random"] is None:  # its keys commented out: one point, OUT itself
        problems.add("random", "empty: give n and space (or leave random out and use grid)")
    elif "grid" not in data and "random" not in data:
        problems.add("grid", "missing: give a grid of values, a random section, or both")
    for key in sorted((set(grid) & set(space)) | (set(overrides) & (set(grid) | set(space)))):
        problems.add(key, "set in more than one of overrides, grid and random.space")

    # What each method trains: {None: ...} for a plain grid.
    bases: dict[str | None, tuple[Path | None, dict]] = {}
    if ("base" in data) == ("methods" in data):
        problems.add(None, "give either base (one training config) or methods (a study), not "
                     + ("both" if "base" in data else "neither"))
    if "methods" in data:
        for name, (base, own) in _read_methods(problems, data["methods"], here).items():
            for key in sorted(set(own) & (set(grid) | set(space))):
                problems.add(f"methods.{name}.overrides.{key}", "also a grid or random.space key")
            bases[name] = (base, {**overrides, **own})
    elif "base" in data:
        bases[None] = (base_path(problems, "base", take(problems, data, "base", path_text()), here), overrides)
    gap = _read_gap(problems, data.get("gap"), bases if "methods" in data else {})
    if gap and "seed" not in grid:
        problems.add("gap", "needs seed among the grid keys (grid: {seed: [1, 2, 3]}): the gap closed is a mean over "
                     "seeds, and a study without them writes no summary")
    if problems.lines:  # the points would repeat these problems
        problems.raise_if_any()
    # A base and its overrides that fail alone are one line, not one per point; unless a point's own
    # values mend them (overrides for ResNets, the models in the grid), which each point's check says.
    common: dict[str | None, str] = {}
    for name, (base, merged) in bases.items():
        try:
            resolve_point(base, merged, resources.ranks)
        except DmhpcError as exc:
            common[name] = point_problem(exc)

    out = Path(out_text).resolve()
    if (problem := out_problem(out)) is not None:
        problems.add("out", problem)
    # (the first launch replaced or removed them: "the grid no longer varies the seed")
    if (problem := foreign_tables(out, TABLE_NAMES[1:])) is not None:
        problems.add("out", problem)
    try:
        samples = sample_space(space, n, seed) if space else None
    except DmhpcError as exc:
        problems.add(None, str(exc))
        problems.raise_if_any()
    named: dict[str, dict] = {}  # the grid's points, the same for every method
    for values in expand(grid, samples):
        name = point_name(values)
        if name in named:
            problems.add(f"point {name}", f"two points share this name: {show(named[name])} and {show(values)}")
        else:
            named[name] = values
    points, failures = [], {}
    for method, (base, merged) in bases.items():
        failed = {}
        for name, values in named.items():
            run_dir = out / name if method is None else out / method / name
            try:
                cfg = resolve_point(base, {**merged, **values, "run.dir": str(run_dir),
                                           "train.signals": [preempt_signal()]}, resources.ranks)
            except DmhpcError as exc:
                failed[name if method is None else f"{method}/{name}"] = point_problem(exc)
                continue
            if method is None:
                points.append(Point(name, dict(values), run_dir, cfg, resources.ranks))
            else:
                points.append(Point(f"{method}/{name}", {"method": method, **values}, run_dir, cfg, resources.ranks))
        # One line where every point fails as the base does; points failing for their own reasons
        # (a grid that mends the base and breaks each point otherwise) are named, each with its own.
        if method in common and len(failed) == len(named) and set(failed.values()) == {common[method]}:
            problems.add("overrides" if method is None else f"methods.{method}", common[method])
        else:
            failures.update(failed)
    check_point_problems(problems, failures)
    if check_runs:
        check_existing_runs(problems, points)
    if gap:
        _check_gap_targets(problems, points)
    problems.raise_if_any()
    if check_runs:  # a launch (not a report)
        warn_missing_data(p.config for p in points if not p.finished)
    return Grid(source, out, executor, resources, tuple(points), gap)


def _check_gap_targets(problems: Problems, points) -> None:
    """The gap is measured in target accuracy: refuse targets without labels (where the data set
    exists already; one prepared later is checked by the trainer's own start-up checks)."""
    for target in sorted({str(p.config.data.target) for p in points}):
        try:
            labelled = is_labelled(load_manifest(target))
        except DmhpcError:
            continue
        if not labelled:
            problems.add("gap", f"measures target accuracy, and data.target {target} is unlabelled; report a "
                         f"study on an unlabelled survey without gap")


TABLES_LOCK = "tables.lock"  # OUT/submitit/tables.lock, held while the tables are written
FAILURES = "failures.json"  # OUT/submitit/failures.json: failed points and why, until a launch runs them again


def _write_tables(g: Grid, failures: Mapping[str, str] | None = None) -> list[dict]:
    """The tables, with `failures` (None: failures.json's, for a --report)."""
    # A --report and a launcher's end may write the tables at once; one after the other, each reading
    # the run directories (and failures.json) while it holds the lock, the last tables written are the
    # newest (a report that read before the launcher's end replaced its final tables with older failures).
    lock = g.out / "submitit" / TABLES_LOCK
    with hold_lock(lock, "", "writer of this grid's tables", wait=True):
        if failures is None:
            failures = _read_failures(g.out / "submitit" / FAILURES)
        rows = write_leaderboard(g.out, g.points, failed=failures)
        print(f"dmhpc launch: leaderboard in {g.out / 'leaderboard.md'} and leaderboard.csv", flush=True)
        if write_summary(g.out, g.points, gap=g.gap):
            print(f"dmhpc launch: mean ± std over seeds in {g.out / 'summary.md'} and summary.csv", flush=True)
        if write_validators(g.out, g.points):
            print(f"dmhpc launch: label-free selection against the oracle in {g.out / 'validators.md'} and "
                  f"validators.csv", flush=True)
    return rows


def launch_grid(spec: str | Path | Mapping, wait: bool = True, executor: str | None = None) -> list[dict]:
    """Check the grid, submit its unfinished points as one job array, wait, write the leaderboard.

    Returns the leaderboard rows (see `dmhpc.launch.leaderboard`). With wait=False (slurm only) the
    leaderboard shows the state at submission; launching again later skips what finished and
    waits for what is still queued. Failed points are raised as one DmhpcError after the
    leaderboard is written.
    """
    g = load_grid(spec, executor)
    # Its points are launched again: a launcher stopped while it waits (Ctrl-C, a lost login) would
    # leave their earlier failures, and a --report would say "failed" of points whose jobs run. Under
    # the launch lock, and put back by a launch refused before any job went in (sbatch refusing a
    # partition, no GPU here): such a launch, and one refused as a second launcher, erased them before.
    def clear_failures() -> Callable[[], None]:
        path = g.out / "submitit" / FAILURES
        earlier = path.read_bytes() if path.is_file() else None
        _record_failures(g, {})
        return lambda: path.unlink(missing_ok=True) if earlier is None else atomic_write(path, earlier)

    def record(failures: dict[str, str]) -> None:
        _record_failures(g, failures)
        rows.extend(_write_tables(g, failures))

    rows: list[dict] = []
    failures = launch_points(list(g.points), {p.name: g.resources for p in g.points}, kind=g.executor,
                             folder=g.out / "submitit", job_name=f"dmhpc-{g.out.name}", task=TrainTask(),
                             wait=wait, before=clear_failures, after=record,
                             noted=lambda failures: _record_failures(g, failures))
    if failures:
        raise DmhpcError("\n".join([f"{g.source}: {len(failures)} point(s) failed:",
                                    *(f"point {name}: {why}" for name, why in failures.items())]))
    return rows


def report_grid(spec: str | Path | Mapping, executor: str | None = None) -> list[dict]:
    """Write the leaderboard and summary from what the run directories hold now; launch nothing.
    `executor`: the one the grid was launched with, where it replaced the file's (the ranks of a
    point, which its runs must match, depend on it; the file's own could refuse the file outright).

    For a study whose jobs are still running, or one that was launched in parts: the tables
    cover every point of the file, unfinished ones marked as such. A point whose run directory no
    longer fits the file (another configuration, fewer epochs than it trained, data changed since)
    is named and marked "left out": its results are not the file's, and a launch would refuse it.
    It still counts among its group's runs ("2/3" finished): dropped, three seeds read "2/2".
    """
    g = load_grid(spec, executor, check_runs=False)
    stale = relaunch_problems(list(g.points))
    for name, why in stale.items():
        print(f"dmhpc launch: point {name}: left out of the tables: {why}", flush=True)
    if g.points and len(stale) == len(g.points):
        # Tables of no point were written over the old ones (the summary removed "as the grid no
        # longer varies the seed"): the file, not the runs, is what changed.
        raise DmhpcError(f"{g.out}: no point of the file fits its run directory (each said above); the tables "
                         f"are left as they were: restore the file, or launch it into another out")
    g = replace(g, points=tuple(replace(p, left_out=stale.get(p.name)) for p in g.points))
    finished = sum(p.finished for p in g.points)
    print(f"dmhpc launch: {finished} of {len(g.points)} point(s) finished"
          f"{f' ({len(stale)} left out)' if stale else ''}; nothing launched", flush=True)
    return _write_tables(g)


def _record_failures(g: Grid, failures: Mapping[str, str]) -> None:
    """For a later --report, which cannot tell a failed job from a running one: this launch's failed
    points, with those of points of the same OUT that it did not launch (a part of a study)."""
    path = g.out / "submitit" / FAILURES
    try:
        earlier = _read_failures(path)
    except DmhpcError:  # damaged: replaced by what this launch knows
        earlier = {}
    ours = {p.name for p in g.points}
    kept = {**{k: v for k, v in earlier.items() if k not in ours}, **failures}
    if kept:
        atomic_write(path, json.dumps(kept, indent=1))
    else:
        path.unlink(missing_ok=True)


def _read_failures(path: Path) -> dict[str, str]:
    """{point: why} of the points whose last launch failed them (see `_record_failures`)."""
    if not path.is_file():
        return {}
    try:
        failures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmhpcError(f"{path}: not readable JSON ({exc}); remove it (failed points then show as unfinished)") \
            from None
    if not isinstance(failures, dict) or not all(isinstance(v, str) for v in failures.values()):
        raise DmhpcError(f"{path}: expected an object of point name -> reason; remove it (failed points then show "
                         f"as unfinished)")
    return failures


def grid_arguments(parser) -> None:
    parser.add_argument("file", type=Path, help="grid or study file (YAML)")
    parser.add_argument("--executor", choices=EXECUTORS,
                        help="run the points with this executor instead of the file's: slurm (sbatch), local "
                             "(processes on this machine) or debug (in this process, one after the other)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--no-wait", action="store_true",
                      help="slurm: return after submitting; run again later to collect the leaderboard")
    when.add_argument("--report", action="store_true",
                      help="write the leaderboard and summary from the run directories as they are; launch nothing")


def grid_main(args) -> int:
    if args.report:
        report_grid(args.file, executor=args.executor)
    else:
        launch_grid(args.file, wait=not args.no_wait, executor=args.executor)
    return 0
