"""The run directory (dmhpc/run.py) and atomic writes (dmhpc/files.py): who may use a directory,
what may change on resume, the lock, the log, results per evaluation. Real files, real processes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from dmhpc.config import Config, config_to_dict, load_config, save_config
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_path, atomic_write, hold_lock, is_temporary, remove_orphans
from dmhpc.run import RunDir, evaluation_tag
from dmhpc.train.checkpoint import load_checkpoint, save_checkpoint


def cfg_for(run_dir, **train) -> Config:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.dir={run_dir}"])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train)) if train else cfg


def started(tmp_path, name="run", checkpoint=True, **train) -> tuple[RunDir, Config]:
    """A run directory as a trainer leaves it: config.yaml, run.json, a log, maybe last.pt."""
    run = RunDir(tmp_path / name)
    cfg = cfg_for(run.path, **train)
    claim = run.claim(cfg, "auto")
    run.start(cfg, claim, {"source": {"path": "s", "fingerprint": "aa"}, "target": {"path": "t", "fingerprint": "bb"}}, 0)
    run.release()
    if checkpoint:
        save_checkpoint(run.checkpoint("last"), {"step": 3})
    return run, cfg


# --- atomic writes --------------------------------------------------------------------------------

def test_atomic_write_leaves_the_old_file_on_any_failure(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, writer=broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable like any file, not 0600


def test_an_error_inside_an_atomic_write_that_is_not_the_writes_passes_unchanged(tmp_path):
    """A DmhpcError raised in the block (an input it read), or an error raised `from None` while
    handling an OSError, was said as the target's write error ("out.h5: cannot write: No such file
    or directory; nothing written"), from the OSError it disowned."""
    path = tmp_path / "out.h5"
    with pytest.raises(DmhpcError, match=r"^in.fits: no such cutout file$"), atomic_path(path):
        try:
            open(tmp_path / "in.fits", "rb")
        except FileNotFoundError:
            raise DmhpcError("in.fits: no such cutout file") from None
    with pytest.raises(ValueError, match=r"^not a table$"), atomic_path(path):
        try:
            open(tmp_path / "in.fits", "rb")
        except FileNotFoundError:
            raise ValueError("not a table") from None
    assert os.listdir(tmp_path) == []  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_orphans_of_killed_writes_are_recognised_and_removed(tmp_path):
    (tmp_path / ".last.pt.k2j4_9ab.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "notes.tmp").write_text("not ours")
    (tmp_path / "last.pt").write_text("keep")
    assert is_temporary(".last.pt.k2j4_9ab.tmp") and not is_temporary("notes.tmp")
    assert remove_orphans(tmp_path) == (1, 1000)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "notes.tmp"]


def test_a_full_disk_is_one_line(small_disk):
    disk = small_disk(1)
    with pytest.raises(DmhpcError) as info:
        atomic_write(disk / "big.bin", b"x" * (2 << 20))
    assert str(info.value) == (f"{disk / 'big.bin'}: cannot write: No space left on device (disk full or over "
                               f"quota); nothing written")
    assert os.listdir(disk) == []


def test_a_lock_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    """The holder line did not fit: a raw OSError, and the empty lock file and its new folders stayed."""
    disk = small_disk(1)
    with open(disk / "filler", "wb") as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"x" * 65536)
            f.flush()
    lock = disk / "runs" / "a" / ".lock"
    with pytest.raises(DmhpcError) as info:
        hold_lock(lock, "in use ({holder})", "trainer")
    assert str(info.value) == f"{lock}: cannot write: No space left on device (disk full or over quota); nothing written"
    assert os.listdir(disk) == ["filler"]


def test_a_lock_file_replaced_at_every_attempt_is_one_line(tmp_path, monkeypatch):
    """Each attempt found its lock file replaced (a holder releasing in between): after the last one
    the closed file was used, a ValueError traceback."""
    from dmhpc import files

    lock = tmp_path / ".lock"
    real = files.os.stat

    def replaced(path, *args, **kwargs):
        if str(path) == str(lock):
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "stat", replaced)
    with pytest.raises(DmhpcError, match=rf"^{lock}: cannot take the lock: its file keeps being replaced$"):
        hold_lock(lock, "in use ({holder})", "trainer")


# --- who owns a directory -------------------------------------------------------------------------

def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "analysis"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("learning_rate: 3\n")  # somebody else's config
    with pytest.raises(DmhpcError, match=r"analysis is not a dmhpc run: .*config.yaml: learning_rate: unknown key"):
        RunDir(foreign).claim(cfg_for(foreign), "auto")
    assert sorted(os.listdir(foreign)) == ["config.yaml"]  # no lock, no checkpoints/, nothing rewritten
    assert (foreign / "config.yaml").read_text() == "learning_rate: 3\n"
    with pytest.raises(DmhpcError, match=r"run.dir /: exists and is not a dmhpc run \(it holds"):
        RunDir("/").claim(cfg_for("/"), "auto")
    long = tmp_path / ("r" * 300)  # a name the system cannot look up: an OSError traceback
    with pytest.raises(DmhpcError, match=rf"^run.dir {long}: cannot read: File name too long$"):
        RunDir(long).claim(cfg_for(long), "auto")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(DmhpcError, match="exists and is not a directory"):
        RunDir(afile).claim(cfg_for(afile), "auto")
    # Only names a run holds (someone's plots/ folder), and no config.yaml: not a run either.
    plots = tmp_path / "figures"
    (plots / "plots").mkdir(parents=True)
    (plots / "plots" / "mine.png").write_bytes(b"someone's figure")
    with pytest.raises(DmhpcError, match=r"run.dir \S+figures: exists and is not a dmhpc run \(it holds 'plots'\)"):
        RunDir(plots).claim(cfg_for(plots), "auto")
    assert os.listdir(plots) == ["plots"] and os.listdir(plots / "plots") == ["mine.png"]
    # A run holding a file not its own (a catalog written into it) is named a run, not "not a run".
    run, cfg = started(tmp_path, "started")
    (run.path / "cands.parquet").write_bytes(b"a catalog")
    with pytest.raises(DmhpcError, match=rf"^run.dir {re.escape(str(run.path))}: a run, which holds 'cands.parquet', "
                                         r"not a run's file; move it out of the run directory$"):
        run.claim(cfg, "auto")


def test_an_empty_directory_is_taken_and_a_new_one_made_and_cleaned_if_unused(tmp_path):
    (tmp_path / "empty").mkdir()
    run = RunDir(tmp_path / "empty")
    assert run.claim(cfg_for(run.path), "auto").resume_from is None
    run.release()
    fresh = RunDir(tmp_path / "a" / "b")
    fresh.claim(cfg_for(fresh.path), "auto")
    assert (fresh.path / ".lock").exists()
    fresh.release()  # a start-up check failed before anything was written: no directory left behind
    assert not fresh.path.exists() and (tmp_path / "empty").is_dir()


def test_a_trainer_starting_while_another_gives_its_lock_back_is_the_only_one_in_the_run(tmp_path):
    """The lock was released before its file was unlinked and its folder removed: a trainer starting
    in between locked that file and lost it with the folder, and a third then trained beside it."""
    first, second, third = (RunDir(tmp_path / "a" / "run") for _ in range(3))
    first.claim(cfg_for(first.path), "auto")  # then refused at a start-up check: gives the lock back
    handle = first._lock_file

    class StartsBetween:  # the second trainer starts the moment the first unlocks
        def close(self):
            handle.close()
            second.claim(cfg_for(second.path), "auto")

    first._lock_file = StartsBetween()
    first.release()
    assert (second.path / ".lock").exists()
    with pytest.raises(DmhpcError, match="in use"):
        third.claim(cfg_for(third.path), "auto")
    second.release()


def test_resume_none_on_an_existing_run_needs_overwrite(tmp_path):
    run, cfg = started(tmp_path)
    run.write_result({"split": "test"}, "best", "test")
    with pytest.raises(DmhpcError, match=r"already holds a run; --resume auto continues it, --resume none "
                                         r"--overwrite replaces it"):
        run.claim(cfg, "none")
    run.release()
    claim = run.claim(cfg, "none", overwrite=True)
    run.start(cfg, claim, {}, 0)
    run.release()
    assert not run.checkpoint("last").exists() and run.read_result() is None and run.read_log() == []


def test_results_and_log_are_json_any_parser_reads_and_read_back_nan(tmp_path):
    """An undefined metric (the precision of a model that predicts no merger, a one-class split's
    AUC) was written as a bare NaN: JSON has none, and strict parsers (JavaScript's, jq, Python's
    with parse_constant) refused eval/best_test.json and metrics.jsonl."""
    import math

    from dmhpc.train.evaluate import format_table

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    metrics = {"accuracy": 0.5, "roc_auc": math.nan, "precision": math.inf, "labelled": True,
               "confusion": [[5, 0], [5, 0]]}
    run.write_result({"final": True, "source": metrics, "target": metrics}, "best", "test")
    run.append_log({"kind": "epoch", "epoch": 0, "step": 3, "source": {"val": metrics}})
    written = json.loads(run.result_path("best", "test").read_text(), parse_constant=refuse)
    assert written["source"]["roc_auc"] is None and written["target"]["precision"] is None
    line = json.loads(run.log_path.read_text(), parse_constant=refuse)
    assert line["source"]["val"]["roc_auc"] is None
    # Read back as the NaN the readers compute with.
    result = run.read_result("best", "test")
    assert math.isnan(result["source"]["roc_auc"]) and result["source"]["confusion"] == [[5, 0], [5, 0]]
    assert math.isnan(run.read_log()[0]["source"]["val"]["precision"])
    assert "| 0.500 | nan |" in format_table({"run": result})
    run.truncate_log(3)  # rewritten from what was read: still strict
    json.loads(run.log_path.read_text(), parse_constant=refuse)
    # A damaged result says what to do: eval, which would write it anew, stopped at the same line.
    path = run.result_path("best", "test")
    path.write_text(path.read_text()[:30])
    with pytest.raises(DmhpcError, match=rf"^{re.escape(str(path))}: not readable JSON \(.*\); remove it and run "
                                         r"the trainer again \(--resume auto tests its selection\)$"):
        run.read_result("best", "test")
    run.write_result({"split": "val"}, "last", "val")
    other = run.result_path("last", "val")
    other.write_text("{")
    with pytest.raises(DmhpcError, match=r"not readable JSON \(.*\); remove it and run dmhpc eval again$"):
        run.read_result("last", "val")


def test_auto_without_last_but_with_results_is_refused(tmp_path):
    """Refused when more than the first epoch would be lost; a run killed between its first best.pt
    and its first last.pt (its requeued job stopped there) starts again."""
    run, cfg = started(tmp_path, checkpoint=False)
    save_checkpoint(run.checkpoint("best"), {"step": 3})
    run.append_log({"kind": "epoch", "epoch": 0, "step": 3})
    claim = run.claim(cfg, "auto")
    assert claim.resume_from is None and claim.replaces
    run.release()
    run.append_log({"kind": "epoch", "epoch": 1, "step": 6})
    with pytest.raises(DmhpcError, match="holds results .* but no last.pt to resume from"):
        run.claim(cfg, "auto")
    run.release()
    run.truncate_log(3)
    # Its one evaluated epoch without best.pt or best.next.pt: checkpoints/ moved away, not a kill
    # before the first last.pt (it was replaced without a word). The epoch not evaluated: a kill.
    run.checkpoint("best").rename(tmp_path / "moved.pt")
    run.truncate_log(0)
    run.append_log({"kind": "epoch", "epoch": 0, "step": 3, "selection": {"criterion": "dev", "score": 0.5}})
    with pytest.raises(DmhpcError, match="holds results .* but no last.pt to resume from"):
        run.claim(cfg, "auto")
    run.release()
    (tmp_path / "moved.pt").rename(run.next_best)  # written before the record by this dmhpc: a kill
    assert run.claim(cfg, "auto").replaces
    run.release()
    run.next_best.unlink()
    run.truncate_log(0)
    run.append_log({"kind": "epoch", "epoch": 0, "step": 3})
    assert run.claim(cfg, "auto").replaces
    run.release()
    (run.path / "eval").mkdir()
    (run.path / "eval" / "best_val.json").write_text("{}")  # a dmhpc eval of it: kept
    with pytest.raises(DmhpcError, match="holds results .* but no last.pt to resume from"):
        run.claim(cfg, "auto")


def test_a_replacement_killed_midway_leaves_a_run_that_overwrite_accepts(tmp_path, monkeypatch):
    """--resume none --overwrite removed config.yaml first: killed right after, the folder held the
    run's other files but no config, "not a dmhpc run", refused by every later start."""
    run, cfg = started(tmp_path)
    (run.path / "eval").mkdir()
    (run.path / "eval" / "best_test.json").write_text("{}")
    claim = run.claim(cfg, "none", overwrite=True)
    from dmhpc import run as run_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as the process dies here
    monkeypatch.setattr(run_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run.start(cfg, claim, {}, 0)
    run.release()
    monkeypatch.undo()
    assert run.config_path.is_file()
    again = RunDir(run.path)
    claim = again.claim(cfg, "none", overwrite=True)
    again.start(cfg, claim, {"source": {"path": "s", "fingerprint": "aa"}, "target": {"path": "t", "fingerprint": "bb"}},
                0)
    again.release()
    assert not (run.path / "eval").exists() and not run.checkpoint("last").exists()


def test_a_replacement_removes_what_a_resume_would_take_up_first(tmp_path, monkeypatch):
    """The run's names went in a set's order (it changed with PYTHONHASHSEED): killed after run.json,
    the log and tensorboard/ went but before checkpoints/, --resume auto took up the old last.pt, its
    early epochs lost from the log, and the run reported a final result."""
    run, cfg = started(tmp_path)
    (run.path / "eval").mkdir()
    from dmhpc import run as run_module

    removed, remove = [], run_module._remove_own

    def recorded(target):
        removed.append(target.relative_to(run.path).as_posix())
        if len(removed) == 2:
            raise KeyboardInterrupt  # as the process dies here
        remove(target)

    monkeypatch.setattr(run_module, "_remove_own", recorded)
    with pytest.raises(KeyboardInterrupt):
        run.start(cfg, run.claim(cfg, "none", overwrite=True), {}, 0)
    run.release()
    monkeypatch.undo()
    assert removed == ["checkpoints/last.pt", "checkpoints"]
    from dmhpc.run import LOCK, OWN_NAMES, REPLACED_IN_ORDER

    assert set(REPLACED_IN_ORDER) == set(OWN_NAMES) - {LOCK}  # a name added to the run's is replaced too
    assert not run.checkpoint("last").exists() and run.log_path.exists()  # nothing left to resume from
    assert run.claim(cfg, "auto").resume_from is None
    run.release()


def test_a_finished_run_resumed_with_another_evaluation_cadence_is_refused(tmp_path):
    """A launcher refused it (its selected checkpoint is of the old cadence); `dmhpc train` took it,
    kept the final result and wrote the new train.eval_every into config.yaml beside it."""
    run, cfg = started(tmp_path)
    run.write_result({"final": True}, "best", "test")
    cadence = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=2))
    before = run.config_path.read_bytes()
    with pytest.raises(DmhpcError, match=r"the run finished with other settings \(train.eval_every 1 -> 2\)"):
        run.claim(cadence, "auto")
    assert run.config_path.read_bytes() == before and run.finished


# --- what may change on resume --------------------------------------------------------------------

def test_a_changed_configuration_is_refused_naming_keys_and_values(tmp_path):
    run, cfg = started(tmp_path)
    before = run.config_path.read_bytes()
    new = dataclasses.replace(cfg, seed=5, train=dataclasses.replace(cfg.train, batch_size=8),
                              data=dataclasses.replace(cfg.data, source="/elsewhere"))
    with pytest.raises(DmhpcError) as info:
        run.claim(new, "auto")
    message = str(info.value)
    assert message.startswith(f"{run.config_path}: the run was trained with another configuration: ")
    for part in ('data.source "data/embedded/shards/pristine" -> "/elsewhere"', "seed 1 -> 5",
                 "train.batch_size 16 -> 8"):
        assert part in message
    assert "\n" not in message and run.config_path.read_bytes() == before


@pytest.mark.parametrize("key, value", [("model.name", "resnet18"), ("loss.transfer", "coral"),
                                        ("optim.name", "sgd"), ("train.amp", "bf16"), ("data.normalize", "source")])
def test_what_is_trained_may_not_change(tmp_path, key, value):
    run, cfg = started(tmp_path)
    section, name = key.split(".")
    new = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    with pytest.raises(DmhpcError, match=f"{key.replace('.', '[.]')} "):
        run.claim(new, "auto")


def test_length_cadence_loader_and_location_may_change_and_are_reported(tmp_path):
    run, cfg = started(tmp_path)
    new = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, epochs=9, log_every=1, checkpoint_every=5, early_stopping=3),
        data=dataclasses.replace(cfg.data, loader="torch", num_workers=4, verify="structure"),
        run=dataclasses.replace(cfg.run, dir="/moved/here"))
    claim = run.claim(new, "auto")
    assert claim.resume_from == run.checkpoint("last")
    assert claim.changed == {"train.epochs": [2, 9], "train.log_every": [5, 1], "train.checkpoint_every": [0, 5],
                             "train.early_stopping": [0, 3], "data.loader": ["auto", "torch"],
                             "data.num_workers": [0, 4], "data.verify": ["checksums", "structure"],
                             "run.dir": [str(run.path), "/moved/here"]}


def test_a_finished_run_asked_to_train_longer_is_unfinished_until_its_new_test(tmp_path):
    """Its old test result stayed final: until the longer run ended (or after it was killed), the
    launchers took the shorter run's result for the longer one's."""
    run, cfg = started(tmp_path)
    run.write_result({"final": True, "source": {"accuracy": 0.5}}, "best", "test")
    assert run.finished
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=9))
    run.start(longer, run.claim(longer, "auto"), {}, 3)
    run.release()
    assert not run.finished and run.read_result() == {"final": False, "source": {"accuracy": 0.5}}
    run.write_result({"final": True}, "best", "test")
    cadence = dataclasses.replace(longer, train=dataclasses.replace(longer.train, log_every=1))
    run.start(cadence, run.claim(cadence, "auto"), {}, 3)  # another cadence: still the same run's result
    assert run.finished


def test_a_relaunch_compares_the_config_of_a_run_with_results_but_no_last(tmp_path):
    """Its last.pt removed (to save space), a finished run's old result was taken for any new
    configuration: nothing was compared without last.pt."""
    run, cfg = started(tmp_path, checkpoint=False)
    save_checkpoint(run.checkpoint("best"), {"step": 3})
    run.write_result({"final": True}, "best", "test")
    run.check_relaunch(cfg, {})
    run.check_relaunch(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=1)), {})  # cadence
    new = dataclasses.replace(cfg, seed=5, optim=dataclasses.replace(cfg.optim, lr=0.5))
    with pytest.raises(DmhpcError) as info:
        run.check_relaunch(new, {})
    message = str(info.value)
    assert message.startswith(f"{run.config_path}: the run was trained with another configuration: ")
    assert "optim.lr 0.001 -> 0.5" in message and "seed 1 -> 5" in message and "\n" not in message
    # best.pt says what it was trained with: config.yaml edited by hand to the new values passes for nothing.
    save_checkpoint(run.checkpoint("best"), {"step": 3, "config": config_to_dict(cfg)})
    save_config(new, run.config_path)
    with pytest.raises(DmhpcError, match=rf"^{run.checkpoint('best')}: the run was trained with another "
                                         rf"configuration: .*optim.lr 0.001 -> 0.5"):
        run.check_relaunch(new, {})


def test_a_relaunch_refuses_fewer_epochs_than_last_has_trained(tmp_path):
    """Refused only by the trainer, after the job was submitted and had waited in the queue."""
    run, cfg = started(tmp_path, epochs=9)
    save_checkpoint(run.checkpoint("last"), {"step": 30, "progress": {"epoch": 5, "step_in_epoch": 0, "step": 30}})
    with pytest.raises(DmhpcError, match=rf"^{run.path}: train.epochs 5: the run would end at step 30, where its last "
                                         r"checkpoint stands, which was never evaluated"):
        run.check_relaunch(cfg_for(run.path, epochs=5), {})
    run.append_log({"kind": "epoch", "epoch": 4, "step": 30, "selection": {"criterion": "source-val-acc", "score": 0.5}})
    for epochs in (5, 9, 20):
        run.check_relaunch(cfg_for(run.path, epochs=epochs), {})
    with pytest.raises(DmhpcError, match=rf"^{run.path}: train.epochs 4: the run has trained 5 epochs already; give "
                                         r"at least 5, or start a new run.dir$"):
        run.check_relaunch(cfg_for(run.path, epochs=4), {})
    save_checkpoint(run.checkpoint("last"), {"step": 33, "progress": {"epoch": 5, "step_in_epoch": 3, "step": 33}})
    with pytest.raises(DmhpcError, match="train.epochs 5: the run has trained 6 epochs already"):  # one begun counts
        run.check_relaunch(cfg_for(run.path, epochs=5), {})


def test_a_relaunch_refuses_fewer_max_steps_than_last_is_at_in_its_world(tmp_path):
    """The trainer refused train.max_steps below the run's step, a launcher did not: the point was
    submitted again, waited in the queue, and failed."""
    run, cfg = started(tmp_path, epochs=9)
    save_checkpoint(run.checkpoint("last"), {"step": 30, "progress": {"epoch": 5, "step_in_epoch": 0, "step": 30,
                                                                      "world_size": 2}})
    run.append_log({"kind": "epoch", "epoch": 4, "step": 30, "selection": {"criterion": "source-val-acc", "score": 0.5}})
    for max_steps in (0, 30, 40):
        run.check_relaunch(cfg_for(run.path, epochs=9, max_steps=max_steps), {}, ranks=2)
    for ranks in (2, None):
        with pytest.raises(DmhpcError, match=rf"^{run.path}: train.max_steps 20: the run is at step 30 already \(in "
                                             rf"this world size's steps\); give at least 30, or start a new run.dir$"):
            run.check_relaunch(cfg_for(run.path, epochs=9, max_steps=20), {}, ranks=ranks)
    # In another world its steps are counted otherwise: the trainer's to judge; so after the run
    # trained in another world, whose steps progress.step counts too.
    run.check_relaunch(cfg_for(run.path, epochs=9, max_steps=20), {}, ranks=4)
    run.append_log({"kind": "setup", "step": 0, "world_size": 4})
    run.check_relaunch(cfg_for(run.path, epochs=9, max_steps=20), {}, ranks=2)


def test_a_relaunch_refuses_what_the_trainer_refuses_of_results_without_last(tmp_path):
    """An unfinished run (or a finished one asked for another length) with results but no last.pt
    would be submitted, and its trainer would refuse to start it."""
    run, cfg = started(tmp_path, checkpoint=False)
    save_checkpoint(run.checkpoint("best"), {"step": 3})
    run.append_log({"kind": "epoch", "epoch": 0, "step": 3})
    run.check_relaunch(cfg, {})  # killed before its first last.pt: the trainer starts it again
    run.append_log({"kind": "epoch", "epoch": 1, "step": 6})
    with pytest.raises(DmhpcError, match=rf"^{run.path}: holds results \(checkpoints/, eval/\) but no last.pt to resume "
                                         r"from, and is unfinished; restore its last.pt, or remove the directory"):
        run.check_relaunch(cfg, {})
    run.write_result({"final": True}, "best", "test")
    run.check_relaunch(cfg, {})  # finished: nothing to submit
    with pytest.raises(DmhpcError, match="but no last.pt to resume from, and is asked to train for another length"):
        run.check_relaunch(cfg_for(run.path, epochs=9), {})


def test_a_finished_run_does_not_stand_for_another_selection_cadence(tmp_path):
    """A grid edited to train.eval_every 1 counted the run finished with eval_every 5 as its point's
    result: another checkpoint would have been selected and tested. Another loss.mmd.max_samples (a
    cap that only refuses larger batches) was refused too, and every finished point had to be
    trained again: it stands for the same run."""
    run, cfg = started(tmp_path, eval_every=5)
    run.write_result({"final": True}, "best", "test")
    run.check_relaunch(cfg_for(run.path, eval_every=5, log_every=7), {})  # what changes nothing trained
    with pytest.raises(DmhpcError, match=rf"the run finished with other settings \(train.eval_every 5 -> 1\): its "
                                         rf"result is not this configuration's .* remove {run.path} to train it again"):
        run.check_relaunch(cfg_for(run.path, eval_every=1), {})
    mmd = dataclasses.replace(cfg.loss, mmd=dataclasses.replace(cfg.loss.mmd, max_samples=2 * cfg.loss.mmd.max_samples))
    run.check_relaunch(dataclasses.replace(cfg, loss=mmd), {})
    run.check_relaunch(cfg_for(run.path, eval_every=1, epochs=cfg.train.epochs + 2), {})  # longer: resumed, not kept
    unfinished, cfg = started(tmp_path, "unfinished", eval_every=5)
    unfinished.check_relaunch(cfg_for(unfinished.path, eval_every=1), {})  # resumed at the new cadence
    # The job shape: train.batch_size is per rank, so a run finished on 1 rank is no 8-rank point's.
    save_checkpoint(run.checkpoint("last"), {"step": 3, "progress": {"epoch": 2, "step_in_epoch": 0, "step": 3,
                                                                     "world_size": 1}})
    run.check_relaunch(cfg_for(run.path, eval_every=5), {}, ranks=1)
    with pytest.raises(DmhpcError, match=r"other settings \(ranks 1 -> 8\)"):
        run.check_relaunch(cfg_for(run.path, eval_every=5), {}, ranks=8)


def test_a_moved_data_set_is_accepted_only_when_it_is_the_same_data(tmp_path):
    run, cfg = started(tmp_path)
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="/scratch/pristine"))
    claim = run.claim(moved, "auto", data_ids={"data.source": "aa", "data.target": "bb"})
    assert claim.changed == {"data.source": ["data/embedded/shards/pristine", "/scratch/pristine"]}
    run.release()
    with pytest.raises(DmhpcError, match="data.source"):
        run.claim(moved, "auto", data_ids={"data.source": "other data", "data.target": "bb"})


def test_another_data_set_at_the_same_path_is_refused(tmp_path):
    """A data set prepared again (or replaced) under the path the run trained on: accepted, and
    run.json rewritten with the new fingerprint, losing what the run trained on."""
    run, cfg = started(tmp_path)
    record = run.record_path.read_bytes()
    with pytest.raises(DmhpcError, match=r"data.target \"data/embedded/shards/noisy\" holds another data set than the "
                                         r"run trained on \(manifest fingerprint bb -> cc\)"):
        run.claim(cfg, "auto", data_ids={"data.source": "aa", "data.target": "cc"})
    run.release()
    assert run.record_path.read_bytes() == record
    assert run.claim(cfg, "auto", data_ids={"data.source": "aa", "data.target": "bb"}).changed == {}


def test_resume_from_another_checkpoint_compares_with_its_own_config(tmp_path):
    run, cfg = started(tmp_path)
    elsewhere = tmp_path / "pretrained.pt"
    from dmhpc.config import config_to_dict

    save_checkpoint(elsewhere, {"config": config_to_dict(dataclasses.replace(cfg, seed=9))})
    with pytest.raises(DmhpcError, match=rf"{elsewhere}: the run was trained with another configuration: seed 9 -> 1"):
        run.claim(cfg, str(elsewhere), overwrite=True)
    run.release()
    with pytest.raises(DmhpcError, match="--resume .*missing.pt: checkpoint not found"):
        run.claim(cfg, str(tmp_path / "missing.pt"))


def test_a_checkpoint_from_elsewhere_never_joins_another_run(tmp_path):
    """--resume PATH into a run.dir holding another run kept that run's best.pt, eval/ and log
    beside the new run's config: its test result was reported as the new run's."""
    from dmhpc.config import config_to_dict

    run, cfg = started(tmp_path)
    save_checkpoint(run.checkpoint("best"), {"step": 2})
    (run.path / "eval").mkdir()
    (run.path / "eval" / "best_test.json").write_text("{}")
    elsewhere = tmp_path / "other" / "checkpoints" / "last.pt"
    save_checkpoint(elsewhere, {"config": config_to_dict(cfg)})
    with pytest.raises(DmhpcError, match=rf"{run.path}: already holds a run; a checkpoint from elsewhere \(--resume "
                                         rf"{elsewhere}\) starts a run in a new run.dir, or replaces this one with "
                                         rf"--overwrite"):
        run.claim(cfg, str(elsewhere))
    assert run.checkpoint("best").is_file() and (run.path / "eval" / "best_test.json").is_file()
    run.release()
    claim = run.claim(cfg, str(elsewhere), overwrite=True)
    assert claim.resume_from == elsewhere and claim.replaces
    run.start(cfg, claim, {}, 0)
    assert not run.checkpoint("best").exists() and not (run.path / "eval").exists()
    assert elsewhere.is_file() and run.config_path.is_file()
    run.release()
    # the run's own checkpoints (best.pt included) resume it, as before
    save_checkpoint(run.checkpoint("best"), {"step": 2})
    assert not run.claim(cfg, str(run.checkpoint("best"))).replaces
    run.release()
    # The replaced run's data fingerprints say nothing of what the foreign checkpoint trained on.
    claim = run.claim(cfg, str(elsewhere), overwrite=True, data_ids={"data.source": "X", "data.target": "Y"})
    assert claim.replaces and claim.changed == {}
    run.release()
    # A bare checkpoint is no run's: a run.json two folders up (not a run's) is not read for it.
    bare = tmp_path / "kept" / "x.pt"
    save_checkpoint(bare, {"config": config_to_dict(cfg)})
    (tmp_path / "run.json").write_text("not a run's record")
    assert run.claim(cfg, str(bare), overwrite=True, data_ids={"data.source": "X"}).changed == {}
    run.release()
    # A run that began from it and was killed before a last.pt of its own: a plain requeue would
    # have started it again from random weights.
    run.start(cfg, claim, {}, 0)
    run.append_log({"kind": "setup", "step": 0, "resumed_from": str(elsewhere)})
    run.release()
    with pytest.raises(DmhpcError, match=rf"began from {elsewhere} and has no last.pt of its own yet; --resume "
                                         rf"{elsewhere} --overwrite starts it again"):
        run.claim(cfg, "auto")
    run.release()
    assert run.claim(cfg, str(elsewhere), overwrite=True).replaces  # as it says (without --overwrite: refused)
    run.release()
    run.start(cfg, claim, {}, 0)
    run.append_log({"kind": "setup", "step": 0, "resumed_from": str(elsewhere)})
    run.release()
    # A launcher about to submit it again (which resumes "auto") refuses it too, before the queue.
    with pytest.raises(DmhpcError, match=rf"^{run.path}: began from {elsewhere} and has no last.pt of its own yet"):
        run.check_relaunch(cfg, {})
    run.write_result({"final": True}, "best", "test")
    run.check_relaunch(cfg, {})  # finished: nothing to submit


# --- the lock -------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from dmhpc.config import load_config
    from dmhpc.run import RunDir
    run = RunDir(sys.argv[1])
    run.claim(load_config(sys.argv[2], [f"run.dir={sys.argv[1]}"]), "auto")
    print("claimed", flush=True)
    time.sleep(600)
""")


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(script), str(run.path), str(ROOT / "configs" / "tiny.yaml")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        with pytest.raises(DmhpcError, match=rf"run.dir {run.path}: in use by another dmhpc trainer or eval \(pid {proc.pid} on "):
            run.claim(cfg_for(run.path), "auto")
    finally:
        proc.send_signal(signal.SIGKILL)  # as a node failure or an OOM kill would
        proc.wait()
        proc.stdout.close()
    run.claim(cfg_for(run.path), "auto")  # the kernel dropped the dead process's lock
    run.release()


def test_a_trainer_that_loses_the_race_to_make_the_run_dir_is_told_who_holds_it(tmp_path, monkeypatch):
    """Two trainers starting together on a new run.dir: the one whose mkdir came second was told
    "cannot create: File exists" (7 times in 60 such races), not that another trainer held the run."""
    from pathlib import Path

    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(script), str(run.path), str(ROOT / "configs" / "tiny.yaml")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    real = Path.exists

    def a_moment_before(path, *args, **kwargs):  # the run.dir as the loser saw it, before the holder made it
        return False if path == run.path and sys._getframe(1).f_code.co_name == "_lock" else real(path, *args, **kwargs)

    try:
        assert proc.stdout.readline().strip() == "claimed"
        monkeypatch.setattr(Path, "exists", a_moment_before)
        held = rf"run.dir {run.path}: in use by another dmhpc trainer or eval \(pid {proc.pid} on "
        with pytest.raises(DmhpcError, match=held):
            run.claim(cfg_for(run.path), "auto")
        monkeypatch.undo()
        from dmhpc.run import LOCK

        assert (run.path / LOCK).exists()  # the holder's lock stands
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_a_requeued_trainer_waits_for_the_lock_its_own_previous_attempt_left(tmp_path, capsys):
    """A network file system keeps a lost node's locks for a lease time: the requeued job, started
    on another node meanwhile, was refused ("in use") and its training ended there. It waits for its
    own job's previous attempt now; any other holder is refused at once, as before."""
    import threading
    import time

    script = tmp_path / "holder.py"
    script.write_text(HOLDER.replace('"auto")', '"auto", attempt={"job": "77", "restart": 0})'))
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(script), str(run.path), str(ROOT / "configs" / "tiny.yaml")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    claimed = []
    try:
        assert proc.stdout.readline().strip() == "claimed"
        # another job, the same attempt (a second trainer launched by mistake), no job: refused at
        # once (`stopped` is asked only while waiting: a wait would end in its line instead)
        for attempt in ({"job": "78", "restart": 1}, {"job": "77", "restart": 0}, None):
            with pytest.raises(DmhpcError, match=rf"in use by another dmhpc trainer or eval \(pid {proc.pid} on .*, "
                                                 rf"job 77 attempt 0\)"):
                run.claim(cfg_for(run.path), "auto", attempt=attempt, stopped=lambda: "a wait")
        # A stop signal while it waits (the job's time is up): one line at once, not a wait for the
        # lease that ends in a SIGKILL, without a word.
        with pytest.raises(DmhpcError, match=rf"run.dir {run.path}: SIGTERM while waiting for pid {proc.pid} .*; "
                                             rf"nothing written"):
            RunDir(run.path).claim(cfg_for(run.path), "auto", attempt={"job": "77", "restart": 1},
                                   stopped=lambda: "SIGTERM")
        waiting = RunDir(run.path)
        trainer = threading.Thread(target=lambda: claimed.append(
            waiting.claim(cfg_for(run.path), "auto", attempt={"job": "77", "restart": 1})))
        trainer.start()
        time.sleep(2.0)
        assert trainer.is_alive() and not claimed
    finally:
        proc.send_signal(signal.SIGKILL)  # the lease ends
        proc.wait()
        proc.stdout.close()
    trainer.join(timeout=60)
    assert claimed and "(this job's previous attempt, on a node lost?) to let go of it" in capsys.readouterr().out
    waiting.release()


# --- the log and the results ----------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        run.append_log({"kind": "step", "step": step})
    with run.log_path.open("a") as f:
        f.write('{"kind": "step", "st')  # a kill mid-append
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    assert run.truncate_log(2) == 1
    assert run.log_path.read_text() == '{"kind": "step", "step": 1}\n{"kind": "step", "step": 2}\n'
    run.log_path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DmhpcError, match="metrics.jsonl: line 2 is not a JSON record"):
        run.read_log()


EPOCH = {"kind": "epoch", "epoch": 0, "step": 3, "steps": 3, "step_time_s": 0.1, "loss": {"total": 0.7},
         "source": {"train": {"accuracy": 0.5}, "val": {"accuracy": 0.5, "roc_auc": float("nan")}},
         "target": {"val": {"labelled": False, "merger_fraction": 0.25}},
         "selection": {"criterion": "im", "score": 0.1}, "validators": {"im": 0.1, "snd": None}}
SETUP = {"kind": "setup", "step": 0, "world_size": 2, "loader": "torch", "loader_setup_s": 0.5, "resumed_from": None}


@pytest.mark.parametrize("record, message", [
    ({**EPOCH, "selection": None}, "selection: expected a mapping, got null"),
    ({**EPOCH, "selection": {"score": "0.1"}}, 'selection.score: expected a number or null, got "0.1"'),
    ({**EPOCH, "epoch": "0"}, 'epoch: expected a number from 0, got "0"'),
    ({k: v for k, v in EPOCH.items() if k != "epoch"}, "epoch: expected a number from 0, got null"),
    ({**EPOCH, "loss": {"total": "low"}}, 'loss.total: expected a number or null, got "low"'),
    ({**EPOCH, "source": {"val": None}}, "source.val: expected a mapping of metric to number, got null"),
    ({**EPOCH, "validators": {"im": [1]}}, "validators.im: expected a number or null, got [1]"),
    ({**EPOCH, "last": "true"}, 'last: expected true (training ended with this record) or no key, got "true"'),
    ({**SETUP, "loader_setup_s": "fast"}, 'loader_setup_s: expected a number of seconds, got "fast"'),
    ({**SETUP, "world_size": [2]}, "world_size: expected a number of ranks, got [2]"),
    ({**SETUP, "resumed_from": 5}, "resumed_from: expected a checkpoint path or null, got 5"),
    ({"kind": "step", "step": 1.5}, "step: expected a step number, got 1.5"),
])
def test_a_log_record_of_other_types_is_one_line_naming_its_line_and_key(tmp_path, record, message):
    """Records were only checked to be objects: "selection": null was an AttributeError in the plots
    of `dmhpc eval`, a setup record's text where a number was a TypeError in the scaling table."""
    run = RunDir(tmp_path)
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in (SETUP, record, EPOCH)))
    with pytest.raises(DmhpcError, match=f"^{re.escape(f'{run.log_path} line 2: {message}')}$"):
        run.read_log()


def test_a_log_as_the_trainer_writes_it_is_read(tmp_path):
    run = RunDir(tmp_path)
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in (SETUP, {"kind": "step", "step": 1}, EPOCH)))
    assert [r["kind"] for r in run.read_log()] == ["setup", "step", "epoch"]


def _fsynced(monkeypatch) -> list[str]:
    """What os.fsync is called on from now on, as the paths of the descriptors (the real fsync runs)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    return synced


def test_an_epoch_record_is_on_disk_before_the_checkpoint_after_it(tmp_path, monkeypatch):
    """The checkpoint is fsynced; the log was not: a node crash kept last.pt and lost the epoch record
    of its step, and every resume ending there was refused as never evaluated. Step records are
    not waited for (cadence only, many per epoch)."""
    run = RunDir(tmp_path)
    synced = _fsynced(monkeypatch)
    run.append_log({"kind": "step", "step": 1})
    assert synced == []
    run.append_log(EPOCH)
    assert synced == [str(run.log_path)]


def test_each_evaluation_has_its_own_file(tmp_path):
    run = RunDir(tmp_path)
    run.write_result({"split": "test", "who": 1}, "best", "test")
    run.write_result({"split": "val", "who": 2}, "best", "val")
    run.write_result({"split": "test", "who": 3}, "last", "test")
    run.write_result({"split": "test", "who": 4}, "best", "test", data="survey/DR10 cutouts")
    assert [run.read_result(*key)["who"] for key in (("best", "test"), ("best", "val"), ("last", "test"))] == [1, 2, 3]
    assert run.read_result("best", "test", "survey/DR10 cutouts")["who"] == 4
    assert evaluation_tag("best", "test", "survey/DR10 cutouts") == "best_test_on-survey_DR10_cutouts"
    assert run.finished


def test_a_result_of_older_dmhpc_counts_only_for_what_it_holds(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"split": "val", "checkpoint": {"name": "best"}}))
    assert run.read_result("best", "test") is None and not run.finished  # validation numbers are not test numbers
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"split": "test", "checkpoint": {"name": "best"}}))
    assert run.read_result("best", "test")["split"] == "test" and run.finished


RESULT = {"split": "test", "final": True, "oracle": False, "data": {"source": "/d/pristine", "target": "/d/noisy"},
          "checkpoint": {"name": "best", "epoch": 3, "step": 30, "criterion": "im", "score": 0.5},
          "source": {"n": 8, "accuracy": 0.5, "roc_auc": float("nan"), "confusion": [[2, 2], [2, 2]]},
          "target": {"n": 8, "labelled": False, "merger_fraction": 0.25}}


@pytest.mark.parametrize("edit, message", [
    ({"checkpoint": [1]}, "checkpoint: expected a mapping, got [1]"),
    ({"checkpoint": {**RESULT["checkpoint"], "criterion": 5}}, "checkpoint.criterion: expected text or null, got 5"),
    ({"checkpoint": {**RESULT["checkpoint"], "score": "0.5"}}, 'checkpoint.score: expected a number or null, got "0.5"'),
    ({"target": None}, "target: expected a mapping of metric to number, got null"),
    ({"source": {**RESULT["source"], "accuracy": "0.9"}}, 'source.accuracy: expected a number or null, got "0.9"'),
    ({"target": {**RESULT["target"], "labelled": "no"}}, 'target.labelled: expected true or false, got "no"'),
    ({"final": "true"}, 'final: expected true or false, got "true"'),
    ({"data": {"target": 5}}, "data: expected a mapping of role to data-set path"),
])
def test_an_edited_result_file_is_one_line_naming_the_key(tmp_path, edit, message):
    """Only checked to be an object: an AttributeError in export and the leaderboard, a TypeError in
    its markdown, and a text accuracy a run the grid report left out of its ranking without a word."""
    run = RunDir(tmp_path)
    run.write_result({**RESULT, **edit}, "best", "test")
    path = run.result_path("best", "test")
    with pytest.raises(DmhpcError, match=f"^{re.escape(f'{path}: {message}')}"):
        run.read_result()
    with pytest.raises(DmhpcError, match=re.escape(message)):
        assert run.finished is not None  # the property reads the file
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({**RESULT, **edit}))  # an older dmhpc's too
    path.unlink()
    with pytest.raises(DmhpcError, match=re.escape(f"metrics.json: {message}")):
        run.read_result()


def test_a_result_file_as_the_trainer_writes_it_is_read(tmp_path):
    run = RunDir(tmp_path)
    run.write_result(RESULT, "best", "test")
    assert run.read_result()["checkpoint"] == RESULT["checkpoint"] and run.finished


def test_start_removes_orphans_and_writes_the_identity(tmp_path):
    run, cfg = started(tmp_path)
    orphan = run.checkpoint_dir / ".last.pt.ab12cd34.tmp"
    orphan.write_bytes(b"x" * 4096)
    (run.path / ".config.yaml.zz99yy88.tmp").write_text("half")
    claim = run.claim(cfg, "auto")
    cleaned = run.start(cfg, claim, {"source": {"path": "s", "fingerprint": "aa"}}, 3)
    run.release()
    assert cleaned["orphans_removed"] == 2 and cleaned["orphan_bytes"] == 4100
    assert not orphan.exists() and run.checkpoint("last").exists()
    record = json.loads(run.record_path.read_text())
    assert record["format"] == "dmhpc-run" and record["data"]["source"]["fingerprint"] == "aa"


def test_resuming_an_earlier_checkpoint_of_its_own_makes_it_the_last_and_the_result_unfinished(tmp_path):
    """From its own best.pt, the log was cut back to best's step while the later last.pt stayed: a
    kill before the next checkpoint resumed from that abandoned last.pt, its records lost for good.
    And a finished run's result still said final while the run trained again."""
    run, cfg = started(tmp_path)
    save_checkpoint(run.checkpoint("best"), {"step": 2})
    run.write_result({"final": True, "split": "test"}, "best", "test")
    claim = run.claim(cfg, str(run.checkpoint("best")))
    run.start(cfg, claim, {}, 2)
    run.release()
    assert run.checkpoint("last").read_bytes() == run.checkpoint("best").read_bytes()
    assert run.read_result()["final"] is False and not run.finished
    # from its own last.pt, nothing is rewound
    run.write_result({"final": True, "split": "test"}, "best", "test")
    save_checkpoint(run.checkpoint("last"), {"step": 4})
    run.start(cfg, run.claim(cfg, "auto"), {}, 4)
    run.release()
    assert torch_step(run.checkpoint("last")) == 4 and run.read_result()["final"] is True


def torch_step(path) -> int:
    return load_checkpoint(path)["step"]


def test_a_checkpoint_of_an_older_dmhpc_resumes_with_the_keys_added_since(tmp_path):
    """Its config was compared raw: keys added since (select.all_validators, train.deterministic)
    read as null -> false, and the checkpoint was refused."""
    cfg = cfg_for(tmp_path / "new")
    old = config_to_dict(cfg)
    del old["select"]["all_validators"], old["train"]["deterministic"]
    elsewhere = tmp_path / "old" / "last.pt"
    save_checkpoint(elsewhere, {"config": old})
    run = RunDir(tmp_path / "new")
    claim = run.claim(cfg, str(elsewhere))
    assert claim.changed == {} and not claim.own
    run.release()


def test_a_hand_edited_run_json_is_one_line(tmp_path):
    run, cfg = started(tmp_path)
    run.record_path.write_text('{"format": "dmhpc-run", "data": []}')
    with pytest.raises(DmhpcError, match=rf"^{run.record_path}: data: expected a mapping of role to data set$"):
        run.claim(cfg, "auto", data_ids={"data.source": "aa", "data.target": "bb"})
    run.release()
    with pytest.raises(DmhpcError, match="data: expected a mapping"):
        run.data_record("source")


STATS = {"shape": [3, 75, 75], "mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}
DELETED = object()


@pytest.mark.parametrize("edit, message", [
    ({"format": "dmhpc-shards"}, "format \"dmhpc-shards\": expected 'dmhpc-run'"),
    ({"version": 2}, "version 2: this dmhpc reads version 1 and older"),
    ({"version": "1"}, 'version: expected a positive integer, got "1"'),
    ({"target": {"fingerprint": 5}}, "data.target.fingerprint: expected a hexadecimal string, got 5"),
    ({"target": {**STATS, "mean": "abc"}}, 'data.target.mean: expected 3 finite numbers, one per channel, got "abc"'),
    ({"target": {**STATS, "mean": None}}, "data.target.mean: expected 3 finite numbers, one per channel, got null"),
    ({"target": {**STATS, "shape": "3x75x75"}}, "data.target.shape: expected [C, H, W], three positive integers"),
    # one value for three channels broadcast: predict wrote p_merger of 0 and 1 only
    ({"target": {**STATS, "mean": [0.4], "std": [0.0001]}}, "data.target.mean: expected 3 finite numbers"),
    ({"target": {**STATS, "std": [1.0, 0.0, 1.0]}}, "data.target.std: expected standard deviations above 0"),
    ({"target": {"shape": DELETED}}, "data.target: mean, std without shape (recorded together)"),
    ({"attempts": {"job": "7", "started": ["0"]}},
     "attempts: expected {job: a SLURM job id, torchrun-ID or null, started:"),
    ({"run_id": "run-1"}, 'run_id: expected 32 hexadecimal digits, got "run-1"'),
])
def test_a_foreign_or_edited_run_json_is_one_line_naming_the_key(tmp_path, edit, message):
    """Its format and version were written, never read; its data entries were used as they were: a
    TypeError or ValueError in a resume, predict or export, or normalization by a broadcast value."""
    run, cfg = started(tmp_path)
    record = json.loads(run.record_path.read_text())
    for role in ("source", "target"):
        record["data"][role].update(STATS)
    record["data"]["target"].update(edit.get("target", {}))
    record["data"]["target"] = {k: v for k, v in record["data"]["target"].items() if v is not DELETED}
    run.record_path.write_text(json.dumps({**record, **{k: v for k, v in edit.items() if k != "target"}}))
    with pytest.raises(DmhpcError, match=f"^{re.escape(f'{run.record_path}: {message}')}"):
        run.claim(cfg, "auto", data_ids={"data.source": "aa", "data.target": "bb"})
    run.release()
    with pytest.raises(DmhpcError, match=re.escape(message)):
        run.normalization("target")


def test_a_run_json_of_an_older_dmhpc_is_read(tmp_path):
    """No format or version, no statistics: what dmhpc wrote before it recorded them."""
    run, cfg = started(tmp_path)
    run.record_path.write_text(json.dumps({"data": {"source": {"path": "s", "fingerprint": "aa"}}}))
    assert run.recorded_data() == {"source": {"path": "s", "fingerprint": "aa"}}
    run.claim(cfg, "auto", data_ids={"data.source": "aa", "data.target": "bb"})
    run.release()


def test_a_refused_start_leaves_no_folder_it_created(tmp_path):
    """Only the run directory itself went; the parents made for it stayed behind."""
    run = RunDir(tmp_path / "nest" / "a" / "b")
    run.claim(cfg_for(run.path), "auto")
    run.release()
    assert list(tmp_path.iterdir()) == []


def test_the_mmd_memory_cap_may_change_on_resume(tmp_path):
    """A world grown at an epoch's end may need loss.mmd.max_samples raised; that was refused as
    another configuration, so the run could go on with neither."""
    run, cfg = started(tmp_path)
    raised = dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, mmd=dataclasses.replace(cfg.loss.mmd, max_samples=2 * cfg.loss.mmd.max_samples)))
    claim = run.claim(raised, "auto", data_ids={"data.source": "aa", "data.target": "bb"})
    assert list(claim.changed) == ["loss.mmd.max_samples"]
    run.release()


def test_an_epoch_that_train_eval_every_skipped_is_not_evaluated(tmp_path):
    """Its record has no selection: counted as evaluated, a length ending the run there passed, and
    the run ended without an evaluation of its last steps (its final test an earlier best.pt)."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    records = [{"kind": "epoch", "epoch": 0, "step": 10, "selection": {"criterion": "im", "score": 0.1}},
               {"kind": "epoch", "epoch": 1, "step": 20}]
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run.evaluated_at(10) and not run.evaluated_at(20) and not run.evaluated_at(30)


def test_an_atomic_write_is_on_disk_before_it_is_renamed_and_the_rename_too(tmp_path, monkeypatch):
    """A durable write fsyncs its temporary file before the rename and the folder after it: without
    the first, a node crash after the rename left an empty or half file under the final name; without
    the second, the old file came back. durable=False (figures) fsyncs nothing."""
    synced = _fsynced(monkeypatch)
    atomic_write(tmp_path / "result.json", "{}")
    assert len(synced) == 2 and is_temporary(os.path.basename(synced[0]))
    assert os.path.dirname(synced[0]) == str(tmp_path)
    assert synced[1] == str(tmp_path)
    synced.clear()
    atomic_write(tmp_path / "figure.png", b"png", durable=False)
    assert synced == [] and (tmp_path / "figure.png").read_bytes() == b"png"
    assert sorted(os.listdir(tmp_path)) == ["figure.png", "result.json"]  # renamed, not copied


def test_staged_and_replaced_files_are_durable(tmp_path, monkeypatch):
    """Files committed together (synth, predict's catalog and its provenance) are fsynced when staged
    and their rename into place is fsynced in the folder."""
    from dmhpc.files import replace_durably, staged_write

    synced = _fsynced(monkeypatch)
    staged = staged_write(tmp_path / "catalog.csv", "a,b\n")
    assert synced == [str(staged)]
    replace_durably(staged, tmp_path / "catalog.csv")
    assert synced[1:] == [str(tmp_path)] and os.listdir(tmp_path) == ["catalog.csv"]


def test_a_lock_file_removed_by_its_releasing_holder_meanwhile_is_taken_afresh(tmp_path, monkeypatch):
    """A holder releasing a locked_directory removes the lock file: one that got the lock on the file it
    had opened just before held a lock on a file nobody else would open, and a third writer got in.
    The file at the path must be the one locked."""
    import fcntl

    from dmhpc import files

    lock = tmp_path / ".data.lock"
    real = fcntl.flock
    calls = []

    def released_between_open_and_lock(handle, op):
        if not calls and op & fcntl.LOCK_EX:
            lock.unlink()  # the previous holder's release
        calls.append(op)
        return real(handle, op)

    monkeypatch.setattr(files.fcntl, "flock", released_between_open_and_lock)
    handle = files.hold_lock(lock, "in use ({holder})", "writer")
    try:
        assert len(calls) == 2 and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        monkeypatch.undo()
        assert files.lock_holder(lock).startswith(f"pid {os.getpid()} on ")  # the lock at the path is held
    finally:
        handle.close()


@pytest.mark.parametrize("edit, message", [
    ({"shape": [3, 75]}, "data.target.shape: expected [C, H, W], three positive integers, got [3, 75]"),
    ({"shape": [3, 0, 75]}, "data.target.shape: expected [C, H, W], three positive integers, got [3, 0, 75]"),
    ({"fingerprint": "abcz"}, 'data.target.fingerprint: expected a hexadecimal string, got "abcz"'),
])
def test_a_run_json_with_a_short_shape_or_a_fingerprint_of_other_letters_is_refused(tmp_path, edit, message):
    """Checked only in part: a shape of two numbers or a zero side, and a fingerprint with one letter
    past f, were read as they were (the shape of the images a model takes; a fingerprint compared
    with the data's)."""
    run, cfg = started(tmp_path)
    record = json.loads(run.record_path.read_text())
    record["data"]["target"].update({**STATS, **edit})
    run.record_path.write_text(json.dumps(record))
    with pytest.raises(DmhpcError, match=f"^{re.escape(f'{run.record_path}: {message}')}$"):
        run.normalization("target")


@pytest.mark.parametrize("edit, message", [
    ({"checkpoint": {**RESULT["checkpoint"], "epoch": -1}}, "checkpoint.epoch: expected an epoch number or null, got -1"),
    ({"checkpoint": {**RESULT["checkpoint"], "epoch": 2.5}}, "checkpoint.epoch: expected an epoch number or null, got 2.5"),
    ({"source": {**RESULT["source"], "confusion": [[2, -2], [2, 2]]}}, "source.confusion: expected rows of counts"),
])
def test_a_result_with_a_negative_epoch_or_count_is_refused(tmp_path, edit, message):
    """Epochs and confusion counts are whole numbers from 0: -1 or 2.5 was read as one."""
    run = RunDir(tmp_path)
    run.write_result({**RESULT, **edit}, "best", "test")
    with pytest.raises(DmhpcError, match=re.escape(message)):
        run.read_result()


@pytest.mark.parametrize("record, message", [
    ({**EPOCH, "epoch": -1}, "epoch: expected a number from 0, got -1"),
    ({**EPOCH, "step": -3}, "step: expected a step number, got -3"),
    ({**SETUP, "world_size": 0}, "world_size: expected a number of ranks, got 0"),
])
def test_a_log_record_out_of_range_is_one_line_naming_its_key(tmp_path, record, message):
    """A negative epoch or a world of no ranks was read as a record the trainer could have written."""
    run = RunDir(tmp_path)
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in (SETUP, record, EPOCH)))
    with pytest.raises(DmhpcError, match=f"^{re.escape(f'{run.log_path} line 2: {message}')}$"):
        run.read_log()


def test_a_grid_points_run_is_labelled_with_its_method(tmp_path):
    """Titles named a grid's run by its folder alone: "seed=1" for every method's run of that seed."""
    assert RunDir(tmp_path / "study" / "noda" / "seed=1").label == "noda/seed=1"
    assert RunDir(tmp_path / "runs" / "demo").label == "demo"
    assert RunDir(tmp_path / "out" / "optim.lr=0.001,seed=2").label == "out/optim.lr=0.001,seed=2"
