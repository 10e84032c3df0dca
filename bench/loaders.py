"""Training loader speed: images/s of each kind, and (CUDA only) its overhead on a training step.

    python bench/loaders.py                   # images/s per kind: 3x75x75 float32, batch 128
    python bench/loaders.py --gpu-overhead    # CUDA only: step time fed by each kind vs synthetic data
    python bench/loaders.py --kinds torch,dali --pieces 8,1 --rounds 2   # pieces of a batch vs whole blocks

Writes two data sets of random 3x75x75 float32 images (source and target) to a temporary
directory, then reads whole epochs. Images/s counts source plus target images; the first epoch
(worker start, first reads) is timed apart as `first`, the figure is over the later ones. The
files are freshly written, so reads come from the page cache: this measures the loader, not the
file system. `--pieces` sets how many pieces of consecutive rows `dali` and `torch` read per batch
(dmhpc.data.batches.PIECES; 1 reads whole batch-sized blocks, what they did before) and
`--rounds` repeats the table, so that the settings are timed side by side, alternating.

`--gpu-overhead` times training steps of `--model` (default deepmerge; forward and backward on
source plus target, cross-entropy on the source, SGD) fed by each loader, against the same steps
on tensors already on the device. Overhead = 1 - synthetic step time / loader step time; the
trainer's target is at most 10%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmhpc.data import batches
from dmhpc.data.loaders import KINDS, dali_runs, make_train_loader
from dmhpc.data.shards import write_dataset
from dmhpc.models.registry import MODELS, build_model

SHAPE = (3, 75, 75)


def make_data(root: Path, n: int) -> tuple[Path, Path]:
    dirs = []
    for k, name in enumerate(("source", "target")):
        rng = np.random.default_rng(k)
        images = rng.standard_normal((n, *SHAPE), dtype=np.float32)
        write_dataset(images, rng.integers(0, 2, n), None, root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


def loader_for(kind, dirs, args, device):
    return make_train_loader(kind, *dirs, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
                             device=device, augment=True, num_workers=args.workers)


def throughput(kind: str, dirs, args) -> dict:
    t0 = time.perf_counter()
    loader = loader_for(kind, dirs, args, "cpu")
    build = time.perf_counter() - t0
    images, seconds = [], []
    try:
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            images.append(sum(xs.shape[0] + xt.shape[0] for xs, _, xt, _ in loader.epoch(epoch)))
            seconds.append(time.perf_counter() - t0)
    finally:
        loader.close()
    # Over the later epochs, images over their time: the mean of the epochs' rates overstated it
    # wherever they differed (0.05 s and 0.2 s epochs of 200 images: 2,500 for 1,600 images/s).
    later = [n / t for n, t in zip(images[1:], seconds[1:])]
    return {"build_s": build, "first": images[0] / seconds[0], "rate": sum(images[1:]) / sum(seconds[1:]),
            "spread": (min(later), max(later))}


def gpu_overhead(dirs, args, device: torch.device) -> int:
    """Print each loader's overhead on a training step; returns how many kinds failed."""
    model = build_model(args.model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(xs, ys, xt):
        _, logits = model(torch.cat([xs, xt]))
        loss = torch.nn.functional.cross_entropy(logits[: len(xs)], ys) + logits[len(xs):].square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(batches) -> tuple[float, int]:
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for xs, ys, xt, _ in batches:
            step(xs, ys, xt)
            n += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t0, n

    b = args.batch_size
    fixed = (torch.randn(b, *SHAPE, device=device), torch.randint(0, 2, (b,), device=device),
             torch.randn(b, *SHAPE, device=device), torch.randint(0, 2, (b,), device=device))
    name = torch.cuda.get_device_name(device)
    print(f"loader overhead on a training step, {name}, batch {b} source + {b} target, 3x75x75 float32", flush=True)
    print(f"{'kind':<14}{'loader ms/step':>16}{'synthetic ms/step':>20}{'overhead':>10}", flush=True)
    failed = 0
    for kind in args.kinds:  # each printed as measured: a later kind that hangs or fails keeps the earlier
        try:
            loader = loader_for(kind, dirs, args, device)
            try:
                timed(loader.epoch(0))  # warm-up: workers, cuDNN autotuning, first reads
                seconds, steps = 0.0, 0
                for epoch in range(1, args.epochs):
                    s, n = timed(loader.epoch(epoch))
                    seconds, steps = seconds + s, steps + n
            finally:
                loader.close()
        except Exception as exc:
            print(f"{kind:<14}failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}", flush=True)
            failed += 1
            continue
        synthetic, _ = timed([fixed] * steps)
        with_loader, synthetic = seconds / steps, synthetic / steps
        print(f"{kind:<14}{1e3 * with_loader:>16.2f}{1e3 * synthetic:>20.2f}{1 - synthetic / with_loader:>10.1%}",
              flush=True)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="images per domain (70%% are training rows)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per kind, the first one timed apart")
    parser.add_argument("--workers", type=int, default=2, help="reading processes of dali and torch")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated loader kinds")
    parser.add_argument("--pieces", default=str(batches.PIECES),
                        help="comma-separated pieces per batch of dali and torch to time (default: the trainer's)")
    parser.add_argument("--rounds", type=int, default=1, help="times the table is measured, alternating")
    parser.add_argument("--gpu-overhead", action="store_true", help="time training steps on the GPU (needs CUDA)")
    parser.add_argument("--model", default="deepmerge", choices=sorted(MODELS), help="model of --gpu-overhead")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the data sets (default: system temp)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is warm-up, timed apart)")
    if args.gpu_overhead and not torch.cuda.is_available():
        print("--gpu-overhead needs a CUDA device; none here", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0) if args.gpu_overhead else torch.device("cpu")
    args.kinds = args.kinds.split(",")
    args.pieces = [int(p) for p in args.pieces.split(",")]
    if args.gpu_overhead and args.pieces != [batches.PIECES]:
        parser.error("--pieces: times the CPU table only")
    if "dali" in args.kinds and dali_runs(device):  # importable is not enough: it must run on this device
        print(f"(loader dali left out: {dali_runs(device)})", flush=True)
        args.kinds.remove("dali")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        dirs = make_data(Path(tmp), args.images)
        seconds = time.perf_counter() - t0
        print(f"wrote 2 x {args.images} images of {'x'.join(map(str, SHAPE))} float32 in {seconds:.1f} s")
        if args.gpu_overhead:
            return 1 if gpu_overhead(dirs, args, device) else 0  # every kind ran; a failed one is not a pass
        print(f"images/s (source + target), batch {args.batch_size}, {args.workers} workers, CPU device, "
              f"epochs 2-{args.epochs} (first epoch apart)")
        print(f"{'round':<7}{'kind':<14}{'pieces':>7}{'images/s':>10}{'min-max':>18}{'first epoch':>13}{'build s':>9}")
        for round_ in range(args.rounds):
            for kind in args.kinds:
                # gpu-resident reads no pieces: once a round
                for pieces in args.pieces if kind in ("dali", "torch") else [batches.PIECES]:
                    batches.PIECES = pieces  # forked workers inherit it
                    r = throughput(kind, dirs, args)
                    lo, hi = r["spread"]
                    print(f"{round_:<7}{kind:<14}{pieces if kind in ('dali', 'torch') else '-':>7}{r['rate']:>10.0f}"
                          f"{f'{lo:.0f}-{hi:.0f}':>18}{r['first']:>13.0f}{r['build_s']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
