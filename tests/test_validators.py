"""The validator table of a study (dmhpc/launch/validators.py) on hand-made run logs with known answers."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import TINY
from dmhpc.launch import load_grid, write_validators
from dmhpc.names import LABEL_FREE


def _log(point, source_acc, im, target_val, target_test, finished=True):
    """A run's metrics.jsonl: one evaluation per epoch with every validator scored; and, when
    `finished`, the trainer's final test result."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    if finished:
        (point.run_dir / "eval").mkdir(exist_ok=True)
        (point.run_dir / "eval" / "best_test.json").write_text(json.dumps({"final": True}))
    records = []
    for epoch, (s, i, v, t) in enumerate(zip(source_acc, im, target_val, target_test)):
        validators = {name: 0.5 for name in LABEL_FREE} | {"source-val-acc": s, "im": i}
        records.append({"kind": "epoch", "epoch": epoch, "step": epoch + 1, "validators": validators,
                        "source": {"val": {"accuracy": s}},
                        "target": {"val": {"accuracy": v}, "test": {"accuracy": t}}})
    (point.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_each_criterion_against_the_oracle_by_checkpoint_by_method_and_by_rank(tmp_path):
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}},
                        "oracle": {"base": str(TINY), "overrides": {"data.source": "data/embedded/shards/noisy"}}}}
    points = {p.values["method"]: p for p in load_grid(spec).points}
    _log(points["plain"], [0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    _log(points["mmd"], [0.6, 0.7, 0.65], [0.35, 0.2, 0.1], [0.8, 0.7, 0.6], [0.8, 0.7, 0.6])
    _log(points["oracle"], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.9, 0.9, 0.9], [0.9, 0.9, 0.9])  # trained on target
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", points.values())}
    assert set(rows) == {*LABEL_FREE, "oracle (target val acc)"}

    src = rows["source-val-acc"]
    assert src["pair"] == "pristine -> noisy" and src["runs"] == 2 and src["checkpoints"] == 6
    # plain picks epoch 0 (test 0.55), mmd epoch 1 (0.70); the oracle epochs 2 (0.75) and 0 (0.80)
    assert src["checkpoint_target_acc"] == pytest.approx(0.625)
    assert src["checkpoint_oracle_acc"] == pytest.approx(0.775)
    assert src["checkpoint_loss_points"] == pytest.approx(15.0)
    # between methods: source accuracy prefers plain (0.9 > 0.7) at 0.55; the oracle mmd at 0.80
    assert (src["method_target_acc"], src["method_oracle_acc"]) == pytest.approx((0.55, 0.80))
    assert src["method_loss_points"] == pytest.approx(25.0) and src["method_picked"] == "plain (1)"
    assert src["spearman_within_run"] == pytest.approx((-1.0 + -0.5) / 2)

    im = rows["im"]  # IM tracks target accuracy here: no loss either way
    assert im["checkpoint_loss_points"] == pytest.approx(0.0) and im["method_loss_points"] == pytest.approx(0.0)
    assert im["method_picked"] == "mmd (1)" and im["spearman_within_run"] == pytest.approx(1.0)
    assert rows["oracle (target val acc)"]["checkpoint_loss_points"] == pytest.approx(0.0)
    assert math.isnan(rows["snd"]["spearman_all"])  # a constant score ranks nothing
    # over every checkpoint of the label-free runs (the oracle's left out), against target test accuracy
    from scipy.stats import spearmanr

    tests = [0.55, 0.65, 0.75, 0.8, 0.7, 0.6]
    assert src["spearman_all"] == pytest.approx(spearmanr([0.9, 0.8, 0.7, 0.6, 0.7, 0.65], tests).statistic)
    assert im["spearman_all"] == pytest.approx(spearmanr([0.1, 0.2, 0.3, 0.35, 0.2, 0.1], tests).statistic)
    assert src["spearman_all"] != pytest.approx(im["spearman_all"])

    md = (tmp_path / "out" / "validators.md").read_text()
    assert "| pristine -> noisy | source-val-acc | 2 | 6 | 0.625 | 0.775 | 15.0 | 0.550 | 0.800 | 25.0 | plain (1) |" in md
    assert (tmp_path / "out" / "validators.csv").read_text().startswith("pair,criterion,runs,")


def test_a_setting_whose_method_has_no_scored_run_is_left_out_of_the_method_columns(tmp_path):
    """With mmd of seed 2 still training, seed 2's choice was among the others alone: the method
    columns credited plain with a pick it never had to win, and the loss was that of a smaller choice."""
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}}}}
    points = {(p.values["method"], p.values["seed"]): p for p in load_grid(spec).points}
    for seed in (1, 2):
        _log(points["plain", seed], [0.9, 0.8], [0.1, 0.2], [0.5, 0.6], [0.55, 0.65])
    _log(points["mmd", 1], [0.6, 0.7], [0.35, 0.2], [0.8, 0.7], [0.8, 0.7])
    _log(points["mmd", 2], [0.6], [0.3], [0.9], [0.9], finished=False)
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", points.values())}
    src = rows["source-val-acc"]
    assert src["runs"] == 3 and src["method_picked"] == "plain (1)"  # seed 1 only
    assert (src["method_target_acc"], src["method_oracle_acc"]) == pytest.approx((0.55, 0.80))
    md = (tmp_path / "out" / "validators.md").read_text()
    assert "Left out of the method columns, a method short: pristine -> noisy: seed=2 (no scored run of mmd)." in md


def test_of_equal_scores_the_first_checkpoint_is_scored_as_the_trainer_keeps_it(tmp_path):
    """Source accuracy over a few hundred rows ties often: the table scored another checkpoint than
    the one best.pt holds, were the last of equals picked."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]}}
    (point,) = load_grid(spec).points
    _log(point, [0.8, 0.8, 0.7], [0.1, 0.1, 0.3], [0.5, 0.6, 0.7], [0.6, 0.7, 0.5])
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", [point])}
    assert rows["source-val-acc"]["checkpoint_target_acc"] == pytest.approx(0.6)
    assert rows["im"]["checkpoint_target_acc"] == pytest.approx(0.5)


def test_runs_not_finished_are_left_out_as_in_the_summary(tmp_path):
    """A run that failed after one epoch (or still trains) counted as a whole run: its early,
    poor checkpoints pulled every criterion's numbers down, where summary.md left it out."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]}}
    done, failed = load_grid(spec).points
    _log(done, [0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    _log(failed, [0.5], [0.5], [0.3], [0.3], finished=False)
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", [done, failed])}
    assert rows["source-val-acc"]["runs"] == 1 and rows["source-val-acc"]["checkpoints"] == 3
    assert rows["source-val-acc"]["checkpoint_target_acc"] == pytest.approx(0.55)
    assert write_validators(tmp_path / "out2", [failed]) == []
    # The grid's runs no longer score the validators (a new version of the file): the tables of the
    # earlier version go, rather than stand beside the new leaderboard looking current.
    assert (tmp_path / "out" / "validators.md").exists()
    assert write_validators(tmp_path / "out", [failed]) == [] and not (tmp_path / "out" / "validators.md").exists()


def test_no_table_without_runs_that_scored_every_validator(tmp_path):
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]}}
    assert write_validators(tmp_path / "out", load_grid(spec).points) == []
    assert not (tmp_path / "out" / "validators.md").exists()


def test_pairs_whose_data_folders_share_a_name_are_separate_rows(tmp_path):
    # Two pristine data sets from different surveys: one row each, labelled apart; the same data
    # set written two ways is still one pair.
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]},
            "methods": {name: {"base": str(TINY), "overrides": {"data.source": source}} for name, source in [
                ("a", str(tmp_path / "a" / "pristine")), ("a-again", f"{tmp_path}/b/../a/pristine"),
                ("b", str(tmp_path / "b" / "pristine"))]}}
    points = {p.values["method"]: p for p in load_grid(spec).points}
    _log(points["a"], [0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    _log(points["a-again"], [0.6, 0.7, 0.65], [0.35, 0.2, 0.1], [0.8, 0.7, 0.6], [0.8, 0.7, 0.6])
    _log(points["b"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.9, 0.9, 0.9], [0.9, 0.9, 0.9])
    rows = {r["pair"]: r for r in write_validators(tmp_path / "out", points.values())
            if r["criterion"] == "source-val-acc"}
    assert set(rows) == {"a/pristine -> noisy", "b/pristine -> noisy"}
    assert rows["a/pristine -> noisy"]["runs"] == 2 and rows["b/pristine -> noisy"]["runs"] == 1
    assert rows["b/pristine -> noisy"]["checkpoint_target_acc"] == pytest.approx(0.9)
    assert "| b/pristine -> noisy | source-val-acc | 1 | 3 |" in (tmp_path / "out" / "validators.md").read_text()


def test_methods_are_compared_within_each_seed_and_the_oracle_by_validation_accuracy(tmp_path):
    """The method view picks among the runs of one seed: all seeds pooled, one lucky seed's run stood
    for the whole study. The oracle picks the run by target validation accuracy, as it picks a
    checkpoint: by test accuracy, it peeked at the very numbers it is scored on."""
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}}}}
    points = {(p.values["method"], p.values["seed"]): p for p in load_grid(spec).points}
    # seed 1: source accuracy and the oracle (validation) prefer plain, whose test accuracy is the lower
    _log(points["plain", 1], [0.9], [0.5], [0.9], [0.6])
    _log(points["mmd", 1], [0.7], [0.5], [0.7], [0.8])
    # seed 2: both prefer mmd
    _log(points["plain", 2], [0.6], [0.5], [0.5], [0.5])
    _log(points["mmd", 2], [0.8], [0.5], [0.6], [0.7])
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", points.values())}
    src = rows["source-val-acc"]
    assert src["method_picked"] == "plain (1), mmd (1)"
    assert (src["method_target_acc"], src["method_oracle_acc"]) == pytest.approx((0.65, 0.65))
    assert src["method_loss_points"] == pytest.approx(0.0)


def test_a_grid_of_one_method_has_no_method_figures(tmp_path):
    """Without a second method there is no run to choose between: the method columns showed each
    run's own pick, as if the criterion had chosen it among methods."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2]}}
    first, second = load_grid(spec).points
    _log(first, [0.9, 0.8], [0.1, 0.2], [0.5, 0.6], [0.55, 0.65])
    _log(second, [0.6, 0.7], [0.3, 0.2], [0.8, 0.7], [0.8, 0.7])
    rows = write_validators(tmp_path / "out", [first, second])
    assert rows and all(math.isnan(r["method_target_acc"]) and math.isnan(r["method_oracle_acc"])
                        and r["method_picked"] == "" for r in rows)
    assert rows[0]["checkpoint_target_acc"] == pytest.approx((0.55 + 0.7) / 2)


def test_a_validator_the_log_holds_as_null_is_no_score(tmp_path):
    """The run log takes a validator's score as null (jq writes NaN so): the table's Spearman over
    the scored checkpoints ended the grid in a TypeError after its whole study had trained."""
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd"}}}}
    points = {p.values["method"]: p for p in load_grid(spec).points}
    _log(points["plain"], [0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    _log(points["mmd"], [0.6, 0.7, 0.65], [0.35, 0.2, 0.1], [0.8, 0.7, 0.6], [0.8, 0.7, 0.6])
    log = points["plain"].run_dir / "metrics.jsonl"
    log.write_text(log.read_text().replace('"im": 0.1', '"im": null', 1))
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", points.values())}
    assert rows["im"]["checkpoints"] == 5 and rows["source-val-acc"]["checkpoints"] == 6


def test_finished_runs_left_out_are_named_with_why(tmp_path, capsys):
    """A finished run whose metrics.jsonl was lost counted as none without a word: the table stood
    for fewer runs than the grid's."""
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1, 2, 3]}}
    kept, lost, unscored = load_grid(spec).points
    for p in (kept, lost, unscored):
        _log(p, [0.9, 0.8], [0.1, 0.2], [0.5, 0.6], [0.55, 0.65])
    lost.run.log_path.unlink()
    unscored.run.log_path.write_text(json.dumps({"kind": "epoch", "epoch": 0, "step": 1}) + "\n")
    rows = write_validators(tmp_path / "out", [kept, lost, unscored])
    assert rows[0]["runs"] == 1
    md = (tmp_path / "out" / "validators.md").read_text()
    assert (f"Left out, finished but not compared: {lost.name} (no metrics.jsonl); "
            f"{unscored.name} (no evaluation scored every validator).") in md
    # An unlabelled target: scored, but nothing to check the scores against. With no run left to
    # compare, the old tables go, and the reasons are said.
    unlabelled = [json.loads(line) for line in kept.run.log_path.read_text().splitlines()]
    for record in unlabelled:
        record["target"] = {"val": {"merger_fraction": 0.4}}
    kept.run.log_path.write_text("".join(json.dumps(r) + "\n" for r in unlabelled))
    capsys.readouterr()
    assert write_validators(tmp_path / "out", [kept, lost, unscored]) == []
    assert not (tmp_path / "out" / "validators.md").exists()
    said = capsys.readouterr().out
    assert f"no finished run has scored checkpoints to compare ({kept.name} (an unlabelled target); " in said, said


def test_runs_chosen_with_target_labels_are_left_out_and_early_stopping_is_said(tmp_path):
    """A source -> target run selected (and stopped early) by target validation accuracy counted
    among the label-free runs, under "target labels were used for this table only, never to ...
    choose". And nothing said that a run's own criterion cut short the checkpoints compared."""
    spec = {"out": str(tmp_path / "out"), "executor": "local", "grid": {"seed": [1]},
            "methods": {"plain": {"base": str(TINY), "overrides": {"train.early_stopping": 3}},
                        "peeks": {"base": str(TINY), "overrides": {"select.criterion": "oracle-target-acc"}}}}
    points = {p.values["method"]: p for p in load_grid(spec).points}
    _log(points["plain"], [0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    _log(points["peeks"], [0.6, 0.7, 0.65], [0.35, 0.2, 0.1], [0.8, 0.7, 0.6], [0.8, 0.7, 0.6])
    rows = {r["criterion"]: r for r in write_validators(tmp_path / "out", points.values())}
    assert rows["im"]["runs"] == 1 and rows["im"]["checkpoints"] == 3
    md = (tmp_path / "out" / "validators.md").read_text()
    assert (f"Left out, finished but not compared: {points['peeks'].name} (chosen with target labels: "
            f"select.criterion oracle-target-acc).") in md
    assert "Runs may stop early (train.early_stopping) by their own select.criterion (source-val-acc): a " \
           "criterion is compared over the checkpoints trained before such a stop" in md
