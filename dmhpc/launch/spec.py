"""Reading launch files (grid and scaling study): every problem is collected before one error is raised.

A launch file is checked as a whole before anything is submitted: its own keys and types, then
the training configuration of every point it expands to. `dmhpc.checks.Problems` gathers one line
per problem, each naming the file and the key (or the point), and raises them together as one
`DmhpcError`.

A `Point` is one training run of a launch: a name, its run directory and its validated
configuration. `resolve_point` builds it from a base config and dotted overrides, exactly as
`dmhpc train --config BASE KEY=VALUE ...` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from dmhpc.batch_rows import check_batch_rows
from dmhpc.checks import Problems, boolean, number, read_yaml, show, take, unknown_keys
from dmhpc.config import (COMMAND_LINE, Config, ConfigFiles, changed_keys, config_to_dict, empty_section, load_config,
                          override_text)
from dmhpc.data.shards import fingerprint, holds_dataset, load_manifest
from dmhpc.errors import DmhpcError
from dmhpc.names import DOMAINS
from dmhpc.run import LENGTH_KEYS, RunDir


def dotted_keys(problems: Problems, data: Any, where: str, reserved: Mapping[str, str], nested: bool = True) -> dict:
    """A mapping of dotted configuration keys to values; `reserved` keys (-> what sets them) refused.
    With `nested`, keys may be nested as in a config file (`train: {epochs: 7}` is `train.epochs`):
    read whole, such a section passed the reserved and collision checks, and the launcher's own
    values replaced it. (A search space's values are mappings themselves: {low, high, log}.)"""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problems.add(where, f"expected a mapping of dotted configuration keys, got {show(data)}")
        return {}
    good: dict = {}

    def take_keys(section: Mapping, prefix: str) -> None:
        for key, value in section.items():
            if not isinstance(key, str):
                problems.add(where, f"key {show(key)} is not a dotted configuration key")
                continue
            dotted = f"{prefix}{key}"
            if nested and isinstance(value, Mapping) and value:
                take_keys(value, dotted + ".")
            elif dotted in reserved:
                problems.add(f"{where}.{dotted}", f"set by the launcher for every point: {reserved[dotted]}")
            elif dotted in good:
                problems.add(f"{where}.{dotted}", "given twice (nested and dotted)")
            else:
                good[dotted] = value

    take_keys(data, "")
    return good


def read_launch_file(spec: str | os.PathLike | Mapping) -> tuple[dict, str, Path]:
    """(data, source for messages, directory that relative `base` paths start from).

    A string holding a newline or another control character is refused wherever it is in the file:
    values end up in generated batch scripts (`#SBATCH --partition=...`, setup lines), where a
    newline would become a line of its own.
    """
    if isinstance(spec, Mapping):
        data, source, here = dict(spec), "<launch dict>", Path.cwd()
    else:
        path = Path(spec)
        data, source, here = read_yaml(path, "launch file"), str(path), path.parent
    problems = Problems(source)
    for where, value in _strings(data):
        if _CONTROL.search(value):
            problems.add(where or None, f"{show(value)} holds a control character (a newline, tab, ...); "
                                        f"launch values go into batch scripts line by line")
    for where, value in _leaves(data):
        # A date (YAML reads an unquoted 2024-06-01 so) or a set deep in a grid's values or overrides
        # ended in a TypeError traceback where point names and overrides are written as JSON.
        if not isinstance(value, (str, int, float, bool, type(None))):
            problems.add(where or None, f"{show(value)}: expected text, a number, true/false or null")
    problems.raise_if_any()
    return data, source, here


def _leaves(value: Any, where: str = ""):
    """(dotted place, value) for every value at any depth that is not a mapping or a list."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{where}[{i}]")
    else:
        yield where, value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _strings(value: Any, where: str = ""):
    """(dotted place, string) for every key and value that is a string, at any depth."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            if isinstance(key, str):
                yield (where or "the file"), key
            yield from _strings(item, place)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


# --- search spaces and point names (grids and tuning) -------------------------------------------

RANGE_KEYS = ("low", "high", "log")
NAME_LIMIT = 120


def out_problem(out: Path) -> str | None:
    """Why OUT cannot hold a launch's runs and tables, or None: it is, or lies in, a run directory
    (a run's resume and evaluation refuse the files put there: the grid's tables made it "not a
    dmhpc run", and the grid that wrote it then refused its own point) or a prepared data set (its
    folder holds its shards only)."""
    for folder in (out, *out.parents):
        if RunDir(folder).looks_like_run():
            return f"{out}: inside the run directory {folder}; launch into a folder of its own"
        if holds_dataset(folder):
            return f"{out}: inside the data set {folder}; launch into a folder of its own"
    return None


def foreign_tables(out: Path, names, marker: str = "submitit") -> str | None:
    """Why OUT's files by the names a launch writes its tables under (`names`) are not the launch's
    to replace, or None: where no launch ever ran (no OUT/`marker`, its submitit folder or a tuner's
    lock file, which stay) they are someone's own, which the first launch replaced."""
    if (out / marker).exists() or not (theirs := [n for n in names if (out / n).exists()]):
        return None
    return f"{out}: holds {', '.join(theirs)}, which no launch into it wrote (no {out / marker}); move them " \
           f"or choose another out"


@dataclass(frozen=True)
class Range:
    """A continuous random choice: uniform in [low, high], or log-uniform."""

    low: float
    high: float
    log: bool = False

    def rounded(self, value: float) -> float:
        """`value` to 4 digits (the value trained with is the value in the run directory's name),
        kept within the range (a draw near high = 1.23456 rounds to 1.235, past it)."""
        return min(max(float(f"{value:.4g}"), self.low), self.high)


def _by_value(v: Any) -> Any:
    """`v` with its numbers as floats (booleans kept), for comparing values as the config takes them."""
    if isinstance(v, list):
        return [_by_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _by_value(x) for k, x in v.items()}
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def repeats(values: list) -> bool:
    """Whether a list of values holds one twice by value: 1 and 1.0 (as text, two points or choices:
    the same training twice, under two names)."""
    return len({json.dumps(_by_value(v), sort_keys=True) for v in values}) != len(values)


def read_space(problems: Problems, data: Any, where: str, reserved: Mapping[str, str]) -> dict[str, list | Range]:
    """A search space: dotted key -> a non-empty list of distinct choices, or {low, high, log} (a Range)."""
    space = dotted_keys(problems, data, where, reserved, nested=False)
    for key, dim in list(space.items()):
        place = f"{where}.{key}"
        if isinstance(dim, list) and dim and repeats(dim):
            problems.add(place, f"a value is repeated in {show(dim)}")
            del space[key]
            continue
        if isinstance(dim, list) and dim:
            continue
        if isinstance(dim, Mapping):
            unknown_keys(problems, dim, RANGE_KEYS, place + ".")
            low = take(problems, dim, "low", number(), prefix=place + ".")
            high = take(problems, dim, "high", number(), prefix=place + ".")
            log = take(problems, dim, "log", boolean(), False, place + ".")
            if low is not None and high is not None:
                if not low < high:
                    problems.add(place, f"low must be below high, got low {low:g}, high {high:g}")
                elif log and low <= 0:
                    problems.add(place, f"log: true needs low > 0, got {low:g}")
                elif _whole_number_key(key):  # (its corners were refused as "got 2.0" where 2 was written)
                    problems.add(place, f"a range draws real numbers, and {key} takes whole numbers: list its "
                                        f"choices")
                else:
                    space[key] = Range(low, high, log)
                    continue
        else:
            problems.add(place, f"expected a non-empty list of choices or {{low, high, log}}, got {show(dim)}")
        del space[key]
    return space


def _whole_number_key(key: str) -> bool:
    """Whether the config key (dotted) takes whole numbers: its default is one."""
    default: Any = config_to_dict(Config())
    for part in key.split("."):
        if not isinstance(default, Mapping) or part not in default:
            return False
        default = default[part]
    return isinstance(default, int) and not isinstance(default, bool)


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def point_name(values: Mapping[str, Any]) -> str:
    """`key=value,key=value` in key order: stable, and safe as one directory name.

    Characters other than letters, digits and ._=,+- become "_"; then, or when the name is long,
    a hash of the exact values keeps different points apart.
    """
    raw = ",".join(f"{k}={_value_text(v)}" for k, v in sorted(values.items()))
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if safe != raw or len(safe) > NAME_LIMIT:
        safe = f"{safe[:NAME_LIMIT - 9]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return safe


def base_path(problems: Problems, key: str, value: str | None, here: Path) -> Path | None:
    """A launch file's training config (`base`), relative to the launch file; None when missing."""
    if value is None:
        return None
    base = Path(value) if Path(value).is_absolute() else here / value
    if not base.is_file():
        problems.add(key, f"config file not found: {base}")
        return None
    return base


# --- points ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One training run of a launch."""

    name: str                 # unique in the launch and safe as a directory name
    values: dict              # what distinguishes this point: key -> value (grid keys, or the study's)
    run_dir: Path             # absolute
    config: Config            # validated; its run.dir is run_dir
    ranks: int | None = None  # the ranks its job runs (train.batch_size is per rank); None: not said
    left_out: str | None = None  # a --report's: why its run directory no longer fits the file

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def finished(self) -> bool:
        """Nothing left to run: see `finished_as`. A point left out has no result of its own."""
        return self.left_out is None and finished_as(self.run, self.config)


def data_pair(point: Point) -> tuple[Path, Path]:
    """The point's source and target data sets, resolved: data/x and ./data/x are one, and two data
    sets in folders of the same name are two."""
    return Path(point.config.data.source).resolve(), Path(point.config.data.target).resolve()


def short_names(paths: Iterable[Path]) -> dict[Path, str]:
    """Each distinct path as its shortest tail that no other path shares: the folder name unless two
    data sets share it (a/pristine and b/pristine)."""
    paths = set(paths)
    names = {}
    for path in paths:
        for depth in range(1, len(path.parts) + 1):
            tail = path.parts[-depth:]
            if all(other.parts[-depth:] != tail for other in paths - {path}):
                break
        names[path] = str(Path(*tail))
    return names


def finished_as(run: RunDir, cfg: Config) -> bool:
    """The trainer wrote the test metrics of the run's selected checkpoint, and trained as long as
    `cfg` asks (the same train.epochs, max_steps and early_stopping): a run asked to train longer
    or shorter is resumed from its last.pt, and its old result is not the new run's."""
    if not run.finished:
        return False
    if not run.holds_run():  # refused as a foreign directory before any launch (check_existing_runs)
        return True
    return not LENGTH_KEYS & set(changed_keys(config_to_dict(run.config()), config_to_dict(cfg)))


def resolve_point(base: Path | ConfigFiles, overrides: Mapping[str, Any], ranks: int | None = None) -> Config:
    """The configuration of BASE (a file, or files read once) with dotted overrides applied,
    validated as the trainer would; with `ranks`, the rows its transfer loss gets per step on that
    many ranks too."""
    # A launch file's section left empty (its keys commented out) changes nothing, as in a config
    # file; on a command line such an override is refused (load_config).
    cfg = load_config(base, [override_text(k, v) for k, v in overrides.items() if not empty_section(k, v)])
    if ranks is not None:
        check_batch_rows(cfg, ranks)
    return cfg


def point_problem(exc: DmhpcError) -> str:
    """A config error of a point without load_config's "command line: " (the point's overrides)."""
    message = str(exc)
    prefix = f"{COMMAND_LINE}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def check_point_problems(problems: Problems, failures: Mapping[str, str]) -> None:
    """One line per distinct problem, naming every point that has it."""
    by_message: dict[str, list[str]] = {}
    for name, message in failures.items():
        by_message.setdefault(message, []).append(name)
    for message, names in by_message.items():
        label = f"point {names[0]}" if len(names) == 1 else f"points {', '.join(names)}"
        problems.add(label, message)


def data_ids(cfg: Config, cache: dict | None = None) -> dict[str, str]:
    """The manifest fingerprints of the run's data sets that exist now, as the trainer compares them
    on resume ({"data.source": ..., "data.target": ...}); one prepared later is the trainer's to check.
    `cache` (path -> fingerprint) reads each data set once for the points that share it."""
    cache = {} if cache is None else cache
    ids = {}
    for role in DOMAINS:
        path = str(getattr(cfg.data, role))
        if path not in cache:
            try:
                cache[path] = fingerprint(load_manifest(path))
            except DmhpcError:
                cache[path] = None
        if cache[path] is not None:
            ids[f"data.{role}"] = cache[path]
    return ids


def warn_missing_data(configs: Iterable[Config]) -> None:
    """Say which data sets of these configurations are not there now: every job that trains on one
    fails at its start unless it is in place by then. Not refused: a set prepared by a job of its
    own, or staged to node-local storage by the jobs' setup commands, is there only when they run."""
    said = set()
    for cfg in configs:
        for role in DOMAINS:
            path = str(getattr(cfg.data, role))
            if path in said:
                continue
            said.add(path)
            try:
                load_manifest(path)
            except DmhpcError as exc:
                print(f"dmhpc launch: warning: data.{role}: {exc}; the jobs that train on it fail unless it is "
                      f"in place when they start", flush=True)


def relaunch_problems(points: list[Point]) -> dict[str, str]:
    """{point name: why}: run directories that are not runs, or hold runs of another configuration
    or of data that changed since (`RunDir.check_relaunch`)."""
    cache: dict = {}
    found = {}
    for p in points:
        try:
            p.run.check_relaunch(p.config, data_ids(p.config, cache), ranks=p.ranks)
        except DmhpcError as exc:
            found[p.name] = str(exc)
    return found


def check_existing_runs(problems: Problems, points: list[Point]) -> None:
    """A run directory that is not a run, or holds a run of another configuration or of data that
    changed since, would be refused by the trainer after the job started: refuse it before anything
    is submitted (and before its old result counts as the point's)."""
    for name, why in relaunch_problems(points).items():
        problems.add(f"point {name}", why)
