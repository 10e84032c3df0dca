"""Executors and their resources (dmhpc/launch/submit.py): Slurm time limits, executor shapes, the
sbatch options a site sets, and the threads of local ranks."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import torch

from tests.conftest import TINY, fake_commands, tiny_overrides
from dmhpc.config import config_to_dict
from dmhpc.errors import DmhpcError
from dmhpc.launch import load_grid
from dmhpc.launch.spec import resolve_point
from dmhpc.launch import submit
from dmhpc.launch.spec import Point
from dmhpc.launch.submit import (Resources, TrainTask, local_gpus, local_threads, make_executor, pick_gpus,
                                 preempt_signal, sigterm_as_interrupt, slurm_minutes, submission)


def test_slurm_time_formats():
    assert [slurm_minutes(v) for v in (30, "30", "90:30", "02:00:00", "1-12", "1-00:00:30")] == \
        [30, 30, 91, 120, 2160, 1441]
    for bad in ("2h", 0, "00:00:00", True, 1.5):
        with pytest.raises(ValueError):
            slurm_minutes(bad)


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


@pytest.mark.parametrize("gpus, running, wanted, expected", [
    ((0, 1, 2, 3), [], 1, (0,)),
    ((0, 1, 2, 3), [(0,), (1,)], 1, (2,)),              # jobs running at once: a GPU each
    ((0, 1, 2, 3), [(0,), (2,)], 2, (1, 3)),
    ((0, 1, 2, 3), [(1,)], 1, (0,)),                    # one freed by a job that ended is taken again
    ((0, 1), [(0,), (1,)], 1, (0,)),                    # more jobs than GPUs: shared evenly, never all on 0
    ((0, 1), [(0,), (1,), (0,)], 1, (1,)),
    ((2, 5), [(2,)], 1, (5,)),                          # the launcher's CUDA_VISIBLE_DEVICES
    ((0, 1), [], 0, None),                              # CPU ranks
    ((), [], 1, None),                                  # no GPU known: submitit's default
    (None, [], 1, None),
    ((0,), [], 2, None),                                # fewer than the job wants: submitit's default
])
def test_local_jobs_running_at_once_get_gpus_of_their_own(gpus, running, wanted, expected):
    """Every local job got GPU 0 (submitit's default): jobs running together shared it while the
    others idled."""
    assert pick_gpus(gpus, running, wanted) == expected


def test_the_gpus_local_jobs_may_use_follow_the_launchers_cuda_visible_devices(monkeypatch):
    for visible, expected in (("2,5", (2, 5)), ("3", (3,)), ("1, 3", (1, 3)), ("0,-1,2", (0,))):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local_gpus(1) == expected, visible
        assert local_gpus(0) is None  # no GPU wanted: none handed out
    # Fewer than a job wants: submitit gave it GPUs 0.. anyway, those the launcher's
    # CUDA_VISIBLE_DEVICES had kept from it (or none there at all: "", and CUDA's "-1").
    for visible, wanted, count in (("", 1, 0), ("3", 2, 1), ("-1", 1, 0), ("0,-1,2", 2, 1)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(DmhpcError, match=rf"^gpus_per_node {wanted}: CUDA_VISIBLE_DEVICES='{visible}' gives "
                                             rf"{count} GPU\(s\) here for local jobs; ask for fewer"):
            local_gpus(wanted)
    # By UUID: submitit takes indices, and gave the job GPUs 0.., perhaps not those.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3a,GPU-19bc")
    with pytest.raises(DmhpcError, match=r"^gpus_per_node 1: CUDA_VISIBLE_DEVICES='GPU-8f3a,GPU-19bc' names GPUs by "
                                         r"UUID, and local jobs are given indices; list them by index"):
        local_gpus(1)
    assert local_gpus(0) is None


def test_a_debug_point_that_wants_a_gpu_where_there_is_none_is_refused(tmp_path, monkeypatch):
    """The debug executor trains in this process, on what torch sees: a point that wants a GPU on a
    machine without one trained on the CPU (a scaling study's GPU table then held CPU timings),
    where the local executor refuses it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ran = []
    point = Point("a", {}, tmp_path / "a", resolve_point(TINY, {"run.dir": str(tmp_path / "a")}))
    with pytest.raises(DmhpcError, match=r"^gpus_per_node 1: CUDA_VISIBLE_DEVICES='' gives 0 GPU\(s\) here"):
        submit.launch_points([point], {"a": Resources(gpus_per_node=1)}, kind="debug", folder=tmp_path / "submitit",
                             job_name="dmhpc-test", task=ran.append)
    assert ran == [] and not (tmp_path / "a").exists()


def _note_gpus(config: dict) -> None:
    run = Path(config["run"]["dir"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "gpus").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
    time.sleep(3)  # both points run at once


def test_local_points_running_at_once_run_on_gpus_of_their_own(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    points = [Point(name, {}, tmp_path / name, resolve_point(TINY, {"run.dir": str(tmp_path / name)}))
              for name in ("a", "b")]
    res = Resources(gpus_per_node=1, array_parallelism=2, time_min=5)
    assert submit._launch_local(points, {"a": res, "b": res}, folder=tmp_path / "submitit", job_name="dmhpc-test",
                                task=_note_gpus, poll_s=0.2) == {}
    assert sorted((tmp_path / name / "gpus").read_text() for name in ("a", "b")) == ["2", "5"]
    out = capsys.readouterr().out
    assert "point a: local job" in out and "on GPU(s) 2" in out and "on GPU(s) 5" in out


def _note_ran(config: dict) -> None:
    run = Path(config["run"]["dir"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "ran").write_text("")


def test_nvidia_smi_is_asked_only_when_a_local_point_wants_a_gpu(tmp_path, monkeypatch):
    """CPU grids ran `nvidia-smi -L` (up to 30 s on a node whose driver hangs) for GPUs they never use."""
    calls = tmp_path / "nvidia-smi-calls"
    fake_commands(tmp_path, monkeypatch, {"nvidia-smi": f'echo "$@" >> {calls}\necho "GPU 0: fake (UUID: GPU-0)"\n'})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for gpus in (0, 1):
        name = f"gpus{gpus}"
        point = Point(name, {}, tmp_path / name, resolve_point(TINY, {"run.dir": str(tmp_path / name)}))
        res = Resources(gpus_per_node=gpus, time_min=5)
        assert submit._launch_local([point], {name: res}, folder=tmp_path / f"submitit-{name}", job_name="dmhpc-test",
                                    task=_note_ran, poll_s=0.2) == {}
        assert (tmp_path / name / "ran").exists()
        assert calls.exists() == bool(gpus), gpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch finds no GPU")
def test_local_points_wanting_a_gpu_where_none_can_be_found_are_refused(tmp_path, monkeypatch, capsys):
    """Without nvidia-smi (or with one that fails) the GPUs could not be told, so nothing was refused:
    the job found no GPU and trained on the CPU, and a scaling study's GPU table held CPU timings."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    point = Point("gpu", {}, tmp_path / "gpu", resolve_point(TINY, {"run.dir": str(tmp_path / "gpu")}))
    for nvidia_smi in ("echo 'NVIDIA-SMI has failed' >&2; exit 9\n", None):
        if nvidia_smi:
            fake_commands(tmp_path, monkeypatch, {"nvidia-smi": nvidia_smi})
        else:
            monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                                        if not (Path(d) / "nvidia-smi").exists()))
        with pytest.raises(DmhpcError, match=r"^gpus_per_node 1: nvidia-smi cannot list GPUs and torch finds 0 "
                                             r"GPU\(s\) here for local jobs; ask for fewer \(0 runs on the CPU\)"):
            submit._launch_local([point], {"gpu": Resources(gpus_per_node=1)}, folder=tmp_path / "submitit",
                                 job_name="dmhpc-test", task=_note_ran)
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "submitit").exists()


def test_local_points_wanting_more_gpus_than_visible_are_refused_before_any_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    points = [Point(name, {}, tmp_path / name, resolve_point(TINY, {"run.dir": str(tmp_path / name)}))
              for name in ("cpu", "gpu")]
    res = {"cpu": Resources(time_min=5), "gpu": Resources(gpus_per_node=1, time_min=5)}
    with pytest.raises(DmhpcError, match="^gpus_per_node 1: CUDA_VISIBLE_DEVICES='' gives 0 GPU"):
        submit._launch_local(points, res, folder=tmp_path / "submitit", job_name="dmhpc-test", task=_note_ran)
    assert not (tmp_path / "cpu").exists() and not (tmp_path / "submitit").exists()
    assert capsys.readouterr().out == ""


def test_sbatch_options_for_a_site(tmp_path):
    """What a site changes in the slurm section reaches the sbatch script submitit writes. --requeue
    always: under a site's JobRequeue=0 the requeue at the time limit's signal failed every job."""
    res = Resources(nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, mem_gb=64, time_min=90,
                    partition="gpu", account="astro42", qos="normal", constraint="a100", exclusive=True,
                    setup=("module load cuda",), additional_parameters=(("mail-type", "END"),))
    ex = make_executor("slurm", tmp_path, res, "dmhpc-test")
    script = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                 "--time=90", "--partition=gpu", "--account=astro42", "--qos=normal", "--constraint=a100",
                 "--exclusive", "--mail-type=END", "--signal=USR2@90", "--open-mode=append", "--requeue"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "module load cuda" in script
    # srun (Slurm >= 22.05) does not take --cpus-per-task from the job: the tasks would get 1 CPU each.
    assert "srun --unbuffered" in script and "--cpus-per-task=8 " in script.split("srun --unbuffered", 1)[1]
    cpu = make_executor("slurm", tmp_path, Resources(tasks_per_node=2), "dmhpc-test")
    assert "gpus-per-node" not in cpu._executor._make_submission_file_text("python -m x", "uid")
    # A GPU type where the site has it as a GRES type only: every way of asking was refused.
    typed = make_executor("slurm", tmp_path, Resources(gpus_per_node=4, tasks_per_node=4, gpu_type="a100"), "x")
    assert "#SBATCH --gpus-per-node=a100:4\n" in typed._executor._make_submission_file_text("python -m x", "uid")
    from dmhpc.checks import Problems

    problems = Problems("g.yaml")
    assert submit.read_resources(problems, {"gpus_per_node": 2, "gpu_type": "h100"}, shape=True,
                                 executor="slurm").gpu_type == "h100" and not problems.lines
    for section, said in (({"gpu_type": "a100"}, "slurm.gpu_type: a type of GPU, and slurm.gpus_per_node asks for none"),
                          ({"gpus_per_node": 1, "gpu_type": "a100:2"}, "slurm.gpu_type: a GRES type name such as a100")):
        problems = Problems("g.yaml")
        submit.read_resources(problems, section, shape=True, executor="slurm")
        assert [line for line in problems.lines if said in line], problems.lines


def test_a_warning_signal_no_earlier_than_the_start_is_refused():
    """slurm.time 1 with the default signal_delay_s 90 was taken: submitit's local executor never
    sent the signal, and the run was killed at its limit without a checkpoint (under SLURM the
    signal comes at once)."""
    from dmhpc.checks import Problems

    for section, executor, refused in (({"time": 1}, "local", True), ({"time": 2}, "local", False),
                                       ({"time": "00:02:00", "signal_delay_s": 120}, "local", True),
                                       ({"signal_delay_s": 9999}, "local", False),  # (no limit here)
                                       ({"signal_delay_s": 3600}, "slurm", True)):  # (60 min by default)
        problems = Problems("g.yaml")
        submit.read_resources(problems, section, shape=True, executor=executor)
        said = [line for line in problems.lines if "slurm.signal_delay_s: " in line]
        assert bool(said) is refused, (section, problems.lines)
        assert not said or "s before the end of a time limit of " in said[0]


def test_sbatch_options_the_launcher_sets_are_refused_in_additional_parameters(tmp_path):
    """Written after the launcher's own, they replaced them: {nodes: 2} trained 2 ranks where the
    point recorded 1, {signal: "USR1@30"} kept the requeue signal from the trainer. A key that is no
    string crashed sorting them (a TypeError)."""
    import re

    from dmhpc.checks import Problems

    site = Resources(nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, mem_gb=64, time_min=90,
                     partition="gpu", account="astro42", qos="normal", constraint="a100", exclusive=True)
    script = make_executor("slurm", tmp_path, site, "x")._executor._make_submission_file_text("python -m x", "uid")
    emitted = set(re.findall(r"^#SBATCH --([\w-]+)", script, re.M)) - {"wckey"}  # accounting only: the site's
    owned = emitted | {"ntasks", "gpus", "gpus-per-task", "gres", "error", "array", "ntasks_per_node", "open_mode"}
    extra = {**{o: "gpu:1" for o in owned}, "sig": "USR1@30", 1: "x", "mail-type": "END", "wckey": "astro"}
    extra["exclusive"] = "true"  # what slurm.exclusive says; "user" (nodes shared with one's own jobs) it cannot
    problems = Problems("g.yaml")
    res = submit.read_resources(problems, {"additional_parameters": extra}, shape=True, executor="slurm")
    assert res.additional_parameters == (("mail-type", "END"), ("wckey", "astro"))
    lines = problems.lines
    for o in owned:
        assert sum(line.startswith(f"g.yaml: slurm.additional_parameters.{o}: set by ") for line in lines) == 1, o
    for want in ("slurm.additional_parameters.nodes: set by slurm.nodes",
                 "slurm.additional_parameters.ntasks_per_node: set by slurm.tasks_per_node",
                 "slurm.additional_parameters.signal: set by slurm.signal_delay_s",
                 "slurm.additional_parameters.time: set by slurm.time",
                 "slurm.additional_parameters.gpus-per-node: set by slurm.gpus_per_node",
                 "slurm.additional_parameters.sig: abbreviates --signal, set by slurm.signal_delay_s",
                 "slurm.additional_parameters: key 1 is not an sbatch option name"):
        assert sum(line.startswith(f"g.yaml: {want}") for line in lines) == 1, (want, lines)
    assert len(lines) == len(owned) + 2
    # --mem=0 (all of a node's memory) is said by mem_gb: 0.
    problems = Problems("m.yaml")
    zero = submit.read_resources(problems, {"mem_gb": 0, "additional_parameters": {"mem": 0}}, shape=True,
                                 executor="slurm")
    assert problems.lines == ["m.yaml: slurm.additional_parameters.mem: set by slurm.mem_gb (0: all of the node's)"]
    script = make_executor("slurm", tmp_path, zero, "x")._executor._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --mem=0GB\n" in script
    # A scaling study's shape is its lists'; a generic resource that is no GPU is the site's.
    problems = Problems("s.yaml")
    res = submit.read_resources(problems, {"additional_parameters": {"nodes": 2, "gres": "lscratch:10",
                                                                     "exclusive": "user"}},
                                shape=False, executor="slurm")
    assert problems.lines == ["s.yaml: slurm.additional_parameters.nodes: set by the study's nodes and "
                              "gpus_per_node lists"]
    assert res.additional_parameters == (("exclusive", "user"), ("gres", "lscratch:10"))


def _local_limits() -> tuple[str, str]:
    return os.environ["SUBMITIT_LOCAL_TIMEOUT_S"], os.environ["SUBMITIT_LOCAL_SIGNAL_DELAY_S"]


def test_a_local_run_has_no_time_limit_unless_given_one(tmp_path):
    """submitit's local controller cut every local run off at slurm.time's default of an hour, and
    failed the point after max_num_timeout cut-offs; it warned 30 s ahead, not signal_delay_s."""
    folder = tmp_path / "submitit"
    timeout_s, _ = make_executor("local", folder, Resources(), "dmhpc-test").submit(_local_limits).result()
    assert int(timeout_s) >= 365 * 86400
    given = make_executor("local", folder, Resources(time_min=5, signal_delay_s=45), "dmhpc-test")
    assert given.submit(_local_limits).result() == ("300", "45")
    script = make_executor("slurm", tmp_path, Resources(), "dmhpc-test")._executor._make_submission_file_text(
        "python -m x", "uid")
    assert "#SBATCH --time=60\n" in script and "#SBATCH --signal=USR2@90\n" in script


def test_prepare_mpi_gives_srun_the_jobs_cpus_per_task(tmp_path):
    """srun (Slurm >= 22.05) does not take --cpus-per-task from the job: slurm/prepare_mpi.sh's ranks
    got one CPU each, whatever sbatch --cpus-per-task asked for."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    calls = tmp_path / "srun-calls"
    (fake / "srun").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "srun").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "SLURM_MPI_TYPE"}, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "6", "PYTHON": sys.executable}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", "slurm/prepare_mpi.sh", "configs/data/embedded.yaml", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text() == (f"--mpi=pmi2 --cpus-per-task=6 --kill-on-bad-exit=1 --export=ALL {sys.executable} -m "
                                 f"dmhpc prepare --data-config configs/data/embedded.yaml --out {tmp_path}\n")
    # Under salloc without -n there is no SLURM_NTASKS (srun starts one task per node): `set -u`
    # ended the script at its message, before any srun.
    calls.unlink()
    del env["SLURM_NTASKS"]
    proc = subprocess.run(["bash", "slurm/prepare_mpi.sh", "configs/data/embedded.yaml", "--out", str(tmp_path)],
                          cwd=root, env={**env, "SLURM_NNODES": "2"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "job 77, 2 ranks: " in proc.stdout, proc.stderr
    assert calls.read_text().startswith("--mpi=pmi2 --cpus-per-task=6")


def refuse_sbatch(tmp_path, monkeypatch) -> None:
    """An sbatch first on PATH that refuses every job, as a site's sbatch refuses an unknown partition."""
    fake_commands(tmp_path, monkeypatch, {"sbatch": 'echo "sbatch: error: invalid partition specified: gpuu" >&2\n'
                                                    'echo "sbatch: error: Invalid partition name specified" >&2\nexit 1\n'})


def test_a_refused_sbatch_is_one_line_naming_sbatchs_reason(tmp_path, monkeypatch, capsys):
    """sbatch refusing the job array (a wrong partition, account or QOS, a controller out of reach)
    ended `dmhpc grid` in submitit's 40-line FailedJobError traceback, after sbatch's own lines."""
    from dmhpc.cli import main

    refuse_sbatch(tmp_path, monkeypatch)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm",
                                         "grid": {"seed": [0, 1]}, "slurm": {"partition": "gpuu"}}))
    assert main(["grid", str(grid_file)]) == 1
    err = capsys.readouterr().err
    assert err == ("dmhpc grid: error: sbatch refused the job array of 2 point(s): sbatch: error: invalid partition "
                   "specified: gpuu; sbatch: error: Invalid partition name specified\n"), err
    assert not (tmp_path / "out" / "submitit" / "jobs.json").exists()
    assert not (tmp_path / "out" / "leaderboard.md").exists()
    # The pickled calls and sbatch script submitit wrote for the refused jobs were left behind, and
    # the OUT the launch had made, holding its lock alone: a study that seemed begun.
    assert not (tmp_path / "out").exists()
    # An OUT that was there is kept, with what it held.
    (tmp_path / "out" / "submitit").mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["grid", str(grid_file)]) == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["notes.txt", "submitit"]
    assert os.listdir(tmp_path / "out" / "submitit") == ["launch.lock"]


def test_a_queued_job_of_another_configuration_is_never_taken_for_the_point(tmp_path, monkeypatch, capsys):
    """A relaunch re-attaches to the points' jobs still queued; a job submitted before the launch file
    changed runs the configuration pickled then, and its results passed for the new file's."""
    from dmhpc.cli import main

    # Both still queued; squeue lists the launching user's jobs only (a site's whole queue was listed).
    mine = f'case "$*" in *--user={os.getuid()}*) echo 1234_0; echo 1234_1;; *) echo everyone >&2; exit 1;; esac\n'
    fake_commands(tmp_path, monkeypatch, {"sbatch": 'echo "Submitted batch job 1234"\n', "squeue": mine})
    grid = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm", "grid": {"seed": [0, 1]},
            "overrides": {"optim.lr": 0.05}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert "2 point(s): 0 finished, 0 still queued, 2 submitted" in capsys.readouterr().out
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert "2 point(s): 0 finished, 2 still queued, 0 submitted" in capsys.readouterr().out
    grid["overrides"]["optim.lr"] = 0.001  # the point names stay: seed=0, seed=1
    grid_file.write_text(yaml.safe_dump(grid))
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    assert capsys.readouterr().err == (
        "dmhpc grid: error: point seed=0: its Slurm job 1234_0, still queued or running, was submitted with another "
        "configuration (the launch file changed since); scancel 1234_0 and launch again, or restore the file\n")
    grid["overrides"]["optim.lr"] = 0.05
    # Another job shape: the queued job's ranks train the point, whatever the file now says.
    grid_file.write_text(yaml.safe_dump({**grid, "slurm": {"nodes": 2}}))
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    assert capsys.readouterr().err == (
        "dmhpc grid: error: point seed=0: its Slurm job 1234_0, still queued or running, runs 1 rank(s); the launch "
        "file now asks 2; scancel 1234_0 and launch again, or restore the file\n")
    # Run here instead: the local run and the queued Slurm job met in the run directory.
    grid_file.write_text(yaml.safe_dump(grid))
    for executor in ("local", "debug"):
        assert main(["grid", str(grid_file), "--executor", executor]) == 1
        err = capsys.readouterr().err
        assert err == ("dmhpc grid: error: point seed=0: its Slurm job 1234_0 from an earlier launch into this out is "
                       "still queued or running (and 1 more); launch with the slurm executor (which waits for it), "
                       "or scancel it first\n"), err
    assert not (tmp_path / "out" / "seed=0").exists()


def test_a_queued_job_of_an_older_dmhpc_is_re_attached_where_only_keys_added_since_differ(tmp_path, monkeypatch,
                                                                                         capsys):
    """A job queued before dmhpc gained a configuration key runs with that key's default (its
    configuration is read through the schema): a relaunch after the upgrade refused every queued
    job as "submitted with another configuration", losing their places in the queue."""
    import hashlib

    from dmhpc.cli import main
    from dmhpc.config import config_from_dict, config_to_dict

    fake_commands(tmp_path, monkeypatch, {"sbatch": 'echo "Submitted batch job 1234"\n',
                                          "squeue": "echo 1234_0\necho 1234_1\n"})
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm",
                                         "grid": {"seed": [0, 1]}}))
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    jobs = tmp_path / "out" / "submitit" / "jobs.json"
    recorded = json.loads(jobs.read_text())
    for entry in recorded.values():  # as an older dmhpc, without keys added since
        del entry["config"]["optim"]["discriminator_lr_mult"], entry["config"]["data"]["verify"]
    jobs.write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert "2 point(s): 0 finished, 2 still queued, 0 submitted" in capsys.readouterr().out
    # Older still: the hash of the configuration, which keys added since do change.
    for entry in recorded.values():
        whole = config_to_dict(config_from_dict(entry["config"]))
        entry["config"] = hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()[:16]
    jobs.write_text(json.dumps(recorded))
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert "2 point(s): 0 finished, 2 still queued, 0 submitted" in capsys.readouterr().out
    recorded["seed=0"]["config"] = "0" * 16
    jobs.write_text(json.dumps(recorded))
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    assert "point seed=0: its Slurm job 1234_0, still queued or running, was submitted with another" in \
        capsys.readouterr().err
    # A key dmhpc no longer knows: the queued job would fail on it.
    recorded["seed=0"]["config"] = {**config_to_dict(config_from_dict({})), "gone": 1}
    jobs.write_text(json.dumps(recorded))
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    assert "point seed=0: its Slurm job 1234_0, still queued or running, was submitted with another" in \
        capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text.replace("}\n}", "},\n}"), "not valid JSON (Expecting property name enclosed in double quotes"),
    (lambda text: text.replace(' "tasks": 1,\n', "", 1), "point seed=0: tasks must be the job's number of tasks, a "
                                                         "positive integer, got nothing"),
    (lambda text: text.replace('"1234_1"', "1234"), 'point seed=1: job_id must be a Slurm job id in quotes, such as '
                                                    '"1234_0", got 1234'),
], ids=["trailing-comma", "no-tasks", "numeric-job-id"])
def test_a_damaged_jobs_file_is_one_line_and_submits_nothing(tmp_path, monkeypatch, capsys, damage, problem):
    """A hand-edited OUT/submitit/jobs.json ended the launch in a JSONDecodeError or KeyError traceback,
    or (a job id as a number, never in squeue's list) submitted the point again beside its queued job."""
    from dmhpc.cli import main

    submitted = tmp_path / "sbatch-calls"
    fake_commands(tmp_path, monkeypatch, {"sbatch": f'echo x >> {submitted}\necho "Submitted batch job 1234"\n',
                                          "squeue": "echo 1234_0\necho 1234_1\n"})  # both still queued
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm",
                                         "grid": {"seed": [0, 1]}}))
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    jobs = tmp_path / "out" / "submitit" / "jobs.json"
    text = jobs.read_text()
    jobs.write_text(damage(text))
    assert jobs.read_text() != text
    capsys.readouterr()
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dmhpc grid: error: {jobs}: {problem}") and err.count("\n") == 1, err
    assert err.endswith("; repair it, or remove it (points whose jobs are still queued are then submitted again)\n")
    assert submitted.read_text() == "x\n"  # the first launch's array only


def test_a_damaged_submission_record_is_one_line_and_submits_nothing(tmp_path, monkeypatch, capsys):
    """OUT/submitit/submitting.json, left by a launcher killed between sbatch and jobs.json, is how the
    next launch finds that launcher's jobs: a hand-edited one is refused, not ignored (its jobs'
    points would be submitted a second time)."""
    from dmhpc.cli import main

    submitted = tmp_path / "sbatch-calls"
    fake_commands(tmp_path, monkeypatch, {"sbatch": f'echo x >> {submitted}\necho "Submitted batch job 1234"\n',
                                          "squeue": "true\n"})
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm",
                                         "grid": {"seed": [0, 1]}}))
    pending = tmp_path / "out" / "submitit" / "submitting.json"
    pending.parent.mkdir(parents=True)
    pending.write_text('{"token": "abc", "tasks": 1, "points": ["seed=0"]}')
    assert main(["grid", str(grid_file), "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert err == (f"dmhpc grid: error: {pending}: damaged (no key 'configs'); remove it, after scancel of any job squeue "
                   f"shows with the comment dmhpc-launch:<token> (its points are then submitted again)\n"), err
    assert not submitted.exists()
    # Entries checked as jobs.json's are: a traceback, or a jobs.json dmhpc wrote and then refused.
    for fields, problem in (('"tasks": 1, "points": [["x"]], "configs": [{}]', "a field of the wrong type"),
                            ('"tasks": 0, "points": ["seed=0"], "configs": [{}]',
                             "point seed=0: tasks must be the job's number of tasks, a positive integer, got 0"),
                            ('"tasks": 1, "points": ["seed=0"], "configs": [1]',
                             "point seed=0: config must be the configuration its job was submitted with, got 1")):
        pending.write_text('{"token": "abc", ' + fields + '}')
        assert main(["grid", str(grid_file), "--no-wait"]) == 1
        assert capsys.readouterr().err.startswith(f"dmhpc grid: error: {pending}: damaged ({problem}); remove it")
    assert not submitted.exists()
    # One whose jobs are no longer queued: its points are submitted, and it goes.
    pending.write_text('{"token": "abc", "tasks": 1, "points": ["seed=0"], "configs": [{}]}')
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert submitted.read_text() == "x\n" and not pending.exists()
    assert "2 point(s): 0 finished, 0 still queued, 2 submitted" in capsys.readouterr().out


def test_the_jobs_of_a_launcher_killed_before_its_record_are_found_by_their_comment(tmp_path, monkeypatch, capsys):
    """squeue's lines of the token's jobs ("%i %k") map to the recorded points by array index: the
    point still queued is re-attached, the other (its task ended) submitted, and jobs.json written."""
    from dmhpc.cli import main

    submitted = tmp_path / "sbatch-calls"
    fake_commands(tmp_path, monkeypatch, {
        "sbatch": f'echo x >> {submitted}\necho "Submitted batch job 99"\n',
        "squeue": 'case "$*" in *"%i %k"*) echo "1234_1 dmhpc-launch:abc";; *) echo "1234_1";; esac\n'})
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "slurm",
                                         "grid": {"seed": [0, 1]}}))
    points = load_grid(grid_file).points
    pending = tmp_path / "out" / "submitit" / "submitting.json"
    pending.parent.mkdir(parents=True)
    pending.write_text(json.dumps({"token": "abc", "tasks": 1, "points": [p.name for p in points],
                                   "configs": [config_to_dict(p.config) for p in points]}))
    assert main(["grid", str(grid_file), "--no-wait"]) == 0
    assert "2 point(s): 0 finished, 1 still queued, 1 submitted" in capsys.readouterr().out
    assert submitted.read_text() == "x\n" and not pending.exists()
    recorded = json.loads((pending.parent / "jobs.json").read_text())
    assert recorded["seed=1"]["job_id"] == "1234_1" and recorded["seed=0"]["job_id"].startswith("99")


def test_the_launch_lock_is_held_while_the_launcher_waits_for_its_jobs(tmp_path, monkeypatch):
    """It was given back before the wait (a refused launch's clean-up moved the wait out of the
    lock): a second launcher into the OUT was not refused while the first's jobs ran."""
    from dmhpc.cli import main
    from dmhpc.launch import submit

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "debug",
                                         "grid": {"seed": [0]}, "overrides": {"data.source": "missing"}}))
    lock, held, real = tmp_path / "out" / "submitit" / "launch.lock", [], submit.wait_for

    def waiting(jobs, noted):
        held.append(_held(lock))
        return real(jobs, noted)

    monkeypatch.setattr(submit, "wait_for", waiting)
    assert main(["grid", str(grid_file)]) == 1  # (its point fails: no data)
    assert held == [True]


def test_a_second_launcher_into_the_same_out_is_refused_in_one_line(tmp_path, capsys):
    """Two launchers of one OUT both found the points unfinished and ran each twice: local jobs met in
    the run directory, where one failed as "in use by another trainer"; SLURM jobs went in twice."""
    from dmhpc.cli import main

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(TINY), "out": str(tmp_path / "out"), "executor": "debug",
                                         "grid": {"seed": [0]}, "overrides": {"data.source": "missing"}}))
    lock = tmp_path / "out" / "submitit" / "launch.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as first:  # the first launcher's lock, as it holds it while it runs
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first.write("pid 12345 on node7\n")
        first.flush()
        assert main(["grid", str(grid_file)]) == 1
    err = capsys.readouterr().err
    assert err == (f"dmhpc grid: error: {lock}: another launcher is running points into this out (pid 12345 on "
                   f"node7); wait for it or use another out\n"), err
    assert not (tmp_path / "out" / "seed=0").exists() and not (tmp_path / "out" / "leaderboard.md").exists()
    # The lock went with its holder: this launch runs its point (which fails: no data).
    assert main(["grid", str(grid_file), "--executor", "local"]) == 1
    assert "point seed=0: job" in capsys.readouterr().err and not _held(lock)


def _held(lock) -> bool:
    """Whether a process holds the run directory's lock (a trainer is still running in it)."""
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.fixture
def in_the_background():
    """SIGINT ignored, as in a launcher started with `&` or nohup from a script."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_cancelled_local_job_stops_training_with_threads_set(make_domains, tmp_path, monkeypatch, in_the_background):
    """Local jobs that share the cores get OMP_NUM_THREADS; cancelling one (a pruned trial) must stop
    its trainer, also when the launcher runs in the background. With the threads set by a setup
    line, the cancel stopped a shell and the training went on; with SIGINT ignored by the launcher,
    its jobs ignored the cancel."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data = make_domains(64)
    run = tmp_path / "run"
    cfg = resolve_point(TINY, {**tiny_overrides(data, **{"train.epochs": 200}), "run.dir": str(run),
                               "train.signals": [preempt_signal()]})
    executor = make_executor("local", tmp_path / "submitit", Resources(time_min=10), "dmhpc-test")
    with submission(2):
        job = executor.submit(TrainTask(), config_to_dict(cfg))
    assert "OMP_NUM_THREADS" not in os.environ and signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # restored
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or "epoch" not in (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and not job.done(), "the job never trained"
        time.sleep(0.2)
    assert '"cpu_threads": 2' in (run / "metrics.jsonl").read_text()
    job.cancel(check=False)
    deadline = time.monotonic() + 30
    while _held(run / ".lock"):
        assert time.monotonic() < deadline, "the trainer still runs after the job was cancelled"
        time.sleep(0.2)
    size = (run / "metrics.jsonl").stat().st_size
    time.sleep(2)
    assert (run / "metrics.jsonl").stat().st_size == size


def test_a_signal_inside_a_submission_takes_effect_at_its_end(in_the_background):
    """The launcher records a job only after submitit started it: a SIGTERM or Ctrl-C between the
    two stopped the launcher with the job unrecorded, so nothing cancelled it (a grid's local job
    trained on behind the launcher) or re-attached it. Held to the block's end: an ignored SIGINT
    stays ignored; SIGTERM under sigterm_as_interrupt is the launcher's KeyboardInterrupt."""
    recorded = []
    with submission(None):
        os.kill(os.getpid(), signal.SIGINT)
        recorded.append("job")
    assert recorded == ["job"] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        with submission(None):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler would have run here
            recorded.append("job")
    assert recorded == ["job", "job"]
    # An ignored SIGINT is not held, nor counted as the first of two.
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        with submission(None):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            recorded.append("after both")
    assert recorded[-1] == "after both"
    # A second signal takes effect at once: the way out of a submission that hangs.
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        with submission(None):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            recorded.append("held")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            recorded.append("never")
    assert recorded[-1] == "held" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _sleeping_job() -> None:
    time.sleep(120)


def test_sigterm_as_a_local_job_starts_cancels_it(tmp_path, monkeypatch):
    """The end-to-end case: SIGTERM reaches the grid launcher just after submitit started a point's
    job. The launcher must stop and cancel that job, which otherwise trains on unseen."""
    started = []

    class SignalledExecutor:
        def __init__(self, executor):
            self.executor = executor

        def submit(self, *args):
            job = self.executor.submit(*args)
            started.append(job)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler would have run here
            return job

    make = submit.make_executor
    monkeypatch.setattr(submit, "make_executor", lambda *args: SignalledExecutor(make(*args)))
    cfg = resolve_point(TINY, {"run.dir": str(tmp_path / "run")})
    point = Point("p", {}, tmp_path / "run", cfg)
    with pytest.raises(KeyboardInterrupt):
        submit._launch_local([point], {"p": Resources(time_min=5)}, folder=tmp_path / "submitit",
                             job_name="dmhpc-test", task=lambda config: _sleeping_job())
    assert len(started) == 1
    deadline = time.monotonic() + 30
    while not started[0].done():
        assert time.monotonic() < deadline, "the job started as the launcher stopped still runs"
        time.sleep(0.2)


def test_ctrl_c_while_submitting_stops_after_the_job_array_in_hand(tmp_path, monkeypatch, in_the_foreground):
    """Points of different resources go in as one job array each: Ctrl-C during the first stops
    the launch once that array is recorded in jobs.json (so the next launch re-attaches it instead
    of submitting it again), and submits no other."""
    fake_commands(tmp_path, monkeypatch, {"sbatch": 'echo "Submitted batch job 1234"\n'})
    arrays = []

    class SignalledExecutor:
        def __init__(self, executor):
            self.executor = executor

        def map_array(self, *args):
            arrays.append(args)
            jobs = self.executor.map_array(*args)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler would have run here
            return jobs

    make = submit.make_executor
    monkeypatch.setattr(submit, "make_executor", lambda *args: SignalledExecutor(make(*args)))
    points = [Point(name, {}, tmp_path / name, resolve_point(TINY, {"run.dir": str(tmp_path / name)}))
              for name in ("a", "b")]
    resources = {"a": Resources(time_min=5), "b": Resources(time_min=10)}
    with pytest.raises(KeyboardInterrupt):
        submit.submit_points(points, resources, kind="slurm", folder=tmp_path / "submitit", job_name="dmhpc-test",
                             task=TrainTask())
    assert len(arrays) == 1
    recorded = json.loads((tmp_path / "submitit" / submit.JOBS_FILE).read_text())
    assert {name: entry["job_id"] for name, entry in recorded.items()} == {"a": "1234"}  # (one point: no array)


def test_a_full_disk_at_submission_is_one_line_and_leaves_no_pickle_cut_short(small_disk):
    """submitit pickles each job's call into OUT/submitit: a full disk there was an OSError traceback
    out of the launcher, and left an empty pickle behind."""
    import submitit

    folder = small_disk("64k") / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster="local")  # (makes the folder)
    with pytest.raises(OSError):  # fill the disk
        with open(folder.parent / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    before = set(os.listdir(folder))
    with pytest.raises(DmhpcError, match=r": cannot submit the job of point p: No space left on device \(disk full"):
        with submit.refused_submission("the job of point p", folder):
            executor.submit(TrainTask(), {"big": "x" * 100_000})
    assert set(os.listdir(folder)) == before


def _prints_then_is_killed() -> None:
    print("epoch 1 step 22: loss 10.8982", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer ends a job


def test_a_job_killed_without_a_result_is_said_as_killed_not_as_its_last_line(tmp_path):
    """submitit's error for a job that wrote no result has its log under a longer rule than a
    traceback's: the reason given was the job's last progress line, read as a failure's cause."""
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    job = executor.submit(_prints_then_is_killed)
    why = submit.wait_for({"p": job})["p"]
    assert why.startswith(f"job {job.job_id} failed: ended without a result (killed? state "), why
    assert "), its last output: epoch 1 step 22: loss 10.8982 (log: " in why, why


def _master_port() -> int:
    import submitit

    return submitit.helpers.TorchDistributedEnvironment().master_port


def _environment() -> dict:
    return dict(os.environ)


def test_a_local_job_meets_on_a_port_of_its_own_not_the_launchers(tmp_path, monkeypatch):
    """submitit's local ranks take MASTER_PORT from the environment where it is set: a launcher in an
    sbatch script that sourced slurm/lib.sh gave every local job its port, and two multi-rank jobs
    at once met on one rendezvous. Nor do jobs get the other variables of the launcher's own job:
    sbatch exports them into the job, where srun refused SLURM_MEM_PER_CPU beside the point's --mem
    and the trainer took RANK for its own."""
    import submitit

    launchers = {"MASTER_PORT": "29500", "MASTER_ADDR": "10.0.0.9", "SLURM_MEM_PER_CPU": "4096",
                 "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_ID": "99", "SRUN_CPUS_PER_TASK": "2", "RANK": "0", "WORLD_SIZE": "1",
                 "TORCHELASTIC_RUN_ID": "r"}
    users = {"SLURM_CONF": "/etc/slurm/slurm.conf", "SBATCH_ACCOUNT": "astro", "OMP_PROC_BIND": "close",
             "SLURM_CLUSTERS": "gpu2", "SLURM_CPU_BIND": "cores", "SLURM_MPI_TYPE": "pmix"}
    for key, value in {**launchers, **users}.items():
        monkeypatch.setenv(key, value)
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    with submit.submission(None):
        job = executor.submit(_master_port)
        seen = executor.submit(_environment)
        assert not set(launchers) & set(os.environ)
    assert {k: os.environ[k] for k in launchers} == launchers  # the launcher's again
    assert job.result() != 29500
    got = seen.result()
    assert not {k for k in got if k in launchers and got[k] == launchers[k]} and all(got[k] == v
                                                                                     for k, v in users.items()), got


def _killed(config: dict) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_local_job_killed_is_not_taken_for_an_earlier_job_of_the_same_pid(tmp_path, monkeypatch):
    """A local job's id is its controller's pid, and pids recur: the result an earlier job of that pid
    left in OUT/submitit was read as this one's, and a killed job passed for a success."""
    import pickle

    folder = tmp_path / "submitit"
    make = submit.make_executor

    def with_an_earlier_result(*args, **kwargs):
        executor = make(*args, **kwargs)
        submit_one = executor.submit

        def submitted(*a, **k):
            job = submit_one(*a, **k)
            earlier = folder / f"{job.job_id}_0_result.pkl"
            with open(earlier, "wb") as f:
                pickle.dump(("success", {"exit_code": 0}), f)
            os.utime(earlier, (time.time() - 3600, time.time() - 3600))  # there before this job
            return job

        executor.submit = submitted
        return executor

    monkeypatch.setattr(submit, "make_executor", with_an_earlier_result)
    point = Point("p", {}, tmp_path / "p", resolve_point(TINY, {"run.dir": str(tmp_path / "p")}))
    failures = submit._launch_local([point], {"p": Resources(time_min=5)}, folder=folder, job_name="dmhpc-test",
                                    task=_killed, poll_s=0.2)
    assert list(failures) == ["p"] and "ended without a result (killed?" in failures["p"], failures


def _started_then_sleep(path: str) -> None:
    Path(path).touch()
    time.sleep(600)


def test_local_jobs_a_killed_launcher_left_are_stopped_before_its_points_run_again(tmp_path, capsys):
    """A grid launcher killed outright (SIGKILL, a lost session) left its local jobs training as
    orphans: the rerun started the same points beside them, each failing on the run directory the
    orphan held ("in use"), while the orphan trained on unmanaged. (The tuner stopped its own.)"""
    import submitit

    folder = tmp_path / "out" / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(timeout_min=10)
    elsewhere = submitit.AutoExecutor(folder=tmp_path / "other" / "submitit", cluster="local")
    elsewhere.update_parameters(timeout_min=10)
    with submit.submission(None):  # as a launcher starts its jobs (SIGINT not ignored in them)
        orphan = executor.submit(_started_then_sleep, str(tmp_path / "started"))  # a trainer of the killed launcher
        other = elsewhere.submit(time.sleep, 600)  # another grid's job: not this launch's to stop
    try:
        deadline = time.monotonic() + 60  # a SIGINT while its interpreter still starts is lost
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert submit._launch_local([], {}, folder=folder, job_name="dmhpc-test", task=TrainTask()) == {}
        assert orphan.done() and not other.done()
        assert "stopping 1 local job(s) of an earlier launcher still running for" in capsys.readouterr().out
    finally:
        orphan.cancel(check=False)
        other.cancel(check=False)


def test_a_launch_of_fewer_points_than_may_run_at_once_gives_them_the_cores_of_those_only(monkeypatch):
    """Two points of 2 ranks with array_parallelism 4 run 4 ranks at once, not 8: each rank got one
    of 8 cores, half the machine idle."""
    from dmhpc.launch.submit import local_threads_of

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    points = [Point(name, {}, Path(name), resolve_point(TINY, {})) for name in ("a", "b")]
    res = Resources(tasks_per_node=2, array_parallelism=4, time_min=5)
    assert local_threads_of(points, {"a": res, "b": res}) == 2
    assert local_threads_of(points[:1], {"a": res}) == 4
    assert local_threads_of(points + [Point("c", {}, Path("c"), points[0].config)], {"a": res, "b": res, "c": res}) == 1


def test_a_launch_that_would_not_wait_for_its_debug_jobs_is_refused(tmp_path, capsys):
    """The debug executor runs each job in the launcher's process: --no-wait ran the whole grid
    there anyway, where it promised to return after submitting."""
    from dmhpc.launch import launch_grid

    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "executor": "debug", "grid": {"seed": [0]},
            "overrides": {"data.source": str(tmp_path / "missing")}}
    with pytest.raises(DmhpcError, match=r"^executor debug: its jobs end with the launcher, so the launcher must "
                                         r"wait for them$"):
        launch_grid(spec, wait=False)
    assert not (tmp_path / "g" / "seed=0").exists()


def _note_gpus_a_outlasts_b(config: dict) -> None:
    run = Path(config["run"]["dir"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "gpus").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
    deadline = time.monotonic() + 60
    while run.name == "a" and not (run.parent / "c" / "gpus").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # still on its GPU when b has ended and c starts


def test_a_local_point_starting_as_another_ends_takes_the_gpu_it_freed(tmp_path, monkeypatch):
    """The GPUs of ended jobs stayed counted as held: the third point joined the first on its GPU
    while the second's GPU idled."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    points = [Point(name, {}, tmp_path / name, resolve_point(TINY, {"run.dir": str(tmp_path / name)}))
              for name in ("a", "b", "c")]
    res = Resources(gpus_per_node=1, array_parallelism=2, time_min=5)
    assert submit._launch_local(points, {p.name: res for p in points}, folder=tmp_path / "submitit",
                                job_name="dmhpc-test", task=_note_gpus_a_outlasts_b, poll_s=0.1) == {}
    assert [(tmp_path / name / "gpus").read_text() for name in ("a", "b", "c")] == ["2", "5", "5"]
