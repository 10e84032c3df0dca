"""The tables of a grid or study: the leaderboard (dmhpc/launch/leaderboard.py) and the per-method
summary over seeds with the gap closed (dmhpc/launch/summary.py)."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from tests.conftest import TINY, study_spec
from dmhpc.errors import DmhpcError
from dmhpc.launch import load_grid, summary_rows, write_leaderboard, write_summary


def _finished(point, score, target_acc, criterion="source-val-acc", oracle=False):
    metrics = {m: 0.5 for m in ("accuracy", "precision", "recall", "f1", "roc_auc", "brier")}
    result = {"split": "test", "checkpoint": {"name": "best", "epoch": 3, "step": 30, "criterion": criterion,
                                               "score": score},
              "oracle": oracle, "source": {**metrics, "accuracy": 0.9}, "target": {**metrics, "accuracy": target_acc}}
    (point.run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (point.run_dir / "eval" / "best_test.json").write_text(json.dumps(result))


def test_leaderboard_ranks_by_selection_score_and_marks_oracle_and_unfinished(tmp_path):
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local",
            "grid": {"seed": [0, 1, 2, 3, 4], "select.criterion": ["source-val-acc", "oracle-target-acc"]}}
    points = {p.name: p for p in load_grid(spec).points}
    name = lambda seed, c="source-val-acc": f"seed={seed},select.criterion={c}"  # noqa: E731
    _finished(points[name(0)], 0.80, 0.95)   # best target accuracy, but not the best selection score
    _finished(points[name(1)], 0.90, 0.60)
    _finished(points[name(2)], 0.85, 0.70)
    _finished(points[name(0, "oracle-target-acc")], 0.99, 0.99, "oracle-target-acc", oracle=True)
    unfinished = points[name(3)].run_dir / "checkpoints"
    unfinished.mkdir(parents=True)
    # As the trainer writes it since its progress rolls over: it resumes at epoch 2, its weights are epoch 1's.
    torch.save({"model": {}, "epoch": 2, "progress": {"epoch": 2, "step_in_epoch": 0},
                "selection": {"criterion": "source-val-acc", "score": 0.97, "epoch": 1}}, unfinished / "best.pt")
    rows = write_leaderboard(tmp_path, points.values(), failed={name(4): "job 7 failed"})

    # The label-free runs first: the oracle's criterion sorts before theirs, and its run headed the table.
    assert [(r["point"], r["rank"], r["status"]) for r in rows[:5]] == [
        (name(1), 1, "finished"), (name(2), 2, "finished"), (name(0), 3, "finished"),
        (name(0, "oracle-target-acc"), 1, "finished"),
        (name(3), None, "unfinished")]
    assert rows[4]["score"] == 0.97 and rows[4]["epoch"] == 1
    assert {r["status"] for r in rows[5:]} == {"failed", "not started"}
    with (tmp_path / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == [r["point"] for r in rows]
    assert table[0]["score"] == "0.9" and table[0]["target_accuracy_reporting_only"] == "0.6"
    assert table[3]["oracle"] == "True" and table[0]["oracle"] == "False"
    assert table[0]["seed"] == "1" and table[0]["select.criterion"] == "source-val-acc"
    md = (tmp_path / "leaderboard.md").read_text()
    assert "target acc †" in md and "for reporting only" in md and "ranked within each criterion" in md
    assert f"| 1 | {name(1)} | source-val-acc | 0.9000 | 3 | 0.900 | 0.500 | 0.600 |" in md
    assert f"| 1 | {name(0, 'oracle-target-acc')} | oracle-target-acc (oracle) | 0.9900 |" in md


def test_the_run_after_equal_scores_takes_the_rank_its_place_gives(tmp_path):
    """Competition ranking, as the docstring says: 0.9, 0.9, 0.8 rank 1, 1, 3 (not 1, 1, 2)."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local", "grid": {"seed": [0, 1, 2, 3]}}
    points = load_grid(spec).points
    for point, score in zip(points, (0.9, 0.8, 0.9, 0.7)):
        _finished(point, score, 0.5)
    rows = write_leaderboard(tmp_path, points)
    assert [(r["point"], r["rank"]) for r in rows] == [("seed=0", 1), ("seed=2", 1), ("seed=1", 3), ("seed=3", 4)]


def test_leaderboard_ranks_within_each_pair_of_data_sets_and_apart_from_runs_trained_on_the_target(tmp_path):
    """A grid over data.target ranked the scores of two surveys in one list, and a run trained on
    the target itself (its "source" validation labels the target's) first among the label-free runs."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local",
            "overrides": {"data.source": "sims/pristine"},
            "grid": {"seed": [0, 1], "data.target": ["a/noisy", "b/noisy", "./sims/pristine"]}}
    points = {p.name: p for p in load_grid(spec).points}
    by_values = {(p.values["seed"], p.values["data.target"]): p.name for p in points.values()}
    name = lambda seed, target: by_values[seed, target]  # noqa: E731
    scores = {name(0, "a/noisy"): 0.7, name(1, "a/noisy"): 0.8, name(0, "b/noisy"): 0.6, name(1, "b/noisy"): 0.6,
              name(0, "./sims/pristine"): 0.99, name(1, "./sims/pristine"): 0.98}
    for point_name, score in scores.items():
        _finished(points[point_name], score, 0.5)
    rows = write_leaderboard(tmp_path, points.values())
    ranks = {r["point"]: (r["data"], r["rank"], r["oracle"]) for r in rows}
    assert ranks == {
        name(1, "a/noisy"): ("pristine -> a/noisy", 1, False), name(0, "a/noisy"): ("pristine -> a/noisy", 2, False),
        # Equal scores share a rank.
        name(0, "b/noisy"): ("pristine -> b/noisy", 1, False), name(1, "b/noisy"): ("pristine -> b/noisy", 1, False),
        name(0, "./sims/pristine"): ("pristine -> pristine", 1, True),
        name(1, "./sims/pristine"): ("pristine -> pristine", 2, True)}
    md = (tmp_path / "leaderboard.md").read_text()
    assert "ranked within each criterion and pair of data sets" in md and "ranked apart from the others" in md
    assert f"| 1 | {name(0, './sims/pristine')} | pristine -> pristine | source-val-acc (oracle) | 0.9900 |" in md
    # A score edited to Infinity (or past a float) is no score, not the best.
    for point_name, score in ((name(0, "a/noisy"), "Infinity"), (name(1, "a/noisy"), "1" + "0" * 400)):
        path = points[point_name].run_dir / "eval" / "best_test.json"
        path.write_text(re.sub(r'"score": [0-9.]+', f'"score": {score}', path.read_text()))
    rows = write_leaderboard(tmp_path, points.values())
    assert [r["rank"] for r in rows if r["point"] in (name(0, "a/noisy"), name(1, "a/noisy"))] == [None, None]
    # The summary's means skip such a metric (its 400 digits raised OverflowError).
    path = points[name(0, "a/noisy")].run_dir / "eval" / "best_test.json"
    path.write_text(path.read_text().replace('"accuracy": 0.9', '"accuracy": 1' + "0" * 400))
    row = next(r for r in summary_rows(points.values()) if r["data.target"] == "a/noisy")
    assert (row["source_accuracy_mean"], row["source_accuracy_n"]) == (0.9, 1)


def test_leaderboard_columns_scores_without_a_number_and_unfinished_oracles(tmp_path):
    """Every metric of the fixtures above is 0.5 (columns swapped went unseen), and none had a
    negative score (DEV's), a finished run without a score, or an unfinished oracle run."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local",
            "grid": {"seed": [0, 1, 2, 3], "select.criterion": ["dev", "oracle-target-acc"]}}
    points = {p.name: p for p in load_grid(spec).points}
    name = lambda seed, c="dev": f"seed={seed},select.criterion={c}"  # noqa: E731
    for seed, score in ((0, -0.2), (1, -0.1), (2, math.nan)):
        result = {"split": "test", "oracle": False,
                  "checkpoint": {"name": "best", "epoch": 3, "step": 30, "criterion": "dev", "score": score},
                  "source": {"accuracy": 0.91, "roc_auc": 0.92, "f1": 0.93},
                  "target": {"accuracy": 0.61, "roc_auc": 0.62, "f1": 0.63}}
        (points[name(seed)].run_dir / "eval").mkdir(parents=True)
        (points[name(seed)].run_dir / "eval" / "best_test.json").write_text(json.dumps(result))
    unfinished = points[name(3, "oracle-target-acc")].run_dir / "checkpoints"
    unfinished.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 2, "progress": {"epoch": 2, "step_in_epoch": 0},
                "selection": {"criterion": "oracle-target-acc", "score": 0.7, "epoch": 1}}, unfinished / "best.pt")
    rows = write_leaderboard(tmp_path, points.values())
    dev = [(r["point"], r["rank"]) for r in rows if r["criterion"] == "dev" and r["status"] == "finished"]
    assert dev == [(name(1), 1), (name(0), 2), (name(2), None)]  # the higher (less negative) first; NaN last, unranked
    oracle = next(r for r in rows if r["point"] == name(3, "oracle-target-acc"))
    assert oracle["status"] == "unfinished" and oracle["oracle"] is True
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"| 1 | {name(1)} | dev | -0.1000 | 3 | 0.910 | 0.920 | 0.610 | 0.620 | 0.630 | finished |" in md
    assert f"| {name(3, 'oracle-target-acc')} | oracle-target-acc (oracle) | 0.7000 |" in md


def test_an_edited_result_stops_the_tables_in_one_line_not_a_run_left_out(tmp_path):
    """A source accuracy as text was NaN to the leaderboard: the run went unranked, without a word;
    a criterion as a number was a TypeError in its markdown."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local", "grid": {"seed": [0, 1]}}
    first, second = load_grid(spec).points
    _finished(first, 0.8, 0.7)
    _finished(second, 0.9, 0.6)
    path = second.run_dir / "eval" / "best_test.json"
    result = json.loads(path.read_text())
    for key, value, message in (("source", {**result["source"], "accuracy": "0.9"}, 'source.accuracy: expected a '
                                 'number or null, got "0.9"'),
                                ("checkpoint", {**result["checkpoint"], "criterion": 5},
                                 "checkpoint.criterion: expected text or null, got 5")):
        path.write_text(json.dumps({**result, key: value}))
        said = f"{path}: {message}; remove it and run the trainer again (--resume auto tests its selection)"
        with pytest.raises(DmhpcError, match=f"^{re.escape(said)}$"):
            write_leaderboard(tmp_path, [first, second])


def test_summary_is_mean_and_spread_over_seeds_with_the_gap_closed(tmp_path):
    spec = study_spec(tmp_path, grid={"seed": [1, 2, 3], "model.name": ["deepmerge", "deepmerge2"]})
    points = {p.name: p for p in load_grid(spec).points}
    target = {"plain": (0.50, 0.52, 0.54), "mmd": (0.60, 0.70, 0.80), "oracle": (0.80, 0.80, 0.80)}
    for method, accs in target.items():
        for seed, acc in zip((1, 2, 3), accs):
            if (method, seed) != ("mmd", 3):  # one run of mmd not finished
                _finished(points[f"{method}/model.name=deepmerge,seed={seed}"], 0.5, acc)
    rows = write_summary(tmp_path, points.values(), gap=("plain", "oracle"))
    assert [(r["method"], r["model.name"], r["finished"], r["runs"]) for r in rows] == [
        ("plain", "deepmerge", 3, 3), ("plain", "deepmerge2", 0, 3), ("mmd", "deepmerge", 2, 3),
        ("mmd", "deepmerge2", 0, 3), ("oracle", "deepmerge", 3, 3), ("oracle", "deepmerge2", 0, 3)]
    plain, mmd, oracle = rows[0], rows[2], rows[4]
    assert plain["target_accuracy_mean"] == pytest.approx(0.52)
    assert plain["target_accuracy_std"] == pytest.approx(0.02)  # sample standard deviation
    assert mmd["seeds"] == [1, 2] and mmd["target_accuracy_per_seed"] == [0.60, 0.70]
    # over the seeds mmd finished (1, 2): the baseline's mean of those, 0.51, not of all three
    assert mmd["gap_closed"] == pytest.approx((0.65 - 0.51) / (0.80 - 0.51))
    assert (plain["gap_closed"], oracle["gap_closed"]) == (0.0, 1.0)
    assert oracle["target_accuracy_std"] == 0.0
    assert math.isnan(rows[1]["gap_closed"]) and math.isnan(rows[1]["target_accuracy_mean"])
    md = (tmp_path / "summary.md").read_text()
    assert "| mmd | deepmerge | 2/3 | 0.900 ± 0.000 |" in md
    assert "0.650 ± 0.071 |" in md and "| 48% | 0.600 (seed 1), 0.700 (seed 2) |" in md
    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[2]["seeds"] == "1 2" and float(table[2]["gap_closed"]) == pytest.approx(0.4828, abs=1e-4)
    # An oracle below the baseline: no gap to close (a method above both was -450 %).
    oracle_low = [*(("plain", s, 0.61) for s in (1, 2, 3)), *(("oracle", s, 0.59) for s in (1, 2, 3))]
    for method, seed, acc in oracle_low:
        _finished(points[f"{method}/model.name=deepmerge,seed={seed}"], 0.5, acc)
    rows = write_summary(tmp_path, points.values(), gap=("plain", "oracle"))
    assert math.isnan(rows[2]["gap_closed"]) and math.isnan(rows[0]["gap_closed"])
    # A grid that does not vary the seed has nothing to average over: no summary, and the summary of
    # the grid's earlier version (which did) goes: beside the new leaderboard it looked current.
    unseeded = load_grid({"base": str(TINY), "out": str(tmp_path / "unseeded"), "grid": {"optim.lr": [1e-3]}})
    assert write_summary(unseeded.out, unseeded.points) == [] and not (unseeded.out / "summary.md").exists()
    (tmp_path / "submitit").mkdir()  # (launched there: the tables are the launch's)
    unseeded = load_grid({"base": str(TINY), "out": str(tmp_path), "grid": {"optim.lr": [1e-3]}})
    assert write_summary(unseeded.out, unseeded.points) == []
    assert not (tmp_path / "summary.md").exists() and not (tmp_path / "summary.csv").exists()


def test_a_seed_whose_metric_is_undefined_leaves_the_others_their_mean(tmp_path):
    """A test split of one class writes "roc_auc": NaN: statistics.stdev raised on it (the whole
    summary lost), and a mean with it was NaN for every seed."""
    grid = load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2, 3]}})
    for p, auc in zip(grid.points, (0.8, float("nan"), 0.9)):
        _finished(p, 0.5, 0.7)
        result = json.loads((p.run_dir / "eval" / "best_test.json").read_text())
        result["target"]["roc_auc"] = auc
        (p.run_dir / "eval" / "best_test.json").write_text(json.dumps(result))
    (row,) = write_summary(grid.out, grid.points)
    assert row["target_roc_auc_mean"] == pytest.approx(0.85) and row["target_roc_auc_std"] == pytest.approx(0.0707, abs=1e-4)
    # Over 2 of the 3 finished runs: said in the cell, which looked like the row's 3/3.
    assert row["finished"] == 3 and row["target_roc_auc_n"] == 2
    assert "0.850 ± 0.071 (n=2)" in (grid.out / "summary.md").read_text()


def test_summary_marks_baselines_a_dmhpc_before_the_source_alone_forward_trained(tmp_path):
    """A study run again after the upgrade skipped its finished points: its baseline without
    adaptation, trained with the target batch through BatchNorm, stood beside runs of now and set
    the gap closed, unmarked."""
    from tests.conftest import ROOT

    noda = str(ROOT / "configs" / "deepmerge-noda.yaml")
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]},
            "methods": {"plain": {"base": noda}, "mmd": {"base": str(TINY)},
                        # its "target" batches were of its own data set: no other domain in BatchNorm
                        "oracle": {"base": noda, "overrides": {"data.source": "noisy", "data.target": "noisy"}}}}
    points = list(load_grid(spec).points)
    for p in points:
        _finished(p, 0.5, 0.7)
        best = {"model": {}, "step": 30}
        if p.values["method"] == "mmd" or (p.values["method"] == "plain" and p.values["seed"] == 2):
            best["forward"] = "source alone" if p.values["method"] == "plain" else "source and target"
        (p.run_dir / "checkpoints").mkdir(parents=True)
        torch.save(best, p.run_dir / "checkpoints" / "best.pt")
    rows = summary_rows(points)
    assert [(r["method"], r["target_through_batchnorm"]) for r in rows] == [("plain", True), ("mmd", False),
                                                                             ("oracle", False)]
    write_summary(tmp_path, points)
    md = (tmp_path / "summary.md").read_text()
    # (the oracle's ./noisy is another target than the others': the rows say their data)
    assert "| plain (target through BatchNorm) | pristine -> shards/noisy | 2/2 |" in md
    assert "| mmd | pristine -> shards/noisy | 2/2 |" in md
    assert "a dmhpc before 2026-12-03 trained" in md


def test_summary_marks_oracle_selection_and_runs_trained_on_the_target(tmp_path):
    spec = study_spec(tmp_path)
    spec["overrides"].update({"data.source": "pristine", "data.target": "noisy"})  # paths are only compared
    spec["methods"]["oracle"]["overrides"]["data.source"] = "./noisy"  # spelt otherwise, the same folder
    points = list(load_grid(spec).points)
    for p in points:
        _finished(p, 0.5, 0.7, criterion=p.config.select.criterion, oracle=p.values["method"] == "oracle")
    rows = summary_rows(points, gap=("plain", "oracle"))
    assert [(r["oracle"], r["trained_on_target"]) for r in rows] == [(False, False), (False, False), (True, True)]
    write_summary(tmp_path, points, gap=("plain", "oracle"))
    md = (tmp_path / "summary.md").read_text()
    assert "| oracle (oracle selection, trained on target) | 2/2 |  |  |  |  | 0.700 ± 0.000 |" in md
    assert "| plain | 2/2 | 0.900 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.700 ± 0.000 |" in md
    assert "| source acc | source AUC | source F1 | source Brier | target acc | target AUC | target F1 |" in md
    assert "| plain | 2/2 | 0.900 ± 0.000 |" in md
    assert math.isnan(rows[0]["gap_closed"])  # oracle and baseline tie: no gap to close


def test_a_seed_only_grid_marks_its_oracle_row_on_the_run_count(tmp_path):
    grid = load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]},
                      "overrides": {"select.criterion": "oracle-target-acc"}})
    for p in grid.points:
        _finished(p, 0.5, 0.7, criterion="oracle-target-acc", oracle=True)
    write_summary(grid.out, grid.points)
    assert "| 2/2 (oracle selection) | 0.900 ± 0.000 |" in (grid.out / "summary.md").read_text()


def test_tables_of_a_grid_on_an_unlabelled_target_leave_its_accuracy_empty(make_domains, tmp_path, capsys):
    """A survey has no labels: its test result holds the merger fraction and IM, no accuracy. The
    summary read r["target"]["accuracy"]: after the whole grid trained, `dmhpc grid` ended in a
    KeyError, summary.md was never written, and every relaunch or --report crashed the same way."""
    import numpy as np

    from dmhpc.data.shards import write_dataset
    from dmhpc.launch import launch_grid, report_grid

    data = make_domains(64)
    survey = tmp_path / "survey"
    write_dataset(np.random.default_rng(1).normal(size=(64, 3, 75, 75)).astype(np.float32), None, None, survey,
                  shard_size=64)
    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "grid": {"seed": [0, 1]},
            "overrides": {"data.source": str(data / "pristine"), "data.target": str(survey), "train.epochs": 1,
                          "train.batch_size": 4, "select.criterion": "im", "select.all_validators": True}}
    launch_grid(spec)
    for seed in (0, 1):
        result = json.loads((out / f"seed={seed}" / "eval" / "best_test.json").read_text())
        assert result["target"]["labelled"] is False and "accuracy" not in result["target"]
    assert "mean ± std over seeds" in capsys.readouterr().out
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2/2 |"))
    assert row.endswith("|  |  |  |  |  |"), row  # target acc, AUC, F1, Brier and per seed: empty
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[0]["seeds"] == "0 1" and table[0]["target_accuracy_mean"] == ""
    assert table[0]["target_accuracy_per_seed"] == ""
    with (out / "leaderboard.csv").open() as f:
        board = list(csv.DictReader(f))
    assert [r["status"] for r in board] == ["finished", "finished"]
    assert all(r["criterion"] == "im" and r["target_accuracy_reporting_only"] == "" for r in board)
    assert not (out / "validators.md").exists()  # nothing to check the validators against
    assert len(report_grid(spec)) == 2


def test_a_run_asked_to_train_longer_does_not_count_its_shorter_result(tmp_path):
    """A grid run again with more epochs resumes its runs: until they finish, the summary showed the
    old, shorter runs' mean as the new configuration's."""
    from dataclasses import replace

    from dmhpc.config import save_config

    grid = load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]},
                      "overrides": {"train.epochs": 3}})
    for p in grid.points:  # finished at 1 epoch, by the grid's earlier version
        _finished(p, 0.5, 0.7)
        save_config(replace(p.config, train=replace(p.config.train, epochs=1)), p.run.config_path)
    assert all(p.run.finished and not p.finished for p in grid.points)
    (row,) = summary_rows(grid.points)
    assert row["finished"] == 0 and row["seeds"] == []
    assert math.isnan(row["target_accuracy_mean"]) and math.isnan(row["source_accuracy_mean"])


def test_one_finished_seed_has_no_spread(tmp_path):
    """One finished run has no sample standard deviation: a spread of 0 claimed seeds that agree."""
    grid = load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}})
    _finished(grid.points[0], 0.5, 0.7)
    (row,) = write_summary(grid.out, grid.points)
    assert row["finished"] == 1 and math.isnan(row["target_accuracy_std"])
    md = (grid.out / "summary.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| 1/2 |"))
    assert "±" not in line and "| 0.900 |" in line and "| 0.700 |" in line, line
    with (grid.out / "summary.csv").open() as f:
        (table,) = list(csv.DictReader(f))
    assert table["target_accuracy_mean"] == "0.7" and table["target_accuracy_std"] == ""


def _cells(line: str) -> list[str]:
    """A markdown table row's cells, as a renderer splits them (an escaped \\| stays in its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_a_bar_in_a_value_stays_in_its_cell(tmp_path):
    """A data set folder named `survey|deep` split its rows into more cells than the header's."""
    from dmhpc.markdown import table

    assert _cells(table(["a", "b"], [["x|y", "two\nlines"]])[2]) == [r"x\|y", "two lines"]
    assert table(["a", "b"], [["x\ry", "z\r\nw"]])[2] == "| x y | z w |"  # (a bare \r ends a line too)
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local",
            "grid": {"seed": [0], "data.target": [str(tmp_path / "survey|deep"), str(tmp_path / "noisy")]}}
    points = load_grid(spec).points
    write_leaderboard(tmp_path / "out", points)
    write_summary(tmp_path / "out", points)
    for name in ("leaderboard.md", "summary.md"):
        rows = [line for line in (tmp_path / "out" / name).read_text().splitlines() if line.startswith("|")]
        assert len(rows) == 4 and len({len(_cells(line)) for line in rows}) == 1, rows
        assert any(r"survey\|deep" in line for line in rows), rows


def code_spans(line: str) -> list[str]:
    """The code spans of a markdown line as CommonMark reads them: a run of n backticks opens one,
    the next run of exactly n closes it, one space is stripped each side where both are there."""
    spans, runs = [], [(m.start(), m.end()) for m in re.finditer("`+", line)]
    i = 0
    while i < len(runs):
        start, end = runs[i]
        close = next((j for j in range(i + 1, len(runs)) if runs[j][1] - runs[j][0] == end - start), None)
        if close is None:
            i += 1
            continue
        text = line[end:runs[close][0]]
        if text[:1] == text[-1:] == " " and text.strip():
            text = text[1:-1]
        spans.append(text)
        i = close + 1
    return spans


@pytest.mark.parametrize("value", ["m.onnx", "a`b.onnx", "`x`", "a``b", " a ", "run `one`/seed=1", "``"])
def test_a_code_span_shows_its_value_whole(value):
    """A backtick in a file name ended the model card's code span early, showing the rest as text."""
    from dmhpc.markdown import code

    assert code_spans(f"of {code(value)}: and `sha`") == [value, "sha"]


def test_a_line_break_in_a_code_span_is_shown_not_kept():
    """A line break in a file name ended the card's line (a list item, a heading) in the middle."""
    from dmhpc.markdown import code

    assert code_spans(code("two\nlines\r")) == [r"two\nlines\r"] and "\n" not in code("two\nlines")


def test_a_methods_gap_is_measured_against_the_ends_of_its_own_target_and_model(tmp_path):
    """A method whose overrides set data.target (or model.name) was measured against the baseline
    and oracle of the study's target and model: a gap closed on a survey none of its ends ran on."""
    spec = study_spec(tmp_path)
    spec["methods"].update({
        "mmd-survey": {"base": str(TINY), "overrides": {"loss.transfer": "mmd", "data.target": "other/survey"}},
        "mmd-resnet": {"base": str(TINY), "overrides": {"loss.transfer": "mmd", "model.name": "resnet18"}}})
    points = {p.name: p for p in load_grid(spec).points}
    for seed in (1, 2):
        for method, acc in (("plain", 0.5), ("oracle", 0.9), ("mmd", 0.7), ("mmd-survey", 0.6), ("mmd-resnet", 0.6)):
            _finished(points[f"{method}/seed={seed}"], 0.9, acc, oracle=method == "oracle")
    rows = {r["method"]: r for r in write_summary(tmp_path, points.values(), gap=("plain", "oracle"))}
    assert rows["mmd"]["gap_closed"] == pytest.approx(0.5)
    assert math.isnan(rows["mmd-survey"]["gap_closed"]) and math.isnan(rows["mmd-resnet"]["gap_closed"])
    md = (tmp_path / "summary.md").read_text()
    # The rows differ in target: each says its data.
    assert "| method | data | model | runs |" in md and "| mmd | pristine -> noisy | deepmerge2 | 2/2 |" in md
    assert "| mmd-survey | pristine -> survey | deepmerge2 | 2/2 |" in md
    assert "| mmd-resnet | pristine -> noisy | resnet18 | 2/2 |" in md and "|  | 0.600 (seed 1), 0.600 (seed 2) |" in md


def test_the_gap_says_it_is_over_the_seeds_both_ends_finished_and_how_many(tmp_path):
    """The summary said "on the means", and its 25 % was over the one seed the oracle finished, not
    over the three means of the row beside it."""
    spec = study_spec(tmp_path, grid={"seed": [1, 2, 3]})
    points = {p.name: p for p in load_grid(spec).points}
    for seed, acc in ((1, 0.6), (2, 0.7), (3, 0.8)):
        _finished(points[f"plain/seed={seed}"], 0.9, 0.5)
        _finished(points[f"mmd/seed={seed}"], 0.9, acc)
    _finished(points["oracle/seed=1"], 0.9, 0.9, "oracle-target-acc", oracle=True)
    rows = write_summary(tmp_path, points.values(), gap=("plain", "oracle"))
    assert [(r["gap_closed"], r["gap_closed_n"]) for r in rows] == [(0.0, 1), (pytest.approx(0.25), 1), (1.0, 1)]
    md = (tmp_path / "summary.md").read_text()
    assert "on the means over the seeds that the row and both ends finished" in md
    assert "| 25% (n=1) | 0.600 (seed 1), 0.700 (seed 2), 0.800 (seed 3) |" in md
    assert "| 100% | 0.900 (seed 1) |" in md  # over every seed the oracle's row finished: no n
    with (tmp_path / "summary.csv").open() as f:
        assert [r["gap_closed_n"] for r in csv.DictReader(f)] == ["1", "1", "1"]
