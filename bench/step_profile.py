"""Where one training step's time goes: host against device, and the operators that take it.

    python bench/step_profile.py --model deepmerge2 --batch 512 --amp bf16 --channels-last   # on a GPU
    python bench/step_profile.py --device cpu --batch 8 --images 64 --steps 2                 # a check

The trainer's own step (bench/throughput.py's `trainer_stepper`: loader, TrainStep, EpochMeter) on
random 3x75x75 images. After `--warmup` steps it times `--steps` steps back to back (the images/s
the trainer gets), then each of `--steps` steps alone, from an empty queue: the host's time to issue
it and the time until the device has finished it. Where the two are close, the host bounds the
step. (Issued back to back, the host's time says nothing of the kind: once the launch queue is full
it waits for the device, whichever bounds the step.) Then torch.profiler over `--profile-steps`
steps prints the operators by device time (CUDA) and by host time, totals over those steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from dmhpc.data.shards import write_dataset
from throughput import CONFIGS, _sync, trainer_stepper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deepmerge2", choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=512, help="per domain")
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=8192, help="images per domain")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, batch {args.batch} + {args.batch}, amp {args.amp}, channels_last "
          f"{'on' if args.channels_last else 'off'}, {name}, torch {torch.__version__}", flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for domain in ("source", "target"):
            write_dataset(rng.standard_normal((args.images, 3, 75, 75), dtype=np.float32), np.arange(args.images) % 2,
                          None, data / domain, shard_size=2048)
        one, close = trainer_stepper(data, args.model, args.batch, args.amp, args.channels_last, "gpu-resident",
                                     device)
        try:
            for _ in range(args.warmup):
                one()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one()
            _sync(device)
            together = time.perf_counter() - t0
            print(f"back to back: {1e3 * together / args.steps:.2f} ms/step "
                  f"({2 * args.batch * args.steps / together:,.0f} images/s)", flush=True)
            issued, finished = [], []
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                one()
                issued.append(time.perf_counter() - t0)
                _sync(device)
                finished.append(time.perf_counter() - t0)
            print(f"one at a time, medians: host {1e3 * float(np.median(issued)):.2f} ms/step to issue, "
                  f"{1e3 * float(np.median(finished)):.2f} ms/step until the device finished", flush=True)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(args.profile_steps):
                    one()
                _sync(device)
        finally:
            close()
    averages = prof.key_averages()
    print(f"profiled {args.profile_steps} steps (totals below are over all of them)")
    if device.type == "cuda":
        print(averages.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
