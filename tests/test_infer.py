"""Unlabelled targets through training and evaluation, `dmhpc eval` on other data sets,
`dmhpc explain` (captum) and `dmhpc export` (ONNX checked with onnxruntime, TorchScript, safetensors)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY, clean_env
from dmhpc.cli import main
from dmhpc.data.shards import write_dataset
from dmhpc.errors import DmhpcError
from dmhpc.run import RunDir
from pathlib import Path


@pytest.fixture(scope="module")
def survey(make_domains, tmp_path_factory):
    """The tiny labelled pair and an unlabelled 'survey' of the noisy domain's kind."""
    data = make_domains(64)
    rng = np.random.default_rng(3)
    labels = np.arange(64) % 2  # known here, not stored: the survey is unlabelled
    images = rng.normal(0.0, 0.3, (64, 3, 75, 75)).astype(np.float32) + labels[:, None, None, None]
    write_dataset(images, None, None, data / "survey", shard_size=32, seed=0)
    return data


def overrides(data, run, target="noisy", *extra):
    return [f"data.source={data / 'pristine'}", f"data.target={data / target}", f"run.dir={run}", "train.epochs=1",
            *extra]


@pytest.fixture(scope="module")
def run_on_survey(survey, tmp_path_factory):
    run = tmp_path_factory.mktemp("infer") / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run, "survey", "select.criterion=im")]) == 0
    return run


def test_an_unlabelled_target_trains_with_label_free_metrics(run_on_survey, capsys):
    records = RunDir(run_on_survey).read_log()
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    target = epoch["target"]["val"]
    assert target["labelled"] is False and "accuracy" not in target
    assert 0 <= target["merger_fraction"] <= 1 and target["mean_entropy"] >= 0 and "im" in target
    assert "accuracy" in epoch["source"]["val"] and epoch["selection"]["criterion"] == "im"
    result = RunDir(run_on_survey).read_result()
    assert result["target"]["labelled"] is False and result["source"]["accuracy"] >= 0


def test_unlabelled_sources_and_oracle_selection_are_refused(survey, tmp_path, capsys):
    assert main(["train", "--config", str(TINY), *overrides(survey, tmp_path / "a", "survey",
                                                             "select.criterion=oracle-target-acc")]) == 1
    assert "reads target labels, and data.target" in capsys.readouterr().err
    assert main(["train", "--config", str(TINY), f"data.source={survey / 'survey'}", f"data.target={survey / 'noisy'}",
                 f"run.dir={tmp_path / 'b'}"]) == 1
    assert "an unlabelled data set; the source domain" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_on_another_data_set_writes_its_own_file(survey, run_on_survey, capsys):
    run = RunDir(run_on_survey)
    before = run.result_path("best", "test").read_bytes()
    assert main(["eval", "--run", str(run_on_survey), "--target", str(survey / "noisy")]) == 0
    labelled = run.read_result("best", "test", "noisy")
    assert labelled["target"]["n"] > 0 and "accuracy" in labelled["target"] and labelled["data"]["target"].endswith("noisy")
    assert main(["eval", "--run", str(run_on_survey), "--source", str(survey / "noisy"), "--target",
                 str(survey / "survey"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "unlabelled" in out
    assert run.read_result("best", "val", "noisy+survey")["target"]["labelled"] is False
    assert run.result_path("best", "test").read_bytes() == before  # nothing overwritten
    assert main(["eval", "--run", str(run_on_survey), "--source", str(survey / "noisy")]) == 1


def test_explain_draws_a_grid_per_domain_and_class(survey, run_on_survey, tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(run_on_survey), "--n", "3", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    # the labelled source by true class; the unlabelled survey by predicted class (a model trained
    # for one epoch may predict one class only: then that grid alone)
    assert names[:2] == ["source_merger.png", "source_non-merger.png"]
    assert set(names[2:]) <= {"target_merger.png", "target_non-merger.png"} and len(names) >= 3
    record = json.loads((out / "explain.json").read_text())
    assert record["target_class"] == "merger" and record["files"] == [n for n in record["files"] if n in names]
    # Which weights, as the catalog and the model card say it (name, epoch and step are the same for a
    # run trained again), and where in the network Grad-CAM was taken (its class said "Sequential").
    from dmhpc.data.shards import file_sha256

    assert record["checkpoint"]["sha256"] == file_sha256(run_on_survey / "checkpoints" / "best.pt")
    assert record["grad_cam_layer"] == "conv.2"
    assert set(record["ig"]) == set(record["files"]) and all(
        ig["steps"] >= 32 and 0 <= ig["completeness_error"] for ig in record["ig"].values()), record["ig"]
    # Which galaxies each grid shows, in its rows' order, to find them again (rows of the data set).
    assert set(record["rows"]) == set(record["files"]) and all(r.startswith("index ") for r in record["rows"][names[0]])
    assert record["data"] == {"source": str((survey / "pristine").resolve()), "target": str((survey / "survey").resolve())}
    from matplotlib.image import imread

    assert imread(out / "source_merger.png").shape[0] > 500  # three rows of panels
    # Another explanation into the same folder silently replaced these grids (explain.json alike).
    again = ["explain", "--run", str(run_on_survey), "--n", "3", "--data", str(survey / "noisy"), "--out", str(out)]
    assert main(again) == 1
    assert sorted(p.name for p in out.glob("*.png")) == names
    typo = ["explain", "--run", str(run_on_survey), "--catalog", str(survey / "typo.fits"), "--out", str(out),
            "--overwrite"]
    assert main(typo) == 1  # inputs are read before the old explanation goes
    assert sorted(p.name for p in out.glob("*.png")) == names and (out / "explain.json").is_file()
    assert main([*again, "--overwrite"]) == 0
    assert {p.name for p in out.glob("*.png")} == {"data_merger.png", "data_non-merger.png"}  # none of the old ones
    assert json.loads((out / "explain.json").read_text())["data"] == {"data": str((survey / "noisy").resolve())}
    # Grids without explain.json (an explain killed before writing it, or one's own figures): replaced
    # without a word, as no explanation was recorded.
    (out / "explain.json").unlink()
    kept = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert main(again) == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == kept and not (out / "explain.json").exists()
    # A killed explain of other domains left grids this one does not write: they stayed beside the
    # new explain.json, passing for its own. Figures of other names are not explain's to remove.
    (out / "source_merger.png").write_bytes(kept["data_merger.png"])
    (out / "mine.png").write_bytes(b"not explain's")
    assert main([*again, "--overwrite"]) == 0 and (out / "explain.json").is_file()
    assert {p.name for p in out.glob("*.png")} == {"data_merger.png", "data_non-merger.png", "mine.png"}
    # A hand-edited explain.json naming a folder or someone's file: a traceback, or that file deleted.
    (out / "sub").mkdir()
    (out / "notes.txt").write_text("mine")
    record = json.loads((out / "explain.json").read_text())
    (out / "explain.json").write_text(json.dumps({**record, "files": [*record["files"], "sub", "notes.txt"]}))
    assert main([*again, "--overwrite"]) == 0
    assert (out / "sub").is_dir() and (out / "notes.txt").read_text() == "mine"


EXPLAIN_COUNTING_FIGURES = """
import os, sys
from dmhpc.infer import explain

draw = explain.attribution_grid


def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return draw(*args, **kwargs)


explain.attribution_grid = counted
from dmhpc.cli import main
sys.exit(main(["explain", *sys.argv[2:]]))
"""


def test_explain_under_a_launcher_draws_on_one_rank(run_on_survey, tmp_path):
    """Under torchrun every rank drew and wrote the same figures, and rank 0's lock on --out was
    released when it ended, while the others could still be writing."""
    pytest.importorskip("captum")
    import subprocess

    from tests.conftest import BIN, ROOT, clean_env

    script, log = tmp_path / "explain_counting.py", tmp_path / "drawn"
    script.write_text(EXPLAIN_COUNTING_FIGURES)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), str(log),
                           "--run-dir", str(run_on_survey), "--count", "2", "--out", str(tmp_path / "explain")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = log.read_text().split()
    assert drawn and set(drawn) == {"0"}, drawn
    assert (tmp_path / "explain" / "explain.json").is_file()


def test_explain_names_drawn_galaxies_by_their_input_index(tmp_path):
    """The names were the rows as stored (splits one after another), not the input's: "row 34" was
    the input's row 14, another galaxy than predict's `index` 34."""
    from dmhpc.infer.explain import _test_split

    images = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None, None], (40, 1, 4, 4)).copy()
    write_dataset(images, np.arange(40) % 2, None, tmp_path / "d", shard_size=16, seed=0)
    drawn = _test_split(tmp_path / "d", 6, seed=1)
    assert drawn["split"] == "test split" and len(drawn["names"]) == 6
    # Called its index, predict's word (data-format.md's "row" is the stored position).
    assert drawn["names"] == [f"index {int(image[0, 0, 0])}" for image in drawn["images"]]


def test_confident_candidates_keep_their_order(run_on_survey):
    """p_merger was float32: every logit margin beyond ~17 gave exactly 1.0, so a catalog's top
    candidates tied and came out in file order."""
    from dmhpc.infer.predict import Model

    model = Model(RunDir(run_on_survey), "best", torch.device("cpu"))
    last = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # the merger logit 20 to 35 above the other, as entropy minimization gives
        last.weight.zero_()
        ps = []
        for margin in (20.0, 25.0, 30.0, 35.0):
            last.bias.copy_(torch.tensor([0.0, margin]))
            ps.append(model.probabilities(torch.randn(2, 3, 75, 75))[0, 1].item())
    assert all(a < b < 1.0 for a, b in zip(ps, ps[1:])), ps


def test_gradcam_and_integrated_gradients_are_captums_on_the_last_block(run_on_survey, monkeypatch):
    captum = pytest.importorskip("captum.attr")
    from dmhpc.infer import explain
    from dmhpc.infer.explain import attributions
    from dmhpc.infer.predict import Model

    model = Model(RunDir(run_on_survey), "best", torch.device("cpu"))
    # Brighter than the mean: evidence for "merger" somewhere, which the ReLU'd Grad-CAM keeps.
    x = torch.randn(5, 3, 75, 75, generator=torch.Generator().manual_seed(0)) + 1
    # A few images at a time, whatever their number (a catalog's top thousands ran out of GPU memory):
    # no forward pass of the attributions sees more, and they are those of the whole batch.
    monkeypatch.setattr(explain, "ATTRIBUTION_BATCH", 2)
    seen = []
    hook = model.net.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    cam, ig, _ = attributions(model, x, ig_steps=8, tolerance=math.inf)  # (8 steps, as captum's below)
    hook.remove()
    assert max(seen) == 2
    assert cam.shape == ig.shape == (5, 75, 75) and (cam >= 0).all()
    # The block Grad-CAM is at, for the titles; a ResNet's original stem leaves one cell of a small cutout.
    assert explain.grad_cam_resolution(model.net, x) == "Grad-CAM at 9x9"
    from dmhpc.config import config_from_dict
    from dmhpc.train.objective import build_backbone

    resnet = build_backbone(config_from_dict({"model": {"name": "resnet18"}}, "test"), 3).eval()
    assert explain.grad_cam_resolution(resnet, torch.randn(1, 3, 32, 32)) == \
        "Grad-CAM at 1x1: one cell, no spatial information"
    assert explain.grad_cam_resolution(resnet, torch.randn(1, 3, 75, 75)) == "Grad-CAM at 3x3"
    # With their sign: the absolute sum drew evidence against "merger" like evidence for it.
    assert (ig < 0).any() and (ig > 0).any()
    net = model.net

    def log_odds(inputs):  # what p(merger) is a function of (the merger logit alone was attributed)
        logits = net(inputs)[1]
        return logits[:, 1] - logits[:, 0]

    ref = captum.IntegratedGradients(log_odds).attribute(x, baselines=torch.zeros_like(x), n_steps=8)
    np.testing.assert_allclose(ig, ref.sum(1).detach().numpy(), rtol=1e-5, atol=1e-7)
    # Completeness: an image's attributions sum to the change of its log-odds from the baseline.
    with torch.no_grad():
        change = (log_odds(x) - log_odds(torch.zeros_like(x))).numpy()
    np.testing.assert_allclose(ig.sum((1, 2)), change, rtol=0.05, atol=0.02)
    # Steps doubled until every image's sum is within IG_TOLERANCE (of 0.01 at least) of its change, the
    # error said: at a fixed 32 a third of a ResNet18's summed attributions was integration error.
    _, ig, said = attributions(model, x, ig_steps=2)
    error = np.abs(ig.sum((1, 2)) - change) / np.maximum(np.abs(change), 0.01)
    assert said["steps"] > 2 and said["completeness_error"] <= explain.IG_TOLERANCE, said
    assert said["completeness_error"] == pytest.approx(error.max(), rel=1e-3, abs=1e-6), (said, error)
    _, _, coarse = attributions(model, x, ig_steps=2, tolerance=math.inf)
    assert coarse["steps"] == 2 and coarse["completeness_error"] > said["completeness_error"], coarse
    # Grad-CAM: captum's on the last 4-D activation of more than one pixel (found by hooks, not
    # asked of the model), of the merger log-odds, ReLU'd, each cell drawn at its centre; not zero
    # everywhere.
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((m, o))) for m in net.modules()]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    last = [m for m, o in outputs if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[-1] * o.shape[-2] > 1]
    ref = captum.LayerGradCam(log_odds, last[-1]).attribute(x, relu_attributions=True)
    ref = explain.place_cells(ref[:, 0].detach(), explain.cell_centres(net, x), (75, 75))
    assert cam.any()
    np.testing.assert_allclose(cam, ref.numpy(), rtol=1e-5, atol=1e-7)


def test_grad_cam_cells_are_drawn_where_they_look():
    """Resized evenly (bilinear) over 75 pixels, DeepMerge's 9x9 map was drawn up to 4 pixels off its
    cells, which step by 8 pixels from pixel 0; a ResNet's 3x3 was spread over the whole image."""
    from dmhpc.infer.explain import cell_centres, place_cells
    from dmhpc.models.registry import build_model

    x = torch.zeros(1, 3, 75, 75)
    for name in ("deepmerge", "deepmerge2"):
        rows, cols = cell_centres(build_model(name, in_channels=3).eval(), x)
        for centres in (rows, cols):
            assert len(centres) == 9
            # The inner cells, whose evidence is not cut by the image's edge: pixels 8i to 8i+7.
            np.testing.assert_allclose(centres[2:7], 8 * np.arange(2, 7) + 3.5, atol=0.6)
            assert 60 < centres[-1] < 68 and 2 < centres[0] < 8
    # A map hot in its last cell is drawn hottest at that cell's centre, not at the image's corner.
    hot = torch.zeros(1, 9, 9)
    hot[0, 8, 8] = 1.0
    drawn = place_cells(hot, (rows, cols), (75, 75))[0].numpy()
    assert drawn.shape == (75, 75) and drawn.max() == pytest.approx(1.0)
    assert drawn[round(rows[-1]), round(cols[-1])] > 0.9 and drawn[74, 74] == pytest.approx(1.0)
    assert drawn[round(rows[-2]), round(cols[-1])] < 0.2  # at the centre of the cell above it, about 0
    # Linear between centres: a map falling from the first cell to the last falls linearly on the way.
    ramp = torch.linspace(1, 0, 9)[:, None].expand(9, 9)[None]
    drawn = place_cells(ramp, (rows, cols), (75, 75))[0, :, 40].numpy()
    np.testing.assert_allclose(drawn[round(rows[4])], np.interp(round(rows[4]), rows, ramp[0, :, 0].numpy()))
    assert (np.diff(drawn) <= 1e-6).all() and drawn[0] == 1.0 and drawn[-1] == 0.0
    # The original ResNet stem: three cells whose evidence is the whole image, centred near its middle.
    rows, cols = cell_centres(build_model("resnet18", in_channels=3).eval(), x)
    assert len(rows) == 3 and all(25 < c < 50 for c in (*rows, *cols))


def test_explain_draws_the_filters_asked_for_and_says_which(run_on_survey, tmp_path, capsys):
    """The composites drew the last channel red: the embedded set's F160W, with F356W (the longest
    wavelength) green, so every galaxy was bright green."""
    pytest.importorskip("captum")
    from dmhpc.plots import rgb_composite

    blob = np.exp(-np.hypot(*(np.mgrid[:16, :16] - 7.5)) / 3)  # a galaxy on a sky of 0, in three filters
    image = np.stack([v * blob for v in (1.0, 3.0, 2.0)]).astype(np.float32)
    by_default, in_order = rgb_composite(image)[8, 11], rgb_composite(image, (1, 2, 0))[8, 11]
    assert by_default[1] > by_default[0] and in_order[0] > in_order[1] > in_order[2]
    two = rgb_composite(image[:2], (0, 1, 0))  # fewer than 3 filters: grey, whatever --rgb says (as recorded)
    assert (two[..., 0] == two[..., 1]).all() and (two[..., 1] == two[..., 2]).all()
    with warnings.catch_warnings():  # a blank cutout is black, without a warning per galaxy
        warnings.simplefilter("error")
        assert not rgb_composite(np.zeros((3, 8, 8), np.float32)).any()
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(run_on_survey), "--n", "1", "--rgb", "1,2,0", "--out", str(out)]) == 0
    assert json.loads((out / "explain.json").read_text())["rgb"] == [1, 2, 0]
    capsys.readouterr()
    for rgb, problem in (("1,2,3", "three channel indices from 0 to 2"), ("1,2", "three channel indices from 0 to 2"),
                         ("r,g,b", "three channel indices, as 1,2,0")):
        assert main(["explain", "--run", str(run_on_survey), "--rgb", rgb, "--out", str(tmp_path / "no")]) == 1
        err = capsys.readouterr().err
        assert f"--rgb {rgb}: {problem}" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "no").exists()
    # (numpy's ValueError traceback)
    assert main(["explain", "--run", str(run_on_survey), "--seed", "-1", "--out", str(tmp_path / "no")]) == 1
    assert capsys.readouterr().err == "dmhpc explain: error: --seed -1: expected a non-negative integer\n"
    assert not (tmp_path / "no").exists()
    # A grid of a row per image: 300 was matplotlib's traceback, after every attribution was computed.
    for n in ("0", "101"):
        assert main(["explain", "--run", str(run_on_survey), "--n", n, "--out", str(tmp_path / "no")]) == 1
        assert capsys.readouterr().err.startswith(f"dmhpc explain: error: --n {n}: from 1 to 100 (each image is a ")
    assert not (tmp_path / "no").exists()


def test_explain_checks_the_filters_against_the_checkpoint_it_loads(run_on_survey, tmp_path, capsys):
    """--rgb was checked against run.json's channels, read apart from the checkpoint: a run.json of
    another run (one replacing it, here one of a single filter) let 1,2,3 through to a traceback."""
    pytest.importorskip("captum")
    run = tmp_path / "run"
    shutil.copytree(run_on_survey, run)
    record = json.loads((run / "run.json").read_text())
    for entry in record["data"].values():
        entry["shape"][0], entry["mean"], entry["std"] = 1, entry["mean"][:1], entry["std"][:1]
    (run / "run.json").write_text(json.dumps(record))
    assert main(["explain", "--run", str(run), "--rgb", "1,2,3", "--out", str(tmp_path / "no")]) == 1
    err = capsys.readouterr().err
    assert "--rgb 1,2,3: three channel indices from 0 to 2 (the run's images have 3 filters)" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "no").exists()


@pytest.mark.parametrize("fmt", ["fits", "csv"])
def test_explain_the_top_candidates_of_a_catalog(survey, run_on_survey, tmp_path, fmt):
    """Every format predict writes (a plain CSV keeps its provenance in CATALOG.json beside it,
    which explain did not read: 'not a catalog written by dmhpc predict')."""
    pytest.importorskip("captum")
    catalog = tmp_path / f"survey.{fmt}"
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--out", str(catalog)]) == 0
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "4",
                 "--out", str(tmp_path / "explain")]) == 0
    assert (tmp_path / "explain" / "top_candidates.png").is_file()
    record = json.loads((tmp_path / "explain" / "explain.json").read_text())
    assert record["seed"] is None and len(record["rows"]["top_candidates.png"]) == 4
    if fmt == "fits":  # text ids come back from FITS as bytes: the galaxies were named "b'gal7'"
        from astropy.table import Table

        table = Table.read(catalog)
        table["id"] = [f"gal{i}" for i in table["index"]]
        table.write(catalog, overwrite=True)
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "4",
                     "--out", str(tmp_path / "explain"), "--overwrite"]) == 0
        names = json.loads((tmp_path / "explain" / "explain.json").read_text())["rows"]["top_candidates.png"]
        top = np.argsort(-np.asarray(table["p_merger"]), kind="stable")[:4]
        assert names == [f"gal{i}" for i in np.asarray(table["index"])[top]]
    # --seed chooses nothing here: it was accepted, and recorded as if it had chosen the images.
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--seed", "3",
                 "--out", str(tmp_path / "seeded")]) == 1
    assert not (tmp_path / "seeded").exists()


def test_explain_names_a_csv_catalogs_galaxies_by_their_ids_as_written(survey, run_on_survey, tmp_path):
    """predict writes a CSV's ids as text ("00013"); explain read them back as numbers, and named the
    galaxies 13: ids no row of the survey has."""
    pytest.importorskip("captum")
    from dmhpc.data.shards import RowReader

    with RowReader(survey / "survey") as reader:
        np.save(tmp_path / "survey.npy", reader.read(0, len(reader))["images"])
    ids = [f"{i:05d}" for i in range(64)]
    (tmp_path / "ids.csv").write_text("objid\n" + "\n".join(ids) + "\n")
    catalog = tmp_path / "c.csv"
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "survey.npy"), "--catalog",
                 str(tmp_path / "ids.csv"), "--id-column", "objid", "--out", str(catalog)]) == 0
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "4",
                 "--out", str(tmp_path / "explain")]) == 0
    names = json.loads((tmp_path / "explain" / "explain.json").read_text())["rows"]["top_candidates.png"]
    rows = [line.split(",") for line in catalog.read_text().splitlines()]
    column = rows[0].index("p_merger")
    by_p = sorted(rows[1:], key=lambda row: -float(row[column]))  # (sorted is stable, as explain's choice)
    assert names == [row[rows[0].index("id")] for row in by_p[:4]] and all(len(n) == 5 for n in names), names


def test_explain_a_catalog_with_the_model_that_predicted_it(survey, run_on_survey, tmp_path, capsys):
    """explain --catalog took the catalog's top rows but explained (and titled with the probability of)
    whatever --run and --checkpoint said, best by default: another model's view of the candidates."""
    pytest.importorskip("captum")
    from astropy.table import Table

    catalog = tmp_path / "last.ecsv"
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--checkpoint", "last",
                 "--out", str(catalog)]) == 0
    (tmp_path / "link").symlink_to(run_on_survey)  # the same run by another path
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(tmp_path / "link"), "--catalog", str(catalog), "--n", "2",
                 "--out", str(out)]) == 0
    assert json.loads((out / "explain.json").read_text())["checkpoint"]["name"] == "last"  # the catalog's own
    import shutil

    shutil.copytree(run_on_survey, tmp_path / "copy")  # a moved or copied run is the same model
    assert main(["explain", "--run", str(tmp_path / "copy"), "--catalog", str(catalog), "--n", "2",
                 "--out", str(tmp_path / "explain-copy")]) == 0
    table = Table.read(catalog)
    table.meta["CKPTSHA"] = "0" * 64  # as if the checkpoint had been written again since
    table.write(tmp_path / "rewritten.ecsv")
    del table.meta["CKPTSHA"]  # a catalog of an older dmhpc: the run's path and the step are compared
    table.write(tmp_path / "older.ecsv")
    table.meta["CKPTSTEP"] += 1
    table.write(tmp_path / "later.ecsv")
    for run, cat, message in (
            (run_on_survey, tmp_path / "rewritten.ecsv", f"checkpoints/last.pt is not the checkpoint "
                                                         f"{tmp_path / 'rewritten.ecsv'} was predicted with"),
            (tmp_path / "copy", tmp_path / "older.ecsv", f"--run {tmp_path / 'copy'}: {tmp_path / 'older.ecsv'} was "
                                                         f"predicted by the run {run_on_survey.resolve()}; explain it "
                                                         f"with that run"),
            (run_on_survey, tmp_path / "later.ecsv", f"was predicted at step {table.meta['CKPTSTEP']}")):
        assert main(["explain", "--run", str(run), "--catalog", str(cat), "--out", str(tmp_path / "refused")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()


def test_explain_a_catalog_whose_images_changed_since_is_one_line(run_on_survey, tmp_path, capsys):
    """explain --catalog read the candidates back from the catalog's source without checking it was
    still what was predicted: a rewritten images file showed other galaxies under the catalog's
    probabilities, and a shorter one was an IndexError traceback."""
    pytest.importorskip("captum")
    from astropy.table import Table

    images = np.random.default_rng(5).normal(0.5, 0.3, (40, 3, 75, 75)).astype(np.float32)
    survey, catalog = tmp_path / "survey.npy", tmp_path / "c.ecsv"
    np.save(survey, images)
    assert main(["predict", "--run", str(run_on_survey), "--images", str(survey), "--out", str(catalog)]) == 0
    table = Table.read(catalog)
    del table.meta["INPUTSHA"]  # a catalog of an older dmhpc: the positions are still checked
    table["p_merger"][39] = 1.0  # the top candidate: the last image
    table.write(tmp_path / "older.ecsv")
    np.save(survey, images[:30])
    for cat, message in ((catalog, f"{catalog}: its inputs ({survey}) changed since it was predicted"),
                         (tmp_path / "older.ecsv", f"{survey}: no image at input position 39 (it holds 30)")):
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(cat), "--n", "2",
                     "--out", str(tmp_path / "explain")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "explain").exists()


def test_explain_refuses_rows_its_catalogs_input_did_not_predict(run_on_survey, tmp_path, capsys):
    """Catalogs of survey tiles stacked with astropy's vstack keep one tile's metadata: explain read
    every row's image from that tile, other galaxies under the rows' probabilities, exit 0. An
    empty selection of a catalog was a captum traceback."""
    pytest.importorskip("captum")
    from astropy.table import Table, vstack

    rng = np.random.default_rng(8)
    tiles = []
    for k in range(2):
        np.save(tmp_path / f"tile{k}.npy", rng.normal(0.5, 0.3, (20, 3, 75, 75)).astype(np.float32))
        assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / f"tile{k}.npy"),
                     "--out", str(tmp_path / f"tile{k}.parquet")]) == 0
        tiles.append(Table.read(tmp_path / f"tile{k}.parquet", format="parquet"))
    vstack(tiles, metadata_conflicts="silent").write(tmp_path / "stacked.parquet", format="parquet")
    edited = tiles[0].copy()
    edited["p_merger"][7] = 0.999  # by hand, or another galaxy's number: not what image 7 gives
    edited.write(tmp_path / "edited.parquet", format="parquet")
    tiles[0][:0].write(tmp_path / "empty.parquet", format="parquet")
    # (the position named was the sorted column's place in the unsorted one: 5, here)
    vstack([tiles[0][[5, 3]], tiles[1][[3]]], metadata_conflicts="silent").write(tmp_path / "repeated.parquet")
    for name, message in (("stacked", "input position 0 is in it twice: rows of several predictions"),
                          ("repeated", "input position 3 is in it twice: rows of several predictions"),
                          ("edited", f"the row of input position 7 has p_merger 0.99900; its image in "
                                     f"{tmp_path / 'tile0.npy'} gives"),
                          ("empty", "no rows; nothing to explain")):
        catalog = tmp_path / f"{name}.parquet"
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "3",
                     "--out", str(tmp_path / "explain")]) == 1
        err = capsys.readouterr().err
        assert f"{catalog}: {message}" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "explain").exists()
    # The catalog as predicted passes the same check (the numbers computed again agree).
    explain = ["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "tile1.parquet"), "--n", "3",
               "--out", str(tmp_path / "explain")]
    assert main(explain) == 0
    leftover = tmp_path / "explain" / ".top_candidates.png.k1ll3d_c.tmp"  # a figure's write killed
    foreign = tmp_path / "explain" / ".notes.txt.zz99yy88.tmp"  # another program's, in a shared folder
    leftover.write_text("half")
    foreign.write_text("being written")
    assert main([*explain, "--overwrite"]) == 0 and not leftover.exists() and foreign.exists()
    # An image that gives no finite probability now (a catalog without INPUTSHA, of an older dmhpc,
    # and its input saved again with a NaN): one line, not a KeyError traceback.
    older = tiles[0].copy()
    del older.meta["INPUTSHA"]
    older.write(tmp_path / "older.parquet", format="parquet")
    top = int(np.asarray(tiles[0]["index"])[np.argmax(np.asarray(tiles[0]["p_merger"]))])
    images = np.load(tmp_path / "tile0.npy")
    images[top, 0, 3, 3] = np.nan
    np.save(tmp_path / "tile0.npy", images)
    capsys.readouterr()
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "older.parquet"), "--n", "3",
                 "--out", str(tmp_path / "explain-older")]) == 1
    err = capsys.readouterr().err
    assert f"non-finite merger probability for image {top}" in err and len(err.splitlines()) == 1, err


def test_explain_refuses_catalog_columns_predict_did_not_write(run_on_survey, tmp_path, capsys):
    """An index of 3.5 drew image 3 under that row's name, a NaN probability passed the read-back
    check, a label of 0.5 was drawn as a non-merger; text in any of them, or a damaged JSON record
    beside a CSV (which named the CSV), was a traceback."""
    pytest.importorskip("captum")
    from astropy.table import MaskedColumn, Table

    np.save(tmp_path / "tile.npy", np.random.default_rng(5).normal(0.5, 0.3, (12, 3, 75, 75)).astype(np.float32))
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "tile.npy"),
                 "--out", str(tmp_path / "c.ecsv")]) == 0
    table = Table.read(tmp_path / "c.ecsv")
    edits = {
        "index": ("the non-negative whole number", [lambda t: t.replace_column("index", t["index"] + 0.5),
                                                     lambda t: t.replace_column("index", t["index"].astype(str)),
                                                     lambda t: t.replace_column("index", t["index"] - 3)]),
        "p_merger": ("a probability from 0 to 1", [lambda t: t["p_merger"].__setitem__(4, np.nan),
                                                    lambda t: t["p_merger"].__setitem__(4, 1.5),
                                                    lambda t: t.replace_column("p_merger", t["p_merger"].astype(str))]),
        "label": ("a whole number in every row", [lambda t: t.add_column(np.full(len(t), 0.5), name="label"),
                                                  lambda t: t.add_column(np.full(len(t), "merger"), name="label"),
                                                  lambda t: t.add_column(MaskedColumn(np.ones(len(t), int),
                                                                                      mask=[True] + [False] * 11),
                                                                         name="label")]),
    }
    for column, (expected, changes) in edits.items():
        for k, change in enumerate(changes):
            edited = table.copy()
            change(edited)
            catalog = tmp_path / f"{column}{k}.ecsv"
            edited.write(catalog)
            capsys.readouterr()
            assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "3",
                         "--out", str(tmp_path / "explain")]) == 1, (column, k)
            err = capsys.readouterr().err
            assert f"{catalog}: column {column}: expected {expected}" in err and len(err.splitlines()) == 1, err
            assert not (tmp_path / "explain").exists()
    # A plain CSV's record beside it, damaged: the record is named, not the CSV.
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "tile.npy"),
                 "--out", str(tmp_path / "c.csv")]) == 0
    (tmp_path / "c.csv.json").write_text('{"RUN": ')
    capsys.readouterr()
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "c.csv"),
                 "--out", str(tmp_path / "explain")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c.csv.json'}: not predict's JSON record of c.csv" in err and len(err.splitlines()) == 1, err


def test_explain_refuses_data_of_more_classes_and_an_overwrite_keeps_no_old_grid(survey, run_on_survey, tmp_path,
                                                                                  capsys):
    """A data set of 3 classes drew only classes 0 and 1, and a class-2-only set ended in success
    with no grid; --overwrite over a damaged explain.json kept the old explanation's grids beside
    the new one's."""
    pytest.importorskip("captum")
    rng = np.random.default_rng(2)
    write_dataset(rng.normal(0, 1, (30, 3, 75, 75)).astype(np.float32), np.full(30, 2), None,
                  tmp_path / "three", shard_size=32, seed=0, num_classes=3)
    assert main(["explain", "--run", str(run_on_survey), "--data", str(tmp_path / "three"),
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert (f"--data {tmp_path / 'three'}: 3 classes; the models here tell 2 apart" in err
            and len(err.splitlines()) == 1), err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "explained"
    assert main(["explain", "--run", str(run_on_survey), "--n", "2", "--out", str(out)]) == 0
    own = sorted(p.name for p in out.glob("*.png"))
    assert own and all(name.startswith(("source_", "target_")) for name in own), own
    for damaged in ("[]", '{"files": 3}', "{not json"):
        (out / "explain.json").write_text(damaged)
        assert main(["explain", "--run", str(run_on_survey), "--data", str(survey / "noisy"), "--n", "2",
                     "--out", str(out), "--overwrite"]) == 0
        now = sorted(p.name for p in out.glob("*.png"))
        assert now and all(name.startswith("data_") for name in now), (damaged, now)
        assert main(["explain", "--run", str(run_on_survey), "--n", "2", "--out", str(out), "--overwrite"]) == 0


def test_explain_reads_srcargs_of_older_catalogs_and_refuses_edited_ones(survey, run_on_survey, tmp_path, capsys):
    """SRCARGS edited by hand was a TypeError traceback; a catalog an older dmhpc predicted with
    --data and --nan-fill or catalog options (which it ignored there, and which predict now refuses)
    is still explained."""
    pytest.importorskip("captum")
    from astropy.table import Table

    catalog = tmp_path / "c.ecsv"
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--split", "test",
                 "--out", str(catalog)]) == 0
    table = Table.read(catalog)
    args = json.loads(table.meta["SRCARGS"])
    # --nan-fill, a label column and an id column with --data: an older predict took them and did
    # nothing with them (it refuses them now)
    table.meta["SRCARGS"] = json.dumps({**args, "nan_fill": 0.0, "label_column": "merger", "id_column": "objid"})
    table.write(tmp_path / "older.ecsv")
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "older.ecsv"), "--n", "2",
                 "--out", str(tmp_path / "older")]) == 0
    capsys.readouterr()
    for k, edited in enumerate(("{not json", json.dumps([1, 2]), json.dumps({**args, "cutout": "x"}),
                                json.dumps({**args, "data": 5}), json.dumps({**args, "nan_fill": "0"}))):
        table.meta["SRCARGS"] = edited
        table.write(tmp_path / f"edited{k}.ecsv")
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / f"edited{k}.ecsv"),
                     "--out", str(tmp_path / "refused")]) == 1
        err = capsys.readouterr().err
        assert f"edited{k}.ecsv: SRCARGS is not predict's record of its inputs" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
    # A catalog cut down to a few columns, or its statistics edited: KeyError and JSON tracebacks.
    table.meta["SRCARGS"] = json.dumps(args)
    table["id", "p_merger"].write(tmp_path / "columns.ecsv")
    for k, mean in enumerate(("[0.4", "[1, 2]", "[1, 2, NaN]", '["0.4", "0.5", "0.6"]')):
        edited = table.copy()
        edited.meta["MEAN"] = mean
        edited.write(tmp_path / f"mean{k}.ecsv")
    for name, message in (("columns.ecsv", "not a catalog written by dmhpc predict (no p_merger or index column"),
                          *((f"mean{k}.ecsv", "MEAN and STD are not predict's record of 3 channels' statistics")
                            for k in range(4))):
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / name), "--n", "2",
                     "--out", str(tmp_path / "refused")]) == 1
        err = capsys.readouterr().err
        assert f"{name}: {message}" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
    # A plain CSV copied without the JSON file beside it: the refusal named nothing to fetch.
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--split", "test",
                 "--out", str(tmp_path / "c.csv")]) == 0
    Path(f"{tmp_path / 'c.csv'}.json").unlink()
    capsys.readouterr()
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "c.csv"), "--n", "2",
                 "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "c.csv: its provenance file c.csv.json is not beside it (plain CSV keeps predict's metadata there); " \
           "copy it along" in err and len(err.splitlines()) == 1, err


def test_explain_an_edited_csv_provenance_file_is_one_line(survey, run_on_survey, tmp_path, capsys):
    """A CSV's JSON beside it holding 5 or null was a TypeError in updating the table's metadata, and
    a SRCARGS or RUN there that is not text a TypeError in reading it."""
    pytest.importorskip("captum")
    catalog = tmp_path / "c.csv"
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--split", "test",
                 "--out", str(catalog)]) == 0
    beside = Path(f"{catalog}.json")
    meta = json.loads(beside.read_text())
    for text, message in (("5", "expected a JSON object of predict's metadata, got 5"),
                          ("null", "expected a JSON object of predict's metadata, got null"),
                          (json.dumps({**meta, "SRCARGS": json.loads(meta["SRCARGS"])}), "SRCARGS: expected text as "
                                                                                         "predict writes it, got {"),
                          (json.dumps({**meta, "RUN": 5}), "RUN: expected text as predict writes it, got 5")):
        beside.write_text(text)
        capsys.readouterr()
        assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "2",
                     "--out", str(tmp_path / "refused")]) == 1
        err = capsys.readouterr().err
        assert f"{beside}: {message}" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
    # The CSV of one prediction beside another's provenance (predict --overwrite between explain's
    # reads of the two, or a copy of one of them): the grid of one catalog under the other's record.
    beside.write_text(json.dumps(meta))
    assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / "survey"), "--split", "test",
                 "--out", str(tmp_path / "other.csv"), "--tta"]) == 0
    catalog.write_bytes((tmp_path / "other.csv").read_bytes())
    capsys.readouterr()
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "2",
                 "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert f"{beside}: the provenance of another c.csv (its CSVSHA is not the file's SHA-256)" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()
    capsys.readouterr()  # a CSV mistyped: named as missing, not as a CSV without its provenance
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(tmp_path / "typo.csv"), "--n", "2",
                 "--out", str(tmp_path / "refused")]) == 1
    assert f"{tmp_path / 'typo.csv'}: no such catalog" in capsys.readouterr().err
    del meta["CSVSHA"]  # a CSV of a predict before its provenance held its SHA-256: taken
    beside.write_text(json.dumps(meta))
    catalog.write_bytes((tmp_path / "other.csv").read_bytes())
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "2",
                 "--out", str(tmp_path / "taken")]) == 0


def test_explain_data_of_another_shape_is_one_line(survey, run_on_survey, tmp_path, capsys):
    """A prepared set of 32x32 images was a RuntimeError traceback from the network."""
    pytest.importorskip("captum")
    small = tmp_path / "small"
    write_dataset(np.zeros((8, 3, 32, 32), np.float32), None, None, small, shard_size=8, seed=0)
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(run_on_survey), "--data", str(small), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{small}: images of shape (3, 32, 32); the run trained on (3, 75, 75)" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_explain_out_and_data_that_cannot_be_explained_are_one_line(survey, run_on_survey, tmp_path, capsys):
    """An --out naming a file was a NotADirectoryError traceback; two explains into one folder both
    found no explain.json and wrote over each other's grids; and the run's own data sets prepared
    again since it trained were drawn from as its "test split" (eval refuses them)."""
    pytest.importorskip("captum")
    import os
    import shutil

    from dmhpc.files import locked_directory

    explain = ["explain", "--run", str(run_on_survey), "--n", "2"]
    afile = tmp_path / "a.csv"
    afile.write_text("mine\n")
    assert main([*explain, "--out", str(afile)]) == 1
    err = capsys.readouterr().err
    assert err == f"dmhpc explain: error: --out {afile}: is a file; explain writes a folder of figures, name one\n"
    assert afile.read_text() == "mine\n"
    out = tmp_path / "explain"
    with locked_directory(out, "dmhpc explain"):
        assert main([*explain, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{out}: in use by another dmhpc explain (pid {os.getpid()} on " in err and err.count("\n") == 1, err
    assert not out.exists()
    # Figures among a data set's shards: `prepare --overwrite` of it keeps them (predict refused it)
    for data, folder in ((["--data", str(survey / "noisy")], survey / "noisy"), ([], survey / "pristine")):
        among = folder / "explain"
        assert main([*explain, *data, "--out", str(among)]) == 1
        err = capsys.readouterr().err
        assert err == (f"dmhpc explain: error: --out {among}: inside {folder}, an input of this explanation; "
                       f"write the figures elsewhere\n"), err
        assert not among.exists()
    # A copy of the run whose checkpoint says its target was another preparation of the set.
    run = tmp_path / "run"
    shutil.copytree(run_on_survey, run)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    was = state["data"]["target"]["fingerprint"]
    state["data"]["target"]["fingerprint"] = "0" * len(was)
    torch.save(state, best)
    assert main(["explain", "--run", str(run), "--n", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"data.target {survey / 'survey'}: prepared again since the run trained on it (manifest fingerprint "
            f"000000000000 -> {was[:12]}); explain it as other data with --data") in err and err.count("\n") == 1, err
    assert not out.exists()
    assert main([*explain, "--out", str(out)]) == 0
    assert json.loads((out / "explain.json").read_text())["fingerprints"]["target"] == was


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_with_normalization_built_in_and_a_card(survey, run_on_survey, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"merger.{fmt}"
    assert main(["export", "--run", str(run_on_survey), "--format", fmt, "--out", str(out)]) == 0
    from dmhpc.infer.export import build, load_safetensors

    reference = build(RunDir(run_on_survey)).model
    raw = torch.rand(7, 3, 75, 75) * 3 - 0.5  # raw pixels: the export normalizes them itself
    with torch.no_grad():
        want = [t.numpy() for t in reference(raw)]
        # the log-odds are the logit of p, and order what float32 p ties at 1.0
        np.testing.assert_allclose(1 / (1 + np.exp(-want[1].astype("f8"))), want[0], rtol=0, atol=1e-6)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["p_merger", "log_odds"]
        got = session.run(None, {"image": raw.numpy()})
        for g, w, atol in zip(got, want, (1e-5, 1e-4)):
            np.testing.assert_allclose(g, w, rtol=0, atol=atol)
    elif fmt == "torchscript":
        with torch.no_grad():
            got = [t.numpy() for t in torch.jit.load(str(out))(raw)]
        for g, w, atol in zip(got, want, (1e-6, 1e-5)):
            np.testing.assert_allclose(g, w, rtol=0, atol=atol)
    else:
        with torch.no_grad():
            got = [t.numpy() for t in load_safetensors(out)(raw)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    # the same as `dmhpc predict` on the same images
    np.save(tmp_path / "raw.npy", raw.numpy())
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "raw.npy"),
                 "--out", str(tmp_path / "raw.ecsv")]) == 0
    from astropy.table import Table

    np.testing.assert_allclose(np.asarray(Table.read(tmp_path / "raw.ecsv")["p_merger"]), want[0], rtol=0, atol=1e-6)
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["model"]["format"] == fmt and card["selection"]["criterion"] == "im"
    assert card["data"]["target"]["fingerprint"]
    assert card["test_metrics"]["source"]["accuracy"] == RunDir(run_on_survey).read_result()["source"]["accuracy"]
    assert card["config"]["model"]["name"] == "deepmerge2" and card["model"]["dmhpc"]
    # The share the model calls mergers, not the class balance: the header says so.
    assert "## Test metrics" in Path(f"{out}.card.md").read_text()
    assert "| Brier | predicted merger fraction |" in Path(f"{out}.card.md").read_text()
    # What a deployer needs: names, layout, threshold, the oracle flag, and the limits of the built-in normalization.
    assert card["input"]["name"] == "image" and [o["name"] for o in card["outputs"]] == ["p_merger", "log_odds"]
    assert card["outputs"][0]["threshold"] == 0.5 and "`log_odds`" in Path(f"{out}.card.md").read_text()
    if fmt == "onnx":
        assert set(card["model"]["onnxruntime_max_difference"]) == {"p_merger", "log_odds"}
    assert card["input"]["layout"].startswith("NCHW") and card["selection"]["oracle"] is False
    assert card["input"]["normalization"].endswith("normalized its target domain with, its own")
    assert card["model"].get("onnx_opset") == (20 if fmt == "onnx" else None)
    assert "## Limits" in Path(f"{out}.card.md").read_text() and "--normalize own" in Path(f"{out}.card.md").read_text()
    # What it is for, and that p is no calibrated merger fraction (the card said nothing of its use).
    assert "## Intended use" in Path(f"{out}.card.md").read_text() and "p_merger is not calibrated" in \
        card["intended_use"] and "(an oracle)" not in card["intended_use"]
    from dmhpc.infer.export import _intended_use

    assert "(an oracle): its test metrics are an upper bound" in _intended_use(oracle=True)
    # What a receiver checks the file, and the run its checkpoint, against.
    from dmhpc.data.shards import file_sha256

    assert card["model"]["sha256"] == file_sha256(out) and card["model"]["sha256"] in Path(f"{out}.card.md").read_text()
    assert card["checkpoint"]["sha256"] == file_sha256(RunDir(run_on_survey).checkpoint("best"))
    assert main(["export", "--run", str(run_on_survey), "--format", fmt, "--out", str(out)]) == 1  # no overwrite
    # The file says what it is without its card (the card can be left behind; the ONNX file's
    # metadata was empty): input shape, outputs, threshold, checkpoint, dmhpc version.
    if fmt == "onnx":
        embedded = session.get_modelmeta().custom_metadata_map
    elif fmt == "torchscript":
        files = {"dmhpc.json": ""}
        torch.jit.load(str(out), _extra_files=files)
        embedded = json.loads(files["dmhpc.json"])
    else:
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            embedded = f.metadata()
    assert json.loads(embedded["input_shape"]) == ["N", 3, 75, 75] and embedded["merger_threshold"] == "0.5"
    assert embedded["checkpoint_sha256"] == card["checkpoint"]["sha256"] and embedded["dmhpc"] == card["model"]["dmhpc"]
    assert "class 1: merger" in embedded["outputs"] and embedded["architecture"] == "deepmerge2"


def test_export_reads_an_edited_result_file_or_refuses_it_in_one_line(run_on_survey, tmp_path, capsys):
    """A result without its source metrics was a KeyError in the card, one whose checkpoint is not a
    mapping an AttributeError, and a text accuracy a ValueError in its markdown."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_on_survey, run)
    path = RunDir(run).result_path("best", "test")
    result = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in result.items() if k != "source"}))
    out = tmp_path / "merger.safetensors"
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["test_metrics"]["source"] == {} and card["test_metrics"]["target"]["n"] == result["target"]["n"]
    # An undefined metric (NaN in dmhpc's result files) is null in the card: strict parsers refuse NaN.
    path.write_text(json.dumps({**result, "source": {**result["source"], "precision": float("nan")}}))
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 0

    def refused(constant):
        raise AssertionError(f"{constant} in the card: not JSON")

    card = json.loads(Path(f"{out}.card.json").read_text(), parse_constant=refused)
    assert card["test_metrics"]["source"]["precision"] is None
    assert card["test_metrics"]["source"]["accuracy"] == result["source"]["accuracy"]
    for key, value, message in (("checkpoint", [1], "checkpoint: expected a mapping, got [1]"),
                                ("source", {**result["source"], "accuracy": "0.9"},
                                 'source.accuracy: expected a number or null, got "0.9"')):
        path.write_text(json.dumps({**result, key: value}))
        assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"{path}: {message}" in err and err.count("\n") == 1, err


def test_the_card_reports_the_test_of_the_exported_checkpoint_only(survey, tmp_path, monkeypatch, capsys):
    """The card took eval/best_test.json whatever checkpoint it came from: a run trained on since
    showed an earlier checkpoint's test metrics under the new one's name. And an ONNX file that
    failed its onnxruntime check stayed behind, without a card."""
    run = tmp_path / "run"
    argv = ["train", "--config", str(TINY), *overrides(survey, run)]
    assert main(argv) == 0
    assert main(["eval", "--run", str(run), "--checkpoint", "last"]) == 0
    out = tmp_path / "last.safetensors"
    assert main(["export", "--run", str(run), "--checkpoint", "last", "--format", "safetensors", "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    tested = RunDir(run).read_result("last", "test")  # the card reports that very evaluation
    assert card["test_metrics"]["source"]["accuracy"] == tested["source"]["accuracy"]
    steps = card["checkpoint"]["step"]
    assert "the run's latest, not chosen by any criterion" in Path(f"{out}.card.md").read_text()
    assert main([*argv, "train.epochs=2"]) == 0  # last.pt moves on; eval/last_test.json stays behind
    assert main(["export", "--run", str(run), "--checkpoint", "last", "--format", "safetensors", "--out", str(out),
                 "--overwrite"]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["checkpoint"]["step"] == 2 * steps and card["test_metrics"] is None
    assert "Not evaluated on the test split" in Path(f"{out}.card.md").read_text()

    from dmhpc.infer import export

    # An --out another format's name, or a folder: an ONNX file named .safetensors was written, and a
    # folder was refused as "exists", then, with --overwrite, failed after the model was built.
    (tmp_path / "folder").mkdir()
    for fmt, out, refusal in [
        ("onnx", "m.safetensors", "m.safetensors: --format onnx writes a .onnx file; name it so"),
        ("safetensors", "newdir/", "newdir: --format safetensors writes a .safetensors file; name it so"),
        ("torchscript", "folder", "folder: is a folder; give the file to write, such as "
                                  f"{tmp_path / 'folder' / 'merger.pt'}")]:
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--format", fmt, "--out", f"{tmp_path}/{out}", "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and refusal in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("m.", "newdir", ".m", ".newdir"))) == []

    onnx = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(onnx)]) == 0
    exported = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("m.onnx")}
    monkeypatch.setattr(export, "ONNX_TOLERANCE", {"p_merger": -1.0, "log_odds": -1.0})  # any difference is too much
    capsys.readouterr()
    for argv in (["--out", str(tmp_path / "n.onnx")], ["--out", str(onnx), "--overwrite"]):
        assert main(["export", "--run", str(run), "--format", "onnx", *argv]) == 1
        assert "onnxruntime differs from torch by" in capsys.readouterr().err
    # Nothing of the failed exports; the one replaced in vain stands with its own cards.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".m.onnx", ".n.onnx", "n.onnx"))) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("m.onnx")} == exported
    assert len(exported) == 3


def test_export_says_one_line_and_checks_what_it_traced(run_on_survey, tmp_path, monkeypatch, capsys):
    """The ONNX exporter printed 8 progress lines and 6 warnings around the one a user reads; a
    traced TorchScript model was never run beside the torch one on other images than it traced, and
    its log-odds, which p hides where it saturates, are checked too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "dmhpc", "export", "--run", str(run_on_survey), "--format", "onnx",
                           "--out", str(out)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"wrote {out} and its card ") and proc.stdout.count("\n") == 1, proc.stdout
    real_trace = torch.jit.trace

    def a_trace_off_elsewhere(output):  # exact on the zeros it traced, 1e-3 off on images in one output
        def trace(model, example):
            traced = real_trace(model, example)

            class Off(torch.nn.Module):
                def forward(self, x):
                    outputs = list(traced(x))
                    outputs[output] = outputs[output] + 1e-3 * x.abs().mean()
                    return tuple(outputs)

            return Off()

        return trace

    argv = ["export", "--run", str(run_on_survey), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    for output, name in enumerate(("p_merger", "log_odds")):
        monkeypatch.setattr(torch.jit, "trace", a_trace_off_elsewhere(output))
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "m.pt: the traced model differs from torch by" in err and f" in {name} (more than" in err, err
        assert not (tmp_path / "m.pt").exists()


def test_the_export_check_is_relative_for_large_log_odds():
    """An absolute 1e-4 on the log-odds refused the correct export of a confident model, whose
    log-odds of 100 float32 kernels differ in by more; a small one is held to 1e-4 as before."""
    from dmhpc.infer.export import ONNX_TOLERANCE, _check

    p = np.array([0.5, 1.0])
    assert _check(Path("m.onnx"), "onnxruntime", [p, [0.5, 100.005]], [p, [0.5, 100.0]], ONNX_TOLERANCE)[
        "log_odds"] == pytest.approx(5e-5)
    with pytest.raises(DmhpcError, match=r"^m.onnx: onnxruntime differs from torch by 5.00e-04 in log_odds \(more "
                                         r"than 0.0001, relative above 1\); nothing written$"):
        _check(Path("m.onnx"), "onnxruntime", [p, [0.5005, 100.0]], [p, [0.5, 100.0]], ONNX_TOLERANCE)


def test_export_refuses_a_shape_its_network_does_not_take_and_a_card_that_is_a_folder(run_on_survey, tmp_path,
                                                                                     capsys):
    """A checkpoint recording 64 x 64 images for a 75 x 75 network: the safetensors card said an input
    the model refuses, ONNX and TorchScript were tracebacks. A card path that is a folder, under
    --overwrite, removed the other card and then failed naming the model file."""
    run = Path(shutil.copytree(run_on_survey, tmp_path / "run"))
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    for role in ("source", "target"):
        state["data"][role]["shape"] = [3, 64, 64]
    torch.save(state, best)
    for fmt, name in (("safetensors", "m.safetensors"), ("torchscript", "m.pt")):
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dmhpc export: error: {best}: its network does not take images of the shape it "
                              f"records, (3, 64, 64) (") and err.count("\n") == 1, err
        assert not (tmp_path / name).exists()
    # A target of one channel recorded for a network of three: its one mean and std were broadcast
    # over the three channels, exit 0, and the safetensors file's own loader refused it.
    state["data"]["source"]["shape"] = [3, 75, 75]
    state["data"]["target"].update(shape=[1, 75, 75], mean=[0.4], std=[0.5])
    torch.save(state, best)
    for fmt, name in (("safetensors", "m.safetensors"), ("onnx", "m.onnx")):
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / name)]) == 1
        assert capsys.readouterr().err == (f"dmhpc export: error: {best}: its data record gives the target images "
                                           f"[1, 75, 75] and the source [3, 75, 75], which no run trains on (edited "
                                           f"by hand?)\n")
        assert not (tmp_path / name).exists()
    out = tmp_path / "n.safetensors"
    assert main(["export", "--run", str(run_on_survey), "--format", "safetensors", "--out", str(out)]) == 0
    Path(f"{out}.card.json").unlink()
    Path(f"{out}.card.json").mkdir()
    card = Path(f"{out}.card.md").read_text()
    capsys.readouterr()
    assert main(["export", "--run", str(run_on_survey), "--format", "safetensors", "--out", str(out),
                 "--overwrite"]) == 1
    assert capsys.readouterr().err == (f"dmhpc export: error: --out {out}: its card {out}.card.json exists and is "
                                       f"not a file; remove it or write elsewhere\n")
    assert Path(f"{out}.card.md").read_text() == card


def test_an_edited_selection_in_the_checkpoint_is_one_line_and_names_no_other_checkpoint(run_on_survey, tmp_path,
                                                                                          capsys):
    """A criterion of another type was a TypeError traceback ("unhashable type: 'list'"); a score of
    text was printed on the card; a "name" in the selection renamed the checkpoint on the card, whose
    result was then looked up outside the run (eval/../../x_test.json)."""
    run = Path(shutil.copytree(run_on_survey, tmp_path / "run"))
    best = run / "checkpoints" / "best.pt"
    original = torch.load(best, weights_only=True)
    out = tmp_path / "m.safetensors"
    for edit, said in (({"criterion": ["dev"]}, 'selection.criterion: expected text or null, got ["dev"]'),
                       ({"score": "high"}, 'selection.score: expected a number or null, got "high"')):
        torch.save({**original, "selection": {**original["selection"], **edit}}, best)
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 1
        assert capsys.readouterr().err == f"dmhpc export: error: {best}: {said} (an edited checkpoint, or not one " \
                                          f"of dmhpc)\n"
        assert not out.exists()
    torch.save({**original, "selection": {**original["selection"], "name": "../../x"}}, best)
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["checkpoint"]["name"] == "best"


def test_the_card_names_files_with_backticks_and_spaces_whole(run_on_survey, tmp_path):
    """A backtick in the file's or the run's name ended the card's code span early, and the eval
    command the card gives for an untested checkpoint did not quote a run path with a space."""
    import shlex

    from tests.test_leaderboard import code_spans

    run = Path(shutil.copytree(run_on_survey, tmp_path / "my `best` run"))
    shutil.rmtree(run / "eval")  # untested: the card gives the command that tests it
    out = tmp_path / "m`1.safetensors"
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    lines = Path(f"{out}.card.md").read_text().splitlines()
    assert code_spans(lines[0]) == [out.name]
    (sha,) = [line for line in lines if line.startswith("SHA-256 of ")]
    assert code_spans(sha)[0] == out.name
    (command,) = [code_spans(line)[0] for line in lines if line.startswith("Not evaluated on the test split")]
    assert shlex.split(command) == ["dmhpc", "eval", "--run", str(run.resolve()), "--checkpoint", "best"]


def test_a_rebuilt_safetensors_model_refuses_other_images_and_a_file_its_card_does_not_name(run_on_survey,
                                                                                            tmp_path):
    """load_safetensors rebuilt a network that took any image size (a ResNet answered for 64x64
    cutouts of a model trained on 75x75; the ONNX export refuses them), and loaded a file edited
    with finite values though the card beside it names another SHA-256."""
    from safetensors.torch import load_file, save_file

    from dmhpc.infer.export import load_safetensors

    out = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(run_on_survey), "--format", "safetensors", "--out", str(out)]) == 0
    model = load_safetensors(out)
    with torch.no_grad():
        model(torch.rand(2, 3, 75, 75))
        with pytest.raises(DmhpcError, match=r"m.safetensors: the model takes images of \(C, H, W\) \(3, 75, 75\), "
                                             r"got \(3, 64, 64\)"):
            model(torch.rand(2, 3, 64, 64))
        # Used as a module is: called by keyword, saved whole (a forward pre-hook broke both).
        np.testing.assert_array_equal(model(image=torch.ones(1, 3, 75, 75))[0], model(torch.ones(1, 3, 75, 75))[0])
    torch.save(model, tmp_path / "whole.pt")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(out)
    tensors["std"] = tensors["std"] * 2  # finite, plausible: another model
    save_file(tensors, out, metadata=metadata)
    with pytest.raises(DmhpcError, match=r"m.safetensors: not the file its card m.safetensors.card.json names "
                                         r"\(SHA-256 differs\)"):
        load_safetensors(out)
    Path(f"{out}.card.json").unlink()  # no card beside it: the file alone, as handed on
    assert load_safetensors(out) is not None


def test_export_of_a_run_normalized_by_the_source_says_so(survey, tmp_path):
    """Under data.normalize: source the run normalized its target with the source's statistics: the
    file builds those in, and the card said "the target domain's" in its limits."""
    from dmhpc.infer.export import load_safetensors

    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run, "noisy", "data.normalize=source")]) == 0
    out = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    source_mean, _ = RunDir(run).normalization("source")
    np.testing.assert_allclose(load_safetensors(out).mean.flatten().numpy(), source_mean, rtol=1e-6)
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["input"]["normalization"].endswith("the source's (data.normalize: source)")
    text = Path(f"{out}.card.md").read_text()
    assert "The built-in normalization is the source domain's" in text and "target domain's" not in text


def test_load_safetensors_of_a_file_that_is_no_export_is_one_line(run_on_survey, tmp_path):
    from safetensors.torch import save_file

    from dmhpc.infer.export import load_safetensors

    out = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(run_on_survey), "--format", "safetensors", "--out", str(out)]) == 0
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[:100])
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))  # no metadata: someone else's file
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**meta, "model": json.dumps({"name": "resnet18"})})
    zero = tmp_path / "zero.safetensors"
    save_file({**tensors, "std": torch.zeros_like(tensors["std"])}, str(zero), metadata=meta)
    # A weight made NaN (it loaded, and answered NaN for every image), and a model of "null" (it
    # built the default network, and loaded only where the weights happened to fit that).
    name = next(k for k, v in tensors.items() if v.is_floating_point() and k not in ("mean", "std"))
    nan = tmp_path / "nan.safetensors"
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, str(nan), metadata=meta)
    null = tmp_path / "null.safetensors"
    save_file(tensors, str(null), metadata={**meta, "model": "null"})
    for path, said in ((tmp_path / "none.safetensors", "no such file"), (cut, "not a readable safetensors file"),
                       (bare, "not a dmhpc export (its metadata's model or its mean and std tensors"),
                       (other, "its tensors do not fit a resnet18 network of 3 channels"),
                       (zero, "its normalization is not finite numbers with std above 0"),
                       (nan, f"{name} holds NaN or Inf, which dmhpc never saves"),
                       (null, "not a dmhpc export (its metadata's model or its mean and std tensors: ValueError "
                              "model null names no network)")):
        with pytest.raises(DmhpcError, match=re.escape(f"{path}: {said}")):
            load_safetensors(path)
    assert load_safetensors(out).std.min() > 0


def test_an_hdf5_catalog_that_meets_a_file_size_limit_is_one_line_and_keeps_the_parts(run_on_survey, tmp_path):
    """h5py's close of a catalog that met a full disk (or a file-size limit) crashed the process: a
    segmentation fault, exit 139, no error line, its temporary file left beside --out."""
    import resource
    import subprocess

    np.save(tmp_path / "survey.npy", np.random.default_rng(4).normal(0.5, 0.3, (200, 3, 75, 75)).astype(np.float32))
    out = tmp_path / "out" / "c.h5"
    out.parent.mkdir()

    def limited():  # each file at most 8 KiB: the parts fit, the catalog does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = subprocess.run([sys.executable, "-m", "dmhpc", "predict", "--run", str(run_on_survey), "--images",
                           str(tmp_path / "survey.npy"), "--out", str(out), "--part-size", "40", "--batch-size", "40"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limited, cwd=ROOT,
                          env=clean_env())  # (on the CPU on a GPU machine too: the test is not marked gpu)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"dmhpc predict: error: {out}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "File too large" in proc.stderr and "the parts are kept" in proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.h5.parts"]
    # with room, a rerun merges the parts kept
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "survey.npy"), "--out",
                 str(out), "--part-size", "40", "--batch-size", "40"]) == 0
    from astropy.table import Table

    table = Table.read(out, path="catalog")
    assert len(table) == 200 and table.meta["RUN"] and table["p_merger"].description.startswith("merger probability")


def test_a_full_disk_at_a_torchscript_export_is_one_line_and_leaves_nothing(run_on_survey, small_disk, tmp_path):
    """torch's zip writer aborted the process on a full disk (a C++ exception from a destructor:
    exit 134, a stack dump) and left its temporary file beside --out."""
    import subprocess

    def export(out):
        return subprocess.run([sys.executable, "-m", "dmhpc", "export", "--run", str(run_on_survey), "--format",
                               "torchscript", "--out", str(out)], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=clean_env())  # (no CUDA context on a GPU machine: not marked gpu)

    assert export(tmp_path / "whole.pt").returncode == 0
    half = (tmp_path / "whole.pt").stat().st_size // 2  # the model's file meets the full disk halfway
    disk = small_disk(f"{-(-half // 4096) * 4}k")
    proc = export(disk / "m.pt")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("dmhpc export: error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr
    assert list(disk.iterdir()) == []


def test_two_exports_to_one_file_are_refused_and_an_unfinished_one_says_so(run_on_survey, tmp_path, monkeypatch,
                                                                           capsys):
    """Two exports to one --out both passed the exists check and raced; a kill between the two
    card writes left the JSON card without the Markdown one, indistinguishable from a finished export."""
    import os

    from dmhpc.files import locked_directory

    out = tmp_path / "m.safetensors"
    export = ["export", "--run", str(run_on_survey), "--format", "safetensors", "--out", str(out)]
    (tmp_path / "m.safetensors.card.md").write_text("my notes")  # someone's file by a card's name
    capsys.readouterr()
    assert main(export) == 1
    assert f"--out {out}: m.safetensors.card.md beside it exists" in capsys.readouterr().err
    assert (tmp_path / "m.safetensors.card.md").read_text() == "my notes" and not out.exists()
    (tmp_path / "m.safetensors.card.md").unlink()
    with locked_directory(out, "dmhpc export"):
        capsys.readouterr()
        assert main(export) == 1
        err = capsys.readouterr().err
        assert f"{out}: in use by another dmhpc export (pid {os.getpid()} on " in err and err.count("\n") == 1, err
    assert not out.exists()
    assert main(export) == 0

    class Killed(BaseException):
        pass

    replace = os.replace

    def killed_at_the_json_card(src, dst):
        if str(dst).endswith(".card.json"):
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_json_card)
    with pytest.raises(Killed):
        main([*export, "--overwrite"])
    monkeypatch.undo()
    # The new file and its Markdown card stand; no JSON card of the file replaced, no temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.card.md"]
    capsys.readouterr()
    assert main(export) == 1
    err = capsys.readouterr().err
    assert "exists (without its m.safetensors.card.json: an export that did not finish?)" in err, err
    # What writes killed outright (SIGKILL: no `finally` ran) leave goes at the next export.
    killed = [tmp_path / ".m.safetensors.k1ll3d_a.tmp", tmp_path / ".m.safetensors.card.json.k1ll3d_b.tmp"]
    for leftover in killed:
        leftover.write_text("half")
    assert main([*export, "--overwrite"]) == 0
    assert not any(leftover.exists() for leftover in killed)
    card = json.loads(Path(f"{out}.card.json").read_text())
    from dmhpc.data.shards import file_sha256

    assert card["model"]["sha256"] == file_sha256(out) and card["model"]["sha256"] in Path(f"{out}.card.md").read_text()
    # A disk that fills at the second card: nothing of the new export, not even the first card's
    # temporary file; the old export stands whole.
    from dmhpc.errors import DmhpcError
    from dmhpc.infer import export as exporting

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = exporting.staged_write

    def full_at_the_json_card(path, data):
        if str(path).endswith(".card.json"):
            raise DmhpcError(f"{path}: cannot write: No space left on device")
        return real(path, data)

    monkeypatch.setattr(exporting, "staged_write", full_at_the_json_card)
    assert main([*export, "--overwrite"]) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    # A disk full said only at the new file's fsync (NFS, Lustre): the old cards had gone already.
    import errno

    from dmhpc import files

    fsync = os.fsync

    def full_at_the_files_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".card." not in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_at_the_files_fsync)
    capsys.readouterr()
    assert main([*export, "--overwrite"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_explain_stopped_by_a_full_disk_leaves_no_grid_of_its_own(run_on_survey, tmp_path, monkeypatch, capsys):
    """Its one line said "nothing written" beside the grids drawn before the failing one, and the
    rerun was refused: figures without explain.json. A figure of the user's own stays."""
    pytest.importorskip("captum")
    from dmhpc.errors import DmhpcError
    from dmhpc.infer import explain

    out = tmp_path / "explain"
    out.mkdir()
    (out / "mine.png").write_bytes(b"a figure of mine")
    real, drawn = explain.attribution_grid, []

    def full_at_the_third(*args, **kwargs):
        drawn.append(args[6])
        if len(drawn) == 3:
            raise DmhpcError(f"{args[6]}: cannot write: No space left on device (disk full or over quota); "
                             f"nothing written")
        return real(*args, **kwargs)

    monkeypatch.setattr(explain, "attribution_grid", full_at_the_third)
    argv = ["explain", "--run", str(run_on_survey), "--n", "1", "--out", str(out), "--overwrite"]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err and len(drawn) == 3
    assert sorted(p.name for p in out.iterdir()) == ["mine.png"]
    monkeypatch.undo()
    assert main(argv[:-1]) == 1  # refused as ever: a figure of the user's own and no explain.json
    assert main(argv) == 0 and (out / "explain.json").is_file() and (out / "mine.png").is_file()


@pytest.mark.gpu
def test_the_last_mile_on_a_gpu(survey, tmp_path, capsys):
    """Train, then predict (bf16 autocast and TTA too), explain (captum) and export, each on CUDA:
    what a user runs on a GPU node after training there. The catalog's probabilities are the
    checkpoint's forward pass on the CPU, within TF32's precision (cuDNN's default for convolutions)."""
    pytest.importorskip("astropy")  # catalogs are written with astropy
    from astropy.table import Table
    from dmhpc.infer.predict import Model

    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run, "survey", "select.criterion=im")]) == 0
    assert "on cuda:0" in capsys.readouterr().out
    images = np.random.default_rng(5).normal(0.3, 0.5, (96, 3, 75, 75)).astype(np.float32)
    np.save(tmp_path / "survey.npy", images)
    catalogs = {}
    for name, extra in (("fp32", []), ("bf16-tta", ["--amp", "bf16", "--tta"])):
        catalogs[name] = tmp_path / f"{name}.fits"
        assert main(["predict", "--run", str(run), "--images", str(tmp_path / "survey.npy"), "--out",
                     str(catalogs[name]), "--batch-size", "32", "--part-size", "64", *extra]) == 0
        assert "on cuda:0" in capsys.readouterr().out
    fp32, bf16 = (Table.read(catalogs[k]) for k in ("fp32", "bf16-tta"))
    model = Model(RunDir(run), "best", torch.device("cpu"))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in RunDir(run).normalization("target"))
    with torch.no_grad():
        want = torch.softmax(model.net((torch.from_numpy(images) - mean) / std)[1].float(), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(np.asarray(fp32["p_merger"]), want, atol=5e-3)
    assert np.isfinite(np.asarray(bf16["p_merger"])).all() and np.isfinite(np.asarray(bf16["p_merger_std"])).all()
    np.testing.assert_allclose(np.asarray(bf16["p_merger"]), np.asarray(fp32["p_merger"]), atol=0.05)
    assert main(["explain", "--run", str(run), "--catalog", str(catalogs["fp32"]), "--n", "4",
                 "--out", str(tmp_path / "explain")]) == 0
    assert (tmp_path / "explain" / "top_candidates.png").is_file()
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0


def test_single_channel_images_train_evaluate_predict_and_export(tmp_path, capsys):
    """The network always took 3 channels: single-filter data (1 channel, as FITS cutouts of one
    band give) could never be trained. Its channels come from the data, and every later step
    (eval, predict, export and loading the export) rebuilds the network for them."""
    rng = np.random.default_rng(0)
    for name in ("pristine", "noisy"):
        write_dataset(rng.normal(size=(60, 1, 8, 8)).astype("f4"), np.arange(60) % 2, None, tmp_path / name)
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(tmp_path, run, "noisy", "model.name=resnet18",
                                                              "model.stem=small", "train.batch_size=4")]) == 0
    assert main(["eval", "--run", str(run), "--checkpoint", "last"]) == 0
    raw = rng.normal(size=(5, 1, 8, 8)).astype("f4")
    np.save(tmp_path / "raw.npy", raw)
    assert main(["predict", "--run", str(run), "--images", str(tmp_path / "raw.npy"),
                 "--out", str(tmp_path / "raw.ecsv")]) == 0
    out = tmp_path / "merger.safetensors"
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    from astropy.table import Table
    from dmhpc.infer.export import load_safetensors

    with torch.no_grad():
        got = load_safetensors(out)(torch.from_numpy(raw))[0].numpy()
    np.testing.assert_allclose(np.asarray(Table.read(tmp_path / "raw.ecsv")["p_merger"]), got, rtol=0, atol=1e-6)
    # one filter: drawn in grey, the default --rgb unused (and not recorded as the colours drawn)
    assert main(["explain", "--run", str(run), "--n", "1", "--out", str(tmp_path / "explain")]) == 0
    assert json.loads((tmp_path / "explain" / "explain.json").read_text())["rgb"] is None
    # --rgb asked of it is refused (it was taken, and recorded as null, without a word)
    assert main(["explain", "--run", str(run), "--n", "1", "--rgb", "0,0,0", "--out", str(tmp_path / "no")]) == 1
    assert ("--rgb 0,0,0: the run's images have 1 filter, drawn in grey; --rgb chooses three of more"
            in capsys.readouterr().err) and not (tmp_path / "no").exists()


def test_predict_and_export_read_the_statistics_and_test_of_the_weights_they_load(survey, tmp_path):
    """A run replaced (--resume none --overwrite) while predict or export read it: they took the
    weights first and run.json's statistics and the test result later, so a catalog and a model
    card named the old checkpoint with the new run's normalization and test metrics. The
    statistics now come with the weights, and a result counts only for the checkpoint it tested."""
    import hashlib

    from astropy.table import Table

    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run)]) == 0
    mean, std = RunDir(run).normalization("target")
    best = run / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["data"]["target"]["mean"] == mean
    assert RunDir(run).read_result("best", "test")["checkpoint"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    # run.json as the replacing run writes it, while the reader holds the old weights.
    record = json.loads((run / "run.json").read_text())
    record["data"]["target"]["mean"] = [m + 5.0 for m in mean]
    record["data"]["target"]["std"] = [s * 10.0 for s in std]
    (run / "run.json").write_text(json.dumps(record))
    out = tmp_path / "p.ecsv"
    assert main(["predict", "--run", str(run), "--data", str(survey / "survey"), "--out", str(out)]) == 0
    assert json.loads(Table.read(out).meta["MEAN"]) == mean and json.loads(Table.read(out).meta["STD"]) == std
    model = tmp_path / "m.safetensors"
    export = ["export", "--run", str(run), "--format", "safetensors", "--out", str(model), "--overwrite"]
    assert main(export) == 0
    card = json.loads(Path(f"{model}.card.json").read_text())
    assert card["input"]["mean"] == mean and card["input"]["std"] == std and card["test_metrics"] is not None
    from dmhpc.infer.export import load_safetensors

    built_in = load_safetensors(model)  # the file's own normalization, not only the card's account of it
    np.testing.assert_allclose(built_in.mean.flatten().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(built_in.std.flatten().numpy(), std, rtol=1e-6)
    # The test of another checkpoint of the same step (the replacing run's): not this one's.
    result = RunDir(run).read_result("best", "test")
    result["checkpoint"]["sha256"] = "0" * 64
    RunDir(run).write_result(result, "best", "test")
    assert main(export) == 0
    assert json.loads(Path(f"{model}.card.json").read_text())["test_metrics"] is None


def test_a_best_checkpoint_of_another_moment_of_the_run_is_not_tested_as_its_selection(survey, tmp_path, capsys):
    """A run directory copied while it trained holds a best.pt older than its last.pt (rsync copies
    best.pt first). Resumed, its final test reported that earlier epoch as the run's result."""
    run = tmp_path / "run"
    argv = ["train", "--config", str(TINY), *overrides(survey, run)]
    assert main(argv) == 0
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    state["selection"]["score"] -= 1.0  # as a best.pt of an earlier epoch scored
    torch.save(state, best)
    (run / "eval" / "best_test.json").unlink()
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{best}: of epoch" in err and "put the run's own best.pt back" in err, err
    assert not (run / "eval" / "best_test.json").exists()


def test_predict_export_and_explain_refuse_a_config_yaml_edited_away_from_the_checkpoint(run_on_survey, survey,
                                                                                          tmp_path, capsys):
    """Only eval was tested: without the check, predict, explain and export read the checkpoint as
    another model (here: another normalization), and export's card showed the edited config."""
    run = tmp_path / "run"
    shutil.copytree(run_on_survey, run)
    config = run / "config.yaml"
    text = config.read_text()
    assert "normalize: per-domain" in text
    config.write_text(text.replace("normalize: per-domain", "normalize: source"))
    said = (f"{config}: differs from what {run / 'checkpoints' / 'best.pt'} was trained with: data.normalize "
            f'"source", trained with "per-domain" (edited by hand? restore it)\n')
    for argv in (["predict", "--data", str(survey / "survey"), "--out", str(tmp_path / "c.parquet")],
                 ["export", "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")],
                 ["explain", "--n", "1", "--out", str(tmp_path / "x")]):
        capsys.readouterr()
        assert main([argv[0], "--run", str(run), *argv[1:]]) == 1, argv
        assert capsys.readouterr().err == f"dmhpc {argv[0]}: error: {said}", argv
    assert not any((tmp_path / name).exists() for name in ("c.parquet", "m.safetensors", "x"))


def test_a_run_replaced_while_its_checkpoint_is_read_gives_weights_and_config_of_one_run(run_on_survey, tmp_path,
                                                                                         monkeypatch):
    """config.yaml was read before the checkpoint and again to check it: a run replaced between the
    two (--resume none --overwrite) passed the check, new config against new weights, and export
    built and described the new weights with the old config."""
    from dmhpc.infer import trained as trained_module

    run = Path(shutil.copytree(run_on_survey, tmp_path / "run"))
    config = run / "config.yaml"
    load = trained_module.load_checkpoint_sha256

    def replaced_meanwhile(path):  # the replacing run's config.yaml and checkpoint, in place now
        state, sha256 = load(path)
        config.write_text(config.read_text().replace("normalize: per-domain", "normalize: source"))
        state["config"]["data"]["normalize"] = "source"
        return state, sha256

    monkeypatch.setattr(trained_module, "load_checkpoint_sha256", replaced_meanwhile)
    assert trained_module.load_trained(RunDir(run), "best").cfg.data.normalize == "source"


def test_the_model_card_of_a_checkpoint_chosen_with_target_labels_says_oracle(survey, tmp_path):
    """Only runs selected without target labels were exported in the tests: a card saying "without
    target labels" for an oracle's checkpoint would have passed."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run, "noisy",
                                                             "select.criterion=oracle-target-acc")]) == 0
    out = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["selection"]["criterion"] == "oracle-target-acc" and card["selection"]["oracle"] is True
    assert "using target labels (an oracle" in Path(f"{out}.card.md").read_text()


def test_the_card_of_last_says_what_early_stopping_it_trained_under(survey, tmp_path):
    """last.pt is chosen by nothing but where early stopping ended the run: the card and `dmhpc eval`
    took that from config.yaml, which a resume rewrites (killed before its first checkpoint, it is
    ahead of last.pt), so an oracle's early stop read as no oracle."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), *overrides(survey, run, "noisy", "select.criterion=oracle-target-acc",
                                                             "train.early_stopping=5")]) == 0
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("early_stopping: 5", "early_stopping: 0"))  # as a resume writes it
    out = tmp_path / "m.safetensors"
    argv = ["export", "--run", str(run), "--checkpoint", "last", "--format", "safetensors", "--out", str(out)]
    assert main(argv) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["selection"] == {"criterion": None, "score": None, "oracle": True}, card["selection"]
    assert card["checkpoint"]["early_stopping"] == {"evaluations": 5, "criterion": "oracle-target-acc"}
    assert "but early stopping watched target labels (an oracle)" in Path(f"{out}.card.md").read_text()
    assert main(["eval", "--run", str(run), "--checkpoint", "last"]) == 0
    assert RunDir(run).read_result("last", "test")["oracle"] is True


def test_explain_draws_each_domains_test_images_by_their_own_normalization_and_predicted_class(
        survey, run_on_survey, tmp_path, monkeypatch):
    """Mutants that drew the training split, normalized a domain with the other's statistics, or
    put the unlabelled survey's predicted non-mergers in its merger grid all passed: only file
    names were compared. Each grid's galaxies and probabilities are checked against predict's."""
    from astropy.table import Table

    from dmhpc.data.shards import load_manifest
    from dmhpc.infer import explain as explaining

    from dmhpc.data.batches import Normalizer
    from dmhpc.data.shards import RowReader
    from dmhpc.infer.predict import Model

    shown, drawn = {}, {}
    draw = explaining.attribution_grid

    def spy(images, cams, igs, probs, labels, title, path, rgb, names=None):
        shown[Path(path).name] = (list(names), np.asarray(probs, dtype=np.float64))
        drawn[Path(path).name] = (np.array(images), np.array(cams), np.array(igs))
        return draw(images, cams, igs, probs, labels, title, path, rgb, names=names)

    monkeypatch.setattr(explaining, "attribution_grid", spy)
    assert main(["explain", "--run", str(run_on_survey), "--n", "3", "--out", str(tmp_path / "x")]) == 0
    # The composites are of the images as stored, the attributions of them as the network saw them
    # (mutants drawing normalized images, or attributing raw ones, passed).
    model = Model(RunDir(run_on_survey), "best", torch.device("cpu"))
    for grid, (images, cams, igs) in drawn.items():
        domain, folder = ("source", "pristine") if grid.startswith("source") else ("target", "survey")
        with RowReader(survey / folder) as reader:
            rows = reader.read(0, len(reader))
        position = {int(i): k for k, i in enumerate(rows["index"])}
        stored = rows["images"][[position[int(n.removeprefix("index "))] for n in shown[grid][0]]]
        np.testing.assert_array_equal(images, stored, err_msg=grid)
        x = Normalizer(*RunDir(run_on_survey).normalization(domain), torch.device("cpu"))(torch.from_numpy(stored))
        want = explaining.attributions(model, x)
        np.testing.assert_allclose(cams, want[0], rtol=1e-5, atol=1e-7, err_msg=grid)
        np.testing.assert_allclose(igs, want[1], rtol=1e-5, atol=1e-7, err_msg=grid)
    # predict's probabilities: the survey with the run's target statistics, the source set with its
    # own (its training split's: the run's source statistics)
    for folder, normalize in (("survey", "target"), ("pristine", "own")):
        assert main(["predict", "--run", str(run_on_survey), "--data", str(survey / folder), "--normalize",
                     normalize, "--out", str(tmp_path / f"{folder}.parquet")]) == 0
    assert {"source_merger.png", "source_non-merger.png"} <= set(shown) and any(k.startswith("target") for k in shown)
    for grid, (names, probs) in shown.items():
        folder = "pristine" if grid.startswith("source") else "survey"
        catalog = Table.read(tmp_path / f"{folder}.parquet")
        p_of = dict(zip(np.asarray(catalog["index"]).tolist(), np.asarray(catalog["p_merger"], dtype=np.float64)))
        rows = [int(name.removeprefix("index ")) for name in names]
        assert set(rows) <= set(load_manifest(survey / folder)["splits"]["test"].tolist()), grid
        np.testing.assert_allclose(probs, [p_of[r] for r in rows], rtol=0, atol=1e-5, err_msg=grid)
        if grid.startswith("target"):  # unlabelled: by predicted class
            assert ((probs >= 0.5) == (grid == "target_merger.png")).all(), (grid, probs)


def test_explain_data_is_normalized_as_asked_and_says_how(survey, run_on_survey, tmp_path, monkeypatch, capsys):
    """--data was always scaled with the run's target statistics, said nowhere: a labelled set
    given as a domain, which `dmhpc eval` normalizes with its own, was drawn with other probabilities
    than eval's, and the integrated gradients' baseline was the target's mean."""
    from astropy.table import Table

    from dmhpc.data.shards import load_manifest
    from dmhpc.infer import explain as explaining

    shown = {}
    draw = explaining.attribution_grid

    def spy(images, cams, igs, probs, labels, title, path, rgb, names=None):
        shown[Path(path).parent.name, Path(path).name] = (list(names), np.asarray(probs, dtype=np.float64), title)
        return draw(images, cams, igs, probs, labels, title, path, rgb, names=names)

    monkeypatch.setattr(explaining, "attribution_grid", spy)
    pristine = survey / "pristine"
    for normalize in ("target", "own"):
        assert main(["explain", "--run", str(run_on_survey), "--data", str(pristine), "--normalize", normalize,
                     "--n", "3", "--out", str(tmp_path / normalize)]) == 0
        assert main(["predict", "--run", str(run_on_survey), "--data", str(pristine), "--normalize", normalize,
                     "--out", str(tmp_path / f"{normalize}.parquet")]) == 0
        catalog = Table.read(tmp_path / f"{normalize}.parquet")
        recorded = json.loads((tmp_path / normalize / "explain.json").read_text())["normalization"]["data"]
        assert recorded == {"mean": json.loads(catalog.meta["MEAN"]), "std": json.loads(catalog.meta["STD"]),
                            "by": normalize}
    stats = load_manifest(pristine)["stats"]
    assert recorded["mean"] == pytest.approx(stats["mean"]) and recorded["std"] == pytest.approx(stats["std"])
    assert {folder for folder, _ in shown} == {"target", "own"}
    for (folder, grid), (names, probs, title) in shown.items():
        catalog = Table.read(tmp_path / f"{folder}.parquet")
        p_of = dict(zip(np.asarray(catalog["index"]).tolist(), np.asarray(catalog["p_merger"], dtype=np.float64)))
        np.testing.assert_allclose(probs, [p_of[int(n.removeprefix("index "))] for n in names], rtol=0, atol=1e-5)
        assert ("its own statistics" if folder == "own" else "the run's target statistics") in title
    capsys.readouterr()
    assert main(["explain", "--run", str(run_on_survey), "--normalize", "own", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == ("dmhpc explain: error: --normalize own goes with --data: the run's domains "
                                       "are normalized as it trained, a catalog's candidates as predict recorded\n")


def test_a_catalogs_top_candidates_tied_at_p_1_are_ordered_by_their_log_odds():
    """p rounds to exactly 1 past a log-odds of ~37 (a confident model: entropy minimization gives
    20-35): the "top N" were the first N of hundreds tied at 1, in input order."""
    from astropy.table import Table

    from dmhpc.infer.explain import _top_candidates

    table = Table({"index": np.arange(6), "p_merger": [0.3, 1.0, 1.0, 0.99, 1.0, 1.0],
                   "log_odds": [-0.8, 49.5, 359.0, 4.6, 116.5, 306.0]})
    assert _top_candidates(table, 4).tolist() == [2, 5, 4, 1]
    del table["log_odds"]  # a catalog of an older dmhpc: its ties in input order
    assert _top_candidates(table, 4).tolist() == [1, 2, 4, 5]


def test_explain_of_a_catalog_normalizes_as_the_catalog_records(survey, run_on_survey, tmp_path, monkeypatch):
    """A catalog predicted with --normalize own records its images' own statistics: explain took the
    run's target statistics instead (a surviving mutant), and drew attributions of images the
    network never saw so scaled."""
    pytest.importorskip("captum")
    from astropy.table import Table

    from dmhpc.data.shards import RowReader
    from dmhpc.infer import explain as explaining

    with RowReader(survey / "survey") as reader:
        np.save(tmp_path / "scaled.npy", reader.read(0, len(reader))["images"] * 100 + 50)  # another instrument
    catalog = tmp_path / "c.ecsv"
    assert main(["predict", "--run", str(run_on_survey), "--images", str(tmp_path / "scaled.npy"), "--normalize",
                 "own", "--out", str(catalog)]) == 0
    used, seen = [], []
    normalizer, attribute = explaining.Normalizer, explaining.attributions
    monkeypatch.setattr(explaining, "Normalizer", lambda mean, std, device: used.append((mean, std)) or
                        normalizer(mean, std, device))
    monkeypatch.setattr(explaining, "attributions", lambda model, x: seen.append(x.numpy()) or attribute(model, x))
    assert main(["explain", "--run", str(run_on_survey), "--catalog", str(catalog), "--n", "2",
                 "--out", str(tmp_path / "explain")]) == 0
    meta = Table.read(catalog).meta
    recorded = (json.loads(str(meta["MEAN"])), json.loads(str(meta["STD"])))
    assert recorded[0][0] > 40 and used == [recorded]  # the scaled images' own, not the run's target's
    # ... and the attributions are of the candidates so normalized (a mutant attributing them raw passed).
    rows = [int(name) for name in json.loads((tmp_path / "explain" / "explain.json").read_text())["rows"][
        "top_candidates.png"]]
    raw = np.load(tmp_path / "scaled.npy")[rows].astype(np.float64)
    mean, std = (np.asarray(v)[None, :, None, None] for v in recorded)
    np.testing.assert_allclose(seen[0], (raw - mean) / std, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("command", ["export", "predict"])
def test_a_checkpoint_with_a_nan_weight_is_refused_in_one_line(run_on_survey, tmp_path, capsys, command):
    """The trainer never saves one, so it is an edited or damaged file: export wrote it out as a
    model answering NaN for every image, exit 0, and predict said "a pixel too large ..., or NaN
    weights" only once it had read the images."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_on_survey, run)
    best = RunDir(run).checkpoint("best")
    state = torch.load(best, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, best)
    np.save(tmp_path / "images.npy", np.zeros((4, 3, 75, 75), np.float32))
    out = tmp_path / ("m.safetensors" if command == "export" else "catalog.csv")
    argv = (["export", "--run", str(run), "--format", "safetensors", "--out", str(out)] if command == "export" else
            ["predict", "--run", str(run), "--images", str(tmp_path / "images.npy"), "--out", str(out)])
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{best}: model.{name} holds NaN or Inf" in err and err.count("\n") == 1, err
    assert not out.exists()
