"""Mean ± standard deviation over seeds of a grid's finished runs: OUT/summary.csv and OUT/summary.md.

Runs whose values differ only in `seed` form a group (in a study the method is one of the values),
kept in launch order. Each group gets the mean and sample standard deviation of the test metrics
of its finished runs, and the target accuracy of each seed. A study with `gap: {from: A, to: B}`
also gets "gap closed": (target acc − A's) / (B's − A's) on the means over the seeds the row and
both ends finished, A and B taken from the groups of the same other grid values (model.name, say),
data target and model, whichever set them (a method's overrides may); where there are none, the
gap is blank. Test metrics of both domains are read
with the test result of each run's selected checkpoint; none of them chose a checkpoint unless the
run is marked oracle.

A run trained on the target domain (data.source = data.target, as a target oracle is) has no
separate source domain: its "source" columns are target-domain figures and the table says so.
An unlabelled target (a survey) has no target accuracy, AUC, F1 or Brier score: those cells stay
empty.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Iterable

from dmhpc.files import atomic_path, atomic_write
from dmhpc.launch.leaderboard import number
from dmhpc.launch.spec import Point, data_pair, short_names
from dmhpc.markdown import table
from dmhpc.names import DOMAINS, REPORTED_METRICS

LABELS = {"accuracy": "acc", "roc_auc": "AUC", "f1": "F1", "brier": "Brier"}
MD_COLUMNS = tuple((d, m, f"{d} {LABELS[m]}") for d in DOMAINS for m in REPORTED_METRICS)


def _group_key(point: Point) -> tuple:
    return tuple((k, json.dumps(v)) for k, v in point.values.items() if k != "seed")


def _per_seed(row: dict) -> str:
    """Markdown: each seed's target accuracy; the seeds without one (an unlabelled target) left out."""
    return ", ".join(f"{a:.3f} (seed {s})" for s, a in zip(row["seeds"], row["target_accuracy_per_seed"])
                     if not math.isnan(a))


def _csv_list(values: list) -> str:
    """A list as one CSV cell, space-separated; a NaN among numbers is "n/a", so the entries stay
    aligned with the seeds column; all NaN (an unlabelled target) is an empty cell."""
    nan = [isinstance(v, float) and math.isnan(v) for v in values]
    return "" if values and all(nan) else " ".join("n/a" if n else str(v) for v, n in zip(values, nan))


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std, how many) over the seeds whose metric is defined: a NaN (an AUC of a test
    split with one class) blanked every seed's mean, and statistics.stdev raised on it, losing the
    whole summary."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def trained_the_old_way(point: Point) -> bool:
    """A finished run without adaptation of a dmhpc before 2026-12-03: its steps passed the target
    batch through BatchNorm with the source's (partly adapted), where this dmhpc passes the source
    alone; its best.pt records no `forward`. Its numbers are another baseline than a run of now."""
    if point.config.loss.reads_target() or point.config.data.trains_on_target():
        return False  # (an oracle's "target" batch was of its own data set: no other domain in BatchNorm)
    import torch  # only for such runs' best checkpoints, memory-mapped

    try:
        state = torch.load(point.run.checkpoint("best"), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # none, or written at this moment: nothing to say
        return False
    return isinstance(state, dict) and "forward" not in state


def summary_rows(points: Iterable[Point], gap: tuple[str, str] | None = None) -> list[dict]:
    """One row per group of runs that differ only in seed; see the module docstring."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(_group_key(p), []).append(p)
    pairs = {key: data_pair(members[0]) for key, members in groups.items()}
    names = short_names(path for pair in pairs.values() for path in pair)
    rows = []
    for key, members in groups.items():
        results = [(p.values.get("seed"), result) for p in members
                   if p.finished and (result := p.run.read_result("best", "test")) is not None]
        row: dict = {k: v for k, v in members[0].values.items() if k != "seed"}
        row.update(data=" -> ".join(names[path] for path in pairs[key]), model=members[0].config.model.name,
                   runs=len(members), finished=len(results),
                   seeds=[seed for seed, _ in results],
                   oracle=any(r.get("oracle") for _, r in results),
                   trained_on_target=members[0].config.data.trains_on_target(),
                   target_through_batchnorm=any(trained_the_old_way(p) for p in members if p.finished))
        for domain in DOMAINS:
            for m in REPORTED_METRICS:
                values = [number(r.get(domain, {}).get(m)) for _, r in results]
                row[f"{domain}_{m}_mean"], row[f"{domain}_{m}_std"], row[f"{domain}_{m}_n"] = _mean_std(values)
        # NaN where a result has no target accuracy: an unlabelled target (a survey) has none.
        row["target_accuracy_per_seed"] = [number(r.get("target", {}).get("accuracy")) for _, r in results]
        rows.append(row)
    if gap:
        # A method's row is measured against the gap's ends with the same other values, over the
        # seeds all three finished: means over other seeds (a seed of the row still running, one of
        # an end failed) gave 150 % of a gap every seed closed by 25 %. The same other values include
        # the data target and model the runs resolved to: a method whose overrides set data.target
        # (or model.name) was measured against the ends of another target's.
        others = [(tuple((k, v) for k, v in key if k != "method"), pairs[key][1], members[0].config.model.name)
                  for key, members in groups.items()]
        per_seed = {(row["method"], other): {s: a for s, a in zip(row["seeds"], row["target_accuracy_per_seed"])
                                             if not math.isnan(a)}
                    for row, other in zip(rows, others)}
        for row, other in zip(rows, others):
            mine, low, high = (per_seed.get((method, other), {}) for method in (row["method"], *gap))
            common = [s for s in mine if s in low and s in high]
            row["gap_closed"] = _gap_closed(*([statistics.fmean(d[s] for s in common) for d in (mine, low, high)]
                                              if common else [math.nan] * 3))
            row["gap_closed_n"] = len(common)
    return rows


def _gap_closed(value: float, low: float, high: float) -> float:
    """The share of the way from `low` to `high` that `value` went; NaN where `high` is not above
    `low` (an oracle no better than the baseline has no gap to close: -450 % was shown)."""
    return (value - low) / (high - low) if high > low else math.nan


def _cell(mean: float, std: float, n: int, finished: int) -> str:
    """Mean ± std, and over how many runs where not over every finished one (a metric undefined in
    some: the row's finished count would pass for this cell's)."""
    if math.isnan(mean):
        return ""
    cell = f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return cell + (f" (n={n})" if n < finished else "")


def remove_stale(out: Path, names: tuple[str, ...], why: str) -> None:
    """Remove tables an earlier version of the grid wrote that this one writes none of: left beside the
    new leaderboard, they looked current."""
    gone = [name for name in names if (out / name).is_file()]
    for name in gone:
        (out / name).unlink()
    if gone:
        print(f"dmhpc launch: removed {', '.join(str(out / n) for n in gone)}: {why}", flush=True)


def write_summary(out: Path, points: Iterable[Point], gap: tuple[str, str] | None = None) -> list[dict]:
    """Write OUT/summary.csv and OUT/summary.md when the runs vary in seed; return the rows ([] if not)."""
    points = list(points)
    if not any("seed" in p.values for p in points):
        remove_stale(Path(out), ("summary.md", "summary.csv"), "the grid no longer varies the seed")
        return []
    rows = summary_rows(points, gap)
    keys = [k for k in points[0].values if k != "seed"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    columns = [*keys, "data", "model", "runs", "finished", "seeds", "oracle", "trained_on_target",
               "target_through_batchnorm",
               *(f"{d}_{m}_{s}" for d in DOMAINS for m in REPORTED_METRICS for s in ("mean", "std", "n")),
               "target_accuracy_per_seed", *(["gap_closed", "gap_closed_n"] if gap else [])]
    with atomic_path(out / "summary.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if isinstance(row[c], float) and math.isnan(row[c])
                                 else _csv_list(row[c]) if isinstance(row[c], list) else row[c])
                             for c in columns})

    lines = [f"# Summary over seeds: {out}", "",
             "Mean ± sample standard deviation of the test metrics over the finished runs of each row "
             "(seeds listed last). Every checkpoint was chosen without target labels unless the row says "
             "oracle; target metrics are reported, never used for selection."]
    if gap:
        lines.append(f"Gap closed: (target acc − {gap[0]}) / ({gap[1]} − {gap[0]}), on the means over the seeds "
                     "that the row and both ends finished (n=: over fewer seeds than the row finished), with the "
                     "ends of the same other values, data target and model (blank where there are none).")
    if any(r["trained_on_target"] for r in rows):
        lines.append("Rows marked (trained on target) have no separate source domain: their source columns "
                     "are left empty.")
    if any(r["target_through_batchnorm"] for r in rows):
        lines.append("Rows marked (target through BatchNorm) hold runs without a term that reads the target "
                     "(no adaptation, or the Fisher loss alone) that a dmhpc before 2026-12-03 trained: their steps "
                     "passed the target batch through BatchNorm with the source's, so they were partly adapted; "
                     "run them again into a new out.")
    # A row of another target than its neighbours' (a method's overrides can set it): said, as its
    # gap is measured against that target's ends.
    data = len({data_pair(p)[1] for p in points}) > 1
    # Likewise a model the grid does not vary (a method's overrides set it): a blank gap says why.
    model = "model.name" not in keys and len({p.config.model.name for p in points}) > 1
    header = [*keys, *(["data"] if data else []), *(["model"] if model else []), "runs",
              *(label for _, _, label in MD_COLUMNS),
              *(["gap closed"] if gap else []), "target acc per seed"]
    cells_of = []
    for r in rows:
        names = [str(r[k]) for k in keys]
        marks = [m for m, on in (("oracle selection", r["oracle"]), ("trained on target", r["trained_on_target"]),
                                 ("target through BatchNorm", r["target_through_batchnorm"])) if on]
        runs = f"{r['finished']}/{r['runs']}"
        # A seed-only grid has no key column: the marks go with the run count.
        if marks and names:
            names[0] += f" ({', '.join(marks)})"
        elif marks:
            runs += f" ({', '.join(marks)})"
        cells = [*names, *([r["data"]] if data else []), *([r["model"]] if model else []), runs]
        for domain, m, _ in MD_COLUMNS:
            skip = domain == "source" and r["trained_on_target"]
            cells.append("" if skip else _cell(r[f"{domain}_{m}_mean"], r[f"{domain}_{m}_std"], r[f"{domain}_{m}_n"],
                                                   r["finished"]))
        if gap:
            # over the seeds that both ends finished too: n= where fewer, as for a metric's mean
            n = r["gap_closed_n"]
            cells.append("" if math.isnan(r["gap_closed"]) else
                         f"{r['gap_closed']:.0%}" + (f" (n={n})" if n < r["finished"] else ""))
        cells.append(_per_seed(r))
        cells_of.append(cells)
    lines += ["", *table(header, cells_of)]
    atomic_write(out / "summary.md", "\n".join(lines) + "\n")
    return rows
