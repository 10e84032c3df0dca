"""Training throughput over models x batch sizes x AMP x channels_last x loaders, one step as the trainer does it.

    python bench/throughput.py                                   # on a GPU: the full grid
    python bench/throughput.py --device cpu --models deepmerge2 --batches 16 --loaders gpu-resident --steps 3

Each row builds the trainer's loader (`dmhpc.data.loaders.make_train_loader`) and objective
(`DomainAdaptation`, MMD + Fisher + entropy as configs/deepmerge-mmd-fisher-entropy.yaml, or DANN
for ResNets as configs/resnet18-dann.yaml) and times optimizer steps after a warm-up, with the
device synchronised. Images/s counts source and target images. The data are random 3x75x75 images
written once as sharded HDF5 in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmhpc.config import load_config
from dmhpc.data.loaders import make_train_loader
from dmhpc.data.shards import write_dataset
from dmhpc.models import param_groups
from dmhpc.train.objective import DomainAdaptation

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"deepmerge2": "deepmerge-mmd-fisher-entropy.yaml", "resnet18": "resnet18-dann.yaml"}


def measure(data: Path, model: str, batch: int, amp: str, channels_last: bool, loader_kind: str, device,
            steps: int, warmup: int) -> float:
    cfg = load_config(ROOT / "configs" / CONFIGS[model])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model))
    loader = make_train_loader(loader_kind, data / "source", data / "target", batch_size=batch, rank=0, world_size=1,
                               seed=0, device=device, augment=cfg.data.augment, num_workers=2)
    net = DomainAdaptation(cfg, seed=0).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(param_groups(net.backbone, discriminator=net.discriminator, fisher=net.fisher), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    batches = (b for epoch in itertools.count() for b in loader.epoch(epoch))
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            xs, ys, xt, _ = next(batches)
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
                xt = xt.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss, _, _ = net(xs, ys, xt, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return 2 * batch * steps / (time.perf_counter() - t0)
    finally:
        loader.close()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256], help="per domain")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--loaders", nargs="+", default=["gpu-resident", "dali", "torch"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=4096, help="images per domain")
    args = parser.parse_args()
    device = torch.device(args.device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up")
    print("| model | batch/domain | amp | channels_last | loader | images/s |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for domain in ("source", "target"):
            images = rng.standard_normal((args.images, 3, 75, 75), dtype=np.float32)
            write_dataset(images, np.arange(args.images) % 2, None, data / domain, shard_size=2048)
        for model, batch, amp, cl, kind in itertools.product(args.models, args.batches, args.amp, (False, True),
                                                              args.loaders):
            rate = measure(data, model, batch, amp, cl, kind, device, args.steps, args.warmup)
            print(f"| {model} | {batch} | {amp} | {'on' if cl else 'off'} | {kind} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
