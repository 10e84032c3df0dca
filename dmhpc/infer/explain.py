"""`dmhpc explain`: what the network looks at, as pictures an astronomer reads.

    dmhpc explain --run RUN [--checkpoint best] [--data DIR [--normalize target|own] | --catalog CATALOG] [--n N]
                  --out DIR [--overwrite]

Two attributions from captum, both of the merger log-odds, logit(merger) - logit(non-merger), the
one number p(merger) depends on (what makes an image look like a merger to the network, whatever
its label):

- Grad-CAM on the last convolutional block (`LayerGradCam`, ReLU of the gradient-weighted
  activations), each cell drawn where its evidence lies in the image (`cell_centres`) and
  interpolated linearly between cells: coarse by construction, the block's own
  resolution (9x9 for DeepMerge and DeepMerge II, 3x3 for ResNets with the original stem on
  75x75 images, 10x10 with the small stem). It says which region of the image the decision
  depends on, not which pixels.
- Integrated gradients (`IntegratedGradients`, 32 steps, doubled up to 256 until each image's sum is
  within 5% of its log-odds' change from the baseline; explain.json records each grid's steps and
  largest error, and a grid beyond 5% at 256 is said) per pixel and filter, from a baseline of
  zeros after per-channel normalization: a flat image at each filter's mean pixel value in the
  statistics the images are normalized with (for small galaxies on sky, a faint uniform
  background, not an average galaxy).
  Shown summed over the filters with its sign, on a scale centred on 0: red pixels push towards
  "merger", blue ones away from it.

Sampled images (by default the run's own source and target test splits; `--data DIR` a prepared
data set; `--catalog CATALOG` the top merger candidates of a `dmhpc predict` catalog, read back
from its source) are drawn as RGB composites of three filters with an asinh stretch (Lupton et
al. 2004, `astropy.visualization.make_lupton_rgb`; `--rgb R,G,B` names the filters, by channel,
drawn red, green and blue: by default filters 2, 1, 0 (of three, the last red and the first
blue), which is wavelength order only where the channels are; the embedded set and the DeepMerge
files hold F814W, F356W, F160W: `--rgb 1,2,0`), each attribution beside them on one colour scale
per grid column, the merger probability and the true label (if any) above each row's image. One
PNG grid per domain and class (true class where there are labels, predicted class otherwise).

Normalization, as the network saw the images: the run's source and target each with the statistics
the run normalized it with; a catalog's candidates with those predict recorded; `--data` with the
run's target statistics (`--normalize target`, as predict's default) or its own training split's
(`--normalize own`: a labelled set as `dmhpc eval` sees a data set given as a domain under
per-domain normalization). explain.json records each grid's statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from dmhpc.checks import show
from dmhpc.data.batches import Normalizer
from dmhpc.data.inputs import CATALOG_FORMATS
from dmhpc.data.shards import RowReader, fingerprint, is_labelled, load_manifest, split_rows
from dmhpc.distributed import bootstrap, shutdown
from dmhpc.errors import DmhpcError, reason_of
from dmhpc.files import atomic_write, inside, locked_directory, remove_orphans
from dmhpc.infer.predict import CSV_SHA, HDF5_TABLE, Model, batch_columns, provenance_file
from dmhpc.infer.sources import open_source
from dmhpc.names import MERGER, MERGER_THRESHOLD
from dmhpc.plots import CLASS_NAMES, attribution_grid
from dmhpc.run import RunDir, check_shape


def _captum():
    try:
        from captum.attr import IntegratedGradients, LayerGradCam
    except ImportError:
        raise DmhpcError("dmhpc explain needs captum: pip install dmhpc[explain]") from None
    return IntegratedGradients, LayerGradCam


# Images per captum call: the memory of the attributions is bounded whatever --n (a catalog's top
# thousands in one batch ran out of GPU memory, a traceback); each image's are its own (eval mode).
ATTRIBUTION_BATCH = 32
# The filters drawn red, green and blue by default: of three, the last red and the first blue.
DEFAULT_RGB = (2, 1, 0)
# Images per grid, one row each: a taller figure is beyond matplotlib's image size (2**16 pixels).
MAX_N = 100


# Integrated gradients: steps of the path integral, doubled from IG_STEPS up to IG_MAX_STEPS until
# every image's attributions sum to its log-odds' change from the baseline within IG_TOLERANCE of it
# (of 0.01 where it changed less: p then moves by 0.25% at most). At a fixed 32 steps a third of the
# summed attributions of a ResNet18 was integration error, and nothing said so.
IG_STEPS, IG_MAX_STEPS, IG_TOLERANCE = 32, 256, 0.05


def attributions(model: Model, x: torch.Tensor, ig_steps: int = IG_STEPS,
                 tolerance: float = IG_TOLERANCE) -> tuple[np.ndarray, np.ndarray, dict]:
    """(Grad-CAM drawn over the image (n, H, W) by `cell_centres`, integrated gradients summed over the
    filters, with their sign (n, H, W), and what the integration took: {"steps": the most any batch
    needed, "completeness_error": the largest error of an image's sum, relative as IG_TOLERANCE says})
    of the merger log-odds of a normalized batch `x`, ATTRIBUTION_BATCH at a time.

    The log-odds, logit(merger) - logit(non-merger), is what p(merger) is a function of: the merger
    logit alone, attributed before, drew red a pixel that raised both logits alike and changed nothing
    (11 of 16 test images of a tiny run had attributions of the wrong total sign). The integrated
    gradients of an image sum to the change of its log-odds from the baseline, within the error said."""
    IntegratedGradients, LayerGradCam = _captum()
    net = model.net
    centres = cell_centres(net, x[:1])

    def log_odds(inputs):
        logits = net(inputs)[1]
        return logits[:, MERGER] - logits[:, 1 - MERGER]

    cams, igs, most_steps, worst = [], [], 0, 0.0
    for start in range(0, len(x), ATTRIBUTION_BATCH):
        part = x[start:start + ATTRIBUTION_BATCH].detach().requires_grad_(True)
        cam = LayerGradCam(log_odds, net.last_conv_block()).attribute(part, relu_attributions=True)
        cam = place_cells(cam[:, 0].detach(), centres, part.shape[-2:])
        baseline = torch.zeros_like(part)
        with torch.no_grad():
            scale = (log_odds(part) - log_odds(baseline)).abs().clamp_min(0.01)
        steps = ig_steps
        while True:
            ig, delta = IntegratedGradients(log_odds).attribute(part, baselines=baseline, n_steps=steps,
                                                                internal_batch_size=len(part),
                                                                return_convergence_delta=True)
            error = float((delta.detach().abs() / scale).max())
            if error <= tolerance or steps >= IG_MAX_STEPS:
                break
            steps = min(2 * steps, IG_MAX_STEPS)
        most_steps, worst = max(most_steps, steps), max(worst, error)
        cams.append(cam.cpu().numpy())
        igs.append(ig.sum(1).detach().cpu().numpy())
    return np.concatenate(cams), np.concatenate(igs), {"steps": most_steps, "completeness_error": worst}


def _say_completeness(grid: Path, ig: dict) -> None:
    if ig["completeness_error"] > IG_TOLERANCE:
        print(f"dmhpc explain: note: {grid.name}: the integrated gradients of an image sum to its log-odds' "
              f"change within {ig['completeness_error']:.0%} only, at {ig['steps']} steps (explain.json)",
              flush=True)


def cell_centres(net, x: torch.Tensor, probes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Where in the image each row and each column of the last convolutional block's map looks, in
    pixels: the centroid of the gradient's magnitude of the row's (column's) activations with respect
    to the input, over `probes` random images of `x`'s shape. Resized evenly over 75 pixels
    (bilinear), DeepMerge's 9x9 map was drawn up to 4 pixels off: its cells step by 8 pixels from
    pixel 0, and the outer ones' evidence lies inside the image (the last cell's at pixel 66, it was
    drawn at 70.3). A ResNet's cells see past the image, and look nearer its middle: the original
    stem's 3x3 at 30, 35 and 42 pixels, drawn at 12, 37 and 62."""
    fmaps = []
    hook = net.last_conv_block().register_forward_hook(lambda module, inputs, output: fmaps.append(output))
    try:
        probe = torch.randn((probes, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
        probe = probe.to(x.device).requires_grad_(True)
        with torch.enable_grad():
            net(probe)
            fmap = fmaps[0]
            centres = []
            for axis in (2, 3):  # the map's rows, then its columns
                image_axis = 0 if axis == 2 else 1
                where = torch.arange(probe.shape[axis], dtype=torch.float64, device=x.device)
                found = []
                for cell in range(fmap.shape[axis]):
                    grad = torch.autograd.grad(fmap.select(axis, cell).sum(), probe, retain_graph=True)[0]
                    weight = grad.abs().sum((0, 1)).sum(1 - image_axis).double()
                    found.append(float((weight * where).sum() / weight.sum()) if weight.sum() > 0 else np.nan)
                centres.append(np.asarray(found))
    finally:
        hook.remove()
    for i, (found, size) in enumerate(zip(centres, x.shape[-2:])):
        if not (np.isfinite(found).all() and (np.diff(found) > 0).all()):
            # A map some of whose cells see nothing of random images (or not in order): spread evenly.
            centres[i] = (np.arange(len(found)) + 0.5) * size / len(found) - 0.5
    return centres[0], centres[1]


def place_cells(cells: torch.Tensor, centres: tuple[np.ndarray, np.ndarray], shape) -> torch.Tensor:
    """A map of cells (n, h, w) drawn over images of `shape` (H, W): each cell's value at its centres
    (`cell_centres`), linearly interpolated between them and held flat beyond the outer ones."""
    rows, cols = (torch.from_numpy(np.stack([np.interp(np.arange(size), at, np.eye(len(at))[k])
                                             for k in range(len(at))], 1)).to(cells)
                  for at, size in zip(centres, shape))
    return torch.einsum("Yh,nhw,Xw->nYX", rows, cells, cols)


def _samples(reader_images, labels, probs, n: int, seed: int) -> dict[int, np.ndarray]:
    """Up to n row positions per class: true class when labelled, predicted class otherwise."""
    rng = np.random.default_rng(seed)
    classes = labels if labels is not None and (labels >= 0).all() else (probs >= MERGER_THRESHOLD).astype(int)
    return {c: np.sort(rng.permutation(np.flatnonzero(classes == c))[:n]) for c in (0, 1)}


def _explain_domain(model: Model, norm: Normalizer, drawn: dict, name: str, run: RunDir, out: Path, n: int,
                    seed: int, data_label: str, rgb: tuple) -> dict[Path, list]:
    """The grids of one data set's drawn images (`_test_split`), per class; {grid: (its rows' names,
    what its integrated gradients took)}."""
    images, labels = drawn["images"], drawn["labels"]
    x = norm(torch.from_numpy(images).to(model.device))
    probs = model.probabilities(x)[:, MERGER].cpu().numpy()
    written = {}
    kind = "true" if labels is not None and (labels >= 0).all() else "predicted"
    for cls, rows in _samples(images, labels, probs, n, seed).items():
        if not len(rows):
            print(f"dmhpc explain: {name}: no {kind} {CLASS_NAMES[cls]}s among the {len(images)} images drawn; "
                  f"no grid for them", flush=True)
            continue
        cams, igs, ig = attributions(model, x[rows])
        title = (f"{run.label}, {_checkpoint_label(model)}: {name} ({data_label}, {drawn['split']}), {kind} "
                 f"{CLASS_NAMES[cls]}s; attributions of the merger log-odds ({grad_cam_resolution(model.net, x)})")
        names = [drawn["names"][r] for r in rows]
        path = attribution_grid(images[rows], cams, igs, probs[rows],
                                labels[rows] if labels is not None else [None] * len(rows), title,
                                out / f"{name}_{CLASS_NAMES[cls]}.png", rgb, names=names)
        _say_completeness(path, ig)
        written[path] = (names, ig)
    return written


def _own_statistics(data: Path) -> tuple[list, list]:
    """A prepared data set's own training statistics, as `predict --normalize own` takes them (a
    constant filter refused)."""
    source = open_source(data=data)
    try:
        return source.own_stats()
    finally:
        source.close()


def grad_cam_resolution(net, x: torch.Tensor) -> str:
    """The resolution of the last convolutional block on images like `x`, which Grad-CAM is at, for
    the figures' titles: a 1x1 map (a ResNet's original stem on cutouts of 32 pixels or less) is
    drawn upsampled as flat as it is, and says nothing of where the evidence lies."""
    shapes = []
    hook = net.last_conv_block().register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        hook.remove()
    h, w = shapes[0][-2:]
    return f"Grad-CAM at {h}x{w}" + (": one cell, no spatial information" if h * w == 1 else "")


def _checkpoint_label(model: Model) -> str:
    epoch = model.checkpoint.get("epoch")
    return f"{model.checkpoint['name']} checkpoint" + (f" (epoch {epoch})" if isinstance(epoch, int) else "")


def _test_split(directory: Path, limit: int, seed: int) -> dict:
    """Up to `limit` images of the data set's test split (of all its rows where it has none), drawn
    by `seed`: their images, labels (None unlabelled), names (the catalog id where the data set keeps
    ids, else "index N", N the image's position in the input prepare read, predict's `index`; not its
    stored row) and which split they are of."""
    manifest = load_manifest(directory)
    start, stop = split_rows(manifest, "test")
    split = "test split"
    if stop == start:
        start, stop, split = 0, manifest["count"], "all rows: no test split"
    rows = np.sort(np.random.default_rng(seed).permutation(np.arange(start, stop))[:limit])
    with RowReader(directory, manifest) as reader:
        parts = [reader.read(int(r), int(r) + 1) for r in rows]
        ids = [(reader.read_ids(int(r), int(r) + 1) or [None])[0] for r in rows]
    images = np.concatenate([p["images"] for p in parts]).astype(np.float32)
    labels = np.concatenate([p["labels"] for p in parts]) if is_labelled(manifest) else None
    names = [i if i is not None else f"index {int(p['index'][0])}" for i, p in zip(ids, parts)]
    return {"images": images, "labels": labels, "names": names, "split": split}


# Images of a data set's test split drawn (by --seed) and scored; each class's grid shows up to
# --n of them. Enough for a few grids of a balanced set, few enough to score in seconds on a CPU.
DRAWN = 200

TEXT_META = ("RUN", "CKPT", "CKPTSHA", "INPUTSHA", "MEAN", "STD", "SRCARGS")


def _read_catalog(catalog: Path):
    """A `dmhpc predict` catalog as an astropy Table with its provenance in `meta` (plain CSV keeps
    it in CATALOG.json beside the file)."""
    from astropy.io import ascii
    from astropy.table import Table

    fmt = CATALOG_FORMATS.get(catalog.suffix.lower())
    if fmt is None:
        raise DmhpcError(f"{catalog}: not a catalog dmhpc predict writes (its extension is one of "
                         f"{', '.join(CATALOG_FORMATS)})")
    try:
        beside = provenance_file(catalog)
        if fmt == "ascii.csv":
            if not catalog.is_file():
                raise FileNotFoundError(catalog)
            if not beside.is_file():  # a CSV copied without it: "not a catalog of predict" named nothing to fetch
                raise DmhpcError(f"{catalog}: its provenance file {beside.name} is not beside it (plain CSV "
                                 f"keeps predict's metadata there); copy it along")
            with open(catalog, "rb") as f:  # hashed and read from one open file: the bytes parsed are those hashed
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                f.seek(0)
                # predict writes a CSV's ids as text: read as such, not guessed ("00013" was 13)
                table = Table.read(f, format=fmt, converters={"id": [ascii.convert_numpy(str)]})
            try:
                recorded = json.loads(beside.read_text())
            except ValueError as exc:  # (named the CSV, which was read well)
                raise DmhpcError(f"{beside}: not predict's JSON record of {catalog.name} ({exc})") from None
            if not isinstance(recorded, dict):
                raise DmhpcError(f"{beside}: expected a JSON object of predict's metadata, got {show(recorded)[:60]}")
            if recorded.get(CSV_SHA, digest) != digest:  # (predict before 2026-12-02 recorded none)
                raise DmhpcError(f"{beside}: the provenance of another {catalog.name} (its {CSV_SHA} is not the "
                                 f"file's SHA-256): a catalog replaced while it was read, or copied apart; "
                                 f"copy the two together, or predict again")
            table.meta.update(recorded)
        else:
            table = Table.read(catalog, format=fmt, **({"path": HDF5_TABLE} if fmt == "hdf5" else {}))
        table.convert_bytestring_to_unicode()  # FITS and HDF5 give text ids back as bytes
    except FileNotFoundError:
        raise DmhpcError(f"{catalog}: no such catalog") from None
    except (OSError, ValueError) as exc:
        raise DmhpcError(f"{catalog}: not a readable catalog ({reason_of(exc)})") from None
    # Predict writes these as text, and they are read as text (paths, JSON, digests); in a file edited
    # by hand (an ECSV's header, a CSV's JSON beside it) they may be anything.
    for key in TEXT_META:
        if key in table.meta and not isinstance(table.meta[key], str):
            where = beside if fmt == "ascii.csv" else catalog
            raise DmhpcError(f"{where}: {key}: expected text as predict writes it, got {show(table.meta[key])[:60]} "
                             f"(edited by hand?); predict again")
    return table


GRID_NAMES = (*(f"{domain}_{cls}.png" for domain in ("data", "source", "target")
                for cls in CLASS_NAMES.values()),
              "top_candidates.png")


def _claim_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding another explanation (its explain.json) unless `overwrite`, which
    removes that explanation's grids first: none of them may pass for the new one's. Figures without
    that record (a killed explain's, or someone's own) are refused likewise, and with `overwrite`
    every file name an explain writes is removed."""
    record = out / "explain.json"
    # A killed explain's half-written files: its own names only (the folder may be shared: a catalog's).
    remove_orphans(out, of=(*GRID_NAMES, record.name))
    if not record.is_file():
        figures = sorted(p.name for p in out.glob("*.png")) if out.is_dir() else []
        if figures and not overwrite:
            more = f" and {len(figures) - 1} more" if len(figures) > 1 else ""
            raise DmhpcError(f"--out {out}: holds figures ({figures[0]}{more}) but no {record.name} (an explain "
                             f"that did not finish, or other figures); --overwrite writes over them, or choose "
                             f"another folder")
        # Which grids the unfinished explain wrote is unknown: every name an explain writes goes.
        _remove_grids(out, GRID_NAMES)
        return
    if not overwrite:
        raise DmhpcError(f"--out {out}: holds an explanation already ({record.name}); --overwrite replaces it, "
                         f"or choose another folder")
    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        files = None
    record.unlink()
    # Only names an explain writes: a hand-edited list naming a folder or someone's notes.txt in it
    # failed as a traceback, or deleted that file. A record that lists none (damaged) keeps no grid
    # of its explanation either: every name an explain writes goes.
    _remove_grids(out, [name for name in files if name in GRID_NAMES] if isinstance(files, list) else GRID_NAMES)


def _remove_grids(out: Path, names) -> None:
    for name in names:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:  # a folder by a grid's name
            raise DmhpcError(f"{out / name}: cannot remove it to write the new explanation ({exc.strerror})") from None


def _check_columns(catalog: Path, table) -> None:
    """The columns explain reads hold what predict writes: an index of 3.5 drew image 3 under that
    row's name, a NaN probability passed the read-back check, a label 0.5 was drawn as a
    non-merger, and text in any of them was a traceback."""
    def refuse(column: str, expected: str) -> None:
        raise DmhpcError(f"{catalog}: column {column}: expected {expected}, as predict writes it (edited by hand?)")

    def values(column: str, kinds: str) -> np.ndarray | None:
        data = table[column]
        if np.any(getattr(data, "mask", False)):  # an empty cell
            return None
        data = np.asarray(data)
        return data if data.dtype.kind in kinds else None

    if values("index", "iu") is None or (values("index", "iu") < 0).any():
        refuse("index", "the non-negative whole number of each row's input position in every row")
    p = values("p_merger", "f")
    if p is None or not ((p >= 0) & (p <= 1)).all():
        refuse("p_merger", "a probability from 0 to 1 in every row")
    if "label" in table.colnames and values("label", "iub") is None:
        refuse("label", "a whole number in every row (1 merger, 0 non-merger, negative unlabelled)")
    if "log_odds" in table.colnames and (values("log_odds", "f") is None or
                                         not np.isfinite(values("log_odds", "f")).all()):
        refuse("log_odds", "a finite number in every row")


def _top_candidates(table, n: int) -> np.ndarray:
    """The rows of the `n` highest merger probabilities, ties broken by the log-odds where the catalog
    has them: p rounds to exactly 1 past a log-odds of ~37, and the "top" of a confident model's
    catalog was its first rows in input order among hundreds tied at 1 (catalogs of an older dmhpc
    have no log_odds: their ties stay in input order)."""
    p = np.asarray(table["p_merger"], dtype=np.float64)
    if "log_odds" not in table.colnames:
        return np.argsort(-p, kind="stable")[:n]
    return np.lexsort((-np.asarray(table["log_odds"], dtype=np.float64), -p))[:n]


def _catalog_model(catalog: Path, table, run: RunDir, checkpoint: str | None, device) -> Model:
    """The model that wrote `catalog`: its checkpoint unless another is named, refused when it is not
    the one the catalog records, since the grids are titled with the catalog's probabilities.

    A catalog that records its checkpoint's SHA-256 is compared by it, so a moved or copied run is
    the same model; an older one by its run's path and checkpoint step."""
    sha = str(table.meta.get("CKPTSHA", ""))
    if not sha and str(run.path.resolve()) != str(Path(table.meta["RUN"]).resolve()):
        raise DmhpcError(f"--run {run.path}: {catalog} was predicted by the run {table.meta['RUN']}; explain it "
                         f"with that run")
    model = Model(run, checkpoint or str(table.meta["CKPT"]), device)
    if sha and model.sha256 != sha:
        raise DmhpcError(f"--run {run.path}, --checkpoint {checkpoint or table.meta['CKPT']}: {model.path} is not the "
                         f"checkpoint {catalog} was predicted with (its SHA-256 differs: another run, or a checkpoint "
                         f"written since)")
    step = model.checkpoint.get("step", -1)
    if not sha and str(step) != str(table.meta["CKPTSTEP"]):  # an int, or a numpy int read back from FITS
        raise DmhpcError(f"--checkpoint {checkpoint or table.meta['CKPT']}: {model.path} is at step {step}; {catalog} "
                         f"was predicted at step {table.meta['CKPTSTEP']} (a checkpoint written since?)")
    return model


def _source_args(catalog: Path, recorded: str) -> dict:
    """predict's record of how it opened its inputs (SRCARGS), as keyword arguments of open_source."""
    try:
        args = json.loads(recorded)
    except ValueError:
        args = None
    known = inspect.signature(open_source).parameters
    # Each value text or null (nan_fill a number): a number for a path was a TypeError traceback.
    if not isinstance(args, dict) or not set(args) <= set(known) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) if k == "nan_fill" else
                          isinstance(v, str)) for k, v in args.items()):
        raise DmhpcError(f"{catalog}: SRCARGS is not predict's record of its inputs (edited by hand?); predict again")
    # Options an older predict took where they did nothing (and open_source now refuses): dropped.
    ignored = ()
    if args.get("data") is not None:
        ignored = ("nan_fill", "label_column", "file_column", "cutouts")
    elif args.get("catalog") is None:
        ignored = ("label_column", "file_column", "cutouts")
    elif args.get("images") is not None:
        ignored = ("file_column", "cutouts")
    if args.get("data") is not None or args.get("catalog") is None:
        args.pop("id_column", None)
    return {k: v for k, v in args.items() if k not in ignored}


def _recorded_normalization(catalog: Path, meta, channels: int) -> tuple[list, list]:
    """The MEAN and STD predict normalized the catalog's images with, one per channel."""
    try:
        mean, std = json.loads(str(meta["MEAN"])), json.loads(str(meta["STD"]))
        # Numbers only: "0.44" passed float() here and failed as a tensor later, a traceback.
        numbers = [v for v in [*mean, *std] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    except (ValueError, TypeError):
        numbers, mean, std = [], [], []
    if len(mean) != channels or len(std) != channels or len(numbers) != 2 * channels or \
            not all(np.isfinite(numbers)) or min(std) <= 0:
        raise DmhpcError(f"{catalog}: MEAN and STD are not predict's record of {channels} channels' statistics "
                         f"(edited by hand?); predict again")
    return mean, std


# How far a candidate's merger probability computed again may be from its catalog's: another device,
# batch or TF32 moves it by ~1e-4 (bf16: ~1e-2); another image's is as far as any other candidate's.
READ_BACK_TOLERANCE = {"none": 0.02, "bf16": 0.1}


def _check_read_back(catalog: Path, meta, model: Model, norm: Normalizer, images: np.ndarray, probs: np.ndarray,
                     index: np.ndarray, source: Path) -> None:
    """Refuse images read back that are not those the catalog's probabilities are of: the input
    digest covers the input the metadata names, not rows some other prediction put in the table
    (catalogs of survey tiles stacked keep one tile's metadata)."""
    amp = str(meta.get("AMP", "none"))
    model.amp = amp if amp in READ_BACK_TOLERANCE else "none"
    # (index and id: what a non-finite probability's one line names)
    now = batch_columns(model, norm, images.copy(), {"index": index, "id": index},
                        str(meta.get("TTA")) == "True")["p_merger"]
    far = np.flatnonzero(~(np.abs(now - probs) <= READ_BACK_TOLERANCE[model.amp]))  # (NaN is far)
    if len(far):
        k = far[0]
        raise DmhpcError(f"{catalog}: the row of input position {int(index[k])} has p_merger {probs[k]:.5f}; its "
                         f"image in {source} gives {now[k]:.5f} now: not the image that row was predicted from "
                         f"(rows of other predictions stacked into it?); explain each prediction's own catalog")


def _refuse_out_in(out: Path, folder: Path) -> None:
    """The figures are not put among an input's files (predict refuses its catalog there too): a
    data set's folder holds its shards only, and `prepare --overwrite` of it keeps what it did not
    write."""
    if inside(out, folder):
        raise DmhpcError(f"--out {out}: inside {folder}, an input of this explanation; write the figures elsewhere")


def explain(run_dir, out, *, checkpoint: str | None = None, data=None, catalog=None, n: int = 6, seed: int = 0,
            overwrite: bool = False, rgb: tuple[int, int, int] | None = None, normalize: str = "target") -> list[Path]:
    """Write the PNG grids; returns their paths. `checkpoint`: by default a catalog's own, else best.
    `rgb`: the channels drawn red, green, blue (default DEFAULT_RGB; refused for images of fewer than
    three filters, drawn in grey). `normalize`: `data`'s statistics, the run's target's or its own
    ("target" or "own")."""
    if normalize not in ("target", "own"):
        raise DmhpcError(f"--normalize {normalize!r}: expected target or own")
    if normalize == "own" and data is None:
        raise DmhpcError("--normalize own goes with --data: the run's domains are normalized as it trained, a "
                         "catalog's candidates as predict recorded")
    if not 1 <= n <= MAX_N:  # (beyond it: matplotlib's traceback, after every attribution)
        raise DmhpcError(f"--n {n}: from 1 to {MAX_N} (each image is a row of a figure); explain a "
                         f"catalog's top {MAX_N}, or a selection of it")
    _captum()
    run, out = RunDir(run_dir), Path(out)
    run.refuse_inside(out, "--out")
    if out.exists() and not out.is_dir():  # failed with a traceback on the first figure's name in it
        raise DmhpcError(f"--out {out}: is a file; explain writes a folder of figures, name one")
    dist = bootstrap()
    held = contextlib.ExitStack()
    others: list[set] = []  # once --out is claimed: the figures in it that are not this explanation's
    try:
        # Under a launcher the figures are one process's work: every rank drew and wrote the same
        # ones, and rank 0's lock on --out went with it while others still wrote.
        if not dist.is_main:
            return []
        table = None
        if catalog is not None:
            table = _read_catalog(Path(catalog))
            # A catalog cut down to a few columns (astropy keeps the metadata) lacks `index`, the row
            # of each candidate's image.
            if not {"p_merger", "index"} <= set(table.colnames) or \
                    not {"SRCARGS", "RUN", "CKPT", "CKPTSTEP", "MEAN", "STD"} <= set(table.meta):
                raise DmhpcError(f"{catalog}: not a catalog written by dmhpc predict (no p_merger or index column, "
                                 f"or no SRCARGS, RUN, CKPT, CKPTSTEP, MEAN or STD); explain predict's own file")
            if not len(table):  # (a selection that kept nothing): a traceback from captum
                raise DmhpcError(f"{catalog}: no rows; nothing to explain")
            _check_columns(Path(catalog), table)
            index = np.asarray(table["index"])
            ordered = np.sort(index)
            twice = ordered[np.flatnonzero(np.diff(ordered) == 0)[:1]]
            if len(twice):  # astropy's vstack keeps one table's metadata: the others' rows read from its input
                raise DmhpcError(f"{catalog}: input position {int(twice[0])} is in it twice: rows of several "
                                 f"predictions (catalogs stacked?); explain each prediction's own catalog")
            model = _catalog_model(Path(catalog), table, run, checkpoint, dist.device)
        else:
            model = Model(run, checkpoint or "best", dist.device)
        # The checkpoint's channels, read with its weights (run.json may be of a run that replaced it).
        channels = model.data["source"]["shape"][0]  # fewer than 3: drawn in grey
        if rgb is not None and channels < 3:  # (it was taken, and recorded as null, without a word)
            raise DmhpcError(f"--rgb {','.join(map(str, rgb))}: the run's images have {channels} filter"
                             f"{'s' if channels > 1 else ''}, drawn in grey; --rgb chooses three of more")
        rgb = DEFAULT_RGB if rgb is None else rgb
        if len(rgb) != 3 or (channels >= 3 and not all(0 <= k < channels for k in rgb)):
            raise DmhpcError(f"--rgb {','.join(map(str, rgb))}: three channel indices from 0 to {channels - 1} "
                             f"(the run's images have {channels} filters)")

        def claim_out() -> None:  # once the inputs are read: a typo in them must not cost the old grids
            # Held to the end: two explains into one folder both found no explain.json, and wrote
            # over each other's grids under the last one's record.
            held.enter_context(locked_directory(out, "dmhpc explain"))
            _claim_out(out, overwrite)
            others.append(set(out.glob("*.png")))  # (figures of the user's own: kept)

        written: dict[Path, list] = {}  # grid -> the names of its rows, in order
        if catalog is not None:
            top = _top_candidates(table, n)
            source = open_source(**_source_args(Path(catalog), table.meta["SRCARGS"]))
            # The grids show the catalog's probabilities beside images read back now: they must be
            # the images those are of (a catalog of an older dmhpc has no INPUTSHA to compare).
            now = source.digest()
            if str(table.meta.get("INPUTSHA", now)) != now:
                raise DmhpcError(f"{catalog}: its inputs ({source.inputs}) changed since it was predicted (another "
                                 f"size or modification time, or a data set prepared again); predict again")
            if source.path.is_dir():  # a prepared data set
                _refuse_out_in(out, source.path)
            images = source.read_inputs(index[top])
            statistics = {"catalog": _recorded_normalization(Path(catalog), table.meta, images.shape[1])}
            norm = Normalizer(*statistics["catalog"], dist.device)
            # The catalog's own numbers: with TTA the mean over the transforms, not this one forward pass.
            probs = np.asarray(table["p_merger"])[top]
            _check_read_back(Path(catalog), table.meta, model, norm, images, probs, index[top], source.path)
            claim_out()
            x = norm(torch.from_numpy(images).to(model.device))
            cams, igs, ig = attributions(model, x)
            labels = np.asarray(table["label"])[top] if "label" in table.colnames else [None] * len(top)
            tta = " (p_merger: the catalog's TTA mean)" if str(table.meta.get("TTA")) == "True" else ""
            title = (f"{run.label}, {_checkpoint_label(model)}: top {len(top)} merger candidates of "
                     f"{Path(catalog).name} ({source.path.name}){tta}; {grad_cam_resolution(model.net, x)}")
            names = [str(v) for v in np.asarray(table["id"] if "id" in table.colnames else table["index"])[top]]
            path = attribution_grid(images, cams, igs, probs, labels, title, out / "top_candidates.png", rgb,
                                    names=names)
            _say_completeness(path, ig)
            written[path] = (names, ig)
            source.close()
            explained, prints = {"catalog": str(Path(catalog).resolve())}, {}  # (its INPUTSHA was compared)
        else:
            domains = {"data": Path(data)} if data is not None else {"source": Path(model.cfg.data.source),
                                                                      "target": Path(model.cfg.data.target)}
            explained = {name: str(directory.resolve()) for name, directory in domains.items()}
            prints = {}
            for name, directory in domains.items():
                try:
                    prints[name] = fingerprint(load_manifest(directory))
                except DmhpcError as exc:
                    raise (DmhpcError(f"--data: {exc}") if name == "data" else
                           run.data_error(f"data.{name}", directory, exc)) from None
            if data is not None:
                check_shape(data, load_manifest(data)["shape"], model.data["source"]["shape"])
                classes = load_manifest(data)["num_classes"]
                if classes > len(CLASS_NAMES):  # its other classes were left out, silently
                    raise DmhpcError(f"--data {data}: {classes} classes; the models here tell {len(CLASS_NAMES)} "
                                     f"apart (merger or not)")
            else:  # their "test split" may now hold images the run trained on, as eval refuses
                for role, directory in domains.items():
                    run.refuse_prepared_again(role, directory, prints[role],
                                              "explain it as other data with --data", model.data)
            drawn = {name: _test_split(directory, DRAWN, seed) for name, directory in domains.items()}
            for directory in domains.values():
                _refuse_out_in(out, directory)
            statistics = {name: model.normalization(name) for name in domains if name != "data"}
            if data is not None:
                statistics["data"] = _own_statistics(data) if normalize == "own" else model.normalization("target")
            claim_out()
            for name, directory in domains.items():
                label = f"{directory.name}, its own statistics" if name == "data" and normalize == "own" else \
                    (f"{directory.name}, the run's target statistics" if name == "data" else directory.name)
                written.update(_explain_domain(model, Normalizer(*statistics[name], dist.device), drawn[name], name,
                                               run, out, n, seed, label, rgb))
        block = model.net.last_conv_block()
        atomic_write(out / "explain.json", json.dumps({
            # The checkpoint's SHA-256, as the catalog and the model card record it: name, epoch and
            # step are the same for a run trained again with --overwrite.
            "run": str(run.path.resolve()), "checkpoint": {**model.checkpoint, "sha256": model.sha256},
            "data": explained,
            "fingerprints": prints,
            "normalization": {name: {"mean": mean, "std": std, **({"by": normalize} if name == "data" else {})}
                              for name, (mean, std) in statistics.items()},
            "seed": None if catalog is not None else seed,
            "target_class": "merger",
            # its name in the network (its class, Sequential for every model, said nothing)
            "grad_cam_layer": next(name for name, m in model.net.named_modules() if m is block),
            "rgb": list(rgb) if channels >= 3 else None,
            "ig_baseline": "zeros after normalization (each filter's mean pixel value, flat)",
            "ig_shown": "summed over filters, signed (positive: towards merger)",
            # Per grid: the path integral's steps, and the largest error of an image's attributions'
            # sum against its log-odds' change, relative to that change (or to 0.01 where smaller).
            "ig": {p.name: ig for p, (_, ig) in written.items()},
            "files": [p.name for p in written], "rows": {p.name: names for p, (names, _) in written.items()}},
            indent=2) + "\n")
        for p in written:
            print(f"wrote {p}")
        return list(written)
    except BaseException:
        if others:  # the grids drawn before a failure (a full disk) go: "nothing written", and a rerun
            for grid in set(out.glob("*.png")) - others[0]:  # found figures without explain.json
                grid.unlink(missing_ok=True)
        raise
    finally:
        held.close()
        shutdown()


def explain_arguments(parser) -> None:
    d = {name: p.default for name, p in inspect.signature(explain).parameters.items()}  # the defaults' one home
    parser.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="run directory (write --run-dir under torchrun)")
    parser.add_argument("--checkpoint", choices=["best", "last"],
                        help="default: the --catalog's own, else best")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="a prepared data set (its test split, else all of it) instead of the run's source and target")
    parser.add_argument("--normalize", default=d["normalize"], choices=["target", "own"],
                        help=f"with --data: target, the statistics the run normalized its target domain with; own, "
                             f"the data set's own (default: {d['normalize']})")
    parser.add_argument("--catalog", type=Path, metavar="CATALOG",
                        help="a dmhpc predict catalog: explain its top merger candidates")
    # --count too: under torchrun, --n is an ambiguous abbreviation of torchrun's --nnodes and others.
    parser.add_argument("--n", "--count", dest="n", type=int, default=d["n"],
                        help=f"images per domain and class, or with --catalog the top candidates, 1 to {MAX_N} "
                             f"(default {d['n']}; write --count under torchrun)")
    parser.add_argument("--seed", type=int, help=f"which test images are drawn (default {d['seed']}; not with "
                                                 f"--catalog, whose top candidates are explained)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG grids")
    rgb = ",".join(map(str, DEFAULT_RGB))
    parser.add_argument("--rgb", metavar="R,G,B",
                        help=f"the filters (channel indices) drawn red, green and blue (default {rgb}: filter 2 red; "
                             f"the embedded set and DeepMerge's F814W, F356W, F160W in wavelength order: 1,2,0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the explanation already in --out")


def explain_main(args) -> int:
    if args.data is not None and args.catalog is not None:
        raise DmhpcError("give --data or --catalog, not both")
    if args.seed is not None and args.seed < 0:
        raise DmhpcError(f"--seed {args.seed}: expected a non-negative integer")
    if args.seed is not None and args.catalog is not None:  # it would be recorded as if it chose them
        raise DmhpcError("--seed draws test images; --catalog explains its top candidates, which no seed chooses")
    try:
        rgb = None if args.rgb is None else tuple(int(k) for k in args.rgb.split(","))
    except ValueError:
        raise DmhpcError(f"--rgb {args.rgb}: three channel indices, as 1,2,0") from None
    explain(args.run, args.out, checkpoint=args.checkpoint, data=args.data, catalog=args.catalog, n=args.n,
            **({} if args.seed is None else {"seed": args.seed}), overwrite=args.overwrite, rgb=rgb,
            normalize=args.normalize)
    return 0
