"""The training and evaluation loaders on real sharded HDF5 data sets, real DALI CPU pipelines and
real DataLoader worker processes.

Every image's pixels average to a known number (its global index, plus 1000 for the target), and
that average survives flips and rotations: so from a normalized, augmented batch the tests recover
which rows it holds, then compare pixel by pixel with the stored images.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BIN, ROOT, clean_env
from dmhpc.data.batches import dihedral, domain_stats
from dmhpc.data.loaders import dali_available, eval_batches, make_train_loader
from dmhpc.data.shards import load_manifest, split_rows, write_dataset
from dmhpc.errors import DmhpcError

SHAPE = (3, 8, 8)
TARGET_OFFSET = 1000
BATCH, WORLD, SEED = 8, 2, 3

# Skipped where DALI is not installed, not where dali_available() (under test) says so: broken, it
# skipped every DALI test and `auto` never chose DALI, silently.
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None or
                                importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI is not installed")

# (kind, num_workers): every loader kind, the torch one in-process and with worker processes.
CONFIGS = [
    pytest.param("gpu-resident", 0, id="gpu-resident"),
    pytest.param("dali", 1, id="dali", marks=needs_dali),
    pytest.param("torch", 0, id="torch-0"),
    pytest.param("torch", 2, id="torch-2"),
]
# The same, as single values for parametrized fixtures.
FIXTURE_CONFIGS = [pytest.param(tuple(p.values), id=p.id, marks=p.marks) for p in CONFIGS]


def _images(n: int, offset: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Image i: `offset + i` plus zero-mean noise, so its pixel mean names it in any orientation."""
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, (n, *shape))
    noise -= noise.mean(axis=(1, 2, 3), keepdims=True)
    return ((offset + np.arange(n))[:, None, None, None] + noise).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Source (240 images: 168 training rows) and target (200: 140) data sets in 64-row shards."""
    root = tmp_path_factory.mktemp("loaders")
    out = {}
    for name, n, offset in (("source", 240, 0), ("target", 200, TARGET_OFFSET)):
        images = _images(n, offset)
        manifest = write_dataset(images, np.arange(n) % 2, None, root / name, shard_size=64)
        out[name] = {"dir": root / name, "images": images, "labels": np.arange(n) % 2, "manifest": manifest}
    return out


def _loader(data, kind, workers, *, rank=0, world=WORLD, augment=False, normalize="per-domain", **kw):
    return make_train_loader(
        kind, data["source"]["dir"], data["target"]["dir"], batch_size=kw.pop("batch_size", BATCH), rank=rank,
        world_size=world, seed=kw.pop("seed", SEED), device=kw.pop("device", "cpu"), augment=augment,
        normalize=normalize, num_workers=workers, cpus=kw.pop("cpus", 3), **kw,  # 3 CPUs: 2 readers kept
    )


def test_the_resident_load_keeps_one_shard_open_at_a_time(data, monkeypatch):
    """It reads each shard once, in order, but kept every one it read open (84 while loading 10,752
    rows, 186 MiB of HDF5 state; up to 512 a reader)."""
    from dmhpc.data.shards import RowReader

    opened, file = [], RowReader._file

    def counted(self, number):
        f = file(self, number)
        opened.append(len(self._files))
        return f

    monkeypatch.setattr(RowReader, "_file", counted)
    _loader(data, "gpu-resident", 0, world=1).close()
    assert len(opened) >= 4 and max(opened) == 1, opened  # the 4 shards of each domain, one by one


def test_the_resident_load_stages_bounded_blocks_and_keeps_float16_as_half(tmp_path, data, monkeypatch):
    """What the loader choice counts on (docs/training.md): float16 rows held at 2 bytes a pixel, and
    host memory of one staging block a rank while they are read, not the whole split."""
    from dmhpc.data import resident
    from dmhpc.data.shards import RowReader

    for name in ("source", "target"):
        write_dataset(data[name]["images"], data[name]["labels"], None, tmp_path / name, shard_size=64,
                      dtype="float16")
    row_bytes = int(np.prod(data["source"]["images"].shape[1:])) * 2
    monkeypatch.setattr(resident, "_STAGING_BYTES", 10 * row_bytes)  # 10 float16 rows a block
    spans, read = [], RowReader.read

    def counted(self, start, stop, *args, **kwargs):
        spans.append(stop - start)
        return read(self, start, stop, *args, **kwargs)

    monkeypatch.setattr(RowReader, "read", counted)
    loader = make_train_loader("gpu-resident", tmp_path / "source", tmp_path / "target", batch_size=8, rank=0,
                               world_size=1, seed=0, device="cpu", augment=False, num_workers=0)
    try:
        held = [images for _, images, *_ in loader._backend.parts]
        assert [h.dtype for h in held] == [torch.float16, torch.float16]
        assert max(spans) == 10 and sum(spans) == sum(len(h) for h in held), spans
    finally:
        loader.close()


@pytest.mark.parametrize("kind, workers", [("gpu-resident", 0), ("torch", 0)])
def test_a_closed_loader_asked_for_an_epoch_says_so(data, kind, workers):
    """The resident loader raised an IndexError, the torch one a TypeError (a notebook's second run);
    closing twice is no error."""
    loader = _loader(data, kind, workers, world=1)
    loader.close()
    loader.close()
    with pytest.raises(DmhpcError, match=f"^an epoch asked of a closed {kind} loader$"):
        loader.epoch(0)


def test_the_torch_loader_draws_an_epochs_pieces_as_it_reads_them(data, monkeypatch):
    """It drew every step's pieces at the epoch's start, in the trainer's process: 0.3 s and 18 MiB a
    million rows, at every epoch and every resume."""
    from dmhpc.data.batches import Stream

    drawn, pieces = [], Stream.pieces
    monkeypatch.setattr(Stream, "pieces", lambda self, epoch, step: (drawn.append(step), pieces(self, epoch, step))[1])
    loader = _loader(data, "torch", 0, world=1)
    try:
        batches = loader.epoch(0)
        next(batches)
        assert len(loader) == 21 and len(drawn) <= 4, drawn  # a step's pieces per domain, and one ahead
        assert len(list(batches)) == 20
    finally:
        loader.close()


def _epoch(loader, epoch, start_step=0, stop_after=None):
    """The batches of one epoch, as CPU tensors (kept as yielded: a loader reusing buffers fails)."""
    out = []
    for batch in loader.epoch(epoch, start_step):
        out.append(tuple(t.cpu() for t in batch))
        if len(out) == stop_after:
            break
    return out


def _stats(domain):
    s = domain["manifest"]["stats"]
    return np.array(s["mean"])[None, :, None, None], np.array(s["std"])[None, :, None, None]


def _unnormalize(x, stats):
    mean, std = stats
    return x.double().numpy() * std + mean


def _ids(x, stats, offset=0):
    """Global indices of the images of a normalized batch (pixel means are orientation-free)."""
    return np.rint(_unnormalize(x, stats).mean(axis=(1, 2, 3))).astype(np.int64) - offset


def _train_index(domain) -> set:
    return set(domain["manifest"]["splits"]["train"])


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and 90-degree rotations of a (C, H, W) image, written out independently."""
    out = []
    for k in range(4):
        r = np.rot90(image, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return out


def _children() -> set[str]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(f.read().split())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return pids


def _children_left(allowed: set[str], timeout: float = 10.0) -> set[str]:
    """Child processes beyond `allowed` once they had `timeout` seconds to exit (and be reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        multiprocessing.active_children()  # reaps workers that have exited
        left = _children() - allowed
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ----------------------------------------------------------------------------- shared helpers


def test_dihedral_gives_all_eight_symmetries_per_sample():
    image = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    out = dihedral(torch.from_numpy(np.stack([image] * 8)), torch.arange(8, dtype=torch.uint8)).numpy()
    expected = _symmetries(image)
    matched = {next(k for k, e in enumerate(expected) if np.array_equal(o, e)) for o in out}
    assert matched == set(range(8))


def test_dihedral_flips_only_when_not_square():
    image = np.random.default_rng(2).normal(size=(2, 4, 6)).astype(np.float32)
    out = dihedral(torch.from_numpy(np.stack([image] * 4)), torch.arange(4, dtype=torch.uint8)).numpy()
    for o, e in zip(out, [image, image[:, :, ::-1], image[:, ::-1, :], image[:, ::-1, ::-1]]):
        np.testing.assert_array_equal(o, e)


def test_domain_stats(data):
    s, t = data["source"]["manifest"]["stats"], data["target"]["manifest"]["stats"]
    got = domain_stats(data["source"]["dir"], data["target"]["dir"], "per-domain")
    assert got == ((s["mean"], s["std"]), (t["mean"], t["std"]))
    got = domain_stats(data["source"]["dir"], data["target"]["dir"], "source")
    assert got == ((s["mean"], s["std"]), (s["mean"], s["std"]))
    with pytest.raises(DmhpcError, match="data.normalize"):
        domain_stats(data["source"]["dir"], data["target"]["dir"], "global")


# ----------------------------------------------------------------------------- every kind


@pytest.fixture(scope="module", params=FIXTURE_CONFIGS)
def plain(request, data):
    """Two epochs of both ranks without augmentation, and one epoch again: (kind, {rank: ...})."""
    kind, workers = request.param
    runs = {}
    for rank in range(WORLD):
        loader = _loader(data, kind, workers, rank=rank)
        try:
            runs[rank] = {"len": len(loader), "kind": loader.kind, 0: _epoch(loader, 0), 1: _epoch(loader, 1),
                          "again": _epoch(loader, 0)}
        finally:
            loader.close()
    return kind, runs


def test_same_steps_on_every_rank(plain, data):
    _, runs = plain
    steps = 168 // (BATCH * WORLD)
    for rank in range(WORLD):
        assert runs[rank]["len"] == steps
        assert len(runs[rank][0]) == len(runs[rank][1]) == steps
        for xs, ys, xt, yt in runs[rank][0]:
            assert xs.shape == xt.shape == (BATCH, *SHAPE) and xs.dtype == torch.float32
            assert ys.shape == yt.shape == (BATCH,) and ys.dtype == torch.int64


def test_epoch_covers_disjoint_rows_of_the_training_split(plain, data):
    kind, runs = plain
    src = data["source"]
    for epoch in (0, 1):
        ids = np.concatenate([_ids(b[0], _stats(src)) for r in range(WORLD) for b in runs[r][epoch]])
        assert len(ids) == len(set(ids)) == (168 // (BATCH * WORLD)) * BATCH * WORLD
        assert set(ids) <= _train_index(src)
        # Each step's global batch is split between ranks, not repeated.
        for step in range(len(runs[0][epoch])):
            parts = [set(_ids(runs[r][epoch][step][0], _stats(src))) for r in range(WORLD)]
            assert not parts[0] & parts[1]


def test_labels_follow_their_images(plain, data):
    _, runs = plain
    for xs, ys, xt, yt in runs[0][0]:
        np.testing.assert_array_equal(ys.numpy(), data["source"]["labels"][_ids(xs, _stats(data["source"]))])
        ids = _ids(xt, _stats(data["target"]), TARGET_OFFSET)
        np.testing.assert_array_equal(yt.numpy(), data["target"]["labels"][ids])


def test_epochs_are_shuffled_differently_and_repeatable(plain, data):
    _, runs = plain
    stats = _stats(data["source"])
    order = {e: np.concatenate([_ids(b[0], stats) for b in runs[0][e]]) for e in (0, 1)}
    assert not np.array_equal(order[0], order[1])
    for a, b in zip(runs[0][0], runs[0]["again"], strict=True):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_normalized_with_each_domains_manifest_stats(plain, data):
    _, runs = plain
    for domain, x_at, offset in (("source", 0, 0), ("target", 2, TARGET_OFFSET)):
        d = data[domain]
        for batch in runs[1][0][:3]:
            ids = _ids(batch[x_at], _stats(d), offset)
            mean, std = _stats(d)
            expected = (d["images"][ids].astype(np.float64) - mean) / std
            np.testing.assert_allclose(batch[x_at].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_target_batches_come_from_the_target_training_split(plain, data):
    _, runs = plain
    tgt = data["target"]
    ids = [set(_ids(b[2], _stats(tgt), TARGET_OFFSET)) for r in range(WORLD) for b in runs[r][0]]
    assert set().union(*ids) <= _train_index(tgt)
    # 10 source steps, 8 target steps per pass: the target wraps around within the epoch.
    steps = 140 // (BATCH * WORLD)
    first_pass = set().union(*[set(_ids(b[2], _stats(tgt), TARGET_OFFSET))
                               for r in range(WORLD) for b in runs[r][0][:steps]])
    assert len(first_pass) == steps * BATCH * WORLD


@pytest.fixture(scope="module", params=FIXTURE_CONFIGS)
def augmented(request, data):
    """Rank 0 with augmentation: a whole epoch, the same again, its tail from step 4, and epoch 0
    read again after stopping early at step 2; epoch 1 after the whole epoch 0, and after a new
    loader's tail of epoch 0 (a run resumed mid-epoch goes on to the next one)."""
    kind, workers = request.param
    rng_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    loader = _loader(data, kind, workers, augment=True)
    try:
        full = _epoch(loader, 0)
        again = _epoch(loader, 0)
        tail = _epoch(loader, 0, start_step=4)
        head = _epoch(loader, 0, stop_after=2)
        after_stop = _epoch(loader, 0, start_step=2)
        empty = _epoch(loader, 0, start_step=len(loader))
        _epoch(loader, 0)
        next_epoch = _epoch(loader, 1)
    finally:
        loader.close()
    resumed = _loader(data, kind, workers, augment=True)
    try:
        resumed_tail = _epoch(resumed, 0, start_step=4)
        resumed_next = _epoch(resumed, 1)
    finally:
        resumed.close()
    rng_after = torch.get_rng_state(), np.random.get_state()[1]
    untouched = torch.equal(rng_before[0], rng_after[0]) and np.array_equal(rng_before[1], rng_after[1])
    return kind, {"full": full, "again": again, "tail": tail, "head": head, "after_stop": after_stop,
                  "empty": empty, "global rng untouched": untouched, "next": next_epoch,
                  "resumed tail": resumed_tail, "resumed next": resumed_next}


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_start_step_yields_the_tail_of_the_epoch(augmented):
    _, run = augmented
    _assert_same(run["again"], run["full"])
    _assert_same(run["tail"], run["full"][4:])
    _assert_same(run["head"], run["full"][:2])
    _assert_same(run["after_stop"], run["full"][2:])
    assert run["empty"] == []
    assert run["global rng untouched"]
    # resumed at step 4: the rest of epoch 0, then the whole of epoch 1 (DALI's next epoch began at
    # its step 4 too, and would lose 4 batches, were the start step applied to every epoch)
    _assert_same(run["resumed tail"], run["full"][4:])
    _assert_same(run["resumed next"], run["next"])
    assert len(run["next"]) == len(run["full"]) and not torch.equal(run["next"][0][0], run["full"][0][0])


def test_augmentation_applies_only_flips_and_rotations(augmented, data):
    _, run = augmented
    codes = []
    for domain, x_at, offset in (("source", 0, 0), ("target", 2, TARGET_OFFSET)):
        d = data[domain]
        for batch in run["full"]:
            x = _unnormalize(batch[x_at], _stats(d))
            for image, i in zip(x, _ids(batch[x_at], _stats(d), offset)):
                matches = [k for k, s in enumerate(_symmetries(d["images"][i].astype(np.float64)))
                           if np.allclose(image, s, atol=1e-3)]
                assert len(matches) == 1, f"{domain} image {i} is no flip or rotation of the stored one"
                codes.append(matches[0])
    assert len(set(codes)) == 8  # all symmetries occur, the identity is not the only one


@needs_dali
def test_dali_is_available_where_it_is_installed():
    assert dali_available()


@needs_dali
def test_dali_reads_as_many_steps_at_once_as_it_has_workers(data, tmp_path, monkeypatch):
    """Its sources read one batch at a time (DALI's default read-ahead of 1): data.num_workers past
    one per domain sat idle. Each read here takes 0.3 s and leaves its start and end in a file."""
    from dmhpc.data import dali

    call = dali.BlockSource.__call__

    def slow(self, info):
        start = time.time()
        time.sleep(0.3)
        out = call(self, info)
        (tmp_path / f"{os.getpid()}-{start}").write_text(f"{start} {time.time()}")
        return out

    monkeypatch.setattr(dali.BlockSource, "__call__", slow)  # the workers fork on a CPU: they take it
    loader = _loader(data, "dali", 4, world=1, cpus=5)
    try:
        assert len(_epoch(loader, 0)) == 21
    finally:
        loader.close()
    reads = sorted(tuple(map(float, p.read_text().split())) for p in tmp_path.iterdir())
    most = max(sum(a <= t < b for a, b in reads) for t, _ in reads)
    assert most >= 3, reads  # (2 before: one per domain)


@needs_dali
def test_dali_and_torch_loaders_give_the_same_batches(data):
    # Both read the same blocks and draw the same codes; only the normalization arithmetic differs.
    batches = {}
    for kind, workers in (("dali", 1), ("torch", 0)):
        loader = _loader(data, kind, workers, augment=True, rank=1)
        try:
            batches[kind] = _epoch(loader, 1)
        finally:
            loader.close()
    for a, b in zip(batches["dali"], batches["torch"], strict=True):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_channels_last_batches_come_in_that_layout_with_the_same_values(data, kind, workers):
    """The loader writes the layout while normalizing: no copy per step in the trainer (DALI's
    pipeline writes HWC, viewed as NCHW; it wrote CHW and the loader copied it)."""
    plain_loader = _loader(data, kind, workers, augment=True)
    nhwc_loader = _loader(data, kind, workers, augment=True, channels_last=True)
    try:
        plain, nhwc = _epoch(plain_loader, 1, stop_after=3), _epoch(nhwc_loader, 1, stop_after=3)
        if kind == "dali":
            xs, _, xt, _ = next(iter(nhwc_loader.epoch(2)))
            assert xs._base is not None and xt._base is not None  # views of the pipeline's output
    finally:
        plain_loader.close()
        nhwc_loader.close()
    for batch in nhwc:
        assert batch[0].is_contiguous(memory_format=torch.channels_last)
        assert batch[2].is_contiguous(memory_format=torch.channels_last)
    assert not plain[0][0].is_contiguous(memory_format=torch.channels_last)
    _assert_same(plain, nhwc)


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_a_run_that_never_reads_the_target_gets_the_same_source_batches_and_no_target(data, tmp_path, kind, workers):
    """Without a term that reads the target (no adaptation, the oracle) the loaders still read,
    held and shipped every target batch: twice the resident memory and the reads of a baseline."""
    target = tmp_path / "target"
    shutil.copytree(data["target"]["dir"], target)
    for shard in target.glob("*.h5"):  # read, these would fail: the target's rows are never read
        shard.write_bytes(b"not an HDF5 file")
    both = _loader(data, kind, workers, augment=True, rank=1, channels_last=True)
    alone = make_train_loader(kind, data["source"]["dir"], target, batch_size=BATCH, rank=1, world_size=WORLD,
                              seed=SEED, device="cpu", augment=True, num_workers=workers, cpus=3,
                              channels_last=True, read_target=False)
    try:
        assert len(alone) == len(both) and alone.stats == both.stats  # the target's normalization, for evaluation
        with_target = [b[:2] for b in _epoch(both, 1)]
        got = list(alone.epoch(1))
        assert all(b[2:] == (None, None) for b in got)
        assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in got)
        _assert_same(with_target, [tuple(t.cpu() for t in b[:2]) for b in got])
    finally:
        both.close()
        alone.close()


def test_a_run_that_never_reads_the_target_needs_neither_its_rows_nor_its_memory(data, monkeypatch):
    import dmhpc.data.loaders as loaders

    # 140 target training rows: too few for a global batch of 150, which the source's 168 fill.
    loader = _loader(data, "gpu-resident", 0, batch_size=150, world=1, read_target=False)
    loader.close()
    source = 168 * 3 * 8 * 8 * 4
    monkeypatch.setattr(loaders, "host_memory_available", lambda: 4 * source)  # the source's split alone fits
    loader = _loader(data, "auto", 0, world=1, read_target=False)
    try:
        assert loader.kind == "gpu-resident", loader.reason
        assert loader.reason.startswith("the source's training split (0.00 GiB) fit"), loader.reason
    finally:
        loader.close()
    loader = _loader(data, "auto", 0, world=1)
    try:
        assert loader.kind != "gpu-resident" and loader.reason.startswith("both training splits"), loader.reason
    finally:
        loader.close()


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_normalize_source_uses_source_stats_for_both(data, kind, workers):
    loader = _loader(data, kind, workers, world=1, normalize="source")
    try:
        xs, ys, xt, yt = _epoch(loader, 0, stop_after=1)[0]
    finally:
        loader.close()
    src, tgt = data["source"], data["target"]
    ids = _ids(xt, _stats(src), TARGET_OFFSET)
    mean, std = _stats(src)
    np.testing.assert_allclose(xt.numpy(), (tgt["images"][ids] - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_subset_uses_the_first_training_rows(data, kind, workers):
    loader = _loader(data, kind, workers, subset=64)
    try:
        assert len(loader) == 64 // (BATCH * WORLD)
        batches = _epoch(loader, 0)
    finally:
        loader.close()
    for domain, x_at, offset in (("source", 0, 0), ("target", 2, TARGET_OFFSET)):
        first = set(data[domain]["manifest"]["splits"]["train"][:64])
        ids = set(np.concatenate([_ids(b[x_at], _stats(data[domain]), offset) for b in batches]))
        assert ids <= first


@pytest.mark.parametrize(
    "kind,workers",
    [pytest.param("dali", 2, id="dali", marks=needs_dali), pytest.param("torch", 2, id="torch-2")],
)
def test_close_stops_the_worker_processes(data, kind, workers):
    before = _children()
    loader = _loader(data, kind, workers)
    _epoch(loader, 0, stop_after=3)
    suspended = loader.epoch(1)
    next(suspended)  # an epoch left mid-way still holds the pipeline or the loader's iterator
    assert _children() - before, "expected worker processes while reading"
    loader.close()
    assert not _children_left(before)


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_float16_data_sets(tmp_path, kind, workers):
    images = {}
    for name, offset in (("source", 0), ("target", TARGET_OFFSET)):
        images[name] = _images(60, offset, seed=5)
        write_dataset(images[name], np.arange(60) % 2, None, tmp_path / name, dtype="float16")
    loader = make_train_loader(kind, tmp_path / "source", tmp_path / "target", batch_size=8, rank=0, augment=False,
                               world_size=1, seed=0, device="cpu", num_workers=workers)
    try:
        batches = _epoch(loader, 0)
    finally:
        loader.close()
    assert len(batches) == 42 // 8
    for name, x_at, offset in (("source", 0, 0), ("target", 2, TARGET_OFFSET)):
        stats = _stats({"manifest": load_manifest(tmp_path / name)})
        for batch in batches:
            assert batch[x_at].dtype == torch.float32
            x = _unnormalize(batch[x_at], stats)
            for image, i in zip(x, _ids(batch[x_at], stats, offset)):
                stored = images[name][i].astype(np.float16).astype(np.float64)
                assert any(np.allclose(image, s, atol=1e-3) for s in _symmetries(stored))


def _spawned_children() -> list[int]:
    """The pids of this process's spawned children (multiprocessing's spawn_main)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except OSError:  # ended meanwhile
            continue
    return found


@needs_dali
def test_dali_with_spawned_workers(data, monkeypatch):
    """The start method used on GPUs (CUDA already initialized), run on the CPU: the callbacks
    must pickle, and the workers open the shards themselves. A stop signal reaching a worker as it
    starts (srun and scancel signal every process of the step) is ignored: it killed the worker
    (default action until it had imported torch and DALI, a second or more), and the trainer failed
    ("Workers initialization failed") instead of checkpointing."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    signalled: list[int] = []

    def signal_workers_as_they_start():
        deadline = time.time() + 60
        while not signalled and time.time() < deadline:
            for pid in _spawned_children():
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
            time.sleep(0.002)

    batches = {}
    for kind, workers in (("dali", 1), ("torch", 0)):
        watcher = threading.Thread(target=signal_workers_as_they_start, daemon=True)
        if kind == "dali":
            watcher.start()
        loader = _loader(data, kind, workers, augment=True)
        try:
            batches[kind] = _epoch(loader, 2, start_step=7)
        finally:
            loader.close()
        if kind == "dali":
            watcher.join()
    assert len(signalled) == 1  # spawned (a fork has no spawn_main), and signalled as it started
    assert len(batches["dali"]) == 3
    for a, b in zip(batches["dali"], batches["torch"], strict=True):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- choice and errors


def test_auto_on_cpu_is_resident_and_says_why(data):
    loader = _loader(data, "auto", 0)
    try:
        assert loader.kind == "gpu-resident"
        assert "host memory" in loader.reason and "fit in a quarter" in loader.reason
    finally:
        loader.close()


def test_split_too_small_for_one_global_batch(data):
    with pytest.raises(DmhpcError, match=str(data["source"]["dir"]) + r".*168 training rows.*global batch"):
        _loader(data, "gpu-resident", 0, batch_size=100)
    with pytest.raises(DmhpcError, match=r"16 training rows \(subset 16\)"):
        _loader(data, "torch", 0, subset=16, world=4)


def test_target_too_small_names_the_target(data):
    # 140 target rows, 168 source rows: a global batch of 150 fits only the source.
    with pytest.raises(DmhpcError, match=str(data["target"]["dir"]) + r".*140 training rows"):
        _loader(data, "gpu-resident", 0, batch_size=150, world=1)


def test_different_image_shapes(data, tmp_path):
    other = tmp_path / "other"
    write_dataset(_images(60, 0, shape=(3, 8, 6)), np.arange(60) % 2, None, other)
    with pytest.raises(DmhpcError, match="image shapes differ"):
        make_train_loader("gpu-resident", data["source"]["dir"], other, batch_size=4, rank=0, world_size=1, augment=False,
                          seed=0, device="cpu")


def test_start_step_past_the_epoch(data):
    loader = _loader(data, "gpu-resident", 0)
    try:
        with pytest.raises(DmhpcError, match="epoch 0, step 11"):
            loader.epoch(0, start_step=len(loader) + 1)
    finally:
        loader.close()


def test_unknown_kind(data):
    with pytest.raises(DmhpcError, match="data.loader 'webdataset'"):
        _loader(data, "webdataset", 0)


def test_dali_requested_but_not_importable(data, monkeypatch):
    from dmhpc.data.loaders import dali_runs

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    dali_runs.cache_clear()
    try:
        with pytest.raises(DmhpcError, match="dali.*not importable"):
            _loader(data, "dali", 1)
    finally:
        dali_runs.cache_clear()


@needs_dali
def test_dali_counts_as_available_only_where_a_pipeline_runs():
    """The pinned DALI imports on any machine; building a pipeline is what fails without a driver.
    Here for real: a CPU pipeline runs, a GPU one on a machine without CUDA does not."""
    from dmhpc.data.loaders import dali_runs

    assert dali_runs(torch.device("cpu")) is None
    # No NVIDIA driver here: torch.cuda.is_available() cannot tell, as tests not marked gpu are
    # shown no GPU while DALI would still find one.
    if not Path("/dev/nvidiactl").exists():
        why = dali_runs(torch.device("cuda", 0))
        assert why.startswith("DALI cannot run on cuda:0: ") and "\n" not in why, why


def test_auto_streams_what_does_not_fit_in_host_memory(data, monkeypatch):
    """On a CPU, `auto` used to keep the data resident whatever its size: the kernel then killed the run."""
    import dmhpc.data.loaders as loaders

    need = (168 + 140) * 3 * 8 * 8 * 4  # both training splits, float32
    monkeypatch.setattr(loaders, "host_memory_available", lambda: 4 * need * 3 - 1)  # 3 ranks on the node
    loader = _loader(data, "auto", 0, local_ranks=3)
    try:
        assert loader.kind in ("dali", "torch") and "exceed a quarter" in loader.reason
        assert "each of the node's 3 rank(s)" in loader.reason
    finally:
        loader.close()
    monkeypatch.setattr(loaders, "host_memory_available", lambda: 4 * need * 3)
    probed = []
    real_probe = loaders.dali_runs
    monkeypatch.setattr(loaders, "dali_runs", lambda device: probed.append(device) or real_probe(device))
    loader = _loader(data, "auto", 0, local_ranks=3)
    try:
        assert loader.kind == "gpu-resident" and "fit in a quarter" in loader.reason
        assert probed == []  # resident data never uses DALI: no pipeline (nor, on a GPU, its memory pool) built
    finally:
        loader.close()
    monkeypatch.setattr(loaders, "host_memory_available", lambda: 0)
    monkeypatch.setattr(loaders, "dali_runs", lambda device: "DALI cannot run on cpu: driver too old")
    loader = _loader(data, "auto", 0)
    try:
        assert loader.kind == "torch" and "DALI cannot run on cpu: driver too old" in loader.reason
    finally:
        loader.close()


def test_gpu_resident_asked_for_is_refused_where_the_data_does_not_fit_at_all(data, monkeypatch):
    """Asked for, it ignored the memory: the allocation ended in a traceback (a GPU's
    OutOfMemoryError) or, on a host that overcommits, the kernel killed the run."""
    import dmhpc.data.loaders as loaders

    need = (168 + 140) * 3 * 8 * 8 * 4  # both training splits, float32
    monkeypatch.setattr(loaders, "host_memory_available", lambda: need * 3)  # past a quarter: still allowed
    loader = _loader(data, "gpu-resident", 0, local_ranks=3)
    try:
        assert loader.kind == "gpu-resident" and loader.reason == "data.loader is gpu-resident"
    finally:
        loader.close()
    monkeypatch.setattr(loaders, "host_memory_available", lambda: need * 3 - 3)
    with pytest.raises(DmhpcError, match=r"^data\.loader gpu-resident: both training splits \(0\.00 GiB\) exceed "
                                         r"the 0\.0 GiB of host memory each of the node's 3 rank\(s\) can count on "
                                         r"\(the least over ranks\); choose auto, dali or torch$"):
        _loader(data, "gpu-resident", 0, local_ranks=3)


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


GIB = 2**30


@pytest.mark.parametrize("case, cgroup, files, room", [
    # Slurm (cgroup v2): the job's limit is on the job's cgroup, not on the root nor the task's.
    ("slurm v2", "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0",
     {"fs/system.slice/slurmstepd.scope/job_7/memory.max": f"{8 * GIB}\n",
      "fs/system.slice/slurmstepd.scope/job_7/memory.current": f"{4 * GIB}\n",
      # a GiB of it is page cache the kernel gives back under pressure: room, not use
      "fs/system.slice/slurmstepd.scope/job_7/memory.stat": f"anon {3 * GIB}\ninactive_file {GIB}\n",
      "fs/system.slice/slurmstepd.scope/job_7/step_0/user/task_0/memory.max": "max\n",
      "fs/system.slice/slurmstepd.scope/job_7/step_0/user/task_0/memory.current": f"{GIB}\n"}, 5 * GIB),
    # Slurm (cgroup v1): the same in the memory hierarchy; a tighter step limit below it wins.
    ("slurm v1", "5:cpuacct,cpu:/slurm/uid_0/job_9\n4:memory:/slurm/uid_0/job_9/step_0\n0::/",
     {"fs/memory/slurm/uid_0/job_9/memory.limit_in_bytes": f"{8 * GIB}\n",
      "fs/memory/slurm/uid_0/job_9/memory.usage_in_bytes": f"{2 * GIB}\n",
      "fs/memory/slurm/uid_0/job_9/step_0/memory.limit_in_bytes": f"{4 * GIB}\n",
      "fs/memory/slurm/uid_0/job_9/step_0/memory.usage_in_bytes": f"{2 * GIB}\n",
      "fs/memory/slurm/uid_0/job_9/step_0/memory.stat": f"cache {GIB}\ntotal_inactive_file {GIB}\n",
      "fs/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "fs/memory/memory.usage_in_bytes": f"{50 * GIB}\n"}, 3 * GIB),
    # A container: its own cgroup is the root of the mount, whatever path the host gives.
    ("container", "0::/../../kubepods/pod1/abc",
     {"fs/memory.max": f"{2 * GIB}\n", "fs/memory.current": f"{GIB // 2}\n"}, GIB + GIB // 2),
    ("no limit", "0::/user.slice", {"fs/user.slice/memory.max": "max\n", "fs/user.slice/memory.current": "5\n"},
     64 * GIB),
])
def test_host_memory_counts_the_limit_of_the_processs_own_cgroup(tmp_path, case, cgroup, files, room):
    """Under Slurm the job's memory limit is on the job's cgroup: reading only the root of the
    cgroup file system saw no limit, kept the data resident and the job was killed for memory."""
    from dmhpc.data.loaders import host_memory_available

    _tree(tmp_path, {"proc/meminfo": f"MemTotal: {128 * 2**20} kB\nMemAvailable: {64 * 2**20} kB\n",
                     "proc/self/cgroup": cgroup + "\n", **files})
    assert host_memory_available(str(tmp_path / "proc"), str(tmp_path / "fs")) == room, case


CHOICE_PROBE = """
import json, sys
import dmhpc.data.loaders as loaders
from dmhpc.distributed import bootstrap, shutdown
from dmhpc.errors import DmhpcError
dist = bootstrap()
if dist.rank == 1:  # this rank's node has little memory left: the ranks must still agree
    loaders.host_memory_available = lambda: 1
kind, why = loaders.choose_kind("auto", dist.device, 10**6, dist.local_world_size)
# DALI runs on rank 0 only: streaming, both ranks take torch; asked for, both refuse it.
loaders.host_memory_available = lambda: 1
loaders.dali_runs = lambda device: None if dist.rank == 0 else "DALI cannot run on cpu: driver too old"
streamed = loaders.choose_kind("auto", dist.device, 10**6, dist.local_world_size)[0]
try:
    asked = loaders.choose_kind("dali", dist.device, 10**6, dist.local_world_size)[0]
except DmhpcError as exc:
    asked = str(exc)
open(sys.argv[1] + f".{dist.rank}", "w").write(json.dumps([kind, why, streamed, asked]))
shutdown()
"""


def test_every_rank_chooses_the_same_loader(tmp_path):
    """Ranks that chose their loader from their own free memory could disagree, and the loaders
    shuffle differently: rows would be duplicated or skipped across ranks."""
    import json

    script = tmp_path / "probe.py"
    script.write_text(CHOICE_PROBE)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp_path / "choice")], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    choices = [json.loads((tmp_path / f"choice.{r}").read_text()) for r in (0, 1)]
    assert choices[0][:3] == choices[1][:3] and choices[0][0] in ("dali", "torch"), choices
    assert "2 rank(s)" in choices[0][1]
    assert choices[0][2] == "torch"  # DALI must run on every rank to be chosen
    # Asked for where one rank cannot run it: refused on both (a rank stopping alone left the other
    # waiting in the next collective), each saying what it knows.
    assert choices[0][3] == ("data.loader dali: DALI cannot run on another rank (its log says why); install "
                             "dmhpc[dali] (and a driver it runs with) or choose torch"), choices
    assert choices[1][3].startswith("data.loader dali: DALI cannot run on cpu: driver too old;"), choices


@pytest.mark.parametrize("kind, asked, cpus, given", [("torch", 4, 2, 1), ("torch", 2, 1, 0), ("torch", 2, 3, 2),
                                                     pytest.param("dali", 2, 1, 1, marks=needs_dali)])
def test_readers_are_bounded_by_the_ranks_cpus(data, kind, asked, cpus, given):
    """data.num_workers reader processes on a rank given fewer CPUs only took turns with the
    training process: at most cpus - 1 (DALI's parallel source needs one), said in the start line."""
    loader = _loader(data, kind, asked, cpus=cpus)
    try:
        note = f"{given} of data.num_workers={asked} reader(s), for this rank's {cpus} CPU(s)"
        assert (note in loader.reason) == (given < asked), loader.reason
        workers = loader._backend.num_workers if kind == "dali" else loader._backend.loader.num_workers
        assert workers == given
        assert len(_epoch(loader, 0, stop_after=2)) == 2
    finally:
        loader.close()


def test_bad_normalize(data):
    with pytest.raises(DmhpcError, match="data.normalize"):
        _loader(data, "gpu-resident", 0, normalize="global")


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_eval_batches_cover_the_split_once_in_order_in_the_batches_of_one_process(data, world):
    """The ranks' shares are whole batches: a CPU forward pass gives other bits for an image in a
    batch of another size, and figures of `dmhpc eval` at another world size than training's
    differed from the logged ones in their 8th digit."""
    src = data["source"]
    stats = domain_stats(src["dir"], data["target"]["dir"], "per-domain")[0]
    start, stop = split_rows(load_manifest(src["dir"]), "val")
    assert (stop - start) % 5  # a last batch cut short; at 7 ranks, ranks without a batch

    def batches(rank: int, world_size: int) -> list:
        out = []
        for x, y, index in eval_batches(src["dir"], "val", batch_size=5, rank=rank, world_size=world_size,
                                        device="cpu", mean=stats[0], std=stats[1]):
            mean, std = _stats(src)
            np.testing.assert_allclose(x.numpy(), (src["images"][index] - mean) / std, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(y.numpy(), src["labels"][index])
            out.append(list(index))
        return out

    alone = batches(0, 1)
    assert [i for b in alone for i in b] == list(src["manifest"]["splits"]["val"])
    assert [b for rank in range(world) for b in batches(rank, world)] == alone


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_cuda_batches_equal_cpu_batches(data, kind, workers):
    batches = {}
    for device in ("cpu", "cuda:0"):
        loader = _loader(data, kind, workers, augment=True, device=device)
        try:
            batches[device] = [tuple(t for t in b) for b in loader.epoch(0)]
        finally:
            loader.close()
    for a, b in zip(batches["cpu"], batches["cuda:0"], strict=True):
        for u, v in zip(a, b):
            assert v.device.type == "cuda"
            torch.testing.assert_close(u, v.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_auto_on_cuda_keeps_a_small_data_set_resident(data):
    loader = _loader(data, "auto", 0, device="cuda:0")
    try:
        assert loader.kind == "gpu-resident" and "free on cuda:0" in loader.reason
    finally:
        loader.close()


@pytest.mark.gpu
def test_a_steps_indices_reach_the_gpu_through_pinned_memory():
    """A non_blocking copy from pageable memory still waits for the stream's earlier work: the
    step's row indices and symmetry codes waited for the previous step's kernels."""
    from dmhpc.data.batches import to_device

    made = []
    pin = torch.Tensor.pin_memory

    def pinned(tensor, *args, **kwargs):
        made.append(tensor.numel())
        return pin(tensor, *args, **kwargs)

    torch.Tensor.pin_memory = pinned
    try:
        busy = torch.randn(4096, 4096, device="cuda")
        busy @ busy  # work queued ahead of the copy
        rows = to_device(np.arange(7, dtype=np.int64), torch.device("cuda:0"))
    finally:
        torch.Tensor.pin_memory = pin
    assert made == [7] and rows.device.type == "cuda" and rows.cpu().tolist() == list(range(7))
    assert to_device(np.arange(3), torch.device("cpu")).tolist() == [0, 1, 2]


def test_read_ahead_keeps_the_order_and_closing_waits_for_the_read_in_flight():
    """Evaluation and `dmhpc predict` on a GPU read the next batch while the device works; the
    reader is closed after the iterator, which must not leave a read running on a closed file."""
    from dmhpc.data.batches import read_ahead

    spans = [(0, 4), (4, 8), (8, 10)]
    events, readers = [], set()

    def read(a, b):
        readers.add(threading.current_thread().name)
        events.append(("start", a))
        time.sleep(0.05)
        events.append(("end", a))
        return a, b

    assert list(read_ahead(read, spans, ahead=False)) == spans and readers == {threading.current_thread().name}
    assert list(read_ahead(read, spans, ahead=True)) == spans and len(readers) == 2
    events.clear()
    batches = read_ahead(read, spans, ahead=True)
    assert next(batches) == (0, 4)
    deadline = time.monotonic() + 5
    while ("start", 4) not in events:  # the next batch is read while the caller works on this one
        assert time.monotonic() < deadline
        time.sleep(0.001)
    batches.close()
    assert events[-1] == ("end", 4) and ("start", 8) not in events
    assert list(read_ahead(read, [], ahead=True)) == []


@pytest.mark.parametrize("kind, workers", [pytest.param("dali", 1, id="dali", marks=needs_dali),
                                           pytest.param("torch", 2, id="torch-2")])
def test_a_read_failure_in_a_worker_is_the_workers_one_line(tmp_path, kind, workers):
    """torch's workers handed back a DmhpcError holding their whole traceback (17 lines), DALI's a
    plain Exception, which the command line does not catch."""
    for name, offset in (("source", 0), ("target", TARGET_OFFSET)):
        write_dataset(_images(96, offset), np.arange(96) % 2, None, tmp_path / name, shard_size=16)
    data = {role: {"dir": tmp_path / role} for role in ("source", "target")}
    loader = _loader(data, kind, workers, world=1, batch_size=4)
    shard = sorted((tmp_path / "source").glob("shard-*.h5"))[2]
    shard.rename(tmp_path / "moved.h5")
    try:
        with pytest.raises(DmhpcError) as info:
            _epoch(loader, 0)
    finally:
        loader.close()
    message = str(info.value)
    assert message.startswith(f"{shard}: cannot open shard (") and "\n" not in message, message
    assert "Traceback" in str(info.value.__cause__)  # the worker's traceback is kept, as the cause


EXITS_AFTER_A_WORKER_ERROR = """
import sys
from pathlib import Path
from dmhpc.data.loaders import make_train_loader
from dmhpc.errors import DmhpcError

root = Path(sys.argv[1])
loader = make_train_loader("torch", root / "source", root / "target", batch_size=4, rank=0, world_size=1, seed=0,
                           device="cpu", augment=False, normalize="per-domain", num_workers=2, cpus=3)
sorted((root / "source").glob("shard-*.h5"))[2].rename(root / "moved.h5")
try:
    for _ in loader.epoch(0):
        pass
except DmhpcError as exc:
    kept = exc  # as the command line holds it while it prints: its traceback holds the workers' iterator
    loader.close()
    print(kept)
"""


def test_a_process_whose_loader_worker_failed_exits(tmp_path):
    """The workers ignore SIGTERM (a stop signal reaches every process of a job step); after a
    worker's error its iterator stayed referenced, so closing the loader left them running and
    multiprocessing's exit handler, which terminates and then joins them, waited forever."""
    for name, offset in (("source", 0), ("target", TARGET_OFFSET)):
        write_dataset(_images(96, offset), np.arange(96) % 2, None, tmp_path / name, shard_size=16)
    proc = subprocess.run([sys.executable, "-c", EXITS_AFTER_A_WORKER_ERROR, str(tmp_path)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "cannot open shard" in proc.stdout, proc.stderr[-2000:]


def _rows(ranges) -> list[int]:
    return [row for a, b in ranges for row in range(a, b)]


def test_block_loaders_read_every_training_row_over_the_epochs():
    """The blocks of dali and torch started at row 0 every epoch: the last rows % batch_size rows of
    each domain (up to 127 at batch 128) were never trained on. Their offset is drawn per epoch."""
    from dmhpc.data.batches import Stream

    for world_size in (1, 2):
        seen = set()
        for epoch in range(40):
            stream = Stream(start=10, rows=37, batch_size=5, world_size=world_size, rank=0, seed=3, domain=0)
            batches = [_rows(Stream(10, 37, 5, world_size, r, 3, 0).pieces(epoch, step))
                       for step in range(stream.steps) for r in range(world_size)]
            rows = [row for batch in batches for row in batch]
            assert all(len(batch) == 5 for batch in batches)
            assert len(rows) == len(set(rows)) and all(10 <= row < 47 for row in rows)  # disjoint, in the split
            seen.update(rows)
        assert seen == set(range(10, 47)), sorted(set(range(10, 47)) - seen)
    # A resume mid-epoch reads the pieces the uninterrupted epoch would have: the offset is the
    # epoch's, whatever the process drew before (a fresh process's global generators differ).
    whole = [Stream(10, 37, 5, 1, 0, 3, 0).pieces(7, k) for k in range(Stream(10, 37, 5, 1, 0, 3, 0).steps)]
    np.random.seed(11)
    torch.manual_seed(11)
    random.seed(11)
    resumed = Stream(10, 37, 5, 1, 0, 3, 0)
    assert [resumed.pieces(7, k) for k in (3, 4)] == whole[3:5]


def test_block_loaders_read_each_row_as_often_as_any_other():
    """The blocks started within the rows' tail (0 to rows % batch_size): over 200 epochs of 10,798
    rows at batch 128, row 0 was read in 1 % of them and 46 rows in fewer than half, the same rows
    whatever the seed. On a ring from any row, each is left out in spare / rows of the epochs."""
    from dmhpc.data.batches import Stream

    rows, batch, epochs = 1_000, 64, 400  # 15 blocks, 40 rows left out an epoch: 4 %
    for world_size in (1, 3):
        counts = np.zeros(rows)
        streams = [Stream(0, rows, batch, world_size, r, 1, 0) for r in range(world_size)]
        for epoch in range(epochs):
            read = np.array([row for s in streams for k in range(s.steps) for row in _rows(s.pieces(epoch, k))])
            assert len(read) == len(set(read)) == streams[0].steps * world_size * batch
            counts[read] += 1
        share = counts / epochs
        expected = streams[0].steps * world_size * batch / rows  # 0.96: 15 batches of 64, or 5 of 192 on 3 ranks
        # Each row's share within 4 binomial standard deviations of the expected (about 0.04 here).
        spread = 4 * np.sqrt(expected * (1 - expected) / epochs)
        assert np.abs(share - expected).max() < spread, (share[:3], share[-3:], expected)


@pytest.mark.parametrize("rows", [10_752, 10_798])  # a multiple of the batch, and DeepMerge's Sim-Sim training rows
def test_block_loaders_draw_other_groups_of_images_each_epoch(rows):
    """dali and torch read whole batch-sized blocks, only their order and offset drawn per epoch: a
    batch held the same images in every epoch (all of them where the rows are a multiple of the
    batch size), so BatchNorm and the batch-level losses saw the same groups each time. Now a batch
    is 8 pieces, each from another block, drawn anew each epoch."""
    from dmhpc.data.batches import Stream

    # 8 pieces whatever the batch size (a prime one read single rows), as even as it allows
    for b, sizes in ((128, {16}), (100, {12, 13}), (97, {12, 13}), (8, {1}), (4, {1})):
        slots = Stream(0, 512, b, 1, 0, 0, 0).slots
        assert len(slots) == min(8, b) and {y - x for x, y in slots} == sizes and slots[-1][1] == b, (b, slots)
    for world_size, batch_size in ((1, 128), (4, 128), (2, 127)):  # 127: prime, still 8 pieces
        streams = [Stream(0, rows, batch_size, world_size, r, 5, 0) for r in range(world_size)]
        epochs = [[set(_rows(s.pieces(epoch, k))) for k in range(streams[0].steps) for s in streams] for epoch in (0, 1)]
        before = {}
        for j, batch in enumerate(epochs[0]):
            for row in batch:
                before[row] = j
        # The largest share of a batch that was in one batch together the epoch before: 12% at
        # most by pieces of 16 (15 of the other 127 images), plus chance; it was 92% to 100%.
        shares = []
        for batch in epochs[1]:
            counts = np.bincount([before[row] for row in batch if row in before])
            shares.append(counts.max() / len(batch) if len(counts) else 0.0)
        assert np.mean(shares) < 0.25, np.mean(shares)
        assert all(len(batch) == batch_size for batch in epochs[1])


@pytest.mark.parametrize("kind, workers", [("torch", 2), ("gpu-resident", 0)])
def test_an_epoch_read_on_after_a_later_one_began_is_refused(tmp_path, kind, workers):
    """The torch loader's workers serve one epoch: an epoch left suspended, read on after the next one
    was read, ended after 1 of its 7 steps without a word (the other kinds read it whole)."""
    dirs = {}
    rng = np.random.default_rng(0)
    for name in ("source", "target"):
        write_dataset(rng.normal(size=(53, 2, 6, 6)).astype(np.float32), np.arange(53) % 2, None, tmp_path / name,
                      shard_size=16, seed=0)
        dirs[name] = tmp_path / name
    loader = make_train_loader(kind, dirs["source"], dirs["target"], batch_size=5, rank=0, world_size=1, seed=0,
                               device=torch.device("cpu"), num_workers=workers, augment=True)
    try:
        suspended = loader.epoch(2)
        next(suspended)
        assert len(list(loader.epoch(3))) == len(loader)
        with pytest.raises(DmhpcError, match="an epoch of this loader was read on after a later one started"):
            next(suspended)
    finally:
        loader.close()


def test_each_domain_pass_and_rank_draws_its_own_rows_and_symmetries():
    """The tests' domains had different row counts: with equal counts (DeepMerge's pristine and
    noisy sets, paired row by row) both domains drawing one order, the target's passes after its
    first repeating it, or ranks augmenting alike, went unseen."""
    from dmhpc.data.batches import SOURCE, TARGET, Stream

    def stream(domain, rank=0):
        return Stream(start=0, rows=640, batch_size=16, world_size=2, rank=rank, seed=1, domain=domain)

    source, target = stream(SOURCE), stream(TARGET)
    for draw in (lambda s, k: s.samples(0, k).tolist(), lambda s, k: s.pieces(0, k)):
        assert draw(source, 0) != draw(target, 0)
        assert draw(target, 1) != draw(target, 1 + target.steps)  # the next pass: another order
    assert not np.array_equal(target.codes(0, 3, True), stream(TARGET, rank=1).codes(0, 3, True))
    assert not np.array_equal(source.codes(0, 3, True), target.codes(0, 3, True))


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_a_subset_larger_than_the_training_split_reads_the_training_rows_only(data, kind, workers):
    """A subset beyond the training rows was taken as it was: the loader read on past the training
    split into the validation and test rows (or past the data set's end)."""
    whole = _loader(data, kind, workers)
    try:
        steps = len(whole)
    finally:
        whole.close()
    for subset in (200, 10**6):  # 200: more than either training split, fewer than either data set's rows
        loader = _loader(data, kind, workers, subset=subset)
        try:
            assert len(loader) == steps
            batches = _epoch(loader, 0)
        finally:
            loader.close()
        for domain, x_at, offset in (("source", 0, 0), ("target", 2, TARGET_OFFSET)):
            ids = set(np.concatenate([_ids(b[x_at], _stats(data[domain]), offset) for b in batches]))
            assert ids <= _train_index(data[domain]), (domain, subset)


@pytest.mark.parametrize("kind,workers", CONFIGS)
def test_each_domain_is_turned_by_its_own_streams_symmetry_codes(data, kind, workers):
    """The augmentation of a batch is its own stream's draw: target images turned by the source's
    codes (each target image as the source image beside it) went unseen, as any flip or rotation
    passed the tests."""
    from dmhpc.data.batches import SOURCE, TARGET, Stream

    loader = _loader(data, kind, workers, augment=True)
    try:
        batches = _epoch(loader, 0, stop_after=3)
    finally:
        loader.close()
    for domain, number, x_at, offset in (("source", SOURCE, 0, 0), ("target", TARGET, 2, TARGET_OFFSET)):
        d = data[domain]
        stream = Stream(start=0, rows=len(d["manifest"]["splits"]["train"]), batch_size=BATCH, world_size=WORLD,
                        rank=0, seed=SEED, domain=number)
        mean, std = _stats(d)
        for step, batch in enumerate(batches):
            ids = _ids(batch[x_at], _stats(d), offset)
            codes = torch.from_numpy(stream.codes(0, step, square=True))
            turned = dihedral(torch.from_numpy(d["images"][ids]), codes).double().numpy()
            np.testing.assert_allclose(batch[x_at].numpy(), (turned - mean) / std, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{domain} step {step}")
