"""Evaluation (dmhpc/train/evaluate.py) with known answers: each domain normalized with its own
statistics, the whole split evaluated under two ranks, and the trainer's validation equal to
`dmhpc eval` of the same checkpoint."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dmhpc.cli import main
from dmhpc.config import load_config
from dmhpc.data.shards import load_manifest, split_rows, write_dataset
from dmhpc.distributed import DistInfo
from dmhpc.errors import DmhpcError
from dmhpc.train.evaluate import evaluate_run, format_table, predict
from dmhpc.run import RunDir
from tests.conftest import BIN, ROOT, TINY, clean_env

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)


class CentredIsMerger(nn.Module):
    """Says "merger" exactly when the normalized image averages near zero: right only if each domain
    is normalized with its own statistics."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        logits = torch.stack([m.abs() - 0.5, 0.5 - m.abs()], dim=1)
        return m[:, None], logits


def constant_domains(root):
    """Source pixels 10 (+-0.1), target pixels -10 (+-0.1), every image a merger."""
    rng = np.random.default_rng(0)
    dirs = {}
    for name, level in (("source", 10.0), ("target", -10.0)):
        images = (level + rng.uniform(-0.1, 0.1, (40, 3, 8, 8))).astype(np.float32)
        write_dataset(images, np.ones(40, int), None, root / name, shard_size=16)
        dirs[name] = root / name
    return dirs


def test_each_domain_is_evaluated_with_its_own_statistics(tmp_path):
    """Source and target statistics swapped in evaluation used to pass every test."""
    dirs = constant_domains(tmp_path)
    stats = {d: (load_manifest(dirs[d])["stats"]["mean"], load_manifest(dirs[d])["stats"]["std"]) for d in dirs}
    cfg = load_config(TINY, [f"data.source={dirs['source']}", f"data.target={dirs['target']}"])
    run = RunDir(tmp_path / "run")
    result = evaluate_run(CentredIsMerger(), cfg, CPU, run, checkpoint={"name": "best"}, split="test", stats=stats,
                          plots=False)
    assert result["source"]["accuracy"] == result["target"]["accuracy"] == 1.0
    assert result["source"]["n"] == result["target"]["n"] == 8  # the whole test split of each
    swapped = {"source": stats["target"], "target": stats["source"]}
    wrong = evaluate_run(CentredIsMerger(), cfg, CPU, run, checkpoint={"name": "best"}, split="test", stats=swapped,
                         plots=False)
    assert wrong["source"]["accuracy"] == wrong["target"]["accuracy"] == 0.0


def test_the_last_checkpoint_of_an_oracle_stopped_run_is_marked_oracle(tmp_path):
    """last.pt records no selection: its results were unmarked, though early stopping by the
    target-label oracle chose where the run (and so last.pt) ended."""
    dirs = constant_domains(tmp_path)
    stats = {d: (load_manifest(dirs[d])["stats"]["mean"], load_manifest(dirs[d])["stats"]["std"]) for d in dirs}
    common = [f"data.source={dirs['source']}", f"data.target={dirs['target']}", "select.criterion=oracle-target-acc"]
    for stopping, oracle in ((3, True), (0, False)):
        cfg = load_config(TINY, [*common, f"train.early_stopping={stopping}"])
        result = evaluate_run(CentredIsMerger(), cfg, CPU, RunDir(tmp_path / f"run{stopping}"),
                              checkpoint={"name": "last", "step": 9}, split="test", stats=stats, plots=False)
        assert result["oracle"] is oracle
    best = evaluate_run(CentredIsMerger(), cfg, CPU, RunDir(tmp_path / "run"), split="test", stats=stats, plots=False,
                        checkpoint={"name": "best", "step": 9, "criterion": "oracle-target-acc"})
    assert best["oracle"] is True and best["trained_on_target"] is False
    # A target oracle (trained on the target's own labels), selected by its own validation accuracy:
    # its result file, read alone, said nothing of either.
    cfg = load_config(TINY, [f"data.source={dirs['target']}", f"data.target={dirs['target']}"])
    on_target = evaluate_run(CentredIsMerger(), cfg, CPU, RunDir(tmp_path / "on-target"), split="test", stats=stats,
                             plots=False, checkpoint={"name": "best", "step": 9, "criterion": "source-val-acc"})
    assert (on_target["oracle"], on_target["trained_on_target"]) == (False, True)
    assert format_table({"r": on_target}).splitlines()[-1].startswith("| r (oracle) |")


class OverflowsOnBright(CentredIsMerger):
    """Logits of inf - inf (NaN probabilities) for images brighter than 5 once normalized: an
    overflowing pixel for those rows."""

    def forward(self, x):
        f, logits = super().forward(x)
        bright = (f[:, 0] > 5)[:, None]
        return f, torch.where(bright, torch.full_like(logits, float("inf")), logits)


def test_non_finite_probabilities_in_an_evaluation_are_one_line(tmp_path):
    """A NaN probability reached scikit-learn: 'ValueError: Input contains NaN', a traceback."""
    dirs = constant_domains(tmp_path)
    wrong = (0.0, 0.01)  # source pixels of 10 normalized to 1000: every image 'bright'
    with pytest.raises(DmhpcError, match=rf"{dirs['source']}: test split: non-finite class probabilities for 8 "
                                         rf"image\(s\), the first at row \d+: a pixel too large"):
        predict(OverflowsOnBright(), dirs["source"], "test", batch_size=4, dist=CPU, mean=[wrong[0]] * 3,
                std=[wrong[1]] * 3)


PROBE = """
import json, sys, torch
from dmhpc.distributed import bootstrap, shutdown
from dmhpc.train.evaluate import predict
from tests.test_evaluate import CentredIsMerger
dist = bootstrap()
outs = [predict(CentredIsMerger(), sys.argv[1], "train", batch_size=7, dist=dist, mean=[10.0] * 3, std=[1.0] * 3,
                feature_rows=rows) for rows in (5, 10**9)]
if dist.rank == 1:  # every rank holds the whole split
    json.dump([{k: v.tolist() for k, v in out.items()} for out in outs], open(sys.argv[2], "w"))
shutdown()
"""


def test_two_ranks_evaluate_the_whole_split_in_order(tmp_path):
    """Skipping the all-gather under two ranks used to pass every test. The features come for the
    rows asked for only, the same ones at any number of ranks: every row's were gathered onto every
    rank for a figure of a thousand points (gigabytes per rank from a million test images on).
    Every row of a split smaller than the rows asked for (LATENT_POINTS, DEV_MAX_ROWS), the rows
    where one rank's part ends among them, once: 5 rows, none at that boundary, let a rank that also
    claimed the next rank's first row pass (positions one longer than the features, the latent
    figure's labels shifted, DEV a shape error)."""
    dirs = constant_domains(tmp_path)
    one = predict(CentredIsMerger(), dirs["source"], "train", batch_size=7, dist=CPU, mean=[10.0] * 3, std=[1.0] * 3,
                  feature_rows=5)
    every = predict(CentredIsMerger(), dirs["source"], "train", batch_size=7, dist=CPU, mean=[10.0] * 3,
                    std=[1.0] * 3, feature_rows=10**9)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(dirs["source"]), str(tmp_path / "two.json")], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, two_every = json.loads((tmp_path / "two.json").read_text())
    start, stop = split_rows(load_manifest(dirs["source"]), "train")
    np.testing.assert_array_equal(two_every["feature_positions"], np.arange(stop - start))
    np.testing.assert_array_equal(np.asarray(two_every["features"]), every["features"])
    assert len(two["index"]) == stop - start == len(one["index"])
    for key in ("index", "labels", "prob", "features", "feature_positions"):
        np.testing.assert_array_equal(np.asarray(two[key]), one[key])
    positions = one["feature_positions"]
    assert len(positions) == 5 == len(set(positions)) and list(positions) == sorted(positions)
    assert positions.max() > 7  # (drawn from both ranks' rows)
    np.testing.assert_array_equal(every["feature_positions"], np.arange(stop - start))
    np.testing.assert_array_equal(one["features"], every["features"][positions])


ONE_RANK_FAILS = """
import sys
from dmhpc.data import shards
from dmhpc.distributed import bootstrap, shutdown
from dmhpc.errors import DmhpcError
from dmhpc.train.evaluate import predict
from tests.test_evaluate import CentredIsMerger
dist = bootstrap()
if dist.rank == 1:  # a shard only this rank reads fails (a disk error mid-run)
    def failing(self, start, stop):
        raise DmhpcError("shard-00002.h5: cannot read rows 0 to 6: [Errno 5] Input/output error")
    shards.RowReader.read = failing
try:
    predict(CentredIsMerger(), sys.argv[1], "train", batch_size=7, dist=dist, mean=[10.0] * 3, std=[1.0] * 3)
except DmhpcError as exc:  # a file per rank: two ranks' lines interleave on one pipe
    open(f"{sys.argv[2]}/rank{dist.rank}.txt", "w").write(str(exc))
shutdown()
"""


def test_a_read_that_fails_on_one_rank_is_every_ranks_one_line(tmp_path):
    """Rank 1's read error was its own line, while rank 0 waiting in the gather got a 38-line gloo
    traceback ("Connection reset by peer") in its place."""
    dirs = constant_domains(tmp_path)
    script = tmp_path / "fails.py"
    script.write_text(ONE_RANK_FAILS)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(dirs["source"]), str(tmp_path)], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert said == "shard-00002.h5: cannot read rows 0 to 6: [Errno 5] Input/output error", said


def test_the_trainers_validation_equals_dmhpc_eval_of_the_same_checkpoint(make_domains, tmp_path):
    """Both paths normalize each domain with its own statistics: a swap in either shows as a mismatch
    (the two domains' statistics differ)."""
    data = make_domains(64)
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}",
                 f"run.dir={run}", "train.epochs=1"]) == 0
    epoch = [r for r in RunDir(run).read_log() if r["kind"] == "epoch"][-1]
    assert main(["eval", "--run", str(run), "--checkpoint", "last", "--split", "val"]) == 0
    result = RunDir(run).read_result("last", "val")
    for domain in ("source", "target"):
        for metric in ("accuracy", "roc_auc", "brier", "mean_p_merger", "confusion"):
            assert result[domain][metric] == epoch[domain]["val"][metric], (domain, metric)
    assert load_manifest(data / "pristine")["stats"] != load_manifest(data / "noisy")["stats"]


def _trained(make_domains, tmp_path) -> tuple[Path, RunDir]:
    """A 64-image pair and a run of the tiny config trained one epoch on it."""
    data = make_domains(64)
    run = RunDir(tmp_path / "run")
    assert main(["train", "--config", str(TINY), f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}",
                 f"run.dir={run.path}", "train.epochs=1"]) == 0
    return data, run


def test_under_source_normalization_every_domain_takes_the_trained_sources_statistics(make_domains, tmp_path):
    """data.normalize: source with a --source given: both domains took that data set's statistics,
    and the same checkpoint on the same target scored otherwise with another --source beside it."""
    data = make_domains(64)
    run = RunDir(tmp_path / "run")
    assert main(["train", "--config", str(TINY), f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}",
                 f"run.dir={run.path}", "train.epochs=1", "data.normalize=source"]) == 0
    rng = np.random.default_rng(3)
    other = tmp_path / "other"
    write_dataset(rng.normal(5.0, 3.0, size=(64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None, other)
    trained = dict(zip(("mean", "std"), run.normalization("source")))
    results = []
    for extra in ([], ["--source", str(other)]):
        assert main(["eval", "--run", str(run.path), "--target", str(data / "noisy"), *extra]) == 0
        name = "noisy" if not extra else "other+noisy"
        results.append(run.read_result("best", "test", name))
    for result in results:
        assert result["normalization"] == {"source": trained, "target": trained}, result["normalization"]
    assert results[0]["target"] == results[1]["target"]


def test_dmhpc_eval_reads_the_configuration_under_the_runs_lock(make_domains, tmp_path, monkeypatch):
    """config.yaml was read before the ranks met and the lock was taken: a run replaced meanwhile
    (--overwrite, another data.normalize) had its checkpoint scored with the old run's normalization,
    and the result marked final."""
    from dmhpc.train import evaluate

    data, run = _trained(make_domains, tmp_path)
    meet = evaluate.bootstrap

    def replaced_while_the_ranks_meet():
        assert main(["train", "--config", str(TINY), f"data.source={data / 'pristine'}",
                     f"data.target={data / 'noisy'}", f"run.dir={run.path}", "train.epochs=1",
                     "data.normalize=source", "--resume", "none", "--overwrite"]) == 0
        return meet()

    monkeypatch.setattr(evaluate, "bootstrap", replaced_while_the_ranks_meet)
    assert main(["eval", "--run", str(run.path)]) == 0
    source = dict(zip(("mean", "std"), run.normalization("source")))
    result = run.read_result()
    assert result["normalization"] == {"source": source, "target": source} and result["final"] is True


def test_dmhpc_eval_refuses_to_write_a_final_result_of_another_best(make_domains, tmp_path, capsys):
    """A best.pt of another moment (a backup put back) scored as the run's final result, still marked
    final: the trainer refuses that best.pt; eval wrote over the result with its metrics."""
    import shutil

    data, run = make_domains(64), RunDir(tmp_path / "run")
    argv = ["train", "--config", str(TINY), f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}",
            f"run.dir={run.path}", "select.criterion=im"]
    assert main([*argv, "train.epochs=1"]) == 0
    old = tmp_path / "old_best.pt"
    shutil.copyfile(run.checkpoint("best"), old)
    assert main([*argv, "train.epochs=3"]) == 0
    final = run.result_path("best", "test").read_bytes()
    if json.loads(final)["checkpoint"]["epoch"] == 0:
        pytest.skip("epoch 0 stayed the selected one: the two best.pt are one")
    shutil.copyfile(old, run.checkpoint("best"))
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt: of epoch 0 (step 2), not the checkpoint the run's final test " \
                                     "measured (epoch " in err, err
    assert run.result_path("best", "test").read_bytes() == final


def test_dmhpc_eval_never_finishes_a_run_nor_replaces_another_data_sets_result(make_domains, tmp_path, capsys,
                                                                                   monkeypatch):
    """`dmhpc eval` with its defaults (best, test) wrote the file the trainer writes at its end,
    and an unfinished run then looked finished to every launcher. And two targets in folders of
    one name shared a result file: the second evaluation replaced the first."""
    import shutil

    data, run = _trained(make_domains, tmp_path)
    assert run.finished and run.read_result()["final"] is True
    killed = [run.path / "plots" / ".roc_best_test.png.k1ll3d_a.tmp",
              run.path / "eval" / ".best_test.json.k1ll3d_b.tmp"]
    for leftover in killed:  # what a killed evaluation left: it takes the run's lock, so it may remove them
        leftover.write_text("half")
    assert main(["eval", "--run", str(run.path)]) == 0  # the trainer's result again: the run stays finished
    assert not any(leftover.exists() for leftover in killed)
    assert run.finished
    run.result_path("best", "test").unlink()  # as if the trainer had not reached its test yet
    assert main(["eval", "--run", str(run.path)]) == 0
    assert run.read_result()["final"] is False and not run.finished

    other = tmp_path / "other" / "noisy"
    shutil.copytree(data / "noisy", other)
    assert main(["eval", "--run", str(run.path), "--target", str(data / "noisy")]) == 0
    first = run.result_path("best", "test", "noisy").read_bytes()
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path), "--target", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best_test_on-noisy.json: holds the evaluation on" in err, err
    assert run.result_path("best", "test", "noisy").read_bytes() == first
    (tmp_path / "noisy-copy").symlink_to(other)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", str(run.path), "--target", "noisy-copy"]) == 0
    assert run.read_result("best", "test", "noisy-copy")["data"]["target"] == str(tmp_path / "noisy-copy")
    monkeypatch.chdir(other.parent)  # the same data set named from another working folder: the same evaluation
    assert main(["eval", "--run", str(run.path), "--target", "../noisy-copy"]) == 0


def test_a_run_trained_on_relative_paths_says_so_where_eval_and_explain_cannot_find_its_data(
        make_domains, tmp_path, capsys, monkeypatch):
    """config.yaml keeps the data paths as given: from another directory the error named neither
    the key nor that the path is relative, just "pristine/manifest.json: missing"."""
    data = make_domains(64)
    run = tmp_path / "run"
    monkeypatch.chdir(data)
    assert main(["train", "--config", str(TINY), "data.source=pristine", "data.target=noisy", f"run.dir={run}",
                 "train.epochs=1"]) == 0
    monkeypatch.chdir(tmp_path)
    said = (f"data.source of {run / 'config.yaml'}: pristine/manifest.json: missing; pristine is not a finished "
            f"dmhpc data set (a relative path: read from the current directory {tmp_path}; "
            f"run this from the directory the run was trained in)\n")
    for argv in (["eval", "--run", str(run)], ["explain", "--run", str(run), "--n", "1", "--out", str(tmp_path / "x")]):
        capsys.readouterr()
        assert main(argv) == 1
        assert capsys.readouterr().err == f"dmhpc {argv[0]}: error: {said}"
    monkeypatch.chdir(data)
    assert main(["eval", "--run", str(run)]) == 0
    # An evaluation on another target repeated from elsewhere: the run's source is what is not found
    # (it was refused as "data sets of the same folder names", the source read from here).
    assert main(["eval", "--run", str(run), "--target", str(data / "noisy")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--target", str(data / "noisy")]) == 1
    assert capsys.readouterr().err == f"dmhpc eval: error: {said}"
    monkeypatch.chdir(data)
    # Found here but damaged: the key, without the hint about the current directory.
    (data / "pristine" / "manifest.json").write_text('{"format": ')
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dmhpc eval: error: data.source of {run / 'config.yaml'}: pristine/manifest.json: ") and \
        "current directory" not in err and err.count("\n") == 1, err


def test_dmhpc_eval_refuses_data_the_run_cannot_take_and_draws_what_the_data_allow(make_domains, tmp_path, capsys):
    """Images of another shape failed deep in the network with a traceback; two unlabelled data sets
    failed drawing an empty confusion figure after writing the result; the run's own data prepared
    again since it trained were evaluated as if they were the run's; and the training curves took
    the title of whichever evaluation ran last."""
    data, run = _trained(make_domains, tmp_path)
    rng = np.random.default_rng(1)
    write_dataset(rng.normal(size=(64, 1, 75, 75)).astype(np.float32), np.arange(64) % 2, None, tmp_path / "mono")
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path), "--target", str(tmp_path / "mono")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mono: images of shape (1, 75, 75); the run trained on (3, 75, 75)" in err, err
    assert not run.result_path("best", "test", "mono").exists()

    curves = run.plot_path("training_curves").read_bytes()
    survey = tmp_path / "survey"
    write_dataset(rng.normal(size=(64, 3, 75, 75)).astype(np.float32), None, None, survey)
    assert main(["eval", "--run", str(run.path), "--source", str(survey), "--target", str(survey)]) == 0
    result = run.read_result("best", "test", "survey+survey")
    assert result["source"]["labelled"] is False and result["target"]["labelled"] is False
    # Normalized as a domain of its own, not with the run's target statistics (predict's default): said in the result.
    stats = load_manifest(survey)["stats"]
    assert result["normalization"]["target"] == {"mean": stats["mean"], "std": stats["std"]}, result["normalization"]
    assert result["normalization"]["target"]["mean"] != RunDir(run.path).normalization("target")[0]
    tag = "best_test_on-survey+survey"
    assert run.plot_path(f"latent_{tag}").is_file()
    assert not run.plot_path(f"roc_{tag}").exists() and not run.plot_path(f"confusion_{tag}").exists()
    assert run.plot_path("training_curves").read_bytes() == curves  # the run's figure, not this evaluation's

    # The checkpoint is named by the epoch of its weights, as metrics.jsonl numbers it, best and last alike.
    assert main(["eval", "--run", str(run.path), "--checkpoint", "last", "--split", "val"]) == 0
    logged = [r["epoch"] for r in run.read_log() if r["kind"] == "epoch"]
    assert run.read_result("last", "val")["checkpoint"]["epoch"] == run.read_result()["checkpoint"]["epoch"] == logged[-1]

    # A run of older dmhpc, whose run.json records neither shapes nor fingerprints, is still evaluated.
    record = json.loads(run.record_path.read_text())
    run.record_path.write_text(json.dumps({**record, "data": {d: {"path": v["path"]} for d, v in record["data"].items()}}))
    assert main(["eval", "--run", str(run.path), "--split", "val"]) == 0
    run.record_path.write_text(json.dumps(record))

    write_dataset(rng.normal(size=(64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None, data / "noisy",
                  overwrite=True)
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.target {data / 'noisy'}: prepared again since the run trained" in err, err
    assert run.read_result()["final"] is True  # the trainer's result stands
    assert main(["eval", "--run", str(run.path), "--target", str(data / "noisy")]) == 0
    # The run's own source beside a --target is the run's too: prepared again, its test split may hold
    # rows the model trained on (its metrics were written as the run's source's).
    capsys.readouterr()
    write_dataset(rng.normal(size=(64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None, data / "pristine",
                  overwrite=True)
    assert main(["eval", "--run", str(run.path), "--target", str(data / "noisy")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"data.source {data / 'pristine'}: prepared again since the run trained on it"
                                     in err and "with --source beside the --target" in err), err
    assert main(["eval", "--run", str(run.path), "--source", str(data / "pristine"), "--target",
                 str(data / "noisy")]) == 0


SLOW_EVAL = """
import sys, time
from pathlib import Path
import dmhpc.train.evaluate as E
orig = E.evaluate_run
def slow(*a, **k):  # holds the evaluation open until the test has tried the run beside it
    Path(sys.argv[1]).write_text("evaluating")
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
    return orig(*a, **k)
E.evaluate_run = slow
from dmhpc.cli import main
sys.exit(main(sys.argv[3:]))
"""

HOLD_LIKE_A_TRAINER = """
import sys, time
from pathlib import Path
from dmhpc.run import RunDir
run = RunDir(sys.argv[1])
run.claim(run.config(), "auto")
Path(sys.argv[2]).write_text("claimed")
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def _wait_for(path, proc):
    import time

    for _ in range(1200):
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never came")


def test_dmhpc_eval_holds_the_run_directory_against_the_trainer_and_other_evaluations(make_domains, tmp_path, capsys,
                                                                                      monkeypatch):
    """Without the run's lock two evaluations on one run both wrote (one result lost, plots mixed),
    an evaluation beside the trainer replaced the trainer's final best_test.json with a stale one,
    and a trainer starting up removed a running evaluation's temporary files. A trainer waits for an
    evaluation, though: a requeued job that met one failed, and the training ended there."""
    import threading

    import pytest

    import dmhpc.run
    from dmhpc.errors import DmhpcError

    data, run = _trained(make_domains, tmp_path)
    final = run.result_path("best", "test").read_bytes()

    # An evaluation running: a trainer and a second evaluation are refused, in one line each.
    script, started, go = tmp_path / "slow.py", tmp_path / "started", tmp_path / "go"
    script.write_text(SLOW_EVAL)
    proc = subprocess.Popen([str(BIN / "python"), str(script), str(started), str(go), "eval", "--run", str(run.path),
                             "--target", str(data / "noisy")], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started, proc)
        monkeypatch.setattr(dmhpc.run, "LOCK_PATIENCE_S", 2.0)
        with pytest.raises(DmhpcError, match=r"in use by another dmhpc trainer or eval \(dmhpc eval: pid"):
            RunDir(run.path).claim(run.config(), "auto")
        capsys.readouterr()
        assert main(["eval", "--run", str(run.path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by another dmhpc trainer or eval (dmhpc eval: pid" in err, err
        monkeypatch.setattr(dmhpc.run, "LOCK_PATIENCE_S", 240.0)
        waiting, claimed = RunDir(run.path), []
        trainer = threading.Thread(target=lambda: claimed.append(waiting.claim(run.config(), "auto")))
        trainer.start()
        time.sleep(2.0)
        assert trainer.is_alive() and not claimed and proc.poll() is None  # waiting for the evaluation
    finally:
        go.write_text("go")
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    trainer.join(timeout=60)
    assert claimed and "waiting up to 240 s for dmhpc eval: pid" in capsys.readouterr().out
    waiting.release()
    assert run.read_result("best", "test", "noisy")["data"]["target"] == str(data / "noisy")
    assert run.result_path("best", "test").read_bytes() == final

    # A trainer holding the run: the evaluation is refused and leaves its results alone.
    script, claimed, done = tmp_path / "hold.py", tmp_path / "claimed", tmp_path / "done"
    script.write_text(HOLD_LIKE_A_TRAINER)
    proc = subprocess.Popen([str(BIN / "python"), str(script), str(run.path), str(claimed), str(done)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(claimed, proc)
        capsys.readouterr()
        assert main(["eval", "--run", str(run.path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run.dir {run.path}: in use by another dmhpc trainer or eval" in err, err
    finally:
        done.write_text("done")
        proc.communicate(timeout=300)
    assert run.result_path("best", "test").read_bytes() == final and run.finished
    assert main(["eval", "--run", str(run.path)]) == 0  # the lock went with its holder


def test_dmhpc_eval_checks_the_shards_as_the_trainer_does(make_domains, tmp_path, capsys):
    """eval read the shards unchecked: a corrupted shard gave a new result from damaged pixels."""
    import shutil

    import h5py

    from dmhpc.data.shards import shard_name

    data, run = _trained(make_domains, tmp_path)
    assert run.config().data.verify == "checksums"
    other = tmp_path / "other"
    shutil.copytree(data / "noisy", other)
    for directory in (data / "noisy", other):
        with h5py.File(directory / shard_name(0), "r+") as f:  # valid HDF5, valid structure, other pixels
            f["images"][:5] = -f["images"][:5]
    final = run.result_path("best", "test").read_bytes()
    plots = {p: p.read_bytes() for p in run.plot_files()}
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.target {data / 'noisy'}: 1 problem: shard-00000.h5 checksum mismatch" in err, err
    assert main(["eval", "--run", str(run.path), "--target", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--target {other}: 1 problem: shard-00000.h5 checksum mismatch" in err, err
    assert run.result_path("best", "test").read_bytes() == final and not run.result_path("best", "test", "other").exists()
    assert {p: p.read_bytes() for p in run.plot_files()} == plots


def test_a_data_set_prepared_again_while_eval_checks_it_is_refused(make_domains, tmp_path, capsys, monkeypatch):
    """The data sets were checked (checksums: the slowest step), then read by manifests loaded anew:
    a target prepared again in between was evaluated as the run's own, and its numbers replaced the
    trainer's final best_test.json."""
    from dmhpc.data.shards import write_dataset
    from dmhpc.train import evaluate

    data, run = _trained(make_domains, tmp_path)
    final = run.result_path("best", "test").read_bytes()
    check = evaluate.check_dataset

    def prepared_again_after_its_check(what, directory, *args, **kwargs):
        check(what, directory, *args, **kwargs)
        if Path(directory) == data / "noisy":
            rng = np.random.default_rng(7)
            write_dataset(rng.normal(size=(80, 3, 75, 75)).astype(np.float32), np.arange(80) % 2, None, directory,
                          overwrite=True)

    monkeypatch.setattr(evaluate, "check_dataset", prepared_again_after_its_check)
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 1
    err = capsys.readouterr().err
    assert err == (f"dmhpc eval: error: {data / 'noisy'}: prepared again since this run started (its manifest "
                   f"changed): its splits are no longer those the run trained with; put the data set the run "
                   f"started with back, or prepare the new one into another folder\n")
    assert run.result_path("best", "test").read_bytes() == final


def test_dmhpc_eval_refuses_an_empty_split_before_writing(make_domains, tmp_path, capsys):
    """A data set prepared without a test share failed with a ValueError traceback after writing."""
    data, run = _trained(make_domains, tmp_path)
    rng = np.random.default_rng(2)
    labels = np.arange(64) % 2
    images = rng.normal(0.0, 0.3, (64, 3, 75, 75)).astype(np.float32) + labels[:, None, None, None]
    write_dataset(images, labels, None, tmp_path / "notest", shard_size=64, seed=0, fractions=(0.8, 0.2, 0.0))
    plots = {p: p.read_bytes() for p in run.plot_files()}
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path), "--target", str(tmp_path / "notest")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--target {tmp_path / 'notest'}: the test split is empty" in err, err
    assert not run.result_path("best", "test", "notest").exists()
    assert {p: p.read_bytes() for p in run.plot_files()} == plots
    assert main(["eval", "--run", str(run.path), "--target", str(tmp_path / "notest"), "--split", "val"]) == 0


def test_dmhpc_eval_refuses_more_classes_than_the_model_has(make_domains, tmp_path, capsys):
    """A 3-class data set failed in sklearn with a traceback; the trainer refuses it in one line."""
    data, run = _trained(make_domains, tmp_path)
    rng = np.random.default_rng(3)
    labels = np.arange(64) % 3
    images = rng.normal(0.0, 0.3, (64, 3, 75, 75)).astype(np.float32) + labels[:, None, None, None]
    write_dataset(images, labels, None, tmp_path / "three", shard_size=64, seed=0, num_classes=3)
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path), "--target", str(tmp_path / "three")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--target {tmp_path / 'three'}: 3 classes; the models here tell 2 apart" in err, err
    assert not run.result_path("best", "test", "three").exists()
    assert not any("three" in p.name for p in run.plot_files())


def test_dmhpc_eval_refuses_a_config_yaml_edited_away_from_the_checkpoint(make_domains, tmp_path, capsys):
    """config.yaml edited by hand (data.normalize per-domain -> source) was trusted: eval rewrote the
    final best_test.json with numbers of another normalization than the model was trained with."""
    data, run = _trained(make_domains, tmp_path)
    result = run.result_path("best", "test").read_bytes()
    text = run.config_path.read_text()
    assert "normalize: per-domain" in text
    run.config_path.write_text(text.replace("normalize: per-domain", "normalize: source"))
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"{run.config_path}: differs from what {run.checkpoint('best')} was trained "
                                     f'with: data.normalize "source", trained with "per-domain" (edited by hand? '
                                     f"restore it)") in err, err
    assert run.result_path("best", "test").read_bytes() == result
    run.config_path.write_text(text.replace("log_every: ", "log_every: 1 #"))  # cadence: may differ
    assert main(["eval", "--run", str(run.path)]) == 0


def test_a_failed_dmhpc_eval_leaves_the_previous_results_as_they_were(make_domains, tmp_path, capsys, monkeypatch):
    """The result file was written first: a damaged metrics.jsonl, or a figure that could not be
    drawn, failed after it, and left a new result beside old (or missing) figures."""
    from dmhpc import plots
    from dmhpc.errors import DmhpcError
    from dmhpc.files import is_temporary

    data, run = _trained(make_domains, tmp_path)

    def state():
        files = sorted(p for d in ("eval", "plots") for p in (run.path / d).iterdir())
        return {p.name: p.read_bytes() for p in files}

    before = state()
    log = run.log_path.read_text()
    lines = log.splitlines(keepends=True)
    run.log_path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path), "--checkpoint", "last", "--split", "val"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run.log_path}: line 2 is not a JSON record" in err, err
    assert state() == before  # no last_val.json, no figure of it, nothing temporary left
    run.log_path.write_text(log)

    def fails(*args, **kwargs):
        raise DmhpcError("latent: cannot be drawn")

    monkeypatch.setattr(plots, "latent_embedding", fails)  # the last figure, after the others are drawn
    assert main(["eval", "--run", str(run.path), "--checkpoint", "last", "--split", "val"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert state() == before and not any(is_temporary(name) for name in state())
    monkeypatch.undo()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # A disk full at the result file (said at fsync on many network file systems) came after the
    # figures were in place.
    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["eval", "--run", str(run.path), "--checkpoint", "last", "--split", "val"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert state() == before and not any(is_temporary(name) for name in state())
    from dmhpc.train import evaluate

    synced = []  # the renames made durable: without it a crash could lose the new result's rename
    monkeypatch.setattr(evaluate, "fsync_directory", lambda folder: synced.append(Path(folder)))
    assert main(["eval", "--run", str(run.path), "--checkpoint", "last", "--split", "val"]) == 0
    after = state()
    assert "last_val.json" in after and "roc_last_val.png" in after and "latent_last_val.png" in after
    assert not any(is_temporary(name) for name in after)
    assert sorted(synced) == sorted([run.path / "eval", run.path / "plots"])


def test_the_results_table_puts_each_number_in_its_column():
    """The table `dmhpc train` and `dmhpc eval` print was only checked for its header: the domains'
    cells swapped, another metric under "AUC", the oracle mark dropped, or an unlabelled domain's
    mean merger probability shown as its predicted merger fraction all passed."""

    labelled = {"source": {"accuracy": 0.9001, "roc_auc": 0.8001, "f1": 0.1001},
                "target": {"accuracy": 0.7001, "roc_auc": 0.6001, "f1": 0.2001}}
    unlabelled = {"source": labelled["source"],
                  "target": {"labelled": False, "merger_fraction": 0.3001, "mean_p_merger": 0.4001}}
    table = format_table({"a": labelled, "b": {**labelled, "oracle": True}, "c": unlabelled})
    assert table.splitlines() == [
        "| run | source acc | source AUC | target acc | target AUC |",
        "|---|---|---|---|---|",
        "| a | 0.900 | 0.800 | 0.700 | 0.600 |",
        "| b (oracle) | 0.900 | 0.800 | 0.700 | 0.600 |",
        "| c | 0.900 | 0.800 | unlabelled: 0.300 predicted mergers | - |",
    ]


class PixelIsFeature(nn.Module):
    """Its feature is the image's first pixel, which the test data set sets to the image's input
    position: a feature says which row it came from."""

    def forward(self, x):
        f = x.flatten(1)[:, :1]
        return f, torch.cat([f, -f], dim=1) * 0.0


def test_the_features_of_a_split_are_of_the_rows_their_positions_name(tmp_path):
    """The drawn rows were checked on the train split only, which starts at row 0: positions that
    were rows of the data set, not of the split (or rows of the data set's start taken as the
    split's), coloured the latent figure by other images' labels and weighted DEV by other rows'
    losses, with no error."""
    n = 48
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1).repeat(2, axis=2).repeat(2, axis=3)
    write_dataset(images, np.arange(n) % 2, None, tmp_path / "rows", shard_size=16, seed=0,
                  fractions=(0.5, 0.25, 0.25))
    manifest = load_manifest(tmp_path / "rows")
    for split in ("val", "test"):
        start, stop = split_rows(manifest, split)
        assert start > 0
        for rows in (5, 10**9):
            out = predict(PixelIsFeature(), tmp_path / "rows", split, batch_size=3, dist=CPU, mean=[0.0], std=[1.0],
                          feature_rows=rows)
            positions = out["feature_positions"]
            assert len(positions) == min(rows, stop - start) == len(out["features"])
            assert ((0 <= positions) & (positions < stop - start)).all() and list(positions) == sorted(positions)
            np.testing.assert_array_equal(out["features"][:, 0], out["index"][positions].astype(np.float32))


class CentredIsMergerWithChannels(CentredIsMerger):
    """CentredIsMerger whose features are the channels' means: a latent figure needs two or more."""

    def forward(self, x):
        return x.mean(dim=(2, 3)), super().forward(x)[1]


def test_a_roc_curve_and_a_confusion_matrix_are_drawn_when_one_domain_has_labels(tmp_path):
    """A labelled source beside an unlabelled survey as the target: the source's ROC curve and
    confusion matrix are drawn (they were checked only with both domains labelled, or neither)."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    write_dataset((labels[:, None, None, None] * 0.2 + rng.uniform(-0.1, 0.1, (40, 3, 8, 8))).astype(np.float32),
                  labels, None, tmp_path / "source", shard_size=16)
    write_dataset(rng.uniform(-0.1, 0.1, (40, 3, 8, 8)).astype(np.float32), None, None, tmp_path / "survey",
                  shard_size=16)
    dirs = {"source": tmp_path / "source", "target": tmp_path / "survey"}
    stats = {d: (load_manifest(dirs[d])["stats"]["mean"], load_manifest(dirs[d])["stats"]["std"]) for d in dirs}
    cfg = load_config(TINY, [f"data.source={dirs['source']}", f"data.target={dirs['target']}"])
    run = RunDir(tmp_path / "run")
    result = evaluate_run(CentredIsMergerWithChannels(), cfg, CPU, run, checkpoint={"name": "best"}, split="test", stats=stats,
                          data=dirs, data_name="survey")
    assert "confusion" in result["source"] and result["target"]["labelled"] is False
    assert {p.name for p in run.plot_files()} == {"roc_best_test_on-survey.png", "confusion_best_test_on-survey.png",
                                                  "latent_best_test_on-survey.png"}

