"""The one toolkit for YAML and values (dmhpc/checks.py): each check's message, the strict YAML
reader, and a file's problems reported together."""

from __future__ import annotations

import pytest
import yaml

from dmhpc.checks import (Invalid, Problems, boolean, choice, distinct_list, integer, mapping, number, optional,
                          read_yaml, show, take, text, unknown_keys)
from dmhpc.errors import DmhpcError


@pytest.mark.parametrize("check, value, message", [
    (integer(1), 0, "expected a positive integer, got 0"),
    (integer(1), True, "expected a positive integer, got true"),  # a bool is not an integer
    (integer(0, 9), 10, "expected an integer from 0 to 9, got 10"),
    (number(0, low_open=True), 0, "expected a number > 0, got 0"),
    (number(18, 35, unit="mag"), float("nan"), "expected a number in [18, 35] mag, got NaN"),
    (number(), "1e-3", 'expected a number, got "1e-3"'),
    (optional(text()), "  ", 'expected null or a non-empty string (quote numbers), got "  "'),
    (boolean(), "yes", 'expected true or false, got "yes"'),
    (choice("a", "b"), ["a"], 'expected one of "a", "b", got ["a"]'),
    (mapping("a non-empty mapping", empty=False), {}, "expected a non-empty mapping, got {}"),
    (distinct_list(integer(1)), [1, 1], "each a positive integer, got [1, 1]"),
    (distinct_list(integer(1)), [], "a non-empty list of distinct values, each a positive integer, got []"),
    (distinct_list(integer(1)), [1, 0], "each a positive integer, got [1, 0]"),
])
def test_each_check_says_what_it_expected_and_what_it_got(check, value, message):
    with pytest.raises(Invalid) as info:
        check(value)
    assert message in str(info.value)


def test_checks_return_the_stored_value():
    assert number()(3) == 3.0 and isinstance(number()(3), float)
    assert distinct_list(integer(1))([2, 1]) == (2, 1)
    assert optional(integer(0))(None) is None
    assert mapping()({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("text_, problem", [
    ("a: 1\na: 2\n", 'invalid YAML: duplicate key "a" (line 2, column 1)'),
    ("a: [1\n", "invalid YAML: "),
    ("- 1\n", "expected a mapping of keys at the top level, got list"),
])
def test_read_yaml_is_strict_and_names_the_file(tmp_path, text_, problem):
    path = tmp_path / "x.yaml"
    path.write_text(text_)
    with pytest.raises(DmhpcError) as info:
        read_yaml(path, "data config")
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_read_yaml_reads_exponents_as_numbers_and_names_a_missing_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lr: 1e-4\n")
    assert read_yaml(path) == {"lr": 1e-4}
    with pytest.raises(DmhpcError, match=r"nope.yaml: data config not found"):
        read_yaml(tmp_path / "nope.yaml", "data config")


def test_problems_are_reported_together_one_line_each():
    problems = Problems("f.yaml", "nothing written")
    data = {"n": 0, "extra": 1}
    assert take(problems, data, "n", integer(1), 5) == 5  # recorded, and the default stands in
    assert take(problems, data, "name", text()) is None
    unknown_keys(problems, data, ("n", "name"))
    with pytest.raises(DmhpcError) as info:
        problems.raise_if_any()
    assert str(info.value).splitlines() == [
        "f.yaml: 3 problems, nothing written:",
        "f.yaml: n: expected a positive integer, got 0",
        "f.yaml: name: missing (required)",
        "f.yaml: extra: unknown key (known: n, name)",
    ]
    assert show({"a": [1, None]}) == '{"a": [1, null]}'
    # YAML reads an unquoted 2024-06-01 as a date: shown as written, not as datetime.date(2024, 6, 1)
    assert show(yaml.safe_load("2024-06-01")) == "2024-06-01 (read as a date: quote it)"
    assert show(yaml.safe_load("2024-06-01 10:00:00")) == "2024-06-01 10:00:00 (read as a date: quote it)"
    assert show(yaml.safe_load("[2024-06-01]")) == '["2024-06-01"]'


def test_yaml_numbers_are_read_as_yaml_1_2_reads_them():
    """YAML 1.1's rules read `time: 2:00:00` as the base-60 integer 7200 (as minutes: five days) and
    `seed: 010` as the octal 8, without a word. Decimal integers and floats with or without a point."""
    from dmhpc.checks import dump_yaml, parse_yaml

    assert parse_yaml("{time: 2:00:00, seed: 010, lr: 1e-3, w: .5e3, n: +3}") == \
        {"time": "2:00:00", "seed": 10, "lr": 0.001, "w": 500.0, "n": 3}
    assert [parse_yaml(t) for t in ("0x1F", "0b101", "1_000")] == ["0x1F", "0b101", "1_000"]  # refused where numbers go
    for value in ("2e3", "010", "2:00:00", "1.5", ".5"):  # strings stay strings through the dumper
        assert parse_yaml(dump_yaml({"k": value}))["k"] == value
    # An explicit !!int as YAML writes integers (it was a ValueError traceback); no integer: YAML's error.
    assert parse_yaml("[!!int 0x10, !!int 1_000, !!int '7']") == [16, 1000, 7]
    with pytest.raises(yaml.YAMLError, match="!!int 'zz' is not an integer"):
        parse_yaml("seed: !!int zz")


@pytest.mark.parametrize("text, message", [
    ("dir: 2024-02-30",
     r"'2024-02-30' is read as a timestamp and is not a valid one \(day is out of range for month\)"),
    ("n: !!float abc", r"'abc' is read as a float and is not a valid one \(could not convert"),
    ("on: !!bool maybe", r"'maybe' is read as a bool and is not a valid one; quote it to keep it as text"),
    ("when: !!timestamp tomorrow", r"'tomorrow' is read as a timestamp and is not a valid one"),
])
def test_a_scalar_yaml_cannot_make_a_value_of_its_type_is_one_line(tmp_path, text, message):
    """PyYAML's constructors raise Python's errors for these (ValueError, KeyError, AttributeError):
    a config file, an override or a data config holding one ended in a traceback."""
    from dmhpc.checks import read_yaml
    from dmhpc.config import parse_override

    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  {text}\n")
    with pytest.raises(DmhpcError, match=f"^{path}: invalid YAML: {message}.* \\(line 2, column"):
        read_yaml(path)
    key, value = text.split(": ")
    with pytest.raises(DmhpcError, match=f"^command line: run.{key}: value .* is invalid YAML: {message}"):
        parse_override(f"run.{key}={value}")


def test_an_unquoted_slurm_time_is_hours_not_days(tmp_path):
    from dmhpc.launch import load_grid
    from tests.conftest import TINY

    path = tmp_path / "g.yaml"
    path.write_text(f"base: {TINY}\nout: {tmp_path / 'g'}\ngrid: {{seed: [1]}}\nslurm: {{time: 2:00:00}}\n")
    assert load_grid(path).resources.time_min == 120


def test_numbers_are_finite_and_booleans_are_only_true_or_false():
    """An infinity passed `number()` (a learning rate of .inf trained NaNs), and YAML's 1 or 0 passed
    `boolean()` where true or false was asked (the stored 1 is no bool)."""
    for bad in (float("inf"), float("-inf"), float("nan"), 10 ** 400):
        with pytest.raises(Invalid, match="expected a number, got"):
            number()(bad)
    for bad in (1, 0, "true", None):
        with pytest.raises(Invalid, match="expected true or false"):
            boolean()(bad)
    assert boolean()(False) is False


def test_a_command_line_override_is_blamed_only_for_its_own_keys():
    """`train.batch=...` on the command line took the blame for the file's `train.batch_size`: its key
    begins with the same letters."""
    problems = Problems("f.yaml", overridden=["train.batch", "loss"])
    problems.add("train.batch_size", "expected a positive integer, got 0")
    problems.add("train.batch", "unknown key")
    problems.add("loss.fisher.weight", "expected a number >= 0, got -1")
    problems.add("lossy", "unknown key")
    assert problems.lines == ["f.yaml: train.batch_size: expected a positive integer, got 0",
                              "command line: train.batch: unknown key",
                              "command line: loss.fisher.weight: expected a number >= 0, got -1",
                              "f.yaml: lossy: unknown key"]


def test_a_librarys_reason_is_its_first_sentence_on_one_line():
    """Cut at 200 characters, torch's reason for a damaged checkpoint ended "... your checkpoint file is"."""
    from dmhpc.errors import reason_of

    torch_says = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                  "internal miniz error. If you are seeing this error, there is a high likelihood that your "
                  "checkpoint file is corrupted.")
    assert reason_of(RuntimeError(torch_says)) == ("PytorchStreamReader failed reading zip archive: failed finding "
                                                   "central directory")
    assert reason_of(ValueError("line one\n  line two. No. 3 (v2.1.0) stays")) == "line one line two"
    assert reason_of(OSError("version 2.1. Stays whole as 2.1.0")) == "version 2.1"
    assert reason_of(KeyError()) == "KeyError" and reason_of(ValueError("x" * 300)) == "x" * 197 + "..."
    assert reason_of(FileNotFoundError("No such file: '/data/v2. Final/x.pt'. Check it")) == \
        "No such file: '/data/v2. Final/x.pt'"
