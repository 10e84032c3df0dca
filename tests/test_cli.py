"""The front door: every command has help with an example, and the demo runs end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from astropy.table import Table

from tests.conftest import ROOT, clean_env
from dmhpc.run import RunDir
from dmhpc.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: dmhpc {command}" in out and "example:" in out and f"dmhpc {command}" in out.split("example:")[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_module_entry_points_are_the_cli():
    for argv in (["-m", "dmhpc", "--version"], ["-m", "dmhpc.train", "--help"]):
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--resume" in proc.stdout


def test_training_overrides_may_follow_an_option(tmp_path, capsys):
    """`dmhpc train --config C run.dir=R --overwrite train.epochs=1` was "unrecognized arguments:
    train.epochs=1" (argparse fills a positional list once), under the top-level usage."""
    config = str(ROOT / "configs" / "tiny.yaml")
    argv = ["train", "--config", config, f"run.dir={tmp_path / 'r'}", "--resume", "none", "train.epochs=2",
            "--overwrite", "train.epochs=many"]
    assert main(argv) == 1  # the last value of a key counts, as on one line
    assert "train.epochs: expected a positive integer, got \"many\"" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exit_:  # an unknown option is still argparse's error
        main(["train", "--config", config, "train.epochs=2", "--bogus", "train.epochs=3"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_options_are_not_abbreviated(tmp_path, capsys):
    """`--over` was taken for `--overwrite`: a script's abbreviation changes meaning, or stops
    working, as soon as another option shares the prefix."""
    config = str(ROOT / "configs" / "tiny.yaml")
    for argv in (["train", "--config", config, f"run.dir={tmp_path / 'r'}", "--resume", "none", "--over"],
                 ["info", str(tmp_path), "--js"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"unrecognized arguments: {argv[-1]}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_console_script_reports_errors_in_one_line(tmp_path):
    dmhpc = Path(sys.executable).parent / "dmhpc"
    proc = subprocess.run([str(dmhpc), "verify", str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("dmhpc verify: error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_a_demo_out_that_is_a_file_is_refused_as_that(tmp_path, capsys):
    """Its mark unreadable (NotADirectoryError), the file was taken for a demo's folder, and the
    error blamed the mark: "FILE/.dmhpc-demo.json: cannot write: File exists"."""
    (tmp_path / "afile").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "afile")]) == 1
    assert capsys.readouterr().err == (f"dmhpc demo: error: --out {tmp_path / 'afile'}: exists and is not a folder; "
                                       f"name a folder for the demo\n")
    assert (tmp_path / "afile").read_text() == "mine"


def test_make_clean_removes_the_demo_folder_named_and_nothing_else(tmp_path):
    """DEMO_OUT went into `rm -rf` unquoted: "my runs" removed ./my and ./runs, which holds every
    config's results; an empty one is refused, not an `rm` of nothing but the stamp. A folder the
    demo did not mark (DEMO_OUT=runs) was removed whole, and an active environment's path with a
    space removed the folder before the space."""
    from dmhpc.demo import MARK

    (tmp_path / "runs" / "keep").mkdir(parents=True)
    (tmp_path / "my runs").mkdir()
    (tmp_path / "my runs" / MARK).write_text("{}")
    env = {k: v for k, v in clean_env().items() if k != "VIRTUAL_ENV"}
    make = ["make", "-s", "-f", str(ROOT / "Makefile"), "clean"]

    def clean(*args, **extra):
        return subprocess.run([*make, *args], cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              timeout=60)

    proc = clean("DEMO_OUT=runs")
    assert proc.returncode == 2 and proc.stderr.startswith("make clean: runs is not a demo's folder (no "
                                                           ".dmhpc-demo.json in it); nothing removed\n")
    assert (tmp_path / "runs" / "keep").is_dir()
    (tmp_path / "victim").mkdir()
    proc = clean("DEMO_OUT=my runs", VIRTUAL_ENV=str(tmp_path / "victim env"))
    assert proc.returncode == 2 and "holds a space, which make cannot take" in proc.stderr, proc.stderr
    assert (tmp_path / "victim").is_dir() and (tmp_path / "my runs").is_dir()
    proc = clean("DEMO_OUT=my runs")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "victim"] and (tmp_path / "runs" / "keep").is_dir()
    proc = clean("DEMO_OUT=")
    assert proc.returncode == 2 and proc.stderr.startswith("make clean: DEMO_OUT is empty; nothing removed\n")


def test_a_demo_too_small_for_one_batch_is_refused_before_rendering(tmp_path, capsys):
    """--n-per-class 30 rendered and prepared the set, then every run was refused at its start."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-per-class", "30"]) == 1
    err = capsys.readouterr().err
    assert err == ("dmhpc demo: error: --n-per-class 30: about 42 training images per domain, fewer than one batch "
                   "of 128; give at least 92\n"), err
    assert not (tmp_path / "demo").exists()
    # --epochs and --seed as the runs take them: refused at the train step, after the render
    for flag, value, said in (("--epochs", "0", "train.epochs: expected a positive integer, got 0"),
                              ("--seed", "4294967296", "seed: expected an integer from 0 to 4294967295")):
        assert main(["demo", "--out", str(tmp_path / "demo"), flag, value]) == 1
        assert said in capsys.readouterr().err
        assert not (tmp_path / "demo").exists()
    # --workers, which synth refused after the demo had begun: a second line, "demo step failed"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--workers", "0"]) == 1
    assert capsys.readouterr().err == "dmhpc demo: error: --workers: expected a positive integer, got 0\n"
    assert not (tmp_path / "demo").exists()


def test_demo_runs_the_main_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo #1"  # (a path YAML would read as a comment: the runs' overrides are quoted)
    assert main(["demo", "--out", str(out), "--n-per-class", "100", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| no adaptation |" in printed and "| MMD + Fisher + entropy |" in printed
    for run in ("deepmerge-noda", "deepmerge-mmd-fisher-entropy"):
        result = RunDir(out / run).read_result("best", "test")
        assert result["source"]["n"] == result["target"]["n"] > 0
        assert str(out / run / "plots" / "roc_best_test.png") in printed
    assert len(Table.read(out / "noisy_test_catalog.ecsv")) == result["target"]["n"]
    assert (out / "explain" / "target_merger.png").is_file() or (out / "explain" / "target_non-merger.png").is_file()
    assert str(out / "noisy_test_catalog.ecsv") in printed
    # A second demo (the render kept, runs and catalog replaced) and one of another render: each
    # step's arguments, in test_a_second_demo_keeps_a_render_of_the_same_arguments_only.


@pytest.mark.parametrize("command", ["eval", "predict", "explain", "export"])
def test_commands_of_a_run_take_run_dir_for_torchrun(command):
    """`torchrun ... -m dmhpc eval --run R` stops in torchrun's own parser ("ambiguous option: --run
    could match --run-path, --run_path"): every command of a run takes --run-dir too."""
    import argparse

    from dmhpc.cli import build_parser

    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    (run,) = [a for a in sub.choices[command]._actions if "--run" in a.option_strings]
    assert "--run-dir" in run.option_strings and run.dest == "run"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_spelling_torchrun_passes_on(command, capsys):
    """torchrun's parser takes an option after `-m dmhpc COMMAND` for an abbreviation of its own where
    it can (`explain --n 4`: "ambiguous option: --n could match --nnodes, --nproc-per-node, ..."):
    every option of every command has a spelling it passes on untouched."""
    import argparse

    from torch.distributed.run import get_args_parser

    from dmhpc.cli import build_parser

    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    torchrun = get_args_parser()
    for action in sub.choices[command]._actions:
        spellings = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        passed = []
        for spelling in spellings:
            try:
                args = torchrun.parse_args(["--standalone", "-m", "dmhpc", command, spelling, "1"])
            except SystemExit:
                capsys.readouterr()
                continue
            passed.append(args.training_script_args == [command, spelling, "1"])
        assert not spellings or any(passed), (command, spellings)


def test_python_m_dmhpc_prints_the_version():
    """`python -m dmhpc` is the entry point the Makefile and the benchmarks use: a __main__ that
    never called the CLI exited 0 having done nothing, and `--version` said nothing of the release."""
    from dmhpc import code_version

    proc = subprocess.run([sys.executable, "-m", "dmhpc", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"dmhpc {code_version()}\n", (proc.stdout, proc.stderr)


def test_overrides_after_an_option_are_applied_after_those_before_it(tmp_path, capsys):
    """Overrides given after an option were put before the ones given first: the first value of
    a key repeated around an option counted, not the last as on one line."""
    config = str(ROOT / "configs" / "tiny.yaml")
    argv = ["train", "--config", config, "train.epochs=0", f"run.dir={tmp_path / 'r'}", "--resume", "none",
            "train.epochs=many"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert 'train.epochs: expected a positive integer, got "many"' in err and "got 0" not in err, err
    assert not (tmp_path / "r").exists()


def test_an_interrupted_command_says_so_in_one_line_and_exits_130(tmp_path, in_the_foreground):
    """Ctrl-C (SIGINT) in a command: one line "dmhpc COMMAND: interrupted" and the shell's 128 + 2,
    not a traceback, not the exit code of a failure. The command is held in a real read of its
    data set's manifest (a named pipe nobody writes to) when the signal comes."""
    import errno
    import os
    import signal
    import time

    directory = tmp_path / "ds"
    directory.mkdir()
    os.mkfifo(directory / "manifest.json")
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "info", str(directory)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # opens once `dmhpc info` is reading the pipe: inside the command
            try:
                writer = os.open(directory / "manifest.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO and proc.poll() is None and time.monotonic() < deadline, exc
                time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err == "dmhpc info: interrupted\n", (proc.returncode, err)


def test_ctrl_c_while_a_command_loads_says_so_in_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first second (torch importing, as the command's options were built) ended in
    a KeyboardInterrupt traceback through the import machinery."""
    from dmhpc import cli

    def importing():
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "export", cli.COMMANDS["export"]._replace(load=importing))
    assert cli.main(["export", "--run", "r", "--out", "o"]) == 130
    assert capsys.readouterr().err == "dmhpc export: interrupted\n"


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`dmhpc info DIR | true`: the reader leaving early ended the command in a BrokenPipeError
    traceback, or a failure's exit code (120, "Exception ignored" where output small enough to stay
    in the buffer failed at the interpreter's last flush), for output nobody wanted."""
    import os

    import numpy as np

    from dmhpc.data.shards import write_dataset

    write_dataset(np.zeros((400, 1, 2, 2), np.float32), np.arange(400) % 2, None, tmp_path / "ds", shard_size=4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: buffered
    for json_or_not in (["--json"], []):  # more than a buffer's worth of output (100 shards), and less
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        try:
            proc = subprocess.run([sys.executable, "-m", "dmhpc", "info", str(tmp_path / "ds"), *json_or_not],
                                  cwd=ROOT, env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert proc.returncode == 0 and proc.stderr == "", (json_or_not, proc.returncode, proc.stderr[-2000:])


def test_output_that_cannot_be_written_is_one_line_and_a_failure(tmp_path):
    """`dmhpc info DS > /dev/full`: a full disk under the output ended in an OSError traceback, and
    exit 120 where the output stayed in the buffer until the interpreter's last flush."""
    import os

    import numpy as np

    from dmhpc.data.shards import write_dataset

    write_dataset(np.zeros((400, 1, 2, 2), np.float32), np.arange(400) % 2, None, tmp_path / "ds", shard_size=4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for json_or_not in (["--json"], []):  # more than a buffer's worth of output, and less
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "dmhpc", "info", str(tmp_path / "ds"), *json_or_not],
                                  cwd=ROOT, env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.returncode == 1, (json_or_not, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr == "dmhpc info: error: standard output: No space left on device\n", proc.stderr[-2000:]


WRITES_TO_STDERR = """
import sys
from dmhpc import cli

def warns(args):
    print("the result", flush=True)
    print("dmhpc: warning: something", file=sys.stderr, flush=True)
    return 0

cli.COMMANDS["info"] = cli.COMMANDS["info"]._replace(load=lambda: (lambda parser: None, warns))
sys.exit(cli.main(["info"]))
"""


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_output_is_discarded_as_python_does(closed):
    """Started with standard output (or error) closed (`dmhpc ... >&-`, a daemon's descriptors), the
    first print was an AttributeError traceback on the other; Python itself discards it."""
    import os

    redirect = ">&-" if closed == "stdout" else "2>&-"
    proc = subprocess.run(["bash", "-c", f'exec "$0" -c "$1" {redirect}', sys.executable, WRITES_TO_STDERR], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout, proc.stderr) == (("", "dmhpc: warning: something\n") if closed == "stdout" else
                                          ("the result\n", "")), (proc.stdout, proc.stderr)


def test_an_error_output_that_cannot_be_written_is_said_on_standard_output(tmp_path):
    """A job's --error file on a full disk: it was said as "standard output", the healthy output sent
    to /dev/null, the message written to the stream that had failed."""
    import os

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", WRITES_TO_STDERR], cwd=ROOT, stdout=subprocess.PIPE, stderr=full,
                              text=True, timeout=120, env=dict(os.environ))
    assert (proc.returncode, proc.stdout) == (1, "the result\ndmhpc info: error: standard error: No space left on "
                                                 "device\n"), (proc.returncode, proc.stdout)


RAISES_OSERROR = """
import errno, sys
from dmhpc import cli

def fails_on_a_file(args):
    print("written so far")
    raise {error}

cli.COMMANDS["info"] = cli.COMMANDS["info"]._replace(load=lambda: (lambda parser: None, fails_on_a_file))
sys.exit(cli.main(["info"]))
"""


@pytest.mark.parametrize("error, named", [
    ('OSError(errno.ENOSPC, "No space left on device", "catalog.parquet")', "catalog.parquet"),
    ('BrokenPipeError(errno.EPIPE, "Broken pipe", "a pipe to sbatch")', "a pipe to sbatch"),
])
def test_a_commands_own_os_error_is_not_blamed_on_the_output(error, named):
    """Only an output that fails to take its data is "standard output"; a command's own OSError
    (a file it writes) keeps its traceback, which names the file, and the output written so far. A
    broken pipe of its own (to a child process, say) is a failure: it passed as a reader gone, exit 0."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", RAISES_OSERROR.format(error=error)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "written so far\n", (proc.returncode, proc.stdout)
    assert "standard output" not in proc.stderr and named in proc.stderr.splitlines()[-1], proc.stderr


GOES_ON_AFTER_THE_READER = """
import sys
from pathlib import Path
from dmhpc import cli

def works_on(args):
    for step in range(2000):  # more than a pipe's buffer, on both streams: the reader is gone by then
        print(f"step {step} " + "x" * 80)
        print(f"progress {step} " + "y" * 80, file=sys.stderr)
    Path(sys.argv[1]).write_text("the checkpoint")
    return 3

cli.COMMANDS["info"] = cli.COMMANDS["info"]._replace(load=lambda: (lambda parser: None, works_on))
sys.exit(cli.main(["info"]))
"""


def test_a_reader_gone_mid_command_lets_it_finish_with_its_own_code(tmp_path):
    """`dmhpc train ... | head -1` (or 2>&1 | tee, the tee ended): the first write after the reader
    left ended the command there, between checkpoints, with exit 0 as if it had finished."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-c", GOES_ON_AFTER_THE_READER, str(tmp_path / "done")], cwd=ROOT,
                              env=env, stdout=write, stderr=write, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 3 and (tmp_path / "done").read_text() == "the checkpoint", proc.returncode


ENDS_WITH_75 = """
import sys
from dmhpc import cli

def ends_with_75(args):
    print("the catalog so far")  # buffered: the pipe's end shows at main's flush
    return 75

cli.COMMANDS["info"] = cli.COMMANDS["info"]._replace(load=lambda: (lambda parser: None, ends_with_75))
sys.exit(cli.main(["info"]))
"""


IGNORES_AT_EXIT = """
import atexit, signal
from dmhpc import cli
import dmhpc.train.checkpoint
from dmhpc.config import STOP_SIGNAL_NAMES

atexit.register(lambda: print(sorted(n for n in STOP_SIGNAL_NAMES
                                     if signal.getsignal(signal.Signals[n]) != signal.SIG_IGN)))
cli.COMMANDS["info"] = cli.COMMANDS["info"]._replace(load=lambda: (lambda parser: None, lambda args: 75))
cli.run(["info"])
"""


def test_a_command_leaving_to_be_requeued_ignores_every_stop_signal_a_config_may_name():
    """Only the default train.signals were ignored while the process ended: a run configured to stop
    on SIGXCPU or SIGHUP, signalled again in CUDA's teardown, exited 128+n, not the requeue code."""
    proc = subprocess.run([sys.executable, "-c", IGNORES_AT_EXIT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (75, "[]"), (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_a_reader_gone_at_the_end_keeps_the_commands_own_exit_code():
    """The closed pipe found at main's last flush turned a command's own code (the requeue code 75
    of a stopped job, say) into 0, as if the command had finished."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-c", ENDS_WITH_75], cwd=ROOT, env=env, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (75, ""), proc.stderr[-2000:]


def _help_actions(command):
    import argparse

    from dmhpc.cli import build_parser

    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return parser, [a for a in parser._actions if a.option_strings and a.help]


# Options whose help states a value while argparse's default is None: the command resolves it
# (prepare's id column where a catalog is given, explain's seed of the catalog's own draw).
RESOLVED_LATER = {("prepare", "--id-column"), ("prepare", "--label-column"), ("explain", "--seed"),
                  ("explain", "--rgb")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_default_the_help_states_is_the_options_default(command):
    """An option's help that says "(default N ...)" in words kept saying N after the default was
    changed (`dmhpc demo --n-per-class` said 1000 and used another), and the formatter added the
    default a second time to a help that states it already."""
    import re

    parser, actions = _help_actions(command)
    for action in actions:
        shown = parser._get_formatter()._get_help_string(action)
        if "default" in action.help:
            assert shown == action.help, (command, action.option_strings, shown)  # said once
        # "default N", "(default: N" alike: only the parenthesised form was read, and 19 of 42 stated
        # defaults were never compared
        stated = re.search(r"\bdefault:? ([^;),]+)", action.help)
        if stated is None:
            continue
        value, default = stated.group(1).strip(), action.default
        if default is None:  # resolved later: words ("the catalog's folder"), or a value of RESOLVED_LATER
            assert " " in value or (command, action.option_strings[-1]) in RESOLVED_LATER, \
                (command, action.option_strings, value)
            continue
        try:
            same = float(value) == float(default)
        except (TypeError, ValueError):
            same = str(default).startswith(value)
        assert same, (command, action.option_strings, value, default)


def _demo_steps(out, *argv, fail_at="explain", answer=1):
    """The command lines `dmhpc demo --out OUT ARGV` runs, in order, up to the first whose name is
    `fail_at` (answered `answer`, which stops the demo): its own logic, no rendering or training."""
    from dmhpc.demo import demo_main
    from dmhpc.errors import DmhpcError
    from dmhpc.cli import build_parser

    args = build_parser("demo").parse_args(["demo", "--out", str(out), *argv])
    steps = []

    def run_command(step):
        steps.append(list(step))
        return answer if step[0] == fail_at else 0

    with pytest.raises(DmhpcError) as failed:
        demo_main(args, run_command=run_command)
    assert str(failed.value) == "demo step failed: dmhpc " + " ".join(steps[-1]) and steps[-1][0] == fail_at
    return steps


def _parsed(step):
    """One of the demo's command lines as the CLI reads it."""
    from dmhpc.cli import build_parser

    args, extra = build_parser(step[0]).parse_known_args(step)
    assert not extra, step
    return args


def test_the_demo_runs_every_step_with_its_own_settings(tmp_path):
    """What the demo hands each command: a render of --n-per-class and --seed, a split of --seed,
    both domains verified and summarized, each run trained on pristine -> noisy in its own folder
    with --epochs and --seed (its overrides read back as given, in a path YAML would cut at " #"),
    and the catalog of the noisy test images and the explanations from the adapted model."""
    from dmhpc.config import load_config
    from dmhpc.demo import RUNS

    out = tmp_path / "demo #1"
    steps = _demo_steps(out, "--n-per-class", "100", "--epochs", "3", "--seed", "4", "--workers", "1")
    assert [s[0] for s in steps] == ["synth", "prepare", "verify", "info", "verify", "info", "train", "train",
                                     "predict", "explain"]
    synth = _parsed(steps[0])
    assert (Path(synth.out), synth.n_per_class, synth.seed, synth.workers, synth.overwrite) == (out / "data", 100, 4, 1,
                                                                                          False)
    prepare = _parsed(steps[1])
    assert (Path(prepare.root), Path(prepare.out), prepare.seed, prepare.overwrite) == (out / "data", out / "shards", 4,
                                                                                        True)
    assert [s[1] for s in steps[2:6]] == [str(out / "shards" / d) for d in ("pristine", "pristine", "noisy", "noisy")]
    for step, config in zip(steps[6:8], RUNS.values()):
        train = _parsed(step)
        assert Path(train.config) == ROOT / config and train.resume == "none" and train.overwrite
        cfg = load_config(train.config, train.overrides)
        assert (Path(cfg.data.source), Path(cfg.data.target), Path(cfg.run.dir), cfg.train.epochs, cfg.seed) == (
            out / "shards" / "pristine", out / "shards" / "noisy", out / Path(config).stem, 3, 4)
    adapted = out / Path(RUNS["MMD + Fisher + entropy"]).stem
    predict, explain = _parsed(steps[8]), _parsed(steps[9])
    assert (Path(predict.run), Path(predict.data), predict.split, predict.overwrite) == (
        adapted, out / "shards" / "noisy", "test", True)
    assert Path(explain.run) == adapted and explain.overwrite


def test_a_second_demo_keeps_a_render_of_the_same_arguments_only(tmp_path):
    """A render is kept for the same --n-per-class and --seed only, and then prepared again only
    where its shards are missing or are not of it; another render (or one whose record cannot be
    read) is replaced, with --overwrite, and prepared again: a demo never trains on another demo's
    data."""
    from dmhpc.demo import MARK

    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    meta = out / "data" / "meta.json"
    meta.write_text(json.dumps({"n_per_class": 100, "seed": 4}))
    for domain in ("pristine", "noisy"):
        (out / "shards" / domain).mkdir(parents=True)
        (out / "shards" / domain / "manifest.json").write_text("{}")
    same = ["--n-per-class", "100", "--seed", "4"]
    # An earlier demo's folder, without the mark: its shards' render is not known, so they are prepared again.
    assert [s[0] for s in _demo_steps(out, *same, fail_at="verify")] == ["prepare", "verify"]
    assert json.loads((out / MARK).read_text()) == {"prepared": {"n_per_class": 100, "seed": 4}}
    assert [s[0] for s in _demo_steps(out, *same, fail_at="verify")] == ["verify"]
    (out / "shards" / "noisy" / "manifest.json").unlink()
    assert [s[0] for s in _demo_steps(out, *same, fail_at="verify")] == ["prepare", "verify"]
    (out / "shards" / "noisy" / "manifest.json").write_text("{}")  # both sets there, of the earlier render
    for other in (["--n-per-class", "120", "--seed", "4"], ["--n-per-class", "100", "--seed", "5"]):
        steps = _demo_steps(out, *other, fail_at="verify")
        assert [s[0] for s in steps] == ["synth", "prepare", "verify"]
        assert _parsed(steps[0]).overwrite and _parsed(steps[1]).seed == int(other[-1])
    meta.write_text("{not json")
    steps = _demo_steps(out, *same, fail_at="verify")
    assert [s[0] for s in steps] == ["synth", "prepare", "verify"] and _parsed(steps[0]).overwrite
    # Rendered anew, its conversion interrupted: prepare keeps the earlier render's shards until it
    # publishes, and the next demo of the same arguments trained on them (its render was "kept").
    assert [s[0] for s in _demo_steps(out, "--n-per-class", "120", "--seed", "4", fail_at="prepare")] == [
        "synth", "prepare"]
    meta.write_text(json.dumps({"n_per_class": 120, "seed": 4}))  # as the real render left it
    steps = _demo_steps(out, "--n-per-class", "120", "--seed", "4", fail_at="verify")
    assert [s[0] for s in steps] == ["prepare", "verify"]


def test_the_demo_works_only_in_a_folder_of_its_own(tmp_path, capsys):
    """Every start replaces the demo's runs (train --overwrite): `--out runs` replaced the shipped
    configs' own run folders, runs/deepmerge-noda among them, without a word."""
    from dmhpc.demo import MARK

    out = tmp_path / "runs"
    (out / "deepmerge-noda").mkdir(parents=True)
    (out / "deepmerge-noda" / "config.yaml").write_text("seed: 0\n")
    assert main(["demo", "--out", str(out), "--n-per-class", "100"]) == 1
    assert capsys.readouterr().err == (f"dmhpc demo: error: --out {out}: holds deepmerge-noda, and is not a demo's "
                                       f"folder (the demo replaces its runs at every start); give --out a new folder\n")
    (out / "deepmerge-noda" / "config.yaml").unlink()
    (out / "deepmerge-noda" / "eval").mkdir()
    (out / "results.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--n-per-class", "100"]) == 1
    assert "holds results.txt, and is not a demo's folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["deepmerge-noda", "results.txt"]  # (no mark left)
    # A render's meta.json beside a run of other data: a folder of the user's, not an unmarked demo's.
    (out / "results.txt").unlink()
    shutil.rmtree(out / "deepmerge-noda" / "eval")
    (out / "data").mkdir()
    (out / "data" / "meta.json").write_text(json.dumps({"n_per_class": 100, "seed": 0}))
    (out / "deepmerge-noda" / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "data/mine/pristine"}}))
    assert main(["demo", "--out", str(out), "--n-per-class", "100"]) == 1
    assert capsys.readouterr().err == (f"dmhpc demo: error: --out {out}: holds deepmerge-noda, a run not of the demo's "
                                       f"data ({out / 'shards'}), and is not a demo's folder (the demo replaces its "
                                       f"runs at every start); give --out a new folder\n")
    assert not (out / MARK).exists()
    # An earlier demo's run, unmarked (a dmhpc before the mark), is taken on.
    (out / "deepmerge-noda" / "config.yaml").write_text(
        yaml.safe_dump({"data": {"source": str(out / "shards" / "pristine")}}))
    steps = _demo_steps(out, fail_at="synth")
    assert [s[0] for s in steps] == ["synth"] and (out / MARK).is_file()
    # A new folder is the demo's: made and marked.
    steps = _demo_steps(tmp_path / "new", fail_at="synth")
    assert [s[0] for s in steps] == ["synth"] and (tmp_path / "new" / MARK).is_file()


def test_a_demo_renders_again_a_render_killed_as_it_replaced_its_files(tmp_path):
    """synth killed after marking its folder and before removing the old meta.json: the demo took
    the render as finished and went on to prepare, which refuses a marked folder, at every start."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text(json.dumps({"n_per_class": 1000, "seed": 0}))
    (out / "data" / ".dmhpc-incomplete").touch()
    steps = _demo_steps(out, fail_at="synth")
    assert [s[0] for s in steps] == ["synth"] and "--overwrite" in steps[0]


def test_a_demo_step_that_fails_with_any_code_stops_the_demo(tmp_path):
    """A step's non-zero exit other than 1 (argparse's 2, an interrupt's 130, the requeue code 75)
    was taken for success, and the demo went on to train on what that step had not made."""
    for code in (2, 75, 130):
        steps = _demo_steps(tmp_path / "demo", fail_at="synth", answer=code)
        assert [s[0] for s in steps] == ["synth"]


def test_a_failed_demo_step_ends_the_demo_in_one_line_naming_it(tmp_path, capsys):
    """Through the front door: the prepare step failing (its render is missing) ended the demo at
    once, exit 1, with the step's command line; no later step ran on what it had not made."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text(json.dumps({"n_per_class": 100, "seed": 0}))  # the render "kept"
    assert main(["demo", "--out", str(out), "--n-per-class", "100"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("dmhpc demo: error: demo step failed: dmhpc prepare "), captured.err
    assert "== verify" not in captured.out and "== train" not in captured.out, captured.out


def test_the_demos_size_check_is_prepares_training_split():
    """The demo refuses, before rendering, a set whose training split holds less than one batch
    of the shipped configs (128): it must agree with prepare's split at the boundary, or it refuses
    a size that trains, or renders one whose runs are refused at their start."""
    import numpy as np

    from dmhpc.data.prepare import Options
    from dmhpc.data.shards import split_order
    from dmhpc.demo import _check_size
    from dmhpc.errors import DmhpcError

    def train_rows(n_per_class):  # one image per object, as the embedded set
        return len(split_order(np.arange(2 * n_per_class), 0, Options().fractions)["train"])

    assert train_rows(91) < 128 <= train_rows(92)
    _check_size(ROOT, 92)
    with pytest.raises(DmhpcError, match="give at least 92"):
        _check_size(ROOT, 91)


def test_the_code_version_names_the_commit_of_a_checkout_of_its_own(tmp_path):
    """0.1.0 named every state of the code since the first commit: catalogs, runs and exported
    models made by different code said the same. A package outside a checkout of its own (installed,
    or inside another project's repository) is the version alone. A folder with a space in its name,
    or GIT_DIR set (a git hook, a CI job), lost the commit or named another repository's."""
    import dmhpc

    def version(root: Path, **env) -> str:
        return subprocess.run([sys.executable, "-c", "import dmhpc; print(dmhpc.code_version())"], cwd=tmp_path,
                              env={**clean_env(), "PYTHONPATH": str(root), **env}, capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()

    def git(root: Path, *args: str) -> str:
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip()

    package = Path(dmhpc.__file__).parent
    repo = tmp_path / "a repo"
    for root in (tmp_path / "plain", repo, tmp_path / "other"):
        where = root / "lib" if root.name == "other" else root
        (where / "dmhpc").mkdir(parents=True)
        shutil.copy(package / "__init__.py", where / "dmhpc" / "__init__.py")
        (root / "README").write_text("x\n")
        if root.name != "plain":
            git(root, "init", "-q")
            git(root, "add", ".")
            git(root, "commit", "-q", "-m", "first")
    assert version(tmp_path / "plain") == version(tmp_path / "other" / "lib") == dmhpc.__version__
    commit = git(repo, "rev-parse", "HEAD")[:12]
    assert version(repo) == version(repo, GIT_DIR=str(tmp_path / "other" / ".git")) == f"{dmhpc.__version__}+g{commit}"
    index = (repo / ".git" / "index").stat().st_mtime_ns
    (repo / "README").write_text("changed: not the package\n")
    assert version(repo) == f"{dmhpc.__version__}+g{commit}"
    (repo / "dmhpc" / "new.py").write_text("# added\n")
    assert version(repo) == f"{dmhpc.__version__}+g{commit}.dirty"
    assert (repo / ".git" / "index").stat().st_mtime_ns == index  # (every rank's git wrote the index)
