"""Training and evaluation batches from sharded data sets (docs/data-format.md).

`make_train_loader` gives one rank its paired (source, target) training batches, by one of three
kinds behind one interface (`TrainLoader` over a `dmhpc.data.batches.Batches`); a run without a
term that reads the target gets its source batches alone:

- `gpu-resident` (dmhpc/data/resident.py): the training splits read are loaded once and kept on the
  device; batches are gathered there by index, then flipped, rotated and normalized there.
- `dali` (dmhpc/data/dali.py): a DALI pipeline whose parallel external source reads the shards.
- `torch` (dmhpc/data/torch_blocks.py): a torch DataLoader whose worker processes read the
  shards; the batch is flipped, rotated and normalized on the device.

`auto` picks among them (`choose_kind`), the same on every rank. What every kind shares (sharding,
shuffling, augmentation, normalization) is described and implemented in dmhpc/data/batches.py.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from pathlib import Path

import torch

from dmhpc.cgroups import hierarchy
from dmhpc.cpus import usable_cpus
from dmhpc.data.batches import (SOURCE, TARGET, Batches, Domain, IgnoreSignals, Stream, channel_stats,
                                check_normalize, finish, normalization, read_ahead)
from dmhpc.data.resident import ResidentBatches
from dmhpc.data.shards import RowReader, load_manifest, split_rows
from dmhpc.data.torch_blocks import TorchBlocks
from dmhpc.distributed import agree, all_reduce_min
from dmhpc.errors import DmhpcError

KINDS = ("gpu-resident", "dali", "torch")
# The order each kind reads an epoch's rows in (batches.py): kinds of one order may take over an
# epoch in its middle (DALI gone from the nodes a run resumes on), kinds of two may not.
ORDER = {"gpu-resident": "rows", "dali": "blocks", "torch": "blocks"}
# What `auto` resumes an epoch begun by dali or torch with: whichever of the two runs here now.
STREAMED = "dali or torch"
# An epoch begun resident resumed in its middle: gpu-resident, whatever data.loader says, or nothing.
RESUMED_RESIDENT = "gpu-resident, as the epoch resumed"
# `auto` keeps the data on the GPU when the training splits read take at most this share of the
# free device memory: the rest is for the model, activations and the allocator's slack.
_RESIDENT_SHARE = 0.25


class TrainLoader:
    """One rank's paired (source, target) training batches; made by `make_train_loader`.

    `len(loader)` is the number of steps per epoch (the same on every rank); `kind` is the
    loader kind in use and `reason` says in one line why it was chosen. `domains` are both
    domains (their normalization); `backend` reads the first `reads` of them.
    """

    def __init__(self, kind: str, reason: str, domains: list[Domain], backend: Batches, device: torch.device,
                 reads: int = 2):
        self.kind, self.reason, self._device = kind, reason, device
        self._domains = domains
        self._backend = backend
        self._reads = reads
        self._epochs = weakref.WeakSet()  # epoch iterators not yet finished or collected
        self._started = 0  # epochs started: only the latest may be read (see `epoch`)

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
        only); xt and yt are None where the target is not read. The batches depend only on (seed,
        epoch, step, rank): starting at `start_step` yields exactly the tail of the whole epoch,
        which makes resuming exact.
        """
        if self._backend is None:  # (the resident one raised an IndexError, the torch one a TypeError)
            raise DmhpcError(f"an epoch asked of a closed {self.kind} loader")
        if epoch < 0 or not 0 <= start_step <= len(self):
            raise DmhpcError(
                f"epoch {epoch}, step {start_step}: an epoch has steps 0 to {len(self)} here"
                " (resuming with another batch size, world size or data set?)"
            )
        self._started += 1
        batches = self._backend.batches(epoch, start_step)
        if self._reads == 1:
            batches = _without_target(batches)
        batches = self._latest_only(_one_line_failures(batches), self._started)
        self._epochs.add(batches)
        return batches

    def _latest_only(self, batches, number: int):
        """`batches`, refused once a later epoch has started: the torch loader's workers serve one
        epoch, and an earlier one read on after a later began ended early without a word."""
        batches = iter(batches)
        while True:
            if number != self._started:  # before the read: the torch loader's would just end the epoch
                raise DmhpcError(f"an epoch of this loader was read on after a later one started ({self.kind}: one "
                                 f"epoch at a time)")
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def close(self) -> None:
        """Release the workers, pipelines, open files and resident data; ends unfinished epochs."""
        for batches in list(self._epochs):
            batches.close()  # a suspended epoch holds the pipeline or DataLoader iterator alive
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _without_target(batches):
    """The source's (xs, ys) batches as (xs, ys, None, None); closing this closes `batches`."""
    with contextlib.closing(batches):
        for batch in batches:
            yield (*batch, None, None)


_TRACEBACK = "Traceback (most recent call last):"
# How torch's DataLoader and DALI's parallel external source say that a reader worker process died
# (killed by the kernel for memory, or by hand): raised wherever the main process happens to be.
_WORKER_DIED = ("DataLoader worker (pid", "Worker data receiving interrupted", "Workers initialization failed")


def worker_died(exc: BaseException) -> str | None:
    """One line for a reader worker's death reported as `exc`, or None when it is something else."""
    text = str(exc).strip()
    if not isinstance(exc, RuntimeError) or not text.startswith(_WORKER_DIED):
        return None
    return (f"a data reader worker process died ({text.splitlines()[0]}); out of memory? Fewer "
            f"data.num_workers use less; a rerun resumes from the last checkpoint")


def _one_line_failures(batches):
    """`batches`, with a failure in a reader worker as one line. Workers hand their error back as the
    text of their whole traceback (torch: in an exception of the same type; DALI: in a plain
    Exception); re-raised here as a DmhpcError with the worker's own message, chained to that."""
    try:
        yield from batches  # closing this generator closes `batches` (its workers and pipeline)
    except Exception as exc:
        if _TRACEBACK not in str(exc):
            raise
        raise DmhpcError(_last_error_line(str(exc))) from exc


def _last_error_line(traceback_text: str) -> str:
    """The error line a traceback ends with ("module.Type: message"): dmhpc's own messages name the
    file and the problem already; another error keeps its type."""
    lines = traceback_text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith(" ")]  # File ... lines, code, ^^^
    line = lines[frames[-1] + 1] if frames and frames[-1] + 1 < len(lines) else lines[-1]
    return line.removeprefix(f"{DmhpcError.__module__}.{DmhpcError.__qualname__}: ")


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

        # (the GPU DaliBatches builds its pipeline on: a device without an index is the current one)
        index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None

        @pipeline_def(batch_size=1, num_threads=1, device_id=index)
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


def host_memory_available(proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> int:
    """Bytes this process may still use: MemAvailable, or less under a cgroup memory limit.

    The limit is read in this process's own cgroup and every one above it (/proc/self/cgroup; v2
    memory.max, v1 memory.limit_in_bytes): Slurm sets a job's limit on the job's cgroup, below the
    root, where a container's limit sits at the root of its namespace. The tightest room wins.
    """
    available = None
    try:
        with open(f"{proc}/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for room in _cgroup_rooms(proc, cgroup_fs):
        available = room if available is None else min(available, room)
    return available if available is not None else 2**62


def _cgroup_rooms(proc: str, cgroup_fs: str) -> list[int]:
    """limit - usage of every memory cgroup from this process's up to the root that has a limit."""
    names = {"v2": ("memory.max", "memory.current", "inactive_file"),
             "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
    rooms = []
    for version, directory in hierarchy("memory", proc, cgroup_fs):
        limit_name, usage_name, cache_name = names[version]
        try:
            limit = (directory / limit_name).read_text().strip()
            usage = int((directory / usage_name).read_text().strip()) - _stat(directory, cache_name)
        except (OSError, ValueError):
            limit = ""
        if limit.isdecimal() and int(limit) < 2**60:
            rooms.append(max(int(limit) - usage, 0))
    return rooms


def _stat(directory: Path, name: str) -> int:
    """A counter of the cgroup's memory.stat, 0 where absent. The usage counts the page cache, and
    the inactive part of it is given back under pressure: it is room (as the kubelet's "working
    set" counts it), or a job that has just read its data would see none left."""
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def choose_kind(kind: str, device: torch.device, need: int, local_ranks: int = 1,
                what: str = "both training splits") -> tuple[str, str]:
    """(loader kind, why) for `data.loader`, the same on every rank.

    `auto` keeps the training splits read (`need` bytes) resident when they take at most a quarter of the memory the
    ranks can count on (free GPU memory; on a CPU, the memory available to the process shared by
    the node's `local_ranks` ranks, each of which holds its own copy), else streams them with
    DALI where a DALI pipeline actually runs, else with torch. The budget is the smallest over
    the ranks, and DALI counts only if it runs on every rank: ranks that chose differently would
    shuffle differently and duplicate or skip rows. `dali` asked for is refused on every rank when
    it cannot run on one: a rank that stopped alone would leave the others waiting for it.
    `gpu-resident` asked for is refused alike where `need` exceeds the whole budget (a collective too).
    """
    if kind == "dali":
        problem = dali_runs(device)
        if not int(all_reduce_min(torch.tensor([int(problem is None)], dtype=torch.int64))[0]):
            raise DmhpcError(f"data.loader dali: {problem or 'DALI cannot run on another rank (its log says why)'}; "
                             f"install dmhpc[dali] (and a driver it runs with) or choose torch")
    if kind == STREAMED:
        return _streamer(device, "the run's epochs were read by dali or torch, in one order, which auto keeps")
    if kind not in ("auto", "gpu-resident", RESUMED_RESIDENT):
        return kind, f"data.loader is {kind}"
    on_gpu = device.type == "cuda"
    budget = torch.cuda.mem_get_info(device)[0] if on_gpu else host_memory_available() // max(1, local_ranks)
    budget = int(all_reduce_min(torch.tensor([budget], dtype=torch.int64))[0])
    gib = f"{what} ({need / 2**30:.2f} GiB)"
    where = (f"the {budget / 2**30:.1f} GiB free on {device}" if on_gpu else
             f"the {budget / 2**30:.1f} GiB of host memory each of the node's {max(1, local_ranks)} rank(s) "
             f"can count on") + " (the least over ranks)"
    if kind == RESUMED_RESIDENT and need > budget:  # (another loader would repeat and skip the epoch's rows)
        raise DmhpcError(f"data.loader: the epoch resumed in its middle began with gpu-resident, and {gib} exceed "
                         f"{where}; resume it where they fit, or from the selected epoch's end (--resume "
                         f"RUN/checkpoints/best.pt)")
    if kind == RESUMED_RESIDENT:
        return "gpu-resident", "the epoch resumed in its middle began with it"
    if kind == "gpu-resident":  # asked for: allowed past the quarter, not past the memory itself
        if need > budget:       # (which ended in an allocator's traceback, or the OOM killer)
            raise DmhpcError(f"data.loader gpu-resident: {gib} exceed {where}; choose auto, dali or torch")
        return kind, f"data.loader is {kind}"
    if need <= _RESIDENT_SHARE * budget:
        return "gpu-resident", f"{gib} fit in a quarter of {where}"
    # DALI is tried only now: its probe builds a pipeline (on a GPU, with DALI's memory pool) that
    # resident data never uses. Every rank takes this branch alike (the budget is the least over ranks).
    return _streamer(device, f"{gib} exceed a quarter of {where}")


def _streamer(device: torch.device, why: str) -> tuple[str, str]:
    """dali where a DALI pipeline runs on every rank, else torch; with `why` streamed, and why that one."""
    dali_problem = dali_runs(device)
    if int(all_reduce_min(torch.tensor([int(dali_problem is None)], dtype=torch.int64))[0]):
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
    read_target: bool = True,
) -> TrainLoader:
    """The training loader of one rank: `kind` is "auto", "gpu-resident", "dali" or "torch" (or
    STREAMED: a run read by dali or torch resumed under auto; RESUMED_RESIDENT: an epoch begun
    resident resumed in its middle).

    `batch_size` is per rank. `subset` keeps only the first N training rows of each domain.
    `stop_signals` are the trainer's stop signals (train.signals): worker processes ignore them.
    `channels_last`: images come in that memory format (train.channels_last), at no extra copy.
    `local_ranks`: ranks on this node, which share its host memory (see `choose_kind`). `cpus`:
    this rank's CPUs (default: its affinity mask); DALI runs min(4, cpus) threads. `num_workers`
    are the reading processes of `dali` (at least 1) and `torch` (0: read in this process), at most
    `cpus` - 1. `auto` and `dali` are decided by `choose_kind`, the same on every rank.

    `read_target`: False for a run whose loss never reads the target's training batches (no
    adaptation, the oracle): only the source's are read, held and checked, and the epoch's xt and
    yt are None. The source's batches are the same either way (each domain draws its own rows).

    On a GPU, `dali` spawns its workers (see dmhpc/data/dali.py), so it may be created after the
    process group; `torch` forks its workers, which never touch CUDA.
    """
    device = torch.device(device)
    if kind not in ("auto", STREAMED, RESUMED_RESIDENT, *KINDS):
        raise DmhpcError(f"data.loader {kind!r}: expected one of auto, {', '.join(KINDS)}")
    check_normalize(normalize)
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
        if rows < batch_size * world_size and (domain == SOURCE or read_target):
            used = "" if subset is None else f" (subset {subset})"
            raise DmhpcError(
                f"{directory}: {rows} training rows{used}, fewer than one global batch"
                f" ({world_size} ranks x {batch_size})"
            )
        stream = Stream(start, rows, batch_size, world_size, rank, seed, domain)
        domains.append(Domain(directory, manifest, stream, mean, std))
    read = domains if read_target else domains[:1]
    kind, reason = choose_kind(kind, device, sum(d.nbytes for d in read), local_ranks,
                               "both training splits" if read_target else "the source's training split")
    ignore = IgnoreSignals(tuple(stop_signals))
    cpus = cpus or usable_cpus()
    if kind in ("torch", "dali") and num_workers > cpus - 1:
        # Readers beyond the rank's CPUs only take turns with the training process; DALI needs one.
        given = max(1 if kind == "dali" else 0, cpus - 1)
        if given < num_workers:
            reason += f"; {given} of data.num_workers={num_workers} reader(s), for this rank's {cpus} CPU(s)"
            num_workers = given
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    built: list[Batches] = []

    def build() -> Batches:
        if kind == "gpu-resident":
            built.append(ResidentBatches(read, device, augment, fmt))
        elif kind == "torch":
            built.append(TorchBlocks(read, device, augment, num_workers, ignore, fmt))
        else:
            from dmhpc.data.dali import DaliBatches  # DALI is optional and heavy to import

            built.append(DaliBatches(read, device, augment, num_workers, ignore, fmt, cpus))
        return built[-1]

    # Agreed: a backend failing on one rank alone (out of GPU memory, DALI's pipeline) left the
    # others in the trainer's next collective (on NCCL until the watchdog's timeout).
    try:
        backend = agree(build)
    except BaseException:
        for made in built:  # this rank's, built where another's failed: its workers end here
            made.close()
        raise
    return TrainLoader(kind, reason, domains, backend, device, len(read))


# ----------------------------------------------------------------------------- evaluation


def eval_batches(directory, split: str, *, batch_size: int, rank: int, world_size: int, device, mean, std,
                 manifest: dict | None = None):
    """Iterator of (x, y, index) over this rank's contiguous part of `split`, in row order.

    No shuffling, augmentation or dropping: the ranks' parts (whole batches, `eval_rows`; a split
    of fewer batches than ranks leaves some without rows) are consecutive, so gathering from
    ranks 0, 1, ... gives the split in row order. x is normalized
    float32 on `device` with the per-channel `mean` and `std` (see `domain_stats`), y its int64
    labels there, index a numpy int64 array of global indices (rows of the input arrays).
    `manifest`: the directory's, as the caller read and checked it (default: read here).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DmhpcError(
            f"batch size {batch_size}, rank {rank} of {world_size}: need batch size >= 1,"
            " 0 <= rank < world size"
        )
    manifest = load_manifest(directory) if manifest is None else manifest
    first, last = eval_rows(manifest, split, rank, world_size, batch_size)
    device = torch.device(device)
    stats = channel_stats(mean, std, device)
    return _eval_iter(RowReader(directory, manifest), first, last, batch_size, device, stats)


def eval_rows(manifest: dict, split: str, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Rows [first, last) of `split` that `rank` evaluates: consecutive parts, in rank order, of
    whole batches. The batches are those of one process at any number of ranks, so the figures
    are too: a CPU forward pass gives other bits for an image in a batch of another size
    (probabilities 1e-8 apart), and an evaluation at another world size than training's differed
    from the logged numbers in their 8th digit."""
    start, stop = split_rows(manifest, split)
    batches = -(-(stop - start) // batch_size)
    return (min(start + batches * rank // world_size * batch_size, stop),
            min(start + batches * (rank + 1) // world_size * batch_size, stop))


def _eval_iter(reader: RowReader, first: int, last: int, batch_size: int, device: torch.device, stats):
    spans = [(a, min(a + batch_size, last)) for a in range(first, last, batch_size)]
    try:
        with contextlib.closing(read_ahead(reader.read, spans, ahead=device.type == "cuda")) as batches:
            for rows in batches:
                x = torch.from_numpy(rows["images"]).to(device, non_blocking=True)
                yield finish(x, None, *stats), torch.from_numpy(rows["labels"]).to(device), rows["index"]
    finally:
        reader.close()
