"""The `gpu-resident` loader kind: the rows in use of the domains read held on the device (in host
memory on a CPU), gathered by index per step, then flipped, rotated and normalized there."""

from __future__ import annotations

import numpy as np
import torch

from dmhpc.data.batches import SOURCE, Domain, channel_stats, device_codes, finish, to_device
from dmhpc.data.shards import RowReader

# Rows read at a time into resident memory: bounds the host memory a rank needs while staging.
_STAGING_BYTES = 64 << 20


class ResidentBatches:
    """`gpu-resident`: the rows in use of the domains read (source, target) held on the device."""

    def __init__(self, domains: list[Domain], device: torch.device, augment: bool, memory_format):
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
                reader.open_limit = 1  # one pass in order: a shard read is done with (84 stayed open)
                for a in range(0, d.stream.rows, block):
                    b = min(a + block, d.stream.rows)
                    rows = reader.read(d.stream.start + a, d.stream.start + b)
                    images[a:b].copy_(torch.from_numpy(rows["images"]))
                    labels[a:b].copy_(torch.from_numpy(rows["labels"]))
            self.parts.append((d.stream, images, labels, *channel_stats(d.mean, d.std, device)))

    def batches(self, epoch: int, start_step: int):
        for step in range(start_step, self.parts[SOURCE][0].steps):
            out = []
            for stream, images, labels, scale, shift in self.parts:
                rows = to_device(stream.samples(epoch, step), self.device)
                codes = device_codes(stream, epoch, step, self.square, self.device) if self.augment else None
                out += [finish(images.index_select(0, rows), codes, scale, shift, self.memory_format),
                        labels.index_select(0, rows)]
            yield tuple(out)

    def close(self) -> None:
        self.parts = []
