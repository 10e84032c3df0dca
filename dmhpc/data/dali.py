"""The `dali` training loader: a DALI pipeline fed by a parallel external source reading HDF5 shards.

DALI has no HDF5 reader, so each domain's rows come from a batch-mode parallel external source
whose callback reads a step's pieces of rows (dmhpc/data/batches.py) through a `RowReader`, as
many steps at once as there are workers (shard files are opened lazily inside each worker process,
never across a fork). Flips, transposes and
normalization run in the pipeline, on the GPU when there is one.

The callbacks are module-level and picklable so that workers can be spawned: on a CUDA device
the workers are always spawned, because the trainer has touched CUDA (process group, model)
before the first epoch and DALI refuses to fork after that. Spawned workers re-import the main
module, so a script of your own that trains on a GPU with this loader must do so under
`if __name__ == "__main__":`. (`python -m dmhpc.train` and the `dmhpc` command are safe:
multiprocessing never re-runs a package's `__main__`, and the console script is guarded.)
"""

from __future__ import annotations

import contextlib
import gc
import signal
from multiprocessing import resource_tracker

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dmhpc.data.batches import Domain, IgnoreSignals
from dmhpc.data.shards import RowReader


class BlockSource:
    """Batch-mode callback: the rows one domain contributes to each DALI iteration.

    The pipeline is built to start at (`first_epoch`, `first_step`); DALI epoch k is then the
    user's epoch `first_epoch + k`, from `first_step` for k = 0 and from step 0 after that. The
    callback returns (images, labels), plus the dihedral codes when augmenting. The codes come
    from the stream, keyed by (seed, epoch, step, rank), not from DALI's random operators, whose
    state depends on how many iterations ran since the pipeline was built: that would break
    exact resume.
    """

    def __init__(self, directory, manifest, stream, steps, first_epoch, first_step, augment, square, ignore):
        self.reader = RowReader(directory, manifest)
        self.ignore = ignore
        self.stream, self.steps = stream, steps
        self.first_epoch, self.first_step = first_epoch, first_step
        self.augment, self.square = augment, square
        self._in_worker = False

    def __setstate__(self, state):
        # Unpickled in a spawned worker, about a second after it started (torch and DALI imported):
        # ignore the stop signals from then on, not from its first batch. Before then they are
        # blocked (see `_spawned_deaf`).
        self.__dict__.update(state)
        self.ignore()
        self._in_worker = True

    def __call__(self, info):
        if not self._in_worker:  # the first call in each (forked or spawned) worker process
            self.ignore()
            self._in_worker = True
        epoch = self.first_epoch + info.epoch_idx
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        if step >= self.steps:
            raise StopIteration
        batch = self.reader.read_ranges(self.stream.pieces(epoch, step), ("images", "labels"))
        if self.augment:
            return batch["images"], batch["labels"], self.stream.codes(epoch, step, self.square)
        return batch["images"], batch["labels"]


def _domain(source: BlockSource, mean, std, augment: bool, square: bool, on_gpu: bool, channels_last: bool,
            ahead: int):
    """One domain's branch of the pipeline: read, (flip, transpose,) normalize; CHW out, or HWC for
    channels_last, which the trainer then views as NCHW without a copy. `ahead`: the batches its
    source reads at once (DALI's default, 1, read one at a time whatever the workers)."""
    layout = "HWC" if channels_last else "CHW"
    outputs = 3 if augment else 2
    images, labels, *codes = fn.external_source(
        source=source, num_outputs=outputs, batch=True, batch_info=True, parallel=True,
        layout=["CHW", "", ""][:outputs], prefetch_queue_depth=ahead,
    )
    if on_gpu:
        images, labels = images.gpu(), labels.gpu()
    # The same dihedral code as the torch loaders: bit 0 flips W, bit 1 flips H, bit 2 transposes,
    # in that order. The W flip is fused into the normalization.
    images = fn.crop_mirror_normalize(
        images, mean=mean, std=std, mirror=codes[0] % 2 if augment else 0, dtype=types.FLOAT,
        output_layout=layout,
    )
    if augment:
        codes = codes[0]
        images = fn.flip(images, horizontal=0, vertical=(codes // 2) % 2)
        if square:
            # A per-sample conditional: DALI has no per-sample transpose argument.
            if codes >= 4:
                images = fn.transpose(images, perm=[1, 0, 2] if channels_last else [0, 2, 1],
                                      transpose_layout=False)
    return images, labels


@pipeline_def(enable_conditionals=True)
def _pipeline(sources, stats, augment, square, on_gpu, channels_last, ahead):
    """Images and labels of each domain read (the source, and the target where it is read)."""
    outputs = []
    for source, (mean, std) in zip(sources, stats):
        outputs += _domain(source, mean, std, augment, square, on_gpu, channels_last, ahead)
    return tuple(outputs)


@contextlib.contextmanager
def _spawned_deaf(ignore: IgnoreSignals):
    """Worker processes spawned inside start with the stop signals blocked, until `BlockSource`
    ignores them: a spawned worker starts with their default action, and one signalled before it
    had imported torch and DALI (a second or more: srun and scancel signal every process of the
    step) died, and the trainer failed ("Workers initialization failed") instead of checkpointing.
    This process gets a signal sent meanwhile when the block ends."""
    resource_tracker.ensure_running()  # (its start unblocks SIGTERM: started outside the block)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.Signals[name] for name in ignore.signals})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class DaliBatches:
    """Runs the pipeline for `TrainLoader.epoch`; rebuilt only when asked for an unexpected position.

    After a complete epoch the pipeline is reset at once, so it reads the next epoch's first
    batches while the trainer evaluates. A caller that stops early or jumps elsewhere gets a new
    pipeline (and new workers) starting exactly where it asks.
    """

    def __init__(self, domains: list[Domain], device: torch.device, augment: bool, num_workers: int,
                 ignore: IgnoreSignals, memory_format, cpus: int):
        self.domains, self.device, self.augment, self.ignore = domains, device, augment, ignore
        self.cpus = cpus  # this rank's share of the node's CPUs: DALI's threads come out of it
        self.memory_format = memory_format
        self.num_workers = max(1, num_workers)  # a parallel external source needs at least one worker
        self._iter = None
        self._next = None  # (epoch, step) the running pipeline delivers next

    def _build(self, epoch: int, step: int) -> None:
        self.close()
        source = self.domains[0]
        shape = source.manifest["shape"]
        square = shape[1] == shape[2]
        steps = source.stream.steps
        callbacks = [
            BlockSource(d.directory, d.manifest, d.stream, steps, epoch, step, self.augment, square, self.ignore)
            for d in self.domains
        ]
        on_gpu = self.device.type == "cuda"
        spawn = on_gpu or torch.cuda.is_initialized()
        with _spawned_deaf(self.ignore) if spawn else contextlib.nullcontext():
            self._iter = self._start(callbacks, square, on_gpu, spawn)
        self._next = (epoch, step)

    def _start(self, callbacks: list[BlockSource], square: bool, on_gpu: bool, spawn: bool) -> DALIGenericIterator:
        """The pipeline of `callbacks`, built, its workers started."""
        source = self.domains[0]
        pipe = _pipeline(
            callbacks,
            [(list(d.mean), list(d.std)) for d in self.domains],
            self.augment,
            square,
            on_gpu,
            self.memory_format == torch.channels_last,
            max(2, self.num_workers),  # every worker busy, and a batch ready beside the one in use
            batch_size=source.stream.batch_size,
            num_threads=max(1, min(4, self.cpus)),
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if on_gpu
            else None,
            py_num_workers=self.num_workers,
            py_start_method="spawn" if spawn else "fork",
            prefetch_queue_depth=2,
        )
        return DALIGenericIterator(
            [pipe], ["xs", "ys", "xt", "yt"][:2 * len(self.domains)], auto_reset=False, prepare_first_batch=False
        )

    def batches(self, epoch: int, start_step: int):
        """Yield (xs, ys, xt, yt), or (xs, ys) where the target is not read, for steps start_step.. of `epoch`."""
        steps = self.domains[0].stream.steps
        if start_step >= steps:
            return
        if self._next != (epoch, start_step):
            self._build(epoch, start_step)
        it, self._next = self._iter, None  # while being read, the pipeline's position is unknown
        done = False
        try:
            nhwc = self.memory_format == torch.channels_last
            names = ("xs", "ys", "xt", "yt")[:2 * len(self.domains)]
            for out in it:
                data = out[0]
                yield tuple(data[k].permute(0, 3, 1, 2) if nhwc and k.startswith("x") else data[k] for k in names)
            done = True
        finally:
            if it is self._iter:  # not replaced by a later call
                if done:
                    it.reset()  # starts reading the next epoch now
                    self._next = (epoch + 1, 0)
                else:
                    self.close()

    def close(self) -> None:
        """Stop the pipeline and its worker processes."""
        if self._iter is not None:
            # DALI has no public close: the workers stop when the pipeline is garbage-collected.
            self._iter = None
            gc.collect()
        self._next = None
