"""The benchmark scripts and the GPU checklist still run: they are what the first GPU machine
executes, in minutes that cannot be spent finding a broken flag. On the CPU, small."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=300)


def test_the_gpu_checklist_says_what_the_machine_has_and_stops_without_a_gpu(tmp_path):
    proc = _run(["bash", "bench/gpu_checklist.sh"], OUT=str(tmp_path))
    assert proc.returncode == 3 and "no CUDA device here" in proc.stderr, proc.stdout + proc.stderr
    log = (tmp_path / "1-machine.log").read_text()
    assert "available False" in log and "torch 2." in log and "h5py: present" in log
    # nothing else ran (wheels in .whl/ are installed first, where a checkout has them)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "0-wheels.log") == ["1-machine.log"]
    # A GPU machine without GalSim (too large to carry there): test_synth.py cannot be imported, and
    # it holds no GPU test, so the step must not fail for it.
    (tmp_path / "shadow" / "galsim").mkdir(parents=True)
    (tmp_path / "shadow" / "galsim" / "__init__.py").write_text("raise ImportError('no GalSim on this machine')\n")
    proc = subprocess.run(["bash", "bench/gpu_checklist.sh", "tests", "bogus"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**clean_env(), "OUT": str(tmp_path),
                                                      "PYTHONPATH": str(tmp_path / "shadow")})
    assert proc.returncode == 2 and "unknown step bogus" in proc.stderr
    log = (tmp_path / "2-gpu-tests.log").read_text()
    assert "2-gpu-tests: exit 0" in proc.stdout and " skipped" in log and " error" not in log, log[-2000:]


def test_a_failing_row_of_the_throughput_grid_leaves_the_others_measured():
    """...and the grid exits 1: the checklist's exit was 0 with every row out of memory."""
    proc = _run([sys.executable, "bench/throughput.py", "--device", "cpu", "--models", "deepmerge2", "--batches",
                 "1000", "8", "--amp", "none", "--loaders", "gpu-resident", "--steps", "1", "--warmup", "1",
                 "--images", "128"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| deepmerge2")]
    assert len(rows) == 4 and all("fewer than one global batch" in r for r in rows[:2]), proc.stdout
    assert all(r.split("|")[-2].strip().replace(",", "").isdigit() for r in rows[2:]), proc.stdout


def test_the_loader_benchmark_measures_every_kind():
    proc = _run([sys.executable, "bench/loaders.py", "--images", "256", "--epochs", "2", "--batch-size", "32",
                 "--kinds", "gpu-resident,torch", "--pieces", "8,1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split()[:3] for line in proc.stdout.splitlines()[-3:]]
    assert rows == [["0", "gpu-resident", "-"], ["0", "torch", "8"], ["0", "torch", "1"]], proc.stdout


def test_the_training_step_benchmark_times_the_original_beside_the_trainer():
    """The original was timed alone after the others, and its speed-up divided figures of two
    moments: it is a stepper of the fp32 round now, and only that row has a speed-up."""
    proc = _run([sys.executable, "bench/train_step.py", "--images", "64", "--batch", "16", "--rounds", "1",
                 "--block", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("original", "dmhpc"))]
    assert [r.split()[0] for r in rows] == ["original", "dmhpc", "dmhpc", "dmhpc"], proc.stdout
    assert ["speed-up over the original" in r for r in rows[1:]] == [True, False, False], proc.stdout


def test_the_manifest_benchmark_reads_once_and_pickles_a_small_reader():
    proc = _run([sys.executable, "bench/manifest.py", "--rows", "2e4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "manifest of 20,000 rows" in proc.stdout and "RowReader built in" in proc.stdout, proc.stdout


def _bench_module(name, monkeypatch):
    """A benchmark script imported as a module (bench/ on sys.path, as when it runs)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module(name)


def test_side_by_side_times_each_step_after_the_warm_up_in_alternating_blocks(monkeypatch):
    """The training-step benchmark's medians are seconds per step: not per block of steps, and
    never including the warm-up steps (first calls: cuDNN autotuning, worker start, allocation);
    the steppers run in alternating blocks, so load from other jobs hits them alike."""
    import time

    train_step = _bench_module("train_step", monkeypatch)
    calls = []

    def stepper(name, seconds, warm_up_seconds=0.0):
        def one():
            calls.append(name)
            time.sleep(warm_up_seconds if calls.count(name) <= 2 else seconds)
        return one

    medians = train_step.side_by_side({"steady": stepper("steady", 0.01), "cold": stepper("cold", 0.0, 0.25)},
                                      rounds=2, block=4)
    assert set(medians) == {"steady", "cold"}
    assert 0.01 <= medians["steady"] < 0.03, medians  # per step: a block of 4 takes >= 0.04 s
    assert medians["cold"] < 0.03, medians  # its two slow first calls were the warm-up
    assert calls[4:] == ["steady"] * 4 + ["cold"] * 4 + ["steady"] * 4 + ["cold"] * 4, calls


def test_the_loader_benchmark_reports_the_first_epoch_apart_from_the_later_ones(tmp_path, monkeypatch):
    """images/s and its min-max are over epochs 2.. only; the first epoch (worker start, first
    reads) is its own figure: with two epochs the figure is the second epoch's alone."""
    import argparse

    loaders = _bench_module("loaders", monkeypatch)
    dirs = loaders.make_data(tmp_path, 64)
    args = argparse.Namespace(batch_size=16, workers=1, epochs=2)
    r = loaders.throughput("gpu-resident", dirs, args)
    assert r["spread"] == (r["rate"], r["rate"]), r
    assert r["first"] != r["rate"] and min(r["first"], r["rate"]) > 0, r


def test_the_loader_benchmark_rate_is_images_over_time(monkeypatch):
    """It was the mean of the epochs' rates: epochs of 0.05 s and 0.2 s (200 images each) read as
    2,500 images/s where 1,600 were read a second."""
    import argparse
    import types

    import torch

    loaders = _bench_module("loaders", monkeypatch)
    clock = [0.0]
    took = iter([0.1, 0.05, 0.2, 0.05, 0.2])

    class Fake:
        def epoch(self, epoch):
            clock[0] += next(took)
            yield torch.zeros(100), None, torch.zeros(100), None

        def close(self):
            pass

    monkeypatch.setattr(loaders, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(loaders, "loader_for", lambda *args: Fake())
    r = loaders.throughput("fake", None, argparse.Namespace(epochs=5))
    assert r["rate"] == pytest.approx(1600) and r["spread"] == pytest.approx((1000, 4000)), r


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")  # torch.compile imports dynamo, which warns
def test_each_row_of_the_throughput_grid_builds_the_trainer_it_names(tmp_path, monkeypatch):
    """A row's settings must reach every part the step is built from: a loader kind, batch size
    or AMP that reached the loader and not the configuration (or the reverse) labelled a row
    "torch, bf16, 8" that timed another trainer."""
    from pathlib import Path

    import numpy as np
    import torch

    from dmhpc.data.shards import write_dataset

    throughput = _bench_module("throughput", monkeypatch)
    rng = np.random.default_rng(0)
    for domain in ("source", "target"):
        write_dataset(rng.standard_normal((64, 3, 75, 75), dtype=np.float32), np.arange(64) % 2, None,
                      tmp_path / domain, shard_size=64)
    cfg, loader, state, step = throughput.trainer_parts(tmp_path, "deepmerge2", 8, "bf16", True, "torch",
                                                        torch.device("cpu"), compiled=True)
    try:
        assert (cfg.model.name, cfg.train.batch_size, cfg.train.amp, cfg.train.channels_last, cfg.data.loader,
                cfg.train.compile) == ("deepmerge2", 8, "bf16", True, "torch", True)
        assert loader.kind == "torch" and (Path(cfg.data.source), Path(cfg.data.target)) == (
            tmp_path / "source", tmp_path / "target")
    finally:
        loader.close()


def _git_commit(commit: str) -> str:
    """`commit` (the baseline a benchmark compares with, `--old`), skipped where the checkout lacks
    it (a shallow clone, no git). HEAD compared the code with itself: the old and new halves could
    not disagree."""
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"commit {commit} not in this checkout (shallow clone, or not git): the benchmark compares with it")
    return proc.stdout.strip()


def _figures(line: str) -> list[float]:
    """The numbers of a printed row (thousands separators and units stripped)."""
    return [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", line)]


def _bench(tmp_path, *args):
    proc = _run([sys.executable, *args], TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.splitlines()


def _row(lines, start):
    rows = [line for line in lines if line.startswith(start)]
    assert len(rows) == 1, (start, lines)
    return rows[0]


# The CPU benchmarks below record figures in docs/benchmarks.md and are run again when the code they
# measure changes; each ran against the code of its own commit only, and two had stopped working
# (catalog_memory.py merged parts by an older signature; local_jobs.py had no batch size that fits a
# small data set). Small sizes: the figures are checked for being there and sane, not for speed.

def test_the_mmd_benchmark_compares_the_formulations_and_exits_1_below_its_speed_up(tmp_path):
    proc = _run([sys.executable, "bench/mmd.py", "--n", "16", "--d", "32", "--rounds", "1"], TMPDIR=str(tmp_path))
    lines = proc.stdout.splitlines()
    ours = _figures(_row(lines, "dmhpc.losses.mmd"))
    assert len(ours) == 3 and ours[2] < 1e-4, lines  # median s, min s, relative error against float64
    speed_up = _figures(_row(lines, "speed-up of dmhpc.losses.mmd"))[0]
    assert proc.returncode == (0 if speed_up >= 20 else 1), proc.stdout + proc.stderr[-2000:]
    memory = [_figures(line) for line in lines if line.startswith("N=")]
    assert [m[0] for m in memory] == [2048, 4096] and all(m[1] > 0 for m in memory), lines


def test_the_read_benchmarks_print_their_rates(tmp_path):
    lines = _bench(tmp_path, "bench/read.py", "--n", "512", "--size", "16", "--epochs", "1")
    assert _figures(_row(lines, "RowReader.read, best of 1"))[-1] > 0, lines
    lines = _bench(tmp_path, "bench/read.py", "--n", "512", "--size", "16", "--epochs", "1", "--pieces", "16",
                   "--chunk-cache")
    assert "32 random pieces of 16 rows" in lines[0], lines
    for name in ("RowReader.read", "with h5py's default chunk cache"):
        assert _figures(_row(lines, f"{name}, best of 1"))[-1] > 0, lines
    lines = _bench(tmp_path, "bench/npy_read.py", "--n", "256", "--size", "16", "--passes", "1")
    assert _figures(_row(lines, "positioned reads / memory map"))[0] > 0, lines


def test_the_split_check_benchmark_finds_old_and_new_agree(tmp_path):
    lines = _bench(tmp_path, "bench/split_check.py", "--rows", "20000", "--repeat", "1",
                   "--old", _git_commit("9ef568b"))
    for check in ("split_problem", "combine"):
        assert _row(lines, f"| {check} |").endswith("| yes |"), lines


@pytest.mark.parametrize("catalog", ["parquet", "h5"])
def test_the_catalog_memory_benchmark_reads_and_merges_at_both_commits(tmp_path, catalog):
    lines = _bench(tmp_path, "bench/catalog_memory.py", "--rows", "5000", "--extra", "2", "--formats", "parquet",
                   "--catalog", catalog, "--old", _git_commit("cc88769"))
    for what in ("read catalog", "merge parquet"):
        old, new, *_ = _figures(_row(lines, what))
        assert old > 0 and new > 0, lines


def test_the_verify_benchmark_times_each_level(tmp_path):
    lines = _bench(tmp_path, "bench/verify.py", "--gb", "0.005", "--threads", "1", "--dir", str(tmp_path))
    rows = [line.split("|")[1:4] for line in lines if line.startswith(("| structure", "| checksums"))]
    # cold rows only where this process may drop the page cache (root)
    assert {(level.strip(), cache.strip()) for level, cache, _ in rows} >= {("structure", "warm"),
                                                                             ("checksums", "warm")}, lines


def test_the_prepare_benchmark_times_prepare_beside_its_baseline(tmp_path):
    lines = _bench(tmp_path, "bench/prepare.py", "--n", "200", "--size", "16", "--repeat", "1")
    assert _figures(_row(lines, "dmhpc prepare (in process)"))[0] > 0, lines
    assert _row(lines, "baseline np.load + np.save") and _row(lines, "dmhpc prepare peak allocated memory"), lines


def test_the_predict_benchmark_rates_both_precisions(tmp_path):
    lines = _bench(tmp_path, "bench/predict.py", "--images", "256", "--rounds", "1")
    for precision in ("fp32", "bf16"):
        bare, loop, ratio, *_ = _figures(_row(lines, f"| {precision} |"))
        assert bare > 0 and loop > 0 and abs(ratio - loop / bare) < 0.01, lines
    assert "cpu" in lines[0] or "cuda" in lines[0], lines[0]  # the device both rates were measured on
    # Fewer images than a batch: the bare rate was 0 and the ratio a ZeroDivisionError, at the end.
    proc = _run([sys.executable, "bench/predict.py", "--images", "255"])
    assert proc.returncode == 2 and "--images: at least one batch (256)" in proc.stderr, proc.stderr


def test_the_synth_benchmark_times_an_object_and_the_command(tmp_path):
    lines = _bench(tmp_path, "bench/synth.py", "--n-per-class", "4", "--workers", "1", "--ranks", "0")
    assert _figures(_row(lines, "per object, one process, merger"))[0] > 0, lines
    assert "8 images per domain" in _row(lines, "dmhpc synth --workers 1"), lines


def test_the_local_jobs_benchmark_sums_the_runs_at_once(tmp_path):
    lines = _bench(tmp_path, "bench/local_jobs.py", "--runs", "2", "--images", "128", "--epochs", "2",
                   "--batch-size", "16", "--model", "deepmerge2")
    runs = [_figures(line) for line in lines if line.startswith("| seed=")]
    assert len(runs) == 2 and all(r[-1] > 0 for r in runs), lines  # [seed, threads, rate(s)..., mean]
    assert abs(_figures(_row(lines, "| all |"))[0] - sum(r[-1] for r in runs)) <= 1, lines


def test_the_step_profile_times_the_host_and_the_device_and_lists_operators(tmp_path):
    lines = _bench(tmp_path, "bench/step_profile.py", "--device", "cpu", "--batch", "8", "--images", "64",
                   "--warmup", "1", "--steps", "2", "--profile-steps", "1", "--rows", "5")
    host, device = _figures(_row(lines, "one at a time, medians: host "))[:2]
    assert 0 < host <= device, lines
    assert _figures(_row(lines, "back to back: "))[-1] > 0, lines  # images/s
    assert any("aten::" in line for line in lines) and any(line.startswith("profiled 1 steps") for line in lines)
