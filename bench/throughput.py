"""Training throughput over models x batch sizes x AMP x channels_last x loaders, one step as the trainer does it.

    python bench/throughput.py                                   # on a GPU: the full grid
    python bench/throughput.py --device cpu --models deepmerge2 --batches 16 --loaders gpu-resident --steps 3

Each row builds the trainer's own parts from the shipped config (MMD + Fisher + entropy as
configs/deepmerge-mmd-fisher-entropy.yaml, or DANN for ResNets as configs/resnet18-dann.yaml): its
loader, `TrainState` (model, optimizer, grad scaler), `TrainStep` and `EpochMeter`, and times the
steps after a warm-up, with the device synchronised. Images/s counts source and target images. The data are random 3x75x75 images
written once as sharded HDF5 in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmhpc.config import load_config
from dmhpc.data.loaders import dali_runs, make_train_loader
from dmhpc.data.shards import load_manifest, write_dataset
from dmhpc.distributed import DistInfo
from dmhpc.train.meter import EpochMeter
from dmhpc.train.state import TrainState
from dmhpc.train.step import TrainStep, determinism

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"deepmerge2": "deepmerge-mmd-fisher-entropy.yaml", "resnet18": "resnet18-dann.yaml"}


def trainer_parts(data: Path, model: str, batch: int, amp: str, channels_last: bool, loader_kind: str, device,
                  augment: bool | None = None, compiled: bool = False):
    """The trainer's own loader, TrainState, TrainStep and EpochMeter for one configuration."""
    overrides = [f"model.name={model}", f"train.batch_size={batch}", f"train.amp={amp}",
                 f"train.channels_last={str(channels_last).lower()}", f"data.loader={loader_kind}",
                 f"train.compile={str(compiled).lower()}",
                 f"data.source={data / 'source'}", f"data.target={data / 'target'}", "data.num_workers=2"]
    if augment is not None:
        overrides.append(f"data.augment={str(augment).lower()}")
    cfg = load_config(ROOT / "configs" / CONFIGS[model], overrides)
    dist = DistInfo(0, 0, 1, device, None)
    loader = make_train_loader(cfg.data.loader, cfg.data.source, cfg.data.target, batch_size=batch, rank=0,
                               world_size=1, seed=cfg.seed, device=device, augment=cfg.data.augment,
                               normalize=cfg.data.normalize, num_workers=cfg.data.num_workers,
                               channels_last=cfg.train.channels_last)
    torch.manual_seed(cfg.seed)
    state = TrainState.build(cfg, device, load_manifest(cfg.data.source)["shape"][0])
    step = TrainStep(cfg, state, dist, total_steps=10**9, steps_per_epoch=len(loader))
    return cfg, loader, state, step


def trainer_stepper(data: Path, model: str, batch: int, amp: str, channels_last: bool, loader_kind: str, device,
                    augment: bool | None = None, compiled: bool = False):
    """(one, close): `one()` runs one training step as the loop does, end to end: the loader's next
    batch, `TrainStep`, and `EpochMeter`'s per-step bookkeeping."""
    cfg, loader, state, step = trainer_parts(data, model, batch, amp, channels_last, loader_kind, device, augment,
                                             compiled)
    meter = EpochMeter(device, watch_loss=amp != "fp16")
    batches = (b for epoch in itertools.count() for b in loader.epoch(epoch))
    counter = itertools.count()

    def one() -> None:
        i, b = next(counter), next(batches)
        terms, outputs = step(i, b)
        meter.add(i + 1, terms, outputs, b[1], b[3])

    return one, loader.close


@contextlib.contextmanager
def kernels_set(kernels: str):
    """"default": what the trainer runs (cuDNN's heuristics); "deterministic": train.deterministic=true;
    "autotuned": cuDNN times the candidate algorithms of each new shape (torch.backends.cudnn.benchmark),
    which the trainer does not do: measured to decide whether it should."""
    with determinism(kernels == "deterministic"):
        torch.backends.cudnn.benchmark = kernels == "autotuned"
        yield


def measure(data: Path, model: str, batch: int, amp: str, channels_last: bool, loader_kind: str, device,
            steps: int, warmup: int, augment: bool | None = None, compiled: bool = False) -> float:
    """Images/s (source + target) of the trainer's step, end to end (see `trainer_stepper`); a
    compiled row compiles in its warm-up steps."""
    one, close = trainer_stepper(data, model, batch, amp, channels_last, loader_kind, device, augment, compiled)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            one()
        _sync(device)
        return 2 * batch * steps / (time.perf_counter() - t0)
    finally:
        close()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256], help="per domain")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--loaders", nargs="+", default=["gpu-resident", "dali", "torch"])
    parser.add_argument("--kernels", nargs="+", default=["default"], choices=["default", "deterministic", "autotuned"],
                        help="see kernels_set")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"], help="train.compile")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=4096, help="images per domain")
    args = parser.parse_args()
    if "deterministic" in args.kernels:
        if len(args.kernels) > 1:  # the others would run with its cuBLAS workspace, or it with theirs
            parser.error("--kernels deterministic runs alone: cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call, as the trainer
    device = torch.device(args.device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.images} images per domain", flush=True)
    print("| model | batch/domain | amp | channels_last | loader | kernels | compiled | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for domain in ("source", "target"):
            images = rng.standard_normal((args.images, 3, 75, 75), dtype=np.float32)
            write_dataset(images, np.arange(args.images) % 2, None, data / domain, shard_size=2048)
        loaders = []
        for kind in args.loaders:  # a loader that cannot run here is said once, not failed on every row
            problem = dali_runs(device) if kind == "dali" else None
            if problem:
                print(f"(loader dali left out: {problem})", flush=True)
            else:
                loaders.append(kind)
        failed = 0
        for model, batch, amp, cl, kind, kernels, compiled in itertools.product(
                args.models, args.batches, args.amp, (False, True), loaders, args.kernels, args.compile):
            row = f"| {model} | {batch} | {amp} | {'on' if cl else 'off'} | {kind} | {kernels} | {compiled} |"
            try:
                with kernels_set(kernels):
                    rate = measure(data, model, batch, amp, cl, kind, device, args.steps, args.warmup,
                                   compiled=compiled == "on")
            except Exception as exc:  # one failing row (out of memory, say) leaves the rest of the grid to run
                print(f"{row} failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]} |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                failed += 1
                continue
            print(f"{row} {rate:,.0f} |", flush=True)
    return 1 if failed else 0  # every row ran; a failed one is not a passed grid


if __name__ == "__main__":
    raise SystemExit(main())
