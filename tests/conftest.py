"""What the suite shares: paths, a clean environment for child processes, data-set fixtures.

Test modules import the constants and `clean_env` (`from tests.conftest import ROOT, clean_env`:
tests/ is a package, so this conftest is never confused with tests/cluster's) and use the fixtures
by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository
BIN = Path(sys.executable).parent  # this interpreter's scripts: torchrun, mpiexec, dmhpc
TINY = ROOT / "configs" / "tiny.yaml"
LAUNCH_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "PALS_", "MPI_LOCAL", "TORCHELASTIC_")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# The modules that take longest on 2 cores, slowest first, as the summed durations of
# `make test PYTEST_ARGS=--durations=0` ordered them (test_train and tests/cluster lead; the
# cluster's tests also share one SLURM cluster). `make test`'s two workers take whole modules in
# this order and the rest after them, so neither is left with a long one at the end.
CLUSTER = "tests/cluster/"
SLOWEST_FIRST = ("tests/test_train.py", CLUSTER, "tests/test_infer.py", "tests/test_evaluate.py",
                 "tests/test_cli.py", "tests/test_predict.py", "tests/test_faults.py", "tests/test_tune.py",
                 "tests/test_grid.py", "tests/test_loaders.py", "tests/test_submit.py", "tests/test_synth.py",
                 "tests/test_bench.py")


# Free space the whole suite asks for where its temporary folder lies: its data sets, runs and
# caches there peaked at 0.6 GB on 2 cores (sampled every 15 s; docs/benchmarks.md). A disk shared
# with other jobs that filled up meanwhile failed the suite at a quarter, in 518 errors. Not more:
# a suite that would have fitted must not be refused.
SUITE_DISK_GB = 1.0


def pytest_configure(config):
    """The whole suite (no paths, -k or -m given) starts only where its files fit, else says so in one
    line (a collection alone writes nothing)."""
    import shutil
    import tempfile

    if hasattr(config, "workerinput") or config.args_source != pytest.Config.ArgsSource.TESTPATHS or \
            config.option.keyword or config.option.markexpr or config.option.collectonly:
        return
    base = config.option.basetemp
    where = Path(base).resolve().parent if base else Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or
                                                            tempfile.gettempdir())
    free = shutil.disk_usage(where).free / 1e9
    if free < SUITE_DISK_GB:
        pytest.exit(f"{where}: {free:.1f} GB free, and the suite writes up to {SUITE_DISK_GB:.0f} GB there; free "
                    f"some, or give TMPDIR (or --basetemp) another disk", returncode=1)


def _module(nodeid: str) -> str:
    """The work unit a test belongs to under pytest-xdist: its module, or tests/cluster/ as a whole
    (its tests share one SLURM cluster, started once per worker that runs any of them)."""
    module = nodeid.split("::", 1)[0]
    return CLUSTER if module.startswith(CLUSTER) else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules per worker (their module-scoped data sets are made once), slowest first.
    xdist's --dist loadgroup cannot do it under pytest 9, which no longer takes its group suffix."""
    from xdist.scheduler import LoadScopeScheduling

    class SlowestModulesFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _module(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order (below), not by test count
    return SlowestModulesFirst(config, log)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` is all a CUDA test needs: without a CUDA device it is skipped, saying why."""
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        slowest = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: slowest.get(_module(item.nodeid), len(slowest)))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """A test not marked `gpu` runs on the CPU on a GPU machine too (its child processes get
    CUDA_VISIBLE_DEVICES= from `clean_env`): `-m gpu` then selects every test that uses CUDA, and
    `-m "not gpu"` none. In-process trainers, predictors and exports chose cuda:0 there."""
    if "gpu" not in request.keywords:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One thread for torch in the test processes too (OMP_NUM_THREADS, which an in-process trainer
    keeps), as `clean_env` gives their children. With two workers on 2 cores, each in-process
    trainer, evaluation and explanation ran torch's 2 OpenMP threads beside the other worker's
    processes, and their spinning waits made test_infer and test_evaluate 4.6 times slower (456 s
    against 99 s, side by side): the suite ran past its 30 minutes."""
    import torch

    patch, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    patch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def session_scratch(tmp_path_factory):
    """Inductor's cache of compiled code and the child processes' TMPDIR in the session's folder,
    which a passed session removes: in /tmp, inductor's cache grew by every run (to 3.4 GB here), and
    every torchrun left a torchelastic_* folder (370 in a day). No precompiled headers: inductor keeps
    them there whatever the cache's folder, 150 MB a set, and a set for every checkout's interpreter
    path."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    patch.setenv("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")
    yield
    patch.undo()


@pytest.fixture
def in_the_foreground():
    """SIGINT as a terminal's Ctrl-C delivers it, also when the suite itself runs with SIGINT ignored
    (started with `cmd &` from a script: its children inherit that, and a child's Ctrl-C test failed)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def fake_commands(tmp_path: Path, monkeypatch, scripts: dict[str, str]) -> Path:
    """Shell scripts standing in for commands this machine lacks or must not run (sbatch, squeue,
    scancel, nvidia-smi), first on PATH for the test; each is `#!/bin/sh` and its body."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    return fake


def interrupted_once_said(command: list, word: str, times: int = 2, **popen) -> tuple[int, str]:
    """Run `command`, Ctrl-C it (SIGINT to the launcher, which passes it on) once its standard output
    has said `word` `times` times (one per MPI rank, say); (its exit status, its standard error)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        said = ""
        while said.count(word) < times:  # (the ranks' lines may come joined)
            line = proc.stdout.readline()
            assert line, said
            said += line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def split_lists(manifest: dict) -> dict:
    """A manifest's index lists as plain lists, to compare (load_manifest's are read-only arrays)."""
    return {split: np.asarray(index).tolist() for split, index in manifest["splits"].items()}


def clean_env(**extra) -> dict:
    """This process's environment for a child: no launcher's variables (the child decides its own
    rank), one thread per process (several ranks share 2 cores), no GPU (multi-rank tests run CPU
    ranks: ranks sharing one GPU are refused; the GPU tests are marked `gpu`), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES) and k not in LAUNCH_VARS}
    # The checkout first; what the caller's PYTHONPATH adds (the GPU checklist's offline wheels) after it.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="", **extra)
    return env


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
    """Factory: `small_disk(mb)` mounts a tmpfs of `mb` MiB (or of a size given as tmpfs's text:
    "532k", in 4 KiB pages) and returns its path: a real full disk (ENOSPC from the kernel). Needs
    root (CI runs as root); skips where mounting is not allowed."""
    import subprocess

    mounted = []

    def make(mb: int | str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        size = f"{mb}m" if isinstance(mb, int) else mb
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def tiny_overrides(data, **extra) -> dict:
    """Dotted overrides that train the tiny config for one epoch on the pair of data sets in `data`."""
    return {"data.source": str(data / "pristine"), "data.target": str(data / "noisy"), "train.epochs": 1,
            "train.batch_size": 4, **extra}


def study_spec(tmp_path, **extra) -> dict:
    """A study launch dict: three methods on the tiny config (plain, MMD, oracle) crossed with two seeds."""
    return {"out": str(tmp_path / "out"), "executor": "local", "overrides": {"train.epochs": 3},
            "methods": {"plain": {"base": str(TINY)},
                        "mmd": {"base": str(TINY), "overrides": {"loss.transfer": "mmd", "train.epochs": 5}},
                        "oracle": {"base": str(TINY), "overrides": {"select.criterion": "oracle-target-acc"}}},
            "gap": {"from": "plain", "to": "oracle"}, "grid": {"seed": [1, 2]}, **extra}
