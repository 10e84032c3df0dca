"""Configuration schema: loading, base inheritance, overrides, validation errors, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY
from dmhpc.config import (Config, changed_keys, config_from_dict, config_to_dict, load_config, parse_override,
                          save_config)
from dmhpc.errors import DmhpcError

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(DmhpcError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --- shipped configs -------------------------------------------------------------------------------

def test_the_required_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert names >= {"deepmerge-noda", "deepmerge-mmd-fisher-entropy", "deepmerge-dann-fisher-entropy",
                     "resnet18-mmd-fisher", "resnet18-dann", "deepmerge-coral", "tiny"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.run.dir.startswith("runs/")
    # The target oracle (the study's upper bound) trains on the labelled target domain itself.
    oracle = cfg.select.criterion == "oracle-target-acc"
    assert cfg.data.source == f"data/embedded/shards/{'noisy' if oracle else 'pristine'}"
    assert cfg.data.target == "data/embedded/shards/noisy"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_carry_the_original_weights():
    cfg = load_config(ROOT / "configs" / "deepmerge-mmd-fisher-entropy.yaml")
    assert (cfg.model.name, cfg.loss.transfer, cfg.loss.transfer_weight) == ("deepmerge2", "mmd", 1.0)
    assert (cfg.loss.entropy_weight, cfg.loss.fisher.weight) == (0.05, 1.0)
    assert (cfg.loss.fisher.inter_weight, cfg.loss.fisher.intra_weight) == (1.0, 0.01)
    assert cfg.optim.betas == (0.7, 0.8) and cfg.optim.head_lr_mult == 10.0
    dann = load_config(ROOT / "configs" / "deepmerge-dann-fisher-entropy.yaml")
    assert dann.loss.transfer == "dann" and dann.loss.entropy_weight == 0.05
    assert load_config(ROOT / "configs" / "deepmerge-noda.yaml").loss.transfer == "none"
    assert load_config(ROOT / "configs" / "deepmerge-coral.yaml").loss.transfer == "coral"
    assert load_config(ROOT / "configs" / "resnet18-dann.yaml").model.name == "resnet18"
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.train.epochs <= 2 and tiny.train.batch_size <= 16 and tiny.loss.transfer == "mmd"


# --- defaults, base, overrides ---------------------------------------------------------------------

def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "")) == Config()
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_base_is_relative_to_the_file_and_merges_deeply(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "common.yaml", "seed: 5\ntrain: {epochs: 7, batch_size: 32}\nloss: {mmd: {unbiased: true}}\n")
    child = write(tmp_path / "sub" / "child.yaml",
                  "base: ../common.yaml\ntrain: {batch_size: 8}\nloss: {transfer: mmd}\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.train.epochs, cfg.train.batch_size) == (5, 7, 8)
    assert cfg.loss.transfer == "mmd" and cfg.loss.mmd.unbiased is True


def test_a_base_files_section_written_as_a_list_is_refused_where_a_later_file_sets_its_keys(tmp_path):
    """A base's `train: [{epochs: 50}, {batch_size: 64}]` (a list where a section goes) was replaced
    without a word by the first mapping a child file or an override gave: the defaults trained."""
    (tmp_path / "base.yaml").write_text("train: [{epochs: 50}, {batch_size: 64}]\noptim: 5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    with pytest.raises(DmhpcError) as err:
        load_config(tmp_path / "child.yaml")
    assert str(err.value) == (f"{tmp_path / 'base.yaml'}: train: expected a mapping of train keys, got "
                              '[{"epochs": 50}, {"batch_size": 64}]')
    with pytest.raises(DmhpcError, match=r"base.yaml: optim: expected a mapping of optim keys, got 5$"):
        load_config(tmp_path / "base.yaml", ["optim.lr=0.01"])


def test_an_empty_section_or_a_null_override_keeps_what_the_base_set(tmp_path):
    write(tmp_path / "base.yaml", "train: {batch_size: 16}\nloss: {transfer: mmd, mmd: {unbiased: true}}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nloss:\n  mmd:\n    # unbiased: false\ntrain:\n")
    cfg = load_config(child)
    assert (cfg.train.batch_size, cfg.loss.mmd.unbiased) == (16, True)



@pytest.mark.parametrize("override", ["train=null", "loss.mmd={}", "select=null"])
def test_a_null_or_empty_section_on_the_command_line_is_refused(tmp_path, override):
    """`train=null` kept what the files set (a file's empty section does, its keys commented out),
    and a user who meant the defaults trained on the file's settings without a word."""
    write(tmp_path / "base.yaml", "train: {batch_size: 16}\nloss: {transfer: mmd, mmd: {unbiased: true}}\n")
    key = override.split("=")[0]
    assert error_of(tmp_path / "base.yaml", [override]) == (
        f"command line: {key}: {override.split('=')[1]} changes nothing: a section is not reset; set its keys "
        f"({key}.KEY=VALUE)")


@pytest.mark.parametrize("child, overrides, blamed, message", [
    ("train: {epochs: {max: 3}}\n", [], "child", 'train.epochs: expected a positive integer, got {"max": 3}'),
    ("", ["train.epochs.max=3"], "command line", 'train.epochs: expected a positive integer, got {"max": 3}'),
    ("", ["run.dir=runs/a: b"], "command line", 'run.dir: expected a non-empty string'),
])
def test_keys_under_a_setting_are_blamed_on_the_layer_that_nests_them(tmp_path, child, overrides, blamed, message):
    """A child file or an override nesting keys under a setting its base gave a value blamed the
    base file, saying its (right) value should have been a mapping."""
    write(tmp_path / "base.yaml", "train: {epochs: 200}\nrun: {dir: runs/x}\n")
    path = write(tmp_path / "child.yaml", "base: base.yaml\n" + child)
    where = str(path) if blamed == "child" else blamed
    assert error_of(path, overrides).startswith(f"{where}: {message}")


def test_deepmerge_one_takes_dropout_and_l2_and_empty_sections_are_allowed(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "model: {name: deepmerge, dropout: 0.5, l2: 1e-4}\nloss:\n"))
    assert (cfg.model.dropout, cfg.model.l2, cfg.loss) == (0.5, 1e-4, Config().loss)


def test_lists_are_replaced_not_merged(tmp_path):
    write(tmp_path / "a.yaml", "train: {signals: [SIGTERM, SIGUSR1]}\n")
    cfg = load_config(write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {signals: [SIGUSR2]}\n"))
    assert cfg.train.signals == ("SIGUSR2",)


def test_overrides_are_typed_by_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {batch_size: 128}\nloss: {transfer: mmd}\n")
    cfg = load_config(path, ["train.batch_size=64", "loss.mmd.unbiased=true", "data.source=/scratch/x y",
                             "optim.lr=1e-4", "optim.grad_clip=5", "loss.mmd.sigmas=[1, 2.5]",
                             "loss.mmd.clamp=null", "seed=3", "train.signals=[SIGUSR2]"])
    assert cfg.train.batch_size == 64 and cfg.loss.mmd.unbiased is True
    assert cfg.data.source == "/scratch/x y"
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_clip == 5.0 and cfg.loss.mmd.sigmas == (1.0, 2.5)
    assert cfg.loss.mmd.clamp is None and cfg.seed == 3 and cfg.train.signals == ("SIGUSR2",)
    # later overrides win
    assert load_config(path, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


def test_a_setting_that_does_nothing_where_it_is_set_is_refused(tmp_path):
    """optim.warmup_steps under the cyclic schedule, Adam with SGD's momentum, DANN's reversal
    settings without DANN: accepted, and the run trained without them, without a word."""
    base = write(tmp_path / "base.yaml", "optim: {schedule: cyclic, cycle_epochs: 8}\nloss: {transfer: mmd}\n")
    for overrides, message in (
            (["optim.warmup_steps=500"], 'command line: optim.warmup_steps: 500 does nothing with optim.schedule "cyclic"'),
            (["optim.momentum=0.5"], 'command line: optim.momentum: 0.5 does nothing with optim.name "adam"'),
            (["optim.name=sgd", "optim.betas=[0.9, 0.99]"], 'optim.betas: [0.9, 0.99] does nothing with optim.name "sgd"'),
            (["loss.grl.high=5"], 'command line: loss.grl.high: 5.0 does nothing with loss.transfer "mmd"'),
            (["optim.discriminator_lr_mult=0.1"], 'optim.discriminator_lr_mult: 0.1 does nothing with loss.transfer'),
            (["loss.transfer=coral", "loss.mmd.unbiased=true"], "loss.mmd.unbiased: true does nothing with loss.transfer"),
            # A grid or tune trained such points under other names, the same run
            (["loss.transfer=none", "loss.transfer_weight=5"], 'loss.transfer_weight: 5.0 does nothing with loss.transfer "none"'),
            (["loss.fisher.weight=0", "loss.fisher.form=td"], 'loss.fisher.form: "td" does nothing with loss.fisher.weight 0')):
        with pytest.raises(DmhpcError) as refused:
            load_config(base, overrides)
        assert message in str(refused.value) and "remove it" in str(refused.value)
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptim: {schedule: inv, cycle_epochs: 2}\n")
    with pytest.raises(DmhpcError, match=f"{child}: optim.cycle_epochs: 2.0 does nothing with optim.schedule"):
        load_config(child)
    # Layering: a base file's setting for the schedule it chose, under a schedule chosen later, is not
    # a mistake; the key's default is never one; and a run's own config.yaml of an older dmhpc is read.
    assert load_config(base, ["optim.schedule=inv", "optim.gamma=0.5"]).optim.cycle_epochs == 8
    # ... however deep the chain: a file based on one that chose another schedule than its base's
    middle = write(tmp_path / "middle.yaml", "base: base.yaml\noptim: {schedule: inv}\n")
    top = write(tmp_path / "top.yaml", f"base: {middle.name}\ntrain: {{epochs: 5}}\n")
    assert load_config(top).optim.cycle_epochs == 8
    assert load_config(base, ["optim.schedule=warmup-cosine", "optim.warmup_steps=5"]).optim.warmup_steps == 5
    written = write(tmp_path / "run.yaml", "optim: {schedule: cyclic, warmup_steps: 500}\n")
    assert load_config(written, written=True).optim.warmup_steps == 500
    # A run an older dmhpc started with no stop signals (refused in a new configuration) still opens.
    silent = write(tmp_path / "silent.yaml", "train: {signals: []}\n")
    assert load_config(silent, written=True).train.signals == ()
    with pytest.raises(DmhpcError, match=f"^{silent}: train.signals: expected a non-empty list"):
        load_config(silent)
    # ... and one it started with a signal no longer taken (a fault): eval, predict, resume read it
    faulty = write(tmp_path / "faulty.yaml", "train: {signals: [SIGTERM, SIGTSTP]}\n")
    assert load_config(faulty, written=True).train.signals == ("SIGTERM", "SIGTSTP")
    with pytest.raises(DmhpcError, match=f"^{faulty}: train.signals: SIGTSTP is no stop signal"):
        load_config(faulty)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML alone reads 1e-4 as the string "1e-4"
    cfg = load_config(write(tmp_path / "c.yaml", "optim: {lr: 1e-4, min_lr: 0}\n"))
    assert cfg.optim.lr == 1e-4


def test_config_is_frozen_and_replace_works():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    assert changed.train.epochs == 3 and cfg.train.epochs == 200


def test_save_writes_plain_yaml_that_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["loss.mmd.sigmas=[1e-6, 0.5, 100]", "optim.grad_clip=1.5"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert data == config_to_dict(cfg) and "base" not in data
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert list(tmp_path.joinpath("run").iterdir()) == [tmp_path / "run" / "config.yaml"]  # no temp files


def test_a_saved_config_with_keys_its_settings_leave_inert_loads_as_a_config_of_its_own(tmp_path):
    """A run's config.yaml holds every key: the base's cycle_epochs beside the constant schedule
    chosen later, "set" in one file, was refused as `--config RUN/config.yaml` ("does nothing with
    optim.schedule"). Such keys are written at their defaults; nothing else changes."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["optim.schedule=constant"])
    assert cfg.optim.cycle_epochs == 1.0 != Config().optim.cycle_epochs  # (tiny's)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert changed_keys(config_to_dict(again), config_to_dict(cfg)) == ["optim.cycle_epochs"]
    assert again.optim.cycle_epochs == Config().optim.cycle_epochs


def test_save_quotes_strings_the_loader_would_read_as_numbers(tmp_path):
    # The loader reads 2e3 as a number (PyYAML alone wants 2.0e+3), so the saved text must quote it.
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ['run.dir="2e3"', 'data.source="-1E-4"'])
    assert (cfg.run.dir, cfg.data.source) == ("2e3", "-1E-4")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# --- errors: each names the file (or command line), the key and the problem ------------------------

@pytest.mark.parametrize("text, key, problem", [
    ("bogus: 1\n", "bogus", "unknown key"),
    ("train: {bogus: 1}\n", "train.bogus", "unknown key"),
    ("loss: {mmd: {bogus: 1}}\n", "loss.mmd.bogus", "unknown key"),
    ("loss: {fisher: {wieght: 1}}\n", "loss.fisher.wieght", "did you mean loss.fisher.weight"),
    ("loss: {grl: {bogus: 1}}\n", "loss.grl.bogus", "unknown key"),
    ("train: {batch_size: -3}\n", "train.batch_size", "expected a positive integer, got -3"),
    ("train: {batch_size: 2.5}\n", "train.batch_size", "expected a positive integer, got 2.5"),
    ("train: {epochs: true}\n", "train.epochs", "expected a positive integer, got true"),
    ("train: {max_steps: -1}\n", "train.max_steps", "expected a non-negative integer"),
    ("seed: abc\n", "seed", 'got "abc"'),
    ("debug: yes please\n", "debug", "expected true or false"),
    ("optim: {lr: 0}\n", "optim.lr", "expected a number > 0, got 0"),
    ("optim: {lr: .nan}\n", "optim.lr", "expected a number > 0"),
    ("optim: {lr: fast}\n", "optim.lr", 'got "fast"'),
    ("optim: {betas: [0.9]}\n", "optim.betas", "a list of two numbers in [0, 1)"),
    ("optim: {betas: [0.9, 1.0]}\n", "optim.betas", "a list of two numbers in [0, 1)"),
    ("optim: {momentum: 1}\n", "optim.momentum", "in [0, 1)"),
    ("optim: {grad_clip: 0}\n", "optim.grad_clip", "null or a number > 0"),
    ("optim: {name: lamb}\n", "optim.name", 'one of "adam", "adamw", "sgd", got "lamb"'),
    ("optim: {schedule: step}\n", "optim.schedule", 'got "step"'),
    ("model: {name: vgg}\n", "model.name", '"resnet152", got "vgg"'),
    ("model: {dropout: 1.0}\n", "model.dropout", "in [0, 1)"),
    ("model: {stem: tiny}\n", "model.stem", 'got "tiny"'),
    ("data: {loader: fast}\n", "data.loader", '"gpu-resident"'),
    ("data: {normalize: target}\n", "data.normalize", 'got "target"'),
    ("data: {source: 3}\n", "data.source", "non-empty string"),
    ("data: {target: ''}\n", "data.target", "non-empty string"),
    ("data: {num_workers: -1}\n", "data.num_workers", "non-negative integer"),
    ("loss: {transfer: wasserstein}\n", "loss.transfer", 'got "wasserstein"'),
    ("loss: {transfer_weight: -1}\n", "loss.transfer_weight", "a number >= 0"),
    ("loss: {scope: world}\n", "loss.scope", 'got "world"'),
    ("loss: {mmd: {sigmas: [1, -2]}}\n", "loss.mmd.sigmas", "list of numbers from 1e-30 to 1e30"),
    # (NaN at step 1; NaN in the unbiased estimator)
    ("loss: {mmd: {sigmas: [1, 1e-300]}}\n", "loss.mmd.sigmas", "list of numbers from 1e-30 to 1e30"),
    ("loss: {mmd: {sigmas: [1, 1e50]}}\n", "loss.mmd.sigmas", "list of numbers from 1e-30 to 1e30"),
    ("loss: {mmd: {sigmas: silverman}}\n", "loss.mmd.sigmas", '"median"'),
    ("loss: {mmd: {sigmas: []}}\n", "loss.mmd.sigmas", "non-empty list"),
    ("loss: {mmd: {clamp: -1}}\n", "loss.mmd.clamp", "null or a number >= 0"),
    ("loss: {mmd: {max_samples: 1}}\n", "loss.mmd.max_samples", "an integer >= 2, got 1"),
    ("loss: {mmd: {max_samples: 1.5e4}}\n", "loss.mmd.max_samples", "an integer >= 2"),
    ("loss: {fisher: {form: tx}}\n", "loss.fisher.form", 'got "tx"'),
    ("loss: {fisher: {normalize: max}}\n", "loss.fisher.normalize", 'got "max"'),
    ("loss: {grl: {schedule: linear}}\n", "loss.grl.schedule", 'got "linear"'),
    ("loss: {grl: {alpha: 0}}\n", "loss.grl.alpha", "a number > 0"),
    ("train: {amp: fp8}\n", "train.amp", 'got "fp8"'),
    ("train: {signals: [SIGKILL]}\n", "train.signals", "catchable signal names"),
    # A handler on a fault made a crash loop forever on the faulting instruction: a hung job.
    ("train: {signals: [SIGTERM, SIGSEGV]}\n", "train.signals", "SIGSEGV is no stop signal; expected some of SIGTERM, "),
    ("train: {signals: [SIGCHLD]}\n", "train.signals", "SIGCHLD is no stop signal"),
    ("train: {signals: []}\n", "train.signals", "non-empty list"),
    ("train: {signals: [SIGTERM, SIGTERM]}\n", "train.signals", "distinct"),
    ("train: {signals: SIGTERM}\n", "train.signals", 'got "SIGTERM"'),
    ("select: {criterion: target-acc}\n", "select.criterion", '"oracle-target-acc"'),
    ("run: {dir: null}\n", "run.dir", "got null"),
    ("train: 5\n", "train", "expected a mapping of train keys, got 5"),
    ("loss: {mmd: [1, 2]}\n", "loss.mmd", "expected a mapping of loss.mmd keys"),
    # rules across keys
    ("model: {name: deepmerge2, stem: small}\n", "model.stem", "ResNet models only"),
    ("model: {name: resnet18, l2: 0.001}\n", "model.l2", 'model "deepmerge" only'),
    ("model: {name: deepmerge2, dropout: 0.5}\n", "model.dropout", 'model "deepmerge" only'),
    ("loss: {fisher: {weight: 1, form: tr, inter_weight: 0}}\n", "loss.fisher.inter_weight", "divides"),
    ("optim: {schedule: warmup-cosine, lr: 0.001, min_lr: 0.01}\n", "optim.min_lr", "above optim.lr"),
])
def test_bad_values_name_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path / "bad.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


def test_error_names_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "parent.yaml", "train: {batch_size: -3}\nseed: 1\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nseed: 2\n")
    assert error_of(child).startswith(f"{tmp_path / 'parent.yaml'}: train.batch_size: ")
    # fixing it in the child blames nobody; breaking it on the command line blames the command line
    write(child, "base: parent.yaml\ntrain: {batch_size: 4}\n")
    assert load_config(child).train.batch_size == 4
    assert error_of(child, ["train.batch_size=0"]).startswith("command line: train.batch_size: ")


def test_a_rule_across_keys_broken_by_a_later_layer_blames_that_layer(tmp_path):
    """`optim.lr=1e-5` on the command line under a file's min_lr 1e-4 blamed the file, which was fine."""
    base = write(tmp_path / "wc.yaml", "optim: {schedule: warmup-cosine, lr: 0.001, min_lr: 0.0001}\n")
    assert error_of(base, ["optim.lr=1e-5"]) == ("command line: optim.min_lr: 0.0001 is above optim.lr 1e-05 "
                                                 "(optim.lr set here)")
    child = write(tmp_path / "child.yaml", "base: dm1.yaml\nmodel: {name: resnet18}\n")
    write(tmp_path / "dm1.yaml", "model: {name: deepmerge, dropout: 0.3}\n")
    assert error_of(child) == (f"{child}: model.dropout: applies to model \"deepmerge\" only, but model.name is "
                               f"\"resnet18\" (model.name set here)")
    # The key of the rule set last: the file that set it, and nothing more said.
    assert error_of(base, ["optim.min_lr=0.01"]) == "command line: optim.min_lr: 0.01 is above optim.lr 0.001"


@pytest.mark.parametrize("override, key, problem", [
    ("train.batch_size=-3", "train.batch_size", "expected a positive integer, got -3"),
    ("train.bogus=1", "train.bogus", "unknown key"),
    ("trian.epochs=1", "trian", "did you mean train"),
    ("base=other.yaml", "base", "unknown key"),
    ("train=3", "train", "expected a mapping"),
    ("train.batch_size.x=3", "train.batch_size", "expected a positive integer"),
    ("optim.lr=fast", "optim.lr", 'got "fast"'),
    ("loss.mmd.unbiased=maybe", "loss.mmd.unbiased", "true or false"),
    ("optim.betas=[0.9, [", "optim.betas", "invalid YAML"),
])
def test_bad_overrides_name_the_command_line(tmp_path, override, key, problem):
    message = error_of(write(tmp_path / "c.yaml", ""), [override])
    assert message.startswith(f"command line: {key}: "), message
    assert problem in message


@pytest.mark.parametrize("override", ["train.batch_size", "=3", "train..epochs=3", "train epochs=3", "train.1x=3", " =1"])
def test_bad_override_syntax(tmp_path, override):
    message = error_of(write(tmp_path / "c.yaml", ""), [override])
    assert message.startswith("command line: "), message
    assert "dotted key" in message


def test_parse_override_splits_at_the_first_equals_sign():
    assert parse_override("data.source=/a=b") == ("data.source", "/a=b")
    assert parse_override("optim.grad_clip=") == ("optim.grad_clip", None)


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    assert "is a directory" in error_of(tmp_path)


def test_a_command_lines_dotted_key_written_in_a_file_is_shown_nested(tmp_path):
    """`train.epochs: 5` in a file listed every top-level key, and `loss: {fisher.weight: 0.5}` was
    asked "did you mean loss.transfer_weight?"."""
    (tmp_path / "a.yaml").write_text("train.epochs: 5\n")
    assert error_of(tmp_path / "a.yaml") == (f"{tmp_path / 'a.yaml'}: train.epochs: unknown key (dotted keys are for "
                                             f"the command line; a file nests them: train: {{epochs: 5}})")
    (tmp_path / "b.yaml").write_text("loss:\n  fisher.weight: 0.5\n")
    assert error_of(tmp_path / "b.yaml").endswith("loss.fisher.weight: unknown key (dotted keys are for the command "
                                                  "line; a file nests them: loss: {fisher: {weight: 0.5}})")
    (tmp_path / "c.yaml").write_text("loss:\n  mmd.weight: 0.5\n")  # no such setting: no nesting said
    assert "unknown key (known: transfer, transfer_weight, mmd," in error_of(tmp_path / "c.yaml")


def test_a_config_or_base_name_the_system_cannot_look_up_is_one_line(tmp_path):
    """A name past NAME_MAX (or a folder without search permission): Path.exists() raised, and the
    trainer ended in an OSError traceback."""
    long = tmp_path / ("a" * 300 + ".yaml")
    assert error_of(long) == f"{long}: cannot read: File name too long"
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {long.name}\n")
    assert error_of(child) == f"{child}: base: {long}: cannot read: File name too long"


@pytest.mark.parametrize("text, problem", [
    ("train: {batch_size: 3\n", "invalid YAML"),
    ("train:\n  epochs: 1\n   batch_size: 2\n", "invalid YAML"),
    ("seed: 1\nseed: 2\n", 'duplicate key "seed" (line 2'),
    ("train: {epochs: 1, epochs: 2}\n", 'duplicate key "epochs"'),
    ("- 1\n- 2\n", "expected a mapping of keys at the top level, got list"),
])
def test_invalid_yaml_names_the_file(tmp_path, text, problem):
    path = write(tmp_path / "bad.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: "), message
    assert problem in message


@pytest.mark.parametrize("text, problem", [
    ("base: missing.yaml\n", "base: config file not found: "),
    ("base: 3\n", "base: expected the path of another config file, got 3"),
    ("base: ''\n", "base: expected the path of another config file"),
    ("base: self.yaml\n", "base: files inherit from each other in a cycle"),
])
def test_bad_base(tmp_path, text, problem):
    path = write(tmp_path / "self.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: "), message
    assert problem in message


def test_base_cycle_through_two_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_base_file_errors_name_the_base_file(tmp_path):
    write(tmp_path / "parent.yaml", "train: {epochs: 1\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    assert error_of(child).startswith(f"{tmp_path / 'parent.yaml'}: invalid YAML")
    write(tmp_path / "parent.yaml", "base: child.yaml\n")
    assert "cycle" in error_of(child)


def test_base_only_at_the_top_level(tmp_path):
    write(tmp_path / "a.yaml", "")
    assert "train.base: unknown key" in error_of(write(tmp_path / "c.yaml", "train: {base: a.yaml}\n"))


def test_config_from_dict_names_its_source():
    with pytest.raises(DmhpcError, match=r"^run.pt config: train.epochs: expected a positive integer"):
        config_from_dict({"train": {"epochs": 0}}, source="run.pt config")


def test_the_mmd_sample_cap_is_a_key_whose_default_is_the_losses(tmp_path):
    """mmd's error told users to raise max_samples, which no key could do."""
    from dmhpc.losses.mmd import MAX_SAMPLES

    assert load_config(write(tmp_path / "c.yaml", "")).loss.mmd.max_samples == MAX_SAMPLES == 16384
    assert load_config(write(tmp_path / "c.yaml", ""), ["loss.mmd.max_samples=65536"]).loss.mmd.max_samples == 65536


def test_the_discriminator_gets_its_own_rate_multiplier_under_dann():
    """The discriminator trained at optim.head_lr_mult (10, FisherDA's), with no way to take the 0.1
    of DeepMerge's own ADA code, where results.md sees the DANN discriminator's loss jump."""
    import torch

    from dmhpc.train.state import TrainState

    for extra, want in (([], 10.0), (["optim.discriminator_lr_mult=0.1"], 0.1)):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", ["loss.transfer=dann", "loss.transfer_weight=1.0", *extra])
        groups = {g["name"]: g["lr_mult"] for g in TrainState.build(cfg, torch.device("cpu"), 3).optimizer.param_groups}
        assert groups["discriminator"] == want and groups["trunk"] == 1.0


def test_a_relative_base_is_found_through_a_symlinked_folder(tmp_path):
    """`base: ../p.yaml` in lnk/c.yaml, lnk a link to deep/sub: the path was normalized as text
    (lnk/.. to the folder holding lnk), and another file of that name was read without a word."""
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "deep" / "p.yaml").write_text("train: {epochs: 9}\n")
    (tmp_path / "p.yaml").write_text("train: {epochs: 3}\n")  # the one beside the link: not the base
    (tmp_path / "deep" / "sub" / "c.yaml").write_text("base: ../p.yaml\n")
    (tmp_path / "lnk").symlink_to(tmp_path / "deep" / "sub")
    assert load_config(tmp_path / "lnk" / "c.yaml").train.epochs == 9


@pytest.mark.parametrize("override, key", [("run.dir=~/runs/a", "run.dir"), ("data.source=$SCRATCH/pristine", "data.source"),
                                           ("data.target=${SCRATCH}/noisy", "data.target")])
def test_a_path_the_shell_would_expand_is_refused(tmp_path, override, key):
    """`run.dir: ~/runs/a` in a file (or quoted on a command line) made a folder named "~" in the
    working directory, and `$SCRATCH/...` one named "$SCRATCH": dmhpc expands neither."""
    with pytest.raises(DmhpcError, match=rf"command line: {key}: expected a non-empty string, a path written out "
                                         rf"\(quote numbers; no ~ or \$VARIABLE"):
        load_config(TINY, [override])
    load_config(TINY, ["run.dir=runs/a~b$"])  # elsewhere in a name they are characters like any other
    (tmp_path / "b$1.yaml").write_text(f"base: {TINY}\n")
    (tmp_path / "c.yaml").write_text("base: b$1.yaml\n")  # and in base: as well (it was refused)
    assert load_config(tmp_path / "c.yaml").train == load_config(TINY).train


@pytest.mark.parametrize("override", ['run.dir="runs/a\\x00b"', 'data.source="data/a\\nb"', 'run.dir="runs/\\x7f"'])
def test_a_path_with_a_control_character_is_refused(override):
    """A NUL in run.dir or a data path ended the trainer in a ValueError traceback (os.stat), and a
    newline was taken: a folder no log line names readably."""
    key = override.partition("=")[0]
    with pytest.raises(DmhpcError, match=rf"^command line: {key}: expected a non-empty string, a path written "
                                         rf"out .*; no control characters\), got "):
        load_config(TINY, [override])


def test_a_run_of_an_older_dmhpc_with_such_a_path_still_resumes(tmp_path):
    """An older dmhpc took run.dir ~/runs/a as a folder named "~"; its checkpoint's config and its
    config.yaml were then refused ("expected ... a path written out"): the run could not resume, be
    evaluated or exported."""
    old = {**config_to_dict(load_config(TINY)), "run": {"dir": "~/runs/a"}}
    assert config_from_dict(old, "ckpt.pt: config").run.dir == "~/runs/a"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "config.yaml", written=True).run.dir == "~/runs/a"
    with pytest.raises(DmhpcError, match="config.yaml: run.dir: expected a non-empty string, a path written out"):
        load_config(tmp_path / "config.yaml")


def test_a_data_config_and_a_launch_file_refuse_them_too(tmp_path):
    from dmhpc.data.prepare import load_data_config
    from dmhpc.launch import load_grid

    (tmp_path / "d.yaml").write_text("root: $SCRATCH/raw\nout: o\ndomains: {a: {images: x.npy}}\n")
    with pytest.raises(DmhpcError, match="root: expected a non-empty string, a path written out"):
        load_data_config(tmp_path / "d.yaml")
    # A root that --root replaces is never read; a column name is no path ($ra was refused as one).
    (tmp_path / "e.yaml").write_text("root: $SCRATCH/raw\nout: o\n"
                                     "domains: {a: {catalog: c.csv, id_column: $ra, cutouts: cut}}\n")
    [spec] = load_data_config(tmp_path / "e.yaml", root=tmp_path)
    assert spec.id_column == "$ra" and spec.catalog == tmp_path / "c.csv"
    with pytest.raises(DmhpcError, match="out: expected a non-empty string, a path written out"):
        load_grid({"base": str(TINY), "out": "~/grid", "grid": {"seed": [1]}})


def test_an_override_value_cut_by_a_yaml_comment_is_refused():
    """'run.dir=runs/a #b' was run.dir runs/a: YAML reads " #" as the start of a comment."""
    with pytest.raises(DmhpcError, match=r"run.dir: value 'runs/a #b': YAML reads what follows # as a comment"):
        parse_override("run.dir=runs/a #b")
    assert parse_override('run.dir="runs/a #b"') == ("run.dir", "runs/a #b")
    assert parse_override("run.dir=runs/a#b") == ("run.dir", "runs/a#b")


# ---------------------------------------------------------------- boundaries, inert keys, change reports

@pytest.mark.parametrize("text, key, problem", [
    ("loss: {transfer: mmd, mmd: {sigmas: [1, 0]}}\n", "loss.mmd.sigmas", "list of numbers from 1e-30 to 1e30"),
    ("optim: {betas: [0.9, 0.99, 0.5]}\n", "optim.betas", "a list of two numbers in [0, 1)"),
    (f"seed: {2**32}\n", "seed", "expected an integer"),
    ("loss: {fisher: {weight: -1}}\n", "loss.fisher.weight", "a number >= 0"),
])
def test_values_just_past_a_keys_bounds_are_refused(tmp_path, text, key, problem):
    """A zero kernel variance divides by zero in every MMD step, a third beta or a seed numpy cannot
    take fails as a traceback after the ranks started, a negative Fisher weight maximises the loss."""
    path = write(tmp_path / "bad.yaml", text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: ") and problem in message, message


def test_values_at_a_keys_bounds_are_taken(tmp_path):
    """The largest seed numpy takes, and warm-up-cosine decaying to the base rate itself ("at most
    lr") and a first beta of 0, are valid settings: refusing them sent users to another value than
    the one they meant."""
    cfg = load_config(write(tmp_path / "c.yaml", f"seed: {2**32 - 1}\n"
                            "optim: {schedule: warmup-cosine, lr: 0.01, min_lr: 0.01, betas: [0, 0.999]}\n"))
    assert (cfg.seed, cfg.optim.min_lr, cfg.optim.betas) == (2**32 - 1, 0.01, (0.0, 0.999))


def test_a_rule_across_keys_blames_the_base_file_that_broke_it(tmp_path):
    """A ResNet stem set in a base file was blamed on the file based on it, where the user looked for
    it in vain."""
    write(tmp_path / "parent.yaml", "model: {stem: small}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nseed: 2\n")
    assert error_of(child).startswith(f"{tmp_path / 'parent.yaml'}: model.stem: ")


def test_which_keys_each_setting_leaves_inert():
    """AdamW's betas taken for inert were refused where set and reset to their default in a run's
    saved config.yaml; SGD's momentum or inv's power under Adam or cyclic trained without a word."""
    from dmhpc.config import inert_keys

    def inert(*overrides):
        data = config_to_dict(Config())
        for item in overrides:
            key, value = parse_override(item)
            section, name = key.rsplit(".", 1)
            into = data
            for part in section.split("."):
                into = into[part]
            into[name] = value
        return set(inert_keys(data))

    grl = {"loss.grl.schedule", "loss.grl.alpha", "loss.grl.high", "optim.discriminator_lr_mult"}
    mmd = {"loss.mmd.sigmas", "loss.mmd.unbiased", "loss.mmd.clamp"}
    fisher = {"loss.fisher.form", "loss.fisher.intra_weight", "loss.fisher.inter_weight", "loss.fisher.normalize"}
    schedule = {"optim.warmup_steps", "optim.min_lr", "optim.gamma", "optim.power"}  # under "cyclic"
    assert inert() == schedule | {"optim.momentum"} | grl | mmd | fisher | {"loss.transfer_weight", "loss.scope"}
    assert inert("optim.name=adamw") == inert()
    assert inert("optim.name=sgd") == inert() - {"optim.momentum"} | {"optim.betas"}
    assert inert("loss.transfer=mmd", "loss.fisher.weight=1") == inert() - mmd - fisher - {"loss.transfer_weight",
                                                                                         "loss.scope"}
    assert "loss.scope" not in inert("loss.entropy_weight=0.05") | inert("loss.fisher.weight=1")
    # The "dann" ramp's shape does nothing under a constant coefficient (the high it ramps to does).
    dann = inert("loss.transfer=dann")
    assert "loss.grl.alpha" not in dann
    assert inert("loss.transfer=dann", "loss.grl.schedule=constant") == dann | {"loss.grl.alpha"}


@pytest.mark.parametrize("overrides, key, settings", [
    (["loss.transfer=dann", "loss.grl.schedule=constant", "loss.grl.alpha=3"], "loss.grl.alpha",
     'loss.grl.schedule "constant"'),
    (["loss.transfer=none", "loss.fisher.weight=0", "loss.entropy_weight=0", "loss.scope=local"], "loss.scope",
     'loss.transfer "none", loss.fisher.weight 0.0 and loss.entropy_weight 0.0'),
])
def test_a_setting_no_term_reads_is_refused(overrides, key, settings):
    """A grid over loss.grl.alpha under a constant coefficient trained the same run under other
    names; loss.scope=local without a batch-statistic term was recorded as a setting it was not."""
    with pytest.raises(DmhpcError) as info:
        load_config(TINY, overrides)
    assert str(info.value).startswith(f"command line: {key}: ")
    assert str(info.value).endswith(f" does nothing with {settings}; remove it (or choose the setting it is for)")


def test_adamw_keeps_its_betas_through_a_saved_config(tmp_path):
    """AdamW's betas are read by AdamW: a run's config.yaml written with the defaults in their place
    resumed (and was evaluated) as another run."""
    cfg = load_config(TINY, ["optim.name=adamw", "optim.betas=[0.9, 0.999]"])
    assert cfg.optim.betas == (0.9, 0.999)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_cycle_of_bases_named_relative_to_the_working_directory_is_one_line(tmp_path, monkeypatch):
    """`dmhpc train --config a.yaml` whose a.yaml and b.yaml name each other: compared unresolved,
    the relative path was never seen again and the loader recursed to a RecursionError traceback."""
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert "files inherit from each other in a cycle" in error_of("a.yaml")


def test_changed_keys_names_nested_and_missing_keys_in_full():
    """A resume check filters the change list by dotted key: loss.mmd.sigmas reported as
    "mmd.sigmas", or a key an older checkpoint lacks not reported, let a changed run resume."""
    old = {"seed": 1, "loss": {"mmd": {"sigmas": [1.0, 2.0], "unbiased": False}}, "optim": {"lr": 0.1}}
    new = {"seed": 1, "loss": {"mmd": {"sigmas": (1.0, 3.0), "unbiased": False, "max_samples": 8}},
           "optim": {"lr": 0.1}}
    assert changed_keys(old, new) == ["loss.mmd.max_samples", "loss.mmd.sigmas"]
    assert changed_keys(new, old) == ["loss.mmd.max_samples", "loss.mmd.sigmas"]
    assert changed_keys(old, {**old, "loss": {"mmd": {"sigmas": (1.0, 2.0), "unbiased": False}}}) == []


def test_a_checkpoints_config_is_checked_across_keys_too():
    """A checkpoint's config with a ResNet stem on DeepMerge II was taken, and the model built from it
    was not the one the settings describe."""
    with pytest.raises(DmhpcError, match=r"^ckpt.pt: config: model.stem: .*ResNet models only"):
        config_from_dict({"model": {"name": "deepmerge2", "stem": "small"}}, "ckpt.pt: config")


def test_an_oracle_is_recognised_however_its_data_path_is_spelt():
    """data.source data/x and data.target ./data/x are one data set: the target oracle was taken
    for an adaptation run and its target read twice."""
    from dmhpc.config import DataConfig

    assert DataConfig(source="data/x", target="./data/x").trains_on_target()
    assert not DataConfig(source="data/x", target="data/y").trains_on_target()


def test_override_text_is_read_back_as_the_value_it_was_given():
    """The demo and the launchers pass paths and values as KEY=VALUE: a path with " #" was cut at the
    comment, and the string "2e3" came back as the number 2000.0."""
    from dmhpc.config import override_text

    for key, value in (("run.dir", "runs/a #b"), ("run.dir", "2e3"), ("data.source", "/x: y"),
                       ("optim.betas", [0.9, 0.99]), ("optim.grad_clip", None), ("train.compile", True)):
        assert parse_override(override_text(key, value)) == (key, value)
