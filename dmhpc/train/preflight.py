"""Refuse at start what could only fail later: the trainer's checks before its first step.

Each is a one-line DmhpcError on every rank, naming the key or the data set and the problem:

- the data sets: their manifests, split lists and shards (dmhpc/data/check.py; with
  data.verify=checksums every shard's SHA-256 too, the shards shared among the ranks);
- what training needs of them: a labelled source (an unlabelled target is fine, with a label-free
  selection criterion), non-empty validation and test splits (checkpoints are chosen on
  validation data and the chosen one is tested), at most as many classes as the model has, a
  source training split with more than one class, source and target images of one shape, and no
  target validation or test object in the source's training split where both were prepared from
  one file of object ids (noted, not refused, for data sets of as many images without ids);
- the model takes the images: one forward pass of a zero batch of the data's shape;
- the transfer loss gets what it needs of a batch: enough rows per domain (CORAL, the unbiased
  MMD) and, for MMD, no more rows than loss.mmd.max_samples (checked with the data sets);
- a run resumed in the middle of an epoch keeps the world size and loader kind that epoch began
  with (the order of its rows depends on both).
"""

from __future__ import annotations

import math

import torch

from dmhpc.batch_rows import check_batch_rows
from dmhpc.data.check import check_dataset, twins_note, twins_trained_on
from dmhpc.data.loaders import KINDS, ORDER, RESUMED_RESIDENT, STREAMED
from dmhpc.data.batches import normalization
from dmhpc.data.shards import SPLITS, fingerprint, is_labelled, load_manifest
from dmhpc.distributed import agree, gather, on_main
from dmhpc.errors import DmhpcError
from dmhpc.names import CRITERIA, DOMAINS, LABEL_FREE
from dmhpc.train.metrics import SND_MIN_ROWS
from dmhpc.train.objective import NUM_CLASSES



def load_manifests(cfg) -> dict[str, dict]:
    """{"source": manifest, "target": manifest}, each rank reading its own (they can be large)."""
    def read():
        out = {}
        for role in DOMAINS:
            directory = getattr(cfg.data, role)
            try:
                out[role] = load_manifest(directory)
            except DmhpcError as exc:
                raise DmhpcError(f"data.{role}: {exc}") from None
        return out

    return agree(read)


def data_identity(cfg, manifests: dict) -> dict:
    """What run.json records of each data set: its path and fingerprint (see RunDir.claim), and the
    per-channel mean and std it is normalized with, which `dmhpc predict` and `export` reuse."""
    stats = normalization(cfg.data.source, manifests["source"], cfg.data.target, manifests["target"],
                          cfg.data.normalize)
    return {role: {"path": str(getattr(cfg.data, role)), "fingerprint": fingerprint(manifests[role]),
                   "shape": manifests[role]["shape"], "mean": mean, "std": std}
            for role, (mean, std) in zip(DOMAINS, stats)}


def check_data(cfg, manifests: dict, dist) -> None:
    """Everything about the two data sets that would otherwise fail mid-run or train on nonsense,
    and what the transfer loss needs of their batches."""
    check_batch_rows(cfg, dist.world_size)
    checksums = cfg.data.verify == "checksums"
    dirs = {role: getattr(cfg.data, role) for role in DOMAINS}
    for role in DOMAINS:
        if role == "target" and cfg.data.trains_on_target():
            break  # a target oracle trains on one data set: check it once
        check_dataset(f"data.{role} {dirs[role]}", dirs[role], manifests[role], checksums=checksums,
                      rank=dist.rank, world_size=dist.world_size, gather=gather)
    if not is_labelled(manifests["source"]):
        raise DmhpcError(f"data.source {dirs['source']}: an unlabelled data set; the source domain is what the "
                         f"classifier learns from and needs labels (an unlabelled survey is a target)")
    if not is_labelled(manifests["target"]) and CRITERIA.get(cfg.select.criterion, False):
        raise DmhpcError(f"select.criterion: {cfg.select.criterion} reads target labels, and data.target "
                         f"{dirs['target']} is unlabelled; choose a label-free criterion ({', '.join(LABEL_FREE)})")
    for role in DOMAINS:
        where, m = f"data.{role} {dirs[role]}", manifests[role]
        for split in SPLITS:
            start, stop = m["rows"][split]
            if stop == start:
                why = {"train": "nothing to train on", "val": "checkpoints are chosen on it",
                       "test": "the chosen checkpoint is tested on it"}[split]
                raise DmhpcError(f"{where}: the {split} split is empty ({why}); prepare it with "
                                 f"--fractions giving {split} a share")
        if m["num_classes"] > NUM_CLASSES:
            raise DmhpcError(f"{where}: {m['num_classes']} classes; the models here tell {NUM_CLASSES} apart "
                             f"(merger or not)")
    val_rows = manifests["target"]["rows"]["val"][1] - manifests["target"]["rows"]["val"][0]
    if cfg.select.criterion == "snd" and val_rows < SND_MIN_ROWS:
        raise DmhpcError(f"select.criterion: snd compares each target validation image with the others, and data.target "
                         f"{dirs['target']} has {val_rows} in its val split; it needs at least {SND_MIN_ROWS} "
                         f"(prepare it with a larger val fraction, or choose another criterion)")
    present = [k for k, c in manifests["source"]["counts"]["train"].items() if c > 0]
    if len(present) < 2:
        raise DmhpcError(f"data.source {dirs['source']}: the training split holds class {present[0] if present else '-'} "
                         f"only; a classifier needs examples of both classes")
    if manifests["source"]["shape"] != manifests["target"]["shape"]:
        raise DmhpcError(f"data.target {dirs['target']}: images {manifests['target']['shape']} differ in shape "
                         f"from the source's {manifests['source']['shape']}")
    if not cfg.data.trains_on_target():
        problem = on_main(lambda: twins_trained_on(dirs["source"], manifests["source"], dirs["target"],
                                                   manifests["target"], adapts=cfg.loss.reads_target()))
        if problem is not None:
            raise DmhpcError(f"data.target {dirs['target']}: {problem}")


def data_note(cfg, manifests: dict) -> str | None:
    """What the start line notes of the two data sets (see `twins_note`)."""
    return None if cfg.data.trains_on_target() else twins_note(manifests["source"], manifests["target"])


def check_model_input(cfg, backbone: torch.nn.Module, shape: list[int], device: torch.device, rows: int) -> None:
    """One forward pass of two zero images of `shape` in eval mode: no weights, statistics or RNG change.

    Also refused: a batch-norm layer that a training forward pass of `rows` rows (train.batch_size,
    twice that where the target passes with the source) gives one value per channel, as a ResNet's
    1x1 maps of small images at train.batch_size 1 do: torch raises it at the first step, in a traceback.
    """
    was_training = backbone.training
    backbone.eval()
    per_row = []  # values per channel and row that each batch-norm layer sees
    hooks = [m.register_forward_hook(lambda m, args, out: per_row.append((m, math.prod(args[0].shape[2:]))))
             for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            backbone(torch.zeros((2, *shape), device=device))
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or ["shape mismatch"])[0]
        raise DmhpcError(f"data.source {cfg.data.source}: images {'x'.join(map(str, shape))} do not fit "
                         f"model.name {cfg.model.name}: {reason}") from None
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    names = {m: name for name, m in backbone.named_modules()}
    starved = [names[m] for m, values in per_row if rows * values < 2]
    if starved:
        raise DmhpcError(f"train.batch_size {cfg.train.batch_size}: a training forward pass of {rows} row"
                         f"{'s' if rows > 1 else ''} gives batch-norm layer {starved[0]} of model.name "
                         f"{cfg.model.name} one value per channel on images {'x'.join(map(str, shape))}, which "
                         f"it cannot normalize; use a train.batch_size of at least 2 (or larger images)")


def loader_kind(cfg, progress, world_size: int) -> str:
    """The data.loader to build. A run stopped in the middle of an epoch resumes it with that
    epoch's world size and a loader of its order (`ORDER`: dali and torch read the same): the rest
    of its rows in another order would repeat some rows and skip others. `auto` follows the
    epoch's order (dali where it runs now, else torch; gpu-resident); a kind of another order
    asked for, or another world size, is a one-line error.

    At an epoch's start the kind may change. `auto` keeps a streamed run streamed (its rows' order),
    where memory freed since would now hold its data: decided again, the resumed run read other
    batches than an uninterrupted one. A resident run is decided again (the quarter of memory is
    what leaves the model its room); the loop says when its order changes."""
    if not progress.loader:  # a run's first start (or a checkpoint older than the record)
        return cfg.data.loader
    streamed = ORDER.get(progress.loader) == ORDER["torch"]
    if progress.step_in_epoch == 0:
        return STREAMED if cfg.data.loader == "auto" and streamed else cfg.data.loader
    where = f"the run stopped at step {progress.step_in_epoch} of epoch {progress.epoch}"
    if progress.world_size != world_size:
        raise DmhpcError(f"world size {world_size}: {where} with {progress.world_size} ranks; resume it with "
                         f"{progress.world_size} ranks (the world size may change at an epoch's end)")
    if cfg.data.loader == "auto" or cfg.data.loader == progress.loader == "gpu-resident":
        # (dali gone where a requeued job resumes: torch, in the same order)
        return STREAMED if streamed else RESUMED_RESIDENT
    if ORDER[cfg.data.loader] != ORDER.get(progress.loader):
        alike = " or ".join(k for k in KINDS if ORDER[k] == ORDER.get(progress.loader)) or progress.loader
        raise DmhpcError(f"data.loader {cfg.data.loader}: {where} with data.loader {progress.loader}; resume it "
                         f"with {alike}, or auto (the loader may change at an epoch's end)")
    return cfg.data.loader
