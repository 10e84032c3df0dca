"""PNG figures of a run: ROC curves, confusion matrices, training curves, latent-space embedding."""

from __future__ import annotations

import itertools
import math
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dmhpc.files import atomic_write, temporary_of

DOMAIN_COLOURS = {"source": "tab:blue", "target": "tab:orange"}
CLASS_NAMES = {0: "non-merger", 1: "merger"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: clusters have no display
    import matplotlib.pyplot as plt

    return plt


def wrap_title(text: str, width: int) -> str:
    """A title in lines of at most `width` characters: run, data and checkpoint names are long, and a
    one-line title runs off the figure. At 10 points about 11 characters fit in an inch."""
    return "\n".join(textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False)
                     for line in text.splitlines() or [""])


def roc_curves(predictions: dict, path: Path, title: str) -> Path:
    """ROC curve of each domain; `predictions[domain] = (labels, score)`, the score ranking mergers
    first (dmhpc.train.metrics.merger_score)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5.6), layout="constrained")
    for domain, (labels, score) in predictions.items():
        if len(np.unique(labels)) < 2:  # said in the legend: a domain that vanished looked like a bug
            why = "unlabelled" if (np.asarray(labels) < 0).all() else "one class only"
            ax.plot([], [], " ", label=f"{domain}: no ROC ({why})")
            continue
        fpr, tpr, _ = roc_curve(labels, score)
        auc = roc_auc_score(labels, score)
        # the counts: an AUC of 0.6 over 40 images is noise, over 40,000 it is not
        mergers = int(np.sum(np.asarray(labels) == 1))
        ax.plot(fpr, tpr, color=DOMAIN_COLOURS.get(domain),
                label=f"{domain} (AUC {auc:.3f}; {mergers} mergers, {len(labels) - mergers} non-mergers)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    # A hair past [0, 1], as scikit-learn's RocCurveDisplay does: a perfect classifier's curve runs
    # along the axes' edges, and on limits of exactly [0, 1] the frame drew over it.
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.set_title(wrap_title(title, 48), fontsize=10)
    # Below the axes: inside, its lines (counts included) spanned the width and hid the curves' start
    # at low false positive rates, where rare mergers are found.
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    return _save(fig, path)


def confusion_matrices(metrics: dict, path: Path, title: str) -> Path:
    """One confusion matrix per domain; `metrics[domain]["confusion"]` as [[TN, FP], [FN, TP]].
    Domains without labels (no "confusion") are left out."""
    metrics = {d: m for d, m in metrics.items() if "confusion" in m}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4), squeeze=False)
    # One scale from 0 for every panel: a colour means one count in both domains, and the text colour
    # follows the cell's (on a scale from each panel's smallest count, its white counts fell on
    # white cells).
    top = max([int(np.max(m["confusion"])) for m in metrics.values()] + [1])
    for ax, (domain, m) in zip(axes[0], metrics.items()):
        cm = np.asarray(m["confusion"])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=top)
        for (i, j), v in np.ndenumerate(cm):
            # white on the dark cells: black counts vanished there, in print most of all
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-merger", "merger"],
               yticklabels=["non-merger", "merger"], xlabel="predicted", ylabel="true",
               title=f"{domain}: accuracy {m['accuracy']:.3f}")
    fig.suptitle(wrap_title(title, int(11 * fig.get_figwidth())), fontsize=10)
    return _save(fig, path)


def training_curves(records: list[dict], path: Path, title: str = "",
                    labels: Mapping[str, str] | None = None) -> Path:
    """Loss terms (log scale: the unweighted Fisher term is around 1e5, the others around 1) and
    accuracy per epoch, from metrics.jsonl records; an unlabelled domain shows its predicted
    merger fraction instead of an accuracy. A dotted line marks the epoch of the best checkpoint
    (the first epoch of the highest selection score, as the trainer keeps it). `labels`: each loss
    term's legend entry (its weight in the total: the records hold the terms unweighted)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 5.2), layout="constrained")
    any_unlabelled = False
    x = [r["epoch"] for r in epochs]
    if epochs:
        for term in epochs[-1].get("loss", {}):
            values = np.array([r.get("loss", {}).get(term, np.nan) for r in epochs], dtype=float)
            # |value|: entropy and a trace difference can go negative; the log axis shows magnitudes,
            # and rings the epochs where the value is negative (a sign change drawn as a V read as
            # the loss rising again). What a log axis cannot draw is said in the legend.
            name = (labels or {}).get(term, term)
            negative, zero = values < 0, values == 0
            notes = ["|value|, ringed where negative"] if negative.any() else []
            if zero.any():
                notes.append(f"0 in {int(zero.sum())} epoch(s), not drawn")
            if not np.isfinite(values).any():
                notes.append("not finite in any epoch")
            line, = ax_loss.plot(x, np.where(zero, np.nan, np.abs(values)), marker=".",
                                 label=name + (f" ({'; '.join(notes)})" if notes else ""))
            if negative.any():
                ax_loss.plot(np.asarray(x)[negative], np.abs(values[negative]), linestyle="none", marker="o",
                             markerfacecolor="none", color=line.get_color())
        for domain in ("source", "target"):
            for split, style in (("train", "--"), ("val", "-")):
                metrics = [r.get(domain, {}).get(split, {}) for r in epochs]
                unlabelled = any(m.get("labelled") is False for m in metrics)
                any_unlabelled |= unlabelled
                key = "merger_fraction" if unlabelled else "accuracy"
                ys = np.array([m.get(key, np.nan) for m in metrics], dtype=float)
                # Epochs not evaluated (train.eval_every > 1) are left out, not gaps: a line broken at
                # every NaN drew the validation curve as loose markers.
                kept = np.isfinite(ys) if split == "val" else np.ones(len(ys), bool)
                if not np.isfinite(ys).any():  # none recorded (a run without adaptation: target train)
                    continue
                ax_acc.plot(np.asarray(x)[kept], ys[kept], style, marker="o" if domain == "source" else "x", color=DOMAIN_COLOURS[domain],
                            label=f"{domain} {split}" + (" (predicted merger fraction)" if unlabelled else ""))
    ax_loss.set(xlabel="epoch", ylabel="loss term, unweighted (epoch mean)", title="loss terms", yscale="log")
    what = "accuracy" + (" / predicted merger fraction (unlabelled)" if any_unlabelled else "")
    ax_acc.set(xlabel="epoch", ylabel=what, title=what, ylim=(0, 1))
    # Epochs not evaluated (train.eval_every > 1) have no selection; a NaN score is never selected.
    scored = [(r["selection"]["score"], -r["epoch"], r["selection"].get("criterion", "selection")) for r in epochs
              if isinstance(r.get("selection", {}).get("score"), (int, float)) and np.isfinite(r["selection"]["score"])]
    if scored:
        _, best, criterion = max(scored, key=lambda s: s[:2])
        for ax in (ax_loss, ax_acc):
            ax.axvline(-best, color="grey", linestyle=":", linewidth=1, label=f"best checkpoint ({criterion})")
    for ax in (ax_loss, ax_acc):
        if 0 < len(x) <= 12:  # a few epochs: one tick each (a locator puts fractions around a lone epoch)
            ax.set_xticks(x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:  # below the plot: inside, it covered the curves wherever it was put
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if title:
        fig.suptitle(wrap_title(title, 115), fontsize=10)
    return _save(fig, path)


LATENT_POINTS = 1000  # per domain: t-SNE's cost grows with them, and a figure shows no more


def latent_embedding(features: dict, path: Path, title: str, method: str = "tsne", seed: int = 0,
                     max_points: int = LATENT_POINTS) -> Path:
    """2-D embedding of the DA features, source against target, coloured by class.

    `features[domain] = (feats, labels)`. Source is drawn with circles, target with crosses;
    overlapping clouds of the same colour mean the domains are aligned class by class. `method`:
    "tsne" (t-SNE after a 50-component PCA), or "pca" (the first two components: fast, for tests).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    chunks, labels, domains = [], [], []
    for domain, (f, y) in features.items():
        if len(f) != len(y):  # a point coloured by another image's label would be drawn without a sign
            raise ValueError(f"latent_embedding: {domain}: {len(f)} feature rows but {len(y)} labels")
        keep = rng.permutation(len(f))[:max_points]
        chunks.append(np.asarray(f, dtype=np.float32)[keep])
        labels.append(np.asarray(y)[keep])
        domains += [domain] * len(keep)
    if method not in ("tsne", "pca"):
        raise ValueError(f"latent_embedding: method {method!r}, expected tsne or pca")
    x = np.concatenate(chunks)
    y = np.concatenate(labels)
    domains = np.asarray(domains)
    # A network whose features collapsed (every image alike: dead ReLUs) is drawn as the one point it
    # maps all images to: t-SNE's PCA start divides by their spread, 0, and sklearn then crashed the
    # process (a segmentation fault in the trainer's final test).
    collapsed = not np.ptp(x, axis=0).any()
    if collapsed:
        emb = np.zeros((len(x), 2))
    else:  # PCA first: cheap denoising, and t-SNE on 2592-d features would be slow.
        x = PCA(n_components=min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
        emb = x[:, :2] if method == "pca" else TSNE(
            n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7.6, 6))
    for domain, marker in (("source", "o"), ("target", "x")):
        for cls, colour, name in ((0, "tab:blue", "non-merger"), (1, "tab:red", "merger"), (-1, "tab:grey", "unlabelled")):
            sel = (domains == domain) & (y == cls)
            if not sel.any():
                continue
            ax.scatter(emb[sel, 0], emb[sel, 1], s=12, marker=marker, c=colour, alpha=0.5,
                       label=f"{domain} {name}")
    ax.set(xticks=[], yticks=[])
    drawn = ", ".join(f"{(domains == d).sum()} {d}" for d in ("source", "target") if (domains == d).any())
    alike = "; every image has the same features" if collapsed else ""
    ax.set_title(wrap_title(f"{title} ({method}; {drawn} images, at most {max_points} per domain{alike})", 58),
                 fontsize=10)
    # Beside the points, not on them ("best" placed it over the data).
    ax.legend(fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


# Marker of each GPUs-per-node value, in order; more values than these would repeat them.
PER_NODE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def scaling_curves(rows: list[dict], path: Path, unit: str, title: str = "") -> Path:
    """Throughput per GPU and efficiency over the number of GPUs: one line per model, mode and
    GPUs per node, so that more nodes extend each line. A line is drawn alike in both panels: its
    colour is the model's, its style the mode's and its marker the GPUs per node's, each keyed in a
    legend of its own. Points not finished are drawn hollow: their throughput is of a run cut
    short, and they have no efficiency."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
    units = f"{unit}s" if unit == "GPU" else "CPU processes"
    # Set, not taken from each panel's colour cycle: the panels drew one series in two colours, and
    # ten colours for the 18 lines of configs/scaling/resnet.yaml drew pairs of lines alike.
    models = sorted({r["model"] for r in rows})
    colours = {model: f"C{i}" for i, model in enumerate(models)}
    styles = {"weak": "-", "strong": "--"}
    per_node = sorted({r["gpus_per_node"] for r in rows})
    markers = dict(zip(per_node, itertools.cycle(PER_NODE_MARKERS)))
    any_unfinished = False
    for key in sorted({(r["model"], r["mode"], r["gpus_per_node"]) for r in rows}):
        group = sorted((r for r in rows if (r["model"], r["mode"], r["gpus_per_node"]) == key),
                       key=lambda r: r["gpus"])
        gpus = [r["gpus"] for r in group]
        look = dict(color=colours[key[0]], linestyle=styles[key[1]], marker=markers[key[2]])
        label = f"{key[0]} {key[1]}, {key[2]}/node"
        left.plot(gpus, [r["images_per_s_per_gpu"] for r in group], label=label, **look)
        right.plot(gpus, [r["efficiency"] for r in group], label=label, **look)
        # Cut short, with a throughput so far; a point whose log is unreadable has none (the table says why).
        unfinished = [r for r in group if r.get("status") != "finished" and np.isfinite(r["images_per_s_per_gpu"])]
        if unfinished:
            any_unfinished = True
            left.plot([r["gpus"] for r in unfinished], [r["images_per_s_per_gpu"] for r in unfinished],
                      marker=markers[key[2]], markerfacecolor="white", markeredgecolor=colours[key[0]],
                      linestyle="none", label=f"{label}: not finished")
    right.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    # From 0, as the efficiency is: autoscaled, a 2.5 % loss filled the panel's height.
    left.set(xlabel=units, ylabel=f"images/s per {unit}", title=f"throughput per {unit}", ylim=(0, None))
    right.set(xlabel=units, ylabel="efficiency", title="scaling efficiency", ylim=(0, None))
    ticks = sorted({r["gpus"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    # One key per property, below both panels (inside, a legend covered the points at efficiency 1):
    # a legend of every line was 18 entries that told apart no better than the lines did.
    per_node_keys = [Line2D([], [], color="grey", marker=markers[g], linestyle="none",
                            label=f"{g} {unit if g == 1 else units}") for g in per_node]
    if any_unfinished:
        per_node_keys.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="none",
                                    label="hollow: not finished"))
    keys = (("model (colour)", [Line2D([], [], color=colours[m], label=m) for m in models]),
            ("scaling (line)", [Line2D([], [], color="grey", linestyle=styles[m], label=m)
                                for m in styles if any(r["mode"] == m for r in rows)]),
            (f"{units} per node (marker)", per_node_keys))
    for (what, handles), where in zip(keys, ("lower left", "lower center", "lower right")):
        fig.legend(handles=handles, title=what, loc=f"outside {where}", fontsize=8, title_fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(wrap_title(title, 110), fontsize=10)
    return _save(fig, path)


ASINH_Q = 4  # Lupton's softening: faint tails and a saturated core in one image (8 made noise glare)
RGB_TOP_PERCENTILE = 99.5  # of the sky-subtracted filters drawn: where an image saturates


def rgb_composite(image: np.ndarray, rgb: tuple[int, int, int] = (2, 1, 0)) -> np.ndarray:
    """(H, W, 3) asinh-stretched colour image of a (C, H, W) galaxy: filters `rgb` (channel indices)
    as red, green and blue; an image of fewer than 3 filters, its first filter in grey (`rgb`
    unused: two filters made a colour image of whichever indices fit, and no other).

    Each filter from its own sky, the median of the darkest side of the cutout's edge (a galaxy
    fills its middle; the 1st percentile put the sky of a noisy image at a quarter grey; a galaxy
    that fills the whole cutout leaves no sky to read, and its outskirts are cut), to the 99.5th
    percentile of the intensity (the filters' mean, Lupton's), which saturates (24 times it did:
    cores never reached white). One scale for the filters drawn keeps the colours; NaN pixels are
    drawn as sky."""
    from astropy.visualization import make_lupton_rgb

    channels = [np.asarray(image[k], dtype=np.float64) for k in rgb] if len(image) >= 3 else \
        [np.asarray(image[0], dtype=np.float64)] * 3
    band = max(1, min(channels[0].shape) // 16)

    def sky(c: np.ndarray) -> float:  # (a side all NaN: no sky there; none anywhere, 0)
        sides = [c[:band], c[-band:], c[:, :band], c[:, -band:]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nan_to_num(np.nanmin([np.nanmedian(side) for side in sides])))

    shifted = [np.nan_to_num(c - sky(c), nan=0.0, posinf=0.0, neginf=0.0) for c in channels]
    # The stretch from the filters drawn: a fourth one not drawn (brighter, say) set it before.
    top = max(float(np.percentile(np.mean(shifted, axis=0), RGB_TOP_PERCENTILE)), 1e-12)
    # astropy maps intensity I to asinh(Q I / stretch) * 0.1 * 255 / asinh(0.1 Q): 255 at this stretch.
    stretch = top * ASINH_Q / math.sinh(10 * math.asinh(0.1 * ASINH_Q))
    # A blank cutout (a footprint's edge, filled) is 0/0 in astropy's colour ratio, which it sets to
    # 0 itself: black, with a RuntimeWarning on the user's terminal for each such galaxy.
    with np.errstate(invalid="ignore", divide="ignore"):
        return make_lupton_rgb(*shifted, minimum=0.0, stretch=stretch, Q=ASINH_Q)


def _probability(p: float) -> str:
    """p(merger) to read: three decimals, and 1 - p in scientific notation where those round to 1."""
    return f"1 - {1 - p:.1e}" if p > 0.9995 else f"{p:.3f}"


def attribution_grid(images, cams, igs, probs, labels, title: str, path: Path,
                     rgb: tuple[int, int, int] = (2, 1, 0), names=None) -> Path:
    """One row per galaxy: its RGB composite, Grad-CAM over it, integrated gradients over it; its
    name (`names`: a catalog id or a data set's row, to find it again), merger probability and label
    (if any) in the first panel's title.

    One colour scale per column, shown by a colour bar: rows of a grid compare (a near-zero merger
    map on a non-merger no longer glows like a strong one). A Grad-CAM that is zero everywhere (no
    evidence for "merger" in the last block) says so instead of drawing an empty map under a colour
    bar of 1e-12. Integrated gradients keep their sign (summed over the filters), on a diverging
    scale centred on 0: red for merger, blue against."""
    plt = _pyplot()
    n = len(images)
    names = [None] * n if names is None else names
    # Constrained layout: it makes room for the colour bars, which tight_layout cannot.
    fig, axes = plt.subplots(n, 3, figsize=(8.2, 2.6 * n), squeeze=False, layout="constrained")
    cam_max = float(np.max(cams))
    ig_max = max(float(np.max(np.abs(igs))), 1e-12)
    shown = {}
    for row, (image, cam, ig, p, y, name) in enumerate(zip(images, cams, igs, probs, labels, names)):
        composite = rgb_composite(image, rgb)
        truth = f", label {CLASS_NAMES.get(int(y), 'unknown')}" if y is not None and y >= 0 else ", unlabelled"
        cam_name = "Grad-CAM (merger)" if float(np.max(cam)) > 0 else "Grad-CAM (merger): 0 everywhere"
        # The name on a line of its own: a survey id before the probability ran off the figure's edge.
        said = f"p(merger) {_probability(p)}{truth}"
        panels = ((None, {}, said if name is None else f"{wrap_title(str(name), 30)}\n{said}"),
                  # opaque where the map is high, clear where it is 0: a uniform 0.55 laid inferno's black
                  # over the outskirts, and over the whole galaxy in a row whose map is 0 everywhere
                  (cam if cam_max > 0 else None,
                   dict(cmap="inferno", vmin=0.0, vmax=cam_max,
                        alpha=np.clip(cam / max(cam_max, 1e-30), 0.0, 1.0) * 0.75),
                   cam_name),
                  # opaque where the attribution is strong, clear where it is 0: a uniform 0.7 laid the
                  # diverging map's white over the whole image, and the galaxy under it faded
                  (ig, dict(cmap="RdBu_r", vmin=-ig_max, vmax=ig_max, alpha=np.sqrt(np.abs(ig) / ig_max) * 0.9),
                   "IG (red: merger, blue: against)"))
        for column, (ax, (overlay, style, label)) in enumerate(zip(axes[row], panels)):
            ax.imshow(composite, origin="lower")
            if overlay is not None:
                shown[column] = ax.imshow(overlay, origin="lower", **style)
            ax.set_title(label, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    what = {1: "Grad-CAM: ReLU of gradient-weighted activations\nof the merger log-odds (last block)",
            2: "integrated gradients: attribution to the\nmerger log-odds per pixel (summed over filters)"}
    for column, image in shown.items():
        fig.colorbar(image, ax=list(axes[:, column]), shrink=0.6).set_label(what[column], fontsize=7)
    colours = (f"; RGB = filters {rgb[0]}, {rgb[1]}, {rgb[2]}" if len(images[0]) >= 3 else "; first filter in grey")
    stretch = (f"asinh stretch (Lupton, Q={ASINH_Q}; each image from its sky, the median of its edge, to its "
               f"{RGB_TOP_PERCENTILE:g}th percentile of intensity, one scale for its filters)")
    fig.suptitle(wrap_title(f"{title}{colours}, {stretch}", 90), fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:  # figures laid out their own way keep it
        fig.tight_layout()
    try:
        atomic_write(path, writer=lambda f: fig.savefig(f, dpi=110, format=_format(path)), durable=False)
    finally:
        _pyplot().close(fig)
    return Path(path)


def _format(path: Path) -> str:
    """The image format a file name asks for; a temporary file (`.NAME.XXXXXXXX.tmp`, see
    dmhpc.files) asks for NAME's: `dmhpc eval` draws every figure to one before it puts any in place."""
    name = Path(path).name
    name = temporary_of(name) or name
    return Path(name).suffix.lstrip(".") or "png"
