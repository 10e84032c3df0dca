"""`dmhpc prepare` through the command line: files, layouts, data configs, MPI, bad input."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, clean_env, split_lists
from dmhpc.cli import main
from dmhpc.data import shards
from dmhpc.data.inputs import open_fits_cube, open_images
from dmhpc.data.prepare import DOMAIN_KEYS
from dmhpc.data.shards import INCOMPLETE, MANIFEST, SPLITS, RowReader, file_sha256, load_manifest
from dmhpc.errors import DmhpcError

N = 48


def save(directory: Path, name: str, array) -> str:
    path = directory / name
    np.save(path, array)
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    """One domain's files: NCHW float32 images, labels, object ids (4 augmented copies each)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(N, 3, 8, 8)).astype(np.float32)
    return {
        "images": save(tmp_path, "X.npy", images),
        "labels": save(tmp_path, "y.npy", rng.integers(0, 2, N)),
        "objects": save(tmp_path, "o.npy", rng.permutation(np.arange(N) // 4)),
        "out": str(tmp_path / "ds"),
    }


def args(files: dict, *extra) -> list[str]:
    out = ["prepare"]
    for key in ("images", "labels", "objects", "out"):
        if files.get(key) is not None:
            out += [f"--{key}", files[key]]
    return out + ["--shard-size", "10", *extra]


def shard_bytes(directory) -> dict:
    """Every file of a data set (manifest included) by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def read_all(directory) -> dict:
    with RowReader(directory) as reader:
        return reader.read(0, len(reader))


def assert_fails(capsys, argv, *parts, out=None):
    """The command exits 1 with one line on stderr holding every part, and writes no output."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmhpc prepare: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    if out is not None:
        assert not Path(out).exists()
    return err


def test_prepare_converts_and_records_inputs(inputs, capsys):
    assert main(args(inputs)) == 0
    assert "48 images (NCHW)" in capsys.readouterr().out
    m = load_manifest(inputs["out"])
    assert [(i["role"], i["file"]) for i in m["inputs"]] == [
        (role, str(Path(inputs[role]).resolve())) for role in ("images", "labels", "objects")
    ]
    assert all(i["sha256"] == file_sha256(i["file"]) for i in m["inputs"])
    assert m["layout"] == "NCHW" and len(m["shards"]) == 5
    rows = read_all(inputs["out"])
    images = np.load(inputs["images"])
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])
    np.testing.assert_array_equal(rows["labels"], np.load(inputs["labels"])[rows["index"]])
    objects = np.load(inputs["objects"])
    np.testing.assert_array_equal(rows["objects"], objects[rows["index"]])
    seen = [set(objects[m["splits"][s]]) for s in SPLITS]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    train = images[m["splits"]["train"]].astype(np.float64)
    np.testing.assert_allclose(m["stats"]["std"], train.std(axis=(0, 2, 3)), rtol=1e-12)
    assert main(["verify", inputs["out"]]) == 0


def test_prepare_equals_write_dataset(inputs, tmp_path):
    assert main(args(inputs, "--seed", "4", "--fractions", "0.5,0.25,0.25")) == 0
    m = shards.write_dataset(
        np.load(inputs["images"]), np.load(inputs["labels"]), np.load(inputs["objects"]),
        tmp_path / "w", shard_size=10, seed=4, fractions=(0.5, 0.25, 0.25),
    )
    assert m["shards"] == load_manifest(inputs["out"])["shards"]


def test_nhwc_detected_and_stored_as_nchw(inputs, tmp_path, capsys):
    nhwc = np.load(inputs["images"]).transpose(0, 2, 3, 1).copy()
    other = dict(inputs, images=save(tmp_path, "X_nhwc.npy", nhwc), out=str(tmp_path / "nhwc"))
    assert main(args(inputs)) == 0 and main(args(other)) == 0
    assert "48 images (NHWC)" in capsys.readouterr().out
    assert load_manifest(other["out"])["layout"] == "NHWC"
    a, b = shard_bytes(inputs["out"]), shard_bytes(other["out"])
    assert a.pop(MANIFEST) != b.pop(MANIFEST)  # inputs and layout differ, the shards do not
    assert a == b


def test_ambiguous_layout_asks_for_layout(tmp_path, capsys):
    files = {
        "images": save(tmp_path, "X.npy", np.ones((10, 3, 3, 3), np.float32)),
        "labels": save(tmp_path, "y.npy", np.zeros(10, int)),
        "out": str(tmp_path / "ds"),
    }
    assert_fails(capsys, args(files), "X.npy: shape (10, 3, 3, 3) reads as NCHW or NHWC; pass --layout", out=files["out"])
    assert main(args(files, "--layout", "NHWC")) == 0
    assert load_manifest(files["out"])["layout"] == "NHWC"


def test_float16_and_float64_inputs_and_float16_output(inputs, tmp_path):
    images = np.load(inputs["images"])
    for dtype in (np.float16, np.float64):
        files = dict(inputs, images=save(tmp_path, f"X{dtype.__name__}.npy", images.astype(dtype)),
                     out=str(tmp_path / dtype.__name__))
        assert main(args(files)) == 0
        rows = read_all(files["out"])
        assert rows["images"].dtype == np.float32
        np.testing.assert_array_equal(rows["images"], images.astype(dtype).astype(np.float32)[rows["index"]])
    half = dict(inputs, out=str(tmp_path / "half"))
    assert main(args(half, "--dtype", "float16")) == 0
    rows = read_all(half["out"])
    assert rows["images"].dtype == np.float16 and load_manifest(half["out"])["dtype"] == "float16"
    np.testing.assert_array_equal(rows["images"], images.astype(np.float16)[rows["index"]])


def test_float16_refuses_images_in_small_units_that_it_would_round_away(inputs, tmp_path, capsys):
    """Overflow was refused, underflow not: images in Jy (~1e-8) stored as float16 were mostly zeros,
    verified as good, and trained on. Unit-scale noise around zero (the test above) still passes,
    and so does faint sky noise beside a bright source (many pixels near zero, none losing detail)."""
    small = np.load(inputs["images"]) * 1e-8
    small[5] *= 1e7  # one image bright enough: the others are still refused
    files = dict(inputs, images=save(tmp_path, "Xjy.npy", small), out=str(tmp_path / "jy16"))
    assert_fails(capsys, args(files, "--dtype", "float16"), f"{files['images']}: 47 images (first: image 0) have no "
                 "pixel brighter than 0.00098, where float16 keeps too few significant bits", "--dtype float32",
                 out=files["out"])
    assert main(args(dict(files, out=str(tmp_path / "jy32")))) == 0
    with pytest.raises(DmhpcError, match="where float16 keeps too few significant bits"):
        shards.write_dataset(small, np.load(inputs["labels"]), None, tmp_path / "api", dtype="float16")
    # float64 fluxes below float32's range (W m^-2 Hz^-1 per pixel) were an all-zero data set
    tiny = dict(files, images=save(tmp_path, "Xsi.npy", np.load(inputs["images"]).astype(np.float64) * 1e-46),
                out=str(tmp_path / "si"))
    assert_fails(capsys, args(tiny), f"{tiny['images']}: 48 images (first: image 0) have no pixel brighter than "
                 "1.9e-37, where float32 keeps too few significant bits (small flux units round to 0); scale the "
                 "images up", out=tiny["out"])
    sky = np.random.default_rng(1).normal(0, 2e-3, (N, 3, 8, 8)).astype(np.float32)
    sky[:, :, 4, 4] += 1.0  # a source on faint sky: ~2% of the pixels lie below 6.1e-5 by chance
    assert np.mean(np.abs(sky) < 6.1e-5) > 0.01
    for name, images in (("Xscaled.npy", np.load(inputs["images"])), ("Xsky.npy", sky)):
        assert main(args(dict(files, images=save(tmp_path, name, images), out=str(tmp_path / name[:-4])),
                         "--dtype", "float16")) == 0


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return str(path)


TWO_DOMAINS = """
root: {root}
out: {out}
domains:
  pristine: {{images: pX.npy, labels: py.npy, objects: objects.npy}}
  noisy: {{images: nX.npy, labels: ny.npy, objects: objects.npy}}
"""


@pytest.fixture
def two_domains(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "files"
    root.mkdir()
    pristine = rng.normal(size=(N, 2, 8, 8)).astype(np.float32)
    save(root, "pX.npy", pristine)
    save(root, "nX.npy", (pristine + rng.normal(scale=0.5, size=pristine.shape)).transpose(0, 2, 3, 1))
    labels = rng.integers(0, 2, N)
    save(root, "py.npy", labels)
    save(root, "ny.npy", labels)
    save(root, "objects.npy", rng.permutation(np.arange(N) // 2))
    return root, write_config(tmp_path, TWO_DOMAINS.format(root=root, out=tmp_path / "out"))


def test_data_config_two_domains_share_the_split(two_domains, tmp_path, capsys):
    root, config = two_domains
    assert main(["prepare", "--data-config", config, "--shard-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "pristine: 48 images (NCHW)" in out and "noisy: 48 images (NHWC)" in out
    p, n = load_manifest(tmp_path / "out" / "pristine"), load_manifest(tmp_path / "out" / "noisy")
    assert split_lists(p) == split_lists(n) and p["stats"] != n["stats"]
    assert p["inputs"][2] == n["inputs"][2]  # the shared objects file
    # --root and --out override the config's.
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    argv = ["prepare", "--data-config", config, "--root", str(moved), "--out", str(tmp_path / "o2")]
    assert main(argv + ["--shard-size", "16"]) == 0
    assert load_manifest(tmp_path / "o2" / "noisy")["inputs"][0]["file"] == str((moved / "nX.npy").resolve())
    assert split_lists(load_manifest(tmp_path / "o2" / "noisy")) == split_lists(p)


def test_shipped_configs_are_valid():
    from dmhpc.data.prepare import load_data_config

    expect = {
        "embedded.yaml": ["pristine_X.npy", "noisy_X.npy"],
        "deepmerge2-simsim.yaml": ["SimSim_SOURCE_X_Illustris2_pristine.npy", "SimSim_TARGET_X_Illustris2_noisy.npy"],
        "deepmerge2-simreal.yaml": ["SimReal_SOURCE_X_Illustris0.npy", "SimReal_TARGET_X_postmergers_SDSS.npy"],
        "deepmerge1.yaml": ["SB00_augmented_3FILT.npy", "SB25_augmented_3FILT.npy"],
    }
    for name, images in expect.items():
        domains = load_data_config(ROOT / "configs" / "data" / name)
        assert [d.images.name for d in domains] == images
    embedded = load_data_config(ROOT / "configs" / "data" / "embedded.yaml")
    assert [(d.name, str(d.out)) for d in embedded] == [
        ("pristine", "data/embedded/shards/pristine"), ("noisy", "data/embedded/shards/noisy")
    ]
    assert embedded[0].objects == embedded[1].objects == Path("data/embedded/objects.npy")


@pytest.mark.parametrize(
    "text, message",
    [
        ("root: r\nout: o\ndomains: {a: {images: x, labels: y}}\nextra: 1\n", "extra: unknown key (known: root, "),
        ("root: r\ndomains: {a: {images: x, labels: y}}\n", "out: missing (required)"),
        ("root: r\nout: o\ndomains: {a: {labels: y}}\n", "domains.a.images: missing (required, or a catalog of cutouts)"),
        ("root: r\nout: o\ndomains: {a: {images: x, labels: y, ids: z}}\n", "domains.a.ids: unknown key"),
        ("root: r\nout: o\ndomains: {a: {images: 3}}\n", "domains.a.images: expected a non-empty string"),
        ("root: r\nout: o\ndomains: []\n", "domains: expected a non-empty mapping of each domain's name"),
        ("root: r\nout: o\ndomains: {a: {images: x}, a: {images: y}}\n", "invalid YAML: duplicate key \"a\""),
        # read by YAML as a number and a boolean: "a domain name is made of letters..." said nothing of that
        ("root: r\nout: o\ndomains: {2020: {images: x}}\n", "domains.2020: the name 2020 is a number to YAML: quote it"),
        ("root: r\nout: o\ndomains: {no: {images: x}}\n", "domains.False: the name false is a boolean to YAML: quote it"),
        ("root: [r\n", "invalid YAML"),
        # read from a catalog only: without one they were ignored and an unlabelled set written
        ("root: r\nout: o\ndomains: {a: {images: x, label_column: merger}}\n",
         "domains.a.label_column: read from a catalog only, and domains.a has no catalog"),
        # where the images come from, beside images: ignored, and the .npy converted instead of the cutouts
        ("root: r\nout: o\ndomains: {a: {images: x, catalog: c, cutouts: d}}\n",
         "domains.a.cutouts: names cutout files to read, and domains.a.images gives the images"),
    ],
)
def test_bad_data_config(tmp_path, capsys, text, message):
    config = write_config(tmp_path, text)
    assert_fails(capsys, ["prepare", "--data-config", config], f"{config}: {message}")


def test_every_problem_of_a_data_config_at_once(tmp_path, capsys):
    config = write_config(tmp_path, "out: o\ndomains: {a: {images: x, ids: z}}\n")
    assert main(["prepare", "--data-config", config]) == 1
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"{config}: root: missing (required)",
        f"{config}: domains.a.ids: unknown key (known: {', '.join(DOMAIN_KEYS)})"]
    # --root on the command line stands in for the file's root: what is left is the image file itself
    config = write_config(tmp_path, "out: o\ndomains: {a: {images: x.npy}}\n")
    assert main(["prepare", "--data-config", config, "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing" not in err and "x.npy" in err, err


def test_data_config_validates_every_domain_before_writing(two_domains, tmp_path, capsys):
    root, config = two_domains
    np.save(root / "ny.npy", np.zeros(N + 1, int))  # the second domain is bad
    assert_fails(capsys, ["prepare", "--data-config", config], "ny.npy: 49 labels for 48 images", out=tmp_path / "out")


def test_option_conflicts(inputs, tmp_path, capsys):
    config = write_config(tmp_path, "root: r\nout: o\ndomains: {a: {images: x, labels: y}}\n")
    assert_fails(capsys, ["prepare", "--data-config", config, "--images", inputs["images"]], "--images cannot be combined")
    assert_fails(capsys, ["prepare", "--out", inputs["out"]], "missing --images or --catalog")
    assert_fails(capsys, ["prepare", "--images", inputs["images"]], "missing --out")
    assert_fails(capsys, args(inputs, "--fractions", "0.7,0.4,0.2"), "error: --fractions 0.7,0.4,0.2: need train > 0",
                 out=inputs["out"])
    assert_fails(capsys, args(inputs, "--fractions", "a,b,c"), "error: --fractions a,b,c: expected three numbers",
                 out=inputs["out"])  # (it printed the Python list ['a', 'b', 'c'])
    assert_fails(capsys, args(inputs, "--root", "x"), "--root needs --data-config", out=inputs["out"])
    # (it named the output folder's last part: "q3: give images ...")
    (tmp_path / "survey.csv").write_text("objid\n1\n2\n")
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "survey.csv"), "--id-column", "objid", "--out",
                          str(tmp_path / "q3")],
                 f"{tmp_path / 'survey.csv'}: no file column nor cutouts folder to find its images by", out=tmp_path / "q3")
    # Catalog options without a catalog were ignored: an unlabelled data set was written.
    no_labels = dict(inputs, labels=None)
    assert_fails(capsys, args(no_labels, "--label-column", "merger"),
                 "--label-column reads a catalog only: give --catalog, or the labels with --labels", out=inputs["out"])
    assert_fails(capsys, args(no_labels, "--id-column", "objid", "--file-column", "f", "--cutouts", "c"),
                 "--id-column, --file-column, --cutouts read a catalog only: give --catalog", out=inputs["out"])
    assert_fails(capsys, args(inputs, "--catalog", "cat.csv", "--file-column", "f", "--cutouts", "c"),
                 "--file-column, --cutouts name cutout files to read, and --images gives the images: give one or "
                 "the other", out=inputs["out"])
    assert_fails(capsys, ["prepare", "--data-config", config, "--label-column", "merger"],
                 "--label-column cannot be combined with --data-config")


def test_interrupted_conversion_is_finished_by_running_again(inputs, tmp_path, monkeypatch, capsys):
    reference = dict(inputs, out=str(tmp_path / "reference"))
    assert main(args(reference)) == 0
    real = shards.write_shard

    def interrupted(plan, out_dir, number):
        if number == 2:
            (Path(out_dir) / f".{shards.shard_name(2)}.abcd1234.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(plan, out_dir, number)

    monkeypatch.setattr(shards, "write_shard", interrupted)
    assert main(args(inputs)) == 130
    assert os.listdir(inputs["out"]) == [shards.STAGING]  # written there, never moved into place
    left = set(os.listdir(Path(inputs["out"]) / shards.STAGING))
    assert MANIFEST not in left and {"shard-00000.h5", "shard-00001.h5", ".shard-00002.h5.abcd1234.tmp"} <= left
    monkeypatch.setattr(shards, "write_shard", real)
    assert main(args(inputs)) == 0  # no --overwrite needed
    assert shard_bytes(inputs["out"]) == shard_bytes(reference["out"])


def test_an_overwrite_that_fails_or_is_killed_leaves_the_old_data_set_whole(inputs, monkeypatch, capsys):
    """--overwrite removed the old data set before writing the new one: a conversion that failed
    halfway (an input unreadable, a full disk) or was killed lost both."""
    from dmhpc.data.check import verify_dataset

    assert main(args(inputs)) == 0
    out = Path(inputs["out"])
    old = shard_bytes(out)
    real_sha256 = _images_unreadable_when_checksummed(monkeypatch)  # fails after the shards are written
    assert_fails(capsys, args(inputs, "--overwrite", "--shard-size", "7"), "X.npy: cannot read (Input/output error)")
    assert shard_bytes(out) == old and verify_dataset(out) == []
    monkeypatch.setattr(shards, "file_sha256", real_sha256)

    real_write = shards.write_shard

    def killed(plan, out_dir, number):
        if number == 3:
            raise KeyboardInterrupt
        return real_write(plan, out_dir, number)

    monkeypatch.setattr(shards, "write_shard", killed)
    assert main(args(inputs, "--overwrite", "--shard-size", "7")) == 130
    capsys.readouterr()
    staged = out / shards.STAGING
    assert {"shard-00000.h5", "shard-00001.h5"} <= set(os.listdir(staged))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old and verify_dataset(out) == []
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert_fails(capsys, args(inputs, "--shard-size", "7"), "already holds a data set", "--overwrite")
    assert main(args(inputs, "--overwrite", "--shard-size", "7")) == 0
    assert shards.STAGING not in os.listdir(out) and verify_dataset(out) == []
    assert len(load_manifest(out)["shards"]) == -(-N // 7)


def test_a_staging_folder_not_dmhpcs_is_refused_and_never_emptied(inputs, tmp_path, capsys):
    """A `.dmhpc-new` that was a link to another data set had that set's shards and manifest deleted
    through it; one holding someone's file failed as "cannot prepare the output directory"."""
    other = dict(inputs, out=str(tmp_path / "other"))
    assert main(args(other)) == 0
    kept = shard_bytes(other["out"])
    out = Path(inputs["out"])
    out.mkdir()
    (out / shards.STAGING).symlink_to(other["out"])
    for extra in ([], ["--overwrite"]):
        assert_fails(capsys, args(inputs, *extra), f"{out / shards.STAGING}: not the staging folder of a conversion "
                                                   f"(a link or a file by its name)")
    assert shard_bytes(other["out"]) == kept
    (out / shards.STAGING).unlink()
    (out / shards.STAGING).mkdir()
    (out / shards.STAGING / "notes.txt").write_text("mine")
    assert_fails(capsys, args(inputs), f"{out / shards.STAGING}: holds notes.txt, not a file of a conversion")
    assert (out / shards.STAGING / "notes.txt").read_text() == "mine"
    (out / shards.STAGING / "notes.txt").unlink()
    (out / shards.STAGING / "shard-00000.h5").mkdir()  # a folder by a shard's name: not a conversion's either
    assert_fails(capsys, args(inputs), f"{out / shards.STAGING}: holds shard-00000.h5, not a file of a conversion")


def test_a_failure_in_the_moves_into_place_keeps_the_new_set(two_domains, tmp_path, monkeypatch, capsys):
    """A rename that failed while the new data sets were moved into place removed the new sets too
    (the old ones were gone already); the folders a failed start made were left behind."""
    root, config = two_domains
    out = tmp_path / "out"
    real = os.replace

    def fails_in_noisy(src, dst):
        if Path(src).parent == out / "noisy" / shards.STAGING and Path(src).name == "shard-00001.h5":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fails_in_noisy)
    assert_fails(capsys, ["prepare", "--data-config", config, "--shard-size", "16"],
                 f"{out / 'noisy'}: cannot move the new data set into place (Input/output error); what is not moved "
                 f"yet is in {out / 'noisy' / shards.STAGING}; convert again")
    assert MANIFEST in os.listdir(out / "noisy" / shards.STAGING)  # kept: a whole set to move by hand
    monkeypatch.setattr(os, "replace", real)
    # Once the new manifests are in place, a mark that cannot go is an error naming every one left
    # (readers refuse its set until it goes), the sets in place.
    real_unlink = Path.unlink

    def mark_stays(path, *rest, **named):
        if path.name == INCOMPLETE:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *rest, **named)

    monkeypatch.setattr(Path, "unlink", mark_stays)
    capsys.readouterr()
    assert_fails(capsys, ["prepare", "--data-config", config, "--shard-size", "16", "--overwrite"],
                 f"{out / 'pristine' / INCOMPLETE}: cannot remove it (Input/output error), and readers refuse the data "
                 f"set until it goes; the new data set is in place: remove the file by hand (and "
                 f"{out / 'noisy' / INCOMPLETE}: Input/output error)\n")
    assert MANIFEST in os.listdir(out / "noisy") and MANIFEST in os.listdir(out / "pristine")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert main(["prepare", "--data-config", config, "--shard-size", "16", "--overwrite"]) == 0
    assert split_lists(load_manifest(out / "pristine")) == split_lists(load_manifest(out / "noisy"))
    assert shards.STAGING not in os.listdir(out / "noisy")
    # A start that fails in the second folder: the first one, made by this conversion, goes too.
    fresh = tmp_path / "fresh"
    real_start = shards.start_dataset

    def fails_in_noisy_start(out_dir):
        if Path(out_dir).name == "noisy":
            raise DmhpcError(f"{out_dir}: cannot prepare the output directory (No space left on device)")
        return real_start(out_dir)

    monkeypatch.setattr(shards, "start_dataset", fails_in_noisy_start)
    assert_fails(capsys, ["prepare", "--data-config", config, "--out", str(fresh)], "cannot prepare the output")
    assert not (fresh / "pristine").exists() and not (fresh / "noisy").exists()


KILLED_IN_THE_MOVES = """
import os, sys
from pathlib import Path
from dmhpc.cli import main
real = os.replace
def replace(src, dst):  # the process dies as the second folder's first shard is moved (SIGKILL: no cleanup)
    if Path(src).parent.name == ".dmhpc-new" and Path(dst).parent.name == "noisy":
        os._exit(137)
    return real(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_a_conversion_killed_between_two_folders_moves_leaves_neither_readable(two_domains, tmp_path, monkeypatch,
                                                                                capsys):
    """Domains converted together share their splits. A conversion killed after the first folder's
    moves and before the second's left a new set beside an old one (or none), each read as finished:
    a seed changed with --overwrite gave a source and a target whose splits disagree, silently."""
    from dmhpc.data.check import verify_dataset

    root, config = two_domains
    out = tmp_path / "out"

    def killed(*extra):
        argv = ["prepare", "--data-config", config, "--shard-size", "16", *extra]
        done = subprocess.run([sys.executable, "-c", KILLED_IN_THE_MOVES, *argv], env=clean_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 137, done.stderr
        assert (out / "noisy" / shards.STAGING / MANIFEST).exists()  # killed in the moves, not before them
        for name in ("pristine", "noisy"):
            with pytest.raises(DmhpcError, match=f"{out / name / INCOMPLETE}: a conversion into {out / name} did "
                                                 f"not finish moving its data sets into place; run the same dmhpc "
                                                 f"prepare again"):
                load_manifest(out / name)
        return argv

    # A first conversion: running it again finishes it, without --overwrite.
    argv = killed()
    assert main(argv) == 0
    first = split_lists(load_manifest(out / "pristine"))
    assert split_lists(load_manifest(out / "noisy")) == first
    # Replacing both with another seed.
    argv = killed("--overwrite", "--seed", "5")
    assert main(["verify", str(out / "pristine")]) == 1
    assert "did not finish moving its data sets into place" in capsys.readouterr().err
    assert main(argv) == 0
    assert split_lists(load_manifest(out / "pristine")) == split_lists(load_manifest(out / "noisy")) != first
    assert verify_dataset(out / "pristine") == [] and verify_dataset(out / "noisy") == []
    assert not [p for p in out.rglob("*") if p.name in (INCOMPLETE, shards.STAGING)]
    # A mark that cannot be made (a full disk) moves nothing, takes back the marks made before it and
    # leaves nothing of the conversion.
    kept = {name: shard_bytes(out / name) for name in ("pristine", "noisy")}
    real_touch = Path.touch

    def no_room_in_noisy(path, *rest, **named):
        if path == out / "noisy" / INCOMPLETE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_touch(path, *rest, **named)

    monkeypatch.setattr(Path, "touch", no_room_in_noisy)
    assert_fails(capsys, argv, f"{out / 'noisy' / INCOMPLETE}: cannot mark the data set as being replaced (No space "
                               f"left on device)")
    assert {name: shard_bytes(out / name) for name in ("pristine", "noisy")} == kept
    assert split_lists(load_manifest(out / "pristine")) == split_lists(load_manifest(out / "noisy"))


def test_two_conversions_into_one_folder(inputs, tmp_path, monkeypatch, capsys):
    """A second prepare into a folder another one is writing stops in one line and touches nothing
    (it deleted the first one's shards, and the first then wrote a manifest of missing shards). One
    that finds, under the lock, a data set finished since its first look leaves it alone."""
    from dmhpc.data import prepare as prepare_module
    from dmhpc.files import locked_directory

    out = Path(inputs["out"])
    out.mkdir()
    (out / "shard-00000.h5").write_bytes(b"the other conversion's shard")
    (out / INCOMPLETE).touch()  # as a conversion under way marks its folder
    with locked_directory(out, "dmhpc prepare"):
        assert_fails(capsys, args(inputs), f"{out}: in use by another dmhpc prepare (pid {os.getpid()} on ",
                     "); wait for it to end")
    assert sorted(os.listdir(out)) == [INCOMPLETE, "shard-00000.h5"]
    out.joinpath("shard-00000.h5").unlink()
    out.joinpath(INCOMPLETE).unlink()

    real = prepare_module._plan_domain

    def finished_meanwhile(d, options, signatures):
        planned = real(d, options, signatures)
        (out / MANIFEST).write_text('{"format": "dmhpc-shards"}')  # the other conversion's last write
        return planned

    monkeypatch.setattr(prepare_module, "_plan_domain", finished_meanwhile)
    assert_fails(capsys, args(inputs), "already holds a data set")
    assert os.listdir(out) == [MANIFEST] and (out / MANIFEST).read_text() == '{"format": "dmhpc-shards"}'


def test_a_symlink_to_a_folder_being_written_meets_its_lock(inputs, tmp_path, capsys):
    """The lock was keyed by the spelling: through a symlink, a second conversion got a lock of its
    own and deleted the first one's shards."""
    from dmhpc.files import locked_directory

    out = Path(inputs["out"])
    out.mkdir()
    (out / "shard-00000.h5").write_bytes(b"the other conversion's shard")
    (out / INCOMPLETE).touch()
    (tmp_path / "link").symlink_to(out)
    with locked_directory(out, "dmhpc prepare"):
        assert_fails(capsys, args({**inputs, "out": str(tmp_path / "link")}), "in use by another dmhpc prepare")
    assert sorted(os.listdir(out)) == [INCOMPLETE, "shard-00000.h5"]


def test_out_dot_keeps_the_lock_beside_the_folder(inputs, monkeypatch):
    """`--out .` put its lock "..lock" inside the folder, then refused the folder as not empty."""
    out = Path(inputs["out"])
    out.mkdir()
    monkeypatch.chdir(out)
    assert main(args({**inputs, "out": "."})) == 0
    assert MANIFEST in os.listdir(out) and not [name for name in os.listdir(out) if name.endswith(".lock")]
    rows = read_all(out)
    np.testing.assert_array_equal(rows["images"], np.load(inputs["images"])[rows["index"]])


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    """It used to be an h5py traceback, then a segmentation fault (HDF5 after a failed write)."""
    rng = np.random.default_rng(0)
    files = {"images": save(tmp_path, "X.npy", rng.normal(size=(200, 3, 40, 40)).astype(np.float32)),
             "labels": save(tmp_path, "y.npy", np.arange(200) % 2),
             "out": str(small_disk(2) / "ds")}  # 3.8 MB of shards on a 2 MB disk
    proc = subprocess.run([sys.executable, "-m", "dmhpc", *args(files)], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "cannot write: No space left on device" in proc.stderr and "shard-000" in proc.stderr
    assert not Path(files["out"]).exists()  # nothing partial: no shard, no temporary file, no directory


def test_a_disk_too_full_for_the_lock_line_is_one_line_and_leaves_nothing(inputs, capsys, small_disk):
    """The holder line of the output folder's lock was the one write that raised a traceback, and
    left the empty lock file and the new output folder behind."""
    disk = small_disk(1)
    with open(disk / "filler", "wb") as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"x" * 65536)
            f.flush()
    out = disk / "ds"
    assert_fails(capsys, args({**inputs, "out": str(out)}),
                 f"{disk / '.ds.lock'}: cannot write: No space left on device (disk full or over quota)")
    assert os.listdir(disk) == ["filler"]


def _images_unreadable_when_checksummed(monkeypatch):
    """X.npy fails with EIO when its checksum is taken, after the shards are written; returns the
    real file_sha256."""
    import errno

    real = shards.file_sha256

    def images_unreadable(path, *rest, **named):
        if Path(path).name == "X.npy":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, *rest, **named)

    monkeypatch.setattr(shards, "file_sha256", images_unreadable)
    return real


def test_an_input_unreadable_while_checksummed_leaves_nothing(inputs, monkeypatch, capsys):
    """The checksums are gathered after the shards are written; a read error there left them behind."""
    _images_unreadable_when_checksummed(monkeypatch)
    assert_fails(capsys, args(inputs), "X.npy: cannot read (Input/output error)", out=inputs["out"])


def test_an_input_whose_checksum_fails_otherwise_is_one_line_and_leaves_nothing(inputs, monkeypatch, capsys):
    """Only an OSError was caught in the checksum thread: another error (a MemoryError) ended it unsaid,
    and the manifest's write failed on the missing digest in a KeyError traceback."""
    real = shards.file_sha256

    def no_memory(path, *rest, **named):
        if Path(path).name == "X.npy":
            raise MemoryError("out of memory")
        return real(path, *rest, **named)

    monkeypatch.setattr(shards, "file_sha256", no_memory)
    assert_fails(capsys, args(inputs), "X.npy: cannot checksum (MemoryError: out of memory)", out=inputs["out"])


def test_a_failure_under_the_lock_removes_the_folders_made_for_it(inputs, tmp_path, monkeypatch, capsys):
    """The lock beside the output folder made its missing parents; a conversion that failed after
    taking it (an input unreadable while checksummed) left them behind, empty."""
    real = _images_unreadable_when_checksummed(monkeypatch)
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "ds"
    assert_fails(capsys, args(dict(inputs, out=str(out))), "X.npy: cannot read (Input/output error)")
    assert os.listdir(tmp_path / "kept") == []  # made here: gone; there before: kept
    monkeypatch.setattr(shards, "file_sha256", real)
    assert main(args(dict(inputs, out=str(out)))) == 0
    assert MANIFEST in os.listdir(out)


def test_a_lock_whose_folder_another_release_removed_meanwhile_is_taken(tmp_path, monkeypatch):
    """Two prepares into sibling folders under a new parent: the first to end removed the parent it
    had made, empty, while the second was between making sure of it and opening its lock file there
    ("cannot create the folder or the lock"). The second makes it again; and a folder another
    process made is never counted as made here, so never removed at release."""
    from dmhpc import files

    parent = tmp_path / "new"
    real = files.make_folders
    calls = []

    def released_meanwhile(folder):
        made = real(folder)
        if not calls:  # the other holder's release runs now: its empty folder goes
            parent.rmdir()
        calls.append(made)
        return made

    monkeypatch.setattr(files, "make_folders", released_meanwhile)
    with files.locked_directory(parent / "b", "dmhpc prepare"):
        assert (parent / ".b.lock").is_file()
    assert len(calls) == 2 and not parent.exists()  # made again, by this process: removed at release
    monkeypatch.setattr(files, "make_folders", lambda folder: (folder.mkdir(), [])[1])  # made by another process
    with files.locked_directory(parent / "b", "dmhpc prepare"):
        pass
    assert parent.is_dir()


def test_finished_or_foreign_directory_needs_overwrite(inputs, tmp_path, capsys):
    assert main(args(inputs)) == 0
    assert_fails(capsys, args(inputs), "already holds a data set", "--overwrite")
    before = shard_bytes(inputs["out"])
    assert main(args(inputs, "--overwrite")) == 0
    assert shard_bytes(inputs["out"]) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README").write_text("x")
    assert_fails(capsys, args(dict(inputs, out=str(foreign))), f"{foreign}: exists and is not empty")
    assert os.listdir(foreign) == ["README"]


def test_a_users_file_named_like_a_temporary_is_neither_taken_nor_removed(inputs, capsys):
    """dmhpc writes its temporary files in the staging folder only; a file of that name pattern in
    the output folder itself was taken as dmhpc's and deleted, even without --overwrite."""
    out = Path(inputs["out"])
    out.mkdir()
    notes = out / ".draft.20240101.tmp"
    notes.write_text("notes")
    assert_fails(capsys, args(inputs), f"{out}: exists and is not empty (1 other files, e.g. .draft.20240101.tmp)")
    assert notes.read_text() == "notes"
    notes.unlink()
    assert main(args(inputs)) == 0
    notes.write_text("notes")
    assert main(args(inputs, "--overwrite")) == 0
    assert notes.read_text() == "notes"


def bad_case(tmp_path, case):
    """Input files with one defect; returns (files, expected message parts)."""
    rng = np.random.default_rng(2)
    images = rng.normal(size=(12, 3, 8, 8)).astype(np.float32)
    files = {"labels": save(tmp_path, "y.npy", rng.integers(0, 2, 12)), "out": str(tmp_path / "out" / "ds")}
    if case == "missing":
        return dict(files, images=str(tmp_path / "nope.npy")), ["nope.npy: no such file"]
    if case == "not-npy":
        (tmp_path / "X.npy").write_text("a,b,c\n1,2,3\n")
        return dict(files, images=str(tmp_path / "X.npy")), ["X.npy: not a .npy file"]
    if case == "npz":
        np.savez(tmp_path / "X.npz", images=images)
        return dict(files, images=str(tmp_path / "X.npz")), ["X.npz: not a .npy file"]
    if case == "dims":
        return dict(files, images=save(tmp_path, "X.npy", images[:, 0])), ["X.npy: 3 dimensions (12, 8, 8)"]
    if case == "channels":
        return dict(files, images=save(tmp_path, "X.npy", np.ones((12, 6, 8, 8), np.float32))), [
            "X.npy: shape (12, 6, 8, 8) has no channel axis of 1 to 4"
        ]
    if case == "int-images":
        return dict(files, images=save(tmp_path, "X.npy", images.astype(np.int16))), ["X.npy: dtype int16"]
    # Strings, records and images without pixels reached the pixel scan, which raised a traceback.
    if case == "str-images":
        return dict(files, images=save(tmp_path, "X.npy", images.astype(str))), ["X.npy: dtype <U"]
    if case == "structured-images":
        records = np.zeros((12, 3, 8, 8), [("flux", "f4"), ("err", "f4")])
        return dict(files, images=save(tmp_path, "X.npy", records)), ["X.npy: dtype [('flux', '<f4'), ('err', '<f4')]"]
    if case == "zero-size-images":
        return dict(files, images=save(tmp_path, "X.npy", images[:, :, :0, :0])), [
            "X.npy: empty images (shape (12, 3, 0, 0))"
        ]
    if case == "fortran":
        return dict(files, images=save(tmp_path, "XF.npy", np.asfortranarray(images))), ["XF.npy: Fortran-ordered"]
    if case == "truncated":
        path = save(tmp_path, "Xt.npy", images)
        os.truncate(path, os.path.getsize(path) // 2)
        return dict(files, images=path), ["Xt.npy: cannot read"]
    if case in ("negative-shape", "huge-shape"):  # a header edited by hand: OverflowError tracebacks
        header = np.lib.format.header_data_from_array_1_0(images)
        header["shape"] = (-12, 3, 8, 8) if case == "negative-shape" else (12, 3, 8, 10 ** 20)
        with open(tmp_path / "Xh.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(images.tobytes())
        return dict(files, images=str(tmp_path / "Xh.npy")), ["Xh.npy: cannot read"]
    if case == "joined":  # numpy reads the first array of the two and ignores the rest: 12 of 24 rows
        path = save(tmp_path, "Xj.npy", images)
        Path(path).write_bytes(Path(path).read_bytes() * 2)
        labels = save(tmp_path, "yj.npy", np.zeros(12, int))
        Path(labels).write_bytes(Path(labels).read_bytes() * 2)
        return dict(files, images=path, labels=labels), [
            f"Xj.npy: {os.path.getsize(path) // 2} bytes after the (12, 3, 8, 8) array its header describes (files "
            "joined with cat"]
    files["images"] = save(tmp_path, "X.npy", images)
    if case == "label-count":
        return dict(files, labels=save(tmp_path, "y10.npy", np.zeros(10, int))), ["y10.npy: 10 labels for 12 images"]
    if case == "label-range":
        labels = np.zeros(12, int)
        labels[[4, 9]] = [2, -1]
        return dict(files, labels=save(tmp_path, "y2.npy", labels)), ["y2.npy: 2 labels outside {0, 1} (first at index 4: 2)"]
    if case == "label-fraction":
        return dict(files, labels=save(tmp_path, "yf.npy", np.full(12, 0.5))), ["yf.npy: 12 labels are not whole numbers"]
    if case == "nan":
        images[5, 1, 2, 2] = np.nan
        images[9, 0, 0, 0] = np.nan
        return dict(files, images=save(tmp_path, "Xn.npy", images)), [
            "Xn.npy: 2 NaN or Inf pixels (first in image 5) (survey cutouts padded with NaN: --nan-fill 0)"]
    if case == "inf":
        images[7, 2, 0, 1] = -np.inf
        # No --nan-fill hint: it was given for Inf pixels too, and following it failed again.
        return dict(files, images=save(tmp_path, "Xi.npy", images)), ["Xi.npy: 1 NaN or Inf pixels (first in image 7)\n"]
    if case == "empty":
        return dict(files, images=save(tmp_path, "X0.npy", images[:0]), labels=save(tmp_path, "y0.npy", np.zeros(0, int))), [
            "X0.npy: no images"
        ]
    if case == "object-huge":  # distinct ids past int64 were cast to one object, with numpy's warning only
        ids = np.where(np.arange(12) % 2, 1e19, 1.5e19)
        return dict(files, objects=save(tmp_path, "oh.npy", ids)), [
            "oh.npy: 12 object ids do not fit a 64-bit integer (first at index 0: 1.5e+19)"]
    if case == "label-float16-inf":  # (compared with 2**63, which is inf as a float16: numpy's overflow warning)
        labels = np.zeros(12, np.float16)
        labels[3] = np.inf
        return dict(files, labels=save(tmp_path, "yh.npy", labels)), [
            "yh.npy: 1 labels do not fit a 64-bit integer (first at index 3: inf)"]
    if case == "object-huge-unsigned":
        ids = np.arange(12, dtype=np.uint64) + np.uint64(2 ** 63 - 6)
        return dict(files, objects=save(tmp_path, "ou.npy", ids)), [
            "ou.npy: 6 object ids do not fit a 64-bit integer (first at index 6: 9223372036854775808)"]
    if case == "object-count":
        return dict(files, objects=save(tmp_path, "o.npy", np.arange(11))), ["o.npy: 11 object ids for 12 images"]
    if case == "out-not-empty":
        Path(files["out"]).mkdir(parents=True)
        (Path(files["out"]) / "data.csv").write_text("x")
        return files, [f"{files['out']}: exists and is not empty"]
    raise AssertionError(case)


BAD_CASES = [
    "missing", "not-npy", "npz", "fortran", "truncated", "negative-shape", "huge-shape", "joined", "dims", "channels",
    "int-images", "str-images",
    "structured-images", "zero-size-images", "label-count", "label-range",
    "label-fraction", "nan", "inf", "empty", "object-huge", "label-float16-inf", "object-huge-unsigned", "object-count",
    "out-not-empty",
]


@pytest.mark.filterwarnings("error")  # one line, and no warning beside it
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_error_and_nothing_written(tmp_path, capsys, case):
    files, parts = bad_case(tmp_path, case)
    assert_fails(capsys, args(files), *parts)
    out = Path(files["out"])
    if case == "out-not-empty":
        assert os.listdir(out) == ["data.csv"]
    else:
        assert not out.parent.exists()


def test_bad_input_in_a_real_process(tmp_path):
    files, parts = bad_case(tmp_path, "label-count")
    run = subprocess.run([sys.executable, "-m", "dmhpc", *args(files)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr == f"dmhpc prepare: error: {files['labels']}: 10 labels for 12 images\n"
    assert not Path(files["out"]).parent.exists()


def find_mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec beside python or on PATH")


def mpi_prepare(*argv, timeout=120):
    command = [find_mpiexec(), "-n", "2", sys.executable, "-m", "dmhpc", "prepare", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.mpi
@needs_mpi
def test_mpi_conversion_is_byte_identical_to_serial(two_domains, tmp_path):
    _, config = two_domains
    assert main(["prepare", "--data-config", config, "--shard-size", "7", "--out", str(tmp_path / "serial")]) == 0
    run = mpi_prepare("--data-config", config, "--shard-size", "7", "--out", str(tmp_path / "mpi"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("images") == 2  # rank 0 reports, once per domain
    for domain in ("pristine", "noisy"):
        serial, parallel = shard_bytes(tmp_path / "serial" / domain), shard_bytes(tmp_path / "mpi" / domain)
        assert len(serial) == 8 and serial == parallel  # 7 shards (shared by 2 ranks) and the manifest


@pytest.mark.mpi
@needs_mpi
def test_mpi_bad_input_fails_promptly_on_every_rank(tmp_path):
    files, parts = bad_case(tmp_path, "nan")  # one NaN in each rank's half of the images
    run = mpi_prepare(*args(files)[1:], timeout=60)
    assert run.returncode != 0
    assert run.stderr.count("error:") == 1 and parts[0] in run.stderr, run.stderr
    assert not Path(files["out"]).parent.exists()


@pytest.mark.mpi
@needs_mpi
def test_ranks_that_do_not_see_one_output_folder_are_refused_before_writing(inputs, tmp_path):
    """Ranks on nodes without a shared file system (--out on node-local scratch) each wrote their
    shards into their own folder, and rank 0 published its half as the data set, exit 0. Here the
    ranks run in two working directories, --out relative: each sees its own `ds`."""
    seen = {rank: tmp_path / f"node{rank}" for rank in (0, 1)}
    for where in seen.values():
        where.mkdir()
    rest = args({**inputs, "out": "ds"})[1:]
    command = [find_mpiexec(), *[part for rank in (0, 1) for part in (
        *([":"] if rank else []), "-n", "1", "-wdir", str(seen[rank]), sys.executable, "-m", "dmhpc", "prepare",
        *rest)]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.count("error:") == 1, run.stderr
    assert "error: ds: rank 1 (on " in run.stderr and ") does not see the output folder rank 0 made" in run.stderr
    assert "one shared file system" in run.stderr
    assert not (seen[0] / "ds").exists()  # rank 0's folder, made by this conversion, is gone again
    assert not list(seen[1].rglob("*")), list(seen[1].rglob("*"))  # rank 1 wrote nothing


SKEWED_OPEN = """
import os, sys
from mpi4py import MPI
from dmhpc.data import prepare

real, comm = prepare._open_domain, MPI.COMM_WORLD

def skewed(spec, options, main):
    # Rank 1 opens the images first; rank 0, the one that checksums them, after a render wrote them
    # again (ranks start seconds apart under srun, importing from a shared file system).
    if comm.Get_rank() == 0:
        comm.barrier()
        os.replace(sys.argv[1], spec.images)
        return real(spec, options, main)
    opened = real(spec, options, main)
    comm.barrier()
    return opened

prepare._open_domain = skewed
from dmhpc.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.mpi
@needs_mpi
def test_ranks_that_opened_two_versions_of_an_input_are_refused(inputs, tmp_path):
    """A file replaced between two ranks' opens was converted half from each version: the rank that
    checksums it checked it against the version it had opened itself, the new one, and the data set
    passed `dmhpc verify` with half its shards of each."""
    driver = tmp_path / "skewed.py"
    driver.write_text(SKEWED_OPEN)
    again = save(tmp_path, "X2.npy", np.load(inputs["images"]) + 100)
    os.utime(again, ns=(10**18, 10**18))  # (written again: another time than the first, whatever the clock's grain)
    run = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, str(driver), again, *args(inputs)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0, run.stdout + run.stderr
    assert run.stderr.count("error:") == 1 and (
        f"dmhpc prepare: error: {Path(inputs['images']).resolve()}: written again or replaced while the ranks opened "
        f"it (rank 1 read another version than rank 0); nothing written") in run.stderr, run.stderr
    assert not Path(inputs["out"]).exists()


SLOW_OPEN = """
import sys, time
from dmhpc.data import prepare

def slow(spec, options, main):
    print("opening", flush=True)
    time.sleep(120)

prepare._open_domain = slow
from dmhpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.mpi
@needs_mpi
def test_ctrl_c_under_mpiexec_is_one_line(inputs, tmp_path):
    """Ctrl-C reaches every rank: each printed a KeyboardInterrupt traceback."""
    driver = tmp_path / "slow.py"
    driver.write_text(SLOW_OPEN)
    from tests.conftest import interrupted_once_said

    code, err = interrupted_once_said([find_mpiexec(), "-n", "2", sys.executable, str(driver), *args(inputs)],
                                      "opening", cwd=ROOT)
    assert code == 130 and "Traceback" not in err and err.count("dmhpc prepare: interrupted\n") == 1, (code, err)


def test_a_negative_seed_is_one_line(inputs, capsys):
    assert_fails(capsys, args(inputs, "--seed", "-1"), "seed -1: expected an integer >= 0", out=inputs["out"])


@pytest.mark.mpi
@needs_mpi
def test_a_negative_seed_is_one_line_under_mpi(inputs):
    run = mpi_prepare(*args(inputs, "--seed", "-1")[1:], timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr == "dmhpc prepare: error: seed -1: expected an integer >= 0\n"
    assert not Path(inputs["out"]).exists()


def test_num_classes(tmp_path, capsys):
    rng = np.random.default_rng(3)
    files = {
        "images": save(tmp_path, "X.npy", rng.normal(size=(30, 1, 4, 4)).astype(np.float32)),
        "labels": save(tmp_path, "y3.npy", np.arange(30) % 3),
        "out": str(tmp_path / "ds"),
    }
    assert_fails(capsys, args(files), "y3.npy: 10 labels outside {0, 1} (first at index 2: 2)", out=files["out"])
    assert main(args(files, "--num-classes", "3")) == 0
    m = load_manifest(files["out"])
    assert m["num_classes"] == 3 and sum(m["counts"]["train"].values()) == 21
    assert list(m["counts"]["test"]) == ["0", "1", "2"]
    # One count per class and split in the manifest: a huge K was a memory error and a folder left behind.
    for bad in ("1", "1000000000000"):
        assert_fails(capsys, args(dict(files, out=str(tmp_path / "k")), "--num-classes", bad),
                     f"number of classes {bad}: expected 2 to 1000", out=str(tmp_path / "k"))


# --- survey inputs: unlabelled sets, FITS, catalogs, duplicates, data-config spelling -------------

def test_without_labels_the_data_set_is_unlabelled(inputs, capsys):
    unlabelled = dict(inputs, labels=None)
    assert main(args(unlabelled)) == 0
    assert "unlabelled" in capsys.readouterr().out
    manifest = load_manifest(inputs["out"])
    assert manifest["labelled"] is False and manifest["counts"] == {"train": {}, "val": {}, "test": {}}
    assert set(read_all(inputs["out"])["labels"]) == {-1}
    # splits are still drawn by object: the 4 copies of an object share a split
    objects = read_all(inputs["out"])["objects"]
    splits = {s: set(objects[a:b]) for s, (a, b) in manifest["rows"].items()}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert main(["verify", inputs["out"]]) == 0
    assert main(["info", inputs["out"]]) == 0
    assert "unlabelled" in capsys.readouterr().out


def fits_cube(path: Path, images: np.ndarray) -> str:
    from astropy.io import fits

    fits.PrimaryHDU().writeto(path)  # an empty primary HDU, as many survey tools write
    fits.append(path, images.astype(">f4"))  # FITS is big-endian
    return str(path)


def test_a_fits_cube_converts_like_the_same_npy(inputs, tmp_path):
    images = np.load(inputs["images"])
    fits_files = dict(inputs, images=fits_cube(tmp_path / "cube.fits", images), out=str(tmp_path / "from-fits"))
    assert main(args(fits_files)) == 0
    assert main(args(inputs)) == 0
    a, b = read_all(fits_files["out"]), read_all(inputs["out"])
    for key in ("images", "labels", "objects", "index"):
        np.testing.assert_array_equal(a[key], b[key])


def test_a_one_filter_fits_cube_is_read_as_one_channel(tmp_path):
    """(N, H, W): one filter. Read by position, its rows were indexed with a new axis the reader
    did not take (a TypeError traceback)."""
    from dmhpc.data.inputs import open_images

    images = np.random.default_rng(0).normal(size=(10, 20, 20)).astype(np.float32)
    rows = open_images(fits_cube(tmp_path / "cube3.fits", images))
    assert rows.shape == (10, 1, 20, 20)
    np.testing.assert_array_equal(rows[np.array([0, 3, 9])], images[[0, 3, 9], None])


def test_a_fits_file_without_an_image_is_refused_and_closed(tmp_path):
    """The refusal left the file open: a long-lived process (a tuner, a notebook) kept it and its
    memory map until the exception's traceback went."""
    from astropy.io import fits

    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("id", "K", array=[1, 2])])]).writeto(path)
    with pytest.raises(DmhpcError, match=f"{path}: no image HDU with data") as refused:
        open_fits_cube(path)
    fds = Path("/proc/self/fd")
    still_open = [fd for fd in fds.iterdir() if os.path.realpath(fd) == str(path)]
    assert still_open == [], refused.value


@pytest.mark.parametrize("layout", [None, "NHWC"])
@pytest.mark.parametrize("source", ["cube", "cutouts"])
def test_fits_images_in_hwc_convert_like_the_same_npy(tmp_path, capsys, source, layout):
    """FITS took no --layout nor its checks: HWC 12x12x3 images were stored as 12 channels of 12x3."""
    from astropy.io import fits

    images = np.random.default_rng(6).normal(size=(10, 3, 12, 12)).astype(np.float32)
    hwc = images.transpose(0, 2, 3, 1)
    if source == "cube":
        where = ["--images", fits_cube(tmp_path / "cube.fits", hwc)]
    else:
        for i, image in enumerate(hwc):
            fits.PrimaryHDU(image).writeto(tmp_path / f"g{i}.fits")
        (tmp_path / "c.csv").write_text("id\n" + "".join(f"g{i}\n" for i in range(10)))
        where = ["--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path)]
    given = ["--layout", layout] if layout else []
    out = tmp_path / "ds"
    assert main(["prepare", *where, *given, "--out", str(out)]) == 0
    assert "10 images (NHWC, unlabelled)" in capsys.readouterr().out
    rows = read_all(out)
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])
    assert load_manifest(out)["layout"] == "NHWC"
    first = tmp_path / ("cube.fits" if source == "cube" else "g0.fits")
    assert_fails(capsys, ["prepare", *where, "--layout", "NCHW", "--out", str(tmp_path / "o")],
                 f"{first}: 12 channels in layout NCHW", out=tmp_path / "o")


@pytest.mark.parametrize("source", ["cube", "cutouts", "npy"])
def test_non_square_images_take_the_one_reading_with_a_channel_axis(tmp_path, capsys, source):
    """Layout detection asked for square images: (N, 3, 16, 20) was refused ("pass --layout"), though
    only NCHW gives it 1 to 4 channels, and FITS cubes and cutouts of that shape had converted."""
    from astropy.io import fits

    images = np.random.default_rng(8).normal(size=(6, 3, 16, 20)).astype(np.float32)
    if source == "cube":
        where = ["--images", fits_cube(tmp_path / "cube.fits", images)]
    elif source == "npy":
        where = ["--images", save(tmp_path, "X.npy", images.transpose(0, 2, 3, 1).copy())]
    else:
        for i, image in enumerate(images):
            fits.PrimaryHDU(image).writeto(tmp_path / f"g{i}.fits")
        (tmp_path / "c.csv").write_text("id\n" + "".join(f"g{i}\n" for i in range(6)))
        where = ["--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path)]
    assert main(["prepare", *where, "--out", str(tmp_path / "ds")]) == 0
    assert f"6 images ({'NHWC' if source == 'npy' else 'NCHW'}, unlabelled)" in capsys.readouterr().out
    rows = read_all(tmp_path / "ds")
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])


@pytest.mark.parametrize("one_filter", [False, True])
def test_a_scaled_integer_fits_cube_converts_to_its_scaled_values(tmp_path, one_filter):
    """A cube of 16-bit integers with BSCALE/BZERO (a common survey format) was refused as "not a
    readable FITS file ... Set memmap=False", which no user can do."""
    from astropy.io import fits

    rng = np.random.default_rng(1)
    raw = rng.integers(-30000, 30000, (2000, 1 if one_filter else 3, 8, 8)).astype(np.int16)
    hdu = fits.PrimaryHDU(raw[:, 0] if one_filter else raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 0.001, 5.0
    hdu.writeto(tmp_path / "scaled.fits")
    files = {"images": str(tmp_path / "scaled.fits"), "labels": save(tmp_path, "y.npy", np.arange(2000) % 2),
             "out": str(tmp_path / "ds")}
    # Shards of 10 rows: the writer threads read the one file at once (unlocked, they mixed up rows).
    assert main(args(files, "--shard-size", "10")) == 0
    got = read_all(files["out"])
    expected = (raw.astype(np.float32) * np.float32(0.001) + np.float32(5.0))[got["index"]]
    np.testing.assert_allclose(got["images"], expected, rtol=1e-6)
    # Cut short (a copy that stopped): one line at opening, as an unscaled cube, not a traceback later.
    data = (tmp_path / "scaled.fits").read_bytes()
    (tmp_path / "cut.fits").write_bytes(data[:len(data) // 2])
    with pytest.raises(DmhpcError, match="cut.fits: not a readable FITS file"):
        open_images(tmp_path / "cut.fits")


def test_a_scaled_float_fits_cube_is_read_at_its_scaled_values(tmp_path):
    """A float cube with BSCALE/BZERO (calibrated to other units) was refused as "not a readable FITS
    file ... Set memmap=False" (astropy maps no scaled data), though its cutouts were read."""
    from astropy.io import fits

    raw = np.random.default_rng(2).normal(size=(6, 3, 8, 8)).astype(np.float32)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 2.0, 1.0
    hdu.writeto(tmp_path / "scaled.fits")
    rows = open_images(tmp_path / "scaled.fits")[np.arange(6)]
    np.testing.assert_allclose(rows, raw * np.float32(2) + np.float32(1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.complex64, np.int16, [("a", "f4"), ("b", "f4")]])
def test_images_of_no_real_float_dtype_are_refused_at_opening(tmp_path, dtype):
    """predict read complex images as their real part (numpy's warning only), integers as they were,
    and a structured array ended in a TypeError traceback; prepare refused them only after opening."""
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), dtype))
    with pytest.raises(DmhpcError, match=r"x.npy: dtype .*; expected float16, float32 or float64$"):
        open_images(tmp_path / "x.npy")


def test_a_compressed_cube_is_named_as_such(tmp_path):
    """A gzipped cube named .fits was decompressed whole into memory (on every rank) by astropy; named
    .fits.gz it was refused: refused alike now."""
    import gzip

    (tmp_path / "cube.fits.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(DmhpcError, match=r"cube.fits.gz: not a .npy file or a FITS cube \(.fits, .fit, .fts, .fz; a "
                                         r"gzipped one decompressed\)"):
        open_images(tmp_path / "cube.fits.gz")
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((4, 3, 8, 8), np.float32)).writeto(tmp_path / "plain.fits")
    (tmp_path / "gzipped.fits").write_bytes(gzip.compress((tmp_path / "plain.fits").read_bytes()))
    with pytest.raises(DmhpcError, match=r"gzipped.fits: a compressed file \(gzip\); decompress it first$"):
        open_images(tmp_path / "gzipped.fits")


def test_a_tile_compressed_cube_is_read_by_rows(tmp_path):
    """A tile-compressed cube (CompImageHDU) was decompressed whole when opened, on every rank; its
    section decompresses the tiles of the rows read."""
    from astropy.io import fits

    from dmhpc.data.inputs import _SectionRows

    raw = np.random.default_rng(3).normal(size=(40, 3, 8, 8)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(raw, compression_type="RICE_1")]).writeto(tmp_path / "c.fz")
    with fits.open(tmp_path / "c.fz") as hdul:
        whole = hdul[1].data.copy()  # astropy's own decompression (lossy for floats: quantized)
    rows = open_images(tmp_path / "c.fz")  # fpack's name for it
    assert isinstance(rows.array, _SectionRows) and rows.shape == (40, 3, 8, 8)
    np.testing.assert_array_equal(rows[np.array([3, 4, 5, 30])], whole[[3, 4, 5, 30]])
    # Indexed as an array is: rows from the end, and none past it (a section gave nothing, or one
    # row for two, without a word).
    np.testing.assert_array_equal(rows.array[[-1, -2]], whole[[-1, -2]][:, :])
    with pytest.raises(IndexError):
        rows.array[[39, 40]]
    # A damaged tile: astropy's decompressor raises its own exception, which was a traceback.
    damaged = bytearray((tmp_path / "c.fz").read_bytes())
    end = len(damaged) - 2880
    damaged[end - 3000:end - 2000] = bytes(b ^ 0xFF for b in damaged[end - 3000:end - 2000])
    (tmp_path / "bad.fz").write_bytes(damaged)
    with pytest.raises(DmhpcError, match=rf"^{tmp_path / 'bad.fz'}: cannot read images 0 to 39 \("):
        open_images(tmp_path / "bad.fz")[:]


def reads_fail_while_writing(monkeypatch, owner, name: str, error: Exception, from_row: int = 0) -> None:
    """`owner.name(self, index)` raises `error` once the shards are being written (after the pixel
    scan), for reads reaching row `from_row`."""
    read, write, writing = getattr(owner, name), shards.write_shard, threading.Event()

    def failing(self, index):
        if writing.is_set() and (not from_row or np.max(index) >= from_row):
            raise error
        return read(self, index)

    def write_shard(*task):
        writing.set()
        return write(*task)

    monkeypatch.setattr(owner, name, failing)
    monkeypatch.setattr(shards, "write_shard", write_shard)


def cutouts(tmp_path: Path, images: np.ndarray, per_filter: bool) -> list[str]:
    """One FITS file per object: one (C, H, W) HDU, or one (H, W) HDU per filter."""
    from astropy.io import fits

    folder = tmp_path / "cutouts"
    folder.mkdir()
    names = []
    for i, image in enumerate(images):
        name = f"J{1000 + i:05d}.fits"
        if per_filter:
            fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(band, name=f) for band, f in zip(image, "gri")]).writeto(
                folder / name)
        else:
            fits.PrimaryHDU(image).writeto(folder / name)
        names.append(name)
    return names


@pytest.mark.parametrize("table_format, per_filter", [("csv", True), ("fits", False), ("ecsv", True)])
def test_a_catalog_of_cutouts(tmp_path, capsys, table_format, per_filter):
    from astropy.table import Table

    rng = np.random.default_rng(4)
    images = rng.normal(size=(20, 3, 8, 8)).astype(np.float32)
    names = cutouts(tmp_path, images, per_filter)
    ids = [n[:-5] for n in names]
    table = Table({"objid": ids, "merger": np.arange(20) % 2, "path": [f"cutouts/{n}" for n in names]})
    catalog = tmp_path / f"catalog.{table_format}"
    table.write(catalog)
    out = tmp_path / "ds"
    assert main(["prepare", "--catalog", str(catalog), "--id-column", "objid", "--label-column", "merger",
                 "--file-column", "path", "--out", str(out), "--shard-size", "8"]) == 0
    rows = read_all(out)
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])
    np.testing.assert_array_equal(rows["labels"], (np.arange(20) % 2)[rows["index"]])
    with RowReader(out) as reader:
        assert reader.read_ids(0, 20) == [ids[i] for i in rows["index"]]
    manifest = load_manifest(out)
    assert manifest["ids"] is True and [i["role"] for i in manifest["inputs"]] == ["catalog", "cutouts"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # the cutouts entry has a count and no sha256
    assert f"cutouts {tmp_path / 'cutouts'}\n          20 files" in capsys.readouterr().out
    # Cutouts in two folders: each is recorded, with its count (the first alone was, with all 20).
    (tmp_path / "more").mkdir()
    for name in names[12:]:
        (tmp_path / "cutouts" / name).rename(tmp_path / "more" / name)
    table["path"] = [f"{'cutouts' if k < 12 else 'more'}/{n}" for k, n in enumerate(names)]
    table.write(catalog, overwrite=True)
    assert main(["prepare", "--catalog", str(catalog), "--id-column", "objid", "--label-column", "merger",
                 "--file-column", "path", "--out", str(tmp_path / "two"), "--shard-size", "8"]) == 0
    assert [(i["role"], i["file"], i.get("count")) for i in load_manifest(tmp_path / "two")["inputs"][1:]] == [
        ("cutouts", str(tmp_path / "cutouts"), 12), ("cutouts", str(tmp_path / "more"), 8)]
    for name in names[12:]:
        (tmp_path / "more" / name).rename(tmp_path / "cutouts" / name)
    table["path"] = [f"cutouts/{n}" for n in names]
    # without a file column, ID.fits in --cutouts; without a label column, unlabelled
    Table({"objid": ids}).write(tmp_path / "ids.csv")
    assert main(["prepare", "--catalog", str(tmp_path / "ids.csv"), "--id-column", "objid", "--cutouts",
                 str(tmp_path / "cutouts"), "--out", str(tmp_path / "unlabelled")]) == 0
    assert load_manifest(tmp_path / "unlabelled")["labelled"] is False


@pytest.mark.parametrize("file_column, bom", [(None, False), ("file", False), (None, True)])
def test_catalog_ids_keep_their_leading_zeros(tmp_path, capsys, file_column, bom):
    """astropy guessed the CSV's ids were numbers: 007 looked for 7.fits, or was stored as "7".
    A spreadsheet's "CSV UTF-8" (a byte-order mark first) named its id column "\ufeffid"."""
    from astropy.io import fits

    images = np.random.default_rng(8).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ids = ["007", "0123"]
    for i, image in zip(ids, images):
        fits.PrimaryHDU(image).writeto(tmp_path / f"{i}.fits")
    (tmp_path / "c.csv").write_text(("\ufeff" if bom else "") + "id,file\n" + "".join(f"{i},{i}.fits\n" for i in ids),
                                    encoding="utf-8")
    out = tmp_path / "ds"
    where = ["--file-column", file_column] if file_column else ["--cutouts", str(tmp_path)]
    assert main(["prepare", "--catalog", str(tmp_path / "c.csv"), *where, "--out", str(out),
                 "--fractions", "0.5,0,0.5"]) == 0
    rows = read_all(out)
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])
    with RowReader(out) as reader:
        assert reader.read_ids(0, 2) == [ids[i] for i in rows["index"]]


def test_ids_of_a_shard_damaged_under_an_open_reader_are_one_line(tmp_path, capsys):
    """The ids are read as the rows are (a prediction's catalog): a shard whose ids went after the
    start's checks, or a group in their place, is one line naming the shard, not h5py's traceback."""
    import h5py
    from astropy.io import fits

    for i, image in zip(("007", "0123"), np.random.default_rng(8).normal(size=(2, 3, 8, 8)).astype(np.float32)):
        fits.PrimaryHDU(image).writeto(tmp_path / f"{i}.fits")
    (tmp_path / "c.csv").write_text("id\n007\n0123\n")
    out = tmp_path / "ds"
    assert main(["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path), "--out", str(out),
                 "--fractions", "0.5,0,0.5", "--shard-size", "1"]) == 0
    path = out / shards.shard_name(1)
    with RowReader(out) as reader:
        reader.read_ids(0, 1)  # the first shard opened, the second not yet
        with h5py.File(path, "a") as f:
            f.move("ids", "moved")
        with pytest.raises(DmhpcError, match=rf"^{path}: cannot read rows 0 to 0: Unable to .*'ids' doesn't exist"):
            reader.read_ids(0, 2)
        reader.close()
        with h5py.File(path, "a") as f:
            f.create_group("ids")
        with pytest.raises(DmhpcError, match=rf"^{path}: cannot read rows 0 to 0: Accessing a group is done with"):
            reader.read_ids(1, 2)


def test_catalog_problems_are_one_line(tmp_path, capsys):
    from astropy.table import Table

    images = np.zeros((4, 3, 8, 8), np.float32)
    names = cutouts(tmp_path, images, per_filter=False)
    Table({"id": [n[:-5] for n in names], "file": [f"cutouts/{n}" for n in names]}).write(tmp_path / "c.csv")
    base = ["prepare", "--catalog", str(tmp_path / "c.csv"), "--file-column", "file", "--out", str(tmp_path / "o")]
    assert_fails(capsys, [*base, "--label-column", "class"], "c.csv: no label column 'class' (columns: id, file)")
    assert_fails(capsys, [*base, "--id-column", "name"], "no id column 'name'")
    (tmp_path / "cutouts" / names[2]).unlink()
    where = lambda k: f"(row {k + 1} of {tmp_path / 'c.csv'}, id {names[k][:-5]})"  # noqa: E731
    assert_fails(capsys, base, f"{names[2]}: no such cutout file {where(2)}")
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((3, 9, 9), np.float32)).writeto(tmp_path / "cutouts" / names[2])
    assert_fails(capsys, base, f"{names[2]}: cutout of shape (3, 9, 9); the first one ({names[0]}) is (3, 8, 8) "
                               f"{where(2)}")
    # The first cutout, read for the shape of all: its row and id were not said.
    (tmp_path / "cutouts" / names[0]).unlink()
    assert_fails(capsys, base, f"{names[0]}: no such cutout file {where(0)}")


@pytest.mark.parametrize("ext", ["csv", "ecsv", "parquet", "fits", "h5"])
def test_a_survey_catalog_is_read_for_its_columns_only_and_a_misspelt_one_is_named_with_every_column(tmp_path, ext):
    """A survey's catalog has many columns (hundreds; here a time and a flux with its unit): only
    the ones asked for are read. Reading ECSV by name failed on its time column; Parquet refused
    a misspelt name in its own words, not with the catalog's columns."""
    import astropy.units as u
    from astropy.table import QTable, Table
    from astropy.time import Time

    from dmhpc.data.inputs import read_catalog

    table = QTable({"id": ["a", "b"], "label": [0, 1], "mjd": Time([59000.0, 59001.0], format="mjd"),
                    "flux": [1.0, 2.0] * u.Jy})
    path = tmp_path / f"survey.{ext}"
    (Table(table) if ext == "csv" else table).write(path, **({"serialize_meta": True} if ext == "h5" else {}))
    catalog = read_catalog(path, label_column="label")
    assert catalog.ids == ["a", "b"] and list(catalog.labels) == [0, 1]
    # An empty float label (NaN; FITS read paged in does not mask it) is an empty label in every format.
    table["label"] = [0.0, np.nan]
    empty = tmp_path / f"empty.{ext}"
    (Table(table) if ext == "csv" else table).write(empty, **({"serialize_meta": True} if ext == "h5" else {}))
    with pytest.raises(DmhpcError, match=rf"empty.{ext}: column 'label' has empty labels$"):
        read_catalog(empty, label_column="label")
    for option, role in (({"id_column": "ID"}, "id column 'ID'"), ({"label_column": "lab"}, "label column 'lab'")):
        with pytest.raises(DmhpcError, match=rf"survey.{ext}: no {role} \(columns: id, label, mjd, flux\)$"):
            read_catalog(path, **option)


def test_an_hdf5_catalog_is_read_for_its_columns_only_and_its_masked_cells_are_empty(tmp_path, monkeypatch):
    """astropy reads an HDF5 table whole, every column of every row on every rank; and without the
    table's metadata it reads a masked column's cells as numbers beside a column of its mask."""
    from astropy.table import MaskedColumn, Table

    from dmhpc.data.inputs import read_catalog

    table = Table({"id": [7, 8, 9], "label": [0, 1, 0], "flux": [1.0, 2.0, 3.0]})
    table.write(tmp_path / "plain.h5", path="catalog")
    Table({"id": [1]}).write(tmp_path / "two.h5", path="first")
    table.write(tmp_path / "two.h5", path="second", append=True)
    table["id"] = MaskedColumn([7, 8, 9], mask=[False, True, False])
    with pytest.warns(UserWarning, match="serialize_meta=True"):  # the mask is a column of its own
        table.write(tmp_path / "masked.h5", path="catalog")
    read = Table.read

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(Table, "read", whole)
    catalog = read_catalog(tmp_path / "plain.h5", label_column="label")
    assert catalog.ids == ["7", "8", "9"] and list(catalog.labels) == [0, 1, 0] and catalog.id_dtype == "i8"
    with pytest.raises(DmhpcError, match=r"masked.h5: column 'id' has 1 empty id cell\(s\), the first in row 2$"):
        read_catalog(tmp_path / "masked.h5")
    # One column in two roles (ids that are the file names): h5py's "field occurs more than once"
    # was a traceback, where every other format read it.
    Table({"name": ["a.fits", "b.fits"]}).write(tmp_path / "names.h5", path="catalog")
    catalog = read_catalog(tmp_path / "names.h5", id_column="name", file_column="name", cutouts=tmp_path)
    assert catalog.ids == ["a.fits", "b.fits"] and catalog.files[1] == tmp_path / "b.fits"
    # Two tables: astropy read the first, with a warning that named no file (FITS was refused).
    monkeypatch.setattr(Table, "read", read)
    with pytest.raises(DmhpcError, match=r"two.h5: holds 2 tables \(/first, /second\); keep the catalog's in a file"):
        read_catalog(tmp_path / "two.h5")


def test_a_cutout_gone_before_its_shard_is_written_is_named_and_nothing_is_left(tmp_path, capsys, monkeypatch):
    """A cutout removed after the pixel scan was said as the shard's write error ("shard-00000.h5:
    cannot write: No such file or directory; nothing written"): the user was sent to the output disk."""
    from astropy.table import Table

    names = cutouts(tmp_path, np.random.default_rng(5).normal(size=(20, 3, 8, 8)).astype(np.float32), per_filter=False)
    Table({"id": [n[:-5] for n in names], "file": [f"cutouts/{n}" for n in names]}).write(tmp_path / "c.csv")
    gone = tmp_path / "cutouts" / names[7]
    real = shards.write_shard

    def removed_first(*task):
        gone.unlink(missing_ok=True)
        return real(*task)

    monkeypatch.setattr(shards, "write_shard", removed_first)
    err = assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--file-column", "file",
                                "--out", str(tmp_path / "ds"), "--shard-size", "8"], f"{gone}: no such cutout file")
    assert "cannot write" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "cutouts"]  # no shard, no temporary file, no folder, no lock


def test_an_input_the_disk_fails_to_read_while_writing_is_named(tmp_path, capsys, monkeypatch):
    """An I/O error reading a scaled cube's rows (read from the file as each shard is written) was said
    as the shard's write error: the user was sent to the output disk."""
    from astropy.io import fits
    from dmhpc.data import inputs

    raw = np.random.default_rng(3).integers(-30000, 30000, (40, 3, 8, 8)).astype(np.int16)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 0.001, 5.0  # read through astropy's section, unmapped
    cube = tmp_path / "scaled.fits"
    hdu.writeto(cube)
    reads_fail_while_writing(monkeypatch, inputs._SectionRows, "__getitem__",
                             OSError(errno.EIO, os.strerror(errno.EIO)))
    err = assert_fails(capsys, args({"images": str(cube), "out": str(tmp_path / "ds")}),
                       f"{cube}: cannot read (Input/output error)")
    assert "shard-" not in err
    assert sorted(os.listdir(tmp_path)) == ["scaled.fits"]


@pytest.mark.parametrize("mask_in", ["first", "later"])
def test_an_integer_mask_hdu_among_filters_is_one_line(tmp_path, capsys, mask_in):
    """A cutout's integer MASK extension was stacked as one more filter."""
    from astropy.io import fits

    names = cutouts(tmp_path, np.random.default_rng(7).normal(size=(4, 3, 8, 8)).astype(np.float32), per_filter=True)
    name = names[0 if mask_in == "first" else 3]
    fits.append(tmp_path / "cutouts" / name, np.zeros((8, 8), np.int32), fits.Header([("EXTNAME", "MASK")]))
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    out = tmp_path / "o"
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path / "cutouts"),
                          "--out", str(out)],
                 f"{tmp_path / 'cutouts' / name}: HDU 4 (MASK) holds int32 integers beside floating-point filters",
                 out=out)


def test_cutouts_hold_their_filters_in_the_first_ones_order_by_name(tmp_path):
    """Cutouts of one HDU per filter were stacked in file order: a download holding r, g, i had its
    channels swapped without a word. By their FILTER, BAND or EXTNAME cards they take the first
    cutout's order; names that say nothing of it (others, such as HSC's R2 for R, or none) keep
    the file's."""
    from astropy.io import fits

    images = np.random.default_rng(8).normal(size=(6, 3, 8, 8)).astype(np.float32)
    names = cutouts(tmp_path, images, per_filter=True)  # EXTNAMEs g, r, i
    folder = tmp_path / "cutouts"

    def rewrite(k: int, cards: list) -> None:  # cutout k as (card, value, filter index) HDUs
        (folder / names[k]).unlink()
        fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(images[k][band], fits.Header([(card, value)]))
                                            for card, value, band in cards]).writeto(folder / names[k])

    rewrite(2, [("EXTNAME", "R", 1), ("EXTNAME", "i", 2), ("EXTNAME", "G", 0)])  # (any case)
    rewrite(4, [("FILTER", "i", 2), ("FILTER", "g", 0), ("FILTER", "r", 1)])
    rewrite(1, [("EXTNAME", "g", 0), ("EXTNAME", "r2", 1), ("EXTNAME", "i", 2)])  # file order
    rewrite(3, [("COMMENT", "", 0), ("COMMENT", "", 1), ("COMMENT", "", 2)])  # unnamed: file order
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    assert main(["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(folder), "--shard-size", "4",
                 "--out", str(tmp_path / "ds")]) == 0
    rows = read_all(tmp_path / "ds")
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])


@pytest.mark.parametrize("extname", ["VARIANCE", "ivar", "WEIGHT", "WGT", "ERR", "PSF", "MASK", "IVAR_G", "var-r"])
def test_a_floating_point_plane_beside_the_filters_is_refused_by_its_name(tmp_path, capsys, extname):
    """A cutout's float32 VARIANCE (or weight, PSF...) extension of the filters' shape was stacked as
    one more filter (HSC and Legacy Survey cutouts carry them)."""
    from astropy.io import fits

    names = cutouts(tmp_path, np.random.default_rng(7).normal(size=(4, 3, 8, 8)).astype(np.float32), per_filter=True)
    fits.append(tmp_path / "cutouts" / names[2], np.ones((8, 8), np.float32), fits.Header([("EXTNAME", extname)]))
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path / "cutouts"),
                          "--out", str(tmp_path / "o")],
                 f"{tmp_path / 'cutouts' / names[2]}: HDU 4 ({extname}) is no filter, by its name",
                 out=tmp_path / "o")


def test_a_fits_file_of_a_band_per_hdu_is_refused(tmp_path, capsys):
    """A FITS file of a g cube in its primary HDU and r and i cubes in extensions was read from its
    first HDU alone: a data set of one filter, the others dropped without a word. An image of
    another shape beside the cube (a PSF) is no band, and is left as before."""
    from astropy.io import fits

    cubes = np.random.default_rng(5).normal(size=(3, 12, 8, 8)).astype(np.float32)
    bands = tmp_path / "bands.fits"
    fits.HDUList([fits.PrimaryHDU(cubes[0]), fits.ImageHDU(cubes[1], name="R"),
                  fits.ImageHDU(cubes[2], name="I")]).writeto(bands)
    assert_fails(capsys, ["prepare", "--images", str(bands), "--out", str(tmp_path / "o")],
                 f"{bands}: HDU 0 (PRIMARY) and HDU 1 (R), 2 (I) hold images of the same shape (12, 8, 8)",
                 out=tmp_path / "o")
    psf = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(cubes[0]), fits.ImageHDU(cubes[1][0], name="PSF")]).writeto(psf)
    assert main(["prepare", "--images", str(psf), "--out", str(tmp_path / "ds")]) == 0
    rows = read_all(tmp_path / "ds")
    np.testing.assert_array_equal(rows["images"][:, 0], cubes[0][rows["index"]])
    # A variance cube beside it by its name, and a cube of every filter beside another: no bands.
    ivar = tmp_path / "ivar.fits"
    fits.HDUList([fits.PrimaryHDU(cubes[0]), fits.ImageHDU(cubes[1], name="IVAR")]).writeto(ivar)
    assert main(["prepare", "--images", str(ivar), "--out", str(tmp_path / "ivar")]) == 0
    whole = np.stack([cubes[0], cubes[1], cubes[2]], axis=1)  # (12, 3, 8, 8)
    sci = tmp_path / "sci.fits"
    fits.HDUList([fits.PrimaryHDU(whole), fits.ImageHDU(whole, name="WHAT")]).writeto(sci)
    assert main(["prepare", "--images", str(sci), "--out", str(tmp_path / "sci")]) == 0
    rows = read_all(tmp_path / "sci")
    np.testing.assert_array_equal(rows["images"], whole[rows["index"]])


@pytest.mark.parametrize("card, said", [(("BLANK", -32768), "int16"), (("BZERO", 1000), "int16 offset by BZERO 1000")])
def test_integer_pixels_that_astropy_gives_as_floats_are_refused_as_raw_counts(tmp_path, capsys, card, said):
    """astropy gives int16 pixels with a BLANK, or with a BZERO other than the unsigned one, as
    float32: the check of the dtype took raw counts for calibrated pixels, and a cutout's integer
    MASK with a BLANK was stacked as one more filter."""
    from astropy.io import fits

    hdu = fits.PrimaryHDU(np.random.default_rng(2).poisson(1500, (20, 3, 8, 8)).astype(np.int16))
    hdu.header[card[0]] = card[1]
    hdu.writeto(tmp_path / "counts.fits")
    assert_fails(capsys, ["prepare", "--images", str(tmp_path / "counts.fits"), "--out", str(tmp_path / "o")],
                 f"{tmp_path / 'counts.fits'}: pixels of dtype {said}; expected floating point", out=tmp_path / "o")
    names = cutouts(tmp_path, np.random.default_rng(7).normal(size=(4, 3, 8, 8)).astype(np.float32), per_filter=True)
    mask = fits.ImageHDU(np.zeros((8, 8), np.int32), fits.Header([("EXTNAME", "MASK"), ("BLANK", -1)]))
    fits.append(tmp_path / "cutouts" / names[0], mask.data, mask.header)
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path / "cutouts"),
                          "--out", str(tmp_path / "o")],
                 f"{tmp_path / 'cutouts' / names[0]}: HDU 4 (MASK) holds int32 integers beside floating-point filters",
                 out=tmp_path / "o")


def test_ids_that_are_paths_name_no_cutout_outside_the_folder(tmp_path):
    """Without a file column the cutout of id X is X.fits in --cutouts: the ids "../x" and "sub/y"
    were read from the folder's parent and from a folder inside it."""
    from dmhpc.data.inputs import read_catalog

    (tmp_path / "c.csv").write_text("id\na\n../x\n")
    with pytest.raises(DmhpcError, match=r"c.csv: id '../x' \(row 2\) is no file name, and without a file column"):
        read_catalog(tmp_path / "c.csv", cutouts=tmp_path / "cutouts")
    assert read_catalog(tmp_path / "c.csv").ids == ["a", "../x"]  # (ids alone: no file named by them)


def test_a_csv_naming_a_column_asked_for_twice_is_refused(tmp_path):
    """Two catalogs pasted side by side: astropy renamed the second "label" to "label_1", and the
    first was read without a word."""
    from dmhpc.data.inputs import read_catalog

    (tmp_path / "c.csv").write_text("\ufeffid,label,label\n1,0,1\n2,0,1\n", encoding="utf-8")
    with pytest.raises(DmhpcError, match=r"c.csv: column 'label' appears 2 times in the header; rename all but"):
        read_catalog(tmp_path / "c.csv", label_column="label")
    assert read_catalog(tmp_path / "c.csv").ids == ["1", "2"]  # (a column not asked for may repeat)


def test_a_reader_error_of_another_kind_during_the_writes_leaves_nothing(tmp_path, monkeypatch):
    """Only a DmhpcError removed the staged shards and the folder prepare made: an input reader's own
    exception (a decompressor's, a MemoryError) left both behind."""
    from dmhpc.data import inputs

    np.save(tmp_path / "half.npy", np.random.default_rng(3).normal(size=(100, 3, 8, 8)).astype(np.float32))
    reads_fail_while_writing(monkeypatch, inputs.ArrayRows, "_rows", RuntimeError("a reader's own error"), from_row=60)
    with pytest.raises(RuntimeError, match="a reader's own error"):
        main(["prepare", "--images", str(tmp_path / "half.npy"), "--out", str(tmp_path / "ds"), "--shard-size", "16"])
    assert sorted(os.listdir(tmp_path)) == ["half.npy"]


@pytest.mark.parametrize("dtype, at", [(np.uint16, 0), (np.int16, 0), (np.uint16, 3), (np.int16, 2)])
def test_cutouts_of_unscaled_integers_are_refused_as_a_cubes_are(tmp_path, capsys, dtype, at):
    """Cutouts of raw counts (uint16, stored as int16 with BZERO 32768, or int16) were converted to float32
    and trained or predicted on as if fluxes, where a cube of the same pixels was refused."""
    from astropy.io import fits

    images = np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)
    names = cutouts(tmp_path, images, per_filter=False)
    counts = tmp_path / "cutouts" / names[at]
    fits.PrimaryHDU(np.random.default_rng(1).integers(0, 30000, (3, 8, 8)).astype(dtype)).writeto(counts,
                                                                                                 overwrite=True)
    with fits.open(counts) as hdul:
        assert hdul[0].header.get("BZERO", 0) == (32768 if dtype == np.uint16 else 0)
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    argv = ["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path / "cutouts")]
    assert_fails(capsys, [*argv, "--out", str(tmp_path / "o")],
                 f"{counts}: pixels of dtype {np.dtype(dtype).name}; expected floating point",
                 out=tmp_path / "o")
    fits.PrimaryHDU(np.zeros((4, 3, 8, 8), dtype)).writeto(tmp_path / "cube.fits")
    with pytest.raises(DmhpcError, match=f"cube.fits: pixels of dtype {np.dtype(dtype).name}; expected floating point"):
        open_images(tmp_path / "cube.fits")
    # Scaled (BSCALE), the same integers are read at their scaled values, as a cube's are.
    raw = np.random.default_rng(1).integers(-3000, 3000, (3, 8, 8)).astype(np.int16)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 0.001, 5.0
    hdu.writeto(counts, overwrite=True)
    assert main([*argv, "--out", str(tmp_path / "ds")]) == 0
    rows = read_all(tmp_path / "ds")
    images[at] = raw * np.float32(0.001) + np.float32(5.0)
    np.testing.assert_allclose(rows["images"], images[rows["index"]], rtol=1e-6)


def test_cutouts_of_more_filters_than_the_models_take_name_the_hdus(tmp_path, capsys):
    """Five (H, W) HDUs, one per filter, were refused as "5 channels in layout NCHW", a layout the
    user never gave (the models take 1 to 4 filters)."""
    from astropy.io import fits

    (tmp_path / "cutouts").mkdir()
    names = [f"J{i}.fits" for i in range(4)]
    for name, image in zip(names, np.random.default_rng(7).normal(size=(4, 5, 8, 8)).astype(np.float32)):
        fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(band, name=f) for band, f in zip(image, "ugriz")]).writeto(
            tmp_path / "cutouts" / name)
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"{n[:-5]}\n" for n in names))
    out = tmp_path / "o"
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--cutouts", str(tmp_path / "cutouts"),
                          "--out", str(out)],
                 f"{tmp_path / 'cutouts' / names[0]}: 5 image HDUs, one per filter; expected 1 to 4 filters", out=out)


def test_ids_name_cutouts_only_in_a_cutouts_folder_given(tmp_path, capsys):
    """What --cutouts's help says: without a file column, ID.fits files are looked for only in the
    --cutouts folder, not beside the catalog (its help promised that default, the code never did)."""
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(tmp_path / "g1.fits")
    (tmp_path / "c.csv").write_text("id\ng1\n")
    out = tmp_path / "ds"
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--out", str(out)],
                 f"{tmp_path / 'c.csv'}: no file column nor cutouts folder to find its images by; give --file-column "
                 f"or --cutouts", out=out)


@pytest.mark.parametrize("cell", ["", "  "])
@pytest.mark.parametrize("column", ["id", "file"])
def test_an_empty_id_or_file_cell_is_one_line(tmp_path, capsys, column, cell):
    """Empty cells read as "--" (masked) or blanks: as ids, the rows became one object of that name;
    as files, they named a file "--" or the cutouts folder itself."""
    names = cutouts(tmp_path, np.zeros((3, 3, 8, 8), np.float32), per_filter=False)
    rows = [{"id": f"g9{4 + k}", "file": f"cutouts/{name}"} for k, name in enumerate(names)]
    rows[1][column], rows[2][column] = cell, ""
    (tmp_path / "c.csv").write_text("id,file\n" + "".join(f"{r['id']},{r['file']}\n" for r in rows))
    out = tmp_path / "o"
    which = " (id g95)" if column == "file" else ""
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--file-column", "file", "--out", str(out)],
                 f"{tmp_path / 'c.csv'}: column '{column}' has 2 empty {column} cell(s), the first in row 2{which}",
                 out=out)


@pytest.mark.parametrize("column, where", [("id", "file-column"), ("id", "cutouts"), ("id", "images"),
                                           ("file", "file-column")])
def test_an_id_or_file_in_two_rows_is_one_line(tmp_path, capsys, column, where):
    """A repeated id (or file) converted one image twice, possibly with two labels."""
    names = cutouts(tmp_path, np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32), per_filter=False)
    rows = [[name[:-5], k % 2, f"cutouts/{name}"] for k, name in enumerate(names)]
    if column == "id":
        rows[3][0] = rows[1][0]
        repeated = f"id '{rows[1][0]}' of column 'id'"
    else:
        rows[3][2] = f"./cutouts/../cutouts/{names[1]}"  # spelt otherwise, the same file
        repeated = f"file 'cutouts/{names[1]}' of column 'file'"
    (tmp_path / "c.csv").write_text("id,label,file\n" + "".join(f"{i},{y},{f}\n" for i, y, f in rows))
    out = tmp_path / "o"
    argv = ["prepare", "--catalog", str(tmp_path / "c.csv"), "--label-column", "label", "--out", str(out)]
    argv += {"file-column": ["--file-column", "file"], "cutouts": ["--cutouts", str(tmp_path / "cutouts")],
             "images": ["--images", save(tmp_path, "X.npy", np.zeros((4, 3, 8, 8), np.float32))]}[where]
    assert_fails(capsys, argv, f"{tmp_path / 'c.csv'}: {repeated} is in rows 2, 4", out=out)
    if column == "file":  # and by its absolute path
        rows[3][2] = str(tmp_path / "cutouts" / names[1])
        (tmp_path / "c.csv").write_text("id,label,file\n" + "".join(f"{i},{y},{f}\n" for i, y, f in rows))
        assert_fails(capsys, argv, f"{tmp_path / 'c.csv'}: {repeated} is in rows 2, 4", out=out)


def test_nan_padded_cutouts_are_refused_unless_filled(tmp_path, capsys):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(12, 3, 8, 8)).astype(np.float32)
    images[3, :, :2, :] = np.nan  # the edge of the survey footprint
    files = {"images": fits_cube(tmp_path / "cube.fits", images), "out": str(tmp_path / "ds")}
    assert_fails(capsys, args(files), "cube.fits: 48 NaN or Inf pixels (first in image 3)", "--nan-fill 0")
    assert main(args(files, "--nan-fill", "0")) == 0
    rows = read_all(files["out"])
    k = list(rows["index"]).index(3)
    assert np.all(rows["images"][k][:, :2, :] == 0) and np.isfinite(rows["images"]).all()


@pytest.mark.parametrize("source", ["npy", "npy-float64", "cutouts"])
def test_nan_fill_replaces_nan_only(tmp_path, capsys, source):
    """An Inf (or a float64 pixel beyond float32) is still refused with --nan-fill: numpy's
    nan_to_num turned it into 3.4e38, stored without a word, with statistics of ~1e35."""
    images = np.random.default_rng(6).normal(size=(12, 3, 8, 8))
    images[2, 0, 0, 0] = np.nan
    images[6, 1, 3, 3] = 1e40 if source == "npy-float64" else -np.inf
    out = str(tmp_path / "ds")
    if source == "cutouts":
        from astropy.table import Table

        names = cutouts(tmp_path, images.astype(np.float32), per_filter=False)
        Table({"id": [n[:-5] for n in names], "file": [f"cutouts/{n}" for n in names]}).write(tmp_path / "c.csv")
        argv, name = ["prepare", "--catalog", str(tmp_path / "c.csv"), "--file-column", "file", "--out", out], "c.csv"
    else:
        dtype = np.float64 if source == "npy-float64" else np.float32
        argv, name = args({"images": save(tmp_path, "X.npy", images.astype(dtype)), "out": out}), "X.npy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float64 -> float32 cast of a cutout
        expected = "overflow float32" if source == "npy-float64" else "1 NaN or Inf pixels (first in image 6)"
        if source == "cutouts":  # the file too: the catalog's row number alone sent one looking through the folder
            expected = f"1 NaN or Inf pixels (first in image 6, {tmp_path / 'cutouts' / names[6]})"
        assert_fails(capsys, [*argv, "--nan-fill", "0"], name, expected, "--nan-fill replaces NaN only"
                     if source != "npy-float64" else "", out=out)


@pytest.mark.parametrize("fill, dtype", [("nan", "float32"), ("inf", "float32"), ("-1e39", "float32"),
                                         ("1e6", "float16")])
def test_a_nan_fill_the_stored_type_cannot_hold_is_refused(inputs, capsys, fill, dtype):
    """It was stored: the manifest's statistics said NaN or Infinity, and load_manifest refused it."""
    assert_fails(capsys, args(inputs, f"--nan-fill={fill}", "--dtype", dtype), f"--nan-fill {float(fill):g}: ",
                 f"finite value that {dtype} can hold", out=inputs["out"])


def test_a_fits_cube_cut_short_is_one_line(tmp_path):
    """A cube whose copy stopped halfway: astropy maps it and fails with a TypeError on the data (a
    traceback, before); the one line says why, in astropy's words. In a fresh process: astropy's
    first import installs its own warning printer, which printed the reason apart."""
    cube = fits_cube(tmp_path / "cube.fits", np.zeros((40, 3, 8, 8), np.float32))
    os.truncate(cube, os.path.getsize(cube) // 2)
    proc = subprocess.run([sys.executable, "-m", "dmhpc", "prepare", "--images", cube, "--out", str(tmp_path / "ds")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cube.fits: not a readable FITS file (File may have been truncated" in proc.stderr
    assert not (tmp_path / "ds").exists()


def augmented_copies(n_objects: int, seed: int = 0) -> np.ndarray:
    """Each object as the DeepMerge files hold mergers: itself, rotated 90 and 180 degrees, flipped."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_objects, 3, 8, 8)).astype(np.float32)
    copies = [base, np.rot90(base, 1, axes=(2, 3)), np.rot90(base, 2, axes=(2, 3)), base[..., ::-1]]
    images = np.concatenate([np.ascontiguousarray(c) for c in copies])
    return images[rng.permutation(len(images))]  # scattered, as in the files


def test_augmented_copies_are_reported_and_grouped_into_one_split(tmp_path, capsys):
    images = augmented_copies(10)
    files = {"images": save(tmp_path, "X.npy", images), "labels": save(tmp_path, "y.npy", np.arange(40) % 2),
             "out": str(tmp_path / "ds")}
    assert main(args(files)) == 0
    err = capsys.readouterr().err
    assert "30 images are flips or rotations of 10 others" in err and "--group-duplicates" in err
    files["out"] = str(tmp_path / "grouped")
    assert main(args(files, "--group-duplicates")) == 0
    assert "warning" not in capsys.readouterr().err
    manifest = load_manifest(files["out"])
    assert sum(manifest["objects"].values()) == 10  # 40 images, 10 objects
    rows = read_all(files["out"])
    split_of = {}
    for split, (a, b) in manifest["rows"].items():
        for i in rows["index"][a:b]:
            split_of[i] = split
    from dmhpc.data.duplicates import canonical_hash

    by_object = {}
    for i in range(40):
        by_object.setdefault(canonical_hash(images[i]), set()).add(split_of[i])
    assert all(len(s) == 1 for s in by_object.values())  # every object's copies in one split
    assert main(["info", files["out"]]) == 0
    assert "objects" in capsys.readouterr().out
    # With a catalog naming the images (one id per row), copies were never looked for: each id taken
    # for an object, the twins split apart without a word, and --group-duplicates refused.
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"g{i}\n" for i in range(40)))
    catalogued = {**files, "out": str(tmp_path / "catalogued")}
    assert main(args(catalogued, "--catalog", str(tmp_path / "c.csv"))) == 0
    assert "30 images are flips or rotations of 10 others" in capsys.readouterr().err
    catalogued["out"] = str(tmp_path / "catalogued-grouped")
    assert main(args(catalogued, "--catalog", str(tmp_path / "c.csv"), "--group-duplicates")) == 0
    assert sum(load_manifest(catalogued["out"])["objects"].values()) == 10


def test_grouped_domains_of_paired_rows_share_their_objects_and_split(tmp_path, capsys):
    """DeepMerge's noisy set: each augmented copy of the pristine set got its own noise, so it has no
    exact copies. Grouped apart, its objects and split differed from the pristine set's: noisy test
    images had their noise-free twins in the pristine training set."""
    rng = np.random.default_rng(3)
    pristine = augmented_copies(25)
    root = tmp_path / "files"
    root.mkdir()
    save(root, "pX.npy", pristine)
    save(root, "nX.npy", pristine + rng.normal(scale=0.1, size=pristine.shape).astype(np.float32))
    save(root, "y.npy", np.arange(100) % 2)
    config = write_config(tmp_path, f"""root: {root}
out: {tmp_path / "out"}
domains:
  pristine: {{images: pX.npy, labels: y.npy}}
  noisy: {{images: nX.npy, labels: y.npy}}
""")
    assert main(["prepare", "--data-config", config, "--group-duplicates", "--shard-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "pristine and noisy: as many images each, taken as the same objects row by row" in out
    assert "note" not in out
    p, n = load_manifest(tmp_path / "out" / "pristine"), load_manifest(tmp_path / "out" / "noisy")
    assert split_lists(p) == split_lists(n) and sum(n["objects"].values()) == 25
    # Prepared one at a time, each twin set is split its own way: said, since nothing can refuse it later.
    alone = tmp_path / "alone"
    assert main(["prepare", "--images", str(root / "nX.npy"), "--labels", str(root / "y.npy"), "--out", str(alone),
                 "--group-duplicates", "--shard-size", "16"]) == 0
    assert ("its copies are grouped within it alone; a domain of the same objects (its noisy or pristine twin) "
            "shares these groups, and the split, only when prepared in the same run" in capsys.readouterr().out)


def test_copies_are_found_reading_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """In the DeepMerge files nearly every image has copies: the exact test read all of them at
    once, the whole input in memory (on every rank under MPI)."""
    from dmhpc.data import duplicates
    from dmhpc.data.inputs import ArrayRows

    images = augmented_copies(60)  # 240 images of 3x8x8 float32: 768 bytes each
    reads = []

    class Recorded(ArrayRows):
        def _rows(self, index):
            reads.append(len(index))
            return super()._rows(index)

    monkeypatch.setattr(duplicates, "_BLOCK_BYTES", 50 * 768)  # blocks of 50 images
    rows = Recorded(images)
    objects = duplicates.group(rows, duplicates.signatures(rows))
    assert duplicates.count_copies(objects) == (180, 60)
    assert max(reads) == 50 and sum(reads) == 240 * 2  # the signatures' pass, then the candidates'
    canonical = [duplicates.canonical_hash(image) for image in images]
    assert all(canonical[objects[i]] == canonical[i] and objects[i] <= i for i in range(240))


def test_an_image_with_one_copy_is_grouped_under_its_first_row():
    """The tests' objects all had four copies, placed so that a component's number was its first
    row: objects of two images, and ids that were component numbers, went unseen."""
    from dmhpc.data import duplicates

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    images = np.stack([a, np.ascontiguousarray(np.rot90(a, 1, axes=(1, 2))), b])  # A, A rotated, B
    objects = duplicates.group(images, duplicates.signatures(images))
    assert objects.tolist() == [0, 0, 2] and duplicates.count_copies(objects) == (1, 1)
    assert duplicates.join_groupings([objects, np.arange(3)]).tolist() == [0, 0, 2]


def test_the_exact_test_is_shared_out_among_ranks(monkeypatch):
    """Under MPI every rank hashed every candidate (nearly every DeepMerge image, eight digests
    each: the whole input read on every rank). Each rank now hashes its own part, once; the
    parts together give the grouping of one process."""
    from dmhpc.data import duplicates
    from dmhpc.data.inputs import ArrayRows
    from dmhpc.data.prepare import _hash_share

    images = augmented_copies(60)
    reads = []

    class Recorded(ArrayRows):
        def _rows(self, index):
            reads.extend(np.asarray(index).tolist())
            return super()._rows(index)

    rows = Recorded(images)
    sigs = duplicates.signatures(rows)
    reads.clear()
    candidates = duplicates.candidates(sigs)
    shares = [_hash_share([{"images": rows, "names": {"images": "X.npy"}}], [candidates], rank, 3)[0]
              for rank in range(3)]
    assert sorted(reads) == candidates.tolist() and len(candidates) == 240  # each read once, by one rank
    assert [len(s) for s in shares] == [80, 80, 80]
    joined = duplicates.objects_from(sigs, candidates, np.concatenate(shares))
    assert np.array_equal(joined, duplicates.group(images, sigs))
    assert duplicates.count_copies(joined) == (180, 60)


@pytest.mark.mpi
@needs_mpi
def test_mpi_grouping_of_copies_is_byte_identical_to_serial(tmp_path):
    images = augmented_copies(30)
    files = {"images": save(tmp_path, "X.npy", images), "labels": save(tmp_path, "y.npy", np.arange(120) % 2)}
    serial = {**files, "out": str(tmp_path / "serial")}
    assert main(args(serial, "--group-duplicates")) == 0
    # The labels named in another letter case: the note is rank 0's alone (every rank said it).
    misspelt = {**files, "labels": str(tmp_path / "Y.npy"), "out": str(tmp_path / "mpi")}
    run = mpi_prepare(*args(misspelt, "--group-duplicates")[1:])
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("Y.npy not found; using y.npy, which differs in letter case only") == 1, run.stderr
    assert sum(load_manifest(tmp_path / "mpi")["objects"].values()) == 30
    assert shard_bytes(tmp_path / "serial") == shard_bytes(tmp_path / "mpi")


def test_data_config_spelling_and_overrides(tmp_path, capsys):
    rng = np.random.default_rng(6)
    root = tmp_path / "zenodo"
    root.mkdir()
    save(root, "SimReal_TARGET_x_postmergers_SDSS.npy", rng.normal(size=(12, 3, 8, 8)).astype(np.float32))
    save(root, "y.npy", np.arange(12) % 2)
    config = write_config(tmp_path, f"root: {root}\nout: {tmp_path / 'out'}\n"
                                     "domains: {sdss: {images: SimReal_TARGET_X_postmergers_SDSS.npy, labels: y.npy}}\n")
    assert main(["prepare", "--data-config", config, "--set", "domains.sdss.labels=Y.npy"]) == 0
    err = capsys.readouterr().err
    assert "using SimReal_TARGET_x_postmergers_SDSS.npy, which differs in letter case only" in err
    assert err.count("Y.npy not found; using y.npy") == 1, err  # (said twice: the labels were looked up twice)
    shutil.rmtree(tmp_path / "out")
    save(root, "other.npy", rng.normal(size=(12, 3, 8, 8)).astype(np.float32))
    assert main(["prepare", "--data-config", config, "--set", "domains.sdss.images=other.npy",
                 "--set", f"out={tmp_path / 'out2'}"]) == 0
    assert load_manifest(tmp_path / "out2" / "sdss")["inputs"][0]["file"].endswith("other.npy")
    assert_fails(capsys, ["prepare", "--data-config", config, "--set", "domains.nope.images=x"],
                 "--set domains.nope.images: domains.nope is not a mapping")
    # a --set of its own mistake is the command line's, not the file's
    assert_fails(capsys, ["prepare", "--data-config", config, "--set", "domains.sdss.imagse=x"],
                 "dmhpc prepare: error: command line: domains.sdss.imagse: unknown key")


def test_a_short_read_goes_on_from_where_it_stopped(inputs, monkeypatch):
    """A read may return fewer bytes than asked (a network file system, a signal): the rest was
    read from the run's first byte again, and the rows came back with the wrong pixels."""
    images = np.load(inputs["images"])
    real, calls = os.preadv, []

    def short(fd, buffers, offset):  # at most 1000 bytes a call
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:1000]], offset)

    monkeypatch.setattr(os, "preadv", short)
    rows = open_images(inputs["images"])
    np.testing.assert_array_equal(rows[np.arange(10, 20)], images[10:20])
    np.testing.assert_array_equal(rows[np.array([3, 4, 5, 30, 31])], images[[3, 4, 5, 30, 31]])
    assert len(calls) > 2  # the reads were short


def test_fractions_that_leave_the_training_split_empty_are_refused(inputs, capsys):
    """0.005 of 48 images rounds to no training image: the refusal of an empty training split is all
    that stops a data set no run can train on."""
    files = dict(inputs, objects=None)
    assert_fails(capsys, args(files, "--fractions", "0.005,0.495,0.5"),
                 f"dmhpc prepare: error: {inputs['images']}: 48 images leave the training split empty\n",
                 out=inputs["out"])


def test_a_share_that_rounds_to_no_image_is_warned_of(inputs, capsys):
    """0.01 of 48 images is no val image: said in the summary's counts only, and the trainer refused
    the set at its start. A share of 0 asks for none (a set to predict on): nothing said."""
    files = dict(inputs, objects=None)
    assert main(args(files, "--fractions", "0.89,0.01,0.1")) == 0
    err = capsys.readouterr().err
    assert err == (f"dmhpc prepare: warning: {Path(inputs['out']).name}: its val split is empty, 48 images too few "
                   f"for --fractions 0.89,0.01,0.1; the trainer needs rows in every split\n"), err
    assert main(args(files, "--fractions", "0.9,0,0.1", "--overwrite")) == 0
    assert "warning" not in capsys.readouterr().err


def test_object_ids_of_two_columns_are_one_line(inputs, tmp_path, capsys):
    """An objects file of shape (N, 2) has a row per image: it was taken as object ids, and the
    conversion died with an IndexError traceback."""
    objects = save(tmp_path, "o2.npy", np.stack([np.arange(N), np.arange(N)], axis=1))
    assert_fails(capsys, args(dict(inputs, objects=objects)),
                 f"dmhpc prepare: error: {objects}: shape ({N}, 2); expected one object id per image (N,)\n",
                 out=inputs["out"])


def test_labels_from_a_file_and_a_catalog_column_at_once_are_refused(inputs, tmp_path, capsys):
    """--labels and a catalog's --label-column both give labels: the file's were taken and the
    catalog's column ignored without a word."""
    catalog = tmp_path / "cat.csv"
    catalog.write_text("id,label\n" + "".join(f"{i},{1 - i % 2}\n" for i in range(N)))
    assert_fails(capsys, args(inputs, "--catalog", str(catalog), "--label-column", "label"),
                 f"dmhpc prepare: error: ds: labels from both {inputs['labels']} and the catalog's 'label' column\n",
                 out=inputs["out"])


def test_a_name_two_files_spell_in_other_cases_is_not_found_not_guessed(inputs, capsys):
    """Another spelling is taken only where one file has it: of X.npy and X.NPY, one was taken for a
    missing x.npy, the folder's listing order choosing which."""
    from dmhpc.data.inputs import resolve_spelling

    given = Path(inputs["images"])
    other = given.with_name("X.NPY")
    with open(other, "wb") as f:  # (np.save would add .npy to this name)
        np.save(f, np.ones((N, 3, 8, 8), np.float32))
    asked = given.with_name("x.npy")
    assert resolve_spelling(asked) == (asked, None)
    err = assert_fails(capsys, args(dict(inputs, images=str(asked))), out=inputs["out"])
    assert err in [f"dmhpc prepare: error: {asked}: no such file (did you mean {name}?)\n"
                   for name in ("X.npy", "X.NPY")]
    other.unlink()  # one other spelling: taken, with a note
    assert resolve_spelling(asked) == (given, "x.npy not found; using X.npy, which differs in letter case only")


def test_an_output_folder_that_cannot_be_listed_is_one_line(inputs, tmp_path, monkeypatch, capsys):
    """A folder of someone else's (EACCES; this suite runs as root, so the refusal is injected) ended
    prepare in a PermissionError traceback where its staging folder was already a one-line error."""
    out = tmp_path / "theirs"
    out.mkdir()
    real_iterdir = Path.iterdir

    def refused(path):
        if path == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", refused)
    assert_fails(capsys, args({**inputs, "out": str(out)}), f"{out}: cannot list (Permission denied)")
    assert list(real_iterdir(out)) == []


def test_float64_cutouts_below_float32_and_a_scale_past_it_are_one_line(tmp_path, capsys):
    """Cutouts of float64 pixels below float32's smallest number were read as zeros, passed as blank
    and stored: a data set of zeros, exit 0 (a .npy of them was refused). A cube whose BSCALE
    overflows float32 printed astropy's overflow warning before the error."""
    from astropy.io import fits
    from astropy.table import Table

    faint = np.abs(np.random.default_rng(2).normal(size=(12, 3, 8, 8))) * 1e-47
    names = cutouts(tmp_path, faint, per_filter=False)
    Table({"id": [n[:-5] for n in names], "file": [f"cutouts/{n}" for n in names]}).write(tmp_path / "c.csv")
    out = str(tmp_path / "ds")
    assert_fails(capsys, ["prepare", "--catalog", str(tmp_path / "c.csv"), "--file-column", "file", "--out", out],
                 f"{tmp_path / 'cutouts' / names[0]}: no pixel brighter than", "below float32's smallest normal",
                 "scale the images up", out=out)
    hdu = fits.ImageHDU(np.ones((12, 3, 8, 8), ">i2"))
    hdu.header["BSCALE"], hdu.header["BZERO"] = 1e39, 0.0
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp_path / "huge.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_fails(capsys, args({"images": str(tmp_path / "huge.fits"), "out": out}), "huge.fits: ",
                     "NaN or Inf pixels (first in image 0)", out=out)


def test_an_input_that_changes_between_its_check_and_its_write_is_refused(tmp_path):
    """The pixels are checked on one read and written from another: an input saved again between
    them (NaN now) was written, and its NaN statistics made a manifest every reader refused."""
    from dmhpc.data.shards import SPLIT_FRACTIONS, plan_dataset, write_shard

    images = np.random.default_rng(3).normal(size=(40, 3, 8, 8)).astype(np.float32)
    plan = plan_dataset(images, np.arange(40) % 2, None, shard_size=16, seed=0, fractions=SPLIT_FRACTIONS,
                        dtype="float32", num_classes=2)
    images[7, 1, 2, 2] = np.nan  # saved again, after the check
    (tmp_path / "ds").mkdir()
    with pytest.raises(DmhpcError, match=r"image 7 holds NaN or Inf now, though it had none when checked"):
        for number in range(plan.num_shards):
            write_shard(plan, tmp_path / "ds", number)


def test_two_domains_whose_folders_are_one_are_refused(tmp_path, capsys, inputs):
    """A domain's folder a link to another's: the second lock was said to be held by "another
    prepare", this process itself."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b").mkdir()
    (tmp_path / "out" / "a").symlink_to(tmp_path / "out" / "b")
    config = write_config(tmp_path, f"root: {tmp_path}\nout: {tmp_path / 'out'}\ndomains:\n"
                                     f"  a: {{images: X.npy, labels: y.npy}}\n  b: {{images: X.npy, labels: y.npy}}\n")
    assert_fails(capsys, ["prepare", "--data-config", config],
                 f"{tmp_path / 'out' / 'b'}: the same folder as {tmp_path / 'out' / 'a'} (a link?)")
    assert list((tmp_path / "out" / "b").iterdir()) == []


def test_out_given_as_the_current_folder_is_named_as_that_folder(tmp_path, monkeypatch, capsys):
    """--out . printed its summary, and its one-line errors, with an empty name."""
    rng = np.random.default_rng(11)
    images = save(tmp_path, "x.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    labels = save(tmp_path, "y.npy", np.arange(40) % 2)
    (tmp_path / "deep").mkdir()
    monkeypatch.chdir(tmp_path / "deep")
    capsys.readouterr()
    assert main(["prepare", "--images", images, "--labels", labels, "--out", "."]) == 0
    assert capsys.readouterr().out.startswith("deep: 40 images (NCHW) -> ./ ")
    assert load_manifest(tmp_path / "deep")["count"] == 40


def test_an_input_written_again_during_the_conversion_is_refused(tmp_path, monkeypatch, capsys):
    """Its checksum, read apart from the pixels, went into the manifest: the data set's record
    described another version of the file than the one its shards were made from."""
    from dmhpc.data import shards as shards_module

    rng = np.random.default_rng(12)
    images = save(tmp_path, "x.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    labels = save(tmp_path, "y.npy", np.arange(40) % 2)
    write_shards = shards_module.write_shards

    def written_again_meanwhile(*a, **kw):
        np.save(labels, 1 - np.arange(40) % 2)  # the labels file saved again, other labels in it
        return write_shards(*a, **kw)

    from dmhpc.data import prepare as prepare_module

    input_files = prepare_module._input_files

    def written_again_before_the_checksums(domains):  # after the opening, before the checksums start
        np.save(labels, 1 - np.arange(40) % 2)
        return input_files(domains)

    for module, name, fault in ((shards_module, "write_shards", written_again_meanwhile),
                                (prepare_module, "_input_files", written_again_before_the_checksums)):
        with monkeypatch.context() as patched:
            patched.setattr(module, name, fault)
            capsys.readouterr()
            assert main(["prepare", "--images", images, "--labels", labels, "--out", str(tmp_path / "ds")]) == 1
        err = capsys.readouterr().err
        assert err == (f"dmhpc prepare: error: {tmp_path / 'y.npy'}: written again or replaced while it was "
                       f"converted; nothing written: prepare it again once it is complete\n"), (name, err)
        assert not (tmp_path / "ds").exists()


def test_a_link_pointed_elsewhere_during_the_conversion_names_the_file_read(tmp_path, monkeypatch):
    """images.npy -> v1.npy pointed at v2.npy while the shards are written (`ln -sfn`, the "current
    data" habit): the conversion is of v1, which the manifest names with v1's checksum. The link was
    followed again for the manifest, a KeyError traceback that left the staging folder behind."""
    rng = np.random.default_rng(14)
    v1 = save(tmp_path, "v1.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    v2 = save(tmp_path, "v2.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    labels = save(tmp_path, "y.npy", np.arange(40) % 2)
    link = tmp_path / "images.npy"
    link.symlink_to("v1.npy")
    write_shards = shards.write_shards

    def pointed_elsewhere_meanwhile(*a, **kw):
        link.unlink()
        link.symlink_to("v2.npy")
        return write_shards(*a, **kw)

    monkeypatch.setattr(shards, "write_shards", pointed_elsewhere_meanwhile)
    assert main(["prepare", "--images", str(link), "--labels", labels, "--out", str(tmp_path / "ds")]) == 0
    manifest = load_manifest(tmp_path / "ds")
    assert [(i["role"], i["file"], i["sha256"]) for i in manifest["inputs"]] == [
        ("images", v1, file_sha256(v1)), ("labels", labels, file_sha256(labels))]
    rows = RowReader(tmp_path / "ds").read(0, 40)
    assert np.array_equal(rows["images"], np.load(v1)[rows["index"]])
    assert not np.array_equal(rows["images"], np.load(v2)[rows["index"]])


def test_an_out_in_a_staging_folder_is_refused_and_a_nested_data_set_kept(tmp_path, capsys):
    """An --out named .dmhpc-new in a data set's folder, or in one, was emptied by that data set's
    next --overwrite (its staging folder). A data set in a subfolder of another's is its own."""
    rng = np.random.default_rng(13)
    images = save(tmp_path, "x.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    labels = save(tmp_path, "y.npy", np.arange(40) % 2)
    assert main(["prepare", "--images", images, "--labels", labels, "--out", str(tmp_path / "ds")]) == 0
    before = sorted(p.name for p in (tmp_path / "ds").iterdir())
    for inner in (tmp_path / "ds" / ".dmhpc-new", tmp_path / "ds" / ".dmhpc-new" / "x"):
        capsys.readouterr()
        assert main(["prepare", "--images", images, "--labels", labels, "--out", str(inner)]) == 1
        assert capsys.readouterr().err == (f"dmhpc prepare: error: {inner}: inside {tmp_path / 'ds' / '.dmhpc-new'}, "
                                           f"the staging folder of a conversion into {tmp_path / 'ds'}, which it "
                                           f"empties; choose a folder outside it\n")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == before
    nested = tmp_path / "ds" / "subsets" / "bright"
    assert main(["prepare", "--images", images, "--labels", labels, "--out", str(nested)]) == 0
    assert main(["prepare", "--images", images, "--labels", labels, "--out", str(tmp_path / "ds"), "--overwrite"]) == 0
    assert load_manifest(nested)["count"] == 40 and load_manifest(tmp_path / "ds")["count"] == 40
