"""Figures for scientists: titles that name run, data and checkpoint stay inside the figure."""

from __future__ import annotations

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
    return figures


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
    plots.roc_curves({"source": (labels, prob), "target": (labels, prob)}, tmp_path / "roc.png", LONG)
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
    for fig, ticks, best in zip(drawn, ([0], [0, 1, 2, 3, 4]), (0, 1)):
        for ax in fig.axes:
            assert list(ax.get_xticks()) == ticks
            marks = [line for line in ax.lines if line.get_linestyle() == ":"]
            assert [list(m.get_xdata()) for m in marks] == [[best, best]]
            assert "best checkpoint (source_val_accuracy)" in [t.get_text() for t in ax.get_legend().get_texts()]
            # The legend lies below the plot, inside the figure: within the axes it covered the curves.
            legend, area = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert legend.y1 < area.y0 and legend.y0 >= fig.bbox.y0 - 1, (legend, area)
