"""What `dmhpc verify` and the trainer check of a data set: manifest fields, split lists, shard
structure, labels, objects and checksums. Every damaged data set is a real file edited as a user
or a failing disk would; each problem is one line naming the file or field."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from dmhpc.cli import main
from dmhpc.data import check
from dmhpc.data.check import check_dataset, verify_dataset
from dmhpc.data.shards import MANIFEST, file_sha256, load_manifest, shard_name, write_dataset, write_manifest
from dmhpc.errors import DmhpcError


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    images = rng.normal(1.0, 2.0, size=(n, 3, 6, 6)).astype(np.float32)
    labels = np.arange(n) % 2
    objects = rng.permutation(np.arange(n) // 3) + 1000  # three images per object
    write_dataset(images, labels, objects, tmp_path / "ds", shard_size=16, seed=3)
    return tmp_path / "ds"


def raw_manifest(directory) -> dict:
    """The manifest as its file holds it, to edit (load_manifest's is shared and read-only)."""
    return json.loads((directory / MANIFEST).read_text())


def edit_manifest(directory, **changes):
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    write_manifest(directory, manifest)  # re-sealed, as by a tool: only the checks against the shards see it
    return manifest


def reseal(directory, number):
    """Record a shard's new checksum in the manifest, as a tool that rewrote the shard would."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["shards"][number]["sha256"] = file_sha256(directory / shard_name(number))
    write_manifest(directory, manifest)  # re-sealed, as by a tool: only the checks against the shards see it


def test_a_good_data_set_passes_every_level(dataset, capsys):
    assert verify_dataset(dataset) == [] and verify_dataset(dataset, checksums=False) == []
    assert main(["verify", str(dataset)]) == 0
    assert "4 shards, 60 rows, structure and checksums OK" in capsys.readouterr().out


def test_flipped_signs_are_a_checksum_mismatch_only(dataset, capsys):
    with h5py.File(dataset / shard_name(1), "r+") as f:  # a valid HDF5 file, valid structure
        f["images"][:5] = -f["images"][:5]
    assert verify_dataset(dataset) == ["shard-00001.h5 checksum mismatch"]
    assert verify_dataset(dataset, checksums=False) == []  # what data.verify=structure skips
    (dataset / shard_name(3)).unlink()
    assert main(["verify", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 problems: shard-00001.h5 checksum mismatch; shard-00003.h5 missing" in err


def test_a_shard_the_disk_cannot_read_is_its_own_problem_line(dataset, monkeypatch, capsys):
    """An I/O error while hashing a shard (a failing disk, a Lustre OST down) was a raw OSError
    traceback out of verify and the trainer's check: the other shards' problems went unlisted, and
    under several ranks one rank died while the others waited for it."""
    real = check.file_sha256

    def failing_disk(path, *args):
        if Path(path).name == shard_name(1):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(path, *args)

    monkeypatch.setattr(check, "file_sha256", failing_disk)
    (dataset / shard_name(3)).unlink()
    assert verify_dataset(dataset) == ["shard-00001.h5: cannot read (Input/output error)", "shard-00003.h5 missing"]
    assert verify_dataset(dataset, checksums=False) == ["shard-00003.h5 missing"]  # the structure level hashes nothing
    with pytest.raises(DmhpcError, match=r"^data.source: 2 problems: shard-00001.h5: cannot read \(Input/output "
                                         r"error\); shard-00003.h5 missing"):
        check_dataset("data.source", dataset, load_manifest(dataset), checksums=True)
    assert main(["verify", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-00001.h5: cannot read (Input/output error); shard-00003.h5 missing" in err


def test_a_shard_whose_stat_fails_is_its_own_problem_line(dataset, capsys):
    """is_file() raises where stat fails otherwise than "no such file" (EIO, a name too long behind a
    link): verify and info ended in an OSError traceback."""
    (dataset / shard_name(2)).unlink()
    (dataset / shard_name(2)).symlink_to(dataset / ("x" * 300))
    assert verify_dataset(dataset) == ["shard-00002.h5: cannot read (File name too long)"]
    assert main(["verify", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-00002.h5: cannot read (File name too long)" in err
    assert main(["info", str(dataset)]) == 0


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s["val"].__setitem__(0, 60), "splits['val']: index 60 outside [0, 60)"),
    (lambda s: s["test"].__setitem__(0, -1), "splits['test']: index -1 outside [0, 60)"),
    (lambda s: s["train"].__setitem__(1, s["train"][0]), lambda s: f"splits['train']: index {s['train'][0]} appears twice"),
    (lambda s: s["val"].__setitem__(0, s["train"][0]), lambda s: f"splits: index {s['train'][0]} is in both train and val"),
])
def test_split_lists_must_partition_the_rows(dataset, edit, problem):
    manifest = raw_manifest(dataset)
    edit(manifest["splits"])
    edit_manifest(dataset, splits=manifest["splits"])
    # Named with its file, as the trainer's check names it (verify said the problem alone).
    said = problem(manifest["splits"]) if callable(problem) else problem
    assert verify_dataset(dataset) == [f"manifest.json: {said}"]


def test_rows_must_hold_what_the_split_lists_say(dataset):
    manifest = raw_manifest(dataset)
    splits = manifest["splits"]
    splits["train"][0], splits["val"][0] = splits["val"][0], splits["train"][0]  # a val image trained on
    edit_manifest(dataset, splits=splits)
    problems = verify_dataset(dataset)
    assert problems[0].startswith("shard-00000.h5: row 0 holds input") and "split lists say" in problems[0]
    assert len(problems) == 2  # and the val row, in another shard


@pytest.mark.parametrize("a, b", [("train", "test"), ("train", "val"), ("val", "test")])
def test_an_object_in_two_splits_is_refused(dataset, a, b):
    """Each pair of splits: a val object among the training rows inflates model selection as a test
    object does the result (only train and test were tried)."""
    rows = raw_manifest(dataset)["rows"]
    with h5py.File(dataset / shard_name(rows[a][0] // 16), "r") as f:
        taken = int(f["objects"][rows[a][0] % 16])
    number, at = divmod(rows[b][0], 16)  # the first row of split b gets an object of split a
    with h5py.File(dataset / shard_name(number), "r+") as f:
        f["objects"][at] = taken
    reseal(dataset, number)
    problem = verify_dataset(dataset)[-1]  # after the splits' object counts (one fewer or more)
    assert f"1 objects are in both the {a} and {b} splits" in problem and str(taken) in problem


@pytest.mark.parametrize("replace, problem", [
    (lambda f, n: f.create_dataset("images", data=np.zeros((n, 1, 6, 6), np.float32)), "images float32 (16, 1, 6, 6), manifest says float32 (16, 3, 6, 6)"),
    (lambda f, n: f.create_dataset("images", data=np.zeros((n, 3, 6, 6), np.float64)), "images float64"),
    (lambda f, n: None, "has no dataset 'images'"),
    (lambda f, n: f.create_group("images"), "has no dataset 'images'"),  # an AttributeError traceback
])
def test_a_shard_replaced_by_another_hdf5_file(dataset, replace, problem):
    path = dataset / shard_name(2)
    with h5py.File(path, "r") as old:
        columns = {k: old[k][()] for k in ("labels", "objects", "index")}
    path.unlink()
    with h5py.File(path, "w") as f:
        replace(f, 16)
        for key, values in columns.items():
            f.create_dataset(key, data=values)
    reseal(dataset, 2)
    (found,) = verify_dataset(dataset)
    assert found.startswith("shard-00002.h5") and problem in found


def test_labels_outside_the_classes_and_a_shard_that_is_not_hdf5(dataset):
    with h5py.File(dataset / shard_name(0), "r+") as f:
        f["labels"][3] = 7
    reseal(dataset, 0)
    assert verify_dataset(dataset) == ["shard-00000.h5: label 7 at row 3 is outside the 2 classes"]
    (dataset / shard_name(1)).write_bytes(b"not hdf5" * 100)
    reseal(dataset, 1)
    assert "shard-00001.h5 is not a readable HDF5 file" in verify_dataset(dataset)[1]


def test_label_counts_must_match_the_manifest(dataset):
    with h5py.File(dataset / shard_name(0), "r+") as f:
        f["labels"][0] = 1 - f["labels"][0]
    reseal(dataset, 0)
    (problem,) = verify_dataset(dataset)
    assert problem.startswith("train split holds") and "the manifest says" in problem


def test_object_counts_must_match_the_manifest(dataset):
    """`dmhpc info` shows the manifest's objects per split; a count edited within what the manifest
    alone allows passed verify."""
    manifest = json.loads((dataset / MANIFEST).read_text())
    test = manifest["objects"]["test"]
    edit_manifest(dataset, objects={**manifest["objects"], "test": test - 1})
    assert verify_dataset(dataset) == [f"test split holds {test} objects, the manifest says {test - 1}"]


@pytest.mark.parametrize("field, value, problem", [
    ("count", "60", "key 'count': expected an integer"),
    ("count", 0, "count 0: expected at least 1"),
    ("shape", ["3", 6, 6], "shape ['3', 6, 6]: expected [C, H, W]"),
    ("num_classes", 1.5, "key 'num_classes': expected an integer"),
    ("dtype", "int8", "dtype 'int8'"),
    ("stats", {"mean": ["a", 1, 1], "std": [1, 1, 1]}, "stats.mean: expected 3 numbers"),
    ("splits", None, "key 'splits': expected a dict"),
    ("counts", {"train": [], "val": {}, "test": {}}, "counts['train']: expected a mapping"),
    ("fractions", {"train": "x", "val": 0.1, "test": 0.2}, "fractions: expected a number for each of train, val, test"),
    ("fractions", {"train": 0.7, "val": 0.3}, "fractions: expected a number for each of train, val, test"),
    ("inputs", ["a"], "inputs[0]: expected keys role and file"),
    ("inputs", [{"x": 1}], "inputs[0]: expected keys role and file"),
    ("inputs", [{"role": "images", "file": "/X.npy", "sha256": "?"}], "inputs[0].sha256: expected 64 hexadecimal"),
    ("inputs", [{"role": "cutouts", "file": "/c", "count": -1}], "inputs[0].count -1: expected a number of files"),
    # a count of a class beyond num_classes passed verify; a huge num_classes ran out of memory
    ("counts", {"train": {"0": 1, "1": 2, "7": 3}, "val": {"0": 1, "1": 1}, "test": {"0": 1, "1": 1}},
     "counts['train']: expected one number for each of the 2 classes"),
    ("num_classes", 10**12, "counts['train']: expected one number for each of the 1000000000000 classes"),
    ("objects", {"train": None, "val": 1, "test": 1}, "objects: expected a number of objects for each of"),
    ("objects", {"train": 1}, "objects: expected a number of objects for each of"),
])
def test_hand_edited_manifest_fields_are_one_line_errors(dataset, field, value, problem):
    edit_manifest(dataset, **{field: value})
    with pytest.raises(DmhpcError) as info:
        load_manifest(dataset)
    assert problem in str(info.value) and "\n" not in str(info.value) and MANIFEST in str(info.value)


def test_verify_where_the_platform_has_no_cpu_masks(dataset, monkeypatch):
    """os.sched_getaffinity exists on Linux only: `dmhpc verify` on a laptop (macOS) was an AttributeError."""
    import os

    from dmhpc.distributed import cpus_per_rank

    from dmhpc import cpus

    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)
    assert verify_dataset(dataset) == []
    assert cpus_per_rank("single", 1) == os.cpu_count()


def test_a_huge_num_classes_of_an_unlabelled_set_is_not_allocated(tmp_path):
    """Unlabelled sets have no class counts to hold num_classes to: verify allocated a counter per
    class and died with a numpy MemoryError traceback."""
    images = np.random.default_rng(0).normal(size=(20, 3, 6, 6)).astype(np.float32)
    write_dataset(images, None, None, tmp_path / "survey", shard_size=8, seed=0)
    edit_manifest(tmp_path / "survey", num_classes=10**14)
    assert verify_dataset(tmp_path / "survey") == []


@pytest.mark.parametrize("key, value, problem", [
    ("file", "../../etc/passwd", "expected a shard file name"),
    ("sha256", 12, "sha256: expected 64 hexadecimal digits"),
    ("count", "16", "do not follow on"),
])
def test_hand_edited_shard_records(dataset, key, value, problem):
    manifest = raw_manifest(dataset)
    manifest["shards"][0][key] = value
    edit_manifest(dataset, shards=manifest["shards"])
    with pytest.raises(DmhpcError, match="shards\\[0\\]"):
        load_manifest(dataset)
    with pytest.raises(DmhpcError) as info:
        load_manifest(dataset)
    assert problem in str(info.value)


@pytest.mark.parametrize("index", ["7", 10**30])  # 10**30: an OverflowError traceback in verify
def test_splits_of_strings_or_beyond_64_bits(dataset, index):
    manifest = raw_manifest(dataset)
    manifest["splits"]["train"][0] = index
    edit_manifest(dataset, splits=manifest["splits"])
    with pytest.raises(DmhpcError, match=r"splits\['train'\]: expected integers"):
        load_manifest(dataset)


@pytest.mark.parametrize("field, value", [
    ("fractions", {"train": "x", "val": 0.1, "test": 0.2}),
    ("inputs", [{"x": 1}]),
    ("inputs", ["a"]),
])
def test_info_and_verify_refuse_a_bad_manifest_in_one_line(dataset, capsys, field, value):
    edit_manifest(dataset, **{field: value})
    for command in ("info", "verify"):
        assert main([command, str(dataset)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dmhpc {command}: error: {dataset / MANIFEST}: {field}") and err.count("\n") == 1, err


def test_a_manifest_that_keeps_ids_needs_them_in_every_shard(dataset):
    edit_manifest(dataset, ids=True)
    assert verify_dataset(dataset, checksums=False) == [
        f"{shard_name(k)} has no dataset 'ids' (the manifest keeps ids)" for k in range(4)]
    for k in range(4):
        with h5py.File(dataset / shard_name(k), "r+") as f:
            f.create_dataset("ids", data=np.array([b"J%05d" % i for i in f["index"][()]]))
    assert verify_dataset(dataset, checksums=False) == []
    with h5py.File(dataset / shard_name(2), "r+") as f:
        del f["ids"]
        f.create_dataset("ids", data=np.zeros(3, np.int64))
    assert verify_dataset(dataset, checksums=False) == ["shard-00002.h5: ids int64 (3,), expected bytes (16,)"]


def test_a_manifest_edited_by_hand_is_refused_even_where_it_agrees_with_the_shards(dataset, capsys):
    """A test image moved to val (its counts and boundaries adjusted), the statistics the trainer
    normalizes with, the seed: edits of manifest.json alone that agree with the shards passed verify
    and every start-up check. The manifest ends with the SHA-256 of its content."""
    path = dataset / MANIFEST
    sealed = path.read_text()
    assert json.loads(sealed)["content_sha256"]
    for edit in (lambda m: m["stats"]["mean"].__setitem__(0, m["stats"]["mean"][0] + 5),
                 lambda m: m.__setitem__("seed", 5), lambda m: m.__setitem__("note", "mine")):
        manifest = json.loads(sealed)
        edit(manifest)
        path.write_text(json.dumps(manifest))
        with pytest.raises(DmhpcError, match=f"^{path}: edited since prepare wrote it"):
            load_manifest(dataset)
        assert main(["verify", str(dataset)]) == 1
        err = capsys.readouterr().err
        assert "edited since prepare wrote it (content_sha256 is not that of its content)" in err and \
            err.count("\n") == 1, err
    # The key deleted with an edit: a dmhpc that records its shards' rows' SHA-256 wrote the key too.
    manifest = json.loads(sealed)
    del manifest["content_sha256"]
    manifest["seed"] = 5
    path.write_text(json.dumps(manifest))
    with pytest.raises(DmhpcError, match=f"^{path}: edited since prepare wrote it \\(no content_sha256, which"):
        load_manifest(dataset)
    # A manifest of a dmhpc before the key (and before the shards' rows_sha256) is read as it is.
    manifest = json.loads(sealed)
    del manifest["content_sha256"]
    for shard in manifest["shards"]:
        del shard["rows_sha256"]
    path.write_text(json.dumps(manifest))
    assert json.dumps(load_manifest(dataset), default=np.ndarray.tolist) == json.dumps(manifest)
    assert verify_dataset(dataset) == []


def test_a_label_equal_to_the_number_of_classes_is_outside_them(dataset, capsys):
    """Labels run from 0 to num_classes - 1: a shard label equal to num_classes passed the range
    check and verify died counting it, with an IndexError traceback."""
    with h5py.File(dataset / shard_name(0), "r+") as f:
        f["labels"][0] = 2
    reseal(dataset, 0)
    assert verify_dataset(dataset) == ["shard-00000.h5: label 2 at row 0 is outside the 2 classes"]
    assert main(["verify", str(dataset)]) == 1
    err = capsys.readouterr().err
    assert "shard-00000.h5: label 2 at row 0 is outside the 2 classes" in err and err.count("\n") == 1, err


def test_a_shard_without_its_index_is_named(dataset):
    """The index dataset was not among those looked for: a shard without it was a KeyError
    traceback out of verify."""
    with h5py.File(dataset / shard_name(0), "r+") as f:
        del f["index"]
    reseal(dataset, 0)
    assert verify_dataset(dataset) == ["shard-00000.h5 has no dataset 'index'"]


def test_an_unlabelled_set_with_a_label_fails_the_structure_check(tmp_path):
    """An unlabelled data set's labels are all -1: one edited to a class passed data.verify=structure
    (checksums=False), where only the checksum had caught it."""
    images = np.random.default_rng(0).normal(size=(20, 3, 6, 6)).astype(np.float32)
    write_dataset(images, None, None, tmp_path / "survey", shard_size=8, seed=0)
    with h5py.File(tmp_path / "survey" / shard_name(1), "r+") as f:
        f["labels"][2] = 0
    start = load_manifest(tmp_path / "survey")["shards"][1]["start"]
    assert verify_dataset(tmp_path / "survey", checksums=False) == [
        f"shard-00001.h5: label 0 at row {start + 2} is in an unlabelled data set (expected -1)"]


@pytest.mark.parametrize("key", ["labels", "objects", "index"])
def test_labels_objects_or_index_stored_as_floats_fail_the_structure_check(dataset, key):
    """A column rewritten as floats (half-way values) passed data.verify=structure (checksums=False):
    it was read truncated to the integers it should have held."""
    with h5py.File(dataset / shard_name(1), "r+") as f:
        values = f[key][()] + 0.5
        del f[key]
        f.create_dataset(key, data=values)
    assert verify_dataset(dataset, checksums=False) == [
        f"shard-00001.h5: {key} float64 (16,), expected integers (16,)"]


def test_a_shard_of_another_preparation_fails_the_structure_check(dataset, tmp_path):
    """The same objects, seed and fractions draw the same split: a shard copied from the set prepared
    again from changed images passed `verify --structure-only` (and a run's data.verify=structure),
    and the run stopped at its first read of it."""
    rng = np.random.default_rng(0)
    n = 60
    rng.normal(1.0, 2.0, size=(n, 3, 6, 6))  # the fixture's draws, in its order
    labels = np.arange(n) % 2
    objects = rng.permutation(np.arange(n) // 3) + 1000
    changed = np.random.default_rng(9).normal(1.0, 2.0, size=(n, 3, 6, 6)).astype(np.float32)
    write_dataset(changed, labels, objects, tmp_path / "again", shard_size=16, seed=3)
    (dataset / shard_name(1)).write_bytes((tmp_path / "again" / shard_name(1)).read_bytes())
    reseal(dataset, 1)  # its checksum recorded, as a tool would: the rows' digest still tells
    problems = verify_dataset(dataset, checksums=False)
    assert problems == [f"{shard_name(1)}: its rows' digest (rows_sha256) is not the manifest's: a shard of another "
                        f"preparation of this data set"], problems
