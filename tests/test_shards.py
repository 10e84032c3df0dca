"""The sharded format: write_dataset, RowReader, load_manifest, split_rows, info (verify: test_check.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle

import h5py
import numpy as np
import pytest

from dmhpc.cli import main
from dmhpc.data.shards import (
    INCOMPLETE,
    MANIFEST,
    SPLITS,
    RowReader,
    fingerprint,
    load_manifest,
    shard_name,
    split_order,
    split_rows,
    write_dataset,
)
from dmhpc.errors import DmhpcError


def make_arrays(n=60, channels=3, size=6, copies=3, seed=0, dtype=np.float32):
    """Images whose pixels encode their index, labels, and object ids shared by `copies` images."""
    rng = np.random.default_rng(seed)
    images = rng.normal(1.0, 2.0, size=(n, channels, size, size)).astype(dtype)
    labels = rng.integers(0, 2, n)
    objects = rng.permutation(np.arange(n) // copies) + 1000  # copies of one object are scattered
    return images, labels, objects


@pytest.fixture
def dataset(tmp_path):
    images, labels, objects = make_arrays()
    manifest = write_dataset(images, labels, objects, tmp_path / "ds", shard_size=16, seed=3)
    return tmp_path / "ds", manifest, (images, labels, objects)


def read_all(directory):
    with RowReader(directory) as reader:
        return reader.read(0, len(reader))


def test_round_trip_by_index(dataset):
    directory, manifest, (images, labels, objects) = dataset
    rows = read_all(directory)
    assert sorted(rows["index"]) == list(range(len(images)))
    np.testing.assert_array_equal(rows["images"], images[rows["index"]])
    np.testing.assert_array_equal(rows["labels"], labels[rows["index"]])
    np.testing.assert_array_equal(rows["objects"], objects[rows["index"]])
    # A range spanning three shards equals the same slice of the whole.
    with RowReader(directory) as reader:
        part = reader.read(10, 40)
    for key in rows:
        np.testing.assert_array_equal(part[key], rows[key][10:40])
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 16, 12]
    assert sorted(os.listdir(directory)) == [MANIFEST] + [shard_name(k) for k in range(4)]


def test_manifest_keys_and_contract(dataset):
    directory, manifest, (images, labels, _) = dataset
    loaded = load_manifest(directory)
    assert json.dumps(loaded, default=np.ndarray.tolist) == json.dumps(manifest)
    assert all(loaded["splits"][s].dtype == np.int64 and not loaded["splits"][s].flags.writeable for s in SPLITS)
    assert list(manifest) == [
        "format", "version", "count", "shape", "dtype", "num_classes", "seed", "fractions", "shards",
        "rows", "splits", "counts", "stats", "inputs", "layout", "created_by", "labelled", "ids", "objects",
        "content_sha256",
    ]
    assert manifest["labelled"] is True and manifest["ids"] is False
    assert manifest["format"] == "dmhpc-shards" and manifest["version"] == 1
    assert manifest["count"] == 60 and manifest["shape"] == [3, 6, 6] and manifest["dtype"] == "float32"
    assert manifest["fractions"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    rows = read_all(directory)
    for split in SPLITS:
        start, stop = split_rows(manifest, split)
        assert manifest["splits"][split] == rows["index"][start:stop].tolist()
        counts = np.bincount(labels[manifest["splits"][split]], minlength=2)
        assert manifest["counts"][split] == {"0": int(counts[0]), "1": int(counts[1])}
        assert manifest["objects"][split] == len(set(rows["objects"][start:stop]))


def test_stats_are_float64_stats_of_training_split(dataset):
    directory, manifest, (images, _, _) = dataset
    train = images[manifest["splits"]["train"]].astype(np.float64)
    np.testing.assert_allclose(manifest["stats"]["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(manifest["stats"]["std"], train.std(axis=(0, 2, 3)), rtol=1e-12)
    everything = images.astype(np.float64)
    assert not np.allclose(manifest["stats"]["mean"], everything.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_stats_keep_their_digits_far_from_zero_and_a_constant_channel_has_no_spread(tmp_path):
    """M2 was sum(x^2) - n mean^2: a constant channel of 1234.567 got a std of 2.7e-4 (the trainer
    refuses a zero one: it cannot normalize; it divided by that instead, a target of another spread
    multiplied by thousands), and pixels of 3e6 +- 1 a std 5% low."""
    images, labels, objects = make_arrays(n=400, size=16)
    images[:, 0] += np.float32(3e6)
    images[:, 1] = np.float32(1234.567)
    manifest = write_dataset(images, labels, objects, tmp_path / "ds", shard_size=64)
    train = images[manifest["splits"]["train"]].astype(np.float64)
    assert manifest["stats"]["std"][1] == 0.0 and manifest["stats"]["mean"][1] == float(np.float32(1234.567))
    np.testing.assert_allclose(manifest["stats"]["std"], train.std(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(manifest["stats"]["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_splits_partition_indices_and_never_share_an_object(dataset):
    _, manifest, (_, _, objects) = dataset
    parts = [manifest["splits"][s] for s in SPLITS]
    assert sorted(sum(parts, [])) == list(range(60))
    ids = [set(objects[p]) for p in parts]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    # Every object has 3 images, so 0.7, 0.1, 0.2 of 60 images are met exactly.
    assert [len(p) for p in parts] == [42, 6, 12]
    # Train rows are shuffled; val and test are in input order.
    assert parts[0] != sorted(parts[0])
    assert parts[1] == sorted(parts[1]) and parts[2] == sorted(parts[2])


def test_each_image_its_own_object_when_objects_is_none(tmp_path):
    images, labels, _ = make_arrays(n=50)
    manifest = write_dataset(images, labels, None, tmp_path / "ds", shard_size=64)
    assert [len(manifest["splits"][s]) for s in SPLITS] == [35, 5, 10]
    np.testing.assert_array_equal(read_all(tmp_path / "ds")["objects"], read_all(tmp_path / "ds")["index"])


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    images, labels, objects = make_arrays()
    a = write_dataset(images, labels, objects, tmp_path / "a", shard_size=16, seed=5)
    write_dataset(images, labels, objects, tmp_path / "b", shard_size=16, seed=5)
    for name in [MANIFEST] + [s["file"] for s in a["shards"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = write_dataset(images, labels, objects, tmp_path / "c", shard_size=16, seed=6)
    assert c["splits"] != a["splits"]
    assert [s["sha256"] for s in c["shards"]] != [s["sha256"] for s in a["shards"]]


def test_float16_output_and_float64_input(tmp_path):
    images, labels, objects = make_arrays(dtype=np.float64)
    m = write_dataset(images, labels, objects, tmp_path / "h", dtype="float16", shard_size=16)
    rows = read_all(tmp_path / "h")
    assert m["dtype"] == "float16" and rows["images"].dtype == np.float16
    np.testing.assert_array_equal(rows["images"], images[rows["index"]].astype(np.float16))
    stored = images[m["splits"]["train"]].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(m["stats"]["mean"], stored.mean(axis=(0, 2, 3)), rtol=1e-12)
    m32 = write_dataset(images, labels, objects, tmp_path / "s", shard_size=16)
    assert read_all(tmp_path / "s")["images"].dtype == np.float32 and m32["splits"] == m["splits"]


def test_float16_overflow_is_refused(tmp_path):
    images, labels, objects = make_arrays()
    images[7, 1, 2, 3] = 1e6
    with pytest.raises(DmhpcError, match="overflow float16"):
        write_dataset(images, labels, objects, tmp_path / "h", dtype="float16")
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("value, what", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")])
def test_bad_pixels_write_nothing(tmp_path, value, what):
    images, labels, objects = make_arrays()
    images[11, 0, 0, 0] = value
    images[30, 2, 1, 1] = value
    with pytest.raises(DmhpcError, match=rf"images: 2 {what} pixels \(first in image 11\)"):
        write_dataset(images, labels, objects, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_output_directory_rules(tmp_path, dataset):
    directory, manifest, (images, labels, objects) = dataset
    with pytest.raises(DmhpcError, match="already holds a data set"):
        write_dataset(images, labels, objects, directory)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DmhpcError, match=r"other: exists and is not empty .*notes\.txt"):
        write_dataset(images, labels, objects, tmp_path / "other")
    # --overwrite replaces the data set but never deletes files dmhpc did not write.
    write_dataset(images, labels, objects, tmp_path / "other", overwrite=True, shard_size=16)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    new = write_dataset(images, labels, objects, directory, overwrite=True, shard_size=100)
    assert sorted(os.listdir(directory)) == [MANIFEST, "shard-00000.h5"] and new["count"] == 60


def test_files_named_as_ours_are_not_taken_for_ours(tmp_path, dataset):
    """Ownership went by name: someone's shard-00000.h5 was taken for an interrupted conversion and
    deleted without --overwrite, and --overwrite deleted another tool's manifest.json."""
    _, _, (images, labels, objects) = dataset
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "shard-00000.h5").write_bytes(b"someone's")
    for overwrite in (False, True):
        with pytest.raises(DmhpcError, match=r"theirs: holds shard-00000.h5 but no dmhpc manifest nor the mark of a "
                                             r"conversion under way \(.dmhpc-incomplete\): not dmhpc's to replace"):
            write_dataset(images, labels, objects, theirs, overwrite=overwrite)
    assert os.listdir(theirs) == ["shard-00000.h5"] and (theirs / "shard-00000.h5").read_bytes() == b"someone's"
    web = tmp_path / "web"
    web.mkdir()
    (web / MANIFEST).write_text('{"name": "my app", "icons": []}')
    with pytest.raises(DmhpcError, match=r"web/manifest.json: not a dmhpc data set's manifest"):
        write_dataset(images, labels, objects, web, overwrite=True)
    assert os.listdir(web) == [MANIFEST] and "my app" in (web / MANIFEST).read_text()
    # A conversion killed midway left its mark: completed, and the mark gone with the manifest in place.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "shard-00003.h5").write_bytes(b"half written")
    (killed / INCOMPLETE).touch()
    write_dataset(images, labels, objects, killed, shard_size=100)
    assert sorted(os.listdir(killed)) == [MANIFEST, "shard-00000.h5"]


def test_a_manifest_is_known_as_ours_by_its_first_line(dataset, monkeypatch):
    """Whose a manifest.json is was decided by parsing it whole, on every rank of a conversion: a GB
    of split lists at 1e8 rows. This format's first line decides; another layout is parsed."""
    from dmhpc.data import shards

    directory, _, _ = dataset
    loads = []
    parse = json.loads
    monkeypatch.setattr(shards.json, "loads", lambda *a, **k: loads.append(a) or parse(*a, **k))
    shards.check_output_dir(directory, overwrite=True)
    assert shards.holds_dataset(directory) and loads == []
    (directory / MANIFEST).write_text(' {"count": 1, "format": "dmhpc-shards"}')  # ours, laid out otherwise
    assert shards.holds_dataset(directory) and len(loads) == 1


def test_a_mark_that_cannot_be_made_takes_back_only_the_marks_made_with_it(tmp_path, monkeypatch):
    """A folder an interrupted conversion left marked stays refused when the next conversion's marks
    fail: taking its mark back would make a half-replaced set readable."""
    from dmhpc.data.shards import mark_datasets

    left, fresh, full = (tmp_path / name for name in ("left", "fresh", "full"))
    for folder in (left, fresh, full):
        folder.mkdir()
    (left / INCOMPLETE).touch()
    real_touch = type(tmp_path).touch

    def no_room(path, *rest, **named):
        if path.parent == full:
            raise OSError(28, os.strerror(28), str(path))
        return real_touch(path, *rest, **named)

    monkeypatch.setattr(type(tmp_path), "touch", no_room)
    with pytest.raises(DmhpcError, match=f"^{full / INCOMPLETE}: cannot mark the data set as being replaced "
                                         r"\(No space left on device\)$"):
        mark_datasets([left, fresh, full])
    assert (left / INCOMPLETE).exists() and not (fresh / INCOMPLETE).exists()


def test_a_staging_folder_that_cannot_be_removed_leaves_the_data_set_readable(tmp_path, monkeypatch, capsys):
    """The mark and the empty staging folder went in one try: a staging folder the file system would
    not remove (EBUSY on a network mount) kept the mark, and every reader refused the complete set
    after a conversion that said only to remove the staging folder."""
    from dmhpc.data.shards import STAGING

    real_rmdir = type(tmp_path).rmdir

    def busy(path):
        if path.name == STAGING:
            raise OSError(16, os.strerror(16), str(path))
        return real_rmdir(path)

    monkeypatch.setattr(type(tmp_path), "rmdir", busy)
    images, labels = np.zeros((10, 3, 8, 8), np.float32), np.arange(10) % 2
    write_dataset(images, labels, None, tmp_path / "set", shard_size=100)
    assert "could not be removed (Device or resource busy); remove it by hand" in capsys.readouterr().err
    assert load_manifest(tmp_path / "set")["count"] == 10


def test_a_mark_that_cannot_be_removed_is_an_error_naming_it(tmp_path, monkeypatch):
    """Left behind, the mark makes every reader refuse the set: the conversion must not end as a success."""
    real_unlink = type(tmp_path).unlink

    def refused(path, *rest, **named):
        if path.name == INCOMPLETE:
            raise OSError(13, os.strerror(13), str(path))
        return real_unlink(path, *rest, **named)

    monkeypatch.setattr(type(tmp_path), "unlink", refused)
    images, labels = np.zeros((10, 3, 8, 8), np.float32), np.arange(10) % 2
    with pytest.raises(DmhpcError, match=f"^{tmp_path / 'set' / INCOMPLETE}: cannot remove it \\(Permission denied\\), "
                                         "and readers refuse the data set until it goes"):
        write_dataset(images, labels, None, tmp_path / "set", shard_size=100)
    # Of a conversion into several folders, every mark is tried and every one left is named.
    from dmhpc.data.shards import STAGING, mark_datasets, publish_datasets

    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        (folder / STAGING).mkdir(parents=True)
        (folder / STAGING / MANIFEST).write_text("{}")
    mark_datasets(folders)
    with pytest.raises(DmhpcError) as refused_both:
        publish_datasets(folders)
    assert str(refused_both.value).endswith(f"remove the file by hand (and {folders[1] / INCOMPLETE}: Permission denied)")


def test_a_shard_of_a_data_set_prepared_again_under_a_reader_is_refused(dataset):
    """prepare --overwrite (another seed) while a run read the folder: the shards the run had not
    opened yet were the new set's, read under the old manifest's rows, labels and splits."""
    directory, manifest, (images, labels, objects) = dataset
    with RowReader(directory, manifest) as reader:
        reader.read(0, 10)  # shard 0 open, as a loader holds it
        write_dataset(images, labels, objects, directory, shard_size=16, seed=4, overwrite=True)
        assert np.array_equal(reader.read(0, 10)["images"], images[manifest["splits"]["train"][:10]])  # still the old file
        for _ in range(2):  # refused again: a shard refused once is not kept open, to be read unchecked
            with pytest.raises(DmhpcError, match=r"shard-00002.h5: its rows are not those the data set's manifest "
                                                 r"this run read gives it \(the data set was prepared again since\?\)"):
                reader.read(40, 50)
    with RowReader(directory) as reader:  # the new set, read with its own manifest
        rows = reader.read(0, len(reader))
    assert np.array_equal(rows["images"], images[rows["index"]])


@pytest.mark.parametrize("change", ["pixels", "labels"])
def test_a_shard_prepared_again_with_the_same_split_under_a_reader_is_refused(dataset, change):
    """The same objects, seed and fractions draw the same split: a set prepared again from changed
    images (re-rendered, another --nan-fill, float16) or labels put the same input positions in each
    shard, and its pixels were read without a word under the old manifest's statistics and dtype."""
    directory, manifest, (images, labels, objects) = dataset
    with RowReader(directory, manifest) as reader:
        reader.read(0, 10)
        changed = (images * 100 + 5, labels) if change == "pixels" else (images, 1 - labels)
        write_dataset(*changed, objects, directory, shard_size=16, seed=manifest["seed"], overwrite=True)
        assert all(s["rows_sha256"] != t["rows_sha256"]
                   for s, t in zip(manifest["shards"], load_manifest(directory)["shards"]))
        with pytest.raises(DmhpcError, match=r"shard-00002.h5: its rows are not those the data set's manifest "):
            reader.read(40, 50)
    # A set of an older dmhpc (no rows digest) is read as before; the same images again are the same rows.
    write_dataset(images, labels, objects, directory, shard_size=16, seed=manifest["seed"], overwrite=True)
    again = load_manifest(directory)
    assert [s["rows_sha256"] for s in again["shards"]] == [s["rows_sha256"] for s in manifest["shards"]]
    older = {**again, "shards": [{k: v for k, v in s.items() if k != "rows_sha256"} for s in again["shards"]]}
    with RowReader(directory, older) as reader:
        rows = reader.read(0, len(reader))
    assert np.array_equal(rows["images"], images[rows["index"]])


def test_a_shard_reopened_is_checked_again_only_when_its_file_changed(dataset, monkeypatch):
    """More shards read than stay open: every reopen read the shard's whole index again for the
    prepared-again check. The same file needs none; a file prepared again since is still refused."""
    directory, manifest, (images, labels, objects) = dataset
    checks = []
    check = RowReader._check_rows
    monkeypatch.setattr(RowReader, "_check_rows", lambda self, n, *a: checks.append(n) or check(self, n, *a))
    with RowReader(directory, manifest) as reader:
        reader.open_limit = 1
        for _ in range(3):
            reader.read(0, 4)  # shard 0
            reader.read(20, 24)  # shard 1, closing shard 0
        assert checks == [0, 1]
        write_dataset(images, labels, objects, directory, shard_size=16, seed=4, overwrite=True)
        with pytest.raises(DmhpcError, match="shard-00000.h5: its rows are not those"):
            reader.read(0, 4)  # reopened: another file now


def test_ranges_across_shards_read_as_their_rows_one_after_another(dataset):
    """The block loaders read a batch as pieces: each range's rows, shard boundaries (16 rows)
    crossed, empty ranges and the set's last row included, in order, the keys asked only."""
    directory, manifest, _ = dataset
    with RowReader(directory, manifest) as reader:
        whole = reader.read(0, len(reader))
        rng = np.random.default_rng(0)
        for _ in range(30):
            starts = rng.integers(0, len(reader), 5)
            ranges = [(int(a), int(min(a + rng.integers(0, 40), len(reader)))) for a in starts]
            got = reader.read_ranges(ranges, ("images", "labels"))
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            assert set(got) == {"images", "labels"}
            np.testing.assert_array_equal(got["images"], whole["images"][rows])
            np.testing.assert_array_equal(got["labels"], whole["labels"][rows])
        with pytest.raises(IndexError):
            reader.read_ranges([(0, 4), (len(reader) - 1, len(reader) + 1)])


def test_reader_opens_lazily_pickles_and_reopens(dataset):
    directory, manifest, _ = dataset
    reader = RowReader(directory, manifest)
    assert reader._files == {}
    first = reader.read(0, 20)
    assert reader._files  # open now
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.read(0, 20)["images"], first["images"])
    reader.close()
    clone.close()
    assert reader._files == {}
    np.testing.assert_array_equal(reader.read(0, 20)["index"], first["index"])
    reader.close()
    with pytest.raises(IndexError):
        reader.read(50, 61)
    assert reader.read(5, 5)["images"].shape == (0, 3, 6, 6)


def test_a_manifest_is_read_once_until_its_file_changes(dataset, monkeypatch):
    """A run read each manifest ~10 times (preflight, loaders, every evaluation), each a parse, a
    check of every field and two hashes: minutes per rank at 1e8 rows. Read once now, until its file
    is written again; the index lists read-only int64 arrays, shared by every caller."""
    from dmhpc.data import shards

    directory, manifest, _ = dataset
    parses = []
    read = shards._read_manifest
    monkeypatch.setattr(shards, "_read_manifest", lambda *a: parses.append(1) or read(*a))
    first = load_manifest(directory)
    assert load_manifest(directory) is first and len(parses) == 1
    with pytest.raises(ValueError):
        first["splits"]["train"][0] = 5
    assert fingerprint(first) == fingerprint(json.loads((directory / MANIFEST).read_text()))
    # Written again, in place or replaced (prepare's move): read anew.
    (directory / MANIFEST).write_text((directory / MANIFEST).read_text())
    again = load_manifest(directory)
    assert again is not first and len(parses) == 2
    (directory / MANIFEST).write_text("{}")
    with pytest.raises(DmhpcError, match="not a JSON object|format"):
        load_manifest(directory)


def test_a_pickled_reader_carries_no_index_lists(tmp_path):
    """A reader is pickled to every loader worker (DALI's spawned ones): with the manifest's index
    lists, 0.8 GB a copy at 1e8 rows. It carries a 16-byte digest per shard instead."""
    n = 20000
    rng = np.random.default_rng(0)
    write_dataset(rng.normal(size=(n, 1, 2, 2)).astype(np.float32), np.arange(n) % 2, None, tmp_path / "ds",
                  shard_size=4096)
    reader = RowReader(tmp_path / "ds")
    lists = json.loads((tmp_path / "ds" / MANIFEST).read_text())["splits"]
    assert len(pickle.dumps(reader)) < len(pickle.dumps(lists)) / 10
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read(0, n)["index"], reader.read(0, n)["index"])


def test_a_reader_opens_its_shards_without_a_chunk_cache(tmp_path):
    """Each open shard kept h5py's 1 MiB chunk cache per dataset (~2 MB a shard; a resident load kept
    84 open, 186 MiB, and a reader may keep 512), for rows that are read once."""
    rng = np.random.default_rng(0)
    write_dataset(rng.normal(size=(64, 3, 8, 8)).astype(np.float32), np.arange(64) % 2, None, tmp_path / "ds",
                  shard_size=16)
    with RowReader(tmp_path / "ds") as reader:
        reader.read(0, 64)
        assert len(reader._files) == 4
        assert all(f.id.get_access_plist().get_cache()[2] == 0 for f in reader._files.values())


MANY_SHARDS = """
import resource, sys
import numpy as np
from dmhpc.data.shards import RowReader
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # a tight limit, as 1024 is for 50,000 shards
with RowReader(sys.argv[1]) as reader:
    whole = np.concatenate([reader.read(a, a + 1)["index"] for a in range(len(reader))])
    rows = np.random.default_rng(0).permutation(len(reader))[:200]  # a loader's blocks, all over the set
    got = reader.read_ranges([(int(a), int(a) + 1) for a in rows], ("index",))["index"]
    assert np.array_equal(got, whole[rows]) and len(reader._files) <= reader.open_limit == 16
print("read", len(reader))
"""


def test_a_reader_keeps_a_bounded_number_of_shards_open(tmp_path):
    """Every shard a loader read stayed open: reading blocks from all over a data set of more shards
    than the process's file descriptors ended in "Too many open files" (in the torch loader, feeder
    tracebacks and a hang), and each open shard held ~2.4 MB of HDF5 caches."""
    import subprocess
    import sys

    images, labels, objects = make_arrays(n=200, copies=1)
    write_dataset(images, labels, objects, tmp_path / "ds", shard_size=1, seed=3)  # 200 shards
    proc = subprocess.run([sys.executable, "-c", MANY_SHARDS, str(tmp_path / "ds")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == "read 200\n", proc.stderr[-2000:]


def _worker_sum(reader, start, stop, queue):
    queue.put(float(reader.read(start, stop)["images"].astype(np.float64).sum()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_processes(dataset, method):
    directory, _, _ = dataset
    reader = RowReader(directory)
    expected = float(reader.read(3, 50)["images"].astype(np.float64).sum())  # parent has files open
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    worker = ctx.Process(target=_worker_sum, args=(reader, 3, 50, queue))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    assert worker.exitcode == 0 and got == expected
    reader.close()


def test_split_rows_and_bad_split(dataset):
    _, manifest, _ = dataset
    n_train = len(manifest["splits"]["train"])
    assert split_rows(manifest, "train") == (0, n_train)
    assert split_rows(manifest, "test")[1] == 60
    with pytest.raises(DmhpcError, match="unknown split 'validation'"):
        split_rows(manifest, "validation")


def test_load_manifest_errors_name_the_file(tmp_path, dataset):
    directory, manifest, _ = dataset
    with pytest.raises(DmhpcError, match=rf"{tmp_path / 'nowhere' / MANIFEST}: missing"):
        load_manifest(tmp_path / "nowhere")
    path = directory / MANIFEST
    for text in ("{not json", "[" * 100000 + "]" * 100000):  # (nested past the stack: a traceback)
        path.write_text(text)
        with pytest.raises(DmhpcError, match=rf"{path}: not a valid manifest"):
            load_manifest(directory)
    broken = dict(manifest)
    del broken["stats"]
    path.write_text(json.dumps(broken))
    with pytest.raises(DmhpcError, match=rf"{path}: missing key 'stats'"):
        load_manifest(directory)
    rows = {s: list(r) for s, r in manifest["rows"].items()}
    rows["val"][0] += 1  # a gap between train and val
    broken = dict(manifest, rows=rows)
    path.write_text(json.dumps(broken))
    with pytest.raises(DmhpcError, match=r"rows\['val'\]"):
        load_manifest(directory)


def test_info_text_and_json(dataset, capsys):
    directory, manifest, _ = dataset
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "60 x 3x6x6 float32" in out and "4 of up to 16 rows" in out
    a, b = manifest["rows"]["val"]
    assert f"[{a}, {b})" in out
    assert main(["info", str(directory), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == manifest["counts"] and "splits" not in summary
    assert summary["bytes"] == sum((directory / s["file"]).stat().st_size for s in manifest["shards"])


def _edit(manifest, key, change):
    edited = json.loads(json.dumps(manifest))
    change(edited[key])
    return edited


def _set(key, value):
    return lambda m: dict(json.loads(json.dumps(m)), **{key: value})


def _add_image(counts):
    counts["train"]["0"] += 1


def _more_objects_than_rows(objects):
    objects["val"] = 1000


def _no_val_objects(objects):
    objects["val"] = 0


def _negative_std(stats):
    stats["std"][1] = -1.0


# The manifest of `dataset` (60 rows, fractions 0.7/0.1/0.2) with one hand-edited field that is
# inconsistent with the rest: each passed `dmhpc verify`.
INCONSISTENT = [
    (_set("seed", -1), "seed -1: expected an integer >= 0"),
    (_set("layout", "CHW"), "layout 'CHW': expected one of NCHW, NHWC"),
    (_set("fractions", {"train": 0.7, "val": 0.4, "test": 0.2}), "fractions 0.7,0.4,0.2: need train > 0, val and test"),
    (_set("fractions", {"train": 1.2, "val": -0.4, "test": 0.2}), "fractions 1.2,-0.4,0.2: need train > 0"),
    (_set("fractions", {"train": 0.95, "val": 0.05, "test": 0.0}), "fraction 0.95 of 60 draws at least 57"),
    (_set("fractions", {"train": 0.7, "val": 0.3, "test": 0.0}),
     "train and val hold 48 rows; fractions 0.7 and 0.3 of 60 draw at least 60"),
    (_set("fractions", {"train": 0.7, "val": 0.0, "test": 0.3}), "rows['val']: 6 rows; its fraction is 0"),
    (lambda m: _edit(m, "counts", _add_image), "counts['train']: "),
    (lambda m: _edit(m, "objects", _more_objects_than_rows), "objects['val'] 1000: expected 1 to 6 for the 6 rows"),
    (lambda m: _edit(m, "objects", _no_val_objects), "objects['val'] 0: expected 1 to 6 for the 6 rows"),
    (lambda m: _edit(m, "stats", _negative_std), "stats.std"),
]


@pytest.mark.parametrize("edit, problem", INCONSISTENT)
def test_an_inconsistent_hand_edited_manifest_is_refused(dataset, capsys, edit, problem):
    directory, manifest, _ = dataset
    assert [manifest["rows"][s][1] - manifest["rows"][s][0] for s in SPLITS] == [42, 6, 12]  # what the edits assume
    (directory / MANIFEST).write_text(json.dumps(edit(manifest)))
    with pytest.raises(DmhpcError) as info:
        load_manifest(directory)
    assert str(info.value).startswith(f"{directory / MANIFEST}: ") and problem in str(info.value), str(info.value)
    assert main(["verify", str(directory)]) == 1
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1, err


def test_every_split_the_writer_draws_passes_the_manifest_checks(tmp_path):
    """The checks of what the fractions imply hold for any objects, seed and fractions the writer takes."""
    rng = np.random.default_rng(11)
    for k, fractions in enumerate([(0.7, 0.1, 0.2), (0.5, 0.0, 0.5), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33),
                                   (0.8, 0.2, 0.0), (0.2, 0.75, 0.05)]):
        for seed in range(4):
            n = int(rng.integers(5, 60))
            objects = np.repeat(np.arange(n), rng.integers(1, 6, n))[:n]  # objects of 1 to 5 images
            images = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
            out = tmp_path / f"{k}-{seed}"
            write_dataset(images, rng.integers(0, 2, n), objects, out, shard_size=8, seed=seed, fractions=fractions)
            load_manifest(out)
    # Fractions summing to 1 + 1e-6 (allowed) on 600,000 rows: round((f_train + f_val) * N) is N + 1.
    n = 600_000
    write_dataset(np.zeros((n, 1, 1, 1), np.float16), np.arange(n) % 2, None, tmp_path / "large", shard_size=n,
                  dtype="float16", fractions=(0.6, 0.4000009, 0.0))
    load_manifest(tmp_path / "large")


def test_a_small_shard_is_not_mostly_chunk_padding(tmp_path):
    """HDF5 stores a shard's last chunk whole: 400 images of 3x16x16 in chunks of 341 rows took 2.1 MB
    for 1.2 MB of pixels, and a disk the data fitted on refused the shard. The rows are shared out
    evenly over the chunks."""
    images = np.random.default_rng(0).normal(size=(400, 3, 16, 16)).astype(np.float32)
    write_dataset(images, np.arange(400) % 2, None, tmp_path / "ds", shard_size=400, seed=0)
    with h5py.File(tmp_path / "ds" / shard_name(0)) as f:
        assert f["images"].chunks == (200, 3, 16, 16)
    assert os.path.getsize(tmp_path / "ds" / shard_name(0)) < 1.05 * images.nbytes


def test_a_read_that_fails_midway_names_the_shard(dataset, monkeypatch):
    """An I/O error of the disk or network file system during training was an OSError traceback
    naming no file ("[Errno 5] Input/output error"), on every rank."""
    directory, _, _ = dataset

    def failing(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    with RowReader(directory) as reader:
        reader.read(0, 2)  # opened
        monkeypatch.setattr(h5py.Dataset, "read_direct", failing)
        with pytest.raises(DmhpcError, match=rf"^{directory / shard_name(0)}: cannot read rows 0 to 1: "
                                             rf"\[Errno 5\] Input/output error$"):
            reader.read(0, 2)


def test_a_shard_damaged_under_an_open_reader_is_named(dataset):
    """A shard whose datasets went (moved, a group in one's place) after the start's checks: h5py's
    KeyError and TypeError were tracebacks naming no file, where an OSError was one line."""
    directory, _, _ = dataset
    path = directory / shard_name(1)
    with RowReader(directory) as reader:
        reader.read(0, 2)
        with h5py.File(path, "a") as f:
            f.move("labels", "moved")
            del f["objects"]
            f.create_group("objects")
        for key, reason in (("labels", "Unable to synchronously open object .object 'labels' doesn't exist."),
                            ("objects", "Accessing a group is done with bytes or str, not <class 'slice'>")):
            with pytest.raises(DmhpcError, match=rf"^{path}: cannot read rows 0 to 3: {reason}$"):
                reader.read_ranges([(16, 20)], [key])


def test_a_shard_cut_short_under_an_open_reader_is_an_error_not_zeros(dataset):
    """HDF5 reads zeros past the end of a file cut short after it was opened (a truncation, or a
    copy over the shard in progress while a trainer reads it): the rows were trained on as blank
    images. `touch` and chmod change no byte, and are no error. (A copy of the same size, finished
    between two reads, is not seen: the checks at the next start are.)"""
    directory, manifest, _ = dataset
    path = directory / shard_name(0)
    with RowReader(directory, manifest) as reader:
        before = reader.read(0, 16)
        assert np.abs(before["images"][-1]).sum() > 0
        os.utime(path, (1, 1))
        os.chmod(path, 0o444)
        np.testing.assert_array_equal(reader.read(0, 16)["images"], before["images"])
        os.truncate(path, os.path.getsize(path) // 2)
        with pytest.raises(DmhpcError, match=rf"^{path}: its size changed while being read \(cut short or written "
                                             rf"over\); the rows read from it cannot be trusted"):
            reader.read(0, 16)
    # A new reader (the next start) opens no cut file: HDF5 refuses it, named.
    with pytest.raises(DmhpcError, match=rf"^{path}: cannot open shard \(.*truncated file"):
        RowReader(directory, manifest).read(0, 16)


def test_a_shard_missing_from_the_staging_folder_is_refused_before_the_manifest(tmp_path):
    """A shard written elsewhere (a rank on another node's disk) was left out of the data set in
    silence: the manifest listed it, the move took what the folder held."""
    from dmhpc.data.shards import DTYPES, SPLIT_FRACTIONS, finish_dataset, plan_dataset, write_shards

    images, labels, objects = make_arrays()
    plan = plan_dataset(images, labels, objects, shard_size=16, seed=3, fractions=SPLIT_FRACTIONS, dtype=DTYPES[0],
                        num_classes=2)
    staging = tmp_path / "staging"
    staging.mkdir()
    results = write_shards([(plan, staging, k) for k in range(plan.num_shards)])
    (staging / shard_name(1)).unlink()
    (staging / shard_name(3)).unlink()
    with pytest.raises(DmhpcError, match=rf"{shard_name(1)}: written by this conversion but not found \(and 1 more\): "
                                          r"do all ranks write to one shared file system\?"):
        finish_dataset(plan, staging, results)
    assert not (staging / MANIFEST).exists()


def test_a_negative_pixel_beyond_float16_is_refused_as_a_positive_one_is(tmp_path):
    """Only the largest pixel was held to float16's range: an image holding -1e6 was written, its
    pixel stored as -Inf, and the statistics and training took it in."""
    images, labels, objects = make_arrays()
    images[7, 1, 2, 3] = -1e6
    with pytest.raises(DmhpcError) as info:
        write_dataset(images, labels, objects, tmp_path / "h", dtype="float16")
    assert str(info.value) == "images: pixel values up to 1e+06 overflow float16 (max 6.55e+04)"
    assert not (tmp_path / "h").exists()


def test_float16_pixels_at_the_edge_of_its_range(tmp_path):
    """65504 and -65504 are stored as they are; 7e4 is refused with nothing written (a limit twice
    float16's largest number stored it as Inf)."""
    images, labels, objects = make_arrays()
    images[3, 0, 0, 0], images[4, 2, 5, 5] = 65504, -65504
    write_dataset(images, labels, objects, tmp_path / "edge", dtype="float16", shard_size=16)
    rows = read_all(tmp_path / "edge")
    stored = rows["images"][np.argsort(rows["index"])]
    assert np.isfinite(stored).all() and stored[3, 0, 0, 0] == 65504 and stored[4, 2, 5, 5] == -65504
    images[4, 2, 5, 5] = 7e4
    with pytest.raises(DmhpcError) as info:
        write_dataset(images, labels, objects, tmp_path / "over", dtype="float16")
    assert str(info.value) == "images: pixel values up to 7e+04 overflow float16 (max 6.55e+04)"
    assert not (tmp_path / "over").exists()


def test_object_ids_of_more_than_one_column_are_refused():
    """A 2-D objects array (ids and a second column, say) has as many rows as images: it was taken
    as object ids, and the split went on to fail with an IndexError traceback."""
    from dmhpc.data.shards import check_objects

    with pytest.raises(DmhpcError) as info:
        check_objects(np.stack([np.arange(60), np.arange(60)], axis=1), 60, "o.npy")
    assert str(info.value) == "o.npy: shape (60, 2); expected one object id per image (N,)"


def test_fractions_must_sum_to_one_within_a_millionth():
    """Fractions summing to 0.995 were taken as summing to 1 (the tolerance was 1e-2), and the
    split drew from fractions the user never meant."""
    from dmhpc.data.shards import check_fractions

    with pytest.raises(DmhpcError) as info:
        check_fractions((0.7, 0.1, 0.195))
    assert str(info.value) == "fractions 0.7,0.1,0.195: need train > 0, val and test >= 0, sum 1"
    assert check_fractions((0.7, 0.1, 0.2000005)) == (0.7, 0.1, 0.2000005)


def _documented_draw(objects: np.ndarray, seed: int, fractions) -> dict:
    """The split as docs/data-format.md words it ("The draw, exactly"), written as plainly."""
    f_train, f_val, _ = fractions
    rng = np.random.default_rng(seed)
    ids = np.unique(objects)
    n = len(objects)
    splits = {"train": [], "val": [], "test": []}
    for obj in ids[rng.permutation(len(ids))]:
        rows = np.flatnonzero(objects == obj).tolist()
        if len(splits["train"]) < round(f_train * n):
            splits["train"] += rows
        elif len(splits["train"]) + len(splits["val"]) < round((f_train + f_val) * n):
            splits["val"] += rows
        else:
            splits["test"] += rows
    return {"train": rng.permutation(sorted(splits["train"])).tolist(), "val": sorted(splits["val"]),
            "test": sorted(splits["test"])}


@pytest.mark.parametrize("seed", [0, 5])
def test_the_split_is_the_documented_draw(tmp_path, seed):
    """The docs give the draw exactly, so that a data set is the same across versions: int() for
    round() at a fractional 0.7 N, or a new generator for the training order, drew another split
    and no property test saw it."""
    objects = np.r_[np.arange(26), np.repeat(np.arange(26, 30), 3)] + 500  # 38 images; 0.7 N = 26.6
    fractions = (0.7, 0.15, 0.15)
    expected = _documented_draw(objects, seed, fractions)
    got = split_order(objects, seed, fractions)
    assert {k: v.tolist() for k, v in got.items()} == expected
    rng = np.random.default_rng(0)
    manifest = write_dataset(rng.normal(size=(38, 1, 4, 4)).astype(np.float32), np.arange(38) % 2, objects,
                             tmp_path / "ds", shard_size=16, seed=seed, fractions=fractions)
    assert {k: [int(i) for i in manifest["splits"][k]] for k in expected} == expected


def test_info_prints_the_fingerprint_runs_and_model_cards_name_the_data_set_by(dataset, capsys):
    """A model card names its data sets by fingerprint (the SHA-256 of the manifest's content, not
    of the file's bytes): nothing a receiver could run printed it to compare."""
    from dmhpc.data.shards import fingerprint

    directory, _, _ = dataset
    expected = fingerprint(load_manifest(directory))
    assert main(["info", str(directory)]) == 0
    assert f"\nfingerprint {expected}\n" in capsys.readouterr().out
    assert main(["info", str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == expected
