"""Checkpoints (atomic, weights_only-safe, readable errors), RNG capture and restore, resume choice,
and stopping on real signals: one process, and two ranks of which only one is signalled."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BIN, ROOT, clean_env
from dmhpc.config import Config
from dmhpc.errors import DmhpcError
from dmhpc.run import _load_state
from dmhpc.run import RunDir
from dmhpc.train.checkpoint import (REQUEUE_EXIT_CODE, StopRequest, capture_rng_state, gather_rng_states,
                                    load_checkpoint, restore_rank_rng_state, restore_rng_state, save_checkpoint)


def trained_state() -> dict:
    """What the loop stores: a real model, optimizer after a step, scaler, progress, RNG, config."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.7, 0.8))
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    from dmhpc.config import config_to_dict
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "progress": {"epoch": 2, "step_in_epoch": 5, "step": 45, "best_score": -float("inf")},
            "epoch": 2, "step": 45, "rng": gather_rng_states(), "config": config_to_dict(Config())}


# --- save and load ---------------------------------------------------------------------------------

def test_round_trip_with_weights_only(tmp_path):
    state = trained_state()
    path = RunDir(tmp_path).checkpoint("last")
    save_checkpoint(path, state)
    assert path == tmp_path / "checkpoints" / "last.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left
    loaded = torch.load(path, weights_only=True)  # what anybody can do with it
    assert loaded["progress"] == state["progress"] and loaded["config"] == state["config"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    again = load_checkpoint(path)
    assert again["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # What weights_only loads besides the plain types, saved too: a shape, a parameter, a bool key.
    extra = {"shape": torch.Size([2, 3]), "weight": torch.nn.Parameter(torch.ones(2)), "flags": {True: 1}}
    save_checkpoint(path, extra)
    assert load_checkpoint(path)["shape"] == (2, 3) and load_checkpoint(path)["flags"] == {True: 1}
    assert torch.equal(again["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


Shape = namedtuple("Shape", "rows cols")


@pytest.mark.parametrize("state, where", [
    ({"rng": {"numpy": np.zeros(3)}}, "rng.numpy: a numpy.ndarray"),
    ({"metrics": [1.0, np.float64(0.5)]}, "metrics[1]: a numpy.float64"),
    ({"config": Config()}, "config: a dmhpc.config.Config"),
    ({"when": time}, "when: a builtins.module"),
    ({"groups": {(1, 2): 3}}, "groups: key (1, 2)"),
    # Subclasses of plain types, which isinstance took for them and weights_only refuses at resume.
    ({"signal": signal.SIGTERM}, "signal: a signal.Signals"),
    ({"shape": Shape(2, 3)}, f"shape: a {Shape.__module__}.Shape"),
    ({"counts": defaultdict(int, a=1)}, "counts: a collections.defaultdict"),
    ({"by_signal": {signal.SIGUSR2: 1}}, f"by_signal: key {signal.SIGUSR2!r} is a Signals"),
])
def test_save_refuses_what_weights_only_cannot_load_and_keeps_the_old_file(tmp_path, state, where):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match=re.escape(f"checkpoint state: {where}")):
        save_checkpoint(path, state)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DmhpcError, match=f"^{tmp_path / 'none.pt'}: checkpoint not found$"):
        load_checkpoint(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, trained_state())
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "garbage.pt": b"not a checkpoint at all" * 10,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DmhpcError) as info:
            load_checkpoint(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: not a readable dmhpc checkpoint"), name
        assert "\n" not in str(info.value)
        # What a resume and a relaunch check read first (memory-mapped): an empty last.pt was "mmap can
        # only be used with files saved with torch.save(_use_new_zipfile_serialization=True) ...".
        with pytest.raises(DmhpcError) as info:
            _load_state(tmp_path / name)
        said = str(info.value)
        assert "\n" not in said and "torch.save(" not in said and len(said) < 400, said
        assert said.startswith(f"{tmp_path / name}: empty (0 bytes)" if name == "empty.pt" else
                               f"{tmp_path / name}: not a readable dmhpc checkpoint (truncated, corrupt"), said
    # a pickled object (e.g. the original DeepMerge's best_model.pth.tar) is refused, not executed
    torch.save({"model": np.arange(3)}, tmp_path / "pickled.pt")
    with pytest.raises(DmhpcError, match="pickled.pt: not a readable dmhpc checkpoint"):
        load_checkpoint(tmp_path / "pickled.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(DmhpcError, match="tensor.pt: not a dmhpc checkpoint: holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")


WRITER = textwrap.dedent("""
    import sys, torch
    from dmhpc.train.checkpoint import save_checkpoint
    big = torch.randn(4_000_000)  # 16 MB: a kill lands mid-write most of the time
    for i in range(10_000):
        save_checkpoint(sys.argv[1], {"count": i, "weights": big})
        print(i, flush=True)
""")


def test_a_process_killed_while_saving_leaves_a_whole_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env=clean_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it finish a few checkpoints, then kill it somewhere in the next one
        assert proc.stdout.readline(), "writer died"
    time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    state = load_checkpoint(path)
    assert state["count"] >= 2 and state["weights"].shape == (4_000_000,)


def test_a_full_disk_is_one_line_and_the_old_checkpoint_survives(small_disk):
    path = small_disk(4) / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.zeros(250_000)})  # 1 MB
    with pytest.raises(DmhpcError) as info:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1_000_000)})  # 4 MB: does not fit beside it
    message = str(info.value)
    assert message.startswith(f"{path}: cannot write: No space left on device") and "\n" not in message
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


# --- random number generators ------------------------------------------------------------------------

def _draws():
    return (torch.rand(4).tolist(), np.random.rand(4).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(4)], random.gauss(0, 1))


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn(1)  # leave numpy with a cached Gaussian
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    expected = _draws()
    assert _draws() != expected  # the generators really moved on
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draws() == expected


def test_each_rank_gets_its_own_rng_state_back():
    torch.manual_seed(7)
    states = gather_rng_states()
    assert len(states) == 1  # a single process
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert restore_rank_rng_state(states, 0) is True
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert restore_rank_rng_state(states, 1) is False  # a rank the saved run did not have
    assert torch.equal(torch.get_rng_state(), before)
    # Two ranks' states, as gathered from a run of two: each rank takes its own, not rank 0's.
    torch.manual_seed(11)
    two = states + gather_rng_states()
    second = torch.rand(3)
    torch.manual_seed(0)
    assert restore_rank_rng_state(two, 1) is True and torch.equal(torch.rand(3), second)
    assert restore_rank_rng_state(two, 0) is True and torch.equal(torch.rand(3), expected)


# --- signals -----------------------------------------------------------------------------------------

def test_stop_request_in_process():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    with StopRequest(["SIGUSR2", "SIGTERM"]) as stop:
        assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]  # not asked for: untouched
        assert not stop.should_stop() and stop.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert stop.should_stop() and stop.signal_name == "SIGUSR2"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal_name == "SIGUSR2"  # the first one is what stopped us
    assert {s: signal.getsignal(s) for s in before} == before


def test_requeue_exit_code_is_not_a_failure_usage_or_shell_code():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2) and not 126 <= REQUEUE_EXIT_CODE <= 165
    assert 0 < REQUEUE_EXIT_CODE < 126



STARTING_RANK = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    (out / "started").touch()
    time.sleep(3)  # still importing and staging data: USR2 is ignored, as lib.sh starts every task
    got = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    for _ in range(300):  # train on; a real run would reach the time limit
        if got:
            (out / "signalled").touch()
            sys.exit(75)
        time.sleep(0.1)
""")


def _starting_rank_job(tmp_path: Path) -> tuple[dict, str]:
    """(environment, task command) of a job of one STARTING_RANK, whose scontrol notes its arguments
    in tmp_path/scontrol."""
    (tmp_path / "rank.py").write_text(STARTING_RANK)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5"}
    return env, f"""bash -c 'trap "" USR2; exec "$@"' task {sys.executable} {tmp_path}/rank.py {tmp_path}"""


def test_requeueable_launch_repeats_usr2_until_a_starting_rank_takes_it(tmp_path):
    """slurm/lib.sh: USR2 reaching the job while its ranks still start (their USR2 ignored until the
    trainer installs its handler) is said again until they take it; the ranks checkpoint and stop,
    and the job is requeued. Said once, it was lost and the job ran to its time limit."""
    env, task = _starting_rank_job(tmp_path)
    proc = subprocess.Popen(["bash", "-c", f"source {ROOT}/slurm/lib.sh && dmhpc_run_requeueable {task}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)  # to the batch shell, as --signal=B:USR2 does
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (tmp_path / "signalled").exists(), out
    assert proc.returncode == 75, out
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "5"], out


def test_requeueable_launch_takes_a_usr2_that_came_before_it(tmp_path):
    """A USR2 between the script's start and the launch (the shell busy with scontrol, the
    rendezvous) killed the batch shell with its default action: FAILED, never requeued."""
    env, task = _starting_rank_job(tmp_path)
    script = (f"source {ROOT}/slurm/lib.sh && touch {tmp_path}/sourced && "
              f"while [ ! -e {tmp_path}/go ]; do sleep 0.1; done; dmhpc_run_requeueable {task}")
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "sourced").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)  # before the launch
        time.sleep(0.5)
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert (tmp_path / "signalled").exists(), out
    assert proc.returncode == 75 and (tmp_path / "scontrol").read_text().split() == ["requeue", "5"], out


def test_a_second_usr2_after_the_ranks_stopped_still_requeues_under_set_e(tmp_path):
    """train_ddp.sh runs under set -e: the trap's kill of a launch already reaped (a second USR2,
    the preemption then the time limit) failed, and errexit ended the batch shell there with 1:
    the checkpoint saved, the job FAILED, never requeued."""
    env, _ = _starting_rank_job(tmp_path)
    task = """sh -c 'trap "exit 75" USR2; touch started; while :; do sleep 0.05; done'"""
    script = f"set -euo pipefail; source {ROOT}/slurm/lib.sh; rc=0; dmhpc_run_requeueable {task} || rc=$?; exit $rc"
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        time.sleep(0.4)  # the launch has stopped; the shell polls it once a second
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75 and (tmp_path / "scontrol").read_text().split() == ["requeue", "5"], out


SAVING_RANK = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out, got = Path(sys.argv[1]), []
    for number in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(number, lambda signum, frame: got.append(signum))
    (out / "started").touch()
    for _ in range(600):
        if got:
            time.sleep(1)  # the checkpoint being written
            (out / "saved").write_text(signal.Signals(got[0]).name)
            sys.exit(75)
        time.sleep(0.05)
    sys.exit(3)
""")


@pytest.mark.parametrize("sent, to_all, requeued", [(signal.SIGTERM, True, False), (signal.SIGUSR1, False, True)])
def test_a_sigterm_to_the_job_or_a_usr1_to_the_shell_lets_the_ranks_checkpoint(tmp_path, sent, to_all, requeued):
    """The batch shell trapped USR2 alone. SIGTERM, which Slurm sends every process of the job (a
    cancel, a preemption), and a USR1 (--signal=B:USR1@90) ended it at once with their default
    action: the job ended with it, its ranks killed while they wrote their checkpoint. SIGTERM now
    waits for them and requeues nothing (the scheduler decides); USR1 is the warning USR2 is."""
    env, _ = _starting_rank_job(tmp_path)
    (tmp_path / "rank.py").write_text(SAVING_RANK)
    task = f"""bash -c 'trap "" USR2; exec "$@"' task {sys.executable} {tmp_path}/rank.py {tmp_path}"""
    proc = subprocess.Popen(["bash", "-c", f"set -euo pipefail; source {ROOT}/slurm/lib.sh; rc=0; "
                                           f"dmhpc_run_requeueable {task} || rc=$?; exit $rc"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if to_all:
            os.killpg(proc.pid, sent)  # as Slurm signals every process of the job
        else:
            proc.send_signal(sent)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, (proc.returncode, out)
    assert (tmp_path / "saved").read_text() == ("SIGTERM" if to_all else "SIGUSR2"), out
    assert (tmp_path / "scontrol").exists() is requeued, out


@pytest.mark.parametrize("script", ["train_ddp.sh", "predict.sh"])
def test_a_usr2_while_the_spooled_script_looks_for_lib_sh_is_kept(tmp_path, script):
    """Run from slurmd's spool (no lib.sh beside it) the script asks scontrol where it was submitted
    from, before lib.sh (and its USR2 trap) is sourced: a USR2 then killed the batch shell."""
    spool, bin_dir = tmp_path / "spool", tmp_path / "bin"
    spool.mkdir()
    bin_dir.mkdir()
    (spool / script).write_bytes((ROOT / "slurm" / script).read_bytes())
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\ntouch {tmp_path}/asked; sleep 1\n'
                                      f'echo "   Command={ROOT}/slurm/{script} no/such.yaml"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5"}
    proc = subprocess.Popen(["bash", str(spool / script), "no/such.yaml"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "asked").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "no/such.yaml" in out, (proc.returncode, out)


@pytest.mark.parametrize("script", ["train_ddp.sh", "predict.sh"])
def test_the_spooled_script_finds_lib_sh_from_any_record_scontrol_gives(tmp_path, script):
    """A relative Command (sbatch --chdir: the job runs elsewhere) was looked for in the job's
    folder, a heterogeneous job's two Commands were taken as one path, and a failed scontrol ended
    the shell with scontrol's words alone: each "cannot find lib.sh", or no dmhpc line at all."""
    spool, bin_dir, elsewhere = tmp_path / "spool", tmp_path / "bin", tmp_path / "elsewhere"
    for folder in (spool, bin_dir, elsewhere):
        folder.mkdir()
    (spool / script).write_bytes((ROOT / "slurm" / script).read_bytes())
    scontrol = bin_dir / "scontrol"
    env = {**clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5",
           "SLURM_SUBMIT_DIR": str(ROOT)}

    def run(body: str) -> subprocess.CompletedProcess:
        scontrol.write_text(f"#!/bin/sh\n{body}\n")
        scontrol.chmod(0o755)
        return subprocess.run(["bash", str(spool / script), "no/such.yaml"], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=60)

    found = "no/such.yaml"  # lib.sh sourced: the script went on to refuse the missing config
    for record in (f"   Command=slurm/{script} no/such.yaml",
                   f"   Command={ROOT}/slurm/{script} no/such.yaml\n\n   Command={ROOT}/slurm/{script} no/such.yaml"):
        proc = run(f"printf '%s\\n' '{record}'")
        assert proc.returncode == 2 and found in proc.stderr and "lib.sh" not in proc.stderr, proc.stderr
    proc = run("echo 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1")
    assert proc.returncode == 2 and proc.stderr == (f"{script}: error: cannot find lib.sh: scontrol show job 5 failed: "
                                                    f"slurm_load_jobs error: Socket timed out on send/recv operation\n")


def test_ranks_that_stopped_for_a_requeue_are_requeued_though_the_shell_had_no_signal(tmp_path):
    """`scancel --signal=USR2 JOB` (no --batch) reaches the ranks only: they checkpointed and exited
    75 for a requeue, srun said 75, and the job ended FAILED. Another failure is no requeue."""
    env, _ = _starting_rank_job(tmp_path)
    for code, requeued in ((75, True), (1, False)):
        (tmp_path / "scontrol").unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/lib.sh && dmhpc_run_requeueable sh -c 'exit {code}'"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert (tmp_path / "scontrol").exists() is requeued, proc.stderr


def test_requeueable_launch_returns_the_runs_status_in_posix_mode(tmp_path):
    """POSIXLY_CORRECT exported by the submitting shell: bash forgot the status of the process it
    had already waited for, and a run that succeeded ended 127."""
    env = {**clean_env(), "POSIXLY_CORRECT": "1"}
    for code in (0, 3):
        proc = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/lib.sh && dmhpc_run_requeueable sh -c 'exit {code}'"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr


LOOP = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from dmhpc.distributed import bootstrap, shutdown
    from dmhpc.train.checkpoint import REQUEUE_EXIT_CODE, StopRequest, gather_rng_states, save_checkpoint

    run, signals = Path(sys.argv[1]), sys.argv[2].split(",")
    info = bootstrap()
    torch.manual_seed(info.rank)
    weights = torch.zeros(3)
    with StopRequest(signals) as stop:
        (run / f"pid{info.rank}").write_text(str(os.getpid()))
        step = 0
        while step < 2000:
            weights += torch.randn(3)  # the "training step"
            step += 1
            time.sleep(0.005)
            (run / f"progress{info.rank}.tmp").write_text(str(step))
            os.replace(run / f"progress{info.rank}.tmp", run / f"progress{info.rank}")
            if stop.should_stop():
                break
        else:
            sys.exit(3)  # never told to stop
    rng = gather_rng_states()
    if info.is_main:
        save_checkpoint(run / "checkpoints" / "last.pt",
                        {"step": step, "weights": weights, "rng": rng, "signal": stop.signal_name})
    (run / f"stopped{info.rank}.json").write_text(json.dumps(
        {"step": step, "signal": stop.signal_name, "next": torch.randn(3).tolist()}))
    shutdown()
    sys.exit(REQUEUE_EXIT_CODE)
""")


PEER_GONE = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from dmhpc.distributed import bootstrap
    from dmhpc.train.checkpoint import StopRequest

    out = Path(sys.argv[1])
    info = bootstrap()
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(["SIGUSR2"])
    stop.should_stop()  # both ranks join the first poll
    if info.rank == 1:
        stop.settle()
        os._exit(0)  # gone without joining the second
    stop.should_stop()  # the first poll done, the second started
    time.sleep(1)
    try:
        stop.close()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    (out / "rank0.json").write_text(json.dumps({"error": error, "restored": signal.getsignal(signal.SIGUSR2) == previous,
                                                "pending": stop._pending is not None}))
    stop.close()  # nothing left in flight: no second error
    os._exit(0)
""")


def _two_ranks(script_text: str, out: Path) -> None:
    """Run `script_text` (its first argument: `out`) as two torchrun ranks; both must exit 0."""
    if not (BIN / "torchrun").exists():
        pytest.skip(f"torchrun not found in {BIN}")
    script = out / "ranks.py"
    script.write_text(script_text)
    proc = subprocess.run([*LAUNCHERS["torchrun"], str(script), str(out)], env=clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_poll_a_gone_peer_never_joined_still_restores_the_handlers(tmp_path):
    """The poll in flight failed (the peer gone) and close() raised before restoring the signal
    handlers, with the poll still pending: every later close raised again."""
    _two_ranks(PEER_GONE, tmp_path)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] and result["restored"] and not result["pending"], result


POLL_NOW = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from dmhpc.distributed import bootstrap, shutdown
    from dmhpc.train.checkpoint import StopRequest

    out = Path(sys.argv[1])
    info = bootstrap()
    with StopRequest(["SIGUSR2"]) as stop:
        stop.should_stop()  # a poll in flight, as after a step
        before = stop.poll_now()
        stop.should_stop()
        if info.rank == 1:  # during the "evaluation", on one rank only
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.1)
        after = stop.poll_now()
        again = stop.should_stop()  # the loop's polls go on after it
    (out / f"rank{info.rank}.json").write_text(json.dumps([before, after, again]))
    shutdown()
""")


def test_poll_now_is_the_same_answer_on_every_rank_without_waiting_for_a_step(tmp_path):
    """Between epochs the loop asks at once: the asynchronous poll answers a step later, after the
    next epoch's loader start (a signal during the evaluation stopped the run one epoch late)."""
    _two_ranks(POLL_NOW, tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True, False], rank


def _wait_for_step(run: Path, rank: int, step: int, procs, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    progress = run / f"progress{rank}"
    while time.monotonic() < deadline:
        if progress.exists() and int(progress.read_text() or 0) >= step:
            return
        for p in procs:
            assert p.poll() is None, f"exited early with {p.returncode}: {p.communicate()[0]}"
        time.sleep(0.05)
    pytest.fail(f"rank {rank} did not reach step {step} in {timeout} s")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR2"])
def test_signal_mid_loop_checkpoints_and_exits_for_requeue(tmp_path, signame):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    signals = ",".join(Config().train.signals)  # the default list
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), signals], env=clean_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path, 0, 5, [proc])
    os.kill(proc.pid, getattr(signal, signame))
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    stopped = json.loads((tmp_path / "stopped0.json").read_text())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["signal"] == stopped["signal"] == signame
    assert state["step"] == stopped["step"] >= 5
    # the checkpoint's RNG state continues exactly where the process left off
    restore_rank_rng_state(state["rng"], 0)
    assert torch.randn(3).tolist() == stopped["next"]


LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"],
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_one_signalled_rank_stops_both_at_the_same_step(tmp_path, launcher):
    if not Path(LAUNCHERS[launcher][0]).exists():
        pytest.skip(f"{launcher} not found in {BIN}")
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    proc = subprocess.Popen([*LAUNCHERS[launcher], str(script), str(tmp_path), "SIGTERM,SIGUSR2"],
                            env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path, 1, 5, [proc])
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGUSR2)  # rank 1 only
    output = proc.communicate(timeout=120)[0]
    stopped = [json.loads((tmp_path / f"stopped{r}.json").read_text()) for r in (0, 1)]
    assert stopped[0]["step"] == stopped[1]["step"] >= 5, output
    assert (stopped[0]["signal"], stopped[1]["signal"]) == (None, "SIGUSR2")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == stopped[0]["step"] and len(state["rng"]) == 2
    if launcher == "mpiexec":
        assert proc.returncode == REQUEUE_EXIT_CODE, output
    else:
        # torchrun reports any non-zero worker exit as its own exit code 1 (and names 75 in its log)
        assert proc.returncode != 0 and "exitcode  : 75" in output, output
