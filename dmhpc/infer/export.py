"""`dmhpc export`: the trained classifier as a file other tools load, with a model card beside it.

    dmhpc export --run RUN [--checkpoint best] --format onnx|torchscript|safetensors --out FILE

What is exported takes raw images and gives merger probabilities: (N, C, H, W) float32 in, the
per-channel normalization the run used for its target domain built in; out, (N,) float32 each,
p_merger (softmax of the logits) and log_odds (log p/(1-p), the difference of the two logits),
which keeps the order of confident candidates that float32 p ties at 1.0. The batch dimension
is dynamic.

- onnx: `torch.onnx.export(..., dynamo=True)`; checked after export with onnxruntime against torch
  on a random batch, both outputs (the largest differences are printed and stored in the card).
- torchscript: `torch.jit.trace` (maintenance mode upstream, kept for C++ users).
- safetensors: the weights and the normalization as tensors, no pickled code; rebuilding the
  network needs dmhpc (`dmhpc.infer.export.load_safetensors`), whose architecture name and
  options are in the file's metadata.

The card, FILE.card.md and FILE.card.json: the data sets with their fingerprints (the SHA-256 of the
manifest's content, which lists every shard's SHA-256; `dmhpc info` prints it), the configuration,
the selection criterion and the checkpoint it chose, the test metrics per domain, the input and
output, and the dmhpc version. FILE.card.json takes its name last and holds FILE's SHA-256: without
it, the export did not finish.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmhpc import code_version
from dmhpc.config import config_from_dict, config_to_dict
from dmhpc.data.shards import file_sha256
from dmhpc.distributed import bootstrap, shutdown
from dmhpc.errors import DmhpcError, reason_of
from dmhpc.files import atomic_path, fsync_file, locked_directory, remove_orphans, staged_write
from dmhpc.markdown import code, table
from dmhpc.names import MERGER, MERGER_THRESHOLD
from dmhpc.infer.trained import Trained, load_trained
from dmhpc.run import RunDir, statistics
from dmhpc.run_records import strict_json
from dmhpc.train.checkpoint import check_finite_weights, chosen_with_target_labels
from dmhpc.train.objective import build_backbone

FORMATS = ("onnx", "torchscript", "safetensors")
# What a receiver's tools open by: ONNX and safetensors files by their own suffix, TorchScript as torch's.
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript"), "safetensors": (".safetensors",)}
OUTPUTS = ("p_merger", "log_odds")
# The largest difference from torch allowed, per output, relative to the value where it is above 1:
# p in [0, 1]; log-odds without bound (a confident model's are tens), whose float32 rounding grows
# with them.
ONNX_TOLERANCE = {"p_merger": 1e-5, "log_odds": 1e-4}
TORCHSCRIPT_TOLERANCE = {"p_merger": 1e-6, "log_odds": 1e-5}  # traced: eager torch's kernels, same machine
ONNX_OPSET = 20  # IR version 10: onnxruntime 1.18 (May 2024, the floor in setup.cfg) on runs it


class MergerClassifier(nn.Module):
    """Raw (N, C, H, W) images -> (p(merger), log-odds), each (N,): normalization, the classifier,
    softmax. `input_shape`: the (C, H, W) it refuses others than, where known (`load_safetensors`:
    a ResNet took any size and answered; the ONNX file refuses them); `origin` names it there."""

    def __init__(self, net: nn.Module, mean, std, input_shape: tuple | None = None, origin: str = ""):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_shape, self.origin = input_shape, origin

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_shape is not None and tuple(image.shape[1:]) != self.input_shape:
            raise DmhpcError(f"{self.origin}: the model takes images of (C, H, W) {self.input_shape}, got "
                             f"{tuple(image.shape[1:])}")
        _, logits = self.net((image - self.mean) / self.std)
        logits = logits.float()
        return torch.softmax(logits, dim=1)[:, MERGER], logits[:, MERGER] - logits[:, 1 - MERGER]


@dataclass(frozen=True)
class Built:
    """What an export holds, read from the run once: the card describes these, never the run as it
    is when the export (tens of seconds for ONNX) ends."""
    model: MergerClassifier  # eval mode, CPU
    trained: Trained          # the checkpoint's network, configuration, data sets and statistics


def build(run: RunDir, checkpoint: str = "best") -> Built:
    """The classifier to export; one of images of another shape than its checkpoint records (an
    edited record) is refused here, not as an exporter's traceback or a card of an input it refuses."""
    trained = load_trained(run, checkpoint)
    model = MergerClassifier(trained.net, *statistics(trained.data["target"])).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *trained.shape))
    except RuntimeError as exc:
        raise DmhpcError(f"{trained.path}: its network does not take images of the shape it records, "
                         f"{tuple(trained.shape)} ({reason_of(exc)}); an edited checkpoint?") from None
    return Built(model, trained)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings (a missing torchvision, deprecations) off: a
    successful export says one line, a failed one its error alone."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check(out: Path, what: str, got, want, tolerance: dict) -> dict:
    """The largest difference from torch per output, relative to the value where it is above 1; more
    than `tolerance` is a DmhpcError. Both are compared: where p saturates near 0 or 1 it hides an
    error in the logits."""
    differences = {}
    for name, g, w in zip(OUTPUTS, got, want):
        w = np.asarray(w, dtype=np.float64)
        differences[name] = float((np.abs(np.asarray(g, dtype=np.float64) - w) / np.maximum(1.0, np.abs(w))).max())
        if not differences[name] <= tolerance[name]:
            raise DmhpcError(f"{out}: {what} differs from torch by {differences[name]:.2e} in {name} (more than "
                             f"{tolerance[name]:g}, relative above 1); nothing written")
    return differences


def _embedded(built: Built) -> dict[str, str]:
    """What the exported file says of itself, beside its card (text keys and values: ONNX
    metadata_props, safetensors metadata, a TorchScript extra file): the card could be left behind,
    and the file named nothing of its input, classes or checkpoint."""
    trained = built.trained
    return {"dmhpc": code_version(), "architecture": trained.cfg.model.name,
            "input_shape": json.dumps(["N", *trained.shape]),
            "input": "raw images (N, C, H, W) float32 in the training data's channel order; the normalization is "
                     "built in",
            "outputs": "p_merger = softmax(logits)[:, 1], log_odds = logits[:, 1] - logits[:, 0] (class 1: merger)",
            "merger_threshold": str(MERGER_THRESHOLD), "checkpoint": trained.info["name"],
            "checkpoint_sha256": trained.sha256, "card": "FILE.card.json beside it"}


def _onnx(model: MergerClassifier, example: torch.Tensor, out: Path, tmp: Path, embedded: dict) -> dict:
    """Write the ONNX program to `tmp` and check it with onnxruntime; the largest differences."""
    try:
        import onnxruntime
    except ImportError:
        raise DmhpcError("--format onnx needs onnx, onnxscript and onnxruntime: pip install dmhpc[export]") from None
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            program = torch.onnx.export(model, (example,), input_names=["image"], output_names=list(OUTPUTS),
                                        dynamic_shapes={"image": {0: batch}}, dynamo=True,
                                        opset_version=ONNX_OPSET, verbose=False)
    except ImportError:
        raise DmhpcError("--format onnx needs onnx and onnxscript: pip install dmhpc[export]") from None
    program.save(str(tmp))  # checked before it takes its name: a file that fails is never left
    import onnx

    saved = onnx.load(str(tmp))
    onnx.helper.set_model_props(saved, embedded)
    onnx.save(saved, str(tmp))
    check = _check_batch(model, example)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {"image": check.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in model(check)]
    return _check(out, "onnxruntime", got, want, ONNX_TOLERANCE)


def _check_batch(model: MergerClassifier, example: torch.Tensor) -> torch.Tensor:
    """Images on the scale the model expects (the statistics built in): far outside it the
    probabilities saturate near 0 or 1, and the network runs where it never did."""
    return model.mean + model.std * torch.randn(5, *example.shape[1:], generator=torch.Generator().manual_seed(0))


def _torchscript(model: MergerClassifier, example: torch.Tensor, out: Path, tmp: Path, embedded: dict) -> None:
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(model, example)
        # On other images than the zeros it was traced on: a path the trace froze (a branch taken on
        # a value) differs there.
        check = _check_batch(model, example)
        got, want = traced(check), model(check)
    _check(out, "the traced model", got, want, TORCHSCRIPT_TOLERANCE)
    # Into memory first: torch's zip writer meeting a full disk throws from a C++ destructor, which
    # aborts the process (exit 134, its temporary file left behind) instead of raising an OSError.
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"dmhpc.json": json.dumps(embedded)})
    tmp.write_bytes(buffer.getbuffer())


def _safetensors(model: MergerClassifier, cfg_dict: dict, tmp: Path, embedded: dict) -> None:
    from safetensors.torch import save

    metadata = {"format": "pt", "model": json.dumps(cfg_dict["model"]), **embedded,
                "input": "raw images (N, C, H, W) float32; normalization in the tensors mean and std",
                "outputs": "p_merger = softmax(logits)[:, 1] and log_odds = logits[:, 1] - logits[:, 0], "
                           "logits = net((image - mean) / std) (class 1: merger)"}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp.write_bytes(save(tensors, metadata=metadata))


def load_safetensors(path) -> MergerClassifier:
    """Rebuild an exported classifier from its safetensors file (needs dmhpc, not the run); a file
    that is not such an export, or not the one its card beside it (FILE.card.json) names, is a
    DmhpcError naming it. The model refuses images of another (C, H, W) than it was trained on, as
    the ONNX export does (a ResNet took any size and answered)."""
    from safetensors import safe_open

    card = Path(f"{path}.card.json")
    if card.is_file():  # (read before the file: a file edited with finite values loaded as the export)
        try:
            named = json.loads(card.read_text(encoding="utf-8"))["model"]["sha256"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DmhpcError(f"{card}: not a readable model card ({reason_of(exc)})") from None
        if Path(path).is_file() and file_sha256(path) != named:
            raise DmhpcError(f"{path}: not the file its card {card.name} names (SHA-256 differs): edited or "
                             f"replaced since it was exported")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise DmhpcError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors' SafetensorError (a truncated file, another format), OSError
        raise DmhpcError(f"{path}: not a readable safetensors file: {reason_of(exc)}") from None
    try:
        model_cfg = json.loads(meta["model"])
        if not isinstance(model_cfg, dict) or "name" not in model_cfg:  # ("null" built the default network)
            raise ValueError(f"model {meta['model'][:60]} names no network")
        cfg = config_from_dict({"model": model_cfg}, f"{path}: metadata")
        mean, std = tensors["mean"].flatten().tolist(), tensors["std"].flatten().tolist()
    except (KeyError, TypeError, ValueError) as exc:
        raise DmhpcError(f"{path}: not a dmhpc export (its metadata's model or its mean and std tensors: "
                         f"{type(exc).__name__} {str(exc)[:100]})") from None
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
        raise DmhpcError(f"{path}: its normalization is not finite numbers with std above 0 (an edited file?)")
    shape = None
    if "input_shape" in meta:  # (an export of an earlier dmhpc records none)
        try:
            shape = tuple(int(n) for n in json.loads(meta["input_shape"])[1:])
        except (ValueError, TypeError) as exc:
            raise DmhpcError(f"{path}: its metadata's input_shape {meta['input_shape'][:40]!r} is not a shape "
                             f"({reason_of(exc)})") from None
    # The normalization is per input channel: its length is the channels the network was built for.
    model = MergerClassifier(build_backbone(cfg, len(mean)), mean, std, shape, str(path))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise DmhpcError(f"{path}: its tensors do not fit a {cfg.model.name} network of {len(mean)} channels "
                         f"({(str(exc).splitlines() or [''])[0][:150]})") from None
    check_finite_weights(model, path)
    return model.eval()


def model_card(run: RunDir, built: Built, fmt: str, out: Path, onnx_max_diff: dict | None) -> dict:
    trained = built.trained
    cfg, data, info = trained.cfg, trained.data, {**trained.info, "sha256": trained.sha256}
    result = run.read_result(info["name"], "test")
    tested = (result or {}).get("checkpoint", {})
    if result is not None and (tested.get("sha256", info["sha256"]) != info["sha256"]
                               or tested.get("step") != info.get("step")):
        # The test of another checkpoint of that name: the run trained on since, or was replaced
        # (a result of a dmhpc before 2026-12-02 names no SHA-256: its step is compared).
        result = None
    card = {
        "model": {"file": out.name, "format": fmt, "architecture": cfg.model.name, "dmhpc": code_version()},
        "input": {"name": "image", "shape": ["N", *trained.shape], "layout": "NCHW (channels in the training data's order)",
                  "dtype": "float32", "normalization": _normalization_text(cfg),
                  "mean": data["target"]["mean"], "std": data["target"]["std"]},
        "outputs": [{"name": "p_merger", "shape": ["N"], "dtype": "float32",
                     "meaning": "probability that the galaxy is a merger (class 1)", "threshold": MERGER_THRESHOLD},
                    {"name": "log_odds", "shape": ["N"], "dtype": "float32",
                     "meaning": "log(p_merger / (1 - p_merger)), from the logits: it orders the confident "
                                "candidates that p_merger, float32, ties at 1.0"}],
        "data": {role: {k: data[role].get(k) for k in ("path", "fingerprint", "shape")}
                 for role in ("source", "target")},
        "checkpoint": info,
        "selection": {"criterion": info.get("criterion"), "score": info.get("score"),
                      "oracle": chosen_with_target_labels(info, cfg)},
        "test_metrics": {d: {k: v for k, v in result.get(d, {}).items() if k != "confusion"}
                         for d in ("source", "target")} if result else None,
        "config": config_to_dict(cfg),
        "run": str(run.path.resolve()),
    }
    card["intended_use"] = _intended_use(card["selection"]["oracle"])
    if onnx_max_diff is not None:
        card["model"]["onnxruntime_max_difference"] = onnx_max_diff
        card["model"]["onnx_opset"] = ONNX_OPSET
    return card


def _normalization_text(cfg) -> str:
    """Whose statistics are built in: those the run normalized its target domain with."""
    whose = "its own" if cfg.data.normalize == "per-domain" else "the source's (data.normalize: source)"
    return f"built in: the statistics the run normalized its target domain with, {whose}"


def _intended_use(oracle: bool) -> str:
    """What the model is for, and what its outputs are not (a model card's first question)."""
    text = ("Finding merger candidates among galaxy images like those the run was tested on (instrument, "
            "filters, pixel scale and flux scale) for a person to inspect: rank them by log_odds, or take "
            "p_merger >= 0.5 (the threshold dmhpc's accuracy and F1 count). p_merger is not calibrated on other "
            "data: the share of a survey above 0.5 is no merger fraction of its population without a calibration "
            "on labelled examples of that survey, and a candidate is no confirmed merger.")
    if oracle:
        text += (" Its checkpoint was chosen with target labels (an oracle): its test metrics are an upper bound, "
                 "not what a model selected without them would reach.")
    return text


def _limits(normalize: str) -> str:
    """What the built-in normalization means for images other than the target's."""
    if normalize == "per-domain":
        how = ("The built-in normalization is the target domain's: the model sees other images as the target "
               "was seen only if they are on its flux scale and in its units, filters and pixel scale. For a "
               "survey whose flux scale differs, normalize with its own statistics instead (`dmhpc predict "
               "--normalize own` with the run), or rescale the images to the target's first.")
    else:
        how = ("The built-in normalization is the source domain's, with which the run normalized every domain "
               "(data.normalize: source): the model sees other images as the target was seen only if they are "
               "on the target's flux scale and in its units, filters and pixel scale; rescale the images to "
               "the target's first.")
    return f"{how} It was trained on the data below; it says nothing reliable of galaxies unlike them."


def _card_markdown(card: dict) -> str:
    m, i, (p, log_odds) = card["model"], card["input"], card["outputs"]
    lines = [f"# Model card: {code(m['file'])}", "",
             f"A {m['architecture']} merger classifier trained by dmhpc {m['dmhpc']}, exported as {m['format']}.", "",
             f"SHA-256 of {code(m['file'])}: `{m['sha256']}`; of the checkpoint it holds: "
             f"`{card['checkpoint']['sha256']}`.", "",
             "## Input and output", "",
             f"- input `{i['name']}`: raw images (N, {', '.join(str(v) for v in i['shape'][1:])}), float32, NCHW, "
             f"the filters in the order of the training data; the per-channel normalization is "
             f"{i['normalization']} (mean {', '.join(f'{v:.6g}' for v in i['mean'])}; "
             f"std {', '.join(f'{v:.6g}' for v in i['std'])})",
             f"- output `{p['name']}`: {p['meaning']}, shape (N,); accuracy and F1 below count p >= "
             f"{p['threshold']} as a merger",
             f"- output `{log_odds['name']}`: {log_odds['meaning']}, shape (N,)", "",
             "## Intended use", "", card["intended_use"], "",
             "## Limits", "", _limits(card["config"]["data"]["normalize"]), "",
             "## Training data", ""]
    for role, d in card["data"].items():
        lines.append(f"- {role}: {code(d['path'])}, images {tuple(d['shape'])}, fingerprint `{d['fingerprint']}` "
                     f"(`dmhpc info` prints a data set's)")
    c, sel = card["checkpoint"], card["selection"]
    lines += ["", "## Selection", ""]
    if sel["criterion"] is None:
        what = "the run's latest, not chosen by any criterion" if c["name"] == "last" else \
            "its selection not recorded (an edited checkpoint?)"
        lines += [f"Checkpoint `{c['name']}` (epoch {c.get('epoch')}, step {c.get('step')}): {what}" +
                  (", but early stopping watched target labels (an oracle)" if sel["oracle"] else "") + ".", ""]
    else:
        lines += [f"Checkpoint `{c['name']}` (epoch {c.get('epoch')}, step {c.get('step')}), chosen by "
                  f"`{sel['criterion']}` (score {sel['score']})" +
                  (" using target labels (an oracle: not a choice a user without them could make)"
                   if sel["oracle"] else ", without target labels") + ".", ""]
    if not card["test_metrics"]:
        command = f"dmhpc eval --run {shlex.quote(card['run'])} --checkpoint {c['name']}"
        lines += ["## Test metrics", "", f"Not evaluated on the test split: {code(command)} evaluates it, and a "
                  f"new export puts the result here.", ""]
    else:
        header = ["domain", "accuracy", "ROC AUC", "F1", "Brier", "predicted merger fraction"]
        cells = ([d, *("" if t.get(k) is None else f"{t[k]:.3f}"
                       for k in ("accuracy", "roc_auc", "f1", "brier", "merger_fraction"))]
                 for d, t in card["test_metrics"].items())
        lines += ["## Test metrics", "", *table(header, cells), ""]
        if card["config"]["data"]["normalize"] == "per-domain":
            lines += ["Each domain as the run evaluated it, normalized with its own statistics (per-domain "
                      "normalization). The exported file normalizes every input with the target's, so on source "
                      "images it gives somewhat other numbers than the source row.", ""]
    if "onnxruntime_max_difference" in m:
        diff = m["onnxruntime_max_difference"]
        lines += [f"ONNX opset {m['onnx_opset']}; onnxruntime against torch on a random batch on the scale of "
                  f"the built-in normalization: largest difference {diff['p_merger']:.2e} in p, "
                  f"{diff['log_odds']:.2e} in the log-odds (relative to the value where it is above 1).", ""]
    lines += ["The full configuration and the run directory are in the JSON card beside this file.", ""]
    return "\n".join(lines)


def export(run_dir, out, *, fmt: str, checkpoint: str = "best", overwrite: bool = False) -> dict:
    """Export and write the card; returns the card.

    The file, FILE.card.md and FILE.card.json take their names in that order, the JSON card last:
    it holds the file's SHA-256, and a file without it is an export that did not finish. Two
    exports to one FILE are refused (a lock beside it), not raced."""
    if fmt not in FORMATS:
        raise DmhpcError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out, run = Path(out), RunDir(run_dir)
    run.refuse_inside(out, "--out")  # before the lock, which lies beside --out
    if out.is_dir():
        raise DmhpcError(f"--out {out}: is a folder; give the file to write, such as {out / ('merger' + SUFFIXES[fmt][0])}")
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise DmhpcError(f"--out {out}: --format {fmt} writes a {' or '.join(SUFFIXES[fmt])} file; name it so")
    cards = {"md": Path(f"{out}.card.md"), "json": Path(f"{out}.card.json")}
    for card in cards.values():  # (--overwrite removed the other card, then failed naming the file)
        if card.exists() and not card.is_file():
            raise DmhpcError(f"--out {out}: its card {card} exists and is not a file; remove it or write elsewhere")
    with locked_directory(out, "dmhpc export"):
        remove_orphans(out.parent, of=(out.name, *(card.name for card in cards.values())))  # killed exports' files
        if out.exists() and not overwrite:
            unfinished = "" if cards["json"].exists() else \
                f" (without its {cards['json'].name}: an export that did not finish?)"
            raise DmhpcError(f"--out {out}: exists{unfinished}; --overwrite replaces it")
        alone = [card for card in cards.values() if card.exists()]
        if alone and not overwrite:  # (its cards, which the export writes: someone's files by these names)
            raise DmhpcError(f"--out {out}: {alone[0].name} beside it exists (a card the export writes); "
                             f"--overwrite replaces it")
        built = build(run, checkpoint)
        model, example = built.model, torch.zeros(2, *built.trained.shape)
        onnx_diff, staged = None, {}
        try:
            with atomic_path(out) as tmp:
                embedded = _embedded(built)
                if fmt == "onnx":
                    onnx_diff = _onnx(model, example, out, tmp, embedded)
                elif fmt == "torchscript":
                    _torchscript(model, example, out, tmp, embedded)
                else:
                    _safetensors(model, config_to_dict(built.trained.cfg), tmp, embedded)
                card = model_card(run, built, fmt, out, onnx_diff)
                card["model"]["sha256"] = file_sha256(tmp)  # what a receiver checks the file against
                for kind, text in (("md", _card_markdown(card)), ("json", strict_json(card, indent=2) + "\n")):
                    staged[cards[kind]] = staged_write(cards[kind], text)  # one by one: a failed second leaves none
                # The old file's cards go just before the new file takes its name: killed in
                # between, a file stands without a card, never beside the card of the file it replaced.
                # The new file is on disk first: a disk full at its fsync (said there alone on NFS or
                # Lustre) had left the old file without its cards.
                fsync_file(tmp)
                for card_file in cards.values():
                    card_file.unlink(missing_ok=True)
            for card_file, card_tmp in staged.items():
                os.replace(card_tmp, card_file)
        finally:
            for card_tmp in staged.values():
                card_tmp.unlink(missing_ok=True)  # those not put in place
    return card


def export_arguments(parser) -> None:
    parser.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="run directory (write --run-dir under torchrun)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="default: best")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (the card goes beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")


def export_main(args) -> int:
    dist = bootstrap()  # one process is enough; under a launcher, rank 0 writes
    try:
        if dist.is_main:
            card = export(args.run, args.out, fmt=args.fmt, checkpoint=args.checkpoint, overwrite=args.overwrite)
            diff = card["model"].get("onnxruntime_max_difference")
            extra = f"; onnxruntime agrees within {diff['p_merger']:.1e} in p, {diff['log_odds']:.1e} in the log-odds" \
                if diff else ""
            print(f"wrote {args.out} and its card {args.out}.card.md / .card.json{extra}")
    finally:
        shutdown()
    return 0
