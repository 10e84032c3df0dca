"""The trainer under faults, end to end: shared and reused run directories, kills, torn logs,
changed configurations, divergence, damaged or unusable data, full disks, and stop signals sent to
every process of the job. Real data sets, real processes, real signals, a real (tmpfs) full disk.

Each case ends as correct behaviour or as one line on stderr naming the file, key or step, a
non-zero exit, and nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY, clean_env
from dmhpc.data.shards import RowReader, shard_name, write_dataset, write_manifest
from dmhpc.errors import DmhpcError
from dmhpc.files import is_temporary
from dmhpc.run import RunDir
from dmhpc.train.checkpoint import REQUEUE_EXIT_CODE, load_checkpoint


@pytest.fixture(scope="module")
def data(make_domains):
    return make_domains(64)  # 45 training rows: 2 steps of 16 per epoch


@pytest.fixture(scope="module")
def trained_once(data, tmp_path_factory):
    """A run of one epoch, trained once for the module; a test takes its own copy (`run`)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = train(data, run, "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.fixture
def run(trained_once, tmp_path):
    """A copy of `trained_once` at TMP/run (a run resumes wherever it lies)."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def train_args(data, run, *extra, source=None, target=None):
    return ["--config", str(TINY), f"data.source={source or data / 'pristine'}",
            f"data.target={target or data / 'noisy'}", f"run.dir={run}", *extra]


def train(data, run, *extra, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmhpc.train", *train_args(data, run, *extra, **kw)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def start(data, run, *extra, log, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dmhpc.train", *train_args(data, run, *extra)], cwd=ROOT,
                            env=clean_env(), stdout=log, stderr=subprocess.STDOUT, **popen)


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if RunDir(run).log_path.exists() and sum(r.get("kind") == "step" for r in RunDir(run).read_log()) >= n:
            return
        assert proc.poll() is None, f"trainer ended early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


def one_line_error(proc, *parts) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("dmhpc train: error: "), err[-3000:]
    for part in parts:
        assert part in err, err
    return err


def refused_at_start(capsys, data, run, *extra, said: tuple, **kw) -> None:
    """one_line_error for a refusal before training, in this process: no child's start-up (seconds)."""
    from dmhpc.cli import main

    capsys.readouterr()
    code = main(["train", *train_args(data, run, *extra, **kw)])
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), *said)


# --- the run directory --------------------------------------------------------------------------

def test_a_second_trainer_is_refused_and_a_killed_ones_run_resumes(data, tmp_path):
    """Both used to exit 0 with interleaved epochs and best.pt and last.pt from different seeds."""
    run = tmp_path / "run"
    with open(tmp_path / "a.log", "w") as log:
        first = start(data, run, "train.epochs=40", "train.log_every=1", log=log)
        try:
            wait_for_steps(run, 2, first)
            second = train(data, run, "train.epochs=40", "seed=7")
            one_line_error(second, f"run.dir {run}: in use by another dmhpc trainer or eval (pid {first.pid} on ")
            assert first.poll() is None  # the first goes on, untouched
            wait_for_steps(run, 4, first)
        finally:
            first.kill()  # SIGKILL: no handler runs, the lock file stays, the kernel drops the lock
            first.wait()
    # What a killed job leaves at worst: a torn last log line and a half-written checkpoint.
    with RunDir(run).log_path.open("a") as f:
        f.write('{"kind": "step", "step": 99, "loss": {"tot')
    orphan = RunDir(run).checkpoint_dir / ".last.pt.x1y2z3w4.tmp"
    orphan.write_bytes(b"\0" * 100_000)
    # The SIGKILL may have met a write of its own (a checkpoint, a figure): its temporary is an orphan too.
    orphans = [p for d in (run, run / "checkpoints", run / "eval", run / "plots") if d.is_dir() for p in d.iterdir()
               if is_temporary(p.name)]
    progress = load_checkpoint(RunDir(run).checkpoint("last"))["progress"]
    trained = progress["epoch"] + (progress["step_in_epoch"] > 0)
    if trained > 1:  # a requeue may shorten the run, but not below what it trained: config.yaml would lie
        config = RunDir(run).config_path.read_bytes()
        refused = train(data, run, f"train.epochs={trained - 1}")
        one_line_error(refused, f"train.epochs {trained - 1}: the run has trained {trained} epochs already")
        assert RunDir(run).config_path.read_bytes() == config and orphan.exists()  # nothing written
    length = max(trained, 6)
    resumed = train(data, run, f"train.epochs={length}", "train.log_every=1")  # a requeue may shorten the run
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and not orphan.exists()
    records = RunDir(run).read_log()
    setups = [r for r in records if r["kind"] == "setup"]
    assert setups[-1]["orphans_removed"] == len(orphans) and setups[-1]["changed"] == {"train.epochs": [40, length]}
    assert not any(p.exists() for p in orphans)
    # Every epoch once, in order, and every step once.
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert epochs == list(range(length))
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 12


def test_a_changed_configuration_is_refused_before_anything_is_written(data, run, capsys):
    def files():  # all but the lock, whose holder note each start rewrites
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    for change, part in (("model.name=deepmerge", 'model.name "deepmerge2" -> "deepmerge"'),
                         ("train.batch_size=8", "train.batch_size 16 -> 8"), ("seed=3", "seed 1 -> 3"),
                         ("train.amp=bf16", 'train.amp "none" -> "bf16"')):
        refused_at_start(capsys, data, run, "train.epochs=2", change,
                         said=[f"{run / 'checkpoints' / 'last.pt'}: the run was trained with another configuration: {part}"])
    assert files() == before
    from dmhpc.cli import main

    assert main(["eval", "--run", str(run)]) == 0  # the run is still whole
    # config.yaml edited by hand to the new value: the checkpoint still says what it was trained with.
    text = (run / "config.yaml").read_text()
    assert "  lr: 0.001\n" in text
    (run / "config.yaml").write_text(text.replace("  lr: 0.001\n", "  lr: 0.002\n"))
    refused_at_start(capsys, data, run, "train.epochs=2", "optim.lr=0.002",
                     said=[f"{run / 'checkpoints' / 'last.pt'}: the run was trained with another configuration: "
                           f"optim.lr 0.001 -> 0.002"])


@pytest.mark.parametrize("field, value, said", [
    ("epoch", "1", "progress.epoch '1': expected a whole number >= 0"),  # a TypeError traceback
    ("best_score", "hi", "progress.best_score 'hi': expected a number"),  # a TypeError after a whole epoch
    # Said as the user's data.loader, set to auto: "data.loader 'foo': expected one of auto, ...".
    ("loader", "foo", "progress.loader 'foo': expected one of gpu-resident, dali, torch"),
    ("fp16_streaks", [3, -1], "progress.fp16_streaks [3, -1]: expected a list of whole numbers >= 0"),
    ("step_in_epoch", 50, "progress.step_in_epoch 50 is past the 2 steps of an epoch of this run")])  # ended early
def test_a_checkpoint_with_an_edited_progress_is_one_line(data, run, capsys, field, value, said):
    path = RunDir(run).checkpoint("last")
    state = load_checkpoint(path)
    state["progress"][field] = value
    torch.save(state, path)
    refused_at_start(capsys, data, run, "train.epochs=2", said=[str(path), said])


def test_a_length_ending_the_run_at_a_checkpoint_never_evaluated_is_refused(data, run, capsys):
    """A resume whose new length ended the run where a mid-epoch checkpoint stood (train.max_steps set
    to the step a requeue's line named) trained nothing and never evaluated those steps: the final
    test took an earlier best.pt, or failed for want of one, and so did every resume after."""
    path = RunDir(run).checkpoint("last")
    state = load_checkpoint(path)
    state["progress"].update(epoch=1, step_in_epoch=1, step=3)  # stopped after epoch 1's first step
    torch.save(state, path)
    (run / "eval" / "best_test.json").unlink()  # (a run stopped there has not finished)
    refused_at_start(capsys, data, run, "train.epochs=2", "train.max_steps=3",
                     said=["train.max_steps 3: the run would end at step 3, where its last checkpoint stands, which "
                           "was never evaluated"])
    # A launcher about to submit it again refuses it too (the job would fail at its start).
    from dmhpc.config import load_config

    for length in (["train.max_steps=3"], ["train.epochs=2", "train.max_steps=3"]):
        with pytest.raises(DmhpcError, match=f"{run}: train.max_steps 3: the run would end at step 3"):
            RunDir(run).check_relaunch(load_config(TINY, train_args(data, run, *length)[2:]), {})
    RunDir(run).check_relaunch(load_config(TINY, train_args(data, run, "train.max_steps=4")[2:]), {})
    # Where the run ended and was evaluated, the same length is the finished run, tested again.
    state["progress"].update(epoch=1, step_in_epoch=0, step=2)
    torch.save(state, path)
    from dmhpc.cli import main

    assert main(["train", *train_args(data, run, "train.epochs=1")]) == 0


def test_a_checkpoint_without_a_world_size_rolls_an_epoch_it_ended_over(data, run):
    """A checkpoint of dmhpc before the world size was recorded counts its epoch's steps in a world
    that may not be this one: a step_in_epoch at or past the end is that epoch done (it was, before
    the edited-checkpoint refusal above), not an edit."""
    path = RunDir(run).checkpoint("last")
    state = load_checkpoint(path)
    state["progress"].update(world_size=0, loader="", step_in_epoch=50, epoch=0)  # as dmhpc before them wrote
    torch.save(state, path)
    resumed = train(data, run, "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epochs = [r["epoch"] for r in RunDir(run).read_log() if r.get("kind") == "epoch"]
    assert epochs == [0, 1]  # epoch 0 taken as done, epoch 1 trained


def test_resume_none_on_an_existing_run_needs_overwrite(data, run, capsys):
    refused_at_start(capsys, data, run, "train.epochs=1", "--resume", "none", said=["already holds a run"])
    replaced = train(data, run, "train.epochs=1", "seed=4", "--resume", "none", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert RunDir(run).config().seed == 4


def test_a_checkpoint_of_another_run_of_the_same_configuration_is_refused(data, run, tmp_path, capsys):
    """Another run's last.pt, copied in, was resumed as the run's own: its log and best.pt were
    then of two runs. Its best.pt was evaluated and exported as the run's."""
    from dmhpc.cli import main

    mine = RunDir(run)
    run_id = json.loads(mine.record_path.read_text())["run_id"]
    assert load_checkpoint(mine.checkpoint("last"))["run_id"] == run_id
    assert load_checkpoint(mine.checkpoint("best"))["run_id"] == run_id
    other = tmp_path / "other"
    assert main(["train", *train_args(data, other, "train.epochs=1")]) == 0
    assert json.loads(RunDir(other).record_path.read_text())["run_id"] != run_id
    originals = {name: mine.checkpoint(name).read_bytes() for name in ("last", "best")}
    shutil.copyfile(RunDir(other).checkpoint("last"), mine.checkpoint("last"))
    refused_at_start(capsys, data, run, "train.epochs=2",
                     said=[f"{mine.checkpoint('last')}: written by another run (run id", "copied in from elsewhere?"])
    with pytest.raises(DmhpcError, match="last.pt: written by another run"):
        mine.check_relaunch(mine.config(), {})
    mine.checkpoint("last").write_bytes(originals["last"])
    shutil.copyfile(RunDir(other).checkpoint("best"), mine.checkpoint("best"))
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 1
    assert "best.pt: written by another run" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 1
    assert "best.pt: written by another run" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    written = {p: p.read_bytes() for p in (mine.config_path, mine.record_path, mine.result_path("best", "test"))}
    refused_at_start(capsys, data, run, "train.epochs=2", said=["best.pt: written by another run"])
    assert {p: p.read_bytes() for p in written} == written  # refused before start() wrote a thing
    with pytest.raises(DmhpcError, match="best.pt: written by another run"):  # beside the run's own last.pt
        mine.check_relaunch(mine.config(), {})
    mine.checkpoint("best").write_bytes(originals["best"])
    assert main(["train", *train_args(data, run, "train.epochs=2")]) == 0  # its own, resumed: the same run
    assert json.loads(mine.record_path.read_text())["run_id"] == run_id
    assert load_checkpoint(mine.checkpoint("last"))["run_id"] == run_id


def test_run_dir_that_is_not_a_run(data, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "config.yaml").write_text("chapters: 5\n")
    one_line_error(train(data, mine, "train.epochs=1"), "thesis is not a dmhpc run")
    assert os.listdir(mine) == ["config.yaml"] and (mine / "config.yaml").read_text() == "chapters: 5\n"


# --- divergence -----------------------------------------------------------------------------------

def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """SGD at lr 100 used to write 174,421 non-finite weights into last.pt, then crash in scikit-learn."""
    run = tmp_path / "run"
    args = ("optim.name=sgd", "optim.lr=100", "train.checkpoint_every=1", "train.epochs=5")
    err = one_line_error(train(data, run, *args), "error: step ")
    assert "non-finite weights" in err or "not finite (NaN or Inf)" in err
    assert "the last good checkpoint is kept" in err
    last = load_checkpoint(RunDir(run).checkpoint("last"))
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not list(RunDir(run).checkpoint_dir.glob(".*.tmp"))
    # The log ends with it (a tuner tells the trial's values failed it, not the setup).
    last_record = RunDir(run).read_log()[-1]
    assert last_record["kind"] == "diverged" and last_record["error"] == err.split(": error: ")[1]
    again = train(data, run, *args)  # a resume meets the same divergence, and says so the same way
    assert one_line_error(again).split(": error: ")[1] == err.split(": error: ")[1]
    assert [r["kind"] for r in RunDir(run).read_log()].count("diverged") == 1  # the first dropped with the resume


def test_a_nonfinite_loss_term_is_named_with_its_step():
    from dmhpc.distributed import DistInfo
    from dmhpc.errors import DmhpcError
    from dmhpc.train.meter import EpochMeter

    class State:
        def nonfinite_tensors(self):
            return []

    meter = EpochMeter(torch.device("cpu"))
    logits = torch.zeros(4, 2)
    y = torch.zeros(2, dtype=torch.long)
    for step, transfer in ((1, 0.5), (2, float("nan")), (3, float("inf"))):
        terms = {"classifier": torch.tensor(0.7), "transfer": torch.tensor(transfer), "total": torch.tensor(transfer)}
        meter.add(step, terms, {"logits": logits}, y, y)
    dist = DistInfo(0, 0, 1, torch.device("cpu"), None)
    with pytest.raises(DmhpcError, match=r"^step 2: loss terms total, transfer not finite \(NaN or Inf\); "
                                         r"training stopped at step 3 without writing it"):
        meter.check_finite(State(), dist, 3)


def test_a_loss_that_stays_nan_under_fp16_is_named_with_its_step():
    """Under fp16 a non-finite loss is the gradient scaler's to skip, so it was never reported: a loss
    NaN from step 3 on skipped every later step, and the run "finished" (exit 0) untrained. A few
    skips in a row are the scaler finding its scale; 16 in a row stop the run."""
    from dmhpc.distributed import DistInfo
    from dmhpc.errors import DmhpcError
    from dmhpc.train.meter import FP16_SKIPPED_IN_A_ROW, EpochMeter

    class State:
        def nonfinite_tensors(self):
            return []

    dist = DistInfo(0, 0, 1, torch.device("cpu"), None)
    logits, y = torch.zeros(4, 2), torch.zeros(2, dtype=torch.long)

    def add(meter, step, value):
        meter.add(step, {"total": torch.tensor(value)}, {"logits": logits}, y, y)

    meter = EpochMeter(torch.device("cpu"), watch_loss=False)
    for step in range(1, FP16_SKIPPED_IN_A_ROW):  # 15 overflows, then a good step: the scaler's business
        add(meter, step, float("inf"))
    add(meter, FP16_SKIPPED_IN_A_ROW, 0.5)
    meter.check_finite(State(), dist, FP16_SKIPPED_IN_A_ROW)
    for step in range(17, 27):
        add(meter, step, float("nan"))
    meter.check_finite(State(), dist, 26)  # (the loop checks at every epoch's end)
    meter = EpochMeter(torch.device("cpu"), watch_loss=False, streak=meter.streak)  # the next epoch
    for step in range(27, 40):
        add(meter, step, float("nan"))
    with pytest.raises(DmhpcError, match=r"^step 32: the loss was not finite \(NaN or Inf\) for 16 steps in a row "
                                         r"under train.amp=fp16; training "
                                         r"stopped at step 39 without writing it"):
        meter.check_finite(State(), dist, 39)


def test_a_step_fp16_skipped_is_left_out_of_the_epochs_means_and_train_metrics():
    """Under fp16 the scaler skips a step whose loss overflowed, and training goes on; the step's
    NaN was still summed: the epoch's logged loss terms, and with its infinite logits every train
    metric of both domains, read NaN, a divergence that did not happen."""
    from dmhpc.distributed import DistInfo
    from dmhpc.train.meter import EpochMeter

    dist = DistInfo(0, 0, 1, torch.device("cpu"), None)
    y = torch.tensor([0, 1])
    good = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]])  # right on both domains
    meter = EpochMeter(torch.device("cpu"), watch_loss=False)
    for step, value in enumerate([0.5, float("nan"), 0.25, 0.75], start=1):
        logits = good if value == value else torch.full((4, 2), float("inf"))
        meter.add(step, {"classifier": torch.tensor(value), "total": torch.tensor(value)}, {"logits": logits}, y, y)
    record = meter.summary(dist)
    assert record["loss"] == {"classifier": 0.5, "total": 0.5}
    assert record["nonfinite_loss_steps"] == 1
    for domain in ("source", "target"):
        train = record[domain]["train"]
        assert train["n"] == 6 and "nonfinite" not in train and train["accuracy"] == 1.0, train


def _fp16_meter_rank(rank: int, init: str, out: str) -> None:
    """One rank of the test below: three fp16 steps, the second overflowing on rank 1 only."""
    import torch.distributed as dist

    from dmhpc.distributed import DistInfo
    from dmhpc.train.meter import EpochMeter

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        y = torch.tensor([0, 1])
        good = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]])  # right on both domains
        meter = EpochMeter(torch.device("cpu"), watch_loss=False)
        for step, value in enumerate([0.5, float("inf") if rank == 1 else 9.0, 0.25], start=1):
            meter.add(step, {"total": torch.tensor(value)}, {"logits": good if step != 2 else -good,
                                                             "domain_logits": torch.tensor([1.0, 1.0, -1.0, -1.0])},
                      y, y)
        record = meter.summary(DistInfo(rank, rank, 2, torch.device("cpu"), None))
        Path(out, f"rank{rank}.json").write_text(json.dumps(record, default=str))
    finally:
        dist.destroy_process_group()


def test_a_step_fp16_skipped_on_one_rank_is_left_out_on_every_rank(tmp_path):
    """The scaler skips a step whose gradients overflowed on any rank (they are averaged), but each
    rank left out only the steps its own loss overflowed: rank 0 counted step 2 as trained, its loss
    and its (wrong) predictions in the epoch's means and train metrics."""
    import torch.multiprocessing as mp

    mp.spawn(_fp16_meter_rank, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["loss"] == {"total": pytest.approx(0.375)} and record["nonfinite_loss_steps"] == 1, record
        assert record["source"]["train"]["accuracy"] == 1.0 and record["source"]["train"]["n"] == 8, record
        assert record["discriminator_accuracy"] == 1.0


def _fp16_turns_rank(rank: int, init: str, out: str) -> None:
    """One rank of the test below: 20 fp16 steps, overflowing on rank (step + rank) % 2 == 0."""
    import torch.distributed as dist

    from dmhpc.distributed import DistInfo
    from dmhpc.train.meter import EpochMeter

    class State:
        def nonfinite_tensors(self):
            return []

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        info, y, logits = DistInfo(rank, rank, 2, torch.device("cpu"), None), torch.tensor([0, 1]), torch.zeros(4, 2)
        meter = EpochMeter(torch.device("cpu"), watch_loss=False)
        said = "finished"
        for step in range(1, 21):
            meter.add(step, {"total": torch.tensor(math.inf if (step + rank) % 2 == 0 else 0.5)}, {"logits": logits},
                      y, y)
            if step % 5 == 0:
                try:
                    meter.check_finite(State(), info, step)
                except DmhpcError as exc:
                    said = str(exc)
                    break
        Path(out, f"rank{rank}.txt").write_text(said)
    finally:
        dist.destroy_process_group()


def test_fp16_overflows_taking_turns_on_the_ranks_stop_the_run():
    """The streak was counted per rank, but the scaler skips a step that overflowed on any rank: two
    ranks overflowing in turn had every step skipped, no rank's streak passed 1, and the run
    "finished" (exit 0) untrained."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fp16_turns_rank, args=(f"file://{tmp}/store", tmp), nprocs=2)
        said = [Path(tmp, f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("step 16: the loss was not finite (NaN or Inf) for 16 steps in "
                                                     "a row under train.amp=fp16; training stopped at step 20"), said


def test_a_reader_worker_killed_during_training_is_one_line(data, tmp_path):
    """The kernel killing a DataLoader worker (out of memory) ended the trainer in a 66-line
    traceback from wherever the main process was (torch raises it from its SIGCHLD handler)."""
    run = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        proc = start(data, run, "train.epochs=50", "train.log_every=1", "data.loader=torch", "data.num_workers=2",
                     log=log)
        wait_for_steps(run, 2, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
        assert proc.wait(timeout=120) == 1
    err = [line for line in (tmp_path / "log").read_text().splitlines() if line.strip()]
    # torch words it "(pid N) is killed by signal" or "(pid(s) N) exited unexpectedly" by timing
    assert err[-1].startswith("dmhpc train: error: a data reader worker process died (DataLoader worker (pid"), err
    assert "Traceback" not in "\n".join(err), err[-40:]


# --- data the trainer can trust ----------------------------------------------------------------

def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_data_set_prepared_again_under_a_training_run_is_one_line(data, tmp_path):
    """prepare --overwrite (another seed) into the target's folder while a run trained on it: every
    evaluation, and the final test, read the new manifest's splits, whose test split held images
    the run had trained on; nothing was said."""
    target = copy_dataset(data / "noisy", tmp_path / "noisy")
    with RowReader(target) as reader:
        rows = reader.read(0, len(reader))
    order = np.argsort(rows["index"])
    run = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(data, run, "train.epochs=200", "train.log_every=1", f"data.target={target}", log=log)
        wait_for_steps(run, 1, proc)
        write_dataset(rows["images"][order], rows["labels"][order], rows["objects"][order], target, seed=9,
                      shard_size=16, overwrite=True)
        assert proc.wait(timeout=120) == 1
    err = (tmp_path / "log.txt").read_text().strip().splitlines()[-1]
    assert err.startswith(f"dmhpc train: error: {target}") and "prepared again since" in err, err


def test_a_damaged_shard_is_refused_unless_checksums_are_skipped(data, tmp_path, capsys):
    """100,000 sign-flipped floats in a shard used to train silently."""
    damaged = copy_dataset(data / "pristine", tmp_path / "pristine")
    with h5py.File(damaged / shard_name(0), "r+") as f:
        f["images"][:8] = -f["images"][:8]  # 8 x 3 x 75 x 75 = 135,000 floats
    run = tmp_path / "run"
    refused_at_start(capsys, data, run, "train.epochs=1", source=damaged,
                     said=[f"data.source {damaged}: 1 problem: shard-00000.h5 checksum mismatch", "dmhpc verify"])
    assert not run.exists()  # refused before anything was written
    ok = train(data, run, "train.epochs=1", "data.verify=structure", source=damaged)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_manifest_split_lists_are_checked(data, tmp_path, capsys):
    edited = copy_dataset(data / "noisy", tmp_path / "noisy")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["splits"]["val"][0] = manifest["splits"]["train"][0]  # a training image also validated on
    (edited / "manifest.json").write_text(json.dumps(manifest))
    refused_at_start(capsys, data, tmp_path / "run", "train.epochs=1", target=edited,
                     said=[f"data.target: {edited / 'manifest.json'}: edited since prepare wrote it"])
    write_manifest(edited, manifest)  # sealed again (by a tool): the split lists are still checked
    refused_at_start(capsys, data, tmp_path / "run", "train.epochs=1", target=edited,
                     said=[f"data.target {edited}: manifest.json: splits: index", "is in both train and val"])


def write(root: Path, name: str, images, labels, **kw) -> Path:
    write_dataset(images.astype(np.float32), labels, None, root / name, shard_size=64, **kw)
    return root / name


@pytest.mark.parametrize("case", ["empty val", "empty test", "16x16", "3 classes", "one class"])
def test_what_would_fail_later_is_refused_at_start(data, tmp_path, capsys, case):
    rng = np.random.default_rng(0)
    n = 64
    images, labels = rng.normal(size=(n, 3, 75, 75)), np.arange(n) % 2
    if case == "empty val":
        src = write(tmp_path, "d", images, labels, fractions=(0.8, 0.0, 0.2))
        expected = "the val split is empty (checkpoints are chosen on it)"
    elif case == "empty test":
        src = write(tmp_path, "d", images, labels, fractions=(0.8, 0.2, 0.0))
        expected = "the test split is empty"
    elif case == "16x16":
        src = write(tmp_path, "d", rng.normal(size=(n, 3, 16, 16)), labels)
        expected = "images 3x16x16 do not fit model.name deepmerge2"
    elif case == "3 classes":
        src = write(tmp_path, "d", images, np.arange(n) % 3, num_classes=3)
        expected = "3 classes; the models here tell 2 apart"
    else:
        src = write(tmp_path, "d", images, np.zeros(n, int))
        expected = "the training split holds class 0 only"
    run = tmp_path / "run"
    target = src if case == "16x16" else None
    refused_at_start(capsys, data, run, "train.epochs=1", source=src, target=target, said=[expected])
    assert not run.exists()


def test_a_warmup_as_long_as_the_run_is_refused_at_start(data, tmp_path, capsys):
    """The rate climbed throughout and never reached optim.lr (0.6 of it at the last step of a
    600-step run with a 1000-step warm-up), nor decayed to min_lr: a run at a fraction of its rate."""
    run = tmp_path / "run"
    refused_at_start(capsys, data, run, "train.epochs=1", "optim.schedule=warmup-cosine", "optim.warmup_steps=2",
                     said=["optim.warmup_steps 2: the run has 2 steps, so its learning rate would never reach "
                           "optim.lr; lower it, or train longer"])
    assert not run.exists()


def test_a_log_that_cannot_be_opened_ends_the_run_with_its_loader_closed(data, tmp_path, capsys, monkeypatch):
    """The loader was closed on a refused start and after the loop, not between: a full disk at the
    log's opening left its resident data and reader workers held in a process that goes on (a tune
    trial, a notebook)."""
    from dmhpc.data import loaders
    from dmhpc.train import loop

    closed, close = [], loaders.TrainLoader.close
    monkeypatch.setattr(loaders.TrainLoader, "close", lambda self: (closed.append(self.kind), close(self))[1])

    def full_disk(*args, **kwargs):
        raise DmhpcError("metrics.jsonl: cannot write: No space left on device (disk full or over quota)")

    monkeypatch.setattr(loop, "MetricLog", full_disk)
    refused_at_start(capsys, data, tmp_path / "run", "train.epochs=1", said=["metrics.jsonl: cannot write"])
    assert len(closed) == 1, closed


def test_a_seed_beyond_numpy_is_a_config_error(data, tmp_path, capsys):
    refused_at_start(capsys, data, tmp_path / "run", "seed=4294967296",
                     said=["command line: seed: expected an integer from 0 to 4294967295, got 4294967296"])


# --- a full disk ----------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_survives(data, small_disk):
    run = small_disk(5) / "run"  # checkpoints of the tiny model are 2.2 MB: a third (the temporary file) does not fit
    proc = train(data, run, "train.epochs=4")
    err = one_line_error(proc, "cannot write: No space left on device")
    assert "; nothing written" in err
    assert load_checkpoint(RunDir(run).checkpoint("last"))["step"] == 2  # epoch 0's, whole
    assert not [p for p in run.rglob(".*.tmp")]


def test_a_full_disk_while_logging_a_step_under_two_ranks_is_every_ranks_one_line(data, small_disk, tmp_path):
    """Rank 0's step records were written outside the ranks' agreement: on a full disk rank 0 ended
    with its line while rank 1 waited in the next collective and died in a gloo traceback."""
    disk = small_disk(8)
    run = disk / "run"
    # batch 1 per rank: 22 steps per epoch, a record after each, no checkpoint before the epoch's end
    args = train_args(data, run, "train.epochs=50", "train.batch_size=1", "train.log_every=1")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                                 "-m", "dmhpc.train", *args], cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                stderr=log)
        try:
            wait_for_steps(run, 2, proc)
            with open(disk / "filler", "wb") as filler:  # what another job's output does to a shared disk
                with pytest.raises(OSError, match="No space left"):
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = (tmp_path / "log.txt").read_text()
    # The ranks' tracebacks come as "[rankN]: ..." lines; torchrun's own report of the failed ranks
    # follows the ranks' lines whatever they said. TensorBoard's writer thread fails first here.
    assert code != 0 and "[rank" not in err and "Exception in thread" not in err, err[-3000:]
    # One line from each rank (written at the same moment, they may share a line of the stream).
    assert err.count("dmhpc train: error: ") == 2, err[-3000:]
    assert err.count(": No space left on device") == 2, err[-3000:]  # the log or the events folder


def test_an_events_folder_that_cannot_be_opened_is_every_ranks_one_line(data, run):
    """Rank 0 opened TensorBoard's writer on its own: its OSError was a traceback, and rank 1 died
    in a gloo traceback at the next collective. Here the folder is a file (a hand-edited run)."""
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("not a folder")
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                           "-m", "dmhpc.train", *train_args(data, run, "train.epochs=2")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "[rank" not in proc.stderr, proc.stderr[-3000:]
    # One line from each rank (written at the same moment, they may share a line of the stream).
    assert proc.stderr.count("dmhpc train: error: ") == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"dmhpc train: error: {run / 'tensorboard'}: cannot write: File exists") == 2, \
        proc.stderr[-3000:]


# --- preemption: every stop signal, to the trainer or to its whole process group ------------------

@pytest.mark.parametrize("loader, signame, target", [
    *[(loader, sig, "group") for loader in ("torch", "dali", "gpu-resident") for sig in ("SIGTERM", "SIGUSR1", "SIGUSR2")],
    *[(loader, "SIGTERM", "main") for loader in ("torch", "dali", "gpu-resident")],
])
def test_every_stop_signal_checkpoints_and_requeues(data, tmp_path, loader, signame, target):
    """SIGTERM to the group used to kill the torch loader's workers: 'DataLoader worker exited
    unexpectedly', no checkpoint."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    run = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(data, run, "train.epochs=200", "train.log_every=1", f"data.loader={loader}",
                     "data.num_workers=2", log=log, start_new_session=True)
        try:
            wait_for_steps(run, 2, proc)
            sig = getattr(signal, signame)
            os.killpg(proc.pid, sig) if target == "group" else os.kill(proc.pid, sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = (tmp_path / "log.txt").read_text()
    assert code == REQUEUE_EXIT_CODE, output[-3000:]
    assert f"{signame}: checkpoint written at step" in output
    assert load_checkpoint(RunDir(run).checkpoint("last"))["step"] >= 2


def test_a_refusal_under_two_ranks_stops_both_without_a_hang(data, tmp_path):
    """The shards are checked half by each rank; the problem found on one is raised on both."""
    damaged = copy_dataset(data / "pristine", tmp_path / "pristine")
    with h5py.File(damaged / shard_name(0), "r+") as f:
        f["images"][:2] = -f["images"][:2]
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                           "-m", "dmhpc.train", *train_args(data, tmp_path / "run", "train.epochs=1", source=damaged)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    # One line from each rank (written at the same moment, they may share a line of the stream).
    assert proc.stderr.count("dmhpc train: error: ") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("1 problem: shard-00000.h5 checksum mismatch") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_between_logged_steps_never_writes_diverged_weights(data, tmp_path, capsys):
    """A checkpoint every step between the logged steps' checks wrote the diverged weights into
    last.pt: the run failed at the epoch's end and its resume started from NaN."""
    from dmhpc.cli import main

    run = tmp_path / "run"
    code = main(["train", *train_args(data, run, "optim.name=sgd", "optim.lr=100", "train.checkpoint_every=1",
                                      "train.log_every=1000", "train.batch_size=4", "train.epochs=1")])
    err = one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "error: step ")
    assert "non-finite weights" in err or "not finite (NaN or Inf)" in err
    last = load_checkpoint(RunDir(run).checkpoint("last"))
    assert last["step"] >= 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
