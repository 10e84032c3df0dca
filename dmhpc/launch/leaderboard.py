"""The leaderboard of a grid: OUT/leaderboard.csv and OUT/leaderboard.md, read from the run directories.

Runs are ranked by the score of their selected checkpoint (`select.criterion`, higher is better),
as the trainer recorded it with the test result of the selected checkpoint ("checkpoint"; the same as best.pt's
"selection"). Every criterion but "oracle-target-acc" is computed without target labels, so the
ranking is a choice a user could make without them. Target-domain test metrics are shown beside
it for reporting only: choosing a run by them uses the labels domain adaptation assumes unknown.
Runs selected with the oracle, or trained on the target data set itself (source and target one
set: its "source" validation labels are the target's), are marked and ranked apart from the others,
after them.
Scores of different criteria, or of different data (a grid over `data.target`), are not comparable:
runs are ranked within each criterion and pair of data sets. Equal scores share a rank (1, 1, 3);
a score that is not a finite number (a hand-edited result) is no score.

Unfinished points follow the finished ones, with the score of their best checkpoint so far.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping

from dmhpc.files import atomic_path, atomic_write
from dmhpc.launch.spec import Point, data_pair, short_names
from dmhpc.markdown import table
from dmhpc.run import RunDir
from dmhpc.names import CRITERIA, REPORTED_METRICS

REPORT_ONLY = "_reporting_only"  # suffix of the target columns in the CSV


def number(value) -> float:
    """A result's number, NaN where there is none (an unlabelled domain's accuracy, a missing score)
    or none that is finite (Infinity, or an integer of 400 digits, written into a result by hand)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return math.nan
    try:
        value = float(value)
    except OverflowError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _best_so_far(run: RunDir) -> dict:
    best = run.checkpoint("best")
    if not best.is_file():
        return {}
    import torch  # only for the score of an unfinished run's best checkpoint, memory-mapped

    from dmhpc.train.checkpoint import checkpoint_info

    try:
        state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        return checkpoint_info("best", state, best)
    except Exception:  # written at this moment, damaged or edited: the row just has no score yet
        return {}


def point_row(point: Point, failed: str | None = None) -> dict:
    """One leaderboard row: the point's values, status, selection and test metrics; "oracle" when
    target labels chose the checkpoint or trained the run."""
    row: dict = {"point": point.name, **{k: v for k, v in sorted(point.values.items())}}
    on_target = point.config.data.trains_on_target()
    # A result of a run that trained to another length than the point asks is no result of the point.
    result = point.run.read_result("best", "test") if point.finished else None
    if result is not None:
        selected = result.get("checkpoint", {})
        row.update(status="finished", criterion=selected.get("criterion"), score=number(selected.get("score")),
                   oracle=bool(result.get("oracle")) or on_target, epoch=selected.get("epoch"))
        for domain in ("source", "target"):
            for m in REPORTED_METRICS:
                row[f"{domain}_{m}"] = number(result.get(domain, {}).get(m))
    elif point.left_out:  # its run directory's checkpoints are of another configuration
        row.update(status="left out", criterion=point.config.select.criterion, score=math.nan,
                   oracle=CRITERIA.get(point.config.select.criterion, False) or on_target, epoch=None)
    else:
        selected = _best_so_far(point.run)
        status = "failed" if failed else ("unfinished" if point.run.checkpoint_dir.is_dir() else "not started")
        criterion = selected.get("criterion", point.config.select.criterion)
        row.update(status=status, criterion=criterion, score=number(selected.get("score")),
                   oracle=CRITERIA.get(criterion, False) or on_target, epoch=selected.get("epoch"))
    row["run_dir"] = str(point.run_dir)
    return row


STATUS_ORDER = ("finished", "unfinished", "failed", "not started", "left out")


def _order(row: dict):
    score = row["score"]
    # The oracle's rows after every label-free one: "oracle-target-acc" sorts before the label-free
    # criteria's names, and the oracle's runs headed the table a user chooses from without labels.
    return (STATUS_ORDER.index(row["status"]), row["oracle"], row["data"], row["criterion"] or "", math.isnan(score),
            0.0 if math.isnan(score) else -score, row["point"])


def leaderboard_rows(points: Iterable[Point], failed: Mapping[str, str] | None = None) -> list[dict]:
    """Rows in rank order; finished rows get a rank (1 = best) within their pair of data sets,
    criterion and oracle mark, equal scores the same rank."""
    failed = failed or {}
    points = list(points)
    pairs = {p.name: data_pair(p) for p in points}
    names = short_names(path for pair in pairs.values() for path in pair)
    rows = []
    for p in points:
        row = point_row(p, failed.get(p.name))
        row["data"] = " -> ".join(names[path] for path in pairs[p.name])
        rows.append(row)
    rows.sort(key=_order)
    seen: dict[tuple, tuple[int, float, int]] = {}  # group -> rows ranked so far, the last one's score and rank
    for row in rows:
        row["rank"] = None
        if row["status"] == "finished" and not math.isnan(row["score"]):
            group = (row["data"], row["criterion"], row["oracle"])
            count, last, rank = seen.get(group, (0, math.nan, 0))
            count += 1
            row["rank"] = rank if row["score"] == last else count
            seen[group] = (count, row["score"], row["rank"])
    return rows


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_leaderboard(out: Path, points: Iterable[Point], failed: Mapping[str, str] | None = None) -> list[dict]:
    """Write OUT/leaderboard.csv and OUT/leaderboard.md; return the rows."""
    points = list(points)
    rows = leaderboard_rows(points, failed)
    keys = sorted({k for p in points for k in p.values})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    columns = ["rank", "point", "status", "data", "criterion", "score", "oracle", "epoch", *keys,
               *(f"source_{m}" for m in REPORTED_METRICS), *(f"target_{m}{REPORT_ONLY}" for m in REPORTED_METRICS), "run_dir"]
    with atomic_path(out / "leaderboard.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            record = {c: row.get(c) for c in columns}
            record.update({f"target_{m}{REPORT_ONLY}": row.get(f"target_{m}") for m in REPORTED_METRICS})
            writer.writerow({c: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for c, v in record.items()})

    criteria = sorted({r["criterion"] for r in rows if r["criterion"]})
    lines = [f"# Leaderboard: {out}", "",
             f"Ranked by the selection score of each run's selected checkpoint ({', '.join(criteria)}; higher "
             "is better), measured on validation data without target labels unless the row is marked "
             "oracle.",
             "Target-domain test metrics (†) are for reporting only: choosing a run by them uses the target "
             "labels that domain adaptation assumes unknown."]
    pairs = sorted({r["data"] for r in rows})
    if len(criteria) > 1 or len(pairs) > 1:
        lines.append("Scores of different criteria or data are not comparable: runs are ranked within each "
                     "criterion and pair of data sets (source -> target).")
    if any(r["oracle"] for r in rows):
        lines.append("Runs marked oracle (chosen by target labels, or trained on the target data set) are ranked "
                     "apart from the others, after them.")
    if any(r["status"] == "left out" for r in rows):
        lines.append("Runs left out: their run directories no longer fit the file (another configuration, more "
                     "epochs than it asks, data changed since); the report that wrote this named each and why.")
    data = len(pairs) > 1
    header = ["rank", "point", *(["data"] if data else []), "criterion", "score", "epoch", "source acc",
              "source AUC", "target acc †", "target AUC †", "target F1 †", "status"]
    cells = ([_fmt(r["rank"]), r["point"], *([r["data"]] if data else []),
              (r["criterion"] or "") + (" (oracle)" if r["oracle"] else ""), _fmt(r["score"]), _fmt(r["epoch"]),
              *(_fmt(r.get(k), 3) for k in ("source_accuracy", "source_roc_auc", "target_accuracy", "target_roc_auc",
                                            "target_f1")), r["status"]] for r in rows)
    lines += ["", *table(header, cells)]
    atomic_write(out / "leaderboard.md", "\n".join(lines) + "\n")
    return rows
