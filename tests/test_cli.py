"""The front door: every command has help with an example, and the demo runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from astropy.table import Table

from tests.conftest import ROOT
from dmhpc.data.shards import load_manifest
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
    # A second `make demo` replaces the demo's own runs and catalog instead of refusing them.
    assert main(["demo", "--out", str(out), "--n-per-class", "100", "--epochs", "1"]) == 0
    assert "render the embedded data set" not in capsys.readouterr().out  # the same render is kept
    # Another --n-per-class renders and prepares again: the runs never train on the first render.
    # --seed is the split's too (prepare split every demo with seed 0).
    assert main(["demo", "--out", str(out), "--n-per-class", "120", "--epochs", "1", "--seed", "4"]) == 0
    assert json.loads((out / "data" / "meta.json").read_text())["n_per_class"] == 120
    assert load_manifest(out / "shards" / "noisy")["count"] == 240 and load_manifest(out / "shards" / "noisy")["seed"] == 4
    assert RunDir(out / "deepmerge-noda").read_result("best", "test")["target"]["n"] > result["target"]["n"]


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
