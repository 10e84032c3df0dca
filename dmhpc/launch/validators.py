"""How well label-free model selection does on a study: OUT/validators.csv and OUT/validators.md.

On a real survey there are no target labels to choose a checkpoint with, so a study checks the
label-free criteria where it can: runs trained with `select.all_validators: true` score every
label-free criterion (dmhpc.names.LABEL_FREE) at every evaluation and record the target's test
accuracy beside them, for reporting only. For each domain pair (data.source -> data.target) and
criterion, the table gives, over the finished runs not trained on the target (as the summary:
a run that failed, is still training, or is asked to train longer is left out):

- checkpoint: the target test accuracy of the epoch the criterion picks in each run, the same for
  the oracle's pick (the highest target *validation* accuracy), and the loss in points (oracle
  minus criterion), averaged over runs;
- method: among the methods of one setting (the same seed and other values), the run whose picked
  checkpoint scores highest, its target test accuracy against the oracle's choice of run, and the
  loss in points, averaged over the settings whose every method has a scored run (the others are
  named); the method picked most often;
- the Spearman rank correlation of the criterion with target test accuracy over every checkpoint
  of every run, and its mean within a run.

Musgrave, Belongie & Lim (arXiv:2111.15672, 2208.07360): validators often track target accuracy
poorly, and the choice of validator moves results more than the choice of method; report both views.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Iterable

from dmhpc.files import atomic_path, atomic_write
from dmhpc.launch.leaderboard import number
from dmhpc.launch.spec import Point, data_pair, short_names
from dmhpc.launch.summary import remove_stale
from dmhpc.markdown import table
from dmhpc.names import CRITERIA, LABEL_FREE

ORACLE = "oracle (target val acc)"
COLUMNS = ("pair", "criterion", "runs", "checkpoints", "checkpoint_target_acc", "checkpoint_oracle_acc",
           "checkpoint_loss_points", "method_target_acc", "method_oracle_acc", "method_loss_points",
           "method_picked", "spearman_all", "spearman_within_run")


def _checkpoints(point: Point) -> list[dict]:
    """The run's evaluations that scored every validator: {criterion: score, ..., ORACLE, "test"}."""
    out = []
    for r in point.run.read_log():
        if r.get("kind") != "epoch" or "validators" not in r:
            continue
        test = r.get("target", {}).get("test", {}).get("accuracy")
        oracle = r.get("target", {}).get("val", {}).get("accuracy")
        if not isinstance(test, (int, float)) or not isinstance(oracle, (int, float)):
            continue  # an unlabelled target: nothing to check the validators against
        # A score the log holds as null (NaN as jq writes it) is NaN here, as the trainer wrote it.
        scores = {k: number(v) for k, v in r["validators"].items()} if isinstance(r["validators"], dict) else {}
        out.append({**scores, ORACLE: oracle, "test": test, "epoch": r["epoch"]})
    return out


def _pick(checkpoints: list[dict], criterion: str) -> dict | None:
    """The checkpoint with the highest finite score (the first of equals: the trainer keeps the first)."""
    scored = [c for c in checkpoints if isinstance(c.get(criterion), (int, float)) and math.isfinite(c[criterion])]
    return max(scored, key=lambda c: c[criterion]) if scored else None


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _setting(p: Point) -> tuple:
    """What a point's run shares with the other methods' runs of its setting (seed, other values)."""
    return tuple((k, str(v)) for k, v in p.values.items() if k != "method")


def _method(p: Point) -> str:
    return str(p.values.get("method", p.name))


def _scored_runs(points: Iterable[Point]) -> tuple[dict, list[str], dict]:
    """The finished runs of an adaptation, by domain pair, with their scored checkpoints; the
    finished runs left out, each with why (said in the table: a run whose log was lost counted as
    none without a word, and the table stood for fewer runs than it seemed to); and the methods each
    setting of each pair holds, finished or not ({pair: {setting: {method}}})."""
    # Keyed by the resolved data paths: different data sets in folders of the same name are
    # different pairs, and one data set written two ways ("data/x", "./data/x") is one.
    runs: dict[tuple[Path, Path], list[tuple[Point, list[dict]]]] = {}
    left_out = []
    methods: dict[tuple[Path, Path], dict[tuple, set[str]]] = {}
    for p in points:
        if p.config.data.trains_on_target():
            continue  # a target oracle has no source domain to adapt from
        if CRITERIA.get(p.config.select.criterion):
            # Its early stopping was by target labels, so its checkpoints too; and its picks beside
            # the label-free runs' were under "never to choose".
            if p.finished:
                left_out.append(f"{p.name} (chosen with target labels: select.criterion "
                                f"{p.config.select.criterion})")
            continue
        methods.setdefault(data_pair(p), {}).setdefault(_setting(p), set()).add(_method(p))
        if not p.finished:
            continue  # failed, still training, or asked to train longer: not a run's whole history
        checkpoints = _checkpoints(p)
        if checkpoints:
            runs.setdefault(data_pair(p), []).append((p, checkpoints))
        elif not p.run.log_path.is_file():
            left_out.append(f"{p.name} (no {p.run.log_path.name})")
        else:
            scored = any(r.get("kind") == "epoch" and "validators" in r for r in p.run.read_log())
            why = "an unlabelled target" if scored else "no evaluation scored every validator"
            left_out.append(f"{p.name} ({why})")
    return runs, left_out, methods


def validator_rows(points: Iterable[Point]) -> list[dict]:
    """One row per (domain pair, criterion); see the module docstring. [] when no run scored validators."""
    runs, _, methods = _scored_runs(points)
    return _rows(runs, methods)[0]


def _rows(runs: dict, methods: dict) -> tuple[list[dict], list[str]]:
    """The rows, and the settings the method columns leave out: a method of theirs has no scored
    run (unfinished, failed, left out). Chosen among the others, a setting credited a method that
    never met the missing one, and its loss was that of a smaller choice."""
    names = short_names(path for pair in runs for path in pair)
    rows, incomplete = [], []
    for (source, target), members in runs.items():
        pair = f"{names[source]} -> {names[target]}"
        settings: dict[tuple, list[tuple[Point, list[dict]]]] = {}
        for p, checkpoints in members:
            settings.setdefault(_setting(p), []).append((p, checkpoints))
        for key, setting in list(settings.items()):
            missing = methods[(source, target)][key] - {_method(p) for p, _ in setting}
            if missing and len(methods[(source, target)][key]) > 1:
                said = ", ".join(f"{k}={v}" for k, v in key) or "its one setting"
                incomplete.append(f"{pair}: {said} (no scored run of {', '.join(sorted(missing))})")
                del settings[key]
        for criterion in (*LABEL_FREE, ORACLE):
            chosen, oracle_chosen, within = [], [], []
            xs, ys = [], []
            for _, checkpoints in members:
                pick, best = _pick(checkpoints, criterion), _pick(checkpoints, ORACLE)
                if pick is not None and best is not None:
                    chosen.append(pick["test"])
                    oracle_chosen.append(best["test"])
                scored = [c for c in checkpoints if math.isfinite(c.get(criterion, math.nan))]
                xs += [c[criterion] for c in scored]
                ys += [c["test"] for c in scored]
                within.append(_spearman([c[criterion] for c in scored], [c["test"] for c in scored]))
            method_acc, method_oracle, picked = [], [], Counter()
            for setting in settings.values():
                if len(setting) < 2:
                    continue  # one method: nothing to choose between
                picks = [(p, _pick(c, criterion), _pick(c, ORACLE)) for p, c in setting]
                picks = [(p, a, b) for p, a, b in picks if a is not None and b is not None]
                if not picks:
                    continue
                p_c, a_c, _ = max(picks, key=lambda t: t[1][criterion])
                _, _, b_o = max(picks, key=lambda t: t[2][ORACLE])
                method_acc.append(a_c["test"])
                method_oracle.append(b_o["test"])
                picked[str(p_c.values.get("method", p_c.name))] += 1
            row = {
                "pair": pair, "criterion": criterion, "runs": len(members),
                "checkpoints": len(xs),
                "checkpoint_target_acc": _mean(chosen), "checkpoint_oracle_acc": _mean(oracle_chosen),
                "method_target_acc": _mean(method_acc), "method_oracle_acc": _mean(method_oracle),
                "method_picked": ", ".join(f"{m} ({n})" for m, n in picked.most_common()),
                "spearman_all": _spearman(xs, ys), "spearman_within_run": _mean(within),
            }
            row["checkpoint_loss_points"] = 100 * (row["checkpoint_oracle_acc"] - row["checkpoint_target_acc"])
            row["method_loss_points"] = 100 * (row["method_oracle_acc"] - row["method_target_acc"])
            rows.append(row)
    return rows, incomplete


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_validators(out: Path, points: Iterable[Point]) -> list[dict]:
    """Write OUT/validators.csv and OUT/validators.md when any run scored every validator."""
    runs, left_out, methods = _scored_runs(points)
    rows, incomplete = _rows(runs, methods)
    if not rows:
        why = "no finished run has scored checkpoints to compare" + (f" ({'; '.join(left_out)})" if left_out else "")
        remove_stale(Path(out), ("validators.md", "validators.csv"), why)
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "validators.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({c: _fmt(r[c], 6) for c in COLUMNS} for r in rows)
    lines = [f"# Label-free selection against the oracle: {out}", "",
             "Target test accuracy of the checkpoint each criterion picks in each run (mean over runs), of the "
             "run it picks among the methods of one seed (mean over seeds), and the oracle's picks (highest "
             "target validation accuracy); loss = oracle − criterion, in points. ρ: Spearman rank "
             "correlation of the criterion with target test accuracy over all checkpoints, and its mean "
             "within a run. Target labels were used for this table only, never to train or choose.", ""]
    stopped = sorted({f"{p.config.select.criterion}" for pair in runs.values() for p, _ in pair
                      if p.config.train.early_stopping})
    if stopped:
        lines += [f"Runs may stop early (train.early_stopping) by their own select.criterion ({', '.join(stopped)}): "
                  f"a criterion is compared over the checkpoints trained before such a stop, never later ones.", ""]
    if left_out:
        lines += [f"Left out, finished but not compared: {'; '.join(left_out)}.", ""]
    if incomplete:
        lines += [f"Left out of the method columns, a method short: {'; '.join(incomplete)}.", ""]
    header = ["pair", "criterion", "runs", "checkpoints", "checkpoint: target acc", "oracle", "loss (pts)",
              "method: target acc", "oracle", "loss (pts)", "methods picked", "ρ all", "ρ within run"]
    lines += table(header, ([
        r["pair"], r["criterion"], r["runs"], r["checkpoints"], _fmt(r["checkpoint_target_acc"]),
        _fmt(r["checkpoint_oracle_acc"]), _fmt(r["checkpoint_loss_points"], 1), _fmt(r["method_target_acc"]),
        _fmt(r["method_oracle_acc"]), _fmt(r["method_loss_points"], 1), r["method_picked"],
        _fmt(r["spearman_all"], 2), _fmt(r["spearman_within_run"], 2)] for r in rows))
    atomic_write(out / "validators.md", "\n".join(lines) + "\n")
    return rows
