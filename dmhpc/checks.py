"""Reading YAML and checking values: the one toolkit behind the training config, launch files,
data configs and the synth knobs.

A `Check` knows how a valid value looks (`expected`, for messages) and converts a value to what is
stored, or raises `Invalid("expected a positive integer, got -3")`. The callers put the file (or
"command line", or the flag) and the key in front, so every problem is one line:
`configs/x.yaml: train.batch_size: expected a positive integer, got -3`.

`read_yaml` reads a file strictly: duplicate keys are refused and `1e-4` is a number (PyYAML's
YAML 1.1 wants `1.0e-4`). `Problems` gathers the problems of a whole file to report them at once.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from dmhpc.errors import DmhpcError

REQUIRED = object()  # marks a key without a default


def show(value: Any) -> str:
    """A value as YAML-like text for messages: true, null, "text", [1, 2]; a date as written, which
    YAML reads unquoted 2024-06-01 as."""
    if isinstance(value, datetime.date):  # (and datetime)
        return f"{_as_written(value)} (read as a date: quote it)"
    try:
        return json.dumps(value, default=_as_written)
    except (TypeError, ValueError):
        return repr(value)


def _as_written(value: Any) -> str:
    """A date or time YAML read from unquoted text, as such text (others: not for JSON)."""
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, datetime.date):
        return value.isoformat()
    raise TypeError(type(value).__name__)


# --- value checks ----------------------------------------------------------------------------------

class Invalid(ValueError):
    """A value failed its check; the message says what was expected and what was given."""


@dataclass(frozen=True)
class Check:
    expected: str  # how a valid value looks, for the error message
    convert: Callable[[Any], Any]  # returns the stored value; raises ValueError or TypeError if invalid

    def __call__(self, value: Any) -> Any:
        try:
            return self.convert(value)
        except (ValueError, TypeError):
            raise Invalid(f"expected {self.expected}, got {show(value)}") from None


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool; an int beyond any float (10**400) is none."""
    try:
        return is_real(v) and math.isfinite(v)
    except OverflowError:
        return False


def is_real(v: Any) -> bool:
    """An int or float, not a bool; NaN and the infinities included (JSON files of dmhpc hold NaN
    for an undefined metric, a ROC AUC of one class)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any, least: int | None = None) -> bool:
    """An int, not a bool, and at least `least` where one is given."""
    return isinstance(v, int) and not isinstance(v, bool) and (least is None or v >= least)


def _accept(condition: bool) -> None:
    if not condition:
        raise ValueError


def integer(minimum: int, maximum: int | None = None) -> Check:
    expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"

    def convert(v):
        _accept(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                and (maximum is None or v <= maximum))
        return v

    return Check(expected, convert)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, unit: str = "") -> Check:
    """A finite number, within [low, high] (an end open when asked), stored as a float."""
    if low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        expected = "a number"
    expected += f" {unit}" if unit else ""

    def convert(v):
        _accept(is_number(v))
        _accept(low is None or (v > low if low_open else v >= low))
        _accept(high is None or (v < high if high_open else v <= high))
        return float(v)

    return Check(expected, convert)


def optional(check: Check) -> Check:
    return Check(f"null or {check.expected}", lambda v: None if v is None else check.convert(v))


def boolean() -> Check:
    def convert(v):
        _accept(isinstance(v, bool))
        return v

    return Check("true or false", convert)


def choice(*options: str) -> Check:
    def convert(v):
        _accept(isinstance(v, str) and v in options)
        return v

    return Check("one of " + ", ".join(json.dumps(o) for o in options), convert)


def text() -> Check:
    def convert(v):
        _accept(isinstance(v, str) and bool(v.strip()))
        return v

    return Check("a non-empty string (quote numbers)", convert)


_UNEXPANDED = re.compile(r"^~|\$\{?[A-Za-z_]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_text() -> Check:
    """A path: a non-empty string that needs no shell to expand it. `~/runs` or `$SCRATCH/data` in a
    file were taken as they are: a folder named `~` or `$SCRATCH` made in the working directory. No
    control characters: a NUL ended the trainer in a ValueError traceback, a newline made a folder
    that no log line names readably."""
    def convert(v):
        _accept(isinstance(v, str) and bool(v.strip()) and not _UNEXPANDED.search(v) and not _CONTROL.search(v))
        return v

    return Check("a non-empty string, a path written out (quote numbers; no ~ or $VARIABLE: dmhpc expands none; "
                 "on a command line write $HOME, which a shell expands after KEY=, not ~; no control characters)",
                 convert)


def mapping(expected: str = "a mapping", *, empty: bool = True) -> Check:
    def convert(v):
        _accept(isinstance(v, Mapping) and (empty or bool(v)))
        return dict(v)

    return Check(expected, convert)


def text_list() -> Check:
    def convert(v):
        _accept(isinstance(v, list) and all(isinstance(s, str) for s in v))
        return tuple(v)

    return Check("a list of strings", convert)


def distinct_list(of: Check, *, what: str | None = None) -> Check:
    """A non-empty list of distinct values, each passing `of`; stored as a tuple."""
    def convert(v):
        _accept(isinstance(v, list) and bool(v) and len(set(map(show, v))) == len(v))
        return tuple(of.convert(item) for item in v)

    return Check(what or f"a non-empty list of distinct values, each {of.expected}", convert)


# --- YAML ------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 1e-4 as a number and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        # PyYAML's own constructors of a scalar that is no valid value of its type raise Python's
        # errors (2024-02-30 as a timestamp, !!float abc, !!bool maybe): a traceback, not a YAML error.
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
            if not isinstance(node, yaml.ScalarNode):
                raise
            kind = node.tag.rsplit(":", 1)[-1]
            why = f" ({exc})" if isinstance(exc, (ValueError, OverflowError)) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is read as a {kind} and is not a valid one{why}; quote it to keep "
                f"it as text", node.start_mark) from None


class _Dumper(yaml.SafeDumper):
    """Safe YAML output that `_Loader` reads back equal: a string like "2e3" is quoted."""


# Numbers as YAML 1.2 reads them, not 1.1: `time: 2:00:00` was the base-60 integer 7200 (taken as
# minutes: 5 days, not 2 hours) and `seed: 010` the octal 8. Decimal integers only (010 is 10), and
# floats with or without a point (1e-4 too). The dumper quotes a string only when its own
# resolvers would read it as something else, so it takes the same rules, or "2e3" is written bare
# and read back as 2000.0.
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|"
                    r"\.(?:nan|NaN|NAN))$")
for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # Plain scalars reach here only as decimal (_INT); an explicit !!int may be written any way
    # YAML knows (0x10, 0o17, 1_000), and one that is no integer is a YAML error, not a traceback.
    value = loader.construct_scalar(node)
    try:
        return int(value)
    except ValueError:
        try:
            return yaml.SafeLoader.construct_yaml_int(loader, node)
        except ValueError:
            raise yaml.constructor.ConstructorError(None, None, f"!!int {value!r} is not an integer",
                                                    node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"invalid YAML: {problem}{where}"


def parse_yaml(text: str) -> Any:
    """One YAML value (e.g. the right-hand side of KEY=VALUE); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    """YAML text for plain data (keys in their order) that `parse_yaml` reads back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def read_yaml(path: Path, what: str = "config file") -> dict:
    """The mapping at the top of a YAML file; every problem is a one-line DmhpcError naming the file."""
    path = Path(path)
    try:  # (exists() raises on a folder without search permission, or a name too long)
        if not path.exists():
            raise DmhpcError(f"{path}: {what} not found")
        if path.is_dir():
            raise DmhpcError(f"{path}: is a directory, not a {what}")
        text_ = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DmhpcError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = parse_yaml(text_)
    except yaml.YAMLError as exc:
        raise DmhpcError(f"{path}: {yaml_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DmhpcError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


# --- a file's problems, all at once ----------------------------------------------------------------

class Problems:
    """Problems found in one file; `raise_if_any` reports all of them, one line each."""

    def __init__(self, source: str, consequence: str = "nothing submitted", overridden: Iterable[str] = ()):
        self.source = source
        self.consequence = consequence
        self.overridden = tuple(overridden)  # dotted keys set on the command line: their problems are its
        self.lines: list[str] = []

    def add(self, key: str | None, problem: str) -> None:
        source = self.source
        if key and any(key == k or key.startswith(k + ".") for k in self.overridden):
            source = "command line"
        self.lines.append(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")

    def raise_if_any(self) -> None:
        if len(self.lines) == 1:
            raise DmhpcError(self.lines[0])
        if self.lines:
            head = f"{self.source}: {len(self.lines)} problems, {self.consequence}:"
            raise DmhpcError("\n".join([head, *self.lines]))


def take(problems: Problems, data: Mapping, key: str, check: Check, default: Any = REQUIRED,
         prefix: str = "") -> Any:
    """data[key] passed through `check`; a missing or bad value is recorded and `default` returned.
    A key present with no value (null: its list's items all commented out, say) is refused where the
    default is not null: `nodes:` over commented-out items was one node without a word."""
    dotted = prefix + key
    if key not in data:
        if default is REQUIRED:
            problems.add(dotted, "missing (required)")
            return None
        return default
    if data[key] is None and default is not REQUIRED and default is not None:
        problems.add(dotted, f"no value (null); remove the key for its default ({show(default)})")
        return default
    try:
        return check(data[key])
    except Invalid as exc:
        problems.add(dotted, str(exc))
        return None if default is REQUIRED else default


def unknown_keys(problems: Problems, data: Mapping, known: tuple[str, ...], prefix: str = "") -> None:
    """Record every key of `data` that is not in `known`."""
    for key in data:
        if key not in known:
            problems.add(f"{prefix}{key}", f"unknown key (known: {', '.join(known)})")
