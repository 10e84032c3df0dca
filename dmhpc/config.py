"""Training configuration: frozen dataclasses with defaults, read from YAML plus dotted overrides.

    cfg = load_config("configs/deepmerge-mmd-fisher-entropy.yaml", ["train.batch_size=64"])

Every option is one dotted key (`train.batch_size`, `loss.mmd.unbiased`, ...). A config file holds
any subset of the keys; the rest keep the defaults below. `base: other.yaml` (relative to the file)
inherits another file first: mappings are merged key by key, everything else (lists included) is
replaced. Overrides (`KEY=VALUE`, the value read as YAML so `64`, `true`, `null`, `[1, 2]` come out
typed) are applied last.

Validation happens here, before any process group starts: an unknown key, a wrong type or a bad
value is a `DmhpcError` naming where the key was set and the problem, e.g.
`configs/x.yaml: train.batch_size: expected a positive integer, got -3` or
`command line: optim.lr: expected a number > 0, got "fast"`.

Relative data and run paths are relative to the working directory, not to the config file.
Sequences are stored as tuples so that a Config is immutable and comparable; use
`dataclasses.replace` to derive a changed copy.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from dmhpc.checks import (Check, Invalid, boolean, choice, dump_yaml, integer, is_number, number, optional,
                          parse_yaml, path_text, read_yaml, show, text, yaml_error)
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write, same_place
from dmhpc.names import CRITERIA, GRL_SCHEDULES, MODEL_NAMES, VERIFY_LEVELS

COMMAND_LINE = "command line"
SEED_MAX = 2**32 - 1


# --- value checks particular to the config (the common ones: dmhpc.checks) -------------------------

def _sigmas() -> Check:
    def convert(v):
        if v in ("deepmerge", "median"):
            return v
        # (mmd.MIN_SIGMA and MAX_SIGMA, not imported: this module stays torch-free)
        if not isinstance(v, list) or not v or not all(is_number(s) and 1e-30 <= s <= 1e30 for s in v):
            raise ValueError
        return tuple(float(s) for s in v)

    return Check('"deepmerge", "median" or a non-empty list of numbers from 1e-30 to 1e30 (kernel variances)',
                 convert)


def _betas() -> Check:
    def convert(v):
        if not isinstance(v, list) or len(v) != 2 or not all(is_number(b) and 0 <= b < 1 for b in v):
            raise ValueError
        return tuple(float(b) for b in v)

    return Check("a list of two numbers in [0, 1)", convert)


# SIGKILL and SIGSTOP cannot be caught; SIGINT stays Ctrl-C (KeyboardInterrupt).
_CATCHABLE = tuple(s.name for s in signal.Signals if s.name not in ("SIGKILL", "SIGSTOP", "SIGINT"))
# What a configuration given now may name: the signals a scheduler or a user sends to ask a job to
# stop. Not the faults (a handler on SIGSEGV or SIGBUS turned a crash into an endless loop of the
# faulting instruction), nor SIGCHLD, SIGPIPE and the like, which a running process receives in its
# normal course. (A run an older dmhpc started with another catchable one is still read.)
STOP_SIGNAL_NAMES = tuple(name for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU",
                                            "SIGALRM", "SIGPWR") if hasattr(signal, name))


def _signal_names() -> Check:
    def convert(v):
        if not isinstance(v, list) or not all(s in _CATCHABLE for s in v) or len(set(v)) != len(v):
            raise ValueError
        return tuple(v)

    return Check('a list of distinct catchable signal names, e.g. ["SIGTERM", "SIGUSR2"]', convert)


def _key(default: Any, check: Check) -> Any:
    """A configuration key: its default and the check its configured values must pass."""
    return field(default=default, metadata={"check": check})


def _path_key(default: str) -> Any:
    """A path key: any non-empty text in a configuration dmhpc wrote (an older dmhpc took `~/runs`
    as a folder named `~`, and its runs must still resume); a path written out in one a user gives."""
    return field(default=default, metadata={"check": text(), "path": path_text()})


def _section(cls: type) -> Any:
    return field(default_factory=cls)


# --- the schema ------------------------------------------------------------------------------------
# Defaults follow the original DeepMerge domain-adaptation code where it has one (optimizer,
# schedule, batch size, loss weights inside each term); the adaptation terms themselves are off,
# so a bare config trains DeepMerge II without adaptation.

@dataclass(frozen=True)
class RunConfig:
    # Run directory (its layout: dmhpc/run.py).
    dir: str = _path_key("runs/default")


@dataclass(frozen=True)
class DataConfig:
    # Source-domain data set directory (labelled; `dmhpc prepare` output with manifest.json).
    source: str = _path_key("data/embedded/shards/pristine")
    # Target-domain data set directory (its labels are used only for evaluation).
    target: str = _path_key("data/embedded/shards/noisy")
    # Input pipeline: "auto" picks the fastest that works here; the others force one.
    loader: str = _key("auto", choice("auto", "gpu-resident", "dali", "torch"))
    # "per-domain": each domain with its own manifest statistics, as the original; "source": both
    # domains with the source statistics.
    normalize: str = _key("per-domain", choice("per-domain", "source"))
    # Random flips and 90-degree rotations of training images (the original used none).
    augment: bool = _key(False, boolean())
    # Loader worker processes per rank (torch and DALI loaders).
    num_workers: int = _key(2, integer(0))
    # What the trainer checks of both data sets before the first step: "checksums" (every shard's
    # SHA-256 against the manifest, shared among the ranks, plus everything "structure" checks) or
    # "structure" (manifest, split lists, each shard's datasets, shapes, dtypes and labels; for a
    # data set already checked with `dmhpc verify`). See docs/training.md for what each costs.
    verify: str = _key("checksums", choice(*VERIFY_LEVELS))

    def trains_on_target(self) -> bool:
        """Source and target are one data set (a target oracle); compared as resolved paths, so
        that data/x and ./data/x are one."""
        return same_place(self.source, self.target)


@dataclass(frozen=True)
class ModelConfig:
    # Registry name: "deepmerge" (DeepMerge I layout), "deepmerge2" (the PyTorch DeepMerge of the
    # domain-adaptation paper), "resnet18" ... "resnet152" (ResNetFc with a 256-d bottleneck).
    name: str = _key("deepmerge2", choice(*MODEL_NAMES))
    # ResNet stem: "original" (7x7 stride-2 conv + max-pool, as torchvision) or "small" (3x3 stride-1,
    # no pool: keeps more of a 75x75 image). ResNet models only.
    stem: str = _key("original", choice("original", "small"))
    # Dropout after each conv block of "deepmerge"; null = DeepMerge I's 0.5. "deepmerge" only:
    # DeepMerge II and the ResNets have no dropout.
    dropout: float | None = _key(None, optional(number(0.0, 1.0, high_open=True)))
    # L2 penalty on the first two dense layers of "deepmerge", added to the loss; null = DeepMerge
    # I's 1e-4. "deepmerge" only.
    l2: float | None = _key(None, optional(number(0.0)))


@dataclass(frozen=True)
class MMDConfig:
    # Gaussian kernel widths: "deepmerge" (the original's 19 variances 1e-6 ... 1e6), "median"
    # (median heuristic per batch), or an explicit list of variances.
    sigmas: str | tuple[float, ...] = _key("deepmerge", _sigmas())
    # Unbiased U-statistic (diagonal excluded) instead of the original's biased V-statistic.
    unbiased: bool = _key(False, boolean())
    # Lower bound applied to the MMD value; null (default) = none. The original clamped at 1e-4,
    # which zeroes the gradient whenever the estimate falls below it.
    clamp: float | None = _key(None, optional(number(0.0)))
    # Most rows (source + target, all ranks under loss.scope=global) one MMD may hold: its pairwise
    # matrices take about 2.5 * rows^2 * 4 bytes (16384: 2.5 GiB; docs/losses.md). The trainer
    # refuses a batch of more at start; raise it where the device has the memory.
    max_samples: int = _key(16384, integer(2))


@dataclass(frozen=True)
class FisherConfig:
    # Weight of the Fisher loss in the total; 0 = off (no class centres).
    weight: float = _key(0.0, number(0.0))
    # "tr": trace ratio intra/inter (the original default); "td": trace difference intra - inter.
    form: str = _key("tr", choice("tr", "td"))
    # Weight of the intra-class (centre) term (original runs: 0.01).
    intra_weight: float = _key(0.01, number(0.0))
    # Weight of the inter-class (centre spread) term (original runs: 1.0).
    inter_weight: float = _key(1.0, number(0.0))
    # Intra-class distances summed over the batch ("sum", the original; scale grows with batch
    # size) or averaged ("mean").
    normalize: str = _key("sum", choice("sum", "mean"))


@dataclass(frozen=True)
class GRLConfig:
    # Gradient-reversal coefficient over training: "dann" ramps from 0 towards `high` as
    # high * (2 / (1 + exp(-alpha * progress)) - 1) (Ganin et al.); "constant" keeps `high`
    # throughout (the original DeepMerge: 1).
    schedule: str = _key("dann", choice(*GRL_SCHEDULES))
    # Steepness of the "dann" ramp (DANN paper: 10).
    alpha: float = _key(10.0, number(0.0, low_open=True))
    # The coefficient under "constant", and the value the "dann" ramp approaches.
    high: float = _key(1.0, number(0.0))


@dataclass(frozen=True)
class LossConfig:
    # Domain-transfer term on the features: none, MMD, CORAL or adversarial (DANN discriminator).
    transfer: str = _key("none", choice("none", "mmd", "coral", "dann"))
    # Weight of the transfer term (the original's trade_off: 1.0).
    transfer_weight: float = _key(1.0, number(0.0))
    mmd: MMDConfig = _section(MMDConfig)
    fisher: FisherConfig = _section(FisherConfig)
    # Weight of entropy minimisation on the predictions (original runs: 0.05); 0 = off.
    entropy_weight: float = _key(0.0, number(0.0))
    grl: GRLConfig = _section(GRLConfig)
    # Batch-statistic losses (MMD, CORAL, Fisher) on the global batch gathered from all ranks
    # ("global": the result does not depend on the number of ranks) or per rank ("local").
    scope: str = _key("global", choice("global", "local"))

    def reads_target(self) -> bool:
        """Whether a term reads the target batch; Fisher reads the source's features and labels only.
        Without one (no adaptation, the oracle) the source batch passes through the network alone."""
        return self.transfer != "none" or self.entropy_weight > 0


@dataclass(frozen=True)
class OptimConfig:
    # Optimizer: Adam (the original), AdamW (decoupled weight decay) or SGD with Nesterov momentum.
    name: str = _key("adam", choice("adam", "adamw", "sgd"))
    # Base learning rate (the original examples: 1e-3).
    lr: float = _key(1e-3, number(0.0, low_open=True))
    # Weight decay (Adam: coupled L2, as the original).
    weight_decay: float = _key(1e-4, number(0.0))
    # Adam/AdamW betas (the original: 0.7, 0.8).
    betas: tuple[float, float] = _key((0.7, 0.8), _betas())
    # SGD momentum (Nesterov when > 0).
    momentum: float = _key(0.9, number(0.0, 1.0, high_open=True))
    # Learning-rate multiplier for the new heads: bottleneck, classifier, discriminator and Fisher
    # centres (the original: 10).
    head_lr_mult: float = _key(10.0, number(0.0, low_open=True))
    # DANN's domain discriminator's multiplier; null = head_lr_mult. The original code differs: its
    # FisherDA trained the discriminator at 10, DeepMerge's own ADA at 0.1 (--ad_net_mult_lr).
    discriminator_lr_mult: float | None = _key(None, optional(number(0.0, low_open=True)))
    # Clip the global gradient norm to this value; null = no clipping.
    grad_clip: float | None = _key(None, optional(number(0.0, low_open=True)))
    # Learning-rate schedule: "constant"; "warmup-cosine" (linear warmup over warmup_steps, cosine
    # decay to min_lr at the last step); "cyclic" (the original's triangle between lr/10 and lr, period
    # 0.9 * cycle_epochs epochs); "inv" (lr * (1 + gamma * step) ** -power, every step).
    schedule: str = _key("cyclic", choice("constant", "warmup-cosine", "cyclic", "inv"))
    # warmup-cosine: steps of linear warmup.
    warmup_steps: int = _key(0, integer(0))
    # warmup-cosine: final learning rate (at most lr).
    min_lr: float = _key(0.0, number(0.0))
    # cyclic: the original's cycle_length, in epochs.
    cycle_epochs: float = _key(5.0, number(0.0, low_open=True))
    # inv: gamma and power (the original: 0.001 and 0.75).
    gamma: float = _key(0.001, number(0.0, low_open=True))
    power: float = _key(0.75, number(0.0, low_open=True))


@dataclass(frozen=True)
class TrainConfig:
    # Epochs; an epoch is one pass over the source training split (the original: 200).
    epochs: int = _key(200, integer(1))
    # Stop after this many optimizer steps when > 0 (0 = epochs decide).
    max_steps: int = _key(0, integer(0))
    # Images per domain per rank in each step (the original: 128 source + 128 target).
    batch_size: int = _key(128, integer(1))
    # Mixed precision: "none", "bf16" (autocast, no loss scaling) or "fp16" (autocast + GradScaler).
    amp: str = _key("none", choice("none", "bf16", "fp16"))
    # NHWC memory format for convolutions (faster with tensor cores).
    channels_last: bool = _key(False, boolean())
    # torch.compile the model (the loss terms stay eager: docs/training.md).
    compile: bool = _key(False, boolean())
    # Deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN deterministic and not
    # benchmarking, a fixed cuBLAS workspace): a resumed run ends bit-identical to an
    # uninterrupted one on GPU too, at a cost in speed (docs/training.md). CPU runs are anyway.
    deterministic: bool = _key(False, boolean())
    # Evaluate on the validation splits (and maybe save best.pt) every this many epochs.
    eval_every: int = _key(1, integer(1))
    # Write a step record to the metrics log every this many steps.
    log_every: int = _key(50, integer(1))
    # Also save last.pt every this many steps (0 = only at the end of each epoch).
    checkpoint_every: int = _key(0, integer(0))
    # Stop after this many evaluations without a better selection score (0 = off).
    early_stopping: int = _key(0, integer(0))
    # Signals on which every rank finishes its step, saves last.pt and exits for requeue.
    signals: tuple[str, ...] = _key(("SIGTERM", "SIGUSR1", "SIGUSR2"), _signal_names())


@dataclass(frozen=True)
class SelectConfig:
    # Which evaluation picks best.pt: "source-val-acc" (the original); label-free validators on the
    # target validation split: "im" (information maximization), "snd" (soft neighbourhood density),
    # "dev" (deep embedded validation), "bnm" (batch nuclear norm), "entropy" (minus the mean
    # prediction entropy); "oracle-target-acc" uses target labels, and results selected with it are
    # marked as oracle.
    criterion: str = _key("source-val-acc", choice(*CRITERIA))
    # Also score every label-free criterion at each evaluation, and evaluate the target's test split
    # beside them (for reporting only: nothing is chosen with it): what a study's validator table
    # compares with the oracle (dmhpc/launch/validators.py). Costs a test pass per evaluation.
    # Refused as a change on resume, though it trains nothing differently: the table would read a
    # run whose evaluations before the resume have no scores as one that had them all.
    all_validators: bool = _key(False, boolean())


@dataclass(frozen=True)
class Config:
    # Seed of model initialisation, data order and augmentation (numpy and scikit-learn take seeds
    # below 2**32).
    seed: int = _key(0, integer(0, SEED_MAX))
    # Debug run: a few batches, autograd anomaly detection, fast feedback.
    debug: bool = _key(False, boolean())
    run: RunConfig = _section(RunConfig)
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    loss: LossConfig = _section(LossConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)
    select: SelectConfig = _section(SelectConfig)


# --- merging with provenance -----------------------------------------------------------------------
# `origin` maps each dotted key to the file (or "command line") that set it last, so errors found
# after merging still name the right place.

def _merge(dst: dict, src: Mapping, origin: dict, label: str, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        before, origin[dotted] = origin.get(dotted), label
        if value is None and isinstance(dst.get(key), dict):
            continue  # a section whose keys are all commented out changes nothing it inherits
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, label, dotted + ".")
        elif isinstance(value, Mapping):
            if _is_key(Config, dotted.split(".")):  # keys under a setting: the value is this layer's fault
                dst[key] = value  # (said by _build, naming this layer)
                continue
            if dst.get(key) is not None:  # a list or a value where a section goes: its settings were dropped
                raise DmhpcError(f"{before}: {dotted}: expected a mapping of {dotted} keys, got {show(dst[key])}")
            dst[key] = {}
            _merge(dst[key], value, origin, label, dotted + ".")
        else:
            dst[key] = value


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict, list[str]]:
    """The merged data of `path` and its bases, which file set each key (`origin`), and the files
    in the order they were merged (the deepest base first)."""
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in (*chain, resolved))
        raise DmhpcError(f"{path}: base: files inherit from each other in a cycle: {names}")
    data = read_yaml(path)
    raw: dict = {}
    origin: dict = {}
    files: list[str] = []
    if "base" in data:
        base = data.pop("base")
        try:
            path_text()(base)
        except Invalid:
            raise DmhpcError(f"{path}: base: expected the path of another config file, got {show(base)} (written "
                             f"out: dmhpc expands no ~ or $VARIABLE)") from None
        # Not normalized: folder/.. through a symlinked folder is the link target's parent, which the
        # file system knows and os.path.normpath does not (it read another file of the same name).
        base_path = path.parent / base
        try:
            found = base_path.is_file()
        except OSError as exc:  # a folder without search permission, a name too long
            raise DmhpcError(f"{path}: base: {base_path}: cannot read: {exc.strerror}") from None
        if not found:
            raise DmhpcError(f"{path}: base: config file not found: {base_path}")
        raw, origin, files = _read_with_bases(base_path, (*chain, resolved))
    _merge(raw, data, origin, str(path))
    return raw, origin, [*files, str(path)]


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value` into the dotted key and the value read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DmhpcError(f"{COMMAND_LINE}: {text!r}: expected KEY=VALUE with a dotted key, e.g. train.batch_size=64")
    if not _DOTTED.match(key):
        raise DmhpcError(f"{COMMAND_LINE}: {key!r}: not a dotted key like train.batch_size")
    try:
        parsed = parse_yaml(value)
    except yaml.YAMLError as exc:
        raise DmhpcError(f"{COMMAND_LINE}: {key}: value {value!r} is {yaml_error(exc)}") from None
    if re.search(r"(^|\s)#", value) and "#" not in show(parsed):  # run.dir=runs/a #b was runs/a
        raise DmhpcError(f"{COMMAND_LINE}: {key}: value {value!r}: YAML reads what follows # as a comment; quote "
                         f"the value to keep it ({key}='\"{value.strip()}\"')")
    return key, parsed


# --- building and checking the dataclasses ---------------------------------------------------------

def _section_type(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _is_key(cls: type, parts: list[str]) -> bool:
    """parts (a dotted key, split) name a setting of the section `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if parts[0] not in fields:
        return False
    section = _section_type(fields[parts[0]])
    return len(parts) == 1 if section is None else len(parts) > 1 and _is_key(section, parts[1:])


def empty_section(key: str, value: Any) -> bool:
    """Whether dotted `key` names a section and `value` sets none of its keys (null or {})."""
    return (value is None or value == {}) and _is_section(Config, key.split("."))


def _is_section(cls: type, parts: list[str]) -> bool:
    """parts (a dotted key, split) name a section within the section `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = _section_type(fields[parts[0]]) if parts[0] in fields else None
    return section is not None and (len(parts) == 1 or _is_section(section, parts[1:]))


def _build(cls: type, data: Any, origin: Mapping[str, str], default_label: str, prefix: str = "") -> Any:
    where = lambda dotted: origin.get(dotted, default_label)  # noqa: E731
    if data is None:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        section = prefix.rstrip(".")
        raise DmhpcError(f"{where(section)}: {section}: expected a mapping of {section} keys, got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            if "." in str(key) and _is_key(cls, str(key).split(".")):  # a command line's key, in a file
                parts, nested = dotted.split("."), show(data[key])
                for part in reversed(parts[1:]):
                    nested = f"{{{part}: {nested}}}"
                hint = f" (dotted keys are for the command line; a file nests them: {parts[0]}: {nested})"
            raise DmhpcError(f"{where(dotted)}: {dotted}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        dotted = f"{prefix}{name}"
        section = _section_type(f)
        if section is not None:
            values[name] = _build(section, data[name], origin, default_label, dotted + ".")
            continue
        try:
            values[name] = f.metadata["check"](data[name])
        except Invalid as exc:
            raise DmhpcError(f"{where(dotted)}: {dotted}: {exc}") from None
    return cls(**values)


def _check_consistency(cfg: Config, origin: Mapping[str, str], default_label: str,
                       files: tuple[str, ...] = ()) -> None:
    """Rules that involve more than one key; the message is placed where the last of them was set
    (an override that broke a file's rule blamed the file)."""
    layers = {**{label: k for k, label in enumerate(files)}, COMMAND_LINE: len(files)}

    def fail(dotted: str, problem: str, *others: str):
        last = max((dotted, *others), key=lambda key: layers.get(origin.get(key), -1))
        said = "" if last == dotted or last not in origin else f" ({last} set here)"
        raise DmhpcError(f"{origin.get(last, default_label)}: {dotted}: {problem}{said}")

    name = cfg.model.name
    if cfg.model.stem != "original" and not name.startswith("resnet"):
        fail("model.stem", f"{show(cfg.model.stem)} applies to ResNet models only, but model.name is {show(name)}",
             "model.name")
    for key in ("dropout", "l2"):
        if getattr(cfg.model, key) is not None and name != "deepmerge":
            fail(f"model.{key}", f"applies to model \"deepmerge\" only, but model.name is {show(name)}", "model.name")
    fisher = cfg.loss.fisher
    if fisher.weight > 0 and fisher.form == "tr" and fisher.inter_weight == 0:
        fail("loss.fisher.inter_weight", "must be > 0 with form \"tr\": the trace ratio divides by it",
             "loss.fisher.form", "loss.fisher.weight")
    if cfg.optim.schedule == "warmup-cosine" and cfg.optim.min_lr > cfg.optim.lr:
        fail("optim.min_lr", f"{cfg.optim.min_lr:g} is above optim.lr {cfg.optim.lr:g}", "optim.lr", "optim.schedule")


def inert_keys(data: Mapping) -> dict[str, tuple[str, ...]]:
    """The dotted keys whose value changes nothing under the configuration `data` (nested, as
    `config_to_dict` gives it), each with the keys whose settings make it so."""
    optim, loss = data.get("optim", {}), data.get("loss", {})
    inert: dict[str, tuple[str, ...]] = {}
    for keys, applies, decider in (
            (("warmup_steps", "min_lr"), optim.get("schedule") == "warmup-cosine", "optim.schedule"),
            (("cycle_epochs",), optim.get("schedule") == "cyclic", "optim.schedule"),
            (("gamma", "power"), optim.get("schedule") == "inv", "optim.schedule"),
            (("momentum",), optim.get("name") == "sgd", "optim.name"),
            (("betas",), optim.get("name") != "sgd", "optim.name")):
        if not applies:
            inert.update({f"optim.{k}": (decider,) for k in keys})
    if loss.get("transfer") != "dann":
        inert.update({f"loss.grl.{k}": ("loss.transfer",) for k in ("schedule", "alpha", "high")})
        inert["optim.discriminator_lr_mult"] = ("loss.transfer",)
    elif loss.get("grl", {}).get("schedule") == "constant":  # alpha shapes the "dann" ramp only
        inert["loss.grl.alpha"] = ("loss.grl.schedule",)
    if loss.get("transfer") != "mmd":
        inert.update({f"loss.mmd.{k}": ("loss.transfer",) for k in ("sigmas", "unbiased", "clamp")})
    if loss.get("transfer") == "none":
        inert["loss.transfer_weight"] = ("loss.transfer",)
    if not loss.get("fisher", {}).get("weight"):
        inert.update({f"loss.fisher.{k}": ("loss.fisher.weight",) for k in ("form", "intra_weight", "inter_weight",
                                                                            "normalize")})
    # The scope is that of the batch-statistic terms; the classification loss is DDP's mean either way.
    if loss.get("transfer") == "none" and not loss.get("fisher", {}).get("weight") and not loss.get("entropy_weight"):
        inert["loss.scope"] = ("loss.transfer", "loss.fisher.weight", "loss.entropy_weight")
    return inert


def _check_inert(cfg: Config, origin: Mapping[str, str], files: list[str]) -> None:
    """Refuse a key set away from its default where it does nothing (a warm-up under the cyclic
    schedule, SGD's momentum for Adam): the run would train without it, and without a word. Only
    where it was set no earlier than the settings that make it inert: a base file's cyclic
    `cycle_epochs` under a schedule the file or the command line chose is layering, not a mistake."""
    data, defaults = config_to_dict(cfg), config_to_dict(Config())

    # Later layers win: each base file before the file based on it, the command line last.
    layers = {**{label: k for k, label in enumerate(files)}, COMMAND_LINE: len(files)}

    def layer(dotted: str) -> int:
        return layers.get(origin.get(dotted), -1)  # -1: the default

    for dotted, deciders in inert_keys(data).items():
        value = _dotted_value(data, dotted)
        if changed_keys({"k": value}, {"k": _dotted_value(defaults, dotted)}) and \
                layer(dotted) >= max(layer(d) for d in deciders):
            said = [f"{d} {show(_dotted_value(data, d))}" for d in deciders]
            settings = " and ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)
            raise DmhpcError(f"{origin.get(dotted, files[-1])}: {dotted}: {show(value)} does nothing with {settings}; "
                             f"remove it (or choose the setting it is for)")


def _check_paths(cfg: Any, origin: Mapping[str, str], default_label: str, prefix: str = "") -> None:
    """Refuse a path key's value that only a shell would expand (`_path_key`)."""
    for f in dataclasses.fields(cfg):
        value, dotted = getattr(cfg, f.name), f"{prefix}{f.name}"
        if _section_type(f) is not None:
            _check_paths(value, origin, default_label, dotted + ".")
        elif "path" in f.metadata:
            try:
                f.metadata["path"](value)
            except Invalid as exc:
                raise DmhpcError(f"{origin.get(dotted, default_label)}: {dotted}: {exc}") from None


def _dotted_value(data: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def config_from_dict(data: Mapping, source: str = "<dict>") -> Config:
    """Build and validate a Config from nested plain data (e.g. a checkpoint's "config" entry)."""
    if not isinstance(data, Mapping):
        raise DmhpcError(f"{source}: expected a mapping of configuration keys, got {type(data).__name__}")
    raw: dict = {}
    _merge(raw, data, {}, source)
    cfg = _build(Config, raw, {}, source)
    _check_consistency(cfg, {}, source)
    return cfg


def override_text(key: str, value: Any) -> str:
    """KEY=VALUE as `load_config` reads it, whatever the value holds (JSON is valid YAML and keeps the
    value's type; a path with " #" or ": " in it read as a comment or a mapping)."""
    return f"{key}={json.dumps(value)}"


@dataclass(frozen=True)
class ConfigFiles:
    """A config file and its bases as read once (`read_config_files`): what a launch builds each of
    its runs' configurations from, so that an edit of the files while it runs reaches none of them."""

    path: Path
    raw: dict  # the merged data
    origin: dict  # which file set each key
    files: tuple[str, ...]  # in the order they were merged (the deepest base first)


def read_config_files(path: str | os.PathLike) -> ConfigFiles:
    raw, origin, files = _read_with_bases(Path(path), ())
    return ConfigFiles(Path(path), raw, origin, tuple(files))


def load_config(path: str | os.PathLike | ConfigFiles, overrides: Iterable[str] = (), *, written: bool = False,
                forwarded: str | None = None) -> Config:
    """Read a YAML config (following `base:`; or take one read, ConfigFiles), apply `KEY=VALUE`
    overrides, and validate. `written` for a configuration dmhpc wrote (a run's config.yaml): what
    an older dmhpc took is not refused (settings that did nothing, paths with ~ or $VARIABLE).
    `forwarded`: the stop signal the launcher passes on to the ranks (slurm/lib.sh's), which
    train.signals must name."""
    read = path if isinstance(path, ConfigFiles) else read_config_files(path)
    path, raw, origin, files = read.path, copy.deepcopy(read.raw), dict(read.origin), list(read.files)
    for item in overrides:
        key, value = parse_override(item)
        if empty_section(key, value):
            # (in a file, a section whose keys are all commented out: it changes nothing, as it says)
            raise DmhpcError(f"{COMMAND_LINE}: {key}: {show(value)} changes nothing: a section is not reset; set its "
                             f"keys ({key}.KEY=VALUE)")
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(raw, nested, origin, COMMAND_LINE)
    cfg = _build(Config, raw, origin, str(path))
    _check_consistency(cfg, origin, str(path), tuple(files))
    if not written:
        _check_paths(cfg, origin, str(path))
        _check_inert(cfg, origin, files)
        if not cfg.train.signals:  # (runs an older dmhpc started with none still resume)
            raise DmhpcError(f"{origin.get('train.signals', str(path))}: train.signals: expected a non-empty list: "
                             f"without one the scheduler's stop kills the ranks with nothing saved")
        other = [s for s in cfg.train.signals if s not in STOP_SIGNAL_NAMES]
        if other:
            raise DmhpcError(f"{origin.get('train.signals', str(path))}: train.signals: {other[0]} is no stop signal; "
                             f"expected some of {', '.join(STOP_SIGNAL_NAMES)}")
        if forwarded and forwarded not in cfg.train.signals:
            raise DmhpcError(f"{origin.get('train.signals', str(path))}: train.signals "
                             f"{', '.join(cfg.train.signals)}: the batch script passes the time limit's warning and "
                             f"its stops on to the ranks as {forwarded}, which the ranks would ignore (no checkpoint, "
                             f"no requeue): add {forwarded}")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Nested plain data (dicts, lists, str, int, float, bool, None): YAML-, JSON- and checkpoint-safe."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (atomically); `load_config` reads it back equal but
    for the keys that do nothing under it (`inert_keys`), written at their defaults: set there
    beside the setting that makes them inert (a base file's cycle_epochs, a later schedule), the
    file was refused as a --config of its own."""
    data, defaults = config_to_dict(cfg), config_to_dict(Config())
    for dotted in inert_keys(data):
        section, key = dotted.rsplit(".", 1)
        into, default = data, defaults
        for part in section.split("."):
            into, default = into[part], default[part]
        into[key] = default[key]
    atomic_write(path, "# resolved dmhpc configuration\n" + dump_yaml(data))


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configuration dicts (lists and tuples alike)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            keys.append(f"{prefix}{key}")
    return keys
