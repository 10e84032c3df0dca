"""Grid and scaling launches through submitit's SLURM executor on the two-node test cluster.

Real sbatch job arrays written by submitit, real multi-task jobs whose ranks find each other
through TorchDistributedEnvironment, a real USR2 from `job._interrupt()`, a real requeue.
The cluster has no accounting, so submitit cannot ask sacct for job states: the tests wait for
the result files (job.done()) with a deadline and report the cluster's diagnostics on timeout.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dmhpc.launch.grid import load_grid
from dmhpc.launch.leaderboard import write_leaderboard
from dmhpc.launch.scaling import HIDE_GPUS, load_study, measure, scaling_table, write_scaling
from dmhpc.launch import submit
from dmhpc.launch.submit import TrainTask, submit_points, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture
def job_env(monkeypatch):
    """What the jobs inherit from this process (sbatch exports it): one thread per rank."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _wait_done(cluster, jobs: dict, timeout: float) -> None:
    """Wait until every job wrote its results; on timeout fail with the cluster's diagnostics."""
    deadline = time.monotonic() + timeout
    while not all(job.done() for job in jobs.values()):
        if time.monotonic() > deadline:
            pending = [job.job_id for job in jobs.values() if not job.done()]
            logs = "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for job in jobs.values()
                             for p in sorted(job.paths.folder.glob(f"{job.job_id}_*_log.out")))
            report = cluster.diagnostics(pending[0])
            for job_id in pending:
                cluster.run("scancel", job_id)
            pytest.fail(f"jobs {pending} not done after {timeout:.0f} s\n{logs}\n{report}", pytrace=False)
        time.sleep(1)


def _submit(launch, task=None):
    resources = launch.resources if isinstance(launch.resources, dict) else {p.name: launch.resources
                                                                              for p in launch.points}
    return submit_points(list(launch.points), resources, kind="slurm", folder=launch.out / "submitit",
                         job_name="dmhpc-test", task=task or TrainTask())


def test_grid_runs_as_a_slurm_job_array_of_ddp_jobs_and_fills_the_leaderboard(slurm_cluster, tmp_path, job_env, make_domains):
    data = make_domains(64)
    grid = load_grid({
        "base": str(TINY), "out": str(tmp_path / "grid"), "executor": "slurm",
        "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"),
                      "train.epochs": 1, "train.batch_size": 4},
        "grid": {"optim.lr": [1e-3, 3e-4]},
        # Each point: one node, two ranks (CPU processes); the two points fill both nodes at once.
        "slurm": {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "time": 10, "array_parallelism": 2}})
    jobs = _submit(grid)
    assert len({job.job_id.split("_")[0] for job in jobs.values()}) == 1  # one array
    # Launching again while they are queued or running submits nothing: it re-attaches to them.
    again = _submit(grid)
    assert {n: j.job_id for n, j in again.items()} == {n: j.job_id for n, j in jobs.items()}
    assert len(list(grid.out.glob("submitit/*_submission.sh"))) == 1
    _wait_done(slurm_cluster, jobs, timeout=300)
    assert wait_for(jobs) == {}
    for job in jobs.values():
        assert sorted(r["rank"] for r in job.results()) == [0, 1]
        log = job.task(0).paths.stdout.read_text()
        assert "world 2 on cpu" in log, log
    rows = write_leaderboard(grid.out, grid.points)
    assert [r["status"] for r in rows] == ["finished", "finished"] and rows[0]["score"] >= rows[1]["score"]
    assert [r["rank"] for r in rows] == [1, 1 if rows[0]["score"] == rows[1]["score"] else 2]  # equal scores: one rank
    with (grid.out / "leaderboard.csv").open() as f:
        assert {r["point"] for r in csv.DictReader(f)} == {"optim.lr=0.001", "optim.lr=0.0003"}
    script = next(grid.out.glob("submitit/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --ntasks-per-node=2" in script, script


def test_the_shipped_study_runs_by_the_readme_commands_submit_then_collect(slurm_cluster, tmp_path, job_env,
                                                                           make_domains):
    """configs/study/deepmerge2.yaml through `launch/grid.py FILE --no-wait`, then `launch/grid.py FILE`,
    as the README says to run it on a cluster. Shrunk to fit the CPU test cluster: two of its
    methods (the gap's two ends; the adaptation methods differ only in their overrides), one seed,
    one epoch, tiny data, CPU ranks."""
    data = make_domains(64)
    shipped = REPO / "configs" / "study" / "deepmerge2.yaml"
    study = yaml.safe_load(shipped.read_text())
    study["methods"] = {name: {**method, "base": str((shipped.parent / method["base"]).resolve())}
                        for name, method in study["methods"].items()
                        if name in ("noda", "oracle")}
    study["methods"]["oracle"]["overrides"]["data.source"] = str(data / "noisy")
    study["out"] = str(tmp_path / "study")
    study["overrides"].update({"data.source": str(data / "pristine"), "data.target": str(data / "noisy"),
                               "train.epochs": 1, "train.batch_size": 8})
    study["grid"]["seed"] = [1]
    study["slurm"] = {"cpus_per_task": 1, "time": 10, "array_parallelism": 2}
    grid_file = tmp_path / "study.yaml"
    grid_file.write_text(yaml.safe_dump(study, sort_keys=False))  # methods in the file's order
    cmd = [sys.executable, str(REPO / "launch" / "grid.py"), str(grid_file)]

    submitted = subprocess.run(cmd + ["--no-wait"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "4 point(s): 0 finished, 0 still queued, 4 submitted" in submitted.stdout, submitted.stdout
    out = tmp_path / "study"
    with (out / "leaderboard.csv").open() as f:
        assert {r["status"] for r in csv.DictReader(f)} <= {"not started", "unfinished", "finished"}

    collected = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert collected.returncode == 0, collected.stdout + collected.stderr + slurm_cluster.diagnostics()
    assert "4 submitted" not in collected.stdout and "0 submitted" in collected.stdout, collected.stdout
    assert len(list(out.glob("submitit/*_submission.sh"))) == 1  # the one array, re-attached to
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["model.name"], r["finished"], r["seeds"]) for r in rows] == [
        (m, model, "1", "1") for m in ("noda", "oracle") for model in ("deepmerge2", "resnet18")]
    for r in rows:
        run = out / r["method"] / f"model.name={r['model.name']},seed=1"
        result = json.loads((run / "eval" / "best_test.json").read_text())
        assert float(r["target_accuracy_per_seed"]) == result["target"]["accuracy"]
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == r["model.name"]
    summary = (out / "summary.md").read_text()
    assert "| method | model.name | runs |" in summary and "gap" in summary, summary


KILLED_AFTER_SBATCH = """
import os, sys
import dmhpc.launch.submit as submit
from dmhpc.cli import run
real = submit.atomic_write
def atomic_write(path, *rest, **named):  # killed (no cleanup) after sbatch, as it records the jobs
    if os.path.basename(path) == submit.JOBS_FILE:
        os._exit(137)
    return real(path, *rest, **named)
submit.atomic_write = atomic_write
run(sys.argv[1:])
"""


def test_a_launcher_killed_between_sbatch_and_its_record_is_not_submitted_twice(slurm_cluster, tmp_path, make_domains):
    """A launcher killed after sbatch and before jobs.json (SIGKILL, a lost login session) left its
    jobs queued but unrecorded: the next launch submitted every point again beside them, two jobs
    training each point in one run directory."""
    data = make_domains(64)
    out = tmp_path / "grid"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(out), "executor": "slurm", "grid": {"optim.lr": [1e-3, 3e-4]},
        "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy")},
        # Held: the jobs stay queued while the launches are checked, and are cancelled unrun.
        "slurm": {"cpus_per_task": 1, "time": 10, "additional_parameters": {"hold": True}}}))
    argv = ["grid", str(grid_file), "--no-wait"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_SBATCH, *argv], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    folder = out / "submitit"
    assert not (folder / "jobs.json").exists()

    def ours() -> list[str]:
        """The ids of the jobs squeue shows submitted from this test's folder."""
        lines = slurm_cluster.run("squeue", "-h", "-r", "-o", "%i %Z").splitlines()
        return sorted(line.split()[0] for line in lines if line.split()[1:] == [str(tmp_path)])

    assert len(ours()) == 2
    try:
        again = subprocess.run([sys.executable, "-m", "dmhpc", *argv], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "2 point(s): 0 finished, 2 still queued, 0 submitted" in again.stdout, again.stdout
        assert len(list(folder.glob("*_submission.sh"))) == 1
        recorded = json.loads((folder / "jobs.json").read_text())
        assert sorted(recorded) == ["optim.lr=0.0003", "optim.lr=0.001"]
        assert len({entry["job_id"].split("_")[0] for entry in recorded.values()}) == 1, recorded
        assert not (folder / "submitting.json").exists()
        assert ours() == sorted(entry["job_id"] for entry in recorded.values())
    finally:
        for job_id in ours():
            slurm_cluster.run("scancel", job_id)


KILLED_BEFORE_JOB_ID = """
import os, sys
import optuna
from dmhpc.cli import run
real = optuna.trial.Trial.set_user_attr
def set_user_attr(self, key, value):  # killed (no cleanup) after sbatch, as it records the job id
    if key == "job_id":
        os._exit(137)
    return real(self, key, value)
optuna.trial.Trial.set_user_attr = set_user_attr
run(sys.argv[1:])
"""


def test_a_tuner_killed_between_sbatch_and_the_job_id_has_its_job_cancelled_by_the_next(slurm_cluster, tmp_path,
                                                                                         make_domains):
    """A tuner killed after sbatch and before it recorded the trial's job id (SIGKILL, a lost login
    session) left the job unnamed: the next tuner reran the trial beside it, two jobs in one run
    directory (the rerun failed as "in use" and spent the budget). It is found by its comment."""
    from dmhpc.launch.tune import _lock, _open_study, _requeue_stale, load_tune

    data = make_domains(64)
    tune_file = tmp_path / "tune.yaml"
    tune_file.write_text(yaml.safe_dump({
        "base": str(TINY), "out": str(tmp_path / "tune"), "executor": "slurm", "objective": "im", "trials": 1,
        "parallel": 1, "pruner": False, "space": {"optim.lr": [1e-3, 3e-4]},
        "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy")},
        # Held: the job stays queued while it is looked for, and is cancelled unrun.
        "slurm": {"cpus_per_task": 1, "time": 10, "additional_parameters": {"hold": True}}}))
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_JOB_ID, "tune", str(tune_file)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert killed.returncode == 137, killed.stdout + killed.stderr

    def ours() -> list[str]:
        lines = slurm_cluster.run("squeue", "-h", "-r", "-o", "%i %Z").splitlines()
        return [line.split()[0] for line in lines if line.split()[1:] == [str(tmp_path)]]

    assert len(ours()) == 1
    try:
        t = load_tune(tune_file)
        with _lock(t.out):
            study = _open_study(t)
            assert _requeue_stale(study, t.out / "submitit") == 1
        assert ours() == []
        assert [tr.state.name for tr in study.get_trials()] == ["FAIL", "WAITING"]
    finally:
        for job_id in ours():
            slurm_cluster.run("scancel", job_id)


@pytest.fixture
def slow_requeue(tmp_path, monkeypatch):
    """`scontrol requeue` that returns 3 s after the requeue, as a loaded controller may: the requeue
    ends the job's step at once (SIGTERM to every process of it), so a job's own requeue call is
    always still running when the signal comes. Put first on the PATH the jobs inherit."""
    real = shutil.which("scontrol")
    shim = tmp_path / "bin" / "scontrol"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/bash\n"{real}" "$@"; rc=$?\n[ "$1" != requeue ] || sleep 3\nexit $rc\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")


def test_interrupted_job_requeues_resumes_and_ends_with_the_uninterrupted_weights(slurm_cluster, tmp_path,
                                                                                   job_env, make_domains,
                                                                                   slow_requeue):
    # 480 images, 70 % for training, 4 per rank and step on 2 ranks: one epoch of 42 steps, so the
    # signal, sent after the first step, lands well inside it.
    data = make_domains(480)
    spec = {"base": str(TINY), "executor": "slurm", "grid": {"seed": [3]},
            "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"),
                          "train.epochs": 1, "train.batch_size": 4, "train.log_every": 1},
            # Two nodes, one rank each: the ranks meet at the first node's address.
            "slurm": {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10}}
    reference = load_grid({**spec, "out": str(tmp_path / "reference")})
    interrupted = load_grid({**spec, "out": str(tmp_path / "interrupted")})
    jobs = {"reference": _submit(reference)["seed=3"], "interrupted": _submit(interrupted)["seed=3"]}
    job = jobs["interrupted"]
    run = interrupted.points[0].run_dir
    metrics = run / "metrics.jsonl"
    slurm_cluster.wait_for(lambda: metrics.is_file() and '"kind": "step"' in metrics.read_text(),
                           "training step", job.job_id, timeout=180)
    job._interrupt()  # what submitit's own tests do: scancel --signal SIGTERM, then USR2
    _wait_done(slurm_cluster, jobs, timeout=400)
    assert wait_for(jobs) == {}

    record = slurm_cluster.wait(job.job_id, timeout=60)  # the results are written before the job ends
    assert (record.state, record.restarts) == ("COMPLETED", 1), record
    log = job.task(0).paths.stdout.read_text()
    # The trainer's handler had the signal during training; submitit's took over on rank 0 and its
    # `scontrol requeue` outlived the SIGTERM that the requeue sends the step. Killed by it, the
    # handler failed and wrote an error result for a job that was requeued: a waiter polling then
    # reported the point failed.
    assert "SIGUSR2: checkpoint written at step" in log and "Requeued job" in log, log
    assert "triggered an exception" not in log, log
    assert "resumed from" in log and "Bypassing signal SIGTERM" in log, log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, 43)), steps
    assert slurm_cluster.job(jobs["reference"].job_id).restarts == 0
    a = torch.load(reference.points[0].run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _task_pid(job_id: str, procid: int) -> int | None:
    """The pid of the submitit task process of rank `procid` in job `job_id` (an array's "ID_TASK")."""
    array_job, _, task = job_id.partition("_")
    want = {f"SLURM_ARRAY_JOB_ID={array_job}", f"SLURM_ARRAY_TASK_ID={task}"} if task else {f"SLURM_JOB_ID={job_id}"}
    want.add(f"SLURM_PROCID={procid}")
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if b"submitit.core._submit" not in (entry / "cmdline").read_bytes():
                continue
            if want <= set((entry / "environ").read_bytes().decode(errors="replace").split("\0")):
                return int(entry.name)
        except OSError:
            continue  # gone meanwhile
    return None


def test_a_rank_killed_ends_the_other_ranks_of_its_job(slurm_cluster, tmp_path, job_env, make_domains, monkeypatch):
    """A rank killed before the rendezvous (out of memory, a lost node) left the other rank waiting
    there until the 30-minute timeout: submitit's srun had no --kill-on-bad-exit."""
    data = make_domains(64)
    grid = load_grid({
        "base": str(TINY), "out": str(tmp_path / "grid"), "executor": "slurm", "grid": {"seed": [1]},
        "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"),
                      "train.epochs": 1, "train.batch_size": 4},
        "slurm": {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10}})
    job = _submit(grid)["seed=1"]
    pid = None
    deadline = time.monotonic() + 120
    while pid is None:  # rank 1 is caught in its imports, seconds before it can reach the rendezvous
        assert time.monotonic() < deadline, slurm_cluster.diagnostics(job.job_id)
        pid = _task_pid(job.job_id, 1)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    record = slurm_cluster.wait(job.job_id, timeout=120)  # srun's KillWait (30 s) included
    assert (record.state, record.restarts) == ("FAILED", 0), record
    assert not (grid.points[0].run_dir / "checkpoints" / "last.pt").exists()
    # Without accounting (as here) submitit knows a job's end by its result file, which this one
    # never wrote: the launcher waited for it for ever.
    monkeypatch.setattr(submit, "GONE_AFTER_S", 2.0)
    monkeypatch.setattr(submit, "WAIT_POLL_S", 0.5)
    assert wait_for({"seed=1": job}) == {"seed=1": f"job {job.job_id} ended without a result (killed? Slurm no "
                                                   f"longer lists it and keeps no record here to say why; its log: "
                                                   f"{job.task(0).paths.stdout})"}


def test_scaling_study_one_versus_two_nodes(slurm_cluster, tmp_path, job_env, make_domains):
    data = make_domains(64)
    study = load_study({
        "base": str(TINY), "out": str(tmp_path / "scaling"), "executor": "slurm", "models": ["deepmerge2"],
        "nodes": [1, 2], "gpus_per_node": [1], "device": "cpu", "weak": {"batch_per_gpu": 4}, "epochs": 2,
        "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy")},
        "slurm": {"cpus_per_task": 1, "time": 10}})
    jobs = _submit(study, TrainTask())
    _wait_done(slurm_cluster, jobs, timeout=300)
    assert wait_for(jobs) == {}
    scripts = list((study.out / "submitit").glob("*_submission.sh"))  # CPU ranks see no GPU of the node's
    assert scripts and all(f"\n{HIDE_GPUS}\n" in script.read_text() for script in scripts)
    rows = scaling_table([measure(p) for p in study.points])
    write_scaling(study.out, rows, study.device)
    assert [(r["nodes"], r["gpus"], r["global_batch"], r["status"]) for r in rows] == [
        (1, 1, 4, "finished"), (2, 2, 8, "finished")]
    one, two = rows
    assert one["speedup"] == 1.0 and one["efficiency"] == 1.0
    assert two["speedup"] == pytest.approx(two["images_per_s"] / one["images_per_s"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert all(r["warmup_excluded"] and r["staging_s"] > 0 and r["images_per_s"] > 0 for r in rows), rows
    with (study.out / "scaling.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (study.out / "scaling.png").stat().st_size > 0


def test_a_tune_runs_its_trials_as_slurm_jobs(slurm_cluster, tmp_path, job_env, make_domains):
    """dmhpc tune through the SLURM executor: each trial a job, two at once, the study in a journal."""
    import optuna

    from dmhpc.launch.tune import JOURNAL, tune

    data = make_domains(64)
    best = tune({"base": str(TINY), "out": str(tmp_path / "tune"), "executor": "slurm", "objective": "im",
                 "trials": 2, "parallel": 2, "pruner": False, "space": {"optim.lr": [1e-3, 3e-4]},
                 "enqueue": [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}],
                 "overrides": {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"),
                               "train.epochs": 1, "train.batch_size": 4},
                 "slurm": {"cpus_per_task": 1, "time": 10}}, poll_s=1.0)
    study = optuna.load_study(study_name="dmhpc-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "tune" / JOURNAL))))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["executor"] == "slurm" for t in trials)
    assert len({t.user_attrs["job_id"] for t in trials}) == 2  # one SLURM job per trial
    assert best["value"] == max(t.value for t in trials)
