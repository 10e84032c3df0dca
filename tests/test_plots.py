"""Figures for scientists: titles that name run, data and checkpoint stay inside the figure."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dmhpc import plots

LONG = ("DA features, model.name=deepmerge2,seed=1: best checkpoint (epoch 19), test split of "
        "/scratch/project/data/embedded/shards/pristine / /scratch/project/data/embedded/shards/survey")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions make, drawn and laid out as they are saved."""
    figures = []

    def keep(fig, path):
        if fig.get_layout_engine() is None:  # as _save lays them out
            fig.tight_layout()
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    for fig in figures:  # as _save closes them: pyplot holds every figure until it is closed
        plots._pyplot().close(fig)


def _inside(fig) -> None:
    box = fig.bbox
    texts = [t for t in fig.texts if t.get_text()] + [ax.title for ax in fig.axes if ax.get_title()]
    assert texts
    for text in texts:
        extent = text.get_window_extent()
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, (text.get_text(), extent, box)


def test_long_titles_are_wrapped_inside_the_figure(drawn, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20)
    prob = np.stack([1 - rng.uniform(size=40), rng.uniform(size=40)], axis=1)
    plots.roc_curves({"source": (labels, prob[:, 1]), "target": (labels, prob[:, 1])}, tmp_path / "roc.png", LONG)
    features = {d: (rng.normal(size=(40, 8)), labels) for d in ("source", "target")}
    plots.latent_embedding(features, tmp_path / "latent.png", LONG, method="pca")
    confusion = {"accuracy": 0.5, "confusion": [[10, 10], [10, 10]]}
    plots.confusion_matrices({"source": confusion}, tmp_path / "confusion.png", LONG)
    assert len(drawn) == 3
    for fig in drawn:
        _inside(fig)
    assert all(len(line) <= 58 for line in plots.wrap_title(LONG, 58).splitlines())


def test_confusion_counts_stay_readable_on_dark_cells(drawn, tmp_path):
    """The counts were black on every cell: on the darkest blue they all but vanished."""
    plots.confusion_matrices({"source": {"accuracy": 0.9, "confusion": [[90, 2], [8, 100]]}},
                             tmp_path / "confusion.png", "t")
    colours = {t.get_text(): t.get_color() for t in drawn[0].axes[0].texts}
    assert colours == {"90": "white", "2": "black", "8": "black", "100": "white"}, colours


def test_training_curves_mark_the_best_epoch_on_whole_epoch_ticks(drawn, tmp_path):
    """One epoch had ticks at -0.04 ... 0.04; the figure now marks the best checkpoint's epoch (the
    first of the highest score, as the trainer keeps it; a NaN score is never selected)."""
    def record(epoch, score):
        metrics = {"train": {"accuracy": 0.5}, "val": {"accuracy": 0.6}}
        return {"kind": "epoch", "epoch": epoch, "loss": {"total": 1.0, "mmd": 0.1}, "source": metrics,
                "target": metrics, "selection": {"criterion": "source_val_accuracy", "score": score}}

    plots.training_curves([record(0, 0.5)], tmp_path / "one.png", "one epoch")
    five = [record(e, s) for e, s in enumerate([0.5, 0.7, float("nan"), 0.7, 0.6])]
    del five[-1]["selection"]  # not evaluated (train.eval_every > 1): a KeyError drawing the mark
    plots.training_curves(five, tmp_path / "five.png", "five epochs")
    assert len(drawn) == 2  # (zip over fewer figures would check nothing)
    for fig, ticks, best in zip(drawn, ([0], [0, 1, 2, 3, 4]), (0, 1)):
        for ax in fig.axes:
            assert list(ax.get_xticks()) == ticks
            marks = [line for line in ax.lines if line.get_linestyle() == ":"]
            assert [list(m.get_xdata()) for m in marks] == [[best, best]]
            assert "best checkpoint (source_val_accuracy)" in [t.get_text() for t in ax.get_legend().get_texts()]
            # The legend lies below the plot, inside the figure: within the axes it covered the curves.
            legend, area = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert legend.y1 < area.y0 and legend.y0 >= fig.bbox.y0 - 1, (legend, area)


def test_training_curves_leave_out_what_a_run_did_not_record(drawn, tmp_path):
    """A run without adaptation records no target train metrics (its target batches do not pass):
    the legend named an empty "target train" curve."""
    val = {"val": {"accuracy": 0.6}}
    records = [{"kind": "epoch", "epoch": e, "loss": {"total": 1.0}, "source": {"train": {"accuracy": 0.5}, **val},
                "target": val} for e in range(3)]
    plots.training_curves(records, tmp_path / "noda.png", "no adaptation")
    names = [t.get_text() for t in drawn[0].axes[1].get_legend().get_texts()]
    assert names == ["source train", "source val", "target val"], names


def test_training_curves_say_each_loss_terms_weight(drawn, tmp_path):
    """The loss panel drew the terms unweighted (Fisher near 1e5 beside a cross-entropy near 1) under
    their bare names: nothing said which weighed what in the total trained on."""
    from dmhpc.config import load_config
    from dmhpc.train.objective import term_labels
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "deepmerge-mmd-fisher-entropy.yaml")
    records = [{"kind": "epoch", "epoch": e, "loss": {"classifier": 0.6, "transfer": 0.02, "fisher": 1e5,
                                                       "entropy": 0.5, "total": 3.0}} for e in range(3)]
    plots.training_curves(records, tmp_path / "curves.png", "t", labels=term_labels(cfg.loss))
    ax = drawn[0].axes[0]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["classifier (cross-entropy, weight 1)",
                     f"transfer (mmd, weight {cfg.loss.transfer_weight:g})",
                     f"fisher (weight {cfg.loss.fisher.weight:g})",
                     f"entropy (weight {cfg.loss.entropy_weight:g})", "total (the weighted sum trained on)"]
    assert ax.get_ylabel() == "loss term, unweighted (epoch mean)"


def test_confusion_panels_share_one_scale_from_zero(drawn, tmp_path):
    """Each panel was scaled from its own smallest count to its largest while the text turned white
    above half the largest: counts of 11 on the palest cell were white on white, and one colour meant
    another count in each domain."""
    plots.confusion_matrices({"source": {"accuracy": 0.44, "confusion": [[11, 12], [16, 11]]},
                              "target": {"accuracy": 0.96, "confusion": [[120, 3], [5, 90]]}},
                             tmp_path / "confusion.png", "t")
    source, target = drawn[0].axes
    assert source.images[0].get_clim() == target.images[0].get_clim() == (0, 120)
    assert {t.get_color() for t in source.texts} == {"black"}
    assert {t.get_text(): t.get_color() for t in target.texts} == {"120": "white", "3": "black", "5": "black",
                                                                     "90": "white"}


def test_a_domain_without_a_roc_says_why_in_the_legend(drawn, tmp_path):
    """A target without labels (or of one class) vanished from the ROC figure without a word."""
    prob = np.tile([[0.3, 0.7], [0.6, 0.4]], (10, 1))
    score = prob[:, 1]
    plots.roc_curves({"source": (np.array([0, 1] * 10), score), "target": (np.full(20, -1), score),
                      "other": (np.ones(20, int), score)}, tmp_path / "roc.png", "t")
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert legend[1:] == ["target: no ROC (unlabelled)", "other: no ROC (one class only)"]
    assert legend[0].startswith("source (AUC ") and legend[0].endswith("; 10 mergers, 10 non-mergers)")


def test_validation_every_few_epochs_is_drawn_as_a_line(drawn, tmp_path):
    """With train.eval_every 3 the validation accuracy had NaN between evaluations, and its line broke
    at each: loose markers like the train points'."""
    records = [{"kind": "epoch", "epoch": e, "loss": {"total": 1.0},
                "source": {"train": {"accuracy": 0.5}, "val": {"accuracy": 0.6} if e % 3 == 2 else {}},
                "target": {"train": {"accuracy": 0.5}, "val": {"accuracy": 0.7} if e % 3 == 2 else {}}}
               for e in range(9)]
    plots.training_curves(records, tmp_path / "curves.png", "t")
    lines = {line.get_label(): line for line in drawn[0].axes[1].lines}
    assert list(lines["source val"].get_xdata()) == [2, 5, 8] and len(lines["source train"].get_xdata()) == 9


def test_an_epoch_record_without_loss_terms_leaves_a_gap(drawn, tmp_path):
    """The terms are the last record's; an earlier record without any was a KeyError in `dmhpc eval`."""
    records = [{"kind": "epoch", "epoch": e, "source": {"val": {"accuracy": 0.6}}} for e in range(2)]
    records[1]["loss"] = {"total": 1.0}
    plots.training_curves(records, tmp_path / "curves.png", "t")
    (line,) = drawn[0].axes[0].lines
    assert np.isnan(line.get_ydata()[0]) and line.get_ydata()[1] == 1.0


def test_the_scaling_figure_names_the_study_and_marks_unfinished_points(drawn, tmp_path):
    from dmhpc.launch.scaling import write_scaling

    rows = [dict(model="deepmerge2", mode="weak", nodes=1, gpus_per_node=g, gpus=g, batch_per_gpu=4,
                 global_batch=4 * g, step_time_s=1.0, images_per_s=8.0 * g, images_per_s_per_gpu=8.0,
                 speedup=float(g), efficiency=1.0 if g < 4 else float("nan"), baseline_gpus=1, staging_s=0.1,
                 loader="torch", warmup_excluded=True, status="finished" if g < 4 else "not finished", point="p",
                 run_dir="d") for g in (1, 2, 4)]
    # A point whose log cannot be read has no figure to draw: it was listed as "not finished".
    rows.append({**rows[0], "model": "resnet18", "step_time_s": float("nan"), "images_per_s": float("nan"),
                 "images_per_s_per_gpu": float("nan"), "speedup": float("nan"), "efficiency": float("nan"),
                 "status": "unreadable log: bad line 3"})
    write_scaling(tmp_path / "out", rows, "gpu")
    fig = drawn[0]
    assert " ".join(fig.texts[0].get_text().split()) == f"scaling study {tmp_path / 'out'} (GPUs): weak scaling, batch 4 per GPU"
    hollow = [line for line in fig.axes[0].lines if line.get_label().endswith(": not finished")]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [4]


def test_an_attribution_grid_names_its_galaxies_and_says_when_grad_cam_is_empty(drawn, tmp_path):
    """Rows said only p(merger) to two decimals (0.996 as 1.00), with no id to find the galaxy again;
    a Grad-CAM of zeros everywhere was drawn under a colour bar of 1e-12 as if it were a weak map; the
    title said nothing of the stretch."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    cams = np.zeros((2, 16, 16))
    igs = rng.normal(size=(2, 16, 16))
    plots.attribution_grid(images, cams, igs, [0.9964, 0.99999], [1, None], "t", tmp_path / "g.png",
                           names=["SDSS J000001.23-101010.1", "row 7"])
    fig = drawn[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "SDSS J000001.23-101010.1\np(merger) 0.996, label merger"
    assert titles[3] == "row 7\np(merger) 1 - 1.0e-05, unlabelled"
    _inside(fig)  # a survey id before the probability on one line lost its first characters at the edge
    assert titles[1] == titles[4] == "Grad-CAM (merger): 0 everywhere"
    assert len(fig.axes) == 6 + 1  # the integrated gradients' colour bar only
    assert "asinh stretch (Lupton, Q=4; each image from its sky, the median of its edge, to its 99.5th percentile of " \
        in fig.texts[0].get_text().replace("\n", " ")


def test_an_unlabelled_targets_panel_is_titled_for_what_it_shows(drawn, tmp_path):
    records = [{"kind": "epoch", "epoch": 0, "loss": {"total": 1.0},
                "source": {"train": {"accuracy": 0.5}, "val": {"accuracy": 0.6}},
                "target": {"train": {"labelled": False, "merger_fraction": 0.3},
                           "val": {"labelled": False, "merger_fraction": 0.4}}}]
    plots.training_curves(records, tmp_path / "curves.png", "t")
    assert drawn[0].axes[1].get_title() == "accuracy / predicted merger fraction (unlabelled)"


@pytest.mark.parametrize("extra", [1, -1])
def test_a_latent_embedding_of_features_and_labels_of_different_lengths_is_refused(tmp_path, extra):
    """More labels than features drew the points after the extra label in the colour of another
    image's label, silently (a rank's part of a split that claimed the next rank's first row gave
    exactly that)."""
    rng = np.random.default_rng(0)
    features = {"source": (rng.normal(size=(20, 4)), np.arange(20 + extra) % 2),
                "target": (rng.normal(size=(20, 4)), np.arange(20) % 2)}
    with pytest.raises(ValueError, match=f"source: 20 feature rows but {20 + extra} labels"):
        plots.latent_embedding(features, tmp_path / "latent.png", "t", method="pca")
    assert not (tmp_path / "latent.png").exists()


def test_the_roc_curve_is_of_the_merger_score_and_counts_each_class(drawn, tmp_path):
    """The legend's AUC and counts were only checked for their words: a curve of p(non-merger) (AUC
    1 - the true one) or the counts of the other class passed."""
    from dmhpc.train.metrics import merger_score

    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    merger = np.where(labels == 1, 0.9, 0.2)  # a perfect classifier
    plots.roc_curves({"source": (labels, merger_score(np.stack([1 - merger, merger], axis=1)))}, tmp_path / "roc.png",
                     "t")
    ax = drawn[0].axes[0]
    assert drawn[0].legends[0].get_texts()[0].get_text() == "source (AUC 1.000; 3 mergers, 7 non-mergers)"
    # Below the axes: inside them, the legend's lines covered the curves' start at low false positive rates.
    drawn[0].canvas.draw()
    assert drawn[0].legends[0].get_window_extent().y1 <= ax.get_window_extent().y0
    curve = ax.lines[0]
    assert list(zip(curve.get_xdata(), curve.get_ydata()))[:3] == [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    # inside the frame, not under it: on limits of exactly [0, 1] the frame hid a perfect curve
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < 0 < 1 < x1 and y0 < 0 < 1 < y1


def test_loss_terms_are_drawn_on_a_log_axis_as_magnitudes(drawn, tmp_path):
    """The Fisher term (~1e5) beside a cross-entropy (~1) needs the log axis the label promises; a
    negative entropy term is drawn as its magnitude and said so (a log axis drops negative values).
    Accuracies are drawn on the whole range from 0 to 1, not zoomed in on 0.6-0.8."""
    records = [{"kind": "epoch", "epoch": e, "loss": {"fisher": 1e5, "entropy": -0.5 - e},
                "source": {"val": {"accuracy": 0.6 + 0.1 * e}}} for e in range(3)]
    plots.training_curves(records, tmp_path / "curves.png", "t")
    ax_loss, ax_acc = drawn[0].axes
    assert ax_loss.get_yscale() == "log" and ax_acc.get_ylim() == (0, 1)
    lines = {line.get_label(): line for line in ax_loss.lines}
    assert list(lines["entropy (|value|, ringed where negative)"].get_ydata()) == [0.5, 1.5, 2.5]
    assert list(lines["fisher"].get_ydata()) == [1e5] * 3


def test_a_loss_term_through_zero_is_ringed_where_negative_and_zeros_are_said(drawn, tmp_path):
    """A Fisher trace difference going negative was drawn as a V, its second arm read as the loss
    rising again; epochs at exactly 0 (and terms never finite) left the log axis without a word."""
    values = [4.0, 1.0, 0.0, -1.0, -4.0]
    records = [{"kind": "epoch", "epoch": e, "loss": {"fisher": v, "mmd": float("nan")}} for e, v in enumerate(values)]
    plots.training_curves(records, tmp_path / "curves.png", "t")
    ax_loss = drawn[0].axes[0]
    (line,) = [l for l in ax_loss.lines if l.get_label().startswith("fisher")]
    assert line.get_label() == "fisher (|value|, ringed where negative; 0 in 1 epoch(s), not drawn)"
    (rings,) = [l for l in ax_loss.lines if l.get_marker() == "o" and l.get_markerfacecolor() == "none"]
    assert list(rings.get_xdata()) == [3, 4] and list(rings.get_ydata()) == [1.0, 4.0]
    assert any(l.get_label() == "mmd (not finite in any epoch)" for l in ax_loss.lines)


def test_the_scaling_figure_has_a_log2_axis_of_devices_and_plots_efficiency(drawn, tmp_path):
    """Doubling GPUs is one step on the axis; the right panel is the efficiency, not the speedup."""
    rows = [dict(model="deepmerge2", mode="strong", gpus_per_node=4, gpus=g, images_per_s_per_gpu=100.0 / g ** 0.1,
                 efficiency=1.0 / g ** 0.1, speedup=g ** 0.9, status="finished") for g in (1, 2, 4, 8)]
    plots.scaling_curves(rows, tmp_path / "scaling.png", "GPU", "t")
    left, right = drawn[0].axes
    assert left.get_xscale() == right.get_xscale() == "log"
    assert left.xaxis.get_transform().base == 2
    (line,) = [l for l in right.lines if l.get_label().startswith("deepmerge2")]
    np.testing.assert_allclose(line.get_ydata(), [r["efficiency"] for r in rows])
    # Both from 0: the throughput's autoscaled axis (93 to 100 here) drew a 7 % loss as a collapse.
    assert right.get_ylim()[0] == 0 and left.get_ylim()[0] == 0


def test_a_scaling_series_looks_alike_in_both_panels_and_unlike_every_other(drawn, tmp_path):
    """Each panel took colours from its own cycle (the hollow point of the left one took a colour
    there only), and ten colours for the 18 series of configs/scaling/resnet.yaml drew pairs of
    series alike in colour, line style and marker."""
    from matplotlib.colors import to_hex

    cut_short = ("resnet18", "weak", 4, 1)
    rows = [dict(model=m, mode=mode, nodes=n, gpus_per_node=g, gpus=n * g, images_per_s_per_gpu=100.0,
                 efficiency=1.0, status="not finished" if (m, mode, n, g) == cut_short else "finished")
            for m in ("resnet18", "resnet34", "resnet50") for mode in ("weak", "strong") for n in (1, 2, 4)
            for g in (1, 2, 4)]
    plots.scaling_curves(rows, tmp_path / "scaling.png", "GPU", "t")
    fig = drawn[0]
    left, right = fig.axes

    def looks(ax):
        return {line.get_label(): (to_hex(line.get_color()), line.get_linestyle(), line.get_marker())
                for line in ax.lines if line.get_label().endswith("/node")}

    assert looks(left) == looks(right) and len(set(looks(right).values())) == 18
    colour, _, marker = looks(left)["resnet18 weak, 1/node"]
    (hollow,) = [line for line in left.lines if line.get_label().endswith(": not finished")]
    assert (to_hex(hollow.get_markeredgecolor()), hollow.get_marker(), hollow.get_markerfacecolor()) == (
        colour, marker, "white")
    # One key per property, each entry drawn as the lines are.
    keys = {legend.get_title().get_text(): {text.get_text(): handle for text, handle in
                                             zip(legend.get_texts(), legend.legend_handles)} for legend in fig.legends}
    assert {title: list(entries) for title, entries in keys.items()} == {
        "model (colour)": ["resnet18", "resnet34", "resnet50"], "scaling (line)": ["weak", "strong"],
        "GPUs per node (marker)": ["1 GPU", "2 GPUs", "4 GPUs", "hollow: not finished"]}
    for label, (colour, style, marker) in looks(left).items():
        model, mode, per_node = label.split()[0], label.split()[1].rstrip(","), label.split()[2].split("/")[0]
        assert to_hex(keys["model (colour)"][model].get_color()) == colour
        assert keys["scaling (line)"][mode].get_linestyle() == style
        assert keys["GPUs per node (marker)"][f"{per_node} GPU" + "s" * (per_node != "1")].get_marker() == marker


def test_the_latent_embedding_marks_domains_and_names_classes_by_colour(drawn, tmp_path):
    """Source circles, target crosses; red mergers, blue non-mergers: swapped names or one marker for
    both domains drew a misaligned latent space as an aligned one."""
    from matplotlib.colors import to_rgba
    from matplotlib.markers import MarkerStyle

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    plots.latent_embedding({d: (rng.normal(size=(20, 4)), labels) for d in ("source", "target")},
                           tmp_path / "latent.png", "t", method="pca")
    ax = drawn[0].axes[0]
    by_label = {c.get_label(): c for c in ax.collections}
    assert sorted(by_label) == ["source merger", "source non-merger", "target merger", "target non-merger"]
    for label, collection in by_label.items():
        domain, cls = label.split(" ", 1)
        colour = "tab:red" if cls == "merger" else "tab:blue"
        assert tuple(collection.get_facecolor()[0][:3]) == pytest.approx(to_rgba(colour)[:3])
        style = MarkerStyle("o" if domain == "source" else "x")
        marker = style.get_path().transformed(style.get_transform())
        assert np.allclose(collection.get_paths()[0].vertices, marker.vertices)


def test_each_latent_point_keeps_its_own_label_when_drawn_from_many(drawn, tmp_path):
    """Features drawn at random past max_points must keep their own labels: the first labels beside
    a random draw of features coloured a misaligned space as an aligned one."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    feats = rng.normal(size=(60, 4)) + 10.0 * labels[:, None] * np.array([1.0, 0, 0, 0])  # classes apart
    plots.latent_embedding({d: (feats, labels) for d in ("source", "target")}, tmp_path / "latent.png", "t",
                           method="pca", max_points=25)
    sides = {}
    for collection in drawn[0].axes[0].collections:
        x = collection.get_offsets()[:, 0]
        sides[collection.get_label()] = (x.min(), x.max())
    mergers = [v for k, v in sides.items() if k.endswith(" merger")]
    others = [v for k, v in sides.items() if k.endswith("non-merger")]
    assert len(mergers) == len(others) == 2
    # every merger on one side of every non-merger along the first component (its sign is arbitrary)
    assert all(m[0] > o[1] for m in mergers for o in others) or all(m[1] < o[0] for m in mergers for o in others)


def test_probabilities_that_round_to_one_are_written_as_one_minus():
    """p = 0.9997 was written "1.000": read as certainty it was not."""
    assert plots._probability(0.9997) == "1 - 3.0e-04"
    assert plots._probability(0.9994) == "0.999"


def test_an_attribution_grid_draws_its_galaxies_in_the_filters_asked_for(drawn, tmp_path):
    """A grid drawing the default filters whatever --rgb said passed: only rgb_composite and
    explain.json's record of the filters were tested."""
    rng = np.random.default_rng(1)
    images = rng.gamma(2.0, size=(2, 3, 8, 8)).astype(np.float32)
    plots.attribution_grid(images, np.ones((2, 8, 8)), np.ones((2, 8, 8)), [0.9, 0.1], [1, 0], "t",
                           tmp_path / "g.png", rgb=(1, 2, 0))
    fig = drawn[0]
    for row in range(2):
        for column in range(3):  # the galaxy under each panel
            np.testing.assert_array_equal(fig.axes[3 * row + column].images[0].get_array(),
                                          plots.rgb_composite(images[row], (1, 2, 0)))


def test_an_attribution_grid_draws_each_column_on_one_scale(drawn, tmp_path):
    """Rows compare: a row whose Grad-CAM peaks at 0.1 drawn on a scale of its own glowed like one that
    peaks at 1; integrated gradients keep their sign on a scale centred on 0."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    cams = np.stack([np.full((8, 8), 1.0), np.full((8, 8), 0.1)])
    igs = np.stack([np.full((8, 8), 0.5), np.full((8, 8), -2.0)])
    plots.attribution_grid(images, cams, igs, [0.9, 0.1], [1, 0], "t", tmp_path / "g.png")
    fig = drawn[0]
    cam_clims = [fig.axes[3 * row + 1].images[1].get_clim() for row in range(2)]
    ig_clims = [fig.axes[3 * row + 2].images[1].get_clim() for row in range(2)]
    assert cam_clims == [(0.0, 1.0)] * 2 and ig_clims == [(-2.0, 2.0)] * 2
    # opaque where the attribution is strongest, fading with it: a uniform alpha hid the galaxy
    alphas = [np.asarray(fig.axes[3 * row + 2].images[1].get_alpha()) for row in range(2)]
    np.testing.assert_allclose([a.max() for a in alphas], [np.sqrt(0.25) * 0.9, 0.9])
    # Grad-CAM likewise: a uniform 0.55 laid the colour map's black over the galaxy where the map was low.
    alphas = [np.asarray(fig.axes[3 * row + 1].images[1].get_alpha()) for row in range(2)]
    np.testing.assert_allclose([a.max() for a in alphas], [0.75, 0.075])


def _galaxy(amplitudes, sky=(0.0, 0.0, 0.0), noise=0.0, size=64, seed=0):
    """A round exponential galaxy of peak `amplitudes` per filter, centred, on `sky` per filter."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    profile = np.exp(-np.hypot(yy, xx) / 4.0)
    rng = np.random.default_rng(seed)
    return np.stack([a * profile + s + noise * rng.normal(size=profile.shape)
                     for a, s in zip(amplitudes, sky)]).astype(np.float32)


def test_the_rgb_composite_is_asinh_stretched_from_the_sky_in_the_filters_asked_for():
    """A linear stretch (the faint tidal features of a merger lost in the dark) or the filters in
    another order drew another galaxy than the title says. From the 1st percentile, with the
    brightest pixels 24 times below saturation, a noisy target's sky was a quarter grey and no core
    reached white."""
    image = _galaxy((10.0, 10.0, 10.0), sky=(100.0, 50.0, 7.0), noise=0.2)
    grey = plots.rgb_composite(image).astype(int)
    centre, corner = grey[32, 32], grey[:8, :8]
    assert centre.min() >= 250  # the core saturates
    assert np.median(corner) <= 30  # each filter's own sky is near black
    # Asinh: at 3% of the peak (radius 14 pixels) far brighter than a linear 3%.
    assert grey[32, 32 + 14].mean() > 2 * 255 * 0.03
    # Saturated from the 99.5th percentile of intensity on (astropy's mapping saturates at
    # 10 asinh(0.1 Q), not at Q: 0.9 of it did).
    clean = _galaxy((10.0, 10.0, 10.0))
    intensity, drawn = clean.mean(axis=0), plots.rgb_composite(clean)
    top = np.percentile(intensity, 99.5)
    assert drawn[intensity >= top].min() == 255 and drawn[(intensity < 0.95 * top)].max() < 255
    coloured = _galaxy((1.0, 2.0, 3.0), sky=(5.0, 5.0, 5.0))
    red, green, blue = plots.rgb_composite(coloured)[32, 40]  # default: filter 2 red, 1 green, 0 blue
    assert red > green > blue
    red, green, blue = plots.rgb_composite(coloured, (0, 2, 1))[32, 40]  # filter 0 red, 2 green, 1 blue
    assert green > blue > red
    # The stretch from the filters drawn: a fourth filter 1000 times brighter, not drawn, set it and
    # drew the galaxy black.
    four = np.concatenate([image, 1000 * image[:1]])
    assert (plots.rgb_composite(four) == grey).all()
    # A NaN pixel is drawn as sky (np.percentile made every pixel NaN, and astropy raised).
    holed = image.copy()
    holed[:, 3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = plots.rgb_composite(holed)
    assert drawn[3, 3].max() <= 30 and drawn[32, 32].min() >= 250


COLLAPSED = """
import sys
from pathlib import Path
import warnings

import numpy as np
from dmhpc import plots
features = np.zeros((40, 64), np.float32)  # every image's features alike: a network of dead ReLUs
plots.latent_embedding({"source": (features, np.arange(40) % 2), "target": (features, np.arange(40) % 2)},
                       Path(sys.argv[1]), "t")
"""


def test_a_latent_embedding_of_collapsed_features_is_drawn_not_a_crash(tmp_path, drawn):
    """t-SNE of features that are all alike crashed the process with a segmentation fault (its PCA
    start divides by their spread): the trainer's final test of such a network wrote nothing.
    In a process of its own, which that crash would end."""
    import subprocess
    import sys

    from tests.conftest import ROOT, clean_env

    proc = subprocess.run([sys.executable, "-c", COLLAPSED, str(tmp_path / "latent.png")], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "latent.png").stat().st_size > 0, (proc.returncode, proc.stderr[-2000:])
    features = np.ones((10, 8))
    plots.latent_embedding({"source": (features, np.arange(10) % 2)}, tmp_path / "pca.png", "t", method="pca")
    assert "every image has the same features" in drawn[0].axes[0].get_title().replace("\n", " ")
