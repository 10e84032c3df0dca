"""Grid and scaling launches without a cluster: expansion, validation, leaderboard, scaling arithmetic,
and real trainer runs through submitit's local and debug executors on tiny data.

The SLURM executor is tested on the two-node test cluster in tests/cluster/test_launch_cluster.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY
from dmhpc.errors import DmhpcError
from dmhpc.launch import (expand, launch_scaling, load_grid, load_study, point_name, sample_space, scaling_table,
                          steady_step_time, summary_rows, write_leaderboard, write_summary)
from dmhpc.launch.grid import Range
from dmhpc.launch.submit import Resources, local_threads, make_executor, slurm_minutes



@pytest.fixture(scope="module")
def data(make_domains):
    """A pristine/noisy pair of 64 images each: 45 training rows, 11 steps of 4 per epoch."""
    return make_domains(64)


def _tiny_overrides(data, **extra):
    return {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"), "train.epochs": 1,
            "train.batch_size": 4, **extra}


# --- expansion and names ---------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_in_key_order():
    points = expand({"seed": [0, 1], "loss.transfer_weight": [0.5, 1.0, 2.0]})
    assert len(points) == 6
    assert points[0] == {"loss.transfer_weight": 0.5, "seed": 0}
    assert points[-1] == {"loss.transfer_weight": 2.0, "seed": 1}
    assert len({point_name(p) for p in points}) == 6
    assert point_name(points[0]) == "loss.transfer_weight=0.5,seed=0"
    # The name does not depend on the order the keys were written in.
    assert point_name({"seed": 0, "loss.transfer_weight": 0.5}) == point_name(points[0])


def test_random_samples_are_seeded_distinct_in_range_and_crossed_with_the_grid():
    space = {"optim.lr": Range(1e-4, 1e-2, log=True), "loss.entropy_weight": [0.0, 0.05, 0.1]}
    a, b = sample_space(space, 6, seed=3), sample_space(space, 6, seed=3)
    assert a == b and a != sample_space(space, 6, seed=4)
    assert len({json.dumps(s, sort_keys=True) for s in a}) == 6
    for s in a:
        assert 1e-4 <= s["optim.lr"] <= 1e-2 and float(f"{s['optim.lr']:.4g}") == s["optim.lr"]
        assert s["loss.entropy_weight"] in (0.0, 0.05, 0.1)
    # Log-uniform: about as many samples below 1e-3 (the geometric middle) as above.
    many = [s["optim.lr"] for s in sample_space({"optim.lr": Range(1e-4, 1e-2, log=True)}, 400, seed=0)]
    assert 150 < sum(v < 1e-3 for v in many) < 250
    crossed = expand({"seed": [1, 2]}, a)
    assert len(crossed) == 12 and crossed[0] == {**a[0], "seed": 1} and crossed[6] == {**a[0], "seed": 2}
    with pytest.raises(DmhpcError, match="3 distinct samples asked for, the space gave only 2"):
        sample_space({"seed": [0, 1]}, 3, seed=0)


def test_point_names_are_filesystem_safe_and_keep_points_apart():
    a = point_name({"data.source": "/scratch/a b/pristine"})
    b = point_name({"data.source": "/scratch/a_b/pristine"})
    assert a != b and "/" not in a and " " not in a
    long = point_name({"loss.mmd.sigmas": list(range(60))})
    assert len(long) <= 120 and long != point_name({"loss.mmd.sigmas": list(range(61))})
    assert point_name({"optim.lr": 1e-05, "debug": True}) == "debug=true,optim.lr=1e-05"


def test_slurm_time_formats():
    assert [slurm_minutes(v) for v in (30, "30", "90:30", "02:00:00", "1-12", "1-00:00:30")] == \
        [30, 30, 91, 120, 2160, 1441]
    for bad in ("2h", 0, "00:00:00", True, 1.5):
        with pytest.raises(ValueError):
            slurm_minutes(bad)


# --- validation ------------------------------------------------------------------------------------

def test_every_problem_of_a_grid_file_is_reported_before_anything_runs(tmp_path):
    grid_file = tmp_path / "bad.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(tmp_path / "out"), "executor": "cloud", "colour": "blue",
        "grid": {"seed": [0, 1], "run.dir": ["x"], "optim.lr": 0.1},
        "slurm": {"nodes": 0, "gpus_per_node": 2, "tasks_per_node": 3, "queue": "long", "time": "2h"}}))
    with pytest.raises(DmhpcError) as err:
        load_grid(grid_file)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{grid_file}: 8 problems, nothing submitted:", lines
    for fragment in ("colour: unknown key", 'executor: expected one of "slurm", "local", "debug", got "cloud"',
                     "grid.run.dir: set by the launcher", "grid.optim.lr: expected a non-empty list",
                     "slurm.queue: unknown key", "slurm.nodes: expected a positive integer, got 0",
                     "slurm.tasks_per_node: one task per GPU", "slurm.time: expected minutes"):
        assert sum(fragment in line for line in lines[1:]) == 1, (fragment, lines)
    assert all(line.startswith(f"{grid_file}: ") for line in lines)
    assert not (tmp_path / "out").exists()


def test_empty_grid_names_the_file_and_key(tmp_path):
    for grid in ({}, None):
        with pytest.raises(DmhpcError, match=r"g\.yaml: grid: empty"):
            (tmp_path / "g.yaml").write_text(yaml.safe_dump({"base": str(TINY), "out": "x", "grid": grid}))
            load_grid(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"base": str(TINY), "out": "x"}))
    with pytest.raises(DmhpcError, match=r"g\.yaml: grid: missing"):
        load_grid(tmp_path / "g.yaml")


def test_report_on_a_bad_grid_file_fails_with_the_file_and_key_and_writes_nothing(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "grid": {"seed": 1}}))
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file), "--report"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == \
        f"dmhpc grid: error: {grid_file}: grid.seed: expected a non-empty list of values, got 1", result.stderr
    assert not (tmp_path / "out").exists()


def test_every_bad_point_is_reported_with_the_schema_message(tmp_path):
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local",
            "grid": {"optim.lr": [1e-3, -1.0, "fast"], "train.batch_size": [8, 0]}}
    with pytest.raises(DmhpcError) as err:
        load_grid(spec)
    lines = str(err.value).splitlines()
    # 5 of the 6 points are bad: one line per distinct problem, naming every point that has it.
    assert lines == [
        "<launch dict>: 3 problems, nothing submitted:",
        "<launch dict>: point optim.lr=0.001,train.batch_size=0: train.batch_size: expected a positive integer, got 0",
        "<launch dict>: points optim.lr=-1.0,train.batch_size=8, optim.lr=-1.0,train.batch_size=0: optim.lr: "
        "expected a number > 0, got -1.0",
        "<launch dict>: points optim.lr=fast,train.batch_size=8, optim.lr=fast,train.batch_size=0: optim.lr: "
        "expected a number > 0, got \"fast\""]
    assert not (tmp_path / "out").exists()
    with pytest.raises(DmhpcError, match=r"overrides: optim\.lrr: unknown key \(did you mean optim\.lr\?\)"):
        load_grid({**spec, "grid": {"seed": [0, 1]}, "overrides": {"optim.lrr": 1.0}})


# --- studies: methods x grid ---------------------------------------------------------------------

def _study(tmp_path, **extra):
    return {"out": str(tmp_path / "out"), "executor": "local", "overrides": {"train.epochs": 3},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd", "train.epochs": 5}},
                        "oracle": {"base": str(TINY), "overrides": {"select.criterion": "oracle-target-acc"}}},
            "gap": {"from": "plain", "to": "oracle"}, "grid": {"seed": [1, 2]}, **extra}


def test_a_study_is_every_method_crossed_with_the_grid(tmp_path):
    g = load_grid(_study(tmp_path))
    assert [p.name for p in g.points] == ["plain/seed=1", "plain/seed=2", "mmd/seed=1", "mmd/seed=2",
                                          "oracle/seed=1", "oracle/seed=2"]
    by_name = {p.name: p for p in g.points}
    assert by_name["mmd/seed=2"].run_dir == (tmp_path / "out" / "mmd" / "seed=2").resolve()
    assert by_name["mmd/seed=2"].values == {"method": "mmd", "seed": 2}
    cfg = by_name["mmd/seed=2"].config
    assert (cfg.loss.transfer, cfg.train.epochs, cfg.seed) == ("mmd", 5, 2)  # the method's overrides win
    assert by_name["plain/seed=1"].config.train.epochs == 3
    assert by_name["oracle/seed=1"].config.select.criterion == "oracle-target-acc"
    assert g.gap == ("plain", "oracle")


def test_every_problem_of_a_study_file_is_reported(tmp_path):
    spec = _study(tmp_path, base=str(TINY), gap={"from": "plain", "to": "nothing", "by": 1})
    spec["methods"] = {**spec["methods"], "bad name": {"base": str(TINY)}, "lost": {"base": "missing.yaml"},
                       "clash": {"base": str(TINY), "overrides": {"seed": 4}, "colour": 1}}
    with pytest.raises(DmhpcError) as err:
        load_grid(spec)
    lines = str(err.value).splitlines()
    for fragment in ("give either base (one training config) or methods (a study), not both",
                     'methods."bad name": a method name is a directory name',
                     "methods.lost.base: config file not found", "methods.clash.colour: unknown key",
                     "methods.clash.overrides.seed: also a grid or random.space key",
                     'gap.to: "nothing" is not one of the methods', "gap.by: unknown key"):
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DmhpcError, match="<launch dict>: methods.mmd: loss.transfer: expected one of"):
        load_grid(_study(tmp_path, methods={"mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmmd"}}},
                         gap=None))
    with pytest.raises(DmhpcError, match="gap: needs methods"):
        load_grid({"base": str(TINY), "out": "x", "grid": {"seed": [1]}, "gap": {"from": "a", "to": "b"}})
    with pytest.raises(DmhpcError, match="not both|not neither"):
        load_grid({"out": "x", "grid": {"seed": [1]}})


def test_summary_is_mean_and_spread_over_seeds_with_the_gap_closed(tmp_path):
    spec = _study(tmp_path, grid={"seed": [1, 2, 3], "model.name": ["deepmerge", "deepmerge2"]})
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
    assert mmd["gap_closed"] == pytest.approx((0.65 - 0.52) / (0.80 - 0.52))
    assert (plain["gap_closed"], oracle["gap_closed"]) == (0.0, 1.0)
    assert oracle["target_accuracy_std"] == 0.0
    assert math.isnan(rows[1]["gap_closed"]) and math.isnan(rows[1]["target_accuracy_mean"])
    md = (tmp_path / "summary.md").read_text()
    assert "| mmd | deepmerge | 2/3 | 0.900 ± 0.000 |" in md
    assert "0.650 ± 0.071 |" in md and "| 46% | 0.600 (seed 1), 0.700 (seed 2) |" in md
    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[2]["seeds"] == "1 2" and float(table[2]["gap_closed"]) == pytest.approx(0.4643, abs=1e-4)
    # A grid that does not vary the seed has nothing to average over: no summary.
    unseeded = load_grid({"base": str(TINY), "out": str(tmp_path / "unseeded"), "grid": {"optim.lr": [1e-3]}})
    assert write_summary(unseeded.out, unseeded.points) == [] and not (unseeded.out / "summary.md").exists()


def test_summary_marks_oracle_selection_and_runs_trained_on_the_target(tmp_path):
    spec = _study(tmp_path)
    spec["overrides"].update({"data.source": "pristine", "data.target": "noisy"})  # paths are only compared
    spec["methods"]["oracle"]["overrides"]["data.source"] = "noisy"
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


def test_executor_shapes_are_checked():
    spec = {"base": str(TINY), "out": "runs/x", "grid": {"seed": [0]}}
    with pytest.raises(DmhpcError, match="local runs on this machine only: one node, got 2 nodes"):
        load_grid({**spec, "executor": "local", "slurm": {"nodes": 2}})
    with pytest.raises(DmhpcError, match="debug runs one task in this process"):
        load_grid({**spec, "executor": "debug", "slurm": {"tasks_per_node": 2}})


def test_local_ranks_running_at_once_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [local_threads(n) for n in (1, 2, 3, 8, 20)] == [None, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert local_threads(3) is None


def test_a_run_directory_of_another_configuration_is_refused(tmp_path):
    """The trainer's own resume rule (RunDir), applied before anything is submitted."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local", "grid": {"seed": [0]}}
    point = load_grid(spec).points[0]
    from dmhpc.config import save_config
    from dmhpc.train.checkpoint import save_checkpoint

    save_config(point.config, point.run_dir / "config.yaml")
    save_checkpoint(point.run.checkpoint("last"), {"step": 1})
    assert load_grid(spec).points[0].config == point.config  # the same configuration: resumable
    assert load_grid({**spec, "overrides": {"train.epochs": 7}})  # a longer run resumes too
    with pytest.raises(DmhpcError, match=r"seed=0: .*config.yaml: the run was trained with another configuration: "
                                         r"optim\.lr 0\.001 -> 0\.5"):
        load_grid({**spec, "overrides": {"optim.lr": 0.5}})
    other = tmp_path / "other"
    (other / "seed=0").mkdir(parents=True)
    (other / "seed=0" / "notes.txt").write_text("mine")
    with pytest.raises(DmhpcError, match=r"seed=0: run.dir .*: exists and is not a dmhpc run \(it holds 'notes.txt'\)"):
        load_grid({**spec, "out": str(other)})


def test_sbatch_options_for_a_site(tmp_path):
    """What a site changes in the slurm section reaches the sbatch script submitit writes."""
    res = Resources(nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, mem_gb=64, time_min=90,
                    partition="gpu", account="astro42", qos="normal", constraint="a100", exclusive=True,
                    setup=("module load cuda",), additional_parameters=(("mail-type", "END"),))
    ex = make_executor("slurm", tmp_path, res, "dmhpc-test")
    script = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                 "--time=90", "--partition=gpu", "--account=astro42", "--qos=normal", "--constraint=a100",
                 "--exclusive", "--mail-type=END", "--signal=USR2@90", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "module load cuda" in script
    cpu = make_executor("slurm", tmp_path, Resources(tasks_per_node=2), "dmhpc-test")
    assert "gpus-per-node" not in cpu._executor._make_submission_file_text("python -m x", "uid")


def test_shipped_launch_files_are_valid():
    for path in sorted([*(ROOT / "configs" / "grid").glob("*.yaml"), *(ROOT / "configs" / "study").glob("*.yaml")]):
        assert load_grid(path).points, path
    for path in sorted((ROOT / "configs" / "scaling").glob("*.yaml")):
        assert load_study(path).points, path


# --- leaderboard -----------------------------------------------------------------------------------

def _finished(point, score, target_acc, criterion="source-val-acc", oracle=False):
    metrics = {m: 0.5 for m in ("accuracy", "precision", "recall", "f1", "roc_auc", "brier")}
    result = {"split": "test", "checkpoint": {"name": "best", "epoch": 3, "step": 30, "criterion": criterion,
                                               "score": score},
              "oracle": oracle, "source": {**metrics, "accuracy": 0.9}, "target": {**metrics, "accuracy": target_acc}}
    (point.run_dir / "eval").mkdir(parents=True)
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
    torch.save({"model": {}, "epoch": 1, "selection": {"criterion": "source-val-acc", "score": 0.97}},
               unfinished / "best.pt")
    rows = write_leaderboard(tmp_path, points.values(), failed={name(4): "job 7 failed"})

    assert [(r["point"], r["rank"], r["status"]) for r in rows[:5]] == [
        (name(0, "oracle-target-acc"), 1, "finished"),
        (name(1), 1, "finished"), (name(2), 2, "finished"), (name(0), 3, "finished"),
        (name(3), None, "unfinished")]
    assert rows[4]["score"] == 0.97 and rows[4]["epoch"] == 1
    assert {r["status"] for r in rows[5:]} == {"failed", "not started"}
    with (tmp_path / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == [r["point"] for r in rows]
    assert table[1]["score"] == "0.9" and table[1]["target_accuracy_reporting_only"] == "0.6"
    assert table[0]["oracle"] == "True" and table[1]["oracle"] == "False"
    assert table[1]["seed"] == "1" and table[1]["select.criterion"] == "source-val-acc"
    md = (tmp_path / "leaderboard.md").read_text()
    assert "target acc †" in md and "for reporting only" in md and "ranked within each criterion" in md
    assert f"| 1 | {name(1)} | source-val-acc | 0.9000 | 3 | 0.900 | 0.500 | 0.600 |" in md
    assert f"| 1 | {name(0, 'oracle-target-acc')} | oracle-target-acc (oracle) | 0.9900 |" in md


# --- real runs -------------------------------------------------------------------------------------

def test_two_point_grid_through_the_local_executor_then_skip_and_resume(data, tmp_path, monkeypatch):
    """launch/grid.py runs the real trainer in submitit's local executor, fills the leaderboard;
    a second launch skips the finished point and resumes the one whose evaluation is missing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local", "overrides": _tiny_overrides(data),
        "grid": {"optim.lr": [1e-3, 1e-4]}, "slurm": {"time": 10}}))
    cmd = [sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 point(s): 0 finished, 0 still queued, 2 submitted" in first.stdout, first.stdout
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["point"] for r in rows} == {"optim.lr=0.001", "optim.lr=0.0001"}
    assert all(r["status"] == "finished" and r["rank"] and r["criterion"] == "source-val-acc" for r in rows), rows
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "eval" / "best_test.json").read_text())
        assert float(r["score"]) == result["checkpoint"]["score"]
        assert float(r["target_accuracy_reporting_only"]) == result["target"]["accuracy"]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    config = yaml.safe_load((out / "optim.lr=0.0001" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 1e-4 and config["train"]["signals"] == ["SIGUSR2"]

    (out / "optim.lr=0.0001" / "eval" / "best_test.json").unlink()
    logs_before = sorted((out / "submitit").glob("*_log.out"))
    report = subprocess.run(cmd + ["--report"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "1 of 2 point(s) finished; nothing launched" in report.stdout, report.stdout
    with (out / "leaderboard.csv").open() as f:
        status = {r["point"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"optim.lr=0.001": "finished", "optim.lr=0.0001": "unfinished"}
    assert sorted((out / "submitit").glob("*_log.out")) == logs_before
    assert not (out / "optim.lr=0.0001" / "eval" / "best_test.json").exists()
    both = subprocess.run(cmd + ["--report", "--no-wait"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 point(s): 1 finished, 0 still queued, 1 submitted" in second.stdout, second.stdout
    logs = "".join(p.read_text() for p in (out / "submitit").glob("*_log.out"))
    assert logs.count("resumed from") == 1, logs
    assert (out / "optim.lr=0.0001" / "eval" / "best_test.json").is_file()


def test_a_failed_point_is_named_with_the_reason_from_its_job_and_marked_on_the_leaderboard(data, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local",
        "overrides": _tiny_overrides(data, **{"train.batch_size": 64}), "grid": {"seed": [1]}, "slurm": {"time": 10}}))
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[-2:-1] == [f"dmhpc grid: error: {grid_file}: 1 point(s) failed:"], result.stderr
    log = next((out / "submitit").glob("*_0_log.out"))
    assert re.fullmatch(
        rf"point seed=1: job \d+ failed: dmhpc\.errors\.DmhpcError: {re.escape(str(data))}/pristine: "
        rf"45 training rows, fewer than one global batch \(1 ranks x 64\) \(log: {re.escape(str(log))}\)",
        lines[-1]), lines[-1]
    with (out / "leaderboard.csv").open() as f:
        assert [(r["point"], r["status"]) for r in csv.DictReader(f)] == [("seed=1", "failed")]


def test_a_study_through_the_local_executor_runs_array_parallelism_points_at_a_time(data, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher divides the cores between the jobs
    from dmhpc.launch import launch_grid

    out = tmp_path / "out"
    launch_grid({"out": str(out), "executor": "local", "overrides": _tiny_overrides(data),
                 "methods": {"noda": {"base": str(ROOT / "configs" / "deepmerge-noda.yaml")},
                             "mmd": {"base": str(TINY), "overrides": {"loss.fisher.weight": 0.0}}},
                 "gap": {"from": "noda", "to": "mmd"}, "grid": {"seed": [1, 2]},
                 "slurm": {"time": 10, "array_parallelism": 2}})
    printed = capsys.readouterr().out
    assert "0 of 4 point(s) finished; running the other 4, 2 at a time" in printed
    threads = local_threads(2)
    assert printed.count(f"{threads} CPU thread(s) per rank (OMP_NUM_THREADS)") == 2, printed
    first = [out / "noda" / "seed=1", out / "noda" / "seed=2"]
    second = [out / "mmd" / "seed=1", out / "mmd" / "seed=2"]
    # The second pair started (wrote its config) after the first pair had finished (written its test metrics).
    assert min((r / "config.yaml").stat().st_mtime for r in second) >= \
        max((r / "eval" / "best_test.json").stat().st_mtime for r in first)
    for run in first + second:
        setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert setup["kind"] == "setup" and setup["cpu_threads"] == threads, setup
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["finished"], r["seeds"]) for r in rows] == [("noda", "2", "1 2"), ("mmd", "2", "1 2")]
    noda_acc = json.loads((first[0] / "eval" / "best_test.json").read_text())["target"]["accuracy"]
    assert float(rows[0]["target_accuracy_per_seed"].split()[0]) == noda_acc
    tie = rows[0]["target_accuracy_mean"] == rows[1]["target_accuracy_mean"]  # tiny data: both may say "merger"
    assert [r["gap_closed"] for r in rows] == (["", ""] if tie else ["0.0", "1.0"])
    assert "| method | runs |" in (out / "summary.md").read_text()


def test_scaling_study_through_the_debug_executor(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "scaling"
    rows = launch_scaling({
        "base": str(TINY), "out": str(out), "executor": "debug", "models": ["deepmerge2"], "nodes": [1],
        "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4}, "epochs": 2,
        "overrides": {k: v for k, v in _tiny_overrides(data).items() if not k.startswith("train.")}})
    assert len(rows) == 1
    r = rows[0]
    assert (r["model"], r["mode"], r["gpus"], r["global_batch"]) == ("deepmerge2", "weak", 1, 4)
    assert r["status"] == "finished"
    assert r["warmup_excluded"] is True and r["speedup"] == 1.0 and r["efficiency"] == 1.0
    epochs = [json.loads(line) for line in (out / "deepmerge2-weak-1x1" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert r["step_time_s"] == pytest.approx(epochs[1]["step_time_s"])  # the first epoch is warm-up
    assert r["images_per_s"] == pytest.approx(epochs[1]["images_per_s"], rel=1e-6)
    assert r["staging_s"] > 0 and r["loader"] == "gpu-resident"
    assert (out / "scaling.png").stat().st_size > 0 and "| deepmerge2 | weak | 1 |" in (out / "scaling.md").read_text()


# --- scaling arithmetic ----------------------------------------------------------------------------

def test_steady_step_time_excludes_the_first_epoch_and_weights_by_steps():
    records = [{"kind": "step", "step": 1}, {"kind": "epoch", "step": 10, "step_time_s": 5.0},
               {"kind": "epoch", "step": 20, "step_time_s": 1.0}, {"kind": "epoch", "step": 25, "step_time_s": 2.5}]
    assert steady_step_time(records) == (pytest.approx((10 * 1.0 + 5 * 2.5) / 15), True)
    assert steady_step_time(records[:2]) == (5.0, False)
    t, excluded = steady_step_time([])
    assert math.isnan(t) and not excluded


def _row(model, mode, nodes, gpn, images):
    return {"model": model, "mode": mode, "nodes": nodes, "gpus_per_node": gpn, "gpus": nodes * gpn,
            "images_per_s": images}


def test_scaling_table_speedup_and_efficiency():
    rows = scaling_table([
        # weak: per-GPU throughput 100 -> 90 -> 80: efficiency X(N) / (N X(1))
        _row("resnet18", "weak", 1, 1, 100.0), _row("resnet18", "weak", 1, 2, 180.0),
        _row("resnet18", "weak", 2, 2, 320.0),
        # strong at global batch G: T(1) = 1.0 s, T(2) = 0.6 s -> X = 2G/T; S = T(1)/T(2), E = S/2
        _row("resnet18", "strong", 1, 1, 2 * 64 / 1.0), _row("resnet18", "strong", 2, 1, 2 * 64 / 0.6),
        # baseline = the fewest GPUs measured (2 here): efficiency relative to it
        _row("resnet50", "weak", 1, 2, 50.0), _row("resnet50", "weak", 2, 2, 90.0),
        _row("resnet50", "weak", 4, 2, math.nan),
    ])
    by = {(r["model"], r["mode"], r["gpus"]): r for r in rows}
    assert by["resnet18", "weak", 2]["speedup"] == pytest.approx(1.8)
    assert by["resnet18", "weak", 2]["efficiency"] == pytest.approx(0.9)
    assert by["resnet18", "weak", 4]["efficiency"] == pytest.approx(0.8)
    assert by["resnet18", "strong", 2]["speedup"] == pytest.approx(1.0 / 0.6)
    assert by["resnet18", "strong", 2]["efficiency"] == pytest.approx(1.0 / (2 * 0.6))
    assert by["resnet50", "weak", 2]["efficiency"] == 1.0
    assert by["resnet50", "weak", 4]["speedup"] == pytest.approx(1.8)
    assert by["resnet50", "weak", 4]["efficiency"] == pytest.approx(0.9)
    assert math.isnan(by["resnet50", "weak", 8]["efficiency"])
    assert [(r["model"], r["mode"], r["gpus"]) for r in rows][:3] == [
        ("resnet18", "weak", 1), ("resnet18", "weak", 2), ("resnet18", "weak", 4)]


def test_scaling_study_problems_are_all_reported(tmp_path):
    with pytest.raises(DmhpcError) as err:
        load_study({"base": str(TINY), "out": str(tmp_path), "executor": "local", "models": ["resnet18", "vgg"],
                    "nodes": [1], "gpus_per_node": [1, 3], "strong": {"global_batch": 8},
                    "overrides": {"train.batch_size": 4}, "slurm": {"nodes": 2}})
    lines = str(err.value).splitlines()
    assert lines[0] == "<launch dict>: 3 problems, nothing submitted:", lines
    assert "models: expected a non-empty list of distinct model names" in lines[1]
    assert "overrides.train.batch_size: set by the launcher for every point: weak.batch_per_gpu" in lines[2]
    assert "slurm.nodes: set by the study's nodes and gpus_per_node lists" in lines[3]
    with pytest.raises(DmhpcError, match=r"point resnet18-strong-1x3: strong.global_batch 8 does not split evenly "
                                         r"over 3 GPUs"):
        load_study({"base": str(TINY), "out": str(tmp_path), "executor": "local", "models": ["resnet18"],
                    "nodes": [1], "gpus_per_node": [1, 3], "strong": {"global_batch": 8}})


@pytest.mark.parametrize("place, value", [
    ("slurm", {"partition": "gpu\n#SBATCH --account=someone-else"}),
    ("slurm", {"setup": ["module load cuda", "echo hi\rrm -rf ~"]}),
    ("slurm", {"additional_parameters": {"comment": "a\tb"}}),
    ("out", "runs/x\ny"),
])
def test_control_characters_in_launch_strings_are_refused(tmp_path, place, value):
    """They used to reach the generated batch script as lines of their own."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "slurm", "grid": {"seed": [0]}, place: value}
    with pytest.raises(DmhpcError, match=r"<launch dict>: .*holds a control character") as info:
        load_grid(spec)
    assert place in str(info.value)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(DmhpcError, match=rf"{path}: .*holds a control character"):
        load_grid(path)


def test_a_study_gap_on_an_unlabelled_target_is_refused(data, tmp_path):
    """The gap closed is measured in target accuracy, which an unlabelled survey does not have."""
    import numpy as np

    from dmhpc.data.shards import write_dataset

    write_dataset(np.random.default_rng(0).normal(size=(64, 3, 75, 75)).astype(np.float32), None, None,
                  tmp_path / "survey", shard_size=64)
    spec = {"methods": {"noda": {"base": str(TINY)}, "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}}},
            "gap": {"from": "noda", "to": "mmd"}, "out": str(tmp_path / "out"), "executor": "local",
            "grid": {"seed": [0]}, "overrides": _tiny_overrides(data, **{"data.target": str(tmp_path / "survey")})}
    with pytest.raises(DmhpcError, match=r"gap: measures target accuracy, and data.target .*survey is unlabelled"):
        load_grid(spec)
    spec["overrides"]["data.target"] = str(data / "noisy")
    assert load_grid(spec).gap == ("noda", "mmd")


def test_one_front_door_for_grids_and_a_one_line_error_without_slurm(data, tmp_path, monkeypatch, capsys):
    """A grid asking for SLURM where there is none used to end in a 20-line traceback
    ('Could not detect "srun"'); --executor local runs the same file here."""
    from dmhpc.cli import main

    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "grid": {"seed": [0]},
            "overrides": _tiny_overrides(data)}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch
    assert main(["grid", str(grid_file)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("dmhpc grid: error: executor slurm: no SLURM here (sbatch is not on PATH); to run the "
                           "points on this machine, give --executor local (or executor: local in the file)")
    assert load_grid(grid_file, executor="local").executor == "local"
    assert main(["grid", str(grid_file), "--report"]) == 0
    assert "0 of 1 point(s) finished" in capsys.readouterr().out
