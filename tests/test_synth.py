"""`dmhpc synth`: real GalSim renders, real files, real worker processes and real MPI ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats
import pytest

from dmhpc.data import scenes, synth
from dmhpc.errors import DmhpcError

N_PER_CLASS = 8
SEED = 3
ROOT = Path(__file__).resolve().parents[1]
MPI_LAUNCH_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
FILES = ("pristine_X.npy", "noisy_X.npy", "pristine_y.npy", "noisy_y.npy", "objects.npy", "meta.json")


def _cli(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES}
    return subprocess.run([*launcher, sys.executable, "-m", "dmhpc", "synth", *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _load(d: Path) -> dict:
    out = {name[:-4]: np.load(d / name) for name in FILES if name.endswith(".npy")}
    out["meta"] = json.loads((d / "meta.json").read_text())
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "serial"
    synth.synthesize(out, N_PER_CLASS, SEED)
    return out


@pytest.fixture(scope="module")
def data(serial) -> dict:
    return _load(serial)


# ----------------------------------------------------------------------------- the files


def test_files_shapes_dtypes_labels_objects(serial, data):
    assert sorted(p.name for p in serial.iterdir()) == sorted(FILES)  # no temporary file left
    n = 2 * N_PER_CLASS
    for domain in ("pristine", "noisy"):
        assert data[f"{domain}_X"].shape == (n, 3, 75, 75)
        assert data[f"{domain}_X"].dtype == np.float32
        assert np.isfinite(data[f"{domain}_X"]).all()
        assert data[f"{domain}_y"].dtype == np.int64
    np.testing.assert_array_equal(data["objects"], np.arange(n))
    np.testing.assert_array_equal(data["pristine_y"], np.arange(n) % 2)
    np.testing.assert_array_equal(data["noisy_y"], data["pristine_y"])
    assert data["objects"].dtype == np.int64
    assert np.bincount(data["pristine_y"]).tolist() == [N_PER_CLASS, N_PER_CLASS]


def test_pixel_values_are_of_order_deepmerge(data):
    pristine = data["pristine_X"]
    means = pristine.mean(axis=(0, 2, 3))
    assert ((means > 0.003) & (means < 0.5)).all(), means
    # Bright, compact cores: peaks well above the mean in every image.
    assert (pristine.max(axis=(1, 2, 3)) > 1.0).all()
    # F814W sees rest-frame UV at z = 2: fainter than F356W (rest-frame near-IR) on average.
    assert means[0] < means[1]


def test_meta(data):
    import galsim

    from dmhpc.data import scenes

    meta = data["meta"]
    assert meta["seed"] == SEED and meta["n_per_class"] == N_PER_CLASS
    assert meta["counts"] == {"objects": 16, "images": 16, "per_class": {"0": 8, "1": 8}}
    assert [f["name"] for f in meta["filters"]] == ["F814W", "F356W", "F160W"]
    fwhm = {f["name"]: f["psf"]["fwhm_arcsec"] for f in meta["filters"]}
    assert 0.08 < fwhm["F814W"] < fwhm["F160W"] < 0.25  # same telescope: FWHM grows with wavelength
    assert meta["knobs"] == {"sb_limit": 25.0, "tidal_strength": 1.0, "neighbour_fraction": 0.3,
                             "minor_fraction": 0.3, "triple_fraction": 0.15}
    sigma = 10 ** (-0.4 * (25.0 - meta["zero_point_ab"])) * meta["pixel_scale_arcsec"] ** 2
    assert meta["noise"]["sigma_per_pixel"] == pytest.approx(sigma)
    assert meta["noise"]["sigma_per_pixel"] == scenes.noise_sigma(25.0)
    assert meta["software"]["galsim"] == galsim.__version__
    assert meta["views"] == ["identity"] and meta["augment"] is False


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_bytes(serial, tmp_path):
    synth.synthesize(tmp_path / "again", N_PER_CLASS, SEED)
    _same_files(serial, tmp_path / "again")


def test_prefix_property(data, tmp_path):
    """Objects depend on (seed, id) only: a smaller set is the first objects of a larger one."""
    synth.synthesize(tmp_path / "small", 3, SEED)
    small = _load(tmp_path / "small")
    np.testing.assert_array_equal(small["pristine_X"], data["pristine_X"][:6])
    np.testing.assert_array_equal(small["noisy_X"], data["noisy_X"][:6])


def test_different_seed_gives_different_images(data, tmp_path):
    synth.synthesize(tmp_path / "other", N_PER_CLASS, SEED + 1)
    other = _load(tmp_path / "other")
    for domain in ("pristine_X", "noisy_X"):
        differs = [not np.array_equal(a, b) for a, b in zip(other[domain], data[domain])]
        assert all(differs)


def test_workers_give_the_same_bytes(serial, tmp_path):
    out = tmp_path / "workers"
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    _same_files(serial, out)


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _launcher(ranks: int) -> tuple[str, ...]:
    """The command prefix that runs `ranks` MPI ranks (none for 1); skips where mpiexec is missing."""
    if ranks == 1:
        return ()
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter nor on PATH")
    return (mpiexec, "-n", str(ranks))


@pytest.mark.mpi
def test_mpi_ranks_give_the_same_bytes(serial, tmp_path):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter nor on PATH")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    out = tmp_path / "mpi"
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED),
                  launcher=(mpiexec, "-n", "2"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dmhpc synth:") == 1  # rank 0 reports, once
    _same_files(serial, out)


# ----------------------------------------------------------------------------- physics


def test_noisy_is_pristine_plus_sky_and_poisson_noise(data):
    meta = data["meta"]
    residual = data["noisy_X"].astype(np.float64) - data["pristine_X"]
    sigma = meta["noise"]["sigma_per_pixel"]
    for c, f in enumerate(meta["filters"]):
        pristine = data["pristine_X"][:, c].astype(np.float64)
        r = residual[:, c]
        # Sky-dominated pixels: the noise is the one set by the surface-brightness limit.
        sky_only = pristine < 0.01 * sigma
        assert sky_only.sum() > 10_000
        assert r[sky_only].std() == pytest.approx(sigma, rel=0.03)
        assert abs(r[sky_only].mean()) < 5 * sigma / np.sqrt(sky_only.sum())
        # Everywhere: Poisson noise of source + sky, so brighter pixels are noisier.
        z = r / np.sqrt((np.maximum(pristine, 0) + f["sky_per_pixel"]) / f["gain_counts_per_unit"])
        assert z.std() == pytest.approx(1.0, rel=0.03)
        bright = pristine > 10 * sigma
        assert r[bright].std() > 1.5 * sigma


def test_a_bright_limit_is_gaussian_sky_noise_of_its_sigma_and_keeps_the_galaxy(data, tmp_path):
    """The gain that makes the sky's Poisson noise sigma leaves it (B/sigma)^2 counts: under one from
    SB 22.5 on. At SB18 every sky pixel read -B (std 2e-7 for sigma 82) and a galaxy was one spike or
    nothing; at SB23 the sky took 8 values. Read noise now makes up what the sky's counts cannot."""
    from dmhpc.data import scenes

    pristine = data["pristine_X"][:4]
    rng = np.random.default_rng(0)
    for sb in (18.0, 23.0):
        sigma = scenes.noise_sigma(sb)
        noisy = np.stack([scenes.observe(p, rng, sb) for p in pristine])
        residual = noisy.astype(np.float64) - pristine
        for c in range(len(scenes.FILTERS)):
            sky = pristine[:, c] < 1e-3 * sigma
            r = residual[:, c][sky]
            assert r.std() == pytest.approx(sigma, rel=0.05), (sb, c)
            assert len(np.unique(noisy[:, c][sky])) > 0.9 * sky.sum(), (sb, c)  # no handful of levels
            assert abs(stats.skew(r)) < 0.1, (sb, c)  # Gaussian, not a Poisson of few counts
        # The galaxy's flux is still there on average (it had become a spike or nothing).
        assert residual.sum(axis=(2, 3)).mean() == pytest.approx(0.0, abs=4 * sigma * 75 / np.sqrt(4))
    # Limits whose sky has the counts draw no read noise: their images are the bytes they were (a
    # computed 1e-9 at SB 24.8 or 25.09 drew one, and shifted the noise stream).
    limits = np.arange(2463, 3501) / 100
    assert all(scenes.read_noise(f, sb) == 0.0 for f in scenes.FILTERS for sb in limits)
    assert all(scenes.gain(f, sb) == scenes.sky_per_pixel(f) / scenes.noise_sigma(sb) ** 2
               for f in scenes.FILTERS for sb in limits)
    assert [f["read_noise_per_pixel"] for f in data["meta"]["filters"]] == [0.0, 0.0, 0.0]


def test_the_same_objects_in_both_domains(data):
    """Each noisy image is its pristine twin observed: re-rendering an object gives both exactly."""
    knobs = scenes.Knobs()
    for obj in (0, 5):
        label, pristine, noisy = synth.render_object(SEED, obj, knobs)
        assert label == obj % 2
        np.testing.assert_array_equal(pristine, data["pristine_X"][obj])
        np.testing.assert_array_equal(noisy, data["noisy_X"][obj])


def _asymmetry(images: np.ndarray) -> np.ndarray:
    """The CAS asymmetry about the stamp centre: sum|I - I rotated by 180 deg| / sum|I|."""
    return np.abs(images - images[:, ::-1, ::-1]).sum(axis=(1, 2)) / np.abs(images).sum(axis=(1, 2))


def test_mergers_are_more_asymmetric(data):
    f160w = data["pristine_X"][:, 2]
    a = _asymmetry(f160w)
    y = data["pristine_y"]
    assert a[y == 1].mean() > a[y == 0].mean() + 0.1


def test_knobs_change_only_what_they_name(serial, data, tmp_path):
    y = data["pristine_y"]
    merger, single = y == 1, y == 0

    synth.synthesize(tmp_path / "no-tides", N_PER_CLASS, SEED, tidal_strength=0.0)
    no_tides = _load(tmp_path / "no-tides")
    np.testing.assert_array_equal(no_tides["pristine_X"][single], data["pristine_X"][single])
    features = data["pristine_X"][merger].astype(np.float64) - no_tides["pristine_X"][merger]
    # Tidal features only add light (up to the ~1e-4 an FFT box of another size makes).
    assert (features > -1e-3).all()
    assert (features.max(axis=(1, 2, 3)) > 0.01).all()  # every merger has some
    # The physics of the domain gap: at SB25, tidal features sit below the noise, cores far above.
    sigma = data["meta"]["noise"]["sigma_per_pixel"]
    in_features = features > 0.05 * features.max(axis=(1, 2, 3), keepdims=True)
    assert np.median(features[in_features]) < sigma
    assert np.median(data["pristine_X"].max(axis=(1, 2, 3))) > 10 * sigma

    synth.synthesize(tmp_path / "alone", N_PER_CLASS, SEED, neighbour_fraction=0.0)
    synth.synthesize(tmp_path / "crowded", N_PER_CLASS, SEED, neighbour_fraction=1.0)
    alone, crowded = _load(tmp_path / "alone"), _load(tmp_path / "crowded")
    np.testing.assert_array_equal(alone["pristine_X"][merger], data["pristine_X"][merger])
    np.testing.assert_array_equal(crowded["pristine_X"][merger], data["pristine_X"][merger])
    added = crowded["pristine_X"][single].astype(np.float64) - alone["pristine_X"][single]
    assert (added > -1e-3).all() and (added.max(axis=(1, 2, 3)) > 0.1).all()  # a neighbour in every stamp

    synth.synthesize(tmp_path / "shallow", N_PER_CLASS, SEED, sb_limit=23.0)
    shallow = _load(tmp_path / "shallow")
    np.testing.assert_array_equal(shallow["pristine_X"], data["pristine_X"])
    sky = data["pristine_X"] < 1e-3
    noise_23 = (shallow["noisy_X"][sky] - shallow["pristine_X"][sky]).std()
    noise_25 = (data["noisy_X"][sky] - data["pristine_X"][sky]).std()
    assert noise_23 / noise_25 == pytest.approx(10 ** 0.8, rel=0.03)  # a limit 2 mag brighter: 10**0.8 = 6.3 times the noise


def test_augment_stores_the_8_flips_and_rotations(data, tmp_path):
    meta = synth.synthesize(tmp_path / "aug", 2, SEED, augment=True)
    aug = _load(tmp_path / "aug")
    assert meta["counts"]["images"] == 32 and len(meta["views"]) == 8
    assert aug["pristine_X"].shape == (32, 3, 75, 75)
    np.testing.assert_array_equal(aug["objects"], np.repeat(np.arange(4), 8))
    np.testing.assert_array_equal(aug["pristine_y"], np.repeat(np.arange(4) % 2, 8))
    for domain in ("pristine_X", "noisy_X"):
        for obj in range(4):
            views = aug[domain][obj * 8:(obj + 1) * 8]
            base = data[domain][obj]  # view 0 is the un-augmented image
            expected = [np.rot90(base[..., ::-1] if v >= 4 else base, k=v % 4, axes=(1, 2)) for v in range(8)]
            for v in range(8):
                np.testing.assert_array_equal(views[v], expected[v])
            flat = {views[v].tobytes() for v in range(8)}
            assert len(flat) == 8  # eight different images of one object


# ----------------------------------------------------------------------------- command line and errors


def test_help_shows_an_example():
    result = _cli("--help")
    assert result.returncode == 0
    assert "example:" in result.stdout and "dmhpc synth --out" in result.stdout
    for flag in ("--sb-limit", "--tidal-strength", "--neighbour-fraction", "--minor-fraction", "--triple-fraction",
                 "--workers", "--augment", "--overwrite"):
        assert flag in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dmhpc synth: error: ")
    for word in words:
        assert word in lines[0]


def test_refuses_a_non_empty_output_folder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _cli("--out", str(out), "--n-per-class", "2")
    _one_line_error(result, str(out), "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _killed_render(out: Path, *argv: str) -> None:
    """Start a render big enough to outlast the checks, wait for its staged files, kill it (SIGKILL: a
    SIGTERM ends it as a failure, removing them)."""
    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES}
    proc = subprocess.Popen([sys.executable, "-m", "dmhpc", "synth", "--out", str(out), "--n-per-class", "5000",
                             *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".pristine_X.npy.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, "the render did not start"
            time.sleep(0.1)
        # A second render into the folder meanwhile stops at the first one's lock and touches nothing.
        # The first is held still meanwhile: on a slow machine it went on to write its later files.
        proc.send_signal(signal.SIGSTOP)
        staged = sorted(p.name for p in out.iterdir())
        _one_line_error(_cli("--out", str(out), "--n-per-class", "2"), str(out), "in use by another dmhpc synth")
        assert sorted(p.name for p in out.iterdir()) == staged
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_killed_render_is_finished_by_running_again(serial, tmp_path):
    out = tmp_path / "killed"
    _killed_render(out)
    assert any(p.stat().st_size > 0 for p in out.glob(".*.tmp"))  # full-size orphans, no meta.json
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED))
    assert result.returncode == 0, result.stderr
    _same_files(out, serial)  # and no orphan left beside them

    # A finished render is never replaced unasked; --overwrite clears a killed run's orphans too.
    _one_line_error(_cli("--out", str(out), "--n-per-class", "2"), str(out), "finished render", "--overwrite")
    _killed_render(out, "--overwrite")
    assert list(out.glob(".*.tmp"))
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED), "--overwrite")
    assert result.returncode == 0, result.stderr
    _same_files(out, serial)


KILLED_AFTER_ONE_RENAME = """
import os, sys
from dmhpc.data import synth

replace = os.replace

def first_then_killed(src, dst):
    replace(src, dst)
    os._exit(137)  # as SIGKILL: nothing after it runs

synth.os.replace = first_then_killed
synth.synthesize(sys.argv[1], 8, 4, overwrite=True)
"""


def test_a_render_killed_among_its_renames_is_refused_by_prepare(serial, tmp_path):
    """synth --overwrite killed between its renames left new images beside the old render's labels:
    prepare took them (and verify passed them), labels matching their images for half the rows."""
    out = tmp_path / "render"
    shutil.copytree(serial, out)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ONE_RENAME, str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == 137, killed.stderr
    assert not (out / "meta.json").exists() and (out / ".dmhpc-incomplete").exists()
    argv = [sys.executable, "-m", "dmhpc", "prepare", "--data-config", str(ROOT / "configs/data/embedded.yaml"),
            "--root", str(out), "--out", str(tmp_path / "shards")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr == (
        f"dmhpc prepare: error: {out}: its files were being replaced when that stopped (.dmhpc-incomplete), and may "
        f"be of two renders; render it again (dmhpc synth --overwrite)\n"), proc.stderr
    assert not (tmp_path / "shards").exists()
    # Rendered again (unasked: a killed render's folder is synth's), it is whole and unmarked.
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED))
    assert result.returncode == 0, result.stderr
    _same_files(out, serial)


@pytest.mark.parametrize("argv, words", [
    (["--n-per-class", "0"], [f"--n-per-class: expected an integer from 1 to {2**30 - 1}, got 0"]),
    (["--n-per-class", str(10**15)], ["--n-per-class: expected an integer from 1 to"]),  # (a traceback at 7e13)
    (["--n-per-class", "-3"], ["--n-per-class", "-3"]),
    (["--seed", "-1"], ["--seed"]),
    (["--workers", "0"], ["--workers"]),
    (["--neighbour-fraction", "1.5"], ["--neighbour-fraction: expected a number in [0, 1], got 1.5"]),
    (["--sb-limit", "nan"], ["--sb-limit: expected a number in [18, 35] mag/arcsec^2, got NaN"]),
    (["--sb-limit", "40"], ["--sb-limit: expected a number in [18, 35] mag/arcsec^2, got 40.0"]),
    (["--tidal-strength", "-1"], ["--tidal-strength"]),
    (["--tidal-strength", "1e20"], ["--tidal-strength: expected a number in [0, 1000], got 1e+20"]),
    (["--seed", str(2**32)], [f"--seed: expected an integer from 0 to {2**32 - 1}, got {2**32}"]),
])
def test_bad_arguments_exit_1_and_write_nothing(tmp_path, argv, words):
    out = tmp_path / "never"
    _one_line_error(_cli("--out", str(out), *argv), *words)
    assert not out.exists()


def test_output_that_is_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    _one_line_error(_cli("--out", str(out), "--n-per-class", "1"), "not a directory")
    assert out.read_text() == "x"


def test_overwrite_replaces_only_synth_files_and_says_which_prepared_sets_it_outdated(serial, tmp_path):
    """The shards `prepare` made beside a render stay, as the docs say; rendered again with another
    seed, they described the images it replaced without a word (nothing compares a manifest's
    inputs when training)."""
    from dmhpc.cli import main

    out = tmp_path / "re"
    synth.synthesize(out, 4, SEED + 7)
    config = str(ROOT / "configs" / "data" / "embedded.yaml")
    assert main(["prepare", "--data-config", config, "--root", str(out), "--out", str(out / "shards"),
                 "--shard-size", "8"]) == 0
    again = _cli("--out", str(out), "--n-per-class", "4", "--seed", str(SEED + 7), "--overwrite")
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr  # the same bytes: still current
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "shards" / "pristine" / "manifest.json").is_file()
    for name in FILES:
        assert (out / name).read_bytes() == (serial / name).read_bytes(), name
    warned = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warned == [f"dmhpc synth: warning: {out / 'shards' / domain} was prepared from the images this render "
                      f"replaced; prepare it again (with --overwrite) before training on it"
                      for domain in ("noisy", "pristine")], result.stderr


def test_a_failure_mid_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(seed, obj_id, knobs):
        calls.append(obj_id)
        if len(calls) > 3:
            raise DmhpcError("disk on fire")
        return 0, np.zeros((3, 75, 75), np.float32), np.zeros((3, 75, 75), np.float32)

    monkeypatch.setattr(synth, "render_object", failing)
    with pytest.raises(DmhpcError, match="disk on fire"):
        synth.synthesize(tmp_path / "new", 4, SEED)
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    calls.clear()
    with pytest.raises(DmhpcError):
        synth.synthesize(existing, 4, SEED)
    assert list(existing.iterdir()) == []


# 30 objects per class: 4 MiB per image file. On 3 MiB the first does not fit; on 6 MiB the first
# does and the second does not, so the first one's temporary file must go too.
@pytest.mark.parametrize("mb, full", [(3, "pristine_X.npy"), (6, "noisy_X.npy")])
def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk, mb, full):
    disk = small_disk(mb)
    out = disk / "s"
    # Written through a memory map into sparse files, a full disk was a SIGBUS: no message, rc 135,
    # full-size temporary files left.
    _one_line_error(_cli("--out", str(out), "--n-per-class", "30"), str(out / full), "No space left on device")
    assert list(disk.iterdir()) == []

    out.mkdir()  # a folder that was there stays, empty
    _one_line_error(_cli("--out", str(out), "--n-per-class", "30", "--workers", "2"), str(out / full))
    assert list(disk.iterdir()) == [out] and list(out.iterdir()) == []


def test_a_disk_full_at_the_label_files_names_the_file(small_disk):
    """The small files written last named only the folder ("s: No space left on device")."""
    # 2 objects per class: two image files of 66 pages each, then a page for the folder's lock and
    # one for each small file: 134 pages hold the images and pristine_y.npy, not noisy_y.npy.
    disk = small_disk("540k")
    out = disk / "p" / "s"  # the parent synth made for it went too (it stayed behind)
    result = _cli("--out", str(out), "--n-per-class", "2")
    _one_line_error(result, "cannot write: No space left on device (disk full or over quota); nothing written")
    # The page count may differ by one elsewhere: any of the small files, never the folder alone.
    assert re.search(rf"error: {re.escape(str(out))}/((pristine_y|noisy_y|objects)\.npy|meta\.json): ", result.stderr), result.stderr
    assert list(disk.iterdir()) == []


def test_a_full_disk_under_mpi_leaves_nothing(small_disk):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter nor on PATH")
    disk = small_disk(6)
    # Only rank 0 writes files: it removes its temporary files before it aborts the other ranks. The
    # parent folder it made for --out goes too (it stayed behind).
    result = _cli("--out", str(disk / "p" / "s"), "--n-per-class", "30", launcher=(mpiexec, "-n", "2"))
    said = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0 and result.stderr, said
    # The line synth prints without MPI (was "rank 0 failed: DmhpcError('...'); aborting"), then MPI's own.
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"dmhpc synth: error: {disk / 'p' / 's'}/") and "No space left on device" in first, \
        result.stderr
    assert first.endswith("nothing written; ending the other ranks"), result.stderr
    assert list(disk.iterdir()) == []


CLAIM_FAILS = """
import os, sys
import dmhpc.data.synth as synth
from dmhpc.cli import main

def refused(folder, of=None):  # a leftover temporary file that another user owns, say
    raise PermissionError(1, "Operation not permitted", os.path.join(folder, ".pristine_X.npy.abcdefgh.tmp"))

synth.remove_orphans = refused
sys.exit(main(["synth", "--out", sys.argv[1], "--n-per-class", "1"]))
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_folder_rank_0_cannot_claim_is_one_line_and_ends_every_rank(tmp_path, ranks):
    """An OSError claiming --out (not a DmhpcError) was a traceback, and under mpiexec rank 0 never
    sent the other ranks its error: they waited in their broadcast until the job was killed."""
    launcher = _launcher(ranks)
    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES}
    result = subprocess.run([*launcher, sys.executable, "-c", CLAIM_FAILS, str(tmp_path / "s")], capture_output=True,
                            text=True, env=env, timeout=120)
    _one_line_error(result, f"{tmp_path / 's' / '.pristine_X.npy.abcdefgh.tmp'}: cannot claim it for the render: "
                            f"Operation not permitted")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("ranks", [1, 2])
def test_an_out_that_cannot_be_looked_at_is_one_line_and_ends_every_rank(tmp_path, ranks):
    """A name too long to stat (or a parent one may not enter) raised OSError before the claim's
    error handling: a traceback, and under mpiexec the other ranks waited in their broadcast."""
    launcher = _launcher(ranks)
    out = tmp_path / ("a" * 300)
    result = _cli("--out", str(out), "--n-per-class", "1", launcher=launcher)
    _one_line_error(result, f"{out}: cannot look at it (File name too long)")
    assert list(tmp_path.iterdir()) == []


RANK_1_FAILS = """
import sys, time
import numpy as np
import dmhpc.data.synth as synth
from dmhpc.cli import main

def render(seed, obj_id, knobs):  # rank 1 renders objects 30 to 59; rank 0 has staged its files by then
    if obj_id == 40:
        time.sleep(2)
        raise MemoryError("out of memory at object 40")
    return obj_id % 2, np.ones((3, 75, 75), np.float32), np.ones((3, 75, 75), np.float32)

synth.render_object = render
sys.exit(main(["synth", "--out", sys.argv[1], "--n-per-class", "30"]))
"""


def test_a_failure_on_another_rank_leaves_nothing_of_rank_0s_behind(tmp_path):
    """A rank other than 0 ended the job with MPI_Abort itself: rank 0 was killed in a receive, and
    its full-size staged files, the new folder and its lock stayed."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter nor on PATH")
    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES}
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", RANK_1_FAILS, str(tmp_path / "s")],
                            capture_output=True, text=True, env=env, timeout=200)
    said = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0 and result.stderr, said
    first = result.stderr.splitlines()[0]
    assert first == ("dmhpc synth: error: rank 1: MemoryError('out of memory at object 40'); ending the other "
                     "ranks"), said
    assert list(tmp_path.iterdir()) == []


SLOW_RENDER = """
import sys, time
import numpy as np
import dmhpc.data.synth as synth
from dmhpc.cli import main

def render(seed, obj_id, knobs):
    print("rendering", flush=True)
    time.sleep(120)

synth.render_object = render
sys.exit(main(["synth", "--out", sys.argv[1], "--n-per-class", "30"]))
"""


@pytest.mark.mpi
def test_ctrl_c_under_mpiexec_is_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C reaches every rank: each said "error: rank N: KeyboardInterrupt()" or "error:
    KeyboardInterrupt()" and the job ended with MPI_Abort's 1."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the Python interpreter nor on PATH")
    from tests.conftest import interrupted_once_said

    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES}
    code, err = interrupted_once_said([mpiexec, "-n", "2", sys.executable, "-c", SLOW_RENDER, str(tmp_path / "s")],
                                      "rendering", env=env)
    assert code == 130 and "Traceback" not in err and "error" not in err, (code, err)
    assert err.count("dmhpc synth: interrupted\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_survey_objects_share_no_random_stream_with_simulated_ones():
    """Keyed [seed, 2, k], survey object 0 had simulated object 2's streams (numpy pads short keys
    with zeros to 4 words), so its primary galaxy; a seed of 2**33 split into the words
    [0, 2] made one seed's simulated objects another's survey."""
    for seed in (0, 7, synth.MAX_SEED):
        simulated = {g.integers(2**63) for k in range(64) for g in synth.object_streams(seed, k)}
        survey = {g.integers(2**63) for k in range(64) for g in synth.survey_streams(seed, k)}
        assert len(simulated) == 4 * 64 and len(survey) == 6 * 64 and not simulated & survey, seed
    with pytest.raises(DmhpcError, match=rf"--seed: expected an integer from 0 to {2**32 - 1}, got {2**33}"):
        synth.synthesize(Path("never"), 1, 2**33)


def _render_workers(pid: int) -> list[int]:
    """The pids of the spawned worker processes of `pid` (not its multiprocessing resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _rendering_with_workers(out: Path, workers: int = 2, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`dmhpc synth --workers 2` of 300 objects in a session of its own, returned once a chunk is in
    the staged file: both workers have started (a worker killed before its first task was replaced
    by multiprocessing.Pool, task intact). Seconds of work for two workers, on a slow machine too."""
    env = {k: v for k, v in os.environ.items() if k not in MPI_LAUNCH_VARIABLES} | {"PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([*launcher, sys.executable, "-m", "dmhpc", "synth", "--out", str(out), "--n-per-class",
                             "150", "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the render did not start or ended: " + proc.communicate()[1][-3000:])
        staged = list(out.glob(".pristine_X.npy.*.tmp"))
        try:
            if staged and np.load(staged[0], mmap_mode="r").any():
                return proc
        except (EOFError, ValueError):  # just created: its header not written yet
            pass
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_render_stopped_by_a_signal_ends_its_workers_in_one_line(tmp_path, signum, in_the_foreground):
    """SIGTERM to the render's process alone killed it at once and left its two workers waiting on
    their task queue for ever; Ctrl-C (SIGINT to the whole group) printed a traceback per worker."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the worker processes")
    proc = _rendering_with_workers(tmp_path / "w")
    try:
        workers = _render_workers(proc.pid)
        assert len(workers) == 2
        if signum == signal.SIGTERM:
            os.kill(proc.pid, signum)  # `kill PID`, or a wrapper that signals its child alone
        else:
            os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if signum == signal.SIGTERM:
        _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), str(tmp_path / "w"),
                        "stopped by SIGTERM; run again to render")
    else:
        assert (proc.returncode, stderr.strip()) == (130, "dmhpc synth: interrupted")
    assert list(tmp_path.iterdir()) == []  # the staged files, the folder it made and its lock: gone
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)  # reaped by the render; an orphan would be re-parented and stay
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_a_sigterm_to_every_process_of_a_render_in_one_process_or_under_mpi_leaves_nothing(tmp_path, ranks):
    """A time limit or scancel sends SIGTERM to every process of the job. Only the worker pool's
    render handled it: in one process (the default) and under MPI it died at once, leaving its
    full-size staged images and its lock."""
    launcher = _launcher(ranks)
    proc = _rendering_with_workers(tmp_path / "w", workers=1, launcher=launcher)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in stderr or ranks > 1, stderr  # (mpiexec may end rank 0 before it says so)
    assert list(tmp_path.iterdir()) == []  # the staged files, the folder it made and its lock: gone


def test_a_killed_worker_ends_the_render_with_one_line(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the worker processes")
    out = tmp_path / "w"
    proc = _rendering_with_workers(out)
    try:
        workers = _render_workers(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        # Before, the killed worker's task was lost and the render waited for it forever.
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: each thread's stack, for the report
            pytest.fail("the render hung after a worker was killed:\n" + proc.communicate(timeout=30)[1][-6000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), str(out),
                    "a render worker died (killed by signal?); run again to finish the render")
    assert list(tmp_path.iterdir()) == []  # the staged files, the folder it made and its lock: gone
    for pid in workers:  # the other worker went with the render
        assert not Path(f"/proc/{pid}").exists()


def test_a_render_worker_sends_back_one_pipe_write_and_writes_its_rows_itself(tmp_path):
    """A worker's result is at most PIPE_BUF bytes, which a pipe takes whole or not at all: a
    chunk's images sent back (megabytes, many writes) by a worker killed between two writes left
    half a message, and ProcessPoolExecutor's reader waited for the rest forever (a CI run's render
    hung so). The rows the worker writes into the staged files are the ones the staging writes."""
    import pickle
    import select

    n = synth.CHUNK + 3
    knobs = scenes.Knobs()
    by_worker = synth._Staging(tmp_path / "w", n, 8, survey=True)
    by_staging = synth._Staging(tmp_path / "s", n, 8, survey=True)
    try:
        for start, count in ((0, synth.CHUNK), (synth.CHUNK, 3)):
            chunk = (SEED, start, count, knobs, True)
            result = synth._render_into((chunk, *by_worker.targets()))
            # the executor's envelope (work id, exception, exit pid) and the 4-byte length: < 200 bytes
            assert len(pickle.dumps(result)) + 200 <= select.PIPE_BUF, len(pickle.dumps(result))
            assert result[:2] == (start, count)
            by_worker.put_labels(start, result[2])
            by_staging.put(*synth._render_chunk(chunk))
        for name, images in by_staging.images.items():
            assert np.array_equal(np.load(by_worker.partial[name], mmap_mode="r"), images), name
        assert np.array_equal(by_worker.survey_labels, by_staging.survey_labels)
        assert by_worker.survey_labels.any() and not by_worker.survey_labels.all()
    finally:
        by_worker.discard()
        by_staging.discard()


def test_a_worker_that_cannot_open_a_staged_file_names_the_output_file(tmp_path):
    """The worker's error named the temporary file, which the render removes as it fails."""
    staging = synth._Staging(tmp_path, 2, 1, survey=False)
    views, staged = staging.targets()
    staging.discard()
    with pytest.raises(DmhpcError, match=f"^{re.escape(str(tmp_path / 'pristine_X.npy'))}: cannot write: "):
        synth._render_into(((SEED, 0, 2, scenes.Knobs(), False), views, staged))


def test_the_render_receives_from_its_workers_one_pipe_write_each(tmp_path, monkeypatch):
    """Through the render itself (the test above calls the worker's function): every result the
    executor hands back from a worker is at most PIPE_BUF bytes pickled."""
    import pickle
    import select
    from concurrent.futures import Future

    sizes = []
    result = Future.result

    def measured(self, *args, **kwargs):
        value = result(self, *args, **kwargs)
        sizes.append(len(pickle.dumps(value)))
        return value

    monkeypatch.setattr(Future, "result", measured)
    staging = synth._Staging(tmp_path, 16, 1, survey=True)
    try:
        synth._render_local(tmp_path, SEED, scenes.Knobs(), True, 16, 2, staging)
    finally:
        staging.discard()
    assert len(sizes) == 8 and max(sizes) + 200 <= select.PIPE_BUF, sizes


# ----------------------------------------------------------------------------- the survey-like domain

SURVEY_FILES = ("survey_X.npy", "survey_y.npy", "survey_objects.npy")


@pytest.fixture(scope="module")
def with_survey(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "survey"
    synth.synthesize(out, N_PER_CLASS, SEED, survey=True)
    return out


def test_the_survey_domain_is_other_galaxies_and_leaves_the_pair_unchanged(serial, with_survey):
    for name in FILES[:-1]:  # the simulated pair: the same bytes with or without --survey
        assert (serial / name).read_bytes() == (with_survey / name).read_bytes(), name
    images, labels = np.load(with_survey / "survey_X.npy"), np.load(with_survey / "survey_y.npy")
    objects = np.load(with_survey / "survey_objects.npy")
    n = 2 * N_PER_CLASS
    assert images.shape == (n, 3, 75, 75) and images.dtype == np.float32 and np.isfinite(images).all()
    assert set(np.unique(labels)) <= {0, 1} and labels.dtype == np.int64
    assert list(objects) == list(range(n, 2 * n))  # no id shared with the simulated objects
    meta = json.loads((with_survey / "meta.json").read_text())["survey"]
    assert [f["name"] for f in meta["filters"]] == ["g", "r", "i"] and meta["zero_point_ab"] == 27.0
    # Not the pristine images re-observed: survey image k looks no more like pristine image k than
    # like any other (centred galaxies all correlate somewhat; the same scene would stand out).
    pristine = np.load(with_survey / "pristine_X.npy")
    c = np.corrcoef(images[:, 2].reshape(n, -1), pristine[:, 2].reshape(n, -1))[:n, n:]
    same, other = np.diag(c).mean(), c[~np.eye(n, dtype=bool)].mean()
    assert same < other + 0.05, (same, other)


def test_survey_population_and_observation_differ_as_documented():
    labels = [scenes.survey_label(np.random.default_rng(s)) for s in np.random.SeedSequence(1).spawn(4000)]
    fraction = scenes.SURVEY_POPULATION.merger_fraction
    assert fraction != 0.5 and np.mean(labels) == pytest.approx(fraction, abs=0.03)  # not the simulation's 50/50
    # a red bulge (F814W - F160W = 2.3) is fainter in g than in i; a blue disk (0.8) less so
    bulge = scenes.survey_fluxes(np.array([10 ** (-0.4 * 2.3), 1.0, 1.0]), 0.0)
    disk = scenes.survey_fluxes(np.array([10 ** (-0.4 * 0.8), 1.0, 1.0]), 0.0)
    assert bulge[0] / bulge[2] < disk[0] / disk[2] < 1.0
    # counts (zero point 27) instead of 10 nJy (28.9): a source of the same magnitude reads 5.75x less
    flat = scenes.survey_fluxes(np.array([1.0, 1.0, 1.0]), 0.0)
    assert flat[2] == pytest.approx(10 ** (-0.4 * 1.9) * (770 / 814) ** 0.0, rel=1e-6)
    rng = np.random.default_rng(0)
    blank = scenes.observe_survey(np.zeros((3, scenes.SURVEY_NATIVE, scenes.SURVEY_NATIVE), np.float32), rng)
    sigma = scenes.survey_noise_sigma()
    # resampling correlates the noise and lowers its per-pixel spread, never raises it
    assert 0.4 * sigma < blank.std() < sigma


def test_workers_and_ranks_give_the_same_survey_bytes(with_survey, tmp_path):
    out = tmp_path / "workers"
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED), "--survey",
                  "--workers", "2")
    assert result.returncode == 0, result.stderr
    for name in (*FILES, *SURVEY_FILES):
        assert (out / name).read_bytes() == (with_survey / name).read_bytes(), name
    mpiexec = _mpiexec()
    if mpiexec is None:
        return
    out = tmp_path / "mpi"
    result = _cli("--out", str(out), "--n-per-class", str(N_PER_CLASS), "--seed", str(SEED), "--survey",
                  launcher=(mpiexec, "-n", "2"))
    assert result.returncode == 0, result.stderr
    for name in (*FILES, *SURVEY_FILES):
        assert (out / name).read_bytes() == (with_survey / name).read_bytes(), name


def test_the_shipped_survey_data_config_prepares_beside_the_pair(with_survey, tmp_path):
    """synth --survey, then prepare with both shipped data configs into one folder: three domains,
    the survey split by its own objects, none of which is a simulated one."""
    from dmhpc.cli import main
    from dmhpc.data.shards import RowReader

    root, out = str(with_survey), str(tmp_path / "shards")
    for name in ("embedded.yaml", "embedded-survey.yaml"):
        config = str(ROOT / "configs" / "data" / name)
        assert main(["prepare", "--data-config", config, "--root", root, "--out", out, "--shard-size", "8"]) == 0
    assert sorted(p.name for p in Path(out).iterdir()) == ["noisy", "pristine", "survey"]
    survey, pristine = (RowReader(Path(out) / name) for name in ("survey", "pristine"))
    assert len(survey) == len(np.load(with_survey / "survey_y.npy"))
    survey_objects = set(survey.read(0, len(survey))["objects"].tolist())
    assert survey_objects and not survey_objects & set(pristine.read(0, len(pristine))["objects"].tolist())


def test_meta_json_is_renamed_into_place_last(tmp_path, monkeypatch):
    renamed = []

    def replace(src, dst):  # the real rename, recorded: a kill after any of them leaves no meta.json early
        os.rename(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(synth.os, "replace", replace)
    synth.synthesize(tmp_path / "s", 1, SEED, survey=True)
    assert sorted(renamed) == sorted(FILES + SURVEY_FILES) and renamed[-1] == "meta.json"


def test_overwrite_without_survey_removes_an_older_survey(with_survey, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(with_survey, out)
    (out / "notes.txt").write_text("mine")
    synth.synthesize(out, 2, SEED, overwrite=True)
    assert not any((out / name).exists() for name in SURVEY_FILES)  # the new meta.json has no survey
    assert "survey" not in json.loads((out / "meta.json").read_text()) and (out / "notes.txt").exists()
    assert len(np.load(out / "pristine_y.npy")) == 4


@pytest.mark.parametrize("name", [".notes.tmp", ".preds.csv.abcd1234.tmp"])
def test_a_users_file_named_like_a_temporary_is_neither_taken_nor_removed(tmp_path, name):
    """A user's `.notes.tmp` in the output folder was taken for an orphan of a killed render: the
    folder counted as dmhpc's, and the file was deleted without --overwrite. So was the temporary
    file of another writer (a prediction written beside the render), with --overwrite too."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / name).write_text("mine")
    result = _cli("--out", str(out), "--n-per-class", "2")
    _one_line_error(result)
    assert result.stderr == (f"dmhpc synth: error: {out}: not empty (holds {name}); pass --overwrite to replace "
                             "the synth files in it\n")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "mine"
    assert _cli("--out", str(out), "--n-per-class", "2", "--overwrite").returncode == 0
    assert (out / name).read_text() == "mine" and (out / "meta.json").exists()


def test_every_file_of_a_render_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """Only the image memmaps were synced: after a node crash meta.json, the mark of a finished set,
    could stand beside empty label files. Each file is synced before the renames, the folder after."""
    synced, renamed = [], []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        renamed.append((Path(src), len(synced)))
        replace(src, dst)

    monkeypatch.setattr(synth.os, "fsync", recording_fsync)
    monkeypatch.setattr(synth.os, "replace", recording_replace)
    out = tmp_path / "s"
    synth.synthesize(out, 1, SEED)
    small = [src for src, _ in renamed if not src.name.startswith((".pristine_X", ".noisy_X"))]
    assert len(small) == 4 and all(src in synced[:renamed[0][1]] for src in small), (renamed, synced)
    assert synced[-1] == out  # the renames themselves
