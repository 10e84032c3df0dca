"""Grids and studies (dmhpc/launch/grid.py): expansion, point names, validation of the whole file,
methods x grid, and real trainer runs through submitit's local executor on tiny data.

The SLURM executor is tested on the two-node test cluster in tests/cluster/test_launch_cluster.py.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, TINY, clean_env, fake_commands, study_spec, tiny_overrides
from dmhpc.errors import DmhpcError
from dmhpc.launch import expand, load_grid, load_study, point_name, sample_space
from dmhpc.launch.spec import Range
from dmhpc.launch.submit import local_threads

MSG_ROWS = ("loss.mmd.max_samples: 8 ranks x train.batch_size 1100 gives 17600 rows (source + target) to the "
            "MMD, more than 16384")


@pytest.fixture(scope="module")
def data(make_domains):
    """A pristine/noisy pair of 64 images each: 45 training rows, 11 steps of 4 per epoch."""
    return make_domains(64)


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
    with pytest.raises(DmhpcError, match="3 distinct samples asked for, the space holds only 2"):
        sample_space({"seed": [0, 1]}, 3, seed=0)
    # Said before any draw: 100 * n draws came first (2.7 s at 10**4 over 3 choices, minutes at 10**6).
    with pytest.raises(DmhpcError, match="1000000 distinct samples asked for, the space holds only 6"):
        sample_space({"seed": [0, 1, 2], "optim.lr": [0.1, 0.01, 0.1]}, 10**6, seed=0)
    with pytest.raises(DmhpcError, match="3 distinct samples asked for, the space gave only 1"):  # a range rounded
        sample_space({"seed": [0], "optim.lr": Range(0.99991, 0.99992)}, 3, seed=0)
    # Rounded to 4 digits past the range's ends: high 0.99999 drew 1.0, which a key below 1 refuses.
    tight = sample_space({"optim.lr": Range(0.99991, 0.99999)}, 2, seed=0)
    assert all(0.99991 <= s["optim.lr"] <= 0.99999 for s in tight)


def test_point_names_are_filesystem_safe_and_keep_points_apart():
    a = point_name({"data.source": "/scratch/a b/pristine"})
    b = point_name({"data.source": "/scratch/a_b/pristine"})
    assert a != b and "/" not in a and " " not in a
    long = point_name({"loss.mmd.sigmas": list(range(60))})
    assert len(long) <= 120 and long != point_name({"loss.mmd.sigmas": list(range(61))})
    assert point_name({"optim.lr": 1e-05, "debug": True}) == "debug=true,optim.lr=1e-05"


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


def test_overrides_that_only_the_points_values_make_valid_are_taken(tmp_path):
    """`model.stem` applies to ResNets only: with the models in the grid, every point is valid though
    the base with the overrides alone is not (it was refused, naming the overrides)."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local",
            "overrides": {"model.stem": "small"}, "grid": {"model.name": ["resnet18", "resnet34"]}}
    assert [p.config.model.stem for p in load_grid(spec).points] == ["small", "small"]
    # one point that leaves them invalid names itself; when no point mends them, one line says so
    with pytest.raises(DmhpcError, match=r"point model.name=deepmerge2: model.stem: \"small\" applies to ResNet"):
        load_grid({**spec, "grid": {"model.name": ["resnet18", "deepmerge2"]}})
    with pytest.raises(DmhpcError) as err:
        load_grid({**spec, "grid": {"seed": [1, 2]}})
    assert str(err.value) == ('<launch dict>: overrides: model.stem: "small" applies to ResNet models only, but '
                              'model.name is "deepmerge2"')
    # Every point mends the overrides and breaks on a value of its own: each point said, not the
    # overrides (the user was told to fix a key the grid fixes already).
    with pytest.raises(DmhpcError) as err:
        load_grid({**spec, "grid": {"model.name": ["resnet18", "resnet34"], "optim.lr": [-1.0]}})
    assert "overrides:" not in str(err.value) and "optim.lr=-1.0: optim.lr: expected a number > 0" in str(err.value)


def test_the_rows_a_points_loss_gets_on_its_ranks_are_checked_at_launch(tmp_path):
    """The trainer refuses ranks x train.batch_size past loss.mmd.max_samples (or short of what CORAL
    needs) at its start, a check that reads no data: a grid of 8 ranks per point was launched, and
    every job failed after its wait in the queue."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "grid": {"seed": [0, 1]},
            "overrides": {"train.batch_size": 1100}, "slurm": {"nodes": 2, "gpus_per_node": 4}}
    with pytest.raises(DmhpcError, match=re.escape(f": overrides: {MSG_ROWS}")):
        load_grid(spec)
    with pytest.raises(DmhpcError, match=re.escape(f": point train.batch_size=1100: {MSG_ROWS}")):
        load_grid({**spec, "overrides": {}, "grid": {"train.batch_size": [16, 1100]}})
    assert len(load_grid({**spec, "slurm": {"nodes": 1, "gpus_per_node": 4}}).points) == 2  # 4 x 1100 x 2 rows


def test_a_random_section_whose_keys_are_all_commented_out_is_refused(tmp_path):
    """It read as an empty space: one point, named "", whose run directory was OUT itself."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {TINY}\nout: {tmp_path / 'out'}\nrandom:\n#  n: 4\n#  space: {{optim.lr: [0.1, 0.01]}}\n")
    with pytest.raises(DmhpcError, match=r"grid.yaml: random: empty: give n and space"):
        load_grid(grid)
    assert not (tmp_path / "out").exists()


def test_a_study_is_every_method_crossed_with_the_grid(tmp_path):
    g = load_grid(study_spec(tmp_path))
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
    spec = study_spec(tmp_path, base=str(TINY), gap={"from": "plain", "to": "nothing", "by": 1})
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
        load_grid(study_spec(tmp_path, methods={"mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmmd"}}},
                         gap=None))
    with pytest.raises(DmhpcError, match="gap: needs methods"):
        load_grid({"base": str(TINY), "out": "x", "grid": {"seed": [1]}, "gap": {"from": "a", "to": "b"}})
    with pytest.raises(DmhpcError, match="not both|not neither"):
        load_grid({"out": "x", "grid": {"seed": [1]}})


def test_two_point_grid_through_the_local_executor_then_skip_and_resume(data, tmp_path, monkeypatch):
    """launch/grid.py runs the real trainer in submitit's local executor, fills the leaderboard;
    a second launch skips the finished point and resumes the one whose evaluation is missing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local", "overrides": tiny_overrides(data),
        "grid": {"optim.lr": [1e-3, 1e-4]}, "slurm": {"time": 10}}))
    cmd = [sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 of 2 point(s) finished; running the other 2" in first.stdout, first.stdout
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
    # The executor the grid was launched with, where it replaced the file's: the file is read as
    # that launch read it (refused, a file whose own executor refused its shape had no tables).
    spec = yaml.safe_load(grid_file.read_text())
    grid_file.write_text(yaml.safe_dump({**spec, "executor": "slurm", "slurm": {"signal_delay_s": 3600}}))
    own = subprocess.run(cmd + ["--report"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert own.returncode == 1 and "slurm.signal_delay_s" in own.stderr, own.stderr
    other = subprocess.run(cmd + ["--report", "--executor", "local"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert other.returncode == 0 and "point(s) finished; nothing launched" in other.stdout, other.stdout + other.stderr
    grid_file.write_text(yaml.safe_dump(spec))

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 of 2 point(s) finished; running the other 1" in second.stdout, second.stdout
    logs = "".join(p.read_text() for p in (out / "submitit").glob("*_log.out"))
    assert logs.count("resumed from") == 1, logs
    assert (out / "optim.lr=0.0001" / "eval" / "best_test.json").is_file()


def test_a_finished_point_asked_to_train_longer_resumes_instead_of_passing_for_the_longer_run(data, tmp_path,
                                                                                               capsys):
    """The trainer accepts a longer run as a resume (train.epochs, max_steps, early_stopping), but
    the launcher skipped every point with a test result: raising train.epochs reported the old,
    shorter runs as the new grid's results."""
    from dmhpc.launch import launch_grid, report_grid

    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "overrides": tiny_overrides(data),
            "grid": {"seed": [1]}}
    run = out / "seed=1"
    launch_grid(spec)
    assert json.loads((run / "eval" / "best_test.json").read_text())["checkpoint"]["epoch"] == 0
    capsys.readouterr()

    longer = {**spec, "overrides": tiny_overrides(data, **{"train.epochs": 2})}
    assert report_grid(longer)[0]["status"] == "unfinished"  # its result is of the shorter run
    assert "0 of 1 point(s) finished" in capsys.readouterr().out
    launch_grid(longer)
    printed = capsys.readouterr().out
    assert "1 point(s): 0 finished, 0 still queued, 1 submitted" in printed, printed
    assert "resumed from" in printed and "train.epochs 1 -> 2" in printed, printed
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [0, 1]
    launch_grid(longer)
    assert "1 point(s): 1 finished, 0 still queued, 0 submitted" in capsys.readouterr().out
    def finished(**keys) -> bool:
        return load_grid({**longer, "overrides": tiny_overrides(data, **{"train.epochs": 2, **keys})}).points[0].finished

    assert finished(**{"train.log_every": 2})  # another cadence is no reason to train again
    assert not finished(**{"train.early_stopping": 3}) and not finished(**{"train.max_steps": 40})
    with pytest.raises(DmhpcError, match=r"train.max_steps 15: the run is at step 22 already"):
        finished(**{"train.max_steps": 15})  # the trainer would refuse it, after the queue
    # The file asks for fewer epochs than the run trained: a launch refuses it, and a report (which
    # launches nothing) refused to write any table; it leaves that point out, naming it.
    shorter = {**spec, "grid": {"seed": [1, 2]}}
    capsys.readouterr()
    assert {r["point"]: r["status"] for r in report_grid(shorter)} == {"seed=1": "left out", "seed=2": "not started"}
    printed = capsys.readouterr().out
    assert "point seed=1: left out of the tables: " in printed and "train.epochs 1: the run has trained 2" in printed
    assert "0 of 2 point(s) finished (1 left out); nothing launched" in printed, printed
    # Still one of its group's runs: dropped, the summary counted one seed of one ("0/1").
    assert "| 0/2 |" in (out / "summary.md").read_text()
    assert "Runs left out: their run directories no longer fit the file" in (out / "leaderboard.md").read_text()
    with pytest.raises(DmhpcError, match="point seed=1: .*train.epochs 1: the run has trained 2 epochs already"):
        launch_grid(shorter)
    # Every point left out: the tables of no point were written over the old ones, and the summary
    # removed "as the grid no longer varies the seed".
    tables = {p.name: p.read_bytes() for p in Path(spec["out"]).glob("*.*") if p.is_file()}
    with pytest.raises(DmhpcError, match=r"no point of the file fits its run directory \(each said above\); the "
                                         r"tables are left as they were"):
        report_grid({**spec, "grid": {"seed": [1]}})
    assert {p.name: p.read_bytes() for p in Path(spec["out"]).glob("*.*") if p.is_file()} == tables


def test_a_debug_point_stopped_by_a_signal_is_said_not_taken_for_done(data, tmp_path):
    """The debug executor runs a point in this process and returns the trainer's exit code: a stop
    signal's requeue code (75) was taken for a success, the point left unfinished, nothing said."""
    import os
    import signal
    import threading
    import time

    from dmhpc.launch import launch_grid

    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "grid": {"seed": [1]},
            "overrides": tiny_overrides(data, **{"train.epochs": 200, "train.log_every": 1})}
    metrics = out / "seed=1" / "metrics.jsonl"

    def stop() -> None:  # as SLURM's warning reaches a job: the point's trainer gets SIGUSR2
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and '"kind": "step"' in metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=stop, daemon=True).start()
    with pytest.raises(DmhpcError, match=r"point seed=1: job \S+ stopped before its end \(exit 75: a stop signal\); "
                                         r"launch again to resume it"):
        launch_grid(spec)
    assert (out / "seed=1" / "checkpoints" / "last.pt").is_file()


def test_a_debug_point_failing_on_a_users_mistake_is_its_one_line_not_a_debugger(data, tmp_path, monkeypatch):
    """submitit's debug job opens pdb on its task's exception: at a terminal a point whose data set
    was missing left the launcher at a (Pdb) prompt; the failure is the point's one line now."""
    import pdb

    from dmhpc.launch import launch_grid

    opened = []
    monkeypatch.setattr(pdb, "post_mortem", lambda *a: opened.append(a))
    out = tmp_path / "out"
    missing = tmp_path / "missing"
    overrides = {k: v for k, v in tiny_overrides(data).items() if k != "data.target"}
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "overrides": overrides,
            "grid": {"data.target": [str(missing)]}}
    with pytest.raises(DmhpcError, match=rf"point data.target=\S+: job \S+ failed: data.target: "
                                         rf"{missing}/manifest.json: missing"):
        launch_grid(spec)
    assert opened == []


def test_a_relaunch_compares_data_by_content_as_the_trainer_does(data, tmp_path, capsys):
    """The launcher compared data paths only: a copy of the data at a new path was refused (the
    trainer resumes on it), and data prepared again at the same path passed, so the old run's
    result counted as the point's (a grid mixing data versions) or its job failed after the queue."""
    import shutil

    from dmhpc.data.shards import write_dataset
    from dmhpc.launch import launch_grid

    shutil.copytree(data, tmp_path / "a")
    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug",
            "overrides": tiny_overrides(tmp_path / "a"), "grid": {"seed": [1]}}
    launch_grid(spec)
    capsys.readouterr()

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same data sets at a new path
    moved = load_grid({**spec, "overrides": tiny_overrides(tmp_path / "b")})
    assert moved.points[0].finished

    shutil.rmtree(tmp_path / "a" / "noisy")  # prepared again in place, other splits
    rng = np.random.default_rng(1)
    write_dataset(rng.normal(0, 0.3, (64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None,
                  tmp_path / "a" / "noisy", shard_size=64, seed=1)
    with pytest.raises(DmhpcError, match=r"point seed=1: .*data.target .*noisy.* holds another data set"):
        load_grid(spec)


def test_a_failed_point_is_named_with_the_reason_from_its_job_and_marked_on_the_leaderboard(data, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local",
        "overrides": tiny_overrides(data, **{"train.batch_size": 64}), "grid": {"seed": [1]}, "slurm": {"time": 10}}))
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
    # A report from the run directories alone showed the failed point as unfinished, like a running one.
    report = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file), "--report"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    with (out / "leaderboard.csv").open() as f:
        assert [(r["point"], r["status"]) for r in csv.DictReader(f)] == [("seed=1", "failed")]
    # Another part of the study into the same OUT keeps this point's failure (it was deleted whole).
    part = tmp_path / "part.yaml"
    part.write_text(grid_file.read_text().replace("- 1", "- 2"))
    assert subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), str(part)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path).returncode == 1
    assert set(json.loads((out / "submitit" / "failures.json").read_text())) == {"seed=1", "seed=2"}
    (out / "submitit" / "failures.json").write_text('{"seed=1": ')  # hand-edited, cut short
    report = subprocess.run([sys.executable, str(ROOT / "launch" / "grid.py"), str(grid_file), "--report"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.returncode == 1 and report.stderr.count("\n") == 1, report.stderr
    assert "failures.json: not readable JSON" in report.stderr, report.stderr


def test_local_points_start_as_others_end_and_sigterm_to_the_launcher_cancels_them(data, tmp_path):
    """Two at a time: the third point starts when the short second one ends, while the first still
    trains (a launcher that waited for both left a core idle). SIGTERM to the launcher (kill,
    scancel of its job) ends it as Ctrl-C does, its trainers with it: they were left training on,
    beside the next launch of the same study."""
    from tests.test_submit import _held

    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local",
        "overrides": {k: v for k, v in tiny_overrides(data).items() if k != "train.epochs"},
        "grid": {"seed": [1, 2], "train.epochs": [1000, 1]}, "slurm": {"time": 10, "array_parallelism": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "grid", str(grid_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path)
    long_runs = [out / "seed=1,train.epochs=1000", out / "seed=2,train.epochs=1000"]
    deadline = time.monotonic() + 300  # three trainers start on 2 busy cores
    while not all((r / "metrics.jsonl").exists() and '"epoch"' in (r / "metrics.jsonl").read_text()
                  for r in long_runs):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert (out / "seed=1,train.epochs=1" / "eval" / "best_test.json").is_file()
    assert not (long_runs[0] / "eval" / "best_test.json").exists()  # the first still trains
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    # One line: the job controllers' KeyboardInterrupt tracebacks (they shared the launcher's stderr) followed it.
    assert proc.returncode == 130 and stderr == "dmhpc grid: interrupted\n", (stdout, stderr)
    deadline = time.monotonic() + 30
    while any(_held(r / ".lock") for r in long_runs):
        assert time.monotonic() < deadline, "a point still trains after its launcher ended"
        time.sleep(0.2)
    assert not (out / "seed=2,train.epochs=1").exists()  # never started


def test_a_failure_is_recorded_as_it_happens_not_when_the_launcher_ends(data, tmp_path):
    """Failures were written once every job had ended: a launcher stopped while it waited (Ctrl-C,
    a lost login) dropped those it had seen, and a --report said "unfinished" of a point that failed."""
    out = tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    overrides = {k: v for k, v in tiny_overrides(data).items() if k != "train.batch_size"}
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "local", "overrides": {**overrides, "train.epochs": 10000},
        # 64: more than the 45 training rows, refused at once; 4 for 10000 epochs trains on.
        "grid": {"train.batch_size": [4, 64]}, "slurm": {"time": 10, "array_parallelism": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "grid", str(grid_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path)
    failures = out / "submitit" / "failures.json"
    deadline = time.monotonic() + 300
    while not failures.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.communicate()
    assert list(json.loads(failures.read_text())) == ["train.batch_size=64"]
    report = subprocess.run([sys.executable, "-m", "dmhpc", "grid", str(grid_file), "--report"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert report.returncode == 0, report.stderr
    with (out / "leaderboard.csv").open() as f:
        status = {r["point"]: r["status"] for r in csv.DictReader(f)}
    assert status["train.batch_size=64"].startswith("failed") and status["train.batch_size=4"] != "finished", status


def test_a_study_through_the_local_executor_runs_array_parallelism_points_at_a_time(data, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher divides the cores between the jobs
    from dmhpc.launch import launch_grid

    out = tmp_path / "out"
    launch_grid({"out": str(out), "executor": "local", "overrides": tiny_overrides(data),
                 "methods": {"noda": {"base": str(ROOT / "configs" / "deepmerge-noda.yaml")},
                             "mmd": {"base": str(TINY), "overrides": {"loss.fisher.weight": 0.0}}},
                 "gap": {"from": "noda", "to": "mmd"}, "grid": {"seed": [1, 2]},
                 "slurm": {"time": 10, "array_parallelism": 2}})
    printed = capsys.readouterr().out
    assert "0 of 4 point(s) finished; running the other 4, 2 at a time" in printed
    threads = local_threads(2)
    assert printed.count(f"{threads} CPU thread(s) per rank (OMP_NUM_THREADS)") == 1, printed
    first = [out / "noda" / "seed=1", out / "noda" / "seed=2"]
    second = [out / "mmd" / "seed=1", out / "mmd" / "seed=2"]
    # Never more than two at once: when a run started (wrote its config), at most one other was
    # running (had started and not yet written its test metrics).
    spans = [((r / "config.yaml").stat().st_mtime, (r / "eval" / "best_test.json").stat().st_mtime)
             for r in first + second]
    assert all(sum(a <= start < b for a, b in spans) <= 2 for start, _ in spans), spans
    for run in first + second:
        setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert setup["kind"] == "setup" and setup["cpu_threads"] == threads, setup
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["finished"], r["seeds"]) for r in rows] == [("noda", "2", "1 2"), ("mmd", "2", "1 2")]
    noda_acc = json.loads((first[0] / "eval" / "best_test.json").read_text())["target"]["accuracy"]
    assert float(rows[0]["target_accuracy_per_seed"].split()[0]) == noda_acc
    # A gap from noda to mmd only where mmd's mean is above noda's (tiny data: both may say "merger",
    # or mmd do worse: no gap to close, blank cells); the gap itself is test_leaderboard's.
    gap = float(rows[1]["target_accuracy_mean"]) > float(rows[0]["target_accuracy_mean"])
    assert [r["gap_closed"] for r in rows] == (["0.0", "1.0"] if gap else ["", ""])
    assert "| method | runs |" in (out / "summary.md").read_text()


def test_a_study_gap_on_an_unlabelled_target_is_refused(data, tmp_path):
    """The gap closed is measured in target accuracy, which an unlabelled survey does not have."""
    import numpy as np

    from dmhpc.data.shards import write_dataset

    write_dataset(np.random.default_rng(0).normal(size=(64, 3, 75, 75)).astype(np.float32), None, None,
                  tmp_path / "survey", shard_size=64)
    spec = {"methods": {"noda": {"base": str(TINY)}, "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}}},
            "gap": {"from": "noda", "to": "mmd"}, "out": str(tmp_path / "out"), "executor": "local",
            "grid": {"seed": [0]}, "overrides": tiny_overrides(data, **{"data.target": str(tmp_path / "survey")})}
    with pytest.raises(DmhpcError, match=r"gap: measures target accuracy, and data.target .*survey is unlabelled"):
        load_grid(spec)
    spec["overrides"]["data.target"] = str(data / "noisy")
    assert load_grid(spec).gap == ("noda", "mmd")


def test_one_front_door_for_grids_and_a_one_line_error_without_slurm(data, tmp_path, monkeypatch, capsys):
    """A grid asking for SLURM where there is none used to end in a 20-line traceback
    ('Could not detect "srun"'); --executor local runs the same file here."""
    from dmhpc.cli import main

    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "grid": {"seed": [0]},
            "overrides": tiny_overrides(data)}
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


def test_shipped_launch_files_are_valid():
    for path in sorted([*(ROOT / "configs" / "grid").glob("*.yaml"), *(ROOT / "configs" / "study").glob("*.yaml")]):
        assert load_grid(path).points, path
    for path in sorted((ROOT / "configs" / "scaling").glob("*.yaml")):
        assert load_study(path).points, path


def test_a_report_waits_for_tables_being_written_and_reads_the_runs_after(tmp_path):
    """A report that read the run directories before a launcher's last point finished, and wrote
    after the launcher's final tables, replaced them with its older ones. Here this test holds the
    tables' lock as a launcher writing its tables does: the report waits, then reads and writes."""
    import fcntl

    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    lock = tmp_path / "out" / "submitit" / "tables.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report = subprocess.Popen([sys.executable, str(ROOT / "launch" / "grid.py"), str(tmp_path / "g.yaml"),
                                   "--report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # time to read the runs and write, had it not waited
        assert report.poll() is None and not (tmp_path / "out" / "leaderboard.md").exists()
        # The launcher's end records its failed points before its tables: read before the lock, the
        # report's tables (written last) said "not started" of a point the launcher's said failed.
        (tmp_path / "out" / "submitit" / "failures.json").write_text(json.dumps({"seed=1": "job 7 failed: boom"}))
    out, err = report.communicate(timeout=120)
    assert report.returncode == 0, out + err
    assert "| seed=1 | source-val-acc |" in (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| failed |" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_overrides_nested_as_in_a_config_file_are_checked_as_dotted_ones(tmp_path):
    """`overrides: {train: {epochs: 7}, run: {dir: ...}}` was taken whole: it passed the checks that
    refuse a key both overridden and varied, or one the launcher sets, and the launcher's values then
    replaced the user's without a word."""
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"train.epochs": [1, 2]},
            "overrides": {"train": {"epochs": 7}, "run": {"dir": str(tmp_path / "elsewhere")}}}
    with pytest.raises(DmhpcError) as refused:
        load_grid(spec)
    said = str(refused.value)
    assert "train.epochs: set in more than one of overrides, grid and random.space" in said, said
    assert "overrides.run.dir: set by the launcher for every point" in said, said
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1]},
            "overrides": {"optim": {"lr": 0.01}, "optim.lr": 0.02}}
    with pytest.raises(DmhpcError, match="overrides.optim.lr: given twice"):
        load_grid(spec)
    spec["overrides"] = {"optim": {"lr": 0.01}}
    (point,) = load_grid(spec).points
    assert point.config.optim.lr == 0.01


def test_a_grid_value_repeated_as_another_number_is_refused(tmp_path):
    """[1, 1.0] made two points, =1 and =1.0, of one configuration: the same training twice."""
    with pytest.raises(DmhpcError, match=r"grid.loss.transfer_weight: a value is repeated in \[1, 1.0\]"):
        load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"loss.transfer_weight": [1, 1.0]}})
    assert len(load_grid({"base": str(TINY), "out": str(tmp_path / "g"),
                          "grid": {"loss.transfer_weight": [1, 1.5]}}).points) == 2
    # A random search's choices and a tune's alike: [0, 0.0] drew two points of one training.
    with pytest.raises(DmhpcError, match=r"random.space.loss.entropy_weight: a value is repeated in \[0, 0.0\]"):
        load_grid({"base": str(TINY), "out": str(tmp_path / "g"),
                   "random": {"n": 4, "space": {"loss.entropy_weight": [0, 0.0]}}})
    from dmhpc.launch.tune import load_tune

    with pytest.raises(DmhpcError, match=r"space.loss.entropy_weight: a value is repeated in \[0, 0.0\]"):
        load_tune({"base": str(TINY), "out": str(tmp_path / "t"), "objective": "im", "trials": 2,
                   "space": {"loss.entropy_weight": [0, 0.0]}})


def test_a_finished_point_of_another_job_shape_is_refused(tmp_path):
    """train.batch_size is per rank: a point finished on 1 rank counted as the result of the grid
    edited to 2 nodes x 4 ranks, averaged over seeds with runs of 8x its global batch."""
    from dmhpc.config import config_to_dict
    from dmhpc.train.checkpoint import save_checkpoint

    # Data sets that do not exist: the recorded fingerprints below are no real ones (the embedded
    # set's, prepared by `make demo`, made the launcher refuse the point as trained on other data).
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "executor": "slurm", "grid": {"seed": [1]},
            "slurm": {"nodes": 1, "tasks_per_node": 1},
            "overrides": {"data.source": str(tmp_path / "s"), "data.target": str(tmp_path / "t")}}
    (point,) = load_grid(spec).points
    run = point.run
    claim = run.claim(point.config, "auto")
    run.start(point.config, claim, {"source": {"path": "s", "fingerprint": "aa"},
                                    "target": {"path": "t", "fingerprint": "bb"}}, 0)
    run.release()
    save_checkpoint(run.checkpoint("last"), {"step": 3, "config": config_to_dict(point.config),
                                             "progress": {"epoch": point.config.train.epochs, "step_in_epoch": 0,
                                                          "step": 3, "world_size": 1}})
    run.write_result({"final": True}, "best", "test")
    load_grid(spec)  # the same shape: the finished run is the point's result
    with pytest.raises(DmhpcError, match=r"point seed=1: .* other settings \(ranks 1 -> 8\)"):
        load_grid({**spec, "slurm": {"nodes": 2, "tasks_per_node": 4}})


def test_a_data_set_missing_at_launch_is_said_once_before_its_jobs_fail(tmp_path, capsys):
    """A data path nobody prepared sent out every point's job, each failing at its start (on SLURM
    after its wait in the queue), and the launcher said nothing of it before."""
    from dmhpc.cli import main

    nowhere = tmp_path / "nowhere"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "debug",
                                         "grid": {"seed": [0, 1]},
                                         "overrides": {"data.source": str(nowhere), "data.target": str(nowhere)}}))
    assert main(["grid", str(grid_file)]) == 1
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("dmhpc launch: warning: ")]
    assert warnings == [f"dmhpc launch: warning: data.source: {nowhere}/manifest.json: missing; {nowhere} is not a "
                        f"finished dmhpc data set; the jobs that train on it fail unless it is in place when they "
                        f"start"], out


def test_a_random_search_draws_with_its_own_seed(tmp_path):
    """random.seed was not passed to the sampler: every seed drew the same points, and a second
    search with another seed trained the first one's configurations again."""
    spec = {"base": str(TINY), "out": str(tmp_path / "g"),
            "random": {"n": 3, "seed": 5, "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}
    drawn = [p.values for p in load_grid(spec).points]
    assert drawn == sample_space({"optim.lr": Range(1e-4, 1e-2, log=True)}, 3, seed=5)
    assert drawn == [p.values for p in load_grid(spec).points]
    other = [p.values for p in load_grid({**spec, "random": {**spec["random"], "seed": 6}}).points]
    assert other != drawn


def test_a_methods_override_of_a_random_space_key_is_refused(tmp_path):
    """A method fixing a key the random search draws: the method's value won at every point, and its
    points differed in name only."""
    spec = study_spec(tmp_path, grid=None, random={"n": 2, "space": {"loss.entropy_weight": [0.0, 0.1]}})
    del spec["grid"], spec["gap"]  # (a gap needs seeds)
    spec["methods"]["mmd"]["overrides"]["loss.entropy_weight"] = 0.05
    with pytest.raises(DmhpcError, match=r"^<launch dict>: methods\.mmd\.overrides\.loss\.entropy_weight: also a "
                                         r"grid or random\.space key$"):
        load_grid(spec)


def test_two_points_of_one_name_are_refused(tmp_path):
    """Values that differ only in type (text "0.01", number 0.01) name one directory: the later point
    replaced the earlier without a word, and its problem went unsaid."""
    with pytest.raises(DmhpcError) as err:
        load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"optim.lr": ["0.01", 0.01]}})
    assert ('<launch dict>: point optim.lr=0.01: two points share this name: {"optim.lr": "0.01"} and '
            '{"optim.lr": 0.01}') in str(err.value).splitlines()


def test_a_gap_from_a_method_to_itself_is_refused(tmp_path):
    """A gap from and to one method spans nothing: every "gap closed" cell was empty, unexplained."""
    with pytest.raises(DmhpcError, match=r"^<launch dict>: gap: from and to are the same method \(plain\)$"):
        load_grid(study_spec(tmp_path, gap={"from": "plain", "to": "plain"}))


def test_a_gap_without_seeds_is_refused(tmp_path):
    """A gap in a study that does not vary the seed was taken, and no summary nor gap was ever
    written, without a word."""
    with pytest.raises(DmhpcError, match=r"^<launch dict>: gap: needs seed among the grid keys"):
        load_grid(study_spec(tmp_path, grid={"optim.lr": [0.01, 0.02]}, overrides={"seed": 3}))


@pytest.mark.parametrize("name", ["summary.csv", "leaderboard.md", "validators.csv", "submitit"])
def test_a_method_named_as_a_file_of_the_study_is_refused(tmp_path, name):
    """Its runs trained into OUT/NAME, and then the study's table of that name was refused ("Is a directory")."""
    spec = study_spec(tmp_path)
    spec["methods"][name] = spec["methods"].pop("mmd")
    with pytest.raises(DmhpcError,
                       match=rf"^<launch dict>: methods.{re.escape(name)}: a name of the study's own files"):
        load_grid(spec)


def test_a_point_that_failed_before_and_ran_now_is_no_longer_recorded_as_failed(tmp_path):
    """The failures file kept a point's failure from an earlier launch after this launch ran it
    well: --report marked it failed. Points of the same OUT this launch did not run keep theirs."""
    from dmhpc.launch.grid import FAILURES, _read_failures, _record_failures

    g = load_grid({"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}})
    path = g.out / "submitit" / FAILURES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed=1": "job 7 failed", "seed=2": "job 8 failed", "seed=9": "job 9 failed"}))
    _record_failures(g, {"seed=2": "job 11 failed"})
    assert _read_failures(path) == {"seed=9": "job 9 failed", "seed=2": "job 11 failed"}
    _record_failures(g, {})
    assert _read_failures(path) == {"seed=9": "job 9 failed"}


def test_a_launch_stopped_while_it_waits_leaves_no_earlier_failure_of_its_points(tmp_path, monkeypatch):
    """The earlier launch's failures were replaced only after the wait: a launcher stopped in it
    (Ctrl-C, a lost login session) left them, and --report said "failed" of points running again."""
    from dmhpc.launch import grid
    from dmhpc.launch.grid import FAILURES, _read_failures

    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}, "executor": "local"}
    path = tmp_path / "g" / "submitit" / FAILURES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed=1": "job 7 failed", "seed=9": "job 9 failed"}))

    def stopped(points, *args, before, **kwargs):  # under the lock, submitted, then stopped while it waited
        before()
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "launch_points", stopped)
    with pytest.raises(KeyboardInterrupt):
        grid.launch_grid(spec)
    assert _read_failures(path) == {"seed=9": "job 9 failed"}  # a point of the same OUT it did not launch


def test_a_launch_refused_keeps_the_failures_of_its_points(tmp_path):
    """The failures were erased before the launch lock was taken: a launch refused as a second
    launcher (or by sbatch) had launched nothing, and --report said "not started" of failed points."""
    from dmhpc.files import hold_lock
    from dmhpc.launch.grid import FAILURES, _read_failures, launch_grid
    from dmhpc.launch.submit import LAUNCH_LOCK

    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}, "executor": "local"}
    path = tmp_path / "g" / "submitit" / FAILURES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed=1": "job 7 failed"}))
    with hold_lock(path.parent / LAUNCH_LOCK, "held", "launcher"):  # (flock: a second open conflicts in-process)
        with pytest.raises(DmhpcError, match="launch.lock: another launcher is running points into this out"):
            launch_grid(spec)
    assert _read_failures(path) == {"seed=1": "job 7 failed"}


def test_a_launch_refused_before_any_job_went_in_keeps_the_failures(tmp_path, monkeypatch):
    """Taken the launch lock, the failures were erased before the checks that can still refuse a
    launch: sbatch refusing the partition, or local points asking for a GPU where there is none,
    launched nothing, and --report said "not started" of the failed points, their reasons gone."""
    from tests.test_submit import refuse_sbatch

    from dmhpc.launch.grid import FAILURES, _read_failures, launch_grid, report_grid

    refuse_sbatch(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for local jobs, whatever this machine has
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}}
    path = tmp_path / "g" / "submitit" / FAILURES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed=1": "job 7 failed"}))
    for executor, extra, refusal in (("slurm", {}, "sbatch refused the job array"),
                                     ("local", {"slurm": {"gpus_per_node": 1}}, "gpus_per_node 1: ")):
        with pytest.raises(DmhpcError, match=refusal):
            launch_grid({**spec, "executor": executor, **extra})
        assert _read_failures(path) == {"seed=1": "job 7 failed"}, executor
    rows = {row["point"]: row["status"] for row in report_grid({**spec, "executor": "local"})}
    assert rows["seed=1"].startswith("failed") and rows["seed=2"] == "not started", rows
    # Stopped otherwise before any job went in (Ctrl-C while submitit writes its pickles, its own
    # error): only a refusal put the failures back.
    from dmhpc.launch import submit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "submit_points", interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch_grid({**spec, "executor": "slurm"})
    assert _read_failures(path) == {"seed=1": "job 7 failed"}


def test_a_launchers_failures_and_tables_are_written_before_its_lock_is_released(tmp_path, monkeypatch):
    """They were written after: a second launcher, started in between, ran the failed points again,
    and the first one's failures.json then said "failed" of points whose jobs ran (until the second
    ended, or for good when it was stopped)."""
    from dmhpc.files import hold_lock
    from dmhpc.launch import grid, submit
    from dmhpc.launch.grid import FAILURES, _read_failures
    from dmhpc.launch.submit import LAUNCH_LOCK

    fake_commands(tmp_path, monkeypatch, {"sbatch": "exit 1\n"})  # (never called: submit_points is replaced)
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "grid": {"seed": [1, 2]}, "executor": "slurm"}
    lock = tmp_path / "g" / "submitit" / LAUNCH_LOCK
    held = []

    def free() -> bool:
        try:
            with hold_lock(lock, "{holder}", "launcher"):
                return True
        except DmhpcError:
            return False

    def submitted(points, *args, on_submit, **kwargs):
        on_submit()
        return ["job"]

    record, tables = grid._record_failures, grid._write_tables
    monkeypatch.setattr(submit, "submit_points", submitted)
    monkeypatch.setattr(submit, "wait_for", lambda jobs, noted: {"seed=1": "job 7 failed: boom"})
    monkeypatch.setattr(grid, "_record_failures", lambda *a: (held.append(("failures", free())), record(*a)))
    monkeypatch.setattr(grid, "_write_tables", lambda *a: (held.append(("tables", free())), tables(*a))[1])
    with pytest.raises(DmhpcError, match="1 point"):
        grid.launch_grid(spec)
    assert held == [("failures", False), ("failures", False), ("tables", False)], held  # (the first: cleared)
    assert _read_failures(tmp_path / "g" / "submitit" / FAILURES) == {"seed=1": "job 7 failed: boom"}
    assert "failed" in (tmp_path / "g" / "leaderboard.md").read_text()


@pytest.mark.parametrize("inside", ["run", "data"])
def test_an_out_in_a_run_directory_or_a_data_set_is_refused(tmp_path, make_domains, inside):
    """A grid into a run directory wrote its tables and submitit folder there: the run was "not a
    dmhpc run" at its resume, and the grid that had trained it refused its own point; a data set's
    folder got runs beside its shards. Grid, study, tune and scaling files alike."""
    from dmhpc.launch import load_tune

    if inside == "run":
        g = load_grid({"base": str(TINY), "out": str(tmp_path / "a"), "grid": {"seed": [1]}})
        (g.points[0].run_dir / "checkpoints").mkdir(parents=True)
        (g.points[0].run_dir / "config.yaml").write_text("model: deepmerge\n")
        folder = g.points[0].run_dir
    else:
        folder = make_domains(40) / "pristine"
    for out in (folder, folder / "sub"):
        message = rf"out: {re.escape(str(out))}: inside the {'run directory' if inside == 'run' else 'data set'} "
        with pytest.raises(DmhpcError, match=message + re.escape(f"{folder}; launch into a folder of its own")):
            load_grid({"base": str(TINY), "out": str(out), "grid": {"seed": [1]}})
        with pytest.raises(DmhpcError, match=message):
            load_tune({"base": str(TINY), "out": str(out), "objective": "im", "trials": 1, "executor": "local",
                       "space": {"optim.lr": [0.001, 0.003]}})
        with pytest.raises(DmhpcError, match=message):
            load_grid(study_spec(out, out=str(out)))
        with pytest.raises(DmhpcError, match=message):  # a scaling study
            load_study({"base": str(TINY), "out": str(out), "executor": "local", "models": ["resnet18"],
                        "strong": {"global_batch": 8}})
    assert not any(p.name in ("submitit", "leaderboard.md") for p in folder.iterdir())


def test_a_users_files_by_the_names_of_the_tables_are_left_alone(tmp_path):
    """A first launch into a folder holding someone's summary.md removed it ("the grid no longer
    varies the seed") and replaced their leaderboard.md."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    with pytest.raises(DmhpcError, match=rf"out: {re.escape(str(out))}: holds summary.md, which no launch into it "
                                         rf"wrote \(no {re.escape(str(out / 'submitit'))}\); move them or choose "
                                         rf"another out"):
        load_grid({"base": str(TINY), "out": str(out), "grid": {"optim.lr": [0.001]}})
    assert (out / "summary.md").read_text() == "my notes"
    (out / "submitit").mkdir()  # a launch's folder: its tables are the launch's to replace
    assert load_grid({"base": str(TINY), "out": str(out), "grid": {"optim.lr": [0.001]}}).points


def test_a_method_name_longer_than_a_point_name_is_refused(tmp_path):
    """300 characters: a traceback (File name too long) after the launch lock was made, and at every
    later launch or report."""
    with pytest.raises(DmhpcError, match=r"methods\.\"?a{100}.*at most 120 of them"):
        load_grid({"out": str(tmp_path / "s"), "grid": {"seed": [1]}, "methods": {"a" * 300: {"base": str(TINY)}}})
    assert not (tmp_path / "s").exists()


def test_the_files_executor_is_checked_where_the_command_line_replaces_it(tmp_path):
    """`executor: slurmm` passed as long as --executor replaced it, and failed the day it did not."""
    from dmhpc.launch import load_grid
    from dmhpc.launch.tune import load_tune

    grid = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurmm", "grid": {"seed": [1]}}
    with pytest.raises(DmhpcError, match=r"^<launch dict>: executor: "):
        load_grid(grid, executor="local")
    tune = {"base": str(TINY), "out": str(tmp_path / "tune"), "executor": "slurmm", "objective": "im", "trials": 2,
            "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    with pytest.raises(DmhpcError, match=r"^<launch dict>: executor: "):
        load_tune(tune, executor="local")
