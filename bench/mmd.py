"""MMD forward+backward: dmhpc.losses.mmd against the original DeepMerge formulation, side by side.

Prints, for 128 + 128 float32 features of dimension 2592 (DeepMerge's flattened conv output,
ReLU-like, norms ~15-70, target shifted) and the original 19 kernels:
  - the time of one forward+backward of each formulation (minimum and median over rounds that
    interleave the formulations; the minimum is the check, as it is the least disturbed by other
    load on the machine),
  - its relative error against a float64 evaluation of the original formulation,
  - the speed-up of dmhpc over the original (target: >= 20x).
The alternatives (textbook norm expansion, torch.cdist without matmul) show why dmhpc's
formulation was chosen. Run: python bench/mmd.py [--n 128] [--d 2592] [--rounds 7]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch

from dmhpc.losses import DEEPMERGE_SIGMAS, mmd


# ---- ORIGINAL DeepMerge formulation (python_files/loss.py, from FisherDA), copied for comparison only:
# the (n, d, m) difference tensor, 19 kernels through a (19, n*m) matrix, biased, clamped at 1e-4.
def original_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def compute_pairwise_distances(a, b):
        return torch.sum((a.unsqueeze(2) - torch.transpose(b, 0, 1).unsqueeze(0)) ** 2, 1)

    def gaussian_kernel_matrix(a, b):
        sigmas = torch.tensor(DEEPMERGE_SIGMAS, dtype=a.dtype).view(-1, 1)
        beta = 1.0 / (2.0 * sigmas)
        dist = compute_pairwise_distances(a, b)
        s = torch.matmul(beta, dist.contiguous().view(1, -1))
        return torch.sum(torch.exp(-s), 0).view_as(dist)

    cost = torch.mean(gaussian_kernel_matrix(x, x))
    cost = cost + torch.mean(gaussian_kernel_matrix(y, y))
    cost = cost - 2 * torch.mean(gaussian_kernel_matrix(x, y))
    return torch.clamp(torch.clamp(cost, min=0.0), min=1e-4)


# ---- alternatives considered (not used by dmhpc)
def textbook_expansion_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x||^2 + ||y||^2 - 2 x.y with separately computed norms, plain autograd."""
    z = torch.cat([x, y])
    sq = (z * z).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    k = sum(torch.exp(-d / (2 * s)) for s in DEEPMERGE_SIGMAS)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def cdist_direct_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.cdist with compute_mode='donot_use_mm_for_euclid_dist' (exact differences), autograd."""
    z = torch.cat([x, y])
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
    k = sum(torch.exp(-d / (2 * s)) for s in DEEPMERGE_SIGMAS)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    profile = torch.rand(d, generator=g, dtype=torch.float64)
    scale = lambda: torch.rand(n, 1, generator=g, dtype=torch.float64) * 1.5 + 0.5  # noqa: E731
    xs = (profile + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp_min(0) * scale()
    xt = (profile + 0.15 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp_min(0) * scale()
    return xs, xt


def forward_backward_seconds(fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(seconds of one forward+backward, loss value)."""
    x.grad = y.grad = None
    t0 = time.perf_counter()
    value = fn(x, y)
    value.backward()
    return time.perf_counter() - t0, value.item()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_growth(rows: int, d: int, queue) -> None:
    xs, xt = (t.float().requires_grad_() for t in features(rows // 2, d, seed=1))
    mmd(xs[:2], xt[:2]).backward()  # load the kernels before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    mmd(xs, xt, max_samples=rows).backward()
    queue.put((_status_kib("VmHWM") - before) * 1024)


def peak_memory(rows: int, d: int) -> int:
    """Growth of peak RSS (bytes) over one forward+backward with `rows` rows, in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_growth, args=(rows, d, queue))
    # glibc: serve every block over 64 KiB by mmap and unmap it when freed, so the resident set
    # follows the live tensors instead of keeping freed heap pages.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    growth = queue.get()
    proc.join()
    return growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="rows per domain (default 128)")
    parser.add_argument("--d", type=int, default=2592, help="feature dimension (default 2592)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds, each running every formulation once")
    args = parser.parse_args()

    xs64, xt64 = features(args.n, args.d)
    with torch.no_grad():
        reference = original_mmd(xs64, xt64).item()  # float64, exact differences
    xs, xt = xs64.float(), xt64.float()
    print(f"# MMD forward+backward, {args.n}+{args.n} x {args.d} float32, 19 kernels, biased")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# float64 reference value {reference:.10f}")
    formulations = {
        "original (n,d,m) difference tensor [copy]": original_mmd,
        "textbook norm expansion, autograd": textbook_expansion_mmd,
        "cdist donot_use_mm, autograd": cdist_direct_mmd,
        "dmhpc.losses.mmd": lambda a, b: mmd(a, b),
    }
    x, y = xs.clone().requires_grad_(), xt.clone().requires_grad_()
    for fn in formulations.values():
        forward_backward_seconds(fn, x, y)  # warm-up
    # Rounds interleave the formulations, so a change in machine load hits them alike.
    times: dict[str, list[float]] = {name: [] for name in formulations}
    values = {}
    for _ in range(args.rounds):
        for name, fn in formulations.items():
            seconds, values[name] = forward_backward_seconds(fn, x, y)
            times[name].append(seconds)
    print(f"{'formulation':45s} {'median s':>9s} {'min s':>9s} {'rel. error':>11s}")
    for name, ts in times.items():
        error = abs(values[name] - reference) / reference
        print(f"{name:45s} {statistics.median(ts):9.4f} {min(ts):9.4f} {error:11.1e}")
    original, ours = times["original (n,d,m) difference tensor [copy]"], times["dmhpc.losses.mmd"]
    on_minima = min(original) / min(ours)
    print(f"speed-up of dmhpc.losses.mmd over the original: {on_minima:.0f}x on minima, "
          f"{statistics.median(original) / statistics.median(ours):.0f}x on medians (target >= 20x)")
    print("# peak memory of one global MMD forward+backward (d=256, float32) vs the 2.5 N^2 x 4 B estimate")
    for n_rows in (2048, 4096):
        growth, estimate = peak_memory(n_rows, 256) / 2**20, 2.5 * n_rows**2 * 4 / 2**20
        print(f"N={n_rows:5d} rows: peak RSS growth {growth:7.1f} MiB, estimate {estimate:7.1f} MiB")
    return 0 if on_minima >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
