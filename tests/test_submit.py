"""Executors and their resources (dmhpc/launch/submit.py): Slurm time limits, executor shapes, the
sbatch options a site sets, and the threads of local ranks."""

from __future__ import annotations

import os

import pytest

from tests.conftest import TINY
from dmhpc.errors import DmhpcError
from dmhpc.launch import load_grid
from dmhpc.launch.submit import Resources, local_threads, make_executor, slurm_minutes


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
