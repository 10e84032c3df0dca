"""Launch files as a whole (dmhpc/launch/spec.py): strings that would become lines of a batch
script, and run directories that belong to another configuration."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import TINY
from dmhpc.errors import DmhpcError
from dmhpc.launch import load_grid


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


@pytest.mark.parametrize("text, where", [
    ("grid: {seed: [0, 1], run.name: [2024-01-01, 2024-02-01]}", "grid.run.name[0]"),
    ("grid: {seed: [0]}\noverrides: {data.source: 2024-06-01}", "overrides.data.source"),
    ("grid: {seed: [0], loss.mmd.sigmas: [!!set {1: null}]}", "grid.loss.mmd.sigmas[0]"),
])
def test_a_date_or_set_anywhere_in_a_launch_file_is_one_line(tmp_path, text, where):
    """YAML reads an unquoted 2024-01-01 as a date: in a grid's values or overrides it ended in a
    TypeError traceback ("Object of type date is not JSON serializable") where points are named."""
    path = tmp_path / "grid.yaml"
    path.write_text(f"base: {TINY}\nout: {tmp_path / 'out'}\nexecutor: local\n{text}\n")
    with pytest.raises(DmhpcError, match=rf"{path}: {re.escape(where)}: .*expected text, a number, true/false or "
                                         rf"null") as info:
        load_grid(path)
    assert "read as a date: quote it" in str(info.value) or "!!set" in text


def test_an_sbatch_parameter_that_is_not_a_scalar_is_one_line(tmp_path):
    """A list reached submission and failed there as a TypeError (unhashable), after loading passed."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "slurm", "grid": {"seed": [0]},
            "slurm": {"additional_parameters": {"mail-type": ["END", "FAIL"]}}}
    with pytest.raises(DmhpcError, match=r"slurm\.additional_parameters\.mail-type: expected a string or number"):
        load_grid(spec)


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


def test_a_finished_run_without_last_is_not_taken_for_another_configuration(tmp_path):
    """Without checkpoints/last.pt nothing was compared: a relaunch with another optim.lr skipped the
    point as finished, its old result standing for the new configuration."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local", "grid": {"seed": [0]}}
    point = load_grid(spec).points[0]
    from dmhpc.config import save_config
    from dmhpc.train.checkpoint import save_checkpoint

    save_config(point.config, point.run_dir / "config.yaml")
    save_checkpoint(point.run.checkpoint("best"), {"step": 1})
    point.run.write_result({"final": True}, "best", "test")
    assert load_grid(spec).points[0].finished
    with pytest.raises(DmhpcError, match=r"seed=0: .*config.yaml: the run was trained with another configuration: "
                                         r"optim\.lr 0\.001 -> 0\.5"):
        load_grid({**spec, "overrides": {"optim.lr": 0.5}})


def test_fewer_epochs_than_a_run_has_trained_are_refused_before_submitting(tmp_path):
    """docs/cluster.md: refused before anything is submitted; the trainer refused it after the job started."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local", "grid": {"seed": [0]},
            "overrides": {"train.epochs": 6}}
    point = load_grid(spec).points[0]
    from dmhpc.config import save_config
    from dmhpc.train.checkpoint import save_checkpoint

    save_config(point.config, point.run_dir / "config.yaml")
    save_checkpoint(point.run.checkpoint("last"), {"step": 9, "progress": {"epoch": 3, "step_in_epoch": 0, "step": 9}})
    # (its third epoch evaluated, as train.eval_every 1 does: a length ending there is the run so far)
    point.run.append_log({"kind": "epoch", "epoch": 2, "step": 9, "selection": {"criterion": "source-val-acc",
                                                                                 "score": 0.5}})
    assert load_grid({**spec, "overrides": {"train.epochs": 3}})
    with pytest.raises(DmhpcError, match=r"seed=0: .*seed=0: train\.epochs 2: the run has trained 3 epochs already"):
        load_grid({**spec, "overrides": {"train.epochs": 2}})


def test_a_log_range_from_zero_is_refused_in_one_line(tmp_path):
    """log: true with low 0 has no log-uniform draw: the sampler's math error (log of 0) ended the
    launch as a traceback, where the file's key and the fix belong."""
    spec = {"base": str(TINY), "out": str(tmp_path), "executor": "local",
            "random": {"n": 2, "space": {"loss.entropy_weight": {"low": 0, "high": 0.1, "log": True}}}}
    with pytest.raises(DmhpcError) as err:
        load_grid(spec)
    assert str(err.value) == "<launch dict>: random.space.loss.entropy_weight: log: true needs low > 0, got 0"
    assert len(load_grid({**spec, "random": {"n": 2, "space": {"loss.entropy_weight": {
        "low": 0.01, "high": 0.1, "log": True}}}}).points) == 2


@pytest.mark.parametrize("overrides", [{"train": None}, {"loss": {"mmd": None}}, {"loss.mmd": {}}])
def test_a_launch_files_empty_section_changes_nothing_as_in_a_config_file(tmp_path, overrides):
    """A section whose keys are all commented out in a launch file's overrides is read as it is in
    a config file; refused as a command line's `SECTION=null` is, it failed the whole launch file."""
    spec = {"base": str(TINY), "out": str(tmp_path / "g"), "executor": "local", "grid": {"seed": [1]}}
    (plain,) = load_grid(spec).points
    (point,) = load_grid({**spec, "overrides": overrides}).points
    assert point.config == plain.config
