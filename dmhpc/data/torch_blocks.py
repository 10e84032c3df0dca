"""The `torch` loader kind: a DataLoader whose worker processes read each domain's pieces of
consecutive rows for a step (see dmhpc/data/batches.py); the batch is flipped, rotated and
normalized on the device, by the same code as `gpu-resident`."""

from __future__ import annotations

import gc

import torch

from dmhpc.data.batches import SOURCE, Domain, IgnoreSignals, channel_stats, device_codes, finish
from dmhpc.data.shards import RowReader


class _BlockReader(torch.utils.data.Dataset):
    """Reads one step's batches of the domains read; its keys are (source ranges[, target ranges])."""

    def __init__(self, domains: list[Domain]):
        self.readers = [RowReader(d.directory, d.manifest) for d in domains]  # opened in each worker

    def __getitem__(self, pieces):
        out = []
        for reader, ranges in zip(self.readers, pieces):
            rows = reader.read_ranges(ranges, ("images", "labels"))
            out += [torch.from_numpy(rows["images"]), torch.from_numpy(rows["labels"])]
        return out


class _EpochPlan(torch.utils.data.Sampler):
    """The steps of the epoch being read, set before each pass: each domain's row ranges, drawn step
    by step as the loader asks (in the main process). Drawn all at once, an epoch's plan cost 0.3 s
    and 18 MiB per million rows at every epoch's start."""

    def __init__(self):
        self.epoch, self.steps, self.streams = 0, range(0), []

    def __iter__(self):
        epoch, streams = self.epoch, self.streams
        return (tuple(s.pieces(epoch, k) for s in streams) for k in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class TorchBlocks:
    """`torch`: a DataLoader over block pairs, read by `num_workers` persistent worker processes."""

    def __init__(self, domains: list[Domain], device: torch.device, augment: bool, num_workers: int,
                 ignore: IgnoreSignals, memory_format):
        self.device, self.augment, self.memory_format = device, augment, memory_format
        self.streams = [d.stream for d in domains]
        self.square = domains[SOURCE].manifest["shape"][1] == domains[SOURCE].manifest["shape"][2]
        self.stats = [channel_stats(d.mean, d.std, device) for d in domains]
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
        self.plan.epoch, self.plan.steps, self.plan.streams = epoch, steps, self.streams
        for step, rows in zip(steps, self.loader):
            out = []
            for d, stream in enumerate(self.streams):
                images = rows[2 * d].to(self.device, non_blocking=True)
                codes = device_codes(stream, epoch, step, self.square, self.device) if self.augment else None
                labels = rows[2 * d + 1].to(self.device, non_blocking=True)
                out += [finish(images, codes, *self.stats[d], self.memory_format), labels]
            yield tuple(out)

    def close(self) -> None:
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator, once an epoch began
        if iterator is not None:
            # Stopped now, not when collected: after a worker's error its traceback still holds the
            # iterator, and the workers ignore SIGTERM (IgnoreSignals), so multiprocessing's exit
            # handler, which terminates and then joins them, waited for them forever.
            iterator._shutdown_workers()
        gc.collect()
        for reader in self.dataset.readers:
            reader.close()
