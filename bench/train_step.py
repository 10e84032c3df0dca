"""Training-step time: dmhpc's trainer against the bare model and the original DeepMerge code, side by side.

All run the original's configuration: DeepMerge II, 128 source + 128 target images per step (--batch),
Adam with betas (0.7, 0.8). The trainer and the original add CE + MMD (19 kernels) + Fisher (trace
ratio) + entropy; the bare model's step is the same model on the same 2 x 128 images (fixed tensors,
no loader), cross-entropy only: forward, backward, optimizer step. The trainer's step is timed end
to end (its loader's batch, the step, the per-step bookkeeping) and the ratio trainer / bare is
its whole overhead: data, domain-adaptation terms and bookkeeping. Trainer and bare model (and, in
fp32, where its target is, the original) are timed in alternating rounds, and the medians compared,
so load from other jobs hits all alike.

The original step is reproduced with its costs (docs/benchmarks.md, "## training", says what it is):
a fresh DataLoader iterator with one worker process per domain per step, the MMD through an
(n, d, m) difference tensor, the Fisher intra term gathered in a Python loop, entropy masked.
dmhpc's step is the trainer's own, built by bench/throughput.py's `trainer_stepper` and timed beside
the original in alternating blocks (`side_by_side`): device-resident loader
(host memory here; no augmentation, as the config and the original), `TrainState`, `TrainStep` and
`EpochMeter` from configs/deepmerge-mmd-fisher-entropy.yaml.

    python bench/train_step.py [--rounds 8] [--block 3] [--batch 128] [--no-original]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmhpc.config import load_config
from dmhpc.data.shards import write_dataset
from dmhpc.models import DeepMerge2
from dmhpc.train.objective import build_backbone
from dmhpc.train.step import autocast
from throughput import trainer_stepper  # bench/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6]


# --- the original formulation (copied in spirit from DeepMergeDomainAdaptation/python_files) ------
def original_mmd(x, y):
    def dist(a, b):
        return ((a.unsqueeze(2) - b.t().unsqueeze(0)) ** 2).sum(1)

    beta = 1.0 / (2.0 * torch.tensor(SIGMAS).view(-1, 1))

    def kernel(a, b):
        d = dist(a, b)
        return torch.exp(-beta @ d.view(1, -1)).sum(0).view_as(d)

    cost = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    return torch.clamp(torch.clamp(cost, min=0.0), min=1e-4)


class OriginalFisherTR(torch.nn.Module):
    def __init__(self, feat_dim):
        super().__init__()
        self.centers = torch.nn.Parameter(torch.randn(2, feat_dim))

    def forward(self, x, labels, intra=0.01, inter=1.0):
        n = x.size(0)
        distmat = x.pow(2).sum(1, keepdim=True).expand(n, 2) + self.centers.pow(2).sum(1, keepdim=True).expand(2, n).t()
        distmat = distmat - 2 * x @ self.centers.t()
        dist = torch.stack([distmat[i, labels[i]].clamp(1e-12, 1e12) for i in range(n)])  # the Python loop
        intra_loss = dist.sum()
        inter_loss = (self.centers - self.centers.mean(0, keepdim=True)).pow(2).sum()
        return intra * intra_loss / (inter * inter_loss)


def original_entropy(logits):
    p = F.softmax(logits, dim=1)
    mask = p.ge(1e-6)
    return -(p[mask] * torch.log(p[mask])).sum() / logits.size(0)


def original_stepper(xs_all, ys_all, xt_all, yt_all, batch):
    net = DeepMerge2()
    fisher = OriginalFisherTR(2592)
    opt = torch.optim.Adam([{"params": net.parameters()}, {"params": fisher.parameters(), "lr": 1e-2}],
                           lr=1e-3, betas=(0.7, 0.8))
    src = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs_all, ys_all), batch_size=batch,
                                      shuffle=True, num_workers=1)
    tgt = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt_all, yt_all), batch_size=batch,
                                      shuffle=True, num_workers=1)

    def step():
        xs, ys = next(iter(src))  # a fresh iterator, and so a fresh worker process, per step
        xt, _ = next(iter(tgt))
        feats, logits = net(torch.cat([xs, xt]))
        loss = (F.cross_entropy(logits[:batch], ys) + original_mmd(feats[:batch], feats[batch:])
                + fisher(feats[:batch], ys) + 0.05 * original_entropy(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bare_stepper(x: torch.Tensor, y: torch.Tensor, amp: str, channels_last: bool):
    """One step of the bare model: DeepMerge II, CE on all 256 images, Adam, nothing else."""
    cfg = load_config(ROOT / "configs" / "deepmerge-mmd-fisher-entropy.yaml")
    torch.manual_seed(0)
    net = build_backbone(cfg, x.shape[1])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    ctx = autocast(amp, x.device)

    def step():
        with ctx:
            _, logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def side_by_side(steppers: dict, rounds: int, block: int) -> dict:
    """Median seconds per step of each stepper, timed in alternating blocks of `block` steps."""
    for one in steppers.values():
        for _ in range(2):
            one()  # warm-up
    times = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, one in steppers.items():
            t0 = time.perf_counter()
            for _ in range(block):
                one()
            times[name].append((time.perf_counter() - t0) / block)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternating blocks of the steppers compared")
    parser.add_argument("--block", type=int, default=3, help="steps per block")
    parser.add_argument("--images", type=int, default=4000, help="images per domain")
    parser.add_argument("--batch", type=int, default=128, help="images per domain per step (the original's 128)")
    parser.add_argument("--no-original", action="store_true", help="skip the original implementation")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = {d: rng.standard_normal((args.images, 3, 75, 75), dtype=np.float32) for d in ("source", "target")}
    y = {d: (np.arange(args.images) % 2).astype(np.int64) for d in ("source", "target")}
    batch = args.batch
    bare_x = torch.from_numpy(np.concatenate([x["source"][:batch], x["target"][:batch]]))
    bare_y = torch.from_numpy(np.concatenate([y["source"][:batch], y["target"][:batch]]))
    variants = {"fp32": ("none", False), "fp32 channels_last": ("none", True),
                "bf16 autocast, channels_last": ("bf16", True)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in x:
            write_dataset(x[d], y[d], None, Path(tmp) / d, shard_size=2048)
        for name, (amp, cl) in variants.items():
            trainer, close = trainer_stepper(Path(tmp), "deepmerge2", batch, amp, cl, "gpu-resident", torch.device("cpu"))
            steppers = {"trainer": trainer, "bare": bare_stepper(bare_x, bare_y, amp, cl)}
            if name == "fp32" and not args.no_original:  # the speed-up's target is in fp32
                steppers["original"] = original_stepper(
                    *(torch.from_numpy(a) for a in (x["source"], y["source"], x["target"], y["target"])), batch)
            try:
                results[name] = side_by_side(steppers, args.rounds, args.block)
            finally:
                close()
    t_old = results["fp32"].get("original")

    images = 2 * batch
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{batch} source + {batch} target images per step; medians of {args.rounds} alternating blocks of "
          f"{args.block} steps")
    if t_old is not None:
        print(f"{'original':32s} {t_old * 1e3:8.1f} ms/step {images / t_old:8.0f} images/s")
    for name, t in results.items():
        trainer, bare = t["trainer"], t["bare"]
        line = (f"{'dmhpc ' + name:32s} {trainer * 1e3:8.1f} ms/step {images / trainer:8.0f} images/s | bare model "
                f"{bare * 1e3:6.1f} ms/step | trainer / bare {trainer / bare:4.2f} (target <= 1.15)")
        if "original" in t:
            line += f" | speed-up over the original {t_old / trainer:4.1f}x (target >= 6x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
