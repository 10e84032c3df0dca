"""What a run directory's JSON files hold, checked as they are read back: run.json, the evaluation
results (eval/*.json) and the records of metrics.jsonl. A hand-edited or foreign file fails here,
with the key and what was expected (RunDir adds the file's name and line), not as a TypeError in
whichever reader met it first, or as a silently wrong result.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from dmhpc.checks import is_int, is_number, is_real, show

FORMAT = "dmhpc-run"
VERSION = 1


def strict_json(value: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """JSON that any parser reads: a number that is not finite (an undefined metric, as a one-class
    split's ROC AUC or the precision of a model that predicts no merger) is null, not the bare NaN
    that JSON itself, strict parsers and JavaScript refuse. `default` converts what JSON has no
    type for (numpy's numbers and arrays), before the check."""
    def strict(v):
        if default is not None and not isinstance(v, (dict, list, tuple, str, int, float, bool, type(None))):
            v = default(v)
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v

    return json.dumps(strict(value), indent=indent, allow_nan=False)


def undefined_as_nan(record: dict) -> dict:
    """A result's or log record's metrics of each domain with null (an undefined metric, as
    `strict_json` writes it) read back as NaN, what the readers compute with."""
    def nan(tree):
        if isinstance(tree, dict):
            return {k: math.nan if v is None else nan(v) for k, v in tree.items()}
        return tree

    return {k: nan(v) if k in ("source", "target") else v for k, v in record.items()}


class Unfit(Exception):
    """What is wrong with a value read from a run's file; the reader adds the file's name."""


def _shown(value) -> str:
    text = show(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise Unfit(f"{key}: expected {expected}, got {_shown(value)}")


_HEX = re.compile(r"[0-9a-f]+")


def check_record(record: dict) -> None:
    """run.json as `RunDir.start` writes it. Without format or version: an older dmhpc's, read as
    this one's. Shape, mean and std were recorded together: one without the others is an edit."""
    found, version = record.get("format", FORMAT), record.get("version", VERSION)
    if found != FORMAT:
        raise Unfit(f"format {_shown(found)}: expected {FORMAT!r} (not a dmhpc run's record)")
    _expect(is_int(version, 1), "version", "a positive integer", version)
    if version > VERSION:
        raise Unfit(f"version {version}: this dmhpc reads version {VERSION} and older (written by "
                     f"{_shown(record.get('created_by', 'a newer dmhpc'))}); use that dmhpc")
    data = record.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise Unfit("data: expected a mapping of role to data set")
    for role, entry in data.items():
        key = f"data.{role}"
        if "path" in entry:
            _expect(isinstance(entry["path"], str), f"{key}.path", "a path", entry["path"])
        if "fingerprint" in entry:
            value = entry["fingerprint"]
            _expect(isinstance(value, str) and bool(_HEX.fullmatch(value)), f"{key}.fingerprint",
                    "a hexadecimal string", value)
        stats = [k for k in ("shape", "mean", "std") if k in entry]
        if not stats:
            continue
        if len(stats) < 3:
            missing = next(k for k in ("shape", "mean", "std") if k not in entry)
            raise Unfit(f"{key}: {', '.join(stats)} without {missing} (recorded together)")
        shape = entry["shape"]
        _expect(isinstance(shape, list) and len(shape) == 3 and all(is_int(v, 1) for v in shape),
                f"{key}.shape", "[C, H, W], three positive integers", shape)
        for name in ("mean", "std"):
            values = entry[name]
            # A list of another length broadcast against the images: one std for three channels
            # normalized every channel with it, and predict wrote probabilities of 0 and 1.
            _expect(isinstance(values, list) and len(values) == shape[0] and all(is_number(v) for v in values),
                    f"{key}.{name}", f"{shape[0]} finite numbers, one per channel", values)
        _expect(all(v > 0 for v in entry["std"]), f"{key}.std", "standard deviations above 0", entry["std"])
    if "run_id" in record:
        _expect(isinstance(record["run_id"], str) and bool(re.fullmatch(r"[0-9a-f]{32}", record["run_id"])),
                "run_id", "32 hexadecimal digits", record["run_id"])
    if "attempts" in record:
        attempts = record["attempts"]
        _expect(isinstance(attempts, dict) and set(attempts) == {"job", "started"}
                and (attempts["job"] is None or isinstance(attempts["job"], str))
                and isinstance(attempts["started"], list) and all(is_int(r, 0) for r in attempts["started"]),
                "attempts", "{job: a SLURM job id, torchrun-ID or null, started: its attempts' restart counts}",
                attempts)


def _check_metrics(metrics, key: str) -> None:
    """One domain's metrics (`dmhpc.train.metrics.domain_metrics`): numbers, NaN where undefined."""
    _expect(isinstance(metrics, dict), key, "a mapping of metric to number", metrics)
    for name, value in metrics.items():
        if name == "labelled":
            _expect(isinstance(value, bool), f"{key}.{name}", "true or false", value)
        elif name == "confusion":
            _expect(isinstance(value, list) and all(isinstance(row, list) and all(is_int(n, 0) for n in row)
                                                    for row in value), f"{key}.{name}", "rows of counts", value)
        else:
            _expect(value is None or is_real(value), f"{key}.{name}", "a number or null", value)


def check_checkpoint_info(info: dict, prefix: str = "") -> None:
    """A checkpoint as results, cards and titles describe it (`dmhpc.train.checkpoint.checkpoint_info`):
    the keys there have the types their readers take."""
    for key, ok, expected in (("name", lambda v: isinstance(v, str), "text"),
                              ("criterion", lambda v: v is None or isinstance(v, str), "text or null"),
                              ("score", lambda v: v is None or is_real(v), "a number or null"),
                              ("epoch", lambda v: v is None or is_int(v, 0), "an epoch number or null"),
                              ("step", lambda v: v is None or is_int(v, 0), "a step number or null"),
                              ("sha256", lambda v: isinstance(v, str) and bool(_HEX.fullmatch(v)),
                               "a hexadecimal SHA-256")):
        if key in info:
            _expect(ok(info[key]), f"{prefix}{key}", expected, info[key])


def check_result(result: dict) -> None:
    """An evaluation as `dmhpc.train.evaluate.evaluate_run` writes it. Keys are optional (an older
    dmhpc's file, or a test's); those there have the types the launchers, export and eval read."""
    if "split" in result:
        _expect(isinstance(result["split"], str), "split", "text", result["split"])
    for key in ("final", "oracle"):
        if key in result:
            _expect(isinstance(result[key], bool), key, "true or false", result[key])
    checkpoint = result.get("checkpoint", {})
    _expect(isinstance(checkpoint, dict), "checkpoint", "a mapping", checkpoint)
    check_checkpoint_info(checkpoint, "checkpoint.")
    data = result.get("data", {})
    _expect(isinstance(data, dict) and all(isinstance(v, str) for v in data.values()), "data",
            "a mapping of role to data-set path", data)
    for domain in ("source", "target"):
        if domain in result:
            _check_metrics(result[domain], domain)


def check_log_record(record: dict) -> None:
    """The fields of a metrics.jsonl record that dmhpc reads back (the plots of `dmhpc eval`, resume,
    tune's pruner, the validator and scaling tables), as the trainer writes them. An epoch record
    always held its epoch and step; the others are optional (a field added since, a test's log)."""
    def optional(key, ok, expected, within=record, name=None):
        if key in within:
            _expect(ok(within[key]), name or key, expected, within[key])

    def mapping(key, within=record):
        optional(key, lambda v: isinstance(v, dict), "a mapping", within)
        return within.get(key, {})

    optional("kind", lambda v: isinstance(v, str), "text")
    optional("step", lambda v: is_int(v, 0), "a step number")
    kind = record.get("kind")
    if kind == "epoch":
        for key in ("epoch", "step"):
            _expect(is_int(record.get(key), 0), key, "a number from 0", record.get(key))
        optional("steps", lambda v: is_int(v, 0), "a number of steps")
        optional("step_time_s", is_real, "a number of seconds")
        optional("last", lambda v: v is True, "true (training ended with this record) or no key")
        for term, value in mapping("loss").items():
            _expect(value is None or is_real(value), f"loss.{term}", "a number or null", value)
        for domain in ("source", "target"):
            for split, metrics in mapping(domain).items():
                _check_metrics(metrics, f"{domain}.{split}")
        selection = mapping("selection")
        optional("criterion", lambda v: isinstance(v, str), "text", selection, "selection.criterion")
        optional("score", lambda v: v is None or is_real(v), "a number or null", selection, "selection.score")
        for name, value in mapping("validators").items():
            _expect(value is None or is_real(value), f"validators.{name}", "a number or null", value)
    elif kind == "setup":
        optional("world_size", lambda v: is_int(v, 1), "a number of ranks")
        optional("loader", lambda v: isinstance(v, str), "text")
        optional("loader_setup_s", is_real, "a number of seconds")
        optional("resumed_from", lambda v: v is None or isinstance(v, str), "a checkpoint path or null")
