"""Fixtures shared across the suite."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def make_domains(tmp_path_factory):
    """Factory: `make_domains(n)` writes a real pristine/noisy pair of n 3x75x75 images each as
    sharded data sets ROOT/pristine and ROOT/noisy (the class is a brightness offset, the domains
    differ by noise) and returns ROOT."""
    from dmhpc.data.shards import write_dataset

    def make(n: int = 64):
        root = tmp_path_factory.mktemp("domains")
        rng = np.random.default_rng(0)
        for name, noise in (("pristine", 0.02), ("noisy", 0.3)):
            labels = np.arange(n) % 2
            images = rng.normal(0.0, noise, (n, 3, 75, 75)).astype(np.float32) + labels[:, None, None, None]
            write_dataset(images, labels, None, root / name, shard_size=64, seed=0)
        return root

    return make


@pytest.fixture
def small_disk(tmp_path):
    """Factory: `small_disk(mb)` mounts a tmpfs of `mb` MiB and returns its path: a real full disk
    (ENOSPC from the kernel). Needs root (CI runs as root); skips where mounting is not allowed."""
    import subprocess

    mounted = []

    def make(mb: int):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
