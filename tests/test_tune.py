"""Label-free tuning (dmhpc/launch/tune.py): the tune file, a real Optuna study of real trainer runs
through submitit's local executor, pruning, relaunch after a killed tuner, and the guards."""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY, clean_env, fake_commands, tiny_overrides
from dmhpc.errors import DmhpcError
from dmhpc.launch import load_tune, tune
from dmhpc.launch.submit import submission
from tests.test_submit import _started_then_sleep
from dmhpc.launch.tune import JOURNAL, LOCK, _lock, _open_study
from dmhpc.run import RunDir

optuna = pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def data(make_domains):
    return make_domains(64)


def _study(out):
    return optuna.load_study(study_name="dmhpc-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / JOURNAL))))


def spec(data, tmp_path, **extra) -> dict:
    """Two trials of the tiny config, one choice of learning rate each, objective IM."""
    return {"base": str(TINY), "out": str(tmp_path / "tune"), "executor": "local", "objective": "im",
            "trials": 2, "parallel": 2, "seed": 0, "pruner": False,
            "overrides": tiny_overrides(data, **{"train.epochs": 2}),
            "space": {"optim.lr": [0.001, 0.003]}, **extra}


def test_the_rows_a_trials_loss_gets_on_its_ranks_are_checked_at_launch(data, tmp_path):
    """A trial's ranks x its batch past loss.mmd.max_samples failed its job at the trainer's start,
    after its wait in the queue: a space's corner that gives it is refused at launch."""
    overrides = {k: v for k, v in spec(data, tmp_path)["overrides"].items() if k != "train.batch_size"}
    slurm = {"executor": "slurm", "slurm": {"nodes": 2, "gpus_per_node": 4}, "overrides": overrides}
    with pytest.raises(DmhpcError, match=r'space: at \{.*"train.batch_size": 1100\}: loss.mmd.max_samples: 8 '
                                         r"ranks x train.batch_size 1100 gives 17600 rows"):
        load_tune(spec(data, tmp_path, **slurm, space={"optim.lr": [0.001, 0.003], "train.batch_size": [16, 1100]}))
    load_tune(spec(data, tmp_path, **slurm, space={"optim.lr": [0.001, 0.003], "train.batch_size": [16, 1000]}))
    # A base whose own batch would be too many rows on these ranks, where the space sets every trial's:
    base = tmp_path / "big.yaml"
    base.write_text(f"base: {TINY}\ntrain: {{batch_size: 1100}}\n")
    load_tune(spec(data, tmp_path, **slurm, base=str(base), space={"train.batch_size": [16, 64]}))


def test_every_problem_of_a_tune_file_at_once(tmp_path):
    bad = {"base": "nope.yaml", "out": str(tmp_path), "objective": "oracle-target-acc", "trials": 0,
           "executor": "debug", "parallel": 2, "space": {"optim.lr": {"low": 1.0, "high": 0.1},
                                                          "select.criterion": ["im"]},
           "overrides": {"run.dir": "x"}, "enqueue": [{"optim.lr": 5.0}], "pruner": {"warmup": 1}, "extra": 1}
    with pytest.raises(DmhpcError) as err:
        load_tune(bad)
    message = str(err.value)
    for line in ("extra: unknown key", "base: config file not found", "objective: oracle-target-acc reads target "
                 "labels", "trials: expected a positive integer, got 0", "space.optim.lr: low must be below high",
                 "space.select.criterion: set by the launcher for every point: the objective",
                 "overrides.run.dir: set by the launcher", "pruner.warmup: unknown key",
                 "parallel: the debug executor runs one trial at a time"):
        assert line in message, (line, message)
    assert "enqueue[0]" not in message  # its only key is the refused optim.lr: said once


def test_an_enqueued_trial_that_is_no_valid_config_is_refused_before_anything_runs(data, tmp_path):
    """Only the space's corners and choices were tried: an enqueued pair of valid choices that is no
    valid config together failed at its launch, and counted, used up the budget for good."""
    space = {"optim.schedule": ["cyclic", "warmup-cosine"], "optim.warmup_steps": [0, 10]}
    load_tune(spec(data, tmp_path, space=space, enqueue=[{"optim.schedule": "warmup-cosine", "optim.warmup_steps": 10}]))
    with pytest.raises(DmhpcError, match=r"enqueue\[1\]: .*optim.warmup_steps: 10 does nothing with optim.schedule"):
        load_tune(spec(data, tmp_path, space=space, enqueue=[{"optim.schedule": "cyclic", "optim.warmup_steps": 0},
                                                             {"optim.schedule": "cyclic", "optim.warmup_steps": 10}]))
    assert not (tmp_path / "tune").exists()


def test_a_range_over_a_whole_number_key_says_to_list_its_choices(data, tmp_path):
    """Its corners were refused as "train.log_every: expected a positive integer, got 2.0", 2 written."""
    with pytest.raises(DmhpcError, match=r"space.train.log_every: a range draws real numbers, and train.log_every "
                                         r"takes whole numbers: list its choices"):
        load_tune(spec(data, tmp_path, space={"train.log_every": {"low": 2, "high": 10}}))
    load_tune(spec(data, tmp_path, space={"train.log_every": [2, 10], "optim.lr": {"low": 0.001, "high": 0.01}}))


def test_the_space_is_checked_against_the_trainer_config_before_anything_runs(data, tmp_path):
    with pytest.raises(DmhpcError, match=r"space.model.name: \"vgg\": .*model.name"):
        load_tune(spec(data, tmp_path, space={"model.name": ["deepmerge2", "vgg"]}))
    with pytest.raises(DmhpcError, match=r"space: at .*optim.lr"):
        load_tune(spec(data, tmp_path, space={"optim.lr": {"low": -1.0, "high": 0.1}}))
    # Each choice is checked on its own: the range's problem was blamed on every valid choice too.
    with pytest.raises(DmhpcError) as refused:
        load_tune(spec(data, tmp_path, space={"optim.lr": {"low": -1.0, "high": 0.1}, "optim.weight_decay": [-1.0, 0.0]}))
    lines = str(refused.value).splitlines()
    assert len(lines) == 3 and "space: at" in lines[1] and "optim.lr: expected a number > 0" in lines[1], lines
    assert "space.optim.weight_decay: -1.0: optim.weight_decay:" in lines[2], lines
    # A choice valid only beside another key's choice is one of the space's trials: taken.
    load_tune(spec(data, tmp_path, space={"model.name": ["resnet18", "resnet34"], "model.stem": ["original", "small"]}))
    with pytest.raises(DmhpcError, match=r"enqueue\[0\].optim.lr: 0.5 is not one of the choices"):
        load_tune(spec(data, tmp_path, enqueue=[{"optim.lr": 0.5}]))
    with pytest.raises(DmhpcError, match=r"enqueue\[0\].optim.lr: missing"):
        load_tune(spec(data, tmp_path, space={"optim.lr": [0.001], "seed": [1, 2]}, enqueue=[{"seed": 1}]))
    assert not (tmp_path / "tune").exists()


def test_a_search_runs_trials_by_the_objective_records_target_metrics_and_resumes(data, tmp_path):
    best = tune(spec(data, tmp_path, enqueue=[{"optim.lr": 0.003}]), poll_s=0.2)
    out = tmp_path / "tune"
    study = _study(out)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].params == {"optim.lr": "0.003"}  # the enqueued trial first
    for t in trials:
        run = out / f"optim.lr={json.loads(t.params['optim.lr'])}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["select"]["criterion"] == "im" and config["optim"]["lr"] == json.loads(t.params["optim.lr"])
        result = json.loads((run / "eval" / "best_test.json").read_text())
        assert t.value == result["checkpoint"]["score"]  # the value: the objective of the selected checkpoint
        assert t.user_attrs["target_test_accuracy"] == result["target"]["accuracy"]  # beside it, for reports
        assert sorted(t.intermediate_values) == [0, 1]  # every evaluation was reported
    assert best["value"] == max(t.value for t in trials) and best["run_dir"].startswith(str(out))
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete"] and rows[0]["value"] == str(best["value"])
    table = (out / "trials.md").read_text()
    assert "Maximizing im" in table and "target acc †" in table and "never reads them" in table
    # A relaunch with a bigger budget runs only the missing trial (the enqueued values are not run again).
    tune(spec(data, tmp_path, trials=3, space={"optim.lr": [0.001, 0.003]}), poll_s=0.2)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    # Another objective, training configuration or space is another study: refused, nothing run.
    base = tmp_path / "base.yaml"
    base.write_text(f"base: {TINY}\noptim:\n  weight_decay: 0.002\n")  # an edit of the config trained
    for change, what in [({"objective": "snd"}, "objective changed since it began"),
                         ({"base": str(base)}, "config changed since it began: optim.weight_decay"),
                         ({"overrides": tiny_overrides(data, **{"train.epochs": 3})},
                          "config changed since it began: train.epochs"),
                         ({"space": {"optim.lr": [0.001, 0.003, 0.01]}}, "space changed since it began"),
                         ({"slurm": {"tasks_per_node": 2}}, "ranks changed since it began"),  # other ranks
                         # read at the first launch only (an edit ran nothing), or changing how the
                         # trials are chosen or stopped midway
                         ({"seed": 1}, "seed changed since it began"),
                         ({"sampler": {"startup_trials": 2}}, "sampler changed since it began"),
                         ({"pruner": {}}, "pruner changed since it began")]:
        with pytest.raises(DmhpcError, match=rf"study.journal: holds a study of another tune file \({what}\)"):
            tune({**spec(data, tmp_path, trials=4), **change}, poll_s=0.2)
    assert len(study.get_trials()) == 3
    # enqueue is read at the first launch: a value added since would never run (one left out is no change).
    with pytest.raises(DmhpcError, match=r'study.journal: enqueue: \{"optim.lr": 0.001\} was not in the file when '
                                         r"the study began, and enqueue is read at its first launch only"):
        tune(spec(data, tmp_path, trials=4, enqueue=[{"optim.lr": 0.003}, {"optim.lr": 0.001}]), poll_s=0.2)
    assert len(study.get_trials()) == 3
    # What a trial's run resumes across without training differently is the same study.
    tune({**spec(data, tmp_path, trials=3, space={"optim.lr": [0.001, 0.003]}),
          "overrides": tiny_overrides(data, **{"train.epochs": 2, "train.log_every": 3, "data.num_workers": 1})},
         poll_s=0.2)
    # A study an older dmhpc began recorded no ranks: taken up, and its record completed.
    # Nor keys dmhpc gained since (their defaults, as its trials read them): every study was refused
    # as "config changed" after an upgrade.
    older = {k: v for k, v in study.user_attrs["identity"].items()
             if k not in ("ranks", "enqueue", "seed", "sampler", "pruner")}
    older["config"] = {**older["config"], "optim": {k: v for k, v in older["config"]["optim"].items()
                                                    if k != "discriminator_lr_mult"}}
    study.set_user_attr("identity", older)
    tune(spec(data, tmp_path, trials=3, space={"optim.lr": [0.001, 0.003]}), poll_s=0.2)
    assert _study(out).user_attrs["identity"]["ranks"] == 1 and len(study.get_trials()) == 3
    assert _study(out).user_attrs["identity"]["seed"] == 0
    assert "discriminator_lr_mult" in _study(out).user_attrs["identity"]["config"]["optim"]
    # The first tuner recorded no configuration at all: not known, and not refused.
    study.set_user_attr("identity", {k: v for k, v in _study(out).user_attrs["identity"].items() if k != "config"})
    tune(spec(data, tmp_path, trials=3, space={"optim.lr": [0.001, 0.003]}), poll_s=0.2)
    assert "config" in _study(out).user_attrs["identity"]
    # Moved: the best trial is said in its new folder (the journal's path was said, of a folder gone).
    moved = tmp_path / "moved"
    out.rename(moved)
    best = tune({**spec(data, tmp_path, trials=3, space={"optim.lr": [0.001, 0.003]}), "out": str(moved)}, poll_s=0.2)
    assert Path(best["run_dir"]).parent == moved and Path(best["run_dir"]).is_dir(), best["run_dir"]


def test_a_trial_left_running_by_a_killed_tuner_runs_again_in_its_directory(data, tmp_path):
    t = load_tune(spec(data, tmp_path, trials=1, parallel=1))
    lock = _lock(t.out)
    study = _open_study(t)
    trial = study.ask({"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])})
    lock.close()  # the tuner died here: its trial is RUNNING in the journal
    lr = json.loads(trial.params["optim.lr"])
    best = tune(spec(data, tmp_path, trials=1, parallel=1), poll_s=0.2)
    states = [(tr.number, tr.state.name) for tr in study.get_trials()]
    assert states == [(0, "FAIL"), (1, "COMPLETE")]  # the stale one does not count against the budget
    assert best["values"] == {"optim.lr": lr} and best["number"] == 1
    assert "left running by a tuner that was killed; run again as trial 1" in (t.out / "trials.md").read_text()


def test_a_second_tuner_on_the_same_out_is_refused(data, tmp_path):
    t = load_tune(spec(data, tmp_path))
    held = _lock(t.out)
    try:
        with pytest.raises(DmhpcError, match=rf"{LOCK}: a tuner is already running this study \(pid {os.getpid()}"):
            tune(spec(data, tmp_path), poll_s=0.2)
    finally:
        held.close()
    assert not (t.out / JOURNAL).exists()


def test_a_tuner_and_a_grid_or_scaling_launch_never_share_an_out(data, tmp_path):
    """They share OUT/submitit, and each stops the jobs it finds there as orphans: a grid started
    into a tuner's out stopped every running trial (the search ended "no trial completed")."""
    from dmhpc.launch.submit import LAUNCH_LOCK, hold_launch_lock

    t = load_tune(spec(data, tmp_path))
    held = hold_launch_lock(t.out / "submitit")  # as a grid's launch_points holds it
    try:
        with pytest.raises(DmhpcError, match=rf"{LAUNCH_LOCK}: another launcher is running points into this out "
                                             rf"\(pid {os.getpid()}"):
            tune(spec(data, tmp_path), poll_s=0.2)
    finally:
        held.close()
    assert not (t.out / JOURNAL).exists()


def test_a_first_launch_stopped_while_enqueueing_enqueues_the_rest_on_the_next(data, tmp_path, monkeypatch):
    """The study's identity was recorded before its enqueued trials: a first launch stopped in
    between (a kill, a full disk) left a study every later launch took as begun, without them."""
    import optuna

    (tmp_path / "tune").mkdir()
    t = load_tune(spec(data, tmp_path, space={"optim.lr": [0.001, 0.003, 0.01]},
                       enqueue=[{"optim.lr": 0.003}, {"optim.lr": 0.01}, {"optim.lr": 0.01}]))
    enqueue = optuna.Study.enqueue_trial

    def second_fails(study, params, **kwargs):
        if len(study.get_trials(deepcopy=False)) == 1:
            raise DmhpcError("study.journal: cannot record the search: No space left on device")
        return enqueue(study, params, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", second_fails)
    with pytest.raises(DmhpcError, match="No space left"):
        _open_study(t)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue)
    for _ in range(2):  # the next launch enqueues the rest (a repeat too: asked twice); the one after, nothing
        study = _open_study(t)
        assert [tr.system_attrs["fixed_params"] for tr in study.get_trials()] == [
            {"optim.lr": "0.003"}, {"optim.lr": "0.01"}, {"optim.lr": "0.01"}]
    # a study another file began, stopped before its identity: not taken as this one's
    shutil.rmtree(t.out)
    t.out.mkdir()
    monkeypatch.setattr(optuna.Study, "enqueue_trial", second_fails)
    with pytest.raises(DmhpcError, match="No space left"):
        _open_study(t)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue)
    other = load_tune(spec(data, tmp_path, space={"optim.lr": [0.001, 0.003, 0.01]}, enqueue=[{"optim.lr": 0.01}]))
    with pytest.raises(DmhpcError, match=rf"{JOURNAL}: holds trials that are not the first of this file's enqueue"):
        _open_study(other)


def test_overrides_valid_only_beside_a_space_value_are_refused_when_the_file_is_read(data, tmp_path):
    """The study records base + overrides as every trial's starting point: the file was taken and
    the tuner then failed, blaming a "command line" the user never typed."""
    resnet = {"overrides": {**tiny_overrides(data), "model.stem": "small"}, "space": {"model.name": ["resnet18"]}}
    with pytest.raises(DmhpcError, match=r"^<launch dict>: overrides: model.stem: \"small\" applies to ResNet models "
                                         r"only, .* goes in the space, as a single choice\)$"):
        load_tune(spec(data, tmp_path, **resnet))
    resnet["space"]["model.stem"] = ["small"]
    del resnet["overrides"]["model.stem"]
    assert load_tune(spec(data, tmp_path, **resnet)).point({"model.name": "resnet18", "model.stem": "small"})


def test_a_search_on_the_target_labels_or_over_data_sets_is_refused(data, tmp_path):
    """Trials trained on the target (source and target one data set) were accepted, and trials.md
    said the search never read a target label; data sets in the space had TPE rank objectives of
    other data (SND grows with the rows) as one."""
    on_target = {"overrides": {**tiny_overrides(data), "data.source": str(data / "noisy")}}
    with pytest.raises(DmhpcError, match=r"overrides: data.source and data.target are one data set: every trial "
                                         r"trains on the target's labels"):
        load_tune(spec(data, tmp_path, **on_target))
    over_data = {"space": {"optim.lr": [0.001], "data.target": [str(data / "noisy"), str(data / "pristine")]}}
    with pytest.raises(DmhpcError, match=r"space.data.target: the data sets are the study's, not a value to search"):
        load_tune(spec(data, tmp_path, **over_data))
    # The whole data section as the key: a choice with the target as source trained on its labels.
    whole = {"space": {"data": [{"source": str(data / "noisy")}, {"source": str(data / "pristine")}]}}
    with pytest.raises(DmhpcError, match=r"space.data: the data sets are the study's, not a value to search"):
        load_tune(spec(data, tmp_path, **whole))


def test_choices_edited_to_equal_numbers_of_another_type_are_another_space(data, tmp_path):
    """[1, 2] and [1.0, 2.0] compared equal, and the relaunch's first proposal failed in Optuna
    ("CategoricalDistribution does not support dynamic value space", a traceback) on every launch,
    each leaving a running trial and a queued rerun without values in the journal."""
    (tmp_path / "tune").mkdir()
    _open_study(load_tune(spec(data, tmp_path, space={"loss.transfer_weight": [1, 2]})))
    with pytest.raises(DmhpcError, match=rf"{JOURNAL}: holds a study of another tune file \(space changed"):
        _open_study(load_tune(spec(data, tmp_path, space={"loss.transfer_weight": [1.0, 2.0]})))
    _open_study(load_tune(spec(data, tmp_path, space={"loss.transfer_weight": [1, 2]})))  # the same: taken
    # A range's bounds are one float however they are written.
    shutil.rmtree(tmp_path / "tune")
    (tmp_path / "tune").mkdir()
    _open_study(load_tune(spec(data, tmp_path, space={"optim.lr": {"low": 1, "high": 2}})))
    _open_study(load_tune(spec(data, tmp_path, space={"optim.lr": {"low": 1.0, "high": 2}})))


def test_a_record_meeting_a_full_disk_is_one_line_and_leaves_the_journal_whole(small_disk):
    """The tuner writes the journal throughout the search (a refused submission is recorded as a
    failure and queued again, on the disk that just filled): an OSError traceback, with a record cut
    short that Optuna would append the next one to."""
    from optuna.distributions import FloatDistribution

    from dmhpc.launch.tune import _journal_storage

    journal = small_disk("64k") / JOURNAL
    study = optuna.create_study(storage=_journal_storage(journal), study_name="s")
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    with pytest.raises(OSError):  # fill the disk
        with open(journal.parent / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    before = journal.read_bytes()
    with pytest.raises(DmhpcError, match=rf"{JOURNAL}: cannot record the search: No space left on device \(disk "
                                         rf"full or over quota\); the study is as it was before"):
        study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number, "why": "x" * 20_000})
    assert journal.read_bytes() == before
    (journal.parent / "filler").unlink()
    again = optuna.load_study(study_name="s", storage=_journal_storage(journal))
    assert [tr.number for tr in again.get_trials()] == [trial.number]


def test_a_trial_below_the_median_is_pruned_and_its_job_stopped(data, tmp_path):
    """The first trial trains (3 epochs: the median the pruner compares with at each of them); the
    second cannot learn (lr 1e-12: IM stays near 0, its initial value) and is stopped at an
    evaluation past the warm-up, long before its 40 epochs end."""
    s = spec(data, tmp_path, trials=2, parallel=1, pruner={"startup_trials": 1, "warmup_epochs": 0},
             overrides={k: v for k, v in tiny_overrides(data).items() if k != "train.epochs"},
             space={"optim.lr": [0.01, 1.0e-12], "train.epochs": [3, 40]},
             enqueue=[{"optim.lr": 0.01, "train.epochs": 3}, {"optim.lr": 1.0e-12, "train.epochs": 40}])
    tune(s, poll_s=0.1)
    out = tmp_path / "tune"
    first, second = _study(out).get_trials()
    assert first.state.name == "COMPLETE" and second.state.name == "PRUNED"
    assert max(second.intermediate_values) < 39 and not (out / "optim.lr=1e-12" / "eval" / "best_test.json").exists()
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "pruned"]  # a pruned trial never ranks above a complete one
    assert "pruned after epoch" in (out / "trials.md").read_text()


def test_equal_values_share_a_job_or_reuse_a_finished_run_and_debug_runs_in_process(data, tmp_path):
    s = spec(data, tmp_path, space={"optim.lr": [0.003]})  # every trial gets the same values
    tune(s, poll_s=0.2)
    study = _study(tmp_path / "tune")
    a, b = study.get_trials()
    assert a.state.name == b.state.name == "COMPLETE" and a.value == b.value
    assert a.user_attrs["job_id"] and "job_id" not in b.user_attrs  # one training run for both
    tune({**s, "trials": 3, "executor": "debug", "parallel": 1}, poll_s=0.2)
    c = study.get_trials()[2]
    assert c.state.name == "COMPLETE" and c.value == a.value and "job_id" not in c.user_attrs  # the finished run
    fresh = spec(data, tmp_path / "debug", trials=1, parallel=1, executor="debug")
    best = tune(fresh, poll_s=0.2)  # the debug executor: in this process, no polling, no pruning
    assert best["number"] == 0 and (Path(best["run_dir"]) / "eval" / "best_test.json").exists()
    assert Path(best["run_dir"]).parent == tmp_path / "debug" / "tune"


def test_three_failures_in_a_row_stop_the_search_and_each_is_recorded(data, tmp_path):
    s = spec(data, tmp_path, trials=6, parallel=1,
             overrides={**tiny_overrides(data), "data.source": str(tmp_path / "missing")})
    with pytest.raises(DmhpcError, match="3 trials failed in a row; search stopped"):
        tune(s, poll_s=0.2)
    rows = list(csv.DictReader((tmp_path / "tune" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["fail"] * 3 and all("missing" in r["failure"] for r in rows)


def test_trials_whose_values_diverge_are_told_as_pruned_and_stop_nothing(data, tmp_path):
    """A diverged run was a failed trial: TPE ignores those and went on proposing values where runs
    diverge, and three in a row stopped the search as if the setup were broken."""
    s = spec(data, tmp_path, executor="debug", trials=3, parallel=1, space={"optim.lr": [100.0, 300.0]},
             overrides={**tiny_overrides(data, **{"train.epochs": 2}), "optim.name": "sgd"})
    assert tune(s, poll_s=0.1)["number"] is None  # nothing completed; the search ran its three trials
    study = _study(tmp_path / "tune")
    assert [tr.state.name for tr in study.trials] == ["PRUNED"] * 3
    assert all(tr.user_attrs["failure"].startswith("diverged: step ") for tr in study.trials)
    rows = list(csv.DictReader((tmp_path / "tune" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["pruned"] * 3 and all("not finite" in r["failure"] for r in rows)


def test_a_base_config_edited_while_the_tuner_runs_reaches_no_trial(data, tmp_path):
    """The base file was read again for every trial: edited while the tuner ran (another experiment's
    batch size), the later trials trained the edit in one study with the earlier ones, without a
    word; edited into an invalid config, each later trial failed. The trials start from base +
    overrides as the launch read them."""
    from dmhpc.config import config_to_dict

    base = tmp_path / "base.yaml"
    base.write_text(f"base: {TINY}\nloss:\n  mmd:\n    unbiased: true\n")
    t = load_tune(spec(data, tmp_path, executor="debug", parallel=1, base=str(base),
                       space={"optim.lr": [0.001, 0.003], "loss.mmd": [{"max_samples": 64}]}))
    values = {"optim.lr": 0.003, "loss.mmd": {"max_samples": 64}}
    run_dir, first = t.point(values)
    assert first.loss.mmd.unbiased and first.loss.mmd.max_samples == 64  # (a mapping merged, as overrides are)
    assert first.optim.lr == 0.003 and first.run.dir == str(run_dir) and first.select.criterion == "im"
    for edit in ("train:\n  batch_size: 2\n", "model:\n  name: vgg\n"):
        base.write_text(f"base: {TINY}\n{edit}")
        assert config_to_dict(t.point(values)[1]) == config_to_dict(first)


def test_a_good_trial_stopped_with_the_search_runs_again_and_spends_no_budget(data, tmp_path):
    """Trials running well when three others failed in a row were failed with the search: counted
    against the budget, never run again, though the failures were of other values."""
    from dmhpc.launch.tune import _counted, _open_study

    # A batch larger than the training split fails its trial at the trainer's start (data sets are
    # no values of a search: refused in the space).
    good, too_big = 4, 1000
    s = spec(data, tmp_path, trials=6, parallel=2, space={"train.batch_size": [good, too_big]},
             overrides={k: v for k, v in tiny_overrides(data, **{"train.epochs": 50}).items()
                        if k != "train.batch_size"},
             enqueue=[{"train.batch_size": good}] + [{"train.batch_size": too_big}] * 3)
    with pytest.raises(DmhpcError, match="3 trials failed in a row; search stopped"):
        tune(s, poll_s=0.2)
    # Its job ended before the tuner did: the next launch's rerun found its run held, and failed.
    held = [p.name for p in (tmp_path / "tune").iterdir() if p.is_dir() and RunDir(p).holder()]
    assert held == []
    trials = _open_study(load_tune(s)).get_trials(deepcopy=False)
    first = trials[0]
    assert first.params == {"train.batch_size": json.dumps(good)}  # choices are kept as JSON text
    assert "the next launch runs it again" in first.user_attrs["failure"]
    reruns = [tr for tr in trials if tr.user_attrs.get("rerun_of") == first.number]
    assert [tr.state.name for tr in reruns] == ["WAITING"] and reruns[0].system_attrs["fixed_params"] == first.params
    assert _counted(_open_study(load_tune(s))) == 3  # the three failures only


def test_a_trial_stopped_with_the_search_keeps_its_own_reason_in_the_table(tmp_path):
    """Every trial with a rerun was listed as left running by a killed tuner, also one the search
    stopped while it ran well: its recorded reason was replaced."""
    from dmhpc.launch.tune import _fail, _requeue_stale, trial_rows

    study = optuna.create_study(direction="maximize")
    lr = {"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])}
    stale, good = study.ask(lr), study.ask(lr)
    study.enqueue_trial(good.params, user_attrs={"rerun_of": good.number})  # as the search stops it
    _fail(study, good, "stopped: the search stopped; the next launch runs it again")
    assert _requeue_stale(study, tmp_path / "submitit") == 1  # then the tuner was killed
    failures = {r["trial"]: r["failure"] for r in trial_rows(study)}
    assert failures[good.number] == "stopped: the search stopped; the next launch runs it again"
    assert failures[stale.number] == "left running by a tuner that was killed; run again as trial 3"


def test_a_torn_journal_is_refused_with_its_name(data, tmp_path):
    (tmp_path / "tune").mkdir()
    journal = tmp_path / "tune" / JOURNAL
    journal.write_text('{"op_code": 0, "worker_id": "x"}\n{"op_code": 5, "wor')
    with pytest.raises(DmhpcError, match=rf"{journal}: its last record is incomplete"):
        tune(spec(data, tmp_path), poll_s=0.2)
    # JSON that is no journal record: a TypeError or AssertionError traceback from optuna's replay.
    for text in ('[1]\n', '"x"\n', '{"op_code": 99, "worker_id": "x"}\n'):
        journal.write_text(text)
        with pytest.raises(DmhpcError, match=rf"{journal}: not a readable Optuna journal"):
            tune(spec(data, tmp_path), poll_s=0.2)


def test_a_journal_with_a_trials_lines_removed_by_hand_is_refused(data, tmp_path):
    """Optuna drops the records of a trial it does not know: one trial's lines removed (a failed
    trial, by hand) lost every later trial's parameters and results without a word, and they ran
    again with other values as trials "left running by a tuner that was killed"."""
    from optuna.distributions import FloatDistribution

    t = load_tune(spec(data, tmp_path))
    t.out.mkdir(parents=True)
    study = _open_study(t)
    for value in (0.1, 0.2, 0.3):
        study.tell(study.ask({"x": FloatDistribution(0.0, 1.0)}), value)
    journal = t.out / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    create = [k for k, line in enumerate(lines) if json.loads(line)["op_code"] == 4]
    assert len(create) == 3
    kept = [line for k, line in enumerate(lines) if k != create[1] and json.loads(line).get("trial_id") != 1]
    journal.write_text("".join(kept))
    n = 1 + next(k for k, line in enumerate(kept) if json.loads(line).get("trial_id") == 2)
    with pytest.raises(DmhpcError, match=rf"^{journal}: line {n} is of trial 2, which no earlier line created \(lines "
                                         rf"removed by hand\?\): Optuna would drop it"):
        _open_study(t)
    journal.write_text("".join(lines))  # as it was: taken
    assert [tr.value for tr in _open_study(t).get_trials()] == [0.1, 0.2, 0.3]


def test_the_training_seed_is_no_dimension_of_the_search(data, tmp_path):
    """TPE optimised the seed with the hyper-parameters: the best trial was its seed's luck too."""
    with pytest.raises(DmhpcError, match=r"space.seed: the training seed is the study's, not a value to search"):
        load_tune(spec(data, tmp_path, space={"optim.lr": [0.001, 0.003], "seed": [1, 2, 3]}))


def test_a_relaunch_refused_for_its_gpus_leaves_the_earlier_tuners_trials_running(data, tmp_path):
    """The stale trials of an earlier tuner were stopped (its SLURM jobs cancelled, its local jobs
    killed) and queued again before the launch's own checks, which then refused it: a relaunch
    with --executor local on a GPU-less login node stopped every running trial of the study."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus_per_node 1 is no refusal here")
    t = load_tune(spec(data, tmp_path))
    t.out.mkdir(parents=True)
    study = _open_study(t)
    running = study.ask({"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])})
    with pytest.raises(DmhpcError, match=r"gpus_per_node 1: .* here for local jobs"):
        tune(spec(data, tmp_path, slurm={"gpus_per_node": 1}), poll_s=0.2)
    assert [(tr.number, tr.state) for tr in _study(t.out).get_trials()] == [(running.number,
                                                                            optuna.trial.TrialState.RUNNING)]


def test_a_journal_of_another_study_or_direction_is_refused_and_left_as_it_was(data, tmp_path):
    """A journal holding another Optuna study got a second study appended without a word; one whose
    dmhpc-tune study minimizes was tuned with its sampler and pruner working against the objective."""
    from optuna.distributions import FloatDistribution

    t = load_tune(spec(data, tmp_path))
    journal = t.out / JOURNAL
    t.out.mkdir(parents=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    other = optuna.create_study(storage=storage, study_name="my-other-study")
    other.tell(other.ask({"x": FloatDistribution(0.0, 1.0)}), 0.5)
    before = journal.read_bytes()
    with pytest.raises(DmhpcError, match=rf"{journal}: holds other Optuna studies \(my-other-study\); not this "
                                         rf"tuner's journal: tune into another out"):
        _open_study(t)
    assert journal.read_bytes() == before
    journal.unlink()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    optuna.create_study(storage=storage, study_name="dmhpc-tune", direction="minimize")
    with pytest.raises(DmhpcError, match=rf"{journal}: its study minimizes; a dmhpc tune maximizes its objective"):
        _open_study(t)


def test_a_tuner_killed_while_requeueing_a_stale_trial_queues_it_once(data, tmp_path):
    """Killed between queueing a stale trial's rerun and failing the stale trial, the next tuner
    queued a second rerun: the whole budget went on the same values."""
    from dmhpc.launch.tune import _counted, _requeue_stale

    t = load_tune(spec(data, tmp_path, trials=2, parallel=1))
    lock = _lock(t.out)
    study = _open_study(t)
    trial = study.ask({"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])})
    study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})  # then killed
    lock.close()
    assert _requeue_stale(study, t.out / "submitit") == 1
    states = [(tr.state.name, tr.user_attrs.get("rerun_of")) for tr in study.get_trials()]
    assert states == [("FAIL", None), ("WAITING", 0)] and _counted(study) == 0


def test_a_stale_trial_keeps_its_enqueued_values_and_a_recorded_failure_stays_one(data, tmp_path):
    """A tuner killed while the sampler filled in an enqueued trial left some values unset, and the
    rerun drew them anew (the baseline never ran). One killed between recording a trial's failure
    and telling the study had the failure run again, no longer counted."""
    from dmhpc.launch.tune import _counted, _requeue_stale

    t = load_tune(spec(data, tmp_path, trials=3, parallel=1))
    lock = _lock(t.out)
    study = _open_study(t)
    lr = optuna.distributions.CategoricalDistribution(["0.001", "0.003"])
    weight = optuna.distributions.FloatDistribution(0.1, 1.0)
    study.enqueue_trial({"optim.lr": "0.003", "loss.transfer_weight": 0.5})
    half = study.ask({"optim.lr": lr})  # killed before loss.transfer_weight was asked
    failed = study.ask({"optim.lr": lr, "loss.transfer_weight": weight})
    failed.set_user_attr("failure", "exit code 1")  # then killed
    diverged = study.ask({"optim.lr": lr, "loss.transfer_weight": weight})
    diverged.set_user_attr("failed_by_values", True)
    diverged.set_user_attr("failure", "diverged: step 3")  # then killed: told as it would have been
    lock.close()
    assert _requeue_stale(study, t.out / "submitit") == 1
    trials = study.get_trials()
    assert [(tr.state.name, tr.user_attrs.get("rerun_of")) for tr in trials] == \
        [("FAIL", None), ("FAIL", None), ("PRUNED", None), ("WAITING", half.number)]
    assert trials[-1].system_attrs["fixed_params"] == {"optim.lr": "0.003", "loss.transfer_weight": 0.5}
    assert trials[failed.number].user_attrs["failure"] == "exit code 1" and _counted(study) == 2


def test_the_command_line_and_the_shipped_tune_files(data, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec(data, tmp_path, trials=1, parallel=1)))
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), str(path)], capture_output=True,
                          text=True, env=clean_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "dmhpc tune: best trial 0:" in proc.stdout
    path.write_text(yaml.safe_dump({**spec(data, tmp_path), "objective": "oracle-target-acc"}))
    proc = subprocess.run([sys.executable, "-m", "dmhpc", "tune", str(path)], capture_output=True, text=True,
                          env=clean_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and f"{path}: objective: oracle-target-acc reads target labels" in proc.stderr
    path.write_text(yaml.safe_dump({**spec(data, tmp_path / "slurm"), "executor": "slurm"}))
    proc = subprocess.run([sys.executable, "-m", "dmhpc", "tune", str(path)], capture_output=True, text=True,
                          env={**clean_env(), "PATH": "/nonexistent"}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "executor slurm: no SLURM here (sbatch is not on PATH)" in proc.stderr
    assert not (tmp_path / "slurm").exists()  # refused before anything was created
    for shipped in sorted((ROOT / "configs" / "tune").glob("*.yaml")):
        t = load_tune(shipped)
        assert t.objective and t.space, shipped


def test_sigterm_ends_the_tuner_and_its_local_trials_and_a_relaunch_takes_them_up(data, tmp_path):
    from tests.test_submit import _held

    s = spec(data, tmp_path, trials=2, parallel=2, space={"optim.lr": [0.001, 0.003]},
             enqueue=[{"optim.lr": 0.001}, {"optim.lr": 0.003}],
             overrides=tiny_overrides(data, **{"train.epochs": 300}))
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(s))
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}  # two trials share the cores
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "tune", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    runs = [tmp_path / "tune" / "optim.lr=0.001", tmp_path / "tune" / "optim.lr=0.003"]
    deadline = time.monotonic() + 180
    while not all((r / "metrics.jsonl").exists() and '"epoch"' in (r / "metrics.jsonl").read_text() for r in runs):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "dmhpc tune: interrupted\n", (out, err)  # no job controller's traceback
    assert "| trial | state |" in (tmp_path / "tune" / "trials.md").read_text()  # written on the way out
    deadline = time.monotonic() + 30
    while any(_held(r / ".lock") for r in runs):  # the trials' trainers ended with the tuner
        assert time.monotonic() < deadline, "a trial still trains after the tuner ended"
        time.sleep(0.2)
    # Stopped and queued again, as the search's own stopped trials are: left RUNNING, the next launch
    # took them for a killed tuner's and listed them as failed.
    trials = _study(tmp_path / "tune").get_trials()
    assert [(t.state.name, t.user_attrs.get("rerun_of")) for t in trials] == [("FAIL", None), ("FAIL", None),
                                                                             ("WAITING", 0), ("WAITING", 1)]
    assert all(t.user_attrs["failure"] == "stopped: the tuner was stopped; the next launch runs it again"
               for t in trials[:2])
    assert not _held(tmp_path / "tune" / LOCK)


def test_a_tuner_stopping_on_a_journal_it_cannot_write_still_cancels_every_local_job(data, tmp_path, monkeypatch):
    """Stopping queued each trial again between one job's cancel and the next: a journal write that
    failed (the full disk the tuner was ending for) left the later jobs training as orphans."""
    from dmhpc.launch.tune import _Running, _Search

    tuning = sys.modules["dmhpc.launch.tune"]  # (dmhpc.launch's `tune` is the function)

    class Job:
        cancelled = False

        def cancel(self, check=True):
            self.cancelled = True

    t = load_tune(spec(data, tmp_path, parallel=2))
    t.out.mkdir()
    study = _open_study(t)
    search = _Search(t, study, poll_s=0.1)
    lr = optuna.distributions.CategoricalDistribution(["0.001", "0.003"])
    jobs = [Job(), Job()]
    search.running = [_Running(study.ask({"optim.lr": lr}), RunDir(tmp_path / f"r{k}"), job)
                      for k, job in enumerate(jobs)]

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning, "_queue_again", full)
    search.abandon()
    assert all(job.cancelled for job in jobs)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_a_relaunch_proposes_new_values_not_the_first_launchs_again(data, tmp_path, seed):
    """Each launch seeds its sampler with the file's seed plus the trials so far, within numpy's
    seeds: a seed of 2**32 - 1 made every relaunch a traceback, 2**32 the first after its journal."""
    s = spec(data, tmp_path, trials=1, parallel=1, executor="debug", seed=seed,
             space={"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}})
    with pytest.raises(DmhpcError, match=r": seed: expected an integer from 0 to 4294967295, got 4294967296$"):
        load_tune({**s, "seed": 2**32})
    assert not (tmp_path / "tune").exists()
    tune(s)
    tune({**s, "trials": 2})  # the sampler is still in its random start-up phase
    first, second = _study(tmp_path / "tune").get_trials()
    assert second.state.name == "COMPLETE" and second.params != first.params


def test_a_refused_sbatch_fails_its_trial_and_stops_with_one_line(data, tmp_path, monkeypatch, capsys):
    """sbatch refusing a trial's job ended the tuner in submitit's FailedJobError traceback with the
    asked trial left RUNNING in the journal: the next launch took it for a killed tuner's and
    looked for its SLURM job."""
    from dmhpc.cli import main
    from tests.test_submit import refuse_sbatch

    refuse_sbatch(tmp_path, monkeypatch)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**spec(data, tmp_path), "executor": "slurm", "slurm": {"partition": "gpuu"}}))
    assert main(["tune", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == ("dmhpc tune: error: sbatch refused the job of trial 0: sbatch: error: invalid partition "
                   "specified: gpuu; sbatch: error: Invalid partition name specified\n"), err
    trials = _study(tmp_path / "tune").get_trials()
    # Queued again: not submitted, it trained nothing, and used up the budget (an enqueued baseline
    # never ran after the partition was put right).
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].system_attrs["fixed_params"] == trials[0].params and trials[1].user_attrs["rerun_of"] == 0
    assert "Invalid partition name specified" in trials[0].user_attrs["failure"]
    assert "Invalid partition name specified" in (tmp_path / "tune" / "trials.md").read_text()
    assert not [name for name in os.listdir(tmp_path / "tune" / "submitit") if name.endswith((".pkl", ".sh"))]


def test_a_stale_slurm_trial_that_will_not_leave_the_queue_is_said(tmp_path, monkeypatch, capsys):
    """The tuner waited 5 minutes for SLURM to drop a cancelled trial's job, then went on without a
    word: its rerun then met the job in the run directory ("in use")."""
    import importlib

    tuning = importlib.import_module("dmhpc.launch.tune")  # the module, not the function dmhpc.launch exports
    fake_commands(tmp_path, monkeypatch, {"scancel": "exit 0\n", "squeue": "echo 777\n"})  # listed for ever
    monkeypatch.setattr(tuning.time, "sleep", lambda s: None)
    tuning._cancel_slurm_job("777")
    assert ("cannot cancel SLURM job 777 of an earlier tuner (SLURM still lists it after 5 minutes); its trial's "
            "rerun may find the run directory in use") in capsys.readouterr().out


def _orphan(folder: Path, tmp_path: Path):
    """A local job in `folder` as a killed tuner leaves its trainer, started (a SIGINT while its
    interpreter still starts is lost: site.py swallows it)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(timeout_min=10)
    with submission(None):  # as the tuner starts its jobs (SIGINT not ignored in them)
        orphan = executor.submit(_started_then_sleep, str(tmp_path / "started"))
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return orphan


def test_a_local_trial_orphaned_by_a_killed_tuner_is_stopped_before_its_rerun(data, tmp_path):
    """A tuner killed outright (SIGKILL, a lost session) left its local trials training as orphans:
    each rerun failed on the run directory the orphan held ("in use"), spending the budget, and the
    orphan's result was never counted. Their submitit controllers are now interrupted and waited for;
    a process that merely has the recorded pid now is left alone."""
    from dmhpc.launch.tune import _requeue_stale

    t = load_tune(spec(data, tmp_path, trials=2, parallel=1))
    folder = t.out / "submitit"
    lock = _lock(t.out)
    study = _open_study(t)
    orphan = _orphan(folder, tmp_path)
    stranger = subprocess.Popen(["sleep", "600"])  # a process that got a recorded pid since
    distribution = {"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])}
    try:
        for job_id in (orphan.job_id, str(stranger.pid)):
            trial = study.ask(distribution)
            trial.set_user_attr("job_id", job_id)
            trial.set_user_attr("executor", "local")
        lock.close()
        assert _requeue_stale(study, folder) == 2
        assert orphan.done()  # its controller ended (SIGINT), its task with it
        assert stranger.poll() is None  # not ours: untouched
    finally:
        stranger.kill()
        orphan.cancel(check=False)


def test_a_study_whose_data_was_prepared_again_is_refused(make_domains, tmp_path):
    """The study compared its data by path only: a data set prepared again at the same path (other
    splits, other images) let the next launch add trials scored on other data to a study whose best
    was scored on the first. Data prepared after the study began is no change."""
    import numpy as np

    from dmhpc.data.shards import write_dataset

    root = make_domains(64)
    t = load_tune(spec(root, tmp_path))
    with _lock(t.out):
        _open_study(t)
        _open_study(t)  # the same data: the same study
    shutil.rmtree(root / "noisy")
    with _lock(t.out):
        _open_study(t)  # a launch that found it missing: accepted, its fingerprint not forgotten
    rng = np.random.default_rng(1)
    write_dataset(rng.normal(0, 0.3, (64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None, root / "noisy",
                  shard_size=64, seed=1)
    with _lock(t.out), pytest.raises(DmhpcError) as refused:
        _open_study(t)
    assert str(refused.value) == (f"{t.out / JOURNAL}: its trials trained on other data (data.target {root / 'noisy'} "
                                  f"prepared again since the study began: their scores and the new trials' are not "
                                  f"comparable); use another out")


def test_stale_slurm_trials_have_their_jobs_cancelled_recorded_or_found_by_their_comment(data, tmp_path, monkeypatch,
                                                                                        capsys):
    """A SLURM trial left running by a killed tuner: its recorded job is cancelled, one whose id the
    tuner never recorded is found by the token of its comment; then each is queued again. Where
    squeue cannot be asked, said, and queued again all the same."""
    import importlib

    tuning = importlib.import_module("dmhpc.launch.tune")
    cancelled = tmp_path / "scancel-calls"
    fake_commands(tmp_path, monkeypatch, {
        "scancel": f'echo "$1" >> {cancelled}\n',
        "squeue": 'case "$*" in *"%i %k"*) echo "778 dmhpc-launch:tok";; esac\n'})  # -j ID: gone
    t = load_tune(spec(data, tmp_path, executor="slurm"))
    distribution = {"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])}
    with _lock(t.out):
        study = _open_study(t)
        for attrs in ({"executor": "slurm", "submission": "other", "job_id": "777"},
                      {"executor": "slurm", "submission": "tok"}):
            trial = study.ask(distribution)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        assert tuning._requeue_stale(study, t.out / "submitit") == 2
    assert cancelled.read_text().split() == ["777", "778"]
    assert [tr.state.name for tr in study.get_trials()] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    # squeue failing: a warning, and the trial queued again
    fake_commands(tmp_path, monkeypatch, {"squeue": "echo 'slurm_load_jobs error' >&2; exit 1\n"})
    with _lock(t.out):
        study = _open_study(t)
        trial = study.ask(distribution)
        trial.set_user_attr("executor", "slurm")
        trial.set_user_attr("submission", "tok2")
        assert tuning._requeue_stale(study, t.out / "submitit") == 1
    # (ask took the trial queued again above, number 2)
    assert "cannot look for the SLURM job of trial 2 of an earlier tuner (squeue: cannot list" in capsys.readouterr().out
    last = study.get_trials()[-1]
    assert (study.get_trials()[2].state.name, last.state.name, last.user_attrs["rerun_of"]) == ("FAIL", "WAITING", 2)


def test_a_local_trial_whose_tuner_was_killed_before_recording_its_job_is_stopped(data, tmp_path):
    """A tuner killed after submitting a local trial and before recording its job id left an orphan
    no job id names: the trial is stale (RUNNING) with its executor only, and any job still running
    in the study's folder is that orphan (the new tuner holds the study's lock)."""
    from dmhpc.launch.tune import _requeue_stale

    t = load_tune(spec(data, tmp_path, trials=1, parallel=1))
    folder = t.out / "submitit"
    lock = _lock(t.out)
    study = _open_study(t)
    orphan = _orphan(folder, tmp_path)
    try:
        trial = study.ask({"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])})
        trial.set_user_attr("executor", "local")  # as the tuner records it before the job exists
        lock.close()
        assert _requeue_stale(study, folder) == 1
        assert orphan.done()
    finally:
        orphan.cancel(check=False)


def test_a_rounded_value_stays_within_its_range():
    """Values are rounded to 4 digits for the run directory's name: a draw near high = 1.23456
    became 1.235, a value outside the range the study declares."""
    from dmhpc.launch.spec import Range
    from dmhpc.launch.tune import _values

    space = {"loss.fisher.weight": Range(1.0e-4, 1.23456, False), "optim.name": ["adam", "sgd"]}
    assert _values({"loss.fisher.weight": 1.234559, "optim.name": '"sgd"'}, space) == \
        {"loss.fisher.weight": 1.23456, "optim.name": "sgd"}
    assert _values({"loss.fisher.weight": 0.5000049, "optim.name": '"adam"'}, space)["loss.fisher.weight"] == 0.5


def test_a_pruner_section_left_empty_is_refused_not_taken_as_no_pruning(data, tmp_path):
    """`pruner:` with its keys commented out reads as null, which meant "no pruning": the search ran
    every trial to its end without a word. false says no pruning; null is refused."""
    with pytest.raises(DmhpcError, match="pruner: null: write false for no pruning"):
        load_tune({**spec(data, tmp_path), "pruner": None})
    assert load_tune({**spec(data, tmp_path), "pruner": False}).pruner is None
    assert load_tune({k: v for k, v in spec(data, tmp_path).items() if k != "pruner"}).pruner == \
        {"startup_trials": 4, "warmup_epochs": 5}
    # 0, '' or [] were read as {} (the default pruner) without a word.
    for value in (0, "", []):
        with pytest.raises(DmhpcError, match="pruner: expected a mapping"):
            load_tune({**spec(data, tmp_path), "pruner": value})


def test_a_trial_with_a_pruned_trials_values_waits_for_its_cancelled_job_to_end(data, tmp_path):
    """A pruned trial's job is cancelled and saves before it ends, holding its run directory (on
    SLURM its state reads CANCELLED meanwhile). A trial asking for the same values at once (TPE can)
    failed as "in use" instead of resuming the run. Here the job ends at its cancel, and a process
    it left holds the run's lock for a few seconds more (counted from the job's start: a job slow to
    start on a loaded machine outlasted a hold counted from the holder's own start)."""
    from optuna.trial import TrialState

    from dmhpc.launch.tune import _Running, _Search
    from dmhpc.run import LOCK as RUN_LOCK, RunDir

    t = load_tune(spec(data, tmp_path, trials=1, parallel=1, space={"optim.lr": [0.003]}))
    t.out.mkdir()
    study = _open_study(t)
    search = _Search(t, study, poll_s=0.1)
    run_dir, _ = t.point({"optim.lr": 0.003})
    with submission(None):
        job = search.submitter.submit(_started_then_sleep, str(t.out / "started"))
    saving = subprocess.Popen([sys.executable, "-c", f"""if True:
        import time; from pathlib import Path; from dmhpc.files import hold_lock
        with hold_lock(Path({str(run_dir / RUN_LOCK)!r}), "held", "holder"):
            Path({str(t.out / "holding")!r}).touch()
            deadline = time.monotonic() + 120
            while not Path({str(t.out / "started")!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(4)"""], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ((t.out / "holding").exists() and (t.out / "started").exists()):
        assert time.monotonic() < deadline and saving.poll() is None and not job.done()
        time.sleep(0.1)
    pruned = study.ask(search.distributions)
    search.running.append(_Running(pruned, RunDir(run_dir), job))
    search.stop(job, lambda o: study.tell(o.trial, state=TrialState.PRUNED))
    search.start()  # the same values again
    # The holder freed the lock for start() to go on; its exit follows (not always at once).
    assert job.done() and saving.wait(timeout=30) == 0
    while search.running:
        search.poll()
        time.sleep(0.1)
    assert [tr.state.name for tr in study.get_trials()] == ["PRUNED", "COMPLETE"], \
        study.get_trials()[-1].user_attrs


def test_a_success_between_failures_starts_the_count_of_failures_in_a_row_again(data, tmp_path):
    """Failures with a completed trial between them are not "in a row": the search stopped after
    its third failure in all, spread over a long search of good trials."""
    from dmhpc.launch.tune import FAILURES_IN_A_ROW, _Search

    t = load_tune(spec(data, tmp_path, executor="debug", parallel=1))
    t.out.mkdir()
    search = _Search(t, _open_study(t), poll_s=0.1)
    for what in ["fail"] * (FAILURES_IN_A_ROW - 1) + ["complete"] + ["fail"] * (FAILURES_IN_A_ROW - 1):
        search.outcome(what)
    assert search.failures_in_a_row == FAILURES_IN_A_ROW - 1
    search.outcome("fail")
    assert search.failures_in_a_row == FAILURES_IN_A_ROW


def test_a_log_range_is_searched_on_a_log_scale(data, tmp_path):
    """space {low, high, log: true} was handed to the sampler as a uniform range: a learning rate
    from 1e-5 to 1e-1 was drawn above 1e-2 nine times in ten."""
    from optuna.distributions import FloatDistribution

    from dmhpc.launch.tune import _distributions

    t = load_tune(spec(data, tmp_path, space={"optim.lr": {"low": 1e-5, "high": 1e-1, "log": True},
                                              "loss.entropy_weight": {"low": 0.0, "high": 0.1}}))
    assert _distributions(t.space) == {"optim.lr": FloatDistribution(1e-5, 1e-1, log=True),
                                       "loss.entropy_weight": FloatDistribution(0.0, 0.1, log=False)}


def test_the_pruner_is_told_the_best_score_so_far_at_each_evaluation(tmp_path):
    """The trainer keeps the best checkpoint: a trial whose score dipped at one evaluation still has
    its earlier best, and reporting the dip pruned a trial that was ahead of the median."""
    from dmhpc.launch.tune import _evaluations
    from dmhpc.run import RunDir

    records = [{"kind": "setup", "step": 0}] + [
        {"kind": "epoch", "epoch": e, "step": e + 1, "selection": {"criterion": "im", "score": s}}
        for e, s in enumerate((0.5, 0.3, 0.6, 0.4))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _evaluations(RunDir(tmp_path)) == ([(0, 0.5), (1, 0.5), (2, 0.6), (3, 0.6)], False)


def test_a_finished_run_of_another_configuration_is_not_taken_as_the_trials_result(data, tmp_path):
    """OUT/<values> holding a finished run trained otherwise (another seed here, an edited base):
    its score was recorded as the trial's, for values it was never trained with."""
    from dataclasses import replace

    from dmhpc.config import save_config

    s = spec(data, tmp_path, trials=1, parallel=1, executor="debug", space={"optim.lr": [0.003]})
    run_dir, cfg = load_tune(s).point({"optim.lr": 0.003})
    (run_dir / "eval").mkdir(parents=True)
    save_config(replace(cfg, seed=cfg.seed + 1), run_dir / "config.yaml")
    (run_dir / "eval" / "best_test.json").write_text(json.dumps(
        {"split": "test", "final": True, "checkpoint": {"name": "best", "epoch": 1, "criterion": "im", "score": 0.9}}))
    assert tune(s, poll_s=0.1)["number"] is None
    (trial,) = _study(tmp_path / "tune").get_trials()
    assert trial.state.name == "FAIL"
    assert "the run was trained with another configuration: seed" in trial.user_attrs["failure"]


def test_an_enqueued_value_of_another_type_than_the_choices_is_refused(data, tmp_path):
    """1 for the choices [1.0, 2.0] is no choice of the space (their JSON differs): the enqueued
    trial failed in Optuna at the first launch, a traceback, instead of being refused."""
    s = spec(data, tmp_path, space={"loss.transfer_weight": [1.0, 2.0]})
    load_tune({**s, "enqueue": [{"loss.transfer_weight": 1.0}]})
    with pytest.raises(DmhpcError) as err:
        load_tune({**s, "enqueue": [{"loss.transfer_weight": 1}]})
    assert str(err.value) == "<launch dict>: enqueue[0].loss.transfer_weight: 1 is not one of the choices [1.0, 2.0]"


def test_the_table_lists_pruned_trials_after_complete_ones_with_the_epoch_they_were_pruned_at(tmp_path):
    """A pruned trial's value is its last intermediate score, not a selected checkpoint's: ranked by
    it, a pruned trial stood above the best complete one; and "pruned after epoch" gave its first
    evaluation's epoch, not its last."""
    from optuna.trial import TrialState

    from dmhpc.launch.tune import write_trials

    study = optuna.create_study(direction="maximize")
    lr = {"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])}
    complete, pruned = study.ask(lr), study.ask(lr)
    study.tell(complete, 0.2)
    for epoch, score in ((0, 0.5), (1, 0.7), (2, 0.9)):
        pruned.report(score, epoch)
    study.tell(pruned, state=TrialState.PRUNED)
    write_trials(tmp_path, study, "im")
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [(r["trial"], r["state"], r["pruned_at_epoch"]) for r in rows] == [
        (str(complete.number), "complete", ""), (str(pruned.number), "pruned", "2")]
    assert "pruned after epoch 2 |" in (tmp_path / "trials.md").read_text()


def test_a_finished_run_of_another_job_shape_is_no_trials_result(data, tmp_path):
    """A study begun again (its journal removed, or begun by a dmhpc that recorded no ranks) over the
    runs of one of 1 rank, now with 2: the finished run trained on half the global batch was taken
    as the new trial's result."""
    s = spec(data, tmp_path, space={"optim.lr": [0.003]}, trials=1, parallel=1, executor="debug",
             overrides=tiny_overrides(data))
    tune(s, poll_s=0.2)
    (tmp_path / "tune" / JOURNAL).unlink()
    tune({**s, "executor": "local", "slurm": {"tasks_per_node": 2}}, poll_s=0.2)  # refused before it runs
    (trial,) = _study(tmp_path / "tune").get_trials()
    assert trial.state.name == "FAIL" and "ranks 1 -> 2" in trial.user_attrs["failure"]


def test_an_enqueued_list_written_otherwise_than_its_choice_is_that_choice(data, tmp_path):
    """An enqueued [0.0, 0.5] passed the check against the choice [0, 0.5] (equal lists) but was
    enqueued as its own JSON text, no choice of the sampler's: the tuner's first ask was a
    ValueError traceback, and the relaunch ran the trial with values of the sampler's instead."""
    from dmhpc.launch.tune import _distributions

    t = load_tune(spec(data, tmp_path, space={"optim.betas": [[0.5, 0.9], [0, 0.5]]},
                       enqueue=[{"optim.betas": [0.0, 0.5]}]))
    t.out.mkdir()
    trial = _open_study(t).ask(_distributions(t.space))
    assert trial.params == {"optim.betas": "[0, 0.5]"}


def test_trials_sharing_one_failed_job_are_one_failure_in_a_row(data, tmp_path):
    """Trials with equal values share one job; its failure counted once per trial, so one failed job
    of three sharing trials stopped the search as three failures in a row."""
    s = spec(data, tmp_path, trials=4, parallel=3, space={"optim.lr": [0.003]},
             overrides={**tiny_overrides(data), "data.source": str(tmp_path / "missing")})
    tune(s, poll_s=0.2)  # two failures in a row, then the budget is spent: no stop
    trials = _study(tmp_path / "tune").get_trials()
    assert [tr.state.name for tr in trials] == ["FAIL"] * 4
    assert len({tr.user_attrs["job_id"] for tr in trials if "job_id" in tr.user_attrs}) == 2


@pytest.mark.parametrize("ended", [False, True])
def test_a_trial_in_its_final_test_is_not_pruned_and_a_pruned_one_ends_a_row_of_failures(data, tmp_path, ended):
    """A trial whose training had ended was pruned while it tested its selected checkpoint: its job
    cancelled, its result lost, ranked below every complete trial. And a pruned trial, which trained,
    did not end a row of failures as a complete one does."""
    from dmhpc.launch.tune import _distributions, _Running, _Search
    from dmhpc.run import RunDir

    t = load_tune(spec(data, tmp_path, trials=2, parallel=1, pruner={"startup_trials": 1, "warmup_epochs": 0}))
    t.out.mkdir()
    study = _open_study(t)
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": "0.001"}, distributions=_distributions(t.space),
                                              value=0.5, intermediate_values={0: 0.5, 1: 0.5}))
    search = _Search(t, study, poll_s=0.1)
    run_dir, _ = t.point({"optim.lr": 0.003})
    run_dir.mkdir()
    records = [{"kind": "epoch", "epoch": e, "step": e + 1, "selection": {"criterion": "im", "score": 0.4}}
               for e in range(2)]
    records[-1].update({"last": True} if ended else {})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with submission(None):
        job = search.submitter.submit(_started_then_sleep, str(t.out / "started"))  # in its final test
    try:
        search.running.append(_Running(study.ask(search.distributions), RunDir(run_dir), job))
        search.failures_in_a_row = 2
        search.poll()
        assert [r.run.path for r in search.running] == ([run_dir] if ended else [])
        assert study.get_trials()[-1].state.name == ("RUNNING" if ended else "PRUNED")
        assert search.failures_in_a_row == (2 if ended else 0)
    finally:
        job.cancel(check=False)


def test_sigterm_while_an_earlier_tuners_slurm_job_leaves_the_queue_ends_as_ctrl_c(data, tmp_path, monkeypatch):
    """Cancelling an earlier tuner's SLURM jobs waits up to 5 minutes for the queue to drop each; a
    SIGTERM then (scancel of the tuner's own job) killed it outright: exit 143, no trials.md."""
    listed = tmp_path / "squeue-called"
    fake_commands(tmp_path, monkeypatch, {"scancel": "exit 0\n", "squeue": f"touch {listed}; echo 777\n"})
    s = spec(data, tmp_path, trials=1, parallel=1)
    t = load_tune(s)
    with _lock(t.out):
        trial = _open_study(t).ask({"optim.lr": optuna.distributions.CategoricalDistribution(["0.001", "0.003"])})
        trial.set_user_attr("executor", "slurm")
        trial.set_user_attr("job_id", "777")
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(s))
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "tune", str(tmp_path / "tune.yaml")], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not listed.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert (t.out / "trials.md").exists()


def test_a_users_trials_table_in_out_is_left_alone(data, tmp_path):
    """A first tune into a folder holding someone's trials.md replaced it (the grid refuses so)."""
    out = tmp_path / "tune"
    out.mkdir()
    (out / "trials.md").write_text("my notes")
    with pytest.raises(DmhpcError, match=rf"out: {re.escape(str(out))}: holds trials.md, which no launch into it "
                                         rf"wrote \(no {re.escape(str(out / LOCK))}\)"):
        load_tune(spec(data, tmp_path))
    assert (out / "trials.md").read_text() == "my notes"
    (out / LOCK).touch()  # a tuner's (its journal removed to begin again): its table is the tuner's to replace
    assert load_tune(spec(data, tmp_path))


def test_a_journal_that_cannot_take_a_record_stops_the_search_not_the_trial(tmp_path, monkeypatch):
    """A record the journal could not take (a full disk, a network file system's error) was taken for
    the trial's fault, as a damaged log of its run: a healthy trial was failed and its job
    cancelled, a finished one recorded as failed with its result lost. The search stops; the trial
    is left running, for the next launch."""
    import optuna
    from optuna.distributions import FloatDistribution

    from dmhpc.launch.tune import JournalUnwritable, _finish, _journal_storage, _Running

    study = optuna.create_study(storage=_journal_storage(tmp_path / JOURNAL), study_name="s", direction="maximize")
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.log_path.write_text(json.dumps({"kind": "epoch", "epoch": 0, "step": 1, "selection": {"score": 0.5}}) + "\n")

    from optuna.storages.journal import JournalFileBackend

    append, failed = JournalFileBackend.append_logs, []

    def once_unwritable(self, logs):  # (a transient error: the next record, the failure's, is taken)
        if not failed:
            failed.append(logs)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        append(self, logs)

    monkeypatch.setattr(JournalFileBackend, "append_logs", once_unwritable)
    with pytest.raises(JournalUnwritable, match=rf"{JOURNAL}: cannot record the search: Input/output error"):
        _finish(study, _Running(trial, run, None), "im")
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]


def test_a_job_that_fails_after_its_run_finished_completes_its_trial(tmp_path, monkeypatch, capsys):
    """A job failing once its run had written its selected checkpoint's test (a rank ended by torchrun
    after rank 0's last line) failed its trial, its score lost to the sampler, while a later trial
    of the same values took the same result as complete."""
    import optuna
    from optuna.distributions import FloatDistribution

    tuning = importlib.import_module("dmhpc.launch.tune")  # (the package's `tune` is the function)

    study = optuna.create_study(storage=tuning._journal_storage(tmp_path / JOURNAL), study_name="s",
                                direction="maximize")
    run = RunDir(tmp_path / "run")
    (run.path / "eval").mkdir(parents=True)
    result = {"final": True, "checkpoint": {"criterion": "im", "score": 0.25, "epoch": 1}}
    monkeypatch.setattr(tuning, "wait_for", lambda jobs: {name: "job 7 failed: exit 1" for name in jobs})
    for final, state in ((True, "COMPLETE"), (False, "FAIL")):  # (not finished: an evaluation's file)
        run.result_path("best", "test").write_text(json.dumps({**result, "final": final}))
        trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
        assert tuning._finish(study, tuning._Running(trial, run, job=object()), "im") == state.lower()
        assert study.trials[-1].state.name == state
    assert study.trials[0].value == 0.25
    assert "its job failed after the run finished (job 7 failed: exit 1); its result is taken" in capsys.readouterr().out
