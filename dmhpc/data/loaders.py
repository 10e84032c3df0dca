"""Training and evaluation batches from sharded data sets (docs/data-format.md).

`make_train_loader` gives one rank its paired (source, target) training batches, by one of three
kinds behind one interface (`TrainLoader`):

- `gpu-resident`: both training splits are read once and kept on the device; batches are
  gathered there by index, then flipped, rotated and normalized there.
- `dali`: a DALI pipeline whose parallel external source reads the shards (dmhpc/data/dali.py).
- `torch`: a torch DataLoader whose worker processes read the shards; the batch is flipped,
  rotated and normalized on the device, by the same code as `gpu-resident`.

What every kind shares, through each domain's `Stream`:

- Sharding: an epoch has `rows // (world_size * batch_size)` steps on every rank; at each step
  the ranks take disjoint parts of one global batch, and the rows that do not fill a global
  batch are left out of that epoch.
- Shuffling depends on (seed, epoch) only. `gpu-resident` permutes single rows. The training
  rows are stored in a seeded random order already, so `dali` and `torch` permute the order of
  batch-sized blocks of consecutive rows instead: each read is one contiguous slice (HDF5's
  fastest), the rows of a block stay together from epoch to epoch, and per-sample augmentation
  adds the variety within a block. The last `rows % batch_size` rows are never read by them.
- The epoch is the source's; each source batch is paired with a target batch from the target's
  own order, which wraps around, permuted anew, when the target has fewer steps.
- Augmentation draws, per sample, one of the 8 symmetries of the square (flips and 90-degree
  rotations; only the 4 flips when H != W), keyed by (seed, epoch, step, rank). So
  `epoch(e, start_step=k)` yields exactly the batches an uninterrupted epoch yields from step
  k on. No global random stream is read or advanced.
- Normalization per channel with the manifests' training statistics: each domain its own
  (`normalize="per-domain"`) or the source's for both (`"source"`).

Random draws use numpy generators from a `SeedSequence` of the key: the same code runs in DALI
and DataLoader worker processes, where running torch operators after a fork is best avoided.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import signal
import weakref
from pathlib import Path

import numpy as np
import torch

from dmhpc.data.shards import RowReader, load_manifest, split_rows
from dmhpc.distributed import all_reduce_min
from dmhpc.errors import DmhpcError

KINDS = ("gpu-resident", "dali", "torch")
NORMALIZE = ("per-domain", "source")
SOURCE, TARGET = 0, 1

# Purposes mixed into random keys so that shuffling and augmentation draws never coincide.
_ORDER, _AUGMENT = 0, 1
# `auto` keeps the data on the GPU when both training splits take at most this share of the
# free device memory: the rest is for the model, activations and the allocator's slack.
_RESIDENT_SHARE = 0.25
# Rows read at a time into resident memory: bounds the host memory a rank needs while staging.
_STAGING_BYTES = 64 << 20


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(key))


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: int, domain: int, epoch: int, cycle: int) -> np.ndarray:
    order = _rng(seed, _ORDER, domain, epoch, cycle).permutation(n)
    order.flags.writeable = False  # shared by every caller through the cache
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

    def block(self, epoch: int, step: int) -> tuple[int, int]:
        """Row range [start, stop) of this rank's batch: a block of consecutive rows."""
        cycle, pos = divmod(step, self.steps)
        order = _order(self.rows // self.batch_size, self.seed, self.domain, epoch, cycle)
        start = self.start + int(order[pos * self.world_size + self.rank]) * self.batch_size
        return start, start + self.batch_size

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


def _channel_stats(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
        self.scale, self.shift = _channel_stats(mean, std, torch.device(device))

    def __call__(self, images: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """`images` on the device, turned by the dihedral `codes` first when given."""
        return _finish(images, codes, self.scale, self.shift)

    def in_place(self, images: torch.Tensor) -> torch.Tensor:
        """Normalize a float32 batch in its own memory (no new buffer of the batch's size)."""
        return torch.addcmul(self.shift, images, self.scale, out=images)


def _finish(images: torch.Tensor, codes: torch.Tensor | None, scale, shift,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The float32 normalized batch, turned by `codes` when augmenting: the on-device end of a batch.

    Normalizing writes the batch in `memory_format`, so a channels_last model gets its layout in
    the same pass instead of a copy per step.
    """
    if codes is not None:
        images = dihedral(images, codes)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    return torch.addcmul(shift, images.float(), scale, out=out)


# ----------------------------------------------------------------------------- statistics


def _check_normalize(normalize: str) -> None:
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
    _check_normalize(normalize)
    return normalization(source_dir, load_manifest(source_dir), target_dir, load_manifest(target_dir), normalize)


# ----------------------------------------------------------------------------- the loaders


@dataclasses.dataclass(frozen=True)
class _Domain:
    directory: Path
    manifest: dict
    stream: Stream
    mean: list
    std: list

    @property
    def nbytes(self) -> int:
        per_row = int(np.prod(self.manifest["shape"])) * np.dtype(self.manifest["dtype"]).itemsize
        return self.stream.rows * per_row


class TrainLoader:
    """One rank's paired (source, target) training batches; made by `make_train_loader`.

    `len(loader)` is the number of steps per epoch (the same on every rank); `kind` is the
    loader kind in use and `reason` says in one line why it was chosen.
    """

    def __init__(self, kind: str, reason: str, domains: list[_Domain], backend, device: torch.device):
        self.kind, self.reason, self._device = kind, reason, device
        self._domains = domains
        self._backend = backend
        self._epochs = weakref.WeakSet()  # epoch iterators not yet finished or collected

    def __len__(self) -> int:
        return self._domains[SOURCE].stream.steps

    @property
    def description(self) -> str:
        """The kind and why, as the trainer's start line shows it ("resident" in host memory on a CPU)."""
        kind = "resident in host memory" if self.kind == "gpu-resident" and self._device.type != "cuda" else self.kind
        return f"{kind} ({self.reason})"

    @property
    def stats(self) -> dict[str, tuple[list, list]]:
        """{"source": (mean, std), "target": (mean, std)}: the per-channel normalization in use."""
        return {name: (d.mean, d.std) for name, d in zip(("source", "target"), self._domains)}

    def epoch(self, epoch: int, start_step: int = 0):
        """Iterator of (xs, ys, xt, yt) on the device for steps start_step, ..., len(self) - 1.

        xs, xt: normalized float32 (B, C, H, W); ys, yt: int64 (B,) labels (yt for reporting
        only). The batches depend only on (seed, epoch, step, rank): starting at `start_step`
        yields exactly the tail of the whole epoch, which makes resuming exact.
        """
        if epoch < 0 or not 0 <= start_step <= len(self):
            raise DmhpcError(
                f"epoch {epoch}, step {start_step}: an epoch has steps 0 to {len(self)} here"
                " (resuming with another batch size, world size or data set?)"
            )
        batches = self._backend.batches(epoch, start_step)
        self._epochs.add(batches)
        return batches

    def close(self) -> None:
        """Release the workers, pipelines, open files and resident data; ends unfinished epochs."""
        for batches in list(self._epochs):
            batches.close()  # a suspended epoch holds the pipeline or DataLoader iterator alive
        self._backend.close()


class _Resident:
    """`gpu-resident`: the rows in use of both domains held on the device."""

    def __init__(self, domains: list[_Domain], device: torch.device, augment: bool, memory_format):
        self.device, self.augment, self.memory_format = device, augment, memory_format
        self.square = domains[SOURCE].manifest["shape"][1] == domains[SOURCE].manifest["shape"][2]
        self.parts = []
        for d in domains:
            shape, stored = d.manifest["shape"], torch.float16 if d.manifest["dtype"] == "float16" else torch.float32
            images = torch.empty((d.stream.rows, *shape), dtype=stored, device=device)  # float16 stays half
            labels = torch.empty(d.stream.rows, dtype=torch.int64, device=device)
            # Staged a block at a time: host memory holds one block per rank, not the whole split.
            block = max(1, _STAGING_BYTES // (int(np.prod(shape)) * images.element_size()))
            with RowReader(d.directory, d.manifest) as reader:
                for a in range(0, d.stream.rows, block):
                    b = min(a + block, d.stream.rows)
                    rows = reader.read(d.stream.start + a, d.stream.start + b)
                    images[a:b].copy_(torch.from_numpy(rows["images"]))
                    labels[a:b].copy_(torch.from_numpy(rows["labels"]))
            self.parts.append((d.stream, images, labels, *_channel_stats(d.mean, d.std, device)))

    def batches(self, epoch: int, start_step: int):
        for step in range(start_step, self.parts[SOURCE][0].steps):
            out = []
            for stream, images, labels, scale, shift in self.parts:
                rows = torch.from_numpy(stream.samples(epoch, step)).to(self.device, non_blocking=True)
                codes = _codes(stream, epoch, step, self.square, self.device) if self.augment else None
                out += [_finish(images.index_select(0, rows), codes, scale, shift, self.memory_format),
                        labels.index_select(0, rows)]
            yield tuple(out)

    def close(self) -> None:
        self.parts = []


def _codes(stream: Stream, epoch: int, step: int, square: bool, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(stream.codes(epoch, step, square)).to(device, non_blocking=True)


class _BlockReader(torch.utils.data.Dataset):
    """Reads one step's pair of row blocks; its keys are ((source range), (target range))."""

    def __init__(self, domains: list[_Domain]):
        self.readers = [RowReader(d.directory, d.manifest) for d in domains]  # opened in each worker

    def __getitem__(self, blocks):
        out = []
        for reader, (start, stop) in zip(self.readers, blocks):
            rows = reader.read(start, stop)
            out += [torch.from_numpy(rows["images"]), torch.from_numpy(rows["labels"])]
        return out


class _EpochPlan(torch.utils.data.Sampler):
    """The block pairs of the epoch being read, set before each pass (sampled in the main process)."""

    def __init__(self):
        self.blocks = []

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


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


class _TorchBlocks:
    """`torch`: a DataLoader over block pairs, read by `num_workers` persistent worker processes."""

    def __init__(self, domains: list[_Domain], device: torch.device, augment: bool, num_workers: int,
                 ignore: IgnoreSignals, memory_format):
        self.device, self.augment, self.memory_format = device, augment, memory_format
        self.streams = [d.stream for d in domains]
        self.square = domains[SOURCE].manifest["shape"][1] == domains[SOURCE].manifest["shape"][2]
        self.stats = [_channel_stats(d.mean, d.std, device) for d in domains]
        self.dataset = _BlockReader(domains)
        self.plan = _EpochPlan()
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=self.plan, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its per-pass worker seed would otherwise advance the global RNG
            worker_init_fn=ignore,
        )

    def batches(self, epoch: int, start_step: int):
        steps = range(start_step, self.streams[SOURCE].steps)
        self.plan.blocks = [tuple(s.block(epoch, k) for s in self.streams) for k in steps]
        for step, rows in zip(steps, self.loader):
            out = []
            for d, stream in enumerate(self.streams):
                images = rows[2 * d].to(self.device, non_blocking=True)
                codes = _codes(stream, epoch, step, self.square, self.device) if self.augment else None
                labels = rows[2 * d + 1].to(self.device, non_blocking=True)
                out += [_finish(images, codes, *self.stats[d], self.memory_format), labels]
            yield tuple(out)

    def close(self) -> None:
        self.loader = None  # its persistent workers stop when it is collected
        gc.collect()
        for reader in self.dataset.readers:
            reader.close()


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here (see `dali_runs` for whether it works)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def dali_runs(device: torch.device) -> str | None:
    """None when a DALI pipeline builds and runs on `device`; else why not, in a few words.

    Importable is not enough: the pinned CUDA 13 build needs a recent driver, and fails only when a
    pipeline is built.
    """
    if not dali_available():
        return "DALI is not importable"
    try:
        from nvidia.dali import fn, pipeline_def

        on_gpu = device.type == "cuda"

        @pipeline_def(batch_size=1, num_threads=1, device_id=(device.index or 0) if on_gpu else None)
        def probe():
            x = fn.random.uniform(shape=[1])
            return x.gpu() if on_gpu else x

        pipe = probe()
        pipe.build()
        pipe.run()
        del pipe
    except Exception as exc:  # any failure means "not here": say which
        return f"DALI cannot run on {device}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]}"
    return None


def host_memory_available() -> int:
    """Bytes this process may still use: MemAvailable, or less under a cgroup memory limit (SLURM
    jobs and containers run under one)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            room = max(int(limit) - usage, 0)
            available = room if available is None else min(available, room)
    return available if available is not None else 2**62


def choose_kind(kind: str, device: torch.device, need: int, local_ranks: int = 1) -> tuple[str, str]:
    """(loader kind, why) for `data.loader`, the same on every rank.

    `auto` keeps both training splits resident when they take at most a quarter of the memory the
    ranks can count on (free GPU memory; on a CPU, the memory available to the process shared by
    the node's `local_ranks` ranks, each of which holds its own copy), else streams them with
    DALI where a DALI pipeline actually runs, else with torch. The budget is the smallest over
    the ranks, and DALI counts only if it runs on every rank: ranks that chose differently would
    shuffle differently and duplicate or skip rows.
    """
    if kind != "auto":
        return kind, f"data.loader is {kind}"
    on_gpu = device.type == "cuda"
    budget = torch.cuda.mem_get_info(device)[0] if on_gpu else host_memory_available() // max(1, local_ranks)
    dali_problem = dali_runs(device)
    budget, dali_ok = (int(v) for v in all_reduce_min(torch.tensor([budget, int(dali_problem is None)],
                                                                   dtype=torch.int64)).tolist())
    gib = f"both training splits ({need / 2**30:.2f} GiB)"
    where = (f"the {budget / 2**30:.1f} GiB free on {device}" if on_gpu else
             f"the {budget / 2**30:.1f} GiB of host memory each of the node's {max(1, local_ranks)} rank(s) "
             f"can count on") + " (the least over ranks)"
    if need <= _RESIDENT_SHARE * budget:
        return "gpu-resident", f"{gib} fit in a quarter of {where}"
    why = f"{gib} exceed a quarter of {where}"
    if dali_ok:
        return "dali", why + "; DALI runs here"
    return "torch", why + f"; {dali_problem or 'DALI cannot run on another rank'}"


def make_train_loader(
    kind: str,
    source_dir,
    target_dir,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device,
    augment: bool,
    normalize: str = "per-domain",
    num_workers: int = 2,
    subset: int | None = None,
    stop_signals: tuple[str, ...] = IgnoreSignals.signals,
    channels_last: bool = False,
    local_ranks: int = 1,
    cpus: int | None = None,
) -> TrainLoader:
    """The training loader of one rank: `kind` is "auto", "gpu-resident", "dali" or "torch".

    `batch_size` is per rank. `subset` keeps only the first N training rows of each domain.
    `stop_signals` are the trainer's stop signals (train.signals): worker processes ignore them.
    `channels_last`: images come in that memory format (train.channels_last), at no extra copy.
    `local_ranks`: ranks on this node, which share its host memory (see `choose_kind`). `cpus`:
    this rank's CPUs (default: its affinity mask); DALI runs min(4, cpus) threads.
    `num_workers` are the reading processes of `dali` (at least 1) and `torch` (0: read in this
    process). `auto` keeps the data resident when both training splits fit comfortably in
    device memory (always, on a CPU device), else uses DALI if importable, else torch.

    On a GPU, `dali` spawns its workers (see dmhpc/data/dali.py), so it may be created after the
    process group; `torch` forks its workers, which never touch CUDA.
    """
    device = torch.device(device)
    if kind not in ("auto", *KINDS):
        raise DmhpcError(f"data.loader {kind!r}: expected one of auto, {', '.join(KINDS)}")
    if kind == "dali" and dali_runs(device) is not None:
        raise DmhpcError(f"data.loader dali: {dali_runs(device)}; install dmhpc[dali] (and a driver it runs "
                         f"with) or choose torch")
    _check_normalize(normalize)
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
        raise DmhpcError(
            f"batch size {batch_size}, rank {rank} of {world_size}, seed {seed}: need batch size >= 1,"
            " 0 <= rank < world size, seed >= 0"
        )
    if subset is not None and subset < 1:
        raise DmhpcError(f"subset {subset}: must be at least 1 row")
    dirs = (Path(source_dir), Path(target_dir))
    manifests = [load_manifest(d) for d in dirs]
    if manifests[SOURCE]["shape"] != manifests[TARGET]["shape"]:
        raise DmhpcError(
            f"{dirs[SOURCE]} and {dirs[TARGET]}: image shapes differ "
            f"({manifests[SOURCE]['shape']} and {manifests[TARGET]['shape']})"
        )
    stats = normalization(dirs[SOURCE], manifests[SOURCE], dirs[TARGET], manifests[TARGET], normalize)
    domains = []
    for domain, (directory, manifest, (mean, std)) in enumerate(zip(dirs, manifests, stats)):
        start, stop = split_rows(manifest, "train")
        rows = stop - start if subset is None else min(subset, stop - start)
        if rows < batch_size * world_size:
            used = "" if subset is None else f" (subset {subset})"
            raise DmhpcError(
                f"{directory}: {rows} training rows{used}, fewer than one global batch"
                f" ({world_size} ranks x {batch_size})"
            )
        stream = Stream(start, rows, batch_size, world_size, rank, seed, domain)
        domains.append(_Domain(directory, manifest, stream, mean, std))
    kind, reason = choose_kind(kind, device, sum(d.nbytes for d in domains), local_ranks)
    ignore = IgnoreSignals(tuple(stop_signals))
    cpus = cpus or len(os.sched_getaffinity(0))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if kind == "gpu-resident":
        backend = _Resident(domains, device, augment, fmt)
    elif kind == "torch":
        backend = _TorchBlocks(domains, device, augment, num_workers, ignore, fmt)
    else:
        from dmhpc.data.dali import DaliBatches

        backend = DaliBatches(domains, device, augment, num_workers, ignore, fmt, cpus)
    return TrainLoader(kind, reason, domains, backend, device)


# ----------------------------------------------------------------------------- evaluation


def eval_batches(directory, split: str, *, batch_size: int, rank: int, world_size: int, device, mean, std):
    """Iterator of (x, y, index) over this rank's contiguous part of `split`, in row order.

    No shuffling, augmentation or dropping: the ranks' parts (sizes may differ by one row) are
    consecutive, so gathering from ranks 0, 1, ... gives the split in row order. x is normalized
    float32 on `device` with the per-channel `mean` and `std` (see `domain_stats`), y its int64
    labels there, index a numpy int64 array of global indices (rows of the input arrays).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DmhpcError(
            f"batch size {batch_size}, rank {rank} of {world_size}: need batch size >= 1,"
            " 0 <= rank < world size"
        )
    manifest = load_manifest(directory)
    start, stop = split_rows(manifest, split)
    n = stop - start
    first, last = start + n * rank // world_size, start + n * (rank + 1) // world_size
    device = torch.device(device)
    stats = _channel_stats(mean, std, device)
    return _eval_iter(RowReader(directory, manifest), first, last, batch_size, device, stats)


def _eval_iter(reader: RowReader, first: int, last: int, batch_size: int, device: torch.device, stats):
    try:
        for a in range(first, last, batch_size):
            rows = reader.read(a, min(a + batch_size, last))
            x = torch.from_numpy(rows["images"]).to(device)
            yield _finish(x, None, *stats), torch.from_numpy(rows["labels"]).to(device), rows["index"]
    finally:
        reader.close()
