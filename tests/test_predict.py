"""`dmhpc predict`: the catalog equals the model's forward pass, in input order, in every format; the
same with 2 ranks as with 1; a killed or signalled job resumes to the same catalog. Real runs,
real FITS and Parquet files (astropy), real torchrun and mpiexec ranks, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dmhpc
from tests.conftest import BIN, ROOT, TINY, clean_env
from dmhpc.cli import main
from dmhpc.data.shards import RowReader, load_manifest
from dmhpc.run import RunDir
from dmhpc.train.checkpoint import REQUEUE_EXIT_CODE, load_checkpoint
from dmhpc.train.objective import build_backbone


@pytest.fixture(scope="module")
def trained(make_domains, tmp_path_factory):
    """A run trained one epoch on a 64-image pair, and a 200-image unlabelled 'survey'."""
    data = make_domains(64)
    run = tmp_path_factory.mktemp("predict") / "run"
    assert main(["train", "--config", str(TINY), f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}",
                 f"run.dir={run}", "train.epochs=1"]) == 0
    rng = np.random.default_rng(7)
    survey = rng.normal(0.5, 0.4, (200, 3, 75, 75)).astype(np.float32)
    np.save(data / "survey.npy", survey)
    return {"run": run, "data": data, "survey": data / "survey.npy", "images": survey}


def read(path: Path):
    from astropy.table import Table

    # format= always: without it astropy hands pyarrow a Python file object, and pyarrow 26 can
    # then abort the interpreter at exit (a background read holding a Python buffer).
    fmt = {".parquet": "parquet", ".h5": "hdf5"}.get(path.suffix)
    kwargs = {"path": "catalog"} if fmt == "hdf5" else {}
    return Table.read(path, format=fmt, **kwargs) if fmt else Table.read(path)


def expected_probabilities(run: Path, images: np.ndarray, mean, std, batch: int) -> np.ndarray:
    """The model's forward pass on the same normalized batches, by hand."""
    cfg = RunDir(run).config()
    net = build_backbone(cfg, images.shape[1]).eval()
    net.load_state_dict(load_checkpoint(RunDir(run).checkpoint("best"))["model"])
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    scale, shift = (1 / s).float(), (-m / s).float()
    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch):
            x = torch.addcmul(shift, torch.from_numpy(images[a:a + batch]), scale)
            out.append(torch.softmax(net(x)[1].double(), dim=1)[:, 1].numpy())  # float64, as predict
    return np.concatenate(out)


def test_a_run_json_with_one_statistic_for_three_channels_is_refused_not_broadcast(trained, tmp_path, capsys):
    """One mean and std for the three filters broadcast over them: predict wrote p_merger of 0 and 1 only.
    The statistics are read from the checkpoint; one of an older dmhpc holds none, and run.json's are read."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    state["data"]["target"].update(mean=[0.4], std=[0.0001])
    torch.save(state, best)
    out = tmp_path / "c.ecsv"
    argv = ["predict", "--run", str(run), "--images", str(trained["survey"]), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{best}: its data record: data.target.mean: expected 3 finite numbers, one per channel, got [0.4]" in err
    assert len(err.splitlines()) == 1 and not out.exists(), err
    del state["data"]
    torch.save(state, best)
    record = json.loads((run / "run.json").read_text())
    record["data"]["target"].update(mean=[0.4], std=[0.0001])
    (run / "run.json").write_text(json.dumps(record))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{run / 'run.json'}: data.target.mean: expected 3 finite numbers, one per channel, got [0.4]" in err
    assert len(err.splitlines()) == 1 and not out.exists(), err


@pytest.mark.parametrize("key, value", [("selection", [1, 2]), ("progress", [2, 0])])
def test_a_checkpoint_whose_selection_or_progress_is_edited_is_one_line(trained, tmp_path, capsys, key, value):
    """best.pt's selection or progress as a list: predict and eval ended in a TypeError or
    AttributeError, and a grid's leaderboard too (there: no score yet, as for a damaged one)."""
    from dmhpc.launch.leaderboard import _best_so_far

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    state[key] = value
    torch.save(state, best)
    out = tmp_path / "c.ecsv"
    assert main(["predict", "--run", str(run), "--images", str(trained["survey"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"dmhpc predict: error: {best}: its {key!r} entry is a list, not a dict (an edited checkpoint, "
                   f"or not one of dmhpc)\n") and not out.exists()
    assert _best_so_far(RunDir(run)) == {}


def test_the_catalog_is_the_forward_pass_in_input_order(trained, tmp_path, capsys):
    out = tmp_path / "survey.parquet"
    assert main(["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
                 "--part-size", "64", "--batch-size", "32"]) == 0
    table = read(out)
    mean, std = RunDir(trained["run"]).normalization("target")
    expected = expected_probabilities(trained["run"], trained["images"], mean, std, 32)
    assert list(table["index"]) == list(range(200)) and list(table["id"]) == list(range(200))
    np.testing.assert_array_equal(np.asarray(table["p_merger"]), expected)  # bit for bit on CPU
    np.testing.assert_array_equal(np.asarray(table["merger"]), (expected >= 0.5).astype(np.int8))
    # The log-odds p is the logistic of: they order candidates past p's rounding to 1 (log-odds ~37).
    log_odds = np.asarray(table["log_odds"])
    assert log_odds.dtype == np.float64 and table["log_odds"].description.startswith("merger log-odds")
    np.testing.assert_allclose(1 / (1 + np.exp(-log_odds)), expected, rtol=1e-12, atol=1e-15)
    assert table.meta["CKPT"] == "best" and table.meta["RUN"] == str(trained["run"].resolve())
    assert table.meta["NORM"] == "target" and table.meta["AMP"] == "none"
    assert table.meta["DMHPC"] == dmhpc.code_version()  # (with the commit: 0.1.0 named every state of the code)
    assert not Path(f"{out}.parts").exists()  # merged, then removed
    # a finished catalog is never replaced silently
    assert main(["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out)]) == 1
    assert "exists; --overwrite replaces it" in capsys.readouterr().err


def test_a_parts_folder_linked_to_scratch_space(trained, tmp_path):
    """CATALOG.parts made a link to another disk (the parts are as large as the catalog): the
    catalog was written, then removing the parts ended in a NotADirectoryError traceback and exit 1,
    so predict.sh reported a finished catalog as a failed job."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "survey.parquet"
    Path(f"{out}.parts").symlink_to(scratch)
    assert main(["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
                 "--part-size", "64", "--batch-size", "32"]) == 0
    assert len(read(out)) == 200 and not os.path.lexists(f"{out}.parts")
    assert scratch.is_dir() and not any(scratch.iterdir())  # the parts were written there, and removed


def test_files_of_others_in_a_scratch_parts_folder_are_left(trained, tmp_path, capsys):
    """The scratch folder CATALOG.parts links to is shared: another job's folder and the user's notes
    put there while a prediction was stopped were deleted with its parts, by --overwrite's emptying
    and by the merge."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "survey.csv"
    Path(f"{out}.parts").symlink_to(scratch)
    images = trained["images"][:40].copy()
    images[37, 0, 0, 0] = np.nan  # in part 1: part 0 is written before the stop
    np.save(tmp_path / "nan.npy", images)
    argv = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "nan.npy"), "--out", str(out),
            "--part-size", "32", "--batch-size", "16"]
    assert main(argv) == 1
    assert (scratch / "predict.json").is_file() and (scratch / "part-000000.npz").is_file()
    (scratch / "notes.txt").write_text("important")
    (scratch / "other-job" / "results").mkdir(parents=True)
    (scratch / "other-job" / "results" / "r.npy").write_text("x")
    capsys.readouterr()
    # Another part size: the parts are of another prediction, removed by --overwrite, then merged and removed.
    assert main([*argv, "--nan-fill", "0", "--part-size", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in scratch.iterdir()) == ["notes.txt", "other-job"]
    assert (scratch / "notes.txt").read_text() == "important" and (scratch / "other-job/results/r.npy").is_file()
    assert len(read(out)) == 40 and Path(f"{out}.parts").is_symlink()
    said = capsys.readouterr().out
    assert said.count(f"{out}.parts: left in place, with what a prediction does not write there: notes.txt, "
                      f"other-job\n") == 2, said
    # The folder they share is taken by the next prediction (it was refused as someone else's).
    assert main([*argv, "--nan-fill", "0", "--overwrite"]) == 0
    assert sorted(p.name for p in scratch.iterdir()) == ["notes.txt", "other-job"] and len(read(out)) == 40


@pytest.mark.parametrize("ext", [".fits", ".csv", ".ecsv", ".h5"])
def test_every_catalog_format(trained, tmp_path, ext):
    data = trained["data"] / "noisy"
    out = tmp_path / f"noisy{ext}"
    assert main(["predict", "--run", str(trained["run"]), "--data", str(data), "--out", str(out),
                 "--part-size", "32", "--batch-size", "16"]) == 0
    table = read(out)
    manifest = load_manifest(data)
    assert len(table) == manifest["count"] and list(table["index"]) == list(range(manifest["count"]))
    with RowReader(data) as reader:
        rows = reader.read(0, manifest["count"])
    labels = np.empty(manifest["count"], np.int64)
    labels[rows["index"]] = rows["labels"]
    np.testing.assert_array_equal(np.asarray(table["label"]), labels)
    assert set(table["split"]) == {"train", "val", "test"}
    merger = np.asarray(table["merger"])  # an integer in every format (int8 came back from FITS as bool)
    assert merger.dtype.kind in "iu" and list(merger) == list((np.asarray(table["p_merger"]) >= 0.5).astype(int))
    if ext == ".csv":
        assert json.loads(Path(f"{out}.json").read_text())["CKPT"] == "best"  # plain CSV: provenance beside it
    else:
        assert table.meta["CKPT"] == "best" and table.meta["SOURCE"] == "data"
    if ext == ".fits":  # the header says what each provenance keyword holds
        from astropy.io import fits

        said = list(fits.getheader(out, 1)["COMMENT"])
        assert "CKPTSHA: SHA-256 of the checkpoint file" in said
        assert {line.split(":")[0] for line in said} >= {"RUN", "DATASHA", "INPUTSHA", "NORM", "SRCARGS"}, said
        # Each column's description where readers other than astropy's look (TCOMMn), and checksums
        # of the file's own (neither was there: the descriptions were in astropy's comments only).
        with fits.open(out) as hdul:
            header = hdul[1].header
            described = {header[f"TTYPE{n}"]: header[f"TCOMM{n}"] for n in range(1, header["TFIELDS"] + 1)}
            assert described["p_merger"] == "merger probability" and described["split"], described
            assert [hdu.verify_checksum() for hdu in hdul] == [1, 1] and hdul[1].verify_datasum() == 1
        assert table["p_merger"].description == "merger probability"  # (astropy's own still reads)


def test_a_csv_catalog_replaced_never_stands_beside_the_new_ones_provenance(trained, tmp_path, monkeypatch):
    """--overwrite of a CSV catalog put the new CATALOG.json in place before the new CSV: a kill in
    between left the old probabilities beside another prediction's provenance, which explain trusts."""
    out = tmp_path / "survey.csv"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
            "--part-size", "64", "--batch-size", "32"]
    assert main(argv) == 0
    old = out.read_bytes()

    class Killed(BaseException):
        pass

    replace = os.replace

    def killed_at_the_catalog(src, dst):
        if str(dst) == str(out):
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_catalog)
    with pytest.raises(Killed):
        main([*argv, "--tta", "--overwrite"])
    monkeypatch.undo()
    assert out.read_bytes() == old and not Path(f"{out}.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert main([*argv, "--tta", "--overwrite"]) == 0  # the parts kept: merged
    assert json.loads(Path(f"{out}.json").read_text())["TTA"] is True


def test_a_file_by_the_name_of_a_csv_catalogs_provenance_is_not_replaced_unasked(trained, tmp_path, capsys):
    """Only --out was checked: CATALOG.csv.json, someone's file, was replaced by the provenance."""
    out = tmp_path / "survey.csv"
    notes = Path(f"{out}.json")
    notes.write_text('{"my": "notes"}')
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
            "--part-size", "64", "--batch-size", "32"]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: survey.csv.json beside it exists" in err, err
    assert notes.read_text() == '{"my": "notes"}' and not out.exists()
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(notes.read_text())["CKPT"] == "best"


def test_tta_and_own_normalization(trained, tmp_path):
    out = tmp_path / "tta.ecsv"
    assert main(["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
                 "--tta", "--normalize", "own", "--part-size", "64", "--batch-size", "32"]) == 0
    table = read(out)
    images = trained["images"]
    np.testing.assert_allclose(eval(table.meta["MEAN"]), images.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(eval(table.meta["STD"]), images.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-9)
    versions = []
    for k in range(4):
        for flip in (False, True):
            turned = np.rot90(images, k, axes=(2, 3))
            turned = turned[..., ::-1] if flip else turned
            versions.append(expected_probabilities(trained["run"], np.ascontiguousarray(turned),
                                                   eval(table.meta["MEAN"]), eval(table.meta["STD"]), 32))
    versions = np.stack(versions)
    np.testing.assert_allclose(np.asarray(table["p_merger"]), versions.mean(0), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(table["p_merger_std"]), versions.std(0), rtol=0, atol=2e-6)
    assert table["p_merger"].description == "merger probability (mean over the 8 dihedral transforms)"
    # Every column described (only p_merger was: its spread and the 0/1 decision were bare)
    assert table["p_merger_std"].description == ("population standard deviation of the merger probability over "
                                                 "the 8 dihedral transforms")
    assert table["merger"].description == "1 where p_merger >= 0.5, else 0"
    assert all(table[key].description for key in table.colnames), table.colnames


def test_a_catalog_of_fits_cutouts(trained, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    ids = [f"SDSS-{i:04d}" for i in range(20)]
    for i, name in enumerate(ids):
        fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(band.astype(">f4")) for band in trained["images"][i]]).writeto(
            folder / f"{name}.fits")
    Table({"objid": ids}).write(tmp_path / "survey.csv")
    out = tmp_path / "candidates.fits"
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.csv"), "--id-column",
                 "objid", "--cutouts", str(folder), "--out", str(out), "--part-size", "64", "--batch-size", "32"]) == 0
    table = read(out)
    assert list(table["id"]) == ids
    mean, std = RunDir(trained["run"]).normalization("target")
    np.testing.assert_array_equal(np.asarray(table["p_merger"]),
                                  expected_probabilities(trained["run"], trained["images"][:20], mean, std, 32))


@pytest.mark.parametrize("ext", [".fits", ".parquet", ".ecsv"])
def test_integer_catalog_ids_stay_integers_so_the_catalog_joins_back(trained, tmp_path, ext):
    """Ids of a typed integer column (Gaia source_id style, beyond 2**53) came out as text: a join of
    the survey and the predicted catalog by id failed on the types."""
    from astropy.io import fits
    from astropy.table import Table, join

    folder = tmp_path / "cutouts"
    folder.mkdir()
    ids = np.array([4295806720 * 10**8 + i for i in range(6)], dtype=np.int64)
    for i in range(6):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(folder / f"g{i}.fits")
    survey = Table({"source_id": ids, "file": [f"g{i}.fits" for i in range(6)]})
    survey.write(tmp_path / f"survey{ext}")
    out = tmp_path / f"candidates{ext}"
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / f"survey{ext}"), "--id-column",
                 "source_id", "--file-column", "file", "--cutouts", str(folder), "--out", str(out)]) == 0
    table = read(out)
    assert table["id"].dtype.kind == "i" and list(table["id"]) == list(ids)
    table.rename_column("id", "source_id")
    assert len(join(survey, table, keys="source_id")) == 6


def test_a_catalog_given_through_a_link_names_the_cutouts_beside_the_link(trained, tmp_path):
    """The catalog's path was resolved before it was read: a catalog linked into the survey's folder
    from an archive read the archive's cutouts of the same names (an older reduction), where
    prepare, and the docs ("relative to the catalog's folder"), read those beside the link."""
    from astropy.io import fits
    from astropy.table import Table

    survey, archive = tmp_path / "survey", tmp_path / "archive"
    survey.mkdir()
    archive.mkdir()
    for i in range(3):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(survey / f"g{i}.fits")
        fits.PrimaryHDU(trained["images"][10 + i].astype(">f4")).writeto(archive / f"g{i}.fits")
    Table({"objid": [f"g{i}" for i in range(3)], "file": [f"g{i}.fits" for i in range(3)]}).write(archive / "cat.csv")
    (survey / "cat.csv").symlink_to(archive / "cat.csv")
    out = tmp_path / "c.fits"
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(survey / "cat.csv"), "--id-column",
                 "objid", "--file-column", "file", "--out", str(out), "--batch-size", "3", "--part-size", "3"]) == 0
    mean, std = RunDir(trained["run"]).normalization("target")
    np.testing.assert_array_equal(np.asarray(read(out)["p_merger"]),
                                  expected_probabilities(trained["run"], trained["images"][:3], mean, std, 3))


@pytest.mark.parametrize("ext, dtype", [(".fits", np.float64), (".parquet", np.float32)])
def test_a_float_id_column_is_one_line_before_any_part(trained, tmp_path, capsys, ext, dtype):
    """A float id column became text through str(): SDSS objid 1237651191354687489 as float64 is
    1.2376511913546875e+18, its last digits gone, and the catalog predicted did not join back."""
    from astropy.io import fits
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(3):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(folder / f"g{i}.fits")
    ids = np.array([1237651191354687489 + i * 10**12 for i in range(3)]).astype(dtype)  # distinct as floats
    Table({"objid": ids, "file": [f"g{i}.fits" for i in range(3)]}).write(tmp_path / f"survey{ext}")
    columns = ["--catalog", str(tmp_path / f"survey{ext}"), "--id-column", "objid", "--file-column", "file",
               "--cutouts", str(folder)]
    out = tmp_path / f"candidates{ext}"
    for argv in (["predict", "--run", str(trained["run"]), *columns, "--out", str(out)],
                 ["prepare", *columns, "--out", str(tmp_path / "ds")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and (f"survey{ext}: id column 'objid' holds floating-point numbers "
                                          f"({np.dtype(dtype).name}, e.g. 1.23765") in err, err
        assert "give an integer or text id column" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cutouts", f"survey{ext}"]  # no parts, no data set


def test_a_missing_cutout_is_one_line_before_any_part(trained, tmp_path, capsys):
    """A cutout the catalog lists but that is not there was stat'ed at the start (for INPUTSHA) and
    refused only when its part was reached, the parts before it computed first."""
    from astropy.io import fits
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(40):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(folder / f"g{i}.fits")
    (folder / "g30.fits").unlink()  # in the second part
    Table({"objid": [f"G{i}" for i in range(40)], "file": [f"g{i}.fits" for i in range(40)]}).write(
        tmp_path / "survey.fits")
    out = tmp_path / "candidates.csv"
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.fits"), "--id-column",
                 "objid", "--file-column", "file", "--cutouts", str(folder), "--out", str(out), "--part-size", "16",
                 "--batch-size", "16"]) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {folder / 'g30.fits'}: no such cutout file (row 31 of "
                                       f"{tmp_path / 'survey.fits'}, id G30)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cutouts", "survey.fits"]  # no part, no parts folder
    # The first cutout, read when the catalog opens (for the shape of all): its row and id were not said.
    fits.PrimaryHDU(trained["images"][30].astype(">f4")).writeto(folder / "g30.fits")
    (folder / "g0.fits").rename(folder / "g0.moved")
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.fits"), "--id-column",
                 "objid", "--file-column", "file", "--cutouts", str(folder), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {folder / 'g0.fits'}: no such cutout file (row 1 of "
                                       f"{tmp_path / 'survey.fits'}, id G0)\n")
    (folder / "g0.moved").rename(folder / "g0.fits")
    # A file the system cannot look up is not said to be missing.
    long = "g" * 300 + ".fits"
    files = [long if i == 30 else f"g{i}.fits" for i in range(40)]
    Table({"objid": [f"G{i}" for i in range(40)], "file": files}).write(tmp_path / "survey.fits", overwrite=True)
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.fits"), "--id-column",
                 "objid", "--file-column", "file", "--cutouts", str(folder), "--out", str(out), "--part-size", "16",
                 "--batch-size", "16"]) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {folder / long}: cannot read: File name too long (row "
                                       f"31 of {tmp_path / 'survey.fits'}, id G30)\n")


def test_a_first_cutout_of_another_shape_is_named(trained, tmp_path, capsys):
    """A clipped first cutout (the edge of the footprint) was blamed on the whole catalog:
    'survey.csv: images of shape (3, 60, 75)', though every other cutout had the run's shape."""
    from astropy.io import fits
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    fits.PrimaryHDU(trained["images"][0][:, :60].astype(">f4")).writeto(folder / "g0.fits")
    for i in range(1, 8):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(folder / f"g{i}.fits")
    Table({"id": [f"G{i}" for i in range(8)], "file": [f"g{i}.fits" for i in range(8)]}).write(tmp_path / "survey.csv")
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.csv"), "--file-column",
                 "file", "--cutouts", str(folder), "--out", str(tmp_path / "candidates.csv")]) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {folder / 'g0.fits'}: images of shape (3, 60, 75); "
                                       f"the run trained on (3, 75, 75)\n")


def test_a_cutout_rewritten_in_place_has_its_part_computed_again(trained, tmp_path, capsys):
    """Parts were reused whatever their cutout files held since: a rerun after a fix to one file
    kept the old probabilities of every other file rewritten meanwhile."""
    from astropy.io import fits
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    images = trained["images"][:20].copy()
    names = [f"g{i:02d}" for i in range(20)]

    def write(i: int, image: np.ndarray) -> None:
        fits.PrimaryHDU(image.astype(">f4")).writeto(folder / f"{names[i]}.fits", overwrite=True)

    for i in range(20):
        write(i, images[i])
    bad = images[17].copy()
    bad[0, 0, 0] = np.nan
    write(17, bad)  # the third part fails: the first two are kept
    Table({"id": names}).write(tmp_path / "survey.csv")
    out = tmp_path / "candidates.fits"
    cmd = ["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.csv"), "--cutouts", str(folder),
           "--out", str(out), "--part-size", "8", "--batch-size", "8"]
    assert main(cmd) == 1 and "g17.fits: NaN pixels in this cutout" in capsys.readouterr().err
    assert len(list((tmp_path / "candidates.fits.parts").glob("part-*.npz"))) == 2
    write(17, images[17])
    images[2] = images[2][:, ::-1].copy()  # a cutout of the first part, made again (flipped) meanwhile
    write(2, images[2])
    assert main(cmd) == 0
    assert "in 3 parts (1 done before)" in capsys.readouterr().out
    mean, std = RunDir(trained["run"]).normalization("target")
    np.testing.assert_array_equal(np.asarray(read(out)["p_merger"]),
                                  expected_probabilities(trained["run"], images, mean, std, 8))


def _predict_cmd(trained, out, *extra):
    return ["-m", "dmhpc", "predict", "--run-dir", str(trained["run"]), "--images", str(trained["survey"]),
            "--out", str(out), "--part-size", "32", "--batch-size", "16", *extra]


@pytest.mark.parametrize("launcher, normalize", [("torchrun", "own"), ("mpiexec", "target")])
def test_two_ranks_give_the_catalog_of_one(trained, tmp_path, launcher, normalize):
    one = tmp_path / "one.parquet"
    assert subprocess.run([sys.executable, *_predict_cmd(trained, one, "--normalize", normalize)], cwd=ROOT,
                          env=clean_env(), capture_output=True, timeout=300).returncode == 0
    two = tmp_path / "two.parquet"
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
               *_predict_cmd(trained, two, "--normalize", normalize)]
    else:
        if not (BIN / "mpiexec").exists():
            pytest.skip("mpiexec is not installed (pip install dmhpc[mpi])")
        cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, *_predict_cmd(trained, two, "--normalize", normalize)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world 2" in proc.stdout
    a, b = read(one), read(two)
    assert (a.meta["MEAN"], a.meta["STD"]) == (b.meta["MEAN"], b.meta["STD"])
    for column in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))


FULL_DISK_ON_RANK_1 = """
import os, sys
from dmhpc.errors import DmhpcError
from dmhpc.infer import predict

def full(path, *args, **kwargs):
    raise DmhpcError(f"{path}: cannot write: No space left on device (disk full or over quota); nothing written")

if os.environ["RANK"] == "1":
    predict.atomic_write = full
sys.exit(__import__("dmhpc.cli").cli.main(sys.argv[1:]))
"""


def _two_ranks_of(driver: str, trained, tmp_path, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """`driver` (a script running the dmhpc command line) predicting to `out` on 2 torchrun ranks: the
    process, and each rank's standard error lines."""
    script = tmp_path / "driver.py"
    script.write_text(driver)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--tee=2", str(script),
                           *_predict_cmd(trained, out)[2:]], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    return proc, {rank: [line.split(":", 1)[1] for line in proc.stderr.splitlines()
                         if line.startswith(f"[default{rank}]:")] for rank in (0, 1)}


def test_a_part_that_one_rank_cannot_write_is_every_ranks_one_line(trained, tmp_path):
    """A full disk on rank 1 while writing a part: rank 0 waited in the gather for it (a gloo
    traceback; under NCCL a 30-minute wait)."""
    out = tmp_path / "c.parquet"
    proc, by_rank = _two_ranks_of(FULL_DISK_ON_RANK_1, trained, tmp_path, out)
    assert proc.returncode != 0
    for said in by_rank.values():
        assert len(said) == 1 and said[0].startswith(f"dmhpc predict: error: {out}.parts/part-000001.npz: cannot "
                                                      f"write: No space left on device"), proc.stderr[-3000:]
    assert not out.exists()
    # Rank 0 stopped at the same round: it computed all its other parts first, while rank 1 waited.
    assert [p.name for p in _parts(out)] == ["part-000000.npz"]


DEFECT_ON_RANK_1 = """
import os, sys
from dmhpc.infer import predict

def broken(*args, **kwargs):
    raise RuntimeError("a defect in a library")

if os.environ["RANK"] == "1":
    predict.batch_columns = broken
sys.exit(__import__("dmhpc.cli").cli.main(sys.argv[1:]))
"""


def test_an_error_other_than_ours_on_one_rank_is_said_by_every_rank(trained, tmp_path):
    """Only a DmhpcError in a part was shared: rank 1's RuntimeError was its traceback alone, and
    rank 0, waiting in the next round's gather, was killed by torchrun without a word."""
    proc, said = _two_ranks_of(DEFECT_ON_RANK_1, trained, tmp_path, tmp_path / "c.parquet")
    assert proc.returncode != 0
    assert said[0] == ["dmhpc predict: error: RuntimeError: a defect in a library"], proc.stderr[-3000:]
    assert said[1][-1].endswith("RuntimeError: a defect in a library") and "Traceback" in said[1][0], \
        proc.stderr[-3000:]
    # Rank 0 may still be ended by torchrun once rank 1 has exited (a CI run saw it): after its line.


def test_out_of_memory_in_a_part_is_one_line_naming_the_batch_size(trained, tmp_path, capsys, monkeypatch):
    """A traceback (70 lines from torch's allocator) with nothing said of the --batch-size that set it."""
    from dmhpc.infer import predict

    def no_memory(*args, **kwargs):  # (torch's CPU allocator raises RuntimeError; CUDA's OutOfMemoryError)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 737280000 bytes")

    monkeypatch.setattr(predict, "batch_columns", no_memory)
    out = tmp_path / "c.parquet"
    assert main(_predict_cmd(trained, out)[2:]) == 1
    err = capsys.readouterr().err
    assert err == ("dmhpc predict: error: out of memory on cpu at --batch-size 16: run again with a smaller one "
                   "and --overwrite (the parts written are computed again: a batch's size moves its results' last "
                   "bits)\n"), err
    assert not out.exists()


class _RowsRead:
    """An (N, C, H, W) array that records which rows were read."""

    def __init__(self, array):
        self.array, self.shape, self.rows = array, array.shape, set()

    def __len__(self):
        return len(self.array)

    def __getitem__(self, rows):
        self.rows.update(range(*rows.indices(len(self.array))))
        return self.array[rows]


def test_own_statistics_shared_by_ranks_are_the_bits_of_one_pass(monkeypatch):
    """`--normalize own` on several ranks: each reads only its share of the blocks (rank 0 alone
    read everything while the others waited, long enough on a survey for NCCL's 10-minute watchdog
    to stop the job), and the statistics are the same bits on any number of ranks."""
    from dmhpc.data import shards

    monkeypatch.setattr(shards, "_BLOCK_BYTES", 7 * 3 * 75 * 75 * 4)  # 7 rows a block: 29 blocks of 200 rows
    images = np.random.default_rng(3).normal(0.5, 0.4, (200, 3, 75, 75)).astype(np.float32)
    one = shards.statistics_of(shards.pixel_moments(images), 3)
    np.testing.assert_allclose(one[0], images.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(one[1], images.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-9)
    for world in (2, 3, 5):
        shares, read = {}, []
        for rank in range(world):
            reader = _RowsRead(images)
            shares.update(shards.pixel_moments(reader, rank, world))
            read.append(reader.rows)
        assert shards.statistics_of(shares, 3) == one
        assert all(len(r) <= -(-29 // world) * 7 for r in read) and set().union(*read) == set(range(200))
        assert not set.intersection(*read)


def test_the_inputs_digest_is_shared_by_ranks_and_the_same_on_any_number(tmp_path, monkeypatch):
    """A catalog's INPUTSHA stat'ed every cutout on rank 0 at each start: a survey of millions of
    files on a parallel file system, serially, at every requeue. Each rank stats its share of the
    blocks now; the digest is that of one process, and changes with any cutout."""
    from astropy.io import fits
    from dmhpc.infer import sources

    monkeypatch.setattr(sources, "DIGEST_BLOCK", 3)  # 10 cutouts: 4 blocks
    for i in range(10):
        fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(tmp_path / f"g{i}.fits")
    (tmp_path / "c.csv").write_text("id\n" + "".join(f"g{i}\n" for i in range(10)))
    def source():  # a Source stats each cutout once: a process of its own each time
        return sources.open_source(catalog=tmp_path / "c.csv", cutouts=tmp_path)

    one = source().digest()
    stats = []
    real = os.stat
    monkeypatch.setattr(sources.os, "stat", lambda path, *a, **k: stats.append(str(path)) or real(path, *a, **k))
    for world in (2, 3):
        shares, counts = [], []
        for rank in range(world):
            rank_source = source()
            stats.clear()
            shares.append(rank_source.digest_blocks(rank, world))
            counts.append(len(stats))
        assert source().digest({k: v for share in shares for k, v in share.items()}) == one
        assert max(counts) <= 3 * -(-4 // world) and sum(counts) == 10
    os.utime(tmp_path / "g7.fits", ns=(1, 1))
    assert source().digest() != one


def test_a_sources_inputs_name_its_cutout_files(tmp_path):
    """explain said a survey.csv unchanged since the prediction had changed, when one of its cutouts had."""
    from astropy.io import fits
    from dmhpc.infer import sources

    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(tmp_path / "g0.fits")
    (tmp_path / "c.csv").write_text("id\ng0\n")
    assert sources.open_source(catalog=tmp_path / "c.csv", cutouts=tmp_path).inputs == \
        f"{tmp_path / 'c.csv'} or one of the cutout files it names"
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    assert sources.open_source(images=tmp_path / "x.npy").inputs == str(tmp_path / "x.npy")


def test_a_prediction_stats_each_cutout_once(trained, tmp_path, monkeypatch):
    """The start's INPUTSHA, its check of the parts done before, and each part written stat'ed every
    cutout file again: three times a survey's millions of stats on a parallel file system."""
    from astropy.io import fits
    from astropy.table import Table
    from dmhpc.infer import sources

    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(12):
        fits.PrimaryHDU(trained["images"][i].astype(">f4")).writeto(folder / f"g{i:02d}.fits")
    Table({"id": [f"g{i:02d}" for i in range(12)]}).write(tmp_path / "survey.csv")
    stated = []
    real = sources.file_identity
    monkeypatch.setattr(sources, "file_identity", lambda path: stated.append(str(path)) or real(path))
    assert main(["predict", "--run", str(trained["run"]), "--catalog", str(tmp_path / "survey.csv"), "--cutouts",
                 str(folder), "--out", str(tmp_path / "candidates.fits")]) == 0
    assert sorted(p for p in stated if Path(p).parent == folder) == [str(folder / f"g{i:02d}.fits") for i in range(12)]


def _parts(out: Path) -> list[Path]:
    return sorted(Path(f"{out}.parts").glob("part-*.npz"))


def _start_and_wait_for_parts(trained, out, n, log, *extra):
    proc = subprocess.Popen([sys.executable, *_predict_cmd(trained, out, *extra)], cwd=ROOT, env=clean_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while len(_parts(out)) < n:
        assert proc.poll() is None and time.time() < deadline, f"predict ended early with {proc.returncode}"
        time.sleep(0.02)
    return proc


def test_killed_and_rerun_gives_the_uninterrupted_catalog(trained, tmp_path):
    straight = tmp_path / "straight.parquet"
    assert subprocess.run([sys.executable, *_predict_cmd(trained, straight, "--tta")], cwd=ROOT, env=clean_env(),
                          capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "killed.parquet"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 2, log, "--tta")
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: what a node failure leaves
        proc.wait()
    done = len(_parts(out))
    assert 2 <= done < 7 and not out.exists()
    # A part whose entries no longer match its checksum is computed again, never merged.
    first = sorted(_parts(out))[0]
    with np.load(first) as z:
        edited = {key: z[key] for key in z.files if key != "_cutout_files"}
    np.savez(first, **edited)
    rerun = subprocess.run([sys.executable, *_predict_cmd(trained, out, "--tta")], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({done - 1} done before)" in rerun.stdout
    a, b = read(straight), read(out)
    for column in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))


def test_a_parts_folder_whose_removal_was_killed_and_killed_catalog_writes_do_not_block_the_rerun(trained, tmp_path):
    """A kill while a finished prediction removed its parts folder (a survey's ~12,000 parts) left
    parts without their predict.json, which the folder's listing order put among them: every rerun,
    --overwrite or not, was refused as "not a dmhpc prediction's parts". Killed catalog writes left
    their temporary files, as large as the catalog, beside it for good."""
    straight = tmp_path / "straight.parquet"
    assert subprocess.run([sys.executable, *_predict_cmd(trained, straight)], cwd=ROOT, env=clean_env(),
                          capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "killed.parquet"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 2, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (Path(f"{out}.parts") / "predict.json").unlink()  # the removal killed after the spec went
    leftovers = [tmp_path / f".{out.name}.k1ll3d_x.tmp", tmp_path / f".{out.name}.other.k1ll3d_y.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a catalog")
    rerun = subprocess.run([sys.executable, *_predict_cmd(trained, out)], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = read(straight), read(out)
    for column in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))
    # Its own temporaries gone; another file's (here `killed.parquet.other`) are not its to remove.
    assert [p.exists() for p in leftovers] == [False, True]


def test_parts_are_removed_with_their_spec_last(tmp_path, monkeypatch):
    from dmhpc.infer.predict import SPEC, _remove_parts

    parts = tmp_path / "c.csv.parts"
    parts.mkdir()
    for name in ("part-000005.npz", SPEC, "part-000000.npz", "own_stats.json", "part-000003.npz"):
        (parts / name).write_text("x")
    removed = []
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: removed.append(self.name) or unlink(self, *a, **k))
    _remove_parts(parts)
    assert removed[-1] == SPEC and len(removed) == 5 and not parts.exists()


def test_a_part_of_another_nan_fill_is_computed_again(trained, tmp_path, capsys):
    """The parts' checksums left --nan-fill out (a part made without a fill holds finite images,
    which no fill changes): a part made with --nan-fill 0, copied into a --nan-fill 5 prediction's
    folder, was merged with the pixels filled with 0."""
    images = trained["images"].copy()
    images[3, 0, 10, 10] = np.nan  # in part 0
    images[170, 1, 5, 5] = np.inf  # every prediction stops at it, in part 5, with parts 0-4 written
    np.save(tmp_path / "x.npy", images)
    argv = ["predict", "--run", str(trained["run"]), "--part-size", "32", "--batch-size", "16",
            "--images", str(tmp_path / "x.npy"), "--out"]
    for name, fill in (("zero", "0"), ("five", "5")):
        assert main([*argv, str(tmp_path / f"{name}.csv"), "--nan-fill", fill]) == 1
        assert "Inf pixels in image 170" in capsys.readouterr().err
    shutil.copy(Path(f"{tmp_path / 'zero.csv'}.parts") / "part-000000.npz",
                Path(f"{tmp_path / 'five.csv'}.parts") / "part-000000.npz")
    assert main([*argv, str(tmp_path / "five.csv"), "--nan-fill", "5"]) == 1
    assert "(4 done before)" in capsys.readouterr().out  # part 0 not taken for one of its own


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_finishes_the_part_and_exits_for_requeue(trained, tmp_path, signame):
    out = tmp_path / "stopped.fits"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 1, log, "--tta")
        os.killpg(proc.pid, getattr(signal, signame))
        assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE, (tmp_path / "log").read_text()[-2000:]
    assert "finished parts are kept" in (tmp_path / "log").read_text()
    assert 1 <= len(_parts(out)) < 7 and not out.exists()
    rerun = subprocess.run([sys.executable, *_predict_cmd(trained, out, "--tta")], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and len(read(out)) == 200, rerun.stderr[-2000:]


SIGNALLED_IN_A_PHASE = """
import os, signal, sys
import dmhpc.infer.predict as predict
from dmhpc.infer.sources import Source

def signalled(real):  # the checks, checksums, digest and statistics of a survey take minutes: the notice comes then
    def call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return call

phase = sys.argv.pop(1)
if phase == "open_source":
    predict.open_source = signalled(predict.open_source)
else:
    setattr(Source, phase, signalled(getattr(Source, phase)))
from dmhpc.cli import run
run(sys.argv[1:])
"""


@pytest.mark.parametrize("phase", ["open_source", "check", "digest_blocks", "own_stats"])
def test_a_stop_signal_before_the_first_part_exits_for_requeue_with_nothing_computed(trained, tmp_path, phase):
    """The handler went in only after the checks, the digest and the statistics pass: a signal
    then ended the job by its default action (exit 143, a failure), and one that was caught still
    had every rank compute a part first. A signal in a phase is taken at its end: each went on to
    the next (a survey's checksums, digest and statistics: minutes each, past the signal's lead)."""
    out = tmp_path / "early.fits"
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED_IN_A_PHASE)
    proc = subprocess.run([sys.executable, str(script), phase, *_predict_cmd(trained, out, "--normalize", "own")[2:]],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = "finished parts are kept" if phase == "own_stats" else "nothing computed yet"
    assert f"stopped by a signal; {said}" in proc.stdout, proc.stdout
    assert not _parts(out) and not out.exists()
    if phase != "own_stats":  # (a phase after the first ends the job before the next one's work)
        assert not Path(f"{out}.parts").exists()


def test_a_job_whose_attempts_stop_before_any_part_stops_requeueing(trained, tmp_path, monkeypatch, capsys):
    """A time limit shorter than a survey's checks (or one part) had every attempt stopped by its
    signal with nothing computed and the job requeued without end, each attempt queued and run to
    its limit again. A preemption's SIGTERM is not the job's doing, and is not counted."""
    from dmhpc.infer.sources import Source
    out = tmp_path / "never.parquet"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
            "--part-size", "32", "--batch-size", "16"]
    real_check, sent = Source.check, []

    def stopped_in_the_checks(self, *args, **kwargs):  # the time limit's signal while the survey is checked
        if sent:
            os.kill(os.getpid(), sent.pop())
        return real_check(self, *args, **kwargs)

    monkeypatch.setattr(Source, "check", stopped_in_the_checks)
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    codes = []
    for restart, sig in enumerate([signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR2]):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        sent.append(sig)
        codes.append(main(argv))
    assert codes == [REQUEUE_EXIT_CODE] * 3 + [1]
    err = capsys.readouterr().err
    assert f"{out}.parts: this is attempt 3 of job 4711; attempts 0 and 2 stopped for a requeue with no part " \
           f"added (0 there); not starting again" in err
    sent.clear()
    # Submitted again: a new job, which computes its parts.
    monkeypatch.setenv("SLURM_JOB_ID", "4712")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert main(argv) == 0 and len(read(out)) == 200
    assert not Path(f"{out}.parts").exists()


SIGNALLED_WHILE_ENDING = """
import atexit, os, signal, sys, time
# A preemption notice, or srun's SIGTERM to the ranks still there, in the teardown after the catalog.
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
from dmhpc.cli import run
run(sys.argv[1:])
"""


def test_a_stop_signal_after_the_catalog_is_written_leaves_the_exit_a_success(trained, tmp_path):
    """The stop signals' handlers went with the prediction: one arriving while the process ended
    killed it by the default action, exit 143, a failure for a catalog that was written."""
    out = tmp_path / "done.parquet"
    script = tmp_path / "ending.py"
    script.write_text(SIGNALLED_WHILE_ENDING)
    proc = subprocess.run([sys.executable, str(script), *_predict_cmd(trained, out)[2:]], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.exists() and f"wrote {out}" in proc.stdout


def test_a_stop_signal_during_the_last_part_leaves_the_merge_to_the_requeued_job(trained, tmp_path):
    """Every part written when the signal was seen, the catalog was merged at once: minutes for tens
    of millions of rows, past the signal's lead on the time limit, and the job killed in the merge
    was not requeued (its parts on disk, no catalog)."""
    out = tmp_path / "last.parquet"
    cmd = [sys.executable, "-m", "dmhpc", "predict", "--run-dir", str(trained["run"]), "--images",
           str(trained["survey"]), "--out", str(out), "--part-size", "256", "--batch-size", "4", "--tta"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 120
        while "done before" not in (tmp_path / "log").read_text():  # printed as the only part starts
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.01)
        time.sleep(0.05)  # the part takes about a second here (one CPU thread, batches of 4, 8 transforms)
        # Held while the signal is sent, so it arrives inside the part, not after it (a slow machine).
        os.kill(proc.pid, signal.SIGSTOP)
        assert not out.exists() and not _parts(out), "the part ended before the signal: make it longer"
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE, (tmp_path / "log").read_text()[-2000:]
    assert not out.exists() and len(_parts(out)) == 1
    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "(1 done before)" in rerun.stdout and "from parts done before" in rerun.stdout, \
        rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert len(read(out)) == 200 and not _parts(out)


def test_parts_of_another_prediction_are_not_mixed_in(trained, tmp_path, capsys):
    out = tmp_path / "mixed.parquet"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 1, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--out", str(out),
            "--part-size", "32", "--batch-size", "16", "--tta"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds parts of another prediction (differs in tta)" in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0 and "p_merger_std" in read(out).colnames


def test_bad_requests_are_one_line(trained, tmp_path, capsys):
    run = str(trained["run"])
    cases = [
        (["--images", str(trained["survey"]), "--out", str(tmp_path / "x.txt")], "the extension names the catalog format"),
        # A folder was told its extension was wrong.
        (["--images", str(trained["survey"]), "--out", str(tmp_path)],
         f"--out {tmp_path}: a folder; name the catalog file, its extension its format"),
        (["--out", str(tmp_path / "x.csv")], "give one of --data DIR, --images FILE or --catalog TABLE"),
        (["--images", str(trained["survey"]), "--out", str(tmp_path / "x.csv"), "--part-size", "100"],
         "--part-size 100 must be a positive multiple of --batch-size 256"),
        # (it blamed the --part-size the user left alone)
        (["--images", str(trained["survey"]), "--out", str(tmp_path / "x.csv"), "--batch-size", "0"],
         "--batch-size 0: expected a positive integer"),
    ]
    small = np.zeros((4, 3, 32, 32), np.float32)
    np.save(tmp_path / "small.npy", small)
    cases.append((["--images", str(tmp_path / "small.npy"), "--out", str(tmp_path / "y.csv")],
                  "images of shape (3, 32, 32); the run trained on (3, 75, 75)"))
    # Where the parts folder cannot be made: a FileNotFoundError (or NotADirectoryError) traceback.
    (tmp_path / "a-file").write_text("")
    for out, reason in (("/proc/x.csv", "No such file or directory"),
                        (tmp_path / "a-file" / "x.csv", "Not a directory")):
        cases.append((["--images", str(trained["survey"]), "--out", str(out)],
                      f"--out {out}: cannot create x.csv.parts beside it: {reason}; nothing written"))
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append((["--images", str(trained["survey"]), "--out", str(tmp_path / "read-only" / "x.csv")],
                      "cannot create x.csv.parts beside it: Permission denied"))
    for argv, message in cases:
        assert main(["predict", "--run", run, *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_one_split_of_a_prepared_set(trained, tmp_path):
    data = trained["data"] / "noisy"
    out = tmp_path / "test.ecsv"
    assert main(["predict", "--run", str(trained["run"]), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    table = read(out)
    manifest = load_manifest(data)
    assert set(table["split"]) == {"test"} and sorted(table["index"]) == sorted(manifest["splits"]["test"])
    assert table.meta["SRCARGS"] and '"split": "test"' in table.meta["SRCARGS"]



def test_an_empty_split_is_one_line(trained, tmp_path, capsys):
    """An empty --split reached the merge with no parts: a KeyError traceback (a surviving mutant)."""
    from dmhpc.data.shards import write_dataset

    images = trained["images"][:40]
    write_dataset(images, None, None, tmp_path / "noval", fractions=(0.8, 0.0, 0.2), seed=0)
    out = tmp_path / "c.csv"
    assert main(["predict", "--run", str(trained["run"]), "--data", str(tmp_path / "noval"), "--split", "val",
                 "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {tmp_path / 'noval'}: the val split is empty\n")
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_non_finite_pixels_and_a_flat_filter_are_refused_in_one_line(trained, tmp_path, capsys):
    """A NaN pixel made a NaN probability, counted as a non-merger (exit 0); a constant filter under
    --normalize own made every probability NaN. Both are one line now, and no catalog is written."""
    from astropy.io import fits
    from astropy.table import Table

    run = str(trained["run"])
    nan = trained["images"][:40].copy()
    nan[37, 1, :5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = trained["images"][:40].copy()
    inf[38, 0, 3, 3] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    flat = trained["images"][:40].copy()
    flat[:, 2] = 1.0
    np.save(tmp_path / "flat.npy", flat)
    big = trained["images"][:40].astype(np.float64)
    big[7, 0, 2, 2] = 1e39  # no Inf in the file: beyond float32's range, read as Inf
    np.save(tmp_path / "big.npy", big)
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(40):
        fits.PrimaryHDU(nan[i].astype(">f4")).writeto(folder / f"G{i}.fits")
    Table({"objid": [f"G{i}" for i in range(40)]}).write(tmp_path / "survey.csv")
    cases = [
        (["--images", str(tmp_path / "nan.npy")], f"{tmp_path / 'nan.npy'}: NaN pixels in image 37; --nan-fill 0"),
        (["--images", str(tmp_path / "inf.npy"), "--nan-fill", "0"],
         "Inf pixels in image 38; --nan-fill replaces NaN only"),
        (["--catalog", str(tmp_path / "survey.csv"), "--id-column", "objid", "--cutouts", str(folder)],
         f"{folder / 'G37.fits'}: NaN pixels in this cutout (id G37); --nan-fill 0"),
        (["--images", str(tmp_path / "flat.npy"), "--normalize", "own"],
         "channel 2 has standard deviation 0.0 in these images; cannot normalize with --normalize own"),
        # The image or file, where the statistics of its pixels were NaN, said of the whole input
        (["--images", str(tmp_path / "nan.npy"), "--normalize", "own"],
         f"{tmp_path / 'nan.npy'}: NaN pixels in image 37; --nan-fill 0 replaces them"),
        (["--catalog", str(tmp_path / "survey.csv"), "--id-column", "objid", "--cutouts", str(folder), "--normalize",
          "own"], f"{folder / 'G37.fits'}: NaN pixels in this cutout (id G37); --nan-fill 0 replaces them"),
        (["--images", str(tmp_path / "inf.npy"), "--nan-fill", "0", "--normalize", "own"],
         "Inf pixels in image 38; --nan-fill replaces NaN only"),
        # A fill that fills nothing: said as the image's bad pixels, after the parts were begun
        *[(["--images", str(tmp_path / "nan.npy"), "--nan-fill", fill],
           f"--nan-fill {float(fill):g}: expected a finite value that float32 can hold") for fill in ("nan", "inf", "1e39")],
    ]
    for k, (argv, message) in enumerate(cases):
        out = tmp_path / f"c{k}.csv"
        assert main(["predict", "--run", run, *argv, "--out", str(out), "--part-size", "32", "--batch-size", "16"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # float64 pixels beyond float32's range (no Inf in the file): said, without numpy's overflow warning
    big_folder = tmp_path / "big-cutouts"
    big_folder.mkdir()
    for i in range(40):
        fits.PrimaryHDU(big[i].astype(">f8")).writeto(big_folder / f"G{i}.fits")
    beyond = "--nan-fill replaces NaN only (an Inf may be a float64 value beyond float32's range)"
    for k, (argv, message) in enumerate((
            (["--images", str(tmp_path / "big.npy")], f"{tmp_path / 'big.npy'}: Inf pixels in image 7; {beyond}"),
            (["--catalog", str(tmp_path / "survey.csv"), "--id-column", "objid", "--cutouts", str(big_folder)],
             f"{big_folder / 'G7.fits'}: Inf pixels in this cutout (id G7); {beyond}"),
            # under --normalize own too, where NaN statistics were blamed on the catalog, with a RuntimeWarning
            (["--catalog", str(tmp_path / "survey.csv"), "--id-column", "objid", "--cutouts", str(big_folder),
              "--normalize", "own", "--nan-fill", "0"],
             f"{big_folder / 'G7.fits'}: Inf pixels in this cutout (id G7); {beyond}"))):
        out = tmp_path / f"big{k}.csv"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert main(["predict", "--run", run, *argv, "--out", str(out), "--part-size", "32",
                         "--batch-size", "16"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    out = tmp_path / "filled.csv"
    assert main(["predict", "--run", run, "--images", str(tmp_path / "nan.npy"), "--nan-fill", "0",
                 "--out", str(out)]) == 0
    # Stopped in its first part, before any part was written: the rerun the error asks for (with
    # --nan-fill) was refused as "parts of another prediction (differs in nan_fill)".
    early = trained["images"][:40].copy()
    early[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "early.npy", early)
    argv = ["predict", "--run", run, "--images", str(tmp_path / "early.npy"), "--out", str(tmp_path / "early.csv"),
            "--part-size", "32", "--batch-size", "16"]
    assert main(argv) == 1
    assert "--nan-fill 0" in capsys.readouterr().err
    assert main([*argv, "--nan-fill", "0"]) == 0
    assert np.isfinite(np.asarray(read(out)["p_merger"])).all()


def test_parts_from_other_inputs_a_retrained_checkpoint_or_other_source_options_are_not_reused(trained, tmp_path,
                                                                                              capsys):
    """The parts' spec held the file paths, and the checkpoint by name and step only: parts of a
    rewritten images file, of a run retrained with --overwrite, or with another --id-column or
    --nan-fill were merged into the new catalog without a word."""
    from astropy.table import Table

    run, images = tmp_path / "run", tmp_path / "survey.npy"
    shutil.copytree(trained["run"], run)
    np.save(images, trained["images"])
    Table({"objid": [f"A{i}" for i in range(200)], "name": [f"NGC{i}" for i in range(200)]}).write(tmp_path / "c.csv")
    out = tmp_path / "resumed.parquet"
    source = ["--catalog", str(tmp_path / "c.csv"), "--id-column", "objid"]
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts({**trained, "run": run, "survey": images}, out, 1, log, *source)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    argv = ["predict", "--run", str(run), "--images", str(images), "--out", str(out), "--part-size", "32",
            "--batch-size", "16"]

    def refused(extra, differs):
        assert main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert "holds parts of another prediction" in err and differs in err and len(err.splitlines()) == 1, err

    refused([*source[:-1], "name"], "(differs in id_column);")
    refused([*source, "--nan-fill", "0", "--part-size", "64"], "nan_fill, part_size);")
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    next(iter(state["model"].values())).add_(1.0)
    torch.save(state, run / "checkpoints" / "tmp.pt")
    os.replace(run / "checkpoints" / "tmp.pt", run / "checkpoints" / "best.pt")  # as a retrain with --overwrite does
    refused(source, "(differs in checkpoint_sha256)")
    np.save(images, trained["images"][::-1])  # the survey file regenerated: same count, other images
    refused(source, "input_files.images.")
    assert main([*argv, *source, "--overwrite"]) == 0
    assert list(read(out)["id"][:2]) == ["A0", "A1"]


def test_refusals_come_before_the_images_are_read(trained, tmp_path, capsys):
    """A catalog that exists, or a folder named as the catalog, was refused only after a survey's
    checksums and digest were read in full (the folder, with --overwrite, after every image was
    predicted). A data set with a damaged shard shows the order: its checksum is never reached."""
    data = tmp_path / "noisy"
    shutil.copytree(trained["data"] / "noisy", data)
    shard = sorted(data.glob("*.h5"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    predict = ["predict", "--run", str(trained["run"]), "--data", str(data), "--part-size", "32", "--batch-size", "16"]
    out = tmp_path / "done.csv"
    out.write_text("a finished catalog\n")
    assert main([*predict, "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"dmhpc predict: error: --out {out}: exists; --overwrite replaces it\n"
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    assert main([*predict, "--out", str(folder), "--overwrite"]) == 1
    assert capsys.readouterr().err == f"dmhpc predict: error: --out {folder}: is a folder; name the catalog file\n"
    assert main([*predict, "--out", str(tmp_path / "new.csv")]) == 1  # the check comes next
    assert "checksum" in capsys.readouterr().err
    # A run path a FITS header cannot hold is known at the start too: it was said after the checksums,
    # and after --normalize own's pass over the images (here stopped by a NaN pixel).
    run = tmp_path / "runé"
    shutil.copytree(trained["run"], run)
    nan = trained["images"][:40].copy()
    nan[5, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    out = tmp_path / "new.fits"
    for source in (["--data", str(data)], ["--images", str(tmp_path / "nan.npy"), "--normalize", "own"]):
        assert main(["predict", "--run", str(run), *source, "--out", str(out)]) == 1
        assert capsys.readouterr().err == (f"dmhpc predict: error: --out {out}: a FITS header holds printable ASCII "
                                           f"only and RUN {str(run.resolve())!r} is not; write .parquet or .ecsv "
                                           f"instead\n")
    # Nothing left by the refusals: no parts folder, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.csv", "folder.parquet", "nan.npy", "noisy", "runé"]


def test_inputs_rewritten_during_a_prediction_are_refused_at_the_merge(trained, tmp_path, monkeypatch, capsys):
    """The inputs were looked at once, at the start: a survey cube saved again while the ranks read it
    gave a catalog of both versions (earlier parts of the old pixels, later ones of the new) under the
    first one's INPUTSHA."""
    from dmhpc.infer import predict

    survey = tmp_path / "survey.npy"
    np.save(survey, trained["images"])
    compute = predict._compute_part

    def rewritten_after_the_first_part(model, source, norm, start, stop, batch, tta):
        columns = compute(model, source, norm, start, stop, batch, tta)
        if start == 0:
            time.sleep(0.01)  # a later modification time on file systems of coarse clocks
            np.save(survey, trained["images"][::-1])
        return columns

    monkeypatch.setattr(predict, "_compute_part", rewritten_after_the_first_part)
    out = tmp_path / "survey.parquet"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(survey), "--out", str(out), "--part-size", "64",
            "--batch-size", "32"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (f"dmhpc predict: error: {survey}: changed while this prediction read it "
                                       f"(another size or modification time, or a data set prepared again); its "
                                       f"parts are removed; run again\n")
    assert not out.exists() and not Path(f"{out}.parts").exists()
    monkeypatch.undo()
    assert main(argv) == 0  # run again: all of it of the new file
    mean, std = RunDir(trained["run"]).normalization("target")
    expected = expected_probabilities(trained["run"], trained["images"][::-1].copy(), mean, std, 32)
    np.testing.assert_array_equal(np.asarray(read(out)["p_merger"]), expected)


def test_a_merge_out_of_memory_is_one_line_and_a_rerun_merges_the_parts(trained, tmp_path, monkeypatch, capsys):
    """Rank 0 joins a survey's columns alone: a MemoryError there was a traceback after the whole
    survey, which said nothing of the parts it kept."""
    import astropy.table

    survey = tmp_path / "survey.npy"
    np.save(survey, trained["images"])
    out = tmp_path / "survey.parquet"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(survey), "--out", str(out), "--part-size", "64",
            "--batch-size", "32"]

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(astropy.table, "Table", no_memory)
    assert main(argv) == 1
    parts = Path(f"{out}.parts")
    assert capsys.readouterr().err == (f"dmhpc predict: error: --out {out}: not enough memory on rank 0 to join "
                                       f"{len(trained['images'])} rows; the parts are kept in {parts}; a rerun merges "
                                       f"them (run again with more memory for rank 0: it alone merges)\n")
    assert not out.exists() and any(parts.glob("part-*.npz"))
    monkeypatch.undo()
    said = capsys.readouterr().out if main(argv) == 0 else ""
    # Merged from parts done before: no rate ("0 images/s" was said of it).
    assert "in 4 parts (4 done before)" in said and "rows; from parts done before)" in said, said
    assert len(read(out)) == len(trained["images"]) and not parts.exists()


def test_a_second_predict_on_the_same_catalog_is_refused_and_a_catalog_written_meanwhile_is_kept(trained, tmp_path,
                                                                                                capsys):
    """Two predicts on one --out both computed into CATALOG.parts: the first to merge removed the
    parts under the other (a FileNotFoundError traceback), or the second silently replaced the
    first's catalog (`out` was only looked at on start)."""
    survey = tmp_path / "survey.npy"
    np.save(survey, np.concatenate([trained["images"]] * 4))  # 800 images: long enough to meet it running
    out = tmp_path / "shared.parquet"
    with open(tmp_path / "log", "w") as log:
        first = _start_and_wait_for_parts({**trained, "survey": survey}, out, 1, log, "--tta")
        for extra in ([], ["--overwrite"]):
            assert main(["predict", "--run", str(trained["run"]), "--images", str(survey), "--out", str(out),
                         "--part-size", "32", "--batch-size", "16", "--tta", *extra]) == 1
            err = capsys.readouterr().err
            assert f"{out}.parts: in use by another dmhpc predict" in err and len(err.splitlines()) == 1, err
        out.write_text("a catalog another job wrote meanwhile\n")
        assert first.wait(timeout=300) == 1
    log = (tmp_path / "log").read_text()
    assert f"--out {out}: exists (written since this prediction started); --overwrite replaces it" in log, log
    assert "Traceback" not in log and out.read_text() == "a catalog another job wrote meanwhile\n"
    assert len(_parts(out)) == 25  # kept: a rerun with --overwrite merges them


def _save_part(path: Path, columns: dict) -> None:
    """Replace a part file at once, as an editor or another job would (np.savez adds .npz to a bare name)."""
    np.savez(path.with_suffix(".tmp.npz"), **columns)
    os.replace(path.with_suffix(".tmp.npz"), path)


def test_parts_of_the_right_length_but_other_contents_are_computed_again(trained, tmp_path, capsys):
    """A part was taken as done when its `index` had the right length: one with another part's rows
    gave a catalog with rows twice and others missing, one without a column an IndexError. Parts
    carry a checksum now; one whose numbers cannot be probabilities is not reused even with a
    matching checksum (a writer's bug, not an edit)."""
    from dmhpc.infer.predict import PART_CHECKSUM, _part_checksum, _spec_digest

    straight = tmp_path / "straight.parquet"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--part-size", "32",
            "--batch-size", "16", "--tta", "--out"]
    assert main([*argv, str(straight)]) == 0
    out = tmp_path / "edited.parquet"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 3, log, "--tta")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parts = _parts(out)
    first, second, third = dict(np.load(parts[0])), dict(np.load(parts[1])), dict(np.load(parts[2]))
    del first["p_merger_std"]
    _save_part(parts[0], {**first, "id": first["id"] + 1000})  # other ids too
    _save_part(parts[1], {**second, "index": second["index"] - 32})  # part 0's rows again
    spec = json.loads((Path(f"{out}.parts") / "predict.json").read_text())
    third["p_merger"] = third["p_merger"] * 0 + 7.5
    _save_part(parts[2], {**third, PART_CHECKSUM: _part_checksum(third, _spec_digest(spec))})
    capsys.readouterr()
    assert main([*argv, str(out)]) == 0
    assert f"({len(parts) - 3} done before)" in capsys.readouterr().out
    a, b = read(straight), read(out)
    assert list(b["index"]) == list(range(200))
    for column in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))


def test_a_part_replaced_while_the_prediction_runs_is_refused_at_the_merge(trained, tmp_path):
    survey = tmp_path / "survey.npy"
    np.save(survey, np.concatenate([trained["images"]] * 4))
    out = tmp_path / "replaced.parquet"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts({**trained, "survey": survey}, out, 2, log, "--tta")
        part = Path(f"{out}.parts") / "part-000000.npz"
        columns = dict(np.load(part))
        _save_part(part, {**columns, "index": columns["index"] + 32})  # part 1's rows twice, part 0's none
        assert proc.wait(timeout=300) == 1
    log = (tmp_path / "log").read_text()
    assert (f"{part}: not a part of this prediction: its checksum does not match its contents and this prediction "
            f"(edited, or another prediction's); remove it and run again") in log, log
    assert "Traceback" not in log and not out.exists()


def test_a_label_column_that_is_not_1_or_0_is_one_line_before_any_part(trained, tmp_path, capsys):
    """Labels such as merger/nonmerger were a ValueError traceback at the first batch, after the
    parts folder was made; 0.5 was written as 0; labels coded 1/2, or -1 for unknown, were copied
    into the catalog beside `merger` (prepare refuses them)."""
    from astropy.table import Table

    Table({"id": [f"A{i}" for i in range(200)], "kind": ["merger", "nonmerger"] * 100, "p": [0.0, 0.5] * 100,
           "coded": [1, 2] * 100, "unknown": [0, -1] * 100, "flag": [1.0, 0.0] * 100}).write(tmp_path / "c.ecsv")
    base = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--catalog",
            str(tmp_path / "c.ecsv")]
    for column, shown in (("kind", "text (<U9); expected an integer or boolean column, 1 for a merger or 0"),
                          ("p", "0.5 (row 2); expected whole numbers, 1 for a merger or 0"),
                          ("coded", "2 (row 2); expected 1 for a merger or 0"),
                          ("unknown", "-1 (row 2); expected 1 for a merger or 0")):
        out = tmp_path / f"{column}.csv"
        assert main([*base, "--label-column", column, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / 'c.ecsv'}: label column {column!r} holds {shown}" in err, err
        assert len(err.splitlines()) == 1 and not out.exists() and not Path(f"{out}.parts").exists()
    out = tmp_path / "flag.csv"
    assert main([*base, "--label-column", "flag", "--out", str(out)]) == 0
    assert list(read(out)["label"][:2]) == [1, 0]


def test_catalog_columns_of_several_values_per_row_and_fits_files_of_several_tables_are_refused(trained, tmp_path,
                                                                                                  capsys):
    """A vector id or file column was a ValueError traceback, a vector label of 0 and 1 was written
    into the catalog as two labels per galaxy; a FITS catalog of several tables was read from its
    first, with a warning naming no file."""
    from astropy.io import fits
    from astropy.table import Table

    n = len(np.load(trained["survey"], mmap_mode="r"))
    pairs = np.arange(2 * n).reshape(n, 2)
    Table({"id": [f"A{i}" for i in range(n)], "pair": pairs, "two": pairs % 2}).write(tmp_path / "v.fits")
    base = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--catalog"]
    for option, column, role in (("--id-column", "pair", "id"), ("--label-column", "two", "label")):
        out = tmp_path / f"{column}.parquet"
        assert main([*base, str(tmp_path / "v.fits"), option, column, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / 'v.fits'}: {role} column {column!r} holds (2,) values per row; expected one" in err, err
        assert len(err.splitlines()) == 1 and not out.exists() and not Path(f"{out}.parts").exists()
    one = fits.table_to_hdu(Table({"id": [f"A{i}" for i in range(n)]}))
    other = fits.table_to_hdu(Table({"id": [f"B{i}" for i in range(n)]}))
    other.name = "OTHER"
    fits.HDUList([fits.PrimaryHDU(), one, other]).writeto(tmp_path / "two.fits")
    out = tmp_path / "two.parquet"
    assert main([*base, str(tmp_path / "two.fits"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'two.fits'}: holds 2 tables (HDUs " in err and "keep the catalog's in a file of its own" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_an_input_without_images_is_one_line_before_any_part(trained, tmp_path, capsys):
    """0 images ran to the merge and ended in a KeyError traceback, leaving CATALOG.parts behind."""
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 3, 75, 75), np.float32))
    out = tmp_path / "empty.parquet"
    assert main(["predict", "--run", str(trained["run"]), "--images", str(empty), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: the input has no images" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_a_pixel_that_overflows_once_normalized_is_one_line_before_its_part(trained, tmp_path, capsys):
    """A finite pixel near 3e38 is infinite after normalization: its NaN probability was written into
    the part, and the merge then refused that part on every rerun."""
    huge = trained["images"][:40].copy()
    huge[37, 0, 10, 10] = 3e38
    np.save(tmp_path / "huge.npy", huge)
    out = tmp_path / "huge.csv"
    assert main(["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "huge.npy"), "--out", str(out),
                 "--part-size", "32", "--batch-size", "16"]) == 1
    err = capsys.readouterr().err
    best = RunDir(trained["run"]).checkpoint("best")
    assert f"{best}: non-finite merger probability for image 37 (id 37)" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and [p.name for p in _parts(out)] == ["part-000000.npz"]


def test_a_fits_catalog_of_non_ascii_ids_is_one_line_before_any_image(trained, tmp_path, capsys):
    """FITS holds ASCII only: a non-ASCII id was a UnicodeEncodeError traceback at the merge, after
    the whole survey was computed. Other formats keep such ids."""
    from astropy.table import Table

    ids = [f"NGC {i}" for i in range(200)]
    ids[150] = "Abell 1689 – arc"
    Table({"id": ids}).write(tmp_path / "c.ecsv")
    argv = ["predict", "--run", str(trained["run"]), "--images", str(trained["survey"]), "--catalog",
            str(tmp_path / "c.ecsv"), "--part-size", "32", "--batch-size", "16", "--out"]
    out = tmp_path / "c.fits"
    assert main([*argv, str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"--out {out}: FITS holds ASCII only and the id 'Abell 1689 – arc' of image 150 is not; write .parquet "
            f"or .ecsv instead") in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not Path(f"{out}.parts").exists()
    assert main([*argv, str(tmp_path / "c.parquet")]) == 0
    assert read(tmp_path / "c.parquet")["id"][150] == "Abell 1689 – arc"
    # A non-ASCII path in the header (DATA here) was dropped from it without a word.
    survey = tmp_path / "relevé.npy"
    np.save(survey, trained["images"][:32])
    out = tmp_path / "r.fits"
    assert main(["predict", "--run", str(trained["run"]), "--images", str(survey), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out {out}: a FITS header holds printable ASCII only and DATA {str(survey)!r} is not" in err \
        and len(err.splitlines()) == 1, err
    assert not out.exists() and not Path(f"{out}.parts").exists()
    # A tab (or another control character) in a path was dropped likewise, with astropy's warning only.
    (tmp_path / "tab\there").mkdir()
    survey = tmp_path / "tab\there" / "s.npy"
    np.save(survey, trained["images"][:32])
    assert main(["predict", "--run", str(trained["run"]), "--images", str(survey), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"and DATA {str(survey)!r} is not; write .parquet or .ecsv instead" in err, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture
def one_thread():
    """Torch computing on one thread here, as the child processes of `clean_env` do: the parts a
    child wrote and those computed here are compared bit for bit, and on some CPUs one thread and
    two sum a convolution's terms in another order (p differed in its eighth digit)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_requeued_prediction_reuses_its_own_statistics(trained, tmp_path, monkeypatch, one_thread):
    """--normalize own read every image of the survey again on each restart, before the first part,
    to compute the statistics it had already computed; kept in the parts folder now, for the same
    inputs only."""
    from dmhpc.infer.sources import Source

    straight = tmp_path / "straight.ecsv"
    assert main(_predict_cmd(trained, straight, "--normalize", "own")[2:]) == 0
    out = tmp_path / "stopped.ecsv"
    with open(tmp_path / "log", "w") as log:
        proc = _start_and_wait_for_parts(trained, out, 2, log, "--normalize", "own")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = json.loads((Path(f"{out}.parts") / "own_stats.json").read_text())
    passes = []
    real = Source.own_stats
    monkeypatch.setattr(Source, "own_stats", lambda self, *a, **k: passes.append(1) or real(self, *a, **k))
    # Statistics of other inputs, or hand-edited: computed again (the same, so the parts are reused).
    # The same inputs read another way (--nan-fill, --layout change the pixels): computed again too.
    assert saved["read_as"]["nan_fill"] is None
    for n, edit in enumerate(({"inputs": "another survey"}, {"std": [0.0, 1.0, 1.0]}, {"mean": "x"},
                              {"mean": [str(v) for v in saved["mean"]]},
                              {"read_as": {**saved["read_as"], "nan_fill": 100.0}})):
        probe = tmp_path / f"probe{n}.ecsv"
        shutil.copytree(f"{out}.parts", f"{probe}.parts")
        Path(f"{probe}.parts", "own_stats.json").write_text(json.dumps({**saved, **edit}))
        assert main(_predict_cmd(trained, probe, "--normalize", "own")[2:]) == 0
        assert len(passes) == 1
        passes.clear()
    assert main(_predict_cmd(trained, out, "--normalize", "own")[2:]) == 0
    assert passes == []  # the stopped prediction's statistics, not a second pass
    for b in (read(out), read(tmp_path / "probe0.ecsv")):
        a = read(straight)
        np.testing.assert_array_equal(np.asarray(a["p_merger"]), np.asarray(b["p_merger"]))
        assert a.meta["MEAN"] == b.meta["MEAN"] and a.meta["STD"] == b.meta["STD"]


def test_the_recorded_checkpoint_hash_is_of_the_bytes_loaded(trained, tmp_path):
    """CKPTSHA was hashed when the catalog's metadata was built, after the --normalize own pass: a
    checkpoint written meanwhile (a run still training rewrites last.pt each epoch) was named for a
    catalog it did not compute."""
    from dmhpc.data.shards import file_sha256
    from dmhpc.infer.predict import Model

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    path = run / "checkpoints" / "best.pt"
    loaded = file_sha256(path)
    model = Model(RunDir(run), "best", torch.device("cpu"))
    state = load_checkpoint(path)
    next(iter(state["model"].values())).add_(1.0)
    torch.save(state, path)
    assert model.sha256 == loaded != file_sha256(path)


def test_a_prepared_set_damaged_or_replaced_in_place_is_refused(trained, tmp_path, capsys):
    """predict read a prepared set's shards without checking them: a damaged shard gave a catalog of
    other pixels, and parts computed before a shard was replaced in place were merged with the new
    ones (the manifest, hence the fingerprint, unchanged)."""
    from dmhpc.data.shards import write_dataset

    images = np.concatenate([trained["images"]] * 4)  # 800 images: long enough to stop it after a part
    data, other = tmp_path / "survey", tmp_path / "other"
    write_dataset(images, None, None, data, shard_size=400, seed=0)
    write_dataset(images[::-1].copy(), None, None, other, shard_size=400, seed=0)
    out = tmp_path / "survey.parquet"
    argv = ["-m", "dmhpc", "predict", "--run-dir", str(trained["run"]), "--data", str(data), "--out", str(out),
            "--part-size", "32", "--batch-size", "16", "--tta", "--verify", "structure"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clean_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while not _parts(out):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.copyfile(other / "shard-00000.h5", data / "shard-00000.h5")  # same layout, other images
    assert main(argv[2:]) == 1
    err = capsys.readouterr().err
    # (its rows' digest tells it at the structure level already, before the parts are compared)
    assert f"--data {data}: 1 problem: shard-00000.h5: its rows' digest (rows_sha256) is not the manifest's" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(argv[2:-2]) == 1  # with the default --verify checksums: refused before anything else
    err = capsys.readouterr().err
    assert f"--data {data}: 1 problem: shard-00000.h5: its rows' digest (rows_sha256) is not the manifest's" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_rerun_with_nan_fill_after_a_nan_stop_keeps_the_parts_written(trained, tmp_path, capsys):
    """Stopped at a NaN pixel after some parts were written, the rerun with --nan-fill that the error
    asks for was refused as "parts of another prediction (differs in nan_fill)". Those parts hold
    finite images only, so they are kept; a fill that differs from one parts were made with is not."""
    images = trained["images"].copy()
    images[150, 0, 10, 10] = np.nan  # in part 4 of 7
    np.save(tmp_path / "nan.npy", images)
    argv = ["predict", "--run", str(trained["run"]), "--part-size", "32", "--batch-size", "16", "--out"]
    out = tmp_path / "nan.parquet"
    nan = [str(out), "--images", str(tmp_path / "nan.npy")]
    assert main([*argv, *nan]) == 1
    assert "NaN pixels in image 150; --nan-fill 0" in capsys.readouterr().err
    assert len(_parts(out)) == 4
    assert main([*argv, *nan, "--nan-fill", "0"]) == 0
    assert "(4 done before)" in capsys.readouterr().out
    filled = images.copy()
    filled[150, 0, 10, 10] = 0.0
    mean, std = RunDir(trained["run"]).normalization("target")
    np.testing.assert_array_equal(np.asarray(read(out)["p_merger"]),
                                  expected_probabilities(trained["run"], filled, mean, std, 16))
    images[170, 1, 5, 5] = np.inf  # --nan-fill stops at it, in part 5, with parts 0-4 written with the fill
    np.save(tmp_path / "inf.npy", images)
    out = tmp_path / "inf.parquet"
    inf = [str(out), "--images", str(tmp_path / "inf.npy")]
    assert main([*argv, *inf, "--nan-fill", "0"]) == 1
    assert "Inf pixels in image 170" in capsys.readouterr().err and len(_parts(out)) == 5
    for fill in ([], ["--nan-fill", "1"]):  # parts made with a fill are not those of another fill, or of none
        assert main([*argv, *inf, *fill]) == 1
        err = capsys.readouterr().err
        assert "holds parts of another prediction (differs in nan_fill)" in err and len(err.splitlines()) == 1, err


def test_a_hand_edited_spec_and_parts_of_an_older_dmhpc(trained, tmp_path, capsys):
    """A predict.json without its nan_fill key was a KeyError traceback on the rerun with --nan-fill;
    parts of a dmhpc before part checksums (its spec named the checkpoint file by size and time)
    were refused as "another prediction" although none of them can be reused: computed again."""
    images = trained["images"].copy()
    images[150, 0, 10, 10] = np.nan
    np.save(tmp_path / "nan.npy", images)
    out = tmp_path / "nan.parquet"
    argv = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "nan.npy"), "--part-size", "32",
            "--batch-size", "16", "--out", str(out)]
    assert main(argv) == 1 and len(_parts(out)) == 4
    capsys.readouterr()
    spec_file = Path(f"{out}.parts") / "predict.json"
    spec = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({k: v for k, v in spec.items() if k != "nan_fill"}))
    assert main([*argv, "--nan-fill", "0"]) == 1
    err = capsys.readouterr().err
    assert "holds parts of another prediction (differs in nan_fill)" in err and len(err.splitlines()) == 1, err
    older = {k: v for k, v in spec.items() if k != "checkpoint_sha256"}
    spec_file.write_text(json.dumps({**older, "checkpoint_file": {"size": 1, "mtime_ns": 2}}))
    assert main([*argv, "--nan-fill", "0"]) == 0
    assert "parts of an older dmhpc, without checksums; computing them again" in capsys.readouterr().out
    assert len(read(out)) == 200
    # Not UTF-8 (saved by an editor as Latin-1): a UnicodeDecodeError traceback; now taken as
    # unreadable, as a file that is no JSON is.
    again = [*argv[:-1], str(tmp_path / "again.parquet")]
    assert main(again) == 1 and len(_parts(tmp_path / "again.parquet")) == 4
    (tmp_path / "again.parquet.parts" / "predict.json").write_bytes(b'\xff\xfe{"x": 1}')
    capsys.readouterr()
    assert main(again) == 1
    err = capsys.readouterr().err
    assert "holds parts of another prediction" in err and len(err.splitlines()) == 1, err


def test_layout_and_verify_go_with_the_sources_they_concern(trained, tmp_path, capsys):
    """predict had no --layout (its errors said "pass --layout"): one given is what reads the
    images (NHWC here, which the shape tells too; NCHW of it is refused); --verify with --images was
    silently ignored."""
    np.save(tmp_path / "hwc.npy", trained["images"].transpose(0, 2, 3, 1).copy())
    base = ["predict", "--run", str(trained["run"]), "--part-size", "256", "--out"]
    assert main([*base, str(tmp_path / "a.parquet"), "--images", str(trained["survey"])]) == 0
    assert main([*base, str(tmp_path / "b.parquet"), "--images", str(tmp_path / "hwc.npy"), "--layout", "NHWC"]) == 0
    np.testing.assert_array_equal(np.asarray(read(tmp_path / "a.parquet")["p_merger"]),
                                  np.asarray(read(tmp_path / "b.parquet")["p_merger"]))
    capsys.readouterr()
    for extra, message in (
            (["--images", str(tmp_path / "hwc.npy"), "--layout", "NCHW"], "75 channels in layout NCHW"),
            (["--data", str(trained["data"] / "noisy"), "--layout", "NHWC"], "--layout goes with --images or --catalog"),
            # was accepted, recorded in the catalog's SRCARGS, and did nothing
            (["--data", str(trained["data"] / "noisy"), "--nan-fill", "0"], "--nan-fill goes with --images or --catalog"),
            (["--images", str(trained["survey"]), "--verify", "structure"], "--verify structure goes with --data"),
            # catalog options without a catalog, and cutouts beside --images: ignored (no label
            # column in the catalog; the catalog's ids given to the cube's rows)
            (["--data", str(trained["data"] / "noisy"), "--label-column", "merger"],
             "--label-column reads a catalog: give --catalog (a prepared data set keeps its ids and labels)"),
            (["--images", str(trained["survey"]), "--id-column", "objid", "--cutouts", str(tmp_path)],
             "--id-column, --cutouts read a catalog: give --catalog"),
            (["--images", str(trained["survey"]), "--catalog", str(tmp_path / "cat.csv"), "--file-column", "file"],
             "--file-column names cutout files to read, and --images gives the images: give one or the other")):
        assert main([*base, str(tmp_path / "c.parquet"), *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "c.parquet").exists()


def test_an_output_over_an_input_or_in_the_run_is_refused(trained, tmp_path, capsys):
    """`--out survey.csv` (the input catalog) was refused as existing, with "--overwrite replaces it";
    with --overwrite the survey's catalog (or image cube) was replaced by the predictions. Outputs in
    the run directory replaced its files (--out RUN/checkpoints/best.pt) or made it "not a dmhpc run"
    at its next resume."""
    run = trained["run"]
    survey = tmp_path / "survey.npy"
    shutil.copyfile(trained["survey"], survey)
    (tmp_path / "cat.csv").write_text("id,file\n1,a.fits\n")
    from astropy.io import fits
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(trained["images"][:8]).writeto(cube)
    before = {p: p.read_bytes() for p in (survey, tmp_path / "cat.csv", cube)}
    best = RunDir(run).checkpoint("best")
    kept = best.read_bytes()
    listing = sorted(p.name for p in run.rglob("*"))
    other = tmp_path / "other-run"  # what makes a folder a run: its config and something it wrote
    other.mkdir()
    (other / "config.yaml").write_text("seed: 0\n")
    (other / "metrics.jsonl").write_text("")
    cases = [
        (["predict", "--run", str(run), "--catalog", str(tmp_path / "cat.csv"), "--file-column", "file",
          "--out", str(tmp_path / "cat.csv"), "--overwrite"], f"--out {tmp_path / 'cat.csv'}: is --catalog"),
        (["predict", "--run", str(run), "--images", str(cube), "--out", str(cube), "--overwrite"],
         f"--out {cube}: is --images {cube}"),
        (["predict", "--run", str(run), "--data", str(trained["data"] / "noisy"), "--out",
          str(trained["data"] / "noisy" / "c.parquet")], f"--out {trained['data'] / 'noisy' / 'c.parquet'}: inside "
                                                          f"--data {trained['data'] / 'noisy'}"),
        (["predict", "--run", str(run), "--images", str(survey), "--out", str(run / "c.parquet")],
         f"--out {run / 'c.parquet'}: inside the run directory {run}"),
        (["export", "--run", str(run), "--format", "torchscript", "--out", str(best), "--overwrite"],
         f"--out {best}: inside the run directory {run}"),
        (["explain", "--run", str(run), "--data", str(trained["data"] / "noisy"), "--out", str(run / "plots" / "x")],
         f"--out {run / 'plots' / 'x'}: inside the run directory {run}"),
        # Another run's directory: its trainer then took it for no run at all.
        (["explain", "--run", str(run), "--data", str(trained["data"] / "noisy"), "--out", str(other / "figs")],
         f"--out {other / 'figs'}: inside the run directory {other}"),
        (["predict", "--run", str(run), "--images", str(survey), "--out", str(other / "c.parquet")],
         f"--out {other / 'c.parquet'}: inside the run directory {other}"),
    ]
    for argv, refusal in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert refusal in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in before} == before and best.read_bytes() == kept
    assert sorted(p.name for p in run.rglob("*")) == listing  # no lock, parts or output left in it
    # A cutout file as --out (a FITS catalog over a FITS cutout), and a catalog beside the cutouts.
    from astropy.table import Table

    folder = tmp_path / "cutouts"
    folder.mkdir()
    fits.HDUList([fits.PrimaryHDU(trained["images"][0])]).writeto(folder / "g0.fits")
    Table({"objid": ["g0"]}).write(tmp_path / "s.csv")
    cutout = (folder / "g0.fits").read_bytes()
    argv = ["predict", "--run", str(run), "--catalog", str(tmp_path / "s.csv"), "--id-column", "objid", "--cutouts",
            str(folder), "--out"]
    capsys.readouterr()
    assert main([*argv, str(folder / "g0.fits"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"--out {folder / 'g0.fits'}: is one of the cutout files of" in err and len(err.splitlines()) == 1, err
    assert (folder / "g0.fits").read_bytes() == cutout
    assert main([*argv, str(folder / "candidates.fits")]) == 0
    # A catalog named like the input cube with another extension is no input: written.
    assert main(["predict", "--run", str(run), "--images", str(survey), "--out", str(tmp_path / "survey.npy.csv")]) == 0


def test_an_ecsv_catalog_refuses_ids_it_would_read_as_comments(trained, tmp_path, capsys):
    """ECSV wrote the id "#12" as it is and read its row back as a comment: the catalog (and explain's
    candidates) lost that row without a word. Refused before any image; CSV and Parquet keep it."""
    from astropy.table import Table

    ids = [f"obj{i}" for i in range(32)]
    ids[5], ids[9] = "#12", "a#b"
    Table({"id": ids}).write(tmp_path / "c.parquet", format="parquet")
    argv = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "s.npy"), "--catalog",
            str(tmp_path / "c.parquet"), "--out"]
    np.save(tmp_path / "s.npy", trained["images"][:32])
    out = tmp_path / "c.ecsv"
    assert main([*argv, str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"--out {out}: ECSV would read the row of id '#12' (image 5) back as a comment; write .parquet or .csv "
            f"instead") in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not Path(f"{out}.parts").exists()
    for name in ("c.csv", "c2.parquet"):
        assert main([*argv, str(tmp_path / name)]) == 0
        table = Table.read(tmp_path / name, format="ascii.csv", converters={"id": str}) if name.endswith(".csv") \
            else read(tmp_path / name)
        assert list(table["id"]) == ids


def test_text_catalogs_refuse_ids_with_a_line_break_and_int8_ids_stay_integers_in_fits(trained, tmp_path, capsys):
    """astropy writes an id holding U+2028 (or a NEL, a carriage return) unquoted and reads a line's
    end there: the CSV read back had more rows than images, the ECSV did not read. And an int8 id
    column was written to FITS as a logical one: every id read back True."""
    from astropy.table import Table

    np.save(tmp_path / "s.npy", trained["images"][:16])
    argv = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "s.npy"), "--catalog"]
    for k, breaking in enumerate(("NGC 1\u2028b", "abc\x85d", "x\ry")):
        ids = [f"obj{i}" for i in range(16)]
        ids[3] = breaking
        Table({"id": ids}).write(tmp_path / f"c{k}.parquet", format="parquet")
        for suffix in (".csv", ".ecsv"):
            out = tmp_path / f"c{k}{suffix}"
            capsys.readouterr()
            assert main([*argv, str(tmp_path / f"c{k}.parquet"), "--out", str(out)]) == 1
            err = capsys.readouterr().err
            assert f"--out {out}: the id {breaking!r} of image 3 holds a line break" in err and \
                len(err.splitlines()) == 1, err
            assert not out.exists() and not Path(f"{out}.parts").exists()
    Table({"id": np.arange(100, 116, dtype=np.int8)}).write(tmp_path / "i1.parquet", format="parquet")
    # An --out whose name fits but whose merge's temporary name (14 characters longer) does not:
    # refused before any image, not at the merge after all of them ("a rerun merges them": never).
    # (A CSV's provenance file, 5 characters longer, is checked too: 236 characters are too long for
    # it alone, 242 for the catalog's own name.)
    for long in (tmp_path / ("a" * 236 + ".csv"), tmp_path / ("a" * 234 + ".parquet")):
        capsys.readouterr()
        assert main([*argv, str(tmp_path / "i1.parquet"), "--out", str(long)]) == 1
        err = capsys.readouterr().err
        assert "File name too long" in err and len(err.splitlines()) == 1 and "predicted" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("aaa")) == [], list(tmp_path.iterdir())
    assert main([*argv, str(tmp_path / "i1.parquet"), "--out", str(tmp_path / "i1.fits")]) == 0
    back = Table.read(tmp_path / "i1.fits")["id"]
    assert back.dtype.kind == "i" and list(back) == list(range(100, 116))
    # Unsigned bytes are FITS's own integer type: kept (docs/catalog.md said every 8-bit id was widened).
    Table({"id": np.arange(200, 216, dtype=np.uint8)}).write(tmp_path / "u1.parquet", format="parquet")
    assert main([*argv, str(tmp_path / "u1.parquet"), "--out", str(tmp_path / "u1.fits")]) == 0
    back = Table.read(tmp_path / "u1.fits")["id"]
    assert back.dtype == np.uint8 and list(back) == list(range(200, 216))


SAVE = {"npy": "np.save(path, a)\n",
        # (an empty primary HDU, as survey tools write, and the cube big-endian, as FITS is)
        # (astropy's writeto replaces the file, whose old version the reader still has: copied onto it)
        "fits": "import shutil\n"
                "from astropy.io import fits\n"
                "fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a.astype('>f4'))]).writeto(path + '.new')\n"
                "shutil.copyfile(path + '.new', path)\n"
                "os.remove(path + '.new')\n",
        # scaled integers (BSCALE): read through astropy's section, which raised a bare ValueError
        "scaled": "import shutil\n"
                  "from astropy.io import fits\n"
                  "hdu = fits.ImageHDU(np.round(a * 1000).astype('>i2'))\n"
                  "hdu.header['BSCALE'], hdu.header['BZERO'] = 0.001, 0.0\n"
                  "fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path + '.new')\n"
                  "shutil.copyfile(path + '.new', path)\n"
                  "os.remove(path + '.new')\n"}


@pytest.mark.parametrize("kind", ["npy", "fits", "scaled"])
def test_a_survey_file_saved_again_while_it_is_read_is_one_line_not_a_bus_error(tmp_path, kind):
    """The rows were read through a memory map (numpy's, astropy's): saved again (or a copy onto
    it) the file was cut short under it, and the next read killed the rank with SIGBUS (exit 135,
    no word), before the merge's check of the inputs could say anything. In a process of its own:
    the old way would kill pytest."""
    script = tmp_path / "read.py"
    script.write_text(
        "import os, sys\n"
        "import numpy as np\n"
        "from dmhpc.data.inputs import open_images\n"
        "from dmhpc.errors import DmhpcError\n"
        "def save(path, a):\n"
        + "".join(f"    {line}\n" for line in SAVE[kind].splitlines()) +
        "path = sys.argv[1]\n"
        "images = np.random.default_rng(0).normal(size=(4000, 3, 16, 16)).astype(np.float32)\n"
        "save(path, images)\n"
        "rows = open_images(path)\n"
        + ("assert np.allclose(rows[np.array([0, 1, 2, 3999])], images[[0, 1, 2, 3999]], atol=1e-3)\n"
           if kind == "scaled" else  # (stored as integers of 0.001)
           "assert np.array_equal(rows[np.array([0, 1, 2, 3999])], images[[0, 1, 2, 3999]])\n") +
        "save(path, images[:10])  # saved again, shorter, while a predict reads it\n"
        "try:\n"
        "    rows[3000:3100]\n"
        "except DmhpcError as exc:\n"
        "    print(exc)\n")
    path = tmp_path / f"survey.{'npy' if kind == 'npy' else 'fits'}"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    if kind == "scaled":
        assert proc.stdout.startswith(f"{path}: cannot read images 3000 to 3099 (") and proc.stdout.endswith(
            "); saved again or cut short while it was read?\n"), proc.stdout
        return
    assert proc.stdout == (f"{path}: ends before its row 3099 now (saved again or cut short while being read?); "
                           f"start again once it is whole\n")


def test_a_sources_images_read_back_by_input_position_are_those_positions_images(tmp_path):
    """explain --catalog reads each candidate's image back by its input position (the catalog's
    `index`): taking a storage row for the position, or leaving the images in sorted order, drew
    other galaxies under the candidates' ids and probabilities, and no test saw it."""
    from dmhpc.data.shards import write_dataset
    from dmhpc.infer.sources import open_source

    images = np.random.default_rng(3).normal(size=(40, 3, 6, 6)).astype(np.float32)
    write_dataset(images, np.arange(40) % 2, None, tmp_path / "set", shard_size=16, seed=1)  # rows shuffled into splits
    np.save(tmp_path / "x.npy", images)
    wanted = [31, 2, 17, 5, 38]  # not sorted
    for source in (open_source(data=tmp_path / "set"), open_source(images=tmp_path / "x.npy")):
        try:
            np.testing.assert_array_equal(source.read_inputs(wanted), images[wanted])
        finally:
            source.close()


def test_parts_of_another_version_of_dmhpc_are_computed_again(trained, tmp_path, capsys, monkeypatch):
    """A job requeued after dmhpc was upgraded merged parts that two versions of the code computed;
    they are computed again, and the job goes on (refused, a requeued job failed)."""
    from dmhpc.errors import DmhpcError
    from dmhpc.infer import predict

    np.save(tmp_path / "x.npy", trained["images"][:24])
    out = tmp_path / "c.parquet"
    cmd = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "x.npy"), "--out", str(out),
           "--part-size", "8", "--batch-size", "8"]
    compute = predict._compute_part

    def second_fails(*args, **kwargs):  # as a kill at the second part would
        if args[3] == 8:
            raise DmhpcError("stopped at the second part")
        return compute(*args, **kwargs)

    monkeypatch.setattr(predict, "_compute_part", second_fails)
    monkeypatch.setattr(predict, "source_digest", lambda: "0" * 64)
    assert main(cmd) == 1
    assert [p.name for p in _parts(out)] == ["part-000000.npz"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(cmd) == 0
    said = capsys.readouterr().out
    assert "parts of another version of dmhpc; computing them again" in said and "(0 done before)" in said, said
    assert len(read(out)) == 24


def test_a_part_copied_to_another_parts_number_is_computed_again(trained, tmp_path, capsys, monkeypatch):
    """A part's checksum covers its entries, not its number: one copied over another part's name
    keeps a valid checksum, and only its rows' check stops its rows being merged twice."""
    from dmhpc.errors import DmhpcError
    from dmhpc.infer import predict

    np.save(tmp_path / "x.npy", trained["images"][:24])
    out = tmp_path / "c.parquet"
    cmd = ["predict", "--run", str(trained["run"]), "--images", str(tmp_path / "x.npy"), "--out", str(out),
           "--part-size", "8", "--batch-size", "8"]
    compute, computed = predict._compute_part, []

    def third_fails(*args, **kwargs):  # as a full disk or a kill at the third part would
        if len(computed) == 2:
            raise DmhpcError("stopped at the third part")
        computed.append(args[3])
        return compute(*args, **kwargs)

    monkeypatch.setattr(predict, "_compute_part", third_fails)
    assert main(cmd) == 1
    monkeypatch.setattr(predict, "_compute_part", compute)
    parts = Path(f"{out}.parts")
    shutil.copy(parts / "part-000000.npz", parts / "part-000001.npz")
    capsys.readouterr()
    assert main(cmd) == 0
    assert "in 3 parts (1 done before)" in capsys.readouterr().out
    whole = tmp_path / "whole.parquet"
    assert main([*cmd[:cmd.index("--out")], "--out", str(whole), *cmd[cmd.index("--out") + 2:]]) == 0
    assert np.asarray(read(out)["index"]).tolist() == list(range(24))
    np.testing.assert_array_equal(np.asarray(read(out)["p_merger"]), np.asarray(read(whole)["p_merger"]))


def test_tta_of_images_that_are_not_square_averages_their_four_flips(trained):
    """Only square images were predicted with --tta in the tests: the four flips of a rectangle
    (no transposes) were never checked against their mean."""
    from dmhpc.data.batches import Normalizer
    from dmhpc.infer.predict import Model, batch_columns

    from dmhpc.config import load_config

    # A ResNet (global pooling) takes rectangles; the run's DeepMerge takes 75 x 75 only.
    model = Model.__new__(Model)
    model.cfg = load_config(TINY, ["model.name=resnet18"])
    torch.manual_seed(0)
    model.net, model.device, model.amp = build_backbone(model.cfg, 3).eval(), torch.device("cpu"), "none"
    normalize = Normalizer([0.5] * 3, [0.4] * 3, "cpu")
    images = trained["images"][:3, :, :, :60].copy()  # 75 x 60
    got = batch_columns(model, normalize, images.copy(), {}, tta=True)
    x = torch.from_numpy(images)
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    p = np.stack([model.probabilities(normalize(f))[:, 1].numpy() for f in flips])
    np.testing.assert_allclose(got["p_merger"], p.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["p_merger_std"], p.std(0), rtol=0, atol=1e-12)


def test_a_last_prediction_resumes_across_the_early_stopping_record(trained):
    """The checkpoint record gained the early stopping a last.pt trained under (2026-12-05); kept in
    the parts' spec, it refused the parts of a `--checkpoint last` prediction requeued across the
    upgrade as another prediction's, though no number depends on it."""
    from dmhpc.infer import predict
    from dmhpc.infer.predict import Model
    from dmhpc.infer.sources import open_source

    run = RunDir(trained["run"])
    model = Model(run, "last", torch.device("cpu"))
    assert "early_stopping" in model.checkpoint  # the record has it
    source = open_source(images=trained["survey"])
    try:
        spec = predict._spec(run, model, source, {}, {})
    finally:
        source.close()
    assert spec["checkpoint"] == {k: v for k, v in model.checkpoint.items() if k != "early_stopping"}
