"""Training-step rate: dmhpc's trainer against the original DeepMerge implementation, side by side.

Both run the original's configuration: DeepMerge II, 128 source + 128 target images per step,
CE + MMD (19 kernels) + Fisher (trace ratio) + entropy, Adam with betas (0.7, 0.8).

The original step is reproduced with its costs (see shared/reference/original-deepmerge.md):
a fresh DataLoader iterator with one worker process per domain per step, the MMD through an
(n, d, m) difference tensor, the Fisher intra term gathered in a Python loop, entropy masked.
dmhpc's step is the trainer's own, timed by bench/throughput.py's `measure`: device-resident loader
(host memory here; no augmentation, as the config and the original) and `dmhpc.train.objective.DomainAdaptation` from
configs/deepmerge-mmd-fisher-entropy.yaml.

    python bench/train_step.py [--steps 20]
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

from dmhpc.data.shards import write_dataset
from dmhpc.models import DeepMerge2
from throughput import measure  # bench/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent
BATCH = 128
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


def time_original(xs_all, ys_all, xt_all, yt_all, steps):
    net = DeepMerge2()
    fisher = OriginalFisherTR(2592)
    opt = torch.optim.Adam([{"params": net.parameters()}, {"params": fisher.parameters(), "lr": 1e-2}],
                           lr=1e-3, betas=(0.7, 0.8))
    src = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs_all, ys_all), batch_size=BATCH,
                                      shuffle=True, num_workers=1)
    tgt = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt_all, yt_all), batch_size=BATCH,
                                      shuffle=True, num_workers=1)

    def step():
        xs, ys = next(iter(src))  # a fresh iterator, and so a fresh worker process, per step
        xt, _ = next(iter(tgt))
        feats, logits = net(torch.cat([xs, xt]))
        loss = (F.cross_entropy(logits[:BATCH], ys) + original_mmd(feats[:BATCH], feats[BATCH:])
                + fisher(feats[:BATCH], ys) + 0.05 * original_entropy(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, steps)


def _time(step, steps, warmup=2):
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=4000, help="images per domain")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = {d: rng.standard_normal((args.images, 3, 75, 75), dtype=np.float32) for d in ("source", "target")}
    y = {d: (np.arange(args.images) % 2).astype(np.int64) for d in ("source", "target")}
    with tempfile.TemporaryDirectory() as tmp:
        for d in x:
            write_dataset(x[d], y[d], None, Path(tmp) / d, shard_size=2048)
        variants = {
            "fp32": {},
            "fp32 channels_last": {"channels_last": True},
            "bf16 autocast, channels_last": {"amp": "bf16", "channels_last": True},
        }
        t_new = {name: 2 * BATCH / measure(Path(tmp), "deepmerge2", BATCH, kw.get("amp", "none"),
                                           kw.get("channels_last", False), "gpu-resident", torch.device("cpu"),
                                           args.steps, warmup=2)
                 for name, kw in variants.items()}
    t_old = time_original(*(torch.from_numpy(a) for a in (x["source"], y["source"], x["target"], y["target"])),
                          steps=args.steps)

    images = 2 * BATCH
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{'original':32s} {t_old * 1e3:8.1f} ms/step {images / t_old:8.0f} images/s")
    for name, t in t_new.items():
        print(f"{'dmhpc ' + name:32s} {t * 1e3:8.1f} ms/step {images / t:8.0f} images/s  "
              f"speed-up {t_old / t:5.1f}x (target: at least 5x)")


if __name__ == "__main__":
    main()
