"""Scaling studies (dmhpc/launch/scaling.py): validation, step-time and efficiency arithmetic, and a
real study through submitit's debug executor."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tests.conftest import TINY, tiny_overrides
from dmhpc.errors import DmhpcError
from dmhpc.launch import launch_scaling, load_study, scaling_table, steady_step_time
from dmhpc.launch.scaling import write_scaling


@pytest.fixture(scope="module")
def data(make_domains):
    """A pristine/noisy pair of 64 images each: 45 training rows, 11 steps of 4 per epoch."""
    return make_domains(64)


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


def test_the_rows_a_points_loss_gets_on_its_ranks_are_checked_at_launch(tmp_path):
    """A point's ranks x its batch past loss.mmd.max_samples failed its job at the trainer's start."""
    with pytest.raises(DmhpcError, match=r"point resnet18-weak-2x4: loss.mmd.max_samples: 8 ranks x "
                                         r"train.batch_size 1100 gives 17600 rows"):
        load_study({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "models": ["resnet18"],
                    "nodes": [1, 2], "gpus_per_node": [4], "weak": {"batch_per_gpu": 1100}})


def test_a_key_without_a_value_is_an_error_not_its_default(tmp_path):
    """nodes: and gpus_per_node: over commented-out items, epochs: and exclusive: left empty took
    their defaults: a study meant for 4 nodes x 2 GPUs, exclusive, ran one 1x1 point on shared nodes."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"base: {TINY}\nout: {tmp_path / 'out'}\nexecutor: local\nmodels: [resnet18]\n"
                          "nodes:\n  # - 4\ngpus_per_node:\nweak: {batch_per_gpu: 8}\nepochs:\n"
                          "slurm: {exclusive: }\n")
    with pytest.raises(DmhpcError) as err:
        load_study(study_file)
    assert str(err.value).splitlines()[1:] == [
        f"{study_file}: nodes: no value (null); remove the key for its default ([1])",
        f"{study_file}: gpus_per_node: no value (null); remove the key for its default ([1])",
        f"{study_file}: epochs: no value (null); remove the key for its default (3)",
        f"{study_file}: slurm.exclusive: no value (null); remove the key for its default (false)"], str(err.value)


def test_settings_a_launch_would_drop_are_refused(tmp_path):
    """slurm.gpu_type with device cpu was dropped (its points ask for no GPU); a typo in the file's
    executor passed as long as --executor replaced it."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "models": ["resnet18"], "weak": {"batch_per_gpu": 8},
            "device": "cpu", "executor": "local", "slurm": {"gpu_type": "a100"}}
    with pytest.raises(DmhpcError, match=r"^<launch dict>: slurm.gpu_type: a type of GPU, and device cpu asks "
                                         r"for none$"):
        load_study(spec)
    with pytest.raises(DmhpcError, match=r"^<launch dict>: executor: "):
        load_study({**spec, "executor": "slurmm", "slurm": {}}, executor="local")


def test_a_null_mode_is_an_error_not_a_mode_left_out(tmp_path):
    """weak: or strong: with its only line commented out is null: it dropped that mode, and both null
    gave a study of zero points and an empty table."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"base: {TINY}\nout: {tmp_path / 'out'}\nexecutor: local\nmodels: [resnet18]\n"
                          "weak:\n  # batch_per_gpu: 64\nstrong: {global_batch: 8}\n")
    with pytest.raises(DmhpcError) as err:
        load_study(study_file)
    assert str(err.value) == (f"{study_file}: weak: expected a mapping with batch_per_gpu, got null; remove the key "
                              f"to leave weak scaling out")
    study_file.write_text(study_file.read_text().replace("strong: {global_batch: 8}", "strong:"))
    with pytest.raises(DmhpcError) as err:
        load_study(study_file)
    assert str(err.value).splitlines()[1:] == [
        f"{study_file}: weak: expected a mapping with batch_per_gpu, got null; remove the key to leave weak scaling out",
        f"{study_file}: strong: expected a mapping with global_batch, got null; remove the key to leave strong "
        f"scaling out"]


def cpu_study(tmp_path, gpus_per_node=(1, 2), **extra) -> dict:
    """A local weak-scaling study of DeepMerge II on CPU ranks, its data missing (nothing trains)."""
    return {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "models": ["deepmerge2"],
            "nodes": [1], "gpus_per_node": list(gpus_per_node), "device": "cpu", "weak": {"batch_per_gpu": 4},
            "overrides": {"data.source": "missing"}, **extra}


def test_steady_step_time_excludes_the_first_epoch_and_weights_by_steps():
    records = [{"kind": "step", "step": 1}, {"kind": "epoch", "step": 10, "step_time_s": 5.0},
               {"kind": "epoch", "step": 20, "step_time_s": 1.0}, {"kind": "epoch", "step": 25, "step_time_s": 2.5}]
    assert steady_step_time(records) == (pytest.approx((10 * 1.0 + 5 * 2.5) / 15), True)
    assert steady_step_time(records[:2]) == (5.0, False)
    # Resumed in its middle, the second epoch's time is of the 4 steps since the resume, not 10.
    records[2]["steps"] = 4
    assert steady_step_time(records) == (pytest.approx((4 * 1.0 + 5 * 2.5) / 9), True)
    t, excluded = steady_step_time([])
    assert math.isnan(t) and not excluded
    # A point requeued after its first epoch: the epoch it resumed in is the new start's warm-up.
    resumed = [{"kind": "setup", "step": 0}, records[1], {"kind": "setup", "step": 10},
               {**records[2], "steps": 10, "step_time_s": 4.0}, records[3]]
    assert steady_step_time(resumed) == (2.5, True)
    assert steady_step_time(resumed[:4]) == (pytest.approx((10 * 5.0 + 10 * 4.0) / 20), False)


def _row(model, mode, nodes, gpn, images, status="finished", warmup_excluded=True, loader="torch"):
    return {"model": model, "mode": mode, "nodes": nodes, "gpus_per_node": gpn, "gpus": nodes * gpn,
            "images_per_s": images, "status": status, "warmup_excluded": warmup_excluded, "loader": loader}


def test_scaling_table_speedup_and_efficiency():
    rows = scaling_table([
        # weak: per-GPU throughput 100 -> 90 -> 80: efficiency X(N) / (N X(1))
        _row("resnet18", "weak", 1, 1, 100.0), _row("resnet18", "weak", 1, 2, 180.0),
        _row("resnet18", "weak", 2, 2, 320.0),
        # strong at global batch G: T(1) = 1.0 s, T(2) = 0.6 s -> X = 2G/T; S = T(1)/T(2), E = S/2
        _row("resnet18", "strong", 1, 1, 2 * 64 / 1.0), _row("resnet18", "strong", 2, 1, 2 * 64 / 0.6),
        # baseline = the study's fewest GPUs (2 here): efficiency relative to it
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


def test_no_speedup_of_a_point_timed_with_its_warm_up_against_one_without():
    """max_steps ended the 1-GPU point inside its first epoch (its time with the warm-up), not the
    4-GPU one (fewer steps per epoch): 12x from 4 GPUs, efficiency 3, in the table and the plot."""
    rows = scaling_table([_row("resnet18", "weak", 1, 1, 100.0, warmup_excluded=False),
                          _row("resnet18", "weak", 1, 4, 1200.0),
                          _row("resnet18", "weak", 1, 8, 2400.0, warmup_excluded=False)])
    by = {r["gpus"]: r for r in rows}
    assert math.isnan(by[4]["speedup"]) and math.isnan(by[4]["efficiency"])
    assert by[8]["speedup"] == pytest.approx(24.0) and by[1]["efficiency"] == 1.0  # timed alike


def test_no_speedup_of_a_point_read_by_another_loader_than_its_baseline(tmp_path):
    """data.loader auto chose gpu-resident for the 1-GPU point and torch for 2 GPUs per node (less
    host memory per rank): the table gave a speedup of the loaders, and did not say which read."""
    rows = scaling_table([_row("resnet18", "weak", 1, 1, 100.0, loader="gpu-resident"),
                          _row("resnet18", "weak", 1, 2, 160.0), _row("resnet18", "weak", 2, 1, 190.0,
                                                                     loader="gpu-resident")])
    by = {(r["nodes"], r["gpus_per_node"]): r for r in rows}
    assert math.isnan(by[1, 2]["speedup"]) and math.isnan(by[1, 2]["efficiency"])
    assert by[2, 1]["speedup"] == pytest.approx(1.9) and by[1, 1]["speedup"] == 1.0  # the same loader: compared
    for r in rows:
        r.update({"batch_per_gpu": 4, "global_batch": 4 * r["gpus"], "step_time_s": 1.0, "point": "p",
                  "images_per_s_per_gpu": r["images_per_s"] / r["gpus"], "staging_s": 0.1, "run_dir": "d"})
    write_scaling(tmp_path, rows, "gpu")
    md = (tmp_path / "scaling.md").read_text()
    assert "| staging s | loader | warm-up excluded |" in md and "read by different loaders" in md
    assert "| 1 | 2 | 2 | 4 | 8 | 1 | 160 | 80 |  |  | 1 | 0.1 | torch | True | finished |" in md


def test_scaling_table_uses_only_finished_points_against_the_smallest_n(tmp_path):
    # The reviewer's case: the 1-GPU point was killed after its warm-up epoch (a slow, measured
    # throughput) and gave the finished 2-GPU point a speedup of 5.
    rows = scaling_table([
        _row("resnet18", "weak", 1, 1, 20.0, "not finished"), _row("resnet18", "weak", 1, 2, 100.0),
        _row("resnet18", "weak", 1, 4, 180.0),
        # strong: the finished 1 GPU is the baseline; the unfinished 2 GPUs get none
        _row("resnet18", "strong", 1, 1, 100.0), _row("resnet18", "strong", 1, 2, 500.0, "not finished"),
        _row("resnet18", "strong", 1, 4, 300.0),
    ])
    by = {(r["mode"], r["gpus"]): r for r in rows}
    for gpus in (1, 2, 4):  # no baseline: not the 2-GPU point instead
        assert math.isnan(by["weak", gpus]["speedup"]) and math.isnan(by["weak", gpus]["efficiency"])
        assert by["weak", gpus]["baseline_gpus"] == 1
    assert math.isnan(by["strong", 2]["speedup"]) and math.isnan(by["strong", 2]["efficiency"])
    assert by["strong", 4]["speedup"] == pytest.approx(3.0) and by["strong", 4]["efficiency"] == pytest.approx(0.75)
    for r in rows:
        r.update({"batch_per_gpu": 4, "global_batch": 4 * r["gpus"], "step_time_s": 1.0,
                  "images_per_s_per_gpu": r["images_per_s"] / r["gpus"], "staging_s": 0.1, "loader": "torch",
                  "warmup_excluded": True, "point": "p", "run_dir": "d"})
    write_scaling(tmp_path, rows, "gpu")
    md = (tmp_path / "scaling.md").read_text()
    assert "| speedup | efficiency | baseline N0 | staging s | loader | warm-up excluded | status |" in md
    assert "| resnet18 | weak | 1 | 1 | 1 | 4 | 4 | 1 | 20 | 20 |  |  | 1 | 0.1 | torch | True | not finished |" in md
    assert ("| resnet18 | strong | 1 | 4 | 4 | 4 | 16 | 1 | 300 | 75 | 3 | 0.75 | 1 | 0.1 | torch | True | finished |"
            in md)
    with (tmp_path / "scaling.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["gpus"], r["speedup"], r["baseline_gpus"], r["status"]) for r in csv_rows][:2] == [
        ("1", "", "1", "not finished"), ("2", "", "1", "finished")]


def test_scaling_study_through_the_debug_executor(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "scaling"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "models": ["deepmerge2"], "nodes": [1],
            "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4}, "epochs": 2,
            "overrides": {k: v for k, v in tiny_overrides(data).items() if not k.startswith("train.")}}
    rows = launch_scaling(spec)
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

    # The same study measured another way: the old timing stood in the table under the new settings.
    table = (out / "scaling.md").read_text()
    with pytest.raises(DmhpcError) as refused:
        launch_scaling({**spec, "device": "gpu", "overrides": {**spec["overrides"], "data.loader": "torch"}})
    message = str(refused.value)
    assert ("point deepmerge2-weak-1x1: was measured with other settings (config.data.loader \"auto\" -> \"torch\"; "
            "device \"cpu\" -> \"gpu\"; slurm.gpus_per_node 0 -> 1); a scaling table compares one setting") in message
    assert (out / "scaling.md").read_text() == table
    assert launch_scaling(spec)[0]["step_time_s"] == r["step_time_s"]  # as measured: nothing to run again


def test_a_local_scaling_study_runs_its_points_one_at_a_time(tmp_path, capsys):
    """Local points running together shared the machine's cores, and their efficiency measured that."""
    spec = cpu_study(tmp_path, slurm={"array_parallelism": 4})
    with pytest.raises(DmhpcError, match="2 point\\(s\\) failed"):  # no data: each fails as it starts
        launch_scaling(spec)
    assert ("running the other 2, 1 at a time (a scaling study: points together would share the cores and skew "
            "the timings)") in capsys.readouterr().out


def test_a_second_launcher_refused_by_the_lock_leaves_the_record_of_the_first(tmp_path):
    """The record of what each point is measured with was written before the launch lock was taken:
    a second launcher with other settings, refused as one, had already recorded its settings for the
    first launcher's points still to run, and the table then showed their timings under them."""
    from dmhpc.files import LockHeld, hold_lock
    from dmhpc.launch.scaling import record_measured_with
    from dmhpc.launch.submit import LAUNCH_LOCK

    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "models": ["deepmerge2"], "nodes": [1],
            "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4},
            "overrides": {"data.source": "missing"}, "slurm": {"cpus_per_task": 1}}
    record_measured_with(load_study(spec))  # the first launcher, about to run its points
    record = (out / "submitit" / "measured_with.json").read_text()
    lock = hold_lock(out / "submitit" / LAUNCH_LOCK, "held by {holder}", "launcher")
    try:
        with pytest.raises(LockHeld):
            launch_scaling({**spec, "slurm": {"cpus_per_task": 2}})
    finally:
        lock.close()
    assert (out / "submitit" / "measured_with.json").read_text() == record


def test_points_run_by_another_launcher_since_the_study_was_read_are_checked_again(tmp_path):
    """The settings were compared when the study was read, before the launch lock: a launcher that
    ran the points with its own settings in between had its timings recorded as of the new ones."""
    from dmhpc.launch.scaling import record_measured_with

    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "debug", "models": ["deepmerge2"], "nodes": [1],
            "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4},
            "overrides": {"data.source": "missing"}, "slurm": {"cpus_per_task": 1}}
    late = load_study({**spec, "slurm": {"cpus_per_task": 2}})  # read: nothing has run yet
    first = load_study(spec)
    record_measured_with(first)  # the other launcher takes the lock and runs its point
    run = first.points[0].run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# a trainer started here\n")
    record = (out / "submitit" / "measured_with.json").read_text()
    with pytest.raises(DmhpcError, match=r"point deepmerge2-weak-1x1: was measured with other settings "
                                         r"\(slurm.cpus_per_task 1 -> 2\)"):
        record_measured_with(late)
    assert (out / "submitit" / "measured_with.json").read_text() == record


def test_a_point_still_queued_is_held_to_what_it_was_submitted_with(tmp_path, monkeypatch):
    """A point queued by a --no-wait launch has no run yet; launched again with other settings, the
    queued job (re-attached) measured the old ones under the new settings' name."""
    from tests.conftest import fake_commands
    from dmhpc.launch.scaling import record_measured_with
    from dmhpc.launch.submit import JOBS_FILE

    out = tmp_path / "out"
    spec = {"base": str(TINY), "out": str(out), "executor": "slurm", "models": ["deepmerge2"], "nodes": [1],
            "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4},
            "overrides": {"data.source": "missing"}, "slurm": {"cpus_per_task": 1}}
    record_measured_with(load_study(spec))
    (out / "submitit" / JOBS_FILE).write_text(json.dumps({"deepmerge2-weak-1x1": {"job_id": "77", "tasks": 1}}))
    fake_commands(tmp_path, monkeypatch, {"squeue": "echo 77\n", "sbatch": "exit 1\n"})
    # (no run directory to remove: the job is what would measure it)
    with pytest.raises(DmhpcError, match=r"point deepmerge2-weak-1x1: was measured with other settings "
                                         r"\(slurm.cpus_per_task 1 -> 2\); .* or scancel 77 \(its job from an earlier "
                                         r"launch\) and remove \S+ if it is there to measure it again$"):
        load_study({**spec, "slurm": {"cpus_per_task": 2}})
    load_study(spec)  # the settings it was submitted with
    fake_commands(tmp_path, monkeypatch, {"squeue": "echo 78\n"})  # its job ended without a run: free
    load_study({**spec, "slurm": {"cpus_per_task": 2}})


class _ThreadsProbe:
    """A local job's task that writes the OMP_NUM_THREADS it was given (pickled into the job)."""

    def __init__(self, out):
        self.out = str(out)

    def __call__(self, config):
        import os

        with open(self.out, "a") as f:
            f.write(f"{os.environ.get('OMP_NUM_THREADS')}\n")


def test_a_local_points_threads_do_not_depend_on_the_points_left_to_run(tmp_path, monkeypatch):
    """A local point's threads came from the points still to run: the one-rank point got one thread
    beside a two-rank one, and every core when launched again alone (the other finished), its
    timing then of another setting under the same record."""
    from dmhpc.launch.submit import launch_points, local_threads
    from dmhpc.launch.scaling import measured_with

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = cpu_study(tmp_path)
    study = load_study(spec)
    alone, pair = study.points
    (pair.run_dir / "eval").mkdir(parents=True)  # the two-rank point finished
    (pair.run_dir / "eval" / "best_test.json").write_text(json.dumps({"split": "test"}))
    assert pair.finished and not alone.finished
    probe = tmp_path / "threads.txt"
    assert launch_points([alone, pair], study.resources, kind="local", folder=tmp_path / "out" / "submitit",
                         job_name="probe", task=_ThreadsProbe(probe)) == {}
    expected = local_threads(2)  # as beside the two-rank point
    assert probe.read_text() == f"{expected}\n" and measured_with(study, alone)["threads_per_rank"] == expected


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_the_threads_of_a_point_are_one_setting_however_they_were_given(tmp_path, monkeypatch, executor):
    """dmhpc's thread count was recorded as a number, the same count from OMP_NUM_THREADS (which
    many HPC shells export) as text: a study launched once with it and once without was refused at
    every point ("threads_per_rank 1 -> "1""). On Slurm the launching shell's OMP_NUM_THREADS
    reaches every rank, and was not recorded: timings of 1 thread and of a node's cores mixed."""
    from dmhpc.config import save_config
    from dmhpc.launch.scaling import record_measured_with

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if executor == "slurm":  # (the local executor's own count stands for it in the other case)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
    spec = {**cpu_study(tmp_path), "executor": executor}
    study = load_study(spec)
    record_measured_with(study)
    for p in study.points:
        p.run_dir.mkdir(parents=True)
        save_config(p.config, p.run.config_path)
    threads = json.loads((tmp_path / "out" / "submitit" / "measured_with.json").read_text())[
        study.points[0].name]["threads_per_rank"]
    assert isinstance(threads, int)
    monkeypatch.setenv("OMP_NUM_THREADS", f"{threads}")
    load_study(spec)  # the same count: not refused
    monkeypatch.setenv("OMP_NUM_THREADS", f"{threads + 1}")
    with pytest.raises(DmhpcError, match=f"threads_per_rank {threads} -> {threads + 1}"):
        load_study(spec)


def test_a_cpu_study_on_slurm_hides_the_nodes_gpus_from_its_ranks(tmp_path):
    """It asked for no GPU, and the trainer took one wherever torch saw one: on nodes whose GPUs Slurm
    does not confine, the CPU ranks trained on the node's GPUs. The line is the device's: a study
    recorded before it is measured with the same settings."""
    from dmhpc.launch.scaling import HIDE_GPUS, load_study, measured_with

    study = load_study({**cpu_study(tmp_path, slurm={"setup": ["module load x"]}), "executor": "slurm"})
    assert all(r.setup == ("module load x", HIDE_GPUS) and r.gpus_per_node == 0 for r in study.resources.values())
    assert measured_with(study, study.points[0])["slurm.setup"] == ["module load x"]
    gpu = load_study({**cpu_study(tmp_path, slurm={"setup": ["module load x"]}), "executor": "slurm", "device": "gpu"})
    assert all(r.setup == ("module load x",) for r in gpu.resources.values())
    local = load_study(cpu_study(tmp_path))  # submitit's local executor hides them from a job that asks for none
    assert all(r.setup == () for r in local.resources.values())


def test_a_cpu_study_in_the_debug_executor_on_a_gpu_machine_is_refused(tmp_path, monkeypatch):
    """Its points train in the launcher's process, which cannot hide the GPU: the table called GPU
    timings CPU ones."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(DmhpcError, match=r"device: cpu with executor debug on a machine with a GPU: its points "
                                         r"would train on the GPU, which this process cannot hide; use executor local"):
        load_study({**cpu_study(tmp_path, gpus_per_node=(1,)), "executor": "debug"})
    load_study(cpu_study(tmp_path))  # local jobs are given no GPU


def test_a_users_own_scaling_table_in_out_is_not_replaced(tmp_path):
    """An out no launch ever wrote (no submitit folder) holding a scaling.md of the user's: the first
    launch replaced it without a word, where a grid refuses its table names."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "scaling.md").write_text("my notes\n")
    with pytest.raises(DmhpcError, match=rf"out: {out}: holds scaling.md, which no launch into it wrote \(no "
                                         rf"{out / 'submitit'}\); move them or choose another out"):
        load_study(cpu_study(tmp_path))
    assert (out / "scaling.md").read_text() == "my notes\n"
    (out / "submitit").mkdir()  # a launch's: its own table, replaced by the next
    load_study(cpu_study(tmp_path))


def test_setup_lines_a_local_launch_leaves_out_are_said(tmp_path, capsys):
    """slurm.setup (modules, data staging) was left out by the local executor without a word."""
    from dmhpc.launch.submit import launch_points

    spec = cpu_study(tmp_path, gpus_per_node=[1], slurm={"setup": ["module load cuda"]})
    study = load_study(spec)
    for p in study.points:  # finished: nothing runs
        (p.run_dir / "eval").mkdir(parents=True)
        (p.run_dir / "eval" / "best_test.json").write_text(json.dumps({"split": "test"}))
    assert launch_points(list(study.points), study.resources, kind="local", folder=tmp_path / "out" / "submitit",
                         job_name="x", task=None) == {}
    assert ("warning: slurm.setup runs in SLURM jobs only; the local executor runs the jobs without it"
            in capsys.readouterr().err)


def test_a_damaged_log_is_its_points_row_not_the_whole_tables_loss(tmp_path):
    """One point's metrics.jsonl with a damaged line raised out of the table's making: no table for
    the points that were fine. That point's row now says why it has no figures."""
    from dmhpc.launch.scaling import measure

    spec = cpu_study(tmp_path)
    good, damaged = load_study(spec).points
    setup = '{"kind": "setup", "step": 0, "loader_setup_s": 0.1, "loader": "torch"}\n'
    for p, text in ((good, setup), (damaged, f"{setup}not json\n{{}}\n")):
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "metrics.jsonl").write_text(text)
    rows = scaling_table([measure(p) for p in (good, damaged)])
    write_scaling(tmp_path / "out", rows, "cpu")
    assert rows[0]["status"] == "not finished"
    assert rows[1]["status"] == f"unreadable log: {damaged.run_dir / 'metrics.jsonl'}: line 2 is not a JSON record"
    assert "unreadable log" in (tmp_path / "out" / "scaling.md").read_text()


def _as_an_older_dmhpc_recorded(tmp_path, monkeypatch, edit):
    """(spec, study) of a CPU study whose measured_with record each point's `edit(entry)` changed, as
    an older dmhpc wrote it, and whose points have their runs' config.yaml."""
    from dmhpc.config import save_config
    from dmhpc.launch.scaling import MEASURED_WITH, record_measured_with

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = cpu_study(tmp_path)
    study = load_study(spec)
    record_measured_with(study)
    path = tmp_path / "out" / "submitit" / MEASURED_WITH
    record = json.loads(path.read_text())
    for p in study.points:
        edit(record[p.name])
        p.run_dir.mkdir(parents=True)
        save_config(p.config, p.run.config_path)
    path.write_text(json.dumps(record))
    return spec, study


def test_a_record_of_an_older_dmhpc_lacks_keys_it_is_not_refused_for(tmp_path, monkeypatch):
    """A key this version records and an older one did not (the threads of a local point, a
    configuration key added since) read as changed from null: every point that had run was refused
    after an upgrade, finished ones included, though nothing about them had changed."""
    def lacking(entry):
        del entry["threads_per_rank"], entry["config.optim.discriminator_lr_mult"]

    spec, study = _as_an_older_dmhpc_recorded(tmp_path, monkeypatch, lacking)
    assert all(p.run.holds_run() for p in study.points)
    load_study(spec)
    with pytest.raises(DmhpcError, match="was measured with other settings \\(slurm.cpus_per_task null -> 2\\)"):
        load_study({**spec, "slurm": {"cpus_per_task": 2}})  # a key both know still counts


def test_a_setup_record_without_its_staging_time_leaves_that_cell_empty(tmp_path):
    """It was a KeyError out of the table's making."""
    from dmhpc.launch.scaling import measure

    spec = cpu_study(tmp_path, gpus_per_node=[1])
    (point,) = load_study(spec).points
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "metrics.jsonl").write_text('{"kind": "setup", "step": 0, "world_size": 1}\n')
    row = measure(point)
    assert math.isnan(row["staging_s"]) and row["loader"] == "" and row["status"] == "not finished"


@pytest.mark.parametrize("noda", [False, True])
def test_a_points_throughput_counts_the_images_its_steps_read(tmp_path, noda):
    """Both domains' batches, or the source's alone where no term reads the target: its trainer
    reads no target batch, and the table doubled its throughput."""
    from dmhpc.config import load_config
    from dmhpc.launch.scaling import measure
    from dmhpc.launch.spec import Point

    overrides = ["loss.transfer=none", "loss.fisher.weight=0", "loss.entropy_weight=0"] if noda else []
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "setup", "step": 0}, {"kind": "epoch", "epoch": 0, "step": 10, "step_time_s": 9.0},
               {"kind": "epoch", "epoch": 1, "step": 20, "step_time_s": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    point = Point("p", {"model": "deepmerge2", "mode": "weak", "nodes": 1, "gpus_per_node": 2, "batch_per_gpu": 4},
                  run, load_config(TINY, [f"run.dir={run}", *overrides]))
    row = measure(point)
    assert row["images_per_s"] == (1 if noda else 2) * 8 / 0.5
    assert row["images_per_s_per_gpu"] == row["images_per_s"] / 2


def test_strong_scaling_splits_the_global_batch_over_every_gpu_of_every_node(tmp_path):
    """The per-GPU batch of a strong point is the global batch over nodes x GPUs per node: split over
    one node's GPUs only, a 2-node point trained twice the study's global batch."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "models": ["deepmerge2"],
            "nodes": [1, 2], "gpus_per_node": [1, 2], "strong": {"global_batch": 8}, "epochs": 4, "max_steps": 30}
    study = load_study(spec)
    assert {p.name: p.config.train.batch_size for p in study.points} == {
        "deepmerge2-strong-1x1": 8, "deepmerge2-strong-1x2": 4, "deepmerge2-strong-2x1": 4,
        "deepmerge2-strong-2x2": 2}
    # The study's length reaches every point (and its evaluation only after the last epoch).
    assert {(p.config.train.epochs, p.config.train.max_steps, p.config.train.eval_every) for p in study.points} == {
        (4, 30, 4)}
    with pytest.raises(DmhpcError, match=r"point deepmerge2-strong-2x2: strong.global_batch 6 does not split "
                                         r"evenly over 4 GPUs"):
        load_study({**spec, "strong": {"global_batch": 6}})


def test_a_local_study_of_several_nodes_is_refused(tmp_path):
    """The local executor runs on this machine only: a study whose largest point asks for 2 nodes
    was checked against its smallest and accepted."""
    with pytest.raises(DmhpcError, match="executor: local runs on this machine only: one node, got 2 nodes"):
        load_study(cpu_study(tmp_path, gpus_per_node=[1], nodes=[1, 2]))


def test_a_finished_point_whose_log_is_damaged_fails_the_launch(tmp_path):
    """A finished point whose metrics.jsonl cannot be read has no figures in the table: the launch
    returned as if the study were complete, the empty row its only sign."""
    import torch

    from dmhpc.config import save_config

    spec = cpu_study(tmp_path, gpus_per_node=[1])
    (point,) = load_study(spec).points
    (point.run_dir / "eval").mkdir(parents=True)  # finished: nothing runs
    save_config(point.config, point.run.config_path)
    point.run.checkpoint("last").parent.mkdir()
    torch.save({}, point.run.checkpoint("last"))  # a checkpoint without progress, as dmhpc's tests write
    (point.run_dir / "eval" / "best_test.json").write_text(json.dumps({"split": "test"}))
    (point.run_dir / "metrics.jsonl").write_text('{"kind": "setup", "step": 0}\nnot json\n{}\n')
    with pytest.raises(DmhpcError) as err:
        launch_scaling(spec)
    assert str(err.value).splitlines()[1:] == [
        f"point {point.name}: unreadable log: {point.run_dir / 'metrics.jsonl'}: line 2 is not a JSON record"]
    assert "unreadable log" in (tmp_path / "out" / "scaling.md").read_text()


def test_a_longer_time_limit_is_not_another_measurement(tmp_path, monkeypatch):
    """slurm.time bounds how long a job may run, not how fast its steps are: a study launched again
    with more time for its unfinished points was refused as "measured with other settings"."""
    from dmhpc.config import save_config
    from dmhpc.launch.scaling import record_measured_with

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = cpu_study(tmp_path, gpus_per_node=[1], slurm={"time": 30})
    study = load_study(spec)
    record_measured_with(study)
    (point,) = study.points
    point.run_dir.mkdir(parents=True)  # it ran, out of time before its end
    save_config(point.config, point.run.config_path)
    load_study({**spec, "slurm": {"time": 90}})
    with pytest.raises(DmhpcError, match="was measured with other settings \\(slurm.cpus_per_task null -> 2\\)"):
        load_study({**spec, "slurm": {"time": 90, "cpus_per_task": 2}})  # a setting a timing depends on


def test_threads_recorded_as_text_by_an_older_dmhpc_are_the_same_setting(tmp_path, monkeypatch):
    """dmhpc before 2026-12-03 recorded a local point's threads as text ("1"): after an upgrade, every
    point that had run was refused as measured with other settings (threads_per_rank "1" -> 1)."""
    def as_text(entry):
        assert isinstance(entry["threads_per_rank"], int)
        entry["threads_per_rank"] = str(entry["threads_per_rank"])

    spec, _ = _as_an_older_dmhpc_recorded(tmp_path, monkeypatch, as_text)
    load_study(spec)
