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
