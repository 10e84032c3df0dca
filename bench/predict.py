"""`dmhpc predict` from prepared shards against the bare model's forward pass, side by side.

    python bench/predict.py [--images 16384] [--rounds 3]

Trains a DeepMerge II run for one step on a tiny data set (only to have a run directory), writes
--images random 3x75x75 images as a prepared data set, then alternates, --rounds times and per
precision (fp32; bf16 autocast): `dmhpc predict` in this process (its own loop's images/s, from
the first part to the last part written, and the whole call's wall time, loading the model and
merging the catalog included), and the bare model's forward pass (no_grad, eval, the same batch
of 256, softmax) over as many images, on the device predict uses (a GPU where there is one).
Target: predict's images/s at least 85% of the bare rate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmhpc.cli import main as dmhpc
from dmhpc.data.shards import write_dataset
from dmhpc.distributed import synchronize
from dmhpc.infer.predict import Model
from dmhpc.run import RunDir
from dmhpc.train.step import autocast

ROOT = Path(__file__).resolve().parent.parent
BATCH = 256


def bare_rate(model: Model, n: int, amp: str, device: torch.device) -> float:
    x = torch.randn(BATCH, 3, 75, 75, device=device)
    with torch.no_grad():
        with autocast(amp, device):  # warm-up in the precision timed (bf16's kernels differ)
            model.net(x)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n // BATCH):
            with autocast(amp, device):
                _, logits = model.net(x)
            torch.softmax(logits.float(), dim=1)[:, 1]
        synchronize(device)
    return (n // BATCH) * BATCH / (time.perf_counter() - t0)


def predict_rate(run: Path, data: Path, out: Path, amp: str) -> tuple[float, float]:
    """(images/s of predict's own loop, images/s of the whole call)."""
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        assert dmhpc(["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--overwrite",
                      "--batch-size", str(BATCH), "--amp", amp]) == 0
    wall = time.perf_counter() - t0
    loop = float(re.search(r"; ([0-9.]+) images/s over", log.getvalue()).group(1))
    return loop, int(re.search(r"\((\d+) rows", log.getvalue()).group(1)) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.images < BATCH:
        parser.error(f"--images: at least one batch ({BATCH})")
    # Where `dmhpc predict` runs (its bootstrap binds a GPU when there is one): on a GPU machine the
    # bare rate was a CPU's, and the ratio a GPU's over it.
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("pristine", "noisy"):
            write_dataset(rng.normal(size=(64, 3, 75, 75)).astype(np.float32), np.arange(64) % 2, None,
                          tmp / name, shard_size=64)
        run = tmp / "run"
        with contextlib.redirect_stdout(io.StringIO()):
            assert dmhpc(["train", "--config", str(ROOT / "configs" / "deepmerge-mmd-fisher-entropy.yaml"),
                          f"data.source={tmp / 'pristine'}", f"data.target={tmp / 'noisy'}", f"run.dir={run}",
                          "train.batch_size=16", "train.max_steps=1", "data.loader=gpu-resident"]) == 0
        survey = tmp / "survey"
        block = rng.normal(size=(4096, 3, 75, 75)).astype(np.float32)
        images = np.concatenate([block] * (-(-args.images // 4096)))[: args.images]
        write_dataset(images, None, None, survey, shard_size=4096)
        del images
        model = Model(RunDir(run), "best", device)
        print(f"machine: {platform.machine()}, {device}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; {args.images} images, batch {BATCH}, {args.rounds} alternating rounds")
        print("| precision | bare forward images/s | predict loop images/s | loop / bare | predict whole call images/s |")
        print("|---|---|---|---|---|")
        for amp in ("none", "bf16"):
            bare, loop, whole = [], [], []
            for _ in range(args.rounds):
                a, b = predict_rate(run, survey, tmp / "catalog.parquet", amp)
                loop.append(a)
                whole.append(b)
                bare.append(bare_rate(model, args.images, amp, device))
            m = {k: statistics.median(v) for k, v in (("bare", bare), ("loop", loop), ("whole", whole))}
            print(f"| {'fp32' if amp == 'none' else 'bf16'} | {m['bare']:,.0f} | {m['loop']:,.0f} | "
                  f"{m['loop'] / m['bare']:.2f} (target >= 0.85) | {m['whole']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
