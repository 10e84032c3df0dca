"""What every training loader shares: which rows each rank reads, how they are augmented and
normalized, and the interface the loader kinds implement (`Batches`).

- Sharding: an epoch has `rows // (world_size * batch_size)` steps on every rank; at each step
  the ranks take disjoint parts of one global batch, and the rows that do not fill a global
  batch are left out of that epoch.
- Shuffling depends on (seed, epoch) only. `gpu-resident` permutes single rows. The training
  rows are stored in a seeded random order already, so `dali` and `torch` read pieces of
  consecutive rows instead, each one contiguous slice (HDF5's fastest). The rows are cut into
  batch-sized blocks, each block into `PIECES` slots of batch_size / PIECES rows (rounded; one
  row each below a batch of PIECES); a batch takes slot i of a block drawn by slot i's own
  permutation of the blocks, per (seed, epoch, cycle), so its pieces come from different blocks,
  drawn anew each epoch, and every row is read once an epoch. Whole blocks kept the same images
  together in every epoch (all of them where the rows are a multiple of the batch size):
  BatchNorm and the batch-level losses (MMD, Fisher, CORAL) saw the same groups each time. The
  blocks lie on the rows taken as a ring (the last row followed by the first), from an offset
  drawn per (seed, epoch, cycle) among all rows, so the rows that fill no block are other ones
  each epoch, and every row is left out equally often (at a fixed offset the same rows, up to a
  batch of them, were never trained on; at an offset within the rows' tail, the first and last
  rows were read in a few epochs of a hundred).
- The epoch is the source's; each source batch is paired with a target batch from the target's
  own order, which wraps around, permuted anew, when the target has fewer steps.
- Augmentation draws, per sample, one of the 8 symmetries of the square (flips and 90-degree
  rotations; only the 4 flips when H != W), keyed by (seed, epoch, step, rank). So an epoch
  started at step k yields exactly the batches an uninterrupted epoch yields from step k on. No
  global random stream is read or advanced.
- Normalization per channel with the manifests' training statistics: each domain its own
  (`normalize="per-domain"`) or the source's for both (`"source"`).

Random draws use numpy generators from a `SeedSequence` of the key: the same code runs in DALI
and DataLoader worker processes, where running torch operators after a fork is best avoided.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from dmhpc.data.shards import load_manifest
from dmhpc.errors import DmhpcError

NORMALIZE = ("per-domain", "source")
SOURCE, TARGET = 0, 1
# Purposes mixed into random keys so that shuffling and augmentation draws never coincide.
_ORDER, _AUGMENT, _OFFSET, _PIECE = 0, 1, 2, 3
# Pieces of consecutive rows in a batch of the block loaders: each a contiguous read, and the
# groups of images that stay together from epoch to epoch small (16 of a batch of 128).
PIECES = 8

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # xs, ys, xt, yt on the device


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(key))


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: int, domain: int, epoch: int, cycle: int) -> np.ndarray:
    order = _rng(seed, _ORDER, domain, epoch, cycle).permutation(n)
    order.flags.writeable = False  # shared by every caller through the cache
    return order


@functools.lru_cache(maxsize=4 * PIECES)  # both domains' slots of an epoch, and the next cycle's
def _slot_order(n: int, seed: int, domain: int, epoch: int, cycle: int, slot: int) -> np.ndarray:
    order = _rng(seed, _PIECE, domain, epoch, cycle, slot).permutation(n)
    order.flags.writeable = False
    return order


@dataclasses.dataclass(frozen=True)
class Stream:
    """Which training rows of one domain one rank reads at each step, and how it augments them.

    `start` is the first row of the training split and `rows` the number of its rows in use.
    For the target, a step past `steps` wraps around into the next `cycle` of its own order.
    """

    start: int
    rows: int
    batch_size: int
    world_size: int
    rank: int
    seed: int
    domain: int  # SOURCE or TARGET: gives the two domains independent orders and draws

    @property
    def steps(self) -> int:
        """Batches per rank in one pass over the rows (the global batch tail is left out)."""
        return self.rows // (self.batch_size * self.world_size)

    @property
    def slots(self) -> list[tuple[int, int]]:
        """Row ranges within a block of the `PIECES` pieces of a batch (one row each below a batch
        of PIECES), as even as the batch size allows."""
        count = min(PIECES, self.batch_size)
        edges = [k * self.batch_size // count for k in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def pieces(self, epoch: int, step: int) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of this rank's batch: slot i of a block drawn by slot i's
        permutation of the blocks (those that happen to follow each other joined into one range)."""
        cycle, pos = divmod(step, self.steps)
        blocks = self.rows // self.batch_size
        # The blocks start anywhere on the rows taken as a ring: an offset within the rows' tail
        # (0 to rows % batch_size) read the first and last rows in a few epochs of a hundred (row 0
        # of 10,798 at batch 128 in 1 %), the same rows whatever the seed.
        offset = int(_rng(self.seed, _OFFSET, self.domain, epoch, cycle).integers(0, self.rows))
        batch = pos * self.world_size + self.rank
        ranges: list[tuple[int, int]] = []
        for slot, (a, b) in enumerate(self.slots):
            block = int(_slot_order(blocks, self.seed, self.domain, epoch, cycle, slot)[batch])
            first = (offset + block * self.batch_size + a) % self.rows
            for lo, hi in ((first, min(first + b - a, self.rows)), (0, first + b - a - self.rows)):
                if hi <= lo:  # (no wrap: the second part is empty)
                    continue
                if ranges and ranges[-1][1] == self.start + lo:
                    ranges[-1] = (ranges[-1][0], self.start + hi)
                else:
                    ranges.append((self.start + lo, self.start + hi))
        return ranges

    def samples(self, epoch: int, step: int) -> np.ndarray:
        """Positions within the rows in use of this rank's batch, rows permuted one by one."""
        cycle, pos = divmod(step, self.steps)
        first = (pos * self.world_size + self.rank) * self.batch_size
        return _order(self.rows, self.seed, self.domain, epoch, cycle)[first : first + self.batch_size].copy()

    def codes(self, epoch: int, step: int, square: bool) -> np.ndarray:
        """Per-sample symmetry codes (see `_symmetries`) of this rank's batch; flips only if not square."""
        rng = _rng(self.seed, _AUGMENT, self.domain, epoch, step, self.rank)
        return rng.integers(0, 8 if square else 4, self.batch_size, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _symmetries(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(8, H*W) table: pixel p of an image under symmetry code c is pixel table[c, p] of the image.

    Bit 0 of a code flips W, bit 1 flips H, bit 2 swaps H and W, in that order: the 8 codes are
    the 8 flips and rotations by multiples of 90 degrees (4 codes, the flips, when H != W).
    """
    grid = torch.arange(height * width, device=device).view(height, width)
    table = []
    for code in range(8 if height == width else 4):
        t = grid.flip(-1) if code & 1 else grid
        t = t.flip(-2) if code & 2 else t
        table.append((t.transpose(-1, -2) if code & 4 else t).reshape(-1))
    return torch.stack(table)


def dihedral(images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Image j of (n, C, H, W) turned by its symmetry codes[j] (see `_symmetries`).

    One gather over the pixels, vectorized over the batch: several times faster on CPU than
    flipping the whole batch three times and selecting per sample.
    """
    n, channels, height, width = images.shape
    index = _symmetries(height, width, images.device).index_select(0, codes.long())
    index = index.unsqueeze(1).expand(n, channels, height * width)
    return images.reshape(n, channels, height * width).gather(2, index).view(n, channels, height, width)


def channel_stats(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel, shaped (1, C, 1, 1): normalized = x * scale + shift."""
    shape = (1, len(mean), 1, 1)
    mean = torch.tensor(mean, dtype=torch.float64)
    std = torch.tensor(std, dtype=torch.float64)
    return (
        (1 / std).to(device, torch.float32).view(shape),
        (-mean / std).to(device, torch.float32).view(shape),
    )


class Normalizer:
    """Per-channel (x - mean) / std of an image batch on `device`, as float32 (what every loader does)."""

    def __init__(self, mean, std, device):
        self.scale, self.shift = channel_stats(mean, std, torch.device(device))

    def __call__(self, images: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """`images` on the device, turned by the dihedral `codes` first when given."""
        return finish(images, codes, self.scale, self.shift)

    def in_place(self, images: torch.Tensor) -> torch.Tensor:
        """Normalize a float32 batch in its own memory (no new buffer of the batch's size)."""
        return torch.addcmul(self.shift, images, self.scale, out=images)


def finish(images: torch.Tensor, codes: torch.Tensor | None, scale, shift,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The float32 normalized batch, turned by `codes` when augmenting: the on-device end of a batch.

    Normalizing writes the batch in `memory_format`, so a channels_last model gets its layout in
    the same pass instead of a copy per step.
    """
    if codes is not None:
        images = dihedral(images, codes)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    return torch.addcmul(shift, images.float(), scale, out=out)



def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array (a step's row indices, its symmetry codes) on `device` without the host
    waiting: CUDA copies from pageable memory only after the stream's earlier work, whatever
    non_blocking says, so a GPU's copy goes through pinned memory (torch caches the pinned blocks)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def device_codes(stream: Stream, epoch: int, step: int, square: bool, device: torch.device) -> torch.Tensor:
    return to_device(stream.codes(epoch, step, square), device)


# ----------------------------------------------------------------------------- statistics


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise DmhpcError(f"data.normalize {normalize!r}: expected one of {', '.join(NORMALIZE)}")


def _manifest_stats(directory, manifest: dict) -> tuple[list[float], list[float]]:
    mean, std = manifest["stats"]["mean"], manifest["stats"]["std"]
    flat = [c for c, s in enumerate(std) if not s > 0]
    if flat:
        raise DmhpcError(
            f"{directory}: channel {flat[0]} has standard deviation {std[flat[0]]} in the training"
            " split; cannot normalize"
        )
    return [float(v) for v in mean], [float(v) for v in std]


def normalization(source_dir, source: dict, target_dir, target: dict, normalize: str):
    """((mean_s, std_s), (mean_t, std_t)) from the two manifests, as `normalize` says (see `domain_stats`)."""
    s = _manifest_stats(source_dir, source)
    return s, (s if normalize == "source" else _manifest_stats(target_dir, target))


def domain_stats(source_dir, target_dir, normalize: str):
    """((mean_s, std_s), (mean_t, std_t)) per channel, the normalization the training batches use.

    `normalize="per-domain"`: each domain's own training statistics (as DeepMerge does);
    `"source"`: the source's for both. Pass the pair of a domain to `eval_batches`.
    """
    check_normalize(normalize)
    return normalization(source_dir, load_manifest(source_dir), target_dir, load_manifest(target_dir), normalize)


# ----------------------------------------------------------------------------- the loader kinds


@dataclasses.dataclass(frozen=True)
class Domain:
    """One domain's training rows in use on this rank, and their normalization."""

    directory: Path
    manifest: dict
    stream: Stream
    mean: list
    std: list

    @property
    def nbytes(self) -> int:
        per_row = int(np.prod(self.manifest["shape"])) * np.dtype(self.manifest["dtype"]).itemsize
        return self.stream.rows * per_row


@dataclasses.dataclass(frozen=True)
class IgnoreSignals:
    """A worker's start-up: ignore the trainer's stop signals (picklable, for spawned workers too).

    srun, scancel and a kill of the process group signal every process of a job step, loader
    workers included. A worker ended by the signal's default action (or by torch's own SIGTERM
    handler, which re-raises it) would make the trainer fail with "DataLoader worker exited
    unexpectedly" instead of finishing its step and checkpointing. The trainer ends its workers
    itself when the loader closes; a worker whose trainer died notices and exits (torch's and
    DALI's workers both watch their parent).
    """

    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __call__(self, *_) -> None:
        for name in self.signals:
            signal.signal(signal.Signals[name], signal.SIG_IGN)


class Batches(Protocol):
    """A loader kind: `gpu-resident` (dmhpc/data/resident.py), `torch` (dmhpc/data/torch_blocks.py)
    or `dali` (dmhpc/data/dali.py). Each is built from the two `Domain`s (source, target)."""

    def batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """(xs, ys, xt, yt) for steps start_step, ... of `epoch`: normalized, augmented, on the device."""

    def close(self) -> None:
        """Release workers, pipelines, open files and device memory."""


def read_ahead(read: Callable[[int, int], Any], spans: Iterable[tuple[int, int]], ahead: bool) -> Iterator[Any]:
    """`read(a, b)` for each (a, b) of `spans`, in order. With `ahead` the next span is read in a
    thread while the caller works on this one: on a GPU, reading then overlaps the device's work;
    on a CPU the thread would only take cores from the model's own threads (measured: 0.87 of the
    bare forward rate with it, see docs/benchmarks.md). Close the iterator before what `read` reads
    from: closing waits for a read in flight."""
    spans = list(spans)
    if not ahead:
        for a, b in spans:
            yield read(a, b)
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, *spans[0]) if spans else None
        for i in range(len(spans)):
            result = pending.result()
            pending = pool.submit(read, *spans[i + 1]) if i + 1 < len(spans) else None
            yield result
