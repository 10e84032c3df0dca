"""Training runs at once on one machine: the grid launcher's local executor sharing the cores.

K copies of a short run (seeds 1..K, random 3x75x75 images, bf16 + channels_last as the laptop
study) go in as one local grid with array_parallelism K. The launcher gives each rank
OMP_NUM_THREADS = cores / K unless it is set: `--threads N` sets it, as a user would, to measure
what the launcher avoids. Prints each run's CPU threads and images/s after its first epoch
(warm-up), and their sum.

    python bench/local_jobs.py --runs 1                 # one run alone: the reference
    python bench/local_jobs.py --runs 3                 # three at once, threads from the launcher
    python bench/local_jobs.py --runs 3 --threads 2     # three at once, 2 threads each
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from dmhpc.data.shards import write_dataset
from dmhpc.launch import launch_grid
from dmhpc.run import RunDir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs at once (default 3)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every rank (default: the launcher's)")
    parser.add_argument("--model", default="resnet18", help="model.name (default resnet18)")
    parser.add_argument("--images", type=int, default=2000, help="images per domain (default 2000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, the first not counted (default 3)")
    parser.add_argument("--batch-size", type=int, help="train.batch_size (default: the configuration's)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for name in ("pristine", "noisy"):
            images = rng.normal(0.0, 1.0, (args.images, 3, 75, 75)).astype(np.float32)
            write_dataset(images, np.arange(args.images) % 2, None, tmp / name, shard_size=512, seed=0)
        out = tmp / "runs"
        launch_grid({
            "base": str(ROOT / "configs" / "deepmerge-noda.yaml"), "out": str(out), "executor": "local",
            "overrides": {"data.source": str(tmp / "pristine"), "data.target": str(tmp / "noisy"),
                          "model.name": args.model, "train.epochs": args.epochs, "train.amp": "bf16",
                          "train.channels_last": True, "train.early_stopping": 0,
                          **({"train.batch_size": args.batch_size} if args.batch_size else {})},
            "grid": {"seed": list(range(1, args.runs + 1))},
            "slurm": {"array_parallelism": args.runs, "time": 60}})

        print(f"\n{args.model}, {args.runs} run(s) at once, {args.images} images per domain, "
              f"{args.epochs} epochs; {platform.processor() or platform.machine()}, "
              f"{len(os.sched_getaffinity(0))} CPUs")
        print("| run | CPU threads | images/s after epoch 0 (per epoch) | mean |")
        print("|---|---:|---|---:|")
        total = 0.0
        for run in sorted(out.glob("seed=*")):
            records = RunDir(run).read_log()
            threads = next(r["cpu_threads"] for r in records if r["kind"] == "setup")
            epochs = [r for r in records if r["kind"] == "epoch" and r["epoch"] > 0]
            rates = [r["images_per_s"] for r in epochs]
            # Images over time, not the mean of the epochs' rates (which overstates an uneven run's).
            seconds = [r["step_time_s"] * r["steps"] for r in epochs]
            mean = sum(x * t for x, t in zip(rates, seconds)) / sum(seconds)
            total += mean
            print(f"| {run.name} | {threads} | {', '.join(f'{x:.0f}' for x in rates)} | {mean:.0f} |")
        print(f"| all | | | **{total:.0f}** |")


if __name__ == "__main__":
    main()
